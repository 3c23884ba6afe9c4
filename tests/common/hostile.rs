//! A registry that misbehaves on purpose. Every answer comes from a function of the request, so
//! each test says exactly how the registry lies; every request is recorded (with the
//! credentials it carried) and every body byte written is counted.
//!
//! HTTP/1.1 is written by hand, one request per connection, because the misbehaviour is the
//! point: resets, silence, bodies longer or shorter than announced, endless streams.
//!
//! [`cases`] is the catalogue of hostile registries that tests/hostile_registry.rs checks and
//! `cargo bench --bench hostile` measures.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::Digest as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One request as the registry saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// Path and query.
    pub target: String,
    /// The `Host` header: how the client addressed this registry.
    pub host: String,
    pub accept: String,
    pub authorization: Option<String>,
}

impl Seen {
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or(&self.target)
    }
}

/// How the registry answers one request.
pub enum Reply {
    /// A status with headers and no body.
    Status(u16, Vec<(String, String)>),
    /// A complete body.
    Body {
        status: u16,
        content_type: String,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// `total` bytes (`prefix`, then spaces) in chunks of `chunk` bytes, `pause` between
    /// them; the length is announced when `announce`.
    Stream {
        prefix: Vec<u8>,
        total: u64,
        announce: bool,
        chunk: usize,
        pause: Duration,
    },
    /// Announces `announced` bytes, sends `sent`, closes.
    Truncated { announced: u64, sent: u64 },
    /// Resets the connection without answering.
    Reset,
    /// Never answers; holds the connection.
    Silent,
    /// Forwards the GET to another registry (`host:port`, plain HTTP).
    Proxy(String),
}

impl Reply {
    pub fn status(status: u16) -> Self {
        Reply::Status(status, Vec::new())
    }

    pub fn json(content_type: &str, body: impl Into<Vec<u8>>) -> Self {
        Reply::Body {
            status: 200,
            content_type: content_type.to_owned(),
            headers: Vec::new(),
            body: body.into(),
        }
    }

