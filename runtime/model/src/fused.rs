//! The elementwise parts of a model step on plain f32 rows, each one pass with at most
//! one allocation: RMSNorm, RoPE in place, the SwiGLU gate, residual adds. The tensor
//! versions in [`crate::llama`] (`rms_norm`, `rope`) stay for the profiling code and
//! as the reference the tests compare these with.

use crate::llama::RopeStyle;

/// RMSNorm of each `w.len()`-long row of `x`, times `w`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let n = w.len();
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(n.max(1)) {
        let ss: f32 = row.iter().map(|v| v * v).sum();
        let inv = 1.0 / (ss / n as f32 + eps).sqrt();
        out.extend(row.iter().zip(w).map(|(v, g)| v * inv * g));
    }
    out
}

/// RoPE in place over rows of `heads * head_dim` (row i at the angles of `cos[i]`,
/// `sin[i]`, each `head_dim / 2` long).
pub fn rope(x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32], style: RopeStyle) {
    let half = head_dim / 2;
    if half == 0 {
        return;
    }
    let rows = cos.len() / half;
    let width = x.len() / rows.max(1);
    for (i, row) in x.chunks_exact_mut(width.max(1)).enumerate() {
        let (c, s) = (
            &cos[i * half..(i + 1) * half],
            &sin[i * half..(i + 1) * half],
        );
        for head in row.chunks_exact_mut(head_dim) {
            match style {
                RopeStyle::Interleaved => {
                    for (j, pair) in head.chunks_exact_mut(2).enumerate() {
                        let (a, b) = (pair[0], pair[1]);
                        pair[0] = a * c[j] - b * s[j];
                        pair[1] = a * s[j] + b * c[j];
                    }
                }
                RopeStyle::HalfSplit => {
                    let (lo, hi) = head.split_at_mut(half);
                    for j in 0..half {
                        let (a, b) = (lo[j], hi[j]);
                        lo[j] = a * c[j] - b * s[j];
                        hi[j] = b * c[j] + a * s[j];
                    }
                }
            }
        }
    }
}

/// silu(gate) * up.
pub fn swiglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.iter()
        .zip(up)
        .map(|(&g, &u)| g / (1.0 + (-g).exp()) * u)
        .collect()
}

/// x += y.
pub fn add_into(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    //! The fused row functions against the tensor versions (candle ops) on fresh random
    //! inputs, both RoPE styles, rows at different positions.
    use super::*;
    use crate::llama::{Llama, LlamaConfig};
    use candle_core::{Device, Tensor};
    use moac_runtime::reference::check::Rng;

    fn model(rope: RopeStyle) -> Llama {
        let config = LlamaConfig {
            num_layers: 1,
            hidden: 96,
            num_heads: 3,
            num_kv_heads: 1,
            head_dim: 32,
            vocab_size: 50,
            rope_theta: 10000.0,
            rms_eps: 1e-5,
            context_len: 4096,
            rope,
        };
        Llama::random(config, 64, 1).unwrap()
    }

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-5 * y.abs().max(1.0), "{x} vs {y}");
        }
    }

    #[test]
    fn fused_rows_equal_the_tensor_ops() {
        let mut rng = Rng::fresh("fused");
        for style in [RopeStyle::Interleaved, RopeStyle::HalfSplit] {
            let m = model(style);
            let (rows, hidden) = (5, 96);
            let x: Vec<f32> = (0..rows * hidden).map(|_| rng.uniform() * 3.0).collect();
            let w: Vec<f32> = (0..hidden).map(|_| 1.0 + rng.uniform() * 0.5).collect();
            let xt = Tensor::from_vec(x.clone(), (rows, hidden), &Device::Cpu).unwrap();
            let wt = Tensor::from_vec(w.clone(), hidden, &Device::Cpu).unwrap();
            let want = m.rms_norm(&xt, &wt).unwrap().flatten_all().unwrap();
            close(&rms_norm(&x, &w, 1e-5), &want.to_vec1::<f32>().unwrap());

            // Two rows of a batch, 5 positions each, 3 heads of 32.
            let positions: Vec<usize> = (0..10).map(|_| rng.below(4000) as usize).collect();
            let (cos, sin) = m.rope_angles(&positions).unwrap();
            let (ct, st) = m.rope_tables(&positions, 2).unwrap();
            let q: Vec<f32> = (0..10 * 96).map(|_| rng.uniform()).collect();
            let qt = Tensor::from_vec(q.clone(), (2, 5, 3, 32), &Device::Cpu).unwrap();
            let want = m.rope(&qt, &ct, &st).unwrap().flatten_all().unwrap();
            let mut got = q;
            rope(&mut got, 32, &cos, &sin, style);
            close(&got, &want.to_vec1::<f32>().unwrap());
        }
        let g: Vec<f32> = (0..50).map(|_| rng.uniform() * 8.0).collect();
        let u: Vec<f32> = (0..50).map(|_| rng.uniform()).collect();
        let gt = Tensor::from_vec(g.clone(), 50, &Device::Cpu).unwrap();
        let ut = Tensor::from_vec(u.clone(), 50, &Device::Cpu).unwrap();
        let want = (gt.silu().unwrap() * ut).unwrap().to_vec1::<f32>().unwrap();
        close(&swiglu(&g, &u), &want);
        let mut a = g.clone();
        add_into(&mut a, &u);
        let want: Vec<f32> = g.iter().zip(&u).map(|(x, y)| x + y).collect();
        assert_eq!(a, want);
    }
}
