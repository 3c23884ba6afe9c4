//! `fixity check`: evaluates manifests offline with the evaluator the webhook uses.
//! Exit codes: 0 clean (audit findings allowed), 1 a violation an Enforce policy denies,
//! 2 unusable input.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde::Serialize;

use crate::admission::intent::workload_images;
use crate::admission::review::PodCarrier;
use crate::audit::Metrics;
use crate::manifest::{self, Document};
use crate::policy::evaluate::verification_requests;
use crate::policy::store::Labels;
use crate::policy::{self, Decision, Intent, Outcome, Subject, evaluate};
use crate::verify::checker::{Limits, SignatureChecker};
use crate::verify::{RegistryOptions, Verifications, VerifyError};

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Manifest files or directories (searched for .yaml, .yml, .json); `-` reads stdin.
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// ImmutabilityPolicy file(s) to apply instead of the built-in default (repeatable).
    #[arg(long = "policy", value_name = "FILE")]
    pub policies: Vec<PathBuf>,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Output::Human)]
    pub output: Output,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

/// How signatures are fetched, for policies that require them.
#[derive(Debug, Clone, Args)]
pub struct RegistryArgs {
    /// Registry (`host:port`) to reach over plain HTTP instead of HTTPS (repeatable).
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    pub insecure_registries: Vec<String>,
    /// A token service on another host that may receive a registry's credentials, as
    /// `REGISTRY=https://HOST[:PORT]` (repeatable); a registry's own host always may.
    #[arg(long = "registry-token-realm", value_name = "REGISTRY=URL", value_parser = token_realm)]
    pub token_realms: Vec<(String, String)>,
    /// Deadline for all signature checks of one request, in milliseconds.
    #[arg(long, default_value_t = 8000)]
    pub verify_timeout_ms: u64,
}

impl RegistryArgs {
    /// How to reach registries.
    pub fn options(&self) -> RegistryOptions {
        RegistryOptions {
            insecure_registries: self.insecure_registries.clone(),
            token_realms: self.token_realms.clone(),
            ..RegistryOptions::default()
        }
    }

    /// A signature checker with these settings and `limits`.
    pub fn checker(
        &self,
        metrics: Arc<Metrics>,
        limits: Limits,
    ) -> Result<SignatureChecker, VerifyError> {
        let deadline = Duration::from_millis(self.verify_timeout_ms);
        SignatureChecker::with_limits(self.options(), deadline, metrics, limits)
    }
}

fn token_realm(value: &str) -> Result<(String, String), String> {
    let (registry, url) = value
        .split_once('=')
        .ok_or("expected REGISTRY=https://HOST[:PORT]")?;
    match url.split_once("://") {
        Some(("https" | "http", host)) if !registry.is_empty() && !host.is_empty() => {
            Ok((registry.to_owned(), url.to_owned()))
        }
        _ => Err(format!("{url:?} is not an http(s) URL")),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Human,
    Json,
}

/// One violation found in a manifest.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Finding {
    pub source: String,
    pub document: usize,
    /// The line the object starts on, for `source:line`.
    pub line: usize,
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub policy: String,
    pub mode: &'static str,
    pub decision: &'static str,
    pub reason: &'static str,
    pub container: Option<String>,
    pub image: Option<String>,
    pub message: String,
}

#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub objects: usize,
    pub workloads: usize,
    pub denied: usize,
    pub findings: Vec<Finding>,
    /// Namespaces whose labels decided whether a policy's namespaceSelector applied: they
    /// came from the input (or were missing from it), not from a cluster.
    pub namespace_labels: Vec<NamespaceLabels>,
}

/// Where `check` took a namespace's labels from, and the policies whose selectors read them.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NamespaceLabels {
    pub namespace: String,
    /// `source:line` of the Namespace object in the input; `None` when the input holds none
    /// (the selectors then match, as fixity does for a namespace it has not seen).
    pub from: Option<String>,
    pub policies: Vec<String>,
}

/// Why input is unusable (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Manifest { path: String, message: String },
    #[error(transparent)]
    Policy(#[from] policy::files::PolicyFileError),
    #[error("no Kubernetes objects found in the input")]
    NothingToCheck,
    #[error("signature verification cannot start: {0}")]
    Verifier(String),
}

