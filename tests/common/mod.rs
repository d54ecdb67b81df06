//! Helpers shared by the workspace-level integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The example plans: (plan file, its config).
pub fn example_plans() -> Vec<(PathBuf, PathBuf)> {
    let dir = root().join("examples/plans");
    let mut out = Vec::new();
    let mut models: Vec<_> = std::fs::read_dir(&dir)
        .expect("examples/plans")
        .flatten()
        .map(|e| e.path())
        .collect();
    models.sort();
    for m in models.into_iter().filter(|p| p.is_dir()) {
        let mut files: Vec<_> = std::fs::read_dir(&m)
            .expect("model dir")
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        for f in files {
            if f.to_string_lossy().ends_with("alpha_beta.json") {
                out.push((f, m.join("config.json")));
            }
        }
    }
    out
}

/// Runs the `moac` binary.
pub fn moac(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moac"))
        .args(args)
        .output()
        .expect("run moac")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
