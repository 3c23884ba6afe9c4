//! Attestations: signed in-toto statements about an image (SLSA provenance, a vulnerability
//! scan, an SBOM, or a type of one's own), found beside its signatures and held to a policy's
//! rules.
//!
//! An attestation counts for a rule only when all of these hold:
//! - its DSSE envelope's signature verifies against one of the rule's authorities, with the
//!   same evidence checks as signatures (`check`); an envelope nobody trusted signed, or whose
//!   signature is broken, counts as absent;
//! - its statement's `subject` names the digest the pod names; any other subject is ignored
//!   and said so;
//! - its `predicateType` is exactly the rule's (after cosign's shorthands are mapped): a
//!   signed attestation of another type never satisfies a rule;
//! - every condition of the rule holds on it.
//!
//! Several attestations of a type may be attached (a scan a day): one that is trusted and meets
//! every condition is enough. An image signature is never an attestation (its statement is
//! cosign's signing statement, refused as a rule's type), and an attestation is never a
//! signature (`discover` refuses it as one before fetching it).
//!
//! Conditions are evaluated after the signature is verified, on a thread of their own, from a
//! predicate of at most [`MAX_ATTESTATION_BYTES`]; see `conditions` for their cost bounds.

pub mod conditions;
mod reads;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sigstore_verify::types::SignatureContent;

use super::Authority;
use super::check::{self, CompiledAuthority};
use super::discover::Judge;
use super::evidence::{COSIGN_SIGN_PREDICATE, Evidence, Source};
use conditions::{Condition, Failure};

/// Largest attestation read (a bundle or a classic DSSE layer): scans and SBOMs of large
/// images run to a few MiB, and a hostile registry can serve a gigabyte.
pub const MAX_ATTESTATION_BYTES: usize = 4 << 20;
/// Explanations kept per rule.
const MAX_NOTES: usize = 16;

/// The predicate types cosign writes for its `--type` shorthands.
pub const SHORTHANDS: [(&str, &str); 10] = [
    ("slsaprovenance", "https://slsa.dev/provenance/v0.2"),
    ("slsaprovenance02", "https://slsa.dev/provenance/v0.2"),
    ("slsaprovenance1", "https://slsa.dev/provenance/v1"),
    ("spdx", "https://spdx.dev/Document"),
    ("spdxjson", "https://spdx.dev/Document"),
    ("cyclonedx", "https://cyclonedx.org/bom"),
    ("link", "https://in-toto.io/Link/v1"),
    ("vuln", "https://cosign.sigstore.dev/attestation/vuln/v1"),
    ("openvex", "https://openvex.dev/ns"),
    ("custom", "https://cosign.sigstore.dev/attestation/v1"),
];

/// The predicate type a policy names, as statements carry it: a shorthand mapped as cosign maps
/// it, or an absolute URI taken exactly as written.
pub fn predicate_type(written: &str) -> Result<String, String> {
    if let Some((_, uri)) = SHORTHANDS.iter().find(|(short, _)| *short == written) {
        return Ok((*uri).to_owned());
    }
    if written == COSIGN_SIGN_PREDICATE {
        return Err(format!(
            "{written} is cosign's image signature, not an attestation: require signatures with the rule's authorities"
        ));
    }
    match reqwest::Url::parse(written) {
        Ok(url) if !url.cannot_be_a_base() => Ok(written.to_owned()),
        _ => Err(format!(
            "predicateType {written:?} is neither an absolute URI nor one of {}",
            SHORTHANDS.map(|(s, _)| s).join(", ")
        )),
    }
}

/// One attestation a verify rule requires.
#[derive(Debug)]
pub struct AttestationRule {
    /// The rule's name, for messages.
    pub name: String,
    /// The exact predicate type (a URI).
    pub predicate_type: String,
    /// Any one of these must have signed it.
    pub authorities: Arc<[Authority]>,
    /// Where the evidence store keeps the attestation: its verify rule's fingerprint when it
    /// shares the rule's authorities (beside the rule's signatures), else its own
    /// authorities'.
    pub authorities_fingerprint: u64,
    /// How old a stored attestation may be and still satisfy the rule (its verify rule's
    /// `maxEvidenceAge`).
    pub max_evidence_age: Duration,
    /// All must hold on it.
    pub conditions: Vec<Condition>,
}

