//! A GPU-shaped machine for code that keeps everything in device buffers (the
//! whole-model engine, benchmarks): buffers, copies, kernel launches by entry name with
//! arguments packed against a parameter table, and row-major GEMMs, on either
//!
//! - `cuda`: a real GPU through cudarc (one stream; GEMMs through cuBLAS, loaded at run
//!   time from the CUDA toolkit or the PyPI wheel `scripts/setup-cublas.sh` installs), or
//! - `emu`: host memory standing in for device memory, the kernels' own CUDA source
//!   built with g++ against the emulation header, GEMMs by a CPU matmul with the same
//!   contract (f16/bf16 inputs, f32 accumulation and output).
//!
//! Addresses handed to kernels are raw (`u64`): a host pointer on emu, a `CUdeviceptr`
//! on cuda, the same convention as the attention backends ([`crate::backend::launch`]).
//! Everything queued runs in order; [`Gpu::synchronize`] waits (a no-op on emu, where
//! every call has finished when it returns).
//!
//! [`attention`] runs moac's attention kernels on such buffers: the device-resident
//! runtime API.

pub mod attention;

use crate::backend::cuda::CudaDevice;
use crate::backend::emu::{EmuModule, EmuOptions};
use crate::backend::{from_bits, Backend};
use crate::error::{Error, Result};
use cudarc::driver::{CudaFunction, CudaModule, CudaSlice, DevicePtr, DevicePtrMut};
use moac::abi::ArgPack;
use moac::geometry::Dtype;
use std::alloc::Layout;
use std::collections::HashMap;
use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, OnceLock};

/// Plain element types that may be copied to and from buffers as bytes.
pub trait Plain: Copy + Default + Send + Sync + 'static {}
impl Plain for u16 {}
impl Plain for f32 {}
impl Plain for i32 {}
impl Plain for u32 {}
impl Plain for u8 {}

fn bytes_of<T: Plain>(v: &[T]) -> &[u8] {
    // SAFETY: `Plain` types have no padding and no invalid bit patterns; the byte view
    // covers exactly the slice's memory and borrows it for as long as the slice.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), std::mem::size_of_val(v)) }
}

fn bytes_of_mut<T: Plain>(v: &mut [T]) -> &mut [u8] {
    // SAFETY: as in `bytes_of`; every byte pattern is a valid `Plain` value, so writes
    // through the byte view leave valid values.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast(), std::mem::size_of_val(v)) }
}

/// Host memory standing in for a device allocation (emu): zeroed, 64-byte aligned,
/// reached only through raw pointers while kernels run.
struct HostMem {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: HostMem owns its allocation exclusively (like a Vec); accesses are sequenced
// by the Gpu's calls, which run one at a time.
unsafe impl Send for HostMem {}
// SAFETY: shared references only read the pointer value.
unsafe impl Sync for HostMem {}

impl HostMem {
    fn new(bytes: usize) -> Result<HostMem> {
        let layout = Layout::from_size_align(bytes.max(64), 64)
            .map_err(|_| Error::Usage(format!("cannot allocate {bytes} bytes")))?;
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or_else(|| {
            Error::Unavailable(format!("emu: out of host memory allocating {bytes} bytes"))
        })?;
        Ok(HostMem { ptr, layout })
    }
}

impl Drop for HostMem {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

enum Mem {
    Host(HostMem),
    Cuda(CudaSlice<u8>),
}

/// A device buffer of `bytes` bytes (zeroed when made).
pub struct GpuBuf {
    bytes: usize,
    mem: Mem,
}

impl GpuBuf {
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The buffer as host bytes (emu only).
    fn host(&self) -> Option<&[u8]> {
        match &self.mem {
            // SAFETY: the allocation holds at least `bytes` initialised bytes; no kernel
            // runs while the view lives (calls on emu are synchronous and sequenced).
            Mem::Host(h) => Some(unsafe { std::slice::from_raw_parts(h.ptr.as_ptr(), self.bytes) }),
            Mem::Cuda(_) => None,
        }
    }

