//! The operator's view against real brokers: `/metrics` parsed as Prometheus
//! parses it, dead letters inspected and redriven to a broker, the store
//! inspected offline, trace context carried to the cloud, JSON logs, and
//! `ferry demo` run end to end.

use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry::clock::SystemClock;
use ferry::config::Config;
use ferry::runtime::Agent;
use ferry_harness::{Collector, Mosquitto, MosquittoOptions, Protocol};
use ferry_tests::{FerryProcess, ferry_bin, write_config_with};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

fn destination(name: &str, url: &str, protocol: &str, extra: &str) -> String {
    format!(
        "[[destination]]\nname = \"{name}\"\nurl = \"{url}\"\nprotocol = \"{protocol}\"\nkeep_alive = \"5s\"\nbackoff_base = \"100ms\"\nbackoff_cap = \"1s\"\n{extra}\n"
    )
}

async fn start_agent(dir: &std::path::Path, destinations: &str) -> Agent {
    let toml = format!(
        "[agent]\ndevice_id = \"gw-1\"\ndata_dir = {:?}\n[ingest.http]\nlisten = \"127.0.0.1:0\"\n{destinations}",
        dir.display().to_string()
    );
    Agent::start(Config::parse(&toml, "test.toml").unwrap(), Arc::new(SystemClock)).await.unwrap()
}

