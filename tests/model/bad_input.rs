//! Bad input to the model loader fails cleanly: every broken GGUF file, Hugging Face
//! folder, plan, prompt and chat template gives an error that names the file and what
//! is wrong with it (the tensor, the metadata key, the layer), never a panic. The GGUF
//! files are a tiny llama written at test time (tiny_gguf.rs) with one thing broken;
//! SmolLM2's file, where present, is truncated too.
#![allow(clippy::unwrap_used)]

use crate::tiny_gguf;

use candle_core::{DType, Device, Tensor};
use moac_model::attention::Engine;
use moac_model::generate::{generate, GenerateOptions};
use moac_model::weights::WeightMode;
use moac_model::Model;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tiny_gguf::{Gguf, Meta, TinyShape};

/// The error of loading `path`, as its message (the load must fail).
fn load_err(path: &Path) -> String {
    match Model::load(path, WeightMode::F32) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    }
}

/// Writes `g` as `name`, loads it, and checks the error names the file and holds every
/// needle.
fn gguf_fails(g: &Gguf, name: &str, needles: &[&str]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let path = g.write(tmp.path(), name);
    bytes_fail(&path, needles)
}

fn bytes_fail(path: &Path, needles: &[&str]) -> String {
    let e = load_err(path);
    eprintln!("{e}");
    let file = path.file_name().unwrap().to_str().unwrap();
    assert!(e.contains(file), "the error does not name {file}: {e}");
    for n in needles {
        assert!(e.contains(n), "the error lacks {n:?}: {e}");
    }
    e
}

fn tiny() -> Gguf {
    Gguf::tiny(TinyShape::default())
}

#[test]
fn the_tiny_gguf_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tiny().write(tmp.path(), "tiny.gguf");
    let m = Model::load(&path, WeightMode::F32).unwrap();
    assert_eq!(m.llama.config.num_layers, 1);
    assert_eq!(m.llama.config.vocab_size, 6);
    assert_eq!(m.prompt("ab").unwrap(), vec![4, 3]);
}

#[test]
fn empty_and_truncated_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    bytes_fail(&empty, &["empty"]);
    let bytes = tiny().bytes();
    // Cut inside the header (the metadata) and inside the tensor data.
    let head = tmp.path().join("cut-header.gguf");
    std::fs::write(&head, &bytes[..300]).unwrap();
    bytes_fail(&head, &["truncated"]);
    let data = tmp.path().join("cut-data.gguf");
    std::fs::write(&data, &bytes[..bytes.len() - 10]).unwrap();
    bytes_fail(&data, &["blk.0.ffn_down.weight", "runs past the end"]);
    let three = tmp.path().join("three.gguf");
    std::fs::write(&three, b"GGU").unwrap();
    bytes_fail(&three, &["truncated"]);
}

#[test]
fn truncated_real_model() {
    let Some(m) = moac_test_support::smollm2() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let cut = tmp.path().join("smol-cut.gguf");
    let bytes = std::fs::read(&m).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    bytes_fail(&cut, &["runs past the end"]);
    // The header alone: the tokenizer's arrays are cut.
    std::fs::write(&cut, &bytes[..200_000]).unwrap();
    bytes_fail(&cut, &["truncated", "tokenizer.ggml"]);
}

#[test]
fn wrong_magic_and_version() {
    let tmp = tempfile::tempdir().unwrap();
    let mut bytes = tiny().bytes();
    bytes[..4].copy_from_slice(b"GGML");
    let p = tmp.path().join("magic.gguf");
    std::fs::write(&p, &bytes).unwrap();
    bytes_fail(&p, &["wrong magic", "GGML"]);
    let mut g = tiny();
    g.version = 7;
    gguf_fails(&g, "version.gguf", &["unsupported GGUF version 7"]);
}

