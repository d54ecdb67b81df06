//! A Hugging Face model folder: SmolLM2's GGUF written out the way Hugging Face stores
//! the model (Q/K rows in HF's order, so half-split RoPE; `config.json`, safetensors,
//! `tokenizer.json`, the chat template in `tokenizer_config.json`), then loaded by moac:
//! the same prompt ids and the same logits as the GGUF (f32 weights), and a bf16 copy
//! that still answers the France question.
#![allow(clippy::unwrap_used)]

use candle_core::{DType, Device, Tensor};
use moac_model::attention::Engine;
use moac_model::generate::{generate, GenerateOptions};
use moac_model::gguf::GgufMetadata;
use moac_model::llama::RopeStyle;
use moac_model::weights::WeightMode;
use moac_model::Model;
use moac_runtime::{Artifact, Backend, PrefillMode, Runtime};
use std::collections::HashMap;
use std::path::Path;

/// GGUF's llama Q/K rows are permuted for interleaved RoPE; HF's are not:
/// [H * D, in] -> (H, D/2, 2, in) -> swap the middle axes -> (H * D, in).
fn unpermute(w: &Tensor, heads: usize) -> Tensor {
    let (rows, cols) = w.dims2().unwrap();
    let d = rows / heads;
    w.reshape((heads, d / 2, 2, cols))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((rows, cols))
        .unwrap()
}

fn export(gguf: &Path, dir: &Path, dtype: DType) {
    let meta = GgufMetadata::read(gguf).unwrap();
    let content = meta.content();
    let mut file = std::fs::File::open(gguf).unwrap();
    let mut out = HashMap::new();
    for name in content.tensor_infos.keys() {
        let t = content
            .tensor(&mut file, name, &Device::Cpu)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap();
        let hf = if name == "token_embd.weight" {
            "model.embed_tokens.weight".to_string()
        } else if name == "output_norm.weight" {
            "model.norm.weight".to_string()
        } else {
            let rest = name.strip_prefix("blk.").unwrap();
            let (i, part) = rest.split_once('.').unwrap();
            let part = match part {
                "attn_q.weight" => "self_attn.q_proj.weight",
                "attn_k.weight" => "self_attn.k_proj.weight",
                "attn_v.weight" => "self_attn.v_proj.weight",
                "attn_output.weight" => "self_attn.o_proj.weight",
                "ffn_gate.weight" => "mlp.gate_proj.weight",
                "ffn_up.weight" => "mlp.up_proj.weight",
                "ffn_down.weight" => "mlp.down_proj.weight",
                "attn_norm.weight" => "input_layernorm.weight",
                "ffn_norm.weight" => "post_attention_layernorm.weight",
                other => panic!("unexpected tensor {other}"),
            };
            format!("model.layers.{i}.{part}")
        };
        let t = if hf.ends_with("q_proj.weight") {
            unpermute(&t, 9)
        } else if hf.ends_with("k_proj.weight") {
            unpermute(&t, 3)
        } else {
            t
        };
        out.insert(hf, t.to_dtype(dtype).unwrap());
    }
    std::fs::create_dir_all(dir).unwrap();
    candle_core::safetensors::save(&out, dir.join("model.safetensors")).unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "num_hidden_layers": 30,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "max_position_embeddings": 8192,
        "vocab_size": 49152,
        "tie_word_embeddings": true,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32"
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let tok = moac_model::tokenizer::Tokenizer::from_gguf(&meta).unwrap();
    tok.save(&dir.join("tokenizer.json")).unwrap();
    let template = meta.string("tokenizer.chat_template").unwrap();
    let tc = serde_json::json!({ "chat_template": template, "eos_token": "<|im_end|>" });
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
}

