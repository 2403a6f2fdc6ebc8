//! Configuration: the TOML file as written ([`RawConfig`]) and the validated,
//! typed [`Config`] that the agent runs on.
//!
//! Loading is two-stage: serde parses the file (unknown keys are errors),
//! then [`Config::from_raw`] checks every value. Nothing starts until both
//! pass, and every error names the file, the key and the reason. The embedded
//! default (`ferry.default.toml`) is also the reference for every key.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

use crate::topic::{TopicError, TopicFilter};

pub mod budget;
pub mod fleet;
pub mod plugin;
pub use budget::MemoryBudget;
pub use fleet::FleetConfig;
pub use plugin::PluginConfig;

/// The embedded default configuration, which documents every key.
pub const DEFAULT_TOML: &str = include_str!("ferry.default.toml");

mod mqtt;
pub use mqtt::{
    DEFAULT_BACKOFF, DestinationConfig, MqttEndpoint, MqttIngestConfig, Protocol, Resolved, Routing, SasConfig, Start,
};

pub mod profile;
pub use profile::{BATCH_PACKET_ROOM, BatchConfig, Profile, TopicRules, TopicScheme};

pub mod state;
pub use state::{LocalStateMqtt, MergeRule, StateConfig};

/// A configuration mistake, reported before anything starts.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}: {reason}")]
pub struct ConfigError {
    /// The config file, or `embedded default`.
    pub file: String,
    /// The dotted key at fault (`store.quota`), or `(file)`/`(syntax)`.
    pub key: String,
    /// What is wrong and what would be right.
    pub reason: String,
}

/// The config file as written. Every field is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    agent: RawAgent,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    ingest: RawIngest,
    #[serde(default)]
    destination: Vec<mqtt::RawDestination>,
    #[serde(default)]
    plugin: Vec<plugin::RawPlugin>,
    fleet: Option<fleet::RawFleet>,
    #[serde(default)]
    merge: Vec<state::RawMerge>,
    #[serde(default)]
    state: RawState,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawState {
    local_mqtt: Option<mqtt::RawLocalStateMqtt>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    device_id: Option<String>,
    data_dir: Option<PathBuf>,
    memory_limit: Option<ByteSize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    quota: Option<ByteSize>,
    full_policy: Option<String>,
    durability: Option<String>,
    dedup_window: Option<String>,
    ttl: Option<String>,
    max_event_size: Option<ByteSize>,
    cache_size: Option<ByteSize>,
    min_free_disk: Option<ByteSize>,
    default_priority: Option<u8>,
    retain_delivered: Option<RawRetain>,
    #[serde(default)]
    class: Vec<RawClass>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetain {
    age: String,
    share: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClass {
    name: String,
    topics: Vec<String>,
    priority: u8,
    ttl: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIngest {
    http: Option<RawHttp>,
    mqtt: Option<mqtt::RawMqttIngest>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    listen: Option<String>,
    token: Option<String>,
    max_body_size: Option<ByteSize>,
    max_buffered: Option<ByteSize>,
    max_connections: Option<usize>,
    header_timeout: Option<String>,
    body_timeout: Option<String>,
    shutdown_timeout: Option<String>,
    ack: Option<String>,
    ack_timeout: Option<String>,
}

impl fmt::Debug for RawHttp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawHttp")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("max_body_size", &self.max_body_size)
            .field("max_buffered", &self.max_buffered)
            .field("max_connections", &self.max_connections)
            .field("header_timeout", &self.header_timeout)
            .field("body_timeout", &self.body_timeout)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("ack", &self.ack)
            .field("ack_timeout", &self.ack_timeout)
            .finish()
    }
}

/// When an ingest request is answered: once its events are on disk, or
/// once some of the destinations that route each event have acknowledged it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AckLevel {
    /// Committed to the device's disk.
    Stored,
    /// And acknowledged by one routing destination.
    Any,
    /// And by a majority of the routing destinations.
    Quorum,
    /// And by every routing destination.
    All,
}

