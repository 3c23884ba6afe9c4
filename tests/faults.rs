//! Faults under load: AdmissionReviews at a steady rate against `fixity serve` (two replicas
//! watching a real kube-apiserver) while the serving certificate rotates, policies change
//! through the API server, the API server restarts, and the replica taking the traffic gets
//! SIGTERM and the other takes over. Run it with `tests/faults/run.sh`, which starts the
//! cluster; a plain `cargo test` ignores it.
//!
//! What is counted, per phase: failed requests (connection errors, non-200, answers that are
//! not a well-formed AdmissionReview with the request's uid), wrong decisions, and latency.
//! A decision is wrong when it disagrees with the policies in force when the review was sent:
//! two policies never change (digests required, exec denied), and a third, which the test
//! applies, edits and deletes, decides whether images from `quay.io` are allowed. For a few
//! seconds after each change (until fixity's watch has seen it; how long it took is printed)
//! either answer is right for those images; before and after, only the policy's.
//!
//! A request written to a keep-alive connection that the server closed before reading it is
//! sent again on a new connection, as the API server's HTTP client does; such retries are
//! counted and printed, and a second failure is a failed request.
//!
//! Before the replicas start, the same client drives, at the same rate, a webhook that does only
//! what any must (TLS, HTTP, reading the uid): the rate it reaches there is the client's limit
//! on this machine, printed beside the rate the faults run reached, so that a run that falls
//! behind says whether the client or fixity set the pace.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum_server::tls_rustls::RustlsConfig;
use common::{fixture, test_ca, tls_connector, write_secret_volume};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

const DIGEST: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
/// How long after a policy change either answer counts as right for the images it decides.
const SETTLE: Duration = Duration::from_secs(5);

/// Requests one connection carries before it is replaced, so that handshakes (and with them
/// the rotated certificate) happen all along.
const REQUESTS_PER_CONNECTION: u64 = 50;
const CONNECTIONS: usize = 32;

