//! What each destination's broker accepts: one predicate that ingest uses to
//! refuse an event before it is stored and the forwarder uses to set aside
//! an event that a limit learnt later (a broker's CONNACK) rules out, so the
//! two can never disagree: the packet size (configured, or announced in the
//! broker's CONNACK), the cloud's payload limit and its topic rules.
//!
//! A [`DestinationLimits`] is built from the destination's config and shared
//! (behind an `Arc`) between ingest and that destination's forwarder, which
//! records what the broker announces on each connection. Pure state and
//! arithmetic: nothing here does I/O.

use std::sync::atomic::{AtomicU32, Ordering};

use crate::config::{DestinationConfig, Protocol, Routing, TopicRules, TopicScheme};
use crate::event::EventBodyRef;
use crate::wire;

/// The limits of one destination.
#[derive(Debug)]
pub struct DestinationLimits {
    name: String,
    protocol: Protocol,
    topic_prefix: String,
    routing: Routing,
    /// What the cloud requires of topics.
    topics: TopicRules,
    /// The MQTT client id (Azure IoT Hub's topics name it).
    client_id: String,
    /// The cloud's payload limit.
    max_payload: Option<usize>,
    /// `max_packet_size` from the config.
    configured_max_packet: usize,
    /// The Maximum Packet Size the broker announced in its last CONNACK
    /// (MQTT 5); 0 while it announced none.
    announced_max_packet: AtomicU32,
}

impl DestinationLimits {
    /// The limits `config` sets, before any broker announced its own.
    pub fn new(config: &DestinationConfig) -> Self {
        Self {
            name: config.name.clone(),
            protocol: config.endpoint.protocol,
            topic_prefix: config.topic_prefix.clone(),
            routing: config.routing.clone(),
            topics: config.topics.clone(),
            client_id: config.endpoint.client_id.clone(),
            max_payload: config.max_payload_bytes,
            configured_max_packet: config.endpoint.max_packet_bytes,
            announced_max_packet: AtomicU32::new(0),
        }
    }

    /// The destination's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the destination's routes select events on `subject`.
    pub fn routes(&self, subject: &str) -> bool {
        self.routing.routes(subject)
    }

    /// Whether this destination is sent the values of state key `key`.
    pub fn subscribes(&self, key: &str) -> bool {
        self.routing.subscribes(key)
    }

    /// Records the Maximum Packet Size a broker announced in its CONNACK
    /// (`None`: it announced none, so only the configured limit holds).
    pub fn announce_max_packet(&self, size: Option<u32>) {
        self.announced_max_packet.store(size.unwrap_or(0), Ordering::Relaxed);
    }

    /// The largest publish this destination takes, and where that limit
    /// comes from.
    pub fn max_packet(&self) -> (usize, &'static str) {
        let announced = self.announced_max_packet.load(Ordering::Relaxed) as usize;
        if announced != 0 && announced < self.configured_max_packet {
            (announced, "the Maximum Packet Size its broker announced")
        } else {
            (self.configured_max_packet, "its max_packet_size")
        }
    }

    /// Why a publish of `len` bytes cannot go to this destination, if it cannot.
    pub fn packet_refusal(&self, len: usize) -> Option<String> {
        let (limit, source) = self.max_packet();
        (len > limit)
            .then(|| format!("destination {}: a publish of {len} bytes exceeds {source} ({limit} bytes)", self.name))
    }

    /// Why this destination's broker would refuse `body` (an event not yet
    /// stored; see [`wire::publish_size`] for `json_data`), if it would.
    pub fn refusal(&self, body: &EventBodyRef<'_>, json_data: bool) -> Option<String> {
        let topic = match self.topics.scheme {
            TopicScheme::Prefix => format!("{}{}", self.topic_prefix, body.subject),
            TopicScheme::AzureIotHub => {
                wire::iot_hub_topic(&self.client_id, body.subject, wire::STRUCTURED_CONTENT_TYPE)
            }
        };
        if let Some(reason) = self.topics.refusal(&topic) {
            return Some(format!("destination {}: {reason}", self.name));
        }
        let size = wire::publish_size(self.protocol, topic.len(), body, json_data);
        if let Some(max) = self.max_payload
            && size.payload > max
        {
            return Some(format!(
                "destination {}: a payload of {} bytes exceeds its max_payload_size ({max} bytes)",
                self.name, size.payload
            ));
        }
        self.packet_refusal(size.packet)
    }
}

/// Room kept in a state value's publish for its version attributes
/// (`ferryvv`, `ferryhlc`, `ferryorigin`), which grow with the number of
/// replicas that wrote the key: about 30 bytes each.
pub const STATE_VERSION_ALLOWANCE: usize = 1024;

impl DestinationLimits {
    /// Why this destination's broker would refuse a state update of `key`
    /// to `data`, if it would, keeping [`STATE_VERSION_ALLOWANCE`] for its version.
    pub fn state_refusal(&self, key: &str, data: &[u8], content_type: Option<&str>) -> Option<String> {
        let version = [("ferryvv".to_owned(), "v".repeat(STATE_VERSION_ALLOWANCE))];
        let body = EventBodyRef {
            id: "00000000-0000-0000-0000-000000000000",
            source: "",
            ty: "ferry.state",
            subject: key,
            time_nanos: 0,
            datacontenttype: content_type,
            data,
            partitionkey: None,
            extensions: &version,
        };
        let json = content_type.is_some_and(crate::event::is_json_content_type)
            && serde_json::from_slice::<serde::de::IgnoredAny>(data).is_ok();
        self.refusal(&body, json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn limits(extra: &str) -> DestinationLimits {
        let c = Config::parse(
            &format!("[[destination]]\nname = \"c\"\nurl = \"mqtt://x\"\nroutes = [\"t/#\"]\n{extra}"),
            "test.toml",
        )
        .unwrap();
        DestinationLimits::new(&c.destinations[0])
    }

    fn body(data: &[u8]) -> EventBodyRef<'_> {
        EventBodyRef {
            id: "id-1",
            source: "ferry://gw",
            ty: "ferry.event",
            subject: "t/a",
            time_nanos: 0,
            datacontenttype: Some("application/octet-stream"),
            data,
            partitionkey: None,
            extensions: &[],
        }
    }

    #[test]
    fn the_smaller_of_the_configured_and_announced_packet_size_holds() {
        let l = limits("max_packet_size = \"2 KiB\"");
        assert_eq!(l.max_packet().0, 2048);
        l.announce_max_packet(Some(1024));
        assert_eq!(l.max_packet().0, 1024);
        assert!(l.max_packet().1.contains("announced"));
        l.announce_max_packet(Some(1 << 20));
        assert_eq!(l.max_packet().0, 2048, "an announcement never raises the configured limit");
        l.announce_max_packet(None);
        assert_eq!(l.max_packet().0, 2048);
    }

    #[test]
    fn an_event_over_the_packet_limit_is_refused_naming_destination_and_limit() {
        let l = limits("max_packet_size = \"1 KiB\"");
        assert_eq!(l.refusal(&body(&[0; 100]), false), None);
        let reason = l.refusal(&body(&[0; 2000]), false).unwrap();
        assert!(reason.contains("destination c") && reason.contains("1024"), "{reason}");
        assert!(l.routes("t/x") && !l.routes("u/x"));
    }
}
