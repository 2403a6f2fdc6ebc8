//! Local MQTT ingest: subscribe to topic filters on a broker on the device
//! and store what arrives, acknowledging each message only after its commit.
//!
//! The session is persistent (clean session off, manual acks), so a message
//! received but not yet committed when the agent dies is redelivered by the
//! broker. A plain message's event id is derived from the message itself,
//! and the ids of each committed batch are kept in one store record until the
//! batch is acknowledged, so a message committed but not yet acknowledged at
//! the crash is recognised as a duplicate when the broker redelivers it; once
//! acknowledged, the batch is forgotten so a later identical message is a new
//! event. A CloudEvent keeps its producer's id, deduplicated for the store's
//! window as on every ingest path.
//!
//! An MQTT 5 message that names a Response Topic gets a receipt there, with
//! its Correlation Data: its id and sequence once stored, or once as many of
//! the destinations routing it as `ack` asks for have acknowledged it
//! ([`super::acks`]), or saying it is still pending after `ack_timeout`. A
//! message refused as bad input gets the error there instead.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::acks::AckWaiter;
use super::parse::{self, BadInput, InputEvent};
use super::{Committed, Ingest, IngestError};
use crate::clock;
use crate::config::{AckLevel, MqttEndpoint, MqttIngestConfig};
use crate::mqtt::session::{DEFAULT_BACKOFF, stopping};
use crate::mqtt::{Connected, End, Incoming, Link, LinkError, LinkEvent, LinkOptions, Session, Supervisor};
use crate::store::{AppendError, Dedup};

/// Messages committed together at most: half the Receive Maximum.
const BATCH: usize = RECEIVE_MAXIMUM as usize / 2;

/// Unacknowledged messages the broker may hold out to us at once (MQTT 5
/// `Receive Maximum`). Each is acknowledged only after its commit, so this
/// bounds how many messages can share one fsync: without it a broker applies
/// its own default (Mosquitto: 20), and ingest crawls at 20 per commit.
/// Two batches' worth lets one batch commit while the next one arrives.
const RECEIVE_MAXIMUM: u16 = crate::config::budget::MQTT_INGEST_RECEIVE_MAXIMUM;

/// How long a batch the store failed to take waits before it is tried
/// again, on the same connection (the store heals by itself).
const STORE_RETRY: Duration = Duration::from_secs(1);

/// The local MQTT ingest task.
pub struct MqttIngest {
    config: MqttIngestConfig,
    tls: Option<Arc<rustls::ClientConfig>>,
    ingest: Ingest,
    acks: AckWaiter,
    shutdown: watch::Receiver<bool>,
    /// Receipts ready to go, from the tasks that waited for them.
    replies_tx: mpsc::UnboundedSender<Reply>,
    replies: mpsc::UnboundedReceiver<Reply>,
    /// Receipts the link could not queue yet (kept across connections).
    unsent: VecDeque<Reply>,
}

/// A receipt for a message's Response Topic.
struct Reply {
    topic: String,
    correlation: Option<Bytes>,
    payload: Vec<u8>,
}

/// The body of a receipt.
#[derive(Debug, Serialize)]
struct Receipt {
    /// The event's id (the producer's, or derived from the message).
    id: Option<String>,
    /// Whether it is stored (`false`: refused, or dropped by a plugin).
    stored: bool,
    /// Its sequence in the log.
    #[serde(skip_serializing_if = "Option::is_none")]
    sequence: Option<u64>,
    /// Whether it was stored before (a redelivery, or a producer's retry).
    duplicate: bool,
    /// The level asked for.
    ack: AckLevel,
    /// Whether the level was reached (`false`: still pending at `ack_timeout`).
    met: bool,
    /// The destinations whose broker acknowledged it.
    acked_by: Vec<String>,
    /// What an ingest plugin did to it, or why it was refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
}

