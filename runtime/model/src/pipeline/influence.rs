//! Attention influence: how much the response loss of one sample would change if an
//! attention entry were masked (MoA's profile; `docs/plan-pipeline.md`, section 2).
//!
//! For head h with probabilities A = softmax(Q K^T / sqrt(d) + causal) and G = dL/dA =
//! dO V^T, masking entry (i, j) and renormalizing row i changes the loss by, to first
//! order, `E_ij = -A_ij (G_ij - S_i) / (1 - A_ij)` with `S_i = sum_n A_in G_in`; MoA
//! keeps |E| and takes a mask's influence as the sum over the entries it removes.
//!
//! moac computes dL/dO with an exact, hand-written backward pass of the whole model in
//! f32 (no autograd graph: one layer's N x N probabilities of one head at a time, the
//! layers' inputs and attention outputs kept from the forward pass), and reduces |E| on
//! the fly into the O(N) sums every candidate span's loss needs ([`HeadSums`]), with the
//! masks moac's kernels apply: the prompt's rows under prefill's `moa-block64` rule, the
//! answer's rows under decode's token rule (the answer is decoded at run time).

use super::causal::{self, band_end, Square};
use crate::fused;
use crate::llama::{dense_matrix, Dense, Layer, Llama};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, D};
use moac_runtime::backend::cpu::exp_le0;
use rayon::prelude::*;

/// Added to `1 - A_ij` in the influence formula (MoA's epsilon).
const EPS: f32 = 1e-6;
/// Block size of the prefill rule.
const BLOCK: usize = 64;

/// The sums over one query head's |E| that the loss of every span needs, for one
/// sequence length N.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadSums {
    /// Over every causal entry.
    pub total: f64,
    /// Over the entries whose key lies in the sink (always kept).
    pub sink: f64,
    /// Answer rows (decode rule), keys past the sink, by distance `i - j` ([N]).
    pub token: Vec<f64>,
    /// Prompt rows (`moa-block64` rule), keys past the sink, by block distance
    /// `i/64 - j/64` ([ceil(N/64)]).
    pub block: Vec<f64>,
    /// The loss of a window of `64 k` tokens past the sink, row by row
    /// ([ceil(N/64) + 1], index k): the sum over rows of the first-order change of the
    /// row's masked entries taken together, `|sum_j dS_ij| / (1 - sum_j A_ij)` over the
    /// entries j the window drops (the entry-wise |E| lets a diffuse head's many small
    /// entries add up where, masked together, they cancel). Zero where not computed.
    pub rows: Vec<f64>,
}

impl HeadSums {
    /// Adds `e`, the influence of entry (query `i`, key `j`), to the total and to the
    /// bin the run-time masks put it in: the sink, else by block distance for prompt rows
    /// (before `prompt_len`) and by token distance for the others.
    fn add_entry(&mut self, i: usize, j: usize, e: f64, sink: usize, prompt_len: usize) {
        self.total += e;
        if j < sink {
            self.sink += e;
        } else if i >= prompt_len {
            self.token[i - j] += e;
        } else {
            self.block[i / BLOCK - j / BLOCK] += e;
        }
    }

    /// Zero sums for sequences of up to `n` tokens.
    pub fn new(n: usize) -> HeadSums {
        HeadSums {
            total: 0.0,
            sink: 0.0,
            token: vec![0.0; n],
            block: vec![0.0; n.div_ceil(BLOCK)],
            rows: vec![0.0; n.div_ceil(BLOCK) + 1],
        }
    }

