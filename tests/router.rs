//! In-process tests of the webhook routes: AdmissionReview fixtures for every request shape,
//! driven through the axum router without a socket.

use std::sync::Arc;

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

use common::fixture;
use fixity::admission::Reviewer;
use fixity::audit::Metrics;
use fixity::policy::{self, PolicyStore};
use fixity::server::{AppState, health_router, router};

fn state_with(policies: Vec<policy::CompiledPolicy>, max_body: usize) -> Arc<AppState> {
    let store = Arc::new(PolicyStore::fixed(policies));
    let metrics = Arc::new(Metrics::default());
    Arc::new(AppState {
        reviewer: Reviewer::new(store.clone(), metrics.clone()),
        store,
        metrics,
        max_body,
        gate: fixity::server::Gate::new(Default::default(), max_body),
    })
}

fn default_state() -> Arc<AppState> {
    state_with(vec![policy::builtin()], fixity::server::DEFAULT_MAX_BODY)
}

async fn post(state: Arc<AppState>, body: impl Into<Body>) -> (StatusCode, Value) {
    let response = router(state)
        .oneshot(
            Request::post("/validate")
                .header("content-type", "application/json")
                .body(body.into())
                .unwrap(),
        )
        .await
        .unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "response is not JSON ({e}): {}",
            String::from_utf8_lossy(&bytes)
        )
    });
    (status, json)
}

fn uid_of(body: &[u8]) -> String {
    let v: Value = serde_json::from_slice(body).unwrap();
    v["request"]["uid"].as_str().unwrap().to_owned()
}

