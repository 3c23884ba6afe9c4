//! The webhook server: `POST /validate` over TLS, health and metrics on a plain-HTTP port.

pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum_server::accept::NoDelayAcceptor;
use axum_server::tls_rustls::{RustlsAcceptor, RustlsConfig};
use axum_server::{Handle, Server};
use http_body_util::{BodyExt, LengthLimitError, Limited};

use crate::admission::{Answer, Reviewer};
use crate::audit::Metrics;
use crate::policy::PolicyStore;

/// Largest AdmissionReview accepted. The API server caps objects near 3 MiB and a review can
/// carry two (object and oldObject).
pub const DEFAULT_MAX_BODY: usize = 7 * 1024 * 1024;

/// What the handlers share.
pub struct AppState {
    pub reviewer: Reviewer,
    pub store: Arc<PolicyStore>,
    pub metrics: Arc<Metrics>,
    pub max_body: usize,
}

/// The webhook routes, without TLS, so tests can drive them in-process.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/validate", post(validate))
        .with_state(state)
}

/// Liveness, readiness and metrics.
pub fn health_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn validate(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let body = Limited::new(request.into_body(), state.max_body);
    let answer = match body.collect().await {
        Ok(collected) => state.reviewer.review(&collected.to_bytes()).await,
        Err(e) if e.is::<LengthLimitError>() => {
            let message = format!("the request body exceeds the {} byte limit", state.max_body);
            let mut answer = state.reviewer.unreadable(None, &message);
            answer.http_status = 413;
            answer
        }
        Err(e) => state
            .reviewer
            .unreadable(None, &format!("the request body could not be read: {e}")),
    };
    into_response(answer)
}

fn into_response(answer: Answer) -> Response {
    let status = StatusCode::from_u16(answer.http_status).unwrap_or(StatusCode::BAD_REQUEST);
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from(answer.body),
    )
        .into_response()
}

async fn readyz(State(state): State<Arc<AppState>>) -> (StatusCode, &'static str) {
    if state.store.is_ready() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "policies not synced yet")
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

/// How to run the servers.
pub struct ServeOptions {
    pub addr: SocketAddr,
    pub health_addr: SocketAddr,
    pub shutdown_grace: Duration,
}

/// Why the server stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("serving: {0}")]
    Io(#[from] std::io::Error),
}

/// The TLS server of the webhook on `listener`, with Nagle's algorithm off on every accepted
/// socket (as Go servers, the API server's own included, always have it). With it on, an answer
/// written while the server's last segment on that connection is still unacknowledged waits for
/// the client's delayed ACK, about 40 ms on Linux: the first review of each new connection,
/// right after the handshake, paid that.
pub fn webhook_server(
    listener: std::net::TcpListener,
    rustls: RustlsConfig,
) -> std::io::Result<Server<SocketAddr, RustlsAcceptor<NoDelayAcceptor>>> {
    let acceptor = RustlsAcceptor::new(rustls).acceptor(NoDelayAcceptor::new());
    Ok(axum_server::from_tcp(listener)?.acceptor(acceptor))
}

/// Serves until `shutdown` resolves, then stops accepting and finishes in-flight requests.
/// `rustls` may be swapped underneath at any time (certificate rotation).
pub async fn run(
    state: Arc<AppState>,
    options: ServeOptions,
    rustls: RustlsConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let health_listener = tokio::net::TcpListener::bind(options.health_addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr: options.health_addr,
            source,
        })?;
    let webhook_listener =
        std::net::TcpListener::bind(options.addr).map_err(|source| ServeError::Bind {
            addr: options.addr,
            source,
        })?;
    webhook_listener.set_nonblocking(true)?;
    tracing::info!(
        addr = %webhook_listener.local_addr()?,
        health_addr = %health_listener.local_addr()?,
        "fixity is serving"
    );

    let handle = Handle::new();
    let (stop_health, health_stopped) = tokio::sync::oneshot::channel::<()>();
    let health_listener = health_listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set on a health connection");
        }
    });
    let health = tokio::spawn(
        axum::serve(health_listener, health_router(state.clone()))
            .with_graceful_shutdown(async {
                let _ = health_stopped.await;
            })
            .into_future(),
    );
    let grace = options.shutdown_grace;
    let shutdown_handle = handle.clone();
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down: finishing in-flight requests");
        shutdown_handle.graceful_shutdown(Some(grace));
    });

    let served = webhook_server(webhook_listener, rustls)?
        .handle(handle)
        .serve(router(state).into_make_service())
        .await;
    let _ = stop_health.send(());
    let _ = health.await;
    served?;
    tracing::info!("stopped");
    Ok(())
}
