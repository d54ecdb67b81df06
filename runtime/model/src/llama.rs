//! A Llama-family model run on the CPU with its attention behind [`Attention`] (moac's
//! compacted cache through `moac-runtime`, or the plain dense reference):
//! embeddings, RMSNorm, Q/K/V with RoPE (interleaved for GGUF's permuted llama weights,
//! half-split for Hugging Face weights; per-row positions), SwiGLU MLP, tied or separate
//! LM head. Quantized GGUF matrices stay quantized ([`crate::quant`]: moac's kernels
//! for Q4_0/Q4_1/Q8_0, candle's `QMatMul` for other block types) unless f32 weights are
//! asked for; Hugging Face weights are held in f32. A step runs on a worker of rayon's
//! pool ([`on_pool`]), its matrices that share an input as one product group.

use crate::attention::Attention;
use crate::fused;
use crate::quant::Linear;
use crate::{Error, Result};
use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Tensor, D};
use moac::plan::{ModelShape, Settings, ValidPlan};
use std::path::Path;

pub use crate::fused::RopeStyle;

/// The size and attention figures of a Llama model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LlamaConfig {
    pub num_layers: usize,
    pub hidden: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rope_theta: f32,
    pub rms_eps: f32,
    /// The longest sequence the model was trained for.
    pub context_len: usize,
    pub rope: RopeStyle,
}

impl LlamaConfig {
    /// The attention shape a plan for this model must have.
    pub fn shape(&self) -> ModelShape {
        ModelShape {
            num_layers: self.num_layers,
            num_query_heads: self.num_heads,
            num_kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
        }
    }
}

pub(crate) struct Layer {
    pub attn_norm: Tensor,
    pub wq: Linear,
    pub wk: Linear,
    pub wv: Linear,
    pub wo: Linear,
    pub ffn_norm: Tensor,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

/// A model's weights, as a loader ([`crate::weights`]) or [`Llama::random`] makes them.
pub(crate) struct Weights {
    pub embed: Linear,
    pub layers: Vec<Layer>,
    pub norm: Tensor,
    pub lm_head: Linear,
}

/// A loaded model.
pub struct Llama {
    pub config: LlamaConfig,
    pub(crate) embed: Linear,
    pub(crate) layers: Vec<Layer>,
    pub(crate) norm: Tensor,
    pub(crate) lm_head: Linear,
    /// RoPE's inverse frequencies, theta^(-2i/D) for i < D/2 (the cos / sin tables
    /// are made for the positions a call needs: a context length from a file is
    /// never allocated up front).
    inv_freq: Vec<f64>,
}

impl Llama {
    /// A model with random weights (normal, scaled like a trained model's: 1/sqrt(fan-in)
    /// for matrices, norms near 1), the same for the same seed: for tests and benchmarks
    /// whose results do not depend on what the weights are.
    pub fn random(config: LlamaConfig, intermediate: usize, seed: u64) -> Result<Llama> {
        let mut rng = moac_runtime::reference::check::Rng::new(seed);
        let mut matrix = |rows: usize, cols: usize| -> Result<Tensor> {
            let scale = 1.0 / (cols as f32).sqrt();
            let data: Vec<f32> = (0..rows * cols)
                .map(|_| rng.uniform() * scale * 1.7)
                .collect();
            Ok(Tensor::from_vec(data, (rows, cols), &Device::Cpu)?)
        };
        let c = &config;
        let (q, kv) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let mut layers = Vec::with_capacity(c.num_layers);
        for _ in 0..c.num_layers {
            layers.push(Layer {
                attn_norm: Tensor::ones(c.hidden, DType::F32, &Device::Cpu)?,
                wq: Linear::from(QMatMul::Tensor(matrix(q, c.hidden)?)),
                wk: Linear::from(QMatMul::Tensor(matrix(kv, c.hidden)?)),
                wv: Linear::from(QMatMul::Tensor(matrix(kv, c.hidden)?)),
                wo: Linear::from(QMatMul::Tensor(matrix(c.hidden, q)?)),
                ffn_norm: Tensor::ones(c.hidden, DType::F32, &Device::Cpu)?,
                gate: Linear::from(QMatMul::Tensor(matrix(intermediate, c.hidden)?)),
                up: Linear::from(QMatMul::Tensor(matrix(intermediate, c.hidden)?)),
                down: Linear::from(QMatMul::Tensor(matrix(c.hidden, intermediate)?)),
            });
        }
        let embed = matrix(c.vocab_size, c.hidden)?;
        let w = Weights {
            lm_head: QMatMul::Tensor(embed.clone()).into(),
            embed: QMatMul::Tensor(embed).into(),
            layers,
            norm: Tensor::ones(c.hidden, DType::F32, &Device::Cpu)?,
        };
        Llama::from_weights(config, w)
    }

