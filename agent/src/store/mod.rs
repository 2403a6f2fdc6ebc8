//! The durable event store: an append-only log in one redb file, with dedup,
//! a byte quota, priority eviction, TTL expiry, dead letters, the
//! per-destination cursors of the forwarders (which a replay moves back),
//! and delivered events kept for replay (`store.retain_delivered`).
//!
//! All writes go through one writer thread (`writer`) that group-commits
//! whatever requests are waiting into one transaction, so many producers share
//! one fsync. Reads open their own redb snapshots and never wait for the
//! writer. Nothing here knows about MQTT or HTTP.
//!
//! A failed write never ends the store: the writer reopens the file with
//! backoff until writes succeed again, refusing ingest meanwhile, and
//! [`Store::health`] says why (`health`). A record that no longer decodes
//! is moved to the dead letters rather than blocking its readers.
//! [`Store::receipt`] tells where one event stands at each destination
//! (`receipt`), from what the store keeps anyway.

#[cfg(any(test, feature = "fault-injection"))]
pub mod faults;
mod health;
pub mod inspect;
mod overlay;
#[cfg(any(test, feature = "fault-injection"))]
pub mod power_loss;
mod receipt;
mod tables;
#[cfg(test)]
mod tests;
mod writer;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};

use crate::clock::{Hlc, SharedClock};
use crate::config::StoreConfig;
use crate::event::{self, DecodeError, Event, EventBody};
use crate::histogram::Histogram;
pub use health::StoreHealth;
use health::{FileIdentity, Shared, guard};
pub use receipt::{DeliveryState, DestinationReceipt, EventRef, Found, Receipt, judge};
use writer::{Reopen, Reply, Request, Writer};

/// How long a producer refused for a full store is told to wait.
pub const FULL_RETRY_AFTER: Duration = Duration::from_secs(5);

/// An event ready for the writer: validated, classified and encoded by the
/// caller so the writer thread only assigns sequence and HLC.
#[derive(Debug, Clone)]
pub struct PreparedEvent {
    /// The event id.
    pub id: String,
    /// How a later event with the same id is recognised as a duplicate.
    pub dedup: Dedup,
    /// Eviction priority.
    pub priority: u8,
    /// Expiry time, if the event has a TTL.
    pub expires_at_ms: Option<u64>,
    /// The postcard-encoded [`EventBody`].
    pub body: Vec<u8>,
}

/// How the store recognises an event sent again: what it keeps of the id,
/// and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dedup {
    /// Ferry generated the id. No producer can send it again, so nothing is
    /// looked up or kept: that halves the writer's work per event.
    None,
    /// The producer chose the id: an event with the same id within the
    /// store's dedup window is a duplicate. Two index entries per event
    /// (the id, and its age for pruning).
    Producer,
    /// The id is derived from a broker's delivery, which the broker repeats,
    /// flagged as a redelivery, until it has the ack. The ids of one batch
    /// of deliveries are kept together in one record until
    /// [`Store::forget_deliveries`] (or the dedup window ends), and looked
    /// up only for a redelivery: one write per batch, not two per event.
    Delivery {
        /// The batch: a UUIDv7, so batches sort by age.
        batch: u128,
        /// Whether the broker flagged this delivery as a repeat.
        redelivered: bool,
    },
}

impl PreparedEvent {
    /// Encodes `body` for appending.
    pub fn new(body: &EventBody, dedup: Dedup, priority: u8, expires_at_ms: Option<u64>) -> Self {
        Self { id: body.id.clone(), dedup, priority, expires_at_ms, body: body.encode() }
    }

    /// Bytes the stored record will occupy (counted against the quota).
    pub fn record_len(&self) -> u64 {
        (event::HEADER_LEN + self.body.len()) as u64
    }
}

/// The outcome of one appended event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Appended {
    /// The event id.
    pub id: String,
    /// Its sequence number (the original one for a duplicate).
    pub sequence: u64,
    /// Whether the id was already stored inside the dedup window.
    pub duplicate: bool,
}

