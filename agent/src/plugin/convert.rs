//! Events to and from the WIT `event` record, and what a filter verdict
//! does to one event. Pure functions: no wasmtime, no store.
//!
//! A `route` verdict is recorded on the event itself, as the CloudEvents
//! extension attribute [`ROUTE_EXTENSION`] (`ferryroute`) holding the
//! comma-separated destination names; the forwarder publishes such an event
//! only to those destinations among the ones whose routes match it.

use crate::event::{EventBody, format_time, parse_time};
use crate::topic;

use super::{Verdict, WitEvent};

pub use crate::event::ROUTE_EXTENSION;

/// Attribute names an extension may not take: the CloudEvents core
/// attributes and Ferry's own, which have fields of their own.
const RESERVED: [&str; 12] = [
    "id",
    "source",
    "specversion",
    "type",
    "datacontenttype",
    "dataschema",
    "subject",
    "time",
    "data",
    "sequence",
    "hlc",
    "partitionkey",
];

/// The WIT view of an event. Before the commit (ingest stage) an event has
/// no sequence or HLC yet; both are then 0.
pub fn to_wit(body: &EventBody, sequence: u64, hlc: u64) -> WitEvent {
    WitEvent {
        id: body.id.clone(),
        source: body.source.clone(),
        type_: body.ty.clone(),
        subject: body.subject.clone(),
        time: format_time(body.time_nanos),
        datacontenttype: body.datacontenttype.clone(),
        data: body.data.clone(),
        sequence,
        hlc,
        partitionkey: body.partitionkey.clone(),
        extensions: body.extensions.clone(),
    }
}

/// An event a plugin produced, checked like producer input: it must have an
/// id, source and type, a valid topic as subject, an RFC 3339 time and
/// well-formed extension names. Its sequence and HLC are ignored (the store
/// assigns them).
pub fn from_wit(event: WitEvent) -> Result<EventBody, String> {
    let id = &event.id;
    if event.id.is_empty() || event.id.len() > 256 {
        return Err(format!("replacement event `{id}`: id must be 1 to 256 bytes"));
    }
    if event.source.is_empty() || event.type_.is_empty() {
        return Err(format!("replacement event `{id}`: source and type must not be empty"));
    }
    topic::validate_name(&event.subject)
        .map_err(|e| format!("replacement event `{id}`: subject `{}` {e}", event.subject))?;
    let time_nanos = parse_time(&event.time)
        .ok_or_else(|| format!("replacement event `{id}`: time `{}` is not RFC 3339", event.time))?;
    for (name, _) in &event.extensions {
        let well_formed =
            !name.is_empty() && name.len() <= 20 && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if !well_formed || RESERVED.contains(&name.as_str()) {
            return Err(format!(
                "replacement event `{id}`: extension `{name}` must be 1 to 20 lowercase letters or digits \
                 and not a core attribute"
            ));
        }
    }
    Ok(EventBody {
        id: event.id,
        source: event.source,
        ty: event.type_,
        subject: event.subject,
        time_nanos,
        datacontenttype: event.datacontenttype,
        data: event.data,
        partitionkey: event.partitionkey,
        extensions: event.extensions,
    })
}

/// The events that stand in for `body` after `verdict`: itself, nothing, its
/// replacements, or itself marked with its routes. An empty route list
/// leaves no destination, so it is the same as `drop`.
pub fn apply(body: EventBody, verdict: Verdict) -> Result<Vec<EventBody>, String> {
    match verdict {
        Verdict::Keep => Ok(vec![body]),
        Verdict::Drop => Ok(Vec::new()),
        Verdict::Replace(events) => events.into_iter().map(from_wit).collect(),
        Verdict::Route(names) if names.is_empty() => Ok(Vec::new()),
        Verdict::Route(names) => {
            if let Some(bad) =
                names.iter().find(|n| n.is_empty() || n.contains(',') || n.chars().any(char::is_whitespace))
            {
                return Err(format!("route `{bad}` is not a destination name"));
            }
            let mut body = body;
            body.extensions.retain(|(k, _)| k != ROUTE_EXTENSION);
            body.extensions.push((ROUTE_EXTENSION.to_owned(), names.join(",")));
            Ok(vec![body])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> EventBody {
        EventBody {
            id: "e1".into(),
            source: "ferry://gw".into(),
            ty: "ferry.event".into(),
            subject: "telemetry/temp".into(),
            time_nanos: 1_700_000_000_000_000_000,
            datacontenttype: Some("application/json".into()),
            data: b"{}".to_vec(),
            partitionkey: None,
            extensions: vec![("traceparent".into(), "x".into())],
        }
    }

    #[test]
    fn an_event_round_trips_through_the_wit_record() {
        assert_eq!(from_wit(to_wit(&body(), 0, 0)).unwrap(), body());
    }

    #[test]
    fn keep_drop_and_route_apply_to_the_event() {
        assert_eq!(apply(body(), Verdict::Keep).unwrap(), vec![body()]);
        assert!(apply(body(), Verdict::Drop).unwrap().is_empty());
        assert!(apply(body(), Verdict::Route(vec![])).unwrap().is_empty());
        let routed = apply(body(), Verdict::Route(vec!["cloud-a".into(), "cloud-b".into()])).unwrap();
        assert_eq!(routed[0].extensions.last().unwrap(), &(ROUTE_EXTENSION.to_owned(), "cloud-a,cloud-b".to_owned()));
        assert!(apply(body(), Verdict::Route(vec!["a,b".into()])).is_err());
    }

    #[test]
    fn replacements_must_be_valid_events() {
        let mut bad_topic = to_wit(&body(), 0, 0);
        bad_topic.subject = "a/+/b".into();
        let err = apply(body(), Verdict::Replace(vec![bad_topic])).unwrap_err();
        assert!(err.contains("a/+/b"), "{err}");
        let mut bad_time = to_wit(&body(), 0, 0);
        bad_time.time = "noon".into();
        assert!(apply(body(), Verdict::Replace(vec![bad_time])).is_err());
        let mut bad_ext = to_wit(&body(), 0, 0);
        bad_ext.extensions.push(("id".into(), "x".into()));
        assert!(apply(body(), Verdict::Replace(vec![bad_ext])).is_err());
        let mut ok = to_wit(&body(), 7, 9);
        ok.subject = "telemetry/temp/f".into();
        let out = apply(body(), Verdict::Replace(vec![ok.clone(), ok])).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].subject, "telemetry/temp/f");
    }
}
