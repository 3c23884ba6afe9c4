//! The background scanner, the reports and the taint controller through a real kube-apiserver:
//! run with `tests/scan/run.sh` (ignored by a plain `cargo test`). Each test starts its own
//! `fixity serve --scan` with the chart's RBAC (a ServiceAccount token), in namespaces of its
//! own, and the tests run one at a time: one scanner at a time holds the Lease.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use common::kube::{Cleanup, Run, base64, env, expect_ok as ok, kubectl, poll, run};

fn apply(yaml: &str) -> Run {
    ok(common::kube::apply(yaml))
}

/// A kubectl get, parsed; `None` when it fails.
fn json(args: &[&str]) -> Option<Value> {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let out = kubectl(&all);
    out.ok
        .then(|| serde_json::from_str(&out.stdout).ok())
        .flatten()
}

const PINNED: &str =
    "nginx@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const OTHER_DIGEST: &str =
    "sha256:fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";
/// The Lease the chart's RBAC lets fixity write.
const LEASE: &str = "fixity-scan";

/// `fixity report` as a user runs it, with the admin kubeconfig.
fn fixity_report(args: &[&str]) -> Run {
    let mut all = vec!["report"];
    all.extend_from_slice(args);
    run(common::BIN, &all, None)
}

/// The namespace of one test, selected only by its own policy.
type Namespace = common::kube::Namespace;

impl Namespace {
    fn of(test: &str) -> Self {
        Self::new("scan", test)
    }

    /// Applies the namespace's policy; the scanner picks it up by itself.
    fn policy(&self, spec: &str) {
        self.apply_policy(spec);
    }

    fn deployment(&self, name: &str, image: &str, replicas: u32) {
        apply(&format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  replicas: {replicas}\n  selector: {{matchLabels: {{app: {name}}}}}\n  template:\n    metadata: {{labels: {{app: {name}}}}}\n    spec:\n      containers: [{{name: app, image: '{image}'}}]\n",
            ns = self.name
        ));
    }

    fn pod(&self, name: &str, image: &str) {
        apply(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app: {name}}}}}\nspec:\n  containers: [{{name: app, image: '{image}'}}]\n",
            ns = self.name
        ));
    }

    /// The names of the pods with label app=`app`, once there are `count`.
    fn pods_of(&self, app: &str, count: usize) -> Vec<String> {
        poll(Duration::from_secs(120), || {
            let list = json(&["get", "pods", "-n", &self.name, "-l", &format!("app={app}")])?;
            let names: Vec<String> = list["items"]
                .as_array()?
                .iter()
                .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
                .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_owned))
                .collect();
            (names.len() == count).then_some(names)
        })
        .unwrap_or_else(|| panic!("{count} pods of {app} in {}", self.name))
    }

    /// Writes a pod's status as a kubelet would: Running and Ready, each container running
    /// the image named by `image_id`.
    fn run_pod(&self, pod: &str, image: &str, image_id: &str) {
        let status = serde_json::json!({"status": {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [{
                "name": "app", "image": image, "imageID": image_id,
                "ready": true, "restartCount": 0, "started": true,
                "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}
            }]
        }});
        ok(self.kubectl(&[
            "patch",
            "pod",
            pod,
            "--subresource=status",
            "--type=merge",
            "-p",
            &status.to_string(),
        ]));
    }

    /// fixity's report in this namespace, once `ready` accepts it.
    fn report_until(&self, what: &str, ready: impl Fn(&Value) -> bool) -> Value {
        poll(Duration::from_secs(60), || {
            let report = json(&["get", "reports.openreports.io", "fixity", "-n", &self.name])?;
            ready(&report).then_some(report)
        })
        .unwrap_or_else(|| {
            let now = json(&["get", "reports.openreports.io", "fixity", "-n", &self.name]);
            panic!("report in {}: {what}; it is:\n{now:#?}", self.name)
        })
    }
}

/// A result's (workload, rule, result, reason), as the assertions compare them.
type Row = (String, String, String, String);

