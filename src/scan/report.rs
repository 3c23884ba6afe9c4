//! Reports in the format policy tooling reads: OpenReports (`openreports.io/v1alpha1`, a
//! `Report` per namespace and one `ClusterReport`), or the older `wgpolicyk8s.io/v1alpha2`
//! `PolicyReport` and `ClusterPolicyReport` for Policy Reporter and tools that predate it.
//!
//! Bounded: one object per namespace that has results, plus one for the cluster (never one
//! per workload: per-resource reports are how a peer once filled etcd with 1.6 M objects). A
//! report holds at most `max_results` results and `max_bytes` of JSON. Past either bound the
//! rest is not dropped silently: failures are listed first, then warnings, then passes, and
//! what does not fit is counted in one `report-limit` result per policy (its result the worst
//! it hides, its properties the counts), while `summary` always counts every result.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde::{Deserialize, Serialize};

use super::results::{Finding, Verdict};
use crate::policy::Mode;

/// Name of every report fixity writes (one per namespace, one for the cluster).
pub const NAME: &str = "fixity";
/// The `source` of every result, and the field manager of every write.
pub const SOURCE: &str = "fixity";
/// The label that tells fixity's reports from other producers'.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "fixity");
/// The rule of a result that counts what a report could not list.
pub const LIMIT_RULE: &str = "report-limit";
/// The rule of the cluster report's per-policy results.
pub const POLICY_RULE: &str = "workloads";
/// Room kept for the object's envelope and the limit results.
const ENVELOPE_BYTES: usize = 2048;
const LIMIT_RESULT_BYTES: usize = 1024;

/// Which report API to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `openreports.io/v1alpha1` Report and ClusterReport.
    OpenReports,
    /// `wgpolicyk8s.io/v1alpha2` PolicyReport and ClusterPolicyReport.
    PolicyReport,
}

impl Format {
    fn group_version(self) -> (&'static str, &'static str) {
        match self {
            Format::OpenReports => ("openreports.io", "v1alpha1"),
            Format::PolicyReport => ("wgpolicyk8s.io", "v1alpha2"),
        }
    }

    fn kinds(self) -> (&'static str, &'static str) {
        match self {
            Format::OpenReports => ("Report", "ClusterReport"),
            Format::PolicyReport => ("PolicyReport", "ClusterPolicyReport"),
        }
    }

    fn resource(self, cluster: bool) -> ApiResource {
        let (group, version) = self.group_version();
        let (namespaced, clustered) = self.kinds();
        let kind = if cluster { clustered } else { namespaced };
        ApiResource {
            group: group.to_owned(),
            version: version.to_owned(),
            api_version: format!("{group}/{version}"),
            kind: kind.to_owned(),
            plural: format!("{}s", kind.to_lowercase()),
        }
    }
}

/// Bounds of one report object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_results: usize,
    pub max_bytes: usize,
}

impl Limits {
    /// No bound: what `fixity report --scan` shows.
    pub const NONE: Limits = Limits {
        max_results: usize::MAX,
        max_bytes: usize::MAX,
    };
}

/// A report object, in both formats (they differ in group, kinds and two optional fields).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReportObject {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    /// OpenReports only: who produced every result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// OpenReports only: the bound the producer applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub configuration: Option<Configuration>,
    #[serde(default)]
    pub summary: Summary,
    #[serde(default)]
    pub results: Vec<ReportResult>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Configuration {
    pub limits: ConfiguredLimits,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfiguredLimits {
    pub max_results: i64,
}

/// Counts of every result, listed or not.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    #[serde(default)]
    pub pass: i64,
    #[serde(default)]
    pub fail: i64,
    #[serde(default)]
    pub warn: i64,
    #[serde(default)]
    pub error: i64,
    #[serde(default)]
    pub skip: i64,
}

impl Summary {
    fn count(&mut self, verdict: Verdict) {
        match verdict {
            Verdict::Pass => self.pass += 1,
            Verdict::Fail => self.fail += 1,
            Verdict::Warn => self.warn += 1,
        }
    }

    fn worst(&self) -> Verdict {
        if self.fail > 0 {
            Verdict::Fail
        } else if self.warn > 0 {
            Verdict::Warn
        } else {
            Verdict::Pass
        }
    }
}

