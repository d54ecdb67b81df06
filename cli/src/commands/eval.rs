//! `moac eval perplexity` and `moac eval retrieval`: dense against MoA on a real model.

use super::model::{mib, plan_for, progress_bar, ModelArgs};
use super::parse;
use crate::{CliError, Result};
use clap::{Args, Subcommand};
use moac::ValidPlan;
use moac_model::eval::{last_integer, perplexity, PplMode, PplOptions};
use moac_model::generate::{generate, GenerateOptions, Rng};
use moac_model::retrieval::{self, Task};
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum EvalCommand {
    /// Perplexity of a text in windows of --context-len tokens.
    Perplexity(PerplexityArgs),
    /// Retrieval accuracy (LongEval lines, or a pass key) at several input lengths, for
    /// every plan given and dense.
    Retrieval(RetrievalArgs),
    /// Retrieval heads: on the calibration's true-answer samples, how often each head's
    /// strongest attention lands on the answer token in the prompt while the model
    /// copies it; with plans, the span each plan gives the strongest heads.
    Heads(HeadsArgs),
}

#[derive(Args)]
pub struct HeadsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A calibration file of `moac calibrate` (its true-answer samples are scored).
    #[arg(long)]
    pub calib: PathBuf,
    /// Score only the samples of these lengths (default: all).
    #[arg(long, value_delimiter = ',')]
    pub lengths: Vec<usize>,
    /// Plans whose spans for the strongest heads are shown.
    #[arg(long)]
    pub plan: Vec<PathBuf>,
    /// How many of the strongest heads to list.
    #[arg(long, default_value_t = 20)]
    pub top: usize,
    /// Write every head's scores (JSON).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
}

#[derive(Args)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, conflicts_with = "dense")]
    pub plan: Option<PathBuf>,
    #[arg(long)]
    pub dense: bool,
    /// The text to score.
    #[arg(long)]
    pub text_file: PathBuf,
    /// Tokens per window (each window is its own sequence).
    #[arg(long)]
    pub context_len: usize,
    /// prefill: every position from the prefill; decode: the second half of each window
    /// fed through decode steps (teacher forcing).
    #[arg(long, value_parser = parse::<PplMode>, default_value = "prefill")]
    pub mode: PplMode,
    /// Added to N = context_len when sizing the cache and the spans.
    #[arg(long, default_value_t = 0)]
    pub max_new_tokens: usize,
    /// Score at most this many windows.
    #[arg(long)]
    pub max_windows: Option<usize>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct RetrievalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A plan to compare (repeat for several); dense is always run alongside.
    #[arg(long)]
    pub plan: Vec<PathBuf>,
    /// Run dense (the default when no plan is given; always run with plans).
    #[arg(long)]
    pub dense: bool,
    #[arg(long, value_parser = parse::<Task>)]
    pub task: Task,
    /// Input lengths in tokens, comma-separated.
    #[arg(long, value_parser = retrieval::parse_length, value_delimiter = ',', default_value = "1024,2048,4096")]
    pub lengths: Vec<usize>,
    /// Samples per length (their hidden items spread over the input's depth), or per
    /// depth with --depths.
    #[arg(long, default_value_t = 8)]
    pub samples: usize,
    /// Depths (0..1) of the hidden item, comma-separated: `--samples` prompts at each
    /// (each its own draw of values and keys).
    #[arg(long, value_delimiter = ',')]
    pub depths: Vec<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The start of the answer, put in the assistant's turn (default: the task's own,
    /// e.g. "The pass key is"; "" for none).
    #[arg(long)]
    pub answer_prefix: Option<String>,
    /// Tokens the answer may take.
    #[arg(long, default_value_t = 16)]
    pub max_new_tokens: usize,
    /// Write a plot of accuracy against length (SVG).
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Print every answer (plan, length, depth, expected value, the model's text) to
    /// stderr.
    #[arg(long)]
    pub answers: bool,
    #[arg(long)]
    pub json: bool,
}

pub fn run(c: EvalCommand) -> Result<()> {
    match c {
        EvalCommand::Perplexity(a) => run_perplexity(a),
        EvalCommand::Retrieval(a) => run_retrieval(a),
        EvalCommand::Heads(a) => run_heads(a),
    }
}

