//! From an inventory to results: each workload's images (its template's and those of the pods
//! it runs, each distinct set once) go through the evaluator the webhook uses
//! (`policy::evaluate`), with signatures from the webhook's own checker and cache; what the
//! pods run is compared with what they pin (drift), and pods someone entered are flagged.
//! One result per (workload, policy, rule): pass, fail (Enforce) or warn (Audit).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::runtime::Handle;
use tokio::sync::{Mutex, Semaphore};

use super::drift;
use super::inventory::{Inventory, ObjectRef, Workload};
use super::taint::{self, Replacements, Taint};
use crate::audit;
use crate::policy::evaluate::{ImageUse, signature_requests};
use crate::policy::store::Labels;
use crate::policy::{CompiledPolicy, Intent, Mode, Outcome, Reason, Subject, Violation, evaluate};
use crate::verify::checker::{CheckRequest, SignatureChecker};
use crate::verify::credentials::pull_secrets::PullSecrets;
use crate::verify::{RegistryCredential, SignatureCheck, SignatureKey, Verifications};

/// Longest message of one result: reports are bounded in bytes, and image names come from
/// the workload.
const MAX_MESSAGE: usize = 1024;
/// Messages named in one result before the rest are counted.
const MESSAGES_SHOWN: usize = 3;

/// What a result is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rule {
    /// Digests required, references valid.
    ImageReference,
    AllowedRegistries,
    Signatures,
    /// Running digests equal to pinned ones.
    Drift,
    /// Nobody entered a pod through exec or attach.
    Tainted,
}

impl Rule {
    pub const ALL: [Rule; 5] = [
        Rule::ImageReference,
        Rule::AllowedRegistries,
        Rule::Signatures,
        Rule::Drift,
        Rule::Tainted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rule::ImageReference => "image-reference",
            Rule::AllowedRegistries => "allowed-registries",
            Rule::Signatures => "signatures",
            Rule::Drift => "drift",
            Rule::Tainted => "tainted",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Rule::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// How much a failure matters, in the report's terms.
    pub fn severity(self) -> &'static str {
        match self {
            Rule::Signatures | Rule::Drift | Rule::Tainted => "high",
            Rule::ImageReference | Rule::AllowedRegistries => "medium",
        }
    }

    fn of(reason: Reason) -> Self {
        match reason {
            Reason::RegistryNotAllowed => Rule::AllowedRegistries,
            Reason::UnsignedImage | Reason::VerificationUnavailable => Rule::Signatures,
            _ => Rule::ImageReference,
        }
    }

    fn passed(self) -> &'static str {
        match self {
            Rule::ImageReference => "every image is pinned by a valid digest",
            Rule::AllowedRegistries => "every image comes from an allowed registry",
            Rule::Signatures => "every image the policy covers is signed by a trusted authority",
            Rule::Drift => "every container runs the digest its spec pins",
            Rule::Tainted => "no pod was entered",
        }
    }
}

/// A result's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verdict {
    Fail,
    Warn,
    Pass,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "fail",
            Verdict::Warn => "warn",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Verdict::Fail, Verdict::Warn, Verdict::Pass]
            .into_iter()
            .find(|v| v.as_str() == s)
    }

    fn of_mode(mode: Mode) -> Self {
        match mode {
            Mode::Enforce => Verdict::Fail,
            Mode::Audit => Verdict::Warn,
        }
    }
}

/// One result: a workload, a policy, a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub workload: ObjectRef,
    pub policy: String,
    pub mode: Mode,
    pub rule: Rule,
    pub verdict: Verdict,
    /// Distinct reason codes, the main one first; empty for a pass.
    pub reasons: Vec<&'static str>,
    pub message: String,
    pub properties: BTreeMap<String, String>,
}

/// How the scan may use registries: a bound on concurrent signature checks that reach a
/// registry and on how many start per second. Cached answers wait for neither.
#[derive(Debug, Clone, Copy)]
pub struct RegistryLimits {
    pub concurrency: usize,
    pub per_second: f64,
}

