//! What the commands that run a real model share: the model, the plan (or `--dense`),
//! the backend and the cache's dtype, and how a plan meets the model.

use super::parse;
use crate::{CliError, Result};
use clap::Args;
use moac::geometry::Dtype;
use moac::ValidPlan;
use moac_model::attention::Engine;
use moac_model::pipeline::stages::AttentionOptions;
use moac_model::weights::WeightMode;
use moac_model::Model;
use moac_runtime::{Backend, PrefillMode, Runtime};
use std::path::{Path, PathBuf};

/// The model and how its attention runs.
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// The model: a GGUF file or a Hugging Face folder (config.json, *.safetensors,
    /// tokenizer.json).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Where attention runs: cpu, emu (the generated CUDA run on the CPU) or cuda.
    #[arg(long, value_parser = parse::<Backend>, default_value = "cpu")]
    pub backend: Backend,
    /// The K/V cache's element type: f16 or bf16.
    #[arg(long, value_parser = parse::<Dtype>, default_value = "f16")]
    pub dtype: Dtype,
    /// The prefill mask: moa-block64 (MoA's own) or token (exactly the decode windows).
    #[arg(long, value_parser = parse::<PrefillMode>, default_value = "moa-block64")]
    pub prefill_mode: PrefillMode,
    /// How GGUF matrices are held: native (the file's block types; a decode step rounds
    /// its activations to 8 bits, prompts and the LM head run unrounded), f32 (all
    /// dequantized: exact products, 4 bytes a weight), q8 (Q5_0/Q5_1 re-quantized to
    /// Q8_0, others native); auto = native.
    #[arg(long, value_parser = parse::<WeightMode>, default_value = "auto")]
    pub weights: WeightMode,
}

impl ModelArgs {
    /// The `--model` path (required by every command but those that take `--shape`).
    pub fn path(&self) -> Result<&Path> {
        self.model.as_deref().ok_or_else(|| {
            CliError::Usage(
                "name the model: --model M (a GGUF file or a Hugging Face folder)".into(),
            )
        })
    }

    pub fn load(&self) -> Result<Model> {
        Ok(Model::load(self.path()?, self.weights)?)
    }

    /// A runtime for `plan` on the chosen backend (the artifact is lowered in memory;
    /// emu builds it with g++, cuda with NVRTC, both cached).
    pub fn runtime(&self, plan: &ValidPlan) -> Result<Runtime> {
        Ok(self.attention().runtime(plan)?)
    }

    /// The backend, dtype and prefill mask, as the library's pipeline takes them.
    pub fn attention(&self) -> AttentionOptions {
        AttentionOptions {
            backend: self.backend,
            dtype: self.dtype,
            prefill_mode: self.prefill_mode,
        }
    }

    pub fn engine<'a>(&self, rt: &'a Runtime) -> Engine<'a> {
        self.attention().engine(rt)
    }
}

/// Reads a plan for `model`: a moac plan file or an official MoA plan (whose geometry
/// comes from the model), checked against the model's attention shape.
pub fn plan_for(model: &Model, plan: &Path) -> Result<ValidPlan> {
    Ok(moac_model::pipeline::stages::plan_for(model, plan)?)
}

/// `--plan P` or `--dense` (exactly one): the plan, named for reports.
pub fn plan_or_dense(model: &Model, plan: Option<&Path>, dense: bool) -> Result<ValidPlan> {
    match (plan, dense) {
        (Some(p), false) => plan_for(model, p),
        (None, true) => Ok(model.llama.dense_plan(Path::new("dense"))?),
        (Some(_), true) => Err(CliError::Usage(
            "--plan and --dense exclude each other".into(),
        )),
        (None, false) => Err(CliError::Usage(
            "say which attention to run: --plan P or --dense".into(),
        )),
    }
}

/// A progress bar on stderr, drawn only on a terminal and when `show`.
pub fn progress_bar(show: bool, what: &str) -> indicatif::ProgressBar {
    if !show || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(0);
    if let Ok(style) = indicatif::ProgressStyle::with_template(&format!(
        "{what} [{{bar:30}}] {{pos}}/{{len}} ({{eta}})"
    )) {
        b.set_style(style.progress_chars("=> "));
    }
    b
}

/// Bytes as MiB with two decimals.
pub fn mib(bytes: u64) -> String {
    format!("{:.2} MiB", bytes as f64 / (1024.0 * 1024.0))
}
