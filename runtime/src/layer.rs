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
