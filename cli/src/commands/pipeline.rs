//! MoA's plan pipeline for any Llama-family model moac loads: `moac calibrate`,
//! `moac profile`, `moac optimize`, `moac validate`, and `moac plan make` (all four).

use super::model::{progress_bar, ModelArgs};
use crate::{CliError, Result};
use clap::Args;
use moac::plan::Settings;
use moac_model::attention::Engine;
use moac_model::pipeline::calib::{self, CalibOptions, CalibSample, CalibSet};
use moac_model::pipeline::optimize::{optimize, MadePlan, OptimizeOptions, Optimized};
use moac_model::pipeline::profile::{self, Profile};
use moac_model::pipeline::validate::response_losses;
use moac_model::weights::WeightMode;
use moac_model::Model;
use std::path::{Path, PathBuf};
use std::time::Instant;

fn lengths_arg(s: &str) -> std::result::Result<usize, String> {
    moac_model::retrieval::parse_length(s)
}

#[derive(Args, Clone)]
pub struct CalibrateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text files to summarize, besides the generated long-dependency tasks.
    #[arg(long)]
    pub source: Vec<PathBuf>,
    /// Length levels N (prompt = N - max answer), comma-separated; 1k style accepted.
    #[arg(long, value_parser = lengths_arg, value_delimiter = ',', default_value = "1024,2048")]
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
    /// Profiled lengths (default: 1/8 and 1/4 of the model's context, at least 512).
    #[arg(long, value_parser = lengths_arg, value_delimiter = ',')]
    pub lengths: Vec<usize>,
    /// Calibration samples per profiled length.
    #[arg(long, default_value_t = 4)]
    pub samples: usize,
    /// Validation length (default: 1.5 times the longest profiled, as MoA's 12k after
    /// 8k; at most the model's context).
    #[arg(long, value_parser = lengths_arg)]
    pub validate_length: Option<usize>,
    /// Held-out samples at the validation length.
    #[arg(long, default_value_t = 2)]
    pub validate_samples: usize,
    /// Also score dense and the uniform plan at validation (a report; slower).
    #[arg(long)]
    pub validate_baselines: bool,
    /// Text files to summarize, besides the generated long-dependency tasks.
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
    /// Where the intermediate files go (kept, and reused by a rerun; default:
    /// <output>.work/).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// The chosen plan (official MoA JSON).
    #[arg(short, long)]
    pub output: PathBuf,
}

fn read_sources(paths: &[PathBuf]) -> Result<Vec<(String, String)>> {
    paths
        .iter()
        .map(|p| {
            let text = std::fs::read_to_string(p)
                .map_err(|e| CliError::Usage(format!("{}: {e}", p.display())))?;
            if text.split("\n\n").all(|s| s.trim().is_empty()) {
                return Err(CliError::Usage(format!("{}: no text", p.display())));
            }
            Ok((p.display().to_string(), text))
        })
        .collect()
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
    bar.set_length((opts.lengths.len() * opts.samples) as u64);
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
        seed: a.seed,
        max_answer: a.max_answer,
        sources: read_sources(&a.source)?,
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
    // The parts are only a resume point: the profile holds everything.
    let _ = std::fs::remove_dir_all(profile::parts_dir(output));
    Ok(p)
}

