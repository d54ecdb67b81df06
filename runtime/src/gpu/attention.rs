//! The device-resident runtime API: moac's attention kernels (prefill, cache fill,
//! append, split-KV decode and merge) on [`GpuBuf`]s, queued on the [`Gpu`]'s stream
//! (the caller's own with [`Gpu::on_stream`]), writing into buffers the caller owns.
//! Nothing is copied to or from the host and nothing is allocated per call: a caller
//! allocates a cache per layer ([`DeviceAttention::new_cache`]) and decode scratch once
//! ([`DeviceAttention::scratch`]), and keeps its per-row lengths on the device. Every
//! buffer is checked against the size the kernels read or write before a launch.
//!
//! Layouts are those of docs/kernel-abi.md: q [B,P,Hq,D] (prefill) or [B,Hq,D] (decode),
//! k/v [B,P,Hkv,D] or [B,Hkv,D], caches [B, total_slots, D], lengths `i32` [B]
//! (prompt lengths for prefill and fill; tokens held after the step for append and
//! decode), all elements the plan's dtype but the f32 scratch.

use super::{Gpu, GpuBuf, GpuModule};
use crate::artifact::Artifact;
use crate::backend::launch::{self, AppendBufs, DecodeBufs, FillBufs, MergeBufs, PrefillBufs};
use crate::backend::{bind_layer, BoundKernel, LayerShape};
use crate::error::{Error, Result};
use moac::abi;
use moac::geometry::{CacheGeometry, Dtype};
use moac::ir::{KernelKind, PrefillMode};
use std::sync::Arc;

/// One layer's kernels bound for a geometry.
struct Layer {
    shape: LayerShape,
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
}

/// Every compiled layer's attention for one cache geometry (one N), on one device.
pub struct DeviceAttention {
    gpu: Arc<Gpu>,
    dtype: Dtype,
    geometry: CacheGeometry,
    layers: Vec<Layer>,
}

impl DeviceAttention {
    /// Binds the artifact's kernels for sequences of `prompt_len + max_new` tokens,
    /// building (or finding) their modules on `gpu`.
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
            let setup = artifact.layer_setup(&shape)?;
            let mut kernels = Vec::new();
            for k in bind_layer(setup.kernels, setup.specs, setup.units)? {
                let u = &setup.units[k.unit];
                let module = gpu.module_cached(&u.name, &u.source, &[u.name.as_str()])?;
                kernels.push((k, module, u.name.clone()));
            }
            let nsplit = kernels
                .iter()
                .find(|(k, _, _)| k.kind == KernelKind::Decode)
                .map(|(k, _, _)| abi::decode_splits(shape.max_kv_capacity(), &k.launch))
                .ok_or_else(|| Error::Internal(format!("layer {layer}: no decode kernel")))?;
            layers.push(Layer {
                shape,
                kernels,
                nsplit,
            });
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

    fn layer(&self, layer: usize) -> Result<&Layer> {
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
        let n = self.layer(layer)?.shape.cache_elems(batch);
        Ok(DeviceKv {
            batch,
            k: self.gpu.alloc_of::<u16>(n)?,
            v: self.gpu.alloc_of::<u16>(n)?,
        })
    }