    /// [`loss`](Self::loss) with the masked entries of each row taken together
    /// ([`rows`](Self::rows)).
    pub fn row_loss(&self, capacity: u64, sink: u64) -> f64 {
        let k = (capacity.saturating_sub(sink) as usize) / BLOCK;
        self.rows
            .get(k.min(self.rows.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    }

    /// The influence of everything a head of capacity `capacity` does not see (sink
    /// `sink` tokens inside the capacity, the rest a window of recent tokens).
    pub fn loss(&self, capacity: u64, sink: u64) -> f64 {
        let local = capacity.saturating_sub(sink) as usize;
        let kept_token: f64 = self.token.iter().take(local).sum();
        let kept_block: f64 = self.block.iter().take(local / BLOCK).sum();
        (self.total - self.sink - kept_token - kept_block).max(0.0)
    }

    /// `self += weight * other` (sums of the same length).
    pub fn add(&mut self, other: &HeadSums, weight: f64) {
        self.total += weight * other.total;
        self.sink += weight * other.sink;
        for (a, b) in self.token.iter_mut().zip(&other.token) {
            *a += weight * b;
        }
        for (a, b) in self.block.iter_mut().zip(&other.block) {
            *a += weight * b;
        }
        for (a, b) in self.rows.iter_mut().zip(&other.rows) {
            *a += weight * b;
        }
    }
}

/// One sample's profile: the response loss and every head's sums.
#[derive(Debug, Clone)]
pub struct Influence {
    /// Tokens of the sample (prompt + answer).
    pub len: usize,
    /// Mean cross-entropy of the answer tokens under dense attention.
    pub loss: f64,
    /// [layer][query head].
    pub heads: Vec<Vec<HeadSums>>,
    /// [layer][query head]: the attention on the needle at the copy steps
    /// ([`needle_sums`]); zero when the answer is not copied from the prompt.
    pub needle: Vec<Vec<HeadSums>>,
    /// [layer][query head]: the influence |E| of the needle entries at the copy steps
    /// (what masking the needle would cost the answer, to first order; [`needle_sums`]
    /// over |dS| / (1 - A) instead of A).
    pub needle_influence: Vec<Vec<HeadSums>>,
    /// Copy steps behind `needle`.
    pub copy_steps: usize,
}

/// Scales attention entry (layer, head, row, col) by `factor` and renormalizes its row
/// (finite-difference checks of the influence formula).
#[derive(Debug, Clone, Copy)]
pub struct Perturb {
    pub layer: usize,
    pub head: usize,
    pub row: usize,
    pub col: usize,
    pub factor: f32,
}

/// Sees one head's probabilities A and dS = A * (G - S) (both [T, T], row-major) during
/// the backward pass: `(layer, head, a, ds)`. For tests.
pub type Observer<'a> = dyn FnMut(usize, usize, &[f32], &[f32]) + 'a;

/// x [T, in] times w^T (w [out, in]).
fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(x.matmul(&w.t()?)?)
}

/// Row-wise causal softmax of `scores` [T, T] (scaled), in place, as [`causal_scores`]
/// leaves it (entries right of each band's end already 0); entries above the diagonal
/// become 0. Applies `perturb` (row, col, factor) after normalizing.
fn causal_softmax(scores: &mut [f32], t: usize, scale: f32, perturb: Option<(usize, usize, f32)>) {
    for i in 0..t {
        let (live, rest) = scores[i * t..i * t + band_end(i, t)].split_at_mut(i + 1);
        for s in live.iter_mut() {
            *s *= scale;
        }
        let max = max_f32(live);
        for s in live.iter_mut() {
            *s = exp_le0(*s - max);
        }
        let inv = (1.0 / sum_f64(live)) as f32;
        for s in live.iter_mut() {
            *s *= inv;
        }
        rest.fill(0.0);
        if let Some((r, c, f)) = perturb {
            if r == i && c <= i {
                live[c] *= f;
                let inv = (1.0 / sum_f64(live)) as f32;
                for s in live.iter_mut() {
                    *s *= inv;
                }
            }
        }
    }
}

/// Sum of `xs` in f64, eight partial sums at a time (the compiler vectorizes it).
fn sum_f64(xs: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let chunks = xs.chunks_exact(8);
    let rest: f64 = chunks.remainder().iter().map(|&x| x as f64).sum();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x as f64;
        }
    }
    acc.iter().sum::<f64>() + rest
}

/// `a . b` in f64 (slices of one length), eight partial sums at a time.
fn dot_f64(a: &[f32], b: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let rest: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(&x, &y)| x as f64 * y as f64)
        .sum();
    for (x, y) in ca.zip(cb) {
        for ((s, &x), &y) in acc.iter_mut().zip(x).zip(y) {
            *s += x as f64 * y as f64;
        }
    }
    acc.iter().sum::<f64>() + rest
}

/// The largest of `xs` (not empty, no NaN), sixteen lanes at a time.
fn max_f32(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let chunks = xs.chunks_exact(16);
    let rest = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    for c in chunks {
        for (m, &x) in acc.iter_mut().zip(c) {
            *m = if x > *m { x } else { *m };
        }
    }
    acc.iter().fold(rest, |m, &x| m.max(x))
}

/// Head h of x [T, H, D] as [T, D] rows.
fn head(x: &Tensor, h: usize) -> Result<Vec<f32>> {
    Ok(x.narrow(1, h, 1)?.flatten_all()?.to_vec1::<f32>()?)
}

/// The lower triangle (and diagonal) of a [T, T] buffer, 0 above.
fn lower(m: &[f32], t: usize) -> Vec<f32> {
    let mut out = vec![0f32; t * t];
    for i in 0..t {
        out[i * t..=i * t + i].copy_from_slice(&m[i * t..=i * t + i]);
    }
    out
}

