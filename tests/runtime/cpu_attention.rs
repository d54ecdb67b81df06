//! The cpu backend's tiled attention against a float64 brute force written here (its
//! own loops, and the visibility rules as restated in the test support, not the
//! runtime's), on fresh random inputs, over the edges of the tiling: prompts shorter
//! than the sink and not multiples of 64 (partly masked key and query blocks), rows of
//! one batch with different lengths (padding rows must stay zero), query heads of one KV
//! head with different windows, a sink and windows that are not multiples of 64, head_dim
//! 64 and 128 (and 96, the element-wise path), f16 and bf16, both prefill modes, and
//! decode steps that run each ring around more than once.
//!
//! Tolerance, per element: one ulp of the storage dtype at the true value, plus 1e-5.
//! The backend rounds its f32 result to the dtype once (half an ulp, which can reach one
//! ulp of the true value when the f32 result sits across a binade boundary); the f32 result
//! itself differs from the exact one by the f32 accumulation of up to a few thousand
//! products and weights (values and weights are at most 1, so about n * 2^-24 in the
//! worst case, far less in practice) and the exp approximation (a few f32 ulps per weight):
//! 1e-5 covers that with room, and is 50 times smaller than an f16 ulp at 1.
#![allow(clippy::unwrap_used)]

use moac::geometry::CacheGeometry;
use moac::ir::PrefillMode;
use moac::plan::{ModelShape, Settings};
use moac::Dtype;
use moac_runtime::backend::cpu::CpuLayer;
use moac_runtime::backend::{LayerBackend, LayerShape, Prompt};
use moac_test_support::{round, sees_block64, sees_decode, Rng};

struct Case {
    name: &'static str,
    hq: usize,
    hkv: usize,
    d: usize,
    dtype: Dtype,
    settings: Settings,
    /// (alpha, beta) per query head.
    rules: Vec<(f64, f64)>,
    prompt_lens: Vec<usize>,
    max_new: usize,
    steps: usize,
}

/// One ulp of `dtype` at `x` (subnormals included).
fn ulp(x: f64, dtype: Dtype) -> f64 {
    let (mant, min_exp) = match dtype {
        Dtype::F16 => (10, -14),
        Dtype::Bf16 => (7, -126),
    };
    let e = if x == 0.0 {
        min_exp
    } else {
        (x.abs().log2().floor() as i32).max(min_exp)
    };
    2f64.powi(e - mant)
}

fn compare(what: &str, got: &[f32], want: &[f64], dtype: Dtype) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = 0f64;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs();
        let tol = ulp(w, dtype) + 1e-5;
        assert!(
            err <= tol,
            "{what}: element {i}: got {g} vs float64 {w} (|err| {err:.3e} > {tol:.3e})"
        );
        worst = worst.max(err / tol);
    }
    eprintln!("{what}: worst error {worst:.2} of the tolerance");
}

/// Softmax attention in f64 of one query row over the positions `seen` accepts among
/// `0..n`; `k(p)` and `v(p)` are the rows at position p. Zeros where nothing is seen.
fn attend<'a>(
    q: &[f32],
    n: usize,
    seen: impl Fn(usize) -> bool,
    k: impl Fn(usize) -> &'a [f32],
    v: impl Fn(usize) -> &'a [f32],
    scale: f64,
) -> Vec<f64> {
    let d = q.len();
    let scores: Vec<(usize, f64)> = (0..n)
        .filter(|&p| seen(p))
        .map(|p| {
            let kp = k(p);
            let dot: f64 = (0..d).map(|i| q[i] as f64 * kp[i] as f64).sum();
            (p, dot * scale)
        })
        .collect();
    let mut out = vec![0f64; d];
    if scores.is_empty() {
        return out;
    }
    let m = scores.iter().map(|s| s.1).fold(f64::NEG_INFINITY, f64::max);
    let mut den = 0.0;
    for &(p, s) in &scores {
        let w = (s - m).exp();
        den += w;
        for (o, &x) in out.iter_mut().zip(v(p)) {
            *o += w * x as f64;
        }
    }
    out.iter().map(|x| x / den).collect()
}

/// The token rule restated: decode visibility with t = q + 1.
fn sees_token(q: usize, k: usize, sink: usize, local: usize) -> bool {
    sees_decode(q + 1, sink, local, k)
}

