//! Forwarding throughput against real Mosquitto brokers, with the ceiling
//! measured in the same run: a bare rumqttc client publishing QoS 1 with the
//! same in-flight window to the same broker.
//!
//! Run: `cargo bench -p ferry-tests --bench forward`. `FERRY_BENCH_EVENTS`
//! sets the backlog for the rate rows (default 200000) and
//! `FERRY_BENCH_DRAIN` the outage backlog (default 1000000).
//!
//! The last row replays a delivered backlog (kept by
//! `store.retain_delivered`) to one broker and compares its rate with the
//! first delivery of the same events in the same run: a replay goes at the
//! destination's full rate (target: at least 0.9 × the first delivery).

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry::clock::{Hlc, SystemClock};
use ferry::config::{Config, StoreConfig};
use ferry::event::{Event, EventBody};
use ferry::runtime::Agent;
use ferry::store::{Dedup, PreparedEvent, Store};
use ferry_harness::rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use ferry_harness::rumqttc::v5::{AsyncClient, Event as MqttEvent, MqttOptions, mqttbytes::QoS};
use ferry_harness::{Mosquitto, MosquittoOptions};

const INFLIGHT: u16 = 256;
const PAYLOAD: usize = 256;

fn main() {
    let events: usize = std::env::var("FERRY_BENCH_EVENTS").ok().and_then(|s| s.parse().ok()).unwrap_or(200_000);
    let drain: usize = std::env::var("FERRY_BENCH_DRAIN").ok().and_then(|s| s.parse().ok()).unwrap_or(1_000_000);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let brokers = [
            Mosquitto::start(MosquittoOptions::default()).await.unwrap(),
            Mosquitto::start(MosquittoOptions::default()).await.unwrap(),
            Mosquitto::start(MosquittoOptions::default()).await.unwrap(),
        ];
        let plain = bare_client_rate(&brokers[0], events, false).await;
        println!("ceiling A: bare rumqttc QoS 1, window {INFLIGHT}, {PAYLOAD}-byte payloads, no properties: {plain:.0} msg/s");
        let ceiling = bare_client_rate(&brokers[0], events, true).await;
        println!("ceiling B: bare rumqttc QoS 1, window {INFLIGHT}, the same CloudEvents messages Ferry sends: {ceiling:.0} msg/s");

        let one = drain_rate(&brokers[..1], events).await;
        println!(
            "ferry -> 1 broker : {one:.0} events/s = {:.2} x ceiling B (target >= 0.8), {:.2} x ceiling A",
            one / ceiling,
            one / plain
        );
        let three = drain_rate(&brokers, events).await;
        println!("ferry -> 3 brokers: {three:.0} events/s per broker ({:.0} publishes/s total) = {:.2} x ceiling", three * 3.0, three / ceiling);
        let rate = drain_rate(&brokers[..2], drain).await;
        let secs = drain as f64 / rate;
        println!("drain of a {drain}-event backlog to 2 brokers: {secs:.1} s ({rate:.0} events/s per broker; target <= 60 s)");
        let (first, again) = replay_rate(&brokers[0], events).await;
        println!(
            "replay of {events} delivered events to 1 broker: {again:.0} events/s = {:.2} x their first delivery ({first:.0} events/s; target >= 0.9)",
            again / first
        );
    });
}

/// A 256-byte-data event as Ferry stores it.
fn sample_event(i: usize) -> EventBody {
    ferry_tests::workload::stored_event_body(i, PAYLOAD)
}

