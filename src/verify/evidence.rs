//! Turns what the registry holds into uniform evidence: the signed bytes, the signature, the
//! digests the signed statement names, and the signer's certificate and log entry if any.
//!
//! Nothing here is trusted yet; [`super::check`] decides.

use base64::Engine as _;
use futures::future::join_all;
use sigstore::cosign::bundle::Bundle as RekorBundle;
use sigstore::cosign::payload::SimpleSigning;
use sigstore_protobuf_specs::dev::sigstore::bundle::v1::{
    Bundle, bundle::Content as BundleContent, verification_material::Content as Material,
};

use super::registry::{Descriptor, Fetched, Manifest, Session};

const SIMPLE_SIGNING_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
const CERTIFICATE_ANNOTATION: &str = "dev.sigstore.cosign/certificate";
const CHAIN_ANNOTATION: &str = "dev.sigstore.cosign/chain";
const REKOR_BUNDLE_ANNOTATION: &str = "dev.sigstore.cosign/bundle";
const SIMPLE_SIGNING_TYPE: &str = "cosign container image signature";
const BUNDLE_MEDIA_TYPE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";
const IN_TOTO_PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
const COSIGN_SIGN_PREDICATE: &str = "https://sigstore.dev/cosign/sign/v1";
const IN_TOTO_STATEMENT_TYPES: [&str; 2] = [
    "https://in-toto.io/Statement/v1",
    "https://in-toto.io/Statement/v0.1",
];
/// Signature payloads and bundles are a few KiB.
const MAX_SIGNATURE_BLOB_BYTES: usize = 1 << 20;
/// More signatures than this on one image is abuse, not signing.
const MAX_SIGNATURES: usize = 16;

/// One signature found for an image, not yet trusted.
#[derive(Debug, Clone)]
pub(super) struct Evidence {
    /// Where it was found, for explanations.
    pub origin: String,
    /// The exact bytes the signature covers (a simple-signing payload, or a DSSE PAE).
    pub signed: Vec<u8>,
    pub signature: Vec<u8>,
    /// The payload a transparency-log entry hashes (equal to `signed` for simple signing).
    pub logged_payload: Vec<u8>,
    /// Digests (`sha256:<hex>`) the signed statement names.
    pub subject_digests: Vec<String>,
    /// The signer's certificate (DER) when signed keyless, and the chain that came with it.
    pub certificate: Option<Vec<u8>>,
    pub chain: Vec<Vec<u8>>,
    /// The transparency-log entry, or why there is none usable.
    pub tlog: Result<TlogEntry, String>,
}

/// A Rekor entry with its signed entry timestamp (inclusion promise).
#[derive(Debug, Clone)]
pub(super) struct TlogEntry {
    /// The canonicalized entry body, base64 as Rekor signs it.
    pub body_base64: String,
    pub integrated_time: i64,
    pub log_index: i64,
    /// Hex of the log's key id.
    pub log_id: String,
    pub signed_entry_timestamp: Vec<u8>,
}

type Found = Fetched<Vec<Result<Evidence, String>>>;

/// Signatures under the cosign `sha256-<hex>.sig` tag.
pub(super) async fn from_signature_tag(session: &Session<'_>, digest: &str) -> Found {
    let tag = format!("{}.sig", digest.replacen(':', "-", 1));
    let manifest = match session.manifest(&tag).await {
        Fetched::Found(m) => m,
        Fetched::NotFound => return Fetched::NotFound,
        Fetched::Unavailable(e) => return Fetched::Unavailable(e),
    };
    let layers: Vec<&Descriptor> = manifest
        .layers
        .iter()
        .filter(|l| l.media_type == SIMPLE_SIGNING_MEDIA_TYPE)
        .take(MAX_SIGNATURES)
        .collect();
    if layers.is_empty() {
        return Fetched::Found(vec![Err(format!("{tag} holds no simple-signing layer"))]);
    }
    let blobs = join_all(
        layers
            .iter()
            .map(|l| session.blob(&l.digest, MAX_SIGNATURE_BLOB_BYTES)),
    )
    .await;
    let mut items = Vec::with_capacity(layers.len());
    for (layer, blob) in layers.into_iter().zip(blobs) {
        let origin = format!("{tag} layer {}", short(&layer.digest));
        match blob {
            Fetched::Found(payload) => items.push(
                simple_signing(&layer.annotations, payload, &origin)
                    .map_err(|e| format!("{origin}: {e}")),
            ),
            Fetched::NotFound => items.push(Err(format!("{origin}: the layer blob is missing"))),
            Fetched::Unavailable(e) => return Fetched::Unavailable(e),
        }
    }
    Fetched::Found(items)
}

