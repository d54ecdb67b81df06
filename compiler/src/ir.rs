//! The IR between a plan and CUDA text: one [`KernelSpec`] per kernel.
//!
//! Lowering is pure: the same plan and options always give the same specs, in the same
//! order, with the same names. A kernel's name (and so its source) depends only on what
//! it computes, never on which layers use it: layers whose rules are identical share one
//! kernel, and changing one layer's rules changes exactly that layer's kernels.

use crate::error::{Error, Result};
use crate::geometry::{CacheGeometry, Dtype};
use crate::plan::{hex, HeadRule, ValidPlan};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// Head dims the kernel templates are built and tested for.
pub const SUPPORTED_HEAD_DIMS: [usize; 2] = [64, 128];

/// Largest group size the decode kernel keeps in registers.
pub const MAX_GROUP: usize = 8;

/// Which prefill mask (semantics section 3).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
pub enum PrefillMode {
    /// Block-sparse sink + band of 64-token blocks, as MoA's own kernels compute.
    #[value(name = "moa-block64")]
    #[serde(rename = "moa-block64")]
    Block64,
    /// The decode rule applied to every query position.
    #[value(name = "token")]
    #[serde(rename = "token")]
    Token,
}

impl PrefillMode {
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

/// Launch configuration of one kernel. Which fields matter depends on the kind; the
/// others keep their defaults so that specs compare and hash predictably.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
pub struct LaunchConfig {
    /// Threads per block.
    pub threads: u32,
    /// decode: KV slots per split (CTA).
    pub chunk: u32,
    /// fill: slots per CTA.
    pub rows: u32,
    /// prefill: queries per CTA.
    pub block_q: u32,
    /// prefill: keys per shared-memory tile.
    pub block_k: u32,
    /// decode: key rows each row group loads ahead per iteration (tokens in flight =
    /// threads / lanes per row x unroll); 0: chosen from the group size (4 for G <= 2,
    /// else 2). Left out of the serialized form when 0, so configurations without it
    /// keep their names.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unroll: u32,
    /// decode: query heads of a group each CTA runs (a divisor of the group size; the
    /// group's other heads go to sibling CTAs that read the same keys). 0: the whole
    /// group. Left out of the serialized form when 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub heads_per_cta: u32,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// What the default launch heuristic knows of the target GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct DeviceProps {
    /// Streaming multiprocessors.
    pub sm_count: u32,
    /// Static shared memory one block may use, bytes (48 KiB on every arch moac targets).
    pub static_shared_per_block: u32,
}

impl DeviceProps {
    /// A GPU with `sm_count` SMs and the 48 KiB of static shared memory per block every
    /// arch moac targets has.
    pub fn with_sm_count(sm_count: u32) -> DeviceProps {
        DeviceProps {
            sm_count,
            static_shared_per_block: 48 * 1024,
        }
    }

    /// The figures of an arch's data-center part, for compiling without the GPU at hand:
    /// sm_80 A100 (108 SMs), sm_86 A10 (72), sm_89 L40S (142), sm_90 H100/H200 (132),
    /// sm_100 B200 (148), sm_120 RTX PRO 6000 (188). `None` for an arch not listed.
    pub fn for_arch(arch: &str) -> Option<DeviceProps> {
        let sm_count = match arch {
            "sm_80" => 108,
            "sm_86" => 72,
            "sm_89" => 142,
            "sm_90" | "sm_90a" => 132,
            "sm_100" | "sm_100a" => 148,
            "sm_120" | "sm_120a" => 188,
            _ => return None,
        };
        Some(DeviceProps::with_sm_count(sm_count))
    }
}

/// Where a kernel's launch configuration came from (recorded in the manifest).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LaunchSource {
    /// The default heuristic (from the device's properties when known).
    #[default]
    Heuristic,
    /// The winner of a tuning database entry for this kernel.
    Database,
    /// Set explicitly for every kernel of its kind (`LowerOptions::launch_overrides`).
    Override,
}

impl LaunchSource {
    pub fn name(self) -> &'static str {
        match self {
            LaunchSource::Heuristic => "heuristic",
            LaunchSource::Database => "database",
            LaunchSource::Override => "override",
        }
    }
}

