//! The plugin host: user filters and merge functions as sandboxed
//! WebAssembly components (the contract is the WIT package in `wit/`).
//!
//! It owns loading (compile or cached artifact, world check), the sandbox
//! (deny-by-default WASI, CPU, memory and output bounds), deciding that a
//! call failed and what follows (rebuild, circuit breaker, counters) and the
//! async handle that keeps wasmtime off the tokio runtime. It knows nothing
//! of redb or MQTT: a stage hands each call its own rules
//! ([`convert::OutputRules`]), and decides what a decision or a failure
//! means for its events (see [`OnError`]).
//!
//! Host memory a plugin can make the agent hold is bounded by its config:
//! its instance's `memory`, one call's output (`max_output`, refused while
//! it is copied out), and, only where a fleet update can use them, a 1 MiB
//! ring of recent calls ([`recent`]).
//!
//! # Layout
//! - [`host`] — bindings, host imports, one [`Plugin`] with its instance.
//! - [`engine`] — the shared engines and the on-disk compile cache.
//! - [`breaker`] — the circuit breaker (pure state).
//! - [`chain`] — a stage's filters run in order, and the `on_error` policy.
//! - [`convert`] — events to and from the WIT types; what output is taken.
//! - [`check`] — `ferry plugin check|bench`: laws, counter-examples, timing.
//! - [`inputs`] — the check's data: the author's samples mutated, a declared shape, or built-in shapes.
//! - [`recent`] — a bounded sample of recent calls, replayed by fleet shadow runs.
//! - [`PluginHandle`] — the cloneable async handle to a plugin's own thread.

pub mod breaker;
pub mod chain;
pub mod check;
pub mod convert;
pub mod engine;
pub mod host;
pub mod inputs;
pub mod recent;

use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::oneshot;

pub use crate::config::plugin::{CpuLimit, OnError, OutputBound, PluginConfig, World};
pub use breaker::CircuitState;
pub use convert::{ContractOnly, Decision, OutputRules};
pub use host::{LoadReport, Plugin, Verdict, Versioned, WitEvent};
pub use recent::{Recent, Sample};

/// Why a plugin could not be loaded or a call failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum PluginError {
    /// The component file could not be read.
    #[error("cannot read {path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        reason: String,
    },
    /// The bytes are not a valid WebAssembly component.
    #[error("not a valid component: {0}")]
    Invalid(String),
    /// The component imports something the host does not provide.
    #[error("the component needs an import the host does not provide: {0}")]
    Link(String),
    /// A precompiled artifact was built for another target, wasmtime
    /// version or engine configuration.
    #[error(
        "the precompiled plugin does not fit this agent: {reason} (this agent expects {expected}); \
         precompile the .wasm again with `ferry plugin precompile --target …` for this device"
    )]
    Incompatible {
        /// wasmtime's account of the mismatch.
        reason: String,
        /// What this agent's engine expects.
        expected: String,
    },
    /// This build has no compiler and the plugin is not precompiled.
    #[error(
        "this ferry has no plugin compiler (built without the `compiler` feature) and loads only \
         precompiled plugins: run `ferry plugin precompile --target {target} PLUGIN.wasm -o PLUGIN.cwasm` \
         on a full build and point the plugin's path at the .cwasm"
    )]
    NoCompiler {
        /// This build's target triple.
        target: &'static str,
    },
    /// The component's exports do not match the world.
    #[error("the component does not target the `{}` world: {reason}", world.as_str())]
    WrongWorld {
        /// The world it was checked against.
        world: World,
        /// What is missing or mistyped.
        reason: String,
    },
    /// The wasmtime engine could not be set up.
    #[error("plugin engine: {0}")]
    Engine(String),
    /// The plugin trapped (a panic, `unreachable`, a bad memory access…).
    #[error("plugin trapped: {0}")]
    Trap(String),
    /// The call used up its fuel or passed its deadline.
    #[error("plugin call exceeded its CPU bound ({0:?})")]
    Timeout(CpuLimit),
    /// The instance tried to grow its memory past the limit.
    #[error("plugin ran out of memory (limit {limit} bytes)")]
    OutOfMemory {
        /// The configured limit.
        limit: u64,
    },
    /// The call returned, but its output breaks the contract or a rule of
    /// the stage that called it (the message names the event and the rule).
    #[error("invalid output: {0}")]
    InvalidOutput(String),
    /// The call handed the host more bytes than its output bound; refused
    /// while being copied, before the host held them.
    #[error("output over max_output: more than {limit} bytes in one call")]
    OutputTooLarge {
        /// The bound of that call.
        limit: u64,
    },
    /// The circuit breaker is open: the plugin failed repeatedly, so it is
    /// not called for a while.
    #[error("plugin circuit is open after repeated failures")]
    CircuitOpen,
    /// The plugin's thread has stopped.
    #[error("plugin is shut down")]
    Closed,
}

