//! `ferry plugin check|bench|new|precompile`: the plugin author's tools.
//!
//! `check` and `bench` print what [`crate::plugin::check`] finds (`check`
//! exits 0 when every property held, 1 when one failed, 3 when none failed
//! but one could not be tested: [`CheckFailed`]); `new` is
//! `cli::scaffold`'s (feature `scaffold`); `precompile` compiles a component
//! ahead of time for a device ([`crate::plugin::engine::precompile`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use bytesize::ByteSize;
use clap::{Args, Subcommand, ValueEnum};

use crate::config::plugin::{CpuLimit, OutputBound};
use crate::plugin::World;
use crate::plugin::check::{self, CheckOptions, Outcome};
use crate::plugin::engine;
use crate::plugin::inputs::{BUILTIN, Shape, Source};

/// `ferry plugin …`.
#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Check a component against the worlds and run it on generated inputs
    /// (no failures, valid and deterministic output; for merge plugins the
    /// convergence laws), made from your own example data with `--samples`
    /// or `--shape`. Exits 0 if every property held, 1 if one failed, 3 if
    /// none failed but one could not be tested (every input refused).
    Check(RunArgs),
    /// Measure per-event cost at batch sizes 1, 64 and 1024, and cold versus cached start.
    Bench(RunArgs),
    /// Create a starter plugin in a new directory.
    #[cfg(feature = "scaffold")]
    New(super::scaffold::NewArgs),
    /// Compile a component ahead of time for a device (a `.cwasm` a
    /// `[[plugin]]` path can name), so the device never compiles at start-up
    /// and a build without the compiler can run it.
    Precompile(PrecompileArgs),
}

/// `ferry plugin precompile`.
#[derive(Debug, Args)]
pub struct PrecompileArgs {
    /// The component (.wasm).
    pub file: PathBuf,
    /// The device's target triple, e.g. aarch64-unknown-linux-gnu or
    /// armv7-unknown-linux-gnueabihf (default: this ferry's own target).
    #[arg(long)]
    pub target: Option<String>,
    /// Compile for plugins bounded by `fuel` in their config (the default
    /// is for the time bound, `timeout_ms`); the artifact loads only into a
    /// plugin with the same kind of bound.
    #[arg(long)]
    pub fuel: bool,
    /// Where to write the artifact (default: FILE with extension .cwasm).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// The agent's config: for this device's own target, the artifact also
    /// goes into the agent's compile cache, so the agent loads the `.wasm`
    /// without compiling it.
    #[arg(long, env = "FERRY_CONFIG", value_name = "FILE")]
    pub agent_config: Option<PathBuf>,
}

/// How to load and run a component.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The component (.wasm).
    pub file: PathBuf,
    /// The world to check against (default: whichever it targets).
    #[arg(long, value_enum)]
    pub world: Option<WorldArg>,
    /// A config entry for the plugin, KEY=VALUE (repeatable).
    #[arg(long = "config", value_name = "KEY=VALUE", value_parser = parse_entry)]
    pub config: Vec<(String, String)>,
    /// CPU bound per call in fuel units (instead of the default time bound).
    #[arg(long, conflicts_with = "timeout_ms")]
    pub fuel: Option<u64>,
    /// CPU bound per call in milliseconds (default 500).
    #[arg(long)]
    pub timeout_ms: Option<u64>,
    /// Memory bound per instance, e.g. "64 MiB" (default 128 MiB).
    #[arg(long)]
    pub memory: Option<ByteSize>,
    /// Output bound per call, e.g. "4 MiB" (default: 257 KiB per input event,
    /// as for the default `max_event_size`).
    #[arg(long)]
    pub max_output: Option<ByteSize>,
    /// Generated cases per property (check only).
    #[arg(long, default_value_t = 100)]
    pub cases: usize,
    /// The agent's config: its compile cache is used (and filled), so the
    /// agent need not compile this component again.
    #[arg(long, env = "FERRY_CONFIG", value_name = "FILE")]
    pub agent_config: Option<PathBuf>,
    /// Example values of the data the plugin handles: a JSON file holding an
    /// array of values (merge states, or filter event data). The check runs
    /// on them as given, then on mutations of them (numbers changed, keys
    /// added and removed, at every depth). Repeatable.
    #[arg(long, value_name = "FILE")]
    pub samples: Vec<PathBuf>,
    /// The shape of the data the plugin handles, as a JSON template
    /// (`{"counts": {"*": "uint"}}`: type names uint, int, float, bool,
    /// string; `[S]` a list, `{"*": S}` a map), a file holding one, or a
    /// built-in shape's name (string-set, pn-counters, flat-counts, bytes).
    /// Repeatable.
    #[arg(long, value_name = "SHAPE")]
    pub shape: Vec<String>,
}

/// A world on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WorldArg {
    /// `ferry:plugin/filter`.
    Filter,
    /// `ferry:plugin/merge`.
    Merge,
}

impl From<WorldArg> for World {
    fn from(world: WorldArg) -> Self {
        match world {
            WorldArg::Filter => World::Filter,
            WorldArg::Merge => World::Merge,
        }
    }
}

