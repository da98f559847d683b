//! The HTTP shell: JSON API, `/metrics`, `/healthz` and the status page (docs/API.md).
//!
//! Handlers read committed state through a small pool of read-only SQLite connections on
//! tokio's blocking threads; they never touch the writer.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;

pub mod openapi;
pub mod view;

use crate::core::Shared;
use crate::metrics::Metrics;
use crate::store::{DeadLetter, EventFilter, JournalRow, Reader, StoreError, VmFilter};

pub const MAX_PAGE: u32 = 1000;
const DEFAULT_PAGE: u32 = 100;

/// Read-only connections, handed out round robin.
pub struct ReaderPool {
    readers: Vec<Mutex<Reader>>,
    next: AtomicUsize,
}

impl ReaderPool {
    pub fn open(db: &crate::store::Database, size: usize) -> Result<ReaderPool, StoreError> {
        let readers = (0..size.max(1))
            .map(|_| Reader::open(db).map(Mutex::new))
            .collect::<Result<_, _>>()?;
        Ok(ReaderPool {
            readers,
            next: AtomicUsize::new(0),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut Reader) -> T) -> T {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.readers.len();
        let mut reader = self.readers[i].lock().unwrap_or_else(|p| p.into_inner());
        f(&mut reader)
    }
}

#[derive(Clone)]
pub struct AppState {
    /// For the few writes the API makes (retrying a dead letter), on a connection of their own.
    pub database: crate::store::Database,
    pub readers: Arc<ReaderPool>,
    pub metrics: Arc<Metrics>,
    pub shared: Arc<Shared>,
    pub api_token: Option<Arc<String>>,
    /// Whether the event bus is configured (`/healthz` reports it).
    pub bus: bool,
    /// The idle rule's settings, shown with the activity history.
    pub idle: IdleSettings,
    /// The enrolled nodes (enrollment installs the new registry at once).
    pub registry: Arc<crate::registry::Shared>,
    /// For enrollment: the secret the node keys derive from, `node_connect`.
    pub config: Arc<crate::config::MasterConfig>,
    /// This master's role in a high-availability group (`ha=yes`), for `/healthz`.
    pub ha: Option<Arc<crate::ha::HaState>>,
}

/// The idle rule's settings (`idle_tx_packets_max`, `idle_wr_reqs_max`, `idle_windows`).
#[derive(Clone, Copy)]
pub struct IdleSettings {
    pub tx_packets_max: u64,
    pub wr_reqs_max: u64,
    pub windows: u32,
}

/// An API error: a status and a message, as JSON `{"error": "..."}`.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "API read failed");
        ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("database: {e}"))
    }
}

/// A query string as the handler's struct; a bad one is a 400 in the documented JSON shape,
/// its message in lower case (axum's own rejection is text/plain).
pub struct ApiQuery<T>(pub T);

impl<T, S> axum::extract::FromRequestParts<S> for ApiQuery<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(q)) => Ok(ApiQuery(q)),
            Err(e) => Err(bad_request(lower_first(&e.body_text()))),
        }
    }
}

/// `Failed to …` → `failed to …` (API.md: messages in lower case).
fn lower_first(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(c) => c.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// For the endpoints that take no query parameter: any is a 400.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoParams {}

/// An unknown route: 404 in the documented JSON shape.
async fn no_route(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        format!("no such endpoint: {method} {}", uri.path()),
    )
}

/// A known route with another method: 405 in the documented JSON shape.
async fn wrong_method(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} does not take {method}", uri.path()),
    )
}

fn bad_request(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

async fn read<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(&mut Reader) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    let readers = state.readers.clone();
    tokio::task::spawn_blocking(move || readers.with(f))
        .await
        .map_err(|e| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reader task failed: {e}"),
            )
        })?
        .map_err(ApiError::from)
}

