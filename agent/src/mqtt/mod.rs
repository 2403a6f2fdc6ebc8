//! The MQTT session layer: every broker connection Ferry keeps goes through
//! here, whatever it is for (forwarding to a cloud, local ingest, local
//! state, fleet updates).
//!
//! - [`session`] — the one supervised loop: connect within a CONNACK
//!   deadline, run the owner's session, reconnect with backoff.
//! - [`link`] — one rumqttc connection of either protocol version.
//! - [`tls`] — the rustls client config of an `mqtts://` endpoint.
//! - [`backoff`] — reconnect delays with full jitter.
//! - [`pace`] — the pure pacer: publishes spaced evenly within a cloud's
//!   publish and byte rates.

pub mod backoff;
pub mod link;
pub mod pace;
pub mod session;
pub mod tls;

pub use link::{BrokerLimits, Incoming, Link, LinkError, LinkEvent, LinkOptions, RefusalKind};
pub use session::{Connected, End, Session, Supervisor};
pub use tls::tls_config;
