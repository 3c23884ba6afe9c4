//! The admission service: one AdmissionReview body in, one AdmissionReview body out.
//! Reads the request, works out its intent, asks the evaluator, records the violations and
//! writes the answer. HTTP concerns stay in `server`.

pub mod intent;
pub mod kubelet;
pub mod review;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use crate::audit::entered::Entry;
use crate::audit::metrics::ReviewResult;
use crate::audit::{self, Entered, EnteredSink, EventSink, Metrics, RequestInfo};
use crate::policy::evaluate::{Connect, verification_requests};
use crate::policy::refs::RefData;
use crate::policy::{
    CompiledPolicy, Decision, ImmutabilityPolicy, Intent, Outcome, PolicyStore, Subject, evaluate,
};
use crate::verify::checker::{CheckRequest, Checked, SignatureChecker};
use crate::verify::credentials::pull_secrets::PullSecrets;
use crate::verify::{AttestationCheck, SignatureCheck, Verifications};
use review::{AdmissionRequest, AdmissionReview, Response, ReviewResponse, Status};

/// Longest warning sent back; kubectl prints each on its own line.
const MAX_WARNING_LEN: usize = 240;
/// Warnings sent back at most, one per violation; one more says how many were left out.
const MAX_WARNINGS: usize = 10;
/// Denials the message names at most, each cut to [`MAX_DENIAL_LEN`] bytes, the whole to
/// [`MAX_MESSAGE_LEN`]; it ends with how many it left out.
const MAX_DENIALS: usize = 10;
const MAX_DENIAL_LEN: usize = 512;
const MAX_MESSAGE_LEN: usize = 4096;
/// Violations the `violations` audit annotation lists at most, their container and image cut
/// to [`MAX_ANNOTATED_FIELD`] bytes; `omitted` counts the others. The audit log keeps it.
const MAX_ANNOTATED: usize = 20;
const MAX_ANNOTATED_FIELD: usize = 256;
/// The audit annotation naming where signature evidence came from when not the registry.
const EVIDENCE_ANNOTATION: &str = "evidence";

/// An answer ready for the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// HTTP status: 200 whenever the request could be matched to a uid.
    pub http_status: u16,
    pub allowed: bool,
    pub body: Vec<u8>,
}

/// Answers AdmissionReviews with the policies in a store.
pub struct Reviewer {
    store: Arc<PolicyStore>,
    metrics: Arc<Metrics>,
    events: Option<EventSink>,
    signatures: Option<Arc<SignatureChecker>>,
    pull_secrets: Option<PullSecrets>,
    entered: Option<EnteredSink>,
}

impl Reviewer {
    pub fn new(store: Arc<PolicyStore>, metrics: Arc<Metrics>) -> Self {
        Self {
            store,
            metrics,
            events: None,
            signatures: None,
            pull_secrets: None,
            entered: None,
        }
    }

    /// Hands every admitted exec or attach that a policy forbids (audited, exempted) to the
    /// taint controller.
    pub fn with_entered(mut self, entered: EnteredSink) -> Self {
        self.entered = Some(entered);
        self
    }

    /// Fetches signatures with the pod's pull secrets (and its service account's, and those
    /// policies name) instead of anonymously.
    pub fn with_pull_secrets(mut self, pull_secrets: PullSecrets) -> Self {
        self.pull_secrets = Some(pull_secrets);
        self
    }

    /// Checks image signatures for policies that require them. Without a checker every such
    /// check is unavailable (and denied, unless a policy says otherwise). Shared with the
    /// background scanner, whose checks then fill the same cache.
    pub fn with_signatures(mut self, checker: impl Into<Arc<SignatureChecker>>) -> Self {
        self.signatures = Some(checker.into());
        self
    }

    /// Whether signature checks are ready: the evidence store, if any, has been read.
    pub fn is_warm(&self) -> bool {
        self.signatures.as_ref().is_none_or(|c| c.is_warm())
    }

    /// Also publishes a Kubernetes Event for each request with violations.
    pub fn with_events(mut self, events: EventSink) -> Self {
        self.events = Some(events);
        self
    }

