//! `moac inspect`: what a plan costs and how its windows look, for one N.

use crate::geometry::{CacheGeometry, Dtype};
use crate::plan::ValidPlan;
use std::collections::BTreeSet;
use std::fmt::Write;

/// Machine-readable report (the `--json` shape).
pub fn report_json(plan: &ValidPlan, geo: &CacheGeometry, dtype: Dtype) -> serde_json::Value {
    let layers: Vec<serde_json::Value> = geo
        .layers
        .iter()
        .enumerate()
        .map(|(l, lg)| {
            serde_json::json!({
                "query_capacity": lg.query_capacity,
                "kv_capacity": lg.kv_capacity,
                "kv_offset": lg.kv_offset,
                "total_slots": lg.total_slots,
                "distinct_rules": distinct_rules(plan, l),
                "kv_bytes": geo.layer_kv_bytes(l, dtype, 1),
            })
        })
        .collect();
    let kv = geo.kv_bytes(dtype, 1);
    let dense = geo.dense_kv_bytes(dtype, 1);
    let mha = geo.mha_expanded_kv_bytes(dtype, 1);
    serde_json::json!({
        "plan": plan.name(),
        "plan_sha256": plan.sha256(),
        "n": geo.n,
        "prompt_len": geo.prompt_len,
        "max_new_tokens": geo.max_new_tokens,
        "dtype": dtype.name(),
        "sink": geo.sink,
        "head_dim": geo.head_dim,
        "num_query_heads": geo.num_query_heads,
        "num_kv_heads": geo.num_kv_heads,
        "layers": layers,
        "totals": {
            "kv_bytes": kv,
            "dense_kv_bytes": dense,
            "mha_expanded_kv_bytes": mha,
            "ratio_to_dense": kv as f64 / dense as f64,
            "ratio_to_mha_expanded": kv as f64 / mha as f64,
        }
    })
}

/// Number of distinct (alpha, beta) rules in one layer.
pub fn distinct_rules(plan: &ValidPlan, layer: usize) -> usize {
    plan.layer(layer)
        .iter()
        .map(|r| r.key())
        .collect::<BTreeSet<_>>()
        .len()
}

/// Bytes in a human unit.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.2} {}", UNITS[unit])
    }
}

/// Human-readable report.
pub fn report_text(plan: &ValidPlan, geo: &CacheGeometry, dtype: Dtype) -> String {
    let m = plan.model();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "plan {}: {} layers x {} query heads, {} KV heads (group {}), head_dim {}, {}",
        plan.name(),
        m.num_layers,
        m.num_query_heads,
        m.num_kv_heads,
        m.group_size(),
        m.head_dim,
        dtype
    );
    let _ = writeln!(
        out,
        "N = {} (prompt {} + max new tokens {}), sink {}, batch 1",
        geo.n, geo.prompt_len, geo.max_new_tokens, geo.sink
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:>5}  {:>5}  {:>15}  {:>15}  {:>8}  {:>12}",
        "layer", "rules", "query C min-max", "KV C min-max", "C/N avg", "KV bytes"
    );
    for (l, lg) in geo.layers.iter().enumerate() {
        let (qmin, qmax) = min_max(&lg.query_capacity);
        let (kmin, kmax) = min_max(&lg.kv_capacity);
        let avg = lg.kv_capacity.iter().sum::<u64>() as f64
            / (lg.kv_capacity.len() as f64 * geo.n as f64);
        let _ = writeln!(
            out,
            "{:>5}  {:>5}  {:>15}  {:>15}  {:>8.3}  {:>12}",
            l,
            distinct_rules(plan, l),
            format!("{qmin}-{qmax}"),
            format!("{kmin}-{kmax}"),
            avg,
            human_bytes(geo.layer_kv_bytes(l, dtype, 1))
        );
    }
    let kv = geo.kv_bytes(dtype, 1);
    let dense = geo.dense_kv_bytes(dtype, 1);
    let mha = geo.mha_expanded_kv_bytes(dtype, 1);
    let _ = writeln!(out);
    let _ = writeln!(out, "KV cache (K and V, all layers, batch 1):");
    let _ = writeln!(
        out,
        "  moac (native GQA)         {:>12}  {:>14} B",
        human_bytes(kv),
        kv
    );
    let _ = writeln!(
        out,
        "  dense, all N tokens        {:>12}  {:>14} B   moac/dense = {:.3}",
        human_bytes(dense),
        dense,
        kv as f64 / dense as f64
    );
    let _ = writeln!(
        out,
        "  official MoA (MHA-expanded) {:>11}  {:>14} B   moac/MoA = {:.3}",
        human_bytes(mha),
        mha,
        kv as f64 / mha as f64
    );
    out
}