/// `metav1.Timestamp`, as both formats write a result's time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Stamp {
    #[serde(default)]
    pub seconds: i64,
    #[serde(default)]
    pub nanos: i32,
}

/// One result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReportResult {
    #[serde(default)]
    pub source: String,
    #[serde(default)]
    pub policy: String,
    #[serde(default)]
    pub rule: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub category: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub severity: String,
    #[serde(default)]
    pub timestamp: Stamp,
    #[serde(default)]
    pub result: String,
    #[serde(default)]
    pub scored: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<ObjectReference>,
    #[serde(default)]
    pub message: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub properties: BTreeMap<String, String>,
}

/// When each result was first found, carried from one scan to the next so an unchanged
/// report is an unchanged object (and not rewritten).
#[derive(Debug, Default)]
pub struct Stamps(HashMap<u64, Stamp>);

fn identity(r: &ReportResult) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let uid = r.resources.first().and_then(|o| o.uid.as_deref());
    (uid, &r.policy, &r.rule, &r.result, &r.message).hash(&mut h);
    h.finish()
}

impl Stamps {
    /// Gives every result its first-seen time (`now` for new ones) and forgets the rest.
    fn apply(&mut self, reports: &mut [ReportObject], now: Stamp) {
        let mut next = HashMap::new();
        for r in reports.iter_mut().flat_map(|o| o.results.iter_mut()) {
            let key = identity(r);
            r.timestamp = self.0.get(&key).copied().unwrap_or(now);
            next.insert(key, r.timestamp);
        }
        self.0 = next;
    }
}

fn result_of(f: &Finding) -> ReportResult {
    let mut properties = f.properties.clone();
    if let Some(first) = f.reasons.first() {
        properties.insert("reason".to_owned(), (*first).to_owned());
    }
    if f.reasons.len() > 1 {
        properties.insert("reasons".to_owned(), f.reasons.join(","));
    }
    ReportResult {
        source: SOURCE.to_owned(),
        policy: f.policy.clone(),
        rule: f.rule.as_str().to_owned(),
        category: "Immutability".to_owned(),
        severity: f.rule.severity().to_owned(),
        timestamp: Stamp::default(),
        result: f.verdict.as_str().to_owned(),
        scored: true,
        resources: vec![ObjectReference {
            api_version: Some(f.workload.kind.api_version().to_owned()),
            kind: Some(f.workload.kind.as_str().to_owned()),
            name: Some(f.workload.name.clone()),
            namespace: Some(f.workload.namespace.clone()),
            uid: Some(f.workload.uid.clone()).filter(|u| !u.is_empty()),
            ..Default::default()
        }],
        message: f.message.clone(),
        properties,
    }
}

fn envelope(format: Format, namespace: Option<&str>, limits: Limits) -> ReportObject {
    let resource = format.resource(namespace.is_none());
    let open = format == Format::OpenReports;
    ReportObject {
        api_version: resource.api_version,
        kind: resource.kind,
        metadata: ObjectMeta {
            name: Some(NAME.to_owned()),
            namespace: namespace.map(str::to_owned),
            labels: Some(BTreeMap::from([(
                MANAGED_BY.0.to_owned(),
                MANAGED_BY.1.to_owned(),
            )])),
            ..Default::default()
        },
        source: open.then(|| SOURCE.to_owned()),
        configuration: (open && limits.max_results != usize::MAX).then(|| Configuration {
            limits: ConfiguredLimits {
                max_results: i64::try_from(limits.max_results).unwrap_or(i64::MAX),
            },
        }),
        summary: Summary::default(),
        results: Vec::new(),
    }
}

