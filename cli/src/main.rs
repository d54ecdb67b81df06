//! The `moac` command.

use clap::{Args, Parser, Subcommand};
use moac::cache::Cache;
use moac::compile::{self, CompileOptions, EmitKind};
use moac::geometry::{CacheGeometry, Dtype};
use moac::{inspect, plan};
use moac_runtime::emu::EmuBuild;
use moac_runtime::verify::{self, VerifyBackend, VerifyOptions};

/// Any error of the command: the compiler's, the runtime's, or a failed check.
#[derive(Debug)]
enum CliError {
    Compiler(moac::Error),
    Runtime(moac_runtime::Error),
    Failed(String),
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CliError::Compiler(e) => e.fmt(f),
            CliError::Runtime(e) => e.fmt(f),
            CliError::Failed(m) => f.write_str(m),
        }
    }
}

impl From<moac::Error> for CliError {
    fn from(e: moac::Error) -> Self {
        CliError::Compiler(e)
    }
}

impl From<moac_runtime::Error> for CliError {
    fn from(e: moac_runtime::Error) -> Self {
        CliError::Runtime(e)
    }
}

type Result<T> = std::result::Result<T, CliError>;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "moac",
    version,
    about = "Compiler and tools for MoA (Mixture of Sparse Attention) plans"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Per-layer capacities and KV-cache bytes of a plan for one sequence length.
    Inspect(InspectArgs),
    /// Generate CUDA kernels for a plan, compile them with NVRTC, write an artifact.
    Compile(CompileArgs),
    /// Check every generated kernel of some layers against the cpu reference.
    Verify(VerifyArgs),
    /// Run one layer's attention (prefill, then decode steps) over inputs from a safetensors file.
    Run(RunArgs),
    /// Autotune launch configurations: check every candidate against the cpu reference
    /// (emu or cuda), time the correct ones on the GPU, save all results to a database.
    Tune(TuneArgs),
    /// Plan files: convert between forms.
    #[command(subcommand)]
    Plan(PlanCommand),
}

#[derive(Args)]
struct PlanInput {
    /// The plan: official MoA JSON (needs --config) or a moac plan file (`verify` also
    /// takes an artifact folder written by `moac compile`).
    plan: PathBuf,
    /// The model's Hugging Face config.json (required for official MoA JSON).
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Args)]
struct InspectArgs {
    #[command(flatten)]
    input: PlanInput,
    /// Prompt length P.
    #[arg(long)]
    prompt_len: u64,
    /// Generated tokens M (N = P + M); defaults to the plan's setting (1024).
    #[arg(long)]
    max_new_tokens: Option<u64>,
    /// Element type of the cache.
    #[arg(long, value_enum, default_value_t = Dtype::F16)]
    dtype: Dtype,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Also write a heatmap of capacity / N to this SVG file.
    #[arg(long)]
    svg: Option<PathBuf>,
}

