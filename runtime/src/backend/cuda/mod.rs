//! The `cuda` backend: one layer's generated kernels on an NVIDIA GPU through cudarc
//! (its safe `CudaModule` / `CudaFunction`; launches with the `void**` that
//! [`moac::abi::ArgPack`] packs, the same as emu's), with the same grids and buffer
//! layouts as emu (docs/kernel-abi.md). Every output buffer is poisoned (NaN) on the
//! device before a checked launch, exactly like emu.
//!
//! Besides the [`LayerBackend`] methods (host buffers in and out), [`CudaLayer`] has a
//! device-level API on `CudaSlice`s ([`CudaLayer::prefill_into`],
//! [`CudaLayer::fill_dev`], [`CudaLayer::append_dev`], [`CudaLayer::launch_decode`])
//! that queues kernels and copies nothing: what the timing harness and a GPU-resident
//! engine use.

mod device;
pub mod module;

pub use device::{cuda_available, CudaDevice};
pub use module::BinarySource;

use super::launch::{self, AppendBufs, DecodeBufs, FillBufs, MergeBufs, PrefillBufs};
use super::{check_lens, check_prompt, check_steps, kernel_of, BoundKernel};
use super::{HostCache, LayerBackend, LayerSetup, LayerShape, Prompt};
use crate::error::{expect_len, Error, Result};
use cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, DevicePtrMut};
use moac::abi;
use moac::geometry::Dtype;
use moac::ir::{KernelKind, PrefillMode};
use std::sync::Arc;

/// One layer's compacted cache on the GPU: K and V `[B, total_slots, D]` as raw bits.
pub struct DeviceCache {
    pub batch: usize,
    pub k: CudaSlice<u16>,
    pub v: CudaSlice<u16>,
}

/// Per-row token counts on the GPU (with a host copy), checked when made.
pub struct DeviceLens {
    host: Vec<i32>,
    dev: CudaSlice<i32>,
}

impl DeviceLens {
    pub fn as_slice(&self) -> &[i32] {
        &self.host
    }
}

/// A prompt on the GPU: `k`/`v` [B,P,Hkv,D] and each row's length.
pub struct DevicePrompt<'a> {
    pub k: &'a CudaSlice<u16>,
    pub v: &'a CudaSlice<u16>,
    pub lens: &'a DeviceLens,
    pub p: usize,
}

/// Buffers of one decode launch (split partials and the merged output) for `batch` rows.
pub struct DeviceDecodeScratch {
    pub batch: usize,
    pub nsplit: usize,
    part_o: CudaSlice<f32>,
    part_lse: CudaSlice<f32>,
    /// [B, Hq, D] raw bits.
    pub out: CudaSlice<u16>,
}

/// A layer's kernels, loaded on the GPU, with the cache the [`LayerBackend`] methods
/// use (the device-level methods take caches of their own).
pub struct CudaLayer {
    shape: LayerShape,
    dtype: Dtype,
    /// How the kernels' binaries were obtained (`cubin sm_90`, `ptx jit`, `nvrtc sm_90`;
    /// several, comma-separated, if the units differ).
    binary: String,
    dev: Arc<CudaDevice>,
    kernels: Vec<(BoundKernel, CudaFunction)>,
    cache: Option<DeviceCache>,
}

impl CudaLayer {
    /// Loads one layer's kernels from the units that define them (the artifact's
    /// binaries where they fit the GPU, else NVRTC).
    pub fn new(dev: &Arc<CudaDevice>, setup: &LayerSetup) -> Result<CudaLayer> {
        let mut kernels = Vec::new();
        let mut sources: Vec<String> = Vec::new();
        for k in super::bind_layer(setup.kernels, setup.specs, setup.units)? {
            let u = &setup.units[k.unit];
            let (module, src) = dev.module(&u.name, &u.source, setup.binaries.get(k.unit))?;
            let src = src.to_string();
            if !sources.contains(&src) {
                sources.push(src);
            }
            let func = module
                .load_function(&u.name)
                .map_err(Error::driver(format_args!(
                    "entry {} of its module",
                    u.name
                )))?;
            kernels.push((k, func));
        }
        Ok(CudaLayer {
            shape: setup.shape.clone(),
            dtype: setup.dtype,
            binary: sources.join(", "),
            dev: dev.clone(),
            kernels,
            cache: None,
        })
    }

    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// How the kernels' binaries were obtained.
    pub fn binary(&self) -> &str {
        &self.binary
    }