/// Fills `report` with `results` (already in order: failures first), within `limits`.
fn fill(report: &mut ReportObject, results: Vec<(Verdict, ReportResult)>, limits: Limits) {
    let mut summary = Summary::default();
    for (verdict, _) in &results {
        summary.count(*verdict);
    }
    report.summary = summary;
    let size = |r: &ReportResult| serde_json::to_vec(r).map_or(0, |v| v.len() + 1);
    let total_bytes: usize = results.iter().map(|(_, r)| size(r)).sum();
    if results.len() <= limits.max_results
        && total_bytes.saturating_add(ENVELOPE_BYTES) <= limits.max_bytes
    {
        report.results = results.into_iter().map(|(_, r)| r).collect();
        return;
    }
    let policies: BTreeSet<String> = results.iter().map(|(_, r)| r.policy.clone()).collect();
    // One limit result per policy when they fit in a tenth of the bound, else one for all.
    let per_policy = policies.len() <= limits.max_results / 10;
    let notes = if per_policy { policies.len() } else { 1 };
    let room_results = limits.max_results.saturating_sub(notes);
    let room_bytes = limits
        .max_bytes
        .saturating_sub(ENVELOPE_BYTES + notes * LIMIT_RESULT_BYTES);
    let (mut kept, mut bytes) = (Vec::new(), 0usize);
    let mut hidden: BTreeMap<String, Summary> = BTreeMap::new();
    for (verdict, r) in results {
        let n = size(&r);
        if kept.len() < room_results && bytes + n <= room_bytes {
            bytes += n;
            kept.push(r);
        } else {
            let key = if per_policy {
                r.policy.clone()
            } else {
                String::new()
            };
            hidden.entry(key).or_default().count(verdict);
        }
    }
    for (policy, counts) in hidden {
        let n = counts.pass + counts.fail + counts.warn;
        let whose = if policy.is_empty() {
            ""
        } else {
            " of this policy"
        };
        kept.push(ReportResult {
            source: SOURCE.to_owned(),
            policy: if policy.is_empty() { "*".to_owned() } else { policy },
            rule: LIMIT_RULE.to_owned(),
            category: "Immutability".to_owned(),
            severity: String::new(),
            timestamp: Stamp::default(),
            result: counts.worst().as_str().to_owned(),
            scored: false,
            resources: Vec::new(),
            message: format!(
                "{n} more results{whose} are not listed ({} fail, {} warn, {} pass): a report holds \
                 at most {} results and {} bytes; `fixity report --scan` lists them all",
                counts.fail, counts.warn, counts.pass, limits.max_results, limits.max_bytes
            ),
            properties: BTreeMap::from([
                ("hidden".to_owned(), n.to_string()),
                ("hiddenFail".to_owned(), counts.fail.to_string()),
                ("hiddenWarn".to_owned(), counts.warn.to_string()),
                ("hiddenPass".to_owned(), counts.pass.to_string()),
            ]),
        });
    }
    report.results = kept;
}

/// The reports for `findings`: one per namespace with results, and the cluster report with
/// one result per policy in force.
pub fn build(
    format: Format,
    findings: &[Finding],
    policies: &[(String, Mode)],
    limits: Limits,
    stamps: &mut Stamps,
    now: Stamp,
) -> Vec<ReportObject> {
    let mut by_namespace: BTreeMap<&str, Vec<&Finding>> = BTreeMap::new();
    for f in findings {
        by_namespace
            .entry(f.workload.namespace.as_str())
            .or_default()
            .push(f);
    }
    let mut reports = Vec::new();
    for (namespace, mut found) in by_namespace {
        found.sort_by(|a, b| {
            (a.verdict, &a.workload, &a.policy, a.rule).cmp(&(
                b.verdict,
                &b.workload,
                &b.policy,
                b.rule,
            ))
        });
        let mut report = envelope(format, Some(namespace), limits);
        fill(
            &mut report,
            found
                .into_iter()
                .map(|f| (f.verdict, result_of(f)))
                .collect(),
            limits,
        );
        reports.push(report);
    }
    let mut cluster = envelope(format, None, limits);
    let mut per_policy: Vec<(Verdict, ReportResult)> = policies
        .iter()
        .map(|(name, mode)| policy_result(name, *mode, findings))
        .collect();
    per_policy.sort_by(|a, b| (a.0, &a.1.policy).cmp(&(b.0, &b.1.policy)));
    fill(&mut cluster, per_policy, limits);
    reports.push(cluster);
    stamps.apply(&mut reports, now);
    reports
}