/// Counts of one scan's signature checks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CheckCounts {
    /// Distinct (image, authorities, credentials) checks the workloads needed.
    pub distinct: usize,
    /// Of those, answered from the cache.
    pub cached: usize,
}

/// What a scan reads besides the inventory.
pub struct Judge<'a> {
    pub policies: &'a [CompiledPolicy],
    pub labels: &'a (dyn Fn(&str) -> Option<Arc<Labels>> + Sync),
    pub checker: Option<&'a Arc<SignatureChecker>>,
    /// The runtime that runs signature checks which reach a registry: the webhook's, when the
    /// scan runs on a runtime of its own, so the checker's connections, its coalesced
    /// verifications and its background work stay with the runtime that serves reviews (and
    /// drives them) rather than on the scan's thread. `None`: on the caller's runtime.
    pub checks_on: Option<&'a Handle>,
    pub pull_secrets: Option<&'a PullSecrets>,
    pub limits: RegistryLimits,
    /// Where evictions of tainted pods stand (the Lease holder's replacer).
    pub replacements: Option<&'a Replacements>,
}

/// One workload, ready to evaluate.
struct Planned<'w> {
    workload: &'w Workload,
    labels: Option<Arc<Labels>>,
    /// Distinct image sets: the template's, then each pod's that differs.
    sets: Vec<Vec<ImageUse>>,
    credentials: usize,
}

type CheckKey = (SignatureKey, usize);

