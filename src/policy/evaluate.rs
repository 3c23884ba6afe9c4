//! The decision core: (policies, who and where, what the request intends) -> decision.
//! Pure and synchronous: no I/O, no clock, no globals.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use std::sync::Arc;
use std::time::Duration;

use super::compile::{CompiledAttestation, CompiledPolicy};
use super::crd::{Action, Mode, OnVerificationError, RootFilesystem};
use super::identity::Context;
use crate::image::{ImageReference, ReferenceError};
use crate::verify::{
    AttestationCheck, AttestationRule, Authority, SignatureCheck, SignatureKey, Verifications,
};

/// Stable reason codes, used in logs, metrics and audit annotations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    MutableTag,
    InvalidReference,
    RegistryNotAllowed,
    ExecDenied,
    AttachDenied,
    PortForwardDenied,
    EphemeralContainerDenied,
    ImageUpdateDenied,
    UnsignedImage,
    AttestationMissing,
    AttestationConditionFailed,
    VerificationUnavailable,
    ReferenceUnavailable,
    NodeProxyDenied,
    WritableRootFilesystem,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::MutableTag => "MutableTag",
            Reason::InvalidReference => "InvalidReference",
            Reason::RegistryNotAllowed => "RegistryNotAllowed",
            Reason::ExecDenied => "ExecDenied",
            Reason::AttachDenied => "AttachDenied",
            Reason::PortForwardDenied => "PortForwardDenied",
            Reason::EphemeralContainerDenied => "EphemeralContainerDenied",
            Reason::ImageUpdateDenied => "ImageUpdateDenied",
            Reason::UnsignedImage => "UnsignedImage",
            Reason::AttestationMissing => "AttestationMissing",
            Reason::AttestationConditionFailed => "AttestationConditionFailed",
            Reason::VerificationUnavailable => "VerificationUnavailable",
            Reason::ReferenceUnavailable => "ReferenceUnavailable",
            Reason::NodeProxyDenied => "NodeProxyDenied",
            Reason::WritableRootFilesystem => "WritableRootFilesystem",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where in a pod spec an image appears.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Location {
    Container,
    InitContainer,
    EphemeralContainer,
    ImageVolume,
}

impl Location {
    pub fn describe(self) -> &'static str {
        match self {
            Location::Container => "container",
            Location::InitContainer => "init container",
            Location::EphemeralContainer => "ephemeral container",
            Location::ImageVolume => "image volume",
        }
    }
}

/// One image a workload names, and where.
#[derive(Clone, PartialEq, Eq)]
pub struct ImageUse {
    pub location: Location,
    /// The container's (or image volume's) name, then the image as written: one allocation
    /// where two strings would take two, for every container of every pod.
    text: String,
    name_len: usize,
    has_image: bool,
    /// A container that does not set `securityContext.readOnlyRootFilesystem: true`; never
    /// an image volume. Containers count as writable until told otherwise.
    pub writable_root: bool,
    /// The image parsed, once, for every rule that reads it.
    pub reference: Result<ImageReference, ReferenceError>,
}

impl ImageUse {
    pub fn new(location: Location, name: &str, image: Option<&str>) -> Self {
        let mut text = String::with_capacity(name.len() + image.map_or(0, str::len));
        text.push_str(name);
        text.extend(image);
        Self {
            location,
            text,
            name_len: name.len(),
            has_image: image.is_some(),
            writable_root: location != Location::ImageVolume,
            reference: image.map_or(Err(ReferenceError::Empty), ImageReference::parse),
        }
    }

    /// Records whether the container sets `readOnlyRootFilesystem: true`.
    pub fn read_only_root(mut self, read_only: bool) -> Self {
        self.writable_root = self.location != Location::ImageVolume && !read_only;
        self
    }

    /// The container's (or image volume's) name.
    pub fn name(&self) -> &str {
        &self.text[..self.name_len]
    }

    /// The reference exactly as written; `None` when the field is missing.
    pub fn image(&self) -> Option<&str> {
        self.has_image.then(|| &self.text[self.name_len..])
    }

    /// What tells two uses apart (the reference follows from the image), for set lookups.
    pub fn identity(&self) -> (Location, &str, Option<&str>) {
        (self.location, self.name(), self.image())
    }
}

impl fmt::Debug for ImageUse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImageUse")
            .field("location", &self.location)
            .field("name", &self.name())
            .field("image", &self.image())
            .field("writable_root", &self.writable_root)
            .field("reference", &self.reference)
            .finish()
    }
}

/// The kind of CONNECT a user asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connect {
    Exec,
    Attach,
    PortForward,
}

/// What a path of the kubelet's API does, when it does more than read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KubeletAccess {
    /// A stream into a container, as the pods subresource of the same name opens; the names
    /// are those the path gives.
    Stream {
        action: Connect,
        namespace: Option<String>,
        pod: Option<String>,
        container: Option<String>,
    },
    /// A path fixity does not know to be harmless: it could run commands, so it is denied.
    Unknown,
}

/// What a request would do, reduced to what the rules look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Intent {
    /// Create or update an object that carries pod specs: every image must comply.
    Workload { images: Vec<ImageUse> },
    /// Update a running pod: the containers whose image differs from the running one.
    PodImageChange { changed: Vec<ImageUse> },
    /// Add ephemeral containers to a running pod (`kubectl debug`).
    AddEphemeral { added: Vec<ImageUse> },
    /// Open a stream into a running pod.
    Connect {
        action: Connect,
        container: Option<String>,
    },
    /// Reach a node's kubelet API through the API server (CONNECT nodes/proxy).
    NodeProxy {
        node: String,
        path: String,
        access: KubeletAccess,
    },
}

impl Intent {
    /// The namespace the request reaches into when it is not the request's own: the one a
    /// kubelet path names. Policies are chosen by it.
    pub fn namespace(&self) -> Option<&str> {
        match self {
            Intent::NodeProxy {
                access:
                    KubeletAccess::Stream {
                        namespace: Some(ns),
                        ..
                    },
                ..
            } => Some(ns),
            _ => None,
        }
    }
}

/// Who asks, and in which namespace.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub namespace: &'a str,
    /// `None` while the namespace's labels are unknown.
    pub namespace_labels: Option<&'a BTreeMap<String, String>>,
    pub user: &'a str,
    /// As the review carries them: borrowed from the body unless escaped.
    pub groups: &'a [Cow<'a, str>],
}

/// What fixity does about one violation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An Enforce policy denies the request.
    Denied,
    /// An Audit policy would have denied it.
    WouldDeny,
    /// The requester is exempt (break-glass); logged, not denied.
    Exempted,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Denied => "denied",
            Outcome::WouldDeny => "would_deny",
            Outcome::Exempted => "exempted",
        }
    }
}

/// One broken rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub policy: String,
    pub mode: Mode,
    pub outcome: Outcome,
    pub reason: Reason,
    pub container: Option<String>,
    pub image: Option<String>,
    /// What happened and what to do about it, for a person.
    pub message: String,
}

/// Violations one decision keeps in full; past it they are only counted. A review may name
/// hundreds of thousands of images, and each violation carries a message and is answered,
/// logged and counted.
pub const MAX_VIOLATIONS: usize = 100;

