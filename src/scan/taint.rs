//! Tainted pods: a pod someone entered through an admitted exec or attach is no longer the
//! artifact that was built. Every replica marks the pods its webhook let someone into
//! (annotation `fixity.dev/tainted`: when, who, what; label `fixity.dev/tainted=true` so they
//! can be listed), off the request path, with an Event. The replica holding the scan Lease
//! evicts them once a policy's `runtime.replaceTainted.after` has passed, through the Eviction
//! API, so PodDisruptionBudgets are respected: a refused eviction (429) is retried and
//! reported as held back. A pod no controller owns is reported, not evicted, unless the policy
//! says `barePods: Evict`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{DeleteParams, EvictParams, ListParams, Patch, PatchParams, Preconditions};
use kube::{Api, Client, ResourceExt};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::{Notify, mpsc};

use crate::audit::events::Notice;
use crate::audit::metrics::OutcomeLabels;
use crate::audit::{self, Entered, EventSink, Metrics};
use crate::policy::CompiledPolicy;
use crate::policy::crd::{Action, BarePods};
use crate::policy::store::Labels;

/// The annotation that records how a pod was entered.
pub const ANNOTATION: &str = "fixity.dev/tainted";
/// The label that lets the replacer list tainted pods without reading every pod.
pub const LABEL: &str = "fixity.dev/tainted";
/// The reason code of a tainted pod in reports and Events.
pub const REASON: &str = "Tainted";

/// What the annotation says: the first entry into the pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Taint {
    /// RFC 3339, to the second.
    pub at: String,
    /// The user whose request was admitted.
    pub by: String,
    /// `exec` or `attach`.
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// The policies whose rule forbids it, and how each let it through.
    #[serde(default)]
    pub policies: BTreeMap<String, String>,
}

impl Taint {
    pub fn parse(text: &str) -> Option<Self> {
        serde_json::from_str(text).ok()
    }

    pub fn at(&self) -> Option<Timestamp> {
        self.at.parse().ok()
    }

    fn from_entered(e: &Entered) -> Self {
        let at = Timestamp::try_from(e.at).unwrap_or_else(|_| Timestamp::now());
        Self {
            at: to_second(at).to_string(),
            by: e.user.clone(),
            action: e.entry.as_str().to_owned(),
            container: e.container.clone(),
            policies: e
                .policies
                .iter()
                .map(|(p, how)| (p.clone(), (*how).to_owned()))
                .collect(),
        }
    }

    /// "exec by oncall into container web at 2026-...".
    pub fn describe(&self) -> String {
        let into = self
            .container
            .as_deref()
            .map(|c| format!(" into container {c:?}"))
            .unwrap_or_default();
        format!("{} by {}{into} at {}", self.action, self.by, self.at)
    }
}

fn to_second(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second()).unwrap_or(t)
}

/// Whether `policy` forbids the way the pod was entered: only then is its entry a taint the
/// policy cares about.
pub fn forbids(policy: &CompiledPolicy, action: &str) -> bool {
    let rule = match action {
        "exec" => policy.runtime.exec,
        "attach" => policy.runtime.attach,
        _ => return false,
    };
    rule == Action::Deny
}

/// Where the replacement of one tainted pod stands, as the replacer last saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replacement {
    /// Evicted once `due` passes.
    Waiting { due: Timestamp },
    /// The Eviction API refused it (a PodDisruptionBudget); retried.
    HeldBack {
        since: Timestamp,
        attempts: u32,
        message: String,
    },
    /// Evicted; its controller creates a clean pod.
    Evicted { at: Timestamp },
    /// No controller would recreate it, and the policy says to report it only.
    Bare,
}

impl Replacement {
    pub fn describe(&self) -> String {
        match self {
            Replacement::Waiting { due } => format!("to be evicted at {}", to_second(*due)),
            Replacement::HeldBack {
                since,
                attempts,
                message,
            } => format!(
                "eviction held back since {} ({attempts} attempts): {message}",
                to_second(*since)
            ),
            Replacement::Evicted { at } => format!("evicted at {}", to_second(*at)),
            Replacement::Bare => {
                "a bare pod: reported, not evicted (replaceTainted.barePods: Report)".to_owned()
            }
        }
    }

    /// A short state name for report properties.
    pub fn state(&self) -> &'static str {
        match self {
            Replacement::Waiting { .. } => "Waiting",
            Replacement::HeldBack { .. } => "HeldBack",
            Replacement::Evicted { .. } => "Evicted",
            Replacement::Bare => "Reported",
        }
    }
}

