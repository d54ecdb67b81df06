//! `moac plan import`: plan files, converted between forms.

use super::PlanInput;
use crate::Result;
use clap::Subcommand;
use moac::plan;
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
