//! The `ferry` command line: argument parsing and the client commands that
//! talk to a running agent's HTTP API (`publish`, `status`).
//!
//! [`main`] is the whole binary: the `ferry` executable and the test agent
//! both call it, so tests run exactly what users run.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};

use crate::clock::SystemClock;
use crate::config::{Config, ConfigError};

pub mod dlq;
pub mod events;
#[cfg(feature = "fleet-manager")]
pub mod fleet;
pub mod plugin;
pub mod replay;
#[cfg(feature = "scaffold")]
pub mod scaffold;
pub mod store;

/// Ferry: durable store-and-forward of device events to several clouds.
#[derive(Debug, Parser)]
#[command(name = "ferry", version, about)]
pub struct Cli {
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent (on the embedded default config when none is given).
    Run(RunArgs),
    /// Send events to a running agent: one from flags, or NDJSON from stdin.
    Publish(PublishArgs),
    /// Show a running agent's status.
    Status(StatusArgs),
    /// Work with configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Check, benchmark and scaffold WebAssembly plugins.
    #[command(subcommand)]
    Plugin(plugin::PluginCommand),
    /// Inspect, replay and purge a running agent's dead letters.
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// Where a running agent's events stand at each destination (receipts).
    #[command(subcommand)]
    Events(events::EventsCommand),
    /// Send one destination of a running agent its events again, from a
    /// time or a sequence (delivered ones kept by `store.retain_delivered`).
    Replay(replay::ReplayArgs),
    /// Inspect a store offline.
    #[command(subcommand)]
    Store(store::StoreCommand),
    /// See Ferry work in under a minute: two in-process clouds, a sensor
    /// fleet, one cloud going offline and coming back, verified end to end.
    #[cfg(feature = "demo")]
    Demo(crate::demo::DemoArgs),
    /// Sign and push plugin updates to devices, and watch their status.
    #[cfg(feature = "fleet-manager")]
    #[command(subcommand)]
    Fleet(fleet::FleetCommand),
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// `ferry run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Config file (TOML). Without it, the embedded default is used.
    #[arg(long, short, env = "FERRY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log format.
    #[arg(long, value_enum, default_value = "human")]
    pub log_format: LogFormat,
}

/// `ferry config …`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a config file, load each plugin (its world, and one call
    /// with its config), and print what it resolves to.
    Check {
        /// Config file (TOML). Without it, the embedded default is checked.
        #[arg(long, short, env = "FERRY_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Print the embedded default config, which documents every key.
    Default,
}

/// Where a client command finds the agent.
#[derive(Debug, Args)]
pub struct ApiArgs {
    /// Base URL of the agent's HTTP API.
    #[arg(long, env = "FERRY_URL", default_value = "http://127.0.0.1:7878")]
    pub url: String,
    /// Bearer token, if the agent requires one.
    #[arg(long, env = "FERRY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// `ferry publish`.
#[derive(Debug, Args)]
pub struct PublishArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// Local topic of the event. Without it, NDJSON events are read from stdin.
    #[arg(long, short)]
    topic: Option<String>,
    /// Data as JSON text (a bare word that is not JSON is sent as a JSON string).
    #[arg(long, short, conflicts_with = "data_base64")]
    data: Option<String>,
    /// Data as base64 (binary).
    #[arg(long)]
    data_base64: Option<String>,
    /// Idempotency key (event id).
    #[arg(long)]
    id: Option<String>,
    /// Partition key.
    #[arg(long)]
    key: Option<String>,
    /// Event type.
    #[arg(long = "type")]
    ty: Option<String>,
    /// Time to live, e.g. "1h".
    #[arg(long)]
    ttl: Option<String>,
    /// NDJSON lines per request when reading stdin.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
}

/// `ferry status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// Print the raw JSON status.
    #[arg(long)]
    json: bool,
}

/// Loads the config named on the command line, or the embedded default.
pub fn load_config(path: Option<&PathBuf>) -> Result<Config, ConfigError> {
    match path {
        Some(p) => Config::load(p),
        None => Ok(Config::embedded()),
    }
}

