//! The launch-configuration sweep behind `moac tune`: for every distinct kernel of the
//! chosen layers and kinds, every candidate launch configuration
//! ([`LaunchConfig::candidates`]) is first checked against the cpu reference (through
//! [`verify`], with the candidate as a launch override), then, on the `cuda` backend,
//! timed with CUDA events: warm-up, median of repeats, inputs rotated across buffer
//! sets larger than twice the L2 cache. A wrong candidate is reported and never timed
//! or chosen. The results, every candidate with its outcome, become entries of a tuning
//! database ([`TuningDb`]).

use super::verify::{verify, VerifyOptions};
use crate::error::{CliError, Result};
use moac::geometry::{CacheGeometry, Dtype};
use moac::ir::{KernelKind, LaunchConfig, LowerOptions, PlantedBug, PrefillMode};
use moac::plan::ValidPlan;
use moac::tuning::{bucket, Entry, Environment, LaunchCandidate, TuningDb, TuningKey};
use moac_runtime::backend::cuda::CudaDevice;
use moac_runtime::backend::emu::{EmuModule, EmuOptions};
use moac_runtime::backend::{bytes_moved, Backend, LayerShape};
use moac_runtime::gpu::attention::{DeviceKv, LayerAttention};
use moac_runtime::gpu::{Gpu, GpuBuf, Plain};
use moac_runtime::reference::check::Rng;
use moac_runtime::Artifact;
use std::collections::BTreeMap;
use std::sync::Arc;

/// The kinds `moac tune` sweeps. Merge has one configuration (D threads); it runs, and
/// is checked, with every decode candidate.
pub const TUNED_KINDS: [KernelKind; 5] = [
    KernelKind::Decode,
    KernelKind::Append,
    KernelKind::Fill,
    KernelKind::Prefill(PrefillMode::Block64),
    KernelKind::Prefill(PrefillMode::Token),
];

/// The launch configuration of the planted wrong candidate (test-only): outside the
/// candidate space, so it can be told apart in the database.
pub const PLANTED_LAUNCH: LaunchConfig = LaunchConfig {
    threads: 128,
    chunk: 192,
    ..LaunchConfig::UNSET
};

/// What to tune and how.
#[derive(Debug, Clone)]
pub struct SweepOptions {
    pub layers: Vec<usize>,
    pub kinds: Vec<KernelKind>,
    pub dtype: Dtype,
    /// emu (the correctness sweep only) or cuda (checked and timed).
    pub backend: Backend,
    /// The shape timed on the GPU; its buckets of N (= prompt + M) and batch key the
    /// database entries.
    pub prompt_len: u64,
    pub max_new_tokens: u64,
    pub batch: usize,
    pub warmup: usize,
    pub repeats: usize,
    /// Inputs of every candidate's correctness check (small: it also runs on emu).
    pub check_prompt_lens: Vec<usize>,
    pub check_max_new_tokens: usize,
    pub check_steps: usize,
    pub seed: u64,
    pub emu: EmuOptions,
    /// Parallel g++ builds of the emu modules (0: one per core).
    pub jobs: usize,
    /// Test-only: add a decode candidate whose windows are one token short
    /// ([`PLANTED_LAUNCH`]); the check must catch and exclude it.
    pub plant_bad_candidate: bool,
}

impl Default for SweepOptions {
    fn default() -> Self {
        SweepOptions {
            layers: vec![0],
            kinds: TUNED_KINDS.to_vec(),
            dtype: Dtype::F16,
            backend: Backend::Emu,
            prompt_len: 4096,
            max_new_tokens: 1024,
            batch: 1,
            warmup: 5,
            repeats: 20,
            check_prompt_lens: vec![192, 131, 9],
            check_max_new_tokens: 96,
            check_steps: 80,
            seed: 1,
            emu: EmuOptions::default(),
            jobs: 0,
            plant_bad_candidate: false,
        }
    }
}

