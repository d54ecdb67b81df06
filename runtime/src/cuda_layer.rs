//! Runs one layer's generated kernels on an NVIDIA GPU through the CUDA driver API: the
//! same grids, arguments (packed by [`ArgPack`]) and buffer layouts as the `emu`
//! executor in `emu_layer.rs` (docs/kernel-abi.md). Every output buffer is poisoned
//! (NaN) on the device before a launch, exactly like emu.
//!
//! Binaries: for each translation unit, the CUBIN of the device's architecture
//! (`sm_{major}{minor}`) when the artifact carries one, else its PTX (JIT-compiled by
//! the driver), else the unit's source compiled with NVRTC for the device's
//! architecture (through moac's compile cache). [`CudaLayer::binary`] says which.
//!
//! cudarc panics when libcuda is missing, so [`CudaDevice::open`] checks
//! [`crate::cuda_available`] before any driver call; nothing else here creates a context.

use crate::args::{Arg, ArgPack};
use crate::artifact::UnitBinaries;
use crate::emu_layer::{nan_bits, HostCache};
use crate::error::{shape_err, Error, Result};
use crate::exec::{check_lens, check_steps};
use crate::layer::{bind_layer, BoundKernel, LayerShape};
use cudarc::driver::{
    result, sys, CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr,
    DriverError, ValidAsZeroBits,
};
use moac::emit::SourceUnit;
use moac::geometry::Dtype;
use moac::ir::{KernelSpec, LaunchConfig, LayerKernels, PrefillMode};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

fn drv(what: impl std::fmt::Display) -> impl FnOnce(DriverError) -> Error {
    move |e| Error::Backend(format!("cuda backend: {what}: {e}"))
}

/// How a translation unit's binary was obtained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BinarySource {
    /// The artifact's CUBIN for the device's architecture.
    Cubin(String),
    /// The artifact's PTX, JIT-compiled by the driver.
    PtxJit,
    /// The source, compiled with NVRTC for the device's architecture.
    Nvrtc(String),
}

impl std::fmt::Display for BinarySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BinarySource::Cubin(a) => write!(f, "cubin {a}"),
            BinarySource::PtxJit => write!(f, "ptx jit"),
            BinarySource::Nvrtc(a) => write!(f, "nvrtc {a}"),
        }
    }
}

/// A module image the driver can load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Image {
    Cubin(Vec<u8>),
    Ptx(String),
}

/// The binary of a unit the artifact already carries for `arch`: its CUBIN for exactly
/// that architecture, else its PTX; `None` means "compile the source with NVRTC".
pub fn choose_binary(arch: &str, bins: Option<&UnitBinaries>) -> Option<(BinarySource, Image)> {
    let bins = bins?;
    if let Some((a, cubin)) = bins.cubins.iter().find(|(a, _)| a == arch) {
        return Some((BinarySource::Cubin(a.clone()), Image::Cubin(cubin.clone())));
    }
    bins.ptx
        .as_ref()
        .map(|p| (BinarySource::PtxJit, Image::Ptx(p.clone())))
}

/// The architecture name of a compute capability: (9, 0) -> `sm_90`.
pub fn arch_name(major: i32, minor: i32) -> String {
    format!("sm_{major}{minor}")
}

/// Compiles one unit with NVRTC for `arch`, through moac's compile cache.
pub fn nvrtc_cubin(unit_name: &str, source: &str, arch: &str) -> Result<Vec<u8>> {
    let nv = moac::nvrtc::load()?;
    if moac::nvrtc::check_arch(arch).is_err() {
        return Err(Error::Backend(format!(
            "cuda backend: the GPU is {arch}, which NVRTC {} does not compile for ({}); compile an artifact with PTX instead",
            nv.version,
            moac::nvrtc::SUPPORTED_ARCHS.join(", ")
        )));
    }
    let options = moac::nvrtc::options(arch, &nv.include_dir);
    let key = moac::cache::key(source, &options, &nv.version, arch);
    let cache = moac::cache::Cache::new(moac::cache::Cache::default_root());
    if let Some(c) = cache.get(&key) {
        return Ok(c.cubin);
    }
    let c = moac::nvrtc::compile(nv, unit_name, source, arch, &options)?;
    // A cache that cannot be written only costs a recompile next time.
    let _ = cache.put(&key, &c);
    Ok(c.cubin)
}

/// A loaded `CUmodule`, unloaded on drop.
struct Module {
    raw: sys::CUmodule,
    ctx: Arc<CudaContext>,
}

// SAFETY: a CUmodule handle may be used from any thread of the process (the driver API
// is thread-safe); `ctx` is bound before every use.
unsafe impl Send for Module {}
// SAFETY: as above; the handle is never mutated after loading.
unsafe impl Sync for Module {}

