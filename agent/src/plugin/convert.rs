//! Events to and from the WIT `event` record, and what a filter's output
//! must be to be taken: the contract every output meets ([`decide`]) and a
//! stage's own rules on top of it ([`OutputRules`]). Pure functions: no
//! wasmtime, no store.
//!
//! The plugin host applies both inside the call (see
//! [`super::Plugin::filter_for`]), so whatever refuses a plugin's output,
//! whichever stage runs it, counts as that plugin's failure in one place.
//!
//! A `route` verdict is recorded on the event itself, as the CloudEvents
//! extension attribute [`ROUTE_EXTENSION`] (`ferryroute`) holding the
//! comma-separated destination names; the forwarder publishes such an event
//! only to those destinations among the ones whose routes match it.

use crate::event::{self, EventBody, format_time, parse_time};

use super::{Verdict, WitEvent};

pub use crate::event::ROUTE_EXTENSION;

/// Most replacement events a filter may return per input event; more is
/// treated as a runaway plugin rather than a transform.
pub const MAX_REPLACEMENTS_PER_EVENT: usize = 1024;

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

/// An event a plugin produced, checked as ingest checks a producer's event
/// ([`event::check_body`]) plus an RFC 3339 time. Of Ferry's own extensions
/// only `ferryroute` may be kept (a replacement copied from a routed input
/// carries it); the others (state versions) are the agent's alone. Its
/// sequence and HLC are ignored (the store or the stored input assigns them).
pub fn from_wit(event: WitEvent) -> Result<EventBody, String> {
    into_body(event, true).map_err(|(_, reason)| reason)
}

/// [`from_wit`], checking the attributes only when `check_attributes` (the
/// time and Ferry's own extensions are always checked). The error carries
/// the event's id, moved rather than copied: the happy path copies nothing.
fn into_body(event: WitEvent, check_attributes: bool) -> Result<EventBody, (String, String)> {
    let Some(time_nanos) = parse_time(&event.time) else {
        let reason = format!("field `time`: `{}` is not RFC 3339", event.time.escape_debug());
        return Err((event.id, reason));
    };
    let body = EventBody {
        id: event.id,
        source: event.source,
        ty: event.type_,
        subject: event.subject,
        time_nanos,
        datacontenttype: event.datacontenttype,
        data: event.data,
        partitionkey: event.partitionkey,
        extensions: event.extensions,
    };
    if check_attributes && let Err(reason) = event::check_body(&body) {
        return Err((body.id, reason));
    }
    if let Some((name, _)) = body.extensions.iter().find(|(n, _)| n.starts_with("ferry") && n != ROUTE_EXTENSION) {
        let reason = format!("field `{name}`: is an attribute Ferry sets itself; a plugin cannot set it");
        return Err((body.id, reason));
    }
    Ok(body)
}

/// What a verdict does to one input event, checked and in the host's own
/// types: what the stages act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Forward the event unchanged.
    Keep,
    /// Forward nothing for it.
    Drop,
    /// Forward these events instead (valid events; never empty: an empty
    /// replacement is a [`Decision::Drop`]).
    Replace(Vec<EventBody>),
    /// Forward it only to these destinations (valid names; never empty: an
    /// empty route is a [`Decision::Drop`]).
    Route(Vec<String>),
}

impl Decision {
    /// Bytes the decision holds in host memory, roughly (for bounded samples).
    pub fn bytes(&self) -> usize {
        match self {
            Decision::Keep | Decision::Drop => 0,
            Decision::Replace(events) => events.iter().map(body_bytes).sum(),
            Decision::Route(names) => names.iter().map(|n| n.len() + size_of::<String>()).sum(),
        }
    }
}

/// Bytes an event body holds in host memory: its struct, every attribute,
/// its data and its extensions.
pub fn body_bytes(b: &EventBody) -> usize {
    size_of::<EventBody>()
        + b.id.len()
        + b.source.len()
        + b.ty.len()
        + b.subject.len()
        + b.datacontenttype.as_ref().map_or(0, String::len)
        + b.data.len()
        + b.partitionkey.as_ref().map_or(0, String::len)
        + b.extensions.iter().map(|(k, v)| k.len() + v.len() + 2 * size_of::<String>()).sum::<usize>()
}

/// Bytes a WIT event holds in host memory (see [`body_bytes`]).
pub fn wit_bytes(e: &WitEvent) -> usize {
    size_of::<WitEvent>()
        + e.id.len()
        + e.source.len()
        + e.type_.len()
        + e.subject.len()
        + e.time.len()
        + e.datacontenttype.as_ref().map_or(0, String::len)
        + e.data.len()
        + e.partitionkey.as_ref().map_or(0, String::len)
        + e.extensions.iter().map(|(k, v)| k.len() + v.len() + 2 * size_of::<String>()).sum::<usize>()
}

