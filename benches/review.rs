//! The cost of one review with the network taken away: `Reviewer::review` on the load
//! benchmark's bodies and policy, and the JSON decoding alone, in nanoseconds per call, with the
//! allocations of one review; the denied exec again with its audit line formatted as the server
//! formats it (until then audit lines go nowhere: no subscriber); then the shared state every
//! review touches (policy store snapshot, duration histogram), alone and on two threads at once;
//! last, what attestation conditions (CEL) add to a review that verifies an image: two
//! conditions on a scan of realistic size against none, and the costliest expression the
//! compile-time rules admit on a predicate of the largest size read; each with the whole
//! predicate converted for CEL (as before fixity converted only what the conditions read) and
//! with what fixity converts now.
//! `cargo bench --bench review [-- BODY...]`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fixity::admission::Reviewer;
use fixity::admission::review;
use fixity::audit::Metrics;
use fixity::audit::metrics::ReviewResult;
use fixity::cli::serve::{LogFormat, install_logging};
use fixity::policy::{PolicyStore, files};
use fixity::verify::attest::MAX_ATTESTATION_BYTES;
use fixity::verify::attest::conditions::{self, Condition, Input};
use tracing_subscriber::EnvFilter;

#[path = "load/bodies.rs"]
mod bodies;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/load/fixtures");

/// The system allocator, counting allocations while `COUNTING` is set (only in the counting
/// pass, so the timed loops pay nothing but an untaken branch).
struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is passed straight to `System`; the counter has no effect on memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: the caller's contract is `System`'s.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// How many allocations (and reallocations) one call of `f` makes.
fn allocations(mut f: impl FnMut()) -> u64 {
    ALLOCATIONS.store(0, Ordering::Relaxed);
    COUNTING.store(true, Ordering::Relaxed);
    f();
    COUNTING.store(false, Ordering::Relaxed);
    ALLOCATIONS.load(Ordering::Relaxed)
}

/// Runs `f` for about `budget` and returns the best of five per-call averages, in ns.
fn time(budget: Duration, mut f: impl FnMut()) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..5 {
        let (mut calls, started) = (0u64, Instant::now());
        while started.elapsed() < budget / 5 {
            for _ in 0..64 {
                f();
            }
            calls += 64;
        }
        best = best.min(started.elapsed().as_nanos() as f64 / calls as f64);
    }
    best
}

