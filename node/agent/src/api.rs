//! The agent's local HTTP API (axum), described in `docs/openapi.yaml`.
//!
//! Every request but `GET /healthz` needs `Authorization: Bearer <token>`
//! (the site's `api.token`), `GET /metrics` included: a scrape config can
//! send the token (`authorization` in Prometheus), and the metrics tell
//! an outsider how busy the site is. Errors are JSON `{"error": {"code": ..., "message": ...}}`
//! with a stable `code`. Ledger calls run on the blocking pool, one at a time
//! behind a mutex: SQLite serialises writers anyway, and every write is
//! durable before its response is sent.
//!
//! # Limits
//!
//! The server ([`serve`]) bounds what clients can hold, with the `[api]`
//! settings ([`ApiLimits`]):
//!
//! - open connections, `connections_max`: one beyond is answered `503`
//!   (`busy`) and closed, without reading its request. There is no limit per
//!   source: one client can hold all of them (the API listens on loopback
//!   unless configured otherwise);
//! - requests handled at once, `requests_max`: one beyond is answered `503`
//!   `busy` with `Retry-After`; `GET /healthz` has a budget of its own
//!   ([`PROBES_MAX`]), so that a flood of other requests leaves probes their
//!   answer;
//! - time, `client_timeout`: a client that has not sent a request's headers
//!   within it (a slow client, or an idle keep-alive connection) is
//!   disconnected; one that has not sent the body within it more is
//!   answered `408` and disconnected; one that takes none of an answer for
//!   it (it sends requests and never reads) is disconnected
//!   (`write_deadline.rs`: hyper has no write timeout, and reads no
//!   requests while its answers wait). Bodies are read whole (at most
//!   [`BODY_LEN_MAX`]) before a request takes its place among
//!   `requests_max`, so slow senders hold a connection, never a handler;
//! - memory: the token is checked from the headers before the body is read,
//!   and hyper's buffer of a connection is at most [`CONNECTION_BUF_LEN_MAX`],
//!   so a client without the token makes the server hold about that per
//!   connection (16 MiB at the default `connections_max`, 256 MiB at its
//!   bound of 16384), plus the kernel's socket buffers;
//! - shutdown: connections are given `client_timeout` to finish what they
//!   are doing, then dropped.
//!
//! `busy` is only ever answered before a handler sees the request, so a
//! client may send the request again, whatever its method ([`ApiClient`]
//! does, after `Retry-After`).
//!
//! Every refusal is counted in `GET /metrics` (`vcfed_api_refused_total`).
//!
//! [`ApiClient`]: crate::client::ApiClient

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use ring::digest::{SHA256, digest};
use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use vcfed_storage::{
    ClusterRecord, Event, HoldOutcome, HoldRequest, Ledger, LedgerError, NodeShape, Reservation,
    ReservationFilter, Window,
};

// The bodies live in a leaf module so that clients of the API need not import the server;
// `api::X` still names each of them.
pub use crate::api_types::{
    CapacityReport, CapacityStep, CapacityTotals, ClusterDetail, CreateClusterBody, ErrorBody,
    ErrorDetail, HoldBody, InstantArg, JoinBody, OwnerBody, SiteInfo,
};
use crate::federation::{FederationHandle, ForgetSiteError, JoinError, SitesReport};
use crate::ledger::SharedLedger;
use crate::time::{DAY_MS, format_instant, now_ms, parse_instant};
use crate::write_deadline::{WriteDeadline, is_write_stalled};
use vcfed_node_core::cluster::{ClusterRequest, CreateError, DeleteError};

