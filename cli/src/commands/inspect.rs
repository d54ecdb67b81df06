//! `moac inspect`: per-layer capacities and KV-cache bytes of a plan for one N.

use super::{parse, PlanInput};
use crate::Result;
use clap::Args;
use moac::geometry::{CacheGeometry, Dtype};
use moac::inspect;
use std::path::PathBuf;

#[derive(Args)]
pub struct InspectArgs {
    #[command(flatten)]
    input: PlanInput,
    /// Prompt length P.
    #[arg(long)]
    prompt_len: u64,
    /// Generated tokens M (N = P + M); defaults to the plan's setting (1024).
    #[arg(long)]
    max_new_tokens: Option<u64>,
    /// Element type of the cache: f16 or bf16.
    #[arg(long, value_parser = parse::<Dtype>, default_value = "f16")]
    dtype: Dtype,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Also write a heatmap of capacity / N to this SVG file.
    #[arg(long)]
    svg: Option<PathBuf>,
}

pub fn run(a: InspectArgs) -> Result<()> {
    let plan = a.input.load()?;
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
