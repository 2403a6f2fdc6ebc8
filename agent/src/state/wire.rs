//! How state versions travel over MQTT, both ways.
//!
//! A Ferry-versioned update carries its version as three attributes:
//! `ferryvv` (the version vector as a JSON object), `ferryhlc` (the packed
//! HLC, decimal) and `ferryorigin`. On MQTT 5 they are user properties and
//! the payload is the value; on MQTT 3.1.1 the payload is a CloudEvents
//! structured envelope (`application/cloudevents+json`) holding the same
//! attributes next to `data` or `data_base64`. Ferry publishes state as
//! state events, so the forwarder's CloudEvents binding produces exactly
//! this; cloud applications that know nothing of Ferry publish plain
//! values, which get a version at receipt. Pure functions.

use base64::Engine as _;
use serde_json::Value;

use super::version::{Version, VersionVector};

/// Attribute holding the version vector.
pub const VV: &str = crate::event::STATE_EXTENSION;
/// Attribute holding the packed HLC.
pub const HLC: &str = "ferryhlc";
/// Attribute holding the writer's origin.
pub const ORIGIN: &str = "ferryorigin";

/// A state update as received from a cloud.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    /// The value.
    pub data: Vec<u8>,
    /// Its media type, if known.
    pub content_type: Option<String>,
    /// Its version; `None` for a plain message that still needs one.
    pub version: Option<Version>,
}

/// The three attributes of `version`, as (name, value).
pub fn attributes(version: &Version) -> Vec<(String, String)> {
    vec![
        (VV.to_owned(), version.vv.to_json()),
        (HLC.to_owned(), version.hlc.to_string()),
        (ORIGIN.to_owned(), version.origin.clone()),
    ]
}

/// A version from its three attributes; `Ok(None)` when `ferryvv` is absent.
pub fn version_from(get: impl Fn(&str) -> Option<String>) -> Result<Option<Version>, String> {
    let Some(vv) = get(VV) else { return Ok(None) };
    let vv = VersionVector::from_json(&vv)?;
    if vv.is_empty() {
        return Err(format!("{VV} is empty: a version has seen at least its own write"));
    }
    let hlc = get(HLC).ok_or_else(|| format!("{VV} is set but {HLC} is missing"))?;
    let hlc = hlc.parse::<u64>().map_err(|_| format!("{HLC} `{hlc}` is not an unsigned integer"))?;
    let origin = get(ORIGIN).filter(|o| !o.is_empty()).ok_or_else(|| format!("{VV} is set but {ORIGIN} is missing"))?;
    if vv.get(&origin) == 0 {
        return Err(format!("{VV} has no entry for its own origin `{origin}`"));
    }
    Ok(Some(Version { vv, hlc, origin }))
}

/// Decodes a received message. MQTT 5 (or any message with a `ferryvv`
/// user property) reads properties; otherwise a CloudEvents envelope with
/// `ferryvv` is unwrapped; anything else is a plain value. A message that
/// claims a version but carries a malformed one is an error (it changes
/// nothing), never silently treated as plain.
pub fn decode(
    payload: &[u8],
    user_properties: &[(String, String)],
    content_type: Option<&str>,
) -> Result<Update, String> {
    let prop = |name: &str| user_properties.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    if let Some(version) = version_from(prop)? {
        return Ok(Update {
            data: payload.to_vec(),
            content_type: content_type.map(str::to_owned),
            version: Some(version),
        });
    }
    if let Some(update) = envelope(payload)? {
        return Ok(update);
    }
    Ok(Update { data: payload.to_vec(), content_type: content_type.map(str::to_owned), version: None })
}

/// Unwraps a structured-mode envelope that carries a version.
fn envelope(payload: &[u8]) -> Result<Option<Update>, String> {
    // Cheap test first: most plain values are not envelopes.
    if !payload.windows(VV.len()).any(|w| w == VV.as_bytes()) {
        return Ok(None);
    }
    let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(payload) else { return Ok(None) };
    if !obj.contains_key("specversion") || !obj.contains_key(VV) {
        return Ok(None);
    }
    let get = |name: &str| obj.get(name).and_then(Value::as_str).map(str::to_owned);
    let version = version_from(get)?.ok_or_else(|| format!("envelope attribute {VV} is not a string"))?;
    // JSON data without a content type is `application/json` (the JSON format's rule).
    let content_type =
        get("datacontenttype").or_else(|| obj.get("data").map(|_| crate::event::JSON_CONTENT_TYPE.to_owned()));
    let data = match (obj.get("data"), obj.get("data_base64")) {
        (Some(v), None) => serde_json::to_vec(v).expect("a JSON value serialises"),
        (None, Some(Value::String(b))) => base64::engine::general_purpose::STANDARD
            .decode(b)
            .map_err(|e| format!("envelope data_base64 is not base64: {e}"))?,
        (None, None) => Vec::new(),
        _ => return Err("envelope has both data and data_base64, or a non-string data_base64".into()),
    };
    Ok(Some(Update { data, content_type, version: Some(version) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version() -> Version {
        Version {
            vv: [("gw".to_owned(), 2), ("aws".to_owned(), 1)].into_iter().collect(),
            hlc: 99 << 16,
            origin: "gw".into(),
        }
    }

    #[test]
    fn mqtt5_properties_round_trip() {
        let v = version();
        let u = decode(b"{\"on\":1}", &attributes(&v), Some("application/json")).unwrap();
        assert_eq!(u.version, Some(v));
        assert_eq!(u.data, b"{\"on\":1}");
        assert_eq!(u.content_type.as_deref(), Some("application/json"));
    }

    #[test]
    fn a_structured_envelope_is_unwrapped() {
        let v = version();
        let mut obj = serde_json::Map::new();
        obj.insert("specversion".into(), "1.0".into());
        for (k, val) in attributes(&v) {
            obj.insert(k, val.into());
        }
        obj.insert("datacontenttype".into(), "application/json".into());
        obj.insert("data".into(), serde_json::json!({"on": true}));
        let u = decode(&serde_json::to_vec(&obj).unwrap(), &[], None).unwrap();
        assert_eq!(u.version, Some(v));
        assert_eq!(u.data, b"{\"on\":true}");
        obj.remove("data");
        obj.insert("data_base64".into(), "AQI=".into());
        assert_eq!(decode(&serde_json::to_vec(&obj).unwrap(), &[], None).unwrap().data, vec![1, 2]);
    }

    #[test]
    fn plain_values_have_no_version() {
        for plain in [&b"42"[..], b"{\"ferryvv\": 1}", b"not json ferryvv"] {
            assert_eq!(decode(plain, &[], None).unwrap().version, None, "{plain:?}");
        }
    }

    #[test]
    fn a_malformed_version_is_an_error_naming_the_attribute() {
        let mut attrs = attributes(&version());
        attrs[1].1 = "soon".into();
        assert!(decode(b"1", &attrs, None).unwrap_err().contains(HLC));
        let attrs = vec![
            (VV.to_owned(), "{\"x\":1}".to_owned()),
            (HLC.to_owned(), "1".to_owned()),
            (ORIGIN.to_owned(), "y".to_owned()),
        ];
        assert!(decode(b"1", &attrs, None).unwrap_err().contains("own origin"));
    }
}