/// `ferry config check|default`.
pub fn config_command(cmd: &ConfigCommand) -> anyhow::Result<()> {
    match cmd {
        ConfigCommand::Default => {
            // Usually redirected into a file: a full disk is an error to report, not a panic.
            let mut out = std::io::stdout().lock();
            out.write_all(crate::config::DEFAULT_TOML.as_bytes())
                .and_then(|()| out.flush())
                .context("writing the default config to standard output")?;
        }
        ConfigCommand::Check { config } => {
            let c = load_config(config.as_ref())?;
            // Each plugin loads, targets its world and starts with its config, or the check fails.
            let plugins = plugin::check_config_plugins(&c)?;
            outln!("{}: ok", c.origin)?;
            outln!("  device_id   {}", c.agent.device_id)?;
            outln!(
                "  store       {} (quota {} bytes, {:?}, durability {:?})",
                c.store.path.display(),
                c.store.quota_bytes,
                c.store.full_policy,
                c.store.durability
            )?;
            outln!("  http        {}{}", c.http.listen, if c.http.token.is_some() { " (token required)" } else { "" })?;
            for d in &c.destinations {
                outln!(
                    "  destination {} {} ({}, profile {})",
                    d.name,
                    d.endpoint.url(),
                    match d.endpoint.protocol {
                        crate::config::Protocol::V5 => "MQTT 5",
                        crate::config::Protocol::V311 => "MQTT 3.1.1",
                    },
                    d.profile.name()
                )?;
                for r in &d.resolved {
                    outln!("    {:<20} {:<42}  {}", r.key, r.value, r.source)?;
                }
            }
            for class in &c.store.classes {
                let filters: Vec<&str> = class.filters.iter().map(|f| f.as_str()).collect();
                outln!(
                    "  class       {} priority {} topics {:?} ttl {:?}",
                    class.name,
                    class.priority,
                    filters,
                    class.ttl
                )?;
            }
            for line in plugins {
                outln!("{line}")?;
            }
        }
    }
    Ok(())
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(60)))
        .http_status_as_error(false)
        .build()
        .into()
}

pub(crate) fn request(
    api: &ApiArgs,
    method: &str,
    path: &str,
    content_type: &str,
    body: Option<Vec<u8>>,
) -> anyhow::Result<(u16, Value)> {
    let url = format!("{}{}", api.url.trim_end_matches('/'), path);
    let agent = agent();
    let auth = api.token.as_ref().map(|t| format!("Bearer {t}"));
    let mut response = match method {
        "GET" => {
            let mut r = agent.get(&url);
            if let Some(a) = &auth {
                r = r.header("authorization", a);
            }
            r.call()
        }
        _ => {
            let mut r = agent.post(&url).header("content-type", content_type);
            if let Some(a) = &auth {
                r = r.header("authorization", a);
            }
            r.send(body.unwrap_or_default())
        }
    }
    .with_context(|| format!("cannot reach the agent at {url} (is `ferry run` running? set --url or FERRY_URL)"))?;
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().context("reading the agent's answer")?;
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok((status, value))
}

pub(crate) fn check(status: u16, body: &Value) -> anyhow::Result<()> {
    if status == 200 {
        return Ok(());
    }
    let msg = body.get("error").and_then(Value::as_str).map_or_else(|| body.to_string(), str::to_owned);
    bail!("the agent answered {status}: {msg}")
}

/// `ferry publish`.
pub fn publish(args: &PublishArgs) -> anyhow::Result<()> {
    let Some(topic) = &args.topic else {
        return publish_stdin(args);
    };
    let mut event = json!({ "topic": topic });
    match (&args.data, &args.data_base64) {
        (Some(d), _) => event["data"] = serde_json::from_str(d).unwrap_or_else(|_| Value::String(d.clone())),
        (None, Some(b)) => event["data_base64"] = json!(b),
        (None, None) => bail!("give --data or --data-base64 with --topic (or omit --topic to read NDJSON from stdin)"),
    }
    for (name, value) in [("id", &args.id), ("key", &args.key), ("type", &args.ty), ("ttl", &args.ttl)] {
        if let Some(v) = value {
            event[name] = json!(v);
        }
    }
    let (status, body) =
        request(&args.api, "POST", "/v1/events", "application/json", Some(serde_json::to_vec(&event)?))?;
    check(status, &body)?;
    let e = &body["events"][0];
    let dup = if e["duplicate"].as_bool() == Some(true) { " (duplicate: already stored)" } else { "" };
    outln!("accepted {} sequence {}{dup}", e["id"].as_str().unwrap_or("?"), e["sequence"])?;
    Ok(())
}

