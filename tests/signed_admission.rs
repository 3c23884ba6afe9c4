//! Signature requirements end to end inside fixity: policies with verify rules, images in a
//! real registry signed by the real cosign CLI, reviews answered by the webhook, `fixity check`
//! and `fixity verify`.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::Request;
use common::registry::{Key, Lab};
use common::review::{message, pod_review, pod_review_of, policy_yaml, post, response, state};
use common::{BIN, Fixity, fixture, https_post, tls_connector};
use fixity::admission::Reviewer;
use fixity::audit::Metrics;
use fixity::policy::PolicyStore;
use fixity::policy::files;
use fixity::server::{AppState, router};
use fixity::verify::RegistryOptions;
use fixity::verify::checker::SignatureChecker;
use http_body_util::BodyExt;
use tower::ServiceExt;

struct Signed {
    lab: Lab,
    key: Key,
    signed: String,
    unsigned: String,
    other_signer: String,
}

fn signed_lab() -> Signed {
    let lab = Lab::start();
    let key = lab.key("release");
    let intruder = lab.key("intruder");
    let signed = lab.reference("shop/app", &lab.push_image("shop/app", "v1", "signed"));
    let unsigned = lab.reference("shop/app", &lab.push_image("shop/app", "v2", "unsigned"));
    let other_signer = lab.reference("shop/app", &lab.push_image("shop/app", "v3", "other"));
    lab.sign(&key, &signed, true, &[]);
    lab.sign(&intruder, &other_signer, true, &[]);
    Signed {
        lab,
        key,
        signed,
        unsigned,
        other_signer,
    }
}

#[tokio::test]
async fn the_webhook_admits_signed_images_and_denies_the_rest() {
    let s = signed_lab();
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("signed.yaml");
    std::fs::write(&policy, policy_yaml(&s.lab.host, &s.key, "")).unwrap();
    let fixity = Fixity::serve(&[
        "--dev",
        "--dev-cert-dir",
        dir.path().to_str().unwrap(),
        "--policy",
        policy.to_str().unwrap(),
        "--insecure-registry",
        &s.lab.host,
    ]);
    let tls = tls_connector(&dir.path().join("ca.crt"));
    let review = |image: &str| {
        let tls = tls.clone();
        let body = pod_review(image);
        async move { common::review(&tls, fixity.addr, body).await }
    };

    assert_eq!(review(&s.signed).await["allowed"], true);
    let r = review(&s.unsigned).await;
    assert_eq!(r["allowed"], false);
    assert!(
        message(&r).contains("UnsignedImage") && message(&r).contains("no signatures found"),
        "{r}"
    );
    let r = review(&s.other_signer).await;
    assert_eq!(r["allowed"], false);
    assert!(
        message(&r).contains("UnsignedImage") && message(&r).contains("no signature is trusted"),
        "{r}"
    );
    // A tag moved to another image is verified afresh: results are keyed by digest.
    s.lab.crane(&["tag", &s.unsigned, "v1"]);
    let moved = s
        .lab
        .crane(&["digest", &format!("{}/shop/app:v1", s.lab.host)]);
    assert_eq!(
        review(&s.lab.reference("shop/app", &moved)).await["allowed"],
        false
    );
    assert_eq!(
        review(&s.signed).await["allowed"],
        true,
        "the signed digest still verifies"
    );
}

#[tokio::test]
async fn a_down_or_silent_registry_gives_verification_unavailable_within_the_deadline() {
    let s = signed_lab();
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_host = silent.local_addr().unwrap().to_string();
    let down_host = common::free_addr().to_string();
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("signed.yaml");
    std::fs::write(&policy, policy_yaml("127.0.0.1:*", &s.key, "")).unwrap();
    let fixity = Fixity::serve(&[
        "--dev",
        "--dev-cert-dir",
        dir.path().to_str().unwrap(),
        "--policy",
        policy.to_str().unwrap(),
        "--insecure-registry",
        &silent_host,
        "--insecure-registry",
        &down_host,
        "--verify-timeout-ms",
        "1500",
    ]);
    let tls = tls_connector(&dir.path().join("ca.crt"));
    let digest = s.signed.rsplit_once('@').unwrap().1;
    for host in [&down_host, &silent_host] {
        let started = Instant::now();
        let reply = https_post(
            &tls,
            fixity.addr,
            "/validate",
            pod_review(&format!("{host}/shop/app@{digest}")),
        )
        .await
        .unwrap();
        let took = started.elapsed();
        let r = response(&reply.body);
        assert_eq!(r["allowed"], false, "{host}: {r}");
        assert!(
            message(&r).contains("VerificationUnavailable"),
            "{host}: {r}"
        );
        assert!(
            took < Duration::from_millis(2500),
            "{host}: answered after {took:?}"
        );
    }
    drop(silent);
}

