//! The evidence store through a real kube-apiserver (with etcd): fixity processes sharing
//! verified evidence as VerifiedEvidence objects, signatures made by the real `cosign` in a real
//! registry (`crane registry serve`) whose requests are counted. Run by `tests/e2e/run.sh` (the
//! cluster provides KUBECONFIG and kubectl); ignored by a plain `cargo test`.
//!
//! The store is cluster-wide and garbage collection deletes what any test wrote, so the tests
//! take turns.

mod common;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::kube::{self, poll};
use common::registry::{Key, Lab};
use common::review::pod_review;
use common::{Fixity, http_get, tls_connector};
use serde_json::Value;

static TURN: Mutex<()> = Mutex::new(());

/// kubectl's output, the test failing when kubectl does.
#[track_caller]
fn kubectl_ok(args: &[&str], stdin: Option<&str>) -> String {
    kube::expect_ok(kube::kubectl_in(args, stdin)).stdout
}

/// A labelled namespace and a policy requiring `key`'s signature on the lab's images in it.
struct Scene {
    name: String,
}

impl Scene {
    fn new(test: &str, lab: &Lab, key: &Key) -> Self {
        let name = format!("store-{test}-{}", std::process::id());
        kubectl_ok(
            &["apply", "-f", "-"],
            Some(&format!(
                "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  labels: {{fixity-store: {name}}}\n"
            )),
        );
        let scene = Self { name };
        scene.set_key(lab, key);
        scene
    }

    fn set_key(&self, lab: &Lab, key: &Key) {
        self.set_policy(lab, key, "");
    }

    /// The policy with `rule_extra` (fields of the verify rule, six spaces in) added.
    fn set_policy(&self, lab: &Lab, key: &Key, rule_extra: &str) {
        let pem: String = key
            .public_pem
            .lines()
            .map(|l| format!("              {l}\n"))
            .collect();
        let name = &self.name;
        kubectl_ok(
            &["apply", "-f", "-"],
            Some(&format!(
                "apiVersion: fixity.dev/v1alpha1\nkind: ImmutabilityPolicy\nmetadata: {{name: {name}}}\nspec:\n  match:\n    namespaceSelector:\n      matchLabels: {{fixity-store: {name}}}\n  images:\n    verify:\n    - images: ['{}/**']\n{rule_extra}      authorities:\n        - key:\n            publicKey: |\n{pem}",
                lab.host
            )),
        );
    }

    /// A fixity serving the cluster's policies, with the evidence store, ready (policies
    /// synced and the store read).
    fn fixity(&self, lab: &Lab, extra: &[&str]) -> Replica {
        let certs = tempfile::tempdir().unwrap();
        let mut args = vec![
            "--dev",
            "--dev-cert-dir",
            certs.path().to_str().unwrap(),
            "--watch-cluster",
            "--log-format",
            "json",
            "--insecure-registry",
            &lab.host,
            "--verify-timeout-ms",
            "2000",
            "--namespace",
            "default",
        ];
        args.extend_from_slice(extra);
        let fixity = Fixity::serve(&args);
        let ready = poll(Duration::from_secs(30), || {
            http_get(fixity.health, "/readyz")
                .filter(|(code, _)| *code == 200)
                .map(|_| ())
        });
        assert!(
            ready.is_some(),
            "fixity never became ready:\n{}",
            fixity.log()
        );
        Replica {
            fixity,
            certs,
            namespace: self.name.clone(),
        }
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        kube::kubectl(&["delete", "immutabilitypolicy", &self.name, "--wait=false"]);
        kube::kubectl(&["delete", "namespace", &self.name, "--wait=false"]);
    }
}

struct Replica {
    fixity: Fixity,
    certs: tempfile::TempDir,
    namespace: String,
}

impl Replica {
    /// The `response` to a pod creation naming `image`.
    fn review(&self, image: &str) -> Value {
        let mut review: Value = serde_json::from_slice(&pod_review(image)).unwrap();
        review["request"]["namespace"] = self.namespace.clone().into();
        let body = serde_json::to_vec(&review).unwrap();
        let connector = tls_connector(&self.certs.path().join("ca.crt"));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(common::review(&connector, self.fixity.addr, body))
    }

