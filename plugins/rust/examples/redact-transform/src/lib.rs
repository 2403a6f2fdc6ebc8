//! Replaces configured JSON fields with a placeholder before events leave
//! the device.
//!
//! Config: `fields` — comma-separated keys or dotted paths, e.g.
//! `"password,user.email"`; `replacement` — the placeholder, `[redacted]` by
//! default.
//!
//! An event that holds any of the fields is replaced by a copy with those
//! values overwritten; it keeps its `id`, so consumers still deduplicate
//! resent copies. Other events are kept untouched.

use ferry_plugin_sdk::{Config, ConfigError, Event, EventRef, Events, Filter, Verdict, log};
use serde_json::Value;

/// The transform, configured.
#[derive(Debug)]
pub struct RedactTransform {
    paths: Vec<Vec<String>>,
    replacement: String,
}

impl RedactTransform {
    /// The verdict for one event. Reads its data, and copies the whole
    /// event out of the host only when it has something to redact.
    pub fn verdict(&self, event: EventRef<'_>) -> Verdict {
        let Ok(mut json) = serde_json::from_slice::<Value>(&event.data()) else {
            return Verdict::Keep;
        };
        let mut redacted = false;
        for path in &self.paths {
            if let Some(value) = lookup_mut(&mut json, path) {
                *value = Value::String(self.replacement.clone());
                redacted = true;
            }
        }
        if !redacted {
            return Verdict::Keep;
        }
        let data = serde_json::to_vec(&json).expect("a JSON value always serializes");
        Verdict::Replace(vec![Event { data, ..event.to_event() }])
    }
}

fn lookup_mut<'a>(json: &'a mut Value, path: &[String]) -> Option<&'a mut Value> {
    path.iter().try_fold(json, |value, key| value.as_object_mut()?.get_mut(key))
}

impl Filter for RedactTransform {
    fn new(config: &Config) -> Result<Self, ConfigError> {
        let fields = config.list("fields");
        if fields.is_empty() {
            return Err(ConfigError::new("fields", "must name at least one field"));
        }
        let paths: Vec<Vec<String>> =
            fields.iter().map(|field| field.split('.').map(str::to_owned).collect()).collect();
        if paths.iter().flatten().any(String::is_empty) {
            return Err(ConfigError::new("fields", "has a path with an empty segment"));
        }
        let replacement = config.get("replacement").unwrap_or("[redacted]").to_owned();
        log::info("redact transform ready", &[("fields", &fields.join(","))]);
        Ok(RedactTransform { paths, replacement })
    }

    fn filter(&mut self, events: &Events<'_>) -> Vec<Verdict> {
        events.iter().map(|event| self.verdict(event)).collect()
    }
}

ferry_plugin_sdk::export_filter!(RedactTransform);

#[cfg(test)]
mod tests {
    use super::*;

    fn transform(fields: &str) -> RedactTransform {
        RedactTransform::new(&Config::from_entries([("fields", fields)])).unwrap()
    }

    fn verdict(t: &RedactTransform, data: &str) -> Verdict {
        let batch = [event(data)];
        t.verdict(Events::from_slice(&batch).get(0))
    }

    fn event(data: &str) -> Event {
        Event {
            id: "42".into(),
            source: "ferry://test".into(),
            type_: "ferry.event".into(),
            subject: "users/login".into(),
            time: "2024-01-01T00:00:00Z".into(),
            datacontenttype: Some("application/json".into()),
            data: data.as_bytes().to_vec(),
            sequence: 7,
            hlc: 1 << 16,
            partitionkey: None,
            extensions: Vec::new(),
        }
    }

    fn replaced_data(verdict: Verdict) -> String {
        match verdict {
            Verdict::Replace(events) => {
                assert_eq!(events.len(), 1);
                assert_eq!(events[0].id, "42", "the copy keeps the id");
                String::from_utf8(events[0].data.clone()).unwrap()
            }
            other => panic!("expected replace, got {other:?}"),
        }
    }

    #[test]
    fn replaces_configured_fields_and_keeps_the_others_in_order() {
        let t = transform("password, user.email");
        let data =
            replaced_data(verdict(&t, r#"{"user":{"name":"ada","email":"a@x"},"password":"hunter2","ok":true}"#));
        assert_eq!(data, r#"{"user":{"name":"ada","email":"[redacted]"},"password":"[redacted]","ok":true}"#);
    }

    #[test]
    fn keeps_events_without_the_fields_or_without_json() {
        let t = transform("password");
        for data in [r#"{"user":"ada"}"#, "plain text", r#"["password"]"#] {
            assert_eq!(verdict(&t, data), Verdict::Keep, "{data:?}");
        }
    }

    #[test]
    fn uses_the_configured_replacement() {
        let t = RedactTransform::new(&Config::from_entries([("fields", "token"), ("replacement", "***")])).unwrap();
        assert_eq!(replaced_data(verdict(&t, r#"{"token":"t"}"#)), r#"{"token":"***"}"#);
    }

    #[test]
    fn rejects_an_empty_field_list() {
        let err = RedactTransform::new(&Config::from_entries([("fields", " , ")])).unwrap_err();
        assert_eq!(err.key(), "fields");
        assert!(RedactTransform::new(&Config::default()).is_err());
    }
}
