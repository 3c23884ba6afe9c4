//! `ImmutabilityPolicy.status.scan`: each policy's counts from the last scan (workloads,
//! results by outcome, failures and warnings by reason) and when it finished, so
//! `kubectl get immutabilitypolicies` answers "what would Enforce break today?".

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;

use super::drift;
use super::results::{Finding, Verdict};
use super::taint;
use crate::policy::ImmutabilityPolicy;
use crate::policy::crd::{ResultCounts, ScanStatus};
use crate::policy::evaluate::Reason;

/// Every reason code a scan can report, so that a reason gone since the last scan is removed
/// from the status (a merge patch keeps map keys it is not told to delete).
fn reason_codes() -> [&'static str; 7] {
    [
        Reason::MutableTag.as_str(),
        Reason::InvalidReference.as_str(),
        Reason::RegistryNotAllowed.as_str(),
        Reason::UnsignedImage.as_str(),
        Reason::VerificationUnavailable.as_str(),
        drift::REASON,
        taint::REASON,
    ]
}

/// The status of `policy` after a scan that found `findings`.
pub fn of(policy: &str, findings: &[Finding], finished: Timestamp) -> ScanStatus {
    let mut results = ResultCounts::default();
    let mut reasons: BTreeMap<String, i64> = BTreeMap::new();
    let mut workloads = BTreeSet::new();
    for f in findings.iter().filter(|f| f.policy == policy) {
        workloads.insert(&f.workload);
        match f.verdict {
            Verdict::Pass => results.pass += 1,
            Verdict::Fail => results.fail += 1,
            Verdict::Warn => results.warn += 1,
        }
        if f.verdict != Verdict::Pass {
            for r in &f.reasons {
                *reasons.entry((*r).to_owned()).or_default() += 1;
            }
        }
    }
    ScanStatus {
        last_scan_time: Time(finished),
        workloads: i64::try_from(workloads.len()).unwrap_or(i64::MAX),
        results,
        reasons,
    }
}

/// Writes `status` into the policy's status, leaving its conditions alone.
pub async fn write(client: &Client, policy: &str, status: &ScanStatus) -> Result<(), kube::Error> {
    let mut reasons = serde_json::Map::new();
    for r in reason_codes() {
        reasons.insert(r.to_owned(), serde_json::Value::Null);
    }
    for (r, n) in &status.reasons {
        reasons.insert(r.clone(), json!(n));
    }
    let mut scan = serde_json::to_value(status).map_err(kube::Error::SerdeError)?;
    scan["reasons"] = serde_json::Value::Object(reasons);
    let api: Api<ImmutabilityPolicy> = Api::all(client.clone());
    let patch = json!({"status": {"scan": scan}});
    match api
        .patch_status(policy, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        // Deleted since the scan began: nothing to report on.
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        other => other.map(drop),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::results::{self, Rule};

    #[test]
    fn counts_by_outcome_and_reason() {
        let findings = vec![
            results::sample(
                "ns",
                "a",
                "p",
                Rule::ImageReference,
                Verdict::Fail,
                &["MutableTag"],
            ),
            results::sample("ns", "a", "p", Rule::Drift, Verdict::Pass, &[]),
            results::sample(
                "ns",
                "b",
                "p",
                Rule::ImageReference,
                Verdict::Fail,
                &["MutableTag", "InvalidReference"],
            ),
            results::sample(
                "ns",
                "b",
                "other",
                Rule::ImageReference,
                Verdict::Warn,
                &["MutableTag"],
            ),
        ];
        let status = of("p", &findings, Timestamp::UNIX_EPOCH);
        assert_eq!(status.workloads, 2);
        assert_eq!(
            status.results,
            ResultCounts {
                pass: 1,
                fail: 2,
                warn: 0
            }
        );
        assert_eq!(
            status.reasons,
            BTreeMap::from([("InvalidReference".into(), 1), ("MutableTag".into(), 2)])
        );
        assert!(reason_codes().contains(&"ImageDrift") && reason_codes().contains(&"Tainted"));
    }
}
