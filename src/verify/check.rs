//! Decides whether one piece of evidence satisfies one authority.
//!
//! Every signature must name the image's digest. The evidence checks themselves are
//! sigstore-verify's: the signature over the payload or the DSSE envelope, the Rekor v1 signed
//! entry timestamp and inclusion proof, the Rekor v2 inclusion proof and signed checkpoint,
//! RFC 3161 timestamps against the trust root's TSAs, the certificate chain at every verified
//! time, the certificate's SCTs against the root's CT logs, and that each log entry describes
//! this very signature, certificate and artifact. fixity adds what it does not do:
//! - identities matched by regular expression (sigstore-verify matches exact strings), and the
//!   per-authority requirements of the policy (a timestamp, a log entry, no SCT);
//! - key signatures without any log or timestamp (air-gapped `cosign sign --key`), which
//!   sigstore-verify refuses as a bundle without signing-time evidence; the key is parsed by the
//!   `sigstore` crate, which also reads P-521 keys that sigstore-crypto does not;
//! - the validity of the issuing CA chain and of Rekor v2 log keys at the verified times (see
//!   `trust_root`).
//!
//! [`check_bundle`] checks a bundle independently of what its DSSE statement says, so that
//! attestations can reuse it.

use sha2::Digest as _;
use sigstore::crypto::{CosignVerificationKey, Signature};
use sigstore_verify::types::{
    Artifact, Bundle, DerPublicKey, KindVersion, SignatureContent,
    bundle::VerificationMaterialContent,
};
use sigstore_verify::{PublicKeyVerificationPolicy, VerificationPolicy, VerificationResult};

use super::evidence::{Evidence, Source, pem_blocks};
use super::trust_root::Root;
use super::{Authority, KeyRequirements, KeylessRequirements, Matcher, TrustRoot};

/// Explanations kept per verification; more would only flood a log line.
const MAX_EXPLANATIONS: usize = 16;

/// An authority with its key or trust root parsed.
pub(super) enum CompiledAuthority {
    Key {
        key: CosignVerificationKey,
        der: DerPublicKey,
        requirements: KeyRequirements,
        /// Only when the authority requires log or timestamp evidence.
        root: Option<Root>,
    },
    Keyless {
        issuer: Matcher,
        subject: Matcher,
        requirements: KeylessRequirements,
        root: Root,
    },
}

fn parse_root(trust_root: &TrustRoot) -> Result<Root, String> {
    match trust_root {
        TrustRoot::PublicGood => Root::public_good(),
        TrustRoot::Custom(json) => Root::parse(json),
    }
}

impl CompiledAuthority {
    pub fn compile(authority: &Authority) -> Result<Self, String> {
        match authority {
            Authority::Key {
                public_key_pem,
                requirements,
            } => {
                let key = CosignVerificationKey::try_from_pem(public_key_pem.as_bytes())
                    .map_err(|e| format!("unusable public key: {e}"))?;
                let der = pem_blocks(public_key_pem)?
                    .into_iter()
                    .next()
                    .ok_or("unusable public key: no PEM block")?;
                let root = if requirements.tlog || requirements.timestamp {
                    Some(parse_root(&requirements.trust_root)?)
                } else {
                    None
                };
                Ok(CompiledAuthority::Key {
                    key,
                    der: DerPublicKey::new(der),
                    requirements: requirements.clone(),
                    root,
                })
            }
            Authority::Keyless {
                issuer,
                subject,
                trust_root,
                requirements,
            } => {
                let root = parse_root(trust_root)?;
                root.require_keyless_material()?;
                Ok(CompiledAuthority::Keyless {
                    issuer: issuer.clone(),
                    subject: subject.clone(),
                    requirements: requirements.clone(),
                    root,
                })
            }
        }
    }
}

/// SHA-256 (hex) of the DER of a PEM public key.
pub(super) fn key_fingerprint(pem: &str) -> Option<String> {
    let der = pem_blocks(pem).ok()?.into_iter().next()?;
    Some(hex::encode(sha2::Sha256::digest(der)))
}

