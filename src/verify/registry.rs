//! A small, read-only OCI distribution client: manifests, blobs and referrers, with token
//! authentication, per-request timeouts, and a count of every request sent.
//!
//! It answers "found", "not found" or "unavailable" so that the caller can tell an unsigned
//! image from an unreachable registry; a 404 is never mistaken for an outage or vice versa.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, AUTHORIZATION, HeaderMap, LOCATION, WWW_AUTHENTICATE};
use serde::Deserialize;
use sha2::Digest as _;

use super::RegistryOptions;

/// Manifest media types accepted when fetching signatures and referrer lists.
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
    application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json, \
    application/vnd.docker.distribution.manifest.list.v2+json";
const INDEX_ACCEPT: &str = "application/vnd.oci.image.index.v1+json";
/// Signature manifests and referrer indexes are a few KiB; anything this large is hostile.
const MAX_MANIFEST_BYTES: usize = 4 << 20;
const MAX_REDIRECTS: usize = 3;
/// How long a registry that lacks the referrers API is remembered as lacking it.
const NO_REFERRERS_API_TTL: Duration = Duration::from_secs(600);
/// Lifetime assumed for a token whose response gives none (the distribution spec's default).
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);

/// Credentials for one registry (`host[:port]`; `docker.io` also matches `index.docker.io`).
#[derive(Clone, PartialEq, Eq)]
pub struct RegistryCredential {
    pub registry: String,
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for RegistryCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryCredential")
            .field("registry", &self.registry)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// The result of one lookup.
#[derive(Debug)]
pub(super) enum Fetched<T> {
    Found(T),
    NotFound,
    Unavailable(String),
}

/// An OCI descriptor, with the fields signature discovery reads.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub artifact_type: Option<String>,
}

/// An image manifest or an index; only the lists signature discovery reads.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Manifest {
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
}

struct CachedToken {
    header: String,
    expires: Instant,
}

/// Shared across verifications: the connection pool, tokens and what registries support.
pub(super) struct RegistryClient {
    http: reqwest::Client,
    options: RegistryOptions,
    /// Tokens by registry, repository and who asked (a hash of the credential, empty for
    /// anonymous), so that one pod's pull secret never serves another pod.
    tokens: Mutex<HashMap<(String, String, String), CachedToken>>,
    no_referrers_api: Mutex<HashMap<String, Instant>>,
}

impl RegistryClient {
    pub fn new(options: RegistryOptions) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .connect_timeout(options.request_timeout)
            .timeout(options.request_timeout)
            // Redirects are followed by hand: each hop is counted, and credentials are never
            // sent on to another host (blob storage behind a registry).
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("fixity/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the registry HTTP client: {e}"))?;
        Ok(Self {
            http,
            options,
            tokens: Mutex::new(HashMap::new()),
            no_referrers_api: Mutex::new(HashMap::new()),
        })
    }

    /// A lookup context for one repository, counting its requests. `credentials` (the pod's
    /// pull secrets, say) take precedence over the configured ones.
    pub fn session<'a>(
        &'a self,
        registry: &str,
        repository: &str,
        credentials: &[RegistryCredential],
    ) -> Session<'a> {
        let insecure = self
            .options
            .insecure_registries
            .iter()
            .any(|r| r == registry);
        let host = if registry == "docker.io" {
            "registry-1.docker.io"
        } else {
            registry
        };
        let scheme = if insecure { "http" } else { "https" };
        let credential = credentials
            .iter()
            .chain(&self.options.credentials)
            .find(|c| normalize_registry(&c.registry) == registry)
            .cloned();
        Session {
            client: self,
            credential,
            registry: registry.to_owned(),
            repository: repository.to_owned(),
            base: format!("{scheme}://{host}"),
            insecure,
            requests: AtomicU32::new(0),
            unreachable: Mutex::new(None),
        }
    }
}

/// Canonical registry name of a credential key: `https://index.docker.io/v1/` is `docker.io`.
fn normalize_registry(key: &str) -> String {
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = key.split('/').next().unwrap_or(key);
    match host {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".to_owned(),
        other => other.to_owned(),
    }
}

/// Lookups in one repository.
pub(super) struct Session<'a> {
    client: &'a RegistryClient,
    credential: Option<RegistryCredential>,
    registry: String,
    repository: String,
    base: String,
    insecure: bool,
    requests: AtomicU32,
    /// Set when the registry could not be reached or timed out: later lookups of this session
    /// give up at once instead of spending the caller's deadline on the same dead host.
    unreachable: Mutex<Option<String>>,
}

