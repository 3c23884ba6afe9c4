//! Read-only access to OCI registries for signature discovery: manifests, blobs and referrer
//! lists, with token authentication, limits that hold while a body streams, and a count of every
//! request sent.
//!
//! Every lookup ends in one of four answers, because they decide different things: found; not
//! found; refused, when the registry answered with something that proves nothing (too large,
//! malformed, a digest mismatch, access refused, a redirect loop); and unavailable, when the
//! registry could not be asked in time (no connection, a timeout, a reset, 5xx, 429, 408). Only
//! the last may let `onVerificationError: Allow` admit an image: anyone who can push junk next to
//! an image must not be able to turn "unsigned" into "unavailable".
//!
//! Checks of one image that run at once (its signature and its attestations, each with a session
//! of its own) share what they read: a referrers listing, a referrer manifest by digest, a token
//! exchange are asked once, and every session that wants them while one holds them gets the same
//! answer ([`Shared`]). What is shared is keyed by registry, repository and credential, so one
//! pod's pull secret never reads for another pod; it is the registry's raw answer, which each
//! check judges for itself; and it lives only as long as a session holds it, so the memory it
//! takes is what those sessions would hold anyway.
//!
//! Credentials go only to the registry they belong to (never after a redirect has left its
//! origin, and no challenge is answered that a redirected response on another origin sent) and
//! to a token service on the registry's own origin or one configured for it
//! ([`super::RegistryOptions::token_realms`]; Docker Hub's `auth.docker.io` is known). A token
//! service elsewhere is asked anonymously. Tokens are cached under the registry that challenged,
//! the repository, and who asked.
//!
//! The formats (manifest, index and descriptor types, media types) are oci-client's. The HTTP
//! exchange is our own, because oci-client 0.18's `Client` cannot keep what this module promises.
//! tests/oci_client.rs shows each point against the test registry of tests/common/hostile.rs:
//! - size limits: `pull_manifest_raw` (and `pull_referrers`) read the whole body with
//!   `Response::bytes()` before looking at it: a 100 MB manifest is read whole
//!   (`oci_client_reads_a_100_mb_manifest_whole`);
//! - request counts: once a registry has an entry in the client's auth store, anonymous
//!   included, each request is preceded by a `GET /v2/` ping, so a `.sig` verification costs 4
//!   requests instead of 2 (`oci_client_pings_the_registry_before_every_request`); and
//!   `pull_referrers` asks the referrers API again on every call, with no memory of a repository
//!   that lacks it;
//! - credentials per caller: the auth store keeps the first credentials a registry was used
//!   with and tokens are cached by registry, repository and operation only, so one pod's pull
//!   secret serves the next caller's anonymous lookup
//!   (`oci_client_lets_the_first_credentials_serve_later_anonymous_calls`);
//! - credentials to other hosts: basic credentials go to whatever token realm a challenge
//!   names, on any host (`oci_client_sends_basic_credentials_to_a_token_realm_on_any_host`);
//! - error classes: a 4xx with an OCI error body becomes `RegistryError` without its status, so
//!   a 403 cannot be told from a 429 (`oci_client_cannot_tell_a_refusal_from_a_rate_limit`), and
//!   the referrers tag fallback reads a 403 as an empty list
//!   (`oci_client_reads_a_refused_referrers_tag_as_no_referrers`).
//!
//! No single request could be handed over either: every request of the `Client` authenticates
//! through that auth store, and only blobs stream (`pull_blob_stream`). What is ours is what
//! those points need: one GET with redirects followed by hand, the 401 challenge and the token
//! request (challenges parsed by http-auth), the streaming limit, and the digest check.

use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use base64::Engine as _;
use oci_client::manifest::{
    IMAGE_MANIFEST_LIST_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE,
    OCI_IMAGE_MEDIA_TYPE, OciDescriptor, OciImageIndex, OciImageManifest,
};
use reqwest::header::{
    ACCEPT, AUTHORIZATION, HeaderMap, HeaderValue, LINK, LOCATION, RETRY_AFTER, WWW_AUTHENTICATE,
};
use reqwest::{StatusCode, Url};
use serde::Deserialize;
use sha2::Digest as _;
use tokio::sync::OnceCell;

use super::RegistryOptions;

const MAX_REDIRECTS: usize = 3;
/// Token responses are a few KiB.
const MAX_TOKEN_RESPONSE_BYTES: usize = 64 << 10;
/// How long a repository that lacks the referrers API is remembered as lacking it.
const NO_REFERRERS_API_TTL: Duration = Duration::from_secs(600);
/// Lifetime assumed for a token whose response gives none (the distribution spec's default).
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// Entries kept in each of the client's memories before expired ones are dropped.
const MEMORY_PRUNE_AT: usize = 4096;
/// Docker Hub names its token service on another host than the registry.
const DOCKER_HUB_TOKEN_REALM: (&str, &str) = ("docker.io", "https://auth.docker.io");

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
#[derive(Debug, Clone)]
pub(super) enum Fetched<T> {
    Found(T),
    NotFound,
    /// The registry answered, with something that is evidence of nothing.
    Refused(String),
    /// The registry could not be asked in time.
    Unavailable(String),
}