/// The outcome of one candidate.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub layer: usize,
    pub kind: KernelKind,
    /// The kernel's tuning identity (its database key).
    pub kernel: String,
    pub launch: LaunchConfig,
    /// The configuration `moac compile` picks for this GPU without a database (the
    /// baseline; the arch-independent default on emu).
    pub is_default: bool,
    /// The planted wrong candidate (test-only).
    pub planted: bool,
    pub correct: bool,
    pub median_us: Option<f64>,
    /// Bytes the launch must move over the median time.
    pub gb_per_s: Option<f64>,
    pub note: String,
}

/// What a tuning run found.
#[derive(Debug, Clone)]
pub struct SweepReport {
    pub env: Environment,
    pub outcomes: Vec<Outcome>,
    pub db: TuningDb,
}

struct Job {
    layer: usize,
    kind: KernelKind,
    kernel: String,
    candidates: Vec<(LaunchConfig, Option<PlantedBug>)>,
}

fn lower_options(
    opts: &SweepOptions,
    layer: usize,
    over: Option<(KernelKind, LaunchConfig)>,
    bug: Option<PlantedBug>,
) -> LowerOptions {
    LowerOptions {
        dtype: opts.dtype,
        layers: Some(vec![layer]),
        launch_overrides: over.map(|(k, l)| (k.slug(), l)).into_iter().collect(),
        planted_bug: bug,
        ..LowerOptions::default()
    }
}

fn kernel_of(low: &moac::ir::Lowered, kind: KernelKind) -> Result<&moac::ir::KernelSpec> {
    let lk = low
        .layers
        .first()
        .ok_or_else(|| CliError::Usage("tune: no layer lowered".into()))?;
    let name = lk.kernel(kind);
    low.kernels
        .iter()
        .find(|k| &k.name == name)
        .ok_or_else(|| CliError::Usage(format!("tune: kernel {name} is not lowered")))
}

/// The distinct kernels to tune and their candidates; `heuristic(kind)` (the baseline)
/// is always among them.
fn jobs(
    plan: &ValidPlan,
    opts: &SweepOptions,
    heuristic: &dyn Fn(KernelKind) -> LaunchConfig,
) -> Result<Vec<Job>> {
    let d = plan.model().head_dim;
    let mut out: Vec<Job> = Vec::new();
    for &layer in &opts.layers {
        let low = moac::ir::lower(plan, &lower_options(opts, layer, None, None))?;
        for &kind in &opts.kinds {
            if kind == KernelKind::Merge {
                continue;
            }
            let kernel = kernel_of(&low, kind)?.tuning_identity();
            if out.iter().any(|j| j.kernel == kernel) {
                continue; // a layer with identical rules: tuned once
            }
            let mut cands: Vec<(LaunchConfig, Option<PlantedBug>)> =
                LaunchConfig::candidates(kind, d, plan.model().group_size())
                    .into_iter()
                    .map(|c| (c, None))
                    .collect();
            let h = heuristic(kind);
            if !cands.contains(&(h, None)) {
                cands.insert(0, (h, None));
            }
            if opts.plant_bad_candidate && kind == KernelKind::Decode {
                cands.push((PLANTED_LAUNCH, Some(PlantedBug::DecodeWindowOffByOne)));
            }
            out.push(Job {
                layer,
                kind,
                kernel,
                candidates: cands,
            });
        }
    }
    Ok(out)
}

/// Builds every module the sweep will load, `opts.jobs` at a time, into the caches the
/// sweep then finds them in: emu modules (one g++ run each) or, for `arch`, CUBINs (one
/// NVRTC compile each, into the compile cache).
fn prebuild(plan: &ValidPlan, opts: &SweepOptions, jobs: &[Job], arch: Option<&str>) -> Result<()> {
    // Unit names are hashes of the kernels they hold: one build per name.
    let mut units: BTreeMap<String, String> = BTreeMap::new();
    for j in jobs {
        for &(launch, bug) in &j.candidates {
            let low = moac::ir::lower(
                plan,
                &lower_options(opts, j.layer, Some((j.kind, launch)), bug),
            )?;
            for u in moac::emit::emit_units(&low)? {
                units.entry(u.name).or_insert(u.source);
            }
        }
    }
    let units: Vec<(String, String)> = units.into_iter().collect();
    let workers = moac::jit::workers(opts.jobs, units.len());
    let built = moac::jit::parallel_map(&units, workers, |_, (entry, src)| match arch {
        Some(arch) => {
            moac_runtime::backend::cuda::module::nvrtc_cubin(entry, src, arch).map(|_| ())
        }
        None => EmuModule::build(src, &[entry.as_str()], &opts.emu).map(|_| ()),
    })?;
    built
        .into_iter()
        .collect::<std::result::Result<Vec<()>, _>>()?;
    Ok(())
}