fn min_max(v: &[u64]) -> (u64, u64) {
    let min = v.iter().copied().min().unwrap_or(0);
    let max = v.iter().copied().max().unwrap_or(0);
    (min, max)
}

/// Colour of a value in [0, 1] on a viridis-like ramp.
fn ramp(x: f64) -> String {
    const STOPS: [(f64, [f64; 3]); 5] = [
        (0.0, [68.0, 1.0, 84.0]),
        (0.25, [59.0, 82.0, 139.0]),
        (0.5, [33.0, 145.0, 140.0]),
        (0.75, [94.0, 201.0, 98.0]),
        (1.0, [253.0, 231.0, 37.0]),
    ];
    let x = x.clamp(0.0, 1.0);
    let mut i = 0;
    while i + 2 < STOPS.len() && x > STOPS[i + 1].0 {
        i += 1;
    }
    let (x0, c0) = STOPS[i];
    let (x1, c1) = STOPS[i + 1];
    let t = ((x - x0) / (x1 - x0)).clamp(0.0, 1.0);
    let c: Vec<u8> = (0..3)
        .map(|k| (c0[k] + t * (c1[k] - c0[k])).round() as u8)
        .collect();
    format!("#{:02x}{:02x}{:02x}", c[0], c[1], c[2])
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Heatmap of capacity / N: layers down, query heads across, KV groups separated,
/// with axis labels and a colour legend.
pub fn heatmap_svg(plan: &ValidPlan, geo: &CacheGeometry) -> String {
    let layers = geo.layers.len();
    let heads = geo.num_query_heads;
    let group = plan.model().group_size();
    let cell = (560.0 / heads as f64)
        .clamp(6.0, 22.0)
        .min(640.0 / layers as f64)
        .max(4.0);
    let left = 70.0;
    let top = 78.0;
    let grid_w = cell * heads as f64;
    let grid_h = cell * layers as f64;
    let legend_x = left + grid_w + 40.0;
    let width = legend_x + 110.0;
    let height = top + grid_h + 60.0;
    let font: f64 = 11.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif">"##
    );
    let _ = writeln!(s, r##"<rect width="100%" height="100%" fill="white"/>"##);
    let _ = writeln!(
        s,
        r##"<text x="{left}" y="22" font-size="15" font-weight="bold">{}</text>"##,
        xml_escape(&format!("MoA window capacity / N: {}", plan.name()))
    );
    let _ = writeln!(
        s,
        r##"<text x="{left}" y="40" font-size="{font}" fill="#444">{}</text>"##,
        xml_escape(&format!(
            "N = {} (prompt {} + {} new), {} KV heads, group {} (white lines separate KV groups)",
            geo.n, geo.prompt_len, geo.max_new_tokens, geo.num_kv_heads, group
        ))
    );
    // Column labels (query heads), every head when they fit, else every 4th.
    let step_x = if cell >= 12.0 { 1 } else { 4 };
    for h in (0..heads).step_by(step_x) {
        let x = left + (h as f64 + 0.5) * cell;
        let _ = writeln!(
            s,
            r##"<text x="{x:.1}" y="{:.1}" font-size="{:.0}" text-anchor="middle">{h}</text>"##,
            top - 6.0,
            font.min(cell * 0.8).max(7.0)
        );
    }
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{:.1}" font-size="12" text-anchor="middle">query head</text>"##,
        left + grid_w / 2.0,
        top - 22.0
    );
    let step_y = if cell >= 10.0 { 1 } else { 4 };
    for l in (0..layers).step_by(step_y) {
        let y = top + (l as f64 + 0.5) * cell + 4.0;
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{y:.1}" font-size="{:.0}" text-anchor="end">{l}</text>"##,
            left - 6.0,
            font.min(cell * 0.8).max(7.0)
        );
    }
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{:.1}" font-size="12" text-anchor="middle" transform="rotate(-90 {:.1} {:.1})">layer</text>"##,
        left - 40.0,
        top + grid_h / 2.0,
        left - 40.0,
        top + grid_h / 2.0
    );
    for (l, lg) in geo.layers.iter().enumerate() {
        for (h, &c) in lg.query_capacity.iter().enumerate() {
            let frac = c as f64 / geo.n as f64;
            let rule = plan.layer(l)[h];
            let _ = writeln!(
                s,
                r##"<rect x="{:.2}" y="{:.2}" width="{cell:.2}" height="{cell:.2}" fill="{}"><title>layer {l}, head {h}: alpha {}, beta {}, C = {c} ({:.3} N)</title></rect>"##,
                left + h as f64 * cell,
                top + l as f64 * cell,
                ramp(frac),
                rule.alpha,
                rule.beta,
                frac
            );
        }
    }
    if group > 1 {
        for j in 1..geo.num_kv_heads {
            let x = left + (j * group) as f64 * cell;
            let _ = writeln!(
                s,
                r##"<line x1="{x:.2}" y1="{top:.2}" x2="{x:.2}" y2="{:.2}" stroke="white" stroke-width="1.5"/>"##,
                top + grid_h
            );
        }
    }
    let _ = writeln!(
        s,
        r##"<rect x="{left}" y="{top}" width="{grid_w:.2}" height="{grid_h:.2}" fill="none" stroke="#333" stroke-width="1"/>"##
    );
    // Legend: a vertical ramp from 0 (bottom) to 1 (top).
    let bar_h = grid_h.min(300.0);
    let steps = 50;
    for i in 0..steps {
        let frac = 1.0 - (i as f64 + 0.5) / steps as f64;
        let _ = writeln!(
            s,
            r##"<rect x="{legend_x:.1}" y="{:.2}" width="18" height="{:.2}" fill="{}"/>"##,
            top + i as f64 * bar_h / steps as f64,
            bar_h / steps as f64 + 0.5,
            ramp(frac)
        );
    }
    let _ = writeln!(
        s,
        r##"<rect x="{legend_x:.1}" y="{top}" width="18" height="{bar_h:.2}" fill="none" stroke="#333"/>"##
    );
    for k in 0..=4 {
        let v = k as f64 / 4.0;
        let y = top + (1.0 - v) * bar_h;
        let _ = writeln!(
            s,
            r##"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#333"/><text x="{:.1}" y="{:.1}" font-size="{font}">{v:.2}</text>"##,
            legend_x + 18.0,
            legend_x + 23.0,
            legend_x + 26.0,
            y + 4.0
        );
    }
    let _ = writeln!(
        s,
        r##"<text x="{legend_x:.1}" y="{:.1}" font-size="12">C / N</text>"##,
        top - 10.0
    );
    let _ = writeln!(
        s,
        r##"<text x="{left}" y="{:.1}" font-size="{font}" fill="#444">C: capacity in tokens (sink + ring), at least {} and a multiple of {}</text>"##,
        top + grid_h + 24.0,
        plan.settings().min_capacity,
        plan.settings().granularity
    );
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ramp_ends() {
        assert_eq!(ramp(0.0), "#440154");
        assert_eq!(ramp(1.0), "#fde725");
        assert_eq!(ramp(2.0), "#fde725");
    }

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(10), "10 B");
        assert_eq!(human_bytes(1536), "1.50 KiB");
        assert_eq!(human_bytes(3 * 1024 * 1024 * 1024), "3.00 GiB");
    }
}
