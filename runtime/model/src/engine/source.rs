//! Where the device engine's weights come from ([`Source`]): a loaded model, or random
//! weights from a seed for any Llama configuration (what `--shape` runs: the figures of
//! a model without its files). Either way the same questions get answers here: the
//! configuration, a plan checked against the model's attention shape, the host copy of
//! the model (the cpu runner's, for checks) and the engine on a [`Gpu`].

use super::{seeded_llama, DeviceEngine};
use crate::llama::{uniform_plan, Llama, LlamaConfig};
use crate::{Model, Result};
use moac::geometry::Dtype;
use moac::ir::PrefillMode;
use moac::plan::{Settings, ValidPlan};
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
    /// Random weights from `seed` for the configuration at `path`: a Hugging Face
    /// `config.json` (the file or its folder) or a GGUF file's header.
    pub fn shape(path: PathBuf, seed: u64) -> Result<Source> {
        let (config, ff) = crate::weights::model_shape(&path)?;
        Ok(Source::Shape {
            path,
            config,
            ff,
            seed,
        })
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

    /// The MLP width (a loaded model's from its file's metadata).
    pub fn ff(&self) -> Result<usize> {
        match self {
            Source::Shape { ff, .. } => Ok(*ff),
            Source::Model(m) => Ok(crate::weights::model_shape(&m.path)?.1),
        }
    }

    /// The plan at `plan` (a moac plan file, or an official MoA plan whose geometry
    /// comes from the model), checked against the model's attention shape.
    pub fn plan(&self, plan: &Path) -> Result<ValidPlan> {
        let p = moac::plan::load_for_model(plan, self.config().shape(), self.path())?;
        if let Source::Model(m) = self {
            m.llama.check_plan(&p)?;
        }
        Ok(p)
    }

    /// The plan that gives every head the whole sequence, named `dense`.
    pub fn dense_plan(&self) -> Result<ValidPlan> {
        let name = Path::new("dense");
        match self {
            Source::Model(m) => m.llama.dense_plan(name),
            Source::Shape { config, .. } => {
                uniform_plan(name, config.shape(), 1e12, 0.0, Settings::default())
            }
        }
    }

    /// The model on the host (the cpu runner's): the loaded model, or the seeded
    /// weights rounded to `dtype` exactly as the device generates them.
    pub fn host_llama(&self, dtype: Dtype) -> Result<HostLlama<'_>> {
        match self {
            Source::Model(m) => Ok(HostLlama::Borrowed(&m.llama)),
            Source::Shape {
                config, ff, seed, ..
            } => Ok(HostLlama::Owned(Box::new(seeded_llama(
                *config, *ff, *seed, dtype,
            )?))),
        }
    }

    /// The device engine for `plan` (lowered in memory for `dtype`, prefill mask `mode`)
    /// on `gpu`: the model's weights uploaded, or the seeded weights generated on the
    /// device.
    pub fn engine(
        &self,
        gpu: &Arc<Gpu>,
        plan: &ValidPlan,
        dtype: Dtype,
        mode: PrefillMode,
    ) -> Result<DeviceEngine> {
        let art = Artifact::from_plan(plan, dtype, None)?;
        match self {
            Source::Model(m) => DeviceEngine::new(gpu.clone(), &m.llama, art, mode),
            Source::Shape {
                config, ff, seed, ..
            } => DeviceEngine::seeded(gpu.clone(), *config, *ff, *seed, art, mode),
        }
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
