//! SmolLM2-135M end to end through moac (needs the model: `scripts/setup-model.sh`;
//! MOAC_REQUIRE_MODEL makes its absence a failure):
//! - dense (every span = N, f32 weights, f16 K/V in moac's cache) on cpu: the France
//!   prompt's top-5 next tokens equal the float32 reference's with logits within 0.05,
//!   greedy decoding answers "The capital of France is Paris.";
//! - moac dense against the plain dense reference attention ([`DenseReference`]), prefill
//!   and decode steps;
//! - a full-span plan gives the dense plan's logits;
//! - a batch of prompts of different lengths gives each row's logits alone;
//! - cpu and emu agree on logits under a MoA plan whose windows evict;
//! - decode-mode and prefill-mode perplexity of the dense model agree within 0.1%.
#![allow(clippy::unwrap_used)]

use moac::plan::Settings;
use moac_model::attention::{Attention, DenseReference, Engine};
use moac_model::eval::{perplexity, PplMode, PplOptions};
use moac_model::generate::{argmax, generate, log_softmax, GenerateOptions};
use moac_model::llama::uniform_plan;
use moac_model::weights::WeightMode;
use moac_model::Model;
use moac_runtime::{Artifact, Backend, PrefillMode, Runtime};
use std::path::{Path, PathBuf};

fn model_path() -> Option<PathBuf> {
    moac_test_support::smollm2()
}

/// The ChatML prompt "What is the capital of France?" with the default system turn.
const PROMPT: [u32; 37] = [
    1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
    19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531,
    198,
];

fn runtime(plan: &moac::ValidPlan, backend: Backend) -> Runtime {
    let art = Artifact::from_plan(plan, moac::Dtype::F16, None).unwrap();
    Runtime::new(art, backend).unwrap()
}

/// Logits [rows, vocab] of a prefill of `prompts` at each row's last position, then of
/// `steps` decode steps fed fixed tokens (every backend sees the same inputs, whatever
/// its logits).
fn run(model: &Model, attn: &mut dyn Attention, prompts: &[&[u32]], steps: usize) -> Vec<Vec<f32>> {
    let m = &model.llama;
    let h = m.prefill(attn, prompts).unwrap();
    let mut rows = Vec::new();
    for (r, p) in prompts.iter().enumerate() {
        let row = m
            .logits(&h.get(r).unwrap().get(p.len() - 1).unwrap())
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        rows.push(row);
    }
    for s in 0..steps {
        let pos: Vec<usize> = prompts.iter().map(|p| p.len() + s).collect();
        let tokens = vec![(1000 + 17 * s) as u32; prompts.len()];
        let h = m.decode(attn, &tokens, &pos).unwrap();
        rows.extend(m.logits(&h).unwrap().to_vec2::<f32>().unwrap());
    }
    rows
}

/// The first `n` tokens of the fixture text (real text: random ids make a model's
/// activations, and so its sensitivity to rounding, unlike anything it was trained on).
fn text_tokens(model: &Model, n: usize) -> Vec<u32> {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/text/lighthouses.txt"),
    )
    .unwrap();
    let mut t = model.prompt(&text).unwrap();
    t.truncate(n);
    assert_eq!(t.len(), n);
    t
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