fn env(name: &str) -> String {
    std::env::var(name)
        .unwrap_or_else(|_| panic!("{name} is not set: run this test with tests/faults/run.sh"))
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn kubectl(args: &[&str], stdin: Option<&str>) {
    use std::io::Write;
    let mut child = Command::new("kubectl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl on PATH");
    let mut input = child.stdin.take().unwrap();
    input
        .write_all(stdin.unwrap_or_default().as_bytes())
        .unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The two policies that never change, and the one that the test changes.
const STABLE: &str = "apiVersion: fixity.dev/v1alpha1
kind: ImmutabilityPolicy
metadata: {name: faults-digests}
spec:
  images: {requireDigest: true}
---
apiVersion: fixity.dev/v1alpha1
kind: ImmutabilityPolicy
metadata: {name: faults-exec}
spec:
  images: {requireDigest: false}
  runtime: {exec: Deny}
";

fn registries_policy(allowed: &[&str]) -> String {
    format!(
        "apiVersion: fixity.dev/v1alpha1\nkind: ImmutabilityPolicy\nmetadata: {{name: faults-registries}}\nspec:\n  images:\n    allowedRegistries: {allowed:?}\n"
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Pinned, from docker.io: always allowed.
    Pinned,
    /// A tag: always denied.
    Tagged,
    /// kubectl exec: always denied.
    Exec,
    /// Pinned, from quay.io: decided by the registries policy.
    Quay,
}

const MIX: [Kind; 10] = {
    use Kind::*;
    [
        Pinned, Quay, Tagged, Pinned, Quay, Exec, Pinned, Quay, Tagged, Quay,
    ]
};

fn body(kind: Kind, uid: &str) -> Bytes {
    let mut review: Value = match kind {
        Kind::Exec => serde_json::from_slice(&fixture("exec")).unwrap(),
        _ => serde_json::from_slice(&fixture("pod-create-pinned")).unwrap(),
    };
    let image = match kind {
        Kind::Pinned => format!("docker.io/library/nginx@sha256:{DIGEST}"),
        Kind::Tagged => "docker.io/library/nginx:1.27".to_owned(),
        Kind::Quay => format!("quay.io/acme/app@sha256:{DIGEST}"),
        Kind::Exec => String::new(),
    };
    if kind != Kind::Exec {
        review["request"]["object"]["spec"]["containers"][0]["image"] = image.into();
    }
    review["request"]["uid"] = uid.into();
    review["request"]["namespace"] = "faults".into();
    Bytes::from(serde_json::to_vec(&review).unwrap())
}

/// A change of the registries policy: from `since` on quay.io images are `denied` (or not);
/// fixity answered accordingly from `settled` on.
#[derive(Clone, Copy)]
struct QuayRule {
    since: Instant,
    settled: Option<Instant>,
    denied: bool,
}

impl QuayRule {
    /// Until fixity is seen answering by it (at most [`SETTLE`]), and from a second before
    /// it (a review sent then may be read after it), either answer is right.
    fn settling(&self, at: Instant) -> bool {
        let until = self.settled.unwrap_or(self.since + SETTLE);
        at + Duration::from_secs(1) >= self.since && at <= until
    }
}

/// `Some(denied)` when only one answer is right for a quay.io image sent at `at`.
fn quay_denied(rules: &[QuayRule], at: Instant) -> Option<bool> {
    if rules[1..].iter().any(|r| r.settling(at)) {
        return None;
    }
    rules.iter().rev().find(|r| r.since <= at).map(|r| r.denied)
}

/// One review as sent and answered: `Ok((allowed, message))` or why it failed.
struct Record {
    phase: usize,
    kind: Kind,
    /// When it was first sent (it was due earlier when the client fell behind).
    sent: Instant,
    latency_us: u64,
    /// Why the first attempt went unanswered, when it was sent again.
    retried: Option<String>,
    answer: Result<(bool, String), String>,
}

struct Shared {
    endpoints: [SocketAddr; 2],
    /// Index of the endpoint new connections go to.
    current: AtomicUsize,
    phase: AtomicUsize,
    stop: std::sync::atomic::AtomicBool,
    records: Mutex<Vec<Record>>,
    next: AtomicU64,
    handshakes_by_cert: Mutex<std::collections::HashMap<Vec<u8>, u64>>,
}

impl Shared {
    fn new(endpoints: [SocketAddr; 2]) -> Self {
        Shared {
            endpoints,
            current: AtomicUsize::new(0),
            phase: AtomicUsize::new(0),
            stop: std::sync::atomic::AtomicBool::new(false),
            records: Mutex::new(Vec::new()),
            next: AtomicU64::new(0),
            handshakes_by_cert: Mutex::default(),
        }
    }
}

struct Conn {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    used: u64,
}

async fn connect(shared: &Shared, tls: &TlsConnector) -> Result<Conn, String> {
    let addr = shared.endpoints[shared.current.load(Ordering::SeqCst)];
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    tcp.set_nodelay(true).ok();
    let stream = tls
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| format!("handshake {addr}: {e}"))?;
    let cert = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .unwrap_or_default();
    *shared
        .handshakes_by_cert
        .lock()
        .unwrap()
        .entry(cert)
        .or_default() += 1;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("http handshake {addr}: {e}"))?;
    tokio::spawn(conn);
    Ok(Conn { sender, used: 0 })
}

enum Sent {
    Answer(u16, Bytes),
    /// Failed before any byte of an answer came back on a reused connection: the server
    /// closed it (idle, or shutting down) as the request went out.
    Unanswered(String),
    Failed(String),
}

async fn send(conn: &mut Conn, body: Bytes) -> Sent {
    let reused = conn.used > 0;
    conn.used += 1;
    if let Err(e) = conn.sender.ready().await {
        return if reused {
            Sent::Unanswered(e.to_string())
        } else {
            Sent::Failed(e.to_string())
        };
    }
    let request = hyper::Request::post("/validate")
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(body))
        .unwrap();
    match conn.sender.send_request(request).await {
        Ok(response) => {
            let status = response.status().as_u16();
            match response.into_body().collect().await {
                Ok(b) => Sent::Answer(status, b.to_bytes()),
                Err(e) => Sent::Failed(format!("reading the answer: {e}")),
            }
        }
        Err(e) if reused && (e.is_canceled() || e.is_incomplete_message()) => {
            Sent::Unanswered(e.to_string())
        }
        Err(e) => Sent::Failed(e.to_string()),
    }
}

