//! The cost of one review with the network taken away: `Reviewer::review` on the load
//! benchmark's bodies and policy, and the JSON decoding alone, in nanoseconds per call; then the
//! policy store's snapshot, alone and on two threads at once.
//! `cargo bench --bench review [-- BODY...]`. Audit lines of the denied exec go nowhere (no subscriber).

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fixity::admission::Reviewer;
use fixity::admission::review;
use fixity::audit::Metrics;
use fixity::policy::{PolicyStore, files};

#[path = "load/bodies.rs"]
mod bodies;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/load/fixtures");

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
        "{:<22} {:>7} {:>12} {:>12}",
        "body", "bytes", "decode ns", "review ns"
    );
    // `cargo bench --bench review -- exec` times only the bodies named.
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    for name in ["pod-create", "deployment-create", "exec"] {
        if !only.is_empty() && !only.iter().any(|o| o == name) {
            continue;
        }
        let text = std::fs::read_to_string(Path::new(FIXTURES).join(format!("{name}.json")))?;
        let body = bodies::compact(&text).into_bytes();
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
        println!("{name:<22} {:>7} {decode:>12.0} {review:>12.0}", body.len());
    }
    // What every review reads from the policy store, on two threads at once as the server's two
    // workers do: shared writes here would make the threads trade cache lines.
    let snapshot = || {
        black_box(store.policies().len());
        black_box(store.namespace_labels(black_box("shop")));
    };
    let alone = time(budget, snapshot);
    let mut together = [0.0; 2];
    std::thread::scope(|s| {
        let runs = [
            s.spawn(|| time(budget, snapshot)),
            s.spawn(|| time(budget, snapshot)),
        ];
        for (slot, run) in together.iter_mut().zip(runs) {
            *slot = run.join().unwrap_or(f64::NAN);
        }
    });
    println!(
        "policy store snapshot: {alone:.0} ns on one thread, {:.0} ns on each of two",
        together[0].max(together[1])
    );
    Ok(())
}
