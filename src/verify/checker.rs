//! Signature checks for admission: every distinct (image, authorities) pair of a request
//! checked once through the shared cache, cut off at a deadline so the API server always gets
//! its answer in time, and bounded so that no request can make fixity do unbounded work:
//!
//! - at most [`Limits::registry`] verifications talk to registries at once, across all
//!   requests, and one request runs at most [`Limits::per_request`] of them, so a review with
//!   many images waits for its own turns and never takes every slot from the others;
//! - a request needing more than [`Limits::max_checks`] checks, signatures and attestations
//!   together ([`SignatureChecker::check_request`]), gets none: every image a rule covers is
//!   denied, with the reason, before any registry is asked;
//! - a verification still waiting for a slot when no request waits for it any more (each gave
//!   up at its deadline) is dropped; one that has started runs on, for at most one deadline,
//!   so that its result lands in the cache for the retry (the coalescing the cache is for).
//!   Orphaned work is thus bounded by `registry` verifications of one deadline each.
//!
//! Attestation checks ([`SignatureChecker::check_attestations`]) run under the same limits and
//! deadline, one per image: every attestation rule of an image in one registry session. It runs
//! beside the image's signature check, and the registry client lets the two share what both
//! read (the token, the referrers listing, the referrer manifests), so one listing serves
//! signatures and attestations. They are cached apart from the signatures, keyed by the image,
//! the rules' fingerprints and the credentials.
//!
//! With an evidence store ([`SignatureChecker::with_store`]) a miss asks the store before the
//! registry: stored evidence that verifies again now, and is not older than the rule's
//! `maxEvidenceAge`, answers without a registry request (during an outage too); the evidence
//! of every registry verification is stored for the other replicas. For attestations, the
//! registry is asked only for the rules the store did not satisfy, and the envelope that
//! satisfied each rule is stored. (The warm start fills the signature cache only: attestation
//! results are keyed by the rule set of a request, so their first check reads the store.)

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use futures::future::join_all;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use std::hash::{Hash, Hasher};

use super::cache::{Lookup, VerdictCache, Waiters};
use super::credentials::providers::CredentialProviders;
use super::store::{EvidenceStore, Recall, Recalled, judge};
use super::{
    AttestationCheck, AttestationRule, Authority, RegistryCredential, RegistryOptions,
    SignatureCheck, SignatureKey, Verifications, Verifier, VerifyError,
};
use crate::audit::Metrics;
use crate::audit::metrics::{EvidenceStoreLabels, SignatureLabels};
use crate::image::ImageReference;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

/// How old stored evidence may be when a rule does not say.
pub const DEFAULT_MAX_EVIDENCE_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// One signature check a request needs.
#[derive(Debug, Clone)]
pub struct CheckRequest {
    pub key: SignatureKey,
    pub image: ImageReference,
    pub authorities: Arc<[Authority]>,
    /// Distinct authorities that must each have signed.
    pub min_authorities: usize,
    /// How old stored evidence may be and still answer.
    pub max_evidence_age: Duration,
}

/// What a request's attestation checks found, and which of them rest on stored evidence.
#[derive(Debug, Default)]
pub struct Attested {
    pub checks: HashMap<SignatureKey, AttestationCheck>,
    /// Keys satisfied from the evidence store rather than the registry.
    pub stored: Vec<SignatureKey>,
}

/// What a request's checks found, and which of them rest on stored evidence.
#[derive(Debug, Default)]
pub struct Checked {
    pub verifications: Verifications,
    /// Keys verified from the evidence store rather than the registry (the caller adds the
    /// attestation checks' to the signature checks').
    pub stored: Vec<SignatureKey>,
}

/// How much verification work fixity takes on.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Verifications talking to registries at once, across all requests.
    pub registry: usize,
    /// Of those, at most this many for one request.
    pub per_request: usize,
    /// Distinct checks (signatures and attestations together) one request may need; past it,
    /// none is made.
    pub max_checks: Option<usize>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            registry: 16,
            per_request: 4,
            max_checks: Some(64),
        }
    }
}

/// What a verification task came back with.
#[derive(Debug, Clone)]
enum Verdict {
    /// The check, and whether it rests on stored evidence.
    Checked(SignatureCheck, bool),
    /// Dropped before it started: nobody waited for it any more. Not cached.
    NotStarted,
}