    pub(crate) fn from_weights(config: LlamaConfig, w: Weights) -> Result<Llama> {
        let half = config.head_dim / 2;
        let theta = config.rope_theta as f64;
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| theta.powf(-2.0 * i as f64 / config.head_dim as f64))
            .collect();
        Ok(Llama {
            config,
            embed: w.embed,
            layers: w.layers,
            norm: w.norm,
            lm_head: w.lm_head,
            inv_freq,
        })
    }

    /// A plan that gives every head the whole sequence (`--dense`): the same kernels,
    /// every span = N.
    pub fn dense_plan(&self, name: &Path) -> Result<ValidPlan> {
        let label = name.display().to_string();
        Ok(
            uniform_plan(name, self.config.shape(), 1e12, 0.0, Settings::default())?
                .with_name(label),
        )
    }

    /// Checks that `plan` was made for this model's attention shape.
    pub fn check_plan(&self, plan: &ValidPlan) -> Result<()> {
        let want = self.config.shape();
        let got = *plan.model();
        if want != got {
            return Err(Error::PlanMismatch {
                plan: plan.source().to_path_buf(),
                message: format!(
                    "the plan is for {} layers x {} query heads ({} KV heads, head_dim {}); the model has {} layers x {} query heads ({} KV heads, head_dim {})",
                    got.num_layers,
                    got.num_query_heads,
                    got.num_kv_heads,
                    got.head_dim,
                    want.num_layers,
                    want.num_query_heads,
                    want.num_kv_heads,
                    want.head_dim
                ),
            });
        }
        Ok(())
    }

