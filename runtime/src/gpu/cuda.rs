//! The `cuda` side of [`Gpu`](super::Gpu): cuBLAS found and loaded once per process, a
//! device on one stream with a cuBLAS handle and its fixed workspace ([`CudaGpu`]), and
//! the work itself on that stream: allocations, copies, module loads, launches, GEMMs,
//! graph capture and replay ([`GpuGraph`]), event timing. [`Gpu`](super::Gpu) checks
//! ranges and pairs each call with this machine's buffers before it gets here.

use super::{Captured, Fill, GpuModule};
use crate::artifact::UnitBinaries;
use crate::backend::cuda::CudaDevice;
use crate::error::{Error, Result};
use cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, DevicePtrMut};
use moac::abi::ArgPack;
use moac::geometry::Dtype;
use std::ffi::c_void;
use std::sync::{Arc, OnceLock};

/// cuBLAS, found and loaded once per process.
fn load_cublas() -> std::result::Result<(), String> {
    static LOADED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            const HINT: &str = "run scripts/setup-cublas.sh (installs the pinned cuBLAS 13.0 wheel from PyPI into ./.venv), or set MOAC_CUBLAS_DIR to a folder holding libcublas.so.13 and libcublasLt.so.13";
            // The toolkit's or the wheel's copy, by absolute path and globally, so
            // cudarc's own dlopen by soname finds it; else whatever the loader finds.
            for name in ["libcublasLt.so.13", "libcublas.so.13"] {
                if let Some(path) = moac::jit::nvrtc::find_library(name) {
                    // SAFETY: loading cuBLAS runs only its own initialisers; the handle is
                    // leaked on purpose so the library stays loaded.
                    let lib = unsafe {
                        libloading::os::unix::Library::open(
                            Some(&path),
                            libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL,
                        )
                    }
                    .map_err(|e| format!("cannot load {}: {e}; {HINT}", path.display()))?;
                    std::mem::forget(lib);
                }
            }
            // SAFETY: only probes whether the library can be opened.
            if unsafe { cudarc::cublas::sys::is_culib_present() } {
                Ok(())
            } else {
                Err(format!("cuda engine: no cuBLAS (libcublas.so.13) on this machine; {HINT}"))
            }
        })
        .clone()
}

/// cuBLAS's version (13000 and up for 13.x), loading it first; an error names how to
/// install it. Needs no GPU.
pub fn cublas_version() -> Result<i32> {
    load_cublas().map_err(Error::Unavailable)?;
    let mut v: std::ffi::c_int = 0;
    // SAFETY: the library is loaded (checked above); cublasGetVersion accepts a null
    // handle and writes one int through the pointer, valid for the call.
    let rc = unsafe { cudarc::cublas::sys::cublasGetVersion_v2(std::ptr::null_mut(), &mut v) };
    rc.result().map_err(Error::cublas("cublasGetVersion"))?;
    Ok(v)
}

struct Blas {
    handle: cudarc::cublas::CudaBlas,
    /// cuBLAS's workspace, set once so GEMMs allocate nothing (and can be captured in a
    /// CUDA graph).
    _workspace: CudaSlice<u8>,
}

/// Bytes of cuBLAS's workspace (what NVIDIA suggests for Hopper).
const CUBLAS_WORKSPACE: usize = 32 << 20;

/// A captured sequence of launches and GEMMs, replayed with [`Gpu::replay`](super::Gpu::replay).
pub struct GpuGraph {
    graph: cudarc::driver::CudaGraph,
}

impl GpuGraph {
    /// Queues the graph.
    pub(super) fn launch(&self) -> Result<()> {
        self.graph.launch().map_err(Error::driver("graph launch"))
    }
}

/// The GEMM sizes as cuBLAS takes them (`int`), or an error naming the GEMM.
pub(super) fn gemm_dims(m: usize, n: usize, k: usize) -> Result<(i32, i32, i32)> {
    match (i32::try_from(m), i32::try_from(n), i32::try_from(k)) {
        (Ok(m), Ok(n), Ok(k)) => Ok((m, n, k)),
        _ => Err(Error::Usage(format!(
            "gemm {m}x{n}x{k} is too large for cuBLAS"
        ))),
    }
}

/// A GPU on one stream, with cuBLAS bound to that stream (none for kernels alone).
pub(super) struct CudaGpu {
    dev: Arc<CudaDevice>,
    blas: Option<Blas>,
}

impl CudaGpu {
    /// GPU 0 on a stream of its own (the legacy default stream cannot be captured into a
    /// graph), with cudarc's cross-stream event tracking off: everything of the engine
    /// runs on this one stream, in order.
    pub(super) fn open() -> Result<CudaGpu> {
        let dev = CudaDevice::open()?;
        let ctx = dev.context().clone();
        // SAFETY: every buffer moac allocates in this context is used on the one
        // stream made next, so no cross-stream synchronization is needed.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(Error::driver("cannot create a stream"))?;
        CudaGpu::new(CudaDevice::on_stream(stream)?)
    }

