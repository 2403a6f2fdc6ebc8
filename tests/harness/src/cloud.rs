//! [`CloudEmulator`]: an MQTT-aware proxy that holds a client to a cloud
//! broker's documented per-connection limits, in front of a real broker.
//!
//! Loopback Mosquitto accepts anything; AWS IoT Core, Azure Event Grid,
//! Azure IoT Hub and HiveMQ Cloud do not. The emulator sits between a client
//! and a harness broker on `127.0.0.1:0`, reads the client's MQTT (3.1.1 or 5)
//! packet by packet, and applies a [`CloudProfile`]: plain data with the
//! figures and behaviours each cloud documents (see `docs/cloud-profiles.md`
//! for the sources). It owns its listener, one task per connection and the
//! counters; it never touches the upstream broker process.
//!
//! # What it does to a client's PUBLISH
//!
//! 1. **Rules that close the connection**, checked first: payload over
//!    [`CloudProfile::max_payload`], packet over the MQTT 5 Maximum Packet
//!    Size it announced, topic over the byte or level limit, a reserved
//!    prefix, a topic outside [`CloudProfile::required_topic_prefix`], a QoS
//!    above [`CloudProfile::max_qos`], a retained publish where retain is not
//!    available, an unknown MQTT 5 topic alias. Over MQTT 5 the client first
//!    gets a DISCONNECT with the reason code the spec gives for the breach
//!    (0x90 Topic Name invalid, 0x95 Packet too large, …); MQTT 3.1.1 has no
//!    server DISCONNECT, so the socket just closes.
//! 2. **Limits with an [`Excess`] policy**: unacknowledged QoS 1/2 publishes
//!    ([`CloudProfile::max_inflight`]), publishes per window
//!    ([`CloudProfile::publish_rate`]) and PUBLISH bytes per window
//!    ([`CloudProfile::byte_rate`]). Over a limit a publish is *discarded*
//!    (never forwarded, never acknowledged: what AWS documents for its publish
//!    rate and in-flight quota), *delayed* until it fits (AWS's throughput
//!    limit, IoT Hub's traffic shaping) or the connection is *closed*.
//! 3. Otherwise it is forwarded byte for byte, and counted: bytes, and the
//!    cloud's metered units ([`Metering`]).
//!
//! Every other packet passes through unchanged both ways, except the MQTT 5
//! CONNACK, whose Receive Maximum, Maximum Packet Size, Topic Alias Maximum,
//! Maximum QoS and Retain Available are replaced by the profile's
//! [`ConnackLimits`] (the upstream's other properties are kept), and PUBACK /
//! PUBREC / PUBCOMP from the upstream, which are read to free in-flight slots.
//! An MQTT 5 CONNECT to a profile without MQTT 5 is refused with CONNACK 0x84.
//!
//! # How rate limits are measured
//!
//! A [`RateLimit`] is `limit` units per `per`, over a **sliding window**: a
//! publish is admitted only if, with it, no interval of length `per` ending
//! now holds more than `limit` (publishes, or PUBLISH packet bytes). The
//! clouds say "per second" (AWS, Event Grid) or "applied in minute ranges"
//! (IoT Hub) without naming an algorithm; the sliding window is the strictest
//! reading of those words. A sender that passes it also passes a fixed
//! one-second window or a token bucket of the same figure, so an agent that
//! shows zero violations here does not depend on how the cloud really counts.
//! The corollary: pace with margin; a client sending at exactly the figure is
//! flagged whenever scheduling jitter bunches two publishes together.
//! Publishes that were discarded or that closed the connection do not use up
//! the window. A single publish larger than a whole byte window is admitted
//! into an empty window rather than refused forever. Time is
//! `tokio::time::Instant`, so a test that pauses time drives the windows too.
//!
//! What is not modelled: outbound (cloud-to-client) traffic counting toward
//! the same per-connection limits (AWS counts both directions), account- or
//! hub-wide quotas, AWS Basic Ingest topics (`$aws/rules/…` are treated as
//! reserved), and anything about SUBSCRIBE.
//!
//! The upstream's own limits still apply behind the emulator. Mosquitto, for
//! one, announces Receive Maximum 20 to MQTT 5 clients; it acknowledges QoS 1
//! at once, so a client using a larger announced window is not refused.
//!
//! Dropping the emulator aborts its accept task and, with it, every connection.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use bytes::BytesMut;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::net;

/// How many violation descriptions [`CloudHandle::violations`] keeps.
const VIOLATION_LOG: usize = 64;
/// Largest MQTT packet the wire format can describe (remaining length 268,435,455).
const MQTT_MAX_REMAINING: usize = 268_435_455;

/// What the emulator does with a publish that would exceed a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Excess {
    /// Never forward it and never acknowledge it.
    Discard,
    /// Hold it (and everything the client sends after it) until it fits.
    Delay,
    /// Close the connection (MQTT 5: after a DISCONNECT with the matching reason code).
    Disconnect,
}

/// At most `limit` units (publishes, or bytes) in any sliding window of length `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Units allowed per window.
    pub limit: u64,
    /// Window length.
    pub per: Duration,
    /// What happens to a publish that does not fit.
    pub excess: Excess,
}

impl RateLimit {
    /// `limit` per one-second window.
    pub fn per_second(limit: u64, excess: Excess) -> Self {
        Self { limit, per: Duration::from_secs(1), excess }
    }
}

/// Which bytes of a forwarded PUBLISH a cloud bills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeteredBytes {
    /// The payload only.
    Payload,
    /// Payload + topic, and over MQTT 5 the user properties (keys and
    /// values), content type, response topic and correlation data (AWS).
    PayloadTopicProperties,
    /// Payload + the property bag the topic carries after
    /// [`CloudProfile::required_topic_prefix`] (IoT Hub: body plus property
    /// names and values).
    PayloadPropertyBag,
}

/// How a cloud turns forwarded publishes into billed units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metering {
    /// One unit per publish, whatever its size.
    PerPublish,
    /// `ceil(counted bytes / unit_bytes)` units per publish, at least one.
    Chunks {
        /// Size of one billed unit.
        unit_bytes: u32,
        /// What counts toward it.
        counted: MeteredBytes,
    },
}

impl Metering {
    fn units(self, counted: u64) -> u64 {
        match self {
            Metering::PerPublish => 1,
            Metering::Chunks { unit_bytes, .. } => counted.div_ceil(u64::from(unit_bytes)).max(1),
        }
    }
}

/// CONNACK properties the emulator announces to MQTT 5 clients in place of
/// the upstream's. `None` leaves the upstream's value (or its absence) alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConnackLimits {
    /// Receive Maximum: unacknowledged QoS 1/2 publishes the client may have.
    pub receive_maximum: Option<u16>,
    /// Maximum Packet Size the server accepts.
    pub maximum_packet_size: Option<u32>,
    /// Highest topic alias the server accepts (0: none).
    pub topic_alias_maximum: Option<u16>,
    /// Maximum QoS (0 or 1; the spec says leave it out for 2).
    pub maximum_qos: Option<u8>,
    /// Retain Available.
    pub retain_available: Option<bool>,
}