/// Replacement states by pod uid, written by the replacer, read by the report.
#[derive(Debug, Default)]
pub struct Replacements(Mutex<HashMap<String, Replacement>>);

impl Replacements {
    pub fn get(&self, uid: &str) -> Option<Replacement> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(uid)
            .cloned()
    }

    /// Stores `state`; `true` when it differs in kind from what was known (a report refresh
    /// is worth it), not when only an attempt count moved.
    fn set(&self, uid: &str, state: Replacement) -> bool {
        let mut all = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let before = all.insert(uid.to_owned(), state.clone());
        before.is_none_or(|b| b.state() != state.state())
    }

    fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|uid, _| keep(uid));
    }

    fn clear(&self) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

fn pod_reference(pod: &Pod) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".to_owned()),
        kind: Some("Pod".to_owned()),
        name: Some(pod.name_any()),
        namespace: pod.namespace(),
        uid: pod.uid(),
        ..Default::default()
    }
}

/// Marks the pods in `notices`, until the request path's end of the queue is gone. Runs in
/// every replica: the one whose webhook admitted the entry marks the pod.
pub async fn mark_entered(
    client: Client,
    events: Option<EventSink>,
    metrics: Arc<Metrics>,
    mut notices: mpsc::Receiver<Entered>,
    changed: Arc<Notify>,
) {
    while let Some(entered) = notices.recv().await {
        let outcome = match mark(&client, events.as_ref(), &metrics, &entered).await {
            Ok(()) => "tainted",
            Err(e) => {
                tracing::warn!(
                    namespace = %entered.namespace, pod = %entered.pod, error = %e,
                    "could not mark the pod as tainted"
                );
                "error"
            }
        };
        metrics
            .taints
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        changed.notify_one();
    }
}

async fn mark(
    client: &Client,
    events: Option<&EventSink>,
    metrics: &Metrics,
    entered: &Entered,
) -> Result<(), kube::Error> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &entered.namespace);
    let Some(pod) = pods.get_opt(&entered.pod).await? else {
        return Ok(());
    };
    let taint = Taint::from_entered(entered);
    let first = !pod.annotations().contains_key(ANNOTATION);
    if first {
        // The first entry stays on record: the grace period counts from it.
        let value = serde_json::to_string(&taint).unwrap_or_default();
        let patch = json!({"metadata": {
            "labels": {LABEL: "true"},
            "annotations": {ANNOTATION: value},
        }});
        pods.patch(&entered.pod, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        tracing::warn!(
            namespace = %entered.namespace, pod = %entered.pod, user = %entered.user,
            action = entered.entry.as_str(), "pod entered; marked fixity.dev/tainted"
        );
    }
    if let Some(events) = events {
        let how: Vec<String> = entered
            .policies
            .iter()
            .map(|(p, how)| format!("{p}: {how}"))
            .collect();
        let notice = Notice {
            regarding: pod_reference(&pod),
            warning: true,
            reason: REASON.to_owned(),
            action: "Taint".to_owned(),
            note: format!(
                "{} admitted ({}); the pod is no longer exactly what was built{}",
                taint.describe(),
                how.join(", "),
                if first {
                    ""
                } else {
                    " (it was already marked fixity.dev/tainted)"
                }
            ),
        };
        audit::notify(events, notice, metrics);
    }
    Ok(())
}

/// The decision for one tainted pod, from the policies that apply to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Plan {
    after: Duration,
    evict_bare: bool,
}

/// The strictest `replaceTainted` among the policies that apply in the pod's namespace and
/// forbid how it was entered: the shortest grace period, and bare pods evicted if any says so.
fn plan(
    policies: &[CompiledPolicy],
    namespace: &str,
    labels: Option<&Labels>,
    action: &str,
) -> Option<Plan> {
    policies
        .iter()
        .filter(|p| p.applies_to(namespace, labels) && forbids(p, action))
        .filter_map(|p| p.replace_tainted)
        .fold(None, |best: Option<Plan>, r| {
            let evict_bare = r.bare_pods == BarePods::Evict;
            Some(match best {
                None => Plan {
                    after: r.after,
                    evict_bare,
                },
                Some(b) => Plan {
                    after: b.after.min(r.after),
                    evict_bare: b.evict_bare || evict_bare,
                },
            })
        })
}

