//! `moac bench decode`: decode throughput of the whole model on the device engine, a
//! MoA plan and dense side by side in one run, over batches and context lengths:
//! tokens/s, milliseconds per step split into attention and the rest, KV bytes, the
//! attention's bandwidth against the device's measured copy bandwidth, and the largest
//! batch each fits into a memory budget. The caches are filled with random values
//! (decode speed does not depend on them); `--shape CONFIG` takes random weights for a
//! model config, so a Llama-3-8B needs no download.

use super::device::{open_gpu, open_source, resolve_shape};
use super::model::ModelArgs;
use super::parse;
use crate::{CliError, Result};
use clap::{Args, Subcommand};
use moac::geometry::{CacheGeometry, Dtype};
use moac::ValidPlan;
use moac_model::engine::{session_bytes, weight_bytes, DeviceEngine, DeviceSampling, Source};
use moac_model::llama::LlamaConfig;
use moac_model::weights::WeightMode;
use moac_runtime::gpu::Gpu;
use moac_runtime::{Backend, PrefillMode};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Decode throughput of the whole model (device engine), MoA against dense.
    Decode(DecodeArgs),
}

#[derive(Args)]
pub struct DecodeArgs {
    /// The model: a GGUF file or a Hugging Face folder.
    #[arg(long, conflicts_with = "shape")]
    pub model: Option<PathBuf>,
    /// Random weights for a model config (HF config.json or a GGUF file's header), or
    /// a known shape by name: llama-3-8b, llama-3.2-1b, vicuna-7b (each with its
    /// official MoA plan, used unless --plan or --dense says otherwise).
    #[arg(long)]
    pub shape: Option<PathBuf>,
    /// Seed of the random weights and cache contents.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The MoA plan (run beside dense).
    #[arg(long)]
    pub plan: Option<PathBuf>,
    /// Dense only (every span = N).
    #[arg(long, conflicts_with = "plan")]
    pub dense: bool,
    /// Batch sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 8, 32, 64])]
    pub batch: Vec<usize>,
    /// Context lengths (tokens held by every row when the timing starts).
    #[arg(long, value_delimiter = ',', default_values_t = [4096usize, 16384, 65536])]
    pub context: Vec<usize>,
    /// Where: cuda (the GPU) or emu (the same kernels on the CPU: checks the path, its
    /// times mean nothing).
    #[arg(long, value_parser = parse::<Backend>, default_value = "cuda")]
    pub backend: Backend,
    /// Element type of weights, activations and the cache.
    #[arg(long, value_parser = parse::<Dtype>, default_value = "f16")]
    pub dtype: Dtype,
    /// Timed decode steps per point (after --warmup untimed ones).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// The memory budget (GiB) the largest batch must fit in; default: the GPU's
    /// memory.
    #[arg(long)]
    pub memory_gib: Option<f64>,
    /// Only the memory figures (KV bytes, the largest batch that fits): no device, no
    /// timing; needs --memory-gib.
    #[arg(long)]
    pub fit_only: bool,
    /// Launch every kernel of a decode step one by one instead of replaying the step
    /// captured as a CUDA graph.
    #[arg(long)]
    pub no_graphs: bool,
    /// One JSON object per point (a line each), instead of the table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(c: BenchCommand) -> Result<()> {
    match c {
        BenchCommand::Decode(a) => decode(a),
    }
}

/// One measured (or refused) point.
#[derive(Debug, Clone, serde::Serialize)]
struct Point {
    variant: String,
    context: usize,
    batch: usize,
    /// The session (cache + step buffers) and the weights fit the budget.
    fits: bool,
    kv_bytes: u64,
    /// The largest batch at this context whose session fits the budget.
    max_batch: u64,
    tokens_per_s: Option<f64>,
    ms_per_step: Option<f64>,
    ms_attention: Option<f64>,
    ms_rest: Option<f64>,
    /// Bytes the decode attention reads per step.
    attention_bytes: Option<u64>,
    attention_gb_per_s: Option<f64>,
    /// The timed steps replayed a CUDA graph.
    graphed: Option<bool>,
}

fn model_args(a: &DecodeArgs) -> ModelArgs {
    ModelArgs {
        model: a.model.clone(),
        backend: a.backend,
        dtype: a.dtype,
        prefill_mode: PrefillMode::Block64,
        weights: WeightMode::Auto,
    }
}

/// The plans to compare: (name, plan), MoA first. A named shape brings its MoA plan.
fn variants(a: &DecodeArgs, source: &Source) -> Result<Vec<(String, ValidPlan)>> {
    let dense = ("dense".to_string(), source.dense_plan()?);
    let named = match (&a.shape, &a.plan, a.dense) {
        (Some(s), None, false) => resolve_shape(s)?.1,
        _ => None,
    };
    match (a.plan.as_ref().or(named.as_ref()), a.dense) {
        (Some(p), _) => Ok(vec![("moa".to_string(), source.plan(p)?), dense]),
        (None, true) => Ok(vec![dense]),
        (None, false) => Err(CliError::Usage(
            "say what to run: --plan P (MoA beside dense) or --dense".into(),
        )),
    }
}

