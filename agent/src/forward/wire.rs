//! The CloudEvents MQTT protocol binding: how a stored event becomes an MQTT
//! publish.
//!
//! MQTT 5 gets binary content mode: the payload is the data, the content type
//! goes in the MQTT content-type property and every other attribute is a user
//! property. MQTT 3.1.1 has no properties, so it gets structured content mode:
//! the payload is the whole event as `application/cloudevents+json`.
//! Pure functions: the same event always encodes to the same bytes, so a
//! resend after a reconnect is identical to the first send.

use base64::Engine as _;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::event::{Event, ROUTE_EXTENSION, format_time};

/// Content type of structured-mode payloads.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";

/// An event in binary content mode (MQTT 5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinaryMessage {
    /// The data.
    pub payload: Vec<u8>,
    /// `datacontenttype`, for the MQTT content-type property.
    pub content_type: Option<String>,
    /// Every other attribute, as (name, value).
    pub user_properties: Vec<(String, String)>,
}

/// The context attributes of an event, in CloudEvents order, without data.
fn attributes(event: &Event) -> Vec<(String, String)> {
    let b = &event.body;
    let mut attrs = vec![
        ("specversion".to_owned(), "1.0".to_owned()),
        ("id".to_owned(), b.id.clone()),
        ("source".to_owned(), b.source.clone()),
        ("type".to_owned(), b.ty.clone()),
        ("subject".to_owned(), b.subject.clone()),
        ("time".to_owned(), format_time(b.time_nanos)),
        ("sequence".to_owned(), event.sequence.to_string()),
        ("hlc".to_owned(), event.hlc.0.to_string()),
    ];
    if let Some(k) = &b.partitionkey {
        attrs.push(("partitionkey".to_owned(), k.clone()));
    }
    attrs.extend(b.extensions.iter().filter(|(k, _)| k != ROUTE_EXTENSION).cloned());
    attrs
}

/// Binary content mode for MQTT 5.
pub fn binary(event: &Event) -> BinaryMessage {
    into_binary(event.clone())
}

/// Binary content mode, taking the event apart instead of copying it: the
/// same properties as [`binary`], with the event's strings moved into them.
pub fn into_binary(event: Event) -> BinaryMessage {
    let b = event.body;
    let mut user_properties = Vec::with_capacity(9 + b.extensions.len());
    user_properties.extend([
        ("specversion".to_owned(), "1.0".to_owned()),
        ("id".to_owned(), b.id),
        ("source".to_owned(), b.source),
        ("type".to_owned(), b.ty),
        ("subject".to_owned(), b.subject),
        ("time".to_owned(), format_time(b.time_nanos)),
        ("sequence".to_owned(), event.sequence.to_string()),
        ("hlc".to_owned(), event.hlc.0.to_string()),
    ]);
    if let Some(k) = b.partitionkey {
        user_properties.push(("partitionkey".to_owned(), k));
    }
    user_properties.extend(b.extensions.into_iter().filter(|(k, _)| k != ROUTE_EXTENSION));
    BinaryMessage { payload: b.data, content_type: b.datacontenttype, user_properties }
}

/// Structured content mode (`application/cloudevents+json`) for MQTT 3.1.1.
pub fn structured(event: &Event) -> Vec<u8> {
    let mut obj = Map::new();
    for (k, v) in attributes(event) {
        obj.insert(k, Value::String(v));
    }
    if let Some(ct) = &event.body.datacontenttype {
        obj.insert("datacontenttype".into(), Value::String(ct.clone()));
    }
    let data = &event.body.data;
    // JSON data is embedded as JSON; anything else (or JSON that fails to
    // parse, which ingest never stores) is carried as base64.
    match event.body.data_is_json().then(|| serde_json::from_slice::<&RawValue>(data).ok()).flatten() {
        Some(raw) => {
            let mut text = serde_json::to_string(&obj).expect("a map of strings serialises");
            text.pop(); // the closing brace
            if !obj.is_empty() {
                text.push(',');
            }
            text.push_str("\"data\":");
            text.push_str(raw.get());
            text.push('}');
            text.into_bytes()
        }
        None => {
            obj.insert("data_base64".into(), Value::String(base64::engine::general_purpose::STANDARD.encode(data)));
            serde_json::to_vec(&obj).expect("a map of strings serialises")
        }
    }
}

/// The destination topic: `{topic_prefix}{subject}`.
pub fn topic(prefix: &str, event: &Event) -> String {
    let mut t = String::with_capacity(prefix.len() + event.body.subject.len());
    t.push_str(prefix);
    t.push_str(&event.body.subject);
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Hlc;
    use crate::event::EventBody;

    fn event(ct: Option<&str>, data: &[u8]) -> Event {
        Event {
            sequence: 42,
            hlc: Hlc(7 << 16),
            expires_at_ms: None,
            priority: 100,
            body: EventBody {
                id: "e-1".into(),
                source: "ferry://gw".into(),
                ty: "ferry.event".into(),
                subject: "telemetry/temp".into(),
                time_nanos: 1_700_000_000_000_000_000,
                datacontenttype: ct.map(str::to_owned),
                data: data.to_vec(),
                partitionkey: Some("s-1".into()),
                extensions: vec![(
                    "traceparent".into(),
                    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
                )],
            },
        }
    }

    #[test]
    fn binary_mode_carries_data_as_payload_and_attributes_as_user_properties() {
        let m = binary(&event(Some("application/json"), br#"{"c":1}"#));
        assert_eq!(m.payload, br#"{"c":1}"#);
        assert_eq!(m.content_type.as_deref(), Some("application/json"));
        let get = |k: &str| m.user_properties.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("specversion"), Some("1.0"));
        assert_eq!(get("id"), Some("e-1"));
        assert_eq!(get("sequence"), Some("42"));
        assert_eq!(get("hlc"), Some(&*(7u64 << 16).to_string()));
        assert_eq!(get("time"), Some("2023-11-14T22:13:20Z"));
        assert_eq!(get("partitionkey"), Some("s-1"));
        assert!(get("traceparent").is_some());
        assert_eq!(get("datacontenttype"), None, "content type belongs in the MQTT property");
    }

    #[test]
    fn structured_mode_embeds_json_data_and_base64_for_the_rest() {
        let v: Value = serde_json::from_slice(&structured(&event(Some("application/json"), br#"{"c":1}"#))).unwrap();
        assert_eq!(v["data"]["c"], 1);
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["datacontenttype"], "application/json");
        assert_eq!(v["sequence"], "42");
        assert!(v["traceparent"].is_string());
        let v: Value =
            serde_json::from_slice(&structured(&event(Some("application/octet-stream"), &[0, 1, 2]))).unwrap();
        assert_eq!(v["data_base64"], "AAEC");
        assert!(v.get("data").is_none());
    }

    #[test]
    fn binary_mode_properties_are_the_context_attributes_in_order() {
        let e = event(Some("application/json"), br#"{"c":1}"#);
        let mut with_route = e.clone();
        with_route.body.extensions.push((ROUTE_EXTENSION.into(), "cloud-a".into()));
        assert_eq!(binary(&e).user_properties, attributes(&e));
        assert_eq!(binary(&with_route).user_properties, attributes(&e), "the route extension stays internal");
    }

    #[test]
    fn encoding_is_deterministic_so_resends_are_identical() {
        let e = event(Some("application/json"), br#"{"c":1}"#);
        assert_eq!(structured(&e), structured(&e));
        assert_eq!(binary(&e), binary(&e));
        assert_eq!(topic("ferry/gw/", &e), "ferry/gw/telemetry/temp");
    }
}
