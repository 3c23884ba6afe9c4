//! The evidence store: what fixity verified, kept in the API server as `VerifiedEvidence`
//! objects, so that a restart, a new replica or a registry outage does not turn verified digests
//! into registry traffic or denials.
//!
//! An object holds the evidence BYTES that were accepted (a Sigstore bundle, or a classic
//! signature's payload with its cosign annotations; for attestations, the bundle of the DSSE
//! envelope that satisfied a rule), never a verdict. Whatever is read back is
//! untrusted input: it is read and checked again by [`Verifier::verify_stored`] against the
//! authorities and trust roots in force now, bound to the digest asked about. So a forged entry,
//! one written for other authorities, or one a rotated key no longer accepts is useless, and the
//! registry is asked as if there were none: whoever can write the store can at worst cause a
//! registry request. Stored attestations go through [`Verifier::verify_stored_attestations`]:
//! the search and conditions a registry listing goes through, so an envelope whose signature,
//! subject digest or predicate type does not hold, or that fails a rule's conditions now,
//! satisfies nothing.
//!
//! One object per (image digest, authorities fingerprint) holds that digest's signature and the
//! attestations signed under the same authorities (an attestation rule without authorities of
//! its own shares its verify rule's), each attestation an item of kind `Attestation` with its
//! predicate type and the time it was verified. Objects written before attestations were stored
//! read as they did; items of a kind this version does not know are skipped.
//!
//! Bounds: one object per (image digest, authorities fingerprint), named by their hash; at most
//! [`MAX_EVIDENCE_BYTES`] for the signatures and for each attestation (larger evidence is not
//! stored), [`MAX_EVIDENCE_ITEMS`] items and
//! [`MAX_OBJECT_BYTES`] of evidence per object (the item written last is kept, then the others
//! while they fit); `lastUsed`
//! written at most every [`Settings::touch_every`], so reads stay reads; objects unused for
//! [`Settings::unused_after`] deleted by one replica at a time (a Lease), which also deletes the
//! least recently used past [`Settings::max_objects`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, CustomResource, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use super::{
    AttestationCheck, AttestationRule, Authority, EvidenceSource, SignatureKey, Verified, Verifier,
};
use crate::audit::Metrics;
use crate::audit::metrics::EvidenceStoreLabels;
use crate::image::ImageReference;

/// Evidence bytes an entry's signatures hold at most, and one attestation: a keyless bundle with
/// its certificate chain and log entry is 5 to 10 KiB, a key signature under 2 KiB, a
/// provenance attestation a few KiB (scans and SBOMs past this are not stored, and asked of the
/// registry).
pub const MAX_EVIDENCE_BYTES: usize = 16 << 10;

/// Evidence items an entry holds at most (the CRD's bound on `spec.items`): one per signature
/// a `minAuthorities` threshold counts, and the attestations of a few predicate types.
pub const MAX_EVIDENCE_ITEMS: usize = 8;

/// Evidence bytes one object holds at most, all items together.
pub const MAX_OBJECT_BYTES: usize = 64 << 10;

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
    /// When fixity verified the signature evidence it read from the registry.
    pub verified_at: Time,
    /// When a check last used the entry (written at most every few minutes).
    pub last_used: Time,
    /// The fixity version that wrote it.
    pub writer: String,
    /// The evidence: the signatures (one per authority a threshold counts), and the
    /// attestations signed under the same authorities.
    #[schemars(length(max = 8))]
    pub items: Vec<EvidenceItem>,
}

/// One piece of evidence.
// Unknown fields are ignored rather than refused: a later version's kinds may carry fields of
// their own, and must not make the whole object unreadable.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EvidenceItem {
    pub kind: EvidenceKind,
    /// A Sigstore bundle (JSON), for a signature attached as a referrer or an attestation.
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
    /// For an attestation, the predicate type it was stored for; its statement must still say
    /// the same when it is read back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub predicate_type: Option<String>,
    /// For an attestation, when fixity verified it (a signature's is the object's
    /// `verifiedAt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_at: Option<Time>,
}