impl AckLevel {
    /// `stored`, `any`, `quorum` or `all`.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "stored" => Ok(AckLevel::Stored),
            "any" => Ok(AckLevel::Any),
            "quorum" => Ok(AckLevel::Quorum),
            "all" => Ok(AckLevel::All),
            other => Err(format!("`{other}` is not an acknowledgment level: stored, any, quorum or all")),
        }
    }

    /// How many of `routed` destinations must acknowledge an event.
    pub fn needed(self, routed: usize) -> usize {
        match self {
            AckLevel::Stored => 0,
            AckLevel::Any => routed.min(1),
            AckLevel::Quorum => routed / 2 + 1,
            AckLevel::All => routed,
        }
        .min(routed)
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it came from: a file path or `embedded default`.
    pub origin: String,
    /// Device identity.
    pub agent: AgentConfig,
    /// The event store.
    pub store: StoreConfig,
    /// The HTTP API.
    pub http: HttpConfig,
    /// Local MQTT ingest, if configured.
    pub mqtt_ingest: Option<MqttIngestConfig>,
    /// Cloud brokers to forward to.
    pub destinations: Vec<DestinationConfig>,
    /// `[[plugin]]`, in file order (which is also the order filters of one stage run in).
    pub plugins: Vec<PluginConfig>,
    /// `[fleet]`: signed plugin updates, if configured.
    pub fleet: Option<FleetConfig>,
    /// Merged state: `[[merge]]` rules and `[state]`.
    pub state: StateConfig,
}

/// `[agent]`.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This device's name (one topic level).
    pub device_id: String,
    /// Directory holding the store.
    pub data_dir: PathBuf,
    /// The most the [`MemoryBudget`] may add up to (`memory_limit`), if set.
    pub memory_limit_bytes: Option<u64>,
}

impl AgentConfig {
    /// The CloudEvents `source` of this device's events.
    pub fn source(&self) -> String {
        format!("ferry://{}", self.device_id)
    }
}

/// What ingest does when the store quota is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FullPolicy {
    /// Refuse new events until space frees up.
    Reject,
    /// Evict the oldest events of the lowest priority first.
    DropOldest,
}

/// Whether a commit waits for fsync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Every commit is fsynced before ingest answers.
    Fsync,
    /// Commits are synced periodically; the last moments may be lost on power loss.
    None,
}

/// A priority class: events whose topic matches get its priority and TTL.
#[derive(Debug, Clone)]
pub struct PriorityClass {
    /// Name shown in status.
    pub name: String,
    /// Topic filters, any of which selects the class.
    pub filters: Vec<TopicFilter>,
    /// Eviction priority (lower is evicted first).
    pub priority: u8,
    /// TTL of the class's events, overriding the store default.
    pub ttl: Option<Duration>,
}

/// `[store]`.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The redb file.
    pub path: PathBuf,
    /// Upper bound on stored event bytes.
    pub quota_bytes: u64,
    /// Behaviour when full.
    pub full_policy: FullPolicy,
    /// Commit durability.
    pub durability: Durability,
    /// How long ids are remembered for deduplication.
    pub dedup_window: Duration,
    /// Default TTL (`None`: no expiry).
    pub ttl: Option<Duration>,
    /// Largest encoded event accepted.
    pub max_event_bytes: usize,
    /// Priority of unclassified events.
    pub default_priority: u8,
    /// Priority classes, first match wins.
    pub classes: Vec<PriorityClass>,
    /// Requests that may wait for the writer before producers feel backpressure.
    pub queue_depth: usize,
    /// Page cache of the database, in bytes.
    pub cache_bytes: usize,
    /// Ingest is refused while the file system has less free space than this.
    pub min_free_disk_bytes: u64,
    /// The destinations that consume the log, with their routes: an event
    /// leaves the log once every destination routing it has its cursor past
    /// it; an event no destination routes stays (until TTL or eviction).
    pub consumers: Vec<Consumer>,
    /// Delivered events kept for replay (`None`: removed once delivered).
    pub retain_delivered: Option<RetainDelivered>,
}