fn parse_entry(text: &str) -> Result<(String, String), String> {
    let (k, v) = text.split_once('=').ok_or_else(|| format!("`{text}` is not KEY=VALUE"))?;
    if k.is_empty() {
        return Err(format!("`{text}` has an empty key"));
    }
    Ok((k.to_owned(), v.to_owned()))
}

/// Reads `--samples FILE`: a JSON array of example values.
fn read_samples(path: &Path) -> anyhow::Result<Source> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    match value {
        serde_json::Value::Array(values) if !values.is_empty() => Ok(Source::Samples(values)),
        _ => {
            bail!("{}: expected a JSON array of example values, e.g. [{{\"counts\": {{\"gw-1\": 3}}}}]", path.display())
        }
    }
}

/// Reads `--shape`: a built-in name, JSON text, or a file holding JSON.
fn read_shape(text: &str) -> anyhow::Result<Source> {
    if let Some((name, _)) = BUILTIN.iter().find(|(name, _)| *name == text) {
        return Ok(Source::Builtin(name));
    }
    let json = match serde_json::from_str::<serde_json::Value>(text) {
        Ok(json) => json,
        Err(_) if Path::new(text).is_file() => {
            let file = std::fs::read_to_string(text).with_context(|| format!("reading {text}"))?;
            serde_json::from_str(&file).with_context(|| format!("{text}: not JSON"))?
        }
        Err(e) => {
            let names: Vec<&str> = BUILTIN.iter().map(|(n, _)| *n).collect();
            bail!("--shape `{text}` is neither JSON ({e}), a file, nor a built-in shape ({})", names.join(", "))
        }
    };
    Shape::parse(&json).map(Source::Shape).map_err(|e| anyhow::anyhow!("--shape: {e}"))
}

impl RunArgs {
    fn options(&self) -> anyhow::Result<CheckOptions> {
        let mut sources = self.samples.iter().map(|p| read_samples(p)).collect::<anyhow::Result<Vec<_>>>()?;
        for shape in &self.shape {
            sources.push(read_shape(shape)?);
        }
        let mut options = CheckOptions {
            world: self.world.map(World::from),
            config: self.config.iter().cloned().collect::<BTreeMap<_, _>>(),
            cases: self.cases,
            sources,
            ..CheckOptions::default()
        };
        if let Some(f) = self.fuel {
            options.cpu = CpuLimit::Fuel(f);
        } else if let Some(ms) = self.timeout_ms {
            options.cpu = CpuLimit::Timeout(Duration::from_millis(ms));
        }
        if let Some(m) = self.memory {
            options.memory_bytes = m.as_u64();
        }
        if let Some(m) = self.max_output {
            options.max_output = OutputBound::Fixed(m.as_u64());
        }
        Ok(options)
    }
}

/// Why `ferry plugin check` did not pass, as its exit code says.
#[derive(Debug, thiserror::Error)]
pub enum CheckFailed {
    /// A property broke (exit code 1).
    #[error("{0} of {1} checks failed")]
    Failed(usize, usize),
    /// None broke, but one could not be tested (exit code 3).
    #[error("{0} of {1} checks were inconclusive: the plugin refused every input; give it --samples or --shape")]
    Inconclusive(usize, usize),
}

impl CheckFailed {
    /// The process exit code for this outcome.
    pub fn exit_code(&self) -> u8 {
        match self {
            CheckFailed::Failed(..) => 1,
            CheckFailed::Inconclusive(..) => 3,
        }
    }
}

/// Where compiled plugins are cached: the agent's own cache when its config
/// is given (`--agent-config` or `FERRY_CONFIG`), so a compile here saves the
/// agent one; see [`engine::cache_dir`]. Pruned after use.
fn cache_dir(agent_config: Option<&Path>) -> anyhow::Result<Option<PathBuf>> {
    let data_dir = match agent_config {
        Some(path) => Some(crate::config::Config::load(path)?.agent.data_dir),
        None => None,
    };
    Ok(engine::cache_dir(data_dir.as_deref()))
}

/// Prunes the cache in `dir`, if any (see [`engine::prune_cache`]).
fn prune(dir: Option<&Path>) {
    if let Some(dir) = dir
        && let Err(e) = engine::prune_cache(dir, &[])
    {
        tracing::debug!(dir = %dir.display(), error = %e, "cannot prune the plugin compile cache");
    }
}

