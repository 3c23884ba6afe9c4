//! Evidence kept by the evidence store, checked again on the way back: real signatures made by
//! the real `cosign` CLI in a real registry (`crane registry serve`), read back with the
//! registry stopped. What the store hands back is untrusted input: a changed payload, signature
//! or digest, or a key rotated in the policy, makes the entry useless. The same holds for stored
//! attestations, and for a condition the stored statement no longer meets.

mod common;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use common::registry::{Key, Lab};
use fixity::image::ImageReference;
use fixity::verify::attest::conditions::Condition;
use fixity::verify::{
    AttestationCheck, AttestationRule, Authority, EvidenceSource, SignatureFormat, Verifier,
    VerifyError,
};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

fn key_authority(key: &Key) -> Authority {
    Authority::Key {
        public_key_pem: key.public_pem.clone(),
        requirements: Default::default(),
    }
}

/// A signed image, its verification, and the lab (registry still running).
async fn verified(classic: bool) -> (Lab, Key, ImageReference, EvidenceSource) {
    let lab = Lab::start();
    let digest = lab.push_image("app", "v1", &format!("stored-{classic}"));
    let reference = lab.reference("app", &digest);
    let key = lab.key("trusted");
    lab.sign(&key, &reference, classic, &[]);
    let image = ImageReference::parse(&reference).unwrap();
    let verifier = Verifier::new(lab.options()).unwrap();
    let first = verifier
        .verify(&image, &[key_authority(&key)])
        .await
        .unwrap();
    assert!(first.registry_requests > 0);
    assert_eq!(first.evidence.len(), 1, "one signature was counted");
    let evidence = first.evidence.into_iter().next().unwrap();
    (lab, key, image, evidence)
}

#[tokio::test]
async fn stored_evidence_verifies_again_with_the_registry_gone() {
    for classic in [true, false] {
        let (mut lab, key, image, evidence) = verified(classic).await;
        let before = lab.logged_requests();
        lab.stop_registry();
        let verifier = Verifier::new(lab.options()).unwrap();
        let again = verifier
            .verify_stored(&image, &[key_authority(&key)], 1, &[evidence])
            .unwrap_or_else(|e| panic!("classic={classic}: {e}"));
        assert_eq!(again.registry_requests, 0);
        let format = if classic {
            SignatureFormat::SignatureTag
        } else {
            SignatureFormat::Bundle
        };
        assert_eq!(again.format, format);
        assert_eq!(
            lab.logged_requests(),
            before,
            "nothing was asked of the registry"
        );
        // With the registry gone, the registry path is unavailable, as before the store.
        let asked = verifier.verify(&image, &[key_authority(&key)]).await;
        assert!(
            matches!(asked, Err(VerifyError::Unavailable(_))),
            "{asked:?}"
        );
    }
}

fn refused(
    verifier: &Verifier,
    image: &ImageReference,
    key: &Key,
    evidence: EvidenceSource,
) -> String {
    match verifier.verify_stored(image, &[key_authority(key)], 1, &[evidence]) {
        Ok(v) => panic!("tampered evidence was accepted: {v:?}"),
        Err(e) => e.to_string(),
    }
}

/// Flips one base64 character of a signature so it still decodes.
fn flip(b64: &str) -> String {
    let mut bytes = STANDARD.decode(b64).unwrap();
    bytes[8] ^= 1;
    STANDARD.encode(bytes)
}

#[tokio::test]
async fn a_classic_entry_tampered_with_is_refused() {
    let (lab, key, image, evidence) = verified(true).await;
    let verifier = Verifier::new(lab.options()).unwrap();
    let EvidenceSource::SimpleSigning {
        annotations,
        payload,
    } = evidence.clone()
    else {
        panic!("a classic signature: {evidence:?}");
    };

    // The payload: another digest written in, the signature left as it was.
    let text = String::from_utf8(payload.clone()).unwrap();
    let other = format!("sha256:{}", "1".repeat(64));
    let digest = image.digest().unwrap().to_string();
    let forged = text.replace(&digest, &other);
    assert_ne!(forged, text);
    let why = refused(
        &verifier,
        &ImageReference::parse(&format!("{}/app@{other}", lab.host)).unwrap(),
        &key,
        EvidenceSource::SimpleSigning {
            annotations: annotations.clone(),
            payload: forged.into_bytes(),
        },
    );
    assert!(why.contains("does not verify"), "{why}");

    // The signature.
    let mut bad = annotations.clone();
    let signature = bad.get_mut("dev.cosignproject.cosign/signature").unwrap();
    *signature = flip(signature);
    let why = refused(
        &verifier,
        &image,
        &key,
        EvidenceSource::SimpleSigning {
            annotations: bad,
            payload: payload.clone(),
        },
    );
    assert!(why.contains("does not verify"), "{why}");

    // The digest: genuine evidence of this image, offered for another one.
    let why = refused(
        &verifier,
        &ImageReference::parse(&format!("{}/app@{other}", lab.host)).unwrap(),
        &key,
        evidence.clone(),
    );
    assert!(why.contains(&format!("not {other}")), "{why}");
}

