//! Signature checks for admission: every distinct (image, authorities) pair of a request
//! checked once, all in parallel, through the shared cache, and cut off at a deadline so the
//! API server always gets its answer in time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;

use std::hash::{Hash, Hasher};

use super::cache::VerdictCache;
use super::{
    Authority, RegistryCredential, RegistryOptions, SignatureCheck, SignatureKey, Verifications,
    Verifier, VerifyError,
};
use crate::audit::Metrics;
use crate::audit::metrics::SignatureLabels;
use crate::image::ImageReference;

/// How long results stay cached.
fn ttl(check: &SignatureCheck) -> Duration {
    match check {
        SignatureCheck::Verified(_) => Duration::from_secs(600),
        SignatureCheck::Untrusted(_) => Duration::from_secs(30),
        SignatureCheck::Unavailable(_) => Duration::from_secs(5),
    }
}

/// Results kept at most; a bound on memory whatever the cluster runs.
const CACHE_ENTRIES: usize = 10_000;

/// Checks signatures for the admission path.
pub struct SignatureChecker {
    verifier: Arc<Verifier>,
    /// Keyed also by the credentials used: a failure without access must not stand in for a
    /// pod that has it.
    cache: Arc<VerdictCache<(SignatureKey, u64), SignatureCheck>>,
    deadline: Duration,
    metrics: Arc<Metrics>,
}

impl SignatureChecker {
    /// `deadline` bounds a whole request's checks; keep it below the webhook's timeoutSeconds.
    pub fn new(
        options: RegistryOptions,
        deadline: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Self, VerifyError> {
        Ok(Self {
            verifier: Arc::new(Verifier::new(options)?),
            cache: VerdictCache::new(CACHE_ENTRIES, ttl),
            deadline,
            metrics,
        })
    }

    /// Checks every request with `credentials` (anonymous when empty); one not finished by
    /// the deadline is `Unavailable`.
    pub async fn check_all(
        &self,
        requests: impl IntoIterator<Item = (SignatureKey, ImageReference, Arc<[Authority]>)>,
        credentials: Vec<RegistryCredential>,
    ) -> Verifications {
        let deadline = tokio::time::Instant::now() + self.deadline;
        let fingerprint = {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            for c in &credentials {
                (&c.registry, &c.username, &c.password).hash(&mut hasher);
            }
            hasher.finish()
        };
        let credentials: Arc<[RegistryCredential]> = credentials.into();
        let checks = requests.into_iter().map(|(key, image, authorities)| {
            let verifier = self.verifier.clone();
            let cache = self.cache.clone();
            let credentials = credentials.clone();
            async move {
                let started = Instant::now();
                let lookup = cache.get_or_verify((key.clone(), fingerprint), move || async move {
                    let result = verifier
                        .verify_with_credentials(&image, &authorities, &credentials)
                        .await;
                    SignatureCheck::from_result(&result)
                });
                let (check, how) = match tokio::time::timeout_at(deadline, lookup).await {
                    Ok((Some(check), how)) => (check, how.as_str()),
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