/// The authority that accepted a signature.
pub(super) struct Accepted {
    pub authority: usize,
    pub signer: Option<String>,
    /// The accepted evidence, as read: one item, or one per counted signature.
    pub evidence: Vec<Source>,
}

/// The first (evidence, authority) pair that verifies; every failure is explained in `tried`.
pub(super) fn first_accepted(
    items: &[Result<Evidence, String>],
    digest: &str,
    authorities: &[Authority],
    compiled: &[CompiledAuthority],
    tried: &mut Vec<String>,
) -> Option<Accepted> {
    for evidence in bound_evidence(items, digest, tried) {
        for (index, authority) in compiled.iter().enumerate() {
            match check(evidence, digest, authority) {
                Ok(checked) => {
                    return Some(Accepted {
                        authority: index,
                        signer: checked.signer,
                        evidence: vec![evidence.source.clone()],
                    });
                }
                Err(why) => explain(tried, rejected(evidence, &authorities[index], &why)),
            }
        }
    }
    None
}

fn rejected(evidence: &Evidence, authority: &Authority, why: &str) -> String {
    format!("{}: {}: {why}", evidence.origin, authority.describe())
}

/// What one verified signature established.
pub(super) struct Checked {
    /// The certificate's subject, for keyless authorities.
    pub signer: Option<String>,
    /// The certificate's OIDC issuer, for keyless authorities.
    pub issuer: Option<String>,
}

impl Checked {
    /// Who made the signature: the key for key authorities, the certificate's issuer and
    /// subject for keyless ones. Two signatures by one signer count as one.
    fn signer_id(&self, authority: &Authority) -> String {
        match (&self.issuer, &self.signer) {
            (Some(issuer), Some(subject)) => format!("{subject} (issuer {issuer})"),
            _ => authority.identity(),
        }
    }
}

/// Checks one piece of evidence, which names `digest`, against one authority; the keyless
/// signer's identity when it verifies.
pub(super) fn check(
    evidence: &Evidence,
    digest: &str,
    authority: &CompiledAuthority,
) -> Result<Checked, String> {
    let artifact = match &evidence.payload {
        Some(payload) => Artifact::from(payload.as_slice()),
        None => sha256_artifact(digest)?,
    };
    check_bundle(&evidence.bundle, artifact, evidence.signed(), authority)
}

/// Which distinct authorities have signed, by distinct signers, as evidence is judged: the
/// threshold of `minAuthorities`. Authorities with one identity form one group; a signer
/// counts for one group only, so one identity matched by two overlapping authorities, or one
/// key listed twice, is one signature, not two.
pub(super) struct Tally {
    /// The group of each authority (authorities with equal [`Authority::identity`]).
    groups: Vec<usize>,
    /// (group, signer, authority, evidence) for every accepted pair, each pair once.
    edges: Vec<(usize, String, usize, Source)>,
}

/// One counted signature of a [`Tally`].
pub(super) struct Match {
    pub authority: usize,
    pub signer: String,
    pub evidence: Source,
}

impl Tally {
    pub fn new(authorities: &[Authority]) -> Self {
        let mut identities: Vec<String> = Vec::new();
        let groups = authorities
            .iter()
            .map(|a| {
                let id = a.identity();
                identities.iter().position(|i| *i == id).unwrap_or_else(|| {
                    identities.push(id);
                    identities.len() - 1
                })
            })
            .collect();
        Self {
            groups,
            edges: Vec::new(),
        }
    }

