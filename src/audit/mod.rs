//! Records of every violation, enforced, audited or exempted: one structured log line each,
//! and the metrics that count them.

pub mod entered;
pub mod events;
pub mod metrics;

pub use entered::{Entered, EnteredSink};
pub use events::EventSink;
pub use metrics::Metrics;

use std::borrow::Cow;

use k8s_openapi::api::core::v1::ObjectReference;

use crate::policy::{Decision, Mode, Outcome, Reason, Violation};
use events::Notice;
use metrics::ViolationLabels;

/// The tracing target of audit records, so they can be filtered or routed on their own.
pub const TARGET: &str = "fixity::audit";
/// Audit lines one request writes at most, one per violation; the rest are summed up in one
/// more line, with counts by reason.
pub const MAX_LOG_LINES: usize = 20;
/// Longest value of a field taken from the request (image, user, name...) in an audit line.
const MAX_FIELD: usize = 512;
/// Violations named in an event's note; it is cut at the API server's limit anyway.
const MAX_NOTED: usize = 10;

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

/// Queues an event, counting it when its rate or the full queue drops it.
pub fn notify(sink: &EventSink, notice: Notice, metrics: &Metrics) {
    let dropped = match sink.send(notice) {
        Ok(()) => return,
        Err(events::Dropped::RateLimited) => &metrics.events_rate_limited,
        Err(events::Dropped::QueueFull) => &metrics.events_dropped,
    };
    dropped.inc();
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
    {
        notify(sink, notice, metrics);
    }
    for v in &decision.violations {
        count(metrics, &v.policy, v.reason, v.mode, v.outcome, 1);
    }
    for o in &decision.omitted {
        count(metrics, &o.policy, o.reason, o.mode, o.outcome, o.count);
    }
    let bounded = Bounded::new(info);
    for v in decision.violations.iter().take(MAX_LOG_LINES) {
        log(&bounded, v);
    }
    let unlogged = decision.violations.iter().skip(MAX_LOG_LINES);
    let mut by_reason: std::collections::BTreeMap<&str, u64> = Default::default();
    for v in unlogged {
        *by_reason.entry(v.reason.as_str()).or_default() += 1;
    }
    for o in &decision.omitted {
        *by_reason.entry(o.reason.as_str()).or_default() += o.count;
    }
    if !by_reason.is_empty() {
        let total: u64 = by_reason.values().sum();
        tracing::warn!(
            target: TARGET,
            uid = &*bounded.uid,
            operation = info.operation,
            resource = info.resource,
            subResource = info.sub_resource,
            kind = info.kind,
            namespace = &*bounded.namespace,
            name = &*bounded.name,
            user = &*bounded.user,
            groups = bounded.groups.as_str(),
            dryRun = info.dry_run,
            decision = if decision.allowed() { "admitted" } else { "denied" },
            violations = total,
            // Serialising a map of strings to numbers cannot fail.
            reasons = serde_json::to_string(&by_reason).unwrap_or_default(),
            "further policy violations, summed up"
        );
    }
}

fn count(metrics: &Metrics, policy: &str, reason: Reason, mode: Mode, outcome: Outcome, n: u64) {
    metrics
        .violations
        .get_or_create(&ViolationLabels {
            policy: policy.to_owned(),
            reason: reason.as_str(),
            mode: mode.as_str(),
            decision: outcome.as_str(),
        })
        .inc_by(n);
}

/// The request's own fields, cut to a size an audit line can carry: a forged or hostile
/// review can make any of them megabytes long.
struct Bounded<'a> {
    info: &'a RequestInfo<'a>,
    uid: Cow<'a, str>,
    namespace: Cow<'a, str>,
    name: Cow<'a, str>,
    user: Cow<'a, str>,
    groups: String,
}

impl<'a> Bounded<'a> {
    fn new(info: &'a RequestInfo<'a>) -> Self {
        Self {
            info,
            uid: cut(info.uid),
            namespace: cut(info.namespace),
            name: cut(info.name),
            user: cut(info.user),
            groups: joined(info.groups),
        }
    }
}

/// The groups, comma-separated, to about [`MAX_FIELD`] bytes.
fn joined(groups: &[Cow<'_, str>]) -> String {
    let mut out = String::new();
    for g in groups {
        if out.len() > MAX_FIELD {
            break;
        }
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(g);
    }
    shorten(out, MAX_FIELD)
}

/// `s`, shortened to [`MAX_FIELD`] bytes when longer.
fn cut(s: &str) -> Cow<'_, str> {
    if s.len() <= MAX_FIELD {
        Cow::Borrowed(s)
    } else {
        Cow::Owned(shorten(s.to_owned(), MAX_FIELD))
    }
}

fn log(b: &Bounded<'_>, v: &Violation) {
    let info = b.info;
    tracing::warn!(
        target: TARGET,
        uid = &*b.uid,
        operation = info.operation,
        resource = info.resource,
        subResource = info.sub_resource,
        kind = info.kind,
        namespace = &*b.namespace,
        name = &*b.name,
        user = &*b.user,
        groups = b.groups.as_str(),
        policy = v.policy.as_str(),
        mode = v.mode.as_str(),
        reason = v.reason.as_str(),
        container = &*cut(v.container.as_deref().unwrap_or_default()),
        image = &*cut(v.image.as_deref().unwrap_or_default()),
        dryRun = info.dry_run,
        decision = v.outcome.as_str(),
        detail = &*cut(&v.message),
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
        .take(MAX_NOTED)
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
