//! `fixity report`: what the background scanner found, from the reports it wrote, or (`--scan`)
//! from evaluating the cluster now, without the server, with the same code. A table by
//! default, JSON on request. Exit codes: 0 no Enforce failures, 1 an Enforce policy has
//! failures (a pipeline gate against a staging cluster), 2 the findings could not be had.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::jiff::Timestamp;
use kube::api::ListParams;
use kube::core::PartialObjectMeta;
use kube::{Api, Client, ResourceExt};
use serde::Serialize;

use crate::cli::check::RegistryArgs;
use crate::cli::serve::ReportFormat;
use crate::policy::store::Labels;
use crate::policy::{CompiledPolicy, ImmutabilityPolicy, Mode, refs};
use crate::scan::inventory;
use crate::scan::report::{self, LIMIT_RULE, Limits, ReportObject, ReportResult, Stamp, Stamps};
use crate::scan::results::{Judge, RegistryLimits};
use crate::verify::checker::Limits as CheckLimits;
use crate::verify::credentials::pull_secrets::PullSecrets;

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Evaluate the cluster now (policies, workloads, signatures) instead of reading the
    /// reports the server wrote; needs only read access.
    #[arg(long)]
    pub scan: bool,
    /// Only this namespace.
    #[arg(long, short)]
    pub namespace: Option<String>,
    /// Only this policy.
    #[arg(long)]
    pub policy: Option<String>,
    /// Only results with this reason code (MutableTag, UnsignedImage, ImageDrift, Tainted, ...).
    #[arg(long)]
    pub reason: Option<String>,
    /// Also list passing results.
    #[arg(long)]
    pub all: bool,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// The report API the server writes (without --scan).
    #[arg(long, value_enum, default_value_t = ReportFormat::Openreports)]
    pub reports: ReportFormat,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// With --scan: fetch signatures with pull secrets, as `serve --registry-credentials`.
    #[arg(long, requires = "scan")]
    pub registry_credentials: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// One result, as the table and the JSON show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Row {
    pub namespace: String,
    pub kind: String,
    pub name: String,
    pub policy: String,
    pub mode: String,
    pub rule: String,
    pub result: String,
    pub reason: String,
    pub message: String,
}

/// Everything `fixity report` prints.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Findings {
    pub results: Vec<Row>,
    /// Per policy, across the cluster (the cluster report).
    pub policies: Vec<Row>,
    /// Results a report could not list, counted by policy.
    pub not_listed: Vec<Row>,
    pub fail: usize,
    pub warn: usize,
    pub pass: usize,
    /// Failures among the results not listed, for the policies shown.
    pub fail_not_listed: usize,
}

pub fn run(args: ReportArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fixity report: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let findings = match runtime.block_on(findings(&args)) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("fixity report: {e:#}");
            return ExitCode::from(2);
        }
    };
    match args.output {
        Output::Table => print_table(&findings, &args),
        Output::Json => match serde_json::to_string_pretty(&findings) {
            Ok(json) => println!("{json}"),
            Err(e) => {
                eprintln!("fixity report: {e}");
                return ExitCode::from(2);
            }
        },
    }
    if findings.fail + findings.fail_not_listed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// The findings `args` ask for.
pub async fn findings(args: &ReportArgs) -> anyhow::Result<Findings> {
    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let reports = if args.scan {
        scan_now(&client, args).await?
    } else {
        let Some(format) = args.reports.format() else {
            bail!("--reports none: there are no reports to read; use --scan");
        };
        let found = report::read(&client, format, args.namespace.as_deref()).await?;
        if found.is_empty() {
            bail!(
                "no fixity reports found: is `fixity serve --scan` running? (`fixity report \
                 --scan` evaluates the cluster without it)"
            );
        }
        found
    };
    Ok(select(&reports, args))
}

