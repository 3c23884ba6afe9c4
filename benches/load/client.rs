//! The load client: HTTPS POSTs of AdmissionReviews over a fixed set of TLS keep-alive
//! connections, either closed loop (each connection sends as soon as its last answer arrived:
//! finds saturation) or open loop (requests scheduled at a fixed rate whatever the answers do).
//!
//! Open loop works like a connection pool under a steady arrival rate: request `n` is due at
//! `start + n / rate`; an idle connection takes the next due request. When every connection is
//! busy, requests wait, and their latency counts from when they were due, so a server that
//! falls behind is charged for the queue it causes. When a connection is early it sleeps until
//! the due time; tokio's timer wakes up to a millisecond late, and that lateness is the client's,
//! so such a request is timed from the moment it was actually sent (the lateness is reported).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::header;
use hyper_util::rt::TokioIo;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

/// A TLS client that trusts exactly the CA in `ca_pem` and speaks HTTP/1.1.
pub fn connector(ca_pem: &Path) -> anyhow::Result<TlsConnector> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_pem).context("reading the CA")? {
        roots.add(cert?)?;
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

/// One keep-alive connection.
pub struct Connection {
    sender: SendRequest<Full<Bytes>>,
}

impl Connection {
    pub async fn open(connector: &TlsConnector, addr: SocketAddr) -> anyhow::Result<Self> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let tls = connector
            .connect(ServerName::try_from("localhost")?, tcp)
            .await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        Ok(Self { sender })
    }

    /// POSTs one review to /validate and returns the answer's body; anything but 200 is an error.
    pub async fn review(&mut self, body: Bytes) -> anyhow::Result<Bytes> {
        self.sender.ready().await?;
        let request = hyper::Request::post("/validate")
            .header(header::HOST, "localhost")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))?;
        let response = self.sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        if status != hyper::StatusCode::OK {
            bail!("HTTP {status}: {}", String::from_utf8_lossy(&body));
        }
        Ok(body)
    }
}

/// How requests are paced.
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// Each connection sends its next request as soon as the last one is answered.
    Closed,
    /// Requests are due at a fixed rate per second.
    Open { rate: f64 },
}

/// One run of load against one server.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub pace: Pace,
    pub connections: usize,
    pub duration: Duration,
}

/// What the client saw.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Latency of every answered request, in nanoseconds, sorted.
    pub latencies: Vec<u64>,
    /// How late the client's timer woke for requests that were not yet due (open loop).
    pub timer_lateness: Vec<u64>,
    pub errors: u64,
    pub first_error: Option<String>,
    /// From the first due request to the last answer (or the end of the run, if later).
    pub elapsed: Duration,
}

impl Outcome {
    pub fn throughput(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }
}

