//! Turns an `ImmutabilityPolicy` into the form the evaluator reads, checking everything that the
//! CRD schema cannot. A policy that fails here is never used, not even in part.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::jiff::SignedDuration;

use super::crd::{
    AttestationSpec, AuthoritySpec, BarePods, ImmutabilityPolicy, ImmutabilityPolicySpec, Mode,
    OnVerificationError, ReplaceTainted, RuntimeRules, TrustRootSpec, VerifyRule,
};
use super::glob::{Glob, GlobError};
use super::identity::{Context, IdentityTemplate, whole_value_regex};
use super::refs::{Read, RefData, Target};
use crate::verify::attest::{self, conditions::Condition};
use crate::verify::checker::DEFAULT_MAX_EVIDENCE_AGE;
use crate::verify::{
    AttestationRule, Authority, KeyRequirements, KeylessRequirements, Matcher, TrustRoot,
};

/// Why a policy cannot be put in force.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("the policy has no name")]
    Unnamed,
    #[error("spec.match.namespaceSelector: {0}")]
    Selector(String),
    #[error("spec.images.allowedRegistries[{index}]: {source}")]
    Registry { index: usize, source: GlobError },
    #[error("spec.exemptions[{index}].serviceAccounts: {value:?} is not namespace/name")]
    ServiceAccount { index: usize, value: String },
    #[error("spec.images.verify[{rule}].images[{index}]: {source}")]
    VerifyImages {
        rule: usize,
        index: usize,
        source: GlobError,
    },
    #[error("spec.images.verify[{rule}]: {message}")]
    Verify { rule: usize, message: String },
    #[error("spec.images.verify[{rule}].authorities[{index}]: {message}")]
    Authority {
        rule: usize,
        index: usize,
        message: String,
    },
    #[error("spec.images.verify[{rule}].attestations[{index}]{message}")]
    Attestation {
        rule: usize,
        index: usize,
        /// Starts with the field (`.predicateType: ...`), or `: ` for the whole attestation.
        message: String,
    },
    #[error("spec.runtime.replaceTainted.after: {0}")]
    ReplaceAfter(String),
}

/// When a tainted pod is evicted, from `runtime.replaceTainted`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replacement {
    pub after: Duration,
    pub bare_pods: BarePods,
}

impl Replacement {
    fn compile(spec: &ReplaceTainted) -> Result<Self, PolicyError> {
        let fail = |why: String| PolicyError::ReplaceAfter(format!("{:?} {why}", spec.after));
        let parsed: SignedDuration = spec
            .after
            .trim()
            .parse()
            .map_err(|e| fail(format!("is not a duration such as 30s, 10m or 1h30m ({e})")))?;
        let after = Duration::try_from(parsed).map_err(|_| fail("is negative".to_owned()))?;
        Ok(Self {
            after,
            bare_pods: spec.bare_pods,
        })
    }
}

/// A signature and attestation requirement, ready for the evaluator and the verifier.
#[derive(Debug, Clone)]
pub struct CompiledVerifyRule {
    pub images: Vec<Glob>,
    /// Whether the rule requires a signature (it names authorities); when it does and none
    /// is at hand, the images it covers are denied.
    pub requires_signature: bool,
    /// The authorities whose key or trust root is at hand.
    pub authorities: Arc<[Authority]>,
    /// Distinct authorities that must each have signed (`minAuthorities`).
    pub min_authorities: usize,
    /// Names the authority set in verification caches: equal sets share results.
    pub fingerprint: u64,
    /// Why the other authorities cannot vouch for anything (a referenced key or trust root
    /// that cannot be read or used). Unless one at hand verifies an image, the rule denies it.
    pub unreadable: Vec<String>,
    /// How old stored evidence may be and still admit an image.
    pub max_evidence_age: Duration,
    /// Keyless subjects with variables, by authority index: that authority's matcher is a
    /// [`Matcher::Template`] until expanded for an image.
    pub templates: Vec<(usize, IdentityTemplate)>,
    pub attestations: Vec<CompiledAttestation>,
}

/// An attestation requirement, with its conditions compiled.
#[derive(Debug, Clone)]
pub struct CompiledAttestation {
    pub rule: Arc<AttestationRule>,
    /// Names the requirement (authorities, predicate type, conditions, maxEvidenceAge) in
    /// verification caches.
    pub fingerprint: u64,
    /// As [`CompiledVerifyRule::unreadable`], for the attestation's signers.
    pub unreadable: Vec<String>,
}

