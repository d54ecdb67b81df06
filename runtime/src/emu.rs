//! The `emu` backend's engine: the exact CUDA source moac emits, compiled with g++
//! against the emulation header `runtime/emu/moac_emu.h` and run on the CPU.
//!
//! Each source file becomes a shared library with one C-ABI launch entry per kernel
//! (`moac_emu_launch_<name>`, taking the same `void** params` as `cuLaunchKernel`). The
//! libraries are cached by a hash of (source, header, flags), so repeated runs do not
//! recompile; builds go to a temporary name and are renamed into place.

use crate::args::ArgPack;
use crate::error::{Error, Result};
use moac::plan::hex;
use sha2::{Digest, Sha256};
use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The emulation header, compiled into the runtime.
pub const HEADER: &str = include_str!("../emu/moac_emu.h");

/// How to build an emu module.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EmuBuild {
    /// Build with `-fsanitize=address,undefined` (run the module in a process that has
    /// the sanitizer runtime preloaded, see the tests).
    pub sanitize: bool,
}

impl EmuBuild {
    fn flags(&self) -> Vec<&'static str> {
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

/// The cache folder: `MOAC_EMU_CACHE`, else `<moac cache>/emu`.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("MOAC_EMU_CACHE") {
        Some(d) => PathBuf::from(d),
        None => moac::cache::Cache::default_root().join("emu"),
    }
}

type LaunchFn = unsafe extern "C" fn(
    u32,
    u32,
    u32,
    u32,
    u32,
    u32,
    *mut *mut c_void,
    *mut std::ffi::c_char,
    usize,
) -> i32;

/// A loaded emu module.
pub struct EmuModule {
    lib: libloading::Library,
    path: PathBuf,
}

impl std::fmt::Debug for EmuModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmuModule")
            .field("path", &self.path)
            .finish()
    }
}

fn write_if_different(path: &Path, text: &str) -> Result<()> {
    if std::fs::read_to_string(path).ok().as_deref() == Some(text) {
        return Ok(());
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::NamedTempFile::new_in(dir)
        .map_err(|e| Error::Backend(format!("{}: {e}", dir.display())))?;
    std::fs::write(tmp.path(), text)
        .map_err(|e| Error::Backend(format!("{}: {e}", tmp.path().display())))?;
    tmp.persist(path)
        .map_err(|e| Error::Backend(format!("{}: {e}", path.display())))?;
    Ok(())
}

impl EmuModule {
    /// Builds (or finds in the cache) and loads the module for `source` with launch
    /// entries for `kernels`.
    pub fn build(source: &str, kernels: &[&str], build: &EmuBuild) -> Result<EmuModule> {
        if build.sanitize
            && !std::env::var("LD_PRELOAD")
                .unwrap_or_default()
                .contains("libasan")
        {
            return Err(Error::Unavailable(
                "sanitized emu modules must run in a process with the ASan runtime loaded first: run with LD_PRELOAD=\"$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libubsan.so)\" ASAN_OPTIONS=detect_leaks=0".into(),
            ));
        }
        let mut unit = String::from(source);
        unit.push_str("\n// moac emu launch entries\n");
        for k in kernels {
            unit.push_str(&format!("MOAC_EMU_ENTRY({k})\n"));
        }
        let flags = build.flags();
        let mut h = Sha256::new();
        for part in [unit.as_str(), HEADER, &flags.join(" ")] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        let key = hex(&h.finalize());
        let dir = cache_dir();
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::Backend(format!("emu cache {}: {e}", dir.display())))?;
        let so = dir.join(format!("{}.so", &key[..32]));
        if !so.is_file() {
            let header = dir.join(format!(
                "moac_emu-{}.h",
                &hex(&Sha256::digest(HEADER.as_bytes()))[..16]
            ));
            write_if_different(&header, HEADER)?;
            let src = dir.join(format!("{}.cu", &key[..32]));
            write_if_different(&src, &unit)?;
            let tmp = tempfile::Builder::new()
                .prefix(".build-")
                .suffix(".so")
                .tempfile_in(&dir)
                .map_err(|e| Error::Backend(format!("{}: {e}", dir.display())))?;
            let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".to_string());
            let out = Command::new(&cxx)
                .args(&flags)
                .arg("-include")
                .arg(&header)
                .arg("-x")
                .arg("c++")
                .arg(&src)
                .arg("-o")
                .arg(tmp.path())
                .arg("-pthread")
                .output()
                .map_err(|e| {
                    Error::Unavailable(format!("cannot run {cxx} for the emu backend: {e}"))
                })?;
            if !out.status.success() {
                return Err(Error::Backend(format!(
                    "g++ failed to build the emu module {}:\n{}",
                    src.display(),
                    String::from_utf8_lossy(&out.stderr)
                )));
            }
            tmp.persist(&so)
                .map_err(|e| Error::Backend(format!("{}: {e}", so.display())))?;
        }
        // SAFETY: the library was built by us from generated kernel source and the emu
        // header; its initialisers only set up the emulator's static state.
        let lib = unsafe { libloading::Library::new(&so) }
            .map_err(|e| Error::Backend(format!("cannot load {}: {e}", so.display())))?;
        Ok(EmuModule { lib, path: so })
    }

    /// Runs `kernel` over `grid` x `block` with packed arguments.
    pub fn launch(
        &self,
        kernel: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        args: &mut ArgPack,
    ) -> Result<()> {
        let symbol = format!("moac_emu_launch_{kernel}\0");
        // SAFETY: the symbol is the C-ABI entry MOAC_EMU_ENTRY defines, with this signature.
        let f: libloading::Symbol<LaunchFn> =
            unsafe { self.lib.get(symbol.as_bytes()) }.map_err(|e| {
                Error::Backend(format!("{}: no kernel {kernel}: {e}", self.path.display()))
            })?;
        let mut err = vec![0u8; 4096];
        // SAFETY: `args` holds one valid slot per kernel parameter, checked against the
        // kernel's ABI when it was packed; buffers behind pointer arguments are owned by
        // the caller and sized per docs/kernel-abi.md (the callers check shapes).
        let rc = unsafe {
            f(
                grid.0,
                grid.1,
                grid.2,
                block.0,
                block.1,
                block.2,
                args.as_params(),
                err.as_mut_ptr().cast(),
                err.len(),
            )
        };
        if rc != 0 {
            let msg = String::from_utf8_lossy(
                &err[..err.iter().position(|&c| c == 0).unwrap_or(err.len())],
            )
            .into_owned();
            return Err(Error::Backend(format!(
                "emu launch of {kernel} failed ({rc}): {msg}"
            )));
        }
        Ok(())
    }
}