/// A stage's own rules for what a filter may hand it, beyond the contract:
/// the stage knows its limits (the store's event size, what its destinations'
/// brokers accept), the plugin host applies them inside the call.
pub trait OutputRules: Send + Sync {
    /// Why the stage cannot take `event` (a replacement), naming the rule
    /// (e.g. `store.max_event_size`), if it cannot.
    fn refuse(&self, event: &EventBody) -> Option<String>;
}

/// No rule beyond the contract: for tools and tests, which have no stage.
#[derive(Debug, Clone, Copy, Default)]
pub struct ContractOnly;

impl OutputRules for ContractOnly {
    fn refuse(&self, _: &EventBody) -> Option<String> {
        None
    }
}

/// Checks one call's verdicts for `inputs` against the contract and
/// `rules`, and turns them into decisions; the error is one line naming the
/// input event and the rule it broke. Exactly one verdict per event, at most
/// [`MAX_REPLACEMENTS_PER_EVENT`] replacements per event, every replacement
/// a valid event the stage takes, every route a destination name.
pub fn decide(inputs: &[WitEvent], verdicts: Vec<Verdict>, rules: &dyn OutputRules) -> Result<Vec<Decision>, String> {
    let n = inputs.len();
    if verdicts.len() != n {
        return Err(format!("{} verdicts for {n} events (exactly one per event)", verdicts.len()));
    }
    let replacements: usize =
        verdicts.iter().map(|v| if let Verdict::Replace(list) = v { list.len() } else { 0 }).sum();
    if replacements > MAX_REPLACEMENTS_PER_EVENT * n.max(1) {
        return Err(format!(
            "{replacements} replacement events for {n} events (at most {MAX_REPLACEMENTS_PER_EVENT} per event)"
        ));
    }
    let mut out = Vec::with_capacity(n);
    for (i, (input, verdict)) in inputs.iter().zip(verdicts).enumerate() {
        let at = || format!("event {i} (`{}`)", input.id.escape_debug());
        out.push(match verdict {
            Verdict::Keep => Decision::Keep,
            Verdict::Drop => Decision::Drop,
            Verdict::Replace(events) if events.is_empty() => Decision::Drop,
            Verdict::Replace(events) => {
                let mut bodies = Vec::with_capacity(events.len());
                for (j, event) in events.into_iter().enumerate() {
                    let which = |id: &str| format!("{}: replacement {j} (`{}`)", at(), id.escape_debug());
                    // Attributes equal to the input's passed these checks when
                    // the input was accepted (a keep would forward them as
                    // they are); a transform that changes only the data need
                    // not pay for them again.
                    let changed = event.id != input.id
                        || event.source != input.source
                        || event.type_ != input.type_
                        || event.subject != input.subject
                        || event.datacontenttype != input.datacontenttype
                        || event.partitionkey != input.partitionkey
                        || event.extensions != input.extensions;
                    let body = into_body(event, changed).map_err(|(id, e)| format!("{}: {e}", which(&id)))?;
                    if let Some(rule) = rules.refuse(&body) {
                        return Err(format!("{}: {rule}", which(&body.id)));
                    }
                    bodies.push(body);
                }
                Decision::Replace(bodies)
            }
            Verdict::Route(names) if names.is_empty() => Decision::Drop,
            Verdict::Route(names) => {
                if let Some(bad) =
                    names.iter().find(|n| n.is_empty() || n.contains(',') || n.chars().any(char::is_whitespace))
                {
                    return Err(format!("{}: route `{}` is not a destination name", at(), bad.escape_debug()));
                }
                Decision::Route(names)
            }
        });
    }
    Ok(out)
}