#[test]
fn smollm2_dense_answers_paris() {
    let Some(path) = model_path() else { return };
    let model = Model::load(&path, WeightMode::F32).unwrap();
    let c = model.llama.config;
    assert_eq!(
        (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim),
        (30, 9, 3, 64)
    );
    // The chat template from the GGUF metadata gives the golden prompt.
    let prompt = model
        .chat_prompt("What is the capital of France?", "")
        .unwrap();
    assert_eq!(prompt, PROMPT);
    let rt = runtime(
        &model.llama.dense_plan(Path::new("dense")).unwrap(),
        Backend::Cpu,
    );
    let engine = Engine::Moac {
        runtime: &rt,
        mode: PrefillMode::Block64,
    };
    let new_tokens = 8;
    let mut attn = engine.open(1, PROMPT.len(), new_tokens).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: new_tokens,
        stop: model.tokenizer.stop.clone(),
        top_logprobs: 5,
        ..GenerateOptions::default()
    };
    let out = generate(
        &model.llama,
        attn.as_mut(),
        &[&PROMPT],
        &opts,
        &mut |_, _| {},
    )
    .unwrap();
    let row = &out.rows[0];
    let first = &row.top_logprobs[0];
    eprintln!("top-5 log-probabilities at the last prompt position: {first:?}");
    // The float32 reference (shared notes): ids and logits. Logits are compared through
    // log-probabilities: logit differences between ids are differences of log-probs.
    let want = [
        (504u32, 25.325f32),
        (60, 25.243),
        (15319, 24.942),
        (2219, 24.402),
        (7026, 24.315),
    ];
    let mut got_ids: Vec<u32> = first.iter().map(|t| t.0).collect();
    let mut want_ids: Vec<u32> = want.iter().map(|w| w.0).collect();
    got_ids.sort_unstable();
    want_ids.sort_unstable();
    assert_eq!(got_ids, want_ids, "top-5 set");
    let lp = |id: u32| first.iter().find(|t| t.0 == id).unwrap().1;
    for &(id, logit) in &want[1..] {
        let (got, want) = (lp(id) - lp(504), logit - want[0].1);
        assert!(
            (got - want).abs() < 0.05,
            "logit of {id} relative to 504: {got} vs {want}"
        );
    }
    // Absolute logits too (the LM head of the last position).
    let mut attn = engine.open(1, PROMPT.len(), 0).unwrap();
    let logits = &run(&model, attn.as_mut(), &[&PROMPT], 0)[0];
    for (id, logit) in want {
        assert!(
            (logits[id as usize] - logit).abs() < 0.05,
            "logit of {id}: {} vs {logit}",
            logits[id as usize]
        );
    }
    eprintln!("greedy: {:?}", row.tokens);
    // "The capital of France is Paris." then <|im_end|> (7042 = " Paris").
    assert_eq!(row.tokens, [504, 3575, 282, 4649, 314, 7042, 30, 2]);
    assert!(row.stopped);
    let text = model.tokenizer.decode(&row.tokens, false).unwrap();
    assert_eq!(text, "The capital of France is Paris.");
}

#[test]
fn moac_dense_matches_the_plain_reference() {
    let Some(path) = model_path() else { return };
    let model = Model::load(&path, WeightMode::F32).unwrap();
    let rt = runtime(
        &model.llama.dense_plan(Path::new("dense")).unwrap(),
        Backend::Cpu,
    );
    let steps = 6;
    let mut moac = Engine::Moac {
        runtime: &rt,
        mode: PrefillMode::Block64,
    }
    .open(1, PROMPT.len(), steps)
    .unwrap();
    let mut reference = DenseReference::new(1, PROMPT.len() + steps);
    let a = run(&model, moac.as_mut(), &[&PROMPT], steps);
    let b = run(&model, &mut reference, &[&PROMPT], steps);
    let d = max_diff(&a, &b);
    eprintln!("moac dense (f16 K/V) vs plain f32 reference: max |logit diff| {d}");
    // f16 rounding of K and V moves logits by a few hundredths at most here.
    assert!(d < 0.1, "max logit difference {d}");
}

#[test]
fn full_span_plan_gives_the_dense_logits() {
    let Some(path) = model_path() else { return };
    let model = Model::load(&path, WeightMode::F32).unwrap();
    let shape = model.llama.config.shape();
    let full = uniform_plan(Path::new("full"), shape, 0.0, 1.0, Settings::default()).unwrap();
    let dense = model.llama.dense_plan(Path::new("dense")).unwrap();
    let prompt: Vec<u32> = (0..200).map(|i| (i * 37 % 4000 + 100) as u32).collect();
    let steps = 3;
    let mut out = Vec::new();
    for plan in [&full, &dense] {
        let rt = runtime(plan, Backend::Cpu);
        let engine = Engine::Moac {
            runtime: &rt,
            mode: PrefillMode::Block64,
        };
        let mut attn = engine.open(1, prompt.len(), steps).unwrap();
        out.push(run(&model, attn.as_mut(), &[&prompt], steps));
    }
    assert_eq!(max_diff(&out[0], &out[1]), 0.0, "full-span plan vs dense");
}

