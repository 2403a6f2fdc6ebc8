//! `ferry store inspect`: what a data directory holds, read offline from
//! its redb file while no agent runs (see [`crate::store::inspect`]).

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Subcommand;

use super::dlq::utc;
use crate::store::inspect::inspect;

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
}

/// The store file inside a data directory, or `path` itself when it is a file.
fn store_file(path: &Path) -> PathBuf {
    if path.is_dir() { path.join("ferry.redb") } else { path.to_path_buf() }
}

/// Runs a `ferry store` command.
pub fn run(cmd: &StoreCommand) -> anyhow::Result<()> {
    let StoreCommand::Inspect { data, json } = cmd;
    let i = inspect(&store_file(data))?;
    let mut out = std::io::stdout().lock();
    if *json {
        writeln!(out, "{}", serde_json::to_string_pretty(&i)?)?;
        return Ok(());
    }
    writeln!(out, "store       {} ({} bytes on disk)", i.path, i.file_bytes)?;
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
