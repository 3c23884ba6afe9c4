//! Finds an image's signatures and attestations in its registry, in the formats cosign writes:
//! simple-signing layers under the `sha256-<hex>.sig` tag, DSSE envelopes under the
//! `sha256-<hex>.att` tag, and Sigstore bundles attached as OCI referrers (one listing serves
//! signatures and attestations; the session reads it once).
//!
//! A registry's listing is not trusted to be small or honest: anyone who can push to the
//! repository can add entries. So entries are first filtered by what the listing itself says
//! (media type, the signature annotation, the declared size, a well-formed digest), the
//! plausible ones are then fetched smallest first, a few at a time, and each batch is judged
//! before the next is fetched, within one [`Budget`] of fetches and bytes per verification.
//! An entry that is too large, missing or unreadable is explained and passed over; it never
//! hides a valid signature beside it, and it never makes the registry "unavailable".

use std::collections::BTreeMap;
use std::sync::Mutex;

use futures::future::join_all;
use oci_client::manifest::{ImageIndexEntry, OciDescriptor, OciImageManifest};

use super::attest::MAX_ATTESTATION_BYTES;
use super::evidence::{
    BUNDLE_MEDIA_TYPE, COSIGN_SIGN_PREDICATE, DSSE_MEDIA_TYPE, Evidence, SIGNATURE_ANNOTATION,
    SIMPLE_SIGNING_MEDIA_TYPE, dsse_bundle, dsse_layer, sigstore_bundle, simple_signing,
};
use super::registry::{Fetched, Session, human_bytes, short, valid_digest};

/// Signature payloads and bundles are a few KiB.
const MAX_SIGNATURE_BLOB_BYTES: usize = 1 << 20;
/// A `.sig` manifest or a referrer list: a few KiB for an honest image. 1 MiB holds over 200
/// keyless signatures as cosign writes them (cosign itself fetches at most 100), and bounds what
/// a hostile listing costs once parsed (about 25 MiB of RSS at 4 MiB, measured by
/// `cargo bench --bench hostile`).
const MAX_LISTING_BYTES: usize = 1 << 20;
/// A referrer's own manifest names one bundle layer: under a KiB.
const MAX_REFERRER_MANIFEST_BYTES: usize = 64 << 10;
/// Requests for entries (blobs, referrer manifests) one verification may send.
const MAX_FETCHES: usize = 64;
/// Bytes those requests may declare in total.
const MAX_FETCH_BYTES: u64 = 16 << 20;
/// Entries fetched at once: bounds the memory one verification holds.
const BATCH: usize = 8;
/// The annotation cosign puts on a bundle's referrer manifest to say what the bundle signs.
const PREDICATE_ANNOTATION: &str = "dev.sigstore.bundle.predicateType";
/// The annotation cosign puts on a classic attestation layer.
const LAYER_PREDICATE_ANNOTATION: &str = "predicateType";

/// What a lookup is after: signatures, or attestations of some predicate types.
#[derive(Clone, Copy)]
pub(super) enum Wanted<'a> {
    Signatures,
    Attestations(&'a [&'a str]),
}

impl Wanted<'_> {
    /// Whether an entry declaring `predicate` (or nothing) may hold what is wanted.
    fn admits(self, predicate: Option<&str>) -> bool {
        match (self, predicate) {
            (_, None) => true,
            (Wanted::Signatures, Some(p)) => p == COSIGN_SIGN_PREDICATE,
            (Wanted::Attestations(types), Some(p)) => types.contains(&p),
        }
    }

    fn blob_limit(self) -> usize {
        match self {
            Wanted::Signatures => MAX_SIGNATURE_BLOB_BYTES,
            Wanted::Attestations(_) => MAX_ATTESTATION_BYTES,
        }
    }
}

/// What one verification may still fetch.
pub(super) struct Budget(Mutex<(usize, u64)>);

impl Default for Budget {
    fn default() -> Self {
        Self(Mutex::new((MAX_FETCHES, MAX_FETCH_BYTES)))
    }
}

