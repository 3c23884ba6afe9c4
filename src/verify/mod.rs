//! Signature and attestation verification: did a trusted authority sign exactly the digest a
//! pod names, and attest what the policy asks of it (`attest`)?
//!
//! Signatures are discovered (`discover`) in the registry that holds the image, in both formats
//! cosign writes: the classic `sha256-<hex>.sig` tag (simple-signing payloads) and Sigstore
//! bundles attached as OCI 1.1 referrers, read through the referrers API or, on repositories
//! without it, through the `sha256-<hex>` referrers tag. Each signature is then checked against
//! the authorities in order; the first that accepts one wins.
//!
//! The `sigstore` crate supplies key parsing, signature algorithms and the Sigstore data types,
//! oci-client the OCI formats; registry access (`registry`) and the checks themselves (`check`)
//! live here so that a missing signature, an untrusted one and an unreachable registry stay
//! distinguishable. Only a registry that cannot be asked in time makes a check unavailable;
//! content that is refused, too large or malformed proves nothing, so the image is unverified.

pub mod attest;
pub mod cache;
mod check;
pub mod checker;
pub mod credentials;
mod discover;
mod evidence;
#[cfg(fuzzing)]
pub mod fuzzing;
mod registry;
pub mod store;
mod trust_root;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sha2::Digest as _;

use crate::image::ImageReference;

pub use attest::{AttestationCheck, AttestationRule};
pub use check::{Subject, verify_bundle};
pub use evidence::Source as EvidenceSource;
pub use registry::RegistryCredential;

use check::CompiledAuthority;
use evidence::Evidence;
use registry::RegistryClient;

/// What checking one image's signatures against one set of authorities found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignatureCheck {
    /// Signed at this digest by the authority described.
    Verified(String),
    /// No signature by a trusted authority, and why.
    Untrusted(String),
    /// The check could not be completed (registry down, slow, deadline passed).
    Unavailable(String),
}

impl SignatureCheck {
    /// Maps a verification result; only registry trouble counts as unavailable.
    pub fn from_result(result: &Result<Verified, VerifyError>) -> Self {
        match result {
            Ok(v) => SignatureCheck::Verified(v.description.clone()),
            Err(VerifyError::Unavailable(why)) => SignatureCheck::Unavailable(why.clone()),
            Err(e) => SignatureCheck::Untrusted(e.to_string()),
        }
    }
}

/// Names one signature check: the pinned image (`registry/repository@digest`) and the
/// fingerprint of the authorities it is checked against.
pub type SignatureKey = (String, u64);

/// What a request's verifications found: signature checks, and attestation checks keyed by the
/// pinned image and the attestation rule's fingerprint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verifications {
    pub signatures: HashMap<SignatureKey, SignatureCheck>,
    pub attestations: HashMap<SignatureKey, AttestationCheck>,
}

impl Verifications {
    pub fn new() -> Self {
        Self::default()
    }

    /// The signature check of `key`.
    pub fn get(&self, key: &SignatureKey) -> Option<&SignatureCheck> {
        self.signatures.get(key)
    }

    pub fn insert(&mut self, key: SignatureKey, check: SignatureCheck) -> Option<SignatureCheck> {
        self.signatures.insert(key, check)
    }

    /// Takes the signature check of `key` out.
    pub fn remove(&mut self, key: &SignatureKey) -> Option<SignatureCheck> {
        self.signatures.remove(key)
    }

    /// Checks held, of both kinds.
    pub fn len(&self) -> usize {
        self.signatures.len() + self.attestations.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl FromIterator<(SignatureKey, SignatureCheck)> for Verifications {
    fn from_iter<I: IntoIterator<Item = (SignatureKey, SignatureCheck)>>(iter: I) -> Self {
        Self {
            signatures: iter.into_iter().collect(),
            attestations: HashMap::new(),
        }
    }
}

impl<const N: usize> From<[(SignatureKey, SignatureCheck); N]> for Verifications {
    fn from(checks: [(SignatureKey, SignatureCheck); N]) -> Self {
        checks.into_iter().collect()
    }
}

/// Matches an identity string (a certificate issuer or subject).
#[derive(Debug, Clone)]
pub enum Matcher {
    Exact(String),
    Regex(regex::Regex),
    /// An identity template as written, before it is expanded for an image; it matches
    /// nothing, so an authority used without its expansion fails closed.
    Template(String),
}

impl Matcher {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            Matcher::Exact(expected) => expected == value,
            Matcher::Regex(re) => re.is_match(value),
            Matcher::Template(_) => false,
        }
    }
}

