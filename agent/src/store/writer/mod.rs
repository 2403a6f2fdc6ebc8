//! The store's single writer thread: group commit, dedup, quota, eviction,
//! TTL expiry and dedup pruning, and healing after a failed write.
//!
//! The thread blocks for one request, then takes every request already
//! queued behind it and applies them all in one write transaction, so one
//! fsync serves every producer that was waiting. Replies go out only after
//! the commit returns. Each request is all or nothing on its own: a refused
//! request changes nothing, while the others in the batch still commit.
//!
//! Before each commit it checks the free-disk reserve and that its file is
//! still the one at the store's path. When a write fails (a full disk, an
//! I/O error, a panic inside redb) it closes the database, refuses requests
//! at once, and reopens the file with backoff until a probe write succeeds:
//! no restart needed. Only changes of health are logged, and a lasting
//! failure at most once a minute.
//!
//! This file holds the thread, the batching and the commit; the changes a
//! batch makes are in [`append`] (stamps, dedup, quota), [`retention`] (TTL
//! expiry, dedup pruning, delivered events), [`dead_letters`], and
//! [`recovery`] (the checks before a commit, healing after a failed one).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redb::{Database, ReadableDatabase, ReadableTable, Table, WriteTransaction};
use tokio::sync::{oneshot, watch};

use super::health::{FileIdentity, Shared, StoreHealth, caught, damaged, guard};
use super::tables;
use super::{
    AppendError, Appended, DeadLetter, DeadLetterError, Dedup, FULL_RETRY_AFTER, Meta, PreparedEvent, Replayed,
    Rewound, StoreError, SweepReport,
};
use crate::clock::{Hlc, HlcState, SharedClock};
use crate::config::{Durability, FullPolicy, StoreConfig};
use crate::event::{self, DecodeError, RecordHeader};
use crate::histogram::Histogram;

mod append;
mod dead_letters;
mod recovery;
mod retention;

/// Most events one transaction takes before it commits and starts another,
/// which bounds commit latency under a flood.
const MAX_BATCH_EVENTS: usize = 32_768;

/// Longest a commit waits for more requests to join it (see [`Writer::gather`]).
const MAX_COMMIT_DELAY: Duration = Duration::from_micros(1_000);

/// First wait before reopening the store after a failed write; it doubles
/// per failed attempt up to [`HEAL_BACKOFF_CAP`].
const HEAL_BACKOFF_BASE: Duration = Duration::from_millis(250);

/// Longest wait between two reopen attempts.
const HEAL_BACKOFF_CAP: Duration = Duration::from_secs(30);

/// A lasting failure is logged again at most this often.
const FAULT_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// How long healing waits for readers to let go of a failed database.
const READERS_GRACE: Duration = Duration::from_secs(10);

/// Opens the store again: the file, or a test's backend.
pub(super) trait Reopen: Send {
    /// Opens it for writing.
    fn open(&self) -> Result<Database, StoreError>;
    /// Opens it for reading, repairing in memory: writes nothing, so it
    /// works while the disk still fails.
    fn peek(&self) -> Result<Database, StoreError>;
}

/// How long a gathering commit waits for one more request before it goes.
const LINGER: Duration = Duration::from_micros(150);

/// How often an idle writer runs housekeeping.
const SWEEP_INTERVAL: Duration = Duration::from_millis(1_000);

/// Most rows one housekeeping pass touches per task, so a large expiry wave
/// never stalls ingest for long.
const SWEEP_LIMIT: usize = 10_000;

/// Least time between two removals of delivered events while cursors move:
/// one pass rewrites the log's first pages once per interval rather than in
/// every commit. The quota never waits for it (see [`Writer::make_room`]).
const RETIRE_INTERVAL: Duration = Duration::from_millis(100);

/// Share of the quota that dead letters may hold before the oldest go.
const DEAD_LETTER_SHARE: u64 = 10;

/// Where a request's answer goes. Dropped unanswered (a panic inside redb
/// unwinds through the batch that holds it), it answers that the store
/// failed, so no producer is ever told "closed" by a store that is healing.
pub(super) struct Reply<T, E: From<AppendError>>(Option<oneshot::Sender<Result<T, E>>>);

impl<T, E: From<AppendError>> Reply<T, E> {
    pub(super) fn new(tx: oneshot::Sender<Result<T, E>>) -> Self {
        Self(Some(tx))
    }