impl Drop for Module {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: `raw` was loaded in `ctx` and is unloaded exactly once, here; every
            // function handle taken from it is held by a `Kernel` that holds this module.
            let _ = unsafe { result::module::unload(self.raw) };
        }
    }
}

/// A kernel handle of a [`Module`].
#[derive(Clone, Copy)]
struct Func(sys::CUfunction);
// SAFETY: a CUfunction handle is usable from any thread while its module is loaded.
unsafe impl Send for Func {}
// SAFETY: as above.
unsafe impl Sync for Func {}

/// The GPU (device 0): its context, the stream every launch goes to, and the modules
/// loaded so far (shared by every layer; keyed by the unit's source).
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// `sm_90` for compute capability 9.0.
    pub arch: String,
    pub name: String,
    modules: Mutex<HashMap<String, (Arc<Module>, BinarySource)>>,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaDevice({}, {})", self.name, self.arch)
    }
}

impl CudaDevice {
    /// Opens device 0; fails with one clear line where there is no driver or GPU.
    pub fn open() -> Result<Arc<CudaDevice>> {
        crate::cuda_available()?;
        let ctx = CudaContext::new(0).map_err(drv("cannot open GPU 0"))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(drv("cannot read the compute capability"))?;
        let name = ctx.name().unwrap_or_else(|_| "GPU 0".into());
        let stream = ctx.default_stream();
        Ok(Arc::new(CudaDevice {
            ctx,
            stream,
            arch: arch_name(major, minor),
            name,
            modules: Mutex::new(HashMap::new()),
        }))
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    fn attribute(&self, a: sys::CUdevice_attribute, what: &str) -> Result<u64> {
        let v = self
            .ctx
            .attribute(a)
            .map_err(drv(format_args!("cannot read the {what}")))?;
        Ok(v.max(0) as u64)
    }

    /// Streaming multiprocessors.
    pub fn sm_count(&self) -> Result<u32> {
        use sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT as SMS;
        Ok(self.attribute(SMS, "SM count")? as u32)
    }

    /// L2 cache size in bytes.
    pub fn l2_bytes(&self) -> Result<u64> {
        use sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE as L2;
        self.attribute(L2, "L2 size")
    }

    /// The driver's CUDA version, `13.0` for 13000.
    pub fn driver_version(&self) -> Result<String> {
        let mut v: std::ffi::c_int = 0;
        // SAFETY: cuDriverGetVersion writes one int through the pointer, which is valid
        // for the call; the driver library is loaded (the context exists).
        let rc = unsafe { sys::cuDriverGetVersion(&mut v) };
        if rc != sys::CUresult::CUDA_SUCCESS {
            return Err(Error::Backend(format!(
                "cuda: cannot read the driver version ({rc:?})"
            )));
        }
        Ok(format!("{}.{}", v / 1000, (v % 1000) / 10))
    }

    /// Runs `launch(i)` `warmup + repeats` times, each between two CUDA events on this
    /// stream, and returns the `repeats` times after the warm-up in microseconds.
    pub fn time_us(
        &self,
        warmup: usize,
        repeats: usize,
        mut launch: impl FnMut(usize) -> Result<()>,
    ) -> Result<Vec<f64>> {
        let ev = |e: cudarc::driver::DriverError| Error::Backend(format!("cuda events: {e}"));
        let flags = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = self.ctx.new_event(flags).map_err(ev)?;
        let end = self.ctx.new_event(flags).map_err(ev)?;
        let mut times = Vec::with_capacity(repeats);
        for i in 0..warmup + repeats {
            start.record(&self.stream).map_err(ev)?;
            launch(i)?;
            end.record(&self.stream).map_err(ev)?;
            self.synchronize()?;
            let ms = start.elapsed_ms(&end).map_err(ev)? as f64;
            if i >= warmup {
                times.push(ms * 1e3);
            }
        }
        Ok(times)
    }

    /// The stream every launch and copy of this backend uses.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Waits for all queued work and reports any error it raised.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(drv("kernel failed"))?;
        self.ctx.check_err().map_err(drv("kernel failed"))
    }