/// What a piece of evidence proves.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum EvidenceKind {
    /// An image signature.
    Signature,
    /// A signed in-toto attestation (a DSSE envelope in a bundle).
    Attestation,
    /// A kind written by a later version: skipped.
    #[serde(other)]
    #[schemars(skip)]
    Unknown,
}

impl EvidenceItem {
    fn from_source(source: &EvidenceSource) -> Option<Self> {
        Some(match source {
            EvidenceSource::Bundle(bytes) => Self {
                kind: EvidenceKind::Signature,
                bundle: Some(String::from_utf8(bytes.clone()).ok()?),
                payload: None,
                annotations: BTreeMap::new(),
                predicate_type: None,
                verified_at: None,
            },
            EvidenceSource::SimpleSigning {
                annotations,
                payload,
            } => Self {
                kind: EvidenceKind::Signature,
                bundle: None,
                payload: Some(String::from_utf8(payload.clone()).ok()?),
                annotations: annotations.clone(),
                predicate_type: None,
                verified_at: None,
            },
        })
    }

    /// An attestation of `predicate_type` verified at `at`; always a bundle.
    fn attestation(source: &EvidenceSource, predicate_type: &str, at: Timestamp) -> Option<Self> {
        let EvidenceSource::Bundle(bytes) = source else {
            return None;
        };
        Some(Self {
            kind: EvidenceKind::Attestation,
            bundle: Some(String::from_utf8(bytes.clone()).ok()?),
            payload: None,
            annotations: BTreeMap::new(),
            predicate_type: Some(predicate_type.to_owned()),
            verified_at: Some(Time(at)),
        })
    }

