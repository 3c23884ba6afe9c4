//! `fixity serve`: the webhook, with policies from the cluster, from files, or built in.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};

use axum_server::tls_rustls::RustlsConfig;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

use crate::admission::Reviewer;
use crate::audit::{EnteredSink, EventSink, Metrics};
use crate::certs;
use crate::cli::check::RegistryArgs;
use crate::lease;
use crate::policy::{self, PolicyStore};
use crate::scan::results::RegistryLimits;
use crate::scan::{self, Scanner, report};
use crate::server::{self, AppState, ServeOptions, tls};
use crate::verify::checker::{Limits, WarmUp};
use crate::verify::credentials::provider_config;
use crate::verify::credentials::providers::CredentialProviders;
use crate::verify::credentials::pull_secrets::PullSecrets;
use crate::verify::store::{self, EvidenceStore};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address of the HTTPS webhook endpoint.
    #[arg(long, default_value = "0.0.0.0:8443", env = "FIXITY_ADDR")]
    pub addr: SocketAddr,
    /// Address of the plain-HTTP /livez, /readyz and /metrics endpoints.
    #[arg(long, default_value = "0.0.0.0:8080", env = "FIXITY_HEALTH_ADDR")]
    pub health_addr: SocketAddr,
    /// PEM certificate chain to serve (re-read when it changes).
    #[arg(long, env = "FIXITY_TLS_CERT", required_unless_present_any = ["dev", "manage_certs"])]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key to serve (re-read when it changes).
    #[arg(long, env = "FIXITY_TLS_KEY", required_unless_present_any = ["dev", "manage_certs"])]
    pub tls_key: Option<PathBuf>,
    /// Require a client certificate chaining to a CA in this PEM file on the webhook port:
    /// only an API server configured to present one (its AdmissionConfiguration's webhook
    /// kubeconfig) can send reviews. Read at start.
    #[arg(long, value_name = "FILE", env = "FIXITY_CLIENT_CA")]
    pub client_ca: Option<PathBuf>,
    #[command(flatten)]
    pub managed: ManagedCertArgs,
    #[command(flatten)]
    pub registry: RegistryArgs,
    #[command(flatten)]
    pub scan: ScanArgs,
    /// Development mode: generate a throwaway certificate, log readable text.
    #[arg(long)]
    pub dev: bool,
    /// Where `--dev` writes its CA and certificate [default: <tmp>/fixity-dev-<port>].
    #[arg(long)]
    pub dev_cert_dir: Option<PathBuf>,
    /// ImmutabilityPolicy file(s) to enforce instead of the built-in default (repeatable).
    #[arg(long = "policy", value_name = "FILE", conflicts_with = "watch_cluster")]
    pub policies: Vec<PathBuf>,
    /// Take policies and namespace labels from the cluster (ImmutabilityPolicy resources).
    #[arg(long, env = "FIXITY_WATCH_CLUSTER")]
    pub watch_cluster: bool,
    /// How often keys and trust roots that policies reference (Secrets, ConfigMaps) are read
    /// again, in seconds; they are also read whenever a policy changes.
    #[arg(long, default_value_t = policy::watch::REFRESH.as_secs(), requires = "watch_cluster")]
    pub reference_refresh_secs: u64,
    /// Fetch signatures with the pod's and its service account's pull secrets and the
    /// Secrets policies name (needs --watch-cluster and RBAC to get secrets and service
    /// accounts); anonymous otherwise.
    #[arg(long, requires = "watch_cluster")]
    pub registry_credentials: bool,
    /// The kubelet's CredentialProviderConfig file (kubelet.config.k8s.io/v1): image
    /// credential provider plugins give registry credentials for the images they match.
    #[arg(
        long,
        value_name = "FILE",
        env = "FIXITY_IMAGE_CREDENTIAL_PROVIDER_CONFIG",
        requires = "image_credential_provider_bin_dir"
    )]
    pub image_credential_provider_config: Option<PathBuf>,
    /// Directory holding the plugins the provider config names, as the kubelet's flag.
    #[arg(
        long,
        value_name = "DIR",
        env = "FIXITY_IMAGE_CREDENTIAL_PROVIDER_BIN_DIR",
        requires = "image_credential_provider_config"
    )]
    pub image_credential_provider_bin_dir: Option<PathBuf>,
    /// Signature verifications talking to registries at once, across all requests.
    #[arg(long, default_value_t = Limits::default().registry)]
    pub registry_concurrency: usize,
    /// Distinct signature and attestation checks (together) one request may need; a request
    /// needing more gets none, and every image a verify rule covers is denied with the reason.
    #[arg(long, default_value_t = 64)]
    pub max_signature_checks: usize,
    #[command(flatten)]
    pub evidence: EvidenceStoreArgs,
    /// Largest request body accepted, in bytes.
    #[arg(long, default_value_t = server::DEFAULT_MAX_BODY)]
    pub max_body_bytes: usize,
    /// Reviews worked on at once; past it, and past --max-inflight-bytes, a review is answered
    /// 429 with Retry-After, which the API server retries within the webhook's timeout.
    #[arg(long, default_value_t = server::Capacity::default().reviews)]
    pub max_concurrent_reviews: usize,
    /// Request bytes the reviews worked on at once may hold together (at least one largest
    /// body): what keeps big reviews under the memory limit.
    #[arg(long, default_value_t = server::Capacity::default().bytes)]
    pub max_inflight_bytes: usize,
    /// How often the certificate files are checked for changes, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub cert_poll_ms: u64,
    /// How long in-flight requests may take to finish after SIGTERM, in seconds.
    #[arg(long, default_value_t = 25)]
    pub shutdown_grace_secs: u64,
    /// Log format [default: json, or text with --dev].
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
}

