//! The event: Ferry's CloudEvents 1.0 record, and its storage encoding.
//!
//! An event in the log is a fixed header (format version, HLC, expiry,
//! priority) followed by a postcard-encoded [`EventBody`]. The header lets the
//! store index, expire and evict an event without decoding the body; the
//! version byte lets later releases read files written by this one. The
//! sequence number is the log key, so it is not repeated in the record.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::clock::Hlc;
use crate::config::Routing;

/// The record format this release writes. Readers accept every version
/// listed in [`decode_record`].
pub const FORMAT_V1: u8 = 1;

/// Bytes before the postcard body: version, HLC, expiry, priority.
pub const HEADER_LEN: usize = 1 + 8 + 8 + 1;

/// Type given to events whose producer named none.
pub const DEFAULT_TYPE: &str = "ferry.event";

/// Extension attribute naming the only destinations an event goes to
/// (comma-separated), set by a filter plugin's `route` verdict. Internal:
/// forwarders honour it and never send it on the wire.
pub const ROUTE_EXTENSION: &str = "ferryroute";

/// Extension attribute carrying a state version's vector (see
/// [`crate::state::wire`]). An event that has it is a state update: it goes
/// to its destinations whatever their routes, as a retained message.
pub const STATE_EXTENSION: &str = "ferryvv";

/// Longest `id`, `type`, `datacontenttype` or `dataschema` accepted, in bytes.
pub const MAX_ATTRIBUTE_BYTES: usize = 256;

/// Longest extension attribute value (or `partitionkey`) accepted, in bytes:
/// well inside one MQTT 5 user property, and far more than any key or trace
/// header needs.
pub const MAX_EXTENSION_BYTES: usize = 4096;

/// Whether `name` is one no extension attribute may take: a CloudEvents core
/// attribute (each has a field of its own), or Ferry's own (`sequence`,
/// `hlc`, `partitionkey`, and every name starting with `ferry`, which Ferry
/// sets itself). `dataschema` is the one optional core attribute Ferry
/// stores among the extensions; it is not reserved, so it travels as itself.
pub fn is_reserved_extension(name: &str) -> bool {
    is_core_attribute(name) || name.starts_with("ferry")
}

/// Whether `name` is an attribute the CloudEvents binding writes from an
/// event's own fields (the core attributes, `sequence`, `hlc`,
/// `partitionkey`), so no extension may stand in for it on the wire.
pub fn is_core_attribute(name: &str) -> bool {
    matches!(
        name,
        "specversion"
            | "id"
            | "source"
            | "type"
            | "datacontenttype"
            | "subject"
            | "time"
            | "data"
            | "data_base64"
            | "sequence"
            | "hlc"
            | "partitionkey"
    )
}

/// Checks an extension attribute's name: CloudEvents' form (lower-case
/// letters and digits, at most 20) and not reserved.
pub fn check_extension_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 20 || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()) {
        return Err("is not a valid CloudEvents attribute name (lower-case letters and digits, at most 20)".into());
    }
    if is_reserved_extension(name) {
        return Err("is a CloudEvents core attribute or one Ferry sets itself; it cannot be an extension".into());
    }
    Ok(())
}

/// Checks an attribute value that travels as an MQTT string (an MQTT 5 user
/// property or content type): at most `max` bytes, and nothing a broker
/// would refuse (see [`crate::topic::validate_mqtt_string`]).
pub fn check_text(value: &str, max: usize) -> Result<(), String> {
    if value.len() > max {
        return Err(format!("is {} bytes long; the limit is {max}", value.len()));
    }
    crate::topic::validate_mqtt_string(value).map_err(|e| e.to_string())
}