/// Why a request gave no usable answer.
#[derive(Clone)]
enum Failure {
    Refused(String),
    Unavailable(String),
}

impl<T> From<Failure> for Fetched<T> {
    fn from(failure: Failure) -> Self {
        match failure {
            Failure::Refused(why) => Fetched::Refused(why),
            Failure::Unavailable(why) => Fetched::Unavailable(why),
        }
    }
}

struct CachedToken {
    header: String,
    expires: Instant,
}

/// Shared across verifications: the connection pool, tokens and what repositories support.
pub(super) struct RegistryClient {
    http: reqwest::Client,
    options: RegistryOptions,
    manifest_accept: String,
    /// Tokens by registry, repository and who asked (a hash of the credential, empty for
    /// anonymous), so that one pod's pull secret never serves another pod.
    tokens: Mutex<HashMap<(String, String, String), CachedToken>>,
    /// Repositories (registry, repository) whose referrers endpoint answered 404, 400 or 405:
    /// one repository says nothing about its neighbours.
    no_referrers_api: Mutex<HashMap<(String, String), Instant>>,
    /// Referrers listings, by digest and artifact type, of the sessions alive.
    listings: Shared<Fetched<OciImageIndex>>,
    /// Manifests by digest and size limit (content-addressed, so never stale): the referrer
    /// manifests a signature check read serve the attestation check of the same image.
    manifests: Shared<Fetched<OciImageManifest>>,
    /// Token exchanges under way: sessions challenged at once ask the token service once.
    exchanges: Shared<Result<String, Failure>>,
}

/// Who shares an answer (registry, repository, the hash of the credential as in token keys)
/// and what it answers.
type SharedKey = ((String, String, String), String);

/// Answers that the sessions alive share: an entry lives while a session holds it, and a
/// lookup that finds one in flight waits for it instead of asking again. If the session asking
/// is dropped (its deadline passed), one of those waiting asks in its place.
struct Shared<T>(Mutex<HashMap<SharedKey, Weak<OnceCell<T>>>>);

impl<T> Default for Shared<T> {
    fn default() -> Self {
        Self(Mutex::new(HashMap::new()))
    }
}

impl<T> Shared<T> {
    fn cell(&self, key: SharedKey) -> Arc<OnceCell<T>> {
        let mut map = lock(&self.0);
        if let Some(cell) = map.get(&key).and_then(Weak::upgrade) {
            return cell;
        }
        if map.len() >= MEMORY_PRUNE_AT {
            map.retain(|_, cell| cell.strong_count() > 0);
        }
        let cell = Arc::new(OnceCell::new());
        map.insert(key, Arc::downgrade(&cell));
        cell
    }

    #[cfg(test)]
    fn alive(&self) -> usize {
        lock(&self.0)
            .values()
            .filter(|c| c.strong_count() > 0)
            .count()
    }
}

impl RegistryClient {
    pub fn new(options: RegistryOptions) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .connect_timeout(options.request_timeout)
            .timeout(options.request_timeout)
            // Redirects are followed by hand: each hop is counted, and credentials never leave
            // the registry's origin (blob storage behind a registry, or a hostile redirect).
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("fixity/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the registry HTTP client: {e}"))?;
        Ok(Self {
            http,
            options,
            manifest_accept: [
                OCI_IMAGE_MEDIA_TYPE,
                OCI_IMAGE_INDEX_MEDIA_TYPE,
                IMAGE_MANIFEST_MEDIA_TYPE,
                IMAGE_MANIFEST_LIST_MEDIA_TYPE,
            ]
            .join(", "),
            tokens: Mutex::new(HashMap::new()),
            no_referrers_api: Mutex::new(HashMap::new()),
            listings: Shared::default(),
            manifests: Shared::default(),
            exchanges: Shared::default(),
        })
    }

    /// A lookup context for one repository, counting its requests. `credentials` (the pod's
    /// pull secrets, say) take precedence over the configured ones. As the kubelet tries each
    /// credential it has for a registry until one pulls, a session whose credential the
    /// registry refuses goes on with the next one for that registry.
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
        let mut candidates: Vec<RegistryCredential> = Vec::new();
        for c in credentials.iter().chain(&self.options.credentials) {
            if normalize_registry(&c.registry) == registry && !candidates.contains(c) {
                candidates.push(c.clone());
            }
        }
        let base = Url::parse(&format!("{scheme}://{host}"))
            .map_err(|e| format!("registry {registry} is not a valid host: {e}"));
        Session {
            client: self,
            candidates,
            current: AtomicUsize::new(0),
            registry: registry.to_owned(),
            repository: repository.to_owned(),
            base,
            insecure,
            requests: AtomicU32::new(0),
            unreachable: Mutex::new(None),
            held: Mutex::new(Vec::new()),
        }
    }

    /// Whether `realm` may receive `registry`'s credentials although it is on another origin.
    fn trusted_realm(&self, registry: &str, realm: &Url) -> bool {
        std::iter::once((DOCKER_HUB_TOKEN_REALM.0, DOCKER_HUB_TOKEN_REALM.1))
            .chain(
                self.options
                    .token_realms
                    .iter()
                    .map(|(r, url)| (r.as_str(), url.as_str())),
            )
            .filter(|(r, _)| normalize_registry(r) == registry)
            .filter_map(|(_, url)| Url::parse(url).ok())
            .any(|url| url.origin() == realm.origin())
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
    /// The credentials for this registry, in the order they are tried; none: anonymous.
    candidates: Vec<RegistryCredential>,
    /// The candidate in use: the first, until the registry refuses it.
    current: AtomicUsize,
    registry: String,
    repository: String,
    /// `scheme://host[:port]` of the registry, or why there is none.
    base: Result<Url, String>,
    insecure: bool,
    requests: AtomicU32,
    /// Set when the registry could not be reached or timed out: later lookups of this session
    /// give up at once instead of spending the caller's deadline on the same dead host.
    unreachable: Mutex<Option<String>>,
    /// The shared answers (listings, manifests by digest) this session read, kept for its
    /// lifetime so that the session, and any other asking meanwhile, reads each once. At most
    /// [`MAX_HELD`].
    held: Mutex<Vec<Arc<dyn Any + Send + Sync>>>,
}

