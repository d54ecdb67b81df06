//! `moac inspect` against an independent reference (scripts/reference_geometry.py, which
//! was written from the semantics page in Python) and against properties of the layout.
#![allow(clippy::unwrap_used)]

use moac_test_support::*;
use serde_json::Value;

fn inspect_json(
    plan: &std::path::Path,
    config: &std::path::Path,
    p: u64,
    m: u64,
    extra: &[&str],
) -> Value {
    let (p, m) = (p.to_string(), m.to_string());
    let mut args = vec![
        "inspect",
        plan.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--prompt-len",
        &p,
        "--max-new-tokens",
        &m,
        "--json",
    ];
    args.extend_from_slice(extra);
    let out = moac!(&args);
    assert!(
        out.status.success(),
        "moac inspect failed: {}",
        stderr(&out)
    );
    serde_json::from_slice(&out.stdout).expect("inspect --json prints JSON")
}

#[test]
fn capacities_match_the_independent_reference() {
    let text =
        std::fs::read_to_string(root().join("tests/fixtures/geometry_reference.json")).unwrap();
    let cases: Vec<Value> = serde_json::from_str(&text).unwrap();
    let plans = example_plans();
    assert_eq!(plans.len(), 4, "four example plans");
    let mut checked = 0;
    for case in &cases {
        let name = case["plan"].as_str().unwrap();
        let (plan, config) = plans
            .iter()
            .find(|(p, _)| p.ends_with(name))
            .unwrap_or_else(|| panic!("fixture names an unknown plan {name}"));
        let p = case["prompt_len"].as_u64().unwrap();
        let m = case["max_new_tokens"].as_u64().unwrap();
        let got = inspect_json(plan, config, p, m, &[]);
        assert_eq!(got["n"], case["n"], "{name} P={p} M={m}");
        let got_layers = got["layers"].as_array().unwrap();
        let want_layers = case["layers"].as_array().unwrap();
        assert_eq!(got_layers.len(), want_layers.len());
        for (l, (g, w)) in got_layers.iter().zip(want_layers).enumerate() {
            assert_eq!(
                g["query_capacity"], w["query_capacity"],
                "{name} P={p} M={m} layer {l}"
            );
            assert_eq!(
                g["kv_capacity"], w["kv_capacity"],
                "{name} P={p} M={m} layer {l}"
            );
        }
        for key in ["kv_bytes", "dense_kv_bytes", "mha_expanded_kv_bytes"] {
            assert_eq!(
                got["totals"][key], case["totals"][key],
                "{name} P={p} M={m} {key}"
            );
        }
        checked += 1;
    }
    // Includes N below 128 (100 + 20) and N not a multiple of 64 (1000 + 37).
    assert!(checked >= 20);
}

#[test]
fn worked_examples_by_hand() {
    // Cells of the Llama-3.2-1B plan whose values are worked out here by hand.
    let plans = example_plans();
    let (plan, config) = plans
        .iter()
        .find(|(p, _)| p.to_string_lossy().contains("Llama-3.2-1B"))
        .unwrap();
    let raw: Value = serde_json::from_str(&std::fs::read_to_string(plan).unwrap()).unwrap();
    let a = raw["alphas"][0][4].as_f64().unwrap();
    let b = raw["betas"][0][4].as_f64().unwrap();
    assert_eq!(a, -1024.0);
    assert!((0.0..=1.0).contains(&b));
    let got = inspect_json(plan, config, 1000, 37, &[]);
    // N = 1037; -1024 + b * 1037 is below 128 for any beta <= 1, so C = 128.
    assert_eq!(got["layers"][0]["query_capacity"][4], 128);
    // A tiny N: every head is clamped to N, then to the minimum 128.
    let got = inspect_json(plan, config, 50, 20, &[]);
    for layer in got["layers"].as_array().unwrap() {
        for c in layer["query_capacity"].as_array().unwrap() {
            assert_eq!(c, 128);
        }
    }
}

