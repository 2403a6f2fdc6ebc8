//! `[[destination]]` and `[ingest.mqtt]`: MQTT endpoints as written and as
//! validated. Both share [`MqttEndpoint`] (where and how to connect).

use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;

use super::{ConfigError, Secret, parse_duration};
use crate::topic::{self, TopicFilter};

/// MQTT protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// MQTT 3.1.1: events go out in CloudEvents structured mode (JSON).
    V311,
    /// MQTT 5: events go out in CloudEvents binary mode (user properties).
    V5,
}

/// Where and how to reach a broker.
#[derive(Debug, Clone)]
pub struct MqttEndpoint {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Whether the URL was `mqtts://`.
    pub tls: bool,
    /// Protocol version.
    pub protocol: Protocol,
    /// MQTT client id.
    pub client_id: String,
    /// User name, if any.
    pub username: Option<String>,
    /// Password, if any.
    pub password: Option<Secret>,
    /// PEM CA bundle to trust instead of the system roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) for mutual TLS.
    pub client_cert: Option<PathBuf>,
    /// PEM private key of the client certificate.
    pub client_key: Option<PathBuf>,
    /// Keep-alive interval; also bounds how long a silent link is trusted.
    pub keep_alive: Duration,
    /// Largest MQTT packet sent or received.
    pub max_packet_bytes: usize,
}

impl MqttEndpoint {
    /// `mqtt[s]://host:port` for logs.
    pub fn url(&self) -> String {
        format!("{}://{}:{}", if self.tls { "mqtts" } else { "mqtt" }, self.host, self.port)
    }
}

/// A cloud broker that events are forwarded to.
#[derive(Debug, Clone)]
pub struct DestinationConfig {
    /// Unique name (also the key of its cursor in the store).
    pub name: String,
    /// The broker.
    pub endpoint: MqttEndpoint,
    /// Prepended to an event's subject to form the MQTT topic.
    pub topic_prefix: String,
    /// Local topics forwarded here.
    pub routes: Vec<TopicFilter>,
    /// Most events sent whose acknowledgement is not yet durable; also the
    /// bound on events sent twice after a crash.
    pub inflight: usize,
    /// First reconnect delay.
    pub backoff_base: Duration,
    /// Longest reconnect delay.
    pub backoff_cap: Duration,
    /// Topic filters below `topic_prefix` whose messages this cloud sends
    /// the device (state updates); each is subscribed as `{topic_prefix}{filter}`.
    pub subscribe: Vec<TopicFilter>,
}

impl DestinationConfig {
    /// Whether this destination forwards events on `topic`.
    pub fn routes(&self, topic: &str) -> bool {
        self.routes.iter().any(|f| f.matches(topic))
    }

    /// Whether this destination subscribes to the key (topic below the prefix) `key`.
    pub fn subscribes(&self, key: &str) -> bool {
        self.subscribe.iter().any(|f| f.matches(key))
    }

    /// The full MQTT filter of one of [`DestinationConfig::subscribe`].
    pub fn subscription_filter(&self, filter: &TopicFilter) -> TopicFilter {
        TopicFilter::new(&format!("{}{}", self.topic_prefix, filter.as_str()))
            .expect("validated: the prefix and the filter form a valid filter")
    }
}

/// `[ingest.mqtt]`: subscribe to a broker on the device.
#[derive(Debug, Clone)]
pub struct MqttIngestConfig {
    /// The local broker.
    pub endpoint: MqttEndpoint,
    /// Topic filters to subscribe to (QoS 1).
    pub topics: Vec<TopicFilter>,
}

/// Connection settings shared by `[[destination]]` and `[ingest.mqtt]`.
struct RawEndpoint {
    url: Option<String>,
    protocol: Option<String>,
    client_id: Option<String>,
    username: Option<String>,
    password: Option<String>,
    ca_file: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
    keep_alive: Option<String>,
    max_packet_size: Option<ByteSize>,
}