fn main() -> anyhow::Result<()> {
    let policy = Path::new(FIXTURES).join("policy.yaml");
    let policies = files::parse(&policy, &std::fs::read_to_string(&policy)?)?;
    let store = Arc::new(PolicyStore::fixed(policies));
    let reviewer = Reviewer::new(store.clone(), Arc::new(Metrics::default()));
    let runtime = tokio::runtime::Builder::new_current_thread().build()?;
    let budget = Duration::from_millis(1500);

    println!(
        "{:<22} {:>7} {:>12} {:>12} {:>14}",
        "body", "bytes", "decode ns", "review ns", "review allocs"
    );
    // `cargo bench --bench review -- exec` times only the bodies named.
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wanted = |name: &str| only.is_empty() || only.iter().any(|o| o == name);
    // A fixture as the API server sends it: compact.
    let body = |name: &str| -> anyhow::Result<Vec<u8>> {
        let text = std::fs::read_to_string(Path::new(FIXTURES).join(format!("{name}.json")))?;
        Ok(bodies::compact(&text).into_bytes())
    };
    let mut pod_review_ns = f64::NAN;
    for name in ["pod-create", "deployment-create", "exec"] {
        if !wanted(name) {
            continue;
        }
        let body = body(name)?;
        let answer = runtime.block_on(reviewer.review(&body));
        // The same answers the load bench insists on, so no error path is timed by mistake.
        let admitted = name != "exec";
        anyhow::ensure!(
            answer.http_status == 200 && answer.allowed == admitted,
            "{name}: expected allowed={admitted}, got {answer:?}"
        );
        let decode = time(budget, || {
            let text = std::str::from_utf8(black_box(&body)).unwrap();
            black_box(review::decode(text).unwrap());
        });
        let review = time(budget, || {
            black_box(runtime.block_on(reviewer.review(black_box(&body))));
        });
        let allocs = allocations(|| {
            black_box(runtime.block_on(reviewer.review(black_box(&body))));
        });
        println!(
            "{name:<22} {:>7} {decode:>12.0} {review:>12.0} {allocs:>14}",
            body.len()
        );
        if name == "pod-create" {
            pod_review_ns = review;
        }
    }
    // The denied exec once more with its audit line formatted as `fixity serve --log-format json`
    // formats it (into a sink, so no write is timed). Last, since the subscriber is global.
    if wanted("exec") {
        install_logging(
            LogFormat::Json,
            EnvFilter::new("info"),
            std::io::sink,
            false,
        );
        let body = body("exec")?;
        let review = time(budget, || {
            black_box(runtime.block_on(reviewer.review(black_box(&body))));
        });
        println!("exec with its JSON audit line: {review:.0} ns");
    }
    // What every review touches that is shared, on two threads at once as the server's two
    // workers do: shared writes here make the threads trade cache lines.
    let snapshot = || {
        black_box(store.policies().len());
        black_box(store.namespace_labels(black_box("shop")));
    };
    let metrics = Metrics::default();
    let observe = || metrics.observe_review(ReviewResult::Allowed, black_box(4e-6));
    for (what, f) in [
        ("policy store snapshot", &snapshot as &(dyn Fn() + Sync)),
        ("review duration observation", &observe),
    ] {
        let alone = time(budget, f);
        let mut together = [0.0; 2];
        std::thread::scope(|s| {
            let runs = [s.spawn(|| time(budget, f)), s.spawn(|| time(budget, f))];
            for (slot, run) in together.iter_mut().zip(runs) {
                *slot = run.join().unwrap_or(f64::NAN);
            }
        });
        println!(
            "{what}: {alone:.0} ns on one thread, {:.0} ns on each of two",
            together[0].max(together[1])
        );
    }
    if wanted("conditions") {
        conditions(budget, pod_review_ns)?;
    }
    Ok(())
}

/// A cosign vulnerability statement whose Trivy result lists `findings` (none CRITICAL).
fn scan_statement(findings: usize) -> Vec<u8> {
    let vulnerabilities: Vec<serde_json::Value> = (0..findings)
        .map(|i| {
            let severity = ["LOW", "MEDIUM", "HIGH"][i % 3];
            serde_json::json!({
                "VulnerabilityID": format!("CVE-2025-{i:05}"),
                "PkgName": format!("package-{i}"),
                "InstalledVersion": "1.2.3",
                "FixedVersion": "1.2.4",
                "Severity": severity,
                "Title": "a finding of the kind scanners list by the hundred",
            })
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "_type": "https://in-toto.io/Statement/v0.1",
        "predicateType": "https://cosign.sigstore.dev/attestation/vuln/v1",
        "subject": [{"name": "ghcr.io/acme/app", "digest": {"sha256": "ab"}}],
        "predicate": {
            "scanner": {"uri": "pkg:github/aquasecurity/trivy", "version": "0.58.0",
                        "result": {"Results": [{"Target": "app", "Vulnerabilities": vulnerabilities}]}},
            "metadata": {"scanStartedOn": "2026-11-30T10:00:00Z", "scanFinishedOn": "2026-11-30T10:01:00Z"},
        },
    }))
    .unwrap_or_default()
}

