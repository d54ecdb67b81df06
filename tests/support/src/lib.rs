//! moac-test-support: what the workspace's integration tests share (dev-only). The one
//! seeded generator and the one tolerance table (re-exported from the runtime, which
//! `moac verify` uses too: fresh seed per run, printed; MOAC_TEST_SEED reproduces a
//! run), plans of any shape, the example plans, a float64 brute force of MoA attention
//! that works on positions (dense K/V of the whole sequence) with its own statement of
//! the visibility rules, and a runner for the `moac` binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use moac::plan::{ModelShape, Settings, ValidPlan};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub use moac_runtime::reference::check::{tolerance, ErrorStats, Rng};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A fixture file under `tests/fixtures`.
pub fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures").join(name)
}

/// The example plans: (plan file, its config).
pub fn example_plans() -> Vec<(PathBuf, PathBuf)> {
    let dir = root().join("examples/plans");
    let mut out = Vec::new();
    let mut models: Vec<_> = std::fs::read_dir(&dir)
        .expect("examples/plans")
        .flatten()
        .map(|e| e.path())
        .collect();
    models.sort();
    for m in models.into_iter().filter(|p| p.is_dir()) {
        let mut files: Vec<_> = std::fs::read_dir(&m)
            .expect("model dir")
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        for f in files {
            if f.to_string_lossy().ends_with("alpha_beta.json") {
                out.push((f, m.join("config.json")));
            }
        }
    }
    out
}

/// Runs a binary (`moac!` passes the `moac` binary of the calling test crate).
pub fn run_bin(exe: &str, args: &[&str]) -> Output {
    Command::new(exe)
        .args(args)
        .output()
        .expect("run the binary")
}

/// Runs the `moac` binary with arguments (in the CLI crate's tests).
#[macro_export]
macro_rules! moac {
    ($args:expr) => {
        $crate::run_bin(env!("CARGO_BIN_EXE_moac"), $args)
    };
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The stdout of a command that must have succeeded (else its stderr in the panic).
pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstderr: {}",
        out.status.code(),
        stderr(out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Checks a command failed cleanly: exit 1, no panic, every needle in its stderr.
pub fn fails(out: &Output, needles: &[&str]) {
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(out));
    let e = stderr(out);
    assert!(!e.contains("panicked"), "{e}");
    for n in needles {
        assert!(e.contains(n), "stderr lacks {n:?}: {e}");
    }
}

/// NVRTC is required when MOAC_REQUIRE_NVRTC is set (scripts/test.sh sets it, so CI
/// cannot skip silently); elsewhere tests that need it are skipped with the reason.
pub fn have_nvrtc() -> bool {
    match moac::jit::nvrtc::load() {
        Ok(_) => true,
        Err(e) if std::env::var_os("MOAC_REQUIRE_NVRTC").is_some() => {
            panic!("NVRTC required: {e}")
        }
        Err(e) => {
            eprintln!("skipped: {e}");
            false
        }
    }
}

/// A plan of the given shape whose heads cycle through several rules (different rules
/// inside every KV group).
pub fn shaped_plan(hq: usize, hkv: usize, head_dim: usize, layers: usize) -> ValidPlan {
    let rules = [
        (0.0, 0.5),
        (1024.0, 0.125),
        (-1024.0, 0.25),
        (8192.0, 0.0),
        (0.0, 1.0),
    ];
    let alphas: Vec<Vec<f64>> = (0..layers)
        .map(|l| (0..hq).map(|h| rules[(h + l) % rules.len()].0).collect())
        .collect();
    let betas: Vec<Vec<f64>> = (0..layers)
        .map(|l| (0..hq).map(|h| rules[(h + l) % rules.len()].1).collect())
        .collect();
    let model = ModelShape {
        num_layers: layers,
        num_query_heads: hq,
        num_kv_heads: hkv,
        head_dim,
    };
    moac::plan::validate(
        Path::new("shaped"),
        model,
        Settings::default(),
        &alphas,
        &betas,
    )
    .unwrap()
}

/// A plan of one layer with the given rules per query head.
pub fn plan(hq: usize, hkv: usize, d: usize, rules: &[(f64, f64)]) -> ValidPlan {
    assert_eq!(rules.len(), hq);
    let model = ModelShape {
        num_layers: 1,
        num_query_heads: hq,
        num_kv_heads: hkv,
        head_dim: d,
    };
    let alphas = vec![rules.iter().map(|r| r.0).collect::<Vec<_>>()];
    let betas = vec![rules.iter().map(|r| r.1).collect::<Vec<_>>()];
    moac::plan::validate(
        Path::new("test-plan"),
        model,
        Settings::default(),
        &alphas,
        &betas,
    )
    .unwrap()
}

/// Decode visibility, restated: p < t and (p in the sink or within `local` of the end).
pub fn sees_decode(t: usize, sink: usize, local: usize, p: usize) -> bool {
    p < t && (p < sink || t - p <= local)
}

/// Block64 visibility, restated: causal, and the key's block is a sink block or one of
/// the `local / 64` blocks ending at the query's block.
pub fn sees_block64(q: usize, k: usize, sink: usize, local: usize) -> bool {
    k <= q && (k < (sink / 64) * 64 || q / 64 - k / 64 < local / 64)
}

/// Softmax attention in f64 of one query over the keys where `seen` is true.
/// `k(p)`/`v(p)` give the vectors at position p.
pub fn attend_f64(
    q: &[f32],
    n: usize,
    seen: impl Fn(usize) -> bool,
    k: impl Fn(usize) -> Vec<f32>,
    v: impl Fn(usize) -> Vec<f32>,
    scale: f64,
) -> Vec<f64> {
    let d = q.len();
    let mut scores = Vec::new();
    for p in 0..n {
        if seen(p) {
            let kp = k(p);
            let s: f64 = (0..d).map(|i| q[i] as f64 * kp[i] as f64).sum::<f64>() * scale;
            scores.push((p, s));
        }
    }
    let m = scores.iter().map(|s| s.1).fold(f64::NEG_INFINITY, f64::max);
    let mut out = vec![0f64; d];
    let mut den = 0.0;
    for &(p, s) in &scores {
        let w = (s - m).exp();
        den += w;
        let vp = v(p);
        for i in 0..d {
            out[i] += w * vp[i] as f64;
        }
    }
    out.iter().map(|x| x / den).collect()
}

/// Rounds f32 values through a dtype (what a kernel actually sees).
pub fn round(values: &[f32], dtype: moac::Dtype) -> Vec<f32> {
    values
        .iter()
        .map(|&x| match dtype {
            moac::Dtype::F16 => half::f16::from_f32(x).to_f32(),
            moac::Dtype::Bf16 => half::bf16::from_f32(x).to_f32(),
        })
        .collect()
}

/// Max absolute difference.
pub fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y).abs())
        .fold(0.0, f64::max)
}

/// The SmolLM2-135M GGUF that `scripts/setup-model.sh` installs, if present. Where
/// MOAC_REQUIRE_MODEL is set (scripts/test.sh sets it) its absence fails the test
/// instead of skipping it.
pub fn smollm2() -> Option<PathBuf> {
    let path = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if path.is_file() {
        return Some(path);
    }
    assert!(
        std::env::var_os("MOAC_REQUIRE_MODEL").is_none(),
        "{} is missing: run scripts/setup-model.sh",
        path.display()
    );
    eprintln!("skipped: no {}", path.display());
    None
}
