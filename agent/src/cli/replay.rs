//! `ferry replay`: send one destination of a running agent its events again,
//! from a sequence or a time, through its HTTP API
//! (`POST /v1/destinations/{name}/replay`, see [`crate::api::http`]).

use std::io::Write;

use clap::Args;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::{Value, json};

use super::{ApiArgs, check, request};

/// `ferry replay`.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// The destination to send the events to again.
    #[arg(long)]
    destination: String,
    /// From the first event accepted at or after this RFC 3339 time.
    #[arg(long, conflicts_with = "from", required_unless_present = "from")]
    since: Option<String>,
    /// From this sequence (in every ingest answer and receipt).
    #[arg(long)]
    from: Option<u64>,
}

/// Runs `ferry replay`.
pub fn run(args: &ReplayArgs) -> anyhow::Result<()> {
    let body = match (&args.since, args.from) {
        (Some(since), _) => json!({ "since": since }),
        (None, from) => json!({ "from": from }),
    };
    let path = format!("/v1/destinations/{}/replay", utf8_percent_encode(&args.destination, NON_ALPHANUMERIC));
    let (code, answer) = request(&args.api, "POST", &path, "application/json", Some(body.to_string().into_bytes()))?;
    check(code, &answer)?;
    write!(std::io::stdout().lock(), "{}", render(&answer))?;
    Ok(())
}

/// What began, in one or two lines.
fn render(r: &Value) -> String {
    let (from, through) = (r["from"].as_u64().unwrap_or(0), r["through"].as_u64().unwrap_or(0));
    let mut text = format!(
        "replaying {} from sequence {from} through {through}; `ferry status` shows its progress\n",
        r["destination"].as_str().unwrap_or("?")
    );
    match r["first_available"].as_u64() {
        Some(first) if first > from => text.push_str(&format!(
            "events {from} to {} are no longer in the log (see store.retain_delivered); it starts at {first}\n",
            first - 1
        )),
        None => text.push_str("no event from there is left in the log (see store.retain_delivered)\n"),
        Some(_) => {}
    }
    text
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn a_replay_that_starts_past_a_gap_says_which_events_are_gone() {
        let r = json!({ "destination": "aws", "from": 10, "through": 90, "first_available": 40 });
        let text = super::render(&r);
        assert!(text.starts_with("replaying aws from sequence 10 through 90"), "{text}");
        assert!(text.contains("events 10 to 39 are no longer in the log"), "{text}");
        let whole = json!({ "destination": "aws", "from": 10, "through": 90, "first_available": 10 });
        assert_eq!(super::render(&whole).lines().count(), 1);
    }
}