    /// A zeroed device buffer of `len` elements (at least one is allocated).
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros::<T>(len.max(1))
            .map_err(drv(format_args!("cannot allocate {len} elements")))
    }

    /// Copies a host buffer to a new device buffer (at least one element is allocated).
    pub fn upload<T: DeviceRepr + ValidAsZeroBits>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        let mut d = self.zeros::<T>(host.len())?;
        if !host.is_empty() {
            self.stream
                .memcpy_htod(host, &mut d)
                .map_err(drv("copy to the GPU"))?;
        }
        Ok(d)
    }

    /// Copies the first `len` elements of a device buffer back, after all queued work.
    pub fn download<T: DeviceRepr + Default + Clone>(
        &self,
        d: &CudaSlice<T>,
        len: usize,
    ) -> Result<Vec<T>> {
        if len > d.len() {
            return shape_err(format!(
                "cuda: cannot read {len} elements of a {}-element buffer",
                d.len()
            ));
        }
        let mut out = vec![T::default(); len];
        if len > 0 {
            self.stream
                .memcpy_dtoh(&d.slice(0..len), out.as_mut_slice())
                .map_err(drv("copy from the GPU"))?;
        }
        self.synchronize()?;
        Ok(out)
    }

    /// Fills a u16 buffer with `bits` (NaN poisoning).
    fn fill16(&self, d: &mut CudaSlice<u16>, bits: u16) -> Result<()> {
        let n = d.len();
        self.ctx.bind_to_thread().map_err(drv("bind context"))?;
        let (p, _g) = d.device_ptr_mut(&self.stream);
        // SAFETY: `p` is a live allocation of `n` u16 values in this context; the memset is
        // queued on the stream every other use of the buffer goes through.
        unsafe { sys::cuMemsetD16Async(p, bits, n, self.stream.cu_stream()) }
            .result()
            .map_err(drv("memset"))
    }

    /// Fills an f32 buffer with `x` (NaN poisoning).
    fn fill32(&self, d: &mut CudaSlice<f32>, x: f32) -> Result<()> {
        let n = d.len();
        self.ctx.bind_to_thread().map_err(drv("bind context"))?;
        let (p, _g) = d.device_ptr_mut(&self.stream);
        // SAFETY: `p` is a live allocation of `n` f32 values in this context, queued on
        // the one stream.
        unsafe { sys::cuMemsetD32Async(p, x.to_bits(), n, self.stream.cu_stream()) }
            .result()
            .map_err(drv("memset"))
    }

    /// The module of one translation unit: loaded once per process and source.
    fn module(
        &self,
        unit_name: &str,
        source: &str,
        bins: Option<&UnitBinaries>,
    ) -> Result<(Arc<Module>, BinarySource)> {
        let key = moac::plan::hex(&<sha2::Sha256 as sha2::Digest>::digest(source.as_bytes()));
        let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((m, src)) = modules.get(&key) {
            return Ok((m.clone(), src.clone()));
        }
        let (src, image) = match choose_binary(&self.arch, bins) {
            Some(x) => x,
            None => (
                BinarySource::Nvrtc(self.arch.clone()),
                Image::Cubin(nvrtc_cubin(unit_name, source, &self.arch)?),
            ),
        };
        let raw = self.load_image(&image, unit_name, &src)?;
        let m = Arc::new(Module {
            raw,
            ctx: self.ctx.clone(),
        });
        modules.insert(key, (m.clone(), src.clone()));
        Ok((m, src))
    }

    fn load_image(&self, image: &Image, unit: &str, src: &BinarySource) -> Result<sys::CUmodule> {
        self.ctx.bind_to_thread().map_err(drv("bind context"))?;
        let what = format!("loading {unit} ({src})");
        match image {
            Image::Cubin(bytes) => {
                // An ELF header is 64 bytes; anything shorter or not ELF is refused before
                // the driver parses it.
                if bytes.len() < 64 || !bytes.starts_with(b"\x7fELF") {
                    return Err(Error::Backend(format!("cuda backend: {what}: not a CUBIN")));
                }
                // SAFETY: `bytes` is a complete ELF image (checked above; it came from
                // NVRTC or an artifact's manifest) that outlives the call; the driver
                // copies what it needs.
                unsafe { result::module::load_data(bytes.as_ptr().cast()) }.map_err(drv(what))
            }
            Image::Ptx(text) => {
                let c = std::ffi::CString::new(text.as_str()).map_err(|_| {
                    Error::Backend(format!("cuda backend: {what}: the PTX has a NUL byte"))
                })?;
                // SAFETY: `c` is a NUL-terminated PTX text that outlives the call.
                unsafe { result::module::load_data(c.as_ptr().cast()) }.map_err(drv(what))
            }
        }
    }
}

/// One layer's compacted cache on the GPU: K and V `[B, total_slots, D]` as raw bits.
pub struct DeviceCache {
    pub batch: usize,
    pub k: CudaSlice<u16>,
    pub v: CudaSlice<u16>,
}

/// Per-row token counts on the GPU, checked against the layer's N when made.
pub struct DeviceLens {
    host: Vec<i32>,
    dev: CudaSlice<i32>,
}

impl DeviceLens {
    pub fn as_slice(&self) -> &[i32] {
        &self.host
    }
}

/// Buffers of one decode launch (split partials and the merged output) for `batch` rows.
pub struct DecodeScratch {
    pub batch: usize,
    pub nsplit: usize,
    part_o: CudaSlice<f32>,
    part_lse: CudaSlice<f32>,
    /// [B, Hq, D] raw bits.
    pub out: CudaSlice<u16>,
}

