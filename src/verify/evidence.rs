//! Turns what the registry holds into uniform evidence: the signed bytes, the signature, the
//! digests the signed statement names, and the signer's certificate and log entry if any.
//!
//! Nothing here is trusted yet; [`super::check`] decides.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use sha2::Digest as _;
use sigstore::cosign::payload::SimpleSigning;
use sigstore_verify::types::{Bundle, SignatureContent};

pub(super) const SIMPLE_SIGNING_MEDIA_TYPE: &str =
    "application/vnd.dev.cosign.simplesigning.v1+json";
pub(super) const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
const CERTIFICATE_ANNOTATION: &str = "dev.sigstore.cosign/certificate";
const CHAIN_ANNOTATION: &str = "dev.sigstore.cosign/chain";
const REKOR_BUNDLE_ANNOTATION: &str = "dev.sigstore.cosign/bundle";
const RFC3161_ANNOTATION: &str = "dev.sigstore.cosign/rfc3161timestamp";
const SIMPLE_SIGNING_TYPE: &str = "cosign container image signature";
pub(super) const BUNDLE_MEDIA_TYPE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";
/// A classic attestation layer: a DSSE envelope.
pub(super) const DSSE_MEDIA_TYPE: &str = "application/vnd.dsse.envelope.v1+json";
const IN_TOTO_PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
pub(super) const COSIGN_SIGN_PREDICATE: &str = "https://sigstore.dev/cosign/sign/v1";
const IN_TOTO_STATEMENT_TYPES: [&str; 2] = [
    "https://in-toto.io/Statement/v1",
    "https://in-toto.io/Statement/v0.1",
];

/// One signature found for an image, not yet trusted.
#[derive(Debug, Clone)]
pub(super) struct Evidence {
    /// Where it was found, for explanations.
    pub origin: String,
    /// Digests (`sha256:<hex>`) the signed statement names.
    pub subject_digests: Vec<String>,
    /// The signature with its certificate or key hint and its log and timestamp evidence, as a
    /// Sigstore bundle; a classic signature's annotations are assembled into one.
    pub bundle: Bundle,
    /// For a message signature (classic simple signing), the payload it signs; a DSSE
    /// envelope carries its own.
    pub payload: Option<Vec<u8>>,
    /// For a DSSE envelope, the predicate type its in-toto statement declares.
    pub predicate_type: Option<String>,
    /// What it was read from, so that it can be kept and read again exactly the same way.
    pub source: Source,
}

/// The bytes a piece of evidence is read from: enough to check it again with no registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A simple-signing payload with the cosign annotations of its layer.
    SimpleSigning {
        annotations: std::collections::BTreeMap<String, String>,
        payload: Vec<u8>,
    },
    /// A Sigstore bundle, as JSON.
    Bundle(Vec<u8>),
}

impl Source {
    /// Reads the evidence again, with the same checks as when it was first found.
    pub(super) fn read(&self, origin: &str) -> Result<Evidence, String> {
        match self {
            Source::SimpleSigning {
                annotations,
                payload,
            } => simple_signing(annotations, payload.clone(), origin),
            Source::Bundle(bytes) => sigstore_bundle(bytes, origin),
        }
    }

    /// Reads an attestation again, as a listing reads one: a bundle whose envelope carries an
    /// in-toto statement (a classic `.att` layer is kept as the bundle it was assembled into).
    pub(super) fn read_attestation(&self, origin: &str) -> Result<Evidence, String> {
        match self {
            Source::Bundle(bytes) => dsse_bundle(bytes, origin),
            Source::SimpleSigning { .. } => {
                Err("a simple-signing payload is a signature, not an attestation".to_owned())
            }
        }
    }
}

/// The layer annotations a classic signature is read from; others are not kept.
const SIMPLE_SIGNING_ANNOTATIONS: [&str; 5] = [
    SIGNATURE_ANNOTATION,
    CERTIFICATE_ANNOTATION,
    CHAIN_ANNOTATION,
    REKOR_BUNDLE_ANNOTATION,
    RFC3161_ANNOTATION,
];

