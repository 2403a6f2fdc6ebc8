//! Wasmtime engines and the on-disk cache of compiled components.
//!
//! Two process-wide engines exist, created on first use: one meters fuel
//! (deterministic CPU bounds), one checks an epoch deadline (wall-clock
//! bounds, driven by a ticker thread). Neither enables
//! `component-model-async`, which would make every call about 3× slower.
//!
//! Compiling a component takes seconds on a small device, so compiled code
//! is kept in a cache directory, one file per (engine configuration, wasmtime
//! version, component hash): a restart deserialises instead of compiling.
//! Files are written to a temporary name, synced and renamed, so a crash
//! never leaves a torn artifact under a real key.

use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::{Config, Engine, OptLevel};

use super::PluginError;

/// How often the epoch advances; a timeout is rounded up to whole ticks.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Which kind of CPU bound an engine enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metering {
    /// Fuel: a budget of instructions per call.
    Fuel,
    /// Epoch deadline: a budget of wall-clock ticks per call.
    Epoch,
}

/// The shared engine for `metering`.
pub fn engine(metering: Metering) -> Result<&'static Engine, PluginError> {
    static FUEL: OnceLock<Engine> = OnceLock::new();
    static EPOCH: OnceLock<Engine> = OnceLock::new();
    let cell = match metering {
        Metering::Fuel => &FUEL,
        Metering::Epoch => &EPOCH,
    };
    if let Some(engine) = cell.get() {
        return Ok(engine);
    }
    let mut config = Config::new();
    config.wasm_component_model(true).cranelift_opt_level(OptLevel::Speed).parallel_compilation(true);
    match metering {
        Metering::Fuel => config.consume_fuel(true),
        Metering::Epoch => config.epoch_interruption(true),
    };
    let engine = Engine::new(&config).map_err(|e| PluginError::Engine(format!("{e:#}")))?;
    let mut started = false;
    let engine = cell.get_or_init(|| {
        started = true;
        engine
    });
    if started && metering == Metering::Epoch {
        let ticking = engine.clone();
        std::thread::Builder::new()
            .name("ferry-plugin-epoch".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(EPOCH_TICK);
                    ticking.increment_epoch();
                }
            })
            .map_err(|e| PluginError::Engine(format!("cannot start the epoch ticker: {e}")))?;
    }
    Ok(engine)
}

/// Whether a component came from the cache or was compiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CompileSource {
    /// Deserialised from a cached artifact.
    Cache,
    /// Compiled now (and cached, when a cache directory is set).
    Compiled,
}

/// The cache file for `wasm` under `engine` in `dir`.
pub fn cache_path(dir: &Path, engine: &Engine, wasm: &[u8]) -> PathBuf {
    // The engine hash covers wasmtime's version and every setting that
    // changes generated code; deserialisation re-checks both anyway.
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    let digest = Sha256::digest(wasm);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    dir.join(format!("{hex}-{:016x}.cwasm", hasher.finish()))
}

/// Compiles `wasm`, or loads it from `cache_dir` when it was compiled before.
pub fn load_component(
    engine: &Engine,
    wasm: &[u8],
    cache_dir: Option<&Path>,
) -> Result<(Component, CompileSource), PluginError> {
    let Some(dir) = cache_dir else {
        return Ok((compile(engine, wasm)?, CompileSource::Compiled));
    };
    let path = cache_path(dir, engine, wasm);
    if path.is_file() {
        // SAFETY: the file is one this process family wrote with
        // `Component::serialize` into the agent's private cache directory
        // (renamed into place only once complete); wasmtime also checks its
        // header for version and configuration compatibility.
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(component) => return Ok((component, CompileSource::Cache)),
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "ignoring an unusable compiled plugin"),
        }
    }
    let component = compile(engine, wasm)?;
    match component.serialize() {
        Ok(bytes) => {
            if let Err(e) = write_atomically(&path, &bytes) {
                tracing::warn!(path = %path.display(), error = %e, "cannot cache the compiled plugin");
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot serialise the compiled plugin"),
    }
    Ok((component, CompileSource::Compiled))
}

fn compile(engine: &Engine, wasm: &[u8]) -> Result<Component, PluginError> {
    Component::from_binary(engine, wasm).map_err(|e| PluginError::Invalid(format!("{e:#}")))
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename is durable only once the directory is synced.
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