/// Violations past [`MAX_VIOLATIONS`] of one kind, counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Omitted {
    pub policy: String,
    pub mode: Mode,
    pub outcome: Outcome,
    pub reason: Reason,
    pub count: u64,
}

/// The evaluator's answer for one request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    /// The first [`MAX_VIOLATIONS`] violations.
    pub violations: Vec<Violation>,
    /// The others, by policy, outcome and reason.
    pub omitted: Vec<Omitted>,
}

impl Decision {
    /// Denied when any matching Enforce policy denies, unless the requester is exempt from it.
    pub fn allowed(&self) -> bool {
        !self.violations.iter().any(|v| v.outcome == Outcome::Denied)
            && !self.omitted.iter().any(|o| o.outcome == Outcome::Denied)
    }

    /// How many violations were counted but not kept.
    pub fn omitted_count(&self) -> u64 {
        self.omitted.iter().map(|o| o.count).sum()
    }

    /// Whether nothing at all was found.
    pub fn is_clean(&self) -> bool {
        self.violations.is_empty() && self.omitted.is_empty()
    }

    /// Keeps a violation while there is room; past [`MAX_VIOLATIONS`] only counts it (and
    /// never writes its message).
    fn record(
        &mut self,
        policy: &CompiledPolicy,
        outcome: Outcome,
        reason: Reason,
        what: impl FnOnce() -> (Option<String>, Option<String>, String),
    ) {
        if self.violations.len() < MAX_VIOLATIONS {
            let (container, image, message) = what();
            self.violations.push(Violation {
                policy: policy.name.clone(),
                mode: policy.mode,
                outcome,
                reason,
                container,
                image,
                message,
            });
            return;
        }
        let same = |o: &&mut Omitted| {
            o.outcome == outcome && o.reason == reason && o.policy == policy.name
        };
        match self.omitted.iter_mut().find(same) {
            Some(o) => o.count += 1,
            None => self.omitted.push(Omitted {
                policy: policy.name.clone(),
                mode: policy.mode,
                outcome,
                reason,
                count: 1,
            }),
        }
    }

    pub fn denials(&self) -> impl Iterator<Item = &Violation> {
        self.violations
            .iter()
            .filter(|v| v.outcome == Outcome::Denied)
    }
}

/// A signature check the evaluator will need the result of.
#[derive(Debug, Clone)]
pub struct SignatureRequest {
    pub key: SignatureKey,
    pub image: ImageReference,
    pub authorities: Arc<[Authority]>,
    /// The shortest maxEvidenceAge of the rules needing this check.
    pub max_evidence_age: Duration,
    /// Distinct authorities that must each have signed.
    pub min_authorities: usize,
}

/// An attestation check the evaluator will need the result of.
#[derive(Debug, Clone)]
pub struct AttestationRequest {
    /// The pinned image and the attestation rule's fingerprint.
    pub key: SignatureKey,
    pub image: ImageReference,
    pub rule: Arc<AttestationRule>,
}

/// The distinct signature checks a request needs: for every applicable policy, every pinned
/// image its image rules look at, against every verify rule covering it. Nothing the workload
/// carries (labels, annotations) can remove an image from this list.
pub fn signature_requests(
    policies: &[CompiledPolicy],
    subject: &Subject<'_>,
    intent: &Intent,
) -> Vec<SignatureRequest> {
    verification_requests(policies, subject, intent).0
}

/// The distinct signature and attestation checks a request needs, chosen as
/// [`signature_requests`] chooses signature checks.
pub fn verification_requests(
    policies: &[CompiledPolicy],
    subject: &Subject<'_>,
    intent: &Intent,
) -> (Vec<SignatureRequest>, Vec<AttestationRequest>) {
    let images = intent_images(intent);
    let mut out: Vec<SignatureRequest> = Vec::new();
    let mut attestations: Vec<AttestationRequest> = Vec::new();
    // A map and a set, not scans of the lists: a request can name tens of thousands of images.
    let mut seen: HashMap<SignatureKey, usize> = HashMap::new();
    let mut seen_attestations: HashSet<SignatureKey> = HashSet::new();
    for policy in policies {
        if policy.verify.is_empty()
            || !policy.applies_to(subject.namespace, subject.namespace_labels)
            || !image_rules_apply(policy, intent)
        {
            continue;
        }
        for reference in images.iter().filter_map(|u| u.reference.as_ref().ok()) {
            let Some(pinned) = pinned_name(reference) else {
                continue;
            };
            let name = reference.name();
            let context = Context {
                image: reference,
                namespace: subject.namespace,
            };
            for rule in policy.verify.iter().filter(|r| r.covers(name)) {
                // A rule with no authority at hand is decided without the registry, and an
                // identity that cannot be expanded for this image is explained by `evaluate`.
                let fingerprint = if rule.authorities.is_empty() {
                    None
                } else {
                    rule.fingerprint_for(&context).ok()
                };
                if let Some(fingerprint) = fingerprint {
                    let key = (pinned.clone(), fingerprint);
                    match seen.get(&key) {
                        Some(&at) => {
                            let age = &mut out[at].max_evidence_age;
                            *age = (*age).min(rule.max_evidence_age);
                        }
                        // Templates are expanded once per distinct check, not per rule seen;
                        // the attestations below are asked for either way.
                        None => {
                            if let Ok(authorities) = rule.authorities_for(&context) {
                                seen.insert(key.clone(), out.len());
                                out.push(SignatureRequest {
                                    key,
                                    image: reference.clone(),
                                    authorities,
                                    min_authorities: rule.min_authorities,
                                    max_evidence_age: rule.max_evidence_age,
                                });
                            }
                        }
                    }
                }
                for attestation in &rule.attestations {
                    let key = (pinned.clone(), attestation.fingerprint);
                    if !attestation.rule.authorities.is_empty()
                        && seen_attestations.insert(key.clone())
                    {
                        attestations.push(AttestationRequest {
                            key,
                            image: reference.clone(),
                            rule: attestation.rule.clone(),
                        });
                    }
                }
            }
        }
    }
    (out, attestations)
}

/// `registry/repository@digest`, the identity signatures are bound to.
fn pinned_name(reference: &ImageReference) -> Option<String> {
    reference
        .digest()
        .map(|d| format!("{}@{d}", reference.name()))
}

fn intent_images(intent: &Intent) -> &[ImageUse] {
    match intent {
        Intent::Workload { images }
        | Intent::PodImageChange { changed: images }
        | Intent::AddEphemeral { added: images } => images,
        Intent::Connect { .. } | Intent::NodeProxy { .. } => &[],
    }
}

/// Whether a policy's image rules (digests, registries, signatures) judge this intent's
/// images; when a runtime rule denies the change outright they do not.
fn image_rules_apply(policy: &CompiledPolicy, intent: &Intent) -> bool {
    match intent {
        Intent::Workload { .. } => true,
        Intent::PodImageChange { .. } => policy.runtime.image_updates == Action::Allow,
        Intent::AddEphemeral { .. } => policy.runtime.ephemeral_containers == Action::Allow,
        Intent::Connect { .. } | Intent::NodeProxy { .. } => false,
    }
}

