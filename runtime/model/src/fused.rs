//! The elementwise parts of a model step on plain f32 rows, each one pass with at most
//! one allocation: RMSNorm, RoPE in place, the SwiGLU gate, residual adds. The tensor
//! versions in [`crate::llama`] (`rms_norm`, `rope`) stay for the profiling code and
//! as the reference the tests (in `llama.rs`, which uses this file, not the other way)
//! compare these with. [`RopeStyle`] is defined here and re-exported by `llama`.

/// How RoPE pairs the features of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs (2i, 2i+1): GGML's "norm" mode, for GGUF llama weights (the converter
    /// permuted the Q/K rows for it).
    Interleaved,
    /// Pairs (i, i + D/2): Hugging Face's `rotate_half`.
    HalfSplit,
}

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
