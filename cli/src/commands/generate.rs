//! `moac generate`: text from a real model with its attention through moac (a plan, or
//! `--dense`: every span = N), streamed to stdout as it decodes; prefill time, decode
//! tokens/s and KV bytes against dense on stderr; or one JSON object with `--json`.
//!
//! `--engine host` (the default) runs the model on the CPU with attention on
//! `--backend`; `--engine device` runs the whole model on the device engine (emu or
//! cuda). `--shape CONFIG --seed S` takes random weights for any Llama config instead of
//! `--model` (prompts as `--prompt-tokens`); `--check` compares the device engine's
//! logits with the host runner's at every step.

use super::device::{open_gpu, open_source, source_plan};
use super::model::{mib, ModelArgs};
use crate::{CliError, Result};
use clap::{Args, ValueEnum};
use moac_model::attention::Engine;
use moac_model::engine::{DeviceSampling, Source};
use moac_model::generate::{generate, GenerateOptions, GenerateOutput, RowOutput, Sampling};
use moac_model::tokenizer::Tokenizer;
use moac_runtime::{Artifact, Backend, Runtime};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

/// Which runner generates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EngineKind {
    /// The model on the CPU (candle tensors), attention through moac on --backend.
    Host,
    /// The whole model on the device engine (--backend emu or cuda): weights,
    /// activations and the compacted cache in device buffers.
    Device,
}

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
        required_unless_present_any = ["prompt_file", "prompt_tokens"],
        conflicts_with_all = ["prompt_file", "prompt_tokens"]
    )]
    pub prompt: Vec<String>,
    /// A prompt as token ids, comma-separated (no tokenizer needed); repeat for a batch.
    #[arg(long, conflicts_with = "prompt_file")]
    pub prompt_tokens: Vec<String>,
    /// Random weights for this model config instead of --model: a Hugging Face
    /// config.json (or its folder), a GGUF file (only its header is read), or a known
    /// shape (llama-3-8b, llama-3.2-1b, vicuna-7b); the same weights on every backend
    /// for the same --seed.
    #[arg(long)]
    pub shape: Option<PathBuf>,
    /// host: the model on the CPU, attention on --backend; device: the whole model on
    /// the device engine (--backend emu or cuda).
    #[arg(long, value_enum, default_value_t = EngineKind::Host)]
    pub engine: EngineKind,
    /// With --engine device and --shape: run the host runner (cpu backend) on the same
    /// weights beside it, compare every step's logits, fail beyond the dtype's bound.
    #[arg(long)]
    pub check: bool,
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
    /// Seed of the sampler (and of the weights with --shape).
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

/// `--prompt-tokens 1,2,3`: the ids, each below the vocabulary size.
fn parse_tokens(text: &str, vocab: usize) -> Result<Vec<u32>> {
    let ids = text
        .split(',')
        .map(|t| {
            let t = t.trim();
            t.parse::<u32>()
                .ok()
                .filter(|&id| (id as usize) < vocab)
                .ok_or_else(|| {
                    CliError::Usage(format!(
                        "--prompt-tokens {text:?}: {t:?} is not a token id below the vocabulary size {vocab}"
                    ))
                })
        })
        .collect::<Result<Vec<u32>>>()?;
    if ids.is_empty() {
        return Err(CliError::Usage("--prompt-tokens: no ids".into()));
    }
    Ok(ids)
}

/// The prompts as token ids: `--prompt-tokens`, or text through the model's tokenizer
/// (and chat template with `--chat`).
fn prompts(a: &GenerateArgs, source: &Source) -> Result<Vec<Vec<u32>>> {
    let vocab = source.config().vocab_size;
    if !a.prompt_tokens.is_empty() {
        return a
            .prompt_tokens
            .iter()
            .map(|t| parse_tokens(t, vocab))
            .collect();
    }
    let Source::Model(model) = source else {
        return Err(CliError::Usage(
            "--shape has no tokenizer: give the prompts as --prompt-tokens 1,2,3".into(),
        ));
    };
    let texts: Vec<String> = match &a.prompt_file {
        Some(f) => vec![std::fs::read_to_string(f)
            .map_err(|e| CliError::Usage(format!("{}: {e}", f.display())))?],
        None => a.prompt.clone(),
    };
    if let Some(i) = texts.iter().position(|t| t.is_empty()) {
        return Err(CliError::Usage(format!("prompt {i} is empty")));
    }
    Ok(texts
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
        .collect::<moac_model::Result<_>>()?)
}

