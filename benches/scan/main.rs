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
//! stretch of time. `--baseline BIN` measures another fixity binary (an older build, say) the
//! same way first, on the same cluster and images, and prints the two side by side.
//!
//! Where the CPU went, from the kernel's per-thread scheduler statistics
//! (`/proc/<pid>/task/<tid>/schedstat`: time on a CPU, time runnable but waiting for one): for
//! fixity's scan thread, its webhook workers, the API server and etcd, per second of scanning
//! and of idle slices. A worker that waits for a CPU is a review that waits.

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
    /// Another fixity binary to measure first, in the same run.
    #[arg(long)]
    baseline: Option<std::path::PathBuf>,
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

    let mut runs = Vec::new();
    if let Some(baseline) = &options.baseline {
        runs.push(("baseline", baseline.clone()));
    }
    runs.push(("this build", Path::new(common::BIN).to_owned()));
    let mut measured = Vec::new();
    for (name, binary) in &runs {
        eprintln!("measuring {name} ({}) ...", binary.display());
        let dir = work.path().join(name.replace(' ', "-"));
        std::fs::create_dir_all(&dir)?;
        let figures = measure(binary, &dir, &lab, &client, &images[0], &options).await?;
        print(name, &figures, &options);
        measured.push((name, figures));
    }
    if let [(_, before), (_, after)] = measured.as_slice() {
        let ratio = |lat: &[u64], q| quantile(lat, q).map(|n| n as f64);
        println!("\n== this build / baseline, same run");
        for (what, q) in [("p50", 0.5), ("p99", 0.99)] {
            for (state, a, b) in [
                ("no scan running", &before.idle, &after.idle),
                ("scan running", &before.scanning, &after.scanning),
            ] {
                if let (Some(a), Some(b)) = (ratio(a, q), ratio(b, q)) {
                    println!("{what} {state:>16}: {:.2}", b / a);
                }
            }
        }
        for (what, a, b) in [
            ("cold scan", &before.cold, &after.cold),
            ("warm scan", &before.warm, &after.warm),
        ] {
            let ms = |s: &Value| s["duration_ms"].as_u64().unwrap_or(0) as f64;
            println!("{what} time: {:.2}", ms(b) / ms(a).max(1.0));
        }
    }
    Ok(())
}

/// What one fixity binary showed.
struct Figures {
    cold: Value,
    cold_requests: usize,
    warm: Value,
    warm_requests: usize,
    objects: usize,
    bytes: usize,
    rss: Option<f64>,
    peak: Option<f64>,
    idle: Vec<u64>,
    scanning: Vec<u64>,
    cpu: Cpu,
}

async fn measure(
    binary: &Path,
    dir: &Path,
    lab: &Lab,
    client: &Client,
    image: &str,
    options: &Options,
) -> anyhow::Result<Figures> {
    let before = lab.logged_requests();
    let fixity = start_fixity(binary, dir, &lab.host)?;
    let cold = fixity.scan_after(0).await?;
    let cold_requests = lab.logged_requests() - before;
    // Whatever the first scan left to notice (the policy's first status) has been scanned
    // again by now, or is triggered here: either way the next scan is warm.
    let seen = fixity.scans().len();
    let requests = lab.logged_requests();
    touch(client).await?;
    let warm = fixity.scan_after(seen).await?;
    let warm_requests = lab.logged_requests() - requests;
    let (objects, bytes) = report_size(client).await?;
    let pid = fixity.child.id();
    let rss = probe::status_mib(pid, "VmRSS");
    let peak = probe::status_mib(pid, "VmHWM");

    eprintln!(
        "admission under load, {:.0} s at {:.0}/s ...",
        options.secs, options.rate
    );
    let pids = Pids::of(pid);
    let (idle, scanning, cpu) = admission(&fixity, &pids, client, image, options).await?;
    Ok(Figures {
        cold,
        cold_requests,
        warm,
        warm_requests,
        objects,
        bytes,
        rss,
        peak,
        idle,
        scanning,
        cpu,
    })
}

