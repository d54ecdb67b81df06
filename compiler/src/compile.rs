//! `moac compile`: plan -> kernel specs -> CUDA sources -> NVRTC (PTX + CUBIN per arch)
//! -> an artifact folder, written atomically.
//!
//! Artifact layout:
//! ```text
//! DIR/manifest.json        hashes, kernels, resources, launch configs, layer -> kernels
//! DIR/plan.moac.json       the validated plan in moac's own format
//! DIR/kernels/NAME.cu      one self-contained source per kernel
//! DIR/kernels/NAME.ptx     PTX of the lowest arch (JIT fallback for newer GPUs)
//! DIR/kernels/NAME.sm_XX.cubin
//! DIR/bindings.rs          Rust bindings (syn/quote), embedding the binaries
//! DIR/resources.txt        registers / spills / shared memory per kernel and arch
//! ```

use crate::cache::{self, Cache};
use crate::emit;
use crate::emit::SourceUnit;
use crate::error::{Error, Result};
use crate::geometry::Dtype;
use crate::ir::{self, LowerOptions, Lowered};
use crate::nvrtc::{self, Compiled, Resources};
use crate::plan::{hex, ValidPlan};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What a compile produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EmitKind {
    /// Sources and bindings only; needs no NVRTC.
    Cuda,
    /// Sources, PTX, CUBIN and bindings.
    All,
}

/// Options of one compile.
#[derive(Debug, Clone)]
pub struct CompileOptions {
    pub dtype: Dtype,
    pub archs: Vec<String>,
    /// Specialize to one (prompt_len, max_new_tokens).
    pub fixed: Option<(u64, u64)>,
    pub layers: Option<Vec<usize>>,
    pub emit: EmitKind,
    /// `None`: no caching.
    pub cache: Option<Cache>,
    /// Parallel NVRTC compiles (0: one per core).
    pub jobs: usize,
    /// Show a progress bar (only drawn on a terminal).
    pub progress: bool,
    /// Take launch configurations from a tuning database where it has a winner.
    pub tuning: Option<TuningChoice>,
    /// The GPU the default heuristic sizes launches for; `None`: the figures of the
    /// arch when exactly one is compiled ([`ir::DeviceProps::for_arch`]), else
    /// arch-independent defaults.
    pub device: Option<ir::DeviceProps>,
}

/// A tuning database and what to look up in it.
#[derive(Debug, Clone)]
pub struct TuningChoice {
    pub path: PathBuf,
    pub db: crate::tuning::TuningDb,
    /// Accept only entries measured with this many SMs (any when `None`).
    pub sm_count: Option<u32>,
    /// The N and batch size the entries must have been tuned for (their buckets).
    pub n: u64,
    pub batch: u64,
}

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions {
            dtype: Dtype::F16,
            archs: vec!["sm_80".into(), "sm_90".into()],
            fixed: None,
            layers: None,
            emit: EmitKind::All,
            cache: Some(Cache::new(Cache::default_root())),
            jobs: 0,
            progress: false,
            tuning: None,
            device: None,
        }
    }
}

/// Timing of one (kernel, arch) compile.
#[derive(Debug, Clone, Serialize)]
pub struct KernelTiming {
    pub kernel: String,
    pub arch: String,
    pub seconds: f64,
    pub cached: bool,
}

/// What a compile did.
#[derive(Debug, Clone)]
pub struct CompileReport {
    pub out_dir: PathBuf,
    pub kernels: usize,
    pub nvrtc_compiles: usize,
    pub cache_hits: usize,
    pub timings: Vec<KernelTiming>,
    pub elapsed: Duration,
    pub nvrtc_version: Option<String>,
    /// Kernels whose launch configuration came from the tuning database.
    pub tuned_kernels: usize,
    /// Notes about tuning entries that did not apply.
    pub tuning_notes: Vec<String>,
}

#[derive(Serialize)]
pub(crate) struct CubinEntry {
    pub path: String,
    pub registers: u32,
    pub spill_bytes: u32,
    pub shared_bytes: u32,
    pub stack_bytes: u32,
}

#[derive(Serialize)]
pub(crate) struct ManifestParam {
    name: &'static str,
    #[serde(flatten)]
    param: ir::Param,
}