/// Evaluates the cluster as the scanner does and returns the reports it would write, unbounded.
async fn scan_now(client: &Client, args: &ReportArgs) -> anyhow::Result<Vec<ReportObject>> {
    let policies = cluster_policies(client).await?;
    let namespaces: Api<PartialObjectMeta<Namespace>> = Api::all(client.clone());
    let labels: HashMap<String, Arc<Labels>> = namespaces
        .list_metadata(&ListParams::default())
        .await
        .context("listing namespaces")?
        .items
        .into_iter()
        .map(|ns| (ns.name_any(), Arc::new(ns.labels().clone())))
        .collect();
    let inventory = inventory::collect(client, args.namespace.as_deref(), inventory::PAGE).await?;
    let checker = Arc::new(
        args.registry
            .checker(Arc::default(), CheckLimits::default())
            .context("starting signature verification")?,
    );
    let pull_secrets = args
        .registry_credentials
        .then(|| PullSecrets::new(client.clone()));
    let lookup = |ns: &str| labels.get(ns).cloned();
    let judge = Judge {
        policies: &policies,
        labels: &lookup,
        checker: Some(&checker),
        checks_on: None,
        pull_secrets: pull_secrets.as_ref(),
        limits: RegistryLimits {
            concurrency: 8,
            per_second: 50.0,
        },
        replacements: None,
    };
    let (found, _) = judge.run(&inventory).await;
    let modes: Vec<(String, Mode)> = policies.iter().map(|p| (p.name.clone(), p.mode)).collect();
    let now = Stamp {
        seconds: Timestamp::now().as_second(),
        nanos: 0,
    };
    Ok(report::build(
        report::Format::OpenReports,
        &found,
        &modes,
        Limits::NONE,
        &mut Stamps::default(),
        now,
    ))
}

