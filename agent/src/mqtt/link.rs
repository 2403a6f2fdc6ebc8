//! One MQTT connection, for either protocol version, over TCP or TLS.
//!
//! Wraps rumqttc's v3.1.1 and v5 clients behind one small surface: queue a
//! publish, subscribe, acknowledge, and poll for what happened. A [`Link`] is
//! one connection attempt: when it fails the caller drops it and builds a new
//! one, so no client-library state (its pending queue, packet-id collisions)
//! ever outlives a connection. The store decides what is sent again.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS as V5QoS;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use rumqttc::{QoS, TlsConfiguration, Transport};

use crate::config::{MqttEndpoint, Protocol};

/// Why a link could not be set up or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// TLS material could not be loaded.
    #[error("TLS setup: {0}")]
    Tls(String),
    /// The connection failed or dropped.
    #[error("{0}")]
    Connection(String),
    /// The broker refused the connection.
    #[error("broker refused the connection: {0}")]
    Refused(String),
    /// The client's request queue is full (the caller sends too much).
    #[error("client queue full")]
    QueueFull,
}

/// A message received on a subscription.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// MQTT 5 user properties (empty on 3.1.1).
    pub user_properties: Vec<(String, String)>,
    /// MQTT 5 content type.
    pub content_type: Option<String>,
    /// Packet id (0 for QoS 0).
    pub pkid: u16,
    /// Whether the broker marked it as a redelivery.
    pub dup: bool,
    /// Whether it is a retained message.
    pub retain: bool,
    raw: RawPublish,
}

impl Incoming {
    /// A message as an MQTT 3.1.1 subscription would deliver it, for tests
    /// of what consumes messages.
    #[cfg(test)]
    pub(crate) fn v311(topic: &str, payload: &[u8], pkid: u16) -> Self {
        let mut p = rumqttc::Publish::new(topic, QoS::AtLeastOnce, payload.to_vec());
        p.pkid = pkid;
        Self {
            topic: topic.to_owned(),
            payload: p.payload.clone(),
            user_properties: Vec::new(),
            content_type: None,
            pkid,
            dup: false,
            retain: false,
            raw: RawPublish::V4(p),
        }
    }
}

impl Incoming {
    /// Where an MQTT 5 sender asked for an answer: its Response Topic, and
    /// the Correlation Data to send back with it. `None` on MQTT 3.1.1.
    pub fn reply_to(&self) -> Option<(String, Option<Bytes>)> {
        match &self.raw {
            RawPublish::V4(_) => None,
            RawPublish::V5(p) => {
                let props = p.properties.as_ref()?;
                let topic = props.response_topic.clone()?;
                Some((topic, props.correlation_data.clone()))
            }
        }
    }
}

#[derive(Debug, Clone)]
enum RawPublish {
    V4(rumqttc::Publish),
    V5(rumqttc::v5::mqttbytes::v5::Publish),
}

/// What polling a link produced.
#[derive(Debug)]
pub enum LinkEvent {
    /// The broker accepted the connection.
    Connected {
        /// Whether the broker kept a session for this client id.
        session_present: bool,
        /// The limits the broker stated in its CONNACK (MQTT 5; none on 3.1.1).
        limits: BrokerLimits,
    },
    /// A queued publish went out with this packet id (in queue order).
    Sent(u16),
    /// The broker acknowledged the publish with this packet id.
    Acked(u16),
    /// The broker answered the publish with this packet id with an MQTT 5
    /// reason code that refuses it.
    Refused {
        /// The publish.
        pkid: u16,
        /// What kind of refusal the reason code is.
        kind: RefusalKind,
        /// The reason code, as MQTT names it.
        reason: String,
    },
    /// The broker acknowledged a subscription.
    Subscribed,
    /// The broker refused a subscription (its ACL, or a topic it does not
    /// have). The connection stays up: what the owner does about it is its own.
    SubscribeRefused(String),
    /// A message arrived on a subscription.
    Message(Box<Incoming>),
    /// The broker answered a ping: it is alive and reading this connection.
    Pong,
    /// Anything else (our own pings and acks).
    Other,
}