/// How long results stay cached.
fn ttl(verdict: &Verdict) -> Duration {
    match verdict {
        Verdict::Checked(SignatureCheck::Verified(_), _) => Duration::from_secs(600),
        Verdict::Checked(SignatureCheck::Untrusted(_), _) => Duration::from_secs(30),
        Verdict::Checked(SignatureCheck::Unavailable(_), _) => Duration::from_secs(5),
        Verdict::NotStarted => Duration::ZERO,
    }
}

/// Fills a starting replica's cache from the evidence store, with only the entries that verify
/// again against the authorities in force.
pub struct WarmUp {
    store: EvidenceStore,
    verifier: Arc<Verifier>,
    cache: Arc<VerdictCache<(SignatureKey, u64), Verdict>>,
    warm: Arc<AtomicBool>,
}

/// What a warm start did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Warmed {
    /// Entries that verified and are in the cache.
    pub loaded: usize,
    /// Entries that did not (for no current rule, stale, refused).
    pub skipped: usize,
    /// Entries left unchecked when the time ran out; their first check reads them.
    pub unchecked: usize,
}

impl WarmUp {
    /// Reads the store once; `rules` gives the authorities, minAuthorities and maxEvidenceAge
    /// in force for an authorities fingerprint. The checker is warm afterwards, whatever the
    /// store answered.
    pub async fn run(
        self,
        rules: impl Fn(u64) -> Option<(Arc<[Authority]>, usize, Duration)>,
    ) -> Warmed {
        // One budget for the listing and the checks: readiness waits for neither longer.
        let deadline = Instant::now() + self.store.settings().warm_time;
        let entries = match self.store.list().await {
            Ok(entries) => entries,
            Err(e) => {
                tracing::warn!(error = %e, "evidence store not read at start");
                Vec::new()
            }
        };
        self.fill(entries, deadline, rules).await
    }

    /// Checks `entries` into the cache until `deadline`; the checker is warm afterwards.
    async fn fill(
        self,
        entries: Vec<(SignatureKey, Recalled)>,
        deadline: Instant,
        rules: impl Fn(u64) -> Option<(Arc<[Authority]>, usize, Duration)>,
    ) -> Warmed {
        let mut warmed = Warmed::default();
        // Entries are checked for anonymous access, as most pods are; the others find the
        // store on their first miss.
        let anonymous = credentials_fingerprint(0, &[]);
        let total = entries.len();
        for (key, recalled) in entries {
            if Instant::now() > deadline {
                warmed.unchecked = total - warmed.loaded - warmed.skipped;
                break;
            }
            // The checks are CPU work: the health port and the rest keep being served.
            tokio::task::yield_now().await;
            let verdict = rules(key.1).and_then(|(authorities, min, max_age)| {
                let image = ImageReference::parse(&key.0).ok()?;
                match judge(
                    &self.verifier,
                    &key,
                    &image,
                    &authorities,
                    min,
                    max_age,
                    &recalled,
                ) {
                    Recall::Verified(v) => Some(Verdict::Checked(
                        SignatureCheck::Verified(v.description),
                        true,
                    )),
                    _ => None,
                }
            });
            match verdict {
                Some(verdict) => {
                    self.cache.insert((key, anonymous), verdict);
                    warmed.loaded += 1;
                }
                None => warmed.skipped += 1,
            }
        }
        self.warm.store(true, Ordering::Release);
        warmed
    }
}

/// Results kept at most; a bound on memory whatever the cluster runs.
const CACHE_ENTRIES: usize = 10_000;

/// Checks signatures for the admission path.
pub struct SignatureChecker {
    verifier: Arc<Verifier>,
    /// Keyed also by the credentials used: a failure without access must not stand in for a
    /// pod that has it.
    cache: Arc<VerdictCache<(SignatureKey, u64), Verdict>>,
    deadline: Duration,
    metrics: Arc<Metrics>,
    limits: Limits,
    registry: Arc<Semaphore>,
    store: Option<EvidenceStore>,
    /// False until a starting replica has read the evidence store.
    warm: Arc<AtomicBool>,
    providers: Option<Arc<CredentialProviders>>,
    /// Attestation results by image, rules and credentials.
    attestations: Arc<VerdictCache<ImageKey, ImageAttested>>,
}

