//! The AdmissionReview v1 wire format: what the API server sends, and what fixity answers.
//! This layer knows the format, not what a request means; `intent` reads these types.
//!
//! Reviews are read by serde_json in one pass: only the fields fixity reads are decoded, the rest
//! is stepped over (`IgnoredAny`) or kept as written (`RawValue`), and strings borrow from the
//! body unless they hold escapes. The object of a request whose pod spec fixity checks is read
//! together with the review; other objects stay raw until a rule needs them.
//!
//! Two readers must never be able to take different values from one body:
//! - a key repeated among the fields fixity reads is an error at every level (the derived readers,
//!   and `once` in the hand-written one); a repeated key that no reader here reads cannot change a
//!   decision, and is stepped over like the rest of what fixity ignores;
//! - a value compared or validated whole is read through [`DistinctKeys`], which refuses any
//!   repeated key (serde_json's own `Value` keeps the last one).
//!
//! Nesting deeper than serde_json's limit (128 levels) is refused wherever a value is built;
//! what is stepped over or kept raw is scanned by a loop, which has no stack to exhaust, and any
//! later reading of a raw value is limited again.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

pub const API_VERSION: &str = "admission.k8s.io/v1";
pub const KIND: &str = "AdmissionReview";

/// Reads a review from a body already checked to be UTF-8.
pub fn decode(text: &str) -> Result<AdmissionReview<'_>, serde_json::Error> {
    serde_json::from_str(text)
}

/// Reads what `seed` makes of `text`, which must hold exactly one JSON value.
fn from_str_seed<'a, S: DeserializeSeed<'a>>(
    text: &'a str,
    seed: S,
) -> Result<S::Value, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(text);
    let value = seed.deserialize(&mut de)?;
    de.end()?;
    Ok(value)
}

/// An incoming review. Strings borrow from the request body where they can.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionReview<'a> {
    #[serde(borrow, default, deserialize_with = "optional_str")]
    pub api_version: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "optional_str")]
    pub kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub request: Option<AdmissionRequest<'a>>,
}

/// The request inside a review. Read by hand rather than derived: how `object` and
/// `oldObject` are read depends on `kind` and `operation`, which the API server writes
/// before them (see [`ObjectSeed`]).
#[derive(Debug)]
pub struct AdmissionRequest<'a> {
    pub uid: Cow<'a, str>,
    pub kind: GroupVersionKind<'a>,
    pub resource: GroupVersionResource<'a>,
    pub sub_resource: Cow<'a, str>,
    pub operation: Cow<'a, str>,
    pub namespace: Cow<'a, str>,
    pub name: Cow<'a, str>,
    pub user_info: UserInfo<'a>,
    pub object: Option<Object<'a>>,
    pub old_object: Option<Object<'a>>,
    pub dry_run: bool,
}

impl<'de: 'a, 'a> Deserialize<'de> for AdmissionRequest<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(RequestVisitor(PhantomData))
    }
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "camelCase")]
enum RequestField {
    Uid,
    Kind,
    Resource,
    SubResource,
    Operation,
    Namespace,
    Name,
    UserInfo,
    Object,
    OldObject,
    DryRun,
    #[serde(other)]
    Other,
}

struct RequestVisitor<'a>(PhantomData<&'a ()>);