impl fmt::Display for Matcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Matcher::Exact(s) => write!(f, "{s:?}"),
            Matcher::Regex(re) => write!(f, "/{}/", re.as_str()),
            Matcher::Template(t) => write!(f, "template {t:?}"),
        }
    }
}

/// Where keyless certificates must chain to and which transparency logs, CT logs and
/// timestamp authorities are believed.
#[derive(Debug, Clone, Default)]
pub enum TrustRoot {
    /// Sigstore's public-good instance; its `trusted_root.json` is built into the binary.
    #[default]
    PublicGood,
    /// The content of a `trusted_root.json` for a private Sigstore or an air-gapped cluster.
    Custom(String),
}

/// One party whose signature is enough.
#[derive(Debug, Clone)]
pub enum Authority {
    /// A public key in PEM (ECDSA P-256/P-384/P-521, RSA, Ed25519).
    Key {
        public_key_pem: String,
        requirements: KeyRequirements,
    },
    /// A short-lived certificate issued to an identity, with transparency-log evidence.
    Keyless {
        issuer: Matcher,
        subject: Matcher,
        trust_root: TrustRoot,
        requirements: KeylessRequirements,
    },
}

/// What a key authority requires besides a valid signature; nothing by default, so that
/// air-gapped signing works.
#[derive(Debug, Clone, Default)]
pub struct KeyRequirements {
    /// A transparency-log entry that verifies and describes the signature.
    pub tlog: bool,
    /// An RFC 3161 timestamp from a TSA of the trust root.
    pub timestamp: bool,
    /// Where the log and TSA keys come from.
    pub trust_root: TrustRoot,
}

/// What a keyless authority requires besides a certificate, a log entry and a verified time.
#[derive(Debug, Clone)]
pub struct KeylessRequirements {
    /// An RFC 3161 timestamp (a Rekor v1 integrated time is not enough).
    pub timestamp: bool,
    /// SCTs of the certificate from a CT log of the trust root; off only for private
    /// instances without a CT log.
    pub sct: bool,
}

impl Default for KeylessRequirements {
    fn default() -> Self {
        Self {
            timestamp: false,
            sct: true,
        }
    }
}

impl Authority {
    /// Checks that the authority can be used (the key or trust root parses), so that a policy
    /// naming a broken one can be rejected when it is applied rather than when a pod arrives.
    pub fn validate(&self) -> Result<(), String> {
        CompiledAuthority::compile(self).map(|_| ())
    }

    /// What makes two authorities the same one, for `minAuthorities`: the key's fingerprint,
    /// or the issuer and subject matchers with the trust root. Requirements do not count: a
    /// key listed twice with different requirements is still one signer.
    pub fn identity(&self) -> String {
        match self {
            Authority::Key { public_key_pem, .. } => match check::key_fingerprint(public_key_pem) {
                Some(fp) => format!("key sha256:{fp}"),
                None => format!("key {public_key_pem}"),
            },
            Authority::Keyless {
                issuer,
                subject,
                trust_root,
                ..
            } => {
                let root = match trust_root {
                    TrustRoot::PublicGood => "public-good".to_owned(),
                    TrustRoot::Custom(json) => {
                        format!("sha256:{}", hex::encode(sha2::Sha256::digest(json)))
                    }
                };
                format!("keyless issuer={issuer} subject={subject} root={root}")
            }
        }
    }

