//! Offline inspection of a store file, for `ferry store inspect|verify`:
//! opens it exactly as the agent would (the same refusals, the same repair
//! of a file that was not closed cleanly, the same handling of a panic in
//! redb), but with every write kept in memory, so it changes nothing, and
//! it refuses a file an agent holds open. What it reports is what `ferry
//! run` will find.

use std::path::Path;

use redb::{Database, ReadOnlyDatabase, ReadableDatabase, ReadableTable, ReadableTableMetadata};
use serde::Serialize;

use super::health::{check_file, guard};
use super::overlay::OverlayBackend;
use super::{DeadLetter, Meta, StoreError, storage, tables};
use crate::event;

/// One end of the log.
#[derive(Debug, Clone, Serialize)]
pub struct LogEnd {
    /// The event's sequence.
    pub sequence: u64,
    /// When it was accepted, in ms since the epoch (from its HLC).
    pub accepted_ms: u64,
    /// Its subject (local topic), if the record decodes.
    pub subject: Option<String>,
}

/// A destination's cursor and what is left after it.
#[derive(Debug, Clone, Serialize)]
pub struct CursorView {
    /// The destination.
    pub destination: String,
    /// Every event at or below was delivered.
    pub acked_sequence: u64,
    /// Events accepted after it (an upper bound on its backlog).
    pub backlog_events: u64,
}

/// What `ferry store inspect` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    /// The redb file.
    pub path: String,
    /// Its size on disk.
    pub file_bytes: u64,
    /// Whether the last agent closed it cleanly (if not, the agent repairs
    /// it on start, as this inspection did in memory).
    pub clean_shutdown: bool,
    /// Events in the log.
    pub events: u64,
    /// Bytes of event records.
    pub event_bytes: u64,
    /// The oldest event in the log.
    pub oldest: Option<LogEnd>,
    /// The newest event in the log.
    pub newest: Option<LogEnd>,
    /// Sequence of the newest event ever accepted.
    pub last_sequence: u64,
    /// Dead letters held.
    pub dead_letters: u64,
    /// Bytes of dead letters.
    pub dead_letter_bytes: u64,
    /// Dead letters by reason (the 10 most common).
    pub dead_letter_reasons: Vec<(String, u64)>,
    /// Ids remembered for deduplication.
    pub dedup_entries: u64,
    /// Per-destination cursors.
    pub cursors: Vec<CursorView>,
    /// The persistent counters.
    pub counters: Meta,
}

/// Why a store file cannot be inspected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InspectError {
    /// No file there.
    #[error("no store at {0} (give the agent's data directory or the .redb file)")]
    Missing(String),
    /// An agent has the file open for writing.
    #[error("{0} is open in a running agent; stop it first, or use `ferry status` against it")]
    InUse(String),
    /// The file could not be opened.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The file.
        path: String,
        /// The cause.
        source: Box<redb::DatabaseError>,
    },
    /// A read failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Opens the store file at `path` as the agent would, in memory: returns
/// the database and whether the file was closed cleanly.
fn open_as_agent(path: &Path) -> Result<(Database, bool, u64), InspectError> {
    let shown = path.display().to_string();
    let file_bytes = match std::fs::metadata(path) {
        Ok(m) if m.is_file() => m.len(),
        _ => return Err(InspectError::Missing(shown)),
    };
    check_file(path)?;
    // A read-only open tells a running agent's lock and an unclean shutdown apart.
    let clean = match guard(path, || Ok(ReadOnlyDatabase::open(path))) {
        Ok(Ok(_)) => true,
        Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen)) => return Err(InspectError::InUse(shown)),
        Ok(Err(_)) | Err(_) => false,
    };
    let db = guard(path, || {
        let backend = OverlayBackend::open(path).map_err(|e| super::open_error(path, e.into()))?;
        redb::Builder::new().create_with_backend(backend).map_err(|e| super::open_error(path, e.into()))
    })?;
    Ok((db, clean, file_bytes))
}

/// Inspects the store file at `path` without changing it.
pub fn inspect(path: &Path) -> Result<Inspection, InspectError> {
    let shown = path.display().to_string();
    let (db, clean_shutdown, file_bytes) = open_as_agent(path)?;
    guard(path, || inspect_db(&db, shown, clean_shutdown, file_bytes)).map_err(InspectError::from)
}

