//! Delivery receipts: where one accepted event stands at each destination,
//! answered from what the store keeps anyway (the log, the dedup index, the
//! cursors and the dead letters). Nothing is written per event for them:
//! the time of a delivery is that of the first cursor move committed at or
//! past the event, one row per cursor commit.
//!
//! An event is named by the id its producer gave it, while the dedup window
//! remembers it, or by its sequence (`seq:N`) from the ingest answer. Once
//! every destination that routes an event has it, the event leaves the log;
//! its receipt then says `settled` (delivered, or not routed there) for each
//! destination past it, since what routed it went with it.

use redb::{ReadableDatabase, ReadableTable};
use serde::Serialize;

use super::tables;
use super::{DeadLetter, Store, StoreError, storage};
use crate::config::Consumer;
use crate::event::{self, Event};

/// How a receipt request names an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventRef {
    /// The id its producer gave it (within the dedup window).
    Id(String),
    /// Its sequence in the log.
    Sequence(u64),
}

impl EventRef {
    /// `seq:N`, or an event id.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.strip_prefix("seq:") {
            Some(n) => n
                .parse()
                .ok()
                .filter(|&n| n > 0)
                .map(EventRef::Sequence)
                .ok_or_else(|| format!("`{text}`: a sequence is `seq:` and a whole number from 1")),
            None if text.is_empty() => Err("the event id is empty".into()),
            None => Ok(EventRef::Id(text.to_owned())),
        }
    }
}

/// Where one event stands at every destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Receipt {
    /// Its id, when still known (in the log or the dedup window).
    pub id: Option<String>,
    /// Its sequence in the log.
    pub sequence: u64,
    /// When it was accepted, in ms since the epoch, when still known.
    pub accepted_ms: Option<u64>,
    /// Whether it is still in the log.
    pub in_log: bool,
    /// Per destination, in config order.
    pub destinations: Vec<DestinationReceipt>,
}

/// Where the event stands at one destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DestinationReceipt {
    /// The destination.
    pub destination: String,
    /// Its state there.
    #[serde(flatten)]
    pub state: DeliveryState,
    /// When delivered: when its cursor was durably moved past it, in ms since
    /// the epoch (a few tens of ms after the PUBACK). Absent until then.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivered_ms: Option<u64>,
}

/// The state of one event at one destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum DeliveryState {
    /// Routed there and not acknowledged yet.
    Pending,
    /// The destination's broker acknowledged it (its cursor passed it).
    Delivered,
    /// Set aside for this destination (or for all), with the reason.
    DeadLettered {
        /// Why.
        reason: String,
        /// When, in ms since the epoch.
        at_ms: u64,
    },
    /// Its routes (or a route verdict) do not send it there.
    NotRouted,
    /// It left the log with this destination's cursor past it: delivered
    /// there, or not routed there.
    Settled,
    /// It left the log before this destination had it: evicted under the
    /// quota (`full_policy = "drop-oldest"`).
    Evicted,
}

/// What the store holds of one event, for [`judge`].
pub struct Found {
    /// Its sequence.
    pub sequence: u64,
    /// The event, while in the log.
    pub event: Option<Event>,
    /// Its dead letters.
    pub dead_letters: Vec<DeadLetter>,
}

/// The state at `consumer`, whose cursor is `cursor`.
pub fn judge(found: &Found, consumer: &Consumer, cursor: u64) -> DeliveryState {
    let name = consumer.name.as_str();
    let dead = found.dead_letters.iter().find(|d| d.destination.as_deref().is_none_or(|d| d == name));
    if let Some(d) = dead {
        return DeliveryState::DeadLettered { reason: d.reason.clone(), at_ms: d.at_ms };
    }
    let passed = cursor >= found.sequence;
    match &found.event {
        Some(e) if !e.body.is_for(name, &consumer.routing) => DeliveryState::NotRouted,
        Some(_) if passed => DeliveryState::Delivered,
        Some(_) => DeliveryState::Pending,
        None if passed => DeliveryState::Settled,
        None => DeliveryState::Evicted,
    }
}