/// Checks every attribute of a stored or replacement event as ingest checks
/// a producer's, naming the field a broker would refuse. Extensions named
/// `ferry…` are Ferry's own (routes, state versions): their names pass.
pub fn check_body(body: &EventBody) -> Result<(), String> {
    let field = |name: &str, reason: String| format!("field `{name}`: {reason}");
    if body.id.is_empty() {
        return Err(field("id", "must not be empty".into()));
    }
    check_text(&body.id, MAX_ATTRIBUTE_BYTES).map_err(|r| field("id", r))?;
    check_text(&body.ty, MAX_ATTRIBUTE_BYTES).map_err(|r| field("type", r))?;
    check_text(&body.source, MAX_ATTRIBUTE_BYTES).map_err(|r| field("source", r))?;
    crate::topic::validate_name(&body.subject)
        .map_err(|e| field("subject", format!("`{}` {e}", body.subject.escape_debug())))?;
    if let Some(ct) = &body.datacontenttype {
        check_text(ct, MAX_ATTRIBUTE_BYTES).map_err(|r| field("datacontenttype", r))?;
    }
    if let Some(k) = &body.partitionkey {
        check_text(k, MAX_EXTENSION_BYTES).map_err(|r| field("partitionkey", r))?;
    }
    for (i, (name, value)) in body.extensions.iter().enumerate() {
        let ours = name.starts_with("ferry");
        if !ours {
            check_extension_name(name).map_err(|r| field(name, r))?;
        }
        let max = if ours { crate::topic::MAX_MQTT_STRING } else { MAX_EXTENSION_BYTES };
        check_text(value, max).map_err(|r| field(name, r))?;
        if body.extensions[..i].iter().any(|(n, _)| n == name) {
            return Err(field(name, "appears twice".into()));
        }
    }
    Ok(())
}

/// Content type given to JSON data whose producer named none.
pub const JSON_CONTENT_TYPE: &str = "application/json";

/// The CloudEvents attributes and data that a producer supplied or Ferry
/// filled in; everything of an event except its sequence and HLC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventBody {
    /// CloudEvents `id`: the producer's idempotency key, else a UUIDv7.
    pub id: String,
    /// CloudEvents `source`: `ferry://{device_id}`.
    pub source: String,
    /// CloudEvents `type`.
    pub ty: String,
    /// CloudEvents `subject`: the local topic.
    pub subject: String,
    /// CloudEvents `time`, in nanoseconds since the Unix epoch.
    pub time_nanos: i64,
    /// CloudEvents `datacontenttype`.
    pub datacontenttype: Option<String>,
    /// The data, as bytes (JSON text for JSON data).
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    /// CloudEvents extension `partitionkey`.
    pub partitionkey: Option<String>,
    /// Other CloudEvents extension attributes, in the producer's order.
    pub extensions: Vec<(String, String)>,
}

impl EventBody {
    /// A borrowed view, for what takes one (the limit checks, encoding).
    pub fn view(&self) -> EventBodyRef<'_> {
        EventBodyRef {
            id: &self.id,
            source: &self.source,
            ty: &self.ty,
            subject: &self.subject,
            time_nanos: self.time_nanos,
            datacontenttype: self.datacontenttype.as_deref(),
            data: &self.data,
            partitionkey: self.partitionkey.as_deref(),
            extensions: &self.extensions,
        }
    }

    /// Whether `destination` may receive this event: true unless a route
    /// verdict named other destinations only.
    pub fn routed_to(&self, destination: &str) -> bool {
        match self.extensions.iter().find(|(k, _)| k == ROUTE_EXTENSION) {
            Some((_, names)) => names.split(',').any(|n| n.trim() == destination),
            None => true,
        }
    }

    /// Whether destination `name`, taking what `routing` selects, publishes
    /// this event. A state update is addressed by the state service, which
    /// names its subscribers in `ferryroute`; any other event is selected by
    /// its subject, and a route verdict (`ferryroute`) may narrow that.
    pub fn is_for(&self, name: &str, routing: &Routing) -> bool {
        (self.is_state() || routing.routes(&self.subject)) && self.routed_to(name)
    }

    /// Whether this is a state update published by the state service.
    pub fn is_state(&self) -> bool {
        self.extensions.iter().any(|(k, _)| k == STATE_EXTENSION)
    }

    /// Whether the data is JSON text (so structured mode embeds it as JSON).
    pub fn data_is_json(&self) -> bool {
        self.datacontenttype.as_deref().is_some_and(is_json_content_type)
    }

    /// The postcard encoding of this body.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("encoding to a Vec cannot fail")
    }
}