/// QoS 1 publishes acknowledged per second by `broker` for a bare client,
/// sending either plain payloads or Ferry's exact CloudEvents messages.
async fn bare_client_rate(broker: &Mosquitto, n: usize, cloudevents: bool) -> f64 {
    let mut opts = MqttOptions::new("bench-ceiling", "127.0.0.1", broker.port());
    opts.set_outgoing_inflight_upper_limit(INFLIGHT)
        .set_request_channel_capacity(INFLIGHT as usize * 2)
        .set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(opts, INFLIGHT as usize * 2);
    let payload = vec![b'x'; PAYLOAD];
    let publisher = tokio::spawn(async move {
        for i in 0..n {
            let topic = format!("ferry/bench/bench/t{}", i % 8);
            if cloudevents {
                let event = Event {
                    sequence: i as u64 + 1,
                    hlc: Hlc(i as u64),
                    expires_at_ms: None,
                    priority: 100,
                    body: sample_event(i),
                };
                let m = ferry::wire::into_binary(event);
                let props = PublishProperties {
                    content_type: m.content_type,
                    user_properties: m.user_properties,
                    ..Default::default()
                };
                client.publish_with_properties(topic, QoS::AtLeastOnce, false, m.payload, props).await.unwrap();
            } else {
                client.publish(topic, QoS::AtLeastOnce, false, payload.clone()).await.unwrap();
            }
        }
        client
    });
    let mut acked = 0;
    let mut start = None;
    while acked < n {
        match eventloop.poll().await.unwrap() {
            MqttEvent::Incoming(Packet::ConnAck(_)) => start = Some(Instant::now()),
            MqttEvent::Incoming(Packet::PubAck(_)) => acked += 1,
            _ => {}
        }
    }
    let elapsed = start.unwrap().elapsed().as_secs_f64();
    drop(publisher.await.unwrap());
    n as f64 / elapsed
}

/// Fills a store with `n` events while no destination exists, then starts
/// the agent with one destination per broker and times until every cursor
/// reaches the end. Returns events per second per destination.
async fn drain_rate(brokers: &[Mosquitto], n: usize) -> f64 {
    let dir = filled_store(n).await;
    let config = drain_config(&dir, brokers, "");
    let start = Instant::now();
    let agent = Agent::start(config, Arc::new(SystemClock)).await.unwrap();
    wait_acked(&agent, n as u64).await;
    let elapsed = start.elapsed().as_secs_f64();
    agent.shutdown().await.unwrap();
    n as f64 / elapsed
}

/// Delivers `n` stored events to `broker` with delivered events kept, then
/// replays them all: events per second of the first delivery, and of the replay.
async fn replay_rate(broker: &Mosquitto, n: usize) -> (f64, f64) {
    let dir = filled_store(n).await;
    let config =
        drain_config(&dir, std::slice::from_ref(broker), "retain_delivered = { age = \"1h\", share = \"100%\" }\n");
    let start = Instant::now();
    let agent = Agent::start(config, Arc::new(SystemClock)).await.unwrap();
    wait_acked(&agent, n as u64).await;
    let first = n as f64 / start.elapsed().as_secs_f64();
    while agent.store().status(0).unwrap().counters.retained_events < n as u64 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let url = format!("http://{}/v1/destinations/d0/replay", agent.http_addr());
    let start = Instant::now();
    let r = reqwest::Client::new().post(url).body(r#"{"from": 1}"#).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap_or_default());
    loop {
        let d = &agent.destinations()[0];
        if d.replay.is_none() && d.acked_sequence >= n as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let again = n as f64 / start.elapsed().as_secs_f64();
    agent.shutdown().await.unwrap();
    (first, again)
}

/// Waits until every destination of `agent` has acknowledged sequence `n`.
async fn wait_acked(agent: &Agent, n: u64) {
    while !agent.destinations().iter().all(|d| d.acked_sequence >= n) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The config of an agent on `dir` with one destination per broker, and
/// `store` added to its `[store]` table.
fn drain_config(dir: &tempfile::TempDir, brokers: &[Mosquitto], store: &str) -> Config {
    let mut toml = format!(
        "[agent]\ndevice_id = \"bench\"\ndata_dir = {:?}\n[store]\nquota = \"16 GiB\"\n{store}[ingest.http]\nlisten = \"127.0.0.1:0\"\n",
        dir.path().display().to_string()
    );
    for (i, b) in brokers.iter().enumerate() {
        toml.push_str(&format!("[[destination]]\nname = \"d{i}\"\nurl = \"{}\"\ninflight = {INFLIGHT}\n", b.url()));
    }
    Config::parse(&toml, "bench").unwrap()
}

/// A store of `n` events that no destination has had yet.
async fn filled_store(n: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir_in(std::env::current_dir().unwrap()).unwrap();
    let clock: Arc<SystemClock> = Arc::new(SystemClock);
    let store = Store::open(StoreConfig::at(dir.path().join("ferry.redb")), clock.clone()).unwrap();
    for start in (0..n).step_by(10_000) {
        let batch = (start..(start + 10_000).min(n))
            .map(|i| PreparedEvent::new(&sample_event(i), Dedup::None, 100, None))
            .collect();
        store.append(batch).await.unwrap();
    }
    store.close();
    drop(store);
    dir
}
