//! An AdmissionReview as the API server (or anyone who reaches the port) sends it, through
//! decode, intent, evaluation and the answer, under a policy with every rule.
//!
//! Properties: the answer is a well-formed AdmissionReview carrying the request's uid (the one
//! the decoder read, or the one recovered from an unreadable body); a body the decoder rejects
//! is never allowed; and a body is never allowed when its canonical form (parsed and written
//! again by serde_json: same keys, same values) is denied.
#![no_main]

use std::sync::{Arc, OnceLock};

use fixity::admission::{Answer, Reviewer, review};
use fixity::audit::Metrics;
use fixity::policy::PolicyStore;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

struct Harness {
    runtime: tokio::runtime::Runtime,
    reviewer: Reviewer,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let store = Arc::new(PolicyStore::fixed(fixity_fuzz::every_rule(true)));
        Harness {
            runtime: tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime"),
            reviewer: Reviewer::new(store, Arc::new(Metrics::default())),
        }
    })
}

/// Checks the answer's shape and returns its uid.
fn well_formed(answer: &Answer) -> String {
    let body: Value = serde_json::from_slice(&answer.body).expect("the answer is JSON");
    assert_eq!(body["apiVersion"], review::API_VERSION);
    assert_eq!(body["kind"], review::KIND);
    let response = &body["response"];
    assert_eq!(response["allowed"].as_bool(), Some(answer.allowed));
    if !answer.allowed {
        assert!(
            response["status"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "a denial says why: {body}"
        );
    }
    response["uid"].as_str().expect("a uid").to_owned()
}

fuzz_target!(|data: &[u8]| {
    let h = harness();
    let answer = h.runtime.block_on(h.reviewer.review(data));
    let uid = well_formed(&answer);

    let decoded = std::str::from_utf8(data)
        .ok()
        .and_then(|t| review::decode(t).ok());
    match &decoded {
        Some(r) => {
            if let Some(request) = &r.request {
                assert_eq!(
                    uid,
                    request.uid.as_ref(),
                    "the answer carries the request's uid"
                );
            }
        }
        None => {
            assert!(!answer.allowed, "an unreadable body was allowed");
            assert_eq!(uid, review::recover_uid(data).unwrap_or_default());
        }
    }
    if !uid.is_empty() {
        assert_eq!(answer.http_status, 200, "an answer with a uid is a 200");
    }

    if answer.allowed
        && let Ok(value) = serde_json::from_slice::<Value>(data)
    {
        let canonical = serde_json::to_vec(&value).expect("a Value serialises");
        let again = h.runtime.block_on(h.reviewer.review(&canonical));
        assert!(
            again.allowed,
            "allowed, but its canonical form is denied: {}",
            String::from_utf8_lossy(&again.body)
        );
    }
});