impl MqttIngest {
    /// Prepares the task; [`MqttIngest::run`] runs it until shutdown.
    /// Receipts that wait for acknowledgments wait through `acks`.
    pub fn new(
        config: MqttIngestConfig,
        tls: Option<Arc<rustls::ClientConfig>>,
        ingest: Ingest,
        acks: AckWaiter,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let (replies_tx, replies) = mpsc::unbounded_channel();
        Self { config, tls, ingest, acks, shutdown, replies_tx, replies, unsent: VecDeque::new() }
    }

    /// Sends each message that names a Response Topic its receipt: at once
    /// for `ack = "stored"` (and for what was not stored), else once its
    /// acknowledgments are in or `ack_timeout` passed.
    fn answer(&mut self, messages: &[Box<Incoming>], committed: &Committed) {
        for m in messages {
            let Some((topic, correlation)) = m.reply_to() else { continue };
            let id = message_to_input(m).ok().and_then(|input| input.id);
            let appended = id.as_ref().and_then(|id| committed.events.iter().find(|a| &a.id == id));
            let detail = id.as_ref().and_then(|id| committed.filtered.iter().find(|f| &f.id == id));
            let level = self.config.ack;
            let mut receipt = match appended {
                Some(a) => Receipt {
                    id,
                    stored: true,
                    sequence: Some(a.sequence),
                    duplicate: a.duplicate,
                    ack: level,
                    met: level == AckLevel::Stored,
                    acked_by: Vec::new(),
                    detail: detail.map(|f| f.message.clone()),
                },
                None => {
                    let why = detail.map_or_else(|| "refused: see the agent's log".into(), |f| f.message.clone());
                    Receipt::not_stored(id, level, why)
                }
            };
            let Some(sequence) = receipt.sequence.filter(|_| level != AckLevel::Stored) else {
                self.unsent.push_back(Reply { topic, correlation, payload: to_json(&receipt) });
                continue;
            };
            let (acks, timeout, tx) = (self.acks.clone(), self.config.ack_timeout, self.replies_tx.clone());
            tokio::spawn(async move {
                let (mut by, met) = acks.wait(level, &[sequence], timeout).await;
                receipt.acked_by = by.pop().unwrap_or_default();
                receipt.met = met;
                let _ = tx.send(Reply { topic, correlation, payload: to_json(&receipt) });
            });
        }
    }

