//! The AdmissionReview v1 wire format: what the API server sends, and what fixity answers.
//! Only the fields fixity reads are decoded. The object of a request whose pod spec fixity
//! checks is read in the same pass as the review; other objects stay raw until needed.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use super::intent::{Object, ObjectSeed};

pub const API_VERSION: &str = "admission.k8s.io/v1";
pub const KIND: &str = "AdmissionReview";

/// Reads a review from a body already checked to be UTF-8.
pub fn decode(text: &str) -> Result<AdmissionReview<'_>, crate::json::Error> {
    crate::json::from_str(text)
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
pub(crate) fn nullable_str<'de: 'a, 'a, D>(d: D) -> Result<Cow<'a, str>, D::Error>
where
    D: Deserializer<'de>,
{
    Ok(Option::<Text<'a>>::deserialize(d)?
        .map(|t| t.0)
        .unwrap_or_default())
}

/// A string that may be missing or `null`.
pub(crate) fn optional_str<'de: 'a, 'a, D>(d: D) -> Result<Option<Cow<'a, str>>, D::Error>
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
pub(crate) fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
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
        crate::json::from_str(json).unwrap()
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
    fn pod_specs_are_read_with_the_review_and_mean_the_same() {
        let head = r#""uid":"u","kind":{"group":"","version":"v1","kind":"Pod"},
            "resource":{"group":"","version":"v1","resource":"pods"},"operation":"CREATE","#;
        let in_order = request(head, "");
        assert!(matches!(in_order.object, Some(Object::Pod(_))));
        // Fields in another order than the API server's: the object stays raw.
        let reordered = request("", &format!(",{}", head.trim_end_matches(',')));
        assert!(matches!(reordered.object, Some(Object::Raw(_))));
        for r in [&in_order, &reordered] {
            assert_eq!(r.object.as_ref().and_then(Object::uid), Some("obj-1"));
        }
        assert_eq!(
            super::super::intent::extract(&in_order).unwrap(),
            super::super::intent::extract(&reordered).unwrap()
        );
        assert_eq!(
            super::super::intent::pull_context(&in_order),
            super::super::intent::pull_context(&reordered)
        );
    }

    #[test]
    fn workload_updates_keep_their_objects_raw() {
        let head = r#""uid":"u","kind":{"group":"apps","version":"v1","kind":"Deployment"},
            "resource":{"group":"apps","version":"v1","resource":"deployments"},"operation":"UPDATE","#;
        assert!(matches!(request(head, "").object, Some(Object::Raw(_))));
    }

    #[test]
    fn duplicate_and_missing_fields_are_errors() {
        let duplicate = r#"{"uid":"a","uid":"b","kind":{"kind":"Pod"},"resource":{"resource":"pods"},"operation":"CREATE"}"#;
        let e = crate::json::from_str::<AdmissionRequest<'_>>(duplicate).unwrap_err();
        assert!(e.to_string().contains("duplicate field `uid`"), "{e}");
        let missing = r#"{"uid":"a","kind":{"kind":"Pod"},"resource":{"resource":"pods"}}"#;
        let e = crate::json::from_str::<AdmissionRequest<'_>>(missing).unwrap_err();
        assert!(e.to_string().contains("missing field `operation`"), "{e}");
    }
}