/// Why an append was refused. Refusals are all-or-nothing per request.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum AppendError {
    /// The quota leaves no room (policy `reject`, or `drop-oldest` with only
    /// higher-priority events left to evict).
    #[error("store is full: {needed} bytes needed, {free} free of the {quota}-byte quota")]
    Full {
        /// Bytes the request needs.
        needed: u64,
        /// Bytes free now.
        free: u64,
        /// The quota.
        quota: u64,
        /// When to try again.
        retry_after: Duration,
    },
    /// The disk holding the store has less free space than the configured
    /// reserve (`store.min_free_disk`), whatever the quota says.
    #[error("disk nearly full: {free} bytes free, below the {reserve}-byte reserve (store.min_free_disk)")]
    DiskFull {
        /// Free bytes on the store's file system.
        free: u64,
        /// The reserve.
        reserve: u64,
        /// When to try again.
        retry_after: Duration,
    },
    /// The request alone is larger than the whole quota.
    #[error("request needs {needed} bytes, more than the whole {quota}-byte store quota")]
    TooLarge {
        /// Bytes the request needs.
        needed: u64,
        /// The quota.
        quota: u64,
    },
    /// The storage layer failed; nothing of the request was stored.
    #[error("storage failure: {0}")]
    Storage(String),
    /// The store cannot write now (a failed write it is recovering from, or
    /// its file vanished); see [`StoreHealth`].
    #[error("{reason}")]
    Unavailable {
        /// Why, and whether the request may have been stored.
        reason: String,
        /// When to try again.
        retry_after: Duration,
    },
    /// The store is shutting down.
    #[error("store is closed")]
    Closed,
}

/// A store failure outside of appends.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database could not be opened or created.
    #[error("cannot open store {path}: {source}")]
    Open {
        /// The redb file.
        path: String,
        /// The cause.
        source: Box<redb::Error>,
    },
    /// A read or write failed.
    #[error("storage failure: {0}")]
    Storage(#[from] Box<redb::Error>),
    /// The file exists but cannot be a store; it is left as it is.
    #[error("refusing store {path}: {reason}")]
    Refused {
        /// The file.
        path: String,
        /// Why, and what to do.
        reason: String,
    },
    /// redb failed inside on a damaged file (it panicked).
    #[error(
        "store {path} is damaged ({detail}): run `ferry store verify --data {path}` to see what is \
         readable, then restore the file from a backup or move it aside to start a new store"
    )]
    Damaged {
        /// The file.
        path: String,
        /// What redb reported.
        detail: String,
    },
    /// The writer is recovering from a failed write and the file is closed.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A stored record failed to decode.
    #[error("record {sequence} is unreadable: {source}")]
    Corrupt {
        /// The log key.
        sequence: u64,
        /// The cause.
        source: DecodeError,
    },
    /// The store is shutting down.
    #[error("store is closed")]
    Closed,
}

fn storage(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Storage(Box::new(e.into()))
}

/// A dead letter: an event that left the log without being delivered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Its number in the dead-letter table.
    #[serde(skip)]
    pub number: u64,
    /// The event's sequence in the log; 0 for an event that never entered
    /// it (see [`Store::dead_letter_new`]).
    pub sequence: u64,
    /// Why it was dead-lettered.
    pub reason: String,
    /// When, in ms since the epoch.
    pub at_ms: u64,
    /// The stored record (see [`event::decode_record`]).
    pub record: Vec<u8>,
    /// The one destination that could not take it, when it was
    /// dead-lettered for a single destination; a replay goes there only.
    pub destination: Option<String>,
}

/// Dead-letter record format versions. Version 1 had no `destination`.
const DEAD_V1: u8 = 1;
const DEAD_V2: u8 = 2;

/// The version 1 dead-letter layout, still read.
#[derive(Deserialize)]
struct DeadLetterV1 {
    sequence: u64,
    reason: String,
    at_ms: u64,
    record: Vec<u8>,
}

impl DeadLetter {
    fn encode(&self) -> Vec<u8> {
        let mut out = vec![DEAD_V2];
        out.extend(postcard::to_stdvec(self).expect("encoding to a Vec cannot fail"));
        out
    }

    fn decode(number: u64, bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut dl: DeadLetter = match bytes.first() {
            Some(&DEAD_V2) => postcard::from_bytes(&bytes[1..])?,
            Some(&DEAD_V1) => {
                let v1: DeadLetterV1 = postcard::from_bytes(&bytes[1..])?;
                DeadLetter {
                    number,
                    sequence: v1.sequence,
                    reason: v1.reason,
                    at_ms: v1.at_ms,
                    record: v1.record,
                    destination: None,
                }
            }
            Some(&v) => return Err(DecodeError::UnknownVersion(v)),
            None => return Err(DecodeError::Truncated(0)),
        };
        dl.number = number;
        Ok(dl)
    }