/// What an MQTT 5 broker's refusal of one publish means for sending it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// The message itself is refused (not authorised, invalid topic or
    /// payload): sending it again cannot succeed.
    Message,
    /// The broker is over a quota: the same message may pass later.
    Quota,
    /// An unspecified or implementation-specific error.
    Other,
}

/// What an MQTT 5 broker states about itself in its CONNACK. Every field is
/// `None` when it stated nothing (and always on MQTT 3.1.1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BrokerLimits {
    /// Maximum Packet Size it accepts.
    pub max_packet_size: Option<u32>,
    /// Receive Maximum: QoS 1 publishes it takes unacknowledged at once.
    pub receive_maximum: Option<u16>,
    /// Topic Alias Maximum.
    pub topic_alias_maximum: Option<u16>,
    /// Whether it keeps retained messages.
    pub retain_available: Option<bool>,
    /// The highest QoS it accepts.
    pub maximum_qos: Option<u8>,
}

/// Options for opening a link.
#[derive(Debug, Clone)]
pub struct LinkOptions {
    /// Most publishes awaiting PUBACK at once.
    pub inflight: u16,
    /// Capacity of the client's request queue.
    pub queue: usize,
    /// Start a clean session (forwarding) or resume one (subscriptions that
    /// must not miss messages while down).
    pub clean_session: bool,
    /// Acknowledge received messages only when told to.
    pub manual_acks: bool,
    /// Most unacknowledged QoS 1 messages the broker may send us at once
    /// (MQTT 5 `Receive Maximum`; 3.1.1 has no such setting and the
    /// broker's own limit applies). `None` leaves the protocol default.
    pub receive_maximum: Option<u16>,
}

/// One connection attempt to a broker.
pub struct Link {
    inner: Inner,
    /// Whether the broker has answered the CONNECT.
    connected: bool,
}

enum Inner {
    V4(rumqttc::AsyncClient, Box<rumqttc::EventLoop>),
    V5(rumqttc::v5::AsyncClient, Box<rumqttc::v5::EventLoop>),
}

fn connection_timeout(e: &MqttEndpoint) -> u64 {
    e.keep_alive.as_secs().clamp(5, 30)
}

/// Most requests (publishes, acks) one socket write carries: rumqttc
/// writes those already queued behind the first before it flushes (our
/// patch of it, docs/design.md#mqtt-writes), so a busy link costs one
/// syscall per batch and a quiet one waits for nothing.
const MAX_WRITE_BATCH: usize = 64;

impl Link {
    /// Prepares a connection; it is made by the first [`Link::poll`].
    pub fn open(e: &MqttEndpoint, tls: Option<&Arc<rustls::ClientConfig>>, opts: &LinkOptions) -> Self {
        let transport = || match tls {
            Some(c) => Transport::tls_with_config(TlsConfiguration::Rustls(c.clone())),
            None => Transport::tcp(),
        };
        let inner = match e.protocol {
            Protocol::V311 => {
                let mut o = rumqttc::MqttOptions::new(&e.client_id, &e.host, e.port);
                o.set_keep_alive(e.keep_alive.max(Duration::from_secs(1)))
                    .set_clean_session(opts.clean_session)
                    .set_max_packet_size(e.max_packet_bytes, e.max_packet_bytes)
                    .set_inflight(opts.inflight.max(1))
                    .set_max_request_batch(MAX_WRITE_BATCH)
                    .set_request_channel_capacity(opts.queue)
                    .set_manual_acks(opts.manual_acks)
                    .set_transport(transport());
                if let Some(user) = &e.username {
                    o.set_credentials(user, e.password.as_ref().map_or("", |p| p.expose()));
                }
                let (client, mut eventloop) = rumqttc::AsyncClient::new(o, opts.queue);
                let mut net = eventloop.network_options();
                net.set_connection_timeout(connection_timeout(e));
                eventloop.set_network_options(net);
                Inner::V4(client, Box::new(eventloop))
            }
            Protocol::V5 => {
                let mut o = rumqttc::v5::MqttOptions::new(&e.client_id, &e.host, e.port);
                o.set_keep_alive(e.keep_alive.max(Duration::from_secs(1)))
                    .set_clean_start(opts.clean_session)
                    .set_max_packet_size(Some(e.max_packet_bytes as u32))
                    .set_outgoing_inflight_upper_limit(opts.inflight.max(1))
                    .set_max_request_batch(MAX_WRITE_BATCH)
                    .set_request_channel_capacity(opts.queue)
                    .set_manual_acks(opts.manual_acks)
                    .set_transport(transport());
                if opts.receive_maximum.is_some() {
                    o.set_receive_maximum(opts.receive_maximum);
                }
                if !opts.clean_session {
                    // Keep the session while we are away, so queued QoS 1 messages wait for us.
                    o.set_session_expiry_interval(Some(u32::MAX));
                }
                if let Some(user) = &e.username {
                    o.set_credentials(user, e.password.as_ref().map_or("", |p| p.expose()));
                }
                o.set_connection_timeout(connection_timeout(e));
                let (client, eventloop) = rumqttc::v5::AsyncClient::new(o, opts.queue);
                Inner::V5(client, Box::new(eventloop))
            }
        };
        Self { inner, connected: false }
    }