struct Kernel {
    bound: BoundKernel,
    func: Func,
    _module: Arc<Module>,
}

/// A layer's kernels, loaded on the GPU.
pub struct CudaLayer {
    pub shape: LayerShape,
    pub dtype: Dtype,
    /// How the kernels' binaries were obtained (`cubin sm_90`, `ptx jit`,
    /// `nvrtc sm_90`; several, comma-separated, if the units differ).
    pub binary: String,
    dev: Arc<CudaDevice>,
    kernels: BTreeMap<&'static str, Kernel>,
}

impl CudaLayer {
    /// Loads one layer's kernels from the translation units that define them;
    /// `binaries` are the artifact's binaries of the same units (may be empty).
    pub fn new(
        dev: &Arc<CudaDevice>,
        shape: LayerShape,
        dtype: Dtype,
        layer: &LayerKernels,
        specs: &[KernelSpec],
        units: &[SourceUnit],
        binaries: &[UnitBinaries],
    ) -> Result<CudaLayer> {
        let mut kernels = BTreeMap::new();
        let mut sources: Vec<String> = Vec::new();
        for k in bind_layer(layer, specs, units)? {
            let u = &units[k.unit];
            let (module, src) = dev.module(&u.name, &u.source, binaries.get(k.unit))?;
            let src = src.to_string();
            if !sources.contains(&src) {
                sources.push(src);
            }
            let cname = std::ffi::CString::new(u.name.as_str())
                .map_err(|_| Error::Backend(format!("bad entry name {:?}", u.name)))?;
            dev.ctx.bind_to_thread().map_err(drv("bind context"))?;
            // SAFETY: `module.raw` is a loaded module of this context, alive while `module`.
            let func = unsafe { result::module::get_function(module.raw, cname) }
                .map_err(drv(format_args!("entry {} is not in its module", u.name)))?;
            kernels.insert(
                k.role,
                Kernel {
                    bound: k,
                    func: Func(func),
                    _module: module,
                },
            );
        }
        Ok(CudaLayer {
            shape,
            dtype,
            binary: sources.join(", "),
            dev: dev.clone(),
            kernels,
        })
    }

    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    fn kernel(&self, role: &str) -> Result<&Kernel> {
        self.kernels
            .get(role)
            .ok_or_else(|| Error::Backend(format!("cuda backend: no {role} kernel")))
    }

    /// Launches `role` with arguments packed by [`ArgPack`] (the ABI order and types).
    /// Callers guarantee every pointer argument is a live device buffer of the size the
    /// ABI requires for this grid and shape.
    fn run(&self, role: &str, grid: (u32, u32, u32), threads: u32, args: &[Arg]) -> Result<()> {
        let k = self.kernel(role)?;
        let mut pack = ArgPack::new(&k.bound.name, k.bound.kind, &k.bound.with_slot(args))?;
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        let n = pack.slots().len();
        let params = pack.as_params();
        // SAFETY: `params` points at `n` slot addresses owned by `pack`, which lives (and
        // is not resized) until the end of this function.
        let params = unsafe { std::slice::from_raw_parts_mut(params, n) };
        self.dev.ctx.bind_to_thread().map_err(drv("bind context"))?;
        // SAFETY: `k.func` belongs to a module kept loaded by `k`; the parameters match the
        // kernel's signature (count, order and types checked by `ArgPack` against the
        // ABI); every pointer is a live device allocation of this context, sized for this
        // grid by the caller; the driver copies the parameter values before returning.
        unsafe {
            result::launch_kernel(
                k.func.0,
                grid,
                (threads, 1, 1),
                0,
                self.dev.stream.cu_stream(),
                params,
            )
        }
        .map_err(drv(format_args!("launching {}", k.bound.name)))
    }

    fn launch(&self, role: &str) -> Result<LaunchConfig> {
        Ok(self.kernel(role)?.bound.launch)
    }

    fn cache_elems(&self, batch: usize) -> usize {
        batch * self.shape.total_slots * self.shape.head_dim
    }

    /// Splits of the decode kernel (`ceil(max C_kv / chunk)`).
    pub fn nsplit(&self) -> Result<usize> {
        Ok(self.shape.decode_splits(&self.launch("decode")?))
    }

    /// A new host cache for `batch` rows, poisoned with NaN (as emu's).
    pub fn new_cache(&self, batch: usize) -> HostCache {
        let n = self.cache_elems(batch);
        HostCache {
            batch,
            k: vec![nan_bits(self.dtype); n],
            v: vec![nan_bits(self.dtype); n],
        }
    }

