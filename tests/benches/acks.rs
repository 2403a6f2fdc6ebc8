//! Latency of an ingest answer at each acknowledgment level (`stored`,
//! `any`, `all`) to two local Mosquitto brokers at a steady 1,000 events/s,
//! in one run, with the ceilings its target is stated in measured in the same
//! run: a broker round trip (a bare rumqttc QoS 1 publish to its PUBACK) and
//! a cursor commit (the store committing a cursor move).
//!
//! Then ingest throughput with `store.retain_delivered` off and on: HTTP
//! batches from several producers as fast as the agent answers, forwarded
//! live to the same two brokers, in alternating rounds.
//!
//! Targets (the receipts issue): `ack=all` adds at most one broker round trip
//! plus one cursor commit over `ack=stored` at p50; `retain_delivered` costs
//! at most 10% of ingest throughput.
//!
//! Run: `cargo bench -p ferry-tests --bench acks`. `FERRY_BENCH_SECS` sets
//! the seconds per level and per throughput round (default 10).

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry::clock::SystemClock;
use ferry::config::Config;
use ferry::runtime::Agent;
use ferry_harness::rumqttc::v5::mqttbytes::v5::Packet;
use ferry_harness::rumqttc::v5::{AsyncClient, Event as MqttEvent, MqttOptions, mqttbytes::QoS};
use ferry_harness::{Mosquitto, MosquittoOptions};

/// Requests per second, each one event.
const RATE: u64 = 1000;

/// Concurrent producers in the throughput rounds.
const PRODUCERS: usize = 8;

fn main() {
    let secs: u64 = std::env::var("FERRY_BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let brokers = [
            Mosquitto::start(MosquittoOptions::default()).await.unwrap(),
            Mosquitto::start(MosquittoOptions::default()).await.unwrap(),
        ];
        let rtt = round_trips(&brokers[0], 1000).await;
        let (_dir, agent) = start_agent(&brokers, "", "ack_timeout = \"30s\"\n").await;
        let commit = cursor_commits(&agent, 500).await;
        println!("ceiling: broker round trip (bare QoS 1 publish to PUBACK) p50 {:.2} ms, p99 {:.2} ms", rtt.0, rtt.1);
        println!("ceiling: cursor commit p50 {:.2} ms, p99 {:.2} ms", commit.0, commit.1);
        let url = format!("http://{}/v1/events", agent.http_addr());
        let mut p50 = Vec::new();
        for level in ["stored", "any", "all"] {
            let (lat, n, slow) = answers(&url, level, Duration::from_secs(secs)).await;
            println!(
                "ack={level:<6} {n} answers at {RATE}/s: p50 {:.2} ms, p99 {:.2} ms, {slow} over 1 s",
                lat.0, lat.1
            );
            p50.push(lat.0);
        }
        let added = p50[2] - p50[0];
        let bound = rtt.0 + commit.0;
        println!(
            "ack=all adds {added:.2} ms at p50 over ack=stored = {:.2} x (one round trip + one cursor commit = {bound:.2} ms; target <= 1.0)",
            added / bound
        );
        agent.shutdown().await.unwrap();

        let mut rates = [Vec::new(), Vec::new()];
        for round in 0..6 {
            let retain = round % 2 == 1;
            let rate = ingest_rate(&brokers, retain, Duration::from_secs(secs)).await;
            println!("ingest, retain_delivered {}: {rate:.0} events/s", if retain { "on " } else { "off" });
            rates[usize::from(retain)].push(rate);
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (off, on) = (median(&mut rates[0]), median(&mut rates[1]));
        println!(
            "retain_delivered on: median {on:.0} events/s = {:.3} x off (median {off:.0} events/s; target >= 0.90)",
            on / off
        );
    });
}

