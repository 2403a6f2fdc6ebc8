use std::time::Duration;

use ferry_harness::mqtt::{self, Protocol};
use ferry_harness::{Collector, Mosquitto, MosquittoOptions, TlsListener};
use rumqttc::{Event, Packet, QoS};

use crate::PATIENCE;

#[tokio::test]
async fn mosquitto_round_trips_a_publish_to_a_collector_over_mqtt_311() {
    let broker = Mosquitto::start(MosquittoOptions::default()).await.unwrap();
    let collector = Collector::start(&broker.url(), "ferry/#", Protocol::V311).await.unwrap();

    mqtt::publish_v311(&broker.url(), "ferry/dev1/temp", "21.5", PATIENCE).await.unwrap();

    let got = collector.wait_for(1, PATIENCE).await.unwrap();
    assert_eq!(got[0].topic, "ferry/dev1/temp");
    assert_eq!(got[0].payload_str(), "21.5");
    assert_eq!(got[0].qos, 1);
    assert!(got[0].user_properties.is_empty());
}

#[tokio::test]
async fn mosquitto_delivers_mqtt5_user_properties_and_content_type_to_a_collector() {
    let broker = Mosquitto::start(MosquittoOptions::default()).await.unwrap();
    let collector = Collector::start(&broker.url(), "ferry/#", Protocol::V5).await.unwrap();

    let props = vec![("ce_id".to_owned(), "evt-1".to_owned()), ("ce_type".to_owned(), "ferry.event".to_owned())];
    mqtt::publish_v5(
        &broker.url(),
        "ferry/dev1/temp",
        r#"{"t":21.5}"#,
        props.clone(),
        Some("application/json".to_owned()),
        PATIENCE,
    )
    .await
    .unwrap();

    let got = collector.wait_for(1, PATIENCE).await.unwrap();
    assert_eq!(got[0].user_properties, props);
    assert_eq!(got[0].user_property("ce_id"), Some("evt-1"));
    assert_eq!(got[0].content_type.as_deref(), Some("application/json"));
}

/// Connects `client_id` with a persistent session and returns the first
/// publish it receives, or `None` if none arrives within `wait`.
async fn persistent_session_receive(url: &str, client_id: &str, subscribe: bool, wait: Duration) -> Option<String> {
    let mut opts = mqtt::options_v311(url, client_id, None).unwrap();
    opts.set_clean_session(false);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 8);
    if subscribe {
        client.subscribe("queued/#", QoS::AtLeastOnce).await.unwrap();
    }
    let result = tokio::time::timeout(wait, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) if subscribe => return None,
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    return Some(String::from_utf8_lossy(&p.payload).into_owned());
                }
                Ok(_) => {}
                Err(e) => panic!("persistent subscriber: {e}"),
            }
        }
    })
    .await
    .ok()
    .flatten();
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
    result
}

#[tokio::test]
async fn mosquitto_restart_after_kill_keeps_the_port_and_queued_persistent_session_messages() {
    let mut broker = Mosquitto::start(MosquittoOptions { persistence: true, ..Default::default() }).await.unwrap();
    let url = broker.url();
    let client_id = mqtt::unique_client_id("persistent");
    // Create the session and its subscription, then go offline.
    assert_eq!(persistent_session_receive(&url, &client_id, true, PATIENCE).await, None);
    mqtt::publish_v311(&url, "queued/1", "kept across a crash", PATIENCE).await.unwrap();
    // mosquitto saves after each change, but asynchronously to the PUBACK.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let (port, old_pid) = (broker.port(), broker.pid().unwrap());
    broker.kill().unwrap();
    assert_eq!(broker.pid(), None);
    assert!(tokio::net::TcpStream::connect(broker.addr()).await.is_err(), "port still open after kill");
    broker.restart().await.unwrap();

    assert_eq!(broker.port(), port);
    assert_ne!(broker.pid(), Some(old_pid));
    let got = persistent_session_receive(&url, &client_id, false, PATIENCE).await;
    assert_eq!(got.as_deref(), Some("kept across a crash"), "log:\n{}", broker.log());
}

#[tokio::test]
async fn mosquitto_without_persistence_forgets_queued_messages_on_restart() {
    // The control for the test above: proves the message survives because of
    // persistence, not because restart is a no-op.
    let mut broker = Mosquitto::start(MosquittoOptions::default()).await.unwrap();
    let url = broker.url();
    let client_id = mqtt::unique_client_id("volatile");
    assert_eq!(persistent_session_receive(&url, &client_id, true, PATIENCE).await, None);
    mqtt::publish_v311(&url, "queued/1", "lost", PATIENCE).await.unwrap();

    broker.restart().await.unwrap();

    let got = persistent_session_receive(&url, &client_id, false, Duration::from_secs(2)).await;
    assert_eq!(got, None);
}

#[tokio::test]
async fn mosquitto_rejects_a_publish_larger_than_max_packet_size() {
    let broker =
        Mosquitto::start(MosquittoOptions { max_packet_size: Some(1024), ..Default::default() }).await.unwrap();

    mqtt::publish_v311(&broker.url(), "small", vec![b'x'; 100], PATIENCE).await.unwrap();
    let big = mqtt::publish_v311(&broker.url(), "big", vec![b'x'; 4096], PATIENCE).await;

    assert!(big.is_err(), "oversized publish was acknowledged");
}

#[tokio::test]
async fn mosquitto_start_fails_with_its_log_when_the_config_is_rejected() {
    let missing = std::env::temp_dir().join("ferry-harness-no-such-cert.pem");
    let err = Mosquitto::start(MosquittoOptions {
        tls: Some(TlsListener { ca: missing.clone(), cert: missing.clone(), key: missing, require_certificate: false }),
        ..Default::default()
    })
    .await
    .unwrap_err();

    let msg = format!("{err:#}");
    assert!(msg.contains("mosquitto exited"), "{msg}");
    assert!(msg.contains("ferry-harness-no-such-cert.pem"), "log missing from error: {msg}");
}

#[tokio::test]
async fn dropping_mosquitto_kills_its_process_and_removes_its_dir() {
    let broker = Mosquitto::start(MosquittoOptions::default()).await.unwrap();
    let pid = broker.pid().unwrap();
    let dir = broker.dir().to_owned();
    let addr = broker.addr();
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());

    drop(broker);

    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    assert!(!dir.exists());
    crate::wait_until_refused(addr).await;
}

#[tokio::test]
async fn mosquitto_stop_terminates_it_gracefully_and_restart_brings_it_back() {
    let mut broker = Mosquitto::start(MosquittoOptions::default()).await.unwrap();
    assert!(broker.log().contains(&format!("port {}", broker.port())), "{}", broker.log());

    broker.stop().unwrap();

    assert_eq!(broker.pid(), None);
    // Only a graceful shutdown (SIGTERM, not SIGKILL) gets to log this.
    assert!(broker.log().contains("terminating"), "{}", broker.log());
    broker.restart().await.unwrap();
    mqtt::publish_v311(&broker.url(), "after/stop", "back", PATIENCE).await.unwrap();
}
