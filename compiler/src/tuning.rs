//! The tuning database: every candidate launch configuration measured for a kernel on a
//! GPU, keyed so that a result is only reused where it applies.
//!
//! Key: the kernel's tuning identity (everything it computes except its launch
//! configuration), the arch, the SM count, the driver and NVRTC versions, the dtype, and
//! power-of-two buckets of N and of the batch size. Entries store every candidate (timing,
//! correctness, note), not only the winner. Saving merges with what is already in the file
//! and writes atomically; entries from another GPU or toolkit are ignored, with a note.

use crate::error::{Error, Result};
use crate::geometry::Dtype;
use crate::ir::LaunchConfig;
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const TUNING_FORMAT: &str = "moac-tuning";
pub const TUNING_VERSION: u32 = 1;

/// The machine and toolkit a measurement was made with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Environment {
    pub arch: String,
    pub sm_count: u32,
    pub driver_version: String,
    pub nvrtc_version: String,
}

/// Where a tuning result applies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TuningKey {
    pub kernel: String,
    pub env: Environment,
    pub dtype: Dtype,
    pub n_bucket: u64,
    pub batch_bucket: u64,
}

/// One measured candidate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LaunchCandidate {
    pub launch: LaunchConfig,
    /// Passed the check against the cpu reference.
    pub correct: bool,
    /// Median time in microseconds (None where not timed, e.g. on emu).
    pub median_us: Option<f64>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
}

/// All candidates of one key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub key: TuningKey,
    pub candidates: Vec<LaunchCandidate>,
    /// When it was measured (seconds since the Unix epoch).
    pub measured_at: u64,
}

impl Entry {
    /// The fastest correct, timed candidate.
    pub fn best(&self) -> Option<&LaunchCandidate> {
        self.candidates
            .iter()
            .filter(|c| c.correct)
            .filter_map(|c| c.median_us.map(|t| (t, c)))
            .min_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, c)| c)
    }
}

/// The database file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TuningDb {
    pub format: String,
    pub version: u32,
    pub entries: Vec<Entry>,
}

impl Default for TuningDb {
    fn default() -> Self {
        TuningDb {
            format: TUNING_FORMAT.into(),
            version: TUNING_VERSION,
            entries: Vec::new(),
        }
    }
}

/// The bucket of a size: the next power of two (1 for 0).
pub fn bucket(x: u64) -> u64 {
    x.max(1).next_power_of_two()
}

