//! `moac compile`: a plan to an artifact folder (CUDA sources, PTX, CUBIN, manifest,
//! bindings), with a progress bar on a terminal.

use super::{parse, PlanInput};
use crate::Result;
use clap::Args;
use moac::artifact::{CompileOptions, EmitKind, TuningChoice};
use moac::geometry::Dtype;
use moac::jit::cache::Cache;
use moac::jit::Progress;
use std::path::PathBuf;

#[derive(Args)]
pub struct CompileArgs {
    #[command(flatten)]
    input: PlanInput,
    /// Artifact folder to write (replaced whole if it exists).
    #[arg(short, long)]
    output: PathBuf,
    /// GPU architectures, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "sm_80,sm_90")]
    arch: Vec<String>,
    /// Element type of Q, K, V and outputs: f16 or bf16.
    #[arg(long, value_parser = parse::<Dtype>, default_value = "f16")]
    dtype: Dtype,
    /// Specialize to one N: with --max-new-tokens, capacities and offsets become constants.
    #[arg(long)]
    prompt_len: Option<u64>,
    /// Generated tokens for a specialized build (default: the plan's setting, 1024).
    #[arg(long, requires = "prompt_len")]
    max_new_tokens: Option<u64>,
    /// Only these layers, comma-separated (default: all).
    #[arg(long, value_delimiter = ',')]
    layers: Option<Vec<usize>>,
    /// `all`: sources, PTX, CUBIN, bindings. `cuda`: sources and bindings only (no NVRTC needed).
    #[arg(long, value_parser = parse::<EmitKind>, default_value = "all")]
    emit: EmitKind,
    /// Compile cache folder (default: $MOAC_CACHE_DIR, else ~/.cache/moac).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Do not read or write the compile cache.
    #[arg(long)]
    no_cache: bool,
    /// Parallel NVRTC compiles (default: one per core).
    #[arg(long, default_value_t = 0)]
    jobs: usize,
    /// Print the time of every kernel compile.
    #[arg(long)]
    timings: bool,
    /// Take launch configurations from this tuning database (written by `moac tune`)
    /// where it has a winner for a kernel on one of the archs; the manifest records
    /// each kernel's `launch_source`.
    #[arg(long)]
    tuning: Option<PathBuf>,
    /// The prompt length the tuning entries must be for (their bucket of N = P + M;
    /// default: --prompt-len, else 4096).
    #[arg(long, requires = "tuning")]
    tuning_prompt_len: Option<u64>,
    /// The batch size the tuning entries must be for (its bucket).
    #[arg(long, default_value_t = 1, requires = "tuning")]
    tuning_batch: u64,
    /// SM count of the target GPU: sizes the default launch heuristic (decode splits)
    /// and, with --tuning, accepts only entries measured with this many SMs.
    #[arg(long)]
    sm_count: Option<u32>,
}

/// A progress bar over the NVRTC jobs, drawn only on a terminal.
struct Bar(indicatif::ProgressBar);

impl Bar {
    fn new() -> Bar {
        if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            return Bar(indicatif::ProgressBar::hidden());
        }
        let b = indicatif::ProgressBar::new(0);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{spinner} NVRTC [{bar:30}] {pos}/{len} {msg} ({eta})",
        ) {
            b.set_style(style.progress_chars("=> "));
        }
        Bar(b)
    }

    fn on(&self, p: Progress) {
        match p {
            Progress::Start { total } => self.0.set_length(total as u64),
            Progress::Done { unit, done, .. } => {
                self.0.set_message(unit);
                self.0.set_position(done as u64);
            }
            Progress::Warning(w) => self.0.suspend(|| eprintln!("warning: {w}")),
        }
    }
}

pub fn run(a: CompileArgs) -> Result<()> {
    let plan = a.input.load()?;
    let fixed = a.prompt_len.map(|p| {
        (
            p,
            a.max_new_tokens.unwrap_or(plan.settings().max_new_tokens),
        )
    });
    let opts = CompileOptions {
        dtype: a.dtype,
        archs: a.arch,
        fixed,
        layers: a.layers,
        emit: a.emit,
        cache: (!a.no_cache).then(|| Cache::new(a.cache_dir.unwrap_or_else(Cache::default_root))),
        jobs: a.jobs,
        tuning: match &a.tuning {
            Some(path) => {
                let m = plan.settings().max_new_tokens;
                let p = a.tuning_prompt_len.or(a.prompt_len).unwrap_or(4096);
                Some(TuningChoice {
                    path: path.clone(),
                    db: moac::tuning::TuningDb::load(path)?,
                    sm_count: a.sm_count,
                    n: p + a.max_new_tokens.unwrap_or(m),
                    batch: a.tuning_batch,
                })
            }
            None => None,
        },
        device: a.sm_count.map(moac::ir::DeviceProps::with_sm_count),
    };
    let bar = Bar::new();
    let on_progress = |p: Progress| bar.on(p);
    let report = moac::artifact::write(&plan, &opts, &a.output, Some(&on_progress));
    bar.0.finish_and_clear();
    let report = report?;
    for n in &report.tuning_notes {
        eprintln!("note: {n}");
    }
    if let Some(t) = &opts.tuning {
        eprintln!(
            "{} of {} kernels take their launch configuration from {}",
            report.tuned_kernels,
            report.kernels,
            t.path.display()
        );
    }
    if a.timings {
        for t in &report.timings {
            eprintln!(
                "{:<40} {:<6} {:>8.1} ms{}",
                t.unit,
                t.arch,
                t.seconds * 1e3,
                if t.cached { " (cached)" } else { "" }
            );
        }
    }
    eprintln!(
        "wrote {}: {} kernels, {} NVRTC compiles, {} from cache, {:.2} s{}",
        report.out_dir.display(),
        report.kernels,
        report.nvrtc_compiles,
        report.cache_hits,
        report.elapsed.as_secs_f64(),
        match &report.nvrtc_version {
            Some(v) => format!(" (NVRTC {v})"),
            None => " (sources and bindings only)".to_string(),
        }
    );
    Ok(())
}