fn inspect_db(db: &Database, shown: String, clean_shutdown: bool, file_bytes: u64) -> Result<Inspection, StoreError> {
    let txn = db.begin_read().map_err(storage)?;
    // A file from an agent that never committed lacks tables: report it empty.
    let meta = match txn.open_table(tables::META) {
        Ok(t) => Meta::load(&t).map_err(storage)?,
        Err(redb::TableError::TableDoesNotExist(_)) => Meta::default(),
        Err(e) => return Err(storage(e)),
    };
    let end = |row: Option<(redb::AccessGuard<u64>, redb::AccessGuard<&[u8]>)>| -> Option<LogEnd> {
        let (k, v) = row?;
        let sequence = k.value();
        let (header, _) = event::decode_header(v.value()).ok()?;
        Some(LogEnd {
            sequence,
            accepted_ms: header.hlc.millis(),
            subject: event::decode_subject(v.value()).ok().map(str::to_owned),
        })
    };
    let (events, oldest, newest) = match txn.open_table(tables::LOG) {
        Ok(log) => (log.len().map_err(storage)?, end(log.first().map_err(storage)?), end(log.last().map_err(storage)?)),
        Err(redb::TableError::TableDoesNotExist(_)) => (0, None, None),
        Err(e) => return Err(storage(e)),
    };
    let last_sequence = meta.next_sequence.saturating_sub(1).max(newest.as_ref().map_or(0, |n| n.sequence));
    let mut reasons: Vec<(String, u64)> = Vec::new();
    let mut dead_letters = 0;
    if let Ok(dead) = txn.open_table(tables::DEAD) {
        for row in dead.iter().map_err(storage)? {
            let (k, v) = row.map_err(storage)?;
            dead_letters += 1;
            let reason =
                DeadLetter::decode(k.value(), v.value()).map_or_else(|e| format!("unreadable: {e}"), |d| d.reason);
            match reasons.iter_mut().find(|(r, _)| *r == reason) {
                Some((_, n)) => *n += 1,
                None => reasons.push((reason, 1)),
            }
        }
    }
    reasons.sort_by_key(|r| std::cmp::Reverse(r.1));
    reasons.truncate(10);
    let mut cursors = Vec::new();
    if let Ok(t) = txn.open_table(tables::CURSORS) {
        for row in t.iter().map_err(storage)? {
            let (k, v) = row.map_err(storage)?;
            cursors.push(CursorView {
                destination: k.value().to_owned(),
                acked_sequence: v.value(),
                backlog_events: last_sequence.saturating_sub(v.value()),
            });
        }
    }
    let dedup_entries = txn.open_table(tables::DEDUP).map_or(0, |t| t.len().unwrap_or(0));
    Ok(Inspection {
        path: shown,
        file_bytes,
        clean_shutdown,
        events,
        event_bytes: meta.log_bytes,
        oldest,
        newest,
        last_sequence,
        dead_letters,
        dead_letter_bytes: meta.dead_bytes,
        dead_letter_reasons: reasons,
        dedup_entries,
        cursors,
        counters: meta,
    })
}

/// An unreadable record `ferry store verify` found.
#[derive(Debug, Clone, Serialize)]
pub struct Unreadable {
    /// The table (`log`, `dead_letters`, …).
    pub table: &'static str,
    /// Its key: the sequence or dead-letter number.
    pub key: u64,
    /// Why it does not decode.
    pub reason: String,
}

/// What `ferry store verify` found.
#[derive(Debug, Clone, Serialize)]
pub struct Verification {
    /// The redb file.
    pub path: String,
    /// Whether the last agent closed it cleanly.
    pub clean_shutdown: bool,
    /// Event records read and decoded.
    pub events: u64,
    /// Dead letters read and decoded.
    pub dead_letters: u64,
    /// Records that do not decode (the first 100).
    pub unreadable: Vec<Unreadable>,
    /// How many records do not decode in all.
    pub unreadable_count: u64,
    /// Other inconsistencies (counters against what the tables hold).
    pub warnings: Vec<String>,
}

impl Verification {
    /// Whether every record reads.
    pub fn is_clean(&self) -> bool {
        self.unreadable_count == 0
    }
}

/// Most unreadable records listed one by one.
const LIST_UNREADABLE: usize = 100;

/// Opens the store at `path` as the agent would and decodes every event
/// record and dead letter, without changing the file. A file the agent
/// could not open is an error; unreadable records are listed (the agent
/// moves each to the dead letters when it reaches it).
pub fn verify(path: &Path) -> Result<Verification, InspectError> {
    let shown = path.display().to_string();
    let (db, clean_shutdown, _) = open_as_agent(path)?;
    guard(path, || {
        let txn = db.begin_read().map_err(storage)?;
        let mut v = Verification {
            path: shown,
            clean_shutdown,
            events: 0,
            dead_letters: 0,
            unreadable: Vec::new(),
            unreadable_count: 0,
            warnings: Vec::new(),
        };
        let mut found = |table: &'static str, key: u64, reason: String| {
            if v.unreadable.len() < LIST_UNREADABLE {
                v.unreadable.push(Unreadable { table, key, reason });
            }
            v.unreadable_count += 1;
        };
        let mut log_bytes = 0u64;
        if let Ok(log) = txn.open_table(tables::LOG) {
            for row in log.iter().map_err(storage)? {
                let (k, r) = row.map_err(storage)?;
                v.events += 1;
                log_bytes += r.value().len() as u64;
                if let Err(e) = event::decode_record(k.value(), r.value()) {
                    found("log", k.value(), e.to_string());
                }
            }
        }
        if let Ok(dead) = txn.open_table(tables::DEAD) {
            for row in dead.iter().map_err(storage)? {
                let (k, r) = row.map_err(storage)?;
                v.dead_letters += 1;
                match DeadLetter::decode(k.value(), r.value()) {
                    Ok(d) if !d.record.is_empty() && !d.reason.starts_with("unreadable") => {
                        if let Err(e) = d.event() {
                            found("dead_letters", k.value(), format!("its event: {e}"));
                        }
                    }
                    Ok(_) => {}
                    Err(e) => found("dead_letters", k.value(), e.to_string()),
                }
            }
        }
        let meta = match txn.open_table(tables::META) {
            Ok(t) => Meta::load(&t).map_err(storage)?,
            Err(_) => Meta::default(),
        };
        if meta.log_bytes != log_bytes {
            v.warnings.push(format!(
                "the byte counter says {} bytes of events, the log holds {log_bytes}; quota accounting is off by the difference",
                meta.log_bytes
            ));
        }
        Ok(v)
    })
    .map_err(InspectError::from)
}