/// Shared answers one session keeps: a listing or two and the manifests it names, as many as
/// one verification may fetch.
const MAX_HELD: usize = 72;

/// Pages of a referrers list read at most (all within the listing's byte limit); a registry
/// that pages on past them is refused rather than followed forever.
const MAX_REFERRER_PAGES: usize = 8;

enum Answer {
    /// The body, and the response's `Link` header, if any.
    Body(Vec<u8>, Option<String>),
    NotFound,
    /// Any other client error, for callers that give it a meaning (a missing referrers API).
    OtherStatus(StatusCode),
}

/// A response, and whether every hop that led to it stayed on the registry's origin.
struct Hop {
    response: reqwest::Response,
    on_registry: bool,
}

impl Session<'_> {
    /// Requests sent so far, token requests and redirects included.
    pub fn requests(&self) -> u32 {
        self.requests.load(Ordering::Relaxed)
    }

    fn credential(&self) -> Option<&RegistryCredential> {
        self.candidates.get(self.current.load(Ordering::Acquire))
    }

    /// Moves on from candidate `tried`, which the registry refused; whether one is left to try
    /// (another lookup of this session may have moved on already).
    fn next_credential(&self, tried: usize) -> bool {
        if tried + 1 >= self.candidates.len() {
            return false;
        }
        let _ =
            self.current
                .compare_exchange(tried, tried + 1, Ordering::AcqRel, Ordering::Acquire);
        true
    }

    /// Said of a refusal after more than one credential was tried.
    fn tried_note(&self) -> String {
        match self.candidates.len() {
            0 | 1 => String::new(),
            n => format!(" (each of the {n} credentials for it was tried)"),
        }
    }

    /// An image manifest by tag or digest, at most `limit` bytes; by digest, the content must
    /// hash to it. `what` names it in explanations ("signature manifest").
    pub async fn image_manifest(
        &self,
        reference: &str,
        what: &str,
        limit: usize,
    ) -> Fetched<OciImageManifest> {
        if valid_digest(reference).is_err() {
            // A tag can move: read it each time.
            return self.fetch_image_manifest(reference, what, limit).await;
        }
        let fetch = self.fetch_image_manifest(reference, what, limit);
        let key = format!("{reference} {limit}");
        self.shared(&self.client.manifests, key, true, fetch).await
    }

    async fn fetch_image_manifest(
        &self,
        reference: &str,
        what: &str,
        limit: usize,
    ) -> Fetched<OciImageManifest> {
        let body = match self.manifest_bytes(reference, what, limit).await {
            Ok(Some(body)) => body,
            Ok(None) => return Fetched::NotFound,
            Err(failure) => return failure.into(),
        };
        read_manifest(&body, what, reference)
    }

    /// Referrers of `digest` of the given artifact type, through the OCI 1.1 referrers API (its
    /// pages followed, see [`Session::referrer_pages`]) or, for repositories without it, the
    /// `sha256-<hex>` referrers tag. Read once per session.
    pub async fn referrers(
        &self,
        digest: &str,
        artifact_type: &str,
        limit: usize,
    ) -> Fetched<OciImageIndex> {
        let fetch = self.list_referrers(digest, artifact_type, limit);
        let key = format!("{digest} {artifact_type} {limit}");
        self.shared(&self.client.listings, key, true, fetch).await
    }

    /// The answer of `fetch`, shared with the other sessions of this registry, repository and
    /// credential that ask for `what` while one holds it; this session holds it when `hold`.
    async fn shared<T: Send + Sync + Clone + 'static>(
        &self,
        answers: &Shared<T>,
        what: String,
        hold: bool,
        fetch: impl Future<Output = T>,
    ) -> T {
        let cell = answers.cell((self.token_key(), what));
        let answer = cell.get_or_init(|| fetch).await.clone();
        let mut held = lock(&self.held);
        if hold && held.len() < MAX_HELD {
            held.push(cell);
        }
        answer
    }

    async fn list_referrers(
        &self,
        digest: &str,
        artifact_type: &str,
        limit: usize,
    ) -> Fetched<OciImageIndex> {
        if !self.known_without_referrers_api() {
            let mut url = match self.url(&format!("/v2/{}/referrers/{digest}", self.repository)) {
                Ok(url) => url,
                Err(failure) => return failure.into(),
            };
            url.query_pairs_mut()
                .append_pair("artifactType", artifact_type);
            match self.referrer_pages(url, limit).await {
                Some(listed) => return listed,
                None => self.remember_without_referrers_api(),
            }
        }
        let tag = digest.replacen(':', "-", 1);
        match self.manifest_bytes(&tag, "referrers tag", limit).await {
            Ok(Some(body)) => parse_index(&body, &format!("referrers tag {tag}")),
            Ok(None) => Fetched::NotFound,
            Err(failure) => failure.into(),
        }
    }

    /// The referrers API's list from `url` on, with the pages its `Link: <...>; rel="next"`
    /// headers point to on the registry's own origin: at most [`MAX_REFERRER_PAGES`], and
    /// `limit` bytes in all. None when the first answer says the repository has no referrers
    /// API (the spec's 404; some registries answer 400 or 405). A later page that fails fails
    /// the listing: what it would have held is unknown.
    async fn referrer_pages(&self, mut url: Url, limit: usize) -> Option<Fetched<OciImageIndex>> {
        let mut listed: Option<OciImageIndex> = None;
        let mut left = limit;
        for page in 1..=MAX_REFERRER_PAGES {
            let what = if page == 1 {
                "referrers list".to_owned()
            } else {
                format!("page {page} of the referrers list")
            };
            let (body, link) = match self
                .get(url.clone(), OCI_IMAGE_INDEX_MEDIA_TYPE, &what, left)
                .await
            {
                Ok(Answer::Body(body, link)) => (body, link),
                Ok(Answer::NotFound | Answer::OtherStatus(_)) if page == 1 => return None,
                Ok(Answer::NotFound) => {
                    return Some(Fetched::Refused(format!(
                        "registry {}: {what} is not found",
                        self.registry
                    )));
                }
                Ok(Answer::OtherStatus(s)) => {
                    return Some(Fetched::Refused(format!(
                        "registry {} answered {s} for {what}",
                        self.registry
                    )));
                }
                Err(failure) => return Some(failure.into()),
            };
            left = left.saturating_sub(body.len());
            let index = match parse_index(&body, &what) {
                Fetched::Found(index) => index,
                other => return Some(other),
            };
            match &mut listed {
                Some(listed) => listed.manifests.extend(index.manifests),
                None => listed = Some(index),
            }
            match next_page(&url, link.as_deref()) {
                Ok(None) => return listed.map(Fetched::Found),
                Ok(Some(_)) if left == 0 => {
                    return Some(Fetched::Refused(format!(
                        "registry {}: the referrers list goes on past {} in all",
                        self.registry,
                        human_bytes(limit)
                    )));
                }
                Ok(Some(next)) => url = next,
                Err(why) => {
                    return Some(Fetched::Refused(format!(
                        "registry {}: {what}: {why}",
                        self.registry
                    )));
                }
            }
        }
        Some(Fetched::Refused(format!(
            "registry {}: the referrers list goes on past {MAX_REFERRER_PAGES} pages; no more \
             are read",
            self.registry
        )))
    }

    /// The blob a descriptor names, read only if it declares at most `limit` bytes, and only as
    /// many bytes as it declares; the content must hash to its digest.
    pub async fn blob(
        &self,
        descriptor: &OciDescriptor,
        what: &str,
        limit: usize,
    ) -> Fetched<Vec<u8>> {
        let digest = &descriptor.digest;
        let declared = match usize::try_from(descriptor.size) {
            Ok(size) if size <= limit => size,
            _ => {
                return Fetched::Refused(format!(
                    "{what} {} declares {} bytes, more than the {} limit",
                    short(digest),
                    descriptor.size,
                    human_bytes(limit)
                ));
            }
        };
        if let Err(why) = valid_digest(digest) {
            return Fetched::Refused(format!("{what}: {why}"));
        }
        let url = match self.url(&format!("/v2/{}/blobs/{digest}", self.repository)) {
            Ok(url) => url,
            Err(failure) => return failure.into(),
        };
        match self.get(url, "*/*", what, declared).await {
            Ok(Answer::Body(body, _)) => match check_digest(digest, &body) {
                Ok(()) => Fetched::Found(body),
                Err(e) => Fetched::Refused(format!("{what}: {e}")),
            },
            Ok(Answer::NotFound) => Fetched::NotFound,
            Ok(Answer::OtherStatus(s)) => Fetched::Refused(format!(
                "registry {} answered {s} for {what} {}",
                self.registry,
                short(digest)
            )),
            Err(failure) => failure.into(),
        }
    }

    /// The bytes of a manifest or index, `None` when there is none.
    async fn manifest_bytes(
        &self,
        reference: &str,
        what: &str,
        limit: usize,
    ) -> Result<Option<Vec<u8>>, Failure> {
        let by_digest = reference.contains(':');
        if by_digest {
            valid_digest(reference).map_err(|why| Failure::Refused(format!("{what}: {why}")))?;
        }
        let url = self.url(&format!("/v2/{}/manifests/{reference}", self.repository))?;
        match self
            .get(url, &self.client.manifest_accept, what, limit)
            .await?
        {
            Answer::Body(body, _) => {
                if by_digest {
                    check_digest(reference, &body)
                        .map_err(|e| Failure::Refused(format!("{what}: {e}")))?;
                }
                Ok(Some(body))
            }
            Answer::NotFound => Ok(None),
            Answer::OtherStatus(s) => Err(Failure::Refused(format!(
                "registry {} answered {s} for {what} {reference}",
                self.registry
            ))),
        }
    }

    fn url(&self, path: &str) -> Result<Url, Failure> {
        let base = self
            .base
            .as_ref()
            .map_err(|why| Failure::Refused(why.clone()))?;
        base.join(path)
            .map_err(|e| Failure::Refused(format!("bad registry path {path}: {e}")))
    }

    fn known_without_referrers_api(&self) -> bool {
        let mut map = lock(&self.client.no_referrers_api);
        let key = (self.registry.clone(), self.repository.clone());
        match map.get(&key) {
            Some(since) if since.elapsed() < NO_REFERRERS_API_TTL => true,
            Some(_) => {
                map.remove(&key);
                false
            }
            None => false,
        }
    }

    fn remember_without_referrers_api(&self) {
        let mut map = lock(&self.client.no_referrers_api);
        if map.len() >= MEMORY_PRUNE_AT {
            map.retain(|_, since| since.elapsed() < NO_REFERRERS_API_TTL);
        }
        map.insert(
            (self.registry.clone(), self.repository.clone()),
            Instant::now(),
        );
    }

    async fn get(
        &self,
        url: Url,
        accept: &str,
        what: &str,
        limit: usize,
    ) -> Result<Answer, Failure> {
        if let Some(why) = lock(&self.unreachable).clone() {
            return Err(Failure::Unavailable(why));
        }
        let mut tried = self.current.load(Ordering::Acquire);
        let mut auth = self.cached_auth();
        let mut challenged = false;
        loop {
            let hop = self.send(url.clone(), accept, auth.as_deref()).await?;
            let status = hop.response.status();
            if status == StatusCode::UNAUTHORIZED && !hop.on_registry {
                return Err(Failure::Refused(format!(
                    "registry {} redirected to {}, which asks for credentials; none are sent \
                     off the registry",
                    self.registry,
                    hop.response.url().origin().ascii_serialization()
                )));
            }
            let refused_credential = if status == StatusCode::UNAUTHORIZED && !challenged {
                challenged = true;
                match self.authenticate(hop.response.headers()).await {
                    Ok(header) => {
                        auth = Some(header);
                        continue;
                    }
                    Err(Failure::Refused(why)) => Some(why),
                    Err(failure) => return Err(failure),
                }
            } else {
                None
            };
            let refused = refused_credential.is_some()
                || matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN);
            if refused && self.next_credential(tried) {
                tried = self.current.load(Ordering::Acquire);
                auth = self.cached_auth();
                challenged = false;
                continue;
            }
            if let Some(why) = refused_credential {
                return Err(Failure::Refused(format!("{why}{}", self.tried_note())));
            }
            return match status {
                s if s.is_success() => {
                    let link = hop
                        .response
                        .headers()
                        .get(LINK)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    self.read_limited(hop.response, what, limit)
                        .await
                        .map(|body| Answer::Body(body, link))
                }
                StatusCode::NOT_FOUND => Ok(Answer::NotFound),
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(Failure::Refused(format!(
                    "registry {} refused access to {} ({}){}",
                    self.registry,
                    self.repository,
                    status.as_u16(),
                    self.tried_note()
                ))),
                s if s.is_server_error()
                    || s == StatusCode::TOO_MANY_REQUESTS
                    || s == StatusCode::REQUEST_TIMEOUT =>
                {
                    Err(Failure::Unavailable(format!(
                        "registry {} answered {s}{}",
                        self.registry,
                        retry_after(hop.response.headers())
                    )))
                }
                s => Ok(Answer::OtherStatus(s)),
            };
        }
    }

    /// Sends one GET, following redirects by hand. Once a hop leaves the registry's origin no
    /// credentials go with any later hop, even one that comes back.
    async fn send(&self, mut url: Url, accept: &str, auth: Option<&str>) -> Result<Hop, Failure> {
        let registry = url.origin();
        let mut left_registry = false;
        for _ in 0..=MAX_REDIRECTS {
            left_registry |= url.origin() != registry;
            let mut request = self.client.http.get(url.clone()).header(ACCEPT, accept);
            if let Some(auth) = auth
                && !left_registry
            {
                request = request.header(AUTHORIZATION, auth);
            }
            self.requests.fetch_add(1, Ordering::Relaxed);
            let response = request.send().await.map_err(|e| self.transport_error(&e))?;
            if !response.status().is_redirection() {
                return Ok(Hop {
                    response,
                    on_registry: !left_registry,
                });
            }
            let location = response
                .headers()
                .get(LOCATION)
                .and_then(|l| l.to_str().ok())
                .ok_or_else(|| {
                    Failure::Refused(format!(
                        "registry {} answered {} without a location",
                        self.registry,
                        response.status()
                    ))
                })?;
            url = url.join(location).map_err(|e| {
                Failure::Refused(format!(
                    "registry {} redirected to a bad URL: {e}",
                    self.registry
                ))
            })?;
            if !matches!(url.scheme(), "http" | "https") {
                return Err(Failure::Refused(format!(
                    "registry {} redirected to a {} URL",
                    self.registry,
                    url.scheme()
                )));
            }
        }
        Err(Failure::Refused(format!(
            "registry {} redirected more than {MAX_REDIRECTS} times",
            self.registry
        )))
    }

    /// Reads a body of at most `limit` bytes, counting while it streams.
    async fn read_limited(
        &self,
        mut response: reqwest::Response,
        what: &str,
        limit: usize,
    ) -> Result<Vec<u8>, Failure> {
        let too_large = || {
            Failure::Refused(format!(
                "{what} from registry {} is larger than {}",
                self.registry,
                human_bytes(limit)
            ))
        };
        if response
            .content_length()
            .is_some_and(|len| len > limit as u64)
        {
            return Err(too_large());
        }
        let announced = response.content_length().unwrap_or(0);
        let mut body = Vec::with_capacity(usize::try_from(announced).unwrap_or(0));
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| self.transport_error(&e))?
        {
            if body.len() + chunk.len() > limit {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// Describes a failed exchange, remembering the registry as unreachable when it is.
    fn transport_error(&self, e: &reqwest::Error) -> Failure {
        let what = if e.is_timeout() {
            "timed out"
        } else if e.is_connect() {
            "cannot connect"
        } else {
            "the exchange failed"
        };
        // The source chain says why (refused, reset, DNS); the URL is already known.
        let mut cause = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            cause = s.to_string();
            source = s.source();
        }
        let why = format!("registry {}: {what}: {cause}", self.registry);
        if e.is_timeout() || e.is_connect() {
            *lock(&self.unreachable) = Some(why.clone());
        }
        Failure::Unavailable(why)
    }

    fn token_key(&self) -> (String, String, String) {
        let who = self.credential().map_or_else(String::new, |c| {
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

    /// Answers a 401 challenge from the registry, once for the sessions challenged at once.
    async fn authenticate(&self, headers: &HeaderMap) -> Result<String, Failure> {
        let exchange = self.exchange(headers);
        self.shared(&self.client.exchanges, String::new(), false, exchange)
            .await
    }

    /// Answers a 401 challenge: basic credentials, or a bearer token.
    async fn exchange(&self, headers: &HeaderMap) -> Result<String, Failure> {
        let refused = |why: &str| Failure::Refused(format!("registry {} {why}", self.registry));
        let values: Vec<&str> = headers
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        if values.is_empty() {
            return Err(refused("asked for authentication without a challenge"));
        }
        let basic = self.credential().map(|c| {
            let raw = format!("{}:{}", c.username, c.password);
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(raw)
            )
        });
        let (header, lifetime) = match read_challenges(&values).map_err(|e| refused(&e))? {
            Challenge::Bearer(params) => self.fetch_token(&params, basic).await?,
            Challenge::Basic => {
                let header =
                    basic.ok_or_else(|| refused("requires credentials and none are configured"))?;
                (header, Duration::from_secs(3600))
            }
        };
        let mut tokens = lock(&self.client.tokens);
        if tokens.len() >= MEMORY_PRUNE_AT {
            let now = Instant::now();
            tokens.retain(|_, t| t.expires > now);
        }
        tokens.insert(
            self.token_key(),
            CachedToken {
                header: header.clone(),
                expires: Instant::now() + lifetime,
            },
        );
        Ok(header)
    }

    /// Asks the token service a bearer challenge names. Credentials go with the request only
    /// when the service is on the registry's own origin or configured for it.
    async fn fetch_token(
        &self,
        params: &BTreeMap<String, String>,
        basic: Option<String>,
    ) -> Result<(String, Duration), Failure> {
        let refused = |why: String| Failure::Refused(format!("registry {}: {why}", self.registry));
        let realm = params
            .get("realm")
            .ok_or_else(|| refused("a token challenge without realm".to_owned()))?;
        let mut url =
            Url::parse(realm).map_err(|e| refused(format!("a bad token realm {realm:?}: {e}")))?;
        if url.scheme() != "https" && !(self.insecure && url.scheme() == "http") {
            return Err(refused(format!("the token realm {realm} is not HTTPS")));
        }
        let own_origin = self.base.as_ref().is_ok_and(|b| b.origin() == url.origin());
        let trusted = own_origin || self.client.trusted_realm(&self.registry, &url);
        let withheld = basic.is_some() && !trusted;
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = params.get("service") {
                query.append_pair("service", service);
            }
            query.append_pair("scope", &format!("repository:{}:pull", self.repository));
        }
        let service = url.origin().ascii_serialization();
        let mut request = self.client.http.get(url);
        if let Some(basic) = basic.filter(|_| trusted) {
            request = request.header(AUTHORIZATION, basic);
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        let response = request.send().await.map_err(|e| self.transport_error(&e))?;
        let status = response.status();
        if status.is_server_error()
            || status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::REQUEST_TIMEOUT
        {
            return Err(Failure::Unavailable(format!(
                "registry {}: the token service {service} answered {status}{}",
                self.registry,
                retry_after(response.headers())
            )));
        }
        if !status.is_success() {
            let note = if withheld {
                format!(
                    "; the credentials for {} were not sent to it, as it is on another host \
                     (--registry-token-realm names a token service that may have them)",
                    self.registry
                )
            } else {
                String::new()
            };
            return Err(refused(format!(
                "the token service {service} refused ({}){note}",
                status.as_u16()
            )));
        }
        let body = self
            .read_limited(response, "token response", MAX_TOKEN_RESPONSE_BYTES)
            .await?;
        read_token(&body).map_err(refused)
    }
}

/// What a 401 asks for, from its `WWW-Authenticate` values.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Challenge {
    /// A bearer token, from the service these parameters (names lowercased) name.
    Bearer(BTreeMap<String, String>),
    Basic,
}

/// Reads the challenges of a 401 (as RFC 7235 writes them); a bearer challenge wins over basic.
pub(super) fn read_challenges(values: &[&str]) -> Result<Challenge, String> {
    let mut challenges = Vec::new();
    for value in values {
        challenges.extend(
            http_auth::parse_challenges(value)
                .map_err(|e| format!("sent an unreadable challenge: {e}"))?,
        );
    }
    let scheme = |name: &str| {
        challenges
            .iter()
            .find(|c| c.scheme.eq_ignore_ascii_case(name))
    };
    if let Some(bearer) = scheme("bearer") {
        Ok(Challenge::Bearer(
            bearer
                .params
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.to_unescaped()))
                .collect(),
        ))
    } else if scheme("basic").is_some() {
        Ok(Challenge::Basic)
    } else {
        Err(format!(
            "uses an unsupported authentication scheme {:?}",
            challenges.first().map_or("", |c| c.scheme)
        ))
    }
}

