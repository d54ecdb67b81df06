//! Making a plan in one call ([`make`], what `moac plan make` runs): calibrate, profile,
//! optimize and validate with defaults for the model, every stage's file kept in a
//! work folder (`<output>.work/` unless named) and reused by a later call made the same
//! way:
//!
//! - `calib.jsonl`: the calibration set, reused when its seed, answer length, sources
//!   and families, lengths and sample count are the ones asked for;
//! - `profile.safetensors`: the profile, reused when it has the lengths asked for, the
//!   model's attention shape and the needle sums of version 3; while it is computed,
//!   finished samples wait in `profile.safetensors.parts/` (a run cut short resumes
//!   from them);
//! - `plans/`: the solve's plans, `summary.json` and `front.svg` (solved again each
//!   time: about 20 s at the defaults, see [`MAKE_INTERVALS`]);
//! - `validate.jsonl`: the held-out samples (seed + 1 000 003, one length), reused as
//!   the calibration set is.
//!
//! The chosen plan (official MoA JSON) is copied to the output. The steps of the stages
//! are the library calls of [`super::stages`], which the single commands share.

use super::calib::{self, CalibHeader, CalibOptions, CalibSample, CalibSet};
use super::objective::{
    optimize, Influence, MadePlan, Needle, OptimizeOptions, Optimized, MIP_GAP, NEEDLE,
    POOL_INFLUENCE, RETRIEVAL_WEIGHT,
};
use super::profile::Profile;
use super::stages::{self, AttentionOptions, Progress, ValidateOptions, Validation};
use super::tasks::{Family, DEFAULT_MIX};
use crate::{Error, Model, Result};
use moac::plan::Settings;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Held-out samples at the validation length (the default of
/// [`MakeOptions::validate_samples`]).
pub const VALIDATE_SAMPLES: usize = 6;

/// Plans validated (the default of [`MakeOptions::validate_plans`]).
pub const VALIDATE_PLANS: usize = 3;

/// The longest answer of calibration and held-out samples, in tokens (the default of
/// [`MakeOptions::max_answer`]).
pub const MAX_ANSWER: usize = 128;

/// Epsilon-constraint intervals per objective of `make`'s solve (the default of
/// [`MakeOptions::intervals`]): 1, the anchor of each length and the plan of least
/// summed loss, which validation then chooses among. With the default objective
/// (pooled influence) one such solve takes about 20 s on SmolLM2, while MoA's 4-interval
/// front ran past 12 minutes; `moac optimize` still draws the whole front by default.
pub const MAKE_INTERVALS: usize = 1;

/// The seed of the held-out samples is the calibration's plus this.
pub const HELD_OUT_SEED: u64 = 1_000_003;

/// What [`make`] does. [`MakeOptions::new`] gives `moac plan make`'s defaults.
#[derive(Debug, Clone)]
pub struct MakeOptions {
    /// KV bytes at most this fraction of the dense cache's at every constraint length,
    /// in (0, 1].
    pub density: f64,
    /// Where the chosen plan is written (official MoA JSON).
    pub output: PathBuf,
    /// The folder of the intermediate files (`None`: `<output>.work/`).
    pub work_dir: Option<PathBuf>,
    /// Profiled lengths (empty: 1/8, 1/4 and 1/2 of the model's context, at least 512,
    /// 1024 and 2048).
    pub lengths: Vec<usize>,
    /// Calibration samples per profiled length: empty (28, 24 and 12 at the three
    /// default lengths, else 22 at each), one count for every length, or one per length.
    pub samples: Vec<usize>,
    /// Task families of calibration and validation, taken in turn.
    pub families: Vec<Family>,
    /// Calibration texts (empty: [`calib::default_source`] beside the model, when it is
    /// there).
    pub sources: Vec<PathBuf>,
    /// Seed of the calibration samples (the held-out ones use it + [`HELD_OUT_SEED`]).
    pub seed: u64,
    /// The longest answer of calibration and held-out samples (tokens).
    pub max_answer: usize,
    /// Keep each calibration sample's profile in `profile.safetensors.parts/` (for
    /// ablations); otherwise it goes once the profile is written.
    pub keep_parts: bool,
    /// Lengths where the density must hold (empty: the profiled lengths, then doublings
    /// up to the model's context).
    pub constraint_lengths: Vec<usize>,
    /// At most this many distinct rules per layer (MoA's kernels' limit).
    pub max_rules_per_layer: Option<usize>,
    /// Share of each length's objective given to the needle term (see
    /// [`OptimizeOptions::retrieval_weight`]).
    pub retrieval_weight: f64,
    /// How a span's influence adds up.
    pub influence: Influence,
    /// Share of each head's influence replaced by the mean over all heads.
    pub pool_influence: f64,
    /// What the needle term counts at the copy steps.
    pub needle: Needle,
    /// Each MILP solve stops within this relative gap of the optimum (see
    /// [`OptimizeOptions::mip_gap`]).
    pub mip_gap: f64,
    /// Epsilon-constraint grid intervals per objective ([`MAKE_INTERVALS`]).
    pub intervals: usize,
    /// Validation length (`None`: 1.25 times the longest profiled, rounded up to 64, at
    /// most the model's context).
    pub validate_length: Option<usize>,
    /// Held-out samples at the validation length.
    pub validate_samples: usize,
    /// Validate the plans of least predicted loss (summed over the profiled lengths),
    /// this many; the best by validation loss is the plan. 0: no validation, the plan of
    /// least predicted loss.
    pub validate_plans: usize,
    /// Measure dense and the uniform plan beside the plans at validation.
    pub validate_baselines: bool,
    /// How the dense answers and the validated plans run.
    pub attention: AttentionOptions,
}

impl MakeOptions {
    /// `moac plan make`'s defaults for a density and an output.
    pub fn new(density: f64, output: impl Into<PathBuf>) -> MakeOptions {
        MakeOptions {
            density,
            output: output.into(),
            work_dir: None,
            lengths: Vec::new(),
            samples: Vec::new(),
            families: DEFAULT_MIX.to_vec(),
            sources: Vec::new(),
            seed: 0,
            max_answer: MAX_ANSWER,
            keep_parts: false,
            constraint_lengths: Vec::new(),
            max_rules_per_layer: None,
            retrieval_weight: RETRIEVAL_WEIGHT,
            influence: Influence::Entries,
            pool_influence: POOL_INFLUENCE,
            needle: NEEDLE,
            mip_gap: MIP_GAP,
            intervals: MAKE_INTERVALS,
            validate_length: None,
            validate_samples: VALIDATE_SAMPLES,
            validate_plans: VALIDATE_PLANS,
            validate_baselines: true,
            attention: AttentionOptions::default(),
        }
    }

    /// Checks what can be checked before a model is loaded (the density).
    pub fn check(&self) -> Result<()> {
        if !(self.density > 0.0 && self.density <= 1.0) {
            return Err(Error::Usage(format!(
                "--density {}: it must be in (0, 1] (the fraction of the dense cache's bytes)",
                self.density
            )));
        }
        Ok(())
    }

    /// The work folder: [`MakeOptions::work_dir`], else `<output>.work`.
    pub fn work(&self) -> PathBuf {
        self.work_dir.clone().unwrap_or_else(|| {
            let mut s = self.output.as_os_str().to_owned();
            s.push(".work");
            PathBuf::from(s)
        })
    }
}

/// Which stages' files a call took from the work folder instead of making them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reused {
    /// `calib.jsonl`.
    pub calibration: bool,
    /// `profile.safetensors`.
    pub profile: bool,
    /// Profile samples taken from `profile.safetensors.parts/` (a run cut short).
    pub profile_samples: usize,
    /// `validate.jsonl`.
    pub held_out: bool,
}

