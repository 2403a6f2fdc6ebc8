//! A G-Counter over a nested object, `{"counts": {"<origin>": n, ...}}`:
//! each origin only ever raises its own count. With `merge = "max"` (the
//! default) concurrent versions merge by pointwise maximum, which converges;
//! with `merge = "sum"` they add up, which double-counts a version merged
//! twice. `ferry plugin check` given samples of this shape must pass the
//! first and fail the second; on its built-in shapes it can test neither
//! (this merge refuses them), which is inconclusive.

use std::collections::BTreeMap;

use ferry_plugin_sdk::{Config, ConfigError, Merge, Versioned};
use serde::{Deserialize, Serialize};

/// The state: a count per origin, sorted so the output is canonical.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GCounter {
    /// Increments seen from each origin.
    pub counts: BTreeMap<String, u64>,
}

/// The merge, correct or wrong by config.
pub struct GCounterMerge {
    sum: bool,
}

/// Parses a state; the error says what is malformed.
pub fn parse(data: &[u8]) -> Result<GCounter, String> {
    serde_json::from_slice(data).map_err(|e| format!("not a G-Counter {{\"counts\": {{origin: n}}}}: {e}"))
}

/// Merges `incoming` into `current`: pointwise max, or (wrongly) sum.
pub fn merge(current: GCounter, incoming: &GCounter, sum: bool) -> GCounter {
    let mut out = current;
    for (origin, &n) in &incoming.counts {
        let entry = out.counts.entry(origin.clone()).or_default();
        *entry = if sum { entry.saturating_add(n) } else { (*entry).max(n) };
    }
    out
}

impl Merge for GCounterMerge {
    fn new(config: &Config) -> Result<Self, ConfigError> {
        match config.get("merge").unwrap_or("max") {
            "max" => Ok(GCounterMerge { sum: false }),
            "sum" => Ok(GCounterMerge { sum: true }),
            other => Err(ConfigError::new("merge", format!("`{other}` is not \"max\" or \"sum\""))),
        }
    }

    fn merge(&self, _key: &str, current: Option<Versioned>, incoming: Versioned) -> Result<Vec<u8>, String> {
        let current = current.map(|c| parse(&c.data)).transpose()?.unwrap_or_default();
        let merged = merge(current, &parse(&incoming.data)?, self.sum);
        Ok(serde_json::to_vec(&merged).expect("counts always serialize"))
    }
}

ferry_plugin_sdk::export_merge!(GCounterMerge);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_is_idempotent_and_sum_is_not() {
        let x = parse(br#"{"counts":{"gw-1":3}}"#).unwrap();
        assert_eq!(merge(parse(br#"{"counts":{"gw-1":3}}"#).unwrap(), &x, false).counts["gw-1"], 3);
        assert_eq!(merge(parse(br#"{"counts":{"gw-1":3}}"#).unwrap(), &x, true).counts["gw-1"], 6);
    }
}
