//! The interop matrix: every broker implementation a user may put on the
//! other end (Mosquitto, rumqttd, NATS, RabbitMQ, aedes, amqtt, RMQTT), each
//! with every MQTT version it speaks, through the faults at-least-once lives
//! by. One test per broker, sharing one broker instance across its cells.
//!
//! Cells, each with its own agent (the real binary):
//! - `forward`: 10,000 events through a link cut by the fault proxy, an
//!   agent SIGKILL and a broker SIGKILL mid-window; every event arrives and
//!   duplicates stay within the in-flight window per fault.
//! - `unspoken`: an MQTT version the broker does not speak is a clear error
//!   in status, not a silent stall.
//! - `downlink`: state sync from a retained message, and from a message
//!   queued in the agent's persistent session while the agent was killed.
//! - `oversize`: one event over the broker's own message limit costs that
//!   event (dead-lettered, the error in status) and nothing after it.
//! - `tls`: delivery over the broker's TLS listener, checked against the
//!   harness CA.
//!
//! docs/interop.md has the table of what each broker does differently.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use ferry_harness::{
    Broker, BrokerOptions, Collector, FaultProxy, Implementation, Protocol, TestPki, TlsListener, mqtt,
};
use ferry_tests::FerryProcess;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(120);
/// Events per `forward` cell.
const EVENTS: usize = 10_000;
/// The agent's in-flight window in the `forward` cell.
const INFLIGHT: usize = 64;
/// The broker's own message limit, where it has one to set.
const BROKER_LIMIT: u32 = 32 * 1024;

fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::V311 => "v311",
        Protocol::V5 => "v5",
    }
}

/// A `[[destination]]` table for `cloud`.
fn destination(url: &str, protocol: Protocol, extra: &str) -> String {
    format!(
        "[[destination]]\nname = \"cloud\"\nurl = \"{url}\"\nprotocol = \"{}\"\nkeep_alive = \"5s\"\n\
         backoff_base = \"100ms\"\nbackoff_cap = \"1s\"\n{extra}\n",
        protocol_name(protocol)
    )
}

/// An agent on a fresh data dir with `destinations`; restartable on the same dir.
struct Agent {
    dir: tempfile::TempDir,
    process: Option<FerryProcess>,
    client: reqwest::Client,
}

impl Agent {
    async fn start(destinations: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        ferry_tests::write_config_with(dir.path(), "", destinations);
        let mut agent = Self { dir, process: None, client: reqwest::Client::new() };
        agent.restart().await;
        agent
    }

    /// SIGKILLs the agent if it runs, then starts it again on the same dir.
    async fn restart(&mut self) {
        if let Some(p) = self.process.take() {
            p.kill();
        }
        let config = self.dir.path().join("ferry.toml");
        let process = tokio::task::spawn_blocking(move || FerryProcess::start(ferry_tests::ferry_bin!(), &config))
            .await
            .unwrap()
            .unwrap();
        self.process = Some(process);
    }

    fn kill(&mut self) {
        if let Some(p) = self.process.take() {
            p.kill();
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.process.as_ref().expect("agent running").url())
    }

    async fn ingest(&self, events: &[Value]) {
        for chunk in events.chunks(1000) {
            let r = self.client.post(self.url("/v1/events")).json(chunk).send().await.unwrap();
            assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        }
    }

    async fn destination(&self) -> Value {
        let status: Value = self.client.get(self.url("/v1/status")).send().await.unwrap().json().await.unwrap();
        status["destinations"][0].clone()
    }

    async fn state(&self, key: &str) -> Option<Value> {
        let r = self.client.get(self.url(&format!("/v1/state/{key}"))).send().await.ok()?;
        if r.status() != 200 {
            return None;
        }
        r.json::<Value>().await.ok()
    }

