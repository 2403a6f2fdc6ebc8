//! `ferry demo`: the whole product in under a minute, with nothing to set up.
//!
//! Two in-process MQTT brokers (rumqttd) stand in for two clouds: `cloud-a`
//! speaks MQTT 5, `cloud-b` MQTT 3.1.1 and sits behind a small TCP proxy the
//! demo can cut. A simulated sensor fleet posts readings to the agent's
//! HTTP API; the example threshold filter (when `scripts/build-plugins.sh`
//! has built it) drops glitched readings before they are stored. Midway,
//! `cloud-b` goes offline and comes back; a progress line each second shows
//! each cloud's backlog growing and draining. At the end, subscribers on
//! both brokers must have seen every accepted event (duplicates counted);
//! the command fails otherwise, so it doubles as an end-to-end smoke test.
//!
//! Built with the default-on cargo feature `demo`; a firmware build can
//! leave it (and rumqttd) out.

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::clock::SystemClock;
use crate::config::{Config, MqttEndpoint, Protocol};
use crate::mqtt::{Link, LinkEvent, LinkOptions};
use crate::runtime::Agent;

/// The demo device's id (and so the topic prefix `ferry/demo-gateway/`).
const DEVICE: &str = "demo-gateway";

/// Readings below this are sensor glitches the filter drops.
const GLITCH_CELSIUS: f64 = -273.15;

/// How long the demo waits for the clouds to catch up at the end.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// `ferry demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How long the sensor fleet publishes; cloud-b is offline for the middle third.
    #[arg(long, default_value = "18s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Simulated sensors.
    #[arg(long, default_value_t = 8)]
    pub sensors: usize,
    /// Readings per second per sensor.
    #[arg(long, default_value_t = 25)]
    pub rate: u32,
    /// The filter plugin to run; default: `plugins/build/threshold-filter.wasm` if built.
    #[arg(long)]
    pub plugin: Option<PathBuf>,
    /// Where the agent keeps its store (default: a fresh directory under the
    /// system's temporary directory, kept afterwards for `ferry store inspect`).
    #[arg(long)]
    pub data: Option<PathBuf>,
}

/// Runs the demo; fails if any accepted event did not reach both clouds.
pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    if args.sensors == 0 || args.rate == 0 || args.duration < Duration::from_secs(3) {
        bail!("--sensors and --rate must be at least 1 and --duration at least 3s");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(demo(args))
}