    /// The dead event, decoded.
    pub fn event(&self) -> Result<Event, DecodeError> {
        event::decode_record(self.sequence, &self.record)
    }
}

/// Why a dead-letter operation was refused; nothing was changed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum DeadLetterError {
    /// No dead letter has this number.
    #[error("no dead letter numbered {0}")]
    NotFound(u64),
    /// A dead letter's record cannot be decoded, so it cannot be replayed.
    #[error("dead letter {number} is unreadable: {reason}")]
    Unreadable {
        /// Its number.
        number: u64,
        /// The decode error.
        reason: String,
    },
    /// A dead letter's event holds what no broker would take, so it is not
    /// replayed (it came from a release that did not check it).
    #[error("dead letter {number} cannot be replayed: {reason}")]
    Undeliverable {
        /// Its number.
        number: u64,
        /// The attribute at fault.
        reason: String,
    },
    /// The store failed or is closed.
    #[error(transparent)]
    Store(#[from] AppendError),
}

/// A replayed dead letter: its number and the sequence it was appended as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Replayed {
    /// The dead letter's number (now removed).
    pub number: u64,
    /// The event id.
    pub id: String,
    /// Its new sequence in the log.
    pub sequence: u64,
    /// The destination it goes to, if only one.
    pub destination: Option<String>,
}

/// What a [`Store::rewind`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Rewound {
    /// The durable cursor before.
    pub previous: u64,
    /// The first event after the new cursor still in the log: where the
    /// replay really starts (`None`: nothing after it is left).
    pub first_available: Option<u64>,
}

/// Persistent counters, kept in the `meta` table and updated in the same
/// transaction as the changes they count.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Meta {
    /// The next sequence number to assign.
    pub next_sequence: u64,
    /// The HLC high-water mark.
    pub hlc: u64,
    /// Bytes of records in the log.
    pub log_bytes: u64,
    /// Bytes of records in the dead-letter table.
    pub dead_bytes: u64,
    /// The next dead-letter number.
    pub next_dead: u64,
    /// Events evicted by `drop-oldest`.
    pub evicted_events: u64,
    /// Bytes evicted by `drop-oldest`.
    pub evicted_bytes: u64,
    /// Events expired by TTL.
    pub expired_events: u64,
    /// Dead letters dropped to keep the dead-letter table within its share of the quota.
    pub dead_dropped: u64,
    /// Events acknowledged as duplicates.
    pub dedup_hits: u64,
    /// Events ever accepted.
    pub accepted_events: u64,
    /// Write transactions committed (events per commit shows group commit at work).
    pub commits: u64,
    /// Events removed after every destination routing them had them.
    pub delivered_events: u64,
    /// Retention has examined the log up to here for the current consumers.
    pub retention_floor: u64,
    /// Fingerprint of the consumers `retention_floor` was computed for.
    pub consumers_hash: u64,
    /// Delivered events kept for replay (`store.retain_delivered`).
    pub retained_events: u64,
    /// Bytes of those events (part of `log_bytes`).
    pub retained_bytes: u64,
    /// Kept delivered events removed to make room for new ones.
    pub retained_evicted: u64,
    /// Kept delivered events removed for age or for their share of the quota.
    pub retained_expired: u64,
}

impl Meta {
    const FIELDS: [&'static str; 19] = [
        "next_sequence",
        "hlc",
        "log_bytes",
        "dead_bytes",
        "next_dead",
        "evicted_events",
        "evicted_bytes",
        "expired_events",
        "dead_dropped",
        "dedup_hits",
        "accepted_events",
        "commits",
        "delivered_events",
        "retention_floor",
        "consumers_hash",
        "retained_events",
        "retained_bytes",
        "retained_evicted",
        "retained_expired",
    ];

    fn slots(&mut self) -> [&mut u64; 19] {
        [
            &mut self.next_sequence,
            &mut self.hlc,
            &mut self.log_bytes,
            &mut self.dead_bytes,
            &mut self.next_dead,
            &mut self.evicted_events,
            &mut self.evicted_bytes,
            &mut self.expired_events,
            &mut self.dead_dropped,
            &mut self.dedup_hits,
            &mut self.accepted_events,
            &mut self.commits,
            &mut self.delivered_events,
            &mut self.retention_floor,
            &mut self.consumers_hash,
            &mut self.retained_events,
            &mut self.retained_bytes,
            &mut self.retained_evicted,
            &mut self.retained_expired,
        ]
    }

