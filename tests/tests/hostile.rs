//! Nothing a producer, a disk, a broker or an HTTP client does may stall or
//! kill the agent: each probe of the "nothing stalls it" issue, against the
//! real binary or the in-process agent and real Mosquitto brokers. A bad
//! event costs that event, a full disk or a damaged record costs what it
//! touches, a slow client costs its own connection; the agent keeps serving
//! and heals without a restart where the cause goes away.

use std::collections::HashSet;
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry::clock::SystemClock;
use ferry::config::{Config, StoreConfig};
use ferry::downlink::DestinationDownlink;
use ferry::event::EventBody;
use ferry::forward::Forwarder;
use ferry::forward::stage::Stage;
use ferry::ingest::Ingest;
use ferry::ingest::mqtt::MqttIngest;
use ferry::runtime::Agent;
use ferry::store::faults::IoFaults;
use ferry::store::{Dedup, PreparedEvent, Store};
use ferry_harness::{Collector, Mosquitto, MosquittoOptions, Protocol};
use ferry_tests::{FerryProcess, ferry_bin, write_config_with};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

fn destination(name: &str, url: &str, protocol: &str, extra: &str) -> String {
    format!(
        "[[destination]]\nname = \"{name}\"\nurl = \"{url}\"\nprotocol = \"{protocol}\"\nkeep_alive = \"5s\"\n\
         backoff_base = \"50ms\"\nbackoff_cap = \"200ms\"\n{extra}\n"
    )
}

fn agent_toml(dir: &Path, tail: &str) -> String {
    format!(
        "[agent]\ndevice_id = \"gw-1\"\ndata_dir = {:?}\n[store]\nmin_free_disk = \"0 B\"\n[ingest.http]\nlisten = \"127.0.0.1:0\"\n{tail}",
        dir.display().to_string()
    )
}

async fn start_agent(dir: &Path, tail: &str) -> Agent {
    Agent::start(Config::parse(&agent_toml(dir, tail), "test.toml").unwrap(), Arc::new(SystemClock)).await.unwrap()
}

