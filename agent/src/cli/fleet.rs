//! `ferry fleet keygen|sign|push|status`: the fleet manager's tools.
//!
//! `keygen` writes an ed25519 key pair; `sign` turns a component into a
//! bundle (signed manifest + component); `push` publishes a bundle through a
//! broker, retained, as chunks every broker accepts; `status` reads back the
//! reports devices publish. Formats and topics are those of
//! [`crate::fleet`].

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use bytesize::ByteSize;
use clap::{Args, Subcommand, ValueEnum};

use super::plugin::WorldArg;
use crate::config::fleet::DEFAULT_TOPIC_ROOT;
use crate::config::{Config, MqttEndpoint};
use crate::fleet::bundle::{self, Bundle, Chunk, Manifest};
use crate::fleet::report::Report;
use crate::fleet::topics;
use crate::mqtt::{self, Link, LinkEvent, LinkOptions};
use crate::plugin::World;
use crate::plugin::check::{self, CheckOptions};
use crate::signing;

/// `ferry fleet …`.
#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// Generate an ed25519 key pair: PREFIX.key (secret) and PREFIX.pub.
    Keygen(KeygenArgs),
    /// Sign a component into a bundle for `push`.
    Sign(SignArgs),
    /// Publish a bundle, retained, for the devices matching a pattern.
    Push(PushArgs),
    /// Show what devices report about their plugins.
    Status(StatusArgs),
}

/// `ferry fleet keygen`.
#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Path prefix of the two files.
    #[arg(long, default_value = "fleet")]
    pub out: PathBuf,
}

/// `ferry fleet sign`.
#[derive(Debug, Args)]
pub struct SignArgs {
    /// The component (.wasm).
    pub file: PathBuf,
    /// The plugin it updates (its `[[plugin]] name` on the devices).
    #[arg(long)]
    pub name: String,
    /// The version: devices install only versions above the one they run.
    #[arg(long)]
    pub version: u64,
    /// The secret key file (from `ferry fleet keygen`).
    #[arg(long)]
    pub key: PathBuf,
    /// The world (default: whichever the component targets; it is checked either way).
    #[arg(long, value_enum)]
    pub world: Option<WorldArg>,
    /// Bytes per chunk on the wire (at most 120 KiB).
    #[arg(long, default_value = "64 KiB")]
    pub chunk_size: ByteSize,
    /// The bundle file (default: NAME-vVERSION.bundle).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// A broker on the command line.
#[derive(Debug, Args)]
pub struct BrokerArgs {
    /// The broker, mqtt://host:port or mqtts://host:port.
    #[arg(long)]
    pub broker: String,
    /// MQTT protocol version.
    #[arg(long, value_enum, default_value = "v5")]
    pub protocol: ProtocolArg,
    /// User name.
    #[arg(long)]
    pub username: Option<String>,
    /// Password.
    #[arg(long, env = "FERRY_FLEET_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// PEM CA bundle to trust instead of the system roots (mqtts).
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS.
    #[arg(long, requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// PEM key of the client certificate.
    #[arg(long, requires = "client_cert")]
    pub client_key: Option<PathBuf>,
    /// Root of the fleet topics (the devices' `[fleet] topic_root`).
    #[arg(long, default_value = DEFAULT_TOPIC_ROOT)]
    pub topic_root: String,
}

/// A protocol version on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProtocolArg {
    /// MQTT 5.
    V5,
    /// MQTT 3.1.1.
    V311,
}

/// `ferry fleet push`.
#[derive(Debug, Args)]
pub struct PushArgs {
    /// The bundle (from `ferry fleet sign`).
    pub bundle: PathBuf,
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Device ids that should install it: a glob (`*`, `gw-*`, `gw-1?`).
    #[arg(long, default_value = "*")]
    pub devices: String,
}

/// `ferry fleet status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// How long to collect retained reports.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub wait: Duration,
    /// Print the reports as JSON lines.
    #[arg(long)]
    pub json: bool,
}

