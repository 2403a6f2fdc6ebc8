//! Forwarding to real brokers: several at once, both MQTT versions, two
//! broker implementations, and faults (dead, killed and black-holed brokers).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry::clock::{Clock, SystemClock};
use ferry::config::Config;
use ferry::forward::DestinationStatus;
use ferry::runtime::Agent;
use ferry_harness::{Collector, FaultProxy, InProcessBroker, Mosquitto, MosquittoOptions, Protocol};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

/// A `[[destination]]` table.
fn destination(name: &str, url: &str, protocol: &str, extra: &str) -> String {
    format!(
        "[[destination]]\nname = \"{name}\"\nurl = \"{url}\"\nprotocol = \"{protocol}\"\nkeep_alive = \"5s\"\nbackoff_base = \"100ms\"\nbackoff_cap = \"1s\"\n{extra}\n"
    )
}

struct TestAgent {
    _dir: tempfile::TempDir,
    agent: Agent,
    client: reqwest::Client,
}

impl TestAgent {
    async fn start(destinations: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let toml = format!(
            "[agent]\ndevice_id = \"gw-1\"\ndata_dir = {:?}\n[ingest.http]\nlisten = \"127.0.0.1:0\"\n{destinations}",
            dir.path().display().to_string()
        );
        let config = Config::parse(&toml, "test.toml").unwrap();
        let agent = Agent::start(config, Arc::new(SystemClock)).await.unwrap();
        Self { _dir: dir, agent, client: reqwest::Client::new() }
    }

