//! MQTT client side of the harness: a collecting subscriber and client helpers.
//!
//! [`Collector`] owns one rumqttc connection and a background task that
//! records every publish it receives. The helpers build rumqttc options from
//! `mqtt://` / `mqtts://` URLs so tests need not repeat host/port/TLS plumbing.
//! TLS always uses the ring provider (see [`crate::tls`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use rumqttc::v5::mqttbytes::v5 as mqtt5;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// How long a [`Collector`] waits for its SUBACK before giving up.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between reconnect attempts of a [`Collector`] after a connection error.
const RECONNECT_PAUSE: Duration = Duration::from_millis(200);

/// MQTT protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// MQTT 3.1.1.
    V311,
    /// MQTT 5.0.
    V5,
}

/// Largest packet the harness's clients take: room for a large batch of events.
const MAX_PACKET: usize = 1 << 20;

/// One publish as a [`Collector`] received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// Topic the message was published to.
    pub topic: String,
    /// Payload bytes.
    pub payload: Vec<u8>,
    /// MQTT 5 user properties in wire order; empty for MQTT 3.1.1.
    pub user_properties: Vec<(String, String)>,
    /// MQTT 5 content type; `None` for MQTT 3.1.1.
    pub content_type: Option<String>,
    /// QoS the message was delivered with (0, 1 or 2).
    pub qos: u8,
    /// Retain flag as delivered.
    pub retain: bool,
    /// When the collector's event loop saw it.
    pub received_at: Instant,
}

impl Received {
    /// The payload as UTF-8 (lossy), for assertions and messages.
    pub fn payload_str(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }

    /// The value of the first user property called `name`.
    pub fn user_property(&self, name: &str) -> Option<&str> {
        self.user_properties.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// A subscriber that records every publish matching its filter.
///
/// Subscribes with QoS 1 and returns only after the broker's SUBACK, so a
/// message published after `start` returns is not missed. It reconnects on
/// its own (resubscribing when the broker lost the session), but with a clean
/// session, so messages published while it is disconnected are not counted.
/// The background task is aborted on drop.
#[derive(Debug)]
pub struct Collector {
    shared: Arc<Shared>,
    count: watch::Receiver<usize>,
    task: JoinHandle<()>,
}

#[derive(Debug)]
struct Shared {
    messages: Mutex<Vec<Received>>,
    count: watch::Sender<usize>,
    connection_errors: AtomicU64,
}

impl Shared {
    fn record(&self, msg: Received) {
        // The count is published after the lock is released: a waiter holds
        // the count's lock while it reads the messages (see `wait_for`).
        let len = {
            let mut messages = self.messages.lock().expect("collector lock");
            messages.push(msg);
            messages.len()
        };
        self.count.send_replace(len);
    }
}

impl Collector {
    /// Connects to a plain `mqtt://host:port` broker and subscribes to `topic_filter`.
    pub async fn start(url: &str, topic_filter: &str, protocol: Protocol) -> anyhow::Result<Self> {
        Self::start_with_tls(url, topic_filter, protocol, None).await
    }

    /// Like [`start`](Self::start), for `mqtts://` URLs with the given TLS config.
    pub async fn start_with_tls(
        url: &str,
        topic_filter: &str,
        protocol: Protocol,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> anyhow::Result<Self> {
        let (count_tx, count) = watch::channel(0);
        let shared = Arc::new(Shared {
            messages: Mutex::new(Vec::new()),
            count: count_tx,
            connection_errors: AtomicU64::new(0),
        });
        let (ready_tx, ready_rx) = oneshot::channel();
        let client_id = unique_client_id("collector");
        let filter = topic_filter.to_owned();
        let task = match protocol {
            Protocol::V311 => {
                let opts = options_v311(url, &client_id, tls)?;
                tokio::spawn(run_v311(opts, filter, shared.clone(), ready_tx))
            }
            Protocol::V5 => {
                let opts = options_v5(url, &client_id, tls)?;
                tokio::spawn(run_v5(opts, filter, shared.clone(), ready_tx))
            }
        };
        let collector = Self { shared, count, task };
        match tokio::time::timeout(SUBSCRIBE_TIMEOUT, ready_rx).await {
            Ok(Ok(Ok(()))) => Ok(collector),
            Ok(Ok(Err(e))) => Err(e.context(format!("collector on {url}"))),
            Ok(Err(_)) => bail!("collector task on {url} ended before subscribing"),
            Err(_) => bail!("collector on {url}: no SUBACK within {SUBSCRIBE_TIMEOUT:?}"),
        }
    }

    /// A snapshot of everything received so far, in arrival order.
    pub fn messages(&self) -> Vec<Received> {
        self.shared.messages.lock().expect("collector lock").clone()
    }

    /// How many messages were received so far.
    pub fn len(&self) -> usize {
        *self.count.borrow()
    }

    /// Whether nothing was received yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many connection errors the collector's own link has seen.
    pub fn connection_errors(&self) -> u64 {
        self.shared.connection_errors.load(Ordering::Relaxed)
    }

    /// Waits until at least `count` messages arrived and returns all of them,
    /// or fails after `timeout` listing what did arrive.
    pub async fn wait_for(&self, count: usize, timeout: Duration) -> anyhow::Result<Vec<Received>> {
        let mut rx = self.count.clone();
        // The count's guard is dropped here, before the messages are locked.
        let waited = tokio::time::timeout(timeout, rx.wait_for(|n| *n >= count)).await.map(|r| r.map(drop));
        match waited {
            Ok(Ok(_)) => Ok(self.messages()),
            Ok(Err(_)) => bail!("collector task ended"),
            Err(_) => {
                let got = self.messages();
                let topics: Vec<_> = got.iter().map(|m| m.topic.as_str()).collect();
                bail!("expected {count} messages within {timeout:?}, got {}: {topics:?}", got.len())
            }
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run_v311(
    opts: rumqttc::MqttOptions,
    filter: String,
    shared: Arc<Shared>,
    ready: oneshot::Sender<anyhow::Result<()>>,
) {
    use rumqttc::{Event, Packet, QoS, SubscribeReasonCode};
    let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 64);
    let mut ready = Some(ready);
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                // A fresh session has no subscription: (re)subscribe.
                if !ack.session_present
                    && let Err(e) = client.subscribe(&filter, QoS::AtLeastOnce).await
                {
                    report(&mut ready, Err(anyhow::anyhow!("subscribe: {e}")));
                    return;
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let ok = ack.return_codes.iter().all(|c| matches!(c, SubscribeReasonCode::Success(_)));
                let result =
                    if ok { Ok(()) } else { Err(anyhow::anyhow!("subscription to {filter} refused: {ack:?}")) };
                report(&mut ready, result);
            }
            Ok(Event::Incoming(Packet::Publish(p))) => shared.record(Received {
                topic: p.topic,
                payload: p.payload.to_vec(),
                user_properties: Vec::new(),
                content_type: None,
                qos: p.qos as u8,
                retain: p.retain,
                received_at: Instant::now(),
            }),
            Ok(_) => {}
            Err(e) => {
                shared.connection_errors.fetch_add(1, Ordering::Relaxed);
                if ready.is_some() {
                    report(&mut ready, Err(anyhow::anyhow!("connect: {e}")));
                    return;
                }
                tokio::time::sleep(RECONNECT_PAUSE).await;
            }
        }
    }
}

async fn run_v5(
    opts: rumqttc::v5::MqttOptions,
    filter: String,
    shared: Arc<Shared>,
    ready: oneshot::Sender<anyhow::Result<()>>,
) {
    use mqtt5::{Packet, SubscribeReasonCode};
    use rumqttc::v5::Event;
    use rumqttc::v5::mqttbytes::QoS;
    let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(opts, 64);
    let mut ready = Some(ready);
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                if !ack.session_present
                    && let Err(e) = client.subscribe(&filter, QoS::AtLeastOnce).await
                {
                    report(&mut ready, Err(anyhow::anyhow!("subscribe: {e}")));
                    return;
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let ok = ack.return_codes.iter().all(|c| matches!(c, SubscribeReasonCode::Success(_)));
                let result =
                    if ok { Ok(()) } else { Err(anyhow::anyhow!("subscription to {filter} refused: {ack:?}")) };
                report(&mut ready, result);
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let props = p.properties.unwrap_or_default();
                shared.record(Received {
                    topic: String::from_utf8_lossy(&p.topic).into_owned(),
                    payload: p.payload.to_vec(),
                    user_properties: props.user_properties,
                    content_type: props.content_type,
                    qos: p.qos as u8,
                    retain: p.retain,
                    received_at: Instant::now(),
                });
            }
            Ok(_) => {}
            Err(e) => {
                shared.connection_errors.fetch_add(1, Ordering::Relaxed);
                if ready.is_some() {
                    report(&mut ready, Err(anyhow::anyhow!("connect: {e}")));
                    return;
                }
                tokio::time::sleep(RECONNECT_PAUSE).await;
            }
        }
    }
}

fn report(ready: &mut Option<oneshot::Sender<anyhow::Result<()>>>, result: anyhow::Result<()>) {
    if let Some(tx) = ready.take() {
        let _ = tx.send(result);
    }
}

/// A client id unique within this process (tests run in parallel).
pub fn unique_client_id(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("ferry-{prefix}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Splits `mqtt://host:port` or `mqtts://host:port` into (host, port, tls).
pub fn parse_url(url: &str) -> anyhow::Result<(String, u16, bool)> {
    let (rest, tls) = if let Some(r) = url.strip_prefix("mqtt://") {
        (r, false)
    } else if let Some(r) = url.strip_prefix("mqtts://") {
        (r, true)
    } else {
        bail!("{url}: expected mqtt://host:port or mqtts://host:port");
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = rest.rsplit_once(':').with_context(|| format!("{url}: missing port"))?;
    let port = port.parse().with_context(|| format!("{url}: bad port {port:?}"))?;
    Ok((host.to_owned(), port, tls))
}

fn transport(url: &str, tls_url: bool, tls: Option<Arc<rustls::ClientConfig>>) -> anyhow::Result<rumqttc::Transport> {
    match (tls_url, tls) {
        (false, None) => Ok(rumqttc::Transport::Tcp),
        (true, Some(config)) => Ok(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(config))),
        (true, None) => bail!("{url}: mqtts:// needs a TLS client config"),
        (false, Some(_)) => bail!("{url}: a TLS client config needs an mqtts:// URL"),
    }
}

/// MQTT 3.1.1 options for `url` (clean session, 5 s keep-alive).
/// `tls` is required for `mqtts://` and refused for `mqtt://`.
pub fn options_v311(
    url: &str,
    client_id: &str,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> anyhow::Result<rumqttc::MqttOptions> {
    let (host, port, tls_url) = parse_url(url)?;
    let mut opts = rumqttc::MqttOptions::new(client_id, host, port);
    opts.set_keep_alive(Duration::from_secs(5));
    // rumqttc's default (10 KiB) refuses a batch of events as malformed.
    opts.set_max_packet_size(MAX_PACKET, MAX_PACKET);
    opts.set_transport(transport(url, tls_url, tls)?);
    Ok(opts)
}

/// MQTT 5 options for `url` (clean start, 5 s keep-alive).
/// `tls` is required for `mqtts://` and refused for `mqtt://`.
pub fn options_v5(
    url: &str,
    client_id: &str,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> anyhow::Result<rumqttc::v5::MqttOptions> {
    let (host, port, tls_url) = parse_url(url)?;
    let mut opts = rumqttc::v5::MqttOptions::new(client_id, host, port);
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_max_packet_size(Some(MAX_PACKET as u32));
    opts.set_transport(transport(url, tls_url, tls)?);
    Ok(opts)
}

/// Connects once (MQTT 3.1.1) and reports whether the broker answered with a
/// successful CONNACK within `timeout`. The error text names the cause
/// (TLS, I/O, refused, timeout) for assertions and failure messages.
pub async fn try_connect(opts: rumqttc::MqttOptions, timeout: Duration) -> anyhow::Result<()> {
    let (_client, mut eventloop) = rumqttc::AsyncClient::new(opts, 8);
    let attempt = async {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(anyhow::Error::new(e).context("connection failed")),
            }
        }
    };
    tokio::time::timeout(timeout, attempt).await.with_context(|| format!("no CONNACK within {timeout:?}"))?
}

/// Publishes `payload` to `topic` with QoS 1 over a fresh MQTT 3.1.1
/// connection and returns once the broker's PUBACK arrived.
pub async fn publish_v311(
    url: &str,
    topic: &str,
    payload: impl Into<Vec<u8>>,
    timeout: Duration,
) -> anyhow::Result<()> {
    publish_qos1_v311(url, topic, payload.into(), false, timeout).await
}

/// Like [`publish_v311`], with the retain flag set: a cloud application
/// writing state.
pub async fn publish_retained_v311(
    url: &str,
    topic: &str,
    payload: impl Into<Vec<u8>>,
    timeout: Duration,
) -> anyhow::Result<()> {
    publish_qos1_v311(url, topic, payload.into(), true, timeout).await
}

async fn publish_qos1_v311(
    url: &str,
    topic: &str,
    payload: Vec<u8>,
    retain: bool,
    timeout: Duration,
) -> anyhow::Result<()> {
    use rumqttc::{Event, Outgoing, Packet, QoS};
    let opts = options_v311(url, &unique_client_id("publisher"), None)?;
    let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 8);
    client.publish(topic, QoS::AtLeastOnce, retain, payload).await.context("queue publish")?;
    let attempt = async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => break,
                Ok(_) => {}
                Err(e) => return Err(anyhow::Error::new(e).context("publish")),
            }
        }
        let _ = client.disconnect().await;
        // Drive the DISCONNECT out; the loop ends with an error once the
        // broker closes, which is the normal end here.
        while let Ok(ev) = eventloop.poll().await {
            if matches!(ev, Event::Outgoing(Outgoing::Disconnect)) {
                break;
            }
        }
        Ok(())
    };
    tokio::time::timeout(timeout, attempt).await.with_context(|| format!("no PUBACK from {url} within {timeout:?}"))?
}

