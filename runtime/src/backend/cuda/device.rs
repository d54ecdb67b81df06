//! The GPU: its context, the one stream every launch and copy goes to, device buffers,
//! the modules loaded so far, and the timing harness every measurement uses.
//!
//! cudarc panics when libcuda is missing, so [`CudaDevice::open`] checks
//! [`cuda_available`] before any driver call; nothing else creates a context.

use super::module::{self, BinarySource, Image};
use crate::artifact::UnitBinaries;
use crate::error::{Error, Result};
use cudarc::driver::{
    sys, CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtrMut, DeviceRepr,
    ValidAsZeroBits,
};
use moac::abi::ArgPack;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

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

/// GPU 0, opened.
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// `sm_90` for compute capability 9.0.
    arch: String,
    name: String,
    /// Loaded modules by a hash of the unit's source, with where the binary came from.
    modules: Mutex<HashMap<String, (Arc<CudaModule>, BinarySource)>>,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaDevice({}, {})", self.name, self.arch)
    }
}

impl CudaDevice {
    /// Opens device 0; fails with one clear line where there is no driver or GPU.
    pub fn open() -> Result<Arc<CudaDevice>> {
        cuda_available()?;
        let ctx = CudaContext::new(0).map_err(Error::driver("cannot open GPU 0"))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(Error::driver("cannot read the compute capability"))?;
        let name = ctx.name().unwrap_or_else(|_| "GPU 0".into());
        let stream = ctx.default_stream();
        Ok(Arc::new(CudaDevice {
            ctx,
            stream,
            arch: module::arch_name(major, minor),
            name,
            modules: Mutex::new(HashMap::new()),
        }))
    }

    /// The device of a stream the caller owns (say, the one its own engine or candle
    /// runs on): every launch and copy of moac then goes to that stream, ordered with
    /// the caller's work. The CUDA driver must be present (the stream proves it).
    pub fn on_stream(stream: Arc<CudaStream>) -> Result<Arc<CudaDevice>> {
        let ctx = stream.context().clone();
        let (major, minor) = ctx
            .compute_capability()
            .map_err(Error::driver("cannot read the compute capability"))?;
        let name = ctx.name().unwrap_or_else(|_| "GPU".into());
        Ok(Arc::new(CudaDevice {
            ctx,
            stream,
            arch: module::arch_name(major, minor),
            name,
            modules: Mutex::new(HashMap::new()),
        }))
    }

