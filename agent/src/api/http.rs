//! The HTTP API: event ingest, status and health.
//!
//! Routes: `POST /v1/events`, `GET /v1/events/{id}` (a delivery receipt:
//! the event's state at each destination; `{id}` is a producer's id within
//! the dedup window, or `seq:N`), `GET /v1/status` (store and destinations),
//! `POST /v1/destinations/{name}/replay` (body `{"from": SEQ}` or
//! `{"since": "RFC 3339 time"}`: send that destination its events again),
//! `GET /healthz`, the operator's routes of [`super::admin`]
//! (`/metrics`, `/v1/dead-letters…`), plus routes other services hand in
//! (the state API, [`super::state`]). Every route
//! but `/healthz` requires the bearer token when one is configured. Bodies
//! are decoded by [`crate::ingest::parse`]; large ones off the async threads.
//!
//! No client can stall the agent through it: connections are capped below
//! the open-file limit, headers and bodies must arrive within their
//! timeouts, the request bytes held in memory across all connections are
//! bounded (`max_buffered`), and shutdown closes whatever is still open
//! after `shutdown_timeout`. `/healthz` fails while the store cannot take
//! events, and says why.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::BodyExt as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::TcpListener;

use crate::config::AckLevel;
use crate::config::HttpConfig;
use crate::forward::{DestinationStatus, ReplayError, ReplayFrom, Replayer};
use crate::ingest::acks::AckWaiter;
use crate::ingest::{Ingest, IngestError, parse};
use crate::store::{AppendError, Appended, EventRef, StoreStatus};

/// Bodies above this size are decoded on the blocking pool.
const INLINE_PARSE_LIMIT: usize = 64 * 1024;

/// Memory a request holds per byte of its body, counted against
/// `max_buffered`: the body, the events decoded from it, their encoding
/// for the store, and the store transaction's pages (measured: a 16 MiB
/// body of 1 KiB events peaked at 4.1 times its size).
pub const BODY_COPIES: usize = 4;

/// Memory an event decoded from a body holds besides its bytes (its
/// structs and their allocations), counted against `max_buffered`.
pub const EVENT_OVERHEAD: usize = 512;

/// Open files kept for everything but HTTP clients: the store, plugins,
/// logs and the runtime, plus [`FDS_PER_PEER`] per broker connection.
const FDS_RESERVED: u64 = 64;

/// Open files one broker connection may take (its socket, and TLS's reads
/// of certificate files when it reconnects).
const FDS_PER_PEER: u64 = 4;

/// How long accepting pauses after an error such as "too many open files".
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// What the API reads of one destination's forwarder.
#[derive(Clone)]
pub struct Destination {
    /// Its name.
    pub name: String,
    /// Its status.
    pub status: Arc<std::sync::Mutex<DestinationStatus>>,
    /// Its acknowledged sequence ([`crate::forward::Forwarder::acked`]), for
    /// answers that wait for acknowledgments.
    pub acked: watch::Receiver<u64>,
    /// Replays it.
    pub replayer: Replayer,
}

#[derive(Clone)]
struct Api {
    ingest: Ingest,
    config: Arc<HttpConfig>,
    device_id: Arc<str>,
    started: Instant,
    destinations: Arc<[Destination]>,
    /// Permits are bytes of requests held in memory (`max_buffered`).
    buffered: Arc<Semaphore>,
    /// Answers that wait for the clouds' acknowledgments.
    acks: AckWaiter,
}

/// Binds the API listener; the returned address has the real port when the
/// config asked for port 0.
pub async fn bind(config: &HttpConfig) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(config.listen).await?;
    let addr = listener.local_addr()?;
    Ok((listener, addr))
}

