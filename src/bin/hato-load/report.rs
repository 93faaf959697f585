//! The report of one run, or of two runs drawn over each other: the
//! summary's figures and hand-drawn SVG plots in one HTML file that needs
//! no network and no script to open. Everything is read from the JSON
//! summary (`--json`), so that a run's report and a comparison are drawn
//! by the same code.

use serde_json::Value;
use std::fmt::Write;

/// A rendered report: the page, and each plot as a standalone SVG.
pub struct Page {
    pub html: String,
    pub plots: Vec<(&'static str, String)>,
}

const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

struct Line {
    name: String,
    /// `None` breaks the line (a second with no figure).
    points: Vec<Option<(f64, f64)>>,
    color: &'static str,
    dashed: bool,
}

struct Chart {
    id: &'static str,
    title: &'static str,
    x_label: &'static str,
    y_label: &'static str,
    lines: Vec<Line>,
    /// Vertical marks: (x, label).
    marks: Vec<(f64, &'static str)>,
    /// The x axis's range, when not the points' own.
    x_range: Option<(f64, f64)>,
    /// Shown instead of the plot when no line has a point.
    empty: &'static str,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn at<'a>(v: &'a Value, pointer: &str) -> &'a Value {
    v.pointer(pointer).unwrap_or(&Value::Null)
}

fn numbers(v: &Value) -> Vec<Option<f64>> {
    v.as_array()
        .map(|a| a.iter().map(Value::as_f64).collect())
        .unwrap_or_default()
}

/// `xs` and `ys` zipped into points; a missing y breaks the line.
fn zip(xs: &[Option<f64>], ys: &[Option<f64>]) -> Vec<Option<(f64, f64)>> {
    xs.iter()
        .zip(ys)
        .map(|(x, y)| Some(((*x)?, (*y)?)))
        .collect()
}

/// Round steps (1, 2, 5 × 10^k) covering `lo..hi` in about `n` ticks.
fn ticks(lo: f64, hi: f64, n: usize) -> (Vec<f64>, f64) {
    let span = (hi - lo).max(f64::EPSILON);
    let raw = span / n as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() * step;
    let ticks = (0..)
        .map(|i| first + i as f64 * step)
        .take_while(|t| *t <= hi + step * 1e-9)
        .collect();
    (ticks, step)
}

fn label(v: f64, step: f64) -> String {
    if step >= 1.0 || v == 0.0 {
        let v = v.round() as i64;
        if v.abs() >= 10_000 && v % 1000 == 0 {
            format!("{}k", v / 1000)
        } else {
            v.to_string()
        }
    } else {
        let digits = (-step.log10().floor()) as usize;
        format!("{v:.digits$}")
    }
}

/// Figures: thousands grouped, at most two decimals.
fn figure(v: &Value) -> String {
    match v {
        Value::Null => "—".into(),
        Value::Number(n) => {
            let f = n.as_f64().unwrap_or(0.0);
            if n.is_u64() || n.is_i64() || f.abs() >= 1000.0 {
                let digits = (f.round() as i64).unsigned_abs().to_string();
                let mut out = String::from(if f < 0.0 { "-" } else { "" });
                for (i, c) in digits.chars().enumerate() {
                    if i > 0 && (digits.len() - i).is_multiple_of(3) {
                        out.push('\u{202f}');
                    }
                    out.push(c);
                }
                out
            } else if f.abs() >= 100.0 {
                format!("{f:.1}")
            } else {
                format!("{f:.2}")
            }
        }
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

const W: f64 = 680.0;
const H: f64 = 280.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 52.0;
const BOTTOM: f64 = 44.0;

impl Chart {
    fn points(&self) -> usize {
        self.lines
            .iter()
            .map(|l| l.points.iter().flatten().count())
            .sum()
    }

    fn svg(&self) -> String {
        let n = self.points();
        let drawn = self
            .lines
            .iter()
            .filter(|l| l.points.iter().flatten().next().is_some())
            .count();
        let mut s = String::new();
        let _ = write!(
            s,
            r##"<svg xmlns="http://www.w3.org/2000/svg" class="chart" id="chart-{}" data-points="{n}" data-series="{drawn}" viewBox="0 0 {W} {H}" width="{W}" height="{H}" font-family="sans-serif" font-size="12"><rect width="{W}" height="{H}" fill="#fff"/><text x="{LEFT}" y="20" font-size="14" font-weight="bold">{}</text>"##,
            self.id,
            esc(self.title)
        );
        if n == 0 {
            let _ = write!(
                s,
                r##"<text x="{}" y="{}" text-anchor="middle" fill="#888">{}</text></svg>"##,
                W / 2.0,
                H / 2.0,
                esc(self.empty)
            );
            return s;
        }
        let all = || self.lines.iter().flat_map(|l| l.points.iter().flatten());
        let (mut x0, mut x1) = self.x_range.unwrap_or_else(|| {
            all().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)))
        });
        let y1 = all().fold(0f64, |m, p| m.max(p.1));
        if x1 <= x0 {
            x0 -= 1.0;
            x1 += 1.0;
        }
        let y1 = if y1 > 0.0 { y1 * 1.08 } else { 1.0 };
        let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
        let sx = |x: f64| LEFT + (x - x0) / (x1 - x0) * pw;
        let sy = |y: f64| TOP + ph - y / y1 * ph;
        let (yt, ystep) = ticks(0.0, y1, 5);
        for t in yt {
            let _ = write!(
                s,
                r##"<line x1="{LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#e4e4e4"/><text x="{}" y="{:.1}" text-anchor="end" fill="#444">{}</text>"##,
                W - RIGHT,
                LEFT - 6.0,
                sy(t) + 4.0,
                label(t, ystep),
                y = sy(t),
            );
        }
        let (xt, xstep) = ticks(x0, x1, 8);
        for t in xt {
            let _ = write!(
                s,
                r##"<line x1="{x:.1}" x2="{x:.1}" y1="{}" y2="{}" stroke="#888"/><text x="{x:.1}" y="{}" text-anchor="middle" fill="#444">{}</text>"##,
                TOP + ph,
                TOP + ph + 4.0,
                TOP + ph + 17.0,
                label(t, xstep),
                x = sx(t),
            );
        }
        let _ = write!(
            s,
            r##"<line x1="{LEFT}" x2="{}" y1="{b}" y2="{b}" stroke="#888"/><line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{b}" stroke="#888"/><text x="{}" y="{}" text-anchor="middle" fill="#444">{}</text><text transform="translate(14 {}) rotate(-90)" text-anchor="middle" fill="#444">{}</text>"##,
            W - RIGHT,
            LEFT + pw / 2.0,
            H - 8.0,
            esc(self.x_label),
            TOP + ph / 2.0,
            esc(self.y_label),
            b = TOP + ph,
        );
        for (i, (x, name)) in self.marks.iter().enumerate() {
            if *x < x0 || *x > x1 {
                continue;
            }
            let _ = write!(
                s,
                r##"<line x1="{x:.1}" x2="{x:.1}" y1="{TOP}" y2="{}" stroke="#999" stroke-dasharray="2 3"/><text x="{:.1}" y="{}" fill="#777" font-size="10">{}</text>"##,
                TOP + ph,
                sx(*x) + 3.0,
                TOP + 10.0 + 11.0 * i as f64,
                esc(name),
                x = sx(*x),
            );
        }
        for line in &self.lines {
            let mut d = String::new();
            let mut pen_down = false;
            for p in &line.points {
                match p {
                    Some((x, y)) => {
                        let _ = write!(
                            d,
                            "{}{:.1} {:.1} ",
                            if pen_down { "L" } else { "M" },
                            sx(*x),
                            sy(*y)
                        );
                        pen_down = true;
                    }
                    None => pen_down = false,
                }
            }
            if d.is_empty() {
                continue;
            }
            let dash = if line.dashed {
                r#" stroke-dasharray="7 4""#
            } else {
                ""
            };
            let _ = write!(
                s,
                r#"<path class="series" d="{}" fill="none" stroke="{}" stroke-width="1.8"{dash}><title>{}</title></path>"#,
                d.trim_end(),
                line.color,
                esc(&line.name)
            );
        }
        // The legend, on a row of its own under the title.
        let mut x = LEFT;
        for line in &self.lines {
            let w = 26.0 + 6.5 * line.name.chars().count() as f64;
            let dash = if line.dashed {
                r#" stroke-dasharray="7 4""#
            } else {
                ""
            };
            let _ = write!(
                s,
                r#"<line x1="{x:.1}" x2="{:.1}" y1="32" y2="32" stroke="{}" stroke-width="2"{dash}/><text x="{:.1}" y="36" fill="{}">{}</text>"#,
                x + 16.0,
                line.color,
                x + 20.0,
                line.color,
                esc(&line.name)
            );
            x += w;
        }
        s.push_str("</svg>");
        s
    }
}

/// A histogram as the JSON holds it: [value, count] pairs.
fn bucket_pairs(buckets: &Value) -> Vec<(f64, f64)> {
    buckets
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| Some((p.get(0)?.as_f64()?, p.get(1)?.as_f64()?)))
                .collect()
        })
        .unwrap_or_default()
}