/// Runs a `ferry fleet` command.
pub fn run(cmd: &FleetCommand) -> anyhow::Result<()> {
    match cmd {
        FleetCommand::Keygen(a) => keygen(a),
        FleetCommand::Sign(a) => sign(a),
        FleetCommand::Push(a) => runtime()?.block_on(push(a)),
        FleetCommand::Status(a) => runtime()?.block_on(status(a)),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

fn with_extension(prefix: &Path, ext: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(ext);
    PathBuf::from(s)
}

fn keygen(args: &KeygenArgs) -> anyhow::Result<()> {
    let (secret_path, public_path) = (with_extension(&args.out, ".key"), with_extension(&args.out, ".pub"));
    for p in [&secret_path, &public_path] {
        if p.exists() {
            bail!("{} exists; refusing to overwrite a key", p.display());
        }
    }
    let key = signing::generate_key();
    let public = signing::encode_public(&key.verifying_key());
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&secret_path)
            .with_context(|| format!("creating {}", secret_path.display()))?;
        f.write_all(signing::encode_secret(&key).as_bytes())?;
        f.sync_all()?;
    }
    std::fs::write(&public_path, format!("{public}\n"))
        .with_context(|| format!("writing {}", public_path.display()))?;
    outln!("secret key  {} (keep it private)", secret_path.display())?;
    outln!("public key  {} (key id {})", public_path.display(), signing::key_id(&key.verifying_key()))?;
    outln!("\nTrust it on devices with:\n[fleet]\ntrusted_keys = [\"{public}\"]")?;
    Ok(())
}

fn sign(args: &SignArgs) -> anyhow::Result<()> {
    if !bundle::valid_name(&args.name) {
        bail!("--name `{}` must be 1 to 64 letters, digits, `-` or `_` (a [[plugin]] name)", args.name);
    }
    let chunk_size = u32::try_from(args.chunk_size.as_u64())
        .ok()
        .filter(|&c| c > 0 && c <= bundle::MAX_CHUNK_SIZE)
        .with_context(|| format!("--chunk-size must be between 1 byte and {} bytes", bundle::MAX_CHUNK_SIZE))?;
    let key_text =
        std::fs::read_to_string(&args.key).with_context(|| format!("reading the key {}", args.key.display()))?;
    let key = signing::decode_secret(&key_text).with_context(|| format!("{}", args.key.display()))?;
    let component =
        std::fs::read(&args.file).with_context(|| format!("reading the component {}", args.file.display()))?;
    // Refuse to sign what no device could load: a component that does not
    // target the world it claims.
    let options = CheckOptions {
        world: args.world.map(|w| match w {
            WorldArg::Filter => World::Filter,
            WorldArg::Merge => World::Merge,
        }),
        ..CheckOptions::default()
    };
    let world = check::load(&args.file, &options, None)
        .with_context(|| format!("{} is not a loadable plugin component", args.file.display()))?
        .world();
    let manifest = Manifest::sign(&args.name, args.version, world, &component, chunk_size, &key)?;
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from(format!("{}-v{}.bundle", args.name, args.version)));
    let bytes = Bundle { manifest: manifest.clone(), component }.encode();
    std::fs::write(&out, bytes).with_context(|| format!("writing {}", out.display()))?;
    outln!(
        "{}: {} v{} ({} world), {} bytes in {} chunks, sha256 {}, signed by key {}",
        out.display(),
        manifest.name,
        manifest.version,
        manifest.world,
        manifest.size,
        manifest.total(),
        manifest.sha256,
        signing::key_id(&key.verifying_key())
    )?;
    Ok(())
}

/// The endpoint for `--broker` and friends, validated like a destination.
fn endpoint(args: &BrokerArgs, client_id: &str) -> anyhow::Result<MqttEndpoint> {
    let mut d = toml::Table::new();
    d.insert("name".into(), "fleet".into());
    d.insert("url".into(), args.broker.clone().into());
    d.insert("client_id".into(), client_id.into());
    d.insert(
        "protocol".into(),
        match args.protocol {
            ProtocolArg::V5 => "v5",
            ProtocolArg::V311 => "v311",
        }
        .into(),
    );
    d.insert("max_packet_size".into(), "256 KiB".into());
    for (key, value) in [("username", &args.username), ("password", &args.password)] {
        if let Some(v) = value {
            d.insert(key.into(), v.clone().into());
        }
    }
    for (key, value) in
        [("ca_file", &args.ca_file), ("client_cert", &args.client_cert), ("client_key", &args.client_key)]
    {
        if let Some(v) = value {
            d.insert(key.into(), v.display().to_string().into());
        }
    }
    let mut doc = toml::Table::new();
    doc.insert("destination".into(), toml::Value::Array(vec![toml::Value::Table(d)]));
    let config = Config::parse(&toml::to_string(&doc)?, "command line").map_err(|e| {
        let flag = match e.key.rsplit('.').next().unwrap_or("url") {
            "url" => "broker".to_owned(),
            other => other.replace('_', "-"),
        };
        anyhow::anyhow!("--{flag}: {}", e.reason)
    })?;
    Ok(config.destinations.into_iter().next().expect("one destination").endpoint)
}

