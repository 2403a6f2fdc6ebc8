//! Wasmtime engines and the on-disk cache of compiled components.
//!
//! Two process-wide engines exist, created on first use: one meters fuel
//! (deterministic CPU bounds), one checks an epoch deadline (wall-clock
//! bounds, driven by a ticker thread). Neither enables
//! `component-model-async`, which would make every call about 3× slower.
//!
//! Compiling a component takes seconds on a small device (a Python
//! component, with CPython inside, 10 s and 540 MiB on the 2-core
//! development machine), so compiled code is kept in a cache directory, one
//! file per (engine configuration, wasmtime version, component hash): a
//! restart deserialises instead of compiling. The agent, `ferry config
//! check` and the plugin tools share one directory ([`cache_dir`]), so
//! whichever compiles first saves the others the work; it is pruned
//! ([`prune_cache`]) of what has not been used for [`CACHE_MAX_AGE`] and
//! kept under [`CACHE_MAX_BYTES`]. Files are written to a temporary name,
//! synced and renamed, so a crash never leaves a torn artifact under a real
//! key. While a component compiles, the log says so every few seconds.
//!
//! A plugin file may also be an artifact precompiled for this device
//! ([`precompile`], `ferry plugin precompile`): it is loaded as it is, and
//! one built for another target, wasmtime version or engine configuration
//! is refused with the mismatch named. Builds without the `compiler`
//! feature load only such artifacts.

#[cfg(feature = "compiler")]
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[cfg(feature = "compiler")]
use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::{Config, Engine};

use super::PluginError;
#[cfg(feature = "compiler")]
use crate::durable_file::write_atomically;

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
    let engine = Engine::new(&config(metering)).map_err(|e| PluginError::Engine(format!("{e:#}")))?;
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

/// The engine configuration for `metering`, shared by the agent's engines
/// and [`precompile`] so that precompiled artifacts load into the agent.
fn config(metering: Metering) -> Config {
    let mut config = Config::new();
    config.wasm_component_model(true);
    // wasmtime picks Pulley by itself only where Cranelift has no backend
    // (32-bit ARM); riscv64 has one but cannot use it (see `runs_native_code`).
    if !runs_native_code(NATIVE_TARGET) && cfg!(target_pointer_width = "64") {
        config.target("pulley64").expect("`pulley64` is a target wasmtime knows");
    }
    #[cfg(feature = "compiler")]
    config.cranelift_opt_level(wasmtime::OptLevel::Speed).parallel_compilation(true);
    match metering {
        Metering::Fuel => config.consume_fuel(true),
        Metering::Epoch => config.epoch_interruption(true),
    };
    config
}

/// The target triple this binary was built for.
pub const NATIVE_TARGET: &str = env!("FERRY_BUILD_TARGET");

/// Whether this build can compile `.wasm` plugins (the `compiler` feature).
pub const HAS_COMPILER: bool = cfg!(feature = "compiler");

/// How this build runs plugin code: `"Cranelift"` (native code) or
/// `"Pulley"` (wasmtime's interpreter, on targets Cranelift cannot generate
/// code for, such as 32-bit ARM, or not reliably, riscv64).
pub const EXECUTION: &str = if runs_native_code(NATIVE_TARGET) { "Cranelift" } else { "Pulley" };

/// Whether plugins for `triple` compile to native code with Cranelift.
///
/// Not riscv64: wasmtime 48's Cranelift expands every small constant-length
/// `memory.copy` (which compiled Rust and C plugins are full of) into 16-byte
/// vector moves, and without the V extension — which the common boards
/// (VisionFive 2, Milk-V Mars, SiFive Unmatched) lack — its riscv64 backend
/// panics on them (bytecodealliance/wasmtime#13959). Those devices run
/// plugins on Pulley.
const fn runs_native_code(triple: &str) -> bool {
    let arch = triple.as_bytes();
    starts_with(arch, b"x86_64-") || starts_with(arch, b"aarch64-") || starts_with(arch, b"s390x-")
}

