//! Small SVG charts: accuracy (0-100%) against input length, one line per series (the
//! retrieval evaluation), and a scatter plot of labelled points (the plan pipeline's
//! predicted losses, `front.svg`).

/// Colors of the series, in order (dense first).
const COLORS: [&str; 8] = [
    "#222222", "#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
];

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The chart as SVG text: `lengths` on a log2 x axis, each series' accuracy (0..1) per
/// length.
pub fn accuracy_plot(title: &str, lengths: &[usize], series: &[(String, Vec<f64>)]) -> String {
    let (w, h) = (640.0, 400.0);
    let (left, right, top, bottom) = (60.0, 170.0, 40.0, 50.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let logs: Vec<f64> = lengths.iter().map(|&l| (l.max(1) as f64).log2()).collect();
    let (lo, hi) = logs
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
            (a.min(x), b.max(x))
        });
    let span = if hi > lo { hi - lo } else { 1.0 };
    let x = |i: usize| {
        left + if hi > lo {
            (logs[i] - lo) / span * pw
        } else {
            pw / 2.0
        }
    };
    let y = |acc: f64| top + (1.0 - acc.clamp(0.0, 1.0)) * ph;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"14\">{}</text>\n",
        left + pw / 2.0,
        escape(title)
    );
    for pct in [0, 25, 50, 75, 100] {
        let yy = y(pct as f64 / 100.0);
        s.push_str(&format!(
            "<line x1=\"{left}\" y1=\"{yy}\" x2=\"{}\" y2=\"{yy}\" stroke=\"#dddddd\"/>\n<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{pct}%</text>\n",
            left + pw,
            left - 6.0,
            yy + 4.0
        ));
    }
    for (i, l) in lengths.iter().enumerate() {
        s.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{l}</text>\n",
            x(i),
            top + ph + 18.0
        ));
    }
    s.push_str(&format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">input length (tokens)</text>\n<text x=\"16\" y=\"{}\" transform=\"rotate(-90 16 {})\" text-anchor=\"middle\">accuracy</text>\n",
        left + pw / 2.0,
        h - 10.0,
        top + ph / 2.0,
        top + ph / 2.0
    ));
    for (k, (name, acc)) in series.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let points: Vec<String> = acc
            .iter()
            .enumerate()
            .take(lengths.len())
            .map(|(i, &a)| format!("{:.1},{:.1}", x(i), y(a)))
            .collect();
        s.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\n",
            points.join(" ")
        ));
        for p in &points {
            let (px, py) = p.split_once(',').unwrap_or(("0", "0"));
            s.push_str(&format!(
                "<circle cx=\"{px}\" cy=\"{py}\" r=\"3\" fill=\"{color}\"/>\n"
            ));
        }
        let ly = top + 10.0 + 18.0 * k as f64;
        s.push_str(&format!(
            "<line x1=\"{}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"2\"/>\n<text x=\"{}\" y=\"{}\">{}</text>\n",
            left + pw + 12.0,
            left + pw + 32.0,
            left + pw + 38.0,
            ly + 4.0,
            escape(name)
        ));
    }
    s.push_str("</svg>\n");
    s
}

/// A scatter plot of labelled points (x, y), axes from the data's ranges.
pub fn scatter_plot(
    title: &str,
    xlabel: &str,
    ylabel: &str,
    points: &[(String, f64, f64)],
) -> String {
    let (w, h) = (640.0, 420.0);
    let (left, right, top, bottom) = (80.0, 40.0, 40.0, 60.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let range = |f: &dyn Fn(&(String, f64, f64)) -> f64| {
        let (lo, hi) = points
            .iter()
            .map(f)
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
                (a.min(v), b.max(v))
            });
        let pad = ((hi - lo) * 0.08).max(hi.abs() * 1e-3).max(1e-12);
        (lo - pad, hi + pad)
    };
    let (x0, x1) = range(&|p| p.1);
    let (y0, y1) = range(&|p| p.2);
    let x = |v: f64| left + (v - x0) / (x1 - x0) * pw;
    let y = |v: f64| top + (1.0 - (v - y0) / (y1 - y0)) * ph;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"14\">{}</text>\n<rect x=\"{left}\" y=\"{top}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#999999\"/>\n",
        left + pw / 2.0,
        escape(title)
    );
    for k in 0..=4 {
        let f = k as f64 / 4.0;
        let (vx, vy) = (x0 + f * (x1 - x0), y0 + f * (y1 - y0));
        s.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{vx:.3}</text>\n<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{vy:.3}</text>\n",
            x(vx),
            top + ph + 16.0,
            left - 6.0,
            y(vy) + 4.0
        ));
    }
    s.push_str(&format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n<text x=\"16\" y=\"{}\" transform=\"rotate(-90 16 {})\" text-anchor=\"middle\">{}</text>\n",
        left + pw / 2.0,
        h - 14.0,
        escape(xlabel),
        top + ph / 2.0,
        top + ph / 2.0,
        escape(ylabel)
    ));
    for (k, (name, px, py)) in points.iter().enumerate() {
        let color = COLORS[(k + 1) % COLORS.len()];
        s.push_str(&format!(
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"{color}\"/>\n<text x=\"{:.1}\" y=\"{:.1}\">{}</text>\n",
            x(*px),
            y(*py),
            x(*px) + 6.0,
            y(*py) - 6.0,
            escape(name)
        ));
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_every_series_and_length() {
        let svg = accuracy_plot(
            "t <x>",
            &[1024, 2048, 4096],
            &[
                ("dense".into(), vec![1.0, 0.5, 0.0]),
                ("half".into(), vec![1.0, 0.25, 0.0]),
            ],
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 6);
        assert!(svg.contains("t &lt;x&gt;") && svg.contains(">4096<"));
        // 100% sits at the top of the plot area, 0% at the bottom.
        assert!(svg.contains("cy=\"40.0\"") && svg.contains("cy=\"350.0\""));
    }
}
