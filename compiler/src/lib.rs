//! moac: a compiler for MoA (Mixture of Sparse Attention) plans.
//!
//! The stages, in order, each with its entry function and the type it produces:
//!
//! 1. [`plan`]: `plan.json` (+ `config.json`) -> [`ValidPlan`] ([`plan::load`]); the only
//!    validated input of everything below. [`geometry`] computes capacities, offsets and
//!    bytes for one N, in one place ([`CacheGeometry::new`]).
//! 2. [`ir`]: [`ValidPlan`] -> [`ir::Lowered`], one [`ir::KernelSpec`] per distinct
//!    kernel with every launch default resolved ([`ir::lower`]).
//! 3. [`emit`]: specs -> CUDA C++ translation units ([`emit::emit_units`]), rendered from
//!    the `templates/`, entry signatures from the ABI table ([`abi`]).
//! 4. [`jit`]: units -> PTX and CUBIN per arch with NVRTC ([`jit::compile_units`]), or
//!    a shared library for the emu backend with g++ ([`jit::gxx::build`]), cached.
//! 5. [`artifact`]: everything above -> an artifact folder with its manifest
//!    ([`compile`], i.e. [`artifact::write`]), which `moac-runtime` loads.
//!
//! Beside the pipeline: [`tuning`] (the database of measured launch configurations),
//! [`inspect`] (reports of a plan's geometry).

pub mod abi;
pub mod artifact;
pub mod emit;
pub mod error;
pub mod fsutil;
pub mod geometry;
pub mod inspect;
pub mod ir;
pub mod jit;
pub mod ops;
pub mod plan;
pub mod tuning;

pub use artifact::{CompileOptions, CompileReport, EmitKind};
pub use error::{Error, Result};
pub use geometry::{CacheGeometry, Dtype};
pub use plan::ValidPlan;

/// Compiles a plan into an artifact folder: lower, emit, NVRTC, write (atomically).
pub fn compile(
    plan: &ValidPlan,
    opts: &CompileOptions,
    out: &std::path::Path,
) -> Result<CompileReport> {
    artifact::write(plan, opts, out, None)
}
