//! Decode tokens/s of a real model on the CPU at several contexts and batch sizes:
//! moac with a uniform MoA plan, moac dense (the same kernels, every span = N), and an
//! independent dense anchor on the same GGUF in the same run (candle-transformers'
//! quantized Llama, which caps its context at 4096). The caches are filled before the
//! timed steps (moac: random K/V written by the cache-fill path; the anchor: a real
//! prefill), then `--steps` decode steps are timed, LM head included. Ratios are printed
//! side by side.

use candle_core::{Device, Tensor};
use clap::Parser;
use moac::plan::Settings;
use moac_model::attention::MoacAttention;
use moac_model::llama::uniform_plan;
use moac_model::weights::WeightMode;
use moac_model::Model;
use moac_runtime::{Artifact, Backend, PrefillMode, Runtime};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Parser)]
struct Args {
    /// The GGUF model.
    #[arg(long)]
    model: PathBuf,
    /// Tokens in the cache before the timed steps.
    #[arg(long, value_delimiter = ',', default_value = "1024,4096,8176")]
    contexts: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    batches: Vec<usize>,
    /// Timed decode steps per configuration.
    #[arg(long, default_value_t = 16)]
    steps: usize,
    /// moac's weights: native (the file's types, as the anchor runs them), q8, f32.
    #[arg(long, default_value = "native")]
    weights: WeightMode,
    /// The MoA plan's density: S = beta * N for every head.
    #[arg(long, default_value_t = 0.5)]
    beta: f64,
    /// Largest batch x context the anchor fills (its batch-1 prefill holds [H, T, T]
    /// scores; larger batches fill token by token).
    #[arg(long, default_value_t = 8192)]
    anchor_max_tokens: usize,
    /// Skip the anchor.
    #[arg(long)]
    no_anchor: bool,
}

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Uniform noise in [-1, 1) from a fixed LCG (values do not change decode time).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// moac: tokens/s of `steps` decode steps after `context` tokens, and the KV bytes.
fn moac_decode(
    model: &Model,
    rt: &Runtime,
    context: usize,
    batch: usize,
    steps: usize,
) -> Res<(f64, u64)> {
    let c = model.llama.config;
    let mut cache = rt.allocate_cache(batch, context, steps + 1)?;
    let dims = (batch, context, c.num_kv_heads, c.head_dim);
    let n = batch * context * c.num_kv_heads * c.head_dim;
    let k = Tensor::from_vec(noise(n, 1), dims, &Device::Cpu)?;
    let v = Tensor::from_vec(noise(n, 2), dims, &Device::Cpu)?;
    for l in 0..c.num_layers {
        rt.fill(&mut cache, l, &k, &v, None)?;
    }
    let mut attn = MoacAttention {
        runtime: rt,
        cache,
        mode: PrefillMode::Block64,
    };
    let tokens = vec![504u32; batch];
    let step = |attn: &mut MoacAttention, s: usize| -> Res<()> {
        let pos = vec![context + s; batch];
        let h = model.llama.decode(attn, &tokens, &pos)?;
        model.llama.logits(&h)?;
        Ok(())
    };
    step(&mut attn, 0)?; // warm-up
    let t = Instant::now();
    for s in 1..=steps {
        step(&mut attn, s)?;
    }
    let secs = t.elapsed().as_secs_f64();
    Ok(((batch * steps) as f64 / secs, attn.cache.bytes()))
}

/// candle-transformers' quantized Llama on the same file: its cache filled with
/// `context` tokens per row (batch 1: one prefill; larger batches token by token), then
/// `steps` timed decode steps.
fn anchor_decode(path: &Path, context: usize, batch: usize, steps: usize) -> Res<f64> {
    use candle_transformers::models::quantized_llama::ModelWeights;
    let mut file = std::fs::File::open(path)?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut file)?;
    let mut m = ModelWeights::from_gguf(content, &mut file, &Device::Cpu)?;
    let ids: Vec<u32> = (0..batch * context)
        .map(|i| (i * 7919 % 40000 + 100) as u32)
        .collect();
    if batch == 1 {
        m.forward(&Tensor::from_vec(ids, (1, context), &Device::Cpu)?, 0)?;
    } else {
        // Its batched prefill fails (the last position of a batch is not contiguous
        // for its LM head): fill token by token.
        for p in 0..context {
            let col: Vec<u32> = (0..batch).map(|b| ids[b * context + p]).collect();
            m.forward(&Tensor::from_vec(col, (batch, 1), &Device::Cpu)?, p)?;
        }
    }
    let next = Tensor::from_vec(vec![504u32; batch], (batch, 1), &Device::Cpu)?;
    m.forward(&next, context)?; // warm-up
    let t = Instant::now();
    for s in 1..=steps {
        m.forward(&next, context + s)?;
    }
    Ok((batch * steps) as f64 / t.elapsed().as_secs_f64())
}

fn main() -> Res<()> {
    let a = Args::parse();
    let model = Model::load(&a.model, a.weights)?;
    let shape = model.llama.config.shape();
    let moa = uniform_plan(
        Path::new(&format!("uniform{}", (a.beta * 100.0).round())),
        shape,
        0.0,
        a.beta,
        Settings::default(),
    )?;
    let dense = model.llama.dense_plan(Path::new("dense"))?;
    let rt_moa = Runtime::new(
        Artifact::from_plan(&moa, moac::Dtype::F16, None)?,
        Backend::Cpu,
    )?;
    let rt_dense = Runtime::new(
        Artifact::from_plan(&dense, moac::Dtype::F16, None)?,
        Backend::Cpu,
    )?;
    println!(
        "decode tokens/s on the cpu, {} ({} weights), f16 KV cache, {} timed steps; {} threads",
        a.model.display(),
        a.weights,
        a.steps,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "{:>7} {:>5} | {:>10} {:>10} {:>10} | {:>9} {:>9} {:>9} | {:>9} {:>9}",
        "context",
        "batch",
        "moac MoA",
        "moac dense",
        "anchor",
        "MoA/anc",
        "dense/anc",
        "MoA/dense",
        "KV MoA",
        "KV dense"
    );
    for &context in &a.contexts {
        let limit = model.llama.config.context_len;
        if context + a.steps + 1 > limit {
            println!(
                "{context:>7}: skipped: context + {} steps passes the model's {limit} positions",
                a.steps + 1
            );
            continue;
        }
        for &batch in &a.batches {
            let (moa_tps, moa_kv) = moac_decode(&model, &rt_moa, context, batch, a.steps)?;
            let (dense_tps, dense_kv) = moac_decode(&model, &rt_dense, context, batch, a.steps)?;
            let anchor = if a.no_anchor
                || context + a.steps + 1 > 4096
                || batch * context > a.anchor_max_tokens
            {
                None
            } else {
                match anchor_decode(&a.model, context, batch, a.steps) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        eprintln!("anchor at context {context}, batch {batch}: {e}");
                        None
                    }
                }
            };
            let ratio = |x: f64| anchor.map_or("-".to_string(), |an| format!("{:.2}x", x / an));
            println!(
                "{:>7} {:>5} | {:>10.1} {:>10.1} {:>10} | {:>9} {:>9} {:>8.2}x | {:>6.1} MB {:>6.1} MB",
                context,
                batch,
                moa_tps,
                dense_tps,
                anchor.map_or("-".to_string(), |x| format!("{x:.1}")),
                ratio(moa_tps),
                ratio(dense_tps),
                moa_tps / dense_tps,
                moa_kv as f64 / 1e6,
                dense_kv as f64 / 1e6
            );
        }
    }
    Ok(())
}
