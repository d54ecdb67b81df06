//! Benchmark of the cpu backend's attention, a MoA plan against dense (every head's
//! window = N) in the same run, side by side:
//! - prefill of 1k and 4k prompts, one SmolLM2-135M layer (9 query heads over 3 KV
//!   heads, head_dim 64) under a uniform 50% plan (alpha 0, beta 0.5) and dense;
//! - a decode step after a 4k prompt in the same layer;
//! - a decode step of one Llama-3-8B layer under its MoA plan, with the candle-core
//!   reference (the oracle the tests check against) on the MoA plan.
//!
//! Threads: rayon's pool (RAYON_NUM_THREADS, default one per core).
//!
//! cargo bench -p moac-runtime --bench cpu_decode

use candle_core::{DType, Device, Tensor};
use moac::geometry::CacheGeometry;
use moac::ir::PrefillMode;
use moac::plan::{ModelShape, Settings, ValidPlan};
use moac_runtime::backend::emu::EmuOptions;
use moac_runtime::backend::{Backend, LayerShape, Prompt};
use moac_runtime::reference::check::Rng;
use moac_runtime::BackendHandle;
use moac_runtime::{reference, Artifact};
use std::time::Instant;

fn plan_layer(root: &std::path::Path, layer: usize) -> ValidPlan {
    let dir = root.join("examples/plans/gradientai--Llama-3-8B-Instruct-262k");
    let full = match moac::plan::load(
        &dir.join("moa_alpha_beta.json"),
        Some(&dir.join("config.json")),
    ) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    let rules = full.layer(layer);
    let m = full.model();
    let model = ModelShape {
        num_layers: 1,
        ..*m
    };
    let alphas = vec![rules.iter().map(|r| r.alpha).collect::<Vec<_>>()];
    let betas = vec![rules.iter().map(|r| r.beta).collect::<Vec<_>>()];
    moac::plan::validate(
        "bench".as_ref(),
        model,
        Settings::default(),
        &alphas,
        &betas,
    )
    .expect("valid")
}

fn dense_like(p: &ValidPlan) -> ValidPlan {
    let hq = p.model().num_query_heads;
    moac::plan::validate(
        "dense".as_ref(),
        *p.model(),
        Settings::default(),
        &[vec![1e12; hq]],
        &[vec![0.0; hq]],
    )
    .expect("valid")
}

/// One layer of SmolLM2-135M's attention shape with every head under (alpha, beta).
fn smollm_layer(alpha: f64, beta: f64) -> ValidPlan {
    let model = ModelShape {
        num_layers: 1,
        num_query_heads: 9,
        num_kv_heads: 3,
        head_dim: 64,
    };
    moac::plan::validate(
        "smollm".as_ref(),
        model,
        Settings::default(),
        &[vec![alpha; 9]],
        &[vec![beta; 9]],
    )
    .expect("valid")
}