/// [T, D] rows as a tensor.
fn rows(x: Vec<f32>, t: usize) -> Result<Tensor> {
    let d = x.len() / t.max(1);
    Ok(Tensor::from_vec(x, (t, d), &Device::Cpu)?)
}

impl Llama {
    fn check_profile_input(&self, tokens: &[u32], prompt_len: usize) -> Result<()> {
        if prompt_len == 0 || prompt_len >= tokens.len() {
            return Err(Error::Usage(format!(
                "a profiled sample needs a prompt and an answer (prompt {prompt_len} of {} tokens)",
                tokens.len()
            )));
        }
        if tokens.len() > self.config.context_len {
            return Err(Error::TooLong {
                what: "profiled sample".into(),
                len: tokens.len(),
                max: self.config.context_len,
            });
        }
        if let Some(&bad) = tokens
            .iter()
            .find(|&&id| id as usize >= self.config.vocab_size)
        {
            return Err(Error::Usage(format!(
                "token id {bad} is outside the vocabulary ({} ids)",
                self.config.vocab_size
            )));
        }
        Ok(())
    }

    /// q [T,Hq,D] and k, v [T,Hkv,D] of one layer (RoPE applied), from its input x;
    /// `cos`, `sin` [T, D/2] from `rope_angles`.
    pub(super) fn qkv(
        &self,
        l: &Layer,
        w: &Dense,
        x: &Tensor,
        cos: &[f32],
        sin: &[f32],
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let c = &self.config;
        let t = x.dim(0)?;
        let n1 = self.rms_norm(x, &l.attn_norm)?;
        let q = self.rope_rows(linear(&n1, &w.wq)?, c.num_heads, cos, sin)?;
        let k = self.rope_rows(linear(&n1, &w.wk)?, c.num_kv_heads, cos, sin)?;
        let v = linear(&n1, &w.wv)?.reshape((t, c.num_kv_heads, c.head_dim))?;
        Ok((q, k, v))
    }

    /// RoPE of x [T, heads * D] at the angles `cos`, `sin` [T, D/2] (a negated `sin`
    /// undoes it), as [T, heads, D].
    fn rope_rows(&self, x: Tensor, heads: usize, cos: &[f32], sin: &[f32]) -> Result<Tensor> {
        let c = &self.config;
        let t = x.dim(0)?;
        let mut rows = x.flatten_all()?.to_vec1::<f32>()?;
        fused::rope(&mut rows, c.head_dim, cos, sin, c.rope);
        Ok(Tensor::from_vec(
            rows,
            (t, heads, c.head_dim),
            &Device::Cpu,
        )?)
    }

    /// Probabilities [T*T] of query head h against its KV head (row i defined up to its
    /// band's end, 0 right of the diagonal).
    fn probs(
        &self,
        q: &Tensor,
        k: &Tensor,
        h: usize,
        perturb: Option<(usize, usize, f32)>,
    ) -> Result<Square> {
        let c = &self.config;
        let g = c.num_heads / c.num_kv_heads;
        let t = q.dim(0)?;
        let qh = head(q, h)?;
        let kh = head(k, h / g)?;
        let mut p = causal::scores(&qh, &kh, t, c.head_dim);
        causal_softmax(&mut p, t, 1.0 / (c.head_dim as f32).sqrt(), perturb);
        Ok(p)
    }

    /// The MLP's gate and up products of x2 (what its backward needs).
    fn gate_up(&self, l: &Layer, w: &Dense, x2: &Tensor) -> Result<(Tensor, Tensor)> {
        let n2 = self.rms_norm(x2, &l.ffn_norm)?;
        Ok((linear(&n2, &w.gate)?, linear(&n2, &w.up)?))
    }

    /// The MLP's residual branch of x2 and its gate and up products.
    fn mlp(&self, l: &Layer, w: &Dense, x2: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (g, u) = self.gate_up(l, w, x2)?;
        let out = linear(&(g.silu()? * &u)?, &w.down)?;
        Ok((out, g, u))
    }

