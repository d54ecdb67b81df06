//! GPU benchmark of moac's decode attention against the same kernels on a dense plan.
//!
//! For every example plan (`<plans>/*/moa_alpha_beta.json` with `config.json`), at
//! prompt 4096 (and 16384 for Llama-3-8B), batch 1 and a larger batch: one decode step
//! of every layer (split-KV decode + merge, all layers back to back, L2 flushed before
//! each repeat) timed with CUDA events by moac's one timing harness
//! (`CudaDevice::time_us`, which `moac tune` uses too), median of repeats after a
//! warm-up. Reported: time per step, the bytes the kernels must move (the one model,
//! `moac_runtime::backend::bytes_moved`: K and V of the visible slots, q, the split
//! partials written and read back, the output), achieved GB/s, and the same for a DENSE
//! plan (every head's alpha huge, so C = N) run in the same process, with the
//! moac/dense time ratio next to the byte ratio; plus the KV-cache bytes of both.
//!
//! Usage: moac-gpu-bench [--plans DIR] [--artifacts DIR] [--dtype f16|bf16]
//!                       [--batch B] [--repeats R] [--max-new-tokens M]
//! `--artifacts DIR`: use `DIR/<plan folder>` (written by `moac compile`) for the moac
//! plan's binaries when it exists (its CUBINs), else compile with NVRTC.
//! Where there is no GPU it prints one line and exits 0.

use cudarc::driver::CudaSlice;
use moac::geometry::{CacheGeometry, Dtype};
use moac::ir::KernelKind;
use moac::plan::ValidPlan;
use moac_cli::error::{CliError as Error, Result};
use moac_runtime::backend::cuda::CudaDevice;
use moac_runtime::backend::{bytes_moved, LayerShape};
use moac_runtime::gpu::attention::{DecodeScratch, DeviceKv, LayerAttention};
use moac_runtime::gpu::{Gpu, GpuBuf};
use moac_runtime::Artifact;
use std::path::PathBuf;
use std::sync::Arc;

struct Opts {
    plans: PathBuf,
    artifacts: Option<PathBuf>,
    dtype: Dtype,
    batch: usize,
    repeats: usize,
    max_new_tokens: u64,
}

fn usage(msg: &str) -> Error {
    Error::Usage(format!(
        "{msg}; usage: moac-gpu-bench [--plans DIR] [--artifacts DIR] [--dtype f16|bf16] [--batch B] [--repeats R] [--max-new-tokens M]"
    ))
}

fn parse_args() -> Result<Opts> {
    let mut o = Opts {
        plans: PathBuf::from("examples/plans"),
        artifacts: None,
        dtype: Dtype::F16,
        batch: 16,
        repeats: 15,
        max_new_tokens: 256,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || {
            args.next()
                .ok_or_else(|| usage(&format!("{a} needs a value")))
        };
        let num = |v: String| {
            v.parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| usage(&format!("{a}: {v:?} is not a positive number")))
        };
        match a.as_str() {
            "--plans" => o.plans = PathBuf::from(val()?),
            "--artifacts" => o.artifacts = Some(PathBuf::from(val()?)),
            "--dtype" => {
                o.dtype = match val()?.as_str() {
                    "f16" => Dtype::F16,
                    "bf16" => Dtype::Bf16,
                    other => return Err(usage(&format!("unknown dtype {other:?}"))),
                }
            }
            "--batch" => o.batch = num(val()?)?,
            "--repeats" => o.repeats = num(val()?)?,
            "--max-new-tokens" => o.max_new_tokens = num(val()?)? as u64,
            "-h" | "--help" => return Err(usage("help")),
            other => return Err(usage(&format!("unknown argument {other:?}"))),
        }
    }
    Ok(o)
}

/// The same model with every head dense: alpha huge, beta 0, so every C = N.
fn dense_plan(plan: &ValidPlan) -> Result<ValidPlan> {
    let alphas: Vec<Vec<f64>> = plan.layers().map(|l| vec![1e15; l.len()]).collect();
    let betas: Vec<Vec<f64>> = plan.layers().map(|l| vec![0.0; l.len()]).collect();
    Ok(moac::plan::validate(
        plan.source(),
        *plan.model(),
        *plan.settings(),
        &alphas,
        &betas,
    )?)
}

