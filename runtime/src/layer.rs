//! One layer's geometry in the form the backends use.

use moac::geometry::CacheGeometry;

/// Capacities and offsets of one layer for one N (from the compiler's geometry, the one
/// place they are computed), with the model's shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerShape {
    pub layer: usize,
    pub n: usize,
    pub num_query_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub sink: usize,
    pub query_capacity: Vec<usize>,
    pub kv_capacity: Vec<usize>,
    pub kv_offset: Vec<usize>,
    pub total_slots: usize,
}

impl LayerShape {
    pub fn new(geo: &CacheGeometry, layer: usize) -> Self {
        let lg = &geo.layers[layer];
        let us = |v: &[u64]| v.iter().map(|&x| x as usize).collect::<Vec<_>>();
        LayerShape {
            layer,
            n: geo.n as usize,
            num_query_heads: geo.num_query_heads,
            num_kv_heads: geo.num_kv_heads,
            head_dim: geo.head_dim as usize,
            sink: geo.sink as usize,
            query_capacity: us(&lg.query_capacity),
            kv_capacity: us(&lg.kv_capacity),
            kv_offset: us(&lg.kv_offset),
            total_slots: lg.total_slots as usize,
        }
    }

    pub fn group_size(&self) -> usize {
        self.num_query_heads / self.num_kv_heads
    }

    /// Ring length of query head `h`.
    pub fn query_local(&self, h: usize) -> usize {
        self.query_capacity[h] - self.sink
    }
}

/// A CUDA grid (x, y, z).
pub type Grid = (u32, u32, u32);

/// The launch grids of docs/kernel-abi.md, stated once for every executor (emu and cuda).
impl LayerShape {
    /// Largest KV-head capacity of the layer.
    pub fn max_kv_capacity(&self) -> usize {
        self.kv_capacity.iter().copied().max().unwrap_or(0)
    }

    /// Decode splits: `ceil(max C_kv / chunk)`.
    pub fn decode_splits(&self, launch: &moac::ir::LaunchConfig) -> usize {
        self.max_kv_capacity()
            .div_ceil(launch.chunk.max(1) as usize)
    }

    /// prefill: `(ceil(P / block_q), HQ, B)`.
    pub fn prefill_grid(&self, launch: &moac::ir::LaunchConfig, p: usize, batch: usize) -> Grid {
        (
            p.div_ceil(launch.block_q.max(1) as usize).max(1) as u32,
            self.num_query_heads as u32,
            batch as u32,
        )
    }

    /// fill: `(ceil(max C_kv / rows), HKV, B)`.
    pub fn fill_grid(&self, launch: &moac::ir::LaunchConfig, batch: usize) -> Grid {
        (
            self.max_kv_capacity().div_ceil(launch.rows.max(1) as usize) as u32,
            self.num_kv_heads as u32,
            batch as u32,
        )
    }

    /// append: `(HKV, B)`.
    pub fn append_grid(&self, batch: usize) -> Grid {
        (self.num_kv_heads as u32, batch as u32, 1)
    }

    /// decode: `(nsplit, HKV * G / heads_per_cta, B)` (`heads_per_cta` 0: the group).
    pub fn decode_grid(
        &self,
        launch: &moac::ir::LaunchConfig,
        nsplit: usize,
        batch: usize,
    ) -> Grid {
        let g = self.group_size();
        let per_cta = match launch.heads_per_cta as usize {
            0 => g,
            h => h.min(g),
        };
        let ctas_per_kv_head = g / per_cta.max(1);
        (
            nsplit as u32,
            (self.num_kv_heads * ctas_per_kv_head) as u32,
            batch as u32,
        )
    }

    /// merge: `(HQ, B)`.
    pub fn merge_grid(&self, batch: usize) -> Grid {
        (self.num_query_heads as u32, batch as u32, 1)
    }
}

/// Where one of a layer's kernels lives: its spec's kind and launch configuration, the
/// translation unit that defines it (an index into the units given) and its slot there.
#[derive(Debug, Clone)]
pub struct BoundKernel {
    pub role: &'static str,
    pub name: String,
    pub kind: moac::ir::KernelKind,
    pub launch: moac::ir::LaunchConfig,
    pub unit: usize,
    pub slot: i32,
}

impl BoundKernel {
    /// The argument list of a launch: the slot, then the kind's own arguments.
    pub fn with_slot(&self, args: &[crate::args::Arg]) -> Vec<crate::args::Arg> {
        let mut all = Vec::with_capacity(args.len() + 1);
        all.push(crate::args::Arg::I32(self.slot));
        all.extend_from_slice(args);
        all
    }
}

