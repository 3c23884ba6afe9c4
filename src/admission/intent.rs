//! From an admission request to what it intends: which images a workload names, which
//! containers an update changes or adds, which stream a CONNECT opens. Reads the wire types of
//! `review`, which know nothing of intents.

use std::borrow::Cow;
use std::collections::HashSet;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::review::{AdmissionRequest, Container, DistinctKeys, Object, PodCarrier, PodSpec};
use crate::policy::evaluate::{Connect, ImageUse, Intent, Location};
use crate::verify::credentials::pull_secrets::PullContext;

/// Why a request's object cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExtractError {
    #[error("{operation} of {kind} carries no {field}")]
    MissingObject {
        operation: String,
        kind: String,
        field: &'static str,
    },
    #[error("the {field} is not a valid {kind}: {message}")]
    Malformed {
        field: &'static str,
        kind: String,
        message: String,
    },
    /// A resource whose objects carry pod specs, sent as a kind fixity cannot read them from
    /// (the Kubernetes 1.21 `EphemeralContainers` kind, say): denied, never admitted unread.
    #[error(
        "{resource} sent as kind {kind:?}: fixity does not know where its pods' images are, so it cannot admit it"
    )]
    UnknownShape { resource: String, kind: String },
    /// More images than one pod may name here: each is parsed and judged, so this is what
    /// bounds a review's memory; no real pod comes near it.
    #[error(
        "the {field} names {count} images (containers, init and ephemeral containers, image volumes), more than the {MAX_IMAGES} fixity reads for one pod"
    )]
    TooManyImages { field: &'static str, count: usize },
}

/// Images one pod spec may name.
pub const MAX_IMAGES: usize = 1024;

/// Works out what `request` intends. `Ok(None)` means fixity has no rule about it.
pub fn extract(request: &AdmissionRequest<'_>) -> Result<Option<Intent>, ExtractError> {
    let operation = request.operation.as_ref();
    let core_pods = request.resource.group.is_empty() && request.resource.resource == "pods";
    match (operation, core_pods, request.sub_resource.as_ref()) {
        ("CONNECT", true, sub) => {
            let action = match sub {
                "exec" => Connect::Exec,
                "attach" => Connect::Attach,
                "portforward" => Connect::PortForward,
                _ => return Ok(None),
            };
            Ok(Some(Intent::Connect {
                action,
                container: connect_container(request.object.as_ref().and_then(Object::raw))?,
            }))
        }
        ("CONNECT", false, "proxy")
            if request.resource.group.is_empty() && request.resource.resource == "nodes" =>
        {
            let path = node_proxy_path(request.object.as_ref().and_then(Object::raw))?;
            Ok(
                super::kubelet::classify(&path).map(|access| Intent::NodeProxy {
                    node: request.name.to_string(),
                    path,
                    access,
                }),
            )
        }
        ("UPDATE", true, "ephemeralcontainers" | "") if request.kind.kind != "Pod" => {
            Err(unknown_shape(request))
        }
        ("UPDATE", true, "ephemeralcontainers") => {
            let new = pod_spec(request, PodCarrier::Pod, Field::Object)?;
            let old = pod_spec(request, PodCarrier::Pod, Field::OldObject)?;
            let before: HashSet<&str> = old
                .ephemeral_containers
                .iter()
                .map(|o| o.name.as_ref())
                .collect();
            let added = new
                .ephemeral_containers
                .iter()
                .filter(|c| !before.contains(&*c.name))
                .map(|c| image_use(c, Location::EphemeralContainer))
                .collect();
            Ok(Some(Intent::AddEphemeral { added }))
        }
        ("UPDATE", true, "") => {
            let new = pod_spec(request, PodCarrier::Pod, Field::Object)?;
            let old = pod_spec(request, PodCarrier::Pod, Field::OldObject)?;
            let old_images = images(&old, "oldObject")?;
            let before: HashSet<_> = old_images.iter().map(ImageUse::identity).collect();
            let changed = images(&new, "object")?
                .into_iter()
                .filter(|u| !before.contains(&u.identity()))
                .collect();
            Ok(Some(Intent::PodImageChange { changed }))
        }
        ("CREATE" | "UPDATE", _, "") => {
            let by_kind = PodCarrier::for_kind(&request.kind.group, &request.kind.kind);
            let by_resource =
                PodCarrier::for_resource(&request.resource.group, &request.resource.resource);
            let carrier = match (by_kind, by_resource) {
                (Some(kind), Some(resource)) if kind != resource => {
                    return Err(unknown_shape(request));
                }
                (None, Some(_)) => return Err(unknown_shape(request)),
                (Some(carrier), _) => carrier,
                (None, None) => return Ok(None),
            };
            if operation == "UPDATE" && template_unchanged(request, carrier)? {
                // Scaling, status or metadata changes create nothing new from the template,
                // and a controller must be able to scale down an old workload during a rollout.
                return Ok(None);
            }
            let spec = pod_spec(request, carrier, Field::Object)?;
            Ok(Some(Intent::Workload {
                images: images(&spec, "object")?,
            }))
        }
        _ => Ok(None),
    }
}