    fn send(mut self, result: Result<T, E>) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(result);
        }
    }
}

impl<T, E: From<AppendError>> Drop for Reply<T, E> {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let reason = "the store failed while handling this request (see the agent's log); \
                          nothing of it was stored"
                .to_owned();
            let _ = tx.send(Err(AppendError::Unavailable { reason, retry_after: FULL_RETRY_AFTER }.into()));
        }
    }
}

/// The answer to a request that changes the store but returns nothing.
pub(super) type Done = Reply<(), AppendError>;

/// A request to the writer.
pub(super) enum Request {
    Append { events: Vec<PreparedEvent>, reply: Reply<Vec<Appended>, AppendError> },
    SetCursor { name: String, sequence: u64, epoch: u64, reply: Done },
    Rewind { name: String, to: u64, epoch: u64, reply: Reply<Rewound, AppendError> },
    DeadLetterCopy { sequence: u64, reason: String, destination: Option<String>, reply: Done },
    SetAsideUnreadable { sequence: u64, reason: String, reply: Done },
    Replay { numbers: Vec<u64>, reply: Reply<Vec<Replayed>, DeadLetterError> },
    Purge { numbers: Option<Vec<u64>>, reply: Reply<u64, DeadLetterError> },
    ForgetDeliveries { batch: u128, reply: Done },
    Sweep { reply: Reply<SweepReport, AppendError> },
    DeadLetterNew { events: Vec<PreparedEvent>, reason: String, reply: Done },
    Shutdown,
}

impl Request {
    fn weight(&self) -> usize {
        match self {
            Request::Append { events, .. } | Request::DeadLetterNew { events, .. } => events.len(),
            _ => 1,
        }
    }

    /// Answers the request with `error` without applying it.
    fn refuse(self, error: &AppendError) {
        match self {
            Request::Append { reply, .. } => reply.send(Err(error.clone())),
            Request::SetCursor { reply, .. }
            | Request::DeadLetterCopy { reply, .. }
            | Request::SetAsideUnreadable { reply, .. }
            | Request::ForgetDeliveries { reply, .. }
            | Request::DeadLetterNew { reply, .. } => reply.send(Err(error.clone())),
            Request::Replay { reply, .. } => reply.send(Err(error.clone().into())),
            Request::Purge { reply, .. } => reply.send(Err(error.clone().into())),
            Request::Sweep { reply } => reply.send(Err(error.clone())),
            Request::Rewind { reply, .. } => reply.send(Err(error.clone())),
            Request::Shutdown => {}
        }
    }
}

/// What a request's reply will be once the transaction commits.
enum Pending {
    Append(Reply<Vec<Appended>, AppendError>, Result<Vec<Appended>, AppendError>),
    Done(Done),
    Sweep(Reply<SweepReport, AppendError>, SweepReport),
    Replay(Reply<Vec<Replayed>, DeadLetterError>, Result<Vec<Replayed>, DeadLetterError>),
    Purge(Reply<u64, DeadLetterError>, Result<u64, DeadLetterError>),
    Rewind(Reply<Rewound, AppendError>, Rewound),
}

impl Pending {
    fn fail(self, error: &AppendError) {
        match self {
            Pending::Append(tx, _) => tx.send(Err(error.clone())),
            Pending::Done(tx) => tx.send(Err(error.clone())),
            Pending::Sweep(tx, _) => tx.send(Err(error.clone())),
            Pending::Replay(tx, _) => tx.send(Err(error.clone().into())),
            Pending::Purge(tx, _) => tx.send(Err(error.clone().into())),
            Pending::Rewind(tx, _) => tx.send(Err(error.clone())),
        }
    }

    fn succeed(self) {
        match self {
            Pending::Append(tx, outcome) => tx.send(outcome),
            Pending::Done(tx) => tx.send(Ok(())),
            Pending::Sweep(tx, report) => tx.send(Ok(report)),
            Pending::Replay(tx, outcome) => tx.send(outcome),
            Pending::Purge(tx, outcome) => tx.send(outcome),
            Pending::Rewind(tx, outcome) => tx.send(Ok(outcome)),
        }
    }
}

/// A batch whose transaction failed: its replies, the error, and whether
/// the error came from the commit itself (which may have reached the disk).
struct Failed {
    pending: Vec<Pending>,
    error: redb::Error,
    committing: bool,
}

