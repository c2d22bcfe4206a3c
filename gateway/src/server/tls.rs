//! TLS on the gateway's own listener (`[server.tls]`), with rustls.
//!
//! - TLS 1.3 only by default (`min_version = "1.2"` also allows 1.2), ALPN `h2` and
//!   `http/1.1` (the connection then speaks what was agreed).
//! - The certificate chain and key are PEM files, re-read without a restart: every
//!   `reload_interval_ms` the files' modification times and sizes are compared, and a changed
//!   pair is loaded and used for new handshakes ([`ServerTls::reload_if_changed`]). A pair that
//!   fails to load (half-written, key not matching) leaves the previous one in use and is
//!   logged; connections already open keep theirs.
//! - `client_ca_file` requires a client certificate signed by one of its CAs (mTLS, for
//!   internal callers); without it no client certificate is asked for.
//!
//! The handshake itself runs on the connection's serving thread, bounded by the header read
//! timeout (see `super::run_connection`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::RwLock;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use serde::Deserialize;

/// `[server.tls]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain (PEM), leaf first.
    pub cert_file: PathBuf,
    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// CA certificates (PEM) that client certificates must chain to; set, a client without
    /// one is refused during the handshake (mTLS).
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// The lowest protocol version accepted: `"1.3"` (the default) or `"1.2"`.
    #[serde(default)]
    pub min_version: MinVersion,
    /// How often the certificate and key files are checked for a change (ms); 0: never.
    #[serde(default = "default_reload_ms")]
    pub reload_interval_ms: u64,
}

fn default_reload_ms() -> u64 {
    10_000
}

/// `server.tls.min_version`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
pub enum MinVersion {
    #[serde(rename = "1.2")]
    Tls12,
    #[default]
    #[serde(rename = "1.3")]
    Tls13,
}

/// Why TLS cannot be set up (start-up) or a new certificate not used (reload).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
    #[error("{0}")]
    Invalid(String),
}

fn read_err(path: &Path) -> impl Fn(rustls::pki_types::pem::Error) -> TlsError + '_ {
    move |e| TlsError::Read {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// The listener's TLS: the acceptor and the certificate it serves.
pub struct ServerTls {
    acceptor: tokio_rustls::TlsAcceptor,
    certs: Arc<ReloadingCert>,
    reload_interval: Option<Duration>,
}

impl ServerTls {
    /// Loads the certificate, key and client CAs of `config`.
    pub fn load(config: &TlsConfig) -> Result<ServerTls, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = Arc::new(ReloadingCert::load(
            &config.cert_file,
            &config.key_file,
            provider.clone(),
        )?);
        let versions: &[&rustls::SupportedProtocolVersion] = match config.min_version {
            MinVersion::Tls13 => &[&rustls::version::TLS13],
            MinVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        };
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .map_err(|e| TlsError::Invalid(e.to_string()))?;
        let builder = match &config.client_ca_file {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_file_iter(path).map_err(read_err(path))? {
                    roots
                        .add(cert.map_err(read_err(path))?)
                        .map_err(|e| TlsError::Invalid(format!("{}: {e}", path.display())))?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .map_err(|e| TlsError::Invalid(format!("{}: {e}", path.display())))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut server = builder.with_cert_resolver(certs.clone());
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(ServerTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            certs,
            reload_interval: (config.reload_interval_ms > 0)
                .then(|| Duration::from_millis(config.reload_interval_ms)),
        })
    }

    pub fn acceptor(&self) -> &tokio_rustls::TlsAcceptor {
        &self.acceptor
    }

    /// How often [`ServerTls::reload_if_changed`] should run; `None`: never.
    pub fn reload_interval(&self) -> Option<Duration> {
        self.reload_interval
    }

    /// Loads the certificate and key again if either file changed since they were loaded;
    /// `Ok(true)` when new handshakes now use the new pair. On `Err` the previous pair stays.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        self.certs.reload_if_changed()
    }

    /// Checks the files every [`ServerTls::reload_interval`] until the returned task is
    /// aborted; what happens is logged.
    pub fn watch(self: &Arc<Self>) -> Option<tokio::task::JoinHandle<()>> {
        let interval = self.reload_interval?;
        let tls = self.clone();
        Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                match tls.reload_if_changed() {
                    Ok(true) => tracing::info!("TLS certificate reloaded"),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(
                        "TLS certificate not reloaded, the previous one stays in use: {e}"
                    ),
                }
            }
        }))
    }
}

/// What identifies a version of a file: modification time and size.
type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// The served certificate, swapped when its files change.
#[derive(Debug)]
struct ReloadingCert {
    cert_file: PathBuf,
    key_file: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<(Arc<CertifiedKey>, [Stamp; 2])>,
}

impl ReloadingCert {
    fn load(
        cert_file: &Path,
        key_file: &Path,
        provider: Arc<CryptoProvider>,
    ) -> Result<ReloadingCert, TlsError> {
        let stamps = [stamp(cert_file), stamp(key_file)];
        let key = certified_key(cert_file, key_file, &provider)?;
        Ok(ReloadingCert {
            cert_file: cert_file.to_path_buf(),
            key_file: key_file.to_path_buf(),
            provider,
            current: RwLock::new((Arc::new(key), stamps)),
        })
    }

    fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let stamps = [stamp(&self.cert_file), stamp(&self.key_file)];
        if self.current.read().1 == stamps {
            return Ok(false);
        }
        let key = certified_key(&self.cert_file, &self.key_file, &self.provider);
        let mut current = self.current.write();
        // Tried once per change: a bad pair is not reloaded (and logged) again until the
        // files change once more.
        current.1 = stamps;
        current.0 = Arc::new(key?);
        Ok(true)
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().0.clone())
    }
}

/// The chain of `cert_file` with the key of `key_file`, checked to belong together.
fn certified_key(
    cert_file: &Path,
    key_file: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain = CertificateDer::pem_file_iter(cert_file)
        .map_err(read_err(cert_file))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read_err(cert_file))?;
    if chain.is_empty() {
        return Err(TlsError::Invalid(format!(
            "{}: no certificate in it",
            cert_file.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(read_err(key_file))?;
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::Invalid(format!("{}: {e}", key_file.display())))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| {
        TlsError::Invalid(format!(
            "{} does not belong to {}: {e}",
            key_file.display(),
            cert_file.display()
        ))
    })?;
    Ok(certified)
}