const fn starts_with(text: &[u8], prefix: &[u8]) -> bool {
    if text.len() < prefix.len() {
        return false;
    }
    let mut i = 0;
    while i < prefix.len() {
        if text[i] != prefix[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// The code-generation target wasmtime uses for plugins on `triple`: the
/// triple itself where Cranelift has a native backend, else the Pulley
/// interpreter of the same pointer width (`pulley32`/`pulley64`).
pub fn compile_target(triple: &str) -> Result<String, PluginError> {
    let arch = triple.split('-').next().unwrap_or_default();
    if arch.starts_with("pulley") || runs_native_code(triple) {
        return Ok(triple.to_owned());
    }
    const BITS32: [&str; 9] = ["arm", "thumb", "i386", "i586", "i686", "riscv32", "mips", "mipsel", "powerpc"];
    const BITS64: [&str; 4] = ["riscv64", "powerpc64le", "mips64el", "loongarch64"];
    if BITS64.iter().any(|p| arch.starts_with(p)) {
        Ok("pulley64".into())
    } else if BITS32.iter().any(|p| arch.starts_with(p)) && !arch.contains("64") {
        let big_endian = arch == "mips" || arch == "powerpc" || arch.ends_with("eb");
        Ok(if big_endian { "pulley32be" } else { "pulley32" }.into())
    } else {
        Err(PluginError::Engine(format!("`{triple}` is not a target triple ferry knows how to compile plugins for")))
    }
}

/// Compiles the component `wasm` ahead of time for a device of target
/// `triple` whose plugins are CPU-bounded by `metering`. The artifact loads
/// only into a ferry of that target built with the same wasmtime (major
/// version) and engine configuration.
#[cfg(feature = "compiler")]
pub fn precompile(wasm: &[u8], triple: &str, metering: Metering) -> Result<Vec<u8>, PluginError> {
    let target = compile_target(triple)?;
    let mut config = config(metering);
    config.target(&target).map_err(|e| PluginError::Engine(format!("target `{target}`: {e:#}")))?;
    let engine = Engine::new(&config).map_err(|e| {
        PluginError::Engine(format!(
            "cannot compile for `{target}` with this build ({e:#}); \
             a ferry built with the `all-arch` feature compiles for every target, \
             and any ferry compiles for its own target and for Pulley"
        ))
    })?;
    if wasmtime::Engine::detect_precompiled(wasm).is_some() {
        return Err(PluginError::Invalid("the file is already precompiled; give the .wasm component".into()));
    }
    engine.precompile_component(wasm).map_err(|e| PluginError::Invalid(format!("{e:#}")))
}

/// What an engine of this build expects of a precompiled artifact, for
/// error messages.
pub fn describe(metering: Metering) -> String {
    let code = if EXECUTION == "Pulley" { "Pulley bytecode" } else { "native code" };
    let bound = match metering {
        Metering::Fuel => "fuel",
        Metering::Epoch => "a time bound (epoch)",
    };
    format!("target {NATIVE_TARGET}, {code}, plugins CPU-bounded by {bound}")
}

/// Whether a component came from the cache or was compiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CompileSource {
    /// Deserialised from a cached artifact.
    Cache,
    /// Compiled now (and cached, when a cache directory is set).
    Compiled,
    /// Loaded from an artifact precompiled for this target.
    Precompiled,
}

/// Compiled components unused for this long are pruned from the cache.
pub const CACHE_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);

/// Most bytes the cache keeps; the least recently used files go first.
pub const CACHE_MAX_BYTES: u64 = 2 << 30;

/// The compile cache directory. `$FERRY_PLUGIN_CACHE` when set; else the
/// agent's `{data_dir}/plugin-cache` when the agent's config is known (the
/// agent itself, `ferry config check`, the plugin tools given
/// `--agent-config`); else `$XDG_CACHE_HOME/ferry/plugins` or
/// `~/.cache/ferry/plugins`.
pub fn cache_dir(data_dir: Option<&Path>) -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("FERRY_PLUGIN_CACHE").filter(|d| !d.is_empty()) {
        return Some(dir.into());
    }
    if let Some(data_dir) = data_dir {
        return Some(data_dir.join("plugin-cache"));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))?;
    Some(base.join("ferry").join("plugins"))
}

/// Now, as a file time: the wall clock read through [`crate::clock`].
fn wall_clock() -> SystemTime {
    use crate::clock::Clock as _;
    UNIX_EPOCH + Duration::from_nanos(u64::try_from(crate::clock::SystemClock.now_nanos()).unwrap_or(0))
}