    pub(crate) fn rms_norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let var = x.sqr()?.mean_keepdim(D::Minus1)?;
        let inv = (var + self.config.rms_eps as f64)?.sqrt()?.recip()?;
        Ok(x.broadcast_mul(&inv)?.broadcast_mul(w)?)
    }

    /// cos / sin for `positions` laid out [rows, T, 1, D/2] (`positions` is rows * T
    /// long, row-major). With [`Llama::rope`], the tensor form of RoPE: the reference
    /// of `fused::rope` in the tests.
    #[cfg(test)]
    pub(crate) fn rope_tables(&self, positions: &[usize], rows: usize) -> Result<(Tensor, Tensor)> {
        let t = positions.len() / rows.max(1);
        let half = self.config.head_dim / 2;
        let (cos, sin) = self.rope_angles(positions)?;
        let cos = Tensor::from_vec(cos, (rows, t, 1, half), &Device::Cpu)?;
        let sin = Tensor::from_vec(sin, (rows, t, 1, half), &Device::Cpu)?;
        Ok((cos, sin))
    }

    /// cos / sin of every position's RoPE angles, [positions, D/2] row-major.
    pub(crate) fn rope_angles(&self, positions: &[usize]) -> Result<(Vec<f32>, Vec<f32>)> {
        let limit = self.config.context_len;
        if let Some(&p) = positions.iter().find(|&&p| p >= limit) {
            return Err(Error::TooLong {
                what: format!("position {p}"),
                len: p + 1,
                max: limit,
            });
        }
        let half = self.config.head_dim / 2;
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for f in &self.inv_freq {
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Ok((cos, sin))
    }

    /// RoPE over `x` [B, T, H, D] with tables [B or 1, T, 1, D/2] (tests only).
    #[cfg(test)]
    pub(crate) fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (b, t, h, d) = x.dims4()?;
        let half = d / 2;
        match self.config.rope {
            RopeStyle::Interleaved => {
                let x = x.reshape((b, t, h, half, 2))?;
                let (cos, sin) = (cos.unsqueeze(4)?, sin.unsqueeze(4)?);
                let (x0, x1) = (x.narrow(4, 0, 1)?, x.narrow(4, 1, 1)?);
                let r0 = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
                let r1 = (x0.broadcast_mul(&sin)? + x1.broadcast_mul(&cos)?)?;
                Ok(Tensor::cat(&[r0, r1], 4)?.reshape((b, t, h, d))?)
            }
            RopeStyle::HalfSplit => {
                let (x0, x1) = (x.narrow(3, 0, half)?, x.narrow(3, half, half)?);
                let r0 = (x0.broadcast_mul(cos)? - x1.broadcast_mul(sin)?)?;
                let r1 = (x1.broadcast_mul(cos)? + x0.broadcast_mul(sin)?)?;
                Ok(Tensor::cat(&[r0, r1], 3)?)
            }
        }
    }

    /// Runs the layers over `tokens` [B, T] at `positions` (B * T, row-major);
    /// `attend(layer, q, k, v)` with q [B,T,Hq,D], k/v [B,T,Hkv,D] returns the attention
    /// output [B,T,Hq,D]. Returns the final normed hidden states [B, T, hidden].
    fn run_layers(
        &self,
        tokens: &[u32],
        b: usize,
        positions: &[usize],
        attend: &mut dyn FnMut(usize, Tensor, Tensor, Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let t = tokens.len() / b;
        if let Some(&bad) = tokens.iter().find(|&&id| id as usize >= c.vocab_size) {
            return Err(Error::Usage(format!(
                "token id {bad} is outside the vocabulary ({} ids)",
                c.vocab_size
            )));
        }
        // The step on plain rows (fused elementwise work, one allocation each); tensors
        // only where the attention takes them.
        let (cos, sin) = self.rope_angles(positions)?;
        let m = tokens.len();
        let (qd, kvd) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let mut x: Vec<f32> = self.embed.rows_f32(tokens)?;
        let vec_of = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.to_dtype(DType::F32)?.to_vec1()?) };
        let eps = c.rms_eps;
        for (l, w) in self.layers.iter().enumerate() {
            let h = fused::rms_norm(&x, &vec_of(&w.attn_norm)?, eps);
            let mut qkv = Linear::forward_rows(&[&w.wq, &w.wk, &w.wv], &h, m)?.into_iter();
            let (Some(mut q), Some(mut k), Some(v)) = (qkv.next(), qkv.next(), qkv.next()) else {
                return Err(Error::Internal("a product group lost a matrix".into()));
            };
            fused::rope(&mut q, c.head_dim, &cos, &sin, c.rope);
            fused::rope(&mut k, c.head_dim, &cos, &sin, c.rope);
            let q = Tensor::from_vec(q, (b, t, c.num_heads, c.head_dim), &Device::Cpu)?;
            let k = Tensor::from_vec(k, (b, t, c.num_kv_heads, c.head_dim), &Device::Cpu)?;
            let v = Tensor::from_vec(v, (b, t, c.num_kv_heads, c.head_dim), &Device::Cpu)?;
            debug_assert_eq!(kvd * m, k.elem_count());
            let attn: Vec<f32> = attend(l, q, k, v)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()?;
            let o = Linear::forward_rows(&[&w.wo], &attn, m)?;
            fused::add_into(&mut x, &o[0]);
            // The MLP, row-wise, in chunks of rows: a long prompt's [rows, ffn]
            // intermediates stay small (a quantized matrix dequantized once for all).
            let ffn_norm = vec_of(&w.ffn_norm)?;
            let (gate, up, down) = (w.gate.for_rows(m)?, w.up.for_rows(m)?, w.down.for_rows(m)?);
            for xc in x.chunks_mut(MLP_ROWS * c.hidden) {
                let rows = xc.len() / c.hidden;
                let h = fused::rms_norm(xc, &ffn_norm, eps);
                let mut gu = Linear::forward_rows(&[&*gate, &*up], &h, rows)?.into_iter();
                let (Some(g), Some(u)) = (gu.next(), gu.next()) else {
                    return Err(Error::Internal("a product group lost a matrix".into()));
                };
                let d = Linear::forward_rows(&[&*down], &fused::swiglu(&g, &u), rows)?;
                fused::add_into(xc, &d[0]);
            }
            debug_assert_eq!(qd * m, attn.len());
        }
        let out = fused::rms_norm(&x, &vec_of(&self.norm)?, eps);
        Ok(Tensor::from_vec(out, (b, t, c.hidden), &Device::Cpu)?)
    }

    /// Prefill of a batch of prompts (different lengths allowed; each at positions
    /// 0..len): every layer's attention through `attn` (which also fills its cache).
    /// Returns the final hidden states [B, P, hidden] (P = the longest prompt; a row's
    /// positions past its length hold nothing meaningful).
    pub fn prefill(&self, attn: &mut dyn Attention, prompts: &[&[u32]]) -> Result<Tensor> {
        if prompts.is_empty() {
            return Err(Error::Usage("no prompt".into()));
        }
        if let Some(row) = prompts.iter().position(|p| p.is_empty()) {
            return Err(Error::Usage(format!("prompt {row} is empty")));
        }
        let limit = self.config.context_len;
        if let Some(row) = prompts.iter().position(|p| p.len() > limit) {
            return Err(Error::TooLong {
                what: format!("prompt {row}"),
                len: prompts[row].len(),
                max: limit,
            });
        }
        let b = prompts.len();
        let p = prompts.iter().map(|r| r.len()).max().unwrap_or(0);
        let lens: Vec<usize> = prompts.iter().map(|r| r.len()).collect();
        let mut tokens = Vec::with_capacity(b * p);
        let mut positions = Vec::with_capacity(b * p);
        for row in prompts {
            tokens.extend_from_slice(row);
            tokens.resize(tokens.len() + p - row.len(), 0);
            positions.extend(0..p);
        }
        on_pool(|| {
            self.run_layers(&tokens, b, &positions, &mut |l, q, k, v| {
                attn.prefill(l, &q, &k, &v, &lens)
            })
        })
    }

    /// One decode step: row b's `tokens[b]` at `positions[b]` (the row's cache holds
    /// exactly the tokens before it). Returns the final hidden states [B, hidden].
    pub fn decode(
        &self,
        attn: &mut dyn Attention,
        tokens: &[u32],
        positions: &[usize],
    ) -> Result<Tensor> {
        if tokens.len() != positions.len() || tokens.is_empty() {
            return Err(Error::Usage(format!(
                "decode takes one token and one position per row (got {} tokens, {} positions)",
                tokens.len(),
                positions.len()
            )));
        }
        let b = tokens.len();
        let h = on_pool(|| {
            self.run_layers(tokens, b, positions, &mut |l, q, k, v| {
                Ok(attn
                    .decode(l, &q.squeeze(1)?, &k.squeeze(1)?, &v.squeeze(1)?)?
                    .unsqueeze(1)?)
            })
        })?;
        Ok(h.squeeze(1)?)
    }

    /// The logits [.., vocab] (f32) of final hidden states [.., hidden].
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let dims = hidden.dims().to_vec();
        let rows: usize = dims[..dims.len().saturating_sub(1)].iter().product();
        let flat = hidden.reshape((rows, self.config.hidden))?;
        let mut out_dims = dims;
        if let Some(last) = out_dims.last_mut() {
            *last = self.config.vocab_size;
        }
        Ok(on_pool(|| self.lm_head.forward(&flat))?.reshape(out_dims)?)
    }
}

