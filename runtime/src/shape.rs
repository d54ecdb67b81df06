//! One layer's geometry in the form the backends use.

use moac::abi::GridDims;
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

    /// Largest KV-head capacity of the layer.
    pub fn max_kv_capacity(&self) -> usize {
        self.kv_capacity.iter().copied().max().unwrap_or(0)
    }

    /// What the launch grids of this layer depend on, for `batch` rows and a (padded)
    /// prompt of `prompt_len` ([`moac::abi::grid`]).
    pub fn grid_dims(&self, batch: usize, prompt_len: usize) -> GridDims {
        GridDims {
            batch,
            prompt_len,
            num_query_heads: self.num_query_heads,
            num_kv_heads: self.num_kv_heads,
            max_kv_capacity: self.max_kv_capacity(),
        }
    }

    /// Elements of one of K or V of a cache of `batch` rows: `[B, total_slots, D]`.
    pub fn cache_elems(&self, batch: usize) -> usize {
        batch * self.total_slots * self.head_dim
    }
}

/// The bytes one launch must move to or from memory, the one model behind every GB/s
/// moac reports (`moac tune`, `moac-gpu-bench`): every byte a kernel of `kind` has to
/// read or write at least once, for `batch` rows holding `len` tokens (decode, append:
/// after the step; fill, prefill: the prompt length), with `nsplit` decode splits and
/// elements of `elem_bytes`.
///
/// - decode (with its merge): K and V of the visible slots, q and the output, and the
///   split partials (f32 output and log-sum-exp) written by decode and read by merge;
/// - append: the new K and V read and written into the cache;
/// - fill: the prompt's K and V read and the valid slots written;
/// - prefill: q, K and V read and the output written.
pub fn bytes_moved(
    shape: &LayerShape,
    kind: moac::ir::KernelKind,
    batch: usize,
    len: usize,
    nsplit: usize,
    elem_bytes: usize,
) -> u64 {
    use moac::ir::KernelKind;
    let (hq, hkv, d, es) = (
        shape.num_query_heads,
        shape.num_kv_heads,
        shape.head_dim,
        elem_bytes,
    );
    let slots: usize = shape.kv_capacity.iter().map(|&c| c.min(len)).sum();
    let bytes = match kind {
        KernelKind::Decode | KernelKind::Merge => {
            let kv = 2 * slots * d * es;
            let q_out = 2 * hq * d * es;
            let partials = 2 * hq * nsplit * (d + 1) * 4;
            batch * (kv + q_out + partials)
        }
        KernelKind::Append => batch * 2 * 2 * hkv * d * es,
        KernelKind::Fill => batch * (2 * len * hkv * d * es + 2 * slots * d * es),
        KernelKind::Prefill(_) => batch * len * (2 * hq * d * es + 2 * hkv * d * es),
    };
    bytes as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use moac::ir::{KernelKind, PrefillMode};

    fn shape() -> LayerShape {
        LayerShape {
            layer: 0,
            n: 1024,
            num_query_heads: 4,
            num_kv_heads: 2,
            head_dim: 64,
            sink: 64,
            query_capacity: vec![256, 512, 1024, 1024],
            kv_capacity: vec![512, 1024],
            kv_offset: vec![0, 512],
            total_slots: 1536,
        }
    }

    #[test]
    fn bytes_follow_the_visible_slots() {
        let s = shape();
        // 300 tokens: both KV heads hold all 300; K and V of 600 slots x 64 x 2 bytes,
        // q and out of 4 heads, partials of 4 heads x 3 splits x 65 floats x 2.
        let want = 2 * 600 * 64 * 2 + 2 * 4 * 64 * 2 + 2 * 4 * 3 * 65 * 4;
        assert_eq!(
            bytes_moved(&s, KernelKind::Decode, 1, 300, 3, 2),
            want as u64
        );
        // Past the first head's capacity only its 512 slots are read.
        let at_2000 = bytes_moved(&s, KernelKind::Decode, 2, 2000, 1, 2);
        assert_eq!(
            at_2000,
            2 * (2 * 1536 * 64 * 2 + 2 * 4 * 64 * 2 + 2 * 4 * 65 * 4) as u64
        );
        assert_eq!(
            bytes_moved(&s, KernelKind::Append, 3, 10, 0, 2),
            3 * 4 * 2 * 64 * 2
        );
        let pf = bytes_moved(&s, KernelKind::Prefill(PrefillMode::Token), 1, 100, 0, 2);
        assert_eq!(pf, 100 * (2 * 4 * 64 * 2 + 2 * 2 * 64 * 2));
    }
}
