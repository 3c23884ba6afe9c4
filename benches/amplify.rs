//! What the largest reviews fixity accepts cost it: `fixity serve` (the built-in policy) gets
//! bodies just under its 7 MiB limit made of as many tagged containers as fit, alone and
//! several at once, and a pod update of two such halves; for each the bench prints the peak
//! RSS, the answer's size, the audit log written and the time. `cargo bench --bench amplify`;
//! FIXITY_BIN=PATH measures another build of fixity (an older one, for a before/after).

#[path = "load/client.rs"]
#[allow(dead_code)] // shared with the load bench, which uses the rest
mod client;
#[path = "load/probe.rs"]
#[allow(dead_code)]
mod probe;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hyper::body::Bytes;
use serde_json::{Value, json};

const FIXITY: &str = env!("CARGO_BIN_EXE_fixity");
/// fixity's default body limit.
const LIMIT: usize = 7 * 1024 * 1024;

fn main() -> ExitCode {
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("the amplification benchmark runs with: cargo bench --bench amplify");
        return ExitCode::SUCCESS;
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("amplification benchmark failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A pod review whose spec holds as many containers `{name, image: "a:1"}` as fit in
/// `bytes`; with `update`, the same again as oldObject but one image (each half `bytes / 2`).
fn body(bytes: usize, update: bool) -> Vec<u8> {
    let per = r#"{"name":"c000000","image":"a:1"},"#.len();
    let n = if update { bytes / 2 / per } else { bytes / per } - 64;
    let containers = |first: &str| -> Vec<Value> {
        (0..n)
            .map(|i| {
                let image = if i == 0 { first } else { "a:1" };
                json!({"name": format!("c{i:06}"), "image": image})
            })
            .collect()
    };
    let object = |first: &str| {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "big", "namespace": "bench", "uid": "u"},
               "spec": {"containers": containers(first)}})
    };
    let mut request = json!({
        "uid": "amplify", "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "namespace": "bench", "name": "big",
        "operation": if update { "UPDATE" } else { "CREATE" },
        "userInfo": {"username": "bench"}, "object": object("b:1"),
    });
    if update {
        request["oldObject"] = object("a:1");
    }
    let body = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                      "request": request});
    serde_json::to_vec(&body).unwrap_or_default()
}

struct Server {
    child: Child,
    addr: SocketAddr,
    health: SocketAddr,
    log: PathBuf,
    ca: PathBuf,
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

fn start(dir: &Path) -> anyhow::Result<Server> {
    let binary = std::env::var_os("FIXITY_BIN").map_or_else(|| FIXITY.into(), PathBuf::from);
    let (addr, health) = (free_addr()?, free_addr()?);
    let log = dir.join("fixity.log");
    let child = Command::new(&binary)
        .arg("serve")
        .args([
            "--addr",
            &addr.to_string(),
            "--health-addr",
            &health.to_string(),
        ])
        .args(["--dev", "--dev-cert-dir"])
        .arg(dir.join("certs"))
        .args(["--log-format", "json"])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let server = Server {
        child,
        addr,
        health,
        log,
        ca: dir.join("certs/ca.crt"),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while probe::http_get(health, "/readyz").is_none_or(|(code, _)| code != 200) {
        if Instant::now() > deadline {
            bail!("fixity did not become ready");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(server)
}

fn run() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    println!(
        "fixity {}; a fresh server for each case",
        std::env::var("FIXITY_BIN").unwrap_or_else(|_| "as built".into()),
    );
    let max = Bytes::from(body(LIMIT - 64 * 1024, false));
    let update = Bytes::from(body(LIMIT - 64 * 1024, true));
    let quarter = Bytes::from(body(LIMIT * 5 / 14, false));
    for (what, body, copies) in [
        ("one body of tagged containers", max.clone(), 1),
        ("a pod update, two halves", update, 1),
        ("two such bodies at once", max.clone(), 2),
        ("six 2.5 MiB bodies at once", quarter, 6),
        ("sixteen such bodies at once", max, 16),
    ] {
        // Memory an allocator took stays with the process: each case gets its own.
        let dir = tempfile::tempdir()?;
        let server = start(dir.path())?;
        let pid = server.child.id();
        let connector = client::connector(&server.ca)?;
        let idle = probe::status_mib(pid, "VmRSS").unwrap_or(f64::NAN);
        let log_before = std::fs::metadata(&server.log)?.len();
        let started = Instant::now();
        let answers = runtime.block_on(async {
            let sends = (0..copies).map(|_| {
                let (connector, body) = (connector.clone(), body.clone());
                async move {
                    let mut conn = client::Connection::open(&connector, server.addr).await?;
                    conn.review(body).await
                }
            });
            futures::future::join_all(sends).await
        });
        let took = started.elapsed();
        let peak = probe::status_mib(pid, "VmHWM").unwrap_or(f64::NAN);
        let answered: Vec<&Bytes> = answers.iter().filter_map(|a| a.as_ref().ok()).collect();
        let turned_away = answers
            .iter()
            .filter(|a| {
                a.as_ref()
                    .is_err_and(|e| e.to_string().contains("HTTP 429"))
            })
            .count();
        // A client still sending a body the server has refused sees its connection close.
        let cut_off = answers.len() - answered.len() - turned_away;
        let answer_bytes = answered.first().map_or(0, |a| a.len());
        let warnings = answered.first().map_or(0, |a| {
            serde_json::from_slice::<Value>(a).map_or(0, |v| {
                v["response"]["warnings"].as_array().map_or(0, Vec::len)
            })
        });
        let logged = std::fs::metadata(&server.log)?.len() - log_before;
        let alive = probe::http_get(server.health, "/livez").is_some_and(|(code, _)| code == 200);
        println!(
            "{what:<30} {copies:>2} x {:>4.1} MiB: peak RSS {peak:>6.1} MiB (idle {idle:.1}), \
             answer {:>8} bytes ({warnings} warnings), {:>2} answered, {turned_away:>2} told 429, \
             {cut_off:>2} cut off, log {:>8} bytes, {:>5.0} ms{}",
            body.len() as f64 / (1024.0 * 1024.0),
            answer_bytes,
            answered.len(),
            logged,
            took.as_secs_f64() * 1e3,
            if alive { "" } else { ", then DEAD" },
        );
    }
    Ok(())
}
