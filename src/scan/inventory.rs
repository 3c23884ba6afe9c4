//! What the cluster holds: every Pod and every object that carries a pod template, listed page
//! by page and reduced at once to what the rules read (images, pull context, owner, what each
//! container runs). Pods are folded into the workload that owns them (a Deployment's pods
//! through its ReplicaSets, a CronJob's through its Jobs), so a report has one entry per
//! workload, not one per pod.

use std::collections::{BTreeMap, HashMap};

use kube::api::{Api, ApiResource, DynamicObject, ListParams};
use kube::{Client, ResourceExt};
use serde::Deserialize;

use crate::admission::intent::{ExtractError, read_workload};
use crate::admission::review::PodCarrier;
use crate::policy::evaluate::ImageUse;
use crate::verify::credentials::pull_secrets::PullContext;

/// Objects asked for per list request unless told otherwise: large enough for few round trips,
/// small enough that one page of pods stays a few megabytes while it is decoded.
pub const PAGE: u32 = 250;
/// Times one kind's list starts over after its continue token expired (410) before the scan
/// gives up; a list that never completes is an error, never a partial inventory.
const RESTARTS: usize = 3;

/// The kinds the scanner lists: a Pod and every kind that carries a pod template.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Deployment,
    StatefulSet,
    DaemonSet,
    ReplicaSet,
    CronJob,
    Job,
    ReplicationController,
    PodTemplate,
    Pod,
}

impl Kind {
    pub const ALL: [Kind; 9] = [
        Kind::Deployment,
        Kind::StatefulSet,
        Kind::DaemonSet,
        Kind::ReplicaSet,
        Kind::CronJob,
        Kind::Job,
        Kind::ReplicationController,
        Kind::PodTemplate,
        Kind::Pod,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Deployment => "Deployment",
            Kind::StatefulSet => "StatefulSet",
            Kind::DaemonSet => "DaemonSet",
            Kind::ReplicaSet => "ReplicaSet",
            Kind::CronJob => "CronJob",
            Kind::Job => "Job",
            Kind::ReplicationController => "ReplicationController",
            Kind::PodTemplate => "PodTemplate",
            Kind::Pod => "Pod",
        }
    }

    pub fn group(self) -> &'static str {
        match self {
            Kind::Deployment | Kind::StatefulSet | Kind::DaemonSet | Kind::ReplicaSet => "apps",
            Kind::CronJob | Kind::Job => "batch",
            Kind::ReplicationController | Kind::PodTemplate | Kind::Pod => "",
        }
    }

    pub fn api_version(self) -> &'static str {
        match self.group() {
            "apps" => "apps/v1",
            "batch" => "batch/v1",
            _ => "v1",
        }
    }

    fn plural(self) -> &'static str {
        match self {
            Kind::Deployment => "deployments",
            Kind::StatefulSet => "statefulsets",
            Kind::DaemonSet => "daemonsets",
            Kind::ReplicaSet => "replicasets",
            Kind::CronJob => "cronjobs",
            Kind::Job => "jobs",
            Kind::ReplicationController => "replicationcontrollers",
            Kind::PodTemplate => "podtemplates",
            Kind::Pod => "pods",
        }
    }

    fn resource(self) -> ApiResource {
        ApiResource {
            group: self.group().to_owned(),
            version: "v1".to_owned(),
            api_version: self.api_version().to_owned(),
            kind: self.as_str().to_owned(),
            plural: self.plural().to_owned(),
        }
    }

    fn from_owner(api_version: &str, kind: &str) -> Option<Self> {
        Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == kind && k.api_version() == api_version)
    }

    fn carrier(self) -> PodCarrier {
        // Every kind listed here carries pods; the fallback is never taken.
        PodCarrier::for_kind(self.group(), self.as_str()).unwrap_or(PodCarrier::Pod)
    }
}

/// An object, by what reports name it with.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// What a container of a running pod runs, from `status.*containerStatuses[].imageID`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running {
    pub container: String,
    pub image_id: String,
}

/// A pod that runs (or will): not yet Succeeded or Failed.
#[derive(Debug, Clone)]
pub struct PodState {
    pub object: ObjectRef,
    pub images: Vec<ImageUse>,
    pub running: Vec<Running>,
    /// The `fixity.dev/tainted` annotation, as written.
    pub taint: Option<String>,
    /// No controller owns it: nothing would recreate it.
    pub bare: bool,
}

