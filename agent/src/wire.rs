//! The CloudEvents MQTT protocol binding: how a stored event becomes an MQTT
//! publish.
//!
//! MQTT 5 gets binary content mode: the payload is the data, the content type
//! goes in the MQTT content-type property and every other attribute is a user
//! property. MQTT 3.1.1 has no properties, so it gets structured content mode:
//! the payload is the whole event as `application/cloudevents+json`.
//! Pure functions: the same event always encodes to the same bytes, so a
//! resend after a reconnect is identical to the first send.
//!
//! A batch is one publish whose payload is a CloudEvents JSON batch
//! (`application/cloudevents-batch+json`): an array of structured-mode
//! events, every attribute included, all of one subject, on that subject's
//! topic. Azure IoT Hub's device endpoint takes one topic per device, with
//! the message's properties in it ([`iot_hub_topic`]).
//!
//! [`publish_len`] sizes a publish without encoding it, so ingest can refuse
//! an event that some destination's broker would refuse.

use base64::Engine as _;
use serde_json::value::RawValue;

use crate::config::Protocol;
use crate::event::{
    Event, EventBodyRef, JSON_CONTENT_TYPE, ROUTE_EXTENSION, format_time, is_core_attribute, is_json_content_type,
};

/// Whether an extension travels: not Ferry's internal route, and not one
/// that would stand in for a core attribute (ingest refuses those; an event
/// stored by an earlier release may still hold one).
fn travels(name: &str) -> bool {
    name != ROUTE_EXTENSION && !is_core_attribute(name)
}

/// Content type of structured-mode payloads.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";

/// Content type of batch payloads.
pub const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";

/// A batch payload: the structured-mode encodings of its events (see
/// [`structured`]) as one JSON array.
pub fn batch<'a>(structured: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = vec![b'['];
    for (i, e) in structured.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(e);
    }
    out.push(b']');
    out
}

/// Bytes [`batch`] adds around events of these encoded lengths.
pub fn batch_len(encoded: impl IntoIterator<Item = usize>) -> usize {
    let (n, sum) = encoded.into_iter().fold((0usize, 0usize), |(n, sum), len| (n + 1, sum + len));
    2 + sum + n.saturating_sub(1)
}

/// The topic Azure IoT Hub's device endpoint takes for device `device_id`:
/// `devices/{device_id}/messages/events/` and the message properties, URL
/// encoded: the system properties content type (`$.ct`) and encoding
/// (`$.ce`), so IoT Hub routing can read the JSON body, and the event's
/// `subject`.
pub fn iot_hub_topic(device_id: &str, subject: &str, content_type: &str) -> String {
    use crate::sas::encode;
    format!(
        "devices/{}/messages/events/$.ct={}&$.ce=utf-8&subject={}",
        encode(device_id),
        encode(content_type),
        encode(subject)
    )
}

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

/// The context attributes of an event, in CloudEvents order, without data
/// (what [`into_binary`] and [`structured`] write).
#[cfg(test)]
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
    attrs.extend(b.extensions.iter().filter(|(k, _)| travels(k)).cloned());
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
    user_properties.extend(b.extensions.into_iter().filter(|(k, _)| travels(k)));
    BinaryMessage { payload: b.data, content_type: b.datacontenttype, user_properties }
}