/// One plan's layers at one (prompt, batch), ready to launch.
struct Setup {
    gpu: Arc<Gpu>,
    batch: usize,
    /// Each layer's kernels, cache and per-row lengths (i32 [batch]).
    layers: Vec<(LayerAttention, DeviceKv, GpuBuf)>,
    q: Vec<GpuBuf>,
    scratch: Vec<DecodeScratch>,
    /// Each layer's merged output [batch, Hq, D].
    out: Vec<GpuBuf>,
    /// Bytes one decode step of all layers must move.
    bytes: u64,
    kv_bytes: u64,
    binary: String,
}

fn setup(gpu: &Arc<Gpu>, art: &Artifact, prompt: u64, batch: usize, o: &Opts) -> Result<Setup> {
    let geo = CacheGeometry::new(art.plan(), prompt, o.max_new_tokens)?;
    let t = prompt as usize + 1;
    let es = o.dtype.size_bytes() as usize;
    let mut s = Setup {
        gpu: gpu.clone(),
        batch,
        layers: Vec::new(),
        q: Vec::new(),
        scratch: Vec::new(),
        out: Vec::new(),
        bytes: 0,
        kv_bytes: geo.kv_bytes(o.dtype, batch as u64),
        binary: String::new(),
    };
    for l in art.layers() {
        let shape = LayerShape::new(&geo, l);
        let layer = LayerAttention::new(gpu, &art.layer_setup(&shape)?)?;
        if s.binary.is_empty() {
            s.binary = layer.binary();
        }
        // Zeros: the timing does not depend on the values, and every slot is valid.
        let cache = layer.new_cache(batch)?;
        let mut lens = gpu.alloc_of::<i32>(batch)?;
        gpu.upload(&mut lens, 0, &vec![t as i32; batch])?;
        let scratch = layer.scratch(batch)?;
        let (hq, d) = (shape.num_query_heads, shape.head_dim);
        s.bytes += bytes_moved(&shape, KernelKind::Decode, batch, t, layer.nsplit(), es);
        s.q.push(gpu.alloc_of::<u16>(batch * hq * d)?);
        s.out.push(gpu.alloc_of::<u16>(batch * hq * d)?);
        s.scratch.push(scratch);
        s.layers.push((layer, cache, lens));
    }
    Ok(s)
}

/// Queues one decode step of every layer (`poison`: NaN-fill the outputs first).
fn step(s: &mut Setup, poison: bool) -> Result<()> {
    for (((layer, cache, lens), q), (scratch, out)) in s
        .layers
        .iter()
        .zip(&s.q)
        .zip(s.scratch.iter_mut().zip(s.out.iter_mut()))
    {
        if poison {
            scratch.poison(&s.gpu)?;
            s.gpu.fill_u16(out, layer.dtype().nan_bits())?;
        }
        let scale = 1.0 / (layer.shape().head_dim as f32).sqrt();
        layer.decode(q, cache, lens, s.batch, scratch, out, scale)?;
    }
    Ok(())
}

/// Median milliseconds of one decode step over all layers, L2 flushed before each.
fn time_step(
    dev: &Arc<CudaDevice>,
    s: &mut Setup,
    flush: &mut CudaSlice<u8>,
    repeats: usize,
) -> Result<f64> {
    // One checked step first: every output must be written.
    step(s, true)?;
    s.gpu.synchronize()?;
    for ((layer, _, _), out) in s.layers.iter().zip(&s.out) {
        let out = s.gpu.download::<u16>(out, 0, out.bytes() / 2)?;
        if out.iter().any(|&b| layer.dtype().from_bits(b).is_nan()) {
            return Err(Error::Failed(format!(
                "layer {}: the decode output has unwritten (NaN) elements",
                layer.shape().layer
            )));
        }
    }
    let stream = dev.stream().clone();
    // Flush L2 so every step reads its cache from HBM, as in a real model.
    let mut times = dev.time_us(
        3,
        repeats,
        |_| {
            stream
                .memset_zeros(flush)
                .map_err(moac_runtime::Error::driver("L2 flush"))
                .map_err(Error::from)
        },
        |_| step(s, false),
    )?;
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[times.len() / 2] / 1e3)
}

fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
}

fn load_artifact(o: &Opts, folder: &str, plan: &ValidPlan) -> Result<Artifact> {
    if let Some(root) = &o.artifacts {
        let dir = root.join(folder);
        if dir.join("manifest.json").is_file() {
            let art = Artifact::load(&dir)?;
            let same_rules = art.plan().model() == plan.model()
                && art.plan().settings() == plan.settings()
                && art.plan().layers().eq(plan.layers());
            if art.dtype() == o.dtype && art.fixed().is_none() && same_rules {
                return Ok(art);
            }
            eprintln!(
                "note: {} does not match (dtype, N or plan); compiling with NVRTC",
                dir.display()
            );
        }
    }
    Ok(Artifact::from_plan(plan, o.dtype, None)?)
}