pub fn router(state: AppState) -> Router {
    let protected = Router::new()
        .route("/api/v1/vms", get(list_vms))
        .route("/api/v1/vms/{uuid}", get(get_vm))
        .route("/api/v1/vms/{uuid}/wait", get(wait_vm))
        .route("/api/v1/vms/{uuid}/activity", get(vm_activity))
        .route("/api/v1/nodes", get(list_nodes))
        .route("/api/v1/events", get(list_events))
        .route("/api/v1/dead-letters", get(list_dead_letters))
        .route(
            "/api/v1/dead-letters/{id}/retry",
            axum::routing::post(retry_dead_letter),
        )
        .route(
            "/api/v1/nodes/{node_id}/enrollment",
            axum::routing::post(enroll_node),
        )
        .route(
            "/api/v1/nodes/{node_id}",
            axum::routing::delete(revoke_node),
        )
        .route("/metrics", get(metrics))
        .route("/api/v1/openapi.json", get(openapi::document))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/", get(status_page))
        .route("/healthz", get(healthz))
        .merge(protected)
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(middleware::from_fn_with_state(state.clone(), check_host))
        .with_state(state)
}

/// Refuses a request whose `Host` is a name this API does not answer to: a web page the
/// operator visits cannot read the loopback API by pointing its own name at 127.0.0.1 (DNS
/// rebinding). An IP address, `localhost` and the names in `http_hosts` are answered.
async fn check_host(
    State(state): State<AppState>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !host.is_empty() && !host_allowed(host, &state.config.http_hosts) {
        return ApiError(
            StatusCode::FORBIDDEN,
            "host header names a host this api does not answer to (dns rebinding guard): list it in http_hosts".into(),
        )
        .into_response();
    }
    next.run(req).await
}

/// Whether `host` (a Host header: `name[:port]`, `[v6][:port]`) is an IP address, `localhost`,
/// or one of `names`.
fn host_allowed(host: &str, names: &[String]) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else {
        host.rsplit_once(':').map_or(host, |(n, port)| {
            if port.chars().all(|c| c.is_ascii_digit()) {
                n
            } else {
                host
            }
        })
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name.parse::<std::net::IpAddr>().is_ok()
        || name == "localhost"
        || names.iter().any(|n| n.eq_ignore_ascii_case(&name))
}

async fn require_token(
    State(state): State<AppState>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    if let Some(token) = &state.api_token {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let ok = given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes()));
        if !ok {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                Json(json!({ "error": "missing or wrong bearer token" })),
            )
                .into_response();
        }
    }
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct VmsQuery {
    node: Option<String>,
    state: Option<String>,
    idle: Option<bool>,
    duplicate: Option<bool>,
    limit: Option<u32>,
    offset: Option<u64>,
}

fn page(limit: Option<u32>) -> Result<u32, ApiError> {
    match limit {
        None => Ok(DEFAULT_PAGE),
        Some(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
        Some(n) => Err(bad_request(format!(
            "limit {n} is out of range 1..={MAX_PAGE}"
        ))),
    }
}

#[utoipa::path(get, path = "/api/v1/vms", tag = "vms", params(VmsQuery),
    responses((status = 200, description = "ok", body = view::VmsPage), (status = 400, description = "bad request (the message names what was wrong)", body = openapi::Error),
        (status = 401, description = "missing or wrong bearer token", body = openapi::Error), (status = 503, description = "database unavailable", body = openapi::Error)),
    security((), ("bearer" = [])))]
async fn list_vms(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<VmsQuery>,
) -> Result<Json<view::VmsPage>, ApiError> {
    let filter = VmFilter {
        node: q.node,
        state: q.state,
        idle: q.idle.unwrap_or(false),
        duplicate: q.duplicate.unwrap_or(false),
        limit: page(q.limit)?,
        // The store takes a signed 64-bit offset: a larger one is a bad request, not a wrap.
        offset: match q.offset.unwrap_or(0) {
            o if o <= i64::MAX as u64 => o,
            o => {
                return Err(bad_request(format!(
                    "offset {o} is out of range (at most {})",
                    i64::MAX
                )))
            }
        },
    };
    let (limit, offset) = (filter.limit, filter.offset);
    let (vms, total) = read(&state, move |r| r.vms(&filter)).await?;
    let next = offset.saturating_add(vms.len() as u64);
    let next_offset = (next < total).then_some(next);
    Ok(Json(view::VmsPage {
        vms,
        total,
        limit,
        offset,
        next_offset,
    }))
}

