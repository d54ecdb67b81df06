//! The IR between a plan and CUDA text: one [`KernelSpec`] per kernel.
//!
//! Lowering is pure: the same plan and options always give the same specs, in the same
//! order, with the same names. A kernel's name (and so its source) depends only on what
//! it computes, never on which layers use it: layers whose rules are identical share one
//! kernel, and changing one layer's rules changes exactly that layer's kernels.

//!
//! - this module: the vocabulary ([`KernelKind`], [`PrefillMode`]) and [`KernelSpec`];
//! - [`launch`]: launch configurations, device properties, the heuristic and the tuner's
//!   candidates;
//! - [`lower`]: `ValidPlan` -> [`Lowered`] (every launch default resolved here, so the
//!   templates only fill values in).

pub mod launch;
pub mod lower;

pub use launch::{DeviceProps, LaunchConfig, LaunchSource};
pub use lower::{check_supported, lower, typical_kv_slots, LowerOptions};

use crate::error::Error;
use crate::geometry::{CacheGeometry, Dtype};
use crate::plan::{hex, HeadRule};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// Head dims the kernel templates are built and tested for.
pub const SUPPORTED_HEAD_DIMS: [usize; 2] = [64, 128];

/// Largest group size (query heads per KV head) the kernels support.
pub const MAX_GROUP: usize = 16;

/// Most query heads one decode CTA runs (their queries and accumulators live in
/// registers); larger groups are split over sibling CTAs that read the same keys.
pub const MAX_HEADS_PER_CTA: usize = 8;

/// Which prefill mask (semantics section 3).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize,
)]
pub enum PrefillMode {
    /// Block-sparse sink + band of 64-token blocks, as MoA's own kernels compute.
    #[default]
    #[serde(rename = "moa-block64")]
    Block64,
    /// The decode rule applied to every query position.
    #[serde(rename = "token")]
    Token,
}

impl std::str::FromStr for PrefillMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        PrefillMode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                Error::Usage(format!("unknown prefill mode {s:?} (moa-block64 or token)"))
            })
    }
}

impl PrefillMode {
    pub const ALL: [PrefillMode; 2] = [PrefillMode::Block64, PrefillMode::Token];

    /// The command-line and manifest spelling: `moa-block64`, `token`.
    pub fn name(self) -> &'static str {
        match self {
            PrefillMode::Block64 => "moa-block64",
            PrefillMode::Token => "token",
        }
    }

    pub fn template_name(self) -> &'static str {
        match self {
            PrefillMode::Block64 => "block64",
            PrefillMode::Token => "token",
        }
    }
}

/// Test-only: a deliberate bug planted in the generated source, so tests can prove that
/// verification catches a wrong window. Never set in a real build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PlantedBug {
    /// Decode: every query head's ring is one token shorter than its window.
    DecodeWindowOffByOne,
}

impl PlantedBug {
    pub fn name(self) -> &'static str {
        match self {
            PlantedBug::DecodeWindowOffByOne => "decode_window_off_by_one",
        }
    }
}

/// Kernel families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelKind {
    Decode,
    Merge,
    Append,
    Fill,
    Prefill(PrefillMode),
}

impl KernelKind {
    /// Every kind a layer runs, in the order of [`LayerKernels`].
    pub const ALL: [KernelKind; 6] = [
        KernelKind::Decode,
        KernelKind::Merge,
        KernelKind::Append,
        KernelKind::Fill,
        KernelKind::Prefill(PrefillMode::Block64),
        KernelKind::Prefill(PrefillMode::Token),
    ];

    /// The kind of a slug ([`KernelKind::slug`]): `decode`, `prefill_token`, ...
    pub fn from_slug(slug: &str) -> Option<KernelKind> {
        KernelKind::ALL.into_iter().find(|k| k.slug() == slug)
    }

    /// The manifest's `kind` string.
    pub fn name(self) -> &'static str {
        match self {
            KernelKind::Decode => "decode",
            KernelKind::Merge => "merge",
            KernelKind::Append => "append",
            KernelKind::Fill => "fill",
            KernelKind::Prefill(_) => "prefill",
        }
    }
    /// The template that renders this kind.
    pub fn template(self) -> &'static str {
        match self {
            KernelKind::Decode => "decode.cu.tera",
            KernelKind::Merge => "merge.cu.tera",
            KernelKind::Append => "append.cu.tera",
            KernelKind::Fill => "fill.cu.tera",
            KernelKind::Prefill(_) => "prefill.cu.tera",
        }
    }
    /// Part of the kernel name: `decode`, `prefill_block64`, ...
    pub fn slug(self) -> String {
        match self {
            KernelKind::Prefill(m) => format!("prefill_{}", m.template_name()),
            k => k.name().to_string(),
        }
    }
}