/// One cloud's per-connection limits and behaviours, as plain data.
///
/// The constructors carry the figures of `docs/cloud-profiles.md`; tests
/// scale them with the `with_*` methods or struct update syntax.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudProfile {
    /// Short name for messages, e.g. `aws-iot-core`.
    pub name: String,
    /// Client-to-cloud publishes per window.
    pub publish_rate: Option<RateLimit>,
    /// Client-to-cloud PUBLISH packet bytes per window.
    pub byte_rate: Option<RateLimit>,
    /// Unacknowledged QoS 1/2 publishes from the client.
    pub max_inflight: Option<u16>,
    /// What happens to a publish over [`max_inflight`](Self::max_inflight).
    pub inflight_excess: Excess,
    /// Largest payload in bytes; a larger one closes the connection.
    pub max_payload: Option<usize>,
    /// Longest topic in bytes (UTF-8).
    pub max_topic_bytes: Option<usize>,
    /// Most topic levels (`/`-separated segments; AWS's "7 slashes" is 8 levels).
    pub max_topic_levels: Option<usize>,
    /// Topic prefixes a client may not publish to (e.g. `$` on AWS).
    pub reserved_topic_prefixes: Vec<String>,
    /// The only topics a client may publish to start with this;
    /// `{client_id}` is replaced by the CONNECT's client id (IoT Hub).
    pub required_topic_prefix: Option<String>,
    /// Highest QoS accepted on a publish.
    pub max_qos: u8,
    /// Whether a retained publish is accepted.
    pub retain_available: bool,
    /// Whether MQTT 5 clients are accepted.
    pub mqtt5: bool,
    /// What MQTT 5 clients are told in the CONNACK (`None`: the upstream's CONNACK as is).
    pub connack: Option<ConnackLimits>,
    /// How forwarded publishes are billed.
    pub metering: Metering,
}

impl CloudProfile {
    /// No limits at all, every packet passes, one metered unit per publish.
    pub fn unlimited() -> Self {
        Self {
            name: "unlimited".to_owned(),
            publish_rate: None,
            byte_rate: None,
            max_inflight: None,
            inflight_excess: Excess::Discard,
            max_payload: None,
            max_topic_bytes: None,
            max_topic_levels: None,
            reserved_topic_prefixes: Vec::new(),
            required_topic_prefix: None,
            max_qos: 2,
            retain_available: true,
            mqtt5: true,
            connack: None,
            metering: Metering::PerPublish,
        }
    }

    /// AWS IoT Core message broker quotas (AWS General Reference, "AWS IoT
    /// Core endpoints and quotas") and MQTT 5 properties (developer guide, "MQTT").
    pub fn aws_iot_core() -> Self {
        Self {
            name: "aws-iot-core".to_owned(),
            // "Publish requests that exceed that quota are discarded."
            publish_rate: Some(RateLimit::per_second(100, Excess::Discard)),
            // "Data that exceeds the maximum throughput is delayed in processing."
            byte_rate: Some(RateLimit::per_second(512 * 1024, Excess::Delay)),
            // "no new publish requests are accepted from this client until a PUBACK"
            max_inflight: Some(100),
            inflight_excess: Excess::Discard,
            max_payload: Some(128 * 1024),
            max_topic_bytes: Some(256),
            max_topic_levels: Some(8),
            reserved_topic_prefixes: vec!["$".to_owned()],
            required_topic_prefix: None,
            max_qos: 1,
            retain_available: true,
            mqtt5: true,
            connack: Some(ConnackLimits {
                receive_maximum: Some(100),
                maximum_packet_size: Some(128 * 1024),
                topic_alias_maximum: Some(8),
                maximum_qos: Some(1),
                retain_available: Some(true),
            }),
            metering: Metering::Chunks { unit_bytes: 5 * 1024, counted: MeteredBytes::PayloadTopicProperties },
        }
    }

    /// Azure Event Grid namespace MQTT broker, per session ("Azure Event Grid
    /// quotas and limits", "MQTT features supported by Azure Event Grid's MQTT broker").
    pub fn azure_event_grid() -> Self {
        Self {
            name: "azure-event-grid".to_owned(),
            publish_rate: Some(RateLimit::per_second(1_000, Excess::Discard)),
            byte_rate: Some(RateLimit::per_second(1_000_000, Excess::Discard)),
            max_inflight: Some(1_000),
            inflight_excess: Excess::Discard,
            max_payload: Some(512 * 1024),
            max_topic_bytes: Some(256),
            max_topic_levels: Some(15),
            reserved_topic_prefixes: Vec::new(),
            required_topic_prefix: None,
            max_qos: 1,
            // Retain is a preview feature (July 2025); MQTT 3.1.1 retain was
            // documented as "fails and closes the connection".
            retain_available: false,
            mqtt5: true,
            connack: Some(ConnackLimits {
                receive_maximum: Some(1_000),
                maximum_packet_size: Some(512 * 1024),
                topic_alias_maximum: Some(10),
                maximum_qos: Some(1),
                retain_available: Some(false),
            }),
            // The size of a billed MQTT operation could not be confirmed.
            metering: Metering::PerPublish,
        }
    }

    /// Azure IoT Hub device endpoint over MQTT 3.1.1, one S1 unit ("IoT Hub
    /// quotas and throttling", "Communicate with an IoT hub using the MQTT
    /// protocol", "Azure IoT Hub billing information").
    pub fn azure_iot_hub() -> Self {
        Self {
            name: "azure-iot-hub".to_owned(),
            // S1: "Higher of 100/sec or 12/sec/unit", "applied in minute
            // ranges", excess is traffic-shaped (queued) before 429s.
            publish_rate: Some(RateLimit { limit: 6_000, per: Duration::from_secs(60), excess: Excess::Delay }),
            byte_rate: None,
            max_inflight: None,
            inflight_excess: Excess::Discard,
            max_payload: Some(256 * 1024),
            max_topic_bytes: None,
            max_topic_levels: None,
            reserved_topic_prefixes: Vec::new(),
            required_topic_prefix: Some("devices/{client_id}/messages/events/".to_owned()),
            // "If a device app publishes a message with QoS 2, IoT Hub closes the network connection."
            max_qos: 1,
            // A retained publish is accepted (retain becomes an `mqtt-retain` property).
            retain_available: true,
            mqtt5: false,
            connack: None,
            metering: Metering::Chunks { unit_bytes: 4 * 1024, counted: MeteredBytes::PayloadPropertyBag },
        }
    }

    /// HiveMQ Cloud: 5 KB normalised messages (HiveMQ Cloud FAQ); the MQTT
    /// limits are HiveMQ broker defaults, not confirmed for the Cloud plans.
    pub fn hivemq_cloud() -> Self {
        Self {
            name: "hivemq-cloud".to_owned(),
            publish_rate: None,
            byte_rate: None,
            max_inflight: Some(10),
            // MQTT 5 §3.3.4: over Receive Maximum the server disconnects with 0x93.
            inflight_excess: Excess::Disconnect,
            max_payload: None,
            max_topic_bytes: Some(65_535),
            max_topic_levels: None,
            reserved_topic_prefixes: Vec::new(),
            required_topic_prefix: None,
            max_qos: 2,
            retain_available: true,
            mqtt5: true,
            connack: Some(ConnackLimits {
                receive_maximum: Some(10),
                maximum_packet_size: Some(268_435_460),
                topic_alias_maximum: Some(5),
                maximum_qos: None,
                retain_available: Some(true),
            }),
            metering: Metering::Chunks { unit_bytes: 5 * 1024, counted: MeteredBytes::PayloadTopicProperties },
        }
    }

    /// Renames the profile (for messages).
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// `per_second` publishes per one-second window, keeping the profile's
    /// [`Excess`] policy (discard if it had no publish rate).
    pub fn with_publish_rate(self, per_second: u64) -> Self {
        let excess = self.publish_rate.map_or(Excess::Discard, |r| r.excess);
        self.with_publish_limit(Some(RateLimit::per_second(per_second, excess)))
    }

    /// Replaces the publish rate limit wholesale (`None`: unlimited).
    pub fn with_publish_limit(mut self, limit: Option<RateLimit>) -> Self {
        self.publish_rate = limit;
        self
    }

