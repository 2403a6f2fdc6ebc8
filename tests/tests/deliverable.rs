//! Accepted means deliverable, as a property: generated events, hostile
//! strings and sizes among them, go through ingest (decoding, validation,
//! the routed destinations' limits); every one ingest accepts is published
//! as the forwarder publishes it, over the agent's own MQTT link, to a real
//! Mosquitto in both protocol versions, which must take every one.
//!
//! `FERRY_DELIVERABLE_CASES` sets the number of generated cases (100,000
//! by default, the target).

use std::sync::Arc;
use std::time::Duration;

use ferry::clock::{Hlc, SystemClock};
use ferry::config::{Config, DestinationConfig, Protocol as FerryProtocol, StoreConfig};
use ferry::event::{Event, EventBody};
use ferry::ingest::Ingest;
use ferry::ingest::parse::parse_body;
use ferry::limits::DestinationLimits;
use ferry::mqtt::{Link, LinkEvent, LinkOptions};
use ferry::store::Store;
use ferry::wire;
use ferry_harness::{Mosquitto, MosquittoOptions};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config as RunnerConfig, RngAlgorithm, TestRng, TestRunner};
use serde_json::{Map, Value, json};

/// The packet limit of the broker and of the destinations ingest checks against.
const MAX_PACKET: u32 = 4096;

/// A character: mostly printable ASCII, sometimes anything, sometimes one
/// of the characters MQTT brokers refuse.
fn a_char() -> impl Strategy<Value = char> {
    prop_oneof![
        60 => proptest::char::range(' ', '~'),
        2 => any::<char>(),
        1 => prop::sample::select(vec!['\0', '\u{1}', '\u{1f}', '\u{7f}', '\u{85}', '\u{9f}', '\u{fdd0}', '\u{fdef}', '\u{fffe}', '\u{ffff}', '\u{1fffe}', '\u{10ffff}', '"', '\\', '/', '+', '#', '$', 'é', '✓']),
    ]
}

fn a_string(max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(a_char(), 0..max).prop_map(|c| c.into_iter().collect())
}

fn a_topic() -> impl Strategy<Value = String> {
    let level = prop_oneof![8 => "[a-z0-9_-]{1,8}", 1 => a_string(6)];
    prop::collection::vec(level, 1..5).prop_map(|levels| levels.join("/"))
}

fn an_extension_name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z0-9]{1,20}",
        1 => prop::sample::select(vec!["id", "source", "type", "subject", "time", "data", "specversion", "sequence", "hlc", "ferryroute", "dataschema", "partitionkey"]).prop_map(str::to_owned),
        1 => a_string(24),
    ]
}

/// Data of any size around the packet limit, as JSON or text.
fn some_data() -> impl Strategy<Value = (Option<String>, Value)> {
    prop_oneof![
        (0usize..(MAX_PACKET as usize + 512)).prop_map(|n| (None, json!("d".repeat(n)))),
        a_string(40).prop_map(|s| (None, json!({ "s": s }))),
        (a_string(40), 0usize..3000)
            .prop_map(|(s, n)| (Some("text/plain".to_owned()), json!(format!("{s}{}", "t".repeat(n))))),
        Just((None, json!(42))),
    ]
}

/// One generated request body: a Ferry event or a CloudEvent.
fn an_event() -> impl Strategy<Value = Value> {
    let ferry = (
        a_topic(),
        some_data(),
        prop::option::of(a_string(20)),
        prop::option::of(a_string(20)),
        prop::option::of(a_string(20)),
        prop::collection::vec((an_extension_name(), a_string(20)), 0..3),
    )
        .prop_map(|(topic, (ct, data), id, key, ty, ext)| {
            let mut o = Map::new();
            o.insert("topic".into(), json!(topic));
            o.insert("data".into(), data);
            if let Some(ct) = ct {
                o.insert("datacontenttype".into(), json!(ct));
            }
            for (k, v) in [("id", id), ("key", key), ("type", ty)] {
                if let Some(v) = v {
                    o.insert(k.into(), json!(v));
                }
            }
            if !ext.is_empty() {
                o.insert("extensions".into(), Value::Object(ext.into_iter().map(|(k, v)| (k, json!(v))).collect()));
            }
            Value::Object(o)
        });
    let cloudevent = (
        a_topic(),
        some_data(),
        a_string(20),
        a_string(20),
        prop::collection::vec((an_extension_name(), a_string(20)), 0..3),
    )
        .prop_map(|(subject, (ct, data), id, ty, ext)| {
            let mut o = Map::new();
            for (k, v) in [
                ("specversion", "1.0".to_owned()),
                ("source", "/gen".to_owned()),
                ("subject", subject),
                ("id", id),
                ("type", ty),
            ] {
                o.insert(k.into(), json!(v));
            }
            o.insert("data".into(), data);
            if let Some(ct) = ct {
                o.insert("datacontenttype".into(), json!(ct));
            }
            for (k, v) in ext {
                o.insert(k, json!(v));
            }
            Value::Object(o)
        });
    prop_oneof![3 => ferry, 1 => cloudevent]
}

fn destination(name: &str, protocol: &str) -> DestinationConfig {
    let toml = format!(
        "[agent]\ndevice_id = \"gw-1\"\n[[destination]]\nname = \"{name}\"\nurl = \"mqtt://127.0.0.1:1\"\nprotocol = \"{protocol}\"\nmax_packet_size = \"{MAX_PACKET} B\"\n"
    );
    Config::parse(&toml, "gen.toml").unwrap().destinations.remove(0)
}

