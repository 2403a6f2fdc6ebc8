//! Write Ferry plugins in plain Rust and export them as WebAssembly components
//! for the `ferry:plugin` worlds (see `wit/` at the repository root).
//!
//! A plugin is a type that implements [`Filter`] or [`Merge`], built once per
//! instance from its [`Config`], and exported with `export_filter!` (cargo
//! feature `filter`) or `export_merge!` (feature `merge`). Enable only the
//! feature of the world the plugin targets: the other world's bindings would
//! end up in the component's type. The SDK hides wit-bindgen: the export glue exists only
//! on `wasm32`, so the same crate unit-tests its logic with plain
//! `cargo test` on the host.
//!
//! # Layout
//! - [`Filter`], `export_filter!` — the `filter` world: batches of events in,
//!   one [`Verdict`] per event out.
//! - [`Events`], [`EventRef`] — a batch, read attribute by attribute.
//! - [`Merge`], `export_merge!` — the `merge` world: reconcile concurrent
//!   [`Versioned`] state.
//! - [`Config`], [`ConfigError`] — the plugin's own config table.
//! - [`log`] — structured logging into the agent's log.
//! - `bindings` — the wit-bindgen output, private.

mod bindings;
mod config;
mod events;
mod export;
pub mod log;

pub use bindings::host::ferry::plugin::types::{Event, Verdict, Versioned};
pub use config::{Config, ConfigError};
pub use events::{EventRef, Events};

/// A filter or transform in the `filter` world.
///
/// The host calls [`Filter::filter`] with batches of events before they are
/// forwarded; an instance lives across many batches, so `self` may keep state
/// (counters, last values). A panic traps the instance: the batch follows the
/// plugin's `on_error` policy and the host builds a new instance.
pub trait Filter: Sized + 'static {
    /// Builds the plugin from its config table, once per instance before the
    /// first batch. An error is logged and traps the instance.
    fn new(config: &Config) -> Result<Self, ConfigError>;

    /// Returns exactly one verdict per event, in the same order. The events
    /// stay in the host; read only the attributes the decision needs (each
    /// read is a copy), or [`EventRef::to_event`] to transform one.
    fn filter(&mut self, events: &Events<'_>) -> Vec<Verdict>;
}

/// A merge (conflict-resolution) function in the `merge` world.
///
/// Called only for concurrent versions; the host computes the merged version
/// vector and HLC. The result must not depend on argument order, grouping or
/// repetition (commutative, associative, idempotent) so replicas converge;
/// that is why `merge` takes `&self`.
pub trait Merge: Sized + 'static {
    /// Builds the plugin from its config table, once per instance before the
    /// first call. An error is logged and traps the instance.
    fn new(config: &Config) -> Result<Self, ConfigError>;

    /// Merges `incoming` into `current` (none when `key` has no value yet)
    /// and returns the merged data, or a message saying why it cannot.
    fn merge(&self, key: &str, current: Option<Versioned>, incoming: Versioned) -> Result<Vec<u8>, String>;
}

/// Used by the export macros; not part of the API.
#[doc(hidden)]
pub mod __private {
    #[cfg(feature = "filter")]
    pub use crate::bindings::filter;
    #[cfg(feature = "merge")]
    pub use crate::bindings::merge;
    #[cfg(target_arch = "wasm32")]
    pub use crate::export::instance;
    /// How the `filter` export receives its borrowed batch.
    pub type BatchRef<'a> = &'a crate::bindings::host::ferry::plugin::types::Batch;
}
