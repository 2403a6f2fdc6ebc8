//! `[[destination]]` and `[ingest.mqtt]`: MQTT endpoints as written and as
//! validated. Both share [`MqttEndpoint`] (where and how to connect).

use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;

use super::profile::{BatchConfig, Profile, TopicRules, TopicScheme};
use super::{AckLevel, ConfigError, Secret, parse_duration};
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
    /// Which events it takes: its `routes` and `subscribe` filters.
    pub routing: Routing,
    /// Where its cursor begins the first time it runs (`start`).
    pub start: Start,
    /// Most events sent whose acknowledgement is not yet durable; also the
    /// bound on events sent twice after a crash.
    pub inflight: usize,
    /// Most publishes awaiting PUBACK at once (the cloud's in-flight quota;
    /// a broker's CONNACK Receive Maximum lowers it further).
    pub inflight_publishes: usize,
    /// First reconnect delay.
    pub backoff_base: Duration,
    /// Longest reconnect delay.
    pub backoff_cap: Duration,
    /// The cloud profile its defaults came from.
    pub profile: Profile,
    /// Most publishes per second (`None`: unpaced).
    pub max_publish_rate: Option<u32>,
    /// Most publish bytes per second (`None`: unpaced).
    pub max_byte_rate: Option<u64>,
    /// Largest payload the cloud takes (`None`: only the packet limit).
    pub max_payload_bytes: Option<usize>,
    /// What the cloud requires of topics.
    pub topics: TopicRules,
    /// Whether the cloud keeps retained messages (state is published retained where it does).
    pub retain_available: bool,
    /// Batched publishing.
    pub batch: BatchConfig,
    /// Azure IoT Hub's shared access signature credentials, if used.
    pub sas: Option<SasConfig>,
    /// Every limit as resolved, with where it came from, for `ferry config check`.
    pub resolved: Vec<Resolved>,
}

/// Credentials signed with a device key (Azure IoT Hub's SAS tokens), each
/// connection getting a fresh token.
#[derive(Debug, Clone)]
pub struct SasConfig {
    /// The device's primary or secondary key, base64 as the portal shows it.
    pub key: Secret,
    /// How long each token is valid; the connection is renewed before.
    pub lifetime: Duration,
}

/// One limit of a destination, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The config key.
    pub key: &'static str,
    /// Its value, as printed.
    pub value: String,
    /// Where it came from: `default`, the profile (with the documented
    /// figure), or `config`.
    pub source: String,
}

/// Reconnect delays (first, longest) of a destination that sets none, and of
/// the local broker connections, which have no such keys.
pub const DEFAULT_BACKOFF: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(30));

/// Where a new destination's cursor begins: what of the log, already there
/// when it is first configured, it is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The whole log (the default).
    Earliest,
    /// Only what is accepted from now on.
    Latest,
    /// What was accepted at or after this time, in ms since the epoch.
    At(u64),
}

impl Start {
    /// `earliest`, `latest`, or an RFC 3339 time.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "earliest" => Ok(Start::Earliest),
            "latest" => Ok(Start::Latest),
            _ => crate::clock::parse_utc(text)
                .map(Start::At)
                .ok_or_else(|| format!("`{text}` is not `earliest`, `latest` or an RFC 3339 time")),
        }
    }
}

/// Which events a destination takes: the one rule behind what its
/// forwarder publishes ([`crate::event::EventBody::is_for`]), what the store
/// keeps for it, and what ingest checks against its limits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routing {
    /// `routes`: topic filters of the events it forwards.
    pub routes: Vec<TopicFilter>,
    /// `subscribe`: state keys (topics below `topic_prefix`) whose values it
    /// is sent and whose messages its cloud sends the device; each is
    /// subscribed as `{topic_prefix}{filter}`.
    pub subscribe: Vec<TopicFilter>,
}

impl Routing {
    /// Whether its routes select events on `subject`.
    pub fn routes(&self, subject: &str) -> bool {
        self.routes.iter().any(|f| f.matches(subject))
    }

