//! Cache geometry of MoA, computed in exactly one place.
//!
//! For a sequence length N = prompt_len + max_new_tokens, every query head gets a
//! capacity C (semantics section 2), every KV head the max over its group (native
//! GQA), and every layer a packed, batch-major layout (see `docs/kernel-abi.md`):
//! element (b, kv head j, slot s, d) of one layer's K (or V) buffer lives at
//! `((b * total_slots + kv_offset[j] + s) * head_dim + d)`.

use crate::error::{Error, Result};
use crate::plan::{HeadRule, Settings, ValidPlan};

/// Largest N moac accepts: kernels index positions with 32-bit integers.
pub const MAX_N: u64 = i32::MAX as u64;

/// Element type of the K/V cache and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F16,
    Bf16,
}

impl std::str::FromStr for Dtype {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        Dtype::ALL
            .into_iter()
            .find(|d| d.name() == s)
            .ok_or_else(|| crate::Error::Usage(format!("unknown dtype {s:?} (f16 or bf16)")))
    }
}

impl Dtype {
    pub const ALL: [Dtype; 2] = [Dtype::F16, Dtype::Bf16];

    pub fn size_bytes(self) -> u64 {
        2
    }
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
        }
    }

    /// NaN in this type, as raw bits (what outputs are poisoned with).
    pub fn nan_bits(self) -> u16 {
        match self {
            Dtype::F16 => 0x7e00,
            Dtype::Bf16 => 0x7fc0,
        }
    }

    /// f32 to this type's bits (round to nearest even).
    pub fn to_bits(self, x: f32) -> u16 {
        match self {
            Dtype::F16 => half::f16::from_f32(x).to_bits(),
            Dtype::Bf16 => half::bf16::from_f32(x).to_bits(),
        }
    }

    /// This type's bits to f32 (exact).
    pub fn from_bits(self, bits: u16) -> f32 {
        match self {
            Dtype::F16 => half::f16::from_bits(bits).to_f32(),
            Dtype::Bf16 => half::bf16::from_bits(bits).to_f32(),
        }
    }

    /// `x` rounded to this type (to nearest even) and back to f32.
    pub fn round(self, x: f32) -> f32 {
        self.from_bits(self.to_bits(x))
    }

    /// Raw bits of this type (a kernel's output) as f32 values (exact).
    pub fn f32_of(self, bits: &[u16]) -> Vec<f32> {
        bits.iter().map(|&b| self.from_bits(b)).collect()
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Capacity of one head (semantics section 2):
/// `c = min(trunc(alpha + beta * N), N)`, `C = ceil(max(c, min) / gran) * gran`.
/// The sum is done in IEEE double without FMA, exactly like the generated kernels.
pub fn capacity(rule: HeadRule, n: u64, settings: &Settings) -> u64 {
    let nf = n as f64;
    let span = rule.alpha + rule.beta * nf;
    let c = if span >= nf {
        n
    } else if span <= 0.0 {
        0
    } else {
        span.trunc() as u64
    };
    let c = c.max(settings.min_capacity);
    c.div_ceil(settings.granularity) * settings.granularity
}

/// Geometry of one layer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LayerGeometry {
    /// C per query head.
    pub query_capacity: Vec<u64>,
    /// C per KV head: max over its group.
    pub kv_capacity: Vec<u64>,
    /// First slot of each KV head's region within a sequence's slots.
    pub kv_offset: Vec<u64>,
    /// Slots per sequence in this layer (sum of `kv_capacity`).
    pub total_slots: u64,
}

impl LayerGeometry {
    /// Ring length of a query head (its window minus the sink).
    /// One layer's capacities and offsets at N = `n` for its query heads' `rules`, with
    /// `group` query heads per KV head: each KV head holds the largest window of its group.
    pub fn of(rules: &[HeadRule], n: u64, settings: &Settings, group: usize) -> LayerGeometry {
        let query_capacity: Vec<u64> = rules.iter().map(|&r| capacity(r, n, settings)).collect();
        let kv_capacity: Vec<u64> = query_capacity
            .chunks(group.max(1))
            .map(|grp| grp.iter().copied().max().unwrap_or(settings.min_capacity))
            .collect();
        let mut kv_offset = Vec::with_capacity(kv_capacity.len());
        let mut total_slots = 0;
        for &c in &kv_capacity {
            kv_offset.push(total_slots);
            total_slots += c;
        }
        LayerGeometry {
            query_capacity,
            kv_capacity,
            kv_offset,
            total_slots,
        }
    }

    pub fn query_local(&self, head: usize, sink: u64) -> u64 {
        self.query_capacity[head] - sink
    }
    /// Ring length of a KV head's region.
    pub fn kv_local(&self, kv_head: usize, sink: u64) -> u64 {
        self.kv_capacity[kv_head] - sink
    }
}