impl Judge<'_> {
    /// Every result for every workload of `inventory`.
    pub async fn run(&self, inventory: &Inventory) -> (Vec<Finding>, CheckCounts) {
        let mut credential_sets: Vec<Arc<[RegistryCredential]>> = vec![Arc::from(Vec::new())];
        let mut planned = Vec::with_capacity(inventory.workloads.len());
        let mut checks: HashMap<CheckKey, CheckRequest> = HashMap::new();
        for workload in &inventory.workloads {
            let labels = (self.labels)(&workload.object.namespace);
            let sets = image_sets(workload);
            let mut needed = Vec::new();
            for set in &sets {
                let subject = subject(&workload.object.namespace, labels.as_deref());
                let intent = Intent::Workload {
                    images: set.clone(),
                };
                for r in signature_requests(self.policies, &subject, &intent) {
                    needed.push(r);
                }
            }
            let credentials = match (self.pull_secrets, needed.is_empty()) {
                (Some(secrets), false) => {
                    let named: Vec<(String, String)> = self
                        .policies
                        .iter()
                        .flat_map(|p| p.pull_secrets.iter().cloned())
                        .collect();
                    let found = secrets.resolve(&workload.pull, &named).await;
                    match credential_sets.iter().position(|c| **c == *found) {
                        Some(i) => i,
                        None => {
                            credential_sets.push(found.into());
                            credential_sets.len() - 1
                        }
                    }
                }
                _ => 0,
            };
            for r in needed {
                // The shortest maxEvidenceAge of the rules needing it, as for a review.
                let age = r.max_evidence_age;
                checks
                    .entry((r.key.clone(), credentials))
                    .and_modify(|c| c.max_evidence_age = c.max_evidence_age.min(age))
                    .or_insert(CheckRequest {
                        key: r.key,
                        image: r.image,
                        authorities: r.authorities,
                        min_authorities: r.min_authorities,
                        max_evidence_age: age,
                    });
            }
            planned.push(Planned {
                workload,
                labels,
                sets,
                credentials,
            });
        }
        let (results, counts) = self.check(checks, &credential_sets).await;
        let mut findings = Vec::new();
        for p in &planned {
            let verifications: Verifications = results
                .iter()
                .filter(|((_, c), _)| *c == p.credentials)
                .map(|((key, _), check)| (key.clone(), check.clone()))
                .collect();
            findings.extend(self.judge(p, &verifications));
        }
        (findings, counts)
    }

    /// Runs the distinct signature checks: cached answers at once, the rest through the
    /// concurrency and rate bounds, then the checker (which coalesces with the webhook's own).
    async fn check(
        &self,
        checks: HashMap<CheckKey, CheckRequest>,
        credential_sets: &[Arc<[RegistryCredential]>],
    ) -> (HashMap<CheckKey, SignatureCheck>, CheckCounts) {
        let mut counts = CheckCounts {
            distinct: checks.len(),
            cached: 0,
        };
        let Some(checker) = self.checker else {
            let unavailable = checks
                .into_keys()
                .map(|k| {
                    let why = "signature verification is not configured".to_owned();
                    (k, SignatureCheck::Unavailable(why))
                })
                .collect();
            return (unavailable, counts);
        };
        let mut results = HashMap::new();
        let mut pending = Vec::new();
        for (key, request) in checks {
            match checker.cached(&key.0, &credential_sets[key.1]) {
                Some(found) => {
                    counts.cached += 1;
                    results.insert(key, found);
                }
                None => pending.push((key, request)),
            }
        }
        let concurrency = self.limits.concurrency.max(1);
        let permits = Semaphore::new(concurrency);
        let pace = Mutex::new(pacer(self.limits.per_second));
        let checked: Vec<(CheckKey, SignatureCheck)> = futures::stream::iter(pending)
            .map(|(key, request)| {
                let (permits, pace) = (&permits, &pace);
                let credentials = credential_sets[key.1].to_vec();
                async move {
                    let _permit = permits.acquire().await;
                    if let Some(pace) = pace.lock().await.as_mut() {
                        pace.tick().await;
                    }
                    let checker = Arc::clone(checker);
                    let work =
                        async move { checker.check([request], credentials).await.verifications };
                    let found = match self.checks_on {
                        Some(runtime) => runtime.spawn(work).await.map_err(|e| e.to_string()),
                        None => Ok(work.await),
                    };
                    let check = match found {
                        Ok(mut found) => found.remove(&key.0).unwrap_or_else(|| {
                            SignatureCheck::Unavailable("the check returned no answer".to_owned())
                        }),
                        Err(e) => SignatureCheck::Unavailable(format!("the check stopped: {e}")),
                    };
                    (key, check)
                }
            })
            .buffer_unordered(concurrency)
            .collect()
            .await;
        results.extend(checked);
        (results, counts)
    }

    fn judge(&self, p: &Planned<'_>, verifications: &Verifications) -> Vec<Finding> {
        let w = p.workload;
        let namespace = &w.object.namespace;
        let subject = subject(namespace, p.labels.as_deref());
        let mut violations: Vec<Violation> = Vec::new();
        for set in &p.sets {
            let intent = Intent::Workload {
                images: set.clone(),
            };
            for v in evaluate(self.policies, &subject, &intent, verifications).violations {
                let seen = violations.iter().any(|o| {
                    (&o.policy, o.reason, &o.container, &o.image)
                        == (&v.policy, v.reason, &v.container, &v.image)
                });
                if !seen {
                    violations.push(v);
                }
            }
        }
        let mut out = Vec::new();
        for policy in self.policies {
            if !policy.applies_to(namespace, p.labels.as_deref()) {
                continue;
            }
            let mine: Vec<&Violation> = violations
                .iter()
                .filter(|v| v.policy == policy.name)
                .collect();
            for rule in Rule::ALL {
                let finding = match rule {
                    Rule::ImageReference | Rule::AllowedRegistries | Rule::Signatures => {
                        self.image_rule(p, policy, rule, &mine)
                    }
                    Rule::Drift => drift_rule(w, policy),
                    Rule::Tainted => self.taint_rule(w, policy),
                };
                out.extend(finding);
            }
        }
        out
    }

    fn image_rule(
        &self,
        p: &Planned<'_>,
        policy: &CompiledPolicy,
        rule: Rule,
        violations: &[&Violation],
    ) -> Option<Finding> {
        let w = p.workload;
        let applies = match rule {
            Rule::AllowedRegistries => !policy.allowed_registries.is_empty(),
            Rule::Signatures => p.sets.iter().flatten().any(|u| {
                u.reference
                    .as_ref()
                    .is_ok_and(|r| policy.verify.iter().any(|v| v.covers(r.name())))
            }),
            _ => true,
        };
        if !applies {
            return None;
        }
        let base = base_finding(w, policy, rule);
        if rule == Rule::ImageReference
            && let Some(why) = &w.unreadable
        {
            return Some(Finding {
                verdict: Verdict::of_mode(policy.mode),
                reasons: vec![Reason::InvalidReference.as_str()],
                message: format!("the object could not be read: {why}"),
                ..base
            });
        }
        let broken: Vec<&&Violation> = violations
            .iter()
            .filter(|v| Rule::of(v.reason) == rule)
            .collect();
        if broken.is_empty() {
            return Some(base);
        }
        let verdict = if broken.iter().any(|v| v.outcome == Outcome::Denied) {
            Verdict::Fail
        } else {
            Verdict::Warn
        };
        let mut reasons: Vec<&'static str> = Vec::new();
        for v in &broken {
            if !reasons.contains(&v.reason.as_str()) {
                reasons.push(v.reason.as_str());
            }
        }
        let messages: Vec<String> = broken
            .iter()
            .map(|v| {
                let mut m = v.message.clone();
                // A tag says nothing of what runs; the runtime does.
                if v.reason == Reason::MutableTag
                    && let Some((pod, digest)) =
                        v.container.as_deref().and_then(|c| resolved_tag(w, c))
                {
                    m.push_str(&format!(" (pod {pod} runs {digest})"));
                }
                m
            })
            .collect();
        let mut properties = base.properties.clone();
        let containers: Vec<&str> = broken
            .iter()
            .filter_map(|v| v.container.as_deref())
            .collect();
        properties.insert("containers".to_owned(), list(&containers));
        Some(Finding {
            verdict,
            reasons,
            message: join(messages),
            properties,
            ..base
        })
    }

    fn taint_rule(&self, w: &Workload, policy: &CompiledPolicy) -> Option<Finding> {
        let entered: Vec<(&str, &str, Taint)> = w
            .pods
            .iter()
            .filter_map(|pod| {
                let taint = Taint::parse(pod.taint.as_deref()?)?;
                taint::forbids(policy, &taint.action).then_some((
                    pod.object.name.as_str(),
                    pod.object.uid.as_str(),
                    taint,
                ))
            })
            .collect();
        if entered.is_empty() {
            return None;
        }
        let base = base_finding(w, policy, Rule::Tainted);
        let mut states: Vec<&'static str> = Vec::new();
        let messages: Vec<String> = entered
            .iter()
            .map(|(pod, uid, taint)| {
                let state = self.replacements.and_then(|r| r.get(uid));
                let after = match (&state, policy.replace_tainted) {
                    (Some(s), _) => {
                        if !states.contains(&s.state()) {
                            states.push(s.state());
                        }
                        format!("; {}", s.describe())
                    }
                    (None, Some(r)) => format!(
                        "; replaced {} after entry (runtime.replaceTainted)",
                        taint::humanize(r.after)
                    ),
                    (None, None) => "; reported only (no runtime.replaceTainted)".to_owned(),
                };
                format!(
                    "pod {pod} was entered: {}; it is no longer exactly what was built{after}",
                    taint.describe()
                )
            })
            .collect();
        let mut properties = base.properties.clone();
        let pods: Vec<&str> = entered.iter().map(|(pod, _, _)| *pod).collect();
        properties.insert("pods".to_owned(), list(&pods));
        if !states.is_empty() {
            properties.insert("eviction".to_owned(), states.join(","));
        }
        Some(Finding {
            verdict: Verdict::of_mode(policy.mode),
            reasons: vec![taint::REASON],
            message: join(messages),
            properties,
            ..base
        })
    }
}

