//! What oci-client 0.18's `Client` does against the test registry of tests/common/hostile.rs:
//! the reasons, one test each, why src/verify/registry.rs keeps its own HTTP exchange and takes
//! only the OCI formats from oci-client (see that module's doc).
//!
//! Each test asserts the crate's behaviour today. When one fails after an upgrade, oci-client
//! may now keep that guarantee, and the registry module should be looked at again.

mod common;

use futures::StreamExt as _;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::{OCI_IMAGE_MEDIA_TYPE, OciDescriptor};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use common::hostile::{Hostile, OCI_MANIFEST, Reply, digest_of, manifest_with};

fn client(hosts: &[&str]) -> Client {
    Client::new(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(hosts.iter().map(|h| h.to_string()).collect()),
        ..ClientConfig::default()
    })
}

fn tagged(host: &str) -> Reference {
    Reference::with_tag(host.to_owned(), "app".to_owned(), "sig".to_owned())
}

fn robot() -> RegistryAuth {
    RegistryAuth::Basic("robot".to_owned(), "s3cret".to_owned())
}

#[tokio::test]
async fn oci_client_reads_a_100_mb_manifest_whole() {
    let registry = Hostile::start(|s| {
        if s.path() == "/v2/app/manifests/sig" {
            Reply::Stream {
                prefix: b"{\"schemaVersion\":2,".to_vec(),
                total: 100_000_000,
                announce: false,
                chunk: 64 << 10,
                pause: std::time::Duration::ZERO,
            }
        } else {
            Reply::status(404)
        }
    })
    .await;
    let (body, _) = client(&[&registry.host])
        .pull_manifest_raw(
            &tagged(&registry.host),
            &RegistryAuth::Anonymous,
            &[OCI_IMAGE_MEDIA_TYPE],
        )
        .await
        .unwrap();
    assert_eq!(body.len(), 100_000_000);
}

#[tokio::test]
async fn oci_client_pings_the_registry_before_every_request() {
    let payload = b"a signature payload".to_vec();
    let layer = digest_of(&payload);
    let manifest = manifest_with(vec![common::hostile::signature_layer(
        &layer,
        payload.len() as u64,
    )]);
    let blob_path = format!("/v2/app/blobs/{layer}");
    let registry = Hostile::start(move |s| match s.path() {
        "/v2/" => Reply::status(200),
        "/v2/app/manifests/sig" => Reply::json(OCI_MANIFEST, manifest.clone()),
        p if p == blob_path => Reply::json("application/octet-stream", payload.clone()),
        _ => Reply::status(404),
    })
    .await;
    let client = client(&[&registry.host]);
    let reference = tagged(&registry.host);
    client
        .pull_manifest_raw(
            &reference,
            &RegistryAuth::Anonymous,
            &[OCI_IMAGE_MEDIA_TYPE],
        )
        .await
        .unwrap();
    let descriptor = OciDescriptor {
        digest: layer.clone(),
        ..OciDescriptor::default()
    };
    let mut stream = client
        .pull_blob_stream(&reference, &descriptor)
        .await
        .unwrap();
    while stream.next().await.is_some() {}

    let paths: Vec<String> = registry
        .seen()
        .iter()
        .map(|s| s.path().to_owned())
        .collect();
    // fixity's client sends the last two only.
    assert_eq!(
        paths,
        [
            "/v2/".to_owned(),
            "/v2/app/manifests/sig".to_owned(),
            "/v2/".to_owned(),
            format!("/v2/app/blobs/{layer}"),
        ]
    );
}

#[tokio::test]
async fn oci_client_lets_the_first_credentials_serve_later_anonymous_calls() {
    let registry = Hostile::start(|s| match s.authorization {
        Some(_) => Reply::json(OCI_MANIFEST, manifest_with(Vec::new())),
        None => Reply::with_header(401, "www-authenticate", "Basic realm=\"test\""),
    })
    .await;
    let client = client(&[&registry.host]);
    let reference = tagged(&registry.host);
    client
        .pull_manifest_raw(&reference, &robot(), &[OCI_IMAGE_MEDIA_TYPE])
        .await
        .unwrap();
    let before = registry.requests();
    // Another caller, without credentials, on the same client.
    client
        .pull_manifest_raw(
            &reference,
            &RegistryAuth::Anonymous,
            &[OCI_IMAGE_MEDIA_TYPE],
        )
        .await
        .unwrap();
    let later = &registry.seen()[before..];
    assert!(
        later.iter().all(|s| s.authorization.is_some()),
        "the anonymous call went with the robot's credentials: {later:?}"
    );
}

#[tokio::test]
async fn oci_client_sends_basic_credentials_to_a_token_realm_on_any_host() {
    let foreign = Hostile::start(|_| Reply::json("application/json", r#"{"token":"t"}"#)).await;
    let realm = format!("http://{}/token", foreign.host);
    let registry = Hostile::start(move |_| {
        Reply::with_header(
            401,
            "www-authenticate",
            &format!("Bearer realm=\"{realm}\",service=\"test\""),
        )
    })
    .await;
    let _ = client(&[&registry.host])
        .pull_manifest_raw(&tagged(&registry.host), &robot(), &[OCI_IMAGE_MEDIA_TYPE])
        .await;
    let sent = foreign.authorizations();
    assert!(
        sent.iter().any(|a| a.starts_with("Basic ")),
        "the foreign token service got {sent:?}"
    );
}

#[tokio::test]
async fn oci_client_cannot_tell_a_refusal_from_a_rate_limit() {
    let envelope = r#"{"errors":[{"code":"DENIED","message":"no"}]}"#;
    let answering = |status: u16| {
        Hostile::start(move |_| Reply::Body {
            status,
            content_type: "application/json".to_owned(),
            headers: Vec::new(),
            body: envelope.as_bytes().to_vec(),
        })
    };
    for status in [403, 429] {
        let registry = answering(status).await;
        let error = client(&[&registry.host])
            .pull_manifest_raw(
                &tagged(&registry.host),
                &RegistryAuth::Anonymous,
                &[OCI_IMAGE_MEDIA_TYPE],
            )
            .await
            .unwrap_err();
        assert!(
            matches!(error, OciDistributionError::RegistryError { .. }),
            "{status}: {error:?}"
        );
        // The error names the registry, whose random port may hold the digits too.
        let text = error.to_string().replace(&registry.host, "<registry>");
        assert!(!text.contains(&status.to_string()), "{error}");
    }
}

#[tokio::test]
async fn oci_client_reads_a_refused_referrers_tag_as_no_referrers() {
    let registry = Hostile::start(|s| {
        if s.path().contains("/referrers/") {
            Reply::status(404)
        } else {
            Reply::Body {
                status: 403,
                content_type: "application/json".to_owned(),
                headers: Vec::new(),
                body: br#"{"errors":[{"code":"DENIED","message":"no"}]}"#.to_vec(),
            }
        }
    })
    .await;
    let image = Reference::with_digest(
        registry.host.clone(),
        "app".to_owned(),
        digest_of(b"an image"),
    );
    let index = client(&[&registry.host])
        .pull_referrers(&image, None)
        .await
        .unwrap();
    assert!(index.manifests.is_empty());
}
