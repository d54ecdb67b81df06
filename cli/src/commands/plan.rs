//! `moac plan import`: plan files, converted between forms; `moac plan uniform`: a
//! StreamingLLM-style plan (every head the same span rule) for a model.

use super::{model_shape, PlanInput};
use crate::Result;
use clap::Subcommand;
use moac::plan::{self, Settings};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum PlanCommand {
    /// Write a self-contained moac plan file from an official MoA plan and its config.
    Import {
        #[command(flatten)]
        input: PlanInput,
        /// Output file.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Write a plan giving every head of every layer the span S = alpha + beta * N
    /// (StreamingLLM-style: a sink and a window; beta 0.5 = 50% density).
    Uniform(UniformArgs),
    /// Make a MoA plan for a model: calibrate, profile, optimize and validate.
    Make(super::pipeline::MakeArgs),
}

#[derive(clap::Args)]
pub struct UniformArgs {
    /// The model: its config.json, a GGUF file or a model folder.
    #[arg(long)]
    config: PathBuf,
    #[arg(long, allow_hyphen_values = true)]
    alpha: f64,
    #[arg(long)]
    beta: f64,
    /// Output file.
    #[arg(short, long)]
    output: PathBuf,
    /// The plan's name (default: from the output file).
    #[arg(long)]
    name: Option<String>,
    /// Attention-sink tokens (a multiple of 64 for the kernels).
    #[arg(long, default_value_t = Settings::default().sink)]
    sink: u64,
    /// Smallest capacity of any head.
    #[arg(long, default_value_t = Settings::default().min_capacity)]
    min_capacity: u64,
    /// Capacities are rounded up to a multiple of this (a multiple of 64).
    #[arg(long, default_value_t = Settings::default().granularity)]
    granularity: u64,
    /// Default tokens to generate when a caller gives none (N = P + this).
    #[arg(long, default_value_t = Settings::default().max_new_tokens)]
    max_new_tokens: u64,
}

fn write_plan(
    plan: &moac::ValidPlan,
    file: plan::MoacPlanFile,
    output: &std::path::Path,
) -> Result<()> {
    let mut text =
        serde_json::to_string_pretty(&file).map_err(|e| moac::Error::Internal(e.to_string()))?;
    text.push('\n');
    moac::fsutil::write_atomic(output, text.as_bytes())?;
    eprintln!(
        "wrote {} ({} layers x {} query heads, plan sha256 {})",
        output.display(),
        plan.num_layers(),
        plan.model().num_query_heads,
        &plan.sha256()[..16]
    );
    Ok(())
}

pub fn run(c: PlanCommand) -> Result<()> {
    match c {
        PlanCommand::Import { input, output } => {
            let plan = input.load()?;
            let mut file = plan.to_moac_file();
            file.source = Some(plan::SourceSection {
                plan: input.plan.display().to_string(),
                config: input
                    .config
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
            });
            write_plan(&plan, file, &output)
        }
        PlanCommand::Make(a) => super::pipeline::make(a),
        PlanCommand::Uniform(a) => {
            let shape = match model_shape(&a.config)? {
                Some(s) => s,
                None => moac::plan::read_config_shape(&a.config)?,
            };
            let name = a.name.clone().unwrap_or_else(|| {
                a.output
                    .file_stem()
                    .map(|s| s.to_string_lossy().trim_end_matches(".moac").to_string())
                    .unwrap_or_else(|| "uniform".into())
            });
            let settings = Settings {
                sink: a.sink,
                min_capacity: a.min_capacity,
                granularity: a.granularity,
                max_new_tokens: a.max_new_tokens,
            };
            let plan = moac_model::llama::uniform_plan(
                std::path::Path::new(&name),
                shape,
                a.alpha,
                a.beta,
                settings,
            )?;
            // Kernels need 64-token blocks: refuse a plan compile would refuse.
            moac::ir::lower(&plan, &moac::ir::LowerOptions::default())?;
            let mut file = plan.to_moac_file();
            file.name = Some(name);
            write_plan(&plan, file, &a.output)
        }
    }
}
