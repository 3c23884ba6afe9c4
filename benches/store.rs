//! The evidence store after a restart: 1,000 pod creations of 20 distinct signed images, each
//! also under an attestation rule (an SLSA provenance with a CEL condition), sent to a fixity
//! that has just started, once with the store and once without (the baseline, in the
//! same run), counting registry requests at the registry and timing each review; the store's
//! size for 1,000 digests; and the time to ready with those entries stored.
//!
//! Needs a real API server: `tests/cluster/with-cluster.sh cargo bench --bench store`
//! (`--profile dev` measures the debug build and builds nothing new). The 20 images are signed
//! and attested by the real cosign in a real registry (`crane registry serve`); the 1,000 stored
//! digests are
//! signed here (simple-signing payloads and a P-256 key of the policy's), as cosign would sign
//! them, and written to the store as fixity writes entries.

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use common::registry::Lab;
use common::review::pod_review;
use common::{Fixity, http_get, tls_connector};
use fixity::verify::store::object_name;
use rcgen::SigningKey as _;
use serde_json::{Value, json};

const IMAGES: usize = 20;
const REVIEWS: usize = 1_000;
const CONCURRENCY: usize = 50;
const STORED_DIGESTS: usize = 1_000;
const BUILDER: &str = "https://fixity.test/bench-builder";

fn main() -> ExitCode {
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!(
            "the store benchmark runs with: tests/cluster/with-cluster.sh cargo bench --bench store"
        );
        return ExitCode::SUCCESS;
    }
    if std::env::var("KUBECONFIG").is_err() {
        eprintln!("store benchmark: needs a cluster; run it through tests/cluster/with-cluster.sh");
        return ExitCode::FAILURE;
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("store benchmark: {e}");
            ExitCode::FAILURE
        }
    }
}

fn kubectl(args: &[&str], stdin: Option<&str>) -> Result<String, String> {
    let run = common::kube::kubectl_in(args, stdin);
    if run.ok {
        Ok(run.stdout)
    } else {
        Err(format!("kubectl {args:?}: {}", run.stderr))
    }
}

fn pem_lines(pem: &str) -> String {
    pem.lines()
        .map(|l| format!("              {l}\n"))
        .collect()
}

/// A fixity on the cluster's policies; returns it with the time from start to ready.
fn start(lab: &Lab, extra: &[&str]) -> (Fixity, tempfile::TempDir, Duration) {
    let certs = tempfile::tempdir().expect("temp dir");
    let started = Instant::now();
    let mut args = vec![
        "--dev",
        "--dev-cert-dir",
        certs.path().to_str().unwrap_or_default(),
        "--watch-cluster",
        "--log-format",
        "json",
        "--insecure-registry",
        &lab.host,
        "--namespace",
        "default",
    ];
    args.extend_from_slice(extra);
    let fixity = Fixity::serve(&args);
    while http_get(fixity.health, "/readyz").is_none_or(|(code, _)| code != 200) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "fixity never became ready:\n{}",
            fixity.log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    (fixity, certs, started.elapsed())
}

