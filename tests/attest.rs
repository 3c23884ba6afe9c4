//! Attestations end to end inside fixity: images in a real registry, attested by the real
//! `cosign attest` (bundle and classic formats, `--type slsaprovenance1`, `vuln`, `spdxjson` and
//! a type of our own), with predicates written here; policies with CEL conditions; reviews
//! answered by the webhook's router, `fixity verify` and `fixity check`.

mod common;

use std::time::Duration;

use common::registry::{Key, Lab};
use common::review::{message, pod_review, pod_review_of, policy_yaml, post, state};
use fixity::policy::files;
use serde_json::Value;

const OUR_BUILDER: &str =
    "https://github.com/acme/app/.github/workflows/release.yml@refs/heads/main";
const OUR_TYPE: &str = "https://fixity.test/review/v1";

/// An SLSA v1 provenance predicate, as GitHub's builder writes it, built by `builder`.
fn provenance(builder: &str) -> String {
    serde_json::json!({
        "buildDefinition": {
            "buildType": "https://actions.github.io/buildtypes/workflow/v1",
            "externalParameters": {
                "workflow": {
                    "repository": "https://github.com/acme/app",
                    "path": ".github/workflows/release.yml",
                    "ref": "refs/heads/main",
                },
            },
        },
        "runDetails": { "builder": { "id": builder } },
    })
    .to_string()
}

/// A cosign vulnerability predicate finished at `finished` (RFC 3339), whose Trivy result
/// lists these (id, severity) findings.
fn scan(finished: &str, findings: &[(&str, &str)]) -> String {
    let vulnerabilities: Vec<Value> = findings
        .iter()
        .map(|(id, severity)| serde_json::json!({"VulnerabilityID": id, "Severity": severity}))
        .collect();
    serde_json::json!({
        "invocation": { "uri": "https://github.com/acme/app/actions/runs/1" },
        "scanner": {
            "uri": "pkg:github/aquasecurity/trivy",
            "version": "0.58.0",
            "db": { "uri": "", "version": "" },
            "result": { "Results": [ { "Target": "app", "Vulnerabilities": vulnerabilities } ] },
        },
        "metadata": { "scanStartedOn": finished, "scanFinishedOn": finished },
    })
    .to_string()
}

