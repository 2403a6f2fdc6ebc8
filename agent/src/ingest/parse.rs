//! Decoding of ingest request bodies into producer events.
//!
//! Accepted shapes: a JSON object, a JSON array, NDJSON (any whitespace-
//! separated JSON values), CloudEvents structured mode
//! (`application/cloudevents+json`), CloudEvents batch mode
//! (`application/cloudevents-batch+json`) and CloudEvents HTTP binary mode
//! (`ce-*` headers, body = data). An object with `specversion` is read as a
//! CloudEvent, otherwise as Ferry's own shape (`topic`, `data`, …).
//!
//! Pure: bytes and headers in, [`InputEvent`]s or a [`BadInput`] naming the
//! event index and field out. Nothing is stored from a body that fails here.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use base64::Engine as _;
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::event::{self, is_json_content_type};
use crate::store::Dedup;
use crate::topic;

/// One event as the producer gave it, validated but without Ferry's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct InputEvent {
    /// Idempotency key.
    pub id: Option<String>,
    /// Local topic (CloudEvents `subject`).
    pub topic: String,
    /// CloudEvents `type`.
    pub ty: Option<String>,
    /// CloudEvents `time`, ns since the epoch.
    pub time_nanos: Option<i64>,
    /// CloudEvents `datacontenttype`.
    pub datacontenttype: Option<String>,
    /// The data bytes.
    pub data: Vec<u8>,
    /// Whether `data` came as JSON (so `application/json` is its default type).
    pub data_is_json: bool,
    /// Partition key.
    pub partitionkey: Option<String>,
    /// Extension attributes.
    pub extensions: Vec<(String, String)>,
    /// Per-event TTL.
    pub ttl: Option<Duration>,
    /// How the store recognises it if sent again; `None`: by `id` when the
    /// producer chose one, else not at all.
    pub dedup: Option<Dedup>,
}

/// Why a request body is malformed: the event index (when the body holds
/// several), the field and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadInput {
    /// Zero-based index of the offending event, if the body held a sequence.
    pub index: Option<usize>,
    /// The offending field, if one is to blame.
    pub field: Option<String>,
    /// What is wrong.
    pub reason: String,
}

impl BadInput {
    fn new(field: Option<&str>, reason: impl Into<String>) -> Self {
        Self { index: None, field: field.map(str::to_owned), reason: reason.into() }
    }

    fn at(mut self, index: usize) -> Self {
        self.index = Some(index);
        self
    }
}

impl fmt::Display for BadInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(i) = self.index {
            write!(f, "event {i}: ")?;
        }
        if let Some(field) = &self.field {
            write!(f, "field `{field}`: ")?;
        }
        f.write_str(&self.reason)
    }
}

impl std::error::Error for BadInput {}

/// Decodes a request body. `header` looks up a request header by lower-case name.
pub fn parse_body<'h>(
    content_type: Option<&str>,
    header: impl Fn(&str) -> Option<&'h str>,
    ce_headers: impl Iterator<Item = (&'h str, &'h str)>,
    body: &[u8],
) -> Result<Vec<InputEvent>, BadInput> {
    let essence = content_type.map(|c| c.split(';').next().unwrap_or("").trim().to_ascii_lowercase());
    if header("ce-specversion").is_some() {
        return parse_binary(content_type, ce_headers, body).map(|e| vec![e]);
    }
    match essence.as_deref() {
        Some("application/cloudevents+json") => {
            let raw = parse_one(body)?;
            if raw.specversion.is_none() {
                return Err(BadInput::new(Some("specversion"), "is required in application/cloudevents+json"));
            }
            Ok(vec![raw.into_input()?])
        }
        Some("application/cloudevents-batch+json") => {
            let items: Vec<&RawValue> = serde_json::from_slice(body)
                .map_err(|e| BadInput::new(None, format!("a CloudEvents batch must be a JSON array: {e}")))?;
            items
                .into_iter()
                .enumerate()
                .map(|(i, raw)| {
                    let ev = parse_one(raw.get().as_bytes()).map_err(|e| e.at(i))?;
                    if ev.specversion.is_none() {
                        return Err(BadInput::new(Some("specversion"), "is required in a CloudEvents batch").at(i));
                    }
                    ev.into_input().map_err(|e| e.at(i))
                })
                .collect()
        }
        _ => parse_json_values(body),
    }
}

