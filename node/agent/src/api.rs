//! The agent's local HTTP API (axum), described in `docs/openapi.yaml`.
//!
//! Every request but `GET /healthz` needs `Authorization: Bearer <token>`
//! (the site's `api.token`), `GET /metrics` included: a scrape config can
//! send the token (`authorization` in Prometheus), and the metrics tell
//! an outsider how busy the site is. Errors are JSON `{"error": {"code": ..., "message": ...}}`
//! with a stable `code`. Ledger calls run on the blocking pool, one at a time
//! behind a mutex: SQLite serialises writers anyway, and every write is
//! durable before its response is sent.

use std::future::Future;
use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use ring::digest::{SHA256, digest};
use serde::Deserialize;
use tokio::net::TcpListener;
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
use vcfed_node_core::cluster::{ClusterRequest, CreateError, DeleteError};

/// Largest request body accepted, bytes.
pub const BODY_LEN_MAX: usize = 64 * 1024;
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

/// Shared state of the API handlers.
pub struct ApiState {
    site: SiteInfo,
    ledger: SharedLedger,
    token_digest: ring::digest::Digest,
    federation: FederationHandle,
    network: crate::runner::NetworkBoard,
    runner: Option<crate::runner::RunnerCounters>,
}

impl ApiState {
    /// State for a site described by `site` (its `free_now` is filled per request).
    pub fn new(
        site: SiteInfo,
        ledger: SharedLedger,
        token: &str,
        federation: FederationHandle,
    ) -> ApiState {
        ApiState {
            site,
            ledger,
            token_digest: digest(&SHA256, token.as_bytes()),
            federation,
            network: crate::runner::NetworkBoard::default(),
            runner: None,
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
/// check.
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
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(healthz))
        .merge(protected)
        .layer(DefaultBodyLimit::max(BODY_LEN_MAX))
        .with_state(state)
}

/// Serves the API on `listener` until `shutdown` resolves, then finishes the
/// requests in flight.
pub async fn serve(
    listener: TcpListener,
    state: Arc<ApiState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
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

async fn require_token(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    let Some(presented) = presented else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing `Authorization: Bearer <token>` header",
        )
        .into_response();
    };
    // Comparing digests keeps the comparison's timing independent of how
    // much of the token a caller guessed right.
    if digest(&SHA256, presented.as_bytes()).as_ref() != state.token_digest.as_ref() {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "invalid API token",
        )
        .into_response();
    }
    next.run(request).await
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