    fn load(table: &impl ReadableTable<&'static str, u64>) -> Result<Self, redb::StorageError> {
        let mut meta = Meta { next_sequence: 1, ..Meta::default() };
        for (name, slot) in Self::FIELDS.iter().zip(meta.slots()) {
            if let Some(v) = table.get(*name)? {
                *slot = v.value();
            }
        }
        Ok(meta)
    }

    /// Writes the counters, only those that differ from `saved` when the
    /// table is known to hold `saved`.
    fn save(
        &mut self,
        table: &mut redb::Table<&'static str, u64>,
        saved: Option<&Meta>,
    ) -> Result<(), redb::StorageError> {
        let mut before = saved.cloned();
        let before = before.as_mut().map(Meta::slots);
        for (i, (name, slot)) in Self::FIELDS.iter().zip(self.slots()).enumerate() {
            if before.as_ref().is_none_or(|b| *b[i] != *slot) {
                table.insert(*name, *slot)?;
            }
        }
        Ok(())
    }
}

/// The store's database as services that keep their own tables in it see
/// it: fetched for each operation, so a reopened file is picked up.
#[derive(Clone)]
pub struct SharedDatabase(Arc<Shared>);

impl SharedDatabase {
    /// The database to read and write now, unless the store's writes fail.
    pub fn get(&self) -> Result<Arc<Database>, StoreError> {
        self.0.writable_db()
    }
}

/// A snapshot of the store for status and metrics.
#[derive(Debug, Clone, Serialize)]
pub struct StoreStatus {
    /// Whether it takes writes.
    pub health: StoreHealth,
    /// Events in the log.
    pub events: u64,
    /// Bytes of events in the log.
    pub bytes: u64,
    /// The byte quota (log and dead letters together).
    pub quota_bytes: u64,
    /// Sequence of the newest event ever accepted (0 if none).
    pub last_sequence: u64,
    /// Sequence of the oldest event still in the log.
    pub oldest_sequence: Option<u64>,
    /// Age of the oldest event in the log, in ms.
    pub oldest_age_ms: Option<u64>,
    /// Dead letters held.
    pub dead_letters: u64,
    /// Bytes of dead letters held.
    pub dead_letter_bytes: u64,
    /// Ids remembered for deduplication.
    pub dedup_entries: u64,
    /// Counters.
    pub counters: Meta,
    /// Per-destination cursors.
    pub cursors: Vec<(String, u64)>,
}

/// What one housekeeping pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Events moved to dead letters because their TTL passed.
    pub expired: u64,
    /// Dedup entries forgotten because they left the window.
    pub dedup_pruned: u64,
    /// Dead letters dropped to stay within their share of the quota.
    pub dead_dropped: u64,
    /// Events removed because every destination routing them had them.
    pub delivered: u64,
    /// Kept delivered events removed for age or their share of the quota.
    pub retained_expired: u64,
}

/// Handle to the store. Cheap to clone; all clones share one writer thread.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    requests: flume::Sender<Request>,
    committed: watch::Receiver<u64>,
    config: StoreConfig,
    writer: Mutex<Option<JoinHandle<()>>>,
    commit_latency: Arc<Histogram>,
}