/// Events per second the agent accepts over HTTP (batches of 100 from
/// [`PRODUCERS`] producers) for `length`, while forwarding to `brokers`,
/// with `store.retain_delivered` on or off.
async fn ingest_rate(brokers: &[Mosquitto], retain: bool, length: Duration) -> f64 {
    let keep = if retain { "retain_delivered = { age = \"1h\", share = \"50%\" }\n" } else { "" };
    let (_dir, agent) = start_agent(brokers, keep, "").await;
    let url = format!("http://{}/v1/events", agent.http_addr());
    let body: String = {
        let events: Vec<String> = (0..100)
            .map(|i| format!(r#"{{"topic":"bench/retain/{}","data":{{"v":"{}"}}}}"#, i % 8, "x".repeat(200)))
            .collect();
        format!("[{}]", events.join(","))
    };
    let started = Instant::now();
    let mut producers = tokio::task::JoinSet::new();
    for _ in 0..PRODUCERS {
        let (client, url, body) = (reqwest::Client::new(), url.clone(), body.clone());
        producers.spawn(async move {
            let mut accepted = 0u64;
            while started.elapsed() < length {
                let r = client.post(&url).body(body.clone()).send().await.unwrap();
                assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap_or_default());
                accepted += 100;
            }
            accepted
        });
    }
    let mut accepted = 0;
    while let Some(n) = producers.join_next().await {
        accepted += n.unwrap();
    }
    let rate = accepted as f64 / started.elapsed().as_secs_f64();
    let kept = agent.store().status(0).unwrap().counters.retained_events;
    assert_eq!(retain, kept > 0, "retained {kept} events with retain_delivered {retain}");
    agent.shutdown().await.unwrap();
    rate
}

/// An agent forwarding to `brokers`, with `store` and `http` added to its
/// `[store]` and `[ingest.http]` tables; its data directory goes with it.
async fn start_agent(brokers: &[Mosquitto], store: &str, http: &str) -> (tempfile::TempDir, Agent) {
    let dir = tempfile::tempdir().unwrap();
    let destinations: String = brokers
        .iter()
        .enumerate()
        .map(|(i, b)| format!("[[destination]]\nname = \"cloud-{i}\"\nurl = \"{}\"\n\n", b.url()))
        .collect();
    let toml = format!(
        "[agent]\ndevice_id = \"bench\"\ndata_dir = {:?}\n[store]\nmin_free_disk = \"0 B\"\n{store}\
         [ingest.http]\nlisten = \"127.0.0.1:0\"\n{http}{destinations}",
        dir.path().display().to_string()
    );
    let agent = Agent::start(Config::parse(&toml, "bench.toml").unwrap(), Arc::new(SystemClock)).await.unwrap();
    (dir, agent)
}

/// p50 and p99 of `samples`, in ms.
fn percentiles(mut samples: Vec<f64>) -> (f64, f64) {
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99))
}

/// Latency of one QoS 1 publish to its PUBACK, one at a time.
async fn round_trips(broker: &Mosquitto, n: usize) -> (f64, f64) {
    let mut opts = MqttOptions::new("bench-rtt", "127.0.0.1", broker.port());
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(opts, 16);
    let mut samples = Vec::with_capacity(n);
    loop {
        if let Ok(MqttEvent::Incoming(Packet::ConnAck(_))) = eventloop.poll().await {
            break;
        }
    }
    for _ in 0..n {
        let started = Instant::now();
        client.publish("bench/rtt", QoS::AtLeastOnce, false, vec![b'x'; 256]).await.unwrap();
        loop {
            if let MqttEvent::Incoming(Packet::PubAck(_)) = eventloop.poll().await.unwrap() {
                break;
            }
        }
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    percentiles(samples)
}

/// Latency of the store committing a cursor move, one at a time.
async fn cursor_commits(agent: &Agent, n: u64) -> (f64, f64) {
    let mut samples = Vec::new();
    for seq in 1..=n {
        let started = Instant::now();
        agent.store().set_cursor("bench-probe", seq).await.unwrap();
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    percentiles(samples)
}

/// One-event requests at [`RATE`] per second for `length`, each asking for
/// `level`: p50 and p99 of the answers' latency, how many there were, and
/// how many took over a second.
async fn answers(url: &str, level: &str, length: Duration) -> ((f64, f64), usize, usize) {
    let client = reqwest::Client::new();
    let url = format!("{url}?ack={level}");
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut requests = tokio::task::JoinSet::new();
    let started = Instant::now();
    let mut i = 0u64;
    while started.elapsed() < length {
        tick.tick().await;
        i += 1;
        let (client, url) = (client.clone(), url.clone());
        let body = format!(r#"{{"topic":"bench/{level}","data":{{"n":{i},"v":"{}"}}}}"#, "x".repeat(200));
        requests.spawn(async move {
            let sent = Instant::now();
            let r = client.post(url).body(body).send().await.unwrap();
            assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap_or_default());
            sent.elapsed().as_secs_f64() * 1000.0
        });
    }
    let mut samples = Vec::new();
    while let Some(r) = requests.join_next().await {
        samples.push(r.unwrap());
    }
    let slow = samples.iter().filter(|&&ms| ms > 1000.0).count();
    let n = samples.len();
    (percentiles(samples), n, slow)
}