/// The six kernels a layer runs (by role: `decode`, `merge`, `append`, `fill`,
/// `prefill_block64`, `prefill_token`), found in the lowered specs and the units.
pub fn bind_layer(
    layer: &moac::ir::LayerKernels,
    specs: &[moac::ir::KernelSpec],
    units: &[moac::emit::SourceUnit],
) -> crate::error::Result<Vec<BoundKernel>> {
    let roles: [(&'static str, &String); 6] = [
        ("decode", &layer.decode),
        ("merge", &layer.merge),
        ("append", &layer.append),
        ("fill", &layer.fill),
        ("prefill_block64", &layer.prefill_block64),
        ("prefill_token", &layer.prefill_token),
    ];
    roles
        .into_iter()
        .map(|(role, name)| {
            let spec = specs.iter().find(|s| &s.name == name).ok_or_else(|| {
                crate::Error::Backend(format!("kernel {name} is not in the lowered plan"))
            })?;
            let (unit, slot) = units
                .iter()
                .enumerate()
                .find_map(|(u, x)| x.slot(name).map(|s| (u, s)))
                .ok_or_else(|| crate::Error::Backend(format!("no source defines {name}")))?;
            Ok(BoundKernel {
                role,
                name: name.clone(),
                kind: spec.kind,
                launch: spec.launch,
                unit,
                slot: slot as i32,
            })
        })
        .collect()
}

/// The arguments of each kernel kind after the slot, in ABI order (docs/kernel-abi.md),
/// from buffer addresses (host pointers on emu, device pointers on cuda): the one place
/// both executors take them from.
impl LayerShape {
    /// `[k_new, v_new, k_cache, v_cache, seq_lens]`.
    pub fn append_args(&self, ptrs: [u64; 5], batch: usize) -> Vec<crate::args::Arg> {
        use crate::args::Arg;
        use moac::ir::Elem::{Int, Scalar};
        let [kn, vn, kc, vc, lens] = ptrs;
        vec![
            Arg::Ptr(kn, Scalar),
            Arg::Ptr(vn, Scalar),
            Arg::Ptr(kc, Scalar),
            Arg::Ptr(vc, Scalar),
            Arg::Ptr(lens, Int),
            Arg::I64(self.n as i64),
            Arg::I32(batch as i32),
        ]
    }

    /// `[k, v, k_cache, v_cache, prompt_lens]`; `p` is the prompt stride.
    pub fn fill_args(&self, ptrs: [u64; 5], p: usize, batch: usize) -> Vec<crate::args::Arg> {
        use crate::args::Arg;
        use moac::ir::Elem::{Int, Scalar};
        let [k, v, kc, vc, lens] = ptrs;
        vec![
            Arg::Ptr(k, Scalar),
            Arg::Ptr(v, Scalar),
            Arg::Ptr(kc, Scalar),
            Arg::Ptr(vc, Scalar),
            Arg::Ptr(lens, Int),
            Arg::I32(p as i32),
            Arg::I64(self.n as i64),
            Arg::I32(batch as i32),
        ]
    }

    /// `[q, k_cache, v_cache, seq_lens, part_o, part_lse]`.
    pub fn decode_args(
        &self,
        ptrs: [u64; 6],
        batch: usize,
        nsplit: usize,
        scale: f32,
    ) -> Vec<crate::args::Arg> {
        use crate::args::Arg;
        use moac::ir::Elem::{Float, Int, Scalar};
        let [q, kc, vc, lens, po, pl] = ptrs;
        vec![
            Arg::Ptr(q, Scalar),
            Arg::Ptr(kc, Scalar),
            Arg::Ptr(vc, Scalar),
            Arg::Ptr(lens, Int),
            Arg::Ptr(po, Float),
            Arg::Ptr(pl, Float),
            Arg::I64(self.n as i64),
            Arg::I32(batch as i32),
            Arg::I32(nsplit as i32),
            Arg::F32(scale),
        ]
    }

    /// `[part_o, part_lse, out]`.
    pub fn merge_args(&self, ptrs: [u64; 3], batch: usize, nsplit: usize) -> Vec<crate::args::Arg> {
        use crate::args::Arg;
        use moac::ir::Elem::{Float, Scalar};
        let [po, pl, out] = ptrs;
        vec![
            Arg::Ptr(po, Float),
            Arg::Ptr(pl, Float),
            Arg::Ptr(out, Scalar),
            Arg::I32(batch as i32),
            Arg::I32(nsplit as i32),
        ]
    }

    /// `[q, k, v, o, prompt_lens]`; `p` is the prompt stride.
    pub fn prefill_args(&self, ptrs: [u64; 5], p: usize, scale: f32) -> Vec<crate::args::Arg> {
        use crate::args::Arg;
        use moac::ir::Elem::{Int, Scalar};
        let [q, k, v, o, lens] = ptrs;
        vec![
            Arg::Ptr(q, Scalar),
            Arg::Ptr(k, Scalar),
            Arg::Ptr(v, Scalar),
            Arg::Ptr(o, Scalar),
            Arg::Ptr(lens, Int),
            Arg::I32(p as i32),
            Arg::I64(self.n as i64),
            Arg::F32(scale),
        ]
    }
}
