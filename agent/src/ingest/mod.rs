//! Ingest: turns what local producers send into stored events.
//!
//! [`Ingest`] fills in what the producer left out (id, type, time, content
//! type, source), classifies each event for priority and TTL, enforces the
//! event size limit and appends the request to the store as one unit. The
//! HTTP API ([`crate::api::http`]) and later ingest paths share it, so every path answers
//! success only after the commit. [`mqtt`] subscribes to a broker on the
//! device and acknowledges each message only after its commit.
//!
//! Filter plugins with `stage = "ingest"` run in [`Ingest::commit`], in
//! config order, before the append: dropped events are never stored,
//! replacements are stored instead of their input (inheriting its priority
//! and expiry), and a `route` verdict is stored as the `ferryroute`
//! extension for the forwarder (see [`crate::plugin::convert`]). What this
//! stage takes ([`IngestRules`]: `store.max_event_size`, and what every
//! destination that routes a replacement accepts) is checked by the plugin
//! host inside the call, so a replacement it refuses fails the call and
//! counts against the plugin like a trap. When a filter fails, its
//! `on_error` policy decides: `dead-letter` records the batch in the
//! dead-letter table (sequence 0: never in the log) before the producer gets
//! its answer, `pass` keeps the events as they were, `drop` discards them.
//! The producer's answer lists the events stored and, per input event, what
//! a plugin did to it ([`Filtered`]). [`acks`] holds an answer back until
//! enough clouds have acknowledged its events, for either path.

pub mod acks;
pub mod mqtt;
pub mod parse;

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::clock::{self, SharedClock};
use crate::event::{self, DEFAULT_TYPE, EventBody, EventBodyRef, JSON_CONTENT_TYPE, is_json_content_type};
use crate::limits::DestinationLimits;
use crate::plugin::chain::{self, Site};
use crate::plugin::{Decision, OnError, OutputRules, PluginHandle, PluginStatus, WitEvent, convert};
use crate::store::{AppendError, Appended, Dedup, PreparedEvent, Store};
pub use parse::{BadInput, InputEvent};

/// What an ingest-stage plugin did to one event of a request, for the
/// producer's answer: the event was dropped by the plugin, replaced, or
/// the plugin failed and its `on_error` policy applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Filtered {
    /// The event's index in the request.
    pub index: usize,
    /// The event's id (as it entered the plugin).
    pub id: String,
    /// The plugin.
    pub plugin: String,
    /// What happened.
    pub outcome: FilterOutcome,
    /// The same in words: "dropped by plugin P", "plugin P failed: dead-lettered", …
    pub message: String,
    /// Why the plugin failed, in one line (failures only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What happened to an event in an ingest-stage plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FilterOutcome {
    /// The plugin decided to drop it (`drop`, or an empty replacement or route).
    Dropped,
    /// The plugin replaced it; the replacements are stored with their own ids.
    Replaced,
    /// The plugin failed; the event is in the dead-letter table (`on_error = "dead-letter"`).
    FailedDeadLettered,
    /// The plugin failed; the event went on unfiltered (`on_error = "pass"`).
    FailedPassed,
    /// The plugin failed; the event was discarded (`on_error = "drop"`).
    FailedDropped,
}

impl FilterOutcome {
    fn message(self, plugin: &str) -> String {
        match self {
            FilterOutcome::Dropped => format!("dropped by plugin {plugin}"),
            FilterOutcome::Replaced => format!("replaced by plugin {plugin}"),
            FilterOutcome::FailedDeadLettered => format!("plugin {plugin} failed: dead-lettered"),
            FilterOutcome::FailedPassed => format!("plugin {plugin} failed: passed through unfiltered"),
            FilterOutcome::FailedDropped => format!("plugin {plugin} failed: dropped"),
        }
    }
}

