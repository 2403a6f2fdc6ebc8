//! The HTTP ingest API, end to end over real sockets against an in-process
//! agent: every accepted shape, defaults, dedup, and refusals that change
//! nothing.

use std::sync::Arc;
use std::time::Duration;

use ferry::clock::SystemClock;
use ferry::config::Config;
use ferry::runtime::Agent;
use ferry_harness::{FaultProxy, Mosquitto, MosquittoOptions};
use ferry_tests::{FerryProcess, ferry_bin, write_config_with};
use serde_json::{Value, json};

struct TestAgent {
    _dir: tempfile::TempDir,
    agent: Agent,
    client: reqwest::Client,
}

impl TestAgent {
    async fn start(extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let toml =
            format!("[agent]\ndevice_id = \"dev-1\"\ndata_dir = {:?}\n{extra}\n", dir.path().display().to_string());
        let toml = if toml.contains("[ingest.http]") {
            toml
        } else {
            format!("{toml}\n[ingest.http]\nlisten = \"127.0.0.1:0\"\n")
        };
        let config = Config::parse(&toml, "test.toml").unwrap();
        let agent = Agent::start(config, Arc::new(SystemClock)).await.unwrap();
        Self { _dir: dir, agent, client: reqwest::Client::new() }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.agent.http_addr())
    }

    async fn post(
        &self,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> (u16, Value, reqwest::header::HeaderMap) {
        let r = self
            .client
            .post(self.url("/v1/events"))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        let (status, headers) = (r.status().as_u16(), r.headers().clone());
        (status, r.json().await.unwrap_or(Value::Null), headers)
    }

    async fn status(&self) -> Value {
        self.client.get(self.url("/v1/status")).send().await.unwrap().json().await.unwrap()
    }

    fn events(&self) -> Vec<ferry::event::Event> {
        self.agent.store().read_after(0, 100_000).unwrap()
    }

    /// Events, bytes and last sequence: what a refused request must not change.
    async fn fingerprint(&self) -> (u64, u64, u64) {
        let s = self.status().await;
        let n = |k: &str| s["store"][k].as_u64().unwrap();
        (n("events"), n("bytes"), n("last_sequence"))
    }
}

