//! Loading a moac artifact (or building the same thing in memory from a plan).
//!
//! An artifact folder is what `moac compile` writes. Loading re-lowers the plan it
//! carries (`plan.moac.json`) with the manifest's settings and checks that every kernel
//! name matches the manifest and every source its SHA-256: the runtime and the artifact
//! provably describe the same kernels.

use crate::error::{Error, Result};
use moac::emit::SourceUnit;
use moac::geometry::Dtype;
use moac::ir::{LowerOptions, Lowered};
use moac::plan::ValidPlan;
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Deserialize)]
struct ManifestCubin {
    path: String,
}

#[derive(Deserialize)]
struct ManifestKernel {
    name: String,
    unit: String,
    entry: String,
    slot: usize,
    launch: moac::ir::LaunchConfig,
    tuning_identity: String,
    source: String,
    source_sha256: String,
    #[serde(default)]
    ptx: Option<String>,
    #[serde(default)]
    cubin: std::collections::BTreeMap<String, ManifestCubin>,
}

#[derive(Deserialize)]
struct Manifest {
    dtype: Dtype,
    #[serde(default)]
    prompt_len: Option<u64>,
    #[serde(default)]
    max_new_tokens: Option<u64>,
    plan: String,
    kernels: Vec<ManifestKernel>,
    layers: Vec<serde_json::Value>,
}

/// Binaries of one translation unit, for the cuda backend.
#[derive(Debug, Clone, Default)]
pub struct UnitBinaries {
    /// (arch, CUBIN)
    pub cubins: Vec<(String, Vec<u8>)>,
    pub ptx: Option<String>,
}

/// Everything the backends need: the plan, its kernels and their sources (and, for a
/// loaded artifact, the binaries).
#[derive(Debug, Clone)]
pub struct Artifact {
    pub dir: Option<PathBuf>,
    pub plan: ValidPlan,
    pub dtype: Dtype,
    /// (prompt_len, max_new_tokens) of a specialized build.
    pub fixed: Option<(u64, u64)>,
    pub lowered: Lowered,
    pub units: Vec<SourceUnit>,
    pub binaries: Vec<UnitBinaries>,
}

fn art_err(dir: &Path, message: impl Into<String>) -> Error {
    Error::Artifact {
        path: dir.to_path_buf(),
        message: message.into(),
    }
}

impl Artifact {
    /// Lowers and emits a plan in memory (no NVRTC): enough for the cpu and emu backends.
    pub fn from_plan(
        plan: &ValidPlan,
        dtype: Dtype,
        layers: Option<Vec<usize>>,
    ) -> Result<Artifact> {
        let lowered = moac::ir::lower(
            plan,
            &LowerOptions {
                dtype,
                layers,
                ..LowerOptions::default()
            },
        )?;
        let units = moac::emit::emit_units(&lowered)?;
        Ok(Artifact {
            dir: None,
            plan: plan.clone(),
            dtype,
            fixed: None,
            binaries: vec![UnitBinaries::default(); units.len()],
            lowered,
            units,
        })
    }

    /// Loads an artifact folder written by `moac compile`.
    pub fn load(dir: &Path) -> Result<Artifact> {
        let read = |rel: &str| {
            std::fs::read(dir.join(rel)).map_err(|e| art_err(dir, format!("{rel}: {e}")))
        };
        let manifest: Manifest = serde_json::from_slice(&read("manifest.json")?)
            .map_err(|e| art_err(dir, format!("manifest.json: {e}")))?;
        let plan = moac::plan::load(&dir.join(&manifest.plan), None)?;
        let fixed = match (manifest.prompt_len, manifest.max_new_tokens) {
            (Some(p), Some(m)) => Some((p, m)),
            _ => None,
        };
        let layers: Vec<usize> = manifest
            .layers
            .iter()
            .filter_map(|l| l.get("layer").and_then(|v| v.as_u64()).map(|v| v as usize))
            .collect();
        // Each kernel's launch configuration as recorded (tuned or heuristic), so the
        // re-lowered kernels get the names the manifest has.
        let tuned = manifest
            .kernels
            .iter()
            .map(|k| (k.tuning_identity.clone(), k.launch))
            .collect();
        let lowered = moac::ir::lower(
            &plan,
            &LowerOptions {
                dtype: manifest.dtype,
                fixed,
                layers: Some(layers),
                tuned,
                ..LowerOptions::default()
            },
        )?;
        if lowered.kernels.len() != manifest.kernels.len() {
            return Err(art_err(
                dir,
                "the manifest's kernels do not match its plan (was it edited?)",
            ));
        }
        let mut units: Vec<SourceUnit> = Vec::new();
        let mut binaries: Vec<UnitBinaries> = Vec::new();
        for spec in &lowered.kernels {
            let mk = manifest
                .kernels
                .iter()
                .find(|k| k.name == spec.name)
                .ok_or_else(|| {
                    art_err(
                        dir,
                        format!(
                            "kernel {} of the plan is missing from the manifest",
                            spec.name
                        ),
                    )
                })?;
            if mk.entry != mk.unit {
                return Err(art_err(
                    dir,
                    format!("kernel {}: entry {} is not its unit's", mk.name, mk.entry),
                ));
            }
            if let Some(u) = units.iter_mut().find(|u| u.name == mk.unit) {
                put_slot(&mut u.kernels, mk.slot, &spec.name);
                continue;
            }
            let bytes = read(&mk.source)?;
            let sha = moac::plan::hex(&<sha2::Sha256 as sha2::Digest>::digest(&bytes));
            if sha != mk.source_sha256 {
                return Err(art_err(
                    dir,
                    format!("{}: SHA-256 does not match the manifest", mk.source),
                ));
            }
            let source = String::from_utf8(bytes)
                .map_err(|_| art_err(dir, format!("{} is not UTF-8", mk.source)))?;
            let mut bins = UnitBinaries::default();
            for (arch, c) in &mk.cubin {
                bins.cubins.push((arch.clone(), read(&c.path)?));
            }
            if let Some(p) = &mk.ptx {
                bins.ptx = Some(String::from_utf8_lossy(&read(p)?).into_owned());
            }
            let mut kernels = Vec::new();
            put_slot(&mut kernels, mk.slot, &spec.name);
            units.push(SourceUnit {
                name: mk.unit.clone(),
                source,
                kernels,
            });
            binaries.push(bins);
        }
        // Every slot of every unit names a kernel, and each kernel's slot is its own.
        for u in &units {
            if let Some(i) = u.kernels.iter().position(|k| k.is_empty()) {
                return Err(art_err(
                    dir,
                    format!("unit {}: no kernel for slot {i} in the manifest", u.name),
                ));
            }
            if u.kernels.len() > 1 && !u.kernels.windows(2).all(|w| w[0] < w[1]) {
                return Err(art_err(
                    dir,
                    format!("unit {}: kernel slots are not in name order", u.name),
                ));
            }
        }
        Ok(Artifact {
            dir: Some(dir.to_path_buf()),
            plan,
            dtype: manifest.dtype,
            fixed,
            lowered,
            units,
            binaries,
        })
    }
}

/// Puts `name` at `slot` of a unit's kernel list (empty names fill gaps until their own
/// kernel is seen).
fn put_slot(kernels: &mut Vec<String>, slot: usize, name: &str) {
    if kernels.len() <= slot {
        kernels.resize(slot + 1, String::new());
    }
    kernels[slot] = name.to_string();
}