/// What a committed request left: the events stored, and what plugins did
/// to the others.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Committed {
    /// The events appended (replacements included), in order.
    pub events: Vec<Appended>,
    /// Per input event a plugin did not simply keep, what it did.
    pub filtered: Vec<Filtered>,
}

/// What the ingest stage takes of a filter's replacements: an event within
/// `store.max_event_size`, which every destination that routes it accepts.
/// The plugin host applies it inside the call ([`OutputRules`]).
pub struct IngestRules {
    max_event_bytes: usize,
    destinations: Arc<[Arc<DestinationLimits>]>,
}

impl OutputRules for IngestRules {
    fn refuse(&self, body: &EventBody) -> Option<String> {
        let size = event::HEADER_LEN + postcard::experimental::serialized_size(body).unwrap_or(usize::MAX);
        if size > self.max_event_bytes {
            return Some(format!("{size} bytes encoded, over store.max_event_size ({} bytes)", self.max_event_bytes));
        }
        refusal(&self.destinations, &body.view(), false)
    }
}

/// Why a destination among `destinations` that routes `body` would refuse
/// it, if one would. `json_data`: the data was checked to be JSON.
fn refusal(destinations: &[Arc<DestinationLimits>], body: &EventBodyRef<'_>, json_data: bool) -> Option<String> {
    let mut routed = destinations.iter().filter(|d| d.routes(body.subject)).peekable();
    routed.peek()?;
    // Structured mode embeds data as JSON only when it parses; bytes under
    // a JSON content type that were not checked are checked here, rarely.
    let json = json_data
        || (body.datacontenttype.is_some_and(is_json_content_type)
            && serde_json::from_slice::<serde::de::IgnoredAny>(body.data).is_ok());
    routed.find_map(|d| d.refusal(body, json))
}

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
    /// What the filters' replacements must meet (built from the above).
    rules: Arc<IngestRules>,
}

impl Ingest {
    /// Ingest into `store`, stamping events with `source`.
    pub fn new(store: Store, source: String, clock: SharedClock) -> Self {
        let destinations: Arc<[Arc<DestinationLimits>]> = Arc::new([]);
        let rules = Arc::new(IngestRules {
            max_event_bytes: store.config().max_event_bytes,
            destinations: destinations.clone(),
        });
        Self { store, source, clock, filters: Arc::new([]), reported: Arc::new([]), destinations, rules }
    }

