//! Keeps the policy store in step with the cluster: ImmutabilityPolicies (compiled, with their
//! status reported) and namespace labels (metadata only). When the API server goes away the
//! watchers retry with backoff and the last known policies keep serving.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use super::{CompiledPolicy, ImmutabilityPolicy, PolicyStore, refs};
use crate::audit::Metrics;
use crate::audit::metrics::PolicyLabels;

/// Both watchers must finish their first list before fixity reports ready.
const SYNCED_ALL: u8 = 0b11;
/// How often referenced key material is read again, unless told otherwise.
pub const REFRESH: Duration = Duration::from_secs(60);

/// Whether the policy watcher has finished its first list.
fn policies_synced(synced: &AtomicU8) -> bool {
    synced.load(Ordering::Acquire) & 0b01 != 0
}

/// Runs both watchers until the process ends; referenced keys and trust roots are read again
/// every `refresh`.
pub async fn run(
    client: Client,
    store: Arc<PolicyStore>,
    metrics: Arc<Metrics>,
    refresh: Duration,
) {
    let synced = Arc::new(AtomicU8::new(0));
    let policies = watch_policies(
        client.clone(),
        store.clone(),
        metrics,
        synced.clone(),
        refresh,
    );
    let namespaces = watch_namespaces(client, store, synced);
    tokio::join!(policies, namespaces);
}

fn mark_synced(store: &PolicyStore, synced: &AtomicU8, bit: u8) {
    if synced.fetch_or(bit, Ordering::AcqRel) | bit == SYNCED_ALL && !store.is_ready() {
        store.mark_ready();
        tracing::info!("policies and namespaces synced; ready");
    }
}

async fn watch_policies(
    client: Client,
    store: Arc<PolicyStore>,
    metrics: Arc<Metrics>,
    synced: Arc<AtomicU8>,
    refresh: Duration,
) {
    let api: Api<ImmutabilityPolicy> = Api::all(client.clone());
    let reader = refs::ApiReader(client);
    let mut copies = refs::RefCache::default();
    let mut known: BTreeMap<String, ImmutabilityPolicy> = BTreeMap::new();
    let mut listing: Option<BTreeMap<String, ImmutabilityPolicy>> = None;
    let mut events = resilient(
        watcher::watcher(api.clone(), watcher::Config::default()),
        "policy",
    );
    // Referenced Secrets and ConfigMaps are not watched; re-reading them each minute picks
    // up a rotated key without giving fixity a watch on every Secret in the cluster.
    let mut refresh = tokio::time::interval(refresh);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let wake = tokio::select! {
            event = events.next() => match event {
                Some(event) => Wake::Event(event),
                None => return,
            },
            _ = refresh.tick() => Wake::Refresh,
        };
        let synced_now = matches!(wake, Wake::Event(Event::InitDone));
        match wake {
            Wake::Refresh => {
                let referencing = known
                    .values()
                    .any(|p| refs::targets(&p.spec).next().is_some());
                if !policies_synced(&synced) || !referencing {
                    continue;
                }
            }
            Wake::Event(Event::Init) => {
                listing = Some(BTreeMap::new());
                continue;
            }
            Wake::Event(Event::InitApply(p)) => {
                if let Some(l) = listing.as_mut() {
                    l.insert(p.name_any(), p);
                }
                continue;
            }
            Wake::Event(Event::InitDone) => known = listing.take().unwrap_or_default(),
            Wake::Event(Event::Apply(p)) => {
                known.insert(p.name_any(), p);
            }
            Wake::Event(Event::Delete(p)) => {
                known.remove(&p.name_any());
            }
        }
        let data = copies
            .read_all(&reader, known.values().map(|p| &p.spec))
            .await;
        publish(&api, &known, &data, &store, &metrics).await;
        if synced_now {
            mark_synced(&store, &synced, 0b01);
        }
    }
}

/// What woke the policy watcher; lives for one turn of the loop, so its size is no concern.
#[allow(clippy::large_enum_variant)]
enum Wake {
    Event(Event<ImmutabilityPolicy>),
    /// Time to read the referenced Secrets and ConfigMaps again.
    Refresh,
}