    /// Dense forward of one sequence: the inputs of every layer, every layer's residual
    /// stream after its attention (`x + attention(x) W_o^T`, the MLP's input) [T,
    /// hidden], and the last layer's output.
    pub(super) fn forward_exact(
        &self,
        tokens: &[u32],
        perturb: Option<Perturb>,
    ) -> Result<(Vec<Tensor>, Vec<Tensor>, Tensor)> {
        let c = &self.config;
        let t = tokens.len();
        let positions: Vec<usize> = (0..t).collect();
        let (cos, sin) = self.rope_angles(&positions)?;
        let mut x = Tensor::from_vec(self.embed.rows_f32(tokens)?, (t, c.hidden), &Device::Cpu)?;
        let (mut inputs, mut mids) = (Vec::new(), Vec::new());
        for (li, l) in self.layers.iter().enumerate() {
            let w = Dense::of(l)?;
            let (q, k, v) = self.qkv(l, &w, &x, &cos, &sin)?;
            // The heads are independent: they run in parallel (each with its own [T, T]
            // buffer; the products inside run on the same pool).
            let outs: Vec<Tensor> = (0..c.num_heads)
                .into_par_iter()
                .map(|h| -> Result<Tensor> {
                    let pt = perturb
                        .filter(|p| p.layer == li && p.head == h)
                        .map(|p| (p.row, p.col, p.factor));
                    let p = self.probs(&q, &k, h, pt)?;
                    let vh = head(&v, h / (c.num_heads / c.num_kv_heads))?;
                    rows(causal::left(&p, &vh, t, c.head_dim, 1.0), t)
                })
                .collect::<Result<_>>()?;
            let a = Tensor::stack(&outs, 1)?.reshape((t, c.num_heads * c.head_dim))?;
            let x2 = (&x + linear(&a, &w.wo)?)?;
            let (m, ..) = self.mlp(l, &w, &x2)?;
            inputs.push(x);
            x = (&x2 + m)?;
            mids.push(x2);
        }
        Ok((inputs, mids, x))
    }

    /// Mean cross-entropy (f64) of tokens[prompt_len..] predicted from the final layer
    /// output `x` [T, hidden], and its gradient with respect to `x`.
    fn response_loss(
        &self,
        x: &Tensor,
        tokens: &[u32],
        prompt_len: usize,
    ) -> Result<(f64, Tensor)> {
        let t = tokens.len();
        let answer = t - prompt_len;
        let rows = x.narrow(0, prompt_len - 1, answer)?;
        let n = self.rms_norm(&rows, &self.norm)?;
        let lm = dense_matrix(&self.lm_head)?;
        let logits = linear(&n, &lm)?.to_vec2::<f32>()?;
        let mut loss = 0.0f64;
        let mut grad = Vec::with_capacity(answer * self.config.vocab_size);
        for (r, row) in logits.iter().enumerate() {
            let target = tokens[prompt_len + r] as usize;
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
            let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
            let lse = max + sum.ln();
            loss += lse - row[target] as f64;
            for (i, &v) in row.iter().enumerate() {
                let p = (v as f64 - lse).exp();
                let g = if i == target { p - 1.0 } else { p };
                grad.push((g / answer as f64) as f32);
            }
        }
        let dlogits = Tensor::from_vec(grad, (answer, self.config.vocab_size), &Device::Cpu)?;
        let dn = dlogits.matmul(&lm)?;
        let drows = self.rms_norm_backward(&rows, &self.norm, &dn)?;
        let hidden = self.config.hidden;
        let mut parts = Vec::new();
        if prompt_len > 1 {
            parts.push(Tensor::zeros(
                (prompt_len - 1, hidden),
                DType::F32,
                &Device::Cpu,
            )?);
        }
        parts.push(drows);
        parts.push(Tensor::zeros((1, hidden), DType::F32, &Device::Cpu)?);
        Ok((loss / answer as f64, Tensor::cat(&parts, 0)?))
    }

