//! Ferry through each cloud's documented limits, single-event against
//! batched: the real agent forwards a backlog through the harness's cloud
//! emulator (`docs/cloud-profiles.md`) in front of a real Mosquitto broker.
//!
//! Per profile and mode, with the link cut, the bench posts a backlog of
//! 256-byte events (eight subjects, HTTP requests of 500), then restores
//! the link and waits for every event at the broker. Rows:
//! - drain time of the backlog, from the link's return to the last event;
//! - events/s while it flowed (first to last arrival), and the publishes/s
//!   and bytes/s the emulator forwarded, as a fraction of the binding cap:
//!   the emulator's own publish or byte rate limit, whichever is nearer;
//! - metered units per 1,000 events, as the emulator bills them;
//! - agent CPU seconds per 100k events (ingest and forwarding);
//! - publishes the emulator discarded, delayed or closed a connection over
//!   (the target is 0 in every row).
//!
//! Run: `cargo bench -p ferry-tests --bench clouds`. Environment:
//! `FERRY_CLOUDS_BACKLOG` (events, default 30000),
//! `FERRY_CLOUDS_PROFILES` (comma-separated subset of aws-iot-core,
//! azure-event-grid, azure-iot-hub, hivemq-cloud),
//! `FERRY_CLOUDS_MODES` (subset of single,batched).

use std::time::{Duration, Instant};

use ferry_harness::{CloudCounters, CloudEmulator, CloudProfile, FaultProxy, Mosquitto, MosquittoOptions, RateLimit};
use ferry_tests::workload::{Tally, now_us, payload, proc_stats};
use ferry_tests::{FerryProcess, ferry_bin, write_config_with};
use serde_json::{Value, json};

/// Events per HTTP request while the backlog is built.
const REQUEST: u64 = 500;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Single,
    Batched,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Single => "single",
            Mode::Batched => "batched",
        }
    }
}

/// A profile as the agent names it, the emulator's model of it, and how the
/// agent talks to it.
struct Cloud {
    profile: &'static str,
    emulator: fn() -> CloudProfile,
    protocol: &'static str,
    extra: &'static str,
}

const CLOUDS: [Cloud; 4] = [
    Cloud { profile: "aws-iot-core", emulator: CloudProfile::aws_iot_core, protocol: "v5", extra: "" },
    Cloud { profile: "azure-event-grid", emulator: CloudProfile::azure_event_grid, protocol: "v5", extra: "" },
    // The emulator, like a test broker, does not check the SAS token.
    Cloud {
        profile: "azure-iot-hub",
        emulator: CloudProfile::azure_iot_hub,
        protocol: "v311",
        extra: "username = \"hub.azure-devices.net/test-device/?api-version=2021-04-12\"\n\
                password = \"SharedAccessSignature sr=bench\"\n",
    },
    Cloud { profile: "hivemq-cloud", emulator: CloudProfile::hivemq_cloud, protocol: "v5", extra: "" },
];

