//! Signature checks under a review with very many images: how long it takes, how many
//! registry requests it makes (while it is answered, and after: work that outlives the
//! answer), and what a small review sent meanwhile waits. Also a pod update with many
//! containers (the changed-image comparison). `cargo bench --bench fanout [-- IMAGES...]`.
//!
//! The registry is a loopback HTTP server that knows no image: every request gets a 404 after
//! a short delay, as a registry across a network would give for an unsigned image, and is
//! counted. Reviews go straight to `Reviewer::review`, as the webhook calls it.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::StatusCode;
use fixity::admission::Reviewer;
use fixity::audit::Metrics;
use fixity::policy::{PolicyStore, files};
use fixity::verify::RegistryOptions;
use fixity::verify::checker::SignatureChecker;
use serde_json::{Value, json};

/// What the registry takes to answer one request.
const REGISTRY_LATENCY: Duration = Duration::from_millis(2);
/// The webhook's verification deadline (fixity's default).
const DEADLINE: Duration = Duration::from_secs(8);
/// A P-256 public key; nothing is signed with it, so every check finds no signature.
const KEY: &str = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE2G4MVHD+3JEqHoKzmOS9X0bOYe7x\n5IA9Ij5Aia5tRVTy4Zx7lQ6X2xvyOYr9jpGBMd6UIn8iYUV1oDvSO6X4Rw==\n-----END PUBLIC KEY-----\n";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        eprintln!("the fan-out benchmark runs with: cargo bench --bench fanout");
        return ExitCode::SUCCESS;
    }
    let sizes: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let sizes = if sizes.is_empty() {
        vec![64, 2_000, 16_000]
    } else {
        sizes
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fan-out benchmark: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        for n in sizes {
            fan_out(n).await;
        }
        for n in [1_000, 20_000] {
            pod_update(n).await;
        }
    });
    ExitCode::SUCCESS
}

/// A registry that has nothing: 404 for everything, counted.
async fn registry() -> (String, Arc<AtomicU64>) {
    let requests = Arc::new(AtomicU64::new(0));
    let counted = requests.clone();
    let app = Router::new().fallback(move || {
        let counted = counted.clone();
        async move {
            counted.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(REGISTRY_LATENCY).await;
            (
                StatusCode::NOT_FOUND,
                [("content-type", "application/json")],
                r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#,
            )
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let host = listener.local_addr().expect("bound").to_string();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (host, requests)
}

fn reviewer(host: &str) -> Reviewer {
    let pem: String = KEY
        .lines()
        .map(|l| format!("              {l}\n"))
        .collect();
    let policy = format!(
        "apiVersion: fixity.dev/v1alpha1\nkind: ImmutabilityPolicy\nmetadata: {{name: signed}}\nspec:\n  images:\n    verify:\n    - images: ['{host}/**']\n      authorities:\n        - key:\n            publicKey: |\n{pem}"
    );
    let policies =
        files::parse(std::path::Path::new("bench.yaml"), &policy).expect("the bench policy");
    let metrics = Arc::new(Metrics::default());
    let options = RegistryOptions {
        insecure_registries: vec![host.to_owned()],
        ..Default::default()
    };
    let checker = SignatureChecker::new(options, DEADLINE, metrics.clone()).expect("a checker");
    Reviewer::new(Arc::new(PolicyStore::fixed(policies)), metrics).with_signatures(checker)
}

fn pod(uid: &str, operation: &str, containers: Vec<Value>, old: Option<Vec<Value>>) -> Vec<u8> {
    let object = |containers: Vec<Value>| {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "bench", "namespace": "bench", "uid": "1f2e"},
               "spec": {"containers": containers}})
    };
    let mut request = json!({
        "uid": uid, "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "namespace": "bench", "name": "bench", "operation": operation,
        "userInfo": {"username": "bench"}, "object": object(containers),
    });
    if let Some(old) = old {
        request["oldObject"] = object(old);
    }
    serde_json::to_vec(
        &json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                              "request": request}),
    )
    .expect("JSON")
}

fn digest(i: usize) -> String {
    format!("sha256:{i:064x}")
}

/// One review naming `n` distinct pinned images under a verify rule, and a review of one other
/// image sent 100 ms into it.
async fn fan_out(n: usize) {
    let (host, requests) = registry().await;
    let reviewer = Arc::new(reviewer(&host));
    let images: Vec<Value> = (0..n)
        .map(|i| json!({"name": format!("c{i}"), "image": format!("{host}/big/app{i}@{}", digest(i))}))
        .collect();
    let big = pod("big", "CREATE", images, None);
    let small = pod(
        "small",
        "CREATE",
        vec![json!({"name": "c", "image": format!("{host}/small/app@{}", digest(0))})],
        None,
    );
    let started = Instant::now();
    let big_review = tokio::spawn({
        let reviewer = reviewer.clone();
        async move {
            let answer = reviewer.review(&big).await;
            (started.elapsed(), answer.body.len())
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let small_started = Instant::now();
    let small_answer = reviewer.review(&small).await;
    let small_took = small_started.elapsed();
    let (big_took, big_bytes) = big_review.await.expect("the big review");
    let at_answer = requests.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = requests.load(Ordering::Relaxed) - at_answer;
    println!(
        "{n:>6} distinct images: review {:>8.1} ms ({} byte answer), {at_answer:>6} registry \
         requests by then, {after:>6} in the 3 s after; a 1-image review meanwhile: {:>7.1} ms \
         (allowed: {})",
        big_took.as_secs_f64() * 1e3,
        big_bytes,
        small_took.as_secs_f64() * 1e3,
        small_answer.allowed,
    );
}

/// A pod update of `n` containers of which one changes its image: the comparison of new
/// against old images.
async fn pod_update(n: usize) {
    let reviewer = Reviewer::new(
        Arc::new(PolicyStore::fixed(vec![fixity::policy::builtin()])),
        Arc::new(Metrics::default()),
    );
    let containers = |changed: usize| -> Vec<Value> {
        (0..n)
            .map(|i| {
                let d = if i == 0 { changed } else { i };
                json!({"name": format!("c{i}"), "image": format!("ghcr.io/acme/app@{}", digest(d))})
            })
            .collect()
    };
    let body = pod("update", "UPDATE", containers(n + 1), Some(containers(0)));
    let started = Instant::now();
    let answer = reviewer.review(&body).await;
    println!(
        "pod update, {n:>6} containers, one image changed: {:>8.1} ms (allowed: {})",
        started.elapsed().as_secs_f64() * 1e3,
        answer.allowed
    );
}
