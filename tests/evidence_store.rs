//! The evidence store through a real kube-apiserver (with etcd): fixity processes sharing
//! verified evidence as VerifiedEvidence objects, signatures made by the real `cosign` in a real
//! registry (`crane registry serve`) whose requests are counted. Run by `tests/e2e/run.sh` (the
//! cluster provides KUBECONFIG and kubectl); ignored by a plain `cargo test`.
//!
//! Attestation rules (signed in-toto statements made by the real `cosign attest`, CEL conditions)
//! go through the same store: their envelopes are kept beside the signature, checked again on
//! the way back.
//!
//! The store is cluster-wide and garbage collection deletes what any test wrote, so the tests
//! take turns.

mod common;

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use common::kube::{self, poll};
use common::registry::{Key, Lab};
use common::review::pod_review;
use common::{Fixity, http_get, tls_connector};
use serde_json::Value;

static TURN: Mutex<()> = Mutex::new(());

/// The tests' turn, a lab, a key named "release" and a scene (`test`) requiring it.
fn setup(test: &str) -> (MutexGuard<'static, ()>, Lab, Key, Scene) {
    let turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::start();
    let key = lab.key("release");
    let scene = Scene::new(test, &lab, &key);
    (turn, lab, key, scene)
}

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
    let (_turn, mut lab, key, scene) = setup("share");
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
    let (_turn, lab, key, scene) = setup("tamper");
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
    let (_turn, mut lab, key, scene) = setup("age");
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
    let (_turn, lab, key, scene) = setup("gc");
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
    let (_turn, lab, key, scene) = setup("off");
    let image = signed_image(&lab, &key, "unstored", true);
    let replica = scene.fixity(&lab, &["--evidence-store=false"]);
    admitted(&replica.review(&image));
    std::thread::sleep(Duration::from_secs(2));
    let text = kube::kubectl(&["get", "verifiedevidences", "-o", "json"]).stdout;
    assert!(!text.contains(&image), "{text}");
}

const BUILDER: &str = "https://fixity.test/release-builder";

/// The verify-rule fields (six spaces in) that require a provenance attestation, signed by the
/// rule's authorities, whose builder is `builder`.
fn provenance_required(builder: &str) -> String {
    format!(
        "      attestations:\n      - name: provenance\n        predicateType: slsaprovenance1\n        conditions:\n        - expression: predicate.runDetails.builder.id == '{builder}'\n          message: built by our builder\n"
    )
}

fn provenance(builder: &str) -> String {
    serde_json::json!({ "runDetails": { "builder": { "id": builder } } }).to_string()
}

/// A signed image with a provenance attestation by `builder`.
fn attested_image(lab: &Lab, key: &Key, tag: &str, classic: bool, builder: &str) -> String {
    let reference = signed_image(lab, key, tag, classic);
    lab.attest(
        key,
        &reference,
        "slsaprovenance1",
        &provenance(builder),
        classic,
    );
    reference
}

/// The entry for `image` once it holds an attestation item, and that item's index.
fn attested_entry(image: &str) -> (Value, usize) {
    poll(Duration::from_secs(10), || {
        let entry = entry(image);
        let at = entry["spec"]["items"]
            .as_array()?
            .iter()
            .position(|i| i["kind"] == "Attestation")?;
        Some((entry, at))
    })
    .unwrap_or_else(|| panic!("no attestation stored for {image}"))
}