/// A histogram's (value µs, count) buckets as a step line: the share (%)
/// of values per bin of `width` µs, 40 bins from 0; beyond them, the last.
fn histogram_line(buckets: &Value, width: f64) -> Vec<Option<(f64, f64)>> {
    let pairs = bucket_pairs(buckets);
    let total: f64 = pairs.iter().map(|p| p.1).sum();
    if total == 0.0 {
        return Vec::new();
    }
    let mut bins = [0f64; 40];
    for (v, n) in pairs {
        bins[((v / width) as usize).min(39)] += n;
    }
    let ms = width / 1000.0;
    bins.iter()
        .enumerate()
        .flat_map(|(i, n)| {
            let share = n * 100.0 / total;
            [
                Some((i as f64 * ms, share)),
                Some(((i + 1) as f64 * ms, share)),
            ]
        })
        .collect()
}

/// The 99.9th percentile of a histogram's buckets (µs).
fn p999(buckets: &Value) -> f64 {
    let pairs = bucket_pairs(buckets);
    let total: f64 = pairs.iter().map(|p| p.1).sum();
    let mut seen = 0.0;
    for (v, n) in &pairs {
        seen += n;
        if seen >= total * 0.999 {
            return *v;
        }
    }
    0.0
}

fn charts(runs: &[(String, Value)]) -> Vec<Chart> {
    let many = runs.len() > 1;
    let name = |base: &str, run: &str| {
        if many {
            format!("{base} ({run})")
        } else {
            base.to_string()
        }
    };
    let marks = runs.first().map_or(Vec::new(), |(_, v)| {
        [
            ("connected_s", "all connected"),
            ("pushing_s", "pushing"),
            ("pushed_s", "last push"),
        ]
        .iter()
        .filter_map(|(k, l)| Some((at(v, &format!("/series/phases/{k}")).as_f64()?, *l)))
        .collect()
    });
    // Every time plot spans the whole run (the longest one's), so that
    // they line up one under the other.
    let end = runs
        .iter()
        .filter_map(|(_, v)| numbers(at(v, "/series/t")).last().copied().flatten())
        .fold(1f64, f64::max);
    let time_chart = |id, title, y_label, empty| Chart {
        id,
        title,
        x_label: "seconds from the start of the run",
        y_label,
        lines: Vec::new(),
        marks: marks.clone(),
        x_range: Some((0.0, end)),
        empty,
    };
    let mut peers = time_chart(
        "peers",
        "Peers connected, and failed connects",
        "peers",
        "no peers",
    );
    let mut ready = Chart {
        id: "offer_to_ready",
        title: "Offer → ready, share of peers",
        x_label: "milliseconds",
        y_label: "% of peers",
        lines: Vec::new(),
        marks: Vec::new(),
        x_range: None,
        empty: "no peer connected",
    };
    let mut pushes = time_chart(
        "pushes",
        "Pushes accepted per second",
        "pushes/s",
        "no push accepted",
    );
    let mut deliveries = time_chart(
        "deliveries",
        "Deliveries received per second",
        "deliveries/s",
        "nothing delivered",
    );
    let mut latency = time_chart(
        "latency",
        "Delivery latency by second sent",
        "ms",
        "nothing delivered",
    );
    let mut lat_hist = Chart {
        id: "latency_histogram",
        title: "Delivery latency, share of deliveries",
        x_label: "milliseconds",
        y_label: "% of deliveries",
        lines: Vec::new(),
        marks: Vec::new(),
        x_range: None,
        empty: "nothing delivered",
    };
    let mut cpu = time_chart(
        "server_cpu",
        "Server CPU",
        "% of one core",
        "not sampled: give --server-pid or --server-process",
    );
    let mut rss = time_chart(
        "server_rss",
        "Server RSS",
        "MB",
        "not sampled: give --server-pid or --server-process",
    );
    // One bin width per histogram for every run, so that they overlay.
    let width = |key: &str| {
        let hi = runs
            .iter()
            .map(|(_, v)| p999(at(v, &format!("/histograms/{key}"))))
            .fold(0f64, f64::max);
        (hi / 40.0).max(1.0)
    };
    let (ready_width, latency_width) = (width("offer_to_ready_us"), width("latency_us"));
    for (i, (run, v)) in runs.iter().enumerate() {
        // A figure has the same colour in every run, solid in the first
        // and dashed in the second.
        let dashed = i > 0;
        let t: Vec<Option<f64>> = numbers(at(v, "/series/t"));
        let line = |chart: &mut Chart, base: &str, points| {
            let color =
                COLORS[chart.lines.iter().filter(|l| l.dashed == dashed).count() % COLORS.len()];
            chart.lines.push(Line {
                name: name(base, run),
                points,
                color,
                dashed,
            });
        };
        line(
            &mut peers,
            "connected",
            zip(&t, &numbers(at(v, "/series/connected"))),
        );
        let failed = at(v, "/series/failed")
            .as_object()
            .cloned()
            .unwrap_or_default();
        let mut total = vec![Some(0.0); t.len()];
        for counts in failed.values() {
            for (sum, n) in total.iter_mut().zip(numbers(counts)) {
                *sum = Some(sum.unwrap_or(0.0) + n.unwrap_or(0.0));
            }
        }
        line(&mut peers, "failed", zip(&t, &total));
        if !many {
            // The largest reasons, each on its own.
            let mut reasons: Vec<(&String, &Value)> = failed.iter().collect();
            reasons.sort_by(|a, b| {
                let last = |v: &Value| numbers(v).last().copied().flatten().unwrap_or(0.0);
                last(b.1).total_cmp(&last(a.1))
            });
            for (reason, counts) in reasons.into_iter().take(3) {
                let short: String = reason.chars().take(40).collect();
                line(
                    &mut peers,
                    &format!("failed: {short}"),
                    zip(&t, &numbers(counts)),
                );
            }
        }
        line(
            &mut ready,
            "offer → ready",
            histogram_line(at(v, "/histograms/offer_to_ready_us"), ready_width),
        );
        line(
            &mut lat_hist,
            "latency",
            histogram_line(at(v, "/histograms/latency_us"), latency_width),
        );
        let lt = numbers(at(v, "/series/latency/t"));
        for (name, figures) in [
            ("p50", "/series/latency/p50_ms"),
            ("p99", "/series/latency/p99_ms"),
        ] {
            line(&mut latency, name, zip(&lt, &numbers(at(v, figures))));
        }
        // The other per-second series: (plot, name, figures).
        for (chart, name, figures) in [
            (&mut pushes, "pushes/s", "/series/pushes_per_second"),
            (
                &mut deliveries,
                "deliveries/s",
                "/series/deliveries_per_second",
            ),
            (&mut cpu, "CPU", "/series/server_cpu_percent"),
            (&mut rss, "RSS", "/series/server_rss_mb"),
        ] {
            line(chart, name, zip(&t, &numbers(at(v, figures))));
        }
    }
    vec![
        peers, ready, pushes, deliveries, latency, lat_hist, cpu, rss,
    ]
}

