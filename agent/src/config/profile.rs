//! Cloud profiles: what each managed MQTT cloud documents about its limits
//! (sources and dates in `docs/cloud-profiles.md`), as the defaults of a
//! `[[destination]]` with `profile = "…"`.
//!
//! A profile sets a default for every limit a destination paces itself by
//! (publish rate, byte rate, in-flight publishes, packet and payload size,
//! batching) and fixes what its cloud requires of topics and credentials;
//! every limit key can still be set by hand. The publish rate defaults to
//! 95 % of the documented figure: the clouds count arrival times in sliding
//! windows, and the margin absorbs up to about 50 ms of network bunching.
//! The byte rate defaults to the documented figure itself, because the
//! pacer holds bytes to it over a second and 50 ms (see `mqtt::pace`):
//! the same margin, kept in time rather than in bytes, so that it holds for
//! publishes as large as a batch.

use std::time::Duration;

use super::Protocol;

/// A destination's profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// Any broker: no pacing, no batching (the behaviour before profiles).
    Generic,
    /// AWS IoT Core.
    AwsIotCore,
    /// Azure Event Grid's MQTT broker (namespace).
    AzureEventGrid,
    /// Azure IoT Hub's MQTT device endpoint.
    AzureIotHub,
    /// HiveMQ Cloud.
    HivemqCloud,
}

/// How a destination forms topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicScheme {
    /// `{topic_prefix}{subject}`.
    Prefix,
    /// Azure IoT Hub's device endpoint: `devices/{client_id}/messages/events/`
    /// followed by the message properties, URL-encoded (`subject`, and the
    /// content type and encoding IoT Hub routing reads the body with).
    AzureIotHub,
}

/// What a cloud requires of topics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicRules {
    /// How topics are formed.
    pub scheme: TopicScheme,
    /// Longest topic, in bytes.
    pub max_bytes: usize,
    /// Most topic levels (slashes + 1).
    pub max_levels: Option<usize>,
    /// Prefixes a topic may not start with.
    pub reserved: &'static [&'static str],
}

impl TopicRules {
    /// Plain MQTT: 65,535 bytes, any number of levels, `$` reserved for brokers.
    pub const MQTT: TopicRules =
        TopicRules { scheme: TopicScheme::Prefix, max_bytes: 65_535, max_levels: None, reserved: &["$"] };

    /// Why `topic` breaks these rules, if it does.
    pub fn refusal(&self, topic: &str) -> Option<String> {
        if topic.len() > self.max_bytes {
            return Some(format!(
                "topic `{topic}` is {} bytes, over the {} the cloud takes",
                topic.len(),
                self.max_bytes
            ));
        }
        if let Some(max) = self.max_levels {
            let levels = topic.split('/').count();
            if levels > max {
                return Some(format!("topic `{topic}` has {levels} levels, over the {max} the cloud takes"));
            }
        }
        self.reserved
            .iter()
            .find(|p| topic.starts_with(*p))
            .map(|p| format!("topic `{topic}` starts with `{p}`, which the cloud reserves"))
    }
}

/// Batched publishing: several events in one PUBLISH.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    /// Most events in one publish (1: no batching).
    pub max_events: usize,
    /// Most payload bytes of one batch publish.
    pub max_bytes: usize,
    /// How long the first event of a batch may wait for more (0: batch
    /// only what is already waiting).
    pub linger: Duration,
}

/// Bytes of a destination's packet size a batch leaves for the topic, the
/// properties and the MQTT header.
pub const BATCH_PACKET_ROOM: usize = 1024;

impl BatchConfig {
    /// One event per publish.
    pub const OFF: BatchConfig = BatchConfig { max_events: 1, max_bytes: 0, linger: Duration::ZERO };

    /// Whether more than one event may go in a publish.
    pub fn enabled(&self) -> bool {
        self.max_events > 1
    }
}

/// A profile's figures: the documented limit, and the default Ferry paces at.
#[derive(Debug, Clone, Copy)]
pub struct Figure<T> {
    /// What Ferry uses by default.
    pub default: T,
    /// What the cloud documents.
    pub documented: T,
}