/// Counters and state of one plugin, for status and metrics.
#[derive(Debug, Clone, Serialize)]
pub struct PluginStatus {
    /// The plugin's name.
    pub name: String,
    /// Its world.
    pub world: World,
    /// Calls made (including failed ones).
    pub calls: u64,
    /// Events passed in (for merge: one per call).
    pub events: u64,
    /// Failed calls of every kind.
    pub failures: u64,
    /// Calls that trapped.
    pub traps: u64,
    /// Calls that ran out of fuel or time.
    pub timeouts: u64,
    /// Calls that hit the memory limit.
    pub out_of_memory: u64,
    /// Calls whose output broke the contract or a rule of the stage.
    pub invalid_output: u64,
    /// Calls whose output went over `max_output`.
    pub output_too_large: u64,
    /// Calls refused because the circuit was open.
    pub refused: u64,
    /// Fuel consumed (fuel-metered plugins only).
    pub fuel_used: u64,
    /// Instances built (the first, plus one per rebuild).
    pub instances_built: u64,
    /// The circuit breaker's state.
    pub circuit: CircuitState,
    /// Times the circuit opened.
    pub circuit_opened: u64,
    /// The latest failure, if any.
    pub last_error: Option<String>,
}

impl PluginStatus {
    /// A plugin's counters before its first call.
    pub(crate) fn new(name: &str, world: World) -> Self {
        Self {
            name: name.to_owned(),
            world,
            calls: 0,
            events: 0,
            failures: 0,
            traps: 0,
            timeouts: 0,
            out_of_memory: 0,
            invalid_output: 0,
            output_too_large: 0,
            refused: 0,
            fuel_used: 0,
            instances_built: 0,
            circuit: CircuitState::Closed,
            circuit_opened: 0,
            last_error: None,
        }
    }
}

/// The reply to a filter call.
type FilterReply = oneshot::Sender<Result<Vec<Decision>, PluginError>>;

/// Work for a plugin's thread.
enum Job {
    Filter(Vec<WitEvent>, Arc<dyn OutputRules>, FilterReply),
    Merge(String, Option<Versioned>, Versioned, oneshot::Sender<Result<Result<Vec<u8>, String>, PluginError>>),
    Swap(Box<Plugin>, oneshot::Sender<Box<Plugin>>),
}

/// Whether a plugin's recent calls are kept for fleet shadow runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sampling {
    /// Keep a bounded sample ([`recent`]): a fleet update may shadow a new version.
    Keep,
    /// Keep nothing: no fleet update can happen (no `[fleet]` section).
    Off,
}

/// Cloneable async handle to a plugin running on its own thread. Calls queue
/// on a bounded channel (so pressure reaches the caller) and never block the
/// tokio runtime. The thread stops when the last handle is dropped.
#[derive(Clone)]
pub struct PluginHandle {
    jobs: flume::Sender<Job>,
    status: Arc<Mutex<PluginStatus>>,
    recent: Arc<Mutex<Recent>>,
    name: Arc<str>,
    world: World,
    on_error: OnError,
}

