//! Answers that wait for the clouds: until enough of the destinations that
//! route each event have acknowledged it (the ack levels `any`, `quorum`,
//! `all`), as HTTP ingest answers and local MQTT ingest's receipts do.
//!
//! It follows each forwarder's acknowledged sequence in memory, so it never
//! waits for a cursor commit, and it reads the store only to learn who
//! routes each event and, at the end, to leave out a destination that
//! dead-lettered it: only a PUBACK counts.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::AckLevel;
use crate::store::{DeliveryState, Store, judge};

/// Waits for acknowledgments. Cheap to clone.
#[derive(Clone)]
pub struct AckWaiter {
    store: Store,
    /// Each destination's acknowledged sequence
    /// ([`crate::forward::Forwarder::acked`]).
    destinations: Arc<[(String, watch::Receiver<u64>)]>,
    /// Turns true at shutdown: waiting answers go at once.
    stopping: watch::Receiver<bool>,
}

impl AckWaiter {
    /// Waits on `destinations`' acknowledged sequences until `stopping` turns true.
    pub fn new(
        store: Store,
        destinations: Vec<(String, watch::Receiver<u64>)>,
        stopping: watch::Receiver<bool>,
    ) -> Self {
        Self { store, destinations: destinations.into(), stopping }
    }

    /// Waits until each of `sequences` is acknowledged by as many of the
    /// destinations that route it as `level` needs, or `timeout` passes, or
    /// the agent stops. Returns, per event, the destinations whose broker
    /// acknowledged it, and whether every event reached the level.
    pub async fn wait(&self, level: AckLevel, sequences: &[u64], timeout: Duration) -> (Vec<Vec<String>>, bool) {
        let deadline = tokio::time::Instant::now() + timeout;
        let store = self.store.clone();
        let mut watches: Vec<(String, watch::Receiver<u64>)> = self.destinations.to_vec();
        let read = {
            let (store, sequences) = (store.clone(), sequences.to_vec());
            move || store.found(&sequences)
        };
        // Who routes each event: asked once; a destination's cursor says the rest.
        let Ok(Ok(found)) = tokio::task::spawn_blocking(read.clone()).await else {
            return (vec![Vec::new(); sequences.len()], false);
        };
        let consumers = store.consumers();
        let routed: Vec<Vec<usize>> = found
            .iter()
            .map(|f| match f {
                Some(f) => {
                    (0..consumers.len()).filter(|&c| judge(f, &consumers[c], 0) != DeliveryState::NotRouted).collect()
                }
                None => Vec::new(),
            })
            .collect();
        if watches.is_empty() {
            // No destination: nothing routes anything, and `stored` is all there is.
            return (vec![Vec::new(); sequences.len()], true);
        }
        let need: Vec<usize> = routed.iter().map(|r| level.needed(r.len())).collect();
        // The routing destinations that may still acknowledge each event: one
        // that dead-lettered it never will, so it is dropped once seen.
        let mut candidates = routed.clone();
        let cursor_of =
            |name: &str, cursors: &[(String, u64)]| cursors.iter().find(|(n, _)| n == name).map_or(0, |c| c.1);
        loop {
            let cursors: Vec<(String, u64)> =
                watches.iter_mut().map(|(n, w)| (n.clone(), *w.borrow_and_update())).collect();
            let passed = |candidates: &[Vec<usize>], i: usize| -> Vec<usize> {
                candidates[i]
                    .iter()
                    .copied()
                    .filter(|&c| cursor_of(&consumers[c].name, &cursors) >= sequences[i])
                    .collect()
            };
            let enough = (0..sequences.len()).all(|i| passed(&candidates, i).len() >= need[i]);
            let out_of_time = tokio::time::Instant::now() >= deadline;
            if enough || out_of_time {
                // A cursor also passes what it dead-letters: only a PUBACK counts.
                let found = match tokio::task::spawn_blocking(read.clone()).await {
                    Ok(Ok(f)) => f,
                    _ => return (vec![Vec::new(); sequences.len()], false),
                };
                let mut acked_by: Vec<Vec<String>> = vec![Vec::new(); sequences.len()];
                for i in 0..sequences.len() {
                    let Some(f) = &found[i] else { continue };
                    for c in passed(&candidates, i) {
                        match judge(f, &consumers[c], sequences[i]) {
                            DeliveryState::Delivered | DeliveryState::Settled => {
                                acked_by[i].push(consumers[c].name.clone())
                            }
                            _ => candidates[i].retain(|&k| k != c),
                        }
                    }
                }
                let met = (0..sequences.len()).all(|i| acked_by[i].len() >= need[i]);
                // Out of time, or too few left that could still acknowledge: answer now.
                let hopeless = (0..sequences.len()).any(|i| candidates[i].len() < need[i]);
                if met || out_of_time || hopeless {
                    return (acked_by, met);
                }
            }
            let changed = futures::future::select_all(watches.iter_mut().map(|(_, w)| Box::pin(w.changed())));
            let mut stopping = self.stopping.clone();
            tokio::select! {
                r = tokio::time::timeout_at(deadline, changed) => {
                    // A forwarder stopped: the agent is shutting down.
                    if matches!(r, Ok((Err(_), _, _))) {
                        return (routed.iter().map(|_| Vec::new()).collect(), false);
                    }
                }
                // Shutdown: answer now with what is known.
                _ = stopping.wait_for(|s| *s) => return (routed.iter().map(|_| Vec::new()).collect(), false),
            }
        }
    }
}