/// Everything a profile sets.
#[derive(Debug, Clone)]
pub struct ProfileDefaults {
    /// Publishes per second.
    pub publish_rate: Option<Figure<u32>>,
    /// Publish bytes per second.
    pub byte_rate: Option<Figure<u64>>,
    /// Unacknowledged QoS 1 publishes.
    pub inflight_publishes: Option<Figure<usize>>,
    /// Events sent whose acknowledgement is not yet durable: with batching,
    /// enough for every allowed publish to carry a batch.
    pub inflight_events: usize,
    /// Largest MQTT packet.
    pub max_packet: usize,
    /// Largest payload.
    pub max_payload: Option<usize>,
    /// Topic rules.
    pub topics: TopicRules,
    /// A protocol version the cloud requires.
    pub protocol: Option<Protocol>,
    /// Whether the cloud keeps retained messages.
    pub retain: bool,
    /// Batching.
    pub batch: BatchConfig,
    /// The billing unit, in bytes, for the docs and `ferry config check`.
    pub billing_unit: Option<usize>,
}

/// 95 % of a documented rate, the default Ferry paces at.
const fn margin(documented: u64) -> u64 {
    documented * 95 / 100
}

/// Room a batch leaves in its last billing unit for the topic and MQTT
/// properties that most clouds bill along with the payload.
const BATCH_HEADROOM: usize = 512;

/// Billing units one batch may fill. A batch wastes at most the unfilled
/// part of its last unit, so the more units it spans, the closer the bill
/// comes to the bytes sent: with 490-byte events, one 5 KB unit holds 9
/// (111 units per 1,000 events), four hold 40 (100 per 1,000), six hold 61
/// (98, against 96 for perfect packing). A byte rate paces whole publishes,
/// so their size also decides how much of it can be used: seventeen 30 KB
/// publishes fill 98 % of the bytes AWS allows in a window, where 35 KB
/// ones would fill 95 % and 40 KB ones 93 %. Linger 0 means a batch never
/// waits to fill.
const BATCH_UNITS: usize = 6;

/// The batch payload limit for a cloud billing in `unit`-byte increments.
const fn billed_batch_bytes(unit: usize) -> usize {
    BATCH_UNITS * unit - BATCH_HEADROOM
}

impl Profile {
    /// Every profile, for errors and docs.
    pub const ALL: [Profile; 5] =
        [Profile::Generic, Profile::AwsIotCore, Profile::AzureEventGrid, Profile::AzureIotHub, Profile::HivemqCloud];