    async fn wait_for(&self, what: &str, mut done: impl AsyncFnMut(&Self) -> bool) {
        let start = Instant::now();
        while !done(self).await {
            assert!(start.elapsed() < WAIT, "timed out waiting for {what}; destination: {}", self.destination().await);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Numbered events `{prefix}-{i}` on `topic`.
fn events(topic: &str, prefix: &str, n: usize) -> (Vec<String>, Vec<Value>) {
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    let body = ids.iter().map(|id| json!({"topic": topic, "id": id, "data": {"id": id}})).collect();
    (ids, body)
}

/// Event ids a collector received (from the MQTT 5 user property or the
/// 3.1.1 envelope), and how many arrived more than once.
fn ids_of(c: &Collector, protocol: Protocol, prefix: &str) -> (HashSet<String>, usize) {
    let mut ids = HashSet::new();
    let mut dups = 0;
    for m in c.messages().into_iter().filter(|m| m.topic.starts_with("ferry/test-device/telemetry/")) {
        let id = match protocol {
            Protocol::V5 => m.user_property("id").map(str::to_owned),
            Protocol::V311 => {
                serde_json::from_slice::<Value>(&m.payload).ok().and_then(|v| v["id"].as_str().map(str::to_owned))
            }
        };
        let Some(id) = id.filter(|id| id.starts_with(prefix)) else { continue };
        if !ids.insert(id) {
            dups += 1;
        }
    }
    (ids, dups)
}

async fn wait_for_ids(c: &Collector, protocol: Protocol, prefix: &str, want: &[String], cell: &str) -> usize {
    let start = Instant::now();
    loop {
        let (got, dups) = ids_of(c, protocol, prefix);
        if want.iter().all(|id| got.contains(id)) {
            return dups;
        }
        assert!(
            start.elapsed() < WAIT,
            "{cell}: only {} of {} events arrived; first missing: {:?}",
            want.iter().filter(|id| got.contains(*id)).count(),
            want.len(),
            want.iter().find(|id| !got.contains(*id))
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the collector has received at least `n` messages.
async fn wait_for_count(c: &Collector, n: usize, cell: &str) {
    let start = Instant::now();
    while c.len() < n {
        assert!(start.elapsed() < WAIT, "{cell}: forwarding stalled at {} of {n}", c.len());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// 10,000 events through a link cut, an agent SIGKILL and a broker SIGKILL.
async fn forward(broker: &mut Broker, protocol: Protocol) {
    let cell = format!("{}/{}/forward", broker.implementation().name(), protocol_name(protocol));
    let collector = Collector::start(&broker.url(protocol), "ferry/#", protocol).await.unwrap();
    let proxy = FaultProxy::start(broker.addr(protocol)).await.unwrap();
    // Held shut until the whole backlog is stored, so every fault lands mid-stream.
    proxy.handle().cut();
    let extra = format!("inflight = {INFLIGHT}");
    let mut agent = Agent::start(&destination(&proxy.url(), protocol, &extra)).await;
    let (ids, body) = events("telemetry/t", "fw", EVENTS);
    agent.ingest(&body).await;
    proxy.handle().restore();

    wait_for_count(&collector, EVENTS / 5, &cell).await;
    proxy.handle().cut();
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.handle().restore();

    wait_for_count(&collector, EVENTS * 2 / 5, &cell).await;
    agent.restart().await;

    wait_for_count(&collector, EVENTS * 3 / 5, &cell).await;
    assert!(collector.len() < EVENTS, "{cell}: forwarding finished before the broker kill; nothing was tested");
    let probe = broker.url(Protocol::V311);
    let topic = "ferry/test-device/probe";
    ferry_harness::kill_mid_window(broker, &proxy, &collector, &probe, topic, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{cell}: {e:#}\n{}", broker.log()));
    proxy.handle().restore();

    let dups = wait_for_ids(&collector, protocol, "fw-", &ids, &cell).await;
    eprintln!("{cell}: {EVENTS} events, {dups} duplicates after 3 faults");
    assert!(dups <= 4 * INFLIGHT, "{cell}: {dups} duplicates exceed 4 × the in-flight window of {INFLIGHT}");
    let d = agent.destination().await;
    assert_eq!(d["dead_lettered"], 0, "{cell}: {d}");
    agent.kill();
}

/// A version the broker does not speak: a clear error in status.
async fn unspoken(broker: &Broker, protocol: Protocol, spoken: Protocol) {
    let cell = format!("{}/{}/unspoken", broker.implementation().name(), protocol_name(protocol));
    let agent = Agent::start(&destination(&broker.url(spoken), protocol, "")).await;
    agent.wait_for("an error in status", async |a| !a.destination().await["last_error"].is_null()).await;
    let d = agent.destination().await;
    eprintln!("{cell}: {}", d["last_error"]);
    let error = d["last_error"].as_str().unwrap();
    assert!(error.contains("no CONNACK") && error.contains("does it speak MQTT"), "{cell}: {error}");
    assert_eq!(d["connected"], false, "{cell}: {d}");
    assert_eq!(d["acked_sequence"], 0, "{cell}: {d}");
}

/// State sync from a retained message, then from a message queued in the
/// agent's persistent session while the agent was killed.
async fn downlink(broker: &Broker, protocol: Protocol) {
    let cell = format!("{}/{}/downlink", broker.implementation().name(), protocol_name(protocol));
    let url = broker.url(Protocol::V311);
    mqtt::publish_retained_v311(&url, "ferry/test-device/desired/fan", br#"{"speed":1}"#.to_vec(), WAIT).await.unwrap();
    // RabbitMQ sends retained messages only to subscriptions without
    // wildcards (https://www.rabbitmq.com/docs/mqtt#retained): a user there
    // subscribes to each state topic by name.
    let filters = match broker.implementation() {
        Implementation::RabbitMq => "[\"desired/fan\", \"desired/mode\"]",
        _ => "[\"desired/#\"]",
    };
    // A client id of its own: amqtt 0.12 keeps the clean-session flag of a
    // client id's first connection (the `forward` cell's), and drops a later
    // persistent session of that id a second after it disconnects.
    let extra = format!(
        "client_id = \"gw-downlink-{}\"\nroutes = [\"telemetry/#\"]\nsubscribe = {filters}",
        protocol_name(protocol)
    );
    let mut agent = Agent::start(&destination(&broker.url(protocol), protocol, &extra)).await;
    agent
        .wait_for(&format!("{cell}: the retained value"), async |a| {
            a.state("desired/fan").await.is_some_and(|s| s["value"] == json!({"speed": 1}))
        })
        .await;
    agent.kill();
    // Not retained: only the agent's session can hold it.
    mqtt::publish_v311(&url, "ferry/test-device/desired/mode", br#""eco""#.to_vec(), WAIT).await.unwrap();
    agent.restart().await;
    agent
        .wait_for(&format!("{cell}: the value queued in the persistent session"), async |a| {
            a.state("desired/mode").await.is_some_and(|s| s["value"] == json!("eco"))
        })
        .await;
    agent.kill();
}

/// One event over the broker's limit costs that event and nothing after it:
/// refused at ingest when the broker announced its limit (MQTT 5), else
/// dead-lettered for this destination once the broker has refused it.
async fn oversize(broker: &Broker, protocol: Protocol) {
    let cell = format!("{}/{}/oversize", broker.implementation().name(), protocol_name(protocol));
    let collector = Collector::start(&broker.url(protocol), "ferry/#", protocol).await.unwrap();
    // A broker that drops the publish silently is found by the ack watchdog
    // (2 × keep-alive) three times over.
    let mut agent = Agent::start(&destination(&broker.url(protocol), protocol, "")).await;
    agent.wait_for("the session", async |a| a.destination().await["connected"] == true).await;
    let big =
        json!([{"topic": "telemetry/t", "id": "ov-big", "data": {"blob": "x".repeat(BROKER_LIMIT as usize + 8192)}}]);
    let r = agent.client.post(agent.url("/v1/events")).json(&big).send().await.unwrap();
    let refused_at_ingest = match r.status().as_u16() {
        200 => false,
        413 => {
            let answer = r.text().await.unwrap();
            assert!(answer.contains("Maximum Packet Size"), "{cell}: {answer}");
            eprintln!("{cell}: refused at ingest: {answer}");
            true
        }
        other => panic!("{cell}: {other} {}", r.text().await.unwrap()),
    };
    let (ids, small) = events("telemetry/t", "sm", 20);
    agent.ingest(&small).await;
    wait_for_ids(&collector, protocol, "sm-", &ids, &cell).await;
    let (got, _) = ids_of(&collector, protocol, "ov-");
    assert!(got.is_empty(), "{cell}: the broker took an event over its limit");
    if !refused_at_ingest {
        agent.wait_for("the event to be dead-lettered", async |a| a.destination().await["dead_lettered"] == 1).await;
        let list: Value = agent.client.get(agent.url("/v1/dead-letters")).send().await.unwrap().json().await.unwrap();
        let letter = &list["dead_letters"][0];
        assert_eq!(letter["id"], "ov-big", "{cell}: {list}");
        assert_eq!(letter["destination"], "cloud", "{cell}: {list}");
        let reason = letter["reason"].as_str().unwrap();
        assert!(reason.contains("3 times in a row with only this publish outstanding"), "{cell}: {reason}");
        eprintln!("{cell}: dead-lettered: {reason}");
    }
    agent.kill();
}

/// Delivery over the broker's TLS listener, checked against the harness CA.
async fn tls(broker: &Broker, pki: &TestPki, protocol: Protocol) {
    let cell = format!("{}/{}/tls", broker.implementation().name(), protocol_name(protocol));
    let url = broker.tls_url().expect("a TLS listener");
    let client_tls = ferry_harness::tls::client_config(&pki.ca_cert, None).unwrap();
    let collector = Collector::start_with_tls(&url, "ferry/#", protocol, Some(client_tls)).await.unwrap();
    let extra = format!("ca_file = {:?}", pki.ca_cert.display().to_string());
    let agent = Agent::start(&destination(&url, protocol, &extra)).await;
    let (ids, body) = events("telemetry/t", "tls", 300);
    agent.ingest(&body).await;
    wait_for_ids(&collector, protocol, "tls-", &ids, &cell).await;
    drop(agent);
}

fn tls_listener(pki: &TestPki) -> TlsListener {
    TlsListener {
        ca: pki.ca_cert.clone(),
        cert: pki.server_cert.clone(),
        key: pki.server_key.clone(),
        require_certificate: false,
    }
}

/// Every cell for one broker implementation.
async fn matrix(implementation: Implementation) {
    let pki = TestPki::generate().unwrap();
    let separate_tls = implementation == Implementation::Nats;
    let opts = BrokerOptions {
        tls: (implementation.tls() && !separate_tls).then(|| tls_listener(&pki)),
        max_message_size: implementation.limits_messages().then_some(BROKER_LIMIT),
    };
    let mut broker =
        Broker::start(implementation, opts).await.unwrap_or_else(|e| panic!("{}: {e:#}", implementation.name()));
    let spoken = implementation.protocols();
    for &protocol in spoken {
        forward(&mut broker, protocol).await;
        downlink(&broker, protocol).await;
        if implementation.limits_messages() {
            oversize(&broker, protocol).await;
        }
    }
    for protocol in [Protocol::V311, Protocol::V5] {
        if !spoken.contains(&protocol) {
            unspoken(&broker, protocol, spoken[0]).await;
        }
    }
    if separate_tls {
        drop(broker);
        let opts = BrokerOptions { tls: Some(tls_listener(&pki)), max_message_size: None };
        broker = Broker::start(implementation, opts).await.unwrap();
    }
    if implementation.tls() {
        for &protocol in spoken {
            tls(&broker, &pki, protocol).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mosquitto() {
    matrix(Implementation::Mosquitto).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rumqttd() {
    matrix(Implementation::Rumqttd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats() {
    matrix(Implementation::Nats).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq() {
    matrix(Implementation::RabbitMq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn aedes() {
    matrix(Implementation::Aedes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn amqtt() {
    matrix(Implementation::Amqtt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rmqtt() {
    matrix(Implementation::Rmqtt).await;
}
