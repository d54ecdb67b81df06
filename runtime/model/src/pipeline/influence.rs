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

use crate::llama::{dense_matrix, Dense, Layer, Llama};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, D};
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

/// Row-wise causal softmax of `scores` [T, T] (scaled), in place; entries above the
/// diagonal become 0. Applies `perturb` (row, col, factor) after normalizing.
fn causal_softmax(scores: &mut [f32], t: usize, scale: f32, perturb: Option<(usize, usize, f32)>) {
    for i in 0..t {
        let row = &mut scores[i * t..(i + 1) * t];
        let mut max = f32::NEG_INFINITY;
        for s in &mut row[..=i] {
            *s *= scale;
            max = max.max(*s);
        }
        let mut sum = 0.0f64;
        for s in &mut row[..=i] {
            *s = (*s - max).exp();
            sum += *s as f64;
        }
        let inv = (1.0 / sum) as f32;
        for s in &mut row[..=i] {
            *s *= inv;
        }
        row[i + 1..].fill(0.0);
        if let Some((r, c, f)) = perturb {
            if r == i && c <= i {
                row[c] *= f;
                let sum: f64 = row[..=i].iter().map(|&v| v as f64).sum();
                let inv = (1.0 / sum) as f32;
                for s in &mut row[..=i] {
                    *s *= inv;
                }
            }
        }
    }
}

/// Rows of a causal [T, T] product taken at a time: a band of rows needs only the
/// columns up to its last row, so the products skip most of the zero upper triangle
/// (with 8 bands, 9/16 of the full product's work).
fn band_rows(t: usize) -> usize {
    (t / 8).clamp(64, 512)
}

/// The lower triangle (and diagonal) of `a b^T` for a, b [T, D], as a [T, T] row-major
/// buffer; entries right of each band's last row are 0, the rest of the upper triangle
/// whatever the band's product gives (callers read only j <= i).
fn causal_scores(a: &Tensor, b: &Tensor) -> Result<Vec<f32>> {
    let t = a.dim(0)?;
    let band = band_rows(t);
    let mut out = vec![0f32; t * t];
    let mut r0 = 0;
    while r0 < t {
        let r1 = (r0 + band).min(t);
        let p = a
            .narrow(0, r0, r1 - r0)?
            .matmul(&b.narrow(0, 0, r1)?.t()?)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for (i, row) in p.chunks_exact(r1).enumerate() {
            out[(r0 + i) * t..(r0 + i) * t + r1].copy_from_slice(row);
        }
        r0 = r1;
    }
    Ok(out)
}

