//! Key material a policy references instead of carrying: public keys in Secrets, trust roots
//! in ConfigMaps. The cluster watcher reads them ([`RefCache::read_all`]) and compiles each
//! policy with what it could read ([`super::CompiledPolicy::from_cluster`]).
//!
//! A reference that cannot be read never switches a rule off: the authority it feeds stops
//! vouching for images, the images its rule covers are denied until it can be read, and the
//! rest of the policy keeps applying. Through a transient API error (no answer, a timeout,
//! 408, 429, 5xx) the last good copy keeps serving, so an API server restart does not deny
//! signed images; any other answer (404, 403, the key missing from the object, data that is
//! not text) drops the copy at once, so deleting a key's Secret revokes the key.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::future::Future;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{Api, Client};

use super::crd::{DataRef, ImmutabilityPolicySpec};

/// One key of a Secret or ConfigMap that a policy names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// A public key (`key.secretRef`).
    Secret(DataRef),
    /// A `trusted_root.json` (`keyless.trustRoot.configMapRef`).
    ConfigMap(DataRef),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (what, r) = match self {
            Target::Secret(r) => ("key secret", r),
            Target::ConfigMap(r) => ("trust root configmap", r),
        };
        write!(f, "{what} {}/{} (key {:?})", r.namespace, r.name, r.key)
    }
}

/// What the watcher knows of one target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    /// Read just now.
    Fresh(String),
    /// Not readable just now (`why`), so the last good copy serves.
    Stale { copy: String, why: String },
    /// Not readable, and nothing to fall back on.
    Unreadable(String),
}

/// What could be read of every target; a target missing from it was not read at all (a
/// policy checked when it is applied, before the watcher reads anything).
pub type RefData = BTreeMap<Target, Read>;

/// Why a target could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadError {
    /// The API server answered: it is not there, or fixity may not read it.
    Refused(String),
    /// The API server could not be asked: the last good copy serves meanwhile.
    Transient(String),
}

/// Where targets are read from: the API server ([`ApiReader`]), or a map in tests.
pub trait Reader {
    fn read(&self, target: &Target) -> impl Future<Output = Result<String, ReadError>> + Send;
}

/// Every target `spec` names, in order: its rules' authorities, then their attestations'.
pub fn targets(spec: &ImmutabilityPolicySpec) -> impl Iterator<Item = Target> + '_ {
    spec.images
        .verify
        .iter()
        .flat_map(|r| {
            r.authorities
                .iter()
                .chain(r.attestations.iter().flat_map(|a| &a.authorities))
        })
        .flat_map(|a| {
            let key = a
                .key
                .as_ref()
                .and_then(|k| k.secret_ref.clone())
                .map(Target::Secret);
            let root = a
                .keyless
                .as_ref()
                .and_then(|k| k.trust_root.as_ref())
                .and_then(|t| t.config_map_ref.clone())
                .map(Target::ConfigMap);
            key.into_iter().chain(root)
        })
}

/// The last good copy of every target in use.
#[derive(Debug, Default)]
pub struct RefCache {
    copies: BTreeMap<Target, String>,
}

impl RefCache {
    /// Reads every target the specs name, once each. A transient failure answers with the
    /// last good copy; any other drops it. Copies of targets no spec names are forgotten.
    pub async fn read_all<'s>(
        &mut self,
        reader: &impl Reader,
        specs: impl IntoIterator<Item = &'s ImmutabilityPolicySpec>,
    ) -> RefData {
        let wanted: BTreeSet<Target> = specs.into_iter().flat_map(targets).collect();
        self.copies.retain(|t, _| wanted.contains(t));
        let mut data = RefData::new();
        for target in wanted {
            let read = match reader.read(&target).await {
                Ok(text) => {
                    self.copies.insert(target.clone(), text.clone());
                    Read::Fresh(text)
                }
                Err(ReadError::Transient(why)) => match self.copies.get(&target) {
                    Some(copy) => {
                        tracing::warn!(reference = %target, error = %why, "reference not re-read; its last good copy serves");
                        Read::Stale {
                            copy: copy.clone(),
                            why,
                        }
                    }
                    None => Read::Unreadable(why),
                },
                Err(ReadError::Refused(why)) => {
                    self.copies.remove(&target);
                    Read::Unreadable(why)
                }
            };
            data.insert(target, read);
        }
        data
    }
}

/// Reads targets from the API server.
pub struct ApiReader(pub Client);

impl Reader for ApiReader {
    async fn read(&self, target: &Target) -> Result<String, ReadError> {
        match target {
            Target::Secret(r) => {
                let secret = Api::<Secret>::namespaced(self.0.clone(), &r.namespace)
                    .get_opt(&r.name)
                    .await
                    .map_err(|e| classify(&e, "secret", r))?
                    .ok_or_else(|| gone("secret", r))?;
                let bytes = secret
                    .data
                    .and_then(|mut d| d.remove(&r.key))
                    .ok_or_else(|| no_key("secret", r))?;
                String::from_utf8(bytes.0).map_err(|_| {
                    ReadError::Refused(format!(
                        "secret {}/{} key {:?} is not text",
                        r.namespace, r.name, r.key
                    ))
                })
            }
            Target::ConfigMap(r) => Api::<ConfigMap>::namespaced(self.0.clone(), &r.namespace)
                .get_opt(&r.name)
                .await
                .map_err(|e| classify(&e, "configmap", r))?
                .ok_or_else(|| gone("configmap", r))?
                .data
                .and_then(|mut d| d.remove(&r.key))
                .ok_or_else(|| no_key("configmap", r)),
        }
    }
}