/// Evicts tainted pods whose grace period has passed; run by the Lease holder.
pub struct Replacer {
    client: Client,
    events: Option<EventSink>,
    metrics: Arc<Metrics>,
    pub states: Arc<Replacements>,
}

impl Replacer {
    pub fn new(client: Client, events: Option<EventSink>, metrics: Arc<Metrics>) -> Self {
        Self {
            client,
            events,
            metrics,
            states: Arc::default(),
        }
    }

    /// Forgets what an earlier term as Lease holder learnt.
    pub fn reset(&self) {
        self.states.clear();
    }

    /// One pass over the tainted pods. `true` when a pod's state changed in kind, so the
    /// report is worth refreshing.
    pub async fn pass(
        &self,
        policies: &[CompiledPolicy],
        labels: impl Fn(&str) -> Option<Arc<Labels>>,
    ) -> Result<bool, kube::Error> {
        let all: Api<Pod> = Api::all(self.client.clone());
        let tainted = all
            .list(&ListParams::default().labels(&format!("{LABEL}=true")))
            .await?;
        let now = Timestamp::now();
        let mut changed = false;
        let mut seen = Vec::new();
        for pod in &tainted.items {
            let uid = pod.uid().unwrap_or_default();
            seen.push(uid.clone());
            let namespace = pod.namespace().unwrap_or_default();
            let Some(taint) = pod
                .annotations()
                .get(ANNOTATION)
                .and_then(|a| Taint::parse(a))
            else {
                continue;
            };
            let terminating = pod.metadata.deletion_timestamp.is_some();
            let finished = pod
                .status
                .as_ref()
                .and_then(|s| s.phase.as_deref())
                .is_some_and(|p| matches!(p, "Succeeded" | "Failed"));
            if terminating || finished {
                continue;
            }
            let labels = labels(&namespace);
            let Some(plan) = plan(policies, &namespace, labels.as_deref(), &taint.action) else {
                continue;
            };
            let at = taint.at().unwrap_or(now);
            let due = at
                .checked_add(SignedDuration::try_from(plan.after).unwrap_or(SignedDuration::MAX))
                .unwrap_or(Timestamp::MAX);
            let bare = !pod
                .owner_references()
                .iter()
                .any(|o| o.controller == Some(true));
            let state = if bare && !plan.evict_bare {
                Replacement::Bare
            } else if now < due {
                Replacement::Waiting { due }
            } else {
                self.evict(pod, &namespace, &uid, &taint, plan).await
            };
            changed |= self.states.set(&uid, state);
        }
        self.states.retain(|uid| seen.iter().any(|s| s == uid));
        Ok(changed)
    }