impl Budget {
    /// Takes `fetches` requests and `bytes` from the budget, or nothing if either would run out.
    fn take(&self, fetches: usize, bytes: i64) -> bool {
        let mut left = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let bytes = u64::try_from(bytes).unwrap_or(u64::MAX);
        match (left.0.checked_sub(fetches), left.1.checked_sub(bytes)) {
            (Some(f), Some(b)) => {
                *left = (f, b);
                true
            }
            _ => false,
        }
    }

    fn spent(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0
            == 0
    }
}

/// Judges evidence as discovery finds it.
pub(super) trait Judge {
    /// Checks a batch; true when one piece is accepted and the search can stop.
    fn judge(&mut self, items: &[Result<Evidence, String>]) -> bool;
    /// Records why something the registry holds could not be used.
    fn note(&mut self, why: String);
    /// Records that part of the search could not be completed in time.
    fn unavailable(&mut self, why: String);
}

/// One fetched entry.
enum Entry {
    Item(Box<Result<Evidence, String>>),
    Unavailable(String),
    OverBudget,
}

impl Entry {
    fn item(item: Result<Evidence, String>) -> Self {
        Entry::Item(Box::new(item))
    }
}

/// Why entries of a listing were passed over without being fetched.
#[derive(Default)]
struct Skipped(BTreeMap<String, usize>);

impl Skipped {
    fn add(&mut self, why: String) {
        *self.0.entry(why).or_default() += 1;
    }

    /// Notes `listing: 3 signature layers passed over unread (2 larger than 1 MiB, ...)`.
    fn report(self, listing: &str, noun: &str, judge: &mut impl Judge) {
        if self.0.is_empty() {
            return;
        }
        let total: usize = self.0.values().sum();
        let plural = if total == 1 { "" } else { "s" };
        let reasons: Vec<String> = self
            .0
            .into_iter()
            .map(|(why, n)| format!("{n} {why}"))
            .collect();
        judge.note(format!(
            "{listing}: {total} {noun}{plural} passed over unread ({})",
            reasons.join(", ")
        ));
    }
}

/// Signatures under the cosign `sha256-<hex>.sig` tag. True when the judge accepted one.
pub(super) async fn from_signature_tag(
    session: &Session<'_>,
    digest: &str,
    budget: &Budget,
    judge: &mut impl Judge,
) -> bool {
    let tag = format!("{}.sig", digest.replacen(':', "-", 1));
    let Some(manifest) = tag_manifest(session, &tag, "signature manifest", judge).await else {
        return false;
    };
    let mut skipped = Skipped::default();
    let mut layers = layers_to_try(
        &manifest,
        SIMPLE_SIGNING_MEDIA_TYPE,
        plausible_layer,
        &mut skipped,
    );
    if layers.is_empty() && skipped.0.is_empty() {
        judge.note(format!("{tag} holds no simple-signing layer"));
        return false;
    }
    layers.sort_by_key(|l| l.size);
    let tag_ref = tag.as_str();
    let accepted = in_batches(layers, budget, &tag, judge, |layer| async move {
        let at = (tag_ref, "signature layer", MAX_SIGNATURE_BLOB_BYTES);
        tag_layer(session, at, layer, budget, simple_signing).await
    })
    .await;
    skipped.report(&tag, "signature layer", judge);
    accepted
}

/// The manifest under a cosign tag (`.sig`, `.att`); None when there is none or it cannot be
/// read, which the judge is told.
async fn tag_manifest(
    session: &Session<'_>,
    tag: &str,
    what: &str,
    judge: &mut impl Judge,
) -> Option<OciImageManifest> {
    match session.image_manifest(tag, what, MAX_LISTING_BYTES).await {
        Fetched::Found(m) => Some(m),
        Fetched::NotFound => None,
        Fetched::Refused(why) => {
            judge.note(why);
            None
        }
        Fetched::Unavailable(why) => {
            judge.unavailable(why);
            None
        }
    }
}

