//! NVRTC through cudarc: finding the library, compiling to PTX and CUBIN, and reading
//! the resource figures ptxas reports.
//!
//! moac looks for NVRTC in the folder in `MOAC_NVRTC_DIR` when it is set (holding
//! `libnvrtc.so.13`, or a Python venv that has `nvidia/cu13/lib`), and otherwise in
//! the project-local venv `.venv` that `scripts/setup-nvrtc.sh` creates (searched
//! upwards from the current folder and from the executable's folder), then the system's
//! library path. Nobody has to export anything.

use crate::error::{Error, Result};
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// What `moac compile` says when NVRTC cannot be found.
pub const INSTALL_HINT: &str = "NVRTC 13.0 was not found: run `scripts/setup-nvrtc.sh` (installs it from PyPI into ./.venv), or set MOAC_NVRTC_DIR to a folder holding libnvrtc.so.13 and include/cuda_fp16.h; `--emit cuda` writes sources and bindings without NVRTC";

/// GPU architectures moac compiles for (NVRTC 13.0 supports these).
pub const SUPPORTED_ARCHS: [&str; 9] = [
    "sm_75", "sm_80", "sm_86", "sm_87", "sm_89", "sm_90", "sm_100", "sm_103", "sm_120",
];

/// A loaded NVRTC: where it is and which version.
#[derive(Debug, Clone)]
pub struct Nvrtc {
    pub lib_dir: PathBuf,
    pub include_dir: PathBuf,
    /// "13.0".
    pub version: String,
}

/// Validates an arch name (`sm_90`) and returns it.
pub fn check_arch(arch: &str) -> Result<&str> {
    if SUPPORTED_ARCHS.contains(&arch) {
        Ok(arch)
    } else {
        Err(Error::Unsupported(format!(
            "unsupported --arch {arch:?}: moac compiles for {}",
            SUPPORTED_ARCHS.join(", ")
        )))
    }
}

/// Folders that may hold `lib/libnvrtc.so.13` and `include/`, best first.
fn candidates() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = Vec::new();
    let mut starts = Vec::new();
    if let Some(dir) = std::env::var_os("MOAC_NVRTC_DIR") {
        // An explicit choice is the only place searched.
        roots.push(PathBuf::from(dir));
    } else {
        collect_starts(&mut starts);
        for var in ["CUDA_HOME", "CUDA_PATH"] {
            if let Some(dir) = std::env::var_os(var) {
                roots.push(PathBuf::from(dir));
            }
        }
        roots.push(PathBuf::from("/usr/local/cuda"));
    }
    for start in starts {
        for dir in start.ancestors() {
            let venv = dir.join(".venv");
            if venv.is_dir() {
                roots.push(venv);
            }
        }
    }
    expand(roots)
}

fn collect_starts(starts: &mut Vec<PathBuf>) {
    if let Ok(cwd) = std::env::current_dir() {
        starts.push(cwd);
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            starts.push(dir.to_path_buf());
        }
    }
    if let Some(dir) = option_env!("CARGO_MANIFEST_DIR") {
        starts.push(PathBuf::from(dir));
    }
}

fn expand(roots: Vec<PathBuf>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for root in roots {
        // The folder itself, a cu13 folder, or a venv / site-packages above it.
        out.push(root.clone());
        out.push(root.join("nvidia/cu13"));
        if let Ok(entries) = std::fs::read_dir(root.join("lib")) {
            let mut pys: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
            pys.sort();
            for py in pys {
                out.push(py.join("site-packages/nvidia/cu13"));
            }
        }
    }
    out
}

fn find() -> Option<(PathBuf, PathBuf)> {
    for c in candidates() {
        for lib in [c.join("lib"), c.join("lib64"), c.clone()] {
            if lib.join("libnvrtc.so.13").is_file() {
                let include = if c.join("include/cuda_fp16.h").is_file() {
                    c.join("include")
                } else if lib.join("../include/cuda_fp16.h").is_file() {
                    lib.join("../include")
                } else {
                    continue;
                };
                return Some((lib, include));
            }
        }
    }
    None
}