/// Evaluates one request against every policy, given the signature checks it needed.
pub fn evaluate(
    policies: &[CompiledPolicy],
    subject: &Subject<'_>,
    intent: &Intent,
    verifications: &Verifications,
) -> Decision {
    let images = intent_images(intent);

    let mut decision = Decision::default();
    for policy in policies {
        if !policy.applies_to(subject.namespace, subject.namespace_labels) {
            continue;
        }
        let outcome = if policy.exempts(subject.user, subject.groups) {
            Outcome::Exempted
        } else {
            match policy.mode {
                Mode::Enforce => Outcome::Denied,
                Mode::Audit => Outcome::WouldDeny,
            }
        };
        let mut found = Findings {
            policy,
            outcome,
            verifications,
            namespace: subject.namespace,
            decision: &mut decision,
        };
        match intent {
            Intent::Workload { .. } => {
                found.image_rules(images);
                found.root_filesystems(images);
            }
            Intent::PodImageChange { .. } => {
                if policy.runtime.image_updates == Action::Deny {
                    for u in images {
                        found.push(Reason::ImageUpdateDenied, u, || {
                            format!(
                                "changing the image of {} {:?} in a running pod is not allowed; \
                                 build and sign a new image and roll out a new pod instead",
                                u.location.describe(),
                                u.name()
                            )
                        });
                    }
                } else {
                    found.image_rules(images);
                }
            }
            Intent::AddEphemeral { .. } => {
                if policy.runtime.ephemeral_containers == Action::Deny {
                    for u in images {
                        found.push(Reason::EphemeralContainerDenied, u, || {
                            format!(
                                "adding ephemeral container {:?} (kubectl debug) to a running pod \
                                 is not allowed; debug a copy (kubectl debug --copy-to) instead",
                                u.name()
                            )
                        });
                    }
                } else {
                    found.image_rules(images);
                    found.root_filesystems(images);
                }
            }
            Intent::Connect { action, container } => {
                let (rule, reason, what) = stream_rule(policy, *action);
                if rule == Action::Deny {
                    found.decision.record(policy, outcome, reason, || {
                        let message = format!(
                            "{what} into running pods are not allowed; ship changes as a new \
                             signed image and redeploy"
                        );
                        (container.clone(), None, message)
                    });
                }
            }
            Intent::NodeProxy { node, path, access } => {
                let (reason, container, message) = match access {
                    KubeletAccess::Stream {
                        action,
                        namespace,
                        pod,
                        container,
                    } => {
                        let (rule, reason, what) = stream_rule(policy, *action);
                        if rule == Action::Allow {
                            continue;
                        }
                        let target = match (namespace, pod) {
                            (Some(ns), Some(pod)) => format!("pod {ns}/{pod}"),
                            _ => "a container".to_owned(),
                        };
                        (
                            reason,
                            container.clone(),
                            format!(
                                "{what} into running pods are not allowed, through the kubelet \
                                 API too (nodes/proxy {path:?} on node {node}, into {target}); \
                                 ship changes as a new signed image and redeploy"
                            ),
                        )
                    }
                    KubeletAccess::Unknown => (
                        Reason::NodeProxyDenied,
                        None,
                        format!(
                            "nodes/proxy path {path:?} on node {node} is not one fixity knows \
                             to only read (health, metrics, stats, pods, logs); the kubelet API \
                             can run commands in containers, so it is denied"
                        ),
                    ),
                };
                found
                    .decision
                    .record(policy, outcome, reason, || (container, None, message));
            }
        }
    }
    decision
}

/// The runtime rule that judges a stream, its reason code, and what users call it.
fn stream_rule(policy: &CompiledPolicy, action: Connect) -> (Action, Reason, &'static str) {
    match action {
        Connect::Exec => (
            policy.runtime.exec,
            Reason::ExecDenied,
            "kubectl exec and kubectl cp",
        ),
        Connect::Attach => (
            policy.runtime.attach,
            Reason::AttachDenied,
            "kubectl attach",
        ),
        Connect::PortForward => (
            policy.runtime.port_forward,
            Reason::PortForwardDenied,
            "kubectl port-forward",
        ),
    }
}

/// "container \"web\"", written only when a message needs it.
struct What<'a>(&'a ImageUse);

impl fmt::Display for What<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?}", self.0.location.describe(), self.0.name())
    }
}

/// Collects the violations of one policy.
struct Findings<'a> {
    policy: &'a CompiledPolicy,
    outcome: Outcome,
    verifications: &'a Verifications,
    /// The request's, for identity templates.
    namespace: &'a str,
    decision: &'a mut Decision,
}

