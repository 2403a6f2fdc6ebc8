//! The state routes of the HTTP API.
//!
//! - `GET /v1/state?prefix=P` — merged values of keys starting with `P`,
//!   and the sync counters (`sync`).
//! - `GET /v1/state?watch=true&after=N` — a server-sent-events stream of
//!   changes numbered above `N` (or the `Last-Event-ID` header), then live.
//!   Each event's id is its change number, so a client resumes where it
//!   stopped; a `resync` event says changes it asked for were pruned.
//! - `GET /v1/state/{key}` — one merged value with its version.
//! - `PUT /v1/state/{key}` — a local write; the body is the value.
//!
//! A value is shown as JSON (`value`) when it is JSON, else as base64
//! (`value_base64`).

use std::convert::Infallible;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::limits::DestinationLimits;
use crate::state::{Change, Entry, StateError, StateHandle};

/// Changes read from the history per page while a stream catches up.
const PAGE: usize = 256;

#[derive(Clone)]
struct Api {
    destinations: Arc<[Arc<DestinationLimits>]>,
    state: StateHandle,
    max_value_bytes: usize,
}

/// The routes, with their state applied; `max_value_bytes` bounds a PUT
/// body, and a value goes only where every subscribing destination of
/// `destinations` can take it.
pub fn routes(state: StateHandle, max_value_bytes: usize, destinations: Vec<Arc<DestinationLimits>>) -> Router {
    Router::new().route("/v1/state", get(list)).route("/v1/state/{*key}", get(get_one).put(put_one)).with_state(Api {
        state,
        max_value_bytes,
        destinations: destinations.into(),
    })
}

/// An entry as the API shows it.
pub fn entry_json(key: &str, e: &Entry) -> Value {
    let mut out = json!({
        "key": key,
        "content_type": e.content_type,
        "version": {
            "vv": e.version.vv.entries().map(|(o, n)| (o.to_owned(), Value::from(n))).collect::<serde_json::Map<_, _>>(),
            "hlc": e.version.hlc,
            "origin": e.version.origin,
        },
        "change": e.change,
    });
    let json_value = e
        .content_type
        .as_deref()
        .is_none_or(crate::event::is_json_content_type)
        .then(|| serde_json::from_slice::<Value>(&e.data).ok())
        .flatten();
    match json_value {
        Some(v) => out["value"] = v,
        None => out["value_base64"] = Value::String(base64::engine::general_purpose::STANDARD.encode(&e.data)),
    }
    out
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({ "error": message }))).into_response()
}

fn failed(e: StateError) -> Response {
    match e {
        StateError::InvalidKey { .. } => error(StatusCode::BAD_REQUEST, &e.to_string()),
        StateError::Closed => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
        _ => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    prefix: Option<String>,
    watch: Option<bool>,
    after: Option<u64>,
}

async fn list(
    State(api): State<Api>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(q) = match query {
        Ok(q) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("bad query: {e} (known: prefix, watch, after)")),
    };
    if q.watch == Some(true) {
        let last_event_id = headers.get("last-event-id").and_then(|v| v.to_str().ok());
        let after = match (q.after, last_event_id) {
            (Some(a), _) => a,
            (None, Some(id)) => match id.parse() {
                Ok(a) => a,
                Err(_) => {
                    return error(StatusCode::BAD_REQUEST, &format!("Last-Event-ID `{id}` is not a change number"));
                }
            },
            // Without a starting point: from now on.
            (None, None) => api.state.status().last_change,
        };
        return watch(api.state, after).await;
    }
    if q.after.is_some() {
        return error(StatusCode::BAD_REQUEST, "`after` needs `watch=true`");
    }
    match api.state.list(q.prefix.unwrap_or_default()).await {
        Ok(entries) => axum::Json(json!({
            "entries": entries.iter().map(|(k, e)| entry_json(k, e)).collect::<Vec<_>>(),
            "sync": api.state.status(),
        }))
        .into_response(),
        Err(e) => failed(e),
    }
}

