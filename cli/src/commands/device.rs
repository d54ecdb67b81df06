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

/// Model shapes known by name (`--shape llama-3-8b`), with their official MoA plans:
/// (name, example folder, config.json, moa_alpha_beta.json), compiled into the binary
/// (the plans are the MoA repository's, MIT; examples/plans/NOTICE).
const NAMED: [(&str, &str, &str, &str); 3] = [
    (
        "llama-3-8b",
        "gradientai--Llama-3-8B-Instruct-262k",
        include_str!("../../../examples/plans/gradientai--Llama-3-8B-Instruct-262k/config.json"),
        include_str!(
            "../../../examples/plans/gradientai--Llama-3-8B-Instruct-262k/moa_alpha_beta.json"
        ),
    ),
    (
        "llama-3.2-1b",
        "meta-llama--Llama-3.2-1B-Instruct",
        include_str!("../../../examples/plans/meta-llama--Llama-3.2-1B-Instruct/config.json"),
        include_str!(
            "../../../examples/plans/meta-llama--Llama-3.2-1B-Instruct/moa_alpha_beta.json"
        ),
    ),
    (
        "vicuna-7b",
        "lmsys--vicuna-7b-v1.5-16k",
        include_str!("../../../examples/plans/lmsys--vicuna-7b-v1.5-16k/config.json"),
        include_str!("../../../examples/plans/lmsys--vicuna-7b-v1.5-16k/moa_alpha_beta.json"),
    ),
];

/// `--shape`: a config file or folder, or a known name (`llama-3-8b`, `llama-3.2-1b`,
/// `vicuna-7b`), whose config and MoA plan are written to a folder under the temporary
/// directory. Returns the config's path and, for a name, its MoA plan's.
pub fn resolve_shape(arg: &Path) -> Result<(PathBuf, Option<PathBuf>)> {
    if arg.exists() {
        return Ok((arg.to_path_buf(), None));
    }
    let name = arg.to_string_lossy().to_ascii_lowercase();
    let Some((_, folder, config, plan)) = NAMED.iter().find(|(n, ..)| *n == name) else {
        return Err(CliError::Usage(format!(
            "--shape {}: no such file, and not a known shape ({})",
            arg.display(),
            NAMED.iter().map(|n| n.0).collect::<Vec<_>>().join(", ")
        )));
    };
    let dir = std::env::temp_dir().join("moac-shapes").join(folder);
    std::fs::create_dir_all(&dir)
        .map_err(|e| CliError::Usage(format!("{}: {e}", dir.display())))?;
    let (c, p) = (dir.join("config.json"), dir.join("moa_alpha_beta.json"));
    for (path, text) in [(&c, config), (&p, plan)] {
        if std::fs::read_to_string(path).ok().as_deref() != Some(*text) {
            moac::fsutil::write_atomic(path, text.as_bytes())?;
        }
    }
    Ok((c, Some(p)))
}

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
                let (p, _) = resolve_shape(p)?;
                let (config, ff) = moac_model::weights::model_shape(&p)?;
                Ok(Source::Shape {
                    path: p,
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
