//! Ingest: turns what local producers send into stored events.
//!
//! [`Ingest`] fills in what the producer left out (id, type, time, content
//! type, source), classifies each event for priority and TTL, enforces the
//! event size limit and appends the request to the store as one unit. The
//! HTTP API ([`http`]) and later ingest paths share it, so every path answers
//! success only after the commit. [`mqtt`] subscribes to a broker on the
//! device and acknowledges each message only after its commit.
//!
//! Filter plugins with `stage = "ingest"` run in [`Ingest::commit`], in
//! config order, before the append: dropped events are never stored,
//! replacements are stored instead of their input (inheriting its priority
//! and expiry), and a `route` verdict is stored as the `ferryroute`
//! extension for the forwarder (see [`crate::plugin::convert`]). When a
//! filter fails, its `on_error` policy decides: `dead-letter` records the
//! batch in the dead-letter table (sequence 0: never in the log) before the
//! producer gets its answer, `pass` keeps the events as they were, `drop`
//! discards them. The producer's answer lists only the events stored.

pub mod admin;
pub mod http;
pub mod mqtt;
pub mod parse;

use std::sync::Arc;
use std::time::Duration;

use crate::clock::{self, SharedClock};
use crate::event::{DEFAULT_TYPE, EventBody, EventBodyRef, JSON_CONTENT_TYPE, is_json_content_type};
use crate::limits::DestinationLimits;
use crate::plugin::{OnError, PluginHandle, PluginStatus, convert};
use crate::store::{AppendError, Appended, Dedup, PreparedEvent, Store};
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
    /// A destination that routes the event could not take it.
    #[error("event {index}: {reason}")]
    Undeliverable {
        /// Index of the event in the request.
        index: usize,
        /// Which destination, and which of its limits.
        reason: String,
    },
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] AppendError),
}

impl IngestError {
    /// The index of the one event that alone made the request fail (too
    /// large, or refused by a destination), when that is why it failed.
    pub fn refused_event(&self) -> Option<usize> {
        match self {
            IngestError::EventTooLarge { index, .. } | IngestError::Undeliverable { index, .. } => Some(*index),
            _ => None,
        }
    }
}

/// The shared ingest path. Cheap to clone.
#[derive(Clone)]
pub struct Ingest {
    store: Store,
    source: String,
    clock: SharedClock,
    filters: Arc<[PluginHandle]>,
    /// Every loaded plugin, whatever its stage, for status.
    reported: Arc<[PluginHandle]>,
    /// What each destination accepts: an event a routing destination
    /// would refuse is refused here, before it is stored.
    destinations: Arc<[Arc<DestinationLimits>]>,
}

impl Ingest {
    /// Ingest into `store`, stamping events with `source`.
    pub fn new(store: Store, source: String, clock: SharedClock) -> Self {
        Self { store, source, clock, filters: Arc::new([]), reported: Arc::new([]), destinations: Arc::new([]) }
    }

    /// The same path, refusing what any of `destinations` that routes an
    /// event would refuse.
    pub fn with_destinations(mut self, destinations: Vec<Arc<DestinationLimits>>) -> Self {
        self.destinations = destinations.into();
        self
    }

    /// The same path with these `stage = "ingest"` filters, run in order.
    /// Unless [`Ingest::reporting`] says otherwise, they are the plugins
    /// status reports.
    pub fn with_filters(mut self, filters: Vec<PluginHandle>) -> Self {
        self.filters = filters.into();
        if self.reported.is_empty() {
            self.reported = self.filters.clone();
        }
        self
    }

    /// Reports `plugins` (every loaded plugin, whatever its stage) in status.
    pub fn reporting(mut self, plugins: Vec<PluginHandle>) -> Self {
        self.reported = plugins.into();
        self
    }

    /// Counters of the reported plugins.
    pub fn plugin_status(&self) -> Vec<PluginStatus> {
        self.reported.iter().map(PluginHandle::status).collect()
    }

    /// The store behind this ingest path.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The clock this path stamps events with.
    pub fn clock(&self) -> &SharedClock {
        &self.clock
    }

    /// Milliseconds since the epoch by this path's clock.
    pub fn now_millis(&self) -> u64 {
        self.clock.now_millis()
    }

    /// Prepares and appends the events of one request, all or nothing.
    pub async fn submit(&self, inputs: Vec<InputEvent>) -> Result<Vec<Appended>, IngestError> {
        let prepared = self.prepare(inputs)?;
        self.commit(prepared).await
    }

