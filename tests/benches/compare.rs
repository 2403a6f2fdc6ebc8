//! Ferry side by side with a Mosquitto bridge, on this machine, in one run:
//! the same producers, the same two "cloud" Mosquitto brokers (each behind a
//! fault proxy so its link can be cut), the same 256-byte payloads.
//!
//! Systems:
//! - **bridge**: producers → local Mosquitto (persistence on, Mosquitto's
//!   default autosave, unlimited queues) bridged to both clouds (`topic
//!   sensors/# out 1`, `cleansession false`, MQTT 3.1.1, other bridge
//!   settings at Mosquitto's defaults);
//! - **ferry-mqtt**: producers → the same kind of local Mosquitto → Ferry's
//!   local MQTT ingest → two destinations;
//! - **ferry-http**: producers → Ferry's HTTP API → two destinations;
//! - **ferry-http-batched**: the same, with each destination batching up to
//!   64 events (32 KiB) per publish, every event still durable on its own.
//!
//! Rows: end-to-end throughput (every event at both clouds), latency p50/p99
//! at a fixed rate, time to drain after one cloud was cut off under load,
//! peak RSS, CPU seconds per 100k events (of the system under test, and of
//! the rest of the rig sharing its cores); then crash rows (SIGKILL under load,
//! counting acknowledged events that never reached a cloud) and the
//! power-loss approximation of Ferry's store.
//!
//! Run: `cargo bench -p ferry-tests --bench compare`. Environment:
//! `FERRY_COMPARE_EVENTS` (throughput events, default 100000),
//! `FERRY_COMPARE_RATE` (events/s for latency and outage, default 2000),
//! `FERRY_COMPARE_LATENCY_SECS` (10), `FERRY_COMPARE_OUTAGE_SECS` (60),
//! `FERRY_COMPARE_KILLS` (10), `FERRY_COMPARE_CUTS` (power cuts, 40),
//! `FERRY_COMPARE_SYSTEMS` (comma-separated subset of bridge,ferry-mqtt,ferry-http,
//! ferry-http-batched),
//! `FERRY_COMPARE_WINDOW` (events in flight per producer, 32),
//! `FERRY_COMPARE_LOCAL_INFLIGHT` (`max_inflight_messages` of the local
//! broker, both setups; unset: Mosquitto's default of 20),
//! `FERRY_COMPARE_PROTOCOL` (Ferry's destinations: `v5`, the default, or
//! `v311`, whose structured events the subscribers unwrap),
//! `FERRY_COMPARE_AGENT` (path of another `ferry` build to run instead of the
//! one built with this bench, to compare two builds),
//! `FERRY_COMPARE_STORE` (TOML lines for Ferry's `[store]` table, e.g.
//! `cache_size = "4 MiB"`).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use ferry::config::Durability;
use ferry::store::power_loss::PowerCut;
use ferry_harness::{Autosave, FaultProxy, Mosquitto, MosquittoOptions};
use ferry_tests::workload::{Pace, Producers, Tally, now_us, proc_stats, quantile};
use ferry_tests::{FerryProcess, ferry_bin, write_config_with};
use rand::Rng as _;

const PRODUCERS: u32 = 4;
/// Events per HTTP request at full speed.
const HTTP_BATCH: u16 = 16;

#[derive(Debug, Clone)]
struct Settings {
    events: u64,
    rate: f64,
    latency: Duration,
    outage: Duration,
    kills: usize,
    cuts: usize,
    systems: Vec<System>,
    /// QoS 1 publishes in flight per MQTT producer; HTTP producers keep as
    /// many events in flight (requests of `HTTP_BATCH` at full speed).
    window: u16,
    /// `max_inflight_messages` of the local broker (both setups), if set.
    local_inflight: Option<u32>,
    /// Protocol of Ferry's two destinations: `v5` (binary content mode,
    /// attributes as user properties) or `v311` (structured JSON).
    protocol: String,
    /// Extra `[store]` settings of Ferry's config (the defaults if empty).
    store: String,
}

fn env_num(name: &str, default: f64) -> f64 {
    match std::env::var(name) {
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum System {
    Bridge,
    FerryMqtt,
    FerryHttp,
    FerryHttpBatched,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Bridge => "Mosquitto bridge",
            System::FerryMqtt => "Ferry, local MQTT ingest",
            System::FerryHttp => "Ferry, HTTP ingest",
            System::FerryHttpBatched => "Ferry, HTTP ingest, batched",
        }
    }
}