/// A policy's results across the cluster, as one result of the cluster report.
fn policy_result(name: &str, mode: Mode, findings: &[Finding]) -> (Verdict, ReportResult) {
    let mine: Vec<&Finding> = findings.iter().filter(|f| f.policy == name).collect();
    let mut counts = Summary::default();
    let mut reasons: BTreeMap<&str, i64> = BTreeMap::new();
    let mut workloads = BTreeSet::new();
    let mut namespaces = BTreeSet::new();
    for f in &mine {
        counts.count(f.verdict);
        workloads.insert(&f.workload);
        namespaces.insert(f.workload.namespace.as_str());
        if f.verdict != Verdict::Pass
            && let Some(reason) = f.reasons.first()
        {
            *reasons.entry(reason).or_default() += 1;
        }
    }
    let verdict = counts.worst();
    let reason_text: Vec<String> = reasons.iter().map(|(r, n)| format!("{r} {n}")).collect();
    let mut message = format!(
        "{} workloads in {} namespaces: {} fail, {} warn, {} pass",
        workloads.len(),
        namespaces.len(),
        counts.fail,
        counts.warn,
        counts.pass
    );
    if !reason_text.is_empty() {
        message.push_str(&format!("; {}", reason_text.join(", ")));
    }
    let mut properties = BTreeMap::from([
        ("mode".to_owned(), mode.as_str().to_owned()),
        ("workloads".to_owned(), workloads.len().to_string()),
        ("fail".to_owned(), counts.fail.to_string()),
        ("warn".to_owned(), counts.warn.to_string()),
        ("pass".to_owned(), counts.pass.to_string()),
    ]);
    if let Some((reason, _)) = reasons.iter().max_by_key(|(_, n)| **n) {
        properties.insert("reason".to_owned(), (*reason).to_owned());
    }
    let result = ReportResult {
        source: SOURCE.to_owned(),
        policy: name.to_owned(),
        rule: POLICY_RULE.to_owned(),
        category: "Immutability".to_owned(),
        severity: String::new(),
        timestamp: Stamp::default(),
        result: verdict.as_str().to_owned(),
        scored: true,
        resources: vec![ObjectReference {
            api_version: Some("fixity.dev/v1alpha1".to_owned()),
            kind: Some("ImmutabilityPolicy".to_owned()),
            name: Some(name.to_owned()),
            ..Default::default()
        }],
        message,
        properties,
    };
    (verdict, result)
}

/// Why reports could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(
        "the {0} CustomResourceDefinition is not installed (chart value reports.installCRDs, \
         or install it from its project)"
    )]
    NotInstalled(String),
    #[error("{0}")]
    Api(#[from] kube::Error),
}

fn not_installed(format: Format, e: kube::Error) -> ReportError {
    match e {
        kube::Error::Api(status) if status.code == 404 => {
            let (group, _) = format.group_version();
            ReportError::NotInstalled(format!("{} ({group})", format.kinds().0))
        }
        e => ReportError::Api(e),
    }
}

/// What a write did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Written {
    /// Report objects fixity keeps, and the JSON bytes they hold.
    pub objects: usize,
    pub bytes: usize,
    /// Objects changed by this write, and stale ones deleted.
    pub updated: usize,
    pub deleted: usize,
}

/// Writes reports, skipping those that did not change since this writer last wrote them.
pub struct Writer {
    client: Client,
    pub format: Format,
    pub limits: Limits,
    stamps: Stamps,
    last: HashMap<(Option<String>, String), u64>,
}

impl Writer {
    pub fn new(client: Client, format: Format, limits: Limits) -> Self {
        Self {
            client,
            format,
            limits,
            stamps: Stamps::default(),
            last: HashMap::new(),
        }
    }

    /// Forgets what was written: another replica may have written since.
    pub fn reset(&mut self) {
        self.last.clear();
    }

    /// Builds and writes the reports for `findings`; deletes fixity's reports of namespaces
    /// that no longer have results.
    pub async fn write(
        &mut self,
        findings: &[Finding],
        policies: &[(String, Mode)],
        now: Stamp,
    ) -> Result<Written, ReportError> {
        let reports = build(
            self.format,
            findings,
            policies,
            self.limits,
            &mut self.stamps,
            now,
        );
        let mut written = Written::default();
        let mut keep: BTreeSet<Option<String>> = BTreeSet::new();
        for report in &reports {
            let body = serde_json::to_vec(report).unwrap_or_default();
            written.objects += 1;
            written.bytes += body.len();
            let namespace = report.metadata.namespace.clone();
            keep.insert(namespace.clone());
            let mut h = std::collections::hash_map::DefaultHasher::new();
            body.hash(&mut h);
            let hash = h.finish();
            let key = (namespace.clone(), report.kind.clone());
            if self.last.get(&key) == Some(&hash) {
                continue;
            }
            let api = self.api(namespace.as_deref());
            api.patch(
                NAME,
                &PatchParams::apply(SOURCE).force(),
                &Patch::Apply(report),
            )
            .await
            .map_err(|e| not_installed(self.format, e))?;
            self.last.insert(key, hash);
            written.updated += 1;
        }
        written.deleted = self.delete_stale(&keep).await?;
        Ok(written)
    }

