//! The `ImmutabilityPolicy` custom resource. This Rust type is the source of truth: the CRD
//! YAML checked in under `charts/` is generated from it (`fixity crd`).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What fixity requires of the workloads a policy matches.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "fixity.dev",
    version = "v1alpha1",
    kind = "ImmutabilityPolicy",
    shortname = "ipol",
    doc = "An ImmutabilityPolicy: what fixity requires of workloads and running pods.",
    status = "ImmutabilityPolicyStatus",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Fail","type":"integer","jsonPath":".status.scan.results.fail"}"#,
    printcolumn = r#"{"name":"Warn","type":"integer","jsonPath":".status.scan.results.warn"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImmutabilityPolicySpec {
    /// Enforce denies violating requests; Audit admits them but records and warns.
    #[serde(default)]
    pub mode: Mode,
    /// Which requests the policy applies to. Empty matches every namespace.
    #[serde(default, rename = "match")]
    pub match_: Match,
    /// Rules for the images a workload names.
    #[serde(default)]
    pub images: ImageRules,
    /// Rules for changing running pods in place.
    #[serde(default)]
    pub runtime: RuntimeRules,
    /// Break-glass: requesters the policy never denies. Each exempted request is still logged.
    #[serde(default)]
    pub exemptions: Vec<Exemption>,
}

/// Whether violations are denied or only recorded.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum Mode {
    #[default]
    Enforce,
    Audit,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "Enforce",
            Mode::Audit => "Audit",
        }
    }
}

/// The namespaces a policy applies to.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Match {
    /// Namespaces whose labels match this selector. Absent: every namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Namespace names the policy never applies to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_namespaces: Vec<String>,
}

/// Rules for image references.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImageRules {
    /// Every image must be pinned by digest (`@sha256:` or `@sha512:`).
    #[serde(default = "default_true")]
    pub require_digest: bool,
    /// Globs over `registry/repository` (`*` stays within one path segment, `**` spans
    /// segments). Empty allows every registry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_registries: Vec<String>,
    /// Signatures and attestations required: an image matching a rule must be signed, at the
    /// digest the pod names, by at least one of the rule's authorities, and carry the rule's
    /// attestations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub verify: Vec<VerifyRule>,
    /// Secrets (`kubernetes.io/dockerconfigjson`) with registry credentials for fetching
    /// signatures, besides the pod's own and its service account's pull secrets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub registry_credentials: Vec<SecretRef>,
    /// When signatures cannot be checked in time (registry down or slow): Deny (default)
    /// or Allow. Either way the request is recorded as VerificationUnavailable.
    #[serde(default)]
    pub on_verification_error: OnVerificationError,
}

impl Default for ImageRules {
    fn default() -> Self {
        Self {
            require_digest: true,
            allowed_registries: Vec::new(),
            verify: Vec::new(),
            registry_credentials: Vec::new(),
            on_verification_error: OnVerificationError::Deny,
        }
    }
}

/// A Secret by namespace and name.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretRef {
    pub namespace: String,
    pub name: String,
}

/// What an unanswerable signature check does to the request.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum OnVerificationError {
    #[default]
    Deny,
    Allow,
}

/// Images, the authorities that must have signed them and the attestations they must carry.
/// A rule requires a signature (its authorities), attestations, or both.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VerifyRule {
    /// Globs over `registry/repository`, as in allowedRegistries.
    pub images: Vec<String>,
    /// A signature by any one of these is required (by minAuthorities of them, when more
    /// than one); also the signers of attestations that name none of their own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub authorities: Vec<AuthoritySpec>,
    /// How old evidence kept in the evidence store may be and still admit an image without
    /// the registry (during an outage too), e.g. `168h`, `7d` or `P7D`. Absent: 7 days; `0s`:
    /// stored evidence is never used for this rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_evidence_age: Option<String>,
    /// How many distinct authorities must each have signed the digest (default 1). A key
    /// listed twice, or one issuer and subject with one trust root, is one authority, and one
    /// signer counts for one authority only.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    #[schemars(range(min = 1))]
    pub min_authorities: u32,
    /// Signed in-toto attestations the image must carry, each of its predicate type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attestations: Vec<AttestationSpec>,
}

