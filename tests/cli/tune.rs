//! `moac tune` end to end on the emu backend: the full candidate sweep of one example
//! layer passes against the cpu reference and a planted wrong candidate is caught; a
//! database with timings (the sweep's own results, given GPU timings in which the
//! planted candidate is the fastest) drives `moac compile --tuning`: the winners are
//! the fastest correct candidates, the manifest says which kernels they came from, entries
//! from another GPU are ignored with a note, and the tuned artifact loads and verifies.
#![allow(clippy::unwrap_used)]

use moac::ir::KernelKind;
use moac::ir::LaunchConfig;
use moac::tuning::TuningDb;
use moac_test_support::*;
use serde_json::Value;
use std::process::Command;

fn llama32() -> (std::path::PathBuf, std::path::PathBuf) {
    example_plans()
        .into_iter()
        .find(|(p, _)| p.to_string_lossy().contains("Llama-3.2-1B"))
        .unwrap()
}

fn moac_in(args: &[&str], cache: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_moac"))
        .args(args)
        .env("MOAC_CACHE_DIR", cache)
        .output()
        .unwrap()
}

#[test]
fn emu_sweep_then_compile_with_the_winners() {
    let (plan, config) = llama32();
    let (plan, config) = (plan.to_str().unwrap(), config.to_str().unwrap());
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let db_path = tmp.path().join("tuning.json");
    let db_arg = db_path.to_str().unwrap();

    // 1. The whole candidate space of layer 0 on emu, plus the planted wrong candidate.
    let out = moac_in(
        &[
            "tune",
            plan,
            "--config",
            config,
            "--backend",
            "emu",
            "--layers",
            "0",
            "--db",
            db_arg,
            "--plant-bad-candidate",
        ],
        &cache,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    assert!(
        text.contains("1 wrong and excluded (1 planted)"),
        "the planted candidate is caught: {text}"
    );
    let db = TuningDb::load(&db_path).unwrap();
    assert_eq!(db.entries.len(), 5, "decode, append, fill, two prefills");
    let head_dim = 64;
    for e in &db.entries {
        assert_eq!(e.key.env.arch, "emu");
        let kind = KernelKind::from_slug(e.key.kernel.rsplit_once('_').unwrap().0).unwrap();
        let space = LaunchConfig::candidates(kind, head_dim, 4);
        let planted = usize::from(kind == KernelKind::Decode);
        assert_eq!(e.candidates.len(), space.len() + planted, "{kind:?}");
        for c in &e.candidates {
            let is_planted = c.launch == moac_cli::tools::sweep::PLANTED_LAUNCH;
            assert_eq!(
                c.correct, !is_planted,
                "{kind:?} {:?}: {}",
                c.launch, c.note
            );
            assert!(c.median_us.is_none(), "emu does not time");
            if !is_planted {
                assert!(space.contains(&c.launch));
            }
        }
        assert!(e.best().is_none(), "untimed entries have no winner");
    }

    // 2. The same results as if measured on an sm_90 GPU, where the planted (wrong)
    //    candidate is the fastest and the last correct one the runner-up; plus a stale
    //    entry from another GPU.
    let nvrtc = moac::jit::nvrtc::load().map(|n| n.version.clone());
    let Ok(nvrtc) = nvrtc else {
        assert!(
            std::env::var_os("MOAC_REQUIRE_NVRTC").is_none(),
            "NVRTC is required"
        );
        return;
    };
    let mut gpu = db.clone();
    let mut winners = std::collections::BTreeMap::new();
    for e in &mut gpu.entries {
        e.key.env = moac::tuning::Environment {
            arch: "sm_90".into(),
            sm_count: 132,
            driver_version: "13.0".into(),
            nvrtc_version: nvrtc.clone(),
        };
        let n = e.candidates.len();
        for (i, c) in e.candidates.iter_mut().enumerate() {
            let planted = c.launch == moac_cli::tools::sweep::PLANTED_LAUNCH;
            c.median_us = Some(if planted { 1.0 } else { 100.0 - i as f64 });
        }
        let best = e.best().unwrap().launch;
        assert_ne!(best, moac_cli::tools::sweep::PLANTED_LAUNCH);
        let last_correct = e.candidates[..n]
            .iter()
            .rev()
            .find(|c| c.correct)
            .unwrap()
            .launch;
        assert_eq!(best, last_correct);
        winners.insert(e.key.kernel.clone(), best);
    }
    let mut stale = gpu.entries[0].clone();
    stale.key.env.arch = "sm_80".into();
    stale.key.env.sm_count = 108;
    gpu.entries.push(stale);
    let gpu_path = tmp.path().join("gpu.json");
    gpu.save(&gpu_path).unwrap();

    // 3. Compile with it: layer 0 only, for sm_90.
    let art = tmp.path().join("art");
    let out = moac_in(
        &[
            "compile",
            plan,
            "--config",
            config,
            "--arch",
            "sm_90",
            "--layers",
            "0",
            "--tuning",
            gpu_path.to_str().unwrap(),
            "-o",
            art.to_str().unwrap(),
        ],
        &cache,
    );
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("5 of 6 kernels take their launch configuration from"),
        "{err}"
    );
    assert!(
        err.contains("ignored a tuning entry") && err.contains("sm_80"),
        "{err}"
    );
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(art.join("manifest.json")).unwrap()).unwrap();
    for k in m["kernels"].as_array().unwrap() {
        let id = k["tuning_identity"].as_str().unwrap();
        match winners.get(id) {
            Some(w) => {
                assert_eq!(k["launch_source"], "database", "{id}");
                let launch: moac::ir::LaunchConfig =
                    serde_json::from_value(k["launch"].clone()).unwrap();
                assert_eq!(&launch, w, "{id}");
            }
            None => {
                assert_eq!(k["kind"], "merge");
                assert_eq!(k["launch_source"], "heuristic");
            }
        }
    }

    // 4. The tuned artifact loads (its kernels re-lower to the recorded names) and its
    //    sources verify on emu.
    let out = moac_in(
        &[
            "verify",
            art.to_str().unwrap(),
            "--layers",
            "0",
            "--seed",
            "3",
        ],
        &cache,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    assert!(text.contains("6 passed, 0 failed"), "{text}");
}