fn publish_stdin(args: &PublishArgs) -> anyhow::Result<()> {
    let stdin = std::io::stdin().lock();
    let (mut accepted, mut duplicates, mut batch, mut line_no) = (0u64, 0u64, Vec::new(), 0usize);
    let mut lines_in_batch = 0usize;
    let mut flush = |batch: &mut Vec<u8>, first_line: usize| -> anyhow::Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let (status, body) =
            request(&args.api, "POST", "/v1/events", "application/x-ndjson", Some(std::mem::take(batch)))?;
        if status != 200 {
            if let Some(i) = body.get("index").and_then(Value::as_u64) {
                bail!("line {}: {}", first_line + i as usize + 1, body["error"].as_str().unwrap_or("rejected"));
            }
            check(status, &body)?;
        }
        accepted += body["accepted"].as_u64().unwrap_or(0);
        duplicates += body["duplicates"].as_u64().unwrap_or(0);
        Ok(())
    };
    let mut first_line = 0;
    for line in stdin.lines() {
        let line = line.context("reading stdin")?;
        line_no += 1;
        if line.trim().is_empty() {
            continue;
        }
        if lines_in_batch == 0 {
            first_line = line_no - 1;
        }
        batch.extend_from_slice(line.as_bytes());
        batch.push(b'\n');
        lines_in_batch += 1;
        if lines_in_batch >= args.batch.max(1) {
            flush(&mut batch, first_line)?;
            lines_in_batch = 0;
        }
    }
    flush(&mut batch, first_line)?;
    outln!("accepted {accepted}, duplicates {duplicates}")?;
    Ok(())
}

