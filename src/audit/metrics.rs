//! Prometheus metrics. Labels are bounded: policy names, reason codes, modes and outcomes,
//! never object or user names.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ViolationLabels {
    pub policy: String,
    pub reason: &'static str,
    pub mode: &'static str,
    pub decision: &'static str,
}

/// How a review ended, for `fixity_review_duration_seconds`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReviewResult {
    Allowed,
    Denied,
    /// The request could not be read.
    Invalid,
}

impl ReviewResult {
    fn label(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::Denied => "denied",
            Self::Invalid => "invalid",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReviewLabels {
    /// `allowed`, `denied` or `invalid` (the request could not be read).
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    /// `ready` or `invalid`.
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `success` or `error`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SignatureLabels {
    /// `hit` (memory), `store` (a miss answered by the evidence store), `miss` (the
    /// registry), `coalesced` or `deadline`.
    pub lookup: &'static str,
    /// `verified`, `untrusted` or `unavailable`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EvidenceStoreLabels {
    /// Reads: `verified`, `missing`, `unreachable`, `stale`, `refused`; writes: `written`,
    /// `not_written`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScanResultLabels {
    pub policy: String,
    /// `pass`, `fail` or `warn`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

/// One `fixity_review_duration_seconds` series per `ReviewResult`.
struct ReviewSeries {
    allowed: Histogram,
    denied: Histogram,
    invalid: Histogram,
}

/// Every metric fixity exports.
pub struct Metrics {
    registry: Registry,
    pub violations: Family<ViolationLabels, Counter>,
    /// The series of `fixity_review_duration_seconds`, created up front: every review observes
    /// one, and a handle skips the family's lock and label hashing.
    review_results: ReviewSeries,
    pub policies: Family<PolicyLabels, Gauge>,
    pub certificate_reloads: Family<ResultLabels, Counter>,
    pub events_dropped: Counter,
    /// Events not published because their namespace and reason, or all events, were over
    /// their rate.
    pub events_rate_limited: Counter,
    /// Reviews answered 429 because fixity was at its capacity.
    pub reviews_throttled: Counter,
    pub signature_checks: Family<SignatureLabels, Counter>,
    pub signature_check_duration: Family<SignatureLabels, Histogram>,
    pub evidence_store: Family<EvidenceStoreLabels, Counter>,
    pub evidence_store_objects: Gauge,
    pub evidence_store_bytes: Gauge,
    /// Admitted exec/attach notices the taint controller never got (its queue was full).
    pub entered_dropped: Counter,
    /// Pods marked tainted, by outcome (`tainted`, `error`).
    pub taints: Family<OutcomeLabels, Counter>,
    /// Evictions of tainted pods, by outcome (`evicted`, `held_back`, `error`).
    pub evictions: Family<OutcomeLabels, Counter>,
    /// Background scans, by result (`success`, `error`).
    pub scans: Family<ResultLabels, Counter>,
    pub scan_duration: Histogram,
    /// 1 while this replica is scanning.
    pub scan_running: Gauge,
    /// Results of the last scan by policy and outcome.
    pub scan_results: Family<ScanResultLabels, Gauge>,
    /// Attestation checks by cache lookup and result (satisfied, missing, condition_failed,
    /// unavailable).
    pub attestation_checks: Family<SignatureLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("fixity");
        let violations = Family::<ViolationLabels, Counter>::default();
        registry.register(
            "violations",
            "Rule violations by policy, reason, mode and decision (denied, would_deny, exempted)",
            violations.clone(),
        );
        let reviews = Family::<ReviewLabels, Histogram>::new_with_constructor(|| {
            // 10 µs to 10 s: a cached decision takes 10-50 µs, registry calls sit at the top.
            Histogram::new([
                0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ])
        });
        registry.register(
            "review_duration_seconds",
            "Time to answer one AdmissionReview, by result",
            reviews.clone(),
        );
        let policies = Family::<PolicyLabels, Gauge>::default();
        registry.register(
            "policies",
            "ImmutabilityPolicies known, by state",
            policies.clone(),
        );
        let certificate_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "certificate_reloads",
            "Serving certificate reloads after the files changed",
            certificate_reloads.clone(),
        );
        let events_dropped = Counter::default();
        registry.register(
            "events_dropped",
            "Kubernetes Events not published because the queue was full",
            events_dropped.clone(),
        );
        let events_rate_limited = Counter::default();
        registry.register(
            "events_rate_limited",
            "Kubernetes Events not published because their namespace and reason (or all events) were over their rate",
            events_rate_limited.clone(),
        );
        let reviews_throttled = Counter::default();
        registry.register(
            "reviews_throttled",
            "AdmissionReviews answered 429 (retry later) because fixity was at its capacity of concurrent reviews or request bytes",
            reviews_throttled.clone(),
        );
        let signature_checks = Family::<SignatureLabels, Counter>::default();
        registry.register(
            "signature_checks",
            "Image signature checks by cache lookup and result",
            signature_checks.clone(),
        );
        let signature_check_duration =
            Family::<SignatureLabels, Histogram>::new_with_constructor(|| {
                Histogram::new([
                    0.00001, 0.0001, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    5.0, 10.0,
                ])
            });
        registry.register(
            "signature_check_duration_seconds",
            "Time to answer one signature check, by cache lookup and result",
            signature_check_duration.clone(),
        );
        let evidence_store = Family::<EvidenceStoreLabels, Counter>::default();
        registry.register(
            "evidence_store",
            "Evidence store reads and writes by outcome (a refused entry did not verify again and the registry was asked)",
            evidence_store.clone(),
        );
        let evidence_store_objects = Gauge::default();
        registry.register(
            "evidence_store_objects",
            "VerifiedEvidence objects in the evidence store, as last listed",
            evidence_store_objects.clone(),
        );
        let evidence_store_bytes = Gauge::default();
        registry.register(
            "evidence_store_bytes",
            "Evidence bytes held by the evidence store, as last listed",
            evidence_store_bytes.clone(),
        );
        let entered_dropped = Counter::default();
        registry.register(
            "entered_dropped",
            "Admitted exec/attach notices dropped because the taint queue was full",
            entered_dropped.clone(),
        );
        let taints = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "taints",
            "Pods marked fixity.dev/tainted after an admitted exec or attach, by outcome",
            taints.clone(),
        );
        let evictions = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "evictions",
            "Evictions of tainted pods, by outcome (evicted, held_back, error)",
            evictions.clone(),
        );
        let scans = Family::<ResultLabels, Counter>::default();
        registry.register(
            "scans",
            "Background scans of the cluster's workloads, by result",
            scans.clone(),
        );
        let scan_duration = Histogram::new([
            0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
        ]);
        registry.register(
            "scan_duration_seconds",
            "Time one background scan took, listing, verifying and reporting",
            scan_duration.clone(),
        );
        let scan_running = Gauge::default();
        registry.register(
            "scan_running",
            "1 while this replica runs a background scan",
            scan_running.clone(),
        );
        let scan_results = Family::<ScanResultLabels, Gauge>::default();
        registry.register(
            "scan_results",
            "Results of the last background scan, by policy and outcome",
            scan_results.clone(),
        );
        let attestation_checks = Family::<SignatureLabels, Counter>::default();
        registry.register(
            "attestation_checks",
            "Image attestation checks by cache lookup and result",
            attestation_checks.clone(),
        );
        let series = |result: ReviewResult| {
            let labels = ReviewLabels {
                result: result.label(),
            };
            reviews.get_or_create(&labels).clone()
        };
        let review_results = ReviewSeries {
            allowed: series(ReviewResult::Allowed),
            denied: series(ReviewResult::Denied),
            invalid: series(ReviewResult::Invalid),
        };
        Self {
            registry,
            review_results,
            events_dropped,
            events_rate_limited,
            reviews_throttled,
            signature_checks,
            signature_check_duration,
            evidence_store,
            evidence_store_objects,
            evidence_store_bytes,
            attestation_checks,
            violations,
            policies,
            certificate_reloads,
            entered_dropped,
            taints,
            evictions,
            scans,
            scan_duration,
            scan_running,
            scan_results,
        }
    }
}