    pub fn with_header(status: u16, name: &str, value: &str) -> Self {
        Reply::Status(status, vec![(name.to_owned(), value.to_owned())])
    }
}

type Answer = dyn Fn(&Seen) -> Reply + Send + Sync;

#[derive(Default)]
struct Log {
    seen: Mutex<Vec<Seen>>,
    bytes: AtomicU64,
}

/// A running hostile registry on a random loopback port, stopped on drop.
pub struct Hostile {
    pub host: String,
    log: Arc<Log>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Hostile {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Hostile {
    pub async fn start(answer: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let log = Arc::new(Log::default());
        let answer: Arc<Answer> = Arc::new(answer);
        let task = {
            let log = log.clone();
            tokio::spawn(async move {
                let upstream = reqwest::Client::new();
                while let Ok((socket, _)) = listener.accept().await {
                    let (log, answer, upstream) = (log.clone(), answer.clone(), upstream.clone());
                    tokio::spawn(async move {
                        serve(socket, &log, answer.as_ref(), &upstream).await;
                    });
                }
            })
        };
        Self { host, log, task }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.log.seen.lock().unwrap().clone()
    }

    pub fn requests(&self) -> usize {
        self.log.seen.lock().unwrap().len()
    }

    /// Body bytes written to clients so far (what the kernel accepted, which bounds what a
    /// client read).
    pub fn bytes_sent(&self) -> u64 {
        self.log.bytes.load(Ordering::Relaxed)
    }

    /// Every `Authorization` header received.
    pub fn authorizations(&self) -> Vec<String> {
        self.seen()
            .into_iter()
            .filter_map(|s| s.authorization)
            .collect()
    }
}

async fn serve(mut socket: TcpStream, log: &Log, answer: &Answer, upstream: &reqwest::Client) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match socket.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > 64 << 10 {
            return;
        }
    }
    let text = String::from_utf8_lossy(&head).to_string();
    let mut request_line = text.lines().next().unwrap_or_default().split(' ');
    let header = |name: &str| {
        text.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    };
    let seen = Seen {
        method: request_line.next().unwrap_or_default().to_owned(),
        target: request_line.next().unwrap_or("/").to_owned(),
        host: header("host").unwrap_or_default(),
        accept: header("accept").unwrap_or_default(),
        authorization: header("authorization"),
    };
    log.seen.lock().unwrap().push(seen.clone());
    let reply = answer(&seen);
    let _ = write_reply(&mut socket, reply, &seen, log, upstream).await;
}

async fn write_reply(
    socket: &mut TcpStream,
    reply: Reply,
    seen: &Seen,
    log: &Log,
    upstream: &reqwest::Client,
) -> std::io::Result<()> {
    let head = |status: u16, length: Option<u64>, headers: &[(String, String)]| {
        let mut text = format!(
            "HTTP/1.1 {status} {}\r\nconnection: close\r\n",
            reason(status)
        );
        if let Some(length) = length {
            text.push_str(&format!("content-length: {length}\r\n"));
        }
        for (k, v) in headers {
            text.push_str(&format!("{k}: {v}\r\n"));
        }
        text.push_str("\r\n");
        text.into_bytes()
    };
    match reply {
        Reply::Status(status, headers) => socket.write_all(&head(status, Some(0), &headers)).await,
        Reply::Body {
            status,
            content_type,
            mut headers,
            body,
        } => {
            headers.push(("content-type".to_owned(), content_type));
            socket
                .write_all(&head(status, Some(body.len() as u64), &headers))
                .await?;
            socket.write_all(&body).await?;
            log.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
            Ok(())
        }
        Reply::Stream {
            prefix,
            total,
            announce,
            chunk,
            pause,
        } => {
            let headers = [(
                "content-type".to_owned(),
                "application/vnd.oci.image.manifest.v1+json".to_owned(),
            )];
            socket
                .write_all(&head(200, announce.then_some(total), &headers))
                .await?;
            let mut sent = 0u64;
            let filler = vec![b' '; chunk.max(1)];
            while sent < total {
                let piece: &[u8] = if (sent as usize) < prefix.len() {
                    &prefix[sent as usize..prefix.len().min(sent as usize + chunk.max(1))]
                } else {
                    &filler[..filler.len().min((total - sent) as usize)]
                };
                socket.write_all(piece).await?;
                sent += piece.len() as u64;
                log.bytes.fetch_add(piece.len() as u64, Ordering::Relaxed);
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
            }
            Ok(())
        }
        Reply::Truncated { announced, sent } => {
            socket.write_all(&head(200, Some(announced), &[])).await?;
            let body = vec![b'{'; sent as usize];
            socket.write_all(&body).await?;
            log.bytes.fetch_add(sent, Ordering::Relaxed);
            Ok(())
        }
        Reply::Reset => {
            socket.set_zero_linger()?;
            Ok(())
        }
        Reply::Silent => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(())
        }
        Reply::Proxy(backend) => {
            let answer = upstream
                .get(format!("http://{backend}{}", seen.target))
                .header("accept", &seen.accept)
                .send()
                .await;
            let (status, content_type, body) = match answer {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let content_type = r
                        .headers()
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("application/octet-stream")
                        .to_owned();
                    (
                        status,
                        content_type,
                        r.bytes().await.unwrap_or_default().to_vec(),
                    )
                }
                Err(_) => (502, "text/plain".to_owned(), Vec::new()),
            };
            let headers = [("content-type".to_owned(), content_type)];
            socket
                .write_all(&head(status, Some(body.len() as u64), &headers))
                .await?;
            socket.write_all(&body).await?;
            log.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
            Ok(())
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        302 => "Found",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Whatever",
    }
}

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const SIMPLE_SIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
pub const BUNDLE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";

/// `sha256:<hex>` of `content`.
pub fn digest_of(content: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(content)))
}