fn run(case: &Case) {
    let mut rng = Rng::fresh(case.name);
    let (hq, hkv, d, dtype) = (case.hq, case.hkv, case.d, case.dtype);
    let g = hq / hkv;
    let b_ = case.prompt_lens.len();
    let p_ = *case.prompt_lens.iter().max().unwrap();
    let model = ModelShape {
        num_layers: 1,
        num_query_heads: hq,
        num_kv_heads: hkv,
        head_dim: d,
    };
    let alphas = vec![case.rules.iter().map(|r| r.0).collect::<Vec<_>>()];
    let betas = vec![case.rules.iter().map(|r| r.1).collect::<Vec<_>>()];
    let plan =
        moac::plan::validate(case.name.as_ref(), model, case.settings, &alphas, &betas).unwrap();
    let geo = CacheGeometry::new(&plan, p_ as u64, case.max_new as u64).unwrap();
    let shape = LayerShape::new(&geo, 0);
    let sink = shape.sink;
    let locals: Vec<usize> = (0..hq).map(|h| shape.query_local(h)).collect();
    eprintln!(
        "{}: sink {sink}, query windows {:?}, KV capacities {:?}",
        case.name, shape.query_capacity, shape.kv_capacity
    );
    let mut layer = CpuLayer::new(shape.clone(), dtype).unwrap();
    layer.new_cache(b_).unwrap();
    let scale = 1.0 / (d as f32).sqrt();
    let bits = |x: &[f32]| x.iter().map(|&v| dtype.to_bits(v)).collect::<Vec<u16>>();
    let lens_i32: Vec<i32> = case.prompt_lens.iter().map(|&l| l as i32).collect();

    let qp = round(&rng.vec(b_ * p_ * hq * d, 1.0), dtype);
    let kp = round(&rng.vec(b_ * p_ * hkv * d, 1.0), dtype);
    let vp = round(&rng.vec(b_ * p_ * hkv * d, 1.0), dtype);
    // Each row's keys and values by position and KV head, growing with decode steps.
    let row_of = |x: &[f32], b: usize, pos: usize, j: usize| {
        let at = ((b * p_ + pos) * hkv + j) * d;
        x[at..at + d].to_vec()
    };
    let mut hist_k: Vec<Vec<Vec<Vec<f32>>>> = (0..b_)
        .map(|b| {
            (0..case.prompt_lens[b])
                .map(|pos| (0..hkv).map(|j| row_of(&kp, b, pos, j)).collect())
                .collect()
        })
        .collect();
    let mut hist_v: Vec<Vec<Vec<Vec<f32>>>> = (0..b_)
        .map(|b| {
            (0..case.prompt_lens[b])
                .map(|pos| (0..hkv).map(|j| row_of(&vp, b, pos, j)).collect())
                .collect()
        })
        .collect();

    let (kb, vb) = (bits(&kp), bits(&vp));
    let prompt = Prompt {
        k: &kb,
        v: &vb,
        lens: &lens_i32,
        p: p_,
    };
    for mode in [PrefillMode::Block64, PrefillMode::Token] {
        let got = layer.prefill(&bits(&qp), &prompt, mode, scale).unwrap();
        let mut want = vec![0f64; got.len()];
        for (b, &len) in case.prompt_lens.iter().enumerate() {
            for i in 0..len {
                for (h, &local) in locals.iter().enumerate() {
                    let at = ((b * p_ + i) * hq + h) * d;
                    let j = h / g;
                    let o = attend(
                        &qp[at..at + d],
                        i + 1,
                        |k| match mode {
                            PrefillMode::Token => sees_token(i, k, sink, local),
                            PrefillMode::Block64 => sees_block64(i, k, sink, local),
                        },
                        |p| &hist_k[b][p][j],
                        |p| &hist_v[b][p][j],
                        scale as f64,
                    );
                    want[at..at + d].copy_from_slice(&o);
                }
            }
        }
        compare(
            &format!("{} prefill {mode:?}", case.name),
            &got,
            &want,
            dtype,
        );
    }

    layer.fill(&prompt).unwrap();
    for s in 0..case.steps {
        let lens: Vec<usize> = case.prompt_lens.iter().map(|&l| l + s + 1).collect();
        let lens_i: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
        let qd = round(&rng.vec(b_ * hq * d, 1.0), dtype);
        let kd = round(&rng.vec(b_ * hkv * d, 1.0), dtype);
        let vd = round(&rng.vec(b_ * hkv * d, 1.0), dtype);
        for b in 0..b_ {
            let at = |j: usize| (b * hkv + j) * d;
            hist_k[b].push((0..hkv).map(|j| kd[at(j)..at(j) + d].to_vec()).collect());
            hist_v[b].push((0..hkv).map(|j| vd[at(j)..at(j) + d].to_vec()).collect());
        }
        layer.append(&bits(&kd), &bits(&vd), &lens_i).unwrap();
        let got = layer.decode(&bits(&qd), &lens_i, scale).unwrap();
        let mut want = vec![0f64; got.len()];
        for (b, &t) in lens.iter().enumerate() {
            for (h, &local) in locals.iter().enumerate() {
                let at = (b * hq + h) * d;
                let j = h / g;
                let o = attend(
                    &qd[at..at + d],
                    t,
                    |p| sees_decode(t, sink, local, p),
                    |p| &hist_k[b][p][j],
                    |p| &hist_v[b][p][j],
                    scale as f64,
                );
                want[at..at + d].copy_from_slice(&o);
            }
        }
        compare(
            &format!("{} decode step {s} (t = {lens:?})", case.name),
            &got,
            &want,
            dtype,
        );
    }
}