    /// Drives the connection until something happens.
    pub async fn poll(&mut self) -> Result<LinkEvent, LinkError> {
        let connected = &mut self.connected;
        match &mut self.inner {
            Inner::V4(_, el) => {
                use rumqttc::{Event, Outgoing, Packet};
                let event = el.poll().await;
                if matches!(event, Ok(Event::Incoming(Packet::ConnAck(_)))) {
                    *connected = true;
                }
                match event {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => Ok(LinkEvent::Connected {
                        session_present: ack.session_present,
                        limits: BrokerLimits::default(),
                    }),
                    Ok(Event::Incoming(Packet::PubAck(ack))) => Ok(LinkEvent::Acked(ack.pkid)),
                    Ok(Event::Incoming(Packet::SubAck(ack))) => {
                        if ack.return_codes.iter().any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) {
                            return Ok(LinkEvent::SubscribeRefused(format!("packet {}: failure", ack.pkid)));
                        }
                        Ok(LinkEvent::Subscribed)
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => Ok(LinkEvent::Message(Box::new(Incoming {
                        topic: p.topic.clone(),
                        payload: p.payload.clone(),
                        user_properties: Vec::new(),
                        content_type: None,
                        pkid: p.pkid,
                        dup: p.dup,
                        retain: p.retain,
                        raw: RawPublish::V4(p),
                    }))),
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => Ok(LinkEvent::Sent(pkid)),
                    Ok(Event::Incoming(Packet::PingResp)) => Ok(LinkEvent::Pong),
                    Ok(_) => Ok(LinkEvent::Other),
                    Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
                        Err(LinkError::Refused(format!("{code:?}")))
                    }
                    Err(e) => Err(LinkError::Connection(unanswered(*connected, "3.1.1", e.to_string()))),
                }
            }
            Inner::V5(_, el) => {
                use rumqttc::v5::mqttbytes::v5::Packet;
                use rumqttc::v5::{Event, mqttbytes::v5::ConnectReturnCode};
                let event = el.poll().await;
                if matches!(event, Ok(Event::Incoming(Packet::ConnAck(_)))) {
                    *connected = true;
                }
                match event {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        if ack.code != ConnectReturnCode::Success {
                            return Err(LinkError::Refused(format!("{:?}", ack.code)));
                        }
                        let limits = ack.properties.as_ref().map_or_else(BrokerLimits::default, |p| BrokerLimits {
                            max_packet_size: p.max_packet_size,
                            receive_maximum: p.receive_max,
                            topic_alias_maximum: p.topic_alias_max,
                            retain_available: p.retain_available.map(|r| r != 0),
                            maximum_qos: p.max_qos,
                        });
                        Ok(LinkEvent::Connected { session_present: ack.session_present, limits })
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        use rumqttc::v5::mqttbytes::v5::PubAckReason;
                        match ack.reason {
                            PubAckReason::Success | PubAckReason::NoMatchingSubscribers => {
                                Ok(LinkEvent::Acked(ack.pkid))
                            }
                            // The message itself is what the broker will not take.
                            reason => {
                                let kind = match reason {
                                    PubAckReason::NotAuthorized
                                    | PubAckReason::TopicNameInvalid
                                    | PubAckReason::PayloadFormatInvalid => RefusalKind::Message,
                                    PubAckReason::QuotaExceeded => RefusalKind::Quota,
                                    _ => RefusalKind::Other,
                                };
                                Ok(LinkEvent::Refused { pkid: ack.pkid, kind, reason: format!("{reason:?}") })
                            }
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(ack))) => {
                        use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode as C;
                        if ack.return_codes.iter().any(|c| !matches!(c, C::Success(_))) {
                            return Ok(LinkEvent::SubscribeRefused(format!(
                                "packet {}: {:?}",
                                ack.pkid, ack.return_codes
                            )));
                        }
                        Ok(LinkEvent::Subscribed)
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let props = p.properties.clone().unwrap_or_default();
                        Ok(LinkEvent::Message(Box::new(Incoming {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            payload: p.payload.clone(),
                            user_properties: props.user_properties,
                            content_type: props.content_type,
                            pkid: p.pkid,
                            dup: p.dup,
                            retain: p.retain,
                            raw: RawPublish::V5(p),
                        })))
                    }
                    Ok(Event::Incoming(Packet::Disconnect(d))) => {
                        Err(LinkError::Connection(format!("broker disconnected: {:?}", d.reason_code)))
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Publish(pkid))) => Ok(LinkEvent::Sent(pkid)),
                    Ok(Event::Incoming(Packet::PingResp(_))) => Ok(LinkEvent::Pong),
                    Ok(_) => Ok(LinkEvent::Other),
                    Err(rumqttc::v5::ConnectionError::ConnectionRefused(code)) => {
                        Err(LinkError::Refused(format!("{code:?}")))
                    }
                    Err(e) => Err(LinkError::Connection(unanswered(*connected, "5", e.to_string()))),
                }
            }
        }
    }

    /// Queues a QoS 1 publish without waiting; it goes out on a later poll.
    /// `content_type` and `user_properties` are used on MQTT 5 only.
    pub fn publish(
        &self,
        topic: String,
        payload: Vec<u8>,
        content_type: Option<String>,
        user_properties: Vec<(String, String)>,
        retain: bool,
    ) -> Result<(), LinkError> {
        let ok = match &self.inner {
            Inner::V4(c, _) => c.try_publish(topic, QoS::AtLeastOnce, retain, payload).is_ok(),
            Inner::V5(c, _) => {
                let props = PublishProperties { content_type, user_properties, ..Default::default() };
                c.try_publish_with_properties(topic, V5QoS::AtLeastOnce, retain, payload, props).is_ok()
            }
        };
        if ok { Ok(()) } else { Err(LinkError::QueueFull) }
    }

    /// Queues a QoS 1 answer to a message's Response Topic: JSON, with its
    /// Correlation Data. MQTT 5 only (3.1.1 has neither).
    pub fn publish_reply(&self, topic: String, payload: Vec<u8>, correlation: Option<Bytes>) -> Result<(), LinkError> {
        let ok = match &self.inner {
            Inner::V4(..) => true,
            Inner::V5(c, _) => {
                let props = PublishProperties {
                    content_type: Some("application/json".into()),
                    correlation_data: correlation,
                    ..Default::default()
                };
                c.try_publish_with_properties(topic, V5QoS::AtLeastOnce, false, payload, props).is_ok()
            }
        };
        if ok { Ok(()) } else { Err(LinkError::QueueFull) }
    }

    /// Queues a QoS 1 subscription.
    pub fn subscribe(&self, filter: &str) -> Result<(), LinkError> {
        let ok = match &self.inner {
            Inner::V4(c, _) => c.try_subscribe(filter, QoS::AtLeastOnce).is_ok(),
            Inner::V5(c, _) => c.try_subscribe(filter, V5QoS::AtLeastOnce).is_ok(),
        };
        if ok { Ok(()) } else { Err(LinkError::QueueFull) }
    }

    /// Queues the removal of a subscription.
    pub fn unsubscribe(&self, filter: &str) -> Result<(), LinkError> {
        let ok = match &self.inner {
            Inner::V4(c, _) => c.try_unsubscribe(filter).is_ok(),
            Inner::V5(c, _) => c.try_unsubscribe(filter).is_ok(),
        };
        if ok { Ok(()) } else { Err(LinkError::QueueFull) }
    }

    /// Acknowledges a received message (with manual acks).
    pub fn ack(&self, message: &Incoming) -> Result<(), LinkError> {
        let ok = match (&self.inner, &message.raw) {
            (Inner::V4(c, _), RawPublish::V4(p)) => c.try_ack(p).is_ok(),
            (Inner::V5(c, _), RawPublish::V5(p)) => c.try_ack(p).is_ok(),
            _ => false,
        };
        if ok { Ok(()) } else { Err(LinkError::QueueFull) }
    }
}