/// `ferry status`.
pub fn status(args: &StatusArgs) -> anyhow::Result<()> {
    let (code, body) = request(&args.api, "GET", "/v1/status", "", None)?;
    check(code, &body)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&body)?)?;
        return Ok(());
    }
    let s = &body["store"];
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    writeln!(
        out,
        "device    {}   ferry {}   up {}s",
        body["device_id"].as_str().unwrap_or("?"),
        body["version"].as_str().unwrap_or("?"),
        n(&body["uptime_seconds"])
    )?;
    writeln!(
        out,
        "store     {} events, {} of {} bytes ({:.1}%), last sequence {}",
        n(&s["events"]),
        n(&s["bytes"]),
        n(&s["quota_bytes"]),
        100.0 * n(&s["bytes"]) as f64 / n(&s["quota_bytes"]).max(1) as f64,
        n(&s["last_sequence"])
    )?;
    let health = &s["health"];
    match health["state"].as_str().unwrap_or("?") {
        "ok" => {}
        "disk-low" => writeln!(
            out,
            "health    DISK LOW: {} bytes free, below the {}-byte reserve; ingest refused until space frees up",
            n(&health["free_bytes"]),
            n(&health["reserve_bytes"])
        )?,
        state => writeln!(
            out,
            "health    {}: {}",
            state.to_uppercase(),
            health["reason"].as_str().unwrap_or("see the agent's log")
        )?,
    }
    match s["oldest_age_ms"].as_u64() {
        Some(ms) => writeln!(out, "oldest    {:.1}s old (sequence {})", ms as f64 / 1000.0, n(&s["oldest_sequence"]))?,
        None => writeln!(out, "oldest    (log empty)")?,
    }
    let c = &s["counters"];
    writeln!(
        out,
        "counters  accepted {}, duplicates {}, evicted {}, expired {}, dead letters {} held",
        n(&c["accepted_events"]),
        n(&c["dedup_hits"]),
        n(&c["evicted_events"]),
        n(&c["expired_events"]),
        n(&s["dead_letters"])
    )?;
    if n(&c["retained_events"]) > 0 || n(&c["retained_evicted"]) + n(&c["retained_expired"]) > 0 {
        writeln!(
            out,
            "replay    {} delivered events kept ({} bytes); {} removed for room, {} for age or share",
            n(&c["retained_events"]),
            n(&c["retained_bytes"]),
            n(&c["retained_evicted"]),
            n(&c["retained_expired"])
        )?;
    }
    let dests = body["destinations"].as_array().cloned().unwrap_or_default();
    if dests.is_empty() {
        writeln!(out, "destinations: none configured (events are kept until one is added)")?;
    } else {
        writeln!(
            out,
            "\n{:<16} {:<6} {:<10} {:>10} {:>10} {:>9} {:>9} {:>8} {:>10}  last error",
            "DESTINATION", "PROTO", "STATE", "ACKED", "BACKLOG", "LAG", "RATE/s", "ETA", "RECONNECTS"
        )?;
    }
    for d in dests {
        let state = match (d["connected"].as_bool() == Some(true), d["throttled"].as_bool() == Some(true)) {
            (true, true) => "throttled",
            (true, false) => "connected",
            (false, _) => "down",
        };
        let eta = d["drain_eta_seconds"].as_f64().map_or_else(|| "-".to_owned(), |s| format!("{s:.0}s"));
        writeln!(
            out,
            "{:<16} {:<6} {:<10} {:>10} {:>10} {:>8.1}s {:>9.0} {:>8} {:>10}  {}",
            d["name"].as_str().unwrap_or("?"),
            d["protocol"].as_str().unwrap_or("?"),
            state,
            n(&d["acked_sequence"]),
            n(&d["backlog_events"]),
            n(&d["lag_ms"]) as f64 / 1000.0,
            d["send_rate"].as_f64().unwrap_or(0.0),
            eta,
            n(&d["reconnects"]),
            d["last_error"].as_str().unwrap_or("")
        )?;
        let r = &d["replay"];
        if r.is_object() {
            let eta = r["eta_seconds"].as_f64().map_or_else(|| "unknown".to_owned(), |s| format!("{s:.0}s"));
            writeln!(
                out,
                "{:<16} replaying from {} through {}: {} left, ETA {eta}",
                "",
                n(&r["from"]),
                n(&r["through"]),
                n(&r["remaining"])
            )?;
        }
    }
    let plugins = body["plugins"].as_array().cloned().unwrap_or_default();
    if !plugins.is_empty() {
        writeln!(
            out,
            "\n{:<16} {:<8} {:>10} {:>10} {:>9} {:>7} {:>9} {:<10}  last error",
            "PLUGIN", "WORLD", "CALLS", "EVENTS", "FAILURES", "TRAPS", "TIMEOUTS", "CIRCUIT"
        )?;
        for p in &plugins {
            writeln!(
                out,
                "{:<16} {:<8} {:>10} {:>10} {:>9} {:>7} {:>9} {:<10}  {}",
                p["name"].as_str().unwrap_or("?"),
                p["world"].as_str().unwrap_or("?"),
                n(&p["calls"]),
                n(&p["events"]),
                n(&p["failures"]),
                n(&p["traps"]),
                n(&p["timeouts"]),
                p["circuit"].as_str().unwrap_or("?"),
                p["last_error"].as_str().unwrap_or("")
            )?;
        }
    }
    Ok(())
}

