//! CUDA source from kernel specs. Rust decides every value; the tera templates under
//! `templates/` only lay out code. Templates are compiled into the binary.

use crate::error::{Error, Result};
use crate::geometry::{Dtype, LayerGeometry};
use crate::ir::KernelSpec;
use crate::plan::Settings;
use sha2::Digest;
use std::sync::OnceLock;

/// Every template, by the name templates include each other with.
pub const TEMPLATES: [(&str, &str); 10] = [
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
    (
        "ops.cu.tera",
        include_str!("../../../templates/ops.cu.tera"),
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

/// Bytes of `__constant__` tables one translation unit may hold. The constant bank the
/// tables live in (`cmem[3]`) has 64 KiB; the rest is headroom for what NVVM puts there
/// itself. Kernels of one kind are split over several units where one would not fit.
pub const CONST_TABLE_BUDGET: usize = 48 * 1024;

/// Options of emitting translation units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmitOptions {
    /// Most bytes of rule tables one unit may hold ([`CONST_TABLE_BUDGET`]).
    pub const_budget: usize,
}

impl Default for EmitOptions {
    fn default() -> Self {
        EmitOptions {
            const_budget: CONST_TABLE_BUDGET,
        }
    }
}

/// The distinct (alpha, beta) rules of some kernels, in first-seen order, and each
/// kernel's rule index per query head. Plans repeat a few rules over thousands of heads
/// (MoA's optimizer picks from a grid), so a unit keeps one dictionary of doubles and a
/// small index per head instead of two doubles per head.
fn rule_dictionary(specs: &[KernelSpec]) -> (Vec<(f64, f64)>, Vec<Vec<usize>>) {
    let mut rules: Vec<(f64, f64)> = Vec::new();
    let mut index: std::collections::HashMap<(u64, u64), usize> = Default::default();
    let rows = specs
        .iter()
        .map(|spec| {
            spec.heads
                .iter()
                .map(|r| {
                    *index.entry(r.key()).or_insert_with(|| {
                        rules.push((r.alpha, r.beta));
                        rules.len() - 1
                    })
                })
                .collect()
        })
        .collect();
    (rules, rows)
}

/// The C type of a rule index for `n` distinct rules, and its size in bytes.
fn index_type(n: usize) -> (&'static str, usize) {
    if n <= 256 {
        ("unsigned char", 1)
    } else if n <= 65536 {
        ("unsigned short", 2)
    } else {
        ("int", 4)
    }
}

/// Bytes of the `__constant__` tables of a unit holding `specs` (all of one kind and
/// shape): in a build specialized to one N, per kernel every KV head's capacity (int)
/// and offset (long long), the total (long long) and every query head's ring length
/// (int); else the rule dictionary (two doubles a rule) and the index table.
pub fn table_bytes(specs: &[KernelSpec]) -> usize {
    let Some(first) = specs.first() else { return 0 };
    if first.fixed_n.is_some() {
        return specs.len() * (12 * first.num_kv_heads + 8 + 4 * first.num_query_heads);
    }
    let (rules, _) = rule_dictionary(specs);
    dictionary_bytes(rules.len(), specs.len(), first.num_query_heads)
}

/// Bytes of a rule dictionary of `rules` distinct rules (two doubles each) and the index
/// table of `kernels` kernels of `heads` query heads.
fn dictionary_bytes(rules: usize, kernels: usize, heads: usize) -> usize {
    16 * rules + index_type(rules).1 * kernels * heads
}

/// The baked geometry of one kernel in a build specialized to one N, a row of its unit's
/// tables (from [`LayerGeometry::of`], the one place it is computed): every KV head's
/// capacity and offset, the slot total, and every query head's ring length.
fn fixed_row(spec: &KernelSpec) -> serde_json::Value {
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

pub(crate) fn render(name: &str, what: &str, ctx: &tera::Context) -> Result<String> {
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
    let (rules, rows) = rule_dictionary(specs);
    let kernels: Vec<serde_json::Value> = specs
        .iter()
        .zip(&rows)
        .map(|(spec, row)| {
            let mut k = fixed_row(spec);
            if let Some(obj) = k.as_object_mut() {
                obj.insert("rule_of".into(), row.clone().into());
            }
            k
        })
        .collect();
    let mut ctx = context(first);
    ctx.insert("kernels", &kernels);
    ctx.insert(
        "rule_alphas",
        &rules.iter().map(|r| c_double(r.0)).collect::<Vec<_>>(),
    );
    ctx.insert(
        "rule_betas",
        &rules.iter().map(|r| c_double(r.1)).collect::<Vec<_>>(),
    );
    ctx.insert("rule_index_type", index_type(rules.len()).0);
    ctx.insert("entry", entry);
    render(first.kind.template(), entry, &ctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_tables_share_rules_and_split_by_budget() {
        use crate::plan::synthetic::{synthetic, Rules};
        use crate::plan::ModelShape;
        let shape = |num_layers, num_query_heads| ModelShape {
            num_layers,
            num_query_heads,
            num_kv_heads: 8,
            head_dim: 128,
        };
        let decode = |low: &crate::ir::Lowered| -> Vec<KernelSpec> {
            low.kernels
                .iter()
                .filter(|k| k.kind == crate::ir::KernelKind::Decode)
                .cloned()
                .collect()
        };
        // A 405B-shaped plan from MoA's grid: one dictionary of at most 40 rules and a
        // byte per head, far within the budget: one unit per kind.
        let grid = synthetic("grid", shape(126, 128), Rules::Grid, 3).unwrap();
        let low = crate::ir::lower(&grid, &Default::default()).unwrap();
        let bytes = table_bytes(&decode(&low));
        assert!(bytes <= 40 * 16 + 126 * 128, "{bytes}");
        let units = emit_units(&low).unwrap();
        assert_eq!(
            units
                .iter()
                .filter(|u| u.name.starts_with("moac_decode_"))
                .count(),
            1
        );
        // Every head its own rule: split into units within a small budget, each kernel
        // in exactly one unit, in name order.
        let distinct = synthetic("distinct", shape(10, 16), Rules::AllDistinct, 1).unwrap();
        let low = crate::ir::lower(&distinct, &Default::default()).unwrap();
        assert_eq!(table_bytes(&decode(&low)), 160 * 16 + 160);
        let units = emit_units_with(&low, &EmitOptions { const_budget: 1000 }).unwrap();
        let dec: Vec<&SourceUnit> = units
            .iter()
            .filter(|u| u.name.starts_with("moac_decode_"))
            .collect();
        assert!(dec.len() >= 3, "{}", dec.len());
        let mut seen: Vec<&String> = Vec::new();
        for u in &dec {
            let specs: Vec<KernelSpec> = decode(&low)
                .into_iter()
                .filter(|k| u.kernels.contains(&k.name))
                .collect();
            assert!(table_bytes(&specs) <= 1000);
            assert!(u.kernels.windows(2).all(|w| w[0] < w[1]));
            seen.extend(&u.kernels);
        }
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 10);
        // A budget below one kernel's tables is an error that names the kernel.
        let e = emit_units_with(&low, &EmitOptions { const_budget: 10 })
            .unwrap_err()
            .to_string();
        assert!(e.contains("moac_") && e.contains("constant memory"), "{e}");
    }

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
/// once however many distinct layers the plan has; split where the rule tables would
/// pass the constant budget ([`EmitOptions::const_budget`]).
pub fn emit_units(lowered: &crate::ir::Lowered) -> Result<Vec<SourceUnit>> {
    emit_units_with(lowered, &EmitOptions::default())
}

/// [`emit_units`] with explicit options.
pub fn emit_units_with(
    lowered: &crate::ir::Lowered,
    opts: &EmitOptions,
) -> Result<Vec<SourceUnit>> {
    let mut groups: Vec<(String, Vec<KernelSpec>)> = Vec::new();
    for spec in &lowered.kernels {
        let key = unit_key(spec);
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, g)) => g.push(spec.clone()),
            None => groups.push((key, vec![spec.clone()])),
        }
    }
    let mut units = Vec::new();
    for (_, mut specs) in groups {
        specs.sort_by(|a, b| a.name.cmp(&b.name));
        for chunk in split_by_budget(specs, opts.const_budget)? {
            units.push(unit(chunk)?);
        }
    }
    Ok(units)
}