fn rfc3339(at: std::time::SystemTime) -> String {
    let secs = at.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

fn days_ago(days: u64) -> String {
    rfc3339(std::time::SystemTime::now() - Duration::from_secs(days * 86_400))
}

const BUILT_BY_US: &str = "      - name: provenance
        predicateType: slsaprovenance1
        conditions:
          - expression: predicate.runDetails.builder.id == 'https://github.com/acme/app/.github/workflows/release.yml@refs/heads/main'
            message: built by our release workflow
          - expression: predicate.buildDefinition.externalParameters.workflow.repository == 'https://github.com/acme/app'
            message: built from our repository
";

const SCANNED: &str = "      - name: scan
        predicateType: vuln
        conditions:
          - expression: now - timestamp(predicate.metadata.scanFinishedOn) < duration('168h')
            message: scanned within 7 days
          - expression: predicate.scanner.result.Results.all(r, !has(r.Vulnerabilities) || r.Vulnerabilities.all(v, v.Severity != 'CRITICAL'))
            message: no CRITICAL vulnerability
";

/// `key`'s signature and these attestations (YAML list items) required on the lab's images.
fn policy(lab: &Lab, key: &Key, attestations: &str) -> String {
    format!(
        "{}      attestations:\n{attestations}",
        policy_yaml(&lab.host, key, "")
    )
}

/// Only attestations required, no image signature; `AUTHORITY` in `attestations` stands for
/// `key` as an attestation's own authority.
fn attestations_only(lab: &Lab, key: &Key, attestations: &str) -> String {
    let pem: String = key
        .public_pem
        .lines()
        .map(|l| format!("                {l}\n"))
        .collect();
    let authority = format!("authorities:\n          - key:\n              publicKey: |\n{pem}");
    format!(
        "apiVersion: fixity.dev/v1alpha1\nkind: ImmutabilityPolicy\nmetadata: {{name: attested}}\nspec:\n  images:\n    verify:\n    - images: ['{}/**']\n      attestations:\n{}",
        lab.host,
        attestations.replace("AUTHORITY\n", &authority)
    )
}

async fn review(lab: &Lab, text: &str, image: &str) -> Value {
    let policies = files::parse(std::path::Path::new("p.yaml"), text).unwrap();
    let state = state(policies, lab.options(), Duration::from_secs(10));
    post(&state, pod_review(image)).await
}

fn denied_with(r: &Value, reason: &str, says: &[&str]) {
    assert_eq!(r["allowed"], false, "{r}");
    let m = message(r);
    assert!(m.contains(reason), "{reason} not in {m}");
    for s in says {
        assert!(m.contains(s), "{s:?} not in {m}");
    }
}

fn signed_image(lab: &Lab, key: &Key, tag: &str) -> String {
    let reference = lab.reference("acme/app", &lab.push_image("acme/app", tag, tag));
    lab.sign(key, &reference, false, &[]);
    reference
}

#[tokio::test]
async fn provenance_from_our_builder_is_admitted_and_another_builder_is_denied() {
    let lab = Lab::start();
    let key = lab.key("release");
    let text = policy(&lab, &key, BUILT_BY_US);

    let ours = signed_image(&lab, &key, "ours");
    lab.attest(
        &key,
        &ours,
        "slsaprovenance1",
        &provenance(OUR_BUILDER),
        false,
    );
    let r = review(&lab, &text, &ours).await;
    assert_eq!(r["allowed"], true, "{r}");

    let theirs = signed_image(&lab, &key, "theirs");
    let evil = "https://github.com/evil/fork/.github/workflows/release.yml@refs/heads/main";
    lab.attest(&key, &theirs, "slsaprovenance1", &provenance(evil), false);
    let r = review(&lab, &text, &theirs).await;
    denied_with(
        &r,
        "AttestationConditionFailed",
        &[
            "built by our release workflow",
            &format!("saw predicate.runDetails.builder.id = \"{evil}\""),
            "signed by key sha256:",
        ],
    );

    // The classic `.att` format holds to the same rule.
    let classic = signed_image(&lab, &key, "classic");
    lab.attest(
        &key,
        &classic,
        "slsaprovenance1",
        &provenance(OUR_BUILDER),
        true,
    );
    let r = review(&lab, &text, &classic).await;
    assert_eq!(r["allowed"], true, "{r}");
}

#[tokio::test]
async fn a_stale_scan_and_a_critical_finding_are_denied() {
    let lab = Lab::start();
    let key = lab.key("release");
    let text = policy(&lab, &key, SCANNED);

    let fresh = signed_image(&lab, &key, "fresh");
    let findings = [("CVE-2025-0001", "LOW"), ("CVE-2025-0002", "HIGH")];
    lab.attest(&key, &fresh, "vuln", &scan(&days_ago(1), &findings), true);
    let r = review(&lab, &text, &fresh).await;
    assert_eq!(r["allowed"], true, "{r}");

    let stale = signed_image(&lab, &key, "stale");
    lab.attest(&key, &stale, "vuln", &scan(&days_ago(9), &findings), true);
    let r = review(&lab, &text, &stale).await;
    denied_with(&r, "AttestationConditionFailed", &["scanned within 7 days"]);

    let critical = signed_image(&lab, &key, "critical");
    let findings = [("CVE-2025-0001", "LOW"), ("CVE-2025-0003", "CRITICAL")];
    lab.attest(
        &key,
        &critical,
        "vuln",
        &scan(&days_ago(1), &findings),
        false,
    );
    let r = review(&lab, &text, &critical).await;
    denied_with(
        &r,
        "AttestationConditionFailed",
        &["no CRITICAL vulnerability", "CVE-2025-0003", "\"CRITICAL\""],
    );
}

/// A new image attested with `predicate` (a bundle), the bundle then edited by someone with
/// write access to the repository, and the image signed. (Attested before it is signed, so
/// that the attestation's bundle is the first referrer, the one the lab edits.)
fn edited_then_signed(
    lab: &Lab,
    key: &Key,
    tag: &str,
    predicate: &str,
    edit: impl FnOnce(&mut Value),
) -> String {
    let reference = lab.reference("acme/app", &lab.push_image("acme/app", tag, tag));
    lab.attest(key, &reference, "slsaprovenance1", predicate, false);
    let (mut bundle, _) = lab.bundle(&reference);
    edit(&mut bundle);
    lab.replace_bundle(&reference, &bundle);
    lab.sign(key, &reference, false, &[]);
    reference
}

#[tokio::test]
async fn what_is_not_a_trusted_attestation_of_the_type_for_the_digest_is_missing() {
    let lab = Lab::start();
    let key = lab.key("release");
    let intruder = lab.key("intruder");
    let text = policy(&lab, &key, BUILT_BY_US);
    let good = provenance(OUR_BUILDER);

    // Only an SBOM: a signed attestation of another type never satisfies the rule.
    let sbom_only = signed_image(&lab, &key, "sbom-only");
    let sbom =
        r#"{"spdxVersion":"SPDX-2.3","SPDXID":"SPDXRef-DOCUMENT","name":"app","packages":[]}"#;
    lab.attest(&key, &sbom_only, "spdxjson", sbom, false);
    let r = review(&lab, &text, &sbom_only).await;
    denied_with(
        &r,
        "AttestationMissing",
        &["https://spdx.dev/Document, not"],
    );

    // About another digest: the provenance of image B, copied under image A's `.att` tag.
    let other = signed_image(&lab, &key, "other");
    lab.attest(&key, &other, "slsaprovenance1", &good, true);
    let copied = signed_image(&lab, &key, "copied");
    let att = |reference: &str| {
        let (repo, digest) = reference.split_once('@').unwrap();
        format!("{repo}:{}.att", digest.replace(':', "-"))
    };
    lab.crane(&["copy", &att(&other), &att(&copied)]);
    let r = review(&lab, &text, &copied).await;
    let other_digest = other.rsplit_once('@').unwrap().1;
    denied_with(
        &r,
        "AttestationMissing",
        &[&format!("ignored: its subject is {}", &other_digest[..20])],
    );

    // Signed by a key the policy does not trust.
    let untrusted = signed_image(&lab, &key, "untrusted");
    lab.attest(&intruder, &untrusted, "slsaprovenance1", &good, false);
    let r = review(&lab, &text, &untrusted).await;
    denied_with(
        &r,
        "AttestationMissing",
        &["not signed by a trusted authority"],
    );

    // A broken signature: the predicate edited to name our builder after signing.
    let evil = "https://github.com/evil/fork/.github/workflows/release.yml@refs/heads/main";
    let tampered = edited_then_signed(&lab, &key, "tampered", &provenance(evil), |bundle| {
        let b64 = &base64::engine::general_purpose::STANDARD;
        let payload = bundle["dsseEnvelope"]["payload"].as_str().unwrap();
        let statement = String::from_utf8(base64::Engine::decode(b64, payload).unwrap())
            .unwrap()
            .replace(evil, OUR_BUILDER);
        bundle["dsseEnvelope"]["payload"] = base64::Engine::encode(b64, statement).into();
    });
    let r = review(&lab, &text, &tampered).await;
    denied_with(
        &r,
        "AttestationMissing",
        &["not signed by a trusted authority"],
    );

    // An envelope nobody signed.
    let unsigned = edited_then_signed(&lab, &key, "unsigned", &good, |bundle| {
        bundle["dsseEnvelope"]["signatures"] = serde_json::json!([]);
    });
    let r = review(&lab, &text, &unsigned).await;
    denied_with(&r, "AttestationMissing", &["unreadable Sigstore bundle"]);

    // A signature, and no attestation at all.
    let bare = signed_image(&lab, &key, "bare");
    let r = review(&lab, &text, &bare).await;
    denied_with(
        &r,
        "AttestationMissing",
        &["no trusted attestation of https://slsa.dev/provenance/v1"],
    );
    assert!(!message(&r).contains("UnsignedImage"), "{r}");
}

#[tokio::test]
async fn an_attestation_is_no_signature_and_a_signature_no_attestation() {
    let lab = Lab::start();
    let key = lab.key("release");
    let text = policy(&lab, &key, BUILT_BY_US);
    let attested = lab.reference("acme/app", &lab.push_image("acme/app", "v1", "attested"));
    lab.attest(
        &key,
        &attested,
        "slsaprovenance1",
        &provenance(OUR_BUILDER),
        false,
    );
    let r = review(&lab, &text, &attested).await;
    denied_with(&r, "UnsignedImage", &["not a signature"]);
    assert!(!message(&r).contains("Attestation"), "{r}");

    // cosign's own signing statement is refused as an attestation type.
    let signing = policy(
        &lab,
        &key,
        "      - name: signed\n        predicateType: https://sigstore.dev/cosign/sign/v1\n",
    );
    let refused = files::parse(std::path::Path::new("p.yaml"), &signing).unwrap_err();
    assert!(
        refused.to_string().contains("not an attestation"),
        "{refused}"
    );
}

#[tokio::test]
async fn a_condition_that_errors_denies_with_the_error() {
    let lab = Lab::start();
    let key = lab.key("release");
    let text = policy(
        &lab,
        &key,
        "      - name: provenance
        predicateType: slsaprovenance1
        conditions:
          - expression: predicate.runDetails.metadata.invocationId.startsWith('https://github.com/acme/')
            message: run in our organisation
",
    );
    let image = signed_image(&lab, &key, "v1");
    lab.attest(
        &key,
        &image,
        "slsaprovenance1",
        &provenance(OUR_BUILDER),
        false,
    );
    let r = review(&lab, &text, &image).await;
    denied_with(
        &r,
        "AttestationConditionFailed",
        &[
            "\"run in our organisation\" could not be evaluated",
            "metadata",
        ],
    );
}

/// A type of our own, required without any image signature, signed by the attestation's own
/// authority; and an SBOM that only has to exist.
#[tokio::test]
async fn attestations_alone_with_their_own_signers_and_types_of_our_own() {
    let lab = Lab::start();
    let key = lab.key("reviewer");
    let text = attestations_only(
        &lab,
        &key,
        &format!(
            "      - name: reviewed
        predicateType: {OUR_TYPE}
        AUTHORITY
        conditions:
          - expression: predicate.approvals.exists(a, a.team == 'security')
            message: approved by security
      - name: sbom
        predicateType: spdxjson
        AUTHORITY
"
        ),
    );
    let image = lab.reference("acme/app", &lab.push_image("acme/app", "v1", "own"));
    let sbom =
        r#"{"spdxVersion":"SPDX-2.3","SPDXID":"SPDXRef-DOCUMENT","name":"app","packages":[]}"#;
    lab.attest(&key, &image, "spdxjson", sbom, true);
    let approved = r#"{"approvals":[{"team":"platform"},{"team":"security"}]}"#;
    lab.attest(&key, &image, OUR_TYPE, approved, false);
    let r = review(&lab, &text, &image).await;
    assert_eq!(r["allowed"], true, "{r}");

    let unreviewed = lab.reference("acme/app", &lab.push_image("acme/app", "v2", "unreviewed"));
    lab.attest(&key, &unreviewed, "spdxjson", sbom, false);
    let r = review(&lab, &text, &unreviewed).await;
    denied_with(&r, "AttestationMissing", &[OUR_TYPE]);
    assert!(!message(&r).contains("spdx.dev"), "{r}");
}

#[test]
fn fixity_verify_explains_each_attestation_rule_and_check_evaluates_them() {
    let lab = Lab::start();
    let key = lab.key("release");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.yaml");
    std::fs::write(
        &path,
        policy(&lab, &key, &format!("{BUILT_BY_US}{SCANNED}")),
    )
    .unwrap();
    let image = signed_image(&lab, &key, "v1");
    lab.attest(
        &key,
        &image,
        "slsaprovenance1",
        &provenance(OUR_BUILDER),
        false,
    );
    let findings = [("CVE-2025-0003", "CRITICAL")];
    lab.attest(&key, &image, "vuln", &scan(&days_ago(1), &findings), true);

    let out = std::process::Command::new(common::BIN)
        .args(["verify", &image, "--policy", path.to_str().unwrap()])
        .args(["--insecure-registry", &lab.host])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    for line in [
        "attestation \"provenance\" (https://slsa.dev/provenance/v1):",
        "condition: built by our release workflow (predicate.runDetails.builder.id == ",
        "satisfied by bundle sha256:",
        "attestation \"scan\" (https://cosign.sigstore.dev/attestation/vuln/v1):",
        "CONDITION FAILED on sha256-",
        "no CRITICAL vulnerability",
        "CVE-2025-0003",
    ] {
        assert!(text.contains(line), "{line:?} not in\n{text}");
    }

    let manifest = dir.path().join("pod.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: app, namespace: shop}}\nspec:\n  containers:\n  - name: app\n    image: {image}\n"
        ),
    )
    .unwrap();
    let out = std::process::Command::new(common::BIN)
        .args(["check", manifest.to_str().unwrap()])
        .args(["--policy", path.to_str().unwrap()])
        .args(["--insecure-registry", &lab.host])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("AttestationConditionFailed") && text.contains("no CRITICAL vulnerability"),
        "{text}"
    );
    assert!(!text.contains("UnsignedImage"), "{text}");
}