impl<'de: 'a, 'a> Visitor<'de> for RequestVisitor<'a> {
    type Value = AdmissionRequest<'a>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an AdmissionRequest object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let (mut uid, mut kind, mut resource, mut sub_resource, mut operation) =
            (None, None, None, None, None);
        let (mut namespace, mut name, mut user_info, mut dry_run) = (None, None, None, None);
        let (mut object, mut old_object) = (None, None);
        while let Some(field) = map.next_key::<RequestField>()? {
            match field {
                RequestField::Uid => once(&mut uid, "uid", map.next_value::<Text<'a>>()?.0)?,
                RequestField::Kind => once(&mut kind, "kind", map.next_value()?)?,
                RequestField::Resource => once(&mut resource, "resource", map.next_value()?)?,
                RequestField::SubResource => {
                    once(&mut sub_resource, "subResource", nullable_text(&mut map)?)?;
                }
                RequestField::Operation => {
                    once(&mut operation, "operation", map.next_value::<Text<'a>>()?.0)?;
                }
                RequestField::Namespace => {
                    once(&mut namespace, "namespace", nullable_text(&mut map)?)?;
                }
                RequestField::Name => once(&mut name, "name", nullable_text(&mut map)?)?,
                RequestField::UserInfo => {
                    let value: Option<UserInfo<'a>> = map.next_value()?;
                    once(&mut user_info, "userInfo", value.unwrap_or_default())?;
                }
                RequestField::Object => {
                    let seed = ObjectSeed::new(kind.as_ref(), operation.as_deref());
                    once(&mut object, "object", map.next_value_seed(seed)?)?;
                }
                RequestField::OldObject => {
                    let seed = ObjectSeed::new(kind.as_ref(), operation.as_deref());
                    once(&mut old_object, "oldObject", map.next_value_seed(seed)?)?;
                }
                RequestField::DryRun => {
                    let value: Option<bool> = map.next_value()?;
                    once(&mut dry_run, "dryRun", value.unwrap_or_default())?;
                }
                RequestField::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(AdmissionRequest {
            uid: uid.ok_or_else(|| de::Error::missing_field("uid"))?,
            kind: kind.ok_or_else(|| de::Error::missing_field("kind"))?,
            resource: resource.ok_or_else(|| de::Error::missing_field("resource"))?,
            sub_resource: sub_resource.unwrap_or_default(),
            operation: operation.ok_or_else(|| de::Error::missing_field("operation"))?,
            namespace: namespace.unwrap_or_default(),
            name: name.unwrap_or_default(),
            user_info: user_info.unwrap_or_default(),
            object: object.flatten(),
            old_object: old_object.flatten(),
            dry_run: dry_run.unwrap_or_default(),
        })
    }
}

/// Fills a field once; a second occurrence is an error, as with derived readers.
fn once<T, E: de::Error>(slot: &mut Option<T>, field: &'static str, value: T) -> Result<(), E> {
    if slot.is_some() {
        return Err(E::duplicate_field(field));
    }
    *slot = Some(value);
    Ok(())
}

fn nullable_text<'de: 'a, 'a, A: MapAccess<'de>>(map: &mut A) -> Result<Cow<'a, str>, A::Error> {
    Ok(map
        .next_value::<Option<Text<'a>>>()?
        .map(|t| t.0)
        .unwrap_or_default())
}

/// A string that borrows from the body unless it holds escapes.
struct Text<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct TextVisitor<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for TextVisitor<'a> {
            type Value = Text<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(TextVisitor(PhantomData))
    }
}

#[derive(Debug, Deserialize)]
pub struct GroupVersionKind<'a> {
    #[serde(borrow, default, deserialize_with = "nullable_str")]
    pub group: Cow<'a, str>,
    #[serde(borrow, default, deserialize_with = "nullable_str")]
    pub version: Cow<'a, str>,
    #[serde(borrow)]
    pub kind: Cow<'a, str>,
}

#[derive(Debug, Deserialize)]
pub struct GroupVersionResource<'a> {
    #[serde(borrow, default, deserialize_with = "nullable_str")]
    pub group: Cow<'a, str>,
    #[serde(borrow, default, deserialize_with = "nullable_str")]
    pub version: Cow<'a, str>,
    #[serde(borrow)]
    pub resource: Cow<'a, str>,
}

#[derive(Debug, Default, Deserialize)]
pub struct UserInfo<'a> {
    #[serde(borrow, default, deserialize_with = "nullable_str")]
    pub username: Cow<'a, str>,
    #[serde(borrow, default, deserialize_with = "nullable_strs")]
    pub groups: Vec<Cow<'a, str>>,
}

// String fields that borrow from the body. serde's own `Cow` reader always copies, and derive
// borrows only a bare `Cow<'a, str>` field, not one inside an `Option`, a `Vec` or behind
// `deserialize_with`: these read through `Text`, which borrows unless the string has escapes.

/// A string, with `null` read as empty.
fn nullable_str<'de: 'a, 'a, D>(d: D) -> Result<Cow<'a, str>, D::Error>
where
    D: Deserializer<'de>,
{
    Ok(Option::<Text<'a>>::deserialize(d)?
        .map(|t| t.0)
        .unwrap_or_default())
}

