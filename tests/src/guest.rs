//! The stamp guest's serial output: [`SerialLog`] tails a `--serial
//! file=PATH` file, the `parse_*` functions read the guest's lines, and
//! [`check_stream`] checks the output of all hosts a guest ran on.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::util::poll;

/// A serial output file written by ferry's `--serial file=PATH`.
#[derive(Debug, Clone)]
pub struct SerialLog {
    path: PathBuf,
}

impl SerialLog {
    /// Tails `path` (which may not exist yet).
    pub fn new(path: impl Into<PathBuf>) -> SerialLog {
        SerialLog { path: path.into() }
    }
    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Everything written so far (lossy UTF-8, `\r` removed).
    pub fn text(&self) -> String {
        let bytes = fs::read(&self.path).unwrap_or_default();
        String::from_utf8_lossy(&bytes).replace('\r', "")
    }
    /// The complete (newline-terminated) lines written so far.
    pub fn lines(&self) -> Vec<String> {
        complete_lines(&self.text())
    }
    /// Waits until a complete line satisfies `pred`; returns it.
    pub fn wait_for_line(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        poll(timeout, || self.lines().into_iter().find(|l| pred(l)))
    }
    /// Waits until the guest has completed pass `n` (or a later one); returns the last pass.
    pub fn wait_for_pass(&self, n: u64, timeout: Duration) -> Option<u64> {
        poll(timeout, || self.last_pass().filter(|&p| p >= n))
    }
    /// Numbers of the `stamp: pass <n> ok` lines, in order.
    pub fn passes(&self) -> Vec<u64> {
        pass_numbers(&self.lines())
    }
    /// The last completed pass.
    pub fn last_pass(&self) -> Option<u64> {
        self.passes().last().copied()
    }
    /// The first `stamp: MISMATCH` line, if any.
    pub fn mismatch(&self) -> Option<String> {
        self.text()
            .lines()
            .find(|l| l.contains("MISMATCH"))
            .map(str::to_string)
    }
    /// The first `stamp: NONZERO` line (zero-check=1), if any.
    pub fn nonzero(&self) -> Option<String> {
        self.text()
            .lines()
            .find(|l| l.contains("NONZERO"))
            .map(str::to_string)
    }
    /// Values of the `stamp: ticks <n>` lines (timer=1), in order.
    pub fn ticks(&self) -> Vec<u64> {
        self.lines().iter().filter_map(|l| parse_ticks(l)).collect()
    }
    /// Numbers of the `stamp: zero-check <n> ok` lines (zero-check=1), in order.
    pub fn zero_checks(&self) -> Vec<u64> {
        self.lines()
            .iter()
            .filter_map(|l| parse_zero_check(l))
            .collect()
    }
    /// The `stamp: boot mem=<MiB> region=<MiB>` line parsed as (mem, region).
    pub fn boot(&self) -> Option<(u64, u64)> {
        self.lines().iter().find_map(|l| parse_boot(l))
    }
    /// Last lines of the file, for failure messages.
    pub fn tail(&self, n: usize) -> String {
        let t = self.text();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// Complete lines of `text` (a trailing fragment without newline is left out).
pub fn complete_lines(text: &str) -> Vec<String> {
    let mut v: Vec<String> = text.split('\n').map(str::to_string).collect();
    v.pop(); // after the last '\n': empty or an incomplete line
    v
}

/// Parses `stamp: pass <n> ok`.
pub fn parse_pass(line: &str) -> Option<u64> {
    let rest = line.trim().strip_prefix("stamp: pass ")?;
    let (n, tail) = rest.split_once(' ')?;
    if tail.trim() != "ok" {
        return None;
    }
    n.parse().ok()
}

/// Parses `stamp: ticks <n>`.
pub fn parse_ticks(line: &str) -> Option<u64> {
    line.trim().strip_prefix("stamp: ticks ")?.parse().ok()
}

/// Parses `stamp: zero-check <n> ok`.
pub fn parse_zero_check(line: &str) -> Option<u64> {
    let rest = line.trim().strip_prefix("stamp: zero-check ")?;
    rest.strip_suffix(" ok")?.parse().ok()
}

/// Parses `stamp: boot mem=<MiB> region=<MiB>` into (mem, region).
pub fn parse_boot(line: &str) -> Option<(u64, u64)> {
    let rest = line.trim().strip_prefix("stamp: boot ")?;
    let mut mem = None;
    let mut region = None;
    for kv in rest.split_whitespace() {
        if let Some(v) = kv.strip_prefix("mem=") {
            mem = v.parse().ok();
        } else if let Some(v) = kv.strip_prefix("region=") {
            region = v.parse().ok();
        }
    }
    Some((mem?, region?))
}

/// Pass numbers of the pass lines among `lines`.
pub fn pass_numbers(lines: &[String]) -> Vec<u64> {
    lines.iter().filter_map(|l| parse_pass(l)).collect()
}

/// Checks that the concatenated serial output of the hosts a guest ran on
/// (in order) is one clean stream: no MISMATCH or NONZERO, no garbage line,
/// passes and zero-check sweeps each numbered 1, 2, 3, ... without gap or
/// repeat, tick counts strictly increasing. A line split across two hosts at
/// switch-over joins up again in the concatenation. Returns the passes.
pub fn check_stream(logs: &[&SerialLog]) -> Vec<u64> {
    let text: String = logs.iter().map(|l| l.text()).collect();
    let describe = || {
        logs.iter()
            .enumerate()
            .map(|(i, l)| format!("--- host {} ({}):\n{}", i, l.path().display(), l.tail(8)))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        !text.contains("MISMATCH"),
        "guest saw a MISMATCH:\n{}",
        describe()
    );
    assert!(
        !text.contains("NONZERO"),
        "guest saw a page it never wrote holding data (NONZERO):\n{}",
        describe()
    );
    let lines = complete_lines(&text);
    for l in &lines {
        let l = l.trim();
        assert!(
            l.is_empty()
                || parse_pass(l).is_some()
                || parse_boot(l).is_some()
                || l.starts_with("stamp: "),
            "unexpected serial line {:?}:\n{}",
            l,
            describe()
        );
    }
    let passes = pass_numbers(&lines);
    for (i, p) in passes.iter().enumerate() {
        assert_eq!(
            *p,
            i as u64 + 1,
            "pass numbers not consecutive ({:?}):\n{}",
            passes,
            describe()
        );
    }
    let sweeps: Vec<u64> = lines.iter().filter_map(|l| parse_zero_check(l)).collect();
    assert!(
        sweeps.iter().enumerate().all(|(i, n)| *n == i as u64 + 1),
        "zero-check sweeps not consecutive ({:?}):\n{}",
        sweeps,
        describe()
    );
    let ticks: Vec<u64> = lines.iter().filter_map(|l| parse_ticks(l)).collect();
    assert!(
        ticks.windows(2).all(|w| w[0] < w[1]),
        "tick counts not increasing ({:?}):\n{}",
        ticks,
        describe()
    );
    passes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::TempDir;

    #[test]
    fn parses_stamp_lines() {
        assert_eq!(parse_pass("stamp: pass 12 ok"), Some(12));
        assert_eq!(parse_pass("stamp: pass 12 ok\r"), Some(12));
        assert_eq!(parse_pass("stamp: pass 12"), None);
        assert_eq!(parse_pass("ss 12 ok"), None);
        assert_eq!(parse_boot("stamp: boot mem=512 region=16"), Some((512, 16)));
        assert_eq!(parse_boot("stamp: boot mem=512"), None);
        assert_eq!(parse_ticks("stamp: ticks 256\r"), Some(256));
        assert_eq!(parse_ticks("stamp: ticks"), None);
        assert_eq!(parse_zero_check("stamp: zero-check 3 ok"), Some(3));
        assert_eq!(parse_zero_check("stamp: zero-check 3"), None);
        assert_eq!(complete_lines("a\nb\nc"), vec!["a", "b"]);
        assert_eq!(complete_lines(""), Vec::<String>::new());
    }

    #[test]
    fn stream_joins_lines_split_at_switch_over() {
        let dir = TempDir::new("harness");
        let a = dir.join("a.log");
        let b = dir.join("b.log");
        fs::write(
            &a,
            "stamp: boot mem=512 region=16\nstamp: pass 1 ok\nstamp: pa",
        )
        .unwrap();
        fs::write(&b, "ss 2 ok\nstamp: pass 3 ok\n").unwrap();
        let (a, b) = (SerialLog::new(a), SerialLog::new(b));
        assert_eq!(check_stream(&[&a, &b]), vec![1, 2, 3]);
        assert_eq!(a.passes(), vec![1]);
    }

    #[test]
    #[should_panic(expected = "not consecutive")]
    fn stream_detects_a_gap() {
        let dir = TempDir::new("harness");
        let a = dir.join("a.log");
        fs::write(&a, "stamp: pass 1 ok\nstamp: pass 3 ok\n").unwrap();
        check_stream(&[&SerialLog::new(a)]);
    }

    #[test]
    fn stream_checks_ticks_and_sweeps() {
        let dir = TempDir::new("harness");
        let a = dir.join("a.log");
        let b = dir.join("b.log");
        fs::write(&a, "stamp: zero-check 1 ok\nstamp: ticks 256\nstamp: tic").unwrap();
        fs::write(&b, "ks 512\nstamp: zero-check 2 ok\n").unwrap();
        let (a, b) = (SerialLog::new(a), SerialLog::new(b));
        check_stream(&[&a, &b]);
        assert_eq!(b.ticks(), Vec::<u64>::new());
        assert_eq!(b.zero_checks(), vec![2]);
    }

    #[test]
    #[should_panic(expected = "tick counts not increasing")]
    fn stream_detects_ticks_going_back() {
        let dir = TempDir::new("harness");
        let a = dir.join("a.log");
        fs::write(&a, "stamp: ticks 512\nstamp: ticks 256\n").unwrap();
        check_stream(&[&SerialLog::new(a)]);
    }

    #[test]
    #[should_panic(expected = "NONZERO")]
    fn stream_detects_nonzero() {
        let dir = TempDir::new("harness");
        let a = dir.join("a.log");
        fs::write(&a, "stamp: NONZERO page=400 found=a5\n").unwrap();
        check_stream(&[&SerialLog::new(a)]);
    }

    #[test]
    #[should_panic(expected = "MISMATCH")]
    fn stream_detects_a_mismatch() {
        let dir = TempDir::new("harness");
        let a = dir.join("a.log");
        fs::write(
            &a,
            "stamp: pass 1 ok\nstamp: MISMATCH page=3 expected=1 found=2\n",
        )
        .unwrap();
        check_stream(&[&SerialLog::new(a)]);
    }
}