/// The digest every hostile case's image is pinned to.
pub fn image_digest() -> String {
    digest_of(b"an image on a hostile registry")
}

/// The `.sig` tag of [`image_digest`].
pub fn sig_tag() -> String {
    format!("{}.sig", image_digest().replace(':', "-"))
}

/// A simple-signing layer descriptor, annotated as cosign writes it.
pub fn signature_layer(digest: &str, size: u64) -> serde_json::Value {
    serde_json::json!({
        "mediaType": SIMPLE_SIGNING,
        "digest": digest,
        "size": size,
        "annotations": {"dev.cosignproject.cosign/signature": "MEUCIQDnot+a+real+signature=="}
    })
}

/// An image manifest with these layers.
pub fn manifest_with(layers: Vec<serde_json::Value>) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "size": 2,
                   "digest": digest_of(b"{}")},
        "layers": layers
    }))
    .unwrap()
}

/// A referrers index with these entries.
pub fn index_with(entries: Vec<serde_json::Value>) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries
    }))
    .unwrap()
}

/// A referrers-index entry for a bundle manifest.
pub fn bundle_entry(digest: &str) -> serde_json::Value {
    serde_json::json!({"mediaType": OCI_MANIFEST, "digest": digest, "size": 900,
                       "artifactType": BUNDLE})
}

/// What a case must come to: the admission reason it is denied or warned with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The registry could not be asked in time: `VerificationUnavailable`, which
    /// `onVerificationError: Allow` admits with a warning.
    Unavailable,
    /// The registry answered, with nothing that proves a signature: `UnsignedImage`.
    Unsigned,
}

/// One hostile registry, and another host it sends clients to, if any.
pub struct Case {
    pub name: &'static str,
    pub expect: Expect,
    pub registry: Hostile,
    pub foreign: Option<Hostile>,
}

impl Case {
    pub fn image(&self) -> String {
        format!("{}/app@{}", self.registry.host, image_digest())
    }
}

fn is_sig_manifest(s: &Seen) -> bool {
    s.path() == format!("/v2/app/manifests/{}", sig_tag())
}

fn is_referrers(s: &Seen) -> bool {
    s.path().starts_with("/v2/app/referrers/")
}

/// A registry that challenges for a bearer token at `realm`.
fn challenge(realm: &str) -> Reply {
    Reply::with_header(
        401,
        "www-authenticate",
        &format!("Bearer realm=\"{realm}\",service=\"hostile\""),
    )
}