    /// dL/dx of y = rms_norm(x) * w, given dL/dy.
    fn rms_norm_backward(&self, x: &Tensor, w: &Tensor, dy: &Tensor) -> Result<Tensor> {
        let n = x.dim(D::Minus1)? as f64;
        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + self.config.rms_eps as f64)?
            .sqrt()?
            .recip()?;
        let gw = dy.broadcast_mul(w)?;
        let dot = ((x * &gw)?.sum_keepdim(D::Minus1)? / n)?;
        let r3 = r.powf(3.0)?;
        Ok((gw.broadcast_mul(&r)? - x.broadcast_mul(&(r3 * dot)?)?)?)
    }

    /// The response loss of one sample (prompt, then answer) under dense attention, with
    /// entry `perturb` scaled (for finite-difference checks).
    pub fn response_loss_exact(
        &self,
        tokens: &[u32],
        prompt_len: usize,
        perturb: Option<Perturb>,
    ) -> Result<f64> {
        self.check_profile_input(tokens, prompt_len)?;
        let (_, _, x) = self.forward_exact(tokens, perturb)?;
        Ok(self.response_loss(&x, tokens, prompt_len)?.0)
    }

    /// Profiles one sample: `tokens` = prompt (`prompt_len` tokens, prefilled at run
    /// time) then the answer (decoded at run time; its tokens are the loss). `sink`:
    /// the plan's sink (a multiple of 64). The sums are sized for `n` >= tokens.len()
    /// (the length level the sample stands for).
    pub fn influence(
        &self,
        tokens: &[u32],
        prompt_len: usize,
        n: usize,
        sink: usize,
        mut observer: Option<&mut Observer<'_>>,
    ) -> Result<Influence> {
        self.check_profile_input(tokens, prompt_len)?;
        if sink == 0 || !sink.is_multiple_of(BLOCK) {
            return Err(Error::Usage(format!(
                "profiling needs a sink that is a positive multiple of {BLOCK} (got {sink})"
            )));
        }
        let c = &self.config;
        let t = tokens.len();
        let n = n.max(t);
        let g = c.num_heads / c.num_kv_heads;
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        let (inputs, mids, x) = self.forward_exact(tokens, None)?;
        let (loss, mut dx) = self.response_loss(&x, tokens, prompt_len)?;
        let positions: Vec<usize> = (0..t).collect();
        let (cos, sin) = self.rope_angles(&positions)?;
        let nsin: Vec<f32> = sin.iter().map(|&s| -s).collect();
        let mut heads = vec![Vec::new(); c.num_layers];
        let mut needle_heads = vec![Vec::new(); c.num_layers];
        let mut needle_e_heads = vec![Vec::new(); c.num_layers];
        let needle = super::heads::needle_mask(tokens, prompt_len);
        let copies = super::heads::copy_steps(tokens, prompt_len, &needle);
        for li in (0..c.num_layers).rev() {
            let l = &self.layers[li];
            let w = Dense::of(l)?;
            let x_in = &inputs[li];
            let (q, k, v) = self.qkv(l, &w, x_in, &cos, &sin)?;
            let x2 = &mids[li];
            // MLP backward (the forward's gate and up again; its down product is not
            // needed).
            let (gate, up) = self.gate_up(l, &w, x2)?;
            let dm = dx.matmul(&w.down)?;
            let sg = (gate.neg()?.exp()? + 1.0)?.recip()?;
            let silu = (&gate * &sg)?;
            let dsilu = (&sg * ((&gate * (1.0 - &sg)?)? + 1.0)?)?;
            let dgate = ((&dm * &up)? * dsilu)?;
            let dup = (&dm * silu)?;
            let dn2 = (dgate.matmul(&w.gate)? + dup.matmul(&w.up)?)?;
            let dx2 = (&dx + self.rms_norm_backward(x2, &l.ffn_norm, &dn2)?)?;
            // Attention backward, one query head at a time.
            let da = dx2.matmul(&w.wo)?.reshape((t, c.num_heads, c.head_dim))?;
            // Each query head's backward is independent: they run in parallel (unless a
            // test observes them, in order).
            let keep = observer.is_some();
            let one = |h: usize| -> Result<HeadGrad> {
                let kv = h / g;
                let a = self.probs(&q, &k, h, None)?;
                let d_o = head(&da, h)?;
                let vh = head(&v, kv)?;
                let mut ds = causal::scores(&d_o, &vh, t, c.head_dim);
                let mut sums = HeadSums::new(n);
                let mut needle_sums_h = HeadSums::new(n);
                needle_sums(
                    |x| a[x] as f64,
                    t,
                    &copies,
                    &needle,
                    prompt_len,
                    sink,
                    &mut needle_sums_h,
                );
                reduce_head(&a, &mut ds, t, prompt_len, sink, &mut sums);
                // `ds` now holds dS: the needle entries' |E| (as `reduce_head` counts it).
                let mut needle_e_h = HeadSums::new(n);
                needle_sums(
                    |x| (ds[x].abs() / (1.0 - a[x] + EPS)) as f64,
                    t,
                    &copies,
                    &needle,
                    prompt_len,
                    sink,
                    &mut needle_e_h,
                );
                let seen = keep.then(|| (lower(&a, t), lower(&ds, t)));
                let d = c.head_dim;
                Ok(HeadGrad {
                    dq: causal::left(&ds, &head(&k, kv)?, t, d, scale),
                    dk: causal::left_t(&ds, &head(&q, h)?, t, d, scale),
                    dv: causal::left_t(&a, &d_o, t, d, 1.0),
                    sums,
                    needle: needle_sums_h,
                    needle_e: needle_e_h,
                    seen,
                })
            };
            let grads: Vec<HeadGrad> = if keep {
                (0..c.num_heads).map(one).collect::<Result<_>>()?
            } else {
                (0..c.num_heads)
                    .into_par_iter()
                    .map(one)
                    .collect::<Result<_>>()?
            };
            // Every head's gradients into [T, heads * D] rows (the query heads of one KV
            // head add up, in head order).
            let d = c.head_dim;
            let (wq, wk) = (c.num_heads * d, c.num_kv_heads * d);
            let mut dq = vec![0f32; t * wq];
            let mut dk = vec![0f32; t * wk];
            let mut dv = vec![0f32; t * wk];
            let mut sums = Vec::with_capacity(c.num_heads);
            let mut nsums = Vec::with_capacity(c.num_heads);
            let mut esums = Vec::with_capacity(c.num_heads);
            for (h, hg) in grads.into_iter().enumerate() {
                if let (Some(obs), Some((a, ds))) = (observer.as_mut(), &hg.seen) {
                    obs(li, h, a, ds);
                }
                let kv = h / g;
                for r in 0..t {
                    let src = r * d..(r + 1) * d;
                    dq[r * wq + h * d..r * wq + (h + 1) * d].copy_from_slice(&hg.dq[src.clone()]);
                    let dst = r * wk + kv * d..r * wk + (kv + 1) * d;
                    for (o, &x) in dk[dst.clone()].iter_mut().zip(&hg.dk[src.clone()]) {
                        *o += x;
                    }
                    for (o, &x) in dv[dst].iter_mut().zip(&hg.dv[src]) {
                        *o += x;
                    }
                }
                sums.push(hg.sums);
                nsums.push(hg.needle);
                esums.push(hg.needle_e);
            }
            heads[li] = sums;
            needle_heads[li] = nsums;
            needle_e_heads[li] = esums;
            let unrope = |mut x: Vec<f32>, hn: usize| -> Result<Tensor> {
                fused::rope(&mut x, d, &cos, &nsin, c.rope);
                Ok(Tensor::from_vec(x, (t, hn * d), &Device::Cpu)?)
            };
            let dq = unrope(dq, c.num_heads)?;
            let dk = unrope(dk, c.num_kv_heads)?;
            let dv = Tensor::from_vec(dv, (t, wk), &Device::Cpu)?;
            let dn1 = ((dq.matmul(&w.wq)? + dk.matmul(&w.wk)?)? + dv.matmul(&w.wv)?)?;
            dx = (dx2 + self.rms_norm_backward(x_in, &l.attn_norm, &dn1)?)?;
        }
        Ok(Influence {
            len: t,
            loss,
            heads,
            needle: needle_heads,
            needle_influence: needle_e_heads,
            copy_steps: copies.len(),
        })
    }
}

