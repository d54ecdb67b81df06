//! moac-runtime: runs moac artifacts (MoA sparse attention with a compacted KV cache).
//!
//! Backends: `cpu` (the candle-core reference in [`reference`]), `emu` (the generated CUDA
//! source run on the CPU) and `cuda`.

pub mod args;
pub mod emu;
pub mod emu_layer;
pub mod error;
pub mod layer;
pub mod reference;
pub mod semantics;

pub use error::{Error, Result};
pub use layer::LayerShape;