/// The `q` quantile of sorted samples (nearest rank).
pub fn quantile(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

struct Plan {
    bodies: Arc<[Bytes]>,
    pace: Pace,
    start: Instant,
    end: Instant,
    next: AtomicU64,
}

/// Runs `load` against `addr`, cycling through `bodies`. Connections are opened (handshakes
/// done) before the clock starts.
pub async fn run(
    connector: &TlsConnector,
    addr: SocketAddr,
    bodies: Arc<[Bytes]>,
    load: Load,
) -> anyhow::Result<Outcome> {
    let mut connections = Vec::with_capacity(load.connections);
    for _ in 0..load.connections {
        connections.push(Connection::open(connector, addr).await?);
    }
    let start = Instant::now() + Duration::from_millis(10);
    let plan = Arc::new(Plan {
        bodies,
        pace: load.pace,
        start,
        end: start + load.duration,
        next: AtomicU64::new(0),
    });
    let mut workers = tokio::task::JoinSet::new();
    for connection in connections {
        workers.spawn(work(
            connection,
            plan.clone(),
            connector.clone(),
            addr,
            load.duration,
        ));
    }
    let mut outcome = Outcome::default();
    let mut last_answer = plan.end;
    while let Some(done) = workers.join_next().await {
        let done = done?;
        outcome.latencies.extend(done.latencies);
        outcome.timer_lateness.extend(done.timer_lateness);
        outcome.errors += done.errors;
        if outcome.first_error.is_none() {
            outcome.first_error = done.first_error;
        }
        if let Some(t) = done.last_answer {
            last_answer = last_answer.max(t);
        }
    }
    outcome.latencies.sort_unstable();
    outcome.timer_lateness.sort_unstable();
    outcome.elapsed = last_answer - start;
    Ok(outcome)
}

#[derive(Default)]
struct WorkerOutcome {
    latencies: Vec<u64>,
    timer_lateness: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
    last_answer: Option<Instant>,
}

async fn work(
    mut connection: Connection,
    plan: Arc<Plan>,
    connector: TlsConnector,
    addr: SocketAddr,
    duration: Duration,
) -> WorkerOutcome {
    let mut out = WorkerOutcome {
        // Room for a generous share of the run, so the hot loop rarely reallocates.
        latencies: Vec::with_capacity(duration.as_millis() as usize * 8),
        ..Default::default()
    };
    tokio::time::sleep_until(plan.start.into()).await;
    loop {
        let ticket = plan.next.fetch_add(1, Ordering::Relaxed);
        let timed_from = match plan.pace {
            Pace::Closed => {
                let now = Instant::now();
                if now >= plan.end {
                    break;
                }
                now
            }
            Pace::Open { rate } => {
                let due = plan.start + Duration::from_secs_f64(ticket as f64 / rate);
                if due >= plan.end {
                    break;
                }
                if due > Instant::now() {
                    tokio::time::sleep_until(due.into()).await;
                    let woke = Instant::now();
                    out.timer_lateness.push(nanos(woke - due));
                    woke
                } else {
                    due
                }
            }
        };
        let body = plan.bodies[ticket as usize % plan.bodies.len()].clone();
        match connection.review(body).await {
            Ok(_) => {
                let now = Instant::now();
                out.latencies.push(nanos(now - timed_from));
                out.last_answer = Some(now);
            }
            Err(e) => {
                out.errors += 1;
                out.first_error.get_or_insert_with(|| format!("{e:#}"));
                // A broken connection is replaced; a refused one is retried shortly.
                match Connection::open(&connector, addr).await {
                    Ok(fresh) => connection = fresh,
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        }
    }
    out
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Reviews on new connections: review `n` is due at `start + n / rate`, and each run of
/// `per_connection` reviews has a TLS connection of its own, opened when its first review is
/// due. What the API server does when it has no idle connection to a webhook.
#[derive(Debug, Clone, Copy)]
pub struct Fresh {
    pub rate: f64,
    pub per_connection: usize,
    pub duration: Duration,
}

/// What the client saw on fresh connections, in nanoseconds, each list sorted.
#[derive(Debug, Default)]
pub struct FreshOutcome {
    /// TCP connect and TLS handshake of each connection.
    pub handshakes: Vec<u64>,
    /// The first review on each connection, from sending it to its answer.
    pub first: Vec<u64>,
    /// Every other review.
    pub later: Vec<u64>,
    pub errors: u64,
    pub first_error: Option<String>,
}

impl FreshOutcome {
    /// Adds another round of the same load.
    pub fn absorb(&mut self, other: FreshOutcome) {
        for (all, more) in [
            (&mut self.handshakes, other.handshakes),
            (&mut self.first, other.first),
            (&mut self.later, other.later),
        ] {
            all.extend(more);
        }
        self.errors += other.errors;
        self.first_error = self.first_error.take().or(other.first_error);
        self.sort();
    }

    fn sort(&mut self) {
        self.handshakes.sort_unstable();
        self.first.sort_unstable();
        self.later.sort_unstable();
    }
}

/// Runs `load` against `addr`, cycling through `bodies`.
pub async fn fresh(
    connector: &TlsConnector,
    addr: SocketAddr,
    bodies: Arc<[Bytes]>,
    load: Fresh,
) -> anyhow::Result<FreshOutcome> {
    let total = (load.duration.as_secs_f64() * load.rate) as usize;
    let per_connection = load.per_connection.max(1);
    let start = Instant::now() + Duration::from_millis(10);
    let due = move |ticket: usize| start + Duration::from_secs_f64(ticket as f64 / load.rate);
    let mut connections = tokio::task::JoinSet::new();
    for first in (0..total).step_by(per_connection) {
        let (connector, bodies) = (connector.clone(), bodies.clone());
        let tickets = first..(first + per_connection).min(total);
        connections.spawn(async move {
            tokio::time::sleep_until(due(first).into()).await;
            let opened = Instant::now();
            let mut connection = Connection::open(&connector, addr).await?;
            let handshake = nanos(opened.elapsed());
            let mut latencies = Vec::with_capacity(tickets.len());
            for ticket in tickets {
                tokio::time::sleep_until(due(ticket).into()).await;
                let sent = Instant::now();
                connection
                    .review(bodies[ticket % bodies.len()].clone())
                    .await?;
                latencies.push(nanos(sent.elapsed()));
            }
            anyhow::Ok((handshake, latencies))
        });
    }
    let mut outcome = FreshOutcome::default();
    while let Some(done) = connections.join_next().await {
        match done? {
            Ok((handshake, latencies)) => {
                outcome.handshakes.push(handshake);
                if let Some((first, later)) = latencies.split_first() {
                    outcome.first.push(*first);
                    outcome.later.extend_from_slice(later);
                }
            }
            Err(e) => {
                outcome.errors += 1;
                outcome.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    outcome.sort();
    Ok(outcome)
}
