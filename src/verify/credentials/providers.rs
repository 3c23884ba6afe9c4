//! Kubelet image credential provider plugins, run by fixity as the kubelet runs them, so that
//! signatures are read from every registry the nodes pull from (ECR, Artifact Registry, ACR
//! and any other provider) with no cloud SDK in fixity.
//!
//! For an image that one of a provider's `matchImages` matches, fixity executes
//! `bin-dir/<name> <args>` with its own environment plus the provider's `env`, writes a
//! `CredentialProviderRequest` on its stdin and reads a `CredentialProviderResponse` from its
//! stdout (protocol `credentialprovider.kubelet.k8s.io/v1`). Of the response's `auth` entries,
//! the one for the image is chosen as the kubelet's keyring chooses it: entries whose key
//! matches the image (see `image_match`), the greatest key first (the most specific). The
//! credential is for the image's registry only, as any other (see `registry`).
//!
//! Answers are cached per provider as the kubelet caches them: under the image, its registry or
//! once for all (`cacheKeyType` `Image`, `Registry`, `Global`), for the response's
//! `cacheDuration` or else the provider's `defaultCacheDuration`; a duration of zero is not
//! cached. A lookup tries the image's key, then its registry's, then the global one. Concurrent
//! lookups of one image that find nothing cached run one plugin between them, and at most
//! [`MAX_RUNNING`] plugins run at once.
//!
//! A plugin that cannot be started, exits non-zero, writes more than [`MAX_OUTPUT`] bytes or
//! something that is not a response, or does not finish in time (half the verification
//! deadline: the rest is the registry's), makes the check unavailable
//! (`VerificationUnavailable`): its child is killed, fixity carries on. Providers are tried in
//! the configuration's order; the first with a credential for the image gives it.

use std::collections::{BTreeMap, HashMap};
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::image_match::ImagePattern;
use super::provider_config::{PROTOCOL_API_VERSION, Provider, go_duration};
use crate::image::ImageReference;
use crate::verify::RegistryCredential;
use crate::verify::cache::VerdictCache;

/// Most bytes read from a plugin's stdout; responses are a few hundred.
pub const MAX_OUTPUT: usize = 256 << 10;
/// Most bytes of a plugin's stderr kept for the error message.
const MAX_STDERR: usize = 2 << 10;
/// Cached answers kept at most; expired ones go first.
const MAX_CACHED: usize = 10_000;
/// Plugins running at once, across all requests: a review naming many new images must not
/// fork as many processes.
const MAX_RUNNING: usize = 4;

/// What a response's `cacheKeyType` says the answer is good for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum CacheKey {
    Image(String),
    Registry(String),
    Global,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Response {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    cache_key_type: String,
    cache_duration: Option<String>,
    #[serde(default)]
    auth: BTreeMap<String, AuthConfig>,
}

#[derive(Deserialize)]
struct AuthConfig {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
}

/// One provider's answer, checked.
#[derive(Debug)]
struct Answer {
    key_type: KeyType,
    cache_for: Duration,
    /// Greatest key first.
    auth: Vec<(ImagePattern, String, String)>,
}

#[derive(Debug, Clone, Copy)]
enum KeyType {
    Image,
    Registry,
    Global,
}

type Ran = Result<Arc<Answer>, String>;

/// Answers by provider and cache key, with when they expire.
type Cached = HashMap<(usize, CacheKey), (Instant, Arc<Answer>)>;

/// The configured providers, their cache and their runs in flight.
pub struct CredentialProviders {
    providers: Vec<Provider>,
    cached: Mutex<Cached>,
    /// Runs in flight by (provider, image); nothing is kept in it once a run ends.
    running: Arc<VerdictCache<(usize, String), Ran>>,
    /// Turns to run a plugin, [`MAX_RUNNING`] of them.
    turns: Arc<tokio::sync::Semaphore>,
}

impl CredentialProviders {
    pub fn new(providers: Vec<Provider>) -> Arc<Self> {
        Arc::new(Self {
            providers,
            cached: Mutex::default(),
            running: VerdictCache::new(MAX_CACHED, |_| Duration::ZERO),
            turns: Arc::new(tokio::sync::Semaphore::new(MAX_RUNNING)),
        })
    }

