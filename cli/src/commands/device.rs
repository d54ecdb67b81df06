//! What `moac generate --engine device` and `moac bench decode` share: the model (a
//! real one, or `--shape CONFIG`: random weights from a seed for any Llama config), its
//! plan, and the device engine on emu or cuda.

use super::model::{plan_or_dense, ModelArgs};
use crate::{CliError, Result};
use moac::plan::Settings;
use moac::ValidPlan;
use moac_model::engine::{seeded_llama, DeviceEngine};
use moac_model::llama::{uniform_plan, Llama, LlamaConfig};
use moac_model::Model;
use moac_runtime::backend::emu::EmuOptions;
use moac_runtime::gpu::Gpu;
use moac_runtime::Artifact;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where the weights come from.
pub enum Source {
    /// A real model, with its tokenizer.
    Model(Box<Model>),
    /// Random weights from a seed for a model config (HF config.json or GGUF header).
    Shape {
        path: PathBuf,
        config: LlamaConfig,
        ff: usize,
        seed: u64,
    },
}

impl Source {
    /// `--model M` or `--shape CONFIG` (exactly one).
    pub fn open(model: &ModelArgs, shape: Option<&Path>, seed: u64) -> Result<Source> {
        match (&model.model, shape) {
            (Some(_), Some(_)) => Err(CliError::Usage(
                "--model and --shape exclude each other".into(),
            )),
            (None, None) => Err(CliError::Usage(
                "name the weights: --model M, or --shape CONFIG (random weights from --seed)"
                    .into(),
            )),
            (Some(_), None) => Ok(Source::Model(Box::new(model.load()?))),
            (None, Some(p)) => {
                let (config, ff) = moac_model::weights::model_shape(p)?;
                Ok(Source::Shape {
                    path: p.to_path_buf(),
                    config,
                    ff,
                    seed,
                })
            }
        }
    }

    pub fn config(&self) -> LlamaConfig {
        match self {
            Source::Model(m) => m.llama.config,
            Source::Shape { config, .. } => *config,
        }
    }

    /// The file or folder the weights (or the shape) come from.
    pub fn path(&self) -> &Path {
        match self {
            Source::Model(m) => &m.path,
            Source::Shape { path, .. } => path,
        }
    }

    /// `--plan P` or `--dense`, checked against the model's attention shape.
    pub fn plan(&self, plan: Option<&Path>, dense: bool) -> Result<ValidPlan> {
        match self {
            Source::Model(m) => plan_or_dense(m, plan, dense),
            Source::Shape { path, config, .. } => match (plan, dense) {
                (Some(p), false) => Ok(moac::plan::load_for_model(p, config.shape(), path)?),
                (None, true) => Ok(uniform_plan(
                    Path::new("dense"),
                    config.shape(),
                    1e12,
                    0.0,
                    Settings::default(),
                )?),
                (Some(_), true) => Err(CliError::Usage(
                    "--plan and --dense exclude each other".into(),
                )),
                (None, false) => Err(CliError::Usage(
                    "say which attention to run: --plan P or --dense".into(),
                )),
            },
        }
    }

    /// The model on the host (the cpu runner's): the loaded model, or the seeded
    /// weights rounded to `dtype` exactly as the device generates them.
    pub fn host_llama(&self, dtype: moac::Dtype) -> Result<HostLlama<'_>> {
        match self {
            Source::Model(m) => Ok(HostLlama::Borrowed(&m.llama)),
            Source::Shape {
                config, ff, seed, ..
            } => Ok(HostLlama::Owned(Box::new(seeded_llama(
                *config, *ff, *seed, dtype,
            )?))),
        }
    }

    /// The device engine for `plan` on `gpu`: the model's weights uploaded, or the seeded
    /// weights generated on the device.
    pub fn engine(
        &self,
        gpu: &Arc<Gpu>,
        plan: &ValidPlan,
        args: &ModelArgs,
    ) -> Result<DeviceEngine> {
        let art = Artifact::from_plan(plan, args.dtype, None)?;
        Ok(match self {
            Source::Model(m) => DeviceEngine::new(gpu.clone(), &m.llama, art, args.prefill_mode)?,
            Source::Shape {
                config, ff, seed, ..
            } => DeviceEngine::seeded(gpu.clone(), *config, *ff, *seed, art, args.prefill_mode)?,
        })
    }
}

/// A host model, the loaded one or one built for the occasion.
pub enum HostLlama<'a> {
    Borrowed(&'a Llama),
    Owned(Box<Llama>),
}

impl std::ops::Deref for HostLlama<'_> {
    type Target = Llama;
    fn deref(&self) -> &Llama {
        match self {
            HostLlama::Borrowed(l) => l,
            HostLlama::Owned(l) => l,
        }
    }
}

/// The device engine's machine for `--backend` (emu or cuda; cpu is refused with what
/// to use instead).
pub fn open_gpu(args: &ModelArgs) -> Result<Arc<Gpu>> {
    Ok(Gpu::open(args.backend, EmuOptions::default())?)
}
