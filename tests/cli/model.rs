//! The real-model commands on SmolLM2-135M (needs `scripts/setup-model.sh`):
//! `moac generate` answers the France question dense and with a 50% uniform plan, its
//! JSON carries ids, text, timings, KV bytes and top log-probabilities, sampling is
//! reproducible from its seed; `moac eval perplexity` agrees between prefill and decode
//! modes for dense; `moac eval retrieval` reports dense next to a plan and draws the
//! plot; `moac plan uniform` and `--config` take a GGUF; bad input fails cleanly.
#![allow(clippy::unwrap_used)]

use moac_test_support::*;
use std::path::Path;

const QUESTION: &str = "What is the capital of France?";

fn json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_str(ok(out).trim()).unwrap()
}

#[test]
fn generate_answers_paris_dense_and_with_a_half_density_plan() {
    let Some(m) = smollm2() else { return };
    let m = m.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let plan = tmp.path().join("uniform50.moac.json");
    let plan = plan.to_str().unwrap();
    ok(&moac!(&[
        "plan", "uniform", "--config", m, "--alpha", "0", "--beta", "0.5", "-o", plan
    ]));
    let text: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(plan).unwrap()).unwrap();
    assert_eq!(text["model"]["num_layers"], 30);
    assert_eq!(text["betas"][29][8], 0.5);
    for attention in [&["--dense"][..], &["--plan", plan][..]] {
        let mut args = vec!["generate", "--model", m, "--chat", "--prompt", QUESTION];
        args.extend_from_slice(attention);
        let out = moac!(&args);
        let answer = ok(&out);
        eprintln!("{attention:?}: {answer}");
        assert!(answer.contains("Paris"), "{attention:?}: {answer}");
        let e = stderr(&out);
        assert!(e.contains("tokens/s") && e.contains("KV cache"), "{e}");
    }
}