impl LaunchConfig {
    /// The default heuristic for a kind on a device: `kv_slots` is a typical KV-head
    /// capacity of the kernel (the decode split is sized so that one sequence alone gives
    /// the device two CTAs per SM), and the prefill tiles are the largest that fit the
    /// device's static shared memory. Without a device, [`LaunchConfig::default_for`].
    pub fn heuristic(
        kind: KernelKind,
        head_dim: usize,
        num_kv_heads: usize,
        kv_slots: u64,
        dev: Option<DeviceProps>,
    ) -> Self {
        let base = LaunchConfig::default_for(kind, head_dim);
        let Some(dev) = dev else { return base };
        match kind {
            KernelKind::Decode => {
                let want_ctas = 2 * dev.sm_count as u64;
                let chunk = [1024u32, 512, 256, 128]
                    .into_iter()
                    .find(|&c| kv_slots.div_ceil(c as u64) * num_kv_heads as u64 >= want_ctas)
                    .unwrap_or(128);
                LaunchConfig { chunk, ..base }
            }
            KernelKind::Prefill(_) => {
                let row = (head_dim as u32 / 8 + 1) * 16;
                let (block_q, block_k) = [(64, 64), (64, 32), (32, 32), (16, 16)]
                    .into_iter()
                    .find(|&(q, k)| (q + k) * row <= dev.static_shared_per_block)
                    .unwrap_or((16, 16));
                LaunchConfig {
                    block_q,
                    block_k,
                    threads: base.threads.min(block_q * 8),
                    ..base
                }
            }
            _ => base,
        }
    }

    /// The default heuristic for each kind with nothing known of the device.
    pub fn default_for(kind: KernelKind, head_dim: usize) -> Self {
        let base = LaunchConfig {
            threads: 128,
            chunk: 0,
            rows: 0,
            block_q: 0,
            block_k: 0,
            unroll: 0,
            heads_per_cta: 0,
        };
        match kind {
            KernelKind::Decode => LaunchConfig { chunk: 256, ..base },
            KernelKind::Merge => LaunchConfig {
                threads: head_dim as u32,
                ..base
            },
            KernelKind::Append => LaunchConfig {
                threads: (head_dim / 8).max(32) as u32,
                ..base
            },
            KernelKind::Fill => LaunchConfig { rows: 64, ..base },
            KernelKind::Prefill(_) => LaunchConfig {
                threads: 128,
                block_q: 64,
                block_k: 64,
                ..base
            },
        }
    }
}

/// Everything that determines one kernel's source.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KernelSpec {
    /// Deterministic, filename-safe: `moac_<kind>_<16 hex>`.
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
        probe.launch = LaunchConfig {
            threads: 0,
            chunk: 0,
            rows: 0,
            block_q: 0,
            block_k: 0,
            unroll: 0,
            heads_per_cta: 0,
        };
        format!("{}_{}", self.kind.slug(), probe.identity_hash())
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

/// Options of a lowering.
#[derive(Debug, Clone, PartialEq)]
pub struct LowerOptions {
    pub dtype: Dtype,
    /// Specialize to one (prompt_len, max_new_tokens).
    pub fixed: Option<(u64, u64)>,
    /// Only these layers (all when `None`).
    pub layers: Option<Vec<usize>>,
    /// Launch configurations set for every kernel of a kind, keyed by kind slug
    /// (`decode`, `prefill_token`, ...): the tuner's candidates.
    pub launch_overrides: BTreeMap<String, LaunchConfig>,
    /// Launch configurations of single kernels, keyed by tuning identity
    /// ([`KernelSpec::tuning_identity`]): a tuning database's winners, or an artifact's
    /// recorded configurations.
    pub tuned: BTreeMap<String, LaunchConfig>,
    /// The GPU the default heuristic sizes launches for (none: arch-independent defaults).
    pub device: Option<DeviceProps>,
    /// Test-only: plant a bug (see [`PlantedBug`]).
    pub planted_bug: Option<PlantedBug>,
}

impl Default for LowerOptions {
    fn default() -> Self {
        LowerOptions {
            dtype: Dtype::F16,
            fixed: None,
            layers: None,
            launch_overrides: BTreeMap::new(),
            tuned: BTreeMap::new(),
            device: None,
            planted_bug: None,
        }
    }
}

/// The kernels of one layer, by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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