/// An [`EventBody`] made of borrowed parts, for encoding without building
/// owned strings first. Same fields in the same order, so the bytes are
/// identical to [`EventBody::encode`]'s.
#[derive(Debug, Serialize)]
pub struct EventBodyRef<'a> {
    /// See [`EventBody::id`].
    pub id: &'a str,
    /// See [`EventBody::source`].
    pub source: &'a str,
    /// See [`EventBody::ty`].
    pub ty: &'a str,
    /// See [`EventBody::subject`].
    pub subject: &'a str,
    /// See [`EventBody::time_nanos`].
    pub time_nanos: i64,
    /// See [`EventBody::datacontenttype`].
    pub datacontenttype: Option<&'a str>,
    /// See [`EventBody::data`].
    #[serde(with = "serde_bytes")]
    pub data: &'a [u8],
    /// See [`EventBody::partitionkey`].
    pub partitionkey: Option<&'a str>,
    /// See [`EventBody::extensions`].
    pub extensions: &'a [(String, String)],
}

impl EventBodyRef<'_> {
    /// The postcard encoding, identical to the owned body's.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("encoding to a Vec cannot fail")
    }
}

/// Whether a media type denotes JSON (`application/json`, `…+json`).
pub fn is_json_content_type(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case(JSON_CONTENT_TYPE)
        || essence.to_ascii_lowercase().ends_with("+json")
        || essence.eq_ignore_ascii_case("text/json")
}

/// A stored event: the body plus what the log assigned at commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Extension `sequence`: the agent's strictly increasing number.
    pub sequence: u64,
    /// Extension `hlc`: the hybrid logical clock at acceptance.
    pub hlc: Hlc,
    /// When the event expires to the dead-letter table, if it has a TTL.
    pub expires_at_ms: Option<u64>,
    /// Eviction priority class (higher is evicted later).
    pub priority: u8,
    /// Attributes and data.
    pub body: EventBody,
}

/// A stored record with the body still encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// HLC assigned at acceptance.
    pub hlc: Hlc,
    /// Expiry time, if any.
    pub expires_at_ms: Option<u64>,
    /// Eviction priority class.
    pub priority: u8,
}

/// Why stored bytes could not be decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Fewer bytes than the fixed header.
    #[error("record is {0} bytes, shorter than its {HEADER_LEN}-byte header")]
    Truncated(usize),
    /// A format version this release does not know.
    #[error("record format version {0} is unknown to this release (it reads up to {FORMAT_V1})")]
    UnknownVersion(u8),
    /// The body is not a valid postcard encoding.
    #[error("record body is corrupt: {0}")]
    Body(#[from] postcard::Error),
}

/// Writes a record: header, then the already-encoded body.
pub fn encode_record(header: RecordHeader, body: &[u8], out: &mut Vec<u8>) {
    out.reserve(HEADER_LEN + body.len());
    out.push(FORMAT_V1);
    out.extend_from_slice(&header.hlc.0.to_le_bytes());
    out.extend_from_slice(&header.expires_at_ms.unwrap_or(0).to_le_bytes());
    out.push(header.priority);
    out.extend_from_slice(body);
}

/// Reads a record's header without decoding its body.
pub fn decode_header(bytes: &[u8]) -> Result<(RecordHeader, &[u8]), DecodeError> {
    if bytes.len() < HEADER_LEN {
        return Err(DecodeError::Truncated(bytes.len()));
    }
    match bytes[0] {
        FORMAT_V1 => {}
        v => return Err(DecodeError::UnknownVersion(v)),
    }
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let expires = u64_at(9);
    let header =
        RecordHeader { hlc: Hlc(u64_at(1)), expires_at_ms: (expires != 0).then_some(expires), priority: bytes[17] };
    Ok((header, &bytes[HEADER_LEN..]))
}

/// Decodes a whole stored record.
pub fn decode_record(sequence: u64, bytes: &[u8]) -> Result<Event, DecodeError> {
    let (header, body) = decode_header(bytes)?;
    let body: EventBody = postcard::from_bytes(body)?;
    Ok(Event { sequence, hlc: header.hlc, expires_at_ms: header.expires_at_ms, priority: header.priority, body })
}

/// Reads only the subject of a stored record (the fields before it in the
/// body are skipped, the rest is not decoded): cheap enough for retention scans.
pub fn decode_subject(bytes: &[u8]) -> Result<&str, DecodeError> {
    #[derive(Deserialize)]
    struct Prefix<'a> {
        _id: &'a str,
        _source: &'a str,
        _ty: &'a str,
        subject: &'a str,
    }
    let (_, body) = decode_header(bytes)?;
    let (prefix, _) = postcard::take_from_bytes::<Prefix<'_>>(body)?;
    Ok(prefix.subject)
}

