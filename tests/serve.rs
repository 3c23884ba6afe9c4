//! The real `fixity serve` binary over real TLS sockets: the development mode a new user runs
//! first, hostile bodies, certificate rotation under load, and graceful shutdown.

mod common;

use std::time::{Duration, Instant};

use common::{Fixity, fixture, http_get, https_post, test_ca, tls_connector, write_secret_volume};
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

/// Every socket `fixity serve` accepts, on the webhook and the health port, has Nagle's
/// algorithm off. A peer cannot see a socket option, so the real binary's system calls are
/// watched (strace, attached to the running server): each accepted descriptor must be given
/// `TCP_NODELAY` before it is used.
#[tokio::test]
async fn accepted_sockets_have_nagle_off() {
    let certs = tempfile::tempdir().unwrap();
    let fixity = Fixity::serve(&["--dev", "--dev-cert-dir", certs.path().to_str().unwrap()]);
    let trace = certs.path().join("strace.log");
    let mut strace = std::process::Command::new("strace")
        .args(["-f", "-qq", "-e", "trace=accept,accept4,setsockopt", "-o"])
        .arg(&trace)
        .args(["-p", &fixity.pid().to_string()])
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("strace (the Debian package of that name) runs");
    wait_traced(fixity.pid());

    let tls = tls_connector(&certs.path().join("ca.crt"));
    const REVIEWS: usize = 3;
    const HEALTH_CHECKS: usize = 2;
    for _ in 0..REVIEWS {
        // Each on a new connection.
        let answer = common::review(&tls, fixity.addr, fixture("pod-create-pinned")).await;
        assert_eq!(answer["allowed"], true);
    }
    for _ in 0..HEALTH_CHECKS {
        assert_eq!(http_get(fixity.health, "/livez").map(|r| r.0), Some(200));
    }
    let stopped = std::process::Command::new("kill")
        .args(["-TERM", &strace.id().to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    strace.wait().unwrap();

    let log = std::fs::read_to_string(&trace).unwrap();
    let (accepted, without) = accepted_without_nodelay(&log);
    assert!(
        accepted >= REVIEWS + HEALTH_CHECKS,
        "{accepted} accepted connections traced:\n{log}"
    );
    assert!(
        without.is_empty(),
        "accepted without TCP_NODELAY: descriptors {without:?}\n{log}"
    );
}

/// Waits until every thread of `pid` has a tracer.
fn wait_traced(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
        let traced = tasks.filter_map(Result::ok).all(|task| {
            std::fs::read_to_string(task.path().join("status")).is_ok_and(|status| {
                status
                    .lines()
                    .any(|l| l.starts_with("TracerPid:") && l.trim_end() != "TracerPid:\t0")
            })
        });
        if traced {
            return;
        }
        assert!(Instant::now() < deadline, "strace did not attach to {pid}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// From an strace log of `accept`, `accept4` and `setsockopt`: how many connections were
/// accepted, and the descriptors of those that never got `TCP_NODELAY` set to 1 before the
/// same descriptor number was accepted again.
fn accepted_without_nodelay(log: &str) -> (usize, Vec<u32>) {
    let (mut accepted, mut open) = (0, Vec::<u32>::new());
    let mut without = Vec::new();
    for line in log.lines() {
        // A call split by another thread's ends in "<... accept4 resumed> ...) = 12".
        let accept = line.contains("accept4(")
            || line.contains("accept(")
            || line.contains("accept4 resumed>")
            || line.contains("accept resumed>");
        if accept && !line.contains("<unfinished") {
            let returned = line
                .rsplit_once(") = ")
                .and_then(|(_, r)| r.parse::<u32>().ok());
            if let Some(fd) = returned {
                accepted += 1;
                if open.contains(&fd) {
                    without.push(fd);
                }
                open.retain(|&o| o != fd);
                open.push(fd);
            }
        } else if let Some(call) = line.split_once("setsockopt(").map(|(_, c)| c)
            && call.contains("TCP_NODELAY, [1]")
            && let Some(fd) = call.split(',').next().and_then(|fd| fd.parse::<u32>().ok())
        {
            open.retain(|&o| o != fd);
        }
    }
    without.extend(open);
    (accepted, without)
}

/// A pod review with `n` containers of the tagged image `image`.
fn many_tagged(n: usize, image: &str) -> Vec<u8> {
    let mut review: Value = serde_json::from_slice(&fixture("pod-create-tagged")).unwrap();
    let containers: Vec<Value> = (0..n)
        .map(|i| serde_json::json!({"name": format!("c{i}"), "image": image}))
        .collect();
    review["request"]["object"]["spec"]["containers"] = containers.into();
    serde_json::to_vec(&review).unwrap()
}

/// One review naming 1,000 tagged images: the answer and the audit log are bounded, with the
/// counts of what they leave out. Before, this produced 1,000 warnings, 1,000 log lines and a
/// message naming every container; past 1,024 images a pod is refused outright.
#[tokio::test]
async fn a_review_with_thousands_of_violations_gets_a_bounded_answer_and_log() {
    let certs = tempfile::tempdir().unwrap();
    let fixity = Fixity::serve(&[
        "--dev",
        "--dev-cert-dir",
        certs.path().to_str().unwrap(),
        "--log-format",
        "json",
    ]);
    let tls = tls_connector(&certs.path().join("ca.crt"));
    let reply = https_post(
        &tls,
        fixity.addr,
        "/validate",
        many_tagged(1000, "nginx:1.27"),
    )
    .await
    .unwrap();
    assert!(
        reply.body.len() < 16 * 1024,
        "{} byte answer",
        reply.body.len()
    );
    let r = response(&reply.body);
    assert_eq!(r["allowed"], false);
    let message = r["status"]["message"].as_str().unwrap();
    assert!(message.len() <= 4200, "{} byte message", message.len());
    assert!(
        message.ends_with("; and 990 more denials (the audit log sums them up)"),
        "{message}"
    );
    let warnings = r["warnings"].as_array().unwrap();
    assert_eq!(warnings.len(), 11);
    assert_eq!(warnings[10], "fixity: and 990 more violations");
    let listed: Value =
        serde_json::from_str(r["auditAnnotations"]["violations"].as_str().unwrap()).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 20);
    assert_eq!(r["auditAnnotations"]["omitted"], "980");

    // One image of 100 kB (an invalid reference): every place that shows it cuts it.
    let long = format!("registry.example/{}:1", "a".repeat(100_000));
    let reply = https_post(&tls, fixity.addr, "/validate", many_tagged(3, &long))
        .await
        .unwrap();
    assert!(
        reply.body.len() < 8 * 1024,
        "{} byte answer",
        reply.body.len()
    );

    let log = fixity.log();
    let audit: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("\"target\":\"fixity::audit\""))
        .collect();
    assert!(
        audit.iter().all(|l| l.len() < 8 * 1024),
        "audit lines are bounded"
    );
    let summary: Vec<&&str> = audit
        .iter()
        .filter(|l| l.contains("further policy violations, summed up"))
        .collect();
    assert_eq!(summary.len(), 1, "{} audit lines", audit.len());
    assert!(
        summary[0].contains(r#""violations":980"#) && summary[0].contains(r#"\"MutableTag\":980"#),
        "{}",
        summary[0]
    );
    assert_eq!(
        audit.len(),
        20 + 1 + 3,
        "20 lines and a sum, then the 3 long ones"
    );
    let (_, metrics) = http_get(fixity.health, "/metrics").unwrap();
    assert!(
        metrics.contains(r#"fixity_violations_total{policy="fixity-default",reason="MutableTag",mode="Enforce",decision="denied"} 1000"#),
        "every violation is counted: {metrics}"
    );

    // Past 1,024 images (what bounds a review's memory) a pod is refused with the reason.
    let reply = https_post(
        &tls,
        fixity.addr,
        "/validate",
        many_tagged(1025, "nginx:1.27"),
    )
    .await
    .unwrap();
    let r = response(&reply.body);
    assert_eq!(r["allowed"], false);
    assert!(
        r["status"]["message"]
            .as_str()
            .unwrap()
            .contains("names 1025 images (containers, init and ephemeral containers, image volumes), more than the 1024"),
        "{r}"
    );
}

/// A CA and a client certificate it issued, in PEM: (CA, certificate, key).
fn client_identity(name: &str) -> (String, String, String) {
    use rcgen::ExtendedKeyUsagePurpose;
    let ca_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("{name} CA"));
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(params, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf.distinguished_name.push(DnType::CommonName, name);
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

/// With --client-ca only a client presenting a certificate from that CA (the API server, as
/// its admission configuration tells it to) gets a review answered; anyone else who reaches
/// the port cannot make fixity do anything, an Event least of all.
#[tokio::test]
async fn with_a_client_ca_only_the_api_servers_certificate_gets_in() {
    let dir = tempfile::tempdir().unwrap();
    let (api_ca, api_cert, api_key) = client_identity("kube-apiserver");
    let (_, other_cert, other_key) = client_identity("someone else");
    let client_ca = dir.path().join("client-ca.crt");
    std::fs::write(&client_ca, api_ca).unwrap();
    let certs = dir.path().join("certs");
    let fixity = Fixity::serve(&[
        "--dev",
        "--dev-cert-dir",
        certs.to_str().unwrap(),
        "--client-ca",
        client_ca.to_str().unwrap(),
    ]);
    let serving_ca = certs.join("ca.crt");
    let body = || fixture("pod-create-tagged");

    let anonymous = https_post(
        &tls_connector(&serving_ca),
        fixity.addr,
        "/validate",
        body(),
    )
    .await;
    assert!(
        anonymous.is_err(),
        "no client certificate: {:?}",
        anonymous.map(|r| r.status)
    );
    let stranger = common::tls_connector_with_client(&serving_ca, &other_cert, &other_key);
    let strange = https_post(&stranger, fixity.addr, "/validate", body()).await;
    assert!(
        strange.is_err(),
        "a certificate from another CA: {:?}",
        strange.map(|r| r.status)
    );

    let api = common::tls_connector_with_client(&serving_ca, &api_cert, &api_key);
    let r = common::review(&api, fixity.addr, body()).await;
    assert_eq!(r["allowed"], false);
    assert!(
        r["status"]["message"]
            .as_str()
            .unwrap()
            .contains("MutableTag"),
        "{r}"
    );
    // Health and metrics stay plain HTTP for probes.
    assert_eq!(http_get(fixity.health, "/readyz").map(|r| r.0), Some(200));

    let broken = dir.path().join("broken.crt");
    std::fs::write(&broken, "not a certificate").unwrap();
    let mut refused = std::process::Command::new(common::BIN)
        .args(["serve", "--dev", "--dev-cert-dir", certs.to_str().unwrap()])
        .args(["--addr", &common::free_addr().to_string()])
        .args(["--health-addr", &common::free_addr().to_string()])
        .args(["--client-ca", broken.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = refused.wait().unwrap();
    assert!(
        !status.success(),
        "an unusable --client-ca stops fixity from starting"
    );
}
