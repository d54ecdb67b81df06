//! Compile-time benchmark: the full Llama-3-8B plan, cold (empty cache) and warm (all
//! cached), with the time of every NVRTC compile. Run with
//! `cargo bench -p moac --bench compile` (after scripts/setup-nvrtc.sh).

use moac::jit::cache::Cache;
use moac::{compile, CompileOptions, EmitKind};
use std::path::Path;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = root.join("examples/plans/gradientai--Llama-3-8B-Instruct-262k");
    let plan = match moac::plan::load(
        &dir.join("moa_alpha_beta.json"),
        Some(&dir.join("config.json")),
    ) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = moac::jit::nvrtc::load() {
        eprintln!("skipping the compile benchmark: {e}");
        return;
    }
    let tmp = tempfile::tempdir().expect("temp dir");
    let cache = Cache::new(tmp.path().join("cache"));
    let out = tmp.path().join("artifact");
    let opts = CompileOptions {
        cache: Some(cache),
        emit: EmitKind::All,
        ..CompileOptions::default()
    };
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!(
        "Llama-3-8B MoA plan, archs {:?}, {} cores",
        opts.archs, cores
    );
    let cold = compile(&plan, &opts, &out).expect("cold compile");
    let warm = compile(&plan, &opts, &out).expect("warm compile");
    // Kernels per translation unit, from the manifest: each unit is one NVRTC compile
    // per arch, shared by its kernels.
    let manifest: serde_json::Value = std::fs::read_to_string(out.join("manifest.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let per_unit = |unit: &str| {
        manifest["kernels"]
            .as_array()
            .map(|ks| ks.iter().filter(|k| k["unit"] == unit).count())
            .unwrap_or(0)
            .max(1)
    };
    println!(
        "unit                                          arch    kernels  cold ms  ms per kernel"
    );
    for t in &cold.timings {
        let n = per_unit(&t.unit);
        println!(
            "{:<45} {:<6} {:>8} {:>8.1} {:>14.1}",
            t.unit,
            t.arch,
            n,
            t.seconds * 1e3,
            t.seconds * 1e3 / n as f64
        );
    }
    let nvrtc_total: f64 = cold.timings.iter().map(|t| t.seconds).sum();
    println!(
        "cold: {:.2} s wall for {} kernels ({} NVRTC compiles, {:.2} s of NVRTC time over {} workers)",
        cold.elapsed.as_secs_f64(),
        cold.kernels,
        cold.nvrtc_compiles,
        nvrtc_total,
        cores
    );
    println!(
        "warm: {:.1} ms wall ({} NVRTC compiles, {} cache hits)",
        warm.elapsed.as_secs_f64() * 1e3,
        warm.nvrtc_compiles,
        warm.cache_hits
    );
    println!(
        "cold/warm = {:.0}x",
        cold.elapsed.as_secs_f64() / warm.elapsed.as_secs_f64()
    );
}