fn rows(report: &Value) -> BTreeSet<Row> {
    report["results"]
        .as_array()
        .map(|results| {
            results
                .iter()
                .map(|r| {
                    let resource = &r["resources"][0];
                    (
                        format!(
                            "{}/{}",
                            resource["kind"].as_str().unwrap_or_default(),
                            resource["name"].as_str().unwrap_or_default()
                        ),
                        r["rule"].as_str().unwrap_or_default().to_owned(),
                        r["result"].as_str().unwrap_or_default().to_owned(),
                        r["properties"]["reason"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn row(workload: &str, rule: &str, result: &str, reason: &str) -> Row {
    (workload.into(), rule.into(), result.into(), reason.into())
}

fn result<'a>(report: &'a Value, workload: &str, rule: &str) -> &'a Value {
    let (kind, name) = workload.split_once('/').unwrap();
    report["results"]
        .as_array()
        .and_then(|rs| {
            rs.iter().find(|r| {
                r["rule"] == rule
                    && r["resources"][0]["kind"] == kind
                    && r["resources"][0]["name"] == name
            })
        })
        .unwrap_or_else(|| panic!("no {rule} result for {workload} in {report:#}"))
}

/// A `fixity serve --scan`, with the chart's RBAC unless told otherwise, logging to a file.
/// Dropping it stops it with SIGTERM so it gives the Lease back for the next test.
struct Scanner {
    identity: String,
    fixity: common::Fixity,
    certs: tempfile::TempDir,
}

impl Scanner {
    fn start(identity: &str, extra: &[&str]) -> Self {
        Self::start_with(&env("FIXITY_SCAN_KUBECONFIG"), identity, extra)
    }

    fn start_with(kubeconfig: &str, identity: &str, extra: &[&str]) -> Self {
        let certs = tempfile::tempdir().unwrap();
        let mut args = vec![
            "--dev",
            "--dev-cert-dir",
            certs.path().to_str().unwrap(),
            "--log-format",
            "json",
            "--watch-cluster",
            "--scan",
            "--namespace",
            "fixity",
            "--identity",
            identity,
        ];
        args.extend_from_slice(extra);
        let fixity = common::Fixity::serve_with_env(&args, &[("KUBECONFIG", kubeconfig)]);
        let scanner = Self {
            identity: identity.to_owned(),
            fixity,
            certs,
        };
        let ready = poll(Duration::from_secs(30), || {
            common::http_get(scanner.fixity.health, "/readyz").filter(|(code, _)| *code == 200)
        });
        assert!(ready.is_some(), "fixity not ready:\n{}", scanner.log());
        scanner
    }

    fn health(&self) -> SocketAddr {
        self.fixity.health
    }

    fn log(&self) -> String {
        self.fixity.log()
    }

    /// The log lines of finished scans, parsed.
    fn scans(&self) -> Vec<Value> {
        self.log()
            .lines()
            .filter(|l| l.contains("\"scan finished\""))
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The first finished scan after `seen` of them, once `accept` takes it.
    fn scan_after(&self, seen: usize, accept: impl Fn(&Value) -> bool) -> Value {
        poll(Duration::from_secs(90), || {
            self.scans().into_iter().skip(seen).find(|s| accept(s))
        })
        .unwrap_or_else(|| panic!("no such scan after {seen}:\n{}", self.log()))
    }

    fn metrics(&self) -> String {
        common::http_get(self.health(), "/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default()
    }

    /// Registers this fixity as the webhook for `ns`, for pods and their CONNECTs.
    fn register(&self, ns: &Namespace) -> Cleanup {
        apply(&format!(
            "apiVersion: admissionregistration.k8s.io/v1\nkind: ValidatingWebhookConfiguration\nmetadata: {{name: {name}}}\nwebhooks:\n- name: scan.fixity.dev\n  admissionReviewVersions: [v1]\n  sideEffects: NoneOnDryRun\n  failurePolicy: Fail\n  timeoutSeconds: 5\n  clientConfig: {{url: 'https://127.0.0.1:{port}/validate', caBundle: {ca}}}\n  namespaceSelector: {{matchLabels: {sel}}}\n  rules:\n  - {{apiGroups: [''], apiVersions: [v1], operations: [CONNECT], resources: [pods/exec, pods/attach], scope: Namespaced}}\n  - {{apiGroups: [''], apiVersions: [v1], operations: [CREATE, UPDATE], resources: [pods], scope: Namespaced}}\n",
            name = ns.name,
            sel = ns.selector(),
            port = self.fixity.addr.port(),
            ca = base64(&self.certs.path().join("ca.crt"))
        ));
        Cleanup(vec![
            "delete".into(),
            "validatingwebhookconfiguration".into(),
            ns.name.clone(),
        ])
    }

    /// SIGTERM, then waits for the exit (the Lease is released on the way out).
    fn stop(&mut self) {
        self.fixity.terminate();
    }
}

impl Drop for Scanner {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            // The whole log stays with the cluster's, which a failed run keeps.
            let kept = PathBuf::from(env("FIXITY_CLUSTER_DIR"))
                .join(format!("scan/fixity-{}.log", self.identity));
            let _ = std::fs::write(&kept, &log);
            eprintln!(
                "---- last lines of fixity {} (all of it: {}) ----\n{}",
                self.identity,
                kept.display(),
                lines[lines.len().saturating_sub(40)..].join("\n")
            );
        }
    }
}

fn policy_status(name: &str) -> Value {
    json(&["get", "immutabilitypolicy", name])
        .map(|p| p["status"].clone())
        .unwrap_or_default()
}

/// Workloads made before any policy (or fixity) existed appear with the right reasons, pods
/// folded into their Deployment; changing the policy changes the report, deleting a workload
/// removes its entries; `fixity report` reads it back and gates on Enforce failures.
#[test]
#[ignore = "needs a cluster: tests/scan/run.sh"]
fn existing_workloads_are_reported_and_follow_the_policy() {
    let ns = Namespace::of("existing");
    ns.deployment("tagged", "nginx:1.27", 2);
    ns.deployment("pinned", PINNED, 1);
    ns.pod("loner", "busybox");
    apply(&format!(
        "apiVersion: batch/v1\nkind: CronJob\nmetadata: {{name: nightly, namespace: {}}}\nspec:\n  schedule: '@daily'\n  jobTemplate:\n    spec:\n      template:\n        spec:\n          restartPolicy: Never\n          containers: [{{name: job, image: busybox}}]\n",
        ns.name
    ));
    ns.pods_of("tagged", 2);
    ns.pods_of("pinned", 1);

    let fixity = Scanner::start("existing", &["--scan-interval-secs", "3"]);
    ns.policy("mode: Enforce");
    let expected = BTreeSet::from([
        row("Deployment/tagged", "image-reference", "fail", "MutableTag"),
        row("Deployment/pinned", "image-reference", "pass", ""),
        row("Pod/loner", "image-reference", "fail", "MutableTag"),
        row("CronJob/nightly", "image-reference", "fail", "MutableTag"),
    ]);
    let report = ns.report_until("the four workloads", |r| rows(r) == expected);
    assert_eq!(report["summary"]["fail"], 3);
    assert_eq!(report["summary"]["pass"], 1);
    assert_eq!(report["source"], "fixity");
    let tagged = result(&report, "Deployment/tagged", "image-reference");
    assert_eq!(
        tagged["properties"]["pods"], "2",
        "its two pods are folded into it"
    );
    assert_eq!(tagged["properties"]["mode"], "Enforce");
    assert!(
        tagged["message"]
            .as_str()
            .unwrap()
            .contains("container \"app\": image \"nginx:1.27\" uses a mutable tag"),
        "{tagged}"
    );
    assert_eq!(tagged["severity"], "medium");
    assert!(tagged["timestamp"]["seconds"].as_i64().unwrap() > 0);

    let status = poll(Duration::from_secs(30), || {
        let s = policy_status(&ns.name);
        (s["scan"]["workloads"] == 4).then_some(s)
    })
    .expect("the policy status carries the scan's counts");
    assert_eq!(status["scan"]["results"]["fail"], 3, "{status}");
    assert_eq!(status["scan"]["results"]["pass"], 1, "{status}");
    assert_eq!(status["scan"]["reasons"]["MutableTag"], 3, "{status}");
    assert!(status["scan"]["lastScanTime"].is_string(), "{status}");
    assert_eq!(
        status["conditions"][0]["type"], "Ready",
        "the watcher's conditions stay"
    );
    let cluster =
        json(&["get", "clusterreports.openreports.io", "fixity"]).expect("a ClusterReport");
    let mine = cluster["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["policy"] == ns.name.as_str())
        .expect("a cluster result for the policy");
    assert_eq!(mine["result"], "fail");
    assert!(
        mine["message"]
            .as_str()
            .unwrap()
            .starts_with("4 workloads in 1 namespaces: 3 fail, 0 warn, 1 pass; MutableTag 3"),
        "{mine}"
    );

    // `fixity report`: the table, the JSON, the filters and the exit code.
    let table = fixity_report(&["-n", &ns.name]);
    assert_eq!(
        table.code,
        Some(1),
        "Enforce failures fail the gate:\n{}",
        table.all()
    );
    assert!(
        table.stdout.contains("Deployment/tagged") && table.stdout.contains("MutableTag"),
        "{}",
        table.stdout
    );
    assert!(
        !table.stdout.contains("Deployment/pinned"),
        "passes only with --all:\n{}",
        table.stdout
    );
    assert!(
        table.stdout.contains("3 fail, 0 warn, 1 pass"),
        "{}",
        table.stdout
    );
    let all = fixity_report(&["-n", &ns.name, "--all"]);
    assert!(all.stdout.contains("Deployment/pinned"), "{}", all.stdout);
    let listed = fixity_report(&["-n", &ns.name, "-o", "json"]);
    let listed: Value = serde_json::from_str(&listed.stdout).unwrap();
    assert_eq!(listed["fail"], 3);
    assert_eq!(listed["results"].as_array().unwrap().len(), 3);
    assert_eq!(
        fixity_report(&["-n", &ns.name, "--policy", "someone-else"]).code,
        Some(0)
    );
    assert_eq!(
        fixity_report(&["-n", &ns.name, "--reason", "ImageDrift"]).code,
        Some(0)
    );
    assert_eq!(
        fixity_report(&["-n", &ns.name, "--reason", "MutableTag"]).code,
        Some(1)
    );
    // The same findings, evaluated live without the server.
    let live = fixity_report(&["--scan", "-n", &ns.name, "-o", "json", "--all"]);
    assert_eq!(live.code, Some(1), "{}", live.all());
    let live: Value = serde_json::from_str(&live.stdout).unwrap();
    let live_rows: BTreeSet<Row> = live["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
            (
                format!("{}/{}", s("kind"), s("name")),
                s("rule"),
                s("result"),
                s("reason"),
            )
        })
        .collect();
    assert_eq!(live_rows, expected);

    // Audit instead of Enforce: the same findings as warnings, and the gate opens.
    ok(kubectl(&[
        "patch",
        "immutabilitypolicy",
        &ns.name,
        "--type=merge",
        "-p",
        r#"{"spec":{"mode":"Audit"}}"#,
    ]));
    let report = ns.report_until("warnings under Audit", |r| {
        rows(r).contains(&row(
            "Deployment/tagged",
            "image-reference",
            "warn",
            "MutableTag",
        ))
    });
    assert_eq!(report["summary"]["fail"], 0);
    assert_eq!(report["summary"]["warn"], 3);
    assert_eq!(fixity_report(&["-n", &ns.name]).code, Some(0));

    // A deleted Deployment (its ReplicaSet and pods collected) leaves the report.
    ok(ns.kubectl(&["delete", "deployment", "tagged"]));
    let report = ns.report_until("no entry for the deleted Deployment", |r| {
        !rows(r).iter().any(|(w, ..)| w == "Deployment/tagged")
    });
    assert_eq!(rows(&report).len(), 3);
    // No policy applies any more: the namespace's report goes.
    ok(kubectl(&["delete", "immutabilitypolicy", &ns.name]));
    poll(Duration::from_secs(60), || {
        (!ns.kubectl(&["get", "reports.openreports.io", "fixity"]).ok).then_some(())
    })
    .expect("the report of a namespace without results is deleted");
    drop(fixity);
}

/// A pod whose runtime reports another digest than its spec pins is drift; a tagged pod's
/// imageID says what the tag really runs.
#[test]
#[ignore = "needs a cluster: tests/scan/run.sh"]
fn drift_from_the_image_id_the_runtime_reports() {
    let ns = Namespace::of("drift");
    ns.deployment("web", PINNED, 1);
    ns.pod("tagged", "nginx:1.27");
    let web = ns.pods_of("web", 1).remove(0);
    let pinned_digest = PINNED.split_once('@').unwrap().1;
    ns.run_pod(
        &web,
        PINNED,
        &format!("docker.io/library/nginx@{OTHER_DIGEST}"),
    );
    ns.run_pod(
        "tagged",
        "nginx:1.27",
        &format!("docker.io/library/nginx@{OTHER_DIGEST}"),
    );

    let fixity = Scanner::start("drift", &["--scan-interval-secs", "3"]);
    ns.policy("mode: Enforce");
    let report = ns.report_until("drift of the Deployment", |r| {
        rows(r).contains(&row("Deployment/web", "drift", "fail", "ImageDrift"))
    });
    let drift = result(&report, "Deployment/web", "drift");
    let message = drift["message"].as_str().unwrap();
    assert!(
        message.contains(&format!(
            "container \"app\" of pod {web} runs {OTHER_DIGEST} but its spec pins {pinned_digest}"
        )),
        "{message}"
    );
    assert_eq!(drift["severity"], "high");
    let tag = result(&report, "Pod/tagged", "image-reference");
    assert!(
        tag["message"]
            .as_str()
            .unwrap()
            .contains(&format!("(pod tagged runs {OTHER_DIGEST})")),
        "{tag}"
    );
    assert!(
        rows(&report).contains(&row("Pod/tagged", "image-reference", "fail", "MutableTag")),
        "{report:#}"
    );
    // The kubelet reports the pinned digest after all: no drift.
    ns.run_pod(
        &web,
        PINNED,
        &format!("docker.io/library/nginx@{pinned_digest}"),
    );
    ns.report_until("drift gone", |r| {
        rows(r).contains(&row("Deployment/web", "drift", "pass", ""))
    });
    let status = policy_status(&ns.name);
    assert!(
        status["scan"]["reasons"].get("ImageDrift").is_none(),
        "{status}"
    );
    drop(fixity);
}

/// 1,000 pods of 10 Deployments of 10 signed images: one report object of ten workloads'
/// results, one signature verification per image, none on the next scan.
#[test]
#[ignore = "needs a cluster: tests/scan/run.sh"]
fn a_thousand_pods_give_bounded_reports_and_one_verification_per_image() {
    let lab = common::registry::Lab::start();
    let key = lab.key("release");
    let mut images = Vec::new();
    for i in 0..10 {
        let digest = lab.push_image("shop/app", &format!("v{i}"), &format!("build {i}"));
        let image = lab.reference("shop/app", &digest);
        lab.sign(&key, &image, true, &[]);
        images.push(image);
    }
    let ns = Namespace::of("thousand");
    for (i, image) in images.iter().enumerate() {
        ns.deployment(&format!("app{i}"), image, 100);
    }
    for i in 0..10 {
        ns.pods_of(&format!("app{i}"), 100);
    }
    let before = lab.logged_requests();
    let fixity = Scanner::start(
        "thousand",
        &[
            "--scan-interval-secs",
            "600",
            "--insecure-registry",
            &lab.host,
        ],
    );
    ns.policy(&key.required_on(&lab.host));
    let cold = fixity.scan_after(0, |s| s["results"].as_u64() >= Some(20));
    let cold_requests = lab.logged_requests() - before;
    let report = ns.report_until("ten workloads", |r| rows(r).len() == 20);
    for i in 0..10 {
        let w = format!("Deployment/app{i}");
        assert!(
            rows(&report).contains(&row(&w, "signatures", "pass", "")),
            "{report:#}"
        );
        assert_eq!(
            result(&report, &w, "image-reference")["properties"]["pods"],
            "100"
        );
    }
    assert_eq!(cold["signature_checks"], 10, "{cold}");
    assert_eq!(cold["signature_checks_cached"], 0, "{cold}");
    assert!(
        cold_requests <= 10 * 4,
        "{cold_requests} registry requests for 10 new signed images"
    );
    let bytes = serde_json::to_vec(&report).unwrap().len();
    assert!(bytes < 64 * 1024, "{bytes} bytes for ten workloads");
    let reports = json(&[
        "get",
        "reports.openreports.io",
        "-A",
        "-l",
        "app.kubernetes.io/managed-by=fixity",
    ])
    .unwrap();
    let mine = reports["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["metadata"]["namespace"] == ns.name.as_str())
        .count();
    assert_eq!(mine, 1, "one report object for the namespace's 1,000 pods");

    // A relabelled namespace triggers a scan; its signature checks come from the cache.
    let seen = fixity.scans().len();
    let requests = lab.logged_requests();
    ok(kubectl(&["label", "namespace", &ns.name, "touched=yes"]));
    let warm = fixity.scan_after(seen, |_| true);
    assert_eq!(warm["signature_checks"], 10, "{warm}");
    assert_eq!(warm["signature_checks_cached"], 10, "{warm}");
    assert_eq!(
        lab.logged_requests(),
        requests,
        "no registry request when warm"
    );
    eprintln!(
        "1,000 pods, 10 signed images: cold scan {} ms, {cold_requests} registry requests; warm \
         scan {} ms, 0 requests; report {} results, {bytes} bytes",
        cold["duration_ms"],
        warm["duration_ms"],
        report["results"].as_array().unwrap().len()
    );
    drop(fixity);
}

/// The scan lists the cluster page by page: with pages of 4 objects, 12 bare pods and a
/// Deployment of 9 (whose pods and ReplicaSet come on pages of their own) are all reported,
/// the Deployment's pods folded into it across pages, in as many list requests as pages.
#[test]
#[ignore = "needs a cluster: tests/scan/run.sh"]
fn the_scan_reads_every_page_of_a_list() {
    let ns = Namespace::of("pages");
    for i in 0..12 {
        ns.pod(&format!("loose-{i:02}"), "nginx:1.27");
    }
    ns.deployment("web", PINNED, 9);
    ns.pods_of("web", 9);
    let fixity = Scanner::start(
        "pages",
        &["--scan-interval-secs", "3", "--scan-page-size", "4"],
    );
    ns.policy("mode: Enforce");
    let mut expected: BTreeSet<Row> = (0..12)
        .map(|i| {
            row(
                &format!("Pod/loose-{i:02}"),
                "image-reference",
                "fail",
                "MutableTag",
            )
        })
        .collect();
    expected.insert(row("Deployment/web", "image-reference", "pass", ""));
    let report = ns.report_until("13 workloads", |r| rows(r) == expected);
    assert_eq!(
        result(&report, "Deployment/web", "image-reference")["properties"]["pods"],
        "9",
        "its pods, listed over several pages, are folded into it"
    );
    let scan = fixity.scan_after(0, |s| s["objects"].as_u64() >= Some(12 + 9 + 2));
    // At least 21 pods in pages of 4, and at least one page of each of the other 8 kinds.
    let pages = scan["pages"].as_u64().unwrap_or(0);
    assert!(pages >= 6 + 8, "{pages} list requests: {scan}");
    drop(fixity);
}

/// Past the result bound a report lists failures first and counts the rest in one result.
#[test]
#[ignore = "needs a cluster: tests/scan/run.sh"]
fn results_past_the_bound_are_counted_not_dropped() {
    let ns = Namespace::of("bound");
    for i in 0..15 {
        ns.pod(&format!("tagged-{i:02}"), "nginx:1.27");
        ns.pod(&format!("pinned-{i:02}"), PINNED);
    }
    let fixity = Scanner::start("bound", &["--report-max-results", "10"]);
    ns.policy("mode: Enforce");
    let report = ns.report_until("a bounded report", |r| r["summary"]["fail"] == 15);
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), 10, "{report:#}");
    assert!(
        results[..9].iter().all(|r| r["result"] == "fail"),
        "failures first"
    );
    let note = &results[9];
    assert_eq!(note["rule"], "report-limit");
    assert_eq!(note["result"], "fail");
    assert_eq!(note["properties"]["hidden"], "21");
    assert_eq!(note["properties"]["hiddenFail"], "6");
    assert_eq!(note["properties"]["hiddenPass"], "15");
    assert_eq!(
        report["summary"]["pass"], 15,
        "the summary counts every result"
    );
    assert_eq!(report["configuration"]["limits"]["maxResults"], 10);
    let table = fixity_report(&["-n", &ns.name]);
    assert_eq!(table.code, Some(1));
    assert!(
        table
            .stdout
            .contains("21 more results of this policy are not listed"),
        "{}",
        table.stdout
    );
    drop(fixity);
}

/// An exec by a break-glass user taints the pod; with replaceTainted it is evicted after the
/// grace period, unless a PodDisruptionBudget forbids it, which the report then says; a bare
/// pod is reported, not evicted.
#[test]
#[ignore = "needs a cluster: tests/scan/run.sh"]
fn break_glass_exec_taints_and_replace_tainted_evicts_within_budgets() {
    let ns = Namespace::of("taint");
    let fixity = Scanner::start("taint", &["--scan-interval-secs", "3"]);
    let _webhook = fixity.register(&ns);
    ns.policy(
        "exemptions:\n- groups: [\"fixity:break-glass\"]\nruntime:\n  replaceTainted: {after: 2s}",
    );
    ns.deployment("web", PINNED, 1);
    ns.pod("loner", PINNED);
    let web = ns.pods_of("web", 1).remove(0);
    let web_uid = ns
        .kubectl(&["get", "pod", &web, "-o", "jsonpath={.metadata.uid}"])
        .stdout;
    let pinned_digest = PINNED.split_once('@').unwrap().1;
    let image_id = format!("docker.io/library/nginx@{pinned_digest}");
    ns.run_pod(&web, PINNED, &image_id);
    ns.run_pod("loner", PINNED, &image_id);
    apply(&format!(
        "apiVersion: policy/v1\nkind: PodDisruptionBudget\nmetadata: {{name: web, namespace: {}}}\nspec:\n  minAvailable: 1\n  selector: {{matchLabels: {{app: web}}}}\n",
        ns.name
    ));
    poll(Duration::from_secs(60), || {
        let pdb = json(&["get", "pdb", "web", "-n", &ns.name])?;
        (pdb["status"]["currentHealthy"] == 1 && pdb["status"]["disruptionsAllowed"] == 0)
            .then_some(())
    })
    .expect("the disruption controller counts the running pod");
    ns.let_exec(&["oncall", "dev"]);

    let dev = ns.kubectl(&[
        "exec",
        &web,
        "--as=dev",
        "--as-group=developers",
        "--",
        "ls",
    ]);
    assert!(dev.stderr.contains("ExecDenied"), "{}", dev.all());
    let oncall = ns.kubectl(&[
        "exec",
        &web,
        "--as=oncall",
        "--as-group=fixity:break-glass",
        "--",
        "ls",
    ]);
    assert!(
        !oncall.all().contains("denied the request")
            && oncall.all().contains("does not have a host assigned"),
        "break-glass passes admission: {}",
        oncall.all()
    );
    ns.kubectl(&[
        "exec",
        "loner",
        "--as=oncall",
        "--as-group=fixity:break-glass",
        "--",
        "ls",
    ]);

    let taint = poll(Duration::from_secs(20), || {
        let pod = json(&["get", "pod", &web, "-n", &ns.name])?;
        let text = pod["metadata"]["annotations"]["fixity.dev/tainted"]
            .as_str()?
            .to_owned();
        assert_eq!(pod["metadata"]["labels"]["fixity.dev/tainted"], "true");
        serde_json::from_str::<Value>(&text).ok()
    })
    .expect("the entered pod is marked");
    assert_eq!(taint["by"], "oncall", "{taint}");
    assert_eq!(taint["action"], "exec", "{taint}");
    assert_eq!(taint["policies"][&ns.name], "exempted", "{taint}");
    assert!(taint["at"].as_str().unwrap().ends_with('Z'), "{taint}");
    let event = |reason: &str, pod: &str| {
        poll(Duration::from_secs(30), || {
            let run = ns.kubectl(&[
                "get",
                "events.events.k8s.io",
                "--field-selector",
                &format!("reason={reason},regarding.name={pod}"),
                "-o",
                "jsonpath={.items[0].note}",
            ]);
            (!run.stdout.is_empty()).then_some(run.stdout)
        })
        .unwrap_or_else(|| panic!("a {reason} event on {pod}"))
    };
    let note = event("Tainted", &web);
    assert!(
        note.contains("exec by oncall") && note.contains("exempted"),
        "{note}"
    );
    let dev_taints = ns
        .kubectl(&["get", "pods", "-l", "fixity.dev/tainted=true", "-o", "name"])
        .stdout;
    assert_eq!(
        dev_taints.lines().count(),
        2,
        "the denied exec marks nothing: {dev_taints}"
    );

    // The budget forbids the eviction: held back, and the report says so.
    let report = ns.report_until("the eviction held back", |r| {
        rows(r).contains(&row("Deployment/web", "tainted", "fail", "Tainted"))
            && result(r, "Deployment/web", "tainted")["properties"]["eviction"] == "HeldBack"
    });
    let tainted = result(&report, "Deployment/web", "tainted");
    let message = tainted["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("pod {web} was entered: exec by oncall"))
            && message.contains("eviction held back since"),
        "{message}"
    );
    assert!(
        message.contains("disruption budget"),
        "the API server's reason: {message}"
    );
    event("EvictionHeldBack", &web);
    let loner = ns.report_until("the bare pod reported", |r| {
        rows(r).contains(&row("Pod/loner", "tainted", "fail", "Tainted"))
            && result(r, "Pod/loner", "tainted")["properties"]["eviction"] == "Reported"
    });
    assert!(
        result(&loner, "Pod/loner", "tainted")["message"]
            .as_str()
            .unwrap()
            .contains("a bare pod: reported, not evicted"),
        "{loner:#}"
    );
    assert!(
        ns.kubectl(&["get", "pod", &web]).ok,
        "held back: still there"
    );
    assert!(
        fixity
            .metrics()
            .contains("fixity_evictions_total{outcome=\"held_back\"}")
    );

    // Without the budget the eviction goes through; the controller makes a clean pod.
    ok(ns.kubectl(&["delete", "pdb", "web"]));
    let replacement = poll(Duration::from_secs(60), || {
        let pods = json(&["get", "pods", "-n", &ns.name, "-l", "app=web"])?;
        let items = pods["items"].as_array()?;
        let fresh: Vec<&Value> = items
            .iter()
            .filter(|p| p["metadata"]["uid"] != web_uid.as_str())
            .collect();
        let old_gone = items
            .iter()
            .all(|p| p["metadata"]["uid"] != web_uid.as_str());
        (old_gone && fresh.len() == 1).then(|| fresh[0].clone())
    })
    .expect("the tainted pod is evicted and replaced");
    assert!(
        replacement["metadata"]["annotations"]["fixity.dev/tainted"].is_null(),
        "the replacement is clean"
    );
    event("Replaced", &web);
    assert!(
        fixity
            .metrics()
            .contains("fixity_evictions_total{outcome=\"evicted\"} 1"),
        "{}",
        fixity.metrics()
    );
    ns.report_until("the replaced pod's taint gone", |r| {
        !rows(r)
            .iter()
            .any(|(w, rule, ..)| w == "Deployment/web" && rule == "tainted")
    });
    assert!(
        ns.kubectl(&["get", "pod", "loner"]).ok,
        "the bare pod is not evicted"
    );
}

/// A registry that accepts connections and never answers, counting them.
fn stalling_registry() -> (String, Arc<AtomicUsize>, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let host = listener.local_addr().unwrap().to_string();
    let peak = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (p, s) = (peak.clone(), stop.clone());
    std::thread::spawn(move || {
        let mut held: Vec<TcpStream> = Vec::new();
        listener.set_nonblocking(true).unwrap();
        while !s.load(Ordering::Relaxed) {
            if let Ok((conn, _)) = listener.accept() {
                held.push(conn);
            }
            // A connection the client gave up on reads as closed.
            held.retain(|c| {
                let mut b = [0u8; 1];
                c.set_nonblocking(true).ok();
                !matches!((&*c).read(&mut b), Ok(0))
            });
            p.fetch_max(held.len(), Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    (host, peak, stop)
}

/// When each digest was first asked about.
type FirstAsked = Arc<Mutex<Vec<(String, Instant)>>>;

/// A registry that answers every request with 404 at once, noting when each digest was first
/// asked about.
fn empty_registry() -> (String, FirstAsked) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let host = listener.local_addr().unwrap().to_string();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let s = s.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 8192];
                let n = conn.read(&mut buf).unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]).to_string();
                if let Some(hex) = head
                    .split("sha256")
                    .nth(1)
                    .map(|t| t.trim_start_matches([':', '-']))
                {
                    let digest: String = hex.chars().take(64).collect();
                    let mut s = s.lock().unwrap();
                    if !s.iter().any(|(d, _)| *d == digest) {
                        s.push((digest, Instant::now()));
                    }
                }
                let _ = conn.write_all(
                    b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                );
            });
        }
    });
    (host, seen)
}