/// A connection error, saying so when the broker never answered the
/// CONNECT: a broker that does not speak that MQTT version closes the
/// connection or stays silent (RabbitMQ 3.10, NATS 2.9, aedes, amqtt on 5).
fn unanswered(connected: bool, version: &str, error: String) -> String {
    if connected { error } else { format!("no CONNACK ({error}): is the broker up, and does it speak MQTT {version}?") }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::config::Config;

    /// A 3.1.1 server that accepts the connection and refuses every
    /// subscription (SUBACK return code 0x80), as a broker's ACL may.
    async fn refusing_broker() -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 512];
            let mut connected = false;
            loop {
                let n = socket.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    return;
                }
                if !connected {
                    connected = true;
                    socket.write_all(&[0x20, 0x02, 0x00, 0x00]).await.unwrap();
                } else if buf[0] >> 4 == 8 {
                    // SUBSCRIBE: fixed header, remaining length (one byte here), packet id.
                    let (hi, lo) = (buf[2], buf[3]);
                    socket.write_all(&[0x90, 0x03, hi, lo, 0x80]).await.unwrap();
                }
            }
        });
        port
    }

    #[tokio::test]
    async fn a_refused_subscription_is_an_event_and_the_link_stays_up() {
        let port = refusing_broker().await;
        let toml = format!("[[destination]]\nname = \"b\"\nurl = \"mqtt://127.0.0.1:{port}\"\nprotocol = \"3.1.1\"\n");
        let endpoint = Config::parse(&toml, "test").unwrap().destinations.remove(0).endpoint;
        let opts =
            LinkOptions { inflight: 4, queue: 8, clean_session: true, manual_acks: false, receive_maximum: None };
        let mut link = Link::open(&endpoint, None, &opts);
        let next = async |link: &mut Link| loop {
            match link.poll().await {
                Ok(LinkEvent::Other | LinkEvent::Pong | LinkEvent::Sent(_)) => {}
                other => return other,
            }
        };
        assert!(matches!(next(&mut link).await, Ok(LinkEvent::Connected { .. })));
        link.subscribe("ferry/gw/desired/#").unwrap();
        match next(&mut link).await {
            Ok(LinkEvent::SubscribeRefused(reason)) => assert!(reason.contains("failure"), "{reason}"),
            other => panic!("expected a refused subscription, got {other:?}"),
        }
        // Still usable: a second subscription goes out and is answered on the same connection.
        link.subscribe("ferry/gw/fleet/#").unwrap();
        assert!(matches!(next(&mut link).await, Ok(LinkEvent::SubscribeRefused(_))));
    }
}
