//! The device-resident runtime API: moac's attention kernels (prefill, cache fill,
//! append, split-KV decode and merge) on [`GpuBuf`]s, queued on the [`Gpu`]'s stream
//! (the caller's own with [`Gpu::on_stream`]), writing into buffers the caller owns.
//! Nothing is copied to or from the host and nothing is allocated per call: a caller
//! allocates a cache per layer ([`DeviceAttention::new_cache`]) and decode scratch once
//! ([`DeviceAttention::scratch`]), and keeps its per-row lengths on the device. Every
//! buffer is checked against the size the kernels read or write before a launch.
//!
//! [`LayerAttention`] is one layer's kernels (what the autotuner and `moac-gpu-bench`
//! time, one candidate artifact at a time); [`DeviceAttention`] holds every compiled
//! layer of an artifact for one cache geometry (what the engine runs); [`DeviceLayer`]
//! is the host-buffer [`LayerBackend`] over a [`LayerAttention`] (the `cuda` backend:
//! uploads, a checked launch on poisoned outputs, downloads).
//!
//! Layouts are those of docs/kernel-abi.md: q [B,P,Hq,D] (prefill) or [B,Hq,D] (decode),
//! k/v [B,P,Hkv,D] or [B,Hkv,D], caches [B, total_slots, D], lengths `i32` [B]
//! (prompt lengths for prefill and fill; tokens held after the step for append and
//! decode), all elements the plan's dtype but the f32 scratch.

use super::{Gpu, GpuBuf, GpuModule};
use crate::artifact::Artifact;
use crate::backend::launch::{self, AppendBufs, DecodeBufs, FillBufs, MergeBufs, PrefillBufs};
use crate::backend::{
    bind_layer, check_prompt, check_steps, BoundKernel, HostCache, LayerBackend, LayerSetup,
    LayerShape, Prompt,
};
use crate::error::{expect_len, Error, Result};
use moac::abi;
use moac::geometry::{CacheGeometry, Dtype};
use moac::ir::{KernelKind, PrefillMode};
use std::sync::Arc;

/// One layer's kernels, bound and loaded on one device: its attention on device buffers.
pub struct LayerAttention {
    gpu: Arc<Gpu>,
    shape: LayerShape,
    dtype: Dtype,
    kernels: Vec<(BoundKernel, Arc<GpuModule>, String)>,
    nsplit: usize,
}

/// One layer's compacted cache on the device: K and V [batch, total_slots, D].
pub struct DeviceKv {
    pub batch: usize,
    pub k: GpuBuf,
    pub v: GpuBuf,
}

/// Decode's split partials for up to `batch` rows (f32).
pub struct DecodeScratch {
    pub batch: usize,
    part_o: GpuBuf,
    part_lse: GpuBuf,
}

impl DecodeScratch {
    /// Bytes of the partials.
    pub fn bytes(&self) -> usize {
        self.part_o.bytes() + self.part_lse.bytes()
    }

    /// Sets every partial to NaN (before a checked launch: a partial the decode kernel
    /// fails to write then shows in the merged output).
    pub fn poison(&mut self, gpu: &Gpu) -> Result<()> {
        gpu.fill_f32(&mut self.part_o, f32::NAN)?;
        gpu.fill_f32(&mut self.part_lse, f32::NAN)
    }
}

fn need(buf: &GpuBuf, name: &str, what: &str, bytes: usize) -> Result<()> {
    if buf.bytes() < bytes {
        return Err(Error::shape(
            name,
            format!("{what}: at least {bytes} bytes"),
            format!("{} bytes", buf.bytes()),
        ));
    }
    Ok(())
}

