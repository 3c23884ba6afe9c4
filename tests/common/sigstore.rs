//! A private Sigstore on loopback, made of the real services: the RFC 3161 timestamp authority,
//! Rekor v2 (rekor-tiles on its POSIX backend) and Fulcio (ephemeral CA), with an OIDC issuer
//! played here. It writes the `trusted_root.json` and `signing_config.json` that describe it,
//! and signs images keyless through it with the real `cosign`.
//!
//! The services are the pinned builds of `tests/tools/build.sh sigstore` (cached); a test
//! fails, never skips, when they cannot be built. Each instance takes its own random ports and
//! temporary directory, but only one runs at a time: the timestamp authority (v2.1.3) always
//! binds its metrics server to port 2112. Nothing here runs a CT log, so Fulcio's certificates
//! carry no SCT.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use sha2::Digest as _;

use super::registry::{Lab, tool_path};

/// The OIDC identity the tests' issuer vouches for.
pub const EMAIL: &str = "release@fixity.test";

/// The sigstore tool family's bin directory.
fn services_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tools/build.sh");
        let out = Command::new("bash")
            .arg(&script)
            .arg("sigstore")
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} sigstore failed: the pinned Sigstore services are required",
            script.display()
        );
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A service process, killed on drop; its output goes to a log file kept for failures.
struct Service {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Service {
    fn start(name: &'static str, dir: &Path, args: &[String]) -> Self {
        let log = dir.join(format!("{name}.log"));
        let program = services_dir().join(name);
        let child = Command::new(&program)
            .args(args)
            .current_dir(dir)
            .env("HOME", dir)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.join(format!("{name}.err"))).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        Self { name, child, log }
    }

    /// Waits until `url` answers 200.
    fn wait_for(&mut self, url: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(body) = http_get(url) {
                let _ = body;
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{} exited with {status}:\n{}", self.name, self.output());
            }
            assert!(
                Instant::now() < deadline,
                "{} did not answer {url}:\n{}",
                self.name,
                self.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn output(&self) -> String {
        let err = self.log.with_extension("err");
        format!(
            "{}{}",
            std::fs::read_to_string(&self.log).unwrap_or_default(),
            std::fs::read_to_string(err).unwrap_or_default()
        )
    }
}

/// GET over plain HTTP/1.1 on loopback; the body when the status is 200.
pub fn http_get(url: &str) -> Result<Vec<u8>, String> {
    let rest = url.strip_prefix("http://").ok_or("not http")?;
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_owned()), |(h, p)| (h, format!("/{p}")));
    let mut stream = std::net::TcpStream::connect(host).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .map_err(|e| e.to_string())?;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no header end")?;
    let head = String::from_utf8_lossy(&response[..split]).to_string();
    if !head.starts_with("HTTP/1.1 200") {
        return Err(head);
    }
    let body = response[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Ok(dechunk(&body));
    }
    Ok(body)
}

/// POSTs a JSON body over plain HTTP/1.1 on loopback; the answer's body when it is 2xx.
pub fn http_post_json(url: &str, body: &serde_json::Value) -> Result<Vec<u8>, String> {
    let rest = url.strip_prefix("http://").ok_or("not http")?;
    let (host, path) = rest.split_once('/').ok_or("no path")?;
    let body = body.to_string();
    let mut stream = std::net::TcpStream::connect(host).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "POST /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .map_err(|e| e.to_string())?;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no header end")?;
    let head = String::from_utf8_lossy(&response[..split]).to_string();
    let body = response[split + 4..].to_vec();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(&body)
    } else {
        body
    };
    if !(head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.1 201")) {
        return Err(format!("{head}\n{}", String::from_utf8_lossy(&body)));
    }
    Ok(body)
}

fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(line_end) = body.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = usize::from_str_radix(
            String::from_utf8_lossy(&body[..line_end])
                .split(';')
                .next()
                .unwrap_or("0")
                .trim(),
            16,
        )
        .unwrap_or(0);
        if size == 0 {
            return out;
        }
        let start = line_end + 2;
        out.extend_from_slice(&body[start..start + size]);
        body = &body[start + size + 2..];
    }
}