    /// `per_second` PUBLISH bytes per one-second window, keeping the
    /// profile's [`Excess`] policy (discard if it had no byte rate).
    pub fn with_byte_rate(self, per_second: u64) -> Self {
        let excess = self.byte_rate.map_or(Excess::Discard, |r| r.excess);
        self.with_byte_limit(Some(RateLimit::per_second(per_second, excess)))
    }

    /// Replaces the byte rate limit wholesale (`None`: unlimited).
    pub fn with_byte_limit(mut self, limit: Option<RateLimit>) -> Self {
        self.byte_rate = limit;
        self
    }

    /// At most `max` unacknowledged QoS 1/2 publishes; also the Receive
    /// Maximum announced over MQTT 5 when the profile rewrites the CONNACK.
    pub fn with_max_inflight(mut self, max: u16) -> Self {
        self.max_inflight = Some(max);
        if let Some(connack) = &mut self.connack {
            connack.receive_maximum = Some(max);
        }
        self
    }

    /// What happens to a publish over the in-flight limit.
    pub fn with_inflight_excess(mut self, excess: Excess) -> Self {
        self.inflight_excess = excess;
        self
    }

    /// Largest payload in bytes (the announced Maximum Packet Size is left alone).
    pub fn with_max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = Some(bytes);
        self
    }

    /// The Maximum Packet Size announced to MQTT 5 clients, if the profile rewrites the CONNACK.
    pub fn max_packet_size(&self) -> Option<u32> {
        self.connack.and_then(|c| c.maximum_packet_size)
    }
}

/// A limit with an [`Excess`] policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Limit {
    Rate,
    Inflight,
    ByteRate,
}

impl Limit {
    fn disconnect_reason(self) -> v5::DisconnectReasonCode {
        match self {
            Limit::Rate => v5::DisconnectReasonCode::MessageRateTooHigh,
            Limit::Inflight => v5::DisconnectReasonCode::ReceiveMaximumExceeded,
            Limit::ByteRate => v5::DisconnectReasonCode::QuotaExceeded,
        }
    }
}

/// Why the emulator closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CloseReason {
    Over(Limit),
    PayloadTooLarge,
    PacketTooLarge,
    TopicTooLong,
    TopicTooDeep,
    ReservedTopic,
    TopicNotAllowed,
    TopicAliasInvalid,
    QosNotSupported,
    RetainNotSupported,
    ProtocolVersion,
    Malformed,
}

impl CloseReason {
    fn disconnect_reason(self) -> v5::DisconnectReasonCode {
        use v5::DisconnectReasonCode as Code;
        match self {
            CloseReason::Over(limit) => limit.disconnect_reason(),
            CloseReason::PayloadTooLarge | CloseReason::PacketTooLarge => Code::PacketTooLarge,
            CloseReason::TopicTooLong
            | CloseReason::TopicTooDeep
            | CloseReason::ReservedTopic
            | CloseReason::TopicNotAllowed => Code::TopicNameInvalid,
            CloseReason::TopicAliasInvalid => Code::TopicAliasInvalid,
            CloseReason::QosNotSupported => Code::QoSNotSupported,
            CloseReason::RetainNotSupported => Code::RetainNotSupported,
            // Never sent: a refused CONNECT gets CONNACK 0x84 instead.
            CloseReason::ProtocolVersion => Code::ProtocolError,
            CloseReason::Malformed => Code::MalformedPacket,
        }
    }

    fn counter(self) -> Counter {
        match self {
            CloseReason::Over(Limit::Rate) => Counter::ClosedRate,
            CloseReason::Over(Limit::Inflight) => Counter::ClosedInflight,
            CloseReason::Over(Limit::ByteRate) => Counter::ClosedByteRate,
            CloseReason::PayloadTooLarge => Counter::ClosedPayloadTooLarge,
            CloseReason::PacketTooLarge => Counter::ClosedPacketTooLarge,
            CloseReason::TopicTooLong => Counter::ClosedTopicTooLong,
            CloseReason::TopicTooDeep => Counter::ClosedTopicTooDeep,
            CloseReason::ReservedTopic => Counter::ClosedReservedTopic,
            CloseReason::TopicNotAllowed => Counter::ClosedTopicNotAllowed,
            CloseReason::TopicAliasInvalid => Counter::ClosedTopicAliasInvalid,
            CloseReason::QosNotSupported => Counter::ClosedQosNotSupported,
            CloseReason::RetainNotSupported => Counter::ClosedRetainNotSupported,
            CloseReason::ProtocolVersion => Counter::ClosedProtocolVersion,
            CloseReason::Malformed => Counter::ClosedMalformed,
        }
    }
}

/// Indexes into [`Shared::counters`]; one per field of [`CloudCounters`].
#[derive(Debug, Clone, Copy)]
enum Counter {
    ConnectionsAccepted,
    ConnectionsOpen,
    PublishesSeen,
    PublishesForwarded,
    BytesForwarded,
    MeteredUnits,
    DiscardedRate,
    DiscardedInflight,
    DiscardedByteRate,
    DelayedRate,
    DelayedInflight,
    DelayedByteRate,
    ClosedRate,
    ClosedInflight,
    ClosedByteRate,
    ClosedPayloadTooLarge,
    ClosedPacketTooLarge,
    ClosedTopicTooLong,
    ClosedTopicTooDeep,
    ClosedReservedTopic,
    ClosedTopicNotAllowed,
    ClosedTopicAliasInvalid,
    ClosedQosNotSupported,
    ClosedRetainNotSupported,
    ClosedProtocolVersion,
    ClosedMalformed,
}

const COUNTERS: usize = Counter::ClosedMalformed as usize + 1;

/// A snapshot of a [`CloudEmulator`]'s counters, summed over its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CloudCounters {
    /// Client connections accepted (and relayed upstream).
    pub connections_accepted: u64,
    /// Client connections open now.
    pub connections_open: u64,
    /// PUBLISH packets received from clients.
    pub publishes_seen: u64,
    /// PUBLISH packets forwarded upstream.
    pub publishes_forwarded: u64,
    /// Bytes of the forwarded PUBLISH packets (whole packets).
    pub bytes_forwarded: u64,
    /// Billed units of the forwarded publishes, per the profile's [`Metering`].
    pub metered_units: u64,
    /// Publishes discarded over the publish rate.
    pub discarded_rate: u64,
    /// Publishes discarded over the in-flight limit.
    pub discarded_inflight: u64,
    /// Publishes discarded over the byte rate.
    pub discarded_byte_rate: u64,
    /// Publishes held back by the publish rate (then forwarded).
    pub delayed_rate: u64,
    /// Publishes held back by the in-flight limit (then forwarded).
    pub delayed_inflight: u64,
    /// Publishes held back by the byte rate (then forwarded).
    pub delayed_byte_rate: u64,
    /// Connections closed over the publish rate.
    pub closed_rate: u64,
    /// Connections closed over the in-flight limit.
    pub closed_inflight: u64,
    /// Connections closed over the byte rate.
    pub closed_byte_rate: u64,
    /// Connections closed for a payload over [`CloudProfile::max_payload`].
    pub closed_payload_too_large: u64,
    /// Connections closed for a packet over the announced Maximum Packet Size.
    pub closed_packet_too_large: u64,
    /// Connections closed for a topic over [`CloudProfile::max_topic_bytes`].
    pub closed_topic_too_long: u64,
    /// Connections closed for a topic over [`CloudProfile::max_topic_levels`].
    pub closed_topic_too_deep: u64,
    /// Connections closed for a publish to a reserved topic prefix.
    pub closed_reserved_topic: u64,
    /// Connections closed for a topic outside [`CloudProfile::required_topic_prefix`].
    pub closed_topic_not_allowed: u64,
    /// Connections closed for an MQTT 5 topic alias the emulator cannot accept.
    pub closed_topic_alias_invalid: u64,
    /// Connections closed for a publish above [`CloudProfile::max_qos`].
    pub closed_qos_not_supported: u64,
    /// Connections closed for a retained publish where retain is not available.
    pub closed_retain_not_supported: u64,
    /// MQTT 5 connections refused by a profile without MQTT 5.
    pub closed_protocol_version: u64,
    /// Connections closed for a packet the emulator could not decode.
    pub closed_malformed: u64,
}

