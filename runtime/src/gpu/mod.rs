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
//! [`Gpu`] checks every range against its buffer, pairs the machine with its own kind of
//! buffer or module, and dispatches; the machines do the work: `cuda.rs` (cuBLAS, the
//! stream's copies, launches, graphs and events) and `emu.rs` (host memory, g++ modules,
//! the CPU GEMM), as candle's storage dispatches to its cpu and cuda backends.
//!
//! [`attention`] runs moac's attention kernels on such buffers: the device-resident
//! runtime API, one layer ([`attention::LayerAttention`]) or all of an artifact's
//! ([`attention::DeviceAttention`]); the engine, the autotuner, `moac-gpu-bench` and the
//! cuda [`LayerBackend`](crate::backend::LayerBackend) all drive the kernels through it.

pub mod attention;
mod cuda;
mod emu;

pub use cuda::{cublas_version, GpuGraph};

use crate::artifact::UnitBinaries;
use crate::backend::cuda::CudaDevice;
use crate::backend::emu::{EmuModule, EmuOptions};
use crate::backend::Backend;
use crate::error::{Error, Result};
use cuda::CudaGpu;
use cudarc::driver::{CudaFunction, CudaModule, CudaSlice};
use emu::{EmuGpu, HostMem};
use moac::abi::ArgPack;
use moac::geometry::Dtype;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

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
}

/// A loaded translation unit with its entry points.
pub enum GpuModule {
    Emu(EmuModule),
    Cuda {
        _module: Arc<CudaModule>,
        functions: Vec<(String, CudaFunction)>,
        /// How the binary was obtained (`cubin sm_90`, `nvrtc sm_90`, ...).
        binary: String,
    },
}

impl GpuModule {
    /// How the module's binary was obtained: the artifact's CUBIN or PTX, NVRTC, or g++
    /// against the emulation header (emu).
    pub fn binary(&self) -> &str {
        match self {
            GpuModule::Emu(_) => "emu g++",
            GpuModule::Cuda { binary, .. } => binary,
        }
    }
}

/// A fill pattern of [`Gpu::fill_u16`] / [`Gpu::fill_f32`].
#[derive(Debug, Clone, Copy)]
enum Fill {
    U16(u16),
    U32(u32),
}

/// What [`Gpu::capture`] did.
pub enum Captured {
    /// The work was recorded into a graph (not run).
    Graph(GpuGraph),
    /// This machine has no graphs (emu): nothing was recorded or run.
    Unsupported,
}

enum Kind {
    Emu(EmuGpu),
    Cuda(CudaGpu),
}

/// The machine the engine runs on.
pub struct Gpu {
    kind: Kind,
    /// Modules loaded by [`Gpu::module_cached`], by unit name and source digest (two
    /// artifacts may name different sources alike: the autotuner's candidates do).
    modules: Mutex<HashMap<(String, String), Arc<GpuModule>>>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gpu({})", self.describe())
    }
}

/// The error of a buffer or module paired with a machine of the other kind.
fn other_machine(what: &str) -> Error {
    Error::Usage(format!("a {what} of another machine"))
}