    /// A new device cache for `batch` rows, poisoned with NaN.
    pub fn new_device_cache(&self, batch: usize) -> Result<DeviceCache> {
        let n = self.cache_elems(batch);
        let mut k = self.dev.zeros::<u16>(n)?;
        let mut v = self.dev.zeros::<u16>(n)?;
        self.dev.fill16(&mut k, nan_bits(self.dtype))?;
        self.dev.fill16(&mut v, nan_bits(self.dtype))?;
        Ok(DeviceCache { batch, k, v })
    }

    /// Copies a host cache to the GPU.
    pub fn cache_from_host(&self, c: &HostCache) -> Result<DeviceCache> {
        let n = self.cache_elems(c.batch);
        if c.k.len() != n || c.v.len() != n {
            return shape_err("cuda: the host cache does not match the layer's shape");
        }
        Ok(DeviceCache {
            batch: c.batch,
            k: self.dev.upload(&c.k)?,
            v: self.dev.upload(&c.v)?,
        })
    }

    /// Copies a device cache back to the host.
    pub fn cache_to_host(&self, c: &DeviceCache) -> Result<HostCache> {
        let n = self.cache_elems(c.batch);
        Ok(HostCache {
            batch: c.batch,
            k: self.dev.download(&c.k, n)?,
            v: self.dev.download(&c.v, n)?,
        })
    }

    fn check_cache(&self, c: &DeviceCache, b: usize) -> Result<()> {
        let n = self.cache_elems(b);
        if c.batch != b || c.k.len() < n || c.v.len() < n {
            return shape_err("cuda: the device cache does not match the batch and the layer");
        }
        Ok(())
    }

    /// Prompt lengths (each <= P and <= N), uploaded once.
    pub fn prompt_lens(&self, prompt_lens: &[i32], p: usize) -> Result<DeviceLens> {
        check_lens(&self.shape, prompt_lens, p)?;
        Ok(DeviceLens {
            host: prompt_lens.to_vec(),
            dev: self.dev.upload(prompt_lens)?,
        })
    }

    fn check_prompt_bufs(&self, q: usize, k: usize, v: usize, b: usize, p: usize) -> Result<()> {
        let s = &self.shape;
        if q < b * p * s.num_query_heads * s.head_dim
            || k < b * p * s.num_kv_heads * s.head_dim
            || v < k.min(b * p * s.num_kv_heads * s.head_dim)
        {
            return shape_err("prefill: q, k, v must hold [B,P,Hq,D] and [B,P,Hkv,D]");
        }
        Ok(())
    }

    /// Token counts after a step (1..=N each), uploaded once.
    pub fn seq_lens(&self, seq_lens: &[i32]) -> Result<DeviceLens> {
        check_steps(&self.shape, seq_lens)?;
        Ok(DeviceLens {
            host: seq_lens.to_vec(),
            dev: self.dev.upload(seq_lens)?,
        })
    }

    /// Sparse prefill attention: `q` [B,P,Hq,D], `k`/`v` [B,P,Hkv,D]; returns o [B,P,Hq,D].
    #[allow(clippy::too_many_arguments)]
    pub fn prefill(
        &self,
        q: &[u16],
        k: &[u16],
        v: &[u16],
        prompt_lens: &[i32],
        p: usize,
        mode: PrefillMode,
        scale: f32,
    ) -> Result<Vec<u16>> {
        self.check_prompt(q.len(), k.len(), v.len(), prompt_lens, p)?;
        let (qd, kd, vd) = (
            self.dev.upload(q)?,
            self.dev.upload(k)?,
            self.dev.upload(v)?,
        );
        let ld = self.prompt_lens(prompt_lens, p)?;
        let o = self.prefill_dev(&qd, &kd, &vd, &ld, p, mode, scale)?;
        self.dev.download(&o, q.len())
    }

    /// Prefill attention and the cache fill from one upload of the prompt: returns o.
    #[allow(clippy::too_many_arguments)]
    pub fn prefill_and_fill(
        &self,
        cache: &mut DeviceCache,
        q: &[u16],
        k: &[u16],
        v: &[u16],
        prompt_lens: &[i32],
        p: usize,
        mode: PrefillMode,
        scale: f32,
    ) -> Result<Vec<u16>> {
        self.check_prompt(q.len(), k.len(), v.len(), prompt_lens, p)?;
        self.check_cache(cache, prompt_lens.len())?;
        let (qd, kd, vd) = (
            self.dev.upload(q)?,
            self.dev.upload(k)?,
            self.dev.upload(v)?,
        );
        let ld = self.prompt_lens(prompt_lens, p)?;
        let o = self.prefill_dev(&qd, &kd, &vd, &ld, p, mode, scale)?;
        self.fill_dev(cache, &kd, &vd, &ld, p)?;
        self.dev.download(&o, q.len())
    }