    fn metric(&self, series: &str) -> f64 {
        let (_, text) = http_get(self.fixity.health, "/metrics").unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    }
}

#[track_caller]
fn admitted(response: &Value) {
    assert_eq!(response["allowed"], true, "{response}");
}

#[track_caller]
fn denied(response: &Value, reason: &str) {
    assert_eq!(response["allowed"], false, "{response}");
    let message = response["status"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(reason), "expected {reason}: {response}");
}

/// The VerifiedEvidence object for `image` (registry/repository@digest), once it exists.
fn entry(image: &str) -> Value {
    poll(Duration::from_secs(10), || {
        let run = kube::kubectl(&["get", "verifiedevidences", "-o", "json"]);
        let list: Value = serde_json::from_str(&run.stdout).ok().filter(|_| run.ok)?;
        list["items"]
            .as_array()?
            .iter()
            .find(|o| o["spec"]["image"] == image)
            .cloned()
    })
    .unwrap_or_else(|| panic!("no VerifiedEvidence for {image}"))
}

fn signed_image(lab: &Lab, key: &Key, tag: &str, classic: bool) -> String {
    let digest = lab.push_image("app", tag, tag);
    let reference = lab.reference("app", &digest);
    lab.sign(key, &reference, classic, &[]);
    reference
}

