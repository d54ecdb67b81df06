//! `moac verify`: every generated kernel of some layers against the cpu reference.

use super::{kernel_backend, parse, PlanInput};
use crate::tools::verify::{self, VerifyOptions};
use crate::{CliError, Result};
use clap::Args;
use moac::geometry::Dtype;
use moac_runtime::backend::emu::EmuOptions;
use moac_runtime::backend::Backend;
use moac_runtime::Artifact;

#[derive(Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    input: PlanInput,
    /// Layers to check, comma-separated (default: the first and the last).
    #[arg(long, value_delimiter = ',')]
    layers: Option<Vec<usize>>,
    /// Where the generated kernels run: emu or cuda.
    #[arg(long, value_parser = kernel_backend, default_value = "emu")]
    backend: Backend,
    /// f16 or bf16.
    #[arg(long, value_parser = parse::<Dtype>, default_value = "f16")]
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

/// The first and the last of `layers` (one if they are the same).
fn first_and_last(layers: &[usize]) -> Vec<usize> {
    match (layers.first(), layers.last()) {
        (Some(&f), Some(&l)) if f != l => vec![f, l],
        (Some(&f), _) => vec![f],
        _ => Vec::new(),
    }
}

pub fn run(a: VerifyArgs) -> Result<()> {
    // PLAN may also be an artifact folder written by `moac compile`.
    let artifact = if a.input.plan.join(moac::artifact::manifest::FILE).is_file() {
        Some(Artifact::load(&a.input.plan)?)
    } else {
        None
    };
    let plan = match &artifact {
        Some(art) => art.plan().clone(),
        None => a.input.load()?,
    };
    let layers = a.layers.unwrap_or_else(|| match &artifact {
        Some(art) => first_and_last(&art.layers()),
        None => first_and_last(&(0..plan.num_layers()).collect::<Vec<_>>()),
    });
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let planted_bug = match a.plant_bug.as_deref() {
        None => None,
        Some("decode_window_off_by_one") => Some(moac::ir::PlantedBug::DecodeWindowOffByOne),
        Some(other) => return Err(CliError::Usage(format!("unknown planted bug {other:?}"))),
    };
    let opts = VerifyOptions {
        layers,
        dtype: a.dtype,
        backend: a.backend,
        prompt_lens: a.prompt_lens,
        max_new_tokens: a.max_new_tokens,
        steps: a.steps,
        seed,
        emu: EmuOptions {
            sanitize: a.sanitize,
        },
        planted_bug,
        launch_overrides: Default::default(),
        only: None,
    };
    println!(
        "verify {} ({}), layers {:?}, prompt lengths {:?}, M {}, {} decode steps, seed {seed}",
        plan.name(),
        artifact.as_ref().map(|art| art.dtype()).unwrap_or(a.dtype),
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
