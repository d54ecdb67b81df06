//! The cpu reference backend against a float64 brute force that masks dense attention
//! position by position: prefill in both modes, then fill + append + decode over the
//! compacted cache, for the edges of the semantics (t < sink, t == C, ring wrap-around
//! during fill and during decode, different windows inside one GQA group, head_dim 64
//! and 128, f16 and bf16, batch rows with different prompt lengths).
#![allow(clippy::unwrap_used)]

use candle_core::{DType, Device, Tensor};
use moac::geometry::CacheGeometry;
use moac::ir::PrefillMode;
use moac::Dtype;
use moac_runtime::backend::cpu::candle_dtype;
use moac_runtime::backend::LayerShape;
use moac_runtime::reference;
use moac_test_support::*;

struct Case {
    name: &'static str,
    hq: usize,
    hkv: usize,
    d: usize,
    dtype: Dtype,
    rules: Vec<(f64, f64)>,
    prompt_lens: Vec<usize>,
    max_new: usize,
    steps: usize,
}

fn run(case: &Case) {
    let mut rng = Rng::fresh(case.name);
    let (hq, hkv, d) = (case.hq, case.hkv, case.d);
    let g = hq / hkv;
    let b_ = case.prompt_lens.len();
    let p_ = *case.prompt_lens.iter().max().unwrap();
    let plan = plan(hq, hkv, d, &case.rules);
    let geo = CacheGeometry::new(&plan, p_ as u64, case.max_new as u64).unwrap();
    let layer = LayerShape::new(&geo, 0);
    let sink = layer.sink;
    let scale = 1.0 / (d as f64).sqrt();
    let dev = Device::Cpu;
    // Inputs, rounded to the dtype once: both sides see the same values.
    let qp = round(&rng.vec(b_ * p_ * hq * d, 1.0), case.dtype);
    let kp = round(&rng.vec(b_ * p_ * hkv * d, 1.0), case.dtype);
    let vp = round(&rng.vec(b_ * p_ * hkv * d, 1.0), case.dtype);
    let t4 = |x: &Vec<f32>, h: usize| {
        Tensor::from_vec(x.clone(), (b_, p_, h, d), &dev)
            .unwrap()
            .to_dtype(candle_dtype(case.dtype))
            .unwrap()
    };
    let (q, k, v) = (t4(&qp, hq), t4(&kp, hkv), t4(&vp, hkv));

    // Prefill, both modes.
    for mode in [PrefillMode::Block64, PrefillMode::Token] {
        let out =
            reference::prefill(&q, &k, &v, &case.prompt_lens, &layer, mode, scale as f32).unwrap();
        let out = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut worst = 0f64;
        for (b, &len) in case.prompt_lens.iter().enumerate() {
            for qi in 0..p_ {
                for h in 0..hq {
                    let base = ((b * p_ + qi) * hq + h) * d;
                    let got = &out[base..base + d];
                    if qi >= len {
                        assert!(
                            got.iter().all(|&x| x == 0.0),
                            "{}: padding row {qi} of row {b} is not zero",
                            case.name
                        );
                        continue;
                    }
                    let local = layer.query_local(h);
                    let qv = &qp[base..base + d];
                    let kv_at = |src: &Vec<f32>, p: usize| {
                        src[((b * p_ + p) * hkv + h / g) * d..][..d].to_vec()
                    };
                    let want = attend_f64(
                        qv,
                        len,
                        |p| match mode {
                            PrefillMode::Block64 => sees_block64(qi, p, sink, local),
                            PrefillMode::Token => sees_decode(qi + 1, sink, local, p),
                        },
                        |p| kv_at(&kp, p),
                        |p| kv_at(&vp, p),
                        scale,
                    );
                    worst = worst.max(max_abs_diff(got, &want));
                }
            }
        }
        assert!(
            worst < 1e-4,
            "{} prefill {mode:?}: max abs error {worst}",
            case.name
        );
    }

    // Fill, then decode steps that append and attend.
    let mut cache = reference::fill(&k, &v, &case.prompt_lens, &layer).unwrap();
    let qd = round(&rng.vec(case.steps * b_ * hq * d, 1.0), case.dtype);
    let kd = round(&rng.vec(case.steps * b_ * hkv * d, 1.0), case.dtype);
    let vd = round(&rng.vec(case.steps * b_ * hkv * d, 1.0), case.dtype);
    let mut worst = 0f64;
    for s in 0..case.steps {
        let lens: Vec<usize> = case.prompt_lens.iter().map(|&l| l + s + 1).collect();
        let t3 = |x: &Vec<f32>, h: usize| {
            let n = b_ * h * d;
            Tensor::from_vec(x[s * n..(s + 1) * n].to_vec(), (b_, h, d), &dev)
                .unwrap()
                .to_dtype(candle_dtype(case.dtype))
                .unwrap()
        };
        reference::append(&mut cache, &t3(&kd, hkv), &t3(&vd, hkv), &lens, &layer).unwrap();
        let out = reference::decode(&t3(&qd, hq), &cache, &lens, &layer, scale as f32).unwrap();
        let out = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (b, &len) in case.prompt_lens.iter().enumerate() {
            let t = len + s + 1;
            // The dense sequence of row b: prompt positions, then decoded tokens.
            let at = |pre: &Vec<f32>, dec: &Vec<f32>, p: usize, j: usize| -> Vec<f32> {
                if p < len {
                    pre[((b * p_ + p) * hkv + j) * d..][..d].to_vec()
                } else {
                    dec[(((p - len) * b_ + b) * hkv + j) * d..][..d].to_vec()
                }
            };
            for h in 0..hq {
                let local = layer.query_local(h);
                let qv = &qd[((s * b_ + b) * hq + h) * d..][..d];
                let want = attend_f64(
                    qv,
                    t,
                    |p| sees_decode(t, sink, local, p),
                    |p| at(&kp, &kd, p, h / g),
                    |p| at(&vp, &vd, p, h / g),
                    scale,
                );
                let got = &out[(b * hq + h) * d..][..d];
                worst = worst.max(max_abs_diff(got, &want));
            }
        }
    }
    assert!(worst < 1e-4, "{} decode: max abs error {worst}", case.name);
}

