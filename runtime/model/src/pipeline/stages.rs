//! The pipeline's stages as library calls, each with its files: the calibration text
//! ([`read_sources`]), a calibration set made with the dense model ([`calibrate`]), the
//! profile written with its resume folder ([`profile`]), the plans of a solve written
//! as files ([`write_optimized`]), and the validation that picks and writes the plan
//! ([`validate`]). `moac plan make` ([`super::make`]) strings them together; the single
//! commands (`moac calibrate`, `profile`, `optimize`, `validate`) call them one at a
//! time. Progress and messages go to a [`Progress`], which the caller draws.

use super::calib::{self, CalibOptions, CalibSample, CalibSet};
use super::objective::{MadePlan, Optimized};
use super::profile::{self, Profile};
use super::tasks::Family;
use super::validate::response_losses;
use crate::attention::Engine;
use crate::{Error, Model, Result};
use moac::geometry::Dtype;
use moac::ValidPlan;
use moac_runtime::{Artifact, Backend, PrefillMode, Runtime};
use std::path::{Path, PathBuf};

/// What the pipeline reports as it goes. Every method has an empty default, so a
/// caller implements only what it shows.
pub trait Progress {
    /// A counted stage begins: "calibrate", "held-out samples", "profile", "validate".
    fn start(&mut self, _what: &str) {}
    /// `done` of `total` items of the current stage are finished.
    fn advance(&mut self, _done: usize, _total: usize) {}
    /// The current stage is over.
    fn finish(&mut self) {}
    /// A line for the user: a note ("note: ..."), or what a stage reused.
    fn message(&mut self, _text: &str) {}
    /// A solve is over and its plans are written (before validation runs them).
    fn optimized(&mut self, _out: &Optimized) {}
}

/// A [`Progress`] that shows nothing.
pub struct Quiet;

impl Progress for Quiet {}

/// How the attention of the calibration's dense answers and of the validated plans runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionOptions {
    /// cpu, emu (the generated CUDA on the CPU) or cuda.
    pub backend: Backend,
    /// The K/V cache's element type.
    pub dtype: Dtype,
    /// The prefill mask.
    pub prefill_mode: PrefillMode,
}

impl Default for AttentionOptions {
    /// The CLI's defaults: the cpu backend, an f16 cache, MoA's block-64 prefill mask.
    fn default() -> Self {
        AttentionOptions {
            backend: Backend::Cpu,
            dtype: Dtype::F16,
            prefill_mode: PrefillMode::Block64,
        }
    }
}

impl AttentionOptions {
    /// A runtime for `plan` on the backend (the artifact lowered in memory).
    pub fn runtime(&self, plan: &ValidPlan) -> Result<Runtime> {
        let art = Artifact::from_plan(plan, self.dtype, None)?;
        Ok(Runtime::new(art, self.backend)?)
    }

    /// The engine that runs `rt` with the prefill mask.
    pub fn engine<'a>(&self, rt: &'a Runtime) -> Engine<'a> {
        Engine::Moac {
            runtime: rt,
            mode: self.prefill_mode,
        }
    }
}

/// A file's name (the path when it has none): how the profile and the reports name the
/// model and the plans.
pub fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// The calibration texts: `paths` when given, else the default beside the model
/// ([`calib::default_source`]); none when that is not there either (the mix then uses
/// generated records, and a note says so).
pub fn read_sources(
    paths: &[PathBuf],
    model: &Path,
    progress: &mut dyn Progress,
) -> Result<Vec<(String, String)>> {
    let paths: Vec<PathBuf> = if !paths.is_empty() {
        paths.to_vec()
    } else {
        let d = calib::default_source(model);
        if d.is_file() {
            vec![d]
        } else {
            progress.message(&format!(
                "note: no calibration text ({} not found; run scripts/setup-calib-text.sh): retrieval haystacks are generated records, no fact or summary questions on real text",
                d.display()
            ));
            Vec::new()
        }
    };
    paths.iter().map(|p| calib::read_source(p)).collect()
}

/// Makes a calibration set, the model's own answers from the dense model; `what` names
/// the stage for `progress`.
pub fn calibrate(
    model: &Model,
    attention: &AttentionOptions,
    opts: &CalibOptions,
    what: &str,
    progress: &mut dyn Progress,
) -> Result<CalibSet> {
    let dense = model.llama.dense_plan(Path::new("dense"))?;
    let rt = attention.runtime(&dense)?;
    let total = opts.total();
    progress.start(what);
    progress.advance(0, total);
    let set = calib::make(model, attention.engine(&rt), opts, &mut |d, _| {
        progress.advance(d, total)
    })?;
    progress.finish();
    Ok(set)
}

