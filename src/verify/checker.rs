//! Signature checks for admission: every distinct (image, authorities) pair of a request
//! checked once through the shared cache, cut off at a deadline so the API server always gets
//! its answer in time, and bounded so that no request can make fixity do unbounded work:
//!
//! - at most [`Limits::registry`] verifications talk to registries at once, across all
//!   requests, and one request runs at most [`Limits::per_request`] of them, so a review with
//!   many images waits for its own turns and never takes every slot from the others;
//! - a request needing more than [`Limits::max_checks`] checks gets none: every image a rule
//!   covers is denied, with the reason, before any registry is asked;
//! - a verification still waiting for a slot when no request waits for it any more (each gave
//!   up at its deadline) is dropped; one that has started runs on, for at most one deadline,
//!   so that its result lands in the cache for the retry (the coalescing the cache is for).
//!   Orphaned work is thus bounded by `registry` verifications of one deadline each.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use tokio::sync::Semaphore;

use std::hash::{Hash, Hasher};

use super::cache::VerdictCache;
use super::{
    Authority, RegistryCredential, RegistryOptions, SignatureCheck, SignatureKey, Verifications,
    Verifier, VerifyError,
};
use crate::audit::Metrics;
use crate::audit::metrics::SignatureLabels;
use crate::image::ImageReference;

/// How much verification work fixity takes on.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Verifications talking to registries at once, across all requests.
    pub registry: usize,
    /// Of those, at most this many for one request.
    pub per_request: usize,
    /// Distinct checks one request may need; past it, none is made.
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
    Checked(SignatureCheck),
    /// Dropped before it started: nobody waited for it any more. Not cached.
    NotStarted,
}

/// How long results stay cached.
fn ttl(verdict: &Verdict) -> Duration {
    match verdict {
        Verdict::Checked(SignatureCheck::Verified(_)) => Duration::from_secs(600),
        Verdict::Checked(SignatureCheck::Untrusted(_)) => Duration::from_secs(30),
        Verdict::Checked(SignatureCheck::Unavailable(_)) => Duration::from_secs(5),
        Verdict::NotStarted => Duration::ZERO,
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
        })
    }

    /// Checks every request with `credentials` (anonymous when empty); one not finished by
    /// the deadline is `Unavailable`.
    pub async fn check_all(
        &self,
        requests: impl IntoIterator<Item = (SignatureKey, ImageReference, Arc<[Authority]>)>,
        credentials: Vec<RegistryCredential>,
    ) -> Verifications {
        let requests: Vec<_> = requests.into_iter().collect();
        if let Some(max) = self.limits.max_checks
            && requests.len() > max
        {
            let why = format!(
                "not verified: the request needs {} signature checks, more than the {max} \
                 fixity makes for one request",
                requests.len()
            );
            let labels = SignatureLabels {
                lookup: "refused",
                result: "untrusted",
            };
            self.metrics
                .signature_checks
                .get_or_create(&labels)
                .inc_by(requests.len() as u64);
            return requests
                .into_iter()
                .map(|(key, _, _)| (key, SignatureCheck::Untrusted(why.clone())))
                .collect();
        }
        let deadline = tokio::time::Instant::now() + self.deadline;
        let fingerprint = {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            for c in &credentials {
                (&c.registry, &c.username, &c.password).hash(&mut hasher);
            }
            hasher.finish()
        };
        let credentials: Arc<[RegistryCredential]> = credentials.into();
        let own = Arc::new(Semaphore::new(self.limits.per_request.max(1)));
        let checks = requests.into_iter().map(|(key, image, authorities)| {
            let verifier = self.verifier.clone();
            let cache = self.cache.clone();
            let credentials = credentials.clone();
            let (own, registry) = (own.clone(), self.registry.clone());
            let budget = self.deadline;
            async move {
                let started = Instant::now();
                let lookup = cache.get_or_verify((key.clone(), fingerprint), move |waiters| {
                    async move {
                        // A turn of this request's, then a registry slot; unless nobody
                        // waits for the answer any more by then.
                        let turn = async {
                            let mine = own.acquire_owned().await.ok()?;
                            let slot = registry.acquire_owned().await.ok()?;
                            Some((mine, slot))
                        };
                        let permits = tokio::select! {
                            biased;
                            () = waiters.all_gone() => None,
                            permits = turn => permits,
                        };
                        let Some(_permits) = permits else {
                            return Verdict::NotStarted;
                        };
                        let verify =
                            verifier.verify_with_credentials(&image, &authorities, &credentials);
                        Verdict::Checked(match tokio::time::timeout(budget, verify).await {
                            Ok(result) => SignatureCheck::from_result(&result),
                            Err(_) => SignatureCheck::Unavailable(format!(
                                "the registry did not answer within {} ms",
                                budget.as_millis()
                            )),
                        })
                    }
                });
                let (check, how) = match tokio::time::timeout_at(deadline, lookup).await {
                    Ok((Some(Verdict::Checked(check)), how)) => (check, how.as_str()),
                    Ok((Some(Verdict::NotStarted), how)) => (
                        SignatureCheck::Unavailable(
                            "the verification was dropped before it started".to_owned(),
                        ),
                        how.as_str(),
                    ),
                    Ok((None, how)) => (
                        SignatureCheck::Unavailable(
                            "the verification failed unexpectedly".to_owned(),
                        ),
                        how.as_str(),
                    ),
                    Err(_) => (
                        SignatureCheck::Unavailable(format!(
                            "no answer from the registry within the {} ms verification deadline",
                            self.deadline.as_millis()
                        )),
                        "deadline",
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
                (key, check)
            }
        });
        join_all(checks).await.into_iter().collect()
    }
}
