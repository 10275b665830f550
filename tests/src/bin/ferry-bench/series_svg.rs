//! The time-series chart of one migration (issue #11 §8): two panels
//! sharing the time axis. Top: remaining bytes. Bottom: throughput and
//! dirty rate (MiB/s), with the CPU throttle (%, right-hand axis) where it
//! is ever non-zero. Pass boundaries are dashed vertical lines through both
//! panels, labelled with the pass that begins; a change to a state other
//! than `setup`/`active` (post-copy, completed, cancelled, ...) is a red
//! dotted line labelled with that state.

use std::fmt::Write;
use std::path::Path;

use crate::series::Series;
use crate::svg::{esc, fmt_num, nice_step};

const MIB: f64 = (1u64 << 20) as f64;
const W: f64 = 760.0;
const H: f64 = 560.0;
const ML: f64 = 80.0;
const MR: f64 = 170.0;
const PW: f64 = W - ML - MR;

/// One panel's vertical extent and scale.
struct Panel {
    top: f64,
    height: f64,
    ymax: f64,
}

impl Panel {
    fn new(top: f64, height: f64, data_max: f64) -> Panel {
        let m = if data_max > 0.0 && data_max.is_finite() {
            data_max
        } else {
            1.0
        };
        let step = nice_step(m * 1.05, 4.0);
        Panel {
            top,
            height,
            ymax: (m * 1.05 / step).ceil() * step,
        }
    }
    fn y(&self, v: f64) -> f64 {
        self.top + self.height - (v / self.ymax).clamp(0.0, 1.0) * self.height
    }
    fn bottom(&self) -> f64 {
        self.top + self.height
    }
}