#[utoipa::path(get, path = "/api/v1/vms/{uuid}", tag = "vms", params(("uuid" = String, Path)),
    responses((status = 200, description = "ok", body = view::VmRows), (status = 404, description = "not found", body = openapi::Error),
        (status = 400, description = "a query parameter (this endpoint takes none)", body = openapi::Error),
        (status = 401, description = "missing or wrong bearer token", body = openapi::Error), (status = 503, description = "database unavailable", body = openapi::Error)),
    security((), ("bearer" = [])))]
async fn get_vm(
    State(state): State<AppState>,
    Path(uuid): Path<String>,
    ApiQuery(NoParams {}): ApiQuery<NoParams>,
) -> Result<Json<view::VmRows>, ApiError> {
    let key = uuid.clone();
    let rows = read(&state, move |r| r.vm(&key)).await?;
    if rows.is_empty() {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no VM with uuid {uuid}"),
        ));
    }
    Ok(Json(view::VmRows {
        uuid,
        reached: None,
        rows,
    }))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ActivityQuery {
    from: Option<u64>,
    to: Option<u64>,
    node: Option<String>,
    max_points: Option<u32>,
}

/// Longest range of `/activity`.
const MAX_ACTIVITY_DAYS: u64 = 366;
/// Default `max_points` of `/activity`: 14 days of 10-minute windows, unmerged.
const DEFAULT_ACTIVITY_POINTS: u32 = 2016;
const MAX_ACTIVITY_POINTS: u32 = 10_000;

/// A VM's activity history from `from` to `to` (unix ms; default the last 24 h), each node's
/// windows merged into at most `max_points` points when the range holds more.
#[utoipa::path(get, path = "/api/v1/vms/{uuid}/activity", tag = "vms",
    params(("uuid" = String, Path), ActivityQuery),
    responses((status = 200, description = "ok", body = view::ActivityPage), (status = 400, description = "bad request (the message names what was wrong)", body = openapi::Error),
        (status = 404, description = "not found", body = openapi::Error), (status = 401, description = "missing or wrong bearer token", body = openapi::Error),
        (status = 503, description = "database unavailable", body = openapi::Error)),
    security((), ("bearer" = [])))]
async fn vm_activity(
    State(state): State<AppState>,
    Path(uuid): Path<String>,
    ApiQuery(q): ApiQuery<ActivityQuery>,
) -> Result<Json<view::ActivityPage>, ApiError> {
    use crate::activity::{day_of, downsample, DAY_MS};
    let bad = |m: String| ApiError(StatusCode::BAD_REQUEST, m);
    let to = q.to.unwrap_or_else(vmwatch_common::time::now_ms);
    let from = q.from.unwrap_or(to.saturating_sub(DAY_MS));
    if from > to {
        return Err(bad(format!("from ({from}) is after to ({to})")));
    }
    if to - from > MAX_ACTIVITY_DAYS * DAY_MS {
        return Err(bad(format!(
            "the range is longer than {MAX_ACTIVITY_DAYS} days"
        )));
    }
    let max_points = q.max_points.unwrap_or(DEFAULT_ACTIVITY_POINTS);
    if !(1..=MAX_ACTIVITY_POINTS).contains(&max_points) {
        return Err(bad(format!(
            "max_points must be 1 to {MAX_ACTIVITY_POINTS}"
        )));
    }
    let key = uuid.clone();
    let (rows, days) = read(&state, move |r| {
        let rows = r.vm(&key)?;
        let days = r.activity(&key, q.node.as_deref(), day_of(from), day_of(to))?;
        Ok((rows, days))
    })
    .await?;
    if rows.is_empty() && days.is_empty() {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no VM with uuid {uuid}"),
        ));
    }
    // Each node's points, in time order, merged on their own (a migrated VM has two).
    let mut per_node: std::collections::BTreeMap<String, Vec<crate::activity::Point>> =
        std::collections::BTreeMap::new();
    for (node_id, points) in days {
        per_node
            .entry(node_id)
            .or_default()
            .extend(points.into_iter().filter(|p| p.ts > from && p.ts <= to));
    }
    let total: usize = per_node.values().map(Vec::len).sum();
    let per_point = total.div_ceil(max_points as usize).max(1);
    let mut points = Vec::new();
    for (node_id, mut node_points) in per_node {
        node_points.sort_by_key(|p| p.ts);
        let buckets = node_points.len().div_ceil(per_point);
        points.extend(downsample(&node_points, buckets).into_iter().map(|bucket| {
            view::NodeBucket {
                node_id: node_id.clone(),
                bucket,
            }
        }));
    }
    points.sort_by(|a, b| (a.bucket.ts, &a.node_id).cmp(&(b.bucket.ts, &b.node_id)));
    Ok(Json(view::ActivityPage {
        uuid,
        from,
        to,
        thresholds: view::Thresholds {
            tx_pkts: state.idle.tx_packets_max,
            wr_reqs: state.idle.wr_reqs_max,
        },
        idle_windows: state.idle.windows,
        windows_per_point: per_point as u32,
        points,
    }))
}

