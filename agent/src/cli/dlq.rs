//! `ferry dlq list|show|replay|purge`: the dead-letter queue of a running
//! agent, through its HTTP API (see [`crate::api::admin`]).

use std::io::Write;

use clap::{Args, Subcommand};
use serde_json::json;

use super::{ApiArgs, check, request};
use crate::clock::utc;

/// `ferry dlq …`.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters, oldest first.
    List {
        #[command(flatten)]
        api: ApiArgs,
        /// List those numbered after this.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// How many at most (1 to 1000).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter with its event.
    Show {
        #[command(flatten)]
        api: ApiArgs,
        /// Its number (from `ferry dlq list`).
        number: u64,
    },
    /// Put dead letters back into the log so they are delivered again (to the
    /// one destination that could not take them, when there was one).
    Replay(Selection),
    /// Delete dead letters for good.
    Purge(Selection),
}

/// Which dead letters.
#[derive(Debug, Args)]
pub struct Selection {
    #[command(flatten)]
    api: ApiArgs,
    /// Their numbers (from `ferry dlq list`).
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    numbers: Vec<u64>,
    /// Every dead letter.
    #[arg(long)]
    all: bool,
}

impl Selection {
    fn body(&self) -> Vec<u8> {
        let v = if self.all { json!({ "all": true }) } else { json!({ "numbers": self.numbers }) };
        serde_json::to_vec(&v).expect("JSON values serialise")
    }
}

/// Runs a `ferry dlq` command.
pub fn run(cmd: &DlqCommand) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match cmd {
        DlqCommand::List { api, after, limit, json } => {
            let (code, body) = request(api, "GET", &format!("/v1/dead-letters?after={after}&limit={limit}"), "", None)?;
            check(code, &body)?;
            if *json {
                writeln!(out, "{}", serde_json::to_string_pretty(&body)?)?;
                return Ok(());
            }
            let items = body["dead_letters"].as_array().cloned().unwrap_or_default();
            writeln!(out, "{} dead letters held", body["total"].as_u64().unwrap_or(0))?;
            if items.is_empty() {
                return Ok(());
            }
            writeln!(
                out,
                "{:>8} {:>10} {:<24} {:<28} {:<12}  reason",
                "NUMBER", "SEQUENCE", "DEAD-LETTERED (UTC)", "SUBJECT", "DESTINATION"
            )?;
            for d in &items {
                writeln!(
                    out,
                    "{:>8} {:>10} {:<24} {:<28} {:<12}  {}",
                    d["number"].as_u64().unwrap_or(0),
                    d["sequence"].as_u64().unwrap_or(0),
                    utc(d["at_ms"].as_u64().unwrap_or(0)),
                    d["subject"].as_str().unwrap_or("?"),
                    d["destination"].as_str().unwrap_or("(all)"),
                    d["reason"].as_str().unwrap_or("")
                )?;
            }
            if let Some(next) = body["next_after"].as_u64() {
                writeln!(out, "more: ferry dlq list --after {next}")?;
            }
        }
        DlqCommand::Show { api, number } => {
            let (code, body) = request(api, "GET", &format!("/v1/dead-letters/{number}"), "", None)?;
            check(code, &body)?;
            writeln!(out, "{}", serde_json::to_string_pretty(&body)?)?;
        }
        DlqCommand::Replay(sel) => {
            let (code, body) =
                request(&sel.api, "POST", "/v1/dead-letters/replay", "application/json", Some(sel.body()))?;
            check(code, &body)?;
            let events = body["events"].as_array().cloned().unwrap_or_default();
            for e in &events {
                writeln!(
                    out,
                    "dead letter {} → sequence {} ({}){}",
                    e["number"],
                    e["sequence"],
                    e["id"].as_str().unwrap_or("?"),
                    e["destination"].as_str().map(|d| format!(" for {d}")).unwrap_or_default()
                )?;
            }
            writeln!(out, "replayed {}", body["replayed"].as_u64().unwrap_or(0))?;
        }
        DlqCommand::Purge(sel) => {
            let (code, body) =
                request(&sel.api, "POST", "/v1/dead-letters/purge", "application/json", Some(sel.body()))?;
            check(code, &body)?;
            writeln!(out, "purged {}", body["purged"].as_u64().unwrap_or(0))?;
        }
    }
    Ok(())
}
