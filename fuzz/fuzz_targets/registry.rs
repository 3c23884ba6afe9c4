//! What a registry, or a hostile one, answers: a signature manifest, a referrers list (or the
//! referrers tag), a token service's answer, and the `WWW-Authenticate` values of a 401. The
//! first byte chooses which; the rest is the answer.
//!
//! Properties: a manifest or index is found only with schema version 2 and a media type of its
//! kind; a token yields an `Authorization` header that can be sent (anything else is refused
//! here, never failing later as if the registry were unreachable).
#![no_main]

use fixity::verify::fuzzing::{self, Read};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// The two fields the property judges. Every other field is skipped as the reader skips it
/// (serde's ignored fields: strings not checked for UTF-8, numbers not checked for range, such
/// as `1E900`, which a whole-document `Value` refuses).
#[derive(serde::Deserialize)]
struct Declared {
    #[serde(rename = "schemaVersion")]
    schema_version: Option<Value>,
    #[serde(rename = "mediaType")]
    media_type: Option<Value>,
}

/// What the body declares itself to be.
fn declared(body: &[u8], kinds: &[&str]) -> bool {
    let Ok(declared) = serde_json::from_slice::<Declared>(body) else {
        return false;
    };
    declared.schema_version.is_some_and(|v| v == 2)
        && declared
            .media_type
            .is_none_or(|m| m.is_null() || m.as_str().is_some_and(|m| kinds.contains(&m)))
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 4 {
        0 => {
            if let Read::Found(_) = fuzzing::signature_manifest(body) {
                assert!(declared(
                    body,
                    &[
                        "application/vnd.oci.image.manifest.v1+json",
                        "application/vnd.docker.distribution.manifest.v2+json"
                    ]
                ));
            }
        }
        1 => {
            if let Read::Found(_) = fuzzing::referrers(body) {
                assert!(declared(
                    body,
                    &[
                        "application/vnd.oci.image.index.v1+json",
                        "application/vnd.docker.distribution.manifest.list.v2+json"
                    ]
                ));
            }
        }
        2 => {
            if let Ok(header) = fuzzing::token(body) {
                assert!(
                    http::HeaderValue::from_str(&header).is_ok(),
                    "the token {header:?} cannot be sent"
                );
            }
        }
        _ => {
            let Ok(text) = std::str::from_utf8(body) else {
                return;
            };
            let values: Vec<&str> = text.split('\n').collect();
            let _ = fuzzing::challenges(&values);
        }
    }
});