impl Gpu {
    /// Opens the engine's machine: `emu`, or `cuda` (GPU 0 and cuBLAS, each missing one
    /// a clear error). `cpu` has no device buffers: the host runner serves it.
    pub fn open(backend: Backend, emu: EmuOptions) -> Result<Arc<Gpu>> {
        let kind = match backend {
            Backend::Emu => Kind::Emu(EmuGpu::new(emu)),
            Backend::Cuda => Kind::Cuda(CudaGpu::open()?),
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
        crate::backend::cuda::cuda_available()?;
        Ok(Arc::new(Gpu {
            kind: Kind::Cuda(CudaGpu::new(CudaDevice::on_stream(stream)?)?),
            modules: Mutex::new(HashMap::new()),
        }))
    }

    /// An opened CUDA device for kernels alone: buffers, copies, launches and timing on
    /// its stream, no cuBLAS (a [`Gpu::gemm`] is refused). What the attention backend,
    /// the autotuner and `moac-gpu-bench` need; the engine opens with [`Gpu::open`].
    pub fn kernels_only(dev: &Arc<CudaDevice>) -> Arc<Gpu> {
        Arc::new(Gpu {
            kind: Kind::Cuda(CudaGpu::without_blas(dev.clone())),
            modules: Mutex::new(HashMap::new()),
        })
    }

    /// [`Gpu::module`], loaded once per unit name and source and kept.
    pub fn module_cached(
        &self,
        name: &str,
        source: &str,
        entries: &[&str],
        binaries: Option<&UnitBinaries>,
    ) -> Result<Arc<GpuModule>> {
        let digest = moac::plan::hex(&<sha2::Sha256 as sha2::Digest>::digest(source.as_bytes()));
        let key = (name.to_string(), digest);
        let mut mods = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = mods.get(&key) {
            return Ok(m.clone());
        }
        let m = Arc::new(self.module_with(name, source, entries, binaries)?);
        mods.insert(key, m.clone());
        Ok(m)
    }

    pub fn backend(&self) -> Backend {
        match self.kind {
            Kind::Emu(_) => Backend::Emu,
            Kind::Cuda(_) => Backend::Cuda,
        }
    }

    /// The CUDA device, on cuda.
    pub fn cuda(&self) -> Option<&Arc<CudaDevice>> {
        match &self.kind {
            Kind::Cuda(c) => Some(c.device()),
            Kind::Emu(_) => None,
        }
    }

    /// `emu (CPU)` or the GPU's name and arch.
    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::Emu(_) => "emu (the CUDA source on the CPU)".into(),
            Kind::Cuda(c) => c.describe(),
        }
    }

    /// Free and total device memory in bytes (cuda); `None` on emu.
    pub fn memory(&self) -> Result<Option<(u64, u64)>> {
        match &self.kind {
            Kind::Emu(_) => Ok(None),
            Kind::Cuda(c) => c.memory().map(Some),
        }
    }

    /// A zeroed buffer of `bytes` bytes.
    pub fn alloc(&self, bytes: usize) -> Result<GpuBuf> {
        let mem = match &self.kind {
            Kind::Emu(_) => Mem::Host(HostMem::new(bytes)?),
            Kind::Cuda(c) => Mem::Cuda(c.alloc(bytes)?),
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
            (Kind::Cuda(c), Mem::Cuda(s)) => c.upload(s, off, src),
            (Kind::Emu(e), Mem::Host(h)) => {
                e.upload(h, off, src);
                Ok(())
            }
            _ => Err(other_machine("buffer")),
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
            (Kind::Cuda(c), Mem::Cuda(s)) => c.download(s, off, bytes_of_mut(&mut out))?,
            (Kind::Emu(e), Mem::Host(h)) => e.download(h, off, bytes_of_mut(&mut out)),
            _ => return Err(other_machine("buffer")),
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
            (Kind::Cuda(c), Mem::Cuda(d), Mem::Cuda(s)) => c.copy(d, dst_off, s, src_off, bytes),
            (Kind::Emu(e), Mem::Host(d), Mem::Host(s)) => {
                e.copy(d, dst_off, s, src_off, bytes);
                Ok(())
            }
            _ => Err(other_machine("buffer")),
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
            (Kind::Cuda(c), Mem::Cuda(s)) => c.move_row(s, to, from, row_bytes),
            (Kind::Emu(e), Mem::Host(h)) => {
                e.move_row(h, to, from, row_bytes);
                Ok(())
            }
            _ => Err(other_machine("buffer")),
        }
    }

    /// The address kernels see for `buf` (plus `offset` bytes).
    pub fn addr(&self, buf: &GpuBuf, offset: usize) -> u64 {
        let base = match (&self.kind, &buf.mem) {
            (Kind::Cuda(c), Mem::Cuda(s)) => c.addr(s),
            (_, Mem::Host(h)) => h.addr(),
            (Kind::Emu(_), Mem::Cuda(_)) => 0,
        };
        base + offset as u64
    }

    /// The address of a buffer kernels write (the same value as [`Gpu::addr`], taken
    /// from a mutable borrow so the borrow checker sees the write).
    pub fn addr_mut(&self, buf: &mut GpuBuf, offset: usize) -> u64 {
        let base = match (&self.kind, &mut buf.mem) {
            (Kind::Cuda(c), Mem::Cuda(s)) => c.addr_mut(s),
            (_, Mem::Host(h)) => h.addr(),
            (Kind::Emu(_), Mem::Cuda(_)) => 0,
        };
        base + offset as u64
    }

    /// Loads a translation unit with its entry points: NVRTC (through moac's compile
    /// cache) on cuda, g++ against the emulation header on emu.
    pub fn module(&self, name: &str, source: &str, entries: &[&str]) -> Result<GpuModule> {
        self.module_with(name, source, entries, None)
    }

    /// [`Gpu::module`], taking an artifact's CUBIN or PTX of the unit on cuda where one
    /// fits the GPU (NVRTC otherwise); emu always builds the source.
    pub fn module_with(
        &self,
        name: &str,
        source: &str,
        entries: &[&str],
        binaries: Option<&UnitBinaries>,
    ) -> Result<GpuModule> {
        match &self.kind {
            Kind::Emu(e) => e.module(source, entries),
            Kind::Cuda(c) => c.module(name, source, entries, binaries),
        }
    }

    /// Sets every 16-bit element of `buf` to `bits` (a NaN pattern poisons a buffer
    /// before a checked launch, so an element a kernel fails to write shows).
    pub fn fill_u16(&self, buf: &mut GpuBuf, bits: u16) -> Result<()> {
        let n = buf.bytes / 2;
        match (&self.kind, &mut buf.mem) {
            (Kind::Cuda(c), Mem::Cuda(s)) => c.fill(s, n, Fill::U16(bits)),
            (Kind::Emu(e), Mem::Host(h)) => {
                e.fill(h, &bits.to_ne_bytes());
                Ok(())
            }
            _ => Err(other_machine("buffer")),
        }
    }

    /// Sets every f32 element of `buf` to `x`.
    pub fn fill_f32(&self, buf: &mut GpuBuf, x: f32) -> Result<()> {
        let n = buf.bytes / 4;
        match (&self.kind, &mut buf.mem) {
            (Kind::Cuda(c), Mem::Cuda(s)) => c.fill(s, n, Fill::U32(x.to_bits())),
            (Kind::Emu(e), Mem::Host(h)) => {
                e.fill(h, &x.to_ne_bytes());
                Ok(())
            }
            _ => Err(other_machine("buffer")),
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
            (GpuModule::Cuda { functions, .. }, Kind::Cuda(c)) => {
                c.launch(functions, entry, grid, block, args)
            }
            _ => Err(other_machine("module")),
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
            Kind::Emu(e) => match (&mut y.mem, &x.mem, &w.mem) {
                (Mem::Host(ym), Mem::Host(xm), Mem::Host(wm)) => {
                    e.gemm(dtype, ym, y_off, xm, x_off, wm, w_off, (m, n, k), beta);
                    Ok(())
                }
                _ => Err(Error::Usage("emu buffer".into())),
            },
            Kind::Cuda(c) => {
                let dims = cuda::gemm_dims(m, n, k)?;
                let (xp, yp) = (self.addr(x, x_off * 2), self.addr_mut(y, y_off * 4));
                let wp = self.addr(w, w_off * 2);
                c.gemm(dtype, (yp, xp, wp), dims, beta)
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
        match &self.kind {
            Kind::Emu(_) => Ok(Captured::Unsupported),
            Kind::Cuda(c) => c.capture(f),
        }
    }

    /// Queues a captured graph.
    pub fn replay(&self, g: &GpuGraph) -> Result<()> {
        g.launch()
    }

    /// Waits for everything queued and reports a kernel's failure.
    pub fn synchronize(&self) -> Result<()> {
        match &self.kind {
            Kind::Emu(_) => Ok(()),
            Kind::Cuda(c) => c.synchronize(),
        }
    }

    /// Milliseconds `f` takes on the machine: CUDA events around its queued work on
    /// cuda, the wall clock on emu (where the work is done when `f` returns).
    pub fn time_ms<E: From<Error>>(&self, f: impl FnOnce() -> Result<(), E>) -> Result<f64, E> {
        match &self.kind {
            Kind::Emu(e) => e.time_ms(f),
            Kind::Cuda(c) => c.time_ms(f),
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
        let bits = |v: &[f32]| -> Vec<u16> { v.iter().map(|&x| Dtype::Bf16.to_bits(x)).collect() };
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