    fn host_mut(&mut self) -> Option<&mut [u8]> {
        match &mut self.mem {
            // SAFETY: as in `host`, and `&mut self` makes the view the only one.
            Mem::Host(h) => {
                Some(unsafe { std::slice::from_raw_parts_mut(h.ptr.as_ptr(), self.bytes) })
            }
            Mem::Cuda(_) => None,
        }
    }
}

/// A loaded translation unit with its entry points.
pub enum GpuModule {
    Emu(EmuModule),
    Cuda {
        _module: Arc<CudaModule>,
        functions: Vec<(String, CudaFunction)>,
    },
}

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
    if rc != cudarc::cublas::sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        return Err(Error::Unavailable(format!(
            "cublasGetVersion failed: {rc:?}"
        )));
    }
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

/// A captured sequence of launches and GEMMs, replayed with [`Gpu::replay`].
pub struct GpuGraph {
    graph: cudarc::driver::CudaGraph,
}

/// What [`Gpu::capture`] did.
pub enum Captured {
    /// The work was recorded into a graph (not run).
    Graph(GpuGraph),
    /// This machine has no graphs (emu): nothing was recorded or run.
    Unsupported,
}

enum Kind {
    Emu(EmuOptions),
    Cuda { dev: Arc<CudaDevice>, blas: Blas },
}

/// The machine the engine runs on.
pub struct Gpu {
    kind: Kind,
    /// Modules loaded by [`Gpu::module_cached`], by unit name.
    modules: Mutex<HashMap<String, Arc<GpuModule>>>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gpu({})", self.describe())
    }
}

impl Gpu {
    /// Opens the engine's machine: `emu`, or `cuda` (GPU 0 and cuBLAS, each missing one
    /// a clear error). `cpu` has no device buffers: the host runner serves it.
    pub fn open(backend: Backend, emu: EmuOptions) -> Result<Arc<Gpu>> {
        let kind = match backend {
            Backend::Emu => Kind::Emu(emu),
            Backend::Cuda => {
                // A stream of its own (the legacy default stream cannot be captured into
                // a graph), with cudarc's cross-stream event tracking off: everything of
                // the engine runs on this one stream, in order.
                let dev = CudaDevice::open()?;
                let ctx = dev.context().clone();
                // SAFETY: every buffer moac allocates in this context is used on the one
                // stream made next, so no cross-stream synchronization is needed.
                unsafe { ctx.disable_event_tracking() };
                let stream = ctx
                    .new_stream()
                    .map_err(Error::driver("cannot create a stream"))?;
                Gpu::cuda_kind(CudaDevice::on_stream(stream)?)?
            }
            Backend::Cpu => {
                return Err(Error::Usage(
                    "the device engine runs on emu or cuda; the cpu backend uses the host runner (--engine host)".into(),
                ))
            }
        };
        Ok(Arc::new(Gpu {
            kind,
            modules: Mutex::new(HashMap::new()),
        }))
    }

    /// The GPU of a stream the caller owns: every launch, copy and GEMM goes to it.
    pub fn on_stream(stream: Arc<cudarc::driver::CudaStream>) -> Result<Arc<Gpu>> {
        crate::cuda_available()?;
        Ok(Arc::new(Gpu {
            kind: Gpu::cuda_kind(CudaDevice::on_stream(stream)?)?,
            modules: Mutex::new(HashMap::new()),
        }))
    }