/// The first of the folders NVRTC is searched in (the project's venv, `MOAC_NVRTC_DIR`,
/// `CUDA_HOME`, /usr/local/cuda) whose `lib`, `lib64` or itself holds `file`: where
/// the other CUDA libraries from PyPI (cuBLAS) sit beside NVRTC.
pub fn find_library(file: &str) -> Option<PathBuf> {
    let mut roots = candidates();
    if let Some(dir) = std::env::var_os("MOAC_CUBLAS_DIR") {
        roots.insert(0, PathBuf::from(dir));
    }
    roots
        .into_iter()
        .flat_map(|c| [c.join("lib"), c.join("lib64"), c])
        .map(|d| d.join(file))
        .find(|f| f.is_file())
}

/// Finds and loads NVRTC once per process; later calls return the same result.
pub fn load() -> Result<&'static Nvrtc> {
    static LOADED: OnceLock<std::result::Result<Nvrtc, String>> = OnceLock::new();
    LOADED
        .get_or_init(load_uncached)
        .as_ref()
        .map_err(|e| Error::NvrtcMissing(e.clone()))
}

fn load_uncached() -> std::result::Result<Nvrtc, String> {
    let Some((lib_dir, include_dir)) = find() else {
        return Err(INSTALL_HINT.to_string());
    };
    // Load the builtins and then NVRTC itself by absolute path, globally: cudarc's own
    // dlopen by soname then finds the already-loaded library.
    for name in ["libnvrtc-builtins.so.13.0", "libnvrtc.so.13"] {
        let path = lib_dir.join(name);
        if !path.is_file() {
            return Err(format!("{} is missing; {INSTALL_HINT}", path.display()));
        }
        // SAFETY: loading NVRTC runs only its own initialisers; the handle is leaked on
        // purpose so the library stays loaded for the life of the process.
        let lib = unsafe {
            libloading::os::unix::Library::open(
                Some(&path),
                libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL,
            )
        }
        .map_err(|e| format!("cannot load {}: {e}; {INSTALL_HINT}", path.display()))?;
        std::mem::forget(lib);
    }
    // SAFETY: only probes whether the library can be opened.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(INSTALL_HINT.to_string());
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is loaded (checked above); both pointers are valid for writes.
    let rc = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if rc != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(format!("nvrtcVersion failed: {rc:?}"));
    }
    if major != 13 {
        return Err(format!(
            "found NVRTC {major}.{minor} in {}, moac needs 13.0 (the GPU machines' driver is CUDA 13.0); {INSTALL_HINT}",
            lib_dir.display()
        ));
    }
    Ok(Nvrtc {
        lib_dir,
        include_dir,
        version: format!("{major}.{minor}"),
    })
}

/// Resource figures of one kernel for one arch, from the ptxas log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Resources {
    pub registers: u32,
    pub spill_bytes: u32,
    pub shared_bytes: u32,
    pub stack_bytes: u32,
}

/// Parses `ptxas info` lines: "N bytes stack frame, N bytes spill stores, N bytes spill
/// loads" and "Used N registers, ... N bytes smem".
pub fn parse_resources(log: &str) -> Resources {
    fn number_before(line: &str, suffix: &str) -> Option<u32> {
        let i = line.find(suffix)?;
        line[..i]
            .split(|c: char| !c.is_ascii_digit())
            .rfind(|s| !s.is_empty())?
            .parse()
            .ok()
    }
    let mut r = Resources::default();
    for line in log.lines() {
        if let Some(v) = number_before(line, " bytes stack frame") {
            r.stack_bytes = r.stack_bytes.max(v);
        }
        let stores = number_before(line, " bytes spill stores").unwrap_or(0);
        let loads = number_before(line, " bytes spill loads").unwrap_or(0);
        r.spill_bytes = r.spill_bytes.max(stores + loads);
        if let Some(v) = number_before(line, " registers") {
            r.registers = r.registers.max(v);
        }
        if let Some(v) = number_before(line, " bytes smem") {
            r.shared_bytes = r.shared_bytes.max(v);
        }
    }
    r
}