struct Row {
    model: String,
    prompt: u64,
    batch: usize,
    moac_ms: f64,
    dense_ms: f64,
    moac_bytes: u64,
    dense_bytes: u64,
}

fn real_main() -> Result<()> {
    let o = parse_args()?;
    if let Err(e) = moac_runtime::cuda_available() {
        println!("moac-gpu-bench: skipped, no GPU here ({e})");
        return Ok(());
    }
    let dev = CudaDevice::open()?;
    let gpu = Gpu::kernels_only(&dev);
    println!(
        "moac-gpu-bench on {} ({}), {}, M = {}, median of {} repeats, L2 flushed per repeat",
        dev.name(),
        dev.arch(),
        o.dtype,
        o.max_new_tokens,
        o.repeats
    );
    let mut folders: Vec<PathBuf> = std::fs::read_dir(&o.plans)
        .map_err(|e| Error::Usage(format!("{}: {e}", o.plans.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("moa_alpha_beta.json").is_file() && p.join("config.json").is_file())
        .collect();
    folders.sort();
    if folders.is_empty() {
        return Err(Error::Usage(format!(
            "{}: no */moa_alpha_beta.json with config.json",
            o.plans.display()
        )));
    }
    let mut flush = dev.zeros::<u8>(256 << 20)?;
    let mut rows = Vec::new();
    for folder in &folders {
        let name = folder
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let plan = moac::plan::load(
            &folder.join("moa_alpha_beta.json"),
            Some(&folder.join("config.json")),
        )?;
        let dense = dense_plan(&plan)?;
        let moac_art = load_artifact(&o, &name, &plan)?;
        let dense_art = Artifact::from_plan(&dense, o.dtype, None)?;
        let mut prompts = vec![4096u64];
        if name.contains("Llama-3-8B") {
            prompts.push(16384);
        }
        for &prompt in &prompts {
            for batch in [1, o.batch] {
                let mut m = setup(&gpu, &moac_art, prompt, batch, &o)?;
                let moac_ms = time_step(&dev, &mut m, &mut flush, o.repeats)?;
                let (mb, mkv, mbin) = (m.bytes, m.kv_bytes, m.binary.clone());
                drop(m);
                let mut d = setup(&gpu, &dense_art, prompt, batch, &o)?;
                let dense_ms = time_step(&dev, &mut d, &mut flush, o.repeats)?;
                let (db, dkv) = (d.bytes, d.kv_bytes);
                drop(d);
                let gbs = |b: u64, ms: f64| b as f64 / (ms * 1e-3) / 1e9;
                println!(
                    "{name}  P={prompt} B={batch}  [{mbin}]\n  moac : {moac_ms:8.3} ms/step  {:>10} moved  {:7.0} GB/s  KV cache {}\n  dense: {dense_ms:8.3} ms/step  {:>10} moved  {:7.0} GB/s  KV cache {}\n  moac/dense: time {:.3}  bytes {:.3}",
                    gib(mb),
                    gbs(mb, moac_ms),
                    gib(mkv),
                    gib(db),
                    gbs(db, dense_ms),
                    gib(dkv),
                    moac_ms / dense_ms,
                    mb as f64 / db as f64,
                );
                rows.push(Row {
                    model: name.clone(),
                    prompt,
                    batch,
                    moac_ms,
                    dense_ms,
                    moac_bytes: mb,
                    dense_bytes: db,
                });
            }
        }
    }
    println!();
    println!(
        "{:<40} {:>6} {:>4} {:>10} {:>10} {:>8} {:>8} {:>9}",
        "model", "P", "B", "moac ms", "dense ms", "t ratio", "B ratio", "moac GB/s"
    );
    for r in &rows {
        println!(
            "{:<40} {:>6} {:>4} {:>10.3} {:>10.3} {:>8.3} {:>8.3} {:>9.0}",
            r.model,
            r.prompt,
            r.batch,
            r.moac_ms,
            r.dense_ms,
            r.moac_ms / r.dense_ms,
            r.moac_bytes as f64 / r.dense_bytes as f64,
            r.moac_bytes as f64 / (r.moac_ms * 1e-3) / 1e9
        );
    }
    Ok(())
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("moac-gpu-bench: {e}");
        std::process::exit(1);
    }
}