/// What [`make`] did.
#[derive(Debug, Clone)]
pub struct Made {
    /// The work folder.
    pub work: PathBuf,
    /// The solve (its plans are in `<work>/plans/`).
    pub optimized: Optimized,
    /// The plan file the output is a copy of (`<work>/plans/plan-NN.json`).
    pub chosen: PathBuf,
    /// The validation (`None` when `validate_plans` is 0).
    pub validation: Option<Validation>,
    /// Seconds per stage: calibrate, profile, optimize, validate.
    pub times: Vec<(&'static str, f64)>,
    /// What came from the work folder.
    pub reused: Reused,
}

impl Made {
    /// The chosen plan of the solve.
    pub fn plan(&self) -> Option<&MadePlan> {
        let name = stages::file_name(&self.chosen)
            .trim_end_matches(".json")
            .to_string();
        self.optimized.plans.iter().find(|p| p.name == name)
    }
}

/// The calibration samples per length: `given`, or the defaults for the lengths.
fn sample_counts(given: &[usize], default_lengths: bool) -> (usize, Vec<usize>) {
    match given {
        [] if default_lengths => (0, vec![28, 24, 12]),
        [] => (22, Vec::new()),
        [one] => (*one, Vec::new()),
        many => (0, many.to_vec()),
    }
}

/// Whether a calibration file's header says it was made with `opts`.
fn made_as(h: &CalibHeader, opts: &CalibOptions) -> bool {
    h.seed == opts.seed
        && h.max_answer == opts.max_answer
        && h.sources == calib::header_sources(opts)
}

/// The calibration set at `path` when it was made with `opts`, else a new one made and
/// written there. True when reused.
fn calib_file(
    model: &Model,
    attention: &AttentionOptions,
    opts: &CalibOptions,
    path: &Path,
    what: &str,
    progress: &mut dyn Progress,
) -> Result<(CalibSet, bool)> {
    match CalibSet::read(path) {
        Ok(s)
            if made_as(&s.header, opts)
                && s.lengths() == opts.lengths
                && s.samples.len() == opts.total() =>
        {
            Ok((s, true))
        }
        _ => {
            let s = stages::calibrate(model, attention, opts, what, progress)?;
            s.write(path)?;
            Ok((s, false))
        }
    }
}

/// Makes a plan for `model` (any weight mode: the calibration's answers and the
/// validation run the model's own products, the profile's backward pass dequantizes
/// each layer to f32 and is exact in f32): calibration, profile, the solve, and
/// validation of the plans of least predicted loss on held-out samples longer than any
/// profiled; the winner is written to `opts.output`. Every stage's file is kept in the
/// work folder and reused by a later call made the same way (see the module's doc).
pub fn make(model: &Model, opts: &MakeOptions, progress: &mut dyn Progress) -> Result<Made> {
    opts.check()?;
    let context = model.llama.config.context_len;
    let lengths = if opts.lengths.is_empty() {
        vec![
            (context / 8).max(512),
            (context / 4).max(1024),
            (context / 2).max(2048),
        ]
    } else {
        opts.lengths.clone()
    };
    let longest = lengths.iter().copied().max().unwrap_or(0);
    let val_len = opts
        .validate_length
        .unwrap_or((longest * 5 / 4).div_ceil(64) * 64)
        .min(context);
    if lengths.iter().any(|&l| l >= val_len) {
        progress.message(&format!(
            "note: the validation length {val_len} is not longer than every profiled length"
        ));
    }
    let work = opts.work();
    std::fs::create_dir_all(&work).map_err(|source| Error::Io {
        path: work.clone(),
        source,
    })?;
    let mut times = Vec::new();
    let mut reused = Reused::default();
    let attention = &opts.attention;

    // 1. Calibration (reused when the file there was made the same way).
    let t = Instant::now();
    let sources = stages::read_sources(&opts.sources, &model.path, progress)?;
    let (samples, samples_at) = sample_counts(&opts.samples, opts.lengths.is_empty());
    let calib_opts = CalibOptions {
        lengths: lengths.clone(),
        samples,
        samples_at,
        seed: opts.seed,
        max_answer: opts.max_answer,
        sources: sources.clone(),
        families: opts.families.clone(),
        batch: 4,
    };
    let (set, r) = calib_file(
        model,
        attention,
        &calib_opts,
        &work.join("calib.jsonl"),
        "calibrate",
        progress,
    )?;
    reused.calibration = r;
    times.push(("calibrate", t.elapsed().as_secs_f64()));

    // 2. Profile (reused when it has the lengths, the model's shape and version 3's sums).
    let t = Instant::now();
    let profile_path = work.join("profile.safetensors");
    let prof = match Profile::read(&profile_path) {
        Ok(p)
            if p.lengths() == lengths
                && p.shape == model.llama.config.shape()
                && p.levels
                    .iter()
                    .all(|l| l.needle.is_some() && l.needle_influence.is_some()) =>
        {
            reused.profile = true;
            p
        }
        _ => {
            let (p, resumed) = stages::profile(
                model,
                &set,
                &lengths,
                Settings::default().sink,
                &profile_path,
                opts.keep_parts,
                progress,
            )?;
            reused.profile_samples = resumed;
            p
        }
    };
    times.push(("profile", t.elapsed().as_secs_f64()));

    // 3. Optimize.
    let t = Instant::now();
    let plans_dir = work.join("plans");
    let optimized = optimize(
        &prof,
        &OptimizeOptions {
            density: opts.density,
            constraint_lengths: stages::constraint_lengths(
                &opts.constraint_lengths,
                &prof.lengths(),
                context,
            ),
            max_rules_per_layer: opts.max_rules_per_layer,
            alpha_step: None,
            intervals: opts.intervals,
            mip_gap: opts.mip_gap,
            min_use: false,
            retrieval_weight: opts.retrieval_weight,
            influence: opts.influence,
            pool_influence: opts.pool_influence,
            needle: opts.needle,
            settings: Settings {
                sink: prof.sink,
                ..Settings::default()
            },
        },
    )?;
    stages::write_optimized(&optimized, &plans_dir)?;
    progress.optimized(&optimized);
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
    let (validation, chosen) = if opts.validate_plans == 0 {
        // No validation: the plan of least summed predicted loss.
        let best = ranked
            .first()
            .ok_or_else(|| Error::Usage("no plan to choose from".into()))?;
        let file = plans_dir.join(format!("{}.json", best.name));
        let bytes = std::fs::read(&file).map_err(|source| Error::Io {
            path: file.clone(),
            source,
        })?;
        moac::fsutil::write_atomic(&opts.output, &bytes)?;
        (None, file)
    } else {
        let held_out = stages::held_out_options(
            val_len,
            opts.validate_samples,
            opts.seed.wrapping_add(HELD_OUT_SEED),
            opts.max_answer,
            &opts.families,
            sources,
        );
        let (val, r) = calib_file(
            model,
            attention,
            &held_out,
            &work.join("validate.jsonl"),
            "held-out samples",
            progress,
        )?;
        reused.held_out = r;
        let samples: Vec<&CalibSample> = val.samples.iter().collect();
        let top: Vec<String> = ranked
            .iter()
            .take(opts.validate_plans.max(1))
            .map(|p| p.name.clone())
            .collect();
        let v = stages::validate(
            model,
            attention,
            &samples,
            &ValidateOptions {
                plans: &plans_dir,
                only: Some(&top),
                max_answer: opts.max_answer,
                baselines: opts.validate_baselines,
                output: &opts.output,
                incumbent: top.first().map(String::as_str),
            },
            progress,
        )?;
        let chosen = v.chosen.clone();
        (Some(v), chosen)
    };
    times.push(("validate", t.elapsed().as_secs_f64()));
    Ok(Made {
        work,
        optimized,
        chosen,
        validation,
        times,
        reused,
    })
}