#[derive(Debug)]
struct Row {
    profile: &'static str,
    mode: Mode,
    drain_s: f64,
    events_per_s: f64,
    /// Fraction of the binding cap, and which cap binds.
    cap_fraction: Option<(f64, &'static str)>,
    units_per_1000: Option<f64>,
    events_per_publish: f64,
    cpu_per_100k: f64,
    violations: u64,
}

/// Units per second a rate limit allows.
fn per_second(limit: &RateLimit) -> f64 {
    limit.limit as f64 / limit.per.as_secs_f64()
}

async fn measure(cloud: &Cloud, mode: Mode, backlog: u64) -> anyhow::Result<Row> {
    let broker = Mosquitto::start(MosquittoOptions::default()).await?;
    let profile = (cloud.emulator)();
    let emulator = CloudEmulator::start(broker.addr(), profile.clone()).await?;
    let proxy = FaultProxy::start(emulator.addr()).await?;
    let tally = Tally::start(&broker.url()).await?;
    proxy.handle().cut();

    let dir = tempfile::tempdir_in(std::env::current_dir()?)?;
    let batch = if mode == Mode::Single { "[destination.batch]\nmax_events = 1\n" } else { "" };
    let tail = format!(
        "[[destination]]\nname = \"cloud\"\nprofile = \"{}\"\nurl = \"mqtt://{}\"\nprotocol = \"{}\"\n\
         backoff_base = \"100ms\"\nbackoff_cap = \"500ms\"\n{}{batch}",
        cloud.profile,
        proxy.addr(),
        cloud.protocol,
        cloud.extra
    );
    let config = write_config_with(dir.path(), "min_free_disk = \"0 B\"", &tail);
    let agent = tokio::task::spawn_blocking(move || FerryProcess::start(ferry_bin!(), &config)).await??;
    let cpu = || proc_stats(agent.pid()).map_or(0.0, |s| s.cpu_secs);
    let cpu0 = cpu();

    let client = reqwest::Client::new();
    for first in (0..backlog).step_by(REQUEST as usize) {
        let body: Vec<Value> = (first..(first + REQUEST).min(backlog))
            .map(|n| json!({"topic": format!("sensors/s{}", n % 8), "data": serde_json::from_str::<Value>(&payload(0, n)).unwrap()}))
            .collect();
        client.post(format!("{}/v1/events", agent.url())).json(&body).send().await?.error_for_status()?;
    }
    let c0 = emulator.handle().counters();

    let restored = Instant::now();
    proxy.handle().restore();
    let mut first_arrival = None;
    let deadline = restored + Duration::from_secs(1800);
    while !tally.has_prefixes(&[(0, backlog)]) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} {}: {} of {backlog} events arrived in 30 min; emulator {:?}",
            cloud.profile,
            mode.name(),
            tally.unique(),
            emulator.handle().counters()
        );
        if first_arrival.is_none() && tally.unique() > 0 {
            first_arrival = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let drain_s = restored.elapsed().as_secs_f64();
    let cpu1 = cpu();
    let c1 = emulator.handle().counters();
    let last = tally.last_arrival().unwrap_or_else(Instant::now);
    let flowing = last.duration_since(first_arrival.unwrap_or(restored)).as_secs_f64().max(1e-3);

    let d = |f: fn(&CloudCounters) -> u64| (f(&c1) - f(&c0)) as f64;
    let publishes = d(|c| c.publishes_forwarded);
    let mut fractions = Vec::new();
    if let Some(r) = &profile.publish_rate {
        fractions.push((publishes / flowing / per_second(r), "publish rate"));
    }
    if let Some(r) = &profile.byte_rate {
        fractions.push((d(|c| c.bytes_forwarded) / flowing / per_second(r), "byte rate"));
    }
    let row = Row {
        profile: cloud.profile,
        mode,
        drain_s,
        events_per_s: backlog as f64 / flowing,
        cap_fraction: fractions.into_iter().max_by(|a, b| a.0.total_cmp(&b.0)),
        units_per_1000: matches!(profile.metering, ferry_harness::cloud::Metering::Chunks { .. })
            .then(|| d(|c| c.metered_units) * 1000.0 / backlog as f64),
        events_per_publish: backlog as f64 / publishes.max(1.0),
        cpu_per_100k: (cpu1 - cpu0) / backlog as f64 * 1e5,
        violations: c1.violations(),
    };
    for v in emulator.handle().violations().iter().take(5) {
        println!("    violation: {v}");
    }
    let (status, _) = tokio::task::spawn_blocking(move || agent.terminate()).await?;
    anyhow::ensure!(status.success(), "the agent exited with {status}");
    Ok(row)
}

fn main() {
    let backlog: u64 = std::env::var("FERRY_CLOUDS_BACKLOG")
        .map_or(30_000, |v| v.parse().unwrap_or_else(|_| panic!("FERRY_CLOUDS_BACKLOG={v:?} is not a number")));
    let profiles = std::env::var("FERRY_CLOUDS_PROFILES").ok();
    let clouds: Vec<&Cloud> = match &profiles {
        None => CLOUDS.iter().collect(),
        Some(list) => list
            .split(',')
            .map(|n| {
                CLOUDS.iter().find(|c| c.profile == n.trim()).unwrap_or_else(|| {
                    panic!("FERRY_CLOUDS_PROFILES: unknown profile {n:?} (aws-iot-core, azure-event-grid, azure-iot-hub, hivemq-cloud)")
                })
            })
            .collect(),
    };
    let modes: Vec<Mode> = std::env::var("FERRY_CLOUDS_MODES")
        .unwrap_or_else(|_| "single,batched".into())
        .split(',')
        .map(|m| match m.trim() {
            "single" => Mode::Single,
            "batched" => Mode::Batched,
            other => panic!("FERRY_CLOUDS_MODES: unknown mode {other:?} (single, batched)"),
        })
        .collect();
    println!("clouds: a {backlog}-event backlog of 256-byte events per profile and mode");
    now_us();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let rows: Vec<Row> = rt.block_on(async {
        let mut rows = Vec::new();
        for cloud in &clouds {
            for &mode in &modes {
                let row = measure(cloud, mode, backlog).await.unwrap();
                println!("  {row:?}");
                rows.push(row);
            }
        }
        rows
    });
    println!(
        "\n| profile | mode | drain of {backlog} events (s) | events/s | × binding cap | events per publish | metered units per 1,000 events | agent CPU s per 100k events | publishes discarded, delayed or refused |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {:.1} | {:.0} | {} | {:.1} | {} | {:.2} | {} |",
            r.profile,
            r.mode.name(),
            r.drain_s,
            r.events_per_s,
            r.cap_fraction.map_or("no rate cap".into(), |(f, which)| format!("{f:.2} ({which})")),
            r.events_per_publish,
            r.units_per_1000.map_or("per publish".into(), |u| format!("{u:.0}")),
            r.cpu_per_100k,
            r.violations
        );
    }
}
