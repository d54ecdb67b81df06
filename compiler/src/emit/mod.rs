//! CUDA source from kernel specs. Rust decides every value; the tera templates under
//! `templates/` only lay out code. Templates are compiled into the binary.

use crate::error::{Error, Result};
use crate::geometry::{Dtype, LayerGeometry};
use crate::ir::KernelSpec;
use crate::plan::Settings;
use sha2::Digest;
use std::sync::OnceLock;

/// Every template, by the name templates include each other with.
pub const TEMPLATES: [(&str, &str); 9] = [
    (
        "moac_common.cuh",
        include_str!("../../../templates/moac_common.cuh"),
    ),
    (
        "prelude.cuh.tera",
        include_str!("../../../templates/prelude.cuh.tera"),
    ),
    (
        "geometry.cuh.tera",
        include_str!("../../../templates/geometry.cuh.tera"),
    ),
    (
        "select.cuh.tera",
        include_str!("../../../templates/select.cuh.tera"),
    ),
    (
        "decode.cu.tera",
        include_str!("../../../templates/decode.cu.tera"),
    ),
    (
        "merge.cu.tera",
        include_str!("../../../templates/merge.cu.tera"),
    ),
    (
        "append.cu.tera",
        include_str!("../../../templates/append.cu.tera"),
    ),
    (
        "fill.cu.tera",
        include_str!("../../../templates/fill.cu.tera"),
    ),
    (
        "prefill.cu.tera",
        include_str!("../../../templates/prefill.cu.tera"),
    ),
];

fn engine() -> Result<&'static tera::Tera> {
    static ENGINE: OnceLock<std::result::Result<tera::Tera, String>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let mut t = tera::Tera::default();
            t.add_raw_templates(TEMPLATES.to_vec())
                .map_err(|e| describe(&e))?;
            Ok(t)
        })
        .as_ref()
        .map_err(|message| Error::Template {
            name: "templates/".into(),
            message: message.clone(),
        })
}

/// A tera error with its whole chain of causes.
fn describe(e: &tera::Error) -> String {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

/// A finite f64 as a C double literal that reads back to the same value.
pub fn c_double(v: f64) -> String {
    let s = format!("{v:?}");
    if s.contains('.') || s.contains('e') || s.contains("inf") || s.contains("NaN") {
        s
    } else {
        format!("{s}.0")
    }
}

fn scalar(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F16 => "__half",
        Dtype::Bf16 => "__nv_bfloat16",
    }
}

/// The baked rules of one kernel, a row of its unit's tables: (alpha, beta) of every
/// query head as C double literals, or, in a build specialized to one N, the layer's
/// geometry itself (from [`LayerGeometry::of`], the one place it is computed): every KV
/// head's capacity and offset, the slot total, and every query head's ring length.
fn rules_row(spec: &KernelSpec) -> serde_json::Value {
    let fixed = spec.fixed_n.map(|n| {
        let settings = Settings {
            sink: spec.sink,
            min_capacity: spec.min_capacity,
            granularity: spec.granularity,
            max_new_tokens: 0,
        };
        LayerGeometry::of(&spec.heads, n, &settings, spec.group_size())
    });
    let empty = Vec::new();
    serde_json::json!({
        "name": spec.name,
        "alphas": spec.heads.iter().map(|r| c_double(r.alpha)).collect::<Vec<_>>(),
        "betas": spec.heads.iter().map(|r| c_double(r.beta)).collect::<Vec<_>>(),
        "kv_caps": fixed.as_ref().map(|g| &g.kv_capacity).unwrap_or(&empty),
        "kv_offs": fixed.as_ref().map(|g| &g.kv_offset).unwrap_or(&empty),
        "total": fixed.as_ref().map(|g| g.total_slots).unwrap_or(0),
        "local_q": fixed
            .as_ref()
            .map(|g| g.query_capacity.iter().map(|&c| c - spec.sink).collect::<Vec<_>>())
            .unwrap_or_default(),
    })
}

/// The template context of one kernel.
pub fn context(spec: &KernelSpec) -> tera::Context {
    let mut ctx = tera::Context::new();
    ctx.insert(
        "planted_bug",
        spec.planted_bug.map(|b| b.name()).unwrap_or(""),
    );
    ctx.insert("scalar", scalar(spec.dtype));
    ctx.insert("dtype", spec.dtype.name());
    ctx.insert("head_dim", &spec.head_dim);
    ctx.insert("num_q_heads", &spec.num_query_heads);
    ctx.insert("num_kv_heads", &spec.num_kv_heads);
    ctx.insert("group", &spec.group_size());
    ctx.insert("sink", &spec.sink);
    ctx.insert("min_capacity", &spec.min_capacity);
    ctx.insert("granularity", &spec.granularity);
    ctx.insert("fixed_n", &spec.fixed_n.unwrap_or(0));
    // The resolved launch configuration (lowering filled every default in), every field
    // present (the serialized form leaves the knobs other kinds do not use out when 0).
    let mut launch = serde_json::to_value(spec.launch).unwrap_or_default();
    if let Some(obj) = launch.as_object_mut() {
        obj.insert("unroll".into(), spec.launch.unroll.into());
        obj.insert("heads_per_cta".into(), spec.launch.heads_per_cta.into());
    }
    ctx.insert("launch", &launch);
    // The entry's parameter list and the arguments it hands its body, from the ABI table.
    ctx.insert("entry_params", &crate::abi::entry_signature(spec.kind));
    ctx.insert("body_args", &crate::abi::body_args(spec.kind));
    ctx.insert(
        "mode",
        match spec.kind {
            crate::ir::KernelKind::Prefill(m) => m.template_name(),
            _ => "",
        },
    );
    ctx
}

