//! The bare baseline: axum + rustls served as fixity serves them (`server::webhook_server`, with
//! fixity's rustls configuration), reading each body and answering a fixed "allowed" review
//! without parsing anything. It runs as a child process of the bench (the bench binary
//! re-executed with `--baseline-server`) so its CPU and memory are measured apart.

use std::io::Write;
use std::net::TcpListener;
use std::path::Path;

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::http::header;
use axum::routing::post;
use axum_server::tls_rustls::RustlsConfig;

const ALLOWED: &[u8] =
    br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":{"uid":"x","allowed":true}}"#;

/// Serves until killed. Prints the bound address on stdout once listening.
pub fn serve(cert: &Path, key: &Path) -> anyhow::Result<()> {
    rustls::crypto::ring::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("a crypto provider was already installed"))?;
    let (cert_pem, key_pem) = (std::fs::read(cert)?, std::fs::read(key)?);
    // The same rustls configuration fixity serves (h2 + http/1.1 ALPN, same certificate).
    let config = fixity::server::tls::server_config(
        &cert_pem,
        &cert.display().to_string(),
        &key_pem,
        &key.display().to_string(),
        &fixity::server::tls::ClientAuth::anyone(),
    )?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    // The same runtime shape as `fixity serve`: multi-threaded, one worker per core.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let app = Router::new().route("/validate", post(allowed));
        let server = fixity::server::webhook_server(listener, RustlsConfig::from_config(config))?;
        let mut stdout = std::io::stdout();
        writeln!(stdout, "{addr}")?;
        stdout.flush()?;
        server
            .serve(app.into_make_service())
            .await
            .context("baseline server")
    })
}

/// Reads the whole body (every server must), parses nothing.
async fn allowed(_body: Bytes) -> ([(header::HeaderName, &'static str); 1], &'static [u8]) {
    ([(header::CONTENT_TYPE, "application/json")], ALLOWED)
}
