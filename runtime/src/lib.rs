//! moac-runtime: runs moac artifacts (MoA sparse attention with a compacted KV cache).
//!
//! Backends: `cpu` (the candle-core reference), `emu` (the generated CUDA source run on
//! the CPU) and `cuda`, all behind one trait ([`backend::LayerBackend`]). The same API
//! drives all of them:
//!
//! ```no_run
//! use candle_core::{DType, Device, Tensor};
//! use moac_runtime::{Artifact, Backend, DecodeOptions, PrefillOptions, Runtime};
//! # fn main() -> moac_runtime::Result<()> {
//! // An artifact written by `moac compile` (or `Artifact::from_plan` for cpu/emu).
//! let rt = Runtime::new(Artifact::load("out/llama3".as_ref())?, Backend::Emu)?;
//! let (batch, prompt, new_tokens) = (2, 512, 128);
//! let mut cache = rt.allocate_cache(batch, prompt, new_tokens)?;
//! println!("KV cache: {} bytes (dense: {})", cache.bytes(), cache.dense_bytes());
//! let (hq, hkv, d) = (32, 8, 128);
//! let q = Tensor::randn(0f32, 1.0, (batch, prompt, hq, d), &Device::Cpu)?;
//! let k = Tensor::randn(0f32, 1.0, (batch, prompt, hkv, d), &Device::Cpu)?;
//! let v = Tensor::randn(0f32, 1.0, (batch, prompt, hkv, d), &Device::Cpu)?;
//! // Row 1 is shorter: its padding is ignored.
//! let opts = PrefillOptions::default().prompt_lens([512, 300]);
//! let o = rt.prefill(&mut cache, 0, &q, &k, &v, &opts)?;
//! let q1 = Tensor::randn(0f32, 1.0, (batch, hq, d), &Device::Cpu)?;
//! let k1 = Tensor::randn(0f32, 1.0, (batch, hkv, d), &Device::Cpu)?;
//! let o1 = rt.decode_step(&mut cache, 0, &q1, &k1, &k1, &DecodeOptions::default())?;
//! # let _ = (o, o1, DType::F32); Ok(()) }
//! ```
//!
//! The public surface: [`Artifact`], [`Runtime`], [`KvCache`], the options, [`Error`];
//! [`backend`] for tools that drive one layer's kernels directly (verification, tuning,
//! benchmarks) and [`reference`], the float oracle they check against.

mod artifact;
pub mod backend;
mod error;
pub mod gpu;
pub mod reference;
mod runtime;
mod shape;

pub use artifact::{Artifact, UnitBinaries};
pub use backend::cpu::set_threads;
pub use backend::cuda::cuda_available;
pub use backend::Backend;
pub use error::{Error, Result};
pub use moac::ir::PrefillMode;
pub use moac::Dtype;
pub use runtime::{BackendHandle, DecodeOptions, KvCache, PrefillOptions, Runtime, RuntimeOptions};