    /// Ingests `n` events on `topic` with ids `{prefix}-{i}`, in batches.
    async fn ingest(&self, topic: &str, prefix: &str, n: usize) -> Vec<String> {
        let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
        for chunk in ids.chunks(500) {
            let body: Vec<Value> =
                chunk.iter().map(|id| json!({"topic": topic, "id": id, "data": {"id": id}})).collect();
            let r = self
                .client
                .post(format!("http://{}/v1/events", self.agent.http_addr()))
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
        ids
    }

    fn destination(&self, name: &str) -> DestinationStatus {
        self.agent.destinations().into_iter().find(|d| d.name == name).unwrap()
    }

    async fn wait_until(&self, what: &str, mut done: impl FnMut(&Self) -> bool) {
        let start = Instant::now();
        while !done(self) {
            assert!(
                start.elapsed() < WAIT,
                "timed out waiting for {what}; destinations: {:#?}",
                self.agent.destinations()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Starts the real `ferry` binary on `config` without blocking the runtime.
async fn spawn_agent(config: &std::path::Path) -> ferry_tests::FerryProcess {
    let config = config.to_owned();
    tokio::task::spawn_blocking(move || ferry_tests::FerryProcess::start(ferry_tests::ferry_bin!(), &config))
        .await
        .unwrap()
        .unwrap()
}

/// The event ids a collector received, and how many arrived more than once.
fn ids_of(c: &Collector, protocol: Protocol) -> (HashSet<String>, usize) {
    let mut ids = HashSet::new();
    let mut dups = 0;
    for m in c.messages().into_iter().filter(|m| m.topic != "ferry/probe") {
        let id = match protocol {
            Protocol::V5 => m.user_property("id").unwrap().to_owned(),
            Protocol::V311 => serde_json::from_slice::<Value>(&m.payload).unwrap()["id"].as_str().unwrap().to_owned(),
        };
        if !ids.insert(id) {
            dups += 1;
        }
    }
    (ids, dups)
}

async fn wait_for_ids(c: &Collector, protocol: Protocol, want: &[String]) -> usize {
    let start = Instant::now();
    loop {
        let (got, dups) = ids_of(c, protocol);
        if want.iter().all(|id| got.contains(id)) {
            return dups;
        }
        assert!(
            start.elapsed() < WAIT,
            "only {} of {} ids arrived; first missing: {:?}",
            want.iter().filter(|id| got.contains(*id)).count(),
            want.len(),
            want.iter().find(|id| !got.contains(*id))
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGKILLs `broker` with the agent's window unanswered and restarts it
/// ([`ferry_harness::kill_mid_window`]); the proxy is left cut.
async fn kill_and_restart_mid_window(broker: &mut Mosquitto, proxy: &FaultProxy, collector: &Collector) {
    let url = broker.url();
    ferry_harness::kill_mid_window(broker, proxy, collector, &url, "ferry/probe", WAIT).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_event_reaches_every_broker_in_the_wire_format_of_its_protocol() {
    let (m1, m2, m3) = (
        Mosquitto::start(MosquittoOptions::default()).await.unwrap(),
        Mosquitto::start(MosquittoOptions::default()).await.unwrap(),
        Mosquitto::start(MosquittoOptions::default()).await.unwrap(),
    );
    let rumqttd = InProcessBroker::start().await.unwrap();
    let c1 = Collector::start(&m1.url(), "ferry/#", Protocol::V5).await.unwrap();
    let c2 = Collector::start(&m2.url(), "ferry/#", Protocol::V311).await.unwrap();
    let c3 = Collector::start(&m3.url(), "#", Protocol::V5).await.unwrap();
    // rumqttd shares one router between its listeners and cannot hand an MQTT 5
    // message to a 3.1.1 subscriber, so each version gets its own prefix there.
    let c4 = Collector::start(&rumqttd.url(Protocol::V5), "v5/#", Protocol::V5).await.unwrap();
    let c5 = Collector::start(&rumqttd.url(Protocol::V311), "v311/#", Protocol::V311).await.unwrap();
    let dests = [
        destination("mosq-v5", &m1.url(), "v5", ""),
        destination("mosq-v311", &m2.url(), "v311", ""),
        destination("alarms-only", &m3.url(), "v5", "routes = [\"alarms/#\"]\ntopic_prefix = \"site-7/\""),
        destination("rumqttd-v5", &rumqttd.url(Protocol::V5), "v5", "topic_prefix = \"v5/\""),
        destination("rumqttd-v311", &rumqttd.url(Protocol::V311), "v311", "topic_prefix = \"v311/\""),
    ]
    .concat();
    let t = TestAgent::start(&dests).await;
    let telemetry = t.ingest("telemetry/temp", "t", 1500).await;
    let alarms = t.ingest("alarms/fire", "a", 100).await;
    let all: Vec<String> = telemetry.iter().chain(&alarms).cloned().collect();

    for (c, p) in [(&c1, Protocol::V5), (&c2, Protocol::V311), (&c4, Protocol::V5), (&c5, Protocol::V311)] {
        wait_for_ids(c, p, &all).await;
    }
    wait_for_ids(&c3, Protocol::V5, &alarms).await;
    let (only, _) = ids_of(&c3, Protocol::V5);
    assert!(only.iter().all(|id| id.starts_with("a-")), "a destination received events its routes exclude");

    // MQTT 5: binary mode; the sequence order holds per destination.
    let v5 = c1.messages();
    let m = &v5[0];
    assert_eq!(m.topic, "ferry/gw-1/telemetry/temp");
    assert_eq!(m.content_type.as_deref(), Some("application/json"));
    assert_eq!(m.user_property("specversion"), Some("1.0"));
    assert_eq!(m.user_property("source"), Some("ferry://gw-1"));
    assert_eq!(m.user_property("type"), Some("ferry.event"));
    let id = m.user_property("id").unwrap();
    assert_eq!(serde_json::from_slice::<Value>(&m.payload).unwrap(), json!({"id": id}));
    let seqs: Vec<u64> = v5.iter().map(|m| m.user_property("sequence").unwrap().parse().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "events out of sequence order");
    assert_eq!(c3.messages()[0].topic, "site-7/alarms/fire");
    // MQTT 3.1.1: structured mode.
    let s: Value = serde_json::from_slice(&c2.messages()[0].payload).unwrap();
    assert_eq!(s["specversion"], "1.0");
    assert_eq!(s["subject"], "telemetry/temp");
    assert!(s["data"]["id"].is_string());

    // Once every destination has everything, the log empties.
    t.wait_until("delivered events to leave the log", |t| t.agent.store().status(0).unwrap().events == 0).await;
    let status = t.agent.store().status(0).unwrap();
    assert_eq!(status.counters.delivered_events, all.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_destination_never_holds_up_the_others_and_keeps_its_backlog() {
    let live = Mosquitto::start(MosquittoOptions::default()).await.unwrap();
    let collector = Collector::start(&live.url(), "ferry/#", Protocol::V5).await.unwrap();
    let dead_port = ferry_harness::net::free_port().unwrap();
    let dests = [
        destination("live", &live.url(), "v5", ""),
        destination("dead", &format!("mqtt://127.0.0.1:{dead_port}"), "v5", ""),
    ]
    .concat();
    let t = TestAgent::start(&dests).await;
    let ids = t.ingest("telemetry/t", "e", 5000).await;
    wait_for_ids(&collector, Protocol::V5, &ids).await;
    t.wait_until("the live cursor to reach the end", |t| t.destination("live").acked_sequence == 5000).await;
    t.wait_until("the dead destination's lag to show", |t| t.destination("dead").lag_ms > 0).await;
    let dead = t.destination("dead");
    assert!(!dead.connected);
    assert!(dead.reconnects >= 1);
    assert!(dead.last_error.is_some());
    assert_eq!(dead.acked_sequence, 0);
    // Nothing may leave the log while one destination still needs it.
    assert_eq!(t.agent.store().status(0).unwrap().events, 5000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_black_holed_link_is_detected_and_everything_is_delivered_after_it_heals() {
    let broker = Mosquitto::start(MosquittoOptions::default()).await.unwrap();
    let collector = Collector::start(&broker.url(), "ferry/#", Protocol::V5).await.unwrap();
    let proxy = FaultProxy::start(broker.addr()).await.unwrap();
    let t = TestAgent::start(&destination("cloud", &proxy.url(), "v5", "inflight = 32")).await;
    let first = t.ingest("telemetry/t", "before", 200).await;
    wait_for_ids(&collector, Protocol::V5, &first).await;

    proxy.handle().blackhole();
    let reconnects = t.destination("cloud").reconnects;
    let during = t.ingest("telemetry/t", "during", 500).await;
    t.wait_until("the dead link to be noticed", |t| t.destination("cloud").reconnects > reconnects).await;
    proxy.handle().restore();
    let after = t.ingest("telemetry/t", "after", 200).await;
    let all: Vec<String> = first.into_iter().chain(during).chain(after).collect();
    wait_for_ids(&collector, Protocol::V5, &all).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_killed_mid_stream_and_restarted_gets_every_event() {
    let mut broker = Mosquitto::start(MosquittoOptions::default()).await.unwrap();
    let collector = Collector::start(&broker.url(), "ferry/#", Protocol::V311).await.unwrap();
    // The proxy keeps the agent out until the collector has resubscribed, so
    // nothing is published into a broker with no subscriber.
    let proxy = FaultProxy::start(broker.addr()).await.unwrap();
    // The whole backlog is stored before the link opens, so the kill lands mid-stream.
    proxy.handle().cut();
    let t = TestAgent::start(&destination("cloud", &proxy.url(), "v311", "inflight = 64")).await;
    let ids = t.ingest("telemetry/t", "k", 20_000).await;
    proxy.handle().restore();
    let start = Instant::now();
    while collector.len() < 2_000 {
        assert!(start.elapsed() < WAIT);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    kill_and_restart_mid_window(&mut broker, &proxy, &collector).await;
    assert!(collector.len() < ids.len(), "the stream finished before the kill; nothing was tested");
    proxy.handle().restore();
    let dups = wait_for_ids(&collector, Protocol::V311, &ids).await;
    assert!(dups > 0, "nothing was resent, so nothing was in flight at the kill");
    assert!(dups <= 64 * 2, "{dups} duplicates after one broker restart with an in-flight window of 64");
}

/// Write syscalls a process made so far (`syscw` of `/proc/PID/io`).
fn write_syscalls(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    io.lines().find_map(|l| l.strip_prefix("syscw: ")).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backlog_goes_out_in_far_fewer_socket_writes_than_publishes() {
    // Publishes queued behind one another share one socket write (our
    // rumqttc patch, docs/design.md#mqtt-writes); unpatched, every publish is
    // a writev of its own.
    let broker = Mosquitto::start(MosquittoOptions::default()).await.unwrap();
    let collector = Collector::start(&broker.url(), "ferry/#", Protocol::V311).await.unwrap();
    let proxy = FaultProxy::start(broker.addr()).await.unwrap();
    proxy.handle().cut();
    let dir = tempfile::tempdir().unwrap();
    // Without fsync the store's own writes are few, so the count is the link's.
    let config = ferry_tests::write_config_with(
        dir.path(),
        "durability = \"none\"",
        &destination("cloud", &proxy.url(), "v311", "inflight = 256"),
    );
    let agent = spawn_agent(&config).await;
    let client = reqwest::Client::new();
    let ids: Vec<String> = (0..20_000).map(|i| format!("w-{i}")).collect();
    for chunk in ids.chunks(1_000) {
        let body: Vec<Value> = chunk.iter().map(|id| json!({"topic": "telemetry/w", "id": id, "data": 1})).collect();
        let r = client.post(format!("{}/v1/events", agent.url())).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let before = write_syscalls(agent.pid());
    proxy.handle().restore();
    wait_for_ids(&collector, Protocol::V311, &ids).await;
    let writes = write_syscalls(agent.pid()) - before;
    assert!(
        writes * 4 < ids.len() as u64,
        "{writes} write syscalls for {} publishes: queued publishes are not sharing writes",
        ids.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_sigkilled_mid_forwarding_resends_only_its_window_after_restart() {
    const N: usize = 30_000;
    const INFLIGHT: usize = 128;
    const KILLS: usize = 3;
    let (m1, m2) = (
        Mosquitto::start(MosquittoOptions::default()).await.unwrap(),
        Mosquitto::start(MosquittoOptions::default()).await.unwrap(),
    );
    let c1 = Collector::start(&m1.url(), "ferry/#", Protocol::V5).await.unwrap();
    let c2 = Collector::start(&m2.url(), "ferry/#", Protocol::V311).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let extra = format!("inflight = {INFLIGHT}");
    // Proxies hold the links shut until the whole backlog is stored, so every
    // kill lands mid-stream.
    let (p1, p2) = (FaultProxy::start(m1.addr()).await.unwrap(), FaultProxy::start(m2.addr()).await.unwrap());
    p1.handle().cut();
    p2.handle().cut();
    let dests = [destination("a", &p1.url(), "v5", &extra), destination("b", &p2.url(), "v311", &extra)].concat();
    let config = ferry_tests::write_config_with(dir.path(), "", &dests);

    let mut agent = spawn_agent(&config).await;
    let client = reqwest::Client::new();
    let ids: Vec<String> = (0..N).map(|i| format!("k-{i}")).collect();
    for chunk in ids.chunks(1000) {
        let body: Vec<Value> = chunk.iter().map(|id| json!({"topic": "telemetry/t", "id": id, "data": 1})).collect();
        let r = client.post(format!("{}/v1/events", agent.url())).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    p1.handle().restore();
    p2.handle().restore();
    for k in 1..=KILLS {
        // Kill early in the stream, so even the faster destination is mid-way.
        let target = N * k / (2 * (KILLS + 1));
        let start = Instant::now();
        while c1.len().min(c2.len()) < target {
            assert!(start.elapsed() < WAIT, "forwarding stalled before kill {k}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert!(c1.len().min(c2.len()) < N, "forwarding finished before kill {k}; nothing was tested");
        agent.kill();
        agent = spawn_agent(&config).await;
    }
    let d1 = wait_for_ids(&c1, Protocol::V5, &ids).await;
    let d2 = wait_for_ids(&c2, Protocol::V311, &ids).await;
    eprintln!("duplicates after {KILLS} kills: {d1} (v5), {d2} (v311)");
    for d in [d1, d2] {
        assert!(d <= KILLS * INFLIGHT, "{d} duplicates exceed {KILLS} kills × the in-flight window of {INFLIGHT}");
    }
    let (status, _) = agent.terminate();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mutual_tls_delivers_and_an_untrusted_server_is_refused() {
    let pki = ferry_harness::TestPki::generate().unwrap();
    let good = Mosquitto::start(MosquittoOptions { tls: Some(pki.mosquitto_listener(true)), ..Default::default() })
        .await
        .unwrap();
    let rogue_listener = ferry_harness::TlsListener {
        ca: pki.ca_cert.clone(),
        cert: pki.rogue_server_cert.clone(),
        key: pki.rogue_server_key.clone(),
        require_certificate: false,
    };
    let rogue = Mosquitto::start(MosquittoOptions { tls: Some(rogue_listener), ..Default::default() }).await.unwrap();
    let collector = Collector::start(&good.url(), "ferry/#", Protocol::V5).await.unwrap();
    let path = |p: &std::path::Path| p.display().to_string();
    let mtls = format!(
        "ca_file = {:?}\nclient_cert = {:?}\nclient_key = {:?}",
        path(&pki.ca_cert),
        path(&pki.client_cert),
        path(&pki.client_key)
    );
    let dests = [
        destination("mtls", &good.tls_url().unwrap(), "v5", &mtls),
        destination("no-client-cert", &good.tls_url().unwrap(), "v5", &format!("ca_file = {:?}", path(&pki.ca_cert))),
        destination("rogue", &rogue.tls_url().unwrap(), "v5", &format!("ca_file = {:?}", path(&pki.ca_cert))),
    ]
    .concat();
    let t = TestAgent::start(&dests).await;
    let ids = t.ingest("telemetry/t", "tls", 300).await;
    let dups = wait_for_ids(&collector, Protocol::V5, &ids).await;
    // Only the mTLS destination can have delivered: the others never got a session.
    assert_eq!(dups, 0);
    t.wait_until("both refused destinations to report an error", |t| {
        t.destination("rogue").last_error.is_some() && t.destination("no-client-cert").last_error.is_some()
    })
    .await;
    for name in ["rogue", "no-client-cert"] {
        let d = t.destination(name);
        assert!(!d.connected && d.acked_sequence == 0, "{name}: {d:?}");
    }
    let rogue_error = t.destination("rogue").last_error.unwrap().to_lowercase();
    assert!(rogue_error.contains("certificate") || rogue_error.contains("tls"), "{rogue_error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_mqtt_ingest_stores_and_forwards_and_loses_nothing_when_the_agent_is_killed() {
    const N: usize = 3_000;
    let local = Mosquitto::start(MosquittoOptions { persistence: true, ..Default::default() }).await.unwrap();
    let cloud = Mosquitto::start(MosquittoOptions::default()).await.unwrap();
    let collector = Collector::start(&cloud.url(), "ferry/#", Protocol::V5).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tail = format!(
        "[ingest.mqtt]\nurl = \"{}\"\nprotocol = \"v311\"\nclient_id = \"ferry-local\"\ntopics = [\"sensors/#\"]\nkeep_alive = \"5s\"\n\n{}",
        local.url(),
        destination("cloud", &cloud.url(), "v5", "")
    );
    let config = ferry_tests::write_config_with(dir.path(), "", &tail);
    let agent = spawn_agent(&config).await;
    // The agent's persistent session must exist before readings flow: a probe
    // that makes it through to the cloud proves the subscription is live.
    let probe_start = Instant::now();
    while !collector.messages().iter().any(|m| m.topic.ends_with("sensors/probe")) {
        ferry_harness::mqtt::publish_v311(&local.url(), "sensors/probe", b"{}".to_vec(), Duration::from_secs(2))
            .await
            .unwrap();
        assert!(probe_start.elapsed() < WAIT, "the agent never subscribed at the local broker");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let publisher = {
        let url = local.url();
        tokio::spawn(async move {
            let opts = ferry_harness::mqtt::options_v311(&url, "sensor-pub", None).unwrap();
            let (client, mut eventloop) = ferry_harness::rumqttc::AsyncClient::new(opts, 64);
            // `publish` only queues: the publisher is done when every PUBACK is in.
            let driver = tokio::spawn(async move {
                use ferry_harness::rumqttc::{Event, Packet};
                let mut acked = 0;
                while acked < N {
                    if let Event::Incoming(Packet::PubAck(_)) = eventloop.poll().await.unwrap() {
                        acked += 1;
                    }
                }
            });
            for i in 0..N {
                let payload = json!({"reading": i}).to_string();
                client
                    .publish(format!("sensors/s{}", i % 4), ferry_harness::rumqttc::QoS::AtLeastOnce, false, payload)
                    .await
                    .unwrap();
                if i % 200 == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            driver.await.unwrap();
        })
    };
    // Kill the agent while messages are streaming in.
    tokio::time::sleep(Duration::from_millis(300)).await;
    agent.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let agent = spawn_agent(&config).await;
    publisher.await.unwrap();

    let start = Instant::now();
    let readings = |c: &Collector| -> HashSet<u64> {
        c.messages()
            .iter()
            .filter_map(|m| serde_json::from_slice::<Value>(&m.payload).ok()?["reading"].as_u64())
            .collect()
    };
    while readings(&collector).len() < N {
        if start.elapsed() > WAIT {
            let got = readings(&collector);
            let missing: Vec<usize> = (0..N).filter(|i| !got.contains(&(*i as u64))).take(20).collect();
            panic!("only {} of {N} readings reached the cloud; first missing: {missing:?}", got.len());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let messages = collector.messages();
    let m = messages.iter().find(|m| !m.topic.ends_with("/probe")).unwrap();
    assert!(m.topic.starts_with("ferry/test-device/sensors/s"), "{}", m.topic);
    assert!(m.user_property("id").unwrap().starts_with("mqtt-"));
    let (status, _) = agent.terminate();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_route_verdict_limits_an_event_to_the_named_destinations_and_stays_off_the_wire() {
    let ([ma, mb], [ca, cb]) = two_clouds().await;
    let t = TestAgent::start(
        &[
            destination("a", &ma.url(), "v5", ""),
            destination("b", &mb.url(), "v5", ""),
            plugin("router", "subject-router", "ingest", "config = { \"route.alerts/\" = \"a\" }"),
        ]
        .concat(),
    )
    .await;
    let body = json!([
        {"topic": "alerts/fire", "id": "only-a", "data": 1},
        {"topic": "t", "id": "both", "data": 2},
    ]);
    let r = t.client.post(format!("http://{}/v1/events", t.agent.http_addr())).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    wait_for_ids(&ca, Protocol::V5, &["only-a".into(), "both".into()]).await;
    wait_for_ids(&cb, Protocol::V5, &["both".into()]).await;
    t.wait_until("both cursors to pass both events", |t| {
        t.destination("a").acked_sequence == 2 && t.destination("b").acked_sequence == 2
    })
    .await;
    assert!(!ids_of(&cb, Protocol::V5).0.contains("only-a"));
    assert!(ca.messages().iter().all(|m| m.user_property("ferryroute").is_none()));
}

/// A `[[plugin]]` table for a component built by scripts/build-plugins.sh.
fn plugin(name: &str, file: &str, stage: &str, extra: &str) -> String {
    let path = ferry_tests::built_plugin(file);
    format!(
        "[[plugin]]\nname = \"{name}\"\npath = {:?}\nworld = \"filter\"\nstage = \"{stage}\"\n{extra}\n",
        path.display().to_string()
    )
}

/// Each received message's id and payload.
fn payloads(c: &Collector) -> Vec<(String, String)> {
    c.messages()
        .into_iter()
        .filter(|m| m.topic != "ferry/probe")
        .map(|m| (m.user_property("id").unwrap().to_owned(), m.payload_str()))
        .collect()
}

/// Two brokers, each with a collector on everything Ferry publishes (MQTT 5).
async fn two_clouds() -> ([Mosquitto; 2], [Collector; 2]) {
    let (ma, mb) = (
        Mosquitto::start(MosquittoOptions::default()).await.unwrap(),
        Mosquitto::start(MosquittoOptions::default()).await.unwrap(),
    );
    let (ca, cb) = (
        Collector::start(&ma.url(), "ferry/#", Protocol::V5).await.unwrap(),
        Collector::start(&mb.url(), "ferry/#", Protocol::V5).await.unwrap(),
    );
    ([ma, mb], [ca, cb])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_destination_stage_filter_drops_and_transforms_for_its_destination_only() {
    let ([ma, mb], [ca, cb]) = two_clouds().await;
    let config = [
        destination("a", &ma.url(), "v5", ""),
        destination("b", &mb.url(), "v5", ""),
        plugin("no-debug", "prefix-filter", "a", "config = { prefixes = \"debug/\" }"),
        plugin("redact", "redact-transform", "a", "config = { fields = \"secret\" }"),
    ]
    .concat();
    let t = TestAgent::start(&config).await;
    let body = json!([
        {"topic": "debug/trace", "id": "dbg", "data": {"secret": "s1"}},
        {"topic": "telemetry/t", "id": "tel", "data": {"secret": "s2", "v": 1}},
        {"topic": "telemetry/t", "id": "plain", "data": {"v": 2}},
    ]);
    let r = t.client.post(format!("http://{}/v1/events", t.agent.http_addr())).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    wait_for_ids(&cb, Protocol::V5, &["dbg".into(), "tel".into(), "plain".into()]).await;
    wait_for_ids(&ca, Protocol::V5, &["tel".into(), "plain".into()]).await;
    t.wait_until("a's cursor to pass the dropped event too", |t| t.destination("a").acked_sequence == 3).await;
    assert!(!ids_of(&ca, Protocol::V5).0.contains("dbg"), "dropped for a");
    let a: std::collections::HashMap<_, _> = payloads(&ca).into_iter().collect();
    assert_eq!(serde_json::from_str::<Value>(&a["tel"]).unwrap(), json!({"secret": "[redacted]", "v": 1}));
    assert_eq!(serde_json::from_str::<Value>(&a["plain"]).unwrap(), json!({"v": 2}));
    let b: std::collections::HashMap<_, _> = payloads(&cb).into_iter().collect();
    assert_eq!(serde_json::from_str::<Value>(&b["tel"]).unwrap(), json!({"secret": "s2", "v": 1}), "b is untouched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_trapping_destination_stage_plugin_dead_letters_for_its_destination_only() {
    let ([ma, mb], [ca, cb]) = two_clouds().await;
    let config = [
        destination("a", &ma.url(), "v5", ""),
        destination("b", &mb.url(), "v5", ""),
        plugin("hostile", "testdata/hostile-filter", "a", "timeout_ms = 200\nconfig = { k = \"v\" }"),
    ]
    .concat();
    let t = TestAgent::start(&config).await;
    // One event per request, each after the previous one settled for a, so
    // every plugin call holds exactly one event.
    for (sequence, (id, topic)) in (1u64..).zip([("g0", "good/0"), ("bad", "hostile/trap"), ("g1", "good/1")]) {
        let body = json!({"topic": topic, "id": id, "data": 1});
        let r = t.client.post(format!("http://{}/v1/events", t.agent.http_addr())).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 200);
        t.wait_until("a's cursor to pass the event", |t| t.destination("a").acked_sequence == sequence).await;
    }
    wait_for_ids(&cb, Protocol::V5, &["g0".into(), "bad".into(), "g1".into()]).await;
    wait_for_ids(&ca, Protocol::V5, &["g0".into(), "g1".into()]).await;
    assert!(!ids_of(&ca, Protocol::V5).0.contains("bad"));
    assert!(ca.messages().iter().all(|m| m.user_property("cfgecho") == Some("k=v")), "a gets the plugin's output");
    assert!(cb.messages().iter().all(|m| m.user_property("cfgecho").is_none()), "b never sees the plugin");
    let dead = t.agent.store().dead_letters(0, 10).unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].event().unwrap().body.id, "bad");
    assert!(dead[0].reason.starts_with("destination a: plugin hostile: plugin trapped"), "{}", dead[0].reason);
    assert_eq!((t.destination("a").dead_lettered, t.destination("b").dead_lettered), (1, 0));
    let plugin = &t.agent.plugins()[0].status();
    assert_eq!((plugin.traps, plugin.instances_built), (1, 2), "{plugin:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_resend_after_a_broker_kill_gives_the_same_filtered_output() {
    let mut broker = Mosquitto::start(MosquittoOptions::default()).await.unwrap();
    let collector = Collector::start(&broker.url(), "ferry/#", Protocol::V5).await.unwrap();
    let proxy = FaultProxy::start(broker.addr()).await.unwrap();
    proxy.handle().cut();
    let config = [
        destination("cloud", &proxy.url(), "v5", "inflight = 64"),
        plugin("no-debug", "prefix-filter", "cloud", "config = { prefixes = \"debug/\" }"),
        plugin("redact", "redact-transform", "cloud", "config = { fields = \"secret\" }"),
    ]
    .concat();
    let t = TestAgent::start(&config).await;
    const N: usize = 6_000;
    let mut kept = Vec::new();
    for chunk in (0..N).collect::<Vec<_>>().chunks(500) {
        let body: Vec<Value> = chunk
            .iter()
            .map(|i| {
                let (topic, id) =
                    if i % 3 == 0 { ("debug/t", format!("d-{i}")) } else { ("telemetry/t", format!("k-{i}")) };
                json!({"topic": topic, "id": id, "data": {"n": i, "secret": format!("s{i}")}})
            })
            .collect();
        kept.extend(body.iter().filter(|e| e["topic"] == "telemetry/t").map(|e| e["id"].as_str().unwrap().to_owned()));
        let r = t.client.post(format!("http://{}/v1/events", t.agent.http_addr())).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    proxy.handle().restore();
    let start = Instant::now();
    while collector.len() < 1_000 {
        assert!(start.elapsed() < WAIT);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    kill_and_restart_mid_window(&mut broker, &proxy, &collector).await;
    assert!(collector.len() < kept.len(), "the stream finished before the kill; nothing was tested");
    proxy.handle().restore();
    wait_for_ids(&collector, Protocol::V5, &kept).await;
    t.wait_until("the cursor to pass every event", |t| t.destination("cloud").acked_sequence == N as u64).await;
    let mut seen: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    let mut resent = 0;
    for (id, payload) in payloads(&collector) {
        assert!(id.starts_with("k-"), "{id} should have been dropped for this destination");
        let n: usize = id[2..].parse().unwrap();
        assert_eq!(serde_json::from_str::<Value>(&payload).unwrap(), json!({"n": n, "secret": "[redacted]"}));
        if let Some(first) = seen.insert(id.clone(), payload.clone()) {
            assert_eq!(first, payload, "{id}: a resend must carry the same output");
            resent += 1;
        }
    }
    assert!(resent > 0, "nothing was resent, so nothing was in flight at the kill");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_destination_starts_at_the_earliest_the_latest_or_a_time_as_configured() {
    let broker = Mosquitto::start(MosquittoOptions::default()).await.unwrap();
    let url = broker.url();
    let dir = tempfile::tempdir().unwrap();
    let config = |destinations: &str| {
        let toml = format!(
            "[agent]\ndevice_id = \"gw-1\"\ndata_dir = {:?}\n[ingest.http]\nlisten = \"127.0.0.1:0\"\n{destinations}",
            dir.path().display().to_string()
        );
        Config::parse(&toml, "test.toml").unwrap()
    };
    let post = |agent: &Agent, ids: &[&str]| {
        let body: Vec<Value> = ids.iter().map(|id| json!({"topic": "t/a", "id": id, "data": 1})).collect();
        let url = format!("http://{}/v1/events", agent.http_addr());
        async move { assert_eq!(reqwest::Client::new().post(url).json(&body).send().await.unwrap().status(), 200) }
    };
    // `first`, as it ran before: it takes e1..e3 (still in the log: `down` has none of them).
    let down = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let before = destination("first", &url, "v5", "topic_prefix = \"first/\"")
        + &destination("down", &format!("mqtt://127.0.0.1:{down}"), "v5", "");
    let agent = Agent::start(config(&before), Arc::new(SystemClock)).await.unwrap();
    post(&agent, &["e1", "e2"]).await;
    // `start` is written to the second: the next whole second falls between e2 and e3.
    let now = SystemClock.now_millis();
    let between = (now / 1000 + 1) * 1000;
    tokio::time::sleep(Duration::from_millis(between - now + 50)).await;
    post(&agent, &["e3"]).await;
    agent.shutdown().await.unwrap();

    // Three destinations added, each starting elsewhere.
    let collectors = [
        Collector::start(&url, "earliest/#", Protocol::V5).await.unwrap(),
        Collector::start(&url, "since/#", Protocol::V5).await.unwrap(),
        Collector::start(&url, "latest/#", Protocol::V5).await.unwrap(),
    ];
    let at = ferry::fleet::report::rfc3339(between);
    let after = before
        + &destination("earliest", &url, "v5", "topic_prefix = \"earliest/\"")
        + &destination("since", &url, "v5", &format!("topic_prefix = \"since/\"\nstart = \"{at}\""))
        + &destination("latest", &url, "v5", "topic_prefix = \"latest/\"\nstart = \"latest\"");
    let agent = Agent::start(config(&after), Arc::new(SystemClock)).await.unwrap();
    post(&agent, &["e4"]).await;
    let want = |ids: &[&str]| ids.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    wait_for_ids(&collectors[0], Protocol::V5, &want(&["e1", "e2", "e3", "e4"])).await;
    wait_for_ids(&collectors[1], Protocol::V5, &want(&["e3", "e4"])).await;
    wait_for_ids(&collectors[2], Protocol::V5, &want(&["e4"])).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(ids_of(&collectors[1], Protocol::V5).0.len(), 2, "`since` starts at e3");
    assert_eq!(ids_of(&collectors[2], Protocol::V5).0.len(), 1, "`latest` starts after e3");
    // The placed cursors are durable: a restart sends nothing again.
    agent.shutdown().await.unwrap();
    let agent = Agent::start(config(&after), Arc::new(SystemClock)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(ids_of(&collectors[2], Protocol::V5), (want(&["e4"]).into_iter().collect(), 0));
    agent.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn ack_all_answers_at_once_when_a_destination_dead_letters_the_event() {
    let ([ma, mb], _collectors) = two_clouds().await;
    let config = [
        destination("a", &ma.url(), "v5", ""),
        destination("b", &mb.url(), "v5", ""),
        plugin("hostile", "testdata/hostile-filter", "a", "timeout_ms = 200"),
    ]
    .concat();
    let t = TestAgent::start(&config).await;
    let post = |topic: &'static str, id: &'static str| {
        let (client, url) = (t.client.clone(), format!("http://{}/v1/events?ack=all", t.agent.http_addr()));
        async move {
            let started = Instant::now();
            let r = client.post(url).json(&json!({"topic": topic, "id": id, "data": 1})).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap(), started.elapsed())
        }
    };
    let (code, body, _) = post("good/0", "g0").await;
    assert_eq!((code, &body["events"][0]["acked_by"]), (200, &json!(["a", "b"])), "{body}");
    // `a`'s plugin traps on it: dead-lettered there, `all` can never be met.
    let (code, body, took) = post("hostile/trap", "bad").await;
    assert_eq!(code, 202, "{body}");
    assert_eq!(body["events"][0]["acked_by"], json!(["b"]));
    assert!(took < Duration::from_secs(5), "answered after {took:?}, not at once (ack_timeout is 10 s)");
}

/// The ids of `c`'s messages with `prefix`, in arrival order (a replayed
/// event appears twice).
fn arrivals(c: &Collector, prefix: &str) -> Vec<String> {
    c.messages()
        .iter()
        .filter_map(|m| m.user_property("id").filter(|id| id.starts_with(prefix)).map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replay_sends_one_destination_every_kept_event_since_a_time_again_in_order_while_live_traffic_goes_on() {
    let ([ma, mb], [ca, cb]) = two_clouds().await;
    let config = destination("a", &ma.url(), "v5", "")
        + &destination("b", &mb.url(), "v5", "")
        + "[store]\nretain_delivered = { age = \"1h\", share = \"50%\" }\n";
    let t = TestAgent::start(&config).await;
    let early = t.ingest("t/x", "early", 300).await;
    // The replay's time falls on a whole second between the two batches.
    let now = SystemClock.now_millis();
    let since = (now / 1000 + 1) * 1000;
    tokio::time::sleep(Duration::from_millis(since - now + 20)).await;
    let kept = t.ingest("t/x", "kept", 1000).await;
    wait_for_ids(&ca, Protocol::V5, &[early.clone(), kept.clone()].concat()).await;
    wait_for_ids(&cb, Protocol::V5, &[early, kept.clone()].concat()).await;
    let status = |t: &TestAgent| t.agent.store().status(0).unwrap();
    t.wait_until("every delivered event kept", |t| status(t).counters.retained_events == 1300).await;

    // `a`'s consumer lost everything: a new one subscribes and asks again.
    let fresh = Collector::start(&ma.url(), "#", Protocol::V5).await.unwrap();
    let live = {
        let (client, url) = (t.client.clone(), format!("http://{}/v1/events", t.agent.http_addr()));
        tokio::spawn(async move {
            for i in 0..40 {
                let body: Vec<Value> =
                    (0..25).map(|j| json!({"topic": "t/x", "id": format!("live-{i}-{j}"), "data": 1})).collect();
                assert_eq!(client.post(&url).json(&body).send().await.unwrap().status(), 200);
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
    };
    let replay = |body: Value| {
        let url = format!("http://{}/v1/destinations/a/replay", t.agent.http_addr());
        let client = t.client.clone();
        async move {
            let r = client.post(url).json(&body).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let at = ferry::clock::utc(since);
    let (code, started) = replay(json!({ "since": at })).await;
    assert_eq!(code, 200, "{started}");
    assert_eq!(started["from"], 301, "{started}");
    assert_eq!(started["first_available"], 301, "{started}");
    live.await.unwrap();
    let live_ids: Vec<String> = (0..40).flat_map(|i| (0..25).map(move |j| format!("live-{i}-{j}"))).collect();
    wait_for_ids(&fresh, Protocol::V5, &[kept.clone(), live_ids.clone()].concat()).await;
    assert!(arrivals(&fresh, "early-").is_empty(), "only events since {at} go again");
    let mut first_seen: Vec<String> = Vec::new();
    for id in arrivals(&fresh, "kept-") {
        if !first_seen.contains(&id) {
            first_seen.push(id);
        }
    }
    assert_eq!(first_seen, kept, "in their original order, with their original ids");
    t.wait_until("the replay to finish", |t| t.destination("a").replay.is_none()).await;
    wait_for_ids(&cb, Protocol::V5, &live_ids).await;
    assert_eq!(arrivals(&cb, "kept-").len(), 1000, "`b` was not replayed");

    // Nothing to replay past what was delivered, and bad requests change nothing.
    let last = status(&t).last_sequence;
    let (code, body) = replay(json!({ "from": last + 10 })).await;
    assert_eq!(code, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("nothing to replay"), "{body}");
    let (code, body) = replay(json!({ "since": "yesterday" })).await;
    assert_eq!((code, &body["field"]), (400, &json!("since")), "{body}");
    let (code, _) = replay(json!({ "from": 1, "since": at })).await;
    assert_eq!(code, 400);
    assert!(t.destination("a").replay.is_none());

    // The rewind is durable: asked for, then the agent stops at once.
    let (code, started) = replay(json!({ "from": 301 })).await;
    assert_eq!(code, 200, "{started}");
    let TestAgent { _dir, agent, client } = t;
    agent.shutdown().await.unwrap();
    let toml = format!(
        "[agent]\ndevice_id = \"gw-1\"\ndata_dir = {:?}\n[ingest.http]\nlisten = \"127.0.0.1:0\"\n{config}",
        _dir.path().display().to_string()
    );
    let agent = Agent::start(Config::parse(&toml, "test.toml").unwrap(), Arc::new(SystemClock)).await.unwrap();
    let t = TestAgent { _dir, agent, client };
    let start = Instant::now();
    while arrivals(&fresh, "kept-").len() < 2000 {
        assert!(start.elapsed() < WAIT, "{} kept events arrived twice", arrivals(&fresh, "kept-").len() - 1000);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    t.agent.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_mqtt5_producer_naming_a_response_topic_gets_its_receipt_at_the_configured_level() {
    use ferry_harness::rumqttc::v5::mqttbytes::QoS;
    use ferry_harness::rumqttc::v5::mqttbytes::v5::{Packet, Publish, PublishProperties};
    use ferry_harness::rumqttc::v5::{AsyncClient, Event as V5Event, MqttOptions};

    let local = Mosquitto::start(MosquittoOptions::default()).await.unwrap();
    let cloud = Mosquitto::start(MosquittoOptions::default()).await.unwrap();
    let down = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = destination("cloud", &cloud.url(), "v5", "")
        + &destination("down", &format!("mqtt://127.0.0.1:{down}"), "v5", "routes = [\"alarms/#\"]")
        + &format!(
            "[ingest.mqtt]\nurl = \"{}\"\nprotocol = \"v5\"\ntopics = [\"sensors/#\", \"alarms/#\"]\nack = \"all\"\nack_timeout = \"2s\"\n",
            local.url()
        );
    let t = TestAgent::start(&config).await;

    let (client, mut eventloop) = AsyncClient::new(MqttOptions::new("producer", "127.0.0.1", local.port()), 64);
    let (tx, mut replies) = tokio::sync::mpsc::unbounded_channel::<Publish>();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(V5Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send(p);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    client.subscribe("replies/#", QoS::AtLeastOnce).await.unwrap();
    let ask = |topic: &str, reply: &str, correlation: &str, payload: &str| {
        let props = PublishProperties {
            response_topic: Some(reply.to_owned()),
            correlation_data: Some(correlation.as_bytes().to_vec().into()),
            ..Default::default()
        };
        let (client, topic, payload) = (client.clone(), topic.to_owned(), payload.to_owned());
        async move { client.publish_with_properties(topic, QoS::AtLeastOnce, false, payload, props).await.unwrap() }
    };
    // Asked until the agent's subscription is live; the first receipt answers.
    let start = Instant::now();
    let first = loop {
        ask("sensors/t", "replies/1", "c1", r#"{"t":21.5}"#).await;
        if let Ok(Some(p)) = tokio::time::timeout(Duration::from_millis(500), replies.recv()).await {
            break p;
        }
        assert!(start.elapsed() < WAIT, "no receipt arrived");
    };
    let receipt = |p: &Publish| -> Value { serde_json::from_slice(&p.payload).unwrap() };
    let correlation = |p: &Publish| p.properties.as_ref().and_then(|p| p.correlation_data.clone()).unwrap();
    assert_eq!(first.topic.as_ref(), b"replies/1");
    assert_eq!(correlation(&first).as_ref(), b"c1");
    let r = receipt(&first);
    assert_eq!(
        (&r["stored"], &r["met"], &r["ack"], &r["acked_by"]),
        (&json!(true), &json!(true), &json!("all"), &json!(["cloud"])),
        "{r}"
    );
    assert!(r["sequence"].as_u64().unwrap() >= 1, "{r}");
    assert!(r["id"].as_str().unwrap().starts_with("mqtt-"), "{r}");

    // `down` routes alarms and is unreachable: `all` cannot be met, so the
    // receipt goes after ack_timeout, saying so.
    while replies.try_recv().is_ok() {}
    let asked = Instant::now();
    ask("alarms/fire", "replies/2", "c2", r#"{"level":3}"#).await;
    let p = tokio::time::timeout(WAIT, replies.recv()).await.unwrap().unwrap();
    let took = asked.elapsed();
    assert_eq!((p.topic.as_ref(), correlation(&p).as_ref()), (&b"replies/2"[..], &b"c2"[..]));
    let r = receipt(&p);
    assert_eq!((&r["stored"], &r["met"], &r["acked_by"]), (&json!(true), &json!(false), &json!(["cloud"])), "{r}");
    assert!(took >= Duration::from_millis(1900) && took < Duration::from_secs(10), "answered after {took:?}");

    // Bad input is refused, and told so.
    let props = PublishProperties {
        response_topic: Some("replies/3".into()),
        correlation_data: Some(b"c3".to_vec().into()),
        user_properties: vec![("specversion".into(), "1.0".into()), ("id".into(), String::new())],
        ..Default::default()
    };
    client.publish_with_properties("sensors/bad", QoS::AtLeastOnce, false, "{}", props).await.unwrap();
    let p = tokio::time::timeout(WAIT, replies.recv()).await.unwrap().unwrap();
    let r = receipt(&p);
    assert_eq!((p.topic.as_ref(), &r["stored"]), (&b"replies/3"[..], &json!(false)), "{r}");
    assert!(r["detail"].as_str().unwrap().starts_with("refused: "), "{r}");
    assert!(t.agent.store().status(0).unwrap().last_sequence >= 2);
}
