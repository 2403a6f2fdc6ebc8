//! Ingest: turns what local producers send into stored events.
//!
//! [`Ingest`] fills in what the producer left out (id, type, time, content
//! type, source), classifies each event for priority and TTL, enforces the
//! event size limit and appends the request to the store as one unit. The
//! HTTP API ([`http`]) and later ingest paths share it, so every path answers
//! success only after the commit. [`mqtt`] subscribes to a broker on the
//! device and acknowledges each message only after its commit.

pub mod http;
pub mod mqtt;
pub mod parse;

use std::time::Duration;

use crate::clock::{self, SharedClock};
use crate::event::{DEFAULT_TYPE, EventBodyRef, JSON_CONTENT_TYPE};
use crate::store::{AppendError, Appended, PreparedEvent, Store};
pub use parse::{BadInput, InputEvent};

/// Why an ingest request was refused. Nothing of a refused request is stored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IngestError {
    /// Malformed input.
    #[error("{0}")]
    BadInput(#[from] BadInput),
    /// One event is larger than `store.max_event_size`.
    #[error("event {index}: {size} bytes encoded, over the {limit}-byte limit (store.max_event_size)")]
    EventTooLarge {
        /// Index of the event in the request.
        index: usize,
        /// Its encoded size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] AppendError),
}

/// The shared ingest path. Cheap to clone.
#[derive(Clone)]
pub struct Ingest {
    store: Store,
    source: String,
    clock: SharedClock,
}

impl Ingest {
    /// Ingest into `store`, stamping events with `source`.
    pub fn new(store: Store, source: String, clock: SharedClock) -> Self {
        Self { store, source, clock }
    }

    /// The store behind this ingest path.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Milliseconds since the epoch by this path's clock.
    pub fn now_millis(&self) -> u64 {
        self.clock.now_millis()
    }

    /// Prepares and appends the events of one request, all or nothing.
    pub async fn submit(&self, inputs: Vec<InputEvent>) -> Result<Vec<Appended>, IngestError> {
        let prepared = self.prepare(inputs)?;
        Ok(self.store.append(prepared).await?)
    }

    /// Fills defaults, classifies and encodes; refuses oversized events.
    pub fn prepare(&self, inputs: Vec<InputEvent>) -> Result<Vec<PreparedEvent>, IngestError> {
        let now_nanos = self.clock.now_nanos();
        let now_ms = self.clock.now_millis();
        let config = self.store.config();
        let mut out = Vec::with_capacity(inputs.len());
        for (index, input) in inputs.into_iter().enumerate() {
            let (priority, class_ttl) = config.classify(&input.topic);
            let ttl = input.ttl.or(class_ttl);
            let producer_id = input.id.is_some();
            let id = input.id.unwrap_or_else(|| clock::new_event_id(self.clock.as_ref()));
            let body = EventBodyRef {
                id: &id,
                source: &self.source,
                ty: input.ty.as_deref().unwrap_or(DEFAULT_TYPE),
                subject: &input.topic,
                time_nanos: input.time_nanos.unwrap_or(now_nanos),
                datacontenttype: input
                    .datacontenttype
                    .as_deref()
                    .or_else(|| input.data_is_json.then_some(JSON_CONTENT_TYPE)),
                data: &input.data,
                partitionkey: input.partitionkey.as_deref(),
                extensions: &input.extensions,
            };
            let body = body.encode();
            let event =
                PreparedEvent { id, producer_id, priority, expires_at_ms: ttl.map(|t| expiry(now_ms, t)), body };
            let size = event.record_len() as usize;
            if size > config.max_event_bytes {
                return Err(IngestError::EventTooLarge { index, size, limit: config.max_event_bytes });
            }
            out.push(event);
        }
        Ok(out)
    }
}

fn expiry(now_ms: u64, ttl: Duration) -> u64 {
    now_ms.saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)).max(1)
}
