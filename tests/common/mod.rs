//! Support for tests that run the real `fixity` binary over real sockets.
#![allow(dead_code)] // each test binary uses its own subset

pub mod hostile;
pub mod kube;
pub mod registry;
pub mod review;
pub mod sigstore;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

pub const BIN: &str = env!("CARGO_BIN_EXE_fixity");

pub fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/admission")
        .join(format!("{name}.json"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A loopback address nobody listens on right now.
pub fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A running `fixity serve`, killed on drop. Its stderr goes to a file for assertions.
pub struct Fixity {
    child: Child,
    pub addr: SocketAddr,
    pub health: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Fixity {
    pub fn serve(extra: &[&str]) -> Self {
        Self::start(None, extra, &[])
    }

    /// As [`Fixity::serve`], with further environment variables.
    pub fn serve_with_env(extra: &[&str], envs: &[(&str, &str)]) -> Self {
        Self::start(None, extra, envs)
    }

    pub fn serve_at(addr: SocketAddr, extra: &[&str]) -> Self {
        Self::start(Some(addr), extra, &[])
    }

    /// A port from [`free_addr`] is free when it is chosen, not necessarily when fixity binds
    /// it: another process (an outgoing connection's ephemeral port) can take it in between.
    /// A start that fails for that reason is tried again on other ports.
    fn start(addr: Option<SocketAddr>, extra: &[&str], envs: &[(&str, &str)]) -> Self {
        let mut attempt = 1;
        loop {
            let mut f = Self::spawn(addr.unwrap_or_else(free_addr), extra, envs);
            match f.wait_healthy() {
                Ok(()) => return f,
                Err(why) if attempt < 3 && why.contains("Address already in use") => attempt += 1,
                Err(why) => panic!("{why}"),
            }
        }
    }

    fn spawn(addr: SocketAddr, extra: &[&str], envs: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("fixity.log");
        let health = free_addr();
        let child = Command::new(BIN)
            .arg("serve")
            .args([
                "--addr",
                &addr.to_string(),
                "--health-addr",
                &health.to_string(),
            ])
            .args(extra)
            .env("RUST_LOG", "info")
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Self {
            child,
            addr,
            health,
            log,
            _dir: dir,
        }
    }

    fn wait_healthy(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "fixity exited early with {status}:\n{}",
                    self.log()
                ));
            }
            if http_get(self.health, "/livez").is_some_and(|(code, _)| code == 200) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!("fixity did not become healthy:\n{}", self.log()))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops it as Kubernetes does, with SIGTERM, and waits for it to exit; killed after 10 s.
    pub fn terminate(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = Command::new("kill").arg(self.pid().to_string()).status();
        if self.wait_exit(Duration::from_secs(10)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Fixity {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.0 GET, for the health port.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((code, body))
}

/// A TLS client trusting exactly the CA in `ca_pem`.
pub fn tls_connector(ca_pem: &Path) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_pem).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

/// A TLS client trusting exactly the CA in `ca_pem` and presenting the client certificate
/// `cert_pem` with its key `key_pem`.
pub fn tls_connector_with_client(ca_pem: &Path, cert_pem: &str, key_pem: &str) -> TlsConnector {
    use tokio_rustls::rustls::pki_types::PrivateKeyDer;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_pem).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    TlsConnector::from(Arc::new(config))
}

/// The answer to one HTTPS POST on a fresh connection, and the certificate the server showed.
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
    pub server_cert: Vec<u8>,
}

/// POSTs `body` over a new TLS connection (so each call does a full handshake).
pub async fn https_post(
    connector: &TlsConnector,
    addr: SocketAddr,
    path: &str,
    body: Vec<u8>,
) -> Result<Reply, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let server_cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .unwrap_or_default();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| format!("http handshake: {e}"))?;
    tokio::spawn(conn);
    let request = hyper::Request::post(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes()
        .to_vec();
    Ok(Reply {
        status,
        body,
        server_cert,
    })
}

/// POSTs an AdmissionReview to `/validate` and returns the `response` of the answer.
pub async fn review(
    connector: &TlsConnector,
    addr: SocketAddr,
    body: Vec<u8>,
) -> serde_json::Value {
    let reply = https_post(connector, addr, "/validate", body)
        .await
        .unwrap();
    let answer: serde_json::Value = serde_json::from_slice(&reply.body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&reply.body)));
    assert_eq!(answer["kind"], "AdmissionReview");
    answer["response"].clone()
}

/// Writes a CA and returns a function that issues localhost certificates from it.
pub fn test_ca(dir: &Path) -> impl Fn() -> (String, String) + Send + 'static {
    let ca_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "rotation test CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = params.self_signed(&ca_key).unwrap();
    std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
    let issuer = Issuer::new(params, ca_key);
    move || {
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// Lays out a Secret volume the way the kubelet does: files are symlinks through `..data`,
/// which is swapped atomically to a new timestamped directory on every update.
pub fn write_secret_volume(dir: &Path, generation: usize, cert: &str, key: &str) {
    let data = dir.join(format!("..2026_11_26_{generation:04}"));
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("tls.crt"), cert).unwrap();
    std::fs::write(data.join("tls.key"), key).unwrap();
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(data.file_name().unwrap(), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    for file in ["tls.crt", "tls.key"] {
        let link = dir.join(file);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(file), &link).unwrap();
        }
    }
}
