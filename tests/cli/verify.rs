//! `moac verify` end to end: every example plan on two layers, both dtypes, on the emu
//! backend against the cpu reference; a planted off-by-one fails; a sanitized build of a
//! small configuration passes; the cuda backend without a GPU is one clear error.
#![allow(clippy::unwrap_used)]

use moac_test_support::*;
use std::process::Command;

fn verify(
    plan: &std::path::Path,
    config: Option<&std::path::Path>,
    extra: &[&str],
) -> std::process::Output {
    let mut args = vec!["verify".to_string(), plan.display().to_string()];
    if let Some(c) = config {
        args.extend(["--config".to_string(), c.display().to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    Command::new(env!("CARGO_BIN_EXE_moac"))
        .args(&args)
        .output()
        .unwrap()
}

/// Compiles layers 1 and 2 of the small GQA fixture (`--emit cuda`, no NVRTC needed) with
/// `extra` options into `out`, then verifies that artifact on emu with `verify_args`.
fn compile_fixture_and_verify(
    out: &std::path::Path,
    extra: &[&str],
    verify_args: &[&str],
) -> (String, std::process::Output) {
    let plan = root().join("tests/fixtures/small_gqa.moac.json");
    let mut args = vec![
        "compile",
        plan.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--emit",
        "cuda",
        "--layers",
        "1,2",
    ];
    args.extend_from_slice(extra);
    let o = Command::new(env!("CARGO_BIN_EXE_moac"))
        .args(&args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let o = verify(out, None, verify_args);
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{text}\n{}", stderr(&o));
    (text, o)
}

fn check_plan(name: &str, dtype: &str) {
    let plans = example_plans();
    let (plan, config) = plans
        .iter()
        .find(|(p, _)| p.to_string_lossy().contains(name))
        .unwrap();
    let out = verify(plan, Some(config), &["--dtype", dtype]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{text}\n{}",
        plan.display(),
        stderr(&out)
    );
    // Two layers x six kernels, each on its own line.
    assert!(text.contains("12 passed, 0 failed"), "{text}");
    for kind in [
        "prefill_block64",
        "prefill_token",
        "fill",
        "append",
        "decode",
        "merge",
    ] {
        assert_eq!(
            text.lines()
                .filter(|l| l.contains(&format!(" {kind} ")) && l.ends_with("PASS"))
                .count(),
            2,
            "{kind}: {text}"
        );
    }
}

#[test]
fn llama3_8b_f16() {
    check_plan("Llama-3-8B", "f16");
}

#[test]
fn llama3_8b_bf16() {
    check_plan("Llama-3-8B", "bf16");
}

#[test]
fn llama32_1b_f16() {
    check_plan("Llama-3.2-1B", "f16");
}

#[test]
fn llama32_1b_bf16() {
    check_plan("Llama-3.2-1B", "bf16");
}

#[test]
fn vicuna_moa_f16() {
    check_plan("vicuna-7b-v1.5-16k/moa", "f16");
}

#[test]
fn vicuna_moa_bf16() {
    check_plan("vicuna-7b-v1.5-16k/moa", "bf16");
}

#[test]
fn vicuna_streamingllm_f16() {
    check_plan("streamingllm", "f16");
}

#[test]
fn vicuna_streamingllm_bf16() {
    check_plan("streamingllm", "bf16");
}

#[test]
fn a_planted_off_by_one_in_the_window_fails() {
    let plan = root().join("tests/fixtures/small_gqa.moac.json");
    let out = verify(
        &plan,
        None,
        &["--layers", "0", "--plant-bug", "decode_window_off_by_one"],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let decode = text
        .lines()
        .find(|l| l.starts_with("layer") && l.contains(" decode "))
        .unwrap();
    assert!(decode.ends_with("FAIL"), "{text}");
    // The other kernels are untouched by the planted bug and still pass.
    assert!(
        text.lines()
            .filter(|l| l.contains(" fill ") || l.contains(" prefill_token "))
            .all(|l| l.ends_with("PASS")),
        "{text}"
    );
}

#[test]
fn small_configuration_under_address_and_undefined_sanitizers() {
    let lib = |name: &str| {
        let o = Command::new("g++")
            .arg(format!("-print-file-name={name}"))
            .output()
            .unwrap();
        String::from_utf8(o.stdout).unwrap().trim().to_string()
    };
    let plan = root().join("tests/fixtures/small_gqa.moac.json");
    let out = Command::new(env!("CARGO_BIN_EXE_moac"))
        .args([
            "verify",
            plan.to_str().unwrap(),
            "--layers",
            "0",
            "--prompt-lens",
            "150,40",
            "--max-new-tokens",
            "64",
            "--steps",
            "40",
            "--sanitize",
        ])
        .env(
            "LD_PRELOAD",
            format!("{} {}", lib("libasan.so"), lib("libubsan.so")),
        )
        .env("ASAN_OPTIONS", "detect_leaks=0")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    assert!(text.contains("6 passed, 0 failed"), "{text}");
}

#[test]
fn cuda_backend_without_a_gpu_is_one_clear_line() {
    // SAFETY-free probe: this test only runs where no CUDA driver is present.
    if std::path::Path::new("/dev/nvidiactl").exists() {
        eprintln!("skipped: this machine has a GPU");
        return;
    }
    let plan = root().join("tests/fixtures/small_gqa.moac.json");
    let out = verify(&plan, None, &["--backend", "cuda", "--layers", "0"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("cuda backend"), "{err}");
}

#[test]
fn an_artifact_folder_verifies_from_its_own_sources() {
    // `moac compile --emit cuda` needs no NVRTC; verify then runs the artifact's sources.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("art");
    let (text, _) = compile_fixture_and_verify(
        &out,
        &["--dtype", "bf16"],
        &[
            "--prompt-lens",
            "150,40",
            "--max-new-tokens",
            "64",
            "--steps",
            "30",
        ],
    );
    assert!(
        text.contains("(bf16)") && text.contains("12 passed, 0 failed"),
        "{text}"
    );
    // A layer the artifact lacks, and a tampered source, are clear errors.
    let o = verify(&out, None, &["--layers", "0"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("not in the artifact"), "{}", stderr(&o));
    // Swapped slots of the two decode kernels (one unit, one entry) are refused.
    let manifest_path = out.join("manifest.json");
    let original = std::fs::read_to_string(&manifest_path).unwrap();
    let mut m: serde_json::Value = serde_json::from_str(&original).unwrap();
    let decodes: Vec<usize> = m["kernels"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .filter(|(_, k)| k["kind"] == "decode")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(decodes.len(), 2, "layers 1 and 2 have different rules");
    let (a, b) = (decodes[0], decodes[1]);
    let sa = m["kernels"][a]["slot"].clone();
    m["kernels"][a]["slot"] = m["kernels"][b]["slot"].clone();
    m["kernels"][b]["slot"] = sa;
    std::fs::write(&manifest_path, serde_json::to_string(&m).unwrap()).unwrap();
    let o = verify(&out, None, &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("slots"), "{}", stderr(&o));
    std::fs::write(&manifest_path, original).unwrap();
    let src = std::fs::read_dir(out.join("kernels"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "cu"))
        .unwrap();
    let mut text = std::fs::read_to_string(&src).unwrap();
    text.push_str("\n// edited\n");
    std::fs::write(&src, text).unwrap();
    let o = verify(&out, None, &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("SHA-256"), "{}", stderr(&o));
}

#[test]
fn a_build_specialized_to_one_n_verifies_with_two_kernels_per_unit() {
    // Layers 1 and 2 of the fixture have different rules: every unit holds two kernels,
    // whose capacities and offsets are constant tables indexed by the slot.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("art");
    let (text, _) = compile_fixture_and_verify(
        &out,
        &["--prompt-len", "150", "--max-new-tokens", "64"],
        &[
            "--prompt-lens",
            "150,40,97",
            "--max-new-tokens",
            "64",
            "--steps",
            "60",
        ],
    );
    assert!(text.contains("12 passed, 0 failed"), "{text}");
}