/// The environment the results are valid for.
fn environment(dev: Option<&Arc<CudaDevice>>) -> Result<Environment> {
    let nvrtc_version = moac::jit::nvrtc::load()
        .map(|n| n.version.clone())
        .unwrap_or_else(|_| "none".into());
    Ok(match dev {
        Some(d) => Environment {
            arch: d.arch().to_string(),
            sm_count: d.sm_count()?,
            driver_version: d.driver_version()?,
            nvrtc_version,
        },
        None => Environment {
            arch: "emu".into(),
            sm_count: 0,
            driver_version: "none".into(),
            nvrtc_version,
        },
    })
}

/// Runs the sweep. `progress` is called with (0, total, None) once the candidates are
/// known (before the emu modules are built), then after every candidate with (done,
/// total, its outcome).
pub fn run(
    plan: &ValidPlan,
    opts: &SweepOptions,
    progress: &mut dyn FnMut(usize, usize, Option<&Outcome>),
) -> Result<SweepReport> {
    if opts.layers.is_empty() || opts.kinds.is_empty() {
        return Err(CliError::Usage(
            "tune: no layers or no kinds selected".into(),
        ));
    }
    if opts.repeats == 0 {
        return Err(CliError::Usage("tune: --repeats must be at least 1".into()));
    }
    let dev = match opts.backend {
        Backend::Cuda => Some(CudaDevice::open()?),
        Backend::Emu => None,
        Backend::Cpu => {
            return Err(CliError::Usage(
                "tune runs the generated kernels: --backend emu or cuda".into(),
            ))
        }
    };
    let env = environment(dev.as_ref())?;
    // The baseline: what `moac compile` picks for this GPU without a database (for the
    // arch-independent defaults on emu).
    let device = dev
        .as_ref()
        .map(|_| moac::ir::DeviceProps::with_sm_count(env.sm_count));
    let kv_slots = match device {
        Some(_) => moac::ir::typical_kv_slots(plan, None)?,
        None => 0,
    };
    let m = plan.model();
    let heuristic = |kind: KernelKind| {
        LaunchConfig::heuristic(kind, m.head_dim, m.num_kv_heads, kv_slots, device)
            .resolved(kind, m.group_size())
    };
    let jobs = jobs(plan, opts, &heuristic)?;
    let total: usize = jobs.iter().map(|j| j.candidates.len()).sum();
    progress(0, total, None);
    prebuild(plan, opts, &jobs, dev.as_ref().map(|d| d.arch()))?;
    let measured_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut outcomes = Vec::new();
    let mut db = TuningDb::default();
    let mut done = 0;
    for j in &jobs {
        let mut cands = Vec::new();
        for &(launch, bug) in &j.candidates {
            let mut o = Outcome {
                layer: j.layer,
                kind: j.kind,
                kernel: j.kernel.clone(),
                launch,
                is_default: launch == heuristic(j.kind) && bug.is_none(),
                planted: bug.is_some(),
                correct: false,
                median_us: None,
                gb_per_s: None,
                note: String::new(),
            };
            check(plan, opts, j, launch, bug, &mut o);
            if o.correct {
                if let Some(dev) = &dev {
                    match time(dev, plan, opts, j, launch) {
                        Ok((us, bytes)) => {
                            o.median_us = Some(us);
                            o.gb_per_s = Some(bytes as f64 / (us * 1e3));
                        }
                        Err(e) => {
                            o.correct = false;
                            o.note = format!("timing failed: {e}");
                        }
                    }
                }
            }
            if o.planted {
                o.note = format!("planted wrong candidate (test): {}", o.note);
            }
            done += 1;
            progress(done, total, Some(&o));
            cands.push(LaunchCandidate {
                launch,
                correct: o.correct,
                median_us: o.median_us,
                note: o.note.clone(),
            });
            outcomes.push(o);
        }
        db.entries.push(Entry {
            key: TuningKey {
                kernel: j.kernel.clone(),
                env: env.clone(),
                dtype: opts.dtype,
                n_bucket: bucket(opts.prompt_len + opts.max_new_tokens),
                batch_bucket: bucket(opts.batch as u64),
            },
            candidates: cands,
            measured_at,
        });
    }
    Ok(SweepReport { env, outcomes, db })
}

