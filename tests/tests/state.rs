//! Multi-cloud state sync over real brokers: three Mosquitto brokers stand in
//! for three clouds, each writes the same key while one is partitioned from
//! the device, and after the partition heals the device and every broker's
//! retained value converge on one merged value — with no update loop.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry::clock::SystemClock;
use ferry::config::Config;
use ferry::runtime::Agent;
use ferry::state::wire;
use ferry_harness::{Collector, FaultProxy, Mosquitto, MosquittoOptions, Protocol, Received, mqtt};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(90);
const KEY: &str = "desired/fan";
const TOPIC: &str = "ferry/gw-1/desired/fan";

struct Cloud {
    name: &'static str,
    broker: Mosquitto,
    protocol: Protocol,
}

impl Cloud {
    fn protocol_name(&self) -> &'static str {
        match self.protocol {
            Protocol::V5 => "v5",
            Protocol::V311 => "v311",
        }
    }
}

/// Publishes `payload` retained with QoS 1, as a cloud application that
/// knows nothing of Ferry would, and waits for the PUBACK.
async fn cloud_write(url: &str, topic: &str, payload: &[u8]) {
    mqtt::publish_retained_v311(url, topic, payload.to_vec(), WAIT).await.expect("PUBACK from the cloud broker");
}

/// The value a received message carries (unwrapping a Ferry envelope).
fn value_of(m: &Received) -> Value {
    let update =
        wire::decode(&m.payload, &m.user_properties, m.content_type.as_deref()).expect("a valid state message");
    serde_json::from_slice(&update.data).unwrap_or_else(|_| Value::String(m.payload_str()))
}

/// The retained value at a broker now, read by a fresh subscriber.
async fn retained(cloud: &Cloud) -> Option<Value> {
    retained_at(cloud, TOPIC).await
}

/// The retained value on `topic` at a broker now.
async fn retained_at(cloud: &Cloud, topic: &str) -> Option<Value> {
    let c = Collector::start(&cloud.broker.url(), topic, cloud.protocol).await.ok()?;
    let got = c.wait_for(1, Duration::from_secs(2)).await.ok()?;
    got.iter().find(|m| m.retain).map(value_of)
}

