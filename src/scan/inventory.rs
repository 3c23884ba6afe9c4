//! What the cluster holds: every Pod and every object that carries a pod template, listed page
//! by page and reduced at once to what the rules read (images, pull context, owner, what each
//! container runs). Pods are folded into the workload that owns them (a Deployment's pods
//! through its ReplicaSets, a CronJob's through its Jobs), so a report has one entry per
//! workload, not one per pod.
//!
//! A page is read once, as the text the API server sent: kube builds the request
//! (`Request::list`, the same `ListParams` and continue token as `Api::list`) and
//! `Client::request_text` returns the body, which is parsed into its `metadata.continue` and
//! its `items`, each kept as a borrowed `RawValue` slice. Each item is then read from its own
//! text twice, by two borrowed readers that skip what they do not need: a small struct for
//! the metadata and pod status the scan keeps (namespace, name, uid, the taint annotation,
//! the controlling owner, the phase and the container statuses' imageIDs), and the review's
//! own pod spec reader (`read_workload`). No object becomes a `serde_json::Value` tree:
//! decoding pages into `DynamicObject`s, writing each back to text for the spec reader and
//! cloning its status lists cost three passes and a tree per pod (managedFields included) on
//! the scan thread, which shares the machine's cores with admission.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

use kube::api::{ApiResource, DynamicObject, ListParams};
use kube::core::Request;
use kube::{Client, Resource};
use serde::Deserialize;
use serde_json::value::RawValue;

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
    #[error("listing {kind}: the answer is not a list of objects: {source}")]
    Page {
        kind: &'static str,
        source: serde_json::Error,
    },
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
        let path = DynamicObject::url_path(&kind.resource(), namespace);
        pages += list_kind(client, &Request::new(path), kind, page, &mut listed).await?;
    }
    let mut inventory = fold(listed);
    inventory.pages = pages;
    Ok(inventory)
}

/// Reads every page of one kind into `listed`, yielding between pages (reading a page is the
/// longest the scan holds its thread). A continue token that expired (410: the snapshot it
/// continued was compacted away) starts the kind's list over, dropping what was read of it:
/// the rest of an expired list is no longer one consistent snapshot. Returns the pages read.
async fn list_kind(
    client: &Client,
    request: &Request,
    kind: Kind,
    page: u32,
    listed: &mut Vec<Listed>,
) -> Result<usize, ListError> {
    let first = listed.len();
    let mut pages = 0;
    let mut expired = 0;
    let mut params = ListParams::default().limit(page.max(1));
    loop {
        let text = match list_page(client, request, &params).await {
            Ok(text) => text,
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
        let unreadable = |source| ListError::Page {
            kind: kind.plural(),
            source,
        };
        let list: Page<'_> = serde_json::from_str(&text).map_err(unreadable)?;
        for item in list.items {
            if let Some(l) = reduce(kind, item.get()).map_err(unreadable)? {
                listed.push(l);
            }
        }
        match list.metadata.continue_token {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => return Ok(pages),
        }
        tokio::task::yield_now().await;
    }
}

/// One page of a list as the API server wrote it.
async fn list_page(
    client: &Client,
    request: &Request,
    params: &ListParams,
) -> Result<String, kube::Error> {
    let mut http = request.list(params).map_err(kube::Error::BuildRequest)?;
    // Named as kube names its own list requests, for its tracing.
    http.extensions_mut().insert("list");
    client.request_text(http).await
}

/// A list page, read without building a tree: each item stays the text it was sent as.
#[derive(Deserialize)]
struct Page<'a> {
    #[serde(default, borrow)]
    metadata: PageMeta<'a>,
    /// Required: an answer without `items` is not a list. `null` is an empty one.
    #[serde(borrow, deserialize_with = "null_as_empty")]
    items: Vec<&'a RawValue>,
}

#[derive(Deserialize, Default)]
struct PageMeta<'a> {
    #[serde(rename = "continue", default, borrow)]
    continue_token: Option<Cow<'a, str>>,
}

fn null_as_empty<'de, D>(deserializer: D) -> Result<Vec<&'de RawValue>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    Ok(Option::deserialize(deserializer)?.unwrap_or_default())
}

/// What `reduce` reads of a stored object besides its pod spec; every other field is skipped
/// unread.
#[derive(Deserialize)]
struct Stored<'a> {
    #[serde(borrow)]
    metadata: Meta<'a>,
    /// Read only for a pod, and then as [`StatusText`].
    #[serde(default, borrow)]
    status: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Meta<'a> {
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    generate_name: Option<String>,
    #[serde(default)]
    uid: Option<String>,
    #[serde(default)]
    annotations: Option<Annotations>,
    #[serde(default, borrow)]
    owner_references: Option<Vec<Owner<'a>>>,
}

