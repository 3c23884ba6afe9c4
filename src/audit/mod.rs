//! Records of every violation, enforced, audited or exempted: one structured log line each,
//! and the metrics that count them.

pub mod metrics;

pub use metrics::Metrics;

use crate::policy::{Decision, Violation};
use metrics::ViolationLabels;

/// The tracing target of audit records, so they can be filtered or routed on their own.
pub const TARGET: &str = "fixity::audit";

/// What an audit record says about the request itself.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo<'a> {
    pub uid: &'a str,
    pub operation: &'a str,
    pub resource: &'a str,
    pub sub_resource: &'a str,
    pub kind: &'a str,
    pub namespace: &'a str,
    pub name: &'a str,
    pub user: &'a str,
    pub groups: &'a [String],
    pub dry_run: bool,
}

/// Logs one line per violation and counts it.
pub fn record(info: &RequestInfo<'_>, decision: &Decision, metrics: &Metrics) {
    for v in &decision.violations {
        log(info, v);
        metrics
            .violations
            .get_or_create(&ViolationLabels {
                policy: v.policy.clone(),
                reason: v.reason.as_str(),
                mode: v.mode.as_str(),
                decision: v.outcome.as_str(),
            })
            .inc();
    }
}

fn log(info: &RequestInfo<'_>, v: &Violation) {
    tracing::warn!(
        target: TARGET,
        uid = info.uid,
        operation = info.operation,
        resource = info.resource,
        subResource = info.sub_resource,
        kind = info.kind,
        namespace = info.namespace,
        name = info.name,
        user = info.user,
        groups = info.groups.join(","),
        policy = v.policy.as_str(),
        mode = v.mode.as_str(),
        reason = v.reason.as_str(),
        container = v.container.as_deref().unwrap_or_default(),
        image = v.image.as_deref().unwrap_or_default(),
        dryRun = info.dry_run,
        decision = v.outcome.as_str(),
        detail = v.message.as_str(),
        "policy violation"
    );
}