#[derive(Args)]
struct CompileArgs {
    #[command(flatten)]
    input: PlanInput,
    /// Artifact folder to write (replaced whole if it exists).
    #[arg(short, long)]
    output: PathBuf,
    /// GPU architectures, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "sm_80,sm_90")]
    arch: Vec<String>,
    /// Element type of Q, K, V and outputs.
    #[arg(long, value_enum, default_value_t = Dtype::F16)]
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
    #[arg(long, value_enum, default_value_t = EmitKind::All)]
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

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum KernelBackend {
    Emu,
    Cuda,
}

#[derive(Args)]
struct VerifyArgs {
    #[command(flatten)]
    input: PlanInput,
    /// Layers to check, comma-separated (default: the first and the last).
    #[arg(long, value_delimiter = ',')]
    layers: Option<Vec<usize>>,
    /// Where the generated kernels run.
    #[arg(long, value_enum, default_value_t = KernelBackend::Emu)]
    backend: KernelBackend,
    #[arg(long, value_enum, default_value_t = Dtype::F16)]
    dtype: Dtype,
    /// Prompt length of each batch row (ragged rows are right-padded).
    #[arg(long, value_delimiter = ',', default_value = "320,191,60")]
    prompt_lens: Vec<usize>,
    /// M: N = max(prompt_lens) + M.
    #[arg(long, default_value_t = 200)]
    max_new_tokens: usize,
    /// Decode steps after the prefill (enough to wrap the smallest rings).
    #[arg(long, default_value_t = 80)]
    steps: usize,
    /// Seed of the random inputs (default: from the clock, printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Build the emu kernels with -fsanitize=address,undefined.
    #[arg(long)]
    sanitize: bool,
    /// Test-only: plant a deliberate bug to show the check can fail.
    #[arg(long, hide = true)]
    plant_bug: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum RunBackend {
    Cpu,
    Emu,
    Cuda,
}

#[derive(Args)]
#[command(
    after_help = "Inputs (f32, f16 or bf16; converted to --dtype): q_prefill [B,P,Hq,D], k_prefill and v_prefill [B,P,Hkv,D], q_decode [S,B,Hq,D], k_decode and v_decode [S,B,Hkv,D], optional prompt_lens [B] (int32; shorter rows are right-padded). Outputs (f32): o_prefill [B,P,Hq,D] (padding rows zero), o_decode [S,B,Hq,D]."
)]
struct RunArgs {
    #[command(flatten)]
    input: PlanInput,
    /// The layer to run.
    #[arg(long)]
    layer: usize,
    /// Input tensors (safetensors).
    #[arg(long)]
    inputs: PathBuf,
    /// Output tensors (safetensors), written atomically.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value_t = RunBackend::Cpu)]
    backend: RunBackend,
    /// M: N = P + M (default: the plan's setting, 1024); S > M is an error.
    #[arg(long)]
    max_new_tokens: Option<usize>,
    #[arg(long, value_enum, default_value_t = moac::ir::PrefillMode::Block64)]
    prefill_mode: moac::ir::PrefillMode,
    #[arg(long, value_enum, default_value_t = Dtype::F16)]
    dtype: Dtype,
}