/// How long, and within how much of the quota, delivered events stay in the
/// log so a destination can be replayed. They are the first to go when
/// room is needed, before any undelivered event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetainDelivered {
    /// Kept until this long after acceptance.
    pub age: Duration,
    /// At most this many bytes of them (a share of the quota).
    pub max_bytes: u64,
}

/// A consumer of the log, as the store sees a destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consumer {
    /// Cursor name (the destination name).
    pub name: String,
    /// Which events it takes.
    pub routing: Routing,
}

impl StoreConfig {
    /// A store at `path` with the documented defaults; for tools and tests.
    pub fn at(path: impl Into<PathBuf>) -> Self {
        let mut config = Config::embedded().store;
        config.path = path.into();
        config
    }

    /// The class priority and TTL for an event on `topic`.
    pub fn classify(&self, topic: &str) -> (u8, Option<Duration>) {
        self.classes
            .iter()
            .find(|c| c.filters.iter().any(|f| f.matches(topic)))
            .map_or((self.default_priority, self.ttl), |c| (c.priority, c.ttl.or(self.ttl)))
    }
}

/// A bearer token; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for comparison or sending.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// `[ingest.http]`.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Listen address.
    pub listen: SocketAddr,
    /// Required bearer token, if any.
    pub token: Option<Secret>,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Request bytes held in memory at once, across connections.
    pub max_buffered_bytes: usize,
    /// Open connections at most (before the open-file limit caps it).
    pub max_connections: usize,
    /// Time to send a request's headers; also the keep-alive idle limit.
    pub header_timeout: Duration,
    /// Time to send a request's body.
    pub body_timeout: Duration,
    /// Time requests in flight get to finish at shutdown.
    pub shutdown_timeout: Duration,
    /// When an ingest answer comes, unless the request asks otherwise.
    pub ack: AckLevel,
    /// Longest an answer waits for its acknowledgment level before it says
    /// 202 (stored, delivery pending).
    pub ack_timeout: Duration,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            key: "(file)".into(),
            reason: format!("cannot read: {e}"),
        })?;
        Self::parse(&text, &file)
    }

    /// The embedded default configuration.
    pub fn embedded() -> Self {
        Self::parse(DEFAULT_TOML, "embedded default").expect("the embedded default is valid")
    }

    /// Parses and validates config text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError {
            file: file.into(),
            key: "(syntax)".into(),
            reason: e.to_string().trim_end().replace('\n', " "),
        })?;
        Self::from_raw(raw, file)
    }

    /// Validates parsed config; defaults are those of `ferry.default.toml`.
    pub fn from_raw(raw: RawConfig, file: &str) -> Result<Self, ConfigError> {
        let err = |key: &str, reason: String| ConfigError { file: file.into(), key: key.into(), reason };

        let device_id = raw.agent.device_id.unwrap_or_else(default_device_id);
        validate_device_id(&device_id).map_err(|r| err("agent.device_id", r))?;
        let data_dir = raw.agent.data_dir.unwrap_or_else(|| PathBuf::from("./ferry-data"));

        let s = raw.store;
        let quota_bytes = s.quota.map_or(1 << 30, |b| b.as_u64());
        if quota_bytes < 64 * 1024 {
            return Err(err("store.quota", format!("{quota_bytes} bytes is too small; the minimum is 64 KiB")));
        }
        let full_policy = match s.full_policy.as_deref().unwrap_or("reject") {
            "reject" => FullPolicy::Reject,
            "drop-oldest" => FullPolicy::DropOldest,
            other => {
                return Err(err("store.full_policy", format!("`{other}` is not one of \"reject\", \"drop-oldest\"")));
            }
        };
        let durability = match s.durability.as_deref().unwrap_or("fsync") {
            "fsync" => Durability::Fsync,
            "none" => Durability::None,
            other => {
                return Err(err("store.durability", format!("`{other}` is not one of \"fsync\", \"none\"")));
            }
        };
        let dedup_window =
            parse_duration(s.dedup_window.as_deref().unwrap_or("24h")).map_err(|r| err("store.dedup_window", r))?;
        let ttl = parse_ttl(s.ttl.as_deref()).map_err(|r| err("store.ttl", r))?;
        // The default never exceeds a small quota; an explicit value must fit.
        let max_event_bytes = s.max_event_size.map_or((256 * 1024).min(quota_bytes), |b| b.as_u64());
        if max_event_bytes == 0 || max_event_bytes > quota_bytes {
            return Err(err(
                "store.max_event_size",
                format!("must be between 1 byte and the quota ({quota_bytes} bytes)"),
            ));
        }
        let retain_delivered = match &s.retain_delivered {
            None => None,
            Some(r) => {
                let age = parse_duration(&r.age).map_err(|e| err("store.retain_delivered.age", e))?;
                let share = parse_share(&r.share).map_err(|e| err("store.retain_delivered.share", e))?;
                let max_bytes = (quota_bytes as f64 * share) as u64;
                (!age.is_zero() && max_bytes > 0).then_some(RetainDelivered { age, max_bytes })
            }
        };
        let mut classes = Vec::with_capacity(s.class.len());
        for (i, c) in s.class.into_iter().enumerate() {
            let key = |k: &str| format!("store.class[{i}].{k}");
            if c.name.trim().is_empty() {
                return Err(err(&key("name"), "must not be empty".into()));
            }
            if c.topics.is_empty() {
                return Err(err(&key("topics"), "must list at least one topic filter".into()));
            }
            let filters = c
                .topics
                .iter()
                .map(|t| TopicFilter::new(t).map_err(|e: TopicError| err(&key("topics"), format!("`{t}` {e}"))))
                .collect::<Result<_, _>>()?;
            let class_ttl = match c.ttl.as_deref() {
                None => None,
                some => parse_ttl(some).map_err(|r| err(&key("ttl"), r))?,
            };
            classes.push(PriorityClass { name: c.name, filters, priority: c.priority, ttl: class_ttl });
        }

        let h = raw.ingest.http.unwrap_or_default();
        let listen_text = h.listen.unwrap_or_else(|| "127.0.0.1:7878".into());
        let listen: SocketAddr = listen_text
            .parse()
            .map_err(|_| err("ingest.http.listen", format!("`{listen_text}` is not an address like 127.0.0.1:7878")))?;
        let token = h.token.map(Secret::new);
        if token.as_ref().is_some_and(|t| t.expose().len() < 16) {
            return Err(err("ingest.http.token", "must be at least 16 characters".into()));
        }
        if !listen.ip().is_loopback() && token.is_none() {
            return Err(err(
                "ingest.http.token",
                format!("required because ingest.http.listen ({listen}) is not a loopback address"),
            ));
        }
        let max_body_bytes = usize::try_from(h.max_body_size.map_or(8 << 20, |b| b.as_u64()))
            .map_err(|_| err("ingest.http.max_body_size", "too large for this platform".into()))?;
        let max_buffered_bytes = usize::try_from(h.max_buffered.map_or(48 << 20, |b| b.as_u64()))
            .map_err(|_| err("ingest.http.max_buffered", "too large for this platform".into()))?;
        // A request holds about four times its body (see api::http::BODY_COPIES).
        let largest = max_body_bytes.saturating_mul(4);
        if max_buffered_bytes < largest {
            return Err(err(
                "ingest.http.max_buffered",
                format!(
                    "must be at least 4 × max_body_size ({largest} bytes): a request holds about four times its \
                     body, so a largest request could never be read"
                ),
            ));
        }
        let max_connections = h.max_connections.unwrap_or(256);
        if max_connections == 0 {
            return Err(err("ingest.http.max_connections", "must be at least 1".into()));
        }
        let timeout = |key: &str, text: Option<String>, default: &str| {
            let d = parse_duration(text.as_deref().unwrap_or(default)).map_err(|r| err(key, r))?;
            if d.is_zero() {
                return Err(err(key, "must be longer than zero".into()));
            }
            Ok(d)
        };
        let header_timeout = timeout("ingest.http.header_timeout", h.header_timeout, "10s")?;
        let body_timeout = timeout("ingest.http.body_timeout", h.body_timeout, "30s")?;
        let shutdown_timeout = timeout("ingest.http.shutdown_timeout", h.shutdown_timeout, "10s")?;
        let ack = match h.ack.as_deref() {
            None => AckLevel::Stored,
            Some(text) => AckLevel::parse(text).map_err(|r| err("ingest.http.ack", r))?,
        };
        let ack_timeout = timeout("ingest.http.ack_timeout", h.ack_timeout, "10s")?;

        let mut destinations: Vec<DestinationConfig> = Vec::with_capacity(raw.destination.len());
        for (i, d) in raw.destination.into_iter().enumerate() {
            let cx = mqtt::Ctx { file, prefix: format!("destination[{i}]") };
            let d = mqtt::destination(d, &device_id, &cx)?;
            if destinations.iter().any(|o| o.name == d.name) {
                return Err(err(
                    &format!("destination[{i}].name"),
                    format!("`{}` is used by another destination", d.name),
                ));
            }
            destinations.push(d);
        }
        let mqtt_ingest = match raw.ingest.mqtt {
            Some(m) => Some(mqtt::mqtt_ingest(m, &device_id, &mqtt::Ctx { file, prefix: "ingest.mqtt".into() })?),
            None => None,
        };
        // Relative plugin paths are relative to the config file; a filter's
        // stage is `ingest` or a destination's name.
        let base = Path::new(file).parent().unwrap_or(Path::new(""));
        let destination_names: Vec<&str> = destinations.iter().map(|d| d.name.as_str()).collect();
        let plugins = plugin::validate(raw.plugin, &destination_names, base, file, max_event_bytes)?;
        // Fleet traffic rides the destinations' own connections, on its own
        // topics: a cloud with fixed topics (Azure IoT Hub) cannot carry it.
        let fleet_capable: Vec<(&str, bool)> =
            destinations.iter().map(|d| (d.name.as_str(), d.topics.scheme != TopicScheme::AzureIotHub)).collect();
        let fleet = raw.fleet.map(|f| fleet::validate(f, &fleet_capable, file)).transpose()?;
        let state = StateConfig {
            merge: state::merge_rules(raw.merge, &plugins, file)?,
            local_mqtt: match raw.state.local_mqtt {
                Some(m) => {
                    Some(mqtt::local_state_mqtt(m, &device_id, &mqtt::Ctx { file, prefix: "state.local_mqtt".into() })?)
                }
                None => None,
            },
        };

        let memory_limit_bytes = raw.agent.memory_limit.map(|b| b.as_u64());
        let config = Config {
            origin: file.into(),
            agent: AgentConfig { device_id, data_dir: data_dir.clone(), memory_limit_bytes },
            store: StoreConfig {
                path: data_dir.join("ferry.redb"),
                quota_bytes,
                full_policy,
                durability,
                dedup_window,
                ttl,
                max_event_bytes: usize::try_from(max_event_bytes).unwrap_or(usize::MAX),
                default_priority: s.default_priority.unwrap_or(100),
                classes,
                queue_depth: 1024,
                cache_bytes: usize::try_from(s.cache_size.map_or(4 << 20, |b| b.as_u64())).unwrap_or(usize::MAX),
                min_free_disk_bytes: s.min_free_disk.map_or(256 << 20, |b| b.as_u64()),
                consumers: destinations
                    .iter()
                    .map(|d| Consumer { name: d.name.clone(), routing: d.routing.clone() })
                    .collect(),
                retain_delivered,
            },
            http: HttpConfig {
                listen,
                token,
                max_body_bytes,
                max_buffered_bytes,
                max_connections,
                header_timeout,
                body_timeout,
                shutdown_timeout,
                ack,
                ack_timeout,
            },
            mqtt_ingest,
            destinations,
            plugins,
            fleet,
            state,
        };
        if let Some(limit) = memory_limit_bytes {
            let budget = MemoryBudget::of(&config);
            if budget.total() > limit {
                return Err(err(
                    "agent.memory_limit",
                    format!(
                        "the parts this config allows add up to more than {limit} bytes; lower the largest ({budget})"
                    ),
                ));
            }
        }
        Ok(config)
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("`{text}` is not a duration like \"30s\", \"24h\" or \"7d\" ({e})"))
}