    /// Reviews one request body.
    pub async fn review(&self, body: &[u8]) -> Answer {
        let started = Instant::now();
        // One UTF-8 check of the whole body, then serde_json over text it need not check again.
        let parsed = std::str::from_utf8(body)
            .map_err(|e| format!("it is not UTF-8 ({e})"))
            .and_then(|text| review::decode(text).map_err(|e| e.to_string()));
        let answer = match parsed {
            Ok(review) => self.review_parsed(&review).await,
            Err(e) => {
                let uid = review::recover_uid(body);
                self.unreadable(
                    uid.as_deref(),
                    &format!("the AdmissionReview could not be read: {e}"),
                )
            }
        };
        let result = match (answer.http_status, answer.allowed) {
            (200, true) => ReviewResult::Allowed,
            (200, false) => ReviewResult::Denied,
            _ => ReviewResult::Invalid,
        };
        self.metrics
            .observe_review(result, started.elapsed().as_secs_f64());
        answer
    }

    /// The answer to a body that could not be read at all (too large, broken stream).
    pub fn unreadable(&self, uid: Option<&str>, message: &str) -> Answer {
        tracing::warn!(
            uid = uid.unwrap_or_default(),
            error = message,
            "unreadable admission request"
        );
        let response = Response {
            uid: uid.unwrap_or_default(),
            allowed: false,
            status: Some(Status {
                code: 400,
                reason: "BadRequest",
                message: format!("fixity: {message}"),
            }),
            warnings: Vec::new(),
            audit_annotations: BTreeMap::new(),
        };
        // A uid lets the API server match the denial; without one it is a protocol error.
        encode(if uid.is_some() { 200 } else { 400 }, response)
    }

    async fn review_parsed(&self, review: &AdmissionReview<'_>) -> Answer {
        let uid = review.request.as_ref().map(|r| r.uid.as_ref());
        let (api_version, kind) = (
            review.api_version.as_deref().unwrap_or_default(),
            review.kind.as_deref().unwrap_or_default(),
        );
        if api_version != review::API_VERSION || kind != review::KIND {
            return self.unreadable(
                uid,
                &format!(
                    "expected {} {}, got {api_version:?} {kind:?}",
                    review::API_VERSION,
                    review::KIND
                ),
            );
        }
        let Some(request) = &review.request else {
            return self.unreadable(None, "the AdmissionReview has no request");
        };
        if request.kind.group == "fixity.dev" && request.kind.kind == "ImmutabilityPolicy" {
            return validate_policy(request);
        }
        let intent = match intent::extract(request) {
            Ok(Some(intent)) => intent,
            Ok(None) => return allow(&request.uid),
            Err(e) => return self.unreadable(Some(&request.uid), &e.to_string()),
        };

        // A kubelet path names the namespace it reaches into; policies are chosen by it.
        let namespace = intent.namespace().unwrap_or(&request.namespace);
        let labels = self.store.namespace_labels(namespace);
        let subject = Subject {
            namespace,
            namespace_labels: labels.as_deref(),
            user: &request.user_info.username,
            groups: &request.user_info.groups,
        };
        let policies = self.store.policies();
        let (needed, attestations) = verification_requests(&policies, &subject, &intent);
        let checked = match (
            &self.signatures,
            needed.is_empty() && attestations.is_empty(),
        ) {
            (_, true) => Checked::default(),
            (Some(checker), false) => {
                let credentials = match &self.pull_secrets {
                    Some(secrets) => {
                        let named: Vec<(String, String)> = policies
                            .iter()
                            .flat_map(|p| p.pull_secrets.iter().cloned())
                            .collect();
                        secrets
                            .resolve(&intent::pull_context(request), &named)
                            .await
                    }
                    None => Vec::new(),
                };
                let requests = needed
                    .into_iter()
                    .map(|r| CheckRequest {
                        key: r.key,
                        image: r.image,
                        authorities: r.authorities,
                        min_authorities: r.min_authorities,
                        max_evidence_age: r.max_evidence_age,
                    })
                    .collect();
                let attestations = attestations
                    .into_iter()
                    .map(|r| (r.key, r.image, r.rule))
                    .collect();
                checker
                    .check_request(requests, attestations, credentials)
                    .await
            }
            (None, false) => {
                let why = "signature verification is not configured";
                let mut verifications: Verifications = needed
                    .into_iter()
                    .map(|r| (r.key, SignatureCheck::Unavailable(why.to_owned())))
                    .collect();
                verifications.attestations = attestations
                    .into_iter()
                    .map(|r| (r.key, AttestationCheck::Unavailable(why.to_owned())))
                    .collect();
                Checked {
                    verifications,
                    stored: Vec::new(),
                }
            }
        };
        let decision = evaluate(&policies, &subject, &intent, &checked.verifications);
        if !checked.stored.is_empty() {
            let images: Vec<&str> = checked.stored.iter().map(|k| k.0.as_str()).collect();
            tracing::info!(
                uid = %request.uid,
                evidence = "stored",
                images = ?images,
                "signatures or attestations verified from stored evidence, without the registry"
            );
        }
        if !decision.is_clean() {
            audit::record(
                &request_info(request),
                &decision,
                &self.metrics,
                self.events.as_ref(),
            );
            if let Some(sink) = &self.entered
                && let Some(entered) = entered(request, &intent, &decision)
                && !sink.send(entered)
            {
                self.metrics.entered_dropped.inc();
            }
        }
        respond(&request.uid, &decision, !checked.stored.is_empty())
    }
}

