//! From an admission request to what it intends: which images a workload names, which
//! containers an update changes or adds, which stream a CONNECT opens.

use std::borrow::Cow;
use std::marker::PhantomData;

use serde::de::{DeserializeSeed, IgnoredAny};
use serde::{Deserialize, Deserializer};

use super::review::{AdmissionRequest, GroupVersionKind, nullable, nullable_str, optional_str};
use crate::json::{self, RawJson};
use crate::policy::evaluate::{Connect, ImageUse, Intent, Location};
use crate::verify::pull_secrets::PullContext;

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
}

/// The kinds that carry a pod spec, and where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodCarrier {
    /// `spec`
    Pod,
    /// `template.spec`
    PodTemplate,
    /// `spec.template.spec`
    Controller,
    /// `spec.jobTemplate.spec.template.spec`
    CronJob,
}

impl PodCarrier {
    pub fn for_kind(group: &str, kind: &str) -> Option<Self> {
        match (group, kind) {
            ("", "Pod") => Some(Self::Pod),
            ("", "PodTemplate") => Some(Self::PodTemplate),
            ("", "ReplicationController")
            | ("apps", "Deployment" | "ReplicaSet" | "StatefulSet" | "DaemonSet")
            | ("batch", "Job") => Some(Self::Controller),
            ("batch", "CronJob") => Some(Self::CronJob),
            _ => None,
        }
    }
}

/// A request's `object` or `oldObject`.
#[derive(Debug)]
pub enum Object<'a> {
    /// As written, read when a rule needs it.
    Raw(RawJson<'a>),
    /// A pod-carrying object, read together with the review.
    Pod(Box<PodObject<'a>>),
}

/// What fixity reads of an object that carries a pod spec.
#[derive(Debug)]
pub struct PodObject<'a> {
    uid: Option<Cow<'a, str>>,
    spec: PodSpec<'a>,
}

impl<'a> Object<'a> {
    /// The object as written, unless it was read already.
    pub fn raw(&self) -> Option<RawJson<'a>> {
        match self {
            Object::Raw(raw) => Some(*raw),
            Object::Pod(_) => None,
        }
    }

    /// `metadata.uid`, when the object has one (it exists, or the API server assigned it).
    pub fn uid(&self) -> Option<&str> {
        #[derive(Deserialize)]
        struct WithMetadata<'a> {
            #[serde(borrow)]
            metadata: Option<Uid<'a>>,
        }
        #[derive(Deserialize)]
        struct Uid<'a> {
            #[serde(borrow)]
            uid: Option<&'a str>,
        }
        let uid = match self {
            Object::Raw(raw) => {
                json::from_str::<WithMetadata<'_>>(raw.get())
                    .ok()?
                    .metadata?
                    .uid
            }
            Object::Pod(pod) => pod.uid.as_deref(),
        };
        uid.filter(|u| !u.is_empty())
    }
}

/// How to read `object` and `oldObject`, decided from the fields before them. The API server
/// writes `kind` and `operation` first, so the pod spec of a create (or of a pod update) is read
/// in the review's own pass instead of being skipped once and parsed again. Anything else, and
/// any request whose fields come in another order, keeps its object raw.
#[derive(Debug, Clone, Copy)]
pub struct ObjectSeed<'a> {
    carrier: Option<PodCarrier>,
    lifetime: PhantomData<&'a ()>,
}

impl ObjectSeed<'_> {
    pub fn new(kind: Option<&GroupVersionKind<'_>>, operation: Option<&str>) -> Self {
        let carrier = kind.and_then(|k| PodCarrier::for_kind(&k.group, &k.kind));
        // Workload updates compare the raw templates (`template_unchanged`): those stay raw.
        let carrier = match (carrier, operation) {
            (Some(carrier), Some("CREATE")) | (Some(carrier @ PodCarrier::Pod), Some("UPDATE")) => {
                Some(carrier)
            }
            _ => None,
        };
        Self {
            carrier,
            lifetime: PhantomData,
        }
    }

    /// Reads the pod spec of a `carrier` object, whatever the operation.
    fn for_carrier(carrier: PodCarrier) -> Self {
        Self {
            carrier: Some(carrier),
            lifetime: PhantomData,
        }
    }
}

