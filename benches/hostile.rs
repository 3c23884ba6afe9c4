//! The hostile-registry bench (`cargo bench --bench hostile`, see BENCHMARKS.md).
//!
//! Starts the release `fixity serve` under a policy that requires a signature on every image of
//! `127.0.0.1:*` with `onVerificationError: Allow`, and one hostile registry per case of
//! tests/common/hostile.rs. For each case, a fresh fixity (so that its peak RSS is the case's
//! own), one warm-up review, then the hostile review and meanwhile a bystander review every 20 ms
//! of a new unsigned image on an honest registry. Prints per case: the admission answer, the time
//! to answer it, fixity's RSS before the case, its peak (VmHWM) and what it kept afterwards, the
//! requests and body bytes the registry served, and the slowest bystander answer. Then all cases
//! again in one process, for the RSS the allocator keeps.
//!
//! `cargo bench --bench hostile -- TEXT` runs only the cases whose name contains TEXT.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "load/probe.rs"]
#[allow(dead_code)] // the load bench's probe; this bench reads memory only
mod probe;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::hostile::{self, Hostile, Reply, digest_of};
use common::registry::{Key, test_public_key};
use common::review::{message, pod_review, policy_yaml};
use common::{Fixity, review, tls_connector};

const DEADLINE_MS: u64 = 3000;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run());
}

async fn run() {
    let cases = hostile::cases().await;
    let honest = Hostile::start(|_| Reply::status(404)).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let key = Key {
        private: Default::default(),
        public_pem: test_public_key(),
    };
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        policy_yaml("127.0.0.1:*", &key, "    onVerificationError: Allow\n"),
    )
    .expect("policy");
    let mut args: Vec<String> = [
        "--dev",
        "--dev-cert-dir",
        dir.path().to_str().expect("utf-8 path"),
        "--policy",
        policy.to_str().expect("utf-8 path"),
        "--verify-timeout-ms",
        &DEADLINE_MS.to_string(),
    ]
    .map(str::to_owned)
    .to_vec();
    let hosts = cases
        .iter()
        .flat_map(|c| std::iter::once(&c.registry).chain(c.foreign.as_ref()))
        .chain(std::iter::once(&honest))
        .map(|h| h.host.clone());
    for host in hosts {
        args.extend(["--insecure-registry".to_owned(), host]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let bystander_image = |n: u64| format!("{}/app@{}", honest.host, digest_of(&n.to_le_bytes()));

    println!(
        "fixity serve (release), deadline {DEADLINE_MS} ms, onVerificationError: Allow; a fresh \
         process per case\n"
    );
    println!(
        "| case | answer | time | RSS before, peak, after | registry: requests, bytes | \
         bystander: reviews, slowest |"
    );
    println!("|---|---|---|---|---|---|");
    let mut serial = 1u64;
    for case in &cases {
        if filter
            .as_ref()
            .is_some_and(|f| !case.name.contains(f.as_str()))
        {
            continue;
        }
        let fixity = Fixity::serve(&args);
        let tls = tls_connector(&dir.path().join("ca.crt"));
        let pid = fixity.pid();
        // Warm up: a connection, the policy, a verification.
        let _ = review(&tls, fixity.addr, pod_review(&bystander_image(0))).await;
        let before = probe::status_mib(pid, "VmRSS").unwrap_or(f64::NAN);
        let done = Arc::new(AtomicBool::new(false));
        let bystanders = {
            let (done, tls, addr) = (done.clone(), tls.clone(), fixity.addr);
            let images: Vec<String> = (serial..serial + 10_000).map(bystander_image).collect();
            tokio::spawn(async move {
                let (mut count, mut slowest) = (0usize, Duration::ZERO);
                for image in images {
                    if done.load(Ordering::Relaxed) {
                        break;
                    }
                    let started = Instant::now();
                    let answer = review(&tls, addr, pod_review(&image)).await;
                    assert_eq!(answer["allowed"], false, "bystander: {answer}");
                    slowest = slowest.max(started.elapsed());
                    count += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                (count, slowest)
            })
        };
        serial += 10_000;
        let started = Instant::now();
        let answer = review(&tls, fixity.addr, pod_review(&case.image())).await;
        let took = started.elapsed();
        done.store(true, Ordering::Relaxed);
        let (count, slowest) = bystanders.await.expect("bystander task");
        let peak = probe::status_mib(pid, "VmHWM").unwrap_or(f64::NAN);
        let after = probe::status_mib(pid, "VmRSS").unwrap_or(f64::NAN);
        let text = format!("{} {}", message(&answer), answer["warnings"]);
        let reason = ["UnsignedImage", "VerificationUnavailable"]
            .into_iter()
            .find(|r| text.contains(r))
            .unwrap_or("?");
        let verdict = if answer["allowed"] == true {
            "admitted"
        } else {
            "denied"
        };
        println!(
            "| {} | {verdict}, {reason} | {} ms | {before:.1}, {peak:.1}, {after:.1} MiB | {}, {} \
             | {count}, {} ms |",
            case.name,
            took.as_millis(),
            case.registry.requests(),
            human(case.registry.bytes_sent()),
            slowest.as_millis()
        );
    }
    if filter.is_none() {
        // What the allocator keeps: every case again, one after another, in one process.
        let fixity = Fixity::serve(&args);
        let tls = tls_connector(&dir.path().join("ca.crt"));
        let pid = fixity.pid();
        let _ = review(&tls, fixity.addr, pod_review(&bystander_image(0))).await;
        let before = probe::status_mib(pid, "VmRSS").unwrap_or(f64::NAN);
        for case in &cases {
            let _ = review(&tls, fixity.addr, pod_review(&case.image())).await;
        }
        let peak = probe::status_mib(pid, "VmHWM").unwrap_or(f64::NAN);
        let after = probe::status_mib(pid, "VmRSS").unwrap_or(f64::NAN);
        println!(
            "\nAll {} cases one after another in one process: RSS {before:.1} MiB before, \
             {peak:.1} MiB peak, {after:.1} MiB after",
            cases.len()
        );
    }
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / f64::from(1 << 20)),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}