    fn check_prompt(
        &self,
        q: usize,
        k: usize,
        v: usize,
        prompt_lens: &[i32],
        p: usize,
    ) -> Result<()> {
        let s = &self.shape;
        let b = prompt_lens.len();
        if q != b * p * s.num_query_heads * s.head_dim
            || k != b * p * s.num_kv_heads * s.head_dim
            || v != k
        {
            return shape_err("prefill: buffer sizes do not match [B,P,H,D]");
        }
        check_lens(s, prompt_lens, p)
    }

    /// Prefill attention on device buffers (see [`CudaLayer::prefill`]); returns o.
    #[allow(clippy::too_many_arguments)]
    pub fn prefill_dev(
        &self,
        q: &CudaSlice<u16>,
        k: &CudaSlice<u16>,
        v: &CudaSlice<u16>,
        lens: &DeviceLens,
        p: usize,
        mode: PrefillMode,
        scale: f32,
    ) -> Result<CudaSlice<u16>> {
        let s = &self.shape;
        let b = lens.host.len();
        let mut o = self
            .dev
            .zeros::<u16>(b * p * s.num_query_heads * s.head_dim)?;
        self.dev.fill16(&mut o, nan_bits(self.dtype))?;
        self.prefill_into(&mut o, q, k, v, lens, p, mode, scale)?;
        Ok(o)
    }

    /// Prefill attention into an output buffer `o` [B,P,Hq,D] the caller owns (rows past
    /// a prompt are written as zeros).
    #[allow(clippy::too_many_arguments)]
    pub fn prefill_into(
        &self,
        o: &mut CudaSlice<u16>,
        q: &CudaSlice<u16>,
        k: &CudaSlice<u16>,
        v: &CudaSlice<u16>,
        lens: &DeviceLens,
        p: usize,
        mode: PrefillMode,
        scale: f32,
    ) -> Result<()> {
        let s = &self.shape;
        let b = lens.host.len();
        self.check_prompt_bufs(q.len(), k.len(), v.len(), b, p)?;
        if o.len() < b * p * s.num_query_heads * s.head_dim {
            return shape_err("prefill: o must hold [B,P,Hq,D]");
        }
        let lens = &lens.dev;
        let role = match mode {
            PrefillMode::Block64 => "prefill_block64",
            PrefillMode::Token => "prefill_token",
        };
        let lc = self.launch(role)?;
        let grid = s.prefill_grid(&lc, p, b);
        let st = &self.dev.stream;
        let (qp, _g1) = q.device_ptr(st);
        let (kp, _g2) = k.device_ptr(st);
        let (vp, _g3) = v.device_ptr(st);
        let (lp, _g4) = lens.device_ptr(st);
        let (op, _g5) = o.device_ptr_mut(st);
        let args = s.prefill_args([qp, kp, vp, op, lp], p, scale);
        self.run(role, grid, lc.threads, &args)
    }

    /// Fills a host cache from a prompt (copied in, filled on the GPU, copied back).
    pub fn fill(
        &self,
        cache: &mut HostCache,
        k: &[u16],
        v: &[u16],
        prompt_lens: &[i32],
        p: usize,
    ) -> Result<()> {
        let mut dc = self.cache_from_host(cache)?;
        self.fill_device(&mut dc, k, v, prompt_lens, p)?;
        *cache = self.cache_to_host(&dc)?;
        Ok(())
    }

    /// Fills a device cache from a prompt on the host.
    pub fn fill_device(
        &self,
        cache: &mut DeviceCache,
        k: &[u16],
        v: &[u16],
        prompt_lens: &[i32],
        p: usize,
    ) -> Result<()> {
        let s = &self.shape;
        let b = prompt_lens.len();
        if b != cache.batch || k.len() != b * p * s.num_kv_heads * s.head_dim || v.len() != k.len()
        {
            return shape_err("fill: buffer sizes do not match [B,P,Hkv,D] and the cache");
        }
        check_lens(s, prompt_lens, p)?;
        self.check_cache(cache, b)?;
        let (kd, vd) = (self.dev.upload(k)?, self.dev.upload(v)?);
        let ld = self.prompt_lens(prompt_lens, p)?;
        self.fill_dev(cache, &kd, &vd, &ld, p)
    }

    /// The cache fill on device buffers (see [`CudaLayer::fill_device`]).
    pub fn fill_dev(
        &self,
        cache: &mut DeviceCache,
        k: &CudaSlice<u16>,
        v: &CudaSlice<u16>,
        lens: &DeviceLens,
        p: usize,
    ) -> Result<()> {
        let s = &self.shape;
        let b = lens.host.len();
        self.check_cache(cache, b)?;
        let kv = b * p * s.num_kv_heads * s.head_dim;
        if k.len() < kv || v.len() < kv {
            return shape_err("fill: k and v must hold [B,P,Hkv,D]");
        }
        let lens = &lens.dev;
        let lc = self.launch("fill")?;
        let grid = s.fill_grid(&lc, b);
        let st = &self.dev.stream;
        let (kp, _g1) = k.device_ptr(st);
        let (vp, _g2) = v.device_ptr(st);
        let (lp, _g3) = lens.device_ptr(st);
        let (kc, _g4) = cache.k.device_ptr_mut(st);
        let (vc, _g5) = cache.v.device_ptr_mut(st);
        let args = s.fill_args([kp, vp, kc, vc, lp], p, b);
        self.run("fill", grid, lc.threads, &args)
    }