/// The pod an admitted exec or attach entered, when a policy forbids it: the pod is no longer
/// exactly what was built.
fn entered(
    request: &AdmissionRequest<'_>,
    intent: &Intent,
    decision: &Decision,
) -> Option<Entered> {
    let Intent::Connect { action, container } = intent else {
        return None;
    };
    let entry = match action {
        Connect::Exec => Entry::Exec,
        Connect::Attach => Entry::Attach,
        Connect::PortForward => return None,
    };
    if !decision.allowed() || request.name.is_empty() {
        return None;
    }
    Some(Entered {
        namespace: request.namespace.to_string(),
        pod: request.name.to_string(),
        entry,
        container: container.clone(),
        user: request.user_info.username.to_string(),
        policies: decision
            .violations
            .iter()
            .map(|v| (v.policy.clone(), v.outcome.as_str()))
            .collect(),
        at: std::time::SystemTime::now(),
    })
}

fn request_info<'a>(r: &'a AdmissionRequest<'a>) -> RequestInfo<'a> {
    RequestInfo {
        uid: &r.uid,
        operation: &r.operation,
        group: &r.kind.group,
        version: &r.kind.version,
        resource: &r.resource.resource,
        sub_resource: &r.sub_resource,
        kind: &r.kind.kind,
        namespace: &r.namespace,
        name: &r.name,
        user: &r.user_info.username,
        groups: &r.user_info.groups,
        dry_run: r.dry_run,
        object_uid: r.object.as_ref().and_then(review::Object::uid),
    }
}

/// The answer to nearly every review, written out directly rather than through the general
/// encoder; `tests::allow_writes_what_encode_writes` keeps the two the same.
fn allow(uid: &str) -> Answer {
    const HEAD: &[u8] =
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":{"uid":"#;
    const TAIL: &[u8] = br#","allowed":true}}"#;
    let mut body = Vec::with_capacity(HEAD.len() + uid.len() + 2 + TAIL.len());
    body.extend_from_slice(HEAD);
    // Writing a string into a vector cannot fail; escapes as serde_json writes them.
    let _ = serde_json::to_writer(&mut body, uid);
    body.extend_from_slice(TAIL);
    Answer {
        http_status: 200,
        allowed: true,
        body,
    }
}

