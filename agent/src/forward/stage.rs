//! Destination-stage filters: the `[[plugin]]`s whose `stage` names this
//! destination, run in config order over each batch read from the store,
//! just before publish.
//!
//! A batch becomes [`Step`]s in sequence order: each stored event yields
//! zero or more publishes (the last one closing its sequence) or a
//! settlement. Nothing here is remembered between batches: a resend after a
//! reconnect reads the events again and calls the filters again, so a
//! deterministic filter gives the same output. Filters see the event's
//! stored sequence and HLC; replacements are published with them too.
//!
//! Verdicts, for this destination only: `keep` publishes, `drop` skips,
//! `replace` publishes the replacements in place of the original, and
//! `route` keeps the event if it names this destination, else skips it.
//! A replacement this destination's broker would refuse (its packet size,
//! payload or topic rules: [`DestinationRules`]) fails the call inside the
//! plugin host, so it counts against the plugin and names it, rather than
//! being dead-lettered later as a publish no plugin is blamed for. A failed
//! call (trap, timeout, out of memory, output over its bound or refused,
//! open circuit) follows the plugin's `on_error`: `dead-letter` copies the
//! events of the call to the dead-letter table for this destination and
//! skips them here, `pass` publishes them as they entered the call, `drop`
//! skips them. Other destinations are never affected.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::clock::Hlc;
use crate::event::{Event, EventBody, is_json_content_type};
use crate::limits::DestinationLimits;
use crate::plugin::chain::{self, Site};
use crate::plugin::{ContractOnly, Decision, OutputRules, PluginHandle, WitEvent, convert};
use crate::store::{AppendError, Store};

/// What the forwarder does next for a stored sequence.
// Nearly every step is a publish, so boxing the event would only add an
// allocation per event.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Publish this event (the stored one or a replacement, with the stored
    /// sequence). `last` is the final publish for its sequence.
    Publish {
        /// The event to publish.
        event: Event,
        /// Whether it closes its sequence.
        last: bool,
    },
    /// Nothing (more) to publish for this sequence.
    Settle(u64),
}

/// The destination-stage filters of one destination.
#[derive(Clone)]
pub struct Stage {
    destination: String,
    filters: Vec<PluginHandle>,
    /// What the filters' replacements must meet.
    rules: Arc<dyn OutputRules>,
}

impl Default for Stage {
    fn default() -> Self {
        Self::new(String::new(), Vec::new())
    }
}

/// What a destination stage takes of a filter's replacements: a publish
/// its broker accepts ([`DestinationLimits::refusal`]). The plugin host
/// applies it inside the call ([`OutputRules`]).
pub struct DestinationRules(pub Arc<DestinationLimits>);

impl OutputRules for DestinationRules {
    fn refuse(&self, body: &EventBody) -> Option<String> {
        // Structured mode embeds data as JSON only when it parses.
        let json = body.datacontenttype.as_deref().is_some_and(is_json_content_type)
            && serde_json::from_slice::<serde::de::IgnoredAny>(&body.data).is_ok();
        self.0.refusal(&body.view(), json)
    }
}

/// What a publish for a stored event inherits from it.
#[derive(Debug, Clone, Copy)]
struct Header {
    sequence: u64,
    hlc: Hlc,
    expires_at_ms: Option<u64>,
    priority: u8,
}

/// One event on its way through the chain, tied to the stored event
/// (`origin`, an index into the batch) it stands for.
struct Item {
    origin: usize,
    body: EventBody,
}

impl Stage {
    /// The filters for `destination`, run in the given order. Until
    /// [`Stage::with_limits`], replacements need only meet the contract.
    pub fn new(destination: String, filters: Vec<PluginHandle>) -> Self {
        Self { destination, filters, rules: Arc::new(ContractOnly) }
    }

    /// The same stage, refusing replacements the destination's broker would
    /// refuse (`limits` as it learns them, shared with its forwarder).
    pub fn with_limits(mut self, limits: Arc<DestinationLimits>) -> Self {
        self.rules = Arc::new(DestinationRules(limits));
        self
    }

