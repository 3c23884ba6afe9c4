//! Decides whether one piece of evidence satisfies one authority.
//!
//! Every signature must name the image's digest. A key authority then needs only a valid
//! signature by its key. A keyless authority needs, in order: a transparency-log entry whose
//! signed timestamp verifies with a log key of the trust root and whose body is this very
//! signature; a certificate chaining to a trusted authority at the log's integrated time (the
//! certificate itself lives ten minutes); a matching issuer and subject; and a valid signature
//! by the certificate's key.

use std::time::Duration;

use base64::Engine as _;
use rustls::pki_types::{CertificateDer, UnixTime};
use sha2::Digest as _;
use sigstore::crypto::{CosignVerificationKey, Signature};
use x509_parser::extensions::GeneralName;

use super::evidence::{Evidence, TlogEntry, pem_blocks};
use super::trust_root::ParsedTrustRoot;
use super::{Authority, Matcher, TrustRoot};

/// DER value of id-kp-codeSigning (1.3.6.1.5.5.7.3.3), the usage Fulcio certificates carry.
const CODE_SIGNING: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x03];
/// Fulcio's OIDC issuer extensions: v2 (DER UTF8String) and the deprecated v1 (raw bytes).
const ISSUER_V2_OID: &str = "1.3.6.1.4.1.57264.1.8";
const ISSUER_V1_OID: &str = "1.3.6.1.4.1.57264.1.1";
/// Explanations kept per verification; more would only flood a log line.
const MAX_EXPLANATIONS: usize = 16;

/// An authority with its key or trust root parsed.
pub(super) enum CompiledAuthority {
    Key(CosignVerificationKey),
    Keyless {
        issuer: Matcher,
        subject: Matcher,
        root: ParsedTrustRoot,
    },
}

impl CompiledAuthority {
    pub fn compile(authority: &Authority) -> Result<Self, String> {
        match authority {
            Authority::Key { public_key_pem } => {
                CosignVerificationKey::try_from_pem(public_key_pem.as_bytes())
                    .map(CompiledAuthority::Key)
                    .map_err(|e| format!("unusable public key: {e}"))
            }
            Authority::Keyless {
                issuer,
                subject,
                trust_root,
            } => {
                let root = match trust_root {
                    TrustRoot::PublicGood => ParsedTrustRoot::public_good(),
                    TrustRoot::Custom(json) => ParsedTrustRoot::parse(json),
                }?;
                Ok(CompiledAuthority::Keyless {
                    issuer: issuer.clone(),
                    subject: subject.clone(),
                    root,
                })
            }
        }
    }
}

/// SHA-256 (hex) of the DER of a PEM public key.
pub(super) fn key_fingerprint(pem: &str) -> Option<String> {
    let der = pem_blocks(pem).ok()?.into_iter().next()?;
    Some(hex::encode(sha2::Sha256::digest(der)))
}

/// The authority that accepted a signature.
pub(super) struct Accepted {
    pub authority: usize,
    pub signer: Option<String>,
}

/// The first (evidence, authority) pair that verifies; every failure is explained in `tried`.
pub(super) fn first_accepted(
    items: &[Result<Evidence, String>],
    digest: &str,
    authorities: &[Authority],
    compiled: &[CompiledAuthority],
    tried: &mut Vec<String>,
) -> Option<Accepted> {
    let mut explain = |why: String| {
        if tried.len() < MAX_EXPLANATIONS {
            tried.push(why);
        }
    };
    for item in items {
        let evidence = match item {
            Ok(e) => e,
            Err(why) => {
                explain(why.clone());
                continue;
            }
        };
        // Digest binding: a valid signature of another image proves nothing about this one.
        if !evidence.subject_digests.iter().any(|d| d == digest) {
            explain(format!(
                "{}: signs {}, not {digest}",
                evidence.origin,
                evidence.subject_digests.join(", ")
            ));
            continue;
        }
        for (index, authority) in compiled.iter().enumerate() {
            match check(evidence, authority) {
                Ok(signer) => {
                    return Some(Accepted {
                        authority: index,
                        signer,
                    });
                }
                Err(why) => explain(format!(
                    "{}: {}: {why}",
                    evidence.origin,
                    authorities[index].describe()
                )),
            }
        }
    }
    None
}

fn check(evidence: &Evidence, authority: &CompiledAuthority) -> Result<Option<String>, String> {
    match authority {
        CompiledAuthority::Key(key) => {
            verify_signature(key, evidence)?;
            Ok(None)
        }
        CompiledAuthority::Keyless {
            issuer,
            subject,
            root,
        } => check_keyless(evidence, issuer, subject, root).map(Some),
    }
}