/// One query head's share of the backward pass.
struct HeadGrad {
    /// [T, D] each.
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    sums: HeadSums,
    needle: HeadSums,
    needle_e: HeadSums,
    /// A and dS, kept for an observer.
    seen: Option<(Vec<f32>, Vec<f32>)>,
}

/// The first key that query row `i` keeps under a window of `local` keys (the sink not
/// counted, nor clamped to it): prompt rows (before `prompt_len`) by block distance,
/// as the prefill kernels mask, the others by token distance.
fn window_first(i: usize, local: usize, prompt_len: usize) -> usize {
    if i >= prompt_len {
        (i + 1).saturating_sub(local)
    } else {
        ((i / BLOCK + 1).saturating_sub(local / BLOCK)) * BLOCK
    }
}

/// Turns G = dO V^T (in `ds`, as [`causal_scores`] leaves it) into dS = A * (G - S) in
/// place (0 above the diagonal), and adds |E| = |dS| / (1 - A + eps) of every causal
/// entry to `sums` under the run-time masks: rows before `prompt_len` by block
/// distance, the others by token distance.
fn reduce_head(
    a: &[f32],
    ds: &mut [f32],
    t: usize,
    prompt_len: usize,
    sink: usize,
    sums: &mut HeadSums,
) {
    let mut e = vec![0f32; t];
    let mut bounds = Vec::new();
    for i in 0..t {
        let ar = &a[i * t..=i * t + i];
        let (gr, zero) = ds[i * t..i * t + band_end(i, t)].split_at_mut(i + 1);
        let s = dot_f64(ar, gr) as f32;
        let er = &mut e[..=i];
        for ((g, &a), e) in gr.iter_mut().zip(ar).zip(er.iter_mut()) {
            let d = a * (*g - s);
            *g = d;
            *e = d.abs() / (1.0 - a + EPS);
        }
        zero.fill(0.0);
        // Keys [0, split) lie in the sink; the rest, `past`, start at key `split`.
        let split = sink.min(i + 1);
        let (in_sink, past) = er.split_at(split);
        let row_sink = sum_f64(in_sink);
        sums.total += row_sink + sum_f64(past);
        sums.sink += row_sink;
        if i >= prompt_len {
            // past[x] is key split + x, at distance i - split - x.
            for (slot, &v) in sums.token[..past.len()].iter_mut().rev().zip(past) {
                *slot += v as f64;
            }
        } else {
            // split (the sink) is a multiple of BLOCK: each chunk is one key block.
            for (x, chunk) in past.chunks(BLOCK).enumerate() {
                sums.block[i / BLOCK - split / BLOCK - x] += sum_f64(chunk);
            }
        }
        masked_rows(ar, gr, i, prompt_len, sink, &mut bounds, sums);
    }
}