#[derive(Serialize)]
pub(crate) struct ManifestKernel {
    pub name: String,
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefill_mode: Option<ir::PrefillMode>,
    pub layers: Vec<usize>,
    /// The translation unit (source file) that defines this kernel; kernels of one kind
    /// share a unit so that their common body is compiled once.
    pub unit: String,
    /// The unit's entry point (the function to launch) and this kernel's `slot`, its
    /// first argument.
    pub entry: String,
    pub slot: usize,
    pub source: String,
    pub source_sha256: String,
    pub ptx: Option<String>,
    pub cubin: BTreeMap<String, CubinEntry>,
    pub launch: ir::LaunchConfig,
    pub launch_source: &'static str,
    /// The key of this kernel in a tuning database (what it computes, minus launch).
    pub tuning_identity: String,
    pub params: Vec<ManifestParam>,
}

#[derive(Serialize)]
pub(crate) struct Manifest {
    pub format: &'static str,
    pub moac_version: &'static str,
    pub plan_sha256: String,
    pub plan_name: String,
    pub plan: &'static str,
    pub nvrtc_version: Option<String>,
    pub dtype: Dtype,
    pub head_dim: usize,
    pub num_layers: usize,
    pub num_query_heads: usize,
    pub num_kv_heads: usize,
    pub sink: u64,
    pub min_capacity: u64,
    pub granularity: u64,
    pub fixed_n: Option<u64>,
    pub prompt_len: Option<u64>,
    pub max_new_tokens: Option<u64>,
    pub archs: Vec<String>,
    pub kernels: Vec<ManifestKernel>,
    pub layers: Vec<ir::LayerKernels>,
    pub bindings: &'static str,
    pub resources: &'static str,
    pub layout: &'static str,
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Checks and normalises the arch list (sorted by compute capability, no repeats).
pub fn check_archs(archs: &[String], dtype: Dtype) -> Result<Vec<String>> {
    if archs.is_empty() {
        return Err(Error::Usage(
            "--arch needs at least one architecture".into(),
        ));
    }
    let mut out: Vec<String> = Vec::new();
    for a in archs {
        let a = nvrtc::check_arch(a.trim())?;
        if dtype == Dtype::Bf16 && a == "sm_75" {
            return Err(Error::Unsupported(
                "bf16 kernels need sm_80 or newer (sm_75 has no bf16)".into(),
            ));
        }
        if !out.iter().any(|x| x == a) {
            out.push(a.to_string());
        }
    }
    out.sort_by_key(|a| a.trim_start_matches("sm_").parse::<u32>().unwrap_or(0));
    Ok(out)
}

/// A sibling temporary folder for building `out` in, removed on drop unless kept.
fn staging_dir(out: &Path) -> Result<tempfile::TempDir> {
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    }
    if out.exists() && !out.is_dir() {
        return Err(Error::Usage(format!(
            "{} exists and is not a folder",
            out.display()
        )));
    }
    tempfile::Builder::new()
        .prefix(".moac-artifact-")
        .tempdir_in(&parent)
        .map_err(|e| Error::io(&parent, e))
}

/// Moves the finished `staged` folder to `out`, replacing an old artifact whole.
fn publish(staged: tempfile::TempDir, out: &Path) -> Result<()> {
    let staged = staged.keep();
    if out.exists() {
        let parent = out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let old = tempfile::Builder::new()
            .prefix(".moac-old-")
            .tempdir_in(parent)
            .map_err(|e| Error::io(parent, e))?
            .keep();
        // Rename the old artifact aside (into an empty temp dir's place), then the new in.
        std::fs::remove_dir(&old).map_err(|e| Error::io(&old, e))?;
        std::fs::rename(out, &old).map_err(|e| Error::io(out, e))?;
        if let Err(e) = std::fs::rename(&staged, out) {
            let _ = std::fs::rename(&old, out);
            let _ = std::fs::remove_dir_all(&staged);
            return Err(Error::io(out, e));
        }
        let _ = std::fs::remove_dir_all(&old);
    } else if let Err(e) = std::fs::rename(&staged, out) {
        let _ = std::fs::remove_dir_all(&staged);
        return Err(Error::io(out, e));
    }
    Ok(())
}

