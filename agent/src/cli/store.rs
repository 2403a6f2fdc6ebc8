//! `ferry store inspect|verify`: what a data directory holds and whether
//! every record reads, from its redb file while no agent runs (see
//! [`crate::store::inspect`]).

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Subcommand;

use crate::clock::utc;
use crate::store::inspect::{inspect, verify};

/// `ferry store …`.
#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Counts, oldest and newest events, cursors and dead letters of a store,
    /// without the agent running (it refuses a store an agent holds open).
    Inspect {
        /// The agent's data directory (holding `ferry.redb`), or the file itself.
        #[arg(long, default_value = "./ferry-data")]
        data: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Opens the store as the agent would (changing nothing) and decodes
    /// every record. Exits 0 when every record reads, 1 when some do not
    /// (the agent moves them to the dead letters), 2 when the agent could
    /// not open the store at all.
    Verify {
        /// The agent's data directory (holding `ferry.redb`), or the file itself.
        #[arg(long, default_value = "./ferry-data")]
        data: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// What `ferry store verify` found, as its exit code says.
#[derive(Debug, thiserror::Error)]
pub enum VerifyFailed {
    /// Some records do not decode (exit code 1).
    #[error("{0} records are unreadable")]
    Unreadable(u64),
    /// The agent could not open the store (exit code 2).
    #[error("the agent could not open this store: {0}")]
    CannotOpen(String),
}

impl VerifyFailed {
    /// The process exit code for this outcome.
    pub fn exit_code(&self) -> u8 {
        match self {
            VerifyFailed::Unreadable(_) => 1,
            VerifyFailed::CannotOpen(_) => 2,
        }
    }
}

/// The store file inside a data directory, or `path` itself when it is a file.
fn store_file(path: &Path) -> PathBuf {
    if path.is_dir() { path.join("ferry.redb") } else { path.to_path_buf() }
}

/// Runs a `ferry store` command.
pub fn run(cmd: &StoreCommand) -> anyhow::Result<()> {
    let (data, json) = match cmd {
        StoreCommand::Inspect { data, json } => (data, *json),
        StoreCommand::Verify { data, json } => return run_verify(data, *json),
    };
    let i = inspect(&store_file(data))?;
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&i)?)?;
        return Ok(());
    }
    writeln!(out, "store       {} ({} bytes on disk)", i.path, i.file_bytes)?;
    if !i.clean_shutdown {
        writeln!(
            out,
            "            not closed cleanly: the agent repairs it when it starts (this inspection did, in memory)"
        )?;
    }
    writeln!(out, "events      {} ({} bytes), last sequence {}", i.events, i.event_bytes, i.last_sequence)?;
    for (label, end) in [("oldest", &i.oldest), ("newest", &i.newest)] {
        match end {
            Some(e) => writeln!(
                out,
                "{label:<11} sequence {} accepted {} {}",
                e.sequence,
                utc(e.accepted_ms),
                e.subject.as_deref().unwrap_or("")
            )?,
            None => writeln!(out, "{label:<11} (log empty)")?,
        }
    }
    let c = &i.counters;
    writeln!(
        out,
        "counters    accepted {}, duplicates {}, delivered {}, evicted {}, expired {}, commits {}",
        c.accepted_events, c.dedup_hits, c.delivered_events, c.evicted_events, c.expired_events, c.commits
    )?;
    writeln!(out, "dedup       {} ids remembered", i.dedup_entries)?;
    writeln!(out, "dead        {} dead letters ({} bytes)", i.dead_letters, i.dead_letter_bytes)?;
    for (reason, n) in &i.dead_letter_reasons {
        writeln!(out, "            {n:>8}  {reason}")?;
    }
    if i.cursors.is_empty() {
        writeln!(out, "cursors     none (no destination has acknowledged anything yet)")?;
    } else {
        writeln!(out, "\n{:<20} {:>12} {:>12}", "DESTINATION", "ACKED", "BACKLOG")?;
        for cur in &i.cursors {
            writeln!(out, "{:<20} {:>12} {:>12}", cur.destination, cur.acked_sequence, cur.backlog_events)?;
        }
    }
    Ok(())
}

fn run_verify(data: &Path, json: bool) -> anyhow::Result<()> {
    let v = verify(&store_file(data)).map_err(|e| VerifyFailed::CannotOpen(e.to_string()))?;
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
    } else {
        writeln!(out, "store       {}", v.path)?;
        if !v.clean_shutdown {
            writeln!(out, "            not closed cleanly: the agent repairs it when it starts (verified, in memory)")?;
        }
        writeln!(out, "checked     {} events, {} dead letters", v.events, v.dead_letters)?;
        for u in &v.unreadable {
            writeln!(out, "unreadable  {} {}: {}", u.table, u.key, u.reason)?;
        }
        if v.unreadable_count > v.unreadable.len() as u64 {
            writeln!(out, "            … {} more", v.unreadable_count - v.unreadable.len() as u64)?;
        }
        for w in &v.warnings {
            writeln!(out, "warning     {w}")?;
        }
        if v.is_clean() {
            writeln!(out, "ok          every record reads; the agent will start on this store")?;
        } else {
            writeln!(
                out,
                "damaged     the agent will start, and moves each unreadable event to the dead letters when it reaches it"
            )?;
        }
    }
    if v.is_clean() { Ok(()) } else { Err(VerifyFailed::Unreadable(v.unreadable_count).into()) }
}