#[test]
fn generate_json_reports_ids_logprobs_and_sizes() {
    let Some(m) = smollm2() else { return };
    let m = m.to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            m,
            "--dense",
            "--chat",
            "--prompt",
            QUESTION,
            "--json",
            "--max-new-tokens",
            "6",
        ];
        args.extend_from_slice(extra);
        json(&moac!(&args))
    };
    let j = run(&["--top-logprobs", "3"]);
    assert_eq!(j["prompt_tokens"].as_array().unwrap().len(), 37);
    let tokens = j["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 6);
    assert_eq!(tokens[0], 504);
    assert!(j["text"]
        .as_str()
        .unwrap()
        .starts_with("The capital of France"));
    let top = j["top_logprobs"].as_array().unwrap();
    assert_eq!(top.len(), 6);
    for (step, t) in top.iter().zip(tokens) {
        let pairs = step.as_array().unwrap();
        assert_eq!(pairs.len(), 3);
        // Greedy: the chosen id is the most likely, log-probabilities descend, all < 0.
        assert_eq!(&pairs[0][0], t);
        let lp: Vec<f64> = pairs.iter().map(|p| p[1].as_f64().unwrap()).collect();
        assert!(
            lp.windows(2).all(|w| w[0] >= w[1]) && lp[0] <= 0.0,
            "{lp:?}"
        );
    }
    assert!(j["prefill_s"].as_f64().unwrap() > 0.0);
    assert!(j["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    // Dense at N = 37 + 6: every head's capacity is the 128 minimum.
    assert_eq!(j["kv_bytes"], 30 * 3 * 2 * 64 * 128 * 2);
    assert_eq!(j["dense_kv_bytes"], 30 * 3 * 2 * 64 * 43 * 2);
    // Sampling: the same seed gives the same tokens.
    let s1 = run(&["--temperature", "0.9", "--top-p", "0.95", "--seed", "7"]);
    let s2 = run(&["--temperature", "0.9", "--top-p", "0.95", "--seed", "7"]);
    assert_eq!(s1["tokens"], s2["tokens"]);
}

#[test]
fn perplexity_prefill_and_decode_modes_agree_dense() {
    let Some(m) = smollm2() else { return };
    let m = m.to_str().unwrap();
    let text = fixture("text/lighthouses.txt");
    let run = |mode: &str| {
        json(&moac!(&[
            "eval",
            "perplexity",
            "--model",
            m,
            "--dense",
            "--text-file",
            text.to_str().unwrap(),
            "--context-len",
            "192",
            "--mode",
            mode,
            "--max-windows",
            "2",
            "--json",
        ]))
    };
    let (p, d) = (run("prefill"), run("decode"));
    assert_eq!(p["tokens"], 2 * 191);
    assert_eq!(p["tokens"], d["tokens"]);
    let (pp, dp) = (p["ppl"].as_f64().unwrap(), d["ppl"].as_f64().unwrap());
    eprintln!("ppl prefill {pp}, decode {dp}");
    assert!(pp > 2.0 && pp < 100.0);
    assert!((pp - dp).abs() / pp < 1e-3, "{pp} vs {dp}");
    assert!((p["nll"].as_f64().unwrap().exp() - pp).abs() < 1e-9 * pp);
}

#[test]
fn retrieval_reports_dense_beside_each_plan_and_plots() {
    let Some(m) = smollm2() else { return };
    let m = m.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let plan = tmp.path().join("u25.moac.json");
    let svg = tmp.path().join("acc.svg");
    ok(&moac!(&[
        "plan",
        "uniform",
        "--config",
        m,
        "--alpha",
        "0",
        "--beta",
        "0.25",
        "-o",
        plan.to_str().unwrap()
    ]));
    let j = json(&moac!(&[
        "eval",
        "retrieval",
        "--model",
        m,
        "--plan",
        plan.to_str().unwrap(),
        "--task",
        "passkey",
        "--lengths",
        "300,600",
        "--samples",
        "2",
        "--seed",
        "3",
        "--svg",
        svg.to_str().unwrap(),
        "--json",
    ]));
    let series = j["series"].as_array().unwrap();
    assert_eq!(series.len(), 2);
    assert_eq!(series[0]["plan"], "dense");
    assert_eq!(series[1]["plan"], "u25");
    for s in series {
        let acc = s["accuracy"].as_array().unwrap();
        assert_eq!(acc.len(), 2);
        assert!(acc
            .iter()
            .all(|a| (0.0..=1.0).contains(&a.as_f64().unwrap())));
    }
    // At 600 tokens the 25% plan keeps less than dense.
    let kv = |i: usize| series[i]["kv_bytes"][1].as_u64().unwrap();
    assert!(kv(1) < kv(0), "{} vs {}", kv(1), kv(0));
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert_eq!(plot.matches("<polyline").count(), 2);
}

#[test]
fn plan_commands_take_a_gguf_as_the_config() {
    let Some(m) = smollm2() else { return };
    let m = m.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let plan = tmp.path().join("p.moac.json");
    ok(&moac!(&[
        "plan",
        "uniform",
        "--config",
        m,
        "--alpha",
        "64",
        "--beta",
        "0.5",
        "-o",
        plan.to_str().unwrap()
    ]));
    let out = ok(&moac!(&[
        "inspect",
        plan.to_str().unwrap(),
        "--config",
        m,
        "--prompt-len",
        "4000"
    ]));
    assert!(out.contains("p"), "{out}");
    // A plan of another shape does not meet this model.
    let other = fixture("small_gqa.moac.json");
    fails(
        &moac!(&[
            "inspect",
            other.to_str().unwrap(),
            "--config",
            m,
            "--prompt-len",
            "100"
        ]),
        &["SmolLM2-135M-Instruct.Q4_1.gguf", "small_gqa.moac.json"],
    );
    fails(
        &moac!(&[
            "generate",
            "--model",
            m,
            "--plan",
            other.to_str().unwrap(),
            "--prompt",
            "Hi"
        ]),
        &["small_gqa.moac.json"],
    );
    // Kernels need 64-token blocks.
    fails(
        &moac!(&[
            "plan",
            "uniform",
            "--config",
            m,
            "--alpha",
            "0",
            "--beta",
            "0.5",
            "--sink",
            "16",
            "--min-capacity",
            "32",
            "-o",
            plan.to_str().unwrap()
        ]),
        &["multiples of 64"],
    );
}

#[test]
fn bad_model_input_fails_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope.gguf");
    fails(
        &moac!(&[
            "generate",
            "--model",
            missing.to_str().unwrap(),
            "--dense",
            "--prompt",
            "Hi"
        ]),
        &["nope.gguf"],
    );
    let corrupt = tmp.path().join("corrupt.gguf");
    std::fs::write(&corrupt, b"GGUF\x03\x00\x00\x00garbage").unwrap();
    fails(
        &moac!(&[
            "generate",
            "--model",
            corrupt.to_str().unwrap(),
            "--dense",
            "--prompt",
            "Hi"
        ]),
        &["corrupt.gguf"],
    );
    let Some(m) = smollm2() else { return };
    let m = m.to_str().unwrap();
    fails(
        &moac!(&["generate", "--model", m, "--dense", "--prompt", ""]),
        &["empty"],
    );
    fails(
        &moac!(&[
            "generate",
            "--model",
            m,
            "--dense",
            "--prompt",
            "Hi",
            "--max-new-tokens",
            "9000"
        ]),
        &["8192"],
    );
    fails(
        &moac!(&["generate", "--model", m, "--prompt", "Hi"]),
        &["--plan P or --dense"],
    );
    fails(
        &moac!(&[
            "generate",
            "--model",
            m,
            "--dense",
            "--prompt",
            "Hi",
            "--temperature",
            "-1"
        ]),
        &["--temperature"],
    );
    let _ = Path::new(m);
}