async fn wait_until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !done().await {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The ids a collector received, in arrival order.
fn ids(c: &Collector, protocol: Protocol) -> Vec<String> {
    c.messages()
        .iter()
        .map(|m| match protocol {
            Protocol::V5 => m.user_property("id").unwrap_or_default().to_owned(),
            Protocol::V311 => serde_json::from_slice::<Value>(&m.payload).unwrap()["id"].as_str().unwrap().to_owned(),
        })
        .collect()
}

async fn wait_for_ids(c: &Collector, protocol: Protocol, want: &[&str]) {
    wait_until(&format!("ids {want:?}"), async || {
        let got: HashSet<String> = ids(c, protocol).into_iter().collect();
        want.iter().all(|w| got.contains(*w))
    })
    .await;
}

async fn post(base: &str, body: &Value) -> (u16, Value) {
    let r = reqwest::Client::new().post(format!("{base}/v1/events")).json(body).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attributes_a_broker_would_refuse_are_refused_at_ingest_naming_the_field_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(dir.path(), "").await;
    let base = format!("http://{}", agent.http_addr());
    let cases = [
        (json!({"topic": "p/a", "data": 1, "id": "nul\u{0}id"}), "id"),
        (json!({"topic": "p/a", "data": 1, "key": "k\u{1b}"}), "key"),
        (json!({"topic": "p/a", "data": 1, "type": "t\u{ffff}"}), "type"),
        (json!({"topic": "p/\u{fdd0}", "data": 1}), "topic"),
        (json!({"topic": "p/a", "data": 1, "extensions": {"source": "ferry://other-device"}}), "extensions.source"),
        (
            json!({"specversion": "1.0", "id": "1", "source": "s", "type": "t", "subject": "a", "data": 1, "ferryroute": "x"}),
            "ferryroute",
        ),
    ];
    for (body, field) in cases {
        let (status, answer) = post(&base, &json!([{"topic": "p/ok", "data": 0}, body])).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["field"], field, "{body}: {answer}");
        assert_eq!(answer["index"], 1, "{answer}");
    }
    let status = agent.store().status(0).unwrap();
    assert_eq!(status.last_sequence, 0, "a refused request stores nothing, not even its valid events");
    agent.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_over_a_routed_destinations_packet_limit_is_refused_at_ingest_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let dests = [
        destination("small", "mqtt://127.0.0.1:1", "v5", "max_packet_size = \"2 KiB\"\nroutes = [\"small/#\"]"),
        destination("big", "mqtt://127.0.0.1:1", "v311", "routes = [\"#\"]"),
    ]
    .concat();
    let agent = start_agent(dir.path(), &dests).await;
    let base = format!("http://{}", agent.http_addr());
    let pad = "x".repeat(4000);
    let (status, answer) = post(&base, &json!({"topic": "small/a", "data": pad})).await;
    assert_eq!(status, 413, "{answer}");
    let error = answer["error"].as_str().unwrap();
    assert!(error.contains("destination small") && error.contains("2048"), "{error}");
    // The same event on a topic `small` does not route is only `big`'s business.
    let (status, answer) = post(&base, &json!({"topic": "other/a", "data": pad})).await;
    assert_eq!(status, 200, "{answer}");
    agent.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_the_broker_refuses_after_acceptance_is_dead_lettered_for_it_and_the_rest_go_on() {
    // Mosquitto takes 1 KiB packets; Ferry was told nothing of it, and MQTT
    // 3.1.1 has no CONNACK to say so: the broker just drops the connection.
    let strict =
        Mosquitto::start(MosquittoOptions { max_packet_size: Some(1024), ..Default::default() }).await.unwrap();
    let other = Mosquitto::start(MosquittoOptions::default()).await.unwrap();
    let (cs, co) = (
        Collector::start(&strict.url(), "ferry/#", Protocol::V311).await.unwrap(),
        Collector::start(&other.url(), "ferry/#", Protocol::V311).await.unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let dests =
        [destination("strict", &strict.url(), "v311", ""), destination("other", &other.url(), "v311", "")].concat();
    let agent = start_agent(dir.path(), &dests).await;
    let base = format!("http://{}", agent.http_addr());
    let body = json!([
        {"topic": "t", "id": "before", "data": 1},
        {"topic": "t", "id": "huge", "data": "x".repeat(2000)},
        {"topic": "t", "id": "after", "data": 2}
    ]);
    assert_eq!(post(&base, &body).await.0, 200);
    for i in 0..20 {
        assert_eq!(post(&base, &json!({"topic": "t", "id": format!("later-{i}"), "data": i})).await.0, 200);
    }
    let later: Vec<String> = (0..20).map(|i| format!("later-{i}")).collect();
    let mut want: Vec<&str> = vec!["before", "after"];
    want.extend(later.iter().map(String::as_str));
    wait_for_ids(&cs, Protocol::V311, &want).await;
    want.push("huge");
    wait_for_ids(&co, Protocol::V311, &want).await;
    assert!(!ids(&cs, Protocol::V311).contains(&"huge".to_owned()));
    let dead = agent.store().dead_letters(0, 10).unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].destination.as_deref(), Some("strict"));
    assert!(dead[0].reason.contains("dropped the connection"), "{}", dead[0].reason);
    assert_eq!(dead[0].event().unwrap().body.id, "huge");
    let strict_status = agent.destinations().into_iter().find(|d| d.name == "strict").unwrap();
    assert_eq!(strict_status.dead_lettered, 1);
    agent.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_packet_limit_an_mqtt5_broker_announces_is_learnt_and_what_it_rules_out_is_dead_lettered() {
    let mut broker =
        Mosquitto::start(MosquittoOptions { max_packet_size: Some(1024), ..Default::default() }).await.unwrap();
    broker.stop().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(dir.path(), &destination("cloud", &broker.url(), "v5", "")).await;
    let base = format!("http://{}", agent.http_addr());
    // Accepted while the broker is away: its limit is not known yet.
    let body = json!([
        {"topic": "t", "id": "a", "data": 1},
        {"topic": "t", "id": "big", "data": "x".repeat(2000)},
        {"topic": "t", "id": "b", "data": 2}
    ]);
    assert_eq!(post(&base, &body).await.0, 200);
    broker.restart().await.unwrap();
    let c = Collector::start(&broker.url(), "ferry/#", Protocol::V5).await.unwrap();
    // The collector subscribed after the agent may have delivered: read the outcome from the agent.
    wait_until("the agent to settle all three", async || agent.destinations()[0].acked_sequence >= 3).await;
    let dead = agent.store().dead_letters(0, 10).unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].reason.contains("announced"), "{}", dead[0].reason);
    // Now that the limit is known, ingest refuses such an event outright.
    let (status, answer) = post(&base, &json!({"topic": "t", "data": "x".repeat(2000)})).await;
    assert_eq!(status, 413, "{answer}");
    assert_eq!(post(&base, &json!({"topic": "t", "id": "c", "data": 3})).await.0, 200);
    wait_for_ids(&c, Protocol::V5, &["c"]).await;
    agent.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_state_value_a_subscribing_destination_cannot_take_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let dest =
        destination("cloud", "mqtt://127.0.0.1:1", "v5", "max_packet_size = \"4 KiB\"\nsubscribe = [\"desired/#\"]");
    let agent = start_agent(dir.path(), &dest).await;
    let base = format!("http://{}", agent.http_addr());
    let client = reqwest::Client::new();
    let put = async |key: &str, body: String, ct: &str| {
        let r =
            client.put(format!("{base}/v1/state/{key}")).header("content-type", ct).body(body).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    let (status, text) = put("desired/fan", "x".repeat(8000), "text/plain").await;
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("destination cloud"), "{text}");
    assert_eq!(put("desired/fan", "on".into(), "text/plain").await.0, 200);
    assert_eq!(put("other/fan", "x".repeat(8000), "text/plain").await.0, 200, "no destination subscribes to it");
    agent.shutdown().await.unwrap();
}