/// Session bytes of one row for decoding at `context` (no prefill workspace: the bench
/// fills caches directly, and a server prefills row by row).
fn row_bytes(
    config: &LlamaConfig,
    ff: usize,
    plan: &ValidPlan,
    dtype: Dtype,
    context: usize,
    max_new: usize,
    batch: usize,
) -> Result<(u64, u64)> {
    let geo = CacheGeometry::new(plan, context as u64, max_new as u64)?;
    Ok((
        session_bytes(config, ff, &geo, dtype, batch, 0),
        geo.kv_bytes(dtype, batch as u64),
    ))
}

/// The device's copy bandwidth (GB/s, bytes read + written), from device-to-device
/// copies of a large buffer.
fn copy_bandwidth(gpu: &Gpu, bytes: usize) -> Result<f64> {
    let src = gpu.alloc(bytes)?;
    let mut dst = gpu.alloc(bytes)?;
    gpu.copy(&mut dst, 0, &src, 0, bytes)?;
    gpu.synchronize()?;
    let reps = 10;
    let ms = gpu.time_ms(|| -> moac_runtime::Result<()> {
        for _ in 0..reps {
            gpu.copy(&mut dst, 0, &src, 0, bytes)?;
        }
        Ok(())
    })?;
    Ok(2.0 * bytes as f64 * reps as f64 / (ms * 1e-3) / 1e9)
}

fn decode(a: DecodeArgs) -> Result<()> {
    if a.batch.contains(&0) || a.context.contains(&0) || a.steps == 0 {
        return Err(CliError::Usage(
            "--batch, --context and --steps take positive numbers".into(),
        ));
    }
    if a.fit_only && a.memory_gib.is_none() {
        return Err(CliError::Usage(
            "--fit-only needs the budget: --memory-gib G".into(),
        ));
    }
    if let Some(g) = a.memory_gib.filter(|g| !(g.is_finite() && *g > 0.0)) {
        return Err(CliError::Usage(format!(
            "--memory-gib {g}: must be positive"
        )));
    }
    let margs = model_args(&a);
    let source = if a.fit_only {
        // The memory figures need only the shape.
        match (&a.model, &a.shape) {
            (Some(m), None) | (None, Some(m)) => {
                let (m, _) = resolve_shape(m)?;
                Source::shape(m, a.seed)?
            }
            _ => open_source(&margs, a.shape.as_deref(), a.seed)?,
        }
    } else {
        open_source(&margs, a.shape.as_deref(), a.seed)?
    };
    let config = source.config();
    let ff = source.ff()?;
    let vars = variants(&a, &source)?;
    if let Some(&c) = a
        .context
        .iter()
        .find(|&&c| c + a.warmup + a.steps + 1 > config.context_len)
    {
        return Err(CliError::Usage(format!(
            "--context {c} plus the {} steps is more than the {} tokens the model takes",
            a.warmup + a.steps + 1,
            config.context_len
        )));
    }
    let max_new = a.warmup + a.steps + 1;
    let gpu = if a.fit_only {
        None
    } else {
        Some(open_gpu(&margs)?)
    };
    let budget = match (a.memory_gib, &gpu) {
        (Some(g), _) => (g * (1u64 << 30) as f64) as u64,
        (None, Some(gpu)) => match gpu.memory()? {
            Some((_, total)) => total,
            None => {
                return Err(CliError::Usage(
                    "emu has no device memory to size batches by: give --memory-gib G".into(),
                ))
            }
        },
        (None, None) => 0,
    };
    let weights = weight_bytes(&config, ff, true);
    let copy_gbps = match &gpu {
        Some(g) => Some(copy_bandwidth(
            g,
            if g.backend() == Backend::Cuda {
                1 << 30
            } else {
                64 << 20
            },
        )?),
        None => None,
    };
    let mut points = Vec::new();
    for (name, plan) in &vars {
        let engine = match &gpu {
            Some(g) => {
                let mut e = source.engine(g, plan, margs.dtype, margs.prefill_mode)?;
                e.set_graphs(!a.no_graphs);
                Some(e)
            }
            None => None,
        };
        for &context in &a.context {
            let (one_row, _) = row_bytes(&config, ff, plan, a.dtype, context, max_new, 1)?;
            let max_batch = budget.saturating_sub(weights) / one_row.max(1);
            for &batch in &a.batch {
                let (bytes, kv) = row_bytes(&config, ff, plan, a.dtype, context, max_new, batch)?;
                let fits = weights + bytes <= budget;
                let mut p = Point {
                    variant: name.clone(),
                    context,
                    batch,
                    fits,
                    kv_bytes: kv,
                    max_batch,
                    tokens_per_s: None,
                    ms_per_step: None,
                    ms_attention: None,
                    ms_rest: None,
                    attention_bytes: None,
                    attention_gb_per_s: None,
                    graphed: None,
                };
                if let (Some(eng), true) = (&engine, fits) {
                    // The budget may be the GPU's whole memory: what is free now decides.
                    let free = eng.gpu().memory()?.map(|(f, _)| f);
                    if free.is_some_and(|f| bytes + (512 << 20) > f) {
                        p.fits = false;
                    } else {
                        measure(eng, &a, &mut p, max_new)?;
                    }
                }
                if a.json {
                    let mut v = serde_json::to_value(&p).unwrap_or_default();
                    v["copy_gb_per_s"] = serde_json::json!(copy_gbps);
                    v["dtype"] = serde_json::json!(a.dtype.to_string());
                    println!("{v}");
                }
                points.push(p);
            }
        }
    }
    if !a.json {
        table(
            &a,
            &points,
            &vars,
            copy_gbps,
            budget,
            weights,
            gpu.as_deref(),
        );
    }
    Ok(())
}

