//! The device engine: a whole Llama decoded on a GPU-shaped machine ([`Gpu`]: a real
//! GPU through cudarc and cuBLAS, or emu, the same kernels' CUDA source on the CPU with
//! a CPU GEMM). Weights (f16/bf16), activations and moac's compacted KV cache stay in
//! device buffers; per decode step the host uploads nothing but the tokens it chooses
//! itself and downloads nothing but the tokens sampled on the device.
//!
//! A step: embedding gather, then per layer RMSNorm -> fused QKV GEMM -> RoPE split at
//! each row's position -> moac's append + split-KV decode + merge -> output GEMM added
//! into the f32 residual stream -> RMSNorm -> fused gate/up GEMM -> SiLU x up -> down
//! GEMM added into the residual; the final RMSNorm and the LM head; greedy or nucleus
//! sampling on the device. Everything but the GEMMs and the attention is an op of
//! [`moac::ops`], generated and built like the attention kernels. Prefill runs the same
//! layers over every prompt position (row-wise work in chunks), moac's sparse prefill
//! attention and the cache fill.
//!
//! A session holds a batch of sequences with different prompt lengths; a sequence that
//! finishes leaves the batch ([`Session::retire`]): its rows are closed up, so it costs
//! no further work.

use crate::llama::{dense_matrix, Layer, Llama, LlamaConfig, RopeStyle};
use crate::weights::Weights;
use crate::{Error, Result};
use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Tensor};
use moac::abi::{Arg, ArgPack, Elem};
use moac::geometry::{CacheGeometry, Dtype};
use moac::ir::PrefillMode;
use moac::ops::{Op, OpsShape, RopePairs};
use moac_runtime::backend::f32_of;
use moac_runtime::gpu::attention::{DecodeScratch, DeviceAttention, DeviceKv};
use moac_runtime::gpu::{Captured, Gpu, GpuBuf, GpuGraph, GpuModule};
use moac_runtime::Artifact;
use std::sync::Arc;

/// Rows of prompt positions whose row-wise work (norms, projections, MLP) runs at once.
const PREFILL_CHUNK: usize = 1024;

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
fn tensor_seed(seed: u64, index: u64) -> u64 {
    hash_uniform(seed, index).to_bits() as u64 ^ seed.rotate_left(17) ^ (index << 40)
}

/// Which tensors a seeded model has, in order, with their shapes and scales: the one
/// definition both the host ([`seeded_llama`]) and the device ([`DeviceWeights::seeded`])
/// generate from.
struct SeededLayout {
    hidden: usize,
    qkv: usize,
    attn: usize,
    ff: usize,
}

impl SeededLayout {
    fn of(c: &LlamaConfig, ff: usize) -> SeededLayout {
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
        .map(|i| {
            moac_runtime::backend::to_bits((2.0 * hash_uniform(s, i as u64) - 1.0) * scale, dtype)
        })
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
                f32_of(&seeded_matrix(seed, i, r * k, sc, dtype), dtype),
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
            wq: QMatMul::Tensor(wqkv.narrow(0, 0, q)?.contiguous()?),
            wk: QMatMul::Tensor(wqkv.narrow(0, q, kv)?.contiguous()?),
            wv: QMatMul::Tensor(wqkv.narrow(0, q + kv, kv)?.contiguous()?),
            wo: QMatMul::Tensor(t(wo.0, wo.1, wo.2)?),
            ffn_norm: Tensor::new(seeded_norm(seed, 8 * l as u64 + 1001, h), &Device::Cpu)?,
            gate: QMatMul::Tensor(gu_t.narrow(0, 0, ff)?.contiguous()?),
            up: QMatMul::Tensor(gu_t.narrow(0, ff, ff)?.contiguous()?),
            down: QMatMul::Tensor(t(down.0, down.1, down.2)?),
        });
    }
    let embed_scale = 1.7 / (c.hidden as f32).sqrt();
    let embed = t(
        f32_of(
            &seeded_matrix(seed, 1, c.vocab_size * c.hidden, embed_scale, dtype),
            dtype,
        ),
        c.vocab_size,
        c.hidden,
    )?;
    let w = Weights {
        lm_head: QMatMul::Tensor(embed.clone()),
        embed,
        layers,
        norm: Tensor::new(seeded_norm(seed, 2, c.hidden), &Device::Cpu)?,
    };
    Llama::from_weights(config, w)
}

/// One layer's weights on the device.
struct DeviceLayer {
    attn_norm: GpuBuf,
    /// [(Hq + 2 Hkv) D, H]
    wqkv: GpuBuf,
    /// [H, Hq D]
    wo: GpuBuf,
    ffn_norm: GpuBuf,
    /// [2 FF, H]: gate rows, then up rows.
    w_gu: GpuBuf,
    /// [H, FF]
    w_down: GpuBuf,
}

