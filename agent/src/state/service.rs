//! The state service: one task that applies every state update in turn —
//! from clouds (downlink deliveries) and from local writers — and keeps the
//! clouds reconciled.
//!
//! For each update it finds the version (carried, or given at receipt),
//! asks [`super::version::decide`] what it does, merges concurrent versions
//! (the key's merge plugin, else last-writer-wins), and commits the result
//! with its upstream marks in one transaction before it acks the delivery
//! or answers the writer. Reconciliation then turns each mark into a state
//! event in the log routed to that one destination, so the forwarder
//! publishes it (retained, Ferry-versioned) at least once, after outages
//! and restarts too. A cloud known to hold a version is never sent it
//! again, which is what stops echo loops between clouds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use super::db::{Change, Commit, DbError, Entry, Peer, StateDb};
use super::version::{self, Decision, Version, VersionVector};
use super::wire::{self, Update};
use crate::clock::{self, Hlc, HlcState, SharedClock};
use crate::config::{DestinationConfig, StateConfig};
use crate::downlink::{Delivery, DeliveryReceiver};
use crate::event::{EventBody, ROUTE_EXTENSION};
use crate::plugin::{PluginHandle, Versioned, chain};
use crate::store::{AppendError, Dedup, PreparedEvent, Store};

/// CloudEvents type of the state events Ferry publishes upstream.
pub const STATE_EVENT_TYPE: &str = "ferry.state";

/// How often failed upstream sends (store full, closed) are retried.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// Largest number of entries one listing returns.
pub const LIST_LIMIT: usize = 10_000;

/// Why a state operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// The state tables failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// The key is not a valid topic name.
    #[error("invalid state key `{key}`: {reason}")]
    InvalidKey {
        /// The key as given.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// The service has stopped.
    #[error("state service is shut down")]
    Closed,
}

/// Counters and the latest problems, for status.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StateStatus {
    /// Updates received from clouds.
    pub received: u64,
    /// Local writes.
    pub local_writes: u64,
    /// Updates that replaced the value (no conflict).
    pub replaced: u64,
    /// Concurrent updates merged.
    pub merged: u64,
    /// Updates already held (same version, or a plain value repeated).
    pub duplicates: u64,
    /// Updates older than the value held.
    pub dominated: u64,
    /// Messages refused as malformed (bad version attributes, bad key).
    pub rejected: u64,
    /// Merges whose plugin failed; the plugin's `on_error` applied.
    pub merge_failures: u64,
    /// The latest merge failure.
    pub last_merge_error: Option<String>,
    /// State events queued for clouds.
    pub sent_upstream: u64,
    /// (destination, key) pairs waiting to be queued for a cloud.
    pub pending_upstream: u64,
    /// The latest change number.
    pub last_change: u64,
}

/// A local write, answered once committed.
struct Put {
    key: String,
    data: Vec<u8>,
    content_type: Option<String>,
    reply: oneshot::Sender<Result<Entry, StateError>>,
}

/// Handle to the state service: reads go straight to the tables, writes
/// queue to the service task.
#[derive(Clone)]
pub struct StateHandle {
    db: StateDb,
    puts: mpsc::Sender<Put>,
    changes: broadcast::Sender<(u64, Change)>,
    status: Arc<Mutex<StateStatus>>,
}

impl StateHandle {
    /// The merged value of `key`.
    pub async fn get(&self, key: String) -> Result<Option<Entry>, StateError> {
        let db = self.db.clone();
        Ok(blocking(move || db.get(&key)).await?)
    }

    /// Merged values of keys starting with `prefix`, in key order.
    pub async fn list(&self, prefix: String) -> Result<Vec<(String, Entry)>, StateError> {
        let db = self.db.clone();
        Ok(blocking(move || db.list(&prefix, LIST_LIMIT)).await?)
    }

    /// Changes after `after` still in the history, and the oldest kept.
    pub async fn changes_after(&self, after: u64, limit: usize) -> Result<super::db::ChangePage, StateError> {
        let db = self.db.clone();
        Ok(blocking(move || db.changes_after(after, limit)).await?)
    }

    /// New changes as they commit.
    pub fn subscribe(&self) -> broadcast::Receiver<(u64, Change)> {
        self.changes.subscribe()
    }

