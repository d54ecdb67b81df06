//! Test support shared by the runtime's integration tests: a small seeded random
//! generator (fresh seed per run, printed; MOAC_TEST_SEED reproduces a run), plans of
//! any shape, and a float64 brute force of MoA attention that works on positions (dense
//! K/V of the whole sequence) with its own statement of the visibility rules.
#![allow(dead_code)]

use moac::plan::{ModelShape, Settings, ValidPlan};
use std::path::Path;

pub struct Rng(u64);

impl Rng {
    /// A generator seeded from MOAC_TEST_SEED or the clock; prints the seed.
    pub fn fresh(test: &str) -> Rng {
        let seed = std::env::var("MOAC_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        eprintln!("{test}: MOAC_TEST_SEED={seed}");
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    pub fn next_u64(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }
}

/// A plan of one layer with the given rules per query head.
pub fn plan(hq: usize, hkv: usize, d: usize, rules: &[(f64, f64)]) -> ValidPlan {
    assert_eq!(rules.len(), hq);
    let model = ModelShape {
        num_layers: 1,
        num_query_heads: hq,
        num_kv_heads: hkv,
        head_dim: d,
    };
    let alphas = vec![rules.iter().map(|r| r.0).collect::<Vec<_>>()];
    let betas = vec![rules.iter().map(|r| r.1).collect::<Vec<_>>()];
    moac::plan::validate(
        Path::new("test-plan"),
        model,
        Settings::default(),
        &alphas,
        &betas,
    )
    .unwrap()
}

/// Decode visibility, restated: p < t and (p in the sink or within `local` of the end).
pub fn sees_decode(t: usize, sink: usize, local: usize, p: usize) -> bool {
    p < t && (p < sink || t - p <= local)
}

/// Block64 visibility, restated: causal, and the key's block is a sink block or one of
/// the `local / 64` blocks ending at the query's block.
pub fn sees_block64(q: usize, k: usize, sink: usize, local: usize) -> bool {
    k <= q && (k < (sink / 64) * 64 || q / 64 - k / 64 < local / 64)
}

/// Softmax attention in f64 of one query over the keys where `seen` is true.
/// `k(p)`/`v(p)` give the vectors at position p.
pub fn attend_f64(
    q: &[f32],
    n: usize,
    seen: impl Fn(usize) -> bool,
    k: impl Fn(usize) -> Vec<f32>,
    v: impl Fn(usize) -> Vec<f32>,
    scale: f64,
) -> Vec<f64> {
    let d = q.len();
    let mut scores = Vec::new();
    for p in 0..n {
        if seen(p) {
            let kp = k(p);
            let s: f64 = (0..d).map(|i| q[i] as f64 * kp[i] as f64).sum::<f64>() * scale;
            scores.push((p, s));
        }
    }
    let m = scores.iter().map(|s| s.1).fold(f64::NEG_INFINITY, f64::max);
    let mut out = vec![0f64; d];
    let mut den = 0.0;
    for &(p, s) in &scores {
        let w = (s - m).exp();
        den += w;
        let vp = v(p);
        for i in 0..d {
            out[i] += w * vp[i] as f64;
        }
    }
    out.iter().map(|x| x / den).collect()
}

/// Rounds f32 values through a dtype (what a kernel actually sees).
pub fn round(values: &[f32], dtype: moac::Dtype) -> Vec<f32> {
    values
        .iter()
        .map(|&x| match dtype {
            moac::Dtype::F16 => half::f16::from_f32(x).to_f32(),
            moac::Dtype::Bf16 => half::bf16::from_f32(x).to_f32(),
        })
        .collect()
}

/// Max absolute difference.
pub fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y).abs())
        .fold(0.0, f64::max)
}
