//! `[[plugin]]`: the plugins the agent loads, as written ([`RawPlugin`]) and
//! validated ([`PluginConfig`]).
//!
//! Validation here covers what the file alone can show: names, the file's
//! existence, the world, the stage (`ingest` or a configured destination),
//! limits and the error policy. Whether the component really targets its
//! world is checked when the plugin host loads it, before the agent starts
//! (and by `ferry config check`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;

use super::ConfigError;

/// Default per-call wall-clock bound when neither `fuel` nor `timeout_ms` is set.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(500);

/// Default memory bound of one instance: room for interpreters such as
/// componentize-py's CPython and componentize-js's SpiderMonkey.
pub const DEFAULT_MEMORY_BYTES: u64 = 128 << 20;

/// The stage name that runs a filter before events are stored.
pub const INGEST_STAGE: &str = "ingest";

/// Host memory an output event takes besides its attribute and data bytes
/// (the host's record of it), allowed per input event by the default
/// output bound ([`OutputBound::PerEvent`]).
pub const OUTPUT_OVERHEAD_PER_EVENT: u64 = 1024;

/// One `[[plugin]]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPlugin {
    name: String,
    path: PathBuf,
    world: String,
    stage: Option<String>,
    #[serde(default)]
    config: BTreeMap<String, String>,
    fuel: Option<u64>,
    timeout_ms: Option<u64>,
    memory: Option<ByteSize>,
    max_output: Option<ByteSize>,
    on_error: Option<String>,
}

/// The world a component targets (see `wit/worlds.wit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum World {
    /// Batches of events in, one verdict per event out.
    Filter,
    /// Merge of concurrent versions of replicated state.
    Merge,
}

impl World {
    /// The world's name in the WIT package.
    pub fn as_str(self) -> &'static str {
        match self {
            World::Filter => "filter",
            World::Merge => "merge",
        }
    }

    /// Parses `filter` or `merge`.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "filter" => Some(World::Filter),
            "merge" => Some(World::Merge),
            _ => None,
        }
    }
}

/// How one plugin call is bounded in CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuLimit {
    /// Deterministic: at most this much wasmtime fuel (about one unit per
    /// wasm instruction) per call.
    Fuel(u64),
    /// Wall clock: the call is interrupted after this long (epoch deadline).
    Timeout(Duration),
}

/// How many bytes of output one call may hand the host. The host checks it
/// while it copies the output out of the plugin, before each allocation, so
/// a plugin cannot make the agent hold more than this per call, however
/// large its own memory or however it aliases its output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputBound {
    /// At most this many bytes per call (`max_output`).
    Fixed(u64),
    /// At most this many bytes per input event of the call (for merge: per
    /// call). The default: the store's `max_event_size` plus
    /// [`OUTPUT_OVERHEAD_PER_EVENT`], room for one largest event per input.
    PerEvent(u64),
}

impl OutputBound {
    /// The default for a store whose largest event is `max_event_bytes`.
    pub fn for_max_event(max_event_bytes: u64) -> Self {
        OutputBound::PerEvent(max_event_bytes.saturating_add(OUTPUT_OVERHEAD_PER_EVENT))
    }

    /// The bound of a call over `events` events (a merge call counts as one).
    pub fn for_call(self, events: usize) -> u64 {
        match self {
            OutputBound::Fixed(bytes) => bytes,
            OutputBound::PerEvent(bytes) => bytes.saturating_mul(events.max(1) as u64),
        }
    }
}

/// What happens to the events of a call that trapped, timed out, ran out of
/// memory, returned output the stage refused, or was refused by the open circuit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnError {
    /// Record them in the dead-letter table with the reason (default).
    DeadLetter,
    /// Carry on as if the plugin had kept them unchanged.
    Pass,
    /// Discard them (counted in the plugin's status).
    Drop,
}

impl OnError {
    /// The policy as the config spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            OnError::DeadLetter => "dead-letter",
            OnError::Pass => "pass",
            OnError::Drop => "drop",
        }
    }
}

/// Where a plugin runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stage {
    /// Before the commit: dropped events are never stored.
    Ingest,
    /// On the route to this destination, just before publish.
    Destination(String),
}

/// A validated `[[plugin]]`.
#[derive(Debug, Clone)]
pub struct PluginConfig {
    /// Unique name, used in logs, status and dead-letter reasons.
    pub name: String,
    /// The component file.
    pub path: PathBuf,
    /// The world it must target.
    pub world: World,
    /// Where it runs; `None` for merge plugins, which the state layer calls.
    pub stage: Option<Stage>,
    /// The plugin's own config table, read through the `config` import.
    pub config: BTreeMap<String, String>,
    /// CPU bound per call.
    pub cpu: CpuLimit,
    /// Memory bound per instance, in bytes (all its linear memories together).
    pub memory_bytes: u64,
    /// Output bound per call.
    pub max_output: OutputBound,
    /// Error policy.
    pub on_error: OnError,
}