impl Store {
    /// Opens (or creates) the store and starts its writer thread.
    ///
    /// Blocking: opening recovers the file after a crash, which reads it. A
    /// file that exists but is empty or not a store is refused, and a damaged
    /// one is reported as [`StoreError::Damaged`], never replaced.
    pub fn open(config: StoreConfig, clock: SharedClock) -> Result<Self, StoreError> {
        let path = config.path.clone();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| open_error(&path, e.into()))?;
        }
        let db = open_file(&path, config.cache_bytes)?;
        let identity = FileIdentity::of(&path);
        let reopen = FileReopen { path, cache_bytes: config.cache_bytes };
        Self::start(db, config, clock, Some(Box::new(reopen)), identity)
    }

    /// Like [`Store::open`], on a caller-supplied redb storage backend
    /// instead of the file at `config.path` (which then only names the store
    /// in errors and status). The seam where tests inject storage faults,
    /// such as `power_loss::PowerLossBackend` (feature `fault-injection`).
    /// Such a store cannot reopen itself after a failed write.
    pub fn open_with_backend(
        config: StoreConfig,
        clock: SharedClock,
        backend: impl redb::StorageBackend,
    ) -> Result<Self, StoreError> {
        let db = open_backend(&config, backend)?;
        Self::start(db, config, clock, None, None)
    }

    /// Like [`Store::open_with_backend`], with a `backend` factory the
    /// writer calls again to reopen the store after a failed write.
    pub fn open_with_backends<B: redb::StorageBackend>(
        config: StoreConfig,
        clock: SharedClock,
        backend: impl Fn() -> std::io::Result<B> + Send + 'static,
    ) -> Result<Self, StoreError> {
        let path = config.path.clone();
        let db = open_backend(&config, backend().map_err(|e| open_error(&path, e.into()))?)?;
        let reopen = BackendReopen { config: config.clone(), backend };
        Self::start(db, config, clock, Some(Box::new(reopen)), None)
    }

    fn start(
        db: Database,
        config: StoreConfig,
        clock: SharedClock,
        reopen: Option<Box<dyn Reopen>>,
        identity: Option<FileIdentity>,
    ) -> Result<Self, StoreError> {
        let shared = Arc::new(Shared::new(db, config.path.clone()));
        let commit_latency = Arc::new(Histogram::new(crate::histogram::COMMIT_BUCKETS));
        let (writer, committed) =
            Writer::new(shared.clone(), config.clone(), clock, commit_latency.clone(), reopen, identity)?;
        let (requests, rx) = flume::bounded(config.queue_depth);
        let handle = std::thread::Builder::new()
            .name("ferry-store-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| open_error(&config.path, e.into()))?;
        Ok(Self {
            inner: Arc::new(Inner {
                shared,
                requests,
                committed,
                config,
                writer: Mutex::new(Some(handle)),
                commit_latency,
            }),
        })
    }

    /// Whether the store takes writes now, and if not, why.
    pub fn health(&self) -> StoreHealth {
        self.inner.shared.health()
    }

    /// Runs a read on the current database, turning a redb panic into
    /// [`StoreError::Damaged`].
    fn read<T>(&self, f: impl FnOnce(&Database) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let db = self.inner.shared.db()?;
        guard(&self.inner.config.path, || f(&db))
    }

    /// How long each write transaction took to apply and commit.
    pub fn commit_latency(&self) -> &Histogram {
        &self.inner.commit_latency
    }

    /// The configuration the store runs with.
    pub fn config(&self) -> &StoreConfig {
        &self.inner.config
    }

    /// Appends events durably. Answers only after the transaction holding
    /// them has committed (with fsync unless durability is `none`). All or
    /// nothing: on error, none of the events was stored.
    pub async fn append(&self, events: Vec<PreparedEvent>) -> Result<Vec<Appended>, AppendError> {
        self.ask(|reply| Request::Append { events, reply }).await
    }

    /// Durably records events that were never appended (an ingest-stage
    /// plugin failed on them under `on_error = "dead-letter"`) as dead
    /// letters with `reason`. Each gets an HLC but no sequence (0). Answers
    /// after the commit, like [`Store::append`].
    pub async fn dead_letter_new(&self, events: Vec<PreparedEvent>, reason: String) -> Result<(), AppendError> {
        self.ask(|reply| Request::DeadLetterNew { events, reason, reply }).await
    }

    /// Records that `destination` has everything up to `sequence`. Cursors
    /// only move forward.
    pub async fn set_cursor(&self, destination: &str, sequence: u64) -> Result<(), AppendError> {
        self.advance_cursor(destination, sequence, 0).await
    }

    /// [`Store::set_cursor`] from a forwarder that knows of `epoch` rewinds
    /// of its cursor: a move sent before the latest [`Store::rewind`] is
    /// ignored, so an ack from before a replay cannot skip the replay.
    pub async fn advance_cursor(&self, destination: &str, sequence: u64, epoch: u64) -> Result<(), AppendError> {
        self.ask(|reply| Request::SetCursor { name: destination.to_owned(), sequence, epoch, reply }).await
    }

    /// Durably moves `destination`'s cursor back to `to`, so every event
    /// after it still in the log goes there again: a replay. Kept delivered
    /// events after `to` count as undelivered again. Starts rewind `epoch`
    /// (see [`Store::advance_cursor`]); moves nothing forward.
    pub async fn rewind(&self, destination: &str, to: u64, epoch: u64) -> Result<Rewound, AppendError> {
        self.ask(|reply| Request::Rewind { name: destination.to_owned(), to, epoch, reply }).await
    }

    /// Copies event `sequence` to the dead letters with `reason`, leaving it
    /// in the log for the destinations that can still take it.
    pub async fn dead_letter_copy(&self, sequence: u64, reason: &str) -> Result<(), AppendError> {
        self.ask(|reply| Request::DeadLetterCopy { sequence, reason: reason.to_owned(), destination: None, reply })
            .await
    }

    /// Like [`Store::dead_letter_copy`], recording that `destination` is the
    /// one that could not take it, so a replay goes there only.
    pub async fn dead_letter_copy_for(
        &self,
        sequence: u64,
        destination: &str,
        reason: &str,
    ) -> Result<(), AppendError> {
        self.ask(|reply| Request::DeadLetterCopy {
            sequence,
            reason: reason.to_owned(),
            destination: Some(destination.to_owned()),
            reply,
        })
        .await
    }

    /// Moves the record at `sequence`, which no longer decodes, from the log
    /// to the dead letters with `reason`, so readers go on past it.
    pub async fn set_aside_unreadable(&self, sequence: u64, reason: &str) -> Result<(), AppendError> {
        self.ask(|reply| Request::SetAsideUnreadable { sequence, reason: reason.to_owned(), reply }).await
    }

    /// Moves dead letters `numbers` back into the log, in one transaction:
    /// each becomes a new event (new sequence and HLC, same attributes and
    /// data, no TTL) and its dead letter is removed. One dead-lettered for a
    /// single destination is routed to that destination only. All or
    /// nothing: an unknown number changes nothing.
    pub async fn replay_dead_letters(&self, numbers: Vec<u64>) -> Result<Vec<Replayed>, DeadLetterError> {
        self.ask(|reply| Request::Replay { numbers, reply }).await
    }

    /// Deletes dead letters `numbers`, or every one when `None`; answers
    /// how many were deleted. All or nothing: an unknown number changes nothing.
    pub async fn purge_dead_letters(&self, numbers: Option<Vec<u64>>) -> Result<u64, DeadLetterError> {
        self.ask(|reply| Request::Purge { numbers, reply }).await
    }

    /// The dead letter numbered `number`, if there is one.
    pub fn dead_letter(&self, number: u64) -> Result<Option<DeadLetter>, StoreError> {
        self.read(|db| {
            let txn = db.begin_read().map_err(storage)?;
            let dead = txn.open_table(tables::DEAD).map_err(storage)?;
            let Some(v) = dead.get(number).map_err(storage)? else { return Ok(None) };
            DeadLetter::decode(number, v.value())
                .map(Some)
                .map_err(|source| StoreError::Corrupt { sequence: number, source })
        })
    }

    /// Forgets the ids of a batch of deliveries ([`Dedup::Delivery`]): the
    /// broker has every ack, so it will not deliver them again, and a later
    /// identical message is a new event.
    pub async fn forget_deliveries(&self, batch: u128) -> Result<(), AppendError> {
        self.ask(|reply| Request::ForgetDeliveries { batch, reply }).await
    }

    /// Runs housekeeping now (TTL expiry, dedup pruning) instead of waiting
    /// for the writer's next idle tick.
    pub async fn sweep(&self) -> Result<SweepReport, AppendError> {
        self.ask(|reply| Request::Sweep { reply }).await
    }

    /// Sends the writer the request `make` builds around its reply, and
    /// waits for the answer.
    async fn ask<T, E: From<AppendError>>(&self, make: impl FnOnce(Reply<T, E>) -> Request) -> Result<T, E> {
        let (tx, rx) = oneshot::channel();
        let request = make(Reply::new(tx));
        self.inner.requests.send_async(request).await.map_err(|_| E::from(AppendError::Closed))?;
        rx.await.map_err(|_| E::from(AppendError::Closed))?
    }

    /// A receiver of the newest committed sequence, for readers that tail the log.
    pub fn committed(&self) -> watch::Receiver<u64> {
        self.inner.committed.clone()
    }

    /// Up to `limit` events with sequence greater than `after`, in order.
    pub fn read_after(&self, after: u64, limit: usize) -> Result<Vec<Event>, StoreError> {
        self.read_after_bounded(after, limit, usize::MAX)
    }

    /// Like [`Store::read_after`], stopping once the records read reach
    /// `max_bytes` (at least one event is read, however large).
    pub fn read_after_bounded(&self, after: u64, limit: usize, max_bytes: usize) -> Result<Vec<Event>, StoreError> {
        self.read(|db| {
            let txn = db.begin_read().map_err(storage)?;
            let log = txn.open_table(tables::LOG).map_err(storage)?;
            let mut out = Vec::with_capacity(limit.min(4096));
            let mut bytes = 0usize;
            for row in log.range(after.saturating_add(1)..).map_err(storage)?.take(limit) {
                if bytes >= max_bytes {
                    break;
                }
                let (k, v) = row.map_err(storage)?;
                let sequence = k.value();
                bytes += v.value().len();
                out.push(
                    event::decode_record(sequence, v.value())
                        .map_err(|source| StoreError::Corrupt { sequence, source })?,
                );
            }
            Ok(out)
        })
    }

    /// The sequence of the first event in the log accepted at or after `ms`
    /// (ms since the epoch), or `None` when none was. Acceptance times rise
    /// with sequences, so this is a binary search.
    pub fn first_since(&self, ms: u64) -> Result<Option<u64>, StoreError> {
        self.read(|db| {
            let txn = db.begin_read().map_err(storage)?;
            let log = txn.open_table(tables::LOG).map_err(storage)?;
            // The first event at or after sequence `k`, with its acceptance time
            // (an unreadable header counts as the oldest).
            let at = |k: u64| -> Result<Option<(u64, u64)>, StoreError> {
                match log.range(k..).map_err(storage)?.next() {
                    Some(row) => {
                        let (seq, record) = row.map_err(storage)?;
                        let ms = event::decode_header(record.value()).map_or(0, |(h, _)| h.hlc.millis());
                        Ok(Some((seq.value(), ms)))
                    }
                    None => Ok(None),
                }
            };
            let Some((mut lo, _)) = at(0)? else { return Ok(None) };
            let mut hi = log.last().map_err(storage)?.map_or(lo, |(k, _)| k.value()) + 1;
            // The answer is the first event at or after `lo`; none is at or after `hi`.
            while lo < hi {
                let mid = lo + (hi - lo) / 2;
                match at(mid)? {
                    Some((seq, t)) if t < ms => lo = seq + 1,
                    _ => hi = mid,
                }
            }
            Ok(at(lo)?.filter(|&(_, t)| t >= ms).map(|(seq, _)| seq))
        })
    }

    /// Up to `limit` dead letters numbered above `after`, oldest first.
    pub fn dead_letters(&self, after: u64, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        self.read(|db| {
            let txn = db.begin_read().map_err(storage)?;
            let dead = txn.open_table(tables::DEAD).map_err(storage)?;
            let mut out = Vec::new();
            for row in dead.range(after.saturating_add(1)..).map_err(storage)?.take(limit) {
                let (k, v) = row.map_err(storage)?;
                let number = k.value();
                out.push(
                    DeadLetter::decode(number, v.value())
                        .map_err(|source| StoreError::Corrupt { sequence: number, source })?,
                );
            }
            Ok(out)
        })
    }

    /// The cursor of `destination`, if it has one.
    pub fn cursor(&self, destination: &str) -> Result<Option<u64>, StoreError> {
        self.read(|db| {
            let txn = db.begin_read().map_err(storage)?;
            let cursors = txn.open_table(tables::CURSORS).map_err(storage)?;
            Ok(cursors.get(destination).map_err(storage)?.map(|v| v.value()))
        })
    }

    /// The current state of the store.
    pub fn status(&self, now_ms: u64) -> Result<StoreStatus, StoreError> {
        let health = self.health();
        self.read(|db| {
            let txn = db.begin_read().map_err(storage)?;
            let meta = Meta::load(&txn.open_table(tables::META).map_err(storage)?).map_err(storage)?;
            let log = txn.open_table(tables::LOG).map_err(storage)?;
            let (oldest_sequence, oldest_age_ms) = match log.first().map_err(storage)? {
                Some((k, v)) => {
                    let sequence = k.value();
                    // An unreadable header shows no age rather than failing status.
                    let age = event::decode_header(v.value()).ok().map(|(h, _)| now_ms.saturating_sub(h.hlc.millis()));
                    (Some(sequence), age)
                }
                None => (None, None),
            };
            let cursors = txn.open_table(tables::CURSORS).map_err(storage)?;
            let cursors = cursors
                .iter()
                .map_err(storage)?
                .map(|r| r.map(|(k, v)| (k.value().to_owned(), v.value())))
                .collect::<Result<_, _>>()
                .map_err(storage)?;
            Ok(StoreStatus {
                health,
                events: log.len().map_err(storage)?,
                bytes: meta.log_bytes,
                quota_bytes: self.inner.config.quota_bytes,
                last_sequence: meta.next_sequence.saturating_sub(1),
                oldest_sequence,
                oldest_age_ms,
                dead_letters: txn.open_table(tables::DEAD).map_err(storage)?.len().map_err(storage)?,
                dead_letter_bytes: meta.dead_bytes,
                dedup_entries: txn.open_table(tables::DEDUP).map_err(storage)?.len().map_err(storage)?,
                counters: meta,
                cursors,
            })
        })
    }

    /// The HLC high-water mark that a restart resumes from.
    pub fn hlc_high_water(&self) -> Result<Hlc, StoreError> {
        self.read(|db| {
            let txn = db.begin_read().map_err(storage)?;
            let meta = Meta::load(&txn.open_table(tables::META).map_err(storage)?).map_err(storage)?;
            Ok(Hlc(meta.hlc))
        })
    }

    /// Stops the writer after it has committed every request already queued.
    /// Later appends answer [`AppendError::Closed`]. Blocking.
    pub fn close(&self) {
        let handle = self.inner.writer.lock().expect("writer handle lock").take();
        if let Some(handle) = handle {
            // The writer drains the queue before it honours the shutdown.
            let _ = self.inner.requests.send(Request::Shutdown);
            let _ = handle.join();
        }
    }

    /// The database, for services that keep their own tables in the same
    /// file (the state table). They write in their own transactions, which
    /// redb serialises with the writer's group commits. Take it for one
    /// operation at a time: while the writer heals the store it is away.
    pub fn database(&self) -> SharedDatabase {
        SharedDatabase(self.inner.shared.clone())
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.inner.config.path
    }
}

