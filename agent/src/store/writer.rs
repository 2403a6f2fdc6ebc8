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

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redb::{Database, ReadableDatabase, ReadableTable, Table, WriteTransaction};
use tokio::sync::{oneshot, watch};

use super::health::{FileIdentity, Shared, StoreHealth, caught, damaged, guard};
use super::tables;
use super::{
    AppendError, Appended, DeadLetter, DeadLetterError, Dedup, FULL_RETRY_AFTER, Meta, PreparedEvent, Replayed,
    StoreError, SweepReport,
};
use crate::clock::{Hlc, HlcState, SharedClock};
use crate::config::{Durability, FullPolicy, StoreConfig};
use crate::event::{self, DecodeError, RecordHeader};
use crate::histogram::Histogram;

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

/// Bytes available to this process on the file system holding `dir`.
fn free_disk_bytes(dir: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a valid C string and `stat` is written by statvfs before it is read.
    let rc = unsafe { libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled the struct.
    let stat = unsafe { stat.assume_init() };
    // The field types are 32-bit on some targets.
    #[allow(clippy::useless_conversion)]
    Some(u64::from(stat.f_bavail).saturating_mul(u64::from(stat.f_frsize)))
}

/// A stable fingerprint of the consumers and their routes.
fn consumers_fingerprint(consumers: &[crate::config::Consumer]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    for c in consumers {
        c.name.hash(&mut h);
        for r in &c.routes {
            r.as_str().hash(&mut h);
        }
    }
    h.finish().max(1)
}

/// Every id of a stored batch of deliveries, with its sequence.
fn stored_deliveries(t: &Tables<'_>) -> Result<HashMap<String, u64>, redb::Error> {
    let mut ids = HashMap::new();
    for row in t.deliveries.iter()? {
        let (_, v) = row?;
        ids.extend(decode_deliveries(v.value()));
    }
    Ok(ids)
}

/// A record of [`tables::DELIVERIES`]. One that does not decode (it cannot,
/// unless the file is damaged) is read as empty: its redeliveries are then
/// stored again rather than refused, which loses nothing.
fn decode_deliveries(row: &[u8]) -> Vec<(String, u64)> {
    postcard::from_bytes(row).unwrap_or_default()
}

/// An event retired from the log, for its secondary indexes and the byte count.
struct Retired {
    seq: u64,
    priority: u8,
    expires_at_ms: Option<u64>,
    size: u64,
}

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
    SetCursor { name: String, sequence: u64, reply: Done },
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
}

impl Pending {
    fn fail(self, error: &AppendError) {
        match self {
            Pending::Append(tx, _) => tx.send(Err(error.clone())),
            Pending::Done(tx) => tx.send(Err(error.clone())),
            Pending::Sweep(tx, _) => tx.send(Err(error.clone())),
            Pending::Replay(tx, _) => tx.send(Err(error.clone().into())),
            Pending::Purge(tx, _) => tx.send(Err(error.clone().into())),
        }
    }