/// The events that stand in for `body` after `decision` at the ingest
/// stage: itself, nothing, its replacements, or itself marked with its routes.
pub fn apply(body: EventBody, decision: Decision) -> Vec<EventBody> {
    match decision {
        Decision::Keep => vec![body],
        Decision::Drop => Vec::new(),
        Decision::Replace(events) => events,
        Decision::Route(names) => {
            let mut body = body;
            body.extensions.retain(|(k, _)| k != ROUTE_EXTENSION);
            body.extensions.push((ROUTE_EXTENSION.to_owned(), names.join(",")));
            vec![body]
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

    fn decide_one(verdict: Verdict) -> Result<Decision, String> {
        decide(&[to_wit(&body(), 0, 0)], vec![verdict], &ContractOnly).map(|mut d| d.remove(0))
    }

    #[test]
    fn an_event_round_trips_through_the_wit_record() {
        assert_eq!(from_wit(to_wit(&body(), 0, 0)).unwrap(), body());
    }

    #[test]
    fn keep_drop_and_route_apply_to_the_event() {
        assert_eq!(apply(body(), decide_one(Verdict::Keep).unwrap()), vec![body()]);
        assert!(apply(body(), decide_one(Verdict::Drop).unwrap()).is_empty());
        assert_eq!(decide_one(Verdict::Route(vec![])).unwrap(), Decision::Drop);
        assert_eq!(decide_one(Verdict::Replace(vec![])).unwrap(), Decision::Drop);
        let routed = apply(body(), decide_one(Verdict::Route(vec!["cloud-a".into(), "cloud-b".into()])).unwrap());
        assert_eq!(routed[0].extensions.last().unwrap(), &(ROUTE_EXTENSION.to_owned(), "cloud-a,cloud-b".to_owned()));
        let e = decide_one(Verdict::Route(vec!["a,b".into()])).unwrap_err();
        assert!(e.contains("event 0 (`e1`)") && e.contains("`a,b`"), "{e}");
    }

    #[test]
    fn replacements_must_be_valid_events_and_the_error_names_the_field() {
        let with = |f: &dyn Fn(&mut WitEvent)| {
            let mut e = to_wit(&body(), 0, 0);
            f(&mut e);
            decide_one(Verdict::Replace(vec![e]))
        };
        let err = with(&|e| e.subject = "a/#".into()).unwrap_err();
        assert!(err.contains("replacement 0 (`e1`)") && err.contains("`subject`") && err.contains("a/#"), "{err}");
        assert!(with(&|e| e.time = "noon".into()).unwrap_err().contains("`time`"));
        assert!(with(&|e| e.extensions.push(("id".into(), "x".into()))).unwrap_err().contains("`id`"));
        assert!(with(&|e| e.id = String::new()).is_err());
        let err = with(&|e| e.extensions.push(("ferryvv".into(), "r1:1".into()))).unwrap_err();
        assert!(err.contains("ferryvv"), "a filter cannot forge a state update: {err}");
        with(&|e| e.extensions.push((ROUTE_EXTENSION.into(), "cloud-a".into()))).expect("a route marker may be kept");
        let mut ok = to_wit(&body(), 7, 9);
        ok.subject = "telemetry/temp/f".into();
        let Decision::Replace(out) = decide_one(Verdict::Replace(vec![ok.clone(), ok])).unwrap() else {
            panic!("a replacement")
        };
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].subject, "telemetry/temp/f");
    }

    #[test]
    fn a_replacement_is_checked_where_it_differs_from_its_input() {
        // An input that was never checked (a keep would forward it as it is):
        // a copy with new data only is not re-checked, one with a new
        // attribute is, and Ferry's own attributes are always refused.
        let mut input = to_wit(&body(), 0, 0);
        input.source = "bad\u{0}source".into();
        let mut same = input.clone();
        same.data = b"[1]".to_vec();
        decide(std::slice::from_ref(&input), vec![Verdict::Replace(vec![same.clone()])], &ContractOnly)
            .expect("only the data changed");
        same.subject = "telemetry/other".into();
        let e = decide(std::slice::from_ref(&input), vec![Verdict::Replace(vec![same])], &ContractOnly).unwrap_err();
        assert!(e.contains("`source`"), "{e}");
        let mut forged = input.clone();
        forged.extensions.push(("ferryvv".into(), "r1:1".into()));
        input.extensions = forged.extensions.clone();
        assert!(decide(&[input], vec![Verdict::Replace(vec![forged])], &ContractOnly).is_err());
    }

    #[test]
    fn the_verdict_count_and_replacement_count_are_part_of_the_contract() {
        let inputs = [to_wit(&body(), 0, 0), to_wit(&body(), 0, 0)];
        let e = decide(&inputs, vec![Verdict::Keep], &ContractOnly).unwrap_err();
        assert!(e.contains("1 verdicts for 2 events"), "{e}");
        let flood = Verdict::Replace(vec![to_wit(&body(), 0, 0); 2 * MAX_REPLACEMENTS_PER_EVENT + 1]);
        let e = decide(&inputs, vec![flood, Verdict::Keep], &ContractOnly).unwrap_err();
        assert!(e.contains("at most 1024 per event"), "{e}");
    }

    #[test]
    fn a_stage_rule_refuses_a_replacement_naming_the_rule() {
        struct Small;
        impl OutputRules for Small {
            fn refuse(&self, event: &EventBody) -> Option<String> {
                (event.data.len() > 4).then(|| format!("{} bytes, over test.max (4 bytes)", event.data.len()))
            }
        }
        let mut big = to_wit(&body(), 0, 0);
        big.data = b"0123456789".to_vec();
        let e = decide(&[to_wit(&body(), 0, 0)], vec![Verdict::Replace(vec![big])], &Small).unwrap_err();
        assert_eq!(e, "event 0 (`e1`): replacement 0 (`e1`): 10 bytes, over test.max (4 bytes)");
        assert!(
            decide(&[to_wit(&body(), 0, 0)], vec![Verdict::Keep], &Small).is_ok(),
            "kept events are not re-checked"
        );
    }

    #[test]
    fn sizes_count_every_byte_an_event_holds() {
        let b = body();
        let attributes = 2 + 10 + 11 + 14 + 16 + 2 + 11 + 1;
        assert_eq!(body_bytes(&b), size_of::<EventBody>() + attributes + 2 * size_of::<String>());
        let mut big = b.clone();
        big.data = vec![0; 1 << 20];
        assert!(Decision::Replace(vec![big]).bytes() > 1 << 20);
    }
}