#[tokio::test]
async fn a_bundle_entry_tampered_with_is_refused() {
    let (lab, key, image, evidence) = verified(false).await;
    let verifier = Verifier::new(lab.options()).unwrap();
    let EvidenceSource::Bundle(bytes) = evidence.clone() else {
        panic!("a bundle: {evidence:?}");
    };
    let bundle: serde_json::Value = serde_json::from_slice(&bytes).unwrap();

    // The signature of the DSSE envelope.
    let mut bad = bundle.clone();
    let sig = &mut bad["dsseEnvelope"]["signatures"][0]["sig"];
    *sig = flip(sig.as_str().unwrap()).into();
    let why = refused(
        &verifier,
        &image,
        &key,
        EvidenceSource::Bundle(serde_json::to_vec(&bad).unwrap()),
    );
    assert!(why.contains("does not verify"), "{why}");

    // The payload: the statement's subject changed to another digest.
    let mut bad = bundle.clone();
    let payload = STANDARD
        .decode(bad["dsseEnvelope"]["payload"].as_str().unwrap())
        .unwrap();
    let other_hex = "2".repeat(64);
    let digest = image.digest().unwrap().to_string();
    let forged = String::from_utf8(payload)
        .unwrap()
        .replace(digest.trim_start_matches("sha256:"), &other_hex);
    bad["dsseEnvelope"]["payload"] = STANDARD.encode(forged).into();
    let other = ImageReference::parse(&format!("{}/app@sha256:{other_hex}", lab.host)).unwrap();
    let why = refused(
        &verifier,
        &other,
        &key,
        EvidenceSource::Bundle(serde_json::to_vec(&bad).unwrap()),
    );
    assert!(why.contains("does not verify"), "{why}");

    // The digest.
    let why = refused(&verifier, &other, &key, evidence);
    assert!(why.contains(&format!("not sha256:{other_hex}")), "{why}");
}

#[tokio::test]
async fn a_key_rotated_in_the_policy_makes_the_entry_useless() {
    for classic in [true, false] {
        let (lab, _key, image, evidence) = verified(classic).await;
        let verifier = Verifier::new(lab.options()).unwrap();
        let rotated = lab.key("rotated");
        let why = refused(&verifier, &image, &rotated, evidence);
        assert!(why.contains("does not verify"), "classic={classic}: {why}");
    }
}

/// Under `minAuthorities: 2` the evidence kept is one item per counted signature, and stored
/// evidence answers only while it still holds two distinct authorities' signatures: one item
/// of the two (an entry cut down, or written for a rule needing one) is refused.
#[tokio::test]
async fn a_threshold_entry_verifies_again_only_with_every_signature() {
    let mut lab = Lab::start();
    let (release, scanner) = (lab.key("release"), lab.key("scanner"));
    let reference = lab.reference("app", &lab.push_image("app", "v1", "stored threshold"));
    lab.sign(&release, &reference, true, &[]);
    lab.sign(&scanner, &reference, false, &[]);
    let image = ImageReference::parse(&reference).unwrap();
    let both = [key_authority(&release), key_authority(&scanner)];
    let verified = Verifier::new(lab.options())
        .unwrap()
        .verify_threshold(&image, &both, 2, &[])
        .await
        .unwrap();
    assert_eq!(verified.evidence.len(), 2, "{verified:?}");
    lab.stop_registry();
    let verifier = Verifier::new(lab.options()).unwrap();
    let again = verifier
        .verify_stored(&image, &both, 2, &verified.evidence)
        .unwrap();
    assert_eq!(again.registry_requests, 0);
    assert_eq!(again.description, verified.description);
    for one in &verified.evidence {
        match verifier.verify_stored(&image, &both, 2, std::slice::from_ref(one)) {
            Err(e @ VerifyError::TooFewAuthorities { .. }) => {
                assert!(e.to_string().contains("and 1 did"), "{e}");
            }
            other => panic!("one signature of two was accepted: {other:?}"),
        }
    }
}

