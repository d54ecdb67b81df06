//! Runs one layer's generated kernels on the `emu` engine over host buffers: the same
//! grids, arguments and buffer layouts the `cuda` backend uses (docs/kernel-abi.md).
//! Every output buffer is poisoned (NaN) before a launch, so an element a kernel fails
//! to write shows up as a wrong number.

use crate::args::{Arg, ArgPack};
use crate::emu::{EmuBuild, EmuModule};
use crate::error::{shape_err, Result};
use crate::exec::{check_lens, check_steps};
use crate::layer::{bind_layer, BoundKernel, LayerShape};
use moac::emit::SourceUnit;
use moac::geometry::Dtype;
use moac::ir::{KernelSpec, LaunchConfig, LayerKernels, PrefillMode};
use std::collections::BTreeMap;

/// NaN in the element type, as raw bits.
pub fn nan_bits(dtype: Dtype) -> u16 {
    match dtype {
        Dtype::F16 => 0x7e00,
        Dtype::Bf16 => 0x7fc0,
    }
}

/// f32 to the element type's bits (round to nearest even).
pub fn to_bits(x: f32, dtype: Dtype) -> u16 {
    match dtype {
        Dtype::F16 => half::f16::from_f32(x).to_bits(),
        Dtype::Bf16 => half::bf16::from_f32(x).to_bits(),
    }
}

/// The element type's bits to f32 (exact).
pub fn from_bits(x: u16, dtype: Dtype) -> f32 {
    match dtype {
        Dtype::F16 => half::f16::from_bits(x).to_f32(),
        Dtype::Bf16 => half::bf16::from_bits(x).to_f32(),
    }
}

/// One layer's compacted cache on the host: K and V `[B, total_slots, D]` as raw bits.
#[derive(Debug, Clone)]
pub struct HostCache {
    pub batch: usize,
    pub k: Vec<u16>,
    pub v: Vec<u16>,
}

/// A layer's kernels, built for the emu engine.
pub struct EmuLayer {
    pub shape: LayerShape,
    pub dtype: Dtype,
    modules: Vec<EmuModule>,
    /// Entry point names of the units, by unit index.
    entries: Vec<String>,
    kernels: BTreeMap<&'static str, (BoundKernel, usize)>,
}

/// The address of a buffer the kernel reads.
fn addr<T>(v: &[T]) -> u64 {
    v.as_ptr() as u64
}

/// A pointer the kernel writes through: taken from a mutable borrow.
fn addr_mut<T>(v: &mut [T]) -> u64 {
    v.as_mut_ptr() as u64
}

impl EmuLayer {
    /// Builds the emu modules for one layer from its lowered kernels and the translation
    /// units that define them.
    pub fn new(
        shape: LayerShape,
        dtype: Dtype,
        layer: &LayerKernels,
        specs: &[KernelSpec],
        units: &[SourceUnit],
        build: &EmuBuild,
    ) -> Result<EmuLayer> {
        let mut modules = Vec::new();
        let mut module_of: BTreeMap<usize, usize> = BTreeMap::new();
        let mut kernels = BTreeMap::new();
        for k in bind_layer(layer, specs, units)? {
            let m = match module_of.get(&k.unit) {
                Some(&m) => m,
                None => {
                    let u = &units[k.unit];
                    modules.push(EmuModule::build(&u.source, &[u.name.as_str()], build)?);
                    module_of.insert(k.unit, modules.len() - 1);
                    modules.len() - 1
                }
            };
            kernels.insert(k.role, (k, m));
        }
        Ok(EmuLayer {
            shape,
            dtype,
            modules,
            kernels,
            entries: units.iter().map(|u| u.name.clone()).collect(),
        })
    }

    fn run(&self, role: &str, grid: (u32, u32, u32), threads: u32, args: &[Arg]) -> Result<()> {
        let (k, m) = &self.kernels[role];
        let mut pack = ArgPack::new(&k.name, k.kind, &k.with_slot(args))?;
        self.modules[*m].launch(&self.entries[k.unit], grid, (threads, 1, 1), &mut pack)
    }