/// Sigstore bundles attached to the image as OCI referrers.
pub(super) async fn from_referrers(session: &Session<'_>, digest: &str) -> Found {
    let index = match session.referrers(digest, BUNDLE_MEDIA_TYPE).await {
        Fetched::Found(index) => index,
        Fetched::NotFound => return Fetched::NotFound,
        Fetched::Unavailable(e) => return Fetched::Unavailable(e),
    };
    let entries: Vec<&Descriptor> = index
        .manifests
        .iter()
        .filter(|m| m.artifact_type.as_deref() == Some(BUNDLE_MEDIA_TYPE))
        .take(MAX_SIGNATURES)
        .collect();
    if entries.is_empty() {
        return Fetched::NotFound;
    }
    let fetched = join_all(entries.iter().map(|e| bundle_of(session, &e.digest))).await;
    let mut items = Vec::with_capacity(fetched.len());
    for result in fetched {
        match result {
            Fetched::Found(item) => items.push(item),
            Fetched::NotFound => {}
            Fetched::Unavailable(e) => return Fetched::Unavailable(e),
        }
    }
    if items.is_empty() {
        Fetched::NotFound
    } else {
        Fetched::Found(items)
    }
}

/// Fetches the bundle layer of one referrer manifest.
async fn bundle_of(
    session: &Session<'_>,
    manifest_digest: &str,
) -> Fetched<Result<Evidence, String>> {
    let origin = format!("bundle {}", short(manifest_digest));
    let manifest: Manifest = match session.manifest(manifest_digest).await {
        Fetched::Found(m) => m,
        Fetched::NotFound => {
            return Fetched::Found(Err(format!("{origin}: the referrer manifest is missing")));
        }
        Fetched::Unavailable(e) => return Fetched::Unavailable(e),
    };
    let Some(layer) = manifest
        .layers
        .iter()
        .find(|l| l.media_type == BUNDLE_MEDIA_TYPE)
    else {
        return Fetched::Found(Err(format!("{origin}: no bundle layer")));
    };
    match session.blob(&layer.digest, MAX_SIGNATURE_BLOB_BYTES).await {
        Fetched::Found(bytes) => {
            Fetched::Found(sigstore_bundle(&bytes, &origin).map_err(|e| format!("{origin}: {e}")))
        }
        Fetched::NotFound => Fetched::Found(Err(format!("{origin}: the bundle blob is missing"))),
        Fetched::Unavailable(e) => Fetched::Unavailable(e),
    }
}

/// A simple-signing layer: the payload is what was signed; signature, certificate and Rekor
/// bundle travel in the layer's annotations.
fn simple_signing(
    annotations: &std::collections::BTreeMap<String, String>,
    payload: Vec<u8>,
    origin: &str,
) -> Result<Evidence, String> {
    let signature = annotations
        .get(SIGNATURE_ANNOTATION)
        .ok_or("no signature annotation")?;
    let signature = b64(signature).map_err(|e| format!("signature annotation: {e}"))?;
    let parsed: SimpleSigning = serde_json::from_slice(&payload)
        .map_err(|e| format!("the payload is not simple signing: {e}"))?;
    if parsed.critical.type_name != SIMPLE_SIGNING_TYPE {
        return Err(format!(
            "the payload type is {:?}, not {SIMPLE_SIGNING_TYPE:?}",
            parsed.critical.type_name
        ));
    }
    let certificate = match annotations.get(CERTIFICATE_ANNOTATION) {
        Some(pem) if !pem.trim().is_empty() => Some(
            pem_blocks(pem)
                .map_err(|e| format!("certificate annotation: {e}"))?
                .into_iter()
                .next()
                .ok_or("empty certificate annotation")?,
        ),
        _ => None,
    };
    let chain = match annotations.get(CHAIN_ANNOTATION) {
        Some(pem) => pem_blocks(pem).map_err(|e| format!("chain annotation: {e}"))?,
        None => Vec::new(),
    };
    let tlog = match annotations.get(REKOR_BUNDLE_ANNOTATION) {
        Some(raw) => rekor_bundle(raw),
        None => Err("no transparency-log bundle".to_owned()),
    };
    Ok(Evidence {
        origin: origin.to_owned(),
        subject_digests: vec![parsed.critical.image.docker_manifest_digest],
        logged_payload: payload.clone(),
        signed: payload,
        signature,
        certificate,
        chain,
        tlog,
    })
}

fn rekor_bundle(raw: &str) -> Result<TlogEntry, String> {
    let bundle: RekorBundle =
        serde_json::from_str(raw).map_err(|e| format!("unreadable Rekor bundle: {e}"))?;
    Ok(TlogEntry {
        body_base64: bundle.payload.body,
        integrated_time: bundle.payload.integrated_time,
        log_index: bundle.payload.log_index,
        log_id: bundle.payload.log_id,
        signed_entry_timestamp: b64(&bundle.signed_entry_timestamp)
            .map_err(|e| format!("Rekor bundle timestamp: {e}"))?,
    })
}

