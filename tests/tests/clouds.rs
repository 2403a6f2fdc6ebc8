//! The clouds are the judge: the real agent forwards through the harness's
//! cloud emulator, which holds it to each cloud's documented limits
//! (`docs/cloud-profiles.md`), in front of real Mosquitto brokers.
//!
//! One agent with a destination per cloud profile (and AWS once more with
//! batching off) goes through a steady rate above every cloud's publish
//! limit, a 60-second outage of every link, and a SIGKILL while the backlog
//! drains. Pass: every acknowledged event arrives at every cloud, and no
//! emulator saw a single violation: nothing discarded, delayed or refused,
//! no connection closed.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ferry_harness::{
    CloudEmulator, CloudProfile, Collector, FaultProxy, Mosquitto, MosquittoOptions, Protocol, Received,
};
use ferry_tests::{FerryProcess, ferry_bin};
use serde_json::{Value, json};

/// One cloud: a broker, the emulator holding to its profile, a proxy to
/// cut the link, and a subscriber on the broker.
struct Cloud {
    name: &'static str,
    _broker: Mosquitto,
    emulator: CloudEmulator,
    proxy: FaultProxy,
    collector: Collector,
    protocol: Protocol,
}

impl Cloud {
    async fn start(name: &'static str, profile: CloudProfile, protocol: Protocol, filter: &str) -> Self {
        let broker = Mosquitto::start(MosquittoOptions::default()).await.unwrap();
        let emulator = CloudEmulator::start(broker.addr(), profile).await.unwrap();
        let proxy = FaultProxy::start(emulator.addr()).await.unwrap();
        let collector = Collector::start(&broker.url(), filter, protocol).await.unwrap();
        Self { name, _broker: broker, emulator, proxy, collector, protocol }
    }

    fn url(&self) -> String {
        format!("mqtt://{}", self.proxy.addr())
    }
}

/// The event ids a message carries: one, or a batch's.
fn ids_in(m: &Received, protocol: Protocol) -> Vec<String> {
    let content_type = m.content_type.as_deref().unwrap_or("");
    let json = || serde_json::from_slice::<Value>(&m.payload).expect("a JSON payload");
    let batch = content_type.starts_with("application/cloudevents-batch+json")
        || m.topic.contains("cloudevents-batch%2Bjson")
        || m.payload.first() == Some(&b'[');
    if batch {
        return json().as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap().to_owned()).collect();
    }
    match protocol {
        Protocol::V5 => vec![m.user_property("id").unwrap().to_owned()],
        Protocol::V311 => vec![json()["id"].as_str().unwrap().to_owned()],
    }
}

fn received(c: &Cloud) -> HashSet<String> {
    c.collector.messages().iter().flat_map(|m| ids_in(m, c.protocol)).collect()
}