/// Builds the response: the denial message, one warning per violation, audit annotations;
/// without violations, the plain allow. Each is bounded in count and size, ending with how
/// many it left out: one review can name hundreds of thousands of images. When a signature
/// was verified from stored evidence, the `evidence: stored` audit annotation says so.
fn respond(uid: &str, decision: &Decision, evidence_stored: bool) -> Answer {
    if decision.is_clean() && !evidence_stored {
        return allow(uid);
    }
    if decision.is_clean() {
        return encode(
            200,
            Response {
                uid,
                allowed: true,
                status: None,
                warnings: Vec::new(),
                audit_annotations: BTreeMap::from([(EVIDENCE_ANNOTATION, "stored".to_owned())]),
            },
        );
    }
    let allowed = decision.allowed();
    let total = decision.violations.len() as u64 + decision.omitted_count();
    let status = (!allowed).then(|| {
        let mut message = String::from("fixity: ");
        let mut named = 0u64;
        for v in decision.denials().take(MAX_DENIALS) {
            let denial = format!("[{}] {}: {}", v.policy, v.reason, v.message);
            let denial = audit::shorten(denial, MAX_DENIAL_LEN);
            if message.len() + denial.len() + 2 > MAX_MESSAGE_LEN {
                break;
            }
            if named > 0 {
                message.push_str("; ");
            }
            message.push_str(&denial);
            named += 1;
        }
        let denied = decision.denials().count() as u64
            + decision
                .omitted
                .iter()
                .filter(|o| o.outcome == Outcome::Denied)
                .map(|o| o.count)
                .sum::<u64>();
        if denied > named {
            message.push_str(&format!(
                "; and {} more denials (the audit log sums them up)",
                denied - named
            ));
        }
        Status {
            code: 403,
            reason: "Forbidden",
            message,
        }
    });
    let mut warnings: Vec<String> = decision
        .violations
        .iter()
        .take(MAX_WARNINGS)
        .map(|v| {
            let verdict = match v.outcome {
                Outcome::Denied => "denies",
                Outcome::WouldDeny => "would deny (audit)",
                Outcome::Exempted => "exempted (break-glass)",
            };
            let mut w = format!("fixity: policy {:?} {verdict}: {}", v.policy, v.reason);
            if let Some(c) = &v.container {
                w.push_str(&format!(" container {c:?}"));
            }
            if let Some(i) = &v.image {
                w.push_str(&format!(" image {i:?}"));
            }
            audit::shorten(w, MAX_WARNING_LEN)
        })
        .collect();
    if total > warnings.len() as u64 {
        warnings.push(format!(
            "fixity: and {} more violations",
            total - warnings.len() as u64
        ));
    }
    /// One violation in the `violations` annotation; keys in alphabetical order, as
    /// consumers of earlier versions saw them.
    #[derive(serde::Serialize)]
    struct Summary<'a> {
        container: Option<String>,
        decision: &'static str,
        image: Option<String>,
        policy: &'a str,
        reason: &'static str,
    }
    let cut = |s: &Option<String>| {
        s.as_ref()
            .map(|s| audit::shorten(s.clone(), MAX_ANNOTATED_FIELD))
    };
    let summary: Vec<Summary<'_>> = decision
        .violations
        .iter()
        .take(MAX_ANNOTATED)
        .map(|v| Summary {
            container: cut(&v.container),
            decision: v.outcome.as_str(),
            image: cut(&v.image),
            policy: &v.policy,
            reason: v.reason.as_str(),
        })
        .collect();
    let mut audit_annotations = BTreeMap::from([
        (
            "decision",
            if allowed { "admitted" } else { "denied" }.to_owned(),
        ),
        // Serialising strings cannot fail.
        (
            "violations",
            serde_json::to_string(&summary).unwrap_or_default(),
        ),
    ]);
    if total > summary.len() as u64 {
        audit_annotations.insert("omitted", (total - summary.len() as u64).to_string());
    }
    if evidence_stored {
        audit_annotations.insert(EVIDENCE_ANNOTATION, "stored".to_owned());
    }
    encode(
        200,
        Response {
            uid,
            allowed,
            status,
            warnings,
            audit_annotations,
        },
    )
}

