//! A Llama-family model from a GGUF file, run on the CPU with its attention through
//! `moac-runtime`: embeddings, RMSNorm, Q/K/V with interleaved RoPE (GGUF's llama
//! weights are permuted for it), attention over the compacted KV cache (the plan's
//! sparse prefill, then decode steps), SwiGLU MLP, tied or separate LM head. Quantized
//! matrices stay quantized (candle's `QMatMul`); the embedding table is dequantized.

use crate::gguf::GgufMetadata;
use crate::{Error, Result};
use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Tensor, D};
use moac::plan::{ModelShape, Settings, ValidPlan};
use moac_runtime::{DecodeOptions, KvCache, PrefillMode, PrefillOptions, Runtime};
use std::path::Path;

/// The attention and size figures of a Llama model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LlamaConfig {
    pub num_layers: usize,
    pub hidden: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f32,
    pub rms_eps: f32,
    pub context_len: usize,
}

impl LlamaConfig {
    pub fn shape(&self) -> ModelShape {
        ModelShape {
            num_layers: self.num_layers,
            num_query_heads: self.num_heads,
            num_kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
        }
    }
}

struct Layer {
    attn_norm: Tensor,
    wq: QMatMul,
    wk: QMatMul,
    wv: QMatMul,
    wo: QMatMul,
    ffn_norm: Tensor,
    gate: QMatMul,
    up: QMatMul,
    down: QMatMul,
}

/// A loaded model.
pub struct Llama {
    pub config: LlamaConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: QMatMul,
}

fn model_err(path: &Path, message: impl std::fmt::Display) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