/// Reads one answer: `Ok((allowed, message))`, or `Err` for a failed request.
fn read_answer(uid: &str, status: u16, body: &[u8]) -> Result<(bool, String), String> {
    if status != 200 {
        return Err(format!("HTTP {status}: {}", String::from_utf8_lossy(body)));
    }
    let answer: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    if answer["kind"] != "AdmissionReview" || answer["response"]["uid"] != uid {
        return Err(format!("malformed answer: {answer}"));
    }
    let allowed = answer["response"]["allowed"]
        .as_bool()
        .ok_or_else(|| format!("no decision: {answer}"))?;
    let message = answer["response"]["status"]["message"]
        .as_str()
        .unwrap_or_default();
    Ok((allowed, message.to_owned()))
}

/// Whether a decision is what the policies in force say.
fn right(kind: Kind, allowed: bool, message: &str, quay: Option<bool>) -> bool {
    match kind {
        Kind::Pinned => allowed,
        Kind::Tagged => !allowed && message.contains("MutableTag"),
        Kind::Exec => !allowed && message.contains("ExecDenied"),
        Kind::Quay => match quay {
            None => true,
            Some(denied) => {
                allowed != denied && (!denied || message.contains("RegistryNotAllowed"))
            }
        },
    }
}

/// The client: [`CONNECTIONS`] workers sending, between them, `rate` reviews a second from
/// `start` on, until `shared.stop`.
fn workers(
    shared: &Arc<Shared>,
    tls: &TlsConnector,
    start: Instant,
    rate: f64,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..CONNECTIONS)
        .map(|_| tokio::spawn(worker(shared.clone(), tls.clone(), start, rate)))
        .collect()
}

