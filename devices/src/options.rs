//! The one grammar of Ferry's command-line option values: comma-separated
//! `key=value` lists ([`KeyValues`]) and sizes ([`parse_size`]).
//!
//! Every option value of `ferry` goes through here: `--memory`, `--cpus`
//! and `--serial` (in `vmm::config`), `--sim-vfio`
//! ([`crate::sim_vfio::parse_sim_vfio_arg`]) and `--vfio`
//! ([`crate::vfio::parse_vfio_arg`]). It lives in `devices` because that is
//! the lowest crate that parses options; `vmm` uses it from above.
//!
//! # Key-value lists
//!
//! `key=value[,key=value]...`
//! - Items are separated by `,`; a value runs to the next `,` and may
//!   contain `=` (the item is split at its first `=`).
//! - Keys are case-sensitive and must be among the keys the caller accepts.
//! - Each key may be given at most once.
//! - Empty items (`a=1,,b=2`, a trailing `,`, an empty string) and empty
//!   values (`file=`) are refused.
//! - A caller may name one *bare* key: an item without `=` is then the value
//!   of that key (`--memory 1G` means `--memory size=1G`).
//!
//! # Sizes
//!
//! A decimal byte count with an optional binary multiplier: `4096`, `64K`,
//! `16M`, `1G`, `2T` (1024-based).
//! - The multiplier letter `K`, `M`, `G`, `T` may be upper or lower case.
//! - It may be followed by `B`, `iB` or `ib` (`16MB`, `16MiB`, `16mib`); a
//!   plain count may end in `B` (`4096B`). A lone lower-case `b` is refused
//!   (it reads as bits).
//! - No sign, no fraction, no space inside; whitespace around the whole
//!   value is ignored.
//! - A value that does not fit in 64 bits is refused, never wrapped.
//!
//! # Flags
//!
//! `on`/`off`, `true`/`false`, `yes`/`no`, `1`/`0` (lower case).

/// Why a size was refused.
///
/// Invariant: the message quotes the value as given and fits on one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// The value is empty (or only whitespace).
    #[error("empty size")]
    Empty,
    /// The value is not in the size grammar.
    #[error("`{0}` is not a size (use a byte count or e.g. 64K, 16M, 4G, 2T)")]
    Invalid(String),
    /// The value does not fit in 64 bits.
    #[error("size `{0}` is too large")]
    Overflow(String),
}

/// Parses a size (see the [module documentation](self) for the grammar).
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    if t.is_empty() {
        return Err(SizeError::Empty);
    }
    let invalid = || SizeError::Invalid(s.to_string());
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(digits_end);
    if digits.is_empty() {
        return Err(invalid());
    }
    let mut chars = suffix.chars();
    let shift = match chars.next() {
        None => 0,
        Some('B') if chars.as_str().is_empty() => 0,
        Some(c) => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(invalid()),
            };
            if !matches!(chars.as_str(), "" | "B" | "iB" | "ib") {
                return Err(invalid());
            }
            shift
        }
    };
    // Only ASCII digits remain, so the one way `parse` fails is overflow.
    let n: u64 = digits
        .parse()
        .map_err(|_| SizeError::Overflow(s.to_string()))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::Overflow(s.to_string()))
}

/// Why an option value was refused.
///
/// Invariant: the message names the offending item or key and fits on one
/// line; callers add which option (`--memory`, ...) it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    /// An empty item: an empty value string, `,,` or a trailing `,`.
    #[error("empty item (expected key=value)")]
    EmptyItem,
    /// An item without `=` where no bare value is accepted (or a second
    /// bare value).
    #[error("expected key=value, got `{0}`")]
    NotKeyValue(String),
    /// `key=` with nothing after the `=`.
    #[error("`{0}=` needs a value")]
    EmptyValue(String),
    /// A key the option does not know.
    #[error("unknown key `{key}` (known: {known})")]
    UnknownKey {
        /// The key as given.
        key: String,
        /// The accepted keys, comma-separated.
        known: String,
    },
    /// A key given more than once.
    #[error("`{0}` given twice")]
    Duplicate(String),
    /// A required key is absent.
    #[error("missing {0}=")]
    Missing(String),
    /// A size value was refused.
    #[error("{key}: {source}")]
    Size {
        /// The key.
        key: String,
        /// Why.
        source: SizeError,
    },
    /// A flag value is not one of the flag words.
    #[error("{key} must be on or off, not `{value}`")]
    Flag {
        /// The key.
        key: String,
        /// The value as given.
        value: String,
    },
    /// A number value is not a decimal integer that fits in 64 bits.
    #[error("{key}: `{value}` is not a number")]
    Number {
        /// The key.
        key: String,
        /// The value as given.
        value: String,
    },
}

/// A parsed `key=value[,key=value]...` list.
///
/// Invariant: every key is one of the keys accepted at parse time, appears
/// once, and has a non-empty value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValues<'a> {
    items: Vec<(&'a str, &'a str)>,
}