/// Largest request body accepted, bytes.
pub const BODY_LEN_MAX: usize = 64 * 1024;
/// Largest buffer hyper keeps for a connection, bytes: it bounds a
/// request's headers (`431` beyond), and what a client without the token
/// makes the server hold. hyper's default is ~400 KiB, its least 8 KiB; a
/// request's headers are a few hundred bytes.
pub const CONNECTION_BUF_LEN_MAX: usize = 16 * 1024;
/// Paths served without the token.
const OPEN_PATHS: [&str; 1] = ["/healthz"];
/// Default lease of a hold made through the API, seconds.
pub const DEFAULT_LEASE_S: u64 = 60;
/// Longest lease accepted, seconds.
pub const LEASE_S_MAX: u64 = 24 * 60 * 60;
/// Default span of a capacity query, ms.
pub const DEFAULT_CAPACITY_SPAN_MS: i64 = 7 * DAY_MS;
/// Longest window a capacity query or reservation may span, ms.
pub const WINDOW_MS_MAX: i64 = 366 * DAY_MS;
/// How long before now a hold may start, ms: slack for clocks and for a
/// "now" that the client computed before sending.
pub const PAST_START_SLACK_MS: i64 = 60_000;
/// Most events one call returns.
pub const EVENTS_LIMIT_MAX: u32 = 1000;
/// Most `GET /healthz` handled at once, apart from `requests_max`: a probe
/// asks once every few seconds, so more at once is a flood of them.
pub const PROBES_MAX: usize = 16;
/// Most refused connections being answered at once; beyond, a refused
/// connection is closed without an answer.
const REFUSING_MAX: usize = 64;
/// How long a refused connection is given to take its answer.
const REFUSING_LINGER: Duration = Duration::from_secs(1);
/// Pause after a failed `accept` (out of file descriptors): connections
/// close meanwhile, and the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// Shortest interval between two warnings about failed `accept`s.
const ACCEPT_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The bounds of the server (the `[api]` settings; see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiLimits {
    /// Most open connections.
    pub connections_max: usize,
    /// Most requests handled at once (`/healthz` aside).
    pub requests_max: usize,
    /// How long a client may take to send a request's headers, then its
    /// body, and to take some of an answer; how long shutdown waits for open
    /// connections.
    pub client_timeout: Duration,
}

impl ApiLimits {
    /// The limits a site's config sets.
    pub fn of(api: &crate::config::ApiConfig) -> ApiLimits {
        ApiLimits {
            connections_max: usize::try_from(api.connections_max).unwrap_or(usize::MAX),
            requests_max: usize::try_from(api.requests_max).unwrap_or(usize::MAX),
            client_timeout: api.client_timeout,
        }
    }
}

/// What the server refused since it started, and its open connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApiStats {
    /// Connections open now.
    pub connections_open: u64,
    /// Connections refused over `connections_max`.
    pub connections_refused: u64,
    /// Requests refused over `requests_max` (or [`PROBES_MAX`]).
    pub requests_busy: u64,
    /// Connections closed because a request's headers did not arrive within
    /// `client_timeout` (slow clients and idle keep-alive connections).
    pub headers_timed_out: u64,
    /// Requests answered `408`: the body did not arrive within
    /// `client_timeout`.
    pub bodies_timed_out: u64,
    /// Connections closed because the client took none of an answer within
    /// `client_timeout`.
    pub writes_timed_out: u64,
}

#[derive(Debug, Default)]
struct ApiCounters {
    connections_refused: AtomicU64,
    requests_busy: AtomicU64,
    headers_timed_out: AtomicU64,
    bodies_timed_out: AtomicU64,
    writes_timed_out: AtomicU64,
}

fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Shared state of the API handlers.
pub struct ApiState {
    site: SiteInfo,
    ledger: SharedLedger,
    token_digest: ring::digest::Digest,
    federation: FederationHandle,
    network: crate::runner::NetworkBoard,
    runner: Option<crate::runner::RunnerCounters>,
    limits: ApiLimits,
    /// One permit per open connection.
    connections: Arc<Semaphore>,
    /// One permit per request being handled, `/healthz` aside.
    requests: Semaphore,
    /// One permit per `/healthz` being handled.
    probes: Semaphore,
    counters: ApiCounters,
}

impl ApiState {
    /// State for a site described by `site` (its `free_now` is filled per
    /// request), served within `limits`.
    pub fn new(
        site: SiteInfo,
        ledger: SharedLedger,
        token: &str,
        federation: FederationHandle,
        limits: ApiLimits,
    ) -> ApiState {
        ApiState {
            site,
            ledger,
            token_digest: digest(&SHA256, token.as_bytes()),
            federation,
            network: crate::runner::NetworkBoard::default(),
            runner: None,
            limits,
            connections: Arc::new(Semaphore::new(limits.connections_max)),
            requests: Semaphore::new(limits.requests_max),
            probes: Semaphore::new(PROBES_MAX),
            counters: ApiCounters::default(),
        }
    }

    /// What the server refused so far, and its open connections.
    pub fn stats(&self) -> ApiStats {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let open = self
            .limits
            .connections_max
            .saturating_sub(self.connections.available_permits());
        ApiStats {
            connections_open: u64::try_from(open).unwrap_or(u64::MAX),
            connections_refused: read(&self.counters.connections_refused),
            requests_busy: read(&self.counters.requests_busy),
            headers_timed_out: read(&self.counters.headers_timed_out),
            bodies_timed_out: read(&self.counters.bodies_timed_out),
            writes_timed_out: read(&self.counters.writes_timed_out),
        }
    }

    /// Shows the counters of this site's runner in `GET /metrics`.
    pub fn with_runner(mut self, counters: crate::runner::RunnerCounters) -> ApiState {
        self.runner = Some(counters);
        self
    }