/// GQA groups of 3 with three different windows each, the rows of the batch 300, 37
/// (under the sink) and 130 tokens long; decode runs the 64-slot rings around twice.
#[test]
fn gqa3_d64_f16_ragged() {
    run(&Case {
        name: "cpu_gqa3_d64_f16_ragged",
        hq: 6,
        hkv: 2,
        d: 64,
        dtype: Dtype::F16,
        settings: Settings::default(),
        rules: vec![
            (0.0, 0.25),
            (8192.0, 0.0),
            (-1024.0, 0.0),
            (0.0, 0.5),
            (64.0, 0.125),
            (0.0, 1.0),
        ],
        prompt_lens: vec![300, 37, 130],
        max_new: 200,
        steps: 140,
    });
}

/// head_dim 128, bf16, groups of 4 (one dense head beside the minimum window), a row of
/// one token and one of exactly 64.
#[test]
fn gqa4_d128_bf16_ragged() {
    run(&Case {
        name: "cpu_gqa4_d128_bf16_ragged",
        hq: 8,
        hkv: 2,
        d: 128,
        dtype: Dtype::Bf16,
        settings: Settings::default(),
        rules: vec![
            (0.0, 1.0),
            (0.0, 0.0),
            (0.0, 0.375),
            (128.0, 0.125),
            (0.0, 0.25),
            (0.0, 0.25),
            (0.0, 0.25),
            (0.0, 0.25),
        ],
        prompt_lens: vec![200, 1, 64, 129],
        max_new: 120,
        steps: 90,
    });
}

/// A sink of 40 and windows in steps of 24 (neither a multiple of 64): sink blocks and
/// band edges fall inside blocks in both prefill modes and in decode.
#[test]
fn unaligned_sink_and_windows_d64_f16() {
    run(&Case {
        name: "cpu_unaligned_sink_d64_f16",
        hq: 4,
        hkv: 1,
        d: 64,
        dtype: Dtype::F16,
        settings: Settings {
            sink: 40,
            min_capacity: 72,
            granularity: 24,
            ..Settings::default()
        },
        rules: vec![(0.0, 0.2), (100.0, 0.0), (0.0, 0.45), (8192.0, 0.0)],
        prompt_lens: vec![250, 99, 5],
        max_new: 110,
        steps: 110,
    });
}

/// head_dim 96 (not a multiple of 64: the element-wise value update), bf16, MHA.
#[test]
fn mha_d96_bf16() {
    run(&Case {
        name: "cpu_mha_d96_bf16",
        hq: 2,
        hkv: 2,
        d: 96,
        dtype: Dtype::Bf16,
        settings: Settings::default(),
        rules: vec![(0.0, 0.3), (0.0, 0.0)],
        prompt_lens: vec![190, 70],
        max_new: 80,
        steps: 75,
    });
}

/// SmolLM2's shape (9 query heads over 3 KV heads, head_dim 64) with a long prompt: many
/// full blocks, bands that start mid-prompt, and windows narrower than the group's widest.
#[test]
fn smollm_shape_long_prompt_f16() {
    run(&Case {
        name: "cpu_smollm_shape_long_f16",
        hq: 9,
        hkv: 3,
        d: 64,
        dtype: Dtype::F16,
        settings: Settings::default(),
        rules: vec![
            (0.0, 0.5),
            (0.0, 0.125),
            (8192.0, 0.0),
            (0.0, 0.25),
            (0.0, 0.25),
            (0.0, 0.25),
            (-1024.0, 0.0),
            (1024.0, 0.0),
            (0.0, 0.75),
        ],
        prompt_lens: vec![1100, 451],
        max_new: 30,
        steps: 12,
    });
}