impl CloudCounters {
    fn from_array(c: [u64; COUNTERS]) -> Self {
        use Counter as C;
        Self {
            connections_accepted: c[C::ConnectionsAccepted as usize],
            connections_open: c[C::ConnectionsOpen as usize],
            publishes_seen: c[C::PublishesSeen as usize],
            publishes_forwarded: c[C::PublishesForwarded as usize],
            bytes_forwarded: c[C::BytesForwarded as usize],
            metered_units: c[C::MeteredUnits as usize],
            discarded_rate: c[C::DiscardedRate as usize],
            discarded_inflight: c[C::DiscardedInflight as usize],
            discarded_byte_rate: c[C::DiscardedByteRate as usize],
            delayed_rate: c[C::DelayedRate as usize],
            delayed_inflight: c[C::DelayedInflight as usize],
            delayed_byte_rate: c[C::DelayedByteRate as usize],
            closed_rate: c[C::ClosedRate as usize],
            closed_inflight: c[C::ClosedInflight as usize],
            closed_byte_rate: c[C::ClosedByteRate as usize],
            closed_payload_too_large: c[C::ClosedPayloadTooLarge as usize],
            closed_packet_too_large: c[C::ClosedPacketTooLarge as usize],
            closed_topic_too_long: c[C::ClosedTopicTooLong as usize],
            closed_topic_too_deep: c[C::ClosedTopicTooDeep as usize],
            closed_reserved_topic: c[C::ClosedReservedTopic as usize],
            closed_topic_not_allowed: c[C::ClosedTopicNotAllowed as usize],
            closed_topic_alias_invalid: c[C::ClosedTopicAliasInvalid as usize],
            closed_qos_not_supported: c[C::ClosedQosNotSupported as usize],
            closed_retain_not_supported: c[C::ClosedRetainNotSupported as usize],
            closed_protocol_version: c[C::ClosedProtocolVersion as usize],
            closed_malformed: c[C::ClosedMalformed as usize],
        }
    }

    /// Publishes discarded for any reason.
    pub fn discarded(&self) -> u64 {
        self.discarded_rate + self.discarded_inflight + self.discarded_byte_rate
    }

    /// Publishes held back for any reason.
    pub fn delayed(&self) -> u64 {
        self.delayed_rate + self.delayed_inflight + self.delayed_byte_rate
    }

    /// Connections the emulator closed, for any reason.
    pub fn closed(&self) -> u64 {
        self.closed_rate
            + self.closed_inflight
            + self.closed_byte_rate
            + self.closed_payload_too_large
            + self.closed_packet_too_large
            + self.closed_topic_too_long
            + self.closed_topic_too_deep
            + self.closed_reserved_topic
            + self.closed_topic_not_allowed
            + self.closed_topic_alias_invalid
            + self.closed_qos_not_supported
            + self.closed_retain_not_supported
            + self.closed_protocol_version
            + self.closed_malformed
    }

    /// Every time a client went over a documented limit or broke a rule:
    /// discarded + delayed + closed. Zero means the client stayed within the cloud's limits.
    pub fn violations(&self) -> u64 {
        self.discarded() + self.delayed() + self.closed()
    }
}

/// A running emulator. Drop stops it.
#[derive(Debug)]
pub struct CloudEmulator {
    addr: SocketAddr,
    upstream: SocketAddr,
    handle: CloudHandle,
    accept_task: JoinHandle<()>,
}

/// Cheap cloneable access to a [`CloudEmulator`]'s profile and counters.
#[derive(Debug, Clone)]
pub struct CloudHandle {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    profile: CloudProfile,
    counters: [AtomicU64; COUNTERS],
    violations: Mutex<VecDeque<String>>,
}

impl Shared {
    fn add(&self, counter: Counter, n: u64) {
        self.counters[counter as usize].fetch_add(n, Ordering::Relaxed);
    }

    fn violation(&self, text: String) {
        let mut log = self.violations.lock().expect("violation log lock");
        if log.len() == VIOLATION_LOG {
            log.pop_front();
        }
        log.push_back(text);
    }
}

impl CloudEmulator {
    /// Listens on an ephemeral loopback port and relays to the MQTT broker at
    /// `upstream`, enforcing `profile` on every client connection.
    pub async fn start(upstream: SocketAddr, profile: CloudProfile) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(net::loopback(0)).await.context("bind cloud emulator listener")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            profile,
            counters: std::array::from_fn(|_| AtomicU64::new(0)),
            violations: Mutex::new(VecDeque::new()),
        });
        let accept_task = tokio::spawn(accept_loop(listener, upstream, shared.clone()));
        Ok(Self { addr, upstream, handle: CloudHandle { shared }, accept_task })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The emulator's port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `mqtt://127.0.0.1:PORT` of the emulator, for MQTT clients.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.addr.port())
    }

    /// The broker the emulator relays to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// A handle to read counters from other tasks.
    pub fn handle(&self) -> CloudHandle {
        self.handle.clone()
    }

    /// The profile being enforced.
    pub fn profile(&self) -> &CloudProfile {
        &self.handle.shared.profile
    }
}

impl Drop for CloudEmulator {
    fn drop(&mut self) {
        // The accept task owns the JoinSet of connection tasks.
        self.accept_task.abort();
    }
}

impl CloudHandle {
    /// The counters now.
    pub fn counters(&self) -> CloudCounters {
        CloudCounters::from_array(std::array::from_fn(|i| self.shared.counters[i].load(Ordering::Relaxed)))
    }

    /// The last violations (up to 64), oldest first, one line each: for failure messages.
    pub fn violations(&self) -> Vec<String> {
        self.shared.violations.lock().expect("violation log lock").iter().cloned().collect()
    }

    /// The profile being enforced.
    pub fn profile(&self) -> &CloudProfile {
        &self.shared.profile
    }