fn digest(i: usize) -> String {
    format!("sha256:{:064x}", i + 1)
}

/// A namespace of six pods, each of its own unsigned digest on `registry`, under a policy that
/// requires signatures there, scanned by a fixity started with `flags`.
fn unsigned_pods_on(test: &str, registry: &str, flags: &[&str]) -> (Namespace, Scanner) {
    let ns = Namespace::of(test);
    for i in 0..6 {
        ns.pod(&format!("p{i}"), &format!("{registry}/app@{}", digest(i)));
    }
    let mut args = flags.to_vec();
    args.extend(["--insecure-registry", registry]);
    let fixity = Scanner::start(test, &args);
    let lab = common::registry::Lab::start();
    ns.policy(&lab.key("any").required_on(registry));
    (ns, fixity)
}

/// A scan stuck on a registry that never answers holds no more connections than its bound,
/// and admission goes on answering meanwhile.
#[test]
#[ignore = "needs a cluster: tests/scan/run.sh"]
fn a_stuck_scan_holds_its_registry_bound_and_never_admission() {
    let (stall, peak, stop) = stalling_registry();
    let (ns, fixity) = unsigned_pods_on(
        "stuck",
        &stall,
        &[
            "--scan-registry-concurrency",
            "2",
            "--scan-registry-rate",
            "100",
            "--verify-timeout-ms",
            "30000",
        ],
    );
    poll(Duration::from_secs(30), || {
        (peak.load(Ordering::Relaxed) >= 2).then_some(())
    })
    .expect("the scan reaches the registry");
    let _webhook = fixity.register(&ns);
    let started = Instant::now();
    for i in 0..5 {
        let run = ns.kubectl(&[
            "run",
            &format!("admitted-{i}"),
            &format!("--image={PINNED}"),
        ]);
        assert!(
            run.ok,
            "admission answers while the scan is stuck: {}",
            run.all()
        );
    }
    let tagged = ns.kubectl(&["run", "tagged", "--image=nginx:1.27"]);
    assert!(tagged.stderr.contains("MutableTag"), "{}", tagged.all());
    assert!(
        fixity.metrics().contains("fixity_scan_running 1"),
        "the scan was still running"
    );
    assert_eq!(
        peak.load(Ordering::Relaxed),
        2,
        "at most --scan-registry-concurrency connections"
    );
    eprintln!(
        "6 admissions answered in {:?} during a stuck scan",
        started.elapsed()
    );
    stop.store(true, Ordering::Relaxed);
    drop(fixity);
}