/// A JSON object, a JSON array of objects, or whitespace-separated objects (NDJSON).
fn parse_json_values(body: &[u8]) -> Result<Vec<InputEvent>, BadInput> {
    let mut values = serde_json::Deserializer::from_slice(body).into_iter::<&RawValue>();
    let first = match values.next() {
        None => {
            return Err(BadInput::new(None, "body is empty; expected a JSON object, a JSON array or NDJSON"));
        }
        Some(v) => v.map_err(|e| BadInput::new(None, format!("malformed JSON: {e}")))?,
    };
    let mut out = Vec::new();
    if first.get().starts_with('[') {
        if values.next().is_some() {
            return Err(BadInput::new(None, "a JSON array must be the whole body"));
        }
        let items: Vec<&RawValue> =
            serde_json::from_str(first.get()).map_err(|e| BadInput::new(None, format!("malformed JSON: {e}")))?;
        for (i, raw) in items.into_iter().enumerate() {
            out.push(parse_one(raw.get().as_bytes()).and_then(RawEvent::into_input).map_err(|e| e.at(i))?);
        }
        return Ok(out);
    }
    out.push(parse_one(first.get().as_bytes()).and_then(RawEvent::into_input).map_err(|e| e.at(0))?);
    for (i, v) in values.enumerate() {
        let index = i + 1;
        let raw = v.map_err(|e| BadInput::new(None, format!("malformed JSON: {e}")).at(index))?;
        out.push(parse_one(raw.get().as_bytes()).and_then(RawEvent::into_input).map_err(|e| e.at(index))?);
    }
    Ok(out)
}

fn parse_one(bytes: &[u8]) -> Result<RawEvent<'_>, BadInput> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let raw = RawEvent::deserialize(&mut de).map_err(|e| {
        let msg = e.to_string();
        // Errors raised for a field carry "field `x`: " in front.
        match msg.strip_prefix("field `").and_then(|r| r.split_once("`: ")) {
            Some((field, reason)) => BadInput::new(Some(field), strip_position(reason)),
            None => BadInput::new(None, format!("malformed event: {msg}")),
        }
    })?;
    de.end().map_err(|e| BadInput::new(None, format!("malformed JSON: {e}")))?;
    Ok(raw)
}

fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_owned(),
        None => msg.to_owned(),
    }
}

/// CloudEvents binary mode: attributes as (name, value) pairs — HTTP's
/// `ce-*` headers or MQTT 5 user properties — and the body as data.
pub fn parse_binary<'h>(
    content_type: Option<&str>,
    ce_headers: impl Iterator<Item = (&'h str, &'h str)>,
    body: &[u8],
) -> Result<InputEvent, BadInput> {
    let mut raw = RawEvent {
        binary_data: Some(body.to_vec()),
        datacontenttype: content_type.map(str::to_owned),
        ..RawEvent::default()
    };
    let mut seen: Vec<&str> = Vec::new();
    for (name, value) in ce_headers {
        // A repeated attribute is ambiguous: refuse it rather than pick one.
        if seen.contains(&name) {
            return Err(bad(name, "appears twice"));
        }
        seen.push(name);
        let attr = name.strip_prefix("ce-").unwrap_or(name);
        let value = value.to_owned();
        match attr {
            "specversion" => raw.specversion = Some(value),
            "id" => raw.id = Some(value),
            "source" => raw.source = Some(value),
            "type" => raw.ty = Some(value),
            "subject" => raw.subject = Some(value),
            "time" => raw.time = Some(value),
            "datacontenttype" => raw.datacontenttype = Some(value),
            "dataschema" => raw.dataschema = Some(value),
            "partitionkey" => raw.partitionkey = Some(value),
            other => raw.extras.push((other.to_owned(), Value::String(value))),
        }
    }
    raw.into_input()
}