impl Metrics {
    /// Records how long a review took.
    pub fn observe_review(&self, result: ReviewResult, seconds: f64) {
        let series = &self.review_results;
        match result {
            ReviewResult::Allowed => &series.allowed,
            ReviewResult::Denied => &series.denied,
            ReviewResult::Invalid => &series.invalid,
        }
        .observe(seconds);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_review_result_is_exported_from_the_start_and_counted_apart() {
        let metrics = Metrics::default();
        let count = |text: &str, result: &str| {
            let prefix = format!("fixity_review_duration_seconds_count{{result=\"{result}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(prefix.as_str()))
                .map(str::to_owned)
        };
        let before = metrics.render();
        for result in ["allowed", "denied", "invalid"] {
            assert_eq!(count(&before, result).as_deref(), Some("0"), "{before}");
        }
        metrics.observe_review(ReviewResult::Denied, 0.00002);
        metrics.observe_review(ReviewResult::Denied, 0.00003);
        metrics.observe_review(ReviewResult::Invalid, 0.00001);
        let after = metrics.render();
        assert_eq!(count(&after, "allowed").as_deref(), Some("0"));
        assert_eq!(count(&after, "denied").as_deref(), Some("2"));
        assert_eq!(count(&after, "invalid").as_deref(), Some("1"));
    }
}
