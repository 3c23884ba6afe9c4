//! End-to-end tests: a real kube-apiserver calls fixity over TLS and the real kubectl shows
//! the outcome. Run them with `tests/e2e/run.sh`, which starts the cluster (with a node, so
//! that pods of a real image run and an allowed exec really executes) and fixity; they are
//! ignored by a plain `cargo test`.
//!
//! Each test works in its own namespace, labelled so that only its own ImmutabilityPolicy
//! selects it, so the tests run in parallel against one cluster and one fixity.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::kube::{Cleanup, Run, apply, base64, env, expect_ok, kubectl, kubectl_in, poll};

const PINNED: &str =
    "nginx@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const OTHER_PINNED: &str =
    "nginx@sha256:fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";
const DENIED_BY_FIXITY: &str = "denied the request: fixity:";
/// A pod of this command runs on the node: it serves its /etc over HTTP on port 8080 and
/// exits at once on SIGTERM.
const SERVE_ETC: &str =
    "trap 'exit 0' TERM; httpd -p 8080 -h /etc; while :; do sleep 1 & wait; done";

#[track_caller]
fn expect_denied(run: &Run, reason: &str) {
    assert!(
        !run.ok,
        "expected a denial, kubectl succeeded:\n{}",
        run.all()
    );
    assert!(
        run.stderr.contains(DENIED_BY_FIXITY) && run.stderr.contains(reason),
        "expected fixity's {reason} denial, got:\n{}",
        run.all()
    );
}

/// The namespace of one test, selected only by its own policy.
type TestNamespace = common::kube::Namespace;

impl TestNamespace {
    fn of(test: &str) -> Self {
        Self::new("e2e", test)
    }

    /// Applies an ImmutabilityPolicy selecting this namespace and waits until fixity reports
    /// it in force (Ready=True is written after the policy is live).
    fn policy(&self, spec: &str) -> String {
        self.apply_policy(spec);
        self.wait_ready(&self.name);
        self.name.clone()
    }

    fn wait_ready(&self, policy: &str) -> Duration {
        let started = Instant::now();
        let generation = kubectl(&[
            "get",
            "immutabilitypolicy",
            policy,
            "-o",
            "jsonpath={.metadata.generation}",
        ])
        .stdout;
        poll(Duration::from_secs(30), || {
            let status = kubectl(&[
                "get", "immutabilitypolicy", policy, "-o",
                r#"jsonpath={.status.observedGeneration}/{.status.conditions[?(@.type=="Ready")].status}"#,
            ]);
            (status.stdout == format!("{generation}/True")).then_some(())
        })
        .unwrap_or_else(|| panic!("policy {policy} never became Ready"));
        started.elapsed()
    }

    fn pinned_pod(&self, name: &str) {
        expect_ok(self.kubectl(&["run", name, &format!("--image={PINNED}")]));
    }

    /// A pod that really runs: busybox from the node's registry (PINNED names no image, so
    /// its pods never start), serving /etc on port 8080. Returns once it is Ready.
    fn running_pod(&self, name: &str) {
        let image = format!("--image={}", env("FIXITY_E2E_RUNNABLE"));
        expect_ok(self.kubectl(&["run", name, &image, "--", "/bin/sh", "-c", SERVE_ETC]));
        expect_ok(self.kubectl(&[
            "wait",
            "--for=condition=Ready",
            &format!("pod/{name}"),
            "--timeout=60s",
        ]));
    }

