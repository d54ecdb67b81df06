//! Writing an artifact: plan -> kernel specs -> CUDA sources -> NVRTC (PTX + CUBIN per
//! arch) -> an artifact folder, written atomically.
//!
//! Artifact layout:
//! ```text
//! DIR/manifest.json        hashes, kernels, resources, launch configs, layer -> kernels
//! DIR/plan.moac.json       the validated plan in moac's own format
//! DIR/kernels/UNIT.cu      one self-contained translation unit per kernel kind and shape
//! DIR/kernels/UNIT.ptx     PTX of the lowest arch (JIT fallback for newer GPUs)
//! DIR/kernels/UNIT.sm_XX.cubin
//! DIR/bindings.rs          Rust bindings (syn/quote), embedding the binaries
//! DIR/resources.txt        registers / spills / shared memory per kernel and arch
//! ```

use super::manifest::{self, CubinEntry, Manifest, ManifestKernel, ManifestParam};
use crate::emit;
use crate::error::{Error, Result};
use crate::geometry::Dtype;
use crate::ir::{self, LowerOptions, Lowered};
use crate::jit::cache::Cache;
use crate::jit::nvrtc::{self, Resources};
use crate::jit::{self, ProgressFn, UnitTiming};
use crate::plan::{hex, ValidPlan};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What a compile produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmitKind {
    /// Sources and bindings only; needs no NVRTC.
    Cuda,
    /// Sources, PTX, CUBIN and bindings.
    All,
}

impl EmitKind {
    pub const ALL: [EmitKind; 2] = [EmitKind::All, EmitKind::Cuda];

    /// The command-line spelling: `all`, `cuda`.
    pub fn name(self) -> &'static str {
        match self {
            EmitKind::Cuda => "cuda",
            EmitKind::All => "all",
        }
    }
}

impl std::str::FromStr for EmitKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        EmitKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| Error::Usage(format!("unknown --emit {s:?} (all or cuda)")))
    }
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
            tuning: None,
            device: None,
        }
    }
}

/// What a compile did.
#[derive(Debug, Clone)]
pub struct CompileReport {
    pub out_dir: PathBuf,
    pub kernels: usize,
    pub nvrtc_compiles: usize,
    pub cache_hits: usize,
    pub timings: Vec<UnitTiming>,
    pub elapsed: Duration,
    pub nvrtc_version: Option<String>,
    /// Kernels whose launch configuration came from the tuning database.
    pub tuned_kernels: usize,
    /// Notes about tuning entries that did not apply.
    pub tuning_notes: Vec<String>,
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

fn write_file(dir: &Path, rel: &str, bytes: &[u8]) -> Result<()> {
    let p = dir.join(rel);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    std::fs::write(&p, bytes).map_err(|e| Error::io(&p, e))
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

/// Compiles `plan` into an artifact folder `out` (written to a sibling temporary folder,
/// then renamed into place: nothing is written half). `progress` hears about every
/// NVRTC job.
pub fn write(
    plan: &ValidPlan,
    opts: &CompileOptions,
    out: &Path,
    progress: Option<ProgressFn>,
) -> Result<CompileReport> {
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
        Some(nv) => {
            let c =
                jit::compile_units(nv, &units, &archs, opts.cache.as_ref(), opts.jobs, progress)?;
            (c.compiled, c.timings, c.cache_hits)
        }
        None => (units.iter().map(|_| Vec::new()).collect(), Vec::new(), 0),
    };
    let dir = staged.path();
    let mut resources = String::new();
    let _ = writeln!(
        resources,
        "# generated by moac: ptxas figures per kernel and arch (group: query heads per KV head; heads/CTA: decode's query heads per CTA)\n{:<52} {:<16} {:>5} {:>9} {:<7} {:>9} {:>11} {:>12} {:>11}",
        "kernel", "kind", "group", "heads/CTA", "arch", "registers", "spill_bytes", "shared_bytes", "stack_bytes"
    );
    // Files of every unit, and which unit holds each kernel.
    let mut unit_files: Vec<(String, String, Option<String>, Vec<String>)> = Vec::new();
    let mut unit_resources: Vec<Vec<BTreeMap<String, Resources>>> = Vec::new();
    for (u, unit) in units.iter().enumerate() {
        let src_rel = format!("kernels/{}.cu", unit.name);
        write_file(dir, &src_rel, unit.source.as_bytes())?;
        let mut ptx_rel = None;
        let mut cubins = Vec::new();
        let mut per_arch = Vec::new();
        for (a, c) in compiled[u].iter().enumerate() {
            let rel = format!("kernels/{}.{}.cubin", unit.name, archs[a]);
            write_file(dir, &rel, &c.cubin)?;
            if a == 0 {
                let rel = format!("kernels/{}.ptx", unit.name);
                write_file(dir, &rel, c.ptx.as_bytes())?;
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
                "{:<52} {:<16} {:>5} {:>9} {:<7} {:>9} {:>11} {:>12} {:>11}",
                spec.name,
                spec.kind.slug(),
                spec.group_size(),
                match spec.kind {
                    ir::KernelKind::Decode => spec.launch.heads_per_cta.to_string(),
                    _ => "-".to_string(),
                },
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
            kind: spec.kind.name().to_string(),
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
            launch_source: spec.launch_source.name().to_string(),
            tuning_identity: spec.tuning_identity(),
            params: crate::abi::params(spec.kind)
                .iter()
                .map(|&(name, param)| ManifestParam {
                    name: name.to_string(),
                    param,
                })
                .collect(),
        });
    }
    let m = plan.model();
    let s = plan.settings();
    let manifest = Manifest {
        format: manifest::FORMAT.to_string(),
        version: manifest::VERSION,
        moac_version: env!("CARGO_PKG_VERSION").to_string(),
        plan_sha256: plan.sha256(),
        plan_name: plan.name().to_string(),
        plan: "plan.moac.json".to_string(),
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
        archs: if nv.is_some() {
            archs.clone()
        } else {
            Vec::new()
        },
        kernels: manifest_kernels,
        layers: lowered.layers.clone(),
        bindings: cfg!(feature = "bindings").then(|| "bindings.rs".to_string()),
        resources: "resources.txt".to_string(),
        layout: manifest::LAYOUT.to_string(),
    };
    let mut plan_json = serde_json::to_string_pretty(&plan.to_moac_file())
        .map_err(|e| Error::Internal(e.to_string()))?;
    plan_json.push('\n');
    write_file(dir, "plan.moac.json", plan_json.as_bytes())?;
    write_file(dir, "resources.txt", resources.as_bytes())?;
    #[cfg(feature = "bindings")]
    {
        let bindings = super::bindings::generate(plan, &lowered, &manifest, opts.cache.as_ref())?;
        write_file(dir, "bindings.rs", bindings.as_bytes())?;
    }
    write_file(dir, manifest::FILE, manifest.to_json()?.as_bytes())?;
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