impl Store {
    /// The receipt of the event `key` names; `None` when the store does not
    /// know it (never accepted, or an id older than the dedup window).
    /// `acked` are the running forwarders' acknowledged sequences, which
    /// reach the stored cursors up to a few tens of ms later.
    pub fn receipt(&self, key: &EventRef, acked: &[(String, u64)]) -> Result<Option<Receipt>, StoreError> {
        let consumers = &self.inner.config.consumers;
        self.read(|db| {
            let txn = db.begin_read().map_err(storage)?;
            let sequence = match key {
                EventRef::Sequence(n) => *n,
                EventRef::Id(id) => {
                    let dedup = txn.open_table(tables::DEDUP).map_err(storage)?;
                    match dedup.get(id.as_str()).map_err(storage)? {
                        Some(n) => n.value(),
                        None => return Ok(None),
                    }
                }
            };
            let Some(found) = gather(&txn, &[sequence])?.pop().flatten() else { return Ok(None) };
            let remembered = remembered_id(&txn, sequence)?;
            let cursors = txn.open_table(tables::CURSORS).map_err(storage)?;
            let moves = txn.open_table(tables::CURSOR_MOVES).map_err(storage)?;
            let mut destinations = Vec::with_capacity(consumers.len());
            for c in consumers {
                let name = c.name.as_str();
                let stored = cursors.get(name).map_err(storage)?.map_or(0, |v| v.value());
                let seen = acked.iter().find(|(n, _)| *n == c.name).map_or(0, |(_, a)| *a);
                let state = judge(&found, c, stored.max(seen));
                let delivered_ms = match state {
                    DeliveryState::Delivered if stored >= sequence => {
                        let (from, last) = (tables::move_key(name, sequence), tables::move_key(name, u64::MAX));
                        let first = moves.range(from.as_str()..=last.as_str()).map_err(storage)?.next();
                        first.transpose().map_err(storage)?.map(|(_, at)| at.value())
                    }
                    _ => None,
                };
                destinations.push(DestinationReceipt { destination: c.name.clone(), state, delivered_ms });
            }
            let (id, accepted_ms) = match &found.event {
                Some(e) => (Some(e.body.id.clone()), Some(e.hlc.millis())),
                None => (remembered.as_ref().map(|(_, id)| id.clone()), remembered.map(|(ms, _)| ms)),
            };
            Ok(Some(Receipt { id, sequence, accepted_ms, in_log: found.event.is_some(), destinations }))
        })
    }

    /// What the store holds of each of `sequences`, in order, for
    /// [`judge`]: `None` for a sequence never assigned. One snapshot.
    pub fn found(&self, sequences: &[u64]) -> Result<Vec<Option<Found>>, StoreError> {
        self.read(|db| gather(&db.begin_read().map_err(storage)?, sequences))
    }

    /// The destinations the store keeps events for, with their routing.
    pub fn consumers(&self) -> &[Consumer] {
        &self.inner.config.consumers
    }
}

/// The acceptance time and id the dedup window remembers of `sequence`:
/// from its commit's row, or from the row per event of earlier releases.
pub(super) fn remembered_id(txn: &redb::ReadTransaction, sequence: u64) -> Result<Option<(u64, String)>, StoreError> {
    let ages = txn.open_table(tables::DEDUP_AGES).map_err(storage)?;
    if let Some(row) = ages.range(..=sequence).map_err(storage)?.next_back() {
        let (_, v) = row.map_err(storage)?;
        let record = super::writer::AgeRecord::decode(v.value());
        if let Some((_, id)) = record.ids.iter().find(|(s, _)| *s == sequence) {
            return Ok(Some((record.at_ms, id.clone())));
        }
    }
    let legacy = txn.open_table(tables::DEDUP_AGE).map_err(storage)?;
    Ok(legacy.get(sequence).map_err(storage)?.map(|v| {
        let (ms, id) = v.value();
        (ms, id.to_owned())
    }))
}

