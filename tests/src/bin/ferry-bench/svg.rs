//! Hand-written SVG line charts (no dependencies).

use std::fmt::Write;

/// A point: x, y and an optional (min, max) whisker.
pub type Point = (f64, f64, Option<(f64, f64)>);

/// One line of a chart: label, colour and points (x, y). `y` may carry an
/// optional (min, max) range drawn as a whisker.
pub struct Series {
    pub name: String,
    pub color: &'static str,
    pub points: Vec<Point>,
}

/// A line of one value per run (run k at x = k, from 1); runs without a
/// value are left out.
pub fn per_run(
    name: String,
    color: &'static str,
    values: impl IntoIterator<Item = Option<f64>>,
) -> Series {
    Series {
        name,
        color,
        points: values
            .into_iter()
            .enumerate()
            .filter_map(|(k, v)| v.map(|y| ((k + 1) as f64, y, None)))
            .collect(),
    }
}

pub const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

pub(crate) fn nice_step(range: f64, ticks: f64) -> f64 {
    let raw = (range / ticks).max(1e-9);
    let mag = 10f64.powf(raw.log10().floor());
    let n = raw / mag;
    let s = if n <= 1.0 {
        1.0
    } else if n <= 2.0 {
        2.0
    } else if n <= 5.0 {
        5.0
    } else {
        10.0
    };
    s * mag
}

pub(crate) fn fmt_num(v: f64) -> String {
    if v == v.round() {
        format!("{}", v as i64)
    } else {
        format!("{v:.2}").trim_end_matches('0').to_string()
    }
}

