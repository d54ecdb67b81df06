//! `moac generate`: text from a real model with its attention through moac (a plan, or
//! `--dense`: every span = N), streamed to stdout as it decodes; prefill time, decode
//! tokens/s and KV bytes against dense on stderr; or one JSON object with `--json`.

use super::model::{mib, plan_or_dense, ModelArgs};
use crate::{CliError, Result};
use clap::Args;
use moac_model::generate::{generate, GenerateOptions, Sampling};
use std::io::Write;
use std::path::PathBuf;

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The MoA plan (a moac plan file, or official MoA JSON: the geometry comes from the
    /// model).
    #[arg(long, conflicts_with = "dense")]
    pub plan: Option<PathBuf>,
    /// Every head attends to the whole sequence (the same kernels, span = N).
    #[arg(long)]
    pub dense: bool,
    /// The prompt text; repeat for a batch (decoded together, rows of different
    /// lengths).
    #[arg(
        long,
        required_unless_present = "prompt_file",
        conflicts_with = "prompt_file"
    )]
    pub prompt: Vec<String>,
    /// A file holding the prompt.
    #[arg(long)]
    pub prompt_file: Option<PathBuf>,
    /// Wrap the prompt as one user turn in the model's chat template (with the
    /// assistant's turn begun); without it the prompt is used as is.
    #[arg(long)]
    pub chat: bool,
    /// Text put at the start of the answer (after the chat template's generation
    /// prompt), e.g. "The pass key is".
    #[arg(long, default_value = "")]
    pub answer_prefix: String,
    /// Tokens to generate at most (N = prompt + this sizes the cache and the spans).
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// 0: greedy.
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    pub temperature: f32,
    /// Nucleus sampling: sample from the most likely tokens up to this probability.
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    pub top_p: f32,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// With --json: the K most likely [id, logprob] pairs of every generated step.
    #[arg(long, default_value_t = 0, requires = "json")]
    pub top_logprobs: usize,
}

fn check_sampling(a: &GenerateArgs) -> Result<()> {
    if !(a.temperature >= 0.0 && a.temperature.is_finite()) {
        return Err(CliError::Usage(format!(
            "--temperature {}: must be 0 (greedy) or positive",
            a.temperature
        )));
    }
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        return Err(CliError::Usage(format!(
            "--top-p {}: must be in (0, 1]",
            a.top_p
        )));
    }
    Ok(())
}

pub fn run(a: GenerateArgs) -> Result<()> {
    check_sampling(&a)?;
    let texts: Vec<String> = match &a.prompt_file {
        Some(f) => vec![std::fs::read_to_string(f)
            .map_err(|e| CliError::Usage(format!("{}: {e}", f.display())))?],
        None => a.prompt.clone(),
    };
    if let Some(i) = texts.iter().position(|t| t.is_empty()) {
        return Err(CliError::Usage(format!("prompt {i} is empty")));
    }
    let model = a.model.load()?;
    let plan = plan_or_dense(&model, a.plan.as_deref(), a.dense)?;
    let prompts: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| {
            if a.chat {
                model.chat_prompt(t, &a.answer_prefix)
            } else {
                let mut s = t.clone();
                s.push_str(&a.answer_prefix);
                model.prompt(&s)
            }
        })
        .collect::<moac_model::Result<_>>()?;
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let limit = model.llama.config.context_len;
    if longest + a.max_new_tokens > limit {
        return Err(CliError::Usage(format!(
            "the prompt ({longest} tokens) plus --max-new-tokens {} is more than the {limit} tokens {} takes",
            a.max_new_tokens,
            model.path.display()
        )));
    }
    let rt = a.model.runtime(&plan)?;
    let mut attn = a
        .model
        .engine(&rt)
        .open(prompts.len(), longest, a.max_new_tokens)?;
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        sampling: Sampling {
            temperature: a.temperature,
            top_p: a.top_p,
            seed: a.seed,
        },
        stop: model.tokenizer.stop.clone(),
        top_logprobs: a.top_logprobs,
    };
    let stream = !a.json && prompts.len() == 1;
    let mut shown = String::new();
    let mut ids = Vec::new();
    let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let out = generate(&model.llama, attn.as_mut(), &refs, &opts, &mut |_, id| {
        if !stream || model.tokenizer.stop.contains(&id) {
            return;
        }
        // Decode the whole answer so far and print what is new: multi-byte
        // characters split across tokens come out whole.
        ids.push(id);
        if let Ok(text) = model.tokenizer.decode(&ids, false) {
            if text.len() > shown.len() && text.starts_with(&shown) {
                print!("{}", &text[shown.len()..]);
                let _ = std::io::stdout().flush();
                shown = text;
            }
        }
    })?;
    let answers: Vec<String> = out
        .rows
        .iter()
        .map(|r| {
            let kept: Vec<u32> = r
                .tokens
                .iter()
                .copied()
                .filter(|t| !model.tokenizer.stop.contains(t))
                .collect();
            model.tokenizer.decode(&kept, false)
        })
        .collect::<moac_model::Result<_>>()?;
    let (kv, dense) = (attn.kv_bytes(), attn.dense_kv_bytes());
    if a.json {
        let row_json = |i: usize| {
            let r = &out.rows[i];
            let mut o = serde_json::json!({
                "prompt_tokens": prompts[i],
                "tokens": r.tokens,
                "text": answers[i],
                "stopped": r.stopped,
            });
            if a.top_logprobs > 0 {
                o["top_logprobs"] = serde_json::json!(r
                    .top_logprobs
                    .iter()
                    .map(|step| step
                        .iter()
                        .map(|&(id, lp)| serde_json::json!([id, lp]))
                        .collect::<Vec<_>>())
                    .collect::<Vec<_>>());
            }
            o
        };
        let mut obj = if prompts.len() == 1 {
            row_json(0)
        } else {
            serde_json::json!({ "rows": (0..prompts.len()).map(row_json).collect::<Vec<_>>() })
        };
        obj["plan"] = serde_json::json!(plan.name());
        obj["backend"] = serde_json::json!(rt.backend().to_string());
        obj["prefill_s"] = serde_json::json!(out.prefill_s);
        obj["decode_tokens_per_s"] = serde_json::json!(out.decode_tokens_per_s());
        obj["kv_bytes"] = serde_json::json!(kv);
        obj["dense_kv_bytes"] = serde_json::json!(dense);
        println!("{obj}");
    } else {
        if stream {
            println!();
        } else {
            for (i, t) in answers.iter().enumerate() {
                println!("[{i}] {t}");
            }
        }
        eprintln!(
            "{} prompt(s), {} tokens at most; plan {}, {} backend",
            prompts.len(),
            longest,
            plan.name(),
            rt.backend()
        );
        eprintln!(
            "prefill {:.3} s; decode {} steps, {:.1} tokens/s; KV cache {} ({:.1}% of dense {})",
            out.prefill_s,
            out.decode_steps,
            out.decode_tokens_per_s(),
            mib(kv),
            100.0 * kv as f64 / dense.max(1) as f64,
            mib(dense)
        );
    }
    Ok(())
}