    /// Whether any filter runs here.
    pub fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }

    /// Turns a batch read from the store into steps. `selected` says which
    /// events this destination routes; the others settle untouched. Returns
    /// the steps and how many events were dead-lettered for this destination.
    pub async fn run(
        &self,
        events: Vec<Event>,
        selected: impl Fn(&Event) -> bool,
        store: &Store,
    ) -> Result<(Vec<Step>, u64), AppendError> {
        let chosen: Vec<bool> = events.iter().map(&selected).collect();
        let mut items: Vec<Item> = Vec::new();
        let mut bypass: Vec<Item> = Vec::new();
        let mut headers = Vec::with_capacity(events.len());
        for (origin, (event, chosen)) in events.into_iter().zip(&chosen).enumerate() {
            let Event { sequence, hlc, expires_at_ms, priority, body } = event;
            headers.push(Header { sequence, hlc, expires_at_ms, priority });
            if *chosen {
                // State updates are the agent's own reconciliation, not user
                // data: filters never see them.
                if body.is_state() { bypass.push(Item { origin, body }) } else { items.push(Item { origin, body }) }
            }
        }
        let mut site = StageSite { destination: &self.destination, headers: &headers, store, dead_lettered: 0 };
        let context = format!("destination {}: ", self.destination);
        let mut items = chain::run(&self.filters, &self.rules, &context, items, &mut site).await?;
        let dead_lettered = site.dead_lettered;
        if !bypass.is_empty() {
            // Stable: replacements keep their order within their origin.
            items.extend(bypass);
            items.sort_by_key(|i| i.origin);
        }
        Ok((steps(headers, &chosen, items), dead_lettered))
    }
}

/// A destination stage as the filter chain sees it: items keep the batch
/// position they came from, and a failed call's events are dead-lettered
/// for this destination only.
struct StageSite<'a> {
    destination: &'a str,
    headers: &'a [Header],
    store: &'a Store,
    dead_lettered: u64,
}

impl Site<Item> for StageSite<'_> {
    type Error = AppendError;

    fn wit(&self, item: &Item) -> WitEvent {
        let h = &self.headers[item.origin];
        convert::to_wit(&item.body, h.sequence, h.hlc.0)
    }

    fn apply(&mut self, _: &PluginHandle, mut items: Vec<Item>, decisions: Vec<Decision>) -> Vec<Item> {
        apply(self.destination, &mut items, decisions);
        items
    }

    async fn dead_letter(&mut self, items: Vec<Item>, reason: String) -> Result<(), AppendError> {
        let origins: BTreeSet<usize> = items.iter().map(|i| i.origin).collect();
        // Concurrent requests share one commit in the store's writer.
        let copies = origins
            .iter()
            .map(|&o| self.store.dead_letter_copy_for(self.headers[o].sequence, self.destination, &reason));
        futures::future::try_join_all(copies).await?;
        self.dead_lettered += origins.len() as u64;
        Ok(())
    }
}

/// Applies one filter's decisions (one per item, already checked by the
/// plugin host against this stage's rules) to the items that went into the call.
fn apply(destination: &str, items: &mut Vec<Item>, decisions: Vec<Decision>) {
    debug_assert_eq!(items.len(), decisions.len(), "the host checks the count");
    let mut out = Vec::with_capacity(items.len());
    for (item, decision) in std::mem::take(items).into_iter().zip(decisions) {
        match decision {
            Decision::Keep => out.push(item),
            Decision::Drop => {}
            Decision::Route(names) => {
                if names.iter().any(|n| n == destination) {
                    out.push(item);
                }
            }
            Decision::Replace(bodies) => out.extend(bodies.into_iter().map(|body| Item { origin: item.origin, body })),
        }
    }
    *items = out;
}

