//! Offline inspection of a store file, for `ferry store inspect`: opens it
//! read-only, changes nothing, and refuses a file an agent holds open.

use std::path::Path;

use redb::{ReadOnlyDatabase, ReadableDatabase, ReadableTable, ReadableTableMetadata};
use serde::Serialize;

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
    /// The file needs the recovery an agent does on start.
    #[error("{0} was not closed cleanly and needs recovery; start the agent once (it recovers on open), then stop it")]
    NeedsRecovery(String),
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

/// Inspects the store file at `path` without changing it.
pub fn inspect(path: &Path) -> Result<Inspection, InspectError> {
    let shown = path.display().to_string();
    let file_bytes = match std::fs::metadata(path) {
        Ok(m) if m.is_file() => m.len(),
        _ => return Err(InspectError::Missing(shown)),
    };
    let db = ReadOnlyDatabase::open(path).map_err(|e| match e {
        redb::DatabaseError::DatabaseAlreadyOpen => InspectError::InUse(shown.clone()),
        redb::DatabaseError::RepairAborted => InspectError::NeedsRecovery(shown.clone()),
        e => InspectError::Open { path: shown.clone(), source: Box::new(e) },
    })?;
    let txn = db.begin_read().map_err(storage)?;
    // A file from an agent that never committed lacks tables: report it empty.
    let meta = match txn.open_table(tables::META) {
        Ok(t) => Meta::load(&t).map_err(storage)?,
        Err(redb::TableError::TableDoesNotExist(_)) => Meta::default(),
        Err(e) => return Err(storage(e).into()),
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
        Err(e) => return Err(storage(e).into()),
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
