//! Keeps the policy store in step with the cluster: ImmutabilityPolicies (compiled, with their
//! status reported) and namespace labels (metadata only). When the API server goes away the
//! watchers retry with backoff and the last known policies keep serving.

use std::collections::{BTreeMap, HashMap};
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

use super::{CompiledPolicy, ImmutabilityPolicy, PolicyError, PolicyStore, refs};
use crate::audit::Metrics;
use crate::audit::metrics::PolicyLabels;

/// Both watchers must finish their first list before fixity reports ready.
const SYNCED_ALL: u8 = 0b11;
/// How often referenced key material is read again.
const REFRESH: Duration = Duration::from_secs(60);

/// Whether the policy watcher has finished its first list.
fn policies_synced(synced: &AtomicU8) -> bool {
    synced.load(Ordering::Acquire) & 0b01 != 0
}

/// Runs both watchers until the process ends.
pub async fn run(client: Client, store: Arc<PolicyStore>, metrics: Arc<Metrics>) {
    let synced = Arc::new(AtomicU8::new(0));
    let policies = watch_policies(client.clone(), store.clone(), metrics, synced.clone());
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
) {
    let api: Api<ImmutabilityPolicy> = Api::all(client.clone());
    let mut known: BTreeMap<String, ImmutabilityPolicy> = BTreeMap::new();
    let mut listing: Option<BTreeMap<String, ImmutabilityPolicy>> = None;
    let mut events = resilient(
        watcher::watcher(api.clone(), watcher::Config::default()),
        "policy",
    );
    // Referenced Secrets and ConfigMaps are not watched; re-reading them each minute picks
    // up a rotated key without giving fixity a watch on every Secret in the cluster.
    let mut refresh = tokio::time::interval(REFRESH);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let event = tokio::select! {
            event = events.next() => match event {
                Some(event) => event,
                None => return,
            },
            _ = refresh.tick() => {
                if policies_synced(&synced) && known.values().any(|p| refs::has_refs(&p.spec)) {
                    publish(&api, &client, &known, &store, &metrics).await;
                }
                continue;
            }
        };
        match event {
            Event::Init => listing = Some(BTreeMap::new()),
            Event::InitApply(p) => {
                if let Some(l) = listing.as_mut() {
                    l.insert(p.name_any(), p);
                }
            }
            Event::InitDone => {
                known = listing.take().unwrap_or_default();
                publish(&api, &client, &known, &store, &metrics).await;
                mark_synced(&store, &synced, 0b01);
            }
            Event::Apply(p) => {
                known.insert(p.name_any(), p);
                publish(&api, &client, &known, &store, &metrics).await;
            }
            Event::Delete(p) => {
                known.remove(&p.name_any());
                publish(&api, &client, &known, &store, &metrics).await;
            }
        }
    }
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

/// Compiles every known policy, puts the valid ones in force and reports each one's state in
/// its status. An invalid policy is left out whole.
async fn publish(
    api: &Api<ImmutabilityPolicy>,
    client: &Client,
    known: &BTreeMap<String, ImmutabilityPolicy>,
    store: &PolicyStore,
    metrics: &Metrics,
) {
    let mut valid = Vec::new();
    let mut problems = Vec::new();
    for policy in known.values() {
        let spec = if refs::has_refs(&policy.spec) {
            refs::resolve(client, &policy.spec).await
        } else {
            Ok(policy.spec.clone())
        };
        let compiled = spec
            .map_err(PolicyError::Reference)
            .and_then(|spec| CompiledPolicy::from_spec(policy.name_any(), &spec));
        match compiled {
            Ok(compiled) => {
                valid.push(compiled);
                problems.push((policy, None));
            }
            Err(e) => {
                tracing::warn!(policy = %policy.name_any(), error = %e, "invalid ImmutabilityPolicy ignored");
                problems.push((policy, Some(e.to_string())));
            }
        }
    }
    let (ready, invalid) = (valid.len(), problems.len() - valid.len());
    // In force first, reported second: Ready=True means requests already see the policy.
    store.replace_policies(valid);
    metrics
        .policies
        .get_or_create(&PolicyLabels { state: "ready" })
        .set(ready as i64);
    metrics
        .policies
        .get_or_create(&PolicyLabels { state: "invalid" })
        .set(invalid as i64);
    tracing::info!(ready, invalid, "policies updated");
    for (policy, problem) in problems {
        report_status(api, policy, problem.as_deref()).await;
    }
}

/// Writes the Ready condition when it differs from what the policy already says.
async fn report_status(
    api: &Api<ImmutabilityPolicy>,
    policy: &ImmutabilityPolicy,
    problem: Option<&str>,
) {
    let generation = policy.metadata.generation;
    let (status, reason, message) = match problem {
        None => ("True", "Valid", "the policy is in force".to_owned()),
        Some(p) => (
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