/// Formats nanoseconds since the epoch as RFC 3339 (UTC).
pub fn format_time(nanos: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(nanos))
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| nanos.to_string())
}

/// Parses an RFC 3339 timestamp into nanoseconds since the epoch.
pub fn parse_time(text: &str) -> Option<i64> {
    let t = OffsetDateTime::parse(text, &Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> EventBody {
        EventBody {
            id: "0190a1b2-0000-7000-8000-000000000001".into(),
            source: "ferry://gw-1".into(),
            ty: DEFAULT_TYPE.into(),
            subject: "telemetry/temp".into(),
            time_nanos: 1_700_000_000_123_456_789,
            datacontenttype: Some(JSON_CONTENT_TYPE.into()),
            data: br#"{"c":21.5}"#.to_vec(),
            partitionkey: Some("sensor-7".into()),
            extensions: vec![("traceparent".into(), "00-abc-def-01".into())],
        }
    }

    #[test]
    fn a_destination_publishes_only_what_the_store_keeps_for_it() {
        let filters = |fs: &[&str]| fs.iter().map(|f| crate::topic::TopicFilter::new(f).unwrap()).collect();
        let routing = Routing { routes: filters(&["telemetry/#"]), subscribe: filters(&["desired/#"]) };
        let with = |subject: &str, extensions: &[(&str, &str)]| EventBody {
            subject: subject.into(),
            extensions: extensions.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect(),
            ..sample()
        };
        let routed = with("telemetry/temp", &[]);
        let elsewhere = with("logs/app", &[]);
        let verdict_elsewhere = with("telemetry/temp", &[(ROUTE_EXTENSION, "other")]);
        // As the state service writes them: subject = key, addressed to subscribers.
        let state = with("desired/fan", &[(STATE_EXTENSION, "{}"), (ROUTE_EXTENSION, "aws")]);
        let state_for_other = with("desired/fan", &[(STATE_EXTENSION, "{}"), (ROUTE_EXTENSION, "other")]);
        let cases = [
            (&routed, true),
            (&elsewhere, false),
            (&verdict_elsewhere, false),
            (&state, true),
            (&state_for_other, false),
        ];
        for (body, published) in cases {
            assert_eq!(body.is_for("aws", &routing), published, "{}", body.subject);
            if published {
                assert!(routing.may_take(&body.subject), "{} is published but not kept", body.subject);
            }
        }
        // An event no destination takes is kept for one added later.
        assert!(!routing.may_take("logs/app"));
    }

    #[test]
    fn record_round_trips_header_and_body() {
        let header = RecordHeader { hlc: Hlc(42 << 16 | 3), expires_at_ms: Some(99), priority: 7 };
        let mut bytes = Vec::new();
        encode_record(header, &sample().encode(), &mut bytes);
        let event = decode_record(11, &bytes).unwrap();
        assert_eq!(event.sequence, 11);
        assert_eq!(event.hlc, header.hlc);
        assert_eq!(event.expires_at_ms, Some(99));
        assert_eq!(event.priority, 7);
        assert_eq!(event.body, sample());
    }

    #[test]
    fn no_expiry_round_trips_as_none() {
        let header = RecordHeader { hlc: Hlc(1), expires_at_ms: None, priority: 0 };
        let mut bytes = Vec::new();
        encode_record(header, &sample().encode(), &mut bytes);
        assert_eq!(decode_header(&bytes).unwrap().0, header);
    }

    #[test]
    fn garbage_decodes_to_an_error_never_a_panic() {
        let mut bytes = Vec::new();
        encode_record(RecordHeader { hlc: Hlc(1), expires_at_ms: None, priority: 0 }, &sample().encode(), &mut bytes);
        // Every truncation and every single-byte corruption must be handled.
        for len in 0..bytes.len() {
            let _ = decode_record(1, &bytes[..len]);
        }
        for i in 0..bytes.len() {
            for flip in [0x01u8, 0x80, 0xFF] {
                let mut bad = bytes.clone();
                bad[i] ^= flip;
                let _ = decode_record(1, &bad);
            }
        }
        let mut rng_state = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..2_000 {
            let len = (rng_state % 300) as usize;
            let junk: Vec<u8> = (0..len)
                .map(|_| {
                    rng_state ^= rng_state << 13;
                    rng_state ^= rng_state >> 7;
                    rng_state ^= rng_state << 17;
                    rng_state as u8
                })
                .collect();
            let _ = decode_record(1, &junk);
        }
        assert!(matches!(decode_record(1, &[]), Err(DecodeError::Truncated(0))));
    }

    #[test]
    fn borrowed_and_owned_bodies_encode_to_the_same_bytes() {
        let b = sample();
        assert_eq!(b.view().encode(), b.encode());
    }

    #[test]
    fn data_as_a_byte_string_is_the_encoding_of_earlier_releases() {
        // Earlier releases wrote `data` as a sequence of u8; postcard gives
        // both the same bytes, so stored records read either way.
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct Earlier {
            id: String,
            source: String,
            ty: String,
            subject: String,
            time_nanos: i64,
            datacontenttype: Option<String>,
            data: Vec<u8>,
            partitionkey: Option<String>,
            extensions: Vec<(String, String)>,
        }
        let b = sample();
        let earlier = Earlier {
            id: b.id.clone(),
            source: b.source.clone(),
            ty: b.ty.clone(),
            subject: b.subject.clone(),
            time_nanos: b.time_nanos,
            datacontenttype: b.datacontenttype.clone(),
            data: b.data.clone(),
            partitionkey: b.partitionkey.clone(),
            extensions: b.extensions.clone(),
        };
        let bytes = postcard::to_stdvec(&earlier).unwrap();
        assert_eq!(b.encode(), bytes);
        assert_eq!(postcard::from_bytes::<EventBody>(&bytes).unwrap(), b);
    }

    #[test]
    fn the_subject_decodes_without_the_rest_of_the_body() {
        let mut bytes = Vec::new();
        encode_record(RecordHeader { hlc: Hlc(1), expires_at_ms: None, priority: 0 }, &sample().encode(), &mut bytes);
        assert_eq!(decode_subject(&bytes).unwrap(), "telemetry/temp");
        assert!(decode_subject(&bytes[..25]).is_err());
    }

    #[test]
    fn unknown_format_version_is_named_in_the_error() {
        let mut bytes = Vec::new();
        encode_record(RecordHeader { hlc: Hlc(1), expires_at_ms: None, priority: 0 }, &sample().encode(), &mut bytes);
        bytes[0] = 9;
        let err = decode_record(1, &bytes).unwrap_err();
        assert!(err.to_string().contains("version 9"), "{err}");
    }

    /// Pins the v1 layout: a release that changes it must bump the version
    /// and keep reading these bytes.
    #[test]
    fn format_v1_bytes_written_by_the_first_release_still_decode() {
        let pinned: &[u8] = &[
            1, 3, 0, 42, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 3, b'a', b'b', b'c', 10, b'f', b'e', b'r', b'r',
            b'y', b':', b'/', b'/', b'g', b'w', 1, b't', 3, b'x', b'/', b'y', 0, 0, 2, b'4', b'2', 0, 0,
        ];
        let event = decode_record(5, pinned).unwrap();
        assert_eq!(event.hlc, Hlc(42 << 16 | 3));
        assert_eq!(event.priority, 2);
        assert_eq!(event.body.id, "abc");
        assert_eq!(event.body.source, "ferry://gw");
        assert_eq!(event.body.subject, "x/y");
        assert_eq!(event.body.data, b"42");
        assert_eq!(event.body.datacontenttype, None);
    }

    #[test]
    fn time_formats_and_parses_rfc3339() {
        let t = parse_time("2026-11-22T03:02:27.5Z").unwrap();
        assert_eq!(format_time(t), "2026-11-22T03:02:27.5Z");
        assert_eq!(parse_time("2026-11-22T05:02:27+02:00"), parse_time("2026-11-22T03:02:27Z"));
        assert_eq!(parse_time("yesterday"), None);
    }

    #[test]
    fn json_content_types_are_recognised() {
        assert!(is_json_content_type("application/json"));
        assert!(is_json_content_type("application/json; charset=utf-8"));
        assert!(is_json_content_type("application/vnd.acme+json"));
        assert!(!is_json_content_type("application/octet-stream"));
    }
}