    /// Shows the cluster networks of this site's runner.
    pub fn with_network(mut self, network: crate::runner::NetworkBoard) -> ApiState {
        self.network = network;
        self
    }
}

/// The API's routes: `/healthz` open to all, the others behind the token
/// check (in [`limit_requests`], before the body is read).
pub fn router(state: Arc<ApiState>) -> Router {
    let protected = Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/site", get(site))
        .route("/v1/capacity", get(capacity))
        .route("/v1/reservations", get(list_reservations).post(hold))
        .route("/v1/reservations/{key}", get(show_reservation))
        .route("/v1/reservations/{key}/commit", post(commit))
        .route("/v1/reservations/{key}/release", post(release))
        .route("/v1/events", get(events))
        .route("/v1/sites", get(sites))
        .route("/v1/sites/{site}", delete(forget_site))
        .route("/v1/clusters", get(list_clusters).post(create_cluster))
        .route(
            "/v1/clusters/{id}",
            get(show_cluster).delete(delete_cluster),
        )
        .route("/v1/peers", post(join))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed);
    Router::new()
        .route("/healthz", get(healthz))
        .merge(protected)
        .layer(DefaultBodyLimit::max(BODY_LEN_MAX))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            limit_requests,
        ))
        .with_state(state)
}

/// Binds the API's listener with an accept queue of `connections_max`
/// (the kernel caps it at `net.core.somaxconn`): with the usual 1024 a burst
/// of connections overflows it, and the kernel drops SYNs that the clients
/// (health probes included) resend only a second later.
pub fn bind(addr: std::net::SocketAddr, limits: &ApiLimits) -> std::io::Result<TcpListener> {
    let socket = match addr {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    // As `TcpListener::bind` does: a port in TIME_WAIT is free.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(u32::try_from(limits.connections_max).unwrap_or(u32::MAX))
}

/// Serves the API on `listener` within the state's [`ApiLimits`] until
/// `shutdown` resolves, then lets the connections finish what they are
/// doing for at most `client_timeout`, drops those still open, and returns.
pub async fn serve(
    listener: TcpListener,
    state: Arc<ApiState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(state.clone());
    let refusing = Arc::new(Semaphore::new(REFUSING_MAX));
    let (phase, phase_rx) = watch::channel(Phase::Serving);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut accept_warned: Option<tokio::time::Instant> = None;
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, mostly: not the listener's end.
                let now = tokio::time::Instant::now();
                if accept_warned
                    .is_none_or(|at| now.duration_since(at) >= ACCEPT_ERROR_LOG_INTERVAL)
                {
                    tracing::warn!(error = %e, "the API cannot accept a connection");
                    accept_warned = Some(now);
                }
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        match state.connections.clone().try_acquire_owned() {
            Ok(permit) => {
                tokio::spawn(serve_connection(
                    stream,
                    app.clone(),
                    state.clone(),
                    phase_rx.clone(),
                    permit,
                ));
            }
            Err(_) => {
                count(&state.counters.connections_refused);
                if let Ok(permit) = refusing.clone().try_acquire_owned() {
                    tokio::spawn(refuse_connection(stream, state.limits, permit));
                }
            }
        }
    }
    drop(listener);
    let _ = phase.send(Phase::Closing);
    // Every connection holds a permit until it ends. Each ends on its own
    // within `client_timeout` of its client's last move, but a handler may
    // take longer and a client may trickle: the wait has its own bound.
    let all = u32::try_from(state.limits.connections_max).unwrap_or(u32::MAX);
    let grace = state.limits.client_timeout;
    if tokio::time::timeout(grace, state.connections.acquire_many(all))
        .await
        .is_err()
    {
        tracing::info!(
            connections = state.stats().connections_open,
            grace = %humantime::format_duration(grace),
            "API connections still open at shutdown are dropped"
        );
        let _ = phase.send(Phase::Closed);
        // Each task ends at its next poll, which the send wakes.
        let _ended = state.connections.acquire_many(all).await;
    }
    Ok(())
}

/// Where the server is in its life, as its connections see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Accepting and serving.
    Serving,
    /// Shutting down: connections finish the request at hand, then close.
    Closing,
    /// Shut down: connections still open are dropped.
    Closed,
}

