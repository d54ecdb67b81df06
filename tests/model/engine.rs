//! The device engine on emu (the engine's own CUDA source, ops and attention, run on the
//! CPU, with the CPU GEMM) against the host runner on the cpu backend, on the same
//! random weights (every value an f16/bf16 number), under a MoA plan whose windows
//! evict, for a batch of prompts of different lengths (one shorter than the sink),
//! prefill and every decode step until the longest row holds N tokens, f16 and bf16,
//! both RoPE pairings; device-generated weights equal host-generated ones bit for bit;
//! finished rows leave the batch and the rest decode on unchanged; device sampling
//! (greedy and nucleus) picks what it must; bad calls are refused.
#![allow(clippy::unwrap_used)]

use moac::geometry::Dtype;
use moac::plan::Settings;
use moac_model::attention::Engine;
use moac_model::engine::{seeded_llama, DeviceEngine, DeviceSampling};
use moac_model::llama::{Llama, LlamaConfig, RopeStyle};
use moac_runtime::backend::emu::EmuOptions;
use moac_runtime::gpu::Gpu;
use moac_runtime::{Artifact, Backend, PrefillMode, Runtime};
use std::path::Path;
use std::sync::Arc;

const FF: usize = 96;

fn config(rope: RopeStyle) -> LlamaConfig {
    config_d(rope, 64)
}

fn config_d(rope: RopeStyle, head_dim: usize) -> LlamaConfig {
    LlamaConfig {
        num_layers: 2,
        hidden: 96,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim,
        vocab_size: 300,
        rope_theta: 10000.0,
        rms_eps: 1e-5,
        context_len: 1024,
        rope,
    }
}

/// Windows that differ within each KV head's group and evict at N = 240: capacities
/// 128 (sink 64 + a ring of 64), the whole sequence, 128 + ~24, and the whole sequence
/// again.
fn plan(c: &LlamaConfig) -> moac::ValidPlan {
    let alphas = vec![vec![100.0, 1e9, 130.0, 1e9]; c.num_layers];
    let betas = vec![vec![0.0, 0.0, 0.1, 0.0]; c.num_layers];
    moac::plan::validate(
        Path::new("engine-test"),
        c.shape(),
        Settings::default(),
        &alphas,
        &betas,
    )
    .unwrap()
}

fn gpu() -> Arc<Gpu> {
    Gpu::open(Backend::Emu, EmuOptions::default()).unwrap()
}

fn prompts() -> Vec<Vec<u32>> {
    [200usize, 17, 150]
        .iter()
        .enumerate()
        .map(|(r, &n)| {
            (0..n)
                .map(|i| ((i * 37 + r * 101 + 5) % 300) as u32)
                .collect()
        })
        .collect()
}