    /// Appends one token per row to a host cache (`seq_lens`: tokens held after it).
    pub fn append(
        &self,
        cache: &mut HostCache,
        k_new: &[u16],
        v_new: &[u16],
        seq_lens: &[i32],
    ) -> Result<()> {
        let mut dc = self.cache_from_host(cache)?;
        self.append_device(&mut dc, k_new, v_new, seq_lens)?;
        *cache = self.cache_to_host(&dc)?;
        Ok(())
    }

    /// Appends one token per row to a device cache.
    pub fn append_device(
        &self,
        cache: &mut DeviceCache,
        k_new: &[u16],
        v_new: &[u16],
        seq_lens: &[i32],
    ) -> Result<()> {
        let s = &self.shape;
        let b = seq_lens.len();
        if b != cache.batch
            || k_new.len() != b * s.num_kv_heads * s.head_dim
            || v_new.len() != k_new.len()
        {
            return shape_err("append: buffer sizes do not match [B,Hkv,D] and the cache");
        }
        let lens = self.seq_lens(seq_lens)?;
        let (kd, vd) = (self.dev.upload(k_new)?, self.dev.upload(v_new)?);
        self.append_dev(cache, &kd, &vd, &lens)
    }

    /// The append on device buffers: `k_new`/`v_new` [B,Hkv,D], `lens` after the append.
    pub fn append_dev(
        &self,
        cache: &mut DeviceCache,
        kd: &CudaSlice<u16>,
        vd: &CudaSlice<u16>,
        lens: &DeviceLens,
    ) -> Result<()> {
        let s = &self.shape;
        let b = lens.host.len();
        self.check_cache(cache, b)?;
        if kd.len() < b * s.num_kv_heads * s.head_dim || vd.len() < kd.len() {
            return shape_err("append: buffer sizes do not match [B,Hkv,D]");
        }
        let lc = self.launch("append")?;
        let st = &self.dev.stream;
        let (kp, _g1) = kd.device_ptr(st);
        let (vp, _g2) = vd.device_ptr(st);
        let (lp, _g3) = lens.dev.device_ptr(st);
        let (kc, _g4) = cache.k.device_ptr_mut(st);
        let (vc, _g5) = cache.v.device_ptr_mut(st);
        let args = s.append_args([kp, vp, kc, vc, lp], b);
        self.run("append", s.append_grid(b), lc.threads, &args)
    }

    /// Decode attention over a host cache: `q` [B,Hq,D] -> o [B,Hq,D].
    pub fn decode(
        &self,
        cache: &HostCache,
        q: &[u16],
        seq_lens: &[i32],
        scale: f32,
    ) -> Result<Vec<u16>> {
        let dc = self.cache_from_host(cache)?;
        self.decode_device(&dc, q, seq_lens, scale)
    }

    /// Decode attention over a device cache: `q` [B,Hq,D] (host) -> o [B,Hq,D] (host).
    pub fn decode_device(
        &self,
        cache: &DeviceCache,
        q: &[u16],
        seq_lens: &[i32],
        scale: f32,
    ) -> Result<Vec<u16>> {
        let s = &self.shape;
        let b = seq_lens.len();
        if b != cache.batch || q.len() != b * s.num_query_heads * s.head_dim {
            return shape_err("decode: buffer sizes do not match [B,Hq,D] and the cache");
        }
        let lens = self.seq_lens(seq_lens)?;
        let qd = self.dev.upload(q)?;
        let mut scratch = self.decode_scratch(b)?;
        self.launch_decode(cache, &qd, &lens, &mut scratch, scale, true)?;
        self.dev.download(&scratch.out, q.len())
    }

    /// Buffers for decode launches of `batch` rows.
    pub fn decode_scratch(&self, batch: usize) -> Result<DecodeScratch> {
        let s = &self.shape;
        let nsplit = self.nsplit()?;
        Ok(DecodeScratch {
            batch,
            nsplit,
            part_o: self
                .dev
                .zeros::<f32>(batch * s.num_query_heads * nsplit * s.head_dim)?,
            part_lse: self.dev.zeros::<f32>(batch * s.num_query_heads * nsplit)?,
            out: self
                .dev
                .zeros::<u16>(batch * s.num_query_heads * s.head_dim)?,
        })
    }