/// A write failure the writer is recovering from.
struct Fault {
    reason: String,
    since_ms: u64,
    /// Reopen attempts so far.
    attempts: u32,
    next_try: Instant,
    last_logged: Instant,
}

/// The open tables of one write transaction.
struct Tables<'t> {
    log: Table<'t, u64, &'static [u8]>,
    dedup: Table<'t, &'static str, u64>,
    dedup_age: Table<'t, u64, (u64, &'static str)>,
    dedup_ages: Table<'t, u64, &'static [u8]>,
    deliveries: Table<'t, u128, &'static [u8]>,
    by_priority: Table<'t, (u8, u64), u32>,
    expiry: Table<'t, (u64, u64), ()>,
    retained: Table<'t, (u64, u64), ()>,
    dead: Table<'t, u64, &'static [u8]>,
    cursors: Table<'t, &'static str, u64>,
    cursor_moves: Table<'t, &'static str, u64>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Self, redb::TableError> {
        Ok(Self {
            log: txn.open_table(tables::LOG)?,
            dedup: txn.open_table(tables::DEDUP)?,
            dedup_age: txn.open_table(tables::DEDUP_AGE)?,
            dedup_ages: txn.open_table(tables::DEDUP_AGES)?,
            deliveries: txn.open_table(tables::DELIVERIES)?,
            by_priority: txn.open_table(tables::BY_PRIORITY)?,
            expiry: txn.open_table(tables::EXPIRY)?,
            retained: txn.open_table(tables::RETAINED)?,
            dead: txn.open_table(tables::DEAD)?,
            cursors: txn.open_table(tables::CURSORS)?,
            cursor_moves: txn.open_table(tables::CURSOR_MOVES)?,
        })
    }
}

/// A row of [`tables::DEDUP_AGES`]: the producer-id events of one commit,
/// which leave the dedup window together.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub(super) struct AgeRecord {
    /// When they were accepted, in ms.
    pub(super) at_ms: u64,
    /// Their sequences and ids, ascending.
    pub(super) ids: Vec<(u64, String)>,
}

impl AgeRecord {
    /// A row as stored. One that does not decode (it cannot, unless the file
    /// is damaged) reads as empty: its ids then stay until stored again.
    pub(super) fn decode(row: &[u8]) -> Self {
        postcard::from_bytes(row).unwrap_or_default()
    }
}

pub(super) struct Writer {
    shared: Arc<Shared>,
    /// The writer's own handle; `None` while a failed database is closed.
    db: Option<Arc<Database>>,
    reopen: Option<Box<dyn Reopen>>,
    /// The file the store was opened on (`None` on a test's backend).
    identity: Option<FileIdentity>,
    /// Set once the file vanished: ingest stays refused until a restart.
    vanished: Option<String>,
    fault: Option<Fault>,
    config: StoreConfig,
    clock: SharedClock,
    hlc: HlcState,
    meta: Meta,
    committed: watch::Sender<u64>,
    /// Commits made without fsync since the last durable one.
    unsynced: bool,
    last_sweep: Instant,
    /// Free bytes on the store's file system at the last commit.
    disk_free: u64,
    /// Requests in the previous batch, and how long its commit took.
    last_batch_len: usize,
    /// When delivered events were last removed; `None` before the first time.
    last_retire: Option<Instant>,
    last_commit_time: Duration,
    commit_latency: Arc<Histogram>,
    /// Per destination, the latest rewind of its cursor in this run (see
    /// [`super::Store::advance_cursor`]).
    epochs: HashMap<String, u64>,
    /// The producer-id events of the batch being applied.
    ages: AgeRecord,
    /// The counters as the last commit wrote them, if it is known that the
    /// file holds them: only changed ones are written again.
    saved_meta: Option<Meta>,
}

/// Counters and the HLC high-water mark of `db`, creating tables on first use.
fn load(db: &Database) -> Result<Meta, redb::Error> {
    let txn = db.begin_write()?;
    let mut meta = {
        let t = Tables::open(&txn)?;
        let mut meta = Meta::load(&txn.open_table(tables::META)?)?;
        // The log may run ahead of the counter only if the counter was
        // never written; take the larger so sequences are never reused.
        if let Some((k, _)) = t.log.last()? {
            meta.next_sequence = meta.next_sequence.max(k.value() + 1);
        }
        meta
    };
    meta.save(&mut txn.open_table(tables::META)?, None)?;
    txn.commit()?;
    Ok(meta)
}