fn unknown_shape(request: &AdmissionRequest<'_>) -> ExtractError {
    let r = &request.resource;
    let resource = match (r.group.as_ref(), request.sub_resource.as_ref()) {
        ("", "") => r.resource.to_string(),
        ("", sub) => format!("{}/{sub}", r.resource),
        (group, "") => format!("{}.{group}", r.resource),
        (group, sub) => format!("{}.{group}/{sub}", r.resource),
    };
    ExtractError::UnknownShape {
        resource,
        kind: request.kind.kind.to_string(),
    }
}

/// Where the pod that `request` creates or changes takes registry credentials from. The
/// ServiceAccount admission plugin has filled in `serviceAccountName` for pods by now; a
/// template without one runs as `default`.
pub fn pull_context(request: &AdmissionRequest<'_>) -> PullContext {
    let carrier =
        PodCarrier::for_kind(&request.kind.group, &request.kind.kind).unwrap_or(PodCarrier::Pod);
    let spec = pod_spec(request, carrier, Field::Object).unwrap_or_default();
    pull_context_of(&request.namespace, &spec)
}

fn pull_context_of(namespace: &str, spec: &PodSpec<'_>) -> PullContext {
    PullContext {
        namespace: namespace.to_owned(),
        secrets: spec
            .image_pull_secrets
            .iter()
            .map(|r| r.name.to_string())
            .filter(|n| !n.is_empty())
            .collect(),
        service_account: Some(
            spec.service_account_name
                .as_deref()
                .map(str::to_owned)
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".to_owned()),
        ),
    }
}

/// Extracts the images of a manifest object of a pod-carrying kind (for `fixity check`).
pub fn workload_images(
    carrier: PodCarrier,
    object: &serde_json::Value,
) -> Result<Vec<ImageUse>, ExtractError> {
    read_workload(carrier, "", &object.to_string()).map(|(images, _)| images)
}

/// The images of a stored object of a pod-carrying kind, written as JSON `text`, and where its
/// pods take registry credentials from (for the background scanner): the same reading as a
/// review of that object gets.
pub fn read_workload(
    carrier: PodCarrier,
    namespace: &str,
    text: &str,
) -> Result<(Vec<ImageUse>, PullContext), ExtractError> {
    let spec = PodSpec::read(carrier, text).map_err(|e| malformed("object", carrier, &e))?;
    Ok((images(&spec, "object")?, pull_context_of(namespace, &spec)))
}

#[derive(Clone, Copy)]
enum Field {
    Object,
    OldObject,
}

fn pod_spec<'r, 'a>(
    request: &'r AdmissionRequest<'a>,
    carrier: PodCarrier,
    field: Field,
) -> Result<Cow<'r, PodSpec<'a>>, ExtractError> {
    let (object, name) = match field {
        Field::Object => (&request.object, "object"),
        Field::OldObject => (&request.old_object, "oldObject"),
    };
    match object {
        Some(object) => object
            .pod_spec(carrier)
            .map_err(|e| malformed(name, carrier, &e)),
        None => Err(ExtractError::MissingObject {
            operation: request.operation.to_string(),
            kind: request.kind.kind.to_string(),
            field: name,
        }),
    }
}

fn malformed(field: &'static str, carrier: PodCarrier, e: &serde_json::Error) -> ExtractError {
    ExtractError::Malformed {
        field,
        kind: carrier.describe().to_owned(),
        message: e.to_string(),
    }
}

/// Whether an update leaves the pod template exactly as it was. Any template change,
/// annotations included (`kubectl rollout restart`), means new pods and a full check. The
/// templates are compared whole, so a repeated key anywhere in them is refused: which of its
/// values a reader keeps would decide the comparison.
fn template_unchanged(
    request: &AdmissionRequest<'_>,
    carrier: PodCarrier,
) -> Result<bool, ExtractError> {
    let Some(pointer) = carrier.template_pointer() else {
        return Ok(false);
    };
    let template = |object: &Option<Object<'_>>, field| {
        let Some(raw) = object.as_ref().and_then(Object::raw) else {
            return Ok(None);
        };
        let value = DistinctKeys::read(raw.get()).map_err(|e| malformed(field, carrier, &e))?;
        Ok(value.pointer(pointer).cloned())
    };
    let new = template(&request.object, "object")?;
    let old = template(&request.old_object, "oldObject")?;
    Ok(matches!((new, old), (Some(new), Some(old)) if new == old))
}