async fn connect(args: &BrokerArgs, role: &str) -> anyhow::Result<Link> {
    let client_id = format!("ferry-fleet-{role}-{}", std::process::id());
    let e = endpoint(args, &client_id)?;
    let tls = if e.tls { Some(mqtt::tls_config(&e)?) } else { None };
    let opts = LinkOptions { inflight: 32, queue: 64, clean_session: true, manual_acks: false, receive_maximum: None };
    let mut link = Link::open(&e, tls.as_ref(), &opts);
    match tokio::time::timeout(Duration::from_secs(15), mqtt::session::connect(&mut link)).await {
        Ok(Ok(_)) => Ok(link),
        Ok(Err(e)) => Err(anyhow::anyhow!("cannot connect to {}: {e}", args.broker)),
        Err(_) => bail!("cannot connect to {}: no answer within 15s", args.broker),
    }
}

/// Publishes `messages` (topic, payload) retained with QoS 1 and waits for
/// every PUBACK, keeping at most `window` unacknowledged.
async fn publish_all(link: &mut Link, messages: Vec<(String, Vec<u8>)>, window: usize) -> anyhow::Result<()> {
    let total = messages.len();
    let (mut queued, mut acked) = (0usize, 0usize);
    let mut pending = messages.into_iter();
    while acked < total {
        while queued - acked < window
            && let Some((topic, payload)) = pending.next()
        {
            link.publish(topic, payload, None, Vec::new(), true)?;
            queued += 1;
        }
        match tokio::time::timeout(Duration::from_secs(30), link.poll()).await {
            Ok(Ok(LinkEvent::Acked(_))) => acked += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => bail!("the broker connection failed after {acked} of {total} messages: {e}"),
            Err(_) => bail!("no PUBACK for 30s after {acked} of {total} messages"),
        }
    }
    Ok(())
}

async fn push(args: &PushArgs) -> anyhow::Result<()> {
    if !bundle::valid_pattern(&args.devices) {
        bail!("--devices `{}` must be one topic level: device-id characters, `*` and `?`", args.devices);
    }
    let bytes = std::fs::read(&args.bundle).with_context(|| format!("reading {}", args.bundle.display()))?;
    let b = Bundle::decode(&bytes).with_context(|| format!("{}", args.bundle.display()))?;
    let m = &b.manifest;
    m.validate().with_context(|| format!("{}", args.bundle.display()))?;
    m.check_component(&b.component).with_context(|| format!("{}", args.bundle.display()))?;
    let root = &args.broker.topic_root;
    let mut messages: Vec<(String, Vec<u8>)> = Chunk::split(m, &b.component)
        .into_iter()
        .map(|c| (topics::chunk(root, &m.name, m.version, c.header.index), c.encode()))
        .collect();
    // The manifest goes last: a device that sees it finds every chunk retained.
    messages.push((topics::manifest(root, &m.name, &args.devices), serde_json::to_vec(m)?));
    let mut link = connect(&args.broker, "push").await?;
    let before = retained_manifests(&mut link, root, &m.name).await?;
    let n = messages.len();
    publish_all(&mut link, messages, 16).await?;
    outln!(
        "pushed {} v{} to devices `{}` via {}: manifest and {} chunks, retained",
        m.name,
        m.version,
        args.devices,
        args.broker.broker,
        n - 1
    )?;
    // Older versions no manifest points to any more only cost broker storage
    // and device bandwidth: clear their retained chunks.
    let mut after = before.clone();
    after.insert(args.devices.clone(), m.clone());
    let live: BTreeSet<u64> = after.values().map(|x| x.version).collect();
    let stale: BTreeMap<u64, u32> = before
        .values()
        .filter(|x| x.version < m.version && !live.contains(&x.version))
        .map(|x| (x.version, x.total()))
        .collect();
    for (version, total) in stale {
        let clear = (0..total).map(|i| (topics::chunk(root, &m.name, version, i), Vec::new())).collect();
        publish_all(&mut link, clear, 16).await?;
        outln!("cleared the {total} retained chunks of v{version}, which no manifest names any more")?;
    }
    outln!("watch it with: ferry fleet status --broker {}", args.broker.broker)?;
    Ok(())
}