/// One image and the attestation rules it is checked against, with their keys.
type ImageRules = (ImageReference, Vec<(SignatureKey, Arc<AttestationRule>)>);

/// Names one image's attestation checks: the pinned image, the fingerprints of its rules (in
/// order) and the credentials used.
type ImageKey = (String, Vec<u64>, u64);

/// What an image's attestation task came back with, in the order of its key's rules, each
/// with whether it rests on stored evidence.
#[derive(Debug, Clone)]
enum ImageAttested {
    Checked(Vec<(AttestationCheck, bool)>),
    /// Dropped before it started: nobody waited for it any more. Not cached.
    NotStarted,
}

/// How long attestation results stay cached: as long as the shortest-lived of an image's.
/// Conditions that read `now` (a scan's age) are judged again at most this long after.
fn attested_ttl(attested: &ImageAttested) -> Duration {
    match attested {
        ImageAttested::Checked(checks) => checks
            .iter()
            .map(|(check, _)| match check {
                AttestationCheck::Satisfied { .. } => Duration::from_secs(600),
                AttestationCheck::Missing(_) | AttestationCheck::ConditionFailed { .. } => {
                    Duration::from_secs(30)
                }
                AttestationCheck::Unavailable(_) => Duration::from_secs(5),
            })
            .min()
            .unwrap_or(Duration::from_secs(5)),
        ImageAttested::NotStarted => Duration::ZERO,
    }
}

/// Names the credentials a check used, on top of `seed`: a failure without access must not
/// stand in for a pod that has it.
fn credentials_fingerprint(seed: u64, credentials: &[RegistryCredential]) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    seed.hash(&mut hasher);
    for c in credentials {
        (&c.registry, &c.username, &c.password).hash(&mut hasher);
    }
    hasher.finish()
}

/// The pod's `credentials` and their `fingerprint`, with what the kubelet's credential
/// providers give for `image` after them. A plugin that fails or does not answer in half the
/// deadline (the rest is the registry's) makes the check unavailable.
async fn provided(
    providers: Option<&Arc<CredentialProviders>>,
    image: &ImageReference,
    deadline: Duration,
    fingerprint: u64,
    credentials: Arc<[RegistryCredential]>,
) -> Result<(u64, Arc<[RegistryCredential]>), String> {
    let Some(providers) = providers else {
        return Ok((fingerprint, credentials));
    };
    Ok(match providers.credential_for(image, deadline / 2).await? {
        None => (fingerprint, credentials),
        Some(given) => (
            credentials_fingerprint(fingerprint, std::slice::from_ref(&given)),
            credentials.iter().cloned().chain([given]).collect(),
        ),
    })
}

/// A turn of the request's own (`own`), then a registry slot; none when nobody waits for the
/// answer any more by then, so abandoned work never reaches the registry.
async fn turn(
    own: &Arc<Semaphore>,
    registry: &Arc<Semaphore>,
    waiters: &Waiters,
) -> Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)> {
    let permits = async {
        let mine = own.clone().acquire_owned().await.ok()?;
        let slot = registry.clone().acquire_owned().await.ok()?;
        Some((mine, slot))
    };
    tokio::select! {
        biased;
        () = waiters.all_gone() => None,
        permits = permits => permits,
    }
}