/// Per-function figures from a ptxas log with several entries: lines after
/// "Compiling entry function 'X'" or "Function properties for X" belong to X.
pub fn parse_entry_resources(log: &str) -> std::collections::BTreeMap<String, Resources> {
    let mut out = std::collections::BTreeMap::new();
    let mut current: Option<String> = None;
    let mut block = String::new();
    let mut flush = |name: &Option<String>, block: &mut String| {
        if let Some(n) = name {
            let r = parse_resources(block);
            let e: &mut Resources = out.entry(n.clone()).or_default();
            e.registers = e.registers.max(r.registers);
            e.spill_bytes = e.spill_bytes.max(r.spill_bytes);
            e.shared_bytes = e.shared_bytes.max(r.shared_bytes);
            e.stack_bytes = e.stack_bytes.max(r.stack_bytes);
        }
        block.clear();
    };
    for line in log.lines() {
        let name = line
            .split_once("Compiling entry function '")
            .or_else(|| line.split_once("Function properties for "))
            .map(|(_, rest)| rest.split(['\'', ' ']).next().unwrap_or("").to_string());
        if let Some(n) = name.filter(|n| !n.is_empty()) {
            flush(&current, &mut block);
            current = Some(n);
        } else {
            block.push_str(line);
            block.push('\n');
        }
    }
    flush(&current, &mut block);
    out
}

/// Output of one NVRTC compile.
#[derive(Debug, Clone)]
pub struct Compiled {
    pub ptx: String,
    pub cubin: Vec<u8>,
    pub log: String,
    pub resources: Resources,
}

/// The NVRTC options of a compile for `arch`; pure, so it can be tested and hashed.
pub fn options(arch: &str, include_dir: &Path) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        format!("-I{}", include_dir.display()),
        "--ptxas-options=-v".to_string(),
        "--fmad=true".to_string(),
    ]
}

fn c_chars_to_string(v: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = v
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Compiles `source` (kernel `name`) for `arch` with the given options.
pub fn compile(
    _nvrtc: &Nvrtc,
    name: &str,
    source: &str,
    arch: &str,
    options: &[String],
) -> Result<Compiled> {
    let err = |log: String| Error::Toolchain {
        tool: "NVRTC",
        unit: name.to_string(),
        arch: arch.to_string(),
        options: options.join(" "),
        log,
    };
    let src = CString::new(source).map_err(|_| err("source contains a NUL byte".into()))?;
    let file = CString::new(format!("{name}.cu")).map_err(|_| err("bad kernel name".into()))?;
    let prog = cudarc::nvrtc::result::create_program(&src, Some(file.as_c_str()))
        .map_err(|e| err(format!("{e:?}")))?;
    // SAFETY: `prog` was created above and is destroyed exactly once, at the end of this
    // function; `src` and `file` outlive it.
    let result = unsafe {
        let compiled = cudarc::nvrtc::result::compile_program(prog, options);
        let log = cudarc::nvrtc::result::get_program_log(prog)
            .map(|l| c_chars_to_string(&l))
            .unwrap_or_default();
        let out = match compiled {
            Err(e) => Err(err(failure_log(&format!("{e:?}"), &log))),
            Ok(()) => get_outputs(prog).map_err(err).map(|(ptx, cubin)| Compiled {
                resources: parse_resources(&log),
                ptx,
                cubin,
                log,
            }),
        };
        let _ = cudarc::nvrtc::result::destroy_program(prog);
        out
    };
    result
}

/// The lines of a compiler log that say what went wrong (NVRTC's and ptxas's `error`
/// and `fatal` lines), in order.
pub fn error_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("error") || l.contains("fatal")
        })
        .map(str::trim)
        .collect()
}

/// The size of the largest constant bank 3 (`__constant__` data) ptxas reports, bytes.
fn constant_bank_bytes(log: &str) -> Option<u64> {
    log.lines()
        .flat_map(|l| l.split(','))
        .filter_map(|part| {
            let part = part.trim();
            let n = part.strip_suffix("bytes cmem[3]")?;
            n.trim().rsplit(' ').next()?.parse::<u64>().ok()
        })
        .max()
}

/// The bytes of a constant bank.
pub const CONSTANT_BANK_BYTES: u64 = 64 * 1024;

