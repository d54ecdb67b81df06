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
pub mod verify;

pub use error::{Error, Result};
pub use layer::LayerShape;

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