    /// Checks every (evidence, authority) pair of `items`; every failure is explained in
    /// `tried`.
    pub fn judge(
        &mut self,
        items: &[Result<Evidence, String>],
        digest: &str,
        authorities: &[Authority],
        compiled: &[CompiledAuthority],
        tried: &mut Vec<String>,
    ) {
        for evidence in bound_evidence(items, digest, tried) {
            for (index, authority) in compiled.iter().enumerate() {
                match check(evidence, digest, authority) {
                    Ok(checked) => {
                        let signer = checked.signer_id(&authorities[index]);
                        let group = self.groups[index];
                        if !self
                            .edges
                            .iter()
                            .any(|(g, s, ..)| *g == group && *s == signer)
                        {
                            self.edges
                                .push((group, signer, index, evidence.source.clone()));
                        }
                    }
                    Err(why) => explain(tried, rejected(evidence, &authorities[index], &why)),
                }
            }
        }
    }

    /// The largest set of (authority, signer) pairs with no group and no signer twice, as
    /// indices of accepting authorities and their signers: a maximum bipartite matching, so
    /// that a signer accepted by two groups is counted where it leaves room for another.
    pub fn matched(&self) -> Vec<Match> {
        let mut signers: Vec<&str> = Vec::new();
        for (_, s, ..) in &self.edges {
            if !signers.contains(&s.as_str()) {
                signers.push(s);
            }
        }
        let groups = self.groups.iter().max().map_or(0, |g| g + 1);
        // owner[signer] = the edge index that holds it.
        let mut owner: Vec<Option<usize>> = vec![None; signers.len()];
        let signer_of = |edge: usize| {
            signers
                .iter()
                .position(|s| *s == self.edges[edge].1)
                .unwrap_or_default()
        };
        for group in 0..groups {
            let mut seen = vec![false; signers.len()];
            self.augment(group, &signer_of, &mut owner, &mut seen);
        }
        let mut out: Vec<Match> = owner
            .iter()
            .flatten()
            .map(|&edge| {
                let (_, signer, authority, evidence) = &self.edges[edge];
                Match {
                    authority: *authority,
                    signer: signer.clone(),
                    evidence: evidence.clone(),
                }
            })
            .collect();
        out.sort_by(|a, b| (a.authority, &a.signer).cmp(&(b.authority, &b.signer)));
        out
    }

    fn augment(
        &self,
        group: usize,
        signer_of: &impl Fn(usize) -> usize,
        owner: &mut [Option<usize>],
        seen: &mut [bool],
    ) -> bool {
        for (edge, _) in self.edges.iter().enumerate().filter(|(_, e)| e.0 == group) {
            let signer = signer_of(edge);
            if seen[signer] {
                continue;
            }
            seen[signer] = true;
            let free = match owner[signer] {
                None => true,
                Some(held) => self.augment(self.edges[held].0, signer_of, owner, seen),
            };
            if free {
                owner[signer] = Some(edge);
                return true;
            }
        }
        false
    }
}

fn explain(tried: &mut Vec<String>, why: String) {
    if tried.len() < MAX_EXPLANATIONS {
        tried.push(why);
    }
}

/// The evidence of `items` that names `digest`; the rest is explained in `tried`.
fn bound_evidence<'i>(
    items: &'i [Result<Evidence, String>],
    digest: &str,
    tried: &mut Vec<String>,
) -> Vec<&'i Evidence> {
    items
        .iter()
        .filter_map(|item| match item {
            Ok(evidence) if evidence.subject_digests.iter().any(|d| d == digest) => Some(evidence),
            Ok(evidence) => {
                // Digest binding: a valid signature of another image proves nothing about this one.
                explain(
                    tried,
                    format!(
                        "{}: signs {}, not {digest}",
                        evidence.origin,
                        evidence.subject_digests.join(", ")
                    ),
                );
                None
            }
            Err(why) => {
                explain(tried, why.clone());
                None
            }
        })
        .collect()
}