#[test]
fn absurd_counts_and_lengths() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tiny().bytes();
    let with = |at: usize, v: u64, name: &str| -> PathBuf {
        let mut b = good.clone();
        b[at..at + 8].copy_from_slice(&v.to_le_bytes());
        let p = tmp.path().join(name);
        std::fs::write(&p, &b).unwrap();
        p
    };
    // Tensor count at byte 8, metadata count at 16.
    bytes_fail(
        &with(8, u64::MAX, "tensors.gguf"),
        &["tensor count 18446744073709551615 is absurd"],
    );
    bytes_fail(
        &with(16, 1 << 40, "kvs.gguf"),
        &["metadata count 1099511627776 is absurd"],
    );
    // The first key's length.
    bytes_fail(
        &with(24, u64::MAX / 2, "keylen.gguf"),
        &["truncated", "metadata entry 0"],
    );
    // An array whose length cannot fit: tokenizer.ggml.tokens claims 2^60 strings.
    let mut g = tiny();
    g.set("tokenizer.ggml.tokens", Meta::Strs(vec!["a".into()]));
    let b = g.bytes();
    let key = b"tokenizer.ggml.tokens";
    let at = b.windows(key.len()).position(|w| w == key).unwrap() + key.len() + 4 + 4;
    let mut b2 = b.clone();
    b2[at..at + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
    let p = tmp.path().join("array.gguf");
    std::fs::write(&p, &b2).unwrap();
    bytes_fail(&p, &["tokenizer.ggml.tokens", "cannot fit"]);
    // A tensor with an absurd dimension count.
    let mut b3 = good.clone();
    let name = b"token_embd.weight";
    let at = b3.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    b3[at..at + 4].copy_from_slice(&1000u32.to_le_bytes());
    let p = tmp.path().join("dims.gguf");
    std::fs::write(&p, &b3).unwrap();
    bytes_fail(&p, &["token_embd.weight", "1000 dimensions"]);
}

#[test]
fn tensor_past_the_end_of_the_file() {
    let mut g = tiny();
    g.tensor("blk.0.attn_q.weight").offset = Some(1 << 40);
    gguf_fails(
        &g,
        "offset.gguf",
        &["blk.0.attn_q.weight", "runs past the end"],
    );
    let mut g = tiny();
    g.tensor("blk.0.attn_k.weight").offset = Some(u64::MAX - 3);
    gguf_fails(
        &g,
        "wrap.gguf",
        &["blk.0.attn_k.weight", "runs past the end"],
    );
    // A shape far larger than the data.
    let mut g = tiny();
    g.tensor("output_norm.weight").dims = vec![1 << 30, 1 << 30];
    gguf_fails(
        &g,
        "huge.gguf",
        &["output_norm.weight", "runs past the end"],
    );
}

#[test]
fn unsupported_quantization_types() {
    // A GGML type candle does not have (IQ2_XXS).
    let mut g = tiny();
    g.tensor("blk.0.ffn_up.weight").type_id = 16;
    gguf_fails(
        &g,
        "iq2.gguf",
        &["blk.0.ffn_up.weight", "IQ2_XXS", "does not read"],
    );
    // One candle has but moac does not run (Q2_K: 84-byte blocks of 256).
    let shape = TinyShape {
        hidden: 256,
        heads: 2,
        kv_heads: 1,
        ff: 256,
        ..TinyShape::default()
    };
    let mut g = Gguf::tiny(shape);
    let t = g.tensor("blk.0.attn_norm.weight");
    t.type_id = 10;
    t.data = vec![0; 84];
    gguf_fails(&g, "q2k.gguf", &["blk.0.attn_norm.weight", "Q2K"]);
}