    /// `kubectl port-forward` to port 8080 of a pod: the local address once it forwards, or
    /// the output of a kubectl that gave up. The forward stops when the guard is dropped.
    fn port_forward(&self, pod: &str) -> Result<(std::net::SocketAddr, Forward), String> {
        let mut child = Command::new("kubectl")
            .args(["-n", &self.name, "port-forward", "--address=127.0.0.1"])
            .args([format!("pod/{pod}"), ":8080".to_owned()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl on PATH");
        let mut line = String::new();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        stdout.read_line(&mut line).unwrap();
        // "Forwarding from 127.0.0.1:PORT -> 8080"
        let addr = line.split_whitespace().nth(2).and_then(|a| a.parse().ok());
        match addr {
            Some(addr) => Ok((
                addr,
                Forward {
                    child,
                    _stdout: stdout,
                },
            )),
            None => {
                let out = child.wait_with_output().unwrap();
                Err(format!("{line}{}", String::from_utf8_lossy(&out.stderr)))
            }
        }
    }
}

/// A running `kubectl port-forward`, killed on drop. Its stdout stays open: kubectl writes a
/// line there for each connection, and dies of a closed pipe.
struct Forward {
    child: std::process::Child,
    _stdout: BufReader<std::process::ChildStdout>,
}

impl Drop for Forward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn fixity_log() -> String {
    std::fs::read_to_string(env("FIXITY_E2E_LOG")).unwrap_or_default()
}

fn metrics() -> String {
    let out = Command::new("curl")
        .args([
            "-fs",
            &format!("http://{}/metrics", env("FIXITY_E2E_HEALTH")),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
#[ignore = "needs a cluster: tests/e2e/run.sh"]
fn tagged_pod_denied_pinned_pod_created() {
    let ns = TestNamespace::of("run");
    ns.policy("mode: Enforce");
    let run = ns.kubectl(&["run", "web", "--image=nginx:1.27"]);
    expect_denied(&run, "MutableTag");
    assert!(
        run.stderr.contains(r#"container \"web\""#) || run.stderr.contains("container \"web\""),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("nginx:1.27"));
    let run = expect_ok(ns.kubectl(&["run", "pinned", &format!("--image={PINNED}")]));
    assert!(run.stdout.contains("pod/pinned created"), "{}", run.stdout);
}

#[test]
#[ignore = "needs a cluster: tests/e2e/run.sh"]
fn tagged_deployment_and_cronjob_denied_at_apply() {
    let ns = TestNamespace::of("workloads");
    ns.policy("mode: Enforce");
    let deployment = format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web, namespace: {0}}}\nspec:\n  selector: {{matchLabels: {{app: web}}}}\n  template:\n    metadata: {{labels: {{app: web}}}}\n    spec:\n      containers: [{{name: web, image: 'nginx:1.27'}}]\n",
        ns.name
    );
    expect_denied(&apply(&deployment), "MutableTag");
    let cronjob = format!(
        "apiVersion: batch/v1\nkind: CronJob\nmetadata: {{name: nightly, namespace: {0}}}\nspec:\n  schedule: '@daily'\n  jobTemplate:\n    spec:\n      template:\n        spec:\n          restartPolicy: Never\n          containers: [{{name: job, image: busybox}}]\n",
        ns.name
    );
    let run = apply(&cronjob);
    expect_denied(&run, "MutableTag");
    assert!(run.stderr.contains("busybox"), "{}", run.stderr);
}

/// With exec allowed the command runs in the pod; with exec denied, fixity's message comes
/// first and nothing runs. The same for port-forward, the other way round.
#[test]
#[ignore = "needs a cluster: tests/e2e/run.sh"]
fn exec_and_attach_denied_by_fixity() {
    let ns = TestNamespace::of("exec");
    ns.policy("mode: Enforce");
    ns.running_pod("web");
    expect_denied(&ns.kubectl(&["exec", "web", "--", "ls"]), "ExecDenied");
    expect_denied(&ns.kubectl(&["attach", "web"]), "AttachDenied");
    let event = poll(Duration::from_secs(10), || {
        let run = ns.kubectl(&[
            "get",
            "events",
            "--field-selector",
            "reason=ExecDenied,involvedObject.name=web",
            "-o",
            "jsonpath={.items[0].message}",
        ]);
        (!run.stdout.is_empty()).then_some(run.stdout)
    })
    .expect("an ExecDenied event on the pod");
    assert!(event.contains("CONNECT by user fixity-admin"), "{event}");
    // kubectl cp is exec underneath.
    let run = ns.kubectl(&["cp", "/etc/hostname", "web:/tmp/x"]);
    assert!(
        run.all().contains(DENIED_BY_FIXITY) && run.all().contains("ExecDenied"),
        "{}",
        run.all()
    );

    let open = TestNamespace::of("exec-open");
    open.policy("runtime: {exec: Allow, attach: Allow, portForward: Deny}");
    open.running_pod("web");
    let run = expect_ok(open.kubectl(&["exec", "web", "--", "cat", "/etc/hostname"]));
    assert_eq!(run.stdout.trim(), "web", "the command ran in the pod");

    // Port-forward is allowed by default, and traffic really flows; denied where the policy
    // says so.
    let (addr, _forward) = ns
        .port_forward("web")
        .unwrap_or_else(|out| panic!("port-forward failed: {out}"));
    let (code, body) = common::http_get(addr, "/hostname").expect("an answer through the forward");
    assert_eq!((code, body.trim()), (200, "web"));
    let out = open.port_forward("web").err().expect("port-forward denied");
    assert!(
        out.contains(DENIED_BY_FIXITY) && out.contains("PortForwardDenied"),
        "{out}"
    );
}

#[test]
#[ignore = "needs a cluster: tests/e2e/run.sh"]
fn debug_and_set_image_denied_relabel_allowed() {
    let ns = TestNamespace::of("inplace");
    ns.policy("mode: Enforce");
    ns.pinned_pod("web");
    let run = ns.kubectl(&[
        "debug",
        "web",
        &format!("--image={PINNED}"),
        "-c",
        "debugger",
        "--attach=false",
    ]);
    expect_denied(&run, "EphemeralContainerDenied");
    let image = format!("web={OTHER_PINNED}");
    let set_image = ["set", "image", "pod/web", image.as_str()];
    expect_denied(
        &ns.kubectl(&[&set_image[..], &["--dry-run=server"]].concat()),
        "ImageUpdateDenied",
    );
    expect_denied(&ns.kubectl(&set_image), "ImageUpdateDenied");
    // One event on the pod, for the real attempt only: dry runs have no side effects.
    let events = poll(Duration::from_secs(10), || {
        let run = ns.kubectl(&[
            "get", "events", "--field-selector", "reason=ImageUpdateDenied",
            "-o", "jsonpath={range .items[*]}{.involvedObject.kind}/{.involvedObject.name}/{.involvedObject.uid} {end}",
        ]);
        (!run.stdout.is_empty()).then_some(run.stdout)
    })
    .expect("an ImageUpdateDenied event");
    let uid = ns
        .kubectl(&["get", "pod", "web", "-o", "jsonpath={.metadata.uid}"])
        .stdout;
    assert_eq!(
        events.trim(),
        format!("Pod/web/{uid}"),
        "one event, on the pod itself"
    );
    expect_ok(ns.kubectl(&["label", "pod", "web", "tier=frontend"]));
    expect_ok(ns.kubectl(&["annotate", "pod", "web", "note=relabelled"]));
}

#[test]
#[ignore = "needs a cluster: tests/e2e/run.sh"]
fn audit_mode_admits_warns_logs_and_counts() {
    let ns = TestNamespace::of("audit");
    let policy = ns.policy("mode: Audit");
    let run = expect_ok(ns.kubectl(&["run", "tagged", "--image=nginx:1.27"]));
    assert!(run.stdout.contains("pod/tagged created"));
    assert!(
        run.stderr.contains(&format!(
            "Warning: fixity: policy \"{policy}\" would deny (audit): MutableTag"
        )),
        "{}",
        run.stderr
    );
    let line = poll(Duration::from_secs(5), || {
        fixity_log()
            .lines()
            .find(|l| l.contains(&ns.name) && l.contains("\"name\":\"tagged\""))
            .map(str::to_owned)
    })
    .expect("an audit line for the pod");
    let record: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(record["decision"], "would_deny");
    assert_eq!(record["reason"], "MutableTag");
    assert_eq!(record["mode"], "Audit");
    assert_eq!(record["image"], "nginx:1.27");
    assert_eq!(record["operation"], "CREATE");
    assert_eq!(record["kind"], "Pod");
    assert_eq!(record["user"], "fixity-admin");
    assert!(record["uid"].as_str().is_some_and(|u| !u.is_empty()));
    let counter = format!(
        r#"fixity_violations_total{{policy="{policy}",reason="MutableTag",mode="Audit",decision="would_deny"}} 1"#
    );
    assert!(metrics().contains(&counter), "{counter} not in metrics");
}

#[test]
#[ignore = "needs a cluster: tests/e2e/run.sh"]
fn a_policy_change_takes_effect_without_restart() {
    let ns = TestNamespace::of("change");
    let policy = ns.policy("mode: Audit");
    expect_ok(ns.kubectl(&["run", "before", "--image=nginx:1.27", "--dry-run=server"]));
    let started = Instant::now();
    expect_ok(kubectl(&[
        "patch",
        "immutabilitypolicy",
        &policy,
        "--type=merge",
        "-p",
        r#"{"spec":{"mode":"Enforce"}}"#,
    ]));
    let took = poll(Duration::from_secs(30), || {
        let run = ns.kubectl(&["run", "after", "--image=nginx:1.27", "--dry-run=server"]);
        run.stderr
            .contains(DENIED_BY_FIXITY)
            .then(|| started.elapsed())
    })
    .expect("the Enforce policy denies");
    eprintln!("policy change in force after {} ms", took.as_millis());
}

#[test]
#[ignore = "needs a cluster: tests/e2e/run.sh"]
fn invalid_policies_are_refused_and_never_half_applied() {
    let ns = TestNamespace::of("invalid");
    let name = format!("{}-bad", ns.name);
    let bad_glob = format!(
        "apiVersion: fixity.dev/v1alpha1\nkind: ImmutabilityPolicy\nmetadata: {{name: {name}}}\nspec:\n  mode: Enforce\n  images: {{allowedRegistries: [nginx]}}\n"
    );
    let run = apply(&bad_glob);
    assert!(!run.ok);
    assert!(
        run.stderr.contains("invalid ImmutabilityPolicy")
            && run.stderr.contains("allowedRegistries[0]"),
        "{}",
        run.stderr
    );
    let bad_mode = format!(
        "apiVersion: fixity.dev/v1alpha1\nkind: ImmutabilityPolicy\nmetadata: {{name: {name}}}\nspec: {{mode: Sometimes}}\n"
    );
    let run = apply(&bad_mode);
    assert!(
        !run.ok && run.stderr.contains("Unsupported value: \"Sometimes\""),
        "{}",
        run.stderr
    );
    let bad_selector = format!(
        "apiVersion: fixity.dev/v1alpha1\nkind: ImmutabilityPolicy\nmetadata: {{name: {name}}}\nspec:\n  match: {{namespaceSelector: {{matchExpressions: [{{key: a, operator: Near}}]}}}}\n"
    );
    let run = apply(&bad_selector);
    assert!(
        !run.ok && run.stderr.contains("unknown operator"),
        "{}",
        run.stderr
    );
    assert!(
        !kubectl(&["get", "immutabilitypolicy", &name]).ok,
        "nothing was stored"
    );
}

#[test]
#[ignore = "needs a cluster: tests/e2e/run.sh"]
fn break_glass_exemption_through_impersonation() {
    let ns = TestNamespace::of("breakglass");
    ns.policy("exemptions:\n- groups: [\"fixity:break-glass\"]");
    ns.running_pod("web");
    // Both users may exec as far as RBAC goes; only fixity tells them apart.
    ns.let_exec(&["oncall", "dev"]);

    let run = ns.kubectl(&[
        "exec",
        "web",
        "--as=dev",
        "--as-group=developers",
        "--",
        "ls",
    ]);
    expect_denied(&run, "ExecDenied");
    let run = expect_ok(ns.kubectl(&[
        "exec",
        "web",
        "--as=oncall",
        "--as-group=fixity:break-glass",
        "--",
        "cat",
        "/etc/hostname",
    ]));
    assert_eq!(
        run.stdout.trim(),
        "web",
        "the break-glass exec ran in the pod"
    );
    let line = poll(Duration::from_secs(5), || {
        fixity_log()
            .lines()
            .find(|l| l.contains(&ns.name) && l.contains("\"decision\":\"exempted\""))
            .map(str::to_owned)
    })
    .expect("the exempted exec is logged");
    assert!(
        line.contains("\"user\":\"oncall\"") && line.contains("fixity:break-glass"),
        "{line}"
    );
}

#[test]
#[ignore = "needs a cluster: tests/e2e/run.sh"]
fn server_dry_run_gets_the_same_decision() {
    let ns = TestNamespace::of("dryrun");
    ns.policy("mode: Enforce");
    let deployment = format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web, namespace: {0}}}\nspec:\n  selector: {{matchLabels: {{app: web}}}}\n  template:\n    metadata: {{labels: {{app: web}}}}\n    spec:\n      containers: [{{name: web, image: 'nginx:1.27'}}]\n",
        ns.name
    );
    let real = apply(&deployment);
    let dry = kubectl_in(&["apply", "--dry-run=server", "-f", "-"], Some(&deployment));
    expect_denied(&dry, "MutableTag");
    let strip = |s: &str| {
        s.lines()
            .filter(|l| l.contains(DENIED_BY_FIXITY))
            .map(|l| l.to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(&real.stderr), strip(&dry.stderr));
    let line = poll(Duration::from_secs(5), || {
        fixity_log()
            .lines()
            .find(|l| l.contains(&ns.name) && l.contains("\"dryRun\":true"))
            .map(str::to_owned)
    });
    assert!(line.is_some(), "the dry run is recorded as such");
}

#[test]
#[ignore = "needs a cluster: tests/e2e/run.sh"]
fn fails_closed_when_the_webhook_is_unreachable() {
    let ns = TestNamespace::of("closed");
    // A webhook like fixity's whose server is gone: nothing listens on the port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let ca = std::path::Path::new(&env("FIXITY_E2E_LOG"))
        .with_file_name("certs")
        .join("ca.crt");
    let ca_bundle = base64(&ca);
    let config = format!(
        "apiVersion: admissionregistration.k8s.io/v1\nkind: ValidatingWebhookConfiguration\nmetadata: {{name: {name}}}\nwebhooks:\n- name: stopped.fixity.dev\n  admissionReviewVersions: [v1]\n  sideEffects: NoneOnDryRun\n  failurePolicy: Fail\n  timeoutSeconds: 3\n  clientConfig: {{url: 'https://127.0.0.1:{port}/validate', caBundle: {ca_bundle}}}\n  namespaceSelector: {{matchLabels: {{fixity-e2e: {name}}}}}\n  rules:\n  - {{apiGroups: [''], apiVersions: [v1], operations: [CREATE], resources: [pods], scope: Namespaced}}\n",
        name = ns.name
    );
    expect_ok(apply(&config));
    let run = poll(Duration::from_secs(10), || {
        let run = ns.kubectl(&["run", "web", &format!("--image={PINNED}")]);
        (!run.ok).then_some(run)
    })
    .expect("pod creation fails while the webhook is down");
    assert!(
        run.stderr
            .contains("failed calling webhook \"stopped.fixity.dev\""),
        "{}",
        run.stderr
    );
    kubectl(&["delete", "validatingwebhookconfiguration", &ns.name]);
}

/// fixity issues its own CA and serving certificate into a Secret, writes the CA into the
/// webhook configuration, and renews the certificate while the API server keeps calling it.
#[test]
#[ignore = "needs a cluster: tests/e2e/run.sh"]
fn self_managed_certificates_rotate_without_a_failed_request() {
    let ns = TestNamespace::of("certs");
    let addr = common::free_addr();
    let config = format!(
        "apiVersion: admissionregistration.k8s.io/v1\nkind: ValidatingWebhookConfiguration\nmetadata: {{name: {name}}}\nwebhooks:\n- name: certs.fixity.dev\n  admissionReviewVersions: [v1]\n  sideEffects: NoneOnDryRun\n  failurePolicy: Fail\n  timeoutSeconds: 5\n  clientConfig: {{url: 'https://localhost:{port}/validate'}}\n  namespaceSelector: {{matchLabels: {{fixity-e2e: {name}}}}}\n  rules:\n  - {{apiGroups: [''], apiVersions: [v1], operations: [CREATE], resources: [pods], scope: Namespaced}}\n",
        name = ns.name,
        port = addr.port()
    );
    expect_ok(apply(&config));
    let _cleanup = Cleanup(vec![
        "delete".into(),
        "validatingwebhookconfiguration".into(),
        ns.name.clone(),
    ]);

    // Two more replicas of fixity, with the built-in policy, managing their certificate like
    // the chart does, started together so that both race to create it. The API server calls
    // replica a; replica b serves and renews from the same Secret.
    let replica = |addr: std::net::SocketAddr, identity: &str| {
        let args = [
            "--manage-certs",
            "--namespace",
            &ns.name,
            "--cert-secret",
            "fixity-tls",
            "--webhook-config",
            &ns.name,
            "--cert-lease",
            "fixity-certs",
            "--service-name",
            "fixity",
            "--cert-name",
            "localhost",
            "--cert-validity-secs",
            "12",
            "--identity",
            identity,
        ];
        common::Fixity::serve_at(addr, &args)
    };
    let (fixity, other) = std::thread::scope(|s| {
        let a = s.spawn(|| replica(addr, "replica-a"));
        let b = s.spawn(|| replica(common::free_addr(), "replica-b"));
        (a.join().unwrap(), b.join().unwrap())
    });
    let bundle = ns.kubectl(&[
        "get",
        "validatingwebhookconfiguration",
        &ns.name,
        "-o",
        "jsonpath={.webhooks[0].clientConfig.caBundle}",
    ]);
    assert!(!bundle.stdout.is_empty(), "the caBundle is patched");
    let secret_cert = || {
        ns.kubectl(&[
            "get",
            "secret",
            "fixity-tls",
            "-o",
            r"jsonpath={.data.tls\.crt}",
        ])
        .stdout
    };
    let first = secret_cert();
    assert!(
        !first.is_empty(),
        "the Secret holds the serving certificate"
    );
    let lease = ns.kubectl(&[
        "get",
        "lease",
        "fixity-certs",
        "-o",
        "jsonpath={.spec.leaseTransitions}",
    ]);
    assert!(lease.ok, "the Lease exists: {}", lease.all());

    let mut seen = std::collections::HashSet::from([first]);
    let (mut admitted, mut failures) = (0, Vec::new());
    let until = Instant::now() + Duration::from_secs(20);
    let mut i = 0;
    while Instant::now() < until {
        i += 1;
        let run = ns.kubectl(&[
            "run",
            &format!("p{i}"),
            &format!("--image={PINNED}"),
            "--dry-run=server",
        ]);
        if run.ok {
            admitted += 1
        } else {
            failures.push(run.all())
        }
        seen.insert(secret_cert());
    }
    expect_denied(
        &ns.kubectl(&["run", "tagged", "--image=nginx:1.27"]),
        "MutableTag",
    );
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {failures:?}",
        failures.len(),
        admitted + failures.len()
    );
    // 12 s certificates are renewed after 8 s: two or three renewals in 20 s, not one per
    // check (the bug a backdated not-before once caused).
    assert!(
        (2..=4).contains(&seen.len()),
        "{} certificates in 20 s ({admitted} requests)",
        seen.len()
    );
    let reloads = metrics_of(fixity.health);
    // One writer at a time: each certificate the Secret held was issued exactly once. The
    // replicas are paused first so that no renewal slips in between the two counts.
    for pid in [fixity.pid(), other.pid()] {
        assert!(
            Command::new("kill")
                .args(["-STOP", &pid.to_string()])
                .status()
                .unwrap()
                .success()
        );
    }
    seen.insert(secret_cert());
    let issued = fixity.log().matches("serving certificate issued").count()
        + other.log().matches("serving certificate issued").count();
    assert_eq!(
        issued,
        seen.len(),
        "certificates issued by both replicas vs seen in the Secret"
    );
    assert!(
        reloads.contains(r#"fixity_certificate_reloads_total{result="success"}"#),
        "{reloads}"
    );
    eprintln!(
        "{admitted} requests admitted across {} serving certificates",
        seen.len()
    );
}

fn metrics_of(health: std::net::SocketAddr) -> String {
    common::http_get(health, "/metrics")
        .map(|(_, body)| body)
        .unwrap_or_default()
}

/// A Deployment of an image signed by the policy's key is created; one of an unsigned image
/// is denied at `kubectl apply`.
#[test]
#[ignore = "needs a cluster: tests/e2e/run.sh"]
fn signed_deployment_created_unsigned_denied() {
    let lab = common::registry::Lab::existing(&env("FIXITY_E2E_REGISTRY"));
    let key = lab.key("release");
    let signed = lab.reference(
        "e2e/app",
        &lab.push_image("e2e/app", "signed", "signed content"),
    );
    let unsigned = lab.reference(
        "e2e/app",
        &lab.push_image("e2e/app", "unsigned", "unsigned content"),
    );
    lab.sign(&key, &signed, true, &[]);

    let ns = TestNamespace::of("signed");
    ns.policy(&key.required_on(&lab.host));
    let deployment = |name: &str, image: &str| {
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  selector: {{matchLabels: {{app: {name}}}}}\n  template:\n    metadata: {{labels: {{app: {name}}}}}\n    spec:\n      containers: [{{name: app, image: '{image}'}}]\n",
            ns = ns.name
        )
    };
    let run = expect_ok(apply(&deployment("signed", &signed)));
    assert!(
        run.stdout.contains("deployment.apps/signed created"),
        "{}",
        run.stdout
    );
    let run = apply(&deployment("unsigned", &unsigned));
    expect_denied(&run, "UnsignedImage");
    assert!(run.stderr.contains("no signatures found"), "{}", run.stderr);
}

/// Provenance from our builder and a fresh scan: the Deployment is created; the same image
/// without the scan is denied with the message kubectl prints. An invalid condition is refused
/// by `kubectl apply` and nothing is stored.
#[test]
#[ignore = "needs a cluster: tests/e2e/run.sh"]
fn attested_deployment_created_unscanned_denied_invalid_condition_refused() {
    let lab = common::registry::Lab::existing(&env("FIXITY_E2E_REGISTRY"));
    let key = lab.key("ci");
    let builder = "https://github.com/acme/app/.github/workflows/release.yml@refs/heads/main";
    let provenance = format!(
        r#"{{"buildDefinition":{{"buildType":"https://fixity.test/build"}},"runDetails":{{"builder":{{"id":"{builder}"}}}}}}"#
    );
    let finished = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let scan = format!(
        r#"{{"scanner":{{"uri":"pkg:github/aquasecurity/trivy","version":"0.58.0","result":{{"Results":[]}}}},"metadata":{{"scanStartedOn":"{finished}","scanFinishedOn":"{finished}"}}}}"#
    );
    let scanned = lab.reference(
        "e2e/attested",
        &lab.push_image("e2e/attested", "scanned", "scanned"),
    );
    let unscanned = lab.reference(
        "e2e/attested",
        &lab.push_image("e2e/attested", "unscanned", "unscanned"),
    );
    for image in [&scanned, &unscanned] {
        lab.attest(&key, image, "slsaprovenance1", &provenance, false);
    }
    lab.attest(&key, &scanned, "vuln", &scan, false);

    let ns = TestNamespace::of("attested");
    let pem: String = key
        .public_pem
        .lines()
        .map(|l| format!("            {l}\n"))
        .collect();
    let spec = |scan_condition: &str| {
        format!(
            "images:\n  verify:\n  - images: ['{}/**']\n    attestations:\n    - name: provenance\n      predicateType: slsaprovenance1\n      authorities:\n      - key:\n          publicKey: |\n{pem}      conditions:\n      - expression: predicate.runDetails.builder.id == '{builder}'\n        message: built by our release workflow\n    - name: scan\n      predicateType: vuln\n      authorities:\n      - key:\n          publicKey: |\n{pem}      conditions:\n      - expression: {scan_condition}\n        message: scanned within 7 days\n",
            lab.host
        )
    };

    // Refused at apply, through the real API server's call to the policy webhook.
    let name = format!("{}-bad", ns.name);
    let indented: String = spec("now - timestamp(predicate.metadata.scanFinishedOn) < ")
        .lines()
        .map(|l| format!("  {l}\n"))
        .collect();
    let run = apply(&format!(
        "apiVersion: fixity.dev/v1alpha1\nkind: ImmutabilityPolicy\nmetadata: {{name: {name}}}\nspec:\n{indented}"
    ));
    assert!(!run.ok, "{}", run.stdout);
    assert!(
        run.stderr.contains("invalid ImmutabilityPolicy")
            && run
                .stderr
                .contains("attestations[1].conditions[0].expression: syntax"),
        "{}",
        run.stderr
    );
    assert!(
        !kubectl(&["get", "immutabilitypolicy", &name]).ok,
        "nothing was stored"
    );

    ns.policy(&spec(
        "now - timestamp(predicate.metadata.scanFinishedOn) < duration('168h')",
    ));
    let deployment = |name: &str, image: &str| {
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  selector: {{matchLabels: {{app: {name}}}}}\n  template:\n    metadata: {{labels: {{app: {name}}}}}\n    spec:\n      containers: [{{name: app, image: '{image}'}}]\n",
            ns = ns.name
        )
    };
    let run = expect_ok(apply(&deployment("scanned", &scanned)));
    assert!(
        run.stdout.contains("deployment.apps/scanned created"),
        "{}",
        run.stdout
    );
    let run = apply(&deployment("unscanned", &unscanned));
    expect_denied(&run, "AttestationMissing");
    assert!(
        run.stderr.contains(
            "lacks attestation \"scan\" (https://cosign.sigstore.dev/attestation/vuln/v1)"
        ),
        "{}",
        run.stderr
    );
}