/// The summary's figures shown, by JSON pointer.
const FIGURES: [(&str, &str); 24] = [
    ("peers requested", "/peers/requested"),
    ("peers connected", "/peers/connected"),
    ("peers failed", "/peers/failed"),
    ("seconds to connect them", "/peers/connect_seconds"),
    ("connect p50 (ms)", "/connect_ms/p50"),
    ("offer → ready p50 (ms)", "/offer_to_ready_ms/p50"),
    ("offer → ready p95 (ms)", "/offer_to_ready_ms/p95"),
    ("pushes accepted", "/pushes/accepted"),
    ("pushes failed", "/pushes/failed"),
    ("pushes per second", "/pushes/per_second"),
    ("API p50 (ms)", "/api_latency_ms/p50"),
    ("API p99 (ms)", "/api_latency_ms/p99"),
    ("deliveries expected", "/deliveries/expected"),
    ("deliveries received", "/deliveries/received"),
    ("deliveries lost", "/deliveries/lost"),
    ("out of order", "/deliveries/out_of_order"),
    ("deliveries per second", "/deliveries/per_second"),
    ("latency p50 (ms)", "/latency_ms/p50"),
    ("latency p99 (ms)", "/latency_ms/p99"),
    ("last-peer p99 (ms)", "/last_peer_latency_ms/p99"),
    (
        "server CPU per delivery (µs)",
        "/server/cpu_us_per_delivery",
    ),
    ("server RSS per peer (KB)", "/server/rss_kb_per_peer"),
    (
        "server RSS after pushing (KB)",
        "/server/rss_kb_after_pushing",
    ),
    (
        "client CPU per delivery (µs)",
        "/client/cpu_us_per_delivery",
    ),
];