/// Certificates fixity manages itself in the cluster.
#[derive(Debug, Args)]
pub struct ManagedCertArgs {
    /// Create, serve and rotate the serving certificate from a Secret, and keep the webhook
    /// configuration's caBundle in step.
    #[arg(long, env = "FIXITY_MANAGE_CERTS", conflicts_with_all = ["tls_cert", "tls_key", "dev"])]
    pub manage_certs: bool,
    /// Namespace of the Secret and the Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "fixity")]
    pub namespace: String,
    /// Secret holding the CA and serving certificate.
    #[arg(long, default_value = "fixity-tls")]
    pub cert_secret: String,
    /// ValidatingWebhookConfiguration whose caBundle fixity writes.
    #[arg(long, default_value = "fixity")]
    pub webhook_config: String,
    /// Lease that lets one replica at a time write certificates.
    #[arg(long, default_value = "fixity-certs")]
    pub cert_lease: String,
    /// Service whose DNS names the certificate carries.
    #[arg(long, default_value = "fixity")]
    pub service_name: String,
    /// Further DNS names or IP addresses for the certificate (repeatable).
    #[arg(long = "cert-name", value_name = "NAME")]
    pub extra_names: Vec<String>,
    /// Lifetime of serving certificates; renewed after two thirds of it.
    #[arg(long, default_value_t = 90 * 24 * 3600)]
    pub cert_validity_secs: u64,
    /// Lifetime of the CA.
    #[arg(long, default_value_t = 10 * 365 * 24 * 3600)]
    pub ca_validity_secs: u64,
    /// This replica's name in the Lease [default: $POD_NAME, else hostname and pid].
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
}

/// Verified evidence shared through the API server (VerifiedEvidence objects).
#[derive(Debug, Args)]
pub struct EvidenceStoreArgs {
    /// Keep the evidence of verified signatures and attestations in the cluster, and use what
    /// other replicas (or this one before a restart) kept, checked again, before asking
    /// registries. Needs a cluster connection (--watch-cluster or --manage-certs);
    /// `--evidence-store=false` turns it off.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, env = "FIXITY_EVIDENCE_STORE")]
    pub evidence_store: bool,
    /// Entries no check used for this many seconds are deleted.
    #[arg(long, default_value_t = store::Settings::default().unused_after.as_secs())]
    pub evidence_unused_secs: u64,
    /// Entries kept at most; the least recently used go first.
    #[arg(long, default_value_t = store::Settings::default().max_objects)]
    pub evidence_max_objects: usize,
    /// How often unused entries are looked for, in seconds (by one replica at a time).
    #[arg(long, default_value_t = store::Settings::default().collect_every.as_secs())]
    pub evidence_gc_secs: u64,
    /// How often an entry's lastUsed is written at most, in seconds.
    #[arg(long, default_value_t = store::Settings::default().touch_every.as_secs())]
    pub evidence_touch_secs: u64,
    /// Lease (in --namespace) that lets one replica at a time collect garbage.
    #[arg(long, default_value = "fixity-evidence")]
    pub evidence_lease: String,
}

impl EvidenceStoreArgs {
    fn settings(&self) -> store::Settings {
        store::Settings {
            touch_every: Duration::from_secs(self.evidence_touch_secs),
            unused_after: Duration::from_secs(self.evidence_unused_secs),
            max_objects: self.evidence_max_objects,
            collect_every: Duration::from_secs(self.evidence_gc_secs.max(1)),
            ..store::Settings::default()
        }
    }
}