/// The one annotation the scanner reads ([`super::taint::ANNOTATION`]).
#[derive(Deserialize)]
struct Annotations {
    #[serde(rename = "fixity.dev/tainted", default)]
    taint: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Owner<'a> {
    #[serde(borrow)]
    api_version: Cow<'a, str>,
    #[serde(borrow)]
    kind: Cow<'a, str>,
    uid: String,
    #[serde(default)]
    controller: Option<bool>,
}

/// A pod's status, each field kept as text: a field in a shape the kubelet never writes is
/// read as absent on its own, without costing the rest of the status (as does a status that
/// is not an object).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StatusText<'a> {
    #[serde(default, borrow)]
    phase: Option<&'a RawValue>,
    #[serde(default, borrow)]
    init_container_statuses: Option<&'a RawValue>,
    #[serde(default, borrow)]
    container_statuses: Option<&'a RawValue>,
    #[serde(default, borrow)]
    ephemeral_container_statuses: Option<&'a RawValue>,
}

/// Reduces one listed object, written as JSON `text`, to what the rules read; `None` for a
/// pod that no longer runs. Metadata that cannot be read fails the page, as it failed kube's
/// own decoding of it; a pod spec that cannot be read is kept, and reported, as unreadable.
fn reduce(kind: Kind, text: &str) -> Result<Option<Listed>, serde_json::Error> {
    let stored: Stored<'_> = serde_json::from_str(text)?;
    let meta = stored.metadata;
    let namespace = meta.namespace.unwrap_or_default();
    let pod = if kind == Kind::Pod {
        let status: Option<StatusText<'_>> = stored
            .status
            .and_then(|s| serde_json::from_str(s.get()).ok());
        let status = status.as_ref();
        let phase: String = status
            .and_then(|s| s.phase)
            .and_then(|p| serde_json::from_str(p.get()).ok())
            .unwrap_or_default();
        if matches!(phase.as_str(), "Succeeded" | "Failed") {
            return Ok(None);
        }
        let taint = meta.annotations.and_then(|a| a.taint);
        Some((status.map(running).unwrap_or_default(), taint))
    } else {
        None
    };
    let owners = meta.owner_references.unwrap_or_default();
    let controller = owners.iter().find(|o| o.controller == Some(true));
    let known_owner = controller.filter(|o| Kind::from_owner(&o.api_version, &o.kind).is_some());
    Ok(Some(Listed {
        owner: known_owner.map(|o| o.uid.clone()),
        foreign_owner: controller.is_some() && known_owner.is_none(),
        read: read_workload(kind.carrier(), &namespace, text),
        pod: pod.map(|(running, taint)| (running, taint, controller.is_none())),
        object: ObjectRef {
            kind,
            namespace,
            name: meta.name.or(meta.generate_name).unwrap_or_default(),
            uid: meta.uid.unwrap_or_default(),
        },
    }))
}