/// Declares a raw table holding the endpoint keys plus its own; written out
/// rather than `#[serde(flatten)]`, which cannot deny unknown keys.
macro_rules! raw_with_endpoint {
    ($(#[$doc:meta])* $name:ident { $($field:ident: $ty:ty,)* }) => {
        $(#[$doc])*
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        pub(super) struct $name {
            url: Option<String>,
            protocol: Option<String>,
            client_id: Option<String>,
            username: Option<String>,
            password: Option<String>,
            ca_file: Option<PathBuf>,
            client_cert: Option<PathBuf>,
            client_key: Option<PathBuf>,
            keep_alive: Option<String>,
            max_packet_size: Option<ByteSize>,
            $($field: $ty,)*
        }

        impl $name {
            fn take_endpoint(&mut self) -> RawEndpoint {
                RawEndpoint {
                    url: self.url.take(),
                    protocol: self.protocol.take(),
                    client_id: self.client_id.take(),
                    username: self.username.take(),
                    password: self.password.take(),
                    ca_file: self.ca_file.take(),
                    client_cert: self.client_cert.take(),
                    client_key: self.client_key.take(),
                    keep_alive: self.keep_alive.take(),
                    max_packet_size: self.max_packet_size.take(),
                }
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                // Only identifying keys: the rest may hold secrets.
                f.debug_struct(stringify!($name)).field("url", &self.url).finish_non_exhaustive()
            }
        }
    };
}

raw_with_endpoint! {
    /// `[[destination]]` as written.
    RawDestination {
        name: Option<String>,
        topic_prefix: Option<String>,
        routes: Option<Vec<String>>,
        inflight: Option<usize>,
        backoff_base: Option<String>,
        backoff_cap: Option<String>,
        subscribe: Option<Vec<String>>,
    }
}

raw_with_endpoint! {
    /// `[state.local_mqtt]` as written.
    RawLocalStateMqtt {
        topic_prefix: Option<String>,
    }
}

raw_with_endpoint! {
    /// `[ingest.mqtt]` as written.
    RawMqttIngest {
        topics: Option<Vec<String>>,
    }
}

/// Validation context: the file and the key prefix of the table at hand.
pub(super) struct Ctx<'a> {
    pub file: &'a str,
    pub prefix: String,
}

impl Ctx<'_> {
    fn err(&self, key: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError { file: self.file.into(), key: format!("{}.{key}", self.prefix), reason: reason.into() }
    }
}

fn endpoint(raw: RawEndpoint, default_client_id: String, cx: &Ctx<'_>) -> Result<MqttEndpoint, ConfigError> {
    let url = raw.url.ok_or_else(|| cx.err("url", "is required, e.g. \"mqtts://broker.example.com:8883\""))?;
    let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("mqtt://") {
        (false, r)
    } else {
        return Err(cx.err("url", format!("`{url}` must start with mqtt:// or mqtts://")));
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
            let port = p.parse::<u16>().map_err(|_| cx.err("url", format!("`{p}` is not a port number")))?;
            (h.trim_start_matches('[').trim_end_matches(']').to_owned(), port)
        }
        _ => (rest.to_owned(), if tls { 8883 } else { 1883 }),
    };
    if host.is_empty() || host.contains('/') {
        return Err(cx.err("url", format!("`{url}` has no valid host")));
    }
    let protocol = match raw.protocol.as_deref().unwrap_or("v5") {
        "v5" | "5" => Protocol::V5,
        "v311" | "3.1.1" | "v3.1.1" => Protocol::V311,
        other => return Err(cx.err("protocol", format!("`{other}` is not one of \"v5\", \"v311\""))),
    };
    let client_id = raw.client_id.unwrap_or(default_client_id);
    if client_id.is_empty() || client_id.len() > 128 {
        return Err(cx.err("client_id", "must be 1 to 128 characters"));
    }
    if raw.password.is_some() && raw.username.is_none() {
        return Err(cx.err("password", "needs `username` too"));
    }
    for (key, path) in [("ca_file", &raw.ca_file), ("client_cert", &raw.client_cert), ("client_key", &raw.client_key)] {
        if let Some(p) = path {
            if !tls {
                return Err(cx.err(key, "is set but the url is not mqtts://"));
            }
            if !p.is_file() {
                return Err(cx.err(key, format!("{} is not a readable file", p.display())));
            }
        }
    }
    if raw.client_cert.is_some() != raw.client_key.is_some() {
        return Err(cx.err("client_key", "`client_cert` and `client_key` go together"));
    }
    let keep_alive = parse_duration(raw.keep_alive.as_deref().unwrap_or("30s")).map_err(|r| cx.err("keep_alive", r))?;
    // rumqttc refuses MQTT 5 keep-alives under 5 s.
    if keep_alive < Duration::from_secs(5) || keep_alive > Duration::from_secs(65_535) {
        return Err(cx.err("keep_alive", "must be between 5s and 65535s"));
    }
    let max_packet_bytes = raw.max_packet_size.map_or(128 * 1024, |b| b.as_u64());
    if !(1024..=256 * 1024 * 1024).contains(&max_packet_bytes) {
        return Err(cx.err("max_packet_size", "must be between 1 KiB and 256 MiB"));
    }
    Ok(MqttEndpoint {
        host,
        port,
        tls,
        protocol,
        client_id,
        username: raw.username,
        password: raw.password.map(Secret::new),
        ca_file: raw.ca_file,
        client_cert: raw.client_cert,
        client_key: raw.client_key,
        keep_alive,
        max_packet_bytes: max_packet_bytes as usize,
    })
}

