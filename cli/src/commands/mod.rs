//! One module per `moac` subcommand: its arguments (clap) and `run`.

pub mod bench;
pub mod compile;
pub mod device;
pub mod eval;
pub mod generate;
pub mod inspect;
pub mod model;
pub mod pipeline;
pub mod plan;
pub mod run;
pub mod tune;
pub mod verify;

use clap::Args;
use std::path::PathBuf;

/// A command-line value through its type's `FromStr` (dtype, backend, prefill mode,
/// emit kind): clap shows the type's own error, which lists the valid values.
pub fn parse<T>(s: &str) -> std::result::Result<T, String>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    s.parse::<T>().map_err(|e| e.to_string())
}

#[derive(Args)]
pub struct PlanInput {
    /// The plan: official MoA JSON (needs --config) or a moac plan file (`verify` also
    /// takes an artifact folder written by `moac compile`).
    pub plan: PathBuf,
    /// The model's Hugging Face config.json, GGUF file or model folder (required for
    /// official MoA JSON).
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// The attention shape of a model given as a GGUF file or a model folder (`None` for a
/// plain config.json, which the compiler reads itself).
pub fn model_shape(config: &std::path::Path) -> crate::Result<Option<moac::plan::ModelShape>> {
    let is_gguf = config.is_file()
        && std::fs::File::open(config)
            .and_then(|mut f| {
                let mut magic = [0u8; 4];
                std::io::Read::read_exact(&mut f, &mut magic).map(|_| magic)
            })
            .is_ok_and(|m| &m == b"GGUF");
    if !(is_gguf || config.is_dir()) {
        return Ok(None);
    }
    Ok(Some(moac_model::weights::model_config(config)?.shape()))
}

impl PlanInput {
    pub fn load(&self) -> crate::Result<moac::ValidPlan> {
        if let Some(config) = &self.config {
            if let Some(shape) = model_shape(config)? {
                return Ok(moac::plan::load_for_model(&self.plan, shape, config)?);
            }
        }
        Ok(moac::plan::load(&self.plan, self.config.as_deref())?)
    }
}

/// `--backend` of the commands that run generated kernels: emu or cuda.
pub fn kernel_backend(s: &str) -> std::result::Result<moac_runtime::Backend, String> {
    match parse::<moac_runtime::Backend>(s)? {
        moac_runtime::Backend::Cpu => Err("cpu runs no generated kernels: emu or cuda".into()),
        b => Ok(b),
    }
}
