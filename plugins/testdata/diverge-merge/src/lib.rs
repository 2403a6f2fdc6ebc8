//! A merge that does not converge: the incoming version always wins, so two
//! replicas that see the same versions in different orders disagree.
//! `ferry plugin check` must catch it (it is not commutative).

use ferry_plugin_sdk::{Config, ConfigError, Merge, Versioned};

/// The merge function; stateless.
pub struct DivergeMerge;

impl Merge for DivergeMerge {
    fn new(_config: &Config) -> Result<Self, ConfigError> {
        Ok(DivergeMerge)
    }

    fn merge(&self, _key: &str, _current: Option<Versioned>, incoming: Versioned) -> Result<Vec<u8>, String> {
        Ok(incoming.data)
    }
}

ferry_plugin_sdk::export_merge!(DivergeMerge);