pub fn run(a: GenerateArgs) -> Result<()> {
    check_sampling(&a)?;
    if a.check && (a.engine != EngineKind::Device || a.shape.is_none()) {
        return Err(CliError::Usage(
            "--check compares the device engine with the host runner on the same weights: use it with --engine device and --shape".into(),
        ));
    }
    if a.engine == EngineKind::Device && a.top_logprobs > 0 {
        return Err(CliError::Usage(
            "--top-logprobs is reported by --engine host only".into(),
        ));
    }
    let source = open_source(&a.model, a.shape.as_deref(), a.seed)?;
    let plan = source_plan(&source, a.plan.as_deref(), a.dense)?;
    let prompts = prompts(&a, &source)?;
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let limit = source.config().context_len;
    if longest.saturating_add(a.max_new_tokens) > limit {
        return Err(CliError::Usage(format!(
            "the prompt ({longest} tokens) plus --max-new-tokens {} is more than the {limit} tokens {} takes",
            a.max_new_tokens,
            source.path().display()
        )));
    }
    let tokenizer = match &source {
        Source::Model(m) => Some(&m.tokenizer),
        Source::Shape { .. } => None,
    };
    let stop: Vec<u32> = tokenizer.map(|t| t.stop.clone()).unwrap_or_default();
    let stream = !a.json && prompts.len() == 1 && tokenizer.is_some();
    let mut shown = String::new();
    let mut ids = Vec::new();
    let mut on_token = |_: usize, id: u32| {
        let Some(tok) = tokenizer.filter(|_| stream) else {
            return;
        };
        if tok.stop.contains(&id) {
            return;
        }
        // Decode the whole answer so far and print what is new: multi-byte
        // characters split across tokens come out whole.
        ids.push(id);
        if let Ok(text) = tok.decode(&ids, false) {
            if text.len() > shown.len() && text.starts_with(&shown) {
                print!("{}", &text[shown.len()..]);
                let _ = std::io::stdout().flush();
                shown = text;
            }
        }
    };
    let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let sampling = Sampling {
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
    };
    let run = match a.engine {
        EngineKind::Host => {
            let host = source.host_llama(a.model.dtype)?;
            let rt = a.model.runtime(&plan)?;
            let mut attn = a
                .model
                .engine(&rt)
                .open(prompts.len(), longest, a.max_new_tokens)?;
            let opts = GenerateOptions {
                max_new_tokens: a.max_new_tokens,
                sampling,
                stop: stop.clone(),
                top_logprobs: a.top_logprobs,
            };
            let out = generate(&host, attn.as_mut(), &refs, &opts, &mut on_token)?;
            let tps = out.decode_tokens_per_s();
            Ran {
                out,
                tokens_per_s: tps,
                kv: attn.kv_bytes(),
                dense: attn.dense_kv_bytes(),
                where_: format!("{} backend", rt.backend()),
                check: None,
            }
        }
        EngineKind::Device => run_device(&a, &source, &plan, &refs, &stop, &mut on_token)?,
    };
    report(&a, &prompts, &run, tokenizer, plan.name(), stream, longest)
}

/// What a generation run gives the report.
struct Ran {
    out: GenerateOutput,
    tokens_per_s: f64,
    kv: u64,
    dense: u64,
    /// `cpu backend`, `device engine on emu`, ...
    where_: String,
    /// With --check: the worst relative logit error and its bound.
    check: Option<(f32, f32)>,
}

/// The largest |a - b| of a row relative to the row's largest |b|.
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(
            0f32,
            |m, e| if e.is_nan() { f32::INFINITY } else { m.max(e) },
        )
        / scale
}