/// Geometry of a whole plan for one N.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CacheGeometry {
    pub prompt_len: u64,
    pub max_new_tokens: u64,
    /// N = prompt_len + max_new_tokens.
    pub n: u64,
    pub sink: u64,
    pub head_dim: u64,
    pub num_query_heads: usize,
    pub num_kv_heads: usize,
    pub layers: Vec<LayerGeometry>,
}

impl CacheGeometry {
    /// Computes every capacity and offset of `plan` for a sequence of `prompt_len`
    /// prompt tokens followed by up to `max_new_tokens` generated ones.
    pub fn new(plan: &ValidPlan, prompt_len: u64, max_new_tokens: u64) -> Result<Self> {
        let n = prompt_len
            .checked_add(max_new_tokens)
            .filter(|&n| (1..=MAX_N).contains(&n))
            .ok_or_else(|| {
                Error::Usage(format!(
                    "prompt length {prompt_len} + max new tokens {max_new_tokens} must be between 1 and {MAX_N}"
                ))
            })?;
        let settings = plan.settings();
        let g = plan.model().group_size();
        let layers = plan
            .layers()
            .map(|rules| LayerGeometry::of(rules, n, settings, g))
            .collect();
        Ok(CacheGeometry {
            prompt_len,
            max_new_tokens,
            n,
            sink: settings.sink,
            head_dim: plan.model().head_dim as u64,
            num_query_heads: plan.model().num_query_heads,
            num_kv_heads: plan.model().num_kv_heads,
            layers,
        })
    }

    /// Bytes of one layer's compacted cache, K and V, for `batch` sequences.
    pub fn layer_kv_bytes(&self, layer: usize, dtype: Dtype, batch: u64) -> u64 {
        2 * batch * self.layers[layer].total_slots * self.head_dim * dtype.size_bytes()
    }

    /// Bytes of the whole compacted cache (all layers, K and V).
    pub fn kv_bytes(&self, dtype: Dtype, batch: u64) -> u64 {
        (0..self.layers.len())
            .map(|l| self.layer_kv_bytes(l, dtype, batch))
            .sum()
    }

    /// Bytes of a dense cache holding all N tokens for every KV head.
    pub fn dense_kv_bytes(&self, dtype: Dtype, batch: u64) -> u64 {
        2 * batch
            * self.layers.len() as u64
            * self.num_kv_heads as u64
            * self.n
            * self.head_dim
            * dtype.size_bytes()
    }

    /// Bytes of the official MoA cache: one region per QUERY head (GQA expanded to MHA).
    pub fn mha_expanded_kv_bytes(&self, dtype: Dtype, batch: u64) -> u64 {
        let slots: u64 = self
            .layers
            .iter()
            .flat_map(|l| l.query_capacity.iter())
            .sum();
        2 * batch * slots * self.head_dim * dtype.size_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_round_trip_and_nan() {
        for dtype in Dtype::ALL {
            assert!(dtype.from_bits(dtype.nan_bits()).is_nan());
            for x in [0.0f32, 1.0, -2.5, 0.125, 96.0] {
                assert_eq!(dtype.round(x), x, "{dtype} {x}");
            }
        }
        assert_eq!(
            Dtype::F16.to_bits(1.0 + 1.0 / 4096.0),
            Dtype::F16.to_bits(1.0)
        );
    }

    fn rule(alpha: f64, beta: f64) -> HeadRule {
        HeadRule { alpha, beta }
    }

    #[test]
    fn capacity_follows_section_two() {
        let s = Settings::default();
        // Worked by hand: trunc, min with N, at least 128, round up to 64.
        assert_eq!(capacity(rule(0.0, 0.5), 5120, &s), 2560);
        assert_eq!(capacity(rule(1024.0, 0.125), 5120, &s), 1664);
        assert_eq!(capacity(rule(-1024.0, 0.125), 5120, &s), 128);
        assert_eq!(capacity(rule(8192.0, 0.0), 5120, &s), 5120);
        assert_eq!(capacity(rule(0.0, 1.0), 100, &s), 128);
        assert_eq!(capacity(rule(0.0, 1.0), 130, &s), 192);
        assert_eq!(capacity(rule(200.9, 0.0), 1000, &s), 256);
        assert_eq!(capacity(rule(192.0, 0.0), 1000, &s), 192);
        assert_eq!(capacity(rule(192.99, 0.0), 1000, &s), 192);
        assert_eq!(capacity(rule(-5.5, 0.0), 1000, &s), 128);
        assert_eq!(capacity(rule(1e300, 0.0), 777, &s), 832);
    }
}