impl Evidence {
    /// The exact bytes the signature covers (the simple-signing payload, or the DSSE PAE),
    /// and the signature.
    pub fn signed(&self) -> Option<(Vec<u8>, &[u8])> {
        match (&self.bundle.content, &self.payload) {
            (SignatureContent::MessageSignature(m), Some(payload)) => {
                Some((payload.clone(), m.signature.as_bytes()))
            }
            (SignatureContent::DsseEnvelope(e), None) => {
                Some((e.pae(), e.signature.sig.as_bytes()))
            }
            _ => None,
        }
    }
}

/// A simple-signing layer: the payload is what was signed; signature, certificate, chain,
/// Rekor bundle and RFC 3161 timestamp travel in the layer's annotations, and are assembled
/// here into the Sigstore bundle they amount to (a message signature over the payload).
pub(super) fn simple_signing(
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
    let (material, version) = verification_material(annotations)?;
    let bundle = serde_json::json!({
        "mediaType": format!("application/vnd.dev.sigstore.bundle+json;version={version}"),
        "verificationMaterial": material,
        "messageSignature": {
            "messageDigest": {
                "algorithm": "SHA2_256",
                "digest": STANDARD.encode(sha2::Sha256::digest(&payload)),
            },
            "signature": STANDARD.encode(&signature),
        },
    });
    let bundle: Bundle = serde_json::from_value(bundle)
        .map_err(|e| format!("the signature's annotations do not make a bundle: {e}"))?;
    let annotations = SIMPLE_SIGNING_ANNOTATIONS
        .iter()
        .filter_map(|k| annotations.get(*k).map(|v| ((*k).to_owned(), v.clone())))
        .collect();
    Ok(Evidence {
        origin: origin.to_owned(),
        subject_digests: vec![parsed.critical.image.docker_manifest_digest],
        bundle,
        payload: Some(payload.clone()),
        predicate_type: None,
        source: Source::SimpleSigning {
            annotations,
            payload,
        },
    })
}

/// The verification material a classic signature or attestation layer carries in its
/// annotations (certificate, chain, Rekor bundle, RFC 3161 timestamp), as a bundle holds it,
/// and the bundle version that allows it.
fn verification_material(
    annotations: &std::collections::BTreeMap<String, String>,
) -> Result<(serde_json::Value, &'static str), String> {
    let mut certificates = match annotations.get(CERTIFICATE_ANNOTATION) {
        Some(pem) if !pem.trim().is_empty() => vec![
            pem_blocks(pem)
                .map_err(|e| format!("certificate annotation: {e}"))?
                .into_iter()
                .next()
                .ok_or("empty certificate annotation")?,
        ],
        _ => Vec::new(),
    };
    if !certificates.is_empty()
        && let Some(pem) = annotations.get(CHAIN_ANNOTATION)
    {
        certificates.extend(pem_blocks(pem).map_err(|e| format!("chain annotation: {e}"))?);
    }
    let tlog_entries = match annotations.get(REKOR_BUNDLE_ANNOTATION) {
        Some(raw) => vec![rekor_bundle(raw)?],
        None => Vec::new(),
    };
    let timestamps = match annotations.get(RFC3161_ANNOTATION) {
        Some(raw) => vec![rfc3161_annotation(raw)?],
        None => Vec::new(),
    };
    let material = if certificates.is_empty() {
        serde_json::json!({ "publicKey": { "hint": "" } })
    } else {
        let certificates: Vec<_> = certificates
            .iter()
            .map(|der| serde_json::json!({ "rawBytes": STANDARD.encode(der) }))
            .collect();
        serde_json::json!({ "x509CertificateChain": { "certificates": certificates } })
    };
    let mut material = material;
    material["tlogEntries"] = tlog_entries.into();
    material["timestampVerificationData"] = serde_json::json!({ "rfc3161Timestamps": timestamps });
    // v0.1 is the version for entries with a signed entry timestamp and no inclusion proof,
    // which is what a classic signature carries; v0.2 for the rest (both allow a chain).
    let version = if annotations.contains_key(REKOR_BUNDLE_ANNOTATION) {
        "0.1"
    } else {
        "0.2"
    };
    Ok((material, version))
}