    /// Whether it subscribes to state key `key`.
    pub fn subscribes(&self, key: &str) -> bool {
        self.subscribe.iter().any(|f| f.matches(key))
    }

    /// Whether an event on `subject` may be for this destination, so the
    /// store keeps it until this destination's cursor passes it: its routes
    /// select the subject, or it is the state key of an update it is sent
    /// (a state update's subject is its key, and the state service
    /// addresses updates to subscribers only).
    pub fn may_take(&self, subject: &str) -> bool {
        self.routes(subject) || self.subscribes(subject)
    }

    /// Every filter, routes first; what the store fingerprints to notice
    /// that routing changed.
    pub fn filters(&self) -> impl Iterator<Item = &TopicFilter> {
        self.routes.iter().chain(&self.subscribe)
    }
}

impl DestinationConfig {
    /// Whether this destination forwards events on `topic`.
    pub fn routes(&self, topic: &str) -> bool {
        self.routing.routes(topic)
    }

    /// Whether this destination subscribes to the key (topic below the prefix) `key`.
    pub fn subscribes(&self, key: &str) -> bool {
        self.routing.subscribes(key)
    }

    /// The full MQTT filter of one of its [`Routing::subscribe`] filters.
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
    /// When an MQTT 5 message that names a Response Topic gets its receipt:
    /// once stored, or once this many destinations routing it acknowledged it.
    pub ack: AckLevel,
    /// How long a receipt waits for `ack` before it goes saying "pending".
    pub ack_timeout: Duration,
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
        inflight_publishes: Option<usize>,
        backoff_base: Option<String>,
        backoff_cap: Option<String>,
        start: Option<String>,
        subscribe: Option<Vec<String>>,
        profile: Option<String>,
        max_publish_rate: Option<u32>,
        max_byte_rate: Option<ByteSize>,
        max_payload_size: Option<ByteSize>,
        batch: Option<RawBatch>,
        sas_key: Option<String>,
        sas_token_lifetime: Option<String>,
    }
}

/// `[destination.batch]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBatch {
    max_events: Option<usize>,
    max_bytes: Option<ByteSize>,
    linger: Option<String>,
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
        ack: Option<String>,
        ack_timeout: Option<String>,
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

/// What a table's own defaults are for its endpoint keys.
struct EndpointDefaults {
    client_id: String,
    protocol: Protocol,
    max_packet_bytes: u64,
}

impl EndpointDefaults {
    fn plain(client_id: String) -> Self {
        Self { client_id, protocol: Protocol::V5, max_packet_bytes: 128 * 1024 }
    }
}

