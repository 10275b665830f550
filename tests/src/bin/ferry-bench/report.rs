//! Markdown tables, raw JSON results and the benchmarks document.

use std::path::Path;

use serde_json::Value;

pub fn median(v: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = v.iter().cloned().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

pub fn min_max(v: &[f64]) -> Option<(f64, f64)> {
    let v: Vec<f64> = v.iter().cloned().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    Some((
        v.iter().cloned().fold(f64::INFINITY, f64::min),
        v.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
    ))
}

/// Formats an optional number with `prec` decimals, "–" when missing.
pub fn f(v: Option<f64>, prec: usize) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.prec$}"),
        _ => "–".into(),
    }
}

pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut s = String::new();
    s.push_str(&format!("| {} |\n", headers.join(" | ")));
    s.push_str(&format!("|{}\n", "---|".repeat(headers.len())));
    for r in rows {
        s.push_str(&format!("| {} |\n", r.join(" | ")));
    }
    s
}

pub fn met(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "**met**",
        Some(false) => "**not met**",
        None => "not measured",
    }
}

/// UTC date and time of now: ("YYYY-MM-DD", "HH:MM", "YYYYMMDD-HHMMSS").
pub fn now() -> (String, String, String) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let days = secs.div_euclid(86400);
    let sod = secs.rem_euclid(86400);
    // Civil from days (H. Hinnant).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    let (hh, mm, ss) = (sod / 3600, sod % 3600 / 60, sod % 60);
    (
        format!("{y:04}-{m:02}-{d:02}"),
        format!("{hh:02}:{mm:02}"),
        format!("{y:04}{m:02}{d:02}-{hh:02}{mm:02}{ss:02}"),
    )
}

/// "AMD EPYC, 2 vCPU, 24 GiB, nested PVM KVM".
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpu
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let ncpu = cpu.lines().filter(|l| l.starts_with("processor")).count();
    let (total, _) = crate::procfs::meminfo();
    let pvm = if Path::new("/sys/module/kvm_pvm").exists() {
        ", nested PVM KVM"
    } else {
        ""
    };
    format!(
        "{model}, {ncpu} vCPU, {:.0} GiB RAM{pvm}",
        total as f64 / (1u64 << 30) as f64
    )
}

/// Writes raw results to `dir/NAME-STAMP.json`; returns the path.
pub fn write_json(dir: &Path, name: &str, v: &Value) -> String {
    let _ = std::fs::create_dir_all(dir);
    let p = dir.join(format!("{name}-{}.json", now().2));
    match std::fs::write(&p, serde_json::to_string_pretty(v).unwrap_or_default()) {
        Ok(()) => p.display().to_string(),
        Err(e) => format!("(could not write {}: {e})", p.display()),
    }
}

/// Replaces the text between `<!-- ferry-bench:NAME begin -->` and
/// `<!-- ferry-bench:NAME end -->` in `doc` (appends the block if absent).
pub fn update_doc(doc: &Path, name: &str, body: &str) -> std::io::Result<()> {
    let begin = format!("<!-- ferry-bench:{name} begin -->");
    let end = format!("<!-- ferry-bench:{name} end -->");
    let old = std::fs::read_to_string(doc).unwrap_or_default();
    let block = format!("{begin}\n{}\n{end}", body.trim_end());
    let new = match (old.find(&begin), old.find(&end)) {
        (Some(b), Some(e)) if e > b => format!("{}{}{}", &old[..b], block, &old[e + end.len()..]),
        _ => format!("{}\n{}\n", old.trim_end(), block),
    };
    if let Some(dir) = doc.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(doc, new)
}