/// The steps for a batch: per stored event in order, its publishes or a
/// settlement. `items` are ordered by origin.
fn steps(headers: Vec<Header>, chosen: &[bool], items: Vec<Item>) -> Vec<Step> {
    let mut out = Vec::with_capacity(headers.len());
    let mut items = items.into_iter().peekable();
    for (origin, header) in headers.into_iter().enumerate() {
        let mut bodies = Vec::new();
        while let Some(item) = items.next_if(|i| i.origin == origin) {
            bodies.push(item.body);
        }
        if !chosen[origin] || bodies.is_empty() {
            out.push(Step::Settle(header.sequence));
            continue;
        }
        let n = bodies.len();
        for (i, body) in bodies.into_iter().enumerate() {
            let Header { sequence, hlc, expires_at_ms, priority } = header;
            out.push(Step::Publish { event: Event { sequence, hlc, expires_at_ms, priority, body }, last: i + 1 == n });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(sequence: u64, subject: &str) -> Event {
        Event {
            sequence,
            hlc: Hlc(sequence << 16),
            expires_at_ms: None,
            priority: 1,
            body: EventBody {
                id: format!("e{sequence}"),
                source: "ferry://gw".into(),
                ty: "t".into(),
                subject: subject.into(),
                time_nanos: 0,
                datacontenttype: None,
                data: Vec::new(),
                partitionkey: None,
                extensions: Vec::new(),
            },
        }
    }

    fn items(events: &[Event]) -> Vec<Item> {
        events.iter().enumerate().map(|(origin, e)| Item { origin, body: e.body.clone() }).collect()
    }

    #[test]
    fn decisions_apply_for_this_destination_only() {
        let events: Vec<Event> = (1..=5).map(|s| event(s, "t")).collect();
        let mut batch = items(&events);
        let mut replacement = events[3].body.clone();
        replacement.subject = "t/a".into();
        let decisions = vec![
            Decision::Keep,
            Decision::Drop,
            Decision::Route(vec!["other".into()]),
            Decision::Replace(vec![replacement.clone(), replacement]),
            Decision::Route(vec!["other".into(), "here".into()]),
        ];
        apply("here", &mut batch, decisions);
        let kept: Vec<(usize, &str)> = batch.iter().map(|i| (i.origin, i.body.subject.as_str())).collect();
        assert_eq!(kept, [(0, "t"), (3, "t/a"), (3, "t/a"), (4, "t")]);
        assert!(batch.iter().all(|i| i.body.extensions.is_empty()), "no route marker is added at this stage");
    }

    fn limits(max_packet: &str) -> Arc<DestinationLimits> {
        let c = crate::config::Config::parse(
            &format!(
                "[[destination]]\nname = \"here\"\nurl = \"mqtt://x\"\nroutes = [\"#\"]\nmax_packet_size = \"{max_packet}\"\n"
            ),
            "test.toml",
        )
        .unwrap();
        Arc::new(DestinationLimits::new(&c.destinations[0]))
    }

    #[test]
    fn a_replacement_over_the_destination_packet_size_is_refused_naming_the_destination() {
        let rules = DestinationRules(limits("1 KiB"));
        let mut body = event(1, "t").body;
        assert_eq!(rules.refuse(&body), None);
        body.data = vec![b'x'; 4096];
        let reason = rules.refuse(&body).expect("over 1 KiB");
        assert!(reason.contains("destination here") && reason.contains("max_packet_size"), "{reason}");
        // Inside a call, the refusal is the plugin's invalid output, naming the event.
        let input = convert::to_wit(&event(1, "t").body, 1, 0);
        let replace = crate::plugin::Verdict::Replace(vec![convert::to_wit(&body, 1, 0)]);
        let e = convert::decide(&[input], vec![replace], &rules).unwrap_err();
        assert!(e.starts_with("event 0 (`e1`): replacement 0 (`e1`): destination here"), "{e}");
    }

    #[test]
    fn steps_keep_sequence_order_and_close_each_sequence_once() {
        let events: Vec<Event> = (1..=4).map(|s| event(s, "t")).collect();
        let chosen = [true, false, true, true];
        let mut body = events[2].body.clone();
        body.subject = "t/x".into();
        let kept = vec![
            Item { origin: 2, body: body.clone() },
            Item { origin: 2, body: body.clone() },
            Item { origin: 3, body: events[3].body.clone() },
        ];
        let headers = events
            .iter()
            .map(|e| Header { sequence: e.sequence, hlc: e.hlc, expires_at_ms: e.expires_at_ms, priority: e.priority })
            .collect();
        let out = steps(headers, &chosen, kept);
        let shape: Vec<(u64, Option<bool>)> = out
            .iter()
            .map(|s| match s {
                Step::Publish { event, last } => (event.sequence, Some(*last)),
                Step::Settle(seq) => (*seq, None),
            })
            .collect();
        assert_eq!(shape, [(1, None), (2, None), (3, Some(false)), (3, Some(true)), (4, Some(true))]);
        let Step::Publish { event: replaced, .. } = &out[2] else { unreachable!() };
        assert_eq!((replaced.hlc, replaced.priority, replaced.body.subject.as_str()), (events[2].hlc, 1, "t/x"));
    }
}