fn endpoint(raw: RawEndpoint, defaults: EndpointDefaults, cx: &Ctx<'_>) -> Result<MqttEndpoint, ConfigError> {
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
    let protocol = match raw.protocol.as_deref() {
        None => defaults.protocol,
        Some("v5" | "5") => Protocol::V5,
        Some("v311" | "3.1.1" | "v3.1.1") => Protocol::V311,
        Some(other) => return Err(cx.err("protocol", format!("`{other}` is not one of \"v5\", \"v311\""))),
    };
    let client_id = raw.client_id.unwrap_or(defaults.client_id);
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
    let max_packet_bytes = raw.max_packet_size.map_or(defaults.max_packet_bytes, |b| b.as_u64());
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
    let profile = match raw.profile.as_deref() {
        None => Profile::Generic,
        Some(p) => Profile::parse(p).ok_or_else(|| {
            let names: Vec<&str> = Profile::ALL.iter().map(|p| p.name()).collect();
            cx.err("profile", format!("`{p}` is not one of {names:?}"))
        })?,
    };
    let pd = profile.defaults();
    let mut resolved = Vec::new();
    let from_profile = |documented: String| format!("profile {} (documented {documented})", profile.name());
    let iot_hub = pd.topics.scheme == TopicScheme::AzureIotHub;
    let defaults = EndpointDefaults {
        // IoT Hub takes only the device's own id as client id.
        client_id: if iot_hub { device_id.to_owned() } else { format!("ferry-{device_id}-{name}") },
        protocol: pd.protocol.unwrap_or(Protocol::V5),
        max_packet_bytes: pd.max_packet as u64,
    };
    let explicit_packet = raw.max_packet_size.is_some();
    let mut endpoint = endpoint(raw.take_endpoint(), defaults, cx)?;
    if let Some(required) = pd.protocol
        && endpoint.protocol != required
    {
        return Err(
            cx.err("protocol", format!("profile {} speaks MQTT 3.1.1 only: set protocol = \"v311\"", profile.name()))
        );
    }
    resolved.push(Resolved {
        key: "max_packet_size",
        value: format!("{} bytes", endpoint.max_packet_bytes),
        source: if explicit_packet {
            "config".into()
        } else if profile == Profile::Generic {
            "default".into()
        } else {
            format!("profile {}", profile.name())
        },
    });

    let topic_prefix = match (&raw.topic_prefix, iot_hub) {
        (Some(_), true) => {
            return Err(cx.err(
                "topic_prefix",
                format!("profile {} fixes its topics (devices/{{device_id}}/messages/events/)", profile.name()),
            ));
        }
        (_, true) => String::new(),
        (p, false) => p.clone().unwrap_or_else(|| "ferry/{device_id}/".into()).replace("{device_id}", device_id),
    };
    if !topic_prefix.is_empty() {
        // The prefix plus any valid subject must form a valid topic name.
        topic::validate_name(&format!("{topic_prefix}x"))
            .map_err(|e| cx.err("topic_prefix", format!("`{topic_prefix}` would make invalid topics: {e}")))?;
        if !topic_prefix.ends_with('/') {
            return Err(cx.err("topic_prefix", format!("`{topic_prefix}` must end with `/`")));
        }
        // …and one subject level must still fit the cloud's rules.
        if let Some(reason) = pd.topics.refusal(&format!("{topic_prefix}x")) {
            return Err(cx.err("topic_prefix", format!("breaks profile {}: {reason}", profile.name())));
        }
    }
    let routes = filters(raw.routes.unwrap_or_else(|| vec!["#".into()]), "routes", cx)?;
    let inflight = match raw.inflight {
        Some(n) => {
            resolved.push(Resolved { key: "inflight", value: n.to_string(), source: "config".into() });
            n
        }
        None => {
            let source =
                if profile == Profile::Generic { "default".into() } else { format!("profile {}", profile.name()) };
            resolved.push(Resolved { key: "inflight", value: pd.inflight_events.to_string(), source });
            pd.inflight_events
        }
    };
    if !(1..=65_535).contains(&inflight) {
        return Err(cx.err("inflight", "must be between 1 and 65535"));
    }
    let inflight_publishes = match (raw.inflight_publishes, pd.inflight_publishes) {
        (Some(n), _) => (n, "config".to_owned()),
        (None, Some(f)) => (f.default, from_profile(f.documented.to_string())),
        (None, None) => (inflight, "default (inflight)".to_owned()),
    };
    resolved.push(Resolved {
        key: "inflight_publishes",
        value: inflight_publishes.0.to_string(),
        source: inflight_publishes.1,
    });
    let inflight_publishes = inflight_publishes.0;
    if !(1..=65_535).contains(&inflight_publishes) {
        return Err(cx.err("inflight_publishes", "must be between 1 and 65535"));
    }
    let max_publish_rate = match (raw.max_publish_rate, pd.publish_rate) {
        (Some(0), _) => None,
        (Some(n), _) => Some((n, "config".to_owned())),
        (None, Some(f)) => Some((f.default, from_profile(format!("{}/s", f.documented)))),
        (None, None) => None,
    }
    .map(|(n, source)| {
        resolved.push(Resolved { key: "max_publish_rate", value: format!("{n}/s"), source });
        n
    });
    let max_byte_rate = match (raw.max_byte_rate.map(|b| b.as_u64()), pd.byte_rate) {
        (Some(0), _) => None,
        (Some(n), _) => Some((n, "config".to_owned())),
        (None, Some(f)) => Some((f.default, from_profile(format!("{} B/s", f.documented)))),
        (None, None) => None,
    }
    .map(|(n, source)| {
        resolved.push(Resolved { key: "max_byte_rate", value: format!("{n} B/s"), source });
        n
    });
    if max_byte_rate.is_some_and(|r| r < 1024) {
        return Err(cx.err("max_byte_rate", "must be at least 1 KiB (per second), or 0 for none"));
    }
    let max_payload_bytes = match (raw.max_payload_size.map(|b| b.as_u64() as usize), pd.max_payload) {
        (Some(n), _) => Some((n, "config".to_owned())),
        (None, Some(n)) => Some((n, format!("profile {}", profile.name()))),
        (None, None) => None,
    }
    .map(|(n, source)| {
        resolved.push(Resolved { key: "max_payload_size", value: format!("{n} bytes"), source });
        n
    });
    let batch = {
        let b = raw.batch.unwrap_or_default();
        let explicit = b.max_events.is_some() || b.max_bytes.is_some() || b.linger.is_some();
        let max_events = b.max_events.unwrap_or(pd.batch.max_events);
        if max_events == 0 {
            return Err(cx.err("batch.max_events", "must be at least 1 (1: no batching)"));
        }
        let default_bytes = if pd.batch.enabled() { pd.batch.max_bytes } else { 64 * 1024 };
        let max_bytes = b.max_bytes.map_or(default_bytes, |b| b.as_u64() as usize);
        let linger = parse_duration(b.linger.as_deref().unwrap_or("0s")).map_err(|r| cx.err("batch.linger", r))?;
        let batch = BatchConfig { max_events, max_bytes, linger };
        let source = if explicit {
            "config".to_owned()
        } else if profile == Profile::Generic {
            "default".into()
        } else {
            match pd.billing_unit {
                Some(u) => format!("profile {} (billed per {u} bytes)", profile.name()),
                None => format!("profile {}", profile.name()),
            }
        };
        let value = if batch.enabled() {
            format!("up to {max_events} events, {max_bytes} bytes, linger {}", humantime::format_duration(linger))
        } else {
            "off (one event per publish)".into()
        };
        resolved.push(Resolved { key: "batch", value, source });
        batch
    };
    if batch.enabled() && batch.max_bytes + super::BATCH_PACKET_ROOM > endpoint.max_packet_bytes {
        return Err(cx.err(
            "batch.max_bytes",
            format!("must leave room in max_packet_size ({} bytes) for the topic", endpoint.max_packet_bytes),
        ));
    }
    let sas = match raw.sas_key {
        Some(key) => {
            if !endpoint.tls {
                return Err(cx.err("sas_key", "is sent only over TLS: the url must be mqtts://"));
            }
            crate::sas::check_key(&key).map_err(|r| cx.err("sas_key", r))?;
            let lifetime = parse_duration(raw.sas_token_lifetime.as_deref().unwrap_or("1h"))
                .map_err(|r| cx.err("sas_token_lifetime", r))?;
            if lifetime < Duration::from_secs(10) {
                return Err(cx.err("sas_token_lifetime", "must be at least 10s"));
            }
            if endpoint.username.is_none() {
                endpoint.username = Some(crate::sas::username(&endpoint.host, &endpoint.client_id));
            }
            Some(SasConfig { key: Secret::new(key), lifetime })
        }
        None => {
            if raw.sas_token_lifetime.is_some() {
                return Err(cx.err("sas_token_lifetime", "needs `sas_key`"));
            }
            None
        }
    };
    if iot_hub && sas.is_none() && endpoint.client_cert.is_none() && endpoint.password.is_none() {
        return Err(cx.err(
            "sas_key",
            format!(
                "profile {} needs the device's key (sas_key), an X.509 certificate (client_cert, client_key), \
                 or a token you renew yourself (password)",
                profile.name()
            ),
        ));
    }
    let backoff = |key: &str, text: Option<String>, default: Duration| match text {
        Some(t) => parse_duration(&t).map_err(|r| cx.err(key, r)),
        None => Ok(default),
    };
    let backoff_base = backoff("backoff_base", raw.backoff_base, DEFAULT_BACKOFF.0)?;
    let backoff_cap = backoff("backoff_cap", raw.backoff_cap, DEFAULT_BACKOFF.1)?;
    if backoff_base.is_zero() || backoff_cap < backoff_base {
        return Err(cx.err("backoff_cap", "backoff_base must be above zero and backoff_cap at least backoff_base"));
    }
    let start = match raw.start.as_deref() {
        None => Start::Earliest,
        Some(text) => Start::parse(text).map_err(|r| cx.err("start", r))?,
    };
    let mut subscribe = Vec::new();
    for f in raw.subscribe.unwrap_or_default() {
        if iot_hub {
            return Err(
                cx.err("subscribe", format!("profile {} has no topics to subscribe to state on", profile.name()))
            );
        }
        let filter = TopicFilter::new(&f).map_err(|e| cx.err("subscribe", format!("`{f}` {e}")))?;
        TopicFilter::new(&format!("{topic_prefix}{f}"))
            .map_err(|e| cx.err("subscribe", format!("`{topic_prefix}{f}` (topic_prefix + filter) {e}")))?;
        subscribe.push(filter);
    }
    Ok(DestinationConfig {
        name,
        endpoint,
        topic_prefix,
        routing: Routing { routes, subscribe },
        start,
        inflight,
        inflight_publishes,
        backoff_base,
        backoff_cap,
        profile,
        max_publish_rate,
        max_byte_rate,
        max_payload_bytes,
        topics: pd.topics,
        retain_available: pd.retain,
        batch,
        sas,
        resolved,
    })
}

