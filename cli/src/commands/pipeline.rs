//! MoA's plan pipeline for any Llama-family model moac loads: `moac calibrate`,
//! `moac profile`, `moac optimize`, `moac validate`, and `moac plan make` (all four).

use super::model::{progress_bar, ModelArgs};
use crate::{CliError, Result};
use clap::Args;
use moac::plan::Settings;
use moac_model::pipeline::calib::{CalibOptions, CalibSample, CalibSet};
use moac_model::pipeline::make::{
    Made, MakeOptions, HELD_OUT_SEED, MAKE_INTERVALS, MAX_ANSWER, VALIDATE_PLANS, VALIDATE_SAMPLES,
};
use moac_model::pipeline::objective::{
    optimize, Influence, MadePlan, Needle, OptimizeOptions, Optimized, MIP_GAP, NEEDLE,
    POOL_INFLUENCE, RETRIEVAL_WEIGHT,
};
use moac_model::pipeline::profile::Profile;
use moac_model::pipeline::stages::{self, Progress, ValidateOptions, Validated, Validation};
use moac_model::pipeline::tasks::{Family, DEFAULT_MIX};
use moac_model::weights::WeightMode;
use moac_model::Model;
use std::path::{Path, PathBuf};
use std::time::Instant;

fn lengths_arg(s: &str) -> std::result::Result<usize, String> {
    moac_model::retrieval::parse_length(s)
}

fn weight_arg(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(w) if (0.0..=1.0).contains(&w) => Ok(w),
        Ok(w) => Err(format!("{w} is not a weight in [0, 1]")),
        Err(e) => Err(format!("{s:?}: {e}")),
    }
}

fn gap_arg(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(g) if g.is_finite() && g >= 0.0 => Ok(g),
        Ok(g) => Err(format!("{g} is not a relative gap (a finite number >= 0)")),
        Err(e) => Err(format!("{s:?}: {e}")),
    }
}

fn families_arg(s: &str) -> std::result::Result<Family, String> {
    Family::parse(s)
}

const DEFAULT_FAMILIES: &str = "kv,needle,facts,multi,summary,town";

#[derive(Args, Clone)]
pub struct CalibrateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Real text (UTF-8) for the haystacks, fact questions and summaries (default: the
    /// World Factbook text of scripts/setup-calib-text.sh, in models/text/ beside the
    /// model, when it is there).
    #[arg(long)]
    pub source: Vec<PathBuf>,
    /// Task families, taken in turn: kv, needle, multi (true answers), facts, summary,
    /// town (the model's own answers), prose (real text and its own continuation: the
    /// language-modelling loss; not in the default mix).
    #[arg(long, value_parser = families_arg, value_delimiter = ',', default_value = DEFAULT_FAMILIES)]
    pub families: Vec<Family>,
    /// Length levels N (prompt = N - max answer), comma-separated; 1k style accepted.
    #[arg(long, value_parser = lengths_arg, value_delimiter = ',', default_value = "1024,2048,4096")]
    pub lengths: Vec<usize>,
    /// Samples per length.
    #[arg(long, default_value_t = 4)]
    pub samples: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The longest answer (tokens).
    #[arg(long, default_value_t = 128)]
    pub max_answer: usize,
    /// Samples answered together.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Output calibration file (JSON lines).
    #[arg(short, long)]
    pub output: PathBuf,
}

#[derive(Args, Clone)]
pub struct ProfileArgs {
    /// The model (GGUF or Hugging Face folder); held in f32 for the exact backward.
    #[arg(long)]
    pub model: PathBuf,
    /// The calibration file of `moac calibrate`.
    #[arg(long)]
    pub calib: PathBuf,
    /// Length levels to profile (default: every length in the calibration file).
    #[arg(long, value_parser = lengths_arg, value_delimiter = ',')]
    pub lengths: Vec<usize>,
    /// Profile only the samples of these task families (ablations; default: all).
    #[arg(long, value_parser = families_arg, value_delimiter = ',')]
    pub families: Vec<Family>,
    /// Profile at most this many samples per length (the first ones; ablations).
    #[arg(long)]
    pub max_samples: Option<usize>,
    /// Keep each sample's profile in <output>.parts/ (a profile of any subset of the
    /// samples then costs nothing: ablations).
    #[arg(long)]
    pub keep_parts: bool,
    /// Attention-sink tokens of the plans to come (a multiple of 64).
    #[arg(long, default_value_t = Settings::default().sink)]
    pub sink: u64,
    /// Output profile (safetensors); finished samples are kept in <output>.parts/.
    #[arg(short, long)]
    pub output: PathBuf,
}