/// The host runner's logits at each row's last prompt position.
fn host_prefill(
    m: &Llama,
    attn: &mut dyn moac_model::attention::Attention,
    p: &[&[u32]],
) -> Vec<Vec<f32>> {
    let h = m.prefill(attn, p).unwrap();
    p.iter()
        .enumerate()
        .map(|(r, row)| {
            m.logits(&h.get(r).unwrap().get(row.len() - 1).unwrap())
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect()
}

/// max |a - b| over a row, relative to the row's largest |b|.
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
        / scale
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// The engine against the host runner, prefill then decode until the longest row is
/// full; the tokens fed are the engine's own greedy picks (the host runner is fed the
/// same). `tol`: the bound on the logit error relative to the row's largest logit, from
/// the dtype's rounding of the GEMM inputs and the attention output (the host runner
/// keeps activations in f32; the engine rounds them to the dtype, as cuBLAS needs): 8
/// units in the last place of the dtype (measured: f16 about 4.7, bf16 about 3.5). A
/// RoPE position off by one gives 0.3, one RMSNorm weight ignored 0.08.
fn engine_matches_host(dtype: Dtype, rope: RopeStyle, head_dim: usize, tol: f32) {
    let c = config_d(rope, head_dim);
    let seed = 7;
    let host = seeded_llama(c, FF, seed, dtype).unwrap();
    let plan = plan(&c);
    let art = Artifact::from_plan(&plan, dtype, None).unwrap();
    let eng = DeviceEngine::seeded(gpu(), c, FF, seed, art.clone(), PrefillMode::Block64).unwrap();
    let rt = Runtime::new(art, Backend::Cpu).unwrap();
    let ps = prompts();
    let p: Vec<&[u32]> = ps.iter().map(|v| v.as_slice()).collect();
    let max_new = 40;
    let mut attn = Engine::Moac {
        runtime: &rt,
        mode: PrefillMode::Block64,
    }
    .open(p.len(), 200, max_new)
    .unwrap();
    let mut s = eng.start(&p, max_new).unwrap();
    assert_eq!(s.n(), 240);
    let want = host_prefill(&host, attn.as_mut(), &p);
    let got = eng.logits(&s).unwrap();
    let v = c.vocab_size;
    let mut worst = 0f32;
    for (r, w) in want.iter().enumerate() {
        let e = rel_err(&got[r * v..(r + 1) * v], w);
        worst = worst.max(e);
        assert!(e < tol, "{dtype} prefill row {r}: relative error {e}");
    }
    let mut pos: Vec<usize> = p.iter().map(|r| r.len()).collect();
    for step in 0..max_new {
        let logits = eng.logits(&s).unwrap();
        let tokens = eng.sample(&mut s, DeviceSampling::Greedy).unwrap();
        for (r, &t) in tokens.iter().enumerate() {
            assert_eq!(
                t,
                argmax(&logits[r * v..(r + 1) * v]),
                "device argmax, row {r}"
            );
        }
        eng.step(&mut s, None).unwrap();
        let h = host.decode(attn.as_mut(), &tokens, &pos).unwrap();
        let want = host.logits(&h).unwrap().to_vec2::<f32>().unwrap();
        let got = eng.logits(&s).unwrap();
        for (r, w) in want.iter().enumerate() {
            let e = rel_err(&got[r * v..(r + 1) * v], w);
            worst = worst.max(e);
            assert!(e < tol, "{dtype} step {step} row {r}: relative error {e}");
        }
        for x in pos.iter_mut() {
            *x += 1;
        }
    }
    assert_eq!(s.lens()[0], 240, "the longest row is full (t == N)");
    eprintln!("{dtype} {rope:?}: worst relative logit error {worst:.2e} (bound {tol:.0e})");
    let err = eng.step(&mut s, None).unwrap_err().to_string();
    assert!(err.contains("240"), "{err}");
}

#[test]
fn engine_matches_host_runner_f16_d64() {
    engine_matches_host(Dtype::F16, RopeStyle::HalfSplit, 64, 4e-3);
}

#[test]
fn engine_matches_host_runner_bf16_interleaved_d128() {
    engine_matches_host(Dtype::Bf16, RopeStyle::Interleaved, 128, 3e-2);
}

/// Weights generated on the device are the host's: an engine built from the host model
/// gives bit-identical logits.
#[test]
fn device_seeded_weights_equal_host_seeded() {
    let c = config(RopeStyle::HalfSplit);
    let dtype = Dtype::Bf16;
    let art = Artifact::from_plan(&plan(&c), dtype, None).unwrap();
    let g = gpu();
    let a = DeviceEngine::seeded(g.clone(), c, FF, 3, art.clone(), PrefillMode::Token).unwrap();
    let host = seeded_llama(c, FF, 3, dtype).unwrap();
    let b = DeviceEngine::new(g, &host, art, PrefillMode::Token).unwrap();
    let p: [&[u32]; 2] = [&[1, 2, 3, 4, 5], &[9, 8]];
    let (mut sa, mut sb) = (a.start(&p, 4).unwrap(), b.start(&p, 4).unwrap());
    assert_eq!(a.logits(&sa).unwrap(), b.logits(&sb).unwrap());
    a.step(&mut sa, Some(&[7, 7])).unwrap();
    b.step(&mut sb, Some(&[7, 7])).unwrap();
    let (la, lb) = (a.logits(&sa).unwrap(), b.logits(&sb).unwrap());
    assert_eq!(la, lb);
    assert!(la.iter().all(|x| x.is_finite()));
    let other = seeded_llama(c, FF, 4, dtype).unwrap();
    let e = DeviceEngine::new(
        a.gpu().clone(),
        &other,
        Artifact::from_plan(&plan(&c), dtype, None).unwrap(),
        PrefillMode::Token,
    )
    .unwrap();
    let mut so = e.start(&p, 4).unwrap();
    e.step(&mut so, Some(&[7, 7])).unwrap();
    assert_ne!(e.logits(&so).unwrap(), la, "another seed, other weights");
}

/// A row that leaves the batch stops costing work, and the rows left decode exactly as
/// they would have.
#[test]
fn retired_rows_leave_the_others_unchanged() {
    let c = config(RopeStyle::HalfSplit);
    let dtype = Dtype::F16;
    let art = Artifact::from_plan(&plan(&c), dtype, None).unwrap();
    let eng = DeviceEngine::seeded(gpu(), c, FF, 11, art, PrefillMode::Block64).unwrap();
    let ps = prompts();
    let p: Vec<&[u32]> = ps.iter().map(|v| v.as_slice()).collect();
    let v = c.vocab_size;
    let mut all = eng.start(&p, 12).unwrap();
    let mut some = eng.start(&p, 12).unwrap();
    for step in 0..12u32 {
        if step == 3 {
            eng.retain(&mut some, |seq| seq != 1).unwrap();
            assert_eq!(some.seq_ids(), &[0, 2]);
            assert_eq!(some.rows(), 2);
        }
        let t = [step + 5, step + 6, step + 7];
        eng.step(&mut all, Some(&t)).unwrap();
        let kept: Vec<u32> = some.seq_ids().iter().map(|&i| t[i]).collect();
        eng.step(&mut some, Some(&kept)).unwrap();
        let (la, ls) = (eng.logits(&all).unwrap(), eng.logits(&some).unwrap());
        for (row, &seq) in some.seq_ids().iter().enumerate() {
            assert_eq!(
                &ls[row * v..(row + 1) * v],
                &la[seq * v..(seq + 1) * v],
                "step {step} seq {seq}"
            );
        }
    }
    assert_eq!(some.lens(), &[212, 162]);
    eng.retain(&mut some, |_| false).unwrap();
    assert!(eng
        .step(&mut some, None)
        .unwrap_err()
        .to_string()
        .contains("finished"));
}

/// Nucleus sampling on the device: a tiny top_p is greedy; otherwise every pick lies in
/// the nucleus computed on the host from the same logits, and different sequences draw
/// different tokens.
#[test]
fn device_sampling_stays_in_the_nucleus() {
    let c = config(RopeStyle::HalfSplit);
    let dtype = Dtype::F16;
    let art = Artifact::from_plan(&plan(&c), dtype, None).unwrap();
    let eng = DeviceEngine::seeded(gpu(), c, FF, 5, art, PrefillMode::Block64).unwrap();
    let prompt: Vec<u32> = (0..20).collect();
    let p: Vec<&[u32]> = vec![&prompt; 8];
    let mut s = eng.start(&p, 2).unwrap();
    let v = c.vocab_size;
    let logits = eng.logits(&s).unwrap();
    let greedy = eng.sample(&mut s, DeviceSampling::Greedy).unwrap();
    let tiny = DeviceSampling::TopP {
        temperature: 0.7,
        top_p: 1e-6,
        seed: 1,
    };
    assert_eq!(eng.sample(&mut s, tiny).unwrap(), greedy);
    let (temperature, top_p) = (1.3f32, 0.8f32);
    let picked = eng
        .sample(
            &mut s,
            DeviceSampling::TopP {
                temperature,
                top_p,
                seed: 42,
            },
        )
        .unwrap();
    for (r, &t) in picked.iter().enumerate() {
        let row = &logits[r * v..(r + 1) * v];
        let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let z: f64 = row
            .iter()
            .map(|&x| (((x - m) / temperature) as f64).exp())
            .sum();
        let mut probs: Vec<f64> = row
            .iter()
            .map(|&x| (((x - m) / temperature) as f64).exp() / z)
            .collect();
        let pt = probs[t as usize];
        probs.sort_by(|a, b| b.partial_cmp(a).unwrap());
        // The nucleus: the most likely tokens until top_p is reached (f32 rounding on the
        // device may add the next one).
        let mut acc = 0.0;
        let mut k = 0;
        while acc < top_p as f64 {
            acc += probs[k];
            k += 1;
        }
        let threshold = probs[(k).min(probs.len() - 1)];
        assert!(
            pt >= threshold * 0.999,
            "row {r}: token {t} (p {pt}) outside the nucleus of {k}"
        );
    }
    let distinct: std::collections::BTreeSet<u32> = picked.iter().copied().collect();
    assert!(distinct.len() > 1, "8 sequences drew one token: {picked:?}");
    assert!(eng
        .sample(
            &mut s,
            DeviceSampling::TopP {
                temperature: 0.0,
                top_p: 0.5,
                seed: 0
            }
        )
        .is_err());
}

/// The memory estimate that refuses sessions too large for the GPU covers what a
/// session really allocates (and is not wildly above it).
#[test]
fn session_bytes_cover_what_sessions_allocate() {
    let c = config(RopeStyle::HalfSplit);
    for dtype in Dtype::ALL {
        let art = Artifact::from_plan(&plan(&c), dtype, None).unwrap();
        let eng = DeviceEngine::seeded(gpu(), c, FF, 2, art, PrefillMode::Block64).unwrap();
        for (batch, context) in [(1, 100), (3, 700), (8, 1000)] {
            let s = eng.synthetic(batch, context, 24, 1).unwrap();
            let est = eng.session_bytes(batch, context, 24, false).unwrap();
            let real = s.device_bytes();
            assert!(
                est >= real,
                "{dtype} b{batch} c{context}: estimate {est} < {real}"
            );
            assert!(
                est <= 2 * real,
                "{dtype} b{batch} c{context}: estimate {est} >> {real}"
            );
        }
    }
}

#[test]
fn bad_calls_are_refused() {
    let c = config(RopeStyle::HalfSplit);
    let art = Artifact::from_plan(&plan(&c), Dtype::F16, None).unwrap();
    let eng = DeviceEngine::seeded(gpu(), c, FF, 1, art, PrefillMode::Block64).unwrap();
    let empty: [&[u32]; 2] = [&[1, 2], &[]];
    let e = eng.start(&empty, 4).err().unwrap().to_string();
    assert!(e.contains("prompt 1 is empty"), "{e}");
    let e = eng.start(&[&[1u32, 300][..]], 4).err().unwrap().to_string();
    assert!(e.contains("300"), "{e}");
    let e = eng
        .start(&[&[1u32; 1000][..]], 100)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("1100"), "{e}");
    let mut s = eng.start(&[&[1u32, 2, 3][..]], 4).unwrap();
    assert!(eng.step(&mut s, Some(&[1, 2])).is_err());
    assert!(eng.step(&mut s, Some(&[999])).is_err());
    // Layers missing from the artifact.
    let part = Artifact::from_plan(&plan(&c), Dtype::F16, Some(vec![0])).unwrap();
    let e = DeviceEngine::seeded(gpu(), c, FF, 1, part, PrefillMode::Block64)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("every layer"), "{e}");
    // No cpu device engine.
    assert!(Gpu::open(Backend::Cpu, EmuOptions::default()).is_err());
}