#[derive(Args)]
struct TuneArgs {
    #[command(flatten)]
    input: PlanInput,
    /// The tuning database to write (merged with what it holds; written atomically).
    #[arg(long)]
    db: PathBuf,
    /// `cuda`: check and time on the GPU. `emu`: the correctness sweep only (no timing).
    #[arg(long, value_enum, default_value_t = KernelBackend::Cuda)]
    backend: KernelBackend,
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
    #[arg(long, value_enum, default_value_t = Dtype::F16)]
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

#[derive(Subcommand)]
enum PlanCommand {
    /// Write a self-contained moac plan file from an official MoA plan and its config.
    Import {
        #[command(flatten)]
        input: PlanInput,
        /// Output file.
        #[arg(short, long)]
        output: PathBuf,
    },
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Inspect(a) => {
            let plan = plan::load(&a.input.plan, a.input.config.as_deref())?;
            let m = a.max_new_tokens.unwrap_or(plan.settings().max_new_tokens);
            let geo = CacheGeometry::new(&plan, a.prompt_len, m)?;
            if a.json {
                let v = inspect::report_json(&plan, &geo, a.dtype);
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                print!("{}", inspect::report_text(&plan, &geo, a.dtype));
            }
            if let Some(svg) = a.svg {
                moac::fsutil::write_atomic(&svg, inspect::heatmap_svg(&plan, &geo).as_bytes())?;
                if !a.json {
                    println!("heatmap written to {}", svg.display());
                }
            }
            Ok(())
        }
        Command::Compile(a) => {
            let plan = plan::load(&a.input.plan, a.input.config.as_deref())?;
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
                cache: (!a.no_cache)
                    .then(|| Cache::new(a.cache_dir.unwrap_or_else(Cache::default_root))),
                jobs: a.jobs,
                progress: true,
                tuning: match &a.tuning {
                    Some(path) => {
                        let m = plan.settings().max_new_tokens;
                        let p = a.tuning_prompt_len.or(a.prompt_len).unwrap_or(4096);
                        Some(compile::TuningChoice {
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
            let report = compile::compile(&plan, &opts, &a.output)?;
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
                        t.kernel,
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
        Command::Verify(a) => {
            // PLAN may also be an artifact folder written by `moac compile`.
            let artifact = if a.input.plan.join("manifest.json").is_file() {
                Some(moac_runtime::Artifact::load(&a.input.plan)?)
            } else {
                None
            };
            let plan = match &artifact {
                Some(art) => art.plan.clone(),
                None => plan::load(&a.input.plan, a.input.config.as_deref())?,
            };
            let layers = a.layers.unwrap_or_else(|| match &artifact {
                Some(art) => {
                    let compiled: Vec<usize> = art.lowered.layers.iter().map(|l| l.layer).collect();
                    match (compiled.first(), compiled.last()) {
                        (Some(&f), Some(&l)) if f != l => vec![f, l],
                        (Some(&f), _) => vec![f],
                        _ => Vec::new(),
                    }
                }
                None => {
                    let last = plan.num_layers() - 1;
                    if last == 0 {
                        vec![0]
                    } else {
                        vec![0, last]
                    }
                }
            });
            let seed = a.seed.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
            let planted_bug = match a.plant_bug.as_deref() {
                None => None,
                Some("decode_window_off_by_one") => {
                    Some(moac::ir::PlantedBug::DecodeWindowOffByOne)
                }
                Some(other) => {
                    return Err(moac::Error::Usage(format!("unknown planted bug {other:?}")).into())
                }
            };
            let opts = VerifyOptions {
                layers,
                dtype: a.dtype,
                backend: match a.backend {
                    KernelBackend::Emu => VerifyBackend::Emu,
                    KernelBackend::Cuda => VerifyBackend::Cuda,
                },
                prompt_lens: a.prompt_lens,
                max_new_tokens: a.max_new_tokens,
                steps: a.steps,
                seed,
                emu: EmuBuild {
                    sanitize: a.sanitize,
                },
                planted_bug,
                launch_overrides: Default::default(),
                only: None,
            };
            println!(
                "verify {} ({}), layers {:?}, prompt lengths {:?}, M {}, {} decode steps, seed {seed}",
                plan.name(),
                artifact.as_ref().map(|art| art.dtype).unwrap_or(a.dtype),
                opts.layers,
                opts.prompt_lens,
                opts.max_new_tokens,
                opts.steps
            );
            let lines = match &artifact {
                Some(art) => verify::verify_artifact(art, &opts)?,
                None => verify::verify(&plan, &opts)?,
            };
            let failed = lines.iter().filter(|l| !l.passed).count();
            for l in &lines {
                println!("{l}");
            }
            println!("{} passed, {} failed", lines.len() - failed, failed);
            if failed > 0 {
                return Err(CliError::Failed(format!("{failed} kernel check(s) failed")));
            }
            Ok(())
        }
        Command::Tune(a) => tune(a),
        Command::Run(a) => {
            let plan = plan::load(&a.input.plan, a.input.config.as_deref())?;
            if a.layer >= plan.num_layers() {
                return Err(moac::Error::Usage(format!(
                    "--layer {} does not exist: the plan has {} layers",
                    a.layer,
                    plan.num_layers()
                ))
                .into());
            }
            let opts = moac_runtime::run::RunOptions {
                layer: a.layer,
                backend: match a.backend {
                    RunBackend::Cpu => moac_runtime::Backend::Cpu,
                    RunBackend::Emu => moac_runtime::Backend::Emu,
                    RunBackend::Cuda => moac_runtime::Backend::Cuda,
                },
                dtype: a.dtype,
                max_new_tokens: a
                    .max_new_tokens
                    .unwrap_or(plan.settings().max_new_tokens as usize),
                prefill_mode: a.prefill_mode,
            };
            let r = moac_runtime::run::run(&plan, &a.inputs, &a.out, &opts)?;
            eprintln!(
                "layer {}: batch {}, prompt {}, {} decode steps, N = {}; KV cache {} (dense {}, {:.3}x); wrote {}",
                a.layer,
                r.batch,
                r.prompt_len,
                r.steps,
                r.n,
                inspect::human_bytes(r.kv_bytes),
                inspect::human_bytes(r.dense_kv_bytes),
                r.kv_bytes as f64 / r.dense_kv_bytes as f64,
                a.out.display()
            );
            Ok(())
        }
        Command::Plan(PlanCommand::Import { input, output }) => {
            let plan = plan::load(&input.plan, input.config.as_deref())?;
            let mut file = plan.to_moac_file();
            file.source = Some(plan::SourceSection {
                plan: input.plan.display().to_string(),
                config: input
                    .config
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
            });
            let mut text = serde_json::to_string_pretty(&file)
                .map_err(|e| moac::Error::Internal(e.to_string()))?;
            text.push('\n');
            moac::fsutil::write_atomic(&output, text.as_bytes())?;
            eprintln!(
                "wrote {} ({} layers x {} query heads, plan sha256 {})",
                output.display(),
                plan.num_layers(),
                plan.model().num_query_heads,
                &plan.sha256()[..16]
            );
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn tune(a: TuneArgs) -> Result<()> {
    use moac_runtime::tune::{self, TuneOptions};
    let plan = plan::load(&a.input.plan, a.input.config.as_deref())?;
    let num_layers = plan.model().num_layers;
    let layers = a.layers.unwrap_or_else(|| (0..num_layers).collect());
    if let Some(l) = layers.iter().find(|&&l| l >= num_layers) {
        return Err(moac::Error::Usage(format!(
            "layer {l} does not exist (the plan has {num_layers})"
        ))
        .into());
    }
    let kinds = match a.kinds {
        None => tune::TUNED_KINDS.to_vec(),
        Some(names) => names
            .iter()
            .map(|n| {
                moac::tuning::kind_from_slug(n)
                    .filter(|k| tune::TUNED_KINDS.contains(k))
                    .ok_or_else(|| {
                        moac::Error::Usage(format!(
                            "unknown kind {n:?}: decode, append, fill, prefill_block64, prefill_token"
                        ))
                    })
            })
            .collect::<std::result::Result<Vec<_>, _>>()?,
    };
    let backend = match a.backend {
        KernelBackend::Emu => VerifyBackend::Emu,
        KernelBackend::Cuda => VerifyBackend::Cuda,
    };
    if backend == VerifyBackend::Cuda {
        let dev = moac_runtime::cuda_layer::CudaDevice::open()?;
        if let Some(arch) = &a.arch {
            if *arch != dev.arch {
                return Err(moac::Error::Usage(format!(
                    "--arch {arch} but the GPU is {} ({})",
                    dev.arch, dev.name
                ))
                .into());
            }
        }
    }
    let opts = TuneOptions {
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
        emu: EmuBuild::default(),
        jobs: a.jobs,
        plant_bad_candidate: a.plant_bad_candidate,
    };
    println!(
        "tune {} on {}: layers {:?}, {}, N = {} + {}, batch {}",
        plan.name(),
        match backend {
            VerifyBackend::Emu => "emu (correctness only)",
            VerifyBackend::Cuda => "cuda",
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
    let fmt_launch = |l: &moac::ir::LaunchConfig, kind: moac::ir::KernelKind| match kind {
        moac::ir::KernelKind::Decode => {
            let mut t = format!("threads {:>3} chunk {:>4}", l.threads, l.chunk);
            if l.unroll > 0 {
                t.push_str(&format!(" unroll {}", l.unroll));
            }
            if l.heads_per_cta > 0 {
                t.push_str(&format!(" heads/CTA {}", l.heads_per_cta));
            }
            t
        }
        moac::ir::KernelKind::Fill => format!("threads {:>3} rows {:>3}", l.threads, l.rows),
        moac::ir::KernelKind::Prefill(_) => format!(
            "threads {:>3} block_q {:>2} block_k {:>2}",
            l.threads, l.block_q, l.block_k
        ),
        _ => format!("threads {:>3}", l.threads),
    };
    let report = tune::tune(&plan, &opts, &mut |done, total, o| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        let Some(o) = o else {
            let what = match backend {
                VerifyBackend::Emu => "building the emu modules (g++), then checking",
                VerifyBackend::Cuda => "compiling them (NVRTC), then checking and timing",
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
    if backend == VerifyBackend::Cuda {
        for (kernel, best, default) in tune::summary(&report.outcomes) {
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