/// Structured content mode (`application/cloudevents+json`) for MQTT 3.1.1:
/// the attributes in name order, then the data. Written straight into the
/// payload, without a JSON tree: this runs once per event and destination.
pub fn structured(event: &Event) -> Vec<u8> {
    let b = &event.body;
    let data = &b.data;
    // JSON data is embedded as JSON; anything else (or JSON that fails to
    // parse, which ingest never stores) is carried as base64.
    let json = b.data_is_json().then(|| serde_json::from_slice::<&RawValue>(data).ok()).flatten();
    let (time, sequence, hlc) = (format_time(b.time_nanos), event.sequence.to_string(), event.hlc.0.to_string());
    let mut attrs: Vec<(&str, &str)> = Vec::with_capacity(10 + b.extensions.len());
    attrs.extend([
        ("specversion", "1.0"),
        ("id", b.id.as_str()),
        ("source", b.source.as_str()),
        ("type", b.ty.as_str()),
        ("subject", b.subject.as_str()),
        ("time", time.as_str()),
        ("sequence", sequence.as_str()),
        ("hlc", hlc.as_str()),
    ]);
    if let Some(k) = &b.partitionkey {
        attrs.push(("partitionkey", k));
    }
    attrs.extend(b.extensions.iter().filter(|(k, _)| travels(k)).map(|(k, v)| (k.as_str(), v.as_str())));
    if let Some(ct) = &b.datacontenttype
        // The JSON format implies `application/json` when it is absent
        // (CloudEvents JSON Event Format 1.0.2, 3.1): 36 bytes saved per
        // event of every batch.
        && !(json.is_some() && ct == JSON_CONTENT_TYPE)
    {
        attrs.push(("datacontenttype", ct));
    }
    // Name order, and the last of a repeated name, as a JSON object would have it.
    attrs.reverse();
    attrs.sort_by(|a, b| a.0.cmp(b.0));
    attrs.dedup_by(|later, earlier| later.0 == earlier.0);
    let mut out = Vec::with_capacity(data.len() * 4 / 3 + 64 * attrs.len() + 16);
    out.push(b'{');
    for (k, v) in attrs {
        json_string(&mut out, k);
        out.push(b':');
        json_string(&mut out, v);
        out.push(b',');
    }
    match json {
        Some(raw) => {
            out.extend_from_slice(b"\"data\":");
            out.extend_from_slice(raw.get().as_bytes());
        }
        None => {
            out.extend_from_slice(b"\"data_base64\":\"");
            let at = out.len();
            out.resize(at + base64::encoded_len(data.len(), true).expect("an event's data is far below usize::MAX"), 0);
            let n = base64::engine::general_purpose::STANDARD
                .encode_slice(data, &mut out[at..])
                .expect("the room was sized by encoded_len");
            out.truncate(at + n);
            out.push(b'"');
        }
    }
    out.push(b'}');
    out
}

/// Appends `s` as a JSON string.
fn json_string(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(&mut *out, s).expect("writing a string to a Vec cannot fail");
}

/// The destination topic: `{topic_prefix}{subject}`.
pub fn topic(prefix: &str, event: &Event) -> String {
    let mut t = String::with_capacity(prefix.len() + event.body.subject.len());
    t.push_str(prefix);
    t.push_str(&event.body.subject);
    t
}

/// Longest `time` attribute [`format_time`] writes (RFC 3339 with
/// nanoseconds, or the raw count for a year it cannot format).
const MAX_TIME_LEN: usize = 30;

/// Digits of the largest `u64` (a `sequence` or `hlc` not assigned yet).
const MAX_U64_DIGITS: usize = 20;

/// Bytes on the wire of an MQTT string: its two-byte length and itself.
fn mqtt_str(s: &str) -> usize {
    2 + s.len()
}

/// Bytes of `s` as a JSON string (quotes and escapes; serde_json escapes
/// `"`, `\` and the C0 controls).
fn json_str(s: &str) -> usize {
    2 + s.len()
        + s.bytes()
            .map(|b| match b {
                b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0C => 1,
                0..0x20 => 5,
                _ => 0,
            })
            .sum::<usize>()
}

/// Bytes of the base64 encoding of `n` bytes.
fn base64_len(n: usize) -> usize {
    n.div_ceil(3) * 4
}

/// The sizes of the publish that carries `body` to a broker of `protocol`
/// on a topic of `topic_len` bytes, for an event whose `sequence` and `hlc`
/// are not assigned yet: upper bounds at most a few dozen bytes above what
/// the forwarder will send. `json_data` says whether the data is JSON that
/// structured mode embeds as it is (else it goes as base64 when the content
/// type is not JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishSize {
    /// The whole packet.
    pub packet: usize,
    /// Its payload.
    pub payload: usize,
}