/// A token service's answer: the `Authorization` header to send, and how long it serves.
pub(super) fn read_token(body: &[u8]) -> Result<(String, Duration), String> {
    #[derive(Deserialize)]
    struct TokenResponse {
        token: Option<String>,
        access_token: Option<String>,
        expires_in: Option<u64>,
    }
    let parsed: TokenResponse =
        serde_json::from_slice(body).map_err(|e| format!("an unreadable token response: {e}"))?;
    let token = parsed
        .token
        .or(parsed.access_token)
        .ok_or_else(|| "a token response without a token".to_owned())?;
    // A token no header can carry (a line break, a control byte) would fail in the HTTP
    // client, which looks like an unreachable registry; it is a malformed answer.
    let header = format!("Bearer {token}");
    if HeaderValue::from_str(&header).is_err() {
        return Err("a token response whose token cannot be sent in a header".to_owned());
    }
    let lifetime = parsed
        .expires_in
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_TOKEN_LIFETIME);
    // Renew a little early so that a token never expires between check and use.
    let lifetime = lifetime.saturating_sub(Duration::from_secs(10));
    Ok((header, lifetime))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The maps hold only caches; a panic elsewhere leaves them usable.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// An image manifest as the registry sent it: `what` and `reference` name it in explanations.
pub(super) fn read_manifest(body: &[u8], what: &str, reference: &str) -> Fetched<OciImageManifest> {
    match serde_json::from_slice::<OciImageManifest>(body) {
        Ok(m) if m.schema_version != 2 => Fetched::Refused(format!(
            "{what} {reference} has schema version {}, not 2",
            m.schema_version
        )),
        Ok(m) => match m.media_type.as_deref() {
            None | Some(OCI_IMAGE_MEDIA_TYPE | IMAGE_MANIFEST_MEDIA_TYPE) => Fetched::Found(m),
            Some(other) => Fetched::Refused(format!(
                "{what} {reference} has media type {other:?}, not an image manifest"
            )),
        },
        Err(e) => Fetched::Refused(format!("{what} {reference} is unreadable: {e}")),
    }
}

