//! What a forwarder sends next: one event, or a batch of one subject's
//! events gathered from the steps read ahead, encoded for its destination.
//!
//! A batch takes the first event waiting and then, in sequence order, the
//! other events waiting with the same subject, up to the destination's
//! `batch.max_events` and `batch.max_bytes` and the room its window has;
//! events of other subjects wait for their own batch. So every event still
//! goes to its own subject's topic, and per subject the order holds. A
//! batch of one goes as a single event would. State updates (retained) and
//! events being resent one at a time after a failure are never batched.
//!
//! Pure: nothing here touches the network or the store.

use std::collections::VecDeque;

use super::stage::Step;
use crate::config::{DestinationConfig, Protocol, TopicScheme};
use crate::event::Event;
use crate::wire;

/// One publish, ready to queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// Each event it carries: its sequence, and whether this publish is the
    /// last one for it.
    pub parts: Vec<(u64, bool)>,
    /// Positions in the read-ahead buffer of the steps it takes.
    taken: Vec<usize>,
    /// The topic.
    pub topic: String,
    /// The payload.
    pub payload: Vec<u8>,
    /// MQTT 5 content type.
    pub content_type: Option<String>,
    /// MQTT 5 user properties.
    pub properties: Vec<(String, String)>,
    /// Whether to publish it retained.
    pub retain: bool,
    /// Its packet's bytes on the wire (an upper bound).
    pub packet_len: usize,
    /// When its oldest event was accepted, in ms.
    pub oldest_ms: u64,
    /// Whether it is a batch with room left (a later event may yet join).
    pub unfilled: bool,
}

impl Outgoing {
    /// Removes the steps it takes from `buffer`.
    pub fn take_from(&self, buffer: &mut VecDeque<Step>) {
        let mut taken = self.taken.clone();
        taken.sort_unstable();
        for i in taken.into_iter().rev() {
            buffer.remove(i);
        }
    }
}

/// The topic `event` goes to, with a payload of `content_type`.
pub fn topic(config: &DestinationConfig, event: &Event, content_type: &str) -> String {
    match config.topics.scheme {
        TopicScheme::Prefix => wire::topic(&config.topic_prefix, event),
        TopicScheme::AzureIotHub => wire::iot_hub_topic(&config.endpoint.client_id, &event.body.subject, content_type),
    }
}

/// The next publish from `buffer`, whose front is a publish step. `room`
/// is how many events the window takes now; `batch_bytes` the most payload
/// bytes a batch may have now (at most `batch.max_bytes`; `None`: send one
/// event alone).
pub fn next(config: &DestinationConfig, buffer: &VecDeque<Step>, room: usize, batch_bytes: Option<usize>) -> Outgoing {
    let Some(Step::Publish { event: first, last }) = buffer.front() else {
        panic!("next() needs a publish step at the front");
    };
    let state = first.body.is_state();
    let batch = &config.batch;
    let Some(max_bytes) = batch_bytes.filter(|_| batch.enabled() && !state && room >= 2) else {
        return single(config, first, *last);
    };
    let mut taken = vec![0];
    let mut encoded = vec![wire::structured(first)];
    let mut parts = vec![(first.sequence, *last)];
    let mut oldest_ms = first.hlc.millis();
    let limit = batch.max_events.min(room);
    let mut full = false;
    for (i, step) in buffer.iter().enumerate().skip(1) {
        if taken.len() >= limit {
            full = true;
            break;
        }
        let Step::Publish { event, last } = step else { continue };
        if event.body.subject != first.body.subject || event.body.is_state() {
            continue;
        }
        let e = wire::structured(event);
        if wire::batch_len(encoded.iter().map(Vec::len).chain([e.len()])) > max_bytes {
            full = true;
            break;
        }
        taken.push(i);
        encoded.push(e);
        parts.push((event.sequence, *last));
        oldest_ms = oldest_ms.min(event.hlc.millis());
    }
    if taken.len() == 1 {
        let mut one = single(config, first, *last);
        one.unfilled = !full;
        return one;
    }
    let payload = wire::batch(encoded.iter().map(Vec::as_slice));
    let topic = topic(config, first, wire::BATCH_CONTENT_TYPE);
    let content_type = (config.endpoint.protocol == Protocol::V5).then(|| wire::BATCH_CONTENT_TYPE.to_owned());
    let packet_len =
        wire::publish_packet_len(config.endpoint.protocol, &topic, payload.len(), content_type.as_deref(), &[]);
    Outgoing {
        parts,
        taken,
        topic,
        payload,
        content_type,
        properties: Vec::new(),
        retain: false,
        packet_len,
        oldest_ms,
        unfilled: !full,
    }
}