fn verify_signature(key: &CosignVerificationKey, evidence: &Evidence) -> Result<(), String> {
    key.verify_signature(Signature::Raw(&evidence.signature), &evidence.signed)
        .map_err(|_| "the signature does not verify with this key".to_owned())
}

fn check_keyless(
    evidence: &Evidence,
    issuer: &Matcher,
    subject: &Matcher,
    root: &ParsedTrustRoot,
) -> Result<String, String> {
    let leaf = evidence
        .certificate
        .as_deref()
        .ok_or("no certificate: signed with a key, not keyless")?;
    let entry = evidence.tlog.as_ref().map_err(Clone::clone)?;
    check_log_entry(entry, evidence, leaf, root)?;
    check_chain(leaf, &evidence.chain, root, entry.integrated_time)?;

    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| format!("unreadable certificate: {e}"))?;
    let cert_issuer = oidc_issuer(&cert).ok_or("the certificate names no OIDC issuer")?;
    if !issuer.matches(&cert_issuer) {
        return Err(format!("issuer {cert_issuer:?} does not match {issuer}"));
    }
    let subjects = subjects(&cert);
    let signer = subjects
        .iter()
        .find(|s| subject.matches(s))
        .ok_or_else(|| format!("subject {subjects:?} does not match {subject}"))?
        .clone();

    let key = CosignVerificationKey::try_from_der(cert.public_key().raw)
        .map_err(|e| format!("unusable certificate key: {e}"))?;
    verify_signature(&key, evidence)?;
    Ok(signer)
}

/// The signed entry timestamp must come from a trusted log, and the entry must describe this
/// signature by this certificate over this payload (else any logged entry could be replayed
/// to vouch for a certificate's time).
fn check_log_entry(
    entry: &TlogEntry,
    evidence: &Evidence,
    leaf: &[u8],
    root: &ParsedTrustRoot,
) -> Result<(), String> {
    let key = root.log_key(&entry.log_id, entry.integrated_time)?;
    // Rekor signs the RFC 8785 canonical JSON of these four fields; their names are already
    // in canonical (UTF-16 code unit) order and the values are ASCII.
    #[derive(serde::Serialize)]
    struct SignedPayload<'a> {
        body: &'a str,
        #[serde(rename = "integratedTime")]
        integrated_time: i64,
        #[serde(rename = "logID")]
        log_id: &'a str,
        #[serde(rename = "logIndex")]
        log_index: i64,
    }
    let canonical = serde_json::to_vec(&SignedPayload {
        body: &entry.body_base64,
        integrated_time: entry.integrated_time,
        log_id: &entry.log_id,
        log_index: entry.log_index,
    })
    .map_err(|e| format!("cannot encode the log entry: {e}"))?;
    key.verify_signature(Signature::Raw(&entry.signed_entry_timestamp), &canonical)
        .map_err(|_| "the log's signed entry timestamp does not verify".to_owned())?;

    let body = base64::engine::general_purpose::STANDARD
        .decode(&entry.body_base64)
        .map_err(|e| format!("log entry body: {e}"))?;
    let body: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| format!("log entry body: {e}"))?;
    let payload_hash = hex::encode(sha2::Sha256::digest(&evidence.logged_payload));
    let spec = &body["spec"];
    let same_signature =
        |b64: &serde_json::Value| decode_b64(b64) == Some(evidence.signature.clone());
    let same_certificate = |b64: &serde_json::Value| {
        decode_b64(b64)
            .and_then(|pem| String::from_utf8(pem).ok())
            .and_then(|pem| pem_blocks(&pem).ok())
            .is_some_and(|ders| ders.first().map(Vec::as_slice) == Some(leaf))
    };
    let consistent = match body["kind"].as_str() {
        Some("hashedrekord") => {
            spec["data"]["hash"]["algorithm"] == "sha256"
                && spec["data"]["hash"]["value"] == payload_hash.as_str()
                && same_signature(&spec["signature"]["content"])
                && same_certificate(&spec["signature"]["publicKey"]["content"])
        }
        Some("dsse") => {
            spec["payloadHash"]["algorithm"] == "sha256"
                && spec["payloadHash"]["value"] == payload_hash.as_str()
                && spec["signatures"].as_array().is_some_and(|sigs| {
                    sigs.iter().any(|s| {
                        same_signature(&s["signature"]) && same_certificate(&s["verifier"])
                    })
                })
        }
        other => return Err(format!("log entries of kind {other:?} are not supported")),
    };
    if consistent {
        Ok(())
    } else {
        Err("the log entry describes a different signature, certificate or payload".to_owned())
    }
}

