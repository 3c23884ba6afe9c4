//! The background-scan benchmark (`benches/scan/run.sh`, see BENCHMARKS.md): 1,000 pods of 10
//! Deployments of 10 images signed by the real cosign in a real registry (`crane registry
//! serve`), in a real kube-apiserver; the release `fixity serve --scan` judges them.
//!
//! Prints the cold scan (fresh cache) and a warm one (the next scan): time, signature checks
//! and registry requests (counted in the registry's own log); the report objects and bytes;
//! fixity's RSS with the scanner on; and admission latency from the same run, with and
//! without a scan under way. For the latter the load client (`benches/load/client.rs`) sends
//! pod reviews at a fixed rate in short slices while scans are triggered again and again; a
//! slice counts as "scanning" when `fixity_scan_running` was 1 at both its ends and as "idle"
//! when 0 at both (mixed slices are left out), so both figures come from one process in one
//! stretch of time.

#[allow(dead_code)] // the load client's other modes serve the load bench
#[path = "../load/client.rs"]
mod client;
#[path = "../../tests/common/mod.rs"]
mod common;
#[allow(dead_code)] // the load bench's other probes
#[path = "../load/probe.rs"]
mod probe;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use hyper::body::Bytes;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, CustomResourceExt, ResourceExt};
use serde_json::{Value, json};

use client::{Load, Pace, quantile};
use common::registry::Lab;
use fixity::policy::ImmutabilityPolicy;

const NAMESPACE: &str = "bench-scan";
const DEPLOYMENTS: usize = 10;
const REPLICAS: usize = 100;

