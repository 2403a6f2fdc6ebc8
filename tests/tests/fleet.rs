//! Fleet plugin updates end to end over a real Mosquitto: the fleet CLI
//! signs and pushes a bundle that the agent downloads, verifies, checks,
//! shadows and activates; every bad bundle is refused with a reported reason
//! while the running version keeps running; a version that fails on
//! probation is rolled back; a download interrupted by SIGKILL resumes from
//! disk after the restart.
//!
//! The device's plugin slot `f` starts on the threshold filter (drops events
//! whose `temp` is below 20); the update is the hostile test filter, which
//! keeps every event and tags it with extension `cfgecho`, so which version
//! handled an event shows on the wire. Needs `scripts/build-plugins.sh`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ed25519_dalek::{SigningKey, VerifyingKey};
use ferry::config::plugin::World;
use ferry::fleet::bundle::{self, Chunk, Manifest};
use ferry::fleet::report::{Report, State};
use ferry::fleet::topics;
use ferry::signing;
use ferry_harness::{Collector, FaultProxy, Mosquitto, MosquittoOptions, Protocol};
use ferry_tests::{FerryProcess, built_plugin, ferry_bin, write_config_with};
use serde_json::json;

const ROOT: &str = "ferry/fleet";
const DEVICE: &str = "test-device";

fn key(n: u8) -> SigningKey {
    SigningKey::from_bytes(&[n; 32])
}

/// A device config: one destination on `broker`, the threshold filter as
/// plugin `f`, and `[fleet]` trusting `trusted` plus `fleet_extra`.
fn config(dir: &Path, broker: &str, trusted: &VerifyingKey, fleet_extra: &str) -> PathBuf {
    config_with(dir, &[("cloud", broker)], trusted, fleet_extra)
}

/// Like [`config`], with one destination per (name, broker URL).
fn config_with(dir: &Path, brokers: &[(&str, &str)], trusted: &VerifyingKey, fleet_extra: &str) -> PathBuf {
    let destinations: String = brokers
        .iter()
        .map(|(name, url)| {
            format!(
                "[[destination]]\nname = \"{name}\"\nurl = \"{url}\"\nkeep_alive = \"5s\"\n\
                 backoff_base = \"100ms\"\nbackoff_cap = \"500ms\"\n\n"
            )
        })
        .collect();
    let tail = format!(
        "{destinations}[[plugin]]\nname = \"f\"\npath = {:?}\nworld = \"filter\"\nstage = \"ingest\"\n\
         config = {{ field = \"temp\", min = \"20\" }}\n\n\
         [fleet]\ntrusted_keys = [\"{}\"]\n{fleet_extra}\n",
        built_plugin("threshold-filter").display().to_string(),
        signing::encode_public(trusted),
    );
    write_config_with(dir, "", &tail)
}

async fn broker() -> Mosquitto {
    Mosquitto::start(MosquittoOptions::default()).await.expect("starting mosquitto")
}

/// Publishes (topic, payload, retain) messages with QoS 1 and waits for every PUBACK.
async fn publish(url: &str, messages: Vec<(String, Vec<u8>, bool)>) {
    use ferry_harness::rumqttc::{AsyncClient, Event, Packet, QoS};
    let mut opts = ferry_harness::mqtt::options_v311(url, &ferry_harness::mqtt::unique_client_id("fleet-test"), None)
        .expect("broker options");
    opts.set_max_packet_size(256 * 1024, 256 * 1024);
    let (client, mut eventloop) = AsyncClient::new(opts, messages.len() + 8);
    let total = messages.len();
    for (topic, payload, retain) in messages {
        client.publish(topic, QoS::AtLeastOnce, retain, payload).await.expect("queueing a publish");
    }
    let mut acked = 0;
    tokio::time::timeout(Duration::from_secs(20), async {
        while acked < total {
            if let Event::Incoming(Packet::PubAck(_)) = eventloop.poll().await.expect("publishing") {
                acked += 1;
            }
        }
    })
    .await
    .expect("every PUBACK within 20s");
}

/// The manifest message of `m` for every device.
fn manifest_message(m: &Manifest) -> (String, Vec<u8>, bool) {
    (topics::manifest(ROOT, &m.name, "*"), serde_json::to_vec(m).unwrap(), true)
}