#[test]
fn gqa_group4_d64_f16_ragged_rows_wrapping() {
    // N = 300 + 200 = 500: capacities 128 (alpha -1024), 192 (0.375 N -> 187 -> 192),
    // 256 (0.5 N) and 512 (whole, alpha 8192) inside the groups.
    run(&Case {
        name: "gqa4_d64_f16",
        hq: 8,
        hkv: 2,
        d: 64,
        dtype: Dtype::F16,
        rules: vec![
            (-1024.0, 0.0),
            (0.0, 0.375),
            (0.0, 0.5),
            (8192.0, 0.0),
            (0.0, 0.25),
            (-1024.0, 0.0),
            (0.0, 0.5),
            (0.0, 0.125),
        ],
        prompt_lens: vec![300, 37, 130],
        max_new: 200,
        steps: 160,
    });
}

#[test]
fn gqa_group3_d128_bf16_t_equals_capacity() {
    // N = 128 + 64 = 192: C = 128 for (0, 0.5) -> 96 -> 128; C = 192 for the whole.
    // Row 0 is filled to exactly C = 128 of its smallest head, row 1 below the sink.
    run(&Case {
        name: "gqa3_d128_bf16",
        hq: 6,
        hkv: 2,
        d: 128,
        dtype: Dtype::Bf16,
        rules: vec![
            (0.0, 0.5),
            (8192.0, 0.0),
            (0.0, 0.75),
            (0.0, 0.5),
            (0.0, 0.5),
            (0.0, 0.5),
        ],
        prompt_lens: vec![128, 20],
        max_new: 64,
        steps: 64,
    });
}

#[test]
fn mha_d128_f16_minimal_windows() {
    run(&Case {
        name: "mha_d128_f16",
        hq: 2,
        hkv: 2,
        d: 128,
        dtype: Dtype::F16,
        rules: vec![(0.0, 0.0), (-1024.0, 0.125)],
        prompt_lens: vec![200, 64],
        max_new: 150,
        steps: 150,
    });
}

#[test]
fn errors_are_clean() {
    let plan = plan(4, 2, 64, &[(0.0, 0.5); 4]);
    let geo = CacheGeometry::new(&plan, 10, 5).unwrap();
    let layer = LayerShape::new(&geo, 0);
    let dev = Device::Cpu;
    let k = Tensor::zeros((1, 10, 2, 64), DType::F16, &dev).unwrap();
    let q = Tensor::zeros((1, 10, 4, 64), DType::F16, &dev).unwrap();
    assert!(reference::prefill(&q, &k, &k, &[11], &layer, PrefillMode::Token, 1.0).is_err());
    assert!(reference::prefill(&q, &q, &q, &[10], &layer, PrefillMode::Token, 1.0).is_err());
    let mut cache = reference::fill(&k, &k, &[10], &layer).unwrap();
    let kn = Tensor::zeros((1, 2, 64), DType::F16, &dev).unwrap();
    assert!(
        reference::append(&mut cache, &kn, &kn, &[16], &layer).is_err(),
        "past N"
    );
}