/// The kubelet path of a `NodeProxyOptions`; empty when there is none, which the classifier
/// denies.
fn node_proxy_path(object: Option<&RawValue>) -> Result<String, ExtractError> {
    #[derive(Deserialize)]
    struct Options {
        path: Option<String>,
    }
    let Some(object) = object else {
        return Ok(String::new());
    };
    let options: Options =
        serde_json::from_str(object.get()).map_err(|e| ExtractError::Malformed {
            field: "object",
            kind: "NodeProxyOptions".to_owned(),
            message: e.to_string(),
        })?;
    Ok(options.path.unwrap_or_default())
}

/// The container a CONNECT names, from its options object (PodExecOptions, PodAttachOptions).
fn connect_container(object: Option<&RawValue>) -> Result<Option<String>, ExtractError> {
    #[derive(Deserialize)]
    struct Options {
        container: Option<String>,
    }
    let Some(object) = object else {
        return Ok(None);
    };
    let options: Options =
        serde_json::from_str(object.get()).map_err(|e| ExtractError::Malformed {
            field: "object",
            kind: "connect options".to_owned(),
            message: e.to_string(),
        })?;
    Ok(options.container.filter(|c| !c.is_empty()))
}

fn image_use(container: &Container<'_>, location: Location) -> ImageUse {
    ImageUse::new(location, &container.name, container.image.as_deref())
        .read_only_root(container.security_context.read_only_root_filesystem)
}