    /// A short, log-friendly description.
    pub fn describe(&self) -> String {
        match self {
            Authority::Key { public_key_pem, .. } => match check::key_fingerprint(public_key_pem) {
                Some(fp) => format!("key sha256:{}", &fp[..16]),
                None => "key (unparsable)".to_owned(),
            },
            Authority::Keyless {
                issuer,
                subject,
                trust_root,
                ..
            } => {
                let root = match trust_root {
                    TrustRoot::PublicGood => "public-good",
                    TrustRoot::Custom(_) => "custom",
                };
                format!("keyless issuer={issuer} subject={subject} root={root}")
            }
        }
    }
}

/// How to reach registries.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// Registries (`host[:port]`, as in image references) reached over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// Credentials by registry; registries without an entry are accessed anonymously.
    pub credentials: Vec<RegistryCredential>,
    /// Token services on another origin that may receive a registry's credentials, as
    /// (registry, `https://host[:port]`); a registry's own origin always may, and Docker Hub's
    /// `https://auth.docker.io` is known.
    pub token_realms: Vec<(String, String)>,
    /// Budget for one HTTP request, connection included.
    pub request_timeout: Duration,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        Self {
            insecure_registries: Vec::new(),
            credentials: Vec::new(),
            token_realms: Vec::new(),
            request_timeout: Duration::from_secs(5),
        }
    }
}

/// Which signature format carried the accepted signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureFormat {
    /// A simple-signing layer under the cosign `sha256-<hex>.sig` tag.
    SignatureTag,
    /// A Sigstore bundle attached as an OCI referrer.
    Bundle,
}

/// A successful verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Index of the accepting authority in the slice given to [`Verifier::verify`].
    pub authority: usize,
    /// Its [`Authority::describe`] text.
    pub description: String,
    /// For keyless authorities, the certificate's subject that matched.
    pub signer: Option<String>,
    pub format: SignatureFormat,
    /// HTTP requests sent to the registry (token requests included).
    pub registry_requests: u32,
    /// The evidence that was accepted, as read, one item per counted signature (several under
    /// `minAuthorities`): what the evidence store keeps.
    pub evidence: Vec<EvidenceSource>,
}

/// Why an image is not verified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("the image reference {0} carries no digest; only pinned images can be verified")]
    NotPinned(String),
    #[error("no authorities were given")]
    NoAuthorities,
    #[error("authority {index} is unusable: {reason}")]
    InvalidAuthority { index: usize, reason: String },
    #[error("no signatures found for the image")]
    Unsigned,
    #[error("no signature is trusted: {}", tried.join("; "))]
    NoTrustedSignature { tried: Vec<String> },
    #[error("signatures could not be checked: {0}")]
    Unavailable(String),
    #[error(
        "{needed} distinct authorities must sign this digest and {} did{}{}",
        signed_by.len(),
        if signed_by.is_empty() { String::new() } else { format!(" ({})", signed_by.join("; ")) },
        if tried.is_empty() { String::new() } else { format!("; not trusted: {}", tried.join("; ")) }
    )]
    TooFewAuthorities {
        needed: usize,
        /// Who signed, as "authority, signer".
        signed_by: Vec<String>,
        tried: Vec<String>,
    },
}

/// Verifies images against authorities; holds the HTTP connection pool and registry tokens, so
/// one instance should serve the whole process.
pub struct Verifier {
    registry: RegistryClient,
}

impl Verifier {
    pub fn new(options: RegistryOptions) -> Result<Self, VerifyError> {
        let registry = RegistryClient::new(options).map_err(VerifyError::Unavailable)?;
        Ok(Self { registry })
    }

    /// Verifies `image` (which must carry a digest): Ok when any authority accepts a signature
    /// of exactly that digest.
    pub async fn verify(
        &self,
        image: &ImageReference,
        authorities: &[Authority],
    ) -> Result<Verified, VerifyError> {
        self.verify_with_credentials(image, authorities, &[]).await
    }