    /// Writes `key` locally: the value gets this device's version entry,
    /// replaces the merged value and goes to every cloud subscribing to it.
    pub async fn put(&self, key: String, data: Vec<u8>, content_type: Option<String>) -> Result<Entry, StateError> {
        if let Err(e) = crate::topic::validate_name(&key) {
            return Err(StateError::InvalidKey { key, reason: e.to_string() });
        }
        let (reply, rx) = oneshot::channel();
        self.puts.send(Put { key, data, content_type, reply }).await.map_err(|_| StateError::Closed)?;
        rx.await.map_err(|_| StateError::Closed)?
    }

    /// Counters and the latest problems.
    pub fn status(&self) -> StateStatus {
        self.status.lock().expect("state status lock").clone()
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, DbError> + Send + 'static) -> Result<T, DbError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| DbError::from_task(&e))?
}

impl DbError {
    fn from_task(e: &tokio::task::JoinError) -> Self {
        Self::new(format!("state task failed: {e}"))
    }
}

/// Everything the service needs, gathered by the runtime.
pub struct StateServiceConfig {
    /// This device's id: the origin of local writes.
    pub device_id: String,
    /// The destinations (their subscriptions decide who gets which key).
    pub destinations: Vec<DestinationConfig>,
    /// `[[merge]]` and `[state]`.
    pub state: StateConfig,
    /// Loaded merge plugins by name.
    pub merge_plugins: HashMap<String, PluginHandle>,
    /// Local writes that may wait before writers feel backpressure.
    pub queue_depth: usize,
}

/// The running service.
pub struct StateService {
    handle: StateHandle,
    task: tokio::task::JoinHandle<()>,
}

impl StateService {
    /// Opens the state tables in `store`'s database and starts the task,
    /// which reads cloud updates from `deliveries` until `shutdown`.
    pub async fn start(
        config: StateServiceConfig,
        store: Store,
        clock: SharedClock,
        deliveries: DeliveryReceiver,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Self, StateError> {
        let database = store.database();
        let db = blocking(move || StateDb::open(database)).await?;
        let (hlc_mark, last_change) = {
            let db = db.clone();
            blocking(move || db.meta()).await?
        };
        let store_hlc = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || store.hlc_high_water())
                .await
                .map_err(|e| DbError::from_task(&e))?
                .map_err(|e| DbError::new(e.to_string()))?
        };
        let (puts, puts_rx) = mpsc::channel(config.queue_depth.max(1));
        let (changes, _) = broadcast::channel(1024);
        let status = Arc::new(Mutex::new(StateStatus { last_change, ..StateStatus::default() }));
        let handle = StateHandle { db: db.clone(), puts, changes: changes.clone(), status: status.clone() };
        let task = Task {
            hlc: HlcState::resume(Hlc(hlc_mark.max(store_hlc.0))),
            source: format!("ferry://{}", config.device_id),
            config,
            db,
            store,
            clock,
            changes,
            status,
        };
        let task = tokio::spawn(task.run(deliveries, puts_rx, shutdown));
        Ok(Self { handle, task })
    }

    /// A handle for reads and local writes.
    pub fn handle(&self) -> StateHandle {
        self.handle.clone()
    }

    /// Waits for the task to stop (after shutdown was signalled).
    pub async fn join(self) {
        let _ = self.task.await;
    }
}

struct Task {
    config: StateServiceConfig,
    db: StateDb,
    store: Store,
    clock: SharedClock,
    hlc: HlcState,
    source: String,
    changes: broadcast::Sender<(u64, Change)>,
    status: Arc<Mutex<StateStatus>>,
}

/// Where an update came from.
enum From<'a> {
    Cloud(&'a str),
    Local,
}