/// Every container status that names what it runs.
fn running(status: &StatusText<'_>) -> Vec<Running> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Status {
        #[serde(default)]
        name: String,
        #[serde(default, rename = "imageID")]
        image_id: String,
    }
    let mut out = Vec::new();
    for list in [
        status.init_container_statuses,
        status.container_statuses,
        status.ephemeral_container_statuses,
    ]
    .into_iter()
    .flatten()
    {
        let statuses: Vec<Status> = serde_json::from_str(list.get()).unwrap_or_default();
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
    ) -> serde_json::Value {
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
        value
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

    fn listed(objects: &[(Kind, serde_json::Value)]) -> Inventory {
        fold(
            objects
                .iter()
                .filter_map(|(k, o)| reduce(*k, &o.to_string()).unwrap())
                .collect(),
        )
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
        pod["metadata"]["ownerReferences"] = json!([{
            "apiVersion": "example.com/v1", "kind": "Database",
            "name": "db", "uid": "uid-db", "controller": true
        }]);
        let inventory = listed(&[(Kind::Pod, pod)]);
        assert_eq!(inventory.workloads.len(), 1);
        assert!(
            !inventory.workloads[0].pods[0].bare,
            "its operator recreates it"
        );
    }
    /// Objects as the API server writes them (managedFields and all), reduced from their text.
    const POD: &str = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"web-7d-x",
        "generateName":"web-7d-","namespace":"shop","uid":"p-1","resourceVersion":"81",
        "labels":{"app":"web"},"annotations":{"other":"1","fixity.dev/tainted":"{\"by\":\"eve\"}"},
        "ownerReferences":[{"apiVersion":"apps/v1","kind":"ReplicaSet","name":"web-7d",
          "uid":"rs-1","controller":true,"blockOwnerDeletion":true}],
        "managedFields":[{"manager":"kube-controller-manager","operation":"Update",
          "apiVersion":"v1","fieldsType":"FieldsV1","fieldsV1":{"f:metadata":{}}}]},
      "spec":{"serviceAccountName":"web","imagePullSecrets":[{"name":"regcred"}],
        "initContainers":[{"name":"init","image":"busybox@sha256:1111111111111111111111111111111111111111111111111111111111111111"}],
        "containers":[{"name":"app","image":"nginx:1.27"},{"name":"side","image":"envoy:1"}]},
      "status":{"phase":"Running","podIP":"10.0.0.9",
        "initContainerStatuses":[{"name":"init","image":"busybox","imageID":"docker.io/library/busybox@sha256:11"}],
        "containerStatuses":[{"name":"app","ready":true,"imageID":"docker.io/library/nginx@sha256:22"},
          {"name":"side","ready":false,"imageID":""}],
        "ephemeralContainerStatuses":[{"name":"debugger","imageID":"docker.io/library/alpine@sha256:33"}]}}"#;
    const DEPLOYMENT: &str = r#"{"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"web",
        "namespace":"shop","uid":"d-1","managedFields":[]},
      "spec":{"replicas":3,"template":{"metadata":{"labels":{"app":"web"}},
        "spec":{"containers":[{"name":"app","image":"nginx:1.27"}]}}},
      "status":{"replicas":3,"conditions":[{"type":"Available","status":"True"}]}}"#;
    const CRONJOB: &str = r#"{"apiVersion":"batch/v1","kind":"CronJob","metadata":{"name":"nightly",
        "namespace":"ops","uid":"c-1"},
      "spec":{"schedule":"0 3 * * *","jobTemplate":{"spec":{"template":{"spec":{
        "restartPolicy":"OnFailure","containers":[{"name":"backup","image":"restic:0.17"}]}}}}},
      "status":{}}"#;
    const OPERATED: &str = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"db-0",
        "namespace":"data","uid":"p-2","ownerReferences":[
          {"apiVersion":"apps/v1","kind":"ReplicaSet","name":"not-its-controller","uid":"rs-9"},
          {"apiVersion":"example.com/v1","kind":"Database","name":"db","uid":"db-1","controller":true}]},
      "spec":{"containers":[{"name":"pg","image":"postgres:16"}]},
      "status":{"phase":"Pending"}}"#;

    fn reduced(kind: Kind, text: &str) -> Listed {
        match reduce(kind, text) {
            Ok(Some(l)) => l,
            Ok(None) => panic!("{kind:?} was dropped"),
            Err(e) => panic!("{kind:?} was not read: {e}"),
        }
    }

    fn images(l: &Listed) -> Vec<(&str, Option<&str>)> {
        match &l.read {
            Ok((images, _)) => images.iter().map(|i| (i.name(), i.image())).collect(),
            Err(e) => panic!("{:?} unreadable: {e}", l.object),
        }
    }

    #[test]
    fn objects_are_reduced_from_their_text() {
        let pod = reduced(Kind::Pod, POD);
        assert_eq!(
            pod.object,
            ObjectRef {
                kind: Kind::Pod,
                namespace: "shop".into(),
                name: "web-7d-x".into(),
                uid: "p-1".into()
            }
        );
        assert_eq!(pod.owner.as_deref(), Some("rs-1"));
        assert!(!pod.foreign_owner);
        assert_eq!(
            images(&pod),
            vec![
                (
                    "init",
                    Some(
                        "busybox@sha256:1111111111111111111111111111111111111111111111111111111111111111"
                    )
                ),
                ("app", Some("nginx:1.27")),
                ("side", Some("envoy:1"))
            ]
        );
        let Ok((_, pull)) = &pod.read else {
            unreachable!()
        };
        assert_eq!(
            (
                pull.namespace.as_str(),
                pull.secrets.as_slice(),
                pull.service_account.as_deref()
            ),
            ("shop", &["regcred".to_owned()][..], Some("web"))
        );
        let Some((running, taint, bare)) = &pod.pod else {
            panic!("a pod reduces to a pod state")
        };
        let running: Vec<(&str, &str)> = running
            .iter()
            .map(|r| (r.container.as_str(), r.image_id.as_str()))
            .collect();
        assert_eq!(
            running,
            vec![
                ("init", "docker.io/library/busybox@sha256:11"),
                ("app", "docker.io/library/nginx@sha256:22"),
                ("debugger", "docker.io/library/alpine@sha256:33"),
            ],
            "each status list, in order; a status without imageID is skipped"
        );
        let marked =
            serde_json::from_str::<serde_json::Value>(POD).unwrap()["metadata"]["annotations"]
                [crate::scan::taint::ANNOTATION]
                .as_str()
                .map(str::to_owned);
        assert!(marked.is_some(), "the fixture carries the taint annotation");
        assert_eq!(taint, &marked, "the taint mark, unescaped");
        assert!(!bare);

        let deployment = reduced(Kind::Deployment, DEPLOYMENT);
        assert_eq!(
            (
                deployment.object.name.as_str(),
                deployment.object.uid.as_str()
            ),
            ("web", "d-1")
        );
        assert!(deployment.owner.is_none() && !deployment.foreign_owner);
        assert!(deployment.pod.is_none(), "only a pod has a pod state");
        assert_eq!(images(&deployment), vec![("app", Some("nginx:1.27"))]);

        let cronjob = reduced(Kind::CronJob, CRONJOB);
        assert_eq!(cronjob.object.namespace, "ops");
        assert_eq!(images(&cronjob), vec![("backup", Some("restic:0.17"))]);

        let operated = reduced(Kind::Pod, OPERATED);
        assert!(
            operated.owner.is_none(),
            "its controller is not a kind listed"
        );
        assert!(operated.foreign_owner);
        let Some((running, taint, bare)) = &operated.pod else {
            panic!("a pod reduces to a pod state")
        };
        assert!(running.is_empty() && taint.is_none());
        assert!(!bare, "only a pod without any controller is bare");
    }

    /// [`POD`] with `change` made to it.
    fn pod_with(change: impl FnOnce(&mut serde_json::Value)) -> String {
        let mut pod: serde_json::Value = serde_json::from_str(POD).unwrap();
        change(&mut pod);
        pod.to_string()
    }

    #[test]
    fn a_finished_pod_is_dropped_and_a_broken_status_list_skipped_alone() {
        for phase in ["Succeeded", "Failed"] {
            let text = pod_with(|p| p["status"]["phase"] = json!(phase));
            assert!(matches!(reduce(Kind::Pod, &text), Ok(None)), "{phase}");
        }
        let text = pod_with(|p| p["status"]["initContainerStatuses"] = json!({"init": "x"}));
        let pod = reduced(Kind::Pod, &text);
        let Some((running, _, _)) = &pod.pod else {
            panic!("a pod reduces to a pod state")
        };
        assert_eq!(
            running
                .iter()
                .map(|r| r.container.as_str())
                .collect::<Vec<_>>(),
            vec!["app", "debugger"]
        );
        for status in [json!("Running"), json!(null), json!({"phase": 3})] {
            let text = pod_with(|p| p["status"] = status.clone());
            let pod = reduced(Kind::Pod, &text);
            assert!(
                matches!(&pod.pod, Some((running, _, _)) if running.is_empty()),
                "{status}"
            );
        }
    }

    #[test]
    fn a_spec_that_cannot_be_read_is_kept_as_unreadable_and_bad_metadata_fails() {
        let text = pod_with(|p| p["spec"]["containers"] = json!({"app": "nginx"}));
        let pod = reduced(Kind::Pod, &text);
        assert!(pod.read.is_err(), "the spec is not a pod spec");
        let inventory = fold(vec![pod]);
        assert!(inventory.workloads[0].unreadable.is_some());

        let text = pod_with(|p| p["metadata"]["uid"] = json!(7));
        assert!(reduce(Kind::Pod, &text).is_err(), "a uid that is no string");
        assert!(
            reduce(Kind::Pod, r#"{"kind":"Pod"}"#).is_err(),
            "no metadata"
        );
        assert!(reduce(Kind::Pod, "[]").is_err());
    }

    /// A fake API server that answers every list request with `status` and `body`.
    fn answering(status: u16, body: &'static str) -> Client {
        let service = tower::service_fn(move |_: Request<kube::client::Body>| async move {
            Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body)))
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
        });
        Client::new(service, "default")
    }

    #[tokio::test]
    async fn an_answer_that_is_not_a_list_fails_the_scan() {
        for body in [
            r#"{"apiVersion":"v1","kind":"Status","status":"Success","metadata":{}}"#,
            r#"{"kind":"PodList","metadata":{},"items":{}}"#,
            r#"{"kind":"PodList","items":[{"metadata":{"name":3}}]}"#,
            "not json",
        ] {
            match collect(&answering(200, body), None, 3).await {
                Err(ListError::Page { .. }) => {}
                other => panic!("{body}: expected a list error, got {other:?}"),
            }
        }
        let empty = collect(
            &answering(200, r#"{"kind":"List","metadata":{},"items":null}"#),
            None,
            3,
        )
        .await
        .unwrap();
        assert_eq!((empty.objects, empty.pages), (0, 9));
        let refused = r#"{"apiVersion":"v1","kind":"Status","status":"Failure","reason":"Forbidden","code":403,"message":"no"}"#;
        match collect(&answering(403, refused), None, 3).await {
            Err(ListError::Api { kind, .. }) => assert_eq!(kind, "deployments"),
            other => panic!("expected an API error, got {other:?}"),
        }
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
                                object(
                                    Kind::Pod,
                                    &format!("pod-{i}"),
                                    None,
                                    pod_spec("nginx:1", "Running"),
                                )
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
