//! Signature verification against a real registry (`crane registry serve`) and signatures made
//! by the real `cosign` CLI, offline. Each test runs its own registry on a random loopback port
//! in its own temporary directory, so the tests run in parallel.
//!
//! The tools are the pinned builds of `tests/tools/build.sh registry cosign` (cached); a test
//! fails, never skips, when they cannot be built.

mod common;

use std::time::{Duration, Instant};

use common::registry::{Key, Lab, run, test_public_key};

use base64::Engine as _;
use fixity::image::ImageReference;
use fixity::verify::{
    Authority, KeylessRequirements, Matcher, RegistryOptions, SignatureFormat, TrustRoot, Verified,
    Verifier, VerifyError,
};
use sha2::Digest as _;

fn key_authority(key: &Key) -> Authority {
    Authority::Key {
        public_key_pem: key.public_pem.clone(),
        requirements: Default::default(),
    }
}

fn no_trusted(result: Result<Verified, VerifyError>) -> Vec<String> {
    match result {
        Err(VerifyError::NoTrustedSignature { tried }) => tried,
        other => panic!("expected NoTrustedSignature, got {other:?}"),
    }
}

#[tokio::test]
async fn a_classic_signature_by_the_trusted_key_verifies() {
    let lab = Lab::start();
    let digest = lab.push_image("app", "v1", "signed");
    let reference = lab.reference("app", &digest);
    let key = lab.key("trusted");
    lab.sign(&key, &reference, true, &[]);

    let verified = lab
        .verify(&reference, &[key_authority(&key)])
        .await
        .unwrap();
    assert_eq!(verified.authority, 0);
    assert_eq!(verified.format, SignatureFormat::SignatureTag);
    assert!(
        verified.description.starts_with("key sha256:"),
        "{verified:?}"
    );
    // The .sig manifest and its one payload blob.
    assert_eq!(verified.registry_requests, 2, "{verified:?}");
}

#[tokio::test]
async fn a_bundle_signature_by_the_trusted_key_verifies() {
    let lab = Lab::start();
    let digest = lab.push_image("app", "v1", "bundle");
    let reference = lab.reference("app", &digest);
    let key = lab.key("trusted");
    lab.sign(&key, &reference, false, &[]);
    // crane's registry has no referrers API, so cosign wrote the referrers tag instead.
    let tags = lab.crane(&["ls", &format!("{}/app", lab.host)]);
    assert!(
        tags.lines().any(|t| t == digest.replace(':', "-")),
        "{tags}"
    );

    let verifier = Verifier::new(lab.options()).unwrap();
    let image = ImageReference::parse(&reference).unwrap();
    let first = verifier
        .verify(&image, &[key_authority(&key)])
        .await
        .unwrap();
    assert_eq!(first.format, SignatureFormat::Bundle);
    // .sig miss, referrers API miss, referrers tag, bundle manifest, bundle blob.
    assert_eq!(first.registry_requests, 5, "{first:?}");
    // The verifier remembers that this registry lacks the referrers API.
    let again = verifier
        .verify(&image, &[key_authority(&key)])
        .await
        .unwrap();
    assert_eq!(again.registry_requests, 4, "{again:?}");
}

#[tokio::test]
async fn an_unsigned_image_is_unsigned() {
    let lab = Lab::start();
    let digest = lab.push_image("app", "v1", "unsigned");
    let key = lab.key("trusted");
    let result = lab
        .verify(&lab.reference("app", &digest), &[key_authority(&key)])
        .await;
    assert_eq!(result, Err(VerifyError::Unsigned));
}

#[tokio::test]
async fn a_signature_by_another_key_is_not_trusted() {
    let lab = Lab::start();
    let digest = lab.push_image("app", "v1", "other");
    let reference = lab.reference("app", &digest);
    let trusted = lab.key("trusted");
    let other = lab.key("other");
    lab.sign(&other, &reference, true, &[]);
    lab.sign(&other, &reference, false, &[]);

    let tried = no_trusted(lab.verify(&reference, &[key_authority(&trusted)]).await);
    assert_eq!(tried.len(), 2, "one per format: {tried:?}");
    assert!(
        tried
            .iter()
            .all(|t| t.contains("does not verify with this key")),
        "{tried:?}"
    );
}

#[tokio::test]
async fn the_second_authority_can_be_the_one_that_matches() {
    let lab = Lab::start();
    let digest = lab.push_image("app", "v1", "second");
    let reference = lab.reference("app", &digest);
    let first = lab.key("first");
    let second = lab.key("second");
    lab.sign(&second, &reference, true, &[]);
    let verified = lab
        .verify(&reference, &[key_authority(&first), key_authority(&second)])
        .await
        .unwrap();
    assert_eq!(verified.authority, 1);
}

/// Signs one image, copies its signature to where signatures of another image are looked up
/// (the `.sig` tag, or the referrers tag for bundles), and expects the copy refused.
async fn a_copied_signature_is_refused(classic: bool) {
    let lab = Lab::start();
    let signed = lab.push_image("app", "v1", "signed");
    let victim = lab.push_image("app", "v2", "not signed");
    let key = lab.key("trusted");
    lab.sign(&key, &lab.reference("app", &signed), classic, &[]);
    let suffix = if classic { ".sig" } else { "" };
    lab.crane(&[
        "cp",
        &format!("{}/app:{}{suffix}", lab.host, signed.replace(':', "-")),
        &format!("{}/app:{}{suffix}", lab.host, victim.replace(':', "-")),
    ]);

    let tried = no_trusted(
        lab.verify(&lab.reference("app", &victim), &[key_authority(&key)])
            .await,
    );
    assert_eq!(tried.len(), 1, "{tried:?}");
    assert!(
        tried[0].contains(&format!("signs {signed}, not {victim}")),
        "{tried:?}"
    );
}

#[tokio::test]
async fn a_classic_signature_copied_onto_another_digest_is_refused() {
    a_copied_signature_is_refused(true).await;
}

#[tokio::test]
async fn a_bundle_copied_onto_another_digest_is_refused() {
    a_copied_signature_is_refused(false).await;
}

#[tokio::test]
async fn tag_and_digest_verify_the_digest() {
    let lab = Lab::start();
    let signed = lab.push_image("app", "signed", "a");
    let unsigned = lab.push_image("app", "unsigned", "b");
    let key = lab.key("trusted");
    lab.sign(&key, &lab.reference("app", &signed), true, &[]);
    let authorities = [key_authority(&key)];

    // The tag names the unsigned image; the digest, which the runtime pulls, is signed.
    let ok = lab
        .verify(&format!("{}/app:unsigned@{signed}", lab.host), &authorities)
        .await;
    assert!(ok.is_ok(), "{ok:?}");
    // And the other way round: a signed tag does not cover an unsigned digest.
    let denied = lab
        .verify(&format!("{}/app:signed@{unsigned}", lab.host), &authorities)
        .await;
    assert_eq!(denied, Err(VerifyError::Unsigned));
}