fn decode_b64(value: &serde_json::Value) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(value.as_str()?)
        .ok()
}

/// The certificate must chain to an authority of the trust root that was valid when the log
/// saw the signature, with every certificate of the path valid at that moment.
fn check_chain(
    leaf: &[u8],
    chain: &[Vec<u8>],
    root: &ParsedTrustRoot,
    integrated_time: i64,
) -> Result<(), String> {
    let seconds = u64::try_from(integrated_time).map_err(|_| "negative log time")?;
    let time = UnixTime::since_unix_epoch(Duration::from_secs(seconds));
    let leaf = CertificateDer::from(leaf);
    let ee = webpki::EndEntityCert::try_from(&leaf)
        .map_err(|e| format!("unreadable certificate: {e}"))?;
    let algorithms = rustls::crypto::ring::default_provider()
        .signature_verification_algorithms
        .all;
    let mut last_error = "no certificate authority of the trust root was valid then".to_owned();
    for authority in root
        .authorities
        .iter()
        .filter(|a| a.valid_at(integrated_time))
    {
        let Some((anchor_der, ca_intermediates)) = authority.chain.split_last() else {
            continue;
        };
        let anchor = match webpki::anchor_from_trusted_cert(anchor_der) {
            Ok(a) => a,
            Err(e) => {
                last_error = format!("unusable trust anchor: {e}");
                continue;
            }
        };
        let intermediates: Vec<CertificateDer<'_>> = ca_intermediates
            .iter()
            .cloned()
            .chain(chain.iter().map(|c| CertificateDer::from(c.as_slice())))
            .collect();
        match ee.verify_for_usage(
            algorithms,
            &[anchor],
            &intermediates,
            time,
            webpki::KeyUsage::required(CODE_SIGNING),
            None,
            None,
        ) {
            Ok(_) => return Ok(()),
            Err(e) => last_error = format!("certificate chain not trusted at the log time: {e}"),
        }
    }
    Err(last_error)
}

/// The OIDC issuer Fulcio recorded, from the v2 extension or else the v1 one.
fn oidc_issuer(cert: &x509_parser::certificate::X509Certificate<'_>) -> Option<String> {
    let find = |oid: &str| {
        cert.extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == oid)
            .map(|e| e.value)
    };
    if let Some(value) = find(ISSUER_V2_OID) {
        return der_utf8_string(value);
    }
    find(ISSUER_V1_OID).and_then(|v| String::from_utf8(v.to_vec()).ok())
}

/// Decodes a DER UTF8String (tag 12).
fn der_utf8_string(der: &[u8]) -> Option<String> {
    let (&tag, rest) = der.split_first()?;
    if tag != 0x0c {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 2 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    (rest.len() == len)
        .then(|| String::from_utf8(rest.to_vec()).ok())
        .flatten()
}

/// Identities in the certificate's subject alternative name: e-mail addresses and URIs.
fn subjects(cert: &x509_parser::certificate::X509Certificate<'_>) -> Vec<String> {
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::RFC822Name(s) | GeneralName::URI(s) => Some((*s).to_owned()),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_utf8_strings_decode() {
        let issuer = "https://token.actions.githubusercontent.com";
        let mut der = vec![0x0c, u8::try_from(issuer.len()).unwrap()];
        der.extend_from_slice(issuer.as_bytes());
        assert_eq!(der_utf8_string(&der).as_deref(), Some(issuer));

        let long = "x".repeat(200);
        let mut der = vec![0x0c, 0x81, 200];
        der.extend_from_slice(long.as_bytes());
        assert_eq!(der_utf8_string(&der), Some(long));

        assert_eq!(der_utf8_string(&[0x13, 1, b'a']), None, "PrintableString");
        assert_eq!(der_utf8_string(&[0x0c, 5, b'a']), None, "truncated");
    }

    #[test]
    fn broken_authorities_are_refused_up_front() {
        let key = Authority::Key {
            public_key_pem: "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n".into(),
        };
        assert!(key.validate().is_err());
        let keyless = Authority::Keyless {
            issuer: Matcher::Exact("https://issuer.example".into()),
            subject: Matcher::Exact("me@example.com".into()),
            trust_root: TrustRoot::Custom("{}".into()),
        };
        assert!(keyless.validate().is_err());
        let public_good = Authority::Keyless {
            issuer: Matcher::Exact("https://issuer.example".into()),
            subject: Matcher::Exact("me@example.com".into()),
            trust_root: TrustRoot::PublicGood,
        };
        assert_eq!(public_good.validate(), Ok(()));
    }
}