/// The example filter, where `scripts/build-plugins.sh` puts it.
fn find_plugin(given: Option<&Path>) -> anyhow::Result<Option<PathBuf>> {
    if let Some(p) = given {
        let p = p.canonicalize().with_context(|| format!("--plugin {}", p.display()))?;
        return Ok(Some(p));
    }
    let candidates = [
        PathBuf::from("plugins/build/threshold-filter.wasm"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/build/threshold-filter.wasm"),
    ];
    Ok(candidates.iter().find(|p| p.is_file()).and_then(|p| p.canonicalize().ok()))
}

async fn demo(args: &DemoArgs) -> anyhow::Result<()> {
    let plugin = find_plugin(args.plugin.as_deref())?;
    let data = match &args.data {
        // Never a store someone may still want: the demo starts from nothing.
        Some(d) if d.read_dir().is_ok_and(|mut entries| entries.next().is_some()) => {
            bail!("--data {}: the directory is not empty; give a new or empty one", d.display())
        }
        Some(d) => d.clone(),
        None => {
            let d = std::env::temp_dir().join(format!("ferry-demo-{}", std::process::id()));
            if d.exists() {
                // A leftover of an earlier demo that had this process id.
                std::fs::remove_dir_all(&d).with_context(|| format!("clearing {}", d.display()))?;
            }
            d
        }
    };

    outln!("Ferry demo: a gateway forwarding a sensor fleet's readings to two clouds.\n")?;
    let cloud_a = Broker::start(Protocol::V5).await.context("starting cloud-a")?;
    let cloud_b = Broker::start(Protocol::V311).await.context("starting cloud-b")?;
    let cut = Proxy::start(cloud_b.addr).await.context("starting the proxy in front of cloud-b")?;
    let seen_a = Collector::start("cloud-a", cloud_a.addr, Protocol::V5).await?;
    let seen_b = Collector::start("cloud-b", cloud_b.addr, Protocol::V311).await?;
    outln!("  cloud-a   MQTT 5 broker     mqtt://{}   (CloudEvents binary mode)", cloud_a.addr)?;
    outln!("  cloud-b   MQTT 3.1.1 broker mqtt://{}   (structured mode, behind a proxy the demo cuts)", cut.addr)?;

    let mut toml = format!(
        r#"
[agent]
device_id = "{DEVICE}"
data_dir = {data:?}

[store]
min_free_disk = "16 MiB"

[ingest.http]
listen = "127.0.0.1:0"

[[destination]]
name = "cloud-a"
url = "mqtt://{a}"
protocol = "v5"
keep_alive = "5s"
backoff_base = "100ms"
backoff_cap = "1s"

[[destination]]
name = "cloud-b"
url = "mqtt://{b}"
protocol = "v311"
keep_alive = "5s"
backoff_base = "100ms"
backoff_cap = "1s"
"#,
        data = data.display().to_string(),
        a = cloud_a.addr,
        b = cut.addr,
    );
    match &plugin {
        Some(p) => {
            toml.push_str(&format!(
                "\n[[plugin]]\nname = \"threshold\"\npath = {:?}\nworld = \"filter\"\nstage = \"ingest\"\n\
                 config = {{ field = \"celsius\", min = \"-50\" }}\n",
                p.display().to_string()
            ));
            outln!("  plugin    {} (drops glitched readings below -50 °C)", p.display())?;
        }
        None => outln!(
            "  plugin    none: the example filter is not built (scripts/build-plugins.sh rust builds it); running without"
        )?,
    }
    let config = Config::parse(&toml, "demo config")?;
    let agent = Agent::start(config, Arc::new(SystemClock)).await.context("starting the agent")?;
    let api = format!("http://{}", agent.http_addr());
    outln!("  agent     store in {}, API on {api}", data.display())?;
    outln!("            (meanwhile, in another terminal: ferry status --url {api}   or   curl {api}/metrics)\n")?;

    let fleet = Fleet::start(&api, args.sensors, args.rate, args.duration);
    let started = Instant::now();
    let third = args.duration / 3;
    let (mut offline_at, mut online_at) = (None, None);
    let mut peak_backlog_b = 0u64;
    let mut drained_b_at = None;
    // Polled four times a second (to time the drain), printed once a second.
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.tick().await;
    // cloud-b has caught up once it is within a quarter second of readings of cloud-a.
    let slack = (args.sensors as u64 * u64::from(args.rate)) / 4;
    for n in 1u64.. {
        tick.tick().await;
        let t = started.elapsed();
        if offline_at.is_none() && t >= third {
            cut.set_up(false);
            offline_at = Some(Instant::now());
            outln!("  ▼ cloud-b goes offline: its link is cut; the gateway keeps accepting, cloud-a keeps receiving")?;
        }
        if online_at.is_none() && t >= third * 2 {
            cut.set_up(true);
            online_at = Some(Instant::now());
            outln!("  ▲ cloud-b is back: its backlog drains from the store")?;
        }
        let status = Progress::read(&agent).await?;
        let b = &status.destinations[1];
        peak_backlog_b = peak_backlog_b.max(b.backlog);
        let a = &status.destinations[0];
        if online_at.is_some() && drained_b_at.is_none() && b.connected && b.backlog <= a.backlog + slack {
            drained_b_at = online_at.map(|at| at.elapsed());
        }
        if n % 4 == 0 {
            outln!("{}", status.line(t))?;
        }
        let fleet_done = fleet.done();
        if fleet_done && status.caught_up() && seen_a.count() >= fleet.accepted() && seen_b.count() >= fleet.accepted()
        {
            break;
        }
        if fleet_done && t > args.duration + DRAIN_TIMEOUT {
            outln!("  ! the clouds did not catch up within {DRAIN_TIMEOUT:?}")?;
            break;
        }
    }
    fleet.join();
    // Let the last deliveries reach the subscribers.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let metrics = get_text(&format!("{api}/metrics")).await.unwrap_or_default();
    let plugin_status = agent.plugins().first().map(crate::plugin::PluginHandle::status);
    agent.shutdown().await?;

    let accepted = fleet.accepted_ids();
    let report_a = seen_a.report(&accepted);
    let report_b = seen_b.report(&accepted);
    outln!("\nSummary")?;
    outln!(
        "  fleet     {} sensors × {}/s for {:?}: {} readings sent, {} accepted (stored durably before each 200)",
        args.sensors,
        args.rate,
        args.duration,
        fleet.sent.load(Ordering::Relaxed),
        accepted.len()
    )?;
    let unanswered = fleet.unanswered.load(Ordering::Relaxed);
    if unanswered > 0 {
        outln!("            {unanswered} readings got no answer after 5 tries (the sensor gave up on them)")?;
    }
    if let Some(p) = plugin_status {
        let answered = fleet.sent.load(Ordering::Relaxed) - fleet.unanswered.load(Ordering::Relaxed);
        let dropped = answered.saturating_sub(accepted.len() as u64);
        outln!(
            "  plugin    threshold filter: {} calls, {} glitched readings dropped before storage",
            p.calls,
            dropped
        )?;
    }
    outln!("  cloud-a   {}", report_a.line())?;
    outln!(
        "  cloud-b   {}; offline {:.0}s, backlog peaked at {} events, {} (reconnect backoff included)",
        report_b.line(),
        match (offline_at, online_at) {
            (Some(a), Some(b)) => b.duration_since(a).as_secs_f64(),
            _ => 0.0,
        },
        peak_backlog_b,
        drained_b_at.map_or_else(
            || "(not observed)".to_owned(),
            |d| format!("caught up {:.2}s after it came back", d.as_secs_f64())
        )
    )?;
    if let Some(line) = metrics.lines().find(|l| l.starts_with("ferry_store_commit_seconds_count")) {
        outln!(
            "  store     {} events in {} commits (group commit: producers share each fsync)",
            accepted.len(),
            line.rsplit(' ').next().unwrap_or("?")
        )?;
    }
    let ok = report_a.missing == 0 && report_b.missing == 0 && report_a.unexpected == 0 && report_b.unexpected == 0;
    if ok {
        outln!("\n  OK: every accepted event reached both clouds; nothing was lost while cloud-b was offline.")?;
        if report_a.duplicates + report_b.duplicates > 0 {
            outln!("      Duplicates are at-least-once resends of publishes whose PUBACK was lost with the link;")?;
            outln!("      consumers drop them by the CloudEvents `id`.")?;
        }
    }
    outln!("\nWhere to look next")?;
    outln!("  ferry store inspect --data {}", data.display())?;
    outln!("                                  what the store holds now (offline)")?;
    outln!("  cargo run --release -- run      the agent on its default config; README \"A quick tour\"")?;
    outln!("  ferry status, GET /metrics      an agent's backlog, lag, ETA and errors per destination")?;
    outln!("  plugins/README.md               write a filter plugin of your own")?;
    if !ok {
        bail!(
            "verification failed: cloud-a missing {}, cloud-b missing {}, unexpected {}",
            report_a.missing,
            report_b.missing,
            report_a.unexpected + report_b.unexpected
        );
    }
    Ok(())
}

/// A GET with the blocking client the CLI already uses, off the runtime.
async fn get_text(url: &str) -> Option<String> {
    let url = url.to_owned();
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent =
            ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(10))).build().into();
        agent.get(&url).call().ok()?.body_mut().read_to_string().ok()
    })
    .await
    .ok()
    .flatten()
}