/// Publishes with QoS 1 over a fresh MQTT 5 connection, with the given user
/// properties and content type, and returns once the PUBACK arrived.
pub async fn publish_v5(
    url: &str,
    topic: &str,
    payload: impl Into<Vec<u8>>,
    user_properties: Vec<(String, String)>,
    content_type: Option<String>,
    timeout: Duration,
) -> anyhow::Result<()> {
    use mqtt5::{Packet, PublishProperties};
    use rumqttc::Outgoing;
    use rumqttc::v5::Event;
    use rumqttc::v5::mqttbytes::QoS;
    let opts = options_v5(url, &unique_client_id("publisher"), None)?;
    let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(opts, 8);
    let props = PublishProperties { user_properties, content_type, ..Default::default() };
    client
        .publish_with_properties(topic, QoS::AtLeastOnce, false, payload.into(), props)
        .await
        .context("queue publish")?;
    let attempt = async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => break,
                Ok(_) => {}
                Err(e) => return Err(anyhow::Error::new(e).context("publish")),
            }
        }
        let _ = client.disconnect().await;
        while let Ok(ev) = eventloop.poll().await {
            if matches!(ev, Event::Outgoing(Outgoing::Disconnect)) {
                break;
            }
        }
        Ok(())
    };
    tokio::time::timeout(timeout, attempt).await.with_context(|| format!("no PUBACK from {url} within {timeout:?}"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_url_accepts_mqtt_and_mqtts_with_a_port() {
        assert_eq!(parse_url("mqtt://127.0.0.1:1883").unwrap(), ("127.0.0.1".to_owned(), 1883, false));
        assert_eq!(parse_url("mqtts://localhost:8883/").unwrap(), ("localhost".to_owned(), 8883, true));
    }

    #[test]
    fn parse_url_rejects_other_schemes_and_missing_ports() {
        assert!(parse_url("tcp://127.0.0.1:1883").is_err());
        assert!(parse_url("mqtt://127.0.0.1").is_err());
        assert!(parse_url("mqtt://127.0.0.1:http").is_err());
    }

    #[test]
    fn a_tls_config_requires_an_mqtts_url_and_vice_versa() {
        assert!(options_v311("mqtts://127.0.0.1:1", "c", None).is_err());
        let config = crate::tls::client_config(&crate::TestPki::generate().unwrap().ca_cert, None);
        assert!(options_v5("mqtt://127.0.0.1:1", "c", Some(config.unwrap())).is_err());
    }
}