/// An attestation an image must carry: signed by a trusted authority, about the digest the pod
/// names, of exactly this predicate type, meeting every condition.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AttestationSpec {
    /// A name for messages and `fixity verify` output.
    pub name: String,
    /// A URI (`https://slsa.dev/provenance/v1`), or one of cosign's `--type` shorthands:
    /// slsaprovenance (v0.2), slsaprovenance02, slsaprovenance1, spdx, spdxjson, cyclonedx,
    /// link, vuln, openvex, custom.
    pub predicate_type: String,
    /// Who may sign it; absent: the rule's authorities.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub authorities: Vec<AuthoritySpec>,
    /// CEL expressions that must all be true, over `predicate`, `statement`, `image` and `now`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<ConditionSpec>,
}

/// One CEL condition on an attestation.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConditionSpec {
    /// A CEL expression returning bool, e.g.
    /// `predicate.runDetails.builder.id.startsWith("https://github.com/acme/")`.
    pub expression: String,
    /// What a denial says when it is false; absent: the expression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

fn one() -> u32 {
    1
}

fn is_one(n: &u32) -> bool {
    *n == 1
}

/// One trusted signer: a key, or a keyless identity. Exactly one of the two.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthoritySpec {
    /// A name for logs and `fixity verify` output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<KeyAuthority>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyless: Option<KeylessAuthority>,
}

/// A public key that signs images (cosign sign --key).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeyAuthority {
    /// PEM public key: ECDSA P-256/P-384/P-521, RSA or Ed25519.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    /// Or the key from a Secret (read with --watch-cluster; re-read every minute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<DataRef>,
    /// Require a transparency-log entry of the signature, verified against trustRoot.
    /// Off by default, so that air-gapped signing works.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub require_tlog: bool,
    /// Require an RFC 3161 timestamp from a timestamp authority of trustRoot. Off by default.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub require_timestamp: bool,
    /// Where the log and timestamp-authority keys for requireTlog and requireTimestamp come
    /// from (inline only); absent: Sigstore's public-good instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_root: Option<TrustRootSpec>,
}

/// One key of a Secret's or ConfigMap's data.
#[derive(
    Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema,
)]
#[serde(deny_unknown_fields)]
pub struct DataRef {
    pub namespace: String,
    pub name: String,
    pub key: String,
}

/// A Fulcio certificate identity (cosign keyless signing). Give issuer or issuerRegExp, and
/// subject or subjectRegExp. Regular expressions must match the whole value, as if written
/// between ^ and $: `https://github.com/acme/.*` accepts no other host, and
/// `...@refs/heads/main` does not accept `...@refs/heads/main-evil`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeylessAuthority {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer_reg_exp: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_reg_exp: Option<String>,
    /// A custom trust root; absent: Sigstore's public-good instance, built into fixity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_root: Option<TrustRootSpec>,
    /// Require an RFC 3161 timestamp from a timestamp authority of the trust root (a Rekor v1
    /// integrated time alone is then not enough). Off by default.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub require_timestamp: bool,
    /// Certificate transparency: the certificate's SCTs are checked against the trust root's
    /// CT logs unless disabled (for private instances without a CT log).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ctlog: Option<CtlogSpec>,
}

/// Certificate-transparency settings of a keyless authority.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CtlogSpec {
    /// Do not require SCTs.
    #[serde(default)]
    pub disabled: bool,
}

/// A private Sigstore's (or an air-gapped copy's) trust material.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrustRootSpec {
    /// The content of a `trusted_root.json` (Fulcio CAs and transparency-log keys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trusted_root_json: Option<String>,
    /// Or that content from a ConfigMap (read with --watch-cluster; re-read every minute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_ref: Option<DataRef>,
}

fn default_true() -> bool {
    true
}

/// Allow or deny one kind of in-place change.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Action {
    Allow,
    Deny,
}