impl<'de: 'a, 'a> DeserializeSeed<'de> for ObjectSeed<'a> {
    type Value = Option<Object<'a>>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        let Some(carrier) = self.carrier else {
            return Ok(Option::<RawJson<'a>>::deserialize(d)?.map(Object::Raw));
        };
        let (metadata, spec) = match carrier {
            PodCarrier::Pod => match Option::<Top<'a, PodSpec<'a>>>::deserialize(d)? {
                Some(top) => (top.metadata, top.spec),
                None => return Ok(None),
            },
            PodCarrier::PodTemplate => match Option::<Top<'a, IgnoredAny>>::deserialize(d)? {
                Some(top) => (top.metadata, top.template.and_then(|t| t.spec)),
                None => return Ok(None),
            },
            PodCarrier::Controller => match Option::<Top<'a, WithTemplate<'a>>>::deserialize(d)? {
                Some(top) => (
                    top.metadata,
                    top.spec.and_then(|s| s.template).and_then(|t| t.spec),
                ),
                None => return Ok(None),
            },
            PodCarrier::CronJob => match Option::<Top<'a, CronJobSpec<'a>>>::deserialize(d)? {
                Some(top) => (
                    top.metadata,
                    top.spec
                        .and_then(|s| s.job_template)
                        .and_then(|j| j.spec)
                        .and_then(|s| s.template)
                        .and_then(|t| t.spec),
                ),
                None => return Ok(None),
            },
        };
        Ok(Some(Object::Pod(Box::new(PodObject {
            uid: metadata.and_then(|m| m.uid),
            spec: spec.unwrap_or_default(),
        }))))
    }
}

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
                container: connect_container(request.object.as_ref().and_then(Object::raw)),
            }))
        }
        ("UPDATE", true, "ephemeralcontainers") => {
            let new = pod_spec(request, PodCarrier::Pod, Field::Object)?;
            let old = pod_spec(request, PodCarrier::Pod, Field::OldObject)?;
            let added = new
                .ephemeral_containers
                .iter()
                .filter(|c| !old.ephemeral_containers.iter().any(|o| o.name == c.name))
                .map(|c| c.image_use(Location::EphemeralContainer))
                .collect();
            Ok(Some(Intent::AddEphemeral { added }))
        }
        ("UPDATE", true, "") => {
            let new = pod_spec(request, PodCarrier::Pod, Field::Object)?;
            let old = pod_spec(request, PodCarrier::Pod, Field::OldObject)?;
            let old_images = old.images();
            let changed = new
                .images()
                .into_iter()
                .filter(|u| !old_images.contains(u))
                .collect();
            Ok(Some(Intent::PodImageChange { changed }))
        }
        ("CREATE" | "UPDATE", _, "") => {
            let Some(carrier) = PodCarrier::for_kind(&request.kind.group, &request.kind.kind)
            else {
                return Ok(None);
            };
            if operation == "UPDATE" && template_unchanged(request, carrier) {
                // Scaling, status or metadata changes create nothing new from the template,
                // and a controller must be able to scale down an old workload during a rollout.
                return Ok(None);
            }
            let spec = pod_spec(request, carrier, Field::Object)?;
            Ok(Some(Intent::Workload {
                images: spec.images(),
            }))
        }
        _ => Ok(None),
    }
}