fn subject<'a>(namespace: &'a str, labels: Option<&'a Labels>) -> Subject<'a> {
    // A workload found in the cluster has no requester: nobody is exempt from its results.
    Subject {
        namespace,
        namespace_labels: labels,
        user: "",
        groups: &[] as &[Cow<'_, str>],
    }
}

/// A workload's distinct image sets: its template's, then each pod's unless already seen.
fn image_sets(w: &Workload) -> Vec<Vec<ImageUse>> {
    let mut sets: Vec<Vec<ImageUse>> = Vec::new();
    let candidates = w
        .template
        .iter()
        .chain(w.pods.iter().map(|pod| &pod.images));
    for images in candidates {
        if !sets.iter().any(|s| s == images) {
            sets.push(images.clone());
        }
    }
    sets
}

fn base_finding(w: &Workload, policy: &CompiledPolicy, rule: Rule) -> Finding {
    let mut properties = BTreeMap::from([("mode".to_owned(), policy.mode.as_str().to_owned())]);
    if !w.pods.is_empty() {
        properties.insert("pods".to_owned(), w.pods.len().to_string());
    }
    Finding {
        workload: w.object.clone(),
        policy: policy.name.clone(),
        mode: policy.mode,
        rule,
        verdict: Verdict::Pass,
        reasons: Vec::new(),
        message: rule.passed().to_owned(),
        properties,
    }
}

fn drift_rule(w: &Workload, policy: &CompiledPolicy) -> Option<Finding> {
    if !w
        .pods
        .iter()
        .any(|pod| drift::comparable(&pod.images, &pod.running))
    {
        return None;
    }
    let base = base_finding(w, policy, Rule::Drift);
    let mut messages = Vec::new();
    let mut containers: Vec<String> = Vec::new();
    for pod in &w.pods {
        for d in drift::find(&pod.images, &pod.running) {
            messages.push(format!(
                "container {:?} of pod {} runs {} but its spec pins {}: what runs is not what was \
                 admitted; replace the pod",
                d.container, pod.object.name, d.running, d.pinned
            ));
            if !containers.contains(&d.container) {
                containers.push(d.container);
            }
        }
    }
    if messages.is_empty() {
        return Some(base);
    }
    let mut properties = base.properties.clone();
    let names: Vec<&str> = containers.iter().map(String::as_str).collect();
    properties.insert("containers".to_owned(), list(&names));
    Some(Finding {
        verdict: Verdict::of_mode(policy.mode),
        reasons: vec![drift::REASON],
        message: join(messages),
        properties,
        ..base
    })
}

/// The first pod of `w` whose runtime says what digest the unpinned `container` runs.
fn resolved_tag(w: &Workload, container: &str) -> Option<(String, String)> {
    w.pods.iter().find_map(|pod| {
        drift::tag_resolved_to(container, &pod.running)
            .map(|d| (pod.object.name.clone(), d.to_string()))
    })
}

/// Distinct messages, the first few in full and the rest counted, within the size bound.
fn join(mut messages: Vec<String>) -> String {
    let mut seen = Vec::new();
    messages.retain(|m| {
        let fresh = !seen.contains(m);
        if fresh {
            seen.push(m.clone());
        }
        fresh
    });
    let more = messages.len().saturating_sub(MESSAGES_SHOWN);
    messages.truncate(MESSAGES_SHOWN);
    let mut text = messages.join("; ");
    if more > 0 {
        text.push_str(&format!("; and {more} more"));
    }
    audit::shorten(text, MAX_MESSAGE)
}

/// A property listing names: the first few, then a count.
fn list(names: &[&str]) -> String {
    let mut distinct: Vec<&str> = Vec::new();
    for n in names {
        if !distinct.contains(n) {
            distinct.push(n);
        }
    }
    let more = distinct.len().saturating_sub(10);
    let mut text = distinct[..distinct.len().min(10)].join(",");
    if more > 0 {
        text.push_str(&format!(",+{more}"));
    }
    audit::shorten(text, 256)
}

/// Paces signature checks that reach a registry: at most `per_second` start each second.
fn pacer(per_second: f64) -> Option<tokio::time::Interval> {
    if !(per_second.is_finite() && per_second > 0.0) {
        return None;
    }
    let mut interval = tokio::time::interval(Duration::from_secs_f64(1.0 / per_second));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    Some(interval)
}

/// A result of a Deployment under an Enforce policy, for tests elsewhere in the crate.
#[cfg(test)]
pub(crate) fn sample(
    namespace: &str,
    name: &str,
    policy: &str,
    rule: Rule,
    verdict: Verdict,
    reasons: &[&'static str],
) -> Finding {
    Finding {
        workload: ObjectRef {
            kind: super::inventory::Kind::Deployment,
            namespace: namespace.into(),
            name: name.into(),
            uid: format!("uid-{namespace}-{name}"),
        },
        policy: policy.into(),
        mode: Mode::Enforce,
        rule,
        verdict,
        reasons: reasons.to_vec(),
        message: format!("{name}: {}", reasons.join(",")),
        properties: BTreeMap::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::crd::{ImageRules, ImmutabilityPolicySpec, Mode};
    use crate::policy::evaluate::Location;
    use crate::scan::inventory::{Kind, PodState, Running};
    use crate::verify::credentials::pull_secrets::PullContext;

    const A: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    fn object(kind: Kind, name: &str) -> ObjectRef {
        ObjectRef {
            kind,
            namespace: "team".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
        }
    }

    fn images(image: &str) -> Vec<ImageUse> {
        vec![ImageUse::new(Location::Container, "app", Some(image))]
    }

    fn pod(name: &str, image: &str, runs: Option<&str>, taint: Option<&str>) -> PodState {
        PodState {
            object: object(Kind::Pod, name),
            images: images(image),
            running: runs
                .map(|d| Running {
                    container: "app".into(),
                    image_id: format!("docker.io/library/nginx@{d}"),
                })
                .into_iter()
                .collect(),
            taint: taint.map(str::to_owned),
            bare: false,
        }
    }

    fn workload(kind: Kind, name: &str, template: Option<&str>, pods: Vec<PodState>) -> Workload {
        Workload {
            object: object(kind, name),
            template: template.map(images),
            pull: PullContext::default(),
            pods,
            unreadable: None,
        }
    }

    fn policy(name: &str, mode: Mode, registries: &[&str]) -> CompiledPolicy {
        let spec = ImmutabilityPolicySpec {
            mode,
            images: ImageRules {
                allowed_registries: registries.iter().map(|r| r.to_string()).collect(),
                ..Default::default()
            },
            ..Default::default()
        };
        CompiledPolicy::from_spec(name.into(), &spec).unwrap()
    }

    async fn judge(policies: &[CompiledPolicy], workloads: Vec<Workload>) -> Vec<Finding> {
        let inventory = Inventory {
            workloads,
            objects: 0,
            pages: 0,
        };
        let judge = Judge {
            policies,
            labels: &|_| None,
            checker: None,
            checks_on: None,
            pull_secrets: None,
            limits: RegistryLimits {
                concurrency: 1,
                per_second: 1.0,
            },
            replacements: None,
        };
        judge.run(&inventory).await.0
    }

    fn summary(findings: &[Finding]) -> Vec<(String, &str, &str, &str, Vec<&str>)> {
        findings
            .iter()
            .map(|f| {
                (
                    format!("{}/{}", f.workload.kind.as_str(), f.workload.name),
                    f.policy.as_str(),
                    f.rule.as_str(),
                    f.verdict.as_str(),
                    f.reasons.clone(),
                )
            })
            .collect()
    }

    #[tokio::test]
    async fn one_result_per_workload_policy_and_rule() {
        let pinned = format!("docker.io/library/nginx@{A}");
        let findings = judge(
            &[
                policy("enforce", Mode::Enforce, &[]),
                policy("audit", Mode::Audit, &["ghcr.io/**"]),
            ],
            vec![
                workload(
                    Kind::Deployment,
                    "tagged",
                    Some("nginx:1.27"),
                    vec![
                        pod("tagged-1", "nginx:1.27", Some(B), None),
                        pod("tagged-2", "nginx:1.27", None, None),
                    ],
                ),
                workload(Kind::Deployment, "pinned", Some(&pinned), vec![]),
            ],
        )
        .await;
        assert_eq!(
            summary(&findings),
            vec![
                (
                    "Deployment/tagged".into(),
                    "enforce",
                    "image-reference",
                    "fail",
                    vec!["MutableTag"]
                ),
                (
                    "Deployment/tagged".into(),
                    "audit",
                    "image-reference",
                    "warn",
                    vec!["MutableTag"]
                ),
                (
                    "Deployment/tagged".into(),
                    "audit",
                    "allowed-registries",
                    "warn",
                    vec!["RegistryNotAllowed"]
                ),
                (
                    "Deployment/pinned".into(),
                    "enforce",
                    "image-reference",
                    "pass",
                    vec![]
                ),
                (
                    "Deployment/pinned".into(),
                    "audit",
                    "image-reference",
                    "pass",
                    vec![]
                ),
                (
                    "Deployment/pinned".into(),
                    "audit",
                    "allowed-registries",
                    "warn",
                    vec!["RegistryNotAllowed"]
                ),
            ]
        );
        // The template and both pods name the same image: one message, and what it runs.
        let tagged = &findings[0];
        assert_eq!(
            tagged.message.matches("mutable tag").count(),
            1,
            "{}",
            tagged.message
        );
        assert!(
            tagged.message.contains(&format!("(pod tagged-1 runs {B})")),
            "{}",
            tagged.message
        );
        assert_eq!(tagged.properties.get("pods").map(String::as_str), Some("2"));
        assert_eq!(
            tagged.properties.get("mode").map(String::as_str),
            Some("Enforce")
        );
    }

    #[tokio::test]
    async fn a_pod_running_another_digest_drifts() {
        let pinned = format!("docker.io/library/nginx@{A}");
        let findings = judge(
            &[policy("p", Mode::Enforce, &[])],
            vec![
                workload(
                    Kind::Deployment,
                    "web",
                    Some(&pinned),
                    vec![
                        pod("web-1", &pinned, Some(A), None),
                        pod("web-2", &pinned, Some(B), None),
                    ],
                ),
                workload(
                    Kind::Pod,
                    "same",
                    None,
                    vec![pod("same", &pinned, Some(A), None)],
                ),
                workload(
                    Kind::Pod,
                    "pending",
                    None,
                    vec![pod("pending", &pinned, None, None)],
                ),
            ],
        )
        .await;
        let drift: Vec<_> = summary(&findings)
            .into_iter()
            .filter(|f| f.2 == "drift")
            .collect();
        assert_eq!(
            drift,
            vec![
                (
                    "Deployment/web".into(),
                    "p",
                    "drift",
                    "fail",
                    vec!["ImageDrift"]
                ),
                ("Pod/same".into(), "p", "drift", "pass", vec![]),
            ],
            "a pod without statuses has nothing to compare"
        );
        let web = findings.iter().find(|f| f.rule == Rule::Drift).unwrap();
        assert!(
            web.message
                .contains(&format!("pod web-2 runs {B} but its spec pins {A}")),
            "{}",
            web.message
        );
    }

    #[tokio::test]
    async fn entered_pods_are_reported_where_the_policy_forbids_the_entry() {
        let pinned = format!("docker.io/library/nginx@{A}");
        let taint = r#"{"at":"2026-01-01T00:00:00Z","by":"oncall","action":"exec","container":"app","policies":{}}"#;
        let mut allows = ImmutabilityPolicySpec::default();
        allows.runtime.exec = crate::policy::crd::Action::Allow;
        let allows = CompiledPolicy::from_spec("allows".into(), &allows).unwrap();
        let findings = judge(
            &[policy("audit", Mode::Audit, &[]), allows],
            vec![workload(
                Kind::Deployment,
                "web",
                Some(&pinned),
                vec![pod("web-1", &pinned, None, Some(taint))],
            )],
        )
        .await;
        let tainted: Vec<_> = findings
            .iter()
            .filter(|f| f.rule == Rule::Tainted)
            .collect();
        assert_eq!(tainted.len(), 1, "only where exec is denied");
        assert_eq!(
            (tainted[0].policy.as_str(), tainted[0].verdict),
            ("audit", Verdict::Warn)
        );
        assert!(
            tainted[0]
                .message
                .contains("pod web-1 was entered: exec by oncall into container \"app\""),
            "{}",
            tainted[0].message
        );
        assert!(
            tainted[0].message.contains("reported only"),
            "{}",
            tainted[0].message
        );
    }

    #[test]
    fn long_lists_are_cut_and_counted() {
        let many: Vec<String> = (0..5).map(|i| format!("m{i}")).collect();
        assert_eq!(join(many), "m0; m1; m2; and 2 more");
        assert_eq!(join(vec!["a".into(), "a".into()]), "a");
        let names: Vec<String> = (0..12).map(|i| format!("p{i}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        assert_eq!(list(&names), "p0,p1,p2,p3,p4,p5,p6,p7,p8,p9,+2");
        assert!(join(vec!["x".repeat(5000)]).len() <= MAX_MESSAGE);
    }

    /// A check that reaches a registry runs on the runtime `checks_on` names (the webhook's),
    /// not on the scan's: while that runtime is not driven the check waits past the checker's
    /// own deadline, and once it is driven the check answers. With `checks_on: None` the same
    /// check answers on the scan's runtime alone, so the first half can fail.
    #[test]
    fn registry_checks_run_on_the_runtime_they_are_handed() {
        use crate::audit::Metrics;
        use crate::image::ImageReference;
        use crate::verify::{Authority, RegistryOptions};

        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
        };
        let (webhook, scan) = (runtime(), runtime());
        let closed = "127.0.0.1:1";
        let options = RegistryOptions {
            insecure_registries: vec![closed.to_owned()],
            ..RegistryOptions::default()
        };
        let deadline = Duration::from_millis(500);
        let checker = Arc::new(
            SignatureChecker::new(options, deadline, Arc::new(Metrics::default())).unwrap(),
        );
        // Each half checks an image of its own: an answer is cached.
        let request = |image: &str| CheckRequest {
            key: (image.to_owned(), 7),
            image: ImageReference::parse(image).unwrap(),
            authorities: vec![Authority::Key {
                public_key_pem: "not a key".to_owned(),
                requirements: Default::default(),
            }]
            .into(),
            min_authorities: 1,
            max_evidence_age: Duration::from_secs(60),
        };
        let sets: Vec<Arc<[RegistryCredential]>> = vec![Vec::new().into()];
        let judge = |checks_on| Judge {
            policies: &[],
            labels: &|_| None,
            checker: Some(&checker),
            checks_on,
            pull_secrets: None,
            limits: RegistryLimits {
                concurrency: 1,
                per_second: 100.0,
            },
            replacements: None,
        };
        let answered = |judge: Judge<'_>, digest: &str| {
            let image = format!("{closed}/app@{digest}");
            let checks = HashMap::from([(((image.clone(), 7), 0), request(&image))]);
            scan.block_on(async {
                tokio::time::timeout(deadline * 6, judge.check(checks, &sets))
                    .await
                    .ok()
                    .map(|(found, _)| found.len())
            })
        };

        assert_eq!(answered(judge(None), A), Some(1), "on the scan's runtime");
        assert_eq!(
            answered(judge(Some(webhook.handle())), B),
            None,
            "answered without the webhook's runtime"
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::scope(|s| {
            s.spawn(|| webhook.block_on(stopped));
            assert_eq!(answered(judge(Some(webhook.handle())), B), Some(1));
            stop.send(()).unwrap();
        });
    }
}