fn write(dir: &Path, rel: &str, bytes: &[u8]) -> Result<()> {
    let p = dir.join(rel);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    std::fs::write(&p, bytes).map_err(|e| Error::io(&p, e))
}

/// Runs NVRTC over every (translation unit, arch) pair, in parallel, through the cache.
fn run_nvrtc(
    nv: &nvrtc::Nvrtc,
    units: &[SourceUnit],
    archs: &[String],
    opts: &CompileOptions,
) -> Result<(Vec<Vec<Compiled>>, Vec<KernelTiming>, usize)> {
    // Biggest units first, so the long compiles start early.
    let mut order: Vec<usize> = (0..units.len()).collect();
    order.sort_by_key(|&u| std::cmp::Reverse(units[u].kernels.len()));
    let jobs: Vec<(usize, usize)> = order
        .iter()
        .flat_map(|&k| (0..archs.len()).map(move |a| (k, a)))
        .collect();
    let workers = match opts.jobs {
        0 => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        j => j,
    }
    .min(jobs.len().max(1));
    let bar = if opts.progress && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        let b = indicatif::ProgressBar::new(jobs.len() as u64);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{spinner} NVRTC [{bar:30}] {pos}/{len} {msg} ({eta})",
        ) {
            b.set_style(style.progress_chars("=> "));
        }
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let next = AtomicUsize::new(0);
    type Slot = Option<Result<(Compiled, KernelTiming)>>;
    let results: Mutex<Vec<Slot>> = Mutex::new((0..jobs.len()).map(|_| None).collect());
    let hits = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(k, a)) = jobs.get(i) else { break };
                let (unit, arch) = (&units[k], &archs[a]);
                let options = nvrtc::options(arch, &nv.include_dir);
                let key = cache::key(&unit.source, &options, &nv.version, arch);
                let start = Instant::now();
                let cached = opts.cache.as_ref().and_then(|c| c.get(&key));
                let hit = cached.is_some();
                let res = match cached {
                    Some(c) => Ok(c),
                    None => {
                        nvrtc::compile(nv, &unit.name, &unit.source, arch, &options).inspect(|c| {
                            if let Some(cache) = &opts.cache {
                                if let Err(e) = cache.put(&key, c) {
                                    bar.suspend(|| {
                                        eprintln!("warning: compile cache not written: {e}")
                                    });
                                }
                            }
                        })
                    }
                };
                if hit {
                    hits.fetch_add(1, Ordering::Relaxed);
                }
                let timing = KernelTiming {
                    kernel: unit.name.clone(),
                    arch: arch.clone(),
                    seconds: start.elapsed().as_secs_f64(),
                    cached: hit,
                };
                bar.set_message(unit.name.clone());
                bar.inc(1);
                if let Ok(mut r) = results.lock() {
                    r[i] = Some(res.map(|c| (c, timing)));
                }
            });
        }
    });
    bar.finish_and_clear();
    let results = results
        .into_inner()
        .map_err(|_| Error::Internal("a compile worker panicked".into()))?;
    let mut per_unit: Vec<Vec<Option<Compiled>>> =
        (0..units.len()).map(|_| vec![None; archs.len()]).collect();
    let mut timings = Vec::new();
    for (i, r) in results.into_iter().enumerate() {
        let (c, t) = r.ok_or_else(|| Error::Internal(format!("compile job {i} did not run")))??;
        let (u, a) = jobs[i];
        per_unit[u][a] = Some(c);
        timings.push(t);
    }
    let per_unit = per_unit
        .into_iter()
        .map(|v| v.into_iter().collect::<Option<Vec<_>>>())
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| Error::Internal("a compile job is missing".into()))?;
    Ok((per_unit, timings, hits.into_inner()))
}

/// An entry's figures from a unit's per-function figures: the entry plus any functions
/// it calls (compiled separately and linked): the most registers of any of them, and
/// spills and stack added up.
fn entry_resources(per_function: &BTreeMap<String, Resources>, entry: &str) -> Option<Resources> {
    let mut r = *per_function.get(entry)?;
    for (name, f) in per_function {
        if name != entry {
            r.registers = r.registers.max(f.registers);
            r.spill_bytes += f.spill_bytes;
            r.stack_bytes += f.stack_bytes;
            r.shared_bytes = r.shared_bytes.max(f.shared_bytes);
        }
    }
    Some(r)
}