/// The candidate against the cpu reference: the layer's kernels with this kind's launch
/// replaced, on fresh random inputs (ragged rows, wrapping decode steps).
fn check(
    plan: &ValidPlan,
    opts: &SweepOptions,
    j: &Job,
    launch: LaunchConfig,
    bug: Option<PlantedBug>,
    o: &mut Outcome,
) {
    let vopts = VerifyOptions {
        layers: vec![j.layer],
        dtype: opts.dtype,
        backend: opts.backend,
        prompt_lens: opts.check_prompt_lens.clone(),
        max_new_tokens: opts.check_max_new_tokens,
        steps: opts.check_steps,
        seed: opts.seed,
        emu: opts.emu.clone(),
        planted_bug: bug,
        launch_overrides: [(j.kind.slug(), launch)].into_iter().collect(),
        only: Some(j.kind),
    };
    match verify(plan, &vopts) {
        Ok(lines) => {
            let slug = j.kind.slug();
            let mine: Vec<_> = lines.iter().filter(|l| l.kind == slug).collect();
            o.correct = !mine.is_empty() && mine.iter().all(|l| l.passed);
            if let Some(l) = mine.iter().find(|l| !l.passed) {
                o.note = format!(
                    "wrong: max abs {:.2e}, max rel {:.2e}",
                    l.max_abs, l.max_rel
                );
            }
        }
        Err(e) => {
            o.correct = false;
            o.note = format!("check failed: {e}");
        }
    }
}