/// The entries the warm start loaded, from its log line.
fn loaded(fixity: &Fixity) -> u64 {
    fixity
        .log()
        .split(r#""loaded":"#)
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

struct Round {
    registry_requests: usize,
    /// Mean time fixity itself took per review (fixity_review_duration_seconds).
    server_mean_ms: f64,
    latencies: Vec<Duration>,
    allowed: usize,
    from_store: usize,
}

/// REVIEWS pod creations, round robin over `images`, CONCURRENCY at a time.
fn pods(lab: &Lab, fixity: &Fixity, ca: &std::path::Path, images: &[String], ns: &str) -> Round {
    let before = lab.logged_requests();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let connector = tls_connector(&ca.join("ca.crt"));
    let addr = fixity.addr;
    let gate = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let results: Vec<(Duration, Value)> = runtime.block_on(async {
        let tasks: Vec<_> = (0..REVIEWS)
            .map(|i| {
                let mut review: Value =
                    serde_json::from_slice(&pod_review(&images[i % images.len()]))
                        .unwrap_or_default();
                review["request"]["namespace"] = ns.into();
                review["request"]["uid"] = format!("bench-{i}").into();
                let body = serde_json::to_vec(&review).unwrap_or_default();
                let (connector, gate) = (connector.clone(), gate.clone());
                tokio::spawn(async move {
                    let _permit = gate.acquire_owned().await;
                    let started = Instant::now();
                    let response = common::review(&connector, addr, body).await;
                    (started.elapsed(), response)
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            if let Ok(r) = t.await {
                out.push(r);
            }
        }
        out
    });
    let mut latencies: Vec<Duration> = results.iter().map(|(d, _)| *d).collect();
    latencies.sort();
    let sum = metric(
        fixity,
        r#"fixity_review_duration_seconds_sum{result="allowed"}"#,
    );
    let count = metric(
        fixity,
        r#"fixity_review_duration_seconds_count{result="allowed"}"#,
    );
    Round {
        server_mean_ms: if count > 0.0 {
            sum / count * 1000.0
        } else {
            0.0
        },
        registry_requests: lab.logged_requests() - before,
        allowed: results.iter().filter(|(_, r)| r["allowed"] == true).count(),
        from_store: results
            .iter()
            .filter(|(_, r)| r["auditAnnotations"]["evidence"] == "stored")
            .count(),
        latencies,
    }
}

fn quantile(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let at = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[at].as_secs_f64() * 1000.0
}

fn metric(fixity: &Fixity, series: &str) -> f64 {
    let (_, text) = http_get(fixity.health, "/metrics").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn run() -> Result<(), String> {
    for crd in ["immutabilitypolicies", "verifiedevidences"] {
        kubectl(&["get", "crd", &format!("{crd}.fixity.dev")], None)
            .map_err(|_| "apply charts/fixity/crds/ first".to_owned())?;
    }
    let lab = Lab::start();
    let cosign_key = lab.key("release");
    eprintln!("store benchmark: signing and attesting {IMAGES} images with cosign");
    let provenance = json!({ "runDetails": { "builder": { "id": BUILDER } } }).to_string();
    let images: Vec<String> = (0..IMAGES)
        .map(|i| {
            let digest = lab.push_image("app", &format!("v{i}"), &format!("image {i}"));
            let reference = lab.reference("app", &digest);
            lab.sign(&cosign_key, &reference, true, &[]);
            lab.attest(
                &cosign_key,
                &reference,
                "slsaprovenance1",
                &provenance,
                false,
            );
            reference
        })
        .collect();

    // The stored digests' signer, and a policy trusting both signers.
    let stored_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| format!("key: {e}"))?;
    let ns = format!("store-bench-{}", std::process::id());
    let policy = format!(
        "apiVersion: fixity.dev/v1alpha1\nkind: ImmutabilityPolicy\nmetadata: {{name: {ns}}}\nspec:\n  match:\n    namespaceSelector:\n      matchLabels: {{fixity-store-bench: {ns}}}\n  images:\n    verify:\n    - images: ['{host}/app']\n      attestations:\n        - name: provenance\n          predicateType: slsaprovenance1\n          conditions:\n            - expression: predicate.runDetails.builder.id == '{BUILDER}'\n      authorities:\n        - key:\n            publicKey: |\n{}    - images: ['{host}/stored']\n      authorities:\n        - key:\n            publicKey: |\n{}",
        pem_lines(&cosign_key.public_pem),
        pem_lines(&stored_key.public_key_pem()),
        host = lab.host,
    );
    kubectl(
        &["apply", "-f", "-"],
        Some(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n  labels: {{fixity-store-bench: {ns}}}\n"
        )),
    )?;
    kubectl(&["apply", "-f", "-"], Some(&policy))?;
    let compiled = fixity::policy::files::parse(std::path::Path::new("bench"), &policy)
        .map_err(|e| e.to_string())?;
    let fingerprint = compiled[0].verify[1].fingerprint;

    // 1,000 digests signed as cosign signs them, stored as fixity stores them.
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let mut entries = Vec::new();
    for i in 0..STORED_DIGESTS {
        let image = format!("{}/stored@sha256:{i:064x}", lab.host);
        let payload = json!({
            "critical": {
                "identity": { "docker-reference": format!("{}/stored", lab.host) },
                "image": { "docker-manifest-digest": format!("sha256:{i:064x}") },
                "type": "cosign container image signature",
            },
            "optional": null,
        })
        .to_string();
        let signature = stored_key
            .sign(payload.as_bytes())
            .map_err(|e| format!("sign: {e}"))?;
        entries.push(json!({
            "apiVersion": "fixity.dev/v1alpha1",
            "kind": "VerifiedEvidence",
            "metadata": { "name": object_name(&(image.clone(), fingerprint)) },
            "spec": {
                "image": image,
                "authorities": format!("{fingerprint:016x}"),
                "verifiedAt": now,
                "lastUsed": now,
                "writer": "store benchmark",
                "items": [{
                    "kind": "Signature",
                    "payload": payload,
                    "annotations": { "dev.cosignproject.cosign/signature": STANDARD.encode(signature) },
                }],
            },
        }));
    }
    let list = json!({ "apiVersion": "v1", "kind": "List", "items": entries });
    kubectl(&["create", "-f", "-"], Some(&list.to_string()))?;
    let listed = kubectl(&["get", "verifiedevidences", "-o", "json"], None)?;
    let listed: Value = serde_json::from_str(&listed).map_err(|e| e.to_string())?;
    let objects = listed["items"].as_array().cloned().unwrap_or_default();
    let object_bytes: usize = objects.iter().map(|o| o.to_string().len()).sum();

    // A replica verifies the 20 images once (writing their signatures and attestations), then
    // is restarted.
    let (warm, warm_ca, _) = start(&lab, &[]);
    let first = pods(&lab, &warm, warm_ca.path(), &images, &ns);
    let deadline = Instant::now() + Duration::from_secs(20);
    let written = (2 * IMAGES) as f64;
    while metric(&warm, r#"fixity_evidence_store_total{outcome="written"}"#) < written {
        if Instant::now() > deadline {
            return Err("the 20 signatures and 20 attestations were not written".to_owned());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(warm);

    let (with_store, with_ca, ready_with) = start(&lab, &[]);
    let listed_objects = metric(&with_store, "fixity_evidence_store_objects");
    let warmed = loaded(&with_store);
    let evidence_bytes = metric(&with_store, "fixity_evidence_store_bytes");
    let stored = pods(&lab, &with_store, with_ca.path(), &images, &ns);
    let attested_from_store = metric(
        &with_store,
        r#"fixity_attestation_checks_total{lookup="store",result="satisfied"}"#,
    );
    drop(with_store);
    let (without, without_ca, ready_without) = start(&lab, &["--evidence-store=false"]);
    let baseline = pods(&lab, &without, without_ca.path(), &images, &ns);
    drop(without);

    println!(
        "store benchmark: {REVIEWS} pod creations of {IMAGES} cosign-signed and attested images (a signature and a provenance rule with a CEL condition each), {CONCURRENCY} at a time, each on a new TLS connection, right after a restart"
    );
    println!(
        "  first replica (cold, nothing stored): {} registry requests; client latency p50 {:.1} ms, p99 {:.1} ms; fixity's own time per review {:.2} ms",
        first.registry_requests,
        quantile(&first.latencies, 0.5),
        quantile(&first.latencies, 0.99),
        first.server_mean_ms,
    );
    for (name, round, ready) in [
        ("restarted with the store", &stored, ready_with),
        (
            "restarted without the store (baseline)",
            &baseline,
            ready_without,
        ),
    ] {
        println!(
            "  {name}: ready in {} ms; {} registry requests; {} of {REVIEWS} admitted ({} on stored evidence); client latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; fixity's own time per review {:.2} ms",
            ready.as_millis(),
            round.registry_requests,
            round.allowed,
            round.from_store,
            quantile(&round.latencies, 0.5),
            quantile(&round.latencies, 0.99),
            quantile(&round.latencies, 1.0),
            round.server_mean_ms,
        );
    }
    println!(
        "  with the store, {attested_from_store} attestation checks were satisfied from stored envelopes (one per image; the rest hit memory)"
    );
    println!(
        "  store for {STORED_DIGESTS} digests: {} objects, {object_bytes} bytes as the API server lists them ({} per object); {evidence_bytes} bytes of evidence ({listed_objects} objects) by fixity_evidence_store_bytes",
        objects.len(),
        object_bytes / objects.len().max(1),
    );
    println!(
        "  time to ready with {} stored entries: {} ms, {warmed} verified again into the cache (without the store: {} ms)",
        objects.len(),
        ready_with.as_millis(),
        ready_without.as_millis()
    );
    kubectl(
        &["delete", "verifiedevidences", "--all", "--wait=false"],
        None,
    )?;
    kubectl(&["delete", "immutabilitypolicy", &ns, "--wait=false"], None)?;
    kubectl(&["delete", "namespace", &ns, "--wait=false"], None)?;
    Ok(())
}
