//! The AdmissionReview v1 wire format: what the API server sends, and what fixity answers.
//! Only the fields fixity reads are decoded; objects stay raw until a kind needs them.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;

pub const API_VERSION: &str = "admission.k8s.io/v1";
pub const KIND: &str = "AdmissionReview";

/// An incoming review. Strings borrow from the request body where they can.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionReview<'a> {
    #[serde(borrow, default)]
    pub api_version: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub request: Option<AdmissionRequest<'a>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionRequest<'a> {
    #[serde(borrow)]
    pub uid: Cow<'a, str>,
    #[serde(borrow)]
    pub kind: GroupVersionKind<'a>,
    #[serde(borrow)]
    pub resource: GroupVersionResource<'a>,
    #[serde(borrow, default, deserialize_with = "nullable")]
    pub sub_resource: Cow<'a, str>,
    #[serde(borrow)]
    pub operation: Cow<'a, str>,
    #[serde(borrow, default, deserialize_with = "nullable")]
    pub namespace: Cow<'a, str>,
    #[serde(borrow, default, deserialize_with = "nullable")]
    pub name: Cow<'a, str>,
    #[serde(borrow, default, deserialize_with = "nullable")]
    pub user_info: UserInfo<'a>,
    #[serde(borrow, default)]
    pub object: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub old_object: Option<&'a RawValue>,
    #[serde(default, deserialize_with = "nullable")]
    pub dry_run: bool,
}

#[derive(Debug, Deserialize)]
pub struct GroupVersionKind<'a> {
    #[serde(borrow, default, deserialize_with = "nullable")]
    pub group: Cow<'a, str>,
    #[serde(borrow, default, deserialize_with = "nullable")]
    pub version: Cow<'a, str>,
    #[serde(borrow)]
    pub kind: Cow<'a, str>,
}

#[derive(Debug, Deserialize)]
pub struct GroupVersionResource<'a> {
    #[serde(borrow, default, deserialize_with = "nullable")]
    pub group: Cow<'a, str>,
    #[serde(borrow, default, deserialize_with = "nullable")]
    pub version: Cow<'a, str>,
    #[serde(borrow)]
    pub resource: Cow<'a, str>,
}

#[derive(Debug, Default, Deserialize)]
pub struct UserInfo<'a> {
    #[serde(borrow, default, deserialize_with = "nullable")]
    pub username: Cow<'a, str>,
    #[serde(default, deserialize_with = "nullable")]
    pub groups: Vec<String>,
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
    fn nulls_read_as_missing() {
        let body = br#"{"request":{"uid":"u","kind":{"group":null,"version":"v1","kind":"Pod"},
            "resource":{"group":"","version":"v1","resource":"pods"},"subResource":null,
            "operation":"CREATE","namespace":null,"userInfo":null,"object":null,"dryRun":null}}"#;
        let review: AdmissionReview<'_> = serde_json::from_slice(body).unwrap();
        let request = review.request.unwrap();
        assert_eq!(request.sub_resource, "");
        assert!(request.object.is_none());
        assert!(!request.dry_run);
    }
}
