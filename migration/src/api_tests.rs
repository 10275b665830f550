//! Unit tests of the request types and their checks (`crate::api`).

use super::*;

/// The limit's boundaries pass; one past them, NaN, infinities and
/// untyped values of the wrong kind are refused with the field and the
/// range named.
fn check_limit(l: &Limit) {
    let want = format!("{} must be in {}", l.field, l.range);
    let refused = |r: Result<(), MigrationError>, what: &str| {
        let e = r.expect_err(&format!("{} = {what} accepted", l.field));
        assert!(
            matches!(e, MigrationError::InvalidParams(_)) && e.to_string().contains(&want),
            "{} = {what}: {e}",
            l.field
        );
    };
    match l.range {
        Range::Int(a, b) | Range::IntOrAuto(a, b) => {
            l.check_int(a).unwrap();
            l.check_int(b).unwrap();
            refused(l.check_int(b + 1), "max + 1");
            refused(l.check_int(u64::MAX), "u64::MAX");
            if a > 0 {
                refused(l.check_int(a - 1), "min - 1");
            }
            l.check_untyped(Some(a), Some(a as f64), &a).unwrap();
            refused(l.check_untyped(None, Some(-1.0), &-1), "-1");
            refused(l.check_untyped(None, Some(1.5), &1.5), "1.5");
            refused(l.check_untyped(None, None, &"\"x\""), "a string");
            refused(l.check_json(&serde_json::json!("x")), "a string");
            let auto = l.check_json(&serde_json::json!("auto"));
            if matches!(l.range, Range::IntOrAuto(..)) {
                auto.unwrap();
            } else {
                refused(auto, "\"auto\"");
            }
        }
        Range::Float(a, b) => {
            l.check_float(a).unwrap();
            l.check_float(b).unwrap();
            for v in [a / 2.0, b * 2.0, -1.0, 0.0, f64::NAN, f64::INFINITY] {
                refused(l.check_float(v), &v.to_string());
            }
            l.check_untyped(Some(1), Some(1.0), &1).unwrap();
            refused(l.check_untyped(None, None, &"true"), "true");
        }
    }
}

#[test]
fn every_numeric_field_has_a_named_range() {
    for l in SEND_LIMITS.iter().chain(RECEIVE_LIMITS) {
        check_limit(l);
    }
    let names: Vec<&str> = SEND_LIMITS.iter().map(|l| l.field).collect();
    assert_eq!(
        names,
        [
            "connections",
            "downtime_ms",
            "max_bandwidth_mbps",
            "timeout_s",
            "device_chunk_bytes",
            "compression_level"
        ]
    );
    assert_eq!(RECEIVE_LIMITS[0].field, "device_buffer_bytes");
}

#[test]
fn connections_take_a_number_or_auto() {
    let p = |j: &str| serde_json::from_str::<SendParams>(j);
    let c = |j: &str| p(j).map(|p| p.connections);
    let base = r#"{"destination_url":"tcp:127.0.0.1:1""#;
    assert_eq!(c(&format!("{base}}}")).unwrap(), Connections::Count(4));
    assert_eq!(
        c(&format!("{base},\"connections\":8}}")).unwrap(),
        Connections::Count(8)
    );
    assert_eq!(
        c(&format!("{base},\"connections\":\"auto\"}}")).unwrap(),
        Connections::Auto
    );
    for bad in ["\"many\"", "-1", "1.5", "4294967296", "true"] {
        assert!(
            c(&format!("{base},\"connections\":{bad}}}")).is_err(),
            "{bad}"
        );
    }
    let q = SendParams {
        connections: Connections::Auto,
        tls: Some(false),
        ..SendParams::to("tcp:127.0.0.1:1")
    };
    q.validate().unwrap();
    let v = serde_json::to_value(&q).unwrap();
    assert_eq!(v["connections"], "auto");
    assert_eq!(serde_json::from_value::<SendParams>(v).unwrap(), q);
    assert_eq!(Connections::from(3).to_string(), "3");
}

#[test]
fn validate_checks_every_number() {
    let p = SendParams {
        downtime_ms: Some(300),
        timeout_s: 60,
        tls: Some(false),
        ..SendParams::to("tcp:127.0.0.1:1")
    };
    p.validate().unwrap();
    let bad = |q: SendParams, want: &str| {
        let e = q.validate().unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    };
    bad(
        SendParams {
            connections: Connections::Count(65),
            ..p.clone()
        },
        "connections must be in 1..=64 or \"auto\", got 65",
    );
    bad(
        SendParams {
            downtime_ms: Some(u64::MAX),
            ..p.clone()
        },
        "downtime_ms must be in 0..=3600000",
    );
    bad(
        SendParams {
            max_bandwidth_mbps: Some(f64::NAN),
            ..p.clone()
        },
        "max_bandwidth_mbps must be in 0.1..=1048576, got NaN",
    );
    bad(
        SendParams {
            timeout_s: u64::MAX,
            ..p.clone()
        },
        "timeout_s must be in 1..=604800",
    );
    bad(
        SendParams {
            device_chunk_bytes: 1,
            ..p
        },
        "device_chunk_bytes must be in 4096..=16777216, got 1",
    );
    let r = |b| ReceiveParams {
        receiver_url: "tcp:127.0.0.1:1".into(),
        device_buffer_bytes: b,
        tls_dir: None,
        tls: Some(false),
        tls_allowed_subjects: Vec::new(),
    };
    r(None).validate().unwrap();
    r(Some(MIN_DEVICE_BUFFER)).validate().unwrap();
    let e = r(Some(MAX_DEVICE_BUFFER + 1))
        .validate()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("device_buffer_bytes must be in 16777216..=4294967296"),
        "{e}"
    );
}
