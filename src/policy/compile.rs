//! Turns an `ImmutabilityPolicy` into the form the evaluator reads, checking everything that the
//! CRD schema cannot. A policy that fails here is never used, not even in part.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::crd::{
    AuthoritySpec, ImmutabilityPolicy, ImmutabilityPolicySpec, Mode, OnVerificationError,
    RuntimeRules, TrustRootSpec, VerifyRule,
};
use super::glob::{Glob, GlobError};
use crate::verify::{Authority, KeyRequirements, KeylessRequirements, Matcher, TrustRoot};

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
    #[error("spec.images.verify: {0}")]
    Reference(String),
    #[error("spec.images.verify[{rule}]: {message}")]
    Verify { rule: usize, message: String },
    #[error("spec.images.verify[{rule}].authorities[{index}]: {message}")]
    Authority {
        rule: usize,
        index: usize,
        message: String,
    },
}

/// A signature requirement, ready for the evaluator and the verifier.
#[derive(Debug, Clone)]
pub struct CompiledVerifyRule {
    pub images: Vec<Glob>,
    pub authorities: Arc<[Authority]>,
    /// Names the authority set in verification caches: equal sets share results.
    pub fingerprint: u64,
}

impl CompiledVerifyRule {
    fn compile(rule_index: usize, rule: &VerifyRule) -> Result<Self, PolicyError> {
        if rule.images.is_empty() || rule.authorities.is_empty() {
            return Err(PolicyError::Verify {
                rule: rule_index,
                message: "needs at least one image glob and one authority".to_owned(),
            });
        }
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
        let authorities = rule
            .authorities
            .iter()
            .enumerate()
            .map(|(index, spec)| {
                let fail = |message: String| PolicyError::Authority {
                    rule: rule_index,
                    index,
                    message,
                };
                let authority = authority(spec).map_err(fail)?;
                authority.validate().map_err(fail)?;
                Ok(authority)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        serde_json::to_string(&rule.authorities)
            .unwrap_or_default()
            .hash(&mut hasher);
        Ok(Self {
            images,
            authorities: authorities.into(),
            fingerprint: hasher.finish(),
        })
    }

    pub fn covers(&self, name: &str) -> bool {
        self.images.iter().any(|g| g.matches(name))
    }
}

/// Said of a reference left unresolved: only the cluster watcher reads Secrets and ConfigMaps.
pub const UNRESOLVED: &str = "secretRef and configMapRef are read from the cluster (serve --watch-cluster); give the key or trust root inline in policy files";

fn authority(spec: &AuthoritySpec) -> Result<Authority, String> {
    match (&spec.key, &spec.keyless) {
        (Some(key), None) => match (&key.public_key, &key.secret_ref) {
            (Some(pem), None) => Ok(Authority::Key {
                public_key_pem: pem.clone(),
                requirements: KeyRequirements {
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
                },
            }),
            (None, Some(_)) => Err(UNRESOLVED.to_owned()),
            _ => Err("give exactly one of key.publicKey and key.secretRef".to_owned()),
        },
        (None, Some(keyless)) => {
            let matcher =
                |what: &str, exact: &Option<String>, re: &Option<String>| match (exact, re) {
                    (Some(e), None) => Ok(Matcher::Exact(e.clone())),
                    (None, Some(r)) => whole_value_regex(r)
                        .map(Matcher::Regex)
                        .map_err(|e| format!("{what}RegExp: {e}")),
                    _ => Err(format!("give exactly one of {what} and {what}RegExp")),
                };
            Ok(Authority::Keyless {
                issuer: matcher("issuer", &keyless.issuer, &keyless.issuer_reg_exp)?,
                subject: matcher("subject", &keyless.subject, &keyless.subject_reg_exp)?,
                trust_root: trust_root(keyless.trust_root.as_ref())?,
                requirements: KeylessRequirements {
                    timestamp: keyless.require_timestamp,
                    sct: !keyless.ctlog.as_ref().is_some_and(|c| c.disabled),
                },
            })
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

/// An identity regexp that must match the whole value, as an exact identity would:
/// `...@refs/heads/main` must not accept `...@refs/heads/main-evil`. The pattern is checked
/// alone first, so wrapping it cannot change how it parses (a valid pattern has balanced
/// groups); the only way the wrap can go wrong is a verbose-mode `#` comment running to the
/// end, which swallows the closing anchor and makes the wrapped pattern fail to compile.
fn whole_value_regex(pattern: &str) -> Result<regex::Regex, String> {
    regex::Regex::new(pattern).map_err(|e| e.to_string())?;
    regex::Regex::new(&format!("^(?:{pattern})$")).map_err(|_| {
        "a trailing # comment (verbose mode) must end with a newline; the pattern is matched \
         against the whole value"
            .to_owned()
    })
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
    pub exempt_users: HashSet<String>,
    pub exempt_groups: HashSet<String>,
}

impl CompiledPolicy {
    pub fn compile(policy: &ImmutabilityPolicy) -> Result<Self, PolicyError> {
        let name = policy.metadata.name.clone().ok_or(PolicyError::Unnamed)?;
        Self::from_spec(name, &policy.spec)
    }

    pub fn from_spec(name: String, spec: &ImmutabilityPolicySpec) -> Result<Self, PolicyError> {
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
            .map(|(i, rule)| CompiledVerifyRule::compile(i, rule))
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
        authority(&AuthoritySpec {
            keyless: Some(KeylessAuthority {
                issuer_reg_exp: Some(issuer_re.into()),
                subject_reg_exp: Some(subject_re.into()),
                ..Default::default()
            }),
            ..Default::default()
        })
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
}
