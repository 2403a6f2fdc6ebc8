//! Merges a JSON map of PN-counters, so increments and decrements made on
//! different replicas while they were apart all survive.
//!
//! The data is `{"<name>": {"p": {"<origin>": n, ...}, "n": {...}}, ...}`:
//! each origin only ever raises its own entries, `p` counting increments and
//! `n` decrements; a counter's value is `sum(p) - sum(n)`. Merging takes the
//! pointwise maximum of every entry, which is commutative, associative and
//! idempotent. The output is canonical JSON (keys sorted, `p` and `n` always
//! present) so converged replicas hold identical bytes. No config.

use std::collections::BTreeMap;

use ferry_plugin_sdk::{Config, ConfigError, Merge, Versioned};
use serde::{Deserialize, Serialize};

/// Counter name -> counter; sorted so the output is canonical.
pub type Counters = BTreeMap<String, PnCounter>;

/// One positive-negative counter: per-origin increment and decrement totals.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PnCounter {
    /// Increments, per origin.
    #[serde(default)]
    pub p: BTreeMap<String, u64>,
    /// Decrements, per origin.
    #[serde(default)]
    pub n: BTreeMap<String, u64>,
}

impl PnCounter {
    /// The counter's value: increments minus decrements.
    pub fn value(&self) -> i128 {
        let sum = |m: &BTreeMap<String, u64>| m.values().map(|&v| i128::from(v)).sum::<i128>();
        sum(&self.p) - sum(&self.n)
    }

    fn join(&mut self, other: &PnCounter) {
        join_max(&mut self.p, &other.p);
        join_max(&mut self.n, &other.n);
    }
}

fn join_max(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
    for (origin, &count) in from {
        let entry = into.entry(origin.clone()).or_default();
        *entry = (*entry).max(count);
    }
}

/// Parses counter data; the error says what is malformed.
pub fn parse(data: &[u8]) -> Result<Counters, String> {
    serde_json::from_slice(data).map_err(|e| format!("not a JSON map of PN-counters: {e}"))
}

/// The pointwise maximum of two counter maps.
pub fn join(mut current: Counters, incoming: &Counters) -> Counters {
    for (name, counter) in incoming {
        current.entry(name.clone()).or_default().join(counter);
    }
    current
}

/// The merged data of two versions' counter maps, as canonical JSON.
pub fn merge_data(current: Option<&[u8]>, incoming: &[u8]) -> Result<Vec<u8>, String> {
    let current = current.map(parse).transpose()?.unwrap_or_default();
    let merged = join(current, &parse(incoming)?);
    Ok(serde_json::to_vec(&merged).expect("counters always serialize"))
}

/// The merge function; stateless.
#[derive(Debug, Default)]
pub struct CrdtMerge;

impl Merge for CrdtMerge {
    fn new(_config: &Config) -> Result<Self, ConfigError> {
        Ok(CrdtMerge)
    }

    fn merge(&self, key: &str, current: Option<Versioned>, incoming: Versioned) -> Result<Vec<u8>, String> {
        merge_data(current.as_ref().map(|v| v.data.as_slice()), &incoming.data)
            .map_err(|e| format!("state {key:?}: {e}"))
    }
}

ferry_plugin_sdk::export_merge!(CrdtMerge);

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = r#"{"door": {"p": {"a": 3}, "n": {"a": 1}}}"#;
    const B: &str = r#"{"door": {"p": {"a": 2, "b": 5}}, "light": {"n": {"b": 2}}}"#;
    const C: &str = r#"{"light": {"p": {"c": 1}, "n": {"b": 1}}}"#;

    fn merge(a: &str, b: &str) -> String {
        String::from_utf8(merge_data(Some(a.as_bytes()), b.as_bytes()).unwrap()).unwrap()
    }

    #[test]
    fn takes_the_pointwise_maximum() {
        let merged = parse(merge(A, B).as_bytes()).unwrap();
        assert_eq!(merged["door"].p, BTreeMap::from([("a".into(), 3), ("b".into(), 5)]));
        assert_eq!(merged["door"].value(), 7);
        assert_eq!(merged["light"].value(), -2);
    }

    #[test]
    fn merging_is_commutative_associative_and_idempotent() {
        assert_eq!(merge(A, B), merge(B, A));
        assert_eq!(merge(&merge(A, B), C), merge(A, &merge(B, C)));
        let ab = merge(A, B);
        assert_eq!(merge(&ab, &ab), ab);
        assert_eq!(merge(&ab, A), ab, "an older state adds nothing");
    }

    #[test]
    fn output_is_canonical() {
        let out = merge(r#"{"z": {"p": {"b": 1, "a": 2}}}"#, "{}");
        assert_eq!(out, r#"{"z":{"p":{"a":2,"b":1},"n":{}}}"#);
    }

    #[test]
    fn first_version_is_canonicalized() {
        let out = merge_data(None, br#"{"x": {"n": {"a": 1}}}"#).unwrap();
        assert_eq!(out, br#"{"x":{"p":{},"n":{"a":1}}}"#);
    }

    #[test]
    fn malformed_data_is_an_error() {
        for bad in ["[]", r#"{"x": 1}"#, r#"{"x": {"p": {"a": -1}}}"#, r#"{"x": {"q": {}}}"#, "nope"] {
            assert!(merge_data(None, bad.as_bytes()).is_err(), "{bad}");
        }
    }
}
