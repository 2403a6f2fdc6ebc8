//! The durable state tables, in the store's redb file.
//!
//! State changes are few and small next to events, so they are written in
//! their own fsynced redb transactions (redb serialises them with the event
//! writer's group commits) rather than through the writer's queue. One
//! transaction holds a change, its change-log row, what each cloud is
//! known to hold, and the upstream "dirty" marks, so a crash never leaves a
//! change without its pending reconciliation. Blocking: call from
//! `spawn_blocking` or a dedicated thread.

use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::store::SharedDatabase;
use serde::{Deserialize, Serialize};

use super::version::Version;

/// key → [`Entry`] (postcard).
const STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("state");
/// change number → [`Change`] (postcard); the change stream's history.
const CHANGES: TableDefinition<u64, &[u8]> = TableDefinition::new("state_changes");
/// (destination, key) → [`Peer`] (postcard): what that cloud is known to hold.
const PEERS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("state_peers");
/// (destination, key) → (): the merged value must still be sent there.
const DIRTY: TableDefinition<(&str, &str), ()> = TableDefinition::new("state_dirty");
/// name → value: `next_change`, `hlc` (the state HLC high-water mark).
const META: TableDefinition<&str, u64> = TableDefinition::new("state_meta");

/// Changes kept for resuming change streams; older ones are pruned.
const CHANGES_KEPT: u64 = 10_000;

/// Why a state table operation failed.
#[derive(Debug, thiserror::Error)]
#[error("state table: {0}")]
pub struct DbError(String);

impl DbError {
    pub(super) fn new(reason: String) -> Self {
        Self(reason)
    }
}

fn db_err(e: impl std::fmt::Display) -> DbError {
    DbError(e.to_string())
}

/// The merged value of one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The value.
    pub data: Vec<u8>,
    /// Its media type, if known.
    pub content_type: Option<String>,
    /// Its version.
    pub version: Version,
    /// The change that produced it.
    pub change: u64,
}

/// One change of one key, as the change stream delivers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// The key.
    pub key: String,
    /// Its new merged value.
    pub entry: Entry,
}

/// A page of the change history: numbered changes, and the oldest change still kept.
pub type ChangePage = (Vec<(u64, Change)>, Option<u64>);

/// What one cloud is known to hold for one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// The version it holds (received from it, or sent to it).
    pub version: Version,
    /// SHA-256 of the value, to recognise a plain message repeating it
    /// (a retained message delivered again on every subscription).
    pub digest: [u8; 32],
    /// The vector of the last version received from it: what a plain write
    /// made there has certainly seen.
    pub received: Option<super::version::VersionVector>,
}

/// A change to commit: the new entry, peers to record and destinations to mark.
#[derive(Debug, Clone)]
pub struct Commit {
    /// The key.
    pub key: String,
    /// The new value, if the value changes (`None`: only peers change).
    pub entry: Option<(Vec<u8>, Option<String>, Version)>,
    /// (destination, what it holds) to record.
    pub peers: Vec<(String, Peer)>,
    /// Destinations that must be sent the new value.
    pub dirty: Vec<String>,
    /// The state HLC high-water mark to persist.
    pub hlc: u64,
}

/// The state tables of one database.
#[derive(Clone)]
pub struct StateDb {
    db: SharedDatabase,
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).expect("encoding to a Vec cannot fail")
}

fn decode<'a, T: Deserialize<'a>>(what: &str, bytes: &'a [u8]) -> Result<T, DbError> {
    postcard::from_bytes(bytes).map_err(|e| DbError(format!("{what} is unreadable: {e}")))
}

impl StateDb {
    /// Opens (creating if needed) the state tables.
    pub fn open(db: SharedDatabase) -> Result<Self, DbError> {
        let txn = db.get().map_err(|e| DbError(e.to_string()))?.begin_write().map_err(db_err)?;
        {
            txn.open_table(STATE).map_err(db_err)?;
            txn.open_table(CHANGES).map_err(db_err)?;
            txn.open_table(PEERS).map_err(db_err)?;
            txn.open_table(DIRTY).map_err(db_err)?;
            txn.open_table(META).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)?;
        Ok(Self { db })
    }

    /// The database now (the store may be reopening it).
    fn db(&self) -> Result<Arc<Database>, DbError> {
        self.db.get().map_err(|e| DbError(e.to_string()))
    }

    /// The entry of `key`.
    pub fn get(&self, key: &str) -> Result<Option<Entry>, DbError> {
        let txn = self.db()?.begin_read().map_err(db_err)?;
        let t = txn.open_table(STATE).map_err(db_err)?;
        t.get(key).map_err(db_err)?.map(|v| decode("state entry", v.value())).transpose()
    }