async fn device_value(client: &reqwest::Client, agent: &Agent) -> Option<Value> {
    let r = client.get(format!("http://{}/v1/state/{KEY}", agent.http_addr())).send().await.ok()?;
    if r.status() != 200 {
        return None;
    }
    r.json::<Value>().await.ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_clouds_with_conflicting_writes_during_a_partition_converge_after_healing_without_loops() {
    let clouds = [
        Cloud {
            name: "aws",
            broker: Mosquitto::start(MosquittoOptions::default()).await.unwrap(),
            protocol: Protocol::V5,
        },
        Cloud {
            name: "azure",
            broker: Mosquitto::start(MosquittoOptions::default()).await.unwrap(),
            protocol: Protocol::V5,
        },
        Cloud {
            name: "gcp",
            broker: Mosquitto::start(MosquittoOptions::default()).await.unwrap(),
            protocol: Protocol::V311,
        },
    ];
    // The device reaches the third cloud through a proxy that partitions it.
    let proxy = FaultProxy::start(clouds[2].broker.addr()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut toml = format!(
        "[agent]\ndevice_id = \"gw-1\"\ndata_dir = {:?}\n[ingest.http]\nlisten = \"127.0.0.1:0\"\n",
        dir.path().display().to_string()
    );
    for (i, c) in clouds.iter().enumerate() {
        let url = if i == 2 { proxy.url() } else { c.broker.url() };
        toml.push_str(&format!(
            "[[destination]]\nname = \"{}\"\nurl = \"{url}\"\nprotocol = \"{}\"\nkeep_alive = \"5s\"\n\
             backoff_base = \"100ms\"\nbackoff_cap = \"1s\"\nroutes = [\"telemetry/#\"]\nsubscribe = [\"desired/#\"]\n",
            c.name,
            c.protocol_name()
        ));
    }
    let agent = Agent::start(Config::parse(&toml, "test.toml").unwrap(), Arc::new(SystemClock)).await.unwrap();
    let client = reqwest::Client::new();
    // Everything every broker sees on the key, from the start.
    let mut watchers = Vec::new();
    for c in &clouds {
        watchers.push(Collector::start(&c.broker.url(), TOPIC, c.protocol).await.unwrap());
    }

    // A local write reaches every cloud, retained.
    let r = client
        .put(format!("http://{}/v1/state/{KEY}", agent.http_addr()))
        .header("content-type", "application/json")
        .body(r#"{"speed":0}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let start = Instant::now();
    for c in &clouds {
        while retained(c).await != Some(json!({"speed": 0})) {
            assert!(start.elapsed() < WAIT, "the local write never reached {}", c.name);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // Partition the third cloud, then every cloud writes its own value.
    proxy.handle().cut();
    cloud_write(&clouds[0].broker.url(), TOPIC, br#"{"speed":1}"#).await;
    cloud_write(&clouds[1].broker.url(), TOPIC, br#"{"speed":2}"#).await;
    cloud_write(&clouds[2].broker.url(), TOPIC, br#"{"speed":3}"#).await;
    // The device sees the two reachable clouds' writes while partitioned.
    let start = Instant::now();
    loop {
        let v = device_value(&client, &agent).await.expect("the key has a value");
        let vv = &v["version"]["vv"];
        if vv.get("aws").is_some() && vv.get("azure").is_some() {
            break;
        }
        assert!(start.elapsed() < WAIT, "the reachable clouds' writes never arrived: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    proxy.handle().restore();

    // Converge: the device's value includes all three writes, and every
    // broker's retained value is the device's value.
    let start = Instant::now();
    let converged = loop {
        let device = device_value(&client, &agent).await.expect("the key has a value");
        let vv = &device["version"]["vv"];
        if ["aws", "azure", "gcp"].iter().all(|o| vv.get(o).is_some()) {
            let mut all = true;
            for c in &clouds {
                all &= retained(c).await.as_ref() == Some(&device["value"]);
            }
            if all {
                break device;
            }
        }
        assert!(start.elapsed() < WAIT, "no convergence within {WAIT:?}; device: {device}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let value = &converged["value"];
    assert!(
        [json!({"speed":1}), json!({"speed":2}), json!({"speed":3})].contains(value),
        "last-writer-wins keeps one of the concurrent writes whole: {value}"
    );

    // No loop: once converged, nothing more is published anywhere.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let counts: Vec<usize> = watchers.iter().map(Collector::len).collect();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let later: Vec<usize> = watchers.iter().map(Collector::len).collect();
    assert_eq!(counts, later, "publishes continued after convergence (an update loop)");
    for (c, w) in clouds.iter().zip(&watchers) {
        let n = w.len();
        assert!(n <= 8, "{} saw {n} publishes on the key for 1 local write and 3 cloud writes", c.name);
        // The last thing each broker saw is the converged value.
        assert_eq!(&value_of(w.messages().last().unwrap()), value, "{}", c.name);
    }
    // The device still holds it, and the status shows the merge.
    let status: Value = client
        .get(format!("http://{}/v1/state?prefix=desired/", agent.http_addr()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(&status["entries"][0]["value"], value);
    assert!(status["sync"]["merged"].as_u64().unwrap() >= 1, "{status}");
    agent.shutdown().await.unwrap();
}

mod crdt {
    //! The convergence property with the real `crdt-merge` example plugin
    //! (a map of PN-counters) doing the merges: random causal histories of
    //! increments on three replicas, delivered with duplicates and in
    //! shuffled orders, end with every replica holding the same bytes — and
    //! no increment lost.

    use std::path::Path;

    use ferry::config::plugin::{PluginConfig, World};
    use ferry::plugin::{Plugin, Versioned};
    use ferry::state::version::{Decision, Version, VersionVector, decide, new_write};
    use proptest::prelude::*;

    fn plugin() -> Plugin {
        let path = ferry_tests::built_plugin("crdt-merge");
        let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("plugin-cache");
        Plugin::load(&PluginConfig::new("crdt", path, World::Merge), Some(&cache)).unwrap().0
    }

    fn wit(v: &Version, data: &[u8]) -> Versioned {
        Versioned {
            data: data.to_vec(),
            version: v.vv.entries().map(|(o, n)| (o.to_owned(), n)).collect(),
            hlc: v.hlc,
            origin: v.origin.clone(),
        }
    }

    type Held = Option<(Version, Vec<u8>)>;

    fn apply(p: &mut Plugin, held: &mut Held, incoming: &(Version, Vec<u8>)) {
        match decide(held.as_ref().map(|h| &h.0), &incoming.0) {
            Decision::Duplicate | Decision::Dominated => {}
            Decision::Replace => *held = Some(incoming.clone()),
            Decision::Merge(v) => {
                let (cv, cd) = held.as_ref().unwrap();
                let data = p.merge("counters", Some(&wit(cv, cd)), &wit(&incoming.0, &incoming.1)).unwrap().unwrap();
                *held = Some((v, data));
            }
        }
    }

    /// Increments `origin`'s own entry of counter `c` in PN-counter JSON.
    fn increment(data: Option<&[u8]>, origin: &str) -> Vec<u8> {
        let mut v: serde_json::Value =
            data.map(|d| serde_json::from_slice(d).unwrap()).unwrap_or_else(|| serde_json::json!({}));
        let entry = &mut v["c"]["p"][origin];
        *entry = (entry.as_u64().unwrap_or(0) + 1).into();
        serde_json::to_vec(&v).unwrap()
    }

    fn total(data: &[u8]) -> u64 {
        let v: serde_json::Value = serde_json::from_slice(data).unwrap();
        v["c"]["p"].as_object().map_or(0, |m| m.values().map(|n| n.as_u64().unwrap()).sum())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

        #[test]
        fn the_crdt_merge_plugin_converges_without_losing_an_increment(
            steps in prop::collection::vec((0..3usize, any::<bool>(), any::<usize>()), 1..30),
            order in prop::collection::vec(any::<usize>(), 0..40),
        ) {
            let mut p = plugin();
            let origins = ["a", "b", "c"];
            let mut replicas: Vec<Held> = vec![None; 3];
            let mut produced: Vec<(Version, Vec<u8>)> = Vec::new();
            let mut hlc = 0;
            for (r, write, which) in steps {
                if write || produced.is_empty() {
                    hlc += 1;
                    let seen = replicas[r].as_ref().map(|h| h.0.vv.clone()).unwrap_or_default();
                    let floor = produced.iter().fold(VersionVector::new(), |mut acc, (v, _)| { acc.join(&v.vv); acc });
                    let v = new_write(&seen, &floor, origins[r], hlc);
                    let data = increment(replicas[r].as_ref().map(|h| h.1.as_slice()), origins[r]);
                    let w = (v, data);
                    apply(&mut p, &mut replicas[r], &w);
                    produced.push(w);
                } else {
                    let w = produced[which % produced.len()].clone();
                    apply(&mut p, &mut replicas[r], &w);
                }
            }
            let mut fresh: Held = None;
            for i in order {
                apply(&mut p, &mut fresh, &produced[i % produced.len()]);
            }
            replicas.push(fresh);
            for r in &mut replicas {
                for w in produced.iter().rev() {
                    apply(&mut p, r, w);
                }
            }
            let first = replicas[0].clone().unwrap();
            for r in &replicas[1..] {
                prop_assert_eq!(r.as_ref().unwrap(), &first);
            }
            prop_assert_eq!(total(&first.1), produced.len() as u64, "every increment survives");
        }
    }
}

/// A device config with one cloud `cloud` at `url` subscribing to `desired/#`.
fn device_config(data_dir: &std::path::Path, url: &str, extra: &str) -> Config {
    let toml = format!(
        "[agent]\ndevice_id = \"gw-1\"\ndata_dir = {:?}\n[ingest.http]\nlisten = \"127.0.0.1:0\"\n\
         [[destination]]\nname = \"cloud\"\nurl = \"{url}\"\nkeep_alive = \"5s\"\nbackoff_base = \"100ms\"\n\
         backoff_cap = \"1s\"\nsubscribe = [\"desired/#\"]\n{extra}",
        data_dir.display().to_string()
    );
    Config::parse(&toml, "test.toml").unwrap()
}

async fn put(client: &reqwest::Client, agent: &Agent, key: &str, body: &str) -> reqwest::Response {
    client
        .put(format!("http://{}/v1/state/{key}", agent.http_addr()))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
}

/// Polls `probe` until it returns `want`.
async fn eventually<F: AsyncFnMut() -> Option<Value>>(what: &str, want: &Value, mut probe: F) {
    let start = Instant::now();
    loop {
        let got = probe().await;
        if got.as_ref() == Some(want) {
            return;
        }
        assert!(start.elapsed() < WAIT, "{what}: wanted {want}, last saw {got:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Reads a server-sent-events stream until `n` change events arrived; returns their (id, value).
async fn read_changes(client: &reqwest::Client, url: &str, n: usize) -> Vec<(u64, Value)> {
    let mut r = client.get(url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let mut text = String::new();
    let deadline = Instant::now() + WAIT;
    loop {
        let events: Vec<(u64, Value)> = text
            .split("\n\n")
            .filter(|block| block.contains("event: change"))
            .filter_map(|block| {
                let field = |name: &str| block.lines().find_map(|l| l.strip_prefix(name)).map(str::to_owned);
                let id = field("id: ")?.parse().ok()?;
                let data: Value = serde_json::from_str(&field("data: ")?).ok()?;
                Some((id, data["value"].clone()))
            })
            .collect();
        if events.len() >= n {
            return events;
        }
        assert!(Instant::now() < deadline, "only {} change events within {WAIT:?}: {text}", events.len());
        match tokio::time::timeout(Duration::from_secs(1), r.chunk()).await {
            Ok(Ok(Some(chunk))) => text.push_str(&String::from_utf8_lossy(&chunk)),
            Ok(Ok(None)) => panic!("the change stream ended: {text}"),
            Ok(Err(e)) => panic!("the change stream failed: {e}"),
            Err(_) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_write_made_while_the_cloud_is_down_survives_a_restart_and_reaches_it_and_the_local_broker() {
    let cloud = Mosquitto::start(MosquittoOptions::default()).await.unwrap();
    let local = Mosquitto::start(MosquittoOptions::default()).await.unwrap();
    let proxy = FaultProxy::start(cloud.addr()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let extra = format!("[state.local_mqtt]\nurl = \"{}\"\nkeep_alive = \"5s\"\n", local.url());
    let client = reqwest::Client::new();
    let cloud_view = Cloud { name: "cloud", broker: cloud, protocol: Protocol::V5 };
    let local_retained = async || {
        let c = Collector::start(&local.url(), "ferry/state/desired/fan", Protocol::V5).await.ok()?;
        let got = c.wait_for(1, Duration::from_secs(2)).await.ok()?;
        got.iter().find(|m| m.retain).map(value_of)
    };

    let agent = Agent::start(device_config(dir.path(), &proxy.url(), &extra), Arc::new(SystemClock)).await.unwrap();
    assert_eq!(put(&client, &agent, KEY, r#"{"speed":1}"#).await.status(), 200);
    eventually("the cloud's retained value", &json!({"speed": 1}), async || retained(&cloud_view).await).await;
    eventually("the local broker's retained value", &json!({"speed": 1}), local_retained).await;

    // The cloud becomes unreachable; a write is made and the agent restarts.
    proxy.handle().cut();
    assert_eq!(put(&client, &agent, KEY, r#"{"speed":2}"#).await.status(), 200);
    agent.shutdown().await.unwrap();
    let agent = Agent::start(device_config(dir.path(), &proxy.url(), &extra), Arc::new(SystemClock)).await.unwrap();
    let v = device_value(&client, &agent).await.expect("the value survives the restart");
    assert_eq!(v["value"], json!({"speed": 2}));
    assert_eq!(v["version"]["vv"], json!({"gw-1": 2}));
    assert_eq!(retained(&cloud_view).await, Some(json!({"speed": 1})), "the cloud has not seen it yet");
    proxy.handle().restore();
    eventually("the cloud's retained value after healing", &json!({"speed": 2}), async || retained(&cloud_view).await)
        .await;
    eventually("the local broker's retained value", &json!({"speed": 2}), local_retained).await;

    // The change stream replays history from any point, then goes live.
    let base = format!("http://{}/v1/state?watch=true", agent.http_addr());
    let all = read_changes(&client, &format!("{base}&after=0"), 2).await;
    assert_eq!(all, vec![(1, json!({"speed": 1})), (2, json!({"speed": 2}))]);
    let resumed = read_changes(&client, &format!("{base}&after=1"), 1).await;
    assert_eq!(resumed[0], (2, json!({"speed": 2})));
    let live = tokio::spawn({
        let (client, url) = (client.clone(), format!("{base}&after=2"));
        async move { read_changes(&client, &url, 1).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(put(&client, &agent, KEY, r#"{"speed":3}"#).await.status(), 200);
    assert_eq!(live.await.unwrap()[0], (3, json!({"speed": 3})));
    agent.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_plugin_merges_concurrent_updates_and_its_failures_follow_on_error_and_show_in_status() {
    let cloud = Mosquitto::start(MosquittoOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let wasm = ferry_tests::built_plugin("crdt-merge");
    let extra = format!(
        "[[plugin]]\nname = \"crdt\"\npath = {:?}\nworld = \"merge\"\non_error = \"dead-letter\"\n\
         [[merge]]\nkeys = \"desired/counters/#\"\nplugin = \"crdt\"\n",
        wasm.display().to_string()
    );
    let agent = Agent::start(device_config(dir.path(), &cloud.url(), &extra), Arc::new(SystemClock)).await.unwrap();
    let client = reqwest::Client::new();
    let key = "desired/counters/door";
    let topic = format!("ferry/gw-1/{key}");
    let get = async || -> Value {
        client.get(format!("http://{}/v1/state/{key}", agent.http_addr())).send().await.unwrap().json().await.unwrap()
    };
    let sync = async || -> Value {
        let v: Value = client
            .get(format!("http://{}/v1/state?prefix=desired/", agent.http_addr()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["sync"].clone()
    };
    assert_eq!(put(&client, &agent, key, r#"{"opened":{"p":{"gw-1":1}}}"#).await.status(), 200);
    // Wait until the cloud holds it, so the device's subscription is live.
    let cloud_view = Cloud { name: "cloud", broker: cloud, protocol: Protocol::V5 };
    let c = Collector::start(&cloud_view.broker.url(), &topic, Protocol::V5).await.unwrap();
    c.wait_for(1, WAIT).await.unwrap();

    // A Ferry-aware cloud writer sends a version concurrent with the
    // device's, with data the plugin cannot merge: it refuses, the value
    // stays (dead-letter policy), and the failure is counted and named.
    let versioned = |n: u64| {
        vec![
            ("ferryvv".to_owned(), format!("{{\"cloud-app\":{n}}}")),
            ("ferryhlc".to_owned(), (n << 16).to_string()),
            ("ferryorigin".to_owned(), "cloud-app".to_owned()),
        ]
    };
    mqtt::publish_v5(&cloud_view.broker.url(), &topic, b"not a counter".to_vec(), versioned(1), None, WAIT)
        .await
        .unwrap();
    let start = Instant::now();
    while sync().await["merge_failures"] != json!(1) {
        assert!(start.elapsed() < WAIT, "no merge failure recorded: {}", sync().await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(sync().await["last_merge_error"].as_str().unwrap().contains("crdt"), "{}", sync().await);
    let held = get().await;
    assert_eq!(held["value"], json!({"opened": {"p": {"gw-1": 1}}}));
    assert_eq!(held["version"]["vv"], json!({"gw-1": 1}), "a failed merge changes nothing");

    // A concurrent valid increment is merged: both sides' increments survive,
    // and the merged value goes back to the cloud.
    mqtt::publish_v5(
        &cloud_view.broker.url(),
        &topic,
        br#"{"opened":{"p":{"cloud-app":2}}}"#.to_vec(),
        versioned(2),
        Some("application/json".into()),
        WAIT,
    )
    .await
    .unwrap();
    let want = json!({"opened": {"p": {"cloud-app": 2, "gw-1": 1}, "n": {}}});
    eventually("the merged counter", &want, async || Some(get().await["value"].clone())).await;
    assert_eq!(get().await["version"]["vv"], json!({"cloud-app": 2, "gw-1": 1}));
    eventually("the cloud's retained value", &want, async || retained_at(&cloud_view, &topic).await).await;
    agent.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_state_api_refuses_bad_input_naming_what_is_wrong_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // No cloud: the state API works on the device alone.
    let toml = format!(
        "[agent]\ndevice_id = \"gw-1\"\ndata_dir = {:?}\n[ingest.http]\nlisten = \"127.0.0.1:0\"\n",
        dir.path().display().to_string()
    );
    let agent = Agent::start(Config::parse(&toml, "test.toml").unwrap(), Arc::new(SystemClock)).await.unwrap();
    let client = reqwest::Client::new();
    let base = format!("http://{}", agent.http_addr());
    let r = client.get(format!("{base}/v1/state/desired/none")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.text().await.unwrap().contains("desired/none"));
    let r = put(&client, &agent, "desired/x", "{not json").await;
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("JSON"));
    let r = client.put(format!("{base}/v1/state/desired/+")).body("1").send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("desired/+"));
    let r = client.get(format!("{base}/v1/state?after=3")).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let r = client.get(format!("{base}/v1/state?prefx=a")).send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("prefx"));
    let list: Value = client.get(format!("{base}/v1/state")).send().await.unwrap().json().await.unwrap();
    assert_eq!(list["entries"], json!([]), "nothing was written");

    // A non-JSON value round-trips as base64 with its content type.
    let r = client
        .put(format!("{base}/v1/state/config/blob"))
        .header("content-type", "application/octet-stream")
        .body(vec![0u8, 159, 146, 150])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = client.get(format!("{base}/v1/state/config/blob")).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["value_base64"], "AJ+Slg==");
    assert_eq!(v["content_type"], "application/octet-stream");
    assert_eq!(v["version"]["vv"], json!({"gw-1": 1}));
    agent.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_command_through_two_clouds_is_applied_once_and_a_redelivered_plain_value_is_not_a_new_write() {
    let a = Cloud {
        name: "a",
        broker: Mosquitto::start(MosquittoOptions::default()).await.unwrap(),
        protocol: Protocol::V5,
    };
    let b = Cloud {
        name: "b",
        broker: Mosquitto::start(MosquittoOptions::default()).await.unwrap(),
        protocol: Protocol::V5,
    };
    let proxy = FaultProxy::start(b.broker.addr()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut toml = format!(
        "[agent]\ndevice_id = \"gw-1\"\ndata_dir = {:?}\n[ingest.http]\nlisten = \"127.0.0.1:0\"\n",
        dir.path().display().to_string()
    );
    for (name, url) in [("a", a.broker.url()), ("b", proxy.url())] {
        toml.push_str(&format!(
            "[[destination]]\nname = \"{name}\"\nurl = \"{url}\"\nkeep_alive = \"5s\"\nbackoff_base = \"100ms\"\n\
             backoff_cap = \"500ms\"\nsubscribe = [\"desired/#\"]\n"
        ));
    }
    let agent = Agent::start(Config::parse(&toml, "test.toml").unwrap(), Arc::new(SystemClock)).await.unwrap();
    let client = reqwest::Client::new();
    let sync = async || -> Value {
        let v: Value =
            client.get(format!("http://{}/v1/state", agent.http_addr())).send().await.unwrap().json().await.unwrap();
        v["sync"].clone()
    };
    let wait_sync = async |what: &str, done: &dyn Fn(&Value) -> bool| {
        let start = Instant::now();
        loop {
            let s = sync().await;
            if done(&s) {
                return s;
            }
            assert!(start.elapsed() < WAIT, "{what}: {s}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };

    // One command, one version, published (retained) into both clouds.
    let topic = "ferry/gw-1/desired/cmd";
    let props = vec![
        ("ferryvv".to_owned(), r#"{"ops":1}"#.to_owned()),
        ("ferryhlc".to_owned(), (1u64 << 40).to_string()),
        ("ferryorigin".to_owned(), "ops".to_owned()),
    ];
    for cloud in [&a, &b] {
        use ferry_harness::rumqttc::v5::mqttbytes::QoS;
        use ferry_harness::rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
        use ferry_harness::rumqttc::v5::{AsyncClient, Event};
        let opts = mqtt::options_v5(&cloud.broker.url(), &mqtt::unique_client_id("ops"), None).unwrap();
        let (c, mut el) = AsyncClient::new(opts, 8);
        let p = PublishProperties { user_properties: props.clone(), ..Default::default() };
        c.publish_with_properties(topic, QoS::AtLeastOnce, true, br#"{"reboot":true}"#.to_vec(), p).await.unwrap();
        tokio::time::timeout(WAIT, async {
            while !matches!(el.poll().await.unwrap(), Event::Incoming(Packet::PubAck(_))) {}
        })
        .await
        .unwrap();
    }
    let s = wait_sync("both copies of the command handled", &|s| s["received"].as_u64().unwrap() >= 2).await;
    assert_eq!(s["last_change"], 1, "applied once: {s}");
    assert!(s["duplicates"].as_u64().unwrap() >= 1, "{s}");
    let v = client.get(format!("http://{}/v1/state/desired/cmd", agent.http_addr())).send().await.unwrap();
    let v: Value = v.json().await.unwrap();
    assert_eq!(v["value"], json!({"reboot": true}));
    assert_eq!(v["version"], json!({"vv": {"ops": 1}, "hlc": 1u64 << 40, "origin": "ops"}));

    // A plain retained value from cloud b, then b's link drops and returns:
    // the broker delivers the retained value again, which is not a new write.
    cloud_write(&b.broker.url(), "ferry/gw-1/desired/mode", br#""eco""#).await;
    let s = wait_sync("the plain value applied", &|s| s["last_change"] == 2).await;
    let received = s["received"].as_u64().unwrap();
    let reconnects = agent.destinations()[1].reconnects;
    proxy.handle().cut();
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.handle().restore();
    // Both retained values (cmd and mode) come again on the new subscription.
    let s = wait_sync("the retained values redelivered", &|s| s["received"].as_u64().unwrap() >= received + 2).await;
    assert!(agent.destinations()[1].reconnects > reconnects);
    assert_eq!(s["last_change"], 2, "a redelivered value changes nothing: {s}");
    agent.shutdown().await.unwrap();
}