/// Where the pod that `request` creates or changes takes registry credentials from. The
/// ServiceAccount admission plugin has filled in `serviceAccountName` for pods by now; a
/// template without one runs as `default`.
pub fn pull_context(request: &AdmissionRequest<'_>) -> PullContext {
    let carrier =
        PodCarrier::for_kind(&request.kind.group, &request.kind.kind).unwrap_or(PodCarrier::Pod);
    let spec = pod_spec(request, carrier, Field::Object).unwrap_or_default();
    PullContext {
        namespace: request.namespace.to_string(),
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
    let text = object.to_string();
    parse_spec(carrier, &text, "object").map(|s| s.images())
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
        Some(Object::Raw(raw)) => parse_spec(carrier, raw.get(), name).map(Cow::Owned),
        Some(Object::Pod(pod)) => Ok(Cow::Borrowed(&pod.spec)),
        None => Err(ExtractError::MissingObject {
            operation: request.operation.to_string(),
            kind: request.kind.kind.to_string(),
            field: name,
        }),
    }
}

fn parse_spec<'a>(
    carrier: PodCarrier,
    text: &'a str,
    field: &'static str,
) -> Result<PodSpec<'a>, ExtractError> {
    let kind = || match carrier {
        PodCarrier::Pod => "Pod",
        PodCarrier::PodTemplate => "PodTemplate",
        PodCarrier::Controller => "workload with spec.template",
        PodCarrier::CronJob => "CronJob",
    };
    let malformed = |e: json::Error| ExtractError::Malformed {
        field,
        kind: kind().to_owned(),
        message: e.to_string(),
    };
    // The same reader the review pass uses, so both agree on where each kind keeps its spec.
    let object = json::from_seed(text, ObjectSeed::for_carrier(carrier)).map_err(malformed)?;
    Ok(match object {
        Some(Object::Pod(pod)) => pod.spec,
        _ => PodSpec::default(),
    })
}

/// Whether an update leaves the pod template exactly as it was. Any template change,
/// annotations included (`kubectl rollout restart`), means new pods and a full check.
fn template_unchanged(request: &AdmissionRequest<'_>, carrier: PodCarrier) -> bool {
    let pointer = match carrier {
        PodCarrier::Pod => return false,
        PodCarrier::PodTemplate => "/template",
        PodCarrier::Controller => "/spec/template",
        PodCarrier::CronJob => "/spec/jobTemplate/spec/template",
    };
    let template = |object: &Option<Object<'_>>| {
        let raw = object.as_ref()?.raw()?;
        let value: serde_json::Value = serde_json::from_str(raw.get()).ok()?;
        value.pointer(pointer).cloned()
    };
    match (template(&request.object), template(&request.old_object)) {
        (Some(new), Some(old)) => new == old,
        _ => false,
    }
}

fn connect_container(object: Option<RawJson<'_>>) -> Option<String> {
    #[derive(Deserialize)]
    struct Options {
        container: Option<String>,
    }
    let options: Options = json::from_str(object?.get()).ok()?;
    options.container.filter(|c| !c.is_empty())
}

#[derive(Deserialize)]
struct WithSpec<T> {
    spec: Option<T>,
}

/// The top of an object of a pod-carrying kind; `S` is what its `spec` holds.
#[derive(Deserialize)]
struct Top<'a, S> {
    #[serde(borrow, default)]
    metadata: Option<Metadata<'a>>,
    spec: Option<S>,
    /// Where a PodTemplate keeps its pod template.
    #[serde(borrow, default)]
    template: Option<Template<'a>>,
}

#[derive(Deserialize)]
struct Metadata<'a> {
    #[serde(borrow, default, deserialize_with = "optional_str")]
    uid: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct WithTemplate<'a> {
    #[serde(borrow, default)]
    template: Option<Template<'a>>,
}