/// Every image a pod spec names: containers, init and ephemeral containers, image volumes.
fn images(spec: &PodSpec<'_>, field: &'static str) -> Result<Vec<ImageUse>, ExtractError> {
    let count = spec.containers.len()
        + spec.init_containers.len()
        + spec.ephemeral_containers.len()
        + spec.volumes.iter().filter(|v| v.image.is_some()).count();
    if count > MAX_IMAGES {
        return Err(ExtractError::TooManyImages { field, count });
    }
    let mut out = Vec::with_capacity(count);
    out.extend(
        spec.init_containers
            .iter()
            .map(|c| image_use(c, Location::InitContainer)),
    );
    out.extend(
        spec.containers
            .iter()
            .map(|c| image_use(c, Location::Container)),
    );
    out.extend(
        spec.ephemeral_containers
            .iter()
            .map(|c| image_use(c, Location::EphemeralContainer)),
    );
    out.extend(spec.volumes.iter().filter_map(|v| {
        v.image
            .as_ref()
            .map(|i| ImageUse::new(Location::ImageVolume, &v.name, i.reference.as_deref()))
    }));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD: &str = r#"{"metadata":{"uid":"obj-1"},"spec":{"serviceAccountName":"sa",
        "containers":[{"name":"web","image":"nginx:1.27","ports":[{"containerPort":80}]}],
        "volumes":[{"name":"v","image":{"reference":"ghcr.io/a/b:1"}}]}}"#;

    fn request(body: String) -> AdmissionRequest<'static> {
        serde_json::from_str(body.leak()).unwrap()
    }

    #[test]
    fn pod_specs_read_with_the_review_or_later_mean_the_same() {
        let head = r#""uid":"u","kind":{"group":"","version":"v1","kind":"Pod"},
            "resource":{"group":"","version":"v1","resource":"pods"},"operation":"CREATE""#;
        let in_order = request(format!(r#"{{{head},"object":{POD}}}"#));
        let reordered = request(format!(r#"{{"object":{POD},{head}}}"#));
        assert!(matches!(in_order.object, Some(Object::Pod(_))));
        assert!(matches!(reordered.object, Some(Object::Raw(_))));
        let intent = extract(&in_order).unwrap();
        assert!(matches!(&intent, Some(Intent::Workload { images }) if images.len() == 2));
        assert_eq!(intent, extract(&reordered).unwrap());
        assert_eq!(pull_context(&in_order), pull_context(&reordered));
    }

    #[test]
    fn read_only_root_filesystems_are_read_for_every_container() {
        let body = r#"{"uid":"u","kind":{"group":"","version":"v1","kind":"Pod"},
            "resource":{"group":"","version":"v1","resource":"pods"},"operation":"CREATE",
            "object":{"spec":{
              "initContainers":[{"name":"i","image":"a","securityContext":{"readOnlyRootFilesystem":true}}],
              "containers":[{"name":"c1","image":"a","securityContext":{"readOnlyRootFilesystem":false}},
                {"name":"c2","image":"a","securityContext":null},{"name":"c3","image":"a"},
                {"name":"c4","image":"a","securityContext":{"runAsNonRoot":true,"readOnlyRootFilesystem":true}}],
              "ephemeralContainers":[{"name":"e","image":"a","securityContext":{"readOnlyRootFilesystem":null}}],
              "volumes":[{"name":"v","image":{"reference":"a"}}]}}}"#;
        let Some(Intent::Workload { images }) = extract(&request(body.to_owned())).unwrap() else {
            panic!("a pod creation is a workload");
        };
        let writable: Vec<(&str, bool)> =
            images.iter().map(|u| (u.name(), u.writable_root)).collect();
        assert_eq!(
            writable,
            [
                ("i", false),
                ("c1", true),
                ("c2", true),
                ("c3", true),
                ("c4", false),
                ("e", true),
                ("v", false)
            ]
        );
        let repeated = body.replacen(
            r#""readOnlyRootFilesystem":true}}],"#,
            r#""readOnlyRootFilesystem":false,"readOnlyRootFilesystem":true}}],"#,
            1,
        );
        assert!(serde_json::from_str::<AdmissionRequest<'_>>(repeated.leak()).is_err());
    }

    fn deployment_update(new_labels: &str, old_labels: &str, replicas: (u8, u8)) -> String {
        let object = |labels: &str, replicas: u8| {
            format!(
                r#"{{"metadata":{{"name":"w"}},"spec":{{"replicas":{replicas},"template":{{"metadata":{{"labels":{labels}}},"spec":{{"containers":[{{"name":"app","image":"nginx:1.27"}}]}}}}}}}}"#
            )
        };
        format!(
            r#"{{"uid":"u","kind":{{"group":"apps","version":"v1","kind":"Deployment"}},"resource":{{"group":"apps","version":"v1","resource":"deployments"}},"operation":"UPDATE","object":{},"oldObject":{}}}"#,
            object(new_labels, replicas.0),
            object(old_labels, replicas.1)
        )
    }

    #[test]
    fn workload_updates_are_checked_when_their_template_changes() {
        let scaled = request(deployment_update(
            r#"{"app":"w"}"#,
            r#"{"app":"w"}"#,
            (3, 1),
        ));
        assert_eq!(extract(&scaled).unwrap(), None);
        let relabelled = request(deployment_update(
            r#"{"app":"v"}"#,
            r#"{"app":"w"}"#,
            (1, 1),
        ));
        assert!(matches!(
            extract(&relabelled).unwrap(),
            Some(Intent::Workload { images }) if images.len() == 1
        ));
    }

    /// A template whose label is written twice, once as it was before: serde_json's `Value`
    /// would keep the last and call the template unchanged, another reader the first.
    #[test]
    fn repeated_keys_in_compared_templates_are_refused() {
        for (new, old) in [
            (r#"{"app":"v","app":"w"}"#, r#"{"app":"w"}"#),
            (r#"{"app":"w","app":"v"}"#, r#"{"app":"w"}"#),
            (r#"{"app":"w"}"#, r#"{"app":"w","\u0061pp":"w"}"#),
        ] {
            let update = request(deployment_update(new, old, (1, 1)));
            match extract(&update) {
                Err(ExtractError::Malformed { message, .. }) => {
                    assert!(message.contains("duplicate key \"app\""), "{message}");
                }
                other => panic!("{new} over {old}: {other:?}"),
            }
        }
    }

    #[test]
    fn connect_options_are_read_or_refused() {
        let connect = |options: &str| {
            request(format!(
                r#"{{"uid":"u","kind":{{"group":"","version":"v1","kind":"PodExecOptions"}},"resource":{{"group":"","version":"v1","resource":"pods"}},"subResource":"exec","operation":"CONNECT","object":{options}}}"#
            ))
        };
        let named = extract(&connect(r#"{"container":"web","command":["sh"]}"#)).unwrap();
        assert_eq!(
            named,
            Some(Intent::Connect {
                action: Connect::Exec,
                container: Some("web".to_owned())
            })
        );
        for options in [
            r#"{"container":"web","container":"db"}"#,
            r#"{"container":7}"#,
        ] {
            assert!(
                matches!(
                    extract(&connect(options)),
                    Err(ExtractError::Malformed { .. })
                ),
                "{options}"
            );
        }
    }
}