/// The optimizer's objective, shared by `moac optimize` and `moac plan make`.
#[derive(Args, Debug, Clone)]
pub struct ObjectiveArgs {
    /// Share of each length's objective given to the needle term (what a plan drops at
    /// the copy steps of the calibration; the rest: the attention influence); 0 =
    /// influence only.
    #[arg(long, default_value_t = RETRIEVAL_WEIGHT, value_parser = weight_arg)]
    pub retrieval_weight: f64,
    /// How a span's influence adds up: entries (MoA's sum of every entry's |E|; the
    /// default) or rows (each row's dropped entries taken together).
    #[arg(long, value_parser = super::parse::<Influence>, default_value = "entries")]
    pub influence: Influence,
    /// Share of each head's influence replaced by the mean over all heads at the same
    /// span (0 = each head's own, MoA's; 1 = one curve for all: the needle term alone
    /// tells heads apart).
    #[arg(long, default_value_t = POOL_INFLUENCE, value_parser = weight_arg)]
    pub pool_influence: f64,
    /// What the needle term counts at the copy steps: attention (the attention on the
    /// needle) or influence (what masking the needle costs the answer; needs a profile
    /// of version 3).
    #[arg(long, value_parser = super::parse::<Needle>, default_value_t = NEEDLE)]
    pub needle: Needle,
    /// Each MILP solve stops once its plan is proven within this relative gap of the
    /// optimum (0 = prove the optimum; the gap reached is reported per plan).
    #[arg(long, default_value_t = MIP_GAP, value_parser = gap_arg)]
    pub mip_gap: f64,
}

#[derive(Args, Clone)]
pub struct OptimizeArgs {
    /// The profile of `moac profile`.
    #[arg(long)]
    pub profile: PathBuf,
    /// The model (GGUF or folder) the plans are for.
    #[arg(long)]
    pub model: PathBuf,
    /// KV bytes at most this fraction of the dense cache's, at every constraint length.
    #[arg(long)]
    pub density: f64,
    /// Lengths where the density must hold (default: the profiled lengths, the model's
    /// context and every doubling between).
    #[arg(long, value_parser = lengths_arg, value_delimiter = ',')]
    pub constraint_lengths: Vec<usize>,
    /// At most R distinct rules per layer (MoA's kernels' limit; moac has none).
    #[arg(long)]
    pub max_rules_per_layer: Option<usize>,
    /// Step of the alpha grid (default: MoA's).
    #[arg(long)]
    pub alpha_step: Option<u64>,
    /// Grid intervals per objective of the epsilon-constraint method.
    #[arg(long, default_value_t = 4)]
    pub intervals: usize,
    #[command(flatten)]
    pub objective: ObjectiveArgs,
    /// Output folder: plan-NN.json (official MoA format), summary.json, front.svg.
    #[arg(short, long)]
    pub output: PathBuf,
}

#[derive(Args, Clone)]
pub struct ValidateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The folder `moac optimize` wrote.
    #[arg(long)]
    pub plans: PathBuf,
    /// The validation length N (longer than any profiled).
    #[arg(long, value_parser = lengths_arg)]
    pub length: usize,
    /// Held-out samples (made with another seed than calibration's).
    #[arg(long, default_value_t = 2)]
    pub samples: usize,
    /// Seed of the held-out samples.
    #[arg(long, default_value_t = HELD_OUT_SEED)]
    pub seed: u64,
    /// Use these samples instead of making them (a calibration file).
    #[arg(long)]
    pub calib: Option<PathBuf>,
    /// Real text for the held-out samples (default: as `moac calibrate`).
    #[arg(long)]
    pub source: Vec<PathBuf>,
    #[arg(long, default_value_t = 128)]
    pub max_answer: usize,
    /// Score only the plans, not dense and uniform beside them.
    #[arg(long)]
    pub no_baselines: bool,
    /// The chosen plan (official MoA JSON).
    #[arg(short, long)]
    pub output: PathBuf,
}