/// The layers of `media_type` that `plausible` accepts from their descriptors; the others are
/// counted in `skipped` with the reason.
fn layers_to_try<'m>(
    manifest: &'m OciImageManifest,
    media_type: &str,
    plausible: impl Fn(&OciDescriptor) -> Result<(), String>,
    skipped: &mut Skipped,
) -> Vec<&'m OciDescriptor> {
    manifest
        .layers
        .iter()
        .filter(|l| l.media_type == media_type)
        .filter(|l| match plausible(l) {
            Ok(()) => true,
            Err(why) => {
                skipped.add(why);
                false
            }
        })
        .collect()
}

/// Whether a layer could hold a signature, judged from its descriptor alone.
pub(super) fn plausible_layer(layer: &OciDescriptor) -> Result<(), String> {
    if !layer
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(SIGNATURE_ANNOTATION))
    {
        return Err("without a signature annotation".to_owned());
    }
    plausible_size(layer.size, MAX_SIGNATURE_BLOB_BYTES)?;
    valid_digest(&layer.digest).map_err(|_| "with a malformed digest".to_owned())
}

fn plausible_size(size: i64, limit: usize) -> Result<(), String> {
    match usize::try_from(size) {
        Ok(0) | Err(_) => Err("of no size".to_owned()),
        Ok(size) if size > limit => Err(format!("larger than {}", human_bytes(limit))),
        Ok(_) => Ok(()),
    }
}

/// One layer under a cosign tag, fetched (at most `limit` bytes) and read by `read` with the
/// layer's annotations. `what` names it in explanations.
async fn tag_layer(
    session: &Session<'_>,
    (tag, what, limit): (&str, &str, usize),
    layer: &OciDescriptor,
    budget: &Budget,
    read: impl FnOnce(&BTreeMap<String, String>, Vec<u8>, &str) -> Result<Evidence, String>,
) -> Entry {
    if !budget.take(1, layer.size) {
        return Entry::OverBudget;
    }
    let origin = format!("{tag} layer {}", short(&layer.digest));
    static NONE: BTreeMap<String, String> = BTreeMap::new();
    let annotations = layer.annotations.as_ref().unwrap_or(&NONE);
    match session.blob(layer, what, limit).await {
        Fetched::Found(body) => {
            Entry::item(read(annotations, body, &origin).map_err(|e| format!("{origin}: {e}")))
        }
        Fetched::NotFound => Entry::item(Err(format!("{origin}: the layer blob is missing"))),
        Fetched::Refused(why) => Entry::item(Err(format!("{origin}: {why}"))),
        Fetched::Unavailable(why) => Entry::Unavailable(why),
    }
}

/// Sigstore bundles attached to the image as OCI referrers, holding what is `wanted`. True when
/// the judge accepted one.
pub(super) async fn from_referrers(
    session: &Session<'_>,
    digest: &str,
    wanted: Wanted<'_>,
    budget: &Budget,
    judge: &mut impl Judge,
) -> bool {
    let index = match session
        .referrers(digest, BUNDLE_MEDIA_TYPE, MAX_LISTING_BYTES)
        .await
    {
        Fetched::Found(index) => index,
        Fetched::NotFound => return false,
        Fetched::Refused(why) => {
            judge.note(why);
            return false;
        }
        Fetched::Unavailable(why) => {
            judge.unavailable(why);
            return false;
        }
    };
    let mut skipped = Skipped::default();
    let mut entries: Vec<&ImageIndexEntry> = index
        .manifests
        .iter()
        .filter(|e| e.artifact_type.as_deref() == Some(BUNDLE_MEDIA_TYPE))
        // Signatures and attestations share the bundle type; their entries say what they sign.
        .filter(|e| {
            let predicate = predicate(e.annotations.as_ref());
            if !wanted.admits(predicate) {
                if let (Wanted::Attestations(_), Some(p)) = (wanted, predicate)
                    && p != COSIGN_SIGN_PREDICATE
                {
                    skipped.add(format!("attesting {p}, not asked for"));
                }
                return false;
            }
            match plausible_size(e.size, MAX_REFERRER_MANIFEST_BYTES).and_then(|()| {
                valid_digest(&e.digest).map_err(|_| "with a malformed digest".to_owned())
            }) {
                Ok(()) => true,
                Err(why) => {
                    skipped.add(why);
                    false
                }
            }
        })
        .collect();
    entries.sort_by_key(|e| e.size);
    let accepted = in_batches(entries, budget, "referrers", judge, |entry| {
        bundle_of(session, entry, wanted, budget)
    })
    .await;
    skipped.report("referrers", "referrer", judge);
    accepted
}