    /// `sm_90` for compute capability 9.0.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// The device's name as the driver gives it.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every launch and copy of this backend uses.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    fn attribute(&self, a: sys::CUdevice_attribute, what: &str) -> Result<u64> {
        let v = self
            .ctx
            .attribute(a)
            .map_err(Error::driver(format_args!("cannot read the {what}")))?;
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
        unsafe { sys::cuDriverGetVersion(&mut v) }
            .result()
            .map_err(Error::driver("cannot read the driver version"))?;
        Ok(format!("{}.{}", v / 1000, (v % 1000) / 10))
    }

    /// The one timing harness of moac (`moac tune`, `moac-gpu-bench`): runs
    /// `before(i)` (outside the timed region: an L2 flush, say), then `launch(i)` between
    /// two CUDA events on this stream, `warmup + repeats` times; returns the `repeats`
    /// times after the warm-up, in microseconds.
    pub fn time_us<E: From<Error>>(
        &self,
        warmup: usize,
        repeats: usize,
        mut before: impl FnMut(usize) -> Result<(), E>,
        mut launch: impl FnMut(usize) -> Result<(), E>,
    ) -> Result<Vec<f64>, E> {
        let flags = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = self.ctx.new_event(flags).map_err(Error::driver("event"))?;
        let end = self.ctx.new_event(flags).map_err(Error::driver("event"))?;
        let mut times = Vec::with_capacity(repeats);
        for i in 0..warmup + repeats {
            before(i)?;
            start
                .record(&self.stream)
                .map_err(Error::driver("event record"))?;
            launch(i)?;
            end.record(&self.stream)
                .map_err(Error::driver("event record"))?;
            self.synchronize()?;
            let ms = start
                .elapsed_ms(&end)
                .map_err(Error::driver("event time"))? as f64;
            if i >= warmup {
                times.push(ms * 1e3);
            }
        }
        Ok(times)
    }

    /// Queues `func` over `grid` x `block` on this device's stream with packed
    /// arguments (`what` names it in errors). Callers guarantee every pointer argument
    /// is a live device buffer of this context, sized for the kernel's reads and writes.
    pub fn launch(
        &self,
        func: &CudaFunction,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        args: &mut ArgPack,
        what: &str,
    ) -> Result<()> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        let n = args.slots().len();
        let params = args.as_params();
        // SAFETY: `params` points at `n` slot addresses owned by `args`, which lives (and
        // is not resized) for this call.
        let params = unsafe { std::slice::from_raw_parts_mut(params, n) };
        self.ctx
            .bind_to_thread()
            .map_err(Error::driver("bind context"))?;
        // SAFETY: `func` belongs to a module `func` keeps loaded; the parameters match the
        // kernel's signature (count, order and types checked by `ArgPack` against its
        // table); the caller guarantees the buffers; the driver copies the parameter
        // values before returning.
        unsafe {
            cudarc::driver::result::launch_kernel(
                func.cu_function(),
                grid,
                block,
                0,
                self.stream.cu_stream(),
                params,
            )
        }
        .map_err(Error::driver(format_args!("launching {what}")))
    }

    /// Waits for all queued work and reports any error it raised.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(Error::driver("kernel failed"))?;
        self.ctx.check_err().map_err(Error::driver("kernel failed"))
    }

    /// A zeroed device buffer of `len` elements (at least one is allocated).
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        self.stream.alloc_zeros::<T>(len.max(1)).map_err(|e| {
            if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
                Error::OutOfMemory {
                    what: "a cuda device buffer".into(),
                    bytes: (len.max(1) as u64).saturating_mul(std::mem::size_of::<T>() as u64),
                }
            } else {
                Error::driver(format_args!("cannot allocate {len} elements"))(e)
            }
        })
    }

    /// Copies a host buffer to a new device buffer (at least one element is allocated).
    pub fn upload<T: DeviceRepr + ValidAsZeroBits>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        let mut d = self.zeros::<T>(host.len())?;
        if !host.is_empty() {
            self.stream
                .memcpy_htod(host, &mut d)
                .map_err(Error::driver("copy to the GPU"))?;
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
            return Err(Error::shape(
                "device buffer",
                format!("at least {len} elements"),
                d.len(),
            ));
        }
        let mut out = vec![T::default(); len];
        if len > 0 {
            self.stream
                .memcpy_dtoh(&d.slice(0..len), out.as_mut_slice())
                .map_err(Error::driver("copy from the GPU"))?;
        }
        self.synchronize()?;
        Ok(out)
    }

    /// Fills a u16 buffer with `bits` (NaN poisoning).
    pub fn fill16(&self, d: &mut CudaSlice<u16>, bits: u16) -> Result<()> {
        let n = d.len();
        self.ctx
            .bind_to_thread()
            .map_err(Error::driver("bind context"))?;
        let (p, _g) = d.device_ptr_mut(&self.stream);
        // SAFETY: `p` is a live allocation of `n` u16 values in this context; the memset is
        // queued on the stream every other use of the buffer goes through.
        unsafe { sys::cuMemsetD16Async(p, bits, n, self.stream.cu_stream()) }
            .result()
            .map_err(Error::driver("memset"))
    }

    /// Fills an f32 buffer with `x` (NaN poisoning).
    pub fn fill32(&self, d: &mut CudaSlice<f32>, x: f32) -> Result<()> {
        let n = d.len();
        self.ctx
            .bind_to_thread()
            .map_err(Error::driver("bind context"))?;
        let (p, _g) = d.device_ptr_mut(&self.stream);
        // SAFETY: `p` is a live allocation of `n` f32 values in this context, queued on
        // the one stream.
        unsafe { sys::cuMemsetD32Async(p, x.to_bits(), n, self.stream.cu_stream()) }
            .result()
            .map_err(Error::driver("memset"))
    }

    /// The module of one translation unit: loaded once per process and source, from the
    /// artifact's binaries where they fit this GPU, else compiled with NVRTC.
    pub fn module(
        &self,
        unit_name: &str,
        source: &str,
        bins: Option<&UnitBinaries>,
    ) -> Result<(Arc<CudaModule>, BinarySource)> {
        let key = moac::plan::hex(&<sha2::Sha256 as sha2::Digest>::digest(source.as_bytes()));
        let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((m, src)) = modules.get(&key) {
            return Ok((m.clone(), src.clone()));
        }
        let (src, image) = match module::choose_binary(&self.arch, bins) {
            Some(x) => x,
            None => (
                BinarySource::Nvrtc(self.arch.clone()),
                Image::Cubin(module::nvrtc_cubin(unit_name, source, &self.arch)?),
            ),
        };
        let m = module::load(&self.ctx, image, &format!("{unit_name} ({src})"))?;
        modules.insert(key, (m.clone(), src.clone()));
        Ok((m, src))
    }
}