    fn api(&self, namespace: Option<&str>) -> Api<DynamicObject> {
        let resource = self.format.resource(namespace.is_none());
        match namespace {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, &resource),
            None => Api::all_with(self.client.clone(), &resource),
        }
    }

    async fn delete_stale(
        &mut self,
        keep: &BTreeSet<Option<String>>,
    ) -> Result<usize, ReportError> {
        let namespaced = self.format.resource(false);
        let all: Api<DynamicObject> = Api::all_with(self.client.clone(), &namespaced);
        let mine = ListParams::default().labels(&format!("{}={}", MANAGED_BY.0, MANAGED_BY.1));
        let listed = all
            .list_metadata(&mine)
            .await
            .map_err(|e| not_installed(self.format, e))?;
        let mut deleted = 0;
        for object in listed.items {
            let namespace = object.namespace();
            if keep.contains(&namespace) {
                continue;
            }
            let api = self.api(namespace.as_deref());
            match api
                .delete(&object.name_any(), &DeleteParams::default())
                .await
            {
                Ok(_) => deleted += 1,
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
            self.last.remove(&(namespace, namespaced.kind.clone()));
        }
        Ok(deleted)
    }
}

/// fixity's reports in the cluster (`namespace` limits the namespaced ones), the cluster
/// report last.
pub async fn read(
    client: &Client,
    format: Format,
    namespace: Option<&str>,
) -> Result<Vec<ReportObject>, ReportError> {
    let mine = ListParams::default().labels(&format!("{}={}", MANAGED_BY.0, MANAGED_BY.1));
    let mut out = Vec::new();
    for cluster in [false, true] {
        let resource = format.resource(cluster);
        let api: Api<DynamicObject> = match (cluster, namespace) {
            (false, Some(ns)) => Api::namespaced_with(client.clone(), ns, &resource),
            _ => Api::all_with(client.clone(), &resource),
        };
        let listed = api
            .list(&mine)
            .await
            .map_err(|e| not_installed(format, e))?;
        for object in listed.items {
            let value = serde_json::to_value(&object).map_err(kube::Error::SerdeError)?;
            let report: ReportObject =
                serde_json::from_value(value).map_err(kube::Error::SerdeError)?;
            out.push(report);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::results::{self, Rule};

    fn finding(
        name: &str,
        namespace: &str,
        policy: &str,
        verdict: Verdict,
        message: &str,
    ) -> Finding {
        let reasons: &[&'static str] = if verdict == Verdict::Pass {
            &[]
        } else {
            &["MutableTag"]
        };
        Finding {
            message: message.into(),
            ..results::sample(
                namespace,
                name,
                policy,
                Rule::ImageReference,
                verdict,
                reasons,
            )
        }
    }

    const NOW: Stamp = Stamp {
        seconds: 1_700_000_000,
        nanos: 0,
    };

    #[test]
    fn a_report_per_namespace_and_one_for_the_cluster() {
        let findings = vec![
            finding("a", "ns1", "p", Verdict::Pass, "ok"),
            finding("b", "ns1", "p", Verdict::Fail, "tag"),
            finding("c", "ns2", "p", Verdict::Warn, "tag"),
        ];
        let reports = build(
            Format::OpenReports,
            &findings,
            &[("p".into(), Mode::Enforce), ("idle".into(), Mode::Audit)],
            Limits {
                max_results: 100,
                max_bytes: 1 << 20,
            },
            &mut Stamps::default(),
            NOW,
        );
        let shape: Vec<(&str, Option<&str>, usize)> = reports
            .iter()
            .map(|r| {
                (
                    r.kind.as_str(),
                    r.metadata.namespace.as_deref(),
                    r.results.len(),
                )
            })
            .collect();
        assert_eq!(
            shape,
            vec![
                ("Report", Some("ns1"), 2),
                ("Report", Some("ns2"), 1),
                ("ClusterReport", None, 2)
            ]
        );
        let ns1 = &reports[0];
        assert_eq!(ns1.api_version, "openreports.io/v1alpha1");
        assert_eq!(ns1.results[0].result, "fail", "failures first");
        assert_eq!((ns1.summary.fail, ns1.summary.pass), (1, 1));
        assert_eq!(
            ns1.results[0].properties.get("reason").map(String::as_str),
            Some("MutableTag")
        );
        assert_eq!(ns1.results[0].timestamp, NOW);
        let cluster = &reports[2];
        assert_eq!(cluster.results[0].policy, "p");
        assert_eq!(cluster.results[0].result, "fail");
        assert!(
            cluster.results[0]
                .message
                .starts_with("3 workloads in 2 namespaces: 1 fail, 1 warn, 1 pass; MutableTag 2"),
            "{}",
            cluster.results[0].message
        );
        assert_eq!(cluster.results[1].policy, "idle");
        assert_eq!(cluster.results[1].result, "pass");

        let old = build(
            Format::PolicyReport,
            &findings,
            &[],
            Limits::NONE,
            &mut Stamps::default(),
            NOW,
        );
        assert_eq!(old[0].api_version, "wgpolicyk8s.io/v1alpha2");
        assert_eq!(old[0].kind, "PolicyReport");
        assert_eq!(old[2].kind, "ClusterPolicyReport");
        assert!(old[0].source.is_none() && old[0].configuration.is_none());
    }

    #[test]
    fn past_the_bounds_the_rest_is_counted_never_dropped() {
        let mut findings = Vec::new();
        for i in 0..30 {
            let verdict = match i % 3 {
                0 => Verdict::Fail,
                1 => Verdict::Warn,
                _ => Verdict::Pass,
            };
            findings.push(finding(&format!("w{i:02}"), "ns", "p", verdict, "m"));
        }
        let limits = Limits {
            max_results: 10,
            max_bytes: 1 << 20,
        };
        let reports = build(
            Format::OpenReports,
            &findings,
            &[("p".into(), Mode::Enforce)],
            limits,
            &mut Stamps::default(),
            NOW,
        );
        let ns = &reports[0];
        assert_eq!(ns.results.len(), 10);
        assert!(
            ns.results[..9].iter().all(|r| r.result == "fail"),
            "failures kept first"
        );
        let note = &ns.results[9];
        assert_eq!(
            (note.rule.as_str(), note.result.as_str()),
            (LIMIT_RULE, "fail")
        );
        assert_eq!(note.properties["hidden"], "21");
        assert_eq!(note.properties["hiddenFail"], "1");
        assert_eq!(note.properties["hiddenWarn"], "10");
        assert_eq!(note.properties["hiddenPass"], "10");
        assert_eq!(
            (ns.summary.fail, ns.summary.warn, ns.summary.pass),
            (10, 10, 10)
        );
        assert_eq!(
            ns.configuration.as_ref().map(|c| c.limits.max_results),
            Some(10)
        );

        let by_bytes = Limits {
            max_results: 1000,
            max_bytes: 6000,
        };
        let reports = build(
            Format::OpenReports,
            &findings,
            &[("p".into(), Mode::Enforce)],
            by_bytes,
            &mut Stamps::default(),
            NOW,
        );
        let size = serde_json::to_vec(&reports[0]).unwrap().len();
        assert!(size <= 6000, "{size} bytes");
        let note = reports[0].results.last().unwrap();
        let listed = reports[0].results.len() - 1;
        assert_eq!(note.properties["hidden"], (30 - listed).to_string());
    }

    #[test]
    fn unchanged_results_keep_their_first_seen_time() {
        let mut stamps = Stamps::default();
        let findings = vec![finding("a", "ns", "p", Verdict::Fail, "tag")];
        let first = build(
            Format::OpenReports,
            &findings,
            &[],
            Limits::NONE,
            &mut stamps,
            NOW,
        );
        let later = Stamp {
            seconds: NOW.seconds + 600,
            nanos: 0,
        };
        let again = build(
            Format::OpenReports,
            &findings,
            &[],
            Limits::NONE,
            &mut stamps,
            later,
        );
        assert_eq!(first, again, "the same report, so not rewritten");
        let changed = vec![finding("a", "ns", "p", Verdict::Fail, "another tag")];
        let third = build(
            Format::OpenReports,
            &changed,
            &[],
            Limits::NONE,
            &mut stamps,
            later,
        );
        assert_eq!(third[0].results[0].timestamp, later);
    }
}