/// The events and dead letters of `sequences`, in one pass over the dead letters.
fn gather(txn: &redb::ReadTransaction, sequences: &[u64]) -> Result<Vec<Option<Found>>, StoreError> {
    let log = txn.open_table(tables::LOG).map_err(storage)?;
    let meta = super::Meta::load(&txn.open_table(tables::META).map_err(storage)?).map_err(storage)?;
    let mut out = Vec::with_capacity(sequences.len());
    for &sequence in sequences {
        let event = match log.get(sequence).map_err(storage)? {
            Some(v) => Some(
                event::decode_record(sequence, v.value()).map_err(|source| StoreError::Corrupt { sequence, source })?,
            ),
            None => None,
        };
        let known = event.is_some() || (sequence > 0 && sequence < meta.next_sequence);
        out.push(known.then(|| Found { sequence, event, dead_letters: Vec::new() }));
    }
    let wanted: std::collections::BTreeMap<u64, usize> =
        out.iter().enumerate().filter_map(|(i, f)| f.as_ref().map(|f| (f.sequence, i))).collect();
    if wanted.is_empty() {
        return Ok(out);
    }
    let dead = txn.open_table(tables::DEAD).map_err(storage)?;
    for row in dead.iter().map_err(storage)? {
        let (k, v) = row.map_err(storage)?;
        // A dead letter whose record is unreadable says nothing of these events.
        if let Ok(d) = DeadLetter::decode(k.value(), v.value())
            && let Some(&i) = wanted.get(&d.sequence)
        {
            out[i].as_mut().expect("wanted only known ones").dead_letters.push(d);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Hlc;
    use crate::config::Routing;
    use crate::event::{EventBody, ROUTE_EXTENSION};
    use crate::topic::TopicFilter;

    fn consumer(name: &str, route: &str) -> Consumer {
        Consumer {
            name: name.into(),
            routing: Routing { routes: vec![TopicFilter::new(route).unwrap()], subscribe: vec![] },
        }
    }

    fn found(subject: &str, extensions: &[(&str, &str)], in_log: bool) -> Found {
        let body = EventBody {
            id: "e1".into(),
            source: "ferry://gw".into(),
            ty: "t".into(),
            subject: subject.into(),
            time_nanos: 0,
            datacontenttype: None,
            data: b"1".to_vec(),
            partitionkey: None,
            extensions: extensions.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect(),
        };
        let event = Event { sequence: 7, hlc: Hlc(1 << 16), expires_at_ms: None, priority: 1, body };
        Found { sequence: 7, event: in_log.then_some(event), dead_letters: vec![] }
    }

    fn dead(destination: Option<&str>) -> DeadLetter {
        DeadLetter {
            number: 1,
            sequence: 7,
            reason: "too large".into(),
            at_ms: 5,
            record: vec![],
            destination: destination.map(str::to_owned),
        }
    }

    #[test]
    fn each_destination_is_pending_delivered_or_not_routed_by_its_cursor_and_routes() {
        let f = found("t/x", &[], true);
        assert_eq!(judge(&f, &consumer("a", "t/#"), 6), DeliveryState::Pending);
        assert_eq!(judge(&f, &consumer("a", "t/#"), 7), DeliveryState::Delivered);
        assert_eq!(judge(&f, &consumer("b", "u/#"), 9), DeliveryState::NotRouted);
        let verdict = found("t/x", &[(ROUTE_EXTENSION, "b")], true);
        assert_eq!(judge(&verdict, &consumer("a", "t/#"), 0), DeliveryState::NotRouted, "a route verdict");
    }

    #[test]
    fn a_dead_letter_counts_for_its_destination_or_for_all() {
        let mut f = found("t/x", &[], true);
        f.dead_letters.push(dead(Some("a")));
        let dead_lettered = DeliveryState::DeadLettered { reason: "too large".into(), at_ms: 5 };
        assert_eq!(judge(&f, &consumer("a", "t/#"), 7), dead_lettered);
        assert_eq!(judge(&f, &consumer("b", "t/#"), 7), DeliveryState::Delivered);
        f.dead_letters = vec![dead(None)];
        assert_eq!(judge(&f, &consumer("b", "t/#"), 7), dead_lettered);
    }

    #[test]
    fn an_event_that_left_the_log_is_settled_past_a_cursor_and_evicted_before_it() {
        let f = found("t/x", &[], false);
        assert_eq!(judge(&f, &consumer("a", "t/#"), 7), DeliveryState::Settled);
        assert_eq!(judge(&f, &consumer("a", "t/#"), 6), DeliveryState::Evicted);
    }

    #[test]
    fn references_are_ids_or_positive_sequences() {
        assert_eq!(EventRef::parse("seq:12"), Ok(EventRef::Sequence(12)));
        assert_eq!(EventRef::parse("order-7"), Ok(EventRef::Id("order-7".into())));
        assert!(EventRef::parse("seq:0").unwrap_err().contains("whole number"));
        assert!(EventRef::parse("seq:x").is_err());
        assert!(EventRef::parse("").is_err());
    }
}
