//! The cloud emulator against a real Mosquitto: rumqttc clients publish
//! through it, and each test checks what arrived, what was acknowledged and
//! what the emulator counted. Limits are scaled down and windows made long
//! (a minute) wherever a test counts, so the outcome does not depend on how
//! fast this shared machine happens to be.

use std::time::{Duration, Instant};

use ferry_harness::cloud::{ConnackLimits, Metering};
use ferry_harness::mqtt::{self, Protocol};
use ferry_harness::{
    CloudCounters, CloudEmulator, CloudProfile, Collector, Excess, FaultProxy, Mosquitto, MosquittoOptions, RateLimit,
};
use rumqttc::v5::mqttbytes::v5::{DisconnectReasonCode, PublishProperties};
use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS};

use crate::PATIENCE;

/// How long a test listens for acknowledgements that must not come.
const QUIET: Duration = Duration::from_millis(400);

/// A limit of `limit` per minute: long enough that no test outlives its window.
fn per_minute(limit: u64, excess: Excess) -> Option<RateLimit> {
    Some(RateLimit { limit, per: Duration::from_secs(60), excess })
}

/// A Mosquitto broker and an emulator enforcing `profile` in front of it.
async fn cloud(profile: CloudProfile) -> (Mosquitto, CloudEmulator) {
    let broker = Mosquitto::start(MosquittoOptions::default()).await.unwrap();
    let cloud = CloudEmulator::start(broker.addr(), profile).await.unwrap();
    (broker, cloud)
}

/// An MQTT 3.1.1 client through `url`, after its CONNACK: a long keep-alive
/// (tests hold replies), room for 200 unacknowledged publishes and 1 MiB packets.
async fn connected_v311(url: &str, client_id: &str) -> (AsyncClient, EventLoop) {
    let mut opts = mqtt::options_v311(url, client_id, None).unwrap();
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_inflight(200);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(opts, 256);
    tokio::time::timeout(PATIENCE, async {
        loop {
            if let Event::Incoming(Packet::ConnAck(_)) = eventloop.poll().await.unwrap() {
                break;
            }
        }
    })
    .await
    .expect("no CONNACK through the emulator");
    (client, eventloop)
}

/// An MQTT 5 client through `url`, not yet connected; room to queue 256 requests
/// before the first poll.
fn client_v5(url: &str) -> (rumqttc::v5::AsyncClient, rumqttc::v5::EventLoop) {
    let mut opts = mqtt::options_v5(url, &mqtt::unique_client_id("cloud5"), None).unwrap();
    opts.set_keep_alive(Duration::from_secs(30));
    rumqttc::v5::AsyncClient::new(opts, 256)
}

/// Polls until `expected` PUBACKs arrived (or `PATIENCE` passed), then for
/// [`QUIET`] more, and returns how many arrived in all.
async fn pubacks(eventloop: &mut EventLoop, expected: usize) -> usize {
    let mut acks = 0;
    let _ = tokio::time::timeout(PATIENCE, async {
        while acks < expected {
            if let Event::Incoming(Packet::PubAck(_)) = eventloop.poll().await.unwrap() {
                acks += 1;
            }
        }
    })
    .await;
    let _ = tokio::time::timeout(QUIET, async {
        loop {
            if let Event::Incoming(Packet::PubAck(_)) = eventloop.poll().await.unwrap() {
                acks += 1;
            }
        }
    })
    .await;
    acks
}

/// Polls until the event loop fails, which is how a client sees the emulator close it.
async fn connection_error(eventloop: &mut EventLoop) -> rumqttc::ConnectionError {
    tokio::time::timeout(PATIENCE, async {
        loop {
            if let Err(e) = eventloop.poll().await {
                return e;
            }
        }
    })
    .await
    .expect("the emulator did not close the connection")
}

/// Like [`connection_error`], for an MQTT 5 client.
async fn connection_error_v5(eventloop: &mut rumqttc::v5::EventLoop) -> rumqttc::v5::ConnectionError {
    tokio::time::timeout(PATIENCE, async {
        loop {
            if let Err(e) = eventloop.poll().await {
                return e;
            }
        }
    })
    .await
    .expect("the emulator did not close the connection")
}

async fn publish_n(client: &AsyncClient, n: usize, topic: &str, payload_len: usize) {
    for i in 0..n {
        client.publish(format!("{topic}/{i}"), QoS::AtLeastOnce, false, vec![b'x'; payload_len]).await.unwrap();
    }
}

fn expect_only(counters: CloudCounters, what: &str, seen: u64) {
    assert_eq!(counters.publishes_seen, seen, "{what}: {counters:?}");
}