/// Median microseconds of one launch of the candidate at the tuning shape, and the
/// bytes it must move ([`bytes_moved`], the model `moac-gpu-bench` reports with too),
/// timed by the one harness ([`CudaDevice::time_us`]); inputs rotate over buffer sets
/// larger than twice the L2, so every launch reads from memory.
fn time(
    dev: &Arc<CudaDevice>,
    plan: &ValidPlan,
    opts: &SweepOptions,
    j: &Job,
    launch: LaunchConfig,
) -> Result<(f64, u64)> {
    let art = Artifact::from_lowering(
        plan,
        &lower_options(opts, j.layer, Some((j.kind, launch)), None),
    )?;
    let geo = CacheGeometry::new(plan, opts.prompt_len, opts.max_new_tokens)?;
    let shape = LayerShape::new(&geo, j.layer);
    let gpu = Gpu::kernels_only(dev);
    let layer = LayerAttention::new(&gpu, &art.layer_setup(&shape)?)?;
    let (b, p) = (opts.batch, opts.prompt_len as usize);
    let (hq, hkv, d) = (shape.num_query_heads, shape.num_kv_heads, shape.head_dim);
    let es = opts.dtype.size_bytes() as usize;
    let l2 = dev.l2_bytes()?.max(1 << 20);
    // Enough buffer sets that one pass over them is at least twice the L2 size.
    let sets_for = |bytes: u64| (2 * l2).div_ceil(bytes.max(1)).clamp(1, 256) as usize;
    let scale = 1.0 / (d as f32).sqrt();
    let cache_elems = shape.cache_elems(b);
    let mut rng = Rng::new(opts.seed);
    let put = |host: &[u16]| -> Result<GpuBuf> { Ok(upload_to(&gpu, host)?) };
    let mut upload = |n: usize, sets: usize| -> Result<Vec<GpuBuf>> {
        let host = rng.bits(n, opts.dtype);
        (0..sets).map(|_| put(&host)).collect()
    };
    let caches = |sets: usize, host: &[u16]| -> Result<Vec<DeviceKv>> {
        let mut out = Vec::with_capacity(sets);
        for _ in 0..sets {
            out.push(DeviceKv {
                batch: b,
                k: put(host)?,
                v: put(host)?,
            });
        }
        Ok(out)
    };
    let cache_host = Rng::new(opts.seed ^ 7).bits(cache_elems, opts.dtype);
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let no_flush = |_| Ok(());
    let bytes = |len: usize, nsplit: usize| bytes_moved(&shape, j.kind, b, len, nsplit, es);
    let (times, moved) = match j.kind {
        KernelKind::Decode | KernelKind::Merge => {
            let t = (p + 1).min(shape.n);
            let moved = bytes(t, layer.nsplit());
            let sets = sets_for(moved);
            let cs = caches(sets, &cache_host)?;
            let qs = upload(b * hq * d, sets)?;
            let lens = upload_to(&gpu, &vec![t as i32; b])?;
            let mut scratch = layer.scratch(b)?;
            let mut out = gpu.alloc_of::<u16>(b * hq * d)?;
            let times = dev.time_us(opts.warmup, opts.repeats, no_flush, |i| {
                let s = i % sets;
                layer.decode(&qs[s], &cs[s], &lens, b, &mut scratch, &mut out, scale)
            })?;
            (times, moved)
        }
        KernelKind::Append => {
            let t = (p + 1).min(shape.n);
            let moved = bytes(t, 0);
            let sets = sets_for(moved + (2 * cache_elems * es) as u64);
            let mut cs = caches(sets, &cache_host)?;
            let ks = upload(b * hkv * d, sets)?;
            let lens = upload_to(&gpu, &vec![t as i32; b])?;
            let times = dev.time_us(opts.warmup, opts.repeats, no_flush, |i| {
                let s = i % sets;
                layer.append(&ks[s], &ks[s], &lens, b, &mut cs[s])
            })?;
            (times, moved)
        }
        KernelKind::Fill => {
            let moved = bytes(p, 0);
            let sets = sets_for(moved);
            let mut cs = caches(sets, &cache_host)?;
            let ks = upload(b * p * hkv * d, sets)?;
            let lens = upload_to(&gpu, &vec![p.min(shape.n) as i32; b])?;
            let times = dev.time_us(opts.warmup, opts.repeats, no_flush, |i| {
                let s = i % sets;
                layer.fill(&ks[s], &ks[s], &lens, (b, p), &mut cs[s])
            })?;
            (times, moved)
        }
        KernelKind::Prefill(mode) => {
            let moved = bytes(p, 0);
            let sets = sets_for(moved);
            let qs = upload(b * p * hq * d, sets)?;
            let ks = upload(b * p * hkv * d, sets)?;
            let lens = upload_to(&gpu, &vec![p.min(shape.n) as i32; b])?;
            let mut o = gpu.alloc_of::<u16>(b * p * hq * d)?;
            let times = dev.time_us(opts.warmup, opts.repeats, no_flush, |i| {
                let s = i % sets;
                layer.prefill(&qs[s], &ks[s], &ks[s], &lens, (b, p), &mut o, mode, scale)
            })?;
            (times, moved)
        }
    };
    Ok((median(times), moved))
}

/// A device copy of `host`.
fn upload_to<T: Plain>(gpu: &Gpu, host: &[T]) -> moac_runtime::Result<GpuBuf> {
    let mut buf = gpu.alloc_of::<T>(host.len())?;
    gpu.upload(&mut buf, 0, host)?;
    Ok(buf)
}

/// The winner of each kernel and the default heuristic's result, for the report.
pub fn summary(outcomes: &[Outcome]) -> Vec<(String, Option<&Outcome>, Option<&Outcome>)> {
    let mut kernels: Vec<&str> = Vec::new();
    for o in outcomes {
        if !kernels.contains(&o.kernel.as_str()) {
            kernels.push(&o.kernel);
        }
    }
    kernels
        .into_iter()
        .map(|k| {
            let mine = outcomes.iter().filter(|o| o.kernel == k);
            let best = mine
                .clone()
                .filter(|o| o.correct)
                .filter_map(|o| o.median_us.map(|t| (t, o)))
                .min_by(|a, b| a.0.total_cmp(&b.0))
                .map(|(_, o)| o);
            let default = mine.clone().find(|o| o.is_default);
            (k.to_string(), best, default)
        })
        .collect()
}