fn print(name: &str, f: &Figures, options: &Options) {
    let field = |s: &Value, k: &str| s[k].as_u64().unwrap_or(0);
    println!(
        "\n== {name}: scan of {} pods, {DEPLOYMENTS} Deployments, {DEPLOYMENTS} signed images",
        DEPLOYMENTS * REPLICAS
    );
    for (name, scan, registry) in [
        ("cold", &f.cold, f.cold_requests),
        ("warm", &f.warm, f.warm_requests),
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
        "reports: {} objects, {} bytes (fixity counted {} objects, {} bytes)",
        f.objects,
        f.bytes,
        field(&f.warm, "report_objects"),
        field(&f.warm, "report_bytes")
    );
    let mib = |v: Option<f64>| v.map_or("n/a".to_owned(), |v| format!("{v:.1} MiB"));
    println!(
        "fixity RSS with the scanner on: {} now, {} peak",
        mib(f.rss),
        mib(f.peak)
    );
    println!(
        "admission at {:.0}/s, slices of {} ms:",
        options.rate, options.slice_ms
    );
    let ms = |ns: Option<u64>| ns.map_or("n/a".to_owned(), |n| format!("{:.3} ms", n as f64 / 1e6));
    for (name, lat) in [("no scan running", &f.idle), ("scan running", &f.scanning)] {
        println!(
            "{name:>16}: {:>6} reviews  p50 {}  p99 {}  p99.9 {}  max {}",
            lat.len(),
            ms(quantile(lat, 0.5)),
            ms(quantile(lat, 0.99)),
            ms(quantile(lat, 0.999)),
            ms(lat.last().copied())
        );
    }
    if let (Some(a), Some(b)) = (quantile(&f.idle, 0.99), quantile(&f.scanning, 0.99)) {
        println!("p99 scanning / idle: {:.2}", b as f64 / a as f64);
    }
    if let (Some(a), Some(b)) = (quantile(&f.idle, 0.5), quantile(&f.scanning, 0.5)) {
        println!("p50 scanning / idle: {:.2}", b as f64 / a as f64);
    }
    println!("CPU per second of load, ms on a CPU / ms waiting for one:");
    for (name, (watched, secs)) in [
        ("no scan running", f.cpu.idle),
        ("scan running", f.cpu.scanning),
    ] {
        let per = |s: Sched| {
            let ms = |ns: u64| ns as f64 / 1e6 / secs.max(1e-9);
            format!("{:>5.0} / {:>4.0}", ms(s.run_ns), ms(s.wait_ns))
        };
        println!(
            "{name:>16}: webhook workers {}  scan thread {}  kube-apiserver {}  etcd {}",
            per(watched.workers),
            per(watched.scan),
            per(watched.apiserver),
            per(watched.etcd)
        );
    }
}

/// Time on a CPU and time runnable but waiting for one, in nanoseconds.
#[derive(Debug, Default, Clone, Copy)]
struct Sched {
    run_ns: u64,
    wait_ns: u64,
}

impl Sched {
    fn since(self, before: Sched) -> Sched {
        Sched {
            run_ns: self.run_ns.saturating_sub(before.run_ns),
            wait_ns: self.wait_ns.saturating_sub(before.wait_ns),
        }
    }

    fn plus(self, other: Sched) -> Sched {
        Sched {
            run_ns: self.run_ns + other.run_ns,
            wait_ns: self.wait_ns + other.wait_ns,
        }
    }

    /// The threads of `pid` whose name `select` takes, summed.
    fn of(pid: u32, select: impl Fn(&str) -> bool) -> Sched {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return Sched::default();
        };
        let mut total = Sched::default();
        for task in tasks.flatten() {
            let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if !select(name.trim()) {
                continue;
            }
            let stat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
            let mut fields = stat
                .split_whitespace()
                .map(|f| f.parse::<u64>().unwrap_or(0));
            total.run_ns += fields.next().unwrap_or(0);
            total.wait_ns += fields.next().unwrap_or(0);
        }
        total
    }
}

