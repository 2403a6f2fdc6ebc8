//! `[[merge]]` and `[state]`: which merge plugin reconciles which state keys,
//! and where merged state is published on the device.

use serde::Deserialize;

use super::plugin::{PluginConfig, World};
use super::{ConfigError, MqttEndpoint};
use crate::topic::TopicFilter;

/// `[[merge]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMerge {
    keys: String,
    plugin: String,
}

/// A validated `[[merge]]`: concurrent versions of keys matching `keys` go
/// to the merge plugin `plugin`.
#[derive(Debug, Clone)]
pub struct MergeRule {
    /// Keys (topics below a destination's prefix) this rule covers.
    pub keys: TopicFilter,
    /// The `[[plugin]]` (world `merge`) that merges them.
    pub plugin: String,
}

/// `[state]`: merged state kept on the device.
#[derive(Debug, Clone, Default)]
pub struct StateConfig {
    /// `[[merge]]` rules, first match wins; keys no rule matches use
    /// last-writer-wins on `(hlc, origin)`.
    pub merge: Vec<MergeRule>,
    /// Publish every change of merged state, retained, to this local broker.
    pub local_mqtt: Option<LocalStateMqtt>,
}

impl StateConfig {
    /// The merge plugin for `key`, if a rule names one.
    pub fn merge_plugin(&self, key: &str) -> Option<&str> {
        self.merge.iter().find(|r| r.keys.matches(key)).map(|r| r.plugin.as_str())
    }
}

/// `[state.local_mqtt]`: a broker on the device that gets merged state.
#[derive(Debug, Clone)]
pub struct LocalStateMqtt {
    /// The broker.
    pub endpoint: MqttEndpoint,
    /// Prepended to a key to form the topic (default `ferry/state/`).
    pub topic_prefix: String,
}

/// Validates every `[[merge]]` against the plugins.
pub(super) fn merge_rules(
    raw: Vec<RawMerge>,
    plugins: &[PluginConfig],
    file: &str,
) -> Result<Vec<MergeRule>, ConfigError> {
    let mut out = Vec::with_capacity(raw.len());
    for (i, m) in raw.into_iter().enumerate() {
        let err = |k: &str, reason: String| ConfigError { file: file.into(), key: format!("merge[{i}].{k}"), reason };
        let keys = TopicFilter::new(&m.keys).map_err(|e| err("keys", format!("`{}` {e}", m.keys)))?;
        match plugins.iter().find(|p| p.name == m.plugin) {
            Some(p) if p.world == World::Merge => {}
            Some(_) => return Err(err("plugin", format!("`{}` is a filter plugin, not world = \"merge\"", m.plugin))),
            None => return Err(err("plugin", format!("`{}` is not the name of a [[plugin]]", m.plugin))),
        }
        out.push(MergeRule { keys, plugin: m.plugin });
    }
    Ok(out)
}
