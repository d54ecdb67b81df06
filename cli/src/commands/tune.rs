//! `moac tune`: check every candidate launch configuration against the cpu reference
//! (emu or cuda), time the correct ones on the GPU, save all results to a database.

use super::{kernel_backend, parse, PlanInput};
use crate::tools::sweep::{self, SweepOptions};
use crate::{CliError, Result};
use clap::Args;
use moac::geometry::Dtype;
use moac::ir::{KernelKind, LaunchConfig};
use moac_runtime::backend::cuda::CudaDevice;
use moac_runtime::backend::emu::EmuOptions;
use moac_runtime::backend::Backend;
use std::path::PathBuf;

#[derive(Args)]
pub struct TuneArgs {
    #[command(flatten)]
    input: PlanInput,
    /// The tuning database to write (merged with what it holds; written atomically).
    #[arg(long)]
    db: PathBuf,
    /// `cuda`: check and time on the GPU. `emu`: the correctness sweep only (no timing).
    #[arg(long, value_parser = kernel_backend, default_value = "cuda")]
    backend: Backend,
    /// The GPU's arch; an error if it is not the device's (cuda only).
    #[arg(long)]
    arch: Option<String>,
    /// Layers to tune, comma-separated (default: all; layers with identical rules are
    /// tuned once).
    #[arg(long, value_delimiter = ',')]
    layers: Option<Vec<usize>>,
    /// Kinds to tune, comma-separated: decode, append, fill, prefill_block64, prefill_token.
    #[arg(long, value_delimiter = ',')]
    kinds: Option<Vec<String>>,
    /// f16 or bf16.
    #[arg(long, value_parser = parse::<Dtype>, default_value = "f16")]
    dtype: Dtype,
    /// Prompt length timed on the GPU (the entries' bucket of N = P + M).
    #[arg(long, default_value_t = 4096)]
    prompt_len: u64,
    /// M (default: the plan's setting, 1024).
    #[arg(long)]
    max_new_tokens: Option<u64>,
    /// Batch size timed on the GPU (the entries' batch bucket).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Untimed launches before the timed ones.
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Timed launches (the median is kept).
    #[arg(long, default_value_t = 20)]
    repeats: usize,
    /// Prompt lengths of the correctness check of every candidate.
    #[arg(long, value_delimiter = ',', default_value = "192,131,9")]
    check_prompt_lens: Vec<usize>,
    /// M of the correctness check.
    #[arg(long, default_value_t = 96)]
    check_max_new_tokens: usize,
    /// Decode steps of the correctness check (enough to wrap the smallest rings).
    #[arg(long, default_value_t = 80)]
    check_steps: usize,
    /// Seed of the check's random inputs.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Parallel g++ builds of emu modules (default: one per core).
    #[arg(long, default_value_t = 0)]
    jobs: usize,
    /// Test-only: add a decode candidate with wrong windows, which must be excluded.
    #[arg(long, hide = true)]
    plant_bad_candidate: bool,
}

