//! The status report a device publishes, retained, for each plugin on every
//! fleet destination (`{root}/status/{device}/{plugin}`), and that
//! `ferry fleet status` reads back.

use serde::{Deserialize, Serialize};

/// Where an update stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// Running the version shown; nothing in progress.
    Running,
    /// Fetching the candidate's chunks.
    Downloading,
    /// Checking the assembled component's size and hash.
    Verifying,
    /// Compiling it and running the plugin checks.
    Checking,
    /// Running it beside the active version on recent events.
    Shadow,
    /// Activated; watched for failures until probation ends.
    Probation,
    /// The candidate was refused; the running version is untouched.
    Rejected,
    /// The candidate failed on probation; the previous version runs again.
    RolledBack,
}

impl State {
    /// The kebab-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Running => "running",
            State::Downloading => "downloading",
            State::Verifying => "verifying",
            State::Checking => "checking",
            State::Shadow => "shadow",
            State::Probation => "probation",
            State::Rejected => "rejected",
            State::RolledBack => "rolled-back",
        }
    }
}

/// What the shadow run found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shadow {
    /// Recent calls replayed.
    pub calls: u64,
    /// Events (or merges) in them.
    pub events: u64,
    /// Calls whose answer differed from the active version's.
    pub differences: u64,
}

/// One report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The device.
    pub device: String,
    /// The plugin.
    pub plugin: String,
    /// The running version (0: the component in the device's config).
    pub version: u64,
    /// Where the update stands.
    pub state: State,
    /// When this report was made (RFC 3339, UTC).
    pub time: String,
    /// The version being installed, or the one refused or rolled back.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub candidate: Option<u64>,
    /// The version kept for rollback, if any (0: the configured component).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub previous: Option<u64>,
    /// Why the candidate was refused or rolled back.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
    /// Chunks received so far, while downloading.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub received: Option<u32>,
    /// Chunks in the candidate.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub total: Option<u32>,
    /// The latest shadow run of the candidate or the active version.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub shadow: Option<Shadow>,
}

/// RFC 3339 text of a wall-clock time in ms, to the second.
pub fn rfc3339(ms: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(i64::try_from(ms / 1000).unwrap_or(i64::MAX))
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| ms.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_serialise_with_kebab_case_states_and_no_empty_fields() {
        let r = Report {
            device: "gw".into(),
            plugin: "th".into(),
            version: 2,
            state: State::RolledBack,
            time: rfc3339(0),
            candidate: Some(3),
            previous: None,
            reason: Some("trapped".into()),
            received: None,
            total: None,
            shadow: None,
        };
        let text = serde_json::to_string(&r).unwrap();
        assert!(text.contains("\"state\":\"rolled-back\""), "{text}");
        assert!(!text.contains("received"), "{text}");
        assert_eq!(serde_json::from_str::<Report>(&text).unwrap(), r);
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_500), "1970-01-01T00:00:01Z");
    }
}