fn chunk_messages(m: &Manifest, chunks: &[Chunk], retain: bool) -> Vec<(String, Vec<u8>, bool)> {
    chunks.iter().map(|c| (topics::chunk(ROOT, &m.name, m.version, c.header.index), c.encode(), retain)).collect()
}

/// Every report of plugin `f` the collector has seen.
fn reports(status: &Collector) -> Vec<Report> {
    status
        .messages()
        .iter()
        .filter(|m| !m.payload.is_empty())
        .filter_map(|m| serde_json::from_slice(&m.payload).ok())
        .collect()
}

/// Waits for a report matching `pred`, failing with every report seen.
async fn wait_report(status: &Collector, what: &str, pred: impl Fn(&Report) -> bool) -> Report {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(r) = reports(status).into_iter().find(|r| pred(r)) {
            return r;
        }
        if Instant::now() > deadline {
            let seen: Vec<String> = reports(status).iter().map(|r| serde_json::to_string(r).unwrap()).collect();
            panic!("no report {what} within 60s; seen:\n{}", seen.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn status_collector(url: &str) -> Collector {
    Collector::start(url, &topics::status(ROOT, DEVICE, "f"), Protocol::V5).await.expect("status collector")
}

async fn post(agent: &FerryProcess, topic: &str, data: serde_json::Value) {
    let r = reqwest::Client::new()
        .post(format!("{}/v1/events", agent.url()))
        .json(&json!({ "topic": topic, "data": data }))
        .send()
        .await
        .expect("posting an event");
    assert!(r.status().is_success() || r.status().is_server_error(), "{}", r.status());
}

/// Whether the events reaching `events` were handled by the update: a cold
/// reading gets through only with the hostile filter, tagged `cfgecho`.
async fn cold_reading_passes(agent: &FerryProcess, events: &Collector, n: usize) -> bool {
    let (cold, warm) = (format!("telemetry/cold{n}"), format!("telemetry/warm{n}"));
    post(agent, &cold, json!({ "temp": 5 })).await;
    post(agent, &warm, json!({ "temp": 25 })).await;
    // The warm reading always passes, and after the cold one (one
    // destination keeps sequence order): once it is here, the cold one's fate is known.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !events.messages().iter().any(|m| m.topic.ends_with(&warm)) {
        assert!(Instant::now() < deadline, "{warm} was not forwarded within 20s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = events.messages();
    let cold = got.iter().find(|m| m.topic.ends_with(&cold));
    if let Some(c) = cold {
        assert_eq!(c.user_property("cfgecho"), Some("field=temp;min=20"), "the update sees the slot's config");
    }
    cold.is_some()
}

fn ferry(args: &[&str], dir: &Path) -> String {
    let out = Command::new(ferry_bin!()).args(args).current_dir(dir).env("RUST_LOG", "warn").output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "ferry {args:?} failed:\n{text}");
    text
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pushed_plugin_is_downloaded_verified_shadowed_and_activated() {
    let mosquitto = broker().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // The fleet manager's side, from the CLI as docs/fleet.md shows it.
    ferry(&["fleet", "keygen", "--out", "ops"], dir);
    let public = std::fs::read_to_string(dir.join("ops.pub")).unwrap();
    let trusted = signing::decode_public(&public).unwrap();
    let hostile = built_plugin("testdata/hostile-filter");
    ferry(
        &[
            "fleet",
            "sign",
            hostile.to_str().unwrap(),
            "--name",
            "f",
            "--version",
            "1",
            "--key",
            "ops.key",
            "--chunk-size",
            "16 KiB",
        ],
        dir,
    );

    let device = dir.join("device");
    std::fs::create_dir_all(&device).unwrap();
    let tail = config(&device, &mosquitto.url(), &trusted, "probation = \"2s\"\n");
    let agent = FerryProcess::start(ferry_bin!(), &tail).unwrap();
    let status = status_collector(&mosquitto.url()).await;
    let events = Collector::start(&mosquitto.url(), &format!("ferry/{DEVICE}/#"), Protocol::V5).await.unwrap();
    wait_report(&status, "running v0", |r| r.state == State::Running && r.version == 0).await;
    // Traffic before the push: the shadow run replays it.
    assert!(!cold_reading_passes(&agent, &events, 0).await, "the configured threshold filter drops cold readings");

    let out = ferry(&["fleet", "push", "f-v1.bundle", "--broker", &mosquitto.url(), "--devices", "test-*"], dir);
    assert!(out.contains("pushed f v1"), "{out}");
    let activated = wait_report(&status, "on probation at v1", |r| r.state == State::Probation && r.version == 1).await;
    let shadow = activated.shadow.expect("a shadow run is reported");
    assert!(shadow.events >= 1, "the shadow run replayed recent events: {shadow:?}");
    assert!(shadow.differences >= 1, "the new version answers differently: {shadow:?}");
    for step in [State::Downloading, State::Verifying, State::Checking, State::Shadow] {
        assert!(reports(&status).iter().any(|r| r.state == step && r.candidate == Some(1)), "{step:?} was reported");
    }
    assert!(cold_reading_passes(&agent, &events, 1).await, "the update handles events once active");
    let done =
        wait_report(&status, "running v1 after probation", |r| r.state == State::Running && r.version == 1).await;
    assert_eq!(done.previous, Some(0), "the configured version is kept for rollback");

    // One connection per cloud: the fleet traffic rode the forwarder's (a
    // second client id is a second device identity to Azure IoT Hub).
    let broker_log = mosquitto.log();
    assert!(broker_log.contains(" as "), "mosquitto logs its connections:\n{broker_log}");
    assert!(!broker_log.contains("-fleet (p"), "a fleet-only connection was made:\n{broker_log}");

    let table = ferry(&["fleet", "status", "--broker", &mosquitto.url(), "--wait", "1s"], dir);
    let row = table.lines().find(|l| l.starts_with(DEVICE)).unwrap_or_else(|| panic!("no row:\n{table}"));
    assert!(row.contains(" f ") && row.contains("running"), "{table}");

    // The same version again (another cloud, a retained replay) installs once;
    // a restart comes back on the installed version.
    let (_, log) = agent.terminate();
    assert!(log.iter().filter(|l| l.contains("fleet update activated")).count() == 1, "{}", log.join("\n"));
    let agent = FerryProcess::start(ferry_bin!(), &tail).unwrap();
    assert!(cold_reading_passes(&agent, &events, 2).await, "the installed version survives a restart");
    let (_, log) = agent.terminate();
    assert!(!log.iter().any(|l| l.contains("fleet update activated")), "installed once:\n{}", log.join("\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_bundles_are_refused_with_a_reason_and_the_running_version_keeps_running() {
    let mosquitto = broker().await;
    let url = mosquitto.url();
    let tmp = tempfile::tempdir().unwrap();
    let agent =
        FerryProcess::start(ferry_bin!(), &config(tmp.path(), &url, &key(1).verifying_key(), "probation = \"1s\"\n"))
            .unwrap();
    let status = status_collector(&url).await;
    let events = Collector::start(&url, &format!("ferry/{DEVICE}/#"), Protocol::V5).await.unwrap();
    wait_report(&status, "running v0", |r| r.state == State::Running).await;
    let hostile = std::fs::read(built_plugin("testdata/hostile-filter")).unwrap();
    let sign = |version: u64, world: World, component: &[u8], with: &SigningKey| {
        Manifest::sign("f", version, world, component, 16 * 1024, with).unwrap()
    };
    let refused = |version: u64, needle: &'static str| {
        let status = &status;
        async move {
            let r = wait_report(status, &format!("refusing v{version} with `{needle}`"), |r| {
                r.state == State::Rejected
                    && r.candidate == Some(version)
                    && r.reason.as_deref().unwrap_or("").contains(needle)
            })
            .await;
            r.version
        }
    };

    // Bad signature: a field changed after signing.
    let mut m = sign(2, World::Filter, &hostile, &key(1));
    m.version = 3;
    publish(&url, vec![manifest_message(&m)]).await;
    assert_eq!(refused(3, "signature does not verify").await, 0);

    // Signed by a key the device does not trust.
    let m = sign(4, World::Filter, &hostile, &key(2));
    publish(&url, vec![manifest_message(&m)]).await;
    assert_eq!(refused(4, "not in [fleet] trusted_keys").await, 0);

    // A corrupted chunk and a truncated one: each named, the rest kept.
    let m = sign(5, World::Filter, &hostile, &key(1));
    let mut chunks = Chunk::split(&m, &hostile);
    chunks[1].data[100] ^= 0xff;
    chunks[2].data.truncate(1000);
    let mut messages = chunk_messages(&m, &chunks, true);
    messages.push(manifest_message(&m));
    publish(&url, messages).await;
    assert_eq!(refused(5, "chunk 1 of f v5 is corrupt").await, 0);
    assert_eq!(refused(5, "chunk 2 of f v5 is truncated").await, 0);

    // Every chunk as signed, but the manifest's whole-component hash is wrong.
    let mut m = sign(6, World::Filter, &hostile, &key(1));
    m.sha256 = bundle::sha256_hex(b"something else");
    m.resign(&key(1));
    let mut messages = chunk_messages(&m, &Chunk::split(&m, &hostile), true);
    messages.push(manifest_message(&m));
    publish(&url, messages).await;
    assert_eq!(refused(6, "does not match the manifest").await, 0);

    // A merge component signed as a filter: it does not link against the world.
    let merge = std::fs::read(built_plugin("lww-merge")).unwrap();
    let m = sign(7, World::Filter, &merge, &key(1));
    let mut messages = chunk_messages(&m, &Chunk::split(&m, &merge), true);
    messages.push(manifest_message(&m));
    publish(&url, messages).await;
    assert_eq!(refused(7, "world").await, 0);
    // And a bundle for the merge world sent to this filter slot.
    let m = sign(8, World::Merge, &merge, &key(1));
    publish(&url, vec![manifest_message(&m)]).await;
    assert_eq!(refused(8, "targets the `merge` world").await, 0);
    assert!(!cold_reading_passes(&agent, &events, 0).await, "the configured version still runs");

    // Install v10, then replay the older v9: refused, v10 keeps running.
    let good = sign(10, World::Filter, &hostile, &key(1));
    let mut messages = chunk_messages(&good, &Chunk::split(&good, &hostile), true);
    messages.push(manifest_message(&good));
    publish(&url, messages).await;
    wait_report(&status, "running v10", |r| r.state == State::Running && r.version == 10).await;
    let old = sign(9, World::Filter, &hostile, &key(1));
    let mut messages = chunk_messages(&old, &Chunk::split(&old, &hostile), true);
    messages.push((topics::manifest(ROOT, "f", "test-*"), serde_json::to_vec(&old).unwrap(), true));
    publish(&url, messages).await;
    assert_eq!(refused(9, "older than the running version 10").await, 10);
    assert!(cold_reading_passes(&agent, &events, 1).await, "v10 still runs");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_version_that_fails_on_probation_is_rolled_back() {
    let mosquitto = broker().await;
    let url = mosquitto.url();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(
        tmp.path(),
        &url,
        &key(1).verifying_key(),
        "probation = \"10m\"\nrollback_min_failures = 3\nrollback_failure_rate = 0.2\n",
    );
    let agent = FerryProcess::start(ferry_bin!(), &cfg).unwrap();
    let status = status_collector(&url).await;
    let events = Collector::start(&url, &format!("ferry/{DEVICE}/#"), Protocol::V5).await.unwrap();
    let hostile = std::fs::read(built_plugin("testdata/hostile-filter")).unwrap();
    let m = Manifest::sign("f", 1, World::Filter, &hostile, 64 * 1024, &key(1)).unwrap();
    let mut messages = chunk_messages(&m, &Chunk::split(&m, &hostile), true);
    messages.push(manifest_message(&m));
    publish(&url, messages).await;
    wait_report(&status, "on probation at v1", |r| r.state == State::Probation && r.version == 1).await;
    assert!(cold_reading_passes(&agent, &events, 0).await);

    // In production the new version meets input the checks never tried.
    for _ in 0..4 {
        post(&agent, "hostile/trap", json!({})).await;
    }
    let r = wait_report(&status, "rolled back", |r| r.state == State::RolledBack).await;
    assert_eq!((r.version, r.candidate), (0, Some(1)), "{r:?}");
    assert!(r.reason.as_deref().unwrap_or("").contains("trap"), "{r:?}");
    assert!(!cold_reading_passes(&agent, &events, 1).await, "the previous version runs again");

    // The failed version is not installed again, even after a restart that
    // sees its retained manifest once more.
    agent.kill();
    let agent = FerryProcess::start(ferry_bin!(), &cfg).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!cold_reading_passes(&agent, &events, 2).await, "still the previous version after a restart");
    let (_, log) = agent.terminate();
    assert!(!log.iter().any(|l| l.contains("fleet update activated")), "{}", log.join("\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_download_cut_by_sigkill_resumes_from_disk_and_completes() {
    let mosquitto = broker().await;
    let url = mosquitto.url();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), &url, &key(1).verifying_key(), "probation = \"1s\"\n");
    let agent = FerryProcess::start(ferry_bin!(), &cfg).unwrap();
    let status = status_collector(&url).await;
    let events = Collector::start(&url, &format!("ferry/{DEVICE}/#"), Protocol::V5).await.unwrap();
    wait_report(&status, "running v0", |r| r.state == State::Running).await;

    let hostile = std::fs::read(built_plugin("testdata/hostile-filter")).unwrap();
    let m = Manifest::sign("f", 1, World::Filter, &hostile, 4 * 1024, &key(1)).unwrap();
    let chunks = Chunk::split(&m, &hostile);
    let half = chunks.len() / 2;
    publish(&url, vec![manifest_message(&m)]).await;
    wait_report(&status, "downloading", |r| r.state == State::Downloading && r.received == Some(0)).await;
    // The first half is sent once, not retained: after the kill, only the
    // agent's disk still has it.
    publish(&url, chunk_messages(&m, &chunks[..half], false)).await;
    wait_report(&status, "half downloaded", |r| r.received == Some(half as u32)).await;
    agent.kill();

    // Forget the reports from before the kill, then restart.
    publish(&url, vec![(topics::status(ROOT, DEVICE, "f"), Vec::new(), true)]).await;
    let status = status_collector(&url).await;
    let agent = FerryProcess::start(ferry_bin!(), &cfg).unwrap();
    let resumed = wait_report(&status, "resumed", |r| r.state == State::Downloading).await;
    assert_eq!(resumed.received, Some(half as u32), "the chunks on disk count after the restart: {resumed:?}");
    publish(&url, chunk_messages(&m, &chunks[half..], false)).await;
    wait_report(&status, "on probation at v1", |r| r.state == State::Probation && r.version == 1).await;
    assert!(cold_reading_passes(&agent, &events, 0).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_download_survives_a_cut_link_and_takes_chunks_from_either_cloud() {
    let (a, b) = (broker().await, broker().await);
    let proxy = FaultProxy::start(a.addr()).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config_with(
        tmp.path(),
        &[("cloud-a", &proxy.url()), ("cloud-b", &b.url())],
        &key(1).verifying_key(),
        "probation = \"1s\"\n",
    );
    let agent = FerryProcess::start(ferry_bin!(), &cfg).unwrap();
    // Reports reach every fleet destination; cloud B's stay visible while A is cut.
    let status = status_collector(&b.url()).await;
    let events = Collector::start(&b.url(), &format!("ferry/{DEVICE}/#"), Protocol::V5).await.unwrap();
    wait_report(&status, "running v0", |r| r.state == State::Running).await;

    let hostile = std::fs::read(built_plugin("testdata/hostile-filter")).unwrap();
    let m = Manifest::sign("f", 1, World::Filter, &hostile, 4 * 1024, &key(1)).unwrap();
    let chunks = Chunk::split(&m, &hostile);
    let (first, second) = (chunks.len() / 3, 2 * chunks.len() / 3);
    // The same push on both clouds.
    publish(&a.url(), vec![manifest_message(&m)]).await;
    publish(&b.url(), vec![manifest_message(&m)]).await;
    // A link subscribes before it publishes a report, so once each broker
    // has the report, each link takes the chunks.
    let status_a = status_collector(&a.url()).await;
    for s in [&status, &status_a] {
        wait_report(s, "downloading", |r| r.state == State::Downloading && r.received == Some(0)).await;
    }
    publish(&a.url(), chunk_messages(&m, &chunks[..first], false)).await;
    wait_report(&status, "a third from A", |r| r.received == Some(first as u32)).await;

    // A's link is cut; what A publishes meanwhile waits there, retained.
    proxy.handle().cut();
    publish(&a.url(), chunk_messages(&m, &chunks[first..second], true)).await;
    publish(&b.url(), chunk_messages(&m, &chunks[second..], false)).await;
    let from_b = (chunks.len() - second + first) as u32;
    wait_report(&status, "the last third from B", |r| r.received == Some(from_b)).await;
    proxy.handle().restore();
    wait_report(&status, "on probation at v1", |r| r.state == State::Probation && r.version == 1).await;
    assert!(cold_reading_passes(&agent, &events, 0).await);
    let (_, log) = agent.terminate();
    let activations = log.iter().filter(|l| l.contains("fleet update activated")).count();
    assert_eq!(activations, 1, "the same version from two clouds installs once:\n{}", log.join("\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_offline_during_two_pushes_installs_the_latest_when_it_returns() {
    let mosquitto = broker().await;
    let url = mosquitto.url();
    let hostile = std::fs::read(built_plugin("testdata/hostile-filter")).unwrap();
    // Two pushes while the device is away: v2 replaces v1's retained manifest.
    for version in [1, 2] {
        let m = Manifest::sign("f", version, World::Filter, &hostile, 32 * 1024, &key(1)).unwrap();
        let mut messages = chunk_messages(&m, &Chunk::split(&m, &hostile), true);
        messages.push(manifest_message(&m));
        publish(&url, messages).await;
    }
    let status = status_collector(&url).await;
    let tmp = tempfile::tempdir().unwrap();
    let agent =
        FerryProcess::start(ferry_bin!(), &config(tmp.path(), &url, &key(1).verifying_key(), "probation = \"1s\"\n"))
            .unwrap();
    wait_report(&status, "running v2", |r| r.state == State::Running && r.version == 2).await;
    assert!(reports(&status).iter().all(|r| r.candidate != Some(1)), "v1 was never fetched");
    let (_, log) = agent.terminate();
    assert_eq!(log.iter().filter(|l| l.contains("fleet update activated")).count(), 1, "{}", log.join("\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_merge_plugin_that_breaks_the_convergence_laws_is_refused() {
    let mosquitto = broker().await;
    let url = mosquitto.url();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), &url, &key(1).verifying_key(), "probation = \"1s\"\n");
    let merge_slot = format!(
        "\n[[plugin]]\nname = \"m\"\npath = {:?}\nworld = \"merge\"\n",
        built_plugin("lww-merge").display().to_string()
    );
    std::fs::write(&cfg, std::fs::read_to_string(&cfg).unwrap() + &merge_slot).unwrap();
    let _agent = FerryProcess::start(ferry_bin!(), &cfg).unwrap();
    let status = Collector::start(&url, &topics::status(ROOT, DEVICE, "m"), Protocol::V5).await.unwrap();
    wait_report(&status, "running v0", |r| r.state == State::Running).await;

    // "Incoming wins" is not commutative: replicas would diverge.
    let diverge = std::fs::read(built_plugin("testdata/diverge-merge")).unwrap();
    let m = Manifest::sign("m", 1, World::Merge, &diverge, 64 * 1024, &key(1)).unwrap();
    let mut messages = chunk_messages(&m, &Chunk::split(&m, &diverge), true);
    messages.push(manifest_message(&m));
    publish(&url, messages).await;
    let r = wait_report(&status, "refusing the divergent merge", |r| r.state == State::Rejected).await;
    assert_eq!((r.version, r.candidate), (0, Some(1)));
    assert!(r.reason.as_deref().unwrap_or("").contains("commutative"), "{r:?}");

    // A lawful merge plugin for the same slot installs.
    let crdt = std::fs::read(built_plugin("crdt-merge")).unwrap();
    let m = Manifest::sign("m", 2, World::Merge, &crdt, 64 * 1024, &key(1)).unwrap();
    let mut messages = chunk_messages(&m, &Chunk::split(&m, &crdt), true);
    messages.push(manifest_message(&m));
    publish(&url, messages).await;
    wait_report(&status, "running v2", |r| r.state == State::Running && r.version == 2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_damaged_installed_version_is_not_run_and_is_fetched_again() {
    let mosquitto = broker().await;
    let url = mosquitto.url();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), &url, &key(1).verifying_key(), "probation = \"1s\"\n");
    let agent = FerryProcess::start(ferry_bin!(), &cfg).unwrap();
    let status = status_collector(&url).await;
    let events = Collector::start(&url, &format!("ferry/{DEVICE}/#"), Protocol::V5).await.unwrap();
    let hostile = std::fs::read(built_plugin("testdata/hostile-filter")).unwrap();
    let m = Manifest::sign("f", 1, World::Filter, &hostile, 64 * 1024, &key(1)).unwrap();
    let mut messages = chunk_messages(&m, &Chunk::split(&m, &hostile), true);
    messages.push(manifest_message(&m));
    publish(&url, messages).await;
    wait_report(&status, "running v1", |r| r.state == State::Running && r.version == 1).await;
    agent.terminate();

    // The disk flips a byte in the installed component while the agent is down.
    let installed = tmp.path().join("data/fleet/f/v1.wasm");
    let mut bytes = std::fs::read(&installed).unwrap();
    bytes[1000] ^= 0xff;
    std::fs::write(&installed, bytes).unwrap();
    publish(&url, vec![(topics::status(ROOT, DEVICE, "f"), Vec::new(), true)]).await;
    let status = status_collector(&url).await;
    let agent = FerryProcess::start(ferry_bin!(), &cfg).unwrap();
    let r = wait_report(&status, "a report after the restart", |_| true).await;
    assert_eq!(r.version, 0, "the configured version runs and is reported: {r:?}");
    // The bundle is still retained: the device heals itself from it.
    wait_report(&status, "running v1 again", |r| r.state == State::Running && r.version == 1).await;
    assert!(cold_reading_passes(&agent, &events, 0).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_push_clears_the_chunks_of_versions_no_manifest_names_any_more() {
    let mosquitto = broker().await;
    let url = mosquitto.url();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    ferry(&["fleet", "keygen", "--out", "ops"], dir);
    let hostile = built_plugin("testdata/hostile-filter");
    for v in ["1", "2", "3"] {
        // Small chunks: the collector's client takes packets up to 10 KiB.
        let args = ["fleet", "sign", hostile.to_str().unwrap(), "--name", "f", "--version", v, "--key", "ops.key"];
        ferry(&[&args[..], &["--chunk-size", "4 KiB"]].concat(), dir);
    }
    let versions_retained = || async {
        let c = Collector::start(&url, &format!("{ROOT}/plugin/f/+/+"), Protocol::V5).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut v: Vec<String> = c
            .messages()
            .iter()
            .filter_map(|m| m.topic.split('/').nth(4).map(str::to_owned))
            .filter(|level| level != "manifest")
            .collect();
        v.sort();
        v.dedup();
        v
    };
    ferry(&["fleet", "push", "f-v1.bundle", "--broker", &url, "--devices", "gw-*"], dir);
    // v2 for one device: the `gw-*` manifest still names v1, so v1 stays.
    ferry(&["fleet", "push", "f-v2.bundle", "--broker", &url, "--devices", "gw-1"], dir);
    assert_eq!(versions_retained().await, ["v1", "v2"]);
    // v3 for everyone replaces the `gw-*` manifest: v1 is named by no manifest any more.
    let out = ferry(&["fleet", "push", "f-v3.bundle", "--broker", &url, "--devices", "gw-*"], dir);
    // 4 KiB chunks of the component (the hostile test plugin grows with its kinds).
    let chunks = std::fs::metadata(&hostile).unwrap().len().div_ceil(4096);
    assert!(out.contains(&format!("cleared the {chunks} retained chunks of v1")), "{out}");
    assert_eq!(versions_retained().await, ["v2", "v3"]);
}