impl Writer {
    /// Loads counters and the HLC high-water mark, creating tables on first use.
    pub(super) fn new(
        shared: Arc<Shared>,
        config: StoreConfig,
        clock: SharedClock,
        commit_latency: Arc<Histogram>,
        reopen: Option<Box<dyn Reopen>>,
        identity: Option<FileIdentity>,
    ) -> Result<(Self, watch::Receiver<u64>), StoreError> {
        let db = shared.db()?;
        let path = shared.path.clone();
        let meta = guard(&path, || {
            load(&db).map_err(|e| StoreError::Open { path: path.display().to_string(), source: Box::new(e) })
        })?;
        let hlc = HlcState::resume(Hlc(meta.hlc));
        let (committed, rx) = watch::channel(meta.next_sequence - 1);
        let writer = Self {
            shared,
            db: Some(db),
            reopen,
            identity,
            vanished: None,
            fault: None,
            config,
            clock,
            hlc,
            meta,
            committed,
            unsynced: false,
            last_sweep: Instant::now(),
            last_batch_len: 1,
            last_retire: None,
            last_commit_time: Duration::ZERO,
            commit_latency,
            disk_free: u64::MAX,
            epochs: HashMap::new(),
            ages: AgeRecord::default(),
            saved_meta: None,
        };
        Ok((writer, rx))
    }

    pub(super) fn run(mut self, rx: flume::Receiver<Request>) {
        loop {
            let wait = match &self.fault {
                Some(f) if self.db.is_none() => f.next_try.saturating_duration_since(Instant::now()),
                _ => SWEEP_INTERVAL,
            };
            let first = match rx.recv_timeout(wait) {
                Ok(r) => r,
                Err(flume::RecvTimeoutError::Timeout) => {
                    self.idle();
                    continue;
                }
                Err(flume::RecvTimeoutError::Disconnected) => break,
            };
            let mut batch = self.gather(first, &rx);
            let shutdown = batch.iter().any(|r| matches!(r, Request::Shutdown));
            if shutdown {
                // Everything queued before or after the shutdown request is
                // committed; the senders already hold it as in flight.
                batch.extend(rx.drain());
            }
            if self.db.is_none() {
                self.try_heal();
            }
            match &self.fault {
                Some(f) if self.db.is_none() => {
                    // Healing: answer at once rather than let producers queue.
                    let error = AppendError::Unavailable {
                        reason: format!("store cannot write ({}); nothing of this request was stored", f.reason),
                        retry_after: f.next_try.saturating_duration_since(Instant::now()).max(Duration::from_secs(1)),
                    };
                    batch.into_iter().for_each(|r| r.refuse(&error));
                }
                _ => {
                    self.commit_batch(batch);
                    if self.last_sweep.elapsed() >= SWEEP_INTERVAL {
                        self.housekeeping();
                    }
                }
            }
            if shutdown {
                break;
            }
        }
        if self.unsynced {
            self.housekeeping();
        }
        tracing::debug!("store writer stopped");
    }

    /// Nothing to do for a while: heal when due, else housekeeping.
    fn idle(&mut self) {
        if self.db.is_none() {
            self.try_heal();
        } else {
            self.housekeeping();
        }
    }

    /// Takes the requests queued behind `first`. With fsync on and several
    /// producers active, it also lingers briefly for producers that are about
    /// to send: a commit costs one fsync however many requests it holds, so
    /// waiting a fraction of a commit's time lets far more requests share it.
    fn gather(&mut self, first: Request, rx: &flume::Receiver<Request>) -> Vec<Request> {
        let mut weight = first.weight();
        let mut batch = vec![first];
        let linger = self.config.durability == Durability::Fsync && self.last_batch_len > 1;
        let deadline = Instant::now() + (self.last_commit_time / 4).min(MAX_COMMIT_DELAY);
        while weight < MAX_BATCH_EVENTS {
            let next = match rx.try_recv() {
                Ok(r) => r,
                Err(_) if linger => match rx.recv_deadline((Instant::now() + LINGER).min(deadline)) {
                    Ok(r) => r,
                    Err(_) => break,
                },
                Err(_) => break,
            };
            weight += next.weight();
            batch.push(next);
        }
        self.last_batch_len = batch.len();
        batch
    }

