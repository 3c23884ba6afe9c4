//! Keyless evidence made the way users make it: `cosign sign` through a private Sigstore of real
//! services on loopback (Fulcio, Rekor v2, the timestamp authority; see `common::sigstore`),
//! then verified by fixity. Refusals are checked on that evidence, tampered with where needed.

mod common;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use common::registry::Lab;
use common::sigstore::{EMAIL, Instance};
use sha2::Digest as _;

use fixity::verify::{
    Authority, KeyRequirements, KeylessRequirements, Matcher, SignatureFormat, Subject, TrustRoot,
    VerifyError, verify_bundle,
};

fn keyless(root: &serde_json::Value, requirements: KeylessRequirements) -> Authority {
    Authority::Keyless {
        issuer: Matcher::Regex(regex::Regex::new("^http://127\\.0\\.0\\.1:").unwrap()),
        subject: Matcher::Exact(EMAIL.into()),
        trust_root: TrustRoot::Custom(root.to_string()),
        requirements,
    }
}

/// No CT log runs here: the authority of a private instance without one.
fn without_ctlog() -> KeylessRequirements {
    KeylessRequirements {
        sct: false,
        ..KeylessRequirements::default()
    }
}

#[tokio::test]
async fn a_rekor_v2_and_tsa_bundle_signed_through_the_real_services_verifies() {
    let sigstore = Instance::start();
    let lab = Lab::start();
    let digest = lab.push_image("app", "v1", "keyless through the real services");
    let reference = lab.reference("app", &digest);
    sigstore.cosign_sign(&lab, &reference);

    let verified = lab
        .verify(
            &reference,
            &[keyless(&sigstore.trusted_root(), without_ctlog())],
        )
        .await;
    let verified = verified.unwrap();
    assert_eq!(verified.format, SignatureFormat::Bundle);
    assert_eq!(verified.signer.as_deref(), Some(EMAIL));

    // What cosign wrote: a v0.3 bundle, a Rekor v2 entry with an inclusion proof and a signed
    // checkpoint, and a timestamp of the TSA.
    let (bundle, _) = lab.bundle(&reference);
    let entry = &bundle["verificationMaterial"]["tlogEntries"][0];
    assert_eq!(entry["kindVersion"]["version"], "0.0.2", "{entry}");
    assert!(
        entry["inclusionProof"]["checkpoint"]["envelope"].is_string(),
        "{entry}"
    );
    assert!(entry.get("inclusionPromise").is_none(), "{entry}");
    assert_eq!(
        bundle["verificationMaterial"]["timestampVerificationData"]["rfc3161Timestamps"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    // So an authority that requires a timestamp accepts it too.
    let timestamped = KeylessRequirements {
        timestamp: true,
        ..without_ctlog()
    };
    let verified = lab
        .verify(
            &reference,
            &[keyless(&sigstore.trusted_root(), timestamped)],
        )
        .await;
    assert!(verified.is_ok(), "{verified:?}");
}

#[tokio::test]
async fn a_rekor_v2_log_with_an_ed25519_key_as_the_public_good_one_verifies() {
    // Its checkpoints name the key by the signed-note key hash, not by a hash of the key.
    let sigstore = Instance::start_ed25519();
    let lab = Lab::start();
    let reference = signed_image(&sigstore, &lab, "ed25519-log");
    let verified = lab
        .verify(
            &reference,
            &[keyless(&sigstore.trusted_root(), without_ctlog())],
        )
        .await;
    assert!(verified.is_ok(), "{verified:?}");
}

#[tokio::test]
async fn an_attestation_made_through_the_real_services_verifies_apart_from_its_predicate() {
    let sigstore = Instance::start();
    let lab = Lab::start();
    let digest = lab.push_image("app", "v1", "attested");
    let reference = lab.reference("app", &digest);
    sigstore.cosign_attest(
        &lab,
        &reference,
        "https://slsa.dev/provenance/v1",
        r#"{"buildDefinition":{"buildType":"https://fixity.test/build"}}"#,
    );
    // Not an image signature: the image stays unsigned.
    let result = lab
        .verify(
            &reference,
            &[keyless(&sigstore.trusted_root(), without_ctlog())],
        )
        .await;
    assert!(
        matches!(&result, Err(VerifyError::NoTrustedSignature { tried }) if tried[0].contains("not a signature")),
        "{result:?}"
    );
    // Its evidence checks as any bundle's, for the digest its statement names.
    let (bundle, _) = lab.bundle(&reference);
    let authority = keyless(&sigstore.trusted_root(), without_ctlog());
    let signer = verify_bundle(&bundle.to_string(), Subject::Digest(&digest), &authority);
    assert_eq!(signer, Ok(Some(EMAIL.to_owned())));
    let other = format!("sha256:{}", "0".repeat(64));
    let refused = verify_bundle(&bundle.to_string(), Subject::Digest(&other), &authority);
    assert!(refused.is_err(), "{refused:?}");
}

/// An attestation made keyless through the real Fulcio, Rekor v2 and TSA satisfies a rule for
/// its signer's identity, conditions included; for another identity it is missing.
#[tokio::test]
async fn a_keyless_attestation_through_the_real_services_satisfies_its_rule() {
    use fixity::verify::attest::conditions::Condition;
    use fixity::verify::{AttestationCheck, AttestationRule};
    let sigstore = Instance::start();
    let lab = Lab::start();
    let digest = lab.push_image("app", "v1", "attested keyless");
    let reference = lab.reference("app", &digest);
    sigstore.cosign_attest(
        &lab,
        &reference,
        "slsaprovenance1",
        r#"{"buildDefinition":{"buildType":"https://fixity.test/build"},"runDetails":{"builder":{"id":"https://fixity.test/builder"}}}"#,
    );
    let rule = |authority: Authority| {
        std::sync::Arc::new(AttestationRule {
            name: "provenance".into(),
            predicate_type: "https://slsa.dev/provenance/v1".into(),
            authorities: vec![authority].into(),
            authorities_fingerprint: 0,
            max_evidence_age: std::time::Duration::from_secs(3600),
            conditions: vec![
                Condition::compile(
                    "predicate.runDetails.builder.id == 'https://fixity.test/builder'",
                    None,
                )
                .unwrap(),
            ],
        })
    };
    let verifier = fixity::verify::Verifier::new(lab.options()).unwrap();
    let image = fixity::image::ImageReference::parse(&reference).unwrap();
    let ours = rule(keyless(&sigstore.trusted_root(), without_ctlog()));
    let other = rule(Authority::Keyless {
        issuer: Matcher::Regex(regex::Regex::new("^http://127\\.0\\.0\\.1:").unwrap()),
        subject: Matcher::Exact("someone-else@fixity.test".into()),
        trust_root: TrustRoot::Custom(sigstore.trusted_root().to_string()),
        requirements: without_ctlog(),
    });
    let verdict = verifier
        .verify_image(
            &image,
            None,
            &[ours, other],
            &[],
            std::time::SystemTime::now(),
        )
        .await;
    assert!(verdict.signature.is_none(), "no signature was asked for");
    match &verdict.attestations[0] {
        AttestationCheck::Satisfied { signer, .. } => assert_eq!(signer.as_deref(), Some(EMAIL)),
        other => panic!("{other:?}"),
    }
    match &verdict.attestations[1] {
        AttestationCheck::Missing(why) => assert!(why.contains("someone-else"), "{why}"),
        other => panic!("{other:?}"),
    }
}

/// Signs a fresh image through `sigstore`; returns its reference.
fn signed_image(sigstore: &Instance, lab: &Lab, tag: &str) -> String {
    let digest = lab.push_image("app", tag, tag);
    let reference = lab.reference("app", &digest);
    sigstore.cosign_sign(lab, &reference);
    reference
}

/// The reasons fixity gives for refusing `reference` under `authority`.
async fn refusals(lab: &Lab, reference: &str, authority: Authority) -> Vec<String> {
    match lab.verify(reference, &[authority]).await {
        Err(VerifyError::NoTrustedSignature { tried }) => tried,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn assert_refused_with(tried: &[String], reason: &str) {
    assert!(
        tried.len() == 1 && tried[0].contains(reason),
        "expected one refusal saying {reason:?}: {tried:?}"
    );
}

#[tokio::test]
async fn a_certificate_without_sct_is_refused_where_scts_are_required() {
    let sigstore = Instance::start();
    let lab = Lab::start();
    let reference = signed_image(&sigstore, &lab, "no-sct");
    // The default: SCTs required. Fulcio ran without a CT log, so its certificate has none.
    let tried = refusals(
        &lab,
        &reference,
        keyless(&sigstore.trusted_root(), KeylessRequirements::default()),
    )
    .await;
    assert_refused_with(&tried, "certificate is missing SCT extension");
}

#[tokio::test]
async fn a_tampered_inclusion_proof_is_refused() {
    let sigstore = Instance::start();
    let lab = Lab::start();
    signed_image(&sigstore, &lab, "first");
    // The second entry of the log has a proof with one hash: the first entry's leaf.
    let reference = signed_image(&sigstore, &lab, "second");
    let (mut bundle, _) = lab.bundle(&reference);
    let proof = &mut bundle["verificationMaterial"]["tlogEntries"][0]["inclusionProof"];
    let hash = proof["hashes"][0]
        .as_str()
        .expect("a proof hash")
        .to_owned();
    let mut bytes = STANDARD.decode(hash).unwrap();
    bytes[0] ^= 1;
    proof["hashes"][0] = STANDARD.encode(bytes).into();
    lab.replace_bundle(&reference, &bundle);

    let tried = refusals(
        &lab,
        &reference,
        keyless(&sigstore.trusted_root(), without_ctlog()),
    )
    .await;
    assert_refused_with(&tried, "inclusion proof verification failed");
}

/// Signs an image through a fresh instance, and returns why a keyless authority refuses it
/// under that instance's trust root as `change` altered it.
async fn refused_under_changed_root(change: impl FnOnce(&mut serde_json::Value)) -> Vec<String> {
    let sigstore = Instance::start();
    let lab = Lab::start();
    let reference = signed_image(&sigstore, &lab, "changed-root");
    let mut root = sigstore.trusted_root();
    change(&mut root);
    refusals(&lab, &reference, keyless(&root, without_ctlog())).await
}

#[tokio::test]
async fn a_checkpoint_signed_by_a_key_not_in_the_root_is_refused() {
    // The root names the log by its id but with another key: the checkpoint's signature is
    // then by a key the root does not hold.
    let stranger = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let tried = refused_under_changed_root(|root| {
        root["tlogs"][0]["publicKey"]["rawBytes"] = STANDARD
            .encode(rcgen::PublicKeyData::subject_public_key_info(&stranger))
            .into();
    })
    .await;
    assert_refused_with(&tried, "No valid Rekor signature found on checkpoint");
}

#[tokio::test]
async fn a_log_key_used_outside_its_validity_window_is_refused() {
    // The root retired the log's key an hour before the signature was timestamped.
    let retired = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    let retired = retired
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let tried = refused_under_changed_root(|root| {
        root["tlogs"][0]["publicKey"]["validFor"]["end"] = retired.into();
    })
    .await;
    assert_refused_with(&tried, "was not trusted at");
}

#[tokio::test]
async fn a_timestamp_from_a_tsa_not_in_the_root_is_refused() {
    // The root trusts another timestamp authority, not the one that stamped the signature.
    let other = OwnCa::new();
    let tried = refused_under_changed_root(|root| {
        root["timestampAuthorities"][0]["certChain"]["certificates"] =
            serde_json::json!([{ "rawBytes": STANDARD.encode(other.cert.der()) }]);
    })
    .await;
    assert_refused_with(&tried, "TSA timestamp verification failed");
}

#[tokio::test]
async fn a_log_entry_describing_another_signature_is_refused() {
    let sigstore = Instance::start();
    let lab = Lab::start();
    let donor = signed_image(&sigstore, &lab, "donor");
    let reference = signed_image(&sigstore, &lab, "victim");
    // A genuine, provable entry of the log, for another signature by the same identity.
    let (donor_bundle, _) = lab.bundle(&donor);
    let (mut bundle, _) = lab.bundle(&reference);
    bundle["verificationMaterial"]["tlogEntries"] =
        donor_bundle["verificationMaterial"]["tlogEntries"].clone();
    lab.replace_bundle(&reference, &bundle);
    let tried = refusals(
        &lab,
        &reference,
        keyless(&sigstore.trusted_root(), without_ctlog()),
    )
    .await;
    assert_refused_with(&tried, "artifact hash mismatch for hashedrekord entry");
}

/// A CA of the test's own, for certificates Fulcio would not issue.
struct OwnCa {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl OwnCa {
    fn new() -> Self {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
        let cert = params.self_signed(&key).unwrap();
        Self { cert, key }
    }

    /// A Fulcio-like ten-minute certificate for `public_pem`, valid from `not_before`.
    fn issue(&self, public_pem: &str, not_before: time::OffsetDateTime) -> String {
        common::sigstore::fulcio_like_certificate(
            &self.cert,
            &self.key,
            public_pem,
            rcgen::SanType::Rfc822Name(EMAIL.try_into().unwrap()),
            "http://127.0.0.1:1",
            not_before,
        )
    }
}

/// A bundle made as a signing client makes one, for `key` and `certificate` (DER), with a
/// timestamp of the instance's TSA and a Rekor v2 entry: for evidence cosign refuses to make.
fn hand_made_bundle(
    sigstore: &Instance,
    key: &rcgen::KeyPair,
    certificate: &[u8],
    digest: &str,
) -> serde_json::Value {
    let statement = serde_json::json!({
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{ "digest": { "sha256": digest.strip_prefix("sha256:").unwrap() } }],
        "predicateType": "https://sigstore.dev/cosign/sign/v1",
        "predicate": {},
    })
    .to_string();
    let payload_type = "application/vnd.in-toto+json";
    let pae = format!(
        "DSSEv1 {} {payload_type} {} {statement}",
        payload_type.len(),
        statement.len()
    );
    let signature = rcgen::SigningKey::sign(key, pae.as_bytes()).unwrap();
    let entry = sigstore.log_hashedrekord(&sha2::Sha256::digest(&pae), &signature, certificate);
    serde_json::json!({
        "mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
        "verificationMaterial": {
            "certificate": { "rawBytes": STANDARD.encode(certificate) },
            "tlogEntries": [entry],
            "timestampVerificationData": { "rfc3161Timestamps": [
                { "signedTimestamp": STANDARD.encode(sigstore.timestamp(&signature)) },
            ]},
        },
        "dsseEnvelope": {
            "payload": STANDARD.encode(&statement),
            "payloadType": payload_type,
            "signatures": [{ "sig": STANDARD.encode(&signature) }],
        },
    })
}

#[tokio::test]
async fn a_tsa_timestamp_outside_the_certificates_validity_is_refused() {
    let sigstore = Instance::start();
    let lab = Lab::start();
    let reference = signed_image(&sigstore, &lab, "late");
    let digest = reference.split_once('@').unwrap().1;
    // A certificate that expired an hour before its key signed, logged in Rekor v2 and
    // timestamped by the TSA like any other (cosign itself refuses to sign with it).
    let ca = OwnCa::new();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let issued = time::OffsetDateTime::now_utc() - time::Duration::hours(2);
    let cert =
        common::sigstore::pem_ders(ca.issue(&key.public_key_pem(), issued).as_bytes()).remove(0);
    lab.replace_bundle(
        &reference,
        &hand_made_bundle(&sigstore, &key, &cert, digest),
    );

    let mut root = sigstore.trusted_root();
    root["certificateAuthorities"][0]["certChain"]["certificates"] =
        serde_json::json!([{ "rawBytes": STANDARD.encode(ca.cert.der()) }]);
    let tried = refusals(&lab, &reference, keyless(&root, without_ctlog())).await;
    assert_refused_with(&tried, "CertExpired");

    // The control: the same, made with a certificate valid when timestamped, verifies.
    let now = time::OffsetDateTime::now_utc() - time::Duration::minutes(1);
    let cert =
        common::sigstore::pem_ders(ca.issue(&key.public_key_pem(), now).as_bytes()).remove(0);
    lab.replace_bundle(
        &reference,
        &hand_made_bundle(&sigstore, &key, &cert, digest),
    );
    let verified = lab
        .verify(&reference, &[keyless(&root, without_ctlog())])
        .await;
    assert!(verified.is_ok(), "{verified:?}");
}

#[tokio::test]
async fn a_key_authority_can_require_a_log_entry_and_a_timestamp() {
    let sigstore = Instance::start();
    let lab = Lab::start();
    let key = lab.key("release");
    let requiring = |tlog, timestamp| Authority::Key {
        public_key_pem: key.public_pem.clone(),
        requirements: KeyRequirements {
            tlog,
            timestamp,
            trust_root: TrustRoot::Custom(sigstore.trusted_root().to_string()),
        },
    };

    // Signed with the key through Rekor v2 and the TSA.
    let logged = lab.reference("app", &lab.push_image("app", "v1", "logged"));
    let (root, signing) = sigstore.write_config();
    common::sigstore::cosign(
        lab.path(),
        &[
            "sign",
            "--key",
            key.private.to_str().unwrap(),
            "--signing-config",
            signing.to_str().unwrap(),
            "--trusted-root",
            root.to_str().unwrap(),
            "--allow-http-registry",
            "-y",
            &logged,
        ],
    );
    let verified = lab.verify(&logged, &[requiring(true, true)]).await;
    assert!(verified.is_ok(), "{verified:?}");

    // Signed air-gapped: fine by default, refused where a log entry or a timestamp is required.
    let offline = lab.reference("app", &lab.push_image("app", "v2", "offline"));
    lab.sign(&key, &offline, false, &[]);
    let verified = lab.verify(&offline, &[requiring(false, false)]).await;
    assert!(verified.is_ok(), "{verified:?}");
    let tried = refusals(&lab, &offline, requiring(true, false)).await;
    assert_refused_with(
        &tried,
        "requires a transparency-log entry and there is none",
    );
    let tried = refusals(&lab, &offline, requiring(false, true)).await;
    assert_refused_with(&tried, "requires an RFC 3161 timestamp and there is none");

    // A log entry of another signature does not count for this one.
    let (logged_bundle, _) = lab.bundle(&logged);
    let (mut bundle, _) = lab.bundle(&offline);
    bundle["verificationMaterial"]["tlogEntries"] =
        logged_bundle["verificationMaterial"]["tlogEntries"].clone();
    lab.replace_bundle(&offline, &bundle);
    let tried = refusals(&lab, &offline, requiring(true, false)).await;
    assert_refused_with(&tried, "artifact hash mismatch for hashedrekord entry");
}

/// Not a correctness test: prints a cold verification of a Rekor v2 + TSA bundle by fixity
/// (a new verifier: trust root parsed, registry connection, lookups, checks) against
/// `cosign verify` of the same image, in the same run. Run with
/// `cargo test --release --test sigstore -- --ignored --nocapture timing`.
#[tokio::test]
#[ignore = "measurement, not a check"]
async fn timing_rekor_v2_against_cosign_verify() {
    let sigstore = Instance::start();
    let lab = Lab::start();
    let (root_path, _) = sigstore.write_config();
    let root = sigstore.trusted_root();
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for round in 0..5 {
        let reference = signed_image(&sigstore, &lab, &format!("timing-{round}"));

        let started = std::time::Instant::now();
        let verifier = fixity::verify::Verifier::new(lab.options()).unwrap();
        let image = fixity::image::ImageReference::parse(&reference).unwrap();
        let verified = verifier
            .verify(&image, &[keyless(&root, without_ctlog())])
            .await
            .unwrap();
        ours.push(started.elapsed());

        let started = std::time::Instant::now();
        common::sigstore::cosign(
            lab.path(),
            &[
                "verify",
                "--trusted-root",
                root_path.to_str().unwrap(),
                "--certificate-identity",
                EMAIL,
                "--certificate-oidc-issuer",
                &sigstore.issuer.url,
                "--insecure-ignore-sct",
                "--allow-http-registry",
                &reference,
            ],
        );
        theirs.push(started.elapsed());
        println!(
            "round {round}: fixity cold verify {:?} ({} registry requests), cosign verify {:?}",
            ours[round], verified.registry_requests, theirs[round]
        );
    }
    ours.sort();
    theirs.sort();
    println!(
        "median of 5: fixity {:?}, cosign verify {:?}, ratio {:.3}",
        ours[2],
        theirs[2],
        ours[2].as_secs_f64() / theirs[2].as_secs_f64()
    );
}