    fn cuda_kind(dev: Arc<CudaDevice>) -> Result<Kind> {
        load_cublas().map_err(Error::Unavailable)?;
        dev.context()
            .bind_to_thread()
            .map_err(Error::driver("bind context"))?;
        let handle = cudarc::cublas::CudaBlas::new(dev.stream().clone())
            .map_err(|e| Error::Unavailable(format!("cuBLAS: cannot create a handle: {e:?}")))?;
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
            if rc != cudarc::cublas::sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                return Err(Error::Unavailable(format!(
                    "cuBLAS: cannot set its workspace: {rc:?}"
                )));
            }
        }
        Ok(Kind::Cuda {
            dev,
            blas: Blas {
                handle,
                _workspace: workspace,
            },
        })
    }

    /// [`Gpu::module`], loaded once per unit name and kept.
    pub fn module_cached(
        &self,
        name: &str,
        source: &str,
        entries: &[&str],
    ) -> Result<Arc<GpuModule>> {
        let mut mods = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = mods.get(name) {
            return Ok(m.clone());
        }
        let m = Arc::new(self.module(name, source, entries)?);
        mods.insert(name.to_string(), m.clone());
        Ok(m)
    }

    pub fn backend(&self) -> Backend {
        match self.kind {
            Kind::Emu(_) => Backend::Emu,
            Kind::Cuda { .. } => Backend::Cuda,
        }
    }

    /// The CUDA device, on cuda.
    pub fn cuda(&self) -> Option<&Arc<CudaDevice>> {
        match &self.kind {
            Kind::Cuda { dev, .. } => Some(dev),
            Kind::Emu(_) => None,
        }
    }

    /// `emu (CPU)` or the GPU's name and arch.
    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::Emu(_) => "emu (the CUDA source on the CPU)".into(),
            Kind::Cuda { dev, .. } => format!("{} ({})", dev.name(), dev.arch()),
        }
    }

    /// Free and total device memory in bytes (cuda); `None` on emu.
    pub fn memory(&self) -> Result<Option<(u64, u64)>> {
        match &self.kind {
            Kind::Emu(_) => Ok(None),
            Kind::Cuda { dev, .. } => {
                dev.context()
                    .bind_to_thread()
                    .map_err(Error::driver("bind context"))?;
                let (free, total) = cudarc::driver::result::mem_get_info()
                    .map_err(Error::driver("cannot read the free memory"))?;
                Ok(Some((free as u64, total as u64)))
            }
        }
    }

    /// A zeroed buffer of `bytes` bytes.
    pub fn alloc(&self, bytes: usize) -> Result<GpuBuf> {
        let mem = match &self.kind {
            Kind::Emu(_) => Mem::Host(HostMem::new(bytes)?),
            Kind::Cuda { dev, .. } => Mem::Cuda(dev.zeros::<u8>(bytes.max(64))?),
        };
        Ok(GpuBuf { bytes, mem })
    }

    /// A zeroed buffer of `n` elements of `T`.
    pub fn alloc_of<T: Plain>(&self, n: usize) -> Result<GpuBuf> {
        self.alloc(n * std::mem::size_of::<T>())
    }

    fn check_range(buf: &GpuBuf, off: usize, len: usize, what: &str) -> Result<()> {
        if off.checked_add(len).is_none_or(|end| end > buf.bytes) {
            return Err(Error::shape(
                what,
                format!("bytes {off}..{} inside the buffer", off.saturating_add(len)),
                format!("a buffer of {} bytes", buf.bytes),
            ));
        }
        Ok(())
    }

    /// Copies `data` into `buf` at element `offset`.
    pub fn upload<T: Plain>(&self, buf: &mut GpuBuf, offset: usize, data: &[T]) -> Result<()> {
        let src = bytes_of(data);
        let off = offset * std::mem::size_of::<T>();
        Self::check_range(buf, off, src.len(), "upload")?;
        if src.is_empty() {
            return Ok(());
        }
        match (&self.kind, &mut buf.mem) {
            (Kind::Cuda { dev, .. }, Mem::Cuda(s)) => {
                let mut dst = s.slice_mut(off..off + src.len());
                dev.stream()
                    .memcpy_htod(src, &mut dst)
                    .map_err(Error::driver("copy to the GPU"))
            }
            (Kind::Emu(_), Mem::Host(_)) => {
                let host = buf
                    .host_mut()
                    .ok_or_else(|| Error::Usage("emu buffer".into()))?;
                host[off..off + src.len()].copy_from_slice(src);
                Ok(())
            }
            _ => Err(Error::Usage("a buffer of another machine".into())),
        }
    }

    /// `n` elements of `T` from element `offset` of `buf`, after all queued work.
    pub fn download<T: Plain>(&self, buf: &GpuBuf, offset: usize, n: usize) -> Result<Vec<T>> {
        let mut out = vec![T::default(); n];
        let size = std::mem::size_of::<T>();
        let off = offset * size;
        Self::check_range(buf, off, n * size, "download")?;
        if n == 0 {
            return Ok(out);
        }
        match (&self.kind, &buf.mem) {
            (Kind::Cuda { dev, .. }, Mem::Cuda(s)) => {
                let src = s.slice(off..off + n * size);
                dev.stream()
                    .memcpy_dtoh(&src, bytes_of_mut(&mut out))
                    .map_err(Error::driver("copy from the GPU"))?;
                dev.synchronize()?;
            }
            (Kind::Emu(_), Mem::Host(_)) => {
                let host = buf
                    .host()
                    .ok_or_else(|| Error::Usage("emu buffer".into()))?;
                bytes_of_mut(&mut out).copy_from_slice(&host[off..off + n * size]);
            }
            _ => return Err(Error::Usage("a buffer of another machine".into())),
        }
        Ok(out)
    }

    /// Copies `bytes` bytes from `src` at `src_off` to `dst` at `dst_off` (device to
    /// device; the ranges of one buffer must not overlap).
    pub fn copy(
        &self,
        dst: &mut GpuBuf,
        dst_off: usize,
        src: &GpuBuf,
        src_off: usize,
        bytes: usize,
    ) -> Result<()> {
        Self::check_range(dst, dst_off, bytes, "copy destination")?;
        Self::check_range(src, src_off, bytes, "copy source")?;
        if bytes == 0 {
            return Ok(());
        }
        match (&self.kind, &mut dst.mem, &src.mem) {
            (Kind::Cuda { dev, .. }, Mem::Cuda(d), Mem::Cuda(s)) => {
                let s = s.slice(src_off..src_off + bytes);
                let mut d = d.slice_mut(dst_off..dst_off + bytes);
                dev.stream()
                    .memcpy_dtod(&s, &mut d)
                    .map_err(Error::driver("device copy"))
            }
            (Kind::Emu(_), Mem::Host(_), Mem::Host(_)) => {
                let from = src
                    .host()
                    .ok_or_else(|| Error::Usage("emu buffer".into()))?;
                let tmp = from[src_off..src_off + bytes].to_vec();
                let to = dst
                    .host_mut()
                    .ok_or_else(|| Error::Usage("emu buffer".into()))?;
                to[dst_off..dst_off + bytes].copy_from_slice(&tmp);
                Ok(())
            }
            _ => Err(Error::Usage("a buffer of another machine".into())),
        }
    }

    /// Copies rows within one buffer: row `from` to row `to`, each `row_bytes` long
    /// (`from` != `to`): how a batch closes up when a sequence leaves it.
    pub fn move_row(
        &self,
        buf: &mut GpuBuf,
        to: usize,
        from: usize,
        row_bytes: usize,
    ) -> Result<()> {
        if to == from {
            return Ok(());
        }
        Self::check_range(buf, to * row_bytes, row_bytes, "row move")?;
        Self::check_range(buf, from * row_bytes, row_bytes, "row move")?;
        match (&self.kind, &mut buf.mem) {
            (Kind::Cuda { dev, .. }, Mem::Cuda(s)) => {
                let st = dev.stream();
                let (base, _g) = s.device_ptr_mut(st);
                // SAFETY: both ranges lie inside this allocation (checked above) and do
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
            (Kind::Emu(_), Mem::Host(_)) => {
                let host = buf
                    .host_mut()
                    .ok_or_else(|| Error::Usage("emu buffer".into()))?;
                host.copy_within(from * row_bytes..(from + 1) * row_bytes, to * row_bytes);
                Ok(())
            }
            _ => Err(Error::Usage("a buffer of another machine".into())),
        }
    }

    /// The address kernels see for `buf` (plus `offset` bytes).
    pub fn addr(&self, buf: &GpuBuf, offset: usize) -> u64 {
        let base = match (&self.kind, &buf.mem) {
            (Kind::Cuda { dev, .. }, Mem::Cuda(s)) => {
                let (p, _g) = s.device_ptr(dev.stream());
                p
            }
            (_, Mem::Host(h)) => h.ptr.as_ptr() as u64,
            (Kind::Emu(_), Mem::Cuda(_)) => 0,
        };
        base + offset as u64
    }

    /// The address of a buffer kernels write (the same value as [`Gpu::addr`], taken
    /// from a mutable borrow so the borrow checker sees the write).
    pub fn addr_mut(&self, buf: &mut GpuBuf, offset: usize) -> u64 {
        let base = match (&self.kind, &mut buf.mem) {
            (Kind::Cuda { dev, .. }, Mem::Cuda(s)) => {
                let (p, _g) = s.device_ptr_mut(dev.stream());
                p
            }
            (_, Mem::Host(h)) => h.ptr.as_ptr() as u64,
            (Kind::Emu(_), Mem::Cuda(_)) => 0,
        };
        base + offset as u64
    }

    /// Loads a translation unit with its entry points: NVRTC (through moac's compile
    /// cache) on cuda, g++ against the emulation header on emu.
    pub fn module(&self, name: &str, source: &str, entries: &[&str]) -> Result<GpuModule> {
        match &self.kind {
            Kind::Emu(opts) => Ok(GpuModule::Emu(EmuModule::build(source, entries, opts)?)),
            Kind::Cuda { dev, .. } => {
                let (module, _) = dev.module(name, source, None)?;
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
                })
            }
        }
    }

    /// Launches `entry` of `module` over `grid` x `block` with packed arguments. The
    /// caller guarantees every address in `args` is a live buffer of this machine sized
    /// for the kernel's reads and writes.
    pub fn launch(
        &self,
        module: &GpuModule,
        entry: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        args: &mut ArgPack,
    ) -> Result<()> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        match (module, &self.kind) {
            (GpuModule::Emu(m), Kind::Emu(_)) => m.launch(entry, grid, block, args),
            (GpuModule::Cuda { functions, .. }, Kind::Cuda { dev, .. }) => {
                let func = functions
                    .iter()
                    .find(|(n, _)| n == entry)
                    .map(|(_, f)| f)
                    .ok_or_else(|| Error::Usage(format!("no entry {entry} in the module")))?;
                dev.launch(func, grid, block, args, entry)
            }
            _ => Err(Error::Usage("a module of another machine".into())),
        }
    }

    /// y[m, n] = x[m, k] * w[n, k]^T + beta * y[m, n], row-major: x and w hold `dtype`
    /// elements (from element offsets `x_off`, `w_off`), y f32 (from `y_off`); f32
    /// accumulation. `beta` 1 adds into y (the residual stream), 0 overwrites it.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        dtype: Dtype,
        y: &mut GpuBuf,
        y_off: usize,
        x: &GpuBuf,
        x_off: usize,
        w: &GpuBuf,
        w_off: usize,
        (m, n, k): (usize, usize, usize),
        beta: f32,
    ) -> Result<()> {
        Self::check_range(y, y_off * 4, m * n * 4, "gemm y")?;
        Self::check_range(x, x_off * 2, m * k * 2, "gemm x")?;
        Self::check_range(w, w_off * 2, n * k * 2, "gemm w")?;
        if m == 0 || n == 0 {
            return Ok(());
        }
        match &self.kind {
            Kind::Emu(_) => {
                let xs = x.host().ok_or_else(|| Error::Usage("emu buffer".into()))?;
                let ws = w.host().ok_or_else(|| Error::Usage("emu buffer".into()))?;
                let bits = |b: &[u8], at: usize| u16::from_le_bytes([b[2 * at], b[2 * at + 1]]);
                let xf: Vec<f32> = (0..m * k)
                    .map(|i| from_bits(bits(xs, x_off + i), dtype))
                    .collect();
                let ys = y
                    .host_mut()
                    .ok_or_else(|| Error::Usage("emu buffer".into()))?;
                let yv: &mut [f32] = {
                    let part = &mut ys[y_off * 4..(y_off + m * n) * 4];
                    // SAFETY: the range is 4-byte aligned (64-byte aligned allocation,
                    // offset in f32 elements) and holds m * n f32 values.
                    unsafe { std::slice::from_raw_parts_mut(part.as_mut_ptr().cast(), m * n) }
                };
                let cols: Vec<(usize, Vec<f32>)> = {
                    use rayon::prelude::*;
                    (0..n)
                        .into_par_iter()
                        .map(|j| {
                            let wrow: Vec<f32> = (0..k)
                                .map(|t| from_bits(bits(ws, w_off + j * k + t), dtype))
                                .collect();
                            let col = (0..m)
                                .map(|i| {
                                    let xr = &xf[i * k..(i + 1) * k];
                                    xr.iter().zip(&wrow).map(|(a, b)| a * b).sum::<f32>()
                                })
                                .collect();
                            (j, col)
                        })
                        .collect()
                };
                for (j, col) in cols {
                    for (i, v) in col.into_iter().enumerate() {
                        let o = &mut yv[i * n + j];
                        *o = if beta == 0.0 { v } else { v + beta * *o };
                    }
                }
                Ok(())
            }
            Kind::Cuda { dev, blas } => {
                use cudarc::cublas::sys;
                let dt = match dtype {
                    Dtype::F16 => sys::cudaDataType::CUDA_R_16F,
                    Dtype::Bf16 => sys::cudaDataType::CUDA_R_16BF,
                };
                let too_big = |v: usize| i32::try_from(v).is_err();
                if too_big(m) || too_big(n) || too_big(k) {
                    return Err(Error::Usage(format!(
                        "gemm {m}x{n}x{k} is too large for cuBLAS"
                    )));
                }
                let (xp, yp) = (self.addr(x, x_off * 2), self.addr_mut(y, y_off * 4));
                let wp = self.addr(w, w_off * 2);
                let alpha = 1.0f32;
                dev.context()
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
                        n as i32,
                        m as i32,
                        k as i32,
                        (&alpha as *const f32).cast::<c_void>(),
                        wp as *const c_void,
                        dt,
                        k as i32,
                        xp as *const c_void,
                        dt,
                        k as i32,
                        (&beta as *const f32).cast::<c_void>(),
                        yp as *mut c_void,
                        sys::cudaDataType::CUDA_R_32F,
                        n as i32,
                        sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                        sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                    )
                }
                .map_err(|e| Error::Unavailable(format!("cuBLAS gemm {m}x{n}x{k}: {e:?}")))
            }
        }
    }

    /// Records the launches and GEMMs `f` queues into a graph instead of running them
    /// (cuda), or does nothing where there are no graphs (emu): the caller then runs
    /// `f`'s work itself. `f` must queue only (no copies to or from the host, no
    /// synchronization).
    pub fn capture<E: From<Error>>(
        &self,
        f: impl FnOnce() -> Result<(), E>,
    ) -> Result<Captured, E> {
        let Kind::Cuda { dev, .. } = &self.kind else {
            return Ok(Captured::Unsupported);
        };
        let st = dev.stream();
        st.begin_capture(
            cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
        )
        .map_err(Error::driver("begin graph capture"))?;
        let ran = f();
        let ended = st.end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0));
        ran?;
        match ended.map_err(Error::driver("end graph capture"))? {
            Some(graph) => Ok(Captured::Graph(GpuGraph { graph })),
            None => Err(Error::Usage("graph capture recorded nothing".into()).into()),
        }
    }

    /// Queues a captured graph.
    pub fn replay(&self, g: &GpuGraph) -> Result<()> {
        g.graph.launch().map_err(Error::driver("graph launch"))
    }

    /// Waits for everything queued and reports a kernel's failure.
    pub fn synchronize(&self) -> Result<()> {
        match &self.kind {
            Kind::Emu(_) => Ok(()),
            Kind::Cuda { dev, .. } => dev.synchronize(),
        }
    }

    /// Milliseconds `f` takes on the machine: CUDA events around its queued work on
    /// cuda, the wall clock on emu (where the work is done when `f` returns).
    pub fn time_ms<E: From<Error>>(&self, f: impl FnOnce() -> Result<(), E>) -> Result<f64, E> {
        match &self.kind {
            Kind::Emu(_) => {
                let t = std::time::Instant::now();
                f()?;
                Ok(t.elapsed().as_secs_f64() * 1e3)
            }
            Kind::Cuda { dev, .. } => {
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// cuBLAS loads without a GPU where `scripts/setup-cublas.sh` installed it (the
    /// tests do not need it otherwise: emu's GEMMs are on the CPU).
    #[test]
    fn cublas_loads_where_installed() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        if !root.join(".venv/.moac-cublas-13.0").exists() {
            eprintln!("skipped: cuBLAS not installed (scripts/setup-cublas.sh)");
            return;
        }
        let v = cublas_version().expect("cuBLAS loads");
        assert_eq!(v / 10000, 13, "cuBLAS 13.x, got {v}");
    }

    #[test]
    fn emu_buffers_copy_move_and_multiply() {
        let g = Gpu::open(Backend::Emu, EmuOptions::default()).expect("emu");
        let mut a = g.alloc_of::<f32>(6).expect("alloc");
        g.upload(&mut a, 1, &[1.0f32, 2.0, 3.0]).expect("upload");
        assert_eq!(
            g.download::<f32>(&a, 0, 6).expect("down"),
            [0.0, 1.0, 2.0, 3.0, 0.0, 0.0]
        );
        assert!(g.upload(&mut a, 5, &[1.0f32, 2.0]).is_err(), "past the end");
        g.move_row(&mut a, 2, 0, 8).expect("move");
        assert_eq!(g.download::<f32>(&a, 4, 2).expect("down"), [0.0, 1.0]);
        // y = x w^T + y for bf16 inputs: exact small integers.
        let bits = |v: &[f32]| -> Vec<u16> {
            v.iter()
                .map(|&x| crate::backend::to_bits(x, Dtype::Bf16))
                .collect()
        };
        let mut x = g.alloc_of::<u16>(4).expect("alloc");
        g.upload(&mut x, 0, &bits(&[1.0, 2.0, 3.0, 4.0]))
            .expect("up");
        let mut w = g.alloc_of::<u16>(6).expect("alloc");
        g.upload(&mut w, 0, &bits(&[1.0, 0.0, 0.0, 1.0, 1.0, 1.0]))
            .expect("up");
        let mut y = g.alloc_of::<f32>(6).expect("alloc");
        g.upload(&mut y, 0, &[10.0f32; 6]).expect("up");
        g.gemm(Dtype::Bf16, &mut y, 0, &x, 0, &w, 0, (2, 3, 2), 1.0)
            .expect("gemm");
        assert_eq!(
            g.download::<f32>(&y, 0, 6).expect("down"),
            [11.0, 12.0, 13.0, 13.0, 14.0, 17.0]
        );
        g.gemm(Dtype::Bf16, &mut y, 0, &x, 0, &w, 0, (2, 3, 2), 0.0)
            .expect("gemm");
        assert_eq!(
            g.download::<f32>(&y, 0, 6).expect("down"),
            [1.0, 2.0, 3.0, 3.0, 4.0, 7.0]
        );
        assert!(
            g.gemm(Dtype::Bf16, &mut y, 0, &x, 0, &w, 0, (2, 4, 2), 0.0)
                .is_err(),
            "w too small"
        );
    }
}