impl Llama {
    /// Loads a Llama-architecture GGUF file. `f32_weights`: dequantize every matrix to
    /// f32 (exact products, 4 bytes a weight) instead of keeping it quantized (candle's
    /// quantized CPU matmul also quantizes the activations to 8 bits, which moves logits
    /// by a few tenths).
    pub fn from_gguf(path: &Path, f32_weights: bool) -> Result<Llama> {
        let meta = GgufMetadata::read(path)?;
        let arch = meta.string("general.architecture")?;
        if arch != "llama" {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                message: format!("architecture {arch:?} (moac runs llama)"),
            });
        }
        let key = |k: &str| format!("llama.{k}");
        let num_heads = meta.u32(&key("attention.head_count"))? as usize;
        let hidden = meta.u32(&key("embedding_length"))? as usize;
        let f32_of = |k: &str, default: f32| -> Result<f32> {
            match meta.get(&key(k)) {
                Some(v) => v.to_f32().map_err(|e| model_err(path, format!("{k}: {e}"))),
                None => Ok(default),
            }
        };
        let config = LlamaConfig {
            num_layers: meta.u32(&key("block_count"))? as usize,
            hidden,
            num_heads,
            num_kv_heads: meta
                .u32(&key("attention.head_count_kv"))
                .map(|v| v as usize)
                .unwrap_or(num_heads),
            head_dim: hidden / num_heads.max(1),
            rope_theta: f32_of("rope.freq_base", 10000.0)?,
            rms_eps: f32_of("attention.layer_norm_rms_epsilon", 1e-5)?,
            context_len: meta
                .u32(&key("context_length"))
                .map(|v| v as usize)
                .unwrap_or(4096),
        };
        let mut file = std::fs::File::open(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let dev = Device::Cpu;
        let content = meta.content();
        let mut q = |name: &str| {
            content
                .tensor(&mut file, name, &dev)
                .map_err(|e| model_err(path, format!("tensor {name}: {e}")))
        };
        let mut qmm = |name: &str| -> Result<QMatMul> {
            let t = q(name)?;
            if f32_weights {
                return Ok(QMatMul::Tensor(
                    t.dequantize(&Device::Cpu)
                        .map_err(|e| model_err(path, format!("{name}: {e}")))?,
                ));
            }
            QMatMul::from_qtensor(t).map_err(|e| model_err(path, format!("{name}: {e}")))
        };
        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let t = |n: &str| format!("blk.{i}.{n}.weight");
            layers.push(Layer {
                attn_norm: Tensor::new(&[0f32], &dev)?,
                wq: qmm(&t("attn_q"))?,
                wk: qmm(&t("attn_k"))?,
                wv: qmm(&t("attn_v"))?,
                wo: qmm(&t("attn_output"))?,
                ffn_norm: Tensor::new(&[0f32], &dev)?,
                gate: qmm(&t("ffn_gate"))?,
                up: qmm(&t("ffn_up"))?,
                down: qmm(&t("ffn_down"))?,
            });
        }
        let mut dense = |name: &str| -> Result<Tensor> {
            content
                .tensor(&mut file, name, &dev)
                .and_then(|t| t.dequantize(&dev))
                .map_err(|e| model_err(path, format!("tensor {name}: {e}")))
        };
        for (i, l) in layers.iter_mut().enumerate() {
            l.attn_norm = dense(&format!("blk.{i}.attn_norm.weight"))?;
            l.ffn_norm = dense(&format!("blk.{i}.ffn_norm.weight"))?;
        }
        let embed = dense("token_embd.weight")?;
        let norm = dense("output_norm.weight")?;
        let head_name = if content.tensor_infos.contains_key("output.weight") {
            "output.weight"
        } else {
            "token_embd.weight"
        };
        let head = content
            .tensor(&mut file, head_name, &dev)
            .map_err(|e| model_err(path, format!("tensor {head_name}: {e}")))?;
        let lm_head = if f32_weights {
            QMatMul::Tensor(head.dequantize(&dev)?)
        } else {
            QMatMul::from_qtensor(head).map_err(|e| model_err(path, e))?
        };
        Ok(Llama {
            config,
            embed,
            layers,
            norm,
            lm_head,
        })
    }

    /// A plan that gives every head the whole sequence (`--dense`).
    pub fn dense_plan(&self, name: &Path) -> Result<ValidPlan> {
        let c = &self.config;
        let alphas = vec![vec![1e12; c.num_heads]; c.num_layers];
        let betas = vec![vec![0.0; c.num_heads]; c.num_layers];
        Ok(moac::plan::validate(
            name,
            c.shape(),
            Settings::default(),
            &alphas,
            &betas,
        )?)
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let var = x.sqr()?.mean_keepdim(D::Minus1)?;
        let inv = (var + self.config.rms_eps as f64)?.sqrt()?.recip()?;
        Ok(x.broadcast_mul(&inv)?.broadcast_mul(w)?)
    }

    /// Interleaved RoPE over `x` [T, H, D] for positions `pos..pos + T`: pairs (2i, 2i+1)
    /// rotate by `p * theta^(-2i/D)`.
    fn rope(&self, x: &Tensor, pos: usize) -> Result<Tensor> {
        let (t, h, d) = x.dims3()?;
        let half = d / 2;
        let theta = self.config.rope_theta as f64;
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for p in pos..pos + t {
            for i in 0..half {
                let a = p as f64 * theta.powf(-2.0 * i as f64 / d as f64);
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        let cos = Tensor::from_vec(cos, (t, 1, half, 1), &Device::Cpu)?;
        let sin = Tensor::from_vec(sin, (t, 1, half, 1), &Device::Cpu)?;
        let x = x.reshape((t, h, half, 2))?;
        let (x0, x1) = (x.narrow(3, 0, 1)?, x.narrow(3, 1, 1)?);
        let r0 = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
        let r1 = (x0.broadcast_mul(&sin)? + x1.broadcast_mul(&cos)?)?;
        Ok(Tensor::cat(&[r0, r1], 3)?.reshape((t, h, d))?)
    }

    /// Runs `tokens` at positions `pos..`: a prefill of the prompt when `pos == 0`
    /// (any length), else one decode step (one token). Returns logits [T, vocab] (f32).
    pub fn forward(
        &self,
        rt: &Runtime,
        cache: &mut KvCache,
        tokens: &[u32],
        pos: usize,
    ) -> Result<Tensor> {
        let c = &self.config;
        let t = tokens.len();
        if t == 0 || (pos > 0 && t != 1) {
            return Err(Error::Tokenizer(format!(
                "forward takes a whole prompt at position 0 or one token after it (got {t} at {pos})"
            )));
        }
        let ids = Tensor::new(tokens, &Device::Cpu)?;
        let mut x = self.embed.index_select(&ids, 0)?;
        for (l, w) in self.layers.iter().enumerate() {
            let h = self.rms_norm(&x, &w.attn_norm)?;
            let q = self.rope(
                &w.wq.forward(&h)?.reshape((t, c.num_heads, c.head_dim))?,
                pos,
            )?;
            let k = self.rope(
                &w.wk.forward(&h)?.reshape((t, c.num_kv_heads, c.head_dim))?,
                pos,
            )?;
            let v = w.wv.forward(&h)?.reshape((t, c.num_kv_heads, c.head_dim))?;
            let attn = if pos == 0 {
                let opts = PrefillOptions::default().mode(PrefillMode::Block64);
                rt.prefill(
                    cache,
                    l,
                    &q.unsqueeze(0)?,
                    &k.unsqueeze(0)?,
                    &v.unsqueeze(0)?,
                    &opts,
                )?
                .squeeze(0)?
            } else {
                rt.decode_step(cache, l, &q, &k, &v, &DecodeOptions::default())?
            };
            let attn = attn
                .to_dtype(DType::F32)?
                .reshape((t, c.num_heads * c.head_dim))?;
            x = (x + w.wo.forward(&attn)?)?;
            let h = self.rms_norm(&x, &w.ffn_norm)?;
            let gate = w.gate.forward(&h)?;
            x = (x + w.down.forward(&(gate.silu()? * w.up.forward(&h)?)?)?)?;
        }
        let x = self.rms_norm(&x, &self.norm)?;
        Ok(self.lm_head.forward(&x)?)
    }
}
