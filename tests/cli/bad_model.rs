//! Bad model input through the `moac` binary: broken GGUF files (a tiny llama written at
//! test time with one thing broken), broken Hugging Face folders, a plan for another
//! model, a prompt longer than the context and a chat template that cannot render make
//! `moac generate` / `moac eval` / `moac plan` exit with status 1 and one line of error
//! that names the file and the problem; nothing is written.
#![allow(clippy::unwrap_used)]

#[path = "../model/tiny_gguf.rs"]
mod tiny_gguf;

use moac_test_support::*;
use std::path::Path;
use tiny_gguf::{Gguf, Meta, TinyShape};

/// A tiny llama the cpu backend runs (head_dim 64), with a 16-token context.
fn shape() -> TinyShape {
    TinyShape {
        hidden: 128,
        heads: 2,
        kv_heads: 1,
        ff: 64,
        layers: 1,
        context: 16,
    }
}

/// The command failed with status 1 and exactly one line on stderr, holding every
/// needle.
fn fails_in_one_line(out: &std::process::Output, needles: &[&str]) {
    fails(out, needles);
    let e = stderr(out);
    assert_eq!(e.trim().lines().count(), 1, "not one line: {e}");
    assert!(e.starts_with("error: "), "{e}");
}

fn generate(model: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--max-new-tokens",
        "2",
    ];
    args.extend_from_slice(extra);
    moac!(&args)
}

#[test]
fn the_tiny_model_generates() {
    let tmp = tempfile::tempdir().unwrap();
    let m = Gguf::tiny(shape()).write(tmp.path(), "tiny.gguf");
    let out = generate(&m, &["--dense", "--prompt", "ab"]);
    ok(&out);
}

#[test]
fn broken_gguf_files() {
    let tmp = tempfile::tempdir().unwrap();
    let good = Gguf::tiny(shape());
    let bytes = good.bytes();
    let write = |name: &str, b: &[u8]| {
        let p = tmp.path().join(name);
        std::fs::write(&p, b).unwrap();
        p
    };
    let mut absurd = bytes.clone();
    absurd[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    let mut magic = bytes.clone();
    magic[..4].copy_from_slice(b"PK\x03\x04");
    let mut missing = good.clone();
    missing.tensors.retain(|t| t.name != "output_norm.weight");
    let mut iq = good.clone();
    iq.tensor("blk.0.attn_q.weight").type_id = 19;
    let mut wrong = good.clone();
    wrong.set("llama.block_count", Meta::Str("one".into()));
    let cases: Vec<(std::path::PathBuf, &[&str])> = vec![
        (write("empty.gguf", b""), &["empty"]),
        (
            write("cut.gguf", &bytes[..bytes.len() / 2]),
            &["runs past the end"],
        ),
        (write("zip.gguf", &magic), &["wrong magic"]),
        (
            write("count.gguf", &absurd),
            &["tensor count 18446744073709551615 is absurd"],
        ),
        (
            write("missing.gguf", &missing.bytes()),
            &["output_norm.weight is missing"],
        ),
        (
            write("iq.gguf", &iq.bytes()),
            &["blk.0.attn_q.weight", "IQ1_S"],
        ),
        (
            write("wrongtype.gguf", &wrong.bytes()),
            &["llama.block_count", "\"one\""],
        ),
    ];
    for (path, needles) in cases {
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let mut all = vec![name.as_str()];
        all.extend_from_slice(needles);
        fails_in_one_line(&generate(&path, &["--dense", "--prompt", "ab"]), &all);
    }
    // eval and plan too; the plan is not written.
    let cut = tmp.path().join("cut.gguf");
    let text = write("text.txt", "ab ab ab ab".as_bytes());
    fails_in_one_line(
        &moac!(&[
            "eval",
            "perplexity",
            "--model",
            cut.to_str().unwrap(),
            "--dense",
            "--text-file",
            text.to_str().unwrap(),
            "--context-len",
            "8"
        ]),
        &["cut.gguf", "runs past the end"],
    );
    let header = write("header.gguf", &bytes[..100]);
    let out = tmp.path().join("p.moac.json");
    fails_in_one_line(
        &moac!(&[
            "plan",
            "uniform",
            "--config",
            header.to_str().unwrap(),
            "--alpha",
            "64",
            "--beta",
            "0.5",
            "-o",
            out.to_str().unwrap()
        ]),
        &["header.gguf", "truncated"],
    );
    assert!(!out.exists());
}

#[test]
fn broken_hf_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("hf");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("config.json"), "{\"model_type\": \"llama\"").unwrap();
    fails_in_one_line(
        &generate(&dir, &["--dense", "--prompt", "ab"]),
        &["config.json", "invalid JSON"],
    );
    std::fs::write(
        dir.join("config.json"),
        std::fs::read_to_string(fixture("tiny-llama/config.json")).unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.join("model.safetensors"),
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}xxxxxx",
    )
    .unwrap();
    fails_in_one_line(
        &generate(&dir, &["--dense", "--prompt", "ab"]),
        &["model.safetensors", "not a readable safetensors file"],
    );
}

#[test]
fn plan_prompt_and_template_that_do_not_fit() {
    let tmp = tempfile::tempdir().unwrap();
    let m = Gguf::tiny(shape()).write(tmp.path(), "tiny.gguf");
    let other = fixture("small_gqa.moac.json");
    fails_in_one_line(
        &generate(&m, &["--plan", other.to_str().unwrap(), "--prompt", "ab"]),
        &["small_gqa.moac.json", "tiny.gguf"],
    );
    let moa = tmp.path().join("moa_alpha_beta.json");
    std::fs::write(
        &moa,
        r#"{"alphas": [[0, 0], [0, 0]], "betas": [[1, 1], [1, 1]]}"#,
    )
    .unwrap();
    fails_in_one_line(
        &generate(&m, &["--plan", moa.to_str().unwrap(), "--prompt", "ab"]),
        &["moa_alpha_beta.json"],
    );
    // 40 tokens for a 16-token model.
    let long = "a ".repeat(20);
    fails_in_one_line(
        &generate(&m, &["--dense", "--prompt", &long]),
        &["tiny.gguf", "16 tokens"],
    );
    let mut g = Gguf::tiny(shape());
    g.set(
        "tokenizer.chat_template",
        Meta::Str("{% if messages %}{{ messages[0].content }".into()),
    );
    let bad = g.write(tmp.path(), "template.gguf");
    fails_in_one_line(
        &generate(&bad, &["--dense", "--chat", "--prompt", "ab"]),
        &["template.gguf", "tokenizer.chat_template"],
    );
}