fn filters(raw: Vec<String>, key: &str, cx: &Ctx<'_>) -> Result<Vec<TopicFilter>, ConfigError> {
    if raw.is_empty() {
        return Err(cx.err(key, "must list at least one topic filter"));
    }
    raw.iter().map(|t| TopicFilter::new(t).map_err(|e| cx.err(key, format!("`{t}` {e}")))).collect()
}

pub(super) fn destination(
    mut raw: RawDestination,
    device_id: &str,
    cx: &Ctx<'_>,
) -> Result<DestinationConfig, ConfigError> {
    let name = raw.name.take().ok_or_else(|| cx.err("name", "is required"))?;
    if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(cx.err("name", format!("`{name}` must be 1 to 64 letters, digits, `-` or `_`")));
    }
    let endpoint = endpoint(raw.take_endpoint(), format!("ferry-{device_id}-{name}"), cx)?;
    let topic_prefix =
        raw.topic_prefix.unwrap_or_else(|| "ferry/{device_id}/".into()).replace("{device_id}", device_id);
    if !topic_prefix.is_empty() {
        // The prefix plus any valid subject must form a valid topic name.
        topic::validate_name(&format!("{topic_prefix}x"))
            .map_err(|e| cx.err("topic_prefix", format!("`{topic_prefix}` would make invalid topics: {e}")))?;
        if !topic_prefix.ends_with('/') {
            return Err(cx.err("topic_prefix", format!("`{topic_prefix}` must end with `/`")));
        }
    }
    let routes = filters(raw.routes.unwrap_or_else(|| vec!["#".into()]), "routes", cx)?;
    let inflight = raw.inflight.unwrap_or(256);
    if !(1..=65_535).contains(&inflight) {
        return Err(cx.err("inflight", "must be between 1 and 65535"));
    }
    let backoff_base =
        parse_duration(raw.backoff_base.as_deref().unwrap_or("500ms")).map_err(|r| cx.err("backoff_base", r))?;
    let backoff_cap =
        parse_duration(raw.backoff_cap.as_deref().unwrap_or("30s")).map_err(|r| cx.err("backoff_cap", r))?;
    if backoff_base.is_zero() || backoff_cap < backoff_base {
        return Err(cx.err("backoff_cap", "backoff_base must be above zero and backoff_cap at least backoff_base"));
    }
    let mut subscribe = Vec::new();
    for f in raw.subscribe.unwrap_or_default() {
        let filter = TopicFilter::new(&f).map_err(|e| cx.err("subscribe", format!("`{f}` {e}")))?;
        TopicFilter::new(&format!("{topic_prefix}{f}"))
            .map_err(|e| cx.err("subscribe", format!("`{topic_prefix}{f}` (topic_prefix + filter) {e}")))?;
        subscribe.push(filter);
    }
    Ok(DestinationConfig { name, endpoint, topic_prefix, routes, inflight, backoff_base, backoff_cap, subscribe })
}

pub(super) fn mqtt_ingest(
    mut raw: RawMqttIngest,
    device_id: &str,
    cx: &Ctx<'_>,
) -> Result<MqttIngestConfig, ConfigError> {
    let endpoint = endpoint(raw.take_endpoint(), format!("ferry-{device_id}-ingest"), cx)?;
    let topics = filters(raw.topics.unwrap_or_default(), "topics", cx)?;
    Ok(MqttIngestConfig { endpoint, topics })
}

pub(super) fn local_state_mqtt(
    mut raw: RawLocalStateMqtt,
    device_id: &str,
    cx: &Ctx<'_>,
) -> Result<super::state::LocalStateMqtt, ConfigError> {
    let endpoint = endpoint(raw.take_endpoint(), format!("ferry-{device_id}-state"), cx)?;
    let topic_prefix = raw.topic_prefix.unwrap_or_else(|| "ferry/state/".into());
    topic::validate_name(&format!("{topic_prefix}x"))
        .map_err(|e| cx.err("topic_prefix", format!("`{topic_prefix}` would make invalid topics: {e}")))?;
    Ok(super::state::LocalStateMqtt { endpoint, topic_prefix })
}
