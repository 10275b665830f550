//! Mutual TLS for migration channels: loading a `tls_dir`, building rustls
//! configurations, and checking the peer's certificate subject.
//!
//! A `tls_dir` holds three PEM files: [`CA_FILE`] (the CA that signs both
//! hosts' certificates), [`CERT_FILE`] (this host's certificate chain, leaf
//! first) and [`KEY_FILE`] (its private key). Both sides present a
//! certificate and verify the peer's against the CA: TLS 1.3 only, no
//! session resumption. The crypto provider is aws-lc-rs (its AES-GCM is the
//! fastest rustls offers on x86-64; see the README).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::error::MigrationError;

/// The CA certificate(s) both peers are verified against, in a `tls_dir`.
pub const CA_FILE: &str = "ca.pem";
/// This host's certificate chain (leaf first), in a `tls_dir`.
pub const CERT_FILE: &str = "cert.pem";
/// This host's private key (PKCS#8, PKCS#1 or SEC1 PEM), in a `tls_dir`.
pub const KEY_FILE: &str = "key.pem";
/// Most entries of `tls_allowed_subjects`.
pub const MAX_ALLOWED_SUBJECTS: usize = 64;
/// Longest accepted certificate or key file (a bound before reading).
const MAX_PEM_FILE: u64 = 1 << 20;

fn tls_err(msg: impl Into<String>) -> MigrationError {
    MigrationError::Tls(msg.into())
}

fn read_pem(dir: &Path, name: &str) -> Result<(PathBuf, Vec<u8>), MigrationError> {
    use std::io::Read;
    let path = dir.join(name);
    let cannot = |e: std::io::Error| tls_err(format!("cannot read {}: {e}", path.display()));
    let meta = std::fs::metadata(&path).map_err(cannot)?;
    if !meta.is_file() {
        return Err(tls_err(format!("{} is not a regular file", path.display())));
    }
    let mut bytes = Vec::new();
    std::fs::File::open(&path)
        .and_then(|f| f.take(MAX_PEM_FILE + 1).read_to_end(&mut bytes))
        .map_err(cannot)?;
    if bytes.len() as u64 > MAX_PEM_FILE {
        return Err(tls_err(format!(
            "{} is larger than the {MAX_PEM_FILE} bytes a PEM file may have",
            path.display()
        )));
    }
    Ok((path, bytes))
}

fn certs(dir: &Path, name: &str) -> Result<Vec<CertificateDer<'static>>, MigrationError> {
    let (path, bytes) = read_pem(dir, name)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| {
            tls_err(format!(
                "{}: not a PEM certificate file: {e}",
                path.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(tls_err(format!("{} holds no certificate", path.display())));
    }
    Ok(certs)
}

/// The loaded contents of a `tls_dir`.
struct Identity {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn load(dir: &str) -> Result<Identity, MigrationError> {
    let d = Path::new(dir);
    if !d.is_dir() {
        return Err(tls_err(format!("tls_dir {dir:?} is not a directory")));
    }
    let mut roots = RootCertStore::empty();
    for c in certs(d, CA_FILE)? {
        roots.add(c).map_err(|e| {
            tls_err(format!(
                "{}: unusable CA certificate: {e}",
                d.join(CA_FILE).display()
            ))
        })?;
    }
    let chain = certs(d, CERT_FILE)?;
    let (path, bytes) = read_pem(d, KEY_FILE)?;
    let key = PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|e| tls_err(format!("{}: no usable private key: {e}", path.display())))?;
    Ok(Identity {
        roots: Arc::new(roots),
        chain,
        key,
    })
}

/// aws-lc-rs with TLS 1.3 suites only, AES-128-GCM first: the fastest
/// AEAD here, with 128-bit security (AES-256-GCM and ChaCha20-Poly1305
/// stay acceptable to a peer that prefers them).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::aws_lc_rs::cipher_suite as cs;
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites = vec![
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

/// The source's TLS configuration.
///
/// Invariant: presents the certificate of its `tls_dir` and accepts only a
/// destination whose certificate chains to that directory's CA and names
/// the host of the destination URL.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientTls")
    }
}

impl ClientTls {
    /// Loads `dir` (see the module doc for its files).
    pub fn load(dir: &str) -> Result<ClientTls, MigrationError> {
        let id = load(dir)?;
        let verifier = WebPkiServerVerifier::builder_with_provider(id.roots, provider())
            .build()
            .map_err(|e| tls_err(format!("{dir}: {e}")))?;
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls_err(e.to_string()))?
            .with_webpki_verifier(verifier)
            .with_client_auth_cert(id.chain, id.key)
            .map_err(|e| tls_err(format!("{dir}: certificate and key do not fit: {e}")))?;
        config.resumption = rustls::client::Resumption::disabled();
        // The record layer after the handshake is ours (net/record.rs).
        config.enable_secret_extraction = true;
        Ok(ClientTls {
            config: Arc::new(config),
        })
    }

    /// A client connection to `host` (the destination URL's host, which the
    /// destination's certificate must name).
    pub(crate) fn connect(&self, host: &str) -> Result<rustls::ClientConnection, MigrationError> {
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| tls_err(format!("{host:?} is not a valid TLS server name: {e}")))?;
        rustls::ClientConnection::new(self.config.clone(), name).map_err(|e| tls_err(e.to_string()))
    }
}

/// The destination's TLS configuration.
///
/// Invariant: requires a client certificate that chains to the CA of its
/// `tls_dir`; when `allowed` is not empty, the certificate must also name
/// one of its entries ([`ServerTls::check_subject`]).
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<ServerConfig>,
    allowed: Arc<Vec<String>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("allowed", &self.allowed)
            .finish()
    }
}

