//! A loaded model's weights on the device: the buffers of each layer
//! ([`DeviceWeights`]), their upload from a [`Llama`] rounded to the artifact's dtype
//! ([`DeviceEngine::new`]), the check that they fit the free memory before any is
//! allocated, and the ops module built for the model's shape.

use super::{usage, weight_bytes, DeviceEngine};
use crate::llama::{dense_matrix, Llama, LlamaConfig, RopeStyle};
use crate::Result;
use candle_core::{DType, Tensor};
use moac::geometry::Dtype;
use moac::ir::PrefillMode;
use moac::ops::{OpsShape, RopePairs};
use moac_runtime::gpu::{Gpu, GpuBuf, GpuModule};
use moac_runtime::Artifact;
use std::sync::Arc;

/// One layer's weights on the device.
pub(super) struct DeviceLayer {
    pub(super) attn_norm: GpuBuf,
    /// [(Hq + 2 Hkv) D, H]
    pub(super) wqkv: GpuBuf,
    /// [H, Hq D]
    pub(super) wo: GpuBuf,
    pub(super) ffn_norm: GpuBuf,
    /// [2 FF, H]: gate rows, then up rows.
    pub(super) w_gu: GpuBuf,
    /// [H, FF]
    pub(super) w_down: GpuBuf,
}

/// The model's weights on the device.
pub(super) struct DeviceWeights {
    pub(super) embed: GpuBuf,
    /// `None`: tied to the embedding.
    pub(super) lm_head: Option<GpuBuf>,
    pub(super) norm: GpuBuf,
    pub(super) layers: Vec<DeviceLayer>,
}

impl DeviceEngine {
    /// Uploads a loaded model's weights (GGUF tensors dequantized, then rounded to the
    /// artifact's dtype) and builds the ops for its shape. The artifact must hold every
    /// layer of a plan for this model.
    pub fn new(
        gpu: Arc<Gpu>,
        llama: &Llama,
        artifact: Artifact,
        mode: PrefillMode,
    ) -> Result<DeviceEngine> {
        llama.check_plan(artifact.plan())?;
        let ff = match llama.layers.first() {
            Some(l) => dense_matrix(&l.gate)?.dim(0)?,
            None => return Err(usage("the model has no layers")),
        };
        let dtype = artifact.dtype();
        let c = llama.config;
        let upload_bits = |t: &Tensor| -> Result<GpuBuf> {
            let v: Vec<f32> = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
            let bits: Vec<u16> = v.iter().map(|&x| dtype.to_bits(x)).collect();
            let mut b = gpu.alloc_of::<u16>(bits.len())?;
            gpu.upload(&mut b, 0, &bits)?;
            Ok(b)
        };
        let upload_f32 = |t: &Tensor| -> Result<GpuBuf> {
            let v: Vec<f32> = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
            let mut b = gpu.alloc_of::<f32>(v.len())?;
            gpu.upload(&mut b, 0, &v)?;
            Ok(b)
        };
        let tied = llama.lm_head.shares_storage(&llama.embed);
        check_weights(&gpu, &c, ff, tied)?;
        let mut layers = Vec::with_capacity(llama.layers.len());
        for l in &llama.layers {
            let qkv = Tensor::cat(
                &[
                    dense_matrix(&l.wq)?,
                    dense_matrix(&l.wk)?,
                    dense_matrix(&l.wv)?,
                ],
                0,
            )?;
            let gu = Tensor::cat(&[dense_matrix(&l.gate)?, dense_matrix(&l.up)?], 0)?;
            layers.push(DeviceLayer {
                attn_norm: upload_f32(&l.attn_norm)?,
                wqkv: upload_bits(&qkv)?,
                wo: upload_bits(&dense_matrix(&l.wo)?)?,
                ffn_norm: upload_f32(&l.ffn_norm)?,
                w_gu: upload_bits(&gu)?,
                w_down: upload_bits(&dense_matrix(&l.down)?)?,
            });
        }

        let weights = DeviceWeights {
            embed: upload_bits(&llama.embed.dense()?)?,
            lm_head: if tied {
                None
            } else {
                Some(upload_bits(&dense_matrix(&llama.lm_head)?)?)
            },
            norm: upload_f32(&llama.norm)?,
            layers,
        };
        let ops = build_ops(&gpu, &c, ff, dtype)?;
        DeviceEngine::assemble(gpu, c, ff, artifact, mode, weights, ops)
    }
}

/// Refuses weights that cannot fit the device's free memory, before allocating any.
pub(super) fn check_weights(gpu: &Gpu, c: &LlamaConfig, ff: usize, tied: bool) -> Result<()> {
    let need = weight_bytes(c, ff, tied);
    if let Some((free, _)) = gpu.memory()? {
        if need + (512 << 20) > free {
            return Err(usage(format!(
                "the weights need {:.2} GiB on the GPU ({} layers, hidden {}, MLP {ff}, vocab {}); {:.2} GiB are free",
                need as f64 / (1u64 << 30) as f64,
                c.num_layers,
                c.hidden,
                c.vocab_size,
                free as f64 / (1u64 << 30) as f64
            )));
        }
    }
    Ok(())
}

pub(super) fn build_ops(gpu: &Gpu, c: &LlamaConfig, ff: usize, dtype: Dtype) -> Result<GpuModule> {
    let shape = OpsShape {
        dtype,
        hidden: c.hidden,
        num_query_heads: c.num_heads,
        num_kv_heads: c.num_kv_heads,
        head_dim: c.head_dim,
        intermediate: ff,
        vocab: c.vocab_size,
        rope_theta: c.rope_theta as f64,
        rope: match c.rope {
            RopeStyle::Interleaved => RopePairs::Interleaved,
            RopeStyle::HalfSplit => RopePairs::HalfSplit,
        },
        rms_eps: c.rms_eps,
    };
    let unit = moac::ops::emit(&shape)?;
    Ok(gpu.module(&unit.name, &unit.source, &unit.entries)?)
}