/// One entry of a report: a workload with its own template, and the pods it runs.
#[derive(Debug, Clone)]
pub struct Workload {
    pub object: ObjectRef,
    /// The template's images; `None` for a bare pod, whose images are its pod's.
    pub template: Option<Vec<ImageUse>>,
    pub pull: PullContext,
    pub pods: Vec<PodState>,
    /// The object could not be read as its kind (never expected of what the API server stored).
    pub unreadable: Option<String>,
}

/// Everything the scanner judges, by namespace.
#[derive(Debug, Default)]
pub struct Inventory {
    pub workloads: Vec<Workload>,
    /// Objects listed, pods included.
    pub objects: usize,
    /// List requests answered (pages read).
    pub pages: usize,
}

/// Why the cluster could not be listed.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error("listing {kind}: {source}")]
    Api {
        kind: &'static str,
        source: kube::Error,
    },
    #[error(
        "listing {kind}: the continue token expired {times} times in a row; the list never completed"
    )]
    Expired { kind: &'static str, times: usize },
}

/// One listed object, reduced.
struct Listed {
    object: ObjectRef,
    /// The controlling owner's uid, if it is of a kind the scanner lists.
    owner: Option<String>,
    /// A controlling owner of another kind (an operator's custom resource).
    foreign_owner: bool,
    read: Result<(Vec<ImageUse>, PullContext), ExtractError>,
    pod: Option<(Vec<Running>, Option<String>, bool)>,
}

/// Lists every kind across the cluster, `page` objects per request. `namespace` limits it to
/// one namespace.
pub async fn collect(
    client: &Client,
    namespace: Option<&str>,
    page: u32,
) -> Result<Inventory, ListError> {
    let mut listed = Vec::new();
    let mut pages = 0;
    for kind in Kind::ALL {
        let resource = kind.resource();
        let api: Api<DynamicObject> = match namespace {
            Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
            None => Api::all_with(client.clone(), &resource),
        };
        pages += list_kind(&api, kind, page, &mut listed).await?;
    }
    let mut inventory = fold(listed);
    inventory.pages = pages;
    Ok(inventory)
}

/// Reads every page of one kind into `listed`, yielding between pages (decoding a page is the
/// longest the scan holds its thread). A continue token that expired (410: the snapshot it
/// continued was compacted away) starts the kind's list over, dropping what was read of it:
/// the rest of an expired list is no longer one consistent snapshot. Returns the pages read.
async fn list_kind(
    api: &Api<DynamicObject>,
    kind: Kind,
    page: u32,
    listed: &mut Vec<Listed>,
) -> Result<usize, ListError> {
    let first = listed.len();
    let mut pages = 0;
    let mut expired = 0;
    let mut params = ListParams::default().limit(page.max(1));
    loop {
        let list = match api.list(&params).await {
            Ok(list) => list,
            Err(kube::Error::Api(status))
                if status.code == 410 && params.continue_token.is_some() =>
            {
                expired += 1;
                if expired > RESTARTS {
                    return Err(ListError::Expired {
                        kind: kind.plural(),
                        times: expired,
                    });
                }
                tracing::info!(
                    kind = kind.plural(),
                    "continue token expired; listing again"
                );
                listed.truncate(first);
                params = ListParams::default().limit(page.max(1));
                continue;
            }
            Err(source) => {
                return Err(ListError::Api {
                    kind: kind.plural(),
                    source,
                });
            }
        };
        pages += 1;
        listed.extend(list.items.iter().filter_map(|o| reduce(kind, o)));
        match list.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => return Ok(pages),
        }
        tokio::task::yield_now().await;
    }
}

fn reduce(kind: Kind, object: &DynamicObject) -> Option<Listed> {
    let namespace = object.namespace().unwrap_or_default();
    let reference = ObjectRef {
        kind,
        namespace: namespace.clone(),
        name: object.name_any(),
        uid: object.uid().unwrap_or_default(),
    };
    let pod = if kind == Kind::Pod {
        let phase = object
            .data
            .pointer("/status/phase")
            .and_then(|p| p.as_str())
            .unwrap_or_default();
        if matches!(phase, "Succeeded" | "Failed") {
            return None;
        }
        let taint = object.annotations().get(super::taint::ANNOTATION).cloned();
        Some((running(&object.data), taint))
    } else {
        None
    };
    let controller = object
        .owner_references()
        .iter()
        .find(|o| o.controller == Some(true));
    let known_owner = controller.filter(|o| Kind::from_owner(&o.api_version, &o.kind).is_some());
    let text = serde_json::to_string(object).unwrap_or_default();
    Some(Listed {
        object: reference,
        owner: known_owner.map(|o| o.uid.clone()),
        foreign_owner: controller.is_some() && known_owner.is_none(),
        read: read_workload(kind.carrier(), &namespace, &text),
        pod: pod.map(|(running, taint)| (running, taint, controller.is_none())),
    })
}