pub fn run(args: CheckArgs) -> ExitCode {
    match check(&args) {
        Ok(report) => {
            match args.output {
                Output::Human => print_human(&report),
                Output::Json => match serde_json::to_string_pretty(&report) {
                    Ok(json) => println!("{json}"),
                    Err(e) => {
                        eprintln!("fixity check: {e}");
                        return ExitCode::from(2);
                    }
                },
            }
            if report.denied > 0 {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("fixity check: {e}");
            ExitCode::from(2)
        }
    }
}

/// Reads every input and evaluates each workload in it.
pub fn check(args: &CheckArgs) -> Result<Report, CheckError> {
    let policies = if args.policies.is_empty() {
        vec![policy::builtin()]
    } else {
        policy::files::load(&args.policies)?
    };
    let mut sources = Vec::new();
    for path in &args.paths {
        collect_sources(path, &mut sources)?;
    }
    let mut parsed = Vec::new();
    for (label, text) in sources {
        let documents = manifest::parse(&text).map_err(|e| CheckError::Manifest {
            path: label.clone(),
            message: e.to_string(),
        })?;
        parsed.push((label, documents));
    }
    // Namespaces declared alongside the workloads give selectors their labels.
    let mut namespaces: BTreeMap<String, Labels> = BTreeMap::new();
    let mut declared_at: BTreeMap<String, String> = BTreeMap::new();
    for (label, doc) in parsed
        .iter()
        .flat_map(|(label, docs)| docs.iter().map(move |d| (label, d)))
    {
        if doc.kind() == "Namespace" && doc.api_version() == "v1" {
            let labels = doc
                .object
                .pointer("/metadata/labels")
                .and_then(|l| serde_json::from_value(l.clone()).ok())
                .unwrap_or_default();
            namespaces.insert(doc.name().to_owned(), labels);
            declared_at.insert(doc.name().to_owned(), format!("{label}:{}", doc.line));
        }
    }

    let mut report = Report::default();
    let mut workloads = Vec::new();
    for (label, documents) in &parsed {
        for doc in documents {
            report.objects += 1;
            if let Some(intent) = workload_intent(label, doc)? {
                workloads.push((label.as_str(), doc, intent));
            }
        }
    }
    if report.objects == 0 {
        return Err(CheckError::NothingToCheck);
    }
    report.workloads = workloads.len();

    // Signatures and attestations, when a policy requires them: every distinct check once,
    // over the network.
    let (mut needed, mut attestations) = (Vec::new(), Vec::new());
    let (mut seen, mut seen_attestations) = (HashSet::new(), HashSet::new());
    for (_, doc, intent) in &workloads {
        let (signatures, attested) =
            verification_requests(&policies, &subject(doc, &namespaces), intent);
        for request in signatures {
            if seen.insert(request.key.clone()) {
                needed.push(request);
            }
        }
        for request in attested {
            if seen_attestations.insert(request.key.clone()) {
                attestations.push(request);
            }
        }
    }
    let verifications = if needed.is_empty() && attestations.is_empty() {
        Verifications::new()
    } else {
        // Every image of the input is one "request" here: no bound on how many, and the
        // whole registry budget for them.
        let all = Limits::default();
        let limits = Limits {
            per_request: all.registry,
            max_checks: None,
            ..all
        };
        let checker = args
            .registry
            .checker(Arc::new(Metrics::default()), limits)
            .map_err(|e| CheckError::Verifier(e.to_string()))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| CheckError::Verifier(e.to_string()))?;
        let requests = needed
            .into_iter()
            .map(|r| (r.key, r.image, r.authorities, r.min_authorities));
        let attestations = attestations.into_iter().map(|r| (r.key, r.image, r.rule));
        runtime.block_on(async {
            let (mut verifications, attested) = tokio::join!(
                checker.check_all(requests, Vec::new()),
                checker.check_attestations(attestations, Vec::new()),
            );
            verifications.attestations = attested.checks;
            verifications
        })
    };

    let mut selected: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (label, doc, intent) in &workloads {
        let subject = subject(doc, &namespaces);
        let decision = evaluate(&policies, &subject, intent, &verifications);
        record(label, doc, subject.namespace, decision, &mut report);
        let deciding = policies
            .iter()
            .filter(|p| p.selector.is_some() && !p.exclude_namespaces.contains(subject.namespace));
        for p in deciding {
            selected
                .entry(subject.namespace)
                .or_default()
                .insert(&p.name);
        }
    }
    report.namespace_labels = selected
        .into_iter()
        .map(|(namespace, policies)| NamespaceLabels {
            namespace: namespace.to_owned(),
            from: declared_at.get(namespace).cloned(),
            policies: policies.into_iter().map(str::to_owned).collect(),
        })
        .collect();
    Ok(report)
}