/// The options of held-out samples at one length: the calibration's families and texts
/// with another seed, answered 4 at a time.
pub fn held_out_options(
    length: usize,
    samples: usize,
    seed: u64,
    max_answer: usize,
    families: &[Family],
    sources: Vec<(String, String)>,
) -> CalibOptions {
    CalibOptions {
        lengths: vec![length],
        samples,
        samples_at: Vec::new(),
        seed,
        max_answer,
        sources,
        families: families.to_vec(),
        batch: 4,
    }
}

/// Profiles `set` at `lengths` (all of its lengths when empty) and writes the profile to
/// `output`. Finished samples are kept in [`profile::parts_dir`] as it runs (a rerun
/// resumes from them) and removed once the profile is written, unless `keep_parts`.
/// Returns the profile and how many samples were taken from the parts.
pub fn profile(
    model: &Model,
    set: &CalibSet,
    lengths: &[usize],
    sink: u64,
    output: &Path,
    keep_parts: bool,
    progress: &mut dyn Progress,
) -> Result<(Profile, usize)> {
    progress.start("profile");
    let mut resumed = 0;
    let p = profile::run(
        &model.llama,
        &file_name(&model.path),
        set,
        lengths,
        sink,
        output,
        &mut |done, total, r| {
            progress.advance(done, total);
            resumed += r as usize;
        },
    )?;
    progress.finish();
    if resumed > 0 {
        progress.message(&format!(
            "resumed {resumed} samples from {}",
            profile::parts_dir(output).display()
        ));
    }
    p.write(output)?;
    // The parts are a resume point (the profile holds everything), and with
    // `keep_parts` the material of ablations: a profile of a subset of the samples
    // (`moac profile --families/--max-samples` on the same calibration file) reuses them.
    if !keep_parts {
        let _ = std::fs::remove_dir_all(profile::parts_dir(output));
    }
    Ok((p, resumed))
}

/// The constraint lengths: `given`, else the profiled lengths, then doublings up to the
/// model's context.
pub fn constraint_lengths(given: &[usize], profiled: &[usize], context: usize) -> Vec<usize> {
    if !given.is_empty() {
        return given.to_vec();
    }
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

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn json_bytes(v: &serde_json::Value) -> Result<Vec<u8>> {
    let mut s = serde_json::to_string_pretty(v).map_err(|e| Error::Usage(e.to_string()))?;
    s.push('\n');
    Ok(s.into_bytes())
}

/// Writes a solve's plans into `dir`: `plan-NN.json` and `uniform.json` (official MoA
/// JSON), `summary.json` (the [`Optimized`] record) and `front.svg` (each plan's
/// predicted loss at the shortest and the longest profiled length).
pub fn write_optimized(out: &Optimized, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    for p in out.plans.iter().chain(std::iter::once(&out.uniform)) {
        moac::fsutil::write_atomic(
            &dir.join(format!("{}.json", p.name)),
            &json_bytes(&p.to_moa_json())?,
        )?;
    }
    let summary = serde_json::to_value(out).map_err(|e| Error::Usage(e.to_string()))?;
    moac::fsutil::write_atomic(&dir.join("summary.json"), &json_bytes(&summary)?)?;
    let (first, last) = (0, out.profile_lengths.len().saturating_sub(1));
    let length = |i: usize| out.profile_lengths.get(i).copied().unwrap_or(0);
    let at = |p: &MadePlan, i: usize| p.loss.get(i).copied().unwrap_or(f64::NAN);
    let points: Vec<(String, f64, f64)> = out
        .plans
        .iter()
        .chain(std::iter::once(&out.uniform))
        .map(|p| (p.name.clone(), at(p, first), at(p, last)))
        .collect();
    let svg = crate::svg::scatter_plot(
        &format!(
            "{} at density {}: predicted loss of each plan",
            out.model, out.density
        ),
        &format!("loss at N = {}", length(first)),
        &format!("loss at N = {}", length(last)),
        &points,
    );
    moac::fsutil::write_atomic(&dir.join("front.svg"), svg.as_bytes())?;
    Ok(())
}

/// The plans of an optimize folder: its `plan-NN.json` files, sorted.
pub fn plan_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(io(dir))?;
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
        return Err(Error::Usage(format!(
            "{}: no plan-NN.json files (the output folder of moac optimize)",
            dir.display()
        )));
    }
    Ok(v)
}

/// Reads a plan file (a moac plan, or official MoA JSON whose geometry comes from the
/// model) and checks it against the model.
pub fn plan_for(model: &Model, plan: &Path) -> Result<ValidPlan> {
    let p = moac::plan::load_for_model(plan, model.llama.config.shape(), &model.path)?;
    model.llama.check_plan(&p)?;
    Ok(p)
}

