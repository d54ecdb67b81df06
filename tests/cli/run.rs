//! `moac run` end to end: random inputs written to safetensors, run on the cpu and emu
//! backends for every example plan's geometry (ragged prompt lengths, decode runs that
//! wrap the rings), outputs compared with each other and with a float64 brute force.
#![allow(clippy::unwrap_used)]

use candle_core::{DType, Device, Tensor};
use moac::geometry::{capacity, CacheGeometry};
use moac_test_support::*;
use std::collections::HashMap;
use std::process::Command;

struct Inputs {
    b: usize,
    p: usize,
    s: usize,
    hq: usize,
    hkv: usize,
    d: usize,
    lens: Vec<usize>,
    qp: Vec<f32>,
    kp: Vec<f32>,
    vp: Vec<f32>,
    qd: Vec<f32>,
    kd: Vec<f32>,
    vd: Vec<f32>,
}

fn write_inputs(dir: &std::path::Path, x: &Inputs, dtype: DType) -> std::path::PathBuf {
    let dev = Device::Cpu;
    let t = |v: &Vec<f32>, dims: &[usize]| {
        Tensor::from_vec(v.clone(), dims, &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    let mut m = HashMap::new();
    m.insert("q_prefill", t(&x.qp, &[x.b, x.p, x.hq, x.d]));
    m.insert("k_prefill", t(&x.kp, &[x.b, x.p, x.hkv, x.d]));
    m.insert("v_prefill", t(&x.vp, &[x.b, x.p, x.hkv, x.d]));
    m.insert("q_decode", t(&x.qd, &[x.s, x.b, x.hq, x.d]));
    m.insert("k_decode", t(&x.kd, &[x.s, x.b, x.hkv, x.d]));
    m.insert("v_decode", t(&x.vd, &[x.s, x.b, x.hkv, x.d]));
    let lens: Vec<u32> = x.lens.iter().map(|&l| l as u32).collect();
    m.insert("prompt_lens", Tensor::from_vec(lens, x.b, &dev).unwrap());
    let path = dir.join("inputs.safetensors");
    candle_core::safetensors::save(&m, &path).unwrap();
    path
}

fn run_moac(
    plan: &std::path::Path,
    config: &std::path::Path,
    layer: usize,
    inputs: &std::path::Path,
    out: &std::path::Path,
    backend: &str,
    m: usize,
) -> HashMap<String, Vec<f32>> {
    let o = Command::new(env!("CARGO_BIN_EXE_moac"))
        .args([
            "run",
            plan.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
            "--layer",
            &layer.to_string(),
        ])
        .args([
            "--inputs",
            inputs.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--backend",
            backend,
        ])
        .args([
            "--max-new-tokens",
            &m.to_string(),
            "--prefill-mode",
            "moa-block64",
        ])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "moac run --backend {backend}: {}",
        stderr(&o)
    );
    let t = candle_core::safetensors::load(out, &Device::Cpu).unwrap();
    t.into_iter()
        .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

fn check_plan(name: &str, layer: usize) {
    let plans = example_plans();
    let (plan_path, config) = plans
        .iter()
        .find(|(p, _)| p.to_string_lossy().contains(name))
        .unwrap();
    let plan = moac::plan::load(plan_path, Some(config)).unwrap();
    let m = plan.model();
    let mut rng = Rng::fresh(name);
    let (b, p, s, mnew) = (3, 200, 90, 100);
    let lens = vec![200, 57, 131];
    let (hq, hkv, d) = (m.num_query_heads, m.num_kv_heads, m.head_dim);
    let dt = moac::Dtype::F16;
    let x = Inputs {
        b,
        p,
        s,
        hq,
        hkv,
        d,
        lens: lens.clone(),
        qp: round(&rng.vec(b * p * hq * d, 1.0), dt),
        kp: round(&rng.vec(b * p * hkv * d, 1.0), dt),
        vp: round(&rng.vec(b * p * hkv * d, 1.0), dt),
        qd: round(&rng.vec(s * b * hq * d, 1.0), dt),
        kd: round(&rng.vec(s * b * hkv * d, 1.0), dt),
        vd: round(&rng.vec(s * b * hkv * d, 1.0), dt),
    };
    let tmp = tempfile::tempdir().unwrap();
    let inputs = write_inputs(tmp.path(), &x, DType::F32);
    let cpu = run_moac(
        plan_path,
        config,
        layer,
        &inputs,
        &tmp.path().join("cpu.safetensors"),
        "cpu",
        mnew,
    );
    let emu = run_moac(
        plan_path,
        config,
        layer,
        &inputs,
        &tmp.path().join("emu.safetensors"),
        "emu",
        mnew,
    );

    // Float64 brute force on positions.
    let geo = CacheGeometry::new(&plan, p as u64, mnew as u64).unwrap();
    let sink = geo.sink as usize;
    let g = hq / hkv;
    let scale = 1.0 / (d as f64).sqrt();
    let local = |h: usize| capacity(plan.layer(layer)[h], geo.n, plan.settings()) as usize - sink;
    let (mut worst_cpu, mut worst_emu) = (0f64, 0f64);
    for bi in 0..b {
        let len = lens[bi];
        for h in 0..hq {
            // A few prefill rows of every head (all rows would be slow in debug builds).
            for qi in [0, 1, 63, 64, 65, len / 2, len - 1]
                .into_iter()
                .filter(|&qi| qi < len)
            {
                let base = ((bi * p + qi) * hq + h) * d;
                let kv = |src: &Vec<f32>, pos: usize| {
                    src[((bi * p + pos) * hkv + h / g) * d..][..d].to_vec()
                };
                let want = attend_f64(
                    &x.qp[base..base + d],
                    len,
                    |k| sees_block64(qi, k, sink, local(h)),
                    |k| kv(&x.kp, k),
                    |k| kv(&x.vp, k),
                    scale,
                );
                let e = max_abs_diff(&cpu["o_prefill"][base..base + d], &want);
                if e > 1e-3 {
                    eprintln!("prefill b{bi} h{h} q{qi}: {e}");
                }
                worst_cpu = worst_cpu.max(e);
                worst_emu = worst_emu.max(max_abs_diff(&emu["o_prefill"][base..base + d], &want));
            }
            for si in [0, 1, s / 2, s - 1] {
                let t = len + si + 1;
                let at = |pre: &Vec<f32>, dec: &Vec<f32>, pos: usize| -> Vec<f32> {
                    if pos < len {
                        pre[((bi * p + pos) * hkv + h / g) * d..][..d].to_vec()
                    } else {
                        dec[(((pos - len) * b + bi) * hkv + h / g) * d..][..d].to_vec()
                    }
                };
                let qv = &x.qd[((si * b + bi) * hq + h) * d..][..d];
                let want = attend_f64(
                    qv,
                    t,
                    |pos| sees_decode(t, sink, local(h), pos),
                    |pos| at(&x.kp, &x.kd, pos),
                    |pos| at(&x.vp, &x.vd, pos),
                    scale,
                );
                let o = ((si * b + bi) * hq + h) * d;
                let e = max_abs_diff(&cpu["o_decode"][o..o + d], &want);
                if e > 1e-3 {
                    eprintln!("decode b{bi} h{h} s{si}: {e}");
                }
                worst_cpu = worst_cpu.max(e);
                worst_emu = worst_emu.max(max_abs_diff(&emu["o_decode"][o..o + d], &want));
            }
        }
        // Padding rows of o_prefill are zero on both backends.
        for qi in len..p {
            let base = (bi * p + qi) * hq * d;
            assert!(cpu["o_prefill"][base..base + hq * d]
                .iter()
                .all(|&v| v == 0.0));
            assert!(emu["o_prefill"][base..base + hq * d]
                .iter()
                .all(|&v| v == 0.0));
        }
    }
    // Both backends round their outputs to f16, as the kernels write them (half an ulp:
    // about 2.5e-4 for outputs below 1, measured 2.4e-4).
    assert!(worst_cpu < 1e-3, "{name}: cpu vs float64: {worst_cpu}");
    assert!(worst_emu < 2e-3, "{name}: emu vs float64: {worst_emu}");
    let cross = cpu["o_decode"]
        .iter()
        .zip(&emu["o_decode"])
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(cross < 2e-3, "{name}: cpu vs emu decode: {cross}");
}

#[test]
fn llama3_8b_layer_1() {
    check_plan("Llama-3-8B", 1);
}

#[test]
fn llama32_1b_layer_0() {
    check_plan("Llama-3.2-1B", 0);
}

#[test]
fn vicuna_layer_5() {
    check_plan("vicuna-7b-v1.5-16k/moa", 5);
}

#[test]
fn streamingllm_layer_0() {
    check_plan("streamingllm", 0);
}

#[test]
fn errors_and_cuda_without_gpu() {
    let plans = example_plans();
    let (plan, config) = &plans[0];
    let tmp = tempfile::tempdir().unwrap();
    let x = Inputs {
        b: 1,
        p: 4,
        s: 3,
        hq: 32,
        hkv: 8,
        d: 128,
        lens: vec![4],
        qp: vec![0.0; 4 * 32 * 128],
        kp: vec![0.0; 4 * 8 * 128],
        vp: vec![0.0; 4 * 8 * 128],
        qd: vec![0.0; 3 * 32 * 128],
        kd: vec![0.0; 3 * 8 * 128],
        vd: vec![0.0; 3 * 8 * 128],
    };
    let inputs = write_inputs(tmp.path(), &x, DType::BF16);
    let out = tmp.path().join("o.safetensors");
    let base = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_moac"))
            .args([
                "run",
                plan.to_str().unwrap(),
                "--config",
                config.to_str().unwrap(),
                "--layer",
                "0",
            ])
            .args([
                "--inputs",
                inputs.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    // S > M.
    let o = base(&["--max-new-tokens", "2"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("exceed --max-new-tokens"),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists());
    // No GPU: one clear line.
    if !std::path::Path::new("/dev/nvidiactl").exists() {
        let o = base(&["--backend", "cuda", "--max-new-tokens", "8"]);
        assert_eq!(o.status.code(), Some(1));
        assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
        assert!(stderr(&o).contains("cuda backend"));
    }
    // Wrong head count (the Llama-3-8B config has 32 query heads and 8 KV heads; give a
    // Vicuna plan with its 32 KV heads these inputs).
    let (vplan, vcfg) = plans
        .iter()
        .find(|(p, _)| p.to_string_lossy().contains("vicuna"))
        .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_moac"))
        .args([
            "run",
            vplan.to_str().unwrap(),
            "--config",
            vcfg.to_str().unwrap(),
            "--layer",
            "0",
        ])
        .args([
            "--inputs",
            inputs.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("must be"), "{}", stderr(&o));
    // A fine run in bf16 writes the outputs.
    let o = base(&["--max-new-tokens", "8", "--dtype", "bf16"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let t = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    assert_eq!(t["o_prefill"].dims(), &[1, 4, 32, 128]);
    assert_eq!(t["o_decode"].dims(), &[3, 1, 32, 128]);
}