fn tables(runs: &[(String, Value)]) -> String {
    let mut s = String::from("<h2>Figures</h2><table id=\"figures\"><tr><th></th>");
    for (run, _) in runs {
        let _ = write!(s, "<th>{}</th>", esc(run));
    }
    if runs.len() == 2 {
        s.push_str("<th>ratio</th>");
    }
    s.push_str("</tr>");
    for (label, pointer) in FIGURES {
        let _ = write!(s, "<tr><td>{}</td>", esc(label));
        for (_, v) in runs {
            let _ = write!(s, "<td class=\"n\">{}</td>", esc(&figure(at(v, pointer))));
        }
        if let [(_, a), (_, b)] = runs {
            let ratio = match (at(a, pointer).as_f64(), at(b, pointer).as_f64()) {
                (Some(a), Some(b)) if a != 0.0 => format!("{:.2}×", b / a),
                _ => "—".into(),
            };
            let _ = write!(s, "<td class=\"n\">{ratio}</td>");
        }
        s.push_str("</tr>");
    }
    s.push_str("</table><h2>Parameters</h2><table id=\"parameters\">");
    for (run, v) in runs {
        let _ = write!(
            s,
            "<tr><td>{}</td><td><code>{}</code></td></tr>",
            esc(run),
            esc(at(v, "/command").as_str().unwrap_or("(not recorded)"))
        );
        if let Some(mode) = at(v, "/mode").as_object() {
            let parts: Vec<String> = mode.iter().map(|(k, x)| format!("{k} = {x}")).collect();
            let _ = write!(s, "<tr><td></td><td>{}</td></tr>", esc(&parts.join(", ")));
        }
        if let Some(reasons) = at(v, "/peers/failure_reasons")
            .as_object()
            .filter(|r| !r.is_empty())
        {
            let parts: Vec<String> = reasons.iter().map(|(k, n)| format!("{n} × {k}")).collect();
            let _ = write!(
                s,
                "<tr><td></td><td>failed: {}</td></tr>",
                esc(&parts.join("; "))
            );
        }
    }
    s.push_str("</table>");
    s
}

