//! The compile cache: NVRTC outputs keyed by a hash of (source, options, NVRTC version,
//! arch), so a second identical compile does no NVRTC work.
//!
//! Each entry is a folder `<key>/` holding `kernel.ptx`, `kernel.cubin`, `log.txt` and
//! `meta.json` (sizes and SHA-256 of the other files). Entries are built in a temporary
//! folder and renamed into place, so concurrent compiles never see half an entry; if two
//! processes build the same entry, one rename wins and the other's copy is discarded. An
//! entry whose files do not match its `meta.json` is corrupt: it is removed and rebuilt.
//! A missing entry is never an error.

use crate::error::{Error, Result};
use crate::nvrtc::{Compiled, Resources};
use crate::plan::hex;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

#[derive(serde::Serialize, serde::Deserialize)]
struct Meta {
    key: String,
    ptx_sha256: String,
    cubin_sha256: String,
    log_sha256: String,
    resources: Resources,
}

/// A compile cache rooted at a folder.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

fn sha(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// The cache key of one compile.
pub fn key(source: &str, options: &[String], nvrtc_version: &str, arch: &str) -> String {
    let mut h = Sha256::new();
    for part in [source, &options.join("\u{1f}"), nvrtc_version, arch] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    hex(&h.finalize())
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

    fn entry(&self, key: &str) -> PathBuf {
        self.root.join(&key[..2]).join(key)
    }

    /// The cached result, or `None` when absent or corrupt (a corrupt entry is removed).
    pub fn get(&self, key: &str) -> Option<Compiled> {
        let dir = self.entry(key);
        if !dir.is_dir() {
            return None;
        }
        match read_entry(&dir, key) {
            Some(c) => Some(c),
            None => {
                let _ = std::fs::remove_dir_all(&dir);
                None
            }
        }
    }

    /// A cached text (generated and formatted Rust, say) stored under `key`, or `None`
    /// when absent or corrupt. Stored as `text/<key>.txt` whose first line is the
    /// SHA-256 of the rest; a mismatch is removed and treated as absent.
    pub fn get_text(&self, key: &str) -> Option<String> {
        let p = self.root.join("text").join(format!("{key}.txt"));
        let all = std::fs::read_to_string(&p).ok()?;
        let (head, body) = all.split_once('\n')?;
        if head == sha(body.as_bytes()) {
            Some(body.to_string())
        } else {
            let _ = std::fs::remove_file(&p);
            None
        }
    }

    /// Stores a text under `key` (atomically).
    pub fn put_text(&self, key: &str, text: &str) -> Result<()> {
        let dir = self.root.join("text");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let all = format!("{}\n{text}", sha(text.as_bytes()));
        crate::fsutil::write_atomic(&dir.join(format!("{key}.txt")), all.as_bytes())
    }

    /// Stores a result; never fails the compile (a cache that cannot be written is
    /// skipped with the reason returned for the caller to report).
    pub fn put(&self, key: &str, c: &Compiled) -> Result<()> {
        let dir = self.entry(key);
        let parent = dir.parent().unwrap_or(&self.root).to_path_buf();
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        let tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempdir_in(&parent)
            .map_err(|e| Error::io(&parent, e))?;
        let meta = Meta {
            key: key.to_string(),
            ptx_sha256: sha(c.ptx.as_bytes()),
            cubin_sha256: sha(&c.cubin),
            log_sha256: sha(c.log.as_bytes()),
            resources: c.resources,
        };
        let files: [(&str, &[u8]); 3] = [
            ("kernel.ptx", c.ptx.as_bytes()),
            ("kernel.cubin", &c.cubin),
            ("log.txt", c.log.as_bytes()),
        ];
        for (name, bytes) in files {
            let p = tmp.path().join(name);
            std::fs::write(&p, bytes).map_err(|e| Error::io(&p, e))?;
        }
        // meta.json last: an entry is complete exactly when its meta verifies.
        let meta_bytes = serde_json::to_vec(&meta).map_err(|e| Error::Internal(e.to_string()))?;
        let p = tmp.path().join("meta.json");
        std::fs::write(&p, meta_bytes).map_err(|e| Error::io(&p, e))?;
        let tmp_path = tmp.keep();
        if std::fs::rename(&tmp_path, &dir).is_err() {
            // Another process won the race (or an old corrupt entry is in the way).
            let _ = std::fs::remove_dir_all(&tmp_path);
            if read_entry(&dir, key).is_none() {
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
        Ok(())
    }
}

fn read_entry(dir: &Path, key: &str) -> Option<Compiled> {
    let meta: Meta = serde_json::from_slice(&std::fs::read(dir.join("meta.json")).ok()?).ok()?;
    let ptx = std::fs::read_to_string(dir.join("kernel.ptx")).ok()?;
    let cubin = std::fs::read(dir.join("kernel.cubin")).ok()?;
    let log = std::fs::read_to_string(dir.join("log.txt")).ok()?;
    let ok = meta.key == key
        && meta.ptx_sha256 == sha(ptx.as_bytes())
        && meta.cubin_sha256 == sha(&cubin)
        && meta.log_sha256 == sha(log.as_bytes());
    ok.then_some(Compiled {
        ptx,
        cubin,
        log,
        resources: meta.resources,
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
        std::fs::write(cache.entry(&k).join("kernel.cubin"), [9, 9]).unwrap();
        assert!(cache.get(&k).is_none());
        assert!(!cache.entry(&k).exists());
        // Rebuilt.
        cache.put(&k, &sample()).unwrap();
        assert!(cache.get(&k).is_some());
        // Half-written entry (no meta.json) counts as corrupt too.
        std::fs::remove_file(cache.entry(&k).join("meta.json")).unwrap();
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
        let p = dir.path().join("text/k.txt");
        let mut t = std::fs::read_to_string(&p).unwrap();
        t.push_str("// edited\n");
        std::fs::write(&p, t).unwrap();
        assert_eq!(cache.get_text("k"), None, "a corrupt text is a miss");
        assert!(!p.exists(), "and is removed");
    }
}