    fn launch(&self, role: &str) -> LaunchConfig {
        self.kernels[role].0.launch
    }

    /// A new cache for `batch` rows, poisoned with NaN.
    pub fn new_cache(&self, batch: usize) -> HostCache {
        let n = batch * self.shape.total_slots * self.shape.head_dim;
        HostCache {
            batch,
            k: vec![nan_bits(self.dtype); n],
            v: vec![nan_bits(self.dtype); n],
        }
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
        let s = &self.shape;
        let b = prompt_lens.len();
        if q.len() != b * p * s.num_query_heads * s.head_dim
            || k.len() != b * p * s.num_kv_heads * s.head_dim
            || v.len() != k.len()
        {
            return shape_err("prefill: buffer sizes do not match [B,P,H,D]");
        }
        check_lens(s, prompt_lens, p)?;
        let mut o = vec![nan_bits(self.dtype); q.len()];
        let role = match mode {
            PrefillMode::Block64 => "prefill_block64",
            PrefillMode::Token => "prefill_token",
        };
        let lc = self.launch(role);
        let grid = s.prefill_grid(&lc, p, b);
        let args = s.prefill_args(
            [
                addr(q),
                addr(k),
                addr(v),
                addr_mut(&mut o),
                addr(prompt_lens),
            ],
            p,
            scale,
        );
        self.run(role, grid, lc.threads, &args)?;
        Ok(o)
    }

    /// Fills `cache` from a prompt.
    pub fn fill(
        &self,
        cache: &mut HostCache,
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
        let lc = self.launch("fill");
        let grid = s.fill_grid(&lc, b);
        let args = s.fill_args(
            [
                addr(k),
                addr(v),
                addr_mut(&mut cache.k),
                addr_mut(&mut cache.v),
                addr(prompt_lens),
            ],
            p,
            b,
        );
        self.run("fill", grid, lc.threads, &args)
    }

    /// Appends one token per row (`seq_lens`: tokens held after the append).
    pub fn append(
        &self,
        cache: &mut HostCache,
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
        check_steps(s, seq_lens)?;
        let lc = self.launch("append");
        let args = s.append_args(
            [
                addr(k_new),
                addr(v_new),
                addr_mut(&mut cache.k),
                addr_mut(&mut cache.v),
                addr(seq_lens),
            ],
            b,
        );
        self.run("append", s.append_grid(b), lc.threads, &args)
    }

    /// Decode attention (split-KV kernel, then the merge): `q` [B,Hq,D] -> o [B,Hq,D].
    pub fn decode(
        &self,
        cache: &HostCache,
        q: &[u16],
        seq_lens: &[i32],
        scale: f32,
    ) -> Result<Vec<u16>> {
        let s = &self.shape;
        let b = seq_lens.len();
        if b != cache.batch || q.len() != b * s.num_query_heads * s.head_dim {
            return shape_err("decode: buffer sizes do not match [B,Hq,D] and the cache");
        }
        check_steps(s, seq_lens)?;
        let lc = self.launch("decode");
        let nsplit = s.decode_splits(&lc);
        let mut part_o = vec![f32::NAN; b * s.num_query_heads * nsplit * s.head_dim];
        let mut part_lse = vec![f32::NAN; b * s.num_query_heads * nsplit];
        let args = s.decode_args(
            [
                addr(q),
                addr(&cache.k),
                addr(&cache.v),
                addr(seq_lens),
                addr_mut(&mut part_o),
                addr_mut(&mut part_lse),
            ],
            b,
            nsplit,
            scale,
        );
        self.run("decode", s.decode_grid(&lc, nsplit, b), lc.threads, &args)?;
        let mut out = vec![nan_bits(self.dtype); q.len()];
        let ml = self.launch("merge");
        let args = s.merge_args(
            [addr(&part_o), addr(&part_lse), addr_mut(&mut out)],
            b,
            nsplit,
        );
        self.run("merge", s.merge_grid(b), ml.threads, &args)?;
        Ok(out)
    }
}