    /// Queues the receipts that are ready, as far as the link takes them.
    fn flush_replies(&mut self, link: &mut Link) -> Result<(), LinkError> {
        while let Some(r) = self.unsent.front() {
            match link.publish_reply(r.topic.clone(), r.payload.clone(), r.correlation.clone()) {
                Ok(()) => {
                    self.unsent.pop_front();
                }
                // Its queue is full: the rest go as it drains (each ack wakes the loop).
                Err(LinkError::QueueFull) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Connects, subscribes and ingests until shutdown, reconnecting with backoff.
    pub async fn run(mut self) {
        // Every ack waits in the client's queue until the event loop sends it;
        // there are never more than `RECEIVE_MAXIMUM` (one per message held),
        // so the queue cannot overflow.
        let opts = LinkOptions {
            inflight: 16,
            queue: usize::from(RECEIVE_MAXIMUM) + 64,
            clean_session: false,
            manual_acks: true,
            receive_maximum: Some(RECEIVE_MAXIMUM),
        };
        let supervisor =
            Supervisor::new("local MQTT ingest", self.tls.clone(), opts, DEFAULT_BACKOFF, self.shutdown.clone());
        supervisor.run(&mut self).await;
    }

    async fn session(&mut self, link: &mut Link) -> End {
        for filter in &self.config.topics {
            if let Err(e) = link.subscribe(filter.as_str()) {
                return End::ours(e);
            }
        }
        tracing::info!(url = %self.config.endpoint.url(), topics = ?self.config.topics, "local MQTT ingest subscribed");
        // One commit at a time; messages that arrive while it is in flight
        // form the next batch, so batches grow with the commit latency and a
        // lone message is never held back waiting for company.
        // Boxed as they come from the link: a batch then moves pointers, and
        // never needs one large allocation (which the allocator would map and
        // unmap from the kernel, batch after batch).
        let mut pending: Vec<Box<Incoming>> = Vec::new();
        let mut commit: Option<Commit> = None;
        // Why the store refuses batches, while it does.
        let mut failing: Option<String> = None;
        let end = 'session: loop {
            tokio::select! {
                event = link.poll() => match event {
                    Ok(LinkEvent::Message(m)) => pending.push(m),
                    // Nothing would ever arrive: try again on a new connection, after backoff.
                    Ok(LinkEvent::SubscribeRefused(r)) => {
                        break End::ours(LinkError::Refused(format!("subscription to {:?} refused ({r})", self.config.topics)));
                    }
                    Ok(_) => {}
                    Err(e) => break End::from(e),
                },
                Some(reply) = self.replies.recv() => self.unsent.push_back(reply),
                stored = async { (&mut commit.as_mut().expect("guarded").task).await }, if commit.is_some() => {
                    commit = None;
                    match stored {
                        Ok((Stored::Yes(batch, committed), messages)) => {
                            if let Some(reason) = failing.take() {
                                tracing::info!(after = %reason, "local MQTT ingest stores again");
                            }
                            for m in &messages {
                                if let Err(e) = link.ack(m) {
                                    break 'session End::ours(e);
                                }
                            }
                            self.answer(&messages, &committed);
                            // The broker will not redeliver the batch now; off the ack path.
                            let store = self.ingest.store().clone();
                            tokio::spawn(async move {
                                if let Err(e) = store.forget_deliveries(batch).await {
                                    tracing::warn!(error = %e, "could not forget acknowledged MQTT messages");
                                }
                            });
                        }
                        Ok((Stored::Closed, _)) => break End::Shutdown,
                        Err(e) => break End::Local(format!("storing local MQTT messages failed: {e}")),
                        Ok((Stored::Failed(e), messages)) => {
                            // The batch stays unacknowledged and in hand: try it
                            // again on this connection once the store may have healed.
                            if failing.is_none() {
                                tracing::warn!(error = %e, retry_every = ?STORE_RETRY, "storing local MQTT messages failed; they wait at the broker");
                            }
                            failing = Some(e.to_string());
                            match self.start_commit(link, messages, STORE_RETRY) {
                                Ok(c) => commit = c,
                                Err(e) => break End::ours(e),
                            }
                        }
                    }
                }
                _ = stopping(&mut self.shutdown) => break End::Shutdown,
            }
            if let Err(e) = self.flush_replies(link) {
                break End::ours(e);
            }
            if commit.is_none() && !pending.is_empty() {
                // Hand over the whole buffer when it fits in one batch (the usual
                // case): draining its front would shift every message left behind.
                let batch = if pending.len() <= BATCH {
                    std::mem::take(&mut pending)
                } else {
                    let rest = pending.split_off(BATCH);
                    std::mem::replace(&mut pending, rest)
                };
                match self.start_commit(link, batch, Duration::ZERO) {
                    Ok(c) => commit = c,
                    Err(e) => break End::ours(e),
                }
            }
        };
        if let Some(c) = commit {
            // Unacknowledged: the broker redelivers, and the derived ids dedupe what did commit.
            c.task.abort();
        }
        end
    }

    /// Refuses what cannot become an event (acked, so it is not redelivered
    /// forever) and starts storing the rest, `after` a wait. `None` when
    /// nothing is left.
    #[expect(
        clippy::vec_box,
        reason = "a batch moves pointers; unboxed, it is one allocation large enough to be mapped and unmapped per batch"
    )]
    fn start_commit(
        &mut self,
        link: &mut Link,
        batch: Vec<Box<Incoming>>,
        after: Duration,
    ) -> Result<Option<Commit>, LinkError> {
        let mut inputs = Vec::with_capacity(batch.len());
        let mut messages = Vec::with_capacity(batch.len());
        let deliveries = clock::new_v7(self.ingest.clock().as_ref()).as_u128();
        for m in batch {
            match delivery_input(&m, deliveries) {
                Ok(input) => {
                    inputs.push(input);
                    messages.push(m);
                }
                Err(e) => {
                    // Only a Response Topic can be told: log, and ack so it is not redelivered forever.
                    tracing::warn!(topic = %m.topic, error = %e, "local MQTT message refused");
                    link.ack(&m)?;
                    if let Some((topic, correlation)) = m.reply_to() {
                        let receipt = Receipt::not_stored(None, self.config.ack, format!("refused: {e}"));
                        self.unsent.push_back(Reply { topic, correlation, payload: to_json(&receipt) });
                    }
                }
            }
        }
        if inputs.is_empty() {
            return Ok(None);
        }
        let ingest = self.ingest.clone();
        let task = tokio::spawn(async move {
            if !after.is_zero() {
                tokio::time::sleep(after).await;
            }
            store_batch(ingest, deliveries, inputs, messages).await
        });
        Ok(Some(Commit { task }))
    }
}