/// A string that may be missing or `null`.
fn optional_str<'de: 'a, 'a, D>(d: D) -> Result<Option<Cow<'a, str>>, D::Error>
where
    D: Deserializer<'de>,
{
    Ok(Option::<Text<'a>>::deserialize(d)?.map(|t| t.0))
}

/// A list of strings, with `null` read as empty.
fn nullable_strs<'de: 'a, 'a, D>(d: D) -> Result<Vec<Cow<'a, str>>, D::Error>
where
    D: Deserializer<'de>,
{
    let list = Option::<Vec<Text<'a>>>::deserialize(d)?.unwrap_or_default();
    Ok(list.into_iter().map(|t| t.0).collect())
}

/// Treats an explicit JSON `null` like a missing field.
fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
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
            | ("extensions", "Deployment" | "ReplicaSet" | "DaemonSet")
            | ("batch", "Job") => Some(Self::Controller),
            ("batch", "CronJob") => Some(Self::CronJob),
            _ => None,
        }
    }

    /// The carrier a resource's objects are, whatever kind a request names.
    pub fn for_resource(group: &str, resource: &str) -> Option<Self> {
        match (group, resource) {
            ("", "pods") => Some(Self::Pod),
            ("", "podtemplates") => Some(Self::PodTemplate),
            ("", "replicationcontrollers")
            | ("apps", "deployments" | "replicasets" | "statefulsets" | "daemonsets")
            | ("extensions", "deployments" | "replicasets" | "daemonsets")
            | ("batch", "jobs") => Some(Self::Controller),
            ("batch", "cronjobs") => Some(Self::CronJob),
            _ => None,
        }
    }

    /// What the kind is called in errors.
    pub fn describe(self) -> &'static str {
        match self {
            PodCarrier::Pod => "Pod",
            PodCarrier::PodTemplate => "PodTemplate",
            PodCarrier::Controller => "workload with spec.template",
            PodCarrier::CronJob => "CronJob",
        }
    }

    /// Where the pod template sits in an object of this kind, as a JSON pointer; a Pod has none.
    pub fn template_pointer(self) -> Option<&'static str> {
        match self {
            PodCarrier::Pod => None,
            PodCarrier::PodTemplate => Some("/template"),
            PodCarrier::Controller => Some("/spec/template"),
            PodCarrier::CronJob => Some("/spec/jobTemplate/spec/template"),
        }
    }
}

/// A request's `object` or `oldObject`.
#[derive(Debug)]
pub enum Object<'a> {
    /// As written, read when a rule needs it.
    Raw(&'a RawValue),
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
    pub fn raw(&self) -> Option<&'a RawValue> {
        match self {
            Object::Raw(raw) => Some(raw),
            Object::Pod(_) => None,
        }
    }

    /// The pod spec a `carrier` object holds (empty when it holds none). An object read with
    /// the review has it already; a raw one is read now.
    pub fn pod_spec(&self, carrier: PodCarrier) -> Result<Cow<'_, PodSpec<'a>>, serde_json::Error> {
        match self {
            Object::Raw(raw) => PodSpec::read(carrier, raw.get()).map(Cow::Owned),
            Object::Pod(pod) => Ok(Cow::Borrowed(&pod.spec)),
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
                serde_json::from_str::<WithMetadata<'_>>(raw.get())
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
        // Workload updates compare the raw templates: those stay raw.
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
            return Ok(Option::<&'a RawValue>::deserialize(d)?.map(Object::Raw));
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

/// What fixity reads of a pod spec.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec<'a> {
    #[serde(borrow, default, deserialize_with = "nullable")]
    pub image_pull_secrets: Vec<LocalRef<'a>>,
    #[serde(borrow, default, deserialize_with = "optional_str")]
    pub service_account_name: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "nullable")]
    pub containers: Vec<Container<'a>>,
    #[serde(borrow, default, deserialize_with = "nullable")]
    pub init_containers: Vec<Container<'a>>,
    #[serde(borrow, default, deserialize_with = "nullable")]
    pub ephemeral_containers: Vec<Container<'a>>,
    #[serde(borrow, default, deserialize_with = "nullable")]
    pub volumes: Vec<Volume<'a>>,
}