fn run_perplexity(a: PerplexityArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.text_file)
        .map_err(|e| CliError::Usage(format!("{}: {e}", a.text_file.display())))?;
    let model = a.model.load()?;
    let plan = super::model::plan_or_dense(&model, a.plan.as_deref(), a.dense)?;
    let tokens = model.prompt(&text)?;
    let rt = a.model.runtime(&plan)?;
    let bar = progress_bar(!a.json, "perplexity");
    let r = perplexity(
        &model.llama,
        a.model.engine(&rt),
        &tokens,
        &PplOptions {
            context_len: a.context_len,
            mode: a.mode,
            extra_new_tokens: a.max_new_tokens,
            max_windows: a.max_windows,
        },
        &mut |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        },
    )?;
    bar.finish_and_clear();
    if a.json {
        let mut o = serde_json::to_value(r).map_err(|e| CliError::Usage(e.to_string()))?;
        o["plan"] = serde_json::json!(plan.name());
        o["mode"] = serde_json::json!(format!("{:?}", a.mode).to_lowercase());
        o["context_len"] = serde_json::json!(a.context_len);
        println!("{o}");
    } else {
        println!(
            "{}: {} tokens scored in {} windows of {} ({:?} mode): nll {:.4}, ppl {:.3}; KV cache {} ({:.1}% of dense)",
            plan.name(),
            r.tokens,
            r.windows,
            a.context_len,
            a.mode,
            r.nll,
            r.ppl,
            mib(r.kv_bytes),
            100.0 * r.kv_bytes as f64 / r.dense_kv_bytes.max(1) as f64
        );
    }
    Ok(())
}

/// One compared configuration's results: accuracy per length.
#[derive(serde::Serialize)]
struct Series {
    plan: String,
    /// Per length: correct samples.
    correct: Vec<usize>,
    accuracy: Vec<f64>,
    /// Per length: KV bytes of one sample's cache and a dense one.
    kv_bytes: Vec<u64>,
    dense_kv_bytes: Vec<u64>,
}

fn run_retrieval(a: RetrievalArgs) -> Result<()> {
    retrieval::check_samples(a.samples)?;
    if let Some(d) = a.depths.iter().find(|d| !(0.0..=1.0).contains(*d)) {
        return Err(CliError::Usage(format!(
            "--depths: {d} is not a depth in [0, 1]"
        )));
    }
    let model = a.model.load()?;
    let mut plans: Vec<ValidPlan> = Vec::new();
    plans.push(model.llama.dense_plan(Path::new("dense"))?);
    for p in &a.plan {
        plans.push(plan_for(&model, p)?);
    }
    let prefix = a
        .answer_prefix
        .clone()
        .unwrap_or_else(|| a.task.default_answer_prefix().to_string());
    let limit = model.llama.config.context_len;
    // The samples, the same for every plan.
    let mut rng = Rng::new(a.seed);
    let mut samples = Vec::new();
    for &len in &a.lengths {
        let mut row = Vec::new();
        let depths: Vec<f64> = if a.depths.is_empty() {
            retrieval::depths(a.samples)
        } else {
            a.depths
                .iter()
                .flat_map(|&d| std::iter::repeat_n(d, a.samples))
                .collect()
        };
        for depth in depths {
            let s = retrieval::make_sample(a.task, &model.tokenizer, len, depth, &mut rng)?;
            let ids = model.chat_prompt(&s.user, &prefix)?;
            if ids.len().saturating_add(a.max_new_tokens) > limit {
                return Err(CliError::Usage(format!(
                    "length {len}: the prompt takes {} tokens, with --max-new-tokens {} more than the {limit} the model takes",
                    ids.len(),
                    a.max_new_tokens
                )));
            }
            row.push((s, ids));
        }
        samples.push(row);
    }
    let bar = progress_bar(!a.json, &format!("retrieval {}", a.task.name()));
    let per_length = samples.first().map_or(0, |r| r.len());
    bar.set_length((plans.len() * a.lengths.len() * per_length) as u64);
    let mut series = Vec::new();
    for plan in &plans {
        let rt = a.model.runtime(plan)?;
        let engine = a.model.engine(&rt);
        let mut s = Series {
            plan: plan.name().to_string(),
            correct: Vec::new(),
            accuracy: Vec::new(),
            kv_bytes: Vec::new(),
            dense_kv_bytes: Vec::new(),
        };
        for row in &samples {
            let mut ok = 0;
            let (mut kv, mut dense) = (0, 0);
            for (sample, ids) in row {
                let mut attn = engine.open(1, ids.len(), a.max_new_tokens)?;
                let opts = GenerateOptions {
                    max_new_tokens: a.max_new_tokens,
                    stop: model.tokenizer.stop.clone(),
                    ..GenerateOptions::default()
                };
                let out = generate(&model.llama, attn.as_mut(), &[ids], &opts, &mut |_, _| {})?;
                let answer = model.tokenizer.decode(&out.rows[0].tokens, false)?;
                let right = last_integer(&answer) == Some(sample.value);
                if right {
                    ok += 1;
                }
                if a.answers {
                    eprintln!(
                        "{} n={} depth={:.2} want {} {}: {:?}",
                        plan.name(),
                        ids.len(),
                        sample.depth,
                        sample.value,
                        if right { "ok" } else { "WRONG" },
                        answer.trim()
                    );
                }
                kv = attn.kv_bytes();
                dense = attn.dense_kv_bytes();
                bar.inc(1);
            }
            s.correct.push(ok);
            s.accuracy.push(ok as f64 / row.len().max(1) as f64);
            s.kv_bytes.push(kv);
            s.dense_kv_bytes.push(dense);
        }
        series.push(s);
    }
    bar.finish_and_clear();
    if let Some(svg) = &a.svg {
        let text = moac_model::svg::accuracy_plot(
            &format!("{} retrieval, {}", a.task.name(), model.path.display()),
            &a.lengths,
            &series
                .iter()
                .map(|s| (s.plan.clone(), s.accuracy.clone()))
                .collect::<Vec<_>>(),
        );
        moac::fsutil::write_atomic(svg, text.as_bytes())?;
    }
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "task": a.task.name(),
                "lengths": a.lengths,
                "samples": a.samples,
                "seed": a.seed,
                "answer_prefix": prefix,
                "series": series,
            })
        );
    } else {
        print!("{:<24}", "plan \\ length");
        for l in &a.lengths {
            print!(" {l:>8}");
        }
        println!("   KV at the longest (of dense)");
        for s in &series {
            print!("{:<24}", s.plan);
            for acc in &s.accuracy {
                print!(" {:>7.0}%", acc * 100.0);
            }
            let (kv, dense) = (
                s.kv_bytes.last().copied().unwrap_or(0),
                s.dense_kv_bytes.last().copied().unwrap_or(0),
            );
            println!(
                "   {} ({:.0}%)",
                mib(kv),
                100.0 * kv as f64 / dense.max(1) as f64
            );
        }
    }
    Ok(())
}