/// A record as an earlier release could have stored it, checked by nothing.
fn unchecked(id: &str, subject: &str) -> PreparedEvent {
    PreparedEvent::new(&body(id, subject), Dedup::None, 100, None)
}

fn body(id: &str, subject: &str) -> EventBody {
    EventBody {
        id: id.into(),
        source: "ferry://gw-1".into(),
        ty: "ferry.event".into(),
        subject: subject.into(),
        time_nanos: 1_800_000_000_000_000_000,
        datacontenttype: Some("application/json".into()),
        data: b"1".to_vec(),
        partitionkey: None,
        extensions: vec![],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poison_event_already_in_the_store_costs_that_event_not_the_destination() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(StoreConfig::at(dir.path().join("ferry.redb")), Arc::new(SystemClock)).unwrap();
        store
            .append(vec![unchecked("first", "t/a"), unchecked("nul\u{0}id", "t/a"), unchecked("last", "t/a")])
            .await
            .unwrap();
        store.close();
    }
    let broker = Mosquitto::start(MosquittoOptions::default()).await.unwrap();
    let c = Collector::start(&broker.url(), "ferry/#", Protocol::V5).await.unwrap();
    let agent = start_agent(dir.path(), &destination("cloud", &broker.url(), "v5", "")).await;
    wait_for_ids(&c, Protocol::V5, &["first", "last"]).await;
    let dead = agent.store().dead_letters(0, 10).unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].reason.contains("cloud"), "{}", dead[0].reason);
    assert!(agent.destinations()[0].connected);
    agent.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreadable_record_is_moved_to_the_dead_letters_and_forwarding_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(StoreConfig::at(dir.path().join("ferry.redb")), Arc::new(SystemClock)).unwrap();
        store.append(vec![unchecked("a", "t/a"), unchecked("b", "t/a"), unchecked("c", "t/a")]).await.unwrap();
        ferry::store::faults::overwrite_record(&store.database().get().unwrap(), 2, &[1, 2, 3]).unwrap();
        store.close();
    }
    let broker = Mosquitto::start(MosquittoOptions::default()).await.unwrap();
    let c = Collector::start(&broker.url(), "ferry/#", Protocol::V5).await.unwrap();
    let agent = start_agent(dir.path(), &destination("cloud", &broker.url(), "v5", "")).await;
    wait_for_ids(&c, Protocol::V5, &["a", "c"]).await;
    let dead = agent.store().dead_letters(0, 10).unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].reason.starts_with("unreadable"), "{}", dead[0].reason);
    assert_eq!(dead[0].sequence, 2);
    agent.shutdown().await.unwrap();
}