/// The README's examples are policies fixity accepts, with the conditions the tests above hold
/// to real attestations.
#[test]
fn the_readme_examples_load() {
    let readme = include_str!("../README.md");
    let example = readme
        .split("```yaml\n")
        .find(|block| block.contains("name: attested"))
        .and_then(|block| block.split("```").next())
        .expect("the README's attestation example");
    let policies = files::parse(std::path::Path::new("README.md"), example).unwrap();
    let names: Vec<&str> = policies[0].verify[0]
        .attestations
        .iter()
        .map(|a| a.rule.name.as_str())
        .collect();
    assert_eq!(names, ["provenance", "scan", "sbom"]);
    for (expression, tested) in [
        ("predicate.runDetails.builder.id ==", BUILT_BY_US),
        (
            "predicate.buildDefinition.externalParameters.workflow.repository ==",
            BUILT_BY_US,
        ),
        (
            "now - timestamp(predicate.metadata.scanFinishedOn) < duration(",
            SCANNED,
        ),
        ("r.Vulnerabilities.all(v, v.Severity != ", SCANNED),
    ] {
        assert!(
            example.contains(expression) && tested.contains(expression),
            "{expression}"
        );
    }
}

/// One image, one signature and two attestations (provenance and scan), in either format:
/// the registry requests of the first review, counted at the registry, and of the second,
/// answered from the cache.
#[tokio::test]
async fn one_signature_and_two_attestations_cost_few_requests_cold_and_none_warm() {
    let lab = Lab::start();
    let key = lab.key("release");
    let text = policy(&lab, &key, &format!("{BUILT_BY_US}{SCANNED}"));
    let policies = files::parse(std::path::Path::new("p.yaml"), &text).unwrap();
    let state = state(policies, lab.options(), Duration::from_secs(10));
    for classic in [false, true] {
        let tag = if classic { "classic" } else { "bundle" };
        let image = lab.reference("acme/app", &lab.push_image("acme/app", tag, tag));
        lab.sign(&key, &image, classic, &[]);
        lab.attest(
            &key,
            &image,
            "slsaprovenance1",
            &provenance(OUR_BUILDER),
            classic,
        );
        let scanned = scan(&days_ago(1), &[("CVE-2025-0001", "LOW")]);
        lab.attest(&key, &image, "vuln", &scanned, classic);

        let before = lab.logged_requests();
        let r = post(&state, pod_review(&image)).await;
        assert_eq!(r["allowed"], true, "{r}");
        let cold = lab.logged_requests() - before;
        let r = post(&state, pod_review(&image)).await;
        assert_eq!(r["allowed"], true, "{r}");
        let warm = lab.logged_requests() - before - cold;
        println!(
            "{tag}: one signature and two attestations: {cold} registry requests cold, {warm} warm"
        );
        assert_eq!(
            warm, 0,
            "{tag}: the second review is answered from the cache"
        );
        // Bundles: the signature lookup reads the .sig tag (none), the referrers API (absent
        // here) and tag, three referrer manifests and the signature's bundle; the attestation
        // lookup, running at the same time in a session of its own, shares that listing and
        // those manifests and reads only its two bundles (9; 13 or 14 when it read them again).
        // Classic: the .sig and .att manifests and their layers, and the referrers lookups.
        assert!(cold <= 9, "{tag}: {cold} requests");
    }
}