/// Renders one kernel alone in its own translation unit (the source of
/// [`unit`]`(&[spec])`).
pub fn emit(spec: &KernelSpec) -> Result<String> {
    Ok(unit(vec![spec.clone()])?.source)
}

fn render(name: &str, what: &str, ctx: &tera::Context) -> Result<String> {
    engine()?.render(name, ctx).map_err(|e| Error::Template {
        name: format!("{name} ({what})"),
        message: describe(&e),
    })
}

/// Renders a translation unit holding `specs` (same kind and shape; their rules differ):
/// the kind's body once, each kernel's baked geometry, and one entry point `entry` whose
/// `slot` argument picks the kernel (slot i = `specs[i]`).
fn render_unit(specs: &[KernelSpec], entry: &str) -> Result<String> {
    let first = specs
        .first()
        .ok_or_else(|| Error::Internal("a translation unit needs at least one kernel".into()))?;
    let kernels: Vec<serde_json::Value> = specs.iter().map(rules_row).collect();
    let mut ctx = context(first);
    ctx.insert("kernels", &kernels);
    ctx.insert("entry", entry);
    render(first.kind.template(), entry, &ctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_read_back() {
        for v in [0.0, 1024.0, -1024.0, 0.125, 1e300, 1.0 / 3.0, 123456789.5] {
            let s = c_double(v);
            assert_eq!(s.parse::<f64>().unwrap(), v, "{s}");
            assert!(
                s.contains('.') || s.contains('e'),
                "{s} must be a double literal"
            );
        }
    }
}

/// One translation unit: a source file with one entry point and the kernels it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceUnit {
    /// File stem and the name of the unit's single `extern "C"` entry point
    /// (filename-safe, a C identifier).
    pub name: String,
    pub source: String,
    /// The kernels the entry runs, by slot: `kernels[i]` is the kernel that slot `i`
    /// (the entry's first argument) selects.
    pub kernels: Vec<String>,
}

impl SourceUnit {
    /// The slot of `kernel` in this unit, if it holds it.
    pub fn slot(&self, kernel: &str) -> Option<usize> {
        self.kernels.iter().position(|k| k == kernel)
    }
}

/// The key that puts kernels into one translation unit: everything but their rules.
fn unit_key(spec: &KernelSpec) -> String {
    let mut probe = spec.clone();
    probe.name.clear();
    probe.heads.clear();
    probe.layers.clear();
    serde_json::to_string(&probe).unwrap_or_default()
}

/// The translation unit of `specs` (one kind and shape): kernels sorted by name (their
/// slots), named by a hash of the kernel names, so it changes exactly when its set of
/// kernels does.
pub fn unit(mut specs: Vec<KernelSpec>) -> Result<SourceUnit> {
    specs.sort_by(|a, b| a.name.cmp(&b.name));
    let first = specs
        .first()
        .ok_or_else(|| Error::Internal("a translation unit needs at least one kernel".into()))?;
    let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
    let digest = crate::plan::hex(&sha2::Sha256::digest(names.join(",").as_bytes()));
    let name = format!(
        "moac_{}_{}_d{}_g{}_unit_{}",
        first.kind.slug(),
        first.dtype.name(),
        first.head_dim,
        first.group_size(),
        &digest[..16]
    );
    Ok(SourceUnit {
        source: render_unit(&specs, &name)?,
        name,
        kernels: names,
    })
}

/// The translation units of a lowered plan: one per kernel kind (and shape), holding
/// every kernel of that kind behind one entry point, so each kind's body is compiled
/// once however many distinct layers the plan has.
pub fn emit_units(lowered: &crate::ir::Lowered) -> Result<Vec<SourceUnit>> {
    let mut groups: Vec<(String, Vec<KernelSpec>)> = Vec::new();
    for spec in &lowered.kernels {
        let key = unit_key(spec);
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, g)) => g.push(spec.clone()),
            None => groups.push((key, vec![spec.clone()])),
        }
    }
    groups.into_iter().map(|(_, specs)| unit(specs)).collect()
}
