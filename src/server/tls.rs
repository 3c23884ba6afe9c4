//! Serving certificates: loaded from PEM files, re-read when the files change (including the
//! `..data` symlink swap of a mounted Secret), and generated for `serve --dev`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum_server::tls_rustls::RustlsConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::{RootCertStore, ServerConfig};

use crate::audit::Metrics;
use crate::audit::metrics::ResultLabels;
use crate::certs::issue;

/// Why a certificate and key cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}: no PEM certificate found")]
    NoCertificate(String),
    #[error("{0}: no PEM private key found")]
    NoKey(String),
    #[error("the certificate and key cannot be served together: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("generating the development certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: no usable CA certificate for client authentication: {reason}")]
    ClientCa { path: PathBuf, reason: String },
}

/// Who may open a connection to the webhook port. Anyone who can reach it can POST a review
/// (and have fixity publish an Event with the user and text the review names), so a cluster
/// whose API server presents a client certificate (its admission configuration's
/// kubeconfig) can require one chaining to a given CA.
#[derive(Debug, Clone, Default)]
pub struct ClientAuth(Option<Arc<dyn ClientCertVerifier>>);

impl ClientAuth {
    /// Any client: TLS, no client certificate.
    pub fn anyone() -> Self {
        Self(None)
    }

    /// Clients with a certificate chaining to a CA in the PEM file at `path`.
    pub fn from_ca_file(path: &Path) -> Result<Self, TlsError> {
        let fail = |reason: String| TlsError::ClientCa {
            path: path.to_path_buf(),
            reason,
        };
        let pem = std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| fail(e.to_string()))?;
            roots.add(cert).map_err(|e| fail(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(fail("the file holds no certificate".to_owned()));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| fail(e.to_string()))?;
        Ok(Self(Some(verifier)))
    }
}

/// Where the serving certificate and key live, and whom the server lets connect.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_auth: ClientAuth,
}

impl CertFiles {
    fn read(&self) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| TlsError::Read {
                path: path.to_path_buf(),
                source,
            })
        };
        Ok((read(&self.cert)?, read(&self.key)?))
    }

    /// Builds a rustls server configuration from the files.
    pub fn load(&self) -> Result<(Arc<ServerConfig>, Vec<u8>), TlsError> {
        let (cert, key) = self.read()?;
        let config = self.server_config(&cert, &key)?;
        Ok((config, fingerprint(&cert, &key)))
    }

    fn server_config(&self, cert: &[u8], key: &[u8]) -> Result<Arc<ServerConfig>, TlsError> {
        server_config(
            cert,
            &self.cert.display().to_string(),
            key,
            &self.key.display().to_string(),
            &self.client_auth,
        )
    }

    /// Polls the files and swaps the served certificate when they change. A half-written or
    /// mismatched pair is skipped until it is whole; the old certificate serves meanwhile.
    pub async fn watch(
        self,
        rustls: RustlsConfig,
        mut last: Vec<u8>,
        every: Duration,
        metrics: Arc<Metrics>,
    ) {
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reported_error = false;
        loop {
            ticker.tick().await;
            let Ok((cert, key)) = self.read() else {
                continue;
            };
            let current = fingerprint(&cert, &key);
            if current == last {
                continue;
            }
            match self.server_config(&cert, &key) {
                Ok(config) => {
                    rustls.reload_from_config(config);
                    last = current;
                    reported_error = false;
                    count_reload(&metrics, Ok(()), &self.cert.display().to_string());
                }
                Err(e) if !reported_error => {
                    reported_error = true;
                    count_reload(&metrics, Err(&e), &self.cert.display().to_string());
                }
                Err(_) => {}
            }
        }
    }
}

/// A rustls server configuration (h2 and HTTP/1.1) for a PEM chain and key, letting in whom
/// `client_auth` says; the names say where the PEM came from in errors.
pub fn server_config(
    cert: &[u8],
    cert_name: &str,
    key: &[u8],
    key_name: &str,
    client_auth: &ClientAuth,
) -> Result<Arc<ServerConfig>, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
        .filter_map(Result::ok)
        .collect();
    if chain.is_empty() {
        return Err(TlsError::NoCertificate(cert_name.to_owned()));
    }
    let key =
        PrivateKeyDer::from_pem_slice(key).map_err(|_| TlsError::NoKey(key_name.to_owned()))?;
    let builder = ServerConfig::builder();
    let builder = match &client_auth.0 {
        Some(verifier) => builder.with_client_cert_verifier(verifier.clone()),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Records a certificate swap in the metrics and the log.
pub fn count_reload(metrics: &Metrics, result: Result<(), &dyn std::fmt::Display>, source: &str) {
    let label = if result.is_ok() { "success" } else { "error" };
    metrics
        .certificate_reloads
        .get_or_create(&ResultLabels { result: label })
        .inc();
    match result {
        Ok(()) => tracing::info!(source, "serving certificate reloaded"),
        Err(e) => {
            tracing::warn!(source, error = %e, "changed certificate not loaded; still serving the previous one")
        }
    }
}

fn fingerprint(cert: &[u8], key: &[u8]) -> Vec<u8> {
    let mut all = Vec::with_capacity(cert.len() + key.len() + 1);
    all.extend_from_slice(cert);
    all.push(0);
    all.extend_from_slice(key);
    all
}

/// Generates a throwaway CA and a serving certificate for localhost, writes them to `dir`
/// (`ca.crt`, `tls.crt`, `tls.key`) and returns the files to serve.
pub fn generate_dev_certificate(dir: &Path) -> Result<CertFiles, TlsError> {
    const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
    let write = |name: &str, contents: &str| {
        let path = dir.join(name);
        std::fs::write(&path, contents)
            .map(|()| path.clone())
            .map_err(|source| TlsError::Read { path, source })
    };
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Read {
        path: dir.to_path_buf(),
        source,
    })?;
    let now = time::OffsetDateTime::now_utc();
    let ca = issue::new_ca("fixity development CA", now, YEAR)?;
    let names = ["localhost", "127.0.0.1", "::1"].map(str::to_owned);
    let serving = issue::serving(&ca, &names, now, YEAR)?;
    write("ca.crt", &ca.cert)?;
    Ok(CertFiles {
        cert: write("tls.crt", &serving.cert)?,
        key: write("tls.key", &serving.key)?,
        client_auth: ClientAuth::anyone(),
    })
}