impl ServerTls {
    /// Loads `dir`; `allowed` lists the accepted client certificate names
    /// (common name or DNS subject alternative name; empty: any certificate
    /// the CA signed).
    pub fn load(dir: &str, allowed: &[String]) -> Result<ServerTls, MigrationError> {
        if allowed.len() > MAX_ALLOWED_SUBJECTS {
            return Err(MigrationError::InvalidParams(format!(
                "tls_allowed_subjects has {} entries; at most {MAX_ALLOWED_SUBJECTS} are allowed",
                allowed.len()
            )));
        }
        if let Some(bad) = allowed.iter().find(|a| a.is_empty() || a.len() > 255) {
            return Err(MigrationError::InvalidParams(format!(
                "tls_allowed_subjects entry {bad:?} must be 1..=255 bytes long"
            )));
        }
        let id = load(dir)?;
        let verifier = WebPkiClientVerifier::builder_with_provider(id.roots, provider())
            .build()
            .map_err(|e| tls_err(format!("{dir}: {e}")))?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls_err(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(id.chain, id.key)
            .map_err(|e| tls_err(format!("{dir}: certificate and key do not fit: {e}")))?;
        config.send_tls13_tickets = 0;
        config.enable_secret_extraction = true;
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        Ok(ServerTls {
            config: Arc::new(config),
            allowed: Arc::new(allowed.to_vec()),
        })
    }

    /// A fresh server connection.
    pub(crate) fn accept(&self) -> Result<rustls::ServerConnection, MigrationError> {
        rustls::ServerConnection::new(self.config.clone()).map_err(|e| tls_err(e.to_string()))
    }

    /// Checks the verified client leaf certificate against the allowed
    /// subjects (names compare without regard to ASCII case, as DNS names
    /// do). `Err` carries the refusal text sent to the peer; it names the
    /// peer's own certificate names, not the allow-list (which is logged
    /// here only).
    pub(crate) fn check_subject(&self, leaf: Option<&[u8]>) -> Result<(), String> {
        if self.allowed.is_empty() {
            return Ok(());
        }
        let names = match leaf {
            Some(der) => cert_names(der),
            None => Vec::new(),
        };
        if names
            .iter()
            .any(|n| self.allowed.iter().any(|a| a.eq_ignore_ascii_case(n)))
        {
            return Ok(());
        }
        let names = if names.is_empty() {
            "no name".to_string()
        } else {
            names.join(", ")
        };
        log::warn!(
            "source certificate ({names}) not in tls_allowed_subjects ({})",
            self.allowed.join(", ")
        );
        Err(format!(
            "the source's certificate ({names}) is not among the subjects this destination allows"
        ))
    }
}

/// The names of a certificate: its subject common names, then its DNS
/// subject alternative names. Empty if it cannot be parsed.
pub(crate) fn cert_names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_string))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push(d.to_string());
            }
        }
    }
    names
}

/// Explains an alert the peer sent after the handshake (`client`: this
/// side is the source).
pub(crate) fn describe_alert(a: rustls::AlertDescription, client: bool) -> String {
    use rustls::AlertDescription as A;
    match a {
        A::UnknownCA | A::BadCertificate | A::CertificateRequired => {
            describe(&rustls::Error::AlertReceived(a), client)
        }
        a => format!(
            "the {} sent a TLS alert ({a:?}) and ended the connection",
            if client { "destination" } else { "source" }
        ),
    }
}

/// Explains a TLS failure of the handshake. `client`: this side is the
/// source. The text names who refused whom.
pub(crate) fn describe(e: &rustls::Error, client: bool) -> String {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    let (me, peer) = if client {
        ("source", "destination")
    } else {
        ("destination", "source")
    };
    match e {
        E::InvalidCertificate(C::UnknownIssuer) => {
            format!("the {me} refused the {peer}'s certificate: it is not signed by the {me}'s CA")
        }
        E::InvalidCertificate(C::BadSignature) => format!(
            "the {me} refused the {peer}'s certificate: a signature does not verify \
             (not signed by the {me}'s CA, or the {peer}'s key does not match its certificate)"
        ),
        E::InvalidCertificate(C::NotValidForName)
        | E::InvalidCertificate(C::NotValidForNameContext { .. }) => format!(
            "the {me} refused the {peer}'s certificate: it does not name the host of the destination URL"
        ),
        E::InvalidCertificate(C::Expired) | E::InvalidCertificate(C::ExpiredContext { .. }) => {
            format!("the {me} refused the {peer}'s certificate: it has expired")
        }
        E::InvalidCertificate(c) => format!("the {me} refused the {peer}'s certificate: {c:?}"),
        E::NoCertificatesPresented => {
            format!("the {me} refused the {peer}: it presented no certificate")
        }
        E::AlertReceived(A::UnknownCA) => {
            format!("the {peer} refused the {me}'s certificate: it is not signed by the {peer}'s CA")
        }
        E::AlertReceived(A::BadCertificate) => format!(
            "the {peer} refused the {me}'s certificate (bad certificate: not valid for the {peer}, \
             e.g. not from its CA or not naming this host)"
        ),
        E::AlertReceived(A::CertificateRequired) => {
            format!("the {peer} requires a certificate from the {me}")
        }
        E::AlertReceived(a) => format!("the {peer} refused the TLS handshake ({a:?})"),
        other => format!("TLS handshake with the {peer} failed: {other}"),
    }
}