/// Serves the API on `listener` until `shutdown` resolves, then finishes
/// the requests in flight (each waits for its commit) for up to
/// `shutdown_timeout` and closes what is still open. `services` are the
/// routes other parts own (the operator routes of [`super::admin`], the
/// state API); they sit behind the same token. `peers` is how many broker
/// connections the agent keeps, which the connection cap leaves room for.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    listener: TcpListener,
    config: HttpConfig,
    ingest: Ingest,
    device_id: String,
    destinations: Vec<Destination>,
    services: Router,
    peers: usize,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let max_connections = connection_cap(config.max_connections, peers);
    let (stop_waiting, stopping) = watch::channel(false);
    let watches = destinations.iter().map(|d| (d.name.clone(), d.acked.clone())).collect();
    let api = Api {
        acks: AckWaiter::new(ingest.store().clone(), watches, stopping),
        ingest,
        buffered: Arc::new(Semaphore::new(config.max_buffered_bytes)),
        config: Arc::new(config),
        device_id: device_id.into(),
        started: Instant::now(),
        destinations: destinations.into(),
    };
    let protected = Router::new()
        .route("/v1/events", post(post_events))
        .route("/v1/events/{id}", get(get_receipt))
        .route("/v1/status", get(get_status))
        .route("/v1/destinations/{name}/replay", post(post_replay))
        .route_layer(middleware::from_fn_with_state(api.clone(), require_token));
    // Routes other services own (operator routes, the state API), behind the same token.
    let services = services.route_layer(middleware::from_fn_with_state(api.clone(), require_token));
    let app = Router::new().route("/healthz", get(healthz)).merge(protected).with_state(api.clone()).merge(services);

    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(api.config.header_timeout);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(max_connections));
    let mut connections = JoinSet::new();
    let mut last_accept_error: Option<Instant> = None;
    tokio::pin!(shutdown);
    loop {
        // Reap finished connections so the set stays small.
        while connections.try_join_next().is_some() {}
        // At the cap, stop accepting: further clients wait in the kernel's queue.
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("never closed"),
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // EMFILE and the like: back off, never spin, log at most once a minute.
                    if last_accept_error.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                        tracing::warn!(error = %e, "HTTP API cannot accept a connection");
                        last_accept_error = Some(Instant::now());
                    }
                    tokio::time::sleep(ACCEPT_PAUSE).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let connection = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let connection = graceful.watch(connection);
        connections.spawn(async move {
            let _slot = slot;
            let _ = connection.await;
        });
    }
    drop(listener);
    let _ = stop_waiting.send(true);
    let deadline = api.config.shutdown_timeout;
    if tokio::time::timeout(deadline, graceful.shutdown()).await.is_err() {
        tracing::warn!(
            open = connections.len(),
            ?deadline,
            "HTTP connections still open at the shutdown deadline: closed"
        );
    }
    connections.shutdown().await;
    Ok(())
}

/// The connection cap: `configured`, lowered to fit below the process's
/// open-file limit (raised to its hard limit first) with room kept for
/// `peers` broker connections and the rest of the agent.
fn connection_cap(configured: usize, peers: usize) -> usize {
    let reserved = FDS_RESERVED + FDS_PER_PEER * peers as u64;
    let Some(limit) = raise_fd_limit() else { return configured };
    let room = usize::try_from(limit.saturating_sub(reserved)).unwrap_or(usize::MAX).max(1);
    if room < configured {
        tracing::warn!(
            configured,
            cap = room,
            open_file_limit = limit,
            "ingest.http.max_connections lowered to fit the open-file limit"
        );
    }
    configured.min(room)
}

/// Raises the soft open-file limit to the hard one; returns the soft limit.
fn raise_fd_limit() -> Option<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    #[allow(clippy::useless_conversion)] // the field is 32-bit on some targets
    Some(u64::from(lim.rlim_cur))
}

/// Readiness: 200 while the store takes events, else 503 saying why.
async fn healthz(State(api): State<Api>) -> Response {
    let health = api.ingest.store().health();
    if health.is_ok() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("unavailable: {}\n", health.describe())).into_response()
    }
}

