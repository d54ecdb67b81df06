//! moac: a compiler for MoA (Mixture of Sparse Attention) plans.
//!
//! The pipeline shows in the modules: [`plan`] (parse and validate into a
//! [`plan::ValidPlan`]), [`geometry`] (capacities, offsets and bytes for one N, computed in
//! one place), [`inspect`] (reports).

pub mod bindings;
pub mod cache;
pub mod compile;
pub mod emit;
pub mod error;
pub mod fsutil;
pub mod geometry;
pub mod inspect;
pub mod ir;
pub mod nvrtc;
pub mod plan;
pub mod tuning;

pub use error::{Error, Result};
pub use geometry::{CacheGeometry, Dtype};
pub use plan::ValidPlan;