/// `ferry config check`'s plugin part: loads each `[[plugin]]` of `config`
/// (through the agent's compile cache), checks it targets its world, and
/// makes one call that needs no data so a config the plugin refuses shows
/// now rather than at `run`. Returns one line per plugin; an error names the
/// file, the plugin's key and the reason.
pub fn check_config_plugins(config: &crate::config::Config) -> anyhow::Result<Vec<String>> {
    use crate::plugin::{Plugin, PluginError};
    let cache = engine::cache_dir(Some(&config.agent.data_dir));
    let mut lines = Vec::with_capacity(config.plugins.len());
    for (i, spec) in config.plugins.iter().enumerate() {
        let fail = |key: &str, reason: String| crate::config::ConfigError {
            file: config.origin.clone(),
            key: format!("plugin[{i}].{key}"),
            reason: format!("plugin `{}`: {reason}", spec.name),
        };
        let (mut plugin, report) = Plugin::load(spec, cache.as_deref()).map_err(|e| match e {
            PluginError::WrongWorld { .. } => fail("world", e.to_string()),
            e => fail("path", e.to_string()),
        })?;
        plugin.probe().map_err(|e| fail("config", format!("fails on its first call: {e}")))?;
        lines.push(format!(
            "  plugin      {} ({} world, {:?} in {:.0?}): starts with its config",
            spec.name,
            spec.world.as_str(),
            report.source,
            report.load_time
        ));
    }
    prune(cache.as_deref());
    Ok(lines)
}

/// Runs a `ferry plugin` command.
pub fn run(cmd: &PluginCommand) -> anyhow::Result<()> {
    match cmd {
        PluginCommand::Check(args) => check_command(args),
        PluginCommand::Bench(args) => bench_command(args),
        #[cfg(feature = "scaffold")]
        PluginCommand::New(args) => super::scaffold::run(args),
        PluginCommand::Precompile(args) => precompile_command(args),
    }
}

#[cfg(feature = "compiler")]
fn precompile_command(args: &PrecompileArgs) -> anyhow::Result<()> {
    use crate::plugin::engine::Metering;
    let target = args.target.as_deref().unwrap_or(engine::NATIVE_TARGET);
    let metering = if args.fuel { Metering::Fuel } else { Metering::Epoch };
    let wasm = std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let artifact = engine::precompile(&wasm, target, metering)
        .with_context(|| format!("{}: cannot precompile for {target}", args.file.display()))?;
    let output = args.output.clone().unwrap_or_else(|| args.file.with_extension("cwasm"));
    std::fs::write(&output, &artifact).with_context(|| format!("writing {}", output.display()))?;
    if target == engine::NATIVE_TARGET
        && let Some(dir) = cache_dir(args.agent_config.as_deref())?
    {
        let cached = engine::cache_artifact(&dir, metering, &wasm, &artifact)?;
        outln!("{}: in the compile cache too, for the .wasm", cached.display())?;
        prune(Some(&dir));
    }
    outln!(
        "{}: {} for {target} ({}), {} bytes",
        output.display(),
        if args.fuel { "fuel-bounded" } else { "time-bounded" },
        engine::compile_target(target)?,
        artifact.len()
    )?;
    Ok(())
}

#[cfg(not(feature = "compiler"))]
fn precompile_command(_: &PrecompileArgs) -> anyhow::Result<()> {
    bail!("this ferry has no plugin compiler (built without the `compiler` feature); precompile on a full build")
}

fn check_command(args: &RunArgs) -> anyhow::Result<()> {
    let cache = cache_dir(args.agent_config.as_deref())?;
    let report = check::check(&args.file, &args.options()?, cache.as_deref())
        .with_context(|| format!("{}: cannot load", args.file.display()))?;
    prune(cache.as_deref());
    outln!("{}: {} plugin", args.file.display(), report.world.as_str())?;
    outln!("  inputs ({} cases per property):", args.cases)?;
    for line in &report.inputs {
        outln!("       {line}")?;
    }
    for f in &report.findings {
        let mark = match f.outcome {
            Outcome::Pass => "pass",
            Outcome::Fail => "FAIL",
            Outcome::Inconclusive => "INCONCLUSIVE",
        };
        outln!("  {mark} {} ({} cases)", f.property, f.cases)?;
        for line in f.detail.lines() {
            outln!("       {line}")?;
        }
    }
    let total = report.findings.len();
    let count = |o| report.findings.iter().filter(|f| f.outcome == o).count();
    match report.outcome() {
        Outcome::Pass => outln!("all {total} checks passed"),
        Outcome::Fail => Err(CheckFailed::Failed(count(Outcome::Fail), total).into()),
        Outcome::Inconclusive => Err(CheckFailed::Inconclusive(count(Outcome::Inconclusive), total).into()),
    }
}

fn bench_command(args: &RunArgs) -> anyhow::Result<()> {
    let scratch = tempfile_dir()?;
    let report = check::bench(&args.file, &args.options()?, &scratch, &[1, 64, 1024], Duration::from_millis(500));
    let _ = std::fs::remove_dir_all(&scratch);
    let report = report.with_context(|| format!("{}: cannot run", args.file.display()))?;
    outln!("{}: {} plugin", args.file.display(), report.world.as_str())?;
    outln!("  cold start (compile + instantiate)   {:>10.2?}", report.cold_start)?;
    outln!("  cached start (load + instantiate)    {:>10.2?}", report.cached_start)?;
    for t in &report.timings {
        outln!(
            "  batch {:>5}: {:>10.2?} per event, {:>10.2?} per call ({} calls)",
            t.batch,
            t.per_event,
            t.per_call,
            t.calls
        )?;
    }
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("ferry-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