#[utoipa::path(get, path = "/api/v1/nodes", tag = "nodes",
    responses((status = 200, description = "ok", body = view::Nodes), (status = 400, description = "a query parameter (this endpoint takes none)", body = openapi::Error), (status = 401, description = "missing or wrong bearer token", body = openapi::Error),
        (status = 503, description = "database unavailable", body = openapi::Error)),
    security((), ("bearer" = [])))]
async fn list_nodes(
    State(state): State<AppState>,
    ApiQuery(NoParams {}): ApiQuery<NoParams>,
) -> Result<Json<view::Nodes>, ApiError> {
    let nodes = read(&state, |r| r.nodes()).await?;
    Ok(Json(view::Nodes { nodes }))
}

/// Longest a `/wait` may hold a request.
pub const MAX_WAIT_S: u64 = 3600;

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct WaitQuery {
    state: String,
    timeout: Option<u64>,
}

/// Long poll: answers as soon as any row of the VM is in `state` (200), or after `timeout`
/// seconds with 408 and the current rows. Waiters are async tasks woken by the core's change
/// broadcast: no thread and no polling per waiter.
#[utoipa::path(get, path = "/api/v1/vms/{uuid}/wait", tag = "vms",
    params(("uuid" = String, Path), WaitQuery),
    responses((status = 200, description = "a row reached the state", body = view::VmRows),
        (status = 408, description = "timeout: the rows as they are (none for an unknown uuid)", body = view::VmRows),
        (status = 400, description = "bad request (the message names what was wrong)", body = openapi::Error),
        (status = 401, description = "missing or wrong bearer token", body = openapi::Error), (status = 503, description = "database unavailable", body = openapi::Error)),
    security((), ("bearer" = [])))]