/// A failed compile's log as the error shows it: the error lines first (or, where ptxas
/// names none, the reason its figures show), then NVRTC's status and the whole log.
fn failure_log(status: &str, log: &str) -> String {
    let errors = error_lines(log);
    let mut out = String::new();
    if errors.is_empty() {
        match constant_bank_bytes(log) {
            Some(b) if b > CONSTANT_BANK_BYTES => out.push_str(&format!(
                "error: {b} bytes of __constant__ data (cmem[3]) exceed the {CONSTANT_BANK_BYTES}-byte constant bank\n"
            )),
            _ => out.push_str("(the log names no error line)\n"),
        }
    }
    for e in &errors {
        out.push_str(e);
        out.push('\n');
    }
    out.push_str(&format!("NVRTC status: {status}; the whole log:\n{log}"));
    out
}

/// # Safety
/// `prog` must be a live, successfully compiled program.
unsafe fn get_outputs(
    prog: cudarc::nvrtc::sys::nvrtcProgram,
) -> std::result::Result<(String, Vec<u8>), String> {
    use cudarc::nvrtc::sys;
    // SAFETY: guaranteed by the caller.
    let ptx = unsafe { cudarc::nvrtc::result::get_ptx(prog) }
        .map_err(|e| format!("nvrtcGetPTX: {e:?}"))?;
    let mut size = 0usize;
    // SAFETY: `prog` is live; `size` is valid for writes.
    let rc = unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) };
    if rc != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(format!("nvrtcGetCUBINSize: {rc:?}"));
    }
    let mut cubin = vec![0u8; size];
    // SAFETY: `cubin` has exactly the size NVRTC reported.
    let rc = unsafe { sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr().cast()) };
    if rc != sys::nvrtcResult::NVRTC_SUCCESS || size == 0 {
        return Err(format!(
            "nvrtcGetCUBIN: {rc:?} (size {size}); compile for sm_XX, not compute_XX"
        ));
    }
    Ok((c_chars_to_string(&ptx), cubin))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_stable() {
        assert_eq!(
            options("sm_90", Path::new("/x/include")),
            [
                "--gpu-architecture=sm_90",
                "--std=c++17",
                "-I/x/include",
                "--ptxas-options=-v",
                "--fmad=true"
            ]
        );
    }

    #[test]
    fn resources_from_a_ptxas_log() {
        let log = "ptxas info    : 0 bytes gmem\nptxas info    : Compiling entry function 'k' for 'sm_90'\nptxas info    : Function properties for k\n    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\nptxas info    : Used 40 registers, used 1 barriers, 2592 bytes smem, 400 bytes cmem[0]\n";
        assert_eq!(
            parse_resources(log),
            Resources {
                registers: 40,
                spill_bytes: 8,
                shared_bytes: 2592,
                stack_bytes: 8
            }
        );
    }

    #[test]
    fn failures_lead_with_their_error_lines() {
        let log = "ptxas info    : 0 bytes gmem\nptxas error   : File uses too much global constant data (0x13c00 bytes, 0x10000 max)\nptxas info    : Compiling entry\n";
        assert_eq!(
            error_lines(log),
            ["ptxas error   : File uses too much global constant data (0x13c00 bytes, 0x10000 max)"]
        );
        let shown = failure_log("NVRTC_ERROR_COMPILATION", log);
        assert!(shown.starts_with("ptxas error"), "{shown}");
        assert!(shown.contains("NVRTC_ERROR_COMPILATION") && shown.contains("0 bytes gmem"));
        assert!(failure_log("X", "all fine\n").starts_with("(the log names no error line)"));
        // NVRTC 13's ptxas only reports the size of a too-big constant bank.
        let log = "ptxas info    : 41 bytes gmem, 290304 bytes cmem[3], 88 bytes cmem[4]\nptxas info    : Used 202 registers, 428 bytes cmem[0]\n";
        assert_eq!(constant_bank_bytes(log), Some(290304));
        let shown = failure_log("NVRTC_ERROR_COMPILATION", log);
        assert!(
            shown.starts_with("error: 290304 bytes of __constant__ data (cmem[3]) exceed"),
            "{shown}"
        );
    }

    #[test]
    fn archs() {
        assert!(check_arch("sm_90").is_ok());
        assert!(check_arch("sm_91").is_err());
        assert!(check_arch("compute_90").is_err());
    }
}