/// A store in `dir` whose I/O fails when its [`IoFaults`] say so.
fn store_with_faults(dir: &Path) -> (Store, IoFaults) {
    let config = StoreConfig::at(dir.join("ferry.redb"));
    let faults = IoFaults::new();
    let (f2, path) = (faults.clone(), config.path.clone());
    let store = Store::open_with_backends(config, Arc::new(SystemClock), move || f2.backend(&path)).unwrap();
    (store, faults)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_failure_in_a_forwarder_pauses_it_on_a_live_link_and_it_resumes_when_the_store_heals() {
    let dir = tempfile::tempdir().unwrap();
    let (store, faults) = store_with_faults(dir.path());
    let big = EventBody { data: format!("\"{}\"", "x".repeat(2000)).into_bytes(), ..body("big", "t/a") };
    let big = PreparedEvent::new(&big, Dedup::None, 100, None);
    store.append(vec![unchecked("a", "t/a"), big, unchecked("b", "t/a")]).await.unwrap();
    // The broker announces a 1 KiB packet limit, so "big" must be dead-lettered:
    // a write, which fails while the disk does.
    let broker =
        Mosquitto::start(MosquittoOptions { max_packet_size: Some(1024), ..Default::default() }).await.unwrap();
    let c = Collector::start(&broker.url(), "ferry/#", Protocol::V5).await.unwrap();
    faults.fail_writes(libc::ENOSPC);
    let toml = agent_toml(dir.path(), &destination("cloud", &broker.url(), "v5", ""));
    let destination = Config::parse(&toml, "test.toml").unwrap().destinations.remove(0);
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let forwarder = Forwarder::spawn(
        destination,
        None,
        store.clone(),
        Arc::new(SystemClock),
        Stage::new("cloud".into(), vec![]),
        DestinationDownlink::none("cloud"),
        shutdown,
    );
    wait_for_ids(&c, Protocol::V5, &["a"]).await;
    wait_until("the forwarder to pause on the failed write", async || {
        forwarder.status().last_error.is_some_and(|e| e.contains("paused"))
    })
    .await;
    let paused = forwarder.status();
    assert!(paused.last_error.as_deref().unwrap().contains("No space left"), "{paused:?}");
    // Waited out on a live link: no reconnect, nothing sent past the failed step.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let still = forwarder.status();
    assert!(still.connected, "{still:?}");
    assert_eq!(still.reconnects, paused.reconnects, "a store failure must not cost the link: {still:?}");
    assert_eq!(ids(&c, Protocol::V5), ["a"]);
    faults.heal();
    wait_for_ids(&c, Protocol::V5, &["a", "b"]).await;
    wait_until("big to be dead-lettered", async || store.dead_letters(0, 10).is_ok_and(|d| d.len() == 1)).await;
    let dead = store.dead_letters(0, 10).unwrap();
    assert_eq!(dead[0].event().unwrap().body.id, "big");
    assert!(dead[0].reason.contains("announced"), "{}", dead[0].reason);
    assert_eq!(forwarder.status().reconnects, paused.reconnects);
    assert_eq!(ids(&c, Protocol::V5), ["a", "b"], "each event once, in order");
    stop.send(true).unwrap();
    forwarder.join().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_failure_in_local_mqtt_ingest_keeps_the_link_and_the_messages_are_stored_once_it_heals() {
    let dir = tempfile::tempdir().unwrap();
    let (store, faults) = store_with_faults(dir.path());
    let broker = Mosquitto::start(MosquittoOptions::default()).await.unwrap();
    let tail = format!(
        "[ingest.mqtt]\nurl = \"{}\"\nclient_id = \"ferry-local\"\ntopics = [\"sensors/#\"]\nkeep_alive = \"5s\"\n",
        broker.url()
    );
    let mqtt = Config::parse(&agent_toml(dir.path(), &tail), "test.toml").unwrap().mqtt_ingest.unwrap();
    let ingest = Ingest::new(store.clone(), "ferry://gw-1".into(), Arc::new(SystemClock));
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let acks = ferry::ingest::acks::AckWaiter::new(store.clone(), Vec::new(), shutdown.clone());
    let task = tokio::spawn(MqttIngest::new(mqtt, None, ingest, acks, shutdown).run());
    wait_until("local MQTT ingest to connect", async || broker.log().contains("as ferry-local")).await;
    // Subscribed (persistent session) before anything is published to it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    faults.fail_writes(libc::EIO);
    for n in 0..3 {
        ferry_harness::mqtt::publish_v311(&broker.url(), &format!("sensors/{n}"), "1", Duration::from_secs(10))
            .await
            .unwrap();
    }
    // Several retries' worth: the batch waits in hand, unacknowledged, on the same connection.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(store.read_after(0, 10).unwrap().is_empty(), "nothing is stored while writes fail");
    faults.heal();
    wait_until("the three messages to be stored", async || store.read_after(0, 10).is_ok_and(|e| e.len() == 3)).await;
    let subjects: Vec<String> = store.read_after(0, 10).unwrap().into_iter().map(|e| e.body.subject).collect();
    assert_eq!(subjects, ["sensors/0", "sensors/1", "sensors/2"], "each once, in order");
    let log = broker.log();
    assert_eq!(log.matches("as ferry-local").count(), 1, "a store failure must not cost the link:\n{log}");
    stop.send(true).unwrap();
    task.await.unwrap();
}

/// `ferry <args>`, its exit code and everything it printed.
fn ferry(args: &[&str]) -> (i32, String) {
    let out = Command::new(ferry_bin!()).args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn an_empty_store_file_is_refused_by_run_inspect_and_verify_alike() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config_with(dir.path(), "", "");
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    std::fs::write(dir.path().join("data/ferry.redb"), b"").unwrap();
    let err = FerryProcess::start(ferry_bin!(), &config).err().expect("the agent must not start");
    assert!(err.to_string().contains("is empty"), "{err}");
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let (code, text) = ferry(&["store", "inspect", "--data", data]);
    assert!(code != 0 && text.contains("is empty"), "{code}: {text}");
    let (code, text) = ferry(&["store", "verify", "--data", data]);
    assert!(code == 2 && text.contains("is empty"), "{code}: {text}");
    assert_eq!(std::fs::metadata(dir.path().join("data/ferry.redb")).unwrap().len(), 0, "never reinitialised");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_zeroed_page_is_a_clear_error_naming_the_file_from_run_inspect_and_verify_alike() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config_with(dir.path(), "", "");
    let c2 = config.clone();
    let agent = tokio::task::spawn_blocking(move || FerryProcess::start(ferry_bin!(), &c2)).await.unwrap().unwrap();
    let client = reqwest::Client::new();
    for i in 0..200 {
        let r = client
            .post(format!("{}/v1/events", agent.url()))
            .json(&json!({"topic": "t", "data": i}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let (status, _) = agent.terminate();
    assert!(status.success());
    let path = dir.path().join("data/ferry.redb");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[4096..8192].fill(0);
    std::fs::write(&path, &bytes).unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let (verify_code, verify) = ferry(&["store", "verify", "--data", data]);
    let (_, inspect) = ferry(&["store", "inspect", "--data", data]);
    let run = FerryProcess::start(ferry_bin!(), &config);
    match run {
        Ok(agent) => {
            // redb may repair this page: then inspect and verify must agree that it is readable.
            assert_eq!(verify_code, 0, "run started, so verify must pass: {verify}");
            assert!(!inspect.contains("damaged"), "{inspect}");
            drop(agent);
        }
        Err(e) => {
            let e = e.to_string();
            assert!(!e.contains("panicked"), "a panic, not an error: {e}");
            assert!(e.contains("ferry.redb"), "the error names the file: {e}");
            assert_eq!(verify_code, 2, "run refused it, so verify must say it cannot be opened: {verify}");
            assert!(inspect.contains("ferry.redb") && !inspect.contains("panicked"), "{inspect}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_data_dir_deleted_while_running_stops_ingest_with_a_clear_error_and_fails_health() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let agent = start_agent(&data, "").await;
    let base = format!("http://{}", agent.http_addr());
    assert_eq!(post(&base, &json!({"topic": "t", "data": 1})).await.0, 200);
    std::fs::remove_dir_all(&data).unwrap();
    let (status, answer) = post(&base, &json!({"topic": "t", "data": 2})).await;
    assert_eq!(status, 503, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("deleted"), "{answer}");
    let health = reqwest::get(format!("{base}/healthz")).await.unwrap();
    assert_eq!(health.status(), 503);
    assert!(health.text().await.unwrap().contains("deleted"));
    let status: Value = reqwest::get(format!("{base}/v1/status")).await.unwrap().json().await.unwrap();
    assert_eq!(status["store"]["health"]["state"], "vanished", "{status}");
    agent.shutdown().await.unwrap();
}

/// A tmpfs of `size` mounted at a fresh directory, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// `None` when this process cannot mount (not root): the full-disk test
    /// needs a real file system it can fill; CI runs as root.
    fn mount(size: &str) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Self { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_refuses_ingest_says_why_and_heals_without_a_restart_losing_nothing() {
    // SAFETY: geteuid has no preconditions.
    assert!(
        unsafe { libc::geteuid() } == 0 || std::env::var_os("FERRY_SKIP_ROOT_TESTS").is_some(),
        "this test mounts a tmpfs and needs root (set FERRY_SKIP_ROOT_TESTS=1 to skip it)"
    );
    let Some(fs) = Tmpfs::mount("64m") else {
        eprintln!("skipped: cannot mount a tmpfs here");
        return;
    };
    let broker = Mosquitto::start(MosquittoOptions::default()).await.unwrap();
    let c = Collector::start(&broker.url(), "ferry/#", Protocol::V5).await.unwrap();
    let data = fs.path().join("data");
    let toml = agent_toml(&data, &destination("cloud", &broker.url(), "v5", ""))
        .replace("min_free_disk = \"0 B\"", "min_free_disk = \"16 MiB\"");
    let config = fs.path().join("ferry.toml");
    std::fs::write(&config, toml).unwrap();
    let agent = tokio::task::spawn_blocking(move || FerryProcess::start(ferry_bin!(), &config)).await.unwrap().unwrap();
    let base = agent.url();
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let mut acked: Vec<String> = Vec::new();
    let mut refusals = Vec::new();
    let mut n = 0;
    let send = async |n: &mut usize, acked: &mut Vec<String>, refusals: &mut Vec<(u16, String)>| {
        let id = format!("e-{n}");
        *n += 1;
        let r = client
            .post(format!("{base}/v1/events"))
            .json(&json!({"topic": "t", "id": id, "data": "y".repeat(512)}))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        match status {
            200 => acked.push(id),
            _ => refusals.push((status, text)),
        }
    };
    for _ in 0..50 {
        send(&mut n, &mut acked, &mut refusals).await;
    }
    assert!(refusals.is_empty(), "{refusals:?}");
    // Another process fills the disk.
    let hog = fs.path().join("hog");
    let _ =
        Command::new("dd").args(["if=/dev/zero", "bs=1M", "count=200"]).arg(format!("of={}", hog.display())).output();
    for _ in 0..50 {
        send(&mut n, &mut acked, &mut refusals).await;
    }
    assert!(!refusals.is_empty(), "a full disk must refuse ingest");
    for (status, text) in &refusals {
        assert!(*status == 507 || *status == 503, "{status}: {text}");
        assert!(text.contains("disk") || text.contains("space") || text.contains("store"), "{text}");
    }
    let health = client.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 503, "health must fail while the store cannot take events");
    let status: Value = client.get(format!("{base}/v1/status")).send().await.unwrap().json().await.unwrap();
    assert_ne!(status["store"]["health"]["state"], "ok", "{status}");
    std::fs::remove_file(&hog).unwrap();
    // Space is back: ingest resumes without a restart.
    let start = Instant::now();
    loop {
        refusals.clear();
        send(&mut n, &mut acked, &mut refusals).await;
        if refusals.is_empty() {
            break;
        }
        assert!(start.elapsed() < WAIT, "ingest did not resume after space was freed: {refusals:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for _ in 0..20 {
        send(&mut n, &mut acked, &mut refusals).await;
    }
    assert!(refusals.is_empty(), "{refusals:?}");
    let health = client.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let want: Vec<&str> = acked.iter().map(String::as_str).collect();
    wait_for_ids(&c, Protocol::V5, &want).await;
    let (exit, log) = agent.terminate();
    assert!(exit.success());
    let errors = log.iter().filter(|l| l.contains("ERROR")).count();
    assert!(errors < 20, "the failure is logged when it starts, not once per request: {errors} ERROR lines");
}

/// A raw TCP client that sends `bytes` and leaves the connection open.
fn half_sent(addr: &str, bytes: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(bytes).unwrap();
    s
}

/// Whether the server closed `s` (read returns 0 or an error) within `within`.
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // a 408 answer first is fine
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                return false;
            }
            Err(_) => return true,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_clients_are_cut_off_and_the_connection_cap_never_starves_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let toml = agent_toml(dir.path(), "").replace(
        "listen = \"127.0.0.1:0\"",
        "listen = \"127.0.0.1:0\"\nmax_connections = 16\nheader_timeout = \"1s\"\nbody_timeout = \"1s\"",
    );
    let agent = Agent::start(Config::parse(&toml, "t.toml").unwrap(), Arc::new(SystemClock)).await.unwrap();
    let addr = agent.http_addr().to_string();
    let base = format!("http://{addr}");
    // Twice the cap of clients that never finish their headers, and a few
    // that send headers but never their body.
    let mut slow: Vec<TcpStream> =
        (0..32).map(|_| half_sent(&addr, b"POST /v1/events HTTP/1.1\r\nHost: x\r\n")).collect();
    slow.extend(
        (0..4).map(|_| half_sent(&addr, b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"to")),
    );
    // A well-behaved producer still gets through: slots free up as the slow ones time out.
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let r = client.post(format!("{base}/v1/events")).json(&json!({"topic": "t", "data": 1})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let held = tokio::task::spawn_blocking(move || {
        slow.iter_mut().map(|s| closed_within(s, Duration::from_secs(20))).filter(|closed| !closed).count()
    })
    .await
    .unwrap();
    assert_eq!(held, 0, "every slow client is cut off by the header or body timeout");
    agent.shutdown().await.unwrap();
}

#[test]
fn a_truncated_body_is_a_bad_request_not_too_large() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config_with(dir.path(), "", "");
    let agent = FerryProcess::start(ferry_bin!(), &config).unwrap();
    let addr = agent.url().trim_start_matches("http://").to_owned();
    let mut s = half_sent(&addr, b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"topic\":\"t\"");
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = String::new();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let _ = s.read_to_string(&mut answer);
    // hyper may close a connection whose body ends early without a response;
    // if it answers, it must not claim the body was too large.
    assert!(!answer.contains("413"), "{answer}");
    if !answer.is_empty() {
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    }
}

#[test]
fn shutdown_finishes_within_its_deadline_whatever_clients_do() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config_with(dir.path(), "", "");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "listen = \"127.0.0.1:0\"",
        "listen = \"127.0.0.1:0\"\nshutdown_timeout = \"2s\"\nheader_timeout = \"60s\"\nbody_timeout = \"60s\"",
    );
    std::fs::write(&config, text).unwrap();
    let agent = FerryProcess::start(ferry_bin!(), &config).unwrap();
    let addr = agent.url().trim_start_matches("http://").to_owned();
    // Clients mid-request that will not finish before the agent is told to stop.
    let _slow: Vec<TcpStream> = (0..5)
        .map(|_| half_sent(&addr, b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n[{\"topic\":"))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let (status, log) = agent.terminate();
    let took = started.elapsed();
    assert!(status.success(), "{log:?}");
    // The deadline is 2 s; the shipped unit allows 30 s. Far inside either.
    assert!(took < Duration::from_secs(20), "shutdown took {took:?}");
    assert!(log.iter().any(|l| l.contains("shutdown deadline")), "{log:?}");
}

/// Peak resident memory of a process, from `/proc`.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap().split_whitespace().nth(1).unwrap();
    kb.parse::<u64>().unwrap() * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_maximum_size_bodies_stay_within_the_stated_memory_bound() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config_with(dir.path(), "quota = \"4 GiB\"\nmin_free_disk = \"0 B\"", "");
    let agent = tokio::task::spawn_blocking(move || FerryProcess::start(ferry_bin!(), &config)).await.unwrap().unwrap();
    let base = agent.url();
    let client = reqwest::Client::new();
    // Warm up, then take the baseline.
    assert_eq!(
        client.post(format!("{base}/v1/events")).json(&json!({"topic": "t", "data": 1})).send().await.unwrap().status(),
        200
    );
    let baseline = peak_rss(agent.pid());
    // Four bodies of just under 8 MiB each (the default max_body_size), of
    // 1 KiB events, at once.
    let line = format!("{}\n", json!({"topic": "t/m", "data": "z".repeat(1000)}));
    let body = line.repeat((8 << 20) / line.len() - 1);
    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (client, base, body) = (client.clone(), base.clone(), body.clone());
        requests.spawn(async move {
            let r = client
                .post(format!("{base}/v1/events"))
                .header("content-type", "application/x-ndjson")
                .body(body)
                .send()
                .await
                .unwrap();
            r.status().as_u16()
        });
    }
    let answers = requests.join_all().await;
    assert!(answers.iter().all(|s| *s == 200 || *s == 503), "{answers:?}");
    assert!(answers.contains(&200), "{answers:?}");
    let grown = peak_rss(agent.pid()).saturating_sub(baseline);
    eprintln!("peak RSS grew {} MiB over a {} MiB baseline; answers {answers:?}", grown >> 20, baseline >> 20);
    // The stated bound (docs/operating.md): ingest.http.max_buffered
    // (48 MiB), plus the store's page cache (store.cache_size, 64 MiB), plus
    // 32 MiB for responses and the allocator's slack.
    let bound = (48 << 20) + (64 << 20) + (32 << 20);
    assert!(grown <= bound, "RSS grew {} MiB, over the {} MiB bound", grown >> 20, bound >> 20);
}