    /// As [`Verifier::verify`], reading the registry with `credentials` (a pod's pull secrets)
    /// in preference to the configured ones.
    pub async fn verify_with_credentials(
        &self,
        image: &ImageReference,
        authorities: &[Authority],
        credentials: &[RegistryCredential],
    ) -> Result<Verified, VerifyError> {
        self.verify_threshold(image, authorities, 1, credentials)
            .await
    }

    /// As [`Verifier::verify_with_credentials`], requiring `min` distinct authorities (see
    /// [`Authority::identity`]), each with a signature by a signer no other counted one used.
    pub async fn verify_threshold(
        &self,
        image: &ImageReference,
        authorities: &[Authority],
        min: usize,
        credentials: &[RegistryCredential],
    ) -> Result<Verified, VerifyError> {
        let digest = image
            .digest()
            .ok_or_else(|| VerifyError::NotPinned(image.to_string()))?
            .to_string();
        let session = self
            .registry
            .session(image.registry(), image.repository(), credentials);
        self.signatures(&session, image, &digest, authorities, min)
            .await
    }

    /// Checks `image` (which must carry a digest) for a signature by one of `authorities`, when
    /// given, and for each attestation rule, in one registry session: one referrers listing
    /// serves both. `now` is the time conditions see.
    pub async fn verify_image(
        &self,
        image: &ImageReference,
        authorities: Option<(&[Authority], usize)>,
        rules: &[Arc<AttestationRule>],
        credentials: &[RegistryCredential],
        now: SystemTime,
    ) -> ImageVerdict {
        let Some(digest) = image.digest().map(|d| d.to_string()) else {
            let why = VerifyError::NotPinned(image.to_string());
            return ImageVerdict {
                signature: authorities.map(|_| Err(why.clone())),
                attestations: rules
                    .iter()
                    .map(|_| AttestationCheck::Missing(why.to_string()))
                    .collect(),
                attestation_evidence: vec![None; rules.len()],
                registry_requests: 0,
            };
        };
        let session = self
            .registry
            .session(image.registry(), image.repository(), credentials);
        let signature = match authorities {
            Some((authorities, min)) => Some(
                self.signatures(&session, image, &digest, authorities, min)
                    .await,
            ),
            None => None,
        };
        let judged = if rules.is_empty() {
            Vec::new()
        } else {
            attestations(&session, image, &digest, rules, now).await
        };
        let (attestations, attestation_evidence) = judged.into_iter().unzip();
        ImageVerdict {
            signature,
            attestations,
            attestation_evidence,
            registry_requests: session.requests(),
        }
    }

    async fn signatures(
        &self,
        session: &registry::Session<'_>,
        image: &ImageReference,
        digest: &str,
        authorities: &[Authority],
        min: usize,
    ) -> Result<Verified, VerifyError> {
        if authorities.is_empty() {
            return Err(VerifyError::NoAuthorities);
        }
        let compiled = compile_all(authorities)?;

        let budget = discover::Budget::default();
        let mut outcome = Outcome::new(digest, authorities, &compiled, min);

        // The classic tag first: one manifest and one blob for most signed images, and the
        // bundle lookup is skipped whenever it already holds a trusted signature.
        let mut format = SignatureFormat::SignatureTag;
        if !discover::from_signature_tag(session, digest, &budget, &mut outcome).await {
            format = SignatureFormat::Bundle;
            discover::from_referrers(
                session,
                digest,
                discover::Wanted::Signatures,
                &budget,
                &mut outcome,
            )
            .await;
        }
        if let Some(accepted) = outcome.accepted {
            return Ok(Verified {
                authority: accepted.authority,
                description: outcome
                    .described
                    .unwrap_or_else(|| authorities[accepted.authority].describe()),
                signer: accepted.signer,
                format,
                registry_requests: session.requests(),
                evidence: accepted.evidence,
            });
        }
        tracing::debug!(image = %image, requests = session.requests(), "no trusted signature");
        outcome.into_error()
    }