async fn require_token(State(api): State<Api>, request: Request, next: Next) -> Response {
    let Some(token) = &api.config.token else {
        return next.run(request).await;
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if constant_time_eq(g.as_bytes(), token.expose().as_bytes()) => next.run(request).await,
        _ => {
            let mut r =
                error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token (Authorization: Bearer …)", None, None);
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            r
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

/// The answer to a `POST /v1/events` that was committed.
#[derive(Serialize)]
struct Accepted {
    accepted: usize,
    duplicates: usize,
    events: Vec<Appended>,
    /// Per input event an ingest-stage plugin dropped, replaced or failed
    /// on, what happened ("dropped by plugin P" versus "plugin P failed:
    /// dead-lettered"); absent when plugins kept every event.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    filtered: Vec<crate::ingest::Filtered>,
}

/// `POST /v1/events`'s query.
#[derive(Deserialize)]
struct EventsQuery {
    /// The acknowledgment level ([`AckLevel`]).
    ack: Option<String>,
}

/// The level a request asks for: `?ack=`, else the `Ferry-Ack` header,
/// else the configured one; an unknown one is refused naming the field.
fn ack_level(api: &Api, query: &EventsQuery, headers: &HeaderMap) -> Result<AckLevel, (&'static str, String)> {
    let asked = match (&query.ack, headers.get("ferry-ack")) {
        (Some(q), _) => Some(("ack", q.as_str())),
        (None, Some(h)) => Some(("Ferry-Ack", h.to_str().unwrap_or("(not text)"))),
        (None, None) => None,
    };
    match asked {
        None => Ok(api.config.ack),
        Some((field, text)) => AckLevel::parse(text).map_err(|reason| (field, reason)),
    }
}

async fn post_events(
    State(api): State<Api>,
    Query(query): Query<EventsQuery>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let level = match ack_level(&api, &query, &headers) {
        Ok(l) => l,
        Err((field, reason)) => return error(StatusCode::BAD_REQUEST, &reason, None, Some(field)),
    };
    let (bytes, held) = match read_body(&api, &headers, body).await {
        Ok(read) => read,
        Err(response) => return response,
    };
    let ingest = api.ingest.clone();
    let inline = bytes.len() <= INLINE_PARSE_LIMIT;
    let decode = move || {
        let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
        let lookup = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let ce = headers
            .iter()
            .filter(|(k, _)| k.as_str().starts_with("ce-"))
            .filter_map(|(k, v)| Some((k.as_str(), v.to_str().ok()?)));
        let inputs = parse::parse_body(content_type, lookup, ce, &bytes)?;
        drop(bytes);
        ingest.prepare(inputs)
    };
    let prepared = if inline {
        decode()
    } else {
        match tokio::task::spawn_blocking(decode).await {
            Ok(r) => r,
            Err(e) => {
                return error(StatusCode::INTERNAL_SERVER_ERROR, &format!("decoding failed: {e}"), None, None);
            }
        }
    };
    let events = match prepared {
        Ok(events) => events,
        Err(e) => return ingest_error(&e),
    };
    // Many small events cost more than their bytes: their structs count too.
    let _held = match hold(&api, held, events.len().saturating_mul(EVENT_OVERHEAD)).await {
        Ok(h) => h,
        Err(response) => return response,
    };
    match api.ingest.commit(events).await {
        Ok(crate::ingest::Committed { events, filtered }) => {
            let duplicates = events.iter().filter(|e| e.duplicate).count();
            if level == AckLevel::Stored {
                let body = Accepted { accepted: events.len() - duplicates, duplicates, events, filtered };
                return (StatusCode::OK, axum::Json(body)).into_response();
            }
            let sequences: Vec<u64> = events.iter().map(|e| e.sequence).collect();
            let (acked_by, met) = api.acks.wait(level, &sequences, api.config.ack_timeout).await;
            let body = Accepted { accepted: events.len() - duplicates, duplicates, events, filtered };
            let mut body = serde_json::to_value(body).expect("an answer serialises");
            body["ack"] = json!(level);
            for (event, by) in body["events"].as_array_mut().into_iter().flatten().zip(acked_by) {
                event["acked_by"] = json!(by);
            }
            // 202: stored, delivery pending. Not an error: a retry with the
            // same ids is a duplicate, and `GET /v1/events/{id}` tells more.
            let status = if met { StatusCode::OK } else { StatusCode::ACCEPTED };
            (status, axum::Json(body)).into_response()
        }
        Err(e) => ingest_error(&e),
    }
}

/// Reads a request body within `max_body_size` and `body_timeout`, holding
/// [`BODY_COPIES`] times its bytes against `max_buffered` as they arrive. Answers with the right
/// refusal: 413 over the size, 408 too slow, 400 cut short, 503 when the
/// agent holds as many request bytes as it may.
async fn read_body(
    api: &Api,
    headers: &HeaderMap,
    body: Body,
) -> Result<(bytes::Bytes, tokio::sync::OwnedSemaphorePermit), Response> {
    let limit = api.config.max_body_bytes;
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("request body exceeds {limit} bytes (ingest.http.max_body_size)"),
            None,
            None,
        )
    };
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let deadline = tokio::time::Instant::now() + api.config.body_timeout;
    // All of it before a byte is read: a request that held part and waited
    // for more could wait on others doing the same. Without a length, the
    // largest a body may be.
    let held = hold_until(api, declared.unwrap_or(limit).saturating_mul(BODY_COPIES), deadline).await?;
    let mut body = body;
    let mut out = bytes::BytesMut::with_capacity(declared.unwrap_or(0).min(limit));
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => {
                let secs = api.config.body_timeout.as_secs_f64();
                return Err(error(
                    StatusCode::REQUEST_TIMEOUT,
                    &format!("request body not received within {secs} s (ingest.http.body_timeout)"),
                    None,
                    None,
                ));
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    &format!("request body could not be read: {e}"),
                    None,
                    None,
                ));
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else { continue };
        if out.len() + data.len() > declared.unwrap_or(limit) {
            return Err(too_large());
        }
        out.extend_from_slice(&data);
    }
    Ok((out.freeze(), held))
}