/// Every hostile registry of the catalogue, started.
pub async fn cases() -> Vec<Case> {
    let mut cases = Vec::new();
    let mut add = |name, expect, registry, foreign| {
        cases.push(Case {
            name,
            expect,
            registry,
            foreign,
        })
    };
    let sig_only = |reply: fn() -> Reply| {
        move |s: &Seen| {
            if is_sig_manifest(s) {
                reply()
            } else {
                Reply::status(404)
            }
        }
    };

    add(
        "honest registry, image not signed (baseline)",
        Expect::Unsigned,
        Hostile::start(|_| Reply::status(404)).await,
        None,
    );
    add(
        "slow body: 1 byte every 50 ms",
        Expect::Unavailable,
        Hostile::start(sig_only(|| Reply::Stream {
            prefix: Vec::new(),
            total: 1 << 20,
            announce: true,
            chunk: 1,
            pause: Duration::from_millis(50),
        }))
        .await,
        None,
    );
    add(
        "no answer at all",
        Expect::Unavailable,
        Hostile::start(|_| Reply::Silent).await,
        None,
    );
    add(
        "500 without Retry-After",
        Expect::Unavailable,
        Hostile::start(|_| Reply::status(500)).await,
        None,
    );
    add(
        "503 with Retry-After: 3600",
        Expect::Unavailable,
        Hostile::start(|_| Reply::with_header(503, "retry-after", "3600")).await,
        None,
    );
    add(
        "429 without Retry-After",
        Expect::Unavailable,
        Hostile::start(|_| Reply::status(429)).await,
        None,
    );
    add(
        "429 with Retry-After: 1",
        Expect::Unavailable,
        Hostile::start(|_| Reply::with_header(429, "retry-after", "1")).await,
        None,
    );
    add(
        "connection reset",
        Expect::Unavailable,
        Hostile::start(|_| Reply::Reset).await,
        None,
    );
    add(
        "body cut short",
        Expect::Unavailable,
        Hostile::start(sig_only(|| Reply::Truncated {
            announced: 5000,
            sent: 100,
        }))
        .await,
        None,
    );
    add(
        "100 MB manifest, length announced",
        Expect::Unsigned,
        Hostile::start(sig_only(|| Reply::Stream {
            prefix: b"{\"schemaVersion\":2,\"layers\":[".to_vec(),
            total: 100_000_000,
            announce: true,
            chunk: 64 << 10,
            pause: Duration::ZERO,
        }))
        .await,
        None,
    );
    add(
        "100 MB manifest, streamed without a length",
        Expect::Unsigned,
        Hostile::start(sig_only(|| Reply::Stream {
            prefix: b"{\"schemaVersion\":2,\"layers\":[".to_vec(),
            total: 100_000_000,
            announce: false,
            chunk: 64 << 10,
            pause: Duration::ZERO,
        }))
        .await,
        None,
    );
    // Listings over the size limit, and listings under it with more entries than one
    // verification fetches.
    for (name, count) in [
        ("10,000 signatures under the .sig tag", 10_000),
        ("3,000 signatures under the .sig tag", 3_000),
    ] {
        let layers = manifest_with(
            (0..count)
                .map(|i: u32| signature_layer(&digest_of(&i.to_le_bytes()), 300))
                .collect(),
        );
        let registry = Hostile::start(move |s| {
            if is_sig_manifest(s) {
                Reply::json(OCI_MANIFEST, layers.clone())
            } else {
                Reply::status(404)
            }
        })
        .await;
        add(name, Expect::Unsigned, registry, None);
    }
    for (name, count) in [("10,000 referrers", 10_000), ("4,000 referrers", 4_000)] {
        let referrers = index_with(
            (0..count)
                .map(|i: u32| bundle_entry(&digest_of(&i.to_be_bytes())))
                .collect(),
        );
        let registry = Hostile::start(move |s| {
            if is_referrers(s) {
                Reply::json(OCI_INDEX, referrers.clone())
            } else {
                Reply::status(404)
            }
        })
        .await;
        add(name, Expect::Unsigned, registry, None);
    }
    add(
        "referrer list paging forever",
        Expect::Unsigned,
        Hostile::start(|s| {
            if !is_referrers(s) {
                return Reply::status(404);
            }
            let page: u64 = s
                .target
                .split("page=")
                .nth(1)
                .and_then(|p| p.split('&').next()?.parse().ok())
                .unwrap_or(0);
            Reply::Body {
                status: 200,
                content_type: OCI_INDEX.to_owned(),
                headers: vec![(
                    "link".to_owned(),
                    format!("<{}?page={}>; rel=\"next\"", s.path(), page + 1),
                )],
                body: index_with(vec![bundle_entry(&digest_of(&page.to_le_bytes()))]),
            }
        })
        .await,
        None,
    );
    // Another host that challenges for credentials on its own token service.
    let asks_for_credentials = || async {
        Hostile::start(|s| {
            if s.path() == "/token" {
                Reply::json("application/json", r#"{"token":"stolen"}"#)
            } else {
                challenge(&format!("http://{}/token", s.host))
            }
        })
        .await
    };
    let foreign = asks_for_credentials().await;
    let target = foreign.host.clone();
    add(
        "redirect to another host that asks for credentials",
        Expect::Unsigned,
        Hostile::start(move |s| {
            Reply::with_header(302, "location", &format!("http://{target}{}", s.target))
        })
        .await,
        Some(foreign),
    );
    add(
        "redirect loop",
        Expect::Unsigned,
        Hostile::start(|s| Reply::with_header(302, "location", &format!("{}?again", s.path())))
            .await,
        None,
    );
    // A token service elsewhere that hands out tokens for credentials only.
    let foreign = Hostile::start(|s| match &s.authorization {
        Some(_) if s.path() == "/token" => Reply::json("application/json", r#"{"token":"stolen"}"#),
        _ => Reply::status(401),
    })
    .await;
    let realm = format!("http://{}/token", foreign.host);
    add(
        "token service on another host",
        Expect::Unsigned,
        Hostile::start(move |s| match &s.authorization {
            Some(a) if a == "Bearer stolen" => Reply::status(404),
            _ => challenge(&realm),
        })
        .await,
        Some(foreign),
    );
    add(
        "403 for everything",
        Expect::Unsigned,
        Hostile::start(|_| Reply::status(403)).await,
        None,
    );
    add(
        "401 again after the token",
        Expect::Unsigned,
        Hostile::start(|s| {
            if s.path() == "/token" {
                Reply::json("application/json", r#"{"token":"useless"}"#)
            } else {
                challenge(&format!("http://{}/token", s.host))
            }
        })
        .await,
        None,
    );
    add(
        "malformed JSON manifest",
        Expect::Unsigned,
        Hostile::start(sig_only(|| {
            Reply::json(OCI_MANIFEST, r#"{"schemaVersion":2,"layers":[{"#)
        }))
        .await,
        None,
    );
    add(
        "manifest of another media type",
        Expect::Unsigned,
        Hostile::start(sig_only(|| {
            let mut m: serde_json::Value =
                serde_json::from_slice(&manifest_with(Vec::new())).unwrap();
            m["mediaType"] = "text/html".into();
            Reply::json("text/html", serde_json::to_vec(&m).unwrap())
        }))
        .await,
        None,
    );
    add(
        "referrers answered with HTML",
        Expect::Unsigned,
        Hostile::start(|s| {
            if is_referrers(s) {
                Reply::json("text/html", "<html><body>login</body></html>")
            } else {
                Reply::status(404)
            }
        })
        .await,
        None,
    );
    let big = signature_layer(&digest_of(b"two mebibytes"), 2 << 20);
    add(
        "signature layer declaring 2 MiB",
        Expect::Unsigned,
        Hostile::start(move |s| {
            if is_sig_manifest(s) {
                Reply::json(OCI_MANIFEST, manifest_with(vec![big.clone()]))
            } else {
                Reply::status(404)
            }
        })
        .await,
        None,
    );
    let liar = digest_of(b"declares 300 bytes");
    let liar_layer = signature_layer(&liar, 300);
    add(
        "signature layer larger than it declares (2 MiB)",
        Expect::Unsigned,
        Hostile::start(move |s| {
            if is_sig_manifest(s) {
                Reply::json(OCI_MANIFEST, manifest_with(vec![liar_layer.clone()]))
            } else if s.path().ends_with(&liar) {
                Reply::Stream {
                    prefix: Vec::new(),
                    total: 2 << 20,
                    announce: false,
                    chunk: 64 << 10,
                    pause: Duration::ZERO,
                }
            } else {
                Reply::status(404)
            }
        })
        .await,
        None,
    );
    let claimed = digest_of(b"what the manifest claims");
    let claimed_layer = signature_layer(&claimed, 16);
    add(
        "layer that does not match its digest",
        Expect::Unsigned,
        Hostile::start(move |s| {
            if is_sig_manifest(s) {
                Reply::json(OCI_MANIFEST, manifest_with(vec![claimed_layer.clone()]))
            } else if s.path().ends_with(&claimed) {
                Reply::json("application/octet-stream", "something else!")
            } else {
                Reply::status(404)
            }
        })
        .await,
        None,
    );
    cases
}