fn measure(eng: &DeviceEngine, a: &DecodeArgs, p: &mut Point, max_new: usize) -> Result<()> {
    let gpu = eng.gpu();
    let mut s = eng.synthetic(p.batch, p.context, max_new, a.seed)?;
    for _ in 0..a.warmup {
        eng.sample(&mut s, DeviceSampling::Greedy)?;
        eng.step(&mut s, None)?;
    }
    let total = gpu.time_ms(|| -> moac_model::Result<()> {
        for _ in 0..a.steps {
            eng.sample(&mut s, DeviceSampling::Greedy)?;
            eng.step(&mut s, None)?;
        }
        Ok(())
    })?;
    let attn = gpu.time_ms(|| -> moac_model::Result<()> {
        for _ in 0..a.steps {
            eng.attention_pass(&mut s)?;
        }
        Ok(())
    })?;
    let (step, attn) = (total / a.steps as f64, attn / a.steps as f64);
    let bytes = s.attention_bytes(eng.dtype());
    p.ms_per_step = Some(step);
    p.ms_attention = Some(attn);
    p.ms_rest = Some((step - attn).max(0.0));
    p.tokens_per_s = Some(p.batch as f64 * 1e3 / step);
    p.attention_bytes = Some(bytes);
    p.attention_gb_per_s = Some(bytes as f64 / (attn * 1e-3) / 1e9);
    p.graphed = Some(s.graphed());
    if let Some(note) = s.graph_note() {
        eprintln!("{note}");
    }
    Ok(())
}

fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
}

fn table(
    a: &DecodeArgs,
    points: &[Point],
    vars: &[(String, ValidPlan)],
    copy_gbps: Option<f64>,
    budget: u64,
    weights: u64,
    gpu: Option<&Gpu>,
) {
    match gpu {
        Some(g) => println!(
            "device: {}; dtype {}; decode step {}; copy bandwidth {:.0} GB/s; weights {}; budget {}",
            g.describe(),
            a.dtype,
            match points.iter().find_map(|p| p.graphed) {
                Some(true) => "a CUDA graph",
                _ => "launch by launch",
            },
            copy_gbps.unwrap_or(0.0),
            gib(weights),
            gib(budget)
        ),
        None => println!(
            "memory only (no device); dtype {}; weights {}; budget {}",
            a.dtype,
            gib(weights),
            gib(budget)
        ),
    }
    let names: Vec<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
    let find = |v: &str, c: usize, b: usize| {
        points
            .iter()
            .find(|p| p.variant == v && p.context == c && p.batch == b)
    };
    let f = |x: Option<f64>, d: usize| x.map_or("-".to_string(), |v| format!("{v:.d$}"));
    let mut header = format!("{:>8} {:>6}", "context", "batch");
    for n in &names {
        header.push_str(&format!(
            " | {n:>6} tok/s {:>8} {:>8} {:>10} {:>7}",
            "ms/step", "ms attn", "KV", "attn %"
        ));
    }
    if names.len() == 2 {
        header.push_str(" | speedup  KV ratio");
    }
    println!("{header}");
    for &c in &a.context {
        for &b in &a.batch {
            let mut line = format!("{c:>8} {b:>6}");
            for n in &names {
                let Some(p) = find(n, c, b) else { continue };
                if !p.fits {
                    line.push_str(&format!(
                        " | {:>12} {:>8} {:>8} {:>10} {:>7}",
                        "no fit",
                        "-",
                        "-",
                        gib(p.kv_bytes),
                        "-"
                    ));
                    continue;
                }
                let pct = match (p.attention_gb_per_s, copy_gbps) {
                    (Some(x), Some(cp)) if cp > 0.0 => Some(100.0 * x / cp),
                    _ => None,
                };
                line.push_str(&format!(
                    " | {:>12} {:>8} {:>8} {:>10} {:>7}",
                    f(p.tokens_per_s, 1),
                    f(p.ms_per_step, 3),
                    f(p.ms_attention, 3),
                    gib(p.kv_bytes),
                    f(pct, 0)
                ));
            }
            let pair = match names[..] {
                [m, d] => find(m, c, b).zip(find(d, c, b)),
                _ => None,
            };
            if let Some((m, d)) = pair {
                let speed = match (m.tokens_per_s, d.tokens_per_s) {
                    (Some(x), Some(y)) if y > 0.0 => format!("{:>7.2}x", x / y),
                    _ => format!("{:>8}", "-"),
                };
                line.push_str(&format!(
                    " | {speed} {:>8.2}x",
                    d.kv_bytes as f64 / m.kv_bytes.max(1) as f64
                ));
            }
            println!("{line}");
        }
    }
    println!("largest batch that fits the budget (cache + step buffers + weights):");
    for &c in &a.context {
        let mut line = format!("{c:>8}");
        let mut mb = Vec::new();
        for n in &names {
            if let Some(p) = points.iter().find(|p| p.variant == *n && p.context == c) {
                line.push_str(&format!("  {n} {}", p.max_batch));
                mb.push(p.max_batch);
            }
        }
        if let [m, d] = mb[..] {
            line.push_str(&format!("  ({:.2}x dense)", m as f64 / d.max(1) as f64));
        }
        println!("{line}");
    }
    if names.len() == 2 {
        for t in targets(points, copy_gbps) {
            println!("{t}");
        }
    }
}