/// A registry that demands credentials: fixity fetches signatures with the pod's own pull
/// secret or its service account's, and without them the image is not verified.
#[test]
#[ignore = "needs a cluster: tests/e2e/run.sh"]
fn signatures_are_fetched_with_the_pods_pull_secrets() {
    let backend = env("FIXITY_E2E_REGISTRY");
    let front = env("FIXITY_E2E_AUTH_REGISTRY");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(common::registry::token_front(&front, backend.clone()));

    let lab = common::registry::Lab::existing(&backend);
    let key = lab.key("private");
    let digest = lab.push_image("private/app", "v1", "private content");
    lab.sign(&key, &lab.reference("private/app", &digest), true, &[]);
    let image = format!("{front}/private/app@{digest}");

    let ns = TestNamespace::of("pullsecrets");
    ns.policy(&key.required_on(&front));
    expect_ok(ns.kubectl(&[
        "create",
        "secret",
        "docker-registry",
        "regcred",
        &format!("--docker-server={front}"),
        "--docker-username=robot",
        "--docker-password=s3cret",
    ]));

    // Without credentials the token service refuses: the registry answered, with nothing that
    // proves a signature, so the image is unsigned (not unavailable, which Allow would admit).
    let run = ns.kubectl(&["run", "anonymous", &format!("--image={image}")]);
    expect_denied(&run, "UnsignedImage");
    assert!(run.stderr.contains("refused (401)"), "{}", run.stderr);

    let own = r#"{"spec":{"imagePullSecrets":[{"name":"regcred"}]}}"#;
    expect_ok(ns.kubectl(&[
        "run",
        "own-secret",
        &format!("--image={image}"),
        &format!("--overrides={own}"),
    ]));

    expect_ok(apply(&format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: builder, namespace: {}}}\nimagePullSecrets: [{{name: regcred}}]\n",
        ns.name
    )));
    let via_sa = r#"{"spec":{"serviceAccountName":"builder"}}"#;
    expect_ok(ns.kubectl(&[
        "run",
        "via-sa",
        &format!("--image={image}"),
        &format!("--overrides={via_sa}"),
    ]));
    drop(runtime);
}