async fn get_one(State(api): State<Api>, Path(key): Path<String>) -> Response {
    match api.state.get(key.clone()).await {
        Ok(Some(e)) => axum::Json(entry_json(&key, &e)).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, &format!("no state for key `{key}`")),
        Err(e) => failed(e),
    }
}

async fn put_one(State(api): State<Api>, Path(key): Path<String>, headers: HeaderMap, body: Body) -> Response {
    let limit = api.max_value_bytes;
    let Ok(bytes): Result<Bytes, _> = axum::body::to_bytes(body, limit).await else {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("state value exceeds {limit} bytes (store.max_event_size)"),
        );
    };
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
    if content_type.as_deref().is_some_and(crate::event::is_json_content_type)
        && serde_json::from_slice::<Value>(&bytes).is_err()
    {
        return error(StatusCode::BAD_REQUEST, "body is not valid JSON but Content-Type says it is");
    }
    if let Some(ct) = &content_type
        && let Err(reason) = crate::event::check_text(ct, crate::event::MAX_ATTRIBUTE_BYTES)
    {
        return error(StatusCode::BAD_REQUEST, &format!("Content-Type {reason}"));
    }
    // A value goes to every destination subscribing to its key: each must be able to take it.
    let refusal = api
        .destinations
        .iter()
        .filter(|d| d.subscribes(&key))
        .find_map(|d| d.state_refusal(&key, &bytes, content_type.as_deref()));
    if let Some(reason) = refusal {
        return error(StatusCode::PAYLOAD_TOO_LARGE, &reason);
    }
    match api.state.put(key.clone(), bytes.to_vec(), content_type).await {
        Ok(e) => axum::Json(entry_json(&key, &e)).into_response(),
        Err(e) => failed(e),
    }
}

fn sse_change(change: u64, c: &Change) -> SseEvent {
    SseEvent::default().id(change.to_string()).event("change").data(entry_json(&c.key, &c.entry).to_string())
}

/// Streams changes after `after`: first from the history, then live.
async fn watch(state: StateHandle, after: u64) -> Response {
    // Subscribe before reading history so nothing falls between the two.
    let live = state.subscribe();
    struct S {
        state: StateHandle,
        live: broadcast::Receiver<(u64, Change)>,
        next: u64,
        backlog: std::collections::VecDeque<SseEvent>,
        caught_up: bool,
    }
    let s = S { state, live, next: after, backlog: Default::default(), caught_up: false };
    let stream =
        futures::stream::unfold(s, |mut s| async move {
            loop {
                if let Some(ev) = s.backlog.pop_front() {
                    return Some((Ok::<_, Infallible>(ev), s));
                }
                if !s.caught_up {
                    match s.state.changes_after(s.next, PAGE).await {
                        Ok((page, oldest)) => {
                            if let Some(oldest) = oldest
                                && oldest > s.next + 1
                            {
                                s.backlog.push_back(SseEvent::default().event("resync").data(
                                    json!({"missed_before": oldest, "hint": "re-read GET /v1/state"}).to_string(),
                                ));
                            }
                            if page.len() < PAGE {
                                s.caught_up = true;
                            }
                            for (n, c) in page {
                                s.next = n;
                                s.backlog.push_back(sse_change(n, &c));
                            }
                            continue;
                        }
                        Err(e) => {
                            let ev = SseEvent::default().event("error").data(e.to_string());
                            return Some((Ok(ev), s));
                        }
                    }
                }
                match s.live.recv().await {
                    Ok((n, c)) if n > s.next => {
                        s.next = n;
                        return Some((Ok(sse_change(n, &c)), s));
                    }
                    Ok(_) => {}
                    // Fell behind the live feed: read the history again.
                    Err(broadcast::error::RecvError::Lagged(_)) => s.caught_up = false,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}