/// An image index (a referrers list or the referrers tag) as the registry sent it.
pub(super) fn parse_index(body: &[u8], what: &str) -> Fetched<OciImageIndex> {
    match serde_json::from_slice::<OciImageIndex>(body) {
        Ok(i) if i.schema_version != 2 => Fetched::Refused(format!(
            "{what} has schema version {}, not 2",
            i.schema_version
        )),
        Ok(i) => match i.media_type.as_deref() {
            None | Some(OCI_IMAGE_INDEX_MEDIA_TYPE | IMAGE_MANIFEST_LIST_MEDIA_TYPE) => {
                Fetched::Found(i)
            }
            Some(other) => {
                Fetched::Refused(format!("{what} has media type {other:?}, not an index"))
            }
        },
        Err(e) => Fetched::Refused(format!("{what} is unreadable: {e}")),
    }
}

/// The `rel="next"` target of a `Link` header, resolved against `current`; a page on another
/// origin is refused (credentials would go with the request).
fn next_page(current: &Url, link: Option<&str>) -> Result<Option<Url>, String> {
    let Some(link) = link else {
        return Ok(None);
    };
    let links = parse_link_header::parse(link)
        .map_err(|e| format!("an unreadable Link header {link:?}: {e:?}"))?;
    let Some(next) = links.get(&Some("next".to_owned())) else {
        return Ok(None);
    };
    let url = current
        .join(&next.raw_uri)
        .map_err(|e| format!("a next page {:?} that is no URL: {e}", next.raw_uri))?;
    if url.origin() != current.origin() {
        return Err(format!(
            "its next page is on another host ({}), which fixity does not follow",
            url.origin().ascii_serialization()
        ));
    }
    Ok(Some(url))
}