    /// Checks evidence kept from an earlier verification (the evidence store) as if the
    /// registry had just served it: read again, bound to `image`'s digest, and checked against
    /// `authorities` as they are now, `min` of them distinct (as [`Verifier::verify_threshold`]).
    /// No registry is asked.
    pub fn verify_stored(
        &self,
        image: &ImageReference,
        authorities: &[Authority],
        min: usize,
        sources: &[EvidenceSource],
    ) -> Result<Verified, VerifyError> {
        let digest = image
            .digest()
            .ok_or_else(|| VerifyError::NotPinned(image.to_string()))?
            .to_string();
        if authorities.is_empty() {
            return Err(VerifyError::NoAuthorities);
        }
        let compiled = compile_all(authorities)?;
        let items: Vec<Result<Evidence, String>> =
            sources.iter().map(|s| s.read("stored evidence")).collect();
        let mut outcome = Outcome::new(&digest, authorities, &compiled, min);
        discover::Judge::judge(&mut outcome, &items);
        match outcome.accepted {
            Some(accepted) => Ok(Verified {
                authority: accepted.authority,
                description: outcome
                    .described
                    .unwrap_or_else(|| authorities[accepted.authority].describe()),
                signer: accepted.signer,
                format: match accepted.evidence.first() {
                    Some(EvidenceSource::Bundle(_)) => SignatureFormat::Bundle,
                    _ => SignatureFormat::SignatureTag,
                },
                registry_requests: 0,
                evidence: accepted.evidence,
            }),
            None => outcome.into_error(),
        }
    }

    /// Checks attestations kept from earlier verifications (the evidence store) for each of
    /// `rules` as if the registry had just served them: the same search a registry listing
    /// feeds (signature by a rule's authority, subject digest, predicate type) and the same
    /// conditions, at `now`. No registry is asked; a rule nothing stored satisfies is
    /// `Missing` or `ConditionFailed`, for the caller to ask the registry.
    pub async fn verify_stored_attestations(
        &self,
        image: &ImageReference,
        rules: &[Arc<AttestationRule>],
        sources: &[EvidenceSource],
        now: SystemTime,
    ) -> Vec<(AttestationCheck, Option<EvidenceSource>)> {
        let Some(digest) = image.digest().map(|d| d.to_string()) else {
            let why = VerifyError::NotPinned(image.to_string()).to_string();
            return vec![(AttestationCheck::Missing(why), None); rules.len()];
        };
        let mut search = attest::Search::new(&digest, rules);
        let items: Vec<Result<Evidence, String>> = sources
            .iter()
            .map(|s| s.read_attestation("stored evidence"))
            .collect();
        discover::Judge::judge(&mut search, &items);
        let mut results = vec![None; rules.len()];
        let open = vec![true; rules.len()];
        settle(&mut search, rules, &open, &mut results, image, &digest, now).await;
        conclude(results, &search)
    }
}

fn compile_all(authorities: &[Authority]) -> Result<Vec<CompiledAuthority>, VerifyError> {
    authorities
        .iter()
        .enumerate()
        .map(|(index, a)| {
            CompiledAuthority::compile(a)
                .map_err(|reason| VerifyError::InvalidAuthority { index, reason })
        })
        .collect()
}

impl<'a> Outcome<'a> {
    fn new(
        digest: &'a str,
        authorities: &'a [Authority],
        compiled: &'a [CompiledAuthority],
        min: usize,
    ) -> Self {
        Self {
            digest,
            authorities,
            compiled,
            tried: Vec::new(),
            found_any: false,
            unavailable: None,
            accepted: None,
            threshold: (min > 1).then(|| (min, check::Tally::new(authorities))),
            described: None,
        }
    }

