//! Multi-cloud state sync (contract 6): state that several clouds write —
//! desired configuration, setpoints, commands — merged per key into one
//! value that every replica agrees on.
//!
//! Clouds send updates on the destinations' `subscribe` filters (through
//! [`crate::downlink`]); producers on the device write with `PUT
//! /v1/state/{key}`. Every update carries a version (version vector, HLC,
//! origin); dominated and duplicate versions are ignored, dominating ones
//! replace, concurrent ones are merged by the key's merge plugin or by
//! last-writer-wins on `(hlc, origin)`. Each change is pushed back to every
//! cloud subscribing to the key that does not hold it yet, as a retained,
//! Ferry-versioned publish queued through the event log.
//!
//! # Layout
//! - [`version`] — the pure core: version vectors and the decision rule.
//! - [`wire`] — versions on MQTT: user properties or a CloudEvents envelope.
//! - [`db`] — the durable state tables in the store's redb file.
//! - [`service`] — the task that applies updates and reconciles clouds.
//! - [`local`] — optional retained publishing of merged state to a local broker.

pub mod db;
pub mod local;
pub mod service;
pub mod version;
pub mod wire;

pub use db::{Change, Entry};
pub use service::{StateError, StateHandle, StateService, StateServiceConfig, StateStatus};
pub use version::{Causality, Decision, Version, VersionVector};