/// What ingest accepted, as the events the forwarder would publish.
async fn accepted_events(cases: usize) -> (Vec<Event>, usize) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(StoreConfig::at(dir.path().join("ferry.redb")), Arc::new(SystemClock)).unwrap();
    let limits = vec![
        Arc::new(DestinationLimits::new(&destination("v5", "v5"))),
        Arc::new(DestinationLimits::new(&destination("v311", "v311"))),
    ];
    let ingest = Ingest::new(store.clone(), "ferry://gw-1".into(), Arc::new(SystemClock)).with_destinations(limits);
    let mut runner =
        TestRunner::new_with_rng(RunnerConfig::default(), TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]));
    let strategy = an_event();
    let mut accepted = Vec::new();
    let mut refused = 0;
    for n in 0..cases {
        let body = serde_json::to_vec(&strategy.new_tree(&mut runner).unwrap().current()).unwrap();
        let prepared = parse_body(None, |_| None, std::iter::empty(), &body)
            .map_err(Into::into)
            .and_then(|inputs| ingest.prepare(inputs));
        match prepared {
            Ok(events) => {
                for e in events {
                    let body: EventBody = postcard::from_bytes(&e.body).unwrap();
                    // The largest sequence and HLC: the longest attributes the wire can carry.
                    accepted.push(Event {
                        sequence: u64::MAX - n as u64,
                        hlc: Hlc(u64::MAX - n as u64),
                        expires_at_ms: None,
                        priority: 100,
                        body,
                    });
                }
            }
            Err(_) => refused += 1,
        }
    }
    store.close();
    (accepted, refused)
}

/// Publishes every event over the agent's own link to `url`, at most 64 at a
/// time; returns the events the broker refused (the connection dropped or a
/// PUBACK refused while they were in flight, each then sent alone to tell).
async fn publish_all(url: &str, protocol: FerryProtocol, events: &[Event]) -> Vec<String> {
    let name = match protocol {
        FerryProtocol::V5 => "v5",
        FerryProtocol::V311 => "v311",
    };
    let mut config = destination(name, name);
    let (host, port) = url.trim_start_matches("mqtt://").split_once(':').unwrap();
    config.endpoint.host = host.to_owned();
    config.endpoint.port = port.parse().unwrap();
    config.endpoint.client_id = format!("gen-{name}-{}", std::process::id());
    let opts = LinkOptions { inflight: 64, queue: 128, clean_session: true, manual_acks: false, receive_maximum: None };
    let encode = |e: &Event| {
        let topic = wire::topic(&config.topic_prefix, e);
        match protocol {
            FerryProtocol::V5 => {
                let m = wire::binary(e);
                (topic, m.payload, m.content_type, m.user_properties)
            }
            FerryProtocol::V311 => (topic, wire::structured(e), None, Vec::new()),
        }
    };
    let connect = async || -> Result<Link, String> {
        let mut link = Link::open(&config.endpoint, None, &opts);
        loop {
            if let LinkEvent::Connected { .. } = link.poll().await.map_err(|e| e.to_string())? {
                return Ok(link);
            }
        }
    };
    // Sends `batch` on `link`; Ok when every publish was acked.
    let send = async |link: &mut Link, batch: &[&Event]| -> Result<(), String> {
        let run = async {
            for e in batch {
                let (topic, payload, ct, props) = encode(e);
                link.publish(topic, payload, ct, props, false).map_err(|e| e.to_string())?;
            }
            let mut acked = 0;
            while acked < batch.len() {
                match link.poll().await.map_err(|e| e.to_string())? {
                    LinkEvent::Acked(_) => acked += 1,
                    LinkEvent::Refused { reason, .. } => return Err(format!("PUBACK {reason}")),
                    _ => {}
                }
            }
            Ok(())
        };
        tokio::time::timeout(Duration::from_secs(30), run).await.unwrap_or_else(|_| Err("no PUBACK within 30 s".into()))
    };
    let mut refused = Vec::new();
    let mut link = connect().await.expect("connecting to the broker");
    for chunk in events.chunks(64) {
        let batch: Vec<&Event> = chunk.iter().collect();
        if send(&mut link, &batch).await.is_ok() {
            continue;
        }
        // Something in the window broke the connection: send each alone to tell which.
        for e in chunk {
            let alone = async {
                let mut l = connect().await?;
                send(&mut l, &[e]).await
            };
            if let Err(why) = alone.await {
                refused.push(format!(
                    "{:?} (subject {:?}, {} data bytes): {why}",
                    e.body.id,
                    e.body.subject,
                    e.body.data.len()
                ));
            }
        }
        link = connect().await.expect("reconnecting to the broker");
    }
    refused
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_generated_event_ingest_accepts_is_taken_by_a_real_broker_in_both_protocols() {
    let cases = std::env::var("FERRY_DELIVERABLE_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(100_000);
    let started = std::time::Instant::now();
    let (accepted, refused) = accepted_events(cases).await;
    eprintln!("generated and ingested in {:?}", started.elapsed());
    // The generator must exercise both sides of the rules.
    assert!(
        accepted.len() > cases / 5,
        "only {} of {cases} cases accepted: the generator is too hostile",
        accepted.len()
    );
    assert!(refused > cases / 20, "only {refused} of {cases} cases refused: the generator is too tame");
    let broker =
        Mosquitto::start(MosquittoOptions { max_packet_size: Some(MAX_PACKET), ..Default::default() }).await.unwrap();
    for protocol in [FerryProtocol::V5, FerryProtocol::V311] {
        let undeliverable = publish_all(&broker.url(), protocol, &accepted).await;
        assert!(
            undeliverable.is_empty(),
            "{protocol:?}: {} of {} accepted events were refused by Mosquitto; the first: {:#?}",
            undeliverable.len(),
            accepted.len(),
            &undeliverable[..undeliverable.len().min(5)]
        );
    }
    eprintln!(
        "{cases} cases: {} events accepted and delivered in both protocols, {refused} requests refused",
        accepted.len()
    );
}
