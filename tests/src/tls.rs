//! Test certificates, generated at run time with rcgen: a CA per test and
//! `tls_dir`s (ca.pem, cert.pem, key.pem) for the hosts it signs. Nothing
//! secret is committed; the directory is removed on drop.

use std::path::PathBuf;

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};

/// A throw-away certificate authority.
///
/// Invariant: every `tls_dir` it wrote lives under `root`, which is
/// removed when the value is dropped.
pub struct Pki {
    root: PathBuf,
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Pki {
    /// A new CA named after `tag`, in a fresh temporary directory.
    pub fn new(tag: &str) -> Pki {
        let root = std::env::temp_dir().join(format!(
            "ferry-pki-{tag}-{}-{:x}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        std::fs::create_dir_all(&root).expect("creating the PKI directory");
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        p.distinguished_name
            .push(DnType::CommonName, format!("ferry test CA {tag}"));
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().expect("CA key");
        let cert = p.self_signed(&key).expect("CA certificate");
        Pki { root, cert, key }
    }

    /// Writes a `tls_dir` for host `cn` (its certificate also names
    /// localhost and 127.0.0.1) that trusts `trust`'s CA; returns its path.
    pub fn host(&self, cn: &str, trust: &Pki) -> String {
        let dir = self.root.join(cn);
        std::fs::create_dir_all(&dir).expect("creating a tls_dir");
        let mut p = CertificateParams::new(vec![
            cn.to_string(),
            "localhost".to_string(),
            "127.0.0.1".to_string(),
        ])
        .expect("host parameters");
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().expect("host key");
        let cert = p
            .signed_by(&key, &self.cert, &self.key)
            .expect("host certificate");
        std::fs::write(dir.join("cert.pem"), cert.pem()).expect("writing cert.pem");
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).expect("writing key.pem");
        std::fs::write(dir.join("ca.pem"), trust.cert.pem()).expect("writing ca.pem");
        dir.to_string_lossy().into_owned()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}