#[tokio::test]
async fn publishes_within_the_rate_all_arrive_and_are_acknowledged() {
    let (broker, cloud) = cloud(CloudProfile::unlimited().with_publish_limit(per_minute(50, Excess::Discard))).await;
    let collector = Collector::start(&broker.url(), "within/#", Protocol::V311).await.unwrap();
    let (client, mut eventloop) = connected_v311(&cloud.url(), &mqtt::unique_client_id("within")).await;

    publish_n(&client, 20, "within", 10).await;

    assert_eq!(pubacks(&mut eventloop, 20).await, 20);
    collector.wait_for(20, PATIENCE).await.unwrap();
    let counters = cloud.handle().counters();
    expect_only(counters, "all seen", 20);
    assert_eq!(counters.publishes_forwarded, 20);
    assert_eq!(counters.violations(), 0, "{:?}", cloud.handle().violations());
    assert_eq!(counters.connections_accepted, 1);
}

#[tokio::test]
async fn a_burst_over_the_publish_rate_is_discarded_never_acknowledged_and_counted() {
    let (broker, cloud) = cloud(CloudProfile::unlimited().with_publish_limit(per_minute(10, Excess::Discard))).await;
    let collector = Collector::start(&broker.url(), "burst/#", Protocol::V311).await.unwrap();
    let (client, mut eventloop) = connected_v311(&cloud.url(), &mqtt::unique_client_id("burst")).await;

    publish_n(&client, 25, "burst", 10).await;

    assert_eq!(pubacks(&mut eventloop, 10).await, 10, "only the publishes within the rate are acknowledged");
    let counters = cloud.handle().wait_until(PATIENCE, |c| c.publishes_seen == 25).await.unwrap();
    assert_eq!(counters.publishes_forwarded, 10);
    assert_eq!(counters.discarded_rate, 15);
    assert_eq!(counters.discarded(), 15);
    assert_eq!(counters.closed(), 0);
    collector.wait_for(10, PATIENCE).await.unwrap();
    tokio::time::sleep(QUIET).await;
    assert_eq!(collector.len(), 10, "a discarded publish reached the broker");
    assert_eq!(cloud.handle().violations().len(), 15);
}

#[tokio::test]
async fn the_inflight_limit_discards_publishes_beyond_it_until_acknowledgements_free_slots() {
    let broker = Mosquitto::start(MosquittoOptions::default()).await.unwrap();
    // The fault proxy holds Mosquitto's PUBACKs, so forwarded publishes stay in flight.
    let faults = FaultProxy::start(broker.addr()).await.unwrap();
    let cloud = CloudEmulator::start(faults.addr(), CloudProfile::unlimited().with_max_inflight(5)).await.unwrap();
    let (client, mut eventloop) = connected_v311(&cloud.url(), &mqtt::unique_client_id("inflight")).await;
    faults.handle().hold_replies();

    publish_n(&client, 8, "inflight", 10).await;
    assert_eq!(pubacks(&mut eventloop, 0).await, 0, "acknowledgements came through a held link");
    let counters = cloud.handle().wait_until(PATIENCE, |c| c.publishes_seen == 8).await.unwrap();
    assert_eq!((counters.publishes_forwarded, counters.discarded_inflight), (5, 3));

    faults.handle().restore();
    assert_eq!(pubacks(&mut eventloop, 5).await, 5, "only the forwarded publishes are acknowledged");
    // The acknowledgements freed the slots: the next publish goes through.
    client.publish("inflight/after", QoS::AtLeastOnce, false, "x").await.unwrap();
    assert_eq!(pubacks(&mut eventloop, 1).await, 1);
    let counters = cloud.handle().counters();
    assert_eq!((counters.publishes_forwarded, counters.discarded_inflight), (6, 3));
}

#[tokio::test]
async fn the_byte_rate_discards_publishes_beyond_the_bytes_allowed_per_window() {
    let (_broker, cloud) = cloud(CloudProfile::unlimited().with_byte_limit(per_minute(10_000, Excess::Discard))).await;
    let (client, mut eventloop) = connected_v311(&cloud.url(), &mqtt::unique_client_id("bytes")).await;

    // Each PUBLISH is a little over 3,000 bytes: three fit in 10,000, four do not.
    publish_n(&client, 5, "bytes", 3_000).await;

    assert_eq!(pubacks(&mut eventloop, 3).await, 3);
    let counters = cloud.handle().wait_until(PATIENCE, |c| c.publishes_seen == 5).await.unwrap();
    assert_eq!(counters.discarded_byte_rate, 2);
    assert!(counters.bytes_forwarded > 9_000 && counters.bytes_forwarded <= 10_000, "{counters:?}");
}

