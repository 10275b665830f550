//! Accepted ranges of the numeric API fields and their checks.

use crate::error::MigrationError;

/// Accepted range of one numeric API field (inclusive at both ends).
///
/// Invariant: `min <= max`; the error of every check names `field` and the
/// range, as in `connections must be in 1..=64, got 0`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    /// The JSON field name.
    pub field: &'static str,
    /// The range.
    pub range: Range,
}

/// The kinds of numeric ranges of [`Limit`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Range {
    /// An integer field.
    Int(u64, u64),
    /// A (finite) floating-point field.
    Float(f64, f64),
    /// An integer field that also takes the string `"auto"`.
    IntOrAuto(u64, u64),
}

impl std::fmt::Display for Range {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Range::Int(a, b) => write!(f, "{a}..={b}"),
            Range::Float(a, b) => write!(f, "{a}..={b}"),
            Range::IntOrAuto(a, b) => write!(f, "{a}..={b} or \"auto\""),
        }
    }
}

impl Limit {
    fn refuse(&self, got: impl std::fmt::Display) -> MigrationError {
        MigrationError::InvalidParams(format!(
            "{} must be in {}, got {got}",
            self.field, self.range
        ))
    }

    /// Checks an integer value of the field.
    pub fn check_int(&self, v: u64) -> Result<(), MigrationError> {
        match self.range {
            Range::Int(a, b) | Range::IntOrAuto(a, b) if (a..=b).contains(&v) => Ok(()),
            Range::Float(a, b) if (a..=b).contains(&(v as f64)) => Ok(()),
            _ => Err(self.refuse(v)),
        }
    }

    /// Checks a floating-point value of the field (NaN and infinities are
    /// out of every range).
    pub fn check_float(&self, v: f64) -> Result<(), MigrationError> {
        match self.range {
            Range::Float(a, b) if v.is_finite() && (a..=b).contains(&v) => Ok(()),
            _ => Err(self.refuse(v)),
        }
    }

    /// Checks a value of the field before it is typed (e.g. a JSON
    /// number), so that a negative, fractional, huge or non-numeric value is
    /// refused with the field and its range named (serde's own message names
    /// neither): `int` is the value if it is a non-negative integer that
    /// fits a u64, `float` if it is a number at all, `shown` how to print it.
    pub fn check_untyped(
        &self,
        int: Option<u64>,
        float: Option<f64>,
        shown: &dyn std::fmt::Display,
    ) -> Result<(), MigrationError> {
        match (self.range, int, float) {
            (Range::Int(..) | Range::IntOrAuto(..), Some(i), _) => self.check_int(i),
            (Range::Float(..), _, Some(f)) => self.check_float(f),
            _ => Err(self.refuse(shown)),
        }
    }

    /// [`Limit::check_untyped`] on a JSON value, which may also be the
    /// string `"auto"` where the range allows it.
    pub fn check_json(&self, v: &serde_json::Value) -> Result<(), MigrationError> {
        if matches!(self.range, Range::IntOrAuto(..)) && v.as_str() == Some("auto") {
            return Ok(());
        }
        self.check_untyped(v.as_u64(), v.as_f64(), v)
    }
}