fn run_heads(a: HeadsArgs) -> Result<()> {
    use moac_model::pipeline::calib::CalibSet;
    use moac_model::pipeline::heads::RetrievalScores;
    use moac_model::pipeline::tasks::Family;
    let model = a.model.load()?;
    let set = CalibSet::read(&a.calib)?;
    set.check_model(&a.calib, &model)?;
    let plans: Vec<ValidPlan> = a
        .plan
        .iter()
        .map(|p| plan_for(&model, p))
        .collect::<Result<_>>()?;
    let c = &model.llama.config;
    let mut total = RetrievalScores::zero(c.num_layers, c.num_heads);
    let samples: Vec<_> = set
        .samples
        .iter()
        .filter(|s| {
            // Retrieval answers only: a prose continuation is true text, not a retrieval.
            s.truth
                && Family::of_task(&s.task) != Some(Family::Prose)
                && (a.lengths.is_empty() || a.lengths.contains(&s.length))
        })
        .collect();
    if samples.is_empty() {
        return Err(CliError::Usage(format!(
            "{}: no true-answer samples{} to score",
            a.calib.display(),
            if a.lengths.is_empty() {
                ""
            } else {
                " of those lengths"
            }
        )));
    }
    for (i, s) in samples.iter().enumerate() {
        let one = model.llama.retrieval_scores(&s.tokens, s.prompt_len)?;
        eprintln!(
            "[{}/{}] {}: {} copy steps",
            i + 1,
            samples.len(),
            s.id,
            one.steps
        );
        if one.steps > 0 {
            total.add_sample(&one);
        }
    }
    let mut order: Vec<(usize, usize)> = (0..c.num_layers)
        .flat_map(|l| (0..c.num_heads).map(move |h| (l, h)))
        .collect();
    order.sort_by(|x, y| total.hit[y.0][y.1].total_cmp(&total.hit[x.0][x.1]));
    let g = c.num_heads / c.num_kv_heads.max(1);
    let n = samples.iter().map(|s| s.length).max().unwrap_or(0) as u64;
    println!(
        "retrieval heads of {} ({} samples, {} copy steps); spans at N = {n}",
        model.path.display(),
        total.samples,
        total.steps
    );
    let mut head = format!(
        "{:>5} {:>4} {:>3} {:>6} {:>6}",
        "layer", "head", "kv", "hit", "mass"
    );
    for p in &plans {
        head.push_str(&format!(" {:>12}", p.name()));
    }
    println!("{head}");
    for &(l, h) in order.iter().take(a.top) {
        let mut line = format!(
            "{l:>5} {h:>4} {:>3} {:>6.3} {:>6.3}",
            h / g,
            total.hit[l][h],
            total.mass[l][h]
        );
        for p in &plans {
            let cap = moac::geometry::capacity(p.layer(l)[h], n, p.settings());
            line.push_str(&format!(" {:>11.0}%", 100.0 * cap as f64 / n.max(1) as f64));
        }
        println!("{line}");
    }
    if let Some(out) = &a.output {
        let json = serde_json::json!({
            "model": model.path.display().to_string(),
            "calib": a.calib.display().to_string(),
            "samples": total.samples,
            "steps": total.steps,
            "hit": total.hit,
            "mass": total.mass,
        });
        let text =
            serde_json::to_string_pretty(&json).map_err(|e| CliError::Usage(e.to_string()))?;
        moac::fsutil::write_atomic(out, text.as_bytes())?;
    }
    Ok(())
}