/// Signature checks that reach a registry start no faster than the scan's rate.
#[test]
#[ignore = "needs a cluster: tests/scan/run.sh"]
fn scan_signature_checks_keep_to_the_rate() {
    let (registry, seen) = empty_registry();
    let (ns, fixity) = unsigned_pods_on(
        "rate",
        &registry,
        &[
            "--scan-registry-concurrency",
            "6",
            "--scan-registry-rate",
            "2",
        ],
    );
    let report = ns.report_until("six unsigned images", |r| r["summary"]["fail"] == 6);
    assert!(rows(&report).contains(&row("Pod/p0", "signatures", "fail", "UnsignedImage")));
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 6, "{seen:?}");
    let spread = seen.last().unwrap().1 - seen[0].1;
    assert!(
        spread >= Duration::from_millis(2300),
        "6 checks at 2/s start over at least 2.5 s, took {spread:?}"
    );
    drop(fixity);
}

/// A TCP proxy to the API server that the test can take away and bring back.
struct Proxy {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    fn start(port: u16, upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut pairs: Vec<(TcpStream, TcpStream)> = Vec::new();
            while !s.load(Ordering::Relaxed) {
                if let Ok((client, _)) = listener.accept()
                    && let Ok(server) = TcpStream::connect(upstream)
                {
                    for (a, b) in [(&client, &server), (&server, &client)] {
                        let (mut from, mut to) = (a.try_clone().unwrap(), b.try_clone().unwrap());
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut from, &mut to);
                            let _ = to.shutdown(std::net::Shutdown::Both);
                        });
                    }
                    pairs.push((client, server));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            for (a, b) in pairs {
                let _ = a.shutdown(std::net::Shutdown::Both);
                let _ = b.shutdown(std::net::Shutdown::Both);
            }
        });
        Self {
            port,
            stop,
            thread: Some(thread),
        }
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop();
    }
}

