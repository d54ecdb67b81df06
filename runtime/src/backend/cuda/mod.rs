//! The `cuda` backend: moac's generated kernels on an NVIDIA GPU through cudarc, with
//! the same grids and buffer layouts as emu (docs/kernel-abi.md).
//!
//! This folder holds what is CUDA's own: opening the device ([`CudaDevice`]: driver and
//! GPU checks, the stream, launches, events and timing) and loading modules
//! ([`module`]: the artifact's CUBIN or PTX where it fits the GPU, NVRTC otherwise).
//! Running a layer's kernels is [`crate::gpu::attention`]'s job on every device: the
//! engine, the autotuner and `moac-gpu-bench` call [`LayerAttention`] or
//! [`DeviceAttention`] on device buffers, and this backend's [`LayerBackend`] is
//! [`DeviceLayer`] (host buffers in and out) on a kernels-only [`Gpu`].
//!
//! [`LayerAttention`]: crate::gpu::attention::LayerAttention
//! [`DeviceAttention`]: crate::gpu::attention::DeviceAttention
//! [`DeviceLayer`]: crate::gpu::attention::DeviceLayer
//! [`LayerBackend`]: crate::backend::LayerBackend
//! [`Gpu`]: crate::gpu::Gpu

mod device;
pub mod module;

pub use device::{cuda_available, CudaDevice};
pub use module::BinarySource;