/// An OIDC issuer serving its discovery document and keys, whose ID tokens Fulcio accepts.
pub struct Issuer {
    pub url: String,
    key: rcgen::KeyPair,
}

impl Issuer {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let point = key.public_key_raw().to_vec();
        let jwks = serde_json::json!({ "keys": [{
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": "fixity-test",
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        }]})
        .to_string();
        let discovery = serde_json::json!({
            "issuer": url,
            "jwks_uri": format!("{url}/keys"),
            "authorization_endpoint": format!("{url}/auth"),
            "token_endpoint": format!("{url}/token"),
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["ES256"],
        })
        .to_string();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(match stream.try_clone() {
                    Ok(s) => s,
                    Err(_) => continue,
                });
                let mut request_line = String::new();
                if reader.read_line(&mut request_line).is_err() {
                    continue;
                }
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                }
                let path = request_line.split(' ').nth(1).unwrap_or("/");
                let (status, body) = match path {
                    "/.well-known/openid-configuration" => ("200 OK", discovery.as_str()),
                    "/keys" => ("200 OK", jwks.as_str()),
                    _ => ("404 Not Found", ""),
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        Self { url, key }
    }

    /// A fresh ID token for [`EMAIL`], audience `sigstore`.
    pub fn token(&self) -> String {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"ES256","kid":"fixity-test","typ":"JWT"}"#);
        let claims = URL_SAFE_NO_PAD.encode(
            serde_json::json!({
                "iss": self.url, "sub": EMAIL, "aud": "sigstore", "email": EMAIL,
                "email_verified": true, "iat": now, "nbf": now - 60, "exp": now + 600,
            })
            .to_string(),
        );
        let signing_input = format!("{header}.{claims}");
        let der = rcgen::SigningKey::sign(&self.key, signing_input.as_bytes()).unwrap();
        format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(ecdsa_raw(&der))
        )
    }
}

/// An ASN.1 ECDSA P-256 signature as JWS wants it: r and s, 32 bytes each.
fn ecdsa_raw(der: &[u8]) -> Vec<u8> {
    // SEQUENCE { INTEGER r, INTEGER s }, short lengths for P-256.
    let mut out = Vec::with_capacity(64);
    let mut at = 2;
    for _ in 0..2 {
        assert_eq!(der[at], 0x02, "INTEGER");
        let len = usize::from(der[at + 1]);
        let int = &der[at + 2..at + 2 + len];
        let int = &int[int.len().saturating_sub(32)..];
        out.extend(std::iter::repeat_n(0, 32 - int.len()));
        out.extend_from_slice(int);
        at += 2 + len;
    }
    out
}

/// One instance at a time in this process (see the module doc).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The running services and what describes them.
pub struct Instance {
    dir: tempfile::TempDir,
    pub issuer: Issuer,
    pub fulcio_url: String,
    pub rekor_url: String,
    pub tsa_url: String,
    /// Fulcio's CA chain (DER), leaf-most first.
    pub fulcio_chain: Vec<Vec<u8>>,
    /// The TSA's chain (DER), signing certificate first.
    pub tsa_chain: Vec<Vec<u8>>,
    /// Rekor's public key (SPKI DER).
    pub rekor_key: Vec<u8>,
    /// Whether that key is Ed25519 (as the public-good Rekor v2's is) rather than ECDSA P-256.
    rekor_ed25519: bool,
    _services: Vec<Service>,
    _turn: std::sync::MutexGuard<'static, ()>,
}

impl Instance {
    /// An instance whose Rekor signs with ECDSA P-256.
    pub fn start() -> Self {
        Self::start_with(&rcgen::PKCS_ECDSA_P256_SHA256)
    }

    /// An instance whose Rekor signs with Ed25519, as Sigstore's public-good Rekor v2 does.
    pub fn start_ed25519() -> Self {
        Self::start_with(&rcgen::PKCS_ED25519)
    }