/// Posts events at `per_second` for `seconds` to the agent at `url` (which
/// may change: a restart), recording each acknowledged id.
async fn produce(
    url: &Arc<std::sync::RwLock<String>>,
    acked: &Arc<std::sync::Mutex<Vec<String>>>,
    next: &AtomicU64,
    per_second: u64,
    seconds: u64,
) {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let per_tick = per_second / 10;
    let start = Instant::now();
    for tick in 0..seconds * 10 {
        let first = next.fetch_add(per_tick, Ordering::SeqCst);
        let ids: Vec<String> = (first..first + per_tick).map(|n| format!("e-{n}")).collect();
        let body: Vec<Value> = (first..first + per_tick)
            .zip(&ids)
            .map(|(n, id)| json!({"topic": format!("telemetry/s{}", n % 8), "id": id, "data": "v".repeat(256)}))
            .collect();
        // Retried with the same ids until acknowledged (the agent may be restarting).
        loop {
            let base = url.read().unwrap().clone();
            if let Ok(r) = client.post(format!("{base}/v1/events")).json(&body).send().await
                && r.status() == 200
            {
                acked.lock().unwrap().extend(ids.iter().cloned());
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let due = start + Duration::from_millis(100 * (tick + 1));
        tokio::time::sleep_until(due.into()).await;
    }
}

fn destination(name: &str, profile: &str, url: &str, protocol: &str, extra: &str) -> String {
    format!(
        "[[destination]]\nname = \"{name}\"\nprofile = \"{profile}\"\nurl = \"{url}\"\nprotocol = \"{protocol}\"\n\
         keep_alive = \"10s\"\nbackoff_base = \"100ms\"\nbackoff_cap = \"1s\"\n{extra}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_cloud_gets_every_event_within_its_limits_through_load_an_outage_and_a_kill() {
    let clouds = vec![
        Cloud::start("aws", CloudProfile::aws_iot_core(), Protocol::V5, "aws/#").await,
        Cloud::start("aws-single", CloudProfile::aws_iot_core().with_name("aws-single"), Protocol::V311, "single/#")
            .await,
        Cloud::start("event-grid", CloudProfile::azure_event_grid(), Protocol::V5, "eg/#").await,
        Cloud::start("iot-hub", CloudProfile::azure_iot_hub(), Protocol::V311, "devices/#").await,
        Cloud::start("hivemq", CloudProfile::hivemq_cloud(), Protocol::V5, "hive/#").await,
    ];
    let dests = [
        destination("aws", "aws-iot-core", &clouds[0].url(), "v5", "topic_prefix = \"aws/gw-1/\""),
        destination(
            "aws-single",
            "aws-iot-core",
            &clouds[1].url(),
            "v311",
            // Unbatched it is slower by design: it takes one sensor's events.
            "topic_prefix = \"single/gw-1/\"\nroutes = [\"telemetry/s0\"]\n[destination.batch]\nmax_events = 1",
        ),
        destination("event-grid", "azure-event-grid", &clouds[2].url(), "v5", "topic_prefix = \"eg/gw-1/\""),
        // IoT Hub signs in with a SAS token; the emulator, like a test broker, does not check it.
        destination(
            "iot-hub",
            "azure-iot-hub",
            &clouds[3].url(),
            "v311",
            "username = \"hub.azure-devices.net/gw-1/?api-version=2021-04-12\"\npassword = \"SharedAccessSignature sr=test\"",
        ),
        destination("hivemq", "hivemq-cloud", &clouds[4].url(), "v5", "topic_prefix = \"hive/gw-1/\""),
    ]
    .concat();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ferry.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\ndevice_id = \"gw-1\"\ndata_dir = {:?}\n[store]\nmin_free_disk = \"0 B\"\n[ingest.http]\nlisten = \"127.0.0.1:0\"\n{dests}",
            dir.path().join("data").display().to_string()
        ),
    )
    .unwrap();
    let start_agent = |c: std::path::PathBuf| async move {
        tokio::task::spawn_blocking(move || FerryProcess::start(ferry_bin!(), &c)).await.unwrap().unwrap()
    };
    let mut agent = start_agent(config.clone()).await;
    let url = Arc::new(std::sync::RwLock::new(agent.url()));
    let acked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let next = Arc::new(AtomicU64::new(0));

    // 1. A steady 1,200 events/s: above AWS's and IoT Hub's 100 publishes/s
    //    and, unbatched, far above; Event Grid's 1,000/s with batches is not,
    //    so the outage's backlog drains above it below.
    produce(&url, &acked, &next, 1200, 10).await;

    // 2. Every link down for 60 s while events keep coming.
    for c in &clouds {
        c.proxy.handle().cut();
    }
    produce(&url, &acked, &next, 200, 60).await;
    for c in &clouds {
        c.proxy.handle().restore();
    }

    // 3. Killed while the backlog drains, and started again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = agent.kill();
    agent = start_agent(config.clone()).await;
    *url.write().unwrap() = agent.url();
    produce(&url, &acked, &next, 100, 5).await;

    let all: HashSet<String> = acked.lock().unwrap().iter().cloned().collect();
    let deadline = Instant::now() + Duration::from_secs(240);
    for c in &clouds {
        let want: HashSet<String> = if c.name == "aws-single" {
            all.iter().filter(|id| id[2..].parse::<u64>().unwrap() % 8 == 0).cloned().collect()
        } else {
            all.clone()
        };
        loop {
            let got = received(c);
            let missing = want.difference(&got).count();
            if missing == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: {missing} of {} acknowledged events never arrived; emulator: {:?}",
                c.name,
                want.len(),
                c.emulator.handle().counters()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let mut report = Vec::new();
    for c in &clouds {
        let h = c.emulator.handle();
        let counters = h.counters();
        assert_eq!(
            counters.violations(),
            0,
            "{}: the cloud saw violations: {:#?}\n{counters:?}",
            c.name,
            h.violations()
        );
        let events = received(c).len();
        report.push(format!(
            "{}: {events} events in {} publishes, {:.0} metered units per 1,000 events",
            c.name,
            counters.publishes_forwarded,
            counters.metered_units as f64 * 1000.0 / events as f64
        ));
    }
    eprintln!("{}", report.join("\n"));
    let (status, _) = agent.terminate();
    assert!(status.success());
}

/// Azure IoT Hub signs in with a SAS token from the device key; the agent
/// reconnects with a fresh one before each expires, without losing or
/// failing a publish: with 10-second tokens, 30 s of steady events take at
/// least three connections, and every event arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sas_token_is_renewed_before_it_expires_without_losing_a_publish() {
    let pki = ferry_harness::TestPki::generate().unwrap();
    let broker = Mosquitto::start(MosquittoOptions { tls: Some(pki.mosquitto_listener(false)), ..Default::default() })
        .await
        .unwrap();
    let tls_port: u16 = broker.tls_url().unwrap().rsplit(':').next().unwrap().parse().unwrap();
    // Counts the TLS connections, which it cannot read.
    let proxy = FaultProxy::start(([127, 0, 0, 1], tls_port).into()).await.unwrap();
    let collector = Collector::start(&broker.url(), "devices/#", Protocol::V311).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ferry.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\ndevice_id = \"gw-1\"\ndata_dir = {:?}\n[store]\nmin_free_disk = \"0 B\"\n[ingest.http]\nlisten = \"127.0.0.1:0\"\n\
             [[destination]]\nname = \"hub\"\nprofile = \"azure-iot-hub\"\nurl = \"mqtts://127.0.0.1:{}\"\nprotocol = \"v311\"\n\
             ca_file = {:?}\nsas_key = \"c2VjcmV0LWRldmljZS1rZXk=\"\nsas_token_lifetime = \"10s\"\n\
             backoff_base = \"100ms\"\nbackoff_cap = \"1s\"\n",
            dir.path().join("data").display().to_string(),
            proxy.port(),
            pki.ca_cert.display().to_string()
        ),
    )
    .unwrap();
    let agent = tokio::task::spawn_blocking(move || FerryProcess::start(ferry_bin!(), &config)).await.unwrap().unwrap();
    let url = Arc::new(std::sync::RwLock::new(agent.url()));
    let acked = Arc::new(std::sync::Mutex::new(Vec::new()));
    produce(&url, &acked, &AtomicU64::new(0), 20, 30).await;
    let want: HashSet<String> = acked.lock().unwrap().iter().cloned().collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got: HashSet<String> = collector.messages().iter().flat_map(|m| ids_in(m, Protocol::V311)).collect();
        if want.is_subset(&got) {
            break;
        }
        assert!(Instant::now() < deadline, "{} of {} events never arrived", want.difference(&got).count(), want.len());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let status: Value = reqwest::get(format!("{}/v1/status", agent.url())).await.unwrap().json().await.unwrap();
    let hub = &status["destinations"][0];
    assert!(proxy.handle().connections_accepted() >= 3, "renewed {} times", proxy.handle().connections_accepted());
    assert_eq!(hub["publish_errors"], 0, "a renewal lost a publish: {hub}");
    assert!(hub["last_error"].is_null(), "{hub}");
    assert!(collector.messages().iter().all(|m| m.topic.starts_with("devices/gw-1/messages/events/")));
    let (status, _) = agent.terminate();
    assert!(status.success());
}