#[tokio::test]
async fn a_delaying_byte_rate_holds_publishes_back_instead_of_dropping_them() {
    let limit = RateLimit::per_second(3_000, Excess::Delay);
    let (_broker, cloud) = cloud(CloudProfile::unlimited().with_byte_limit(Some(limit))).await;
    let (client, mut eventloop) = connected_v311(&cloud.url(), &mqtt::unique_client_id("delay")).await;
    let start = Instant::now();

    // One 2,500-byte publish fits per second: the second waits a second, the third two.
    publish_n(&client, 3, "delay", 2_500).await;

    assert_eq!(pubacks(&mut eventloop, 3).await, 3);
    let elapsed = start.elapsed();
    assert!(elapsed >= Duration::from_millis(1_900), "three publishes took only {elapsed:?}");
    let counters = cloud.handle().counters();
    assert_eq!((counters.delayed_byte_rate, counters.discarded(), counters.publishes_forwarded), (2, 0, 3));
}

#[tokio::test]
async fn an_oversized_payload_closes_the_connection_and_is_counted() {
    let (_broker, cloud) = cloud(CloudProfile::unlimited().with_max_payload(1_000)).await;
    let (client, mut eventloop) = connected_v311(&cloud.url(), &mqtt::unique_client_id("big")).await;

    client.publish("big/ok", QoS::AtLeastOnce, false, vec![b'x'; 1_000]).await.unwrap();
    assert_eq!(pubacks(&mut eventloop, 1).await, 1, "a payload at the limit is accepted");
    client.publish("big/too", QoS::AtLeastOnce, false, vec![b'x'; 1_001]).await.unwrap();
    connection_error(&mut eventloop).await;

    let counters = cloud.handle().wait_until(PATIENCE, |c| c.connections_open == 0).await.unwrap();
    assert_eq!((counters.closed_payload_too_large, counters.closed()), (1, 1));
    assert_eq!(counters.publishes_forwarded, 1);
}

#[tokio::test]
async fn aws_topic_rules_close_the_connection_on_too_many_levels_or_bytes_and_on_a_reserved_prefix() {
    let (_broker, cloud) = cloud(CloudProfile::aws_iot_core()).await;
    let handle = cloud.handle();

    // Seven slashes are fine, eight close the connection.
    let (client, mut eventloop) = connected_v311(&cloud.url(), &mqtt::unique_client_id("deep")).await;
    client.publish("a/b/c/d/e/f/g/h", QoS::AtLeastOnce, false, "ok").await.unwrap();
    assert_eq!(pubacks(&mut eventloop, 1).await, 1);
    client.publish("a/b/c/d/e/f/g/h/i", QoS::AtLeastOnce, false, "deep").await.unwrap();
    connection_error(&mut eventloop).await;
    handle.wait_until(PATIENCE, |c| c.closed_topic_too_deep == 1).await.unwrap();

    let (client, mut eventloop) = connected_v311(&cloud.url(), &mqtt::unique_client_id("long")).await;
    client.publish("l".repeat(257), QoS::AtLeastOnce, false, "long").await.unwrap();
    connection_error(&mut eventloop).await;
    handle.wait_until(PATIENCE, |c| c.closed_topic_too_long == 1).await.unwrap();

    // Over MQTT 5 the client is told why before the socket closes.
    let (client, mut eventloop) = client_v5(&cloud.url());
    client.publish("$aws/things/t/shadow/update", rumqttc::v5::mqttbytes::QoS::AtLeastOnce, false, "{}").await.unwrap();
    let err = connection_error_v5(&mut eventloop).await;
    assert!(
        matches!(
            err,
            rumqttc::v5::ConnectionError::MqttState(rumqttc::v5::StateError::ServerDisconnect {
                reason_code: DisconnectReasonCode::TopicNameInvalid,
                ..
            })
        ),
        "expected a DISCONNECT with 0x90 Topic Name invalid, got {err:?}"
    );
    let counters = handle.wait_until(PATIENCE, |c| c.closed_reserved_topic == 1).await.unwrap();
    assert_eq!((counters.closed(), counters.publishes_forwarded), (3, 1));
}

#[tokio::test]
async fn over_mqtt5_the_connack_carries_the_profiles_limits() {
    let (_broker, cloud) = cloud(CloudProfile::aws_iot_core()).await;
    let (_client, mut eventloop) = client_v5(&cloud.url());

    let connack = tokio::time::timeout(PATIENCE, async {
        loop {
            if let rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::ConnAck(ack)) =
                eventloop.poll().await.unwrap()
            {
                return ack;
            }
        }
    })
    .await
    .expect("no CONNACK through the emulator");

    let props = connack.properties.expect("CONNACK properties");
    let aws: ConnackLimits = CloudProfile::aws_iot_core().connack.unwrap();
    assert_eq!(props.receive_max, Some(100));
    assert_eq!(props.max_packet_size, Some(128 * 1024));
    assert_eq!(props.topic_alias_max, aws.topic_alias_maximum);
    assert_eq!(props.max_qos, Some(1));
    assert_eq!(props.retain_available, Some(1));
}