fn logits(model: &Model, prompt: &[u32]) -> Vec<Vec<f32>> {
    let plan = model.llama.dense_plan(Path::new("dense")).unwrap();
    let rt = Runtime::new(
        Artifact::from_plan(&plan, moac::Dtype::F16, None).unwrap(),
        Backend::Cpu,
    )
    .unwrap();
    let engine = Engine::Moac {
        runtime: &rt,
        mode: PrefillMode::Block64,
    };
    let mut attn = engine.open(1, prompt.len(), 2).unwrap();
    let m = &model.llama;
    let h = m.prefill(attn.as_mut(), &[prompt]).unwrap();
    let mut rows = vec![m
        .logits(&h.get(0).unwrap().get(prompt.len() - 1).unwrap())
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()];
    for s in 0..2 {
        let h = m
            .decode(attn.as_mut(), &[504 + s as u32], &[prompt.len() + s])
            .unwrap();
        rows.extend(m.logits(&h).unwrap().to_vec2::<f32>().unwrap());
    }
    rows
}

#[test]
fn a_hugging_face_folder_matches_the_gguf() {
    let Some(gguf) = moac_test_support::smollm2() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("smollm2-hf");
    export(&gguf, &dir, DType::F32);
    let hf = Model::load(&dir, WeightMode::Auto).unwrap();
    let reference = Model::load(&gguf, WeightMode::F32).unwrap();
    assert_eq!(hf.llama.config.rope, RopeStyle::HalfSplit);
    assert_eq!(hf.llama.config.shape(), reference.llama.config.shape());
    assert_eq!(hf.tokenizer.stop, [2]);
    let question = "What is the capital of France?";
    let prompt = hf.chat_prompt(question, "").unwrap();
    assert_eq!(prompt, reference.chat_prompt(question, "").unwrap());
    assert!(hf.chat.origin.contains("tokenizer_config.json"));
    let (a, b) = (logits(&hf, &prompt), logits(&reference, &prompt));
    let d = a
        .iter()
        .zip(&b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0f32, f32::max);
    eprintln!("HF folder (half-split RoPE) vs GGUF (interleaved): max |logit diff| {d}");
    // The same weights in another feature order: q.k sums run in another order, which
    // can move a layer's f16 attention output by one ulp; through 30 layers that moves
    // logits by about 0.01 (measured 0.015; cpu vs emu on the same data: 0.008).
    assert!(d < 0.03, "{d}");

    // bf16 safetensors load (held as f32) and still answer.
    let dir16 = tmp.path().join("smollm2-bf16");
    export(&gguf, &dir16, DType::BF16);
    let m16 = Model::load(&dir16, WeightMode::Auto).unwrap();
    let plan = m16.llama.dense_plan(Path::new("dense")).unwrap();
    let rt = Runtime::new(
        Artifact::from_plan(&plan, moac::Dtype::Bf16, None).unwrap(),
        Backend::Cpu,
    )
    .unwrap();
    let mut attn = Engine::Moac {
        runtime: &rt,
        mode: PrefillMode::Block64,
    }
    .open(1, prompt.len(), 10)
    .unwrap();
    let opts = GenerateOptions {
        max_new_tokens: 10,
        stop: m16.tokenizer.stop.clone(),
        ..GenerateOptions::default()
    };
    let out = generate(&m16.llama, attn.as_mut(), &[&prompt], &opts, &mut |_, _| {}).unwrap();
    let text = m16.tokenizer.decode(&out.rows[0].tokens, false).unwrap();
    eprintln!("bf16 weights, bf16 cache: {text:?}");
    assert!(text.contains("Paris"), "{text}");
}

#[test]
fn bad_folders_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let err = |dir: &Path| match Model::load(dir, WeightMode::Auto) {
        Ok(_) => panic!("loaded {}", dir.display()),
        Err(e) => e.to_string(),
    };
    let e = err(dir);
    assert!(e.contains("config.json"), "{e}");
    std::fs::write(dir.join("config.json"), "{\"model_type\": \"gpt2\"").unwrap();
    let e = err(dir);
    assert!(e.contains("config.json") && e.contains("line 1"), "{e}");
    std::fs::write(dir.join("config.json"), "{\"model_type\": \"gpt2\"}").unwrap();
    std::fs::write(dir.join("model.safetensors"), b"not safetensors").unwrap();
    let e = err(dir);
    assert!(e.contains("model.safetensors"), "{e}");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let t = HashMap::from([(
        "x".to_string(),
        Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
    )]);
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    let e = err(dir);
    assert!(e.contains("model_type \"gpt2\""), "{e}");
}