impl PluginHandle {
    /// Moves `plugin` onto a new thread; at most `queue_depth` calls wait.
    /// Recent calls are sampled only under [`Sampling::Keep`].
    pub fn spawn(mut plugin: Plugin, queue_depth: usize, sampling: Sampling) -> Result<Self, PluginError> {
        let (jobs, rx) = flume::bounded::<Job>(queue_depth.max(1));
        let status = Arc::new(Mutex::new(plugin.status()));
        let shared = status.clone();
        let recent = Arc::new(Mutex::new(Recent::default()));
        let samples = recent.clone();
        let (name, world, on_error) = (Arc::<str>::from(plugin.name()), plugin.world(), plugin.on_error());
        std::thread::Builder::new()
            .name(format!("ferry-plugin-{name}"))
            .spawn(move || {
                // The status is updated before each reply, so a caller that
                // has its answer also sees the call counted.
                let publish = |plugin: &Plugin| *shared.lock().expect("plugin status lock") = plugin.status();
                for job in rx.iter() {
                    match job {
                        Job::Filter(events, rules, reply) => {
                            let events = Arc::new(events);
                            let decisions = plugin.filter_for(&events, rules.as_ref());
                            if let (Sampling::Keep, Ok(d)) = (sampling, &decisions) {
                                recent::offer(&samples, || Sample::Filter(events, d.clone()));
                            }
                            publish(&plugin);
                            let _ = reply.send(decisions);
                        }
                        Job::Merge(key, current, incoming, reply) => {
                            let merged = plugin.merge(&key, current.as_ref(), &incoming);
                            if let (Sampling::Keep, Ok(m)) = (sampling, &merged) {
                                recent::offer(&samples, || Sample::Merge(key, current, incoming, m.clone()));
                            }
                            publish(&plugin);
                            let _ = reply.send(merged);
                        }
                        Job::Swap(next, reply) => {
                            // Between two calls: no batch ever sees two versions.
                            let previous = std::mem::replace(&mut plugin, *next);
                            // Samples hold the old version's answers; a later shadow run compares with the new one.
                            *samples.lock().expect("recent samples lock") = Recent::default();
                            publish(&plugin);
                            let _ = reply.send(Box::new(previous));
                        }
                    }
                }
            })
            .map_err(|e| PluginError::Engine(format!("cannot start the plugin thread: {e}")))?;
        Ok(Self { jobs, status, recent, name, world, on_error })
    }

    /// Replaces the running plugin with `next` between two calls, and
    /// returns the one it replaced. Calls queued before run on the old
    /// version, calls after on the new one; counters restart with `next`.
    pub async fn swap(&self, next: Plugin) -> Result<Plugin, PluginError> {
        let (reply, rx) = oneshot::channel();
        self.jobs.send_async(Job::Swap(Box::new(next), reply)).await.map_err(|_| PluginError::Closed)?;
        rx.await.map(|p| *p).map_err(|_| PluginError::Closed)
    }

    /// The most recent successful calls sampled (oldest first), with what
    /// the running version answered; none unless spawned with [`Sampling::Keep`].
    pub fn recent(&self) -> Vec<Sample> {
        self.recent.lock().expect("recent samples lock").samples()
    }

    /// The plugin's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its world.
    pub fn world(&self) -> World {
        self.world
    }

    /// Its error policy.
    pub fn on_error(&self) -> OnError {
        self.on_error
    }

    /// Counters as of the latest finished call.
    pub fn status(&self) -> PluginStatus {
        self.status.lock().expect("plugin status lock").clone()
    }

    /// Runs the filter on a batch for a stage with `rules` (see [`Plugin::filter_for`]).
    pub async fn filter(
        &self,
        events: Vec<WitEvent>,
        rules: Arc<dyn OutputRules>,
    ) -> Result<Vec<Decision>, PluginError> {
        let (reply, rx) = oneshot::channel();
        self.jobs.send_async(Job::Filter(events, rules, reply)).await.map_err(|_| PluginError::Closed)?;
        rx.await.map_err(|_| PluginError::Closed)?
    }

    /// Runs the merge function (see [`Plugin::merge`]).
    pub async fn merge(
        &self,
        key: String,
        current: Option<Versioned>,
        incoming: Versioned,
    ) -> Result<Result<Vec<u8>, String>, PluginError> {
        let (reply, rx) = oneshot::channel();
        self.jobs.send_async(Job::Merge(key, current, incoming, reply)).await.map_err(|_| PluginError::Closed)?;
        rx.await.map_err(|_| PluginError::Closed)?
    }
}