pub fn render(runs: &[(String, Value)]) -> Page {
    let charts = charts(runs);
    let title = match runs {
        [(a, _), (b, _)] => format!("hato-load: {a} against {b}"),
        _ => "hato-load report".to_string(),
    };
    let mut html = format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{t}</title><link rel="icon" href="data:,"><style>
body{{font-family:sans-serif;margin:24px;color:#222;max-width:1500px}}
table{{border-collapse:collapse;margin-bottom:16px}}td,th{{border-bottom:1px solid #ddd;padding:3px 10px;text-align:left}}
td.n{{text-align:right;font-variant-numeric:tabular-nums}}.charts{{display:flex;flex-wrap:wrap;gap:12px}}
.charts svg{{border:1px solid #ddd}}code{{font-size:12px}}
</style></head><body><h1>{t}</h1>"#,
        t = esc(&title)
    );
    if runs.len() == 2 {
        html.push_str(
            "<p>Solid lines: the first run; dashed: the second. Ratios are second ÷ first.</p>",
        );
    }
    html.push_str("<div class=\"charts\">");
    let mut plots = Vec::new();
    for c in &charts {
        let svg = c.svg();
        html.push_str(&svg);
        plots.push((c.id, svg));
    }
    html.push_str("</div>");
    html.push_str(&tables(runs));
    html.push_str("</body></html>\n");
    Page { html, plots }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        let (t, step) = ticks(0.0, 9.3, 5);
        assert_eq!(step, 2.0);
        assert_eq!(t, vec![0.0, 2.0, 4.0, 6.0, 8.0]);
        let (t, step) = ticks(0.0, 0.37, 5);
        assert_eq!(step, 0.1);
        assert_eq!(t.len(), 4);
    }

    #[test]
    fn figures_group_thousands() {
        assert_eq!(
            figure(&serde_json::json!(1234567)),
            "1\u{202f}234\u{202f}567"
        );
        assert_eq!(figure(&serde_json::json!(12.345)), "12.35");
        assert_eq!(figure(&serde_json::json!(-1234)), "-1\u{202f}234");
        assert_eq!(figure(&Value::Null), "—");
    }
}