/// A share of the quota: `"25%"`, from 0 to 100 percent.
fn parse_share(text: &str) -> Result<f64, String> {
    let bad = || format!("`{text}` is not a share of the quota like \"25%\" (0% to 100%)");
    let number = text.trim().strip_suffix('%').ok_or_else(bad)?;
    let percent: f64 = number.trim().parse().map_err(|_| bad())?;
    if !(0.0..=100.0).contains(&percent) {
        return Err(bad());
    }
    Ok(percent / 100.0)
}

/// A TTL; zero means none.
fn parse_ttl(text: Option<&str>) -> Result<Option<Duration>, String> {
    let d = parse_duration(text.unwrap_or("0s"))?;
    Ok((!d.is_zero()).then_some(d))
}

fn validate_device_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 128 {
        return Err("must be 1 to 128 characters".into());
    }
    if let Some(c) = id.chars().find(|c| matches!(c, '/' | '+' | '#' | '$') || c.is_control() || c.is_whitespace()) {
        return Err(format!("`{id}` contains `{}`; it must be a single MQTT topic level", c.escape_debug()));
    }
    // It travels in every event's `source` and in topics.
    crate::topic::validate_mqtt_string(id).map_err(|e| format!("`{}` {e}", id.escape_debug()))
}

/// The host name, which names the device unless the config does.
fn default_device_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| validate_device_id(h).is_ok())
        .unwrap_or_else(|| "ferry-device".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "test.toml")
    }

    #[test]
    fn a_destination_starts_at_the_earliest_the_latest_or_a_time() {
        assert_eq!(Start::parse("earliest"), Ok(Start::Earliest));
        assert_eq!(Start::parse("latest"), Ok(Start::Latest));
        assert_eq!(Start::parse("2026-12-05T00:00:01Z"), Ok(Start::At(1_796_428_801_000)));
        let toml = "[[destination]]\nname = \"a\"\nurl = \"mqtt://x\"\nstart = \"yesterday\"\n";
        let e = Config::parse(toml, "t.toml").unwrap_err();
        assert_eq!(e.key, "destination[0].start");
        assert!(e.reason.contains("RFC 3339"), "{}", e.reason);
    }

    #[test]
    fn ack_levels_need_one_a_majority_or_every_routing_destination() {
        let needed = |level: &str, routed| AckLevel::parse(level).unwrap().needed(routed);
        assert_eq!([0, 1, 2, 3].map(|n| needed("stored", n)), [0, 0, 0, 0]);
        assert_eq!([0, 1, 2, 3].map(|n| needed("any", n)), [0, 1, 1, 1]);
        assert_eq!([0, 1, 2, 3, 4].map(|n| needed("quorum", n)), [0, 1, 2, 2, 3]);
        assert_eq!([0, 1, 2, 3].map(|n| needed("all", n)), [0, 1, 2, 3]);
        assert!(AckLevel::parse("most").unwrap_err().contains("stored, any, quorum or all"));
        let e = Config::parse("[ingest.http]\nack = \"most\"\n", "t.toml").unwrap_err();
        assert_eq!(e.key, "ingest.http.ack");
    }

    #[test]
    fn embedded_default_is_valid_and_listens_on_loopback() {
        let c = Config::embedded();
        assert_eq!(c.http.listen.to_string(), "127.0.0.1:7878");
        assert_eq!(c.agent.data_dir, PathBuf::from("./ferry-data"));
        assert_eq!(c.store.full_policy, FullPolicy::Reject);
        assert_eq!(c.store.durability, Durability::Fsync);
        assert_eq!(c.store.ttl, None);
    }

    #[test]
    fn retain_delivered_is_an_age_and_a_share_of_the_quota() {
        assert_eq!(Config::embedded().store.retain_delivered, None);
        let c = parse("[store]\nquota = \"100 MiB\"\nretain_delivered = { age = \"2h\", share = \"25%\" }\n").unwrap();
        let r = c.store.retain_delivered.expect("on");
        assert_eq!(r.age, Duration::from_secs(7200));
        assert_eq!(r.max_bytes, 25 << 20);
        let e = parse("[store]\nretain_delivered = { age = \"2h\", share = \"0.25\" }\n").unwrap_err();
        assert_eq!(e.key, "store.retain_delivered.share");
        assert!(e.reason.contains("\"25%\""), "{e}");
        let e = parse("[store]\nretain_delivered = { age = \"2h\", share = \"150%\" }\n").unwrap_err();
        assert_eq!(e.key, "store.retain_delivered.share");
        let e = parse("[store]\nretain_delivered = { age = \"later\", share = \"10%\" }\n").unwrap_err();
        assert_eq!(e.key, "store.retain_delivered.age");
        let off = parse("[store]\nretain_delivered = { age = \"0s\", share = \"10%\" }\n").unwrap();
        assert_eq!(off.store.retain_delivered, None);
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_file() {
        let e = parse("[store]\nqouta = \"1 GiB\"\n").unwrap_err();
        assert_eq!(e.file, "test.toml");
        assert!(e.reason.contains("qouta"), "{e}");
    }

    #[test]
    fn bad_values_name_key_and_reason() {
        let e = parse("[store]\nfull_policy = \"drop-newest\"\n").unwrap_err();
        assert_eq!(e.key, "store.full_policy");
        assert!(e.reason.contains("drop-newest"));
        let e = parse("[store]\ndedup_window = \"soon\"\n").unwrap_err();
        assert_eq!(e.key, "store.dedup_window");
        let e = parse("[[store.class]]\nname = \"a\"\ntopics = [\"a/#/b\"]\npriority = 1\n").unwrap_err();
        assert_eq!(e.key, "store.class[0].topics");
        let e = parse("[agent]\ndevice_id = \"a/b\"\n").unwrap_err();
        assert_eq!(e.key, "agent.device_id");
    }

    #[test]
    fn a_non_loopback_listener_requires_a_token() {
        let e = parse("[ingest.http]\nlisten = \"0.0.0.0:7878\"\n").unwrap_err();
        assert_eq!(e.key, "ingest.http.token");
        let c = parse("[ingest.http]\nlisten = \"0.0.0.0:7878\"\ntoken = \"0123456789abcdef0123\"\n").unwrap();
        assert!(!format!("{c:?}").contains("0123456789abcdef"), "token must be redacted in Debug");
    }

    #[test]
    fn classes_pick_priority_and_ttl_by_first_matching_filter() {
        let c = parse(
            "[store]\nttl = \"1d\"\n[[store.class]]\nname = \"alarms\"\ntopics = [\"alarms/#\"]\npriority = 200\n\
             [[store.class]]\nname = \"debug\"\ntopics = [\"+/trace\"]\npriority = 10\nttl = \"1h\"\n",
        )
        .unwrap();
        assert_eq!(c.store.classify("alarms/fire"), (200, Some(Duration::from_secs(86_400))));
        assert_eq!(c.store.classify("x/trace"), (10, Some(Duration::from_secs(3_600))));
        assert_eq!(c.store.classify("telemetry/t"), (100, Some(Duration::from_secs(86_400))));
    }

    #[test]
    fn destinations_get_defaults_and_the_device_prefix() {
        let c = parse("[agent]\ndevice_id = \"gw-9\"\n[[destination]]\nname = \"aws\"\nurl = \"mqtts://example.com\"\nprotocol = \"v311\"\n").unwrap();
        let d = &c.destinations[0];
        assert_eq!((d.endpoint.host.as_str(), d.endpoint.port, d.endpoint.tls), ("example.com", 8883, true));
        assert_eq!(d.endpoint.protocol, Protocol::V311);
        assert_eq!(d.topic_prefix, "ferry/gw-9/");
        assert_eq!(d.endpoint.client_id, "ferry-gw-9-aws");
        assert!(d.routes("anything/at/all"));
        assert_eq!(c.store.consumers[0].name, "aws");
    }

    #[test]
    fn destination_mistakes_name_their_key() {
        let case = |body: &str| parse(&format!("[[destination]]\nname = \"a\"\n{body}\n")).unwrap_err().key;
        assert_eq!(case("url = \"http://x\""), "destination[0].url");
        assert_eq!(case("url = \"mqtt://x:99999\""), "destination[0].url");
        assert_eq!(case("url = \"mqtt://x\"\nprotocol = \"v4\""), "destination[0].protocol");
        assert_eq!(case("url = \"mqtt://x\"\nroutes = [\"a/#/b\"]"), "destination[0].routes");
        assert_eq!(case("url = \"mqtt://x\"\nkeep_alive = \"1s\""), "destination[0].keep_alive");
        assert_eq!(case("url = \"mqtt://x\"\npassword = \"p\""), "destination[0].password");
        assert_eq!(case("url = \"mqtt://x\"\nca_file = \"/ca.pem\""), "destination[0].ca_file");
        assert_eq!(case("url = \"mqtts://x\"\nca_file = \"/nonexistent/ca.pem\""), "destination[0].ca_file");
        assert_eq!(case("url = \"mqtt://x\"\ntopic_prefix = \"a/+/\""), "destination[0].topic_prefix");
        assert_eq!(case("url = \"mqtt://x\"\nurll = 1"), "(syntax)");
        let dup = parse(
            "[[destination]]\nname = \"a\"\nurl = \"mqtt://x\"\n[[destination]]\nname = \"a\"\nurl = \"mqtt://y\"\n",
        )
        .unwrap_err();
        assert_eq!(dup.key, "destination[1].name");
    }

    #[test]
    fn subscriptions_sit_below_the_prefix_and_merge_rules_name_a_merge_plugin() {
        let c = parse(
            "[agent]\ndevice_id = \"gw\"\n[[destination]]\nname = \"a\"\nurl = \"mqtt://x\"\nroutes = [\"t/#\"]\n\
             subscribe = [\"desired/#\"]\n",
        )
        .unwrap();
        let d = &c.destinations[0];
        assert!(d.subscribes("desired/fan") && !d.subscribes("t/x"));
        assert_eq!(d.subscription_filter(&d.routing.subscribe[0]).as_str(), "ferry/gw/desired/#");
        assert!(c.store.consumers[0].routing.may_take("desired/fan"), "state updates are retained until delivered");
        let e = parse("[[destination]]\nname = \"a\"\nurl = \"mqtt://x\"\nsubscribe = [\"a/#/b\"]\n").unwrap_err();
        assert_eq!(e.key, "destination[0].subscribe");
        let e = parse("[[merge]]\nkeys = \"desired/#\"\nplugin = \"nope\"\n").unwrap_err();
        assert_eq!(e.key, "merge[0].plugin");
        assert!(e.reason.contains("nope"), "{e}");
        let e = parse("[[merge]]\nkeys = \"a/#/b\"\nplugin = \"nope\"\n").unwrap_err();
        assert_eq!(e.key, "merge[0].keys");
    }
}