#[tokio::test]
async fn metered_units_count_aws_five_kilobyte_increments_of_payload_topic_and_user_properties() {
    let (_broker, cloud) = cloud(CloudProfile::aws_iot_core()).await;
    assert!(matches!(cloud.profile().metering, Metering::Chunks { unit_bytes: 5120, .. }));
    let (client, mut eventloop) = client_v5(&cloud.url());
    let qos = rumqttc::v5::mqttbytes::QoS::AtLeastOnce;

    // 12 KiB + 3-byte topic: 3 units. 100 bytes: 1 unit.
    client.publish("m/a", qos, false, vec![b'x'; 12 * 1024]).await.unwrap();
    client.publish("m/b", qos, false, vec![b'x'; 100]).await.unwrap();
    // 5,000 payload bytes fit one unit; with the topic and a 201-byte user property they do not: 2 units.
    let props = PublishProperties { user_properties: vec![("k".to_owned(), "v".repeat(200))], ..Default::default() };
    client.publish_with_properties("m/c", qos, false, vec![b'x'; 5_000], props).await.unwrap();

    let mut acks = 0;
    tokio::time::timeout(PATIENCE, async {
        while acks < 3 {
            if let rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::PubAck(_)) =
                eventloop.poll().await.unwrap()
            {
                acks += 1;
            }
        }
    })
    .await
    .expect("publishes not acknowledged");
    let counters = cloud.handle().counters();
    assert_eq!((counters.publishes_forwarded, counters.metered_units), (3, 6), "{counters:?}");
}

#[tokio::test]
async fn iot_hub_accepts_only_the_devices_event_topic_and_refuses_mqtt5() {
    let (_broker, cloud) = cloud(CloudProfile::azure_iot_hub()).await;
    let handle = cloud.handle();
    let device = mqtt::unique_client_id("dev");

    let (client, mut eventloop) = connected_v311(&cloud.url(), &device).await;
    client.publish(format!("devices/{device}/messages/events/k=v"), QoS::AtLeastOnce, false, "t").await.unwrap();
    assert_eq!(pubacks(&mut eventloop, 1).await, 1);
    client.publish(format!("ferry/{device}/temp"), QoS::AtLeastOnce, false, "t").await.unwrap();
    connection_error(&mut eventloop).await;
    handle.wait_until(PATIENCE, |c| c.closed_topic_not_allowed == 1).await.unwrap();

    let (_client, mut eventloop) = client_v5(&cloud.url());
    let err = connection_error_v5(&mut eventloop).await;
    assert!(
        matches!(
            err,
            rumqttc::v5::ConnectionError::ConnectionRefused(
                rumqttc::v5::mqttbytes::v5::ConnectReturnCode::UnsupportedProtocolVersion
            )
        ),
        "expected CONNACK 0x84, got {err:?}"
    );
    let counters = handle.wait_until(PATIENCE, |c| c.closed_protocol_version == 1).await.unwrap();
    assert_eq!((counters.publishes_forwarded, counters.metered_units), (1, 1));
}

#[tokio::test]
async fn an_mqtt5_client_within_aws_limits_uses_the_whole_receive_maximum_without_a_violation() {
    // Mosquitto itself announces Receive Maximum 20; it acknowledges QoS 1 at
    // once, so a client holding the emulator's 100 in flight is not refused upstream.
    let (_broker, cloud) = cloud(CloudProfile::aws_iot_core()).await;
    let (client, mut eventloop) = client_v5(&cloud.url());
    let qos = rumqttc::v5::mqttbytes::QoS::AtLeastOnce;
    for i in 0..100 {
        client.publish(format!("full/{i}"), qos, false, vec![b'x'; 100]).await.unwrap();
    }

    let mut acks = 0;
    tokio::time::timeout(PATIENCE, async {
        while acks < 100 {
            if let rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::PubAck(_)) =
                eventloop.poll().await.unwrap()
            {
                acks += 1;
            }
        }
    })
    .await
    .expect("publishes not acknowledged");
    let counters = cloud.handle().counters();
    assert_eq!(counters.publishes_forwarded, 100);
    assert_eq!(counters.violations(), 0, "{:?}", cloud.handle().violations());
}
