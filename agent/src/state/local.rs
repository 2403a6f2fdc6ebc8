//! Publishes merged state to a broker on the device, retained, so local
//! applications read the converged value with a plain MQTT subscription.
//!
//! On every connection it first publishes the whole state (a broker may
//! have lost its retained store), then each change as it commits. Topic:
//! `{topic_prefix}{key}`; payload: the value; on MQTT 5 the version rides
//! as user properties (see [`super::wire`]). Best effort by design: the
//! state table is the source of truth and a reconnect republishes it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, watch};

use super::service::{LIST_LIMIT, StateHandle};
use super::wire;
use crate::config::LocalStateMqtt;
use crate::forward::backoff::Backoff;
use crate::forward::link::{Link, LinkError, LinkEvent, LinkOptions};

/// Runs until `shutdown`.
pub async fn run(
    config: LocalStateMqtt,
    tls: Option<Arc<rustls::ClientConfig>>,
    state: StateHandle,
    mut shutdown: watch::Receiver<bool>,
) {
    let opts = LinkOptions { inflight: 64, queue: 256, clean_session: true, manual_acks: false, receive_maximum: None };
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        let mut link = Link::open(&config.endpoint, tls.as_ref(), &opts);
        let mut changes = state.subscribe();
        let result = tokio::select! {
            r = session(&config, &mut link, &state, &mut changes, &mut backoff) => r,
            _ = shutdown.changed() => return,
        };
        let delay = backoff.next_delay(&mut rand::rng());
        tracing::warn!(url = %config.endpoint.url(), error = %result.err().map(|e| e.to_string()).unwrap_or_default(), retry_in = ?delay, "local state broker link down");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn session(
    config: &LocalStateMqtt,
    link: &mut Link,
    state: &StateHandle,
    changes: &mut broadcast::Receiver<(u64, super::Change)>,
    backoff: &mut Backoff,
) -> Result<(), LinkError> {
    loop {
        if let LinkEvent::Connected { .. } = link.poll().await? {
            break;
        }
    }
    backoff.reset();
    let publish = |link: &Link, key: &str, e: &super::Entry| {
        link.publish(
            format!("{}{key}", config.topic_prefix),
            e.data.clone(),
            e.content_type.clone(),
            wire::attributes(&e.version),
            true,
        )
    };
    let snapshot = state.list(String::new()).await.map_err(|e| LinkError::Connection(e.to_string()))?;
    if snapshot.len() >= LIST_LIMIT {
        tracing::warn!(limit = LIST_LIMIT, "local state snapshot truncated");
    }
    let mut snapshot: std::collections::VecDeque<_> = snapshot.into();
    loop {
        // Feed the snapshot at the pace the client queue allows.
        while let Some((k, e)) = snapshot.front() {
            match publish(link, k, e) {
                Ok(()) => {
                    snapshot.pop_front();
                }
                Err(LinkError::QueueFull) => break,
                Err(err) => return Err(err),
            }
        }
        tokio::select! {
            ev = link.poll() => { ev?; }
            change = changes.recv() => match change {
                Ok((_, c)) => {
                    publish(link, &c.key, &c.entry)?;
                }
                // Fell behind: reconnect republishes everything.
                Err(_) => return Err(LinkError::Connection("fell behind the change feed".into())),
            },
        }
    }
}