    fn succeed(self) {
        match self {
            Pending::Append(tx, outcome) => tx.send(outcome),
            Pending::Done(tx) => tx.send(Ok(())),
            Pending::Sweep(tx, report) => tx.send(Ok(report)),
            Pending::Replay(tx, outcome) => tx.send(outcome),
            Pending::Purge(tx, outcome) => tx.send(outcome),
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
    deliveries: Table<'t, u128, &'static [u8]>,
    by_priority: Table<'t, (u8, u64), u32>,
    expiry: Table<'t, (u64, u64), ()>,
    dead: Table<'t, u64, &'static [u8]>,
    cursors: Table<'t, &'static str, u64>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Self, redb::TableError> {
        Ok(Self {
            log: txn.open_table(tables::LOG)?,
            dedup: txn.open_table(tables::DEDUP)?,
            dedup_age: txn.open_table(tables::DEDUP_AGE)?,
            deliveries: txn.open_table(tables::DELIVERIES)?,
            by_priority: txn.open_table(tables::BY_PRIORITY)?,
            expiry: txn.open_table(tables::EXPIRY)?,
            dead: txn.open_table(tables::DEAD)?,
            cursors: txn.open_table(tables::CURSORS)?,
        })
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
    meta.save(&mut txn.open_table(tables::META)?)?;
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
            {
                let mut t = Tables::open(&txn)?;
                let now_ms = self.clock.now_millis();
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
                        Request::SetCursor { name, sequence, reply } => {
                            let current = t.cursors.get(name.as_str())?.map_or(0, |v| v.value());
                            if sequence > current {
                                t.cursors.insert(name.as_str(), sequence)?;
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
                        Request::Shutdown => {}
                    }
                }
                for reply in deferred.drain(..) {
                    let report = self.sweep(&mut t, now_ms)?;
                    pending.push(Pending::Sweep(reply, report));
                }
                if cursors_moved && self.last_retire.is_none_or(|at| at.elapsed() >= RETIRE_INTERVAL) {
                    self.retire_delivered(&mut t)?;
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
            self.meta.save(&mut meta)?;
        }
        txn.commit()?;
        self.unsynced = self.config.durability == Durability::None;
        Ok(())
    }

    /// Notices the store file vanishing (deleted, or replaced by another),
    /// once: from then on appends are refused (see [`StoreHealth::Vanished`]).
    fn check_file(&mut self) {
        if self.vanished.is_some() {
            return;
        }
        let Some(reason) = self.identity.and_then(|id| id.lost(&self.shared.path)) else { return };
        tracing::error!(path = %self.shared.path.display(), "{reason}");
        self.shared.set_health(StoreHealth::Vanished { reason: reason.clone() });
        self.vanished = Some(reason);
    }

    /// Reads the free space on the store's file system (once per commit,
    /// so another process filling the disk is noticed at the next write).
    fn check_disk(&mut self) {
        if self.config.min_free_disk_bytes == 0 {
            return;
        }
        let dir = self.shared.path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
        self.disk_free = free_disk_bytes(dir).unwrap_or(u64::MAX);
        let reserve = self.config.min_free_disk_bytes;
        if self.vanished.is_none() && self.fault.is_none() {
            let health = if self.disk_free < reserve {
                StoreHealth::DiskLow { free_bytes: self.disk_free, reserve_bytes: reserve }
            } else {
                StoreHealth::Ok
            };
            let low = !health.is_ok();
            if self.shared.set_health(health) {
                if low {
                    tracing::warn!(
                        free = self.disk_free,
                        reserve,
                        "disk nearly full: ingest refused until space frees up"
                    );
                } else {
                    tracing::info!(free = self.disk_free, "disk space recovered: ingest resumes");
                }
            }
        }
    }

    /// A write failed with `reason`: close the database so it can be
    /// reopened, and say so (logged when the failure starts and then at
    /// most once a minute).
    fn fail(&mut self, reason: String) {
        let now = Instant::now();
        let since_ms = self.clock.now_millis();
        let fault = self.fault.get_or_insert_with(|| Fault {
            reason: reason.clone(),
            since_ms,
            attempts: 0,
            next_try: now,
            last_logged: now - FAULT_LOG_INTERVAL,
        });
        fault.reason = reason;
        let backoff = HEAL_BACKOFF_BASE.saturating_mul(1 << fault.attempts.min(16)).min(HEAL_BACKOFF_CAP);
        fault.next_try = now + backoff;
        if fault.last_logged.elapsed() >= FAULT_LOG_INTERVAL {
            fault.last_logged = now;
            tracing::error!(
                path = %self.shared.path.display(),
                error = %fault.reason,
                attempts = fault.attempts,
                retry_in = ?backoff,
                "store write failed: ingest refused while the store reopens"
            );
        }
        self.shared.set_health(StoreHealth::Failing {
            reason: fault.reason.clone(),
            since_ms: fault.since_ms,
            attempts: fault.attempts,
        });
        self.close();
        // Readers go on from the store as it is on disk, read without
        // writing, until a reopen can write again.
        if let Some(reopen) = &self.reopen
            && let Ok(db) = guard(&self.shared.path, || reopen.peek())
        {
            self.shared.put_read_only(Arc::new(db));
        }
    }

    /// Drops every handle to the database: readers lose it at once, and the
    /// writer waits (briefly) for reads in progress to let go.
    fn close(&mut self) {
        let ours = self.db.take();
        let theirs = self.shared.take();
        drop(theirs);
        if let Some(db) = ours {
            let deadline = Instant::now() + READERS_GRACE;
            while Arc::strong_count(&db) > 1 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    /// Reopens the store when the backoff allows.
    fn try_heal(&mut self) {
        if self.fault.as_ref().is_some_and(|f| Instant::now() >= f.next_try) {
            self.try_heal_now();
        }
    }

    /// Reopens the store and probes it with a write; on success readers get
    /// the new database back and health is `Ok` again.
    fn try_heal_now(&mut self) {
        let Some(reopen) = &self.reopen else {
            if let Some(f) = &mut self.fault {
                // A caller's backend cannot be reopened: stay refused.
                f.next_try = Instant::now() + HEAL_BACKOFF_CAP;
            }
            return;
        };
        if let Some(f) = &mut self.fault {
            f.attempts += 1;
        }
        let path = self.shared.path.clone();
        let opened = guard(&path, || {
            let db = reopen.open()?;
            let meta =
                load(&db).map_err(|e| StoreError::Open { path: path.display().to_string(), source: Box::new(e) })?;
            Ok((db, meta))
        });
        match opened {
            Ok((db, meta)) => {
                self.hlc = HlcState::resume(Hlc(meta.hlc.max(self.hlc.high_water().0)));
                self.meta = meta;
                let db = Arc::new(db);
                self.shared.put(db.clone());
                self.db = Some(db);
                self.committed.send_replace(self.meta.next_sequence - 1);
                self.recovered();
            }
            Err(e) => self.fail(e.to_string()),
        }
    }

    /// The commit count of the store as it is on disk, read without writing.
    fn peek_commits(&self) -> Result<u64, StoreError> {
        // After `fail`, readers hold the store as it is on disk, read without writing.
        let db = self.shared.db()?;
        guard(&self.shared.path, || {
            let txn = db.begin_read().map_err(super::storage)?;
            let meta = Meta::load(&txn.open_table(tables::META).map_err(super::storage)?).map_err(super::storage)?;
            Ok(meta.commits)
        })
    }

    /// A write or reopen succeeded: clear the fault and say so.
    fn recovered(&mut self) {
        if let Some(f) = self.fault.take() {
            tracing::info!(
                path = %self.shared.path.display(),
                attempts = f.attempts,
                "store writes again: ingest resumes"
            );
            let health = match &self.vanished {
                Some(reason) => StoreHealth::Vanished { reason: reason.clone() },
                None => StoreHealth::Ok,
            };
            self.shared.set_health(health);
        }
    }

    /// Stores one request's events, or refuses the whole request.
    fn append(
        &mut self,
        t: &mut Tables<'_>,
        events: Vec<PreparedEvent>,
        now_ms: u64,
    ) -> Result<Result<Vec<Appended>, AppendError>, redb::Error> {
        // Pass 1: which events are new, and how much room they need.
        enum Slot {
            New,
            StoredAs(u64),
            SameAs(usize),
        }
        let mut slots = Vec::with_capacity(events.len());
        let mut first_in_request: HashMap<&str, usize> = HashMap::new();
        let mut needed = 0u64;
        let mut max_priority = 0u8;
        let redelivery = events.iter().any(|e| matches!(e.dedup, Dedup::Delivery { redelivered: true, .. }));
        let delivered = if redelivery { stored_deliveries(t)? } else { HashMap::new() };
        for (i, e) in events.iter().enumerate() {
            if e.dedup != Dedup::None {
                // A first delivery is never a repeat; only the broker's flagged ones are looked up.
                let look_up = matches!(e.dedup, Dedup::Producer | Dedup::Delivery { redelivered: true, .. });
                let stored = if look_up {
                    t.dedup.get(e.id.as_str())?.map(|v| v.value()).or_else(|| delivered.get(&e.id).copied())
                } else {
                    None
                };
                if let Some(seq) = stored {
                    slots.push(Slot::StoredAs(seq));
                    continue;
                }
                if let Some(&j) = first_in_request.get(e.id.as_str()) {
                    slots.push(Slot::SameAs(j));
                    continue;
                }
                first_in_request.insert(&e.id, i);
            }
            needed += e.record_len();
            max_priority = max_priority.max(e.priority);
            slots.push(Slot::New);
        }
        if let Err(refusal) = self.make_room(t, needed, max_priority)? {
            return Ok(Err(refusal));
        }

        // Pass 2: assign sequence and HLC, write the records and indexes.
        let mut out: Vec<Appended> = Vec::with_capacity(events.len());
        let mut record = Vec::new();
        let mut batches: Vec<(u128, Vec<(String, u64)>)> = Vec::new();
        drop(first_in_request);
        for (e, slot) in events.into_iter().zip(slots) {
            let (sequence, duplicate) = match slot {
                Slot::StoredAs(seq) => (seq, true),
                Slot::SameAs(j) => (out[j].sequence, true),
                Slot::New => {
                    let seq = self.meta.next_sequence;
                    self.meta.next_sequence += 1;
                    record.clear();
                    self.stamp(&e, now_ms, &mut record);
                    t.log.insert(seq, record.as_slice())?;
                    match e.dedup {
                        Dedup::None => {}
                        Dedup::Producer => {
                            t.dedup.insert(e.id.as_str(), seq)?;
                            t.dedup_age.insert(seq, (now_ms, e.id.as_str()))?;
                        }
                        Dedup::Delivery { batch, .. } => match batches.iter_mut().find(|(b, _)| *b == batch) {
                            Some((_, ids)) => ids.push((e.id.clone(), seq)),
                            None => batches.push((batch, vec![(e.id.clone(), seq)])),
                        },
                    }
                    t.by_priority.insert((e.priority, seq), record.len() as u32)?;
                    if let Some(at) = e.expires_at_ms {
                        t.expiry.insert((at, seq), ())?;
                    }
                    self.meta.log_bytes += record.len() as u64;
                    self.meta.accepted_events += 1;
                    (seq, false)
                }
            };
            if duplicate {
                self.meta.dedup_hits += 1;
            }
            out.push(Appended { id: e.id, sequence, duplicate });
        }
        for (batch, mut ids) in batches {
            // Should a batch ever span two requests, its record holds both.
            if let Some(earlier) = t.deliveries.get(batch)? {
                ids.extend(decode_deliveries(earlier.value()));
            }
            let row = postcard::to_allocvec(&ids).expect("encoding to a Vec cannot fail");
            t.deliveries.insert(batch, row.as_slice())?;
        }
        Ok(Ok(out))
    }

    /// The stored record of a prepared event: its header, with a fresh HLC, then its body.
    fn stamp(&mut self, e: &PreparedEvent, now_ms: u64, out: &mut Vec<u8>) {
        let header = RecordHeader { hlc: self.hlc.tick(now_ms), expires_at_ms: e.expires_at_ms, priority: e.priority };
        event::encode_record(header, &e.body, out);
    }

    fn used_bytes(&self) -> u64 {
        self.meta.log_bytes + self.meta.dead_bytes
    }

    /// Ensures `needed` bytes fit under the quota, evicting under
    /// `drop-oldest`. Evicts nothing unless the whole request will fit.
    fn make_room(
        &mut self,
        t: &mut Tables<'_>,
        needed: u64,
        max_priority: u8,
    ) -> Result<Result<(), AppendError>, redb::Error> {
        let quota = self.config.quota_bytes;
        let mut free = quota.saturating_sub(self.used_bytes());
        if let Some(refusal) = self.disk_refusal() {
            return Ok(Err(refusal));
        }
        if needed > free {
            // Delivered events make way first: nothing is lost by removing them.
            self.retire_delivered(t)?;
            free = quota.saturating_sub(self.used_bytes());
        }
        if needed <= free {
            return Ok(Ok(()));
        }
        if needed > quota {
            return Ok(Err(AppendError::TooLarge { needed, quota }));
        }
        let full = AppendError::Full { needed, free, quota, retry_after: FULL_RETRY_AFTER };
        if self.config.full_policy == FullPolicy::Reject {
            return Ok(Err(full));
        }
        // Only events no more important than the newcomers may make way.
        let shortfall = needed - free;
        let mut evictable = 0u64;
        for row in t.by_priority.range(..=(max_priority, u64::MAX))? {
            evictable += u64::from(row?.1.value());
            if evictable >= shortfall {
                break;
            }
        }
        if evictable < shortfall {
            return Ok(Err(full));
        }
        let (mut freed, mut count) = (0u64, 0u64);
        while freed < shortfall {
            let Some((key, _)) = t.by_priority.pop_first()? else {
                break;
            };
            let (_, seq) = key.value();
            drop(key);
            let size = self.remove_from_log(t, seq)?;
            freed += size;
            count += 1;
        }
        self.meta.evicted_events += count;
        self.meta.evicted_bytes += freed;
        tracing::warn!(events = count, bytes = freed, "store full: evicted the oldest lowest-priority events");
        Ok(Ok(()))
    }

    /// A refusal if the file system is below the free-space reserve (as read
    /// at this commit), so the agent never fills the disk even when the
    /// quota is set too high for it.
    fn disk_refusal(&self) -> Option<AppendError> {
        let (free, reserve) = (self.disk_free, self.config.min_free_disk_bytes);
        (free < reserve).then_some(AppendError::DiskFull { free, reserve, retry_after: FULL_RETRY_AFTER })
    }

    /// Moves the record at `sequence`, which no longer decodes, out of the
    /// log into the dead letters as it is, with its index entries. Its
    /// header may be unreadable too, so the indexes are searched for it.
    fn set_aside_unreadable(
        &mut self,
        t: &mut Tables<'_>,
        sequence: u64,
        reason: &str,
        now_ms: u64,
    ) -> Result<(), redb::Error> {
        let Some(record) = t.log.remove(sequence)?.map(|r| r.value().to_vec()) else { return Ok(()) };
        self.meta.log_bytes = self.meta.log_bytes.saturating_sub(record.len() as u64);
        t.by_priority.retain(|(_, seq), _| seq != sequence)?;
        t.expiry.retain(|(_, seq), _| seq != sequence)?;
        t.dedup_age.remove(sequence)?;
        self.dead_letter(t, sequence, reason, now_ms, record, None)?;
        Ok(())
    }

    /// Deletes a record and its expiry entry; returns its size. The caller
    /// has already removed (or is iterating) its priority entry.
    fn remove_from_log(&mut self, t: &mut Tables<'_>, seq: u64) -> Result<u64, redb::Error> {
        let Some(record) = t.log.remove(seq)? else {
            return Ok(0);
        };
        let bytes = record.value();
        let size = bytes.len() as u64;
        if let Ok((header, _)) = event::decode_header(bytes)
            && let Some(at) = header.expires_at_ms
        {
            drop(record);
            t.expiry.remove((at, seq))?;
        }
        self.meta.log_bytes = self.meta.log_bytes.saturating_sub(size);
        Ok(size)
    }

    /// Expires events past their TTL into dead letters, forgets dedup ids
    /// older than the window, and keeps dead letters within their share.
    fn sweep(&mut self, t: &mut Tables<'_>, now_ms: u64) -> Result<SweepReport, redb::Error> {
        let mut report = SweepReport::default();
        while (report.expired as usize) < SWEEP_LIMIT {
            let Some((key, _)) = t.expiry.first()? else {
                break;
            };
            let (at, seq) = key.value();
            drop(key);
            if at > now_ms {
                break;
            }
            t.expiry.remove((at, seq))?;
            let record = t.log.remove(seq)?.map(|r| r.value().to_vec());
            if let Some(record) = record {
                let priority = event::decode_header(&record).map_or(0, |(h, _)| h.priority);
                t.by_priority.remove((priority, seq))?;
                self.meta.log_bytes = self.meta.log_bytes.saturating_sub(record.len() as u64);
                self.dead_letter(t, seq, "ttl expired", now_ms, record, None)?;
                report.expired += 1;
            }
        }
        self.meta.expired_events += report.expired;

        let window_ms = u64::try_from(self.config.dedup_window.as_millis()).unwrap_or(u64::MAX);
        let cutoff = now_ms.saturating_sub(window_ms);
        while (report.dedup_pruned as usize) < SWEEP_LIMIT {
            let Some((key, value)) = t.dedup_age.first()? else {
                break;
            };
            let (seq, (at, id)) = (key.value(), value.value());
            if at >= cutoff {
                break;
            }
            let id = id.to_owned();
            drop((key, value));
            t.dedup_age.remove(seq)?;
            // The id may since have been stored again under a newer sequence.
            if t.dedup.get(id.as_str())?.is_some_and(|v| v.value() == seq) {
                t.dedup.remove(id.as_str())?;
            }
            report.dedup_pruned += 1;
        }

        // A batch's record outlives the window only when its acks never
        // reached the broker (the agent stopped between commit and ack).
        let cutoff_key = u128::from(cutoff) << 80;
        for row in t.deliveries.extract_from_if(..cutoff_key, |_, _| true)?.take(SWEEP_LIMIT) {
            let (_, ids) = row?;
            report.dedup_pruned += decode_deliveries(ids.value()).len() as u64;
        }

        report.delivered = self.retire_delivered(t)?;

        let dead_cap = self.config.quota_bytes / DEAD_LETTER_SHARE;
        while self.meta.dead_bytes > dead_cap {
            let Some((_, v)) = t.dead.pop_first()? else {
                break;
            };
            self.meta.dead_bytes = self.meta.dead_bytes.saturating_sub(v.value().len() as u64);
            report.dead_dropped += 1;
        }
        if report.dead_dropped > 0 {
            self.meta.dead_dropped += report.dead_dropped;
            tracing::warn!(
                dropped = report.dead_dropped,
                "dead letters over their share of the quota: dropped the oldest"
            );
        }
        Ok(report)
    }

    /// Removes events every consumer routing them has acknowledged; keeps
    /// events no consumer routes (a destination added later will want them).
    /// Bounded per call; resumes from `retention_floor` next time.
    fn retire_delivered(&mut self, t: &mut Tables<'_>) -> Result<u64, redb::Error> {
        self.last_retire = Some(Instant::now());
        let consumers = &self.config.consumers;
        if consumers.is_empty() {
            return Ok(0);
        }
        let fingerprint = consumers_fingerprint(consumers);
        if self.meta.consumers_hash != fingerprint {
            // Different destinations now: earlier verdicts on kept events no longer hold.
            self.meta.consumers_hash = fingerprint;
            self.meta.retention_floor = 0;
        }
        let mut upto = u64::MAX;
        for c in consumers {
            upto = upto.min(t.cursors.get(c.name.as_str())?.map_or(0, |v| v.value()));
        }
        let floor = self.meta.retention_floor;
        if upto <= floor {
            return Ok(0);
        }
        // Bound the pass to `SWEEP_LIMIT` rows: stop before the first row past them.
        let last = match t.log.range(floor + 1..=upto)?.nth(SWEEP_LIMIT) {
            Some(row) => row?.0.value() - 1,
            None => upto,
        };
        self.meta.retention_floor = last;
        // One pass over the range both decides and removes (far cheaper than a
        // lookup and a removal per event); the secondary indexes follow.
        let mut doomed: Vec<Retired> = Vec::new();
        t.log.retain_in(floor + 1..=last, |seq, record| {
            // An unreadable record is kept for an operator to inspect rather than lost.
            let Ok(subject) = event::decode_subject(record) else { return true };
            if !consumers.iter().any(|c| c.routes(subject)) {
                return true;
            }
            let Ok((header, _)) = event::decode_header(record) else { return true };
            doomed.push(Retired {
                seq,
                priority: header.priority,
                expires_at_ms: header.expires_at_ms,
                size: record.len() as u64,
            });
            false
        })?;
        // Per priority, the retired entries of the index are one key range.
        let mut priorities: Vec<u8> = doomed.iter().map(|r| r.priority).collect();
        priorities.sort_unstable();
        priorities.dedup();
        for p in priorities {
            let seqs: Vec<u64> = doomed.iter().filter(|r| r.priority == p).map(|r| r.seq).collect();
            let (lo, hi) = (seqs[0], seqs[seqs.len() - 1]);
            t.by_priority.retain_in((p, lo)..=(p, hi), |(_, seq), _| seqs.binary_search(&seq).is_err())?;
        }
        for r in &doomed {
            if let Some(at) = r.expires_at_ms {
                t.expiry.remove((at, r.seq))?;
            }
            self.meta.log_bytes = self.meta.log_bytes.saturating_sub(r.size);
        }
        self.meta.delivered_events += doomed.len() as u64;
        Ok(doomed.len() as u64)
    }

    fn dead_letter(
        &mut self,
        t: &mut Tables<'_>,
        sequence: u64,
        reason: &str,
        at_ms: u64,
        record: Vec<u8>,
        destination: Option<String>,
    ) -> Result<(), redb::Error> {
        let number = self.meta.next_dead.max(1);
        self.meta.next_dead = number + 1;
        let bytes = DeadLetter { number, sequence, reason: reason.to_owned(), at_ms, record, destination }.encode();
        self.meta.dead_bytes += bytes.len() as u64;
        t.dead.insert(number, bytes.as_slice())?;
        Ok(())
    }

    /// Moves dead letters back into the log as new events (see
    /// [`super::Store::replay_dead_letters`]). Checks every number before
    /// changing anything.
    fn replay(
        &mut self,
        t: &mut Tables<'_>,
        numbers: &[u64],
        now_ms: u64,
    ) -> Result<Result<Vec<Replayed>, DeadLetterError>, redb::Error> {
        let mut letters = Vec::with_capacity(numbers.len());
        for &number in numbers {
            let Some(raw) = t.dead.get(number)? else { return Ok(Err(DeadLetterError::NotFound(number))) };
            let raw_len = raw.value().len() as u64;
            let unreadable = |e: DecodeError| DeadLetterError::Unreadable { number, reason: e.to_string() };
            let letter = match DeadLetter::decode(number, raw.value()) {
                Ok(l) => l,
                Err(e) => return Ok(Err(unreadable(e))),
            };
            let mut event = match letter.event() {
                Ok(e) => e,
                Err(e) => return Ok(Err(unreadable(e))),
            };
            if let Err(reason) = event::check_body(&event.body) {
                return Ok(Err(DeadLetterError::Undeliverable { number, reason }));
            }
            if let Some(d) = &letter.destination {
                event.body.extensions.retain(|(k, _)| k != event::ROUTE_EXTENSION);
                event.body.extensions.push((event::ROUTE_EXTENSION.to_owned(), d.clone()));
            }
            letters.push((number, raw_len, letter.destination, event));
        }
        let mut out = Vec::with_capacity(letters.len());
        let mut record = Vec::new();
        for (number, raw_len, destination, event) in letters {
            t.dead.remove(number)?;
            self.meta.dead_bytes = self.meta.dead_bytes.saturating_sub(raw_len);
            // A replay is the operator's decision: no TTL, and no dedup entry
            // (the original id may still be in the log for other destinations).
            let prepared = PreparedEvent::new(&event.body, Dedup::None, event.priority, None);
            let sequence = self.meta.next_sequence;
            self.meta.next_sequence += 1;
            record.clear();
            self.stamp(&prepared, now_ms, &mut record);
            t.log.insert(sequence, record.as_slice())?;
            t.by_priority.insert((prepared.priority, sequence), record.len() as u32)?;
            self.meta.log_bytes += record.len() as u64;
            out.push(Replayed { number, id: prepared.id, sequence, destination });
        }
        Ok(Ok(out))
    }

    /// Deletes dead letters `numbers` (all when `None`), after checking every number.
    fn purge(
        &mut self,
        t: &mut Tables<'_>,
        numbers: Option<Vec<u64>>,
    ) -> Result<Result<u64, DeadLetterError>, redb::Error> {
        let numbers = match numbers {
            Some(n) => n,
            None => t.dead.iter()?.map(|r| r.map(|(k, _)| k.value())).collect::<Result<Vec<_>, _>>()?,
        };
        for &n in &numbers {
            if t.dead.get(n)?.is_none() {
                return Ok(Err(DeadLetterError::NotFound(n)));
            }
        }
        let mut removed = 0;
        for n in numbers {
            if let Some(v) = t.dead.remove(n)? {
                self.meta.dead_bytes = self.meta.dead_bytes.saturating_sub(v.value().len() as u64);
                removed += 1;
            }
        }
        Ok(Ok(removed))
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
                self.meta.save(&mut meta)?;
            }
            txn.commit()?;
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
