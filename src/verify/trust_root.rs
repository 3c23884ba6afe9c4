//! Sigstore trust roots (`trusted_root.json`): the certificate authorities keyless certificates
//! chain to and the transparency logs whose timestamps are believed, each with its validity.

use std::collections::HashMap;

use rustls::pki_types::CertificateDer;
use sigstore::crypto::CosignVerificationKey;
use sigstore_protobuf_specs::dev::sigstore::common::v1::TimeRange;
use sigstore_protobuf_specs::dev::sigstore::trustroot::v1::TrustedRoot;

/// Sigstore's public-good trusted root, as shipped by the sigstore crate (0.15) for its own
/// TUF bootstrap; refreshed by hand when Sigstore rotates keys.
const PUBLIC_GOOD: &str = include_str!("public_good_trusted_root.json");

/// Seconds since the Unix epoch; `None` bounds are open.
#[derive(Debug, Clone, Copy)]
struct Window {
    start: Option<i64>,
    end: Option<i64>,
}

impl Window {
    fn from(range: Option<&TimeRange>) -> Self {
        Self {
            start: range.and_then(|r| r.start.as_ref()).map(|t| t.seconds),
            end: range.and_then(|r| r.end.as_ref()).map(|t| t.seconds),
        }
    }

    fn contains(&self, t: i64) -> bool {
        self.start.is_none_or(|s| s <= t) && self.end.is_none_or(|e| t <= e)
    }
}

/// A certificate authority: its chain, leaf-most first and root last.
pub(super) struct Authority {
    pub chain: Vec<CertificateDer<'static>>,
    valid: Window,
}

impl Authority {
    pub fn valid_at(&self, t: i64) -> bool {
        self.valid.contains(t)
    }
}

struct Log {
    key: CosignVerificationKey,
    valid: Window,
}

/// A parsed trust root.
pub(super) struct ParsedTrustRoot {
    pub authorities: Vec<Authority>,
    /// Transparency logs by hex key id.
    logs: HashMap<String, Log>,
}

impl ParsedTrustRoot {
    pub fn public_good() -> Result<Self, String> {
        Self::parse(PUBLIC_GOOD)
    }

    pub fn parse(json: &str) -> Result<Self, String> {
        let root: TrustedRoot =
            serde_json::from_str(json).map_err(|e| format!("unreadable trusted_root.json: {e}"))?;
        let authorities: Vec<Authority> = root
            .certificate_authorities
            .iter()
            .filter_map(|ca| {
                let chain: Vec<_> = ca
                    .cert_chain
                    .as_ref()?
                    .certificates
                    .iter()
                    .map(|c| CertificateDer::from(c.raw_bytes.clone()))
                    .collect();
                (!chain.is_empty()).then(|| Authority {
                    chain,
                    valid: Window::from(ca.valid_for.as_ref()),
                })
            })
            .collect();
        if authorities.is_empty() {
            return Err("trusted_root.json names no certificate authority".to_owned());
        }
        let mut logs = HashMap::new();
        for tlog in &root.tlogs {
            let (Some(id), Some(key)) = (tlog.log_id.as_ref(), tlog.public_key.as_ref()) else {
                continue;
            };
            let Some(raw) = key.raw_bytes.as_ref() else {
                continue;
            };
            let parsed = CosignVerificationKey::try_from_der(raw).map_err(|e| {
                format!(
                    "transparency log {} has an unusable key: {e}",
                    tlog.base_url
                )
            })?;
            logs.insert(
                hex::encode(&id.key_id),
                Log {
                    key: parsed,
                    valid: Window::from(key.valid_for.as_ref()),
                },
            );
        }
        if logs.is_empty() {
            return Err("trusted_root.json names no transparency log".to_owned());
        }
        Ok(Self { authorities, logs })
    }

    /// The key of log `id` (hex), if the root trusts that log at time `t`.
    pub fn log_key(&self, id: &str, t: i64) -> Result<&CosignVerificationKey, String> {
        let log = self
            .logs
            .get(id)
            .ok_or_else(|| format!("transparency log {id} is not in the trust root"))?;
        if !log.valid.contains(t) {
            return Err(format!(
                "transparency log {id} was not trusted at the entry's time"
            ));
        }
        Ok(&log.key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_public_good_root_parses() {
        let root = ParsedTrustRoot::public_good().expect("embedded root");
        assert!(root.authorities.len() >= 2);
        // rekor.sigstore.dev, key id c0d23d6a… since 2021.
        let rekor = "c0d23d6ad406973f9559f3ba2d1ca01f84147d8ffc5b8445c224f98b9591801d";
        assert!(root.log_key(rekor, 1_700_000_000).is_ok());
        assert!(root.log_key(rekor, 1_500_000_000).is_err());
        assert!(root.log_key("00", 1_700_000_000).is_err());
    }

    #[test]
    fn a_root_without_authorities_is_refused() {
        assert!(ParsedTrustRoot::parse(r#"{"tlogs":[],"certificateAuthorities":[]}"#).is_err());
        assert!(ParsedTrustRoot::parse("not json").is_err());
    }
}
