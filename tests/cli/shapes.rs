//! Large and unusual shapes, compiled and verified: plans shaped like Llama-3-70B
//! (80 layers x 64 query heads, G = 8), Llama-3.1-405B (126 x 128, G = 16) and
//! Vicuna-13B (MHA, 40 x 40), and every group size from 1 to 16 in head_dim 64 and 128
//! (one layer each).
//! Each compiles for sm_80 and sm_90 with one translation unit per kind (the rule tables
//! fit the constant budget), 0 spill bytes in decode and append, and its first and last
//! layer verify on emu against the cpu reference.
#![allow(clippy::unwrap_used)]

use moac::plan::synthetic::{synthetic, Rules};
use moac::plan::ModelShape;
use moac::{compile, CompileOptions, Dtype};
use moac_cli::tools::verify::{verify_artifact, VerifyOptions};
use moac_runtime::backend::emu::EmuOptions;
use moac_runtime::{Artifact, Backend};
use moac_test_support::*;
use serde_json::Value;

fn case(name: &str, layers: usize, hq: usize, hkv: usize, d: usize, dtype: Dtype) {
    if !have_nvrtc() {
        return;
    }
    let model = ModelShape {
        num_layers: layers,
        num_query_heads: hq,
        num_kv_heads: hkv,
        head_dim: d,
    };
    let plan = synthetic(name, model, Rules::Grid, layers as u64 * 131 + hq as u64).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("artifact");
    let opts = CompileOptions {
        dtype,
        archs: vec!["sm_80".into(), "sm_90".into()],
        ..CompileOptions::default()
    };
    compile(&plan, &opts, &out).unwrap_or_else(|e| panic!("{name}: {e}"));
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    let kernels = manifest["kernels"].as_array().unwrap();
    let mut units: Vec<(&str, &str)> = kernels
        .iter()
        .map(|k| (k["kind"].as_str().unwrap(), k["unit"].as_str().unwrap()))
        .collect();
    units.sort_unstable();
    units.dedup();
    for kind in ["decode", "append", "fill", "merge"] {
        assert_eq!(
            units.iter().filter(|u| u.0 == kind).count(),
            1,
            "{name}: {kind} kernels in one unit"
        );
    }
    for k in kernels {
        let kind = k["kind"].as_str().unwrap();
        for arch in ["sm_80", "sm_90"] {
            let c = &k["cubin"][arch];
            assert!(c.is_object(), "{name}: {} has no {arch} CUBIN", k["name"]);
            if kind == "decode" || kind == "append" {
                assert_eq!(
                    c["spill_bytes"], 0,
                    "{name}: {} spills on {arch} ({} registers)",
                    k["name"], c["registers"]
                );
            }
        }
    }
    let art = Artifact::load(&out).unwrap();
    let mut layers_checked = vec![0];
    if layers > 1 {
        layers_checked.push(layers - 1);
    }
    let vopts = VerifyOptions {
        layers: layers_checked,
        dtype,
        backend: Backend::Emu,
        // Ragged rows; both wrap the smallest rings (64 slots past the sink) by the end.
        prompt_lens: vec![150, 40],
        max_new_tokens: 96,
        steps: 72,
        seed: Rng::fresh(name).next_u64(),
        emu: EmuOptions::default(),
        planted_bug: None,
        launch_overrides: Default::default(),
        only: None,
    };
    let lines = verify_artifact(&art, &vopts).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(!lines.is_empty());
    for l in &lines {
        assert!(l.passed, "{name}: {l}");
    }
}

#[test]
fn llama3_70b_shaped() {
    case("llama3-70b", 80, 64, 8, 128, Dtype::F16);
}

#[test]
fn llama31_405b_shaped() {
    case("llama3.1-405b", 126, 128, 8, 128, Dtype::Bf16);
}

#[test]
fn vicuna13b_mha_shaped() {
    case("vicuna-13b", 40, 40, 40, 128, Dtype::F16);
}

/// Group sizes `gs`: one layer, two KV heads, head_dim 64 for odd groups and 128 for
/// even ones, f16 and bf16 alternating by pairs.
fn groups(gs: std::ops::RangeInclusive<usize>) {
    for g in gs {
        let d = if g % 2 == 1 { 64 } else { 128 };
        let dtype = if (g / 2) % 2 == 0 {
            Dtype::F16
        } else {
            Dtype::Bf16
        };
        case(&format!("group-{g}"), 1, 2 * g, 2, d, dtype);
    }
}

#[test]
fn group_sizes_1_to_4() {
    groups(1..=4);
}

#[test]
fn group_sizes_5_to_8() {
    groups(5..=8);
}

#[test]
fn group_sizes_9_to_12() {
    groups(9..=12);
}

#[test]
fn group_sizes_13_to_16() {
    groups(13..=16);
}