impl Session for MqttIngest {
    fn endpoint(&mut self) -> Result<MqttEndpoint, String> {
        Ok(self.config.endpoint.clone())
    }

    async fn run(&mut self, link: &mut Link, _: Connected) -> End {
        self.session(link).await
    }
}

/// A batch being stored; the task hands back the messages to acknowledge.
struct Commit {
    #[expect(
        clippy::vec_box,
        reason = "a batch moves pointers; unboxed, it is one allocation large enough to be mapped and unmapped per batch"
    )]
    task: JoinHandle<(Stored, Vec<Box<Incoming>>)>,
}

/// How storing a batch ended.
enum Stored {
    /// Committed; the batch of deliveries to forget once acknowledged, and
    /// what was stored.
    Yes(u128, Committed),
    /// The store closed (shutdown).
    Closed,
    /// The store failed.
    Failed(IngestError),
}

/// Stores a batch of `messages` (already turned into `inputs`). A full store
/// is waited out (the messages stay unacknowledged at the broker meanwhile),
/// so nothing is lost or refused. The inputs are consumed by each attempt and
/// derived again from the messages for the next (they are deterministic), so
/// the usual single attempt copies nothing.
#[expect(
    clippy::vec_box,
    reason = "a batch moves pointers; unboxed, it is one allocation large enough to be mapped and unmapped per batch"
)]
async fn store_batch(
    ingest: Ingest,
    batch: u128,
    mut inputs: Vec<InputEvent>,
    mut messages: Vec<Box<Incoming>>,
) -> (Stored, Vec<Box<Incoming>>) {
    // Messages refused one by one (no destination could take them): acked
    // with the rest, so the broker does not deliver them again forever.
    let mut refused = Vec::new();
    loop {
        let stored = match ingest.submit(inputs).await {
            Ok(committed) => Stored::Yes(batch, committed),
            Err(e) if e.refused_event().is_some_and(|i| i < messages.len()) => {
                let m = messages.remove(e.refused_event().expect("guarded"));
                tracing::warn!(topic = %m.topic, error = %e, "local MQTT message refused");
                refused.push(m);
                match messages.iter().map(|m| delivery_input(m, batch)).collect() {
                    Ok(again) => {
                        inputs = again;
                        continue;
                    }
                    Err(e) => Stored::Failed(e.into()),
                }
            }
            Err(IngestError::Store(
                AppendError::Full { retry_after, .. } | AppendError::DiskFull { retry_after, .. },
            )) => {
                tracing::warn!(retry_in = ?retry_after, "store full: local MQTT messages wait at the broker");
                tokio::time::sleep(retry_after).await;
                match messages.iter().map(|m| delivery_input(m, batch)).collect() {
                    Ok(again) => {
                        inputs = again;
                        continue;
                    }
                    Err(e) => Stored::Failed(e.into()),
                }
            }
            Err(IngestError::Store(AppendError::Closed)) => Stored::Closed,
            Err(e) => Stored::Failed(e),
        };
        messages.append(&mut refused);
        return (stored, messages);
    }
}

