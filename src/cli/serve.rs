//! `fixity serve`: the webhook, with policies from the cluster, from files, or built in.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};

use crate::admission::Reviewer;
use crate::audit::Metrics;
use crate::policy::{self, PolicyStore};
use crate::server::{self, AppState, ServeOptions, tls};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address of the HTTPS webhook endpoint.
    #[arg(long, default_value = "0.0.0.0:8443", env = "FIXITY_ADDR")]
    pub addr: SocketAddr,
    /// Address of the plain-HTTP /livez, /readyz and /metrics endpoints.
    #[arg(long, default_value = "0.0.0.0:8080", env = "FIXITY_HEALTH_ADDR")]
    pub health_addr: SocketAddr,
    /// PEM certificate chain to serve (re-read when it changes).
    #[arg(long, env = "FIXITY_TLS_CERT", required_unless_present = "dev")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key to serve (re-read when it changes).
    #[arg(long, env = "FIXITY_TLS_KEY", required_unless_present = "dev")]
    pub tls_key: Option<PathBuf>,
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
    /// Largest request body accepted, in bytes.
    #[arg(long, default_value_t = server::DEFAULT_MAX_BODY)]
    pub max_body_bytes: usize,
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
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
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
    if args.watch_cluster {
        let client = kube::Client::try_default()
            .await
            .context("connecting to the Kubernetes API (--watch-cluster)")?;
        tokio::spawn(policy::watch::run(client, store.clone(), metrics.clone()));
    }

    let certs = match (&args.tls_cert, &args.tls_key, args.dev) {
        (Some(cert), Some(key), _) => tls::CertFiles {
            cert: cert.clone(),
            key: key.clone(),
        },
        (None, None, true) => {
            let dir = args.dev_cert_dir.clone().unwrap_or_else(|| {
                std::env::temp_dir().join(format!("fixity-dev-{}", args.addr.port()))
            });
            let files = tls::generate_dev_certificate(&dir)?;
            tracing::info!(
                ca = %dir.join("ca.crt").display(),
                "development certificate generated; trust it with: curl --cacert {}",
                dir.join("ca.crt").display()
            );
            files
        }
        _ => bail!("--tls-cert and --tls-key go together"),
    };

    let state = Arc::new(AppState {
        reviewer: Reviewer::new(store.clone(), metrics.clone()),
        store,
        metrics,
        max_body: args.max_body_bytes,
    });
    let options = ServeOptions {
        addr: args.addr,
        health_addr: args.health_addr,
        certs,
        cert_poll: Duration::from_millis(args.cert_poll_ms.max(50)),
        shutdown_grace: Duration::from_secs(args.shutdown_grace_secs),
    };
    server::run(state, options, shutdown_signal()).await?;
    Ok(())
}

/// Resolves on SIGTERM (Kubernetes) or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
