//! The compile cache, one contract for every toolchain moac drives (NVRTC, g++ for the
//! emu backend, the formatter of the bindings): an entry is a set of named files under
//! a key that hashes everything that determines them.
//!
//! An entry is a folder `<namespace>/<key[..2]>/<key>/` holding its files and
//! `meta.json` (the key and the SHA-256 of every file). Entries are built in a temporary
//! folder and renamed into place, so concurrent builds (threads or processes) never see
//! half an entry; if two build the same entry, one rename wins and the other's copy is
//! discarded. An entry whose files do not match its `meta.json` is corrupt: it is removed
//! and reported absent, so it is rebuilt. A missing entry is never an error.

use crate::error::{Error, Result};
use crate::jit::nvrtc::{Compiled, Resources};
use crate::plan::hex;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(serde::Serialize, serde::Deserialize)]
struct Meta {
    key: String,
    /// File name -> SHA-256.
    files: BTreeMap<String, String>,
}

/// A compile cache rooted at a folder.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

fn sha(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// A cache key: the SHA-256 of the parts, each length-prefixed (so no two different
/// part lists give the same bytes).
pub fn key_of(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for part in parts {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    hex(&h.finalize())
}

/// The cache key of one NVRTC compile.
pub fn key(source: &str, options: &[String], nvrtc_version: &str, arch: &str) -> String {
    key_of(&[source, &options.join("\u{1f}"), nvrtc_version, arch])
}

impl Cache {
    /// The default location: `MOAC_CACHE_DIR`, else `$XDG_CACHE_HOME/moac`, else
    /// `~/.cache/moac`, else `.moac-cache` in the current folder.
    pub fn default_root() -> PathBuf {
        if let Some(d) = std::env::var_os("MOAC_CACHE_DIR") {
            return PathBuf::from(d);
        }
        if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
            return PathBuf::from(d).join("moac");
        }
        if let Some(h) = std::env::var_os("HOME") {
            return PathBuf::from(h).join(".cache/moac");
        }
        PathBuf::from(".moac-cache")
    }

    pub fn new(root: impl Into<PathBuf>) -> Self {
        Cache { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn entry(&self, namespace: &str, key: &str) -> PathBuf {
        self.root
            .join(namespace)
            .join(&key[..2.min(key.len())])
            .join(key)
    }

    /// The folder of a complete entry, or `None` when absent or corrupt (a corrupt entry
    /// is removed). Every file is checked against `meta.json`.
    pub fn lookup(&self, namespace: &str, key: &str) -> Option<PathBuf> {
        let dir = self.entry(namespace, key);
        if !dir.is_dir() {
            return None;
        }
        if verify_entry(&dir, key) {
            Some(dir)
        } else {
            let _ = std::fs::remove_dir_all(&dir);
            None
        }
    }

    /// Stores `files` as the entry `key` and returns its folder. If another build of the
    /// same entry won the race, its (verified) folder is returned.
    pub fn store(&self, namespace: &str, key: &str, files: &[(&str, &[u8])]) -> Result<PathBuf> {
        let dir = self.entry(namespace, key);
        let parent = dir.parent().unwrap_or(&self.root).to_path_buf();
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        let tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempdir_in(&parent)
            .map_err(|e| Error::io(&parent, e))?;
        let mut meta = Meta {
            key: key.to_string(),
            files: BTreeMap::new(),
        };
        for (name, bytes) in files {
            let p = tmp.path().join(name);
            std::fs::write(&p, bytes).map_err(|e| Error::io(&p, e))?;
            meta.files.insert(name.to_string(), sha(bytes));
        }
        // meta.json last: an entry is complete exactly when its meta verifies.
        let meta_bytes = serde_json::to_vec(&meta).map_err(|e| Error::Internal(e.to_string()))?;
        let p = tmp.path().join("meta.json");
        std::fs::write(&p, meta_bytes).map_err(|e| Error::io(&p, e))?;
        let tmp_path = tmp.keep();
        if std::fs::rename(&tmp_path, &dir).is_err() {
            // Another build won the race (or an old corrupt entry is in the way).
            let _ = std::fs::remove_dir_all(&tmp_path);
            if !verify_entry(&dir, key) {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(Error::Internal(format!(
                    "compile cache entry {} could not be written",
                    dir.display()
                )));
            }
        }
        Ok(dir)
    }

    /// A cached NVRTC result, or `None` when absent or corrupt.
    pub fn get(&self, key: &str) -> Option<Compiled> {
        let dir = self.lookup("nvrtc", key)?;
        let ptx = std::fs::read_to_string(dir.join("kernel.ptx")).ok()?;
        let cubin = std::fs::read(dir.join("kernel.cubin")).ok()?;
        let log = std::fs::read_to_string(dir.join("log.txt")).ok()?;
        let resources: Resources =
            serde_json::from_slice(&std::fs::read(dir.join("resources.json")).ok()?).ok()?;
        Some(Compiled {
            ptx,
            cubin,
            log,
            resources,
        })
    }

    /// Stores an NVRTC result; the caller reports a failure as a warning (a cache that
    /// cannot be written never fails a compile).
    pub fn put(&self, key: &str, c: &Compiled) -> Result<()> {
        let resources =
            serde_json::to_vec(&c.resources).map_err(|e| Error::Internal(e.to_string()))?;
        self.store(
            "nvrtc",
            key,
            &[
                ("kernel.ptx", c.ptx.as_bytes()),
                ("kernel.cubin", &c.cubin),
                ("log.txt", c.log.as_bytes()),
                ("resources.json", &resources),
            ],
        )
        .map(|_| ())
    }

    /// A cached text (generated and formatted Rust, say) stored under `key`.
    pub fn get_text(&self, key: &str) -> Option<String> {
        let dir = self.lookup("text", key)?;
        std::fs::read_to_string(dir.join("text.txt")).ok()
    }

    /// Stores a text under `key`.
    pub fn put_text(&self, key: &str, text: &str) -> Result<()> {
        self.store("text", key, &[("text.txt", text.as_bytes())])
            .map(|_| ())
    }
}

/// Whether the entry folder's files match its `meta.json` (and nothing is missing).
fn verify_entry(dir: &Path, key: &str) -> bool {
    let Some(meta) = std::fs::read(dir.join("meta.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<Meta>(&b).ok())
    else {
        return false;
    };
    meta.key == key
        && meta.files.iter().all(|(name, want)| {
            std::fs::read(dir.join(name))
                .map(|b| sha(&b) == *want)
                .unwrap_or(false)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Compiled {
        Compiled {
            ptx: ".version 9.0".into(),
            cubin: vec![1, 2, 3, 4],
            log: "ptxas info".into(),
            resources: Resources {
                registers: 32,
                ..Resources::default()
            },
        }
    }

    #[test]
    fn keys_depend_on_every_input() {
        let o = vec!["-a".to_string()];
        let k = key("src", &o, "13.0", "sm_90");
        assert_ne!(k, key("src2", &o, "13.0", "sm_90"));
        assert_ne!(k, key("src", &["-b".to_string()], "13.0", "sm_90"));
        assert_ne!(k, key("src", &o, "13.1", "sm_90"));
        assert_ne!(k, key("src", &o, "13.0", "sm_80"));
        assert_eq!(k, key("src", &o, "13.0", "sm_90"));
    }

    #[test]
    fn round_trip_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path());
        let k = key("s", &[], "13.0", "sm_90");
        assert!(cache.get(&k).is_none(), "a missing entry is simply absent");
        cache.put(&k, &sample()).unwrap();
        let got = cache.get(&k).unwrap();
        assert_eq!(got.cubin, vec![1, 2, 3, 4]);
        assert_eq!(got.resources.registers, 32);
        // Corrupt the CUBIN: the entry is detected, removed, and reported absent.
        std::fs::write(cache.entry("nvrtc", &k).join("kernel.cubin"), [9, 9]).unwrap();
        assert!(cache.get(&k).is_none());
        assert!(!cache.entry("nvrtc", &k).exists());
        // Rebuilt.
        cache.put(&k, &sample()).unwrap();
        assert!(cache.get(&k).is_some());
        // Half-written entry (no meta.json) counts as corrupt too.
        std::fs::remove_file(cache.entry("nvrtc", &k).join("meta.json")).unwrap();
        assert!(cache.get(&k).is_none());
    }

    #[test]
    fn concurrent_puts_leave_one_good_entry() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path());
        let k = key("race", &[], "13.0", "sm_90");
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..20 {
                        cache.put(&k, &sample()).unwrap();
                        if let Some(c) = cache.get(&k) {
                            assert_eq!(c.cubin, vec![1, 2, 3, 4]);
                        }
                    }
                });
            }
        });
        assert!(cache.get(&k).is_some());
    }

    #[test]
    fn texts_round_trip_and_corrupt_ones_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path());
        assert_eq!(cache.get_text("k"), None, "absent");
        cache.put_text("k", "fn main() {}\nline two\n").unwrap();
        assert_eq!(
            cache.get_text("k").as_deref(),
            Some("fn main() {}\nline two\n")
        );
        let p = cache.entry("text", "k").join("text.txt");
        let mut t = std::fs::read_to_string(&p).unwrap();
        t.push_str("// edited\n");
        std::fs::write(&p, t).unwrap();
        assert_eq!(cache.get_text("k"), None, "a corrupt text is a miss");
        assert!(!p.exists(), "and is removed");
    }
}
