//! ImmutabilityPolicy text as `serve --policy` and `check --policy` read it, and as the policy
//! webhook sees the same object applied to a cluster.
//!
//! Properties: the policies one file yields are the policies its canonical form (every
//! document written again as JSON) yields; and a policy a file accepts is accepted by the
//! webhook that guards the cluster's policies, with a well-formed answer.
#![no_main]

use std::path::Path;
use std::sync::{Arc, OnceLock};

use fixity::admission::Reviewer;
use fixity::audit::Metrics;
use fixity::policy::{PolicyStore, files};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

fn runtime() -> &'static (tokio::runtime::Runtime, Reviewer) {
    static R: OnceLock<(tokio::runtime::Runtime, Reviewer)> = OnceLock::new();
    R.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let store = Arc::new(PolicyStore::fixed(Vec::new()));
        (runtime, Reviewer::new(store, Arc::new(Metrics::default())))
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("fuzz.yaml");
    let parsed = files::parse(path, text);
    let Ok(documents) = fixity::manifest::parse(text) else {
        assert!(parsed.is_err(), "unreadable YAML gave policies");
        return;
    };
    let canonical: Vec<String> = documents.iter().map(|d| d.object.to_string()).collect();
    let again = files::parse(path, &canonical.join("\n---\n"));
    let names = |r: &Result<Vec<fixity::policy::CompiledPolicy>, _>| {
        r.as_ref().ok().map(|ps| {
            ps.iter()
                .map(|p| (p.name.clone(), p.mode))
                .collect::<Vec<_>>()
        })
    };
    assert_eq!(
        names(&parsed),
        names(&again),
        "{text:?} and its canonical form differ"
    );

    let Ok(policies) = parsed else {
        return;
    };
    assert_eq!(policies.len(), documents.len());
    let (runtime, reviewer) = runtime();
    for doc in &documents {
        let review = json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "policy-1",
                "kind": {"group": "fixity.dev", "version": "v1alpha1", "kind": "ImmutabilityPolicy"},
                "resource": {"group": "fixity.dev", "version": "v1alpha1", "resource": "immutabilitypolicies"},
                "operation": "CREATE",
                "name": doc.name(),
                "userInfo": {"username": "admin"},
                "object": doc.object,
            }
        });
        let body = serde_json::to_vec(&review).expect("a review serialises");
        let answer = runtime.block_on(reviewer.review(&body));
        let answer: Value = serde_json::from_slice(&answer.body).expect("the answer is JSON");
        assert_eq!(answer["response"]["uid"], "policy-1");
        assert_eq!(
            answer["response"]["allowed"], true,
            "a policy the file accepts is refused by the webhook: {answer}"
        );
    }
});