/// Rules for touching running pods.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuntimeRules {
    /// `kubectl exec` and `kubectl cp` (CONNECT pods/exec).
    #[serde(default = "deny")]
    pub exec: Action,
    /// `kubectl attach` (CONNECT pods/attach).
    #[serde(default = "deny")]
    pub attach: Action,
    /// `kubectl port-forward` (CONNECT pods/portforward).
    #[serde(default = "allow")]
    pub port_forward: Action,
    /// `kubectl debug` adding an ephemeral container (UPDATE pods/ephemeralcontainers).
    #[serde(default = "deny")]
    pub ephemeral_containers: Action,
    /// Changing a running pod's container images (UPDATE pods).
    #[serde(default = "deny")]
    pub image_updates: Action,
    /// Evict pods someone entered through an admitted exec or attach (an Audit policy, a
    /// break-glass exemption), so their controller replaces them with clean ones. Absent:
    /// such pods are marked and reported, never evicted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_tainted: Option<ReplaceTainted>,
    /// Require: every container, init container and ephemeral container must set
    /// `securityContext.readOnlyRootFilesystem: true`, so a running container cannot rewrite
    /// itself. Optional by default.
    #[serde(default, skip_serializing_if = "RootFilesystem::is_optional")]
    pub read_only_root_filesystem: RootFilesystem,
}

/// Whether containers must run with a read-only root filesystem. Not `Off`: YAML 1.1, which
/// kubectl and the API server read, makes an unquoted `Off` the boolean false.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RootFilesystem {
    /// No requirement.
    #[default]
    Optional,
    /// `securityContext.readOnlyRootFilesystem: true` on every container.
    Require,
}

impl RootFilesystem {
    fn is_optional(&self) -> bool {
        *self == RootFilesystem::Optional
    }
}

impl Default for RuntimeRules {
    fn default() -> Self {
        Self {
            exec: Action::Deny,
            attach: Action::Deny,
            port_forward: Action::Allow,
            ephemeral_containers: Action::Deny,
            image_updates: Action::Deny,
            replace_tainted: None,
            read_only_root_filesystem: RootFilesystem::Optional,
        }
    }
}

/// When and which tainted pods are evicted.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReplaceTainted {
    /// How long after it was entered a pod is evicted: "30s", "10m", "1h30m". The eviction
    /// goes through the Eviction API, so PodDisruptionBudgets can hold it back.
    pub after: String,
    /// Pods without a controller, which nothing would recreate: Report (default) or Evict.
    #[serde(default)]
    pub bare_pods: BarePods,
}

/// What happens to a tainted pod that no controller owns.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum BarePods {
    #[default]
    Report,
    Evict,
}

fn deny() -> Action {
    Action::Deny
}

fn allow() -> Action {
    Action::Allow
}

/// Requesters exempt from a policy. Any listed user, group or service account matches.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Exemption {
    /// Exact user names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<String>,
    /// Exact group names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// Service accounts as `namespace/name`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
}

/// What fixity last observed of a policy.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImmutabilityPolicyStatus {
    /// The generation the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` is True when the policy is in force. False with reason `Invalid` when it is
    /// not (an invalid spec is ignored whole); False with reason `ReferenceUnavailable` when it
    /// is in force but a referenced key or trust root cannot be read, so the images its rules
    /// cover are denied until it can.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// What the last background scan found among the workloads already in the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scan: Option<ScanStatus>,
}

/// The background scanner's counts for one policy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScanStatus {
    /// When the scan these counts come from finished.
    pub last_scan_time: Time,
    /// Workloads (pods folded into the workload that owns them) the policy applies to.
    pub workloads: i64,
    /// Results by outcome: one per workload and rule.
    pub results: ResultCounts,
    /// Failing and warning results by reason code.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub reasons: BTreeMap<String, i64>,
}

/// Results by outcome, as reports count them.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct ResultCounts {
    pub pass: i64,
    /// Against Enforce policies.
    pub fail: i64,
    /// Against Audit policies.
    pub warn: i64,
}