    /// Polls until `done` holds for the counters, or fails after `timeout`
    /// with the last counters and violations.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        done: impl Fn(&CloudCounters) -> bool,
    ) -> anyhow::Result<CloudCounters> {
        let deadline = Instant::now() + timeout;
        loop {
            let counters = self.counters();
            if done(&counters) {
                return Ok(counters);
            }
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "{}: condition not met within {timeout:?}; counters {counters:?}; violations {:?}",
                    self.shared.profile.name,
                    self.violations()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    let mut next_id = 0u64;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else {
                    // e.g. out of file descriptors: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                next_id += 1;
                shared.add(Counter::ConnectionsAccepted, 1);
                conns.spawn(serve(next_id, client, upstream, shared.clone()));
            }
            // Reap finished connection tasks so the set does not grow.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Decrements the open-connection gauge however the connection task ends.
struct OpenGuard(Arc<Shared>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.counters[Counter::ConnectionsOpen as usize].fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve(id: u64, client: TcpStream, upstream: SocketAddr, shared: Arc<Shared>) {
    shared.add(Counter::ConnectionsOpen, 1);
    let _guard = OpenGuard(shared.clone());
    let Ok(server) = TcpStream::connect(upstream).await else {
        // Upstream down: the client sees the RST it would see from a dead broker.
        let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_r, client_w) = client.into_split();
    let (server_r, server_w) = server.into_split();
    let conn = Connection::new(id, shared, client_w);
    // Either direction ending ends the connection: MQTT has no use for a half-open link.
    tokio::select! {
        _ = conn.client_to_broker(client_r, server_w) => {}
        _ = conn.broker_to_client(server_r) => {}
    }
    let _ = conn.to_client.lock().await.shutdown().await;
}

/// MQTT protocol version of a connection, from its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    V311,
    V5,
}

/// Per-connection protocol state, shared by the two directions of one task.
#[derive(Debug)]
struct Session {
    version: Version,
    client_id: String,
    /// Packet ids of forwarded QoS 1/2 publishes not yet acknowledged upstream.
    inflight: HashSet<u16>,
    /// MQTT 5 client-to-server topic aliases.
    aliases: HashMap<u16, String>,
    rate: Option<SlidingWindow>,
    bytes: Option<SlidingWindow>,
}

/// What the emulator learned from one client PUBLISH.
#[derive(Debug)]
struct PublishView {
    qos: u8,
    retain: bool,
    pkid: u16,
    topic: String,
    topic_alias: Option<u16>,
    payload_len: usize,
    /// MQTT 5 properties that AWS meters: user properties, content type, response topic, correlation data.
    metered_properties: usize,
}

/// What to do with a publish.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Forward,
    Discard,
    Close(CloseReason),
}

struct Connection {
    id: u64,
    shared: Arc<Shared>,
    /// Both directions write to the client: forwarded packets and the emulator's DISCONNECT.
    to_client: tokio::sync::Mutex<OwnedWriteHalf>,
    session: Mutex<Session>,
    /// Signalled whenever an in-flight slot frees up.
    acked: Notify,
}

impl Connection {
    fn new(id: u64, shared: Arc<Shared>, to_client: OwnedWriteHalf) -> Self {
        let profile = &shared.profile;
        let session = Session {
            version: Version::V311,
            client_id: String::new(),
            inflight: HashSet::new(),
            aliases: HashMap::new(),
            rate: profile.publish_rate.map(SlidingWindow::new),
            bytes: profile.byte_rate.map(SlidingWindow::new),
        };
        Self {
            id,
            shared,
            to_client: tokio::sync::Mutex::new(to_client),
            session: Mutex::new(session),
            acked: Notify::new(),
        }
    }

    fn profile(&self) -> &CloudProfile {
        &self.shared.profile
    }

    fn session(&self) -> std::sync::MutexGuard<'_, Session> {
        self.session.lock().expect("session lock")
    }

    async fn client_to_broker(&self, reader: OwnedReadHalf, mut upstream: OwnedWriteHalf) {
        let mut frames = FrameReader::new(reader);
        loop {
            let frame = match frames.next().await {
                Ok(Some(frame)) => frame,
                Ok(None) | Err(FrameError::Io) => return,
                Err(FrameError::Malformed) => return self.close(CloseReason::Malformed, "bad fixed header").await,
            };
            match frame[0] >> 4 {
                CONNECT => {
                    if let Err((reason, why)) = self.on_connect(&frame) {
                        if reason == CloseReason::ProtocolVersion {
                            self.refuse_mqtt5().await;
                        }
                        return self.close(reason, &why).await;
                    }
                }
                PUBLISH => match self.on_publish(&frame).await {
                    Verdict::Forward => {}
                    Verdict::Discard => continue,
                    Verdict::Close(reason) => return self.close(reason, "").await,
                },
                _ => {}
            }
            if upstream.write_all(&frame).await.is_err() {
                return;
            }
        }
    }

    async fn broker_to_client(&self, reader: OwnedReadHalf) {
        let mut frames = FrameReader::new(reader);
        while let Ok(Some(frame)) = frames.next().await {
            let version = self.session().version;
            let out = match frame[0] >> 4 {
                CONNACK if version == Version::V5 => self.rewrite_connack(frame),
                PUBACK | PUBREC | PUBCOMP => {
                    self.on_ack(&frame, version);
                    frame
                }
                _ => frame,
            };
            if self.to_client.lock().await.write_all(&out).await.is_err() {
                return;
            }
        }
    }

    /// Records the protocol version and client id; refuses what the profile does not speak.
    fn on_connect(&self, frame: &[u8]) -> Result<(), (CloseReason, String)> {
        let malformed = |e: &dyn std::fmt::Debug| (CloseReason::Malformed, format!("CONNECT: {e:?}"));
        let level = protocol_level(frame).ok_or_else(|| malformed(&"no protocol level"))?;
        let (version, client_id) = if level == 5 {
            match v5::Packet::read(&mut BytesMut::from(frame), None).map_err(|e| malformed(&e))? {
                v5::Packet::Connect(connect, _, _) => (Version::V5, connect.client_id),
                other => return Err(malformed(&other)),
            }
        } else {
            match v4::Packet::read(&mut BytesMut::from(frame), MQTT_MAX_REMAINING).map_err(|e| malformed(&e))? {
                v4::Packet::Connect(connect) => (Version::V311, connect.client_id),
                other => return Err(malformed(&other)),
            }
        };
        let mut session = self.session();
        session.version = version;
        session.client_id = client_id;
        if version == Version::V5 && !self.profile().mqtt5 {
            return Err((CloseReason::ProtocolVersion, format!("{} does not accept MQTT 5", self.profile().name)));
        }
        Ok(())
    }

    /// Answers an MQTT 5 CONNECT with CONNACK 0x84 (Unsupported Protocol Version).
    async fn refuse_mqtt5(&self) {
        let connack = v5::ConnAck {
            session_present: false,
            code: v5::ConnectReturnCode::UnsupportedProtocolVersion,
            properties: None,
        };
        let mut buf = BytesMut::new();
        if connack.write(&mut buf).is_ok() {
            let _ = self.to_client.lock().await.write_all(&buf).await;
        }
    }

    /// Decides the fate of one client PUBLISH, waiting here when a limit delays it.
    async fn on_publish(&self, frame: &[u8]) -> Verdict {
        self.shared.add(Counter::PublishesSeen, 1);
        let version = self.session().version;
        let view = match decode_publish(frame, version) {
            Ok(view) => view,
            Err(why) => {
                self.log(&format!("undecodable PUBLISH: {why}"));
                return Verdict::Close(CloseReason::Malformed);
            }
        };
        let view = match self.resolve_alias(view) {
            Ok(view) => view,
            Err(reason) => return self.refuse(reason, frame.len(), None),
        };
        let client_id = self.session().client_id.clone();
        if let Err(reason) = check_rules(self.profile(), version, &client_id, &view, frame.len()) {
            return self.refuse(reason, frame.len(), Some(&view));
        }
        match self.admit(&view, frame.len()).await {
            Ok(()) => {
                let units = self.profile().metering.units(metered_bytes(self.profile(), &client_id, &view));
                self.shared.add(Counter::PublishesForwarded, 1);
                self.shared.add(Counter::BytesForwarded, frame.len() as u64);
                self.shared.add(Counter::MeteredUnits, units);
                Verdict::Forward
            }
            Err(verdict) => verdict,
        }
    }

    /// Replaces an MQTT 5 topic alias by its topic, or learns a new alias.
    fn resolve_alias(&self, mut view: PublishView) -> Result<PublishView, CloseReason> {
        let Some(alias) = view.topic_alias else { return Ok(view) };
        let announced = self.profile().connack.and_then(|c| c.topic_alias_maximum);
        if alias == 0 || announced.is_some_and(|max| alias > max) {
            return Err(CloseReason::TopicAliasInvalid);
        }
        let mut session = self.session();
        if view.topic.is_empty() {
            view.topic = session.aliases.get(&alias).cloned().ok_or(CloseReason::TopicAliasInvalid)?;
        } else {
            session.aliases.insert(alias, view.topic.clone());
        }
        Ok(view)
    }

    /// Counts and logs a rule breach; the caller closes the connection.
    fn refuse(&self, reason: CloseReason, frame_len: usize, view: Option<&PublishView>) -> Verdict {
        let what = view.map_or_else(String::new, |v| {
            format!(" (topic {:?}, {} payload bytes, qos {}, retain {})", v.topic, v.payload_len, v.qos, v.retain)
        });
        self.log(&format!("{reason:?}: PUBLISH of {frame_len} bytes{what}"));
        Verdict::Close(reason)
    }

    /// Applies the in-flight, publish-rate and byte-rate limits in that order,
    /// waiting where a limit says [`Excess::Delay`]. `Ok` means forward now.
    async fn admit(&self, view: &PublishView, frame_len: usize) -> Result<(), Verdict> {
        let profile = self.profile();
        let needs_slot = view.qos > 0;
        let amount = frame_len as u64;
        let mut delayed = [false; 3];
        loop {
            // Registered before the check so an ack between check and wait is not missed.
            let acked = self.acked.notified();
            tokio::pin!(acked);
            acked.as_mut().enable();
            let now = Instant::now();
            let blocked = {
                let mut session = self.session();
                let slot_free = !needs_slot
                    || session.inflight.contains(&view.pkid)
                    || profile.max_inflight.is_none_or(|max| session.inflight.len() < usize::from(max));
                if !slot_free {
                    Some((Limit::Inflight, profile.inflight_excess, None))
                } else if let Some(at) = session.rate.as_mut().and_then(|w| w.wait_until(now, 1)) {
                    Some((Limit::Rate, profile.publish_rate.expect("rate window has a limit").excess, Some(at)))
                } else if let Some(at) = session.bytes.as_mut().and_then(|w| w.wait_until(now, amount)) {
                    Some((Limit::ByteRate, profile.byte_rate.expect("byte window has a limit").excess, Some(at)))
                } else {
                    if let Some(w) = session.rate.as_mut() {
                        w.record(now, 1);
                    }
                    if let Some(w) = session.bytes.as_mut() {
                        w.record(now, amount);
                    }
                    if needs_slot {
                        session.inflight.insert(view.pkid);
                    }
                    None
                }
            };
            let Some((limit, excess, until)) = blocked else { return Ok(()) };
            let detail = format!(
                "publish (topic {:?}, {frame_len} bytes, pkid {}) over the {limit:?} limit",
                view.topic, view.pkid
            );
            match excess {
                Excess::Discard => {
                    self.shared.add(discard_counter(limit), 1);
                    self.log(&format!("discarded {detail}"));
                    return Err(Verdict::Discard);
                }
                Excess::Disconnect => {
                    self.log(&format!("closing on {detail}"));
                    return Err(Verdict::Close(CloseReason::Over(limit)));
                }
                Excess::Delay => {
                    if !std::mem::replace(&mut delayed[limit as usize], true) {
                        self.shared.add(delay_counter(limit), 1);
                        self.log(&format!("delayed {detail}"));
                    }
                    match until {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => acked.await,
                    }
                }
            }
        }
    }

    /// Frees the in-flight slot an upstream acknowledgement ends.
    fn on_ack(&self, frame: &[u8], version: Version) {
        let pkid = match version {
            Version::V311 => match v4::Packet::read(&mut BytesMut::from(frame), MQTT_MAX_REMAINING) {
                Ok(v4::Packet::PubAck(ack)) => Some(ack.pkid),
                Ok(v4::Packet::PubComp(comp)) => Some(comp.pkid),
                _ => None,
            },
            Version::V5 => match v5::Packet::read(&mut BytesMut::from(frame), None) {
                Ok(v5::Packet::PubAck(ack)) => Some(ack.pkid),
                Ok(v5::Packet::PubComp(comp)) => Some(comp.pkid),
                // A refused QoS 2 publish ends at its PUBREC.
                Ok(v5::Packet::PubRec(rec))
                    if !matches!(rec.reason, v5::PubRecReason::Success | v5::PubRecReason::NoMatchingSubscribers) =>
                {
                    Some(rec.pkid)
                }
                _ => None,
            },
        };
        if let Some(pkid) = pkid
            && self.session().inflight.remove(&pkid)
        {
            self.acked.notify_waiters();
        }
    }

    /// Puts the profile's limits into an MQTT 5 CONNACK from the upstream.
    fn rewrite_connack(&self, frame: BytesMut) -> BytesMut {
        let Some(limits) = self.profile().connack else { return frame };
        let Ok(v5::Packet::ConnAck(mut connack)) = v5::Packet::read(&mut frame.clone(), None) else {
            return frame;
        };
        apply_connack_limits(connack.properties.get_or_insert_with(empty_connack_properties), limits);
        let mut out = BytesMut::new();
        match connack.write(&mut out) {
            Ok(_) => out,
            Err(_) => frame,
        }
    }

    /// Counts `reason`, tells an MQTT 5 client why, and closes the client side.
    async fn close(&self, reason: CloseReason, why: &str) {
        self.shared.add(reason.counter(), 1);
        if !why.is_empty() {
            self.log(&format!("{reason:?}: {why}"));
        }
        let mut to_client = self.to_client.lock().await;
        // A refused CONNECT already got its CONNACK; a DISCONNECT may not follow it.
        if self.session().version == Version::V5 && reason != CloseReason::ProtocolVersion {
            // Always with properties: rumqttc 0.25 encodes a propertyless
            // DISCONNECT with a reason code one byte longer than its remaining
            // length says, which breaks the client's framing.
            let properties = v5::DisconnectProperties {
                session_expiry_interval: None,
                reason_string: Some(format!("{}: {reason:?}", self.profile().name)),
                user_properties: Vec::new(),
                server_reference: None,
            };
            let disconnect = v5::Disconnect { reason_code: reason.disconnect_reason(), properties: Some(properties) };
            let mut buf = BytesMut::new();
            if disconnect.write(&mut buf).is_ok() {
                let _ = to_client.write_all(&buf).await;
            }
        }
        let _ = to_client.shutdown().await;
    }

    fn log(&self, text: &str) {
        let client_id = self.session().client_id.clone();
        self.shared.violation(format!("{} conn {} ({client_id}): {text}", self.shared.profile.name, self.id));
    }
}