/// Refuses an invalid ImmutabilityPolicy at apply time, so it is never half-applied. The
/// policy is checked whole, as the cluster watcher compiles it; only the Secrets and
/// ConfigMaps it references are not read here, and the answer warns that until the watcher
/// can read them the images their rules cover are denied.
fn validate_policy(request: &AdmissionRequest<'_>) -> Answer {
    if !matches!(request.operation.as_ref(), "CREATE" | "UPDATE") {
        return allow(&request.uid);
    }
    let problem = match request.object.as_ref().and_then(review::Object::raw) {
        None => "the request carries no policy".to_owned(),
        Some(raw) => match read_policy(raw.get()) {
            Err(e) => format!("the policy could not be read: {e}"),
            Ok(policy) => match CompiledPolicy::from_cluster(
                policy.metadata.name.clone().unwrap_or_default(),
                &policy.spec,
                &RefData::new(),
            ) {
                Ok(compiled) => {
                    let warnings: Vec<String> = compiled
                        .verify
                        .iter()
                        .flat_map(|r| &r.unreadable)
                        .map(|why| {
                            audit::shorten(
                                format!("fixity: {why}; until fixity reads it, the images its rule covers are denied"),
                                MAX_WARNING_LEN,
                            )
                        })
                        .collect();
                    if warnings.is_empty() {
                        return allow(&request.uid);
                    }
                    return encode(
                        200,
                        Response {
                            uid: &request.uid,
                            allowed: true,
                            status: None,
                            warnings,
                            audit_annotations: BTreeMap::new(),
                        },
                    );
                }
                Err(e) => e.to_string(),
            },
        },
    };
    encode(
        200,
        Response {
            uid: &request.uid,
            allowed: false,
            status: Some(Status {
                code: 422,
                reason: "Invalid",
                message: format!(
                    "fixity: invalid ImmutabilityPolicy {:?}: {problem}",
                    request.name
                ),
            }),
            warnings: Vec::new(),
            audit_annotations: BTreeMap::new(),
        },
    )
}

/// Reads a policy as applied, refusing a key written twice: what is validated must be what the
/// API server stores, whichever of two values it would keep.
fn read_policy(text: &str) -> Result<ImmutabilityPolicy, serde_json::Error> {
    review::DistinctKeys::read(text).and_then(serde_json::from_value)
}

fn encode(http_status: u16, response: Response<'_>) -> Answer {
    let allowed = response.allowed;
    // Sized for a denial with a message and a warning, so the answer is written without regrowing.
    let mut body = Vec::with_capacity(512);
    let body = serde_json::to_writer(&mut body, &ReviewResponse::new(response))
        .map(|()| body)
        .unwrap_or_else(|_| br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":{"uid":"","allowed":false}}"#.to_vec());
    Answer {
        http_status,
        allowed,
        body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An admission resting on stored evidence says so in the audit log, clean or not.
    #[test]
    fn stored_evidence_is_annotated() {
        let clean = Decision::default();
        let plain: serde_json::Value =
            serde_json::from_slice(&respond("u", &clean, false).body).unwrap();
        assert!(
            plain["response"].get("auditAnnotations").is_none(),
            "{plain}"
        );
        let stored: serde_json::Value =
            serde_json::from_slice(&respond("u", &clean, true).body).unwrap();
        assert_eq!(stored["response"]["allowed"], true);
        assert_eq!(stored["response"]["auditAnnotations"]["evidence"], "stored");
    }

    #[test]
    fn allow_writes_what_encode_writes() {
        for uid in [
            "",
            "705ab4f5-6393-11e8-b7cc-42010a800002",
            "quote\" back\\slash \u{1} tab\t é 中",
        ] {
            let general = encode(
                200,
                Response {
                    uid,
                    allowed: true,
                    status: None,
                    warnings: Vec::new(),
                    audit_annotations: BTreeMap::new(),
                },
            );
            let direct = allow(uid);
            assert_eq!(
                String::from_utf8_lossy(&direct.body),
                String::from_utf8_lossy(&general.body)
            );
            assert_eq!((direct.http_status, direct.allowed), (200, true));
        }
    }
}