    /// The device of a stream, with cuBLAS loaded, a handle on the stream and its
    /// workspace set.
    pub(super) fn new(dev: Arc<CudaDevice>) -> Result<CudaGpu> {
        load_cublas().map_err(Error::Unavailable)?;
        dev.context()
            .bind_to_thread()
            .map_err(Error::driver("bind context"))?;
        let handle = cudarc::cublas::CudaBlas::new(dev.stream().clone())
            .map_err(Error::cublas("cannot create a handle"))?;
        let mut workspace = dev.zeros::<u8>(CUBLAS_WORKSPACE)?;
        {
            let (p, _g) = workspace.device_ptr_mut(dev.stream());
            // SAFETY: `p` is a live allocation of CUBLAS_WORKSPACE bytes in this context,
            // kept alive with the handle in `Blas` (dropped together).
            let rc = unsafe {
                cudarc::cublas::sys::cublasSetWorkspace_v2(
                    *handle.handle(),
                    p as *mut c_void,
                    CUBLAS_WORKSPACE,
                )
            };
            rc.result()
                .map_err(Error::cublas("cannot set its workspace"))?;
        }
        Ok(CudaGpu {
            dev,
            blas: Some(Blas {
                handle,
                _workspace: workspace,
            }),
        })
    }

    /// The device without cuBLAS: kernels, copies and timing only.
    pub(super) fn without_blas(dev: Arc<CudaDevice>) -> CudaGpu {
        CudaGpu { dev, blas: None }
    }

    pub(super) fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    pub(super) fn describe(&self) -> String {
        format!("{} ({})", self.dev.name(), self.dev.arch())
    }

    /// Free and total device memory in bytes.
    pub(super) fn memory(&self) -> Result<(u64, u64)> {
        self.dev
            .context()
            .bind_to_thread()
            .map_err(Error::driver("bind context"))?;
        let (free, total) = cudarc::driver::result::mem_get_info()
            .map_err(Error::driver("cannot read the free memory"))?;
        Ok((free as u64, total as u64))
    }

    /// A zeroed allocation of `bytes` bytes (at least 64).
    pub(super) fn alloc(&self, bytes: usize) -> Result<CudaSlice<u8>> {
        self.dev.zeros::<u8>(bytes.max(64))
    }

    /// Queues a copy of `src` to `dst` at byte `off`.
    pub(super) fn upload(&self, dst: &mut CudaSlice<u8>, off: usize, src: &[u8]) -> Result<()> {
        let mut dst = dst.slice_mut(off..off + src.len());
        self.dev
            .stream()
            .memcpy_htod(src, &mut dst)
            .map_err(Error::driver("copy to the GPU"))
    }

    /// Copies `dst.len()` bytes from `src` at byte `off` after all queued work.
    pub(super) fn download(&self, src: &CudaSlice<u8>, off: usize, dst: &mut [u8]) -> Result<()> {
        let src = src.slice(off..off + dst.len());
        self.dev
            .stream()
            .memcpy_dtoh(&src, dst)
            .map_err(Error::driver("copy from the GPU"))?;
        self.dev.synchronize()
    }

    /// Queues a device-to-device copy of `bytes` bytes.
    pub(super) fn copy(
        &self,
        dst: &mut CudaSlice<u8>,
        dst_off: usize,
        src: &CudaSlice<u8>,
        src_off: usize,
        bytes: usize,
    ) -> Result<()> {
        let s = src.slice(src_off..src_off + bytes);
        let mut d = dst.slice_mut(dst_off..dst_off + bytes);
        self.dev
            .stream()
            .memcpy_dtod(&s, &mut d)
            .map_err(Error::driver("device copy"))
    }