pub fn run(a: TuneArgs) -> Result<()> {
    let plan = a.input.load()?;
    let num_layers = plan.model().num_layers;
    let layers = a.layers.unwrap_or_else(|| (0..num_layers).collect());
    if let Some(l) = layers.iter().find(|&&l| l >= num_layers) {
        return Err(CliError::Usage(format!(
            "layer {l} does not exist (the plan has {num_layers})"
        )));
    }
    let kinds = match a.kinds {
        None => sweep::TUNED_KINDS.to_vec(),
        Some(names) => names
            .iter()
            .map(|n| {
                KernelKind::from_slug(n)
                    .filter(|k| sweep::TUNED_KINDS.contains(k))
                    .ok_or_else(|| {
                        CliError::Usage(format!(
                            "unknown kind {n:?}: decode, append, fill, prefill_block64, prefill_token"
                        ))
                    })
            })
            .collect::<Result<Vec<_>>>()?,
    };
    let backend = a.backend;
    if backend == Backend::Cuda {
        let dev = CudaDevice::open()?;
        if let Some(arch) = &a.arch {
            if arch != dev.arch() {
                return Err(CliError::Usage(format!(
                    "--arch {arch} but the GPU is {} ({})",
                    dev.arch(),
                    dev.name()
                )));
            }
        }
    }
    let opts = SweepOptions {
        layers,
        kinds,
        dtype: a.dtype,
        backend,
        prompt_len: a.prompt_len,
        max_new_tokens: a.max_new_tokens.unwrap_or(plan.settings().max_new_tokens),
        batch: a.batch,
        warmup: a.warmup,
        repeats: a.repeats,
        check_prompt_lens: a.check_prompt_lens,
        check_max_new_tokens: a.check_max_new_tokens,
        check_steps: a.check_steps,
        seed: a.seed,
        emu: EmuOptions::default(),
        jobs: a.jobs,
        plant_bad_candidate: a.plant_bad_candidate,
    };
    println!(
        "tune {} on {}: layers {:?}, {}, N = {} + {}, batch {}",
        plan.name(),
        match backend {
            Backend::Cuda => "cuda",
            _ => "emu (correctness only)",
        },
        opts.layers,
        opts.dtype.name(),
        opts.prompt_len,
        opts.max_new_tokens,
        opts.batch
    );
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} candidates, {elapsed} elapsed, ETA {eta} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let fmt_launch = |l: &LaunchConfig, kind: KernelKind| match kind {
        KernelKind::Decode => {
            let mut t = format!("threads {:>3} chunk {:>4}", l.threads, l.chunk);
            if l.unroll > 0 {
                t.push_str(&format!(" unroll {}", l.unroll));
            }
            if l.heads_per_cta > 0 {
                t.push_str(&format!(" heads/CTA {}", l.heads_per_cta));
            }
            t
        }
        KernelKind::Fill => format!("threads {:>3} rows {:>3}", l.threads, l.rows),
        KernelKind::Prefill(_) => format!(
            "threads {:>3} block_q {:>2} block_k {:>2}",
            l.threads, l.block_q, l.block_k
        ),
        _ => format!("threads {:>3}", l.threads),
    };
    let report = sweep::run(&plan, &opts, &mut |done, total, o| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        let Some(o) = o else {
            let what = match backend {
                Backend::Cuda => "compiling them (NVRTC), then checking and timing",
                _ => "building the emu modules (g++), then checking",
            };
            bar.suspend(|| println!("{total} candidates: {what}"));
            return;
        };
        bar.suspend(|| {
            println!(
                "layer {:>2} {:<16} {:<38} {:<5} {:>10} {:>9}{}{}",
                o.layer,
                o.kind.slug(),
                fmt_launch(&o.launch, o.kind),
                if o.correct { "ok" } else { "WRONG" },
                o.median_us
                    .map(|t| format!("{t:.1} us"))
                    .unwrap_or_else(|| "-".into()),
                o.gb_per_s
                    .map(|g| format!("{g:.0} GB/s"))
                    .unwrap_or_else(|| "-".into()),
                if o.is_default { "  (heuristic)" } else { "" },
                if o.note.is_empty() {
                    String::new()
                } else {
                    format!("  {}", o.note)
                }
            )
        });
    })?;
    bar.finish_and_clear();
    report.db.save(&a.db)?;
    let wrong: Vec<_> = report.outcomes.iter().filter(|o| !o.correct).collect();
    let unexpected = wrong.iter().filter(|o| !o.planted).count();
    println!(
        "{} candidates of {} kernels checked: {} correct, {} wrong and excluded{}",
        report.outcomes.len(),
        report.db.entries.len(),
        report.outcomes.len() - wrong.len(),
        wrong.len(),
        if wrong.len() > unexpected {
            format!(" ({} planted)", wrong.len() - unexpected)
        } else {
            String::new()
        }
    );
    if backend == Backend::Cuda {
        for (kernel, best, default) in sweep::summary(&report.outcomes) {
            if let (Some(b), Some(d)) = (best, default) {
                println!(
                    "{kernel}: best {} {:.1} us {:.0} GB/s, heuristic {} {:.1} us {:.0} GB/s ({:.2}x)",
                    fmt_launch(&b.launch, b.kind),
                    b.median_us.unwrap_or(0.0),
                    b.gb_per_s.unwrap_or(0.0),
                    fmt_launch(&d.launch, d.kind),
                    d.median_us.unwrap_or(0.0),
                    d.gb_per_s.unwrap_or(0.0),
                    d.median_us.unwrap_or(0.0) / b.median_us.unwrap_or(1.0).max(1e-9)
                );
            }
        }
    }
    println!(
        "wrote {} ({} entries for {} on {}, {} SMs, driver {}, NVRTC {})",
        a.db.display(),
        report.db.entries.len(),
        opts.dtype.name(),
        report.env.arch,
        report.env.sm_count,
        report.env.driver_version,
        report.env.nvrtc_version
    );
    if unexpected > 0 {
        return Err(CliError::Failed(format!(
            "{unexpected} candidate configuration(s) computed wrong results (excluded; a compiler bug)"
        )));
    }
    Ok(())
}