#[derive(Args, Clone)]
pub struct MakeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// KV bytes at most this fraction of dense's at every constraint length.
    #[arg(long)]
    pub density: f64,
    /// Profiled lengths (default: 1/8, 1/4 and 1/2 of the model's context, at least
    /// 512, 1024 and 2048).
    #[arg(long, value_parser = lengths_arg, value_delimiter = ',')]
    pub lengths: Vec<usize>,
    /// Calibration samples per profiled length (the families in turn): one count for
    /// every length, or one per length (default: 28,24,12 at the three default lengths,
    /// 64 in all; 22 at each of other lengths).
    #[arg(long, value_delimiter = ',')]
    pub samples: Vec<usize>,
    /// Task families of calibration and validation (see `moac calibrate --help`).
    #[arg(long, value_parser = families_arg, value_delimiter = ',', default_value = DEFAULT_FAMILIES)]
    pub families: Vec<Family>,
    /// Validation length (default: 1.25 times the longest profiled, at most the model's
    /// context; MoA validates at 1.5 times, 12k after 8k, which costs half again as much
    /// CPU time per held-out sample here).
    #[arg(long, value_parser = lengths_arg)]
    pub validate_length: Option<usize>,
    /// Held-out samples at the validation length (the families in turn, another seed).
    #[arg(long, default_value_t = VALIDATE_SAMPLES)]
    pub validate_samples: usize,
    /// Score only the made plans at validation, not dense and uniform beside them.
    #[arg(long)]
    pub no_validate_baselines: bool,
    /// Keep each calibration sample's profile in the work folder (for ablations with
    /// `moac profile --families/--max-samples`).
    #[arg(long)]
    pub keep_parts: bool,
    /// Validate the K plans of least predicted loss (summed over the profiled lengths,
    /// each normalized); the first of them is the plan unless another's validation loss
    /// is lower by more than two standard errors of the per-sample differences (0: no
    /// validation, the plan of least predicted loss).
    #[arg(long, default_value_t = VALIDATE_PLANS)]
    pub validate_plans: usize,
    /// Real text (UTF-8) for calibration (default: models/text/factbook.txt beside the
    /// model, from scripts/setup-calib-text.sh, when it is there).
    #[arg(long)]
    pub source: Vec<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The longest answer of calibration and held-out samples (tokens).
    #[arg(long, default_value_t = MAX_ANSWER)]
    pub max_answer: usize,
    /// Lengths where the density must hold (default: the profiled lengths, then
    /// doublings up to the model's context).
    #[arg(long, value_parser = lengths_arg, value_delimiter = ',')]
    pub constraint_lengths: Vec<usize>,
    /// At most R distinct rules per layer (MoA's kernels' limit; moac has none).
    #[arg(long)]
    pub max_rules_per_layer: Option<usize>,
    #[command(flatten)]
    pub objective: ObjectiveArgs,
    /// Epsilon-constraint grid intervals per objective (1: the anchor of each length and
    /// the plan of least summed loss; MoA's 4 draws the whole front, minutes longer).
    #[arg(long, default_value_t = MAKE_INTERVALS)]
    pub intervals: usize,
    /// Where the intermediate files go (kept, and reused by a rerun; default:
    /// <output>.work/).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// The chosen plan (official MoA JSON).
    #[arg(short, long)]
    pub output: PathBuf,
}

/// The pipeline's progress on the terminal: a bar per counted stage (drawn only on a
/// terminal), messages and the solve's table on stderr.
#[derive(Default)]
struct Terminal {
    bar: Option<indicatif::ProgressBar>,
}