fn digest(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

impl Task {
    async fn run(
        mut self,
        mut deliveries: DeliveryReceiver,
        mut puts: mpsc::Receiver<Put>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        // Marks left by an earlier run (crash, or the store was full) first.
        self.reconcile().await;
        let mut retry = tokio::time::interval(RETRY_INTERVAL);
        loop {
            tokio::select! {
                Some(d) = deliveries.recv() => self.delivery(d).await,
                Some(p) = puts.recv() => {
                    let result = self.local(&p.key, p.data, p.content_type).await;
                    let _ = p.reply.send(result);
                }
                _ = retry.tick() => {
                    if self.status(|s| s.pending_upstream) > 0 {
                        self.reconcile().await;
                    }
                }
                _ = shutdown.changed() => break,
            }
        }
        tracing::debug!("state service stopped");
    }

    fn status<T>(&self, f: impl FnOnce(&mut StateStatus) -> T) -> T {
        f(&mut self.status.lock().expect("state status lock"))
    }

    /// One cloud message. Acked once handled for good: applied, or refused
    /// as malformed. A storage failure leaves it unacked (it comes again).
    async fn delivery(&mut self, d: Delivery) {
        let m = &d.message;
        let dest = m.destination.to_string();
        let Some(key) = m.key.clone().filter(|k| crate::topic::validate_name(k).is_ok()) else {
            tracing::warn!(destination = %dest, topic = %m.topic, "state update outside the destination's topic prefix; ignored");
            self.status(|s| s.rejected += 1);
            d.ack();
            return;
        };
        let update = match wire::decode(&m.payload, &m.user_properties, m.content_type.as_deref()) {
            Ok(u) => u,
            Err(reason) => {
                tracing::warn!(destination = %dest, %key, %reason, "malformed state update refused");
                self.status(|s| s.rejected += 1);
                d.ack();
                return;
            }
        };
        self.status(|s| s.received += 1);
        match self.apply(&key, update, From::Cloud(&dest)).await {
            Ok(_) => d.ack(),
            Err(e) => {
                tracing::error!(destination = %dest, %key, error = %e, "state update not applied; it will come again")
            }
        }
    }

    async fn local(&mut self, key: &str, data: Vec<u8>, content_type: Option<String>) -> Result<Entry, StateError> {
        self.status(|s| s.local_writes += 1);
        let content_type = content_type.or_else(|| {
            serde_json::from_slice::<serde_json::Value>(&data)
                .is_ok()
                .then(|| crate::event::JSON_CONTENT_TYPE.to_owned())
        });
        let entry = self.apply(key, Update { data, content_type, version: None }, From::Local).await?;
        Ok(entry.expect("a local write always changes the value"))
    }

    /// Applies one update; returns the new entry if the value changed.
    async fn apply(&mut self, key: &str, update: Update, from: From<'_>) -> Result<Option<Entry>, StateError> {
        let (k, db) = (key.to_owned(), self.db.clone());
        let current = blocking(move || db.get(&k)).await?;
        let cloud = match from {
            From::Cloud(d) => Some(d.to_owned()),
            From::Local => None,
        };
        let held_by_cloud = match &cloud {
            Some(d) => {
                let (d, k, db) = (d.clone(), key.to_owned(), self.db.clone());
                blocking(move || db.peer(&d, &k)).await?
            }
            None => None,
        };
        let data_digest = digest(&update.data);
        let now = self.clock.now_millis();
        let incoming = match (update.version, &cloud) {
            (Some(v), _) => {
                self.hlc.observe(Hlc(v.hlc), now);
                v
            }
            (None, Some(dest)) => {
                // A plain value: the cloud's application wrote it over what
                // that cloud held. The same bytes again (a retained message
                // redelivered) are not a new write.
                if held_by_cloud.as_ref().is_some_and(|p| p.digest == data_digest) {
                    self.status(|s| s.duplicates += 1);
                    return Ok(None);
                }
                // It has surely seen what that cloud sent us last; whether it
                // saw what we sent there is unknown, so that counts as
                // concurrent (a merge keeps both sides' effects).
                let seen = held_by_cloud.as_ref().and_then(|p| p.received.clone()).unwrap_or_default();
                let mut floor = current.as_ref().map(|c| c.version.vv.clone()).unwrap_or_default();
                if let Some(p) = &held_by_cloud {
                    floor.join(&p.version.vv);
                }
                version::new_write(&seen, &floor, dest, self.hlc.tick(now).0)
            }
            (None, None) => {
                let seen = current.as_ref().map(|c| c.version.vv.clone()).unwrap_or_default();
                version::new_write(&seen, &VersionVector::new(), &self.config.device_id, self.hlc.tick(now).0)
            }
        };
        // What the sending cloud holds now, whatever happens to the value.
        let mut peers: Vec<(String, Peer)> = cloud
            .iter()
            .map(|d| {
                (
                    d.clone(),
                    Peer { version: incoming.clone(), digest: data_digest, received: Some(incoming.vv.clone()) },
                )
            })
            .collect();
        let new_value = match version::decide(current.as_ref().map(|c| &c.version), &incoming) {
            Decision::Duplicate => {
                self.status(|s| s.duplicates += 1);
                None
            }
            Decision::Dominated => {
                self.status(|s| s.dominated += 1);
                None
            }
            Decision::Replace => {
                self.status(|s| s.replaced += 1);
                Some((update.data, update.content_type, incoming.clone()))
            }
            Decision::Merge(merged) => {
                let current = current.as_ref().expect("merging needs a current value");
                self.merge(key, current, &incoming, update.data, update.content_type, merged).await
            }
        };
        // Which clouds need the new value: those subscribing to the key that
        // are not known to hold exactly it.
        let mut dirty = Vec::new();
        if let Some((_, _, v)) = &new_value {
            for d in self.config.destinations.iter().filter(|d| d.subscribes(key)) {
                let holds = match peers.iter().find(|(name, _)| *name == d.name) {
                    Some((_, p)) => Some(p.version.clone()),
                    None => {
                        let (dn, k, db) = (d.name.clone(), key.to_owned(), self.db.clone());
                        blocking(move || db.peer(&dn, &k)).await?.map(|p| p.version)
                    }
                };
                if holds.as_ref() != Some(v) {
                    dirty.push(d.name.clone());
                }
            }
        }
        if new_value.is_none()
            && held_by_cloud.as_ref().map(|p| (&p.version, p.received.as_ref()))
                == Some((&incoming, Some(&incoming.vv)))
        {
            peers.clear(); // nothing to record
        }
        if new_value.is_none() && peers.is_empty() {
            return Ok(None);
        }
        let commit =
            Commit { key: key.to_owned(), entry: new_value, peers, dirty: dirty.clone(), hlc: self.hlc.high_water().0 };
        let db = self.db.clone();
        let written = blocking(move || db.commit(&commit)).await?;
        if let Some(entry) = &written {
            self.status(|s| {
                s.last_change = entry.change;
                s.pending_upstream += dirty.len() as u64;
            });
            let _ = self.changes.send((entry.change, Change { key: key.to_owned(), entry: entry.clone() }));
            for d in dirty {
                // A failure stays marked; the retry tick sends it.
                self.send_upstream(&d, key).await;
            }
        }
        Ok(written)
    }

    /// Merges two concurrent versions into `merged`'s version; `None`
    /// keeps the current value (the plugin failed and its policy says so).
    async fn merge(
        &mut self,
        key: &str,
        current: &Entry,
        incoming: &Version,
        data: Vec<u8>,
        content_type: Option<String>,
        merged: Version,
    ) -> Option<(Vec<u8>, Option<String>, Version)> {
        let incoming_wins = incoming.wins_over(&current.version);
        let lww = |data: Vec<u8>, content_type: Option<String>| {
            if incoming_wins { (data, content_type) } else { (current.data.clone(), current.content_type.clone()) }
        };
        let Some(name) = self.config.state.merge_plugin(key) else {
            self.status(|s| s.merged += 1);
            let (d, ct) = lww(data, content_type);
            return Some((d, ct, merged));
        };
        let Some(plugin) = self.config.merge_plugins.get(name).cloned() else {
            unreachable!("config validation ties every [[merge]] to a loaded merge plugin")
        };
        let as_wit = |data: &[u8], v: &Version| Versioned {
            data: data.to_vec(),
            version: v.vv.entries().map(|(o, n)| (o.to_owned(), n)).collect(),
            hlc: v.hlc,
            origin: v.origin.clone(),
        };
        let call =
            plugin.merge(key.to_owned(), Some(as_wit(&current.data, &current.version)), as_wit(&data, incoming)).await;
        let failure = match call {
            Ok(Ok(merged_data)) => {
                self.status(|s| s.merged += 1);
                let ct = if incoming_wins { content_type } else { current.content_type.clone() };
                return Some((merged_data, ct, merged));
            }
            Ok(Err(refusal)) => format!("merge plugin `{name}` refused key `{key}`: {refusal}"),
            Err(e) => format!("merge plugin `{name}` failed on key `{key}`: {e}"),
        };
        self.status(|s| {
            s.merge_failures += 1;
            s.last_merge_error = Some(failure.clone());
        });
        let (this, unmerged, unmerged_type) = (&*self, &data, &content_type);
        let dead_letter = move |_, reason| async move {
            let body = this.state_event(key, unmerged, unmerged_type.clone(), incoming, None);
            let (priority, expires) = this.classify(key);
            let prepared = PreparedEvent::new(&body, Dedup::None, priority, expires);
            if let Err(e) = this.store.dead_letter_new(vec![prepared], reason).await {
                tracing::error!(%key, error = %e, "could not dead-letter the unmerged state update");
            }
            Ok::<(), std::convert::Infallible>(())
        };
        // The call had one item, this update: `pass` hands it back.
        let Ok(passed) = chain::on_failure(&plugin, vec![()], failure, dead_letter).await;
        if passed.is_empty() {
            return None;
        }
        // `pass`: the update still takes part, under the default rule.
        self.status(|s| s.merged += 1);
        let (d, ct) = lww(data, content_type);
        Some((d, ct, merged))
    }

    fn classify(&self, key: &str) -> (u8, Option<u64>) {
        let (priority, ttl) = self.store.config().classify(key);
        let now = self.clock.now_millis();
        (priority, ttl.map(|t| now.saturating_add(u64::try_from(t.as_millis()).unwrap_or(u64::MAX))))
    }

    /// The event that carries a state value to `destination` (or, without
    /// one, to the dead letters).
    fn state_event(
        &self,
        key: &str,
        data: &[u8],
        content_type: Option<String>,
        version: &Version,
        destination: Option<&str>,
    ) -> EventBody {
        let mut extensions = wire::attributes(version);
        if let Some(d) = destination {
            extensions.push((ROUTE_EXTENSION.to_owned(), d.to_owned()));
        }
        EventBody {
            id: clock::new_event_id(self.clock.as_ref()),
            source: self.source.clone(),
            ty: STATE_EVENT_TYPE.to_owned(),
            subject: key.to_owned(),
            time_nanos: self.clock.now_nanos(),
            datacontenttype: content_type,
            data: data.to_vec(),
            partitionkey: None,
            extensions,
        }
    }

    /// Queues the current value of `key` for `destination` through the
    /// event log, unless that cloud already holds it. A failure leaves the
    /// mark for the retry tick and returns false.
    async fn send_upstream(&mut self, destination: &str, key: &str) -> bool {
        let (d, k, db) = (destination.to_owned(), key.to_owned(), self.db.clone());
        let read = blocking(move || Ok((db.get(&k)?, db.peer(&d, &k)?))).await;
        let (entry, held) = match read {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(%destination, %key, error = %e, "cannot read state for upstream; will retry");
                return false;
            }
        };
        let done = |this: &Self| this.status(|s| s.pending_upstream = s.pending_upstream.saturating_sub(1));
        let Some(entry) = entry.filter(|e| held.as_ref().is_none_or(|p| p.version != e.version)) else {
            let (d, k, db) = (destination.to_owned(), key.to_owned(), self.db.clone());
            let cleaned = blocking(move || db.clean(&d, &k)).await.is_ok();
            if cleaned {
                done(self);
            }
            return cleaned;
        };
        let body = self.state_event(key, &entry.data, entry.content_type.clone(), &entry.version, Some(destination));
        let (priority, expires) = self.classify(key);
        match self.store.append(vec![PreparedEvent::new(&body, Dedup::None, priority, expires)]).await {
            Ok(_) => {}
            Err(e @ (AppendError::Full { .. } | AppendError::DiskFull { .. } | AppendError::Closed)) => {
                tracing::warn!(%destination, %key, error = %e, "state update not queued for the cloud yet; will retry");
                return false;
            }
            Err(e) => {
                tracing::error!(%destination, %key, error = %e, "state update not queued for the cloud; will retry");
                return false;
            }
        }
        let peer = Peer {
            version: entry.version.clone(),
            digest: digest(&entry.data),
            received: held.and_then(|p| p.received),
        };
        let (d, k, db) = (destination.to_owned(), key.to_owned(), self.db.clone());
        match blocking(move || db.sent(&d, &k, &peer)).await {
            Ok(()) => {
                done(self);
                self.status(|s| s.sent_upstream += 1);
            }
            // The event is queued; a retry would only queue it again (harmless).
            Err(e) => tracing::warn!(%destination, %key, error = %e, "could not record the upstream send"),
        }
        true
    }

    /// Sends every pending mark.
    async fn reconcile(&mut self) {
        let db = self.db.clone();
        let marks = match blocking(move || db.dirty()).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read pending state sends");
                return;
            }
        };
        self.status(|s| s.pending_upstream = marks.len() as u64);
        for (destination, key) in marks {
            // The store refusing one (full) refuses the rest: try again next tick.
            if !self.send_upstream(&destination, &key).await {
                break;
            }
        }
    }
}
