//! Module images for the cuda backend: which binary of a translation unit to load (the
//! artifact's CUBIN for the device's arch, else its PTX, else the source compiled with
//! NVRTC), loaded through cudarc's safe `CudaModule`.

use crate::artifact::UnitBinaries;
use crate::error::{Error, Result};
use cudarc::driver::{CudaContext, CudaModule};
use cudarc::nvrtc::Ptx;
use moac::jit::cache::Cache;
use moac::jit::nvrtc;
use std::sync::Arc;

/// How a translation unit's binary was obtained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BinarySource {
    /// The artifact's CUBIN for the device's architecture.
    Cubin(String),
    /// The artifact's PTX, JIT-compiled by the driver.
    PtxJit,
    /// The source, compiled with NVRTC for the device's architecture.
    Nvrtc(String),
}

impl std::fmt::Display for BinarySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BinarySource::Cubin(a) => write!(f, "cubin {a}"),
            BinarySource::PtxJit => write!(f, "ptx jit"),
            BinarySource::Nvrtc(a) => write!(f, "nvrtc {a}"),
        }
    }
}

/// A module image the driver can load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Image {
    Cubin(Vec<u8>),
    Ptx(String),
}

/// The binary of a unit the artifact already carries for `arch`: its CUBIN for exactly
/// that architecture, else its PTX; `None` means "compile the source with NVRTC".
pub fn choose_binary(arch: &str, bins: Option<&UnitBinaries>) -> Option<(BinarySource, Image)> {
    let bins = bins?;
    if let Some((a, cubin)) = bins.cubins.iter().find(|(a, _)| a == arch) {
        return Some((BinarySource::Cubin(a.clone()), Image::Cubin(cubin.clone())));
    }
    bins.ptx
        .as_ref()
        .map(|p| (BinarySource::PtxJit, Image::Ptx(p.clone())))
}

/// The architecture name of a compute capability: (9, 0) -> `sm_90`.
pub fn arch_name(major: i32, minor: i32) -> String {
    format!("sm_{major}{minor}")
}

/// Compiles one unit with NVRTC for `arch`, through moac's compile cache.
pub fn nvrtc_cubin(unit_name: &str, source: &str, arch: &str) -> Result<Vec<u8>> {
    let nv = nvrtc::load()?;
    if nvrtc::check_arch(arch).is_err() {
        return Err(Error::Unavailable(format!(
            "cuda backend: the GPU is {arch}, which NVRTC {} does not compile for ({}); compile an artifact with PTX instead",
            nv.version,
            nvrtc::SUPPORTED_ARCHS.join(", ")
        )));
    }
    let options = nvrtc::options(arch, &nv.include_dir);
    let key = moac::jit::cache::key(source, &options, &nv.version, arch);
    let cache = Cache::new(Cache::default_root());
    if let Some(c) = cache.get(&key) {
        return Ok(c.cubin);
    }
    let c = nvrtc::compile(nv, unit_name, source, arch, &options)?;
    // A cache that cannot be written only costs a recompile next time.
    let _ = cache.put(&key, &c);
    Ok(c.cubin)
}

/// Loads an image into `ctx`. A CUBIN must look like one (an ELF image of at least a
/// header) before the driver parses it.
pub fn load(ctx: &Arc<CudaContext>, image: Image, what: &str) -> Result<Arc<CudaModule>> {
    let ptx = match image {
        Image::Cubin(bytes) => {
            if bytes.len() < 64 || !bytes.starts_with(b"\x7fELF") {
                return Err(Error::Unavailable(format!(
                    "cuda backend: loading {what}: not a CUBIN"
                )));
            }
            Ptx::from_binary(bytes)
        }
        Image::Ptx(text) => {
            if text.contains('\0') {
                return Err(Error::Unavailable(format!(
                    "cuda backend: loading {what}: the PTX has a NUL byte"
                )));
            }
            Ptx::from_src(text)
        }
    };
    ctx.load_module(ptx)
        .map_err(Error::driver(format_args!("loading {what}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_device_cubin_then_ptx_then_nvrtc() {
        let bins = UnitBinaries {
            cubins: vec![
                ("sm_80".into(), vec![1, 2, 3]),
                ("sm_90".into(), vec![4, 5, 6]),
            ],
            ptx: Some("//ptx".into()),
        };
        assert_eq!(
            choose_binary("sm_90", Some(&bins)),
            Some((
                BinarySource::Cubin("sm_90".into()),
                Image::Cubin(vec![4, 5, 6])
            ))
        );
        assert_eq!(
            choose_binary("sm_89", Some(&bins)),
            Some((BinarySource::PtxJit, Image::Ptx("//ptx".into())))
        );
        let no_ptx = UnitBinaries { ptx: None, ..bins };
        assert_eq!(choose_binary("sm_100", Some(&no_ptx)), None);
        assert_eq!(choose_binary("sm_90", None), None);
        assert_eq!(choose_binary("sm_90", Some(&UnitBinaries::default())), None);
        assert_eq!(arch_name(9, 0), "sm_90");
        assert_eq!(arch_name(12, 0), "sm_120");
        assert_eq!(
            BinarySource::Nvrtc("sm_90".into()).to_string(),
            "nvrtc sm_90"
        );
    }
}

#[cfg(test)]
mod nvrtc_tests {
    use super::*;

    /// The NVRTC fallback yields a CUBIN the loader accepts (an ELF image); skipped where
    /// NVRTC is not installed unless MOAC_REQUIRE_NVRTC is set. Needs no GPU.
    #[test]
    fn nvrtc_fallback_builds_an_elf_cubin() {
        if nvrtc::load().is_err() {
            assert!(
                std::env::var_os("MOAC_REQUIRE_NVRTC").is_none(),
                "NVRTC is required"
            );
            eprintln!("skipped: no NVRTC");
            return;
        }
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples/plans/meta-llama--Llama-3.2-1B-Instruct");
        let plan = moac::plan::load(
            &dir.join("moa_alpha_beta.json"),
            Some(&dir.join("config.json")),
        )
        .expect("example plan");
        let art =
            crate::Artifact::from_plan(&plan, moac::Dtype::F16, Some(vec![0])).expect("lower");
        let unit = art
            .units()
            .iter()
            .min_by_key(|u| u.source.len())
            .expect("a unit");
        let cubin = nvrtc_cubin(&unit.name, &unit.source, "sm_90").expect("nvrtc");
        assert!(cubin.len() >= 64 && cubin.starts_with(b"\x7fELF"));
        let err = nvrtc_cubin(&unit.name, &unit.source, "sm_70").unwrap_err();
        assert!(err.to_string().contains("sm_70"), "{err}");
    }
}