#[tokio::test]
async fn on_verification_error_allow_admits_when_the_registry_is_down() {
    let s = signed_lab();
    let down_host = common::free_addr().to_string();
    let text = policy_yaml("127.0.0.1:*", &s.key, "    onVerificationError: Allow\n");
    let policies = files::parse(std::path::Path::new("p.yaml"), &text).unwrap();
    let state = state(
        policies,
        RegistryOptions {
            insecure_registries: vec![down_host.clone()],
            ..Default::default()
        },
        Duration::from_secs(5),
    );
    let digest = s.signed.rsplit_once('@').unwrap().1;
    let r = post(
        &state,
        pod_review(&format!("{down_host}/shop/app@{digest}")),
    )
    .await;
    assert_eq!(r["allowed"], true, "{r}");
    assert!(
        r["warnings"][0]
            .as_str()
            .unwrap()
            .contains("VerificationUnavailable"),
        "{r}"
    );
}

/// A thousand pods of one new image: one verification, a handful of registry requests.
#[tokio::test]
async fn a_thousand_concurrent_reviews_of_a_new_image_verify_it_once() {
    let s = signed_lab();
    let text = policy_yaml(&s.lab.host, &s.key, "");
    let policies = files::parse(std::path::Path::new("p.yaml"), &text).unwrap();
    let state = state(
        policies,
        RegistryOptions {
            insecure_registries: vec![s.lab.host.clone()],
            ..Default::default()
        },
        Duration::from_secs(5),
    );
    let before = s.lab.logged_requests();
    let body = pod_review(&s.signed);
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let state = state.clone();
            let body = body.clone();
            tokio::spawn(async move { post(&state, body).await })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap()["allowed"], true);
    }
    let requests = s.lab.logged_requests() - before;
    // Later reviews of the image are answered from the cache.
    for _ in 0..100 {
        assert_eq!(post(&state, body.clone()).await["allowed"], true);
    }
    assert_eq!(
        s.lab.logged_requests() - before,
        requests,
        "cache hits ask the registry nothing"
    );
    let metrics = state.metrics.render();
    assert!(
        metrics.contains(r#"fixity_signature_checks_total{lookup="miss",result="verified"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"fixity_signature_checks_total{lookup="hit",result="verified"} 100"#),
        "{metrics}"
    );
    // One cold verification: the .sig manifest and its one blob.
    assert_eq!(
        requests, 2,
        "{requests} registry requests for one cold verification"
    );
    eprintln!("1000 reviews, 1 verification, {requests} registry requests");
    for line in metrics.lines().filter(|l| {
        l.starts_with("fixity_signature_check_duration_seconds_sum")
            || l.starts_with("fixity_signature_check_duration_seconds_count")
    }) {
        eprintln!("{line}");
    }
}

#[test]
fn check_and_verify_commands_check_signatures() {
    let s = signed_lab();
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("signed.yaml");
    std::fs::write(&policy, policy_yaml(&s.lab.host, &s.key, "")).unwrap();
    let manifest = |image: &str| {
        let path = dir.path().join("pod.yaml");
        std::fs::write(&path, format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: p}}\nspec: {{containers: [{{name: app, image: '{image}'}}]}}\n")).unwrap();
        path
    };
    let policy = policy.to_str().unwrap();
    // `fixity check|verify TARGET` with the lab's policy and registry.
    let run = |command: &str, target: &str| {
        Command::new(BIN)
            .args([
                command,
                "--policy",
                policy,
                "--insecure-registry",
                &s.lab.host,
                target,
            ])
            .output()
            .unwrap()
    };

    let signed = manifest(&s.signed);
    let out = run("check", signed.to_str().unwrap());
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let unsigned = manifest(&s.unsigned);
    let out = run("check", unsigned.to_str().unwrap());
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("UnsignedImage"));

    let out = run("verify", &s.signed);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("verified by key sha256:") && text.contains("registry requests"),
        "{text}"
    );
    let out = run("verify", &s.other_signer);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("NOT verified") && text.contains("no signature is trusted"),
        "{text}"
    );
}

/// A registry that accepts connections, notes the repository each request is about and
/// never answers: every verification that starts hangs until its own budget runs out.
struct SilentRegistry {
    host: String,
    repositories: Arc<std::sync::Mutex<Vec<String>>>,
}

impl SilentRegistry {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let repositories = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = repositories.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    use tokio::io::AsyncReadExt;
                    let mut buf = vec![0; 4096];
                    let n = socket.read(&mut buf).await.unwrap_or(0);
                    let line = String::from_utf8_lossy(&buf[..n]).into_owned();
                    if let Some(repo) = line
                        .split_whitespace()
                        .nth(1)
                        .and_then(|p| p.strip_prefix("/v2/"))
                        .and_then(|p| p.split("/manifests/").next())
                    {
                        seen.lock().unwrap().push(repo.to_owned());
                    }
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    drop(socket);
                });
            }
        });
        Self { host, repositories }
    }
}