/// The smallest share of a row its window may keep in [`masked_rows`]' renormalization
/// (a window that drops nearly all of a row is scored as dropping 99% of it).
const MIN_KEPT: f64 = 0.01;

/// Adds row `i`'s loss under every window of `64 k` tokens to `sums.rows`: the masked
/// entries are a prefix `[sink, b)` of the row (b from the run-time rule of the row:
/// decode's token rule for answer rows, `moa-block64` for prompt rows), and masking them
/// together changes the loss, to first order, by `-sum dS / (1 - sum A)` over them.
/// `a` and `ds` are the row's entries 0..=i; `bounds` is scratch.
fn masked_rows(
    a: &[f32],
    ds: &[f32],
    i: usize,
    prompt_len: usize,
    sink: usize,
    bounds: &mut Vec<usize>,
    sums: &mut HeadSums,
) {
    if i < sink {
        return;
    }
    // b of window k = 0, 1, ..: strictly falling, each past the sink.
    bounds.clear();
    for k in 0..sums.rows.len() {
        let b = window_first(i, k * BLOCK, prompt_len).clamp(sink, i + 1);
        if b == sink {
            break;
        }
        bounds.push(b);
    }
    // The sums of dS and A over [sink, b), from the smallest b up.
    let (mut d, mut m) = (0.0f64, 0.0f64);
    let mut from = sink;
    for (k, &b) in bounds.iter().enumerate().rev() {
        d += sum_f64(&ds[from..b]);
        m += sum_f64(&a[from..b]);
        from = b;
        sums.rows[k] += d.abs() / (1.0 - m).max(MIN_KEPT);
    }
}