    fn start_with(rekor_algorithm: &'static rcgen::SignatureAlgorithm) -> Self {
        let turn = ONE_AT_A_TIME
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let dir = tempfile::tempdir().unwrap();
        let issuer = Issuer::start();

        let (tsa, tsa_url) = start_tsa(dir.path());
        let tsa_chain =
            pem_ders(&http_get(&format!("{tsa_url}/api/v1/timestamp/certchain")).unwrap());

        let rekor_signer = rcgen::KeyPair::generate_for(rekor_algorithm).unwrap();
        let signer_path = dir.path().join("rekor-signer.pem");
        std::fs::write(&signer_path, rekor_signer.serialize_pem()).unwrap();
        let storage = dir.path().join("rekor-tiles");
        std::fs::create_dir_all(&storage).unwrap();
        let rekor_port = free_port();
        let mut rekor = Service::start(
            "rekor-server",
            dir.path(),
            &[
                "serve".into(),
                "--http-address=127.0.0.1".into(),
                format!("--http-port={rekor_port}"),
                "--grpc-address=127.0.0.1".into(),
                format!("--grpc-port={}", free_port()),
                format!("--http-metrics-port={}", free_port()),
                format!("--storage-dir={}", storage.display()),
                format!("--signer-filepath={}", signer_path.display()),
                // The checkpoint origin: verifiers expect the host name of the log's base URL.
                "--hostname=127.0.0.1".into(),
                "--checkpoint-interval=500ms".into(),
                "--batch-max-age=50ms".into(),
            ],
        );
        let rekor_url = format!("http://127.0.0.1:{rekor_port}");
        rekor.wait_for(&format!("{rekor_url}/healthz"));

        let config = dir.path().join("fulcio.yaml");
        std::fs::write(
            &config,
            format!(
                "oidc-issuers:\n  {url}:\n    issuer-url: {url}\n    client-id: sigstore\n    type: email\n",
                url = issuer.url
            ),
        )
        .unwrap();
        let fulcio_port = free_port();
        let mut fulcio = Service::start(
            "fulcio",
            dir.path(),
            &[
                "serve".into(),
                "--host=127.0.0.1".into(),
                format!("--port={fulcio_port}"),
                "--grpc-host=127.0.0.1".into(),
                format!("--grpc-port={}", free_port()),
                format!("--metrics-port={}", free_port()),
                format!(
                    "--legacy-unix-domain-socket=@fixity-fulcio-{}",
                    std::process::id() ^ u32::from(fulcio_port)
                ),
                "--ca=ephemeralca".into(),
                "--ct-log-url=".into(),
                format!("--config-path={}", config.display()),
            ],
        );
        let fulcio_url = format!("http://127.0.0.1:{fulcio_port}");
        fulcio.wait_for(&format!("{fulcio_url}/healthz"));
        let bundle: serde_json::Value =
            serde_json::from_slice(&http_get(&format!("{fulcio_url}/api/v2/trustBundle")).unwrap())
                .unwrap();
        let fulcio_chain = bundle["chains"][0]["certificates"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|pem| pem_ders(pem.as_str().unwrap().as_bytes()))
            .collect();

        Self {
            issuer,
            fulcio_url,
            rekor_url,
            tsa_url,
            fulcio_chain,
            tsa_chain,
            rekor_key: rcgen::PublicKeyData::subject_public_key_info(&rekor_signer),
            rekor_ed25519: rekor_algorithm == &rcgen::PKCS_ED25519,
            _services: vec![tsa, rekor, fulcio],
            _turn: turn,
            dir,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The Rekor log's id, as rekor-tiles derives it: SHA-256 of the public key for ECDSA;
    /// for Ed25519 the signed-note key hash (origin, newline, algorithm byte 1, raw key).
    pub fn rekor_log_id(&self) -> Vec<u8> {
        if self.rekor_ed25519 {
            let mut named = b"127.0.0.1\n\x01".to_vec();
            named.extend_from_slice(&self.rekor_key[self.rekor_key.len() - 32..]);
            sha2::Sha256::digest(named).to_vec()
        } else {
            sha2::Sha256::digest(&self.rekor_key).to_vec()
        }
    }

    /// The `trusted_root.json` of this instance.
    pub fn trusted_root(&self) -> serde_json::Value {
        let since = serde_json::json!({ "start": "2020-01-01T00:00:00Z" });
        let chain = |ders: &[Vec<u8>]| {
            serde_json::json!({ "certificates": ders.iter()
                .map(|d| serde_json::json!({ "rawBytes": STANDARD.encode(d) }))
                .collect::<Vec<_>>() })
        };
        serde_json::json!({
            "mediaType": "application/vnd.dev.sigstore.trustedroot+json;version=0.1",
            "tlogs": [{
                "baseUrl": self.rekor_url,
                "hashAlgorithm": "SHA2_256",
                "publicKey": {
                    "rawBytes": STANDARD.encode(&self.rekor_key),
                    "keyDetails": if self.rekor_ed25519 { "PKIX_ED25519" } else { "PKIX_ECDSA_P256_SHA_256" },
                    "validFor": since,
                },
                "logId": { "keyId": STANDARD.encode(self.rekor_log_id()) },
            }],
            "certificateAuthorities": [{
                "subject": { "organization": "fixity", "commonName": "fulcio" },
                "uri": self.fulcio_url,
                "certChain": chain(&self.fulcio_chain),
                "validFor": since,
            }],
            "ctlogs": [],
            "timestampAuthorities": [{
                "subject": { "organization": "fixity", "commonName": "tsa" },
                "uri": self.tsa_url,
                "certChain": chain(&self.tsa_chain),
                "validFor": since,
            }],
        })
    }

    /// The `signing_config.json` of this instance (v0.2: Fulcio, Rekor v2, the TSA).
    pub fn signing_config(&self) -> serde_json::Value {
        let service = |url: String, version: u32| {
            serde_json::json!([{
                "url": url, "majorApiVersion": version, "operator": "fixity-test",
                "validFor": { "start": "2020-01-01T00:00:00Z" },
            }])
        };
        serde_json::json!({
            "mediaType": "application/vnd.dev.sigstore.signingconfig.v0.2+json",
            "caUrls": service(self.fulcio_url.clone(), 1),
            "oidcUrls": [],
            "rekorTlogUrls": service(self.rekor_url.clone(), 2),
            "rekorTlogConfig": { "selector": "ANY" },
            "tsaUrls": service(format!("{}/api/v1/timestamp", self.tsa_url), 1),
            "tsaConfig": { "selector": "ANY" },
        })
    }

    /// An RFC 3161 timestamp (DER) of this instance's TSA over `signature`, as a signing
    /// client asks for one.
    pub fn timestamp(&self, signature: &[u8]) -> Vec<u8> {
        http_post_json(
            &format!("{}/api/v1/timestamp", self.tsa_url),
            &serde_json::json!({
                "artifactHash": STANDARD.encode(sha2::Sha256::digest(signature)),
                "hashAlgorithm": "sha256",
                "certificates": true,
            }),
        )
        .unwrap()
    }

    /// Logs a `hashedrekord` v0.0.2 entry in this Rekor v2 (the SHA-256 `digest` of what was
    /// signed, the signature, the signing certificate); returns the bundle's log entry.
    pub fn log_hashedrekord(
        &self,
        digest: &[u8],
        signature: &[u8],
        certificate: &[u8],
    ) -> serde_json::Value {
        let answer = http_post_json(
            &format!("{}/api/v2/log/entries", self.rekor_url),
            &serde_json::json!({ "hashedRekordRequestV002": {
                "digest": STANDARD.encode(digest),
                "signature": {
                    "content": STANDARD.encode(signature),
                    "verifier": {
                        "x509Certificate": { "rawBytes": STANDARD.encode(certificate) },
                        "keyDetails": "PKIX_ECDSA_P256_SHA_256",
                    },
                },
            }}),
        )
        .unwrap();
        serde_json::from_slice(&answer).unwrap()
    }

    /// Writes the trust root and signing config; returns their paths.
    pub fn write_config(&self) -> (PathBuf, PathBuf) {
        let root = self.path().join("trusted_root.json");
        let signing = self.path().join("signing_config.json");
        std::fs::write(&root, self.trusted_root().to_string()).unwrap();
        std::fs::write(&signing, self.signing_config().to_string()).unwrap();
        (root, signing)
    }

    /// A fresh ID token in a file (cosign reads `--identity-token` as a path when one exists).
    fn token_file(&self) -> PathBuf {
        let path = self.path().join("id-token");
        std::fs::write(&path, self.issuer.token()).unwrap();
        path
    }

    /// `cosign sign` keyless through this instance, as a user of a private Sigstore does.
    pub fn cosign_sign(&self, lab: &Lab, reference: &str) {
        let (root, signing) = self.write_config();
        let token = self.token_file();
        cosign(
            lab.path(),
            &[
                "sign",
                "--signing-config",
                root_str(&signing),
                "--trusted-root",
                root_str(&root),
                "--identity-token",
                root_str(&token),
                "--allow-http-registry",
                "-y",
                reference,
            ],
        );
    }

    /// `cosign attest` keyless through this instance, with an SLSA-style predicate.
    pub fn cosign_attest(&self, lab: &Lab, reference: &str, predicate_type: &str, predicate: &str) {
        let (root, signing) = self.write_config();
        let token = self.token_file();
        let path = lab.path().join("predicate.json");
        std::fs::write(&path, predicate).unwrap();
        cosign(
            lab.path(),
            &[
                "attest",
                "--signing-config",
                root_str(&signing),
                "--trusted-root",
                root_str(&root),
                "--identity-token",
                root_str(&token),
                "--allow-http-registry",
                "--type",
                predicate_type,
                "--predicate",
                root_str(&path),
                "-y",
                reference,
            ],
        );
    }
}

/// Starts the timestamp authority; another process's may hold port 2112 for a while.
fn start_tsa(dir: &Path) -> (Service, String) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let port = free_port();
        let mut tsa = Service::start(
            "timestamp-server",
            dir,
            &[
                "serve".into(),
                "--host=127.0.0.1".into(),
                format!("--port={port}"),
                "--timestamp-signer=memory".into(),
                "--disable-ntp-monitoring".into(),
            ],
        );
        let url = format!("http://127.0.0.1:{port}");
        let ping = format!("{url}/ping");
        loop {
            if http_get(&ping).is_ok() {
                // The metrics server may lose the race for 2112 just after the API is up.
                std::thread::sleep(Duration::from_millis(100));
                if matches!(tsa.child.try_wait(), Ok(None)) {
                    return (tsa, url);
                }
            }
            if let Ok(Some(_)) = tsa.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let output = tsa.output();
        assert!(
            output.contains(":2112: bind: address already in use") && Instant::now() < deadline,
            "the timestamp authority did not start:\n{output}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn root_str(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Runs the pinned cosign; panics with its output when it fails.
pub fn cosign(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("cosign")
        .args(args)
        .current_dir(dir)
        .env("PATH", tool_path())
        .env("HOME", dir)
        .env("COSIGN_PASSWORD", "")
        .stdin(Stdio::null())
        .output()
        .expect("cosign");
    assert!(
        out.status.success(),
        "cosign {:?} failed:\n{}\n{}",
        &args[..1],
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A Fulcio-style ten-minute code-signing certificate (PEM) for `public_pem`, valid from
/// `not_before`, naming `san` and the OIDC `issuer` (Fulcio's v2 issuer extension, a DER
/// UTF8String), issued by the CA `ca_cert` with `ca_key`.
pub fn fulcio_like_certificate(
    ca_cert: &rcgen::Certificate,
    ca_key: &rcgen::KeyPair,
    public_pem: &str,
    san: rcgen::SanType,
    issuer: &str,
    not_before: time::OffsetDateTime,
) -> String {
    let spki = rcgen::SubjectPublicKeyInfo::from_pem(public_pem).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![san];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::CodeSigning];
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.not_before = not_before;
    params.not_after = not_before + time::Duration::minutes(10);
    let mut value = vec![0x0c, u8::try_from(issuer.len()).unwrap()];
    value.extend_from_slice(issuer.as_bytes());
    params
        .custom_extensions
        .push(rcgen::CustomExtension::from_oid_content(
            &[1, 3, 6, 1, 4, 1, 57264, 1, 8],
            value,
        ));
    let ca = rcgen::Issuer::from_ca_cert_der(ca_cert.der(), ca_key).unwrap();
    params.signed_by(&spki, &ca).unwrap().pem()
}

/// The DER of every PEM block in `pem`.
pub fn pem_ders(pem: &[u8]) -> Vec<Vec<u8>> {
    x509_parser::pem::Pem::iter_from_buffer(pem)
        .map(|p| p.unwrap().contents)
        .collect()
}