/// A broker whose CONNACK says it keeps no retained messages (Event Grid's)
/// gets state updates unretained, even from a destination with no profile:
/// a retained publish there would cost the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn state_goes_unretained_to_a_broker_that_announces_no_retain() {
    let broker = Mosquitto::start(MosquittoOptions::default()).await.unwrap();
    let emulator = CloudEmulator::start(broker.addr(), CloudProfile::azure_event_grid()).await.unwrap();
    let collector = Collector::start(&broker.url(), "#", Protocol::V5).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ferry.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\ndevice_id = \"gw-1\"\ndata_dir = {:?}\n[store]\nmin_free_disk = \"0 B\"\n[ingest.http]\nlisten = \"127.0.0.1:0\"\n\
             [[destination]]\nname = \"eg\"\nurl = \"mqtt://{}\"\nprotocol = \"v5\"\nsubscribe = [\"desired/#\"]\n\
             backoff_base = \"100ms\"\nbackoff_cap = \"1s\"\n",
            dir.path().join("data").display().to_string(),
            emulator.addr()
        ),
    )
    .unwrap();
    let agent = tokio::task::spawn_blocking(move || FerryProcess::start(ferry_bin!(), &config)).await.unwrap().unwrap();
    let client = reqwest::Client::new();
    let r = client
        .put(format!("{}/v1/state/desired/speed", agent.url()))
        .header("content-type", "application/json")
        .body(r#"{"rpm":1200}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !collector.messages().iter().any(|m| m.payload_str().contains("1200")) {
        assert!(
            Instant::now() < deadline,
            "the state update never arrived: {:?} {:?}",
            emulator.handle().counters(),
            emulator.handle().violations()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let counters = emulator.handle().counters();
    assert_eq!(counters.violations(), 0, "{:?}", emulator.handle().violations());
    assert_eq!(counters.connections_accepted, 1, "the connection was never lost");
    let (status, _) = agent.terminate();
    assert!(status.success());
}