/// Asserts a well-formed AdmissionReview response and returns its `response`.
fn response(json: &Value) -> &Value {
    assert_eq!(json["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(json["kind"], "AdmissionReview");
    &json["response"]
}

async fn review_fixture(name: &str) -> Value {
    let body = fixture(name);
    let uid = uid_of(&body);
    let (status, json) = post(default_state(), body).await;
    assert_eq!(status, StatusCode::OK, "{name}: {json}");
    let r = response(&json).clone();
    assert_eq!(r["uid"], uid, "{name}: the uid is echoed");
    r
}

fn message(r: &Value) -> &str {
    r["status"]["message"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn tagged_pod_is_denied_naming_container_image_and_rule() {
    let r = review_fixture("pod-create-tagged").await;
    assert_eq!(r["allowed"], false);
    assert_eq!(r["status"]["code"], 403);
    let m = message(&r);
    assert!(
        m.contains("MutableTag") && m.contains("\"web\"") && m.contains("nginx:1.27"),
        "{m}"
    );
    assert!(r["warnings"][0].as_str().unwrap().contains("MutableTag"));
    assert_eq!(r["auditAnnotations"]["decision"], "denied");
    // The API server copies this string into its audit log as written: keys in a stable order.
    assert_eq!(
        r["auditAnnotations"]["violations"],
        r#"[{"container":"web","decision":"denied","image":"nginx:1.27","policy":"fixity-default","reason":"MutableTag"}]"#
    );
}

#[tokio::test]
async fn pinned_pod_is_admitted() {
    let r = review_fixture("pod-create-pinned").await;
    assert_eq!(r["allowed"], true, "{r}");
    assert!(r.get("warnings").is_none());
}

#[tokio::test]
async fn workloads_are_denied_at_their_own_level() {
    for name in ["deployment-create-tagged", "cronjob-create-tagged"] {
        let r = review_fixture(name).await;
        assert_eq!(r["allowed"], false, "{name}");
        assert!(message(&r).contains("MutableTag"), "{name}: {r}");
    }
}

#[tokio::test]
async fn exec_and_attach_are_denied_portforward_admitted() {
    let r = review_fixture("exec").await;
    assert_eq!(r["allowed"], false);
    assert!(message(&r).contains("ExecDenied"), "{r}");
    let r = review_fixture("attach").await;
    assert_eq!(r["allowed"], false);
    assert!(message(&r).contains("AttachDenied"), "{r}");
    let r = review_fixture("portforward").await;
    assert_eq!(r["allowed"], true, "{r}");
}

/// The kubelet API through the API server: exec and run are exec, whatever the HTTP verb,
/// with the container the path names; read-only paths pass.
#[tokio::test]
async fn exec_through_the_kubelet_api_is_denied() {
    for name in ["nodes-proxy-exec", "nodes-proxy-run"] {
        let r = review_fixture(name).await;
        assert_eq!(r["allowed"], false, "{name}: {r}");
        assert!(
            message(&r).contains("ExecDenied") && message(&r).contains("nodes/proxy"),
            "{name}: {r}"
        );
        assert!(
            r["warnings"][0]
                .as_str()
                .unwrap()
                .contains("container \"web\""),
            "{name}: {r}"
        );
    }
    let r = review_fixture("nodes-proxy-healthz").await;
    assert_eq!(r["allowed"], true, "{r}");
}

fn node_proxy(path: &str) -> Vec<u8> {
    let mut review: Value = serde_json::from_slice(&fixture("nodes-proxy-exec")).unwrap();
    review["request"]["object"]["path"] = path.into();
    serde_json::to_vec(&review).unwrap()
}

/// A kubelet path fixity cannot classify is denied; the runtime rules decide the streams,
/// in the namespace the path names.
#[tokio::test]
async fn kubelet_paths_are_judged_by_the_policy_of_the_namespace_they_reach() {
    let (_, json) = post(default_state(), node_proxy("/checkpoint/capture/web/web")).await;
    let r = response(&json);
    assert_eq!(r["allowed"], false, "{json}");
    assert!(message(r).contains("NodeProxyDenied"), "{json}");
    let (_, json) = post(default_state(), node_proxy("/portForward/capture/web")).await;
    assert_eq!(
        response(&json)["allowed"],
        true,
        "port-forward is allowed by default: {json}"
    );

    let lenient: fixity::policy::ImmutabilityPolicySpec = serde_json::from_value(
        serde_json::json!({"runtime": {"exec": "Allow", "portForward": "Deny"}}),
    )
    .unwrap();
    let elsewhere: fixity::policy::ImmutabilityPolicySpec =
        serde_json::from_value(serde_json::json!({"match": {"excludeNamespaces": ["capture"]}}))
            .unwrap();
    let state = state_with(
        vec![
            policy::CompiledPolicy::from_spec("lenient".into(), &lenient).unwrap(),
            policy::CompiledPolicy::from_spec("elsewhere".into(), &elsewhere).unwrap(),
        ],
        fixity::server::DEFAULT_MAX_BODY,
    );
    let (_, json) = post(state.clone(), node_proxy("/exec/capture/web/web")).await;
    assert_eq!(
        response(&json)["allowed"],
        true,
        "exec allowed in capture: {json}"
    );
    let (_, json) = post(state.clone(), node_proxy("/exec/other/web/web")).await;
    assert!(
        message(response(&json)).contains("[elsewhere] ExecDenied"),
        "the namespace in the path chose the policies: {json}"
    );
    let (_, json) = post(state, node_proxy("/portForward/capture/web")).await;
    assert!(
        message(response(&json)).contains("PortForwardDenied"),
        "{json}"
    );
}

#[tokio::test]
async fn adding_an_ephemeral_container_is_denied() {
    let r = review_fixture("ephemeralcontainers-add").await;
    assert_eq!(r["allowed"], false);
    assert!(message(&r).contains("EphemeralContainerDenied"), "{r}");
}

/// Kubernetes 1.21 sent pods/ephemeralcontainers as kind EphemeralContainers, the containers
/// at the top of the object: read as a Pod it holds none, and it was admitted. A pod-carrying
/// resource in a shape fixity does not know is denied instead.
#[tokio::test]
async fn pod_carrying_objects_of_unknown_shapes_are_denied() {
    let mut review: Value = serde_json::from_slice(&fixture("ephemeralcontainers-add")).unwrap();
    let request = &mut review["request"];
    let pod = request["object"].clone();
    request["kind"]["kind"] = "EphemeralContainers".into();
    for field in ["object", "oldObject"] {
        request[field] = serde_json::json!({
            "kind": "EphemeralContainers",
            "apiVersion": "v1",
            "metadata": pod["metadata"],
            "ephemeralContainers": pod["spec"]["ephemeralContainers"],
        });
    }
    request["oldObject"]["ephemeralContainers"] = serde_json::json!([]);
    let (_, json) = post(default_state(), serde_json::to_vec(&review).unwrap()).await;
    let r = response(&json);
    assert_eq!(r["allowed"], false, "{json}");
    assert!(
        message(r).contains("pods/ephemeralcontainers sent as kind \"EphemeralContainers\""),
        "{json}"
    );

    // A Deployment resource whose object claims another kind, and a workload kind under a
    // resource that carries another: neither is read as something it is not.
    for (resource, kind) in [("deployments", "Scale"), ("deployments", "Pod")] {
        let mut review: Value =
            serde_json::from_slice(&fixture("deployment-create-tagged")).unwrap();
        review["request"]["resource"]["resource"] = resource.into();
        review["request"]["kind"] = serde_json::json!({"group": "", "version": "v1", "kind": kind});
        let (_, json) = post(default_state(), serde_json::to_vec(&review).unwrap()).await;
        assert_eq!(response(&json)["allowed"], false, "{kind}: {json}");
    }
}

/// Older API versions of the workload kinds carry the same template: checked, not skipped.
#[tokio::test]
async fn extensions_workloads_are_checked() {
    for kind in ["Deployment", "DaemonSet", "ReplicaSet"] {
        let mut review: Value =
            serde_json::from_slice(&fixture("deployment-create-tagged")).unwrap();
        review["request"]["kind"] =
            serde_json::json!({"group": "extensions", "version": "v1beta1", "kind": kind});
        review["request"]["resource"] = serde_json::json!({
            "group": "extensions", "version": "v1beta1",
            "resource": format!("{}s", kind.to_lowercase()),
        });
        let (_, json) = post(default_state(), serde_json::to_vec(&review).unwrap()).await;
        let r = response(&json);
        assert_eq!(r["allowed"], false, "{kind}: {json}");
        assert!(message(r).contains("MutableTag"), "{kind}: {json}");
    }
}

#[tokio::test]
async fn an_existing_ephemeral_container_never_wedges_the_pod() {
    // The same pod updated again without adding anything: oldObject already has the container.
    let mut review: Value = serde_json::from_slice(&fixture("ephemeralcontainers-add")).unwrap();
    review["request"]["oldObject"] = review["request"]["object"].clone();
    let (_, json) = post(default_state(), serde_json::to_vec(&review).unwrap()).await;
    assert_eq!(response(&json)["allowed"], true, "{json}");
}

#[tokio::test]
async fn in_place_image_change_denied_relabel_admitted() {
    let r = review_fixture("pod-update-image").await;
    assert_eq!(r["allowed"], false);
    assert!(message(&r).contains("ImageUpdateDenied"), "{r}");
    let r = review_fixture("pod-update-labels").await;
    assert_eq!(r["allowed"], true, "{r}");
}

/// A workload update as the deployment controller or a user sends it: `change` edits the
/// new object after a tagged template was already stored.
fn deployment_update(change: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut review: Value = serde_json::from_slice(&fixture("deployment-create-tagged")).unwrap();
    review["request"]["operation"] = "UPDATE".into();
    review["request"]["oldObject"] = review["request"]["object"].clone();
    change(&mut review["request"]["object"]);
    serde_json::to_vec(&review).unwrap()
}

#[tokio::test]
async fn workload_updates_are_checked_when_the_template_changes() {
    let scale = deployment_update(|d| d["spec"]["replicas"] = 0.into());
    let (_, json) = post(default_state(), scale).await;
    assert_eq!(
        response(&json)["allowed"],
        true,
        "scaling an old workload: {json}"
    );

    let restart = deployment_update(|d| {
        d["spec"]["template"]["metadata"]["annotations"] =
            serde_json::json!({"kubectl.kubernetes.io/restartedAt": "2026-11-26T17:00:00Z"});
    });
    let (_, json) = post(default_state(), restart).await;
    assert_eq!(
        response(&json)["allowed"],
        false,
        "a restart creates pods from the tagged template: {json}"
    );

    let pinned = deployment_update(|d| {
        d["spec"]["template"]["spec"]["containers"][0]["image"] =
            "nginx@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef".into();
    });
    let (_, json) = post(default_state(), pinned).await;
    assert_eq!(
        response(&json)["allowed"],
        true,
        "moving to a pinned image: {json}"
    );
}

#[tokio::test]
async fn audit_mode_admits_with_warnings_and_counts() {
    let text = "apiVersion: fixity.dev/v1alpha1\nkind: ImmutabilityPolicy\nmetadata: {name: observe}\nspec: {mode: Audit}\n";
    let policies = policy::files::parse(std::path::Path::new("audit.yaml"), text).unwrap();
    let state = state_with(policies, 1 << 20);
    let (_, json) = post(state.clone(), fixture("pod-create-tagged")).await;
    let r = response(&json);
    assert_eq!(r["allowed"], true);
    let warning = r["warnings"][0].as_str().unwrap();
    assert!(
        warning.contains("would deny") && warning.contains("MutableTag"),
        "{warning}"
    );
    assert_eq!(r["auditAnnotations"]["decision"], "admitted");
    let metrics = state.metrics.render();
    assert!(
        metrics.contains(r#"fixity_violations_total{policy="observe",reason="MutableTag",mode="Audit",decision="would_deny"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn invalid_policies_are_refused_at_apply_time() {
    let review = serde_json::json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "p-1", "operation": "CREATE", "name": "broken",
            "kind": {"group": "fixity.dev", "version": "v1alpha1", "kind": "ImmutabilityPolicy"},
            "resource": {"group": "fixity.dev", "version": "v1alpha1", "resource": "immutabilitypolicies"},
            "object": {"apiVersion": "fixity.dev/v1alpha1", "kind": "ImmutabilityPolicy",
                       "metadata": {"name": "broken"},
                       "spec": {"images": {"allowedRegistries": ["nginx"]}}}
        }
    });
    let (_, json) = post(default_state(), serde_json::to_vec(&review).unwrap()).await;
    let r = response(&json);
    assert_eq!(r["allowed"], false);
    assert_eq!(r["status"]["code"], 422);
    assert!(message(r).contains("allowedRegistries[0]"), "{r}");
}

/// A policy whose selector names a label twice means one thing to a reader that keeps the first
/// value and another to one that keeps the last: it is refused, not validated as either.
#[tokio::test]
async fn policies_with_a_key_written_twice_are_refused() {
    let review = |labels: &str| {
        format!(
            r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{{"uid":"p-2","operation":"CREATE","name":"prod","kind":{{"group":"fixity.dev","version":"v1alpha1","kind":"ImmutabilityPolicy"}},"resource":{{"group":"fixity.dev","version":"v1alpha1","resource":"immutabilitypolicies"}},"object":{{"apiVersion":"fixity.dev/v1alpha1","kind":"ImmutabilityPolicy","metadata":{{"name":"prod"}},"spec":{{"match":{{"namespaceSelector":{{"matchLabels":{labels}}}}}}}}}}}}}"#
        )
    };
    let (_, json) = post(default_state(), review(r#"{"env":"prod"}"#)).await;
    assert_eq!(response(&json)["allowed"], true, "{json}");
    let (_, json) = post(default_state(), review(r#"{"env":"prod","env":"dev"}"#)).await;
    let r = response(&json);
    assert_eq!(r["allowed"], false, "{json}");
    assert_eq!(r["status"]["code"], 422);
    assert!(message(r).contains(r#"duplicate key "env""#), "{r}");
}

fn policy_review(spec: Value) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "p-2", "operation": "CREATE", "name": "keyed",
            "kind": {"group": "fixity.dev", "version": "v1alpha1", "kind": "ImmutabilityPolicy"},
            "resource": {"group": "fixity.dev", "version": "v1alpha1", "resource": "immutabilitypolicies"},
            "object": {"apiVersion": "fixity.dev/v1alpha1", "kind": "ImmutabilityPolicy",
                       "metadata": {"name": "keyed"}, "spec": spec}
        }
    }))
    .unwrap()
}

/// The policy webhook checked a policy with its referenced authorities stripped, so a rule
/// whose only authority is a secretRef was not checked at all: a bad glob there passed, and
/// then made the whole policy invalid in the watcher. The whole policy is checked now, and
/// the answer warns what happens until the Secret can be read.
#[tokio::test]
async fn policies_with_references_are_checked_whole_when_applied() {
    let secret_ref = serde_json::json!({"secretRef": {"namespace": "fixity", "name": "release-key", "key": "cosign.pub"}});
    let bad = policy_review(serde_json::json!({
        "images": {"verify": [{"images": ["nginx"], "authorities": [{"key": secret_ref}]}]}
    }));
    let (_, json) = post(default_state(), bad).await;
    let r = response(&json);
    assert_eq!(r["allowed"], false, "{json}");
    assert!(
        message(r).contains("spec.images.verify[0].images[0]"),
        "{r}"
    );

    let good = policy_review(serde_json::json!({
        "images": {"verify": [{"images": ["ghcr.io/acme/**"], "authorities": [{"key": secret_ref}]}]}
    }));
    let (_, json) = post(default_state(), good).await;
    let r = response(&json);
    assert_eq!(r["allowed"], true, "{json}");
    let warning = r["warnings"][0].as_str().unwrap_or_default();
    assert!(
        warning.contains("key secret fixity/release-key") && warning.contains("denied"),
        "{json}"
    );
}

/// A policy the watcher compiled without its key: the review path denies the images its
/// rule covers with the reason, and everything else as before.
#[tokio::test]
async fn a_policy_without_its_key_denies_what_the_key_would_vouch_for() {
    use fixity::policy::crd::DataRef;
    use fixity::policy::refs::{Read, RefData, Target};
    let policy: fixity::policy::ImmutabilityPolicy = serde_json::from_value(serde_json::json!({
        "apiVersion": "fixity.dev/v1alpha1", "kind": "ImmutabilityPolicy",
        "metadata": {"name": "keyed"},
        "spec": {"images": {"onVerificationError": "Allow", "verify": [{"images": ["docker.io/library/**"],
            "authorities": [{"key": {"secretRef": {"namespace": "fixity", "name": "release-key", "key": "cosign.pub"}}}]}]}}
    }))
    .unwrap();
    let target = Target::Secret(DataRef {
        namespace: "fixity".into(),
        name: "release-key".into(),
        key: "cosign.pub".into(),
    });
    let refs = RefData::from([(
        target,
        Read::Unreadable("secret fixity/release-key does not exist".into()),
    )]);
    let compiled =
        policy::CompiledPolicy::from_cluster("keyed".into(), &policy.spec, &refs).unwrap();
    let state = state_with(vec![compiled], fixity::server::DEFAULT_MAX_BODY);
    let (_, json) = post(state.clone(), fixture("pod-create-pinned")).await;
    let r = response(&json);
    assert_eq!(r["allowed"], false, "{json}");
    assert!(
        message(r).contains("ReferenceUnavailable")
            && message(r).contains("secret fixity/release-key does not exist"),
        "{r}"
    );
    let (_, json) = post(state, fixture("pod-create-tagged")).await;
    assert!(message(response(&json)).contains("MutableTag"), "{json}");
}

#[tokio::test]
async fn garbage_truncated_and_wrong_bodies_are_never_allowed() {
    let whole = fixture("pod-create-pinned");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("garbage", b"\x00\xff not json at all".to_vec()),
        ("truncated", whole[..whole.len() / 2].to_vec()),
        ("array", b"[1,2,3]".to_vec()),
        ("no request", br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec()),
        ("v1beta1", String::from_utf8(whole.clone()).unwrap().replace("admission.k8s.io/v1", "admission.k8s.io/v1beta1").into_bytes()),
        ("object is a string", br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"x-1","kind":{"group":"","version":"v1","kind":"Pod"},"resource":{"group":"","version":"v1","resource":"pods"},"operation":"CREATE","object":"pod"}}"#.to_vec()),
        ("create without object", br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"x-2","kind":{"group":"apps","version":"v1","kind":"Deployment"},"resource":{"group":"apps","version":"v1","resource":"deployments"},"operation":"CREATE"}}"#.to_vec()),
        ("containers not a list", br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"x-3","kind":{"group":"","version":"v1","kind":"Pod"},"resource":{"group":"","version":"v1","resource":"pods"},"operation":"CREATE","object":{"spec":{"containers":{"name":"a"}}}}}"#.to_vec()),
        ("deeply nested", format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes()),
    ];
    for (what, body) in cases {
        let (status, json) = post(default_state(), body).await;
        let r = response(&json);
        assert_eq!(r["allowed"], false, "{what}: {json}");
        assert!(message(r).starts_with("fixity: "), "{what}: {json}");
        assert!(
            status == StatusCode::OK || status == StatusCode::BAD_REQUEST,
            "{what}: {status}"
        );
    }
}