/// See [`PublishSize`].
pub fn publish_size(protocol: Protocol, topic_len: usize, body: &EventBodyRef<'_>, json_data: bool) -> PublishSize {
    // Fixed header (type byte and a remaining length of up to 4 bytes),
    // the topic, the packet id.
    let mut packet = 5 + 2 + topic_len + 2;
    let extensions = || body.extensions.iter().filter(|(k, _)| travels(k));
    let payload = match protocol {
        Protocol::V5 => {
            let property = |k: &str, v: &str| 1 + mqtt_str(k) + mqtt_str(v);
            let mut props = property("specversion", "1.0")
                + property("id", body.id)
                + property("source", body.source)
                + property("type", body.ty)
                + property("subject", body.subject)
                + (1 + 4 + "time".len() + 2 + MAX_TIME_LEN)
                + (1 + 4 + "sequence".len() + 2 + MAX_U64_DIGITS)
                + (1 + 4 + "hlc".len() + 2 + MAX_U64_DIGITS);
            props += body.partitionkey.map_or(0, |k| property("partitionkey", k));
            props += body.datacontenttype.map_or(0, |c| 1 + mqtt_str(c));
            props += extensions().map(|(k, v)| property(k, v)).sum::<usize>();
            // The properties' own length, a variable integer of up to 4 bytes.
            packet += 4 + props;
            body.data.len()
        }
        Protocol::V311 => {
            // `{` `}`, then `"name":value` members separated by commas.
            let member = |k: &str, value_len: usize| json_str(k) + 1 + value_len + 1;
            let mut json = 2
                + member("specversion", json_str("1.0"))
                + member("id", json_str(body.id))
                + member("source", json_str(body.source))
                + member("type", json_str(body.ty))
                + member("subject", json_str(body.subject))
                + member("time", 2 + MAX_TIME_LEN)
                + member("sequence", 2 + MAX_U64_DIGITS)
                + member("hlc", 2 + MAX_U64_DIGITS);
            json += body.partitionkey.map_or(0, |k| member("partitionkey", json_str(k)));
            json += body.datacontenttype.map_or(0, |c| member("datacontenttype", json_str(c)));
            json += extensions().map(|(k, v)| member(k, json_str(v))).sum::<usize>();
            let embedded = json_data && body.datacontenttype.is_some_and(is_json_content_type);
            json += if embedded {
                member("data", body.data.len())
            } else {
                member("data_base64", 2 + base64_len(body.data.len()))
            };
            json
        }
    };
    PublishSize { packet: packet + payload, payload }
}

/// The packet size of [`publish_size`] under `{topic_prefix}{subject}`.
pub fn publish_len(protocol: Protocol, topic_prefix: &str, body: &EventBodyRef<'_>, json_data: bool) -> usize {
    publish_size(protocol, topic_prefix.len() + body.subject.len(), body, json_data).packet
}

