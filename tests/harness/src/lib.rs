//! Test harness for Ferry's integration, fault and interop tests.
//!
//! Everything here talks over real sockets on ephemeral loopback ports, and
//! every process it starts it also stops, by process id, when the owning value
//! is dropped. Nothing here depends on the agent crate.
//!
//! # Layout
//!
//! - [`mosquitto`]: a real `mosquitto` process per test, with plain and TLS
//!   listeners, persistence, kill and restart on the same port.
//! - [`inprocess`]: an in-process `rumqttd` broker, the second broker
//!   implementation for interop tests.
//! - [`brokers`]: [`Broker`], any of the interop matrix's implementations
//!   ([`Implementation`]: Mosquitto, rumqttd, NATS, RabbitMQ, aedes, amqtt,
//!   RMQTT) behind one start/kill/restart interface.
//! - [`proxy`]: [`FaultProxy`], a TCP proxy that injects latency, cuts and
//!   half-open (blackholed) links at runtime.
//! - [`cloud`]: [`CloudEmulator`], an MQTT-aware proxy that holds clients to a
//!   cloud's documented limits ([`CloudProfile`]: AWS IoT Core, Azure Event
//!   Grid, Azure IoT Hub, HiveMQ Cloud) and counts violations and billed units.
//! - [`tls`]: a throwaway PKI (test CA, server and client certs, a rogue CA)
//!   written as PEM files, and rustls client configs on the ring provider.
//! - [`mqtt`]: [`Collector`], a subscriber that records every publish it
//!   receives, plus small client helpers.
//! - [`net`]: ephemeral port selection and waiting for a port to accept.
//!
//! Caveat for sockets owned by the test process (proxy, in-process broker):
//! while any thread spawns a child, that child holds copies of every fd until
//! it execs, so a closed listener or a reset connection can linger for that
//! moment. Assert "closed" by polling with a deadline, not with one probe.
//!
//! Errors are `anyhow` on purpose: a harness failure ends the test, so what
//! matters is a message that says what went wrong (with the broker's log).

pub mod brokers;
pub mod cloud;
pub mod inprocess;
pub mod mosquitto;
pub mod mqtt;
pub mod net;
pub mod proxy;
pub mod tls;

pub use brokers::{Broker, BrokerOptions, Implementation, Restart, kill_mid_window};
pub use cloud::{CloudCounters, CloudEmulator, CloudHandle, CloudProfile, Excess, RateLimit};
pub use inprocess::InProcessBroker;
pub use mosquitto::{Autosave, Mosquitto, MosquittoOptions, TlsListener};
pub use mqtt::{Collector, Protocol, Received};
pub use proxy::{FaultProxy, Mode, ProxyHandle};
pub use tls::TestPki;

// The client and TLS crates the harness is built on, so tests use the same
// versions and the same ring-only rustls.
pub use rumqttc;
pub use rustls;