/// While the API server is unreachable scans fail and are retried; the reports stay; once it
/// is back the next scan sees what changed meanwhile.
#[test]
#[ignore = "needs a cluster: tests/scan/run.sh"]
fn the_scanner_survives_the_api_server_going_away() {
    let ns = Namespace::of("away");
    ns.pod("first", "nginx:1.27");
    let upstream: SocketAddr = env("FIXITY_APISERVER_URL")
        .trim_start_matches("https://")
        .parse()
        .unwrap();
    let mut proxy = Proxy::start(0, upstream);
    let port = proxy.port;
    let kubeconfig = std::fs::read_to_string(env("FIXITY_SCAN_KUBECONFIG"))
        .unwrap()
        .replace(
            &env("FIXITY_APISERVER_URL"),
            &format!("https://127.0.0.1:{port}"),
        );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    std::fs::write(&path, kubeconfig).unwrap();
    let fixity = Scanner::start_with(
        path.to_str().unwrap(),
        "away",
        &["--scan-interval-secs", "2"],
    );
    ns.policy("mode: Enforce");
    ns.report_until("the first pod", |r| {
        rows(r).contains(&row("Pod/first", "image-reference", "fail", "MutableTag"))
    });

    proxy.stop();
    // The Lease cannot be renewed: this replica stops acting as the scanner, since another
    // could take over (a scan under way fails and is retried).
    poll(Duration::from_secs(60), || {
        fixity.log().contains("scan lease lost").then_some(())
    })
    .expect("the scanner steps down while the API server is away");
    ns.pod("second", "nginx:1.27");
    assert!(
        ns.kubectl(&["get", "reports.openreports.io", "fixity"]).ok,
        "the report stays"
    );
    assert_eq!(
        common::http_get(fixity.health(), "/readyz").map(|(c, _)| c),
        Some(200),
        "the last known policies keep serving"
    );

    let scans_before = fixity.scans().len();
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(fixity.scans().len(), scans_before, "no scan while away");

    let _proxy = Proxy::start(port, upstream);
    ns.report_until("the pod made while fixity could not see", |r| {
        rows(r).contains(&row("Pod/second", "image-reference", "fail", "MutableTag"))
    });
    assert_eq!(
        fixity.log().matches("scan lease acquired").count(),
        2,
        "taken again"
    );
    drop(fixity);
}

