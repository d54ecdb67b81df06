//! The seeded random model (`--shape` and the tests): one layout of tensors, shapes and
//! scales ([`SeededLayout`]) generated from a seed with [`hash_uniform`], in f32 on the
//! host ([`seeded_llama`], for the cpu runner) and on the device
//! ([`DeviceEngine::seeded`]), the same values on both.

use super::upload::{build_ops, check_weights, DeviceLayer, DeviceWeights};
use super::{ptr, run_op, DeviceEngine};
use crate::llama::{Layer, Llama, LlamaConfig, Weights};
use crate::Result;
use candle_core::quantized::QMatMul;
use candle_core::{Device, Tensor};
use moac::abi::{Arg, Elem};
use moac::geometry::Dtype;
use moac::ir::PrefillMode;
use moac::ops::Op;
use moac_runtime::gpu::{Gpu, GpuBuf};
use moac_runtime::Artifact;
use std::sync::Arc;

/// A uniform number in [0, 1) with 24 random bits from (seed, i): the generator of
/// `moac_ops_fill_random` and of the sampler, in Rust.
pub fn hash_uniform(seed: u64, i: u64) -> f32 {
    let mut z = seed
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(i.wrapping_mul(0xd1b5_4a32_d192_ed03));
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 40) as f32 * (1.0 / 16_777_216.0)
}

/// The seed of one tensor of a seeded model.
pub(super) fn tensor_seed(seed: u64, index: u64) -> u64 {
    hash_uniform(seed, index).to_bits() as u64 ^ seed.rotate_left(17) ^ (index << 40)
}

/// Which tensors a seeded model has, in order, with their shapes and scales: the one
/// definition both the host ([`seeded_llama`]) and the device ([`DeviceEngine::seeded`])
/// generate from.
pub(super) struct SeededLayout {
    pub(super) hidden: usize,
    pub(super) qkv: usize,
    pub(super) attn: usize,
    pub(super) ff: usize,
}

impl SeededLayout {
    pub(super) fn of(c: &LlamaConfig, ff: usize) -> SeededLayout {
        SeededLayout {
            hidden: c.hidden,
            qkv: (c.num_heads + 2 * c.num_kv_heads) * c.head_dim,
            attn: c.num_heads * c.head_dim,
            ff,
        }
    }
    /// Layer l's matrices: (index, rows, cols, scale) of wqkv, wo, w_gu, w_down.
    fn matrices(&self, l: usize) -> [(u64, usize, usize, f32); 4] {
        let s = |fan: usize| 1.7 / (fan as f32).sqrt();
        let base = 16 + 8 * l as u64;
        [
            (base, self.qkv, self.hidden, s(self.hidden)),
            (base + 1, self.hidden, self.attn, s(self.attn)),
            (base + 2, 2 * self.ff, self.hidden, s(self.hidden)),
            (base + 3, self.hidden, self.ff, s(self.ff)),
        ]
    }
}

/// The RMSNorm weights of a seeded model: 1 + (2u - 1) / 4 (tensor `index`).
fn seeded_norm(seed: u64, index: u64, n: usize) -> Vec<f32> {
    let s = tensor_seed(seed, index);
    (0..n)
        .map(|i| 1.0 + (2.0 * hash_uniform(s, i as u64) - 1.0) * 0.25)
        .collect()
}

/// A matrix of a seeded model, its values rounded to `dtype`: (2u - 1) * scale.
fn seeded_matrix(seed: u64, index: u64, n: usize, scale: f32, dtype: Dtype) -> Vec<u16> {
    let s = tensor_seed(seed, index);
    (0..n)
        .map(|i| dtype.to_bits((2.0 * hash_uniform(s, i as u64) - 1.0) * scale))
        .collect()
}