/// The background scanner and the taint controller.
#[derive(Debug, Args)]
pub struct ScanArgs {
    /// Scan the workloads already in the cluster (one replica at a time, holding a Lease),
    /// write reports and policy status counts, and mark pods entered through an admitted exec
    /// or attach, evicting them where a policy says `replaceTainted`. Needs --watch-cluster.
    #[arg(long, env = "FIXITY_SCAN", requires = "watch_cluster")]
    pub scan: bool,
    /// Seconds between scans when no change triggers one sooner.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    pub scan_interval_secs: u64,
    /// Lease (in --namespace) that lets one replica at a time scan and evict.
    #[arg(long, default_value = "fixity-scan")]
    pub scan_lease: String,
    /// Signature checks of a scan that may wait on registries at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub scan_registry_concurrency: u64,
    /// Signature checks of a scan that may start per second (cached answers do not count).
    #[arg(long, default_value_t = 10.0, value_parser = positive_rate)]
    pub scan_registry_rate: f64,
    /// Objects the scan asks the API server for per list request: it reads the cluster page
    /// by page (an expired continue token starts that kind's list over).
    #[arg(long, default_value_t = scan::inventory::PAGE, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub scan_page_size: u32,
    /// Report format: OpenReports (openreports.io/v1alpha1), the older PolicyReport
    /// (wgpolicyk8s.io/v1alpha2), or none (policy status counts only).
    #[arg(long, value_enum, default_value_t = ReportFormat::Openreports)]
    pub reports: ReportFormat,
    /// Most results one report object holds; the rest are counted in a summary result.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..=100_000))]
    pub report_max_results: u64,
    /// Largest report object, in bytes of JSON (etcd refuses objects over 1.5 MiB).
    #[arg(long, default_value_t = 512 * 1024, value_parser = clap::value_parser!(u64).range(16 * 1024..=1024 * 1024))]
    pub report_max_bytes: u64,
}

fn positive_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err(format!("{text:?} is not a rate above 0")),
    }
}

/// Which report API the scanner writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReportFormat {
    Openreports,
    Policyreport,
    None,
}

