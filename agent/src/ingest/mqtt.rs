//! Local MQTT ingest: subscribe to topic filters on a broker on the device
//! and store what arrives, acknowledging each message only after its commit.
//!
//! The session is persistent (clean session off, manual acks), so a message
//! received but not yet committed when the agent dies is redelivered by the
//! broker. Its event id is derived from the message itself, so a message
//! committed but not yet acknowledged at the crash is recognised as a
//! duplicate when it comes again; once acknowledged, its id is forgotten so a
//! later identical message is a new event.

use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::parse::{self, BadInput, InputEvent};
use super::{Ingest, IngestError};
use crate::config::MqttIngestConfig;
use crate::forward::backoff::Backoff;
use crate::forward::link::{Incoming, Link, LinkError, LinkEvent, LinkOptions};
use crate::store::AppendError;

/// Messages committed together at most.
const BATCH: usize = 512;

/// How long a partial batch waits for more messages.
const GATHER: Duration = Duration::from_millis(5);

/// The local MQTT ingest task.
pub struct MqttIngest {
    config: MqttIngestConfig,
    tls: Option<Arc<rustls::ClientConfig>>,
    ingest: Ingest,
    shutdown: watch::Receiver<bool>,
}

impl MqttIngest {
    /// Prepares the task; [`MqttIngest::run`] runs it until shutdown.
    pub fn new(
        config: MqttIngestConfig,
        tls: Option<Arc<rustls::ClientConfig>>,
        ingest: Ingest,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self { config, tls, ingest, shutdown }
    }

    /// Connects, subscribes and ingests until shutdown, reconnecting with backoff.
    pub async fn run(mut self) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        let opts = LinkOptions { inflight: 16, queue: BATCH * 2, clean_session: false, manual_acks: true };
        while !*self.shutdown.borrow() {
            let mut link = Link::open(&self.config.endpoint, self.tls.as_ref(), &opts);
            match self.session(&mut link, &mut backoff).await {
                Ok(()) => break,
                Err(e) => {
                    let delay = backoff.next_delay(&mut rand::rng());
                    tracing::warn!(url = %self.config.endpoint.url(), error = %e, retry_in = ?delay, "local MQTT ingest link down");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.shutdown.changed() => {}
                    }
                }
            }
        }
    }

    async fn session(&mut self, link: &mut Link, backoff: &mut Backoff) -> Result<(), LinkError> {
        loop {
            tokio::select! {
                event = link.poll() => if let LinkEvent::Connected { .. } = event? { break },
                _ = self.shutdown.changed() => return Ok(()),
            }
        }
        backoff.reset();
        for filter in &self.config.topics {
            link.subscribe(filter.as_str())?;
        }
        tracing::info!(url = %self.config.endpoint.url(), topics = ?self.config.topics, "local MQTT ingest subscribed");
        let mut pending: Vec<Incoming> = Vec::new();
        let mut deadline = tokio::time::Instant::now();
        loop {
            tokio::select! {
                event = link.poll() => {
                    if let LinkEvent::Message(m) = event? {
                        if pending.is_empty() {
                            deadline = tokio::time::Instant::now() + GATHER;
                        }
                        pending.push(*m);
                    }
                }
                _ = tokio::time::sleep_until(deadline), if !pending.is_empty() => {}
                _ = self.shutdown.changed() => return Ok(()),
            }
            if !pending.is_empty() && (pending.len() >= BATCH || tokio::time::Instant::now() >= deadline) {
                self.commit(link, &mut pending).await?;
            }
        }
    }

    /// Stores a batch, then acknowledges it. A full store leaves the batch
    /// unacknowledged and retries, so the local broker holds the messages.
    async fn commit(&mut self, link: &mut Link, pending: &mut Vec<Incoming>) -> Result<(), LinkError> {
        let mut inputs = Vec::with_capacity(pending.len());
        let mut valid = Vec::with_capacity(pending.len());
        for m in pending.drain(..) {
            match message_to_input(&m) {
                Ok(input) => {
                    inputs.push(input);
                    valid.push(m);
                }
                Err(e) => {
                    // Nothing can be answered over MQTT: log, and ack so it is not redelivered forever.
                    tracing::warn!(topic = %m.topic, error = %e, "local MQTT message refused");
                    link.ack(&m)?;
                }
            }
        }
        if inputs.is_empty() {
            return Ok(());
        }
        loop {
            match self.ingest.submit(inputs.clone()).await {
                Ok(appended) => {
                    for m in &valid {
                        link.ack(m)?;
                    }
                    let ids = appended.into_iter().map(|a| a.id).collect();
                    if let Err(e) = self.ingest.store().forget_ids(ids).await {
                        tracing::warn!(error = %e, "could not forget acknowledged MQTT message ids");
                    }
                    return Ok(());
                }
                Err(IngestError::Store(
                    AppendError::Full { retry_after, .. } | AppendError::DiskFull { retry_after, .. },
                )) => {
                    tracing::warn!(retry_in = ?retry_after, "store full: local MQTT messages wait at the broker");
                    tokio::select! {
                        _ = tokio::time::sleep(retry_after) => {}
                        _ = self.shutdown.changed() => return Ok(()),
                    }
                }
                Err(IngestError::Store(AppendError::Closed)) => return Ok(()),
                Err(e) => {
                    // Storage failure: leave the batch unacknowledged; the broker redelivers it.
                    return Err(LinkError::Connection(format!("storing local MQTT messages failed: {e}")));
                }
            }
        }
    }
}

/// Turns a message into an event: CloudEvents binary mode (MQTT 5 user
/// properties with `specversion`), structured mode (a JSON payload with
/// `specversion`), or plain data on the message's topic.
pub fn message_to_input(m: &Incoming) -> Result<InputEvent, BadInput> {
    let mut input = if m.user_properties.iter().any(|(k, _)| k == "specversion") {
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
        }
    };
    if input.id.is_none() {
        input.id = Some(derived_id(m));
    }
    Ok(input)
}

fn structured_cloudevent(m: &Incoming) -> Option<Result<InputEvent, BadInput>> {
    let declared = m.content_type.as_deref().is_some_and(|c| c.starts_with("application/cloudevents+json"));
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

/// An id the same message gets again when the broker redelivers it: topic,
/// payload and packet id (a redelivery keeps its packet id).
fn derived_id(m: &Incoming) -> String {
    let mut h = Sha256::new();
    h.update(m.topic.as_bytes());
    h.update([0]);
    h.update(m.pkid.to_be_bytes());
    h.update(&m.payload);
    let digest = h.finalize();
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("mqtt-{hex}")
}