/// Every field either shape may carry; unknown keys are kept in `extras` and
/// become CloudEvents extensions, or an error for Ferry's own shape.
#[derive(Default)]
struct RawEvent<'a> {
    specversion: Option<String>,
    id: Option<String>,
    source: Option<String>,
    ty: Option<String>,
    subject: Option<String>,
    topic: Option<String>,
    time: Option<String>,
    datacontenttype: Option<String>,
    dataschema: Option<String>,
    data: Option<&'a RawValue>,
    data_base64: Option<String>,
    binary_data: Option<Vec<u8>>,
    key: Option<String>,
    partitionkey: Option<String>,
    ttl: Option<Value>,
    extensions: Option<Extensions>,
    extras: Vec<(String, Value)>,
}

/// Ferry's `extensions` object, in the producer's order. A key given twice
/// is an error, where a JSON map would silently keep the last.
#[derive(Default)]
struct Extensions(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Extensions {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Extensions;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of extension attributes")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Extensions, A::Error> {
                let mut out: Vec<(String, Value)> = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Value>()? {
                    if out.iter().any(|(n, _)| *n == k) {
                        return Err(de::Error::custom(format!("`{k}` appears twice")));
                    }
                    out.push((k, v));
                }
                Ok(Extensions(out))
            }
        }
        d.deserialize_map(V)
    }
}

impl<'de> Deserialize<'de> for RawEvent<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawEvent<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an event object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawEvent<'de>, A::Error> {
                let mut ev = RawEvent::default();
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    fn field<'de, T: Deserialize<'de>, A: MapAccess<'de>>(
                        map: &mut A,
                        key: &str,
                    ) -> Result<T, A::Error> {
                        map.next_value::<T>().map_err(|e| de::Error::custom(format!("field `{key}`: {e}")))
                    }
                    let k = key.as_ref();
                    let dup = |k: &str| de::Error::custom(format!("field `{k}`: appears twice"));
                    macro_rules! set {
                        ($slot:expr) => {{
                            if $slot.is_some() {
                                return Err(dup(k));
                            }
                            $slot = Some(field(&mut map, k)?);
                        }};
                    }
                    match k {
                        "specversion" => set!(ev.specversion),
                        "id" => set!(ev.id),
                        "source" => set!(ev.source),
                        "type" => set!(ev.ty),
                        "subject" => set!(ev.subject),
                        "topic" => set!(ev.topic),
                        "time" => set!(ev.time),
                        "datacontenttype" => set!(ev.datacontenttype),
                        "dataschema" => set!(ev.dataschema),
                        "data" => set!(ev.data),
                        "data_base64" => set!(ev.data_base64),
                        "key" => set!(ev.key),
                        "partitionkey" => set!(ev.partitionkey),
                        "ttl" => set!(ev.ttl),
                        "extensions" => set!(ev.extensions),
                        _ => {
                            if ev.extras.iter().any(|(n, _)| n == k) {
                                return Err(dup(k));
                            }
                            let v: Value = field(&mut map, k)?;
                            ev.extras.push((k.to_owned(), v));
                        }
                    }
                }
                Ok(ev)
            }
        }
        d.deserialize_map(V)
    }
}

fn bad(field: &str, reason: impl Into<String>) -> BadInput {
    BadInput::new(Some(field), reason)
}

