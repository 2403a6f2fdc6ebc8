//! Ferry: an edge store-and-forward agent.
//!
//! Local producers hand Ferry events; it stores each one durably in an
//! embedded redb file before saying yes, and forwards them over MQTT to
//! several clouds, each on its own schedule. User logic runs as sandboxed
//! WebAssembly plugins; state written in several clouds is merged per key.
//!
//! # Layout
//!
//! Dependencies point down this list; nothing lower knows what is above it.
//!
//! - [`cli`] — the `ferry` command line and its HTTP client commands.
//! - `demo` — `ferry demo`: two in-process clouds, a sensor fleet and an
//!   outage, verified end to end (cargo feature `demo`, on by default).
//! - [`systemd`] — readiness, watchdog and stopping notifications under systemd.
//! - [`runtime`] — wiring: builds the services, runs them, orders shutdown.
//! - [`api`] — every HTTP route: events and receipts, status and health,
//!   replays, the operator's routes (`/metrics`, dead letters), the state API.
//! - [`ingest`] — producer input: body decoding ([`ingest::parse`]), defaults,
//!   limits and ingest filters, and local MQTT ingest ([`ingest::mqtt`]).
//! - [`fleet`] — signed plugin updates from a fleet manager: download,
//!   verify, check, shadow, activate, roll back.
//! - [`state`] — multi-cloud state sync: versions, merge, the state table,
//!   reconciliation of the clouds, the `/v1/state` API.
//! - [`metrics`] — the Prometheus scrape: reads every part below.
//! - [`forward`] — one task per destination publishing the log over MQTT,
//!   and replaying it on request.
//! - [`downlink`] — cloud-to-device messages: the forwarders' subscriptions,
//!   routed by topic filter to their consumers, acked once handled.
//! - [`mqtt`] — the MQTT session layer: one supervised reconnect loop,
//!   links of either protocol version, TLS, backoff and pacing.
//! - [`store`] — the redb event log: group commit, dedup, quota and
//!   eviction, TTL and dead letters, forwarder cursors, delivered events
//!   kept for replay.
//! - [`plugin`] — the WebAssembly plugin host: sandboxed filter and merge
//!   components (wasmtime), their bounds, failure policy and circuit breaker.
//! - [`limits`] — what each destination's broker accepts: the one check
//!   behind ingest's refusals and the forwarder's dead letters.
//! - [`wire`] — the CloudEvents MQTT binding: how an event becomes a
//!   publish, and how large that publish is.
//! - [`event`] — the CloudEvents record, its attribute rules and its
//!   versioned storage encoding.
//! - [`config`] — the TOML config: parsed, then validated into [`config::Config`].
//! - [`signing`] — the fleet's Ed25519 keys: key files and key ids.
//! - [`sas`] — Azure IoT Hub's shared access signatures (MQTT passwords).
//! - [`topic`] — MQTT topic name validation, filter matching and the MQTT
//!   string rule.
//! - [`durable_file`] — crash-safe whole-file writes (plugin artifacts, fleet staging).
//! - [`histogram`] — lock-free fixed-bucket histograms (commit time, delivery lag).
//! - [`clock`] — the injectable wall clock and the hybrid logical clock.

/// The process's allocator (feature `mimalloc`): the agent's per-event
/// allocations are small and made on several threads at once.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `println!` that returns an error instead of panicking when standard
/// output cannot be written (a closed pipe, a full disk).
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        anyhow::Context::context(writeln!(std::io::stdout().lock(), $($arg)*), "writing to standard output")
    }};
}

pub mod api;
pub mod cli;
pub mod clock;
pub mod config;
#[cfg(feature = "demo")]
pub mod demo;
pub mod downlink;
pub mod durable_file;
pub mod event;
pub mod fleet;
pub mod forward;
pub mod histogram;
pub mod ingest;
pub mod limits;
pub mod metrics;
pub mod mqtt;
pub mod plugin;
pub mod runtime;
pub mod sas;
pub mod signing;
pub mod state;
pub mod store;
pub mod systemd;
pub mod topic;
pub mod wire;