impl TuningDb {
    /// Reads a database; a missing file is an empty database.
    pub fn load(path: &Path) -> Result<TuningDb> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(TuningDb::default()),
            Err(e) => return Err(Error::io(path, e)),
        };
        let db: TuningDb = serde_json::from_str(&text).map_err(|e| Error::json(path, &e))?;
        if db.format != TUNING_FORMAT || db.version != TUNING_VERSION {
            return Err(Error::Usage(format!(
                "{}: not a moac tuning database of version {TUNING_VERSION} (format {:?}, version {})",
                path.display(),
                db.format,
                db.version
            )));
        }
        Ok(db)
    }

    /// Adds entries; an entry for a key already present replaces it when newer.
    pub fn merge(&mut self, other: TuningDb) {
        for e in other.entries {
            match self.entries.iter_mut().find(|x| x.key == e.key) {
                Some(x) if x.measured_at <= e.measured_at => *x = e,
                Some(_) => {}
                None => self.entries.push(e),
            }
        }
        self.entries.sort_by(|a, b| {
            (
                &a.key.kernel,
                &a.key.env.arch,
                a.key.n_bucket,
                a.key.batch_bucket,
            )
                .cmp(&(
                    &b.key.kernel,
                    &b.key.env.arch,
                    b.key.n_bucket,
                    b.key.batch_bucket,
                ))
        });
    }

    /// Merges into whatever the file holds now and writes the result atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut on_disk = TuningDb::load(path)?;
        on_disk.merge(self.clone());
        let mut text =
            serde_json::to_string_pretty(&on_disk).map_err(|e| Error::Internal(e.to_string()))?;
        text.push('\n');
        crate::fsutil::write_atomic(path, text.as_bytes())
    }

    /// The best configuration for a kernel in exactly this environment, and notes about
    /// entries for the same kernel that were ignored because they come from another GPU
    /// or toolkit.
    pub fn lookup(
        &self,
        kernel: &str,
        env: &Environment,
        dtype: Dtype,
        n: u64,
        batch: u64,
    ) -> (Option<LaunchConfig>, Vec<String>) {
        let want = EnvMatch {
            arch: env.arch.clone(),
            nvrtc_version: env.nvrtc_version.clone(),
            sm_count: Some(env.sm_count),
            driver_version: Some(env.driver_version.clone()),
        };
        self.select(kernel, &want, dtype, n, batch)
    }

    /// The best configuration for a kernel among entries whose environment matches `want`
    /// (the newest entry if several do), in the buckets of `n` and `batch`; notes name the
    /// entries ignored because they come from another GPU or toolkit.
    pub fn select(
        &self,
        kernel: &str,
        want: &EnvMatch,
        dtype: Dtype,
        n: u64,
        batch: u64,
    ) -> (Option<LaunchConfig>, Vec<String>) {
        let mut notes = Vec::new();
        let mut best: Option<(u64, LaunchConfig)> = None;
        for e in self
            .entries
            .iter()
            .filter(|e| e.key.kernel == kernel && e.key.dtype == dtype)
        {
            if !want.matches(&e.key.env) {
                let note = format!(
                    "ignored a tuning entry for {kernel} measured on {} ({} SMs, driver {}, NVRTC {})",
                    e.key.env.arch, e.key.env.sm_count, e.key.env.driver_version, e.key.env.nvrtc_version
                );
                if !notes.contains(&note) {
                    notes.push(note);
                }
                continue;
            }
            if e.key.n_bucket != bucket(n) || e.key.batch_bucket != bucket(batch) {
                continue;
            }
            if let Some(c) = e.best() {
                if best.map(|(at, _)| e.measured_at >= at).unwrap_or(true) {
                    best = Some((e.measured_at, c.launch));
                }
            }
        }
        (best.map(|(_, l)| l), notes)
    }
}

/// Which environments a lookup accepts: the arch and NVRTC version always must match;
/// the SM count and driver version only where given (a compile on a machine without
/// the GPU knows neither).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvMatch {
    pub arch: String,
    pub nvrtc_version: String,
    pub sm_count: Option<u32>,
    pub driver_version: Option<String>,
}