fn discard_counter(limit: Limit) -> Counter {
    match limit {
        Limit::Rate => Counter::DiscardedRate,
        Limit::Inflight => Counter::DiscardedInflight,
        Limit::ByteRate => Counter::DiscardedByteRate,
    }
}

fn delay_counter(limit: Limit) -> Counter {
    match limit {
        Limit::Rate => Counter::DelayedRate,
        Limit::Inflight => Counter::DelayedInflight,
        Limit::ByteRate => Counter::DelayedByteRate,
    }
}

/// Overwrites the properties `limits` sets and keeps every other one.
fn apply_connack_limits(props: &mut v5::ConnAckProperties, limits: ConnackLimits) {
    if let Some(v) = limits.receive_maximum {
        props.receive_max = Some(v);
    }
    if let Some(v) = limits.maximum_packet_size {
        props.max_packet_size = Some(v);
    }
    if let Some(v) = limits.topic_alias_maximum {
        props.topic_alias_max = Some(v);
    }
    if let Some(v) = limits.maximum_qos {
        props.max_qos = Some(v);
    }
    if let Some(v) = limits.retain_available {
        props.retain_available = Some(u8::from(v));
    }
}

fn empty_connack_properties() -> v5::ConnAckProperties {
    v5::ConnAckProperties {
        session_expiry_interval: None,
        receive_max: None,
        max_qos: None,
        retain_available: None,
        max_packet_size: None,
        assigned_client_identifier: None,
        topic_alias_max: None,
        reason_string: None,
        user_properties: Vec::new(),
        wildcard_subscription_available: None,
        subscription_identifiers_available: None,
        shared_subscription_available: None,
        server_keep_alive: None,
        response_information: None,
        server_reference: None,
        authentication_method: None,
        authentication_data: None,
    }
}