impl CompiledAttestation {
    /// `inherited`: the rule's authorities, for an attestation that names none of its own;
    /// `rule_fingerprint` names them in the evidence store, so that such an attestation is kept
    /// beside the rule's signatures.
    fn compile(
        rule_index: usize,
        index: usize,
        spec: &AttestationSpec,
        inherited: &Compiled,
        (max_evidence_age, rule_fingerprint): (Duration, u64),
        refs: Option<&RefData>,
    ) -> Result<Self, PolicyError> {
        let fail = |message: String| PolicyError::Attestation {
            rule: rule_index,
            index,
            message,
        };
        if spec.name.trim().is_empty() {
            return Err(fail(".name: must not be empty".to_owned()));
        }
        let predicate_type = attest::predicate_type(&spec.predicate_type)
            .map_err(|e| fail(format!(".predicateType: {e}")))?;
        let own;
        let (signers, authorities_fingerprint) = if spec.authorities.is_empty() {
            if inherited.ready.is_empty() && inherited.unreadable.is_empty() {
                return Err(fail(
                    ": no authorities: give the attestation its own, or the rule some".to_owned(),
                ));
            }
            (inherited, rule_fingerprint)
        } else {
            let at = format!("spec.images.verify[{rule_index}].attestations[{index}]");
            own = authorities(&spec.authorities, refs, &at)
                .map_err(|(i, e)| fail(format!(".authorities[{i}]: {e}")))?;
            (&own, fingerprint(&own.ready, 1))
        };
        // Templates are expanded for the signature check only: an attestation signer given as
        // one would match nobody, so the policy is refused rather than every image denied.
        if !signers.templates.is_empty() {
            return Err(fail(
                ": identity templates (${...}) are expanded for the rule's signature only; give \
                 the attestation authorities of its own without variables"
                    .to_owned(),
            ));
        }
        let conditions = spec
            .conditions
            .iter()
            .enumerate()
            .map(|(i, c)| {
                Condition::compile(&c.expression, c.message.as_deref())
                    .map_err(|e| fail(format!(".conditions[{i}].expression: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (
            fingerprint(&signers.ready, 1),
            &predicate_type,
            serde_json::to_string(&spec.conditions).unwrap_or_default(),
            max_evidence_age,
        )
            .hash(&mut hasher);
        Ok(Self {
            rule: Arc::new(AttestationRule {
                name: spec.name.clone(),
                predicate_type,
                authorities: signers.ready.clone().into(),
                authorities_fingerprint,
                max_evidence_age,
                conditions,
            }),
            fingerprint: hasher.finish(),
            unreadable: signers.unreadable.clone(),
        })
    }
}

/// Authorities compiled from the specs of one field.
#[derive(Default)]
struct Compiled {
    /// Those whose key or trust root is at hand.
    ready: Vec<Authority>,
    /// Why the others cannot vouch for anything.
    unreadable: Vec<String>,
    /// Keyless subjects with variables, by index into `ready`: that authority's matcher is a
    /// [`Matcher::Template`] until expanded for an image.
    templates: Vec<(usize, IdentityTemplate)>,
    /// How many distinct authorities are listed: inline ones by identity; each referenced one
    /// as its own, whatever its Secret holds now (what a Secret holds never refuses a policy).
    distinct: usize,
}

/// Compiles `specs` (the authorities of the field `at`): those at hand, and why the others
/// cannot vouch for anything. An invalid authority is an error, with its index.
fn authorities(
    specs: &[AuthoritySpec],
    refs: Option<&RefData>,
    at: &str,
) -> Result<Compiled, (usize, String)> {
    let mut out = Compiled::default();
    let (mut inline, mut referenced) = (Vec::new(), 0);
    for (index, spec) in specs.iter().enumerate() {
        let at = |why: String| format!("{at}.authorities[{index}]: {why}");
        // An unknown variable refuses the policy, whether or not the trust root is at hand.
        let template = subject_template(spec).map_err(|e| (index, e))?;
        let ready = match authority(spec, refs).map_err(|e| (index, e))? {
            Material::Ready(authority, None) => {
                authority.validate().map_err(|e| (index, e))?;
                inline.push(authority.identity());
                authority
            }
            // Referenced material is checked here, not when the policy is applied: bad
            // content in a Secret makes its authority unusable, never the policy invalid.
            Material::Ready(authority, Some(target)) => {
                referenced += 1;
                match authority.validate() {
                    Ok(()) => authority,
                    Err(e) => {
                        out.unreadable
                            .push(at(format!("{target} is unusable: {e}")));
                        continue;
                    }
                }
            }
            Material::Unreadable(why) => {
                referenced += 1;
                out.unreadable.push(at(why));
                continue;
            }
        };
        if let Some(template) = template {
            out.templates.push((out.ready.len(), template));
        }
        out.ready.push(ready);
    }
    inline.sort();
    inline.dedup();
    out.distinct = inline.len() + referenced;
    Ok(out)
}

impl CompiledVerifyRule {
    fn compile(
        rule_index: usize,
        rule: &VerifyRule,
        refs: Option<&RefData>,
    ) -> Result<Self, PolicyError> {
        if rule.images.is_empty() || (rule.authorities.is_empty() && rule.attestations.is_empty()) {
            return Err(PolicyError::Verify {
                rule: rule_index,
                message: "needs at least one image glob, and authorities or attestations"
                    .to_owned(),
            });
        }
        let max_evidence_age = match &rule.max_evidence_age {
            None => DEFAULT_MAX_EVIDENCE_AGE,
            Some(text) => parse_age(text).map_err(|why| PolicyError::Verify {
                rule: rule_index,
                message: format!("maxEvidenceAge {text:?}: {why}"),
            })?,
        };
        let images = rule
            .images
            .iter()
            .enumerate()
            .map(|(index, g)| {
                Glob::new(g).map_err(|source| PolicyError::VerifyImages {
                    rule: rule_index,
                    index,
                    source,
                })
            })
            .collect::<Result<_, _>>()?;
        let at = format!("spec.images.verify[{rule_index}]");
        let signers = authorities(&rule.authorities, refs, &at).map_err(|(index, message)| {
            PolicyError::Authority {
                rule: rule_index,
                index,
                message,
            }
        })?;
        let min_authorities = usize::try_from(rule.min_authorities).unwrap_or(usize::MAX);
        let requires_signature = !rule.authorities.is_empty();
        // A threshold its keys cannot meet (unreadable, or a key listed inline too) denies
        // what the rule covers, with who signed; one no list could meet refuses the policy.
        let listed = signers.distinct;
        if min_authorities == 0
            || (min_authorities > listed && (requires_signature || min_authorities > 1))
        {
            return Err(PolicyError::Verify {
                rule: rule_index,
                message: format!(
                    "minAuthorities is {}, and the rule lists {} distinct {} (a key listed \
                     twice, or one issuer and subject with one trust root, counts once)",
                    rule.min_authorities,
                    listed,
                    if listed == 1 {
                        "authority"
                    } else {
                        "authorities"
                    }
                ),
            });
        }
        let rule_fingerprint = fingerprint(&signers.ready, min_authorities);
        let mut names = HashSet::new();
        let attestations = rule
            .attestations
            .iter()
            .enumerate()
            .map(|(index, spec)| {
                if !names.insert(spec.name.as_str()) {
                    return Err(PolicyError::Attestation {
                        rule: rule_index,
                        index,
                        message: format!(".name: {:?} is used twice", spec.name),
                    });
                }
                let kept = (max_evidence_age, rule_fingerprint);
                CompiledAttestation::compile(rule_index, index, spec, &signers, kept, refs)
            })
            .collect::<Result<_, _>>()?;
        let Compiled {
            ready: authorities,
            unreadable,
            templates,
            ..
        } = signers;
        Ok(Self {
            images,
            requires_signature,
            fingerprint: rule_fingerprint,
            authorities: authorities.into(),
            unreadable,
            max_evidence_age,
            min_authorities,
            templates,
            attestations,
        })
    }

    pub fn covers(&self, name: &str) -> bool {
        self.images.iter().any(|g| g.matches(name))
    }

    /// Names this rule's check of one image in verification caches and the evidence store:
    /// the rule's fingerprint, and the identities its templates expand to for this image and
    /// request.
    pub fn fingerprint_for(&self, context: &Context<'_>) -> Result<u64, String> {
        if self.templates.is_empty() {
            return Ok(self.fingerprint);
        }
        let mut parts = vec![self.fingerprint.to_le_bytes().to_vec()];
        for (_, template) in &self.templates {
            parts.push(template.expand(context)?.into_bytes());
        }
        Ok(stable_hash(parts))
    }

    /// The authorities one image is checked against, templates expanded for it.
    pub fn authorities_for(&self, context: &Context<'_>) -> Result<Arc<[Authority]>, String> {
        if self.templates.is_empty() {
            return Ok(self.authorities.clone());
        }
        let mut authorities = self.authorities.to_vec();
        for (index, template) in &self.templates {
            if let Some(Authority::Keyless { subject, .. }) = authorities.get_mut(*index) {
                *subject = template.matcher(context)?;
            }
        }
        Ok(authorities.into())
    }
}

/// The template in a keyless authority's subject, if it names variables.
fn subject_template(spec: &AuthoritySpec) -> Result<Option<IdentityTemplate>, String> {
    let Some(keyless) = &spec.keyless else {
        return Ok(None);
    };
    match (&keyless.subject, &keyless.subject_reg_exp) {
        (Some(exact), None) => {
            IdentityTemplate::parse(exact, false).map_err(|e| format!("keyless.subject: {e}"))
        }
        (None, Some(pattern)) => IdentityTemplate::parse(pattern, true)
            .map_err(|e| format!("keyless.subjectRegExp: {e}")),
        _ => Ok(None),
    }
}

/// A duration as jiff reads one (`168h`, `7d`, `P7D`), days taken as 24 hours.
fn parse_age(text: &str) -> Result<Duration, String> {
    let span: jiff::Span = text.parse().map_err(|e| format!("not a duration: {e}"))?;
    let seconds = span
        .total((
            jiff::Unit::Second,
            jiff::SpanRelativeTo::days_are_24_hours(),
        ))
        .map_err(|e| format!("not a duration: {e}"))?;
    Duration::try_from_secs_f64(seconds).map_err(|_| "must not be negative".to_owned())
}

/// Names a set of authorities by what they trust: the keys and trust roots themselves (read
/// from Secrets and ConfigMaps or inline) and what they require, so a key replaced in its
/// Secret never finds the results cached for the old one. The evidence store keeps entries
/// under it, so it is the same in every build and on every replica ([`stable_hash`]).
fn fingerprint(authorities: &[Authority], min_authorities: usize) -> u64 {
    // The threshold is part of what a cached result answers; of each authority every field:
    // the key or trust root, the identity and the requirements.
    let parts = std::iter::once((min_authorities as u64).to_le_bytes().to_vec())
        .chain(authorities.iter().map(|a| format!("{a:?}").into_bytes()));
    stable_hash(parts)
}

/// The first 8 bytes of the SHA-256 of `parts`, each preceded by its length. std's
/// `DefaultHasher` may hash differently in another Rust release, and a replica built with
/// it would not find what an older one stored.
fn stable_hash(parts: impl IntoIterator<Item = Vec<u8>>) -> u64 {
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(&part);
    }
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first)
}

/// Said of a reference in a policy file: only the cluster watcher reads Secrets and ConfigMaps.
pub const UNRESOLVED: &str = "secretRef and configMapRef are read from the cluster (serve --watch-cluster); give the key or trust root inline in policy files";

/// An authority as far as its key or trust root could be had.
enum Material {
    /// Usable once it validates; the target it was read from, if referenced.
    Ready(Authority, Option<Target>),
    /// Its referenced key or trust root is not at hand, and why.
    Unreadable(String),
}

/// The data of a referenced target: `Err` for a policy file (references need the cluster),
/// `Ok(Err(why))` when the cluster watcher could not read it (or has not yet).
fn referenced(refs: Option<&RefData>, target: &Target) -> Result<Result<String, String>, String> {
    let refs = refs.ok_or_else(|| UNRESOLVED.to_owned())?;
    Ok(match refs.get(target) {
        Some(Read::Fresh(data) | Read::Stale { copy: data, .. }) => Ok(data.clone()),
        Some(Read::Unreadable(why)) => Err(format!("{target} cannot be read: {why}")),
        None => Err(format!("{target} has not been read yet")),
    })
}

fn authority(spec: &AuthoritySpec, refs: Option<&RefData>) -> Result<Material, String> {
    match (&spec.key, &spec.keyless) {
        (Some(key), None) => {
            let requirements = KeyRequirements {
                tlog: key.require_tlog,
                timestamp: key.require_timestamp,
                trust_root: match key.trust_root.as_ref() {
                    Some(root) if root.config_map_ref.is_some() => {
                        return Err(
                            "key.trustRoot takes trustedRootJson, not configMapRef".to_owned()
                        );
                    }
                    root => trust_root(root)?,
                },
            };
            match (&key.public_key, &key.secret_ref) {
                (Some(pem), None) => Ok(Material::Ready(
                    Authority::Key {
                        public_key_pem: pem.clone(),
                        requirements,
                    },
                    None,
                )),
                (None, Some(r)) => {
                    let target = Target::Secret(r.clone());
                    Ok(match referenced(refs, &target)? {
                        Ok(pem) => Material::Ready(
                            Authority::Key {
                                public_key_pem: pem,
                                requirements,
                            },
                            Some(target),
                        ),
                        Err(why) => Material::Unreadable(why),
                    })
                }
                _ => Err("give exactly one of key.publicKey and key.secretRef".to_owned()),
            }
        }
        (None, Some(keyless)) => {
            let matcher =
                |what: &str, exact: &Option<String>, re: &Option<String>| match (exact, re) {
                    (Some(e), None) => Ok(Matcher::Exact(e.clone())),
                    (None, Some(r)) => whole_value_regex(r)
                        .map(Matcher::Regex)
                        .map_err(|e| format!("{what}RegExp: {e}")),
                    _ => Err(format!("give exactly one of {what} and {what}RegExp")),
                };
            let issuer = matcher("issuer", &keyless.issuer, &keyless.issuer_reg_exp)?;
            let subject = match (&keyless.subject, &keyless.subject_reg_exp) {
                // Identity templates (see `identity`) are expanded per image, never matched raw.
                (Some(t), None) | (None, Some(t)) if t.contains("${") => {
                    Matcher::Template(t.clone())
                }
                (exact, re) => matcher("subject", exact, re)?,
            };
            let requirements = KeylessRequirements {
                timestamp: keyless.require_timestamp,
                sct: !keyless.ctlog.as_ref().is_some_and(|c| c.disabled),
            };
            let (trust_root, target) = match keyless.trust_root.as_ref() {
                Some(TrustRootSpec {
                    trusted_root_json: None,
                    config_map_ref: Some(r),
                }) => {
                    let target = Target::ConfigMap(r.clone());
                    match referenced(refs, &target)? {
                        Ok(json) => (TrustRoot::Custom(json), Some(target)),
                        Err(why) => return Ok(Material::Unreadable(why)),
                    }
                }
                root => (trust_root(root)?, None),
            };
            Ok(Material::Ready(
                Authority::Keyless {
                    issuer,
                    subject,
                    trust_root,
                    requirements,
                },
                target,
            ))
        }
        _ => Err("give exactly one of key and keyless".to_owned()),
    }
}

fn trust_root(spec: Option<&TrustRootSpec>) -> Result<TrustRoot, String> {
    match spec {
        None => Ok(TrustRoot::PublicGood),
        Some(root) => match (&root.trusted_root_json, &root.config_map_ref) {
            (Some(json), None) => Ok(TrustRoot::Custom(json.clone())),
            (None, Some(_)) => Err(UNRESOLVED.to_owned()),
            _ => Err(
                "give exactly one of trustRoot.trustedRootJson and trustRoot.configMapRef"
                    .to_owned(),
            ),
        },
    }
}

/// A validated policy, ready for the evaluator.
#[derive(Debug, Clone)]
pub struct CompiledPolicy {
    pub name: String,
    pub mode: Mode,
    pub selector: Option<Selector>,
    pub exclude_namespaces: HashSet<String>,
    pub require_digest: bool,
    pub allowed_registries: Vec<Glob>,
    pub verify: Vec<CompiledVerifyRule>,
    /// Secrets with registry credentials, as (namespace, name).
    pub pull_secrets: Vec<(String, String)>,
    pub on_verification_error: OnVerificationError,
    pub runtime: RuntimeRules,
    /// `runtime.replaceTainted`, its duration read.
    pub replace_tainted: Option<Replacement>,
    pub exempt_users: HashSet<String>,
    pub exempt_groups: HashSet<String>,
}

impl CompiledPolicy {
    pub fn compile(policy: &ImmutabilityPolicy) -> Result<Self, PolicyError> {
        let name = policy.metadata.name.clone().ok_or(PolicyError::Unnamed)?;
        Self::from_spec(name, &policy.spec)
    }

    /// A policy that must be whole by itself (files, the built-in default): references to
    /// Secrets or ConfigMaps are an error.
    pub fn from_spec(name: String, spec: &ImmutabilityPolicySpec) -> Result<Self, PolicyError> {
        Self::from_parts(name, spec, None)
    }

    /// A policy from the cluster, with the referenced data the watcher could read. A key or
    /// trust root missing from `refs` (or unusable) leaves its authority out; the images its
    /// rule covers are then denied (`Reason::ReferenceUnavailable`) until it can be read.
    pub fn from_cluster(
        name: String,
        spec: &ImmutabilityPolicySpec,
        refs: &RefData,
    ) -> Result<Self, PolicyError> {
        Self::from_parts(name, spec, Some(refs))
    }

    /// Why some of the policy's authorities cannot vouch for anything; empty when all can.
    pub fn unreadable(&self) -> impl Iterator<Item = &str> {
        // An attestation without authorities of its own shares its rule's: said once.
        self.verify.iter().flat_map(|r| {
            r.unreadable.iter().map(String::as_str).chain(
                r.attestations
                    .iter()
                    .flat_map(|a| &a.unreadable)
                    .filter(|why| !r.unreadable.contains(why))
                    .map(String::as_str),
            )
        })
    }

    fn from_parts(
        name: String,
        spec: &ImmutabilityPolicySpec,
        refs: Option<&RefData>,
    ) -> Result<Self, PolicyError> {
        if name.is_empty() {
            return Err(PolicyError::Unnamed);
        }
        let selector = spec
            .match_
            .namespace_selector
            .as_ref()
            .map(Selector::compile)
            .transpose()
            .map_err(PolicyError::Selector)?;
        let allowed_registries = spec
            .images
            .allowed_registries
            .iter()
            .enumerate()
            .map(|(index, g)| {
                Glob::new(g).map_err(|source| PolicyError::Registry { index, source })
            })
            .collect::<Result<_, _>>()?;
        let verify = spec
            .images
            .verify
            .iter()
            .enumerate()
            .map(|(i, rule)| CompiledVerifyRule::compile(i, rule, refs))
            .collect::<Result<_, _>>()?;
        let mut exempt_users = HashSet::new();
        let mut exempt_groups = HashSet::new();
        for (index, exemption) in spec.exemptions.iter().enumerate() {
            exempt_users.extend(exemption.users.iter().cloned());
            exempt_groups.extend(exemption.groups.iter().cloned());
            for sa in &exemption.service_accounts {
                match sa.split_once('/') {
                    Some((ns, n)) if !ns.is_empty() && !n.is_empty() && !n.contains('/') => {
                        exempt_users.insert(format!("system:serviceaccount:{ns}:{n}"));
                    }
                    _ => {
                        return Err(PolicyError::ServiceAccount {
                            index,
                            value: sa.clone(),
                        });
                    }
                }
            }
        }
        Ok(Self {
            name,
            mode: spec.mode,
            selector,
            exclude_namespaces: spec.match_.exclude_namespaces.iter().cloned().collect(),
            require_digest: spec.images.require_digest,
            allowed_registries,
            verify,
            pull_secrets: spec
                .images
                .registry_credentials
                .iter()
                .map(|s| (s.namespace.clone(), s.name.clone()))
                .collect(),
            on_verification_error: spec.images.on_verification_error,
            runtime: spec.runtime.clone(),
            replace_tainted: spec
                .runtime
                .replace_tainted
                .as_ref()
                .map(Replacement::compile)
                .transpose()?,
            exempt_users,
            exempt_groups,
        })
    }

    /// Whether the policy applies in `namespace`, whose labels may not be known yet.
    /// Unknown labels count as a match: a security control errs towards applying itself.
    pub fn applies_to(&self, namespace: &str, labels: Option<&BTreeMap<String, String>>) -> bool {
        if self.exclude_namespaces.contains(namespace) {
            return false;
        }
        match (&self.selector, labels) {
            (None, _) | (Some(_), None) => true,
            (Some(selector), Some(labels)) => selector.matches(labels),
        }
    }

    /// Whether the requester may bypass this policy.
    pub fn exempts(&self, user: &str, groups: &[Cow<'_, str>]) -> bool {
        self.exempt_users.contains(user)
            || groups.iter().any(|g| self.exempt_groups.contains::<str>(g))
    }
}

/// A compiled Kubernetes label selector.
#[derive(Debug, Clone, PartialEq)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq)]
enum Requirement {
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

impl Selector {
    pub fn compile(selector: &LabelSelector) -> Result<Self, String> {
        let mut requirements = Vec::new();
        for (key, value) in selector.match_labels.iter().flatten() {
            requirements.push(Requirement::In(key.clone(), vec![value.clone()]));
        }
        for (i, expr) in selector.match_expressions.iter().flatten().enumerate() {
            let values = expr.values.clone().unwrap_or_default();
            let key = expr.key.clone();
            let requirement = match expr.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(format!(
                        "matchExpressions[{i}]: operator {} needs at least one value",
                        expr.operator
                    ));
                }
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(format!(
                        "matchExpressions[{i}]: operator {} takes no values",
                        expr.operator
                    ));
                }
                "In" => Requirement::In(key, values),
                "NotIn" => Requirement::NotIn(key, values),
                "Exists" => Requirement::Exists(key),
                "DoesNotExist" => Requirement::DoesNotExist(key),
                other => {
                    return Err(format!(
                        "matchExpressions[{i}]: unknown operator {other:?} (In, NotIn, Exists, DoesNotExist)"
                    ));
                }
            };
            requirements.push(requirement);
        }
        Ok(Self { requirements })
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::crd::{Exemption, Match};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
        }
    }