/// The family of a sample's task label (`kv-json` -> `kv`, `source` -> `summary`).
pub fn family_of(task: &str) -> String {
    Family::of_task(task).map_or_else(|| task.to_string(), |f| f.name().to_string())
}

/// One plan's validation: its mean response loss over the held-out samples, and per
/// task family (the synthetic retrieval families apart from the model-answered ones).
#[derive(Debug, Clone, PartialEq)]
pub struct Validated {
    /// "dense", "uniform" or the plan's file name without `.json`.
    pub name: String,
    pub loss: f64,
    /// (family, mean loss) in the order families first appear.
    pub by_family: Vec<(String, f64)>,
    /// Each held-out sample's loss, in sample order.
    pub losses: Vec<f64>,
}

/// What [`validate`] measured and chose.
#[derive(Debug, Clone, PartialEq)]
pub struct Validation {
    /// Dense and uniform first (when measured), then the plans in file order.
    pub rows: Vec<Validated>,
    /// The chosen plan file (copied to the output): see [`ValidateOptions::incumbent`].
    pub chosen: PathBuf,
    /// Why it was chosen, in a sentence.
    pub reason: String,
    /// (family, held-out samples of it) in the order families first appear.
    pub families: Vec<(String, usize)>,
    /// Held-out samples in all.
    pub samples: usize,
    /// The longest held-out sample's length.
    pub length: usize,
}

/// Which plans [`validate`] runs, and where the chosen one goes.
#[derive(Debug, Clone)]
pub struct ValidateOptions<'a> {
    /// The folder [`write_optimized`] wrote.
    pub plans: &'a Path,
    /// Only the plans of these names (`plan-NN`; all when `None`).
    pub only: Option<&'a [String]>,
    /// The answer tokens the cache is sized for.
    pub max_answer: usize,
    /// Measure dense and `uniform.json` beside the plans.
    pub baselines: bool,
    /// Where the chosen plan is written (its bytes as they are in `plans`).
    pub output: &'a Path,
    /// The optimizer's own choice (`plan-NN`): another plan replaces it only where its
    /// held-out loss is lower by more than two standard errors of the per-sample
    /// differences (a handful of held-out samples cannot tell closer plans apart, and the
    /// optimizer's choice rests on every calibration sample). `None`: the plan of least
    /// mean loss.
    pub incumbent: Option<&'a str>,
}

/// Whether the losses `c` beat `inc` (same samples) beyond noise: the mean of the
/// per-sample differences below zero by more than two of its standard errors; with
/// fewer than two samples nothing can be shown. Returns (beats, mean difference,
/// standard error).
pub fn beats(c: &[f64], inc: &[f64]) -> (bool, f64, f64) {
    let n = c.len().min(inc.len());
    if n < 2 {
        return (false, 0.0, f64::INFINITY);
    }
    let d: Vec<f64> = c.iter().zip(inc).map(|(a, b)| a - b).collect();
    let mean = d.iter().sum::<f64>() / n as f64;
    let var = d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let se = (var / n as f64).sqrt();
    (mean < 0.0 && -mean > 2.0 * se, mean, se)
}