    fn commit_batch(&mut self, batch: Vec<Request>) {
        let started = Instant::now();
        let saved = (self.meta.clone(), self.hlc.clone());
        let result = caught(|| self.apply_batch(batch));
        match result {
            Ok(Ok(pending)) => {
                self.last_commit_time = started.elapsed();
                self.commit_latency.observe(self.last_commit_time.as_secs_f64());
                for p in pending {
                    p.succeed();
                }
                self.committed.send_replace(self.meta.next_sequence - 1);
                self.recovered();
            }
            Ok(Err(Failed { pending, error, committing })) => {
                let commits_before = saved.0.commits;
                (self.meta, self.hlc) = saved;
                self.fail(error.to_string());
                if !committing {
                    let error = AppendError::Unavailable {
                        reason: format!("storage failure ({error}); nothing of this request was stored"),
                        retry_after: FULL_RETRY_AFTER,
                    };
                    pending.into_iter().for_each(|p| p.fail(&error));
                    return;
                }
                // The commit itself failed: it may have reached the disk all
                // the same. Read the store without writing and look, so nobody
                // is told "failed" about events that are stored, or "stored"
                // about events that are not.
                let reason = match self.peek_commits() {
                    Ok(commits) if commits > commits_before => {
                        pending.into_iter().for_each(Pending::succeed);
                        return;
                    }
                    Ok(_) => format!("storage failure during commit ({error}); nothing of this request was stored"),
                    Err(e) => format!(
                        "storage failure during commit ({error}); whether this request was stored cannot be read \
                         back ({e}) until the store recovers: send it again with the same ids"
                    ),
                };
                let error = AppendError::Unavailable { reason, retry_after: FULL_RETRY_AFTER };
                pending.into_iter().for_each(|p| p.fail(&error));
            }
            Err(panic) => {
                // Replies the unwind dropped have answered that the store failed.
                (self.meta, self.hlc) = saved;
                self.fail(damaged(&self.shared.path, panic.as_ref()).to_string());
            }
        }
    }

    /// Applies a batch in one transaction. On error nothing was committed
    /// (unless the error came from the commit itself: `committing`).
    fn apply_batch(&mut self, batch: Vec<Request>) -> Result<Vec<Pending>, Failed> {
        let mut pending = Vec::with_capacity(batch.len());
        let mut deferred = Vec::new();
        let mut cursors_moved = false;
        let mut committing = false;
        let result = (|| -> Result<(), redb::Error> {
            self.check_file();
            self.check_disk();
            let txn = self.begin()?;
            self.ages.ids.clear();
            {
                let mut t = Tables::open(&txn)?;
                let now_ms = self.clock.now_millis();
                self.ages.at_ms = now_ms;
                for request in batch {
                    match request {
                        Request::Append { events, reply } => {
                            let outcome = match &self.vanished {
                                Some(reason) => Err(AppendError::Unavailable {
                                    reason: reason.clone(),
                                    retry_after: FULL_RETRY_AFTER,
                                }),
                                None => self.append(&mut t, events, now_ms)?,
                            };
                            pending.push(Pending::Append(reply, outcome));
                        }
                        Request::SetCursor { name, sequence, epoch, reply } => {
                            let current = t.cursors.get(name.as_str())?.map_or(0, |v| v.value());
                            let stale = self.epochs.get(&name).is_some_and(|&latest| epoch < latest);
                            if sequence > current && !stale {
                                t.cursors.insert(name.as_str(), sequence)?;
                                t.cursor_moves.insert(tables::move_key(&name, sequence).as_str(), now_ms)?;
                                cursors_moved = true;
                            }
                            pending.push(Pending::Done(reply));
                        }
                        Request::DeadLetterCopy { sequence, reason, destination, reply } => {
                            let record = t.log.get(sequence)?.map(|r| r.value().to_vec());
                            if let Some(record) = record {
                                self.dead_letter(&mut t, sequence, &reason, now_ms, record, destination)?;
                            }
                            pending.push(Pending::Done(reply));
                        }
                        Request::SetAsideUnreadable { sequence, reason, reply } => {
                            self.set_aside_unreadable(&mut t, sequence, &reason, now_ms)?;
                            pending.push(Pending::Done(reply));
                        }
                        Request::ForgetDeliveries { batch, reply } => {
                            t.deliveries.remove(batch)?;
                            pending.push(Pending::Done(reply));
                        }
                        Request::Sweep { reply } => deferred.push(reply),
                        Request::DeadLetterNew { events, reason, reply } => {
                            for e in &events {
                                let mut record = Vec::new();
                                self.stamp(e, now_ms, &mut record);
                                self.dead_letter(&mut t, 0, &reason, now_ms, record, None)?;
                            }
                            // Answers `()` after the commit, as a cursor update does.
                            pending.push(Pending::Done(reply));
                        }
                        Request::Replay { numbers, reply } => {
                            let outcome = self.replay(&mut t, &numbers, now_ms)?;
                            pending.push(Pending::Replay(reply, outcome));
                        }
                        Request::Purge { numbers, reply } => {
                            let outcome = self.purge(&mut t, numbers)?;
                            pending.push(Pending::Purge(reply, outcome));
                        }
                        Request::Rewind { name, to, epoch, reply } => {
                            let outcome = self.rewind(&mut t, &name, to)?;
                            let latest = self.epochs.entry(name).or_default();
                            *latest = (*latest).max(epoch);
                            pending.push(Pending::Rewind(reply, outcome));
                        }
                        Request::Shutdown => {}
                    }
                }
                for reply in deferred.drain(..) {
                    let report = self.sweep(&mut t, now_ms)?;
                    pending.push(Pending::Sweep(reply, report));
                }
                if cursors_moved && self.last_retire.is_none_or(|at| at.elapsed() >= RETIRE_INTERVAL) {
                    self.retire_delivered(&mut t, now_ms)?;
                }
                if let Some(&(first, _)) = self.ages.ids.first() {
                    let row = postcard::to_allocvec(&self.ages).expect("encoding to a Vec cannot fail");
                    t.dedup_ages.insert(first, row.as_slice())?;
                }
            }
            committing = true;
            self.commit(txn)
        })();
        match result {
            Ok(()) => Ok(pending),
            Err(error) => Err(Failed { pending, error, committing }),
        }
    }