/// Not a correctness test: prints fixity's review of an image needing one signature and two
/// attestations, cold (a new checker: empty cache) and cached, against `cosign verify` plus
/// `cosign verify-attestation` of each type, of the same image, in the same run. Run with
/// `cargo test --release --test attest -- --ignored --nocapture timing`.
#[tokio::test]
#[ignore = "measurement, not a check"]
async fn timing_against_cosign_verify_attestation() {
    use std::time::Instant;
    let lab = Lab::start();
    let key = lab.key("release");
    let text = policy(&lab, &key, &format!("{BUILT_BY_US}{SCANNED}"));
    let public = lab.path().join("key-release/cosign.pub");
    let cosign = |args: &[&str]| {
        let started = Instant::now();
        common::registry::run(lab.path(), "cosign", args);
        started.elapsed()
    };
    let (mut cold, mut cached, mut theirs) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..5 {
        let tag = format!("timing-{round}");
        let image = lab.reference("acme/app", &lab.push_image("acme/app", &tag, &tag));
        lab.sign(&key, &image, false, &[]);
        lab.attest(
            &key,
            &image,
            "slsaprovenance1",
            &provenance(OUR_BUILDER),
            false,
        );
        let scanned = scan(&days_ago(1), &[("CVE-2025-0001", "LOW")]);
        lab.attest(&key, &image, "vuln", &scanned, false);

        let policies = files::parse(std::path::Path::new("p.yaml"), &text).unwrap();
        let state = state(policies, lab.options(), Duration::from_secs(10));
        let started = Instant::now();
        let r = post(&state, pod_review(&image)).await;
        cold.push(started.elapsed());
        assert_eq!(r["allowed"], true, "{r}");
        let started = Instant::now();
        let r = post(&state, pod_review(&image)).await;
        cached.push(started.elapsed());
        assert_eq!(r["allowed"], true, "{r}");

        let key_arg = public.to_str().unwrap();
        let common = [
            "--key",
            key_arg,
            "--insecure-ignore-tlog=true",
            "--allow-http-registry",
        ];
        let mut each = vec![cosign(&[&["verify"][..], &common, &[&image]].concat())];
        for kind in ["slsaprovenance1", "vuln"] {
            let args = [
                &["verify-attestation", "--type", kind][..],
                &common,
                &[&image],
            ];
            each.push(cosign(&args.concat()));
        }
        theirs.push(each.iter().sum());
        println!(
            "round {round}: fixity cold {:?}, cached {:?}; cosign verify + 2 verify-attestation {:?} ({each:?})",
            cold[round], cached[round], theirs[round]
        );
    }
    for v in [&mut cold, &mut cached, &mut theirs] {
        v.sort();
    }
    println!(
        "median of 5: fixity cold {:?} ({:.3} of cosign), cached {:?} ({:.5} of cosign); cosign {:?}",
        cold[2],
        cold[2].as_secs_f64() / theirs[2].as_secs_f64(),
        cached[2],
        cached[2].as_secs_f64() / theirs[2].as_secs_f64(),
        theirs[2]
    );
}