/// Two replicas: one holds the Lease and scans; when it stops, the other takes over.
#[test]
#[ignore = "needs a cluster: tests/scan/run.sh"]
fn one_replica_at_a_time_scans() {
    let ns = Namespace::of("lease");
    ns.pod("web", "nginx:1.27");
    ns.policy("mode: Audit");
    let mut a = Scanner::start("replica-a", &["--scan-interval-secs", "2"]);
    let mut b = Scanner::start("replica-b", &["--scan-interval-secs", "2"]);
    let holder = || {
        kubectl(&[
            "get",
            "lease",
            LEASE,
            "-n",
            "fixity",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ])
        .stdout
    };
    poll(Duration::from_secs(30), || {
        (a.scans().len() + b.scans().len() >= 3).then_some(())
    })
    .expect("scans run");
    let (leader, follower) = match holder().as_str() {
        "replica-a" => (&mut a, &mut b),
        "replica-b" => (&mut b, &mut a),
        other => panic!("the Lease is held by {other:?}"),
    };
    assert!(
        leader.scans().len() >= 3 && follower.scans().is_empty(),
        "only the holder scans ({} vs {})",
        leader.scans().len(),
        follower.scans().len()
    );
    leader.stop();
    follower.scan_after(0, |_| true);
    assert_eq!(holder(), follower.identity, "the Lease passed on");
    assert!(follower.log().contains("scan lease acquired"));
}