    /// Whether writing `self` makes `other` obsolete: a signature replaces the signature, an
    /// attestation the one of its predicate type. An unknown kind is not kept by a writer that
    /// cannot read it.
    fn replaces(&self, other: &EvidenceItem) -> bool {
        match other.kind {
            EvidenceKind::Unknown => true,
            EvidenceKind::Signature => self.kind == EvidenceKind::Signature,
            EvidenceKind::Attestation => {
                self.kind == EvidenceKind::Attestation
                    && self.predicate_type == other.predicate_type
            }
        }
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

    /// An attestation item's evidence; it must be a bundle.
    fn attestation_source(&self) -> Result<EvidenceSource, String> {
        match (&self.bundle, &self.payload) {
            (Some(bundle), None) if self.annotations.is_empty() => {
                Ok(EvidenceSource::Bundle(bundle.as_bytes().to_vec()))
            }
            _ => Err("an attestation item holds a bundle and nothing else".to_owned()),
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
    #[error("the entry changed under each of {0} writes")]
    Contended(usize),
}

/// Writes of one item tried at most, each after re-reading the object.
const WRITE_ATTEMPTS: usize = 4;

/// A store entry as read: untrusted until [`Verifier::verify_stored`] accepts it.
///
/// [`Verifier::verify_stored`]: super::Verifier::verify_stored
#[derive(Debug, Clone)]
pub struct Recalled {
    pub sources: Vec<EvidenceSource>,
    pub verified_at: Timestamp,
    pub last_used: Timestamp,
}

/// A stored attestation as read: untrusted until [`Verifier::verify_stored_attestations`]
/// accepts it for a rule.
#[derive(Debug, Clone)]
pub struct StoredAttestation {
    /// The predicate type it was stored for.
    pub predicate_type: String,
    pub verified_at: Timestamp,
    pub source: EvidenceSource,
}

/// What asking the store for a check found: for a signature the verification, for an
/// attestation rule the check it satisfies.
#[derive(Debug, Clone)]
pub enum Recall<T = Verified> {
    /// Stored evidence that verifies now.
    Verified(T),
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

impl<T> Recall<T> {
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
            let written = store.remember(&key, &verified).await;
            counted(&metrics, &key, written, verified.evidence.len());
        });
    }

    /// Stores in the background the attestations (rule, what it was read from) that satisfied
    /// their rules for the pinned image `pinned`, each beside the signatures of its rule's
    /// authorities: one write per object, however many rules share it.
    pub fn remember_attestations_later(
        &self,
        pinned: &str,
        satisfied: &[(&AttestationRule, &EvidenceSource)],
        metrics: Arc<Metrics>,
    ) {
        let now = Timestamp::now();
        let mut objects: BTreeMap<u64, Vec<Option<EvidenceItem>>> = BTreeMap::new();
        for (rule, source) in satisfied {
            let item = EvidenceItem::attestation(source, &rule.predicate_type, now);
            objects
                .entry(rule.authorities_fingerprint)
                .or_default()
                .push(item);
        }
        for (fingerprint, items) in objects {
            self.write_later((pinned.to_owned(), fingerprint), items, metrics.clone());
        }
    }

    /// Writes the `items` that can be stored (text, within [`MAX_EVIDENCE_BYTES`]) into the
    /// object for `key`, in the background; each attestation stands alone, so one too large
    /// to keep does not keep the others out.
    fn write_later(
        &self,
        key: SignatureKey,
        items: Vec<Option<EvidenceItem>>,
        metrics: Arc<Metrics>,
    ) {
        let store = self.clone();
        tokio::spawn(async move {
            let mut fit = Vec::new();
            for item in items {
                match item {
                    None => counted(&metrics, &key, Err(StoreError::NotText), 1),
                    Some(item) if item.len() > MAX_EVIDENCE_BYTES => {
                        let large = StoreError::TooLarge(item.len());
                        counted(&metrics, &key, Err(large), 1);
                    }
                    Some(item) => fit.push(item),
                }
            }
            if !fit.is_empty() {
                let n = fit.len();
                counted(&metrics, &key, store.write(&key, fit).await, n);
            }
        });
    }

    /// The signature evidence of the entry for `key`, if there is one that names it.
    pub async fn recall(&self, key: &SignatureKey) -> Result<Option<Recalled>, StoreError> {
        Ok(self
            .fetch(key)
            .await?
            .and_then(|spec| read_entry(key, &spec)))
    }

    /// The entry for `key`, if there is one that names it. Its `lastUsed` is brought up to
    /// date in the background when it is older than [`Settings::touch_every`].
    async fn fetch(&self, key: &SignatureKey) -> Result<Option<VerifiedEvidenceSpec>, StoreError> {
        let name = object_name(key);
        let Some(object) = self.api.get_opt(&name).await? else {
            return Ok(None);
        };
        if !names(key, &object.spec) {
            return Ok(None);
        }
        let now = Timestamp::now();
        if elapsed(object.spec.last_used.0, now) > self.settings.touch_every {
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
        Ok(Some(object.spec))
    }

    /// Each of `rules` (in order) for the image `pinned`, as the attestations stored for it
    /// answer it now: every stored attestation of the rule's type, young enough for the rule,
    /// checked again by `verifier` as a registry listing's would be, conditions at `now`.
    pub async fn recall_attestations(
        &self,
        verifier: &Verifier,
        image: &ImageReference,
        pinned: &str,
        rules: &[Arc<AttestationRule>],
        now: SystemTime,
    ) -> Vec<Recall<AttestationCheck>> {
        // One read per authorities fingerprint: rules with the same signers share an object.
        let mut fingerprints: Vec<u64> = rules.iter().map(|r| r.authorities_fingerprint).collect();
        fingerprints.sort_unstable();
        fingerprints.dedup();
        let mut stored = Vec::new();
        for fingerprint in fingerprints {
            match self.fetch(&(pinned.to_owned(), fingerprint)).await {
                Ok(Some(spec)) => stored.extend(read_attestations(&spec)),
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "evidence store not read");
                    return vec![Recall::Unreachable(e.to_string()); rules.len()];
                }
            }
        }
        judge_attestations(verifier, image, rules, &stored, now).await
    }

