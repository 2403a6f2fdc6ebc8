//! Fleet updates: signed plugin bundles pushed by a fleet manager over the
//! destinations' brokers, staged durably, checked, shadowed, activated
//! atomically between batches, and rolled back automatically when the new
//! version fails on probation (ARCHITECTURE.md contract 7).
//!
//! One updater task owns every plugin's update state. It talks to the fleet
//! manager over each fleet destination's own connection, as that
//! destination's downlink companion ([`crate::downlink::Companion`]): the
//! forwarder subscribes to the fleet topics the updater asks for (a
//! version's chunks only while downloading it), hands it what arrives and
//! acknowledges each message once handled (a chunk once on disk), and
//! publishes the updater's reports retained, paced with the events. A
//! device keeps one connection, and one client id, per cloud.
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