/// Serves one connection (HTTP/1.1) until the client closes it, it times
/// out, or the server shuts down.
async fn serve_connection(
    stream: TcpStream,
    app: Router,
    state: Arc<ApiState>,
    mut phase: watch::Receiver<Phase>,
    _permit: OwnedSemaphorePermit,
) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY on an API connection");
    }
    let timeout = state.limits.client_timeout;
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(timeout)
        .max_buf_size(CONNECTION_BUF_LEN_MAX);
    let connection = builder.serve_connection(
        hyper_util::rt::TokioIo::new(WriteDeadline::new(stream, timeout)),
        hyper_util::service::TowerToHyperService::new(app),
    );
    let mut connection = std::pin::pin!(connection);
    let mut asked_to_close = false;
    let result = loop {
        tokio::select! {
            result = connection.as_mut() => break result,
            changed = phase.changed() => {
                // A dropped sender is a server that is gone.
                let now = match changed {
                    Ok(()) => *phase.borrow_and_update(),
                    Err(_) => Phase::Closed,
                };
                match now {
                    Phase::Serving => {}
                    Phase::Closing => {
                        if !asked_to_close {
                            asked_to_close = true;
                            connection.as_mut().graceful_shutdown();
                        }
                    }
                    Phase::Closed => return,
                }
            }
        }
    };
    if let Err(e) = result {
        if e.is_timeout() {
            count(&state.counters.headers_timed_out);
        } else if is_write_stalled(&e) {
            count(&state.counters.writes_timed_out);
        }
        tracing::debug!(error = %e, "API connection ended with an error");
    }
}

/// Answers a connection over `connections_max` with `503` and closes it,
/// reading (and dropping) what it sent meanwhile so that the close does not
/// reset the connection before the client reads the answer.
async fn refuse_connection(
    mut stream: TcpStream,
    limits: ApiLimits,
    _permit: OwnedSemaphorePermit,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = format!(
        "{{\"error\":{{\"code\":\"busy\",\"message\":\"the agent has {} connections open, its \
         api.connections_max; retry shortly\"}}}}\n",
        limits.connections_max
    );
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let linger = async {
        stream.write_all(answer.as_bytes()).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 1024];
        let mut read = 0;
        while read < BODY_LEN_MAX {
            match stream.read(&mut sink).await? {
                0 => break,
                n => read += n,
            }
        }
        std::io::Result::Ok(())
    };
    let _ = tokio::time::timeout(REFUSING_LINGER, linger).await;
}

/// Bounds every request: checks its token (but on [`OPEN_PATHS`]), reads
/// its body whole within `client_timeout` (`408` otherwise), then takes a
/// place among `requests_max` (or [`PROBES_MAX`] for `/healthz`), answering
/// `503` `busy` if there is none.
///
/// `busy` is answered here, before any handler, and nowhere else: clients
/// send a request answered `busy` again, whatever its method.
async fn limit_requests(
    State(state): State<Arc<ApiState>>,
    request: Request,
    next: Next,
) -> Response {
    let (parts, body) = request.into_parts();
    let open = OPEN_PATHS.contains(&parts.uri.path());
    // The token first, from the headers: a client without it gets no body
    // read, so it makes the server buffer nothing beyond hyper's buffer.
    // The open paths take no body at all, for the same reason.
    let body_len_max = if open {
        0
    } else {
        if let Err(e) = check_token(&state, &parts.headers) {
            return e.into_response();
        }
        BODY_LEN_MAX
    };
    let timeout = state.limits.client_timeout;
    let body = match tokio::time::timeout(timeout, axum::body::to_bytes(body, body_len_max)).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) => {
            let too_large =
                std::iter::successors(Some(&e as &(dyn std::error::Error + 'static)), |e| {
                    e.source()
                })
                .any(|e| e.is::<http_body_util::LengthLimitError>());
            if too_large {
                return ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!("the request body is over {body_len_max} bytes"),
                )
                .into_response();
            }
            return ApiError::bad_request(format!("cannot read the request body: {e}"))
                .into_response();
        }
        Err(_) => {
            count(&state.counters.bodies_timed_out);
            let mut response = ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!(
                    "the request body did not arrive within {} (api.client_timeout)",
                    humantime::format_duration(timeout)
                ),
            )
            .into_response();
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return response;
        }
    };
    let (budget, what) = if parts.uri.path() == "/healthz" {
        (&state.probes, "health checks")
    } else {
        (&state.requests, "requests")
    };
    let Ok(_permit) = budget.try_acquire() else {
        count(&state.counters.requests_busy);
        let mut response = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            format!("the agent is handling as many {what} as it allows at once; retry shortly"),
        )
        .into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return response;
    };
    next.run(Request::from_parts(parts, axum::body::Body::from(body)))
        .await
}