/// Removes from the cache in `dir` the compiled components not used for
/// [`CACHE_MAX_AGE`], then the least recently used ones while it holds more
/// than [`CACHE_MAX_BYTES`], and leftover temporary files; never one of
/// `keep` (the ones just loaded). Only files named as the cache names them
/// are touched. Returns how many files it removed.
pub fn prune_cache(dir: &Path, keep: &[PathBuf]) -> std::io::Result<usize> {
    prune_cache_at(dir, keep, wall_clock())
}

/// [`prune_cache`] as of `now`.
fn prune_cache_at(dir: &Path, keep: &[PathBuf], now: SystemTime) -> std::io::Result<usize> {
    // `{sha256 hex}-{engine hash}.cwasm`, or a temporary file beside one.
    let ours = |name: &str| {
        name.len() > 65 && name.as_bytes()[64] == b'-' && name[..64].bytes().all(|b| b.is_ascii_hexdigit())
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_file() && entry.file_name().to_str().is_some_and(ours) {
            files.push((entry.path(), meta.modified().unwrap_or(now), meta.len()));
        }
    }
    // Oldest first: the first to go when the cache is over its size.
    files.sort_by_key(|(_, used, _)| *used);
    let mut total: u64 = files.iter().map(|(_, _, len)| len).sum();
    let mut removed = 0;
    for (path, used, len) in files {
        let compiled = path.extension().is_some_and(|e| e == "cwasm");
        let age = now.duration_since(used).unwrap_or_default();
        // A temporary file older than a day is a write a crash cut short.
        let stale =
            if compiled { age > CACHE_MAX_AGE || total > CACHE_MAX_BYTES } else { age > Duration::from_secs(86_400) };
        if stale && !keep.contains(&path) && std::fs::remove_file(&path).is_ok() {
            total -= len;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Logs that `name` is compiling every [`COMPILE_NOTICE`] until dropped,
/// so a long first start is not mistaken for a hang.
#[cfg(feature = "compiler")]
struct CompileNotice {
    stop: Option<std::sync::mpsc::Sender<()>>,
}

/// How often a long compile says it is still going.
#[cfg(feature = "compiler")]
const COMPILE_NOTICE: Duration = Duration::from_secs(5);

#[cfg(feature = "compiler")]
impl CompileNotice {
    fn start(name: &str, bytes: usize) -> Self {
        tracing::info!(
            plugin = name,
            mib = bytes >> 20,
            "compiling plugin (not in the compile cache); a large component (Python, JavaScript) takes tens of \
             seconds on a small device: `ferry plugin precompile` at install time avoids it"
        );
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let name = name.to_owned();
        let started = std::time::Instant::now();
        let spawned = std::thread::Builder::new().name("ferry-plugin-compile-notice".into()).spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(COMPILE_NOTICE) {
                tracing::info!(plugin = %name, seconds = started.elapsed().as_secs(), "still compiling plugin");
            }
        });
        Self { stop: spawned.is_ok().then_some(stop) }
    }
}

#[cfg(feature = "compiler")]
impl Drop for CompileNotice {
    fn drop(&mut self) {
        // Dropping the sender wakes the notice thread, which then ends.
        self.stop.take();
    }
}

/// The cache file for `wasm` under `engine` in `dir`.
#[cfg(feature = "compiler")]
pub fn cache_path(dir: &Path, engine: &Engine, wasm: &[u8]) -> PathBuf {
    // The engine hash covers wasmtime's version and every setting that
    // changes generated code; deserialisation re-checks both anyway.
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    let digest = Sha256::digest(wasm);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    dir.join(format!("{hex}-{:016x}.cwasm", hasher.finish()))
}

/// Loads a precompiled artifact, or compiles `wasm` (or loads it from
/// `cache_dir` when it was compiled before). `name` is for the log.
pub fn load_component(
    name: &str,
    engine: &Engine,
    metering: Metering,
    wasm: &[u8],
    cache_dir: Option<&Path>,
) -> Result<(Component, CompileSource), PluginError> {
    match Engine::detect_precompiled(wasm) {
        Some(wasmtime::Precompiled::Component) => {
            // SAFETY: a precompiled artifact is native code; it comes from
            // the operator's own configuration, trusted as much as the
            // binary itself. wasmtime checks its header for target, version
            // and configuration before using anything in it.
            return match unsafe { Component::deserialize(engine, wasm) } {
                Ok(component) => Ok((component, CompileSource::Precompiled)),
                Err(e) => Err(PluginError::Incompatible { reason: format!("{e:#}"), expected: describe(metering) }),
            };
        }
        Some(wasmtime::Precompiled::Module) => {
            return Err(PluginError::Invalid(
                "a precompiled core module, not a component: precompile the component with `ferry plugin precompile`"
                    .into(),
            ));
        }
        None => {}
    }
    compile_cached(name, engine, wasm, cache_dir)
}

#[cfg(not(feature = "compiler"))]
fn compile_cached(_: &str, _: &Engine, _: &[u8], _: Option<&Path>) -> Result<(Component, CompileSource), PluginError> {
    Err(PluginError::NoCompiler { target: NATIVE_TARGET })
}

#[cfg(feature = "compiler")]
fn compile_cached(
    name: &str,
    engine: &Engine,
    wasm: &[u8],
    cache_dir: Option<&Path>,
) -> Result<(Component, CompileSource), PluginError> {
    let Some(dir) = cache_dir else {
        let _notice = CompileNotice::start(name, wasm.len());
        return Ok((compile(engine, wasm)?, CompileSource::Compiled));
    };
    let path = cache_path(dir, engine, wasm);
    if path.is_file() {
        // SAFETY: the file is one this process family wrote with
        // `Component::serialize` into the agent's private cache directory
        // (renamed into place only once complete); wasmtime also checks its
        // header for version and configuration compatibility.
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(component) => {
                // Its modification time says when it was last used, for pruning.
                let _ = std::fs::File::options().append(true).open(&path).and_then(|f| f.set_modified(wall_clock()));
                return Ok((component, CompileSource::Cache));
            }
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "ignoring an unusable compiled plugin"),
        }
    }
    let started = std::time::Instant::now();
    let notice = CompileNotice::start(name, wasm.len());
    let component = compile(engine, wasm)?;
    drop(notice);
    tracing::info!(
        plugin = name,
        seconds = started.elapsed().as_secs_f64(),
        "compiled plugin; cached for the next start"
    );
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