#[tokio::test]
async fn an_image_index_is_verified_at_the_index_digest() {
    let lab = Lab::start();
    let amd64 = lab.push_image("app", "amd64", "amd64");
    let arm64 = lab.push_image("app", "arm64", "arm64");
    let index_ref = format!("{}/app:multi", lab.host);
    lab.crane(&[
        "index",
        "append",
        "-m",
        &lab.reference("app", &amd64),
        "-m",
        &lab.reference("app", &arm64),
        "-t",
        &index_ref,
    ]);
    let index = lab.crane(&["digest", &index_ref]);
    let key = lab.key("trusted");
    // Signing a platform image does not sign the index that pods name.
    lab.sign(&key, &lab.reference("app", &amd64), true, &[]);
    let authorities = [key_authority(&key)];
    assert_eq!(
        lab.verify(&lab.reference("app", &index), &authorities)
            .await,
        Err(VerifyError::Unsigned)
    );
    lab.sign(&key, &lab.reference("app", &index), true, &[]);
    let verified = lab
        .verify(&lab.reference("app", &index), &authorities)
        .await;
    assert!(verified.is_ok(), "{verified:?}");
}

#[tokio::test]
async fn a_registry_that_is_down_is_unavailable_at_once() {
    // Bind and drop: nothing listens on the port afterwards.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let host = format!("127.0.0.1:{port}");
    let verifier = Verifier::new(RegistryOptions {
        insecure_registries: vec![host.clone()],
        ..RegistryOptions::default()
    })
    .unwrap();
    let image = ImageReference::parse(&format!("{host}/app@sha256:{}", "0".repeat(64))).unwrap();
    let started = Instant::now();
    let result = verifier
        .verify(
            &image,
            &[Authority::Key {
                public_key_pem: test_public_key(),
                requirements: Default::default(),
            }],
        )
        .await;
    assert!(
        matches!(&result, Err(VerifyError::Unavailable(why)) if why.contains("cannot connect")),
        "{result:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_registry_that_never_answers_is_unavailable_within_the_timeout() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = listener.local_addr().unwrap().to_string();
    // Accept connections and say nothing.
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let verifier = Verifier::new(RegistryOptions {
        insecure_registries: vec![host.clone()],
        request_timeout: Duration::from_millis(300),
        ..RegistryOptions::default()
    })
    .unwrap();
    let image = ImageReference::parse(&format!("{host}/app@sha256:{}", "0".repeat(64))).unwrap();
    let started = Instant::now();
    let result = verifier
        .verify(
            &image,
            &[Authority::Key {
                public_key_pem: test_public_key(),
                requirements: Default::default(),
            }],
        )
        .await;
    let elapsed = started.elapsed();
    silent.abort();
    assert!(
        matches!(&result, Err(VerifyError::Unavailable(why)) if why.contains("timed out")),
        "{result:?}"
    );
    // One timed-out request: the bundle lookup does not wait on the same dead host again.
    assert!(elapsed < Duration::from_millis(550), "{elapsed:?}");
}

#[tokio::test]
async fn a_registry_answering_5xx_is_unavailable_not_unsigned() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = listener.local_addr().unwrap().to_string();
    let failing = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = socket.read(&mut buf).await;
            let _ = socket
                .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .await;
        }
    });
    let verifier = Verifier::new(RegistryOptions {
        insecure_registries: vec![host.clone()],
        ..RegistryOptions::default()
    })
    .unwrap();
    let image = ImageReference::parse(&format!("{host}/app@sha256:{}", "0".repeat(64))).unwrap();
    let result = verifier
        .verify(
            &image,
            &[Authority::Key {
                public_key_pem: test_public_key(),
                requirements: Default::default(),
            }],
        )
        .await;
    failing.abort();
    assert!(
        matches!(&result, Err(VerifyError::Unavailable(why)) if why.contains("503")),
        "{result:?}"
    );
}

#[tokio::test]
async fn references_without_digest_and_broken_keys_are_refused() {
    let key = Authority::Key {
        public_key_pem: test_public_key(),
        requirements: Default::default(),
    };
    let verifier = Verifier::new(RegistryOptions::default()).unwrap();
    let tagged = ImageReference::parse("127.0.0.1:1/app:v1").unwrap();
    assert!(matches!(
        verifier.verify(&tagged, std::slice::from_ref(&key)).await,
        Err(VerifyError::NotPinned(_))
    ));
    let pinned =
        ImageReference::parse(&format!("127.0.0.1:1/app@sha256:{}", "0".repeat(64))).unwrap();
    assert_eq!(
        verifier.verify(&pinned, &[]).await,
        Err(VerifyError::NoAuthorities)
    );
    let broken = Authority::Key {
        public_key_pem: "not a key".into(),
        requirements: Default::default(),
    };
    assert!(matches!(
        verifier.verify(&pinned, &[key, broken]).await,
        Err(VerifyError::InvalidAuthority { index: 1, .. })
    ));
}

/// An image signed in a lab registry, behind a front that demands a bearer token, issued by
/// its `/token` realm for basic credentials `robot:s3cret` (and otherwise forwards reads to the
/// lab registry): the lab, the front's address, the image there and its authority.
async fn signed_behind_a_token_front() -> (Lab, String, ImageReference, [Authority; 1]) {
    let lab = Lab::start();
    let digest = lab.push_image("app", "v1", "private");
    let key = lab.key("trusted");
    lab.sign(&key, &lab.reference("app", &digest), true, &[]);
    let front = common::registry::token_front("127.0.0.1:0", lab.host.clone()).await;
    let image = ImageReference::parse(&format!("{front}/app@{digest}")).unwrap();
    let authorities = [key_authority(&key)];
    (lab, front, image, authorities)
}

#[tokio::test]
async fn credentials_answer_a_token_challenge_and_tokens_are_reused() {
    let (_lab, front, image, authorities) = signed_behind_a_token_front().await;
    let robot = fixity::verify::RegistryCredential {
        registry: front.clone(),
        username: "robot".into(),
        password: "s3cret".into(),
    };
    let options = |credentials| RegistryOptions {
        insecure_registries: vec![front.clone()],
        credentials,
        ..RegistryOptions::default()
    };

    let verifier = Verifier::new(options(vec![robot.clone()])).unwrap();
    let first = verifier.verify(&image, &authorities).await.unwrap();
    // Challenge, token, the .sig manifest again with the token, its blob.
    assert_eq!(first.registry_requests, 4, "{first:?}");
    let second = verifier.verify(&image, &authorities).await.unwrap();
    assert_eq!(second.registry_requests, 2, "token reused: {second:?}");

    // Anonymous access is refused by the token service: the registry answered, and what it
    // answered proves nothing, so the image is not verified (and not "unavailable").
    let anonymous = Verifier::new(options(Vec::new())).unwrap();
    let tried = no_trusted(anonymous.verify(&image, &authorities).await);
    assert!(
        tried
            .iter()
            .any(|t| t.contains("token service") && t.contains("refused (401)")),
        "{tried:?}"
    );
    // A pod's pull secret, given per call, works on a verifier configured without it...
    let per_call = anonymous
        .verify_with_credentials(&image, &authorities, std::slice::from_ref(&robot))
        .await;
    assert!(per_call.is_ok(), "{per_call:?}");
    // ...and its token does not serve a later call that lacks the secret.
    let result = anonymous.verify(&image, &authorities).await;
    assert!(
        matches!(result, Err(VerifyError::NoTrustedSignature { .. })),
        "{result:?}"
    );
}