impl<'a> PodSpec<'a> {
    /// Reads the pod spec of a `carrier` object written as `text`, with the reader the review's
    /// own pass uses, so both agree on where each kind keeps its spec.
    pub fn read(carrier: PodCarrier, text: &'a str) -> Result<Self, serde_json::Error> {
        let object = from_str_seed(text, ObjectSeed::for_carrier(carrier))?;
        Ok(match object {
            Some(Object::Pod(pod)) => pod.spec,
            _ => PodSpec::default(),
        })
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
pub struct LocalRef<'a> {
    #[serde(borrow, default, deserialize_with = "nullable_str")]
    pub name: Cow<'a, str>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container<'a> {
    #[serde(borrow, default, deserialize_with = "nullable_str")]
    pub name: Cow<'a, str>,
    #[serde(borrow, default, deserialize_with = "optional_str")]
    pub image: Option<Cow<'a, str>>,
    #[serde(default, deserialize_with = "nullable")]
    pub security_context: SecurityContext,
}

/// What fixity reads of a container's security context.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecurityContext {
    #[serde(default, deserialize_with = "nullable")]
    pub read_only_root_filesystem: bool,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
pub struct Volume<'a> {
    #[serde(borrow, default, deserialize_with = "nullable_str")]
    pub name: Cow<'a, str>,
    #[serde(borrow, default)]
    pub image: Option<ImageVolume<'a>>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
pub struct ImageVolume<'a> {
    #[serde(borrow, default, deserialize_with = "optional_str")]
    pub reference: Option<Cow<'a, str>>,
}

/// A JSON value read whole, refusing any key repeated within an object. serde_json's `Value`
/// keeps the last of two, another reader may keep the first, and a value fixity compares or
/// validates must mean one thing.
pub struct DistinctKeys(pub Value);

impl DistinctKeys {
    /// Reads `text`, which must hold exactly one JSON value.
    pub fn read(text: &str) -> Result<Value, serde_json::Error> {
        serde_json::from_str::<Self>(text).map(|v| v.0)
    }
}

impl<'de> Deserialize<'de> for DistinctKeys {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(DistinctVisitor).map(DistinctKeys)
    }
}

struct DistinctVisitor;

impl<'de> Visitor<'de> for DistinctVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(DistinctKeys(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let DistinctKeys(value) = map.next_value()?;
            match object.entry(key) {
                serde_json::map::Entry::Vacant(slot) => {
                    slot.insert(value);
                }
                serde_json::map::Entry::Occupied(slot) => {
                    return Err(de::Error::custom(format_args!(
                        "duplicate key {:?}",
                        slot.key()
                    )));
                }
            }
        }
        Ok(Value::Object(object))
    }
}

/// The review fixity answers with.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReviewResponse<'a> {
    pub api_version: &'static str,
    pub kind: &'static str,
    pub response: Response<'a>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Response<'a> {
    pub uid: &'a str,
    pub allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub audit_annotations: BTreeMap<&'static str, String>,
}

/// The `metav1.Status` of a denial.
#[derive(Debug, Serialize)]
pub struct Status {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
}

impl<'a> ReviewResponse<'a> {
    pub fn new(response: Response<'a>) -> Self {
        Self {
            api_version: API_VERSION,
            kind: KIND,
            response,
        }
    }
}

/// Finds the request uid in a body that did not parse as a whole (truncated or with a bad
/// field), so the API server can still match the denial to its request. The API server writes
/// `uid` as the first field of `request`.
pub fn recover_uid(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct UidOnly {
        request: Option<RequestUid>,
    }
    #[derive(Deserialize)]
    struct RequestUid {
        uid: Option<String>,
    }
    if let Ok(UidOnly {
        request: Some(RequestUid { uid: Some(uid) }),
    }) = serde_json::from_slice::<UidOnly>(body)
    {
        return plausible_uid(&uid).then_some(uid);
    }
    let text = std::str::from_utf8(body)
        .unwrap_or_else(|e| std::str::from_utf8(&body[..e.valid_up_to()]).unwrap_or_default());
    let after_request = &text[text.find("\"request\"")?..];
    let after_key = &after_request[after_request.find("\"uid\"")? + 5..];
    let value = after_key
        .trim_start()
        .strip_prefix(':')?
        .trim_start()
        .strip_prefix('"')?;
    let uid = &value[..value.find('"')?];
    plausible_uid(uid).then(|| uid.to_owned())
}