#[test]
fn missing_tensor_and_wrong_shape() {
    let mut g = tiny();
    g.tensors.retain(|t| t.name != "blk.0.ffn_up.weight");
    gguf_fails(
        &g,
        "missing.gguf",
        &["tensor blk.0.ffn_up.weight is missing"],
    );
    let mut g = tiny();
    let t = g.tensor("blk.0.attn_v.weight");
    t.dims = vec![8, 4];
    gguf_fails(
        &g,
        "shape.gguf",
        &["blk.0.attn_v.weight", "shape [8, 4]", "[4, 8]"],
    );
    // More layers in the metadata than the file has.
    let mut g = tiny();
    g.set("llama.block_count", Meta::U32(3));
    gguf_fails(
        &g,
        "layers.gguf",
        &["tensor blk.1.attn_norm.weight is missing"],
    );
    // An absurd layer count is refused before anything is sized by it.
    let mut g = tiny();
    g.set("llama.block_count", Meta::U32(u32::MAX));
    gguf_fails(&g, "manylayers.gguf", &["4294967295 layers"]);
}

#[test]
fn metadata_of_the_wrong_type() {
    let mut g = tiny();
    g.set("llama.block_count", Meta::Str("thirty".into()));
    gguf_fails(
        &g,
        "blocks.gguf",
        &["llama.block_count", "expected an integer", "\"thirty\""],
    );
    let mut g = tiny();
    g.set("llama.context_length", Meta::F32(2048.0));
    gguf_fails(&g, "context.gguf", &["llama.context_length", "f32"]);
    let mut g = tiny();
    g.set("llama.attention.head_count", Meta::I32(-2));
    gguf_fails(&g, "heads.gguf", &["llama.attention.head_count", "-2"]);
    let mut g = tiny();
    g.set("llama.rope.freq_base", Meta::Str("10000".into()));
    gguf_fails(&g, "rope.gguf", &["llama.rope.freq_base", "float"]);
    let mut g = tiny();
    g.set("tokenizer.ggml.tokens", Meta::U32(6));
    gguf_fails(&g, "tokens.gguf", &["tokenizer.ggml.tokens", "array"]);
    let mut g = tiny();
    g.set("tokenizer.ggml.eos_token_id", Meta::Str("</s>".into()));
    gguf_fails(&g, "eos.gguf", &["tokenizer.ggml.eos_token_id"]);
    let mut g = tiny();
    g.set("general.alignment", Meta::U32(0));
    gguf_fails(&g, "align.gguf", &["general.alignment", "power of two"]);
    let mut g = tiny();
    g.set("tokenizer.ggml.merges", Meta::Strs(vec!["ab".into()]));
    gguf_fails(&g, "merges.gguf", &["tokenizer.ggml.merges", "\"ab\""]);
}

/// A tiny Hugging Face folder: config.json, model.safetensors, tokenizer.json.
fn hf_folder(dir: &Path) {
    let (h, heads, kv, ff, vocab) = (8usize, 2usize, 1usize, 16usize, 6usize);
    let hd = h / heads;
    let config = serde_json::json!({
        "model_type": "llama", "hidden_size": h, "num_attention_heads": heads,
        "num_key_value_heads": kv, "num_hidden_layers": 1, "intermediate_size": ff,
        "vocab_size": vocab, "max_position_embeddings": 64, "tie_word_embeddings": true,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let mut t = HashMap::new();
    let mut add = |name: &str, shape: &[usize]| {
        let z = Tensor::ones(shape, DType::F32, &Device::Cpu).unwrap();
        t.insert(name.to_string(), z);
    };
    add("model.embed_tokens.weight", &[vocab, h]);
    add("model.norm.weight", &[h]);
    let p = |n: &str| format!("model.layers.0.{n}.weight");
    add(&p("self_attn.q_proj"), &[heads * hd, h]);
    add(&p("self_attn.k_proj"), &[kv * hd, h]);
    add(&p("self_attn.v_proj"), &[kv * hd, h]);
    add(&p("self_attn.o_proj"), &[h, heads * hd]);
    add(&p("mlp.gate_proj"), &[ff, h]);
    add(&p("mlp.up_proj"), &[ff, h]);
    add(&p("mlp.down_proj"), &[h, ff]);
    add(&p("input_layernorm"), &[h]);
    add(&p("post_attention_layernorm"), &[h]);
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"a": 0, "b": 1, "c": 2, "ab": 3, "<s>": 4, "<unk>": 5}, "unk_token": "<unk>"},
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
}