/// The processes whose threads the bench watches.
struct Pids {
    fixity: u32,
    apiserver: Option<u32>,
    etcd: Option<u32>,
}

impl Pids {
    /// fixity's, and the cluster's from the `pids` file tests/cluster/up.sh writes.
    fn of(fixity: u32) -> Self {
        let listed = std::env::var("FIXITY_CLUSTER_DIR")
            .ok()
            .and_then(|dir| std::fs::read_to_string(Path::new(&dir).join("pids")).ok())
            .unwrap_or_default();
        let find = |name: &str| {
            listed.lines().find_map(|l| {
                let (n, pid) = l.split_once(' ')?;
                (n == name).then(|| pid.trim().parse().ok()).flatten()
            })
        };
        Pids {
            fixity,
            apiserver: find("kube-apiserver"),
            etcd: find("etcd"),
        }
    }

    fn now(&self) -> Watched {
        let all = |pid: Option<u32>| pid.map(|p| Sched::of(p, |_| true)).unwrap_or_default();
        Watched {
            // The name tokio gives the webhook runtime's threads.
            workers: Sched::of(self.fixity, |n| n == "tokio-rt-worker"),
            scan: Sched::of(self.fixity, |n| n == "fixity-scan"),
            apiserver: all(self.apiserver),
            etcd: all(self.etcd),
        }
    }
}

/// One snapshot, or the difference of two.
#[derive(Debug, Default, Clone, Copy)]
struct Watched {
    workers: Sched,
    scan: Sched,
    apiserver: Sched,
    etcd: Sched,
}

impl Watched {
    fn since(self, before: Watched) -> Watched {
        Watched {
            workers: self.workers.since(before.workers),
            scan: self.scan.since(before.scan),
            apiserver: self.apiserver.since(before.apiserver),
            etcd: self.etcd.since(before.etcd),
        }
    }

    fn plus(self, other: Watched) -> Watched {
        Watched {
            workers: self.workers.plus(other.workers),
            scan: self.scan.plus(other.scan),
            apiserver: self.apiserver.plus(other.apiserver),
            etcd: self.etcd.plus(other.etcd),
        }
    }
}

/// Scheduler time summed over the idle and the scanning slices, with their lengths in seconds.
#[derive(Debug, Default, Clone, Copy)]
struct Cpu {
    idle: (Watched, f64),
    scanning: (Watched, f64),
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

fn start_fixity(binary: &Path, dir: &Path, registry: &str) -> anyhow::Result<Fixity> {
    let (addr, health) = (common::free_addr(), common::free_addr());
    let log = dir.join("fixity.log");
    let child = Command::new(binary)
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
    pids: &Pids,
    client: &Client,
    image: &str,
    options: &Options,
) -> anyhow::Result<(Vec<u64>, Vec<u64>, Cpu)> {
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
    let mut cpu = Cpu::default();
    let until = Instant::now() + Duration::from_secs_f64(options.secs);
    while Instant::now() < until {
        let before = fixity.scanning();
        let (sched, started) = (pids.now(), Instant::now());
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
        let slice = (pids.now().since(sched), started.elapsed().as_secs_f64());
        let add = |(w, s): (Watched, f64)| (w.plus(slice.0), s + slice.1);
        match (before, fixity.scanning()) {
            (Some(false), Some(false)) => {
                idle.extend(outcome.latencies);
                cpu.idle = add(cpu.idle);
            }
            (Some(true), Some(true)) => {
                scanning.extend(outcome.latencies);
                cpu.scanning = add(cpu.scanning);
            }
            _ => {}
        }
    }
    trigger.abort();
    idle.sort_unstable();
    scanning.sort_unstable();
    Ok((idle, scanning, cpu))
}