/// The model's weights on the device.
struct DeviceWeights {
    embed: GpuBuf,
    /// `None`: tied to the embedding.
    lm_head: Option<GpuBuf>,
    norm: GpuBuf,
    layers: Vec<DeviceLayer>,
}

/// An engine error that is the caller's to fix.
fn usage(m: impl Into<String>) -> Error {
    Error::Usage(m.into())
}

/// Bytes the engine's weights take on the device.
pub fn weight_bytes(c: &LlamaConfig, ff: usize, tied: bool) -> u64 {
    let lay = SeededLayout::of(c, ff);
    let per_layer = (lay.qkv * lay.hidden + lay.hidden * lay.attn + 3 * ff * lay.hidden) * 2
        + 2 * 4 * lay.hidden;
    let embed = c.vocab_size * c.hidden * 2;
    (c.num_layers * per_layer + embed * if tied { 1 } else { 2 } + 4 * c.hidden) as u64
}

/// The engine's kernels and weights for one model, plan and dtype.
pub struct DeviceEngine {
    gpu: Arc<Gpu>,
    config: LlamaConfig,
    ff: usize,
    dtype: Dtype,
    mode: PrefillMode,
    artifact: Artifact,
    ops: GpuModule,
    weights: DeviceWeights,
    /// Capture the decode step as a CUDA graph (cuda; default on).
    graphs: bool,
}

/// How the next token of each row is chosen on the device.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DeviceSampling {
    Greedy,
    /// Nucleus sampling at `temperature` (> 0) over the smallest set of tokens holding
    /// `top_p` of the probability, with random numbers from `seed`, the sequence and
    /// the step.
    TopP {
        temperature: f32,
        top_p: f32,
        seed: u64,
    },
}

/// A batch of sequences being decoded: its caches and every buffer a step needs,
/// allocated once.
pub struct Session {
    /// Rows still in the batch.
    rows: usize,
    /// The sequence (its index in the prompts) each row holds.
    seq_ids: Vec<usize>,
    /// Tokens each row holds (prompt + generated so far).
    lens: Vec<usize>,
    n: usize,
    attn: DeviceAttention,
    caches: Vec<DeviceKv>,
    lens_dev: GpuBuf,
    seq_ids_dev: GpuBuf,
    tokens: GpuBuf,
    step: usize,
    bufs: StepBufs,
    /// The decode step captured as a CUDA graph, for this many rows.
    graph: Option<(usize, GpuGraph)>,
    /// Capture failed (or the machine has no graphs): steps run launch by launch.
    graphs_failed: bool,
    /// Why a capture failed.
    graph_note: Option<String>,
}

/// Buffers of a decode step for the batch's first size.
struct StepBufs {
    x: GpuBuf,
    h: GpuBuf,
    qkv: GpuBuf,
    q: GpuBuf,
    k: GpuBuf,
    v: GpuBuf,
    scratch: DecodeScratch,
    o: GpuBuf,
    gu: GpuBuf,
    act: GpuBuf,
    logits: GpuBuf,
}