/// The ops compile with NVRTC for the GPU (the emu tests run the same source); skipped
/// without NVRTC unless MOAC_REQUIRE_NVRTC is set.
#[test]
fn ops_compile_with_nvrtc() {
    if moac::jit::nvrtc::load().is_err() {
        assert!(
            std::env::var_os("MOAC_REQUIRE_NVRTC").is_none(),
            "NVRTC is required"
        );
        eprintln!("skipped: no NVRTC");
        return;
    }
    for dtype in Dtype::ALL {
        let shape = moac::ops::OpsShape {
            dtype,
            hidden: 4096,
            num_query_heads: 32,
            num_kv_heads: 8,
            head_dim: 128,
            intermediate: 14336,
            vocab: 128256,
            rope_theta: 500000.0,
            rope: moac::ops::RopePairs::HalfSplit,
            rms_eps: 1e-5,
        };
        let unit = moac::ops::emit(&shape).unwrap();
        let cubin =
            moac_runtime::backend::cuda::module::nvrtc_cubin(&unit.name, &unit.source, "sm_90")
                .unwrap();
        assert!(cubin.starts_with(b"\x7fELF"));
    }
}

/// SmolLM2-135M (GGUF: interleaved RoPE, 9 query heads over 3 KV heads, 30 layers, tied
/// embeddings) on the device engine on emu: the France prompt's next-token logits agree
/// with the host runner's (f32 weights; the engine rounds weights and activations to f16:
/// within 1% of the largest logit, measured 0.16%) with the same top 5, and greedy decoding gives the host's
/// tokens ("The capital of France is Paris."). Needs the model (scripts/setup-model.sh).
#[test]
fn smollm2_on_the_device_engine() {
    let Some(path) = moac_test_support::smollm2() else {
        return;
    };
    let model = moac_model::Model::load(&path, moac_model::weights::WeightMode::F32).unwrap();
    let prompt = model
        .chat_prompt("What is the capital of France?", "")
        .unwrap();
    let plan = model.llama.dense_plan(Path::new("dense")).unwrap();
    let art = Artifact::from_plan(&plan, Dtype::F16, None).unwrap();
    let eng = DeviceEngine::new(gpu(), &model.llama, art.clone(), PrefillMode::Block64).unwrap();
    let rt = Runtime::new(art, Backend::Cpu).unwrap();
    let new = 8;
    let mut attn = Engine::Moac {
        runtime: &rt,
        mode: PrefillMode::Block64,
    }
    .open(1, prompt.len(), new)
    .unwrap();
    let p = [prompt.as_slice()];
    let mut s = eng.start(&p, new).unwrap();
    let want = host_prefill(&model.llama, attn.as_mut(), &p).remove(0);
    let got = eng.logits(&s).unwrap();
    let e = rel_err(&got, &want);
    eprintln!("SmolLM2 prefill: device engine vs host runner {e:.2e} of the largest logit");
    assert!(e < 0.01, "prefill logits differ by {e} of the largest");
    let top = |v: &[f32]| {
        let mut i: Vec<usize> = (0..v.len()).collect();
        i.sort_by(|&a, &b| v[b].partial_cmp(&v[a]).unwrap());
        i.truncate(5);
        i
    };
    assert_eq!(top(&got), top(&want));
    let mut tokens = Vec::new();
    let mut host_tokens = Vec::new();
    let mut host_next = argmax(&want);
    for step in 0..new {
        let t = eng.sample(&mut s, DeviceSampling::Greedy).unwrap()[0];
        tokens.push(t);
        host_tokens.push(host_next);
        if step + 1 == new {
            break;
        }
        eng.step(&mut s, None).unwrap();
        let pos = prompt.len() + step;
        let h = model
            .llama
            .decode(attn.as_mut(), &[host_next], &[pos])
            .unwrap();
        host_next = argmax(&model.llama.logits(&h).unwrap().to_vec2::<f32>().unwrap()[0]);
    }
    assert_eq!(tokens, host_tokens);
    let text = model.tokenizer.decode(&tokens, false).unwrap();
    assert!(
        text.starts_with("The capital of France is Paris"),
        "{text:?}"
    );
}