async fn worker(shared: Arc<Shared>, tls: TlsConnector, start: Instant, rate: f64) {
    let mut conn: Option<Conn> = None;
    while !shared.stop.load(Ordering::SeqCst) {
        let n = shared.next.fetch_add(1, Ordering::SeqCst);
        let due = start + Duration::from_secs_f64(n as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        let sent = Instant::now();
        let kind = MIX[(n % MIX.len() as u64) as usize];
        let uid = format!("faults-{n}");
        let body = body(kind, &uid);
        let phase = shared.phase.load(Ordering::SeqCst);
        let mut retried = None;
        let outcome = loop {
            if conn
                .as_ref()
                .is_none_or(|c| c.used >= REQUESTS_PER_CONNECTION)
            {
                conn = match connect(&shared, &tls).await {
                    Ok(c) => Some(c),
                    Err(e) => break Err(e),
                };
            }
            let Some(c) = conn.as_mut() else {
                unreachable!("a connection was just opened");
            };
            match send(c, body.clone()).await {
                Sent::Answer(status, answer) => break read_answer(&uid, status, &answer),
                Sent::Unanswered(e) if retried.is_none() => {
                    retried = Some(e);
                    conn = None;
                }
                Sent::Unanswered(e) | Sent::Failed(e) => {
                    conn = None;
                    break Err(e);
                }
            }
        };
        let record = Record {
            phase,
            kind,
            sent,
            latency_us: due.elapsed().as_micros() as u64,
            retried,
            answer: outcome,
        };
        shared.records.lock().unwrap().push(record);
    }
}

/// Sends quay.io reviews until one is answered as `denied` says; when that was.
async fn until_quay(shared: &Shared, tls: &TlsConnector, denied: bool) -> Option<Instant> {
    let started = Instant::now();
    while started.elapsed() < SETTLE {
        if let Ok(mut c) = connect(shared, tls).await
            && let Sent::Answer(200, answer) = send(&mut c, body(Kind::Quay, "probe")).await
            && let Ok(v) = serde_json::from_slice::<Value>(&answer)
            && v["response"]["allowed"] == !denied
        {
            return Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// Opens connections until one is served `der`; when that was.
async fn until_served(shared: &Shared, tls: &TlsConnector, der: &[u8]) -> Option<Instant> {
    let started = Instant::now();
    while started.elapsed() < SETTLE {
        let addr = shared.endpoints[shared.current.load(Ordering::SeqCst)];
        if let Ok(tcp) = tokio::net::TcpStream::connect(addr).await
            && let Ok(stream) = tls
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await
            && stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .is_some_and(|c| c.as_ref() == der)
        {
            return Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// A webhook doing only what any webhook must: TLS (fixity's own configuration and server),
/// HTTP, reading the review's uid and answering "allowed" to it. Serves on its own runtime
/// and threads, as a separate server would, until the handle shuts it down.
fn trivial_webhook(cert: &str, key: &str) -> (SocketAddr, axum_server::Handle<SocketAddr>) {
    #[derive(serde::Deserialize)]
    struct Review {
        request: Request,
    }
    #[derive(serde::Deserialize)]
    struct Request {
        uid: String,
    }
    async fn answer(body: Bytes) -> ([(axum::http::HeaderName, &'static str); 1], Vec<u8>) {
        let uid = serde_json::from_slice::<Review>(&body)
            .map(|r| r.request.uid)
            .unwrap_or_default();
        let answer = serde_json::json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "response": {"uid": uid, "allowed": true},
        });
        (
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            serde_json::to_vec(&answer).unwrap(),
        )
    }

    // Both ring and aws-lc-rs are in the tree, so the server side needs a default chosen.
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let config = fixity::server::tls::server_config(
        cert.as_bytes(),
        "tls.crt",
        key.as_bytes(),
        "tls.key",
        &fixity::server::tls::ClientAuth::anyone(),
    )
    .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = axum_server::Handle::new();
    let serving = handle.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let app = axum::Router::new().route("/validate", axum::routing::post(answer));
            fixity::server::webhook_server(listener, RustlsConfig::from_config(config))
                .unwrap()
                .handle(serving)
                .serve(app.into_make_service())
                .await
                .unwrap();
        });
    });
    (addr, handle)
}

/// Drives [`trivial_webhook`] with the faults run's client, at its rate, for `duration`, and
/// prints the rate reached: what this client can send on this machine, fixity apart.
async fn generator_alone(tls: &TlsConnector, cert: &str, key: &str, rate: f64, duration: Duration) {
    let (addr, server) = trivial_webhook(cert, key);
    let shared = Arc::new(Shared::new([addr, addr]));
    let start = Instant::now();
    let workers = workers(&shared, tls, start, rate);
    tokio::time::sleep(duration).await;
    shared.stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    server.shutdown();
    let records = shared.records.lock().unwrap();
    let failed = records.iter().filter(|r| r.answer.is_err()).count();
    let mut l: Vec<u64> = records.iter().map(|r| r.latency_us).collect();
    l.sort_unstable();
    println!(
        "generator alone (a webhook that only reads the uid): {} reviews in {elapsed:.1}s ({:.0}/s, asked {rate:.0}/s), {failed} failed, p50 {:.1} ms, p99 {:.1} ms",
        records.len(),
        records.len() as f64 / elapsed,
        quantile(&l, 0.5) as f64 / 1000.0,
        quantile(&l, 0.99) as f64 / 1000.0,
    );
}

fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// A `fixity serve` replica, killed on drop unless taken.
struct Replica(Option<std::process::Child>);

impl Replica {
    fn take(&mut self) -> std::process::Child {
        self.0.take().expect("the replica is still ours")
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn replica(bin: &Path, addr: SocketAddr, volume: &Path, log: &Path) -> Replica {
    let health = common::free_addr();
    let child = Command::new(bin)
        .args(["serve", "--watch-cluster", "--cert-poll-ms", "200"])
        .args([
            "--addr",
            &addr.to_string(),
            "--health-addr",
            &health.to_string(),
        ])
        .arg("--tls-cert")
        .arg(volume.join("tls.crt"))
        .arg("--tls-key")
        .arg(volume.join("tls.key"))
        .args(["--log-format", "json"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("fixity");
    let replica = Replica(Some(child));
    let deadline = Instant::now() + Duration::from_secs(30);
    while common::http_get(health, "/readyz").is_none_or(|(code, _)| code != 200) {
        assert!(Instant::now() < deadline, "fixity at {addr} not ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    replica
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster: run tests/faults/run.sh"]
async fn reviews_under_faults() {
    let cluster = PathBuf::from(env("FIXITY_CLUSTER_DIR"));
    env("KUBECONFIG");
    let seconds: u64 = env_or("FIXITY_FAULTS_SECONDS", 15);
    let rate: f64 = env_or("FIXITY_FAULTS_RATE", 200.0);
    let bin = PathBuf::from(
        std::env::var("FIXITY_FAULTS_BIN").unwrap_or_else(|_| common::BIN.to_owned()),
    );
    let root = repo_root();

    kubectl(&["apply", "-f", "-"], Some(STABLE));
    kubectl(&["create", "namespace", "faults"], None);

    let work = tempfile::tempdir().unwrap();
    let volume = work.path().join("tls");
    std::fs::create_dir(&volume).unwrap();
    let issue = test_ca(work.path());
    let (cert, key) = issue();
    write_secret_volume(&volume, 0, &cert, &key);
    let tls = tls_connector(&work.path().join("ca.crt"));
    let alone = Duration::from_secs(env_or(
        "FIXITY_FAULTS_ALONE_SECONDS",
        (seconds / 6).clamp(2, 10),
    ));
    generator_alone(&tls, &cert, &key, rate, alone).await;

    let endpoints = [common::free_addr(), common::free_addr()];
    let logs = [work.path().join("a.log"), work.path().join("b.log")];
    let mut a = replica(&bin, endpoints[0], &volume, &logs[0]);
    let b = replica(&bin, endpoints[1], &volume, &logs[1]);

    let names = [
        "steady",
        "certificate rotates",
        "policies change",
        "API server restarts",
        "SIGTERM, takeover",
    ];
    let shared = Arc::new(Shared::new(endpoints));
    let start = Instant::now();
    let mut rules = vec![QuayRule {
        since: start,
        settled: Some(start),
        denied: false,
    }];
    let workers = workers(&shared, &tls, start, rate);

    // Each phase lasts `slot` at least, longer when its fault takes longer.
    let slot = Duration::from_secs(seconds) / names.len() as u32;
    let mut phase_started = start;
    let mut next_phase = async |index: usize| {
        tokio::time::sleep_until((phase_started + slot).into()).await;
        phase_started = Instant::now();
        shared.phase.store(index, Ordering::SeqCst);
    };

    // Certificate rotation: twice, a Secret-volume swap each time.
    next_phase(1).await;
    let mut pickups = Vec::new();
    for generation in 1..=2 {
        let (cert, key) = issue();
        let der = CertificateDer::from_pem_slice(cert.as_bytes())
            .unwrap()
            .to_vec();
        let written = Instant::now();
        write_secret_volume(&volume, generation, &cert, &key);
        pickups.push(until_served(&shared, &tls, &der).await.map(|t| t - written));
        tokio::time::sleep(slot / 3).await;
    }

    // Policies: apply (quay.io denied), edit (allowed again), edit (denied), delete (allowed).
    next_phase(2).await;
    let changes: [(Option<&[&str]>, bool); 4] = [
        (Some(&["docker.io/**"]), true),
        (Some(&["docker.io/**", "quay.io/**"]), false),
        (Some(&["docker.io/**", "ghcr.io/**"]), true),
        (None, false),
    ];
    for (allowed, denied) in changes {
        let since = Instant::now();
        let yaml = allowed.map(registries_policy);
        tokio::task::spawn_blocking(move || match yaml {
            Some(yaml) => kubectl(&["apply", "-f", "-"], Some(&yaml)),
            None => kubectl(&["delete", "immutabilitypolicy", "faults-registries"], None),
        })
        .await
        .unwrap();
        // A review read just before the probe's may be answered just after it.
        let settled = until_quay(&shared, &tls, denied)
            .await
            .map(|seen| seen + Duration::from_millis(100));
        rules.push(QuayRule {
            since,
            settled,
            denied,
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // The API server goes away for two seconds and comes back.
    next_phase(3).await;
    let restart = root.join("tests/cluster/restart.sh");
    let dir = cluster.clone();
    let restarted = tokio::task::spawn_blocking(move || {
        Command::new(restart)
            .arg(&dir)
            .args(["kube-apiserver", "2"])
            .status()
            .expect("restart.sh")
    })
    .await
    .unwrap();
    assert!(restarted.success(), "the API server did not come back");

    // The replica taking the traffic is taken out of the endpoints and gets SIGTERM, as
    // Kubernetes does both at once; new connections go to the other.
    next_phase(4).await;
    shared.current.store(1, Ordering::SeqCst);
    let mut first = a.take();
    let term = Command::new("kill")
        .args(["-TERM", &first.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let stopped = Instant::now();
    let exit = tokio::task::spawn_blocking(move || first.wait().unwrap())
        .await
        .unwrap();
    let stop_time = stopped.elapsed();
    tokio::time::sleep_until((phase_started + slot).into()).await;
    shared.stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }
    let elapsed = start.elapsed();
    drop(b);

    let records = shared.records.lock().unwrap();
    let total = records.len();
    println!(
        "faults: {total} reviews in {:.1}s ({:.0}/s, target {rate:.0}/s), {CONNECTIONS} connections",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64()
    );
    println!(
        "{:<22} {:>7} {:>7} {:>6} {:>8} {:>9} {:>9} {:>9}",
        "phase", "sent", "failed", "wrong", "retried", "p50 ms", "p99 ms", "max ms"
    );
    let (mut failed, mut wrong) = (0, 0);
    for (index, name) in names.iter().enumerate() {
        let phase: Vec<&Record> = records.iter().filter(|r| r.phase == index).collect();
        let mut examples = Vec::new();
        let (mut f, mut w) = (0, 0);
        for r in &phase {
            match &r.answer {
                Err(e) => {
                    f += 1;
                    examples.push(format!("failed {:?}: {e}", r.kind));
                }
                Ok((allowed, message)) => {
                    if !right(r.kind, *allowed, message, quay_denied(&rules, r.sent)) {
                        w += 1;
                        examples.push(format!(
                            "wrong {:?} sent at {} ms: allowed={allowed} {message}",
                            r.kind,
                            (r.sent - start).as_millis()
                        ));
                    }
                }
            }
        }
        let mut l: Vec<u64> = phase.iter().map(|r| r.latency_us).collect();
        l.sort_unstable();
        println!(
            "{:<22} {:>7} {:>7} {:>6} {:>8} {:>9.1} {:>9.1} {:>9.1}",
            name,
            phase.len(),
            f,
            w,
            phase.iter().filter(|r| r.retried.is_some()).count(),
            quantile(&l, 0.5) as f64 / 1000.0,
            quantile(&l, 0.99) as f64 / 1000.0,
            l.last().copied().unwrap_or_default() as f64 / 1000.0
        );
        let retries = phase.iter().filter_map(|r| r.retried.as_ref());
        for e in examples.iter().take(5) {
            println!("    {e}");
        }
        for e in retries.take(2) {
            println!("    sent again after: {e}");
        }
        failed += f;
        wrong += w;
    }
    let seen: Vec<String> = rules[1..]
        .iter()
        .map(|r| {
            r.settled.map_or("not seen".to_owned(), |s| {
                format!("{} ms", (s - r.since).as_millis().saturating_sub(100))
            })
        })
        .collect();
    println!(
        "policy changes answered after (kubectl included): {}",
        seen.join(", ")
    );
    let certs = shared.handshakes_by_cert.lock().unwrap();
    let pickup: Vec<String> = pickups
        .iter()
        .map(|p| p.map_or("not served".to_owned(), |d| format!("{} ms", d.as_millis())))
        .collect();
    println!(
        "certificates: rotated ones served after {}; handshakes by certificate: {:?}",
        pickup.join(", "),
        certs.values().collect::<Vec<_>>()
    );
    println!(
        "SIGTERM: the replica exited ({exit}) {} ms after the signal",
        stop_time.as_millis()
    );

    let logs_text = || {
        logs.iter()
            .map(|l| std::fs::read_to_string(l).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n----\n")
    };
    assert_eq!(failed, 0, "failed requests; replica logs:\n{}", logs_text());
    assert_eq!(wrong, 0, "wrong decisions; replica logs:\n{}", logs_text());
    assert!(
        exit.success(),
        "the replica did not stop cleanly on SIGTERM"
    );
    assert!(
        pickups.iter().all(Option::is_some),
        "a rotated certificate was not served within {SETTLE:?}"
    );
    assert!(
        rules.iter().all(|r| r.settled.is_some()),
        "a policy change was not answered within {SETTLE:?}"
    );
    assert!(
        total as f64 >= rate * elapsed.as_secs_f64() * 0.9,
        "only {total} reviews in {:.1}s: the client fell behind {rate}/s",
        elapsed.as_secs_f64()
    );
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}