#[test]
fn a_ragged_batch_gives_each_rows_logits() {
    let Some(path) = model_path() else { return };
    let model = Model::load(&path, WeightMode::Q8).unwrap();
    let plan = uniform_plan(
        Path::new("half"),
        model.llama.config.shape(),
        0.0,
        0.5,
        Settings::default(),
    )
    .unwrap();
    let rt = runtime(&plan, Backend::Cpu);
    let engine = Engine::Moac {
        runtime: &rt,
        mode: PrefillMode::Block64,
    };
    let long: Vec<u32> = (0..300).map(|i| (i * 53 % 9000 + 200) as u32).collect();
    let short = &PROMPT[..];
    let steps = 3;
    // N is the batch's: the longest prompt + steps; alone, each row gets the same N.
    let n_new = long.len() + steps - short.len();
    let mut batch = engine.open(2, long.len(), steps).unwrap();
    let both = run(&model, batch.as_mut(), &[&long, short], steps);
    let mut a = engine.open(1, long.len(), steps).unwrap();
    let alone_long = run(&model, a.as_mut(), &[&long], steps);
    let mut b = engine.open(1, short.len(), n_new).unwrap();
    let alone_short = run(&model, b.as_mut(), &[short], steps);
    let rows = |v: &[Vec<f32>], r: usize| -> Vec<Vec<f32>> {
        v.iter().skip(r).step_by(2).cloned().collect()
    };
    let d0 = max_diff(&rows(&both, 0), &alone_long);
    let d1 = max_diff(&rows(&both, 1), &alone_short);
    eprintln!("batch vs alone: {d0} {d1}");
    // Quantized matmuls compute each row on its own (8-bit activations, one dot product
    // per output), and attention is per row: a row's numbers do not depend on the batch
    // around it, to the bit. (f32 weights would not show this: the f32 matmul blocks
    // rows differently for 600 rows than for 300, and one-ulp differences follow.)
    assert!(d0 == 0.0 && d1 == 0.0, "{d0} {d1}");
}

/// A plan whose heads differ within each GQA group and whose windows evict on a prompt
/// of a few hundred tokens (capacities 128 to 320).
fn evicting_plan(model: &Model) -> moac::ValidPlan {
    let shape = model.llama.config.shape();
    let alphas: Vec<Vec<f64>> = (0..shape.num_layers)
        .map(|l| {
            (0..shape.num_query_heads)
                .map(|h| [0.0, 16.0, 40.0][(l + h) % 3])
                .collect()
        })
        .collect();
    let betas: Vec<Vec<f64>> = (0..shape.num_layers)
        .map(|l| {
            (0..shape.num_query_heads)
                .map(|h| [0.25, 0.5, 0.75, 1.0][(l * 7 + h) % 4])
                .collect()
        })
        .collect();
    moac::plan::validate(
        Path::new("evicting"),
        shape,
        Settings::default(),
        &alphas,
        &betas,
    )
    .unwrap()
}

#[test]
fn cpu_and_emu_agree_under_a_moa_plan() {
    let Some(path) = model_path() else { return };
    let model = Model::load(&path, WeightMode::F32).unwrap();
    let plan = evicting_plan(&model);
    let prompt = text_tokens(&model, 300);
    let steps = 4;
    let mut out = Vec::new();
    for backend in [Backend::Cpu, Backend::Emu] {
        let rt = runtime(&plan, backend);
        for mode in [PrefillMode::Block64, PrefillMode::Token] {
            let engine = Engine::Moac { runtime: &rt, mode };
            let mut attn = engine.open(1, prompt.len(), steps).unwrap();
            out.push(run(&model, attn.as_mut(), &[&prompt], steps));
        }
    }
    let (block, token) = (max_diff(&out[0], &out[2]), max_diff(&out[1], &out[3]));
    eprintln!("cpu vs emu: block64 {block}, token {token}");
    // Each layer's attention agrees to one f16 ulp (the kernels and the cpu backend sum
    // in different orders); through 30 layers that moves logits by about 0.01
    // (measured 0.008 / 0.009). f32 weights: candle's quantized matmul would round the
    // activations to 8 bits, where a one-ulp change can cross a rounding step.
    assert!(block < 0.03 && token < 0.03, "{block} {token}");
    // The plan really is sparse here: it changes the logits against dense.
    let rt = runtime(
        &model.llama.dense_plan(Path::new("d")).unwrap(),
        Backend::Cpu,
    );
    let mut attn = Engine::Moac {
        runtime: &rt,
        mode: PrefillMode::Token,
    }
    .open(1, prompt.len(), steps)
    .unwrap();
    let dense = run(&model, attn.as_mut(), &[&prompt], steps);
    assert!(max_diff(&out[1], &dense) > 0.1, "the plan evicted nothing");
}