impl ReportFormat {
    pub fn format(self) -> Option<report::Format> {
        match self {
            ReportFormat::Openreports => Some(report::Format::OpenReports),
            ReportFormat::Policyreport => Some(report::Format::PolicyReport),
            ReportFormat::None => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

pub fn run(args: ServeArgs) -> ExitCode {
    let format = args.log_format.unwrap_or(if args.dev {
        LogFormat::Text
    } else {
        LogFormat::Json
    });
    init_logging(format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fixity serve: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "fixity serve failed");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    install_logging(format, filter, std::io::stderr, ansi);
}

/// Installs the global subscriber `fixity serve` logs (and writes audit lines) through. Public
/// so the review bench formats audit lines exactly as the server does.
pub fn install_logging<W>(format: LogFormat, filter: EnvFilter, writer: W, ansi: bool)
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
        LogFormat::Text => builder.compact().init(),
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let shutdown = shutdown_signal()?;
    let metrics = Arc::new(Metrics::default());
    let store = Arc::new(if args.watch_cluster {
        PolicyStore::pending()
    } else if !args.policies.is_empty() {
        let loaded = policy::files::load(&args.policies)?;
        tracing::info!(policies = loaded.len(), "policies loaded from files");
        PolicyStore::fixed(loaded)
    } else {
        tracing::info!(
            policy = policy::BUILTIN_POLICY_NAME,
            "no policies given; enforcing the built-in default"
        );
        PolicyStore::fixed(vec![policy::builtin()])
    });
    // One client for everything that talks to the cluster: policies, certificates, events,
    // pull secrets.
    let config = if args.watch_cluster || args.managed.manage_certs {
        Some(
            kube::Config::infer()
                .await
                .context("finding the Kubernetes API")?,
        )
    } else {
        None
    };
    let client = config
        .clone()
        .map(kube::Client::try_from)
        .transpose()
        .context("connecting to the Kubernetes API")?;
    if let (Some(client), true) = (&client, args.watch_cluster) {
        tokio::spawn(policy::watch::run(
            client.clone(),
            store.clone(),
            metrics.clone(),
            Duration::from_secs(args.reference_refresh_secs.max(1)),
        ));
    }

    let client_auth = match &args.client_ca {
        Some(path) => {
            tracing::info!(ca = %path.display(), "the webhook port requires a client certificate");
            tls::ClientAuth::from_ca_file(path)?
        }
        None => tls::ClientAuth::anyone(),
    };
    let rustls = match (&args.tls_cert, &args.tls_key, &client) {
        (_, _, Some(client)) if args.managed.manage_certs => {
            let settings = managed_settings(&args.managed, client_auth);
            let manager = certs::Manager::new(client.clone(), settings);
            let (config, served) = manager.initial().await?;
            let rustls = RustlsConfig::from_config(config);
            tokio::spawn(manager.run(rustls.clone(), served, metrics.clone()));
            rustls
        }
        (Some(cert), Some(key), _) => {
            let files = tls::CertFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_auth,
            };
            serve_files(files, args.cert_poll_ms, &metrics)?
        }
        (None, None, _) if args.dev => {
            let dir = args.dev_cert_dir.clone().unwrap_or_else(|| {
                std::env::temp_dir().join(format!("fixity-dev-{}", args.addr.port()))
            });
            let files = tls::CertFiles {
                client_auth,
                ..tls::generate_dev_certificate(&dir)?
            };
            tracing::info!(
                ca = %dir.join("ca.crt").display(),
                "development certificate generated; trust it with: curl --cacert {}",
                dir.join("ca.crt").display()
            );
            serve_files(files, args.cert_poll_ms, &metrics)?
        }
        _ => bail!("--tls-cert and --tls-key go together"),
    };

    let limits = Limits {
        registry: args.registry_concurrency,
        max_checks: Some(args.max_signature_checks),
        ..Limits::default()
    };
    let mut checker = args
        .registry
        .checker(metrics.clone(), limits)
        .context("starting signature verification")?;
    if let (Some(config), Some(bin_dir)) = (
        &args.image_credential_provider_config,
        &args.image_credential_provider_bin_dir,
    ) {
        let providers = provider_config::load(config, bin_dir)?;
        tracing::info!(
            providers = ?providers.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            "image credential provider plugins configured"
        );
        checker = checker.with_credential_providers(CredentialProviders::new(providers));
    }
    if let (Some(client), true) = (&client, args.evidence.evidence_store) {
        let evidence =
            EvidenceStore::new(client.clone(), args.evidence.settings(), metrics.clone());
        let (with_store, warm_up) = checker.with_store(evidence.clone());
        checker = with_store;
        tokio::spawn(warm_start(warm_up, store.clone()));
        let lease = lease::LeaseLock::new(
            kube::Api::namespaced(client.clone(), &args.managed.namespace),
            args.evidence.evidence_lease.clone(),
            replica_identity(&args.managed),
            evidence.settings().collect_every * 2,
        );
        tokio::spawn(collect_garbage(evidence, lease));
    }
    let checker = Arc::new(checker);
    let mut reviewer =
        Reviewer::new(store.clone(), metrics.clone()).with_signatures(checker.clone());
    let mut scanner = None;
    if let Some(client) = &client {
        let events = EventSink::start(client.clone(), args.managed.identity.clone());
        reviewer = reviewer.with_events(events.clone());
        if args.registry_credentials {
            reviewer = reviewer.with_pull_secrets(PullSecrets::new(client.clone()));
        }
        if args.scan.scan {
            let (entered, notices) = EnteredSink::channel();
            reviewer = reviewer.with_entered(entered);
            // Evictions a budget refuses (429) are retried on the scanner's own schedule and
            // reported as held back, not retried inside the client for minutes.
            let evictions = config
                .clone()
                .map(|mut c| {
                    c.default_retry = false;
                    c
                })
                .map(kube::Client::try_from)
                .transpose()
                .context("connecting to the Kubernetes API")?
                .unwrap_or_else(|| client.clone());
            let scan_config = config
                .clone()
                .context("the scanner needs the Kubernetes API")?;
            let mut s = Scanner::new(
                client.clone(),
                evictions,
                scan_config,
                store.clone(),
                checker,
                metrics.clone(),
                scan_settings(&args),
            )
            .with_events(events);
            if args.registry_credentials {
                s = s.with_registry_credentials();
            }
            scanner = Some(s.start(notices).context("starting the scanner")?);
        }
    }
    let state = Arc::new(AppState {
        reviewer,
        store,
        metrics,
        max_body: args.max_body_bytes,
        gate: server::Gate::new(
            server::Capacity {
                reviews: args.max_concurrent_reviews,
                bytes: args.max_inflight_bytes,
            },
            args.max_body_bytes,
        ),
    });
    let options = ServeOptions {
        addr: args.addr,
        health_addr: args.health_addr,
        shutdown_grace: Duration::from_secs(args.shutdown_grace_secs),
    };
    let served = server::run(state, options, rustls, shutdown).await;
    if let Some(scanner) = scanner {
        scanner.stop().await;
    }
    served?;
    Ok(())
}

fn scan_settings(args: &ServeArgs) -> scan::Settings {
    let scan = &args.scan;
    scan::Settings {
        interval: Duration::from_secs(scan.scan_interval_secs),
        lease: scan.scan_lease.clone(),
        namespace: args.managed.namespace.clone(),
        identity: replica_identity(&args.managed),
        registry: RegistryLimits {
            concurrency: usize::try_from(scan.scan_registry_concurrency).unwrap_or(1),
            per_second: scan.scan_registry_rate,
        },
        page: scan.scan_page_size,
        reports: scan.reports.format(),
        report_limits: report::Limits {
            max_results: usize::try_from(scan.report_max_results).unwrap_or(1000),
            max_bytes: usize::try_from(scan.report_max_bytes).unwrap_or(512 * 1024),
        },
    }
}

/// Serves certificate files and re-reads them when they change.
fn serve_files(
    files: tls::CertFiles,
    poll_ms: u64,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<RustlsConfig> {
    let (config, fingerprint) = files.load()?;
    let rustls = RustlsConfig::from_config(config);
    let poll = Duration::from_millis(poll_ms.max(50));
    tokio::spawn(files.watch(rustls.clone(), fingerprint, poll, metrics.clone()));
    Ok(rustls)
}

fn managed_settings(args: &ManagedCertArgs, client_auth: tls::ClientAuth) -> certs::Settings {
    let mut names = certs::Settings::service_names(&args.service_name, &args.namespace);
    names.extend(args.extra_names.iter().cloned());
    let identity = replica_identity(args);
    certs::Settings {
        namespace: args.namespace.clone(),
        secret: args.cert_secret.clone(),
        webhook_configuration: args.webhook_config.clone(),
        lease: args.cert_lease.clone(),
        names,
        identity,
        validity: Duration::from_secs(args.cert_validity_secs.max(10)),
        ca_validity: Duration::from_secs(args.ca_validity_secs.max(3600)),
        client_auth,
    }
}

/// This replica's name in Leases.
fn replica_identity(args: &ManagedCertArgs) -> String {
    args.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    })
}

