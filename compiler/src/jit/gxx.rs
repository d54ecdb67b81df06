//! The g++ build of a translation unit for the `emu` backend: the exact CUDA source moac
//! emits, compiled as C++20 against the emulation header (which the runtime owns and
//! passes in) into a shared library with one C-ABI launch entry per kernel entry point
//! (`moac_emu_launch_<entry>`). Results go through the same [`Cache`] as NVRTC's.

use crate::error::{Error, Result};
use crate::jit::cache::{key_of, Cache};
use std::path::PathBuf;
use std::process::Command;

/// How to build an emu module.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GxxOptions {
    /// Build with `-fsanitize=address,undefined` (load the module in a process that has
    /// the sanitizer runtime preloaded).
    pub sanitize: bool,
}

impl GxxOptions {
    /// The compiler flags (never `-ffast-math`: it breaks inf/NaN and fp16 subnormals).
    pub fn flags(&self) -> Vec<&'static str> {
        let mut f = vec![
            "-std=c++20",
            "-fno-strict-aliasing",
            "-fPIC",
            "-shared",
            "-DMOAC_EMU",
            "-w",
        ];
        if self.sanitize {
            f.extend([
                "-O1",
                "-g",
                "-fno-omit-frame-pointer",
                "-fsanitize=address,undefined",
                "-fno-sanitize-recover=all",
            ]);
        } else {
            f.push("-O2");
        }
        f
    }
}

/// The C++ compiler: `CXX`, else `g++`.
pub fn cxx() -> String {
    std::env::var("CXX").unwrap_or_else(|_| "g++".to_string())
}

/// The source g++ compiles: the unit plus one launch entry per entry point.
fn with_entries(source: &str, entries: &[&str]) -> String {
    let mut unit = String::from(source);
    unit.push_str("\n// moac emu launch entries\n");
    for e in entries {
        unit.push_str(&format!("MOAC_EMU_ENTRY({e})\n"));
    }
    unit
}

/// Builds (or finds in `cache`) the emu module of `source` with launch entries for
/// `entries`, compiled against `header`; returns the path of the shared library.
pub fn build(
    source: &str,
    entries: &[&str],
    header: &str,
    opts: &GxxOptions,
    cache: &Cache,
) -> Result<PathBuf> {
    let unit = with_entries(source, entries);
    let flags = opts.flags();
    let compiler = cxx();
    let key = key_of(&[&unit, header, &flags.join(" "), &compiler]);
    if let Some(dir) = cache.lookup("emu", &key) {
        return Ok(dir.join("module.so"));
    }
    let work = tempfile::Builder::new()
        .prefix("moac-emu-")
        .tempdir()
        .map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let header_path = work.path().join("moac_emu.h");
    let src_path = work.path().join("unit.cu");
    let so_path = work.path().join("module.so");
    std::fs::write(&header_path, header).map_err(|e| Error::io(&header_path, e))?;
    std::fs::write(&src_path, &unit).map_err(|e| Error::io(&src_path, e))?;
    let out = Command::new(&compiler)
        .args(&flags)
        .arg("-include")
        .arg(&header_path)
        .arg("-x")
        .arg("c++")
        .arg(&src_path)
        .arg("-o")
        .arg(&so_path)
        .arg("-pthread")
        .output()
        .map_err(|e| Error::Toolchain {
            tool: "the C++ compiler",
            unit: entries.join(","),
            arch: "emu".into(),
            options: format!("{compiler} {}", flags.join(" ")),
            log: format!("cannot run {compiler}: {e}"),
        })?;
    if !out.status.success() {
        return Err(Error::Toolchain {
            tool: "the C++ compiler",
            unit: entries.join(","),
            arch: "emu".into(),
            options: format!("{compiler} {}", flags.join(" ")),
            log: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    let so = std::fs::read(&so_path).map_err(|e| Error::io(&so_path, e))?;
    let dir = cache.store(
        "emu",
        &key,
        &[("module.so", &so), ("unit.cu", unit.as_bytes())],
    )?;
    Ok(dir.join("module.so"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_never_fast_math() {
        for sanitize in [false, true] {
            let f = GxxOptions { sanitize }.flags();
            assert!(!f.iter().any(|x| x.contains("fast-math")));
            assert!(f.contains(&"-std=c++20") && f.contains(&"-shared"));
        }
    }
}