/// A classic attestation layer (the `sha256-<hex>.att` tag): a DSSE envelope whose signer's
/// certificate, log entry and timestamp travel in the layer's annotations, assembled into the
/// Sigstore bundle they amount to.
pub(super) fn dsse_layer(
    annotations: &std::collections::BTreeMap<String, String>,
    envelope: &[u8],
    origin: &str,
) -> Result<Evidence, String> {
    let envelope: serde_json::Value = serde_json::from_slice(envelope)
        .map_err(|e| format!("the layer is not a DSSE envelope: {e}"))?;
    let (material, version) = verification_material(annotations)?;
    let bundle = serde_json::json!({
        "mediaType": format!("application/vnd.dev.sigstore.bundle+json;version={version}"),
        "verificationMaterial": material,
        "dsseEnvelope": envelope,
    });
    let bytes = serde_json::to_vec(&bundle).map_err(|e| e.to_string())?;
    let bundle: Bundle = serde_json::from_value(bundle)
        .map_err(|e| format!("the envelope and its annotations do not make a bundle: {e}"))?;
    from_dsse(bundle, &bytes, origin)
}

/// The Rekor bundle annotation (`SignedEntryTimestamp` and the entry it signs) as a bundle's
/// transparency-log entry.
fn rekor_bundle(raw: &str) -> Result<serde_json::Value, String> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct RekorBundle {
        signed_entry_timestamp: String,
        payload: RekorPayload,
    }
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct RekorPayload {
        body: String,
        integrated_time: i64,
        log_index: i64,
        #[serde(rename = "logID")]
        log_id: String,
    }
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Body {
        kind: String,
        api_version: String,
    }
    let bundle: RekorBundle =
        serde_json::from_str(raw).map_err(|e| format!("unreadable Rekor bundle: {e}"))?;
    let body = b64(&bundle.payload.body).map_err(|e| format!("Rekor bundle body: {e}"))?;
    let kind: Body =
        serde_json::from_slice(&body).map_err(|e| format!("Rekor bundle body: {e}"))?;
    let log_id =
        hex::decode(&bundle.payload.log_id).map_err(|e| format!("Rekor bundle log ID: {e}"))?;
    Ok(serde_json::json!({
        "logIndex": bundle.payload.log_index.to_string(),
        "logId": { "keyId": STANDARD.encode(log_id) },
        "kindVersion": { "kind": kind.kind, "version": kind.api_version },
        "integratedTime": bundle.payload.integrated_time.to_string(),
        "inclusionPromise": { "signedEntryTimestamp": bundle.signed_entry_timestamp },
        "canonicalizedBody": bundle.payload.body,
    }))
}

/// cosign's RFC 3161 annotation, `{"SignedRFC3161Timestamp": "<base64 DER>"}`.
fn rfc3161_annotation(raw: &str) -> Result<serde_json::Value, String> {
    #[derive(serde::Deserialize)]
    struct Annotation {
        #[serde(rename = "SignedRFC3161Timestamp")]
        signed: String,
    }
    let annotation: Annotation =
        serde_json::from_str(raw).map_err(|e| format!("unreadable RFC 3161 annotation: {e}"))?;
    b64(&annotation.signed).map_err(|e| format!("RFC 3161 annotation: {e}"))?;
    Ok(serde_json::json!({ "signedTimestamp": annotation.signed }))
}