/// Median seconds of one prefill attention call (moa-block64, batch 1) of the cpu
/// backend.
fn time_prefill(plan: &ValidPlan, prompt: usize, new: usize, reps: usize) -> f64 {
    let geo = CacheGeometry::new(plan, prompt as u64, new as u64).expect("geometry");
    let shape = LayerShape::new(&geo, 0);
    let (hq, hkv, d) = (shape.num_query_heads, shape.num_kv_heads, shape.head_dim);
    let art = Artifact::from_plan(plan, moac::Dtype::F16, None).expect("artifact");
    let handle = BackendHandle::open(Backend::Cpu, EmuOptions::default()).expect("cpu");
    let layer = handle
        .open_layer(&art.layer_setup(&shape).expect("setup"), 1)
        .expect("layer");
    let mut rng = Rng::new(2);
    let q = rng.bits(prompt * hq * d, moac::Dtype::F16);
    let k = rng.bits(prompt * hkv * d, moac::Dtype::F16);
    let v = rng.bits(prompt * hkv * d, moac::Dtype::F16);
    let pr = Prompt {
        k: &k,
        v: &v,
        lens: &[prompt as i32],
        p: prompt,
    };
    let scale = 1.0 / (d as f32).sqrt();
    let mut times = Vec::new();
    for _ in 0..reps {
        let t0 = Instant::now();
        let o = layer
            .prefill(&q, &pr, PrefillMode::Block64, scale)
            .expect("prefill");
        times.push(t0.elapsed().as_secs_f64());
        std::hint::black_box(o);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    times[times.len() / 2]
}

/// Median seconds of one decode step (append + attention) of the cpu backend, and the
/// layer's KV bytes.
fn time_backend(plan: &ValidPlan, prompt: usize, new: usize, steps: usize) -> (f64, u64) {
    let geo = CacheGeometry::new(plan, prompt as u64, new as u64).expect("geometry");
    let shape = LayerShape::new(&geo, 0);
    let (hq, hkv, d) = (shape.num_query_heads, shape.num_kv_heads, shape.head_dim);
    let art = Artifact::from_plan(plan, moac::Dtype::F16, None).expect("artifact");
    let handle = BackendHandle::open(Backend::Cpu, EmuOptions::default()).expect("cpu");
    let mut layer = handle
        .open_layer(&art.layer_setup(&shape).expect("setup"), 1)
        .expect("layer");
    let mut rng = Rng::new(1);
    let k = rng.bits(prompt * hkv * d, moac::Dtype::F16);
    layer
        .fill(&Prompt {
            k: &k,
            v: &k,
            lens: &[prompt as i32],
            p: prompt,
        })
        .expect("fill");
    let q = rng.bits(hq * d, moac::Dtype::F16);
    let kn = rng.bits(hkv * d, moac::Dtype::F16);
    let scale = 1.0 / (d as f32).sqrt();
    let mut times = Vec::new();
    for s in 0..=steps {
        let t = (prompt + 1 + s) as i32;
        let t0 = Instant::now();
        layer.append(&kn, &kn, &[t]).expect("append");
        let o = layer.decode(&q, &[t], scale).expect("decode");
        if s > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
        std::hint::black_box(o);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    (times[times.len() / 2], geo.kv_bytes(moac::Dtype::F16, 1))
}

/// The same on the candle-core reference (it rebuilds the cache tensor every step).
fn time_reference(plan: &ValidPlan, prompt: usize, new: usize, steps: usize) -> f64 {
    let geo = CacheGeometry::new(plan, prompt as u64, new as u64).expect("geometry");
    let shape = LayerShape::new(&geo, 0);
    let (hq, hkv, d) = (shape.num_query_heads, shape.num_kv_heads, shape.head_dim);
    let dev = Device::Cpu;
    let k = Tensor::randn(0f32, 1.0, (1, prompt, hkv, d), &dev)
        .and_then(|t| t.to_dtype(DType::F16))
        .expect("k");
    let mut cache = reference::fill(&k, &k, &[prompt], &shape).expect("fill");
    let q = Tensor::randn(0f32, 1.0, (1, hq, d), &dev)
        .and_then(|t| t.to_dtype(DType::F16))
        .expect("q");
    let kn = Tensor::randn(0f32, 1.0, (1, hkv, d), &dev)
        .and_then(|t| t.to_dtype(DType::F16))
        .expect("kn");
    let scale = 1.0 / (d as f32).sqrt();
    let mut times = Vec::new();
    for s in 0..=steps {
        let t = prompt + 1 + s;
        let t0 = Instant::now();
        reference::append(&mut cache, &kn, &kn, &[t], &shape).expect("append");
        reference::decode(&q, &cache, &[t], &shape, scale).expect("decode");
        if s > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    times[times.len() / 2]
}

fn main() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let threads = rayon::current_num_threads();

    let (half, dense) = (smollm_layer(0.0, 0.5), smollm_layer(1e12, 0.0));
    let new = 64;
    println!(
        "cpu backend prefill attention, SmolLM2-135M layer shape (9/3 heads, d64), batch 1, f16, moa-block64, {new} new tokens, {threads} threads"
    );
    println!(
        "{:>7} {:>13} {:>13} {:>15} {:>15} {:>10}",
        "prompt", "50% plan ms", "dense ms", "50% plan tok/s", "dense tok/s", "time ratio"
    );
    for prompt in [1024, 4096] {
        let reps = if prompt <= 1024 { 9 } else { 3 };
        let th = time_prefill(&half, prompt, new, reps);
        let td = time_prefill(&dense, prompt, new, reps);
        println!(
            "{:>7} {:>13.1} {:>13.1} {:>15.0} {:>15.0} {:>10.3}",
            prompt,
            th * 1e3,
            td * 1e3,
            prompt as f64 / th,
            prompt as f64 / td,
            th / td
        );
    }
    let (th, bh) = time_backend(&half, 4096, new, 31);
    let (td, bd) = time_backend(&dense, 4096, new, 31);
    println!(
        "decode step after a 4096-token prompt, same layer: 50% plan {:.3} ms, dense {:.3} ms, time ratio {:.3}, byte ratio {:.3}",
        th * 1e3,
        td * 1e3,
        th / td,
        bh as f64 / bd as f64
    );
    println!();

    let (prompt, new, steps) = (4096, 1024, 15);
    println!(
        "cpu backend decode step (append + attention), Llama-3-8B layer shape, batch 1, f16, N = {}, {threads} threads",
        prompt + new
    );
    println!(
        "{:>6} {:>14} {:>14} {:>10} {:>10} {:>18}",
        "layer", "moac ms/step", "dense ms/step", "time ratio", "byte ratio", "reference ms/step"
    );
    for layer in [0, 13, 27] {
        let plan = plan_layer(&root, layer);
        let (tm, bm) = time_backend(&plan, prompt, new, steps);
        let (td, bd) = time_backend(&dense_like(&plan), prompt, new, steps);
        let tr = time_reference(&plan, prompt, new, 5);
        println!(
            "{:>6} {:>14.2} {:>14.2} {:>10.3} {:>10.3} {:>18.2}",
            layer,
            tm * 1e3,
            td * 1e3,
            tm / td,
            bm as f64 / bd as f64,
            tr * 1e3
        );
    }
}
