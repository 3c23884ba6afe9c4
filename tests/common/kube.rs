//! The real kubectl against the test cluster (`tests/cluster/with-cluster.sh` sets KUBECONFIG),
//! for the tiers that run through a real API server.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// An environment variable the tier's run.sh sets.
pub fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: run these tests through their tier's run.sh (tests/e2e, tests/scan)"
        )
    })
}

/// What a command did.
pub struct Run {
    pub ok: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs `program`, feeding it `stdin`.
pub fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Run {
    env("KUBECONFIG");
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    Run {
        ok: out.status.success(),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

pub fn kubectl(args: &[&str]) -> Run {
    kubectl_in(args, None)
}

pub fn kubectl_in(args: &[&str], stdin: Option<&str>) -> Run {
    run("kubectl", args, stdin)
}

pub fn apply(yaml: &str) -> Run {
    kubectl_in(&["apply", "-f", "-"], Some(yaml))
}

#[track_caller]
pub fn expect_ok(run: Run) -> Run {
    assert!(run.ok, "command failed:\n{}", run.all());
    run
}

/// `f` again and again until it gives an answer or `limit` passes.
pub fn poll<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A file's content in base64, as a caBundle takes it.
pub fn base64(path: &Path) -> String {
    let out = Command::new("base64")
        .arg("-w0")
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a kubectl command on drop.
pub struct Cleanup(pub Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let args: Vec<&str> = self.0.iter().map(String::as_str).collect();
        kubectl(&args);
    }
}

/// A namespace of one test, labelled `fixity-<tier>: <name>` so that only that test's
/// ImmutabilityPolicy (named after it) selects it; both are deleted on drop. Each tier adds the
/// helpers it needs.
pub struct Namespace {
    pub name: String,
    label: String,
}

impl Namespace {
    pub fn new(tier: &str, test: &str) -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{tier}-{test}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let label = format!("fixity-{tier}");
        expect_ok(apply(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  labels: {{{label}: {name}}}\n"
        )));
        // The serviceaccount controller creates "default" shortly after; pods need it.
        poll(Duration::from_secs(30), || {
            kubectl(&["get", "serviceaccount", "default", "-n", &name])
                .ok
                .then_some(())
        })
        .expect("the default ServiceAccount appears");
        Self { name, label }
    }

    /// The label that selects this namespace, as `key: value` YAML.
    pub fn selector(&self) -> String {
        format!("{{{}: {}}}", self.label, self.name)
    }

    /// Applies the ImmutabilityPolicy of this namespace (named after it, selecting it) with
    /// `spec` below its `match`.
    pub fn apply_policy(&self, spec: &str) {
        let indented: String = spec.lines().map(|l| format!("  {l}\n")).collect();
        expect_ok(apply(&format!(
            "apiVersion: fixity.dev/v1alpha1\nkind: ImmutabilityPolicy\nmetadata:\n  name: {}\nspec:\n  match:\n    namespaceSelector:\n      matchLabels: {}\n{indented}",
            self.name,
            self.selector()
        )));
    }

    /// Lets `users` exec into and attach to this namespace's pods as far as RBAC goes, so that
    /// only fixity tells them apart.
    pub fn let_exec(&self, users: &[&str]) {
        expect_ok(self.kubectl(&[
            "create",
            "role",
            "exec",
            "--verb=get,list,create",
            "--resource=pods,pods/exec,pods/attach",
        ]));
        let mut binding = vec!["create", "rolebinding", "exec", "--role=exec"];
        let flags: Vec<String> = users.iter().map(|u| format!("--user={u}")).collect();
        binding.extend(flags.iter().map(String::as_str));
        expect_ok(self.kubectl(&binding));
    }

    pub fn kubectl(&self, args: &[&str]) -> Run {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        kubectl(&all)
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        kubectl(&[
            "delete",
            "immutabilitypolicy",
            &self.name,
            "--ignore-not-found",
            "--wait=false",
        ]);
        kubectl(&["delete", "namespace", &self.name, "--wait=false"]);
    }
}
