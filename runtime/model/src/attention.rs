//! The attention of a model's layers, behind one trait: moac's compacted KV cache
//! through `moac-runtime` ([`MoacAttention`], any backend, any plan), or a plain dense
//! causal attention over every past token in f32 ([`DenseReference`]), the independent
//! reference tests compare moac against.

use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, D};
use moac_runtime::{DecodeOptions, KvCache, PrefillMode, PrefillOptions, Runtime};

/// Attention with its own KV cache, layer by layer (`Send`: a model step runs on a
/// worker of the thread pool, see [`crate::llama::Llama::decode`]).
pub trait Attention: Send {
    /// Prefill of one layer: q [B,P,Hq,D], k/v [B,P,Hkv,D], rows right-padded to P
    /// (`lens`); returns [B,P,Hq,D] and keeps each row's K/V.
    fn prefill(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        lens: &[usize],
    ) -> Result<Tensor>;
    /// One decode step of one layer: appends k/v [B,Hkv,D] and attends with q [B,Hq,D].
    fn decode(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor>;
    /// Bytes the K/V cache takes.
    fn kv_bytes(&self) -> u64;
    /// Bytes a dense f16/bf16 cache of N tokens would take.
    fn dense_kv_bytes(&self) -> u64;
}

/// What runs attention: moac's runtime (plan, backend and dtype are the runtime's) or
/// the dense reference.
#[derive(Clone, Copy)]
pub enum Engine<'a> {
    Moac {
        runtime: &'a Runtime,
        mode: PrefillMode,
    },
    Reference,
}

impl<'a> Engine<'a> {
    /// Attention with a fresh cache for `batch` rows of N = `prompt_len` +
    /// `max_new_tokens` (the N the plan's spans are sized with).
    pub fn open(
        &self,
        batch: usize,
        prompt_len: usize,
        max_new_tokens: usize,
    ) -> Result<Box<dyn Attention + 'a>> {
        Ok(match *self {
            Engine::Moac { runtime, mode } => Box::new(MoacAttention {
                runtime,
                cache: runtime.allocate_cache(batch, prompt_len, max_new_tokens)?,
                mode,
            }),
            Engine::Reference => Box::new(DenseReference::new(batch, prompt_len + max_new_tokens)),
        })
    }
}

/// moac's compacted cache: sparse prefill, then decode steps, through `moac-runtime`.
pub struct MoacAttention<'a> {
    pub runtime: &'a Runtime,
    pub cache: KvCache,
    pub mode: PrefillMode,
}

impl Attention for MoacAttention<'_> {
    fn prefill(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        lens: &[usize],
    ) -> Result<Tensor> {
        let opts = PrefillOptions::default()
            .mode(self.mode)
            .prompt_lens(lens.to_vec());
        Ok(self
            .runtime
            .prefill(&mut self.cache, layer, q, k, v, &opts)?)
    }

    fn decode(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        Ok(self
            .runtime
            .decode_step(&mut self.cache, layer, q, k, v, &DecodeOptions::default())?)
    }

    fn kv_bytes(&self) -> u64 {
        self.cache.bytes()
    }

    fn dense_kv_bytes(&self) -> u64 {
        self.cache.dense_bytes()
    }
}

/// Plain dense causal attention in f32 over every past token, K/V kept in f32 per row
/// and layer: the reference. It materializes the [Hq, T, T] scores of a prefill, so it
/// is for short prompts.
pub struct DenseReference {
    n: usize,
    /// [layer][row] -> (k, v) [T, Hkv, D].
    rows: Vec<Vec<Option<(Tensor, Tensor)>>>,
    batch: usize,
    head_dim: usize,
    kv_heads: usize,
}

impl DenseReference {
    pub fn new(batch: usize, n: usize) -> DenseReference {
        DenseReference {
            n,
            rows: Vec::new(),
            batch,
            head_dim: 0,
            kv_heads: 0,
        }
    }

    fn layer(&mut self, layer: usize) -> &mut Vec<Option<(Tensor, Tensor)>> {
        while self.rows.len() <= layer {
            self.rows.push(vec![None; self.batch]);
        }
        &mut self.rows[layer]
    }