/// What checking one image for one attestation rule found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttestationCheck {
    /// A trusted attestation of the type meets every condition.
    Satisfied {
        /// The authority that signed it ([`Authority::describe`]).
        by: String,
        /// For keyless authorities, the certificate's subject.
        signer: Option<String>,
        /// Where it was found.
        origin: String,
        /// What else was found and passed over (another subject, an untrusted signer).
        notes: Vec<String>,
    },
    /// No trusted attestation of the type for this digest, and why.
    Missing(String),
    /// Trusted attestations of the type exist, and none meets the conditions: the first one's
    /// failure.
    ConditionFailed {
        signer: String,
        origin: String,
        failure: Failure,
    },
    /// The registry could not be asked in time.
    Unavailable(String),
}

impl AttestationCheck {
    /// A short word for metrics.
    pub fn result(&self) -> &'static str {
        match self {
            AttestationCheck::Satisfied { .. } => "satisfied",
            AttestationCheck::Missing(_) => "missing",
            AttestationCheck::ConditionFailed { .. } => "condition_failed",
            AttestationCheck::Unavailable(_) => "unavailable",
        }
    }
}

/// An attestation whose signature an authority of the rule accepted.
#[derive(Debug, Clone)]
pub(super) struct Trusted {
    /// The in-toto statement.
    payload: Vec<u8>,
    by: String,
    signer: Option<String>,
    origin: String,
    /// What it was read from: kept by the evidence store when it satisfies its rule.
    source: Source,
}

impl Trusted {
    fn signer(&self) -> String {
        self.signer.clone().unwrap_or_else(|| self.by.clone())
    }
}

/// What the lookups have shown so far, for every rule of one image.
pub(super) struct Search<'a> {
    digest: &'a str,
    rules: &'a [Arc<AttestationRule>],
    compiled: Vec<Vec<CompiledAuthority>>,
    /// Per rule: attestations signed by one of its authorities.
    pub trusted: Vec<Vec<Trusted>>,
    /// Per rule: why what was found does not count.
    tried: Vec<Vec<String>>,
    /// About the listings themselves, for every rule.
    notes: Vec<String>,
    /// Predicate types found that no rule asked for.
    other_types: BTreeSet<String>,
    pub unavailable: Option<String>,
}

impl<'a> Search<'a> {
    /// Prepares the rules' authorities; one that cannot be used is reported for its rule.
    pub fn new(digest: &'a str, rules: &'a [Arc<AttestationRule>]) -> Self {
        let mut tried = vec![Vec::new(); rules.len()];
        let compiled = rules
            .iter()
            .zip(tried.iter_mut())
            .map(|(rule, tried)| {
                rule.authorities
                    .iter()
                    .enumerate()
                    .filter_map(|(index, a)| match CompiledAuthority::compile(a) {
                        Ok(c) => Some(c),
                        Err(why) => {
                            tried.push(format!("authority {index} is unusable: {why}"));
                            None
                        }
                    })
                    .collect()
            })
            .collect();
        Self {
            digest,
            rules,
            compiled,
            trusted: vec![Vec::new(); rules.len()],
            tried,
            notes: Vec::new(),
            other_types: BTreeSet::new(),
            unavailable: None,
        }
    }

