//! moac-runtime: runs moac artifacts (MoA sparse attention with a compacted KV cache).
//!
//! Backends: `cpu` (the candle-core reference in [`reference`]), `emu` (the generated CUDA
//! source run on the CPU) and `cuda`. The same API drives all of them:
//!
//! ```no_run
//! use candle_core::{DType, Device, Tensor};
//! use moac_runtime::{Artifact, Backend, Runtime};
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
//! let o = rt.prefill(&mut cache, 0, &q, &k, &v, &[512, 300], moac::ir::PrefillMode::Block64, None)?;
//! let q1 = Tensor::randn(0f32, 1.0, (batch, hq, d), &Device::Cpu)?;
//! let k1 = Tensor::randn(0f32, 1.0, (batch, hkv, d), &Device::Cpu)?;
//! let o1 = rt.decode_step(&mut cache, 0, &q1, &k1, &k1, None)?;
//! # let _ = (o, o1, DType::F32); Ok(()) }
//! ```

pub mod args;
pub mod artifact;
pub mod cuda_layer;
pub mod emu;
pub mod emu_layer;
pub mod error;
pub mod exec;
pub mod layer;
pub mod reference;
pub mod run;
pub mod runtime;
pub mod semantics;
pub mod tune;
pub mod verify;

pub use artifact::Artifact;
pub use error::{Error, Result};
pub use layer::LayerShape;
pub use runtime::{Backend, KvCache, Runtime};

/// Checks that the `cuda` backend can run here: a CUDA driver and at least one device.
/// cudarc panics when libcuda is missing, so this probes first.
pub fn cuda_available() -> Result<()> {
    // SAFETY: only probes whether the driver library can be opened.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(Error::Unavailable(
            "cuda backend: no CUDA driver (libcuda.so) on this machine; use --backend emu or cpu"
                .into(),
        ));
    }
    cudarc::driver::result::init()
        .map_err(|e| Error::Unavailable(format!("cuda backend: cuInit failed: {e}")))?;
    let n = cudarc::driver::result::device::get_count()
        .map_err(|e| Error::Unavailable(format!("cuda backend: cannot count devices: {e}")))?;
    if n == 0 {
        return Err(Error::Unavailable(
            "cuda backend: the CUDA driver reports no GPU".into(),
        ));
    }
    Ok(())
}