    /// The credential the providers give for `image`'s registry, if one does; a plugin that
    /// fails or does not answer within `timeout` is an error (the check is unavailable).
    pub async fn credential_for(
        self: &Arc<Self>,
        image: &ImageReference,
        timeout: Duration,
    ) -> Result<Option<RegistryCredential>, String> {
        let name = image.name();
        for (index, provider) in self.providers.iter().enumerate() {
            if !provider.matches(name) {
                continue;
            }
            let answer = match self.cached(index, name) {
                Some(answer) => answer,
                None => self.run(index, name, timeout).await?,
            };
            if let Some((username, password)) = answer.credential(name) {
                return Ok(Some(RegistryCredential {
                    registry: image.registry().to_owned(),
                    username: username.to_owned(),
                    password: password.to_owned(),
                }));
            }
        }
        Ok(None)
    }

    fn cached(&self, index: usize, image: &str) -> Option<Arc<Answer>> {
        let now = Instant::now();
        let cached = self.cached.lock().unwrap_or_else(PoisonError::into_inner);
        [
            CacheKey::Image(image.to_owned()),
            CacheKey::Registry(registry_of(image).to_owned()),
            CacheKey::Global,
        ]
        .into_iter()
        .find_map(|key| {
            cached
                .get(&(index, key))
                .filter(|(expires, _)| *expires > now)
                .map(|(_, answer)| answer.clone())
        })
    }

    /// Runs provider `index` for `image`, once for all concurrent callers; the run goes on to
    /// its own timeout if a caller gives up, so its answer is cached for the next.
    async fn run(self: &Arc<Self>, index: usize, image: &str, timeout: Duration) -> Ran {
        let this = Arc::clone(self);
        let owned = image.to_owned();
        let (ran, _) = self
            .running
            .get_or_verify((index, owned.clone()), move |_| async move {
                let provider = &this.providers[index];
                // The wait for a turn counts against the plugin's time.
                let until = tokio::time::Instant::now() + timeout;
                let turn = tokio::time::timeout_at(until, this.turns.clone().acquire_owned());
                let ran = match turn.await {
                    Ok(Ok(_turn)) => exec(provider, &owned, until, timeout).await.map(Arc::new),
                    _ => Err(format!(
                        "credential provider {}: no turn to run it within {} ms ({MAX_RUNNING} \
                         plugins run at once)",
                        provider.name,
                        timeout.as_millis()
                    )),
                };
                match &ran {
                    Ok(answer) => this.store(index, &owned, answer),
                    Err(why) => tracing::warn!(provider = %provider.name, image = %owned, error = %why, "credential provider failed"),
                }
                ran
            })
            .await;
        ran.unwrap_or_else(|| Err("the credential provider's run failed unexpectedly".to_owned()))
    }

    fn store(&self, index: usize, image: &str, answer: &Arc<Answer>) {
        if answer.cache_for.is_zero() {
            return;
        }
        let key = match answer.key_type {
            KeyType::Image => CacheKey::Image(image.to_owned()),
            KeyType::Registry => CacheKey::Registry(registry_of(image).to_owned()),
            KeyType::Global => CacheKey::Global,
        };
        let now = Instant::now();
        let mut cached = self.cached.lock().unwrap_or_else(PoisonError::into_inner);
        if cached.len() >= MAX_CACHED {
            cached.retain(|_, (expires, _)| *expires > now);
        }
        if cached.len() >= MAX_CACHED
            && let Some(soonest) = cached
                .iter()
                .min_by_key(|(_, (expires, _))| *expires)
                .map(|(k, _)| k.clone())
        {
            cached.remove(&soonest);
        }
        cached.insert((index, key), (now + answer.cache_for, Arc::clone(answer)));
    }
}

impl Answer {
    /// The user and password of the most specific entry that matches `image`.
    fn credential(&self, image: &str) -> Option<(&str, &str)> {
        self.auth
            .iter()
            .find(|(key, ..)| key.matches(image))
            .map(|(_, username, password)| (username.as_str(), password.as_str()))
    }
}