async fn wait_vm(
    State(state): State<AppState>,
    Path(uuid): Path<String>,
    ApiQuery(q): ApiQuery<WaitQuery>,
) -> Result<Response, ApiError> {
    let timeout_s = q.timeout.unwrap_or(600);
    if timeout_s > MAX_WAIT_S {
        return Err(bad_request(format!(
            "timeout {timeout_s} is above the maximum of {MAX_WAIT_S} s"
        )));
    }
    // Subscribe before reading, so no change can slip between the read and the wait.
    let mut changes = state.shared.vm_changes.subscribe();
    // Counted while waiting, also when the client goes away (the future is then dropped).
    struct Waiting(prometheus_client::metrics::gauge::Gauge);
    impl Drop for Waiting {
        fn drop(&mut self) {
            self.0.dec();
        }
    }
    state.metrics.api_waiters.inc();
    let _waiting = Waiting(state.metrics.api_waiters.clone());
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(timeout_s);
    let mut stopping = state.shared.shutdown.subscribe();
    loop {
        let key = uuid.clone();
        let rows = read(&state, move |r| r.vm(&key)).await?;
        if rows.iter().any(|r| r.state == q.state) {
            // A hop of `vmwatch-bench-latency`'s breakdown.
            tracing::debug!(uuid, state = q.state, "wait answered");
            return Ok(Json(view::VmRows {
                uuid,
                reached: Some(true),
                rows,
            })
            .into_response());
        }
        // Wait for a change of this uuid into the wanted state (or a lag: then re-read).
        loop {
            let next = tokio::select! {
                r = tokio::time::timeout_at(deadline, changes.recv()) => r,
                _ = stopping.wait_for(|s| *s) => {
                    return Err(ApiError(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "master is stopping".into(),
                    ));
                }
            };
            match next {
                Err(_) => {
                    return Ok((
                        StatusCode::REQUEST_TIMEOUT,
                        Json(view::VmRows {
                            uuid,
                            reached: Some(false),
                            rows,
                        }),
                    )
                        .into_response());
                }
                Ok(Ok(batch)) => {
                    if batch
                        .iter()
                        .any(|c| c.uuid == uuid && c.state.as_deref() == Some(q.state.as_str()))
                    {
                        break;
                    }
                }
                Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => break,
                Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => {
                    return Err(ApiError(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "master is stopping".into(),
                    ));
                }
            }
        }
    }
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    after: Option<i64>,
    node: Option<String>,
    uuid: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    limit: Option<u32>,
}

#[utoipa::path(get, path = "/api/v1/events", tag = "journal", params(EventsQuery),
    responses((status = 200, description = "ok", body = EventsPage), (status = 400, description = "bad request (the message names what was wrong)", body = openapi::Error),
        (status = 401, description = "missing or wrong bearer token", body = openapi::Error), (status = 503, description = "database unavailable", body = openapi::Error)),
    security((), ("bearer" = [])))]
async fn list_events(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<EventsQuery>,
) -> Result<Json<EventsPage>, ApiError> {
    if let Some(k) = &q.kind {
        if crate::rules::EntryType::parse(k).is_none() {
            return Err(bad_request(format!("unknown type `{k}`")));
        }
    }
    let after = q.after.unwrap_or(0);
    let filter = EventFilter {
        after,
        node: q.node,
        uuid: q.uuid,
        kind: q.kind,
        limit: page(q.limit)?,
    };
    let events = read(&state, move |r| r.events(&filter)).await?;
    let last_id = events.last().map(|e| e.id).unwrap_or(after);
    Ok(Json(EventsPage { events, last_id }))
}

/// `GET /api/v1/events`, serialized once from the rows.
#[derive(Serialize, utoipa::ToSchema)]
struct EventsPage {
    events: Vec<JournalRow>,
    last_id: i64,
}

/// `GET /api/v1/dead-letters`.
#[derive(Serialize, utoipa::ToSchema)]
struct DeadLetters {
    dead_letters: Vec<DeadLetter>,
}

#[utoipa::path(get, path = "/api/v1/dead-letters", tag = "journal",
    responses((status = 200, description = "ok", body = DeadLetters), (status = 400, description = "a query parameter (this endpoint takes none)", body = openapi::Error), (status = 401, description = "missing or wrong bearer token", body = openapi::Error),
        (status = 503, description = "database unavailable", body = openapi::Error)),
    security((), ("bearer" = [])))]
async fn list_dead_letters(
    State(state): State<AppState>,
    ApiQuery(NoParams {}): ApiQuery<NoParams>,
) -> Result<Json<DeadLetters>, ApiError> {
    let dead_letters = read(&state, |r| r.dead_letters(MAX_PAGE)).await?;
    Ok(Json(DeadLetters { dead_letters }))
}

/// Puts a dead letter back into the outbox; the webhook delivers it in journal order.
#[utoipa::path(post, path = "/api/v1/dead-letters/{id}/retry", tag = "journal",
    params(("id" = i64, Path, description = "journal id")),
    responses((status = 200, description = "ok", body = openapi::Retried), (status = 400, description = "bad request (the message names what was wrong)", body = openapi::Error),
        (status = 404, description = "not found", body = openapi::Error), (status = 401, description = "missing or wrong bearer token", body = openapi::Error),
        (status = 503, description = "database unavailable", body = openapi::Error)),
    security((), ("bearer" = [])))]
