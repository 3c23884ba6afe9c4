//! What the fuzz targets share: the policies they judge under and the properties every
//! answer must have. The targets themselves are in `fuzz_targets/`.

use fixity::policy::CompiledPolicy;

/// A public key made for these targets; nothing signed with its private half exists, so no
/// input may ever verify against it.
pub const KEY: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE2m9rpR+TapyLyu2t3rnp5lcY5QIO
gm0HZAGmqc2WsFHFfvGBNACBCdP1cKO6YZWDBJc4AC7HeyhkwqZISSWJ9g==
-----END PUBLIC KEY-----
";

/// Every rule fixity has, enforced, beside an audit policy with a selector and a break-glass
/// group: what a review is judged under. Without `verify`, no rule asks a registry.
pub fn every_rule_yaml(verify: bool) -> String {
    let key: String = KEY
        .lines()
        .map(|l| format!("              {l}\n"))
        .collect();
    let verify = if verify {
        format!(
            "    verify:
    - images: ['ghcr.io/acme/**']
      authorities:
        - name: release
          key:
            publicKey: |
{key}        - name: ci
          keyless:
            issuer: https://token.actions.githubusercontent.com
            subjectRegExp: 'https://github.com/acme/.*'
"
        )
    } else {
        String::new()
    };
    format!(
        "apiVersion: fixity.dev/v1alpha1
kind: ImmutabilityPolicy
metadata: {{name: every-rule}}
spec:
  mode: Enforce
  match:
    excludeNamespaces: [kube-system]
  images:
    requireDigest: true
    allowedRegistries: ['ghcr.io/acme/**', 'registry.k8s.io/*', 'docker.io/library/*']
{verify}  runtime:
    exec: Deny
    attach: Deny
    portForward: Deny
    ephemeralContainers: Deny
    imageUpdates: Deny
  exemptions:
  - groups: ['fixity:break-glass']
---
apiVersion: fixity.dev/v1alpha1
kind: ImmutabilityPolicy
metadata: {{name: audit-prod}}
spec:
  mode: Audit
  match:
    namespaceSelector:
      matchExpressions:
      - {{key: env, operator: In, values: [prod]}}
  images:
    requireDigest: true
"
    )
}

/// The policies of [`every_rule_yaml`], compiled.
pub fn every_rule(verify: bool) -> Vec<CompiledPolicy> {
    match fixity::policy::files::parse(
        std::path::Path::new("every-rule.yaml"),
        &every_rule_yaml(verify),
    ) {
        Ok(policies) => policies,
        Err(e) => panic!("the fuzz policies do not compile: {e}"),
    }
}