/// ` (Retry-After: 30)` when the registry said when to come back.
fn retry_after(headers: &HeaderMap) -> String {
    headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(|v| format!(" (Retry-After: {})", v.chars().take(40).collect::<String>()))
        .unwrap_or_default()
}

/// `1 MiB`, `64 KiB` or `100 bytes`.
pub(super) fn human_bytes(n: usize) -> String {
    if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{} MiB", n >> 20)
    } else if n >= 1 << 10 && n.is_multiple_of(1 << 10) {
        format!("{} KiB", n >> 10)
    } else {
        format!("{n} bytes")
    }
}

/// A digest as it may appear in a request path: a known algorithm and lowercase hex of its
/// length. Anything else from a registry's listing is not fetched.
pub(super) fn valid_digest(digest: &str) -> Result<(), String> {
    let hex_len = match digest.split_once(':') {
        Some(("sha256", hex)) => (hex, 64),
        Some(("sha512", hex)) => (hex, 128),
        _ => return Err(format!("unsupported digest {:?}", short(digest))),
    };
    let (hex, len) = hex_len;
    if hex.len() == len && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(())
    } else {
        Err(format!("malformed digest {:?}", short(digest)))
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

/// The first 19 characters of a digest (`sha256:` and 12 hex), for explanations.
pub(super) fn short(digest: &str) -> &str {
    digest.get(..19).unwrap_or(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shared answer is found again only under its own key, and only while someone holds it.
    #[test]
    fn shared_answers_live_with_their_holders_and_stay_with_their_key() {
        let shared: Shared<u32> = Shared::default();
        let who = |c: &str| {
            (
                ("r.example".into(), "app".into(), c.to_owned()),
                "x".to_owned(),
            )
        };
        let held = shared.cell(who("robot"));
        assert!(held.set(1).is_ok());
        assert_eq!(shared.cell(who("robot")).get(), Some(&1));
        assert_eq!(
            shared.cell(who("")).get(),
            None,
            "another credential reads for itself"
        );
        assert_eq!(shared.alive(), 1);
        drop(held);
        assert_eq!(shared.alive(), 0);
        assert_eq!(
            shared.cell(who("robot")).get(),
            None,
            "gone with its last holder"
        );
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
    fn a_token_no_header_can_carry_is_refused() {
        let (header, lifetime) = read_token(br#"{"token":"abc","expires_in":70}"#).expect("token");
        assert_eq!(
            (header.as_str(), lifetime),
            ("Bearer abc", Duration::from_secs(60))
        );
        for body in [
            r#"{"token":"a\nX-Injected: 1"}"#,
            r#"{"access_token":"a\rb"}"#,
            r#"{"token":"\u0000"}"#,
            r#"{"token":"\u007f"}"#,
        ] {
            let refused = read_token(body.as_bytes()).expect_err(body);
            assert!(refused.contains("cannot be sent"), "{refused}");
        }
    }

    #[test]
    fn content_must_match_its_digest() {
        let body = b"{}";
        let good = format!("sha256:{}", hex::encode(sha2::Sha256::digest(body)));
        assert_eq!(check_digest(&good, body), Ok(()));
        assert!(check_digest(&good, b"{ }").is_err());
        assert!(check_digest("md5:00", body).is_err());
    }

    #[test]
    fn only_well_formed_digests_reach_a_request_path() {
        assert_eq!(valid_digest(&format!("sha256:{}", "a".repeat(64))), Ok(()));
        assert_eq!(valid_digest(&format!("sha512:{}", "0".repeat(128))), Ok(()));
        for bad in [
            format!("sha256:{}", "A".repeat(64)),
            format!("sha256:{}", "a".repeat(63)),
            format!("sha256:{}/../../x", "a".repeat(64)),
            "sha256:".to_owned(),
            "md5:00".to_owned(),
            "latest".to_owned(),
        ] {
            assert!(valid_digest(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human_bytes(1 << 20), "1 MiB");
        assert_eq!(human_bytes(4 << 20), "4 MiB");
        assert_eq!(human_bytes(64 << 10), "64 KiB");
        assert_eq!(human_bytes(1000), "1000 bytes");
    }

    #[test]
    fn docker_hub_and_configured_token_services_are_trusted_for_their_registry_only() {
        let client = RegistryClient::new(RegistryOptions {
            token_realms: vec![(
                "registry.gitlab.com".to_owned(),
                "https://gitlab.com".to_owned(),
            )],
            ..RegistryOptions::default()
        })
        .expect("client");
        let url = |s: &str| Url::parse(s).expect("url");
        assert!(client.trusted_realm("docker.io", &url("https://auth.docker.io/token")));
        assert!(!client.trusted_realm("ghcr.io", &url("https://auth.docker.io/token")));
        assert!(client.trusted_realm("registry.gitlab.com", &url("https://gitlab.com/jwt/auth")));
        assert!(!client.trusted_realm("registry.gitlab.com", &url("http://gitlab.com/jwt/auth")));
        assert!(!client.trusted_realm("registry.gitlab.com", &url("https://evil.example/")));
    }
}