fn plausible_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= 128
        && uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_recovery() {
        let whole = br#"{"request":{"uid":"705ab4f5-6393-11e8-b7cc-42010a800002","kind":7}}"#;
        assert_eq!(
            recover_uid(whole).as_deref(),
            Some("705ab4f5-6393-11e8-b7cc-42010a800002")
        );
        let truncated =
            br#"{"apiVersion":"admission.k8s.io/v1","request":{"uid": "abc-123","kind":{"gro"#;
        assert_eq!(recover_uid(truncated).as_deref(), Some("abc-123"));
        assert_eq!(recover_uid(br#"{"request":{"uid":"a\"b"}}"#), None);
        assert_eq!(recover_uid(b"\xff\xfe garbage"), None);
        assert_eq!(recover_uid(br#"{"request":{"uid":""}}"#), None);
    }

    #[test]
    fn strings_borrow_from_the_body_unless_escaped() {
        let body = r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{
            "uid":"u","kind":{"group":"apps","version":"v1","kind":"Deployment"},
            "resource":{"group":"apps","version":"v1","resource":"deployments"},
            "operation":"CREATE","namespace":"shop","name":"web",
            "userInfo":{"username":"alice","groups":["dev","ops\\team"]}}}"#;
        let review = decode(body).unwrap();
        let request = review.request.unwrap();
        let borrowed = |s: &Cow<'_, str>| matches!(s, Cow::Borrowed(_));
        let texts = [
            review.api_version.as_ref().unwrap(),
            review.kind.as_ref().unwrap(),
            &request.uid,
            &request.kind.group,
            &request.kind.version,
            &request.kind.kind,
            &request.resource.group,
            &request.resource.version,
            &request.resource.resource,
            &request.operation,
            &request.namespace,
            &request.name,
            &request.user_info.username,
            &request.user_info.groups[0],
        ];
        for text in texts {
            assert!(borrowed(text), "{text:?} was copied");
        }
        // An escape has to be undone into a string of its own.
        assert_eq!(request.user_info.groups[1], "ops\\team");
        assert!(!borrowed(&request.user_info.groups[1]));
    }

    #[test]
    fn pod_spec_strings_borrow_from_the_body() {
        let object = r#"{"metadata":{"uid":"1f2e"},"spec":{"serviceAccountName":"web",
            "imagePullSecrets":[{"name":"pull"}],
            "containers":[{"name":"app","image":"registry.example/app@sha256:00"}],
            "initContainers":[{"name":"se\u0074up","image":"registry.example/setup:1"}],
            "volumes":[{"name":"v","image":{"reference":"registry.example/data:2"}}]}}"#;
        let spec = PodSpec::read(PodCarrier::Pod, object).unwrap();
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

    #[test]
    fn nulls_read_as_missing() {
        let body = r#"{"request":{"uid":"u","kind":{"group":null,"version":"v1","kind":"Pod"},
            "resource":{"group":"","version":"v1","resource":"pods"},"subResource":null,
            "operation":"CREATE","namespace":null,"userInfo":null,"object":null,"dryRun":null}}"#;
        let review = decode(body).unwrap();
        let request = review.request.unwrap();
        assert_eq!(request.sub_resource, "");
        assert!(request.object.is_none());
        assert!(!request.dry_run);
    }

    const POD: &str = r#"{"metadata":{"uid":"obj-1"},"spec":{"serviceAccountName":"sa",
        "containers":[{"name":"web","image":"nginx:1.27","ports":[{"containerPort":80}]}],
        "volumes":[{"name":"v","image":{"reference":"ghcr.io/a/b:1"}}]}}"#;

    fn request(head: &str, tail: &str) -> AdmissionRequest<'static> {
        let json = format!(r#"{{{head}"object":{POD}{tail}}}"#).leak();
        serde_json::from_str(json).unwrap()
    }

    /// The single pass depends on the API server writing `kind` and `operation` before
    /// `object`: hold it to the reviews captured from a real one and to the load bench's.
    #[test]
    fn captured_pod_reviews_are_read_in_one_pass() {
        let bodies = [
            include_str!("../../tests/fixtures/admission/pod-create-pinned.json"),
            include_str!("../../tests/fixtures/admission/deployment-create-tagged.json"),
            include_str!("../../tests/fixtures/admission/cronjob-create-tagged.json"),
            include_str!("../../tests/fixtures/admission/pod-update-image.json"),
            include_str!("../../benches/load/fixtures/pod-create.json"),
            include_str!("../../benches/load/fixtures/deployment-create.json"),
        ];
        for body in bodies {
            let review = decode(body).unwrap();
            let request = review.request.unwrap();
            assert!(
                matches!(request.object, Some(Object::Pod(_))),
                "{} {} kept its object raw",
                request.operation,
                request.kind.kind
            );
        }
    }

    #[test]
    fn pod_specs_read_with_the_review_or_from_the_raw_object_are_the_same() {
        let head = r#""uid":"u","kind":{"group":"","version":"v1","kind":"Pod"},
            "resource":{"group":"","version":"v1","resource":"pods"},"operation":"CREATE","#;
        let in_order = request(head, "");
        assert!(matches!(in_order.object, Some(Object::Pod(_))));
        // Fields in another order than the API server's: the object stays raw.
        let reordered = request("", &format!(",{}", head.trim_end_matches(',')));
        assert!(matches!(reordered.object, Some(Object::Raw(_))));
        let [a, b] = [&in_order, &reordered].map(|r| {
            let object = r.object.as_ref().unwrap();
            assert_eq!(object.uid(), Some("obj-1"));
            object.pod_spec(PodCarrier::Pod).unwrap().into_owned()
        });
        assert_eq!(a, b);
        assert_eq!(a.containers[0].image.as_deref(), Some("nginx:1.27"));
    }

    #[test]
    fn workload_updates_keep_their_objects_raw() {
        let head = r#""uid":"u","kind":{"group":"apps","version":"v1","kind":"Deployment"},
            "resource":{"group":"apps","version":"v1","resource":"deployments"},"operation":"UPDATE","#;
        assert!(matches!(request(head, "").object, Some(Object::Raw(_))));
    }

    #[test]
    fn missing_fields_are_errors() {
        let missing = r#"{"uid":"a","kind":{"kind":"Pod"},"resource":{"resource":"pods"}}"#;
        let e = serde_json::from_str::<AdmissionRequest<'_>>(missing).unwrap_err();
        assert!(e.to_string().contains("missing field `operation`"), "{e}");
    }

    const PINNED: &str = "registry.example/app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn pod_review() -> String {
        format!(
            r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{{"uid":"u-1","kind":{{"group":"","version":"v1","kind":"Pod"}},"resource":{{"group":"","version":"v1","resource":"pods"}},"operation":"CREATE","namespace":"shop","userInfo":{{"username":"alice","groups":["dev"]}},"object":{{"metadata":{{"name":"web","uid":"obj-1"}},"spec":{{"serviceAccountName":"sa","imagePullSecrets":[{{"name":"pull"}}],"initContainers":[{{"name":"setup","image":"{PINNED}"}}],"containers":[{{"name":"app","image":"registry.example/app:1"}}],"volumes":[{{"name":"data","image":{{"reference":"registry.example/data:2"}}}}]}}}}}}}}"#
        )
    }

    fn workload_review(kind: &str, group: &str, spec: &str) -> String {
        format!(
            r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{{"uid":"u-2","kind":{{"group":"{group}","version":"v1","kind":"{kind}"}},"resource":{{"group":"{group}","version":"v1","resource":"x"}},"operation":"CREATE","object":{{"metadata":{{"name":"w"}},"spec":{spec}}}}}}}"#
        )
    }

    /// `member` (a key and its value) written into `body` right before `at`, which must occur
    /// in it: the body then repeats a key, with the added value first.
    fn repeat(body: &str, at: &str, member: &str) -> String {
        assert!(body.contains(at), "{at} is not in {body}");
        body.replacen(at, &format!("{member},{at}"), 1)
    }

    /// Every field the wire layer reads, at every level (the review, the request, its kind and
    /// user, the object, its metadata, the pod spec, pull secrets, containers, images, the
    /// templates of workloads): a repeated key is an error, whichever value comes first, so no
    /// reader of this body could take another value than fixity.
    #[test]
    fn repeated_keys_are_refused_at_every_level_read() {
        let tagged = r#""image":"registry.example/app:1""#;
        let pinned = format!(r#""image":"{PINNED}""#);
        let escaped = format!(r#""im\u0061ge":"{PINNED}""#);
        let pod_cases: &[(&str, &str)] = &[
            (r#""apiVersion""#, r#""apiVersion":"admission.k8s.io/v1""#),
            (r#""kind":"AdmissionReview""#, r#""kind":"AdmissionReview""#),
            (r#""request""#, r#""request":null"#),
            (r#""uid":"u-1""#, r#""uid":"u-2""#),
            (r#""kind":{"group""#, r#""kind":{"kind":"ConfigMap"}"#),
            (r#""resource""#, r#""resource":{"resource":"configmaps"}"#),
            (r#""operation""#, r#""operation":"DELETE""#),
            (r#""operation""#, r#""subResource":"","subResource":"exec""#),
            (r#""namespace""#, r#""namespace":"kube-system""#),
            (r#""namespace""#, r#""name":"a","name":"b""#),
            (r#""namespace""#, r#""dryRun":false,"dryRun":true"#),
            (r#""userInfo""#, r#""userInfo":null"#),
            (r#""object""#, r#""object":null"#),
            (r#""object""#, r#""oldObject":null,"oldObject":{}"#),
            (
                r#""group":"","version":"v1","kind":"Pod""#,
                r#""group":"apps""#,
            ),
            (r#""kind":"Pod""#, r#""kind":"Deployment""#),
            (r#""username""#, r#""username":"bob""#),
            (r#""groups""#, r#""groups":["system:masters"]"#),
            (r#""metadata""#, r#""metadata":{}"#),
            (r#""spec""#, r#""spec":{}"#),
            (r#""uid":"obj-1""#, r#""uid":"obj-2""#),
            (r#""serviceAccountName""#, r#""serviceAccountName":"x""#),
            (r#""imagePullSecrets""#, r#""imagePullSecrets":[]"#),
            (r#""initContainers""#, r#""initContainers":[]"#),
            (r#""containers""#, r#""containers":[]"#),
            (
                r#""containers""#,
                r#""ephemeralContainers":[],"ephemeralContainers":[]"#,
            ),
            (r#""volumes""#, r#""volumes":[]"#),
            (r#""name":"pull""#, r#""name":"other""#),
            (r#""name":"app""#, r#""name":"other""#),
            (tagged, &pinned),
            (&pinned, tagged),
            (tagged, &escaped),
            (r#""name":"data""#, r#""name":"other""#),
            (r#""image":{"reference""#, r#""image":{}"#),
            (r#""reference""#, r#""reference":"x""#),
        ];
        let containers = r#"{"containers":[{"name":"app","image":"registry.example/app:1"}]}"#;
        let controller = format!(r#"{{"template":{{"spec":{containers}}}}}"#);
        let cron = format!(r#"{{"jobTemplate":{{"spec":{controller}}}}}"#);
        let controller = workload_review("Deployment", "apps", &controller);
        let cron = workload_review("CronJob", "batch", &cron);
        let workload_cases: &[(&str, &str)] = &[
            (r#""template""#, r#""template":{}"#),
            (r#""spec":{"containers""#, r#""spec":{}"#),
            (tagged, &pinned),
            (r#""jobTemplate""#, r#""jobTemplate":{}"#),
            (r#""spec":{"template""#, r#""spec":{}"#),
        ];
        let pod = pod_review();
        for body in [&pod, &controller, &cron] {
            let review = decode(body).unwrap_or_else(|e| panic!("{e}: {body}"));
            assert!(matches!(
                review.request.unwrap().object,
                Some(Object::Pod(_))
            ));
        }
        let bodies = (pod_cases.iter().map(|c| (&pod, c)))
            .chain(workload_cases.iter().map(|c| (&controller, c)))
            .chain(workload_cases.iter().map(|c| (&cron, c)))
            .filter(|(body, (at, _))| body.contains(at));
        let mut checked = 0;
        for (body, (at, member)) in bodies {
            let body = repeat(body, at, member);
            match decode(&body) {
                Ok(_) => panic!("{member} repeated was read: {body}"),
                Err(e) => assert!(e.to_string().contains("duplicate field"), "{member}: {e}"),
            }
            checked += 1;
        }
        // Every pod case, every workload case on the CronJob, all but `jobTemplate` on the
        // Deployment.
        assert_eq!(checked, pod_cases.len() + 2 * workload_cases.len() - 1);
    }

    /// Objects kept raw are read later, by the same rules.
    #[test]
    fn repeated_keys_in_raw_objects_are_refused_when_read() {
        let spec =
            r#"{"template":{"spec":{"containers":[{"name":"app","image":"a:1","image":"a:2"}]}}}"#;
        let e = PodSpec::read(PodCarrier::Controller, spec).unwrap_err();
        assert!(e.to_string().contains("duplicate field `image`"), "{e}");
        let object = format!(r#"{{"spec":{spec}}}"#);
        let e = PodSpec::read(PodCarrier::Controller, &object).unwrap_err();
        assert!(e.to_string().contains("duplicate field `image`"), "{e}");
        for (text, key) in [
            (r#"{"a":1,"a":1}"#, "a"),
            (r#"{"a":{"b":[{"c":1,"d":2,"c":3}]}}"#, "c"),
            (r#"{"labels":{"app":"x","\u0061pp":"y"}}"#, "app"),
        ] {
            let e = DistinctKeys::read(text).unwrap_err();
            assert!(
                e.to_string().contains(&format!("duplicate key {key:?}")),
                "{text}: {e}"
            );
            assert!(
                serde_json::from_str::<Value>(text).is_ok(),
                "serde_json keeps the last"
            );
        }
    }

    #[test]
    fn distinct_keys_reads_what_serde_json_reads() {
        let bodies = [
            include_str!("../../tests/fixtures/admission/deployment-create-tagged.json"),
            include_str!("../../tests/fixtures/admission/pod-update-image.json"),
            include_str!("../../benches/load/fixtures/pod-create.json"),
            r#"[1, -2, 3.5, -0.0, 1e300, 18446744073709551615, "é\n", true, false, null, {}, []]"#,
        ];
        for body in bodies {
            let theirs: Value = serde_json::from_str(body).unwrap();
            assert_eq!(DistinctKeys::read(body).unwrap(), theirs);
        }
        // Nesting is limited where serde_json limits it: 126 levels read, 128 refused.
        assert!(DistinctKeys::read(&nested(63)).is_ok());
        for depth in [64, 10_000] {
            let e = DistinctKeys::read(&nested(depth)).unwrap_err();
            assert!(e.to_string().contains("recursion limit exceeded"), "{e}");
            assert!(serde_json::from_str::<Value>(&nested(depth)).is_err());
        }
    }

    fn nested(depth: usize) -> String {
        format!("{}1{}", r#"{"a":["#.repeat(depth), "]}".repeat(depth))
    }

    /// What is stepped over or kept raw is scanned by a loop, however deep (no stack to
    /// overflow, and nothing read from it); whatever builds a value from it stops at serde_json's
    /// limit of 128 levels.
    #[test]
    fn deep_nesting_overflows_no_stack_and_is_limited_where_values_are_built() {
        let deep = nested(50_000);
        let pod = pod_review();
        let member = format!(r#""deep":{deep}"#);
        for (what, at) in [
            ("request", r#""uid":"u-1""#),
            ("object", r#""metadata""#),
            ("metadata", r#""name":"web""#),
            ("spec", r#""serviceAccountName""#),
            ("container", r#""name":"app""#),
            ("image volume", r#""reference""#),
        ] {
            let body = repeat(&pod, at, &member);
            let review = decode(&body).unwrap_or_else(|e| panic!("{what}: {e}"));
            let request = review.request.unwrap();
            let spec = request
                .object
                .as_ref()
                .unwrap()
                .pod_spec(PodCarrier::Pod)
                .unwrap();
            assert_eq!(
                spec.containers[0].image.as_deref(),
                Some("registry.example/app:1"),
                "{what}"
            );
        }
        // A raw object: captured whole, and limited again when read whole.
        let connect = pod.replacen(r#""operation":"CREATE""#, r#""operation":"CONNECT""#, 1);
        let body = repeat(&connect, r#""metadata""#, &member);
        let review = decode(&body).unwrap();
        let raw = review.request.unwrap().object.unwrap().raw().unwrap();
        assert!(raw.get().contains(&deep));
        let e = DistinctKeys::read(raw.get()).unwrap_err();
        assert!(e.to_string().contains("recursion limit exceeded"), "{e}");
        // A review nested deeply where a value is built is refused.
        let e = decode(&format!(r#"{{"request":{{"uid":{deep}}}}}"#)).unwrap_err();
        assert!(e.to_string().contains("invalid type"), "{e}");
        let e = decode(&"[".repeat(100_000)).unwrap_err();
        assert!(e.to_string().contains("invalid type"), "{e}");
    }
}