/// The whole model on the device engine: prefill, then sample on the device and step
/// until every row stopped or the token limit; rows that stop leave the batch.
fn run_device(
    a: &GenerateArgs,
    source: &Source,
    plan: &moac::ValidPlan,
    prompts: &[&[u32]],
    stop: &[u32],
    on_token: &mut dyn FnMut(usize, u32),
) -> Result<Ran> {
    let gpu = open_gpu(&a.model)?;
    let eng = source.engine(&gpu, plan, a.model.dtype, a.model.prefill_mode)?;
    let sampling = if a.temperature == 0.0 {
        DeviceSampling::Greedy
    } else {
        DeviceSampling::TopP {
            temperature: a.temperature,
            top_p: a.top_p,
            seed: a.seed,
        }
    };
    // --check: the host runner on the cpu backend, same weights, same plan and dtype.
    let host = if a.check {
        Some(source.host_llama(a.model.dtype)?)
    } else {
        None
    };
    let host_rt = if a.check {
        Some(Runtime::new(
            Artifact::from_plan(plan, a.model.dtype, None)?,
            Backend::Cpu,
        )?)
    } else {
        None
    };
    let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    let mut host_attn = match &host_rt {
        Some(rt) => Some(
            Engine::Moac {
                runtime: rt,
                mode: a.model.prefill_mode,
            }
            .open(prompts.len(), longest, a.max_new_tokens)?,
        ),
        None => None,
    };
    // 8 units in the last place of the dtype for a 2-layer model (the emu tests
    // measure about 4), growing with the square root of the depth: each layer's
    // roundings of its GEMM inputs are independent and add in quadrature.
    let depth = (eng.config().num_layers as f32 / 2.0).sqrt().max(1.0);
    let bound = 8.0
        * depth
        * match a.model.dtype {
            moac::Dtype::F16 => 2f32.powi(-11),
            moac::Dtype::Bf16 => 2f32.powi(-8),
        };
    let mut worst = 0f32;
    let vocab = eng.config().vocab_size;
    let mut compare = |got: &[f32], want: &[Vec<f32>], what: &str| -> Result<()> {
        for (r, w) in want.iter().enumerate() {
            let e = rel_err(&got[r * vocab..(r + 1) * vocab], w);
            worst = worst.max(e);
            if e.is_nan() || e > bound {
                return Err(CliError::Usage(format!(
                    "--check failed: {what}, row {r}: the device engine's logits differ from the host runner's by {e:.3e} of the largest logit (bound {bound:.1e})"
                )));
            }
        }
        Ok(())
    };
    let t0 = Instant::now();
    let mut s = eng.start(prompts, a.max_new_tokens)?;
    if let (Some(h), Some(attn)) = (&host, host_attn.as_mut()) {
        let hid = h.prefill(attn.as_mut(), prompts)?;
        let want = prompts
            .iter()
            .enumerate()
            .map(|(r, p)| -> Result<Vec<f32>> {
                Ok(h.logits(&hid.get(r)?.get(p.len() - 1)?)?.to_vec1::<f32>()?)
            })
            .collect::<Result<Vec<_>>>()?;
        compare(&eng.logits(&s)?, &want, "prefill")?;
    }
    let b = prompts.len();
    let mut rows = vec![RowOutput::default(); b];
    let mut prefill_s = 0.0;
    let mut decode_start = Instant::now();
    let mut steps = 0;
    let mut after_first = 0usize;
    for step in 0..a.max_new_tokens {
        let tokens = eng.sample(&mut s, sampling)?;
        for (row, &t) in tokens.iter().enumerate() {
            let seq = s.seq_ids()[row];
            rows[seq].tokens.push(t);
            on_token(seq, t);
            if stop.contains(&t) {
                rows[seq].stopped = true;
            }
            if step > 0 {
                after_first += 1;
            }
        }
        if step == 0 {
            prefill_s = t0.elapsed().as_secs_f64();
            decode_start = Instant::now();
        }
        if step + 1 == a.max_new_tokens {
            break;
        }
        if host.is_none() {
            eng.retain(&mut s, |seq| !rows[seq].stopped)?;
            if s.rows() == 0 {
                break;
            }
        }
        eng.step(&mut s, None)?;
        steps += 1;
        if let (Some(h), Some(attn)) = (&host, host_attn.as_mut()) {
            let pos: Vec<usize> = s.lens().iter().map(|&l| l - 1).collect();
            let hid = h.decode(attn.as_mut(), &tokens, &pos)?;
            let want = h.logits(&hid)?.to_vec2::<f32>()?;
            compare(
                &eng.logits(&s)?,
                &want,
                &format!("decode step {}", step + 1),
            )?;
        }
    }
    if let Some(note) = s.graph_note() {
        eprintln!("{note}");
    }
    // The last step's tokens were sampled but need no further logits: the timing ends
    // with the last sample.
    let decode_s = decode_start.elapsed().as_secs_f64();
    let out = GenerateOutput {
        rows,
        prefill_s,
        decode_s,
        decode_steps: steps,
    };
    let dense = s.geometry().dense_kv_bytes(eng.dtype(), b as u64);
    Ok(Ran {
        tokens_per_s: if decode_s > 0.0 {
            after_first as f64 / decode_s
        } else {
            0.0
        },
        out,
        kv: s.kv_bytes(),
        dense,
        where_: format!("device engine on {}", gpu.describe()),
        check: host.map(|_| (worst, bound)),
    })
}