#[test]
fn decode_and_prefill_perplexity_agree_dense() {
    let Some(path) = model_path() else { return };
    let model = Model::load(&path, WeightMode::F32).unwrap();
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/text/lighthouses.txt"),
    )
    .unwrap();
    let tokens = model.prompt(&text).unwrap();
    let rt = runtime(
        &model.llama.dense_plan(Path::new("d")).unwrap(),
        Backend::Cpu,
    );
    let engine = Engine::Moac {
        runtime: &rt,
        mode: PrefillMode::Block64,
    };
    let mut r = Vec::new();
    for mode in [PplMode::Prefill, PplMode::Decode] {
        let opts = PplOptions {
            max_windows: Some(2),
            ..PplOptions::new(256, mode)
        };
        r.push(perplexity(&model.llama, engine, &tokens, &opts, &mut |_, _| {}).unwrap());
    }
    eprintln!("prefill {:?}\ndecode {:?}", r[0], r[1]);
    assert_eq!(r[0].tokens, 2 * 255);
    assert_eq!(r[0].tokens, r[1].tokens);
    // A real text: a small model's perplexity is in the tens, not near 1 or the vocab.
    assert!(r[0].ppl > 2.0 && r[0].ppl < 100.0, "{}", r[0].ppl);
    let rel = (r[0].ppl - r[1].ppl).abs() / r[0].ppl;
    assert!(
        rel < 1e-3,
        "prefill {} vs decode {} ({rel})",
        r[0].ppl,
        r[1].ppl
    );
}

#[test]
fn quantized_products_answer_paris_and_track_the_f32_logits() {
    let Some(path) = model_path() else { return };
    let native = Model::load(&path, WeightMode::Native).unwrap();
    let f32w = Model::load(&path, WeightMode::F32).unwrap();
    let rt = runtime(
        &native.llama.dense_plan(Path::new("dense")).unwrap(),
        Backend::Cpu,
    );
    let engine = Engine::Moac {
        runtime: &rt,
        mode: PrefillMode::Block64,
    };
    let new_tokens = 8;
    let mut attn = engine.open(1, PROMPT.len(), new_tokens).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: new_tokens,
        stop: native.tokenizer.stop.clone(),
        ..GenerateOptions::default()
    };
    let out = generate(
        &native.llama,
        attn.as_mut(),
        &[&PROMPT],
        &opts,
        &mut |_, _| {},
    )
    .unwrap();
    // The golden greedy answer of the f32 forward (model notes), decode steps through
    // the 8-bit-activation products.
    assert_eq!(out.rows[0].tokens, [504, 3575, 282, 4649, 314, 7042, 30, 2]);
    // Teacher-forced through the answer: the prompt's logits, then a decode step per
    // answer token, both models fed the same tokens.
    let answer = [504u32, 3575, 282, 4649, 314, 7042, 30];
    let forced = |model: &Model| -> Vec<Vec<f32>> {
        let mut attn = engine.open(1, PROMPT.len(), answer.len()).unwrap();
        let m = &model.llama;
        let h = m.prefill(attn.as_mut(), &[&PROMPT]).unwrap();
        let last = h.get(0).unwrap().get(PROMPT.len() - 1).unwrap();
        let mut rows = vec![m.logits(&last).unwrap().to_vec1::<f32>().unwrap()];
        for (i, &id) in answer.iter().enumerate() {
            let h = m.decode(attn.as_mut(), &[id], &[PROMPT.len() + i]).unwrap();
            rows.extend(m.logits(&h).unwrap().to_vec2::<f32>().unwrap());
        }
        rows
    };
    let (q, f) = (forced(&native), forced(&f32w));
    // The prompt (37 rows) runs the dequantized f32 products; the LM head rounds its
    // one input row to 16-bit blocks (1/65534 of a block's largest value: for hidden
    // values up to about 20 and LM-head weights of about 0.05 over 576 features, at
    // most about 0.01 on a logit).
    let d0 = max_diff(&q[..1], &f[..1]);
    let d = max_diff(&q[1..], &f[1..]);
    eprintln!("quantized vs f32 products: prefill max |logit diff| {d0}, decode steps {d}");
    assert!(d0 < 1e-2, "prefill logits moved by {d0}");
    assert!(d > 0.0, "the decode steps did not run the 8-bit products");
    // What the rounding of the activations to 8 bits costs on real text, step by step:
    // the KL divergence of the next-token distribution from the f32 products', and the
    // next answer token still on top.
    for (s, (qs, fs)) in q.iter().zip(&f).enumerate().skip(1) {
        let (lq, lf) = (log_softmax(qs), log_softmax(fs));
        let kl: f64 = lf.iter().zip(&lq).map(|(a, b)| a.exp() * (a - b)).sum();
        eprintln!("step {s}: KL(f32 || quantized) = {kl:.2e} nats");
        assert!(kl < 1e-2, "step {s}: KL {kl}");
        let golden = [504u32, 3575, 282, 4649, 314, 7042, 30, 2];
        assert_eq!(argmax(qs), golden[s], "step {s}: top token");
    }
}