impl RawEvent<'_> {
    fn into_input(self) -> Result<InputEvent, BadInput> {
        let cloudevent = self.specversion.is_some();
        if let Some(v) = &self.specversion
            && v != "1.0"
        {
            return Err(bad("specversion", format!("`{v}` is not supported; Ferry accepts CloudEvents 1.0")));
        }
        if !cloudevent && let Some((name, _)) = self.extras.first() {
            return Err(bad(
                name,
                "is not a Ferry event field (topic, data, data_base64, id, key, type, time, datacontenttype, ttl, extensions); \
                 send a CloudEvent with `specversion` for extension attributes",
            ));
        }
        let (topic, topic_field) = match (self.topic, self.subject) {
            (Some(_), Some(_)) => return Err(bad("topic", "give `topic` or `subject`, not both")),
            (Some(t), None) => (t, "topic"),
            (None, Some(s)) => (s, "subject"),
            (None, None) => return Err(bad("topic", "is required (or CloudEvents `subject`)")),
        };
        topic::validate_name(&topic).map_err(|e| bad(topic_field, format!("`{}` {e}", topic.escape_debug())))?;

        let mut extensions = Vec::new();
        if cloudevent {
            for (name, field) in [(&self.id, "id"), (&self.source, "source"), (&self.ty, "type")] {
                if name.as_deref().is_none_or(str::is_empty) {
                    return Err(bad(field, "is required by CloudEvents 1.0 and must not be empty"));
                }
            }
            if self.key.is_some() || self.ttl.is_some() || self.extensions.is_some() {
                return Err(bad(
                    "key",
                    "`key`, `ttl` and `extensions` are Ferry fields; in a CloudEvent use `partitionkey` and extension attributes",
                ));
            }
            for (name, value) in self.extras {
                extensions.push(extension(&name, &value)?);
            }
        } else {
            if self.source.is_some() {
                return Err(bad("source", "is set by Ferry (ferry://{device_id})"));
            }
            if self.partitionkey.is_some() {
                return Err(bad("partitionkey", "use `key` in a Ferry event"));
            }
            if self.dataschema.is_some() {
                return Err(bad("dataschema", "is a CloudEvents attribute; in a Ferry event put it in `extensions`"));
            }
            for (name, value) in self.extensions.map(|e| e.0).into_iter().flatten() {
                extensions.push(extension(&name, &value).map_err(|mut e| {
                    e.field = Some(format!("extensions.{name}"));
                    e
                })?);
            }
        }
        if let Some(schema) = self.dataschema {
            event::check_text(&schema, event::MAX_ATTRIBUTE_BYTES).map_err(|r| bad("dataschema", r))?;
            if schema.is_empty() {
                return Err(bad("dataschema", "must not be empty"));
            }
            extensions.push(("dataschema".to_owned(), schema));
        }

        if let Some(id) = &self.id {
            if id.is_empty() {
                return Err(bad("id", "must not be empty"));
            }
            event::check_text(id, event::MAX_ATTRIBUTE_BYTES).map_err(|r| bad("id", r))?;
        }
        if let Some(ty) = &self.ty {
            event::check_text(ty, event::MAX_ATTRIBUTE_BYTES).map_err(|r| bad("type", r))?;
        }
        for (value, field) in [(&self.key, "key"), (&self.partitionkey, "partitionkey")] {
            if let Some(v) = value {
                event::check_text(v, event::MAX_EXTENSION_BYTES).map_err(|r| bad(field, r))?;
            }
        }
        let time_nanos = match &self.time {
            Some(t) => {
                Some(event::parse_time(t).ok_or_else(|| bad("time", format!("`{t}` is not an RFC 3339 timestamp")))?)
            }
            None => None,
        };
        if let Some(ct) = &self.datacontenttype {
            if ct.is_empty() {
                return Err(bad("datacontenttype", "must not be empty"));
            }
            event::check_text(ct, event::MAX_ATTRIBUTE_BYTES).map_err(|r| bad("datacontenttype", r))?;
        }

        let declared_json = self.datacontenttype.as_deref().is_none_or(is_json_content_type);
        let (data, data_is_json) = match (self.data, self.data_base64, self.binary_data) {
            (Some(_), Some(_), _) => {
                return Err(bad("data", "give `data` or `data_base64`, not both"));
            }
            (Some(raw), None, _) => {
                match (declared_json, serde_json::from_str::<&str>(raw.get())) {
                    // A JSON string under a non-JSON content type is the data itself (CloudEvents JSON format 3.1).
                    (false, Ok(text)) => (text.as_bytes().to_vec(), false),
                    (false, Err(_)) => match serde_json::from_str::<String>(raw.get()) {
                        Ok(text) => (text.into_bytes(), false),
                        Err(_) => {
                            return Err(bad("data", "must be a JSON string when datacontenttype is not JSON"));
                        }
                    },
                    (true, _) => (raw.get().as_bytes().to_vec(), true),
                }
            }
            (None, Some(b64), _) => (
                base64::engine::general_purpose::STANDARD
                    .decode(b64.as_bytes())
                    .map_err(|e| bad("data_base64", format!("is not valid base64: {e}")))?,
                false,
            ),
            (None, None, Some(body)) => {
                if self.datacontenttype.as_deref().is_some_and(is_json_content_type) {
                    serde_json::from_slice::<de::IgnoredAny>(&body)
                        .map_err(|e| bad("data", format!("content type says JSON but the body is not: {e}")))?;
                }
                let is_json = self.datacontenttype.as_deref().is_some_and(is_json_content_type);
                (body, is_json)
            }
            (None, None, None) => return Err(bad("data", "is required (or `data_base64`)")),
        };

        let ttl = match self.ttl {
            None => None,
            Some(Value::Number(n)) => Some(Duration::from_secs(
                n.as_u64().ok_or_else(|| bad("ttl", "must be whole seconds or a duration like \"1h\""))?,
            )),
            Some(Value::String(s)) => Some(
                humantime::parse_duration(&s)
                    .map_err(|e| bad("ttl", format!("`{s}` is not a duration like \"30s\" or \"1h\": {e}")))?,
            ),
            Some(_) => {
                return Err(bad("ttl", "must be whole seconds or a duration like \"1h\""));
            }
        };

        Ok(InputEvent {
            id: self.id,
            topic,
            ty: self.ty,
            time_nanos,
            datacontenttype: self.datacontenttype,
            data,
            data_is_json,
            partitionkey: self.key.or(self.partitionkey),
            extensions,
            ttl,
            dedup: None,
        })
    }
}