/// An in-process rumqttd broker on its own thread and runtime. It lives
/// until the process exits: the demo never needs to stop it (the proxy
/// makes the outage).
struct Broker {
    addr: SocketAddr,
}

impl Broker {
    async fn start(protocol: Protocol) -> anyhow::Result<Self> {
        for _ in 0..5 {
            // rumqttd cannot report the port it bound, so pick a free one first.
            let port = StdListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let thread = std::thread::Builder::new()
                .name(format!("demo-broker-{port}"))
                .spawn(move || run_broker(addr, protocol))
                .context("spawning a broker thread")?;
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && !thread.is_finished() {
                if TcpStream::connect(addr).await.is_ok() {
                    return Ok(Self { addr });
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        bail!("the in-process broker did not start listening")
    }
}

fn run_broker(addr: SocketAddr, protocol: Protocol) {
    use rumqttd::{ConnectionSettings, LinkType, Router, RouterConfig, Server, ServerSettings};
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
    let router = Router::new(
        0,
        RouterConfig {
            max_connections: 100,
            max_outgoing_packet_count: 200,
            max_segment_size: 100 * 1024 * 1024,
            max_segment_count: 10,
            ..Default::default()
        },
    );
    let router_tx = router.spawn();
    let settings = ServerSettings {
        name: format!("{protocol:?}"),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: 1024 * 1024,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    rt.block_on(async move {
        // `start` returns only on a bind error.
        match protocol {
            Protocol::V5 => {
                let _ = Server::new(settings, router_tx, rumqttd::protocol::v5::V5).start(LinkType::Remote).await;
            }
            Protocol::V311 => {
                let _ = Server::new(settings, router_tx, rumqttd::protocol::v4::V4).start(LinkType::Remote).await;
            }
        }
    });
}

/// A TCP proxy in front of a broker. Cutting it closes every connection
/// through it and refuses new ones until it is restored: to the agent, the
/// cloud is unreachable.
struct Proxy {
    addr: SocketAddr,
    up: watch::Sender<bool>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (up, rx) = watch::channel(true);
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !*rx.borrow() {
                    continue; // dropped: closed at once
                }
                let mut down = rx.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = down.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Ok(Self { addr, up })
    }

    fn set_up(&self, up: bool) {
        self.up.send_replace(up);
    }
}

/// A subscriber on one cloud that counts each event id it receives.
struct Collector {
    seen: Arc<Mutex<HashMap<String, u32>>>,
}

impl Collector {
    async fn start(name: &'static str, broker: SocketAddr, protocol: Protocol) -> anyhow::Result<Self> {
        let me = Self { seen: Arc::default() };
        let filter = format!("ferry/{DEVICE}/#");
        let (ready_tx, mut ready) = watch::channel(false);
        let seen = me.seen.clone();
        let record = move |id: Option<String>| {
            if let Some(id) = id {
                *seen.lock().expect("collector lock").entry(id).or_insert(0) += 1;
            }
        };
        let endpoint = MqttEndpoint {
            host: broker.ip().to_string(),
            port: broker.port(),
            tls: false,
            protocol,
            client_id: format!("demo-{name}"),
            username: None,
            password: None,
            ca_file: None,
            client_cert: None,
            client_key: None,
            keep_alive: Duration::from_secs(30),
            max_packet_bytes: 1024 * 1024,
        };
        let opts =
            LinkOptions { inflight: 16, queue: 1024, clean_session: true, manual_acks: false, receive_maximum: None };
        tokio::spawn(async move {
            // The clouds run in this process and stay up: one connection for the whole run.
            let mut link = Link::open(&endpoint, None, &opts);
            while let Ok(event) = link.poll().await {
                match event {
                    LinkEvent::Connected { .. } if link.subscribe(&filter).is_err() => return,
                    LinkEvent::Subscribed => drop(ready_tx.send(true)),
                    // MQTT 5 carries the id as a user property (binary mode), 3.1.1 in the JSON envelope.
                    LinkEvent::Message(m) => record(match protocol {
                        Protocol::V5 => m.user_properties.iter().find(|(k, _)| k == "id").map(|(_, v)| v.clone()),
                        Protocol::V311 => serde_json::from_slice::<Value>(&m.payload)
                            .ok()
                            .and_then(|v| v["id"].as_str().map(str::to_owned)),
                    }),
                    _ => {}
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready.wait_for(|r| *r))
            .await
            .map_err(|_| anyhow::anyhow!("{name}: the subscriber got no SUBACK"))??;
        Ok(me)
    }

    /// Distinct ids received.
    fn count(&self) -> usize {
        self.seen.lock().expect("collector lock").len()
    }

    fn report(&self, accepted: &HashSet<String>) -> Report {
        let seen = self.seen.lock().expect("collector lock");
        Report {
            received: seen.keys().filter(|id| accepted.contains(*id)).count(),
            accepted: accepted.len(),
            duplicates: seen.values().map(|n| u64::from(n.saturating_sub(1))).sum(),
            missing: accepted.iter().filter(|id| !seen.contains_key(*id)).count(),
            unexpected: seen.keys().filter(|id| !accepted.contains(*id)).count(),
        }
    }
}

/// What one cloud received against what the gateway accepted.
struct Report {
    received: usize,
    accepted: usize,
    duplicates: u64,
    missing: usize,
    unexpected: usize,
}

impl Report {
    fn line(&self) -> String {
        let mut s = format!(
            "received {} of {} accepted events, {} duplicates, {} missing",
            self.received, self.accepted, self.duplicates, self.missing
        );
        if self.unexpected > 0 {
            s.push_str(&format!(", {} never accepted", self.unexpected));
        }
        s
    }
}

/// The simulated sensor fleet: one thread per sensor posting readings, each
/// with its own idempotency key, and remembering which the agent accepted.
struct Fleet {
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    accepted: Arc<Mutex<HashSet<String>>>,
    sent: Arc<AtomicU64>,
    /// Readings that got no answer after every retry.
    unanswered: Arc<AtomicU64>,
    finished: Arc<AtomicBool>,
    started: Instant,
    duration: Duration,
}

impl Fleet {
    fn start(api: &str, sensors: usize, rate: u32, duration: Duration) -> Self {
        let accepted: Arc<Mutex<HashSet<String>>> = Arc::default();
        let sent = Arc::new(AtomicU64::new(0));
        let unanswered = Arc::new(AtomicU64::new(0));
        let finished = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let threads = (0..sensors)
            .map(|sensor| {
                let (url, accepted) = (format!("{api}/v1/events"), accepted.clone());
                let counters = (sent.clone(), unanswered.clone());
                std::thread::spawn(move || {
                    sensor_loop(&url, sensor, rate, started + duration, &accepted, (&counters.0, &counters.1))
                })
            })
            .collect();
        Self { threads: Mutex::new(threads), accepted, sent, unanswered, finished, started, duration }
    }

    fn done(&self) -> bool {
        if self.started.elapsed() >= self.duration
            && self.threads.lock().expect("fleet lock").iter().all(std::thread::JoinHandle::is_finished)
        {
            self.finished.store(true, Ordering::Relaxed);
        }
        self.finished.load(Ordering::Relaxed)
    }

    fn join(&self) {
        for t in self.threads.lock().expect("fleet lock").drain(..) {
            let _ = t.join();
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.lock().expect("fleet lock").len()
    }

    fn accepted_ids(&self) -> HashSet<String> {
        self.accepted.lock().expect("fleet lock").clone()
    }
}

fn sensor_loop(
    url: &str,
    sensor: usize,
    rate: u32,
    until: Instant,
    accepted: &Mutex<HashSet<String>>,
    (sent, unanswered): (&AtomicU64, &AtomicU64),
) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false)
        .build()
        .into();
    let period = Duration::from_secs(1) / rate;
    let mut next = Instant::now();
    let mut n = 0u64;
    // Deterministic per sensor, so runs are comparable.
    let mut noise = 0x9e37_79b9_7f4a_7c15u64 ^ (sensor as u64).wrapping_mul(0x1000_0000_01b3);
    while Instant::now() < until {
        n += 1;
        noise ^= noise << 13;
        noise ^= noise >> 7;
        noise ^= noise << 17;
        // About one reading in fifty is a glitch.
        let celsius = if noise.is_multiple_of(50) {
            GLITCH_CELSIUS
        } else {
            18.0 + (noise % 1200) as f64 / 100.0 + sensor as f64 * 0.1
        };
        let id = format!("sensor-{sensor}-{n}");
        let body = json!({
            "topic": format!("sensors/{sensor}/temperature"),
            "id": id,
            "key": format!("sensor-{sensor}"),
            "data": { "celsius": celsius },
        });
        sent.fetch_add(1, Ordering::Relaxed);
        // A refused or failed request is retried with the same id: the
        // agent stores it once however often it arrives.
        let mut answered = false;
        for _ in 0..5 {
            let Ok(mut r) = agent.post(url).header("content-type", "application/json").send(body.to_string()) else {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            };
            if r.status() != 200 {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            let answer: Value =
                r.body_mut().read_to_string().ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or(Value::Null);
            for e in answer["events"].as_array().into_iter().flatten() {
                if let Some(id) = e["id"].as_str() {
                    accepted.lock().expect("fleet lock").insert(id.to_owned());
                }
            }
            answered = true;
            break;
        }
        if !answered {
            unanswered.fetch_add(1, Ordering::Relaxed);
        }
        next += period;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
}

/// One progress line's worth of state.
struct Progress {
    accepted: u64,
    destinations: Vec<DestinationLine>,
}

struct DestinationLine {
    name: String,
    connected: bool,
    backlog: u64,
    delivered: u64,
    rate: f64,
}

impl Progress {
    async fn read(agent: &Agent) -> anyhow::Result<Self> {
        let store = agent.store().clone();
        let status = tokio::task::spawn_blocking(move || store.status(0)).await??;
        let destinations = agent
            .destinations()
            .into_iter()
            .map(|d| DestinationLine {
                backlog: status.last_sequence.saturating_sub(d.acked_sequence),
                name: d.name,
                connected: d.connected,
                delivered: d.delivered,
                rate: d.send_rate,
            })
            .collect();
        Ok(Self { accepted: status.counters.accepted_events, destinations })
    }

    fn caught_up(&self) -> bool {
        self.destinations.iter().all(|d| d.backlog == 0)
    }

    fn line(&self, t: Duration) -> String {
        let mut s = format!("  {:>3}s  accepted {:>6}", t.as_secs(), self.accepted);
        for d in &self.destinations {
            s.push_str(&format!(
                "  │ {} {:<7} backlog {:>5} delivered {:>6} ({:>4.0}/s)",
                d.name,
                if d.connected { "up" } else { "OFFLINE" },
                d.backlog,
                d.delivered,
                d.rate
            ));
        }
        s
    }
}