/// Compiles `plan` into an artifact folder `out`.
pub fn compile(plan: &ValidPlan, opts: &CompileOptions, out: &Path) -> Result<CompileReport> {
    let start = Instant::now();
    let archs = check_archs(&opts.archs, opts.dtype)?;
    let device = opts.device.or_else(|| match archs.as_slice() {
        [one] => ir::DeviceProps::for_arch(one),
        _ => None,
    });
    let mut lower_opts = LowerOptions {
        dtype: opts.dtype,
        fixed: opts.fixed,
        layers: opts.layers.clone(),
        device,
        ..LowerOptions::default()
    };
    let mut tuning_notes = Vec::new();
    if let Some(t) = &opts.tuning {
        // NVRTC's version is part of the key: a tuned compile needs NVRTC.
        let nv = nvrtc::load()?;
        let first = ir::lower(plan, &lower_opts)?;
        for spec in &first.kernels {
            let id = spec.tuning_identity();
            for arch in &archs {
                let want = crate::tuning::EnvMatch {
                    arch: arch.clone(),
                    nvrtc_version: nv.version.clone(),
                    sm_count: t.sm_count,
                    driver_version: None,
                };
                let (best, notes) = t.db.select(&id, &want, opts.dtype, t.n, t.batch);
                for n in notes {
                    if !tuning_notes.contains(&n) {
                        tuning_notes.push(n);
                    }
                }
                if let Some(b) = best {
                    // The first arch listed with a winner decides (one source per kernel).
                    lower_opts.tuned.entry(id.clone()).or_insert(b);
                }
            }
        }
    }
    let lowered: Lowered = ir::lower(plan, &lower_opts)?;
    let tuned_kernels = lowered
        .kernels
        .iter()
        .filter(|k| k.launch_source == ir::LaunchSource::Database)
        .count();
    let units = emit::emit_units(&lowered)?;
    // Find NVRTC before touching the output: a missing NVRTC writes nothing.
    let nv = match opts.emit {
        EmitKind::All => Some(nvrtc::load()?),
        EmitKind::Cuda => None,
    };
    let staged = staging_dir(out)?;
    let (compiled, timings, hits) = match nv {
        Some(nv) => run_nvrtc(nv, &units, &archs, opts)?,
        None => (units.iter().map(|_| Vec::new()).collect(), Vec::new(), 0),
    };
    let dir = staged.path();
    let mut resources = String::new();
    let _ = writeln!(
        resources,
        "# generated by moac: ptxas figures per kernel and arch\n{:<40} {:<16} {:<7} {:>9} {:>11} {:>12} {:>11}",
        "kernel", "kind", "arch", "registers", "spill_bytes", "shared_bytes", "stack_bytes"
    );
    // Files of every unit, and which unit holds each kernel.
    let mut unit_files: Vec<(String, String, Option<String>, Vec<String>)> = Vec::new();
    let mut unit_resources: Vec<Vec<BTreeMap<String, Resources>>> = Vec::new();
    for (u, unit) in units.iter().enumerate() {
        let src_rel = format!("kernels/{}.cu", unit.name);
        write(dir, &src_rel, unit.source.as_bytes())?;
        let mut ptx_rel = None;
        let mut cubins = Vec::new();
        let mut per_arch = Vec::new();
        for (a, c) in compiled[u].iter().enumerate() {
            let rel = format!("kernels/{}.{}.cubin", unit.name, archs[a]);
            write(dir, &rel, &c.cubin)?;
            if a == 0 {
                let rel = format!("kernels/{}.ptx", unit.name);
                write(dir, &rel, c.ptx.as_bytes())?;
                ptx_rel = Some(rel);
            }
            cubins.push(rel);
            per_arch.push(nvrtc::parse_entry_resources(&c.log));
        }
        unit_files.push((src_rel, sha256_hex(unit.source.as_bytes()), ptx_rel, cubins));
        unit_resources.push(per_arch);
    }
    let mut manifest_kernels = Vec::new();
    for spec in &lowered.kernels {
        let u = units
            .iter()
            .position(|unit| unit.kernels.contains(&spec.name))
            .ok_or_else(|| Error::Internal(format!("no unit holds {}", spec.name)))?;
        let (src_rel, src_sha, ptx_rel, cubin_rels) = &unit_files[u];
        let mut cubins = BTreeMap::new();
        for (a, rel) in cubin_rels.iter().enumerate() {
            let arch = &archs[a];
            let r = entry_resources(&unit_resources[u][a], &units[u].name).ok_or_else(|| {
                Error::Internal(format!(
                    "the ptxas log of {} has no figures for its entry",
                    units[u].name
                ))
            })?;
            let _ = writeln!(
                resources,
                "{:<40} {:<16} {:<7} {:>9} {:>11} {:>12} {:>11}",
                spec.name,
                spec.kind.slug(),
                arch,
                r.registers,
                r.spill_bytes,
                r.shared_bytes,
                r.stack_bytes
            );
            cubins.insert(
                arch.clone(),
                CubinEntry {
                    path: rel.clone(),
                    registers: r.registers,
                    spill_bytes: r.spill_bytes,
                    shared_bytes: r.shared_bytes,
                    stack_bytes: r.stack_bytes,
                },
            );
        }
        manifest_kernels.push(ManifestKernel {
            name: spec.name.clone(),
            kind: spec.kind.name(),
            prefill_mode: match spec.kind {
                ir::KernelKind::Prefill(m) => Some(m),
                _ => None,
            },
            layers: spec.layers.clone(),
            unit: units[u].name.clone(),
            entry: units[u].name.clone(),
            slot: units[u].slot(&spec.name).unwrap_or(0),
            source: src_rel.clone(),
            source_sha256: src_sha.clone(),
            ptx: ptx_rel.clone(),
            cubin: cubins,
            launch: spec.launch,
            launch_source: spec.launch_source.name(),
            tuning_identity: spec.tuning_identity(),
            params: ir::params(spec.kind)
                .iter()
                .map(|&(name, param)| ManifestParam { name, param })
                .collect(),
        });
    }
    let m = plan.model();
    let s = plan.settings();
    let manifest = Manifest {
        format: "moac-artifact",
        moac_version: env!("CARGO_PKG_VERSION"),
        plan_sha256: plan.sha256(),
        plan_name: plan.name().to_string(),
        plan: "plan.moac.json",
        nvrtc_version: nv.map(|n| n.version.clone()),
        dtype: opts.dtype,
        head_dim: m.head_dim,
        num_layers: m.num_layers,
        num_query_heads: m.num_query_heads,
        num_kv_heads: m.num_kv_heads,
        sink: s.sink,
        min_capacity: s.min_capacity,
        granularity: s.granularity,
        fixed_n: lowered.geometry.as_ref().map(|g| g.n),
        prompt_len: opts.fixed.map(|f| f.0),
        max_new_tokens: opts.fixed.map(|f| f.1),
        archs: if nv.is_some() { archs.clone() } else { Vec::new() },
        kernels: manifest_kernels,
        layers: lowered.layers.clone(),
        bindings: "bindings.rs",
        resources: "resources.txt",
        layout: "batch-major: element (b, kv head j, slot s, d) of a layer's K or V at ((b * total_slots + kv_offset[j] + s) * head_dim + d); see docs/kernel-abi.md",
    };
    let mut plan_json = serde_json::to_string_pretty(&plan.to_moac_file())
        .map_err(|e| Error::Internal(e.to_string()))?;
    plan_json.push('\n');
    write(dir, "plan.moac.json", plan_json.as_bytes())?;
    write(dir, "resources.txt", resources.as_bytes())?;
    let bindings = crate::bindings::generate(plan, &lowered, &manifest, opts.cache.as_ref())?;
    write(dir, "bindings.rs", bindings.as_bytes())?;
    let mut manifest_json =
        serde_json::to_string_pretty(&manifest).map_err(|e| Error::Internal(e.to_string()))?;
    manifest_json.push('\n');
    write(dir, "manifest.json", manifest_json.as_bytes())?;
    publish(staged, out)?;
    Ok(CompileReport {
        out_dir: out.to_path_buf(),
        kernels: lowered.kernels.len(),
        nvrtc_compiles: timings.len() - hits,
        cache_hits: hits,
        timings,
        elapsed: start.elapsed(),
        nvrtc_version: nv.map(|n| n.version.clone()),
        tuned_kernels,
        tuning_notes,
    })
}
