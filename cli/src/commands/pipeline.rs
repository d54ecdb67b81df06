//! MoA's plan pipeline for any Llama-family model moac loads: `moac calibrate`,
//! `moac profile`, `moac optimize`, `moac validate`, and `moac plan make` (all four).

use super::model::{progress_bar, ModelArgs};
use crate::{CliError, Result};
use clap::Args;
use moac::plan::Settings;
use moac_model::attention::Engine;
use moac_model::pipeline::calib::{self, CalibOptions, CalibSample, CalibSet};
use moac_model::pipeline::optimize::{
    optimize, Influence, MadePlan, Needle, OptimizeOptions, Optimized, NEEDLE, POOL_INFLUENCE,
    RETRIEVAL_WEIGHT,
};
use moac_model::pipeline::profile::{self, Profile};
use moac_model::pipeline::tasks::{Family, DEFAULT_MIX};
use moac_model::pipeline::validate::response_losses;
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
    /// Share of each length's objective given to the needle attention a plan drops at
    /// the copy steps of the calibration (the rest: MoA's influence); 0 = influence only.
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
    #[arg(long, default_value_t = 1_000_003)]
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
    #[arg(long, default_value_t = 6)]
    pub validate_samples: usize,
    /// Score only the made plans at validation, not dense and uniform beside them.
    #[arg(long)]
    pub no_validate_baselines: bool,
    /// Keep each calibration sample's profile in the work folder (for ablations with
    /// `moac profile --families/--max-samples`).
    #[arg(long)]
    pub keep_parts: bool,
    /// Validate the K plans of least predicted loss (summed over the profiled lengths,
    /// each normalized); the best of them by validation loss is the plan (0: no
    /// validation, the plan of least predicted loss).
    #[arg(long, default_value_t = 3)]
    pub validate_plans: usize,
    /// Real text (UTF-8) for calibration (default: models/text/factbook.txt beside the
    /// model, from scripts/setup-calib-text.sh, when it is there).
    #[arg(long)]
    pub source: Vec<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The longest answer of calibration and held-out samples (tokens).
    #[arg(long, default_value_t = 128)]
    pub max_answer: usize,
    /// Lengths where the density must hold (default: the profiled lengths, then
    /// doublings up to the model's context).
    #[arg(long, value_parser = lengths_arg, value_delimiter = ',')]
    pub constraint_lengths: Vec<usize>,
    /// At most R distinct rules per layer (MoA's kernels' limit; moac has none).
    #[arg(long)]
    pub max_rules_per_layer: Option<usize>,
    /// Share of each length's objective given to the needle attention a plan drops
    /// (the rest: MoA's influence); 0 = influence only.
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
    /// Where the intermediate files go (kept, and reused by a rerun; default:
    /// <output>.work/).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// The chosen plan (official MoA JSON).
    #[arg(short, long)]
    pub output: PathBuf,
}

/// The calibration text files: those given, else the default beside the model (none
/// when it is not there: the mix then uses generated prose, with a note).
fn read_sources(paths: &[PathBuf], model: &Path) -> Result<Vec<(String, String)>> {
    let given = !paths.is_empty();
    let paths: Vec<PathBuf> = if given {
        paths.to_vec()
    } else {
        let d = calib::default_source(model);
        if d.is_file() {
            vec![d]
        } else {
            eprintln!(
                "note: no calibration text ({} not found; run scripts/setup-calib-text.sh): retrieval haystacks are generated records, no fact or summary questions on real text",
                d.display()
            );
            Vec::new()
        }
    };
    paths.iter().map(|p| Ok(calib::read_source(p)?)).collect()
}

fn model_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// Makes a calibration set with the dense model.
fn make_calib(
    model: &Model,
    args: &ModelArgs,
    opts: &CalibOptions,
    what: &str,
) -> Result<CalibSet> {
    let dense = model.llama.dense_plan(Path::new("dense"))?;
    let rt = args.runtime(&dense)?;
    let bar = progress_bar(true, what);
    bar.set_length(opts.total() as u64);
    let set = calib::make(model, args.engine(&rt), opts, &mut |d, _| {
        bar.set_position(d as u64)
    })?;
    bar.finish_and_clear();
    Ok(set)
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
        sources: read_sources(&a.source, a.model.path()?)?,
        families: a.families.clone(),
        batch: a.batch,
    };
    let set = make_calib(&model, &a.model, &opts, "calibrate")?;
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