/// Adds `value(i * t + j)` of the copy steps `rows` on the `needle` positions j to `sums`
/// (each copy step weighs 1 / rows.len(): with the attention as the value, the sums are
/// the mean needle attention of a copy step), under the same masks as the influence:
/// prompt rows by block distance, answer rows by token distance, sink positions apart.
/// The loss of a span is then the share of the needle attention it drops (DuoAttention's
/// and Wu et al.'s lesson: the heads that read the needle while the answer is copied are
/// the ones retrieval needs); with the entries' |E| as the value, the share of what
/// masking the needle would cost the answer.
fn needle_sums(
    value: impl Fn(usize) -> f64,
    t: usize,
    rows: &[usize],
    needle: &[bool],
    prompt_len: usize,
    sink: usize,
    sums: &mut HeadSums,
) {
    if rows.is_empty() {
        return;
    }
    let w = 1.0 / rows.len() as f64;
    for &i in rows {
        for j in (0..=i).filter(|&j| needle.get(j).copied().unwrap_or(false)) {
            sums.add_entry(i, j, w * value(i * t + j), sink, prompt_len);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    //! The softmax against float64 and the vectorized reduction against the
    //! entry-by-entry sums, on fresh random inputs, for lengths of one band, of several
    //! bands and with a partial last band.
    use super::*;
    use moac_runtime::reference::check::Rng;

    fn rand(rng: &mut Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.uniform()).collect()
    }

    /// The reduction entry by entry, in the order the formulas read (the vectorized
    /// [`reduce_head`] regroups the same sums).
    fn reduce_reference(
        a: &[f32],
        g: &[f32],
        t: usize,
        prompt_len: usize,
        sink: usize,
        sums: &mut HeadSums,
    ) -> Vec<f32> {
        let mut ds = vec![0f32; t * t];
        for i in 0..t {
            let s: f64 = (0..=i)
                .map(|j| a[i * t + j] as f64 * g[i * t + j] as f64)
                .sum();
            let s = s as f32;
            for j in 0..=i {
                let x = i * t + j;
                let d = a[x] * (g[x] - s);
                ds[x] = d;
                sums.add_entry(
                    i,
                    j,
                    (d.abs() / (1.0 - a[x] + EPS)) as f64,
                    sink,
                    prompt_len,
                );
            }
            if i < sink {
                continue;
            }
            for (k, slot) in sums.rows.iter_mut().enumerate() {
                // The first key past the sink that a window of `local` keys keeps, by
                // the masks' predicates (rows before the prompt's end by block).
                let local = k * BLOCK;
                let kept = |j: usize| {
                    if i >= prompt_len {
                        i - j < local
                    } else {
                        i / BLOCK - j / BLOCK < local / BLOCK
                    }
                };
                let b = (sink..=i).find(|&j| kept(j)).unwrap_or(i + 1);
                if b == sink {
                    break;
                }
                let d: f64 = (sink..b).map(|j| ds[i * t + j] as f64).sum();
                let m: f64 = (sink..b).map(|j| a[i * t + j] as f64).sum();
                *slot += d.abs() / (1.0 - m).max(MIN_KEPT);
            }
        }
        ds
    }

    fn close_sums(got: &HeadSums, want: &HeadSums, what: &str) {
        let close = |g: f64, w: f64, name: &str| {
            assert!(
                (g - w).abs() <= 1e-9 * w.abs().max(1.0),
                "{what}: {name} {g} vs {w}"
            );
        };
        close(got.total, want.total, "total");
        close(got.sink, want.sink, "sink");
        for (name, g, w) in [
            ("token", &got.token, &want.token),
            ("block", &got.block, &want.block),
            ("rows", &got.rows, &want.rows),
        ] {
            assert_eq!(g.len(), w.len());
            for (x, (&g, &w)) in g.iter().zip(w).enumerate() {
                close(g, w, &format!("{name}[{x}]"));
            }
        }
    }

    /// Softmax rows of random scores (as the profile's A), zero above the diagonal.
    fn random_probs(rng: &mut Rng, t: usize) -> Vec<f32> {
        let mut a = rand(rng, t * t);
        for x in a.iter_mut() {
            *x *= 6.0;
        }
        causal_softmax(&mut a, t, 1.0, None);
        a
    }

    #[test]
    fn reduction_matches_the_entrywise_sums() {
        let mut rng = Rng::fresh("reduce_head");
        // Lengths of one band, several bands and a partial band; prompts ending inside
        // the sink, on a block edge, inside a block and at the last row but one; sinks
        // of one and two blocks.
        for (t, prompt_len, sink) in [
            (40usize, 20usize, 64usize),
            (200, 64, 64),
            (200, 150, 128),
            (300, 299, 64),
            (1030, 700, 64),
        ] {
            let a = random_probs(&mut rng, t);
            // Causal products leave values right of the diagonal up to the band's end.
            let mut g = vec![0f32; t * t];
            for i in 0..t {
                for j in 0..band_end(i, t) {
                    g[i * t + j] = rng.uniform() - 0.5;
                }
            }
            let n = t + 64;
            let mut want = HeadSums::new(n);
            let want_ds = reduce_reference(&a, &g, t, prompt_len, sink, &mut want);
            let mut got = HeadSums::new(n);
            let mut ds = g.clone();
            reduce_head(&a, &mut ds, t, prompt_len, sink, &mut got);
            let what = format!("t {t}, prompt {prompt_len}, sink {sink}");
            // S_i is summed in another order: it may round to the neighbouring f32 (a
            // change of at most 2^-23 |S_i| <= 2^-24 in A (G - S)), about once in 10^9
            // rows.
            for (x, (&g, &w)) in ds.iter().zip(&want_ds).enumerate() {
                let bound = (a[x] as f64).abs() * 1e-7 + 1e-7 * (w as f64).abs();
                assert!(
                    (g as f64 - w as f64).abs() <= bound,
                    "{what}: dS entry {x}: {g:e} vs {w:e}"
                );
            }
            close_sums(&got, &want, &what);
        }
    }

    #[test]
    fn softmax_rows_sum_to_one_and_follow_the_scores() {
        let mut rng = Rng::fresh("causal softmax");
        for t in [40usize, 300] {
            let s = rand(&mut rng, t * t);
            let mut p = s.clone();
            for i in 0..t {
                p[i * t + band_end(i, t)..(i + 1) * t].fill(0.0);
            }
            let scale = 3.0f32;
            causal_softmax(&mut p, t, scale, None);
            for i in 0..t {
                let row: Vec<f64> = (0..=i).map(|j| (s[i * t + j] * scale) as f64).collect();
                let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x));
                let z: f64 = row.iter().map(|x| (x - max).exp()).sum();
                for j in 0..t {
                    let want = if j <= i {
                        (row[j] - max).exp() / z
                    } else {
                        0.0
                    };
                    let got = p[i * t + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-6 * want + 1e-9,
                        "t {t} row {i} col {j}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