#[test]
#[ignore = "needs a cluster: tests/e2e/run.sh"]
fn a_second_replica_admits_with_no_registry_request_and_so_does_an_outage() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let mut lab = Lab::start();
    let key = lab.key("release");
    let scene = Scene::new("share", &lab, &key);
    let classic = signed_image(&lab, &key, "classic", true);
    let bundle = signed_image(&lab, &key, "bundle", false);
    let never_verified = signed_image(&lab, &key, "new", true);

    let first = scene.fixity(&lab, &[]);
    let second = scene.fixity(&lab, &[]);
    for image in [&classic, &bundle] {
        admitted(&first.review(image));
        entry(image);
    }
    let before = lab.logged_requests();
    for image in [&classic, &bundle] {
        let response = second.review(image);
        admitted(&response);
        assert_eq!(
            response["auditAnnotations"]["evidence"], "stored",
            "{response}"
        );
    }
    assert_eq!(
        lab.logged_requests(),
        before,
        "the second replica asked the registry nothing"
    );
    assert_eq!(
        second.metric(r#"fixity_signature_checks_total{lookup="store",result="verified"}"#),
        2.0
    );
    assert_eq!(
        second.metric(r#"fixity_evidence_store_total{outcome="verified"}"#),
        2.0
    );

    // The registry down, and a replica started afterwards: what is stored is admitted, a
    // digest never verified is unavailable, within the deadline.
    lab.stop_registry();
    let restarted = scene.fixity(&lab, &[]);
    let log = restarted.fixity.log();
    let loaded: u64 = log
        .split(r#""loaded":"#)
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no warm start line:\n{log}"));
    assert!(loaded >= 2, "the warm start loaded both entries:\n{log}");
    for image in [&classic, &bundle] {
        let response = restarted.review(image);
        admitted(&response);
        assert_eq!(
            response["auditAnnotations"]["evidence"], "stored",
            "{response}"
        );
    }
    assert_eq!(
        restarted.metric(r#"fixity_signature_checks_total{lookup="hit",result="verified"}"#),
        2.0,
        "answered from the cache the warm start filled"
    );
    let started = Instant::now();
    denied(
        &restarted.review(&never_verified),
        "VerificationUnavailable",
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert!(
        restarted.fixity.log().contains(r#""evidence":"stored""#),
        "the log line says the evidence was stored"
    );
}

/// Replaces the entry's spec with `spec`, as someone who can write the store could.
fn overwrite(entry: &Value, spec: Value) {
    let mut object = entry.clone();
    object["spec"] = spec;
    kubectl_ok(
        &["replace", "-f", "-"],
        Some(&serde_json::to_string(&object).unwrap()),
    );
}

#[test]
#[ignore = "needs a cluster: tests/e2e/run.sh"]
fn an_entry_tampered_with_is_refused_and_verified_again_from_the_registry() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::start();
    let key = lab.key("release");
    let scene = Scene::new("tamper", &lab, &key);
    let image = signed_image(&lab, &key, "victim", true);
    let other = signed_image(&lab, &key, "other", true);
    let writer = scene.fixity(&lab, &[]);
    admitted(&writer.review(&image));
    admitted(&writer.review(&other));
    let genuine = entry(&image);
    let other_entry = entry(&other);
    drop(writer);

    let digest = image.split_once('@').unwrap().1;
    let payload = genuine["spec"]["items"][0]["payload"].as_str().unwrap();
    let mut tampered_payload = genuine["spec"].clone();
    let forged = payload.replace("/app\"", "/ap2\"");
    assert_ne!(forged, payload);
    tampered_payload["items"][0]["payload"] = forged.into();
    let mut tampered_signature = genuine["spec"].clone();
    let signature =
        &mut tampered_signature["items"][0]["annotations"]["dev.cosignproject.cosign/signature"];
    let mut text = signature.as_str().unwrap().to_owned();
    let flipped = if text.starts_with('M') { "N" } else { "M" };
    text.replace_range(0..1, flipped);
    *signature = text.into();
    // The digest: genuine evidence of another image put under this image's entry.
    let mut other_digest = genuine["spec"].clone();
    other_digest["items"] = other_entry["spec"]["items"].clone();
    assert!(
        !other_digest["items"][0]["payload"]
            .as_str()
            .unwrap()
            .contains(digest)
    );

    for (case, spec) in [
        ("payload", tampered_payload),
        ("signature", tampered_signature),
        ("digest", other_digest),
    ] {
        overwrite(&entry(&image), spec);
        let before = lab.logged_requests();
        let reader = scene.fixity(&lab, &[]);
        let response = reader.review(&image);
        admitted(&response);
        assert!(
            response["auditAnnotations"].get("evidence").is_none(),
            "{case}: {response}"
        );
        assert!(
            lab.logged_requests() > before,
            "{case}: verified again from the registry"
        );
        assert_eq!(
            reader.metric(r#"fixity_evidence_store_total{outcome="refused"}"#),
            1.0,
            "{case}: the tampered entry was refused"
        );
        // The registry's evidence replaces the tampered entry.
        let restored = poll(Duration::from_secs(10), || {
            let now = entry(&image);
            (now["spec"]["items"] == genuine["spec"]["items"]).then_some(())
        });
        assert!(restored.is_some(), "{case}: the entry was written again");
    }
}

#[test]
#[ignore = "needs a cluster: tests/e2e/run.sh"]
fn a_key_rotated_in_the_policy_does_not_use_the_stored_entry() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let mut lab = Lab::start();
    let old = lab.key("old");
    let scene = Scene::new("rotate", &lab, &old);
    let image = signed_image(&lab, &old, "rotated", true);
    let first = scene.fixity(&lab, &[]);
    admitted(&first.review(&image));
    entry(&image);
    drop(first);

    let new = lab.key("new");
    scene.set_key(&lab, &new);
    lab.stop_registry();
    let reader = scene.fixity(&lab, &[]);
    // The new policy is in force once the old entry stops admitting.
    let response = poll(Duration::from_secs(20), || {
        let r = reader.review(&image);
        (r["allowed"] == false).then_some(r)
    })
    .expect("the rotated key no longer admits the image");
    denied(&response, "VerificationUnavailable");
    assert!(response["auditAnnotations"].get("evidence").is_none());
}

#[test]
#[ignore = "needs a cluster: tests/e2e/run.sh"]
fn evidence_older_than_max_evidence_age_does_not_admit_in_an_outage() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let mut lab = Lab::start();
    let key = lab.key("release");
    let scene = Scene::new("age", &lab, &key);
    scene.set_policy(&lab, &key, "      maxEvidenceAge: 2s\n");
    let image = signed_image(&lab, &key, "aged", true);
    let writer = scene.fixity(&lab, &[]);
    admitted(&writer.review(&image));
    entry(&image);
    drop(writer);

    lab.stop_registry();
    std::thread::sleep(Duration::from_secs(3));
    let reader = scene.fixity(&lab, &[]);
    denied(&reader.review(&image), "VerificationUnavailable");
    assert_eq!(
        reader.metric(r#"fixity_evidence_store_total{outcome="stale"}"#),
        1.0
    );
}

#[test]
#[ignore = "needs a cluster: tests/e2e/run.sh"]
fn garbage_collection_removes_unused_entries_and_bounds_the_store() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::start();
    let key = lab.key("release");
    let scene = Scene::new("gc", &lab, &key);
    let image = signed_image(&lab, &key, "collected", true);
    let writer = scene.fixity(&lab, &[]);
    admitted(&writer.review(&image));
    let genuine = entry(&image);
    drop(writer);

    // 1,000 distinct digests' entries (the genuine evidence under other digests' names: only
    // their size matters here), as a store holding 1,000 digests would.
    let mut items = Vec::new();
    for i in 0..1000 {
        let mut object = genuine.clone();
        let image = format!("{}/app@sha256:{i:064x}", lab.host);
        object["metadata"] = serde_json::json!({ "name": format!("size-{i:04}") });
        object["spec"]["image"] = image.into();
        items.push(object);
    }
    let list = serde_json::json!({ "apiVersion": "v1", "kind": "List", "items": items });
    kubectl_ok(
        &["create", "-f", "-"],
        Some(&serde_json::to_string(&list).unwrap()),
    );
    let text = kube::kubectl(&["get", "verifiedevidences", "-o", "json"]).stdout;
    let stored: Value = serde_json::from_str(&text).unwrap();
    let objects = stored["items"].as_array().unwrap();
    assert!(objects.len() >= 1001);
    let bytes: usize = objects
        .iter()
        .map(|o| serde_json::to_string(o).unwrap().len())
        .sum();
    // The stated bound: 16 KiB of evidence and 2 KiB of the rest per object.
    assert!(
        bytes <= objects.len() * (18 << 10),
        "{bytes} bytes for {} objects",
        objects.len()
    );
    println!(
        "store size: {} objects, {bytes} bytes as the API server returns them ({} per object)",
        objects.len(),
        bytes / objects.len()
    );

    // Past the object limit, the least recently used go; past the unused limit, all.
    let collector = scene.fixity(
        &lab,
        &[
            "--evidence-gc-secs",
            "1",
            "--evidence-max-objects",
            "100",
            "--evidence-lease",
            "store-gc-test",
        ],
    );
    let count = || {
        let text = kube::kubectl(&["get", "verifiedevidences", "-o", "name"]).stdout;
        text.lines().count()
    };
    assert!(
        poll(Duration::from_secs(30), || (count() <= 100).then_some(())).is_some(),
        "trimmed to 100: {}",
        count()
    );
    assert_eq!(
        collector.metric("fixity_evidence_store_objects"),
        count() as f64
    );
    drop(collector);
    std::thread::sleep(Duration::from_secs(2));
    let _collector = scene.fixity(
        &lab,
        &[
            "--evidence-gc-secs",
            "1",
            "--evidence-unused-secs",
            "1",
            "--evidence-lease",
            "store-gc-test",
        ],
    );
    assert!(
        poll(Duration::from_secs(30), || (count() == 0).then_some(())).is_some(),
        "unused entries deleted: {} left",
        count()
    );
}

#[test]
#[ignore = "needs a cluster: tests/e2e/run.sh"]
fn without_the_store_nothing_is_written() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::start();
    let key = lab.key("release");
    let scene = Scene::new("off", &lab, &key);
    let image = signed_image(&lab, &key, "unstored", true);
    let replica = scene.fixity(&lab, &["--evidence-store=false"]);
    admitted(&replica.review(&image));
    std::thread::sleep(Duration::from_secs(2));
    let text = kube::kubectl(&["get", "verifiedevidences", "-o", "json"]).stdout;
    assert!(!text.contains(&image), "{text}");
}