    /// softmax(q k^T * scale + mask) v for one row: q [Tq,Hq,D], k/v [Tk,Hkv,D]; query i
    /// sees keys 0..=(Tk - Tq + i).
    fn attend(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (tq, hq, d) = q.dims3()?;
        let (tk, hkv, _) = k.dims3()?;
        let g = hq / hkv;
        // [Hkv, T, D] -> [Hq, T, D] (each KV head repeated for its g query heads).
        let expand = |x: &Tensor| -> Result<Tensor> {
            Ok(x.transpose(0, 1)?
                .unsqueeze(1)?
                .broadcast_as((hkv, g, tk, d))?
                .reshape((hq, tk, d))?
                .contiguous()?)
        };
        let (k, v) = (expand(k)?, expand(v)?);
        let q = q.transpose(0, 1)?.contiguous()?;
        let scale = 1.0 / (d as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?;
        let offset = tk - tq;
        let mask: Vec<f32> = (0..tq)
            .flat_map(|i| {
                (0..tk).map(move |j| {
                    if j <= offset + i {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (1, tq, tk), &Device::Cpu)?;
        let scores = scores.broadcast_add(&mask)?;
        let max = scores.max_keepdim(D::Minus1)?;
        let e = scores.broadcast_sub(&max)?.exp()?;
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
        Ok(p.matmul(&v)?.transpose(0, 1)?.contiguous()?)
    }
}

impl Attention for DenseReference {
    fn prefill(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        lens: &[usize],
    ) -> Result<Tensor> {
        let (b, p, hq, d) = q.dims4()?;
        self.head_dim = d;
        self.kv_heads = k.dim(2)?;
        let (q, k, v) = (
            q.to_dtype(DType::F32)?,
            k.to_dtype(DType::F32)?,
            v.to_dtype(DType::F32)?,
        );
        let mut out = Vec::with_capacity(b);
        for (row, &len) in lens.iter().enumerate().take(b) {
            let qr = q.get(row)?.narrow(0, 0, len)?;
            let kr = k.get(row)?.narrow(0, 0, len)?;
            let vr = v.get(row)?.narrow(0, 0, len)?;
            let o = Self::attend(&qr, &kr, &vr)?;
            let o = if len < p {
                Tensor::cat(
                    &[
                        o,
                        Tensor::zeros((p - len, hq, d), DType::F32, &Device::Cpu)?,
                    ],
                    0,
                )?
            } else {
                o
            };
            out.push(o);
            self.layer(layer)[row] = Some((kr, vr));
        }
        Ok(Tensor::stack(&out, 0)?)
    }

    fn decode(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let b = q.dim(0)?;
        let n = self.n;
        let (q, k, v) = (
            q.to_dtype(DType::F32)?,
            k.to_dtype(DType::F32)?,
            v.to_dtype(DType::F32)?,
        );
        let mut out = Vec::with_capacity(b);
        for row in 0..b {
            let (kn, vn) = (k.get(row)?.unsqueeze(0)?, v.get(row)?.unsqueeze(0)?);
            let (kr, vr) = match self.layer(layer)[row].take() {
                Some((kc, vc)) => (Tensor::cat(&[kc, kn], 0)?, Tensor::cat(&[vc, vn], 0)?),
                None => (kn, vn),
            };
            if kr.dim(0)? > n {
                return Err(Error::Usage(format!(
                    "row {row} of layer {layer} passed the N = {n} the cache was sized for"
                )));
            }
            out.push(Self::attend(&q.get(row)?.unsqueeze(0)?, &kr, &vr)?.squeeze(0)?);
            self.layer(layer)[row] = Some((kr, vr));
        }
        Ok(Tensor::stack(&out, 0)?)
    }

    fn kv_bytes(&self) -> u64 {
        // f32 K and V of N tokens per layer and row.
        (self.rows.len() * self.batch * 2 * self.n * self.kv_heads * self.head_dim * 4) as u64
    }

    fn dense_kv_bytes(&self) -> u64 {
        self.kv_bytes() / 2
    }
}