/// `bytes` more of request memory for `held`. Never waits while holding:
/// when there is no room now, it lets go and waits for the whole amount,
/// until `body_timeout` from now.
async fn hold(
    api: &Api,
    mut held: tokio::sync::OwnedSemaphorePermit,
    bytes: usize,
) -> Result<tokio::sync::OwnedSemaphorePermit, Response> {
    let more = u32::try_from(bytes).unwrap_or(u32::MAX);
    if more == 0 {
        return Ok(held);
    }
    if let Ok(p) = api.buffered.clone().try_acquire_many_owned(more) {
        held.merge(p);
        return Ok(held);
    }
    let total = held.num_permits().saturating_add(bytes);
    drop(held);
    hold_until(api, total, tokio::time::Instant::now() + api.config.body_timeout).await
}

/// Takes `bytes` of the `max_buffered` budget, waiting until `deadline`.
async fn hold_until(
    api: &Api,
    bytes: usize,
    deadline: tokio::time::Instant,
) -> Result<tokio::sync::OwnedSemaphorePermit, Response> {
    let budget = api.config.max_buffered_bytes;
    if bytes > budget {
        return Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!(
                "request needs {bytes} bytes of memory, more than ingest.http.max_buffered ({budget} bytes); split it"
            ),
            None,
            None,
        ));
    }
    let permits = u32::try_from(bytes).unwrap_or(u32::MAX);
    match tokio::time::timeout_at(deadline, api.buffered.clone().acquire_many_owned(permits)).await {
        Ok(Ok(p)) => Ok(p),
        _ => {
            let mut r = error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the agent is holding as many request bytes as it may (ingest.http.max_buffered); try again",
                None,
                None,
            );
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(1));
            Err(r)
        }
    }
}

fn ingest_error(e: &IngestError) -> Response {
    let msg = e.to_string();
    match e {
        IngestError::BadInput(b) => error(StatusCode::BAD_REQUEST, &msg, b.index, b.field.as_deref()),
        IngestError::EventTooLarge { index, .. } | IngestError::Undeliverable { index, .. } => {
            error(StatusCode::PAYLOAD_TOO_LARGE, &msg, Some(*index), None)
        }
        IngestError::Store(AppendError::TooLarge { .. }) => error(StatusCode::PAYLOAD_TOO_LARGE, &msg, None, None),
        IngestError::Store(AppendError::Full { retry_after, .. } | AppendError::DiskFull { retry_after, .. }) => {
            let mut r = error(StatusCode::INSUFFICIENT_STORAGE, &msg, None, None);
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after.as_secs().max(1)));
            r
        }
        IngestError::Store(AppendError::Closed) => error(StatusCode::SERVICE_UNAVAILABLE, &msg, None, None),
        IngestError::Store(AppendError::Unavailable { retry_after, .. }) => {
            let mut r = error(StatusCode::SERVICE_UNAVAILABLE, &msg, None, None);
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after.as_secs().max(1)));
            r
        }
        IngestError::Store(_) => error(StatusCode::INTERNAL_SERVER_ERROR, &msg, None, None),
    }
}

fn error(status: StatusCode, message: &str, index: Option<usize>, field: Option<&str>) -> Response {
    let mut body = json!({ "error": message });
    if let Some(i) = index {
        body["index"] = json!(i);
    }
    if let Some(f) = field {
        body["field"] = json!(f);
    }
    (status, axum::Json(body)).into_response()
}

/// The body of `GET /v1/status`.
#[derive(Debug, Serialize)]
pub struct Status {
    /// This device.
    pub device_id: String,
    /// Ferry's version.
    pub version: &'static str,
    /// Seconds since the API started.
    pub uptime_seconds: u64,
    /// The store.
    pub store: StoreStatus,
    /// Every plugin, whatever its stage: calls, failures, circuit state.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub plugins: Vec<crate::plugin::PluginStatus>,
    /// Each destination, with its backlog.
    pub destinations: Vec<DestinationView>,
}