/// A CloudEvents extension attribute, validated and rendered as a string.
fn extension(name: &str, value: &Value) -> Result<(String, String), BadInput> {
    event::check_extension_name(name).map_err(|r| bad(name, r))?;
    let text = match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        _ => {
            return Err(bad(name, "an extension attribute must be a string, number or boolean"));
        }
    };
    event::check_text(&text, event::MAX_EXTENSION_BYTES).map_err(|r| bad(name, r))?;
    Ok((name.to_owned(), text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(ct: Option<&str>, body: &str) -> Result<Vec<InputEvent>, BadInput> {
        parse_body(ct, |_| None, std::iter::empty(), body.as_bytes())
    }

    #[test]
    fn a_ferry_object_takes_topic_data_and_optional_fields() {
        let evs = parse(
            Some("application/json"),
            r#"{"topic":"t/a","data":{"v":1},"id":"k1","key":"p","type":"x","time":"2026-01-01T00:00:00Z","ttl":"1h","extensions":{"traceparent":"00-1-2-01"}}"#,
        )
        .unwrap();
        let e = &evs[0];
        assert_eq!(e.topic, "t/a");
        assert_eq!(e.data, br#"{"v":1}"#);
        assert!(e.data_is_json);
        assert_eq!(e.id.as_deref(), Some("k1"));
        assert_eq!(e.partitionkey.as_deref(), Some("p"));
        assert_eq!(e.ttl, Some(Duration::from_secs(3600)));
        assert_eq!(e.extensions, vec![("traceparent".into(), "00-1-2-01".into())]);
    }

    #[test]
    fn arrays_and_ndjson_give_one_event_per_element() {
        assert_eq!(parse(None, r#"[{"topic":"a","data":1},{"topic":"b","data":2}]"#).unwrap().len(), 2);
        assert_eq!(
            parse(Some("application/x-ndjson"), "{\"topic\":\"a\",\"data\":1}\n{\"topic\":\"b\",\"data\":2}\n")
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn errors_name_the_event_index_and_field() {
        let e = parse(None, r#"[{"topic":"a","data":1},{"topic":"a/#","data":2}]"#).unwrap_err();
        assert_eq!((e.index, e.field.as_deref()), (Some(1), Some("topic")));
        assert!(e.reason.contains("wildcard"), "{e}");
        let e = parse(None, "{\"topic\":\"a\",\"data\":1}\n{\"topic\":\"a\"}\n").unwrap_err();
        assert_eq!((e.index, e.field.as_deref()), (Some(1), Some("data")));
        let e = parse(None, r#"[{"topic":"a","data":1,"id":5}]"#).unwrap_err();
        assert_eq!((e.index, e.field.as_deref()), (Some(0), Some("id")));
        let e = parse(None, r#"{"tpoic":"a","data":1}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("tpoic"));
        let e = parse(None, r#"{"topic":"a","data":1"#).unwrap_err();
        assert!(e.reason.contains("malformed JSON"), "{e}");
        let e = parse(None, "").unwrap_err();
        assert!(e.reason.contains("empty"));
        let e = parse(None, r#"{"topic":"a","data":1,"time":"noon"}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("time"));
        let e = parse(None, r#"{"topic":"a","data_base64":"***"}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("data_base64"));
        assert_eq!(e.to_string(), format!("event 0: field `data_base64`: {}", e.reason));
    }

    #[test]
    fn structured_cloudevents_keep_subject_and_extensions() {
        let body = r#"{"specversion":"1.0","id":"e1","source":"/sensor","type":"com.acme.temp","subject":"telemetry/temp",
            "datacontenttype":"application/json","data":{"c":20},"traceparent":"00-ab-cd-01","partitionkey":"s1"}"#;
        let e = &parse(Some("application/cloudevents+json"), body).unwrap()[0];
        assert_eq!(e.topic, "telemetry/temp");
        assert_eq!(e.ty.as_deref(), Some("com.acme.temp"));
        assert_eq!(e.partitionkey.as_deref(), Some("s1"));
        assert_eq!(e.extensions, vec![("traceparent".into(), "00-ab-cd-01".into())]);
        let batch = format!("[{body},{body}]");
        assert_eq!(parse(Some("application/cloudevents-batch+json"), &batch).unwrap().len(), 2);
        let e = parse(
            Some("application/cloudevents+json"),
            r#"{"specversion":"1.0","source":"s","type":"t","subject":"a","data":1}"#,
        )
        .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("id"));
        let e = parse(
            None,
            r#"{"specversion":"1.0","id":"1","source":"s","type":"t","subject":"a","data":1,"sequence":"9"}"#,
        )
        .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("sequence"));
    }

    #[test]
    fn text_data_under_a_non_json_content_type_is_the_string_itself() {
        let e = &parse(None, r#"{"topic":"a","datacontenttype":"text/plain","data":"hello"}"#).unwrap()[0];
        assert_eq!(e.data, b"hello");
        assert!(!e.data_is_json);
        let e = &parse(None, r#"{"topic":"a","data_base64":"AAEC"}"#).unwrap()[0];
        assert_eq!(e.data, [0, 1, 2]);
    }

    #[test]
    fn binary_mode_reads_ce_headers_and_the_body_as_data() {
        let headers = [
            ("ce-specversion", "1.0"),
            ("ce-id", "b1"),
            ("ce-source", "/x"),
            ("ce-type", "t"),
            ("ce-subject", "a/b"),
            ("ce-traceparent", "00-1-2-01"),
        ];
        let lookup = |name: &str| headers.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
        let evs = parse_body(Some("application/json"), lookup, headers.iter().copied(), br#"{"x":1}"#).unwrap();
        assert_eq!(evs[0].topic, "a/b");
        assert_eq!(evs[0].id.as_deref(), Some("b1"));
        assert!(evs[0].data_is_json);
        assert_eq!(evs[0].extensions, vec![("traceparent".into(), "00-1-2-01".into())]);
        let err = parse_body(Some("application/json"), lookup, headers.iter().copied(), b"{not json").unwrap_err();
        assert_eq!(err.field.as_deref(), Some("data"));
    }

    #[test]
    fn attributes_a_broker_would_refuse_are_refused_naming_the_field() {
        let cases = [
            (r#"{"topic":"p/a","data":1,"id":"nul\u0000id"}"#, "id"),
            (r#"{"topic":"p/a","data":1,"key":"k\u0007"}"#, "key"),
            (r#"{"topic":"p/a","data":1,"type":"t\uffff"}"#, "type"),
            (r#"{"topic":"p/a","data":"x","datacontenttype":"text/plain\u0000"}"#, "datacontenttype"),
            (r#"{"topic":"p/a","data":1,"extensions":{"trace":"a\u0085"}}"#, "extensions.trace"),
            (r#"{"topic":"p/\ufdd0","data":1}"#, "topic"),
            (r#"{"topic":"p/\uffff","data":1}"#, "topic"),
            (
                r#"{"specversion":"1.0","id":"1","source":"s","type":"t","subject":"a","data":1,"dataschema":"x\u0000"}"#,
                "dataschema",
            ),
            (r#"{"specversion":"1.0","id":"1","source":"s","type":"t","subject":"a","data":1,"ext":"\u001f"}"#, "ext"),
        ];
        for (body, field) in cases {
            let e = parse(None, body).unwrap_err();
            assert_eq!(e.field.as_deref(), Some(field), "{body}: {e}");
            assert!(e.reason.contains("U+"), "{body}: the reason names the character: {e}");
        }
        let long = "x".repeat(crate::event::MAX_EXTENSION_BYTES + 1);
        let e = parse(None, &format!(r#"{{"topic":"a","data":1,"extensions":{{"big":"{long}"}}}}"#)).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("extensions.big"));
    }

    #[test]
    fn core_and_ferry_attribute_names_are_refused_as_extensions() {
        for name in [
            "id",
            "source",
            "type",
            "specversion",
            "subject",
            "time",
            "datacontenttype",
            "data",
            "sequence",
            "hlc",
            "partitionkey",
            "ferryroute",
            "ferryvv",
        ] {
            let e = parse(None, &format!(r#"{{"topic":"a","data":1,"extensions":{{"{name}":"x"}}}}"#)).unwrap_err();
            assert_eq!(e.field.as_deref(), Some(format!("extensions.{name}").as_str()), "{name}: {e}");
        }
        for name in ["ferryroute", "sequence", "hlc"] {
            let body = format!(
                r#"{{"specversion":"1.0","id":"1","source":"s","type":"t","subject":"a","data":1,"{name}":"x"}}"#
            );
            assert_eq!(parse(None, &body).unwrap_err().field.as_deref(), Some(name));
        }
        let ok = parse(None, r#"{"topic":"a","data":1,"extensions":{"dataschema":"https://example.com/s"}}"#).unwrap();
        assert_eq!(ok[0].extensions, vec![("dataschema".into(), "https://example.com/s".into())]);
    }

    #[test]
    fn duplicate_extension_keys_and_ce_headers_are_refused() {
        let e = parse(None, r#"{"topic":"a","data":1,"extensions":{"k":"1","k":"2"}}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("extensions"), "{e}");
        assert!(e.reason.contains("twice"), "{e}");
        let e = parse(
            None,
            r#"{"specversion":"1.0","id":"1","source":"s","type":"t","subject":"a","data":1,"k":"1","k":"2"}"#,
        )
        .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("k"), "{e}");
        let headers = [
            ("ce-specversion", "1.0"),
            ("ce-id", "a"),
            ("ce-id", "b"),
            ("ce-source", "/x"),
            ("ce-type", "t"),
            ("ce-subject", "s"),
        ];
        let lookup = |name: &str| headers.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
        let e = parse_body(None, lookup, headers.iter().copied(), b"1").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("ce-id"), "{e}");
    }
}