fn predicate(annotations: Option<&BTreeMap<String, String>>) -> Option<&str> {
    annotations?.get(PREDICATE_ANNOTATION).map(String::as_str)
}

/// Fetches the bundle layer of one referrer manifest.
async fn bundle_of(
    session: &Session<'_>,
    entry: &ImageIndexEntry,
    wanted: Wanted<'_>,
    budget: &Budget,
) -> Entry {
    if !budget.take(1, entry.size) {
        return Entry::OverBudget;
    }
    let origin = format!("bundle {}", short(&entry.digest));
    let limit = usize::try_from(entry.size)
        .unwrap_or(MAX_REFERRER_MANIFEST_BYTES)
        .min(MAX_REFERRER_MANIFEST_BYTES);
    let manifest = match session
        .image_manifest(&entry.digest, "referrer manifest", limit)
        .await
    {
        Fetched::Found(m) => m,
        Fetched::NotFound => {
            return Entry::item(Err(format!("{origin}: the referrer manifest is missing")));
        }
        Fetched::Refused(why) => return Entry::item(Err(format!("{origin}: {why}"))),
        Fetched::Unavailable(why) => return Entry::Unavailable(why),
    };
    if let Some(p) = predicate(manifest.annotations.as_ref()).filter(|p| !wanted.admits(Some(p))) {
        let not = match wanted {
            Wanted::Signatures => format!("an attestation of {p}, not a signature"),
            Wanted::Attestations(_) => format!("attests {p}, not a type asked for"),
        };
        return Entry::item(Err(format!("{origin}: {not}")));
    }
    let Some(layer) = manifest
        .layers
        .iter()
        .find(|l| l.media_type == BUNDLE_MEDIA_TYPE)
    else {
        return Entry::item(Err(format!("{origin}: no bundle layer")));
    };
    if !budget.take(1, layer.size) {
        return Entry::OverBudget;
    }
    match session
        .blob(layer, "bundle layer", wanted.blob_limit())
        .await
    {
        Fetched::Found(bytes) => {
            let parsed = match wanted {
                Wanted::Signatures => sigstore_bundle(&bytes, &origin),
                Wanted::Attestations(_) => dsse_bundle(&bytes, &origin),
            };
            Entry::item(parsed.map_err(|e| format!("{origin}: {e}")))
        }
        Fetched::NotFound => Entry::item(Err(format!("{origin}: the bundle blob is missing"))),
        Fetched::Refused(why) => Entry::item(Err(format!("{origin}: {why}"))),
        Fetched::Unavailable(why) => Entry::Unavailable(why),
    }
}

