//! Every redb table of the store, in one place, with what it maps.
//!
//! Keys are chosen so that the scans the agent needs are range scans in key
//! order: the log by sequence, evictions by (priority, sequence), expiries by
//! (time, sequence), dedup pruning by sequence.

use redb::TableDefinition;

/// sequence → event record (see [`crate::event::encode_record`]).
pub const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");

/// event id → sequence of the stored event with that id.
pub const DEDUP: TableDefinition<&str, u64> = TableDefinition::new("dedup");

/// sequence → (acceptance time in ms, event id); prunes [`DEDUP`] in age
/// order. Written by earlier releases, one row per event; still read and
/// pruned, no longer written (see [`DEDUP_AGES`]).
pub const DEDUP_AGE: TableDefinition<u64, (u64, &str)> = TableDefinition::new("dedup_age");

/// first sequence of a commit's producer-id events → their acceptance time
/// and (sequence, id) pairs, postcard-encoded (the writer's `AgeRecord`):
/// one row per commit rather than per event; prunes [`DEDUP`] in age order.
pub const DEDUP_AGES: TableDefinition<u64, &[u8]> = TableDefinition::new("dedup_ages");

/// delivery batch (a UUIDv7: key order is age order) → postcard
/// `Vec<(id, sequence)>`: the ids of one batch of broker deliveries that were
/// stored, until the broker has their acks (see [`super::Dedup::Delivery`]).
pub const DELIVERIES: TableDefinition<u128, &[u8]> = TableDefinition::new("deliveries");

/// (priority, sequence) → record size; eviction order under `drop-oldest`.
pub const BY_PRIORITY: TableDefinition<(u8, u64), u32> = TableDefinition::new("by_priority");

/// (expiry time in ms, sequence) → (); TTL sweeps.
pub const EXPIRY: TableDefinition<(u64, u64), ()> = TableDefinition::new("expiry");

/// (sequence, acceptance time in ms) → (): delivered events kept in the log
/// for replay (`store.retain_delivered`), oldest first. Such an event has no
/// [`BY_PRIORITY`] or [`EXPIRY`] entry: it is evicted from here first. (The
/// key and value types are [`EXPIRY`]'s, which keeps the binary small.)
pub const RETAINED: TableDefinition<(u64, u64), ()> = TableDefinition::new("retained");

/// dead-letter number → dead-letter record (see [`super::DeadLetter`]).
pub const DEAD: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");

/// destination name → highest sequence acknowledged (everything at or below was delivered).
pub const CURSORS: TableDefinition<&str, u64> = TableDefinition::new("cursors");

/// [`move_key`] (destination, cursor) → when that cursor move was
/// committed, in ms: a receipt's delivery time (the first move at or past the
/// event). Pruned below the log's oldest event. (Keyed by text to share
/// [`CURSORS`]'s types, which keeps the binary small.)
pub const CURSOR_MOVES: TableDefinition<&str, u64> = TableDefinition::new("cursor_moves");

/// The [`CURSOR_MOVES`] key of `destination`'s move to `cursor`: key order
/// is cursor order within a destination, and no other destination's keys
/// fall between (names hold no `/`, which sorts below letters, digits and `_`
/// and above `-`, so `a-b/…` < `a/…` < `a_b/…`).
pub fn move_key(destination: &str, cursor: u64) -> String {
    format!("{destination}/{cursor:020}")
}

/// counter name → value; see [`super::Meta`].
pub const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