/// What judging one attestation costs: the statement parsed, converted for CEL and held to
/// `conditions`, in ns, with the whole predicate converted (`whole`) or only the parts the
/// conditions read, as fixity judges. With no conditions fixity skips all of it.
fn judged(
    budget: Duration,
    statement: &[u8],
    conditions: &[Condition],
    whole: bool,
) -> anyhow::Result<f64> {
    let now = std::time::UNIX_EPOCH + Duration::from_secs(1_796_000_000);
    let image = ("ghcr.io", "acme/app", "sha256:ab");
    let once = || -> Result<(), String> {
        let json: serde_json::Value =
            serde_json::from_slice(statement).map_err(|e| e.to_string())?;
        if !whole {
            return conditions::hold(conditions, json, image, now).map_err(|f| f.to_string());
        }
        let input = Input::new(json, image, now)?;
        for c in conditions {
            c.evaluate(&input).map_err(|f| f.to_string())?;
        }
        Ok(())
    };
    once().map_err(|e| anyhow::anyhow!("the benchmark's conditions must hold: {e}"))?;
    Ok(time(budget, || {
        black_box(once().is_ok());
    }))
}

fn conditions(budget: Duration, pod_review_ns: f64) -> anyhow::Result<()> {
    // CEL's parser recurses deeply; fixity compiles and evaluates on a large stack too.
    let compiled = std::thread::Builder::new()
        .stack_size(16 << 20)
        .spawn(|| -> Result<_, String> {
            let two = vec![
                Condition::compile(
                    "now - timestamp(predicate.metadata.scanFinishedOn) < duration('168h')",
                    None,
                )?,
                Condition::compile(
                    "predicate.scanner.result.Results.all(r, !has(r.Vulnerabilities) || r.Vulnerabilities.all(v, v.Severity != 'CRITICAL'))",
                    None,
                )?,
            ];
            let worst = vec![Condition::compile(
                "predicate.scanner.result.Results.all(r, r.Vulnerabilities.all(v, v.Title.matches('^a finding') && v.PkgName.startsWith('package-') && !(v.Severity in ['CRITICAL', 'UNKNOWN'])))",
                None,
            )?];
            Ok((two, worst))
        })?
        .join()
        .map_err(|_| anyhow::anyhow!("compiling the conditions panicked"))?
        .map_err(|e| anyhow::anyhow!(e))?;
    let (two, worst) = compiled;
    let runs = std::thread::Builder::new()
        .stack_size(16 << 20)
        .spawn(move || -> anyhow::Result<Vec<(String, f64, f64)>> {
            let mut out = Vec::new();
            let both = |statement: &[u8], conditions: &[Condition]| -> anyhow::Result<_> {
                Ok((
                    judged(budget, statement, conditions, true)?,
                    judged(budget, statement, conditions, false)?,
                ))
            };
            for findings in [200, 2_000] {
                let statement = scan_statement(findings);
                let (whole, read) = both(&statement, &two)?;
                out.push((
                    format!(
                        "two conditions, scan of {findings} findings ({} KiB)",
                        statement.len() >> 10
                    ),
                    whole,
                    read,
                ));
            }
            // The largest predicate read, with the costliest expression admitted.
            let mut findings = 1_000;
            while scan_statement(findings * 2).len() <= MAX_ATTESTATION_BYTES {
                findings *= 2;
            }
            let statement = scan_statement(findings);
            let (whole, read) = both(&statement, &worst)?;
            out.push((
                format!(
                    "worst admitted expression, {findings} findings ({} KiB)",
                    statement.len() >> 10
                ),
                whole,
                read,
            ));
            Ok(out)
        })?
        .join()
        .map_err(|_| anyhow::anyhow!("the conditions benchmark panicked"))??;
    println!(
        "attestation conditions, per attestation judged (a cache miss; none: 0 ns, nothing is parsed), against the pod-create review ({pod_review_ns:.0} ns); the whole predicate converted, then only the parts the conditions read:"
    );
    for (what, whole, read) in runs {
        println!(
            "  {what}: whole {:.1} us ({:.1}x the review), parts read {:.1} us ({:.1}x the review), {:.2} of the whole",
            whole / 1e3,
            whole / pod_review_ns,
            read / 1e3,
            read / pod_review_ns,
            read / whole
        );
    }
    Ok(())
}