/// What a bundle's signature is checked against.
pub enum Subject<'a> {
    /// The artifact itself (for a DSSE envelope, a subject of its in-toto statement).
    Bytes(&'a [u8]),
    /// Only the artifact's SHA-256 digest, `sha256:<hex>`.
    Digest(&'a str),
}

/// Checks one Sigstore bundle (v0.1 to v0.3; a message signature, or a DSSE envelope whatever
/// its statement says) against `authority`: signature, log and timestamp evidence, and for
/// keyless authorities certificate and identity. Returns the keyless signer's identity.
pub fn verify_bundle(
    bundle_json: &str,
    subject: Subject<'_>,
    authority: &Authority,
) -> Result<Option<String>, String> {
    let compiled = CompiledAuthority::compile(authority)?;
    let bundle: Bundle = serde_json::from_str(bundle_json)
        .map_err(|e| format!("unreadable Sigstore bundle: {e}"))?;
    let (artifact, signed) = match (subject, &bundle.content) {
        (Subject::Digest(digest), _) => (sha256_artifact(digest)?, None),
        (Subject::Bytes(bytes), SignatureContent::MessageSignature(m)) => (
            Artifact::from(bytes),
            Some((bytes.to_vec(), m.signature.as_bytes())),
        ),
        (Subject::Bytes(bytes), SignatureContent::DsseEnvelope(e)) => (
            Artifact::from(bytes),
            Some((e.pae(), e.signature.sig.as_bytes())),
        ),
        _ => return Err("the bundle has no content it can verify".to_owned()),
    };
    check_bundle(&bundle, artifact, signed, &compiled).map(|c| c.signer)
}

/// An artifact known by its SHA-256 digest (`sha256:<hex>`), as a DSSE statement names it.
fn sha256_artifact(digest: &str) -> Result<Artifact<'static>, String> {
    let hex = digest
        .strip_prefix("sha256:")
        .ok_or_else(|| format!("Sigstore bundles bind sha256 digests, not {digest}"))?;
    sigstore_verify::types::Sha256Hash::from_hex(hex)
        .map(Artifact::from)
        .map_err(|e| format!("bad digest {digest}: {e}"))
}

/// Checks a bundle's signature and its log and timestamp evidence against `authority`.
/// `artifact` is what the signature binds (the payload of a message signature, or the
/// digest a DSSE statement names); `signed` is the signed bytes and signature, for key
/// authorities that need no evidence beyond them.
pub(super) fn check_bundle(
    bundle: &Bundle,
    artifact: Artifact<'_>,
    signed: Option<(Vec<u8>, &[u8])>,
    authority: &CompiledAuthority,
) -> Result<Checked, String> {
    match authority {
        CompiledAuthority::Key {
            key,
            der,
            requirements,
            root,
        } => {
            match root {
                // sigstore-verify checks the signature along with the evidence.
                Some(root) => check_key_evidence(bundle, artifact, der, requirements, root)?,
                None => {
                    let (bytes, signature) =
                        signed.ok_or("only the artifact's digest is known, not what was signed")?;
                    key.verify_signature(Signature::Raw(signature), &bytes)
                        .map_err(|_| "the signature does not verify with this key".to_owned())?;
                }
            }
            Ok(Checked {
                signer: None,
                issuer: None,
            })
        }
        CompiledAuthority::Keyless {
            issuer,
            subject,
            requirements,
            root,
        } => check_keyless(bundle, artifact, issuer, subject, requirements, root).map(
            |(issuer, signer)| Checked {
                signer: Some(signer),
                issuer: Some(issuer),
            },
        ),
    }
}

fn has_timestamp(bundle: &Bundle) -> bool {
    !bundle
        .verification_material
        .timestamp_verification_data
        .rfc3161_timestamps
        .is_empty()
}