pub(super) fn mqtt_ingest(
    mut raw: RawMqttIngest,
    device_id: &str,
    cx: &Ctx<'_>,
) -> Result<MqttIngestConfig, ConfigError> {
    let endpoint = endpoint(raw.take_endpoint(), EndpointDefaults::plain(format!("ferry-{device_id}-ingest")), cx)?;
    let topics = filters(raw.topics.unwrap_or_default(), "topics", cx)?;
    let ack = match raw.ack.as_deref() {
        Some(text) => AckLevel::parse(text).map_err(|r| cx.err("ack", r))?,
        None => AckLevel::Stored,
    };
    let ack_timeout =
        parse_duration(raw.ack_timeout.as_deref().unwrap_or("10s")).map_err(|r| cx.err("ack_timeout", r))?;
    if ack_timeout.is_zero() {
        return Err(cx.err("ack_timeout", "must be longer than zero"));
    }
    Ok(MqttIngestConfig { endpoint, topics, ack, ack_timeout })
}

pub(super) fn local_state_mqtt(
    mut raw: RawLocalStateMqtt,
    device_id: &str,
    cx: &Ctx<'_>,
) -> Result<super::state::LocalStateMqtt, ConfigError> {
    let endpoint = endpoint(raw.take_endpoint(), EndpointDefaults::plain(format!("ferry-{device_id}-state")), cx)?;
    let topic_prefix = raw.topic_prefix.unwrap_or_else(|| "ferry/state/".into());
    topic::validate_name(&format!("{topic_prefix}x"))
        .map_err(|e| cx.err("topic_prefix", format!("`{topic_prefix}` would make invalid topics: {e}")))?;
    Ok(super::state::LocalStateMqtt { endpoint, topic_prefix })
}