fn ptr(p: u64, e: Elem) -> Arg {
    Arg::Ptr(p, e)
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
            let bits: Vec<u16> = v
                .iter()
                .map(|&x| moac_runtime::backend::to_bits(x, dtype))
                .collect();
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
        let tied = matches!(&llama.lm_head, QMatMul::Tensor(t) if t.id() == llama.embed.id());
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
            embed: upload_bits(&llama.embed)?,
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

    fn assemble(
        gpu: Arc<Gpu>,
        config: LlamaConfig,
        ff: usize,
        artifact: Artifact,
        mode: PrefillMode,
        weights: DeviceWeights,
        ops: GpuModule,
    ) -> Result<DeviceEngine> {
        let want = config.shape();
        if *artifact.plan().model() != want {
            return Err(usage(format!(
                "the artifact's plan is for another attention shape than the model's ({} layers x {} heads)",
                want.num_layers, want.num_query_heads
            )));
        }
        let compiled = artifact.layers();
        if compiled.len() != config.num_layers {
            return Err(usage(format!(
                "the device engine needs every layer compiled; the artifact holds layers {compiled:?} of {}",
                config.num_layers
            )));
        }
        let dtype = artifact.dtype();
        Ok(DeviceEngine {
            gpu,
            config,
            ff,
            dtype,
            mode,
            artifact,
            ops,
            weights,
            graphs: true,
        })
    }

    /// Whether decode steps are captured as a CUDA graph once per batch size and
    /// replayed (cuda only; on by default; a capture that fails falls back to plain
    /// launches with one line on stderr).
    pub fn set_graphs(&mut self, on: bool) {
        self.graphs = on;
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// The MLP width.
    pub fn intermediate(&self) -> usize {
        self.ff
    }

    /// Bytes of the weights on the device.
    pub fn weight_bytes(&self) -> u64 {
        weight_bytes(&self.config, self.ff, self.weights.lm_head.is_none())
    }

    fn op(&self, op: Op, rows: usize, args: Vec<(&'static str, Arg)>) -> Result<()> {
        run_op(&self.gpu, &self.ops, op, rows, args)
    }

    /// Bytes a session of `batch` rows and N = `prompt_len + max_new` takes on the
    /// device beyond the weights: the compacted cache plus the step buffers, and with
    /// `with_prefill` the workspace of prefilling every row's `prompt_len` tokens at once
    /// (allocated while the cache lives).
    pub fn session_bytes(
        &self,
        batch: usize,
        prompt_len: usize,
        max_new: usize,
        with_prefill: bool,
    ) -> Result<u64> {
        let geometry = CacheGeometry::new(self.artifact.plan(), prompt_len as u64, max_new as u64)
            .map_err(moac_runtime::Error::from)?;
        Ok(session_bytes(
            &self.config,
            self.ff,
            &geometry,
            self.dtype,
            batch,
            if with_prefill { prompt_len } else { 0 },
        ))
    }

    /// Checks that a session fits the device's free memory, else names what would.
    fn check_fits(
        &self,
        batch: usize,
        prompt_len: usize,
        max_new: usize,
        with_prefill: bool,
    ) -> Result<()> {
        let Some((free, _)) = self.gpu.memory()? else {
            return Ok(());
        };
        let need = self.session_bytes(batch, prompt_len, max_new, with_prefill)?;
        // Headroom for cuBLAS workspaces and the driver.
        let usable = free.saturating_sub(512 << 20);
        if need > usable {
            let per_row = self
                .session_bytes(1, prompt_len, max_new, with_prefill)?
                .max(1);
            let fits = usable / per_row;
            return Err(usage(format!(
                "a batch of {batch} at {} tokens needs {:.2} GiB on the GPU, {:.2} GiB are free: at most {fits} rows fit at this length",
                prompt_len + max_new,
                need as f64 / (1u64 << 30) as f64,
                usable as f64 / (1u64 << 30) as f64,
            )));
        }
        Ok(())
    }

    fn new_session(
        &self,
        batch: usize,
        prompt_len: usize,
        max_new: usize,
        with_prefill: bool,
    ) -> Result<Session> {
        if batch == 0 {
            return Err(usage("no prompt"));
        }
        let n = prompt_len + max_new;
        if n > self.config.context_len {
            return Err(Error::TooLong {
                what: "prompt + new tokens".into(),
                len: n,
                max: self.config.context_len,
            });
        }
        self.check_fits(batch, prompt_len, max_new, with_prefill)?;
        let attn = DeviceAttention::new(&self.gpu, &self.artifact, prompt_len, max_new)?;
        let c = &self.config;
        let g = &self.gpu;
        let caches = (0..c.num_layers)
            .map(|l| attn.new_cache(l, batch))
            .collect::<moac_runtime::Result<Vec<_>>>()?;
        let (hq, hkv, d) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let bufs = StepBufs {
            x: g.alloc_of::<f32>(batch * c.hidden)?,
            h: g.alloc_of::<u16>(batch * c.hidden)?,
            qkv: g.alloc_of::<f32>(batch * (hq + 2 * hkv) * d)?,
            q: g.alloc_of::<u16>(batch * hq * d)?,
            k: g.alloc_of::<u16>(batch * hkv * d)?,
            v: g.alloc_of::<u16>(batch * hkv * d)?,
            scratch: attn.scratch(batch)?,
            o: g.alloc_of::<u16>(batch * hq * d)?,
            gu: g.alloc_of::<f32>(batch * 2 * self.ff)?,
            act: g.alloc_of::<u16>(batch * self.ff)?,
            logits: g.alloc_of::<f32>(batch * c.vocab_size)?,
        };
        let ids: Vec<i32> = (0..batch as i32).collect();
        let mut seq_ids_dev = g.alloc_of::<i32>(batch)?;
        g.upload(&mut seq_ids_dev, 0, &ids)?;
        Ok(Session {
            rows: batch,
            seq_ids: (0..batch).collect(),
            lens: vec![0; batch],
            n,
            attn,
            caches,
            lens_dev: g.alloc_of::<i32>(batch)?,
            seq_ids_dev,
            tokens: g.alloc_of::<i32>(batch)?,
            step: 0,
            bufs,
            graph: None,
            graphs_failed: false,
            graph_note: None,
        })
    }

    /// Starts a session: prefill of `prompts` (different lengths allowed) with room for
    /// `max_new` more tokens each; leaves each row's next-token logits in the session.
    pub fn start(&self, prompts: &[&[u32]], max_new: usize) -> Result<Session> {
        if let Some(row) = prompts.iter().position(|p| p.is_empty()) {
            return Err(usage(format!("prompt {row} is empty")));
        }
        let c = self.config;
        if let Some(&bad) = prompts
            .iter()
            .flat_map(|p| p.iter())
            .find(|&&t| t as usize >= c.vocab_size)
        {
            return Err(usage(format!(
                "token id {bad} is outside the vocabulary ({} ids)",
                c.vocab_size
            )));
        }
        let b = prompts.len();
        let p = prompts.iter().map(|r| r.len()).max().unwrap_or(0);
        let mut s = self.new_session(b, p, max_new, true)?;
        let g = &self.gpu;
        let rows = b * p;
        let mut tokens = Vec::with_capacity(rows);
        let mut positions = Vec::with_capacity(rows);
        for r in prompts {
            tokens.extend(r.iter().map(|&t| t as i32));
            tokens.resize(positions.len() + p, 0);
            positions.extend(0..p as i32);
        }
        let lens: Vec<i32> = prompts.iter().map(|r| r.len() as i32).collect();
        let last: Vec<i32> = lens
            .iter()
            .enumerate()
            .map(|(i, &l)| (i * p) as i32 + l - 1)
            .collect();
        let upload_i32 = |v: &[i32]| -> Result<GpuBuf> {
            let mut buf = g.alloc_of::<i32>(v.len())?;
            g.upload(&mut buf, 0, v)?;
            Ok(buf)
        };
        let (tok_d, pos_d, lens_d, last_d) = (
            upload_i32(&tokens)?,
            upload_i32(&positions)?,
            upload_i32(&lens)?,
            upload_i32(&last)?,
        );
        let (hq, hkv, d, hid) = (c.num_heads, c.num_kv_heads, c.head_dim, c.hidden);
        let qkv_w = (hq + 2 * hkv) * d;
        let chunk = PREFILL_CHUNK.min(rows);
        let mut x = g.alloc_of::<f32>(rows * hid)?;
        let mut h = g.alloc_of::<u16>(chunk * hid)?;
        let mut qkv = g.alloc_of::<f32>(chunk * qkv_w)?;
        let mut q = g.alloc_of::<u16>(rows * hq * d)?;
        let mut k = g.alloc_of::<u16>(rows * hkv * d)?;
        let mut v = g.alloc_of::<u16>(rows * hkv * d)?;
        let mut o = g.alloc_of::<u16>(rows * hq * d)?;
        let mut gu = g.alloc_of::<f32>(chunk * 2 * self.ff)?;
        let mut act = g.alloc_of::<u16>(chunk * self.ff)?;
        self.op(
            Op::Embed,
            rows,
            vec![
                ("tokens", ptr(g.addr(&tok_d, 0), Elem::Int)),
                ("table", ptr(g.addr(&self.weights.embed, 0), Elem::Scalar)),
                ("x", ptr(g.addr_mut(&mut x, 0), Elem::Float)),
                ("rows", Arg::I32(rows as i32)),
            ],
        )?;
        let scale = 1.0 / (d as f32).sqrt();
        for (l, w) in self.weights.layers.iter().enumerate() {
            for c0 in (0..rows).step_by(chunk) {
                let m = chunk.min(rows - c0);
                self.norm(&x, c0 * hid, &w.attn_norm, None, &mut h, m)?;
                g.gemm(
                    self.dtype,
                    &mut qkv,
                    0,
                    &h,
                    0,
                    &w.wqkv,
                    0,
                    (m, qkv_w, hid),
                    0.0,
                )?;
                self.op(
                    Op::RopeQkv,
                    m,
                    vec![
                        ("qkv", ptr(g.addr(&qkv, 0), Elem::Float)),
                        ("positions", ptr(g.addr(&pos_d, c0 * 4), Elem::Int)),
                        ("pos_offset", Arg::I32(0)),
                        ("q", ptr(g.addr_mut(&mut q, c0 * hq * d * 2), Elem::Scalar)),
                        ("k", ptr(g.addr_mut(&mut k, c0 * hkv * d * 2), Elem::Scalar)),
                        ("v", ptr(g.addr_mut(&mut v, c0 * hkv * d * 2), Elem::Scalar)),
                        ("rows", Arg::I32(m as i32)),
                    ],
                )?;
            }
            s.attn
                .prefill(l, &q, &k, &v, &lens_d, (b, p), &mut o, self.mode, scale)?;
            s.attn.fill(l, &k, &v, &lens_d, (b, p), &mut s.caches[l])?;
            for c0 in (0..rows).step_by(chunk) {
                let m = chunk.min(rows - c0);
                self.mlp(w, &mut x, c0, &o, c0 * hq * d, &mut h, &mut gu, &mut act, m)?;
            }
        }
        self.norm(&x, 0, &self.weights.norm, Some(&last_d), &mut s.bufs.h, b)?;
        self.lm_head(&mut s, b)?;
        s.lens = prompts.iter().map(|r| r.len()).collect();
        g.upload(&mut s.lens_dev, 0, &lens)?;
        g.synchronize()?;
        Ok(s)
    }

    /// out[r] = RMSNorm(x[x_off + r or row_index[r]]) * w, for `rows` rows.
    fn norm(
        &self,
        x: &GpuBuf,
        x_off: usize,
        w: &GpuBuf,
        row_index: Option<&GpuBuf>,
        out: &mut GpuBuf,
        rows: usize,
    ) -> Result<()> {
        let g = &self.gpu;
        self.op(
            Op::RmsNorm,
            rows,
            vec![
                ("x", ptr(g.addr(x, x_off * 4), Elem::Float)),
                ("w", ptr(g.addr(w, 0), Elem::Float)),
                (
                    "row_index",
                    ptr(row_index.map_or(0, |r| g.addr(r, 0)), Elem::Int),
                ),
                ("out", ptr(g.addr_mut(out, 0), Elem::Scalar)),
                ("rows", Arg::I32(rows as i32)),
            ],
        )
    }

    /// x[r0..r0+m] += o W_o^T, then the MLP block added in the same way.
    #[allow(clippy::too_many_arguments)]
    fn mlp(
        &self,
        w: &DeviceLayer,
        x: &mut GpuBuf,
        r0: usize,
        o: &GpuBuf,
        o_off: usize,
        h: &mut GpuBuf,
        gu: &mut GpuBuf,
        act: &mut GpuBuf,
        m: usize,
    ) -> Result<()> {
        let c = &self.config;
        let (hid, attn) = (c.hidden, c.num_heads * c.head_dim);
        let g = &self.gpu;
        g.gemm(
            self.dtype,
            x,
            r0 * hid,
            o,
            o_off,
            &w.wo,
            0,
            (m, hid, attn),
            1.0,
        )?;
        self.norm(x, r0 * hid, &w.ffn_norm, None, h, m)?;
        g.gemm(
            self.dtype,
            gu,
            0,
            h,
            0,
            &w.w_gu,
            0,
            (m, 2 * self.ff, hid),
            0.0,
        )?;
        self.op(
            Op::SiluMul,
            m,
            vec![
                ("gu", ptr(g.addr(gu, 0), Elem::Float)),
                ("out", ptr(g.addr_mut(act, 0), Elem::Scalar)),
                ("rows", Arg::I32(m as i32)),
            ],
        )?;
        g.gemm(
            self.dtype,
            x,
            r0 * hid,
            act,
            0,
            &w.w_down,
            0,
            (m, hid, self.ff),
            1.0,
        )?;
        Ok(())
    }

    /// logits [rows, V] from the normed last hidden states in `s.bufs.h`.
    fn lm_head(&self, s: &mut Session, rows: usize) -> Result<()> {
        let c = &self.config;
        let head = self.weights.lm_head.as_ref().unwrap_or(&self.weights.embed);
        self.gpu.gemm(
            self.dtype,
            &mut s.bufs.logits,
            0,
            &s.bufs.h,
            0,
            head,
            0,
            (rows, c.vocab_size, c.hidden),
            0.0,
        )?;
        Ok(())
    }

    /// Picks every row's next token on the device (into the session's token buffer,
    /// which the next [`DeviceEngine::step`] reads) and returns them.
    pub fn sample(&self, s: &mut Session, how: DeviceSampling) -> Result<Vec<u32>> {
        let g = &self.gpu;
        let rows = s.rows;
        let logits = ptr(g.addr(&s.bufs.logits, 0), Elem::Float);
        let tokens = ptr(g.addr_mut(&mut s.tokens, 0), Elem::Int);
        match how {
            DeviceSampling::Greedy => self.op(
                Op::Argmax,
                rows,
                vec![
                    ("logits", logits),
                    ("tokens", tokens),
                    ("rows", Arg::I32(rows as i32)),
                ],
            )?,
            DeviceSampling::TopP {
                temperature,
                top_p,
                seed,
            } => {
                if !(temperature > 0.0 && temperature.is_finite() && top_p > 0.0 && top_p <= 1.0) {
                    return Err(usage(format!(
                        "sampling needs a temperature > 0 and top_p in (0, 1]; got {temperature} and {top_p}"
                    )));
                }
                self.op(
                    Op::Sample,
                    rows,
                    vec![
                        ("logits", logits),
                        ("seq_ids", ptr(g.addr(&s.seq_ids_dev, 0), Elem::Int)),
                        ("tokens", tokens),
                        ("rows", Arg::I32(rows as i32)),
                        ("seed", Arg::I64(seed as i64)),
                        ("step", Arg::I32(s.step as i32)),
                        ("temperature", Arg::F32(temperature)),
                        ("top_p", Arg::F32(top_p)),
                    ],
                )?
            }
        }
        let t: Vec<i32> = g.download(&s.tokens, 0, rows)?;
        Ok(t.into_iter().map(|x| x.max(0) as u32).collect())
    }

    /// One decode step: feeds each row's next token (`Some`: these, uploaded; `None`:
    /// the ones [`DeviceEngine::sample`] left on the device) and leaves the logits of
    /// the token after it.
    pub fn step(&self, s: &mut Session, tokens: Option<&[u32]>) -> Result<()> {
        let c = self.config;
        let g = &self.gpu;
        let b = s.rows;
        if b == 0 {
            return Err(usage("every sequence of the session has finished"));
        }
        if let Some(t) = tokens {
            if t.len() != b {
                return Err(usage(format!("{} tokens for {b} rows", t.len())));
            }
            if let Some(&bad) = t.iter().find(|&&x| x as usize >= c.vocab_size) {
                return Err(usage(format!("token id {bad} is outside the vocabulary")));
            }
            let ids: Vec<i32> = t.iter().map(|&x| x as i32).collect();
            g.upload(&mut s.tokens, 0, &ids)?;
        }
        if let Some(row) = s.lens.iter().position(|&l| l + 1 > s.n) {
            return Err(Error::Runtime(moac_runtime::Error::CapacityExceeded {
                layer: 0,
                row,
                tokens: s.lens[row] + 1,
                n: s.n,
            }));
        }
        if s.graph.as_ref().is_some_and(|(rows, _)| *rows != b) {
            s.graph = None;
        }
        if self.graphs && s.graph.is_none() && !s.graphs_failed {
            match g.capture(|| self.step_kernels(s)) {
                Ok(Captured::Graph(graph)) => s.graph = Some((b, graph)),
                Ok(Captured::Unsupported) => s.graphs_failed = true,
                Err(e) => {
                    // Run without graphs from here on ([`Session::graph_note`] says why).
                    s.graph_note = Some(format!(
                        "the decode step could not be captured as a CUDA graph ({e}); it runs launch by launch"
                    ));
                    s.graphs_failed = true;
                }
            }
        }
        match &s.graph {
            Some((_, graph)) => g.replay(graph)?,
            None => self.step_kernels(s)?,
        }
        for l in s.lens.iter_mut() {
            *l += 1;
        }
        s.step += 1;
        Ok(())
    }

    /// The device work of one decode step (what a graph captures): lengths advance,
    /// embedding, every layer, final norm and LM head, for the session's rows.
    fn step_kernels(&self, s: &mut Session) -> Result<()> {
        let c = self.config;
        let g = &self.gpu;
        let b = s.rows;
        let (hq, hkv, d, hid) = (c.num_heads, c.num_kv_heads, c.head_dim, c.hidden);
        let qkv_w = (hq + 2 * hkv) * d;
        self.op(
            Op::Advance,
            b,
            vec![
                ("lens", ptr(g.addr_mut(&mut s.lens_dev, 0), Elem::Int)),
                ("rows", Arg::I32(b as i32)),
            ],
        )?;
        let bf = &mut s.bufs;
        self.op(
            Op::Embed,
            b,
            vec![
                ("tokens", ptr(g.addr(&s.tokens, 0), Elem::Int)),
                ("table", ptr(g.addr(&self.weights.embed, 0), Elem::Scalar)),
                ("x", ptr(g.addr_mut(&mut bf.x, 0), Elem::Float)),
                ("rows", Arg::I32(b as i32)),
            ],
        )?;
        let scale = 1.0 / (d as f32).sqrt();
        for (l, w) in self.weights.layers.iter().enumerate() {
            self.norm(&bf.x, 0, &w.attn_norm, None, &mut bf.h, b)?;
            g.gemm(
                self.dtype,
                &mut bf.qkv,
                0,
                &bf.h,
                0,
                &w.wqkv,
                0,
                (b, qkv_w, hid),
                0.0,
            )?;
            self.op(
                Op::RopeQkv,
                b,
                vec![
                    ("qkv", ptr(g.addr(&bf.qkv, 0), Elem::Float)),
                    ("positions", ptr(g.addr(&s.lens_dev, 0), Elem::Int)),
                    ("pos_offset", Arg::I32(-1)),
                    ("q", ptr(g.addr_mut(&mut bf.q, 0), Elem::Scalar)),
                    ("k", ptr(g.addr_mut(&mut bf.k, 0), Elem::Scalar)),
                    ("v", ptr(g.addr_mut(&mut bf.v, 0), Elem::Scalar)),
                    ("rows", Arg::I32(b as i32)),
                ],
            )?;
            s.attn
                .append(l, &bf.k, &bf.v, &s.lens_dev, b, &mut s.caches[l])?;
            s.attn.decode(
                l,
                &bf.q,
                &s.caches[l],
                &s.lens_dev,
                b,
                &mut bf.scratch,
                &mut bf.o,
                scale,
            )?;
            self.mlp(
                w,
                &mut bf.x,
                0,
                &bf.o,
                0,
                &mut bf.h,
                &mut bf.gu,
                &mut bf.act,
                b,
            )?;
        }
        self.norm(&bf.x, 0, &self.weights.norm, None, &mut bf.h, b)?;
        self.lm_head(s, b)
    }

    /// Every row's logits of the last prefill or step, [rows, V].
    pub fn logits(&self, s: &Session) -> Result<Vec<f32>> {
        Ok(self
            .gpu
            .download(&s.bufs.logits, 0, s.rows * self.config.vocab_size)?)
    }

    /// Removes finished sequences: keeps the rows whose sequence ids are in `keep`,
    /// in their order, closing up the caches and per-row buffers so later steps run
    /// only the rows left.
    pub fn retain(&self, s: &mut Session, keep: impl Fn(usize) -> bool) -> Result<()> {
        let g = &self.gpu;
        let mut to = 0;
        for from in 0..s.rows {
            if !keep(s.seq_ids[from]) {
                continue;
            }
            if to != from {
                for (l, c) in s.caches.iter_mut().enumerate() {
                    let row = s.attn.shape(l)?.cache_elems(1) * 2;
                    g.move_row(&mut c.k, to, from, row)?;
                    g.move_row(&mut c.v, to, from, row)?;
                }
                g.move_row(&mut s.lens_dev, to, from, 4)?;
                g.move_row(&mut s.tokens, to, from, 4)?;
                g.move_row(&mut s.seq_ids_dev, to, from, 4)?;
                s.seq_ids[to] = s.seq_ids[from];
                s.lens[to] = s.lens[from];
            }
            to += 1;
        }
        s.rows = to;
        s.seq_ids.truncate(to);
        s.lens.truncate(to);
        Ok(())
    }

    /// A session whose caches hold `context` random tokens per row (no prefill), for
    /// throughput measurements: decode speed does not depend on the values.
    pub fn synthetic(
        &self,
        batch: usize,
        context: usize,
        max_new: usize,
        seed: u64,
    ) -> Result<Session> {
        let mut s = self.new_session(batch, context, max_new, false)?;
        let g = &self.gpu;
        for (l, c) in s.caches.iter_mut().enumerate() {
            for (j, buf) in [&mut c.k, &mut c.v].into_iter().enumerate() {
                let n = buf.bytes() / 2;
                let args = vec![
                    ("buf", ptr(g.addr_mut(buf, 0), Elem::Scalar)),
                    ("count", Arg::I64(n as i64)),
                    (
                        "seed",
                        Arg::I64(tensor_seed(seed, (1 << 20) + 2 * l as u64 + j as u64) as i64),
                    ),
                    ("scale", Arg::F32(1.0)),
                ];
                run_op(g, &self.ops, Op::FillRandom, n, args)?;
            }
        }
        s.lens = vec![context; batch];
        let lens = vec![context as i32; batch];
        g.upload(&mut s.lens_dev, 0, &lens)?;
        let tokens: Vec<i32> = (0..batch)
            .map(|i| (i % self.config.vocab_size) as i32)
            .collect();
        g.upload(&mut s.tokens, 0, &tokens)?;
        g.synchronize()?;
        Ok(s)
    }

    /// The decode attention (and merge) of every layer for the session's rows as they
    /// are, without appending: what a step spends in attention.
    pub fn attention_pass(&self, s: &mut Session) -> Result<()> {
        let scale = 1.0 / (self.config.head_dim as f32).sqrt();
        for (l, c) in s.caches.iter().enumerate() {
            s.attn.decode(
                l,
                &s.bufs.q,
                c,
                &s.lens_dev,
                s.rows,
                &mut s.bufs.scratch,
                &mut s.bufs.o,
                scale,
            )?;
        }
        Ok(())
    }
}

impl Session {
    /// Whether the last decode step ran as a replayed CUDA graph.
    pub fn graphed(&self) -> bool {
        self.graph.is_some()
    }

    /// Why decode steps are not captured as a graph, if a capture failed.
    pub fn graph_note(&self) -> Option<&str> {
        self.graph_note.as_deref()
    }

    /// Bytes of every device buffer the session holds (caches, per-row state and the
    /// decode step's buffers).
    pub fn device_bytes(&self) -> u64 {
        let b = &self.bufs;
        let step = [
            &b.x, &b.h, &b.qkv, &b.q, &b.k, &b.v, &b.o, &b.gu, &b.act, &b.logits,
        ]
        .iter()
        .map(|x| x.bytes())
        .sum::<usize>()
            + b.scratch.bytes();
        let rows = self.lens_dev.bytes() + self.seq_ids_dev.bytes() + self.tokens.bytes();
        self.kv_bytes() + (step + rows) as u64
    }

    /// Rows still decoding.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The sequence (index into the prompts) of each row.
    pub fn seq_ids(&self) -> &[usize] {
        &self.seq_ids
    }

    /// Tokens held by each row.
    pub fn lens(&self) -> &[usize] {
        &self.lens
    }

    /// N, the tokens a row may hold.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Bytes of moac's compacted cache for the rows the session was started with.
    pub fn kv_bytes(&self) -> u64 {
        self.caches
            .iter()
            .map(|c| (c.k.bytes() + c.v.bytes()) as u64)
            .sum()
    }

    /// The geometry the cache was sized with.
    pub fn geometry(&self) -> &CacheGeometry {
        self.attn.geometry()
    }

    /// Bytes the decode attention reads per step for the current rows and lengths:
    /// each KV head's filled slots (min(len, capacity)) of K and V.
    pub fn attention_bytes(&self, dtype: Dtype) -> u64 {
        let mut bytes = 0u64;
        for l in self.attn.layers() {
            let Ok(s) = self.attn.shape(l) else { continue };
            for &len in &self.lens {
                for &cap in &s.kv_capacity {
                    bytes += (len.min(cap) * s.head_dim * 2) as u64 * dtype.size_bytes();
                }
            }
        }
        bytes
    }
}

/// Device bytes of a session beyond the weights (see [`DeviceEngine::session_bytes`]).
pub fn session_bytes(
    c: &LlamaConfig,
    ff: usize,
    geometry: &CacheGeometry,
    dtype: Dtype,
    batch: usize,
    prompt_len: usize,
) -> u64 {
    let b = batch as u64;
    let kv: u64 = (0..c.num_layers)
        .map(|l| geometry.layer_kv_bytes(l, dtype, b))
        .sum();
    let (hq, hkv, d, h, v) = (
        c.num_heads as u64,
        c.num_kv_heads as u64,
        c.head_dim as u64,
        c.hidden as u64,
        c.vocab_size as u64,
    );
    let ff = ff as u64;
    let max_cap = geometry
        .layers
        .iter()
        .flat_map(|l| l.kv_capacity.iter().copied())
        .max()
        .unwrap_or(1);
    let nsplit = max_cap.div_ceil(64).max(1);
    let step = b
        * (h * 6
            + (hq + 2 * hkv) * d * 4
            + (hq + 2 * hkv) * d * 2
            + hq * nsplit * (d + 1) * 4
            + hq * d * 2
            + ff * 10
            + v * 4
            + 12);
    let rows = b * prompt_len as u64;
    let chunk = rows.min(PREFILL_CHUNK as u64);
    let prefill = rows * (h * 4 + (2 * hq + 2 * hkv) * d * 2 + 16)
        + chunk * (h * 2 + (hq + 2 * hkv) * d * 4 + ff * 10);
    kv + step + prefill
}

/// Refuses weights that cannot fit the device's free memory, before allocating any.
fn check_weights(gpu: &Gpu, c: &LlamaConfig, ff: usize, tied: bool) -> Result<()> {
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

fn build_ops(gpu: &Gpu, c: &LlamaConfig, ff: usize, dtype: Dtype) -> Result<GpuModule> {
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

fn run_op(
    gpu: &Gpu,
    ops: &GpuModule,
    op: Op,
    rows: usize,
    args: Vec<(&'static str, Arg)>,
) -> Result<()> {
    if rows == 0 {
        return Ok(());
    }
    let mut pack = ArgPack::with_params(op.entry(), "engine op", op.params(), &args)?;
    Ok(gpu.launch(ops, op.entry(), op.grid(rows), op.block(), &mut pack)?)
}