/// One row and one KV head with a window of 1100+ positions: decode cuts the positions
/// into parts and merges their softmaxes; head_dim 128, f16.
#[test]
fn one_kv_head_long_window_split_decode_d128_f16() {
    run(&Case {
        name: "cpu_split_decode_d128_f16",
        hq: 4,
        hkv: 1,
        d: 128,
        dtype: Dtype::F16,
        settings: Settings::default(),
        rules: vec![(8192.0, 0.0), (0.0, 0.25), (1024.0, 0.0), (-1024.0, 0.0)],
        prompt_lens: vec![1100],
        max_new: 40,
        steps: 10,
    });
}

/// A row's outputs are bit for bit the same alone and batched with other rows (prefill in
/// both modes, and decode steps over a window long enough to be cut into parts).
#[test]
fn a_row_gives_the_same_bits_alone_and_batched() {
    let mut rng = Rng::fresh("cpu_batch_invariance");
    let (hq, hkv, d, dtype) = (6, 2, 64, Dtype::F16);
    let rules = [
        (8192.0, 0.0),
        (0.0, 0.25),
        (0.0, 0.5),
        (0.0, 1.0),
        (-1024.0, 0.0),
        (0.0, 0.125),
    ];
    let model = ModelShape {
        num_layers: 1,
        num_query_heads: hq,
        num_kv_heads: hkv,
        head_dim: d,
    };
    let alphas = vec![rules.iter().map(|r| r.0).collect::<Vec<_>>()];
    let betas = vec![rules.iter().map(|r| r.1).collect::<Vec<_>>()];
    let plan = moac::plan::validate(
        "invariance".as_ref(),
        model,
        Settings::default(),
        &alphas,
        &betas,
    )
    .unwrap();
    let (p_, new) = (1200usize, 8usize);
    let geo = CacheGeometry::new(&plan, p_ as u64, new as u64).unwrap();
    let shape = LayerShape::new(&geo, 0);
    let scale = 1.0 / (d as f32).sqrt();
    let lens = [p_ as i32, 700, 3];
    let q: Vec<u16> = rng.bits(lens.len() * p_ * hq * d, dtype);
    let k: Vec<u16> = rng.bits(lens.len() * p_ * hkv * d, dtype);
    let v: Vec<u16> = rng.bits(lens.len() * p_ * hkv * d, dtype);
    let row0 = |x: &[u16], h: usize| x[..p_ * h * d].to_vec();
    let mut batched = CpuLayer::new(shape.clone(), dtype).unwrap();
    batched.new_cache(lens.len()).unwrap();
    let mut alone = CpuLayer::new(shape, dtype).unwrap();
    alone.new_cache(1).unwrap();
    let pb = Prompt {
        k: &k,
        v: &v,
        lens: &lens,
        p: p_,
    };
    let (k0, v0) = (row0(&k, hkv), row0(&v, hkv));
    let pa = Prompt {
        k: &k0,
        v: &v0,
        lens: &lens[..1],
        p: p_,
    };
    for mode in [PrefillMode::Block64, PrefillMode::Token] {
        let ob = batched.prefill(&q, &pb, mode, scale).unwrap();
        let oa = alone.prefill(&row0(&q, hq), &pa, mode, scale).unwrap();
        assert!(
            ob[..oa.len()]
                .iter()
                .zip(&oa)
                .all(|(x, y)| x.to_bits() == y.to_bits()),
            "prefill {mode:?}: row 0 differs alone and batched"
        );
    }
    batched.fill(&pb).unwrap();
    alone.fill(&pa).unwrap();
    for s in 0..new as i32 {
        let t: Vec<i32> = lens.iter().map(|&l| l + s + 1).collect();
        let qd = rng.bits(lens.len() * hq * d, dtype);
        let kd = rng.bits(lens.len() * hkv * d, dtype);
        let vd = rng.bits(lens.len() * hkv * d, dtype);
        batched.append(&kd, &vd, &t).unwrap();
        alone
            .append(&kd[..hkv * d], &vd[..hkv * d], &t[..1])
            .unwrap();
        let ob = batched.decode(&qd, &t, scale).unwrap();
        let oa = alone.decode(&qd[..hq * d], &t[..1], scale).unwrap();
        assert!(
            ob[..oa.len()]
                .iter()
                .zip(&oa)
                .all(|(x, y)| x.to_bits() == y.to_bits()),
            "decode step {s}: row 0 differs alone and batched"
        );
    }
}