    async fn evict(
        &self,
        pod: &Pod,
        namespace: &str,
        uid: &str,
        taint: &Taint,
        plan: Plan,
    ) -> Replacement {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let name = pod.name_any();
        // The uid precondition: a StatefulSet's replacement has the same name and is clean.
        let params = EvictParams {
            delete_options: Some(DeleteParams {
                preconditions: Some(Preconditions {
                    uid: Some(uid.to_owned()),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            }),
            ..EvictParams::default()
        };
        let now = Timestamp::now();
        let (outcome, state) = match pods.evict(&name, &params).await {
            Ok(_) => {
                tracing::warn!(namespace, pod = %name, "tainted pod evicted");
                self.note(
                    pod,
                    "Replaced",
                    format!(
                        "evicted {} after {} (runtime.replaceTainted); its controller creates a clean pod",
                        humanize(plan.after),
                        taint.describe()
                    ),
                );
                ("evicted", Replacement::Evicted { at: now })
            }
            Err(kube::Error::Api(status)) if status.code == 429 => {
                let (since, attempts) = match self.states.get(uid) {
                    Some(Replacement::HeldBack {
                        since, attempts, ..
                    }) => (since, attempts + 1),
                    _ => {
                        self.note(
                            pod,
                            "EvictionHeldBack",
                            format!(
                                "eviction of this tainted pod refused, retried until allowed: {}",
                                status.message
                            ),
                        );
                        (now, 1)
                    }
                };
                (
                    "held_back",
                    Replacement::HeldBack {
                        since,
                        attempts,
                        message: status.message,
                    },
                )
            }
            Err(e) => {
                tracing::warn!(namespace, pod = %name, error = %e, "eviction of a tainted pod failed; retrying");
                let due = now;
                ("error", Replacement::Waiting { due })
            }
        };
        self.metrics
            .evictions
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        state
    }

    fn note(&self, pod: &Pod, reason: &str, note: String) {
        if let Some(events) = &self.events {
            let notice = Notice {
                regarding: pod_reference(pod),
                warning: true,
                reason: reason.to_owned(),
                action: "Evict".to_owned(),
                note,
            };
            audit::notify(events, notice, &self.metrics);
        }
    }
}

/// "30s", "10m", "1h30m" back from a duration.
pub fn humanize(d: Duration) -> String {
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if s > 0 || out.is_empty() {
        out.push_str(&format!("{s}s"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::entered::Entry;
    use crate::policy::crd::{ImmutabilityPolicySpec, Match, Mode, ReplaceTainted};
    use std::time::SystemTime;

    fn policy(name: &str, after: Option<&str>, bare: BarePods, exec: Action) -> CompiledPolicy {
        let mut spec = ImmutabilityPolicySpec {
            mode: Mode::Audit,
            ..Default::default()
        };
        spec.runtime.exec = exec;
        spec.runtime.replace_tainted = after.map(|a| ReplaceTainted {
            after: a.into(),
            bare_pods: bare,
        });
        CompiledPolicy::from_spec(name.into(), &spec).unwrap()
    }

    #[test]
    fn the_annotation_says_when_who_and_what() {
        let entered = Entered {
            namespace: "ns".into(),
            pod: "web".into(),
            entry: Entry::Exec,
            container: Some("app".into()),
            user: "oncall".into(),
            policies: vec![("prod".into(), "exempted")],
            at: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_500),
        };
        let taint = Taint::from_entered(&entered);
        let text = serde_json::to_string(&taint).unwrap();
        assert_eq!(
            text,
            r#"{"at":"2023-11-14T22:13:20Z","by":"oncall","action":"exec","container":"app","policies":{"prod":"exempted"}}"#
        );
        assert_eq!(Taint::parse(&text), Some(taint.clone()));
        assert_eq!(
            taint.describe(),
            "exec by oncall into container \"app\" at 2023-11-14T22:13:20Z"
        );
        assert_eq!(
            SystemTime::from(taint.at().unwrap()),
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
        );
        assert_eq!(Taint::parse("not json"), None);
    }

    #[test]
    fn the_strictest_replacement_applies() {
        let policies = [
            policy("slow", Some("10m"), BarePods::Report, Action::Deny),
            policy("fast", Some("30s"), BarePods::Report, Action::Deny),
            policy("bare", Some("1h"), BarePods::Evict, Action::Deny),
            policy("allows-exec", Some("1s"), BarePods::Report, Action::Allow),
            policy("report-only", None, BarePods::Report, Action::Deny),
        ];
        assert_eq!(
            plan(&policies, "ns", None, "exec"),
            Some(Plan {
                after: Duration::from_secs(30),
                evict_bare: true
            })
        );
        assert_eq!(
            plan(&policies[4..], "ns", None, "exec"),
            None,
            "no replaceTainted: reported only"
        );
        let mut excluded = ImmutabilityPolicySpec {
            match_: Match {
                exclude_namespaces: vec!["ns".into()],
                ..Default::default()
            },
            ..Default::default()
        };
        excluded.runtime.replace_tainted = Some(ReplaceTainted {
            after: "1s".into(),
            bare_pods: BarePods::Evict,
        });
        let excluded = CompiledPolicy::from_spec("elsewhere".into(), &excluded).unwrap();
        assert_eq!(plan(&[excluded], "ns", None, "exec"), None);
    }

    #[test]
    fn durations_read_back_as_written() {
        for (secs, text) in [
            (30, "30s"),
            (600, "10m"),
            (5400, "1h30m"),
            (0, "0s"),
            (3601, "1h1s"),
        ] {
            assert_eq!(humanize(Duration::from_secs(secs)), text);
        }
    }

    #[test]
    fn a_new_state_kind_is_a_change_a_new_attempt_is_not() {
        let states = Replacements::default();
        let held = |attempts| Replacement::HeldBack {
            since: Timestamp::UNIX_EPOCH,
            attempts,
            message: "budget".into(),
        };
        assert!(states.set("a", held(1)));
        assert!(!states.set("a", held(2)));
        assert_eq!(states.get("a"), Some(held(2)));
        assert!(states.set(
            "a",
            Replacement::Evicted {
                at: Timestamp::UNIX_EPOCH
            }
        ));
        states.retain(|uid| uid != "a");
        assert_eq!(states.get("a"), None);
    }
}
