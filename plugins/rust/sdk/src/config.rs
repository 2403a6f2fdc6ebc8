//! The plugin's config table: string keys and values from its `[[plugin]]`
//! entry, read from the host once per instance.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// A plugin's config table. Build it from literal pairs in tests with
/// [`Config::from_entries`]; the export glue builds it from the host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Config {
    entries: BTreeMap<String, String>,
}

impl Config {
    /// A table holding these (key, value) pairs; a later duplicate key wins.
    pub fn from_entries<K, V>(entries: impl IntoIterator<Item = (K, V)>) -> Self
    where
        K: Into<String>,
        V: Into<String>,
    {
        Config { entries: entries.into_iter().map(|(k, v)| (k.into(), v.into())).collect() }
    }

    /// The table the host holds for this plugin.
    #[cfg(target_arch = "wasm32")]
    pub(crate) fn from_host() -> Self {
        Config::from_entries(crate::bindings::host::ferry::plugin::config::entries())
    }

    /// The raw value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries.get(key).map(String::as_str)
    }

    /// The raw value of `key`, or an error naming the missing key.
    pub fn require(&self, key: &str) -> Result<&str, ConfigError> {
        self.get(key).ok_or_else(|| ConfigError::new(key, "is required but not set"))
    }

    /// The value of `key` parsed as `T`; `Ok(None)` when the key is absent.
    pub fn parse<T>(&self, key: &str) -> Result<Option<T>, ConfigError>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        self.get(key)
            .map(|raw| raw.trim().parse().map_err(|e| ConfigError::new(key, format!("cannot parse {raw:?}: {e}"))))
            .transpose()
    }

    /// The value of `key` parsed as `T`, or an error if it is absent or invalid.
    pub fn require_parsed<T>(&self, key: &str) -> Result<T, ConfigError>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        self.parse(key)?.ok_or_else(|| ConfigError::new(key, "is required but not set"))
    }

    /// The value of `key` as a comma-separated list, items trimmed and empty
    /// items skipped; empty when the key is absent.
    pub fn list(&self, key: &str) -> Vec<&str> {
        self.get(key).map(|raw| raw.split(',').map(str::trim).filter(|s| !s.is_empty()).collect()).unwrap_or_default()
    }

    /// Every (key, value) pair, sorted by key.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

/// A config value a plugin cannot use, naming the key and the reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    key: String,
    reason: String,
}

impl ConfigError {
    /// An error for `key` with a reason such as "must be a number".
    pub fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError { key: key.into(), reason: reason.into() }
    }

    /// The offending key.
    pub fn key(&self) -> &str {
        &self.key
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "config key `{}` {}", self.key, self.reason)
    }
}

impl std::error::Error for ConfigError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_reports_the_key_and_the_bad_value() {
        let config = Config::from_entries([("min", "warm")]);
        let err = config.parse::<f64>("min").unwrap_err();
        assert_eq!(err.key(), "min");
        assert!(err.to_string().contains("\"warm\""), "{err}");
    }

    #[test]
    fn absent_keys_parse_to_none_and_fail_require() {
        let config = Config::default();
        assert_eq!(config.parse::<u32>("n"), Ok(None));
        assert_eq!(config.require("n").unwrap_err().key(), "n");
    }

    #[test]
    fn list_trims_items_and_skips_empty_ones() {
        let config = Config::from_entries([("fields", " a, b ,,c ")]);
        assert_eq!(config.list("fields"), ["a", "b", "c"]);
        assert!(config.list("other").is_empty());
    }
}