    /// Queues a copy of row `from` to row `to` (different rows, both inside `buf`).
    pub(super) fn move_row(
        &self,
        buf: &mut CudaSlice<u8>,
        to: usize,
        from: usize,
        row_bytes: usize,
    ) -> Result<()> {
        let st = self.dev.stream();
        let (base, _g) = buf.device_ptr_mut(st);
        // SAFETY: both ranges lie inside this allocation (checked by the caller) and do
        // not overlap (different rows); the copy is queued on the one stream.
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(
                base + (to * row_bytes) as u64,
                base + (from * row_bytes) as u64,
                row_bytes,
                st.cu_stream(),
            )
        }
        .map_err(Error::driver("row move"))
    }

    /// The device address of an allocation.
    pub(super) fn addr(&self, buf: &CudaSlice<u8>) -> u64 {
        let (p, _g) = buf.device_ptr(self.dev.stream());
        p
    }

    /// The device address of an allocation kernels write.
    pub(super) fn addr_mut(&self, buf: &mut CudaSlice<u8>) -> u64 {
        let (p, _g) = buf.device_ptr_mut(self.dev.stream());
        p
    }

    /// Sets the first `n` elements (16 or 32 bits, as `fill` says) of `buf`.
    pub(super) fn fill(&self, buf: &mut CudaSlice<u8>, n: usize, fill: Fill) -> Result<()> {
        let st = self.dev.stream();
        self.dev
            .context()
            .bind_to_thread()
            .map_err(Error::driver("bind context"))?;
        let (p, _g) = buf.device_ptr_mut(st);
        // SAFETY: `p` is a live allocation of at least `n` elements of the pattern's
        // width in this context (the caller sized `n` from the buffer), queued on the
        // stream every other use of the buffer goes through.
        let rc = unsafe {
            match fill {
                Fill::U16(b) => cudarc::driver::sys::cuMemsetD16Async(p, b, n, st.cu_stream()),
                Fill::U32(b) => cudarc::driver::sys::cuMemsetD32Async(p, b, n, st.cu_stream()),
            }
        };
        rc.result().map_err(Error::driver("memset"))
    }

    /// The artifact's binary of the unit where one fits the GPU, else NVRTC (through
    /// moac's compile cache); then every entry's function.
    pub(super) fn module(
        &self,
        name: &str,
        source: &str,
        entries: &[&str],
        binaries: Option<&UnitBinaries>,
    ) -> Result<GpuModule> {
        let (module, binary) = self.dev.module(name, source, binaries)?;
        let functions = entries
            .iter()
            .map(|e| {
                module
                    .load_function(e)
                    .map(|f| (e.to_string(), f))
                    .map_err(Error::driver(format_args!("entry {e} of {name}")))
            })
            .collect::<Result<_>>()?;
        Ok(GpuModule::Cuda {
            _module: module,
            functions,
            binary: binary.to_string(),
        })
    }

    /// Launches the function named `entry` among a module's `functions`.
    pub(super) fn launch(
        &self,
        functions: &[(String, CudaFunction)],
        entry: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        args: &mut ArgPack,
    ) -> Result<()> {
        let func = functions
            .iter()
            .find(|(n, _)| n == entry)
            .map(|(_, f)| f)
            .ok_or_else(|| Error::Usage(format!("no entry {entry} in the module")))?;
        self.dev.launch(func, grid, block, args, entry)
    }

    /// y = x w^T + beta y by cuBLAS on the stream, at device addresses `yp`, `xp`, `wp`
    /// the caller checked against their buffers; `(m, n, k)` from [`gemm_dims`].
    pub(super) fn gemm(
        &self,
        dtype: Dtype,
        (yp, xp, wp): (u64, u64, u64),
        (m, n, k): (i32, i32, i32),
        beta: f32,
    ) -> Result<()> {
        use cudarc::cublas::sys;
        let dt = match dtype {
            Dtype::F16 => sys::cudaDataType::CUDA_R_16F,
            Dtype::Bf16 => sys::cudaDataType::CUDA_R_16BF,
        };
        let blas = self.blas.as_ref().ok_or_else(|| {
            Error::Usage("this GPU was opened for kernels alone (no cuBLAS): no GEMMs".into())
        })?;
        let alpha = 1.0f32;
        self.dev
            .context()
            .bind_to_thread()
            .map_err(Error::driver("bind context"))?;
        // Column-major view: y^T [n, m] = w [n, k] (stored k-major: op T) x x^T.
        // SAFETY: the three ranges were checked against their buffers; alpha and
        // beta live for the call; the handle is bound to the engine's stream.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *blas.handle.handle(),
                sys::cublasOperation_t::CUBLAS_OP_T,
                sys::cublasOperation_t::CUBLAS_OP_N,
                n,
                m,
                k,
                (&alpha as *const f32).cast::<c_void>(),
                wp as *const c_void,
                dt,
                k,
                xp as *const c_void,
                dt,
                k,
                (&beta as *const f32).cast::<c_void>(),
                yp as *mut c_void,
                sys::cudaDataType::CUDA_R_32F,
                n,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(Error::cublas(format_args!("gemm {m}x{n}x{k}")))
    }

    /// Records what `f` queues on the stream into a graph.
    pub(super) fn capture<E: From<Error>>(
        &self,
        f: impl FnOnce() -> Result<(), E>,
    ) -> Result<Captured, E> {
        let st = self.dev.stream();
        st.begin_capture(
            cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
        )
        .map_err(Error::driver("begin graph capture"))?;
        let ran = f();
        let ended = st.end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0));
        ran?;
        match ended.map_err(Error::driver("end graph capture"))? {
            Some(graph) => Ok(Captured::Graph(GpuGraph { graph })),
            None => Err(Error::Internal("graph capture recorded nothing".into()).into()),
        }
    }

    pub(super) fn synchronize(&self) -> Result<()> {
        self.dev.synchronize()
    }

    /// Milliseconds between CUDA events recorded around `f`'s queued work.
    pub(super) fn time_ms<E: From<Error>>(
        &self,
        f: impl FnOnce() -> Result<(), E>,
    ) -> Result<f64, E> {
        let dev = &self.dev;
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let ctx = dev.context();
        let start = ctx.new_event(flags).map_err(Error::driver("event"))?;
        let end = ctx.new_event(flags).map_err(Error::driver("event"))?;
        start
            .record(dev.stream())
            .map_err(Error::driver("event record"))?;
        f()?;
        end.record(dev.stream())
            .map_err(Error::driver("event record"))?;
        dev.synchronize()?;
        let ms = start
            .elapsed_ms(&end)
            .map_err(Error::driver("event time"))?;
        Ok(ms as f64)
    }
}