/// The manifests of plugin `name` retained on the broker, by device pattern.
async fn retained_manifests(link: &mut Link, root: &str, name: &str) -> anyhow::Result<BTreeMap<String, Manifest>> {
    let prefix = format!("{root}/plugin/{name}/manifest/");
    link.subscribe(&format!("{prefix}+"))?;
    let mut found = BTreeMap::new();
    // Retained messages follow the SUBACK at once; a short quiet spell ends them.
    let mut subscribed = false;
    loop {
        let quiet = if subscribed { Duration::from_millis(500) } else { Duration::from_secs(15) };
        match tokio::time::timeout(quiet, link.poll()).await {
            Err(_) if subscribed => return Ok(found),
            Err(_) => bail!("no SUBACK within 15s"),
            Ok(Err(e)) => bail!("the broker connection failed: {e}"),
            Ok(Ok(LinkEvent::Subscribed)) => subscribed = true,
            Ok(Ok(LinkEvent::SubscribeRefused(r))) => bail!("the broker refused the subscription ({r})"),
            Ok(Ok(LinkEvent::Message(msg))) => {
                if let (Some(devices), Ok(manifest)) =
                    (msg.topic.strip_prefix(&prefix), Manifest::from_json(&msg.payload))
                {
                    found.insert(devices.to_owned(), manifest);
                }
            }
            Ok(Ok(_)) => {}
        }
    }
}

async fn status(args: &StatusArgs) -> anyhow::Result<()> {
    let mut link = connect(&args.broker, "status").await?;
    link.subscribe(&topics::statuses(&args.broker.topic_root))?;
    let mut reports: BTreeMap<(String, String), Report> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + args.wait;
    loop {
        match tokio::time::timeout_at(deadline, link.poll()).await {
            Err(_) => break,
            Ok(Err(e)) => bail!("the broker connection failed: {e}"),
            Ok(Ok(LinkEvent::SubscribeRefused(r))) => bail!("the broker refused the subscription ({r})"),
            Ok(Ok(LinkEvent::Message(m))) => {
                if m.payload.is_empty() {
                    continue;
                }
                match serde_json::from_slice::<Report>(&m.payload) {
                    Ok(r) => {
                        reports.insert((r.device.clone(), r.plugin.clone()), r);
                    }
                    Err(e) => eprintln!("ignoring an unreadable report on {}: {e}", m.topic),
                }
            }
            Ok(Ok(_)) => {}
        }
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        for r in reports.values() {
            writeln!(out, "{}", serde_json::to_string(r)?)?;
        }
        return Ok(());
    }
    if reports.is_empty() {
        writeln!(out, "no device has reported under {}/status yet", args.broker.topic_root)?;
        return Ok(());
    }
    writeln!(out, "{:<20} {:<16} {:>7} {:<12} {:<21} detail", "DEVICE", "PLUGIN", "VERSION", "STATE", "REPORTED")?;
    for r in reports.values() {
        let mut detail = Vec::new();
        if let Some(c) = r.candidate {
            detail.push(format!("candidate v{c}"));
        }
        if let (Some(got), Some(total)) = (r.received, r.total) {
            detail.push(format!("{got}/{total} chunks"));
        }
        if let Some(s) = r.shadow {
            detail.push(format!("shadow {} events, {} calls differ", s.events, s.differences));
        }
        if let Some(reason) = &r.reason {
            detail.push(reason.clone());
        }
        writeln!(
            out,
            "{:<20} {:<16} {:>7} {:<12} {:<21} {}",
            r.device,
            r.plugin,
            r.version,
            r.state.as_str(),
            r.time,
            detail.join("; ")
        )?;
    }
    Ok(())
}
