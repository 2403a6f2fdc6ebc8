//! The operator's HTTP routes: Prometheus metrics and the dead-letter queue.
//!
//! Routes: `GET /metrics`; `GET /v1/dead-letters` (list, `?after=N&limit=M`),
//! `GET /v1/dead-letters/{number}` (one, with its event as CloudEvents
//! JSON), `POST /v1/dead-letters/replay` and `POST /v1/dead-letters/purge`
//! (body `{"numbers": [..]}` or `{"all": true}`). [`super::http`] mounts
//! them behind its bearer token. Store reads run on the blocking pool.

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::clock::SharedClock;
use crate::metrics::{self, Sources};
use crate::store::{AppendError, DeadLetter, DeadLetterError, Store};
use crate::wire;

/// Dead letters listed per request at most.
pub const MAX_LIST: usize = 1000;

/// Dead letters replayed per transaction by `{"all": true}`.
const REPLAY_CHUNK: usize = 512;

/// What the operator routes read.
#[derive(Clone)]
pub struct Admin {
    /// Metric sources (the store among them).
    pub sources: Sources,
    /// The agent's clock, for ages.
    pub clock: SharedClock,
}

impl Admin {
    fn store(&self) -> &Store {
        &self.sources.store
    }
}

/// The routes, with their state applied.
pub fn router(admin: Admin) -> Router {
    Router::new()
        .route("/metrics", get(get_metrics))
        .route("/v1/dead-letters", get(list_dead_letters))
        .route("/v1/dead-letters/replay", post(replay))
        .route("/v1/dead-letters/purge", post(purge))
        .route("/v1/dead-letters/{number}", get(show_dead_letter))
        .with_state(admin)
}

fn fail(status: StatusCode, message: impl std::fmt::Display) -> Response {
    Failure(status, message.to_string()).into_response()
}

/// A refusal: its status and message (answered as `{"error": …}`).
struct Failure(StatusCode, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, axum::Json(json!({ "error": self.1 }))).into_response()
    }
}

fn internal(e: impl std::fmt::Display) -> Failure {
    Failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, Failure> + Send + 'static) -> Result<T, Failure> {
    tokio::task::spawn_blocking(f).await.map_err(internal)?
}

async fn get_metrics(State(admin): State<Admin>) -> Response {
    let now_ms = admin.clock.now_millis();
    let sources = admin.sources.clone();
    match blocking(move || sources.render(now_ms).map_err(internal)).await {
        Ok(text) => ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response(),
        Err(f) => f.into_response(),
    }
}

/// One dead letter as listed.
#[derive(Debug, Serialize)]
pub struct DeadLetterSummary {
    /// Its number (what `show`, `replay` and `purge` take).
    pub number: u64,
    /// The event's sequence in the log (0: it never entered it).
    pub sequence: u64,
    /// When it was dead-lettered, in ms since the epoch.
    pub at_ms: u64,
    /// Why.
    pub reason: String,
    /// The destination that could not take it, if only one.
    pub destination: Option<String>,
    /// The event id, subject and type (absent when the record is unreadable).
    pub id: Option<String>,
    /// See above.
    pub subject: Option<String>,
    /// See above.
    #[serde(rename = "type")]
    pub ty: Option<String>,
    /// Bytes of its data.
    pub data_bytes: Option<usize>,
}

impl DeadLetterSummary {
    fn new(d: DeadLetter) -> Self {
        let event = d.event().ok();
        Self {
            number: d.number,
            sequence: d.sequence,
            at_ms: d.at_ms,
            id: event.as_ref().map(|e| e.body.id.clone()),
            subject: event.as_ref().map(|e| e.body.subject.clone()),
            ty: event.as_ref().map(|e| e.body.ty.clone()),
            data_bytes: event.as_ref().map(|e| e.body.data.len()),
            reason: d.reason,
            destination: d.destination,
        }
    }
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default)]
    after: u64,
    limit: Option<usize>,
}