impl PluginConfig {
    /// A plugin with the documented defaults (for the embedded default
    /// config's store); for tools and tests.
    pub fn new(name: impl Into<String>, path: impl Into<PathBuf>, world: World) -> Self {
        let max_event_bytes = super::Config::embedded().store.max_event_bytes as u64;
        Self {
            name: name.into(),
            path: path.into(),
            world,
            stage: None,
            config: BTreeMap::new(),
            cpu: CpuLimit::Timeout(DEFAULT_TIMEOUT),
            memory_bytes: DEFAULT_MEMORY_BYTES,
            max_output: OutputBound::for_max_event(max_event_bytes),
            on_error: OnError::DeadLetter,
        }
    }
}

/// Validates every `[[plugin]]`. `destinations` are the configured
/// destination names a stage may name; `base` resolves relative paths (the
/// config file's directory); `max_event_bytes` is the store's
/// `max_event_size`, from which the default output bound derives.
pub fn validate(
    raw: Vec<RawPlugin>,
    destinations: &[&str],
    base: &Path,
    file: &str,
    max_event_bytes: u64,
) -> Result<Vec<PluginConfig>, ConfigError> {
    let mut out: Vec<PluginConfig> = Vec::with_capacity(raw.len());
    for (i, p) in raw.into_iter().enumerate() {
        let err = |k: &str, reason: String| ConfigError { file: file.into(), key: format!("plugin[{i}].{k}"), reason };
        if p.name.is_empty()
            || p.name.len() > 64
            || !p.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
        {
            return Err(err("name", format!("`{}` must be 1 to 64 letters, digits, `-` or `_`", p.name)));
        }
        if out.iter().any(|o| o.name == p.name) {
            return Err(err("name", format!("`{}` is already the name of another plugin", p.name)));
        }
        let path = if p.path.is_absolute() { p.path.clone() } else { base.join(&p.path) };
        if !path.is_file() {
            return Err(err("path", format!("{} is not a file", path.display())));
        }
        let world = World::parse(&p.world)
            .ok_or_else(|| err("world", format!("`{}` is not one of \"filter\", \"merge\"", p.world)))?;
        let stage = match (world, p.stage.as_deref()) {
            (World::Merge, None) => None,
            (World::Merge, Some(_)) => {
                return Err(err("stage", "merge plugins have no stage; the state layer calls them".into()));
            }
            (World::Filter, None) => {
                return Err(err("stage", "required for filters: \"ingest\" or a destination name".into()));
            }
            (World::Filter, Some(INGEST_STAGE)) => Some(Stage::Ingest),
            (World::Filter, Some(name)) if destinations.contains(&name) => Some(Stage::Destination(name.into())),
            (World::Filter, Some(name)) => {
                let known = destinations.iter().map(|d| format!("\"{d}\"")).collect::<Vec<_>>();
                let choices = std::iter::once("\"ingest\"".to_owned()).chain(known).collect::<Vec<_>>().join(", ");
                return Err(err("stage", format!("`{name}` is neither \"ingest\" nor a destination ({choices})")));
            }
        };
        let cpu = match (p.fuel, p.timeout_ms) {
            (Some(_), Some(_)) => return Err(err("fuel", "give `fuel` or `timeout_ms`, not both".into())),
            (Some(0), None) => return Err(err("fuel", "must be at least 1".into())),
            (Some(f), None) => CpuLimit::Fuel(f),
            (None, Some(0)) => return Err(err("timeout_ms", "must be at least 1".into())),
            (None, Some(ms)) => CpuLimit::Timeout(Duration::from_millis(ms)),
            (None, None) => CpuLimit::Timeout(DEFAULT_TIMEOUT),
        };
        let memory_bytes = p.memory.map_or(DEFAULT_MEMORY_BYTES, |m| m.as_u64());
        if memory_bytes < (1 << 20) {
            return Err(err("memory", format!("{memory_bytes} bytes is too small; the minimum is 1 MiB")));
        }
        let max_output = match p.max_output.map(|b| b.as_u64()) {
            None => OutputBound::for_max_event(max_event_bytes),
            Some(bytes) if bytes < 1024 => {
                return Err(err("max_output", format!("{bytes} bytes is too small; the minimum is 1 KiB")));
            }
            Some(bytes) => OutputBound::Fixed(bytes),
        };
        let on_error = match p.on_error.as_deref().unwrap_or("dead-letter") {
            "dead-letter" => OnError::DeadLetter,
            "pass" => OnError::Pass,
            "drop" => OnError::Drop,
            other => {
                return Err(err("on_error", format!("`{other}` is not one of \"dead-letter\", \"pass\", \"drop\"")));
            }
        };
        out.push(PluginConfig {
            name: p.name,
            path,
            world,
            stage,
            config: p.config,
            cpu,
            memory_bytes,
            max_output,
            on_error,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(toml_text: &str, destinations: &[&str]) -> Result<Vec<PluginConfig>, ConfigError> {
        #[derive(Deserialize)]
        struct Doc {
            plugin: Vec<RawPlugin>,
        }
        let doc: Doc = toml::from_str(toml_text).unwrap();
        validate(doc.plugin, destinations, Path::new(env!("CARGO_MANIFEST_DIR")), "test.toml", 256 * 1024)
    }

    #[test]
    fn a_filter_plugin_resolves_with_documented_defaults() {
        let p = &check(
            "[[plugin]]\nname = \"f\"\npath = \"Cargo.toml\"\nworld = \"filter\"\nstage = \"ingest\"\n\
             config = { field = \"temp\" }\n",
            &[],
        )
        .unwrap()[0];
        assert_eq!(p.stage, Some(Stage::Ingest));
        assert_eq!(p.cpu, CpuLimit::Timeout(DEFAULT_TIMEOUT));
        assert_eq!(p.memory_bytes, DEFAULT_MEMORY_BYTES);
        assert_eq!(p.max_output, OutputBound::PerEvent(256 * 1024 + OUTPUT_OVERHEAD_PER_EVENT));
        assert_eq!(p.max_output.for_call(0), p.max_output.for_call(1), "a merge call or an empty batch counts as one");
        assert_eq!(p.max_output.for_call(3), 3 * (256 * 1024 + OUTPUT_OVERHEAD_PER_EVENT));
        assert_eq!(p.on_error, OnError::DeadLetter);
        assert_eq!(p.config["field"], "temp");
        assert!(p.path.is_absolute());
    }

    #[test]
    fn mistakes_name_the_key_and_reason() {
        let base = "[[plugin]]\nname = \"f\"\npath = \"Cargo.toml\"\nworld = \"filter\"\n";
        let key = |extra: &str, dests: &[&str]| check(&format!("{base}{extra}"), dests).unwrap_err().key;
        assert_eq!(key("stage = \"cloud-b\"\n", &["cloud-a"]), "plugin[0].stage");
        assert_eq!(key("", &[]), "plugin[0].stage");
        assert_eq!(key("stage = \"ingest\"\nfuel = 1\ntimeout_ms = 1\n", &[]), "plugin[0].fuel");
        assert_eq!(key("stage = \"ingest\"\nmemory = \"1 KiB\"\n", &[]), "plugin[0].memory");
        assert_eq!(key("stage = \"ingest\"\non_error = \"retry\"\n", &[]), "plugin[0].on_error");
        assert_eq!(key("stage = \"ingest\"\nmax_output = \"10 B\"\n", &[]), "plugin[0].max_output");
        let e = check("[[plugin]]\nname = \"f\"\npath = \"nope.wasm\"\nworld = \"filter\"\nstage = \"ingest\"\n", &[])
            .unwrap_err();
        assert_eq!(e.key, "plugin[0].path");
        assert!(e.reason.contains("nope.wasm"), "{e}");
        let e = check("[[plugin]]\nname = \"f\"\npath = \"Cargo.toml\"\nworld = \"map\"\n", &[]).unwrap_err();
        assert_eq!(e.key, "plugin[0].world");
    }

    #[test]
    fn a_destination_stage_must_name_a_configured_destination() {
        let text = "[[plugin]]\nname = \"f\"\npath = \"Cargo.toml\"\nworld = \"filter\"\nstage = \"cloud-a\"\n\
                    timeout_ms = 20\non_error = \"pass\"\n";
        let p = &check(text, &["cloud-a"]).unwrap()[0];
        assert_eq!(p.stage, Some(Stage::Destination("cloud-a".into())));
        assert_eq!(p.cpu, CpuLimit::Timeout(Duration::from_millis(20)));
        assert_eq!(p.on_error, OnError::Pass);
        let fixed = check(&format!("{text}max_output = \"4 MiB\"\n"), &["cloud-a"]).unwrap();
        assert_eq!(fixed[0].max_output, OutputBound::Fixed(4 << 20));
        assert_eq!(fixed[0].max_output.for_call(1024), 4 << 20, "a fixed bound does not grow with the batch");
        let e = check(text, &[]).unwrap_err();
        assert!(e.reason.contains("cloud-a"), "{e}");
    }

    #[test]
    fn duplicate_names_are_refused() {
        let one = "[[plugin]]\nname = \"f\"\npath = \"Cargo.toml\"\nworld = \"merge\"\n";
        let e = check(&format!("{one}{one}"), &[]).unwrap_err();
        assert_eq!(e.key, "plugin[1].name");
    }
}
