//! The HTTP API: event ingest, status and health.
//!
//! Routes: `POST /v1/events`, `GET /v1/status` (store and destinations),
//! `GET /healthz`, the operator's routes of [`super::admin`]
//! (`/metrics`, `/v1/dead-letters…`), plus routes other services hand in
//! (the state API, [`crate::state::http`]). Every route
//! but `/healthz` requires the bearer token when one is configured. Bodies
//! are decoded by [`super::parse`]; large ones off the async threads.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;
use serde_json::json;
use tokio::net::TcpListener;

use super::{Ingest, IngestError, parse};
use crate::config::HttpConfig;
use crate::forward::DestinationStatus;
use crate::store::{AppendError, Appended, StoreStatus};

/// Bodies above this size are decoded on the blocking pool.
const INLINE_PARSE_LIMIT: usize = 64 * 1024;

#[derive(Clone)]
struct Api {
    ingest: Ingest,
    config: Arc<HttpConfig>,
    device_id: Arc<str>,
    started: Instant,
    destinations: Arc<[Arc<std::sync::Mutex<DestinationStatus>>]>,
}

/// Binds the API listener; the returned address has the real port when the
/// config asked for port 0.
pub async fn bind(config: &HttpConfig) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(config.listen).await?;
    let addr = listener.local_addr()?;
    Ok((listener, addr))
}

/// Serves the API on `listener` until `shutdown` resolves, then finishes
/// the requests in flight (each waits for its commit) and returns.
/// `services` are the routes other parts own (the operator routes of
/// [`super::admin`], the state API); they sit behind the same token.
pub async fn serve(
    listener: TcpListener,
    config: HttpConfig,
    ingest: Ingest,
    device_id: String,
    destinations: Vec<Arc<std::sync::Mutex<DestinationStatus>>>,
    services: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let api = Api {
        ingest,
        config: Arc::new(config),
        device_id: device_id.into(),
        started: Instant::now(),
        destinations: destinations.into(),
    };
    let protected = Router::new()
        .route("/v1/events", post(post_events))
        .route("/v1/status", get(get_status))
        .route_layer(middleware::from_fn_with_state(api.clone(), require_token));
    // Routes other services own (operator routes, the state API), behind the same token.
    let services = services.route_layer(middleware::from_fn_with_state(api.clone(), require_token));
    let app =
        Router::new().route("/healthz", get(|| async { "ok\n" })).merge(protected).with_state(api).merge(services);
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
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

#[derive(Serialize)]
struct Accepted {
    accepted: usize,
    duplicates: usize,
    events: Vec<Appended>,
}

async fn post_events(State(api): State<Api>, headers: HeaderMap, body: Body) -> Response {
    let limit = api.config.max_body_bytes;
    let Ok(bytes) = axum::body::to_bytes(body, limit).await else {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("request body exceeds {limit} bytes (ingest.http.max_body_size)"),
            None,
            None,
        );
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
    let result = match prepared {
        Ok(events) => api.ingest.commit(events).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(events) => {
            let duplicates = events.iter().filter(|e| e.duplicate).count();
            let body = Accepted { accepted: events.len() - duplicates, duplicates, events };
            (StatusCode::OK, axum::Json(body)).into_response()
        }
        Err(e) => ingest_error(&e),
    }
}

fn ingest_error(e: &IngestError) -> Response {
    let msg = e.to_string();
    match e {
        IngestError::BadInput(b) => error(StatusCode::BAD_REQUEST, &msg, b.index, b.field.as_deref()),
        IngestError::EventTooLarge { index, .. } => error(StatusCode::PAYLOAD_TOO_LARGE, &msg, Some(*index), None),
        IngestError::Store(AppendError::TooLarge { .. }) => error(StatusCode::PAYLOAD_TOO_LARGE, &msg, None, None),
        IngestError::Store(AppendError::Full { retry_after, .. } | AppendError::DiskFull { retry_after, .. }) => {
            let mut r = error(StatusCode::INSUFFICIENT_STORAGE, &msg, None, None);
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after.as_secs().max(1)));
            r
        }
        IngestError::Store(AppendError::Closed) => error(StatusCode::SERVICE_UNAVAILABLE, &msg, None, None),
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
        let backlog_events = store.last_sequence.saturating_sub(forwarder.acked_sequence);
        let mean = store.bytes.checked_div(store.events).unwrap_or(0);
        let drain_eta_seconds =
            (backlog_events > 0 && forwarder.send_rate > 0.0).then(|| backlog_events as f64 / forwarder.send_rate);
        Self { forwarder, backlog_events, backlog_bytes: backlog_events.saturating_mul(mean), drain_eta_seconds }
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
    let destinations =
        api.destinations.iter().map(|d| DestinationView::new(d.lock().expect("status lock").clone(), &store)).collect();
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
