//! One loaded plugin and its instance: the WIT bindings, the host imports
//! (`log`, `config`, deny-by-default WASI), the CPU, memory and output
//! bounds, and failure handling (classify, rebuild, circuit breaker,
//! counters).
//!
//! `Plugin::call` is the one place that decides a call failed: a trap, a
//! timeout, running out of memory, output over `max_output` (refused while
//! it is copied out, before the host allocates it), and output the contract
//! or the calling stage's rules refuse ([`super::convert::decide`]) all
//! count alike, set `last_error`, feed the circuit breaker and discard the
//! instance.
//!
//! [`Plugin`] is synchronous and owns its `Store`; it must run off the async
//! runtime (see [`super::PluginHandle`]). It knows nothing of the store or
//! of MQTT: callers turn its decisions into effects.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use wasmtime::component::{HasSelf, Linker, Resource, ResourceTable};
use wasmtime::{Engine, ResourceLimiter, Store, Trap};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::breaker::{Breaker, BreakerConfig};
use super::convert::{self, ContractOnly, Decision, OutputRules};
use super::engine::{self, CompileSource, EPOCH_TICK, Metering};
use super::{PluginError, PluginStatus};
use crate::config::plugin::{CpuLimit, OnError, OutputBound, PluginConfig, World};

/// Bindings generated from `wit/`; the merge world reuses the filter
/// world's shared interfaces so the host implements them once.
pub mod bindings {
    /// The `filter` world.
    pub mod filter {
        wasmtime::component::bindgen!({
            path: "../wit",
            world: "filter",
            additional_derives: [PartialEq, Eq],
            with: { "ferry:plugin/types.batch": crate::plugin::host::EventBatch },
            // A bad index in a `batch` method traps the call.
            imports: { "ferry:plugin/types": trappable },
        });
    }
    /// The `merge` world.
    pub mod merge {
        wasmtime::component::bindgen!({
            path: "../wit",
            world: "merge",
            with: {
                "ferry:plugin/types": super::filter::ferry::plugin::types,
                "ferry:plugin/log": super::filter::ferry::plugin::log,
                "ferry:plugin/config": super::filter::ferry::plugin::config,
            },
        });
    }
}

use bindings::filter::ferry::plugin::{config as wit_config, log as wit_log, types as wit_types};
pub use wit_types::{Event as WitEvent, Verdict, Versioned};

/// Log records (and stdout/stderr lines) one call may emit; the rest are
/// counted and reported in one warning, so a chatty plugin cannot flood the log.
const LOG_BUDGET_PER_CALL: u32 = 100;

/// Longest log message or output line kept, in bytes.
const MAX_LOG_LINE: usize = 2048;

/// Lines of a call's stderr kept to explain a trap (a Rust panic prints its
/// message there just before it aborts).
const LAST_WORDS: usize = 4;

/// Longest guest message quoted in a one-line failure reason, in bytes.
const MAX_GUEST_MESSAGE: usize = 300;

/// Most table elements an instance may hold (guards host memory).
const MAX_TABLE_ELEMENTS: usize = 100_000;

/// Host state of one instance: the WASI context, the resource table, the
/// memory limiter and the plugin's identity and config.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: MemoryLimiter,
    name: Arc<str>,
    config: Arc<BTreeMap<String, String>>,
    logs: Arc<std::sync::Mutex<LogBudget>>,
}

/// What one call may log, and the last lines it wrote to stderr.
#[derive(Debug, Default)]
struct LogBudget {
    left: u32,
    suppressed: u32,
    last_words: std::collections::VecDeque<String>,
}

impl LogBudget {
    /// Starts a call: a fresh budget, nothing said yet.
    fn start(&mut self) {
        self.left = LOG_BUDGET_PER_CALL;
        self.last_words.clear();
    }

    fn said(&mut self, line: &str) {
        if self.last_words.len() == LAST_WORDS {
            self.last_words.pop_front();
        }
        self.last_words.push_back(clip(line).to_owned());
    }

    /// The guest's own account of a failure: its last stderr lines on one
    /// line, without Rust's backtrace hint.
    fn guest_message(&self) -> Option<String> {
        let text = self
            .last_words
            .iter()
            .map(|l| l.trim())
            .filter(|l| !l.is_empty() && !l.starts_with("note: run with `RUST_BACKTRACE"))
            .collect::<Vec<_>>()
            .join(" ");
        (!text.is_empty()).then(|| clip_to(&text, MAX_GUEST_MESSAGE).to_owned())
    }

