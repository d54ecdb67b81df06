//! Compile-time benchmark: the full Llama-3-8B plan, and plans shaped like Llama-3-70B
//! (80 layers x 64 query heads, 8 KV heads) and Llama-3.1-405B (126 x 128, 8 KV heads)
//! with rules drawn from MoA's grid; each cold (empty cache) and warm (all cached),
//! with the time of every NVRTC compile. Run with `cargo bench -p moac --bench compile`
//! (after scripts/setup-nvrtc.sh); `-- --plan 70b` runs one of them (8b, 70b, 405b).

use moac::jit::cache::Cache;
use moac::plan::synthetic::{synthetic, Rules};
use moac::plan::{ModelShape, ValidPlan};
use moac::{compile, CompileOptions, EmitKind};
use std::path::Path;

fn plans() -> Vec<(&'static str, &'static str, moac::Result<ValidPlan>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = root.join("examples/plans/gradientai--Llama-3-8B-Instruct-262k");
    let shape = |num_layers, num_query_heads| ModelShape {
        num_layers,
        num_query_heads,
        num_kv_heads: 8,
        head_dim: 128,
    };
    vec![
        (
            "8b",
            "Llama-3-8B MoA plan",
            moac::plan::load(
                &dir.join("moa_alpha_beta.json"),
                Some(&dir.join("config.json")),
            ),
        ),
        (
            "70b",
            "Llama-3-70B-shaped plan (80 x 64, G = 8)",
            synthetic("llama-3-70b", shape(80, 64), Rules::Grid, 70),
        ),
        (
            "405b",
            "Llama-3.1-405B-shaped plan (126 x 128, G = 16)",
            synthetic("llama-3.1-405b", shape(126, 128), Rules::Grid, 405),
        ),
    ]
}

fn main() {
    if let Err(e) = moac::jit::nvrtc::load() {
        eprintln!("skipping the compile benchmark: {e}");
        return;
    }
    let only = std::env::args().skip_while(|a| a != "--plan").nth(1);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut summary = Vec::new();
    for (key, title, plan) in plans() {
        if only.as_deref().is_some_and(|o| o != key) {
            continue;
        }
        let plan = match plan {
            Ok(p) => p,
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        };
        let tmp = tempfile::tempdir().expect("temp dir");
        let out = tmp.path().join("artifact");
        let opts = CompileOptions {
            cache: Some(Cache::new(tmp.path().join("cache"))),
            emit: EmitKind::All,
            ..CompileOptions::default()
        };
        println!("\n{title}, archs {:?}, {cores} cores", opts.archs);
        let cold = compile(&plan, &opts, &out).expect("cold compile");
        let warm = compile(&plan, &opts, &out).expect("warm compile");
        // Kernels per translation unit, from the manifest: each unit is one NVRTC
        // compile per arch, shared by its kernels.
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
            "{:<50} {:<6} {:>8} {:>8} {:>14}",
            "unit", "arch", "kernels", "cold ms", "ms per kernel"
        );
        for t in &cold.timings {
            let n = per_unit(&t.unit);
            println!(
                "{:<50} {:<6} {:>8} {:>8.1} {:>14.1}",
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
        summary.push((title, cold.kernels, cold.elapsed, warm.elapsed));
    }
    println!(
        "\n{:<50} {:>8} {:>10} {:>10}",
        "plan", "kernels", "cold s", "warm ms"
    );
    for (title, kernels, cold, warm) in summary {
        println!(
            "{:<50} {:>8} {:>10.2} {:>10.1}",
            title,
            kernels,
            cold.as_secs_f64(),
            warm.as_secs_f64() * 1e3
        );
    }
}