impl LayerAttention {
    /// Binds one layer's kernels and loads their units on `gpu` (on cuda the artifact's
    /// CUBIN or PTX where one fits the GPU, else NVRTC; on emu g++), each unit once per
    /// `gpu`.
    pub fn new(gpu: &Arc<Gpu>, setup: &LayerSetup) -> Result<LayerAttention> {
        let mut kernels = Vec::new();
        for k in bind_layer(setup.kernels, setup.specs, setup.units)? {
            let u = &setup.units[k.unit];
            let module = gpu.module_cached(
                &u.name,
                &u.source,
                &[u.name.as_str()],
                setup.binaries.get(k.unit),
            )?;
            kernels.push((k, module, u.name.clone()));
        }
        let shape = setup.shape.clone();
        let nsplit = kernels
            .iter()
            .find(|(k, _, _)| k.kind == KernelKind::Decode)
            .map(|(k, _, _)| abi::decode_splits(shape.max_kv_capacity(), &k.launch))
            .ok_or_else(|| Error::Internal(format!("layer {}: no decode kernel", shape.layer)))?;
        Ok(LayerAttention {
            gpu: gpu.clone(),
            shape,
            dtype: setup.dtype,
            kernels,
            nsplit,
        })
    }

    pub fn shape(&self) -> &LayerShape {
        &self.shape
    }

    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Splits of the decode kernel (`ceil(max C_kv / chunk)`).
    pub fn nsplit(&self) -> usize {
        self.nsplit
    }

    /// How the kernels' binaries were obtained (`cubin sm_90`, `nvrtc sm_90`, `emu
    /// g++`; several, comma-separated, where the units differ).
    pub fn binary(&self) -> String {
        let mut seen: Vec<&str> = Vec::new();
        for (_, m, _) in &self.kernels {
            if !seen.contains(&m.binary()) {
                seen.push(m.binary());
            }
        }
        seen.join(", ")
    }

    /// A zeroed cache of `batch` rows.
    pub fn new_cache(&self, batch: usize) -> Result<DeviceKv> {
        let n = self.shape.cache_elems(batch);
        Ok(DeviceKv {
            batch,
            k: self.gpu.alloc_of::<u16>(n)?,
            v: self.gpu.alloc_of::<u16>(n)?,
        })
    }

    /// Decode scratch for up to `batch` rows of this layer.
    pub fn scratch(&self, batch: usize) -> Result<DecodeScratch> {
        scratch_for(&self.gpu, batch, &self.shape, self.nsplit)
    }

    fn launch(&self, kind: KernelKind, batch: usize, p: usize, args: launch::Named) -> Result<()> {
        let (k, module, entry) = self
            .kernels
            .iter()
            .find(|(k, _, _)| k.kind == kind)
            .ok_or_else(|| Error::Internal(format!("no {} kernel bound", kind.slug())))?;
        let mut pack = launch::pack(k, args)?;
        let grid = abi::grid(kind, &k.launch, &self.shape.grid_dims(batch, p));
        self.gpu
            .launch(module, entry, grid, abi::block(&k.launch), &mut pack)
    }

    fn check_cache(&self, c: &DeviceKv, batch: usize) -> Result<()> {
        if batch > c.batch {
            return Err(Error::shape(
                "cache",
                format!("at least {batch} rows"),
                c.batch,
            ));
        }
        let bytes = self.shape.cache_elems(c.batch) * 2;
        need(&c.k, "cache K", "[B,total_slots,D]", bytes)?;
        need(&c.v, "cache V", "[B,total_slots,D]", bytes)
    }