/// A Sigstore bundle (v0.1 to v0.3) whose DSSE envelope carries cosign's in-toto signing
/// statement.
pub(super) fn sigstore_bundle(bytes: &[u8], origin: &str) -> Result<Evidence, String> {
    let evidence = dsse_bundle(bytes, origin)?;
    match evidence.predicate_type.as_deref() {
        Some(COSIGN_SIGN_PREDICATE) => Ok(evidence),
        other => Err(format!(
            "predicate {:?} is not an image signature",
            other.unwrap_or_default()
        )),
    }
}

/// A Sigstore bundle (v0.1 to v0.3) whose DSSE envelope carries an in-toto statement of any
/// predicate type.
pub(super) fn dsse_bundle(bytes: &[u8], origin: &str) -> Result<Evidence, String> {
    let bundle: Bundle =
        serde_json::from_slice(bytes).map_err(|e| format!("unreadable Sigstore bundle: {e}"))?;
    from_dsse(bundle, bytes, origin)
}

fn from_dsse(bundle: Bundle, bytes: &[u8], origin: &str) -> Result<Evidence, String> {
    let envelope = match &bundle.content {
        SignatureContent::DsseEnvelope(envelope) => envelope,
        SignatureContent::MessageSignature(_) => {
            return Err("a message-signature bundle does not sign an image manifest".to_owned());
        }
        _ => return Err("the bundle has no content it can verify".to_owned()),
    };
    if envelope.payload_type != IN_TOTO_PAYLOAD_TYPE {
        return Err(format!(
            "the envelope payload type is {:?}",
            envelope.payload_type
        ));
    }
    let (predicate_type, subject_digests) = statement_header(envelope.payload.as_bytes())?;
    Ok(Evidence {
        origin: origin.to_owned(),
        subject_digests,
        bundle,
        payload: None,
        predicate_type: Some(predicate_type),
        source: Source::Bundle(bytes.to_vec()),
    })
}

/// The predicate type and subject digests (`sha256:<hex>`) of an in-toto statement; the
/// predicate itself is skipped, not parsed.
pub(super) fn statement_header(payload: &[u8]) -> Result<(String, Vec<String>), String> {
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
    let digests = statement
        .subject
        .iter()
        .flat_map(|s| s.digest.iter())
        .map(|(algorithm, hex)| format!("{algorithm}:{hex}"))
        .collect();
    Ok((statement.predicate_type, digests))
}

fn b64(s: &str) -> Result<Vec<u8>, String> {
    STANDARD
        .decode(s.trim())
        .map_err(|e| format!("bad base64: {e}"))
}

/// The DER contents of every PEM block in `text`.
pub(super) fn pem_blocks(text: &str) -> Result<Vec<Vec<u8>>, String> {
    x509_parser::pem::Pem::iter_from_buffer(text.as_bytes())
        .map(|p| p.map(|p| p.contents).map_err(|e| format!("bad PEM: {e}")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_say_their_predicate_type_and_subjects() {
        let statement = |kind: &str, predicate: &str| {
            format!(
                r#"{{"_type":"{kind}","subject":[{{"name":"a","digest":{{"sha256":"ab"}}}}],"predicateType":"{predicate}","predicate":{{"big":[1,2,3]}}}}"#
            )
        };
        assert_eq!(
            statement_header(
                statement(IN_TOTO_STATEMENT_TYPES[0], COSIGN_SIGN_PREDICATE).as_bytes()
            ),
            Ok((
                COSIGN_SIGN_PREDICATE.to_owned(),
                vec!["sha256:ab".to_owned()]
            ))
        );
        assert_eq!(
            statement_header(
                statement(IN_TOTO_STATEMENT_TYPES[1], "https://slsa.dev/provenance/v1").as_bytes()
            )
            .map(|(t, _)| t),
            Ok("https://slsa.dev/provenance/v1".to_owned())
        );
        assert!(
            statement_header(statement("https://example.com/Statement", "x").as_bytes()).is_err()
        );
    }
}