async fn list_dead_letters(State(admin): State<Admin>, Query(q): Query<ListQuery>) -> Response {
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_LIST {
        return fail(StatusCode::BAD_REQUEST, format!("`limit` must be between 1 and {MAX_LIST}, not {limit}"));
    }
    let store = admin.store().clone();
    let listed = blocking(move || {
        let letters = store.dead_letters(q.after, limit).map_err(internal)?;
        let total = store.status(0).map_err(internal)?.dead_letters;
        Ok((letters, total))
    })
    .await;
    match listed {
        Ok((letters, total)) => {
            let next_after = (letters.len() == limit).then(|| letters.last().map(|d| d.number)).flatten();
            let items: Vec<DeadLetterSummary> = letters.into_iter().map(DeadLetterSummary::new).collect();
            axum::Json(json!({ "total": total, "dead_letters": items, "next_after": next_after })).into_response()
        }
        Err(f) => f.into_response(),
    }
}

async fn show_dead_letter(State(admin): State<Admin>, Path(number): Path<String>) -> Response {
    let Ok(number) = number.parse::<u64>() else {
        return fail(StatusCode::BAD_REQUEST, format!("dead letter number `{number}` is not a whole number"));
    };
    let store = admin.store().clone();
    let found = blocking(move || store.dead_letter(number).map_err(internal)).await;
    match found {
        Ok(Some(d)) => {
            let event =
                d.event().map(|e| serde_json::from_slice::<Value>(&wire::structured(&e)).unwrap_or(Value::Null));
            let mut body = serde_json::to_value(DeadLetterSummary::new(d.clone())).unwrap_or(Value::Null);
            match event {
                Ok(e) => body["event"] = e,
                Err(e) => body["unreadable"] = json!(e.to_string()),
            }
            axum::Json(body).into_response()
        }
        Ok(None) => fail(StatusCode::NOT_FOUND, DeadLetterError::NotFound(number)),
        Err(f) => f.into_response(),
    }
}

/// Which dead letters a replay or purge applies to.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Selection {
    numbers: Option<Vec<u64>>,
    #[serde(default)]
    all: bool,
}

fn selection(body: &[u8]) -> Result<Option<Vec<u64>>, Failure> {
    let bad = |m: String| Failure(StatusCode::BAD_REQUEST, m);
    let s: Selection = serde_json::from_slice(body)
        .map_err(|e| bad(format!("body must be {{\"numbers\": [..]}} or {{\"all\": true}}: {e}")))?;
    match (s.numbers, s.all) {
        (Some(_), true) => Err(bad("give either `numbers` or `all`, not both".into())),
        (Some(n), false) if n.is_empty() => Err(bad("`numbers` is empty".into())),
        (Some(n), false) => Ok(Some(n)),
        (None, true) => Ok(None),
        (None, false) => Err(bad("give `numbers` (a list) or `all: true`".into())),
    }
}

fn dead_letter_error(e: DeadLetterError) -> Response {
    let status = match &e {
        DeadLetterError::NotFound(_) => StatusCode::NOT_FOUND,
        DeadLetterError::Unreadable { .. } | DeadLetterError::Undeliverable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        DeadLetterError::Store(AppendError::Closed | AppendError::Unavailable { .. }) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    fail(status, e)
}

async fn replay(State(admin): State<Admin>, body: axum::body::Bytes) -> Response {
    let numbers = match selection(&body) {
        Ok(n) => n,
        Err(f) => return f.into_response(),
    };
    let store = admin.store().clone();
    let mut replayed = Vec::new();
    match numbers {
        Some(numbers) => match store.replay_dead_letters(numbers).await {
            Ok(r) => replayed = r,
            Err(e) => return dead_letter_error(e),
        },
        None => loop {
            let s = store.clone();
            let chunk = match blocking(move || s.dead_letters(0, REPLAY_CHUNK).map_err(internal)).await {
                Ok(c) => c,
                Err(f) => return f.into_response(),
            };
            if chunk.is_empty() {
                break;
            }
            match store.replay_dead_letters(chunk.iter().map(|d| d.number).collect()).await {
                Ok(r) => replayed.extend(r),
                Err(e) => return dead_letter_error(e),
            }
        },
    }
    tracing::info!(replayed = replayed.len(), "dead letters replayed");
    axum::Json(json!({ "replayed": replayed.len(), "events": replayed })).into_response()
}

async fn purge(State(admin): State<Admin>, body: axum::body::Bytes) -> Response {
    let numbers = match selection(&body) {
        Ok(n) => n,
        Err(f) => return f.into_response(),
    };
    match admin.store().purge_dead_letters(numbers).await {
        Ok(purged) => {
            tracing::info!(purged, "dead letters purged");
            axum::Json(json!({ "purged": purged })).into_response()
        }
        Err(e) => dead_letter_error(e),
    }
}
