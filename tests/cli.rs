//! The `fixity check` and `fixity crd` commands, run as a user runs them.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use common::BIN;

const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn fixity(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn deployment(image: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web, namespace: shop}}\nspec:\n  selector: {{matchLabels: {{app: web}}}}\n  template:\n    metadata: {{labels: {{app: web}}}}\n    spec:\n      initContainers: [{{name: migrate, image: 'ghcr.io/acme/migrate@{DIGEST}'}}]\n      containers: [{{name: web, image: '{image}'}}]\n"
    )
}

#[test]
fn a_tagged_deployment_fails_the_check() {
    let out = fixity(&["check", "-"], &deployment("nginx:1.27"));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("<stdin>:1 Deployment/web (namespace shop)"),
        "{stdout}"
    );
    assert!(
        stdout
            .contains("DENY  [fixity-default] MutableTag: container \"web\": image \"nginx:1.27\""),
        "{stdout}"
    );
    assert!(stdout.contains("1 denied"), "{stdout}");
}

#[test]
fn pinned_manifests_pass() {
    let cronjob = format!(
        "apiVersion: batch/v1\nkind: CronJob\nmetadata: {{name: nightly}}\nspec:\n  schedule: '@daily'\n  jobTemplate:\n    spec:\n      template:\n        spec:\n          containers: [{{name: job, image: 'busybox@{DIGEST}'}}]\n          restartPolicy: Never\n"
    );
    let input = format!(
        "{}---\n{cronjob}---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: settings}}\ndata: {{a: b}}\n",
        deployment(&format!("nginx:1.27@{DIGEST}"))
    );
    let out = fixity(&["check", "-"], &input);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains("3 object(s), 2 workload(s): 0 denied"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn unusable_input_exits_2_with_a_clear_message() {
    for (input, needle) in [
        ("this is not a manifest", "not a Kubernetes object"),
        (
            "apiVersion: v1\nkind: Pod\nspec: [\n",
            "not valid YAML or JSON",
        ),
        ("", "no Kubernetes objects found"),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: 7}\n",
            "not a valid Pod",
        ),
    ] {
        let out = fixity(&["check", "-"], input);
        assert_eq!(out.status.code(), Some(2), "{input:?}");
        let stderr = text(&out.stderr);
        assert!(
            stderr.starts_with("fixity check: ") && stderr.contains(needle),
            "{input:?}: {stderr}"
        );
    }
    let out = fixity(&["check", "/nonexistent/manifest.yaml"], "");
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("/nonexistent/manifest.yaml"));
}

#[test]
fn json_output_and_policy_files() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        "apiVersion: fixity.dev/v1alpha1\nkind: ImmutabilityPolicy\nmetadata: {name: observe}\nspec:\n  mode: Audit\n  images: {allowedRegistries: ['ghcr.io/acme/**']}\n",
    )
    .unwrap();
    let out = fixity(
        &[
            "check",
            "--policy",
            policy.to_str().unwrap(),
            "--output",
            "json",
            "-",
        ],
        &deployment("nginx:1.27"),
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "audit findings do not fail the check: {}",
        text(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let reasons: Vec<&str> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons, ["MutableTag", "RegistryNotAllowed"]);
    assert_eq!(report["findings"][0]["decision"], "would_deny");
    assert_eq!(report["findings"][0]["container"], "web");

    std::fs::write(&policy, "apiVersion: fixity.dev/v1alpha1\nkind: ImmutabilityPolicy\nmetadata: {name: bad}\nspec: {mode: Loud}\n").unwrap();
    let out = fixity(
        &["check", "--policy", policy.to_str().unwrap(), "-"],
        &deployment("nginx:1.27"),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("policy.yaml"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn directories_and_namespace_selectors() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("apps")).unwrap();
    std::fs::write(dir.path().join("apps/web.yaml"), deployment("nginx:1.27")).unwrap();
    std::fs::write(
        dir.path().join("ns.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {env: dev}}\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("README.md"), "not a manifest").unwrap();
    let policy = dir.path().join("prod.policy");
    std::fs::write(&policy, "apiVersion: fixity.dev/v1alpha1\nkind: ImmutabilityPolicy\nmetadata: {name: prod}\nspec:\n  match: {namespaceSelector: {matchLabels: {env: prod}}}\n").unwrap();

    let out = fixity(
        &[
            "check",
            "--policy",
            policy.to_str().unwrap(),
            dir.path().to_str().unwrap(),
        ],
        "",
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "a dev namespace is outside the prod policy: {}",
        text(&out.stdout)
    );
    // The decision rested on labels from the input, and check says so.
    assert!(
        text(&out.stdout).contains(&format!(
            "note: namespace \"shop\" selected by policies prod with the labels of its Namespace at {}:1",
            dir.path().join("ns.yaml").display()
        )),
        "{}",
        text(&out.stdout)
    );
    let out = fixity(
        &[
            "check",
            "--policy",
            policy.to_str().unwrap(),
            "--output",
            "json",
            "-",
        ],
        &deployment("nginx:1.27"),
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "labels unknown: the policy applies"
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["namespaceLabels"],
        serde_json::json!([{"namespace": "shop", "from": null, "policies": ["prod"]}])
    );
    let out = fixity(&["check", dir.path().to_str().unwrap()], "");
    assert_eq!(
        out.status.code(),
        Some(1),
        "the default policy applies everywhere"
    );
    assert!(
        !text(&out.stdout).contains("note: namespace"),
        "no selector, nothing to note: {}",
        text(&out.stdout)
    );
    assert!(
        text(&out.stdout).contains("apps/web.yaml:1 Deployment/web"),
        "{}",
        text(&out.stdout)
    );
}

/// `file:line` names the line the object starts on, as editors and CI annotations read it,
/// not the document's number.
#[test]
fn locations_are_the_lines_objects_start_on() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rendered.yaml");
    let config_map = "---\n# Source: chart/templates/cm.yaml\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings}\ndata:\n  a: |\n    one\n    two\n";
    let text_of = format!(
        "{config_map}{config_map}---\n# Source: chart/templates/web.yaml\n{}",
        deployment("nginx:1.27")
    );
    std::fs::write(&file, &text_of).unwrap();
    let line = text_of
        .lines()
        .position(|l| l == "kind: Deployment")
        .unwrap();
    let out = fixity(&["check", file.to_str().unwrap()], "");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).contains(&format!("{}:{line} Deployment/web", file.display())),
        "the Deployment's apiVersion is on line {line}: {}",
        text(&out.stdout)
    );
    let out = fixity(&["check", "-o", "json", file.to_str().unwrap()], "");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["findings"][0]["line"], line);
    assert_eq!(report["findings"][0]["document"], 3);

    let broken = format!(
        "{config_map}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p}}\nspec: {{containers: 7}}\n"
    );
    std::fs::write(&file, &broken).unwrap();
    let out = fixity(&["check", file.to_str().unwrap()], "");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains(&format!("{}:11: ", file.display())),
        "{}",
        text(&out.stderr)
    );
}