impl Receipt {
    /// The receipt of a message that was not stored, saying why.
    fn not_stored(id: Option<String>, ack: AckLevel, detail: String) -> Self {
        Self {
            id,
            stored: false,
            sequence: None,
            duplicate: false,
            ack,
            met: false,
            acked_by: Vec::new(),
            detail: Some(detail),
        }
    }
}

fn to_json(receipt: &Receipt) -> Vec<u8> {
    serde_json::to_vec(receipt).expect("a receipt serialises")
}

/// A message as an event of the batch of deliveries `batch`. A CloudEvent
/// keeps its producer's id, deduplicated for the store's window as on every
/// ingest path; any other message gets an id derived from the delivery, kept
/// with its batch until the broker has the ack (see [`Dedup::Delivery`]).
fn delivery_input(m: &Incoming, batch: u128) -> Result<InputEvent, BadInput> {
    let mut input = parse_message(m)?;
    input.dedup = Some(match input.id {
        Some(_) => Dedup::Producer,
        None => {
            input.id = Some(derived_id(m));
            Dedup::Delivery { batch, redelivered: m.dup }
        }
    });
    Ok(input)
}

/// Turns a message into an event: CloudEvents binary mode (MQTT 5 user
/// properties with `specversion`), structured mode (a JSON payload with
/// `specversion`), or plain data on the message's topic.
pub fn message_to_input(m: &Incoming) -> Result<InputEvent, BadInput> {
    let mut input = parse_message(m)?;
    if input.id.is_none() {
        input.id = Some(derived_id(m));
    }
    Ok(input)
}

/// [`message_to_input`] without the derived id: `id` is the producer's, if any.
fn parse_message(m: &Incoming) -> Result<InputEvent, BadInput> {
    Ok(if m.user_properties.iter().any(|(k, _)| k == "specversion") {
        let mut props: Vec<(&str, &str)> = m.user_properties.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        if !props.iter().any(|(k, _)| *k == "subject") {
            props.push(("subject", &m.topic));
        }
        parse::parse_binary(m.content_type.as_deref(), props.into_iter(), &m.payload)?
    } else if let Some(structured) = structured_cloudevent(m) {
        structured?
    } else {
        let data_is_json = serde_json::from_slice::<serde::de::IgnoredAny>(&m.payload).is_ok();
        crate::topic::validate_name(&m.topic).map_err(|e| BadInput {
            index: None,
            field: Some("topic".into()),
            reason: format!("`{}` {e}", m.topic),
        })?;
        InputEvent {
            id: None,
            topic: m.topic.clone(),
            ty: None,
            time_nanos: None,
            datacontenttype: m
                .content_type
                .clone()
                .or_else(|| (!data_is_json).then(|| "application/octet-stream".into())),
            data: m.payload.to_vec(),
            data_is_json,
            partitionkey: None,
            extensions: Vec::new(),
            ttl: None,
            dedup: None,
        }
    })
}

fn structured_cloudevent(m: &Incoming) -> Option<Result<InputEvent, BadInput>> {
    let declared = m.content_type.as_deref().is_some_and(|c| c.starts_with("application/cloudevents+json"));
    // Building a JSON tree of every plain payload only to look for one key
    // costs more than the rest of ingest: a payload that holds neither the
    // key's text nor an escape (which could spell it) cannot have it.
    if !declared && !might_hold_specversion(&m.payload) {
        return None;
    }
    let mut value: serde_json::Value = serde_json::from_slice(&m.payload).ok()?;
    let obj = value.as_object_mut()?;
    if !declared && !obj.contains_key("specversion") {
        return None;
    }
    obj.entry("subject").or_insert_with(|| serde_json::Value::String(m.topic.clone()));
    let body = serde_json::to_vec(&value).ok()?;
    Some(
        parse::parse_body(Some("application/cloudevents+json"), |_| None, std::iter::empty(), &body)
            .map(|mut v| v.remove(0)),
    )
}