/// The older PolicyReport API, for Policy Reporter and tools that predate OpenReports.
#[test]
#[ignore = "needs a cluster: tests/scan/run.sh"]
fn policy_reports_for_older_tools() {
    let ns = Namespace::of("polr");
    ns.pod("web", "nginx:1.27");
    let fixity = Scanner::start_with(
        &env("FIXITY_SCAN_PR_KUBECONFIG"),
        "polr",
        &[
            "--reports",
            "policyreport",
            "--scan-lease",
            "fixity-pr-scan",
        ],
    );
    ns.policy("mode: Enforce");
    let report = poll(Duration::from_secs(60), || {
        let r = json(&[
            "get",
            "policyreports.wgpolicyk8s.io",
            "fixity",
            "-n",
            &ns.name,
        ])?;
        (r["summary"]["fail"] == 1).then_some(r)
    })
    .expect("a PolicyReport");
    assert_eq!(report["apiVersion"], "wgpolicyk8s.io/v1alpha2");
    assert!(rows(&report).contains(&row("Pod/web", "image-reference", "fail", "MutableTag")));
    assert!(
        report.get("source").is_none(),
        "v1alpha2 has no top-level source"
    );
    assert_eq!(report["results"][0]["source"], "fixity");
    let run = fixity_report(&["--reports", "policyreport", "-n", &ns.name]);
    assert_eq!(run.code, Some(1), "{}", run.all());
    assert!(run.stdout.contains("Pod/web"), "{}", run.stdout);
    assert!(json(&["get", "clusterpolicyreports.wgpolicyk8s.io", "fixity"]).is_some());
    drop(fixity);
}