impl<'a> KeyValues<'a> {
    /// Parses `s`, accepting the keys in `known`; an item without `=` is the
    /// value of `bare` (refused when `bare` is `None`).
    pub fn parse(
        s: &'a str,
        known: &[&str],
        bare: Option<&'static str>,
    ) -> Result<Self, OptionError> {
        let mut items: Vec<(&'a str, &'a str)> = Vec::new();
        for item in s.split(',') {
            if item.is_empty() {
                return Err(OptionError::EmptyItem);
            }
            let (key, value) = match (item.split_once('='), bare) {
                (Some(kv), _) => kv,
                (None, Some(b)) => (b, item),
                (None, None) => return Err(OptionError::NotKeyValue(item.to_string())),
            };
            if !known.contains(&key) {
                return Err(OptionError::UnknownKey {
                    key: key.to_string(),
                    known: known.join(", "),
                });
            }
            if items.iter().any(|(k, _)| *k == key) {
                // A second bare value reads better as "not key=value".
                return Err(if item.contains('=') {
                    OptionError::Duplicate(key.to_string())
                } else {
                    OptionError::NotKeyValue(item.to_string())
                });
            }
            if value.is_empty() {
                return Err(OptionError::EmptyValue(key.to_string()));
            }
            items.push((key, value));
        }
        Ok(KeyValues { items })
    }