/// Checks that the kernels can be generated for this plan at all.
pub fn check_supported(plan: &ValidPlan) -> Result<()> {
    let m = plan.model();
    let s = plan.settings();
    if !SUPPORTED_HEAD_DIMS.contains(&m.head_dim) {
        return Err(Error::Unsupported(format!(
            "{}: head_dim {} is not supported by the kernels (supported: {:?})",
            plan.source().display(),
            m.head_dim,
            SUPPORTED_HEAD_DIMS
        )));
    }
    if m.group_size() > MAX_GROUP {
        return Err(Error::Unsupported(format!(
            "{}: {} query heads per KV head; the decode kernel supports groups up to {MAX_GROUP}",
            plan.source().display(),
            m.group_size()
        )));
    }
    if !s.sink.is_multiple_of(64) || !s.granularity.is_multiple_of(64) {
        return Err(Error::Unsupported(format!(
            "{}: the kernels need sink and granularity to be multiples of 64 (64-token blocks), got sink {} and granularity {}",
            plan.source().display(),
            s.sink,
            s.granularity
        )));
    }
    Ok(())
}

/// Lowers a plan to kernel specs.
pub fn lower(plan: &ValidPlan, opts: &LowerOptions) -> Result<Lowered> {
    check_supported(plan)?;
    let m = plan.model();
    let s = plan.settings();
    let layers: Vec<usize> = match &opts.layers {
        Some(ls) => {
            for &l in ls {
                if l >= plan.num_layers() {
                    return Err(Error::Usage(format!(
                        "layer {l} does not exist: {} has {} layers",
                        plan.source().display(),
                        plan.num_layers()
                    )));
                }
            }
            let mut ls = ls.clone();
            ls.sort_unstable();
            ls.dedup();
            ls
        }
        None => (0..plan.num_layers()).collect(),
    };
    if layers.is_empty() {
        return Err(Error::Usage("no layers selected".into()));
    }
    let geometry = match opts.fixed {
        Some((p, mnt)) => Some(CacheGeometry::new(plan, p, mnt)?),
        None => None,
    };
    let fixed_n = geometry.as_ref().map(|g| g.n);
    let kv_slots = match opts.device {
        Some(_) => typical_kv_slots(plan, geometry.as_ref())?,
        None => 0,
    };
    let launch = |spec: &KernelSpec| -> (LaunchConfig, LaunchSource) {
        if let Some(&c) = opts.launch_overrides.get(&spec.kind.slug()) {
            return (c, LaunchSource::Override);
        }
        if let Some(&c) = opts.tuned.get(&spec.tuning_identity()) {
            return (c, LaunchSource::Database);
        }
        let h =
            LaunchConfig::heuristic(spec.kind, m.head_dim, m.num_kv_heads, kv_slots, opts.device);
        (h, LaunchSource::Heuristic)
    };
    let make = |kind: KernelKind, heads: Vec<HeadRule>, layer: usize| {
        let mut spec = KernelSpec {
            name: String::new(),
            kind,
            dtype: opts.dtype,
            head_dim: m.head_dim,
            num_query_heads: m.num_query_heads,
            num_kv_heads: m.num_kv_heads,
            sink: s.sink,
            min_capacity: s.min_capacity,
            granularity: s.granularity,
            heads,
            fixed_n,
            launch: LaunchConfig::default_for(kind, m.head_dim),
            launch_source: LaunchSource::Heuristic,
            planted_bug: opts.planted_bug,
            layers: vec![layer],
        };
        (spec.launch, spec.launch_source) = launch(&spec);
        spec.name = format!("moac_{}_{}", kind.slug(), spec.identity_hash());
        spec
    };
    let mut kernels: Vec<KernelSpec> = Vec::new();
    let mut index: BTreeMap<String, usize> = BTreeMap::new();
    let mut add = |spec: KernelSpec| -> String {
        let name = spec.name.clone();
        match index.get(&name) {
            Some(&i) => kernels[i].layers.extend(spec.layers),
            None => {
                index.insert(name.clone(), kernels.len());
                kernels.push(spec);
            }
        }
        name
    };
    let mut layer_kernels = Vec::new();
    for &l in &layers {
        let rules = plan.layer(l).to_vec();
        let decode = add(make(KernelKind::Decode, rules.clone(), l));
        let merge = add(make(KernelKind::Merge, Vec::new(), l));
        let append = add(make(KernelKind::Append, rules.clone(), l));
        let fill = add(make(KernelKind::Fill, rules.clone(), l));
        let prefill_block64 = add(make(
            KernelKind::Prefill(PrefillMode::Block64),
            rules.clone(),
            l,
        ));
        let prefill_token = add(make(KernelKind::Prefill(PrefillMode::Token), rules, l));
        layer_kernels.push(LayerKernels {
            layer: l,
            decode,
            merge,
            append,
            fill,
            prefill_block64,
            prefill_token,
        });
    }
    Ok(Lowered {
        kernels,
        layers: layer_kernels,
        geometry,
    })
}