/// A predicate is read up to 4 MiB: a larger attestation layer is passed over unread, and the
/// image lacks the attestation (a hostile registry can serve a gigabyte).
#[tokio::test]
async fn an_attestation_larger_than_the_limit_is_not_read() {
    let lab = Lab::start();
    let key = lab.key("release");
    let text = policy(&lab, &key, BUILT_BY_US);
    let image = lab.reference("acme/app", &lab.push_image("acme/app", "huge", "huge"));
    lab.sign(&key, &image, true, &[]);
    let envelope = vec![b' '; 5 << 20];
    let layer = lab.put_blob("acme/app", &envelope);
    let config = lab.put_blob("acme/app", b"{}");
    let (repo, digest) = image.split_once('@').unwrap();
    lab.put_manifest(
        &format!("{repo}:{}.att", digest.replace(':', "-")),
        &serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 2},
            "layers": [{
                "mediaType": "application/vnd.dsse.envelope.v1+json",
                "digest": layer,
                "size": envelope.len(),
                "annotations": {"predicateType": "https://slsa.dev/provenance/v1"},
            }],
        }),
    );
    let r = review(&lab, &text, &image).await;
    denied_with(&r, "AttestationMissing", &["larger than 4 MiB"]);
    let log = std::fs::read_to_string(lab.path().join("registry.log")).unwrap();
    let blob_reads = log
        .lines()
        .filter(|l| l.contains(&format!("GET /v2/acme/app/blobs/{layer}")))
        .count();
    assert_eq!(blob_reads, 0, "the large layer was fetched");
}