/// A Llama with random weights from `seed` (`ff`: the MLP width), every value exactly
/// an f16/bf16 number of `dtype` (norms f32), tied embeddings: the same model the device
/// engine generates on the device from the same seed ([`DeviceEngine::seeded`]), held
/// in f32 on the host for the cpu runner.
pub fn seeded_llama(config: LlamaConfig, ff: usize, seed: u64, dtype: Dtype) -> Result<Llama> {
    let c = &config;
    let lay = SeededLayout::of(c, ff);
    let t = |v: Vec<f32>, r: usize, k: usize| -> Result<Tensor> {
        Ok(Tensor::from_vec(v, (r, k), &Device::Cpu)?)
    };
    let mut layers = Vec::with_capacity(c.num_layers);
    for l in 0..c.num_layers {
        let [qkv, wo, gu, down] = lay.matrices(l).map(|(i, r, k, sc)| {
            (
                dtype.f32_of(&seeded_matrix(seed, i, r * k, sc, dtype)),
                r,
                k,
            )
        });
        let (q, kv) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let h = c.hidden;
        let wqkv = t(qkv.0, qkv.1, qkv.2)?;
        let gu_t = t(gu.0, gu.1, gu.2)?;
        layers.push(Layer {
            attn_norm: Tensor::new(seeded_norm(seed, 8 * l as u64 + 1000, h), &Device::Cpu)?,
            wq: QMatMul::Tensor(wqkv.narrow(0, 0, q)?.contiguous()?).into(),
            wk: QMatMul::Tensor(wqkv.narrow(0, q, kv)?.contiguous()?).into(),
            wv: QMatMul::Tensor(wqkv.narrow(0, q + kv, kv)?.contiguous()?).into(),
            wo: QMatMul::Tensor(t(wo.0, wo.1, wo.2)?).into(),
            ffn_norm: Tensor::new(seeded_norm(seed, 8 * l as u64 + 1001, h), &Device::Cpu)?,
            gate: QMatMul::Tensor(gu_t.narrow(0, 0, ff)?.contiguous()?).into(),
            up: QMatMul::Tensor(gu_t.narrow(0, ff, ff)?.contiguous()?).into(),
            down: QMatMul::Tensor(t(down.0, down.1, down.2)?).into(),
        });
    }
    let embed_scale = 1.7 / (c.hidden as f32).sqrt();
    let embed = t(
        dtype.f32_of(&seeded_matrix(
            seed,
            1,
            c.vocab_size * c.hidden,
            embed_scale,
            dtype,
        )),
        c.vocab_size,
        c.hidden,
    )?;
    let w = Weights {
        lm_head: QMatMul::Tensor(embed.clone()).into(),
        embed: QMatMul::Tensor(embed).into(),
        layers,
        norm: Tensor::new(seeded_norm(seed, 2, c.hidden), &Device::Cpu)?,
    };
    Llama::from_weights(config, w)
}

impl DeviceEngine {
    /// The model of [`seeded_llama`] (same config, MLP width, seed and the artifact's
    /// dtype), generated on the device: nothing large crosses from the host, and the
    /// values are those the host generates.
    pub fn seeded(
        gpu: Arc<Gpu>,
        config: LlamaConfig,
        ff: usize,
        seed: u64,
        artifact: Artifact,
        mode: PrefillMode,
    ) -> Result<DeviceEngine> {
        let dtype = artifact.dtype();
        check_weights(&gpu, &config, ff, true)?;
        let ops = build_ops(&gpu, &config, ff, dtype)?;
        let c = &config;
        let lay = SeededLayout::of(c, ff);
        let random = |index: u64, n: usize, scale: f32| -> Result<GpuBuf> {
            let mut b = gpu.alloc_of::<u16>(n)?;
            let args = vec![
                ("buf", ptr(gpu.addr_mut(&mut b, 0), Elem::Scalar)),
                ("count", Arg::I64(n as i64)),
                ("seed", Arg::I64(tensor_seed(seed, index) as i64)),
                ("scale", Arg::F32(scale)),
            ];
            run_op(&gpu, &ops, Op::FillRandom, n, args)?;
            Ok(b)
        };
        let norm = |index: u64| -> Result<GpuBuf> {
            let v = seeded_norm(seed, index, c.hidden);
            let mut b = gpu.alloc_of::<f32>(v.len())?;
            gpu.upload(&mut b, 0, &v)?;
            Ok(b)
        };
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let [qkv, wo, gu, down] = lay.matrices(l);
            layers.push(DeviceLayer {
                attn_norm: norm(8 * l as u64 + 1000)?,
                wqkv: random(qkv.0, qkv.1 * qkv.2, qkv.3)?,
                wo: random(wo.0, wo.1 * wo.2, wo.3)?,
                ffn_norm: norm(8 * l as u64 + 1001)?,
                w_gu: random(gu.0, gu.1 * gu.2, gu.3)?,
                w_down: random(down.0, down.1 * down.2, down.3)?,
            });
        }
        let weights = DeviceWeights {
            embed: random(1, c.vocab_size * c.hidden, 1.7 / (c.hidden as f32).sqrt())?,
            lm_head: None,
            norm: norm(2)?,
            layers,
        };
        DeviceEngine::assemble(gpu, config, ff, artifact, mode, weights, ops)
    }
}
