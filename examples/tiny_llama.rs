//! A tiny Llama-shaped model with random weights, its attention run by moac-runtime:
//! token embedding, per layer RMSNorm, QKV projection, RoPE, MoA attention (prefill, then
//! decode steps with the compacted KV cache), output projection and a SiLU-gated MLP, and
//! greedy decoding. Prints tokens per second and the KV memory against a dense cache.
//!
//! cargo run -p moac-runtime --example tiny_llama -- --backend emu --steps 300

use candle_core::{DType, Device, IndexOp, Tensor, D};
use moac::plan::{ModelShape, Settings};
use moac_runtime::{Artifact, Backend, DecodeOptions, PrefillMode, PrefillOptions, Runtime};
use std::time::Instant;

const VOCAB: usize = 512;
const HIDDEN: usize = 512;
const LAYERS: usize = 4;
const HQ: usize = 8;
const HKV: usize = 2;
const HEAD_DIM: usize = 64;
const MLP: usize = 1024;

struct Layer {
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    wo: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
}

fn rms_norm(x: &Tensor) -> candle_core::Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + 1e-5)?.sqrt()?)
}

/// Rotary embedding (rotate-half form) of x [T, H, Dh] at positions `pos` [T].
fn rope(x: &Tensor, pos: &[usize]) -> candle_core::Result<Tensor> {
    let (t, h, dh) = x.dims3()?;
    let half = dh / 2;
    let mut cos = Vec::with_capacity(t * half);
    let mut sin = Vec::with_capacity(t * half);
    for &p in pos {
        for i in 0..half {
            let theta = p as f64 / 10000f64.powf(2.0 * i as f64 / dh as f64);
            cos.push(theta.cos() as f32);
            sin.push(theta.sin() as f32);
        }
    }
    let cos = Tensor::from_vec(cos, (t, 1, half), &Device::Cpu)?;
    let sin = Tensor::from_vec(sin, (t, 1, half), &Device::Cpu)?;
    let x1 = x.narrow(2, 0, half)?;
    let x2 = x.narrow(2, half, half)?;
    let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    let _ = h;
    Tensor::cat(&[r1, r2], 2)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: &str| -> String {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
            .unwrap_or_else(|| default.to_string())
    };
    let backend: Backend = arg("--backend", "cpu").parse()?;
    let steps: usize = arg("--steps", "300").parse()?;
    let prompt_len: usize = arg("--prompt-len", "1024").parse()?;
    let dev = Device::Cpu;

    // A MoA-like plan: per head rules of the shapes MoA emits, different inside groups.
    let rules = [(0.0, 0.125), (256.0, 0.0), (-1024.0, 0.5), (0.0, 0.25)];
    let alphas: Vec<Vec<f64>> = (0..LAYERS)
        .map(|l| (0..HQ).map(|h| rules[(h + l) % 4].0).collect())
        .collect();
    let betas: Vec<Vec<f64>> = (0..LAYERS)
        .map(|l| (0..HQ).map(|h| rules[(h + l) % 4].1).collect())
        .collect();
    let model = ModelShape {
        num_layers: LAYERS,
        num_query_heads: HQ,
        num_kv_heads: HKV,
        head_dim: HEAD_DIM,
    };
    let plan = moac::plan::validate(
        "tiny-llama".as_ref(),
        model,
        Settings::default(),
        &alphas,
        &betas,
    )?;
    let rt = Runtime::new(Artifact::from_plan(&plan, moac::Dtype::F16, None)?, backend)?;

    // Random weights (fixed seed through candle's CPU RNG is not available: scale randn).
    let w =
        |r: usize, c: usize| Tensor::randn(0f32, (1.0 / (r as f64).sqrt()) as f32, (r, c), &dev);
    let embed = Tensor::randn(0f32, 1.0, (VOCAB, HIDDEN), &dev)?;
    let layers: Vec<Layer> = (0..LAYERS)
        .map(|_| -> candle_core::Result<Layer> {
            Ok(Layer {
                wq: w(HIDDEN, HQ * HEAD_DIM)?,
                wk: w(HIDDEN, HKV * HEAD_DIM)?,
                wv: w(HIDDEN, HKV * HEAD_DIM)?,
                wo: w(HQ * HEAD_DIM, HIDDEN)?,
                w_gate: w(HIDDEN, MLP)?,
                w_up: w(HIDDEN, MLP)?,
                w_down: w(MLP, HIDDEN)?,
            })
        })
        .collect::<candle_core::Result<_>>()?;

    let mut cache = rt.allocate_cache(1, prompt_len, steps)?;
    println!(
        "tiny Llama: {LAYERS} layers, {HQ} query / {HKV} KV heads of {HEAD_DIM}, backend {backend:?}, N = {}",
        cache.geometry().n
    );
    // Prompt: pseudo-random tokens.
    let mut tokens: Vec<u32> = (0..prompt_len)
        .map(|i| ((i * 7919 + 13) % VOCAB) as u32)
        .collect();

    // One forward pass over `new` tokens at positions `pos`; returns the last logits.
    let forward = |cache: &mut moac_runtime::KvCache,
                   new: &[u32],
                   pos: &[usize],
                   prefill: bool|
     -> Result<Tensor, Box<dyn std::error::Error>> {
        let t = new.len();
        let ids = Tensor::from_vec(new.to_vec(), t, &dev)?;
        let mut x = embed.index_select(&ids, 0)?; // [T, HIDDEN]
        for (l, lw) in layers.iter().enumerate() {
            let h = rms_norm(&x)?;
            let q = rope(&h.matmul(&lw.wq)?.reshape((t, HQ, HEAD_DIM))?, pos)?;
            let k = rope(&h.matmul(&lw.wk)?.reshape((t, HKV, HEAD_DIM))?, pos)?;
            let v = h.matmul(&lw.wv)?.reshape((t, HKV, HEAD_DIM))?;
            let attn = if prefill {
                rt.prefill(
                    cache,
                    l,
                    &q.unsqueeze(0)?,
                    &k.unsqueeze(0)?,
                    &v.unsqueeze(0)?,
                    &PrefillOptions::default()
                        .prompt_lens([t])
                        .mode(PrefillMode::Block64),
                )?
                .i(0)?
            } else {
                rt.decode_step(cache, l, &q, &k, &v, &DecodeOptions::default())?
            };
            let attn = attn.to_dtype(DType::F32)?.reshape((t, HQ * HEAD_DIM))?;
            x = (x + attn.matmul(&lw.wo)?)?;
            let h = rms_norm(&x)?;
            let gate = candle_core::Tensor::silu(&h.matmul(&lw.w_gate)?)?;
            let mlp = (gate * h.matmul(&lw.w_up)?)?.matmul(&lw.w_down)?;
            x = (x + mlp)?;
        }
        let last = rms_norm(&x.i(t - 1)?.unsqueeze(0)?)?;
        Ok(last.matmul(&embed.t()?)?.squeeze(0)?)
    };

    let start = Instant::now();
    let pos: Vec<usize> = (0..prompt_len).collect();
    let mut logits = forward(&mut cache, &tokens.clone(), &pos, true)?;
    let prefill_time = start.elapsed();
    let start = Instant::now();
    for s in 0..steps {
        let next = logits.argmax(0)?.to_scalar::<u32>()?;
        tokens.push(next);
        logits = forward(&mut cache, &[next], &[prompt_len + s], false)?;
        let finite = logits.to_vec1::<f32>()?.iter().all(|x| x.is_finite());
        if !finite {
            return Err(format!("non-finite logits at step {s}").into());
        }
    }
    let decode_time = start.elapsed();
    println!(
        "prefill {prompt_len} tokens in {:.2} s; {steps} decode steps in {:.2} s: {:.1} tokens/s",
        prefill_time.as_secs_f64(),
        decode_time.as_secs_f64(),
        steps as f64 / decode_time.as_secs_f64()
    );
    println!(
        "KV cache: {} bytes compacted vs {} bytes dense ({:.3}x) for N = {}",
        cache.bytes(),
        cache.dense_bytes(),
        cache.bytes() as f64 / cache.dense_bytes() as f64,
        cache.geometry().n
    );
    println!(
        "last tokens: {:?}",
        &tokens[tokens.len().saturating_sub(12)..]
    );
    Ok(())
}