fn subject<'a>(doc: &'a Document, namespaces: &'a BTreeMap<String, Labels>) -> Subject<'a> {
    let namespace = match doc.namespace() {
        "" => "default",
        ns => ns,
    };
    Subject {
        namespace,
        namespace_labels: namespaces.get(namespace),
        user: "",
        groups: &[],
    }
}

/// The intent of creating this object, if it carries pod specs.
fn workload_intent(label: &str, doc: &Document) -> Result<Option<Intent>, CheckError> {
    let group = doc.api_version().rsplit_once('/').map_or("", |(g, _)| g);
    let Some(carrier) = PodCarrier::for_kind(group, doc.kind()) else {
        return Ok(None);
    };
    let images = workload_images(carrier, &doc.object).map_err(|e| CheckError::Manifest {
        path: format!("{label}:{}", doc.line),
        message: e.to_string(),
    })?;
    Ok(Some(Intent::Workload { images }))
}

fn record(label: &str, doc: &Document, namespace: &str, decision: Decision, report: &mut Report) {
    for v in decision.violations {
        if v.outcome == Outcome::Denied {
            report.denied += 1;
        }
        report.findings.push(Finding {
            source: label.to_owned(),
            document: doc.index,
            line: doc.line,
            kind: doc.kind().to_owned(),
            namespace: namespace.to_owned(),
            name: doc.name().to_owned(),
            policy: v.policy,
            mode: v.mode.as_str(),
            decision: v.outcome.as_str(),
            reason: v.reason.as_str(),
            container: v.container,
            image: v.image,
            message: v.message,
        });
    }
    // Past the evaluator's bound, violations are counted: one finding says how many.
    for o in decision.omitted {
        if o.outcome == Outcome::Denied {
            report.denied += usize::try_from(o.count).unwrap_or(usize::MAX);
        }
        report.findings.push(Finding {
            source: label.to_owned(),
            document: doc.index,
            line: doc.line,
            kind: doc.kind().to_owned(),
            namespace: namespace.to_owned(),
            name: doc.name().to_owned(),
            message: format!("and {} more {} violations, not listed", o.count, o.reason),
            policy: o.policy,
            mode: o.mode.as_str(),
            decision: o.outcome.as_str(),
            reason: o.reason.as_str(),
            container: None,
            image: None,
        });
    }
}

fn collect_sources(path: &Path, out: &mut Vec<(String, String)>) -> Result<(), CheckError> {
    let read_error = |source| CheckError::Read {
        path: path.display().to_string(),
        source,
    };
    if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(read_error)?;
        out.push(("<stdin>".to_owned(), text));
        return Ok(());
    }
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(read_error)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for entry in entries {
            let is_manifest = entry
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"));
            if entry.is_dir() || is_manifest {
                collect_sources(&entry, out)?;
            }
        }
        return Ok(());
    }
    let text = std::fs::read_to_string(path).map_err(read_error)?;
    out.push((path.display().to_string(), text));
    Ok(())
}

fn print_human(report: &Report) {
    let mut last = None;
    for f in &report.findings {
        let object = (&f.source, f.document, f.line, &f.kind, &f.name);
        if last != Some(object) {
            println!(
                "{}:{} {}/{} (namespace {})",
                f.source, f.line, f.kind, f.name, f.namespace
            );
            last = Some(object);
        }
        let marker = match f.decision {
            "denied" => "DENY ",
            _ => "AUDIT",
        };
        println!("  {marker} [{}] {}: {}", f.policy, f.reason, f.message);
    }
    for n in &report.namespace_labels {
        let policies = n.policies.join(", ");
        match &n.from {
            Some(from) => println!(
                "note: namespace {:?} selected by policies {policies} with the labels of its \
                 Namespace at {from}; at admission the cluster's labels decide",
                n.namespace
            ),
            None => println!(
                "note: namespace {:?} is not in the input, so policies {policies} applied as if \
                 their namespaceSelector matched; at admission the cluster's labels decide",
                n.namespace
            ),
        }
    }
    let audited = report.findings.len() - report.denied;
    println!(
        "{} object(s), {} workload(s): {} denied, {} audit finding(s)",
        report.objects, report.workloads, report.denied, audited
    );
}