#[test]
#[ignore = "needs a cluster: tests/e2e/run.sh"]
fn an_attestation_rule_is_answered_from_the_store_after_a_restart_and_in_an_outage() {
    let (_turn, mut lab, key, scene) = setup("attest");
    scene.set_policy(&lab, &key, &provenance_required(BUILDER));
    let bundle = attested_image(&lab, &key, "attested-bundle", false, BUILDER);
    let classic = attested_image(&lab, &key, "attested-classic", true, BUILDER);
    let unattested = signed_image(&lab, &key, "unattested", false);

    let first = scene.fixity(&lab, &[]);
    for image in [&bundle, &classic] {
        admitted(&first.review(image));
        let (entry, at) = attested_entry(image);
        let item = &entry["spec"]["items"][at];
        assert_eq!(item["predicateType"], "https://slsa.dev/provenance/v1");
        assert!(item["verifiedAt"].is_string(), "{item}");
        assert!(
            entry["spec"]["items"]
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i["kind"] == "Signature"),
            "the signature and the attestation share the object: {entry}"
        );
    }
    denied(&first.review(&unattested), "AttestationMissing");
    drop(first);

    // A restarted replica: the signature from the warm start, the attestation from the
    // store, and nothing asked of the registry.
    let before = lab.logged_requests();
    let restarted = scene.fixity(&lab, &[]);
    for image in [&bundle, &classic] {
        let response = restarted.review(image);
        admitted(&response);
        assert_eq!(
            response["auditAnnotations"]["evidence"], "stored",
            "{response}"
        );
    }
    assert_eq!(
        lab.logged_requests(),
        before,
        "the restarted replica asked the registry nothing"
    );
    assert_eq!(
        restarted.metric(r#"fixity_attestation_checks_total{lookup="store",result="satisfied"}"#),
        2.0
    );
    drop(restarted);

    // The registry down: stored attestations still admit; an image never attested does not.
    lab.stop_registry();
    let outage = scene.fixity(&lab, &[]);
    for image in [&bundle, &classic] {
        admitted(&outage.review(image));
    }
    let response = outage.review(&unattested);
    assert_eq!(response["allowed"], false, "{response}");
    assert!(
        outage.fixity.log().contains(r#""evidence":"stored""#),
        "the log line says the evidence was stored"
    );
}

#[test]
#[ignore = "needs a cluster: tests/e2e/run.sh"]
fn a_stored_attestation_tampered_with_or_failing_the_rule_is_not_used() {
    let (_turn, lab, key, scene) = setup("attest-tamper");
    scene.set_policy(&lab, &key, &provenance_required(BUILDER));
    let image = attested_image(&lab, &key, "attested-victim", false, BUILDER);
    let other = attested_image(&lab, &key, "attested-other", false, BUILDER);
    let writer = scene.fixity(&lab, &[]);
    admitted(&writer.review(&image));
    admitted(&writer.review(&other));
    let (genuine, at) = attested_entry(&image);
    let (other_entry, other_at) = attested_entry(&other);
    drop(writer);

    let item = &genuine["spec"]["items"][at];
    let bundle: Value = serde_json::from_str(item["bundle"].as_str().unwrap()).unwrap();
    let with_bundle = |bundle: &Value| {
        let mut spec = genuine["spec"].clone();
        spec["items"][at]["bundle"] = bundle.to_string().into();
        spec
    };
    let statement = {
        let payload = bundle["dsseEnvelope"]["payload"].as_str().unwrap();
        String::from_utf8(STANDARD.decode(payload).unwrap()).unwrap()
    };
    let with_statement = |text: String| {
        let mut forged = bundle.clone();
        forged["dsseEnvelope"]["payload"] = STANDARD.encode(text).into();
        with_bundle(&forged)
    };
    // The envelope's bytes: one character of its signature changed.
    let mut broken = bundle.clone();
    let sig = broken["dsseEnvelope"]["signatures"][0]["sig"]
        .as_str()
        .unwrap()
        .to_owned();
    let flipped = if sig.starts_with('M') { "N" } else { "M" };
    broken["dsseEnvelope"]["signatures"][0]["sig"] = format!("{flipped}{}", &sig[1..]).into();
    // The subject: another image's genuine attestation under this image's entry.
    let mut swapped = genuine["spec"].clone();
    swapped["items"][at] = other_entry["spec"]["items"][other_at].clone();
    // The predicate type, in the statement (whose signature then breaks) and in the item.
    let retyped = statement.replace(
        "https://slsa.dev/provenance/v1",
        "https://fixity.test/other/v1",
    );
    assert_ne!(retyped, statement);
    let mut item_retyped = genuine["spec"].clone();
    item_retyped["items"][at]["predicateType"] = "https://fixity.test/other/v1".into();

    for (case, spec, outcome) in [
        ("envelope bytes", with_bundle(&broken), "refused"),
        ("subject digest", swapped, "refused"),
        (
            "statement predicate type",
            with_statement(retyped),
            "refused",
        ),
        ("item predicate type", item_retyped, "missing"),
    ] {
        overwrite(&entry(&image), spec);
        let before = lab.logged_requests();
        let reader = scene.fixity(&lab, &[]);
        admitted(&reader.review(&image));
        assert!(
            lab.logged_requests() > before,
            "{case}: verified again from the registry"
        );
        assert_eq!(
            reader.metric(&format!(
                r#"fixity_evidence_store_total{{outcome="{outcome}"}}"#
            )),
            1.0,
            "{case}: the stored attestation was not used"
        );
        assert_eq!(
            reader.metric(r#"fixity_attestation_checks_total{lookup="miss",result="satisfied"}"#),
            1.0,
            "{case}: satisfied from the registry"
        );
        // The registry's envelope replaces the tampered item.
        let restored = poll(Duration::from_secs(10), || {
            let (now, now_at) = attested_entry(&image);
            let item = &now["spec"]["items"][now_at];
            (item["bundle"] == genuine["spec"]["items"][at]["bundle"]).then_some(())
        });
        assert!(
            restored.is_some(),
            "{case}: the attestation was written again"
        );
    }

    // A rule changed so that the stored envelope fails its condition: not used, and the
    // registry's newer attestation that meets it is stored instead.
    let builder = "https://fixity.test/new-builder";
    scene.set_policy(&lab, &key, &provenance_required(builder));
    let stale_rule = lab.logged_requests();
    let reader = scene.fixity(&lab, &[]);
    // Until the new policy is in force, the old envelope may still answer.
    let response = poll(Duration::from_secs(20), || {
        let r = reader.review(&image);
        (r["allowed"] == false).then_some(r)
    })
    .expect("the changed condition no longer admits the stored envelope");
    denied(&response, "built by our builder");
    assert!(lab.logged_requests() > stale_rule, "the registry was asked");
    lab.attest(&key, &image, "slsaprovenance1", &provenance(builder), false);
    let response = poll(Duration::from_secs(40), || {
        let r = reader.review(&image);
        (r["allowed"] == true).then_some(r)
    })
    .expect("the new attestation from the registry admits the image");
    admitted(&response);
    let rewritten = poll(Duration::from_secs(10), || {
        let (now, now_at) = attested_entry(&image);
        let item = &now["spec"]["items"][now_at];
        let bundle: Value = serde_json::from_str(item["bundle"].as_str()?).ok()?;
        let payload = bundle["dsseEnvelope"]["payload"].as_str()?;
        let text = String::from_utf8(STANDARD.decode(payload).ok()?).ok()?;
        text.contains(builder).then_some(())
    });
    assert!(
        rewritten.is_some(),
        "the attestation that meets the rule is stored"
    );
}

#[test]
#[ignore = "needs a cluster: tests/e2e/run.sh"]
fn a_signature_and_several_attestations_written_at_once_all_stay() {
    let (_turn, lab, key, scene) = setup("attest-many");
    let rules: String = ["slsaprovenance1", "vuln", "https://fixity.test/review/v1"]
        .iter()
        .enumerate()
        .map(|(i, kind)| format!("      - name: a{i}\n        predicateType: {kind}\n"))
        .collect();
    scene.set_policy(&lab, &key, &format!("      attestations:\n{rules}"));
    let image = signed_image(&lab, &key, "attested-thrice", false);
    for kind in ["slsaprovenance1", "vuln", "https://fixity.test/review/v1"] {
        lab.attest(&key, &image, kind, &provenance(BUILDER), false);
    }
    let writer = scene.fixity(&lab, &[]);
    admitted(&writer.review(&image));
    // The signature and the three rules' attestations land in one object at about the same
    // time: every item stays (the rules' in one write, each writer keeping the others').
    let all = poll(Duration::from_secs(10), || {
        let entry = entry(&image);
        let items = entry["spec"]["items"].as_array()?;
        let mut kinds: Vec<String> = items
            .iter()
            .map(|i| {
                i["predicateType"]
                    .as_str()
                    .unwrap_or("signature")
                    .to_owned()
            })
            .collect();
        kinds.sort();
        (kinds.len() == 4).then_some(kinds)
    });
    assert_eq!(
        all,
        Some(vec![
            "https://cosign.sigstore.dev/attestation/vuln/v1".to_owned(),
            "https://fixity.test/review/v1".to_owned(),
            "https://slsa.dev/provenance/v1".to_owned(),
            "signature".to_owned(),
        ]),
        "{}",
        entry(&image)
    );
    assert_eq!(
        writer.metric(r#"fixity_evidence_store_total{outcome="written"}"#),
        4.0
    );
}
