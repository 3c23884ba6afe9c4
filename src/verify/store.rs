//! The evidence store: what fixity verified, kept in the API server as `VerifiedEvidence`
//! objects, so that a restart, a new replica or a registry outage does not turn verified digests
//! into registry traffic or denials.
//!
//! An object holds the evidence BYTES that were accepted (a Sigstore bundle, or a classic
//! signature's payload with its cosign annotations), never a verdict. Whatever is read back is
//! untrusted input: it is read and checked again by [`Verifier::verify_stored`] against the
//! authorities and trust roots in force now, bound to the digest asked about. So a forged entry,
//! one written for other authorities, or one a rotated key no longer accepts is useless, and the
//! registry is asked as if there were none: whoever can write the store can at worst cause a
//! registry request.
//!
//! Bounds: one object per (image digest, authorities fingerprint), named by their hash; at most
//! [`MAX_EVIDENCE_BYTES`] of evidence per object (larger evidence is not stored); `lastUsed`
//! written at most every [`Settings::touch_every`], so reads stay reads; objects unused for
//! [`Settings::unused_after`] deleted by one replica at a time (a Lease), which also deletes the
//! least recently used past [`Settings::max_objects`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, CustomResource, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use super::{Authority, EvidenceSource, SignatureKey, Verified, Verifier};
use crate::audit::Metrics;
use crate::audit::metrics::EvidenceStoreLabels;
use crate::image::ImageReference;

/// Evidence bytes one object holds at most: a keyless bundle with its certificate chain and log
/// entry is 5 to 10 KiB, a key signature under 2 KiB.
pub const MAX_EVIDENCE_BYTES: usize = 16 << 10;

/// Evidence items an entry holds at most (the CRD's bound on `spec.items`): one per signature
/// a `minAuthorities` threshold counts.
pub const MAX_EVIDENCE_ITEMS: usize = 8;

/// Verified evidence for one image digest and one set of authorities, as fixity accepted it.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "fixity.dev",
    version = "v1alpha1",
    kind = "VerifiedEvidence",
    plural = "verifiedevidences",
    shortname = "vev",
    doc = "Evidence fixity verified for one image digest; checked again whenever it is read.",
    printcolumn = r#"{"name":"Image","type":"string","jsonPath":".spec.image"}"#,
    printcolumn = r#"{"name":"Verified","type":"date","jsonPath":".spec.verifiedAt"}"#,
    printcolumn = r#"{"name":"Used","type":"date","jsonPath":".spec.lastUsed"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VerifiedEvidenceSpec {
    /// The pinned image, `registry/repository@digest`.
    #[schemars(length(max = 1024))]
    pub image: String,
    /// Fingerprint (hex) of the authorities and trust roots the evidence was verified against.
    pub authorities: String,
    /// When fixity verified the evidence it read from the registry.
    pub verified_at: Time,
    /// When a signature check last used the entry (written at most every few minutes).
    pub last_used: Time,
    /// The fixity version that wrote it.
    pub writer: String,
    /// The evidence, one item per signature (attestations to come as further kinds).
    #[schemars(length(max = 8))]
    pub items: Vec<EvidenceItem>,
}

/// One piece of evidence.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EvidenceItem {
    pub kind: EvidenceKind,
    /// A Sigstore bundle (JSON), for a signature attached as a referrer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16384))]
    pub bundle: Option<String>,
    /// A classic signature's simple-signing payload (JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16384))]
    pub payload: Option<String>,
    /// A classic signature's cosign layer annotations (signature, certificate, chain, Rekor
    /// bundle, RFC 3161 timestamp).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// What a piece of evidence proves.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum EvidenceKind {
    /// An image signature.
    Signature,
}

