//! The real `fixity serve` binary over real TLS sockets: the development mode a new user runs
//! first, hostile bodies, certificate rotation under load, and graceful shutdown.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Fixity, fixture, http_get, https_post, tls_connector};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use serde_json::Value;

fn response(body: &[u8]) -> Value {
    let v: Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)));
    assert_eq!(v["kind"], "AdmissionReview");
    v["response"].clone()
}

#[tokio::test]
async fn dev_mode_answers_the_documented_tour() {
    let certs = tempfile::tempdir().unwrap();
    let dir = certs.path().to_str().unwrap();
    let fixity = Fixity::serve(&["--dev", "--dev-cert-dir", dir]);
    let ca = certs.path().join("ca.crt");
    assert!(
        fixity.log().contains(ca.to_str().unwrap()),
        "the log says where the CA is"
    );
    let tls = tls_connector(&ca);

    let post = |name: &str| {
        let tls = tls.clone();
        let body = fixture(name);
        async move { common::review(&tls, fixity.addr, body).await }
    };
    let tagged = post("pod-create-tagged").await;
    assert_eq!(tagged["allowed"], false);
    let message = tagged["status"]["message"].as_str().unwrap();
    for needle in ["\"web\"", "nginx:1.27", "MutableTag"] {
        assert!(message.contains(needle), "{needle} missing from {message}");
    }
    assert_eq!(post("pod-create-pinned").await["allowed"], true);
    let exec = post("exec").await;
    assert_eq!(exec["allowed"], false);
    assert!(
        exec["status"]["message"]
            .as_str()
            .unwrap()
            .contains("ExecDenied")
    );
    assert_eq!(post("portforward").await["allowed"], true);

    assert_eq!(http_get(fixity.health, "/readyz").map(|r| r.0), Some(200));
    let (_, metrics) = http_get(fixity.health, "/metrics").unwrap();
    assert!(metrics.contains(r#"fixity_violations_total{policy="fixity-default",reason="MutableTag",mode="Enforce",decision="denied"} 1"#), "{metrics}");
    assert!(
        metrics.contains("fixity_review_duration_seconds_bucket"),
        "{metrics}"
    );
    let log = fixity.log();
    assert!(
        log.contains("policy violation") && log.contains("reason=\"ExecDenied\""),
        "{log}"
    );
}

#[tokio::test]
async fn hostile_bodies_never_allow_and_never_crash() {
    let certs = tempfile::tempdir().unwrap();
    let fixity = Fixity::serve(&[
        "--dev",
        "--dev-cert-dir",
        certs.path().to_str().unwrap(),
        "--max-body-bytes",
        "65536",
        "--log-format",
        "json",
    ]);
    let tls = tls_connector(&certs.path().join("ca.crt"));
    let whole = fixture("pod-create-pinned");
    let bodies: Vec<Vec<u8>> = vec![
        Vec::new(),
        b"{".to_vec(),
        b"\xde\xad\xbe\xef".to_vec(),
        whole[..whole.len() - 10].to_vec(),
        vec![b'{'; 70_000],
        vec![b' '; 1 << 20],
        format!("{{\"apiVersion\":\"admission.k8s.io/v1\",\"kind\":\"AdmissionReview\",\"request\":{{\"uid\":\"{}\"}}}}", "a".repeat(60_000)).into_bytes(),
    ];
    for body in bodies {
        let len = body.len();
        let reply = match https_post(&tls, fixity.addr, "/validate", body).await {
            Ok(reply) => reply,
            // A body far over the limit may be cut off by the server's 413 and close
            // before the client has finished sending it: refused either way.
            Err(e) if len > 256 * 1024 && e.contains("writing a body") => continue,
            Err(e) => panic!("{len} bytes: {e}"),
        };
        assert!(
            matches!(reply.status, 200 | 400 | 413),
            "{len} bytes: {}",
            reply.status
        );
        if len > 65_536 {
            assert_eq!(reply.status, 413, "{len} bytes over the limit");
        }
        assert_eq!(response(&reply.body)["allowed"], false, "{len} bytes");
    }
    // Still alive and still right.
    let reply = https_post(&tls, fixity.addr, "/validate", fixture("pod-create-pinned"))
        .await
        .unwrap();
    assert_eq!(response(&reply.body)["allowed"], true);
    let log = fixity.log();
    assert!(
        log.lines()
            .any(|l| l.contains(r#""message":"unreadable admission request""#)),
        "{log}"
    );
}

/// Writes a CA and returns a function that issues localhost certificates from it.
fn test_ca(dir: &Path) -> impl Fn() -> (String, String) + Send + 'static {
    let ca_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "rotation test CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = params.self_signed(&ca_key).unwrap();
    std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
    let issuer = Issuer::new(params, ca_key);
    move || {
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// Lays out a Secret volume the way the kubelet does: files are symlinks through `..data`,
/// which is swapped atomically to a new timestamped directory on every update.
fn write_secret_volume(dir: &Path, generation: usize, cert: &str, key: &str) {
    let data = dir.join(format!("..2026_11_26_{generation:04}"));
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("tls.crt"), cert).unwrap();
    std::fs::write(data.join("tls.key"), key).unwrap();
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(data.file_name().unwrap(), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    for file in ["tls.crt", "tls.key"] {
        let link = dir.join(file);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(file), &link).unwrap();
        }
    }
}

#[tokio::test]
async fn certificate_rotates_under_load_without_a_failed_request() {
    let root = tempfile::tempdir().unwrap();
    let volume = root.path().join("tls");
    std::fs::create_dir(&volume).unwrap();
    let issue = test_ca(root.path());
    let (cert, key) = issue();
    write_secret_volume(&volume, 0, &cert, &key);

    let fixity = Fixity::serve(&[
        "--tls-cert",
        volume.join("tls.crt").to_str().unwrap(),
        "--tls-key",
        volume.join("tls.key").to_str().unwrap(),
        "--cert-poll-ms",
        "100",
    ]);
    let tls = tls_connector(&root.path().join("ca.crt"));

    const ROTATIONS: usize = 4;
    let rotator = std::thread::spawn(move || {
        for generation in 1..=ROTATIONS {
            std::thread::sleep(Duration::from_millis(400));
            let (cert, key) = issue();
            write_secret_volume(&volume, generation, &cert, &key);
        }
    });

    let body = fixture("pod-create-pinned");
    let mut seen = std::collections::HashSet::new();
    let (mut ok, mut failed) = (0, Vec::new());
    let until = Instant::now() + Duration::from_millis(400 * ROTATIONS as u64 + 800);
    while Instant::now() < until {
        match https_post(&tls, fixity.addr, "/validate", body.clone()).await {
            Ok(r) if r.status == 200 && response(&r.body)["allowed"] == true => {
                ok += 1;
                seen.insert(r.server_cert);
            }
            Ok(r) => failed.push(format!("status {}", r.status)),
            Err(e) => failed.push(e),
        }
    }
    rotator.join().unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:?}",
        failed.len(),
        ok + failed.len()
    );
    assert_eq!(
        seen.len(),
        ROTATIONS + 1,
        "every certificate was served ({ok} requests)"
    );
    assert_eq!(
        fixity.log().matches("serving certificate reloaded").count(),
        ROTATIONS
    );
}

#[test]
fn sigterm_finishes_gracefully() {
    let certs = tempfile::tempdir().unwrap();
    let mut fixity = Fixity::serve(&["--dev", "--dev-cert-dir", certs.path().to_str().unwrap()]);
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &fixity.pid().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = fixity
        .wait_exit(Duration::from_secs(10))
        .expect("fixity exits after SIGTERM");
    assert!(status.success(), "{status}");
    let log = fixity.log();
    assert!(
        log.contains("shutting down") && log.contains("stopped"),
        "{log}"
    );
}
