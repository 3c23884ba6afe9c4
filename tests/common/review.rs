//! Pod reviews under a signature policy, answered in-process by the router: the policy text,
//! the review, the answer.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

use super::fixture;
use super::registry::Key;
use fixity::admission::Reviewer;
use fixity::audit::Metrics;
use fixity::policy::{CompiledPolicy, PolicyStore};
use fixity::server::{AppState, router};
use fixity::verify::RegistryOptions;
use fixity::verify::checker::SignatureChecker;

/// A policy requiring `key`'s signature on everything under `registry`; `extra` goes into
/// `spec.images` (four spaces of indentation).
pub fn policy_yaml(registry: &str, key: &Key, extra: &str) -> String {
    let pem = key.pem_indented(14);
    format!(
        "apiVersion: fixity.dev/v1alpha1\nkind: ImmutabilityPolicy\nmetadata: {{name: signed}}\nspec:\n  images:\n{extra}    verify:\n    - images: ['{registry}/**']\n      authorities:\n        - name: release\n          key:\n            publicKey: |\n{pem}"
    )
}

/// The captured pod review with its container image replaced.
pub fn pod_review(image: &str) -> Vec<u8> {
    let mut review: Value = serde_json::from_slice(&fixture("pod-create-pinned")).unwrap();
    review["request"]["object"]["spec"]["containers"][0]["image"] = image.into();
    serde_json::to_vec(&review).unwrap()
}

/// A pod review naming `images`, one container each.
pub fn pod_review_of(images: &[String]) -> Vec<u8> {
    let mut review: Value = serde_json::from_slice(&fixture("pod-create-pinned")).unwrap();
    let template = review["request"]["object"]["spec"]["containers"][0].clone();
    let containers: Vec<Value> = images
        .iter()
        .enumerate()
        .map(|(i, image)| {
            let mut c = template.clone();
            c["name"] = format!("c{i}").into();
            c["image"] = image.as_str().into();
            c
        })
        .collect();
    review["request"]["object"]["spec"]["containers"] = containers.into();
    serde_json::to_vec(&review).unwrap()
}

/// The `response` of an AdmissionReview answer.
pub fn response(body: &[u8]) -> Value {
    serde_json::from_slice::<Value>(body).unwrap()["response"].clone()
}

/// The denial message of a response, empty when there is none.
pub fn message(r: &Value) -> String {
    r["status"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// The server's state with these policies and signature checks bounded by `deadline`.
pub fn state(
    policies: Vec<CompiledPolicy>,
    options: RegistryOptions,
    deadline: Duration,
) -> Arc<AppState> {
    let metrics = Arc::new(Metrics::default());
    let checker = SignatureChecker::new(options, deadline, metrics.clone()).unwrap();
    state_with(policies, checker, metrics)
}

/// The server's state with these policies and this signature checker.
pub fn state_with(
    policies: Vec<CompiledPolicy>,
    checker: SignatureChecker,
    metrics: Arc<Metrics>,
) -> Arc<AppState> {
    let store = Arc::new(PolicyStore::fixed(policies));
    Arc::new(AppState {
        reviewer: Reviewer::new(store.clone(), metrics.clone()).with_signatures(checker),
        store,
        metrics,
        max_body: 1 << 20,
        gate: fixity::server::Gate::new(Default::default(), 1 << 20),
    })
}

/// Posts a review to the router and returns the `response` of the answer.
pub async fn post(state: &Arc<AppState>, body: Vec<u8>) -> Value {
    let answer = router(state.clone())
        .oneshot(Request::post("/validate").body(Body::from(body)).unwrap())
        .await
        .unwrap();
    response(&answer.into_body().collect().await.unwrap().to_bytes())
}
