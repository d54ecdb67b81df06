//! The artifact contract: `manifest.json`, the only code that knows its JSON. `moac
//! compile` writes it ([`super::write`]), `moac-runtime` reads it ([`Manifest::read`]),
//! the bindings are generated from it. A manifest names its format and version; reading
//! one of another format or version is a clear error, never a guess.

use crate::abi::Param;
use crate::error::{Error, Result};
use crate::geometry::Dtype;
use crate::ir::{KernelKind, LaunchConfig, LayerKernels, PrefillMode};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The `format` of every moac artifact manifest.
pub const FORMAT: &str = "moac-artifact";

/// The manifest version this moac writes and reads. 2: readable kernel names (kind,
/// dtype, head_dim, group), resolved launch configurations, a `version` field.
pub const VERSION: u32 = 2;

/// The manifest's file name inside an artifact folder.
pub const FILE: &str = "manifest.json";

/// The memory layout of a layer's cache, stated in every manifest.
pub const LAYOUT: &str = "batch-major: element (b, kv head j, slot s, d) of a layer's K or V at ((b * total_slots + kv_offset[j] + s) * head_dim + d); see docs/kernel-abi.md";

/// One CUBIN of a kernel's unit, with ptxas's figures for the kernel's entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CubinEntry {
    pub path: String,
    pub registers: u32,
    pub spill_bytes: u32,
    pub shared_bytes: u32,
    pub stack_bytes: u32,
}

/// One parameter of a kernel's entry point (the ABI table's row).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestParam {
    pub name: String,
    #[serde(flatten)]
    pub param: Param,
}

/// One kernel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestKernel {
    pub name: String,
    /// `decode`, `merge`, `append`, `fill` or `prefill` ([`KernelKind::name`]).
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill_mode: Option<PrefillMode>,
    pub layers: Vec<usize>,
    /// The translation unit (source file) that defines this kernel; kernels of one kind
    /// share a unit so that their common body is compiled once.
    pub unit: String,
    /// The unit's entry point (the function to launch) and this kernel's `slot`, its
    /// first argument.
    pub entry: String,
    pub slot: usize,
    pub source: String,
    pub source_sha256: String,
    #[serde(default)]
    pub ptx: Option<String>,
    #[serde(default)]
    pub cubin: BTreeMap<String, CubinEntry>,
    pub launch: LaunchConfig,
    /// `heuristic`, `database` or `override`.
    pub launch_source: String,
    /// The key of this kernel in a tuning database (what it computes, minus launch).
    pub tuning_identity: String,
    pub params: Vec<ManifestParam>,
}

impl ManifestKernel {
    /// The kernel's kind, from `kind` and `prefill_mode`.
    pub fn kernel_kind(&self) -> Option<KernelKind> {
        match (self.kind.as_str(), self.prefill_mode) {
            ("prefill", Some(m)) => Some(KernelKind::Prefill(m)),
            ("prefill", None) => None,
            (k, _) => KernelKind::ALL.into_iter().find(|x| x.name() == k),
        }
    }
}

/// `manifest.json` of an artifact folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub moac_version: String,
    pub plan_sha256: String,
    pub plan_name: String,
    /// The validated plan in moac's own format, relative to the folder.
    pub plan: String,
    pub nvrtc_version: Option<String>,
    pub dtype: Dtype,
    pub head_dim: usize,
    pub num_layers: usize,
    pub num_query_heads: usize,
    pub num_kv_heads: usize,
    pub sink: u64,
    pub min_capacity: u64,
    pub granularity: u64,
    pub fixed_n: Option<u64>,
    pub prompt_len: Option<u64>,
    pub max_new_tokens: Option<u64>,
    pub archs: Vec<String>,
    pub kernels: Vec<ManifestKernel>,
    pub layers: Vec<LayerKernels>,
    /// `bindings.rs`, when the compiler was built with its `bindings` feature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bindings: Option<String>,
    pub resources: String,
    pub layout: String,
}