#[test]
fn layout_properties_hold_for_every_plan() {
    for (plan, config) in example_plans() {
        for (p, m) in [(1, 0), (129, 63), (4096, 1024), (30000, 7)] {
            let got = inspect_json(&plan, &config, p, m, &["--dtype", "bf16"]);
            let n = got["n"].as_u64().unwrap();
            assert_eq!(n, p + m);
            let hq = got["num_query_heads"].as_u64().unwrap() as usize;
            let hkv = got["num_kv_heads"].as_u64().unwrap() as usize;
            let d = got["head_dim"].as_u64().unwrap();
            let g = hq / hkv;
            let mut total = 0;
            let mut mha = 0;
            for layer in got["layers"].as_array().unwrap() {
                let qc: Vec<u64> = layer["query_capacity"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap())
                    .collect();
                let kc: Vec<u64> = layer["kv_capacity"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap())
                    .collect();
                let off: Vec<u64> = layer["kv_offset"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap())
                    .collect();
                assert_eq!(qc.len(), hq);
                assert_eq!(kc.len(), hkv);
                for &c in &qc {
                    assert!(c >= 128 && c % 64 == 0, "capacity {c}");
                    assert!(
                        c <= n.max(128).div_ceil(64) * 64,
                        "capacity {c} exceeds rounded N {n}"
                    );
                }
                for j in 0..hkv {
                    assert_eq!(
                        kc[j],
                        *qc[j * g..(j + 1) * g].iter().max().unwrap(),
                        "KV capacity is the max of its group"
                    );
                }
                let mut next = 0;
                for j in 0..hkv {
                    assert_eq!(off[j], next, "offsets are contiguous");
                    next += kc[j];
                }
                assert_eq!(layer["total_slots"].as_u64().unwrap(), next);
                assert_eq!(layer["kv_bytes"].as_u64().unwrap(), 2 * next * d * 2);
                total += layer["kv_bytes"].as_u64().unwrap();
                mha += 2 * qc.iter().sum::<u64>() * d * 2;
            }
            assert_eq!(
                got["totals"]["kv_bytes"].as_u64().unwrap(),
                total,
                "totals are sums"
            );
            assert_eq!(
                got["totals"]["mha_expanded_kv_bytes"].as_u64().unwrap(),
                mha
            );
            assert!(total <= mha);
        }
    }
}

#[test]
fn llama3_8b_is_a_third_of_the_mha_expanded_cache() {
    let plans = example_plans();
    let (plan, config) = plans
        .iter()
        .find(|(p, _)| p.to_string_lossy().contains("Llama-3-8B"))
        .unwrap();
    let got = inspect_json(plan, config, 4096, 1024, &[]);
    let kv = got["totals"]["kv_bytes"].as_f64().unwrap();
    let mha = got["totals"]["mha_expanded_kv_bytes"].as_f64().unwrap();
    let ratio = kv / mha;
    assert!((0.30..0.35).contains(&ratio), "moac/MoA = {ratio}");
}

#[test]
fn text_report_and_svg() {
    let plans = example_plans();
    let (plan, config) = &plans[0];
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("heat.svg");
    let out = moac!(&[
        "inspect",
        plan.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--prompt-len",
        "2048",
        "--svg",
        svg.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("moac/MoA ="), "{text}");
    assert!(
        text.contains("N = 3072"),
        "default max_new_tokens is 1024: {text}"
    );
    let svg = std::fs::read_to_string(svg).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert!(svg.contains(">query head<") && svg.contains(">layer<") && svg.contains("C / N"));
    // One cell per (layer, query head).
    assert_eq!(svg.matches("<title>layer ").count(), 32 * 32);
}

#[test]
fn imported_plan_gives_the_same_geometry() {
    let dir = tempfile::tempdir().unwrap();
    for (i, (plan, config)) in example_plans().into_iter().enumerate() {
        let out_file = dir.path().join(format!("plan{i}.moac.json"));
        let out = moac!(&[
            "plan",
            "import",
            plan.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
            "-o",
            out_file.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        let a = inspect_json(&plan, &config, 3000, 500, &[]);
        let out = moac!(&[
            "inspect",
            out_file.to_str().unwrap(),
            "--prompt-len",
            "3000",
            "--max-new-tokens",
            "500",
            "--json",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        let b: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(a["layers"], b["layers"]);
        assert_eq!(a["totals"], b["totals"]);
        assert_eq!(
            a["plan_sha256"], b["plan_sha256"],
            "the hash is of the meaning, not the form"
        );
    }
}

#[test]
fn the_thread_count_is_one_global_flag() {
    let (plan, config) = example_plans().remove(0);
    let (plan, config) = (plan.to_str().unwrap(), config.to_str().unwrap());
    // Before or after the subcommand; the result does not depend on it.
    let base = [
        "inspect",
        plan,
        "--config",
        config,
        "--prompt-len",
        "100",
        "--json",
    ];
    let one = moac!(&[&["--threads", "1"][..], &base[..]].concat());
    assert!(one.status.success(), "{}", stderr(&one));
    let two = moac!(&[&base[..], &["--threads", "2"][..]].concat());
    assert!(two.status.success(), "{}", stderr(&two));
    assert_eq!(one.stdout, two.stdout);
    let zero = moac!(&[&["--threads", "0"][..], &base[..]].concat());
    assert!(!zero.status.success());
    assert!(
        stderr(&zero).contains("--threads must be at least 1"),
        "{}",
        stderr(&zero)
    );
}