    /// Decode scratch for up to `batch` rows of any layer.
    pub fn scratch(&self, batch: usize) -> Result<DecodeScratch> {
        let (hq, d) = match self.layers.first() {
            Some(l) => (l.shape.num_query_heads, l.shape.head_dim),
            None => (0, 0),
        };
        let nsplit = self.layers.iter().map(|l| l.nsplit).max().unwrap_or(1);
        Ok(DecodeScratch {
            batch,
            part_o: self.gpu.alloc_of::<f32>(batch * hq * nsplit * d)?,
            part_lse: self.gpu.alloc_of::<f32>(batch * hq * nsplit)?,
        })
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

    fn launch(
        &self,
        l: &Layer,
        kind: KernelKind,
        batch: usize,
        p: usize,
        args: launch::Named,
    ) -> Result<()> {
        let (k, module, entry) = l
            .kernels
            .iter()
            .find(|(k, _, _)| k.kind == kind)
            .ok_or_else(|| Error::Internal(format!("no {} kernel bound", kind.slug())))?;
        let mut pack = launch::pack(k, args)?;
        let grid = abi::grid(kind, &k.launch, &l.shape.grid_dims(batch, p));
        self.gpu
            .launch(module, entry, grid, abi::block(&k.launch), &mut pack)
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

    fn check_cache(l: &Layer, c: &DeviceKv, batch: usize) -> Result<()> {
        if batch > c.batch {
            return Err(Error::shape(
                "cache",
                format!("at least {batch} rows"),
                c.batch,
            ));
        }
        let bytes = l.shape.cache_elems(c.batch) * 2;
        Self::need(&c.k, "cache K", "[B,total_slots,D]", bytes)?;
        Self::need(&c.v, "cache V", "[B,total_slots,D]", bytes)
    }

    /// Prefill attention of `layer` into `o` [batch,p,Hq,D] (rows past a prompt:
    /// zeros). `prompt_lens` [batch] must each lie in 0..=min(p, N): the caller keeps
    /// them on the device and vouches for them.
    #[allow(clippy::too_many_arguments)]
    pub fn prefill(
        &self,
        layer: usize,
        q: &GpuBuf,
        k: &GpuBuf,
        v: &GpuBuf,
        prompt_lens: &GpuBuf,
        (batch, p): (usize, usize),
        o: &mut GpuBuf,
        mode: PrefillMode,
        scale: f32,
    ) -> Result<()> {
        let l = self.layer(layer)?;
        let s = &l.shape;
        if p > s.n {
            return Err(Error::PromptTooLong { len: p, max: s.n });
        }
        let (qb, kvb) = (
            batch * p * s.num_query_heads * s.head_dim * 2,
            batch * p * s.num_kv_heads * s.head_dim * 2,
        );
        Self::need(q, "q", "[B,P,Hq,D]", qb)?;
        Self::need(k, "k", "[B,P,Hkv,D]", kvb)?;
        Self::need(v, "v", "[B,P,Hkv,D]", kvb)?;
        Self::need(o, "o", "[B,P,Hq,D]", qb)?;
        Self::need(prompt_lens, "prompt_lens", "[B] i32", batch * 4)?;
        let g = &self.gpu;
        let bufs = PrefillBufs {
            q: g.addr(q, 0),
            k: g.addr(k, 0),
            v: g.addr(v, 0),
            o: g.addr_mut(o, 0),
            prompt_lens: g.addr(prompt_lens, 0),
        };
        self.launch(
            l,
            KernelKind::Prefill(mode),
            batch,
            p,
            launch::prefill(s, bufs, p, scale),
        )
    }

    /// The cache fill of `layer` from a prompt's k/v [batch,p,Hkv,D].
    pub fn fill(
        &self,
        layer: usize,
        k: &GpuBuf,
        v: &GpuBuf,
        prompt_lens: &GpuBuf,
        (batch, p): (usize, usize),
        cache: &mut DeviceKv,
    ) -> Result<()> {
        let l = self.layer(layer)?;
        let s = &l.shape;
        if p > s.n {
            return Err(Error::PromptTooLong { len: p, max: s.n });
        }
        Self::check_cache(l, cache, batch)?;
        let kvb = batch * p * s.num_kv_heads * s.head_dim * 2;
        Self::need(k, "k", "[B,P,Hkv,D]", kvb)?;
        Self::need(v, "v", "[B,P,Hkv,D]", kvb)?;
        Self::need(prompt_lens, "prompt_lens", "[B] i32", batch * 4)?;
        let g = &self.gpu;
        let bufs = FillBufs {
            k: g.addr(k, 0),
            v: g.addr(v, 0),
            k_cache: g.addr_mut(&mut cache.k, 0),
            v_cache: g.addr_mut(&mut cache.v, 0),
            prompt_lens: g.addr(prompt_lens, 0),
        };
        self.launch(
            l,
            KernelKind::Fill,
            batch,
            p,
            launch::fill(s, bufs, p, batch),
        )
    }

    /// Appends one token per row (k_new/v_new [batch,Hkv,D]); `seq_lens` [batch]: the
    /// tokens each row holds after the append (1..=N).
    pub fn append(
        &self,
        layer: usize,
        k_new: &GpuBuf,
        v_new: &GpuBuf,
        seq_lens: &GpuBuf,
        batch: usize,
        cache: &mut DeviceKv,
    ) -> Result<()> {
        let l = self.layer(layer)?;
        let s = &l.shape;
        Self::check_cache(l, cache, batch)?;
        let kvb = batch * s.num_kv_heads * s.head_dim * 2;
        Self::need(k_new, "k_new", "[B,Hkv,D]", kvb)?;
        Self::need(v_new, "v_new", "[B,Hkv,D]", kvb)?;
        Self::need(seq_lens, "seq_lens", "[B] i32", batch * 4)?;
        let g = &self.gpu;
        let bufs = AppendBufs {
            k_new: g.addr(k_new, 0),
            v_new: g.addr(v_new, 0),
            k_cache: g.addr_mut(&mut cache.k, 0),
            v_cache: g.addr_mut(&mut cache.v, 0),
            seq_lens: g.addr(seq_lens, 0),
        };
        self.launch(
            l,
            KernelKind::Append,
            batch,
            0,
            launch::append(s, bufs, batch),
        )
    }

    /// Decode attention of the newest token (q [batch,Hq,D]) over the cache, split over
    /// the KV length and merged into `out` [batch,Hq,D].
    #[allow(clippy::too_many_arguments)]
    pub fn decode(
        &self,
        layer: usize,
        q: &GpuBuf,
        cache: &DeviceKv,
        seq_lens: &GpuBuf,
        batch: usize,
        scratch: &mut DecodeScratch,
        out: &mut GpuBuf,
        scale: f32,
    ) -> Result<()> {
        let l = self.layer(layer)?;
        let s = &l.shape;
        Self::check_cache(l, cache, batch)?;
        let qb = batch * s.num_query_heads * s.head_dim * 2;
        Self::need(q, "q", "[B,Hq,D]", qb)?;
        Self::need(out, "out", "[B,Hq,D]", qb)?;
        Self::need(seq_lens, "seq_lens", "[B] i32", batch * 4)?;
        let parts = batch * s.num_query_heads * l.nsplit;
        if batch > scratch.batch {
            return Err(Error::shape(
                "decode scratch",
                format!("{batch} rows"),
                scratch.batch,
            ));
        }
        Self::need(
            &scratch.part_o,
            "part_o",
            "[B,Hq,splits,D] f32",
            parts * s.head_dim * 4,
        )?;
        Self::need(
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
            l,
            KernelKind::Decode,
            batch,
            0,
            launch::decode(s, bufs, batch, l.nsplit, scale),
        )?;
        let bufs = MergeBufs {
            part_o: g.addr(&scratch.part_o, 0),
            part_lse: g.addr(&scratch.part_lse, 0),
            out: g.addr_mut(out, 0),
        };
        self.launch(
            l,
            KernelKind::Merge,
            batch,
            0,
            launch::merge(bufs, batch, l.nsplit),
        )
    }
}
