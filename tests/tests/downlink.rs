//! Downlink over real brokers: a forwarder subscribes to its consumers'
//! filters on every connection, hands each message over with its MQTT
//! metadata, and acknowledges it only once the consumer has.

use std::sync::Arc;
use std::time::Duration;

use ferry::clock::SystemClock;
use ferry::config::{Config, StoreConfig};
use ferry::downlink::{Delivery, DownlinkRouter};
use ferry::forward::Forwarder;
use ferry::store::Store;
use ferry::topic::TopicFilter;
use ferry_harness::{FaultProxy, Mosquitto, MosquittoOptions, mqtt};
use tokio::sync::{mpsc, watch};

const WAIT: Duration = Duration::from_secs(30);

struct Running {
    _dir: tempfile::TempDir,
    forwarder: Forwarder,
    stop: watch::Sender<bool>,
    store: Store,
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(true);
        self.forwarder.join().await;
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.close()).await.unwrap();
    }
}

/// A forwarder to `url` whose downlink consumer is `consumer` on `filter`.
async fn forwarder(url: &str, protocol: &str, filter: &str, consumer: mpsc::Sender<Delivery>) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "[agent]\ndevice_id = \"gw-1\"\n[[destination]]\nname = \"cloud\"\nurl = \"{url}\"\nprotocol = \"{protocol}\"\n\
         keep_alive = \"5s\"\nbackoff_base = \"100ms\"\nbackoff_cap = \"500ms\"\n"
    );
    let config = Config::parse(&toml, "test.toml").unwrap();
    let d = config.destinations[0].clone();
    let store = Store::open(StoreConfig::at(dir.path().join("ferry.redb")), Arc::new(SystemClock)).unwrap();
    let mut router = DownlinkRouter::new();
    router.register("cloud", TopicFilter::new(filter).unwrap(), consumer);
    let (stop, stop_rx) = watch::channel(false);
    let downlink = router.for_destination("cloud", &d.topic_prefix);
    let forwarder = Forwarder::spawn(d, None, store.clone(), Arc::new(SystemClock), downlink, stop_rx);
    Running { _dir: dir, forwarder, stop, store }
}

async fn next(rx: &mut mpsc::Receiver<Delivery>) -> Delivery {
    tokio::time::timeout(WAIT, rx.recv()).await.expect("a delivery within the timeout").expect("queue open")
}

/// Publishes until one delivery arrives: the forwarder subscribes
/// asynchronously, so the first publishes may precede its subscription.
async fn publish_until_delivered(
    rx: &mut mpsc::Receiver<Delivery>,
    mut publish: impl AsyncFnMut() -> anyhow::Result<()>,
) -> Delivery {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        publish().await.unwrap();
        match tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
            Ok(Some(d)) => return d,
            _ => assert!(tokio::time::Instant::now() < deadline, "no delivery within {WAIT:?}"),
        }
    }
}

#[tokio::test]
async fn mqtt5_messages_reach_the_consumer_with_their_properties_and_key() {
    let broker = Mosquitto::start(MosquittoOptions::default()).await.unwrap();
    let (tx, mut rx) = mpsc::channel(16);
    let running = forwarder(&broker.url(), "v5", "ferry/gw-1/desired/#", tx).await;
    let d = publish_until_delivered(&mut rx, async || {
        mqtt::publish_v5(
            &broker.url(),
            "ferry/gw-1/desired/fan",
            b"{\"on\":true}".to_vec(),
            vec![("who".into(), "ops".into())],
            Some("application/json".into()),
            WAIT,
        )
        .await
    })
    .await;
    assert_eq!(&*d.message.destination, "cloud");
    assert_eq!(d.message.topic, "ferry/gw-1/desired/fan");
    assert_eq!(d.message.key.as_deref(), Some("desired/fan"));
    assert_eq!(&d.message.payload[..], b"{\"on\":true}");
    assert_eq!(d.message.user_property("who"), Some("ops"));
    assert_eq!(d.message.content_type.as_deref(), Some("application/json"));
    d.ack();
    // Topics outside the filter never arrive.
    mqtt::publish_v5(&broker.url(), "ferry/gw-1/other", b"x".to_vec(), vec![], None, WAIT).await.unwrap();
    mqtt::publish_v5(&broker.url(), "ferry/gw-1/desired/light", b"y".to_vec(), vec![], None, WAIT).await.unwrap();
    let d = next(&mut rx).await;
    assert_eq!(d.message.key.as_deref(), Some("desired/light"));
    d.ack();
    running.stop().await;
}

#[tokio::test]
async fn an_unacknowledged_message_comes_again_after_a_reconnect_and_an_acknowledged_one_does_not() {
    let broker = Mosquitto::start(MosquittoOptions::default()).await.unwrap();
    let proxy = FaultProxy::start(broker.addr()).await.unwrap();
    let (tx, mut rx) = mpsc::channel(16);
    let running = forwarder(&proxy.url(), "v311", "ferry/gw-1/commands/#", tx).await;
    let first = publish_until_delivered(&mut rx, async || {
        mqtt::publish_v311(&broker.url(), "ferry/gw-1/commands/warmup", b"w".to_vec(), WAIT).await
    })
    .await;
    first.ack();
    // Drain any extra warm-up copies, acking them.
    while let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
        d.ack();
    }

    mqtt::publish_v311(&broker.url(), "ferry/gw-1/commands/reboot", b"now".to_vec(), WAIT).await.unwrap();
    let held = next(&mut rx).await;
    assert_eq!(held.message.key.as_deref(), Some("commands/reboot"));
    // The link drops while the consumer still holds it; it is never acked.
    proxy.handle().cut();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(held);
    proxy.handle().restore();
    let again = next(&mut rx).await;
    assert_eq!(again.message.key.as_deref(), Some("commands/reboot"), "the broker delivers the unacked message again");
    assert_eq!(&again.message.payload[..], b"now");
    again.ack();

    // Once acked, a further reconnect brings nothing back.
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.handle().cut();
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.handle().restore();
    mqtt::publish_v311(&broker.url(), "ferry/gw-1/commands/marker", b"m".to_vec(), WAIT).await.unwrap();
    let d = next(&mut rx).await;
    assert_eq!(d.message.key.as_deref(), Some("commands/marker"), "no redelivery of the acked message");
    d.ack();
    running.stop().await;
}