/// Bytes an MQTT PUBLISH packet takes on the wire (an upper bound: the
/// variable-length integers are counted at their widest), to refuse an
/// event that exceeds a broker's packet limit before it can break the
/// connection.
pub fn publish_packet_len(
    protocol: Protocol,
    topic: &str,
    payload: usize,
    content_type: Option<&str>,
    user: &[(String, String)],
) -> usize {
    let mut len = 2 + topic.len() + 2 + payload; // topic, packet id, payload
    if protocol == Protocol::V5 {
        let props: usize =
            content_type.map_or(0, |c| 3 + c.len()) + user.iter().map(|(k, v)| 5 + k.len() + v.len()).sum::<usize>();
        len += props + 4; // property length varint
    }
    len + 5 // fixed header with remaining-length varint
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Hlc;
    use crate::event::EventBody;
    use serde_json::{Map, Value};

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
        assert!(v.get("datacontenttype").is_none(), "the JSON format's default goes without saying");
        assert_eq!(v["sequence"], "42");
        let v: Value =
            serde_json::from_slice(&structured(&event(Some("application/vnd.x+json"), br#"{"c":1}"#))).unwrap();
        assert_eq!(
            (&v["datacontenttype"], &v["data"]["c"]),
            (&serde_json::json!("application/vnd.x+json"), &serde_json::json!(1))
        );
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

    #[test]
    fn publish_len_bounds_what_the_forwarder_sends_closely() {
        let mut events = vec![event(Some("application/json"), br#"{"c":1}"#), event(None, &[0, 1, 2, 3])];
        let mut quoted = event(Some("text/plain"), "a \"quoted\" \\ value ✓".as_bytes());
        quoted.body.extensions.push(("note".into(), "say \"hi\"\\".into()));
        quoted.body.extensions.push((ROUTE_EXTENSION.into(), "a,b".into()));
        events.push(quoted);
        let mut big = event(Some("application/json"), format!("[{}]", "1,".repeat(5000) + "1").as_bytes());
        big.sequence = u64::MAX;
        big.hlc = Hlc(u64::MAX);
        big.body.time_nanos = 1_799_999_999_123_456_789;
        events.push(big);
        for e in events {
            let b = &e.body;
            let view = b.view();
            let json = serde_json::from_slice::<&RawValue>(&b.data).is_ok();
            let t = topic("ferry/gw/", &e);
            let m = binary(&e);
            let v5 =
                publish_packet_len(Protocol::V5, &t, m.payload.len(), m.content_type.as_deref(), &m.user_properties);
            let v311 = publish_packet_len(Protocol::V311, &t, structured(&e).len(), None, &[]);
            for (protocol, actual) in [(Protocol::V5, v5), (Protocol::V311, v311)] {
                let estimate = publish_len(protocol, "ferry/gw/", &view, json);
                assert!(estimate >= actual, "{protocol:?}: estimate {estimate} under the real {actual}");
                assert!(estimate - actual <= 80, "{protocol:?}: estimate {estimate} far above the real {actual}");
            }
        }
    }

    #[test]
    fn structured_mode_is_the_json_object_of_attributes_and_data() {
        let mut quoted = event(Some("text/plain"), "a \"quoted\" \\ value ✓\u{1}".as_bytes());
        quoted.body.extensions.push(("note".into(), "say \"hi\"\\\n".into()));
        quoted.body.extensions.push((ROUTE_EXTENSION.into(), "a,b".into()));
        for e in [event(Some("application/json"), br#"{"c":[1,2]}"#), event(None, &[0, 255, 7]), quoted] {
            let mut obj: Map<String, Value> = attributes(&e).into_iter().map(|(k, v)| (k, Value::String(v))).collect();
            let json = serde_json::from_slice::<Value>(&e.body.data).ok().filter(|_| e.body.data_is_json());
            match (&e.body.datacontenttype, &json) {
                (Some(ct), Some(_)) if ct == JSON_CONTENT_TYPE => {}
                (Some(ct), _) => drop(obj.insert("datacontenttype".into(), Value::String(ct.clone()))),
                (None, _) => {}
            }
            match json {
                Some(data) => obj.insert("data".into(), data),
                None => obj.insert(
                    "data_base64".into(),
                    Value::String(base64::engine::general_purpose::STANDARD.encode(&e.body.data)),
                ),
            };
            let out = structured(&e);
            assert_eq!(serde_json::from_slice::<Value>(&out).unwrap(), Value::Object(obj.clone()));
            // Attributes in name order, data last.
            let data = obj.keys().find(|k| *k == "data" || *k == "data_base64").unwrap().clone();
            let attrs = obj.keys().filter(|k| **k != data).map(|k| format!("\"{k}\":")).collect::<Vec<_>>();
            let text = String::from_utf8(out).unwrap();
            let at: Vec<usize> = attrs.iter().map(|k| text.find(k.as_str()).unwrap()).collect();
            assert!(at.is_sorted() && text.rfind(&format!("\"{data}\":")).unwrap() > at[at.len() - 1], "{text}");
        }
    }

    #[test]
    fn a_batch_is_a_json_array_of_structured_events() {
        let (a, b) = (event(Some("application/json"), b"1"), event(None, &[7]));
        let (ea, eb) = (structured(&a), structured(&b));
        let payload = batch([ea.as_slice(), eb.as_slice()]);
        assert_eq!(payload.len(), batch_len([ea.len(), eb.len()]));
        let v: Vec<Value> = serde_json::from_slice(&payload).unwrap();
        assert_eq!(
            (v[0]["data"].clone(), v[1]["data_base64"].clone()),
            (serde_json::json!(1), serde_json::json!("Bw=="))
        );
        assert_eq!(v[1]["sequence"], "42");
        assert_eq!(batch(std::iter::empty::<&[u8]>()), b"[]");
    }

    #[test]
    fn an_iot_hub_topic_carries_the_properties_encoded() {
        assert_eq!(
            iot_hub_topic("gw-1", "telemetry/temp", STRUCTURED_CONTENT_TYPE),
            "devices/gw-1/messages/events/$.ct=application%2Fcloudevents%2Bjson&$.ce=utf-8&subject=telemetry%2Ftemp"
        );
    }

    #[test]
    fn extensions_never_stand_in_for_core_attributes_on_the_wire() {
        let mut e = event(Some("application/json"), b"1");
        e.body.extensions.push(("source".into(), "ferry://other-device".into()));
        e.body.extensions.push(("id".into(), "forged".into()));
        let v: Value = serde_json::from_slice(&structured(&e)).unwrap();
        assert_eq!(v["source"], "ferry://gw");
        assert_eq!(v["id"], "e-1");
        let props = binary(&e).user_properties;
        assert_eq!(props.iter().filter(|(k, _)| k == "source" || k == "id").count(), 2, "{props:?}");
    }
}
