//! The cost of one review with the network taken away: `Reviewer::review` on the load
//! benchmark's bodies and policy, and the JSON decoding alone, in nanoseconds per call, with the
//! allocations of one review; the denied exec again with its audit line formatted as the server
//! formats it (until then audit lines go nowhere: no subscriber); then the shared state every
//! review touches (policy store snapshot, duration histogram), alone and on two threads at once.
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
    Ok(())
}