/// A Sigstore bundle whose DSSE envelope carries cosign's in-toto signing statement.
fn sigstore_bundle(bytes: &[u8], origin: &str) -> Result<Evidence, String> {
    let bundle: Bundle =
        serde_json::from_slice(bytes).map_err(|e| format!("unreadable Sigstore bundle: {e}"))?;
    let envelope = match bundle.content {
        Some(BundleContent::DsseEnvelope(envelope)) => envelope,
        Some(BundleContent::MessageSignature(_)) => {
            return Err("a message-signature bundle does not sign an image manifest".to_owned());
        }
        None => return Err("the bundle has no content".to_owned()),
    };
    if envelope.payload_type != IN_TOTO_PAYLOAD_TYPE {
        return Err(format!(
            "the envelope payload type is {:?}",
            envelope.payload_type
        ));
    }
    let [signature] = envelope.signatures.as_slice() else {
        return Err(format!(
            "the envelope has {} signatures, not one",
            envelope.signatures.len()
        ));
    };
    let subject_digests = cosign_statement_subjects(&envelope.payload)?;
    let material = bundle
        .verification_material
        .ok_or("the bundle has no verification material")?;
    let (certificate, chain) = match material.content {
        Some(Material::Certificate(cert)) => (Some(cert.raw_bytes), Vec::new()),
        Some(Material::X509CertificateChain(chain)) => {
            let mut certs = chain.certificates.into_iter().map(|c| c.raw_bytes);
            (certs.next(), certs.collect())
        }
        Some(Material::PublicKey(_)) | None => (None, Vec::new()),
    };
    let tlog = match material.tlog_entries.first() {
        None => Err("no transparency-log entry".to_owned()),
        Some(entry) => match &entry.inclusion_promise {
            Some(promise) => Ok(TlogEntry {
                body_base64: base64::engine::general_purpose::STANDARD
                    .encode(&entry.canonicalized_body),
                integrated_time: entry.integrated_time,
                log_index: entry.log_index,
                log_id: entry
                    .log_id
                    .as_ref()
                    .map(|id| hex::encode(&id.key_id))
                    .unwrap_or_default(),
                signed_entry_timestamp: promise.signed_entry_timestamp.clone(),
            }),
            None => Err(
                "the log entry has no inclusion promise (inclusion-proof-only entries, as \
                 Rekor v2 writes, are not supported yet)"
                    .to_owned(),
            ),
        },
    };
    Ok(Evidence {
        origin: origin.to_owned(),
        signed: pae(&envelope.payload_type, &envelope.payload),
        signature: signature.sig.clone(),
        logged_payload: envelope.payload.clone(),
        subject_digests,
        certificate,
        chain,
        tlog,
    })
}

/// Digests named by an in-toto statement that is cosign's image signature (not some other
/// attestation that happens to be attached).
fn cosign_statement_subjects(payload: &[u8]) -> Result<Vec<String>, String> {
    #[derive(serde::Deserialize)]
    struct Statement {
        #[serde(rename = "_type")]
        statement_type: String,
        #[serde(rename = "predicateType")]
        predicate_type: String,
        subject: Vec<Subject>,
    }
    #[derive(serde::Deserialize)]
    struct Subject {
        digest: std::collections::BTreeMap<String, String>,
    }
    let statement: Statement = serde_json::from_slice(payload)
        .map_err(|e| format!("the envelope payload is not an in-toto statement: {e}"))?;
    if !IN_TOTO_STATEMENT_TYPES.contains(&statement.statement_type.as_str()) {
        return Err(format!(
            "unknown statement type {:?}",
            statement.statement_type
        ));
    }
    if statement.predicate_type != COSIGN_SIGN_PREDICATE {
        return Err(format!(
            "predicate {:?} is not an image signature",
            statement.predicate_type
        ));
    }
    Ok(statement
        .subject
        .iter()
        .flat_map(|s| s.digest.iter())
        .map(|(algorithm, hex)| format!("{algorithm}:{hex}"))
        .collect())
}

/// DSSE pre-authentication encoding: what a DSSE signature actually covers.
fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {payload_type} {} ",
        payload_type.len(),
        payload.len()
    )
    .into_bytes();
    out.extend_from_slice(payload);
    out
}

fn b64(s: &str) -> Result<Vec<u8>, String> {
    base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .map_err(|e| format!("bad base64: {e}"))
}

/// The DER contents of every PEM block in `text`.
pub(super) fn pem_blocks(text: &str) -> Result<Vec<Vec<u8>>, String> {
    x509_parser::pem::Pem::iter_from_buffer(text.as_bytes())
        .map(|p| p.map(|p| p.contents).map_err(|e| format!("bad PEM: {e}")))
        .collect()
}

fn short(digest: &str) -> &str {
    digest.get(..19).unwrap_or(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pae_follows_the_dsse_spec() {
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world".to_vec()
        );
    }

    #[test]
    fn only_cosign_signing_statements_count() {
        let statement = |predicate: &str| {
            format!(
                r#"{{"_type":"https://in-toto.io/Statement/v1","subject":[{{"digest":{{"sha256":"ab"}}}}],"predicateType":"{predicate}","predicate":{{}}}}"#
            )
        };
        assert_eq!(
            cosign_statement_subjects(statement(COSIGN_SIGN_PREDICATE).as_bytes()),
            Ok(vec!["sha256:ab".to_owned()])
        );
        assert!(
            cosign_statement_subjects(statement("https://slsa.dev/provenance/v1").as_bytes())
                .is_err()
        );
    }
}