async fn retry_dead_letter(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    require_configured_token(&state, "retrying a dead letter")?;
    let id: i64 = id
        .parse()
        .map_err(|_| bad_request(format!("`{id}` is not a journal id")))?;
    let path = state.database.clone();
    let found = tokio::task::spawn_blocking(move || {
        crate::store::Outbox::open(&path).and_then(|mut o| o.retry_dead_letter(id))
    })
    .await
    .map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("retry task failed: {e}"),
        )
    })??;
    if !found {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no dead letter with journal id {id}"),
        ));
    }
    state.metrics.dead_letters.dec();
    state.metrics.outbox_depth.inc();
    // Wake the webhook deliverer.
    state.shared.committed.send_modify(|n| *n += 1);
    Ok(Json(json!({ "retried": id })))
}

/// Enrollment and revocation change who may send: they need `api_token` even on loopback.
fn require_configured_token(state: &AppState, what: &str) -> Result<(), ApiError> {
    if state.api_token.is_none() {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            format!("{what} needs api_token: set api_token in the master's configuration and send it as a bearer token"),
        ));
    }
    Ok(())
}

fn node_id_of(text: &str) -> Result<vmwatch_common::protocol::NodeId, ApiError> {
    vmwatch_common::protocol::NodeId::parse(text)
        .map_err(|e| bad_request(format!("node id: {}", e.to_lowercase())))
}

/// Writes to the registry on a connection of its own, then installs the registry it left so
/// the node port follows at once.
async fn with_registry<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(&mut crate::store::Registry) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let (path, config, shared) = (
        state.database.clone(),
        state.config.clone(),
        state.registry.clone(),
    );
    tokio::task::spawn_blocking(move || {
        let mut db = crate::store::Registry::open(&path)?;
        let out = f(&mut db)?;
        let snapshot = crate::registry::load(&mut db, &config)?;
        shared.set(snapshot);
        Ok(out)
    })
    .await
    .map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("registry task failed: {e}"),
        )
    })?
}

#[utoipa::path(post, path = "/api/v1/nodes/{node_id}/enrollment", tag = "nodes",
    params(("node_id" = String, Path, description = "the hypervisor's node id (1-64 of A-Za-z0-9._-)")),
    responses((status = 200, description = "enrolled (or already enrolled): the node's configuration", body = crate::enroll::Enrollment),
        (status = 400, description = "bad node id", body = openapi::Error),
        (status = 401, description = "missing or wrong bearer token", body = openapi::Error),
        (status = 403, description = "the master has no api_token", body = openapi::Error),
        (status = 409, description = "the node id was revoked", body = openapi::Error),
        (status = 503, description = "database unavailable", body = openapi::Error)),
    security(("bearer" = [])))]
async fn enroll_node(
    State(state): State<AppState>,
    Path(node_id): Path<String>,
) -> Result<Json<crate::enroll::Enrollment>, ApiError> {
    require_configured_token(&state, "enrollment")?;
    let node = node_id_of(&node_id)?;
    let config = state.config.clone();
    let enrolled = with_registry(&state, move |db| {
        crate::enroll::enroll(&config, db, &node, vmwatch_common::time::now_ms()).map_err(|e| {
            match e {
                crate::enroll::EnrollError::WasRevoked(_) => {
                    ApiError(StatusCode::CONFLICT, e.to_string())
                }
                crate::enroll::EnrollError::NoSecret => {
                    ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
                }
                crate::enroll::EnrollError::Store(e) => ApiError::from(e),
            }
        })
    })
    .await?;
    if enrolled.new {
        tracing::info!(node_id = %enrolled.node_id, "node enrolled through the API");
    }
    Ok(Json(enrolled))
}