    /// The predicate types still to look for: those of rules without a trusted attestation
    /// that meets their conditions.
    pub fn types(&self, open: &[bool]) -> Vec<&'a str> {
        let mut types: Vec<&str> = self
            .rules
            .iter()
            .zip(open)
            .filter(|(_, open)| **open)
            .map(|(r, _)| r.predicate_type.as_str())
            .collect();
        types.sort_unstable();
        types.dedup();
        types
    }

    fn explain(&mut self, rule: usize, why: String) {
        if self.tried[rule].len() < MAX_NOTES && !self.tried[rule].contains(&why) {
            self.tried[rule].push(why);
        }
    }

    fn consider(&mut self, evidence: &Evidence) {
        let Some(kind) = evidence.predicate_type.as_deref() else {
            return;
        };
        let payload = match &evidence.bundle.content {
            SignatureContent::DsseEnvelope(envelope) => envelope.payload.as_bytes(),
            _ => return,
        };
        let mut wanted = false;
        for (index, rule) in self.rules.iter().enumerate() {
            if rule.predicate_type != kind {
                continue;
            }
            wanted = true;
            // Digest binding: an attestation about another image says nothing about this one.
            if !evidence.subject_digests.iter().any(|d| d == self.digest) {
                let subjects = evidence.subject_digests.join(", ");
                self.explain(
                    index,
                    format!(
                        "{}: ignored: its subject is {subjects}, not {}",
                        evidence.origin, self.digest
                    ),
                );
                continue;
            }
            let mut refusals = Vec::new();
            let accepted = self.compiled[index].iter().enumerate().find_map(|(i, a)| {
                match check::check(evidence, self.digest, a) {
                    Ok(checked) => Some((i, checked.signer)),
                    Err(why) => {
                        refusals.push(format!("{}: {why}", rule.authorities[i].describe()));
                        None
                    }
                }
            });
            match accepted {
                Some((i, signer)) => self.trusted[index].push(Trusted {
                    payload: payload.to_vec(),
                    by: rule.authorities[i].describe(),
                    signer,
                    origin: evidence.origin.clone(),
                    source: evidence.source.clone(),
                }),
                None => {
                    let why = if refusals.is_empty() {
                        "no usable authority".to_owned()
                    } else {
                        refusals.join("; ")
                    };
                    self.explain(
                        index,
                        format!(
                            "{}: not signed by a trusted authority: {why}",
                            evidence.origin
                        ),
                    );
                }
            }
        }
        if !wanted {
            self.other_types.insert(kind.to_owned());
        }
    }

    /// Why nothing counted for rule `index`.
    pub fn missing(&self, index: usize) -> String {
        let rule = &self.rules[index];
        let mut why = format!(
            "no trusted attestation of {} for {}",
            rule.predicate_type, self.digest
        );
        let mut details: Vec<String> = self.tried[index].clone();
        if !self.other_types.is_empty() {
            let found: Vec<&str> = self.other_types.iter().map(String::as_str).collect();
            details.push(format!("attestations of other types: {}", found.join(", ")));
        }
        details.extend(self.notes.iter().cloned());
        if !details.is_empty() {
            why.push_str(": ");
            why.push_str(&details.join("; "));
        }
        why
    }

    /// Explanations for a satisfied rule `index`: what was passed over.
    pub fn notes(&self, index: usize) -> Vec<String> {
        self.tried[index].clone()
    }
}

impl Judge for Search<'_> {
    fn judge(&mut self, items: &[Result<Evidence, String>]) -> bool {
        for item in items {
            match item {
                Ok(evidence) => self.consider(evidence),
                Err(why) => {
                    if self.notes.len() < MAX_NOTES {
                        self.notes.push(why.clone());
                    }
                }
            }
        }
        // Every attestation of the types is gathered: a later one may meet conditions an
        // earlier one fails.
        false
    }

    fn note(&mut self, why: String) {
        if self.notes.len() < MAX_NOTES && !self.notes.contains(&why) {
            self.notes.push(why);
        }
    }

    fn unavailable(&mut self, why: String) {
        self.unavailable.get_or_insert(why);
    }
}

/// One rule to judge: its index, the rule, its trusted attestations, and what was passed over.
pub(super) type Work = (usize, Arc<AttestationRule>, Vec<Trusted>, Vec<String>);

