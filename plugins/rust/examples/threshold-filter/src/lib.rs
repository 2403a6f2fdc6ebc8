//! Drops events whose JSON reading is below a threshold.
//!
//! Config: `field` — the reading's key in the JSON object, or a dotted path
//! such as `reading.celsius`; `min` — the threshold, a number.
//!
//! Only what is provably below `min` is dropped: data that is not JSON, or
//! lacks the field, or holds a non-number there is kept, so a schema change
//! upstream never silently discards events.

use ferry_plugin_sdk::{Config, ConfigError, Events, Filter, Verdict, log};
use serde_json::Value;

/// The filter, configured.
#[derive(Debug)]
pub struct ThresholdFilter {
    path: Vec<String>,
    min: f64,
}

impl ThresholdFilter {
    /// The verdict for an event with this data.
    pub fn verdict(&self, data: &[u8]) -> Verdict {
        match self.reading(data) {
            Some(value) if value < self.min => Verdict::Drop,
            _ => Verdict::Keep,
        }
    }

    fn reading(&self, data: &[u8]) -> Option<f64> {
        let json: Value = serde_json::from_slice(data).ok()?;
        self.path.iter().try_fold(&json, |value, key| value.get(key))?.as_f64()
    }
}

impl Filter for ThresholdFilter {
    fn new(config: &Config) -> Result<Self, ConfigError> {
        let field = config.require("field")?;
        let path: Vec<String> = field.split('.').map(str::to_owned).collect();
        if path.iter().any(String::is_empty) {
            return Err(ConfigError::new("field", format!("{field:?} has an empty path segment")));
        }
        let min: f64 = config.require_parsed("min")?;
        if !min.is_finite() {
            return Err(ConfigError::new("min", "must be a finite number"));
        }
        log::info("threshold filter ready", &[("field", field), ("min", &min.to_string())]);
        Ok(ThresholdFilter { path, min })
    }

    fn filter(&mut self, events: &Events<'_>) -> Vec<Verdict> {
        // Only the data is read: the other attributes never leave the host.
        events.iter().map(|event| self.verdict(&event.data())).collect()
    }
}

ferry_plugin_sdk::export_filter!(ThresholdFilter);

#[cfg(test)]
mod tests {
    use ferry_plugin_sdk::Event;

    use super::*;

    fn filter(field: &str, min: &str) -> ThresholdFilter {
        ThresholdFilter::new(&Config::from_entries([("field", field), ("min", min)])).unwrap()
    }

    fn event(data: &str) -> Event {
        Event {
            id: "1".into(),
            source: "ferry://test".into(),
            type_: "ferry.event".into(),
            subject: "telemetry/temp".into(),
            time: "2024-01-01T00:00:00Z".into(),
            datacontenttype: Some("application/json".into()),
            data: data.as_bytes().to_vec(),
            sequence: 1,
            hlc: 1 << 16,
            partitionkey: None,
            extensions: Vec::new(),
        }
    }

    #[test]
    fn drops_readings_below_min_and_keeps_the_rest() {
        let mut f = filter("temp", "20");
        let batch = [event(r#"{"temp": 19.5}"#), event(r#"{"temp": 20}"#), event(r#"{"temp": 31}"#)];
        let verdicts = f.filter(&Events::from_slice(&batch));
        assert_eq!(verdicts, [Verdict::Drop, Verdict::Keep, Verdict::Keep]);
    }

    #[test]
    fn keeps_what_it_cannot_read() {
        let f = filter("temp", "20");
        for data in ["not json", "[1, 2]", r#"{"other": 1}"#, r#"{"temp": "cold"}"#, ""] {
            assert_eq!(f.verdict(&event(data).data), Verdict::Keep, "{data:?}");
        }
    }

    #[test]
    fn follows_dotted_paths() {
        let f = filter("reading.celsius", "0");
        assert_eq!(f.verdict(&event(r#"{"reading": {"celsius": -4}}"#).data), Verdict::Drop);
        assert_eq!(f.verdict(&event(r#"{"reading": 3}"#).data), Verdict::Keep);
    }

    #[test]
    fn rejects_missing_or_bad_config() {
        let err = |entries: &[(&str, &str)]| {
            ThresholdFilter::new(&Config::from_entries(entries.iter().copied())).unwrap_err().key().to_owned()
        };
        assert_eq!(err(&[("min", "1")]), "field");
        assert_eq!(err(&[("field", "t")]), "min");
        assert_eq!(err(&[("field", "t"), ("min", "warm")]), "min");
        assert_eq!(err(&[("field", "t"), ("min", "NaN")]), "min");
        assert_eq!(err(&[("field", "a..b"), ("min", "1")]), "field");
    }
}
