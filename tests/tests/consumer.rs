//! The consumer example in `docs/examples/consumer.py` (paho-mqtt and the
//! CloudEvents SDK) reads every wire form Ferry sends: MQTT 5 binary mode,
//! MQTT 3.1.1 structured mode and batches, from a real agent through a real
//! broker, and hands on each event once.
//!
//! The Python it runs is the one `scripts/install-test-deps.sh` sets up
//! (`$FERRY_TOOLS/consumer`, by default `~/.cache/ferry-tools/consumer`).

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use ferry_harness::{Mosquitto, MosquittoOptions};
use ferry_tests::{FerryProcess, ferry_bin, repo_root, write_config_with};
use serde_json::{Value, json};

fn python() -> PathBuf {
    let tools = std::env::var_os("FERRY_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/ferry-tools"));
    let python = tools.join("consumer/bin/python3");
    assert!(python.is_file(), "{} is missing: run scripts/install-test-deps.sh", python.display());
    python
}

/// Starts the consumer on `topic`; returns once it is subscribed.
fn consumer(port: u16, topic: &str, protocol: &str, count: usize) -> std::process::Child {
    let mut child = Command::new(python())
        .arg(repo_root().join("docs/examples/consumer.py"))
        .args(["--port", &port.to_string(), "--topic", topic, "--protocol", protocol])
        .args(["--count", &count.to_string(), "--timeout", "120"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running the consumer example");
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    loop {
        match lines.next() {
            Some(Ok(l)) if l.contains("subscribed") => break,
            Some(Ok(_)) => continue,
            _ => panic!("the consumer exited before it subscribed"),
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    child
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_example_reads_binary_structured_and_batched_events_once_each() {
    let broker = Mosquitto::start(MosquittoOptions::default()).await.unwrap();
    let url = broker.url();
    let dest = |name: &str, prefix: &str, protocol: &str, extra: &str| {
        format!(
            "[[destination]]\nname = \"{name}\"\nurl = \"{url}\"\nprotocol = \"{protocol}\"\ntopic_prefix = \"{prefix}/\"\n{extra}\n"
        )
    };
    let dests = [
        dest("binary", "bin", "v5", ""),
        dest("structured", "str", "v311", ""),
        dest("batched", "bat", "v5", "[destination.batch]\nmax_events = 50"),
    ]
    .concat();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config_with(dir.path(), "", &dests);
    const N: usize = 300;
    let consumers: Vec<_> = [("bin/#", "5"), ("str/#", "3.1.1"), ("bat/#", "5")]
        .iter()
        .map(|(topic, protocol)| consumer(broker.port(), topic, protocol, N))
        .collect();
    let agent = tokio::task::spawn_blocking(move || FerryProcess::start(ferry_bin!(), &config)).await.unwrap().unwrap();
    let body: Vec<Value> = (0..N)
        .map(|i| json!({"topic": format!("sensor/{}", i % 3), "id": format!("ev-{i}"), "data": {"n": i}}))
        .collect();
    let client = reqwest::Client::new();
    for chunk in body.chunks(100) {
        let r = client.post(format!("{}/v1/events", agent.url())).json(&chunk).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let want: HashSet<String> = (0..N).map(|i| format!("ev-{i}")).collect();
    for (form, child) in ["binary", "structured", "batched"].iter().zip(consumers) {
        let out = tokio::task::spawn_blocking(move || child.wait_with_output()).await.unwrap().unwrap();
        assert!(out.status.success(), "{form}: the consumer failed");
        let got: Vec<Value> =
            String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let ids: HashSet<String> = got.iter().map(|e| e["id"].as_str().unwrap().to_owned()).collect();
        assert_eq!(ids.len(), got.len(), "{form}: an event handed on twice");
        assert_eq!(ids, want, "{form}: not every event");
        assert!(got.iter().all(|e| e["data"]["n"].is_number() || e["data"].is_string()), "{form}: {:?}", got[0]);
    }
    let status: Value = client.get(format!("{}/v1/status", agent.url())).send().await.unwrap().json().await.unwrap();
    let batched = status["destinations"].as_array().unwrap().iter().find(|d| d["name"] == "batched").unwrap();
    assert!(batched["events_per_publish"].as_f64().unwrap() > 1.5, "the batched destination batched: {batched}");
}
