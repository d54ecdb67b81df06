//! The CUDA CPU emulation header's own tests (`runtime/emu/tests/run.sh`), one `#[test]`
//! per emu test so that a failure names the test and shows its log.
//!
//! Only `std`, no crate of the workspace: the header and its tests are C++, and this
//! file must build whatever state the Rust crates are in. Needs bash, g++ (with libasan
//! and libubsan for the sanitizer tests) and nm, as run.sh does.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn run_sh() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("emu/tests/run.sh")
}

fn run(args: &[&str]) -> Output {
    let script = run_sh();
    Command::new("bash")
        .arg(&script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run bash {}: {e}", script.display()))
}

fn show(out: &Output) -> String {
    format!(
        "--- stdout ---\n{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs exactly one emu test. `--exact` rather than run.sh's substring filter, so that
/// one `#[test]` never runs (and waits for) another emu test whose name contains it.
fn emu_test(name: &str) {
    let out = run(&["--exact", name]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    // Exit status and summary both: "1 passed" also proves the test ran at all.
    assert!(
        out.status.success() && stdout.contains("1 passed, 0 failed"),
        "emu test `{name}` failed (run.sh --exact {name}: {})\n{}",
        out.status,
        show(&out)
    );
    print!("{stdout}"); // seen with --nocapture: timings and notes
}

macro_rules! emu_tests {
    ($($name:ident),* $(,)?) => {
        /// The emu tests that have a `#[test]` here, in run.sh's order.
        const NAMES: &[&str] = &[$(stringify!($name)),*];
        $(
            #[test]
            fn $name() {
                emu_test(stringify!($name));
            }
        )*
    };
}

emu_tests! {
    convert,
    reduce_missing_sync,
    shuffle,
    atomics_4_threads,
    errors_deadlock_trap,
    launch_args,
    pipeline,
    common_helpers,
    env_stack_threads,
    dlopen_entry,
    header_warnings,
    ucontext_fallback,
    asan_ubsan_clean,
    asan_oob_detected,
    ubsan_misaligned,
    bench,
}

/// A test added to (or renamed in) run.sh must get its `#[test]` here, or `cargo test`
/// would silently stop running it.
#[test]
fn every_emu_test_has_a_rust_test() {
    let out = run(&["--list"]);
    assert!(out.status.success(), "run.sh --list failed\n{}", show(&out));
    let listed = String::from_utf8_lossy(&out.stdout);
    let listed: Vec<&str> = listed.lines().collect();
    assert_eq!(
        listed, NAMES,
        "run.sh --list (left) and the emu_tests! list in tests/runtime/emu_header.rs (right) differ"
    );
}