fn gone(kind: &str, r: &DataRef) -> ReadError {
    ReadError::Refused(format!("{kind} {}/{} does not exist", r.namespace, r.name))
}

fn no_key(kind: &str, r: &DataRef) -> ReadError {
    ReadError::Refused(format!(
        "{kind} {}/{} has no key {:?}",
        r.namespace, r.name, r.key
    ))
}

/// Transient: the API server gave no answer, or an answer that asks to come back later.
fn classify(e: &kube::Error, kind: &str, r: &DataRef) -> ReadError {
    let message = format!("reading {kind} {}/{}: {e}", r.namespace, r.name);
    match e {
        kube::Error::Api(status) if !matches!(status.code, 408 | 429 | 500..) => {
            ReadError::Refused(message)
        }
        _ => ReadError::Transient(message),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Answers reads from a map that the test changes between rounds.
    #[derive(Default)]
    pub struct MapReader(pub Mutex<BTreeMap<Target, Result<String, ReadError>>>);

    impl MapReader {
        pub fn set(&self, target: &Target, answer: Result<&str, ReadError>) {
            self.0
                .lock()
                .unwrap()
                .insert(target.clone(), answer.map(str::to_owned));
        }
    }

    impl Reader for MapReader {
        async fn read(&self, target: &Target) -> Result<String, ReadError> {
            self.0
                .lock()
                .unwrap()
                .get(target)
                .cloned()
                .unwrap_or_else(|| Err(ReadError::Refused(format!("{target} does not exist"))))
        }
    }

    pub fn secret(name: &str) -> Target {
        Target::Secret(DataRef {
            namespace: "fixity".into(),
            name: name.into(),
            key: "cosign.pub".into(),
        })
    }

    pub fn spec_with_secret(name: &str) -> ImmutabilityPolicySpec {
        use crate::policy::crd::{AuthoritySpec, ImageRules, KeyAuthority, VerifyRule};
        let Target::Secret(r) = secret(name) else {
            unreachable!()
        };
        ImmutabilityPolicySpec {
            images: ImageRules {
                verify: vec![VerifyRule {
                    max_evidence_age: None,
                    images: vec!["ghcr.io/acme/**".into()],
                    authorities: vec![AuthoritySpec {
                        key: Some(KeyAuthority {
                            secret_ref: Some(r),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }],
                    attestations: Vec::new(),
                    min_authorities: 1,
                }],
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_transient_error_keeps_the_last_good_copy_a_refusal_drops_it() {
        let (reader, mut cache) = (MapReader::default(), RefCache::default());
        let target = secret("release");
        async fn read(cache: &mut RefCache, reader: &MapReader) -> RefData {
            cache.read_all(reader, [&spec_with_secret("release")]).await
        }

        // Never read: nothing to fall back on, whatever the error.
        reader.set(
            &target,
            Err(ReadError::Transient("connection refused".into())),
        );
        assert_eq!(
            read(&mut cache, &reader).await[&target],
            Read::Unreadable("connection refused".into())
        );

        reader.set(&target, Ok("PEM"));
        assert_eq!(
            read(&mut cache, &reader).await[&target],
            Read::Fresh("PEM".into())
        );
        reader.set(&target, Err(ReadError::Transient("503".into())));
        assert_eq!(
            read(&mut cache, &reader).await[&target],
            Read::Stale {
                copy: "PEM".into(),
                why: "503".into()
            }
        );
        // The API server says it is gone: the copy goes too, even if the outage returns.
        reader.set(&target, Err(ReadError::Refused("does not exist".into())));
        assert_eq!(
            read(&mut cache, &reader).await[&target],
            Read::Unreadable("does not exist".into())
        );
        reader.set(&target, Err(ReadError::Transient("503".into())));
        assert_eq!(
            read(&mut cache, &reader).await[&target],
            Read::Unreadable("503".into())
        );
    }

    #[tokio::test]
    async fn copies_of_targets_no_policy_names_are_forgotten() {
        let (reader, mut cache) = (MapReader::default(), RefCache::default());
        let (old, new) = (spec_with_secret("old"), spec_with_secret("new"));
        reader.set(&secret("old"), Ok("OLD"));
        reader.set(&secret("new"), Ok("NEW"));
        let both = cache.read_all(&reader, [&old, &new]).await;
        assert_eq!(both.len(), 2);
        // The policy moved to another Secret; the old one's copy is not kept for later.
        cache.read_all(&reader, [&new]).await;
        reader.set(&secret("old"), Err(ReadError::Transient("timeout".into())));
        let again = cache.read_all(&reader, [&old]).await;
        assert_eq!(again[&secret("old")], Read::Unreadable("timeout".into()));
    }

    #[test]
    fn api_errors_that_ask_to_come_back_are_transient() {
        let r = DataRef {
            namespace: "fixity".into(),
            name: "k".into(),
            key: "cosign.pub".into(),
        };
        let api = |code: u16| {
            kube::Error::Api(
                kube::core::Status::failure("no", "Reason")
                    .with_code(code)
                    .boxed(),
            )
        };
        for code in [408, 429, 500, 503] {
            assert!(
                matches!(classify(&api(code), "secret", &r), ReadError::Transient(_)),
                "{code}"
            );
        }
        for code in [400, 401, 403, 404, 410] {
            assert!(
                matches!(classify(&api(code), "secret", &r), ReadError::Refused(_)),
                "{code}"
            );
        }
    }
}