/// An error answer of the API.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    detail: ErrorDetail,
    /// Seconds for a `Retry-After` header.
    retry_after_s: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            detail: ErrorDetail {
                code: code.to_owned(),
                message: message.into(),
                available: None,
            },
            retry_after_s: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(ErrorBody { error: self.detail })).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(seconds) = self.retry_after_s {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl From<LedgerError> for ApiError {
    fn from(e: LedgerError) -> ApiError {
        match &e {
            LedgerError::Invalid(_) => ApiError::bad_request(e.to_string()),
            LedgerError::UnknownReservation(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", e.to_string())
            }
            LedgerError::KeyConflict(_)
            | LedgerError::WrongState { .. }
            | LedgerError::VlansExhausted { .. } => {
                ApiError::new(StatusCode::CONFLICT, "conflict", e.to_string())
            }
            LedgerError::NotOwner { .. } => {
                ApiError::new(StatusCode::FORBIDDEN, "not_owner", e.to_string())
            }
            LedgerError::Sqlite(_)
            | LedgerError::SchemaTooNew { .. }
            | LedgerError::NoWal { .. }
            | LedgerError::Corrupt { .. } => {
                tracing::error!(error = %format!("{e:#}"), "ledger failure");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            }
        }
    }
}

/// `401` unless `headers` carry the API token.
fn check_token(state: &ApiState, headers: &HeaderMap) -> Result<(), ApiError> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    let Some(presented) = presented else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing `Authorization: Bearer <token>` header",
        ));
    };
    // Comparing digests keeps the comparison's timing independent of how
    // much of the token a caller guessed right.
    if digest(&SHA256, presented.as_bytes()).as_ref() != state.token_digest.as_ref() {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "invalid API token",
        ));
    }
    Ok(())
}

/// Runs `operation` on the ledger, mapping its errors to API errors.
async fn with_ledger<T, F>(state: &ApiState, operation: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&mut Ledger) -> Result<T, LedgerError> + Send + 'static,
{
    state.ledger.run(operation).await.map_err(ApiError::from)
}

/// 200 `ok` while the agent serves and its ledger answers, 503 otherwise:
/// what a load balancer or a liveness probe needs, without the token.
async fn healthz(State(state): State<Arc<ApiState>>) -> Response {
    let text_plain = [(header::CONTENT_TYPE, "text/plain; charset=utf-8")];
    match state.ledger.run(|ledger| ledger.schema_version()).await {
        Ok(_) => (StatusCode::OK, text_plain, "ok\n").into_response(),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "health check: the ledger does not answer");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                text_plain,
                "ledger unavailable\n",
            )
                .into_response()
        }
    }
}

/// The agent's numbers for Prometheus (see `crate::metrics`), gathered at
/// scrape time: the federation's from its task, the counts from the ledger.
async fn metrics(State(state): State<Arc<ApiState>>) -> Result<Response, ApiError> {
    let federation = state.federation.sites().await.map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("{e:#}"),
        )
    })?;
    let now = now_ms();
    let (reservations, clusters) = with_ledger(&state, move |ledger| {
        Ok((ledger.reservation_counts(now)?, ledger.cluster_counts()?))
    })
    .await?;
    let text = crate::metrics::encode(&crate::metrics::Snapshot {
        federation,
        reservations,
        clusters,
        runner: state.runner.clone(),
        api: state.stats(),
    });
    Ok(([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response())
}

async fn site(State(state): State<Arc<ApiState>>) -> Result<Json<SiteInfo>, ApiError> {
    let now = now_ms();
    let window = Window::new(now, now + 1).expect("a one-millisecond window is non-empty");
    let free_now = with_ledger(&state, move |ledger| ledger.available(window, now)).await?;
    Ok(Json(SiteInfo {
        free_now,
        ..state.site.clone()
    }))
}

/// Query of `GET /v1/capacity`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CapacityQuery {
    from: Option<String>,
    to: Option<String>,
}

async fn capacity(
    State(state): State<Arc<ApiState>>,
    query: Result<Query<CapacityQuery>, QueryRejection>,
) -> Result<Json<CapacityReport>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let now = now_ms();
    let from_ms = match &query.from {
        Some(from) => {
            parse_instant(from, now).map_err(|e| ApiError::bad_request(format!("from: {e}")))?
        }
        None => now,
    };
    let to_ms = match &query.to {
        Some(to) => {
            parse_instant(to, now).map_err(|e| ApiError::bad_request(format!("to: {e}")))?
        }
        None => from_ms.saturating_add(DEFAULT_CAPACITY_SPAN_MS),
    };
    let window = checked_window(from_ms, to_ms)?;
    let (total_nodes, steps) = with_ledger(&state, move |ledger| {
        Ok((ledger.capacity()?, ledger.free_steps(window, now)?))
    })
    .await?;
    let min_free = steps
        .iter()
        .map(|step| step.free)
        .min()
        .unwrap_or(total_nodes);
    let steps = steps
        .into_iter()
        .map(|step| CapacityStep {
            at_ms: step.at_ms,
            at: format_instant(step.at_ms),
            free: step.free,
        })
        .collect();
    Ok(Json(CapacityReport {
        from_ms,
        to_ms,
        total_nodes,
        min_free,
        steps,
    }))
}

