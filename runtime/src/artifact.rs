//! Loading a moac artifact (or building the same thing in memory from a plan).
//!
//! An artifact folder is what `moac compile` writes. Loading reads its manifest through
//! the compiler's one definition of it ([`moac::artifact::Manifest`], which refuses
//! another format or version), re-lowers the plan it carries (`plan.moac.json`) with the
//! manifest's settings and checks that every kernel name matches the manifest and every
//! source its SHA-256: the runtime and the artifact provably describe the same kernels.

use crate::error::{Error, Result};
use moac::artifact::Manifest;
use moac::emit::SourceUnit;
use moac::geometry::Dtype;
use moac::ir::{LowerOptions, Lowered};
use moac::plan::ValidPlan;
use std::path::{Path, PathBuf};

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
    dir: Option<PathBuf>,
    plan: ValidPlan,
    dtype: Dtype,
    fixed: Option<(u64, u64)>,
    lowered: Lowered,
    units: Vec<SourceUnit>,
    binaries: Vec<UnitBinaries>,
}

fn art_err(dir: &Path, message: impl Into<String>) -> Error {
    Error::Artifact {
        path: dir.to_path_buf(),
        message: message.into(),
    }
}

impl Artifact {
    /// Lowers and emits a plan in memory (no NVRTC): enough for the cpu and emu backends
    /// (and for cuda, which then compiles the sources with NVRTC).
    pub fn from_plan(
        plan: &ValidPlan,
        dtype: Dtype,
        layers: Option<Vec<usize>>,
    ) -> Result<Artifact> {
        Artifact::from_lowering(
            plan,
            &LowerOptions {
                dtype,
                layers,
                ..LowerOptions::default()
            },
        )
    }

    /// Lowers and emits a plan in memory with any lowering options (launch overrides,
    /// planted bugs for tests, a build specialized to one N).
    pub fn from_lowering(plan: &ValidPlan, opts: &LowerOptions) -> Result<Artifact> {
        let lowered = moac::ir::lower(plan, opts)?;
        let units = moac::emit::emit_units(&lowered)?;
        Ok(Artifact {
            dir: None,
            plan: plan.clone(),
            dtype: opts.dtype,
            fixed: opts.fixed,
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
        let manifest = Manifest::read(dir)?;
        let plan = moac::plan::load(&dir.join(&manifest.plan), None)?;
        let fixed = manifest.fixed();
        let layers: Vec<usize> = manifest.layers.iter().map(|l| l.layer).collect();
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
        if lowered.kernels.len() != manifest.kernels.len() || lowered.layers != manifest.layers {
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

    /// The folder it was loaded from (`None` for one built in memory).
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    pub fn plan(&self) -> &ValidPlan {
        &self.plan
    }

    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// (prompt_len, max_new_tokens) of a build specialized to one N.
    pub fn fixed(&self) -> Option<(u64, u64)> {
        self.fixed
    }

    /// The kernels and which of them each compiled layer uses.
    pub fn lowered(&self) -> &Lowered {
        &self.lowered
    }

    /// The translation units (sources) of the kernels.
    pub fn units(&self) -> &[SourceUnit] {
        &self.units
    }

    /// Per unit, the binaries the artifact carries (empty when built in memory).
    pub fn binaries(&self) -> &[UnitBinaries] {
        &self.binaries
    }

    /// The layers this artifact has kernels for.
    pub fn layers(&self) -> Vec<usize> {
        self.lowered.layers.iter().map(|l| l.layer).collect()
    }

    /// This artifact restricted to `layers` (each must be among its own).
    pub fn with_layers(&self, layers: &[usize]) -> Result<Artifact> {
        let have = self.layers();
        if let Some(l) = layers.iter().find(|l| !have.contains(l)) {
            return Err(Error::Usage(format!(
                "layer {l} is not in the artifact (compiled layers: {have:?})"
            )));
        }
        let mut a = self.clone();
        a.lowered.layers.retain(|l| layers.contains(&l.layer));
        Ok(a)
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
