//! Kubelet image credential provider plugins, through the webhook: the test plugin of
//! tests/credential_provider (a real `credentialprovider.kubelet.k8s.io/v1` exec plugin) gives
//! the credentials a registry front demands (`token_front`: basic auth for a bearer token, over
//! `crane registry serve`), configured by a kubelet `CredentialProviderConfig` file.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::registry::{Lab, token_front};
use common::review::{message, pod_review, policy_yaml, post, state_with};
use fixity::audit::Metrics;
use fixity::policy::files;
use fixity::server::AppState;
use fixity::verify::checker::SignatureChecker;
use fixity::verify::credentials::provider_config;
use fixity::verify::credentials::providers::CredentialProviders;
use serde_json::Value;

const PLUGIN: &str = "fixity-test-credential-provider";

fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/credential_provider")
}

/// A signed image behind the authenticating front, and the front's address.
struct Private {
    lab: Lab,
    front: String,
    key: common::registry::Key,
    /// Signed images under `front`, by repository.
    images: Vec<String>,
    dir: tempfile::TempDir,
}

async fn private(repositories: &[&str]) -> Private {
    let lab = Lab::start();
    let key = lab.key("private");
    let front = token_front("127.0.0.1:0", lab.host.clone()).await;
    let images = repositories
        .iter()
        .map(|repo| {
            let digest = lab.push_image(repo, "v1", &format!("content of {repo}"));
            lab.sign(&key, &lab.reference(repo, &digest), true, &[]);
            format!("{front}/{repo}@{digest}")
        })
        .collect();
    Private {
        lab,
        front,
        key,
        images,
        dir: tempfile::tempdir().unwrap(),
    }
}

impl Private {
    fn log(&self) -> PathBuf {
        self.dir.path().join("plugin.log")
    }