/// The `ferry` command: parses arguments, sets up logging, runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Run(args) => run(args),
        Command::Publish(args) => publish(args),
        Command::Status(args) => status(args),
        Command::Config(cmd) => {
            // `check` compiles plugins, which can take a while: the log says so.
            init_logging(LogFormat::Human);
            config_command(cmd)
        }
        Command::Plugin(cmd) => {
            init_logging(LogFormat::Human);
            plugin::run(cmd)
        }
        Command::Dlq(cmd) => dlq::run(cmd),
        Command::Events(cmd) => events::run(cmd),
        Command::Replay(args) => replay::run(args),
        Command::Store(cmd) => store::run(cmd),
        #[cfg(feature = "demo")]
        Command::Demo(args) => {
            // The demo's brokers log every cut connection; the progress lines tell the story.
            init_logging_with(LogFormat::Human, "error,rumqttd=off");
            crate::demo::run(args)
        }
        #[cfg(feature = "fleet-manager")]
        Command::Fleet(cmd) => {
            init_logging(LogFormat::Human);
            fleet::run(cmd)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry: {e:#}");
            if let Some(c) = e.downcast_ref::<plugin::CheckFailed>() {
                return ExitCode::from(c.exit_code());
            }
            match e.downcast_ref::<store::VerifyFailed>() {
                Some(v) => ExitCode::from(v.exit_code()),
                None => ExitCode::FAILURE,
            }
        }
    }
}

fn run(args: &RunArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    let config = load_config(args.config.as_ref())?;
    if args.config.is_none() {
        tracing::info!(
            "no --config given: running on the embedded default (data in {}, HTTP on {}); `ferry config default` prints it",
            config.agent.data_dir.display(),
            config.http.listen
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(crate::runtime::run(
        config,
        Arc::new(SystemClock),
        crate::systemd::supervised(shutdown_signal()),
    ))?;
    Ok(())
}

fn init_logging(format: LogFormat) {
    init_logging_with(format, "info");
}

/// Logs to stderr at `default_level` unless `RUST_LOG` says otherwise.
fn init_logging_with(format: LogFormat, default_level: &str) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let spec = std::env::var("RUST_LOG").ok().filter(|s| !s.is_empty());
    let filter = log_filter(spec.as_deref(), default_level).unwrap_or_else(|e| {
        eprintln!("ferry: ignoring RUST_LOG: {e}; logging at `{default_level}`");
        log_filter(None, default_level).expect("the built-in log level parses")
    });
    let human =
        matches!(format, LogFormat::Human).then(|| tracing_subscriber::fmt::layer().with_writer(std::io::stderr));
    let json =
        matches!(format, LogFormat::Json).then(|| tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr));
    tracing_subscriber::registry().with(filter).with(human).with(json).init();
}

/// The log filter from `RUST_LOG` (`spec`), else `default_level`, with
/// tracing's full `EnvFilter` syntax (span and field filters too).
#[cfg(feature = "env-filter")]
fn log_filter(spec: Option<&str>, default_level: &str) -> Result<tracing_subscriber::EnvFilter, String> {
    let spec = spec.unwrap_or(default_level);
    tracing_subscriber::EnvFilter::try_new(spec).map_err(|e| format!("`{spec}`: {e}"))
}

/// The log filter from `RUST_LOG` (`spec`), else `default_level`, as
/// `target=level` directives (`info`, `ferry=debug,rumqttc=warn`): device
/// builds leave out `EnvFilter` and the regex engine it needs.
#[cfg(not(feature = "env-filter"))]
fn log_filter(spec: Option<&str>, default_level: &str) -> Result<tracing_subscriber::filter::Targets, String> {
    let spec = spec.unwrap_or(default_level);
    spec.parse().map_err(|e| format!("`{spec}`: {e} (this build takes `target=level` directives only)"))
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::log_filter;

    #[test]
    fn log_filter_takes_target_directives_and_names_a_bad_one() {
        assert!(log_filter(None, "error,rumqttd=off").is_ok());
        assert!(log_filter(Some("ferry=debug,rumqttc=warn"), "info").is_ok());
        let err = log_filter(Some("ferry=loud"), "info").unwrap_err();
        assert!(err.contains("ferry=loud"), "{err}");
    }

    #[test]
    fn span_filters_need_the_env_filter_feature() {
        let parsed = log_filter(Some("ferry[forward{destination=cloud}]=debug"), "info");
        assert_eq!(parsed.is_ok(), cfg!(feature = "env-filter"));
    }
}