/// The policies in force in the cluster, compiled as the server compiles them; an invalid one
/// is left out, as the server leaves it out, and said so on stderr.
async fn cluster_policies(client: &Client) -> anyhow::Result<Vec<CompiledPolicy>> {
    let api: Api<ImmutabilityPolicy> = Api::all(client.clone());
    let listed = api
        .list(&ListParams::default())
        .await
        .context("listing ImmutabilityPolicies")?;
    let data = refs::RefCache::default()
        .read_all(
            &refs::ApiReader(client.clone()),
            listed.items.iter().map(|p| &p.spec),
        )
        .await;
    let mut out = Vec::new();
    for policy in &listed.items {
        match CompiledPolicy::from_cluster(policy.name_any(), &policy.spec, &data) {
            Ok(p) => {
                for why in p.unreadable() {
                    eprintln!(
                        "fixity report: policy {:?} is in force without a reference, and the \
                         images its rules cover are denied: {why}",
                        policy.name_any()
                    );
                }
                out.push(p);
            }
            Err(e) => eprintln!(
                "fixity report: policy {:?} is not in force and is left out: {e}",
                policy.name_any()
            ),
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

fn row(report: &ReportObject, r: &ReportResult) -> Row {
    let resource = r.resources.first();
    let field = |f: fn(&k8s_openapi::api::core::v1::ObjectReference) -> Option<&String>| {
        resource.and_then(f).cloned().unwrap_or_default()
    };
    let property = |k: &str| r.properties.get(k).cloned().unwrap_or_default();
    Row {
        namespace: report
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| field(|o| o.namespace.as_ref())),
        kind: field(|o| o.kind.as_ref()),
        name: field(|o| o.name.as_ref()),
        policy: r.policy.clone(),
        mode: property("mode"),
        rule: r.rule.clone(),
        result: r.result.clone(),
        reason: property("reason"),
        message: r.message.clone(),
    }
}

/// The rows `args` ask for, and their counts.
pub fn select(reports: &[ReportObject], args: &ReportArgs) -> Findings {
    let mut out = Findings::default();
    let wanted = |r: &Row| {
        args.namespace
            .as_ref()
            .is_none_or(|n| *n == r.namespace || r.namespace.is_empty())
            && args
                .policy
                .as_ref()
                .is_none_or(|p| *p == r.policy || r.policy == "*")
    };
    for report in reports {
        let cluster = report.metadata.namespace.is_none();
        for result in &report.results {
            let r = row(report, result);
            if !wanted(&r) {
                continue;
            }
            if result.rule == LIMIT_RULE {
                let hidden_fail = result
                    .properties
                    .get("hiddenFail")
                    .and_then(|n| n.parse::<usize>().ok())
                    .unwrap_or(0);
                out.fail_not_listed += hidden_fail;
                out.not_listed.push(r);
            } else if cluster {
                out.policies.push(r);
            } else if args.reason.as_ref().is_none_or(|want| *want == r.reason) {
                match r.result.as_str() {
                    "fail" => out.fail += 1,
                    "warn" => out.warn += 1,
                    _ => out.pass += 1,
                }
                if args.all || r.result != "pass" {
                    out.results.push(r);
                }
            }
        }
    }
    // A reason filter cannot see into what a report did not list: those failures still count
    // only when no reason was asked for.
    if args.reason.is_some() {
        out.fail_not_listed = 0;
    }
    out
}

fn print_table(f: &Findings, args: &ReportArgs) {
    let header = [
        "NAMESPACE",
        "WORKLOAD",
        "POLICY",
        "RULE",
        "RESULT",
        "REASON",
        "MESSAGE",
    ];
    let cells: Vec<[String; 7]> = f
        .results
        .iter()
        .map(|r| {
            [
                r.namespace.clone(),
                format!("{}/{}", r.kind, r.name),
                r.policy.clone(),
                r.rule.clone(),
                r.result.clone(),
                r.reason.clone(),
                r.message.clone(),
            ]
        })
        .collect();
    if cells.is_empty() {
        println!("no failing or warning results");
    } else {
        let mut widths = header.map(str::len);
        for row in &cells {
            for (w, c) in widths.iter_mut().zip(row) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |row: &[String]| {
            let mut text = String::new();
            for (i, c) in row.iter().enumerate() {
                if i + 1 == row.len() {
                    text.push_str(c);
                } else {
                    text.push_str(&format!("{c:<w$}  ", w = widths[i]));
                }
            }
            text
        };
        println!("{}", line(&header.map(str::to_owned)));
        for row in &cells {
            println!("{}", line(row));
        }
    }
    for r in &f.not_listed {
        println!("{} (not listed): {}", r.namespace, r.message);
    }
    println!();
    for p in &f.policies {
        println!("policy {} ({}): {}", p.policy, p.mode, p.message);
    }
    let hidden = if args.all || f.pass == 0 {
        String::new()
    } else {
        format!("; {} passing results not shown (--all shows them)", f.pass)
    };
    println!("{} fail, {} warn, {} pass{hidden}", f.fail, f.warn, f.pass);
    if args.reason.is_some() && !f.not_listed.is_empty() {
        println!("note: --reason cannot filter the results a report did not list");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::results::{self, Finding, Rule, Verdict};

    fn finding(
        ns: &str,
        name: &str,
        policy: &str,
        verdict: Verdict,
        reason: &'static str,
    ) -> Finding {
        let reasons: &[&'static str] = if verdict == Verdict::Pass {
            &[]
        } else {
            &[reason]
        };
        results::sample(ns, name, policy, Rule::ImageReference, verdict, reasons)
    }

    fn args(extra: &[&str]) -> ReportArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrap {
            #[command(flatten)]
            args: ReportArgs,
        }
        let mut all = vec!["report"];
        all.extend_from_slice(extra);
        Wrap::parse_from(all).args
    }

    fn reports(limits: Limits) -> Vec<ReportObject> {
        let mut findings = vec![
            finding("a", "web", "prod", Verdict::Fail, "MutableTag"),
            finding("a", "db", "prod", Verdict::Pass, ""),
            finding("b", "api", "audit", Verdict::Warn, "ImageDrift"),
        ];
        for i in 0..20 {
            findings.push(finding(
                "c",
                &format!("w{i:02}"),
                "prod",
                Verdict::Fail,
                "MutableTag",
            ));
        }
        report::build(
            report::Format::OpenReports,
            &findings,
            &[
                ("prod".into(), Mode::Enforce),
                ("audit".into(), Mode::Audit),
            ],
            limits,
            &mut Stamps::default(),
            Stamp::default(),
        )
    }

    #[test]
    fn filters_and_the_gate() {
        let all = reports(Limits::NONE);
        let f = select(&all, &args(&[]));
        assert_eq!((f.fail, f.warn, f.pass), (21, 1, 1));
        assert_eq!(f.results.len(), 22, "passes only with --all");
        assert_eq!(f.policies.len(), 2, "one cluster result per policy");
        let f = select(&all, &args(&["--all", "-n", "a"]));
        assert_eq!(f.results.len(), 2);
        assert_eq!(f.results[0].name, "web");
        assert_eq!(f.results[0].reason, "MutableTag");
        assert_eq!(f.results[0].namespace, "a");
        let f = select(&all, &args(&["--policy", "audit"]));
        assert_eq!(
            (f.fail, f.warn),
            (0, 1),
            "an Audit policy never fails the gate"
        );
        let f = select(&all, &args(&["--reason", "ImageDrift"]));
        assert_eq!((f.fail, f.warn), (0, 1));
    }

    #[test]
    fn failures_a_report_could_not_list_still_fail_the_gate() {
        let bounded = reports(Limits {
            max_results: 10,
            max_bytes: 1 << 20,
        });
        let f = select(&bounded, &args(&["-n", "c"]));
        assert_eq!(f.results.len(), 9);
        assert_eq!(f.fail_not_listed, 11);
        assert_eq!(f.not_listed.len(), 1);
        let f = select(&bounded, &args(&["-n", "c", "--policy", "audit"]));
        assert_eq!((f.fail, f.fail_not_listed), (0, 0), "not this policy's");
        let f = select(&bounded, &args(&["-n", "c", "--reason", "ImageDrift"]));
        assert_eq!(f.fail_not_listed, 0, "a reason filter cannot see into them");
    }
}
