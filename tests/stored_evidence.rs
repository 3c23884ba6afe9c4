//! Evidence kept by the evidence store, checked again on the way back: real signatures made by
//! the real `cosign` CLI in a real registry (`crane registry serve`), read back with the
//! registry stopped. What the store hands back is untrusted input: a changed payload, signature
//! or digest, or a key rotated in the policy, makes the entry useless.

mod common;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use common::registry::{Key, Lab};
use fixity::image::ImageReference;
use fixity::verify::{Authority, EvidenceSource, SignatureFormat, Verifier, VerifyError};

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