fn report(
    a: &GenerateArgs,
    prompts: &[Vec<u32>],
    run: &Ran,
    tokenizer: Option<&Tokenizer>,
    plan: &str,
    stream: bool,
    longest: usize,
) -> Result<()> {
    let out = &run.out;
    let answers: Vec<Option<String>> = out
        .rows
        .iter()
        .map(|r| {
            tokenizer
                .map(|tok| {
                    let kept: Vec<u32> = r
                        .tokens
                        .iter()
                        .copied()
                        .filter(|t| !tok.stop.contains(t))
                        .collect();
                    tok.decode(&kept, false)
                })
                .transpose()
        })
        .collect::<moac_model::Result<_>>()?;
    let (kv, dense) = (run.kv, run.dense);
    if a.json {
        let row_json = |i: usize| {
            let r = &out.rows[i];
            let mut o = serde_json::json!({
                "prompt_tokens": prompts[i],
                "tokens": r.tokens,
                "stopped": r.stopped,
            });
            if let Some(t) = &answers[i] {
                o["text"] = serde_json::json!(t);
            }
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
        obj["plan"] = serde_json::json!(plan);
        obj["backend"] = serde_json::json!(a.model.backend.to_string());
        obj["engine"] = serde_json::json!(match a.engine {
            EngineKind::Host => "host",
            EngineKind::Device => "device",
        });
        obj["prefill_s"] = serde_json::json!(out.prefill_s);
        obj["decode_tokens_per_s"] = serde_json::json!(run.tokens_per_s);
        obj["kv_bytes"] = serde_json::json!(kv);
        obj["dense_kv_bytes"] = serde_json::json!(dense);
        if let Some((worst, bound)) = run.check {
            obj["check"] = serde_json::json!({ "max_rel_logit_error": worst, "bound": bound });
        }
        println!("{obj}");
    } else {
        if stream {
            println!();
        } else {
            for (i, (t, r)) in answers.iter().zip(&out.rows).enumerate() {
                match t {
                    Some(t) => println!("[{i}] {t}"),
                    None => println!(
                        "[{i}] {}",
                        r.tokens
                            .iter()
                            .map(u32::to_string)
                            .collect::<Vec<_>>()
                            .join(",")
                    ),
                }
            }
        }
        eprintln!(
            "{} prompt(s), {} tokens at most; plan {}, {}",
            prompts.len(),
            longest,
            plan,
            run.where_
        );
        eprintln!(
            "prefill {:.3} s; decode {} steps, {:.1} tokens/s; KV cache {} ({:.1}% of dense {})",
            out.prefill_s,
            out.decode_steps,
            run.tokens_per_s,
            mib(kv),
            100.0 * kv as f64 / dense.max(1) as f64,
            mib(dense)
        );
        if let Some((worst, bound)) = run.check {
            eprintln!(
                "check: the device engine's logits match the host runner's to {worst:.2e} of the largest logit (bound {bound:.1e})"
            );
        }
    }
    Ok(())
}