    /// Launches the layer's kernel of `kind` with named arguments. Callers guarantee
    /// every pointer argument is a live device buffer of the size the ABI requires for
    /// this grid and shape.
    fn run(&self, kind: KernelKind, batch: usize, p: usize, args: launch::Named) -> Result<()> {
        let (k, func) = kernel_of(&self.kernels, kind)?;
        let mut pack = launch::pack(k, args)?;
        let grid = abi::grid(kind, &k.launch, &self.shape.grid_dims(batch, p));
        self.dev
            .launch(func, grid, abi::block(&k.launch), &mut pack, &k.name)
    }

    /// Splits of the decode kernel (`ceil(max C_kv / chunk)`).
    pub fn nsplit(&self) -> Result<usize> {
        let (k, _) = kernel_of(&self.kernels, KernelKind::Decode)?;
        Ok(abi::decode_splits(self.shape.max_kv_capacity(), &k.launch))
    }

    /// A new device cache for `batch` rows, poisoned with NaN.
    pub fn new_device_cache(&self, batch: usize) -> Result<DeviceCache> {
        let n = self.shape.cache_elems(batch);
        let mut k = self.dev.zeros::<u16>(n)?;
        let mut v = self.dev.zeros::<u16>(n)?;
        self.dev.fill16(&mut k, self.dtype.nan_bits())?;
        self.dev.fill16(&mut v, self.dtype.nan_bits())?;
        Ok(DeviceCache { batch, k, v })
    }