    /// Prefill attention into `o` [batch,p,Hq,D] (rows past a prompt: zeros).
    /// `prompt_lens` [batch] must each lie in 0..=min(p, N): the caller keeps them on
    /// the device and vouches for them.
    #[allow(clippy::too_many_arguments)]
    pub fn prefill(
        &self,
        q: &GpuBuf,
        k: &GpuBuf,
        v: &GpuBuf,
        prompt_lens: &GpuBuf,
        (batch, p): (usize, usize),
        o: &mut GpuBuf,
        mode: PrefillMode,
        scale: f32,
    ) -> Result<()> {
        let s = &self.shape;
        if p > s.n {
            return Err(Error::PromptTooLong { len: p, max: s.n });
        }
        let (qb, kvb) = (
            batch * p * s.num_query_heads * s.head_dim * 2,
            batch * p * s.num_kv_heads * s.head_dim * 2,
        );
        need(q, "q", "[B,P,Hq,D]", qb)?;
        need(k, "k", "[B,P,Hkv,D]", kvb)?;
        need(v, "v", "[B,P,Hkv,D]", kvb)?;
        need(o, "o", "[B,P,Hq,D]", qb)?;
        need(prompt_lens, "prompt_lens", "[B] i32", batch * 4)?;
        let g = &self.gpu;
        let bufs = PrefillBufs {
            q: g.addr(q, 0),
            k: g.addr(k, 0),
            v: g.addr(v, 0),
            o: g.addr_mut(o, 0),
            prompt_lens: g.addr(prompt_lens, 0),
        };
        self.launch(
            KernelKind::Prefill(mode),
            batch,
            p,
            launch::prefill(s, bufs, p, scale),
        )
    }

    /// The cache fill from a prompt's k/v [batch,p,Hkv,D].
    pub fn fill(
        &self,
        k: &GpuBuf,
        v: &GpuBuf,
        prompt_lens: &GpuBuf,
        (batch, p): (usize, usize),
        cache: &mut DeviceKv,
    ) -> Result<()> {
        let s = &self.shape;
        if p > s.n {
            return Err(Error::PromptTooLong { len: p, max: s.n });
        }
        self.check_cache(cache, batch)?;
        let kvb = batch * p * s.num_kv_heads * s.head_dim * 2;
        need(k, "k", "[B,P,Hkv,D]", kvb)?;
        need(v, "v", "[B,P,Hkv,D]", kvb)?;
        need(prompt_lens, "prompt_lens", "[B] i32", batch * 4)?;
        let g = &self.gpu;
        let bufs = FillBufs {
            k: g.addr(k, 0),
            v: g.addr(v, 0),
            k_cache: g.addr_mut(&mut cache.k, 0),
            v_cache: g.addr_mut(&mut cache.v, 0),
            prompt_lens: g.addr(prompt_lens, 0),
        };
        self.launch(KernelKind::Fill, batch, p, launch::fill(s, bufs, p, batch))
    }

    /// Appends one token per row (k_new/v_new [batch,Hkv,D]); `seq_lens` [batch]: the
    /// tokens each row holds after the append (1..=N).
    pub fn append(
        &self,
        k_new: &GpuBuf,
        v_new: &GpuBuf,
        seq_lens: &GpuBuf,
        batch: usize,
        cache: &mut DeviceKv,
    ) -> Result<()> {
        let s = &self.shape;
        self.check_cache(cache, batch)?;
        let kvb = batch * s.num_kv_heads * s.head_dim * 2;
        need(k_new, "k_new", "[B,Hkv,D]", kvb)?;
        need(v_new, "v_new", "[B,Hkv,D]", kvb)?;
        need(seq_lens, "seq_lens", "[B] i32", batch * 4)?;
        let g = &self.gpu;
        let bufs = AppendBufs {
            k_new: g.addr(k_new, 0),
            v_new: g.addr(v_new, 0),
            k_cache: g.addr_mut(&mut cache.k, 0),
            v_cache: g.addr_mut(&mut cache.v, 0),
            seq_lens: g.addr(seq_lens, 0),
        };
        self.launch(KernelKind::Append, batch, 0, launch::append(s, bufs, batch))
    }