/// Options after `--` (cargo bench itself adds `--bench`).
#[derive(Debug, clap::Parser)]
struct Options {
    /// Load time, in seconds.
    #[arg(long, default_value_t = 40.0)]
    secs: f64,
    /// Reviews per second, open loop.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Length of one slice of load, in milliseconds.
    #[arg(long = "slice-ms", default_value_t = 200)]
    slice_ms: u64,
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> ExitCode {
    // `cargo test --benches` runs bench targets without `--bench`: a benchmark is not a test.
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("the scan benchmark runs with: benches/scan/run.sh");
        return ExitCode::SUCCESS;
    }
    let options = <Options as clap::Parser>::parse();
    if rustls::crypto::ring::default_provider()
        .install_default()
        .is_err()
    {
        eprintln!("a TLS crypto provider was already installed");
        return ExitCode::FAILURE;
    }
    let run = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(bench(options)));
    match run {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("scan benchmark failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// fixity under test, killed on drop.
struct Fixity {
    child: Child,
    addr: SocketAddr,
    health: SocketAddr,
    log: std::path::PathBuf,
}

impl Drop for Fixity {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Fixity {
    fn scans(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"scan finished\""))
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    async fn scan_after(&self, seen: usize) -> anyhow::Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            if let Some(scan) = self.scans().into_iter().nth(seen) {
                return Ok(scan);
            }
            if Instant::now() > deadline {
                bail!("no scan finished; fixity log: {}", self.log.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn scanning(&self) -> Option<bool> {
        let (_, body) = probe::http_get(self.health, "/metrics")?;
        let line = body
            .lines()
            .find(|l| l.starts_with("fixity_scan_running "))?;
        Some(line.ends_with(" 1"))
    }
}

async fn bench(options: Options) -> anyhow::Result<()> {
    std::env::var("KUBECONFIG").context("KUBECONFIG is not set: run benches/scan/run.sh")?;
    let work = tempfile::tempdir()?;
    let client = Client::try_default().await?;

    eprintln!("pushing and signing {DEPLOYMENTS} images ...");
    let lab = Lab::start();
    let key = lab.key("release");
    let mut images = Vec::new();
    for i in 0..DEPLOYMENTS {
        let digest = lab.push_image("bench/app", &format!("v{i}"), &format!("build {i}"));
        let image = lab.reference("bench/app", &digest);
        lab.sign(&key, &image, true, &[]);
        images.push(image);
    }

    eprintln!("creating {} pods ...", DEPLOYMENTS * REPLICAS);
    install_crds(&client).await?;
    let created = Instant::now();
    populate(&client, &images).await?;
    eprintln!("  created in {:.1} s", created.elapsed().as_secs_f64());
    let spec: String = key
        .required_on(&lab.host)
        .lines()
        .map(|l| format!("  {l}\n"))
        .collect();
    let policy: ImmutabilityPolicy = serde_norway::from_str(&format!(
        "apiVersion: fixity.dev/v1alpha1\nkind: ImmutabilityPolicy\nmetadata: {{name: bench}}\nspec:\n{spec}"
    ))?;
    Api::<ImmutabilityPolicy>::all(client.clone())
        .create(&PostParams::default(), &policy)
        .await?;

    let before = lab.logged_requests();
    let fixity = start_fixity(work.path(), &lab.host)?;
    let cold = fixity.scan_after(0).await?;
    let cold_requests = lab.logged_requests() - before;
    // Whatever the first scan left to notice (the policy's first status) has been scanned
    // again by now, or is triggered here: either way the next scan is warm.
    let seen = fixity.scans().len();
    let requests = lab.logged_requests();
    touch(&client).await?;
    let warm = fixity.scan_after(seen).await?;
    let warm_requests = lab.logged_requests() - requests;
    let (objects, bytes) = report_size(&client).await?;
    let pid = fixity.child.id();
    let rss = probe::status_mib(pid, "VmRSS");
    let peak = probe::status_mib(pid, "VmHWM");

    eprintln!(
        "admission under load, {:.0} s at {:.0}/s ...",
        options.secs, options.rate
    );
    let (idle, scanning) = admission(&fixity, &client, &images[0], &options).await?;

    let field = |s: &Value, k: &str| s[k].as_u64().unwrap_or(0);
    println!(
        "\n== scan of {} pods, {DEPLOYMENTS} Deployments, {DEPLOYMENTS} signed images",
        DEPLOYMENTS * REPLICAS
    );
    for (name, scan, registry) in [
        ("cold", &cold, cold_requests),
        ("warm", &warm, warm_requests),
    ] {
        println!(
            "{name}: {:>6} ms  {} objects, {} workloads, {} results; signature checks {} ({} cached); registry requests {registry}",
            field(scan, "duration_ms"),
            field(scan, "objects"),
            field(scan, "workloads"),
            field(scan, "results"),
            field(scan, "signature_checks"),
            field(scan, "signature_checks_cached"),
        );
    }
    println!(
        "reports: {objects} objects, {bytes} bytes (fixity counted {} objects, {} bytes)",
        field(&warm, "report_objects"),
        field(&warm, "report_bytes")
    );
    let mib = |v: Option<f64>| v.map_or("n/a".to_owned(), |v| format!("{v:.1} MiB"));
    println!(
        "fixity RSS with the scanner on: {} now, {} peak",
        mib(rss),
        mib(peak)
    );
    println!(
        "\n== admission at {:.0}/s, one run, slices of {} ms",
        options.rate, options.slice_ms
    );
    let ms = |ns: Option<u64>| ns.map_or("n/a".to_owned(), |n| format!("{:.3} ms", n as f64 / 1e6));
    for (name, lat) in [("no scan running", &idle), ("scan running", &scanning)] {
        println!(
            "{name:>16}: {:>6} reviews  p50 {}  p99 {}  p99.9 {}  max {}",
            lat.len(),
            ms(quantile(lat, 0.5)),
            ms(quantile(lat, 0.99)),
            ms(quantile(lat, 0.999)),
            ms(lat.last().copied())
        );
    }
    if let (Some(a), Some(b)) = (quantile(&idle, 0.99), quantile(&scanning, 0.99)) {
        println!("p99 scanning / idle: {:.2}", b as f64 / a as f64);
    }
    Ok(())
}

async fn install_crds(client: &Client) -> anyhow::Result<()> {
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(client.clone());
    let apply = PatchParams::apply("fixity-bench").force();
    let policy = ImmutabilityPolicy::crd();
    crds.patch(&policy.name_any(), &apply, &Patch::Apply(&policy))
        .await?;
    let root = env!("CARGO_MANIFEST_DIR");
    let built = Command::new("bash")
        .args(["tests/tools/build.sh", "helm"])
        .current_dir(root)
        .stderr(Stdio::inherit())
        .output()?;
    let helm_dir = String::from_utf8(built.stdout)?;
    let out = Command::new(Path::new(helm_dir.trim()).join("helm"))
        .args([
            "template",
            "fixity",
            "charts/fixity",
            "--set",
            "reports.installCRDs=true",
        ])
        .args(["--show-only", "templates/report-crds.yaml"])
        .current_dir(root)
        .output()?;
    if !out.status.success() {
        bail!("helm template: {}", String::from_utf8_lossy(&out.stderr));
    }
    for doc in String::from_utf8(out.stdout)?.split("\n---") {
        let Ok(crd) = serde_norway::from_str::<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>(doc) else {
            continue;
        };
        crds.patch(&crd.name_any(), &apply, &Patch::Apply(&crd))
            .await?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(())
}

/// The namespace, 10 Deployments, their ReplicaSets and 100 pods each, written as their
/// controllers would (owner references included), without the controllers.
async fn populate(client: &Client, images: &[String]) -> anyhow::Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": NAMESPACE}}))?,
        )
        .await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NAMESPACE);
    let sets: Api<ReplicaSet> = Api::namespaced(client.clone(), NAMESPACE);
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let mut owned = Vec::new();
    for (i, image) in images.iter().enumerate() {
        let name = format!("app{i}");
        let template = json!({
            "metadata": {"labels": {"app": name}},
            "spec": {"containers": [{"name": "app", "image": image}]}
        });
        let d = deployments
            .create(&PostParams::default(), &serde_json::from_value(json!({
                "metadata": {"name": name},
                "spec": {"replicas": REPLICAS, "selector": {"matchLabels": {"app": name}}, "template": template}
            }))?)
            .await?;
        let owner = |kind: &str, o: &dyn Fn() -> (String, String)| {
            let (name, uid) = o();
            json!([{"apiVersion": "apps/v1", "kind": kind, "name": name, "uid": uid, "controller": true}])
        };
        let rs = sets
            .create(&PostParams::default(), &serde_json::from_value(json!({
                "metadata": {"name": format!("{name}-1"), "ownerReferences": owner("Deployment", &|| (d.name_any(), d.uid().unwrap_or_default()))},
                "spec": {"replicas": REPLICAS, "selector": {"matchLabels": {"app": name}}, "template": template}
            }))?)
            .await?;
        for p in 0..REPLICAS {
            owned.push(json!({
                "metadata": {"name": format!("{name}-1-{p:03}"), "labels": {"app": name},
                             "ownerReferences": owner("ReplicaSet", &|| (rs.name_any(), rs.uid().unwrap_or_default()))},
                "spec": template["spec"]
            }));
        }
    }
    let results: Vec<kube::Result<Pod>> = futures::stream::iter(owned)
        .map(|pod| {
            let pods = pods.clone();
            async move {
                let pod: Pod = serde_json::from_value(pod).map_err(kube::Error::SerdeError)?;
                pods.create(&PostParams::default(), &pod).await
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    for r in results {
        r?;
    }
    Ok(())
}

fn start_fixity(dir: &Path, registry: &str) -> anyhow::Result<Fixity> {
    let (addr, health) = (common::free_addr(), common::free_addr());
    let log = dir.join("fixity.log");
    let child = Command::new(common::BIN)
        .args(["serve", "--dev", "--dev-cert-dir"])
        .arg(dir)
        .args([
            "--addr",
            &addr.to_string(),
            "--health-addr",
            &health.to_string(),
        ])
        .args([
            "--watch-cluster",
            "--scan",
            "--namespace",
            "default",
            "--identity",
            "bench",
        ])
        .args([
            "--scan-interval-secs",
            "3600",
            // The scan alone: the figures in BENCHMARKS.md predate the evidence store.
            "--evidence-store=false",
            "--insecure-registry",
            registry,
            "--log-format",
            "json",
        ])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    Ok(Fixity {
        child,
        addr,
        health,
        log,
    })
}

/// A new label on the namespace: the scanner scans again.
async fn touch(client: &Client) -> anyhow::Result<()> {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let patch = json!({"metadata": {"labels": {"bench-touch": n.to_string()}}});
    Api::<Namespace>::all(client.clone())
        .patch(NAMESPACE, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// fixity's report objects and their JSON bytes as stored.
async fn report_size(client: &Client) -> anyhow::Result<(usize, usize)> {
    let (mut objects, mut bytes) = (0, 0);
    for (kind, plural) in [("Report", "reports"), ("ClusterReport", "clusterreports")] {
        let resource = kube::api::ApiResource {
            group: "openreports.io".into(),
            version: "v1alpha1".into(),
            api_version: "openreports.io/v1alpha1".into(),
            kind: kind.into(),
            plural: plural.into(),
        };
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
        for r in api
            .list(&ListParams::default().labels("app.kubernetes.io/managed-by=fixity"))
            .await?
            .items
        {
            objects += 1;
            bytes += serde_json::to_vec(&r)?.len();
        }
    }
    Ok((objects, bytes))
}

/// Reviews of a pod of a signed image at `options.rate`, in slices, while scans are triggered
/// every 1.5 s; latencies of the slices with no scan running, then of those with one.
async fn admission(
    fixity: &Fixity,
    client: &Client,
    image: &str,
    options: &Options,
) -> anyhow::Result<(Vec<u64>, Vec<u64>)> {
    let mut review: Value = serde_json::from_slice(&common::fixture("pod-create-pinned"))?;
    review["request"]["namespace"] = NAMESPACE.into();
    review["request"]["object"]["metadata"]["namespace"] = NAMESPACE.into();
    review["request"]["object"]["spec"]["containers"][0]["image"] = image.into();
    let body = Bytes::from(serde_json::to_vec(&review)?);
    let connector = client::connector(&fixity.log.with_file_name("ca.crt"))?;
    let mut check = client::Connection::open(&connector, fixity.addr).await?;
    let answer: Value = serde_json::from_slice(&check.review(body.clone()).await?)?;
    if answer["response"]["allowed"] != true {
        bail!("the signed pod is not admitted: {answer}");
    }
    let bodies: Arc<[Bytes]> = Arc::from(vec![body]);
    let trigger = {
        let client = client.clone();
        tokio::spawn(async move {
            loop {
                let _ = touch(&client).await;
                tokio::time::sleep(Duration::from_millis(1500)).await;
            }
        })
    };
    let (mut idle, mut scanning) = (Vec::new(), Vec::new());
    let until = Instant::now() + Duration::from_secs_f64(options.secs);
    while Instant::now() < until {
        let before = fixity.scanning();
        let outcome = client::run(
            &connector,
            fixity.addr,
            bodies.clone(),
            Load {
                pace: Pace::Open { rate: options.rate },
                connections: 4,
                duration: Duration::from_millis(options.slice_ms),
            },
        )
        .await?;
        if outcome.errors > 0 {
            bail!("review errors: {:?}", outcome.first_error);
        }
        match (before, fixity.scanning()) {
            (Some(false), Some(false)) => idle.extend(outcome.latencies),
            (Some(true), Some(true)) => scanning.extend(outcome.latencies),
            _ => {}
        }
    }
    trigger.abort();
    idle.sort_unstable();
    scanning.sort_unstable();
    Ok((idle, scanning))
}