async fn wait_until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !done().await {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every sample of a scrape, by metric name and its `destination`/`plugin` label.
fn scrape(text: &str) -> HashMap<(String, String), prometheus_parse::Value> {
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let parsed = prometheus_parse::Scrape::parse(lines).expect("a valid Prometheus exposition");
    parsed
        .samples
        .into_iter()
        .map(|s| {
            let label = s.labels.get("destination").or_else(|| s.labels.get("plugin")).unwrap_or("").to_owned();
            ((s.metric, label), s.value)
        })
        .collect()
}

fn number(v: &prometheus_parse::Value) -> f64 {
    use prometheus_parse::Value::*;
    match v {
        Counter(x) | Gauge(x) | Untyped(x) => *x,
        other => panic!("not a number: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_parse_as_prometheus_and_count_what_was_ingested_and_delivered() {
    let broker = Mosquitto::start(MosquittoOptions::default()).await.unwrap();
    let collector = Collector::start(&broker.url(), "ferry/gw-1/#", Protocol::V5).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(dir.path(), &destination("cloud", &broker.url(), "v5", "")).await;
    let client = reqwest::Client::new();
    let base = format!("http://{}", agent.http_addr());
    let n = 750;
    for chunk in (0..n).collect::<Vec<_>>().chunks(250) {
        let body: Vec<Value> =
            chunk.iter().map(|i| json!({"topic": "t/m", "id": format!("m-{i}"), "data": i})).collect();
        let r = client.post(format!("{base}/v1/events")).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    // Ten retries of ids already stored: dedup hits, not new events.
    let retries: Vec<Value> = (0..10).map(|i| json!({"topic": "t/m", "id": format!("m-{i}"), "data": i})).collect();
    client.post(format!("{base}/v1/events")).json(&retries).send().await.unwrap();
    collector.wait_for(n, WAIT).await.unwrap();
    wait_until("the cursor to reach the last event", async || {
        agent.destinations()[0].acked_sequence == n as u64 && agent.destinations()[0].delivered == n as u64
    })
    .await;

    let r = client.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("application/openmetrics-text"));
    let text = r.text().await.unwrap();
    let m = scrape(&text);
    let get = |name: &str, label: &str| {
        number(m.get(&(name.to_owned(), label.to_owned())).unwrap_or_else(|| panic!("no {name}{{{label}}} in\n{text}")))
    };
    assert_eq!(get("ferry_ingest_events_total", ""), n as f64);
    let info =
        text.lines().find(|l| l.starts_with("ferry_agent_info{")).unwrap_or_else(|| panic!("no info in\n{text}"));
    assert!(info.contains(r#"device_id="gw-1""#) && info.ends_with(" 1"), "{info}");
    assert_eq!(get("ferry_ingest_dedup_hits_total", ""), 10.0);
    assert_eq!(get("ferry_store_last_sequence", ""), n as f64);
    assert_eq!(get("ferry_destination_delivered_events_total", "cloud"), n as f64);
    assert_eq!(get("ferry_destination_backlog_events", "cloud"), 0.0);
    assert_eq!(get("ferry_destination_up", "cloud"), 1.0);
    assert_eq!(get("ferry_destination_reconnects_total", "cloud"), 0.0);
    let payload_bytes: usize = collector.messages().iter().map(|m| m.payload.len()).sum();
    assert_eq!(get("ferry_destination_sent_bytes_total", "cloud"), payload_bytes as f64);
    assert!(get("ferry_store_commits_total", "") >= 1.0);
    assert!(get("ferry_store_quota_bytes", "") > 0.0);
    // One lag observation per acknowledged event; at least one commit timed.
    assert_eq!(get("ferry_destination_delivery_lag_seconds_count", "cloud"), n as f64);
    assert!(get("ferry_store_commit_seconds_count", "") >= 1.0);
    match m.get(&("ferry_destination_delivery_lag_seconds".to_owned(), "cloud".to_owned())) {
        Some(prometheus_parse::Value::Histogram(buckets)) => {
            let inf = buckets.iter().find(|b| b.less_than.is_infinite()).expect("+Inf bucket");
            assert_eq!(inf.count, n as f64);
        }
        other => panic!("lag is not a histogram: {other:?}"),
    }
    agent.shutdown().await.unwrap();
}

/// Runs the `ferry` CLI against `url`; returns success and stdout + stderr.
fn ferry(url: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(ferry_bin!()).args(args).env("FERRY_URL", url).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

async fn spawn_agent(config: &std::path::Path) -> FerryProcess {
    let config = config.to_owned();
    tokio::task::spawn_blocking(move || FerryProcess::start(ferry_bin!(), &config)).await.unwrap().unwrap()
}

async fn status(url: &str) -> Value {
    reqwest::get(format!("{url}/v1/status")).await.unwrap().json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_letter_redriven_after_the_limit_is_raised_reaches_the_broker_once() {
    let broker = Mosquitto::start(MosquittoOptions::default()).await.unwrap();
    let collector = Collector::start(&broker.url(), "ferry/test-device/#", Protocol::V311).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config_at = |url: &str, limit: &str| {
        write_config_with(dir.path(), "", &destination("cloud", url, "v311", &format!("max_packet_size = \"{limit}\"")))
    };
    let config = |limit: &str| config_at(&broker.url(), limit);
    // Accepted while the limit allowed them and the cloud was out of reach;
    // then the operator lowers the limit below two of them.
    let agent = spawn_agent(&config_at("mqtt://127.0.0.1:1", "1 MiB")).await;
    let url = agent.url();
    let big = "x".repeat(4000);
    let client = reqwest::Client::new();
    for (id, data) in [("big-1", big.as_str()), ("small-1", "ok"), ("big-2", big.as_str())] {
        let r = client
            .post(format!("{url}/v1/events"))
            .json(&json!({"topic": "t/dl", "id": id, "data": data}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let (exit, _) = agent.terminate();
    assert!(exit.success());
    let agent = spawn_agent(&config("1 KiB")).await;
    let url = agent.url();
    collector.wait_for(1, WAIT).await.unwrap();
    wait_until("two dead letters", async || status(&url).await["store"]["dead_letters"] == 2).await;

    let (ok, out) = ferry(&url, &["dlq", "list"]);
    assert!(
        ok && out.contains("2 dead letters held") && out.contains("cloud") && out.contains("max_packet_size"),
        "{out}"
    );
    let (ok, listed) = ferry(&url, &["dlq", "list", "--json"]);
    assert!(ok, "{listed}");
    let listed: Value = serde_json::from_str(&listed).unwrap();
    let numbers: Vec<u64> =
        listed["dead_letters"].as_array().unwrap().iter().map(|d| d["number"].as_u64().unwrap()).collect();
    let by_id = |id: &str| {
        listed["dead_letters"].as_array().unwrap().iter().find(|d| d["id"] == id).unwrap()["number"].as_u64().unwrap()
    };
    assert_eq!(numbers.len(), 2);
    let (ok, out) = ferry(&url, &["dlq", "show", &by_id("big-1").to_string()]);
    assert!(ok && out.contains("\"destination\": \"cloud\"") && out.contains("big-1"), "{out}");
    let (ok, out) = ferry(&url, &["dlq", "show", "999"]);
    assert!(!ok && out.contains("no dead letter numbered 999"), "{out}");

    // Offline inspection refuses a store the agent holds, and reads it once stopped.
    let data = dir.path().join("data");
    let (ok, out) = ferry(&url, &["store", "inspect", "--data", data.to_str().unwrap()]);
    assert!(!ok && out.contains("open in a running agent"), "{out}");
    let (exit, _) = agent.terminate();
    assert!(exit.success());
    let (ok, out) = ferry(&url, &["store", "inspect", "--data", data.to_str().unwrap(), "--json"]);
    assert!(ok, "{out}");
    let inspected: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(inspected["dead_letters"], 2);
    assert_eq!(inspected["last_sequence"], 3);
    assert_eq!(inspected["cursors"][0]["destination"], "cloud");
    assert_eq!(inspected["cursors"][0]["acked_sequence"], 3);
    let (ok, out) = ferry(&url, &["store", "inspect", "--data", data.to_str().unwrap()]);
    assert!(ok && out.contains("2 dead letters") && out.contains("cloud"), "{out}");

    // The operator raises the limit, restarts, and redrives one; the other is purged.
    let agent = spawn_agent(&config("1 MiB")).await;
    let url = agent.url();
    let (ok, out) = ferry(&url, &["dlq", "replay", &by_id("big-1").to_string()]);
    assert!(ok && out.contains("replayed 1") && out.contains("for cloud"), "{out}");
    let got = collector.wait_for(2, WAIT).await.unwrap();
    let redriven: Value = serde_json::from_slice(&got[1].payload).unwrap();
    assert_eq!(redriven["id"], "big-1");
    assert_eq!(redriven["data"], big.as_str());
    assert!(redriven.get("ferryroute").is_none(), "the route stays on the device: {redriven}");
    let (ok, out) = ferry(&url, &["dlq", "replay", &by_id("big-1").to_string()]);
    assert!(!ok && out.contains("no dead letter numbered"), "a replayed dead letter is gone: {out}");
    let (ok, out) = ferry(&url, &["status"]);
    assert!(ok && out.contains("DESTINATION") && out.contains("cloud") && out.contains("connected"), "{out}");
    assert!(out.contains("dead letters 1 held"), "{out}");
    let (ok, out) = ferry(&url, &["dlq", "purge", "--all"]);
    assert!(ok && out.contains("purged 1"), "{out}");
    let (ok, out) = ferry(&url, &["dlq", "list"]);
    assert!(ok && out.contains("0 dead letters held"), "{out}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(collector.len(), 2, "the redriven event arrives once, the purged one never");
    let (exit, _) = agent.terminate();
    assert!(exit.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn trace_context_reaches_the_cloud_in_binary_and_structured_mode() {
    let broker = Mosquitto::start(MosquittoOptions::default()).await.unwrap();
    let v5 = Collector::start(&broker.url(), "v5/gw-1/#", Protocol::V5).await.unwrap();
    let v311 = Collector::start(&broker.url(), "v311/gw-1/#", Protocol::V311).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dests = destination("a", &broker.url(), "v5", "topic_prefix = \"v5/gw-1/\"")
        + &destination("b", &broker.url(), "v311", "topic_prefix = \"v311/gw-1/\"");
    let agent = start_agent(dir.path(), &dests).await;
    let base = format!("http://{}", agent.http_addr());
    let client = reqwest::Client::new();
    let tp1 = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let tp2 = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    // CloudEvents binary mode over HTTP: the extension as a ce- header.
    let r = client
        .post(format!("{base}/v1/events"))
        .header("ce-specversion", "1.0")
        .header("ce-id", "t-1")
        .header("ce-source", "/plc")
        .header("ce-type", "com.acme.reading")
        .header("ce-subject", "line/1")
        .header("ce-traceparent", tp1)
        .header("ce-tracestate", "acme=1")
        .header("content-type", "application/json")
        .body(r#"{"c":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Structured mode: the extension as a top-level attribute.
    let r = client
        .post(format!("{base}/v1/events"))
        .header("content-type", "application/cloudevents+json")
        .body(
            json!({"specversion": "1.0", "id": "t-2", "source": "/plc", "type": "x", "subject": "line/2",
                   "traceparent": tp2, "data": {"c": 2}})
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let bin = v5.wait_for(2, WAIT).await.unwrap();
    let structured = v311.wait_for(2, WAIT).await.unwrap();
    let find = |id: &str| bin.iter().find(|m| m.user_property("id") == Some(id)).unwrap();
    assert_eq!(find("t-1").user_property("traceparent"), Some(tp1));
    assert_eq!(find("t-1").user_property("tracestate"), Some("acme=1"));
    assert_eq!(find("t-2").user_property("traceparent"), Some(tp2));
    let json: Vec<Value> = structured.iter().map(|m| serde_json::from_slice(&m.payload).unwrap()).collect();
    let find = |id: &str| json.iter().find(|v| v["id"] == id).unwrap();
    assert_eq!(find("t-1")["traceparent"], tp1);
    assert_eq!(find("t-1")["tracestate"], "acme=1");
    assert_eq!(find("t-2")["traceparent"], tp2);
    agent.shutdown().await.unwrap();
}

#[test]
fn json_logs_are_one_object_per_line_and_nothing_is_logged_per_event() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let config = write_config_with(dir.path(), "", "");
    let mut child = Command::new(ferry_bin!())
        .args(["run", "--log-format", "json", "--config"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut lines = Vec::new();
    let addr = loop {
        let line = rx.recv_timeout(Duration::from_secs(30)).expect("the agent logs that it listens");
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{v}");
        lines.push(line);
        if let Some(m) = v["fields"]["message"].as_str()
            && let Some(a) = m.split("listening on ").nth(1)
        {
            break a.to_owned();
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let client = reqwest::Client::new();
    for i in 0..200 {
        let body = json!({"topic": "t/log", "data": i}).to_string();
        let r = rt.block_on(client.post(format!("http://{addr}/v1/events")).body(body).send()).unwrap();
        assert_eq!(r.status(), 200);
    }
    std::thread::sleep(Duration::from_millis(300));
    let after: Vec<String> = rx.try_iter().collect();
    assert!(after.len() < 5, "200 events must not log a line each: {after:#?}");
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}

#[test]
fn ferry_demo_shows_an_outage_and_verifies_every_event_reached_both_clouds() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(ferry_bin!())
        .args(["demo", "--duration", "6s", "--sensors", "4", "--rate", "20", "--data"])
        .arg(dir.path().join("demo"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("cloud-b goes offline") && text.contains("cloud-b is back"), "{text}");
    assert!(text.contains("OFFLINE"), "progress shows the outage: {text}");
    assert!(text.contains("OK: every accepted event reached both clouds"), "{text}");
    assert!(text.contains("0 missing"), "{text}");
    assert!(text.contains("ferry store inspect --data"), "{text}");
    // scripts/test.sh builds the example plugins first, so CI runs the demo with its filter.
    let filter = ferry_tests::repo_root().join("plugins/build/threshold-filter.wasm");
    if filter.is_file() {
        assert!(text.contains("glitched readings dropped before storage"), "{text}");
    } else {
        assert!(text.contains("the example filter is not built"), "{text}");
    }
}

#[test]
fn ferry_demo_refuses_a_data_directory_that_holds_anything() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keep.txt"), "mine").unwrap();
    let out = Command::new(ferry_bin!()).args(["demo", "--data"]).arg(dir.path()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("not empty"), "{err}");
    assert_eq!(std::fs::read_to_string(dir.path().join("keep.txt")).unwrap(), "mine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_metrics_count_calls_traps_and_timeouts_of_a_hostile_filter() {
    // Built by scripts/build-plugins.sh, which scripts/test.sh runs first.
    let hostile = ferry_tests::built_plugin("testdata/hostile-filter");
    let dir = tempfile::tempdir().unwrap();
    let config = write_config_with(
        dir.path(),
        "",
        &format!(
            "[[plugin]]\nname = \"hostile\"\npath = {:?}\nworld = \"filter\"\nstage = \"ingest\"\ntimeout_ms = 200\n",
            hostile.display().to_string()
        ),
    );
    let agent = spawn_agent(&config).await;
    let client = reqwest::Client::new();
    for topic in ["good/1", "hostile/trap", "good/2", "hostile/loop", "good/3"] {
        let r = client
            .post(format!("{}/v1/events", agent.url()))
            .json(&json!({"topic": topic, "data": {"n": 1}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let text = client.get(format!("{}/metrics", agent.url())).send().await.unwrap().text().await.unwrap();
    let m = scrape(&text);
    let get = |name: &str, label: &str| {
        number(m.get(&(name.to_owned(), label.to_owned())).unwrap_or_else(|| panic!("no {name}{{{label}}} in\n{text}")))
    };
    assert_eq!(get("ferry_plugin_calls_total", "hostile"), 5.0);
    assert_eq!(get("ferry_plugin_events_total", "hostile"), 5.0);
    assert_eq!(get("ferry_plugin_failures_total", "hostile"), 2.0);
    assert_eq!(get("ferry_plugin_traps_total", "hostile"), 1.0);
    assert_eq!(get("ferry_plugin_timeouts_total", "hostile"), 1.0);
    assert_eq!(get("ferry_plugin_circuit_open", "hostile"), 0.0);
    assert_eq!(get("ferry_dead_letters", ""), 2.0, "both failed events are dead letters");
    assert_eq!(get("ferry_ingest_events_total", ""), 3.0);
    let (exit, _) = agent.terminate();
    assert!(exit.success());
}
