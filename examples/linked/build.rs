//! Runs the moac library on an example plan at build time and leaves the artifact (and
//! its `bindings.rs`) in OUT_DIR. Where NVRTC is not installed it emits sources and
//! bindings only (`--emit cuda`), so the crate builds everywhere.

use std::path::PathBuf;

fn main() {
    let manifest_dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let root = manifest_dir.join("../..");
    let plan_dir = root.join("examples/plans/meta-llama--Llama-3.2-1B-Instruct");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("artifact");
    println!("cargo:rerun-if-changed={}", plan_dir.display());
    println!(
        "cargo:rerun-if-changed={}",
        root.join("templates").display()
    );
    println!("cargo:rerun-if-env-changed=MOAC_NVRTC_DIR");

    let plan = match moac::plan::load(
        &plan_dir.join("moa_alpha_beta.json"),
        Some(&plan_dir.join("config.json")),
    ) {
        Ok(p) => p,
        Err(e) => panic!("example plan: {e}"),
    };
    let emit = if moac::jit::nvrtc::load().is_ok() {
        moac::EmitKind::All
    } else {
        println!("cargo:warning=NVRTC not found: building the linked example from sources only (run scripts/setup-nvrtc.sh for CUBINs)");
        moac::EmitKind::Cuda
    };
    let opts = moac::CompileOptions {
        layers: Some(vec![0, 1]),
        archs: vec!["sm_90".into()],
        emit,
        ..moac::CompileOptions::default()
    };
    if let Err(e) = moac::compile(&plan, &opts, &out) {
        panic!("moac compile of the example plan failed: {e}");
    }
}
