//! The `moac` command.

use clap::{Args, Parser, Subcommand};
use moac::geometry::{CacheGeometry, Dtype};
use moac::{inspect, plan, Result};
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
    /// Plan files: convert between forms.
    #[command(subcommand)]
    Plan(PlanCommand),
}

#[derive(Args)]
struct PlanInput {
    /// The plan: official MoA JSON (needs --config) or a moac plan file.
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