/// The events of a watch, retried with backoff when the API server goes away; the state built
/// from earlier events stays in force meanwhile.
fn resilient<K: Send + 'static>(
    events: impl Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static,
    what: &'static str,
) -> BoxStream<'static, Event<K>> {
    events
        .default_backoff()
        .filter_map(move |result| async move {
            result
                .inspect_err(|e| {
                    tracing::warn!(error = %e, "{what} watch interrupted; keeping the last known state")
                })
                .ok()
        })
        .boxed()
}

/// What a policy's status says.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// In force, every reference read.
    Ready,
    /// In force, but the images some rules cover are denied until these can be read.
    Degraded(Vec<String>),
    /// Not in force, and why.
    Invalid(String),
}

/// Compiles every known policy with the referenced data read for them, puts the valid ones in
/// force and reports each one's state in its status. An invalid policy is left out whole; one
/// whose references cannot be read stays in force without them.
async fn publish(
    api: &Api<ImmutabilityPolicy>,
    known: &BTreeMap<String, ImmutabilityPolicy>,
    refs: &refs::RefData,
    store: &PolicyStore,
    metrics: &Metrics,
) {
    let (valid, states) = compile_all(known, refs);
    let count = |f: fn(&State) -> bool| states.iter().filter(|(_, s)| f(s)).count();
    let ready = count(|s| *s == State::Ready);
    let degraded = count(|s| matches!(s, State::Degraded(_)));
    let invalid = count(|s| matches!(s, State::Invalid(_)));
    // In force first, reported second: Ready=True means requests already see the policy.
    store.replace_policies(valid);
    store.note_sources(sources_fingerprint(known, refs));
    for (state, n) in [
        ("ready", ready),
        ("degraded", degraded),
        ("invalid", invalid),
    ] {
        metrics
            .policies
            .get_or_create(&PolicyLabels { state })
            .set(n as i64);
    }
    tracing::info!(ready, degraded, invalid, "policies updated");
    for (policy, state) in states {
        report_status(api, policy, &state).await;
    }
}