fn run_profile(
    model: &Model,
    set: &CalibSet,
    lengths: &[usize],
    sink: u64,
    output: &Path,
    keep_parts: bool,
) -> Result<Profile> {
    let bar = progress_bar(true, "profile");
    let mut resumed = 0;
    let p = profile::run(
        &model.llama,
        &model_name(&model.path),
        set,
        lengths,
        sink,
        output,
        &mut |done, total, r| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
            resumed += r as usize;
        },
    )?;
    bar.finish_and_clear();
    if resumed > 0 {
        eprintln!(
            "resumed {resumed} samples from {}",
            profile::parts_dir(output).display()
        );
    }
    p.write(output)?;
    // The parts are a resume point (the profile holds everything), and with
    // --keep-parts the material of ablations: a profile of a subset of the samples
    // (`moac profile --families/--max-samples` on the same calibration file) reuses them.
    if !keep_parts {
        let _ = std::fs::remove_dir_all(profile::parts_dir(output));
    }
    Ok(p)
}

pub fn profile(a: ProfileArgs) -> Result<()> {
    let t = Instant::now();
    let model = Model::load(&a.model, WeightMode::F32)?;
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
    let p = run_profile(&model, &set, &a.lengths, a.sink, &a.output, a.keep_parts)?;
    eprintln!(
        "wrote {} (lengths {:?}, {} samples, {:.0} s)",
        a.output.display(),
        p.lengths(),
        p.levels.iter().map(|l| l.samples).sum::<usize>(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The default constraint lengths: the profiled ones, then doublings up to the model's
/// context.
fn default_constraints(profiled: &[usize], context: usize) -> Vec<usize> {
    let mut v = profiled.to_vec();
    let mut n = profiled.iter().copied().max().unwrap_or(context);
    while n < context {
        n = (n * 2).min(context);
        v.push(n);
    }
    v.sort_unstable();
    v.dedup();
    v
}

fn write_optimized(out: &Optimized, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| CliError::Usage(format!("{}: {e}", dir.display())))?;
    let json = |v: &serde_json::Value| -> Result<Vec<u8>> {
        let mut s = serde_json::to_string_pretty(v).map_err(|e| CliError::Usage(e.to_string()))?;
        s.push('\n');
        Ok(s.into_bytes())
    };
    for p in out.plans.iter().chain(std::iter::once(&out.uniform)) {
        moac::fsutil::write_atomic(
            &dir.join(format!("{}.json", p.name)),
            &json(&p.to_moa_json())?,
        )?;
    }
    let summary = serde_json::to_value(out).map_err(|e| CliError::Usage(e.to_string()))?;
    moac::fsutil::write_atomic(&dir.join("summary.json"), &json(&summary)?)?;
    let (first, last) = (0, out.profile_lengths.len() - 1);
    let points: Vec<(String, f64, f64)> = out
        .plans
        .iter()
        .chain(std::iter::once(&out.uniform))
        .map(|p| (p.name.clone(), p.loss[first], p.loss[last]))
        .collect();
    let svg = crate::tools::svg::scatter_plot(
        &format!(
            "{} at density {}: predicted loss of each plan",
            out.model, out.density
        ),
        &format!("loss at N = {}", out.profile_lengths[first]),
        &format!("loss at N = {}", out.profile_lengths[last]),
        &points,
    );
    moac::fsutil::write_atomic(&dir.join("front.svg"), svg.as_bytes())?;
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

fn run_optimize(profile: &Profile, a: &OptimizeArgs, context: usize) -> Result<Optimized> {
    let constraint = if a.constraint_lengths.is_empty() {
        default_constraints(&profile.lengths(), context)
    } else {
        a.constraint_lengths.clone()
    };
    let out = optimize(
        profile,
        &OptimizeOptions {
            density: a.density,
            constraint_lengths: constraint,
            max_rules_per_layer: a.max_rules_per_layer,
            alpha_step: a.alpha_step,
            intervals: a.intervals,
            min_use: false,
            retrieval_weight: a.retrieval_weight,
            influence: a.influence,
            pool_influence: a.pool_influence,
            needle: a.needle,
            settings: Settings {
                sink: profile.sink,
                ..Settings::default()
            },
        },
    )?;
    write_optimized(&out, &a.output)?;
    print_optimized(&out);
    Ok(out)
}

pub fn optimize_cmd(a: OptimizeArgs) -> Result<()> {
    let cfg = moac_model::weights::model_config(&a.model)?;
    let profile = Profile::read(&a.profile)?;
    profile.check(&a.profile, &cfg.shape())?;
    run_optimize(&profile, &a, cfg.context_len)?;
    eprintln!("wrote {}", a.output.display());
    Ok(())
}

/// The plans of an optimize folder: plan-NN.json, then uniform.json when present.
fn plan_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd =
        std::fs::read_dir(dir).map_err(|e| CliError::Usage(format!("{}: {e}", dir.display())))?;
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("plan-") && n.ends_with(".json"))
        })
        .collect();
    v.sort();
    if v.is_empty() {
        return Err(CliError::Usage(format!(
            "{}: no plan-NN.json files (the output folder of moac optimize)",
            dir.display()
        )));
    }
    Ok(v)
}