#[test]
fn the_tiny_hf_folder_loads() {
    let tmp = tempfile::tempdir().unwrap();
    hf_folder(tmp.path());
    let m = Model::load(tmp.path(), WeightMode::F32).unwrap();
    assert_eq!(m.prompt("a b").unwrap(), vec![0, 1]);
}

fn hf_fails(break_it: impl Fn(&Path), needles: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    std::fs::create_dir(&dir).unwrap();
    hf_folder(&dir);
    break_it(&dir);
    let e = load_err(&dir);
    eprintln!("{e}");
    for n in needles {
        assert!(e.contains(n), "the error lacks {n:?}: {e}");
    }
}

#[test]
fn hf_config_missing_or_malformed() {
    hf_fails(
        |d| std::fs::remove_file(d.join("config.json")).unwrap(),
        &["config.json", "No such file"],
    );
    hf_fails(
        |d| std::fs::write(d.join("config.json"), "{\"model_type\": \"llama\",").unwrap(),
        &["config.json", "invalid JSON at line 1"],
    );
    hf_fails(
        |d| {
            let c = std::fs::read_to_string(d.join("config.json")).unwrap();
            let c = c.replace(
                "\"num_key_value_heads\":1",
                "\"num_key_value_heads\":\"one\"",
            );
            std::fs::write(d.join("config.json"), c).unwrap();
        },
        &["config.json", "num_key_value_heads"],
    );
    hf_fails(
        |d| {
            let c = std::fs::read_to_string(d.join("config.json")).unwrap();
            let c = c.replace("\"num_hidden_layers\":1", "\"num_hidden_layers\":100000000");
            std::fs::write(d.join("config.json"), c).unwrap();
        },
        &["config.json", "100000000 layers"],
    );
}

#[test]
fn hf_tokenizer_missing_or_malformed() {
    hf_fails(
        |d| std::fs::remove_file(d.join("tokenizer.json")).unwrap(),
        &["tokenizer.json", "not found"],
    );
    hf_fails(
        |d| std::fs::write(d.join("tokenizer.json"), "{\"model\": 3}").unwrap(),
        &["tokenizer.json"],
    );
    hf_fails(
        |d| std::fs::write(d.join("tokenizer.json"), [0xff, 0xfe, 0x00]).unwrap(),
        &["tokenizer.json"],
    );
}

#[test]
fn hf_safetensors_header_malformed() {
    let st = |d: &Path| d.join("model.safetensors");
    // A header length far beyond the file.
    hf_fails(
        |d| {
            let mut b = std::fs::read(st(d)).unwrap();
            b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
            std::fs::write(st(d), b).unwrap();
        },
        &["model.safetensors", "not a readable safetensors file"],
    );
    // A header that is not JSON.
    hf_fails(
        |d| {
            let mut b = std::fs::read(st(d)).unwrap();
            b[8] = b'#';
            std::fs::write(st(d), b).unwrap();
        },
        &["model.safetensors", "not a readable safetensors file"],
    );
    // Cut short: the offsets run past the data.
    hf_fails(
        |d| {
            let b = std::fs::read(st(d)).unwrap();
            std::fs::write(st(d), &b[..b.len() - 16]).unwrap();
        },
        &["model.safetensors", "not a readable safetensors file"],
    );
    // A tensor of the wrong shape.
    hf_fails(
        |d| {
            let mut t = candle_core::safetensors::load(st(d), &Device::Cpu).unwrap();
            t.insert(
                "model.norm.weight".into(),
                Tensor::ones(5, DType::F32, &Device::Cpu).unwrap(),
            );
            candle_core::safetensors::save(&t, st(d)).unwrap();
        },
        &["model.norm.weight", "shape [5]"],
    );
}