/// Kernels (in name order) cut into consecutive runs whose tables fit `budget` bytes
/// ([`table_bytes`], kept up to date kernel by kernel).
fn split_by_budget(specs: Vec<KernelSpec>, budget: usize) -> Result<Vec<Vec<KernelSpec>>> {
    let mut out: Vec<Vec<KernelSpec>> = Vec::new();
    let mut current: Vec<KernelSpec> = Vec::new();
    let mut rules: std::collections::HashSet<(u64, u64)> = Default::default();
    for spec in specs {
        let bytes =
            |current: &[KernelSpec], rules: &std::collections::HashSet<(u64, u64)>| match current
                .first()
            {
                Some(f) if f.fixed_n.is_some() => table_bytes(current),
                Some(f) => dictionary_bytes(rules.len(), current.len(), f.num_query_heads),
                None => 0,
            };
        let mut with: std::collections::HashSet<(u64, u64)> = rules.clone();
        with.extend(spec.heads.iter().map(|r| r.key()));
        current.push(spec);
        if bytes(&current, &with) <= budget {
            rules = with;
            continue;
        }
        let spec = current
            .pop()
            .ok_or_else(|| Error::Internal("empty unit".into()))?;
        let alone: std::collections::HashSet<(u64, u64)> =
            spec.heads.iter().map(|r| r.key()).collect();
        if bytes(std::slice::from_ref(&spec), &alone) > budget {
            return Err(Error::Unsupported(format!(
                "{}: one kernel's rule tables take {} bytes, more than the {budget} bytes of constant memory a unit may use",
                spec.name,
                table_bytes(std::slice::from_ref(&spec))
            )));
        }
        out.push(std::mem::take(&mut current));
        current.push(spec);
        rules = alone;
    }
    if !current.is_empty() {
        out.push(current);
    }
    Ok(out)
}