/// Query of `GET /v1/reservations`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// `active` (default) or `all`.
    state: Option<String>,
}

async fn list_reservations(
    State(state): State<Arc<ApiState>>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Vec<Reservation>>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let filter = match query.state.as_deref() {
        None | Some("active") => ReservationFilter::Active,
        Some("all") => ReservationFilter::All,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "state: expected `active` or `all`, got {other:?}"
            )));
        }
    };
    let now = now_ms();
    Ok(Json(
        with_ledger(&state, move |ledger| ledger.reservations(filter, now)).await?,
    ))
}

async fn show_reservation(
    State(state): State<Arc<ApiState>>,
    Path(key): Path<String>,
) -> Result<Json<Reservation>, ApiError> {
    let found = with_ledger(&state, {
        let key = key.clone();
        move |ledger| ledger.reservation(&key)
    })
    .await?;
    found.map(Json).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no reservation with key {key:?}"),
        )
    })
}

async fn hold(
    State(state): State<Arc<ApiState>>,
    body: Result<Json<HoldBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let now = now_ms();
    let instant = |arg: &InstantArg, field: &str| match arg {
        InstantArg::Ms(ms) => Ok(*ms),
        InstantArg::Text(text) => {
            parse_instant(text, now).map_err(|e| ApiError::bad_request(format!("{field}: {e}")))
        }
    };
    let window = checked_window(instant(&body.start, "start")?, instant(&body.end, "end")?)?;
    // Only holds made through the API are checked so: a master's hold for a
    // cluster that already started reaches the ledger directly.
    if window.end_ms <= now || window.start_ms < now - PAST_START_SLACK_MS {
        return Err(ApiError::bad_request(format!(
            "the window starts in the past ({} .. {}; now is {}): a hold starts at most {}s before now",
            format_instant(window.start_ms),
            format_instant(window.end_ms),
            format_instant(now),
            PAST_START_SLACK_MS / 1000
        )));
    }
    let lease_s = body.lease_s.unwrap_or(DEFAULT_LEASE_S);
    if !(1..=LEASE_S_MAX).contains(&lease_s) {
        return Err(ApiError::bad_request(format!(
            "lease_s must be between 1 and {LEASE_S_MAX}"
        )));
    }
    let shape = body.shape.unwrap_or(state.site.node);
    if !shape.fits_in(&state.site.node) {
        return Err(ApiError::bad_request(format!(
            "a node of {shape} does not fit this site's node slot of {}",
            state.site.node
        )));
    }
    let request = HoldRequest {
        key: body.key,
        cluster_id: body.cluster_id,
        requester: body.requester.unwrap_or_else(|| state.site.name.clone()),
        window,
        nodes: body.nodes,
        shape,
        lease_ms: i64::try_from(lease_s * 1000).expect("lease_s is bounded by LEASE_S_MAX"),
    };
    let outcome = with_ledger(&state, move |ledger| ledger.hold(&request, now)).await?;
    match outcome {
        HoldOutcome::Held(reservation) => {
            state.federation.capacity_changed();
            tracing::info!(key = %reservation.key, nodes = reservation.nodes, state = %reservation.state, "hold");
            Ok((StatusCode::CREATED, Json(reservation)).into_response())
        }
        HoldOutcome::Denied { available } => {
            let mut error = ApiError::new(
                StatusCode::CONFLICT,
                "insufficient_capacity",
                match available {
                    1 => "only 1 node is free for the whole window".to_owned(),
                    n => format!("only {n} nodes are free for the whole window"),
                },
            );
            error.detail.available = Some(available);
            Err(error)
        }
    }
}

async fn commit(
    State(state): State<Arc<ApiState>>,
    Path(key): Path<String>,
    body: Option<Json<OwnerBody>>,
) -> Result<Json<Reservation>, ApiError> {
    owner_action(&state, key, body, "commit", Ledger::commit).await
}

async fn release(
    State(state): State<Arc<ApiState>>,
    Path(key): Path<String>,
    body: Option<Json<OwnerBody>>,
) -> Result<Json<Reservation>, ApiError> {
    owner_action(&state, key, body, "release", Ledger::release).await
}

/// Commits or releases `key` for its owner, then re-advertises capacity.
async fn owner_action(
    state: &ApiState,
    key: String,
    body: Option<Json<OwnerBody>>,
    action: &'static str,
    operation: fn(&mut Ledger, &str, &str, i64) -> Result<Reservation, LedgerError>,
) -> Result<Json<Reservation>, ApiError> {
    let requester = owner(state, body);
    let now = now_ms();
    let reservation = with_ledger(state, move |ledger| {
        operation(ledger, &key, &requester, now)
    })
    .await?;
    state.federation.capacity_changed();
    tracing::info!(key = %reservation.key, action, "reservation");
    Ok(Json(reservation))
}