/// Whether a JSON text could have a `specversion` key: it holds the name
/// literally, or a backslash (an escape may spell it).
fn might_hold_specversion(payload: &[u8]) -> bool {
    payload.contains(&b'\\') || payload.windows(11).any(|w| w == b"specversion")
}

/// An id the same message gets again when the broker redelivers it: topic,
/// payload and packet id (a redelivery keeps its packet id).
fn derived_id(m: &Incoming) -> String {
    let mut h = Sha256::new();
    h.update(m.topic.as_bytes());
    h.update([0]);
    h.update(m.pkid.to_be_bytes());
    h.update(&m.payload);
    let digest = h.finalize();
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = String::with_capacity(5 + 32);
    id.push_str("mqtt-");
    for b in &digest[..16] {
        id.push(char::from(HEX[usize::from(b >> 4)]));
        id.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_json_payload_is_data_on_the_message_topic_with_a_stable_derived_id() {
        let m = Incoming::v311("sensors/p1", br#"{"t":21.5}"#, 7);
        let input = message_to_input(&m).unwrap();
        assert_eq!(input.topic, "sensors/p1");
        assert_eq!(input.data, br#"{"t":21.5}"#);
        assert!(input.data_is_json);
        let id = input.id.unwrap();
        assert!(id.starts_with("mqtt-") && id.len() == 5 + 32, "{id}");
        assert!(id[5..].bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()), "{id}");
        assert_eq!(message_to_input(&m).unwrap().id.unwrap(), id, "a redelivery gets the same id");
        let other = Incoming::v311("sensors/p1", br#"{"t":21.5}"#, 8);
        assert_ne!(message_to_input(&other).unwrap().id.unwrap(), id, "another packet id is another message");
    }

    #[test]
    fn a_structured_cloudevent_is_recognised_even_when_its_key_is_escaped() {
        for body in [
            r#"{"specversion":"1.0","id":"e-1","source":"s","type":"t","data":{"c":1}}"#,
            r#"{"\u0073pecversion":"1.0","id":"e-1","source":"s","type":"t","data":{"c":1}}"#,
        ] {
            let input = message_to_input(&Incoming::v311("sensors/p1", body.as_bytes(), 1)).unwrap();
            assert_eq!(input.id.as_deref(), Some("e-1"), "{body}");
            assert_eq!(input.ty.as_deref(), Some("t"), "{body}");
            assert_eq!(input.topic, "sensors/p1", "the subject defaults to the topic");
        }
    }

    #[test]
    fn a_plain_message_dedups_with_its_delivery_batch_and_a_cloudevent_by_its_own_id() {
        let mut m = Incoming::v311("sensors/p1", br#"{"t":21.5}"#, 7);
        let first = delivery_input(&m, 5).unwrap();
        assert_eq!(first.dedup, Some(Dedup::Delivery { batch: 5, redelivered: false }));
        assert_eq!(first.id, message_to_input(&m).unwrap().id);
        m.dup = true;
        assert_eq!(delivery_input(&m, 6).unwrap().dedup, Some(Dedup::Delivery { batch: 6, redelivered: true }));

        let body = r#"{"specversion":"1.0","id":"e-1","source":"s","type":"t","data":{"c":1}}"#;
        let ce = delivery_input(&Incoming::v311("sensors/p1", body.as_bytes(), 1), 5).unwrap();
        assert_eq!((ce.id.as_deref(), ce.dedup), (Some("e-1"), Some(Dedup::Producer)));
    }

    #[test]
    fn only_payloads_that_could_spell_the_key_are_parsed_as_cloudevents() {
        assert!(!might_hold_specversion(br#"{"p":1,"x":"spec version"}"#));
        assert!(might_hold_specversion(br#"{"specversion":"1.0"}"#));
        assert!(might_hold_specversion(br#"{"\u0073pecversion":"1.0"}"#));
        assert!(!might_hold_specversion(b""));
    }
}