impl Progress for Terminal {
    fn start(&mut self, what: &str) {
        self.bar = Some(progress_bar(true, what));
    }

    fn advance(&mut self, done: usize, total: usize) {
        if let Some(bar) = &self.bar {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }

    fn message(&mut self, text: &str) {
        eprintln!("{text}");
    }

    fn optimized(&mut self, out: &Optimized) {
        print_optimized(out);
    }
}

/// The calibration texts of `--source`, or the default beside the model.
fn sources(model: &ModelArgs, given: &[PathBuf]) -> Result<Vec<(String, String)>> {
    Ok(stages::read_sources(
        given,
        model.path()?,
        &mut Terminal::default(),
    )?)
}

pub fn calibrate(a: CalibrateArgs) -> Result<()> {
    let t = Instant::now();
    let model = a.model.load()?;
    let opts = CalibOptions {
        lengths: a.lengths.clone(),
        samples: a.samples,
        samples_at: Vec::new(),
        seed: a.seed,
        max_answer: a.max_answer,
        sources: sources(&a.model, &a.source)?,
        families: a.families.clone(),
        batch: a.batch,
    };
    let set = stages::calibrate(
        &model,
        &a.model.attention(),
        &opts,
        "calibrate",
        &mut Terminal::default(),
    )?;
    set.write(&a.output)?;
    eprintln!(
        "wrote {} ({} samples at lengths {:?}, {:.0} s)",
        a.output.display(),
        set.samples.len(),
        set.lengths(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

pub fn profile(a: ProfileArgs) -> Result<()> {
    let t = Instant::now();
    // The file's blocks: the backward pass dequantizes each layer to f32 as it goes
    // (the same f32 values as f32 weights, without holding them all).
    let model = Model::load(&a.model, WeightMode::Native)?;
    let mut set = CalibSet::read(&a.calib)?;
    set.check_model(&a.calib, &model)?;
    if !a.families.is_empty() {
        set.samples
            .retain(|s| Family::of_task(&s.task).is_some_and(|f| a.families.contains(&f)));
    }
    if let Some(k) = a.max_samples {
        let mut seen = std::collections::HashMap::new();
        set.samples.retain(|s| {
            let c = seen.entry(s.length).or_insert(0usize);
            *c += 1;
            *c <= k
        });
    }
    if set.samples.is_empty() {
        return Err(CliError::Usage(format!(
            "{}: no samples of the families and counts asked for",
            a.calib.display()
        )));
    }
    let (p, _) = stages::profile(
        &model,
        &set,
        &a.lengths,
        a.sink,
        &a.output,
        a.keep_parts,
        &mut Terminal::default(),
    )?;
    eprintln!(
        "wrote {} (lengths {:?}, {} samples, {:.0} s)",
        a.output.display(),
        p.lengths(),
        p.levels.iter().map(|l| l.samples).sum::<usize>(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn print_optimized(out: &Optimized) {
    let lens = |v: &[usize]| {
        v.iter()
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join("/")
    };
    eprintln!(
        "{} Pareto plans from {} candidates per KV head in {:.1} s; loss at N = {}, density at N = {}:",
        out.plans.len(),
        out.candidates,
        out.seconds,
        lens(&out.profile_lengths),
        lens(&out.constraint_lengths)
    );
    let row = |p: &MadePlan| {
        let f = |v: &[f64], prec: usize| {
            v.iter()
                .map(|x| format!("{x:.prec$}"))
                .collect::<Vec<_>>()
                .join(" / ")
        };
        eprintln!(
            "  {:10} loss {}   density {}{}",
            p.name,
            f(&p.loss, 4),
            f(&p.density, 3),
            p.gap.map(|g| format!("   gap {g:.1e}")).unwrap_or_default()
        );
    };
    out.plans.iter().for_each(row);
    row(&out.uniform);
}

pub fn optimize_cmd(a: OptimizeArgs) -> Result<()> {
    let cfg = moac_model::weights::model_config(&a.model)?;
    let profile = Profile::read(&a.profile)?;
    profile.check(&a.profile, &cfg.shape())?;
    let out = optimize(
        &profile,
        &OptimizeOptions {
            density: a.density,
            constraint_lengths: stages::constraint_lengths(
                &a.constraint_lengths,
                &profile.lengths(),
                cfg.context_len,
            ),
            max_rules_per_layer: a.max_rules_per_layer,
            alpha_step: a.alpha_step,
            intervals: a.intervals,
            min_use: false,
            retrieval_weight: a.objective.retrieval_weight,
            influence: a.objective.influence,
            pool_influence: a.objective.pool_influence,
            needle: a.objective.needle,
            mip_gap: a.objective.mip_gap,
            settings: Settings {
                sink: profile.sink,
                ..Settings::default()
            },
        },
    )?;
    stages::write_optimized(&out, &a.output)?;
    print_optimized(&out);
    eprintln!("wrote {}", a.output.display());
    Ok(())
}

/// The validation's report: the held-out samples, then each plan's mean loss and its
/// loss per family, the chosen plan marked; then what was written.
fn print_validation(v: &Validation, output: &Path) {
    let counts: Vec<String> = v.families.iter().map(|(f, n)| format!("{f} {n}")).collect();
    eprintln!(
        "validation: response loss on {} held-out samples at N = {} ({})",
        v.samples,
        v.length,
        counts.join(", ")
    );
    let mut head = format!("  {:10} {:>8}", "plan", "all");
    for (f, _) in &v.families {
        head.push_str(&format!(" {f:>8}"));
    }
    eprintln!("{head}");
    for r in &v.rows {
        let mark = if v.chosen.ends_with(format!("{}.json", r.name)) {
            "  <- chosen"
        } else {
            ""
        };
        let mut line = format!("  {:10} {:>8.4}", r.name, r.loss);
        for (_, l) in &r.by_family {
            line.push_str(&format!(" {l:>8.4}"));
        }
        eprintln!("{line}{mark}");
    }
    eprintln!("chosen: {}", v.reason);
    eprintln!("wrote {} (from {})", output.display(), v.chosen.display());
}

pub fn validate(a: ValidateArgs) -> Result<()> {
    let model = a.model.load()?;
    let attention = a.model.attention();
    let set = match &a.calib {
        Some(p) => {
            let s = CalibSet::read(p)?;
            s.check_model(p, &model)?;
            s
        }
        None => stages::calibrate(
            &model,
            &attention,
            &stages::held_out_options(
                a.length,
                a.samples,
                a.seed,
                a.max_answer,
                &DEFAULT_MIX,
                sources(&a.model, &a.source)?,
            ),
            "held-out samples",
            &mut Terminal::default(),
        )?,
    };
    let samples: Vec<&CalibSample> = set
        .samples
        .iter()
        .filter(|s| s.length == a.length)
        .collect();
    if samples.is_empty() {
        return Err(CliError::Usage(format!(
            "no held-out samples of length {}",
            a.length
        )));
    }
    let v = stages::validate(
        &model,
        &attention,
        &samples,
        &ValidateOptions {
            plans: &a.plans,
            only: None,
            max_answer: a.max_answer,
            baselines: !a.no_baselines,
            output: &a.output,
            incumbent: None,
        },
        &mut Terminal::default(),
    )?;
    print_validation(&v, &a.output);
    Ok(())
}

/// The closing report of `plan make`: per constraint length the KV bytes of the chosen
/// plan, the uniform plan and dense; the validation loss of each; and per layer, the
/// span each KV head of the chosen plan got at the longest constraint length.
fn print_made(made: &Made) {
    let out = &made.optimized;
    let Some(plan) = made.plan() else {
        return;
    };
    let name = &plan.name;
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    eprintln!(
        "plan {name} ({}) against uniform (alpha 0, beta {}) and dense, KV bytes of one sequence:",
        plan.objective, out.density
    );
    eprintln!(
        "  {:>7} {:>12} {:>12} {:>12}",
        "N", "made MiB", "uniform MiB", "dense MiB"
    );
    for (j, &n) in out.constraint_lengths.iter().enumerate() {
        let dense = plan.kv_bytes[j] as f64 / plan.density[j].max(1e-12);
        eprintln!(
            "  {n:>7} {:>12.2} {:>12.2} {:>12.2}",
            mib(plan.kv_bytes[j]),
            mib(out.uniform.kv_bytes[j]),
            dense / (1u64 << 20) as f64
        );
    }
    let validated: &[Validated] = made.validation.as_ref().map_or(&[], |v| &v.rows);
    let loss = |n: &str| {
        validated
            .iter()
            .find(|v| v.name == n)
            .map(|v| format!("{:.4}", v.loss))
            .unwrap_or_else(|| "-".into())
    };
    eprintln!(
        "  validation loss: made {}   uniform {}   dense {}",
        loss(name),
        loss("uniform"),
        loss("dense")
    );
    let g = plan.rules.first().map_or(1, |l| l.len()) / out.kv_heads.max(1);
    let n = out.constraint_lengths.iter().copied().max().unwrap_or(0);
    let settings = Settings::default();
    eprintln!("  spans per layer at N = {n} (KV heads; * = at least 3/4 of N):");
    for (l, layer) in plan.rules.iter().enumerate() {
        let cells: Vec<String> = layer
            .chunks(g.max(1))
            .map(|kv| {
                let c = kv
                    .iter()
                    .map(|r| moac::geometry::capacity(*r, n as u64, &settings))
                    .max()
                    .unwrap_or(0);
                let f = c as f64 / n.max(1) as f64;
                format!(
                    "{:>4.0}%{}",
                    100.0 * f.min(1.0),
                    if f >= 0.75 { "*" } else { " " }
                )
            })
            .collect();
        eprintln!("    layer {l:>2}: {}", cells.join(" "));
    }
}

/// `moac plan make`: the flags as [`MakeOptions`], then [`moac_model::pipeline::make`]
/// (calibrate, profile, optimize and validate; every stage's file kept in the work
/// folder and reused by a rerun), then its report.
pub fn make(a: MakeArgs) -> Result<()> {
    let total = Instant::now();
    let opts = MakeOptions {
        density: a.density,
        output: a.output.clone(),
        work_dir: a.work_dir.clone(),
        lengths: a.lengths.clone(),
        samples: a.samples.clone(),
        families: a.families.clone(),
        sources: a.source.clone(),
        seed: a.seed,
        max_answer: a.max_answer,
        keep_parts: a.keep_parts,
        constraint_lengths: a.constraint_lengths.clone(),
        max_rules_per_layer: a.max_rules_per_layer,
        retrieval_weight: a.objective.retrieval_weight,
        influence: a.objective.influence,
        pool_influence: a.objective.pool_influence,
        needle: a.objective.needle,
        mip_gap: a.objective.mip_gap,
        intervals: a.intervals,
        validate_length: a.validate_length,
        validate_samples: a.validate_samples,
        validate_plans: a.validate_plans,
        validate_baselines: !a.no_validate_baselines,
        attention: a.model.attention(),
    };
    // The density is checked before the model is loaded.
    opts.check()?;
    // Quantized products for the calibration's answers and the validation (the
    // profile dequantizes each layer to f32 itself).
    let model = Model::load(a.model.path()?, WeightMode::Native)?;
    let made = moac_model::pipeline::make(&model, &opts, &mut Terminal::default())?;
    match &made.validation {
        Some(v) => print_validation(v, &a.output),
        None => eprintln!(
            "wrote {} (from {}: least predicted loss; not validated, --validate-plans 0)",
            a.output.display(),
            made.chosen.display()
        ),
    }
    print_made(&made);
    let line: Vec<String> = made
        .times
        .iter()
        .map(|(s, t)| format!("{s} {t:.0} s"))
        .collect();
    eprintln!(
        "plan make: {} (total {:.0} s; work files in {})",
        line.join(", "),
        total.elapsed().as_secs_f64(),
        made.work.display()
    );
    Ok(())
}
