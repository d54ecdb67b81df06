//! The device engine from the command line, on emu with random weights for a tiny Llama
//! config (tests/fixtures/tiny-llama): `moac generate --engine device --check` matches
//! the host runner step by step and generates the host runner's tokens; `moac bench
//! decode` reports MoA beside dense; `--fit-only` gives the Llama-3-8B plan's memory
//! figures (the target: at 16k the largest batch is at least 1.4x dense's);
//! bad input exits 1 with one clear line.
#![allow(clippy::unwrap_used)]

use moac_test_support::*;

fn tiny() -> String {
    fixture("tiny-llama/config.json")
        .to_str()
        .unwrap()
        .to_string()
}

/// A uniform plan for the tiny config whose windows evict within the test's lengths.
fn tiny_plan(dir: &std::path::Path) -> String {
    let plan = dir.join("plan.json");
    let p = plan.to_str().unwrap();
    ok(&moac!(&[
        "plan",
        "uniform",
        "--config",
        &tiny(),
        "--alpha",
        "64",
        "--beta",
        "0.2",
        "-o",
        p
    ]));
    p.to_string()
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out.trim()).unwrap()
}

#[test]
fn generate_on_the_device_engine_matches_the_host_runner() {
    let tmp = tempfile::tempdir().unwrap();
    let plan = tiny_plan(tmp.path());
    let shape = tiny();
    let prompt_a: String = (0..150)
        .map(|i| ((i * 7 + 3) % 512).to_string())
        .collect::<Vec<_>>()
        .join(",");
    let common = [
        "generate",
        "--shape",
        &shape,
        "--seed",
        "3",
        "--plan",
        &plan,
        "--prompt-tokens",
        &prompt_a,
        "--prompt-tokens",
        "5,6,7",
        "--max-new-tokens",
        "12",
        "--json",
    ];
    let mut dev: Vec<&str> = common.to_vec();
    dev.extend([
        "--engine",
        "device",
        "--backend",
        "emu",
        "--check",
        "--dtype",
        "bf16",
    ]);
    let d = json(&ok(&moac!(&dev)));
    let check = &d["check"];
    assert!(
        check["max_rel_logit_error"].as_f64().unwrap() <= check["bound"].as_f64().unwrap(),
        "{d}"
    );
    assert_eq!(d["engine"], "device");
    let mut host: Vec<&str> = common.to_vec();
    host.extend(["--dtype", "bf16"]);
    let h = json(&ok(&moac!(&host)));
    assert_eq!(h["engine"], "host");
    for r in 0..2 {
        assert_eq!(d["rows"][r]["tokens"], h["rows"][r]["tokens"], "row {r}");
        assert_eq!(d["rows"][r]["tokens"].as_array().unwrap().len(), 12);
    }
    assert_eq!(d["kv_bytes"], h["kv_bytes"], "the same compacted cache");
    // Sampling on the device: reproducible for a seed.
    let mut s1: Vec<&str> = common.to_vec();
    s1.extend([
        "--engine",
        "device",
        "--backend",
        "emu",
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
    ]);
    let (a, b) = (json(&ok(&moac!(&s1))), json(&ok(&moac!(&s1))));
    assert_eq!(a["rows"], b["rows"]);
}