/// A review whose images need 22 signature checks and 44 attestation checks (a signature and
/// two attestations each): each kind alone is within the 64 checks fixity makes for one
/// request, their sum is not, so none is made and each image is denied with the reason. One
/// image fewer (63 checks) is checked as ever.
#[tokio::test]
async fn signatures_and_attestations_count_together_against_the_check_limit() {
    let lab = Lab::start();
    let key = lab.key("release");
    let text = policy(&lab, &key, &format!("{BUILT_BY_US}{SCANNED}"));
    let policies = files::parse(std::path::Path::new("p.yaml"), &text).unwrap();
    let state = state(policies, lab.options(), Duration::from_secs(10));
    let image = signed_image(&lab, &key, "v1");
    let digest = image.rsplit_once('@').unwrap().1;
    let images: Vec<String> = (0..22)
        .map(|i| format!("{}/shop/app{i}@{digest}", lab.host))
        .collect();
    let before = lab.logged_requests();
    let r = post(&state, pod_review_of(&images)).await;
    denied_with(
        &r,
        "UnsignedImage",
        &[
            "AttestationMissing",
            "needs 66 signature and attestation checks, more than the 64",
        ],
    );
    assert_eq!(lab.logged_requests(), before, "the registry was not asked");

    let r = post(&state, pod_review_of(&images[..21])).await;
    denied_with(&r, "UnsignedImage", &["no signatures found"]);
    assert!(!message(&r).contains("more than the 64"), "{r}");
    assert!(lab.logged_requests() > before);
}