fn polyline(o: &mut String, pts: &[(f64, f64)], color: &str, dash: Option<&str>) {
    if pts.is_empty() {
        return;
    }
    let p: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
    let dash = dash
        .map(|d| format!(r#" stroke-dasharray="{d}""#))
        .unwrap_or_default();
    let _ = writeln!(
        o,
        r#"<polyline fill="none" stroke="{color}" stroke-width="1.8"{dash} points="{}"/>"#,
        p.join(" ")
    );
}

fn grid(o: &mut String, p: &Panel, label: &str, unit_scale: f64) {
    let step = nice_step(p.ymax, 4.0);
    let mut v = 0.0;
    while v <= p.ymax + 1e-9 {
        let y = p.y(v);
        let _ = writeln!(
            o,
            r##"<line x1="{ML}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e4e4e4"/>"##,
            ML + PW
        );
        let _ = writeln!(
            o,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            ML - 6.0,
            y + 4.0,
            fmt_num(v * unit_scale)
        );
        v += step;
    }
    let _ = writeln!(
        o,
        r##"<rect x="{ML}" y="{:.1}" width="{PW}" height="{:.1}" fill="none" stroke="#333"/>"##,
        p.top, p.height
    );
    let mid = p.top + p.height / 2.0;
    let _ = writeln!(
        o,
        r#"<text x="22" y="{mid:.1}" text-anchor="middle" transform="rotate(-90 22 {mid:.1})">{}</text>"#,
        esc(label)
    );
}

fn legend(o: &mut String, y: f64, color: &str, dash: Option<&str>, name: &str) {
    let lx = ML + PW + 16.0;
    let dash = dash
        .map(|d| format!(r#" stroke-dasharray="{d}""#))
        .unwrap_or_default();
    let _ = writeln!(
        o,
        r#"<line x1="{lx}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{color}" stroke-width="2"{dash}/>"#,
        lx + 22.0
    );
    let _ = writeln!(
        o,
        r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
        lx + 28.0,
        y + 4.0,
        esc(name)
    );
}

/// The chart of `s` (an SVG document; a note in the middle when `s` is empty).
pub fn chart(title: &str, s: &Series) -> String {
    let end_s = (s.end_ms() / 1000.0).max(1e-3);
    let xstep = nice_step(end_s, 8.0);
    let xmax = (end_s / xstep).ceil().max(1.0) * xstep;
    let px = |ms: f64| ML + PW * (ms / 1000.0 / xmax).clamp(0.0, 1.0);
    let mib = |b: Option<u64>| b.map(|b| b as f64 / MIB);
    let rem_max = s
        .samples
        .iter()
        .filter_map(|x| mib(x.remaining_bytes))
        .fold(0.0, f64::max);
    let rate_max = s
        .samples
        .iter()
        .flat_map(|x| [x.throughput_bytes_per_s, x.dirty_rate_bytes_per_s])
        .flatten()
        .map(|b| b / MIB)
        .fold(0.0, f64::max);
    let throttled = s.max_throttle() > 0;
    let top = Panel::new(50.0, 190.0, rem_max);
    let bot = Panel::new(280.0, 190.0, rate_max);
    let pct = Panel {
        top: bot.top,
        height: bot.height,
        ymax: 100.0,
    };

    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(o, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        o,
        r#"<text x="{:.1}" y="28" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
        ML + PW / 2.0,
        esc(title)
    );
    grid(&mut o, &top, "remaining (MiB)", 1.0);
    grid(&mut o, &bot, "MiB/s", 1.0);
    // X ticks under the bottom panel.
    let mut x = 0.0;
    while x <= xmax + 1e-9 {
        let xx = px(x * 1000.0);
        let _ = writeln!(
            o,
            r##"<line x1="{xx:.1}" y1="{:.1}" x2="{xx:.1}" y2="{:.1}" stroke="#333"/>"##,
            bot.bottom(),
            bot.bottom() + 5.0
        );
        let _ = writeln!(
            o,
            r#"<text x="{xx:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            bot.bottom() + 19.0,
            fmt_num((x * 1000.0).round() / 1000.0)
        );
        x += xstep;
    }
    let _ = writeln!(
        o,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">seconds since the send request</text>"#,
        ML + PW / 2.0,
        bot.bottom() + 40.0
    );
    if s.samples.is_empty() {
        let _ = writeln!(
            o,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#888">no samples</text>"##,
            ML + PW / 2.0,
            top.top + top.height / 2.0
        );
    }
    // Pass boundaries (labels thinned so that they do not overlap).
    let mut last_label = f64::NEG_INFINITY;
    for (ms, pass) in s.pass_starts() {
        let xx = px(ms);
        let _ = writeln!(
            o,
            r##"<line class="pass" x1="{xx:.1}" y1="{:.1}" x2="{xx:.1}" y2="{:.1}" stroke="#999" stroke-dasharray="3,3"><title>pass {pass} from {:.2} s</title></line>"##,
            top.top,
            bot.bottom(),
            ms / 1000.0
        );
        if xx - last_label >= 34.0 {
            let _ = writeln!(
                o,
                r##"<text x="{:.1}" y="{:.1}" font-size="10" fill="#666">p{pass}</text>"##,
                (xx + 2.0).min(ML + PW - 18.0),
                top.top + 11.0
            );
            last_label = xx;
        }
    }
    for (ms, st) in s.state_changes() {
        if matches!(st.as_str(), "setup" | "active" | "none") {
            continue;
        }
        let xx = px(ms);
        let _ = writeln!(
            o,
            r##"<line class="state" x1="{xx:.1}" y1="{:.1}" x2="{xx:.1}" y2="{:.1}" stroke="#d62728" stroke-dasharray="1,3"/>"##,
            top.top,
            bot.bottom()
        );
        let _ = writeln!(
            o,
            r##"<text x="{:.1}" y="{:.1}" font-size="10" fill="#d62728" text-anchor="end">{}</text>"##,
            xx - 2.0,
            bot.top + 11.0,
            esc(&st)
        );
    }
    // The lines (each skips samples where its field is missing).
    let line = |f: &dyn Fn(&crate::series::Sample) -> Option<f64>, p: &Panel| -> Vec<(f64, f64)> {
        s.samples
            .iter()
            .filter_map(|x| f(x).map(|v| (px(x.elapsed_ms), p.y(v))))
            .collect()
    };
    polyline(
        &mut o,
        &line(&|x| mib(x.remaining_bytes), &top),
        "#1f77b4",
        None,
    );
    polyline(
        &mut o,
        &line(&|x| x.throughput_bytes_per_s.map(|b| b / MIB), &bot),
        "#ff7f0e",
        None,
    );
    polyline(
        &mut o,
        &line(&|x| x.dirty_rate_bytes_per_s.map(|b| b / MIB), &bot),
        "#2ca02c",
        Some("5,3"),
    );
    legend(&mut o, top.top + 10.0, "#1f77b4", None, "remaining");
    legend(&mut o, top.top + 30.0, "#999", Some("3,3"), "pass starts");
    legend(&mut o, bot.top + 10.0, "#ff7f0e", None, "throughput");
    legend(&mut o, bot.top + 30.0, "#2ca02c", Some("5,3"), "dirty rate");
    if throttled {
        polyline(
            &mut o,
            &line(&|x| x.cpu_throttle_percent.map(|t| t as f64), &pct),
            "#9467bd",
            None,
        );
        for v in [0.0, 50.0, 100.0] {
            let _ = writeln!(
                o,
                r##"<text x="{:.1}" y="{:.1}" fill="#9467bd">{v}%</text>"##,
                ML + PW + 4.0,
                pct.y(v) + 4.0
            );
        }
        legend(&mut o, bot.top + 50.0, "#9467bd", None, "CPU throttle (%)");
    }
    o.push_str("</svg>\n");
    o
}

/// Writes the chart of `s` to `ROOT/docs/img/SUITE-series.svg` and returns
/// the Markdown that shows it (with `what` saying which run it is), or a
/// note when `s` is empty or the file cannot be written.
pub fn write_suite(root: &Path, suite: &str, title: &str, what: &str, s: &Series) -> String {
    if s.samples.is_empty() {
        return format!("\n_No time series recorded for {suite} ({what})._\n");
    }
    let img = root.join("docs/img");
    let name = format!("{suite}-series.svg");
    let written = std::fs::create_dir_all(&img)
        .and_then(|()| std::fs::write(img.join(&name), chart(title, s)));
    match written {
        Ok(()) => format!(
            "\nTime series of one run ({what}; the source's `vm.migration`, {} samples over {:.2} s): \
             remaining bytes, throughput and dirty rate, pass starts dashed{}.\n\n\
             ![{suite}: time series of one run](img/{name})\n",
            s.samples.len(),
            s.end_ms() / 1000.0,
            if s.max_throttle() > 0 { ", CPU throttle in purple" } else { "" }
        ),
        Err(e) => format!("\n_Could not write docs/img/{name}: {e}._\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::series::Sample;
    use serde_json::json;
    use std::time::Duration;

    fn series(throttle: bool) -> Series {
        let mut s = Series::new(Duration::ZERO);
        for i in 0..40u64 {
            let pass = 1 + i / 10;
            s.push(Sample::parse(
                i as f64 * 100.0,
                &json!({
                    "state": if i == 39 { "completed" } else { "active" },
                    "iteration": pass,
                    "remaining_bytes": (40 - i) << 22,
                    "throughput_bytes_per_s": 100u64 << 20,
                    "dirty_rate_bps": 50u64 << 20,
                    "cpu_throttle_percent": if throttle { pass * 10 } else { 0 },
                }),
            ));
        }
        s
    }

    fn well_formed(svg: &str) {
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.ends_with("</svg>\n"));
        // Every element that opens is closed (or self-closing).
        for tag in ["text", "title", "line"] {
            let open =
                svg.matches(&format!("<{tag} ")).count() + svg.matches(&format!("<{tag}>")).count();
            let closed = svg.matches(&format!("</{tag}>")).count();
            let selfc = svg
                .split(&format!("<{tag}"))
                .skip(1)
                .filter(|rest| rest.split('>').next().is_some_and(|h| h.ends_with('/')))
                .count();
            assert_eq!(open, closed + selfc, "<{tag}> not balanced");
        }
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
    }

    #[test]
    fn chart_has_lines_pass_markers_and_throttle() {
        let svg = chart("ram: one run <4 GiB> & more", &series(true));
        well_formed(&svg);
        assert!(svg.contains("&lt;4 GiB&gt; &amp; more"));
        // Passes 2, 3 and 4 begin inside the run (pass 1 at the first sample).
        assert_eq!(svg.matches(r#"class="pass""#).count(), 4);
        assert!(svg.contains(">p3</text>"));
        assert!(svg.contains(">completed</text>"));
        // remaining, throughput, dirty rate, throttle.
        assert_eq!(svg.matches("<polyline").count(), 4);
        assert!(svg.contains("CPU throttle"));
        if let Ok(p) = std::env::var("SVG_OUT") {
            std::fs::write(p, &svg).unwrap();
        }
    }

    #[test]
    fn no_throttle_line_when_zero_and_empty_is_fine() {
        let svg = chart("idle", &series(false));
        well_formed(&svg);
        assert_eq!(svg.matches("<polyline").count(), 3);
        assert!(!svg.contains("CPU throttle"));
        let empty = chart("nothing", &Series::default());
        well_formed(&empty);
        assert!(empty.contains("no samples"));
        assert_eq!(empty.matches("<polyline").count(), 0);
    }
}