    /// Runs the ingest-stage filters on prepared events, then appends what
    /// they leave, all or nothing.
    pub async fn commit(&self, prepared: Vec<PreparedEvent>) -> Result<Vec<Appended>, IngestError> {
        let mut events = prepared;
        for filter in self.filters.iter() {
            if events.is_empty() {
                break;
            }
            events = self.run_filter(filter, events).await?;
        }
        if events.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self.store.append(events).await?)
    }

    /// One filter over the batch; on failure, its error policy.
    async fn run_filter(
        &self,
        filter: &PluginHandle,
        events: Vec<PreparedEvent>,
    ) -> Result<Vec<PreparedEvent>, IngestError> {
        let bodies: Vec<EventBody> = match events.iter().map(|e| postcard::from_bytes(&e.body)).collect() {
            Ok(bodies) => bodies,
            Err(e) => return Err(AppendError::Storage(format!("re-reading a prepared event: {e}")).into()),
        };
        let wit = bodies.iter().map(|b| convert::to_wit(b, 0, 0)).collect();
        let reason = match filter.filter(wit).await {
            Ok(verdicts) => match self.apply_verdicts(&events, bodies, verdicts) {
                Ok(out) => return Ok(out),
                Err(invalid) => format!("plugin returned invalid output: {invalid}"),
            },
            Err(e) => e.to_string(),
        };
        let reason = format!("plugin {}: {reason}", filter.name());
        match filter.on_error() {
            OnError::Pass => {
                tracing::warn!(plugin = filter.name(), events = events.len(), %reason, "plugin failed: events pass unfiltered");
                Ok(events)
            }
            OnError::Drop => {
                tracing::warn!(plugin = filter.name(), events = events.len(), %reason, "plugin failed: events dropped");
                Ok(Vec::new())
            }
            OnError::DeadLetter => {
                tracing::warn!(plugin = filter.name(), events = events.len(), %reason, "plugin failed: events dead-lettered");
                self.store.dead_letter_new(events, reason).await?;
                Ok(Vec::new())
            }
        }
    }

    /// The events that stand in for `events` after their verdicts, or why
    /// the verdicts are invalid (which fails the whole call).
    fn apply_verdicts(
        &self,
        events: &[PreparedEvent],
        bodies: Vec<EventBody>,
        verdicts: Vec<crate::plugin::Verdict>,
    ) -> Result<Vec<PreparedEvent>, String> {
        use crate::plugin::Verdict;
        let limit = self.store.config().max_event_bytes;
        let mut out = Vec::with_capacity(events.len());
        for ((event, body), verdict) in events.iter().zip(bodies).zip(verdicts) {
            match verdict {
                Verdict::Keep => out.push(event.clone()),
                Verdict::Drop => {}
                other => {
                    let keep_id = matches!(other, Verdict::Route(_));
                    for body in convert::apply(body, other)? {
                        // A route keeps the event's identity; a replacement is
                        // a new event whose id dedup must know.
                        let dedup = if keep_id { event.dedup } else { Dedup::Producer };
                        let e = PreparedEvent::new(&body, dedup, event.priority, event.expires_at_ms);
                        if e.record_len() as usize > limit {
                            return Err(format!(
                                "event `{}` is {} bytes encoded, over the {limit}-byte limit",
                                body.id,
                                e.record_len()
                            ));
                        }
                        out.push(e);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Why a destination that routes `body` would refuse it, if one would.
    /// `json_data`: the producer's data was checked to be JSON.
    pub fn refusal(&self, body: &EventBodyRef<'_>, json_data: bool) -> Option<String> {
        let mut routed = self.destinations.iter().filter(|d| d.routes(body.subject)).peekable();
        routed.peek()?;
        // Structured mode embeds data as JSON only when it parses; bytes under
        // a JSON content type that were not checked are checked here, rarely.
        let json = json_data
            || (body.datacontenttype.is_some_and(is_json_content_type)
                && serde_json::from_slice::<serde::de::IgnoredAny>(body.data).is_ok());
        routed.find_map(|d| d.refusal(body, json))
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
            let dedup = input.dedup.unwrap_or(if input.id.is_some() { Dedup::Producer } else { Dedup::None });
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
            if let Some(reason) = self.refusal(&body, input.data_is_json) {
                return Err(IngestError::Undeliverable { index, reason });
            }
            let body = body.encode();
            let event = PreparedEvent { id, dedup, priority, expires_at_ms: ttl.map(|t| expiry(now_ms, t)), body };
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