/// A registry that demands credentials the kubelet's credential provider plugin gives: the
/// API server asks fixity, fixity runs the plugin (configured with the kubelet's own
/// CredentialProviderConfig) and verifies the signature with its credentials, and the pod is
/// admitted. An image the plugin's matchImages do not cover is read anonymously, refused by
/// the registry, and the pod is denied.
#[test]
#[ignore = "needs a cluster: tests/e2e/run.sh"]
fn a_credential_provider_plugin_opens_an_authenticated_registry() {
    let backend = env("FIXITY_E2E_REGISTRY");
    let front = env("FIXITY_E2E_PROVIDER_REGISTRY");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(common::registry::token_front(&front, backend.clone()));

    let lab = common::registry::Lab::existing(&backend);
    let key = lab.key("provided");
    let signed = |repo: &str| {
        let digest = lab.push_image(repo, "v1", &format!("{repo} content"));
        lab.sign(&key, &lab.reference(repo, &digest), true, &[]);
        format!("{front}/{repo}@{digest}")
    };
    let (provided, unprovided) = (signed("provided/app"), signed("unprovided/app"));

    let ns = TestNamespace::of("provider");
    ns.policy(&key.required_on(&front));

    let run = expect_ok(ns.kubectl(&["run", "provided", &format!("--image={provided}")]));
    assert!(
        run.stdout.contains("pod/provided created"),
        "{}",
        run.stdout
    );
    let log = std::fs::read_to_string(env("FIXITY_E2E_PROVIDER_LOG")).unwrap_or_default();
    assert!(
        log.contains(&format!(r#""image":"{front}/provided/app""#)),
        "the plugin was asked for the image: {log}"
    );

    let run = ns.kubectl(&["run", "unprovided", &format!("--image={unprovided}")]);
    expect_denied(&run, "UnsignedImage");
    assert!(run.stderr.contains("refused (401)"), "{}", run.stderr);
    drop(runtime);
}

/// A policy may take its public key from a Secret; the watcher reads it, and a policy whose
/// Secret is missing is reported not Ready instead of half-applied.
#[test]
#[ignore = "needs a cluster: tests/e2e/run.sh"]
fn a_key_from_a_secret_verifies_and_a_missing_one_is_reported() {
    let lab = common::registry::Lab::existing(&env("FIXITY_E2E_REGISTRY"));
    let key = lab.key("secret-held");
    let signed = lab.reference(
        "e2e/keyref",
        &lab.push_image("e2e/keyref", "v1", "key in a secret"),
    );
    lab.sign(&key, &signed, true, &[]);

    let ns = TestNamespace::of("keyref");
    let pem_file = lab.path().join("key-secret-held/cosign.pub");
    expect_ok(ns.kubectl(&[
        "create",
        "secret",
        "generic",
        "release-key",
        &format!("--from-file=cosign.pub={}", pem_file.display()),
    ]));
    let rule = |secret: &str| {
        format!(
            "images:\n  verify:\n  - images: ['{}/e2e/keyref']\n    authorities:\n    - key:\n        secretRef: {{namespace: {}, name: {secret}, key: cosign.pub}}\n",
            lab.host, ns.name
        )
    };
    ns.policy(&rule("release-key"));
    expect_ok(ns.kubectl(&[
        "run",
        "signed",
        &format!("--image={signed}"),
        "--dry-run=server",
    ]));

    // Point the policy at a Secret that does not exist: it stops being Ready, with the reason.
    let policy = ns.name.clone();
    let patch = format!(
        r#"{{"spec":{{"images":{{"verify":[{{"images":["{}/e2e/keyref"],"authorities":[{{"key":{{"secretRef":{{"namespace":"{}","name":"missing","key":"cosign.pub"}}}}}}]}}]}}}}}}"#,
        lab.host, ns.name
    );
    expect_ok(kubectl(&[
        "patch",
        "immutabilitypolicy",
        &policy,
        "--type=merge",
        "-p",
        &patch,
    ]));
    let message = poll(Duration::from_secs(30), || {
        let run = kubectl(&[
            "get", "immutabilitypolicy", &policy, "-o",
            r#"jsonpath={.status.conditions[?(@.type=="Ready")].status}/{.status.conditions[?(@.type=="Ready")].message}"#,
        ]);
        run.stdout.starts_with("False/").then_some(run.stdout)
    })
    .expect("the policy is reported not Ready");
    assert!(
        message.contains("missing") && message.contains("does not exist"),
        "{message}"
    );
}

/// `fixity check` reads YAML as kubectl does: for manifests that hide images behind merge keys
/// and duplicate keys, the images it checks are the ones the real kubectl sends.
#[test]
#[ignore = "needs a cluster: tests/e2e/run.sh"]
fn check_reads_yaml_as_kubectl_does() {
    let pod = |name: &str, containers: &str| {
        format!(
            "- apiVersion: v1\n  kind: Pod\n  metadata: {{name: {name}}}\n  spec:\n{containers}"
        )
    };
    let manifests = [
        pod(
            "base",
            "    containers: &base\n    - {name: web, image: 'nginx:from-anchor'}\n",
        ) + &pod("merged", "    <<: {containers: *base}\n"),
        pod(
            "duplicate",
            "    containers:\n    - name: web\n      image: 'nginx:first'\n      image: 'nginx:last'\n",
        ),
        pod(
            "merge-after",
            "    containers:\n    - name: web\n      image: 'nginx:explicit'\n      <<: {image: 'nginx:merged'}\n",
        ),
        pod(
            "merge-before",
            "    containers:\n    - <<: {image: 'nginx:merged'}\n      name: web\n      image: 'nginx:explicit'\n",
        ),
        pod(
            "merge-list",
            "    containers:\n    - <<: [{name: web, image: 'nginx:first'}, {image: 'nginx:second'}]\n",
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (i, items) in manifests.iter().enumerate() {
        let file = dir.path().join(format!("case-{i}.yaml"));
        std::fs::write(
            &file,
            format!("apiVersion: v1\nkind: List\nitems:\n{items}"),
        )
        .unwrap();
        let path = file.to_str().unwrap();

        let sent = kubectl(&["create", "--dry-run=client", "-o", "json", "-f", path]);
        assert!(sent.ok, "{}", sent.all());
        // One JSON object per item of the List.
        let sent: Vec<serde_json::Value> = serde_json::Deserializer::from_str(&sent.stdout)
            .into_iter()
            .collect::<Result<_, _>>()
            .unwrap();
        let mut by_kubectl: Vec<(String, String)> = sent
            .iter()
            .flat_map(|pod| {
                let name = pod["metadata"]["name"].as_str().unwrap().to_owned();
                pod["spec"]["containers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(move |c| (name.clone(), c["image"].as_str().unwrap().to_owned()))
            })
            .collect();

        let out = Command::new(common::BIN)
            .args(["check", "-o", "json", path])
            .output()
            .unwrap();
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
        let mut by_fixity: Vec<(String, String)> = report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                assert_eq!(f["reason"], "MutableTag", "{f}");
                (
                    f["name"].as_str().unwrap().to_owned(),
                    f["image"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        by_kubectl.sort();
        by_fixity.sort();
        assert_eq!(by_fixity, by_kubectl, "case {i}:\n{items}");
    }
}

/// A pod review for `image` in `namespace`, as the API server sends a CREATE.
fn pod_review(namespace: &str, name: &str, image: &str) -> Vec<u8> {
    let mut review: serde_json::Value =
        serde_json::from_slice(&common::fixture("pod-create-pinned")).unwrap();
    let request = &mut review["request"];
    request["uid"] = format!("{name}-{}", std::process::id()).into();
    request["namespace"] = namespace.into();
    request["name"] = name.into();
    request["object"]["metadata"]["namespace"] = namespace.into();
    request["object"]["metadata"]["name"] = name.into();
    request["object"]["spec"]["containers"][0]["image"] = image.into();
    serde_json::to_vec(&review).unwrap()
}

/// A policy whose key Secret cannot be read is no longer dropped whole: tags and exec are
/// still denied, and the images its verify rule covers are denied until the Secret exists.
#[test]
#[ignore = "needs a cluster: tests/e2e/run.sh"]
fn a_policy_whose_key_cannot_be_read_keeps_applying() {
    let lab = common::registry::Lab::existing(&env("FIXITY_E2E_REGISTRY"));
    let key = lab.key("unread");
    let signed = lab.reference(
        "e2e/unread",
        &lab.push_image("e2e/unread", "v1", "key read later"),
    );
    lab.sign(&key, &signed, true, &[]);

    let ns = TestNamespace::of("unread");
    let name = ns.name.clone();
    expect_ok(apply(&format!(
        "apiVersion: fixity.dev/v1alpha1\nkind: ImmutabilityPolicy\nmetadata:\n  name: {name}\nspec:\n  match:\n    namespaceSelector:\n      matchLabels: {{fixity-e2e: {name}}}\n  images:\n    verify:\n    - images: ['{}/e2e/unread']\n      authorities:\n      - key:\n          secretRef: {{namespace: {name}, name: release-key, key: cosign.pub}}\n",
        lab.host
    )));
    let condition = || {
        kubectl(&[
            "get", "immutabilitypolicy", &name, "-o",
            r#"jsonpath={.status.conditions[?(@.type=="Ready")].status}/{.status.conditions[?(@.type=="Ready")].reason}/{.status.conditions[?(@.type=="Ready")].message}"#,
        ])
        .stdout
    };
    let status = poll(Duration::from_secs(30), || {
        let s = condition();
        s.starts_with("False/ReferenceUnavailable/").then_some(s)
    })
    .expect("the policy reports the unreadable reference");
    assert!(
        status.contains(&format!("secret {name}/release-key does not exist")),
        "{status}"
    );

    // Everything that does not need the key still applies.
    expect_denied(
        &ns.kubectl(&["run", "tagged", "--image=nginx:latest"]),
        "MutableTag",
    );
    ns.pinned_pod("web");
    expect_denied(&ns.kubectl(&["exec", "web", "--", "ls"]), "ExecDenied");
    let run = ns.kubectl(&["run", "signed", &format!("--image={signed}")]);
    expect_denied(&run, "ReferenceUnavailable");
    assert!(run.stderr.contains("release-key"), "{}", run.stderr);

    // The Secret appears: within a refresh the key vouches again.
    let pem_file = lab.path().join("key-unread/cosign.pub");
    expect_ok(ns.kubectl(&[
        "create",
        "secret",
        "generic",
        "release-key",
        &format!("--from-file=cosign.pub={}", pem_file.display()),
    ]));
    poll(Duration::from_secs(30), || {
        condition().starts_with("True/").then_some(())
    })
    .expect("the policy becomes Ready once its Secret exists");
    expect_ok(ns.kubectl(&["run", "signed", &format!("--image={signed}")]));
}

/// A TCP relay in front of the API server that a test can cut and restore, to give a fixity
/// a transient API outage without touching the cluster the other tests use.
struct Relay {
    port: u16,
    runtime: tokio::runtime::Runtime,
    accept: Option<tokio::task::JoinHandle<()>>,
    upstream: String,
}

impl Relay {
    fn start(upstream: &str) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let port = common::free_addr().port();
        let mut relay = Self {
            port,
            runtime,
            accept: None,
            upstream: upstream.to_owned(),
        };
        relay.restore();
        relay
    }

    /// Accepts and relays connections again.
    fn restore(&mut self) {
        let upstream = self.upstream.clone();
        let listener = self
            .runtime
            .block_on(tokio::net::TcpListener::bind(("127.0.0.1", self.port)))
            .unwrap();
        self.accept = Some(self.runtime.spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                let upstream = upstream.clone();
                conns.spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        }));
    }

    /// Refuses new connections and drops the open ones.
    fn cut(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
            let _ = self.runtime.block_on(accept);
        }
    }
}

/// Through an API outage the last good copy of a referenced key keeps serving; once the API
/// server answers that the Secret is gone, the key stops vouching. Before, an outage on the
/// one-minute refresh dropped the policy whole and a tagged image was admitted.
#[test]
#[ignore = "needs a cluster: tests/e2e/run.sh"]
fn a_referenced_key_survives_an_api_outage_but_not_its_deletion() {
    let lab = common::registry::Lab::existing(&env("FIXITY_E2E_REGISTRY"));
    let key = lab.key("outage");
    let signed = lab.reference(
        "e2e/outage",
        &lab.push_image("e2e/outage", "v1", "key through an outage"),
    );
    lab.sign(&key, &signed, true, &[]);
    let ns = TestNamespace::of("outage");
    let pem_file = lab.path().join("key-outage/cosign.pub");
    expect_ok(ns.kubectl(&[
        "create",
        "secret",
        "generic",
        "release-key",
        &format!("--from-file=cosign.pub={}", pem_file.display()),
    ]));
    ns.policy(&format!(
        "images:\n  verify:\n  - images: ['{}/e2e/outage']\n    authorities:\n    - key:\n        secretRef: {{namespace: {}, name: release-key, key: cosign.pub}}\n",
        lab.host, ns.name
    ));

    // A second fixity, watching the cluster through the relay.
    let kubeconfig = std::fs::read_to_string(env("KUBECONFIG")).unwrap();
    let api = env("FIXITY_APISERVER_URL");
    let upstream = api.trim_start_matches("https://").to_owned();
    let mut relay = Relay::start(&upstream);
    let dir = tempfile::tempdir().unwrap();
    let relayed = dir.path().join("kubeconfig");
    std::fs::write(
        &relayed,
        kubeconfig.replace(&api, &format!("https://127.0.0.1:{}", relay.port)),
    )
    .unwrap();
    let certs = dir.path().join("certs");
    let fixity = common::Fixity::serve_with_env(
        &[
            "--dev",
            "--dev-cert-dir",
            certs.to_str().unwrap(),
            "--log-format",
            "json",
            "--watch-cluster",
            "--reference-refresh-secs",
            "1",
            "--insecure-registry",
            &lab.host,
        ],
        &[("KUBECONFIG", relayed.to_str().unwrap())],
    );
    poll(Duration::from_secs(30), || {
        common::http_get(fixity.health, "/readyz").and_then(|(code, _)| (code == 200).then_some(()))
    })
    .expect("the second fixity syncs");
    let connector = common::tls_connector(&certs.join("ca.crt"));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let ask = |pod: &str, image: &str| {
        runtime.block_on(common::review(
            &connector,
            fixity.addr,
            pod_review(&ns.name, pod, image),
        ))
    };
    let message = |r: &serde_json::Value| r["status"]["message"].as_str().unwrap_or("").to_owned();
    poll(Duration::from_secs(30), || {
        (ask("signed", &signed)["allowed"] == true).then_some(())
    })
    .expect("the key from the Secret verifies");

    relay.cut();
    poll(Duration::from_secs(30), || {
        fixity
            .log()
            .contains("its last good copy serves")
            .then_some(())
    })
    .expect("a refresh fails during the outage");
    let r = ask("signed-during-outage", &signed);
    assert_eq!(r["allowed"], true, "the last good copy serves: {r}");
    let r = ask("tagged-during-outage", "nginx:latest");
    assert_eq!(r["allowed"], false, "the policy still applies: {r}");
    assert!(message(&r).contains("MutableTag"), "{r}");

    relay.restore();
    expect_ok(ns.kubectl(&["delete", "secret", "release-key"]));
    let r = poll(Duration::from_secs(30), || {
        let r = ask("signed-after-deletion", &signed);
        (r["allowed"] == false).then_some(r)
    })
    .expect("a deleted key stops vouching");
    assert!(
        message(&r).contains("ReferenceUnavailable") && message(&r).contains("does not exist"),
        "{r}"
    );
    drop(runtime);
}

/// `kubectl exec` has a back door: the kubelet's own API, reached through the API server as
/// nodes/proxy. The API server reviews every such request (GET or POST) as CONNECT
/// nodes/proxy; fixity judges exec and run under the exec rule of the namespace the path
/// names, lets read-only paths through and denies paths it cannot classify.
#[test]
#[ignore = "needs a cluster: tests/e2e/run.sh"]
fn exec_through_the_kubelet_api_is_denied() {
    let ns = TestNamespace::of("kubelet");
    ns.policy("mode: Enforce");
    let open = TestNamespace::of("kubelet-open");
    open.policy("runtime: {exec: Allow}");
    let proxy = |path: &str| format!("/api/v1/nodes/e2e-node/proxy{path}");
    let not_found = "nodes \"e2e-node\" not found";

    let exec = proxy(&format!("/exec/{}/web/web?command=ls&stdout=true", ns.name));
    let run = kubectl(&["get", "--raw", &exec]);
    expect_denied(&run, "ExecDenied");
    assert!(run.stderr.contains("nodes/proxy"), "{}", run.stderr);
    let run = kubectl(&[
        "create",
        "--raw",
        &proxy(&format!("/run/{}/web/web?cmd=ls", ns.name)),
        "-f",
        "/dev/null",
    ]);
    expect_denied(&run, "ExecDenied");
    let run = kubectl(&[
        "get",
        "--raw",
        &proxy(&format!("/attach/{}/web/web", ns.name)),
    ]);
    expect_denied(&run, "AttachDenied");

    // Where the policy allows exec, the request passes fixity and fails for want of a node.
    let run = kubectl(&[
        "get",
        "--raw",
        &proxy(&format!("/exec/{}/web/web?command=ls", open.name)),
    ]);
    assert!(
        !run.all().contains("fixity") && run.all().contains(not_found),
        "{}",
        run.all()
    );
    let run = kubectl(&["get", "--raw", &proxy("/healthz")]);
    assert!(
        !run.all().contains("fixity") && run.all().contains(not_found),
        "read-only paths pass: {}",
        run.all()
    );
    let run = kubectl(&[
        "create",
        "--raw",
        &proxy(&format!("/checkpoint/{}/web/web", ns.name)),
        "-f",
        "/dev/null",
    ]);
    expect_denied(&run, "NodeProxyDenied");
}

/// fixity here runs with --client-ca, and the API server presents its client certificate
/// through its admission configuration (tests/e2e/run.sh): every other test of this tier is
/// answered that way. A review sent straight to the port without that certificate gets no
/// answer, and leaves no Event in the namespace it names.
#[test]
#[ignore = "needs a cluster: tests/e2e/run.sh"]
fn forged_reviews_without_the_api_servers_certificate_get_nothing() {
    let ns = TestNamespace::of("forged");
    ns.policy("mode: Enforce");
    let addr: std::net::SocketAddr = env("FIXITY_E2E_ADDR").parse().unwrap();
    let ca = std::path::Path::new(&env("FIXITY_E2E_LOG"))
        .with_file_name("certs")
        .join("ca.crt");
    let forged = |user: &str| {
        let mut review: serde_json::Value =
            serde_json::from_slice(&common::fixture("exec")).unwrap();
        review["request"]["namespace"] = ns.name.as_str().into();
        review["request"]["name"] = "web".into();
        review["request"]["userInfo"]["username"] = user.into();
        serde_json::to_vec(&review).unwrap()
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let anonymous = runtime.block_on(common::https_post(
        &common::tls_connector(&ca),
        addr,
        "/validate",
        forged("mallory"),
    ));
    assert!(
        anonymous.is_err(),
        "answered without a client certificate: {:?}",
        anonymous.map(|r| String::from_utf8_lossy(&r.body).into_owned())
    );
    let cert = std::fs::read_to_string(env("FIXITY_E2E_CLIENT_CERT")).unwrap();
    let key = std::fs::read_to_string(env("FIXITY_E2E_CLIENT_KEY")).unwrap();
    let api_server = common::tls_connector_with_client(&ca, &cert, &key);
    let r = runtime.block_on(common::review(&api_server, addr, forged("the-api-server")));
    assert_eq!(r["allowed"], false, "{r}");
    assert!(
        r["status"]["message"]
            .as_str()
            .unwrap()
            .contains("ExecDenied"),
        "{r}"
    );
    let events = || {
        ns.kubectl(&[
            "get",
            "events",
            "-o",
            "jsonpath={range .items[*]}{.message}{\"\\n\"}{end}",
        ])
        .stdout
    };
    poll(Duration::from_secs(10), || {
        events().contains("by user the-api-server").then_some(())
    })
    .expect("the answered review published its Event");
    assert!(!events().contains("mallory"), "{}", events());
}