    /// Its name in the config.
    pub fn name(self) -> &'static str {
        match self {
            Profile::Generic => "generic",
            Profile::AwsIotCore => "aws-iot-core",
            Profile::AzureEventGrid => "azure-event-grid",
            Profile::AzureIotHub => "azure-iot-hub",
            Profile::HivemqCloud => "hivemq-cloud",
        }
    }

    /// The profile named `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    /// What it sets.
    pub fn defaults(self) -> ProfileDefaults {
        let rate = |documented: u32| Figure { default: margin(u64::from(documented)) as u32, documented };
        let bytes = |documented: u64| Figure { default: documented, documented };
        // Batches of whole billing units (see `billed_batch_bytes`).
        let billed =
            |unit: usize| BatchConfig { max_events: 1000, max_bytes: billed_batch_bytes(unit), linger: Duration::ZERO };
        // Topics checked against the cloud's own rules, `$` reserved.
        let prefixed = |max_levels: usize| TopicRules {
            scheme: TopicScheme::Prefix,
            max_bytes: 256,
            max_levels: Some(max_levels),
            reserved: &["$"],
        };
        // A broker that documents no limits: what Ferry does without a profile.
        let generic = ProfileDefaults {
            publish_rate: None,
            byte_rate: None,
            inflight_publishes: None,
            inflight_events: 256,
            max_packet: 128 * 1024,
            max_payload: None,
            topics: TopicRules::MQTT,
            protocol: None,
            retain: true,
            batch: BatchConfig::OFF,
            billing_unit: None,
        };
        match self {
            Profile::Generic => generic,
            // docs/cloud-profiles.md#aws-iot-core
            Profile::AwsIotCore => ProfileDefaults {
                publish_rate: Some(rate(100)),
                byte_rate: Some(bytes(512 * 1024)),
                inflight_publishes: Some(Figure { default: 95, documented: 100 }),
                inflight_events: 2048,
                max_payload: Some(128 * 1024),
                topics: prefixed(8),
                batch: billed(5 * 1024),
                billing_unit: Some(5 * 1024),
                ..generic
            },
            // docs/cloud-profiles.md#azure-event-grid-namespace-mqtt-broker
            Profile::AzureEventGrid => ProfileDefaults {
                publish_rate: Some(rate(1000)),
                byte_rate: Some(bytes(1_000_000)),
                inflight_publishes: Some(Figure { default: 950, documented: 1000 }),
                inflight_events: 4096,
                max_packet: 512 * 1024,
                max_payload: Some(512 * 1024),
                topics: prefixed(15),
                retain: false,
                // Its billing unit is not documented: batch up to a size that
                // keeps a publish well under its 1 MB/s per session.
                batch: BatchConfig { max_events: 1000, max_bytes: 16 * 1024, linger: Duration::ZERO },
                ..generic
            },
            // docs/cloud-profiles.md#azure-iot-hub-mqtt-device-endpoint
            Profile::AzureIotHub => ProfileDefaults {
                // 6,000 a minute on one S1 unit, counted per hub.
                publish_rate: Some(rate(100)),
                max_packet: 256 * 1024 + 4096,
                max_payload: Some(256 * 1024),
                topics: TopicRules {
                    scheme: TopicScheme::AzureIotHub,
                    max_bytes: 65_535,
                    max_levels: None,
                    reserved: &[],
                },
                protocol: Some(Protocol::V311),
                batch: billed(4 * 1024),
                billing_unit: Some(4 * 1024),
                ..generic
            },
            // docs/cloud-profiles.md#hivemq-cloud
            Profile::HivemqCloud => ProfileDefaults {
                inflight_publishes: Some(Figure { default: 10, documented: 10 }),
                inflight_events: 1024,
                max_packet: 256 * 1024 * 1024,
                batch: billed(5 * 1024),
                billing_unit: Some(5 * 1024),
                ..generic
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_generic_changes_nothing() {
        for p in Profile::ALL {
            assert_eq!(Profile::parse(p.name()), Some(p));
        }
        let g = Profile::Generic.defaults();
        assert!(g.publish_rate.is_none() && !g.batch.enabled());
    }

    #[test]
    fn rates_default_to_95_percent_of_the_documented_figure() {
        let aws = Profile::AwsIotCore.defaults();
        let r = aws.publish_rate.unwrap();
        assert_eq!((r.default, r.documented), (95, 100));
        assert_eq!(aws.byte_rate.unwrap().default, 524_288);
        // A full batch bills a whole number of units, topic and properties included.
        assert_eq!((aws.batch.max_bytes + BATCH_HEADROOM) % aws.billing_unit.unwrap(), 0);
        for p in Profile::ALL {
            let d = p.defaults();
            assert!(d.batch.max_bytes <= d.max_payload.unwrap_or(d.max_packet), "{}", p.name());
        }
    }

    #[test]
    fn topic_rules_name_what_breaks_them() {
        let aws = Profile::AwsIotCore.defaults().topics;
        assert_eq!(aws.refusal("ferry/gw/a/b"), None);
        assert!(aws.refusal("a/b/c/d/e/f/g/h/i").unwrap().contains("9 levels"));
        assert!(aws.refusal(&"x".repeat(257)).unwrap().contains("257 bytes"));
        assert!(aws.refusal("$aws/things/x").unwrap().contains("reserves"));
    }
}