/// Rows of a prompt the MLP takes at a time.
const MLP_ROWS: usize = 512;

/// Runs `f` on a worker of rayon's pool. The parallel parts of a model step (matrix
/// products, attention) then start from inside the pool: a worker hands out work
/// without the cross-thread wake-up and wait a call from outside the pool costs each
/// time (about 150 of those a decode step).
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

/// A weight matrix in f32, whatever way it is held (quantized blocks dequantized).
pub(crate) fn dense_matrix(w: &Linear) -> Result<Tensor> {
    w.dense()
}

/// The f32 matrices of one layer ([out, in]), dequantized if the model holds them
/// quantized: what the profile's exact forward and backward passes multiply by.
pub(crate) struct Dense {
    pub(crate) wq: Tensor,
    pub(crate) wk: Tensor,
    pub(crate) wv: Tensor,
    pub(crate) wo: Tensor,
    pub(crate) gate: Tensor,
    pub(crate) up: Tensor,
    pub(crate) down: Tensor,
}

impl Dense {
    pub(crate) fn of(l: &Layer) -> Result<Dense> {
        Ok(Dense {
            wq: dense_matrix(&l.wq)?,
            wk: dense_matrix(&l.wk)?,
            wv: dense_matrix(&l.wv)?,
            wo: dense_matrix(&l.wo)?,
            gate: dense_matrix(&l.gate)?,
            up: dense_matrix(&l.up)?,
            down: dense_matrix(&l.down)?,
        })
    }
}

/// A StreamingLLM-style plan: every head of every layer gets S = alpha + beta * N.
pub fn uniform_plan(
    name: &Path,
    shape: ModelShape,
    alpha: f64,
    beta: f64,
    settings: Settings,
) -> Result<ValidPlan> {
    let alphas = vec![vec![alpha; shape.num_query_heads]; shape.num_layers];
    let betas = vec![vec![beta; shape.num_query_heads]; shape.num_layers];
    let label = name.display().to_string();
    Ok(moac::plan::validate(name, shape, settings, &alphas, &betas)?.with_name(label))
}

#[cfg(test)]
mod fused_rows {
    #![allow(clippy::unwrap_used)]
    //! The fused row functions (`fused.rs`) against the tensor versions (candle ops) on
    //! fresh random inputs, both RoPE styles, rows at different positions.
    use super::{Llama, LlamaConfig, RopeStyle};
    use crate::fused::{add_into, rms_norm, rope, swiglu};
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