    /// Decode attention of the newest token (q [batch,Hq,D]) over the cache, split over
    /// the KV length and merged into `out` [batch,Hq,D].
    #[allow(clippy::too_many_arguments)]
    pub fn decode(
        &self,
        q: &GpuBuf,
        cache: &DeviceKv,
        seq_lens: &GpuBuf,
        batch: usize,
        scratch: &mut DecodeScratch,
        out: &mut GpuBuf,
        scale: f32,
    ) -> Result<()> {
        let s = &self.shape;
        self.check_cache(cache, batch)?;
        let qb = batch * s.num_query_heads * s.head_dim * 2;
        need(q, "q", "[B,Hq,D]", qb)?;
        need(out, "out", "[B,Hq,D]", qb)?;
        need(seq_lens, "seq_lens", "[B] i32", batch * 4)?;
        let parts = batch * s.num_query_heads * self.nsplit;
        if batch > scratch.batch {
            return Err(Error::shape(
                "decode scratch",
                format!("{batch} rows"),
                scratch.batch,
            ));
        }
        need(
            &scratch.part_o,
            "part_o",
            "[B,Hq,splits,D] f32",
            parts * s.head_dim * 4,
        )?;
        need(
            &scratch.part_lse,
            "part_lse",
            "[B,Hq,splits] f32",
            parts * 4,
        )?;
        let g = &self.gpu;
        let bufs = DecodeBufs {
            q: g.addr(q, 0),
            k_cache: g.addr(&cache.k, 0),
            v_cache: g.addr(&cache.v, 0),
            seq_lens: g.addr(seq_lens, 0),
            part_o: g.addr_mut(&mut scratch.part_o, 0),
            part_lse: g.addr_mut(&mut scratch.part_lse, 0),
        };
        self.launch(
            KernelKind::Decode,
            batch,
            0,
            launch::decode(s, bufs, batch, self.nsplit, scale),
        )?;
        let bufs = MergeBufs {
            part_o: g.addr(&scratch.part_o, 0),
            part_lse: g.addr(&scratch.part_lse, 0),
            out: g.addr_mut(out, 0),
        };
        self.launch(
            KernelKind::Merge,
            batch,
            0,
            launch::merge(bufs, batch, self.nsplit),
        )
    }
}

/// Partials of `nsplit` splits for `batch` rows of a layer of `shape`.
fn scratch_for(
    gpu: &Gpu,
    batch: usize,
    shape: &LayerShape,
    nsplit: usize,
) -> Result<DecodeScratch> {
    let (hq, d) = (shape.num_query_heads, shape.head_dim);
    Ok(DecodeScratch {
        batch,
        part_o: gpu.alloc_of::<f32>(batch * hq * nsplit * d)?,
        part_lse: gpu.alloc_of::<f32>(batch * hq * nsplit)?,
    })
}

/// Every compiled layer's attention for one cache geometry (one N), on one device.
pub struct DeviceAttention {
    gpu: Arc<Gpu>,
    dtype: Dtype,
    geometry: CacheGeometry,
    layers: Vec<LayerAttention>,
}

impl DeviceAttention {
    /// Binds the artifact's kernels for sequences of `prompt_len + max_new` tokens,
    /// loading (or finding) their modules on `gpu`.
    pub fn new(
        gpu: &Arc<Gpu>,
        artifact: &Artifact,
        prompt_len: usize,
        max_new: usize,
    ) -> Result<DeviceAttention> {
        let geometry = CacheGeometry::new(artifact.plan(), prompt_len as u64, max_new as u64)?;
        let mut layers = Vec::new();
        for layer in artifact.layers() {
            let shape = LayerShape::new(&geometry, layer);
            layers.push(LayerAttention::new(gpu, &artifact.layer_setup(&shape)?)?);
        }
        Ok(DeviceAttention {
            gpu: gpu.clone(),
            dtype: artifact.dtype(),
            geometry,
            layers,
        })
    }

    pub fn geometry(&self) -> &CacheGeometry {
        &self.geometry
    }

    /// The compiled layers, in order.
    pub fn layers(&self) -> Vec<usize> {
        self.layers.iter().map(|l| l.shape.layer).collect()
    }

    /// The shape of compiled layer `layer`.
    pub fn shape(&self, layer: usize) -> Result<&LayerShape> {
        Ok(&self.layer(layer)?.shape)
    }

    /// Compiled layer `layer`'s kernels.
    pub fn layer(&self, layer: usize) -> Result<&LayerAttention> {
        self.layers
            .iter()
            .find(|l| l.shape.layer == layer)
            .ok_or_else(|| {
                Error::Usage(format!(
                    "layer {layer} is not in this artifact (compiled layers: {:?})",
                    self.layers()
                ))
            })
    }