/// One plan's validation: its mean response loss over the held-out samples, and per
/// task family (the synthetic retrieval families apart from the model-answered ones).
pub struct Validated {
    pub name: String,
    pub loss: f64,
    /// (family, mean loss) in the order families first appear.
    pub by_family: Vec<(String, f64)>,
}

/// The family of a sample's task label (`kv-json` -> `kv`, `source` -> `summary`).
fn family_of(task: &str) -> String {
    Family::of_task(task).map_or_else(|| task.to_string(), |f| f.name().to_string())
}

/// Validates every plan of `dir` (and dense and uniform for reference) on `samples`;
/// writes the best plan (least mean loss) to `output`.
#[allow(clippy::too_many_arguments)]
fn run_validate(
    model: &Model,
    args: &ModelArgs,
    dir: &Path,
    only: Option<&[String]>,
    samples: &[&CalibSample],
    max_answer: usize,
    baselines: bool,
    output: &Path,
) -> Result<(Vec<Validated>, PathBuf)> {
    let mut rows = Vec::new();
    let mut best: Option<(f64, PathBuf)> = None;
    let mut files = plan_files(dir)?;
    if let Some(names) = only {
        files.retain(|f| names.iter().any(|n| f.ends_with(format!("{n}.json"))));
    }
    let uniform = dir.join("uniform.json");
    let mut runs: Vec<(String, Option<PathBuf>)> = Vec::new();
    if baselines {
        runs.push(("dense".into(), None));
    }
    if baselines && uniform.is_file() {
        runs.push(("uniform".into(), Some(uniform)));
    }
    runs.extend(files.drain(..).map(|p| {
        (
            model_name(&p).trim_end_matches(".json").to_string(),
            Some(p),
        )
    }));
    let mut families: Vec<String> = Vec::new();
    for s in samples {
        let f = family_of(&s.task);
        if !families.contains(&f) {
            families.push(f);
        }
    }
    let bar = progress_bar(true, "validate");
    bar.set_length((runs.len() * samples.len()) as u64);
    for (i, (name, file)) in runs.iter().enumerate() {
        let plan = match file {
            Some(f) => super::model::plan_for(model, f)?,
            None => model.llama.dense_plan(Path::new("dense"))?,
        };
        let rt = args.runtime(&plan)?;
        let engine: Engine<'_> = args.engine(&rt);
        let losses = response_losses(&model.llama, engine, samples, max_answer, 4, &mut |d, _| {
            bar.set_position((i * samples.len() + d) as u64)
        })?;
        let mean = losses.iter().sum::<f64>() / losses.len() as f64;
        let by_family = families
            .iter()
            .map(|f| {
                let v: Vec<f64> = samples
                    .iter()
                    .zip(&losses)
                    .filter(|(s, _)| family_of(&s.task) == *f)
                    .map(|(_, l)| *l)
                    .collect();
                (f.clone(), v.iter().sum::<f64>() / v.len().max(1) as f64)
            })
            .collect();
        if let (Some(f), true) = (file, name.starts_with("plan-")) {
            if best.as_ref().is_none_or(|(b, _)| mean < *b) {
                best = Some((mean, f.clone()));
            }
        }
        rows.push(Validated {
            name: name.clone(),
            loss: mean,
            by_family,
        });
    }
    bar.finish_and_clear();
    let (_, chosen) = best.ok_or_else(|| CliError::Usage("no plan to choose from".into()))?;
    let bytes = std::fs::read(&chosen)
        .map_err(|e| CliError::Usage(format!("{}: {e}", chosen.display())))?;
    if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| CliError::Usage(format!("{}: {e}", dir.display())))?;
    }
    moac::fsutil::write_atomic(output, &bytes)?;
    let counts: Vec<String> = families
        .iter()
        .map(|f| {
            let n = samples.iter().filter(|s| family_of(&s.task) == *f).count();
            format!("{f} {n}")
        })
        .collect();
    eprintln!(
        "validation: response loss on {} held-out samples at N = {} ({})",
        samples.len(),
        samples.iter().map(|s| s.length).max().unwrap_or(0),
        counts.join(", ")
    );
    let mut head = format!("  {:10} {:>8}", "plan", "all");
    for f in &families {
        head.push_str(&format!(" {f:>8}"));
    }
    eprintln!("{head}");
    for r in &rows {
        let mark = if chosen.ends_with(format!("{}.json", r.name)) {
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
    eprintln!("wrote {} (from {})", output.display(), chosen.display());
    Ok((rows, chosen))
}

/// Held-out samples: the calibration's families and texts, another seed.
#[allow(clippy::too_many_arguments)]
fn held_out(
    model: &Model,
    args: &ModelArgs,
    length: usize,
    samples: usize,
    seed: u64,
    max_answer: usize,
    families: &[Family],
    sources: Vec<(String, String)>,
) -> Result<CalibSet> {
    make_calib(
        model,
        args,
        &CalibOptions {
            lengths: vec![length],
            samples,
            samples_at: Vec::new(),
            seed,
            max_answer,
            sources,
            families: families.to_vec(),
            batch: 4,
        },
        "held-out samples",
    )
}

pub fn validate(a: ValidateArgs) -> Result<()> {
    let model = a.model.load()?;
    let set = match &a.calib {
        Some(p) => {
            let s = CalibSet::read(p)?;
            s.check_model(p, &model)?;
            s
        }
        None => held_out(
            &model,
            &a.model,
            a.length,
            a.samples,
            a.seed,
            a.max_answer,
            &DEFAULT_MIX,
            read_sources(&a.source, a.model.path()?)?,
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
    run_validate(
        &model,
        &a.model,
        &a.plans,
        None,
        &samples,
        a.max_answer,
        !a.no_baselines,
        &a.output,
    )?;
    Ok(())
}

/// The closing report of `plan make`: per constraint length the KV bytes of the chosen
/// plan, the uniform plan and dense; the validation loss of each; and per layer, the
/// span each KV head of the chosen plan got at the longest constraint length.
fn print_made(out: &Optimized, chosen: &Path, validated: &[Validated]) {
    let name = model_name(chosen).trim_end_matches(".json").to_string();
    let Some(made) = out.plans.iter().find(|p| p.name == name) else {
        return;
    };
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    eprintln!(
        "plan {name} ({}) against uniform (alpha 0, beta {}) and dense, KV bytes of one sequence:",
        made.objective, out.density
    );
    eprintln!(
        "  {:>7} {:>12} {:>12} {:>12}",
        "N", "made MiB", "uniform MiB", "dense MiB"
    );
    for (j, &n) in out.constraint_lengths.iter().enumerate() {
        let dense = made.kv_bytes[j] as f64 / made.density[j].max(1e-12);
        eprintln!(
            "  {n:>7} {:>12.2} {:>12.2} {:>12.2}",
            mib(made.kv_bytes[j]),
            mib(out.uniform.kv_bytes[j]),
            dense / (1u64 << 20) as f64
        );
    }
    let loss = |n: &str| {
        validated
            .iter()
            .find(|v| v.name == n)
            .map(|v| format!("{:.4}", v.loss))
            .unwrap_or_else(|| "-".into())
    };
    eprintln!(
        "  validation loss: made {}   uniform {}   dense {}",
        loss(&name),
        loss("uniform"),
        loss("dense")
    );
    let g = made.rules.first().map_or(1, |l| l.len()) / out.kv_heads.max(1);
    let n = out.constraint_lengths.iter().copied().max().unwrap_or(0);
    let settings = Settings::default();
    eprintln!("  spans per layer at N = {n} (KV heads; * = at least 3/4 of N):");
    for (l, layer) in made.rules.iter().enumerate() {
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

/// `moac plan make`: calibrate, profile, optimize and validate with defaults for the
/// model; every stage's file is kept in the work folder and reused by a rerun.
pub fn make(a: MakeArgs) -> Result<()> {
    let total = Instant::now();
    if !(a.density > 0.0 && a.density <= 1.0) {
        return Err(CliError::Usage(format!(
            "--density {}: it must be in (0, 1] (the fraction of the dense cache's bytes)",
            a.density
        )));
    }
    let model = Model::load(a.model.path()?, WeightMode::F32)?;
    let context = model.llama.config.context_len;
    let lengths = if a.lengths.is_empty() {
        vec![
            (context / 8).max(512),
            (context / 4).max(1024),
            (context / 2).max(2048),
        ]
    } else {
        a.lengths.clone()
    };
    let longest = lengths.iter().copied().max().unwrap_or(0);
    let val_len = a
        .validate_length
        .unwrap_or((longest * 5 / 4).div_ceil(64) * 64)
        .min(context);
    if lengths.iter().any(|&l| l >= val_len) {
        eprintln!("note: the validation length {val_len} is not longer than every profiled length");
    }
    let work = a.work_dir.clone().unwrap_or_else(|| {
        let mut s = a.output.as_os_str().to_owned();
        s.push(".work");
        PathBuf::from(s)
    });
    std::fs::create_dir_all(&work)
        .map_err(|e| CliError::Usage(format!("{}: {e}", work.display())))?;
    let mut times = Vec::new();
    // 1. Calibration (reused when the file there was made the same way).
    let t = Instant::now();
    let calib_path = work.join("calib.jsonl");
    let sources = read_sources(&a.source, a.model.path()?)?;
    let (samples, samples_at) = match a.samples.as_slice() {
        [] if a.lengths.is_empty() => (0, vec![28, 24, 12]),
        [] => (22, Vec::new()),
        [one] => (*one, Vec::new()),
        many => (0, many.to_vec()),
    };
    let opts = CalibOptions {
        lengths: lengths.clone(),
        samples,
        samples_at,
        seed: a.seed,
        max_answer: a.max_answer,
        sources: sources.clone(),
        families: a.families.clone(),
        batch: 4,
    };
    let made_as = |h: &calib::CalibHeader, seed: u64| {
        h.seed == seed && h.max_answer == a.max_answer && h.sources == calib::header_sources(&opts)
    };
    let set = match CalibSet::read(&calib_path) {
        Ok(s)
            if made_as(&s.header, a.seed)
                && s.lengths() == lengths
                && s.samples.len() == opts.total() =>
        {
            s
        }
        _ => {
            let s = make_calib(&model, &a.model, &opts, "calibrate")?;
            s.write(&calib_path)?;
            s
        }
    };
    times.push(("calibrate", t.elapsed().as_secs_f64()));
    // 2. Profile.
    let t = Instant::now();
    let profile_path = work.join("profile.safetensors");
    let sink = Settings::default().sink;
    let prof = match Profile::read(&profile_path) {
        Ok(p)
            if p.lengths() == lengths
                && p.shape == model.llama.config.shape()
                && p.levels
                    .iter()
                    .all(|l| l.needle.is_some() && l.needle_influence.is_some()) =>
        {
            p
        }
        _ => run_profile(&model, &set, &lengths, sink, &profile_path, a.keep_parts)?,
    };
    times.push(("profile", t.elapsed().as_secs_f64()));
    // 3. Optimize.
    let t = Instant::now();
    let plans_dir = work.join("plans");
    let optimized = run_optimize(
        &prof,
        &OptimizeArgs {
            profile: profile_path.clone(),
            model: a.model.path()?.to_path_buf(),
            density: a.density,
            constraint_lengths: a.constraint_lengths.clone(),
            max_rules_per_layer: a.max_rules_per_layer,
            alpha_step: None,
            intervals: 4,
            retrieval_weight: a.retrieval_weight,
            influence: a.influence,
            pool_influence: a.pool_influence,
            needle: a.needle,
            output: plans_dir.clone(),
        },
        context,
    )?;
    times.push(("optimize", t.elapsed().as_secs_f64()));
    // 4. Validate on held-out samples at a longer length.
    // The plans of least predicted loss summed over the lengths (each normalized) are
    // the ones worth running: Pareto plans differ little, and each costs a full run.
    let mut ranked: Vec<&MadePlan> = optimized.plans.iter().collect();
    ranked.sort_by(|x, y| {
        x.loss
            .iter()
            .sum::<f64>()
            .total_cmp(&y.loss.iter().sum::<f64>())
    });
    let t = Instant::now();
    let (validated, chosen) = if a.validate_plans == 0 {
        // No validation: the plan of least summed predicted loss.
        let best = ranked
            .first()
            .ok_or_else(|| CliError::Usage("no plan to choose from".into()))?;
        let file = plans_dir.join(format!("{}.json", best.name));
        let bytes = std::fs::read(&file)
            .map_err(|e| CliError::Usage(format!("{}: {e}", file.display())))?;
        moac::fsutil::write_atomic(&a.output, &bytes)?;
        eprintln!(
            "wrote {} (from {}: least predicted loss; not validated, --validate-plans 0)",
            a.output.display(),
            file.display()
        );
        (Vec::new(), file)
    } else {
        let val_path = work.join("validate.jsonl");
        let val = match CalibSet::read(&val_path) {
            Ok(s)
                if made_as(&s.header, a.seed + 1_000_003)
                    && s.lengths() == vec![val_len]
                    && s.samples.len() == a.validate_samples =>
            {
                s
            }
            _ => {
                let s = held_out(
                    &model,
                    &a.model,
                    val_len,
                    a.validate_samples,
                    a.seed + 1_000_003,
                    a.max_answer,
                    &a.families,
                    sources.clone(),
                )?;
                s.write(&val_path)?;
                s
            }
        };
        let samples: Vec<&CalibSample> = val.samples.iter().collect();
        let top: Vec<String> = ranked
            .iter()
            .take(a.validate_plans.max(1))
            .map(|p| p.name.clone())
            .collect();
        run_validate(
            &model,
            &a.model,
            &plans_dir,
            Some(&top),
            &samples,
            a.max_answer,
            !a.no_validate_baselines,
            &a.output,
        )?
    };
    times.push(("validate", t.elapsed().as_secs_f64()));
    print_made(&optimized, &chosen, &validated);
    let line: Vec<String> = times.iter().map(|(s, t)| format!("{s} {t:.0} s")).collect();
    eprintln!(
        "plan make: {} (total {:.0} s; work files in {})",
        line.join(", "),
        total.elapsed().as_secs_f64(),
        work.display()
    );
    Ok(())
}
