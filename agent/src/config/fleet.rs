//! `[fleet]`: plugin updates pushed by a fleet manager, as written
//! ([`RawFleet`]) and validated ([`FleetConfig`]).

use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;
use crate::signing::{self, VerifyingKey};

/// Default root of the fleet topics on every destination.
pub const DEFAULT_TOPIC_ROOT: &str = "ferry/fleet";

/// `[fleet]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFleet {
    trusted_keys: Vec<String>,
    topic_root: Option<String>,
    destinations: Option<Vec<String>>,
    probation: Option<String>,
    rollback_failure_rate: Option<f64>,
    rollback_min_failures: Option<u64>,
    shadow_events: Option<usize>,
}

/// The validated `[fleet]`.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// Public keys whose signatures this device accepts.
    pub trusted_keys: Vec<VerifyingKey>,
    /// Root of the fleet topics (`{root}/plugin/…`, `{root}/status/…`).
    pub topic_root: String,
    /// Destinations watched for bundles and told the status (default: every
    /// one whose cloud takes Ferry's own topics).
    pub destinations: Vec<String>,
    /// How long a new version is watched after activation.
    pub probation: Duration,
    /// Share of failed calls during probation that rolls the version back.
    pub rollback_failure_rate: f64,
    /// Failed calls needed before the rate counts (one stray failure is not a verdict).
    pub rollback_min_failures: u64,
    /// Most recent events the shadow run replays.
    pub shadow_events: usize,
}

/// Validates `[fleet]`; `destinations` are the configured destination names.
/// `destinations` are the configured destinations, each with whether its
/// cloud takes Ferry's own topics (which fleet traffic needs).
pub fn validate(raw: RawFleet, destinations: &[(&str, bool)], file: &str) -> Result<FleetConfig, ConfigError> {
    let err = |k: &str, reason: String| ConfigError { file: file.into(), key: format!("fleet.{k}"), reason };
    if raw.trusted_keys.is_empty() {
        return Err(err("trusted_keys", "list at least one public key (from `ferry fleet keygen`)".into()));
    }
    let trusted_keys = raw
        .trusted_keys
        .iter()
        .enumerate()
        .map(|(i, k)| signing::decode_public(k).map_err(|e| err(&format!("trusted_keys[{i}]"), e.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    let topic_root = raw.topic_root.unwrap_or_else(|| DEFAULT_TOPIC_ROOT.into());
    if topic_root.is_empty()
        || topic_root.ends_with('/')
        || topic_root.contains(['+', '#'])
        || topic_root.split('/').any(str::is_empty)
    {
        return Err(err(
            "topic_root",
            format!("`{topic_root}` must be topic levels without wildcards, like \"ferry/fleet\""),
        ));
    }
    let chosen = match raw.destinations {
        None => destinations.iter().filter(|(_, capable)| *capable).map(|(d, _)| (*d).to_owned()).collect(),
        Some(list) => {
            for d in &list {
                match destinations.iter().find(|(name, _)| name == d) {
                    None => return Err(err("destinations", format!("`{d}` is not a configured destination"))),
                    Some((_, false)) => {
                        return Err(err(
                            "destinations",
                            format!("`{d}`'s cloud takes only its own fixed topics (azure-iot-hub): no fleet topics"),
                        ));
                    }
                    Some(_) => {}
                }
            }
            list
        }
    };
    if chosen.is_empty() {
        return Err(err("destinations", "fleet updates need at least one [[destination]] to arrive on".into()));
    }
    let probation = humantime::parse_duration(raw.probation.as_deref().unwrap_or("5m"))
        .map_err(|e| err("probation", format!("not a duration like \"5m\": {e}")))?;
    let rate = raw.rollback_failure_rate.unwrap_or(0.2);
    if !(0.0..=1.0).contains(&rate) || rate == 0.0 {
        return Err(err("rollback_failure_rate", format!("{rate} must be above 0 and at most 1")));
    }
    let min_failures = raw.rollback_min_failures.unwrap_or(3);
    if min_failures == 0 {
        return Err(err("rollback_min_failures", "must be at least 1".into()));
    }
    Ok(FleetConfig {
        trusted_keys,
        topic_root,
        destinations: chosen,
        probation,
        rollback_failure_rate: rate,
        rollback_min_failures: min_failures,
        shadow_events: raw.shadow_events.unwrap_or(256),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, dests: &[&str]) -> Result<FleetConfig, ConfigError> {
        let dests: Vec<(&str, bool)> = dests.iter().map(|d| (*d, !d.starts_with("hub"))).collect();
        validate(toml::from_str::<RawFleet>(text).unwrap(), &dests, "test.toml")
    }

    #[test]
    fn defaults_watch_every_destination() {
        let key = signing::encode_public(&signing::SigningKey::from_bytes(&[7; 32]).verifying_key());
        let c = check(&format!("trusted_keys = [\"{key}\"]"), &["a", "hub", "b"]).unwrap();
        assert_eq!(c.destinations, ["a", "b"], "a cloud with fixed topics (IoT Hub) carries no fleet traffic");
        assert_eq!(c.topic_root, DEFAULT_TOPIC_ROOT);
        assert_eq!(c.probation, Duration::from_secs(300));
    }

    #[test]
    fn mistakes_name_their_key() {
        let key = signing::encode_public(&signing::SigningKey::from_bytes(&[7; 32]).verifying_key());
        let k = |extra: &str| check(&format!("trusted_keys = [\"{key}\"]\n{extra}"), &["a"]).unwrap_err().key;
        assert_eq!(check("trusted_keys = [\"nope\"]", &["a"]).unwrap_err().key, "fleet.trusted_keys[0]");
        assert_eq!(check("trusted_keys = []", &["a"]).unwrap_err().key, "fleet.trusted_keys");
        assert_eq!(k("destinations = [\"b\"]"), "fleet.destinations");
        let hub = check(&format!("trusted_keys = [\"{key}\"]\ndestinations = [\"hub\"]"), &["a", "hub"]).unwrap_err();
        assert!(hub.key == "fleet.destinations" && hub.reason.contains("fixed topics"), "{hub:?}");
        assert_eq!(k("topic_root = \"a/#\""), "fleet.topic_root");
        assert_eq!(k("probation = \"soon\""), "fleet.probation");
        assert_eq!(k("rollback_failure_rate = 2.0"), "fleet.rollback_failure_rate");
    }
}
