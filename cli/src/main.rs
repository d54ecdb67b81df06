//! The `moac` command: parses the command line and dispatches to [`moac_cli::commands`].

use clap::{Parser, Subcommand};
use moac_cli::commands::{
    bench, compile, eval, generate, inspect, pipeline, plan, run, tune, verify,
};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "moac",
    version,
    about = "Compiler and tools for MoA (Mixture of Sparse Attention) plans"
)]
struct Cli {
    /// Threads of the CPU work (attention, the model's matrix products, profiling);
    /// default: RAYON_NUM_THREADS, else one per core.
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Per-layer capacities and KV-cache bytes of a plan for one sequence length.
    Inspect(inspect::InspectArgs),
    /// Generate CUDA kernels for a plan, compile them with NVRTC, write an artifact.
    Compile(compile::CompileArgs),
    /// Check every generated kernel of some layers against the cpu reference.
    Verify(verify::VerifyArgs),
    /// Run one layer's attention (prefill, then decode steps) over inputs from a safetensors file.
    Run(run::RunArgs),
    /// Autotune launch configurations: check every candidate against the cpu reference
    /// (emu or cuda), time the correct ones on the GPU, save all results to a database.
    Tune(tune::TuneArgs),
    /// Plan files: convert between forms, make uniform (StreamingLLM-style) plans.
    #[command(subcommand)]
    Plan(plan::PlanCommand),
    /// Generate text with a real model (GGUF or Hugging Face folder), attention through
    /// moac with a plan or dense.
    Generate(generate::GenerateArgs),
    /// Benchmarks of the whole model on the device engine (decode throughput, MoA
    /// against dense).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Evaluate a real model with a plan against dense: perplexity, retrieval.
    #[command(subcommand)]
    Eval(eval::EvalCommand),
    /// Make calibration samples: long-dependency tasks answered by the dense model.
    Calibrate(pipeline::CalibrateArgs),
    /// Profile the attention influence of every head on calibration samples.
    Profile(pipeline::ProfileArgs),
    /// Every Pareto-optimal plan of a profile at a KV density (exact MILP).
    Optimize(pipeline::OptimizeArgs),
    /// Choose the plan with the lowest response loss on held-out, longer samples.
    Validate(pipeline::ValidateArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        if let Err(e) = moac_runtime::set_threads(n) {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    }
    let result = match cli.command {
        Command::Inspect(a) => inspect::run(a),
        Command::Compile(a) => compile::run(a),
        Command::Verify(a) => verify::run(a),
        Command::Run(a) => run::run(a),
        Command::Tune(a) => tune::run(a),
        Command::Plan(c) => plan::run(c),
        Command::Generate(a) => generate::run(a),
        Command::Eval(c) => eval::run(c),
        Command::Bench(c) => bench::run(c),
        Command::Calibrate(a) => pipeline::calibrate(a),
        Command::Profile(a) => pipeline::profile(a),
        Command::Optimize(a) => pipeline::optimize_cmd(a),
        Command::Validate(a) => pipeline::validate(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
