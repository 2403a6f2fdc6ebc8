//! Publishes merged state to a broker on the device, retained, so local
//! applications read the converged value with a plain MQTT subscription.
//!
//! On every connection it first publishes the whole state (a broker may
//! have lost its retained store), then each change as it commits; if it
//! falls behind the changes, the whole state again. Topic:
//! `{topic_prefix}{key}`; payload: the value; on MQTT 5 the version rides
//! as user properties (see [`super::wire`]). Best effort by design: the
//! state table is the source of truth and a reconnect republishes it.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::watch;

use super::service::{LIST_LIMIT, StateHandle};
use super::wire;
use crate::config::{LocalStateMqtt, MqttEndpoint};
use crate::mqtt::session::{DEFAULT_BACKOFF, stopping};
use crate::mqtt::{Connected, End, Link, LinkError, LinkOptions, Session, Supervisor};

/// Runs until `shutdown`.
pub async fn run(
    config: LocalStateMqtt,
    tls: Option<Arc<rustls::ClientConfig>>,
    state: StateHandle,
    shutdown: watch::Receiver<bool>,
) {
    let opts = LinkOptions { inflight: 64, queue: 256, clean_session: true, manual_acks: false, receive_maximum: None };
    let supervisor = Supervisor::new("local state", tls, opts, DEFAULT_BACKOFF, shutdown.clone());
    supervisor.run(&mut Publisher { config, state, shutdown }).await;
}

struct Publisher {
    config: LocalStateMqtt,
    state: StateHandle,
    shutdown: watch::Receiver<bool>,
}

impl Publisher {
    /// Every key's value, to publish in full.
    async fn snapshot(&self) -> Result<VecDeque<(String, super::Entry)>, End> {
        let snapshot =
            self.state.list(String::new()).await.map_err(|e| End::Local(format!("reading the state table: {e}")))?;
        if snapshot.len() >= LIST_LIMIT {
            tracing::warn!(limit = LIST_LIMIT, "local state snapshot truncated");
        }
        Ok(snapshot.into())
    }

    fn publish(&self, link: &Link, key: &str, e: &super::Entry) -> Result<(), LinkError> {
        link.publish(
            format!("{}{key}", self.config.topic_prefix),
            e.data.clone(),
            e.content_type.clone(),
            wire::attributes(&e.version),
            true,
        )
    }
}

impl Session for Publisher {
    fn endpoint(&mut self) -> Result<MqttEndpoint, String> {
        Ok(self.config.endpoint.clone())
    }

    async fn run(&mut self, link: &mut Link, _: Connected) -> End {
        // Subscribed before the snapshot is read, so no change falls between them.
        let mut changes = self.state.subscribe();
        let mut snapshot = match self.snapshot().await {
            Ok(s) => s,
            Err(end) => return end,
        };
        loop {
            // Feed the snapshot at the pace the client queue allows.
            while let Some((k, e)) = snapshot.front() {
                match self.publish(link, k, e) {
                    Ok(()) => {
                        snapshot.pop_front();
                    }
                    Err(LinkError::QueueFull) => break,
                    Err(err) => return End::ours(err),
                }
            }
            tokio::select! {
                ev = link.poll() => if let Err(e) = ev { return e.into() },
                change = changes.recv() => match change {
                    Ok((_, c)) => if let Err(e) = self.publish(link, &c.key, &c.entry) { return End::ours(e) },
                    // Fell behind: publish everything again, on this connection.
                    Err(_) => {
                        changes = changes.resubscribe();
                        snapshot = match self.snapshot().await {
                            Ok(s) => s,
                            Err(end) => return end,
                        };
                    }
                },
                _ = stopping(&mut self.shutdown) => return End::Shutdown,
            }
        }
    }
}