/// What fixity takes from one plugin output for `image`, stored and looked up again as
/// `credential_for` does, without the plugin's process (for the fuzz targets).
#[cfg(fuzzing)]
pub(crate) fn read_answer(
    provider: Provider,
    out: &[u8],
    image: &str,
) -> Result<Option<(String, String)>, String> {
    let answer = Arc::new(answer(&provider, out)?);
    let providers = CredentialProviders::new(vec![provider]);
    providers.store(0, image, &answer);
    Ok(providers
        .cached(0, image)
        .as_deref()
        .unwrap_or(&answer)
        .credential(image)
        .map(|(u, p)| (u.to_owned(), p.to_owned())))
}

/// The registry part of an image, as the kubelet's `Registry` cache key takes it.
fn registry_of(image: &str) -> &str {
    image.split('/').next().unwrap_or(image)
}

/// Runs one plugin for `image` and reads its answer by `until`, the end of its `timeout`.
async fn exec(
    provider: &Provider,
    image: &str,
    until: tokio::time::Instant,
    timeout: Duration,
) -> Result<Answer, String> {
    let name = &provider.name;
    let request = serde_json::json!({
        "apiVersion": PROTOCOL_API_VERSION,
        "kind": "CredentialProviderRequest",
        "image": image,
    });
    let mut child = tokio::process::Command::new(&provider.program)
        .args(&provider.args)
        .envs(provider.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            format!(
                "credential provider {name} ({}) could not be started: {e}",
                provider.program.display()
            )
        })?;
    let (Some(mut stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return Err(format!(
            "credential provider {name}: no pipes to talk to it"
        ));
    };
    // Stderr is drained on the side (a plugin blocked on a full stderr pipe would never
    // finish its stdout), and its start kept for the error message.
    let drained = tokio::spawn(keep_start(stderr, MAX_STDERR));
    let stop_draining = drained.abort_handle();
    let talk = async {
        let write = async move {
            // A plugin that exits without reading its request is judged by what it printed.
            let _ = stdin.write_all(request.to_string().as_bytes()).await;
            drop(stdin);
        };
        let mut out = Vec::new();
        let mut stdout = stdout.take(MAX_OUTPUT as u64 + 1);
        let ((), out_read) = tokio::join!(write, stdout.read_to_end(&mut out));
        out_read.map_err(|e| format!("credential provider {name}: reading its output: {e}"))?;
        if out.len() > MAX_OUTPUT {
            return Err(format!(
                "credential provider {name} wrote more than {} KiB; it was stopped",
                MAX_OUTPUT >> 10
            ));
        }
        let status = child
            .wait()
            .await
            .map_err(|e| format!("credential provider {name}: {e}"))?;
        if !status.success() {
            let said = drained.await.unwrap_or_default();
            return Err(format!(
                "credential provider {name} failed ({status}): {}",
                String::from_utf8_lossy(&said).trim()
            ));
        }
        Ok(out)
    };
    let result = tokio::time::timeout_at(until, talk).await;
    stop_draining.abort();
    let out = match result {
        Ok(result) => result?,
        Err(_) => {
            let _ = child.start_kill();
            return Err(format!(
                "credential provider {name} did not answer within {} ms; it was stopped",
                timeout.as_millis()
            ));
        }
    };
    answer(provider, &out)
}

/// Reads `from` to its end, keeping the first `limit` bytes.
async fn keep_start(mut from: impl tokio::io::AsyncRead + Unpin, limit: usize) -> Vec<u8> {
    let (mut kept, mut buf) = (Vec::new(), [0u8; 4096]);
    while let Ok(n @ 1..) = from.read(&mut buf).await {
        let room = limit.saturating_sub(kept.len());
        kept.extend_from_slice(&buf[..n.min(room)]);
    }
    kept
}