/// One event, in its protocol's own form: binary for MQTT 5, structured
/// for MQTT 3.1.1.
fn single(config: &DestinationConfig, event: &Event, last: bool) -> Outgoing {
    // State is published retained where the cloud keeps retained messages:
    // the broker then holds the merged value.
    let retain = event.body.is_state() && config.retain_available;
    let (topic, payload, content_type, properties) = match config.endpoint.protocol {
        Protocol::V5 => {
            let t = topic(config, event, event.body.datacontenttype.as_deref().unwrap_or(""));
            let m = wire::binary(event);
            (t, m.payload, m.content_type, m.user_properties)
        }
        Protocol::V311 => {
            (topic(config, event, wire::STRUCTURED_CONTENT_TYPE), wire::structured(event), None, Vec::new())
        }
    };
    let packet_len =
        wire::publish_packet_len(config.endpoint.protocol, &topic, payload.len(), content_type.as_deref(), &properties);
    Outgoing {
        parts: vec![(event.sequence, last)],
        taken: vec![0],
        topic,
        payload,
        content_type,
        properties,
        retain,
        packet_len,
        oldest_ms: event.hlc.millis(),
        unfilled: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Hlc;
    use crate::config::Config;
    use crate::event::EventBody;

    fn config(extra: &str) -> DestinationConfig {
        Config::parse(
            &format!("[agent]\ndevice_id = \"gw\"\n[[destination]]\nname = \"c\"\nurl = \"mqtt://x\"\n{extra}"),
            "t.toml",
        )
        .unwrap()
        .destinations
        .remove(0)
    }

    fn event(seq: u64, subject: &str) -> Step {
        Step::Publish {
            event: Event {
                sequence: seq,
                hlc: Hlc(seq << 16),
                expires_at_ms: None,
                priority: 100,
                body: EventBody {
                    id: format!("e-{seq}"),
                    source: "ferry://gw".into(),
                    ty: "t".into(),
                    subject: subject.into(),
                    time_nanos: 0,
                    datacontenttype: Some("application/json".into()),
                    data: b"12345".to_vec(),
                    partitionkey: None,
                    extensions: vec![],
                },
            },
            last: true,
        }
    }

    #[test]
    fn a_batch_takes_one_subjects_events_in_order_and_leaves_the_rest() {
        let c = config("[destination.batch]\nmax_events = 10\nmax_bytes = \"4 KiB\"");
        let mut buffer: VecDeque<Step> =
            [event(1, "a"), event(2, "b"), Step::Settle(3), event(4, "a"), event(5, "b"), event(6, "a")].into();
        let o = next(&c, &buffer, 100, Some(c.batch.max_bytes));
        assert_eq!(o.parts, [(1, true), (4, true), (6, true)]);
        assert_eq!(o.topic, "ferry/gw/a");
        assert_eq!(o.content_type.as_deref(), Some(wire::BATCH_CONTENT_TYPE));
        let ids: Vec<String> = serde_json::from_slice::<Vec<serde_json::Value>>(&o.payload)
            .unwrap()
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(ids, ["e-1", "e-4", "e-6"]);
        assert!(o.unfilled);
        o.take_from(&mut buffer);
        assert_eq!(buffer.len(), 3);
        let o = next(&c, &buffer, 100, Some(c.batch.max_bytes));
        assert_eq!(o.parts, [(2, true), (5, true)]);
    }

    #[test]
    fn a_batch_stops_at_its_limits_and_the_windows_room() {
        let c = config("[destination.batch]\nmax_events = 3\nmax_bytes = \"4 KiB\"");
        let buffer: VecDeque<Step> = (1..=10).map(|s| event(s, "a")).collect();
        assert_eq!(next(&c, &buffer, 100, Some(c.batch.max_bytes)).parts.len(), 3);
        assert_eq!(next(&c, &buffer, 2, Some(c.batch.max_bytes)).parts.len(), 2);
        assert!(!next(&c, &buffer, 100, Some(c.batch.max_bytes)).unfilled);
        let small = config("[destination.batch]\nmax_events = 100\nmax_bytes = \"700 B\"");
        let o = next(&small, &buffer, 100, Some(small.batch.max_bytes));
        assert!(o.payload.len() <= 700 && o.parts.len() >= 2, "{} bytes, {} events", o.payload.len(), o.parts.len());
        // A broker that announced a smaller packet limit gets smaller batches.
        let o = next(&c, &buffer, 100, Some(700));
        assert!(o.payload.len() <= 700 && o.parts.len() >= 2, "{} bytes, {} events", o.payload.len(), o.parts.len());
    }

    #[test]
    fn a_lone_event_or_no_batching_goes_in_its_protocols_own_form() {
        let c = config("protocol = \"v5\"\n[destination.batch]\nmax_events = 10");
        let buffer: VecDeque<Step> = [event(1, "a"), event(2, "b")].into();
        let o = next(&c, &buffer, 100, Some(c.batch.max_bytes));
        assert_eq!(o.parts, [(1, true)]);
        assert_eq!(o.content_type.as_deref(), Some("application/json"), "binary mode");
        assert!(o.properties.iter().any(|(k, v)| k == "id" && v == "e-1"));
        let buffer: VecDeque<Step> = [event(1, "a"), event(2, "a")].into();
        assert_eq!(next(&c, &buffer, 100, None).parts.len(), 1, "careful mode sends one at a time");
        assert_eq!(
            next(&config("protocol = \"v5\""), &buffer, 100, Some(64 * 1024)).parts.len(),
            1,
            "batching is off by default"
        );
    }
}