/// Stores an artifact precompiled for this build's own target and engine
/// configuration in the cache in `dir`, under the key a load of `wasm`
/// looks for, so the agent loads it instead of compiling. For `ferry plugin
/// precompile`, whose artifact is exactly what a compile would cache.
#[cfg(feature = "compiler")]
pub fn cache_artifact(dir: &Path, metering: Metering, wasm: &[u8], artifact: &[u8]) -> Result<PathBuf, PluginError> {
    let path = cache_path(dir, engine(metering)?, wasm);
    write_atomically(&path, artifact)
        .map_err(|e| PluginError::Engine(format!("cannot write {}: {e}", path.display())))?;
    Ok(path)
}

#[cfg(feature = "compiler")]
fn compile(engine: &Engine, wasm: &[u8]) -> Result<Component, PluginError> {
    Component::from_binary(engine, wasm).map_err(|e| PluginError::Invalid(format!("{e:#}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The smallest valid component: the preamble alone.
    const EMPTY_COMPONENT: &[u8] = b"\0asm\x0d\x00\x01\x00";

    #[test]
    fn compile_target_keeps_native_backends_and_sends_the_rest_to_pulley() {
        for native in ["x86_64-unknown-linux-musl", "aarch64-unknown-linux-gnu"] {
            assert_eq!(compile_target(native).unwrap(), native);
        }
        assert_eq!(compile_target("armv7-unknown-linux-gnueabihf").unwrap(), "pulley32");
        assert_eq!(compile_target("riscv64gc-unknown-linux-gnu").unwrap(), "pulley64");
        assert_eq!(compile_target("i686-unknown-linux-gnu").unwrap(), "pulley32");
        assert_eq!(compile_target("pulley64").unwrap(), "pulley64");
        let e = compile_target("sparc64-unknown-linux-gnu").unwrap_err();
        assert!(e.to_string().contains("sparc64-unknown-linux-gnu"), "{e}");
    }

    #[test]
    fn the_build_names_its_own_target_and_engine() {
        assert!(NATIVE_TARGET.contains('-'), "{NATIVE_TARGET}");
        assert_eq!(EXECUTION == "Cranelift", runs_native_code(NATIVE_TARGET));
    }

    #[test]
    fn a_component_without_a_compiler_or_artifact_is_refused_by_a_runtime_only_build() {
        if HAS_COMPILER {
            return;
        }
        let engine = engine(Metering::Epoch).unwrap();
        let e = load_component("t", engine, Metering::Epoch, EMPTY_COMPONENT, None).unwrap_err();
        assert!(matches!(e, PluginError::NoCompiler { .. }), "{e}");
        assert!(e.to_string().contains("ferry plugin precompile"), "{e}");
    }

    #[test]
    fn pruning_drops_old_and_excess_files_but_never_those_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let now = wall_clock();
        let file = |name: &str, age_days: u64, len: usize| {
            let path = dir.path().join(name);
            std::fs::write(&path, vec![0u8; len]).unwrap();
            let f = std::fs::File::options().append(true).open(&path).unwrap();
            f.set_modified(now - Duration::from_secs(age_days * 86_400)).unwrap();
            path
        };
        let key = |c: char| format!("{}-0123456789abcdef", c.to_string().repeat(64));
        let fresh = file(&format!("{}.cwasm", key('a')), 1, 10);
        let old = file(&format!("{}.cwasm", key('b')), 40, 10);
        let old_in_use = file(&format!("{}.cwasm", key('c')), 40, 10);
        let torn = file(&format!("{}.tmp123", key('d')), 2, 10);
        let foreign = file("notes.txt", 400, 10);
        let removed = prune_cache_at(dir.path(), std::slice::from_ref(&old_in_use), now).unwrap();
        assert_eq!(removed, 2);
        assert!(fresh.exists() && old_in_use.exists() && foreign.exists());
        assert!(!old.exists() && !torn.exists());
    }

    #[test]
    fn the_cache_directory_is_the_agents_unless_overridden() {
        if std::env::var_os("FERRY_PLUGIN_CACHE").is_some() {
            return;
        }
        assert_eq!(cache_dir(Some(Path::new("/var/lib/ferry"))), Some(PathBuf::from("/var/lib/ferry/plugin-cache")));
    }

    #[cfg(feature = "compiler")]
    mod precompiled {
        use super::*;

        #[test]
        fn an_artifact_for_this_target_loads_without_compiling() {
            let artifact = precompile(EMPTY_COMPONENT, NATIVE_TARGET, Metering::Epoch).unwrap();
            let engine = engine(Metering::Epoch).unwrap();
            let (_, source) = load_component("t", engine, Metering::Epoch, &artifact, None).unwrap();
            assert_eq!(source, CompileSource::Precompiled);
        }

        #[test]
        fn an_artifact_for_another_target_is_refused_naming_it() {
            // Every build compiles for Pulley; a native engine cannot run it
            // (and a 64-bit one not pulley32 in any case).
            let artifact = precompile(EMPTY_COMPONENT, "armv7-unknown-linux-gnueabihf", Metering::Epoch).unwrap();
            let engine = engine(Metering::Epoch).unwrap();
            let e = load_component("t", engine, Metering::Epoch, &artifact, None).unwrap_err();
            assert!(matches!(e, PluginError::Incompatible { .. }), "{e}");
            let text = e.to_string();
            assert!(text.contains("pulley32"), "{text}");
            assert!(text.contains(NATIVE_TARGET), "{text}");
        }

        #[test]
        fn an_artifact_for_another_cpu_bound_is_refused_naming_it() {
            let artifact = precompile(EMPTY_COMPONENT, NATIVE_TARGET, Metering::Fuel).unwrap();
            let engine = engine(Metering::Epoch).unwrap();
            let e = load_component("t", engine, Metering::Epoch, &artifact, None).unwrap_err();
            let text = e.to_string();
            assert!(text.contains("fuel"), "{text}");
            assert!(text.contains("epoch"), "{text}");
        }

        #[test]
        fn precompiling_an_artifact_again_is_refused() {
            let artifact = precompile(EMPTY_COMPONENT, NATIVE_TARGET, Metering::Epoch).unwrap();
            let e = precompile(&artifact, NATIVE_TARGET, Metering::Epoch).unwrap_err();
            assert!(e.to_string().contains("already precompiled"), "{e}");
        }
    }
}
