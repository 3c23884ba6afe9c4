//! Registry credentials for signature checks, from the same places the kubelet takes them:
//! the pod's `imagePullSecrets`, its service account's, plus Secrets a policy names. Secrets
//! are read through the API and cached briefly; a missing or unreadable one means anonymous.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use base64::Engine as _;
use k8s_openapi::ByteString;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::{Api, Client};
use serde::Deserialize;

use crate::verify::RegistryCredential;

/// How long a Secret's or service account's content is reused.
const TTL: Duration = Duration::from_secs(60);

/// Where a pod's registry credentials come from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PullContext {
    pub namespace: String,
    pub secrets: Vec<String>,
    pub service_account: Option<String>,
}

type Cached<T> = Mutex<HashMap<(String, String), (Instant, T)>>;

/// Reads pull secrets from the cluster.
pub struct PullSecrets {
    client: Client,
    secrets: Cached<Arc<[RegistryCredential]>>,
    service_accounts: Cached<Arc<[String]>>,
}

impl PullSecrets {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            secrets: Mutex::default(),
            service_accounts: Mutex::default(),
        }
    }

    /// Every credential the pod's own secrets, its service account's and `extra` (namespace,
    /// name) hold.
    pub async fn resolve(
        &self,
        pod: &PullContext,
        extra: &[(String, String)],
    ) -> Vec<RegistryCredential> {
        let mut names: Vec<(String, String)> = pod
            .secrets
            .iter()
            .map(|s| (pod.namespace.clone(), s.clone()))
            .collect();
        if let Some(sa) = &pod.service_account {
            for s in self
                .service_account_secrets(&pod.namespace, sa)
                .await
                .iter()
            {
                names.push((pod.namespace.clone(), s.clone()));
            }
        }
        names.extend(extra.iter().cloned());
        names.sort();
        names.dedup();
        let mut out = Vec::new();
        for (namespace, name) in names {
            out.extend(self.secret(&namespace, &name).await.iter().cloned());
        }
        out
    }

    async fn service_account_secrets(&self, namespace: &str, name: &str) -> Arc<[String]> {
        self.read(
            &self.service_accounts,
            namespace,
            name,
            |sa: ServiceAccount| {
                sa.image_pull_secrets
                    .unwrap_or_default()
                    .into_iter()
                    .map(|r| r.name)
                    .filter(|n| !n.is_empty())
                    .collect()
            },
        )
        .await
    }

    async fn secret(&self, namespace: &str, name: &str) -> Arc<[RegistryCredential]> {
        self.read(&self.secrets, namespace, name, |secret: Secret| {
            docker_config(&secret.data.unwrap_or_default())
        })
        .await
    }

    /// What `extract` finds in object `namespace/name`, from the cache while fresh. A missing
    /// or unreadable object finds nothing: the image is then fetched anonymously.
    async fn read<K, T>(
        &self,
        cache: &Cached<Arc<[T]>>,
        namespace: &str,
        name: &str,
        extract: impl FnOnce(K) -> Vec<T>,
    ) -> Arc<[T]>
    where
        K: kube::Resource<Scope = NamespaceResourceScope, DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        let key = (namespace.to_owned(), name.to_owned());
        if let Some(hit) = fresh(cache, &key) {
            return hit;
        }
        let found: Arc<[T]> = match Api::<K>::namespaced(self.client.clone(), namespace)
            .get_opt(name)
            .await
        {
            Ok(object) => object.map(extract).unwrap_or_default().into(),
            Err(e) => {
                tracing::debug!(namespace, name, kind = %K::kind(&()), error = %e, "not readable");
                Arc::from([])
            }
        };
        store(cache, key, found.clone());
        found
    }
}

fn fresh<T: Clone>(cache: &Cached<T>, key: &(String, String)) -> Option<T> {
    let cache = cache.lock().unwrap_or_else(PoisonError::into_inner);
    cache
        .get(key)
        .filter(|(at, _)| at.elapsed() < TTL)
        .map(|(_, v)| v.clone())
}

fn store<T>(cache: &Cached<T>, key: (String, String), value: T) {
    let mut cache = cache.lock().unwrap_or_else(PoisonError::into_inner);
    cache.retain(|_, (at, _)| at.elapsed() < TTL);
    cache.insert(key, (Instant::now(), value));
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, DockerAuth>,
}

#[derive(Deserialize)]
struct DockerAuth {
    username: Option<String>,
    password: Option<String>,
    auth: Option<String>,
}

/// Credentials in a `kubernetes.io/dockerconfigjson` (or legacy `dockercfg`) Secret's data.
pub fn docker_config(data: &BTreeMap<String, ByteString>) -> Vec<RegistryCredential> {
    let auths = if let Some(json) = data.get(".dockerconfigjson") {
        serde_json::from_slice::<DockerConfig>(&json.0)
            .map(|c| c.auths)
            .unwrap_or_default()
    } else if let Some(json) = data.get(".dockercfg") {
        serde_json::from_slice::<BTreeMap<String, DockerAuth>>(&json.0).unwrap_or_default()
    } else {
        BTreeMap::new()
    };
    auths
        .into_iter()
        .filter_map(|(registry, auth)| {
            let (username, password) = match (auth.username, auth.password, auth.auth) {
                (Some(u), Some(p), _) => (u, p),
                (_, _, Some(encoded)) => {
                    let decoded = base64::engine::general_purpose::STANDARD
                        .decode(encoded.trim())
                        .ok()?;
                    let text = String::from_utf8(decoded).ok()?;
                    let (u, p) = text.split_once(':')?;
                    (u.to_owned(), p.to_owned())
                }
                _ => return None,
            };
            Some(RegistryCredential {
                registry: registry_host(&registry),
                username,
                password,
            })
        })
        .collect()
}

/// `https://index.docker.io/v1/` -> `index.docker.io`: docker config keys may be URLs.
fn registry_host(key: &str) -> String {
    let without_scheme = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    without_scheme
        .split('/')
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(key: &str, json: &str) -> BTreeMap<String, ByteString> {
        BTreeMap::from([(key.to_owned(), ByteString(json.as_bytes().to_vec()))])
    }

    #[test]
    fn reads_both_docker_config_formats() {
        let encoded = base64::engine::general_purpose::STANDARD.encode("robot:s3cret");
        let json = format!(
            r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{encoded}"}},"ghcr.io":{{"username":"u","password":"p"}},"broken":{{"auth":"%%%"}}}}}}"#
        );
        let creds = docker_config(&data(".dockerconfigjson", &json));
        let summary: Vec<_> = creds
            .iter()
            .map(|c| {
                (
                    c.registry.as_str(),
                    c.username.as_str(),
                    c.password.as_str(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("ghcr.io", "u", "p"),
                ("index.docker.io", "robot", "s3cret")
            ]
        );
        let legacy = docker_config(&data(
            ".dockercfg",
            r#"{"localhost:5000":{"username":"a","password":"b"}}"#,
        ));
        assert_eq!(legacy[0].registry, "localhost:5000");
        assert!(docker_config(&data(".dockerconfigjson", "not json")).is_empty());
        assert!(docker_config(&BTreeMap::new()).is_empty());
    }
}