    /// Entries whose key starts with `prefix`, in key order, at most `limit`.
    pub fn list(&self, prefix: &str, limit: usize) -> Result<Vec<(String, Entry)>, DbError> {
        let txn = self.db()?.begin_read().map_err(db_err)?;
        let t = txn.open_table(STATE).map_err(db_err)?;
        let mut out = Vec::new();
        for row in t.range(prefix..).map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            if !k.value().starts_with(prefix) || out.len() >= limit {
                break;
            }
            out.push((k.value().to_owned(), decode("state entry", v.value())?));
        }
        Ok(out)
    }

    /// What `destination` is known to hold for `key`.
    pub fn peer(&self, destination: &str, key: &str) -> Result<Option<Peer>, DbError> {
        let txn = self.db()?.begin_read().map_err(db_err)?;
        let t = txn.open_table(PEERS).map_err(db_err)?;
        t.get((destination, key)).map_err(db_err)?.map(|v| decode("peer record", v.value())).transpose()
    }

    /// Every (destination, key) still to be sent, in order.
    pub fn dirty(&self) -> Result<Vec<(String, String)>, DbError> {
        let txn = self.db()?.begin_read().map_err(db_err)?;
        let t = txn.open_table(DIRTY).map_err(db_err)?;
        t.iter()
            .map_err(db_err)?
            .map(|r| r.map(|(k, _)| (k.value().0.to_owned(), k.value().1.to_owned())).map_err(db_err))
            .collect()
    }

    /// Changes numbered above `after`, oldest first, at most `limit`;
    /// also the oldest change still kept (a stream resuming before it
    /// missed changes and should re-read the state).
    pub fn changes_after(&self, after: u64, limit: usize) -> Result<ChangePage, DbError> {
        let txn = self.db()?.begin_read().map_err(db_err)?;
        let t = txn.open_table(CHANGES).map_err(db_err)?;
        let oldest = t.first().map_err(db_err)?.map(|(k, _)| k.value());
        let mut out = Vec::new();
        for row in t.range(after.saturating_add(1)..).map_err(db_err)?.take(limit) {
            let (k, v) = row.map_err(db_err)?;
            out.push((k.value(), decode("state change", v.value())?));
        }
        Ok((out, oldest))
    }

    /// The persisted state HLC high-water mark, and the last change number.
    pub fn meta(&self) -> Result<(u64, u64), DbError> {
        let txn = self.db()?.begin_read().map_err(db_err)?;
        let t = txn.open_table(META).map_err(db_err)?;
        let get = |k: &str| t.get(k).map(|v| v.map_or(0, |v| v.value())).map_err(db_err);
        Ok((get("hlc")?, get("next_change")?.saturating_sub(1)))
    }

    /// Commits `c` in one fsynced transaction; returns the new entry (with
    /// its change number) when the value changed.
    pub fn commit(&self, c: &Commit) -> Result<Option<Entry>, DbError> {
        let txn = self.db()?.begin_write().map_err(db_err)?;
        let mut written = None;
        {
            let mut meta = txn.open_table(META).map_err(db_err)?;
            let hlc = meta.get("hlc").map_err(db_err)?.map_or(0, |v| v.value());
            meta.insert("hlc", hlc.max(c.hlc)).map_err(db_err)?;
            if let Some((data, content_type, version)) = &c.entry {
                let change = meta.get("next_change").map_err(db_err)?.map_or(1, |v| v.value());
                meta.insert("next_change", change + 1).map_err(db_err)?;
                let entry =
                    Entry { data: data.clone(), content_type: content_type.clone(), version: version.clone(), change };
                txn.open_table(STATE)
                    .map_err(db_err)?
                    .insert(c.key.as_str(), encode(&entry).as_slice())
                    .map_err(db_err)?;
                let mut changes = txn.open_table(CHANGES).map_err(db_err)?;
                changes
                    .insert(change, encode(&Change { key: c.key.clone(), entry: entry.clone() }).as_slice())
                    .map_err(db_err)?;
                if change > CHANGES_KEPT {
                    changes.retain_in(..=change - CHANGES_KEPT, |_, _| false).map_err(db_err)?;
                }
                written = Some(entry);
            }
            let mut peers = txn.open_table(PEERS).map_err(db_err)?;
            for (dest, peer) in &c.peers {
                peers.insert((dest.as_str(), c.key.as_str()), encode(peer).as_slice()).map_err(db_err)?;
            }
            let mut dirty = txn.open_table(DIRTY).map_err(db_err)?;
            for dest in &c.dirty {
                dirty.insert((dest.as_str(), c.key.as_str()), ()).map_err(db_err)?;
            }
        }
        txn.commit().map_err(db_err)?;
        Ok(written)
    }

    /// Records that `version` of `key` was queued for `destination`: it is
    /// what that cloud will hold, and the mark is cleared.
    pub fn sent(&self, destination: &str, key: &str, peer: &Peer) -> Result<(), DbError> {
        let txn = self.db()?.begin_write().map_err(db_err)?;
        {
            txn.open_table(PEERS)
                .map_err(db_err)?
                .insert((destination, key), encode(peer).as_slice())
                .map_err(db_err)?;
            txn.open_table(DIRTY).map_err(db_err)?.remove((destination, key)).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)
    }

    /// Clears a mark without sending (the cloud already holds the value).
    pub fn clean(&self, destination: &str, key: &str) -> Result<(), DbError> {
        let txn = self.db()?.begin_write().map_err(db_err)?;
        txn.open_table(DIRTY).map_err(db_err)?.remove((destination, key)).map_err(db_err)?;
        txn.commit().map_err(db_err)
    }
}
