//! The webhook server: `POST /validate` over TLS, health and metrics on a plain-HTTP port.

pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum_server::accept::NoDelayAcceptor;
use axum_server::tls_rustls::{RustlsAcceptor, RustlsConfig};
use axum_server::{Handle, Server};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tokio::sync::{Semaphore, SemaphorePermit};

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
    pub gate: Gate,
}

/// How much review work fixity holds at once; past it, a review is answered 429 with
/// `Retry-After: 1`. The API server retries such an answer within the webhook's timeout (its
/// client does, for 429 with Retry-After), and only when it runs out applies the webhook's
/// failurePolicy, exactly as for a fixity it cannot reach: Fail denies, Ignore admits.
#[derive(Debug, Clone, Copy)]
pub struct Capacity {
    /// Reviews being read or answered at once. Most wait on a shared signature check, not on
    /// memory: a thousand pods of one new image are a thousand small reviews at once.
    pub reviews: usize,
    /// Request bytes those may hold together (at least one largest body). A review's memory
    /// grows with its body, to about eight times it for a body of tiny containers
    /// (`cargo bench --bench amplify`); 8 MiB keeps fixity under the chart's 128 Mi limit.
    pub bytes: usize,
}

impl Default for Capacity {
    fn default() -> Self {
        Self {
            reviews: 1024,
            bytes: 8 * 1024 * 1024,
        }
    }
}

/// Admits reviews up to a [`Capacity`].
#[derive(Debug)]
pub struct Gate {
    reviews: Semaphore,
    kib: Semaphore,
}

/// The share of a [`Gate`] one review holds, returned when it is dropped.
struct Room<'g> {
    gate: &'g Gate,
    _review: SemaphorePermit<'g>,
    bytes: Option<SemaphorePermit<'g>>,
    kib: u32,
}

impl Gate {
    pub fn new(capacity: Capacity, max_body: usize) -> Self {
        let kib = capacity.bytes.max(max_body).div_ceil(1024);
        Self {
            reviews: Semaphore::new(capacity.reviews.max(1)),
            kib: Semaphore::new(kib.min(Semaphore::MAX_PERMITS)),
        }
    }

    /// Room for one more review, with `declared` bytes of its body (its Content-Length);
    /// `None` when fixity is at capacity.
    fn enter(&self, declared: usize) -> Option<Room<'_>> {
        let review = self.reviews.try_acquire().ok()?;
        let mut room = Room {
            gate: self,
            _review: review,
            bytes: None,
            kib: 0,
        };
        room.hold(declared).then_some(room)
    }
}

impl Room<'_> {
    /// Holds room for `bytes` of body in all, as the body arrives (a body without a declared
    /// length is counted as it comes, never trusted); `false` when there is none.
    fn hold(&mut self, bytes: usize) -> bool {
        let needed = u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX);
        if needed <= self.kib {
            return true;
        }
        let Ok(more) = self.gate.kib.try_acquire_many(needed - self.kib) else {
            return false;
        };
        match self.bytes.as_mut() {
            Some(held) => held.merge(more),
            None => self.bytes = Some(more),
        }
        self.kib = needed;
        true
    }
}

/// Why a body was not read whole.
enum Unread {
    AtCapacity,
    TooLarge,
    Broken(String),
}

/// Reads a body of at most `max` bytes, holding room in the gate for what arrives.
async fn read_body(body: Body, max: usize, room: &mut Room<'_>) -> Result<Bytes, Unread> {
    let mut body = Limited::new(body, max);
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut total = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| match e.is::<LengthLimitError>() {
            true => Unread::TooLarge,
            false => Unread::Broken(e.to_string()),
        })?;
        if let Ok(data) = frame.into_data() {
            total += data.len();
            if !room.hold(total) {
                return Err(Unread::AtCapacity);
            }
            chunks.push(data);
        }
    }
    Ok(match chunks.len() {
        1 => chunks.swap_remove(0),
        _ => chunks.concat().into(),
    })
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
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        .unwrap_or(0)
        .min(state.max_body);
    let Some(mut room) = state.gate.enter(declared) else {
        return throttled(&state);
    };
    let answer = match read_body(request.into_body(), state.max_body, &mut room).await {
        Ok(body) => state.reviewer.review(&body).await,
        Err(Unread::AtCapacity) => return throttled(&state),
        Err(Unread::TooLarge) => {
            let message = format!("the request body exceeds the {} byte limit", state.max_body);
            let mut answer = state.reviewer.unreadable(None, &message);
            answer.http_status = 413;
            answer
        }
        Err(Unread::Broken(e)) => state
            .reviewer
            .unreadable(None, &format!("the request body could not be read: {e}")),
    };
    into_response(answer)
}

/// Counted, not logged: a flood must not turn into a flood of log lines.
fn throttled(state: &AppState) -> Response {
    state.metrics.reviews_throttled.inc();
    into_response(busy())
}

/// The answer past capacity: a denying AdmissionReview (the request's uid is unread), 429.
fn busy() -> Answer {
    let body = serde_json::json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": {
            "uid": "",
            "allowed": false,
            "status": {
                "code": 429,
                "reason": "TooManyRequests",
                "message": "fixity: at its capacity of concurrent reviews; retry in a second",
            },
        },
    });
    Answer {
        http_status: 429,
        allowed: false,
        body: body.to_string().into_bytes(),
    }
}

fn into_response(answer: Answer) -> Response {
    let status = StatusCode::from_u16(answer.http_status).unwrap_or(StatusCode::BAD_REQUEST);
    let mut response = (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from(answer.body),
    )
        .into_response();
    if status == StatusCode::TOO_MANY_REQUESTS {
        // What makes the API server retry instead of failing the call at once.
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    response
}

async fn readyz(State(state): State<Arc<AppState>>) -> (StatusCode, &'static str) {
    if !state.store.is_ready() {
        (StatusCode::SERVICE_UNAVAILABLE, "policies not synced yet")
    } else if !state.reviewer.is_warm() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "evidence store not read yet",
        )
    } else {
        (StatusCode::OK, "ok")
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