#[utoipa::path(delete, path = "/api/v1/nodes/{node_id}", tag = "nodes",
    params(("node_id" = String, Path, description = "the node id to revoke")),
    responses((status = 200, description = "revoked (or already revoked): its key is refused, its rows leave the inventory", body = openapi::RevokedNode),
        (status = 400, description = "bad node id", body = openapi::Error),
        (status = 401, description = "missing or wrong bearer token", body = openapi::Error),
        (status = 403, description = "the master has no api_token", body = openapi::Error),
        (status = 404, description = "not enrolled", body = openapi::Error),
        (status = 503, description = "database unavailable", body = openapi::Error)),
    security(("bearer" = [])))]
async fn revoke_node(
    State(state): State<AppState>,
    Path(node_id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    require_configured_token(&state, "revocation")?;
    let node = node_id_of(&node_id)?;
    let name = node.as_str().to_owned();
    let outcome = with_registry(&state, move |db| {
        crate::enroll::revoke(db, &node, vmwatch_common::time::now_ms()).map_err(ApiError::from)
    })
    .await?;
    let result = match outcome {
        crate::store::Revoked::Now => {
            tracing::warn!(node_id = %name, "node revoked through the API");
            "revoked"
        }
        crate::store::Revoked::Already => "already_revoked",
        crate::store::Revoked::NotEnrolled => {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("node `{name}` is not enrolled"),
            ))
        }
    };
    Ok(Json(json!({ "node_id": name, "result": result })))
}

#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "ok", body = openapi::Health), (status = 503, description = "database unavailable", body = openapi::Health)))]
async fn healthz(State(state): State<AppState>) -> Response {
    let db_ok = state.shared.db_ok.load(Ordering::Relaxed);
    let core_age_ms = state.shared.pulse.age_ms(vmwatch_common::time::now_ms());
    let ok = db_ok && core_age_ms < vmwatch_common::daemon::PULSE_STALE_MS;
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = json!({ "status": if ok { "ok" } else { "degraded" }, "db": if db_ok { "ok" } else { "failing" }, "core_loop_age_ms": core_age_ms });
    if let Some(ha) = &state.ha {
        // SPEC §13: the role, and who leads (null while the lease is expired).
        let leader = ha.leader.load(Ordering::Relaxed);
        body["role"] = json!(if leader { "leader" } else { "standby" });
        body["leader"] = json!(if leader {
            Some(ha.name.clone())
        } else {
            ha.holder()
        });
        body["name"] = json!(ha.name);
        body["epoch"] = json!(ha.epoch.load(Ordering::Relaxed));
    }
    if state.bus {
        // The bus degrades only itself: ingestion goes on and entries wait for it, so a broker
        // outage shows here without turning the master's health to 503.
        let up = state.metrics.bus_up.get() == 1;
        body["bus"] = json!(if up { "up" } else { "down" });
        body["bus_lag"] = json!(state.metrics.bus_lag.get());
    }
    (status, Json(body)).into_response()
}

#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "OpenMetrics text (docs/API.md)",
        content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8", body = String),
        (status = 401, description = "missing or wrong bearer token", body = openapi::Error)),
    security((), ("bearer" = [])))]
async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

#[utoipa::path(get, path = "/", tag = "operations",
    responses((status = 200, description = "the status page", content_type = "text/html", body = String)))]
async fn status_page() -> Html<&'static str> {
    Html(include_str!("status.html"))
}

#[cfg(test)]
mod host_tests {
    use super::host_allowed;

    #[test]
    fn hosts_answered() {
        let names = vec!["panel.example.net".to_owned()];
        for ok in [
            "127.0.0.1:1516",
            "127.0.0.1",
            "[::1]:1516",
            "localhost:1516",
            "LOCALHOST",
            "panel.example.net:1516",
            "10.1.2.3",
        ] {
            assert!(host_allowed(ok, &names), "{ok}");
        }
        for bad in [
            "attacker.example:1516",
            "127.0.0.1.attacker.example",
            "localhost.evil",
            "panel.example.net.evil:1",
        ] {
            assert!(!host_allowed(bad, &names), "{bad}");
        }
    }
}