/// Checks a plugin's output as the kubelet does.
fn answer(provider: &Provider, out: &[u8]) -> Result<Answer, String> {
    let name = &provider.name;
    let bad = |why: String| format!("credential provider {name} answered badly: {why}");
    let response: Response = serde_json::from_slice(out)
        .map_err(|e| bad(format!("not a CredentialProviderResponse: {e}")))?;
    if response.kind != "CredentialProviderResponse" || response.api_version != PROTOCOL_API_VERSION
    {
        return Err(bad(format!(
            "apiVersion {:?} kind {:?}, expected {PROTOCOL_API_VERSION} \
             CredentialProviderResponse",
            response.api_version, response.kind
        )));
    }
    let key_type = match response.cache_key_type.as_str() {
        "Image" => KeyType::Image,
        "Registry" => KeyType::Registry,
        "Global" => KeyType::Global,
        other => {
            return Err(bad(format!(
                "cacheKeyType {other:?} is none of Image, Registry, Global"
            )));
        }
    };
    let cache_for = match &response.cache_duration {
        Some(text) => go_duration(text).map_err(|e| bad(format!("cacheDuration: {e}")))?,
        None => provider.default_cache_duration,
    };
    let mut auth = response
        .auth
        .into_iter()
        // An entry without a user or password is no credential.
        .filter(|(_, a)| !(a.username.is_empty() && a.password.is_empty()))
        .map(|(key, a)| {
            ImagePattern::parse(&key)
                .map(|pattern| (pattern, a.username, a.password))
                .map_err(|e| bad(format!("auth key: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    auth.sort_by(|a, b| b.0.as_str().cmp(a.0.as_str()));
    Ok(Answer {
        key_type,
        cache_for,
        auth,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(default_cache: Duration) -> Provider {
        Provider {
            name: "p".into(),
            program: "/nonexistent/p".into(),
            match_images: vec![ImagePattern::parse("*.example").unwrap()],
            default_cache_duration: default_cache,
            args: Vec::new(),
            env: Vec::new(),
        }
    }

    #[test]
    fn responses_are_checked_as_the_kubelet_checks_them() {
        let p = provider(Duration::from_secs(60));
        let ok = answer(
            &p,
            br#"{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderResponse","cacheKeyType":"Registry","auth":{"r.example":{"username":"a","password":"1"},"r.example/team":{"username":"b","password":"2"},"*.example":{"username":"c","password":"3"}}}"#,
        )
        .unwrap();
        assert_eq!(ok.cache_for, Duration::from_secs(60), "the default");
        let keys: Vec<&str> = ok.auth.iter().map(|(k, ..)| k.as_str()).collect();
        assert_eq!(keys, ["r.example/team", "r.example", "*.example"]);
        for (out, needle) in [
            (&br#"{"apiVersion":"credentialprovider.kubelet.k8s.io/v1beta1","kind":"CredentialProviderResponse","cacheKeyType":"Image"}"#[..], "expected credentialprovider.kubelet.k8s.io/v1"),
            (br#"{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderResponse"}"#, "cacheKeyType \"\""),
            (br#"{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderResponse","cacheKeyType":"Pod"}"#, "cacheKeyType \"Pod\""),
            (br#"{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderResponse","cacheKeyType":"Image","cacheDuration":"soon"}"#, "cacheDuration"),
            (br#"{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderResponse","cacheKeyType":"Image","auth":{"r[.example":{"username":"a","password":"b"}}}"#, "auth key"),
            (b"password: hunter2", "not a CredentialProviderResponse"),
        ] {
            let err = answer(&p, out).unwrap_err();
            assert!(err.contains(needle), "{needle:?} not in {err}");
        }
        let zero = answer(
            &p,
            br#"{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderResponse","cacheKeyType":"Global","cacheDuration":"0s"}"#,
        )
        .unwrap();
        assert!(zero.cache_for.is_zero() && zero.auth.is_empty());
    }

    #[test]
    fn a_cache_duration_past_gos_range_is_refused_not_added_to_the_clock() {
        let providers = CredentialProviders::new(vec![provider(Duration::from_secs(60))]);
        for (duration, kept) in [
            ("2562047h", true),
            ("2562048h", false),
            ("9223372036854775807s", false),
        ] {
            let out = format!(
                r#"{{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderResponse","cacheKeyType":"Global","cacheDuration":"{duration}","auth":{{"r.example":{{"username":"a","password":"1"}}}}}}"#
            );
            match answer(&providers.providers[0], out.as_bytes()) {
                Ok(answer) => {
                    assert!(kept, "{duration} was accepted");
                    providers.store(0, "r.example/app", &Arc::new(answer));
                    assert!(providers.cached(0, "r.example/app").is_some());
                }
                Err(why) => {
                    assert!(!kept, "{duration}: {why}");
                    assert!(why.contains("cacheDuration"), "{why}");
                }
            }
        }
    }

    #[test]
    fn the_registry_cache_key_is_the_first_segment() {
        assert_eq!(registry_of("r.example:5000/team/app"), "r.example:5000");
        assert_eq!(registry_of("localhost"), "localhost");
    }
}