impl EnvMatch {
    pub fn matches(&self, env: &Environment) -> bool {
        env.arch == self.arch
            && env.nvrtc_version == self.nvrtc_version
            && self.sm_count.map(|s| s == env.sm_count).unwrap_or(true)
            && self
                .driver_version
                .as_ref()
                .map(|d| *d == env.driver_version)
                .unwrap_or(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(arch: &str) -> Environment {
        Environment {
            arch: arch.into(),
            sm_count: 132,
            driver_version: "13.0".into(),
            nvrtc_version: "13.0".into(),
        }
    }

    fn entry(
        kernel: &str,
        arch: &str,
        n: u64,
        times: &[(u32, Option<f64>, bool)],
        at: u64,
    ) -> Entry {
        Entry {
            key: TuningKey {
                kernel: kernel.into(),
                env: env(arch),
                dtype: Dtype::F16,
                n_bucket: bucket(n),
                batch_bucket: bucket(1),
            },
            candidates: times
                .iter()
                .map(|&(threads, t, ok)| LaunchCandidate {
                    launch: LaunchConfig {
                        threads,
                        ..LaunchConfig::default_for(crate::ir::KernelKind::Decode, 128)
                    },
                    correct: ok,
                    median_us: t,
                    note: String::new(),
                })
                .collect(),
            measured_at: at,
        }
    }

    #[test]
    fn buckets() {
        assert_eq!(bucket(0), 1);
        assert_eq!(bucket(1), 1);
        assert_eq!(bucket(5120), 8192);
        assert_eq!(bucket(4096), 4096);
    }

    #[test]
    fn best_skips_wrong_and_untimed_candidates() {
        let e = entry(
            "k",
            "sm_90",
            5000,
            &[
                (64, Some(5.0), false),
                (128, Some(7.0), true),
                (256, None, true),
                (32, Some(9.0), true),
            ],
            1,
        );
        assert_eq!(e.best().map(|c| c.launch.threads), Some(128));
    }

    #[test]
    fn lookup_keys_and_ignores_stale_entries() {
        let mut db = TuningDb::default();
        db.merge(TuningDb {
            entries: vec![
                entry("k", "sm_90", 5000, &[(256, Some(3.0), true)], 1),
                entry("k", "sm_80", 5000, &[(64, Some(1.0), true)], 1),
            ],
            ..TuningDb::default()
        });
        let (best, notes) = db.lookup("k", &env("sm_90"), Dtype::F16, 6000, 1);
        assert_eq!(
            best.map(|l| l.threads),
            Some(256),
            "same bucket of N (8192)"
        );
        assert_eq!(notes.len(), 1, "the sm_80 entry is ignored with a note");
        let (best, _) = db.lookup("k", &env("sm_90"), Dtype::F16, 20000, 1);
        assert_eq!(best, None, "another bucket of N");
        let (best, _) = db.lookup("k", &env("sm_90"), Dtype::Bf16, 6000, 1);
        assert_eq!(best, None, "another dtype");
    }

    #[test]
    fn save_merges_with_the_file_and_is_atomic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tuning.json");
        let a = TuningDb {
            entries: vec![entry("a", "sm_90", 100, &[(128, Some(2.0), true)], 1)],
            ..TuningDb::default()
        };
        a.save(&path).unwrap();
        let b = TuningDb {
            entries: vec![
                entry("b", "sm_90", 100, &[(64, Some(1.0), true)], 2),
                entry("a", "sm_90", 100, &[(256, Some(1.5), true)], 3),
            ],
            ..TuningDb::default()
        };
        b.save(&path).unwrap();
        let got = TuningDb::load(&path).unwrap();
        assert_eq!(got.entries.len(), 2, "merged, one entry per key");
        let a_entry = got.entries.iter().find(|e| e.key.kernel == "a").unwrap();
        assert_eq!(
            a_entry.candidates[0].launch.threads, 256,
            "the newer measurement wins"
        );
        // An older measurement does not replace a newer one.
        TuningDb {
            entries: vec![entry("a", "sm_90", 100, &[(32, Some(0.1), true)], 2)],
            ..TuningDb::default()
        }
        .save(&path)
        .unwrap();
        let got = TuningDb::load(&path).unwrap();
        assert_eq!(
            got.entries
                .iter()
                .find(|e| e.key.kernel == "a")
                .unwrap()
                .candidates[0]
                .launch
                .threads,
            256
        );
        // No temporary files are left beside it.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // A missing file is an empty database; a foreign file is an error.
        assert!(TuningDb::load(&dir.path().join("none.json"))
            .unwrap()
            .entries
            .is_empty());
        std::fs::write(&path, r#"{"format": "x", "version": 1, "entries": []}"#).unwrap();
        assert!(TuningDb::load(&path).is_err());
    }

    #[test]
    fn tuning_identity_ignores_the_launch_configuration() {
        let plan = crate::plan::validate(
            Path::new("t"),
            crate::plan::ModelShape {
                num_layers: 1,
                num_query_heads: 4,
                num_kv_heads: 2,
                head_dim: 128,
            },
            crate::plan::Settings::default(),
            &[vec![0.0; 4]],
            &[vec![0.5; 4]],
        )
        .unwrap();
        let low = crate::ir::lower(&plan, &crate::ir::LowerOptions::default()).unwrap();
        let mut spec = low.kernels[0].clone();
        let id = spec.tuning_identity();
        spec.launch.threads = 256;
        assert_eq!(spec.tuning_identity(), id);
        spec.dtype = Dtype::Bf16;
        assert_ne!(spec.tuning_identity(), id);
    }
}