#[test]
fn bench_decode_on_emu_and_memory_figures() {
    let tmp = tempfile::tempdir().unwrap();
    let plan = tiny_plan(tmp.path());
    let out = ok(&moac!(&[
        "bench",
        "decode",
        "--shape",
        &tiny(),
        "--plan",
        &plan,
        "--batch",
        "1,2",
        "--context",
        "400",
        "--backend",
        "emu",
        "--memory-gib",
        "0.01",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--json"
    ]));
    let points: Vec<serde_json::Value> = out.lines().map(json).collect();
    assert_eq!(points.len(), 4, "{out}");
    for p in &points {
        assert!(p["fits"].as_bool().unwrap(), "{p}");
        assert!(p["tokens_per_s"].as_f64().unwrap() > 0.0, "{p}");
        // Figures that hold whatever the timing: tokens/s is the batch over the step.
        let (step, attn) = (
            p["ms_per_step"].as_f64().unwrap(),
            p["ms_attention"].as_f64().unwrap(),
        );
        assert!(
            step > 0.0 && attn > 0.0 && p["ms_rest"].as_f64().unwrap() >= 0.0,
            "{p}"
        );
        let tps = p["batch"].as_f64().unwrap() * 1e3 / step;
        assert!(
            (p["tokens_per_s"].as_f64().unwrap() - tps).abs() <= 1e-9 * tps,
            "{p}"
        );
        assert!(p["attention_bytes"].as_u64().unwrap() > 0);
    }
    let kv = |v: &str, b: u64| {
        points
            .iter()
            .find(|p| p["variant"] == v && p["batch"] == b)
            .unwrap()["kv_bytes"]
            .as_u64()
            .unwrap()
    };
    assert!(kv("moa", 1) < kv("dense", 1));
    assert_eq!(kv("moa", 2), 2 * kv("moa", 1));
    // Dense alone, as a table.
    let out = ok(&moac!(&[
        "bench",
        "decode",
        "--shape",
        &tiny(),
        "--dense",
        "--batch",
        "1",
        "--context",
        "300",
        "--backend",
        "emu",
        "--memory-gib",
        "0.01",
        "--steps",
        "1",
        "--warmup",
        "0"
    ]));
    assert!(out.contains("dense tok/s") && !out.contains("moa"), "{out}");
    // The Llama-3-8B MoA plan at 16k on an H200-sized budget, from the shapes alone
    // (the named shape brings the official plan).
    let out = ok(&moac!(&[
        "bench",
        "decode",
        "--shape",
        "llama-3-8b",
        "--batch",
        "8",
        "--context",
        "16384",
        "--memory-gib",
        "140",
        "--fit-only",
        "--json"
    ]));
    let points: Vec<serde_json::Value> = out.lines().map(json).collect();
    let mb = |v: &str| {
        points.iter().find(|p| p["variant"] == v).unwrap()["max_batch"]
            .as_u64()
            .unwrap()
    };
    let ratio = mb("moa") as f64 / mb("dense") as f64;
    assert!(
        ratio >= 1.4,
        "largest batch MoA {} vs dense {}",
        mb("moa"),
        mb("dense")
    );
}

#[test]
fn bad_input_exits_1_with_a_clear_line() {
    let shape = tiny();
    let base = [
        "generate",
        "--shape",
        shape.as_str(),
        "--dense",
        "--max-new-tokens",
        "2",
    ];
    let with = |extra: &[&str]| {
        let mut v: Vec<&str> = base.to_vec();
        v.extend(extra);
        moac!(&v)
    };
    fails(
        &with(&["--prompt-tokens", "1,2", "--engine", "device"]),
        &["emu or cuda"],
    );
    fails(
        &with(&["--prompt", "hello"]),
        &["no tokenizer", "--prompt-tokens"],
    );
    fails(&with(&["--prompt-tokens", "1,x"]), &["\"x\""]);
    fails(&with(&["--prompt-tokens", "1,512"]), &["512", "vocabulary"]);
    fails(
        &with(&["--prompt-tokens", "1", "--check"]),
        &["--engine device"],
    );
    fails(
        &with(&["--prompt-tokens", "1", "--model", "m.gguf"]),
        &["exclude each other"],
    );
    fails(
        &moac!(&[
            "generate",
            "--shape",
            "/nonexistent/config.json",
            "--dense",
            "--prompt-tokens",
            "1"
        ]),
        &["/nonexistent/config.json"],
    );
    if moac_runtime::cuda_available().is_err() {
        fails(
            &with(&[
                "--prompt-tokens",
                "1",
                "--engine",
                "device",
                "--backend",
                "cuda",
            ]),
            &["no CUDA driver"],
        );
        fails(
            &moac!(&[
                "bench",
                "decode",
                "--shape",
                &shape,
                "--dense",
                "--context",
                "100"
            ]),
            &["no CUDA driver"],
        );
    }
    fails(
        &moac!(&[
            "bench",
            "decode",
            "--shape",
            &shape,
            "--dense",
            "--fit-only"
        ]),
        &["--memory-gib"],
    );
    fails(
        &moac!(&[
            "bench",
            "decode",
            "--shape",
            &shape,
            "--context",
            "100",
            "--backend",
            "emu",
            "--memory-gib",
            "1"
        ]),
        &["--plan P", "--dense"],
    );
    fails(
        &moac!(&[
            "bench",
            "decode",
            "--shape",
            &shape,
            "--dense",
            "--context",
            "5000",
            "--backend",
            "emu",
            "--memory-gib",
            "1"
        ]),
        &["5000", "4096"],
    );
}