/// `m b` for m [T, T] zero above the diagonal and b [T, D]: each band of rows (a
/// strided view of m, not a copy) times the rows of b up to its last row.
fn causal_left(m: &Tensor, b: &Tensor) -> Result<Tensor> {
    let t = m.dim(0)?;
    let band = band_rows(t);
    let mut parts = Vec::new();
    let mut r0 = 0;
    while r0 < t {
        let r1 = (r0 + band).min(t);
        let block = m.narrow(0, r0, r1 - r0)?.narrow(1, 0, r1)?;
        parts.push(block.matmul(&b.narrow(0, 0, r1)?)?);
        r0 = r1;
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// `m^T b` for m [T, T] zero above the diagonal and b [T, D]: output rows c0..c1 take
/// the entries of m's columns c0..c1 in rows c0.. (the only ones not zero; a strided
/// view of m).
fn causal_left_t(m: &Tensor, b: &Tensor) -> Result<Tensor> {
    let t = m.dim(0)?;
    let band = band_rows(t);
    let mut parts = Vec::new();
    let mut c0 = 0;
    while c0 < t {
        let c1 = (c0 + band).min(t);
        let block = m.narrow(0, c0, t - c0)?.narrow(1, c0, c1 - c0)?;
        parts.push(block.t()?.matmul(&b.narrow(0, c0, t - c0)?)?);
        c0 = c1;
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// A [T, T] row-major buffer as a tensor (the buffer moves in; nothing is copied).
fn square(m: Vec<f32>, t: usize) -> Result<Tensor> {
    Ok(Tensor::from_vec(m, (t, t), &Device::Cpu)?)
}

fn head(x: &Tensor, h: usize) -> Result<Tensor> {
    Ok(x.narrow(1, h, 1)?.squeeze(1)?.contiguous()?)
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

    /// q [T,Hq,D] and k, v [T,Hkv,D] of one layer (RoPE applied), from its input x.
    pub(super) fn qkv(
        &self,
        l: &Layer,
        w: &Dense,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let c = &self.config;
        let t = x.dim(0)?;
        let n1 = self.rms_norm(x, &l.attn_norm)?;
        let q = linear(&n1, &w.wq)?.reshape((1, t, c.num_heads, c.head_dim))?;
        let k = linear(&n1, &w.wk)?.reshape((1, t, c.num_kv_heads, c.head_dim))?;
        let v = linear(&n1, &w.wv)?.reshape((t, c.num_kv_heads, c.head_dim))?;
        let q = self.rope(&q, cos, sin)?.squeeze(0)?;
        let k = self.rope(&k, cos, sin)?.squeeze(0)?;
        Ok((q, k, v))
    }

    /// Probabilities [T*T] of query head h against its KV head.
    fn probs(
        &self,
        q: &Tensor,
        k: &Tensor,
        h: usize,
        perturb: Option<(usize, usize, f32)>,
    ) -> Result<Vec<f32>> {
        let c = &self.config;
        let g = c.num_heads / c.num_kv_heads;
        let t = q.dim(0)?;
        let qh = head(q, h)?;
        let kh = head(k, h / g)?;
        let mut p = causal_scores(&qh, &kh)?;
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
        let (cos, sin) = self.rope_tables(&positions, 1)?;
        let mut x = Tensor::from_vec(self.embed.rows_f32(tokens)?, (t, c.hidden), &Device::Cpu)?;
        let (mut inputs, mut mids) = (Vec::new(), Vec::new());
        for (li, l) in self.layers.iter().enumerate() {
            let w = Dense::of(l)?;
            let (q, k, v) = self.qkv(l, &w, &x, &cos, &sin)?;
            let mut outs = Vec::with_capacity(c.num_heads);
            for h in 0..c.num_heads {
                let pt = perturb
                    .filter(|p| p.layer == li && p.head == h)
                    .map(|p| (p.row, p.col, p.factor));
                let p = square(self.probs(&q, &k, h, pt)?, t)?;
                outs.push(causal_left(
                    &p,
                    &head(&v, h / (c.num_heads / c.num_kv_heads))?,
                )?);
            }
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
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        let (inputs, mids, x) = self.forward_exact(tokens, None)?;
        let (loss, mut dx) = self.response_loss(&x, tokens, prompt_len)?;
        let positions: Vec<usize> = (0..t).collect();
        let (cos, sin) = self.rope_tables(&positions, 1)?;
        let nsin = sin.neg()?;
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
                let mut ds = causal_scores(&d_o, &vh)?;
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
                let seen = keep.then(|| (a.clone(), ds.clone()));
                let (a, ds) = (square(a, t)?, square(ds, t)?);
                Ok(HeadGrad {
                    dq: (causal_left(&ds, &head(&k, kv)?)? * scale)?,
                    dk: (causal_left_t(&ds, &head(&q, h)?)? * scale)?,
                    dv: causal_left_t(&a, &d_o)?,
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
            let mut dq = Vec::with_capacity(c.num_heads);
            let mut dk =
                vec![Tensor::zeros((t, c.head_dim), DType::F32, &Device::Cpu)?; c.num_kv_heads];
            let mut dv = dk.clone();
            let mut sums = Vec::with_capacity(c.num_heads);
            let mut nsums = Vec::with_capacity(c.num_heads);
            let mut esums = Vec::with_capacity(c.num_heads);
            for (h, hg) in grads.into_iter().enumerate() {
                if let (Some(obs), Some((a, ds))) = (observer.as_mut(), &hg.seen) {
                    obs(li, h, a, ds);
                }
                dq.push(hg.dq);
                dk[h / g] = (&dk[h / g] + hg.dk)?;
                dv[h / g] = (&dv[h / g] + hg.dv)?;
                sums.push(hg.sums);
                nsums.push(hg.needle);
                esums.push(hg.needle_e);
            }
            heads[li] = sums;
            needle_heads[li] = nsums;
            needle_e_heads[li] = esums;
            let unrope = |parts: &[Tensor], hn: usize| -> Result<Tensor> {
                let x = Tensor::stack(parts, 1)?.reshape((1, t, hn, c.head_dim))?;
                Ok(self.rope(&x, &cos, &nsin)?.reshape((t, hn * c.head_dim))?)
            };
            let dq = unrope(&dq, c.num_heads)?;
            let dk = unrope(&dk, c.num_kv_heads)?;
            let dv = Tensor::stack(&dv, 1)?.reshape((t, c.num_kv_heads * c.head_dim))?;
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
    dq: Tensor,
    dk: Tensor,
    dv: Tensor,
    sums: HeadSums,
    needle: HeadSums,
    needle_e: HeadSums,
    /// A and dS, kept for an observer.
    seen: Option<(Vec<f32>, Vec<f32>)>,
}

/// Turns G = dO V^T (in `ds`) into dS = A * (G - S) in place, and adds
/// |E| = |dS| / (1 - A + eps) of every causal entry to `sums` under the run-time masks:
/// rows before `prompt_len` by block distance, the others by token distance.
fn reduce_head(
    a: &[f32],
    ds: &mut [f32],
    t: usize,
    prompt_len: usize,
    sink: usize,
    sums: &mut HeadSums,
) {
    let mut prefix = Vec::with_capacity(t + 1);
    for i in 0..t {
        let ar = &a[i * t..i * t + i + 1];
        let gr = &mut ds[i * t..(i + 1) * t];
        let s: f64 = ar
            .iter()
            .zip(gr.iter())
            .map(|(&a, &g)| a as f64 * g as f64)
            .sum();
        let s = s as f32;
        let mut row_total = 0.0f64;
        let mut row_sink = 0.0f64;
        for j in 0..=i {
            let d = ar[j] * (gr[j] - s);
            gr[j] = d;
            let e = (d.abs() / (1.0 - ar[j] + EPS)) as f64;
            row_total += e;
            if j < sink {
                row_sink += e;
            } else if i >= prompt_len {
                sums.token[i - j] += e;
            } else {
                sums.block[i / BLOCK - j / BLOCK] += e;
            }
        }
        gr[i + 1..].fill(0.0);
        sums.total += row_total;
        sums.sink += row_sink;
        masked_rows(ar, &gr[..=i], i, prompt_len, sink, &mut prefix, sums);
    }
}

/// The smallest share of a row its window may keep in [`masked_rows`]' renormalization
/// (a window that drops nearly all of a row is scored as dropping 99% of it).
const MIN_KEPT: f64 = 0.01;

/// Adds row `i`'s loss under every window of `64 k` tokens to `sums.rows`: the masked
/// entries are a prefix `[sink, b)` of the row (b from the run-time rule of the row:
/// decode's token rule for answer rows, `moa-block64` for prompt rows), and masking them
/// together changes the loss, to first order, by `-sum dS / (1 - sum A)` over them.
fn masked_rows(
    a: &[f32],
    ds: &[f32],
    i: usize,
    prompt_len: usize,
    sink: usize,
    prefix: &mut Vec<(f64, f64)>,
    sums: &mut HeadSums,
) {
    if i < sink {
        return;
    }
    // prefix[x] = sums of dS and A over [sink, sink + x).
    prefix.clear();
    prefix.push((0.0, 0.0));
    let (mut d, mut m) = (0.0f64, 0.0f64);
    for j in sink..=i {
        d += ds[j] as f64;
        m += a[j] as f64;
        prefix.push((d, m));
    }
    for (k, slot) in sums.rows.iter_mut().enumerate() {
        let local = k * BLOCK;
        // First key the window keeps (past the sink).
        let first = if i >= prompt_len {
            (i + 1).saturating_sub(local)
        } else {
            ((i / BLOCK + 1).saturating_sub(local / BLOCK)) * BLOCK
        };
        let b = first.clamp(sink, i + 1);
        if b == sink {
            break;
        }
        let (d, m) = prefix[b - sink];
        *slot += d.abs() / (1.0 - m).max(MIN_KEPT);
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
            let e = w * value(i * t + j);
            sums.total += e;
            if j < sink {
                sums.sink += e;
            } else if i >= prompt_len {
                sums.token[i - j] += e;
            } else {
                sums.block[i / BLOCK - j / BLOCK] += e;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    //! The banded causal products against the full products in float64, on fresh random
    //! inputs, for lengths of one band, of several bands and with a partial last band.
    use super::*;
    use moac_runtime::reference::check::Rng;

    fn rand(rng: &mut Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.uniform()).collect()
    }

    #[test]
    fn banded_causal_products_equal_the_full_ones() {
        let mut rng = Rng::fresh("banded products");
        let d = 8;
        for t in [40usize, 200, 1030] {
            let (a, b) = (rand(&mut rng, t * d), rand(&mut rng, t * d));
            let mut m = rand(&mut rng, t * t);
            for i in 0..t {
                m[i * t + i + 1..(i + 1) * t].fill(0.0);
            }
            let at = Tensor::from_vec(a.clone(), (t, d), &Device::Cpu).unwrap();
            let bt = Tensor::from_vec(b.clone(), (t, d), &Device::Cpu).unwrap();
            let close = |got: f32, want: f64, mag: f64| {
                assert!(
                    (got as f64 - want).abs() <= 1e-5 * mag + 1e-6,
                    "t {t}: {got} vs {want}"
                );
            };
            let s = causal_scores(&at, &bt).unwrap();
            for i in 0..t {
                for j in 0..=i {
                    let want: f64 = (0..d)
                        .map(|x| a[i * d + x] as f64 * b[j * d + x] as f64)
                        .sum();
                    close(s[i * t + j], want, d as f64);
                }
            }
            let mt = square(m.clone(), t).unwrap();
            let l = causal_left(&mt, &bt).unwrap().to_vec2::<f32>().unwrap();
            let lt = causal_left_t(&mt, &bt).unwrap().to_vec2::<f32>().unwrap();
            for i in 0..t {
                for x in 0..d {
                    let want: f64 = (0..=i)
                        .map(|j| m[i * t + j] as f64 * b[j * d + x] as f64)
                        .sum();
                    close(l[i][x], want, t as f64);
                    let want_t: f64 = (i..t)
                        .map(|j| m[j * t + i] as f64 * b[j * d + x] as f64)
                        .sum();
                    close(lt[i][x], want_t, t as f64);
                }
            }
        }
    }
}