    /// Keeps `items`, verified against the registry just now, in the object for `key`, with
    /// the items they do not replace: creates the object, or replaces it at the
    /// resourceVersion read when another writer was first.
    pub async fn write(
        &self,
        key: &SignatureKey,
        items: Vec<EvidenceItem>,
    ) -> Result<(), StoreError> {
        if let Some(large) = items.iter().find(|i| i.len() > MAX_EVIDENCE_BYTES) {
            return Err(StoreError::TooLarge(large.len()));
        }
        let name = object_name(key);
        // A re-read per lost race: a digest's signature and its attestations are written
        // apart, often at once (and by other replicas), and each writer keeps the others'
        // items.
        for _ in 0..WRITE_ATTEMPTS {
            let current = self.api.get_opt(&name).await?;
            let spec = merged(key, current.as_ref().map(|c| &c.spec), items.clone());
            let mut object = VerifiedEvidence {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    ..ObjectMeta::default()
                },
                spec,
            };
            let result = match current {
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
        Err(StoreError::Contended(WRITE_ATTEMPTS))
    }

    /// Keeps the evidence of a signature verification that just succeeded against the
    /// registry.
    pub async fn remember(
        &self,
        key: &SignatureKey,
        verified: &Verified,
    ) -> Result<(), StoreError> {
        if verified.evidence.len() > MAX_EVIDENCE_ITEMS {
            return Err(StoreError::TooMany(verified.evidence.len()));
        }
        // All of a threshold's signatures or none: a part of them would be refused on read.
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
        self.write(key, items).await
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

/// Counts a write of `n` items for `key` as written or not.
fn counted(metrics: &Metrics, key: &SignatureKey, written: Result<(), StoreError>, n: usize) {
    let outcome = match written {
        Ok(()) => "written",
        Err(e) => {
            tracing::warn!(image = key.0, error = %e, "evidence not stored");
            "not_written"
        }
    };
    metrics
        .evidence_store
        .get_or_create(&EvidenceStoreLabels { outcome })
        .inc_by(n as u64);
}

/// Each of `rules` as `stored` answers it now: an attestation counts for a rule only when it
/// is of the rule's type and younger than the rule's maxEvidenceAge, and then only if
/// [`Verifier::verify_stored_attestations`] finds that it satisfies the rule.
pub async fn judge_attestations(
    verifier: &Verifier,
    image: &ImageReference,
    rules: &[Arc<AttestationRule>],
    stored: &[StoredAttestation],
    now: SystemTime,
) -> Vec<Recall<AttestationCheck>> {
    let current = Timestamp::now();
    let mut recalled = Vec::with_capacity(rules.len());
    for rule in rules {
        let of_type: Vec<&StoredAttestation> = stored
            .iter()
            .filter(|s| s.predicate_type == rule.predicate_type)
            .collect();
        let young: Vec<EvidenceSource> = of_type
            .iter()
            .filter(|s| elapsed(s.verified_at, current) <= rule.max_evidence_age)
            .map(|s| s.source.clone())
            .collect();
        if of_type.is_empty() {
            recalled.push(Recall::Missing);
            continue;
        }
        if young.is_empty() {
            recalled.push(Recall::Stale);
            continue;
        }
        // Each rule judged alone: an attestation young enough for one rule never serves
        // another with a shorter maxEvidenceAge.
        let judged = verifier
            .verify_stored_attestations(image, std::slice::from_ref(rule), &young, now)
            .await;
        recalled.push(match judged.into_iter().next() {
            Some((check @ AttestationCheck::Satisfied { .. }, _)) => Recall::Verified(check),
            other => {
                let why = match other.map(|(check, _)| check) {
                    Some(AttestationCheck::Missing(why) | AttestationCheck::Unavailable(why)) => {
                        why
                    }
                    Some(AttestationCheck::ConditionFailed { failure, .. }) => failure.to_string(),
                    _ => "nothing was judged".to_owned(),
                };
                tracing::warn!(
                    image = %image,
                    rule = rule.name,
                    error = %why,
                    "stored attestation refused; asking the registry"
                );
                Recall::Refused(why)
            }
        });
    }
    recalled
}

/// The object `key` holds once `items` (verified now) are written over `current`: `items`
/// first, then what `current` held that none of them replaces, while the bounds allow.
fn merged(
    key: &SignatureKey,
    current: Option<&VerifiedEvidenceSpec>,
    items: Vec<EvidenceItem>,
) -> VerifiedEvidenceSpec {
    let now = Timestamp::now();
    let current = current.filter(|spec| names(key, spec));
    // `verifiedAt` is the signature's: an attestation written later does not make it younger.
    let signed_now = items.iter().any(|i| i.kind == EvidenceKind::Signature);
    let verified_at = match current {
        Some(spec) if !signed_now => spec.verified_at.clone(),
        _ => Time(now),
    };
    let carried = current
        .into_iter()
        .flat_map(|spec| &spec.items)
        .filter(|old| !items.iter().any(|new| new.replaces(old)))
        .cloned()
        .collect::<Vec<_>>();
    let (mut kept, mut bytes) = (Vec::new(), 0);
    for item in items.into_iter().chain(carried) {
        if kept.len() >= MAX_EVIDENCE_ITEMS || bytes + item.len() > MAX_OBJECT_BYTES {
            continue;
        }
        bytes += item.len();
        kept.push(item);
    }
    VerifiedEvidenceSpec {
        image: key.0.clone(),
        authorities: fingerprint_hex(key.1),
        verified_at,
        last_used: Time(now),
        writer: format!("fixity {}", env!("CARGO_PKG_VERSION")),
        items: kept,
    }
}

/// Whether an object's spec says it is for `key`.
fn names(key: &SignatureKey, spec: &VerifiedEvidenceSpec) -> bool {
    spec.image == key.0 && spec.authorities == fingerprint_hex(key.1)
}

/// The attestations an entry holds; a malformed item is skipped (its rule asks the registry).
fn read_attestations(spec: &VerifiedEvidenceSpec) -> Vec<StoredAttestation> {
    spec.items
        .iter()
        .filter(|i| i.kind == EvidenceKind::Attestation)
        .filter_map(|i| {
            Some(StoredAttestation {
                predicate_type: i.predicate_type.clone()?,
                verified_at: i.verified_at.as_ref().unwrap_or(&spec.verified_at).0,
                source: i.attestation_source().ok()?,
            })
        })
        .collect()
}

/// The key an object claims to be for, if its name is the one that key gives.
fn key_of(spec: &VerifiedEvidenceSpec) -> Option<SignatureKey> {
    let fingerprint = u64::from_str_radix(&spec.authorities, 16).ok()?;
    Some((spec.image.clone(), fingerprint))
}

/// The signature evidence of an entry, if it is for `key` and holds some; the bytes are
/// checked later.
fn read_entry(key: &SignatureKey, spec: &VerifiedEvidenceSpec) -> Option<Recalled> {
    if !names(key, spec) {
        return None;
    }
    let sources = spec
        .items
        .iter()
        .filter(|i| i.kind == EvidenceKind::Signature)
        .map(EvidenceItem::to_source)
        .collect::<Result<Vec<_>, _>>()
        .ok()
        .filter(|sources| !sources.is_empty())?;
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
            predicate_type: None,
            verified_at: None,
        };
        let key = ("r.example/app@sha256:aa".to_owned(), 7);
        assert!(read_entry(&key, &spec(vec![both])).is_none());
    }

    /// A spec as the API server returns it, from JSON.
    fn parse(items: serde_json::Value) -> VerifiedEvidenceSpec {
        serde_json::from_value(serde_json::json!({
            "image": "r.example/app@sha256:aa",
            "authorities": fingerprint_hex(7),
            "verifiedAt": "2026-11-01T00:00:00Z",
            "lastUsed": "2026-11-02T00:00:00Z",
            "writer": "fixity 0.1.0",
            "items": items,
        }))
        .expect("spec")
    }

    fn attestation(kind: &str, bytes: &str) -> EvidenceItem {
        let source = EvidenceSource::Bundle(bytes.as_bytes().to_vec());
        EvidenceItem::attestation(&source, kind, Timestamp::now()).expect("text")
    }

    fn key() -> SignatureKey {
        ("r.example/app@sha256:aa".to_owned(), 7)
    }

    #[test]
    fn an_object_written_before_attestations_were_stored_still_reads() {
        // As the store held it before attestation items existed: one signature, no
        // predicateType or per-item verifiedAt anywhere.
        let spec = parse(serde_json::json!([
            { "kind": "Signature", "payload": "{}", "annotations": { "a": "b" } },
        ]));
        let recalled = read_entry(&key(), &spec).expect("signature evidence");
        assert_eq!(recalled.sources.len(), 1);
        assert_eq!(recalled.verified_at, spec.verified_at.0);
        assert!(read_attestations(&spec).is_empty());
    }

    #[test]
    fn unknown_kinds_and_fields_are_skipped_not_fatal() {
        let spec = parse(serde_json::json!([
            { "kind": "Sbom", "bundle": "{}", "digestSet": { "sha256": "aa" } },
            { "kind": "Signature", "bundle": "{}" },
            { "kind": "Attestation", "bundle": "{}", "predicateType": "https://x.test/v1",
              "verifiedAt": "2026-11-03T00:00:00Z" },
        ]));
        assert_eq!(spec.items[0].kind, EvidenceKind::Unknown);
        assert_eq!(
            read_entry(&key(), &spec).expect("signature").sources.len(),
            1
        );
        let stored = read_attestations(&spec);
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].predicate_type, "https://x.test/v1");
        assert_ne!(stored[0].verified_at, spec.verified_at.0, "its own time");
        // A writer keeps only what it can read.
        let merged = merged(
            &key(),
            Some(&spec),
            vec![attestation("https://y.test/v1", "{}")],
        );
        assert!(merged.items.iter().all(|i| i.kind != EvidenceKind::Unknown));
        assert_eq!(merged.items.len(), 3);
    }

    #[test]
    fn an_object_of_attestations_only_has_no_signature_evidence() {
        let spec = spec(vec![attestation("https://x.test/v1", "{}")]);
        assert!(read_entry(&key(), &spec).is_none());
        assert_eq!(read_attestations(&spec).len(), 1);
    }

    #[test]
    fn a_malformed_attestation_item_is_skipped() {
        let mut untyped = attestation("https://x.test/v1", "{}");
        untyped.predicate_type = None;
        let mut payload = attestation("https://x.test/v1", "{}");
        payload.payload = Some("{}".into());
        let good = attestation("https://z.test/v1", "{}");
        let spec = spec(vec![untyped, payload, good]);
        let stored = read_attestations(&spec);
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].predicate_type, "https://z.test/v1");
    }

    #[test]
    fn a_write_keeps_what_it_does_not_replace_within_the_bounds() {
        let signature =
            EvidenceItem::from_source(&EvidenceSource::Bundle(b"{}".to_vec())).expect("text");
        let old = spec(vec![
            signature.clone(),
            attestation("https://x.test/v1", "old"),
            attestation("https://y.test/v1", "other"),
        ]);
        // An attestation replaces its own type's, keeps the signature and its time.
        let after = merged(
            &key(),
            Some(&old),
            vec![attestation("https://x.test/v1", "new")],
        );
        assert_eq!(after.verified_at, old.verified_at);
        assert_eq!(after.items.len(), 3);
        assert_eq!(after.items[0].bundle.as_deref(), Some("new"));
        assert!(after.items.contains(&signature));
        assert!(
            !after
                .items
                .iter()
                .any(|i| i.bundle.as_deref() == Some("old"))
        );
        // A signature replaces the signature, keeps the attestations, and is dated now.
        let resigned = merged(&key(), Some(&after), vec![signature.clone()]);
        assert_ne!(resigned.verified_at, old.verified_at);
        assert_eq!(resigned.items.len(), 3);
        assert_eq!(
            resigned
                .items
                .iter()
                .filter(|i| i.kind == EvidenceKind::Signature)
                .count(),
            1
        );
        // An object for another key contributes nothing.
        let other = merged(
            &("r.example/app@sha256:bb".to_owned(), 7),
            Some(&old),
            vec![signature],
        );
        assert_eq!(other.items.len(), 1);

        // Past the bounds, the item written is kept and the rest while they fit.
        let big = "x".repeat(MAX_EVIDENCE_BYTES);
        let full: Vec<EvidenceItem> = (0..MAX_EVIDENCE_ITEMS)
            .map(|i| attestation(&format!("https://t.test/{i}"), &big))
            .collect();
        let after = merged(
            &key(),
            Some(&spec(full)),
            vec![attestation("https://new.test", "{}")],
        );
        let bytes: usize = after.items.iter().map(EvidenceItem::len).sum();
        assert!(bytes <= MAX_OBJECT_BYTES, "{bytes}");
        assert!(after.items.len() <= MAX_EVIDENCE_ITEMS);
        assert_eq!(
            after.items[0].predicate_type.as_deref(),
            Some("https://new.test")
        );
    }

    #[test]
    fn several_items_written_at_once_are_all_kept() {
        let old = spec(vec![attestation("https://x.test/v1", "old")]);
        let new = vec![
            attestation("https://x.test/v1", "new"),
            attestation("https://y.test/v1", "{}"),
            attestation("https://z.test/v1", "{}"),
        ];
        let after = merged(&key(), Some(&old), new.clone());
        assert_eq!(after.items, new);
    }

    #[tokio::test]
    async fn stored_attestations_are_missing_stale_or_checked_again() {
        let verifier = Verifier::new(super::super::RegistryOptions::default()).expect("verifier");
        let image = ImageReference::parse(&format!("r.example/app@sha256:{}", "a".repeat(64)))
            .expect("reference");
        let rule = |kind: &str, max_age: Duration| {
            Arc::new(AttestationRule {
                name: kind.to_owned(),
                predicate_type: kind.to_owned(),
                authorities: vec![Authority::Key {
                    public_key_pem: super::super::checker::tests::KEY.to_owned(),
                    requirements: Default::default(),
                }]
                .into(),
                authorities_fingerprint: 7,
                max_evidence_age: max_age,
                conditions: Vec::new(),
            })
        };
        let day = Duration::from_secs(86_400);
        let stored = |kind: &str, age: Duration| StoredAttestation {
            predicate_type: kind.to_owned(),
            verified_at: Timestamp::now() - age,
            source: EvidenceSource::Bundle(b"{}".to_vec()),
        };
        let rules = [
            rule("https://none.test", day),
            rule("https://old.test", day),
            rule("https://forged.test", day),
        ];
        let found = [
            stored("https://old.test", 2 * day),
            stored("https://forged.test", Duration::ZERO),
        ];
        let recalled =
            judge_attestations(&verifier, &image, &rules, &found, SystemTime::now()).await;
        let outcomes: Vec<&str> = recalled.iter().map(Recall::outcome).collect();
        assert_eq!(outcomes, ["missing", "stale", "refused"]);
    }

    #[test]
    fn binary_evidence_is_not_stored() {
        assert!(EvidenceItem::from_source(&EvidenceSource::Bundle(vec![0xff, 0xfe])).is_none());
    }
}