    /// A zeroed cache of `batch` rows for `layer`.
    pub fn new_cache(&self, layer: usize, batch: usize) -> Result<DeviceKv> {
        self.layer(layer)?.new_cache(batch)
    }

    /// Decode scratch for up to `batch` rows of any layer.
    pub fn scratch(&self, batch: usize) -> Result<DecodeScratch> {
        let nsplit = self.layers.iter().map(|l| l.nsplit).max().unwrap_or(1);
        match self.layers.first() {
            Some(l) => scratch_for(&self.gpu, batch, &l.shape, nsplit),
            None => Ok(DecodeScratch {
                batch,
                part_o: self.gpu.alloc(0)?,
                part_lse: self.gpu.alloc(0)?,
            }),
        }
    }

    /// Bytes of K and V of a `batch`-row cache of every layer.
    pub fn cache_bytes(&self, batch: usize) -> u64 {
        self.layers
            .iter()
            .map(|l| {
                self.geometry
                    .layer_kv_bytes(l.shape.layer, self.dtype, batch as u64)
            })
            .sum()
    }
}

/// The host-buffer [`LayerBackend`] over one layer's device kernels (the `cuda`
/// backend; on emu a second path to the same kernels, which the tests compare with
/// [`crate::backend::emu`]'s): inputs are uploaded per call, every output and a new
/// cache are poisoned (NaN) before a launch, results come back as f32.
pub struct DeviceLayer {
    att: LayerAttention,
    cache: Option<DeviceKv>,
}

impl DeviceLayer {
    /// One layer's kernels on `gpu`, without a cache yet ([`LayerBackend::new_cache`]).
    pub fn new(gpu: &Arc<Gpu>, setup: &LayerSetup) -> Result<DeviceLayer> {
        Ok(DeviceLayer {
            att: LayerAttention::new(gpu, setup)?,
            cache: None,
        })
    }

    /// The layer's kernels.
    pub fn attention(&self) -> &LayerAttention {
        &self.att
    }

    fn gpu(&self) -> &Gpu {
        &self.att.gpu
    }

    fn upload<T: super::Plain>(&self, v: &[T]) -> Result<GpuBuf> {
        let mut buf = self.gpu().alloc_of::<T>(v.len())?;
        self.gpu().upload(&mut buf, 0, v)?;
        Ok(buf)
    }

    /// A buffer of `n` elements of the dtype, every one NaN.
    fn poisoned(&self, n: usize) -> Result<GpuBuf> {
        let mut buf = self.gpu().alloc_of::<u16>(n)?;
        self.gpu().fill_u16(&mut buf, self.att.dtype.nan_bits())?;
        Ok(buf)
    }

    fn no_cache() -> Error {
        Error::Usage("no cache allocated for the layer (new_cache)".into())
    }

    /// The prompt's k, v and lengths on the device.
    fn upload_prompt(&self, pr: &Prompt) -> Result<(GpuBuf, GpuBuf, GpuBuf)> {
        Ok((
            self.upload(pr.k)?,
            self.upload(pr.v)?,
            self.upload(pr.lens)?,
        ))
    }

    fn prefill_on(
        &self,
        q: &[u16],
        (k, v, lens): &(GpuBuf, GpuBuf, GpuBuf),
        bp: (usize, usize),
        mode: PrefillMode,
        scale: f32,
    ) -> Result<Vec<f32>> {
        let qd = self.upload(q)?;
        let mut o = self.poisoned(q.len())?;
        self.att.prefill(&qd, k, v, lens, bp, &mut o, mode, scale)?;
        let bits = self.gpu().download::<u16>(&o, 0, q.len())?;
        Ok(self.att.dtype.f32_of(&bits))
    }
}

impl LayerBackend for DeviceLayer {
    fn shape(&self) -> &LayerShape {
        &self.att.shape
    }