/// Query of `GET /v1/events`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    after: Option<i64>,
    limit: Option<u32>,
}

async fn events(
    State(state): State<Arc<ApiState>>,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Json<Vec<Event>>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let after = query.after.unwrap_or(0);
    let limit = query.limit.unwrap_or(100).min(EVENTS_LIMIT_MAX);
    Ok(Json(
        with_ledger(&state, move |ledger| ledger.events(after, limit)).await?,
    ))
}

async fn sites(State(state): State<Arc<ApiState>>) -> Result<Json<SitesReport>, ApiError> {
    state.federation.sites().await.map(Json).map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("{e:#}"),
        )
    })
}

async fn join(
    State(state): State<Arc<ApiState>>,
    body: Result<Json<JoinBody>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(body) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let addr: multiaddr::Multiaddr = body
        .addr
        .parse()
        .map_err(|e| ApiError::bad_request(format!("addr {:?}: {e}", body.addr)))?;
    let joined = state.federation.join(addr).await.map_err(|e| match e {
        JoinError::BadAddress(why) => ApiError::bad_request(why),
        JoinError::Refused(why) => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "join_refused", why)
        }
        JoinError::Unreachable(why) => {
            ApiError::new(StatusCode::GATEWAY_TIMEOUT, "unreachable", why)
        }
    })?;
    Ok(Json(
        serde_json::json!({ "joined": joined.peer_id, "site": joined.site }),
    ))
}

/// Query of `DELETE /v1/sites/{site}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ForgetQuery {
    /// End the site's parts of live clusters mastered here too.
    #[serde(default)]
    force: bool,
}

async fn forget_site(
    State(state): State<Arc<ApiState>>,
    Path(site): Path<String>,
    query: Result<Query<ForgetQuery>, QueryRejection>,
) -> Result<Json<crate::federation::Forgotten>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let forgotten = state
        .federation
        .forget_site(site, query.force)
        .await
        .map_err(|e| {
            let message = e.to_string();
            match e {
                ForgetSiteError::Unknown(_) => {
                    ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
                }
                ForgetSiteError::Local(_) => ApiError::bad_request(message),
                ForgetSiteError::Alive(_) => {
                    ApiError::new(StatusCode::CONFLICT, "site_alive", message)
                }
                ForgetSiteError::HoldsParts { .. } => {
                    ApiError::new(StatusCode::CONFLICT, "site_holds_parts", message)
                }
                ForgetSiteError::Failed(_) => {
                    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
                }
            }
        })?;
    Ok(Json(forgotten))
}

async fn list_clusters(
    State(state): State<Arc<ApiState>>,
) -> Result<Json<Vec<ClusterRecord>>, ApiError> {
    Ok(Json(with_ledger(&state, |ledger| ledger.clusters()).await?))
}

async fn show_cluster(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Result<Json<ClusterDetail>, ApiError> {
    let record = find_cluster(&state, &id).await?;
    let cluster = record.id.clone();
    let nodes = with_ledger(&state, move |ledger| ledger.nodes(&cluster)).await?;
    let network = state.network.get(&record.id);
    Ok(Json(ClusterDetail {
        record,
        nodes,
        network,
    }))
}

/// The cluster with id `id`, or the one named `id`.
async fn find_cluster(state: &ApiState, id: &str) -> Result<ClusterRecord, ApiError> {
    let clusters = with_ledger(state, |ledger| ledger.clusters()).await?;
    if let Some(cluster) = clusters.iter().find(|c| c.id == id) {
        return Ok(cluster.clone());
    }
    let named: Vec<&ClusterRecord> = clusters.iter().filter(|c| c.name == id).collect();
    match named.as_slice() {
        [] => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no cluster with id or name {id:?}"),
        )),
        [one] => Ok((*one).clone()),
        many => {
            // The newest live one is what a user means by a reused name.
            let live: Vec<&&ClusterRecord> =
                many.iter().filter(|c| !c.state.is_terminal()).collect();
            match live.as_slice() {
                [one] => Ok((**one).clone()),
                _ => Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "ambiguous",
                    format!(
                        "{} clusters are named {id:?}; use the cluster id",
                        many.len()
                    ),
                )),
            }
        }
    }
}

/// Longest a create waits for a view still warming up after a start, and
/// how often it asks again meanwhile.
const CREATE_WARMUP_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
const CREATE_WARMUP_POLL: std::time::Duration = std::time::Duration::from_millis(200);