/// A review naming more images than fixity verifies for one request (64 by default) is
/// denied with the reason before any registry is asked; 2,000 images used to make 6,000
/// registry requests.
#[tokio::test]
async fn a_request_with_too_many_images_is_denied_without_asking_the_registry() {
    let s = signed_lab();
    let text = policy_yaml(&s.lab.host, &s.key, "");
    let policies = files::parse(std::path::Path::new("p.yaml"), &text).unwrap();
    let options = RegistryOptions {
        insecure_registries: vec![s.lab.host.clone()],
        ..Default::default()
    };
    let state = state(policies, options, Duration::from_secs(5));
    let digest = s.signed.rsplit_once('@').unwrap().1;
    let images: Vec<String> = (0..65)
        .map(|i| format!("{}/shop/app{i}@{digest}", s.lab.host))
        .collect();
    let before = s.lab.logged_requests();
    let r = post(&state, pod_review_of(&images)).await;
    assert_eq!(r["allowed"], false, "{r}");
    assert!(
        message(&r).contains("UnsignedImage")
            && message(&r).contains("needs 65 signature checks, more than the 64"),
        "{r}"
    );
    assert_eq!(
        s.lab.logged_requests(),
        before,
        "the registry was not asked"
    );
    // Within the bound, the same images are checked as ever.
    let r = post(&state, pod_review_of(&images[..1])).await;
    assert_eq!(r["allowed"], false, "shop/app0 holds no signature: {r}");
    assert!(message(&r).contains("no signatures found"), "{r}");
    assert!(s.lab.logged_requests() > before);
}

