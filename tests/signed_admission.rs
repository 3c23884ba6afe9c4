//! Signature requirements end to end inside fixity: policies with verify rules, images in a
//! real registry signed by the real cosign CLI, reviews answered by the webhook, `fixity check`
//! and `fixity verify`.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::registry::{Key, Lab};
use common::review::{message, pod_review, policy_yaml, post, response, state};
use common::{BIN, Fixity, https_post, tls_connector};
use fixity::policy::files;
use fixity::verify::RegistryOptions;

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