pub(crate) fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A line chart. `xticks` are the x values to label (the data's x values, typically).
/// `hline` draws a dashed reference line (label, y).
pub fn line_chart(
    title: &str,
    xlabel: &str,
    ylabel: &str,
    xticks: &[f64],
    series: &[Series],
    hline: Option<(&str, f64)>,
) -> String {
    let (w, h) = (720.0, 440.0);
    let (ml, mr, mt, mb) = (80.0, 190.0, 50.0, 60.0);
    let (pw, ph) = (w - ml - mr, h - mt - mb);
    let xs: Vec<f64> = xticks.to_vec();
    let (xmin, xmax) = (
        xs.iter().cloned().fold(f64::INFINITY, f64::min),
        xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
    );
    let mut ymax: f64 = 0.0;
    for s in series {
        for &(_, y, r) in &s.points {
            ymax = ymax.max(y).max(r.map(|r| r.1).unwrap_or(0.0));
        }
    }
    if let Some((_, y)) = hline {
        ymax = ymax.max(y);
    }
    if ymax <= 0.0 {
        ymax = 1.0;
    }
    let step = nice_step(ymax * 1.1, 5.0);
    let ytop = (ymax * 1.1 / step).ceil() * step;
    let xspan = if xmax > xmin { xmax - xmin } else { 1.0 };
    // 5% padding on both sides so that points do not sit on the axis.
    let px = |x: f64| ml + pw * (0.05 + 0.9 * (x - xmin) / xspan);
    let py = |y: f64| mt + ph - y / ytop * ph;

    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(o, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        o,
        r#"<text x="{}" y="28" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
        ml + pw / 2.0,
        esc(title)
    );
    // Grid and y ticks.
    let mut y = 0.0;
    while y <= ytop + 1e-9 {
        let yy = py(y);
        let _ = writeln!(
            o,
            r##"<line x1="{ml}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/>"##,
            ml + pw
        );
        let _ = writeln!(
            o,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            ml - 6.0,
            yy + 4.0,
            fmt_num(y)
        );
        y += step;
    }
    // X ticks.
    for &x in &xs {
        let xx = px(x);
        let _ = writeln!(
            o,
            r##"<line x1="{xx:.1}" y1="{:.1}" x2="{xx:.1}" y2="{:.1}" stroke="#333"/>"##,
            mt + ph,
            mt + ph + 5.0
        );
        let _ = writeln!(
            o,
            r#"<text x="{xx:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            mt + ph + 19.0,
            fmt_num(x)
        );
    }
    // Axes.
    let _ = writeln!(
        o,
        r##"<line x1="{ml}" y1="{mt}" x2="{ml}" y2="{:.1}" stroke="#333"/>"##,
        mt + ph
    );
    let _ = writeln!(
        o,
        r##"<line x1="{ml}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#333"/>"##,
        mt + ph,
        ml + pw,
        mt + ph
    );
    let _ = writeln!(
        o,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        ml + pw / 2.0,
        h - 15.0,
        esc(xlabel)
    );
    let _ = writeln!(
        o,
        r#"<text x="20" y="{:.1}" text-anchor="middle" transform="rotate(-90 20 {:.1})">{}</text>"#,
        mt + ph / 2.0,
        mt + ph / 2.0,
        esc(ylabel)
    );
    if let Some((label, yv)) = hline {
        let yy = py(yv);
        let _ = writeln!(
            o,
            r##"<line x1="{ml}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#888" stroke-dasharray="6,4"/>"##,
            ml + pw
        );
        let _ = writeln!(
            o,
            r##"<text x="{:.1}" y="{:.1}" fill="#666">{}</text>"##,
            ml + pw + 6.0,
            yy + 4.0,
            esc(label)
        );
    }
    for (i, s) in series.iter().enumerate() {
        let pts: Vec<String> = s
            .points
            .iter()
            .map(|&(x, y, _)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        let _ = writeln!(
            o,
            r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>"#,
            s.color,
            pts.join(" ")
        );
        // Long time series (hundreds of samples) are drawn as plain lines.
        let markers = s.points.len() <= 60;
        for &(x, y, r) in s.points.iter().filter(|_| markers) {
            if let Some((lo, hi)) = r {
                let _ = writeln!(
                    o,
                    r#"<line x1="{0:.1}" y1="{1:.1}" x2="{0:.1}" y2="{2:.1}" stroke="{3}" stroke-width="1"/>"#,
                    px(x),
                    py(lo),
                    py(hi),
                    s.color
                );
            }
            let _ = writeln!(
                o,
                r#"<circle cx="{:.1}" cy="{:.1}" r="4" fill="{}"><title>{}: {}</title></circle>"#,
                px(x),
                py(y),
                s.color,
                esc(&s.name),
                fmt_num((y * 10.0).round() / 10.0)
            );
        }
        let ly = mt + 10.0 + i as f64 * 20.0;
        let lx = ml + pw + 20.0;
        let _ = writeln!(
            o,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{}" stroke-width="2"/>"#,
            lx + 20.0,
            s.color
        );
        let _ = writeln!(
            o,
            r#"<text x="{}" y="{}">{}</text>"#,
            lx + 26.0,
            ly + 4.0,
            esc(&s.name)
        );
    }
    o.push_str("</svg>\n");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_is_well_formed() {
        let s = line_chart(
            "Downtime vs devices",
            "devices",
            "downtime (ms)",
            &[1.0, 2.0, 4.0],
            &[
                Series {
                    name: "main".into(),
                    color: COLORS[0],
                    points: vec![
                        (1.0, 450.0, Some((430.0, 470.0))),
                        (2.0, 900.0, None),
                        (4.0, 1800.0, None),
                    ],
                },
                Series {
                    name: "channels".into(),
                    color: COLORS[1],
                    points: vec![(1.0, 440.0, None), (2.0, 460.0, None), (4.0, 520.0, None)],
                },
            ],
            Some(("best + 10%", 480.0)),
        );
        assert!(s.starts_with("<svg") && s.ends_with("</svg>\n"));
        assert_eq!(s.matches("<polyline").count(), 2);
        if let Ok(p) = std::env::var("SVG_OUT") {
            std::fs::write(p, &s).unwrap();
        }
    }
}
