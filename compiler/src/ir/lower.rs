//! Lowering: a [`ValidPlan`] to the [`KernelSpec`]s of its layers. Pure: the same plan
//! and options always give the same specs, in the same order, with the same names. Every
//! launch default is resolved here ([`LaunchConfig::resolved`]).

use super::launch::{DeviceProps, LaunchConfig, LaunchSource};
use super::{KernelKind, KernelSpec, LayerKernels, Lowered, PlantedBug, PrefillMode};
use super::{MAX_GROUP, SUPPORTED_HEAD_DIMS};
use crate::error::{Error, Result};
use crate::geometry::{CacheGeometry, Dtype};
use crate::plan::{HeadRule, ValidPlan};
use std::collections::BTreeMap;

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
        let group = spec.group_size();
        if let Some(&c) = opts.launch_overrides.get(&spec.kind.slug()) {
            return (c.resolved(spec.kind, group), LaunchSource::Override);
        }
        if let Some(&c) = opts.tuned.get(&spec.tuning_identity()) {
            return (c.resolved(spec.kind, group), LaunchSource::Database);
        }
        let h =
            LaunchConfig::heuristic(spec.kind, m.head_dim, m.num_kv_heads, kv_slots, opts.device);
        (h.resolved(spec.kind, group), LaunchSource::Heuristic)
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
        spec.name = spec.derive_name();
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
            assert!(k
                .name
                .starts_with(&format!("moac_{}_f16_d128_g1_", k.kind.slug())));
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
