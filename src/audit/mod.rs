//! Records of every violation, enforced, audited or exempted: one structured log line each,
//! and the metrics that count them.

pub mod events;
pub mod metrics;

pub use events::EventSink;
pub use metrics::Metrics;

use std::borrow::Cow;

use k8s_openapi::api::core::v1::ObjectReference;

use crate::policy::{Decision, Outcome, Violation};
use events::Notice;
use metrics::ViolationLabels;

/// The tracing target of audit records, so they can be filtered or routed on their own.
pub const TARGET: &str = "fixity::audit";

/// What an audit record says about the request itself.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo<'a> {
    pub uid: &'a str,
    pub operation: &'a str,
    /// API group and version of the object (of the pod, for CONNECT).
    pub group: &'a str,
    pub version: &'a str,
    pub resource: &'a str,
    pub sub_resource: &'a str,
    pub kind: &'a str,
    pub namespace: &'a str,
    pub name: &'a str,
    pub user: &'a str,
    pub groups: &'a [Cow<'a, str>],
    pub dry_run: bool,
    /// The object's uid, when it already exists (updates).
    pub object_uid: Option<&'a str>,
}

/// Cuts `s` to at most `max` bytes at a character boundary, ending in `…` when cut: warnings
/// and event notes have size limits, and image names come from the workload.
pub fn shorten(mut s: String, max: usize) -> String {
    const ELLIPSIS: char = '…';
    if s.len() <= max {
        return s;
    }
    let mut end = max.saturating_sub(ELLIPSIS.len_utf8());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push(ELLIPSIS);
    s
}

/// Logs one line per violation, counts it, and queues an event on the object concerned.
pub fn record(
    info: &RequestInfo<'_>,
    decision: &Decision,
    metrics: &Metrics,
    events: Option<&EventSink>,
) {
    if let Some(notice) = events.and_then(|_| notice(info, decision))
        && let Some(sink) = events
        && !sink.send(notice)
    {
        metrics.events_dropped.inc();
    }
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

/// The event for a request, if the object it concerns exists (or will, once admitted) and
/// the request is not a dry run.
fn notice(info: &RequestInfo<'_>, decision: &Decision) -> Option<Notice> {
    let first = decision.violations.first()?;
    let admitted = decision.allowed();
    let exists = matches!(info.operation, "UPDATE" | "CONNECT");
    if info.dry_run || info.name.is_empty() || !(exists || admitted && info.operation == "CREATE") {
        return None;
    }
    let (api_version, kind) = match info.operation {
        "CONNECT" if info.resource == "nodes" => ("v1".to_owned(), "Node"),
        "CONNECT" => ("v1".to_owned(), "Pod"),
        _ if info.group.is_empty() => (info.version.to_owned(), info.kind),
        _ => (format!("{}/{}", info.group, info.version), info.kind),
    };
    let action = if !admitted {
        "Denied"
    } else if decision
        .violations
        .iter()
        .all(|v| v.outcome == Outcome::Exempted)
    {
        "Exempted"
    } else {
        "Audited"
    };
    let note = decision
        .violations
        .iter()
        .map(|v| {
            format!(
                "[{} {}] {}: {}",
                v.policy,
                v.outcome.as_str(),
                v.reason,
                v.message
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    Some(Notice {
        regarding: ObjectReference {
            api_version: Some(api_version),
            kind: Some(kind.to_owned()),
            name: Some(info.name.to_owned()),
            namespace: Some(info.namespace.to_owned()).filter(|n| !n.is_empty()),
            uid: info.object_uid.map(str::to_owned),
            ..Default::default()
        },
        warning: true,
        reason: first.reason.as_str().to_owned(),
        action: action.to_owned(),
        note: format!("{} by user {}: {note}", info.operation, info.user),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn shorten_respects_the_limit_and_character_boundaries() {
        assert_eq!(super::shorten("short".into(), 10), "short");
        let cut = super::shorten("ééééé".into(), 6);
        assert!(cut.len() <= 6 && cut.ends_with('…'), "{cut:?}");
        assert_eq!(cut, "é…");
    }
}