    fn take(&mut self) -> bool {
        if self.left == 0 {
            self.suppressed += 1;
            return false;
        }
        self.left -= 1;
        true
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

/// Bounds the total size of an instance's linear memories.
struct MemoryLimiter {
    max_bytes: usize,
    used: usize,
    hit: bool,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let after = self.used.saturating_sub(current).saturating_add(desired);
        if after > self.max_bytes {
            self.hit = true;
            return Ok(false);
        }
        self.used = after;
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

fn clip(text: &str) -> &str {
    clip_to(text, MAX_LOG_LINE)
}

fn clip_to(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The events of one filter call, lent to the plugin as its `batch`
/// resource while the call runs. Shared, so lending copies nothing.
pub struct EventBatch(Arc<Vec<WitEvent>>);

impl HostState {
    fn event(&self, batch: &Resource<EventBatch>, index: u32) -> wasmtime::Result<&WitEvent> {
        let events = &self.table.get(batch)?.0;
        events
            .get(index as usize)
            .ok_or_else(|| wasmtime::format_err!("event index {index} is out of range for a batch of {}", events.len()))
    }
}

impl wit_types::Host for HostState {}

impl wit_types::HostBatch for HostState {
    fn len(&mut self, batch: Resource<EventBatch>) -> wasmtime::Result<u32> {
        Ok(u32::try_from(self.table.get(&batch)?.0.len())?)
    }

    fn get(&mut self, batch: Resource<EventBatch>, index: u32) -> wasmtime::Result<WitEvent> {
        Ok(self.event(&batch, index)?.clone())
    }

    fn id(&mut self, batch: Resource<EventBatch>, index: u32) -> wasmtime::Result<String> {
        Ok(self.event(&batch, index)?.id.clone())
    }

    fn source(&mut self, batch: Resource<EventBatch>, index: u32) -> wasmtime::Result<String> {
        Ok(self.event(&batch, index)?.source.clone())
    }

    fn type_(&mut self, batch: Resource<EventBatch>, index: u32) -> wasmtime::Result<String> {
        Ok(self.event(&batch, index)?.type_.clone())
    }

    fn subject(&mut self, batch: Resource<EventBatch>, index: u32) -> wasmtime::Result<String> {
        Ok(self.event(&batch, index)?.subject.clone())
    }

    fn time(&mut self, batch: Resource<EventBatch>, index: u32) -> wasmtime::Result<String> {
        Ok(self.event(&batch, index)?.time.clone())
    }

    fn datacontenttype(&mut self, batch: Resource<EventBatch>, index: u32) -> wasmtime::Result<Option<String>> {
        Ok(self.event(&batch, index)?.datacontenttype.clone())
    }

    fn data(&mut self, batch: Resource<EventBatch>, index: u32) -> wasmtime::Result<Vec<u8>> {
        Ok(self.event(&batch, index)?.data.clone())
    }

    fn sequence(&mut self, batch: Resource<EventBatch>, index: u32) -> wasmtime::Result<u64> {
        Ok(self.event(&batch, index)?.sequence)
    }

    fn hlc(&mut self, batch: Resource<EventBatch>, index: u32) -> wasmtime::Result<u64> {
        Ok(self.event(&batch, index)?.hlc)
    }

    fn partitionkey(&mut self, batch: Resource<EventBatch>, index: u32) -> wasmtime::Result<Option<String>> {
        Ok(self.event(&batch, index)?.partitionkey.clone())
    }

    fn extension(&mut self, batch: Resource<EventBatch>, index: u32, name: String) -> wasmtime::Result<Option<String>> {
        Ok(self.event(&batch, index)?.extensions.iter().find(|(k, _)| *k == name).map(|(_, v)| v.clone()))
    }

    fn drop(&mut self, batch: Resource<EventBatch>) -> wasmtime::Result<()> {
        // Plugins only ever get borrows and cannot create a batch, so this
        // is never reached in practice; the host deletes each batch after its call.
        self.table.delete(batch)?;
        Ok(())
    }
}

impl wit_log::Host for HostState {
    fn log(&mut self, level: wit_log::Level, message: String, fields: Vec<(String, String)>) {
        if !self.logs.lock().expect("log budget lock").take() {
            return;
        }
        let fields: String = fields.iter().map(|(k, v)| format!("{}={} ", clip(k), clip(v))).collect();
        let (plugin, message, fields) = (&*self.name, clip(&message), fields.trim_end());
        match level {
            wit_log::Level::Trace => tracing::trace!(plugin, fields, "{message}"),
            wit_log::Level::Debug => tracing::debug!(plugin, fields, "{message}"),
            wit_log::Level::Info => tracing::info!(plugin, fields, "{message}"),
            wit_log::Level::Warn => tracing::warn!(plugin, fields, "{message}"),
            wit_log::Level::Error => tracing::error!(plugin, fields, "{message}"),
        }
    }
}

impl wit_config::Host for HostState {
    fn get(&mut self, key: String) -> Option<String> {
        self.config.get(&key).cloned()
    }

    fn entries(&mut self) -> Vec<(String, String)> {
        // A BTreeMap iterates sorted by key, as the WIT promises.
        self.config.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

/// A plugin's stdout or stderr: each line becomes a log record.
#[derive(Clone)]
struct LogOutput {
    name: Arc<str>,
    stream: &'static str,
    logs: Arc<std::sync::Mutex<LogBudget>>,
}

struct LogOutputStream {
    out: LogOutput,
    line: Vec<u8>,
}

impl LogOutputStream {
    fn emit(&mut self) {
        if self.line.is_empty() {
            return;
        }
        let text = String::from_utf8_lossy(&self.line);
        let mut logs = self.out.logs.lock().expect("log budget lock");
        if self.out.stream == "stderr" {
            logs.said(&text);
        }
        if !logs.take() {
            drop(logs);
            self.line.clear();
            return;
        }
        drop(logs);
        tracing::info!(plugin = &*self.out.name, stream = self.out.stream, "{}", clip(text.trim_end()));
        self.line.clear();
    }
}

impl IsTerminal for LogOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(LogOutputStream { out: self.clone(), line: Vec::new() })
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        // Only WASIp3 guests use this path, and the host links WASIp2 only.
        Box::new(tokio::io::sink())
    }
}

impl OutputStream for LogOutputStream {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        for &b in bytes.iter() {
            if b == b'\n' {
                self.emit();
            } else if self.line.len() < MAX_LOG_LINE {
                self.line.push(b);
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        self.emit();
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LogOutputStream {
    async fn ready(&mut self) {}
}

/// A deny-by-default WASI context: no preopened directories, no network,
/// no environment or arguments, no stdin; stdout and stderr go to the log.
fn deny_by_default_wasi(name: &Arc<str>, logs: &Arc<std::sync::Mutex<LogBudget>>) -> WasiCtx {
    let out = |stream| LogOutput { name: name.clone(), stream, logs: logs.clone() };
    WasiCtx::builder()
        .stdout(out("stdout"))
        .stderr(out("stderr"))
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .build()
}

/// The compiled, linked form of a component, ready to instantiate.
enum Pre {
    Filter(bindings::filter::FilterPre<HostState>),
    Merge(bindings::merge::MergePre<HostState>),
}

enum Bindings {
    Filter(bindings::filter::Filter),
    Merge(bindings::merge::Merge),
}

struct Instance {
    store: Store<HostState>,
    bindings: Bindings,
}

/// A loaded plugin: compiled, linked against its world, with at most one
/// live instance that is reused across calls and rebuilt after a failure.
pub struct Plugin {
    name: Arc<str>,
    world: World,
    engine: Engine,
    pre: Pre,
    config: Arc<BTreeMap<String, String>>,
    cpu: CpuLimit,
    memory_bytes: usize,
    max_output: OutputBound,
    on_error: OnError,
    instance: Option<Instance>,
    breaker: Breaker,
    born: Instant,
    logs: Arc<std::sync::Mutex<LogBudget>>,
    status: PluginStatus,
}

/// Builds a linker for `world` with the host imports and deny-by-default WASI.
fn linker(engine: &Engine, world: World) -> Result<Linker<HostState>, PluginError> {
    let mut linker = Linker::new(engine);
    let link = |e: wasmtime::Error| PluginError::Engine(format!("{e:#}"));
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(link)?;
    match world {
        World::Filter => bindings::filter::Filter::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
            .map_err(link)?,
        World::Merge => {
            bindings::merge::Merge::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s).map_err(link)?
        }
    }
    Ok(linker)
}

/// What loading a component found.
#[derive(Debug, Clone)]
pub struct LoadReport {
    /// Cache hit or fresh compile.
    pub source: CompileSource,
    /// Time to compile or deserialise and link.
    pub load_time: Duration,
}

impl Plugin {
    /// Loads the component at `config.path` (compiling it or taking it from
    /// `cache_dir`) and checks that it targets `config.world`: its exports
    /// match and the host provides every import.
    pub fn load(config: &PluginConfig, cache_dir: Option<&std::path::Path>) -> Result<(Self, LoadReport), PluginError> {
        let wasm = std::fs::read(&config.path)
            .map_err(|e| PluginError::Read { path: config.path.display().to_string(), reason: e.to_string() })?;
        Self::from_bytes(config, &wasm, cache_dir)
    }

    /// Like [`Plugin::load`], from the component's bytes.
    pub fn from_bytes(
        config: &PluginConfig,
        wasm: &[u8],
        cache_dir: Option<&std::path::Path>,
    ) -> Result<(Self, LoadReport), PluginError> {
        let started = Instant::now();
        let metering = match config.cpu {
            CpuLimit::Fuel(_) => Metering::Fuel,
            CpuLimit::Timeout(_) => Metering::Epoch,
        };
        let engine = engine::engine(metering)?.clone();
        let (component, source) = engine::load_component(&config.name, &engine, metering, wasm, cache_dir)?;
        let linker = linker(&engine, config.world)?;
        let instance_pre = linker.instantiate_pre(&component).map_err(|e| PluginError::Link(format!("{e:#}")))?;
        let wrong_world =
            |e: wasmtime::Error| PluginError::WrongWorld { world: config.world, reason: format!("{e:#}") };
        let pre = match config.world {
            World::Filter => Pre::Filter(bindings::filter::FilterPre::new(instance_pre).map_err(wrong_world)?),
            World::Merge => Pre::Merge(bindings::merge::MergePre::new(instance_pre).map_err(wrong_world)?),
        };
        let name: Arc<str> = config.name.as_str().into();
        let status = PluginStatus::new(&config.name, config.world);
        let plugin = Plugin {
            name,
            world: config.world,
            engine,
            pre,
            config: Arc::new(config.config.clone()),
            cpu: config.cpu,
            memory_bytes: usize::try_from(config.memory_bytes).unwrap_or(usize::MAX),
            max_output: config.max_output,
            on_error: config.on_error,
            instance: None,
            breaker: Breaker::new(BreakerConfig::default()),
            born: Instant::now(),
            logs: Arc::default(),
            status,
        };
        Ok((plugin, LoadReport { source, load_time: started.elapsed() }))
    }

    /// Replaces the circuit breaker's tuning (tests and tools).
    pub fn set_breaker(&mut self, config: BreakerConfig) {
        self.breaker = Breaker::new(config);
    }

    /// The plugin's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The world it targets.
    pub fn world(&self) -> World {
        self.world
    }

    /// Its error policy.
    pub fn on_error(&self) -> OnError {
        self.on_error
    }

    /// Counters and circuit state now.
    pub fn status(&self) -> PluginStatus {
        let mut status = self.status.clone();
        status.circuit = self.breaker.state(self.now_ms());
        status.circuit_opened = self.breaker.opened;
        status
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Discards the live instance; the next call builds a fresh one.
    pub fn reset(&mut self) {
        self.instance = None;
    }

    /// Builds the instance now if there is none, so the first call does not
    /// pay for it. Bounded like a call.
    pub fn warm_up(&mut self) -> Result<(), PluginError> {
        if self.instance.is_none() {
            let instance = self.instantiate().inspect_err(|e| self.record_failure(e))?;
            self.instance = Some(instance);
        }
        Ok(())
    }

    fn instantiate(&mut self) -> Result<Instance, PluginError> {
        let state = HostState {
            wasi: deny_by_default_wasi(&self.name, &self.logs),
            table: ResourceTable::new(),
            limiter: MemoryLimiter { max_bytes: self.memory_bytes, used: 0, hit: false },
            name: self.name.clone(),
            config: self.config.clone(),
            logs: self.logs.clone(),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);
        self.arm(&mut store, 1)?;
        self.status.instances_built += 1;
        let bindings = match &self.pre {
            Pre::Filter(pre) => pre.instantiate(&mut store).map(Bindings::Filter),
            Pre::Merge(pre) => pre.instantiate(&mut store).map(Bindings::Merge),
        };
        let bindings = bindings.map_err(|e| self.classify(&store, e, 1))?;
        Ok(Instance { store, bindings })
    }

    /// Gives the store fresh CPU and output budgets for one call over `events` events.
    fn arm(&self, store: &mut Store<HostState>, events: usize) -> Result<u64, PluginError> {
        self.logs.lock().expect("log budget lock").start();
        store.data_mut().limiter.hit = false;
        // wasmtime counts every byte it lifts out of the plugin against this
        // (the result of the call, and any argument of a host import) and
        // stops before allocating past it.
        store.set_hostcall_fuel(usize::try_from(self.max_output.for_call(events)).unwrap_or(usize::MAX));
        match self.cpu {
            CpuLimit::Fuel(fuel) => {
                store.set_fuel(fuel).map_err(|e| PluginError::Engine(format!("{e:#}")))?;
                Ok(fuel)
            }
            CpuLimit::Timeout(timeout) => {
                let ticks = timeout.as_micros().div_ceil(EPOCH_TICK.as_micros()) + 1;
                store.set_epoch_deadline(u64::try_from(ticks).unwrap_or(u64::MAX));
                Ok(0)
            }
        }
    }

    /// Turns a wasmtime error from a call over `events` events into what
    /// went wrong, in one line; the full error with the wasm backtrace goes
    /// to the debug log.
    fn classify(&self, store: &Store<HostState>, error: wasmtime::Error, events: usize) -> PluginError {
        tracing::debug!(plugin = &*self.name, "plugin call failed: {error:?}");
        if store.data().limiter.hit {
            return PluginError::OutOfMemory { limit: self.memory_bytes as u64 };
        }
        if let Some(Trap::OutOfFuel | Trap::Interrupt) = error.downcast_ref::<Trap>() {
            return PluginError::Timeout(self.cpu);
        }
        if is_output_over_bound(&error) {
            return PluginError::OutputTooLarge { limit: self.max_output.for_call(events) };
        }
        // A trap names its kind; an error from a host import says itself what was wrong.
        let what = match error.downcast_ref::<Trap>() {
            Some(trap) => trap.to_string(),
            None => error.root_cause().to_string(),
        };
        let what = what.lines().next().unwrap_or_default().to_owned();
        match self.logs.lock().expect("log budget lock").guest_message() {
            Some(said) => PluginError::Trap(format!("{what}; the plugin said: {said}")),
            None => PluginError::Trap(what),
        }
    }

    fn record_failure(&mut self, error: &PluginError) {
        let s = &mut self.status;
        s.failures += 1;
        match error {
            PluginError::Timeout(_) => s.timeouts += 1,
            PluginError::OutOfMemory { .. } => s.out_of_memory += 1,
            PluginError::Trap(_) => s.traps += 1,
            PluginError::InvalidOutput(_) => s.invalid_output += 1,
            PluginError::OutputTooLarge { .. } => s.output_too_large += 1,
            _ => {}
        }
        s.last_error = Some(format!("plugin {}: {error}", self.name));
        let now = self.now_ms();
        if self.breaker.failure(now) {
            tracing::warn!(plugin = &*self.name, error = %error, "plugin keeps failing: circuit opened");
        }
    }

    /// Runs one call over `events` events on the live instance (building it
    /// first if needed), with fresh CPU and output budgets, then has `check`
    /// take its result. On any failure, of the call or of `check`, the
    /// instance is discarded so the next call starts from a clean one.
    fn call<R, T>(
        &mut self,
        events: usize,
        f: impl FnOnce(&mut Instance) -> wasmtime::Result<R>,
        check: impl FnOnce(R) -> Result<T, String>,
    ) -> Result<T, PluginError> {
        if !self.breaker.allows(self.now_ms()) {
            self.status.refused += 1;
            return Err(PluginError::CircuitOpen);
        }
        self.status.calls += 1;
        self.status.events += events as u64;
        let mut instance = match self.instance.take() {
            Some(instance) => instance,
            None => self.instantiate().inspect_err(|e| self.record_failure(e))?,
        };
        let fuel = self.arm(&mut instance.store, events)?;
        let result = f(&mut instance);
        if fuel > 0 {
            self.status.fuel_used += fuel.saturating_sub(instance.store.get_fuel().unwrap_or(0));
        }
        let suppressed = std::mem::take(&mut self.logs.lock().expect("log budget lock").suppressed);
        if suppressed > 0 {
            tracing::warn!(
                plugin = &*self.name,
                suppressed,
                "plugin log records over the per-call budget were dropped"
            );
        }
        let outcome = match result {
            Ok(r) => check(r).map_err(PluginError::InvalidOutput),
            Err(e) => Err(self.classify(&instance.store, e, events)),
        };
        match outcome {
            Ok(r) => {
                self.instance = Some(instance);
                self.breaker.success();
                Ok(r)
            }
            Err(e) => {
                drop(instance);
                self.record_failure(&e);
                Err(e)
            }
        }
    }

    /// Builds the instance and makes one call that needs no data (a filter
    /// on an empty batch; a merge of empty data into nothing), so a plugin
    /// that cannot start (it traps on its config, say) is found before it
    /// meets an event. A merge plugin refusing the empty data is an answer,
    /// not a failure.
    pub fn probe(&mut self) -> Result<(), PluginError> {
        match self.world {
            World::Filter => self.filter(&Arc::new(Vec::new())).map(drop),
            World::Merge => {
                let empty = Versioned { data: Vec::new(), version: Vec::new(), hlc: 0, origin: "ferry".into() };
                self.merge("ferry/probe", None, &empty).map(drop)
            }
        }
    }

    /// Calls the filter on a batch, with no stage rules beyond the contract
    /// (see [`Plugin::filter_for`]).
    pub fn filter(&mut self, events: &Arc<Vec<WitEvent>>) -> Result<Vec<Decision>, PluginError> {
        self.filter_for(events, &ContractOnly)
    }

    /// Calls the filter on a batch for a stage with `rules`. One checked
    /// decision per event comes back, or the call is a failure: output over
    /// `max_output` ([`PluginError::OutputTooLarge`]), or verdicts the
    /// contract or `rules` refuse ([`PluginError::InvalidOutput`]).
    pub fn filter_for(
        &mut self,
        events: &Arc<Vec<WitEvent>>,
        rules: &dyn OutputRules,
    ) -> Result<Vec<Decision>, PluginError> {
        if self.world != World::Filter {
            return Err(PluginError::WrongWorld { world: World::Filter, reason: "this is a merge plugin".into() });
        }
        let n = events.len();
        self.call(
            n,
            |i| match &i.bindings {
                Bindings::Filter(b) => {
                    let batch = i.store.data_mut().table.push(EventBatch(events.clone()))?;
                    let result = b.call_filter(&mut i.store, Resource::new_borrow(batch.rep()));
                    i.store.data_mut().table.delete(batch)?;
                    result
                }
                Bindings::Merge(_) => unreachable!("world checked above"),
            },
            |verdicts: Vec<Verdict>| convert::decide(events, verdicts, rules),
        )
    }

    /// Calls the merge function. The inner `Err` is the plugin's own
    /// refusal, which is not a failure of the plugin.
    pub fn merge(
        &mut self,
        key: &str,
        current: Option<&Versioned>,
        incoming: &Versioned,
    ) -> Result<Result<Vec<u8>, String>, PluginError> {
        if self.world != World::Merge {
            return Err(PluginError::WrongWorld { world: World::Merge, reason: "this is a filter plugin".into() });
        }
        self.call(
            1,
            |i| match &i.bindings {
                Bindings::Merge(b) => b.call_merge(&mut i.store, key, current, incoming),
                Bindings::Filter(_) => unreachable!("world checked above"),
            },
            |merged: Result<Vec<u8>, String>| {
                // A refusal is the plugin's answer, not a failure; one line of it is enough.
                Ok(merged.map_err(|why| clip_to(why.lines().next().unwrap_or_default(), MAX_GUEST_MESSAGE).to_owned()))
            },
        )
    }
}

/// Whether a call failed because the plugin handed the host more bytes
/// than the call's output bound (wasmtime's hostcall fuel ran out). wasmtime
/// does not export that error's type, so its message is matched; a test
/// with a real component pins the wording.
fn is_output_over_bound(error: &wasmtime::Error) -> bool {
    error.chain().any(|cause| cause.to_string().contains("fuel allocated for hostcalls has been exhausted"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_limiter_counts_all_memories_of_an_instance() {
        let mut l = MemoryLimiter { max_bytes: 100, used: 0, hit: false };
        assert!(l.memory_growing(0, 60, None).unwrap());
        assert!(!l.memory_growing(0, 60, None).unwrap(), "a second memory shares the budget");
        assert!(l.hit);
        assert!(l.memory_growing(60, 100, None).unwrap());
        assert_eq!(l.used, 100);
    }

    #[test]
    fn long_log_text_is_clipped_on_a_char_boundary() {
        let text = "é".repeat(MAX_LOG_LINE);
        let clipped = clip(&text);
        assert!(clipped.len() <= MAX_LOG_LINE && text.starts_with(clipped));
    }
}