impl EvidenceItem {
    fn from_source(source: &EvidenceSource) -> Option<Self> {
        Some(match source {
            EvidenceSource::Bundle(bytes) => Self {
                kind: EvidenceKind::Signature,
                bundle: Some(String::from_utf8(bytes.clone()).ok()?),
                payload: None,
                annotations: BTreeMap::new(),
            },
            EvidenceSource::SimpleSigning {
                annotations,
                payload,
            } => Self {
                kind: EvidenceKind::Signature,
                bundle: None,
                payload: Some(String::from_utf8(payload.clone()).ok()?),
                annotations: annotations.clone(),
            },
        })
    }

    fn to_source(&self) -> Result<EvidenceSource, String> {
        match (&self.bundle, &self.payload) {
            (Some(bundle), None) if self.annotations.is_empty() => {
                Ok(EvidenceSource::Bundle(bundle.as_bytes().to_vec()))
            }
            (None, Some(payload)) => Ok(EvidenceSource::SimpleSigning {
                annotations: self.annotations.clone(),
                payload: payload.as_bytes().to_vec(),
            }),
            _ => Err("an item holds either a bundle or a payload with annotations".to_owned()),
        }
    }

    fn len(&self) -> usize {
        self.bundle.as_ref().map_or(0, String::len)
            + self.payload.as_ref().map_or(0, String::len)
            + self
                .annotations
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }
}

/// The object name for a signature key: a hash, so any image name fits and none can be chosen
/// to collide with another's.
pub fn object_name(key: &SignatureKey) -> String {
    let mut hasher = sha2::Sha256::new();
    hasher.update(key.0.as_bytes());
    hasher.update([0]);
    hasher.update(fingerprint_hex(key.1).as_bytes());
    hex::encode(hasher.finalize())
}

fn fingerprint_hex(fingerprint: u64) -> String {
    format!("{fingerprint:016x}")
}

/// How the store is kept.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// `lastUsed` is written when it is older than this.
    pub touch_every: Duration,
    /// Entries unused for this long are deleted.
    pub unused_after: Duration,
    /// Objects kept at most; the least recently used go first.
    pub max_objects: usize,
    /// How often the replica holding the Lease collects garbage.
    pub collect_every: Duration,
    /// Entries a starting replica reads at most, and for how long.
    pub warm_entries: usize,
    pub warm_time: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            touch_every: Duration::from_secs(600),
            unused_after: Duration::from_secs(30 * 24 * 3600),
            max_objects: 5_000,
            collect_every: Duration::from_secs(600),
            warm_entries: 5_000,
            warm_time: Duration::from_secs(5),
        }
    }
}

/// Why the store could not be used; the check then goes to the registry.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the evidence store cannot be reached: {0}")]
    Api(#[from] kube::Error),
    #[error("the evidence is {0} bytes, more than the {MAX_EVIDENCE_BYTES} an entry holds")]
    TooLarge(usize),
    #[error("the evidence is {0} signatures, more than the {MAX_EVIDENCE_ITEMS} an entry holds")]
    TooMany(usize),
    #[error("the evidence is not text")]
    NotText,
}

/// A store entry as read: untrusted until [`Verifier::verify_stored`] accepts it.
///
/// [`Verifier::verify_stored`]: super::Verifier::verify_stored
#[derive(Debug, Clone)]
pub struct Recalled {
    pub sources: Vec<EvidenceSource>,
    pub verified_at: Timestamp,
    pub last_used: Timestamp,
}

/// What asking the store for a check found.
#[derive(Debug)]
pub enum Recall {
    /// Stored evidence that verifies now.
    Verified(Verified),
    /// No entry for the key.
    Missing,
    /// The store could not be read.
    Unreachable(String),
    /// An entry older than the rule's maxEvidenceAge.
    Stale,
    /// An entry whose evidence does not verify now (tampered with, or for another key or
    /// authority), and why.
    Refused(String),
}

impl Recall {
    /// The metric label.
    pub fn outcome(&self) -> &'static str {
        match self {
            Recall::Verified(_) => "verified",
            Recall::Missing => "missing",
            Recall::Unreachable(_) => "unreachable",
            Recall::Stale => "stale",
            Recall::Refused(_) => "refused",
        }
    }
}

