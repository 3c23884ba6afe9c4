//! The load benchmark (`cargo bench --bench load`, see BENCHMARKS.md).
//!
//! Starts the release `fixity serve` with a production-like policy and a bare axum + rustls
//! baseline on loopback, drives both over TLS keep-alive connections with the same mix of
//! AdmissionReviews, closed loop (saturation) and open loop (latency at a fixed rate), then on
//! fresh connections (the first review after a handshake), and prints throughput, latency
//! percentiles, server CPU and memory, and fixity/baseline ratios.

mod baseline;
mod bodies;
mod client;
mod probe;

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hyper::body::Bytes;
use tokio_rustls::TlsConnector;

use client::{Fresh, FreshOutcome, Load, Outcome, Pace, quantile};
use probe::Buckets;

const FIXITY: &str = env!("CARGO_BIN_EXE_fixity");
/// Overrides the fixity binary under test, e.g. an unstripped build for a profiler.
const FIXITY_OVERRIDE: &str = "FIXITY_BENCH_BIN";
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/load/fixtures");

/// The request mix, one entry per slot of a repeating cycle of ten: pods dominate (every
/// Deployment, Job and ReplicaSet turns into many pod creations), exec is rare.
const MIX: [Kind; 10] = {
    use Kind::{Deployment as D, Exec as E, Pod as P};
    [P, D, P, P, E, P, P, D, P, P]
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Pod,
    Deployment,
    Exec,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Pod, Kind::Deployment, Kind::Exec];

    fn file(self) -> &'static str {
        match self {
            Kind::Pod => "pod-create.json",
            Kind::Deployment => "deployment-create.json",
            Kind::Exec => "exec.json",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Kind::Pod => "Pod CREATE (3 containers + 1 init, digest-pinned)",
            Kind::Deployment => "Deployment CREATE (2 containers, digest-pinned)",
            Kind::Exec => "exec CONNECT (denied, audit log line)",
        }
    }

    /// What fixity must answer, checked before any load is sent.
    fn allowed_by_fixity(self) -> bool {
        self != Kind::Exec
    }
}

struct Options {
    /// Load time per server per phase, split into rounds.
    phase: Duration,
    rounds: u32,
    connections: usize,
    rate: f64,
    high_rate: f64,
    client_threads: usize,
    /// Reviews per second on fresh connections, and for how long per server and variant.
    fresh_rate: f64,
    fresh_phase: Duration,
}