async fn create_cluster(
    State(state): State<Arc<ApiState>>,
    body: Result<Json<CreateClusterBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let now = now_ms();
    let start = match &body.start {
        None => now,
        Some(InstantArg::Ms(ms)) => *ms,
        Some(InstantArg::Text(text)) => {
            parse_instant(text, now).map_err(|e| ApiError::bad_request(format!("start: {e}")))?
        }
    };
    let duration_ms = crate::time::parse_duration_ms(&body.duration)
        .map_err(|e| ApiError::bad_request(format!("duration: {e}")))?;
    if duration_ms <= 0 {
        return Err(ApiError::bad_request("duration: must be positive"));
    }
    let window = checked_window(start, start.saturating_add(duration_ms))?;
    let slot = state.site.node;
    let request = ClusterRequest {
        name: body.name,
        nodes: body.nodes,
        shape: NodeShape {
            cores: body.cores.unwrap_or(slot.cores),
            memory_mib: body.memory_mib.unwrap_or(slot.memory_mib),
            disk_gib: body.disk_gib.unwrap_or(slot.disk_gib),
        },
        window,
        image: body.image,
        heal: body.heal.unwrap_or_default(),
    };
    let id = new_cluster_id()
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e))?;
    // A site that has just started may not have heard from the sites it
    // remembers: their adverts usually arrive within a second or two, so
    // the request waits for them (bounded) rather than be refused for lack
    // of sites it has not heard from yet.
    let waited_since = tokio::time::Instant::now();
    let created = loop {
        let created = state
            .federation
            .create_cluster(id.clone(), request.clone())
            .await
            .map_err(|e| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    format!("{e:#}"),
                )
            })?;
        if matches!(created, Err(CreateError::NotReady { .. }))
            && waited_since.elapsed() < CREATE_WARMUP_WAIT
        {
            tokio::time::sleep(CREATE_WARMUP_POLL).await;
            continue;
        }
        break created;
    };
    match created {
        Ok(record) => Ok((StatusCode::CREATED, Json(record)).into_response()),
        Err(CreateError::Invalid(message)) => Err(ApiError::bad_request(message)),
        Err(e @ CreateError::UnknownShape(_)) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "unknown_shape",
            e.to_string(),
        )),
        Err(CreateError::Insufficient { available, detail }) => {
            let mut error = ApiError::new(StatusCode::CONFLICT, "insufficient_capacity", detail);
            error.detail.available = Some(available);
            Err(error)
        }
        Err(e @ CreateError::NotReady { retry_after_s, .. }) => {
            let mut error = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "federation_not_ready",
                e.to_string(),
            );
            error.retry_after_s = Some(retry_after_s);
            Err(error)
        }
        Err(e @ CreateError::Exists(_)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            e.to_string(),
        )),
        Err(e @ CreateError::NameTaken { .. }) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "name_taken",
            e.to_string(),
        )),
        Err(CreateError::Ledger(e)) => Err(e.into()),
    }
}

async fn delete_cluster(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Result<Json<ClusterRecord>, ApiError> {
    let found = find_cluster(&state, &id).await?;
    let deleted = state
        .federation
        .delete_cluster(found.id)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!("{e:#}"),
            )
        })?;
    match deleted {
        Ok(record) => Ok(Json(record)),
        Err(e @ DeleteError::Unknown(_)) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            e.to_string(),
        )),
        Err(e @ DeleteError::NotMaster(..)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_master",
            e.to_string(),
        )),
        Err(DeleteError::Ledger(e)) => Err(e.into()),
    }
}

/// A fresh federation-wide cluster id.
fn new_cluster_id() -> Result<String, String> {
    let bytes = crate::identity::random_bytes::<8>().map_err(|e| e.to_string())?;
    Ok(format!(
        "c-{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint; see docs/openapi.yaml",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this endpoint",
    )
}

fn owner(state: &ApiState, body: Option<Json<OwnerBody>>) -> String {
    body.and_then(|Json(body)| body.requester)
        .unwrap_or_else(|| state.site.name.clone())
}

fn checked_window(from_ms: i64, to_ms: i64) -> Result<Window, ApiError> {
    for instant in [from_ms, to_ms] {
        if !(0..=vcfed_storage::INSTANT_MS_MAX).contains(&instant) {
            return Err(ApiError::bad_request(format!(
                "time {instant} is outside 1970 to 9999"
            )));
        }
    }
    let window = Window::new(from_ms, to_ms).ok_or_else(|| {
        ApiError::bad_request(format!(
            "the window must end after it starts ({} .. {})",
            format_instant(from_ms),
            format_instant(to_ms)
        ))
    })?;
    if window.duration_ms() > WINDOW_MS_MAX {
        return Err(ApiError::bad_request(format!(
            "the window may span at most {} days",
            WINDOW_MS_MAX / DAY_MS
        )));
    }
    Ok(window)
}