fn open_error(path: &Path, e: redb::Error) -> StoreError {
    StoreError::Open { path: path.display().to_string(), source: Box::new(e) }
}

/// Opens the store file, refusing one that cannot be a store and reporting
/// a redb panic on a damaged one as [`StoreError::Damaged`].
fn open_file(path: &Path, cache_bytes: usize) -> Result<Database, StoreError> {
    health::check_file(path)?;
    guard(path, || {
        redb::Builder::new().set_cache_size(cache_bytes).create(path).map_err(|e| open_error(path, e.into()))
    })
}

fn open_backend(config: &StoreConfig, backend: impl redb::StorageBackend) -> Result<Database, StoreError> {
    guard(&config.path, || {
        redb::Builder::new()
            .set_cache_size(config.cache_bytes)
            .create_with_backend(backend)
            .map_err(|e| open_error(&config.path, e.into()))
    })
}

/// Reopens the store file.
struct FileReopen {
    path: std::path::PathBuf,
    cache_bytes: usize,
}

impl Reopen for FileReopen {
    fn open(&self) -> Result<Database, StoreError> {
        open_file(&self.path, self.cache_bytes)
    }

    fn peek(&self) -> Result<Database, StoreError> {
        let path = &self.path;
        let backend = overlay::OverlayBackend::open(path).map_err(|e| open_error(path, e.into()))?;
        guard(path, || redb::Builder::new().create_with_backend(backend).map_err(|e| open_error(path, e.into())))
    }
}

/// Reopens a store on backends a factory makes.
struct BackendReopen<F> {
    config: StoreConfig,
    backend: F,
}

impl<B: redb::StorageBackend, F: Fn() -> std::io::Result<B> + Send> Reopen for BackendReopen<F> {
    fn open(&self) -> Result<Database, StoreError> {
        let b = (self.backend)().map_err(|e| open_error(&self.config.path, e.into()))?;
        open_backend(&self.config, b)
    }

    fn peek(&self) -> Result<Database, StoreError> {
        let path = &self.config.path;
        let b = (self.backend)().map_err(|e| open_error(path, e.into()))?;
        let overlay = overlay::OverlayBackend::over(b).map_err(|e| open_error(path, e.into()))?;
        open_backend(&self.config, overlay)
    }
}
