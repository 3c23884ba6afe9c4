//! Sigstore trust roots (`trusted_root.json`): the certificate authorities keyless certificates
//! chain to, the transparency logs, CT logs and timestamp authorities that are believed, each
//! with its validity window.
//!
//! sigstore-trust-root reads the file and sigstore-verify prepares it once (keys parsed,
//! anchors built) into the [`Verifier`] every check of the authority reuses. Two questions
//! sigstore-verify 0.15 does not ask of a root are answered here, each shown by a test in
//! `tests/verify.rs` to be needed:
//! - whether every certificate of the issuing authority's chain was valid at each verified time
//!   (sigstore-verify makes every certificate of a root's chain a trust anchor, and webpki does
//!   not check an anchor's validity, so an expired intermediate would still issue: cosign
//!   GHSA-wfqv-66vq-46rm);
//! - which Rekor v2 log keys the root trusted at the verified times (sigstore-verify checks a
//!   checkpoint against every key whose window has started by now).

use sigstore_verify::Verifier;
use sigstore_verify::crypto::VerificationKey;
use sigstore_verify::trust_root::{SIGSTORE_PRODUCTION_TRUSTED_ROOT, TrustedRoot};
use sigstore_verify::types::Checkpoint;
use x509_parser::prelude::FromDer as _;

/// A parsed trust root, ready to verify with.
pub(super) struct Root {
    pub trusted: TrustedRoot,
    pub verifier: Verifier,
}

impl Root {
    /// Sigstore's public-good root, as sigstore-trust-root embeds it.
    pub fn public_good() -> Result<Self, String> {
        Self::parse(SIGSTORE_PRODUCTION_TRUSTED_ROOT)
    }

    pub fn parse(json: &str) -> Result<Self, String> {
        let trusted = TrustedRoot::from_json(json)
            .map_err(|e| format!("unreadable trusted_root.json: {e}"))?;
        let verifier =
            Verifier::new(&trusted).map_err(|e| format!("unusable trusted_root.json: {e}"))?;
        Ok(Self { trusted, verifier })
    }

    /// Refuses a root that cannot vouch for keyless signatures at all.
    pub fn require_keyless_material(&self) -> Result<(), String> {
        if self.trusted.certificate_authorities.is_empty() {
            return Err("trusted_root.json names no certificate authority".to_owned());
        }
        if self.trusted.tlogs.is_empty() {
            return Err("trusted_root.json names no transparency log".to_owned());
        }
        Ok(())
    }

    /// The certificate authority that issued `leaf` must have had every certificate of its
    /// chain valid at each of `times`.
    pub fn issuer_chain_valid_at(
        &self,
        leaf: &[u8],
        times: &[jiff::Timestamp],
    ) -> Result<(), String> {
        let (_, leaf) = x509_parser::certificate::X509Certificate::from_der(leaf)
            .map_err(|e| format!("unreadable certificate: {e}"))?;
        for ca in &self.trusted.certificate_authorities {
            let chain: Vec<_> = ca
                .cert_chain
                .certificates
                .iter()
                .filter_map(|c| {
                    x509_parser::certificate::X509Certificate::from_der(c.raw_bytes.as_bytes())
                        .ok()
                        .map(|(_, cert)| cert)
                })
                .collect();
            let Some(issuer) = chain.first() else {
                continue;
            };
            if leaf.verify_signature(Some(issuer.public_key())).is_err() {
                continue;
            }
            for cert in &chain {
                let validity = cert.validity();
                for time in times {
                    let t = time.as_second();
                    if t < validity.not_before.timestamp() || t > validity.not_after.timestamp() {
                        return Err(format!(
                            "the issuing CA certificate {:?} of the trust root was not valid at {time} \
                             (valid {} to {})",
                            cert.subject().to_string(),
                            validity.not_before,
                            validity.not_after
                        ));
                    }
                }
            }
            return Ok(());
        }
        Err("no certificate authority of the trust root issued the certificate".to_owned())
    }

    /// The checkpoint must be signed by the key of transparency log `log_id` (raw key id), and
    /// the root must have trusted that key at every one of `times`.
    pub fn checkpoint_signed_at(
        &self,
        checkpoint: &str,
        log_id: &[u8],
        times: &[jiff::Timestamp],
    ) -> Result<(), String> {
        let checkpoint =
            Checkpoint::from_text(checkpoint).map_err(|e| format!("unreadable checkpoint: {e}"))?;
        let mut known = false;
        for log in self
            .trusted
            .tlogs
            .iter()
            .filter(|log| log.log_id.key_id.as_bytes() == log_id)
        {
            known = true;
            let window = log.public_key.valid_for;
            if let Some(outside) = times
                .iter()
                .find(|t| window.is_some_and(|w| !w.contains(**t)))
            {
                return Err(format!(
                    "the key of transparency log {} was not trusted at {outside} (trust root \
                     window {})",
                    log.base_url,
                    window.map_or_else(String::new, |w| format!(
                        "{} to {}",
                        w.start,
                        w.end.map_or_else(|| "open".to_owned(), |e| e.to_string())
                    ))
                ));
            }
            // A checkpoint signature names its key by the first four bytes of the log ID.
            let key = VerificationKey::from_spki(&log.public_key.raw_bytes).map_err(|e| {
                format!("transparency log {} has an unusable key: {e}", log.base_url)
            })?;
            if checkpoint.signatures().iter().any(|sig| {
                sig.key_id.as_bytes()[..] == log_id[..log_id.len().min(4)]
                    && key.verify(checkpoint.signed_data(), &sig.signature).is_ok()
            }) {
                return Ok(());
            }
        }
        if known {
            Err("the checkpoint is not signed by the transparency log's key".to_owned())
        } else {
            Err(format!(
                "transparency log {} is not in the trust root",
                hex::encode(log_id)
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_public_good_root_parses() {
        let root = Root::public_good().expect("embedded root");
        assert!(root.require_keyless_material().is_ok());
        assert!(root.trusted.certificate_authorities.len() >= 2);
        assert!(!root.trusted.timestamp_authorities.is_empty());
    }

    #[test]
    fn a_root_without_authorities_cannot_vouch_for_keyless_signatures() {
        let empty = Root::parse(r#"{"mediaType":"application/vnd.dev.sigstore.trustedroot+json;version=0.1","tlogs":[],"certificateAuthorities":[]}"#)
            .expect("an empty root parses");
        assert!(empty.require_keyless_material().is_err());
        assert!(Root::parse("not json").is_err());
    }
}