/// Runs every plan of `opts.plans` (and dense and uniform for reference) on `samples`,
/// each as it runs (prompt prefilled through moac's cache, the answer fed back token by
/// token), and writes the chosen plan ([`ValidateOptions::incumbent`]) to `opts.output`.
pub fn validate(
    model: &Model,
    attention: &AttentionOptions,
    samples: &[&CalibSample],
    opts: &ValidateOptions<'_>,
    progress: &mut dyn Progress,
) -> Result<Validation> {
    let mut rows = Vec::new();
    let mut files = plan_files(opts.plans)?;
    if let Some(names) = opts.only {
        files.retain(|f| names.iter().any(|n| f.ends_with(format!("{n}.json"))));
    }
    let uniform = opts.plans.join("uniform.json");
    let mut runs: Vec<(String, Option<PathBuf>)> = Vec::new();
    if opts.baselines {
        runs.push(("dense".into(), None));
    }
    if opts.baselines && uniform.is_file() {
        runs.push(("uniform".into(), Some(uniform)));
    }
    runs.extend(
        files
            .drain(..)
            .map(|p| (file_name(&p).trim_end_matches(".json").to_string(), Some(p))),
    );
    let mut families: Vec<String> = Vec::new();
    for s in samples {
        let f = family_of(&s.task);
        if !families.contains(&f) {
            families.push(f);
        }
    }
    let total = runs.len() * samples.len();
    progress.start("validate");
    progress.advance(0, total);
    for (i, (name, file)) in runs.iter().enumerate() {
        let plan = match file {
            Some(f) => plan_for(model, f)?,
            None => model.llama.dense_plan(Path::new("dense"))?,
        };
        let rt = attention.runtime(&plan)?;
        let losses = response_losses(
            &model.llama,
            attention.engine(&rt),
            samples,
            opts.max_answer,
            4,
            &mut |d, _| progress.advance(i * samples.len() + d, total),
        )?;
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
        rows.push(Validated {
            name: name.clone(),
            loss: mean,
            by_family,
            losses,
        });
    }
    progress.finish();
    let plans: Vec<(&Validated, &PathBuf)> = rows
        .iter()
        .zip(&runs)
        .filter(|(r, _)| r.name.starts_with("plan-"))
        .filter_map(|(r, (_, f))| f.as_ref().map(|f| (r, f)))
        .collect();
    let least = plans
        .iter()
        .min_by(|a, b| a.0.loss.total_cmp(&b.0.loss))
        .copied()
        .ok_or_else(|| Error::Usage("no plan to choose from".into()))?;
    let inc = opts
        .incumbent
        .and_then(|n| plans.iter().find(|(r, _)| r.name == n).copied());
    let (chosen, reason) = match inc {
        None => (
            least.1.clone(),
            format!("{}: the least mean loss", least.0.name),
        ),
        Some(inc) => {
            // The challenger of least mean loss among those that beat the incumbent.
            let winner = plans
                .iter()
                .filter(|(r, _)| r.name != inc.0.name)
                .filter(|(r, _)| beats(&r.losses, &inc.0.losses).0)
                .min_by(|a, b| a.0.loss.total_cmp(&b.0.loss));
            match winner {
                Some((r, f)) => {
                    let (_, m, se) = beats(&r.losses, &inc.0.losses);
                    (
                        (*f).clone(),
                        format!(
                            "{}: its loss is {:.4} below the optimizer's {} (2 standard errors: {:.4})",
                            r.name,
                            -m,
                            inc.0.name,
                            2.0 * se
                        ),
                    )
                }
                None if least.0.name == inc.0.name => (
                    inc.1.clone(),
                    format!(
                        "{}: the optimizer's choice and the least mean loss",
                        inc.0.name
                    ),
                ),
                None => {
                    let (_, m, se) = beats(&least.0.losses, &inc.0.losses);
                    (
                        inc.1.clone(),
                        format!(
                            "{}: the optimizer's choice, kept ({}'s loss is {:.4} lower, within 2 standard errors: {:.4})",
                            inc.0.name,
                            least.0.name,
                            -m,
                            2.0 * se
                        ),
                    )
                }
            }
        }
    };
    let bytes = std::fs::read(&chosen).map_err(io(&chosen))?;
    if let Some(dir) = opts.output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    moac::fsutil::write_atomic(opts.output, &bytes)?;
    let families = families
        .into_iter()
        .map(|f| {
            let n = samples.iter().filter(|s| family_of(&s.task) == f).count();
            (f, n)
        })
        .collect();
    Ok(Validation {
        rows,
        chosen,
        reason,
        families,
        samples: samples.len(),
        length: samples.iter().map(|s| s.length).max().unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    //! The validation's rule against hand-computed paired statistics.
    use super::beats;

    #[test]
    fn a_plan_beats_the_incumbent_only_beyond_two_standard_errors() {
        // Differences -0.10, -0.12, -0.08, -0.10: mean -0.1, sample sd 0.01633, se
        // 0.008165: far beyond two standard errors.
        let inc = [1.0, 2.0, 3.0, 4.0];
        let c = [0.9, 1.88, 2.92, 3.9];
        let (b, m, se) = beats(&c, &inc);
        assert!(b);
        assert!((m + 0.1).abs() < 1e-12);
        assert!((se - 0.008_164_965_809_277_26).abs() < 1e-9, "{se}");
        // The fifth round's validation: plan-02 against the summed plan-03, six
        // families (mean -0.0114, se 0.0122): not beyond the noise.
        let p03 = [0.7435, 0.1026, 1.5318, 0.6632, 0.6957, 0.4427];
        let p02 = [0.7436, 0.0899, 1.4650, 0.6578, 0.6940, 0.4608];
        let (b, m, se) = beats(&p02, &p03);
        assert!(!b, "mean {m}, se {se}");
        assert!(m < 0.0 && -m < 2.0 * se);
        // Worse, equal, or one sample: never.
        assert!(!beats(&inc, &c).0);
        assert!(!beats(&inc, &inc).0);
        assert!(!beats(&[0.0], &[5.0]).0);
        assert!(!beats(&[], &[]).0);
    }
}