/// CPU seconds a process has used so far; 0 if there is none or it is gone.
fn cpu_secs(pid: Option<u32>) -> f64 {
    pid.and_then(proc_stats).map_or(0.0, |s| s.cpu_secs)
}

/// One system wired to two fresh clouds.
struct Rig {
    system: System,
    clouds: [Mosquitto; 2],
    proxies: [FaultProxy; 2],
    tallies: [Tally; 2],
    local: Option<Mosquitto>,
    ferry: Option<FerryProcess>,
    ferry_config: Option<PathBuf>,
    url: Arc<RwLock<Option<String>>>,
    next_producer: u32,
    window: u16,
    _dir: tempfile::TempDir,
}

/// The local broker both the bridge and Ferry's MQTT ingest use: persistence
/// on with Mosquitto's default autosave (every 1800 s and at clean
/// shutdown), no queue limit (`max_queued_messages 0`, set by the harness),
/// and the same `max_inflight_messages` for both when one is asked for.
fn local_options(s: &Settings, mut extra: String) -> MosquittoOptions {
    if let Some(n) = s.local_inflight {
        let _ = writeln!(extra, "max_inflight_messages {n}");
    }
    MosquittoOptions {
        persistence: true,
        autosave: Autosave::MosquittoDefault,
        extra_config: extra,
        ..Default::default()
    }
}

impl Rig {
    async fn start(system: System, s: &Settings) -> anyhow::Result<Self> {
        let clouds = [
            Mosquitto::start(MosquittoOptions::default()).await?,
            Mosquitto::start(MosquittoOptions::default()).await?,
        ];
        let proxies = [FaultProxy::start(clouds[0].addr()).await?, FaultProxy::start(clouds[1].addr()).await?];
        let tallies = [Tally::start(&clouds[0].url()).await?, Tally::start(&clouds[1].url()).await?];
        let dir = tempfile::tempdir_in(std::env::current_dir()?)?;
        let mut rig = Rig {
            system,
            clouds,
            proxies,
            tallies,
            local: None,
            ferry: None,
            ferry_config: None,
            url: Arc::default(),
            next_producer: 0,
            window: s.window,
            _dir: dir,
        };
        match system {
            System::Bridge => {
                let mut bridge = String::new();
                for (name, proxy) in ["cloud-a", "cloud-b"].iter().zip(&rig.proxies) {
                    let _ = write!(
                        bridge,
                        "connection {name}\naddress {}\ntopic sensors/# out 1\ncleansession false\nbridge_protocol_version mqttv311\n",
                        proxy.addr()
                    );
                }
                rig.local = Some(Mosquitto::start(local_options(s, bridge)).await?);
            }
            System::FerryMqtt | System::FerryHttp | System::FerryHttpBatched => {
                let mut tail = String::new();
                if system == System::FerryMqtt {
                    let local = Mosquitto::start(local_options(s, String::new())).await?;
                    let _ = write!(tail, "[ingest.mqtt]\nurl = \"{}\"\ntopics = [\"sensors/#\"]\n\n", local.url());
                    rig.local = Some(local);
                }
                for (name, proxy) in ["cloud-a", "cloud-b"].iter().zip(&rig.proxies) {
                    let _ = write!(
                        tail,
                        "[[destination]]\nname = \"{name}\"\nurl = \"mqtt://{}\"\nprotocol = \"{}\"\n",
                        proxy.addr(),
                        s.protocol
                    );
                    if system == System::FerryHttpBatched {
                        // Room for every publish the broker's Receive Maximum allows to carry a batch.
                        tail.push_str("inflight = 2048\n");
                        tail.push_str("[destination.batch]\nmax_events = 64\nmax_bytes = \"32 KiB\"\n");
                    }
                    tail.push('\n');
                }
                rig.ferry_config = Some(write_config_with(rig._dir.path(), &s.store, &tail));
                rig.start_ferry().await?;
            }
        }
        rig.probe().await?;
        Ok(rig)
    }

