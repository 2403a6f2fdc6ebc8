//! `ferry events show ID`: a running agent's delivery receipt for one
//! event, through its HTTP API (`GET /v1/events/{id}`, see
//! [`crate::api::http`]).

use std::io::Write;

use clap::Subcommand;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::Value;

use super::{ApiArgs, check, request};
use crate::clock::utc;

/// `ferry events …`.
#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Where one event stands at each destination: pending, delivered,
    /// dead-lettered (and why), or not routed there.
    Show {
        #[command(flatten)]
        api: ApiArgs,
        /// The id its producer gave it (within the dedup window), or
        /// `seq:N` for its sequence (in every ingest answer).
        id: String,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a `ferry events` command.
pub fn run(cmd: &EventsCommand) -> anyhow::Result<()> {
    let EventsCommand::Show { api, id, json } = cmd;
    let path = format!("/v1/events/{}", utf8_percent_encode(id, NON_ALPHANUMERIC));
    let (code, body) = request(api, "GET", &path, "", None)?;
    check(code, &body)?;
    let mut out = std::io::stdout().lock();
    if *json {
        writeln!(out, "{}", serde_json::to_string_pretty(&body)?)?;
        return Ok(());
    }
    write!(out, "{}", render(&body))?;
    Ok(())
}

/// The receipt as a table.
fn render(r: &Value) -> String {
    let id = r["id"].as_str().map_or_else(String::new, |id| format!("{id} "));
    let accepted = r["accepted_ms"].as_u64().map_or_else(|| "at an unknown time".into(), utc);
    let place = if r["in_log"].as_bool() == Some(true) { "in the log" } else { "gone from the log" };
    let mut text = format!("event {id}(sequence {}), accepted {accepted}, {place}\n", r["sequence"]);
    text.push_str(&format!("{:<20} {:<14} DETAIL\n", "DESTINATION", "STATE"));
    for d in r["destinations"].as_array().into_iter().flatten() {
        let detail = match d["state"].as_str() {
            Some("dead-lettered") => format!(
                "{} ({})",
                d["reason"].as_str().unwrap_or(""),
                d["at_ms"].as_u64().map_or_else(String::new, utc)
            ),
            Some("delivered") => d["delivered_ms"].as_u64().map_or_else(String::new, utc),
            Some("settled") => "delivered, or not routed there".into(),
            Some("evicted") => "evicted under the quota before it got there".into(),
            _ => String::new(),
        };
        text.push_str(&format!(
            "{:<20} {:<14} {detail}\n",
            d["destination"].as_str().unwrap_or("?"),
            d["state"].as_str().unwrap_or("?")
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn a_receipt_renders_one_row_per_destination_with_the_reason_of_a_dead_letter() {
        let r = json!({
            "id": "order-7", "sequence": 12, "accepted_ms": 0, "in_log": true,
            "destinations": [
                { "destination": "aws", "state": "delivered", "delivered_ms": 1500 },
                { "destination": "azure", "state": "dead-lettered", "reason": "too large", "at_ms": 0 },
                { "destination": "local", "state": "not-routed" },
            ]
        });
        let text = super::render(&r);
        assert!(
            text.starts_with("event order-7 (sequence 12), accepted 1970-01-01T00:00:00.000Z, in the log"),
            "{text}"
        );
        assert!(
            text.lines()
                .any(|l| l.starts_with("aws") && l.contains("delivered") && l.contains("1970-01-01T00:00:01.500Z")),
            "{text}"
        );
        assert!(text.lines().any(|l| l.starts_with("azure") && l.contains("too large")), "{text}");
        assert_eq!(text.lines().count(), 5, "{text}");
    }
}