    /// Queues the decode (split-KV) and merge kernels; nothing is copied and nothing
    /// waited for. `poison` NaN-fills the outputs first (as every checked path does);
    /// the benchmark turns it off to time the kernels alone.
    pub fn launch_decode(
        &self,
        cache: &DeviceCache,
        q: &CudaSlice<u16>,
        seq_lens: &DeviceLens,
        scratch: &mut DecodeScratch,
        scale: f32,
        poison: bool,
    ) -> Result<()> {
        let s = &self.shape;
        let b = seq_lens.host.len();
        self.check_cache(cache, b)?;
        let nsplit = self.nsplit()?;
        if scratch.batch != b
            || scratch.nsplit != nsplit
            || q.len() < b * s.num_query_heads * s.head_dim
        {
            return shape_err("decode: q or the scratch buffers do not match the batch");
        }
        if poison {
            self.dev.fill32(&mut scratch.part_o, f32::NAN)?;
            self.dev.fill32(&mut scratch.part_lse, f32::NAN)?;
            self.dev.fill16(&mut scratch.out, nan_bits(self.dtype))?;
        }
        let lc = self.launch("decode")?;
        let st = &self.dev.stream;
        {
            let (qp, _g1) = q.device_ptr(st);
            let (kc, _g2) = cache.k.device_ptr(st);
            let (vc, _g3) = cache.v.device_ptr(st);
            let (lp, _g4) = seq_lens.dev.device_ptr(st);
            let (po, _g5) = scratch.part_o.device_ptr_mut(st);
            let (pl, _g6) = scratch.part_lse.device_ptr_mut(st);
            let args = s.decode_args([qp, kc, vc, lp, po, pl], b, nsplit, scale);
            self.run("decode", s.decode_grid(&lc, nsplit, b), lc.threads, &args)?;
        }
        let ml = self.launch("merge")?;
        let (po, _g1) = scratch.part_o.device_ptr(st);
        let (pl, _g2) = scratch.part_lse.device_ptr(st);
        let (op, _g3) = scratch.out.device_ptr_mut(st);
        let args = s.merge_args([po, pl, op], b, nsplit);
        self.run("merge", s.merge_grid(b), ml.threads, &args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_device_cubin_then_ptx_then_nvrtc() {
        let bins = UnitBinaries {
            cubins: vec![
                ("sm_80".into(), vec![1, 2, 3]),
                ("sm_90".into(), vec![4, 5, 6]),
            ],
            ptx: Some("//ptx".into()),
        };
        assert_eq!(
            choose_binary("sm_90", Some(&bins)),
            Some((
                BinarySource::Cubin("sm_90".into()),
                Image::Cubin(vec![4, 5, 6])
            ))
        );
        assert_eq!(
            choose_binary("sm_89", Some(&bins)),
            Some((BinarySource::PtxJit, Image::Ptx("//ptx".into())))
        );
        let no_ptx = UnitBinaries { ptx: None, ..bins };
        assert_eq!(choose_binary("sm_100", Some(&no_ptx)), None);
        assert_eq!(choose_binary("sm_90", None), None);
        assert_eq!(choose_binary("sm_90", Some(&UnitBinaries::default())), None);
        assert_eq!(arch_name(9, 0), "sm_90");
        assert_eq!(arch_name(12, 0), "sm_120");
        assert_eq!(
            BinarySource::Nvrtc("sm_90".into()).to_string(),
            "nvrtc sm_90"
        );
    }
}

#[cfg(test)]
mod nvrtc_tests {
    use super::*;

    /// The NVRTC fallback yields a CUBIN the loader accepts (an ELF image); skipped where
    /// NVRTC is not installed unless MOAC_REQUIRE_NVRTC is set. Needs no GPU.
    #[test]
    fn nvrtc_fallback_builds_an_elf_cubin() {
        if moac::nvrtc::load().is_err() {
            assert!(
                std::env::var_os("MOAC_REQUIRE_NVRTC").is_none(),
                "NVRTC is required"
            );
            eprintln!("skipped: no NVRTC");
            return;
        }
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples/plans/meta-llama--Llama-3.2-1B-Instruct");
        let plan = moac::plan::load(
            &dir.join("moa_alpha_beta.json"),
            Some(&dir.join("config.json")),
        )
        .expect("example plan");
        let art = crate::Artifact::from_plan(&plan, Dtype::F16, Some(vec![0])).expect("lower");
        let unit = art
            .units
            .iter()
            .min_by_key(|u| u.source.len())
            .expect("a unit");
        let cubin = nvrtc_cubin(&unit.name, &unit.source, "sm_90").expect("nvrtc");
        assert!(cubin.len() >= 64 && cubin.starts_with(b"\x7fELF"));
        let err = nvrtc_cubin(&unit.name, &unit.source, "sm_70").unwrap_err();
        assert!(err.to_string().contains("sm_70"), "{err}");
    }
}