    /// Sends unstamped probes through the system until one reached both
    /// clouds: then the bridge or the agent's ingest subscription is up, and
    /// no event of the run can be published before anyone listens.
    async fn probe(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let client = reqwest::Client::new();
        while !self.tallies.iter().all(|t| t.foreign() > 0) {
            anyhow::ensure!(
                Instant::now() < deadline,
                "{}: no probe reached both clouds within 60 s",
                self.system.name()
            );
            match (&self.local, &self.ferry) {
                (Some(local), _) => {
                    ferry_harness::mqtt::publish_v311(&local.url(), "sensors/probe", "probe", Duration::from_secs(5))
                        .await?
                }
                (None, Some(ferry)) => {
                    client
                        .post(format!("{}/v1/events", ferry.url()))
                        .body(r#"{"topic":"sensors/probe","data":"probe"}"#)
                        .send()
                        .await?
                        .error_for_status()?;
                }
                (None, None) => anyhow::bail!("nothing to probe"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }

    async fn start_ferry(&mut self) -> anyhow::Result<()> {
        let config = self.ferry_config.clone().expect("a ferry rig");
        // Another build of the agent can stand in, to compare two builds on the same rig.
        let bin = std::env::var_os("FERRY_COMPARE_AGENT").map_or_else(|| ferry_bin!().to_path_buf(), PathBuf::from);
        let ferry = tokio::task::spawn_blocking(move || FerryProcess::start(&bin, &config)).await??;
        *self.url.write().expect("url lock") = Some(ferry.url());
        self.ferry = Some(ferry);
        Ok(())
    }

    /// Fresh producers (new producer numbers) at `pace`, `limit` events each.
    fn producers(&mut self, pace: Pace, limit: Option<u64>) -> anyhow::Result<Producers> {
        let first = self.next_producer;
        self.next_producer += PRODUCERS;
        Ok(match (self.system, pace) {
            (System::FerryHttp | System::FerryHttpBatched, Pace::Max) => {
                let requests = usize::from(self.window.div_ceil(HTTP_BATCH));
                Producers::http(self.url.clone(), first, PRODUCERS, requests, u64::from(HTTP_BATCH), pace, limit)
            }
            (System::FerryHttp | System::FerryHttpBatched, Pace::Rate(_)) => {
                Producers::http(self.url.clone(), first, PRODUCERS, usize::from(self.window), 1, pace, limit)
            }
            _ => Producers::mqtt(
                &self.local.as_ref().expect("a local broker").url(),
                first,
                PRODUCERS,
                self.window,
                pace,
                limit,
            )?,
        })
    }

    /// The processes under test: (the agent or bridge, the local broker if separate).
    fn pids(&self) -> (Option<u32>, Option<u32>) {
        match self.system {
            System::Bridge => (self.local.as_ref().and_then(Mosquitto::pid), None),
            _ => (self.ferry.as_ref().map(FerryProcess::pid), self.local.as_ref().and_then(Mosquitto::pid)),
        }
    }

    fn cpu(&self) -> (f64, f64) {
        let (a, b) = self.pids();
        (cpu_secs(a), cpu_secs(b))
    }

    /// CPU seconds of everything else on the machine's cores for this row:
    /// the two clouds and this process (producers, subscribers, fault proxies).
    fn rest_cpu(&self) -> f64 {
        self.clouds.iter().map(|c| cpu_secs(c.pid())).sum::<f64>() + cpu_secs(Some(std::process::id()))
    }

    fn peak_rss_mib(&self) -> (f64, f64) {
        let (a, b) = self.pids();
        let rss = |p: Option<u32>| p.and_then(proc_stats).map_or(0.0, |s| s.peak_rss_kib as f64 / 1024.0);
        (rss(a), rss(b))
    }

    /// SIGKILLs the bridge's local broker or the Ferry agent, and starts it again.
    async fn crash_and_restart(&mut self) -> anyhow::Result<()> {
        match self.system {
            System::Bridge => self.local.as_mut().expect("local broker").restart().await,
            _ => {
                *self.url.write().expect("url lock") = None;
                if let Some(f) = self.ferry.take() {
                    tokio::task::spawn_blocking(move || f.kill()).await?;
                }
                self.start_ferry().await
            }
        }
    }

    async fn wait_both(&self, counts: &[(u32, u64)], timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.tallies.iter().all(|t| t.has_prefixes(counts)) {
            anyhow::ensure!(
                Instant::now() < deadline,
                "{}: not every event reached both clouds within {timeout:?} ({} and {} arrived)",
                self.system.name(),
                self.tallies[0].unique(),
                self.tallies[1].unique()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }
}

#[derive(Debug, Default)]
struct Row {
    throughput: f64,
    cpu_agent: f64,
    cpu_total: f64,
    cpu_rest: f64,
    p50_ms: f64,
    p99_ms: f64,
    drain_s: f64,
    reconnect_s: f64,
    backlog: u64,
    rss_agent: f64,
    rss_total: f64,
}

async fn measure(system: System, s: &Settings) -> anyhow::Result<Row> {
    let mut rig = Rig::start(system, s).await?;
    let mut row = Row::default();

    // Throughput: every producer sends its share as fast as its window allows.
    let per = s.events / u64::from(PRODUCERS);
    let cpu0 = rig.cpu();
    let rest0 = rig.rest_cpu();
    let start = Instant::now();
    let mut p = rig.producers(Pace::Max, Some(per))?;
    let counts: Vec<_> = (0..PRODUCERS).map(|i| (p.ledgers[i as usize].producer, per)).collect();
    rig.wait_both(&counts, Duration::from_secs(600)).await?;
    let elapsed = start.elapsed().as_secs_f64();
    let cpu1 = rig.cpu();
    let rest1 = rig.rest_cpu();
    p.join().await;
    drop(p);
    let events = (per * u64::from(PRODUCERS)) as f64;
    row.throughput = events / elapsed;
    row.cpu_agent = (cpu1.0 - cpu0.0) / events * 1e5;
    row.cpu_total = (cpu1.0 + cpu1.1 - cpu0.0 - cpu0.1) / events * 1e5;
    row.cpu_rest = (rest1 - rest0) / events * 1e5;
    println!("  {}: throughput {:.0} events/s ({} events in {elapsed:.1} s)", system.name(), row.throughput, events);

    // Latency at a fixed moderate rate.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let n = (s.rate * s.latency.as_secs_f64() / f64::from(PRODUCERS)) as u64;
    rig.tallies.iter().for_each(Tally::record_latency);
    let mut p = rig.producers(Pace::Rate(s.rate / f64::from(PRODUCERS)), Some(n))?;
    p.join().await;
    rig.wait_both(&p.sent(), Duration::from_secs(120)).await?;
    let mut lat: Vec<u64> = rig.tallies.iter().flat_map(Tally::take_latencies).collect();
    row.p50_ms = quantile(&mut lat, 0.5).unwrap_or(0) as f64 / 1000.0;
    row.p99_ms = quantile(&mut lat, 0.99).unwrap_or(0) as f64 / 1000.0;
    println!("  {}: latency p50 {:.2} ms, p99 {:.2} ms ({} samples)", system.name(), row.p50_ms, row.p99_ms, lat.len());
    drop(p);

    // Outage: cloud A cut off for the outage under the same rate, then restored.
    rig.proxies[0].handle().cut();
    let mut p = rig.producers(Pace::Rate(s.rate / f64::from(PRODUCERS)), None)?;
    tokio::time::sleep(s.outage).await;
    let backlog = p.sent();
    row.backlog = backlog.iter().map(|(_, c)| c).sum();
    let before = rig.tallies[0].unique();
    let restored = Instant::now();
    rig.proxies[0].handle().pass();
    let mut first_arrival = None;
    let deadline = restored + Duration::from_secs(600);
    while !rig.tallies[0].has_prefixes(&backlog) {
        anyhow::ensure!(Instant::now() < deadline, "{}: backlog not drained within 600 s", system.name());
        if first_arrival.is_none() && rig.tallies[0].unique() > before {
            first_arrival = Some(restored.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    row.drain_s = restored.elapsed().as_secs_f64();
    row.reconnect_s = first_arrival.unwrap_or(row.drain_s);
    p.stop();
    p.join().await;
    rig.wait_both(&p.sent(), Duration::from_secs(120)).await?;
    println!(
        "  {}: {} events queued in {:?} of outage; drained {:.1} s after the link came back (first event after {:.1} s)",
        system.name(),
        row.backlog,
        s.outage,
        row.drain_s,
        row.reconnect_s
    );
    (row.rss_agent, row.rss_total) = {
        let (a, b) = rig.peak_rss_mib();
        (a, a + b)
    };
    Ok(row)
}

#[derive(Debug, Default)]
struct CrashRow {
    acknowledged: u64,
    missing: [u64; 2],
    missing_both: u64,
    duplicates: [u64; 2],
}

/// Kills the bridge's local broker or Ferry `kills` times under load (the
/// producers at the fixed rate), every 1–3 s,
/// restarting it each time, then counts acknowledged events missing at the clouds.
async fn crash(system: System, s: &Settings) -> anyhow::Result<CrashRow> {
    let mut rig = Rig::start(system, s).await?;
    let mut p = rig.producers(Pace::Rate(s.rate / f64::from(PRODUCERS)), None)?;
    for _ in 0..s.kills {
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(1000..3000))).await;
        rig.crash_and_restart().await?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    p.stop();
    p.join().await;
    // Whatever the producers still wait for is not counted as accepted.
    p.wait_acked(Duration::from_secs(30)).await;
    let mut row = CrashRow { acknowledged: p.acked(), ..CrashRow::default() };
    for (i, t) in rig.tallies.iter().enumerate() {
        row.missing[i] = t.settle(&p.ledgers, Duration::from_secs(20), Duration::from_secs(300)).await;
        row.duplicates[i] = t.duplicates();
    }
    let (a, b) = (rig.tallies[0].missing_of(&p.ledgers), rig.tallies[1].missing_of(&p.ledgers));
    row.missing_both = a.iter().zip(&b).map(|(a, b)| a.iter().filter(|n| b.contains(n)).count() as u64).sum();
    for (l, m) in p.ledgers.iter().zip(&a) {
        if !m.is_empty() {
            let ranges = runs(m);
            println!(
                "    producer {}: {} acknowledged events missing at cloud A, in {} runs, first runs {:?}",
                l.producer,
                m.len(),
                ranges.len(),
                &ranges[..ranges.len().min(5)]
            );
        }
    }
    Ok(row)
}

/// Consecutive runs `(first, last)` of sorted numbers.
fn runs(ns: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &n in ns {
        match out.last_mut() {
            Some(r) if r.1 + 1 == n => r.1 = n,
            _ => out.push((n, n)),
        }
    }
    out
}

fn main() {
    let systems = std::env::var("FERRY_COMPARE_SYSTEMS")
        .unwrap_or_else(|_| "bridge,ferry-mqtt,ferry-http,ferry-http-batched".into());
    let s = Settings {
        events: env_num("FERRY_COMPARE_EVENTS", 100_000.0) as u64,
        rate: env_num("FERRY_COMPARE_RATE", 2000.0),
        latency: Duration::from_secs_f64(env_num("FERRY_COMPARE_LATENCY_SECS", 10.0)),
        outage: Duration::from_secs_f64(env_num("FERRY_COMPARE_OUTAGE_SECS", 60.0)),
        kills: env_num("FERRY_COMPARE_KILLS", 10.0) as usize,
        cuts: env_num("FERRY_COMPARE_CUTS", 40.0) as usize,
        window: env_num("FERRY_COMPARE_WINDOW", 32.0) as u16,
        local_inflight: std::env::var("FERRY_COMPARE_LOCAL_INFLIGHT")
            .ok()
            .map(|v| v.parse().unwrap_or_else(|_| panic!("FERRY_COMPARE_LOCAL_INFLIGHT={v:?} is not a number"))),
        protocol: match std::env::var("FERRY_COMPARE_PROTOCOL").as_deref() {
            Err(_) | Ok("v5") => "v5".into(),
            Ok("v311") => "v311".into(),
            Ok(other) => panic!("FERRY_COMPARE_PROTOCOL: unknown protocol {other:?} (v5, v311)"),
        },
        store: std::env::var("FERRY_COMPARE_STORE").unwrap_or_default(),
        systems: systems
            .split(',')
            .map(|n| match n.trim() {
                "bridge" => System::Bridge,
                "ferry-mqtt" => System::FerryMqtt,
                "ferry-http" => System::FerryHttp,
                "ferry-http-batched" => System::FerryHttpBatched,
                other => panic!(
                    "FERRY_COMPARE_SYSTEMS: unknown system {other:?} (bridge, ferry-mqtt, ferry-http, ferry-http-batched)"
                ),
            })
            .collect(),
    };
    println!("compare: {s:?}");
    now_us();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        // Ceiling: the producers straight into one cloud broker and out to its subscriber.
        let cloud = Mosquitto::start(MosquittoOptions::default()).await.unwrap();
        let tally = Tally::start(&cloud.url()).await.unwrap();
        let per = s.events / u64::from(PRODUCERS);
        let start = Instant::now();
        let p = Producers::mqtt(&cloud.url(), 0, PRODUCERS, s.window, Pace::Max, Some(per)).unwrap();
        let counts: Vec<_> = (0..PRODUCERS).map(|i| (i, per)).collect();
        while !tally.has_prefixes(&counts) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let ceiling = (per * u64::from(PRODUCERS)) as f64 / start.elapsed().as_secs_f64();
        drop((p, tally, cloud));
        println!("ceiling: the same producers publishing straight to one cloud broker: {ceiling:.0} events/s");

        let mut rows = Vec::new();
        for &system in &s.systems {
            rows.push((system, measure(system, &s).await.unwrap()));
        }
        let mut crashes = Vec::new();
        for &system in &s.systems {
            let row = crash(system, &s).await.unwrap();
            println!("  {}: crash row {row:?}", system.name());
            crashes.push((system, row));
        }
        let dir = tempfile::tempdir_in(std::env::current_dir().unwrap()).unwrap();
        let power = ferry_tests::powerloss::run(dir.path(), s.cuts, 16, Durability::Fsync, |i| {
            if i % 2 == 0 { PowerCut::LoseAllUnsynced } else { PowerCut::LoseRandomSectors { seed: i as u64 } }
        })
        .await
        .unwrap();

        let bridge = rows.iter().find(|(sys, _)| *sys == System::Bridge).map(|(_, r)| r.throughput);
        println!("\n| system | events/s to both clouds | × bridge | × ceiling | latency p50 / p99 (ms) | drain after {} s outage (s) | of which reconnecting (s) | peak RSS MiB (agent / with local broker) | CPU s per 100k events (agent / with local broker) | CPU s per 100k, rest of the rig |", s.outage.as_secs());
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for (system, r) in &rows {
            let vs = bridge.map_or("–".into(), |b| format!("{:.2}", r.throughput / b));
            println!(
                "| {} | {:.0} | {vs} | {:.2} | {:.2} / {:.2} | {:.1} ({} events) | {:.1} | {:.1} / {:.1} | {:.2} / {:.2} | {:.2} |",
                system.name(),
                r.throughput,
                r.throughput / ceiling,
                r.p50_ms,
                r.p99_ms,
                r.drain_s,
                r.backlog,
                r.reconnect_s,
                r.rss_agent,
                r.rss_total,
                r.cpu_agent,
                r.cpu_total,
                r.cpu_rest
            );
        }
        println!("\n| system, {} SIGKILLs under load | events acknowledged | acknowledged, never reached cloud A / B | reached neither | duplicates at A / B |", s.kills);
        println!("|---|---:|---:|---:|---:|");
        for (system, c) in &crashes {
            let victim = if *system == System::Bridge { "the local Mosquitto killed" } else { "Ferry killed" };
            println!(
                "| {} ({victim}) | {} | {} / {} | {} | {} / {} |",
                system.name(),
                c.acknowledged,
                c.missing[0],
                c.missing[1],
                c.missing_both,
                c.duplicates[0],
                c.duplicates[1]
            );
        }
        println!(
            "\npower loss (store level, {} cuts, 16 concurrent producers, alternately every unsynced write lost / random unsynced 512-byte sectors and length change lost): {} events acknowledged, {} lost; {} of {} dirty sectors reverted, {} length changes undone",
            power.cuts, power.acknowledged, power.lost, power.lost_sectors, power.dirty_sectors, power.length_reverts
        );
        let ferry_lost: u64 = crashes.iter().filter(|(sys, _)| *sys != System::Bridge).map(|(_, c)| c.missing[0] + c.missing[1]).sum();
        println!("ferry crash rows + power loss: {} accepted events lost (target 0)", ferry_lost + power.lost);
    });
}
