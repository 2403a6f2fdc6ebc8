//! Fleet updates: signed plugin bundles pushed by a fleet manager over the
//! destinations' brokers, staged durably, checked, shadowed, activated
//! atomically between batches, and rolled back automatically when the new
//! version fails on probation (ARCHITECTURE.md contract 7).
//!
//! One updater task owns every plugin's update state; one link task per
//! fleet destination subscribes to the fleet topics, hands what arrives to
//! the updater, and publishes the updater's reports retained. The links are
//! their own MQTT sessions (client id `{client_id}-fleet`): they subscribe
//! to a version's chunks only while downloading it, and their publishes never
//! mix with the forwarder's in-flight window.
//!
//! # Layout
//! - [`bundle`] — manifest, chunks, bundle files, keys and signatures (pure).
//! - [`topics`] — the fleet topic names.
//! - [`staging`] — the per-plugin directory: state, downloads, components.
//! - [`report`] — the status report.
//! - [`machine`] — the update rules as pure decisions and state moves.
//! - [`updater`] — the updater task performing them, and its link tasks.

pub mod bundle;
pub mod machine;
pub mod report;
pub mod staging;
pub mod topics;
pub mod updater;

pub use staging::installed_component;
pub use updater::{FleetPlugin, spawn};