#[tokio::test]
async fn a_plain_json_event_gets_cloudevents_defaults_filled_in() {
    let t = TestAgent::start("").await;
    let (status, body, _) =
        t.post("application/json", json!({"topic": "telemetry/temp", "data": {"c": 21.5}}).to_string()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["accepted"], 1);
    assert_eq!(body["events"][0]["sequence"], 1);
    let e = &t.events()[0];
    assert_eq!(e.body.source, "ferry://dev-1");
    assert_eq!(e.body.ty, "ferry.event");
    assert_eq!(e.body.subject, "telemetry/temp");
    assert_eq!(e.body.datacontenttype.as_deref(), Some("application/json"));
    assert_eq!(e.body.data, br#"{"c":21.5}"#);
    let id = body["events"][0]["id"].as_str().unwrap();
    assert_eq!(uuid::Uuid::parse_str(id).unwrap().get_version_num(), 7, "generated ids are UUIDv7");
    assert!(e.body.time_nanos > 0);
}

#[tokio::test]
async fn arrays_ndjson_and_cloudevents_shapes_are_all_accepted() {
    let t = TestAgent::start("").await;
    let (s, b, _) = t.post("application/json", r#"[{"topic":"a","data":1},{"topic":"b","data":2}]"#).await;
    assert_eq!((s, b["accepted"].as_u64()), (200, Some(2)));
    let (s, b, _) =
        t.post("application/x-ndjson", "{\"topic\":\"c\",\"data\":3}\n{\"topic\":\"d\",\"data\":4}\n").await;
    assert_eq!((s, b["accepted"].as_u64()), (200, Some(2)));
    let ce = json!({"specversion":"1.0","id":"ce-1","source":"/sdk","type":"com.acme.reading","subject":"e","data":{"v":5},"traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"});
    let (s, b, _) = t.post("application/cloudevents+json", ce.to_string()).await;
    assert_eq!((s, b["accepted"].as_u64()), (200, Some(1)), "{b}");
    let batch = json!([{"specversion":"1.0","id":"ce-2","source":"/sdk","type":"t","subject":"f","data":6},
                       {"specversion":"1.0","id":"ce-3","source":"/sdk","type":"t","subject":"g","data_base64":"AAE="}]);
    let (s, b, _) = t.post("application/cloudevents-batch+json", batch.to_string()).await;
    assert_eq!((s, b["accepted"].as_u64()), (200, Some(2)), "{b}");
    let r = t
        .client
        .post(t.url("/v1/events"))
        .header("content-type", "text/plain")
        .header("ce-specversion", "1.0")
        .header("ce-id", "bin-1")
        .header("ce-source", "/sdk")
        .header("ce-type", "com.acme.log")
        .header("ce-subject", "logs/app")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let events = t.events();
    let subjects: Vec<&str> = events.iter().map(|e| e.body.subject.as_str()).collect();
    assert_eq!(subjects, ["a", "b", "c", "d", "e", "f", "g", "logs/app"]);
    assert!(events.windows(2).all(|w| w[0].sequence + 1 == w[1].sequence));
    let ce = &events[4];
    assert_eq!((ce.body.id.as_str(), ce.body.ty.as_str()), ("ce-1", "com.acme.reading"));
    assert_eq!(ce.body.extensions[0].0, "traceparent");
    assert_eq!(events[6].body.data, [0, 1]);
    let bin = &events[7];
    assert_eq!((bin.body.data.as_slice(), bin.body.datacontenttype.as_deref()), (&b"hello"[..], Some("text/plain")));
}

#[tokio::test]
async fn a_retried_event_is_acknowledged_again_and_stored_once() {
    let t = TestAgent::start("").await;
    let ev = json!([{"topic": "a", "id": "order-17", "data": 1}]).to_string();
    let (_, first, _) = t.post("application/json", ev.clone()).await;
    let (s, again, _) = t.post("application/json", ev).await;
    assert_eq!(s, 200);
    assert_eq!(again["duplicates"], 1);
    assert_eq!(again["events"][0]["duplicate"], true);
    assert_eq!(again["events"][0]["sequence"], first["events"][0]["sequence"]);
    assert_eq!(t.events().len(), 1);
}

#[tokio::test]
async fn malformed_requests_get_400_naming_index_and_field_and_store_nothing() {
    let t = TestAgent::start("").await;
    t.post("application/json", r#"{"topic":"seed","data":0}"#).await;
    let before = t.fingerprint().await;
    let cases = [
        (r#"[{"topic":"ok","data":1},{"topic":"bad/#","data":2}]"#, Some(1), Some("topic")),
        (r#"[{"topic":"ok","data":1},{"data":2}]"#, Some(1), Some("topic")),
        (r#"{"topic":"ok"}"#, Some(0), Some("data")),
        (r#"{"topic":"ok","data":1,"tiem":"x"}"#, Some(0), Some("tiem")),
        (r#"{"topic":"ok","data":1,"time":"tuesday"}"#, Some(0), Some("time")),
        (r#"{"topic":"a//b","data":1}"#, Some(0), Some("topic")),
        (r#"{"topic":"ok","data":1"#, None, None),
        ("", None, None),
    ];
    for (body, index, field) in cases {
        let (s, b, _) = t.post("application/json", body).await;
        assert_eq!(s, 400, "{body} → {b}");
        assert_eq!(b["index"].as_u64().map(|i| i as usize), index, "{body} → {b}");
        assert_eq!(b["field"].as_str(), field, "{body} → {b}");
        assert!(!b["error"].as_str().unwrap().is_empty());
    }
    assert_eq!(t.fingerprint().await, before, "a refused request changed the store");
}

#[tokio::test]
async fn oversized_bodies_and_events_get_413_and_store_nothing() {
    let t = TestAgent::start(
        "[store]\nmax_event_size = \"1 KiB\"\n[ingest.http]\nlisten = \"127.0.0.1:0\"\nmax_body_size = \"64 KiB\"\n",
    )
    .await;
    let before = t.fingerprint().await;
    let big = "x".repeat(2000);
    let (s, b, _) =
        t.post("application/json", json!([{"topic":"a","data":1},{"topic":"a","data":big}]).to_string()).await;
    assert_eq!(s, 413, "{b}");
    assert_eq!(b["index"], 1);
    let huge: Vec<Value> = (0..200).map(|i| json!({"topic":"a","data":{"i":i,"pad":"y".repeat(500)}})).collect();
    let (s, b, _) = t.post("application/json", Value::Array(huge).to_string()).await;
    assert_eq!(s, 413, "{b}");
    assert!(b["error"].as_str().unwrap().contains("max_body_size"));
    assert_eq!(t.fingerprint().await, before);
}

#[tokio::test]
async fn a_full_store_under_reject_answers_507_with_retry_after_and_changes_nothing() {
    let t = TestAgent::start(
        "[store]\nquota = \"64 KiB\"\nfull_policy = \"reject\"\n[ingest.http]\nlisten = \"127.0.0.1:0\"\n",
    )
    .await;
    let fill: Vec<Value> = (0..50).map(|i| json!({"topic":"a","data":{"i":i,"pad":"z".repeat(1000)}})).collect();
    let (s, _, _) = t.post("application/json", Value::Array(fill.clone()).to_string()).await;
    assert_eq!(s, 200);
    let before = t.fingerprint().await;
    let (s, b, headers) = t.post("application/json", Value::Array(fill[..20].to_vec()).to_string()).await;
    assert_eq!(s, 507, "{b}");
    assert!(b["error"].as_str().unwrap().contains("full"));
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1);
    assert_eq!(t.fingerprint().await, before);
}

#[tokio::test]
async fn drop_oldest_keeps_alarms_while_telemetry_makes_way() {
    let classes = "[store]\nquota = \"64 KiB\"\nfull_policy = \"drop-oldest\"\n\
                   [[store.class]]\nname = \"alarms\"\ntopics = [\"alarms/#\"]\npriority = 200\n\
                   [ingest.http]\nlisten = \"127.0.0.1:0\"\n";
    let t = TestAgent::start(classes).await;
    let batch = |topic: &str, n: usize| {
        Value::Array((0..n).map(|i| json!({"topic": topic, "data": {"i": i, "pad": "p".repeat(1000)}})).collect())
            .to_string()
    };
    assert_eq!(t.post("application/json", batch("alarms/fire", 10)).await.0, 200);
    for _ in 0..6 {
        assert_eq!(t.post("application/json", batch("telemetry/t", 20)).await.0, 200);
    }
    let events = t.events();
    assert_eq!(events.iter().filter(|e| e.body.subject == "alarms/fire").count(), 10);
    let status = t.status().await;
    assert!(status["store"]["counters"]["evicted_events"].as_u64().unwrap() > 0);
    assert!(status["store"]["bytes"].as_u64().unwrap() <= 64 * 1024);
}

#[tokio::test]
async fn a_configured_token_is_required_everywhere_but_healthz() {
    let t =
        TestAgent::start("[ingest.http]\nlisten = \"127.0.0.1:0\"\ntoken = \"correct horse battery staple\"\n").await;
    let ev = r#"{"topic":"a","data":1}"#;
    let r = t.client.post(t.url("/v1/events")).body(ev).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = t.client.post(t.url("/v1/events")).bearer_auth("wrong token value!!").body(ev).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r =
        t.client.post(t.url("/v1/events")).bearer_auth("correct horse battery staple").body(ev).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(t.client.get(t.url("/v1/status")).send().await.unwrap().status(), 401);
    assert_eq!(t.client.get(t.url("/healthz")).send().await.unwrap().status(), 200);
    assert_eq!(t.events().len(), 1);
}

#[tokio::test]
async fn status_reports_events_bytes_quota_oldest_age_and_dead_letters() {
    let t = TestAgent::start("").await;
    t.post("application/json", r#"[{"topic":"a","data":1},{"topic":"b","data":2,"ttl":1}]"#).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    t.agent.store().sweep().await.unwrap();
    let s = t.status().await;
    assert_eq!(s["device_id"], "dev-1");
    let store = &s["store"];
    assert_eq!(store["events"], 1);
    assert_eq!(store["dead_letters"], 1);
    assert_eq!(store["quota_bytes"], 1u64 << 30);
    assert!(store["oldest_age_ms"].as_u64().unwrap() >= 1000);
    assert_eq!(store["last_sequence"], 2);
}

#[tokio::test]
async fn shutdown_finishes_and_a_restarted_agent_resumes_the_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "[agent]\ndata_dir = {:?}\n[ingest.http]\nlisten = \"127.0.0.1:0\"\n",
        dir.path().display().to_string()
    );
    let config = Config::parse(&toml, "t").unwrap();
    let agent = Agent::start(config.clone(), Arc::new(SystemClock)).await.unwrap();
    let client = reqwest::Client::new();
    let url = format!("http://{}/v1/events", agent.http_addr());
    client.post(&url).body(r#"[{"topic":"a","data":1},{"topic":"a","data":2}]"#).send().await.unwrap();
    agent.shutdown().await.unwrap();
    let agent = Agent::start(config, Arc::new(SystemClock)).await.unwrap();
    let url = format!("http://{}/v1/events", agent.http_addr());
    let b: Value = client.post(&url).body(r#"{"topic":"a","data":3}"#).send().await.unwrap().json().await.unwrap();
    assert_eq!(b["events"][0]["sequence"], 3);
    agent.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_receipt_says_per_destination_whether_an_event_is_delivered_pending_or_not_routed() {
    let broker = Mosquitto::start(MosquittoOptions::default()).await.unwrap();
    let down = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let destination = |name: &str, url: &str, routes: &str| {
        format!(
            "[[destination]]\nname = \"{name}\"\nurl = \"{url}\"\nroutes = [\"{routes}\"]\nkeep_alive = \"5s\"\n\
             backoff_base = \"100ms\"\nbackoff_cap = \"500ms\"\n\n"
        )
    };
    let t = TestAgent::start(&format!(
        "{}{}{}",
        destination("up", &broker.url(), "t/#"),
        destination("down", &format!("mqtt://127.0.0.1:{down}"), "t/#"),
        destination("elsewhere", &broker.url(), "u/#"),
    ))
    .await;
    let (code, answer, _) =
        t.post("application/json", json!({"topic": "t/a", "id": "r-1", "data": 1}).to_string()).await;
    assert_eq!(code, 200, "{answer}");
    let sequence = answer["events"][0]["sequence"].as_u64().unwrap();
    let receipt = |key: String| {
        let url = t.url(&format!("/v1/events/{key}"));
        let client = t.client.clone();
        async move {
            let r = client.get(url).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let state = |r: &Value, d: &str| {
        let row = r["destinations"].as_array().unwrap().iter().find(|x| x["destination"] == d).cloned();
        row.map(|x| x["state"].as_str().unwrap_or("?").to_owned()).unwrap_or_default()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let delivered = loop {
        let (code, r) = receipt("r-1".into()).await;
        assert_eq!(code, 200, "{r}");
        if state(&r, "up") == "delivered" {
            break r;
        }
        assert!(std::time::Instant::now() < deadline, "never delivered to `up`: {r}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(delivered["id"], "r-1");
    assert_eq!(delivered["sequence"], sequence);
    assert_eq!(delivered["in_log"], true, "`down` still needs it");
    assert_eq!(state(&delivered, "down"), "pending");
    assert_eq!(state(&delivered, "elsewhere"), "not-routed");
    let (code, by_sequence) = receipt(format!("seq:{sequence}")).await;
    assert_eq!(code, 200);
    assert_eq!(by_sequence, delivered, "by id and by sequence alike");

    let (code, r) = receipt("never-sent".into()).await;
    assert!(code == 404 && r["error"].as_str().unwrap().contains("dedup window"), "{code}: {r}");
    let (code, r) = receipt(format!("seq:{}", sequence + 1000)).await;
    assert_eq!(code, 404, "{r}");
    let (code, r) = receipt("seq:nope".into()).await;
    assert_eq!(code, 400, "{r}");

    // The same through the CLI, as a person reads it.
    let url = format!("http://{}", t.agent.http_addr());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(ferry_bin!()).args(["events", "show", "r-1", "--url", &url]).output().unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    for (d, s) in [("up", "delivered"), ("down", "pending"), ("elsewhere", "not-routed")] {
        assert!(text.lines().any(|l| l.starts_with(d) && l.contains(s)), "{d} {s}:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ack_levels_answer_once_enough_clouds_acknowledged_and_202_when_too_few_can() {
    let mut brokers = Vec::new();
    for _ in 0..3 {
        brokers.push(Mosquitto::start(MosquittoOptions::default()).await.unwrap());
    }
    let destinations: String = ["a", "b", "c"]
        .iter()
        .zip(&brokers)
        .map(|(name, b)| {
            format!(
                "[[destination]]\nname = \"{name}\"\nurl = \"{}\"\nkeep_alive = \"5s\"\n\
                 backoff_base = \"100ms\"\nbackoff_cap = \"500ms\"\n\n",
                b.url()
            )
        })
        .collect();
    let t = TestAgent::start(&format!("{destinations}[ingest.http]\nlisten = \"127.0.0.1:0\"\nack_timeout = \"2s\"\n"))
        .await;
    let post = |query: &'static str, id: &'static str| {
        let (client, url) = (t.client.clone(), t.url(&format!("/v1/events{query}")));
        async move {
            let r =
                client.post(url).body(json!({"topic": "t/a", "id": id, "data": 1}).to_string()).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let acked_by = |body: &Value| -> Vec<String> {
        let mut v: Vec<String> = body["events"][0]["acked_by"]
            .as_array()
            .unwrap_or(&vec![])
            .iter()
            .map(|x| x.as_str().unwrap().to_owned())
            .collect();
        v.sort();
        v
    };

    // Every cloud up: `all` answers once the three have acknowledged.
    let (code, body) = post("?ack=all", "k-0").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(acked_by(&body), ["a", "b", "c"]);
    assert_eq!(body["ack"], "all");

    // One down: a quorum is two of three.
    brokers[1].stop().unwrap();
    let (code, body) = post("?ack=quorum", "k-1").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(acked_by(&body), ["a", "c"]);

    // Two down: a quorum cannot be had within ack_timeout; 202, stored, delivery pending.
    brokers[2].stop().unwrap();
    let started = std::time::Instant::now();
    let (code, body) = post("?ack=quorum", "k-2").await;
    assert_eq!(code, 202, "{body}");
    assert_eq!(acked_by(&body), ["a"]);
    assert!(started.elapsed() >= Duration::from_secs(2), "answered before ack_timeout");
    // The header asks too, and `any` is met by the one cloud up.
    let r = t
        .client
        .post(t.url("/v1/events"))
        .header("ferry-ack", "any")
        .body(json!({"topic": "t/a", "id": "k-3", "data": 1}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let (code, body) = post("?ack=sometimes", "k-4").await;
    assert!(code == 400 && body["field"] == "ack", "{code}: {body}");
    assert!(t.events().iter().all(|e| e.body.id != "k-4"), "a refused request stores nothing");

    // The clouds come back: what timed out is delivered to them.
    brokers[1].restart().await.unwrap();
    brokers[2].restart().await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let r: Value = t.client.get(t.url("/v1/events/k-2")).send().await.unwrap().json().await.unwrap();
        let states: Vec<&str> =
            r["destinations"].as_array().unwrap().iter().map(|d| d["state"].as_str().unwrap()).collect();
        if states.iter().all(|s| *s == "delivered" || *s == "settled") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "k-2 never reached every cloud: {r}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ack_all_through_a_black_holed_link_answers_202_within_ack_timeout() {
    let broker = Mosquitto::start(MosquittoOptions::default()).await.unwrap();
    let proxy = FaultProxy::start(broker.addr()).await.unwrap();
    let t = TestAgent::start(&format!(
        "[[destination]]\nname = \"cloud\"\nurl = \"{}\"\nkeep_alive = \"30s\"\n\n\
         [ingest.http]\nlisten = \"127.0.0.1:0\"\nack_timeout = \"1s\"\n",
        proxy.url()
    ))
    .await;
    let post = |id: &'static str| {
        let (client, url) = (t.client.clone(), t.url("/v1/events?ack=all"));
        async move {
            let started = std::time::Instant::now();
            let r =
                client.post(url).body(json!({"topic": "t/a", "id": id, "data": 1}).to_string()).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap(), started.elapsed())
        }
    };
    let (code, body, _) = post("h-1").await;
    assert_eq!((code, &body["events"][0]["acked_by"]), (200, &json!(["cloud"])), "{body}");
    // Packets vanish, the connection stays open: no PUBACK comes.
    proxy.handle().blackhole();
    let (code, body, took) = post("h-2").await;
    assert_eq!(code, 202, "{body}");
    assert_eq!(body["events"][0]["acked_by"], json!([]));
    assert!(took >= Duration::from_secs(1) && took < Duration::from_secs(6), "answered after {took:?}");
    proxy.handle().restore();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_killed_while_answers_wait_loses_nothing_and_a_retry_gets_the_receipt() {
    let mut broker = Mosquitto::start(MosquittoOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config_with(
        dir.path(),
        "",
        &format!(
            "[[destination]]\nname = \"cloud\"\nurl = \"{}\"\nkeep_alive = \"5s\"\n\
             backoff_base = \"100ms\"\nbackoff_cap = \"500ms\"\n",
            broker.url()
        ),
    );
    broker.stop().unwrap();
    let agent = FerryProcess::start(ferry_bin!(), &config).unwrap();
    let client = reqwest::Client::new();
    let body = json!([{"topic": "t/a", "id": "w-1", "data": 1}, {"topic": "t/a", "id": "w-2", "data": 2}]).to_string();
    let waiting = tokio::spawn({
        let (client, url, body) = (client.clone(), format!("{}/v1/events?ack=all", agent.url()), body.clone());
        async move { client.post(url).body(body).send().await }
    });
    // The events are committed before the answer starts waiting.
    tokio::time::sleep(Duration::from_millis(800)).await;
    agent.kill();
    assert!(waiting.await.unwrap().is_err(), "the waiting answer died with the agent");

    broker.restart().await.unwrap();
    let agent = FerryProcess::start(ferry_bin!(), &config).unwrap();
    let r = client.post(format!("{}/v1/events?ack=all", agent.url())).body(body).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["duplicates"], 2, "both were stored before the kill: {answer}");
    for e in answer["events"].as_array().unwrap() {
        assert_eq!(e["acked_by"], json!(["cloud"]), "{answer}");
    }
    let receipt: Value =
        client.get(format!("{}/v1/events/w-2", agent.url())).send().await.unwrap().json().await.unwrap();
    assert_eq!(receipt["destinations"][0]["state"], "delivered", "{receipt}");
    agent.terminate();
}