impl SignatureChecker {
    /// `deadline` bounds a whole request's checks; keep it below the webhook's timeoutSeconds.
    pub fn new(
        options: RegistryOptions,
        deadline: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Self, VerifyError> {
        Self::with_limits(options, deadline, metrics, Limits::default())
    }

    pub fn with_limits(
        options: RegistryOptions,
        deadline: Duration,
        metrics: Arc<Metrics>,
        limits: Limits,
    ) -> Result<Self, VerifyError> {
        Ok(Self {
            verifier: Arc::new(Verifier::new(options)?),
            cache: VerdictCache::new(CACHE_ENTRIES, ttl),
            deadline,
            metrics,
            limits,
            registry: Arc::new(Semaphore::new(limits.registry.max(1))),
            store: None,
            warm: Arc::new(AtomicBool::new(true)),
            attestations: VerdictCache::new(CACHE_ENTRIES, attested_ttl),
            providers: None,
        })
    }

    /// Shares evidence through `store`: asked before the registry, written after it. The
    /// checker is not warm until [`WarmUp::run`] has read the store.
    pub fn with_store(mut self, store: EvidenceStore) -> (Self, WarmUp) {
        self.warm.store(false, Ordering::Release);
        let warm_up = WarmUp {
            store: store.clone(),
            verifier: self.verifier.clone(),
            cache: self.cache.clone(),
            warm: self.warm.clone(),
        };
        self.store = Some(store);
        (self, warm_up)
    }

    /// Whether the evidence store (if any) has been read since the start.
    pub fn is_warm(&self) -> bool {
        self.warm.load(Ordering::Acquire)
    }

    /// The cached result of a check with `credentials`, if a fresh one exists; the background
    /// scanner asks first, so only checks that reach a registry wait for its rate limit.
    pub fn cached(
        &self,
        key: &SignatureKey,
        credentials: &[RegistryCredential],
    ) -> Option<SignatureCheck> {
        match self
            .cache
            .peek(&(key.clone(), credentials_fingerprint(0, credentials)))?
        {
            Verdict::Checked(check, _) => Some(check),
            Verdict::NotStarted => None,
        }
    }

    /// Asks the kubelet's image credential provider plugins for each image's registry
    /// credentials, after the pod's own (as the kubelet orders them).
    pub fn with_credential_providers(mut self, providers: Arc<CredentialProviders>) -> Self {
        self.providers = Some(providers);
        self
    }

    /// Checks every request (image, authorities, how many of them must sign) with
    /// `credentials`; see [`SignatureChecker::check`].
    pub async fn check_all(
        &self,
        requests: impl IntoIterator<Item = (SignatureKey, ImageReference, Arc<[Authority]>, usize)>,
        credentials: Vec<RegistryCredential>,
    ) -> Verifications {
        let requests = requests
            .into_iter()
            .map(|(key, image, authorities, min_authorities)| CheckRequest {
                key,
                image,
                authorities,
                min_authorities,
                max_evidence_age: DEFAULT_MAX_EVIDENCE_AGE,
            });
        self.check(requests, credentials).await.verifications
    }

    /// Checks every request with `credentials` (anonymous when empty); one not finished by
    /// the deadline is `Unavailable`.
    pub async fn check(
        &self,
        requests: impl IntoIterator<Item = CheckRequest>,
        credentials: Vec<RegistryCredential>,
    ) -> Checked {
        let requests: Vec<_> = requests.into_iter().collect();
        if let Some(why) = self.over_limit(requests.len(), "signature") {
            Self::refused(&self.metrics.signature_checks, requests.len(), "untrusted");
            let verifications = requests
                .into_iter()
                .map(|r| (r.key, SignatureCheck::Untrusted(why.clone())))
                .collect();
            return Checked {
                verifications,
                stored: Vec::new(),
            };
        }
        let deadline = tokio::time::Instant::now() + self.deadline;
        let fingerprint = credentials_fingerprint(0, &credentials);
        let credentials: Arc<[RegistryCredential]> = credentials.into();
        let own = Arc::new(Semaphore::new(self.limits.per_request.max(1)));
        let checks = requests.into_iter().map(|request| {
            let CheckRequest {
                key,
                image,
                authorities,
                min_authorities,
                max_evidence_age,
            } = request;
            let verifier = self.verifier.clone();
            let cache = self.cache.clone();
            let credentials = credentials.clone();
            let (own, registry) = (own.clone(), self.registry.clone());
            let budget = self.deadline;
            let (store, metrics) = (self.store.clone(), self.metrics.clone());
            let providers = self.providers.clone();
            async move {
                let started = Instant::now();
                let cache_key = key.clone();
                let lookup = async move {
                    let (fingerprint, credentials) =
                        provided(providers.as_ref(), &image, budget, fingerprint, credentials)
                            .await?;
                    let task_key = cache_key.clone();
                    Ok::<_, String>(
                        cache
                            .get_or_verify((cache_key, fingerprint), move |waiters| async move {
                                let key = task_key;
                                if let Some(store) = &store {
                                    let recall = tokio::time::timeout(
                                        budget / 4,
                                        store.recall_verified(
                                            &verifier,
                                            &key,
                                            &image,
                                            &authorities,
                                            min_authorities,
                                            max_evidence_age,
                                        ),
                                    )
                                    .await
                                    .unwrap_or(Recall::Unreachable("no answer in time".to_owned()));
                                    metrics
                                        .evidence_store
                                        .get_or_create(&EvidenceStoreLabels {
                                            outcome: recall.outcome(),
                                        })
                                        .inc();
                                    if let Recall::Verified(verified) = recall {
                                        return Verdict::Checked(
                                            SignatureCheck::Verified(verified.description),
                                            true,
                                        );
                                    }
                                }
                                let Some(_permits) = turn(&own, &registry, &waiters).await else {
                                    return Verdict::NotStarted;
                                };
                                let verify = verifier.verify_threshold(
                                    &image,
                                    &authorities,
                                    min_authorities,
                                    &credentials,
                                );
                                let check = match tokio::time::timeout(budget, verify).await {
                                    Ok(result) => {
                                        if let (Some(store), Ok(verified)) = (&store, &result) {
                                            store.remember_later(key, verified.clone(), metrics);
                                        }
                                        SignatureCheck::from_result(&result)
                                    }
                                    Err(_) => SignatureCheck::Unavailable(format!(
                                        "the registry did not answer within {} ms",
                                        budget.as_millis()
                                    )),
                                };
                                Verdict::Checked(check, false)
                            })
                            .await,
                    )
                };
                let (check, how, stored) = match tokio::time::timeout_at(deadline, lookup).await {
                    Ok(Err(why)) => (SignatureCheck::Unavailable(why), "credentials", false),
                    Ok(Ok((Some(Verdict::Checked(check, stored)), how))) => {
                        // A miss the store answered is told apart from one the registry did.
                        let how = match (how, stored) {
                            (Lookup::Miss, true) => "store",
                            (how, _) => how.as_str(),
                        };
                        (check, how, stored)
                    }
                    Ok(Ok((Some(Verdict::NotStarted), how))) => (
                        SignatureCheck::Unavailable(
                            "the verification was dropped before it started".to_owned(),
                        ),
                        how.as_str(),
                        false,
                    ),
                    Ok(Ok((None, how))) => (
                        SignatureCheck::Unavailable(
                            "the verification failed unexpectedly".to_owned(),
                        ),
                        how.as_str(),
                        false,
                    ),
                    Err(_) => (
                        SignatureCheck::Unavailable(format!(
                            "no answer from the registry within the {} ms verification deadline",
                            self.deadline.as_millis()
                        )),
                        "deadline",
                        false,
                    ),
                };
                let result = match &check {
                    SignatureCheck::Verified(_) => "verified",
                    SignatureCheck::Untrusted(_) => "untrusted",
                    SignatureCheck::Unavailable(_) => "unavailable",
                };
                let labels = SignatureLabels {
                    lookup: how,
                    result,
                };
                self.metrics.signature_checks.get_or_create(&labels).inc();
                self.metrics
                    .signature_check_duration
                    .get_or_create(&labels)
                    .observe(started.elapsed().as_secs_f64());
                (key, check, stored)
            }
        });
        let mut checked = Checked::default();
        for (key, check, stored) in join_all(checks).await {
            if stored && matches!(check, SignatureCheck::Verified(_)) {
                checked.stored.push(key.clone());
            }
            checked.verifications.insert(key, check);
        }
        checked
    }

    /// Why a request needing `count` checks of `what` gets none, past [`Limits::max_checks`].
    fn over_limit(&self, count: usize, what: &str) -> Option<String> {
        let max = self.limits.max_checks.filter(|max| count > *max)?;
        Some(format!(
            "not verified: the request needs {count} {what} checks, more than the {max} fixity \
             makes for one request"
        ))
    }

    /// Counts `count` checks refused past the limit in `counter`, as `result`.
    fn refused(counter: &Family<SignatureLabels, Counter>, count: usize, result: &'static str) {
        let labels = SignatureLabels {
            lookup: "refused",
            result,
        };
        counter.get_or_create(&labels).inc_by(count as u64);
    }

    /// Checks a request's signatures and attestations with `credentials`, at once, so that
    /// they share what they read; past [`Limits::max_checks`] for their sum none is made, each
    /// signature is untrusted and each attestation missing, with the reason.
    pub async fn check_request(
        &self,
        signatures: Vec<CheckRequest>,
        attestations: Vec<(SignatureKey, ImageReference, Arc<AttestationRule>)>,
        credentials: Vec<RegistryCredential>,
    ) -> Checked {
        let what = match (signatures.is_empty(), attestations.is_empty()) {
            (false, false) => "signature and attestation",
            (false, true) => "signature",
            (true, _) => "attestation",
        };
        let count = signatures.len() + attestations.len();
        if let Some(why) = self.over_limit(count, what) {
            Self::refused(
                &self.metrics.signature_checks,
                signatures.len(),
                "untrusted",
            );
            Self::refused(
                &self.metrics.attestation_checks,
                attestations.len(),
                "missing",
            );
            let mut verifications: Verifications = signatures
                .into_iter()
                .map(|r| (r.key, SignatureCheck::Untrusted(why.clone())))
                .collect();
            verifications.attestations = attestations
                .into_iter()
                .map(|(key, _, _)| (key, AttestationCheck::Missing(why.clone())))
                .collect();
            return Checked {
                verifications,
                stored: Vec::new(),
            };
        }
        let (mut checked, attested) = tokio::join!(
            self.check(signatures, credentials.clone()),
            self.check_attestations(attestations, credentials),
        );
        checked.verifications.attestations = attested.checks;
        checked.stored.extend(attested.stored);
        checked
    }

    /// Checks every attestation request with `credentials`, each image's rules together; one
    /// not finished by the deadline is unavailable, and a request needing more than
    /// [`Limits::max_checks`] gets none.
    pub async fn check_attestations(
        &self,
        requests: impl IntoIterator<Item = (SignatureKey, ImageReference, Arc<AttestationRule>)>,
        credentials: Vec<RegistryCredential>,
    ) -> Attested {
        let requests: Vec<_> = requests.into_iter().collect();
        if let Some(why) = self.over_limit(requests.len(), "attestation") {
            Self::refused(&self.metrics.attestation_checks, requests.len(), "missing");
            let checks = requests
                .into_iter()
                .map(|(key, _, _)| (key, AttestationCheck::Missing(why.clone())))
                .collect();
            return Attested {
                checks,
                stored: Vec::new(),
            };
        }
        let deadline = tokio::time::Instant::now() + self.deadline;
        let fingerprint = credentials_fingerprint(0, &credentials);
        let credentials: Arc<[RegistryCredential]> = credentials.into();
        let own = Arc::new(Semaphore::new(self.limits.per_request.max(1)));
        let mut images: BTreeMap<String, ImageRules> = BTreeMap::new();
        for (key, image, rule) in requests {
            images
                .entry(key.0.clone())
                .or_insert_with(|| (image, Vec::new()))
                .1
                .push((key, rule));
        }
        let checks = images.into_iter().map(|(pinned, (image, mut rules))| {
            rules.sort_by_key(|(k, _)| k.1);
            let fingerprints: Vec<u64> = rules.iter().map(|(k, _)| k.1).collect();
            let (verifier, credentials) = (self.verifier.clone(), credentials.clone());
            let (own, registry, budget) = (own.clone(), self.registry.clone(), self.deadline);
            let providers = self.providers.clone();
            let (store, metrics) = (self.store.clone(), self.metrics.clone());
            async move {
                let count = rules.len();
                let wanted: Vec<Arc<AttestationRule>> =
                    rules.iter().map(|(_, r)| r.clone()).collect();
                let lookup = async move {
                    let (fingerprint, credentials) =
                        provided(providers.as_ref(), &image, budget, fingerprint, credentials)
                            .await?;
                    let key = (pinned.clone(), fingerprints, fingerprint);
                    Ok::<_, String>(
                        self.attestations
                            .get_or_verify(key, move |waiters| async move {
                                let mut found: Vec<Option<(AttestationCheck, bool)>> =
                                    vec![None; count];
                                if let Some(store) = &store {
                                    let recall = store.recall_attestations(
                                        &verifier,
                                        &image,
                                        &pinned,
                                        &wanted,
                                        SystemTime::now(),
                                    );
                                    let recalled = tokio::time::timeout(budget / 4, recall)
                                        .await
                                        .unwrap_or_else(|_| {
                                            let late = "no answer in time".to_owned();
                                            vec![Recall::Unreachable(late); count]
                                        });
                                    for (slot, recall) in found.iter_mut().zip(recalled) {
                                        let outcome = recall.outcome();
                                        metrics
                                            .evidence_store
                                            .get_or_create(&EvidenceStoreLabels { outcome })
                                            .inc();
                                        if let Recall::Verified(check) = recall {
                                            *slot = Some((check, true));
                                        }
                                    }
                                }
                                // The registry, for the rules the store did not satisfy.
                                let open: Vec<usize> =
                                    (0..count).filter(|i| found[*i].is_none()).collect();
                                if open.is_empty() {
                                    let found = found.into_iter().flatten().collect();
                                    return ImageAttested::Checked(found);
                                }
                                let Some(_permits) = turn(&own, &registry, &waiters).await else {
                                    return ImageAttested::NotStarted;
                                };
                                let asked: Vec<Arc<AttestationRule>> =
                                    open.iter().map(|i| wanted[*i].clone()).collect();
                                let verify = verifier.verify_image(
                                    &image,
                                    None,
                                    &asked,
                                    &credentials,
                                    SystemTime::now(),
                                );
                                let answered = match tokio::time::timeout(budget, verify).await {
                                    Ok(verdict) => {
                                        let judged = verdict.attestations.into_iter();
                                        judged.zip(verdict.attestation_evidence).collect()
                                    }
                                    Err(_) => {
                                        let why = format!(
                                            "the registry did not answer within {} ms",
                                            budget.as_millis()
                                        );
                                        let late = (AttestationCheck::Unavailable(why), None);
                                        vec![late; open.len()]
                                    }
                                };
                                let mut satisfied = Vec::new();
                                for ((i, rule), (check, source)) in
                                    open.iter().zip(&asked).zip(&answered)
                                {
                                    if let (AttestationCheck::Satisfied { .. }, Some(source)) =
                                        (check, source)
                                    {
                                        satisfied.push((&**rule, source));
                                    }
                                    found[*i] = Some((check.clone(), false));
                                }
                                if let Some(store) = &store {
                                    store.remember_attestations_later(&pinned, &satisfied, metrics);
                                }
                                ImageAttested::Checked(found.into_iter().flatten().collect())
                            })
                            .await,
                    )
                };
                let unavailable =
                    |why: String| vec![(AttestationCheck::Unavailable(why), false); count];
                let (found, how) = match tokio::time::timeout_at(deadline, lookup).await {
                    Ok(Err(why)) => (unavailable(why), Err("credentials")),
                    Ok(Ok((Some(ImageAttested::Checked(found)), how))) => (found, Ok(how)),
                    Ok(Ok((Some(ImageAttested::NotStarted), how))) => (
                        unavailable("the verification was dropped before it started".to_owned()),
                        Ok(how),
                    ),
                    Ok(Ok((None, how))) => (
                        unavailable("the verification failed unexpectedly".to_owned()),
                        Ok(how),
                    ),
                    Err(_) => (
                        unavailable(format!(
                            "no answer from the registry within the {} ms verification deadline",
                            self.deadline.as_millis()
                        )),
                        Err("deadline"),
                    ),
                };
                rules
                    .into_iter()
                    .zip(found)
                    .map(|((key, _), (check, stored))| {
                        // A miss the store answered is told apart from one the registry did.
                        let lookup = match (how, stored) {
                            (Ok(Lookup::Miss), true) => "store",
                            (Ok(how), _) => how.as_str(),
                            (Err(why), _) => why,
                        };
                        let labels = SignatureLabels {
                            lookup,
                            result: check.result(),
                        };
                        self.metrics.attestation_checks.get_or_create(&labels).inc();
                        (key, check, stored)
                    })
                    .collect::<Vec<_>>()
            }
        });
        let mut attested = Attested::default();
        for (key, check, stored) in join_all(checks).await.into_iter().flatten() {
            if stored && matches!(check, AttestationCheck::Satisfied { .. }) {
                attested.stored.push(key.clone());
            }
            attested.checks.insert(key, check);
        }
        attested
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::verify::store::Settings;

    pub(in crate::verify) const KEY: &str = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE2G4MVHD+3JEqHoKzmOS9X0bOYe7x\n5IA9Ij5Aia5tRVTy4Zx7lQ6X2xvyOYr9jpGBMd6UIn8iYUV1oDvSO6X4Rw==\n-----END PUBLIC KEY-----\n";

    fn unreachable_store(metrics: &Arc<Metrics>) -> EvidenceStore {
        // As main does; another test may have installed it first.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = kube::Config::new("http://127.0.0.1:1".parse().expect("url"));
        let client = kube::Client::try_from(config).expect("client");
        EvidenceStore::new(client, Settings::default(), metrics.clone())
    }

    /// The warm start stops at its deadline (the rest is read on first use), and keeps only
    /// entries that verify for a rule in force.
    #[tokio::test]
    async fn the_warm_start_is_bounded_in_time_and_keeps_only_what_verifies() {
        let metrics = Arc::new(Metrics::default());
        let entries: Vec<(SignatureKey, Recalled)> = (0..50)
            .map(|i| {
                let key = (format!("r.example/app@sha256:{i:064x}"), 7);
                let recalled = Recalled {
                    sources: vec![super::super::EvidenceSource::Bundle(b"{}".to_vec())],
                    verified_at: k8s_openapi::jiff::Timestamp::now(),
                    last_used: k8s_openapi::jiff::Timestamp::now(),
                };
                (key, recalled)
            })
            .collect();
        let start = |metrics: &Arc<Metrics>| {
            let checker = SignatureChecker::new(
                RegistryOptions::default(),
                Duration::from_secs(1),
                metrics.clone(),
            )
            .expect("checker");
            checker.with_store(unreachable_store(metrics))
        };
        let (checker, warm_up) = start(&metrics);
        let past = Instant::now();
        let warmed = warm_up.fill(entries.clone(), past, |_| None).await;
        assert_eq!((warmed.loaded, warmed.unchecked), (0, 50));
        assert!(checker.is_warm());

        let (checker, warm_up) = start(&metrics);
        let authorities: Arc<[Authority]> = vec![Authority::Key {
            public_key_pem: KEY.to_owned(),
            requirements: Default::default(),
        }]
        .into();
        let later = Instant::now() + Duration::from_secs(60);
        let warmed = warm_up
            .fill(entries, later, |fp| {
                (fp == 7).then(|| (authorities.clone(), 1, DEFAULT_MAX_EVIDENCE_AGE))
            })
            .await;
        assert_eq!(
            (warmed.loaded, warmed.skipped, warmed.unchecked),
            (0, 50, 0)
        );
        assert_eq!(checker.cache.len(), 0, "nothing unverified was cached");
    }

    /// A store that cannot be read holds readiness back only until it has been tried, and a
    /// check then goes to the registry as if there were no store.
    #[tokio::test]
    async fn an_unreadable_store_is_tried_then_passed_over() {
        let closed = "127.0.0.1:1";
        let metrics = Arc::new(Metrics::default());
        let store = unreachable_store(&metrics);
        let options = RegistryOptions {
            insecure_registries: vec![closed.to_owned()],
            ..RegistryOptions::default()
        };
        let checker = SignatureChecker::new(options, Duration::from_secs(2), metrics.clone())
            .expect("checker");
        let (checker, warm_up) = checker.with_store(store);
        assert!(!checker.is_warm());
        assert_eq!(warm_up.run(|_| None).await, Warmed::default());
        assert!(checker.is_warm());
        assert_eq!(checker.cache.len(), 0);

        let image = ImageReference::parse(&format!("{closed}/app@sha256:{}", "a".repeat(64)))
            .expect("reference");
        let authorities: Arc<[Authority]> = vec![Authority::Key {
            public_key_pem: KEY.to_owned(),
            requirements: Default::default(),
        }]
        .into();
        let key = (format!("{closed}/app@sha256:{}", "a".repeat(64)), 1);
        let checked = checker
            .check(
                [CheckRequest {
                    key: key.clone(),
                    image,
                    authorities,
                    min_authorities: 1,
                    max_evidence_age: DEFAULT_MAX_EVIDENCE_AGE,
                }],
                Vec::new(),
            )
            .await;
        assert!(
            matches!(
                checked.verifications.get(&key),
                Some(SignatureCheck::Unavailable(_))
            ),
            "{checked:?}"
        );
        assert!(checked.stored.is_empty());
        let unreachable = EvidenceStoreLabels {
            outcome: "unreachable",
        };
        assert_eq!(metrics.evidence_store.get_or_create(&unreachable).get(), 1);
    }
}