/// A key authority that requires a log entry or a timestamp: the bundle as sigstore-verify
/// sees it with the authority's key.
fn check_key_evidence(
    bundle: &Bundle,
    artifact: Artifact<'_>,
    der: &DerPublicKey,
    requirements: &KeyRequirements,
    root: &Root,
) -> Result<(), String> {
    if requirements.tlog && bundle.verification_material.tlog_entries.is_empty() {
        return Err("the authority requires a transparency-log entry and there is none".to_owned());
    }
    if requirements.timestamp && !has_timestamp(bundle) {
        return Err("the authority requires an RFC 3161 timestamp and there is none".to_owned());
    }
    if !matches!(
        bundle.verification_material.content,
        VerificationMaterialContent::PublicKey(_)
    ) {
        return Err("signed with a certificate, not with a key".to_owned());
    }
    let mut policy = PublicKeyVerificationPolicy::new(der.clone());
    if !requirements.tlog {
        policy = policy.skip_tlog_unsafe();
    }
    let result = root
        .verifier
        .verify(artifact, bundle, &policy)
        .map_err(|e| e.to_string())?;
    if requirements.tlog {
        check_rekor_v2_keys(bundle, root, result.verified_timestamps())?;
    }
    Ok(())
}

fn check_keyless(
    bundle: &Bundle,
    artifact: Artifact<'_>,
    issuer: &Matcher,
    subject: &Matcher,
    requirements: &KeylessRequirements,
    root: &Root,
) -> Result<(String, String), String> {
    let leaf = bundle
        .signing_certificate()
        .ok_or("no certificate: signed with a key, not keyless")?
        .as_bytes()
        .to_vec();
    if bundle.verification_material.tlog_entries.is_empty() {
        return Err("no transparency-log entry".to_owned());
    }
    if requirements.timestamp && !has_timestamp(bundle) {
        return Err("the authority requires an RFC 3161 timestamp and there is none".to_owned());
    }
    let mut policy = VerificationPolicy::any_identity();
    if !requirements.sct {
        policy = policy.skip_sct();
    }
    let result: VerificationResult = root
        .verifier
        .verify(artifact, bundle, &policy)
        .map_err(|e| e.to_string())?;
    let times = result.verified_timestamps();
    root.issuer_chain_valid_at(&leaf, times)?;
    check_rekor_v2_keys(bundle, root, times)?;

    let cert_issuer = result
        .issuer()
        .ok_or("the certificate names no OIDC issuer")?;
    if !issuer.matches(cert_issuer) {
        return Err(format!("issuer {cert_issuer:?} does not match {issuer}"));
    }
    let identity = result
        .identity()
        .map(|i| i.as_str().to_owned())
        .ok_or("the certificate names no subject")?;
    if !subject.matches(&identity) {
        return Err(format!("subject {identity:?} does not match {subject}"));
    }
    Ok((cert_issuer.to_owned(), identity))
}

/// The checkpoint of every Rekor v2 entry must be signed by a log key the root trusted at the
/// verified times (sigstore-verify accepts any key whose window has started by now).
fn check_rekor_v2_keys(
    bundle: &Bundle,
    root: &Root,
    times: &[jiff::Timestamp],
) -> Result<(), String> {
    for entry in &bundle.verification_material.tlog_entries {
        if entry.kind_version != KindVersion::HashedRekordV002 {
            continue;
        }
        let proof = entry
            .inclusion_proof
            .as_ref()
            .ok_or("the Rekor v2 entry has no inclusion proof")?;
        root.checkpoint_signed_at(
            proof.checkpoint.envelope(),
            entry.log_id.key_id.as_bytes(),
            times,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broken_authorities_are_refused_up_front() {
        let key = Authority::Key {
            public_key_pem: "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n".into(),
            requirements: KeyRequirements::default(),
        };
        assert!(key.validate().is_err());
        let keyless = |trust_root| Authority::Keyless {
            issuer: Matcher::Exact("https://issuer.example".into()),
            subject: Matcher::Exact("me@example.com".into()),
            trust_root,
            requirements: KeylessRequirements::default(),
        };
        assert!(keyless(TrustRoot::Custom("{}".into())).validate().is_err());
        assert_eq!(keyless(TrustRoot::PublicGood).validate(), Ok(()));
    }
}