impl Options {
    fn parse(args: &[String]) -> anyhow::Result<Self> {
        let mut options = Self {
            phase: Duration::from_secs(6),
            rounds: 10,
            connections: 16,
            rate: 2000.0,
            high_rate: 10_000.0,
            client_threads: 1,
            fresh_rate: 50.0,
            fresh_phase: Duration::from_secs(4),
        };
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let mut value = |name: &str| -> anyhow::Result<f64> {
                let v = args
                    .next()
                    .with_context(|| format!("{name} needs a value"))?;
                v.parse().with_context(|| format!("{name} {v:?}"))
            };
            match arg.as_str() {
                "--bench" => {}
                "--secs" => options.phase = Duration::from_secs_f64(value("--secs")?),
                "--rounds" => options.rounds = value("--rounds")? as u32,
                "--connections" => options.connections = value("--connections")? as usize,
                "--rate" => options.rate = value("--rate")?,
                "--high-rate" => options.high_rate = value("--high-rate")?,
                "--client-threads" => options.client_threads = value("--client-threads")? as usize,
                "--fresh-rate" => options.fresh_rate = value("--fresh-rate")?,
                "--fresh-secs" => {
                    options.fresh_phase = Duration::from_secs_f64(value("--fresh-secs")?);
                }
                other => bail!(
                    "unknown argument {other:?}; options: --secs S --rounds N --connections N \
                     --rate R --high-rate R --client-threads N --fresh-rate R --fresh-secs S"
                ),
            }
        }
        if options.connections == 0 || options.client_threads == 0 || options.rounds == 0 {
            bail!("--rounds, --connections and --client-threads must be at least 1");
        }
        if options.fresh_rate <= 0.0 {
            bail!("--fresh-rate must be above 0");
        }
        Ok(options)
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, cert, key] = args.as_slice()
        && flag == "--baseline-server"
    {
        return match baseline::serve(Path::new(cert), Path::new(key)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("baseline server: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    // `cargo test --benches` runs bench targets without `--bench`: a benchmark is not a test.
    if !args.iter().any(|a| a == "--bench") {
        eprintln!("the load benchmark runs with: cargo bench --bench load");
        return ExitCode::SUCCESS;
    }
    match Options::parse(&args).and_then(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("load benchmark failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A server under test, killed on drop.
struct Server {
    name: &'static str,
    child: Child,
    addr: SocketAddr,
    /// fixity's health port, for /metrics.
    health: Option<SocketAddr>,
    log: PathBuf,
}

impl Server {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn start_fixity(dir: &Path) -> anyhow::Result<Server> {
    let (addr, health) = (free_addr()?, free_addr()?);
    let log = dir.join("fixity.log");
    let binary = std::env::var_os(FIXITY_OVERRIDE).map_or_else(|| FIXITY.into(), PathBuf::from);
    let child = Command::new(&binary)
        .arg("serve")
        .args(["--addr", &addr.to_string()])
        .args(["--health-addr", &health.to_string()])
        .args(["--dev", "--dev-cert-dir"])
        .arg(dir.join("certs"))
        .arg("--policy")
        .arg(Path::new(FIXTURES).join("policy.yaml"))
        // Production logs JSON; --dev alone would switch to text.
        .args(["--log-format", "json"])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let mut server = Server {
        name: "fixity",
        child,
        addr,
        health: Some(health),
        log,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = server.child.try_wait()? {
            bail!("fixity exited with {status}:\n{}", server.log_tail());
        }
        if probe::http_get(health, "/readyz").is_some_and(|(code, _)| code == 200) {
            return Ok(server);
        }
        if Instant::now() > deadline {
            bail!("fixity did not become ready:\n{}", server.log_tail());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn start_baseline(dir: &Path) -> anyhow::Result<Server> {
    let log = dir.join("baseline.log");
    let mut child = Command::new(std::env::current_exe()?)
        .arg("--baseline-server")
        .arg(dir.join("certs/tls.crt"))
        .arg(dir.join("certs/tls.key"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let mut line = String::new();
    if let Some(stdout) = child.stdout.take() {
        BufReader::new(stdout).read_line(&mut line)?;
    }
    let mut server = Server {
        name: "baseline",
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        health: None,
        log,
    };
    server.addr = line
        .trim()
        .parse()
        .with_context(|| format!("the baseline server did not start:\n{}", server.log_tail()))?;
    Ok(server)
}

/// Each server's resident memory now, in MiB.
fn resident_mib(servers: &[&Server]) -> Vec<Option<f64>> {
    servers
        .iter()
        .map(|s| probe::status_mib(s.pid(), "VmRSS"))
        .collect()
}

fn load_bodies() -> anyhow::Result<Vec<(Kind, Bytes)>> {
    Kind::ALL
        .iter()
        .map(|&kind| {
            let path = Path::new(FIXTURES).join(kind.file());
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            Ok((kind, Bytes::from(bodies::compact(&text))))
        })
        .collect()
}

/// Sends each kind of review once and checks the answer against `allowed`, so the load never
/// measures an error path by mistake.
async fn check_answers(
    connector: &TlsConnector,
    server: &Server,
    bodies: &[(Kind, Bytes)],
    allowed: impl Fn(Kind) -> bool,
) -> anyhow::Result<()> {
    let mut connection = client::Connection::open(connector, server.addr).await?;
    for (kind, body) in bodies {
        let answer = connection.review(body.clone()).await?;
        let review: serde_json::Value = serde_json::from_slice(&answer)?;
        if review["response"]["allowed"].as_bool() != Some(allowed(*kind)) {
            bail!(
                "{} answered {kind:?} with {}",
                server.name,
                String::from_utf8_lossy(&answer)
            );
        }
    }
    Ok(())
}

/// One server's figures for one phase.
struct Measured {
    outcome: Outcome,
    /// Throughput of each round, in the order run.
    round_throughputs: Vec<f64>,
    server_cpu: Option<f64>,
    client_cpu: Option<f64>,
    peak_rss: Option<f64>,
    server_side: Option<Buckets>,
}

impl Measured {
    /// Adds another round of the same phase.
    fn absorb(&mut self, other: Measured) {
        let add = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a + b);
        self.round_throughputs.extend(other.round_throughputs);
        let o = &mut self.outcome;
        o.latencies.extend(other.outcome.latencies);
        o.latencies.sort_unstable();
        o.timer_lateness.extend(other.outcome.timer_lateness);
        o.timer_lateness.sort_unstable();
        o.errors += other.outcome.errors;
        o.first_error = o.first_error.take().or(other.outcome.first_error);
        o.elapsed += other.outcome.elapsed;
        self.server_cpu = add(self.server_cpu, other.server_cpu);
        self.client_cpu = add(self.client_cpu, other.client_cpu);
        self.peak_rss = match (self.peak_rss, other.peak_rss) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        self.server_side = match (self.server_side.take(), other.server_side) {
            (Some(a), Some(b)) => Some(a.plus(&b)),
            (a, b) => a.or(b),
        };
    }

    fn cpu_per_review_us(&self) -> Option<f64> {
        let answered = self.outcome.latencies.len();
        self.server_cpu
            .filter(|_| answered > 0)
            .map(|cpu| cpu * 1e6 / answered as f64)
    }
}

/// fixity's throughput over the baseline's, round by round (each round runs the two back to
/// back): the median, the lowest and the highest. A burst of background load on the shared
/// machine lands in one round and moves the median little, where it moves a pooled ratio.
struct RoundShares {
    median: f64,
    low: f64,
    high: f64,
    rounds: usize,
}

impl RoundShares {
    fn of(fixity: &Measured, baseline: &Measured) -> Option<Self> {
        let mut shares: Vec<f64> = fixity
            .round_throughputs
            .iter()
            .zip(&baseline.round_throughputs)
            .filter(|(_, b)| **b > 0.0)
            .map(|(f, b)| f / b)
            .collect();
        shares.sort_by(f64::total_cmp);
        let n = shares.len();
        let median = match n {
            0 => return None,
            _ if n % 2 == 1 => shares[n / 2],
            _ => (shares[n / 2 - 1] + shares[n / 2]) / 2.0,
        };
        Some(Self {
            median,
            low: shares[0],
            high: shares[n - 1],
            rounds: n,
        })
    }
}

fn measure(
    runtime: &tokio::runtime::Runtime,
    connector: &TlsConnector,
    server: &Server,
    mix: &Arc<[Bytes]>,
    load: Load,
) -> anyhow::Result<Measured> {
    let pid = server.pid();
    probe::reset_peak_rss(pid);
    let metrics_before = server.health.and_then(Buckets::scrape);
    let (cpu_before, client_before) = (
        probe::cpu_seconds(pid),
        probe::cpu_seconds(std::process::id()),
    );
    let outcome = runtime.block_on(client::run(connector, server.addr, mix.clone(), load))?;
    let (cpu_after, client_after) = (
        probe::cpu_seconds(pid),
        probe::cpu_seconds(std::process::id()),
    );
    let peak_rss = probe::status_mib(pid, "VmHWM");
    let server_side = match (metrics_before, server.health.and_then(Buckets::scrape)) {
        (Some(before), Some(after)) => Some(after.since(&before)),
        _ => None,
    };
    Ok(Measured {
        round_throughputs: vec![outcome.throughput()],
        outcome,
        server_cpu: cpu_after.zip(cpu_before).map(|(a, b)| a - b),
        client_cpu: client_after.zip(client_before).map(|(a, b)| a - b),
        peak_rss,
        server_side,
    })
}

/// Runs `round` for each server, `rounds` times, alternating which server goes first so
/// background load on a shared machine falls on both alike, and adds up each server's rounds.
fn alternate<T>(
    servers: &[&Server],
    rounds: u32,
    mut round: impl FnMut(&Server) -> anyhow::Result<T>,
    absorb: impl Fn(&mut T, T),
) -> anyhow::Result<Vec<T>> {
    let mut totals: Vec<Option<T>> = servers.iter().map(|_| None).collect();
    for r in 0..rounds {
        let mut order: Vec<usize> = (0..servers.len()).collect();
        if r % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let m = round(servers[i])?;
            match &mut totals[i] {
                Some(total) => absorb(total, m),
                slot => *slot = Some(m),
            }
        }
    }
    totals
        .into_iter()
        .map(|m| m.context("no rounds were run"))
        .collect()
}

/// Runs a phase in alternating rounds.
fn run_phase(
    runtime: &tokio::runtime::Runtime,
    connector: &TlsConnector,
    servers: &[&Server],
    mix: &Arc<[Bytes]>,
    phase: &Phase,
    rounds: u32,
) -> anyhow::Result<Vec<Measured>> {
    let round = Load {
        duration: phase.load.duration / rounds,
        ..phase.load
    };
    alternate(
        servers,
        rounds,
        |server| measure(runtime, connector, server, mix, round),
        Measured::absorb,
    )
}

/// Runs reviews on fresh connections in alternating rounds.
fn run_fresh(
    runtime: &tokio::runtime::Runtime,
    connector: &TlsConnector,
    servers: &[&Server],
    mix: &Arc<[Bytes]>,
    load: Fresh,
    rounds: u32,
) -> anyhow::Result<Vec<FreshOutcome>> {
    let round = Fresh {
        duration: load.duration / rounds,
        ..load
    };
    alternate(
        servers,
        rounds,
        |server| runtime.block_on(client::fresh(connector, server.addr, mix.clone(), round)),
        FreshOutcome::absorb,
    )
}

struct Phase {
    title: String,
    load: Load,
    /// Compared with the p99 target.
    latency_target: bool,
}

fn run(options: Options) -> anyhow::Result<()> {
    let began = Instant::now();
    let dir = tempfile::tempdir()?;
    let fixity = start_fixity(dir.path())?;
    let baseline = start_baseline(dir.path())?;
    let servers = [&fixity, &baseline];
    let connector = client::connector(&dir.path().join("certs/ca.crt"))?;
    let runtime = if options.client_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(options.client_threads)
            .enable_all()
            .build()?
    };

    let bodies = load_bodies()?;
    runtime.block_on(check_answers(
        &connector,
        &fixity,
        &bodies,
        Kind::allowed_by_fixity,
    ))?;
    runtime.block_on(check_answers(&connector, &baseline, &bodies, |_| true))?;
    let mix: Arc<[Bytes]> = MIX
        .iter()
        .map(|kind| {
            bodies
                .iter()
                .find(|(k, _)| k == kind)
                .map(|(_, b)| b.clone())
                .context("a fixture is missing")
        })
        .collect::<anyhow::Result<Vec<_>>>()?
        .into();

    std::thread::sleep(Duration::from_millis(500));
    let idle = resident_mib(&servers);

    print_header(&options, &bodies, &servers, &idle);

    let warm_up = Load {
        pace: Pace::Closed,
        connections: options.connections,
        duration: Duration::from_secs(1),
    };
    for server in servers {
        measure(&runtime, &connector, server, &mix, warm_up)?;
    }

    let phases = [
        Phase {
            title: format!(
                "max throughput: closed loop, {} connections",
                options.connections
            ),
            load: Load {
                pace: Pace::Closed,
                connections: options.connections,
                duration: options.phase,
            },
            latency_target: false,
        },
        Phase {
            title: format!("open loop at {}/s", options.rate),
            load: Load {
                pace: Pace::Open { rate: options.rate },
                connections: options.connections,
                duration: options.phase,
            },
            latency_target: true,
        },
        Phase {
            title: format!("open loop at {}/s", options.high_rate),
            load: Load {
                pace: Pace::Open {
                    rate: options.high_rate,
                },
                connections: options.connections,
                duration: options.phase,
            },
            latency_target: false,
        },
    ];
    let mut results = Vec::new();
    for phase in &phases {
        let measured = run_phase(&runtime, &connector, &servers, &mix, phase, options.rounds)?;
        print_phase(phase, &servers, &measured, options.rounds);
        results.push(measured);
    }
    let mut fresh_results = Vec::new();
    for per_connection in [1, 10] {
        let load = Fresh {
            rate: options.fresh_rate,
            per_connection,
            duration: options.fresh_phase,
        };
        let measured = run_fresh(&runtime, &connector, &servers, &mix, load, options.rounds)?;
        print_fresh(&load, &servers, &measured, options.rounds);
        fresh_results.push((load, measured));
    }

    std::thread::sleep(Duration::from_secs(1));
    let idle_after = resident_mib(&servers);
    print_summary(&phases, &results, &fresh_results, &idle, &idle_after);
    println!("\n(whole run: {:.0} s)", began.elapsed().as_secs_f64());
    let log = std::fs::read_to_string(&fixity.log).unwrap_or_default();
    println!(
        "fixity wrote {} audit log lines ({} at error level)",
        log.matches("fixity::audit").count(),
        log.matches("\"level\":\"ERROR\"").count()
    );
    Ok(())
}

fn mib(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |v| format!("{v:.1} MiB"))
}

fn us(nanos: Option<u64>) -> String {
    nanos.map_or("-".into(), |n| format!("{:.0}", n as f64 / 1000.0))
}

fn print_header(
    options: &Options,
    bodies: &[(Kind, Bytes)],
    servers: &[&Server],
    idle: &[Option<f64>],
) {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("fixity load benchmark");
    println!("machine: {cores} cores, {cpu}; client and servers share them");
    println!(
        "client: {} thread(s), {} TLS 1.3 keep-alive connections (HTTP/1.1), {:.0} s per phase and server",
        options.client_threads,
        options.connections,
        options.phase.as_secs_f64()
    );
    println!("mix (cycle of {}):", MIX.len());
    for (kind, body) in bodies {
        let share = MIX.iter().filter(|k| *k == kind).count() * 100 / MIX.len();
        println!(
            "  {share:>3}%  {:<52} {:>5} bytes",
            kind.describe(),
            body.len()
        );
    }
    for (server, rss) in servers.iter().zip(idle) {
        println!(
            "{:<8} pid {:<7} idle RSS {}",
            server.name,
            server.pid(),
            mib(*rss)
        );
    }
}

fn print_phase(phase: &Phase, servers: &[&Server], measured: &[Measured], rounds: u32) {
    println!(
        "\n== {} ({:.0} s each, in {rounds} alternating rounds)",
        phase.title,
        phase.load.duration.as_secs_f64()
    );
    println!(
        "{:<9}{:>10}{:>8}{:>8}{:>8}{:>9}{:>8}{:>7}{:>11}{:>11}{:>10}{:>11}",
        "server",
        "reviews/s",
        "p50",
        "p90",
        "p99",
        "p99.9",
        "max",
        "errors",
        "server CPU",
        "CPU/review",
        "peak RSS",
        "client CPU"
    );
    println!(
        "{:<9}{:>10}{:>8}{:>8}{:>8}{:>9}{:>8}{:>7}{:>11}{:>11}{:>10}{:>11}",
        "", "", "µs", "µs", "µs", "µs", "µs", "", "s", "µs", "MiB", "s"
    );
    for (server, m) in servers.iter().zip(measured) {
        let l = &m.outcome.latencies;
        println!(
            "{:<9}{:>10.0}{:>8}{:>8}{:>8}{:>9}{:>8}{:>7}{:>11}{:>11}{:>10}{:>11}",
            server.name,
            m.outcome.throughput(),
            us(quantile(l, 0.5)),
            us(quantile(l, 0.9)),
            us(quantile(l, 0.99)),
            us(quantile(l, 0.999)),
            us(l.last().copied()),
            m.outcome.errors,
            m.server_cpu.map_or("-".into(), |c| format!("{c:.2}")),
            m.cpu_per_review_us()
                .map_or("-".into(), |c| format!("{c:.1}")),
            m.peak_rss.map_or("-".into(), |r| format!("{r:.1}")),
            m.client_cpu.map_or("-".into(), |c| format!("{c:.2}")),
        );
        if let Some(e) = &m.outcome.first_error {
            println!("         first error: {e}");
        }
    }
    if let [f, b] = measured {
        let mut line = format!(
            "fixity/baseline: throughput {:.2}",
            f.outcome.throughput() / b.outcome.throughput()
        );
        if let (Some(fc), Some(bc)) = (f.cpu_per_review_us(), b.cpu_per_review_us()) {
            let _ = write!(line, ", server CPU per review {:.2}x", fc / bc);
        }
        if let (Some(fp), Some(bp)) = (
            quantile(&f.outcome.latencies, 0.99),
            quantile(&b.outcome.latencies, 0.99),
        ) {
            let _ = write!(line, ", p99 {:.2}x", fp as f64 / bp as f64);
        }
        println!("{line}");
        // An open loop's throughput is its rate for any server that keeps up: only a closed
        // loop's share says something round by round.
        if let (Pace::Closed, Some(r)) = (phase.load.pace, RoundShares::of(f, b)) {
            println!(
                "fixity/baseline throughput round by round: median {:.2} ({:.2}-{:.2} over {} rounds)",
                r.median, r.low, r.high, r.rounds
            );
        }
    }
    for (server, m) in servers.iter().zip(measured) {
        let late = &m.outcome.timer_lateness;
        if !late.is_empty() {
            println!(
                "{}: client timer woke late by p50 {} µs, p99 {} µs (not charged to the server)",
                server.name,
                us(quantile(late, 0.5)),
                us(quantile(late, 0.99))
            );
        }
        if let Some(b) = m.server_side.as_ref().filter(|b| b.total() > 0) {
            let bound = |q| {
                b.quantile_bound(q).map_or("-".into(), |s: f64| {
                    if s.is_infinite() {
                        "> 10 s".into()
                    } else {
                        format!("<= {:.0} µs", s * 1e6)
                    }
                })
            };
            println!(
                "{} server-side (fixity_review_duration_seconds, {} reviews): p50 {}, p99 {}, p99.9 {}, over 1 ms: {:.3}%",
                server.name,
                b.total(),
                bound(0.5),
                bound(0.99),
                bound(0.999),
                b.share_above(0.001).unwrap_or(0.0) * 100.0
            );
        }
    }
}

/// The first review on a new connection is where per-connection costs show (the handshake is
/// timed apart): p50, p99 and max, and how many took over 20 ms.
fn print_fresh(load: &Fresh, servers: &[&Server], measured: &[FreshOutcome], rounds: u32) {
    println!(
        "\n== fresh connections: one per {} at {}/s ({:.0} s each, in {rounds} alternating rounds)",
        match load.per_connection {
            1 => "review".to_owned(),
            n => format!("{n} reviews"),
        },
        load.rate,
        load.duration.as_secs_f64()
    );
    println!(
        "{:<9}{:>7}{:>11}{:>9}{:>9}{:>9}{:>9}{:>9}{:>9}{:>9}{:>7}",
        "server",
        "conns",
        "handshake",
        "first",
        "first",
        "first",
        "first",
        "later",
        "later",
        "later",
        "errors"
    );
    println!(
        "{:<9}{:>7}{:>11}{:>9}{:>9}{:>9}{:>9}{:>9}{:>9}{:>9}{:>7}",
        "", "", "p50 µs", "p50 µs", "p99 µs", "max µs", "> 20 ms", "p50 µs", "p99 µs", "max µs", ""
    );
    for (server, m) in servers.iter().zip(measured) {
        let slow = m.first.iter().filter(|&&ns| ns > 20_000_000).count();
        println!(
            "{:<9}{:>7}{:>11}{:>9}{:>9}{:>9}{:>9}{:>9}{:>9}{:>9}{:>7}",
            server.name,
            m.handshakes.len(),
            us(quantile(&m.handshakes, 0.5)),
            us(quantile(&m.first, 0.5)),
            us(quantile(&m.first, 0.99)),
            us(m.first.last().copied()),
            slow,
            us(quantile(&m.later, 0.5)),
            us(quantile(&m.later, 0.99)),
            us(m.later.last().copied()),
            m.errors
        );
        if let Some(e) = &m.first_error {
            println!("         first error: {e}");
        }
    }
}

fn print_summary(
    phases: &[Phase],
    results: &[Vec<Measured>],
    fresh: &[(Fresh, Vec<FreshOutcome>)],
    idle: &[Option<f64>],
    idle_after: &[Option<f64>],
) {
    let verdict = |ok: bool| if ok { "ok" } else { "MISSED" };
    println!("\n== fixity against the targets (DESIGN.md)");
    if let Some([f, b]) = results.first().map(Vec::as_slice) {
        let (ft, bt) = (f.outcome.throughput(), b.outcome.throughput());
        println!(
            "throughput            {ft:>8.0} reviews/s   target >= 10000        {}",
            verdict(ft >= 10_000.0)
        );
        // Judged on the median of the paired rounds; the pooled figure is shown beside it.
        let share = RoundShares::of(f, b).map_or(ft / bt, |r| r.median);
        println!(
            "share of baseline     {:>8.0} %           target >= 80 %         {}  (round median; pooled {:.0} %)",
            share * 100.0,
            verdict(share >= 0.8),
            ft / bt * 100.0
        );
    }
    for (phase, measured) in phases.iter().zip(results) {
        if !phase.latency_target {
            continue;
        }
        let Some(f) = measured.first() else { continue };
        let client_p99 = quantile(&f.outcome.latencies, 0.99);
        if let Some(server_p99) = f.server_side.as_ref().and_then(|b| b.quantile_bound(0.99)) {
            println!(
                "p99 at {:<13} <= {:>5.0} µs server-side  target <= 1000 µs      {}",
                phase.title.trim_start_matches("open loop at "),
                server_p99 * 1e6,
                verdict(server_p99 <= 0.001)
            );
        }
        println!(
            "p99 at {:<13} {:>8} µs client-observed (TLS, HTTP and queueing included)",
            phase.title.trim_start_matches("open loop at "),
            us(client_p99),
        );
    }
    for (load, measured) in fresh {
        if let [f, b] = measured.as_slice() {
            println!(
                "first review, 1 conn/{:<2} p99 {:>7} µs, max {:>7} µs (baseline p99 {} µs, max {} µs)",
                load.per_connection,
                us(quantile(&f.first, 0.99)),
                us(f.first.last().copied()),
                us(quantile(&b.first, 0.99)),
                us(b.first.last().copied()),
            );
        }
    }
    let peak = results
        .iter()
        .filter_map(|m| m.first().and_then(|f| f.peak_rss))
        .fold(None::<f64>, |acc, v| Some(acc.map_or(v, |a| a.max(v))));
    if let Some(rss) = idle.first().copied().flatten() {
        println!(
            "idle RSS              {rss:>8.1} MiB         target <= 32 MiB       {}",
            verdict(rss <= 32.0)
        );
    }
    if let Some(rss) = peak {
        println!(
            "peak RSS under load   {rss:>8.1} MiB         target <= 64 MiB       {}",
            verdict(rss <= 64.0)
        );
    }
    if let Some(rss) = idle_after.first().copied().flatten() {
        println!("RSS 1 s after load    {rss:>8.1} MiB");
    }
    if let (Some(f), Some(b)) = (
        idle.first().copied().flatten(),
        idle.get(1).copied().flatten(),
    ) {
        println!("baseline idle RSS     {b:>8.1} MiB (fixity {f:.1} MiB)");
    }
}