    /// The value of `key`, if given.
    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.items.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }

    /// The value of `key`, which must be given.
    pub fn required(&self, key: &str) -> Result<&'a str, OptionError> {
        self.get(key)
            .ok_or_else(|| OptionError::Missing(key.to_string()))
    }

    /// The value of `key` as a size ([`parse_size`]).
    pub fn size(&self, key: &str) -> Result<Option<u64>, OptionError> {
        self.get(key)
            .map(|v| {
                parse_size(v).map_err(|source| OptionError::Size {
                    key: key.to_string(),
                    source,
                })
            })
            .transpose()
    }

    /// The value of `key` as a flag (`on`/`off`, `true`/`false`,
    /// `yes`/`no`, `1`/`0`; whitespace around it is ignored).
    pub fn flag(&self, key: &str) -> Result<Option<bool>, OptionError> {
        self.get(key)
            .map(|v| match v.trim() {
                "on" | "true" | "yes" | "1" => Ok(true),
                "off" | "false" | "no" | "0" => Ok(false),
                _ => Err(OptionError::Flag {
                    key: key.to_string(),
                    value: v.to_string(),
                }),
            })
            .transpose()
    }

    /// The value of `key` as a decimal `u64` (whitespace around it is
    /// ignored; no sign, no suffix).
    pub fn number(&self, key: &str) -> Result<Option<u64>, OptionError> {
        self.get(key)
            .map(|v| {
                let t = v.trim();
                t.bytes()
                    .all(|b| b.is_ascii_digit())
                    .then(|| t.parse().ok())
                    .flatten()
                    .ok_or_else(|| OptionError::Number {
                        key: key.to_string(),
                        value: v.to_string(),
                    })
            })
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_plain_and_with_multipliers() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("16M"), Ok(16 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1024K"), Ok(1 << 20));
        assert_eq!(parse_size("007"), Ok(7));
        assert_eq!(parse_size(" 1G "), Ok(1 << 30), "outer whitespace");
    }

    #[test]
    fn size_case_rules() {
        for (s, v) in [
            ("1k", 1 << 10),
            ("1m", 1 << 20),
            ("1g", 1 << 30),
            ("1t", 1 << 40),
            ("4096B", 4096),
            ("8KB", 8 << 10),
            ("8KiB", 8 << 10),
            ("8Kib", 8 << 10),
            ("2MB", 2 << 20),
            ("2mB", 2 << 20),
            ("4GiB", 4 << 30),
            ("4gib", 4 << 30),
            ("1TB", 1 << 40),
        ] {
            assert_eq!(parse_size(s), Ok(v), "{s}");
        }
        for bad in [
            "1Kb", "1b", "4096b", "1KIB", "1KBB", "1iB", "1ib", "1KiBB", "1P", "1X", "12Q",
        ] {
            assert!(
                matches!(parse_size(bad), Err(SizeError::Invalid(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn size_refusals() {
        assert_eq!(parse_size(""), Err(SizeError::Empty));
        assert_eq!(parse_size("   "), Err(SizeError::Empty));
        for bad in [
            "M", "K1", "-1", "+1", "-1G", "1.5G", "1,5G", "1 M", "1_000", "lots", "0x10", "G1",
            "1GG",
        ] {
            assert!(
                matches!(parse_size(bad), Err(SizeError::Invalid(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn size_overflow() {
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
        for bad in [
            "18446744073709551616",
            "99999999999999999999G",
            "17179869184G",
            "16777216T",
        ] {
            let e = parse_size(bad);
            assert!(
                matches!(e, Err(SizeError::Overflow(_)) | Err(SizeError::Invalid(_))),
                "{bad}: {e:?}"
            );
        }
        assert!(matches!(
            parse_size("17179869184G"),
            Err(SizeError::Overflow(_))
        ));
        assert_eq!(parse_size("16777215T"), Ok(16777215 << 40));
        assert!(matches!(
            parse_size("16777216T"),
            Err(SizeError::Overflow(_))
        ));
    }

    const KEYS: &[&str] = &["size", "file", "shared"];

    #[test]
    fn key_values() {
        let kv = KeyValues::parse("size=1G,file=/tmp/a=b,shared=on", KEYS, None).unwrap();
        assert_eq!(kv.get("size"), Some("1G"));
        assert_eq!(kv.get("file"), Some("/tmp/a=b"), "split at the first =");
        assert_eq!(kv.size("size"), Ok(Some(1 << 30)));
        assert_eq!(kv.flag("shared"), Ok(Some(true)));
        assert_eq!(kv.get("nope"), None);
        assert_eq!(kv.size("nope"), Ok(None));
        assert_eq!(kv.required("file"), Ok("/tmp/a=b"));
        let kv = KeyValues::parse("file=x", KEYS, None).unwrap();
        assert_eq!(
            kv.required("size"),
            Err(OptionError::Missing("size".into()))
        );
    }

    #[test]
    fn key_value_refusals() {
        let p = |s| KeyValues::parse(s, KEYS, None);
        assert_eq!(p(""), Err(OptionError::EmptyItem));
        assert_eq!(p("size=1G,,shared=on"), Err(OptionError::EmptyItem));
        assert_eq!(p("size=1G,"), Err(OptionError::EmptyItem));
        assert_eq!(p(",size=1G"), Err(OptionError::EmptyItem));
        assert_eq!(p("size"), Err(OptionError::NotKeyValue("size".into())));
        assert_eq!(p("file="), Err(OptionError::EmptyValue("file".into())));
        assert_eq!(
            p("size=1G,size=2G"),
            Err(OptionError::Duplicate("size".into()))
        );
        assert!(matches!(
            p("size=1G,colour=blue"),
            Err(OptionError::UnknownKey { ref key, ref known }) if key == "colour" && known == "size, file, shared"
        ));
        assert!(
            matches!(p("Size=1G"), Err(OptionError::UnknownKey { .. })),
            "keys are case-sensitive"
        );
        assert!(
            matches!(p(" size=1G"), Err(OptionError::UnknownKey { .. })),
            "keys are not trimmed"
        );
        assert!(matches!(p("=1G"), Err(OptionError::UnknownKey { .. })));
    }

    #[test]
    fn bare_values() {
        let p = |s| KeyValues::parse(s, KEYS, Some("size"));
        assert_eq!(p("2G").unwrap().size("size"), Ok(Some(2 << 30)));
        assert_eq!(p("shared=on,2G").unwrap().get("size"), Some("2G"));
        assert_eq!(p("2G,3G"), Err(OptionError::NotKeyValue("3G".into())));
        assert_eq!(p("size=2G,3G"), Err(OptionError::NotKeyValue("3G".into())));
        assert_eq!(p("3G,size=2G"), Err(OptionError::Duplicate("size".into())));
        assert_eq!(p(""), Err(OptionError::EmptyItem));
    }

    #[test]
    fn typed_values() {
        let kv = KeyValues::parse("size=12Q,shared=maybe,file=x", KEYS, None).unwrap();
        assert!(matches!(kv.size("size"), Err(OptionError::Size { .. })));
        assert!(matches!(kv.flag("shared"), Err(OptionError::Flag { .. })));
        assert!(matches!(kv.number("file"), Err(OptionError::Number { .. })));
        for (v, b) in [
            ("on", true),
            ("true", true),
            ("yes", true),
            ("1", true),
            ("off", false),
            ("false", false),
            ("no", false),
            ("0", false),
        ] {
            let s = format!("shared={v}");
            let kv = KeyValues::parse(&s, KEYS, None).unwrap();
            assert_eq!(kv.flag("shared"), Ok(Some(b)), "{v}");
        }
        for bad in ["ON", "On", "2", "y", "enabled"] {
            let s = format!("shared={bad}");
            let kv = KeyValues::parse(&s, KEYS, None).unwrap();
            assert!(kv.flag("shared").is_err(), "{bad}");
        }
        for (v, n) in [("0", Some(0)), ("254", Some(254)), (" 7 ", Some(7))] {
            let s = format!("size={v}");
            assert_eq!(
                KeyValues::parse(&s, KEYS, None).unwrap().number("size"),
                Ok(n)
            );
        }
        for bad in ["-1", "+1", "1K", "x", "99999999999999999999"] {
            let s = format!("size={bad}");
            assert!(
                KeyValues::parse(&s, KEYS, None)
                    .unwrap()
                    .number("size")
                    .is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn messages_are_one_line_and_name_the_item() {
        let e = KeyValues::parse("size=1G,colour=blue", KEYS, None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown key `colour` (known: size, file, shared)"
        );
        let kv = KeyValues::parse("size=lots", KEYS, None).unwrap();
        let e = kv.size("size").unwrap_err().to_string();
        assert!(
            e.contains("size") && e.contains("lots") && !e.contains('\n'),
            "{e}"
        );
    }
}