    fn check_cache(&self, c: &DeviceCache, b: usize) -> Result<()> {
        let n = self.shape.cache_elems(b);
        if c.batch != b || c.k.len() < n || c.v.len() < n {
            return Err(Error::shape(
                "device cache",
                format!("{b} rows, {n} elements each of K and V"),
                format!("{} rows, {} and {}", c.batch, c.k.len(), c.v.len()),
            ));
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

    /// Token counts after a step (1..=N each), uploaded once.
    pub fn seq_lens(&self, seq_lens: &[i32]) -> Result<DeviceLens> {
        check_steps(&self.shape, seq_lens)?;
        Ok(DeviceLens {
            host: seq_lens.to_vec(),
            dev: self.dev.upload(seq_lens)?,
        })
    }

    fn check_device_prompt(&self, q: Option<&CudaSlice<u16>>, pr: &DevicePrompt) -> Result<()> {
        let s = &self.shape;
        let (b, p, d) = (pr.lens.host.len(), pr.p, s.head_dim);
        let kv = b * p * s.num_kv_heads * d;
        let q_short = q.is_some_and(|q| q.len() < b * p * s.num_query_heads * d);
        if q_short || pr.k.len() < kv || pr.v.len() < kv {
            return Err(Error::shape(
                "prefill q, k, v",
                "[B,P,Hq,D] and [B,P,Hkv,D]",
                format!(
                    "{}, {} and {} elements",
                    q.map_or(0, |q| q.len()),
                    pr.k.len(),
                    pr.v.len()
                ),
            ));
        }
        Ok(())
    }

    /// Prefill attention into an output buffer `o` [B,P,Hq,D] the caller owns (rows past
    /// a prompt are written as zeros). Queues the kernel; copies nothing.
    pub fn prefill_into(
        &self,
        o: &mut CudaSlice<u16>,
        q: &CudaSlice<u16>,
        pr: &DevicePrompt,
        mode: PrefillMode,
        scale: f32,
    ) -> Result<()> {
        let s = &self.shape;
        let b = pr.lens.host.len();
        self.check_device_prompt(Some(q), pr)?;
        if o.len() < b * pr.p * s.num_query_heads * s.head_dim {
            return Err(Error::shape("prefill o", "[B,P,Hq,D]", o.len()));
        }
        let st = self.dev.stream();
        let (qp, _g1) = q.device_ptr(st);
        let (kp, _g2) = pr.k.device_ptr(st);
        let (vp, _g3) = pr.v.device_ptr(st);
        let (lp, _g4) = pr.lens.dev.device_ptr(st);
        let (op, _g5) = o.device_ptr_mut(st);
        let bufs = PrefillBufs {
            q: qp,
            k: kp,
            v: vp,
            o: op,
            prompt_lens: lp,
        };
        let args = launch::prefill(s, bufs, pr.p, scale);
        self.run(KernelKind::Prefill(mode), b, pr.p, args)
    }

    /// The cache fill on device buffers. Queues the kernel; copies nothing.
    pub fn fill_dev(&self, cache: &mut DeviceCache, pr: &DevicePrompt) -> Result<()> {
        let b = pr.lens.host.len();
        self.check_cache(cache, b)?;
        self.check_device_prompt(None, pr)?;
        let st = self.dev.stream();
        let (kp, _g1) = pr.k.device_ptr(st);
        let (vp, _g2) = pr.v.device_ptr(st);
        let (lp, _g3) = pr.lens.dev.device_ptr(st);
        let (kc, _g4) = cache.k.device_ptr_mut(st);
        let (vc, _g5) = cache.v.device_ptr_mut(st);
        let bufs = FillBufs {
            k: kp,
            v: vp,
            k_cache: kc,
            v_cache: vc,
            prompt_lens: lp,
        };
        let args = launch::fill(&self.shape, bufs, pr.p, b);
        self.run(KernelKind::Fill, b, pr.p, args)
    }

    /// The append on device buffers: `k_new`/`v_new` [B,Hkv,D], `lens` after the
    /// append. Queues the kernel; copies nothing.
    pub fn append_dev(
        &self,
        cache: &mut DeviceCache,
        k_new: &CudaSlice<u16>,
        v_new: &CudaSlice<u16>,
        lens: &DeviceLens,
    ) -> Result<()> {
        let s = &self.shape;
        let b = lens.host.len();
        self.check_cache(cache, b)?;
        let kv = b * s.num_kv_heads * s.head_dim;
        if k_new.len() < kv || v_new.len() < kv {
            return Err(Error::shape(
                "append k_new, v_new",
                "[B,Hkv,D]",
                k_new.len(),
            ));
        }
        let st = self.dev.stream();
        let (kp, _g1) = k_new.device_ptr(st);
        let (vp, _g2) = v_new.device_ptr(st);
        let (lp, _g3) = lens.dev.device_ptr(st);
        let (kc, _g4) = cache.k.device_ptr_mut(st);
        let (vc, _g5) = cache.v.device_ptr_mut(st);
        let bufs = AppendBufs {
            k_new: kp,
            v_new: vp,
            k_cache: kc,
            v_cache: vc,
            seq_lens: lp,
        };
        self.run(KernelKind::Append, b, 0, launch::append(s, bufs, b))
    }

    /// Buffers for decode launches of `batch` rows.
    pub fn decode_scratch(&self, batch: usize) -> Result<DeviceDecodeScratch> {
        let s = &self.shape;
        let nsplit = self.nsplit()?;
        Ok(DeviceDecodeScratch {
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
    /// the timing harness turns it off to time the kernels alone.
    pub fn launch_decode(
        &self,
        cache: &DeviceCache,
        q: &CudaSlice<u16>,
        seq_lens: &DeviceLens,
        scratch: &mut DeviceDecodeScratch,
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
            return Err(Error::shape(
                "decode q and scratch",
                format!("{b} rows and {nsplit} splits"),
                format!("{} rows and {} splits", scratch.batch, scratch.nsplit),
            ));
        }
        if poison {
            self.dev.fill32(&mut scratch.part_o, f32::NAN)?;
            self.dev.fill32(&mut scratch.part_lse, f32::NAN)?;
            self.dev.fill16(&mut scratch.out, self.dtype.nan_bits())?;
        }
        let st = self.dev.stream();
        {
            let (qp, _g1) = q.device_ptr(st);
            let (kc, _g2) = cache.k.device_ptr(st);
            let (vc, _g3) = cache.v.device_ptr(st);
            let (lp, _g4) = seq_lens.dev.device_ptr(st);
            let (po, _g5) = scratch.part_o.device_ptr_mut(st);
            let (pl, _g6) = scratch.part_lse.device_ptr_mut(st);
            let bufs = DecodeBufs {
                q: qp,
                k_cache: kc,
                v_cache: vc,
                seq_lens: lp,
                part_o: po,
                part_lse: pl,
            };
            let args = launch::decode(s, bufs, b, nsplit, scale);
            self.run(KernelKind::Decode, b, 0, args)?;
        }
        let (po, _g1) = scratch.part_o.device_ptr(st);
        let (pl, _g2) = scratch.part_lse.device_ptr(st);
        let (op, _g3) = scratch.out.device_ptr_mut(st);
        let bufs = MergeBufs {
            part_o: po,
            part_lse: pl,
            out: op,
        };
        self.run(KernelKind::Merge, b, 0, launch::merge(bufs, b, nsplit))
    }

    /// Uploads a host prompt and runs `f` on it.
    fn with_prompt<T>(&self, pr: &Prompt, f: impl FnOnce(&DevicePrompt) -> Result<T>) -> Result<T> {
        check_prompt(&self.shape, None, pr)?;
        let (k, v) = (self.dev.upload(pr.k)?, self.dev.upload(pr.v)?);
        let lens = self.prompt_lens(pr.lens, pr.p)?;
        f(&DevicePrompt {
            k: &k,
            v: &v,
            lens: &lens,
            p: pr.p,
        })
    }

    fn prefill_dev(
        &self,
        q: &[u16],
        pr: &DevicePrompt,
        mode: PrefillMode,
        scale: f32,
    ) -> Result<CudaSlice<u16>> {
        let qd = self.dev.upload(q)?;
        let mut o = self.dev.zeros::<u16>(q.len())?;
        self.dev.fill16(&mut o, self.dtype.nan_bits())?;
        self.prefill_into(&mut o, &qd, pr, mode, scale)?;
        Ok(o)
    }
}

impl CudaLayer {
    fn own_cache(&mut self) -> Result<&mut DeviceCache> {
        self.cache
            .as_mut()
            .ok_or_else(|| Error::Usage("cuda layer: no cache allocated (new_cache)".into()))
    }

    fn own_cache_ref(&self) -> Result<&DeviceCache> {
        self.cache
            .as_ref()
            .ok_or_else(|| Error::Usage("cuda layer: no cache allocated (new_cache)".into()))
    }
}

impl LayerBackend for CudaLayer {
    fn shape(&self) -> &LayerShape {
        &self.shape
    }

    fn new_cache(&mut self, batch: usize) -> Result<()> {
        self.cache = Some(self.new_device_cache(batch)?);
        Ok(())
    }

    fn prefill(&self, q: &[u16], pr: &Prompt, mode: PrefillMode, scale: f32) -> Result<Vec<f32>> {
        check_prompt(&self.shape, Some(q), pr)?;
        let o = self.with_prompt(pr, |dp| self.prefill_dev(q, dp, mode, scale))?;
        Ok(self.dtype.f32_of(&self.dev.download(&o, q.len())?))
    }

    fn fill(&mut self, pr: &Prompt) -> Result<()> {
        let mut cache = self.cache.take();
        let r = match cache.as_mut() {
            Some(c) => self.with_prompt(pr, |dp| self.fill_dev(c, dp)),
            None => self.own_cache().map(|_| ()),
        };
        self.cache = cache;
        r
    }

    fn prefill_and_fill(
        &mut self,
        q: &[u16],
        pr: &Prompt,
        mode: PrefillMode,
        scale: f32,
    ) -> Result<Vec<f32>> {
        check_prompt(&self.shape, Some(q), pr)?;
        let mut cache = self.cache.take();
        let r = match cache.as_mut() {
            Some(c) => self.with_prompt(pr, |dp| {
                let o = self.prefill_dev(q, dp, mode, scale)?;
                self.fill_dev(c, dp)?;
                Ok(o)
            }),
            None => Err(Error::Usage(
                "cuda layer: no cache allocated (new_cache)".into(),
            )),
        };
        self.cache = cache;
        Ok(self.dtype.f32_of(&self.dev.download(&r?, q.len())?))
    }

    fn append(&mut self, k_new: &[u16], v_new: &[u16], seq_lens: &[i32]) -> Result<()> {
        let s = &self.shape;
        let kv = seq_lens.len() * s.num_kv_heads * s.head_dim;
        expect_len("k_new", "[B,Hkv,D]", kv, k_new.len())?;
        expect_len("v_new", "[B,Hkv,D]", kv, v_new.len())?;
        let lens = self.seq_lens(seq_lens)?;
        let (kd, vd) = (self.dev.upload(k_new)?, self.dev.upload(v_new)?);
        let mut cache = self.cache.take();
        let r = match cache.as_mut() {
            Some(c) => self.append_dev(c, &kd, &vd, &lens),
            None => self.own_cache().map(|_| ()),
        };
        self.cache = cache;
        r
    }

    fn decode(&self, q: &[u16], seq_lens: &[i32], scale: f32) -> Result<Vec<f32>> {
        let s = &self.shape;
        let b = seq_lens.len();
        expect_len("q", "[B,Hq,D]", b * s.num_query_heads * s.head_dim, q.len())?;
        let lens = self.seq_lens(seq_lens)?;
        let qd = self.dev.upload(q)?;
        let mut scratch = self.decode_scratch(b)?;
        self.launch_decode(self.own_cache_ref()?, &qd, &lens, &mut scratch, scale, true)?;
        Ok(self
            .dtype
            .f32_of(&self.dev.download(&scratch.out, q.len())?))
    }

    fn cache_to_host(&self) -> Result<HostCache> {
        let cache = self.own_cache_ref()?;
        let n = self.shape.cache_elems(cache.batch);
        Ok(HostCache {
            batch: cache.batch,
            k: self.dev.download(&cache.k, n)?,
            v: self.dev.download(&cache.v, n)?,
        })
    }
}