    fn new_cache(&mut self, batch: usize) -> Result<()> {
        let mut c = self.att.new_cache(batch)?;
        let nan = self.att.dtype.nan_bits();
        self.gpu().fill_u16(&mut c.k, nan)?;
        self.gpu().fill_u16(&mut c.v, nan)?;
        self.cache = Some(c);
        Ok(())
    }

    fn prefill(&self, q: &[u16], pr: &Prompt, mode: PrefillMode, scale: f32) -> Result<Vec<f32>> {
        check_prompt(&self.att.shape, Some(q), pr)?;
        let dp = self.upload_prompt(pr)?;
        self.prefill_on(q, &dp, (pr.lens.len(), pr.p), mode, scale)
    }

    fn fill(&mut self, pr: &Prompt) -> Result<()> {
        check_prompt(&self.att.shape, None, pr)?;
        let (k, v, lens) = self.upload_prompt(pr)?;
        let mut cache = self.cache.take().ok_or_else(Self::no_cache)?;
        let r = self
            .att
            .fill(&k, &v, &lens, (pr.lens.len(), pr.p), &mut cache);
        self.cache = Some(cache);
        r
    }

    fn prefill_and_fill(
        &mut self,
        q: &[u16],
        pr: &Prompt,
        mode: PrefillMode,
        scale: f32,
    ) -> Result<Vec<f32>> {
        check_prompt(&self.att.shape, Some(q), pr)?;
        let dp = self.upload_prompt(pr)?;
        let bp = (pr.lens.len(), pr.p);
        let o = self.prefill_on(q, &dp, bp, mode, scale)?;
        let mut cache = self.cache.take().ok_or_else(Self::no_cache)?;
        let r = self.att.fill(&dp.0, &dp.1, &dp.2, bp, &mut cache);
        self.cache = Some(cache);
        r.map(|()| o)
    }

    fn append(&mut self, k_new: &[u16], v_new: &[u16], seq_lens: &[i32]) -> Result<()> {
        let s = &self.att.shape;
        let kv = seq_lens.len() * s.num_kv_heads * s.head_dim;
        expect_len("k_new", "[B,Hkv,D]", kv, k_new.len())?;
        expect_len("v_new", "[B,Hkv,D]", kv, v_new.len())?;
        check_steps(s, seq_lens)?;
        let (kd, vd, lens) = (
            self.upload(k_new)?,
            self.upload(v_new)?,
            self.upload(seq_lens)?,
        );
        let mut cache = self.cache.take().ok_or_else(Self::no_cache)?;
        let r = self.att.append(&kd, &vd, &lens, seq_lens.len(), &mut cache);
        self.cache = Some(cache);
        r
    }

    fn decode(&self, q: &[u16], seq_lens: &[i32], scale: f32) -> Result<Vec<f32>> {
        let s = &self.att.shape;
        let b = seq_lens.len();
        expect_len("q", "[B,Hq,D]", b * s.num_query_heads * s.head_dim, q.len())?;
        check_steps(s, seq_lens)?;
        let cache = self.cache.as_ref().ok_or_else(Self::no_cache)?;
        let (qd, lens) = (self.upload(q)?, self.upload(seq_lens)?);
        let mut scratch = self.att.scratch(b)?;
        scratch.poison(self.gpu())?;
        let mut out = self.poisoned(q.len())?;
        self.att
            .decode(&qd, cache, &lens, b, &mut scratch, &mut out, scale)?;
        let bits = self.gpu().download::<u16>(&out, 0, q.len())?;
        Ok(self.att.dtype.f32_of(&bits))
    }

    fn cache_to_host(&self) -> Result<HostCache> {
        let cache = self.cache.as_ref().ok_or_else(Self::no_cache)?;
        let n = self.att.shape.cache_elems(cache.batch);
        Ok(HostCache {
            batch: cache.batch,
            k: self.gpu().download::<u16>(&cache.k, 0, n)?,
            v: self.gpu().download::<u16>(&cache.v, 0, n)?,
        })
    }
}