impl Findings<'_> {
    fn push(&mut self, reason: Reason, u: &ImageUse, message: impl FnOnce() -> String) {
        self.push_as(self.outcome, reason, u, message);
    }

    fn push_as(
        &mut self,
        outcome: Outcome,
        reason: Reason,
        u: &ImageUse,
        message: impl FnOnce() -> String,
    ) {
        self.decision.record(self.policy, outcome, reason, || {
            (
                Some(u.name().to_owned()),
                u.image().map(str::to_owned),
                message(),
            )
        });
    }

    /// `runtime.readOnlyRootFilesystem: Require`: every container's root filesystem read-only.
    fn root_filesystems(&mut self, images: &[ImageUse]) {
        if self.policy.runtime.read_only_root_filesystem != RootFilesystem::Require {
            return;
        }
        for u in images.iter().filter(|u| u.writable_root) {
            self.push(Reason::WritableRootFilesystem, u, || {
                format!(
                    "{} has a writable root filesystem; set \
                         securityContext.readOnlyRootFilesystem: true and mount a volume (an \
                         emptyDir) where it must write",
                    What(u)
                )
            });
        }
    }

    fn image_rules(&mut self, images: &[ImageUse]) {
        for u in images {
            let reference = &u.reference;
            let what = What(u);
            let shown = u.image().unwrap_or_default();
            let reference = match reference {
                Ok(r) => r,
                Err(e) => {
                    self.push(Reason::InvalidReference, u, || {
                        format!("{what}: image {shown:?} is not a valid image reference: {e}")
                    });
                    continue;
                }
            };
            if self.policy.require_digest && reference.digest().is_none() {
                self.push(Reason::MutableTag, u, || {
                    format!(
                        "{what}: image {shown:?} uses a mutable tag; pin it by digest, \
                         e.g. {}@sha256:<digest> (crane digest {reference})",
                        reference.name()
                    )
                });
            }
            // Allow-lists and verify rules; most policies have neither.
            let allow = &self.policy.allowed_registries;
            if allow.is_empty() && self.policy.verify.is_empty() {
                continue;
            }
            let name = reference.name();
            if !allow.is_empty() && !allow.iter().any(|g| g.matches(name)) {
                let list: Vec<&str> = allow.iter().map(|g| g.as_str()).collect();
                self.push(Reason::RegistryNotAllowed, u, || {
                    format!(
                        "{what}: image {shown:?} ({name}) is not from an allowed registry ({})",
                        list.join(", ")
                    )
                });
            }
            self.signatures(u, &what, shown, reference, name);
        }
    }

    fn signatures(
        &mut self,
        u: &ImageUse,
        what: &What<'_>,
        shown: &str,
        reference: &ImageReference,
        name: &str,
    ) {
        if self.policy.verify.is_empty() {
            return;
        }
        let pinned = pinned_name(reference);
        for rule in self.policy.verify.iter().filter(|r| r.covers(name)) {
            for attestation in &rule.attestations {
                self.attestation(u, what, shown, pinned.as_deref(), attestation);
            }
            if !rule.requires_signature {
                continue;
            }
            let Some(pinned) = &pinned else {
                self.push(
                    Reason::UnsignedImage,
                    u,
                    || format!("{what}: image {shown:?} must be signed, and a signature can only be checked for an image pinned by digest"),
                );
                continue;
            };
            let check = if rule.authorities.is_empty() {
                None
            } else {
                let context = Context {
                    image: reference,
                    namespace: self.namespace,
                };
                let fingerprint = match rule
                    .fingerprint_for(&context)
                    .and_then(|fp| rule.authorities_for(&context).map(|_| fp))
                {
                    Ok(fingerprint) => fingerprint,
                    Err(why) => {
                        self.push(Reason::UnsignedImage, u, || {
                            format!("{what}: image {shown:?} cannot be verified: {why}")
                        });
                        continue;
                    }
                };
                self.verifications.get(&(pinned.clone(), fingerprint))
            };
            // A key or trust root the policy references but fixity cannot read may be the
            // one that signed the image: unless another authority vouches for it, it is
            // denied, whatever onVerificationError says (deleting a Secret is no outage).
            if !rule.unreadable.is_empty() && !matches!(check, Some(SignatureCheck::Verified(_))) {
                self.push(Reason::ReferenceUnavailable, u, || {
                    format!(
                        "{what}: image {shown:?} cannot be verified until the policy's keys can \
                         be read: {}",
                        rule.unreadable.join("; ")
                    )
                });
                continue;
            }
            match check {
                Some(SignatureCheck::Verified(_)) => {}
                Some(SignatureCheck::Untrusted(why)) => self.push(Reason::UnsignedImage, u, || {
                    format!("{what}: image {shown:?} is not signed by a trusted authority: {why}")
                }),
                unavailable => {
                    let why = match unavailable {
                        Some(SignatureCheck::Unavailable(why)) => why.as_str(),
                        _ => "the check did not finish in time",
                    };
                    self.unavailable(u, || {
                        format!(
                            "{what}: the signature of image {shown:?} could not be checked: {why}"
                        )
                    });
                }
            }
        }
    }

    fn attestation(
        &mut self,
        u: &ImageUse,
        what: &What<'_>,
        shown: &str,
        pinned: Option<&str>,
        attestation: &CompiledAttestation,
    ) {
        let rule = &attestation.rule;
        let named = || format!("attestation {:?} ({})", rule.name, rule.predicate_type);
        let Some(pinned) = pinned else {
            self.push(Reason::AttestationMissing, u, || {
                format!(
                    "{what}: image {shown:?} must carry {}, and an attestation can only be \
                     checked for an image pinned by digest",
                    named()
                )
            });
            return;
        };
        let check = if rule.authorities.is_empty() {
            None
        } else {
            let key = (pinned.to_owned(), attestation.fingerprint);
            self.verifications.attestations.get(&key)
        };
        // As for signatures: a signer fixity cannot read may be the one that signed it.
        if !attestation.unreadable.is_empty()
            && !matches!(check, Some(AttestationCheck::Satisfied { .. }))
        {
            self.push(Reason::ReferenceUnavailable, u, || {
                format!(
                    "{what}: the {} of image {shown:?} cannot be verified until the policy's \
                     keys can be read: {}",
                    named(),
                    attestation.unreadable.join("; ")
                )
            });
            return;
        }
        match check {
            Some(AttestationCheck::Satisfied { .. }) => {}
            Some(AttestationCheck::Missing(why)) => {
                self.push(Reason::AttestationMissing, u, || {
                    format!("{what}: image {shown:?} lacks {}: {why}", named())
                });
            }
            Some(AttestationCheck::ConditionFailed {
                signer, failure, ..
            }) => self.push(Reason::AttestationConditionFailed, u, || {
                format!(
                    "{what}: image {shown:?}: {} signed by {signer}: {failure}",
                    named()
                )
            }),
            unavailable => {
                let why = match unavailable {
                    Some(AttestationCheck::Unavailable(why)) => why.as_str(),
                    _ => "the check did not finish in time",
                };
                self.unavailable(u, || {
                    format!(
                        "{what}: the {} of image {shown:?} could not be checked: {why}",
                        named()
                    )
                });
            }
        }
    }

    /// A check that could not be completed: denied, unless the policy admits on
    /// verification errors (the gap is still recorded).
    fn unavailable(&mut self, u: &ImageUse, message: impl FnOnce() -> String) {
        let outcome = match (self.policy.on_verification_error, self.outcome) {
            (OnVerificationError::Allow, Outcome::Denied) => Outcome::WouldDeny,
            (_, outcome) => outcome,
        };
        self.push_as(outcome, Reason::VerificationUnavailable, u, message);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::crd::{Exemption, ImageRules, ImmutabilityPolicySpec, RuntimeRules};
    use crate::verify::{SignatureCheck, Verifications};

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn policy(name: &str, spec: ImmutabilityPolicySpec) -> CompiledPolicy {
        CompiledPolicy::from_spec(name.into(), &spec).unwrap()
    }

    fn subject<'a>(groups: &'a [Cow<'a, str>]) -> Subject<'a> {
        Subject {
            namespace: "team-a",
            namespace_labels: None,
            user: "alice",
            groups,
        }
    }

    #[test]
    fn an_image_use_gives_back_its_name_and_image() {
        let u = ImageUse::new(Location::Container, "web", Some("nginx:1.27"));
        assert_eq!((u.name(), u.image()), ("web", Some("nginx:1.27")));
        assert_eq!(u.reference.as_ref().unwrap().tag(), Some("1.27"));
        let u = ImageUse::new(Location::InitContainer, "init", None);
        assert_eq!((u.name(), u.image()), ("init", None));
        assert_eq!(u.reference, Err(ReferenceError::Empty));
        let u = ImageUse::new(Location::ImageVolume, "", Some(""));
        assert_eq!((u.name(), u.image()), ("", Some("")));
    }

    fn container(name: &str, image: &str) -> ImageUse {
        ImageUse::new(Location::Container, name, Some(image))
    }

    /// The evaluator for requests that need no signature checks.
    fn evaluate(policies: &[CompiledPolicy], subject: &Subject<'_>, intent: &Intent) -> Decision {
        super::evaluate(policies, subject, intent, &Verifications::new())
    }

    fn reasons(d: &Decision) -> Vec<(&str, Reason, Outcome)> {
        d.violations
            .iter()
            .map(|v| (v.policy.as_str(), v.reason, v.outcome))
            .collect()
    }

    /// A review naming very many bad images keeps the first violations whole and counts the
    /// rest; a denial among the counted ones still denies.
    #[test]
    fn violations_past_the_bound_are_counted_not_kept() {
        let images: Vec<ImageUse> = (0..1000)
            .map(|i| container(&format!("c{i}"), "nginx:1.27"))
            .collect();
        let intent = Intent::Workload { images };
        let d = evaluate(
            &[policy("default", Default::default())],
            &subject(&[]),
            &intent,
        );
        assert_eq!(d.violations.len(), MAX_VIOLATIONS);
        assert_eq!(
            d.omitted,
            vec![Omitted {
                policy: "default".into(),
                mode: Mode::Enforce,
                outcome: Outcome::Denied,
                reason: Reason::MutableTag,
                count: 900,
            }]
        );
        assert!(!d.allowed());

        // An Audit policy fills the kept ones with would-be denials; the Enforce policy after
        // it is counted only, and still denies.
        let audit = policy(
            "a-audit",
            ImmutabilityPolicySpec {
                mode: Mode::Audit,
                ..Default::default()
            },
        );
        let d = evaluate(
            &[audit, policy("b-enforce", Default::default())],
            &subject(&[]),
            &intent,
        );
        assert!(d.violations.iter().all(|v| v.outcome == Outcome::WouldDeny));
        assert_eq!(d.omitted_count(), 1900);
        assert!(!d.allowed(), "the counted denials deny");
    }

    #[test]
    fn tags_are_denied_and_digests_admitted() {
        let p = [policy("default", Default::default())];
        let d = evaluate(
            &p,
            &subject(&[]),
            &Intent::Workload {
                images: vec![
                    container("web", "nginx:1.27"),
                    container("side", &format!("ghcr.io/a/b@{DIGEST}")),
                ],
            },
        );
        assert!(!d.allowed());
        assert_eq!(
            reasons(&d),
            vec![("default", Reason::MutableTag, Outcome::Denied)]
        );
        let v = &d.violations[0];
        assert_eq!(v.container.as_deref(), Some("web"));
        assert_eq!(v.image.as_deref(), Some("nginx:1.27"));
        assert!(v.message.contains("container \"web\""), "{}", v.message);
        assert!(
            v.message
                .contains("docker.io/library/nginx@sha256:<digest>"),
            "{}",
            v.message
        );

        let tagged_and_pinned = format!("nginx:1.27@{DIGEST}");
        let d = evaluate(
            &p,
            &subject(&[]),
            &Intent::Workload {
                images: vec![container("web", &tagged_and_pinned)],
            },
        );
        assert!(d.allowed() && d.violations.is_empty());
    }

    #[test]
    fn invalid_and_missing_images_are_denied() {
        let p = [policy("default", Default::default())];
        let missing = ImageUse::new(Location::InitContainer, "init", None);
        let d = evaluate(
            &p,
            &subject(&[]),
            &Intent::Workload {
                images: vec![container("a", "Nginx@sha256:abc"), missing],
            },
        );
        assert_eq!(
            reasons(&d),
            vec![
                ("default", Reason::InvalidReference, Outcome::Denied),
                ("default", Reason::InvalidReference, Outcome::Denied)
            ]
        );
        assert!(d.violations[1].message.contains("init container \"init\""));
    }

    #[test]
    fn registry_allow_list() {
        let p = [policy(
            "regs",
            ImmutabilityPolicySpec {
                images: ImageRules {
                    require_digest: false,
                    allowed_registries: vec!["ghcr.io/acme/**".into()],
                    ..Default::default()
                },
                ..Default::default()
            },
        )];
        let d = evaluate(
            &p,
            &subject(&[]),
            &Intent::Workload {
                images: vec![
                    container("ok", "ghcr.io/acme/team/app:v1"),
                    container("bad", "docker.io/evil/app:v1"),
                ],
            },
        );
        assert_eq!(
            reasons(&d),
            vec![("regs", Reason::RegistryNotAllowed, Outcome::Denied)]
        );
        assert_eq!(d.violations[0].container.as_deref(), Some("bad"));
    }

    #[test]
    fn audit_policies_never_deny_and_enforce_wins() {
        let audit = policy(
            "audit",
            ImmutabilityPolicySpec {
                mode: Mode::Audit,
                ..Default::default()
            },
        );
        let d = evaluate(
            std::slice::from_ref(&audit),
            &subject(&[]),
            &Intent::Workload {
                images: vec![container("web", "nginx")],
            },
        );
        assert!(d.allowed());
        assert_eq!(
            reasons(&d),
            vec![("audit", Reason::MutableTag, Outcome::WouldDeny)]
        );

        let enforce = policy("enforce", Default::default());
        let d = evaluate(
            &[audit, enforce],
            &subject(&[]),
            &Intent::Workload {
                images: vec![container("web", "nginx")],
            },
        );
        assert!(!d.allowed());
        assert_eq!(d.denials().count(), 1);
    }

    #[test]
    fn runtime_rules() {
        let p = [policy("default", Default::default())];
        let exec = Intent::Connect {
            action: Connect::Exec,
            container: Some("web".into()),
        };
        assert_eq!(
            reasons(&evaluate(&p, &subject(&[]), &exec)),
            vec![("default", Reason::ExecDenied, Outcome::Denied)]
        );
        let attach = Intent::Connect {
            action: Connect::Attach,
            container: None,
        };
        assert_eq!(
            reasons(&evaluate(&p, &subject(&[]), &attach)),
            vec![("default", Reason::AttachDenied, Outcome::Denied)]
        );
        let pf = Intent::Connect {
            action: Connect::PortForward,
            container: None,
        };
        assert!(evaluate(&p, &subject(&[]), &pf).violations.is_empty());

        let debug = Intent::AddEphemeral {
            added: vec![ImageUse::new(
                Location::EphemeralContainer,
                "debugger",
                Some("busybox"),
            )],
        };
        assert_eq!(
            reasons(&evaluate(&p, &subject(&[]), &debug)),
            vec![("default", Reason::EphemeralContainerDenied, Outcome::Denied)]
        );
        let set_image = Intent::PodImageChange {
            changed: vec![container("web", &format!("nginx@{DIGEST}"))],
        };
        assert_eq!(
            reasons(&evaluate(&p, &subject(&[]), &set_image)),
            vec![("default", Reason::ImageUpdateDenied, Outcome::Denied)]
        );
        assert!(
            evaluate(
                &p,
                &subject(&[]),
                &Intent::PodImageChange { changed: vec![] }
            )
            .allowed()
        );
    }

    #[test]
    fn allowed_runtime_changes_still_obey_image_rules() {
        let p = [policy(
            "lenient",
            ImmutabilityPolicySpec {
                runtime: RuntimeRules {
                    ephemeral_containers: Action::Allow,
                    image_updates: Action::Allow,
                    ..Default::default()
                },
                ..Default::default()
            },
        )];
        let debug = Intent::AddEphemeral {
            added: vec![ImageUse::new(
                Location::EphemeralContainer,
                "dbg",
                Some("busybox"),
            )],
        };
        assert_eq!(
            reasons(&evaluate(&p, &subject(&[]), &debug)),
            vec![("lenient", Reason::MutableTag, Outcome::Denied)]
        );
        let pinned = Intent::PodImageChange {
            changed: vec![container("web", &format!("nginx@{DIGEST}"))],
        };
        assert!(evaluate(&p, &subject(&[]), &pinned).allowed());
    }

    #[test]
    fn exemptions_admit_but_are_recorded() {
        let p = [policy(
            "default",
            ImmutabilityPolicySpec {
                exemptions: vec![Exemption {
                    groups: vec!["fixity:break-glass".into()],
                    ..Default::default()
                }],
                ..Default::default()
            },
        )];
        let groups = vec![Cow::from("fixity:break-glass")];
        let exec = Intent::Connect {
            action: Connect::Exec,
            container: None,
        };
        let d = evaluate(&p, &subject(&groups), &exec);
        assert!(d.allowed());
        assert_eq!(
            reasons(&d),
            vec![("default", Reason::ExecDenied, Outcome::Exempted)]
        );
    }

    #[test]
    fn policies_outside_their_namespaces_do_not_apply() {
        let p = [policy(
            "prod-only",
            ImmutabilityPolicySpec {
                match_: crate::policy::crd::Match {
                    exclude_namespaces: vec!["team-a".into()],
                    ..Default::default()
                },
                ..Default::default()
            },
        )];
        assert!(
            evaluate(
                &p,
                &subject(&[]),
                &Intent::Workload {
                    images: vec![container("web", "nginx")]
                }
            )
            .violations
            .is_empty()
        );
    }

    fn read_only_policy(mode: Mode) -> CompiledPolicy {
        policy(
            "read-only",
            ImmutabilityPolicySpec {
                mode,
                runtime: RuntimeRules {
                    read_only_root_filesystem: RootFilesystem::Require,
                    ephemeral_containers: Action::Allow,
                    ..Default::default()
                },
                ..Default::default()
            },
        )
    }

    #[test]
    fn read_only_root_filesystems_are_required_of_every_container_kind() {
        let pinned = format!("nginx@{DIGEST}");
        let use_of = |location, name: &str, read_only| {
            ImageUse::new(location, name, Some(&pinned)).read_only_root(read_only)
        };
        let intent = Intent::Workload {
            images: vec![
                use_of(Location::InitContainer, "setup", false),
                use_of(Location::Container, "web", true),
                use_of(Location::Container, "side", false),
                use_of(Location::EphemeralContainer, "dbg", false),
                use_of(Location::ImageVolume, "data", false),
            ],
        };
        let d = evaluate(&[read_only_policy(Mode::Enforce)], &subject(&[]), &intent);
        assert!(!d.allowed());
        let named: Vec<_> = d
            .violations
            .iter()
            .map(|v| (v.reason, v.container.as_deref().unwrap_or_default()))
            .collect();
        assert_eq!(
            named,
            [
                (Reason::WritableRootFilesystem, "setup"),
                (Reason::WritableRootFilesystem, "side"),
                (Reason::WritableRootFilesystem, "dbg"),
            ],
            "image volumes have no root filesystem"
        );
        assert!(
            d.violations[0].message.contains("init container \"setup\"")
                && d.violations[0]
                    .message
                    .contains("securityContext.readOnlyRootFilesystem: true"),
            "{}",
            d.violations[0].message
        );

        // Audit mode admits and records; the default policy does not ask for it.
        let d = evaluate(&[read_only_policy(Mode::Audit)], &subject(&[]), &intent);
        assert!(d.allowed());
        assert_eq!(d.violations.len(), 3);
        assert!(d.violations.iter().all(|v| v.outcome == Outcome::WouldDeny));
        let default = [policy("default", Default::default())];
        assert!(
            evaluate(&default, &subject(&[]), &intent)
                .violations
                .is_empty()
        );

        // A container built without knowing its security context counts as writable.
        let unknown = Intent::Workload {
            images: vec![ImageUse::new(Location::Container, "web", Some(&pinned))],
        };
        let d = evaluate(&[read_only_policy(Mode::Enforce)], &subject(&[]), &unknown);
        assert_eq!(
            reasons(&d),
            [("read-only", Reason::WritableRootFilesystem, Outcome::Denied)]
        );
    }

    #[test]
    fn an_added_ephemeral_container_needs_a_read_only_root_too() {
        let pinned = format!("busybox@{DIGEST}");
        let added = |read_only| Intent::AddEphemeral {
            added: vec![
                ImageUse::new(Location::EphemeralContainer, "dbg", Some(&pinned))
                    .read_only_root(read_only),
            ],
        };
        let p = [read_only_policy(Mode::Enforce)];
        assert_eq!(
            reasons(&evaluate(&p, &subject(&[]), &added(false))),
            [("read-only", Reason::WritableRootFilesystem, Outcome::Denied)]
        );
        assert!(
            evaluate(&p, &subject(&[]), &added(true))
                .violations
                .is_empty()
        );
    }

    const KEY: &str = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE2G4MVHD+3JEqHoKzmOS9X0bOYe7x\n5IA9Ij5Aia5tRVTy4Zx7lQ6X2xvyOYr9jpGBMd6UIn8iYUV1oDvSO6X4Rw==\n-----END PUBLIC KEY-----\n";

    fn signing_policy(mode: Mode, on_error: OnVerificationError) -> CompiledPolicy {
        use crate::policy::crd::{AuthoritySpec, KeyAuthority, VerifyRule};
        policy(
            "signed",
            ImmutabilityPolicySpec {
                mode,
                images: ImageRules {
                    verify: vec![VerifyRule {
                        max_evidence_age: None,
                        images: vec!["ghcr.io/acme/**".into()],
                        authorities: vec![AuthoritySpec {
                            key: Some(KeyAuthority {
                                public_key: Some(KEY.into()),
                                ..Default::default()
                            }),
                            ..Default::default()
                        }],
                        attestations: Vec::new(),
                        min_authorities: 1,
                    }],
                    on_verification_error: on_error,
                    ..Default::default()
                },
                ..Default::default()
            },
        )
    }

    #[test]
    fn signatures_are_required_where_a_rule_covers_the_image() {
        let p = [signing_policy(Mode::Enforce, OnVerificationError::Deny)];
        let signed = format!("ghcr.io/acme/app@{DIGEST}");
        let other = format!("docker.io/library/nginx@{DIGEST}");
        let intent = Intent::Workload {
            images: vec![container("app", &signed), container("side", &other)],
        };
        let requests = signature_requests(&p, &subject(&[]), &intent);
        assert_eq!(requests.len(), 1, "only the covered image is checked");
        let key = requests[0].key.clone();
        assert_eq!(key.0, format!("ghcr.io/acme/app@{DIGEST}"));

        let verdict = |check: SignatureCheck| {
            let v = Verifications::from([(key.clone(), check)]);
            super::evaluate(&p, &subject(&[]), &intent, &v)
        };
        assert!(
            verdict(SignatureCheck::Verified("key".into()))
                .violations
                .is_empty()
        );
        let d = verdict(SignatureCheck::Untrusted("no signatures found".into()));
        assert_eq!(
            reasons(&d),
            vec![("signed", Reason::UnsignedImage, Outcome::Denied)]
        );
        assert!(d.violations[0].message.contains("no signatures found"));
        let d = verdict(SignatureCheck::Unavailable("connection refused".into()));
        assert_eq!(
            reasons(&d),
            vec![("signed", Reason::VerificationUnavailable, Outcome::Denied)]
        );
        // A check that never came back (deadline) counts as unavailable, never as verified.
        let d = super::evaluate(&p, &subject(&[]), &intent, &Verifications::new());
        assert_eq!(
            reasons(&d),
            vec![("signed", Reason::VerificationUnavailable, Outcome::Denied)]
        );
    }

    /// Every name a registry answers to is covered by a rule written for its usual one: an
    /// alias must not turn a signature requirement (or an allow-list) off.
    #[test]
    fn registry_aliases_stay_under_the_rules_for_the_registry() {
        let p = [signing_policy(Mode::Enforce, OnVerificationError::Deny)];
        for image in [
            "ghcr.io:443/acme/app",
            "GHCR.IO/acme/app",
            "ghcr.io:80/acme/app",
        ] {
            let intent = Intent::Workload {
                images: vec![container("app", &format!("{image}@{DIGEST}"))],
            };
            assert_eq!(
                signature_requests(&p, &subject(&[]), &intent).len(),
                1,
                "{image} must be verified"
            );
            assert_eq!(
                reasons(&evaluate(&p, &subject(&[]), &intent)),
                vec![("signed", Reason::VerificationUnavailable, Outcome::Denied)],
                "{image}"
            );
        }

        let hub = |allowed: &[&str]| {
            policy(
                "hub",
                ImmutabilityPolicySpec {
                    images: ImageRules {
                        allowed_registries: allowed.iter().map(|g| g.to_string()).collect(),
                        ..Default::default()
                    },
                    ..Default::default()
                },
            )
        };
        for (allowed, image, admitted) in [
            ("docker.io/acme/**", "registry-1.docker.io/acme/app", true),
            ("docker.io/acme/**", "index.docker.io:443/acme/app", true),
            (
                "docker.io/acme/**",
                "registry.hub.docker.com/acme/app",
                true,
            ),
            ("docker.io/library/*", "registry-1.docker.io/nginx", true),
            ("index.docker.io/acme/**", "acme/app", true),
            ("docker.io/acme/**", "registry-1.docker.io/evil/app", false),
            ("quay.io/acme/**", "registry-1.docker.io/acme/app", false),
        ] {
            let intent = Intent::Workload {
                images: vec![container("app", &format!("{image}@{DIGEST}"))],
            };
            let d = evaluate(&[hub(&[allowed])], &subject(&[]), &intent);
            assert_eq!(d.allowed(), admitted, "{allowed} vs {image}: {d:?}");
        }
    }

    /// Two rules with the same authorities share one check; the stricter maxEvidenceAge holds.
    #[test]
    fn a_shared_check_takes_the_shortest_evidence_age() {
        let mut strict = signing_policy(Mode::Enforce, OnVerificationError::Deny);
        strict.name = "strict".into();
        strict.verify[0].max_evidence_age = Duration::from_secs(60);
        let lax = signing_policy(Mode::Enforce, OnVerificationError::Deny);
        assert_eq!(strict.verify[0].fingerprint, lax.verify[0].fingerprint);
        let intent = Intent::Workload {
            images: vec![container("app", &format!("ghcr.io/acme/app@{DIGEST}"))],
        };
        for policies in [[lax.clone(), strict.clone()], [strict.clone(), lax.clone()]] {
            let requests = signature_requests(&policies, &subject(&[]), &intent);
            assert_eq!(requests.len(), 1);
            assert_eq!(requests[0].max_evidence_age, Duration::from_secs(60));
        }
    }

    /// Each distinct image once, in the order first named, however many times a request
    /// repeats it.
    #[test]
    fn signature_requests_name_each_distinct_image_once() {
        let p = [signing_policy(Mode::Enforce, OnVerificationError::Deny)];
        let digest = |i: usize| format!("sha256:{i:064x}");
        let images: Vec<ImageUse> = (0..3000)
            .map(|i| {
                container(
                    "c",
                    &format!("ghcr.io/acme/app{}@{}", i % 1000, digest(i % 1000)),
                )
            })
            .collect();
        let requests = signature_requests(&p, &subject(&[]), &Intent::Workload { images });
        assert_eq!(requests.len(), 1000);
        assert_eq!(
            requests[0].key.0,
            format!("ghcr.io/acme/app0@{}", digest(0))
        );
        assert_eq!(
            requests[999].key.0,
            format!("ghcr.io/acme/app999@{}", digest(999))
        );
    }

    #[test]
    fn on_verification_error_allow_admits_but_records() {
        let p = [signing_policy(Mode::Enforce, OnVerificationError::Allow)];
        let intent = Intent::Workload {
            images: vec![container("app", &format!("ghcr.io/acme/app@{DIGEST}"))],
        };
        let d = evaluate(&p, &subject(&[]), &intent);
        assert!(d.allowed());
        assert_eq!(
            reasons(&d),
            vec![(
                "signed",
                Reason::VerificationUnavailable,
                Outcome::WouldDeny
            )]
        );
    }

    /// A policy whose key Secret cannot be read: everything else still applies, and the
    /// images its verify rule covers are denied, even with onVerificationError: Allow.
    #[test]
    fn an_unreadable_key_denies_what_its_rule_covers_and_nothing_else_changes() {
        use crate::policy::refs::tests::{secret, spec_with_secret};
        use crate::policy::refs::{Read, RefData};
        let mut spec = spec_with_secret("release");
        spec.images.on_verification_error = OnVerificationError::Allow;
        let gone = RefData::from([(
            secret("release"),
            Read::Unreadable("secret fixity/release does not exist".into()),
        )]);
        let p = [CompiledPolicy::from_cluster("keyed".into(), &spec, &gone).unwrap()];
        let covered = Intent::Workload {
            images: vec![container("app", &format!("ghcr.io/acme/app@{DIGEST}"))],
        };
        assert!(
            signature_requests(&p, &subject(&[]), &covered).is_empty(),
            "nothing to ask the registry"
        );
        let d = evaluate(&p, &subject(&[]), &covered);
        assert_eq!(
            reasons(&d),
            vec![("keyed", Reason::ReferenceUnavailable, Outcome::Denied)]
        );
        assert!(
            d.violations[0]
                .message
                .contains("key secret fixity/release (key \"cosign.pub\") cannot be read: secret fixity/release does not exist"),
            "{}",
            d.violations[0].message
        );
        // The rest of the policy is in force: tags, exec, and images outside the rule.
        let tagged = Intent::Workload {
            images: vec![
                container("web", "nginx:latest"),
                container("side", &format!("docker.io/library/nginx@{DIGEST}")),
            ],
        };
        assert_eq!(
            reasons(&evaluate(&p, &subject(&[]), &tagged)),
            vec![("keyed", Reason::MutableTag, Outcome::Denied)]
        );
        let exec = Intent::Connect {
            action: Connect::Exec,
            container: None,
        };
        assert_eq!(
            reasons(&evaluate(&p, &subject(&[]), &exec)),
            vec![("keyed", Reason::ExecDenied, Outcome::Denied)]
        );
    }

    /// Beside an unreadable key, an authority at hand that verifies the image admits it; one
    /// that does not leaves the image denied for the missing key, not merely unsigned.
    #[test]
    fn an_authority_at_hand_still_vouches_beside_an_unreadable_one() {
        use crate::policy::crd::{AuthoritySpec, KeyAuthority};
        use crate::policy::refs::tests::{secret, spec_with_secret};
        use crate::policy::refs::{Read, RefData};
        let mut spec = spec_with_secret("release");
        spec.images.verify[0].authorities.push(AuthoritySpec {
            key: Some(KeyAuthority {
                public_key: Some(KEY.into()),
                ..Default::default()
            }),
            ..Default::default()
        });
        let gone = RefData::from([(secret("release"), Read::Unreadable("gone".into()))]);
        let p = [CompiledPolicy::from_cluster("keyed".into(), &spec, &gone).unwrap()];
        let intent = Intent::Workload {
            images: vec![container("app", &format!("ghcr.io/acme/app@{DIGEST}"))],
        };
        let requests = signature_requests(&p, &subject(&[]), &intent);
        assert_eq!(requests.len(), 1);
        let key = requests[0].key.clone();
        let verdict = |check: SignatureCheck| {
            let v = Verifications::from([(key.clone(), check)]);
            let d = super::evaluate(&p, &subject(&[]), &intent, &v);
            d.violations
                .iter()
                .map(|v| (v.reason, v.outcome))
                .collect::<Vec<_>>()
        };
        assert!(verdict(SignatureCheck::Verified("key".into())).is_empty());
        for check in [
            SignatureCheck::Untrusted("no signatures found".into()),
            SignatureCheck::Unavailable("timeout".into()),
        ] {
            assert_eq!(
                verdict(check),
                vec![(Reason::ReferenceUnavailable, Outcome::Denied)]
            );
        }
    }

    #[test]
    fn a_tag_cannot_be_verified() {
        let mut p = signing_policy(Mode::Enforce, OnVerificationError::Deny);
        p.require_digest = false;
        let intent = Intent::Workload {
            images: vec![container("app", "ghcr.io/acme/app:v1")],
        };
        assert!(signature_requests(std::slice::from_ref(&p), &subject(&[]), &intent).is_empty());
        let d = evaluate(std::slice::from_ref(&p), &subject(&[]), &intent);
        assert_eq!(
            reasons(&d),
            vec![("signed", Reason::UnsignedImage, Outcome::Denied)]
        );
    }

    /// The rule's key's attestation of provenance, with one condition.
    fn attesting_policy(on_error: OnVerificationError) -> CompiledPolicy {
        use crate::policy::crd::{AttestationSpec, ConditionSpec};
        let mut raw = ImmutabilityPolicySpec {
            images: ImageRules {
                on_verification_error: on_error,
                ..Default::default()
            },
            ..Default::default()
        };
        raw.images.verify = vec![crate::policy::crd::VerifyRule {
            images: vec!["ghcr.io/acme/**".into()],
            authorities: Vec::new(),
            max_evidence_age: None,
            min_authorities: 1,
            attestations: vec![AttestationSpec {
                name: "provenance".into(),
                predicate_type: "slsaprovenance1".into(),
                authorities: vec![crate::policy::crd::AuthoritySpec {
                    key: Some(crate::policy::crd::KeyAuthority {
                        public_key: Some(KEY.into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                conditions: vec![ConditionSpec {
                    expression: "predicate.builder.id == 'ours'".into(),
                    message: Some("built by us".into()),
                }],
            }],
        }];
        policy("attested", raw)
    }

    #[test]
    fn attestations_are_required_without_a_signature_and_each_outcome_has_its_reason() {
        use crate::verify::attest::conditions::Failure;
        let p = [attesting_policy(OnVerificationError::Deny)];
        let intent = Intent::Workload {
            images: vec![container("app", &format!("ghcr.io/acme/app@{DIGEST}"))],
        };
        let (signatures, attestations) = verification_requests(&p, &subject(&[]), &intent);
        assert!(signatures.is_empty(), "the rule requires no signature");
        assert_eq!(attestations.len(), 1);
        let key = attestations[0].key.clone();
        let verdict = |check: AttestationCheck| {
            let mut v = Verifications::new();
            v.attestations.insert(key.clone(), check);
            super::evaluate(&p, &subject(&[]), &intent, &v)
        };
        let satisfied = AttestationCheck::Satisfied {
            by: "key".into(),
            signer: None,
            origin: "bundle".into(),
            notes: Vec::new(),
        };
        assert!(verdict(satisfied).violations.is_empty());
        let d = verdict(AttestationCheck::Missing("nothing attached".into()));
        assert_eq!(
            reasons(&d),
            vec![("attested", Reason::AttestationMissing, Outcome::Denied)]
        );
        assert!(d.violations[0].message.contains("nothing attached"));
        let failed = AttestationCheck::ConditionFailed {
            signer: "key sha256:ab".into(),
            origin: "bundle".into(),
            failure: Failure::False {
                message: "built by us".into(),
                saw: Some("predicate.builder.id = \"theirs\"".into()),
            },
        };
        let d = verdict(failed);
        assert_eq!(
            reasons(&d),
            vec![(
                "attested",
                Reason::AttestationConditionFailed,
                Outcome::Denied
            )]
        );
        let m = &d.violations[0].message;
        assert!(
            m.contains("signed by key sha256:ab")
                && m.contains("built by us")
                && m.contains("\"theirs\""),
            "{m}"
        );
        // Not checked in time: unavailable, never satisfied.
        let d = super::evaluate(&p, &subject(&[]), &intent, &Verifications::new());
        assert_eq!(
            reasons(&d),
            vec![("attested", Reason::VerificationUnavailable, Outcome::Denied)]
        );
        // A tag cannot carry an attestation.
        let tagged = Intent::Workload {
            images: vec![container("app", "ghcr.io/acme/app:1.0")],
        };
        assert_eq!(
            reasons(&super::evaluate(
                &p,
                &subject(&[]),
                &tagged,
                &Verifications::new()
            )),
            vec![
                ("attested", Reason::MutableTag, Outcome::Denied),
                ("attested", Reason::AttestationMissing, Outcome::Denied)
            ]
        );
        // onVerificationError: Allow admits an unavailable check, and records it.
        let allow = [attesting_policy(OnVerificationError::Allow)];
        let d = super::evaluate(&allow, &subject(&[]), &intent, &Verifications::new());
        assert!(d.allowed());
        assert_eq!(
            reasons(&d),
            vec![(
                "attested",
                Reason::VerificationUnavailable,
                Outcome::WouldDeny
            )]
        );
    }

    /// An attestation whose signers are the rule's unreadable key: denied for the key, and the
    /// rule's signature requirement stays in force though no authority is at hand.
    #[test]
    fn an_unreadable_key_denies_its_attestations_too() {
        use crate::policy::crd::AttestationSpec;
        use crate::policy::refs::tests::{secret, spec_with_secret};
        use crate::policy::refs::{Read, RefData};
        let mut spec = spec_with_secret("release");
        spec.images.verify[0].attestations.push(AttestationSpec {
            name: "provenance".into(),
            predicate_type: "slsaprovenance1".into(),
            ..Default::default()
        });
        let gone = RefData::from([(secret("release"), Read::Unreadable("gone".into()))]);
        let p = [CompiledPolicy::from_cluster("keyed".into(), &spec, &gone).unwrap()];
        let intent = Intent::Workload {
            images: vec![container("app", &format!("ghcr.io/acme/app@{DIGEST}"))],
        };
        let (signatures, attestations) = verification_requests(&p, &subject(&[]), &intent);
        assert!(signatures.is_empty() && attestations.is_empty());
        let d = evaluate(&p, &subject(&[]), &intent);
        assert_eq!(
            reasons(&d),
            vec![
                ("keyed", Reason::ReferenceUnavailable, Outcome::Denied),
                ("keyed", Reason::ReferenceUnavailable, Outcome::Denied)
            ]
        );
        assert!(
            d.violations[0]
                .message
                .contains("attestation \"provenance\"")
        );
    }
}
