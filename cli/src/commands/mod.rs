//! One module per `moac` subcommand: its arguments (clap) and `run`.

pub mod compile;
pub mod inspect;
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
    /// The model's Hugging Face config.json (required for official MoA JSON).
    #[arg(long)]
    pub config: Option<PathBuf>,
}

impl PlanInput {
    pub fn load(&self) -> crate::Result<moac::ValidPlan> {
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