    fn into_error(self) -> Result<Verified, VerifyError> {
        if let Some((needed, tally)) = &self.threshold {
            let matched = tally.matched();
            if self.unavailable.is_none() && (!matched.is_empty() || self.found_any) {
                return Err(VerifyError::TooFewAuthorities {
                    needed: *needed,
                    signed_by: matched
                        .iter()
                        .map(|m| signed_by(&self.authorities[m.authority], &m.signer))
                        .collect(),
                    tried: self.tried,
                });
            }
        }
        match self {
            Outcome {
                unavailable: Some(reason),
                ..
            } => Err(VerifyError::Unavailable(reason)),
            Outcome {
                found_any: false, ..
            } => Err(VerifyError::Unsigned),
            Outcome { tried, .. } => Err(VerifyError::NoTrustedSignature { tried }),
        }
    }
}

/// Looks for each rule's attestations, in the referrers first (cosign's format today), then under
/// the classic `.att` tag for the rules none of them satisfied.
async fn attestations(
    session: &registry::Session<'_>,
    image: &ImageReference,
    digest: &str,
    rules: &[Arc<AttestationRule>],
    now: SystemTime,
) -> Vec<attest::Judged> {
    let mut search = attest::Search::new(digest, rules);
    let mut results: Vec<Option<attest::Judged>> = vec![None; rules.len()];
    let budget = discover::Budget::default();
    for classic in [false, true] {
        let open = open_rules(&results);
        let types = search.types(&open);
        if types.is_empty() {
            break;
        }
        if classic {
            discover::from_attestation_tag(session, digest, &types, &budget, &mut search).await;
        } else {
            let wanted = discover::Wanted::Attestations(&types);
            discover::from_referrers(session, digest, wanted, &budget, &mut search).await;
        }
        settle(&mut search, rules, &open, &mut results, image, digest, now).await;
    }
    conclude(results, &search)
}

/// The rules not yet satisfied.
fn open_rules(results: &[Option<attest::Judged>]) -> Vec<bool> {
    results
        .iter()
        .map(|r| !matches!(r, Some((AttestationCheck::Satisfied { .. }, _))))
        .collect()
}

/// Holds the conditions of every `open` rule to the trusted attestations the search has
/// gathered for it since the last call. A rule keeps its first failure unless a later
/// attestation satisfies it.
async fn settle(
    search: &mut attest::Search<'_>,
    rules: &[Arc<AttestationRule>],
    open: &[bool],
    results: &mut [Option<attest::Judged>],
    image: &ImageReference,
    digest: &str,
    now: SystemTime,
) {
    let ready: Vec<usize> = (0..rules.len())
        .filter(|i| open[*i] && !search.trusted[*i].is_empty())
        .collect();
    let work: Vec<_> = ready
        .into_iter()
        .map(|i| {
            let trusted = std::mem::take(&mut search.trusted[i]);
            (i, rules[i].clone(), trusted, search.notes(i))
        })
        .collect();
    let subject = (
        image.registry().to_owned(),
        image.repository().to_owned(),
        digest.to_owned(),
    );
    for (i, judged) in attest::judge_elsewhere(work, subject, now).await {
        match (&results[i], judged) {
            (_, satisfied @ (AttestationCheck::Satisfied { .. }, _)) | (None, satisfied) => {
                results[i] = Some(satisfied);
            }
            _ => {}
        }
    }
}

/// Each rule's outcome once the search is over: satisfied, else unavailable when a lookup
/// could not complete, else its failure, else missing.
fn conclude(
    results: Vec<Option<attest::Judged>>,
    search: &attest::Search<'_>,
) -> Vec<attest::Judged> {
    results
        .into_iter()
        .enumerate()
        .map(|(i, result)| match (result, &search.unavailable) {
            (Some(satisfied @ (AttestationCheck::Satisfied { .. }, _)), _) => satisfied,
            (_, Some(why)) => (AttestationCheck::Unavailable(why.clone()), None),
            (Some(failed), None) => failed,
            (None, None) => (AttestationCheck::Missing(search.missing(i)), None),
        })
        .collect()
}

/// What checking one image found: its signature, when authorities were given, and each
/// attestation rule's outcome, in the order of the rules.
#[derive(Debug)]
pub struct ImageVerdict {
    pub signature: Option<Result<Verified, VerifyError>>,
    pub attestations: Vec<AttestationCheck>,
    /// For each satisfied rule, what the attestation that satisfied it was read from: what
    /// the evidence store keeps.
    pub attestation_evidence: Vec<Option<EvidenceSource>>,
    /// HTTP requests sent to the registry (token requests included).
    pub registry_requests: u32,
}