enum Got {
    Body(Vec<u8>),
    NotFound,
    /// Any other client error, for callers that give it a meaning (a missing referrers API).
    OtherStatus(StatusCode),
}

impl Session<'_> {
    /// Requests sent so far, token requests and redirects included.
    pub fn requests(&self) -> u32 {
        self.requests.load(Ordering::Relaxed)
    }

    /// A manifest by tag or digest; by digest, the content must hash to it.
    pub async fn manifest(&self, reference: &str) -> Fetched<Manifest> {
        let path = format!("/v2/{}/manifests/{reference}", self.repository);
        match self.get(&path, MANIFEST_ACCEPT, MAX_MANIFEST_BYTES).await {
            Ok(Got::Body(body)) => {
                if reference.contains(':')
                    && let Err(e) = check_digest(reference, &body)
                {
                    return Fetched::Unavailable(e);
                }
                parse_manifest(&body, reference)
            }
            Ok(Got::NotFound) => Fetched::NotFound,
            Ok(Got::OtherStatus(s)) => Fetched::Unavailable(format!(
                "registry {} answered {s} for manifest {reference}",
                self.registry
            )),
            Err(e) => Fetched::Unavailable(e),
        }
    }

    /// A blob, checked against its digest.
    pub async fn blob(&self, digest: &str, limit: usize) -> Fetched<Vec<u8>> {
        let path = format!("/v2/{}/blobs/{digest}", self.repository);
        match self.get(&path, "*/*", limit).await {
            Ok(Got::Body(body)) => match check_digest(digest, &body) {
                Ok(()) => Fetched::Found(body),
                Err(e) => Fetched::Unavailable(e),
            },
            Ok(Got::NotFound) => Fetched::NotFound,
            Ok(Got::OtherStatus(s)) => Fetched::Unavailable(format!(
                "registry {} answered {s} for blob {digest}",
                self.registry
            )),
            Err(e) => Fetched::Unavailable(e),
        }
    }

    /// Referrers of `digest` through the OCI 1.1 referrers API, falling back to the
    /// `sha256-<hex>` referrers tag on registries without it.
    pub async fn referrers(&self, digest: &str, artifact_type: &str) -> Fetched<Manifest> {
        if !self.known_without_referrers_api() {
            let path = format!(
                "/v2/{}/referrers/{digest}?artifactType={}",
                self.repository,
                artifact_type.replace('+', "%2B")
            );
            match self.get(&path, INDEX_ACCEPT, MAX_MANIFEST_BYTES).await {
                Ok(Got::Body(body)) => return parse_manifest(&body, "referrers"),
                // The spec's signal for "no referrers API"; some registries use 400 or 405.
                Ok(Got::NotFound | Got::OtherStatus(_)) => self.remember_without_referrers_api(),
                Err(e) => return Fetched::Unavailable(e),
            }
        }
        self.manifest(&digest.replacen(':', "-", 1)).await
    }

    fn known_without_referrers_api(&self) -> bool {
        let mut map = lock(&self.client.no_referrers_api);
        match map.get(&self.registry) {
            Some(since) if since.elapsed() < NO_REFERRERS_API_TTL => true,
            Some(_) => {
                map.remove(&self.registry);
                false
            }
            None => false,
        }
    }

    fn remember_without_referrers_api(&self) {
        lock(&self.client.no_referrers_api).insert(self.registry.clone(), Instant::now());
    }

    async fn get(&self, path: &str, accept: &str, limit: usize) -> Result<Got, String> {
        if let Some(why) = lock(&self.unreachable).clone() {
            return Err(why);
        }
        let url = format!("{}{path}", self.base);
        let mut auth = self.cached_auth();
        let mut challenged = false;
        loop {
            let response = self.send(&url, accept, auth.as_deref()).await?;
            let status = response.status();
            if status == StatusCode::UNAUTHORIZED && !challenged {
                challenged = true;
                auth = Some(self.authenticate(response.headers()).await?);
                continue;
            }
            return match status {
                s if s.is_success() => read_limited(response, limit).await.map(Got::Body),
                StatusCode::NOT_FOUND => Ok(Got::NotFound),
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(format!(
                    "registry {} denied access to {} ({status})",
                    self.registry, self.repository
                )),
                s if s.is_server_error()
                    || s == StatusCode::TOO_MANY_REQUESTS
                    || s == StatusCode::REQUEST_TIMEOUT =>
                {
                    Err(format!("registry {} answered {s}", self.registry))
                }
                s => Ok(Got::OtherStatus(s)),
            };
        }
    }

    /// Sends one GET, following redirects by hand.
    async fn send(
        &self,
        url: &str,
        accept: &str,
        auth: Option<&str>,
    ) -> Result<reqwest::Response, String> {
        let mut url = reqwest::Url::parse(url).map_err(|e| format!("bad registry URL: {e}"))?;
        let origin = url.origin();
        for _ in 0..=MAX_REDIRECTS {
            let mut request = self.client.http.get(url.clone()).header(ACCEPT, accept);
            if let Some(auth) = auth
                && url.origin() == origin
            {
                request = request.header(AUTHORIZATION, auth);
            }
            self.requests.fetch_add(1, Ordering::Relaxed);
            let response = request.send().await.map_err(|e| self.transport_error(&e))?;
            if !response.status().is_redirection() {
                return Ok(response);
            }
            let location = response
                .headers()
                .get(LOCATION)
                .and_then(|l| l.to_str().ok())
                .ok_or_else(|| format!("registry {} redirected nowhere", self.registry))?;
            url = url
                .join(location)
                .map_err(|e| format!("registry {} redirected to a bad URL: {e}", self.registry))?;
        }
        Err(format!(
            "registry {} redirected too many times",
            self.registry
        ))
    }

    /// Describes a failed request, remembering the registry as unreachable when it is.
    fn transport_error(&self, e: &reqwest::Error) -> String {
        let why = self.describe(e);
        if e.is_timeout() || e.is_connect() {
            *lock(&self.unreachable) = Some(why.clone());
        }
        why
    }

    fn describe(&self, e: &reqwest::Error) -> String {
        let what = if e.is_timeout() {
            "timed out"
        } else if e.is_connect() {
            "cannot connect"
        } else {
            "request failed"
        };
        // The source chain says why (refused, reset, DNS); the URL is already known.
        let mut cause = String::new();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            cause = s.to_string();
            source = s.source();
        }
        format!("registry {}: {what}: {cause}", self.registry)
    }

    fn token_key(&self) -> (String, String, String) {
        let who = self.credential.as_ref().map_or_else(String::new, |c| {
            let mut hasher = sha2::Sha256::new();
            for part in [&c.username, &c.password] {
                hasher.update(part.len().to_le_bytes());
                hasher.update(part.as_bytes());
            }
            hex::encode(hasher.finalize())
        });
        (self.registry.clone(), self.repository.clone(), who)
    }

    fn cached_auth(&self) -> Option<String> {
        let tokens = lock(&self.client.tokens);
        tokens
            .get(&self.token_key())
            .filter(|t| t.expires > Instant::now())
            .map(|t| t.header.clone())
    }

    /// Answers a 401 challenge: basic credentials, or a bearer token from the realm.
    async fn authenticate(&self, headers: &HeaderMap) -> Result<String, String> {
        let challenge = headers
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                format!(
                    "registry {} asked for authentication without a challenge",
                    self.registry
                )
            })?;
        let (scheme, params) = parse_challenge(challenge);
        let basic = self.credential.as_ref().map(|c| {
            let raw = format!("{}:{}", c.username, c.password);
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(raw)
            )
        });
        let (header, lifetime) = if scheme.eq_ignore_ascii_case("basic") {
            let header = basic.ok_or_else(|| {
                format!(
                    "registry {} requires credentials and none are configured",
                    self.registry
                )
            })?;
            (header, Duration::from_secs(3600))
        } else if scheme.eq_ignore_ascii_case("bearer") {
            self.fetch_token(&params, basic.as_deref()).await?
        } else {
            return Err(format!(
                "registry {} uses an unsupported authentication scheme {scheme:?}",
                self.registry
            ));
        };
        lock(&self.client.tokens).insert(
            self.token_key(),
            CachedToken {
                header: header.clone(),
                expires: Instant::now() + lifetime,
            },
        );
        Ok(header)
    }

    async fn fetch_token(
        &self,
        params: &HashMap<String, String>,
        basic: Option<&str>,
    ) -> Result<(String, Duration), String> {
        #[derive(Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        let realm = params.get("realm").ok_or_else(|| {
            format!(
                "registry {} gave a token challenge without realm",
                self.registry
            )
        })?;
        let mut url = reqwest::Url::parse(realm)
            .map_err(|e| format!("registry {} gave a bad token realm: {e}", self.registry))?;
        if url.scheme() != "https" && !(self.insecure && url.scheme() == "http") {
            return Err(format!(
                "registry {} sent a token realm that is not HTTPS",
                self.registry
            ));
        }
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = params.get("service") {
                query.append_pair("service", service);
            }
            let scope = format!("repository:{}:pull", self.repository);
            query.append_pair("scope", &scope);
        }
        let mut request = self.client.http.get(url);
        if let Some(basic) = basic {
            request = request.header(AUTHORIZATION, basic);
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        let response = request.send().await.map_err(|e| self.transport_error(&e))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!(
                "registry {}: the token service answered {status}",
                self.registry
            ));
        }
        let body = read_limited(response, 1 << 20).await?;
        let parsed: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| format!("registry {}: unreadable token response: {e}", self.registry))?;
        let token = parsed.token.or(parsed.access_token).ok_or_else(|| {
            format!(
                "registry {}: the token response has no token",
                self.registry
            )
        })?;
        let lifetime = parsed
            .expires_in
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_TOKEN_LIFETIME);
        // Renew a little early so that a token never expires between check and use.
        let lifetime = lifetime.saturating_sub(Duration::from_secs(10));
        Ok((format!("Bearer {token}"), lifetime))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The maps hold only caches; a panic elsewhere leaves them usable.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn read_limited(mut response: reqwest::Response, limit: usize) -> Result<Vec<u8>, String> {
    if response
        .content_length()
        .is_some_and(|len| len > limit as u64)
    {
        return Err(format!("registry response larger than {limit} bytes"));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| format!("registry response cut short: {e}"))?
    {
        if body.len() + chunk.len() > limit {
            return Err(format!("registry response larger than {limit} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn parse_manifest(body: &[u8], what: &str) -> Fetched<Manifest> {
    match serde_json::from_slice(body) {
        Ok(m) => Fetched::Found(m),
        Err(e) => Fetched::Unavailable(format!("unreadable manifest {what}: {e}")),
    }
}

/// Checks content against its `algorithm:hex` digest.
pub(super) fn check_digest(digest: &str, content: &[u8]) -> Result<(), String> {
    let actual = match digest.split_once(':') {
        Some(("sha256", _)) => format!("sha256:{}", hex::encode(sha2::Sha256::digest(content))),
        Some(("sha512", _)) => format!("sha512:{}", hex::encode(sha2::Sha512::digest(content))),
        _ => return Err(format!("unsupported digest {digest}")),
    };
    if actual == digest {
        Ok(())
    } else {
        Err(format!("content of {digest} hashes to {actual}"))
    }
}

/// Splits `Bearer realm="…",service="…"` into the scheme and its parameters.
fn parse_challenge(header: &str) -> (String, HashMap<String, String>) {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    let mut params = HashMap::new();
    let mut rest = rest.trim_start();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let key = key.trim().to_ascii_lowercase();
        let (value, after) = if let Some(quoted) = after.strip_prefix('"') {
            match quoted.find('"') {
                Some(end) => (&quoted[..end], &quoted[end + 1..]),
                None => (quoted, ""),
            }
        } else {
            after.split_once(',').map_or((after, ""), |(v, a)| (v, a))
        };
        params.insert(key, value.trim().to_owned());
        rest = after.trim_start().trim_start_matches(',').trim_start();
    }
    (scheme.to_owned(), params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenge_parameters_may_hold_commas() {
        let (scheme, params) = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(scheme, "Bearer");
        assert_eq!(params["realm"], "https://auth.example/token");
        assert_eq!(params["service"], "registry.example");
        assert_eq!(params["scope"], "repository:a/b:pull,push");
        let (scheme, params) = parse_challenge(r#"Basic realm="Registry Realm""#);
        assert_eq!(scheme, "Basic");
        assert_eq!(params["realm"], "Registry Realm");
    }

    #[test]
    fn docker_hub_credential_keys_normalise() {
        for key in [
            "https://index.docker.io/v1/",
            "index.docker.io",
            "docker.io",
            "registry-1.docker.io",
        ] {
            assert_eq!(normalize_registry(key), "docker.io", "{key}");
        }
        assert_eq!(normalize_registry("ghcr.io"), "ghcr.io");
        assert_eq!(
            normalize_registry("http://127.0.0.1:5000"),
            "127.0.0.1:5000"
        );
    }

    #[test]
    fn content_must_match_its_digest() {
        let body = b"{}";
        let good = format!("sha256:{}", hex::encode(sha2::Sha256::digest(body)));
        assert_eq!(check_digest(&good, body), Ok(()));
        assert!(check_digest(&good, b"{ }").is_err());
        assert!(check_digest("md5:00", body).is_err());
    }
}
