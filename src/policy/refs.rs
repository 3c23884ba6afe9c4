//! Key material a policy references instead of carrying: public keys in Secrets, trust roots
//! in ConfigMaps. The cluster watcher inlines them before compiling, so the evaluator and the
//! verifier only ever see complete policies.

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{Api, Client};

use super::crd::{DataRef, ImmutabilityPolicySpec};

/// Whether the spec references anything outside itself.
pub fn has_refs(spec: &ImmutabilityPolicySpec) -> bool {
    spec.images
        .verify
        .iter()
        .flat_map(|r| &r.authorities)
        .any(|a| {
            a.key.as_ref().is_some_and(|k| k.secret_ref.is_some())
                || a.keyless
                    .as_ref()
                    .and_then(|k| k.trust_root.as_ref())
                    .is_some_and(|t| t.config_map_ref.is_some())
        })
}

/// A copy of `spec` with every reference replaced by the data it points at.
pub async fn resolve(
    client: &Client,
    spec: &ImmutabilityPolicySpec,
) -> Result<ImmutabilityPolicySpec, String> {
    let mut resolved = spec.clone();
    for authority in resolved
        .images
        .verify
        .iter_mut()
        .flat_map(|r| r.authorities.iter_mut())
    {
        if let Some(key) = authority.key.as_mut()
            && let Some(r) = key.secret_ref.take()
        {
            key.public_key = Some(secret_data(client, &r).await?);
        }
        if let Some(root) = authority
            .keyless
            .as_mut()
            .and_then(|k| k.trust_root.as_mut())
            && let Some(r) = root.config_map_ref.take()
        {
            root.trusted_root_json = Some(config_map_data(client, &r).await?);
        }
    }
    Ok(resolved)
}

/// A copy of `spec` without the authorities whose material is referenced, for checking
/// everything else when a policy is applied (the references are checked by the watcher and
/// reported in the policy's status).
pub fn without_refs(spec: &ImmutabilityPolicySpec) -> ImmutabilityPolicySpec {
    let mut stripped = spec.clone();
    for rule in &mut stripped.images.verify {
        let kept: Vec<_> = rule
            .authorities
            .iter()
            .filter(|a| {
                !(a.key
                    .as_ref()
                    .is_some_and(|k| k.secret_ref.is_some() && k.public_key.is_none())
                    || a.keyless
                        .as_ref()
                        .and_then(|k| k.trust_root.as_ref())
                        .is_some_and(|t| {
                            t.config_map_ref.is_some() && t.trusted_root_json.is_none()
                        }))
            })
            .cloned()
            .collect();
        rule.authorities = kept;
    }
    stripped.images.verify.retain(|r| !r.authorities.is_empty());
    stripped
}

async fn secret_data(client: &Client, r: &DataRef) -> Result<String, String> {
    let secret = Api::<Secret>::namespaced(client.clone(), &r.namespace)
        .get_opt(&r.name)
        .await
        .map_err(|e| format!("reading secret {}/{}: {e}", r.namespace, r.name))?
        .ok_or_else(|| format!("secret {}/{} does not exist", r.namespace, r.name))?;
    let bytes = secret
        .data
        .and_then(|mut d| d.remove(&r.key))
        .ok_or_else(|| format!("secret {}/{} has no key {:?}", r.namespace, r.name, r.key))?;
    String::from_utf8(bytes.0).map_err(|_| {
        format!(
            "secret {}/{} key {:?} is not text",
            r.namespace, r.name, r.key
        )
    })
}

async fn config_map_data(client: &Client, r: &DataRef) -> Result<String, String> {
    Api::<ConfigMap>::namespaced(client.clone(), &r.namespace)
        .get_opt(&r.name)
        .await
        .map_err(|e| format!("reading configmap {}/{}: {e}", r.namespace, r.name))?
        .ok_or_else(|| format!("configmap {}/{} does not exist", r.namespace, r.name))?
        .data
        .and_then(|mut d| d.remove(&r.key))
        .ok_or_else(|| {
            format!(
                "configmap {}/{} has no key {:?}",
                r.namespace, r.name, r.key
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::files;
    use std::path::Path;

    const POLICY: &str = "apiVersion: fixity.dev/v1alpha1\nkind: ImmutabilityPolicy\nmetadata: {name: refs}\nspec:\n  images:\n    verify:\n    - images: ['ghcr.io/acme/**']\n      authorities:\n      - key: {secretRef: {namespace: fixity, name: release, key: cosign.pub}}\n";

    #[test]
    fn references_need_the_cluster_and_are_set_aside_for_apply_time_checks() {
        let err = files::parse(Path::new("p.yaml"), POLICY)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--watch-cluster"), "{err}");

        let spec: crate::policy::ImmutabilityPolicy =
            serde_json::from_value(crate::manifest::parse(POLICY).unwrap()[0].object.clone())
                .unwrap();
        assert!(has_refs(&spec.spec));
        let stripped = without_refs(&spec.spec);
        assert!(!has_refs(&stripped) && stripped.images.verify.is_empty());
        assert!(crate::policy::CompiledPolicy::from_spec("refs".into(), &stripped).is_ok());
    }
}