    /// The requests the plugin received, one per run.
    fn runs(&self) -> Vec<Value> {
        std::fs::read_to_string(self.log())
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l.split_once(' ').unwrap().1).unwrap())
            .collect()
    }

    /// A CredentialProviderConfig for the test plugin, run with `mode` and these extra
    /// environment variables, for `match_images`.
    fn config(&self, match_images: &[&str], mode: &str, env: &[(&str, &str)]) -> PathBuf {
        let mut vars = vec![
            ("TEST_PROVIDER_USERNAME", "robot".to_owned()),
            ("TEST_PROVIDER_PASSWORD", "s3cret".to_owned()),
            ("TEST_PROVIDER_LOG", self.log().display().to_string()),
        ];
        vars.extend(env.iter().map(|(k, v)| (*k, (*v).to_owned())));
        let env: String = vars
            .iter()
            .map(|(k, v)| format!("      - name: {k}\n        value: '{v}'\n"))
            .collect();
        let text = format!(
            "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n  - name: {PLUGIN}\n    matchImages: [{}]\n    defaultCacheDuration: 10m\n    apiVersion: credentialprovider.kubelet.k8s.io/v1\n    args: [{mode}]\n    env:\n{env}",
            match_images
                .iter()
                .map(|m| format!("'{m}'"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let path = self.dir.path().join(format!("providers-{mode}.yaml"));
        std::fs::write(&path, text).unwrap();
        path
    }

    /// The webhook with the key's policy over the front, and these providers.
    fn state(&self, config: &Path, deadline: Duration) -> Arc<AppState> {
        let text = policy_yaml(&self.front, &self.key, "");
        let policies = files::parse(Path::new("p.yaml"), &text).unwrap();
        let mut options = self.lab.options();
        options.insecure_registries.push(self.front.clone());
        let metrics = Arc::new(Metrics::default());
        let providers = provider_config::load(config, &bin_dir()).unwrap();
        let checker = SignatureChecker::new(options, deadline, metrics.clone())
            .unwrap()
            .with_credential_providers(CredentialProviders::new(providers));
        state_with(policies, checker, metrics)
    }
}

/// The plugin's credentials open the registry: admitted. An image no `matchImages` entry
/// covers is fetched anonymously and refused by the registry: denied. The plugin got a real
/// CredentialProviderRequest, with the configured args and env.
#[tokio::test]
async fn a_plugins_credentials_verify_an_image_in_an_authenticated_registry() {
    let p = private(&["team/app", "other/app"]).await;
    let config = p.config(&[&format!("{}/team", p.front)], "answer", &[]);
    let state = p.state(&config, Duration::from_secs(8));

    let r = post(&state, pod_review(&p.images[0])).await;
    assert_eq!(r["allowed"], true, "{r}");
    let runs = p.runs();
    assert_eq!(runs.len(), 1);
    assert_eq!(
        runs[0],
        serde_json::json!({
            "apiVersion": "credentialprovider.kubelet.k8s.io/v1",
            "kind": "CredentialProviderRequest",
            "image": format!("{}/team/app", p.front),
        })
    );

    let r = post(&state, pod_review(&p.images[1])).await;
    assert_eq!(r["allowed"], false, "{r}");
    assert!(
        message(&r).contains("UnsignedImage") && message(&r).contains("refused (401)"),
        "{r}"
    );
    assert_eq!(
        p.runs().len(),
        1,
        "the plugin is not asked for what it does not match"
    );
}

/// Credentials from the plugin are for the matched registry only: an answer keyed for another
/// registry gives this one nothing, and a wrong password is the registry's refusal.
#[tokio::test]
async fn credentials_serve_only_the_registry_they_are_keyed_for() {
    let p = private(&["team/app"]).await;
    let config = p.config(
        &[&p.front],
        "answer",
        &[("TEST_PROVIDER_KEY", "elsewhere.example")],
    );
    let r = post(
        &p.state(&config, Duration::from_secs(8)),
        pod_review(&p.images[0]),
    )
    .await;
    assert_eq!(r["allowed"], false, "{r}");
    assert!(message(&r).contains("refused (401)"), "{r}");

    let config = p.config(
        &[&p.front],
        "answer",
        &[("TEST_PROVIDER_PASSWORD", "wrong")],
    );
    let r = post(
        &p.state(&config, Duration::from_secs(8)),
        pod_review(&p.images[0]),
    )
    .await;
    assert_eq!(r["allowed"], false, "{r}");
    assert!(message(&r).contains("UnsignedImage"), "{r}");
}

/// Answers are cached as the kubelet caches them: by registry, image or once for all, for the
/// answer's cacheDuration or the provider's default; zero is not cached.
#[tokio::test]
async fn answers_are_cached_by_their_cache_key_type_and_duration() {
    let p = private(&["a/app", "b/app"]).await;
    for (key_type, duration, runs) in [
        ("Registry", None, 1),
        ("Global", None, 1),
        ("Image", None, 2),
        ("Registry", Some("0s"), 4),
    ] {
        let _ = std::fs::remove_file(p.log());
        let mut env = vec![("TEST_PROVIDER_CACHE_KEY_TYPE", key_type)];
        if let Some(d) = duration {
            env.push(("TEST_PROVIDER_CACHE_DURATION", d));
        }
        let config = p.config(&[&p.front], "answer", &env);
        let state = p.state(&config, Duration::from_secs(8));
        // Two images, each twice: the plugin is asked whenever no cached answer covers one.
        for image in [&p.images[0], &p.images[1], &p.images[0], &p.images[1]] {
            let r = post(&state, pod_review(image)).await;
            assert_eq!(r["allowed"], true, "{key_type} {duration:?}: {r}");
        }
        assert_eq!(p.runs().len(), runs, "{key_type} {duration:?}");
    }
}

/// Many reviews of one new image at once run the plugin once.
#[tokio::test]
async fn concurrent_lookups_of_one_image_run_one_plugin() {
    let p = private(&["team/app"]).await;
    let config = p.config(&[&p.front], "answer", &[("TEST_PROVIDER_DELAY", "0.5")]);
    let state = p.state(&config, Duration::from_secs(8));
    let reviews = (0..8).map(|_| {
        let state = state.clone();
        let image = p.images[0].clone();
        tokio::spawn(async move { post(&state, pod_review(&image)).await })
    });
    for r in futures::future::join_all(reviews).await {
        let r = r.unwrap();
        assert_eq!(r["allowed"], true, "{r}");
    }
    assert_eq!(p.runs().len(), 1);
}

/// One review naming many new images does not fork a plugin for each at once.
#[tokio::test]
async fn plugins_run_a_few_at_a_time() {
    let p = private(&[]).await;
    let busy = p.dir.path().join("busy");
    std::fs::create_dir(&busy).unwrap();
    let config = p.config(
        &[&p.front],
        "answer",
        &[
            ("TEST_PROVIDER_CACHE_KEY_TYPE", "Image"),
            ("TEST_PROVIDER_DELAY", "0.3"),
            ("TEST_PROVIDER_BUSY_DIR", &busy.display().to_string()),
        ],
    );
    let state = p.state(&config, Duration::from_secs(8));
    let digest = format!("sha256:{}", "ab".repeat(32));
    let mut review: Value = serde_json::from_slice(&pod_review(&p.front)).unwrap();
    let containers: Vec<Value> = (0..12)
        .map(|i| serde_json::json!({"name": format!("c{i}"), "image": format!("{}/app{i}@{digest}", p.front)}))
        .collect();
    review["request"]["object"]["spec"]["containers"] = containers.into();
    let r = post(&state, serde_json::to_vec(&review).unwrap()).await;
    assert_eq!(r["allowed"], false, "nothing is signed: {r}");
    assert_eq!(p.runs().len(), 12, "one run per image");
    let counts = std::fs::read_to_string(busy.with_extension("counts")).unwrap();
    let most = counts
        .lines()
        .map(|l| l.trim().parse::<usize>().unwrap())
        .max();
    assert!(
        most.is_some_and(|m| m <= 4),
        "at most 4 at once: {counts:?}"
    );
}

/// A plugin that fails, answers junk, floods its output or hangs makes the check
/// unavailable, inside the deadline; a hanging plugin is killed.
#[tokio::test]
async fn plugin_failures_are_verification_unavailable_within_the_deadline() {
    let p = private(&["team/app"]).await;
    let deadline = Duration::from_millis(1500);
    for (mode, needle) in [
        (
            "fail",
            "failed (exit status: 3): no credentials for 127.0.0.1",
        ),
        ("junk", "answered badly: not a CredentialProviderResponse"),
        ("flood", "wrote more than 256 KiB; it was stopped"),
        ("hang", "did not answer within 750 ms; it was stopped"),
    ] {
        let _ = std::fs::remove_file(p.log());
        let config = p.config(&[&p.front], mode, &[]);
        let state = p.state(&config, deadline);
        let started = Instant::now();
        let r = post(&state, pod_review(&p.images[0])).await;
        let took = started.elapsed();
        assert_eq!(r["allowed"], false, "{mode}: {r}");
        let text = message(&r);
        assert!(
            text.contains("VerificationUnavailable") && text.contains(needle),
            "{mode}: {text}"
        );
        assert!(took < deadline * 2, "{mode}: answered after {took:?}");
        if mode == "hang" {
            let log = std::fs::read_to_string(p.log()).unwrap();
            let pid = log.split_whitespace().next().unwrap();
            let gone = (0..50).any(|_| {
                std::thread::sleep(Duration::from_millis(100));
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"));
                // Gone, or a zombie waiting to be reaped: no longer running.
                stat.map_or(true, |s| s.split_whitespace().nth(2) == Some("Z"))
            });
            assert!(gone, "the hanging plugin (pid {pid}) was killed");
        }
    }
}

/// `onVerificationError: Allow` admits what a failing plugin leaves unavailable, as it admits
/// an unreachable registry, and nothing else.
#[tokio::test]
async fn allow_on_verification_error_covers_a_failing_plugin() {
    let p = private(&["team/app"]).await;
    let config = p.config(&[&p.front], "fail", &[]);
    let text = policy_yaml(&p.front, &p.key, "    onVerificationError: Allow\n");
    let policies = files::parse(Path::new("p.yaml"), &text).unwrap();
    let mut options = p.lab.options();
    options.insecure_registries.push(p.front.clone());
    let metrics = Arc::new(Metrics::default());
    let providers = provider_config::load(&config, &bin_dir()).unwrap();
    let checker = SignatureChecker::new(options, Duration::from_secs(8), metrics.clone())
        .unwrap()
        .with_credential_providers(CredentialProviders::new(providers));
    let r = post(
        &state_with(policies, checker, metrics),
        pod_review(&p.images[0]),
    )
    .await;
    assert_eq!(r["allowed"], true, "{r}");
    assert!(
        r["warnings"]
            .to_string()
            .contains("VerificationUnavailable"),
        "{r}"
    );
}