/// The policies to put in force, and every known policy's state.
fn compile_all<'k>(
    known: &'k BTreeMap<String, ImmutabilityPolicy>,
    refs: &refs::RefData,
) -> (Vec<CompiledPolicy>, Vec<(&'k ImmutabilityPolicy, State)>) {
    let mut valid = Vec::new();
    let mut states = Vec::new();
    for policy in known.values() {
        match CompiledPolicy::from_cluster(policy.name_any(), &policy.spec, refs) {
            Ok(compiled) => {
                let unreadable: Vec<String> = compiled.unreadable().map(str::to_owned).collect();
                let state = if unreadable.is_empty() {
                    State::Ready
                } else {
                    tracing::warn!(policy = %policy.name_any(), unreadable = ?unreadable, "ImmutabilityPolicy in force without the references it cannot read; the images they cover are denied");
                    State::Degraded(unreadable)
                };
                valid.push(compiled);
                states.push((policy, state));
            }
            Err(e) => {
                tracing::warn!(policy = %policy.name_any(), error = %e, "invalid ImmutabilityPolicy ignored");
                states.push((policy, State::Invalid(e.to_string())));
            }
        }
    }
    (valid, states)
}

/// A fingerprint of what the policies in force were compiled from: every policy's name and
/// spec, and the referenced data as read. Stale and fresh copies of the same data decide the
/// same way, so only what a copy holds counts.
fn sources_fingerprint(known: &BTreeMap<String, ImmutabilityPolicy>, refs: &refs::RefData) -> u64 {
    let mut sources = std::collections::hash_map::DefaultHasher::new();
    for (name, policy) in known {
        (
            name,
            serde_json::to_string(&policy.spec).unwrap_or_default(),
        )
            .hash(&mut sources);
    }
    for (target, read) in refs {
        let held = match read {
            refs::Read::Fresh(copy) | refs::Read::Stale { copy, .. } => Some(copy),
            refs::Read::Unreadable(_) => None,
        };
        (target, held).hash(&mut sources);
    }
    sources.finish()
}

/// Writes the Ready condition when it differs from what the policy already says.
async fn report_status(api: &Api<ImmutabilityPolicy>, policy: &ImmutabilityPolicy, state: &State) {
    let generation = policy.metadata.generation;
    let (status, reason, message) = match state {
        State::Ready => ("True", "Valid", "the policy is in force".to_owned()),
        State::Degraded(unreadable) => (
            "False",
            "ReferenceUnavailable",
            format!(
                "the policy is in force, but the images its rules cover are denied until these \
                 can be read: {}",
                unreadable.join("; ")
            ),
        ),
        State::Invalid(p) => (
            "False",
            "Invalid",
            format!("the policy is not in force: {p}"),
        ),
    };
    let current = policy.status.as_ref();
    let unchanged = current.is_some_and(|s| {
        s.observed_generation == generation
            && s.conditions.iter().any(|c| {
                c.type_ == "Ready"
                    && c.status == status
                    && c.reason == reason
                    && c.message == message
            })
    });
    if unchanged {
        return;
    }
    let patch = json!({
        "status": {
            "observedGeneration": generation,
            "conditions": [{
                "type": "Ready",
                "status": status,
                "reason": reason,
                "message": message,
                "observedGeneration": generation,
                "lastTransitionTime": k8s_openapi::jiff::Timestamp::now().to_string(),
            }]
        }
    });
    if let Err(e) = api
        .patch_status(
            &policy.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        tracing::warn!(policy = %policy.name_any(), error = %e, "could not update policy status");
    }
}

async fn watch_namespaces(client: Client, store: Arc<PolicyStore>, synced: Arc<AtomicU8>) {
    // Metadata only: labels are all the selectors need, and namespaces can be many.
    let api: Api<PartialObjectMeta<Namespace>> = Api::all(client);
    let mut listing: Option<HashMap<String, BTreeMap<String, String>>> = None;
    let mut events = resilient(
        watcher::watcher(api, watcher::Config::default()),
        "namespace",
    );
    while let Some(event) = events.next().await {
        match event {
            Event::Init => listing = Some(HashMap::new()),
            Event::InitApply(ns) => {
                if let Some(l) = listing.as_mut() {
                    l.insert(ns.name_any(), ns.labels().clone());
                }
            }
            Event::InitDone => {
                store.replace_namespaces(listing.take().unwrap_or_default());
                mark_synced(&store, &synced, 0b10);
            }
            Event::Apply(ns) => store.set_namespace(ns.name_any(), ns.labels().clone()),
            Event::Delete(ns) => store.remove_namespace(&ns.name_any()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::refs::Read;
    use crate::policy::refs::tests::{secret, spec_with_secret};

    /// The scanner rescans when the fingerprint moves: a rotated key moves it, the same key
    /// served from a stale copy (the API server away for a while) does not.
    #[test]
    fn the_sources_fingerprint_follows_what_decides() {
        let known = BTreeMap::from([(
            "p".to_owned(),
            ImmutabilityPolicy::new("p", spec_with_secret("release")),
        )]);
        let with =
            |read: Read| sources_fingerprint(&known, &BTreeMap::from([(secret("release"), read)]));
        let fresh = with(Read::Fresh("key one".into()));
        assert_eq!(
            fresh,
            with(Read::Stale {
                copy: "key one".into(),
                why: "timeout".into()
            })
        );
        assert_ne!(fresh, with(Read::Fresh("key two".into())));
        assert_ne!(fresh, with(Read::Unreadable("gone".into())));
        let mut edited = known.clone();
        if let Some(p) = edited.get_mut("p") {
            p.spec.images.require_digest = !p.spec.images.require_digest;
        }
        assert_ne!(
            fresh,
            sources_fingerprint(
                &edited,
                &BTreeMap::from([(secret("release"), Read::Fresh("key one".into()))])
            )
        );
    }
}