/// Every container status that names what it runs.
fn running(data: &serde_json::Value) -> Vec<Running> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Status {
        #[serde(default)]
        name: String,
        #[serde(default, rename = "imageID")]
        image_id: String,
    }
    let mut out = Vec::new();
    for field in [
        "initContainerStatuses",
        "containerStatuses",
        "ephemeralContainerStatuses",
    ] {
        let Some(list) = data.pointer(&format!("/status/{field}")) else {
            continue;
        };
        let statuses: Vec<Status> = serde_json::from_value(list.clone()).unwrap_or_default();
        out.extend(
            statuses
                .into_iter()
                .filter(|s| !s.image_id.is_empty())
                .map(|s| Running {
                    container: s.name,
                    image_id: s.image_id,
                }),
        );
    }
    out
}

/// Folds pods and intermediate controllers (ReplicaSets of Deployments, Jobs of CronJobs)
/// into the outermost owner the scanner knows.
fn fold(listed: Vec<Listed>) -> Inventory {
    let objects = listed.len();
    let owners: HashMap<String, Option<String>> = listed
        .iter()
        .filter(|l| l.object.kind != Kind::Pod)
        .map(|l| (l.object.uid.clone(), l.owner.clone()))
        .collect();
    // The outermost known owner of a uid; chains are short (pod -> ReplicaSet -> Deployment)
    // and a loop in owner references (never written by a controller) stops at the bound.
    let root = |start: &str| {
        let mut current = start.to_owned();
        for _ in 0..8 {
            match owners.get(&current) {
                Some(Some(up)) if owners.contains_key(up) => current = up.clone(),
                _ => break,
            }
        }
        current
    };
    let mut workloads: BTreeMap<String, Workload> = BTreeMap::new();
    let mut pods: Vec<(String, PodState, PullContext)> = Vec::new();
    for l in listed {
        let owned = l.owner.as_deref().is_some_and(|o| owners.contains_key(o));
        let (images, pull, unreadable) = match l.read {
            Ok((images, pull)) => (images, pull, None),
            Err(e) => (
                Vec::new(),
                PullContext {
                    namespace: l.object.namespace.clone(),
                    ..PullContext::default()
                },
                Some(e.to_string()),
            ),
        };
        match l.pod {
            Some((running, taint, bare)) => {
                let state = PodState {
                    object: l.object.clone(),
                    images,
                    running,
                    taint,
                    bare: bare && !l.foreign_owner,
                };
                if owned {
                    let owner = l.owner.as_deref().map(root).unwrap_or_default();
                    pods.push((owner, state, pull));
                } else {
                    workloads.insert(
                        l.object.uid.clone(),
                        Workload {
                            object: l.object,
                            template: None,
                            pull,
                            pods: vec![state],
                            unreadable,
                        },
                    );
                }
            }
            // An intermediate controller is judged through its owner's template and its pods.
            None if owned => {}
            None => {
                workloads.insert(
                    l.object.uid.clone(),
                    Workload {
                        object: l.object,
                        template: Some(images),
                        pull,
                        pods: Vec::new(),
                        unreadable,
                    },
                );
            }
        }
    }
    for (owner, pod, pull) in pods {
        match workloads.get_mut(&owner) {
            Some(w) => w.pods.push(pod),
            // Its owner chain ends in an object that is itself folded away: keep the pod.
            None => {
                workloads.insert(
                    pod.object.uid.clone(),
                    Workload {
                        object: pod.object.clone(),
                        template: None,
                        pull,
                        pods: vec![pod],
                        unreadable: None,
                    },
                );
            }
        }
    }
    let mut workloads: Vec<Workload> = workloads.into_values().collect();
    workloads.sort_by(|a, b| a.object.cmp(&b.object));
    for w in &mut workloads {
        w.pods.sort_by(|a, b| a.object.name.cmp(&b.object.name));
    }
    Inventory {
        workloads,
        objects,
        pages: 0,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use axum::http::{Request, Response};
    use bytes::Bytes;
    use http_body_util::Full;
    use serde_json::json;

    use super::*;

    fn object(
        kind: Kind,
        name: &str,
        owner: Option<(Kind, &str)>,
        spec: serde_json::Value,
    ) -> DynamicObject {
        let mut value = json!({
            "apiVersion": kind.api_version(),
            "kind": kind.as_str(),
            "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}")},
        });
        if let Some((owner_kind, owner)) = owner {
            value["metadata"]["ownerReferences"] = json!([{
                "apiVersion": owner_kind.api_version(), "kind": owner_kind.as_str(),
                "name": owner, "uid": format!("uid-{owner}"), "controller": true
            }]);
        }
        for (k, v) in spec.as_object().cloned().unwrap_or_default() {
            value[k] = v;
        }
        serde_json::from_value(value).unwrap()
    }

    fn template(image: &str) -> serde_json::Value {
        json!({"spec": {"template": {"spec": {"containers": [{"name": "app", "image": image}]}}}})
    }

    fn pod_spec(image: &str, phase: &str) -> serde_json::Value {
        json!({
            "spec": {"containers": [{"name": "app", "image": image}], "serviceAccountName": "builder"},
            "status": {"phase": phase, "containerStatuses": [
                {"name": "app", "imageID": "docker.io/library/nginx@sha256:00"},
                {"name": "other", "imageID": ""}
            ]}
        })
    }

    fn listed(objects: &[(Kind, DynamicObject)]) -> Inventory {
        fold(objects.iter().filter_map(|(k, o)| reduce(*k, o)).collect())
    }

    #[test]
    fn pods_fold_into_the_outermost_owner() {
        let inventory = listed(&[
            (
                Kind::Deployment,
                object(Kind::Deployment, "web", None, template("nginx:1")),
            ),
            (
                Kind::ReplicaSet,
                object(
                    Kind::ReplicaSet,
                    "web-1",
                    Some((Kind::Deployment, "web")),
                    template("nginx:1"),
                ),
            ),
            (
                Kind::Pod,
                object(
                    Kind::Pod,
                    "web-1-a",
                    Some((Kind::ReplicaSet, "web-1")),
                    pod_spec("nginx:1", "Running"),
                ),
            ),
            (
                Kind::Pod,
                object(
                    Kind::Pod,
                    "web-1-b",
                    Some((Kind::ReplicaSet, "web-1")),
                    pod_spec("nginx:1", "Pending"),
                ),
            ),
            (
                Kind::Pod,
                object(
                    Kind::Pod,
                    "web-1-done",
                    Some((Kind::ReplicaSet, "web-1")),
                    pod_spec("nginx:1", "Succeeded"),
                ),
            ),
            (
                Kind::Pod,
                object(Kind::Pod, "loner", None, pod_spec("busybox", "Running")),
            ),
            (
                Kind::ReplicaSet,
                object(
                    Kind::ReplicaSet,
                    "orphan",
                    Some((Kind::Deployment, "gone")),
                    template("a:1"),
                ),
            ),
        ]);
        assert_eq!(inventory.objects, 6, "the finished pod is not counted");
        let names: Vec<(Kind, &str, usize)> = inventory
            .workloads
            .iter()
            .map(|w| (w.object.kind, w.object.name.as_str(), w.pods.len()))
            .collect();
        assert_eq!(
            names,
            vec![
                (Kind::Deployment, "web", 2),
                (Kind::ReplicaSet, "orphan", 0),
                (Kind::Pod, "loner", 1)
            ]
        );
        let web = &inventory.workloads[0];
        assert_eq!(web.template.as_ref().map(Vec::len), Some(1));
        assert!(!web.pods[0].bare);
        assert_eq!(
            web.pods[0].running,
            vec![Running {
                container: "app".into(),
                image_id: "docker.io/library/nginx@sha256:00".into()
            }]
        );
        let loner = &inventory.workloads[2];
        assert!(loner.template.is_none() && loner.pods[0].bare);
        assert_eq!(loner.pull.service_account.as_deref(), Some("builder"));
    }

    #[test]
    fn a_pod_of_an_unknown_controller_is_its_own_entry_but_not_bare() {
        let mut pod = object(Kind::Pod, "db-0", None, pod_spec("postgres:16", "Running"));
        pod.metadata.owner_references = Some(vec![
            k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                api_version: "example.com/v1".into(),
                kind: "Database".into(),
                name: "db".into(),
                uid: "uid-db".into(),
                controller: Some(true),
                ..Default::default()
            },
        ]);
        let inventory = listed(&[(Kind::Pod, pod)]);
        assert_eq!(inventory.workloads.len(), 1);
        assert!(
            !inventory.workloads[0].pods[0].bare,
            "its operator recreates it"
        );
    }
    /// A fake API server for the list logic alone: `pods` pods, served `limit` at a time, whose
    /// continue tokens are refused with 410 for the first `expire` continued requests. Every
    /// other kind is empty. It records the `continue` of each pod list request.
    fn fake_api(pods: usize, expire: usize) -> (Client, Arc<Mutex<Vec<Option<String>>>>) {
        let asked = Arc::new(Mutex::new(Vec::new()));
        let expired = Arc::new(AtomicUsize::new(0));
        let seen = asked.clone();
        let service = tower::service_fn(move |request: Request<kube::client::Body>| {
            let (seen, expired) = (seen.clone(), expired.clone());
            async move {
                let uri = request.uri().clone();
                let query: HashMap<String, String> = uri
                    .query()
                    .unwrap_or_default()
                    .split('&')
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect();
                let limit: usize = query
                    .get("limit")
                    .and_then(|l| l.parse().ok())
                    .unwrap_or(500);
                let token = query.get("continue").cloned();
                let (status, body) = if uri.path() != "/api/v1/pods" {
                    (
                        200,
                        json!({"apiVersion": "v1", "kind": "List", "metadata": {}, "items": []}),
                    )
                } else {
                    seen.lock().unwrap().push(token.clone());
                    if token.is_some() && expired.fetch_add(1, Ordering::SeqCst) < expire {
                        (
                            410,
                            json!({
                                "apiVersion": "v1", "kind": "Status", "status": "Failure",
                                "reason": "Expired", "code": 410,
                                "message": "The provided continue parameter is too old to display a consistent list result."
                            }),
                        )
                    } else {
                        let start: usize = token.and_then(|t| t.parse().ok()).unwrap_or(0);
                        let end = (start + limit).min(pods);
                        let items: Vec<serde_json::Value> = (start..end)
                            .map(|i| {
                                let mut pod = object(
                                    Kind::Pod,
                                    &format!("pod-{i}"),
                                    None,
                                    pod_spec("nginx:1", "Running"),
                                );
                                pod.types = Some(kube::api::TypeMeta {
                                    api_version: "v1".into(),
                                    kind: "Pod".into(),
                                });
                                serde_json::to_value(pod).unwrap()
                            })
                            .collect();
                        let next = if end < pods {
                            end.to_string()
                        } else {
                            String::new()
                        };
                        (
                            200,
                            json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"continue": next}, "items": items}),
                        )
                    }
                };
                Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body.to_string())))
                    .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
            }
        });
        (Client::new(service, "default"), asked)
    }

    #[tokio::test]
    async fn every_page_is_read() {
        let (client, asked) = fake_api(7, 0);
        let inventory = collect(&client, None, 3).await.unwrap();
        assert_eq!(inventory.workloads.len(), 7);
        assert_eq!(inventory.objects, 7);
        // Three pages of pods, one (empty) of each of the other eight kinds.
        assert_eq!(inventory.pages, 3 + 8);
        let tokens = asked.lock().unwrap().clone();
        assert_eq!(tokens, vec![None, Some("3".into()), Some("6".into())]);
    }

    #[tokio::test]
    async fn an_expired_continue_token_lists_the_kind_again() {
        let (client, asked) = fake_api(7, 1);
        let inventory = collect(&client, None, 3).await.unwrap();
        let mut names: Vec<&str> = inventory
            .workloads
            .iter()
            .map(|w| w.object.name.as_str())
            .collect();
        names.sort_unstable();
        let expected: Vec<String> = (0..7).map(|i| format!("pod-{i}")).collect();
        assert_eq!(
            names, expected,
            "every pod once: the first pages were not kept twice"
        );
        assert_eq!(inventory.objects, 7);
        let tokens = asked.lock().unwrap().clone();
        assert_eq!(
            tokens,
            vec![
                None,
                Some("3".into()),
                None,
                Some("3".into()),
                Some("6".into())
            ],
            "the list started over without a continue token"
        );
    }

    #[tokio::test]
    async fn a_list_that_keeps_expiring_fails_the_scan() {
        let (client, _) = fake_api(7, usize::MAX);
        match collect(&client, None, 3).await {
            Err(ListError::Expired {
                kind: "pods",
                times,
            }) => assert_eq!(times, RESTARTS + 1),
            other => panic!("expected the list to fail, got {other:?}"),
        }
    }
}