pub fn profile(a: ProfileArgs) -> Result<()> {
    let t = Instant::now();
    let model = Model::load(&a.model, WeightMode::F32)?;
    let set = CalibSet::read(&a.calib)?;
    set.check_model(&a.calib, &model)?;
    let p = run_profile(&model, &set, &a.lengths, a.sink, &a.output)?;
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

/// Validates every plan of `dir` (and dense and uniform for reference) on `samples`;
/// writes the best plan to `output`. Returns (name, mean loss) rows.
fn run_validate(
    model: &Model,
    args: &ModelArgs,
    dir: &Path,
    samples: &[&CalibSample],
    max_answer: usize,
    baselines: bool,
    output: &Path,
) -> Result<Vec<(String, f64)>> {
    let mut rows = Vec::new();
    let mut best: Option<(f64, PathBuf)> = None;
    let mut files = plan_files(dir)?;
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
        if let (Some(f), true) = (file, name.starts_with("plan-")) {
            if best.as_ref().is_none_or(|(b, _)| mean < *b) {
                best = Some((mean, f.clone()));
            }
        }
        rows.push((name.clone(), mean));
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
    for (name, loss) in &rows {
        let mark = if chosen.ends_with(format!("{name}.json")) {
            "  <- chosen"
        } else {
            ""
        };
        eprintln!("  {name:10} response loss {loss:.4}{mark}");
    }
    eprintln!("wrote {} (from {})", output.display(), chosen.display());
    Ok(rows)
}

fn held_out(
    model: &Model,
    args: &ModelArgs,
    length: usize,
    samples: usize,
    seed: u64,
    max_answer: usize,
) -> Result<CalibSet> {
    make_calib(
        model,
        args,
        &CalibOptions {
            lengths: vec![length],
            samples,
            seed,
            max_answer,
            sources: Vec::new(),
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
        None => held_out(&model, &a.model, a.length, a.samples, a.seed, a.max_answer)?,
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
        &samples,
        a.max_answer,
        !a.no_baselines,
        &a.output,
    )?;
    Ok(())
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
        vec![(context / 8).max(512), (context / 4).max(1024)]
    } else {
        a.lengths.clone()
    };
    let longest = lengths.iter().copied().max().unwrap_or(0);
    let val_len = a
        .validate_length
        .unwrap_or((longest * 3 / 2).div_ceil(64) * 64)
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
    let opts = CalibOptions {
        lengths: lengths.clone(),
        samples: a.samples,
        seed: a.seed,
        max_answer: a.max_answer,
        sources: read_sources(&a.source)?,
        batch: 4,
    };
    let set = match CalibSet::read(&calib_path) {
        Ok(s)
            if s.header.seed == a.seed
                && s.header.max_answer == a.max_answer
                && s.lengths() == lengths
                && s.samples.len() == lengths.len() * a.samples =>
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
        Ok(p) if p.lengths() == lengths && p.shape == model.llama.config.shape() => p,
        _ => run_profile(&model, &set, &lengths, sink, &profile_path)?,
    };
    times.push(("profile", t.elapsed().as_secs_f64()));
    // 3. Optimize.
    let t = Instant::now();
    let plans_dir = work.join("plans");
    run_optimize(
        &prof,
        &OptimizeArgs {
            profile: profile_path.clone(),
            model: a.model.path()?.to_path_buf(),
            density: a.density,
            constraint_lengths: a.constraint_lengths.clone(),
            max_rules_per_layer: a.max_rules_per_layer,
            alpha_step: None,
            intervals: 4,
            output: plans_dir.clone(),
        },
        context,
    )?;
    times.push(("optimize", t.elapsed().as_secs_f64()));
    // 4. Validate on held-out samples at a longer length.
    let t = Instant::now();
    let val_path = work.join("validate.jsonl");
    let val = match CalibSet::read(&val_path) {
        Ok(s)
            if s.header.seed == a.seed + 1_000_003
                && s.header.max_answer == a.max_answer
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
            )?;
            s.write(&val_path)?;
            s
        }
    };
    let samples: Vec<&CalibSample> = val.samples.iter().collect();
    run_validate(
        &model,
        &a.model,
        &plans_dir,
        &samples,
        a.max_answer,
        a.validate_baselines,
        &a.output,
    )?;
    times.push(("validate", t.elapsed().as_secs_f64()));
    let line: Vec<String> = times.iter().map(|(s, t)| format!("{s} {t:.0} s")).collect();
    eprintln!(
        "plan make: {} (total {:.0} s; work files in {})",
        line.join(", "),
        total.elapsed().as_secs_f64(),
        work.display()
    );
    Ok(())
}