// MQTT control packet types (first nibble of the fixed header).
const CONNECT: u8 = 1;
const CONNACK: u8 = 2;
const PUBLISH: u8 = 3;
const PUBACK: u8 = 4;
const PUBREC: u8 = 5;
const PUBCOMP: u8 = 7;

/// Decodes a client PUBLISH frame with rumqttc's codec for `version`.
fn decode_publish(frame: &[u8], version: Version) -> Result<PublishView, String> {
    match version {
        Version::V311 => match v4::Packet::read(&mut BytesMut::from(frame), MQTT_MAX_REMAINING) {
            Ok(v4::Packet::Publish(p)) => Ok(PublishView {
                qos: p.qos as u8,
                retain: p.retain,
                pkid: p.pkid,
                topic: p.topic,
                topic_alias: None,
                payload_len: p.payload.len(),
                metered_properties: 0,
            }),
            other => Err(format!("{other:?}")),
        },
        Version::V5 => match v5::Packet::read(&mut BytesMut::from(frame), None) {
            Ok(v5::Packet::Publish(p)) => {
                let topic = String::from_utf8(p.topic.to_vec()).map_err(|_| "topic is not UTF-8".to_owned())?;
                let props = p.properties.unwrap_or_default();
                let metered_properties = props.user_properties.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
                    + props.content_type.as_ref().map_or(0, String::len)
                    + props.response_topic.as_ref().map_or(0, String::len)
                    + props.correlation_data.as_ref().map_or(0, |d| d.len());
                Ok(PublishView {
                    qos: p.qos as u8,
                    retain: p.retain,
                    pkid: p.pkid,
                    topic,
                    topic_alias: props.topic_alias,
                    payload_len: p.payload.len(),
                    metered_properties,
                })
            }
            other => Err(format!("{other:?}")),
        },
    }
}

/// The rules whose breach closes the connection, in the order a cloud would
/// meet them; `Ok` when none is broken.
fn check_rules(
    profile: &CloudProfile,
    version: Version,
    client_id: &str,
    view: &PublishView,
    frame_len: usize,
) -> Result<(), CloseReason> {
    let announced_packet = profile.max_packet_size().filter(|_| version == Version::V5);
    if announced_packet.is_some_and(|max| frame_len as u64 > u64::from(max)) {
        return Err(CloseReason::PacketTooLarge);
    }
    if profile.max_payload.is_some_and(|max| view.payload_len > max) {
        return Err(CloseReason::PayloadTooLarge);
    }
    if view.qos > profile.max_qos {
        return Err(CloseReason::QosNotSupported);
    }
    if view.retain && !profile.retain_available {
        return Err(CloseReason::RetainNotSupported);
    }
    check_topic(profile, client_id, &view.topic)
}

/// Topic length, depth, reserved prefixes and the required prefix.
fn check_topic(profile: &CloudProfile, client_id: &str, topic: &str) -> Result<(), CloseReason> {
    if profile.max_topic_bytes.is_some_and(|max| topic.len() > max) {
        return Err(CloseReason::TopicTooLong);
    }
    if profile.max_topic_levels.is_some_and(|max| topic.split('/').count() > max) {
        return Err(CloseReason::TopicTooDeep);
    }
    if profile.reserved_topic_prefixes.iter().any(|prefix| topic.starts_with(prefix.as_str())) {
        return Err(CloseReason::ReservedTopic);
    }
    if let Some(required) = &profile.required_topic_prefix
        && !topic.starts_with(&required.replace("{client_id}", client_id))
    {
        return Err(CloseReason::TopicNotAllowed);
    }
    Ok(())
}

/// The bytes of a publish that count toward the profile's billing unit.
fn metered_bytes(profile: &CloudProfile, client_id: &str, view: &PublishView) -> u64 {
    let Metering::Chunks { counted, .. } = profile.metering else { return 0 };
    let bytes = match counted {
        MeteredBytes::Payload => view.payload_len,
        MeteredBytes::PayloadTopicProperties => view.payload_len + view.topic.len() + view.metered_properties,
        MeteredBytes::PayloadPropertyBag => {
            let prefix = profile.required_topic_prefix.as_deref().unwrap_or("").replace("{client_id}", client_id);
            view.payload_len + view.topic.strip_prefix(prefix.as_str()).map_or(view.topic.len(), str::len)
        }
    };
    bytes as u64
}

/// The protocol level byte of a CONNECT frame (4: MQTT 3.1.1, 5: MQTT 5).
fn protocol_level(frame: &[u8]) -> Option<u8> {
    let (header_len, _) = fixed_header(frame).ok()??;
    let body = frame.get(header_len..)?;
    let name_len = usize::from(u16::from_be_bytes([*body.first()?, *body.get(1)?]));
    body.get(2 + name_len).copied()
}

/// Parses a fixed header: `Ok(Some((header length, remaining length)))`,
/// `Ok(None)` if more bytes are needed, `Err` if the length is malformed.
/// Hand-written because rumqttc's framing is private to each codec.
fn fixed_header(buf: &[u8]) -> Result<Option<(usize, usize)>, FrameError> {
    let mut remaining = 0usize;
    for (i, byte) in buf.iter().skip(1).take(4).enumerate() {
        remaining |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((i + 2, remaining)));
        }
    }
    if buf.len() >= 5 { Err(FrameError::Malformed) } else { Ok(None) }
}

#[derive(Debug)]
enum FrameError {
    /// The socket failed; the connection just ends.
    Io,
    /// Not MQTT: a remaining length longer than four bytes.
    Malformed,
}

/// Splits a byte stream into whole MQTT packets.
struct FrameReader<R> {
    reader: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    fn new(reader: R) -> Self {
        Self { reader, buf: BytesMut::with_capacity(16 * 1024) }
    }

    /// The next whole packet, `None` at end of stream (a partial packet at EOF is dropped).
    async fn next(&mut self) -> Result<Option<BytesMut>, FrameError> {
        loop {
            if let Some((header, remaining)) = fixed_header(&self.buf)? {
                let total = header + remaining;
                if self.buf.len() >= total {
                    return Ok(Some(self.buf.split_to(total)));
                }
                self.buf.reserve(total - self.buf.len());
            }
            if self.reader.read_buf(&mut self.buf).await.map_err(|_| FrameError::Io)? == 0 {
                return Ok(None);
            }
        }
    }
}

/// A sliding-window counter: at most `limit` units in any window of `per`.
/// Pure state; the caller supplies the time.
#[derive(Debug)]
struct SlidingWindow {
    limit: u64,
    per: Duration,
    entries: VecDeque<(Instant, u64)>,
    sum: u64,
}

impl SlidingWindow {
    fn new(limit: RateLimit) -> Self {
        Self { limit: limit.limit, per: limit.per, entries: VecDeque::new(), sum: 0 }
    }

    fn prune(&mut self, now: Instant) {
        while let Some(&(at, amount)) = self.entries.front() {
            if at + self.per > now {
                break;
            }
            self.entries.pop_front();
            self.sum -= amount;
        }
    }

    /// `None` if `amount` fits now, else the earliest time it will fit.
    fn wait_until(&mut self, now: Instant, amount: u64) -> Option<Instant> {
        self.prune(now);
        let fits = |sum: u64| sum == 0 || sum + amount <= self.limit;
        if fits(self.sum) {
            return None;
        }
        let mut sum = self.sum;
        for &(at, entry) in &self.entries {
            sum -= entry;
            if fits(sum) {
                return Some(at + self.per);
            }
        }
        Some(now)
    }