fn artifact_err(path: &Path, message: impl Into<String>) -> Error {
    Error::Artifact {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

impl Manifest {
    /// (prompt_len, max_new_tokens) of a build specialized to one N.
    pub fn fixed(&self) -> Option<(u64, u64)> {
        self.prompt_len.zip(self.max_new_tokens)
    }

    /// Parses a manifest's text, checking its format and version before anything else.
    /// `path` names the file in errors.
    pub fn parse(path: &Path, text: &[u8]) -> Result<Manifest> {
        let value: serde_json::Value =
            serde_json::from_slice(text).map_err(|e| Error::json(path, &e))?;
        let format = value.get("format").and_then(|f| f.as_str());
        if format != Some(FORMAT) {
            return Err(artifact_err(
                path,
                match format {
                    Some(f) => format!("format {f:?} is not a moac artifact ({FORMAT:?})"),
                    None => format!("no \"format\": not a moac artifact manifest ({FORMAT:?})"),
                },
            ));
        }
        let version = value.get("version").and_then(|v| v.as_u64());
        if version != Some(VERSION as u64) {
            let was = match version {
                Some(v) => format!("version {v}"),
                None => "version 1 (no \"version\" field)".to_string(),
            };
            return Err(artifact_err(
                path,
                format!(
                    "artifact {was}; this moac ({}) reads version {VERSION}: recompile the plan with `moac compile`",
                    env!("CARGO_PKG_VERSION")
                ),
            ));
        }
        serde_json::from_slice(text).map_err(|e| Error::json(path, &e))
    }

    /// Reads `DIR/manifest.json`.
    pub fn read(dir: &Path) -> Result<Manifest> {
        let path = dir.join(FILE);
        let text = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        Manifest::parse(&path, &text)
    }

    /// The manifest as written: pretty JSON with a final newline.
    pub fn to_json(&self) -> Result<String> {
        let mut s =
            serde_json::to_string_pretty(self).map_err(|e| Error::Internal(e.to_string()))?;
        s.push('\n');
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            format: FORMAT.into(),
            version: VERSION,
            moac_version: "0.1.0".into(),
            plan_sha256: "ab".into(),
            plan_name: "p".into(),
            plan: "plan.moac.json".into(),
            nvrtc_version: None,
            dtype: Dtype::Bf16,
            head_dim: 64,
            num_layers: 1,
            num_query_heads: 4,
            num_kv_heads: 2,
            sink: 64,
            min_capacity: 128,
            granularity: 64,
            fixed_n: None,
            prompt_len: None,
            max_new_tokens: None,
            archs: vec![],
            kernels: vec![ManifestKernel {
                name: "moac_prefill_token_bf16_d64_g2_x".into(),
                kind: "prefill".into(),
                prefill_mode: Some(PrefillMode::Token),
                layers: vec![0],
                unit: "u".into(),
                entry: "u".into(),
                slot: 0,
                source: "kernels/u.cu".into(),
                source_sha256: "cd".into(),
                ptx: None,
                cubin: BTreeMap::new(),
                launch: LaunchConfig::default_for(KernelKind::Prefill(PrefillMode::Token), 64),
                launch_source: "heuristic".into(),
                tuning_identity: "t".into(),
                params: crate::abi::params(KernelKind::Prefill(PrefillMode::Token))
                    .iter()
                    .map(|&(name, param)| ManifestParam {
                        name: name.into(),
                        param,
                    })
                    .collect(),
            }],
            layers: vec![],
            bindings: Some("bindings.rs".into()),
            resources: "resources.txt".into(),
            layout: LAYOUT.into(),
        }
    }

    #[test]
    fn round_trips() {
        let m = sample();
        let text = m.to_json().unwrap();
        let back = Manifest::parse(Path::new("m.json"), text.as_bytes()).unwrap();
        assert_eq!(back, m);
        assert_eq!(
            back.kernels[0].kernel_kind(),
            Some(KernelKind::Prefill(PrefillMode::Token))
        );
    }

    #[test]
    fn other_formats_and_versions_are_refused_clearly() {
        let p = Path::new("art/manifest.json");
        let mut v: serde_json::Value = serde_json::from_str(&sample().to_json().unwrap()).unwrap();
        v["version"] = 1.into();
        let e = Manifest::parse(p, v.to_string().as_bytes())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("art/manifest.json") && e.contains("version 1"),
            "{e}"
        );
        assert!(e.contains("recompile"), "{e}");
        v.as_object_mut().unwrap().remove("version");
        let e = Manifest::parse(p, v.to_string().as_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains("no \"version\" field"), "{e}");
        v["version"] = VERSION.into();
        v["format"] = "safetensors".into();
        let e = Manifest::parse(p, v.to_string().as_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"safetensors\" is not a moac artifact"), "{e}");
        let e = Manifest::parse(
            p,
            b"{\"format\": \"moac-artifact\", \"version\": 2,\n \"kernels\": 3}",
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("art/manifest.json:"), "{e}");
    }
}
