//! Manifests as `fixity check` reads them (YAML with merge keys and duplicate keys as kubectl
//! reads them, multi-document, `List` kinds), under the policy with every rule (less the
//! signature rule, which would ask a registry).
//!
//! Properties: `check` judges a file as it judges its canonical form (every document written
//! again as JSON); and each workload `check` reads is judged by the webhook as `check` judged
//! it: denied by the webhook exactly when `check` denies it.
#![no_main]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use fixity::admission::Reviewer;
use fixity::audit::Metrics;
use fixity::cli::check::{CheckArgs, Output, RegistryArgs, Report, check};
use fixity::policy::PolicyStore;
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

struct Harness {
    dir: PathBuf,
    runtime: tokio::runtime::Runtime,
    reviewer: Reviewer,
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("fixity-fuzz-manifest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temp dir");
        std::fs::write(dir.join("policy.yaml"), fixity_fuzz::every_rule_yaml(false))
            .expect("the policy file");
        let store = Arc::new(PolicyStore::fixed(fixity_fuzz::every_rule(false)));
        Harness {
            dir,
            runtime: tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime"),
            reviewer: Reviewer::new(store, Arc::new(Metrics::default())),
        }
    })
}

fn run_check(h: &Harness, text: &str) -> Option<Report> {
    let file = h.dir.join("input.yaml");
    std::fs::write(&file, text).expect("the input file");
    let args = CheckArgs {
        paths: vec![file],
        policies: vec![h.dir.join("policy.yaml")],
        output: Output::Json,
        registry: RegistryArgs {
            insecure_registries: Vec::new(),
            token_realms: Vec::new(),
            verify_timeout_ms: 1000,
        },
    };
    check(&args).ok()
}

/// An object of the input: its document (the items of a `List` share one), kind, namespace
/// and name.
type Object = (usize, String, String, String);

/// Denials by object: (reason, container, image).
fn denials(
    report: &Report,
) -> BTreeMap<Object, BTreeSet<(String, Option<String>, Option<String>)>> {
    let mut out: BTreeMap<Object, BTreeSet<_>> = BTreeMap::new();
    for f in report.findings.iter().filter(|f| f.decision == "denied") {
        let object = (
            f.document,
            f.kind.clone(),
            f.namespace.clone(),
            f.name.clone(),
        );
        out.entry(object).or_default().insert((
            f.reason.to_owned(),
            f.container.clone(),
            f.image.clone(),
        ));
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let h = harness();
    let Ok(documents) = fixity::manifest::parse(text) else {
        assert!(run_check(h, text).is_none(), "check judged unreadable YAML");
        return;
    };
    let report = run_check(h, text);
    let canonical: Vec<String> = documents.iter().map(|d| d.object.to_string()).collect();
    let again = run_check(h, &canonical.join("\n---\n"));
    match (&report, &again) {
        (Some(a), Some(b)) => {
            assert_eq!(
                a.denied, b.denied,
                "{text:?}: the canonical form is judged otherwise"
            );
            assert_eq!(
                denials(a).values().collect::<Vec<_>>(),
                denials(b).values().collect::<Vec<_>>()
            );
        }
        (None, None) => {}
        _ => panic!("{text:?}: check reads it or its canonical form, not both"),
    }
    let Some(report) = report else {
        return;
    };
    let denied = denials(&report);
    for doc in &documents {
        let (group, version) = doc
            .api_version()
            .rsplit_once('/')
            .unwrap_or(("", doc.api_version()));
        if fixity::admission::review::PodCarrier::for_kind(group, doc.kind()).is_none() {
            continue;
        }
        let namespace = match doc.namespace() {
            "" => "default",
            ns => ns,
        };
        let object = (
            doc.index,
            doc.kind().to_owned(),
            namespace.to_owned(),
            doc.name().to_owned(),
        );
        let review = json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "manifest-1",
                "kind": {"group": group, "version": version, "kind": doc.kind()},
                "resource": {"group": group, "version": version,
                             "resource": format!("{}s", doc.kind().to_ascii_lowercase())},
                "operation": "CREATE",
                "namespace": namespace,
                "name": doc.name(),
                "userInfo": {"username": "dev"},
                "object": doc.object,
            }
        });
        let body = serde_json::to_vec(&review).expect("a review serialises");
        let answer = h.runtime.block_on(h.reviewer.review(&body));
        let answer_json: Value = serde_json::from_slice(&answer.body).expect("the answer is JSON");
        assert_eq!(
            answer.allowed,
            !denied.contains_key(&object),
            "check and the webhook disagree on {object:?}: {answer_json}"
        );
    }
});