/// The `VerifiedEvidence` objects of one cluster.
#[derive(Clone)]
pub struct EvidenceStore {
    api: Api<VerifiedEvidence>,
    settings: Settings,
    metrics: Arc<Metrics>,
}

impl EvidenceStore {
    pub fn new(client: kube::Client, settings: Settings, metrics: Arc<Metrics>) -> Self {
        Self {
            api: Api::all(client),
            settings,
            metrics,
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The stored evidence for `key`, checked again by `verifier` against `authorities` as
    /// they are now, for `image`'s digest.
    pub async fn recall_verified(
        &self,
        verifier: &Verifier,
        key: &SignatureKey,
        image: &ImageReference,
        authorities: &[Authority],
        min_authorities: usize,
        max_age: Duration,
    ) -> Recall {
        let recalled = match self.recall(key).await {
            Ok(Some(recalled)) => recalled,
            Ok(None) => return Recall::Missing,
            Err(e) => {
                tracing::debug!(error = %e, "evidence store not read");
                return Recall::Unreachable(e.to_string());
            }
        };
        judge(
            verifier,
            key,
            image,
            authorities,
            min_authorities,
            max_age,
            &recalled,
        )
    }

    /// Stores the evidence of `verified` in the background; the check does not wait for it.
    pub fn remember_later(&self, key: SignatureKey, verified: Verified, metrics: Arc<Metrics>) {
        let store = self.clone();
        tokio::spawn(async move {
            let outcome = match store.remember(&key, &verified).await {
                Ok(()) => "written",
                Err(e) => {
                    tracing::warn!(image = key.0, error = %e, "evidence not stored");
                    "not_written"
                }
            };
            metrics
                .evidence_store
                .get_or_create(&EvidenceStoreLabels { outcome })
                .inc();
        });
    }

    /// The entry for `key`, if there is one that names it. Its `lastUsed` is brought up to
    /// date in the background when it is older than [`Settings::touch_every`].
    pub async fn recall(&self, key: &SignatureKey) -> Result<Option<Recalled>, StoreError> {
        let name = object_name(key);
        let Some(object) = self.api.get_opt(&name).await? else {
            return Ok(None);
        };
        let Some(recalled) = read_entry(key, &object.spec) else {
            return Ok(None);
        };
        let now = Timestamp::now();
        if elapsed(recalled.last_used, now) > self.settings.touch_every {
            let api = self.api.clone();
            tokio::spawn(async move {
                let patch = serde_json::json!({ "spec": { "lastUsed": Time(now) } });
                if let Err(e) = api
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    tracing::debug!(error = %e, "evidence store: lastUsed not written");
                }
            });
        }
        Ok(Some(recalled))
    }

    /// Keeps the evidence of a verification that just succeeded against the registry: creates
    /// the object, or replaces it at the resourceVersion read when another writer was first.
    pub async fn remember(
        &self,
        key: &SignatureKey,
        verified: &Verified,
    ) -> Result<(), StoreError> {
        if verified.evidence.len() > MAX_EVIDENCE_ITEMS {
            return Err(StoreError::TooMany(verified.evidence.len()));
        }
        let items = verified
            .evidence
            .iter()
            .map(EvidenceItem::from_source)
            .collect::<Option<Vec<_>>>()
            .ok_or(StoreError::NotText)?;
        let bytes: usize = items.iter().map(EvidenceItem::len).sum();
        if bytes > MAX_EVIDENCE_BYTES {
            return Err(StoreError::TooLarge(bytes));
        }
        let now = Time(Timestamp::now());
        let spec = VerifiedEvidenceSpec {
            image: key.0.clone(),
            authorities: fingerprint_hex(key.1),
            verified_at: now.clone(),
            last_used: now,
            writer: format!("fixity {}", env!("CARGO_PKG_VERSION")),
            items,
        };
        let name = object_name(key);
        let mut object = VerifiedEvidence {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..ObjectMeta::default()
            },
            spec,
        };
        // One re-read per lost race; a third writer in between only means the entry is fresh.
        for _ in 0..2 {
            let result = match self.api.get_opt(&name).await? {
                None => self.api.create(&PostParams::default(), &object).await,
                Some(current) => {
                    object.metadata.resource_version = current.resource_version();
                    self.api
                        .replace(&name, &PostParams::default(), &object)
                        .await
                }
            };
            match result {
                Ok(_) => return Ok(()),
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Entries as listed (at most [`Settings::warm_entries`], as many as are read within
    /// [`Settings::warm_time`]), the most recently used first, for a starting replica.
    pub async fn list(&self) -> Result<Vec<(SignatureKey, Recalled)>, StoreError> {
        let limit = self.settings.warm_entries;
        let mut kept = Vec::new();
        let walk = self.walk(|object| {
            if let Some(key) = key_of(&object.spec)
                && let Some(recalled) = read_entry(&key, &object.spec)
            {
                kept.push((key, recalled));
            }
            kept.len() < limit
        });
        match tokio::time::timeout(self.settings.warm_time, walk).await {
            Ok(walked) => walked?,
            Err(_) => tracing::warn!(
                read = kept.len(),
                seconds = self.settings.warm_time.as_secs(),
                "evidence store: not listed in time; starting with what was read"
            ),
        }
        kept.sort_by_key(|(_, r)| std::cmp::Reverse(r.last_used));
        Ok(kept)
    }

    /// Lists the store a page at a time, handing each object to `each` (which says whether to
    /// go on) and keeping none, so a large store costs one page of memory. A whole listing
    /// sets the size metrics.
    async fn walk(&self, mut each: impl FnMut(VerifiedEvidence) -> bool) -> Result<(), StoreError> {
        let (mut objects, mut bytes) = (0usize, 0usize);
        let mut params = ListParams::default().limit(500);
        loop {
            let page = self.api.list(&params).await?;
            let next = page.metadata.continue_.clone().filter(|c| !c.is_empty());
            for object in page.items {
                objects += 1;
                bytes += object
                    .spec
                    .items
                    .iter()
                    .map(EvidenceItem::len)
                    .sum::<usize>();
                if !each(object) {
                    return Ok(());
                }
            }
            match next {
                Some(token) => params = params.continue_token(&token),
                None => break,
            }
        }
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.metrics.evidence_store_objects.set(gauge(objects));
        self.metrics.evidence_store_bytes.set(gauge(bytes));
        Ok(())
    }

    /// Deletes entries unused for [`Settings::unused_after`], then the least recently used
    /// past [`Settings::max_objects`]. Returns how many were deleted.
    pub async fn collect_garbage(&self) -> Result<usize, StoreError> {
        // Names, versions and last uses only: the evidence itself is not kept.
        let mut entries = Vec::new();
        self.walk(|object| {
            entries.push((
                object.name_any(),
                object.resource_version(),
                object.spec.last_used.0,
            ));
            true
        })
        .await?;
        let now = Timestamp::now();
        entries.sort_by_key(|(_, _, used)| std::cmp::Reverse(*used));
        let mut deleted = 0;
        for (rank, (name, version, used)) in entries.into_iter().enumerate() {
            let unused = elapsed(used, now) > self.settings.unused_after;
            if !(unused || rank >= self.settings.max_objects) {
                continue;
            }
            let params = DeleteParams {
                preconditions: version.map(|v| kube::api::Preconditions {
                    resource_version: Some(v),
                    uid: None,
                }),
                ..DeleteParams::default()
            };
            match self.api.delete(&name, &params).await {
                Ok(_) => deleted += 1,
                // Used (or deleted) by another replica meanwhile: it stays, or is gone anyway.
                Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
        if deleted > 0 {
            self.walk(|_| true).await?;
        }
        Ok(deleted)
    }
}

/// Whether a recalled entry answers for `key` now: young enough, and its evidence verifies
/// against `authorities` (`min_authorities` of them distinct) for `image`'s digest.
pub fn judge(
    verifier: &Verifier,
    key: &SignatureKey,
    image: &ImageReference,
    authorities: &[Authority],
    min_authorities: usize,
    max_age: Duration,
    recalled: &Recalled,
) -> Recall {
    if elapsed(recalled.verified_at, Timestamp::now()) > max_age {
        return Recall::Stale;
    }
    match verifier.verify_stored(image, authorities, min_authorities, &recalled.sources) {
        Ok(verified) => Recall::Verified(verified),
        Err(e) => {
            tracing::warn!(image = key.0, error = %e, "stored evidence refused; asking the registry");
            Recall::Refused(e.to_string())
        }
    }
}

/// The key an object claims to be for, if its name is the one that key gives.
fn key_of(spec: &VerifiedEvidenceSpec) -> Option<SignatureKey> {
    let fingerprint = u64::from_str_radix(&spec.authorities, 16).ok()?;
    Some((spec.image.clone(), fingerprint))
}

/// The evidence of an entry, if it is for `key`; the bytes are checked later.
fn read_entry(key: &SignatureKey, spec: &VerifiedEvidenceSpec) -> Option<Recalled> {
    if spec.image != key.0 || spec.authorities != fingerprint_hex(key.1) {
        return None;
    }
    let sources = spec
        .items
        .iter()
        .filter(|i| i.kind == EvidenceKind::Signature)
        .map(EvidenceItem::to_source)
        .collect::<Result<Vec<_>, _>>()
        .ok()?;
    Some(Recalled {
        sources,
        verified_at: spec.verified_at.0,
        last_used: spec.last_used.0,
    })
}

/// Time from `then` to `now`; zero when `then` lies ahead.
pub fn elapsed(then: Timestamp, now: Timestamp) -> Duration {
    Duration::try_from(now.duration_since(then)).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(items: Vec<EvidenceItem>) -> VerifiedEvidenceSpec {
        VerifiedEvidenceSpec {
            image: "r.example/app@sha256:aa".into(),
            authorities: fingerprint_hex(7),
            verified_at: Time(Timestamp::UNIX_EPOCH),
            last_used: Time(Timestamp::UNIX_EPOCH),
            writer: "test".into(),
            items,
        }
    }

    #[test]
    fn evidence_survives_the_round_trip() {
        let sources = [
            EvidenceSource::Bundle(br#"{"mediaType":"x"}"#.to_vec()),
            EvidenceSource::SimpleSigning {
                annotations: BTreeMap::from([("a".into(), "b".into())]),
                payload: b"{}".to_vec(),
            },
        ];
        for source in sources {
            let item = EvidenceItem::from_source(&source).expect("text");
            assert_eq!(item.to_source(), Ok(source));
        }
    }

    #[test]
    fn an_entry_is_only_read_for_the_key_it_names() {
        let item = EvidenceItem::from_source(&EvidenceSource::Bundle(b"{}".to_vec())).unwrap();
        let spec = spec(vec![item]);
        let key = ("r.example/app@sha256:aa".to_owned(), 7);
        assert!(read_entry(&key, &spec).is_some());
        assert!(read_entry(&("r.example/app@sha256:bb".to_owned(), 7), &spec).is_none());
        assert!(read_entry(&(key.0.clone(), 8), &spec).is_none());
        assert_eq!(key_of(&spec), Some(key.clone()));
        assert_ne!(object_name(&key), object_name(&(key.0.clone(), 8)));
    }

    #[test]
    fn a_malformed_item_makes_the_entry_unreadable() {
        let both = EvidenceItem {
            kind: EvidenceKind::Signature,
            bundle: Some("{}".into()),
            payload: Some("{}".into()),
            annotations: BTreeMap::new(),
        };
        let key = ("r.example/app@sha256:aa".to_owned(), 7);
        assert!(read_entry(&key, &spec(vec![both])).is_none());
    }

    #[test]
    fn binary_evidence_is_not_stored() {
        assert!(EvidenceItem::from_source(&EvidenceSource::Bundle(vec![0xff, 0xfe])).is_none());
    }
}
