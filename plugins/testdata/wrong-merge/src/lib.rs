//! The plausible wrong version of each example merge, chosen by config
//! `bug`, so tests can show that `ferry plugin check` tells each example
//! from its near miss on the example's own samples:
//!
//! - `lww-hlc-only` (lww-merge): the greater `hlc` wins, a tie goes to the
//!   incoming version: two writes in the same millisecond disagree by order.
//! - `crdt-sum` (crdt-merge): PN-counter entries add up instead of taking the
//!   maximum: a version merged twice counts twice.
//! - `gset-append` (gset-merge): the arrays are concatenated, not united: a
//!   repeated merge grows the set, and order matters.

use ferry_plugin_sdk::{Config, ConfigError, Merge, Versioned};
use serde_json::{Map, Value};

/// Which wrong merge.
#[derive(Clone, Copy)]
pub enum Bug {
    /// Last writer wins on `hlc` alone.
    LwwHlcOnly,
    /// PN-counters merged by sum.
    CrdtSum,
    /// Grow-only sets merged by concatenation.
    GsetAppend,
}

/// The merge function.
pub struct WrongMerge(Bug);

fn json(data: &[u8]) -> Result<Value, String> {
    serde_json::from_slice(data).map_err(|e| format!("not JSON: {e}"))
}

/// Adds every number of `from` into `into`, key by key, at every depth.
fn add(into: &mut Map<String, Value>, from: &Map<String, Value>) -> Result<(), String> {
    for (k, v) in from {
        match (into.get_mut(k), v) {
            (None, v) => {
                into.insert(k.clone(), v.clone());
            }
            (Some(Value::Object(a)), Value::Object(b)) => add(a, b)?,
            (Some(Value::Number(a)), Value::Number(b)) => {
                let sum = a.as_u64().zip(b.as_u64()).map(|(a, b)| a.saturating_add(b)).ok_or("not a count")?;
                *a = sum.into();
            }
            _ => return Err(format!("`{k}` is not a PN-counter map")),
        }
    }
    Ok(())
}

/// The wrong merged data of `current` and `incoming` under `bug`.
pub fn merge_data(bug: Bug, current: Option<&Versioned>, incoming: &Versioned) -> Result<Vec<u8>, String> {
    let Some(current) = current else { return Ok(incoming.data.clone()) };
    match bug {
        Bug::LwwHlcOnly => Ok(if current.hlc > incoming.hlc { current.data.clone() } else { incoming.data.clone() }),
        Bug::CrdtSum => {
            let (Value::Object(mut a), Value::Object(b)) = (json(&current.data)?, json(&incoming.data)?) else {
                return Err("not a JSON map of PN-counters".into());
            };
            add(&mut a, &b)?;
            Ok(Value::Object(a).to_string().into_bytes())
        }
        Bug::GsetAppend => {
            let (Value::Array(mut a), Value::Array(b)) = (json(&current.data)?, json(&incoming.data)?) else {
                return Err("not a JSON array of strings".into());
            };
            a.extend(b);
            Ok(Value::Array(a).to_string().into_bytes())
        }
    }
}

impl Merge for WrongMerge {
    fn new(config: &Config) -> Result<Self, ConfigError> {
        match config.require("bug")? {
            "lww-hlc-only" => Ok(WrongMerge(Bug::LwwHlcOnly)),
            "crdt-sum" => Ok(WrongMerge(Bug::CrdtSum)),
            "gset-append" => Ok(WrongMerge(Bug::GsetAppend)),
            other => Err(ConfigError::new("bug", format!("`{other}`: lww-hlc-only, crdt-sum or gset-append"))),
        }
    }

    fn merge(&self, _key: &str, current: Option<Versioned>, incoming: Versioned) -> Result<Vec<u8>, String> {
        merge_data(self.0, current.as_ref(), &incoming)
    }
}

ferry_plugin_sdk::export_merge!(WrongMerge);