/// One review with many images against a registry that never answers: only as many
/// verifications start as one request may run at once (4), the others are dropped once the
/// review has its answer, and a small review meanwhile gets a registry slot of its own.
/// Before, all 60 started at once and kept going after the answer.
#[tokio::test]
async fn registry_work_is_capped_shared_and_dropped_at_the_deadline() {
    let registry = SilentRegistry::start().await;
    let key = Lab::start().key("silent");
    let text = policy_yaml(&registry.host, &key, "");
    let policies = files::parse(std::path::Path::new("p.yaml"), &text).unwrap();
    let options = RegistryOptions {
        insecure_registries: vec![registry.host.clone()],
        ..Default::default()
    };
    let state = state(policies, options, Duration::from_millis(600));
    let digest = format!("sha256:{}", "ab".repeat(32));
    let many: Vec<String> = (0..60)
        .map(|i| format!("{}/big/app{i}@{digest}", registry.host))
        .collect();
    let big = tokio::spawn({
        let state = state.clone();
        async move { post(&state, pod_review_of(&many)).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let small = post(
        &state,
        pod_review_of(&[format!("{}/small/app@{digest}", registry.host)]),
    )
    .await;
    let big = big.await.unwrap();
    for r in [&big, &small] {
        assert_eq!(r["allowed"], false, "{r}");
        assert!(message(r).contains("VerificationUnavailable"), "{r}");
    }
    // Long after both answers: what was queued never reached the registry.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let repositories = registry.repositories.lock().unwrap().clone();
    assert!(
        repositories.iter().any(|r| r == "small/app"),
        "the small review had a slot of its own: {repositories:?}"
    );
    let big_ones = {
        let mut b: Vec<&String> = repositories
            .iter()
            .filter(|r| r.starts_with("big/"))
            .collect();
        b.sort();
        b.dedup();
        b.len()
    };
    assert!(
        big_ones <= 8,
        "at most 4 images of the big review at a time, before its deadline and while the \
         drop catches up, then nothing: {big_ones} of 60 reached the registry"
    );
    eprintln!("{big_ones} of 60 images of the big review reached the registry");
}

/// Past its capacity fixity answers 429 with Retry-After (the API server retries that within
/// the webhook's timeout, then applies failurePolicy) and a well-formed denying review, and
/// takes reviews again once there is room.
#[tokio::test]
async fn past_capacity_a_review_is_answered_429_with_retry_after() {
    let registry = SilentRegistry::start().await;
    let key = Lab::start().key("capacity");
    let text = policy_yaml(&registry.host, &key, "");
    let policies = files::parse(std::path::Path::new("p.yaml"), &text).unwrap();
    let store = Arc::new(PolicyStore::fixed(policies));
    let metrics = Arc::new(Metrics::default());
    let options = RegistryOptions {
        insecure_registries: vec![registry.host.clone()],
        ..Default::default()
    };
    let checker =
        SignatureChecker::new(options, Duration::from_millis(800), metrics.clone()).unwrap();
    let capacity = fixity::server::Capacity {
        reviews: 1,
        bytes: 1 << 20,
    };
    let state = Arc::new(AppState {
        reviewer: Reviewer::new(store.clone(), metrics.clone()).with_signatures(checker),
        store,
        metrics,
        max_body: 1 << 20,
        gate: fixity::server::Gate::new(capacity, 1 << 20),
    });
    let send = |body: Vec<u8>| {
        let state = state.clone();
        async move {
            let answer = router(state)
                .oneshot(
                    Request::post("/validate")
                        .header("content-length", body.len())
                        .body(Body::from(body))
                        .unwrap(),
                )
                .await
                .unwrap();
            let status = answer.status().as_u16();
            let retry = answer
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
            let body = answer.into_body().collect().await.unwrap().to_bytes();
            (status, retry, response(&body))
        }
    };
    let digest = format!("sha256:{}", "cd".repeat(32));
    let slow = tokio::spawn(send(pod_review(&format!(
        "{}/slow/app@{digest}",
        registry.host
    ))));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, retry, r) = send(fixture("pod-create-tagged")).await;
    assert_eq!((status, retry.as_deref()), (429, Some("1")), "{r}");
    assert_eq!(r["allowed"], false);
    assert!(
        r["status"]["message"]
            .as_str()
            .unwrap()
            .contains("capacity"),
        "{r}"
    );
    let (status, _, r) = slow.await.unwrap();
    assert_eq!(status, 200);
    assert!(message(&r).contains("VerificationUnavailable"), "{r}");
    let (status, _, r) = send(fixture("pod-create-tagged")).await;
    assert_eq!(status, 200, "room again");
    assert!(message(&r).contains("MutableTag"), "{r}");
    assert!(
        state
            .metrics
            .render()
            .contains("fixity_reviews_throttled_total 1"),
        "{}",
        state.metrics.render()
    );
}

/// `minAuthorities: 2` through the webhook: signed by the release key only, the pod is denied
/// with who signed and how many must; once the scanner's key signs too, it is admitted. A
/// policy listing one key twice for two signatures is refused when it is read.
#[tokio::test]
async fn two_signers_are_required_where_the_policy_says_so() {
    let lab = Lab::start();
    let (release, scanner) = (lab.key("release"), lab.key("scanner"));
    let image = lab.reference("shop/app", &lab.push_image("shop/app", "v1", "two signers"));
    lab.sign(&release, &image, true, &[]);
    let authority = |key: &Key| {
        let pem: String = key
            .public_pem
            .lines()
            .map(|l| format!("              {l}\n"))
            .collect();
        format!("        - key:\n            publicKey: |\n{pem}")
    };
    let policy = |first: &Key, second: &Key| {
        format!(
            "apiVersion: fixity.dev/v1alpha1\nkind: ImmutabilityPolicy\nmetadata: {{name: two}}\nspec:\n  images:\n    verify:\n    - images: ['{}/**']\n      minAuthorities: 2\n      authorities:\n{}{}",
            lab.host,
            authority(first),
            authority(second)
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("two.yaml");
    std::fs::write(&path, policy(&release, &scanner)).unwrap();
    let r = post(&state_for(&path, &lab), pod_review(&image)).await;
    assert_eq!(r["allowed"], false, "{r}");
    let text = message(&r);
    let release_fp = &release_fingerprint(&release)[..16];
    assert!(
        text.contains("UnsignedImage")
            && text.contains("2 distinct authorities must sign this digest and 1 did")
            && text.contains(&format!("key sha256:{release_fp}")),
        "{text}"
    );

    lab.sign(&scanner, &image, true, &[]);
    // A refusal is cached for a while; a fresh server (as after a policy change) asks again.
    assert_eq!(
        post(&state_for(&path, &lab), pod_review(&image)).await["allowed"],
        true
    );

    std::fs::write(&path, policy(&release, &release)).unwrap();
    let err = files::load(&[path]).unwrap_err().to_string();
    assert!(
        err.contains("minAuthorities is 2, and the rule lists 1 distinct authority"),
        "{err}"
    );
}

fn state_for(path: &std::path::Path, lab: &Lab) -> std::sync::Arc<fixity::server::AppState> {
    state(
        files::load(&[path.to_owned()]).unwrap(),
        lab.options(),
        Duration::from_secs(8),
    )
}

/// The SHA-256 of a key's DER, as fixity describes key authorities.
fn release_fingerprint(key: &Key) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    let body: String = key
        .public_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap();
    hex::encode(sha2::Sha256::digest(der))
}