    #[test]
    fn selectors_follow_kubernetes_semantics() {
        let selector = Selector::compile(&LabelSelector {
            match_labels: Some(labels(&[("env", "prod")])),
            match_expressions: Some(vec![
                expr("tier", "In", &["web", "api"]),
                expr("legacy", "DoesNotExist", &[]),
                expr("team", "NotIn", &["sandbox"]),
            ]),
        })
        .unwrap();
        assert!(selector.matches(&labels(&[("env", "prod"), ("tier", "web")])));
        assert!(!selector.matches(&labels(&[("env", "dev"), ("tier", "web")])));
        assert!(!selector.matches(&labels(&[("env", "prod"), ("tier", "db")])));
        assert!(!selector.matches(&labels(&[("env", "prod"), ("tier", "web"), ("legacy", "")])));
        assert!(!selector.matches(&labels(&[
            ("env", "prod"),
            ("tier", "web"),
            ("team", "sandbox")
        ])));
    }

    #[test]
    fn invalid_selectors_are_refused() {
        for (e, needle) in [
            (expr("a", "In", &[]), "needs at least one value"),
            (expr("a", "Exists", &["x"]), "takes no values"),
            (expr("a", "Matches", &["x"]), "unknown operator"),
        ] {
            let err = Selector::compile(&LabelSelector {
                match_labels: None,
                match_expressions: Some(vec![e]),
            })
            .unwrap_err();
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn unknown_namespace_labels_apply_the_policy() {
        let spec = ImmutabilityPolicySpec {
            match_: Match {
                namespace_selector: Some(LabelSelector {
                    match_labels: Some(labels(&[("env", "prod")])),
                    match_expressions: None,
                }),
                exclude_namespaces: vec!["kube-system".into()],
            },
            ..Default::default()
        };
        let p = CompiledPolicy::from_spec("p".into(), &spec).unwrap();
        assert!(p.applies_to("new-ns", None));
        assert!(!p.applies_to("dev", Some(&labels(&[("env", "dev")]))));
        assert!(p.applies_to("prod", Some(&labels(&[("env", "prod")]))));
        assert!(!p.applies_to("kube-system", None));
    }

    fn keyless(issuer_re: &str, subject_re: &str) -> Result<Authority, String> {
        use crate::policy::crd::KeylessAuthority;
        let spec = AuthoritySpec {
            keyless: Some(KeylessAuthority {
                issuer_reg_exp: Some(issuer_re.into()),
                subject_reg_exp: Some(subject_re.into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        match authority(&spec, None)? {
            Material::Ready(authority, _) => Ok(authority),
            Material::Unreadable(why) => Err(why),
        }
    }

    const KEY: &str = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE2G4MVHD+3JEqHoKzmOS9X0bOYe7x\n5IA9Ij5Aia5tRVTy4Zx7lQ6X2xvyOYr9jpGBMd6UIn8iYUV1oDvSO6X4Rw==\n-----END PUBLIC KEY-----\n";

    /// A policy whose key Secret cannot be read stays in force: digests, runtime rules and
    /// the rest keep applying, and only the authority without its key drops out (its rule
    /// then denies what it covers, see `evaluate::tests`).
    #[test]
    fn an_unreadable_reference_leaves_the_rest_of_the_policy_in_force() {
        use crate::policy::refs::tests::{secret, spec_with_secret};
        let spec = spec_with_secret("release");
        let unreadable = RefData::from([(
            secret("release"),
            Read::Unreadable("secret fixity/release does not exist".into()),
        )]);
        let p = CompiledPolicy::from_cluster("p".into(), &spec, &unreadable).unwrap();
        assert!(p.require_digest && p.runtime == RuntimeRules::default());
        assert_eq!(p.verify.len(), 1, "the rule stays, with nothing to vouch");
        assert!(p.verify[0].authorities.is_empty());
        let why: Vec<&str> = p.unreadable().collect();
        assert_eq!(
            why,
            [
                "spec.images.verify[0].authorities[0]: key secret fixity/release (key \"cosign.pub\") cannot be read: secret fixity/release does not exist"
            ]
        );

        // Not read at all (checked when applied): the same, with its own words.
        let p = CompiledPolicy::from_cluster("p".into(), &spec, &RefData::new()).unwrap();
        assert!(
            p.unreadable()
                .next()
                .unwrap()
                .ends_with("has not been read yet")
        );

        // Read, and a key: in force whole. Read, and garbage: unusable, not invalid.
        let fresh = |data: &str| RefData::from([(secret("release"), Read::Fresh(data.into()))]);
        let p = CompiledPolicy::from_cluster("p".into(), &spec, &fresh(KEY)).unwrap();
        assert_eq!(p.verify[0].authorities.len(), 1);
        assert!(p.unreadable().next().is_none());
        let p = CompiledPolicy::from_cluster("p".into(), &spec, &fresh("not a key")).unwrap();
        assert!(p.verify[0].authorities.is_empty());
        assert!(
            p.unreadable().next().unwrap().contains("is unusable"),
            "{:?}",
            p.unreadable().collect::<Vec<_>>()
        );
        // A stale copy serves like a fresh one.
        let stale = RefData::from([(
            secret("release"),
            Read::Stale {
                copy: KEY.into(),
                why: "timeout".into(),
            },
        )]);
        let p = CompiledPolicy::from_cluster("p".into(), &spec, &stale).unwrap();
        assert_eq!(p.verify[0].authorities.len(), 1);

        // Policy files carry their keys: a reference there is an error, as before.
        let err = CompiledPolicy::from_spec("p".into(), &spec).unwrap_err();
        assert!(err.to_string().contains("--watch-cluster"), "{err}");
    }

    /// The authorities whose key is at hand keep vouching; the fingerprint names only them,
    /// so a cached result never stands for a set with the missing key in it.
    #[test]
    fn authorities_at_hand_keep_vouching_beside_an_unreadable_one() {
        use crate::policy::crd::KeyAuthority;
        use crate::policy::refs::tests::{secret, spec_with_secret};
        let mut spec = spec_with_secret("release");
        spec.images.verify[0].authorities.push(AuthoritySpec {
            key: Some(KeyAuthority {
                public_key: Some(KEY.into()),
                ..Default::default()
            }),
            ..Default::default()
        });
        let gone = RefData::from([(secret("release"), Read::Unreadable("gone".into()))]);
        let p = CompiledPolicy::from_cluster("p".into(), &spec, &gone).unwrap();
        assert_eq!(p.verify[0].authorities.len(), 1);
        assert_eq!(p.unreadable().count(), 1);
        let fresh = RefData::from([(secret("release"), Read::Fresh(KEY.into()))]);
        let whole = CompiledPolicy::from_cluster("p".into(), &spec, &fresh).unwrap();
        assert_eq!(whole.verify[0].authorities.len(), 2);
        assert_ne!(p.verify[0].fingerprint, whole.verify[0].fingerprint);
    }

    /// minAuthorities over referenced keys: what a Secret holds (nothing yet, or the key listed
    /// inline too) never refuses the policy; the evaluation then denies, since one signer
    /// counts once. Inline duplicates are still refused when applied.
    #[test]
    fn min_authorities_with_referenced_keys_never_refuse_the_policy() {
        use crate::policy::crd::KeyAuthority;
        use crate::policy::refs::tests::{secret, spec_with_secret};
        let mut spec = spec_with_secret("release");
        spec.images.verify[0].min_authorities = 2;
        spec.images.verify[0].authorities.push(AuthoritySpec {
            key: Some(KeyAuthority {
                public_key: Some(KEY.into()),
                ..Default::default()
            }),
            ..Default::default()
        });
        for read in [
            Read::Unreadable("gone".into()),
            Read::Fresh(KEY.into()),
            Read::Fresh("not a key".into()),
        ] {
            let refs = RefData::from([(secret("release"), read.clone())]);
            let p = CompiledPolicy::from_cluster("p".into(), &spec, &refs);
            assert!(p.is_ok(), "{read:?}: {:?}", p.err());
            assert_eq!(p.unwrap().verify[0].min_authorities, 2);
        }
        let mut twice = spec.clone();
        twice.images.verify[0].authorities[0] = twice.images.verify[0].authorities[1].clone();
        let err = CompiledPolicy::from_cluster("p".into(), &twice, &RefData::new()).unwrap_err();
        assert!(
            err.to_string().contains("lists 1 distinct authority"),
            "{err}"
        );
    }

    /// The evidence store keeps entries under these fingerprints, so they are computed the
    /// same way in every build: SHA-256 over length-prefixed parts (checked with Python's
    /// hashlib), not std's `DefaultHasher`, which a Rust release may change.
    #[test]
    fn fingerprints_are_the_same_in_every_build() {
        let parts = [2u64.to_le_bytes().to_vec(), b"fixity".to_vec()];
        assert_eq!(stable_hash(parts), 0xf605_055d_8d9b_65a4);
    }

    /// A key replaced in its Secret is another authority set: results cached for the old key
    /// (verified for ten minutes) must not vouch for images under the new one.
    #[test]
    fn a_key_replaced_in_its_secret_changes_the_fingerprint() {
        use crate::policy::refs::tests::{secret, spec_with_secret};
        let spec = spec_with_secret("release");
        let with = |pem: String| {
            let refs = RefData::from([(secret("release"), Read::Fresh(pem))]);
            CompiledPolicy::from_cluster("p".into(), &spec, &refs)
                .unwrap()
                .verify[0]
                .fingerprint
        };
        let other = rcgen::KeyPair::generate().unwrap().public_key_pem();
        assert_eq!(with(KEY.into()), with(KEY.into()));
        assert_ne!(with(KEY.into()), with(other));
    }

    /// What references cannot excuse: the rest of the rule is checked in full, references or
    /// not, so a bad glob beside a secretRef is refused when applied instead of invalidating
    /// the whole policy later.
    #[test]
    fn a_rule_with_references_is_still_checked_in_full() {
        use crate::policy::refs::tests::spec_with_secret;
        let mut spec = spec_with_secret("release");
        spec.images.verify[0].images = vec!["nginx".into()];
        assert!(matches!(
            CompiledPolicy::from_cluster("p".into(), &spec, &RefData::new()),
            Err(PolicyError::VerifyImages {
                rule: 0,
                index: 0,
                ..
            })
        ));
    }

    #[test]
    fn max_evidence_age_reads_durations_and_refuses_the_rest() {
        let day = Duration::from_secs(24 * 3600);
        assert_eq!(parse_age("168h"), Ok(7 * day));
        assert_eq!(parse_age("7d"), Ok(7 * day));
        assert_eq!(parse_age("P7D"), Ok(7 * day));
        assert_eq!(parse_age("90m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_age("0s"), Ok(Duration::ZERO));
        for bad in ["", "a week", "-1h", "7"] {
            assert!(parse_age(bad).is_err(), "{bad:?}");
        }
        let rule = |age: Option<&str>| VerifyRule {
            images: vec!["ghcr.io/acme/**".into()],
            authorities: vec![AuthoritySpec {
                keyless: Some(crate::policy::crd::KeylessAuthority {
                    issuer: Some("https://issuer.example".into()),
                    subject: Some("me@example.com".into()),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            min_authorities: 1,
            max_evidence_age: age.map(str::to_owned),
            attestations: Vec::new(),
        };
        let compiled = CompiledVerifyRule::compile(0, &rule(None), None).unwrap();
        assert_eq!(compiled.max_evidence_age, DEFAULT_MAX_EVIDENCE_AGE);
        let compiled = CompiledVerifyRule::compile(0, &rule(Some("1h")), None).unwrap();
        assert_eq!(compiled.max_evidence_age, Duration::from_secs(3600));
        let refused = CompiledVerifyRule::compile(0, &rule(Some("soon")), None);
        assert!(
            matches!(&refused, Err(PolicyError::Verify { message, .. }) if message.contains("maxEvidenceAge")),
            "{refused:?}"
        );
    }

    /// A regexp names the whole identity: `...@refs/heads/main` must not also accept
    /// `...@refs/heads/main-evil` or a workflow of another repository that ends the same way.
    #[test]
    fn identity_regexps_match_the_whole_value() {
        let workflow = "https://github.com/acme/app/.github/workflows/release.yml@refs/heads/main";
        let Ok(Authority::Keyless {
            issuer, subject, ..
        }) = keyless(
            "https://token.actions.githubusercontent.com",
            "https://github.com/acme/app/.github/workflows/release.yml@refs/heads/main",
        )
        else {
            panic!("a keyless authority");
        };
        assert!(subject.matches(workflow));
        assert!(!subject.matches(&format!("{workflow}-evil")));
        assert!(!subject.matches(&format!("https://evil.example/?{workflow}")));
        assert!(issuer.matches("https://token.actions.githubusercontent.com"));
        assert!(!issuer.matches("https://token.actions.githubusercontent.com.evil.example"));
        assert!(
            !issuer.matches("https://evil.example/https://token.actions.githubusercontent.com")
        );

        // Alternatives and explicit anchors keep their meaning inside the whole-value match.
        let Ok(Authority::Keyless { subject, .. }) =
            keyless("https://issuer.example", "^a@example.com$|b@example.com")
        else {
            panic!("a keyless authority");
        };
        assert!(subject.matches("a@example.com") && subject.matches("b@example.com"));
        assert!(!subject.matches("b@example.com.evil"));

        // A verbose-mode comment running to the end would swallow the anchors: refused.
        let err = keyless("https://issuer.example", "(?x) a@example.com # ci").unwrap_err();
        assert!(err.contains("subjectRegExp"), "{err}");
        assert!(keyless("https://issuer.example", "(?x) a@example.com # ci\n").is_ok());
        assert!(keyless("https://issuer.example", "a(").is_err());
    }

    fn verify_spec(
        authorities: Vec<AuthoritySpec>,
        min_authorities: u32,
    ) -> ImmutabilityPolicySpec {
        ImmutabilityPolicySpec {
            images: crate::policy::crd::ImageRules {
                verify: vec![VerifyRule {
                    images: vec!["ghcr.io/acme/**".into()],
                    authorities,
                    min_authorities,
                    max_evidence_age: None,
                    attestations: Vec::new(),
                }],
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn key_spec(pem: &str, require_tlog: bool) -> AuthoritySpec {
        AuthoritySpec {
            key: Some(crate::policy::crd::KeyAuthority {
                public_key: Some(pem.into()),
                require_tlog,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn keyless_spec(subject: &str) -> AuthoritySpec {
        AuthoritySpec {
            keyless: Some(crate::policy::crd::KeylessAuthority {
                issuer: Some("https://token.actions.githubusercontent.com".into()),
                subject: Some(subject.into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn min_authorities_cannot_exceed_the_distinct_authorities_listed() {
        let compile = |spec: &ImmutabilityPolicySpec| CompiledPolicy::from_spec("p".into(), spec);
        // One key twice (even with other requirements), or one identity twice, is one.
        for (authorities, distinct) in [
            (vec![key_spec(KEY, false), key_spec(KEY, true)], 1),
            (vec![keyless_spec("a"), keyless_spec("a")], 1),
            (vec![key_spec(KEY, false), keyless_spec("a")], 2),
            (vec![keyless_spec("a"), keyless_spec("b")], 2),
        ] {
            let spec = verify_spec(authorities.clone(), distinct);
            let p = compile(&spec).unwrap();
            assert_eq!(p.verify[0].min_authorities, distinct as usize);
            let err = compile(&verify_spec(authorities, distinct + 1)).unwrap_err();
            let text = err.to_string();
            assert!(
                text.starts_with("spec.images.verify[0]: minAuthorities is")
                    && text.contains(&format!("lists {distinct} distinct")),
                "{text}"
            );
        }
        assert!(compile(&verify_spec(vec![keyless_spec("a")], 0)).is_err());
        // The threshold is part of what a cached result answers.
        let one = compile(&verify_spec(vec![keyless_spec("a"), keyless_spec("b")], 1)).unwrap();
        let two = compile(&verify_spec(vec![keyless_spec("a"), keyless_spec("b")], 2)).unwrap();
        assert_ne!(one.verify[0].fingerprint, two.verify[0].fingerprint);
        // Written as YAML: absent is 1.
        let yaml = "images:\n  verify:\n  - images: ['ghcr.io/**']\n    authorities: [{keyless: {issuer: i, subject: s}}]\n";
        let spec: ImmutabilityPolicySpec = serde_norway::from_str(yaml).unwrap();
        assert_eq!(compile(&spec).unwrap().verify[0].min_authorities, 1);
    }

    #[test]
    fn replace_tainted_durations_are_read_or_refused() {
        let with_after = |after: &str| {
            let mut spec = ImmutabilityPolicySpec::default();
            spec.runtime.replace_tainted = Some(ReplaceTainted {
                after: after.into(),
                bare_pods: BarePods::Report,
            });
            CompiledPolicy::from_spec("p".into(), &spec)
        };
        for (text, secs) in [("30s", 30), ("10m", 600), ("1h30m", 5400), ("0s", 0)] {
            let p = with_after(text).unwrap();
            assert_eq!(
                p.replace_tainted.map(|r| r.after),
                Some(Duration::from_secs(secs)),
                "{text}"
            );
        }
        for bad in ["soon", "-5m", "", "10"] {
            match with_after(bad) {
                Err(PolicyError::ReplaceAfter(message)) => {
                    assert!(message.contains(&format!("{bad:?}")), "{message}");
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        assert!(
            CompiledPolicy::from_spec("p".into(), &ImmutabilityPolicySpec::default())
                .unwrap()
                .replace_tainted
                .is_none()
        );
    }

    #[test]
    fn identity_templates_are_parsed_when_the_policy_is_read() {
        let compile = |spec: &ImmutabilityPolicySpec| CompiledPolicy::from_spec("p".into(), spec);
        let templated = |subject: &str| verify_spec(vec![keyless_spec(subject)], 1);
        let err = compile(&templated("https://github.com/acme/${team}/")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "spec.images.verify[0].authorities[0]: keyless.subject: unknown variable ${team}; \
             known are ${namespace}, ${image.registry} and ${image.path[N]}"
        );
        let p = compile(&templated(
            "https://github.com/acme/${image.path[1]}/w@${namespace}",
        ))
        .unwrap();
        let rule = &p.verify[0];
        assert_eq!(rule.templates.len(), 1);
        // Unexpanded, the authority matches nothing.
        match &rule.authorities[0] {
            crate::verify::Authority::Keyless { subject, .. } => {
                assert!(
                    !subject.matches("https://github.com/acme/${image.path[1]}/w@${namespace}")
                );
            }
            other => panic!("{other:?}"),
        }
        // The expanded identity is part of the cache key.
        let image = crate::image::ImageReference::parse("ghcr.io/acme/team-a/app").unwrap();
        let fp = |namespace| {
            rule.fingerprint_for(&Context {
                image: &image,
                namespace,
            })
            .unwrap()
        };
        assert_ne!(fp("a"), fp("b"));
        assert_ne!(fp("a"), rule.fingerprint);
        let short = crate::image::ImageReference::parse("ghcr.io/solo").unwrap();
        let context = Context {
            image: &short,
            namespace: "a",
        };
        assert!(rule.fingerprint_for(&context).is_err());
        assert!(rule.authorities_for(&context).is_err());
    }

    #[test]
    fn exemptions_cover_users_groups_and_service_accounts() {
        let spec = ImmutabilityPolicySpec {
            exemptions: vec![Exemption {
                users: vec!["alice".into()],
                groups: vec!["fixity:break-glass".into()],
                service_accounts: vec!["ops/debugger".into()],
            }],
            ..Default::default()
        };
        let p = CompiledPolicy::from_spec("p".into(), &spec).unwrap();
        assert!(p.exempts("alice", &[]));
        assert!(p.exempts("bob", &["fixity:break-glass".into()]));
        assert!(p.exempts("system:serviceaccount:ops:debugger", &[]));
        assert!(!p.exempts("bob", &["system:authenticated".into()]));

        let bad = ImmutabilityPolicySpec {
            exemptions: vec![Exemption {
                service_accounts: vec!["debugger".into()],
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(
            CompiledPolicy::from_spec("p".into(), &bad).unwrap_err(),
            PolicyError::ServiceAccount {
                index: 0,
                value: "debugger".into()
            }
        );
    }

    /// Attestation rules are checked in full when a policy loads: a bad expression, type or
    /// name refuses the policy and names the field.
    #[test]
    fn attestation_rules_are_checked_when_the_policy_loads() {
        let compile = |attestations: &str, authorities: bool| {
            let key = "          - key: {publicKey: \"-----BEGIN PUBLIC KEY-----\\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE2G4MVHD+3JEqHoKzmOS9X0bOYe7x\\n5IA9Ij5Aia5tRVTy4Zx7lQ6X2xvyOYr9jpGBMd6UIn8iYUV1oDvSO6X4Rw==\\n-----END PUBLIC KEY-----\\n\"}\n";
            let text = format!(
                "images:\n  verify:\n    - images: ['ghcr.io/acme/**']\n{}      attestations:\n{attestations}",
                if authorities {
                    format!("      authorities:\n{key}")
                } else {
                    String::new()
                }
            );
            let spec: ImmutabilityPolicySpec = serde_norway::from_str(&text).unwrap();
            CompiledPolicy::from_spec("p".into(), &spec).map(|p| p.verify[0].clone())
        };
        let rule = compile(
            "        - name: provenance\n          predicateType: slsaprovenance1\n          conditions:\n            - expression: predicate.runDetails.builder.id.startsWith('https://github.com/acme/')\n",
            true,
        )
        .unwrap();
        assert!(rule.requires_signature);
        let a = &rule.attestations[0];
        assert_eq!(a.rule.predicate_type, "https://slsa.dev/provenance/v1");
        assert_eq!(
            a.rule.authorities.len(),
            1,
            "the rule's authority is inherited"
        );
        assert_ne!(a.fingerprint, rule.fingerprint);

        for (attestations, authorities, says) in [
            (
                "        - name: a\n          predicateType: vuln\n          conditions:\n            - expression: predicate.x ==\n",
                true,
                "spec.images.verify[0].attestations[0].conditions[0].expression: syntax",
            ),
            (
                "        - name: a\n          predicateType: vuln\n          conditions:\n            - expression: scan.ok\n",
                true,
                "unknown variable \"scan\"",
            ),
            (
                "        - name: a\n          predicateType: vuln\n          conditions:\n            - expression: size(predicate.results)\n",
                true,
                "returns a number, not a bool",
            ),
            (
                "        - name: a\n          predicateType: provenance\n",
                true,
                "attestations[0].predicateType",
            ),
            (
                "        - name: a\n          predicateType: vuln\n        - name: a\n          predicateType: spdxjson\n",
                true,
                "attestations[1].name: \"a\" is used twice",
            ),
            (
                "        - name: a\n          predicateType: vuln\n",
                false,
                "attestations[0]: no authorities",
            ),
        ] {
            let error = compile(attestations, authorities).unwrap_err().to_string();
            assert!(error.contains(says), "{says:?} not in {error}");
        }
    }

    #[test]
    fn thresholds_and_templates_meet_attestations() {
        let attestation = |authorities: Vec<AuthoritySpec>| AttestationSpec {
            name: "provenance".into(),
            predicate_type: "slsaprovenance1".into(),
            authorities,
            conditions: Vec::new(),
        };
        let rule = |authorities, min_authorities, attestations| {
            let mut spec = verify_spec(authorities, min_authorities);
            spec.images.verify[0].attestations = attestations;
            spec
        };
        let compile = |spec: &ImmutabilityPolicySpec| CompiledPolicy::from_spec("p".into(), spec);

        // An attestation-only rule needs no signer, and the default threshold asks for none.
        let only = compile(&rule(
            Vec::new(),
            1,
            vec![attestation(vec![key_spec(KEY, false)])],
        ))
        .unwrap();
        assert!(!only.verify[0].requires_signature);
        // A threshold there is nothing to meet it with refuses the policy.
        let text = compile(&rule(
            Vec::new(),
            2,
            vec![attestation(vec![key_spec(KEY, false)])],
        ))
        .unwrap_err()
        .to_string();
        assert!(text.contains("minAuthorities is 2"), "{text}");

        // A template would match nobody as an attestation signer: refused, said why, whether
        // the attestation names it or inherits it from the rule.
        let templated = keyless_spec(
            "https://github.com/${image.path[1]}/.github/workflows/r.yml@refs/heads/main",
        );
        for spec in [
            rule(Vec::new(), 1, vec![attestation(vec![templated.clone()])]),
            rule(vec![templated.clone()], 1, vec![attestation(Vec::new())]),
        ] {
            let text = compile(&spec).unwrap_err().to_string();
            assert!(
                text.starts_with("spec.images.verify[0].attestations[0]")
                    && text.contains("identity templates"),
                "{text}"
            );
        }
        // The rule's own templated signer, with an attestation of its own plain signer, loads.
        let both = compile(&rule(
            vec![templated],
            1,
            vec![attestation(vec![key_spec(KEY, false)])],
        ))
        .unwrap();
        assert_eq!(both.verify[0].templates.len(), 1);
        assert_eq!(both.verify[0].attestations[0].rule.authorities.len(), 1);
    }
}