/// The three targets, judged on the points measured: attention at batch >= 8
/// and context >= 16k reaches 80% of the copy bandwidth; MoA's tokens/s over dense is at
/// least 0.8x the KV-byte ratio where attention is most of dense's step; the largest
/// batch at 16k is at least 1.4x dense's.
fn targets(points: &[Point], copy_gbps: Option<f64>) -> Vec<String> {
    let mut out = vec!["targets:".to_string()];
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    let big: Vec<&Point> = points
        .iter()
        .filter(|p| p.batch >= 8 && p.context >= 16384 && p.attention_gb_per_s.is_some())
        .collect();
    match (copy_gbps, big.is_empty()) {
        (Some(cp), false) if cp > 0.0 => {
            let worst = big
                .iter()
                .filter_map(|p| p.attention_gb_per_s)
                .fold(f64::INFINITY, f64::min)
                / cp;
            out.push(format!(
                "  attention >= 80% of copy bandwidth (batch >= 8, context >= 16k): lowest {:.0}%: {}",
                100.0 * worst,
                verdict(worst >= 0.8)
            ));
        }
        _ => out.push(
            "  attention bandwidth: no measured point at batch >= 8 and context >= 16k".into(),
        ),
    }
    let mut ratios = Vec::new();
    for m in points.iter().filter(|p| p.variant == "moa") {
        let Some(d) = points
            .iter()
            .find(|d| d.variant == "dense" && d.context == m.context && d.batch == m.batch)
        else {
            continue;
        };
        let (Some(tm), Some(td), Some(ad), Some(sd)) = (
            m.tokens_per_s,
            d.tokens_per_s,
            d.ms_attention,
            d.ms_per_step,
        ) else {
            continue;
        };
        if ad > 0.5 * sd {
            let kv = d.kv_bytes as f64 / m.kv_bytes.max(1) as f64;
            ratios.push((tm / td) / kv);
        }
    }
    if ratios.is_empty() {
        out.push("  tokens/s vs KV ratio: no point where attention is most of dense's step".into());
    } else {
        let worst = ratios.iter().copied().fold(f64::INFINITY, f64::min);
        out.push(format!(
            "  MoA/dense tokens/s >= 0.8 x KV ratio where attention dominates ({} points): lowest {worst:.2}x: {}",
            ratios.len(),
            verdict(worst >= 0.8)
        ));
    }
    let at16: Vec<(u64, u64)> = points
        .iter()
        .filter(|p| p.variant == "moa" && p.context == 16384)
        .filter_map(|m| {
            points
                .iter()
                .find(|d| d.variant == "dense" && d.context == 16384)
                .map(|d| (m.max_batch, d.max_batch))
        })
        .collect();
    match at16.first() {
        Some(&(m, d)) => {
            let r = m as f64 / d.max(1) as f64;
            out.push(format!(
                "  largest batch at 16k >= 1.4x dense's: {r:.2}x: {}",
                verdict(r >= 1.4)
            ));
        }
        None => out.push("  largest batch at 16k: context 16384 not run".into()),
    }
    out
}