#[tokio::test]
async fn truncated_bodies_keep_their_uid() {
    let whole = fixture("pod-create-tagged");
    let uid = uid_of(&whole);
    let cut = &whole[..whole.windows(8).position(|w| w == b"\"object\"").unwrap() + 12];
    let (status, json) = post(default_state(), cut.to_vec()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(response(&json)["uid"], uid);
    assert_eq!(response(&json)["allowed"], false);
}

#[tokio::test]
async fn bodies_that_are_not_utf8_are_refused_with_their_uid() {
    // The API server only sends UTF-8; a stray byte even in a field fixity skips is refused.
    let whole = fixture("pod-create-pinned");
    let uid = uid_of(&whole);
    let at = whole.windows(6).position(|w| w == b"\"name\"").unwrap() + 9;
    let mut body = whole.clone();
    body.insert(at, 0xff);
    let (status, json) = post(default_state(), body).await;
    assert_eq!(status, StatusCode::OK);
    let r = response(&json);
    assert_eq!(r["uid"], uid);
    assert_eq!(r["allowed"], false);
    assert!(message(r).contains("not UTF-8"), "{json}");
}

/// A key written twice where fixity reads it: one reader could take the first value and
/// another the last, so the request is refused instead of either being guessed.
#[tokio::test]
async fn repeated_keys_are_refused_not_guessed() {
    let whole = String::from_utf8(fixture("pod-create-pinned")).unwrap();
    let uid = uid_of(whole.as_bytes());
    let pinned = r#""image": "nginx@sha256:"#;
    let tagged_first = format!(r#""image": "nginx:1.27", {pinned}"#);
    let escaped_key = format!(
        r#"{pinned}0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef", "im\u0061ge": "nginx@sha256:"#
    );
    for (body, answered_uid) in [
        (whole.replacen(pinned, &tagged_first, 1), uid.as_str()),
        (whole.replacen(pinned, &escaped_key, 1), uid.as_str()),
        // The uid itself: the answer names the first, as a truncated body's would.
        (
            whole.replacen(r#""uid": "#, r#""uid": "first", "uid": "#, 1),
            "first",
        ),
    ] {
        assert_ne!(body, whole);
        let (status, json) = post(default_state(), body).await;
        assert_eq!(status, StatusCode::OK, "{json}");
        let r = response(&json);
        assert_eq!(r["allowed"], false, "{json}");
        assert!(message(r).contains("duplicate field"), "{json}");
        assert_eq!(r["uid"], answered_uid, "{json}");
    }
}

#[tokio::test]
async fn oversized_bodies_are_refused_with_a_review() {
    let state = state_with(vec![policy::builtin()], 1024);
    let mut body = fixture("pod-create-pinned");
    body.extend(std::iter::repeat_n(b' ', 4096));
    let (status, json) = post(state, body).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(response(&json)["allowed"], false);
    assert!(message(response(&json)).contains("1024 byte limit"));
}

#[tokio::test]
async fn health_endpoints() {
    let state = default_state();
    for (path, expected) in [
        ("/livez", StatusCode::OK),
        ("/readyz", StatusCode::OK),
        ("/metrics", StatusCode::OK),
    ] {
        let response = health_router(state.clone())
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), expected, "{path}");
    }
    let store = Arc::new(PolicyStore::pending());
    let metrics = Arc::new(Metrics::default());
    let pending = Arc::new(AppState {
        reviewer: Reviewer::new(store.clone(), metrics.clone()),
        store,
        metrics,
        max_body: 1024,
        gate: fixity::server::Gate::new(Default::default(), 1024),
    });
    let response = health_router(pending)
        .oneshot(Request::get("/readyz").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
}

/// An exec or attach a policy forbids but admits (audited, exempted) is handed to the taint
/// queue, with who, what and how; a denied one, or one no policy forbids, is not.
#[tokio::test]
async fn admitted_entries_are_queued_for_the_taint_controller() {
    use fixity::audit::EnteredSink;
    use fixity::audit::entered::Entry;
    let text = "apiVersion: fixity.dev/v1alpha1\nkind: ImmutabilityPolicy\nmetadata: {name: glass}\nspec:\n  exemptions: [{groups: [\"fixity:break-glass\"]}]\n---\napiVersion: fixity.dev/v1alpha1\nkind: ImmutabilityPolicy\nmetadata: {name: watch}\nspec: {mode: Audit}\n";
    let policies = policy::files::parse(std::path::Path::new("p.yaml"), text).unwrap();
    let store = Arc::new(PolicyStore::fixed(policies));
    let metrics = Arc::new(Metrics::default());
    let (sink, mut entered) = EnteredSink::channel();
    let reviewer = Reviewer::new(store, metrics).with_entered(sink);
    let exec = |groups: &[&str], sub: &str| {
        let mut review: Value = serde_json::from_slice(&fixture("exec")).unwrap();
        review["request"]["subResource"] = sub.into();
        review["request"]["userInfo"]["username"] = "oncall".into();
        review["request"]["userInfo"]["groups"] = serde_json::json!(groups);
        serde_json::to_vec(&review).unwrap()
    };
    let answer = reviewer
        .review(&exec(&["fixity:break-glass"], "exec"))
        .await;
    assert!(answer.allowed);
    let e = entered.try_recv().expect("the admitted exec is queued");
    assert_eq!(
        (e.namespace.as_str(), e.pod.as_str(), e.user.as_str()),
        ("capture", "web", "oncall")
    );
    assert_eq!(
        (e.entry, e.container.as_deref()),
        (Entry::Exec, Some("web"))
    );
    assert_eq!(
        e.policies,
        vec![
            ("glass".to_owned(), "exempted"),
            ("watch".to_owned(), "would_deny")
        ]
    );
    let answer = reviewer
        .review(&exec(&["fixity:break-glass"], "attach"))
        .await;
    assert!(answer.allowed);
    assert_eq!(
        entered.try_recv().map(|e| e.entry).ok(),
        Some(Entry::Attach)
    );
    let denied = reviewer.review(&exec(&["developers"], "exec")).await;
    assert!(!denied.allowed);
    assert!(entered.try_recv().is_err(), "a denied exec entered nothing");
    let forward = reviewer
        .review(&exec(&["fixity:break-glass"], "portforward"))
        .await;
    assert!(forward.allowed);
    assert!(
        entered.try_recv().is_err(),
        "port-forward enters no container"
    );
}