const BUILDER: &str = "https://fixity.test/builder";
const PROVENANCE: &str = "https://slsa.dev/provenance/v1";

/// A provenance rule signed by `key`, holding the builder to `builder`.
fn provenance_rule(key: &Key, builder: &str) -> Arc<AttestationRule> {
    rule_of_type(key, builder, PROVENANCE)
}

fn rule_of_type(key: &Key, builder: &str, predicate_type: &str) -> Arc<AttestationRule> {
    Arc::new(AttestationRule {
        name: "provenance".into(),
        predicate_type: predicate_type.into(),
        authorities: vec![key_authority(key)].into(),
        authorities_fingerprint: 1,
        max_evidence_age: Duration::from_secs(3600),
        conditions: vec![
            Condition::compile(
                &format!("predicate.runDetails.builder.id == '{builder}'"),
                None,
            )
            .unwrap(),
        ],
    })
}

/// An attested image, the evidence its verification kept, and the lab (registry running).
async fn attested(classic: bool) -> (Lab, Key, ImageReference, EvidenceSource) {
    let lab = Lab::start();
    let digest = lab.push_image("app", "v1", &format!("attested-{classic}"));
    let reference = lab.reference("app", &digest);
    let key = lab.key("trusted");
    let predicate = format!(r#"{{"runDetails":{{"builder":{{"id":"{BUILDER}"}}}}}}"#);
    lab.attest(&key, &reference, "slsaprovenance1", &predicate, classic);
    let image = ImageReference::parse(&reference).unwrap();
    let verifier = Verifier::new(lab.options()).unwrap();
    let rules = [provenance_rule(&key, BUILDER)];
    let verdict = verifier
        .verify_image(&image, None, &rules, &[], SystemTime::now())
        .await;
    assert!(
        matches!(
            verdict.attestations[..],
            [AttestationCheck::Satisfied { .. }]
        ),
        "{verdict:?}"
    );
    let evidence = verdict.attestation_evidence[0]
        .clone()
        .expect("the satisfying attestation's evidence");
    (lab, key, image, evidence)
}

async fn judged(
    verifier: &Verifier,
    image: &ImageReference,
    rule: Arc<AttestationRule>,
    evidence: EvidenceSource,
) -> AttestationCheck {
    let judged = verifier
        .verify_stored_attestations(image, &[rule], &[evidence], SystemTime::now())
        .await;
    judged.into_iter().next().unwrap().0
}

#[tokio::test]
async fn a_stored_attestation_satisfies_its_rule_again_with_the_registry_gone() {
    for classic in [true, false] {
        let (mut lab, key, image, evidence) = attested(classic).await;
        let before = lab.logged_requests();
        lab.stop_registry();
        let verifier = Verifier::new(lab.options()).unwrap();
        let check = judged(&verifier, &image, provenance_rule(&key, BUILDER), evidence).await;
        assert!(
            matches!(check, AttestationCheck::Satisfied { .. }),
            "classic={classic}: {check:?}"
        );
        assert_eq!(lab.logged_requests(), before, "the registry was not asked");
    }
}

#[tokio::test]
async fn a_stored_attestation_tampered_with_or_failing_the_rule_satisfies_nothing() {
    for classic in [true, false] {
        let (lab, key, image, evidence) = attested(classic).await;
        let verifier = Verifier::new(lab.options()).unwrap();
        let EvidenceSource::Bundle(bytes) = evidence.clone() else {
            panic!("an attestation is kept as a bundle: {evidence:?}");
        };
        let bundle: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let rule = || provenance_rule(&key, BUILDER);
        let statement = || {
            let payload = bundle["dsseEnvelope"]["payload"].as_str().unwrap();
            String::from_utf8(STANDARD.decode(payload).unwrap()).unwrap()
        };
        let with_statement = |text: String| {
            let mut bad = bundle.clone();
            bad["dsseEnvelope"]["payload"] = STANDARD.encode(text).into();
            EvidenceSource::Bundle(serde_json::to_vec(&bad).unwrap())
        };
        let not_satisfied = |case: &str, check: AttestationCheck| {
            assert!(
                !matches!(check, AttestationCheck::Satisfied { .. }),
                "classic={classic}, {case}: {check:?}"
            );
            check
        };

        // The envelope's signature.
        let mut bad = bundle.clone();
        let sig = &mut bad["dsseEnvelope"]["signatures"][0]["sig"];
        *sig = flip(sig.as_str().unwrap()).into();
        let bad = EvidenceSource::Bundle(serde_json::to_vec(&bad).unwrap());
        let check = not_satisfied("signature", judged(&verifier, &image, rule(), bad).await);
        assert!(
            format!("{check:?}").contains("does not verify"),
            "{check:?}"
        );

        // The subject: the statement rewritten to name another digest, and the genuine
        // envelope offered for another image.
        let digest = image.digest().unwrap().to_string();
        let other_hex = "3".repeat(64);
        let forged = statement().replace(digest.trim_start_matches("sha256:"), &other_hex);
        let other = ImageReference::parse(&format!("{}/app@sha256:{other_hex}", lab.host)).unwrap();
        let check = judged(&verifier, &other, rule(), with_statement(forged)).await;
        not_satisfied("subject rewritten", check);
        let check = judged(&verifier, &other, rule(), evidence.clone()).await;
        let check = not_satisfied("another image", check);
        assert!(format!("{check:?}").contains("its subject is"), "{check:?}");

        // The predicate type: rewritten in the statement (the signature breaks), and the
        // genuine envelope offered to a rule of another type.
        let forged = statement().replace(PROVENANCE, "https://fixity.test/other/v1");
        let check = judged(&verifier, &image, rule(), with_statement(forged)).await;
        not_satisfied("type rewritten", check);
        let other_type = rule_of_type(&key, BUILDER, "https://fixity.test/other/v1");
        let check = judged(&verifier, &image, other_type, evidence.clone()).await;
        not_satisfied("another rule's type", check);

        // A condition the genuine envelope fails now, and a rotated key.
        let check = judged(
            &verifier,
            &image,
            provenance_rule(&key, "https://fixity.test/another-builder"),
            evidence.clone(),
        )
        .await;
        assert!(
            matches!(check, AttestationCheck::ConditionFailed { .. }),
            "classic={classic}: {check:?}"
        );
        let rotated = lab.key("rotated");
        let check = judged(
            &verifier,
            &image,
            provenance_rule(&rotated, BUILDER),
            evidence,
        )
        .await;
        not_satisfied("rotated key", check);
    }
}

/// The API server unreachable for store reads: an attestation rule still applies, answered by
/// the registry (an attested image admitted, an unattested one not), never switched off.
#[tokio::test]
async fn an_unreachable_store_leaves_attestation_rules_to_the_registry() {
    use fixity::audit::Metrics;
    use fixity::verify::checker::SignatureChecker;
    use fixity::verify::store::{EvidenceStore, Settings};

    let (lab, key, image, _) = attested(false).await;
    let digest = lab.push_image("app", "bare", "never attested");
    let bare = ImageReference::parse(&lab.reference("app", &digest)).unwrap();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = kube::Config::new("http://127.0.0.1:1".parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    let metrics = Arc::new(Metrics::default());
    let store = EvidenceStore::new(client, Settings::default(), metrics.clone());
    let checker =
        SignatureChecker::new(lab.options(), Duration::from_secs(5), metrics.clone()).unwrap();
    let (checker, _warm_up) = checker.with_store(store);
    let rule = provenance_rule(&key, BUILDER);
    let requests = [&image, &bare].map(|image| {
        let pinned = format!(
            "{}/{}@{}",
            image.registry(),
            image.repository(),
            image.digest().unwrap()
        );
        ((pinned, 9), image.clone(), rule.clone())
    });
    let keys = requests.clone().map(|(key, _, _)| key);
    let attested = checker.check_attestations(requests, Vec::new()).await;
    assert!(attested.stored.is_empty());
    assert!(
        matches!(
            attested.checks.get(&keys[0]),
            Some(AttestationCheck::Satisfied { .. })
        ),
        "{attested:?}"
    );
    assert!(
        matches!(
            attested.checks.get(&keys[1]),
            Some(AttestationCheck::Missing(_))
        ),
        "{attested:?}"
    );
    let text = metrics.render();
    assert!(
        text.contains(r#"fixity_evidence_store_total{outcome="unreachable"} 2"#),
        "{text}"
    );
}