/// Once policies are in force, fills the signature cache from the evidence store; /readyz
/// waits for it (the store's listing is bounded in time and entries).
async fn warm_start(warm_up: WarmUp, policies: Arc<PolicyStore>) {
    while !policies.is_ready() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let started = std::time::Instant::now();
    let snapshot = policies.policies();
    let rules = |fingerprint: u64| {
        let mut found = None;
        for rule in snapshot.iter().flat_map(|p| &p.verify) {
            // The fingerprint covers minAuthorities: rules sharing one need the same number.
            if rule.fingerprint == fingerprint {
                let age = found
                    .as_ref()
                    .map_or(rule.max_evidence_age, |(_, _, age): &(_, _, Duration)| {
                        (*age).min(rule.max_evidence_age)
                    });
                found = Some((rule.authorities.clone(), rule.min_authorities, age));
            }
        }
        found
    };
    let warmed = warm_up.run(rules).await;
    tracing::info!(
        loaded = warmed.loaded,
        skipped = warmed.skipped,
        unchecked = warmed.unchecked,
        ms = started.elapsed().as_millis() as u64,
        "evidence store read"
    );
}

/// Deletes unused evidence, on the replica holding the Lease.
async fn collect_garbage(evidence: EvidenceStore, lease: lease::LeaseLock) {
    let every = evidence.settings().collect_every;
    loop {
        tokio::time::sleep(every).await;
        match lease.try_acquire().await {
            Ok(true) => match evidence.collect_garbage().await {
                Ok(deleted) => tracing::info!(deleted, "evidence store: garbage collected"),
                Err(e) => tracing::warn!(error = %e, "evidence store: garbage not collected"),
            },
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "evidence store: lease not taken"),
        }
    }
}

/// Resolves on SIGTERM (Kubernetes) or Ctrl-C. The handlers are installed when this is called,
/// not when the future is first polled: a SIGTERM that arrives while the server starts (the
/// health port may already answer) is then a graceful stop, not the default action's kill.
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = interrupt.recv() => {},
        }
    })
}
