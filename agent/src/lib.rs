//! Ferry: an edge store-and-forward agent.
//!
//! Local producers hand Ferry events; it stores each one durably in an
//! embedded redb file before saying yes, and (in later layers) forwards them
//! over MQTT to several clouds, each on its own schedule.
//!
//! # Layout
//!
//! Dependencies point down this list; nothing lower knows what is above it.
//!
//! - [`cli`] — the `ferry` command line and its HTTP client commands.
//! - [`runtime`] — wiring: builds the services, runs them, orders shutdown.
//! - [`ingest`] — producer input: body decoding ([`ingest::parse`]), defaults
//!   and limits, and the HTTP API ([`ingest::http`]).
//! - [`fleet`] — signed plugin updates from a fleet manager: download,
//!   verify, check, shadow, activate, roll back.
//! - [`state`] — multi-cloud state sync: versions, merge, the state table,
//!   reconciliation of the clouds, the `/v1/state` API.
//! - [`downlink`] — cloud-to-device messages: the forwarders' subscriptions,
//!   routed by topic filter to their consumers, acked once handled.
//! - [`store`] — the redb event log: group commit, dedup, quota and
//!   eviction, TTL and dead letters, forwarder cursors.
//! - [`plugin`] — the WebAssembly plugin host: sandboxed filter and merge
//!   components (wasmtime), their bounds, failure policy and circuit breaker.
//! - [`event`] — the CloudEvents record and its versioned storage encoding.
//! - [`topic`] — MQTT topic name validation and filter matching.
//! - [`clock`] — the injectable wall clock and the hybrid logical clock.
//! - [`config`] — the TOML config: parsed, then validated into [`config::Config`].

pub mod cli;
pub mod clock;
pub mod config;
pub mod downlink;
pub mod event;
pub mod fleet;
pub mod forward;
pub mod ingest;
pub mod plugin;
pub mod runtime;
pub mod state;
pub mod store;
pub mod topic;