/// A destination as status shows it: the forwarder's own view plus the
/// backlog derived from the store.
#[derive(Debug, Serialize)]
pub struct DestinationView {
    /// The forwarder's status.
    #[serde(flatten)]
    pub forwarder: DestinationStatus,
    /// Events after its cursor. An upper bound: it counts events this
    /// destination does not route, which it skips without sending.
    pub backlog_events: u64,
    /// Estimated bytes of that backlog (events × mean stored event size).
    pub backlog_bytes: u64,
    /// Seconds to drain the backlog at the current send rate, if it is moving.
    pub drain_eta_seconds: Option<f64>,
}

impl DestinationView {
    fn new(forwarder: DestinationStatus, store: &StoreStatus) -> Self {
        let backlog_events = forwarder.backlog_events(store.last_sequence);
        let mean = store.bytes.checked_div(store.events).unwrap_or(0);
        let drain_eta_seconds =
            (backlog_events > 0 && forwarder.send_rate > 0.0).then(|| backlog_events as f64 / forwarder.send_rate);
        Self { forwarder, backlog_events, backlog_bytes: backlog_events.saturating_mul(mean), drain_eta_seconds }
    }
}

async fn get_receipt(State(api): State<Api>, Path(id): Path<String>) -> Response {
    let key = match EventRef::parse(&id) {
        Ok(k) => k,
        Err(reason) => return error(StatusCode::BAD_REQUEST, &reason, None, None),
    };
    let ingest = api.ingest.clone();
    let lookup = key.clone();
    let acked: Vec<(String, u64)> = api.destinations.iter().map(|d| (d.name.clone(), *d.acked.borrow())).collect();
    match tokio::task::spawn_blocking(move || ingest.store().receipt(&lookup, &acked)).await {
        Ok(Ok(Some(receipt))) => axum::Json(receipt).into_response(),
        Ok(Ok(None)) => {
            let what = match key {
                EventRef::Sequence(n) => format!("no event has sequence {n}"),
                EventRef::Id(id) => format!("no event `{id}` within the dedup window (ask by `seq:N`)"),
            };
            error(StatusCode::NOT_FOUND, &what, None, None)
        }
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string(), None, None),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string(), None, None),
    }
}

/// The body of `POST /v1/destinations/{name}/replay`: exactly one of the two.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayRequest {
    from: Option<u64>,
    since: Option<String>,
}

async fn post_replay(State(api): State<Api>, Path(name): Path<String>, body: axum::body::Bytes) -> Response {
    let Some(destination) = api.destinations.iter().find(|d| d.name == name) else {
        let known: Vec<&str> = api.destinations.iter().map(|d| d.name.as_str()).collect();
        return error(
            StatusCode::NOT_FOUND,
            &format!("no destination `{name}` (there are: {})", known.join(", ")),
            None,
            None,
        );
    };
    let request: ReplayRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("the body is not a replay request: {e}"), None, None),
    };
    let from = match (request.from, request.since) {
        (Some(seq), None) => ReplayFrom::Sequence(seq),
        (None, Some(since)) => match crate::clock::parse_utc(&since) {
            Some(ms) => ReplayFrom::Since(ms),
            None => {
                let reason = format!("`since`: `{since}` is not an RFC 3339 time like \"2026-12-05T08:00:00Z\"");
                return error(StatusCode::BAD_REQUEST, &reason, None, Some("since"));
            }
        },
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "give exactly one of `from` (a sequence) or `since` (a time)",
                None,
                None,
            );
        }
    };
    match destination.replayer.replay(from).await {
        Ok(started) => axum::Json(started).into_response(),
        Err(e @ ReplayError::Nothing(_)) => error(StatusCode::CONFLICT, &e.to_string(), None, None),
        Err(e @ ReplayError::Store(_)) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string(), None, None),
    }
}

async fn get_status(State(api): State<Api>) -> Response {
    let ingest = api.ingest.clone();
    let now_ms = ingest.now_millis();
    let store = match tokio::task::spawn_blocking(move || ingest.store().status(now_ms)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string(), None, None);
        }
        Err(e) => {
            return error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string(), None, None);
        }
    };
    let destinations = api
        .destinations
        .iter()
        .map(|d| DestinationView::new(d.status.lock().expect("status lock").clone(), &store))
        .collect();
    let status = Status {
        device_id: api.device_id.to_string(),
        version: env!("CARGO_PKG_VERSION"),
        uptime_seconds: api.started.elapsed().as_secs(),
        store,
        destinations,
        plugins: api.ingest.plugin_status(),
    };
    axum::Json(status).into_response()
}