    /// The same path, refusing what any of `destinations` that routes an
    /// event would refuse.
    pub fn with_destinations(mut self, destinations: Vec<Arc<DestinationLimits>>) -> Self {
        self.destinations = destinations.into();
        self.rules = Arc::new(IngestRules {
            max_event_bytes: self.store.config().max_event_bytes,
            destinations: self.destinations.clone(),
        });
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
    pub async fn submit(&self, inputs: Vec<InputEvent>) -> Result<Committed, IngestError> {
        let prepared = self.prepare(inputs)?;
        self.commit(prepared).await
    }

    /// Runs the ingest-stage filters on prepared events, then appends what
    /// they leave, all or nothing.
    pub async fn commit(&self, prepared: Vec<PreparedEvent>) -> Result<Committed, IngestError> {
        let mut filtered = Vec::new();
        let events = if self.filters.is_empty() {
            prepared
        } else {
            let pending = prepared
                .into_iter()
                .enumerate()
                .map(|(index, event)| match postcard::from_bytes(&event.body) {
                    Ok(body) => Ok(Pending { index, event, body }),
                    Err(e) => Err(AppendError::Storage(format!("re-reading a prepared event: {e}"))),
                })
                .collect::<Result<Vec<_>, _>>()?;
            let rules: Arc<dyn OutputRules> = self.rules.clone();
            let mut site = IngestSite { store: &self.store, filtered: &mut filtered };
            let kept = chain::run(&self.filters, &rules, "", pending, &mut site).await?;
            kept.into_iter().map(|p| p.event).collect()
        };
        filtered.sort_by_key(|f: &Filtered| f.index);
        if events.is_empty() {
            return Ok(Committed { events: Vec::new(), filtered });
        }
        let events = self.store.append(events).await?;
        Ok(Committed { events, filtered })
    }

    /// Why a destination that routes `body` would refuse it, if one would.
    /// `json_data`: the producer's data was checked to be JSON.
    pub fn refusal(&self, body: &EventBodyRef<'_>, json_data: bool) -> Option<String> {
        refusal(&self.destinations, body, json_data)
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

/// The events that stand in for `events` after one filter's `decisions`
/// (already checked by the plugin host against [`IngestRules`]), noting in
/// `filtered` each event `plugin` dropped or replaced.
/// An event on its way through the ingest filters: its index in the
/// request, as it will be stored, and decoded for the plugins.
struct Pending {
    index: usize,
    event: PreparedEvent,
    body: EventBody,
}

/// The ingest stage as the filter chain sees it: what each plugin did is
/// noted per request event, and failed calls' events are dead-lettered new.
struct IngestSite<'a> {
    store: &'a Store,
    filtered: &'a mut Vec<Filtered>,
}

impl Site<Pending> for IngestSite<'_> {
    type Error = IngestError;

    fn wit(&self, item: &Pending) -> WitEvent {
        convert::to_wit(&item.body, 0, 0)
    }

    fn apply(&mut self, filter: &PluginHandle, items: Vec<Pending>, decisions: Vec<Decision>) -> Vec<Pending> {
        apply_decisions(filter.name(), items, decisions, self.filtered)
    }

    fn failed(&mut self, filter: &PluginHandle, items: &[Pending], policy: OnError, reason: &str) {
        let outcome = match policy {
            OnError::Pass => FilterOutcome::FailedPassed,
            OnError::Drop => FilterOutcome::FailedDropped,
            OnError::DeadLetter => FilterOutcome::FailedDeadLettered,
        };
        self.filtered.extend(items.iter().map(|p| Filtered {
            index: p.index,
            id: p.event.id.clone(),
            plugin: filter.name().to_owned(),
            outcome,
            message: outcome.message(filter.name()),
            reason: Some(reason.to_owned()),
        }));
    }

    async fn dead_letter(&mut self, items: Vec<Pending>, reason: String) -> Result<(), IngestError> {
        let events = items.into_iter().map(|p| p.event).collect();
        Ok(self.store.dead_letter_new(events, reason).await?)
    }
}

/// Applies one filter's decisions (one per event, checked by the plugin
/// host), noting in `filtered` what it did to each request event.
fn apply_decisions(
    plugin: &str,
    items: Vec<Pending>,
    decisions: Vec<Decision>,
    filtered: &mut Vec<Filtered>,
) -> Vec<Pending> {
    let mut out = Vec::with_capacity(items.len());
    for (Pending { index, event, body }, decision) in items.into_iter().zip(decisions) {
        let note = |outcome: FilterOutcome| Filtered {
            index,
            id: event.id.clone(),
            plugin: plugin.to_owned(),
            outcome,
            message: outcome.message(plugin),
            reason: None,
        };
        match decision {
            Decision::Keep => out.push(Pending { index, event, body }),
            Decision::Drop => filtered.push(note(FilterOutcome::Dropped)),
            decision => {
                // A route keeps the event's identity; a replacement is a new
                // event whose id dedup must know.
                let dedup = if matches!(decision, Decision::Route(_)) {
                    event.dedup
                } else {
                    filtered.push(note(FilterOutcome::Replaced));
                    Dedup::Producer
                };
                for body in convert::apply(body, decision) {
                    let prepared = PreparedEvent::new(&body, dedup, event.priority, event.expires_at_ms);
                    out.push(Pending { index, event: prepared, body });
                }
            }
        }
    }
    out
}

fn expiry(now_ms: u64, ttl: Duration) -> u64 {
    now_ms.saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)).max(1)
}