    fn begin(&mut self) -> Result<WriteTransaction, redb::Error> {
        let db = self.db.as_ref().ok_or(redb::Error::PreviousIo)?;
        let mut txn = db.begin_write()?;
        if self.config.durability == Durability::None {
            txn.set_durability(redb::Durability::None)?;
        }
        Ok(txn)
    }

    fn commit(&mut self, txn: WriteTransaction) -> Result<(), redb::Error> {
        {
            let mut meta = txn.open_table(tables::META)?;
            self.meta.hlc = self.hlc.high_water().0;
            self.meta.commits += 1;
            self.meta.save(&mut meta, self.saved_meta.as_ref())?;
        }
        // Unknown until the commit is known to have landed.
        self.saved_meta = None;
        txn.commit()?;
        self.saved_meta = Some(self.meta.clone());
        self.unsynced = self.config.durability == Durability::None;
        Ok(())
    }

    /// Idle-time housekeeping in its own transaction, which also makes
    /// commits taken without fsync durable. Commits only if something
    /// changed, so an idle agent does not wear the flash.
    fn housekeeping(&mut self) {
        self.last_sweep = Instant::now();
        if self.db.is_none() {
            return;
        }
        let saved = (self.meta.clone(), self.hlc.clone());
        let result = caught(|| -> Result<SweepReport, redb::Error> {
            let txn = self.db.as_ref().ok_or(redb::Error::PreviousIo)?.begin_write()?;
            let report = self.sweep(&mut Tables::open(&txn)?, self.clock.now_millis())?;
            if report == SweepReport::default() && !self.unsynced {
                txn.abort()?;
                return Ok(report);
            }
            {
                let mut meta = txn.open_table(tables::META)?;
                self.meta.save(&mut meta, self.saved_meta.as_ref())?;
            }
            self.saved_meta = None;
            txn.commit()?;
            self.saved_meta = Some(self.meta.clone());
            self.unsynced = false;
            Ok(report)
        });
        match result {
            Ok(Ok(report)) => {
                if report.expired > 0 {
                    tracing::info!(expired = report.expired, "events expired to dead letters");
                }
                self.recovered();
            }
            Ok(Err(error)) => {
                (self.meta, self.hlc) = saved;
                self.fail(format!("housekeeping: {error}"));
            }
            Err(panic) => {
                (self.meta, self.hlc) = saved;
                self.fail(damaged(&self.shared.path, panic.as_ref()).to_string());
            }
        }
    }
}