/// What the lookups have shown so far. Only a lookup that could not complete makes the result
/// unavailable; anything the registry answered, however useless, is an explanation.
struct Outcome<'a> {
    digest: &'a str,
    authorities: &'a [Authority],
    compiled: &'a [CompiledAuthority],
    tried: Vec<String>,
    found_any: bool,
    unavailable: Option<String>,
    accepted: Option<check::Accepted>,
    /// With `minAuthorities` above 1: how many, and who has signed so far.
    threshold: Option<(usize, check::Tally)>,
    /// The accepting authorities' descriptions, when several were needed.
    described: Option<String>,
}

impl discover::Judge for Outcome<'_> {
    fn judge(&mut self, items: &[Result<Evidence, String>]) -> bool {
        self.found_any |= !items.is_empty();
        if let Some((needed, tally)) = &mut self.threshold {
            tally.judge(
                items,
                self.digest,
                self.authorities,
                self.compiled,
                &mut self.tried,
            );
            let matched = tally.matched();
            if matched.len() < *needed {
                return false;
            }
            let mut described = Vec::new();
            let mut signers = Vec::new();
            let mut evidence = Vec::new();
            for m in &matched {
                described.push(self.authorities[m.authority].describe());
                signers.push(m.signer.clone());
                evidence.push(m.evidence.clone());
            }
            self.accepted = Some(check::Accepted {
                authority: matched[0].authority,
                signer: Some(signers.join(", ")),
                evidence,
            });
            self.described = Some(described.join(" + "));
            return true;
        }
        self.accepted = check::first_accepted(
            items,
            self.digest,
            self.authorities,
            self.compiled,
            &mut self.tried,
        );
        self.accepted.is_some()
    }

    fn note(&mut self, why: String) {
        self.found_any = true;
        // Both formats are looked up in the same repository: one refusal is said once. A note
        // sums up a whole listing (a refusal, entries left untried), so it goes before the
        // per-entry reasons: a message cut to fit the answer still says it.
        if !self.tried.contains(&why) {
            self.tried.insert(0, why);
        }
    }

    fn unavailable(&mut self, why: String) {
        self.unavailable.get_or_insert(why);
    }
}

/// "key sha256:…", or "keyless … by <subject> (issuer <issuer>)".
fn signed_by(authority: &Authority, signer: &str) -> String {
    if signer == authority.identity() {
        authority.describe()
    } else {
        format!("{} by {signer}", authority.describe())
    }
}

/// One-shot convenience: builds a [`Verifier`] and verifies one image.
pub async fn verify(
    image: &ImageReference,
    authorities: &[Authority],
    options: &RegistryOptions,
) -> Result<Verified, VerifyError> {
    Verifier::new(options.clone())?
        .verify(image, authorities)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verification_futures_can_move_between_threads() {
        fn assert_send_sync<T: Send + Sync>(_: &T) {}
        fn assert_send<T: Send>(_: &T) {}
        let verifier = Verifier::new(RegistryOptions::default()).expect("client");
        assert_send_sync(&verifier);
        let image = ImageReference::parse(&format!("ghcr.io/acme/app@sha256:{}", "0".repeat(64)))
            .expect("reference");
        assert_send(&verifier.verify(&image, &[]));
    }

    #[test]
    fn matchers_are_exact_or_anchored_by_their_pattern() {
        assert!(Matcher::Exact("a@b.c".into()).matches("a@b.c"));
        assert!(!Matcher::Exact("a@b.c".into()).matches("xa@b.c"));
        let re = Matcher::Regex(regex::Regex::new("^https://github.com/acme/").expect("regex"));
        assert!(re.matches("https://github.com/acme/app"));
        assert!(!re.matches("https://github.com/evil/acme/"));
    }
}