#[derive(Deserialize)]
struct Template<'a> {
    #[serde(borrow, default)]
    spec: Option<PodSpec<'a>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CronJobSpec<'a> {
    #[serde(borrow, default)]
    job_template: Option<WithSpec<WithTemplate<'a>>>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodSpec<'a> {
    #[serde(borrow, default, deserialize_with = "nullable")]
    image_pull_secrets: Vec<LocalRef<'a>>,
    #[serde(borrow, default, deserialize_with = "optional_str")]
    service_account_name: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "nullable")]
    containers: Vec<Container<'a>>,
    #[serde(borrow, default, deserialize_with = "nullable")]
    init_containers: Vec<Container<'a>>,
    #[serde(borrow, default, deserialize_with = "nullable")]
    ephemeral_containers: Vec<Container<'a>>,
    #[serde(borrow, default, deserialize_with = "nullable")]
    volumes: Vec<Volume<'a>>,
}

#[derive(Debug, Default, Clone, Deserialize)]
struct LocalRef<'a> {
    #[serde(borrow, default, deserialize_with = "nullable_str")]
    name: Cow<'a, str>,
}

#[derive(Debug, Default, Clone, Deserialize)]
struct Container<'a> {
    #[serde(borrow, default, deserialize_with = "nullable_str")]
    name: Cow<'a, str>,
    #[serde(borrow, default, deserialize_with = "optional_str")]
    image: Option<Cow<'a, str>>,
}

#[derive(Debug, Default, Clone, Deserialize)]
struct Volume<'a> {
    #[serde(borrow, default, deserialize_with = "nullable_str")]
    name: Cow<'a, str>,
    #[serde(borrow, default)]
    image: Option<ImageVolume<'a>>,
}

#[derive(Debug, Default, Clone, Deserialize)]
struct ImageVolume<'a> {
    #[serde(borrow, default, deserialize_with = "optional_str")]
    reference: Option<Cow<'a, str>>,
}

impl Container<'_> {
    fn image_use(&self, location: Location) -> ImageUse {
        ImageUse::new(location, &self.name, self.image.as_deref())
    }
}

impl PodSpec<'_> {
    /// Every image the spec names: containers, init and ephemeral containers, image volumes.
    fn images(&self) -> Vec<ImageUse> {
        let mut out = Vec::with_capacity(self.containers.len() + self.init_containers.len());
        out.extend(
            self.init_containers
                .iter()
                .map(|c| c.image_use(Location::InitContainer)),
        );
        out.extend(
            self.containers
                .iter()
                .map(|c| c.image_use(Location::Container)),
        );
        out.extend(
            self.ephemeral_containers
                .iter()
                .map(|c| c.image_use(Location::EphemeralContainer)),
        );
        out.extend(self.volumes.iter().filter_map(|v| {
            v.image
                .as_ref()
                .map(|i| ImageUse::new(Location::ImageVolume, &v.name, i.reference.as_deref()))
        }));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_spec_strings_borrow_from_the_body() {
        let object = r#"{"metadata":{"uid":"1f2e"},"spec":{"serviceAccountName":"web",
            "imagePullSecrets":[{"name":"pull"}],
            "containers":[{"name":"app","image":"registry.example/app@sha256:00"}],
            "initContainers":[{"name":"se\u0074up","image":"registry.example/setup:1"}],
            "volumes":[{"name":"v","image":{"reference":"registry.example/data:2"}}]}}"#;
        let spec = parse_spec(PodCarrier::Pod, object, "object").unwrap();
        let borrowed = |s: &Cow<'_, str>| matches!(s, Cow::Borrowed(_));
        let texts = [
            spec.service_account_name.as_ref().unwrap(),
            &spec.image_pull_secrets[0].name,
            &spec.containers[0].name,
            spec.containers[0].image.as_ref().unwrap(),
            spec.init_containers[0].image.as_ref().unwrap(),
            &spec.volumes[0].name,
            spec.volumes[0]
                .image
                .as_ref()
                .unwrap()
                .reference
                .as_ref()
                .unwrap(),
        ];
        for text in texts {
            assert!(borrowed(text), "{text:?} was copied");
        }
        // The escaped name is read right, into a string of its own.
        assert_eq!(spec.init_containers[0].name, "setup");
        assert!(!borrowed(&spec.init_containers[0].name));
    }
}