/// kubectl applies merge keys: containers that come in through `<<` are checked.
#[test]
fn containers_brought_in_by_a_merge_key_are_checked() {
    let input = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: PodTemplate\n  metadata: {name: base}\n  template:\n    spec: &pod\n      containers: [{name: web, image: 'nginx:1.27'}]\n- apiVersion: apps/v1\n  kind: Deployment\n  metadata: {name: merged}\n  spec:\n    selector: {matchLabels: {app: web}}\n    template:\n      metadata: {labels: {app: web}}\n      spec:\n        <<: *pod\n";
    let out = fixity(&["check", "-o", "json", "-"], input);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let denied: Vec<(&str, &str)> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["name"].as_str().unwrap(), f["reason"].as_str().unwrap()))
        .collect();
    assert_eq!(denied, [("base", "MutableTag"), ("merged", "MutableTag")]);
}

/// Older API versions of the pod-template kinds are the same kinds: checked, not skipped.
#[test]
fn older_api_versions_of_workloads_are_checked() {
    for (api_version, kind) in [
        ("extensions/v1beta1", "Deployment"),
        ("extensions/v1beta1", "DaemonSet"),
        ("extensions/v1beta1", "ReplicaSet"),
        ("apps/v1beta1", "Deployment"),
        ("apps/v1beta1", "StatefulSet"),
        ("apps/v1beta2", "DaemonSet"),
        ("apps/v1beta2", "ReplicaSet"),
        ("batch/v1beta1", "CronJob"),
    ] {
        let template = "template: {spec: {containers: [{name: web, image: 'nginx:1.27'}]}}";
        let spec = if kind == "CronJob" {
            format!("{{schedule: '@daily', jobTemplate: {{spec: {{{template}}}}}}}")
        } else {
            format!("{{{template}}}")
        };
        let input = format!(
            "apiVersion: {api_version}\nkind: {kind}\nmetadata: {{name: old}}\nspec: {spec}\n"
        );
        let out = fixity(&["check", "-"], &input);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{api_version} {kind}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        assert!(
            text(&out.stdout).contains("MutableTag"),
            "{api_version} {kind}"
        );
    }
}

/// kubectl and the API server read YAML 1.1, where an unquoted `Off`, `On`, `Yes` or `No` is a
/// boolean: an enum value spelled so would be written `false` into the CRD's schema, and a
/// policy saying it refused (`readOnlyRootFilesystem: Off` was).
#[test]
fn no_crd_enum_value_is_a_yaml_1_1_boolean() {
    use kube::CustomResourceExt;
    fn walk(v: &serde_json::Value, found: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(map) => {
                if let Some(serde_json::Value::Array(values)) = map.get("enum") {
                    found.extend(values.iter().filter_map(|v| v.as_str()).map(str::to_owned));
                }
                map.values().for_each(|v| walk(v, found));
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, found)),
            _ => {}
        }
    }
    let crd = serde_json::to_value(fixity::policy::ImmutabilityPolicy::crd()).unwrap();
    let mut values = Vec::new();
    walk(&crd, &mut values);
    assert!(values.contains(&"Require".to_owned()), "{values:?}");
    let booleans = ["y", "yes", "n", "no", "true", "false", "on", "off"];
    let ambiguous: Vec<&String> = values
        .iter()
        .filter(|v| booleans.contains(&v.to_ascii_lowercase().as_str()))
        .collect();
    assert!(
        ambiguous.is_empty(),
        "YAML 1.1 reads these as booleans: {ambiguous:?}"
    );
}

#[test]
fn checked_in_crd_matches_the_rust_type() {
    let out = fixity(&["crd"], "");
    assert!(out.status.success());
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let documents = fixity::cli::crd::crd_documents().unwrap();
    for (path, generated) in fixity::cli::crd::CHECKED_IN_PATHS.iter().zip(&documents) {
        let checked_in = std::fs::read_to_string(root.join(path)).unwrap();
        assert!(
            *generated == checked_in,
            "{path} is stale: regenerate the CRDs with `cargo run -q -- crd | awk '/^---$/{{n++}} {{print > (n ? \"{}\" : \"{}\")}}'`",
            fixity::cli::crd::CHECKED_IN_PATHS[1],
            fixity::cli::crd::CHECKED_IN_PATHS[0]
        );
    }
    assert_eq!(text(&out.stdout), documents.concat());
}