/// A refused credential does not end the lookup: as the kubelet tries each credential it holds
/// for a registry until one pulls, the next one for the same registry is tried (a pod's stale
/// pull secret, then a credential provider's). Credentials for other registries never are.
#[tokio::test]
async fn a_refused_credential_gives_way_to_the_next_for_that_registry() {
    let (_lab, front, image, authorities) = signed_behind_a_token_front().await;
    let credential = |registry: &str, password: &str| fixity::verify::RegistryCredential {
        registry: registry.to_owned(),
        username: "robot".into(),
        password: password.into(),
    };
    let (stale, older, good) = (
        credential(&front, "old"),
        credential(&front, "older"),
        credential(&front, "s3cret"),
    );
    let verifier = Verifier::new(RegistryOptions {
        insecure_registries: vec![front.clone()],
        ..RegistryOptions::default()
    })
    .unwrap();

    let verified = verifier
        .verify_with_credentials(&image, &authorities, &[stale.clone(), good])
        .await
        .unwrap();
    // Challenge, the token refused for the stale secret, challenge, token, the .sig manifest
    // with the token, its blob.
    assert_eq!(verified.registry_requests, 6, "{verified:?}");

    let tried = no_trusted(
        verifier
            .verify_with_credentials(&image, &authorities, &[stale.clone(), older])
            .await,
    );
    assert!(
        tried.iter().any(|t| t.contains("refused (401)")
            && t.contains("each of the 2 credentials for it was tried")),
        "{tried:?}"
    );
    let elsewhere = credential("other.example", "s3cret");
    let tried = no_trusted(
        verifier
            .verify_with_credentials(&image, &authorities, &[stale, elsewhere])
            .await,
    );
    assert!(
        tried
            .iter()
            .any(|t| t.contains("refused (401)") && !t.contains("credentials for it")),
        "{tried:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Keyless: a self-made Fulcio-like CA and a self-made transparency-log key. cosign signs with a
// certificate from that CA (offline, so without a log entry); the test then plays Rekor and adds
// the signed entry timestamp a real log would have returned.
// ---------------------------------------------------------------------------------------------

const TEST_ISSUER: &str = "https://issuer.fixity.test";
const TEST_SUBJECT: &str =
    "https://github.com/acme/app/.github/workflows/release.yml@refs/heads/main";

struct Sigstore {
    /// The CA that issues leaf certificates, and its key.
    ca_cert: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
    /// The root above `ca_cert` when that is an intermediate.
    root: Option<rcgen::Certificate>,
    log_key: rcgen::KeyPair,
}

fn ca_params(name: &str, not_after: time::OffsetDateTime) -> rcgen::CertificateParams {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(2);
    params.not_after = not_after;
    params
}

impl Sigstore {
    fn new() -> Self {
        let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let tomorrow = time::OffsetDateTime::now_utc() + time::Duration::days(1);
        let ca_cert = ca_params("fixity test fulcio", tomorrow)
            .self_signed(&ca_key)
            .unwrap();
        let log_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        Self {
            ca_cert,
            ca_key,
            root: None,
            log_key,
        }
    }

    /// A root CA and an intermediate under it that issues leaves and expires at
    /// `intermediate_expiry`.
    fn with_intermediate(intermediate_expiry: time::OffsetDateTime) -> Self {
        let root_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let tomorrow = time::OffsetDateTime::now_utc() + time::Duration::days(1);
        let root = ca_params("fixity test root", tomorrow)
            .self_signed(&root_key)
            .unwrap();
        let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let issuer = rcgen::Issuer::from_ca_cert_der(root.der(), &root_key).unwrap();
        let ca_cert = ca_params("fixity test intermediate", intermediate_expiry)
            .signed_by(&ca_key, &issuer)
            .unwrap();
        Self {
            ca_cert,
            ca_key,
            root: Some(root),
            log_key: rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
        }
    }

    /// The CA chain, issuing CA first.
    fn chain(&self) -> Vec<&rcgen::Certificate> {
        std::iter::once(&self.ca_cert).chain(&self.root).collect()
    }

    fn chain_pem(&self) -> String {
        self.chain().iter().map(|c| c.pem()).collect()
    }

    fn log_id(&self) -> Vec<u8> {
        sha2::Sha256::digest(rcgen::PublicKeyData::subject_public_key_info(&self.log_key)).to_vec()
    }

    /// A `trusted_root.json` naming this CA and this log.
    fn trusted_root(&self) -> String {
        self.trusted_root_with_log_of(self)
    }

    /// A `trusted_root.json` naming this CA and the log of `log`.
    fn trusted_root_with_log_of(&self, log: &Sigstore) -> String {
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        serde_json::json!({
            "mediaType": "application/vnd.dev.sigstore.trustedroot+json;version=0.1",
            "tlogs": [{
                "baseUrl": "https://rekor.fixity.test",
                "hashAlgorithm": "SHA2_256",
                "publicKey": {
                    "rawBytes": b64(&rcgen::PublicKeyData::subject_public_key_info(&log.log_key)),
                    "keyDetails": "PKIX_ECDSA_P256_SHA_256",
                    "validFor": { "start": "2020-01-01T00:00:00Z" }
                },
                "logId": { "keyId": b64(&log.log_id()) }
            }],
            "certificateAuthorities": [{
                "subject": { "organization": "fixity", "commonName": "fixity test fulcio" },
                "uri": "https://fulcio.fixity.test",
                "certChain": { "certificates": self.chain().iter()
                    .map(|c| serde_json::json!({ "rawBytes": b64(c.der()) }))
                    .collect::<Vec<_>>() },
                "validFor": { "start": "2020-01-01T00:00:00Z" }
            }],
            "ctlogs": []
        })
        .to_string()
    }

    /// A ten-minute code-signing certificate for `public_pem`, as Fulcio would issue it.
    fn issue(&self, public_pem: &str, issuer: &str, subject: &str) -> String {
        let now = time::OffsetDateTime::now_utc();
        self.issue_at(
            public_pem,
            issuer,
            subject,
            now - time::Duration::minutes(1),
        )
    }

    fn issue_at(
        &self,
        public_pem: &str,
        issuer: &str,
        subject: &str,
        not_before: time::OffsetDateTime,
    ) -> String {
        common::sigstore::fulcio_like_certificate(
            &self.ca_cert,
            &self.ca_key,
            public_pem,
            rcgen::SanType::URI(subject.try_into().unwrap()),
            issuer,
            not_before,
        )
    }

    /// The log's signature over an entry (log index 7) with base64 `body`, seen at `logged`.
    fn signed_entry_timestamp(&self, body: &str, logged: i64) -> Vec<u8> {
        let log_id = hex::encode(self.log_id());
        // Canonical JSON: keys sorted, no spaces.
        let signed = format!(
            r#"{{"body":"{body}","integratedTime":{logged},"logID":"{log_id}","logIndex":7}}"#
        );
        rcgen::SigningKey::sign(&self.log_key, signed.as_bytes()).unwrap()
    }

    /// The Rekor bundle annotation for a hashedrekord entry of this signature.
    fn rekor_bundle(
        &self,
        payload: &[u8],
        signature_b64: &str,
        cert_pem: &str,
        integrated_time: i64,
    ) -> String {
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let body = serde_json::json!({
            "apiVersion": "0.0.1",
            "kind": "hashedrekord",
            "spec": {
                "data": { "hash": { "algorithm": "sha256", "value": hex::encode(sha2::Sha256::digest(payload)) } },
                "signature": { "content": signature_b64, "publicKey": { "content": b64(cert_pem.as_bytes()) } }
            }
        });
        let body = b64(body.to_string().as_bytes());
        let log_id = hex::encode(self.log_id());
        let set = self.signed_entry_timestamp(&body, integrated_time);
        serde_json::json!({
            "SignedEntryTimestamp": b64(&set),
            "Payload": { "body": body, "integratedTime": integrated_time, "logIndex": 7, "logID": log_id }
        })
        .to_string()
    }
}

impl Lab {
    /// Signs keyless-style: cosign attaches `cert_pem` and the CA chain; then the log's entry
    /// timestamp is added to the signature layer, as cosign does when Rekor answers.
    fn sign_keyless(&self, sigstore: &Sigstore, key: &Key, cert_pem: &str, reference: &str) {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        self.sign_keyless_at(sigstore, key, cert_pem, reference, now);
    }

    /// As [`Lab::sign_keyless`], with the log claiming to have seen the signature at `logged`.
    fn sign_keyless_at(
        &self,
        sigstore: &Sigstore,
        key: &Key,
        cert_pem: &str,
        reference: &str,
        logged: i64,
    ) {
        let cert = self.path().join("leaf.pem");
        let chain = self.path().join("chain.pem");
        std::fs::write(&cert, cert_pem).unwrap();
        std::fs::write(&chain, sigstore.chain_pem()).unwrap();
        let mut args = vec!["--certificate", cert.to_str().unwrap()];
        // cosign refuses to attach a chain it finds expired; the trust root holds it anyway.
        if sigstore.root.is_none() {
            args.extend(["--certificate-chain", chain.to_str().unwrap()]);
        }
        self.sign(key, reference, true, &args);
        let digest = reference.split('@').nth(1).unwrap();
        let (repo_ref, _) = reference.split_once('@').unwrap();
        let sig_tag = format!("{repo_ref}:{}.sig", digest.replace(':', "-"));
        let mut manifest: serde_json::Value =
            serde_json::from_str(&self.crane(&["manifest", &sig_tag])).unwrap();
        let layer = &mut manifest["layers"][0];
        let payload = self.crane(&[
            "blob",
            &format!("{repo_ref}@{}", layer["digest"].as_str().unwrap()),
        ]);
        let signature = layer["annotations"]["dev.cosignproject.cosign/signature"]
            .as_str()
            .unwrap()
            .to_owned();
        layer["annotations"]["dev.sigstore.cosign/bundle"] = sigstore
            .rekor_bundle(payload.as_bytes(), &signature, cert_pem, logged)
            .into();
        self.put_manifest(&sig_tag, &manifest);
    }

    /// Signs keyless-style in the Sigstore bundle format, then adds the log entry (with its
    /// signed entry timestamp) that Rekor would have returned, re-pushing bundle, referrer
    /// manifest and referrers tag.
    fn sign_keyless_bundle(&self, sigstore: &Sigstore, key: &Key, cert_pem: &str, reference: &str) {
        self.sign_keyless_bundle_logging(sigstore, key, cert_pem, reference, None);
    }

    /// As [`Lab::sign_keyless_bundle`]; with `logged_payload`, the log entry describes that
    /// payload instead of the one signed.
    fn sign_keyless_bundle_logging(
        &self,
        sigstore: &Sigstore,
        key: &Key,
        cert_pem: &str,
        reference: &str,
        logged_payload: Option<&[u8]>,
    ) {
        let cert = self.path().join("leaf.pem");
        let chain = self.path().join("chain.pem");
        std::fs::write(&cert, cert_pem).unwrap();
        std::fs::write(&chain, sigstore.chain_pem()).unwrap();
        self.sign(
            key,
            reference,
            false,
            &[
                "--certificate",
                cert.to_str().unwrap(),
                "--certificate-chain",
                chain.to_str().unwrap(),
            ],
        );
        let (mut bundle, _) = self.bundle(reference);
        // cosign puts the chain it was given into a v0.3 bundle, which allows only the leaf (as
        // Fulcio-signed bundles carry it); the CA is in the trust root.
        let material = bundle["verificationMaterial"].as_object_mut().unwrap();
        if let Some(chain) = material.remove("x509CertificateChain") {
            material.insert("certificate".into(), chain["certificates"][0].clone());
        }

        let b64 = base64::engine::general_purpose::STANDARD;
        let envelope = &bundle["dsseEnvelope"];
        let payload = match logged_payload {
            Some(p) => p.to_vec(),
            None => b64.decode(envelope["payload"].as_str().unwrap()).unwrap(),
        };
        let signature = envelope["signatures"][0]["sig"]
            .as_str()
            .unwrap()
            .to_owned();
        let body = serde_json::json!({
            "apiVersion": "0.0.1",
            "kind": "dsse",
            "spec": {
                "envelopeHash": { "algorithm": "sha256", "value": hex::encode(sha2::Sha256::digest(envelope.to_string())) },
                "payloadHash": { "algorithm": "sha256", "value": hex::encode(sha2::Sha256::digest(&payload)) },
                "signatures": [{ "signature": signature, "verifier": b64.encode(cert_pem) }]
            }
        })
        .to_string();
        let logged = time::OffsetDateTime::now_utc().unix_timestamp();
        let set = sigstore.signed_entry_timestamp(&b64.encode(&body), logged);
        // A v0.3 bundle must carry an inclusion proof; an entry with only a signed entry
        // timestamp is a v0.1 bundle.
        bundle["mediaType"] = "application/vnd.dev.sigstore.bundle+json;version=0.1".into();
        bundle["verificationMaterial"]["tlogEntries"] = serde_json::json!([{
            "logIndex": "7",
            "logId": { "keyId": b64.encode(sigstore.log_id()) },
            "kindVersion": { "kind": "dsse", "version": "0.0.1" },
            "integratedTime": logged.to_string(),
            "inclusionPromise": { "signedEntryTimestamp": b64.encode(set) },
            "canonicalizedBody": b64.encode(&body)
        }]);

        self.replace_bundle(reference, &bundle);
    }
}

/// The self-made Sigstore runs no CT log, as a private instance may not.
fn no_ctlog() -> KeylessRequirements {
    KeylessRequirements {
        sct: false,
        ..KeylessRequirements::default()
    }
}

/// The keyless authority for exactly the test issuer and subject.
fn test_identity(sigstore: &Sigstore) -> Authority {
    keyless(
        Matcher::Exact(TEST_ISSUER.into()),
        Matcher::Exact(TEST_SUBJECT.into()),
        sigstore,
    )
}

fn keyless(issuer: Matcher, subject: Matcher, sigstore: &Sigstore) -> Authority {
    Authority::Keyless {
        issuer,
        subject,
        trust_root: TrustRoot::Custom(sigstore.trusted_root()),
        requirements: no_ctlog(),
    }
}

#[tokio::test]
async fn keyless_signatures_verify_against_a_custom_trust_root() {
    let lab = Lab::start();
    let digest = lab.push_image("app", "v1", "keyless");
    let reference = lab.reference("app", &digest);
    let sigstore = Sigstore::new();
    let key = lab.key("ephemeral");
    let cert = sigstore.issue(&key.public_pem, TEST_ISSUER, TEST_SUBJECT);
    lab.sign_keyless(&sigstore, &key, &cert, &reference);

    let exact = test_identity(&sigstore);
    let verified = lab.verify(&reference, &[exact]).await.unwrap();
    assert_eq!(verified.signer.as_deref(), Some(TEST_SUBJECT));
    assert_eq!(verified.format, SignatureFormat::SignatureTag);

    let pattern = keyless(
        Matcher::Exact(TEST_ISSUER.into()),
        Matcher::Regex(regex::Regex::new("^https://github.com/acme/.*$").unwrap()),
        &sigstore,
    );
    assert!(lab.verify(&reference, &[pattern]).await.is_ok());

    // The same certificate's key as a plain key authority also verifies the signature.
    assert!(lab.verify(&reference, &[key_authority(&key)]).await.is_ok());
}

#[tokio::test]
async fn keyless_identity_and_trust_root_mismatches_are_refused() {
    let lab = Lab::start();
    let digest = lab.push_image("app", "v1", "keyless");
    let reference = lab.reference("app", &digest);
    let sigstore = Sigstore::new();
    let key = lab.key("ephemeral");
    let cert = sigstore.issue(&key.public_pem, TEST_ISSUER, TEST_SUBJECT);
    lab.sign_keyless(&sigstore, &key, &cert, &reference);

    let wrong_subject = keyless(
        Matcher::Exact(TEST_ISSUER.into()),
        Matcher::Regex(regex::Regex::new("^https://github.com/evil/").unwrap()),
        &sigstore,
    );
    let tried = no_trusted(lab.verify(&reference, &[wrong_subject]).await);
    assert!(tried[0].contains("does not match"), "{tried:?}");

    let wrong_issuer = keyless(
        Matcher::Exact("https://accounts.google.com".into()),
        Matcher::Exact(TEST_SUBJECT.into()),
        &sigstore,
    );
    let tried = no_trusted(lab.verify(&reference, &[wrong_issuer]).await);
    assert!(tried[0].contains("issuer"), "{tried:?}");

    // Another CA and log: neither the certificate nor the entry timestamp is trusted.
    let stranger = Sigstore::new();
    let other_root = test_identity(&stranger);
    let tried = no_trusted(lab.verify(&reference, &[other_root]).await);
    assert!(
        tried[0].contains("No log key valid at integrated time"),
        "{tried:?}"
    );

    // The public-good root does not trust a self-made CA.
    let public_good = Authority::Keyless {
        issuer: Matcher::Exact(TEST_ISSUER.into()),
        subject: Matcher::Exact(TEST_SUBJECT.into()),
        trust_root: TrustRoot::PublicGood,
        requirements: no_ctlog(),
    };
    no_trusted(lab.verify(&reference, &[public_good]).await);
}

#[tokio::test]
async fn a_keyless_authority_can_require_a_timestamp_beyond_the_log_time() {
    let lab = Lab::start();
    let digest = lab.push_image("app", "v1", "log time only");
    let reference = lab.reference("app", &digest);
    let sigstore = Sigstore::new();
    let key = lab.key("ephemeral");
    let cert = sigstore.issue(&key.public_pem, TEST_ISSUER, TEST_SUBJECT);
    lab.sign_keyless(&sigstore, &key, &cert, &reference);
    // A Rekor v1 signed entry timestamp is a verified time, but not an RFC 3161 timestamp.
    let requiring = Authority::Keyless {
        issuer: Matcher::Exact(TEST_ISSUER.into()),
        subject: Matcher::Exact(TEST_SUBJECT.into()),
        trust_root: TrustRoot::Custom(sigstore.trusted_root()),
        requirements: KeylessRequirements {
            timestamp: true,
            ..no_ctlog()
        },
    };
    let tried = no_trusted(lab.verify(&reference, &[requiring]).await);
    assert!(
        tried[0].contains("requires an RFC 3161 timestamp and there is none"),
        "{tried:?}"
    );
}

#[tokio::test]
async fn a_keyless_signature_without_log_evidence_is_refused() {
    let lab = Lab::start();
    let digest = lab.push_image("app", "v1", "no log");
    let reference = lab.reference("app", &digest);
    let sigstore = Sigstore::new();
    let key = lab.key("ephemeral");
    let cert = sigstore.issue(&key.public_pem, TEST_ISSUER, TEST_SUBJECT);
    let cert_path = lab.path().join("leaf.pem");
    std::fs::write(&cert_path, &cert).unwrap();
    lab.sign(
        &key,
        &reference,
        true,
        &["--certificate", cert_path.to_str().unwrap()],
    );
    let authority = test_identity(&sigstore);
    let tried = no_trusted(lab.verify(&reference, &[authority]).await);
    assert!(tried[0].contains("no transparency-log entry"), "{tried:?}");
}

#[tokio::test]
async fn a_log_entry_for_another_signature_does_not_vouch_for_this_one() {
    let lab = Lab::start();
    let first = lab.push_image("app", "v1", "one");
    let second = lab.push_image("app", "v2", "two");
    let sigstore = Sigstore::new();
    let key = lab.key("ephemeral");
    let cert = sigstore.issue(&key.public_pem, TEST_ISSUER, TEST_SUBJECT);
    lab.sign_keyless(&sigstore, &key, &cert, &lab.reference("app", &first));
    lab.sign_keyless(&sigstore, &key, &cert, &lab.reference("app", &second));

    // Graft the first signature's (genuine) log entry onto the second signature.
    let sig_tag = |d: &str| format!("{}/app:{}.sig", lab.host, d.replace(':', "-"));
    let donor: serde_json::Value =
        serde_json::from_str(&lab.crane(&["manifest", &sig_tag(&first)])).unwrap();
    let mut target: serde_json::Value =
        serde_json::from_str(&lab.crane(&["manifest", &sig_tag(&second)])).unwrap();
    target["layers"][0]["annotations"]["dev.sigstore.cosign/bundle"] =
        donor["layers"][0]["annotations"]["dev.sigstore.cosign/bundle"].clone();
    lab.put_manifest(&sig_tag(&second), &target);

    let authority = test_identity(&sigstore);
    let tried = no_trusted(
        lab.verify(
            &lab.reference("app", &second),
            std::slice::from_ref(&authority),
        )
        .await,
    );
    assert!(
        tried[0].contains("artifact hash mismatch for hashedrekord entry"),
        "{tried:?}"
    );
    assert!(
        lab.verify(&lab.reference("app", &first), &[authority])
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn a_certificate_from_an_untrusted_ca_is_refused_even_with_a_trusted_log() {
    let lab = Lab::start();
    let digest = lab.push_image("app", "v1", "rogue ca");
    let reference = lab.reference("app", &digest);
    let genuine = Sigstore::new();
    let rogue = Sigstore::new();
    let key = lab.key("ephemeral");
    // The rogue CA issues the certificate; a log the root trusts vouches for the signature.
    let cert = rogue.issue(&key.public_pem, TEST_ISSUER, TEST_SUBJECT);
    lab.sign_keyless(&rogue, &key, &cert, &reference);
    let authority = Authority::Keyless {
        issuer: Matcher::Exact(TEST_ISSUER.into()),
        subject: Matcher::Exact(TEST_SUBJECT.into()),
        trust_root: TrustRoot::Custom(genuine.trusted_root_with_log_of(&rogue)),
        requirements: no_ctlog(),
    };
    let tried = no_trusted(lab.verify(&reference, &[authority]).await);
    assert!(
        tried[0].contains("certificate chain is invalid"),
        "{tried:?}"
    );
}

#[tokio::test]
async fn a_certificate_is_judged_at_the_log_time_not_now() {
    let lab = Lab::start();
    let sigstore = Sigstore::new();
    let key = lab.key("ephemeral");
    let now = time::OffsetDateTime::now_utc();
    // A Fulcio-style certificate that expired over an hour ago.
    let issued = now - time::Duration::hours(2);
    let cert = sigstore.issue_at(&key.public_pem, TEST_ISSUER, TEST_SUBJECT, issued);
    let authority = test_identity(&sigstore);

    // Logged while the certificate was valid: still good today.
    let in_time = lab.reference("app", &lab.push_image("app", "v1", "in time"));
    let logged = (issued + time::Duration::minutes(5)).unix_timestamp();
    lab.sign_keyless_at(&sigstore, &key, &cert, &in_time, logged);
    let verified = lab.verify(&in_time, std::slice::from_ref(&authority)).await;
    assert!(verified.is_ok(), "{verified:?}");

    // Logged after it expired: the key may have leaked since; refused.
    let late = lab.reference("app", &lab.push_image("app", "v2", "late"));
    lab.sign_keyless_at(&sigstore, &key, &cert, &late, now.unix_timestamp());
    let tried = no_trusted(lab.verify(&late, &[authority]).await);
    assert!(tried[0].contains("CertExpired"), "{tried:?}");
}

#[tokio::test]
async fn a_certificate_from_an_expired_intermediate_is_refused() {
    let lab = Lab::start();
    let key = lab.key("ephemeral");
    let now = time::OffsetDateTime::now_utc();

    // The intermediate expired an hour ago; the leaf it issued since is valid now, when the
    // log saw the signature (cosign GHSA-wfqv-66vq-46rm).
    let expired = Sigstore::with_intermediate(now - time::Duration::hours(1));
    let cert = expired.issue(&key.public_pem, TEST_ISSUER, TEST_SUBJECT);
    let reference = lab.reference("app", &lab.push_image("app", "v1", "expired"));
    lab.sign_keyless(&expired, &key, &cert, &reference);
    let tried = no_trusted(lab.verify(&reference, &[test_identity(&expired)]).await);
    assert!(
        tried[0].contains("of the trust root was not valid at"),
        "{tried:?}"
    );

    // The same shape with an intermediate still valid verifies.
    let valid = Sigstore::with_intermediate(now + time::Duration::hours(1));
    let cert = valid.issue(&key.public_pem, TEST_ISSUER, TEST_SUBJECT);
    let reference = lab.reference("app", &lab.push_image("app", "v2", "valid"));
    lab.sign_keyless(&valid, &key, &cert, &reference);
    let verified = lab.verify(&reference, &[test_identity(&valid)]).await;
    assert!(verified.is_ok(), "{verified:?}");
}

#[tokio::test]
async fn keyless_bundle_signatures_verify_for_the_right_identity_and_digest() {
    let lab = Lab::start();
    let digest = lab.push_image("app", "v1", "keyless bundle");
    let reference = lab.reference("app", &digest);
    let sigstore = Sigstore::new();
    let key = lab.key("ephemeral");
    let cert = sigstore.issue(&key.public_pem, TEST_ISSUER, TEST_SUBJECT);
    lab.sign_keyless_bundle(&sigstore, &key, &cert, &reference);

    let authority = test_identity(&sigstore);
    let verified = lab
        .verify(&reference, std::slice::from_ref(&authority))
        .await;
    let verified = verified.unwrap();
    assert_eq!(verified.format, SignatureFormat::Bundle);
    assert_eq!(verified.signer.as_deref(), Some(TEST_SUBJECT));

    let wrong_subject = keyless(
        Matcher::Exact(TEST_ISSUER.into()),
        Matcher::Exact("someone@else.example".into()),
        &sigstore,
    );
    let tried = no_trusted(lab.verify(&reference, &[wrong_subject]).await);
    assert!(tried[0].contains("does not match"), "{tried:?}");

    // Another image signed by the same identity: its bundle's entry does not cover this one.
    let other = lab.reference("app", &lab.push_image("app", "v2", "other bundle"));
    lab.sign_keyless_bundle(&sigstore, &key, &cert, &other);
    let tag = |d: &str| format!("{}/app:{}", lab.host, d.replace(':', "-"));
    let other_digest = other.split('@').nth(1).unwrap();
    lab.crane(&["cp", &tag(other_digest), &tag(&digest)]);
    let tried = no_trusted(lab.verify(&reference, &[authority]).await);
    assert!(tried[0].contains(&format!("not {digest}")), "{tried:?}");
}

#[tokio::test]
async fn a_bundle_whose_log_entry_describes_another_payload_is_refused() {
    let lab = Lab::start();
    let reference = lab.reference("app", &lab.push_image("app", "v1", "mismatch"));
    let sigstore = Sigstore::new();
    let key = lab.key("ephemeral");
    let cert = sigstore.issue(&key.public_pem, TEST_ISSUER, TEST_SUBJECT);
    lab.sign_keyless_bundle_logging(
        &sigstore,
        &key,
        &cert,
        &reference,
        Some(b"another statement"),
    );
    let authority = test_identity(&sigstore);
    let tried = no_trusted(lab.verify(&reference, &[authority]).await);
    assert!(
        tried[0].contains("log entry does not match the bundle: DSSE payload hash mismatch"),
        "{tried:?}"
    );
}

#[tokio::test]
async fn backdating_the_log_time_breaks_the_entry_timestamp() {
    let lab = Lab::start();
    let digest = lab.push_image("app", "v1", "backdated");
    let reference = lab.reference("app", &digest);
    let sigstore = Sigstore::new();
    let key = lab.key("ephemeral");
    let issued = time::OffsetDateTime::now_utc() - time::Duration::hours(2);
    let cert = sigstore.issue_at(&key.public_pem, TEST_ISSUER, TEST_SUBJECT, issued);
    lab.sign_keyless(&sigstore, &key, &cert, &reference);
    // Claim the log saw it while the certificate was valid.
    let sig_tag = format!("{}/app:{}.sig", lab.host, digest.replace(':', "-"));
    let mut manifest: serde_json::Value =
        serde_json::from_str(&lab.crane(&["manifest", &sig_tag])).unwrap();
    let annotation = &mut manifest["layers"][0]["annotations"]["dev.sigstore.cosign/bundle"];
    let mut rekor: serde_json::Value = serde_json::from_str(annotation.as_str().unwrap()).unwrap();
    rekor["Payload"]["integratedTime"] = (issued + time::Duration::minutes(5))
        .unix_timestamp()
        .into();
    *annotation = rekor.to_string().into();
    lab.put_manifest(&sig_tag, &manifest);

    let authority = test_identity(&sigstore);
    let tried = no_trusted(lab.verify(&reference, &[authority]).await);
    assert!(tried[0].contains("SET verification failed"), "{tried:?}");
}

/// Not a correctness test: prints how a cold verification compares with `cosign verify` on the
/// same image and how many requests the registry logged. Run with
/// `cargo test --test verify -- --ignored --nocapture timing`.
#[tokio::test]
#[ignore = "measurement, not a check"]
async fn timing_against_cosign_verify() {
    let lab = Lab::start();
    let key = lab.key("trusted");
    let pub_path = key.private.with_file_name("cosign.pub");
    for (label, classic) in [("classic .sig", true), ("bundle", false)] {
        for round in 0..3 {
            let digest = lab.push_image(
                "app",
                &format!("t{classic}{round}"),
                &format!("{label}{round}"),
            );
            let reference = lab.reference("app", &digest);
            lab.sign(&key, &reference, classic, &[]);

            let started = Instant::now();
            let verifier = Verifier::new(lab.options()).unwrap();
            let setup = started.elapsed();
            let before = lab.logged_requests();
            let started = Instant::now();
            let verified = verifier
                .verify(
                    &ImageReference::parse(&reference).unwrap(),
                    &[key_authority(&key)],
                )
                .await
                .unwrap();
            let ours = started.elapsed();
            let ours_logged = lab.logged_requests() - before;

            let started = Instant::now();
            let image = ImageReference::parse(&reference).unwrap();
            verifier
                .verify(&image, &[key_authority(&key)])
                .await
                .unwrap();
            let warm = started.elapsed();

            let before = lab.logged_requests();
            let started = Instant::now();
            let mut args = vec![
                "verify",
                "--key",
                pub_path.to_str().unwrap(),
                "--insecure-ignore-tlog=true",
                "--allow-http-registry",
            ];
            if classic {
                args.push("--new-bundle-format=false");
            }
            args.push(&reference);
            run(lab.path(), "cosign", &args);
            let cosign = started.elapsed();
            let cosign_logged = lab.logged_requests() - before;
            println!(
                "{label} #{round}: fixity Verifier::new {setup:?} + cold verify {ours:?} ({} requests \
                 counted, {ours_logged} logged), same verifier again {warm:?}, cosign verify \
                 {cosign:?} ({cosign_logged} logged)",
                verified.registry_requests
            );
        }
    }
}

async fn verify_threshold(
    lab: &Lab,
    reference: &str,
    authorities: &[Authority],
    min: usize,
) -> Result<Verified, VerifyError> {
    Verifier::new(lab.options())
        .unwrap()
        .verify_threshold(
            &ImageReference::parse(reference).unwrap(),
            authorities,
            min,
            &[],
        )
        .await
}

/// `minAuthorities: 2` with two real cosign keys: one signature is not enough, and the
/// refusal names who signed; a second key's signature (here as a bundle, so both formats are
/// read) makes two; one key listed twice is still one signer.
#[tokio::test]
async fn two_distinct_keys_must_sign_when_two_authorities_are_required() {
    let lab = Lab::start();
    let (release, scanner) = (lab.key("release"), lab.key("scanner"));
    let reference = lab.reference("app", &lab.push_image("app", "v1", "two signers"));
    let both = [key_authority(&release), key_authority(&scanner)];
    lab.sign(&release, &reference, true, &[]);

    let release_described = both[0].describe();
    match verify_threshold(&lab, &reference, &both, 2).await {
        Err(e @ VerifyError::TooFewAuthorities { .. }) => {
            let text = e.to_string();
            assert!(
                text.starts_with(&format!(
                    "2 distinct authorities must sign this digest and 1 did ({release_described});"
                )),
                "{text}"
            );
        }
        other => panic!("one signer of two: {other:?}"),
    }
    assert!(verify_threshold(&lab, &reference, &both, 1).await.is_ok());

    lab.sign(&scanner, &reference, false, &[]);
    let verified = verify_threshold(&lab, &reference, &both, 2).await.unwrap();
    assert!(
        verified.description.contains(&release_described)
            && verified.description.contains(&both[1].describe()),
        "{verified:?}"
    );

    let twice = [key_authority(&release), key_authority(&release)];
    match verify_threshold(&lab, &reference, &twice, 2).await {
        Err(VerifyError::TooFewAuthorities { signed_by, .. }) => {
            assert_eq!(signed_by.len(), 1, "{signed_by:?}");
        }
        other => panic!("one key listed twice: {other:?}"),
    }
    // Nobody signed: still the threshold's explanation, not "unsigned".
    let unsigned = lab.reference("app", &lab.push_image("app", "v2", "nobody"));
    match verify_threshold(&lab, &unsigned, &both, 2).await {
        Err(VerifyError::Unsigned) => {}
        other => panic!("no signature at all: {other:?}"),
    }
}

/// One keyless identity matched by two overlapping authorities is one signer: it cannot make
/// up a threshold of two on its own (Kubewarden's `minimumMatches` counts it twice).
#[tokio::test]
async fn one_keyless_signer_counts_once_for_overlapping_authorities() {
    let lab = Lab::start();
    let reference = lab.reference("app", &lab.push_image("app", "v1", "one identity"));
    let sigstore = Sigstore::new();
    let key = lab.key("ephemeral");
    let cert = sigstore.issue(&key.public_pem, TEST_ISSUER, TEST_SUBJECT);
    lab.sign_keyless(&sigstore, &key, &cert, &reference);
    // The same identity signs again, with another certificate and key.
    let again = lab.key("ephemeral-2");
    let cert2 = sigstore.issue(&again.public_pem, TEST_ISSUER, TEST_SUBJECT);
    lab.sign_keyless_bundle(&sigstore, &again, &cert2, &reference);

    let overlapping = [
        test_identity(&sigstore),
        keyless(
            Matcher::Exact(TEST_ISSUER.into()),
            Matcher::Regex(regex::Regex::new("^https://github.com/acme/").unwrap()),
            &sigstore,
        ),
    ];
    match verify_threshold(&lab, &reference, &overlapping, 2).await {
        Err(VerifyError::TooFewAuthorities { signed_by, .. }) => {
            assert_eq!(signed_by.len(), 1, "{signed_by:?}");
            assert!(signed_by[0].contains(TEST_SUBJECT), "{signed_by:?}");
        }
        other => panic!("one identity for two authorities: {other:?}"),
    }
    // A key signature besides it is a second signer.
    let release = lab.key("release");
    lab.sign(&release, &reference, true, &[]);
    let mixed = [overlapping[1].clone(), key_authority(&release)];
    let verified = verify_threshold(&lab, &reference, &mixed, 2).await.unwrap();
    assert!(verified.signer.unwrap().contains(TEST_SUBJECT));
}

/// Per-team trust through the webhook: one rule binds `<registry>/acme/<team>/**` to the
/// `https://github.com/acme/<team>/` workflows and `<registry>/ns/**` to the request's
/// namespace, with real keyless signatures. A path segment holding a regexp metacharacter
/// (`team.a`) matches only itself, a namespace that differs is refused, and each expanded
/// identity is cached apart.
#[tokio::test]
async fn identity_templates_bind_signers_to_path_segments_and_namespaces() {
    use common::review::{message, pod_review, post, state};

    let lab = Lab::start();
    let sigstore = Sigstore::new();
    let workflow = |team: &str| {
        format!("https://github.com/acme/{team}/.github/workflows/release.yml@refs/heads/main")
    };
    let sign = |repo: &str, subject: &str| {
        let reference = lab.reference(repo, &lab.push_image(repo, "v1", repo));
        let key = lab.key(&repo.replace('/', "-"));
        let cert = sigstore.issue(&key.public_pem, TEST_ISSUER, subject);
        lab.sign_keyless(&sigstore, &key, &cert, &reference);
        reference
    };
    let team_a = sign("acme/team-a/app", &workflow("team-a"));
    let stolen = sign("acme/team-b/app", &workflow("team-a"));
    // `.` unescaped would let the workflows of `teamXa` sign for `team.a`.
    let dotted = sign("acme/team.a/app", &workflow("teamXa"));
    let by_namespace = sign("ns/app", &workflow("shop"));
    let too_short = sign("solo", &workflow("solo"));

    let root = serde_json::to_string(&sigstore.trusted_root()).unwrap();
    let keyless = |images: &str, subject: &str| {
        format!(
            "    - images: ['{}/{images}']\n      authorities:\n      - keyless:\n          issuer: {TEST_ISSUER}\n          {subject}\n          ctlog: {{disabled: true}}\n          trustRoot: {{trustedRootJson: {root}}}\n",
            lab.host
        )
    };
    let yaml = format!(
        "apiVersion: fixity.dev/v1alpha1\nkind: ImmutabilityPolicy\nmetadata: {{name: teams}}\nspec:\n  images:\n    verify:\n{}{}{}",
        keyless(
            "acme/**",
            "subjectRegExp: 'https://github.com/acme/${image.path[1]}/.github/workflows/.*'"
        ),
        keyless(
            "ns/**",
            "subject: 'https://github.com/acme/${namespace}/.github/workflows/release.yml@refs/heads/main'"
        ),
        keyless(
            "solo",
            "subjectRegExp: 'https://github.com/acme/${image.path[1]}/.*'"
        ),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("teams.yaml");
    std::fs::write(&path, yaml).unwrap();
    let policies = fixity::policy::files::load(&[path]).unwrap();
    let state = state(policies, lab.options(), Duration::from_secs(8));
    let review = |image: &str, namespace: &str| {
        let mut body: serde_json::Value = serde_json::from_slice(&pod_review(image)).unwrap();
        body["request"]["namespace"] = namespace.into();
        serde_json::to_vec(&body).unwrap()
    };

    assert_eq!(post(&state, review(&team_a, "any")).await["allowed"], true);
    for (image, namespace, needle) in [
        (
            &stolen,
            "any",
            r"subject=/^(?:https://github.com/acme/team\-b/",
        ),
        (
            &dotted,
            "any",
            r"subject=/^(?:https://github.com/acme/team\.a/",
        ),
        (&too_short, "any", "has no path segment 1"),
    ] {
        let r = post(&state, review(image, namespace)).await;
        assert_eq!(r["allowed"], false, "{image}: {r}");
        let text = message(&r);
        assert!(
            text.contains("UnsignedImage") && text.contains(needle),
            "{image}: {text}"
        );
    }
    assert_eq!(
        post(&state, review(&by_namespace, "shop")).await["allowed"],
        true
    );
    // Right after the namespace that verified: a cached answer for "shop" must not serve "cart".
    let r = post(&state, review(&by_namespace, "cart")).await;
    assert_eq!(r["allowed"], false, "{r}");
    assert!(
        message(&r).contains("/acme/cart/.github/workflows/release.yml"),
        "{}",
        message(&r)
    );
}