/// Classic attestations under the cosign `sha256-<hex>.att` tag: DSSE envelopes as layers, of
/// the predicate `types` wanted. True when the judge accepted one.
pub(super) async fn from_attestation_tag(
    session: &Session<'_>,
    digest: &str,
    types: &[&str],
    budget: &Budget,
    judge: &mut impl Judge,
) -> bool {
    let tag = format!("{}.att", digest.replacen(':', "-", 1));
    let Some(manifest) = tag_manifest(session, &tag, "attestation manifest", judge).await else {
        return false;
    };
    let mut skipped = Skipped::default();
    let plausible = |l: &OciDescriptor| {
        let declared = l
            .annotations
            .as_ref()
            .and_then(|a| a.get(LAYER_PREDICATE_ANNOTATION));
        match declared {
            Some(p) if !types.contains(&p.as_str()) => Err(format!("attesting {p}, not asked for")),
            _ => plausible_size(l.size, MAX_ATTESTATION_BYTES).and_then(|()| {
                valid_digest(&l.digest).map_err(|_| "with a malformed digest".to_owned())
            }),
        }
    };
    let mut layers = layers_to_try(&manifest, DSSE_MEDIA_TYPE, plausible, &mut skipped);
    layers.sort_by_key(|l| l.size);
    let tag_ref = tag.as_str();
    let accepted = in_batches(layers, budget, &tag, judge, |layer| async move {
        let at = (tag_ref, "attestation layer", MAX_ATTESTATION_BYTES);
        let read = |annotations: &_, envelope: Vec<u8>, origin: &_| {
            dsse_layer(annotations, &envelope, origin)
        };
        tag_layer(session, at, layer, budget, read).await
    })
    .await;
    skipped.report(&tag, "attestation layer", judge);
    accepted
}

/// Fetches candidates [`BATCH`] at a time and lets the judge see each batch, until one is
/// accepted, the candidates run out, or the budget does.
async fn in_batches<T, F, Fut>(
    candidates: Vec<T>,
    budget: &Budget,
    listing: &str,
    judge: &mut impl Judge,
    fetch: F,
) -> bool
where
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = Entry>,
{
    let total = candidates.len();
    let mut rest = candidates.into_iter();
    let mut untried = 0;
    loop {
        if budget.spent() {
            untried += rest.len();
            break;
        }
        let batch: Vec<_> = rest.by_ref().take(BATCH).map(&fetch).collect();
        if batch.is_empty() {
            break;
        }
        let mut items = Vec::with_capacity(batch.len());
        for entry in join_all(batch).await {
            match entry {
                Entry::Item(item) => items.push(*item),
                Entry::Unavailable(why) => judge.unavailable(why),
                Entry::OverBudget => untried += 1,
            }
        }
        if judge.judge(&items) {
            return true;
        }
    }
    if untried > 0 {
        judge.note(format!(
            "{listing}: {untried} of {total} entries not tried: one verification fetches at \
             most {MAX_FETCHES} entries and {}",
            human_bytes(MAX_FETCH_BYTES as usize)
        ));
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_gives_nothing_it_does_not_have() {
        let budget = Budget::default();
        assert!(!budget.take(1, MAX_FETCH_BYTES as i64 + 1));
        assert!(!budget.take(1, -1), "a negative size is no discount");
        assert!(budget.take(MAX_FETCHES - 1, 10));
        assert!(!budget.spent());
        assert!(!budget.take(2, 0));
        assert!(budget.take(1, 0));
        assert!(budget.spent());
    }

    #[test]
    fn layers_are_judged_by_their_descriptor_before_any_fetch() {
        let layer = |size: i64, annotated: bool, digest: &str| OciDescriptor {
            media_type: SIMPLE_SIGNING_MEDIA_TYPE.to_owned(),
            digest: digest.to_owned(),
            size,
            annotations: annotated
                .then(|| BTreeMap::from([(SIGNATURE_ANNOTATION.to_owned(), "c2ln".to_owned())])),
            ..OciDescriptor::default()
        };
        let good = format!("sha256:{}", "a".repeat(64));
        assert_eq!(plausible_layer(&layer(235, true, &good)), Ok(()));
        assert!(plausible_layer(&layer(235, false, &good)).is_err());
        assert!(plausible_layer(&layer(2 << 20, true, &good)).is_err());
        assert!(plausible_layer(&layer(0, true, &good)).is_err());
        assert!(plausible_layer(&layer(-5, true, &good)).is_err());
        assert!(plausible_layer(&layer(235, true, "sha256:../../etc")).is_err());
    }
}