    fn record(&mut self, now: Instant, amount: u64) {
        self.entries.push_back((now, amount));
        self.sum += amount;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(limit: u64, per_ms: u64) -> SlidingWindow {
        SlidingWindow::new(RateLimit { limit, per: Duration::from_millis(per_ms), excess: Excess::Discard })
    }

    #[test]
    fn a_sliding_window_admits_the_limit_then_waits_for_the_oldest_entry_to_expire() {
        let t0 = Instant::now();
        let mut w = window(3, 1000);
        for i in 0..3 {
            let at = t0 + Duration::from_millis(100 * i);
            assert_eq!(w.wait_until(at, 1), None);
            w.record(at, 1);
        }
        let late = t0 + Duration::from_millis(900);
        assert_eq!(w.wait_until(late, 1), Some(t0 + Duration::from_millis(1000)));
        // The first entry has left the window one second after it came.
        assert_eq!(w.wait_until(t0 + Duration::from_millis(1000), 1), None);
    }

    #[test]
    fn a_sliding_window_has_no_boundary_where_two_windows_worth_fit() {
        let t0 = Instant::now();
        let mut w = window(2, 1000);
        let edge = t0 + Duration::from_millis(999);
        w.record(edge, 1);
        w.record(edge, 1);
        // A fixed one-second window would reset at t0 + 1 s; this one does not.
        assert!(w.wait_until(t0 + Duration::from_millis(1001), 1).is_some());
        assert_eq!(w.wait_until(edge + Duration::from_millis(1000), 1), None);
    }

    #[test]
    fn a_byte_window_waits_until_enough_bytes_have_expired_and_admits_an_oversized_packet_alone() {
        let t0 = Instant::now();
        let mut w = window(1000, 1000);
        w.record(t0, 400);
        w.record(t0 + Duration::from_millis(10), 400);
        assert_eq!(w.wait_until(t0 + Duration::from_millis(20), 300), Some(t0 + Duration::from_millis(1000)));
        assert_eq!(w.wait_until(t0 + Duration::from_millis(20), 700), Some(t0 + Duration::from_millis(1010)));
        let mut empty = window(1000, 1000);
        assert_eq!(empty.wait_until(t0, 5000), None);
    }

    #[test]
    fn metering_rounds_up_to_whole_units_and_bills_at_least_one() {
        let m = Metering::Chunks { unit_bytes: 5 * 1024, counted: MeteredBytes::Payload };
        assert_eq!(m.units(0), 1);
        assert_eq!(m.units(5 * 1024), 1);
        assert_eq!(m.units(5 * 1024 + 1), 2);
        assert_eq!(m.units(12 * 1024), 3);
        assert_eq!(Metering::PerPublish.units(1 << 20), 1);
    }

    #[test]
    fn aws_topic_rules_allow_seven_slashes_and_refuse_eight_a_long_topic_and_the_dollar_prefix() {
        let aws = CloudProfile::aws_iot_core();
        assert_eq!(check_topic(&aws, "c", "a/b/c/d/e/f/g/h"), Ok(()));
        assert_eq!(check_topic(&aws, "c", "a/b/c/d/e/f/g/h/i"), Err(CloseReason::TopicTooDeep));
        assert_eq!(check_topic(&aws, "c", &"x".repeat(257)), Err(CloseReason::TopicTooLong));
        assert_eq!(check_topic(&aws, "c", "$aws/things/t/shadow/update"), Err(CloseReason::ReservedTopic));
    }

    #[test]
    fn iot_hub_accepts_only_its_device_events_topic_for_the_connected_device() {
        let hub = CloudProfile::azure_iot_hub();
        assert_eq!(check_topic(&hub, "dev1", "devices/dev1/messages/events/"), Ok(()));
        assert_eq!(check_topic(&hub, "dev1", "devices/dev1/messages/events/a=1&b=2"), Ok(()));
        assert_eq!(check_topic(&hub, "dev1", "devices/dev2/messages/events/"), Err(CloseReason::TopicNotAllowed));
        assert_eq!(check_topic(&hub, "dev1", "ferry/dev1/temp"), Err(CloseReason::TopicNotAllowed));
    }

    #[test]
    fn iot_hub_meters_the_payload_and_the_property_bag_not_the_fixed_topic() {
        let hub = CloudProfile::azure_iot_hub();
        let view = PublishView {
            qos: 1,
            retain: false,
            pkid: 1,
            topic: "devices/d/messages/events/k=v".to_owned(),
            topic_alias: None,
            payload_len: 4096,
            metered_properties: 0,
        };
        assert_eq!(metered_bytes(&hub, "d", &view), 4099);
        assert_eq!(hub.metering.units(metered_bytes(&hub, "d", &view)), 2);
    }

    #[test]
    fn fixed_headers_parse_lengths_wait_for_more_bytes_and_refuse_a_fifth_length_byte() {
        assert_eq!(fixed_header(&[0x30]).unwrap(), None);
        assert_eq!(fixed_header(&[0x30, 0x05]).unwrap(), Some((2, 5)));
        assert_eq!(fixed_header(&[0x30, 0xC1, 0x02]).unwrap(), Some((3, 321)));
        assert_eq!(fixed_header(&[0x30, 0xFF, 0xFF]).unwrap(), None);
        assert!(fixed_header(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]).is_err());
    }

    #[test]
    fn the_connack_rewrite_sets_the_profiles_limits_and_keeps_the_upstreams_other_properties() {
        let mut props = empty_connack_properties();
        props.receive_max = Some(20);
        props.topic_alias_max = Some(10);
        props.assigned_client_identifier = Some("auto-1".to_owned());
        props.server_keep_alive = Some(60);
        let limits = ConnackLimits { receive_maximum: Some(100), maximum_qos: Some(1), ..ConnackLimits::default() };

        apply_connack_limits(&mut props, limits);

        assert_eq!((props.receive_max, props.max_qos), (Some(100), Some(1)));
        assert_eq!(props.topic_alias_max, Some(10), "a limit the profile leaves unset keeps the upstream's value");
        assert_eq!(props.assigned_client_identifier.as_deref(), Some("auto-1"));
        assert_eq!(props.server_keep_alive, Some(60));
    }

    #[test]
    fn qos_and_retain_rules_close_on_what_the_cloud_does_not_support() {
        let view = |qos, retain| PublishView {
            qos,
            retain,
            pkid: 1,
            topic: "t".to_owned(),
            topic_alias: None,
            payload_len: 1,
            metered_properties: 0,
        };
        let grid = CloudProfile::azure_event_grid();
        assert_eq!(check_rules(&grid, Version::V5, "c", &view(1, false), 10), Ok(()));
        assert_eq!(check_rules(&grid, Version::V5, "c", &view(2, false), 10), Err(CloseReason::QosNotSupported));
        assert_eq!(check_rules(&grid, Version::V311, "c", &view(1, true), 10), Err(CloseReason::RetainNotSupported));
        // Over MQTT 5 the announced Maximum Packet Size binds the whole packet.
        let over = 512 * 1024 + 1;
        assert_eq!(check_rules(&grid, Version::V5, "c", &view(1, false), over), Err(CloseReason::PacketTooLarge));
        assert_eq!(check_rules(&grid, Version::V311, "c", &view(1, false), over), Ok(()));
    }

    #[test]
    fn scaling_the_inflight_limit_also_changes_the_announced_receive_maximum() {
        let aws = CloudProfile::aws_iot_core().with_max_inflight(5);
        assert_eq!(aws.max_inflight, Some(5));
        assert_eq!(aws.connack.unwrap().receive_maximum, Some(5));
        let scaled = CloudProfile::azure_iot_hub().with_publish_rate(7);
        assert_eq!(scaled.publish_rate, Some(RateLimit::per_second(7, Excess::Delay)));
    }
}