/// The launch heuristic's typical KV-head capacity of a plan: the median over layers of
/// each layer's largest, at the build's N (`fixed`), else at a 4096-token prompt plus the
/// plan's M.
pub fn typical_kv_slots(plan: &ValidPlan, fixed: Option<&CacheGeometry>) -> Result<u64> {
    let g = match fixed {
        Some(g) => g.clone(),
        None => CacheGeometry::new(plan, 4096, plan.settings().max_new_tokens)?,
    };
    let mut caps: Vec<u64> = g
        .layers
        .iter()
        .map(|l| l.kv_capacity.iter().copied().max().unwrap_or(0))
        .collect();
    caps.sort_unstable();
    Ok(caps.get(caps.len() / 2).copied().unwrap_or(0))
}

/// Element type behind a pointer parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Elem {
    /// The build's dtype (f16 or bf16).
    Scalar,
    #[serde(rename = "f32")]
    Float,
    #[serde(rename = "i32")]
    Int,
}

/// Type of one kernel parameter, as passed through `cuLaunchKernel`'s `void**`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "type", content = "elem", rename_all = "snake_case")]
pub enum Param {
    ConstPtr(Elem),
    MutPtr(Elem),
    I32,
    I64,
    F32,
}

/// The parameters of each kernel kind's entry point, in order (docs/kernel-abi.md). The
/// first, `slot`, picks the kernel among those of its translation unit.
pub fn params(kind: KernelKind) -> &'static [(&'static str, Param)] {
    use Elem::{Float, Int, Scalar};
    use Param::*;
    match kind {
        KernelKind::Append => &[
            ("slot", I32),
            ("k_new", ConstPtr(Scalar)),
            ("v_new", ConstPtr(Scalar)),
            ("k_cache", MutPtr(Scalar)),
            ("v_cache", MutPtr(Scalar)),
            ("seq_lens", ConstPtr(Int)),
            ("n", I64),
            ("batch", I32),
        ],
        KernelKind::Fill => &[
            ("slot", I32),
            ("k", ConstPtr(Scalar)),
            ("v", ConstPtr(Scalar)),
            ("k_cache", MutPtr(Scalar)),
            ("v_cache", MutPtr(Scalar)),
            ("prompt_lens", ConstPtr(Int)),
            ("p_stride", I32),
            ("n", I64),
            ("batch", I32),
        ],
        KernelKind::Decode => &[
            ("slot", I32),
            ("q", ConstPtr(Scalar)),
            ("k_cache", ConstPtr(Scalar)),
            ("v_cache", ConstPtr(Scalar)),
            ("seq_lens", ConstPtr(Int)),
            ("part_o", MutPtr(Float)),
            ("part_lse", MutPtr(Float)),
            ("n", I64),
            ("batch", I32),
            ("nsplit", I32),
            ("scale", F32),
        ],
        KernelKind::Merge => &[
            ("slot", I32),
            ("part_o", ConstPtr(Float)),
            ("part_lse", ConstPtr(Float)),
            ("out", MutPtr(Scalar)),
            ("batch", I32),
            ("nsplit", I32),
        ],
        KernelKind::Prefill(_) => &[
            ("slot", I32),
            ("q", ConstPtr(Scalar)),
            ("k", ConstPtr(Scalar)),
            ("v", ConstPtr(Scalar)),
            ("o", MutPtr(Scalar)),
            ("prompt_lens", ConstPtr(Int)),
            ("p_stride", I32),
            ("n", I64),
            ("scale", F32),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{validate, ModelShape, Settings};
    use std::path::Path;

    fn plan(layers: Vec<Vec<(f64, f64)>>, kv: usize) -> ValidPlan {
        let hq = layers[0].len();
        let model = ModelShape {
            num_layers: layers.len(),
            num_query_heads: hq,
            num_kv_heads: kv,
            head_dim: 128,
        };
        let alphas: Vec<Vec<f64>> = layers
            .iter()
            .map(|l| l.iter().map(|r| r.0).collect())
            .collect();
        let betas: Vec<Vec<f64>> = layers
            .iter()
            .map(|l| l.iter().map(|r| r.1).collect())
            .collect();
        validate(
            Path::new("t.json"),
            model,
            Settings::default(),
            &alphas,
            &betas,
        )
        .unwrap()
    }

    #[test]
    fn identical_layers_share_kernels() {
        let a = vec![(0.0, 0.5), (1024.0, 0.25), (0.0, 0.5), (0.0, 0.5)];
        let b = vec![(0.0, 0.25); 4];
        let p = plan(vec![a.clone(), b, a], 2);
        let low = lower(&p, &LowerOptions::default()).unwrap();
        // Two distinct rule sets x 5 rule-dependent kernels + one merge.
        assert_eq!(low.kernels.len(), 11);
        let same_as_0 = LayerKernels {
            layer: 2,
            ..low.layers[0].clone()
        };
        assert_eq!(same_as_0, low.layers[2]);
        assert_ne!(low.layers[0].decode, low.layers[1].decode);
        assert_eq!(low.layers[0].merge, low.layers[1].merge);
        let shared = low
            .kernels
            .iter()
            .find(|k| k.name == low.layers[0].decode)
            .unwrap();
        assert_eq!(shared.layers, vec![0, 2]);
        // Deterministic.
        assert_eq!(low, lower(&p, &LowerOptions::default()).unwrap());
    }

    #[test]
    fn changing_one_head_changes_only_its_layers_kernels() {
        let rows = vec![
            vec![(0.0, 0.5); 4],
            vec![(1024.0, 0.125); 4],
            vec![(0.0, 0.5); 4],
        ];
        let p = plan(rows, 2);
        let before = lower(&p, &LowerOptions::default()).unwrap();
        let q = p
            .with_rule(
                1,
                3,
                HeadRule {
                    alpha: 2048.0,
                    beta: 0.125,
                },
            )
            .unwrap();
        let after = lower(&q, &LowerOptions::default()).unwrap();
        for (x, y) in before.layers.iter().zip(&after.layers) {
            if x.layer == 1 {
                assert_ne!(x.decode, y.decode);
                assert_ne!(x.fill, y.fill);
                assert_ne!(x.append, y.append);
                assert_ne!(x.prefill_block64, y.prefill_block64);
                assert_ne!(x.prefill_token, y.prefill_token);
                assert_eq!(x.merge, y.merge);
            } else {
                assert_eq!(x, y, "layer {} must keep its kernels", x.layer);
            }
        }
    }

    #[test]
    fn options_change_names() {
        let p = plan(vec![vec![(0.0, 0.5); 4]], 4);
        let f16 = lower(&p, &LowerOptions::default()).unwrap();
        let bf16 = lower(
            &p,
            &LowerOptions {
                dtype: Dtype::Bf16,
                ..LowerOptions::default()
            },
        )
        .unwrap();
        let fixed = lower(
            &p,
            &LowerOptions {
                fixed: Some((4096, 1024)),
                ..LowerOptions::default()
            },
        )
        .unwrap();
        assert_ne!(f16.layers[0].decode, bf16.layers[0].decode);
        assert_ne!(f16.layers[0].decode, fixed.layers[0].decode);
        assert_eq!(fixed.geometry.as_ref().unwrap().n, 5120);
        for k in &f16.kernels {
            assert!(k.name.starts_with(&format!("moac_{}_", k.kind.slug())));
            assert!(k
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_'));
        }
    }

    #[test]
    fn unsupported_inputs() {
        let mut p = plan(vec![vec![(0.0, 0.5); 4]], 2);
        assert!(lower(
            &p,
            &LowerOptions {
                layers: Some(vec![3]),
                ..LowerOptions::default()
            }
        )
        .is_err());
        let model = ModelShape {
            num_layers: 1,
            num_query_heads: 4,
            num_kv_heads: 2,
            head_dim: 80,
        };
        p = validate(
            Path::new("t.json"),
            model,
            Settings::default(),
            &[vec![0.0; 4]],
            &[vec![0.5; 4]],
        )
        .unwrap();
        let err = lower(&p, &LowerOptions::default()).unwrap_err().to_string();
        assert!(err.contains("head_dim 80"), "{err}");
    }

    #[test]
    fn heuristic_sizes_decode_splits_and_prefill_tiles_by_device() {
        let h100 = DeviceProps::for_arch("sm_90").unwrap();
        assert_eq!(h100.sm_count, 132);
        assert!(DeviceProps::for_arch("sm_75").is_none());
        let dec =
            |slots, hkv, dev| LaunchConfig::heuristic(KernelKind::Decode, 128, hkv, slots, dev);
        // No device: the arch-independent default.
        assert_eq!(
            dec(100_000, 8, None),
            LaunchConfig::default_for(KernelKind::Decode, 128)
        );
        // 8 KV heads x 100k slots: 1024-slot splits already give 8 x 98 >= 264 CTAs.
        assert_eq!(dec(100_000, 8, Some(h100)).chunk, 1024);
        // 8 x 4096 slots: 8 x 16 = 128 < 264 at 256, 8 x 32 = 256 < 264 at 128: the smallest.
        assert_eq!(dec(4096, 8, Some(h100)).chunk, 128);
        // 32 KV heads x 20k slots: 1024-slot splits give 32 x 20 = 640 CTAs.
        assert_eq!(dec(20_000, 32, Some(h100)).chunk, 1024);
        for d in [64, 128, 256] {
            let p = LaunchConfig::heuristic(
                KernelKind::Prefill(PrefillMode::Token),
                d,
                8,
                0,
                Some(h100),
            );
            let row = (d as u32 / 8 + 1) * 16;
            assert!((p.block_q + p.block_k) * row <= 48 * 1024, "d{d}: {p:?}");
            assert_eq!(p.block_q % (p.threads / 8), 0, "d{d}: {p:?}");
        }
        assert_eq!(
            LaunchConfig::heuristic(
                KernelKind::Prefill(PrefillMode::Token),
                256,
                8,
                0,
                Some(h100)
            )
            .block_q,
            32
        );
    }

    #[test]
    fn tuned_configurations_apply_per_kernel_and_say_so() {
        let p = plan(vec![vec![(0.0, 0.5); 4], vec![(64.0, 0.25); 4]], 2);
        let base = lower(&p, &LowerOptions::default()).unwrap();
        let d0 = base
            .kernels
            .iter()
            .find(|k| k.name == base.layers[0].decode)
            .unwrap();
        assert_eq!(d0.launch_source, LaunchSource::Heuristic);
        let tuned_cfg = LaunchConfig {
            chunk: 512,
            unroll: 4,
            ..d0.launch
        };
        let opts = LowerOptions {
            tuned: [(d0.tuning_identity(), tuned_cfg)].into_iter().collect(),
            ..LowerOptions::default()
        };
        let low = lower(&p, &opts).unwrap();
        for k in &low.kernels {
            let was = base
                .kernels
                .iter()
                .find(|b| b.tuning_identity() == k.tuning_identity());
            let was = was.unwrap();
            if k.tuning_identity() == d0.tuning_identity() {
                assert_eq!(k.launch, tuned_cfg);
                assert_eq!(k.launch_source, LaunchSource::Database);
                assert_ne!(k.name, was.name, "a new configuration is a new kernel");
            } else {
                assert_eq!(k.launch_source, LaunchSource::Heuristic);
                assert_eq!(k.name, was.name, "other kernels keep their names");
            }
        }
        // An explicit per-kind override wins over the database.
        let mut o2 = opts.clone();
        o2.launch_overrides.insert(
            "decode".into(),
            LaunchConfig::default_for(KernelKind::Decode, 128),
        );
        let low2 = lower(&p, &o2).unwrap();
        assert!(low2
            .kernels
            .iter()
            .filter(|k| k.kind == KernelKind::Decode)
            .all(|k| k.launch_source == LaunchSource::Override));
    }
}