#[test]
fn a_plan_for_another_model() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tiny().write(tmp.path(), "tiny.gguf");
    let m = Model::load(&path, WeightMode::F32).unwrap();
    let shape = m.llama.config.shape();
    // An official MoA plan with 3 layers for a 1-layer model.
    let moa = tmp.path().join("moa_alpha_beta.json");
    std::fs::write(
        &moa,
        r#"{"alphas": [[0, 0], [0, 0], [0, 0]], "betas": [[1, 1], [1, 1], [1, 1]]}"#,
    )
    .unwrap();
    let e = moac::plan::load_for_model(&moa, shape, &path)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("moa_alpha_beta.json") && e.contains('3'), "{e}");
    // Two layers right, but 4 heads in a row for a 2-head model.
    std::fs::write(
        &moa,
        r#"{"alphas": [[0, 0, 0, 0]], "betas": [[1, 1, 1, 1]]}"#,
    )
    .unwrap();
    let e = moac::plan::load_for_model(&moa, shape, &path)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("moa_alpha_beta.json") && e.contains('4'), "{e}");
    // A moac plan of another geometry.
    let other = moac_test_support::fixture("small_gqa.moac.json");
    let e = moac::plan::load_for_model(&other, shape, &path)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("small_gqa.moac.json") && e.contains("tiny.gguf"),
        "{e}"
    );
    // Checked against the model directly.
    let plan = moac::plan::load(&other, None).unwrap();
    let e = m.llama.check_plan(&plan).err().unwrap().to_string();
    assert!(
        e.contains("small_gqa.moac.json") && e.contains("the model has 1 layers x 2 query heads"),
        "{e}"
    );
}

#[test]
fn a_prompt_longer_than_the_context() {
    let tmp = tempfile::tempdir().unwrap();
    let path = Gguf::tiny(TinyShape {
        context: 16,
        ..TinyShape::default()
    })
    .write(tmp.path(), "short.gguf");
    let m = Model::load(&path, WeightMode::F32).unwrap();
    let prompt = m.prompt(&"a".repeat(40)).unwrap();
    assert!(prompt.len() > 16);
    let eng = Engine::Reference;
    let mut attn = eng.open(1, prompt.len(), 4).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: 4,
        ..GenerateOptions::default()
    };
    let e = generate(&m.llama, attn.as_mut(), &[&prompt], &opts, &mut |_, _| {})
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("prompt 0")
            && e.contains(&format!("{} tokens", prompt.len()))
            && e.contains("16"),
        "{e}"
    );
}

#[test]
fn a_chat_template_the_renderer_cannot_handle() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, template, needle) in [
        (
            "syntax.gguf",
            "{% for m in messages %}{{ m.content }",
            "syntax error",
        ),
        (
            "raise.gguf",
            "{{ raise_exception('no system role') }}",
            "no system role",
        ),
        (
            "loop.gguf",
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
            "fuel",
        ),
    ] {
        let mut g = tiny();
        g.set("tokenizer.chat_template", Meta::Str(template.into()));
        let path = g.write(tmp.path(), name);
        let m = Model::load(&path, WeightMode::F32).unwrap();
        let e = m.chat_prompt("hi", "").err().unwrap().to_string();
        assert!(
            e.contains(name) && e.contains("tokenizer.chat_template") && e.contains(needle),
            "{e}"
        );
    }
    // Not a string at all.
    let mut g = tiny();
    g.set("tokenizer.chat_template", Meta::U32(1));
    gguf_fails(&g, "template.gguf", &["tokenizer.chat_template", "string"]);
}

#[test]
fn random_weights_for_an_absurd_header_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let ok = tiny().write(tmp.path(), "tiny.gguf");
    let (c, ff) = moac_model::weights::model_shape(&ok).unwrap();
    assert_eq!((c.hidden, ff), (8, 16));
    let mut g = tiny();
    g.set("llama.embedding_length", Meta::U32(1 << 20));
    g.set("llama.attention.head_count", Meta::U32(1 << 10));
    g.set("llama.feed_forward_length", Meta::U32(u32::MAX));
    let path = g.write(tmp.path(), "huge.gguf");
    let e = moac_model::weights::model_shape(&path)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("huge.gguf") && e.contains("more than 68719476736 weights"),
        "{e}"
    );
}
