//! Mutual TLS: a migration over TLS, refused peers (wrong CA, wrong
//! subject, plain TCP) that never abort the armed receive, and the request
//! checks. Certificates are generated at run time.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};

use super::*;
use crate::api::*;
use crate::tls::{CA_FILE, CERT_FILE, KEY_FILE};

const MIB: u64 = 1 << 20;

/// A test CA that writes `tls_dir`s for hosts it signs.
pub(super) struct Ca {
    root: PathBuf,
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    pub(super) fn new(tag: &str) -> Ca {
        let root = std::env::temp_dir().join(format!(
            "ferry-tls-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&root).unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(DnType::CommonName, format!("ferry test CA {tag}"));
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        Ca { root, cert, key }
    }

    /// A `tls_dir` for host `cn` (also valid for localhost and 127.0.0.1)
    /// that trusts `trust`'s CA.
    pub(super) fn host(&self, cn: &str, trust: &Ca) -> String {
        let dir = self.root.join(cn);
        std::fs::create_dir_all(&dir).unwrap();
        let mut p = CertificateParams::new(vec![
            cn.to_string(),
            "localhost".to_string(),
            "127.0.0.1".to_string(),
        ])
        .unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        std::fs::write(dir.join(CERT_FILE), cert.pem()).unwrap();
        std::fs::write(dir.join(KEY_FILE), key.serialize_pem()).unwrap();
        std::fs::write(dir.join(CA_FILE), trust.cert.pem()).unwrap();
        dir.to_string_lossy().into_owned()
    }
}

impl Drop for Ca {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

pub(super) fn tls_receive(dir: &str, allowed: &[&str]) -> ReceiveParams {
    ReceiveParams {
        receiver_url: "tcp:127.0.0.1:0".into(),
        device_buffer_bytes: None,
        tls_dir: Some(dir.to_string()),
        tls: None,
        tls_allowed_subjects: allowed.iter().map(|s| s.to_string()).collect(),
    }
}

fn tls_send(port: u16, dir: Option<&str>) -> SendParams {
    let mut p = params(port, 4);
    p.tls_dir = dir.map(str::to_string);
    p.tls = if dir.is_some() { None } else { Some(false) };
    p
}

/// Sends once and returns the error (the destination must stay armed).
fn refused(src: &Arc<FakeSource>, p: &SendParams) -> String {
    let stats = Arc::new(MigrationStats::default());
    let e = send(src.clone(), p, &stats, &CancelToken::default()).unwrap_err();
    let s = stats.snapshot();
    assert_eq!(s.state, MigrationState::Failed);
    assert_source_running(src);
    e.to_string()
}

#[test]
fn migration_over_mutual_tls() {
    let ca = Ca::new("ok");
    let dst_dir = ca.host("dst.test", &ca);
    let src_dir = ca.host("src.test", &ca);
    let src = Arc::new(FakeSource::new(&[(0, 16 * MIB)]));
    fill(&src, 0, 3, 2);
    let dest = start_dest_with(
        FakeFactory::new(src.layout()),
        tls_receive(&dst_dir, &["src.test"]),
    );
    let stats = Arc::new(MigrationStats::default());
    send(
        src.clone(),
        &tls_send(dest.port, Some(&src_dir)),
        &stats,
        &CancelToken::default(),
    )
    .unwrap();
    dest.handle.join().unwrap().unwrap();
    assert_same_ram(&src, &dest.factory.last());
    let s = stats.snapshot();
    assert_eq!(s.state, MigrationState::Completed);
    assert_eq!(s.transport.as_deref(), Some("tls"));
    assert_eq!(dest.stats.snapshot().transport.as_deref(), Some("tls"));
}

/// Zero-copy with TLS: the sealed records go with MSG_ZEROCOPY, each
/// buffer kept until its completion, over 4 connections.
#[test]
fn zero_copy_over_mutual_tls() {
    let ca = Ca::new("zc");
    let dst_dir = ca.host("dst.test", &ca);
    let src_dir = ca.host("src.test", &ca);
    let src = Arc::new(FakeSource::new(&[(0, 32 * MIB)]));
    fill(&src, 0, 7, 1);
    src.set_hook(|s, n| {
        if n <= 3 {
            for p in (0..8192u64).step_by(5) {
                s.write(0, p * 4096, &pattern(n as u8 * 13, 4096));
            }
        }
    });
    let dest = start_dest_with(
        FakeFactory::new(src.layout()),
        tls_receive(&dst_dir, &["src.test"]),
    );
    let stats = Arc::new(MigrationStats::default());
    let mut p = tls_send(dest.port, Some(&src_dir));
    p.zero_copy = true;
    p.downtime_ms = Some(0);
    send(src.clone(), &p, &stats, &CancelToken::default()).unwrap();
    dest.handle.join().unwrap().unwrap();
    assert_same_ram(&src, &dest.factory.last());
    let s = stats.snapshot();
    assert_eq!(s.state, MigrationState::Completed);
    let z = super::zerocopy::check_zero_copy_status(&s, 4);
    // The ciphertext is larger than the page data it carries.
    assert!(z.sent_bytes >= 32 * MIB, "{z:?}");
    assert!(z.note.as_deref().unwrap_or("").contains("TLS"), "{z:?}");
}

/// Compression under TLS: packets are compressed, then sealed by the
/// record layer.
#[test]
fn compressed_migration_over_mutual_tls() {
    let ca = Ca::new("zstd");
    let dst_dir = ca.host("dst.test", &ca);
    let src_dir = ca.host("src.test", &ca);
    let src = Arc::new(FakeSource::new(&[(0, 16 * MIB)]));
    fill(&src, 0, 3, 1);
    let dest = start_dest_with(
        FakeFactory::new(src.layout()),
        tls_receive(&dst_dir, &["src.test"]),
    );
    let stats = Arc::new(MigrationStats::default());
    let mut p = tls_send(dest.port, Some(&src_dir));
    p.compression = Compression::Zstd;
    send(src.clone(), &p, &stats, &CancelToken::default()).unwrap();
    dest.handle.join().unwrap().unwrap();
    assert_same_ram(&src, &dest.factory.last());
    let s = stats.snapshot();
    assert_eq!(s.transport.as_deref(), Some("tls"));
    let c = s.compression.clone().expect("compression");
    assert!(c.compressed_packets > 0 && c.ratio > 2.0, "{c:?}");
    assert!(s.transferred_bytes < 8 * MIB, "{s:?}");
}

#[test]
fn refused_peers_never_abort_the_receive() {
    let ca = Ca::new("main");
    let other = Ca::new("stranger");
    let dst_dir = ca.host("dst.test", &ca);
    let good = ca.host("src.test", &ca);
    let wrong_subject = ca.host("intruder.test", &ca);
    let stranger = other.host("src.test", &other);
    // Signed by the stranger CA but trusting ours: we refuse it.
    let stranger_trusting_us = other.host("mixed.test", &ca);
    let src = Arc::new(FakeSource::new(&[(0, 8 * MIB)]));
    fill(&src, 0, 5, 3);
    let dest = start_dest_with(
        FakeFactory::new(src.layout()),
        tls_receive(&dst_dir, &["src.test"]),
    );

    let e = refused(&src, &tls_send(dest.port, Some(&stranger)));
    assert!(e.contains("not signed by the source's CA"), "{e}");
    let e = refused(&src, &tls_send(dest.port, Some(&stranger_trusting_us)));
    assert!(
        e.contains("destination refused the source's certificate"),
        "{e}"
    );
    let e = refused(&src, &tls_send(dest.port, Some(&wrong_subject)));
    assert!(
        e.contains("intruder.test") && e.contains("not among"),
        "{e}"
    );
    let e = refused(&src, &tls_send(dest.port, None));
    assert!(e.contains("requires TLS"), "{e}");
    // A raw stranger that sends garbage and one that sends nothing.
    let mut s = TcpStream::connect(("127.0.0.1", dest.port)).unwrap();
    let _ = std::io::Write::write_all(&mut s, b"\x16\x03\x01\x00\x05hello");
    drop(s);
    let _silent = TcpStream::connect(("127.0.0.1", dest.port)).unwrap();

    // The right peer still gets through.
    let stats = Arc::new(MigrationStats::default());
    send(
        src.clone(),
        &tls_send(dest.port, Some(&good)),
        &stats,
        &CancelToken::default(),
    )
    .unwrap();
    dest.handle.join().unwrap().unwrap();
    assert_same_ram(&src, &dest.factory.last());
}

#[test]
fn tls_source_on_a_plain_destination_is_told_why() {
    let ca = Ca::new("plainpeer");
    let src_dir = ca.host("src.test", &ca);
    let src = Arc::new(FakeSource::new(&[(0, 4 * MIB)]));
    let dest = start_dest(FakeFactory::new(src.layout()));
    let e = refused(&src, &tls_send(dest.port, Some(&src_dir)));
    assert!(
        e.contains("does not use TLS") && e.contains("plain TCP"),
        "{e}"
    );
    dest.cancel.cancel();
    let _ = dest.handle.join().unwrap();
}

#[test]
fn transport_must_be_chosen_explicitly() {
    let mut p = params(1, 1);
    p.tls = None;
    let e = p.validate().unwrap_err().to_string();
    assert!(
        e.contains("TLS is required") && e.contains("tls_dir"),
        "{e}"
    );
    p.tls_dir = Some("/nonexistent-ferry-dir".into());
    let e = p.validate().unwrap_err().to_string();
    assert!(e.contains("not a directory"), "{e}");
    p.tls = Some(false);
    let e = p.validate().unwrap_err().to_string();
    assert!(e.contains("choose one"), "{e}");
    let ca = Ca::new("params");
    let dir = ca.host("h.test", &ca);
    std::fs::write(Path::new(&dir).join(KEY_FILE), "not a key").unwrap();
    let mut r = tls_receive(&dir, &[]);
    let e = r.validate().unwrap_err().to_string();
    assert!(e.contains("key.pem"), "{e}");
    r.tls_dir = None;
    r.tls = Some(false);
    r.tls_allowed_subjects = vec!["x".into()];
    let e = r.validate().unwrap_err().to_string();
    assert!(e.contains("tls_allowed_subjects"), "{e}");
    r.tls_dir = Some(ca.host("h2.test", &ca));
    r.tls = None;
    r.tls_allowed_subjects = vec!["x".into(); 65];
    let e = r.validate().unwrap_err().to_string();
    assert!(e.contains("at most 64"), "{e}");
}