/// Everything that determines one kernel's source.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KernelSpec {
    /// Deterministic, filename-safe: `moac_<kind>_<dtype>_d<D>_g<G>_<16 hex>`
    /// ([`KernelSpec::derive_name`]).
    pub name: String,
    pub kind: KernelKind,
    pub dtype: Dtype,
    pub head_dim: usize,
    pub num_query_heads: usize,
    pub num_kv_heads: usize,
    pub sink: u64,
    pub min_capacity: u64,
    pub granularity: u64,
    /// (alpha, beta) of every query head of the layer(s), baked into the source. Empty
    /// for `merge`, which does not depend on the rules.
    pub heads: Vec<HeadRule>,
    /// `Some(N)`: capacities and offsets are compile-time constants for this N.
    pub fixed_n: Option<u64>,
    pub launch: LaunchConfig,
    /// Where `launch` came from (not part of the kernel's identity).
    #[serde(skip)]
    pub launch_source: LaunchSource,
    /// Test-only deliberate bug (None in every real build).
    pub planted_bug: Option<PlantedBug>,
    /// Layers this kernel serves (not part of its identity).
    pub layers: Vec<usize>,
}

impl KernelSpec {
    /// What a tuning result is keyed by: everything the kernel computes except its launch
    /// configuration (the thing being tuned).
    pub fn tuning_identity(&self) -> String {
        let mut probe = self.clone();
        probe.launch = LaunchConfig::UNSET;
        format!("{}_{}", self.kind.slug(), probe.identity_hash())
    }

    /// The kernel's name, readable in a profiler: kind, dtype, head_dim and group size,
    /// then a hash of everything it computes (`moac_decode_f16_d128_g4_<16 hex>`).
    pub fn derive_name(&self) -> String {
        format!(
            "moac_{}_{}_d{}_g{}_{}",
            self.kind.slug(),
            self.dtype.name(),
            self.head_dim,
            self.group_size(),
            self.identity_hash()
        )
    }

    /// Hash of everything but `name` and `layers`.
    fn identity_hash(&self) -> String {
        #[derive(Serialize)]
        struct Identity<'a> {
            kind: KernelKind,
            dtype: Dtype,
            head_dim: usize,
            num_query_heads: usize,
            num_kv_heads: usize,
            sink: u64,
            min_capacity: u64,
            granularity: u64,
            heads: Vec<(u64, u64)>,
            fixed_n: Option<u64>,
            launch: &'a LaunchConfig,
            #[serde(skip_serializing_if = "Option::is_none")]
            planted_bug: Option<PlantedBug>,
        }
        let id = Identity {
            kind: self.kind,
            dtype: self.dtype,
            head_dim: self.head_dim,
            num_query_heads: self.num_query_heads,
            num_kv_heads: self.num_kv_heads,
            sink: self.sink,
            min_capacity: self.min_capacity,
            granularity: self.granularity,
            heads: self.heads.iter().map(|r| r.key()).collect(),
            fixed_n: self.fixed_n,
            launch: &self.launch,
            planted_bug: self.planted_bug,
        };
        let bytes = serde_json::to_vec(&id).unwrap_or_default();
        hex(&Sha256::digest(&bytes))[..16].to_string()
    }

    pub fn group_size(&self) -> usize {
        self.num_query_heads / self.num_kv_heads
    }
}

/// The kernels of one layer, by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct LayerKernels {
    pub layer: usize,
    pub decode: String,
    pub merge: String,
    pub append: String,
    pub fill: String,
    pub prefill_block64: String,
    pub prefill_token: String,
}

impl LayerKernels {
    /// The name of the layer's kernel of `kind`.
    pub fn kernel(&self, kind: KernelKind) -> &String {
        match kind {
            KernelKind::Decode => &self.decode,
            KernelKind::Merge => &self.merge,
            KernelKind::Append => &self.append,
            KernelKind::Fill => &self.fill,
            KernelKind::Prefill(PrefillMode::Block64) => &self.prefill_block64,
            KernelKind::Prefill(PrefillMode::Token) => &self.prefill_token,
        }
    }
}

/// A lowered plan: every distinct kernel once, and which kernels each layer uses.
#[derive(Debug, Clone, PartialEq)]
pub struct Lowered {
    pub kernels: Vec<KernelSpec>,
    pub layers: Vec<LayerKernels>,
    pub geometry: Option<CacheGeometry>,
}