/// A rule's check, and for a satisfied one what the attestation that satisfied it was read
/// from.
pub(super) type Judged = (AttestationCheck, Option<Source>);

/// [`judge`] for each (rule index, rule, its trusted attestations, notes), on a thread with a
/// large stack (CEL evaluation recurses) so that no async worker waits on it. An evaluation
/// that cannot run is a failed condition, never a pass.
pub(super) async fn judge_elsewhere(
    work: Vec<Work>,
    image: (String, String, String),
    now: SystemTime,
) -> Vec<(usize, Judged)> {
    if work.is_empty() {
        return Vec::new();
    }
    let failed: Vec<(usize, String, String)> = work
        .iter()
        .map(|(i, _, trusted, _)| {
            let first = trusted.first();
            (
                *i,
                first.map(Trusted::signer).unwrap_or_default(),
                first.map(|t| t.origin.clone()).unwrap_or_default(),
            )
        })
        .collect();
    let judged = conditions::elsewhere(move || {
        let (registry, repository, digest) = &image;
        let subject = (registry.as_str(), repository.as_str(), digest.as_str());
        work.into_iter()
            .filter_map(|(i, rule, trusted, notes)| {
                judge(&rule, &trusted, subject, now, notes).map(|check| (i, check))
            })
            .collect()
    })
    .await;
    judged.unwrap_or_else(|error| {
        failed
            .into_iter()
            .map(|(i, signer, origin)| {
                let failure = Failure::Error {
                    message: "the conditions".to_owned(),
                    error: error.clone(),
                };
                let check = AttestationCheck::ConditionFailed {
                    signer,
                    origin,
                    failure,
                };
                (i, (check, None))
            })
            .collect()
    })
}

/// Holds `rule`'s conditions to its trusted attestations of the image
/// `(registry, repository, digest)` at `now`: the first that meets all of them (with what it
/// was read from), or the first failure. None when there is no trusted attestation.
pub(super) fn judge(
    rule: &AttestationRule,
    trusted: &[Trusted],
    image: (&str, &str, &str),
    now: SystemTime,
    notes: Vec<String>,
) -> Option<Judged> {
    let mut first_failure = None;
    let satisfied = |attestation: &Trusted, notes| {
        let check = AttestationCheck::Satisfied {
            by: attestation.by.clone(),
            signer: attestation.signer.clone(),
            origin: attestation.origin.clone(),
            notes,
        };
        Some((check, Some(attestation.source.clone())))
    };
    for attestation in trusted {
        // Without conditions, the predicate (an SBOM of megabytes) is never converted.
        if rule.conditions.is_empty() {
            return satisfied(attestation, notes);
        }
        let statement = serde_json::from_slice(&attestation.payload).map_err(|e| Failure::Error {
            message: "the statement".to_owned(),
            error: format!("the statement is not JSON: {e}"),
        });
        let failure = match statement
            .and_then(|statement| conditions::hold(&rule.conditions, statement, image, now))
        {
            Ok(()) => return satisfied(attestation, notes),
            Err(failure) => failure,
        };
        first_failure.get_or_insert(AttestationCheck::ConditionFailed {
            signer: attestation.signer(),
            origin: attestation.origin.clone(),
            failure,
        });
    }
    first_failure.map(|failed| (failed, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shorthands_map_as_cosign_maps_them_and_uris_stay_exact() {
        assert_eq!(
            predicate_type("slsaprovenance1").as_deref(),
            Ok("https://slsa.dev/provenance/v1")
        );
        assert_eq!(
            predicate_type("vuln").as_deref(),
            Ok("https://cosign.sigstore.dev/attestation/vuln/v1")
        );
        assert_eq!(
            predicate_type("https://example.com/Scan/V2").as_deref(),
            Ok("https://example.com/Scan/V2")
        );
        assert!(predicate_type("provenance").is_err());
        assert!(predicate_type("").is_err());
        assert!(
            predicate_type(COSIGN_SIGN_PREDICATE)
                .unwrap_err()
                .contains("not an attestation")
        );
    }
}
