use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ferry_harness::mqtt::{self, Protocol};
use ferry_harness::{Collector, FaultProxy, Mode, Mosquitto, MosquittoOptions, ProxyHandle};
use rumqttc::{ConnectionError, Event, Packet, StateError};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use crate::PATIENCE;

/// A TCP echo server on an ephemeral port; it lives as long as the test runtime.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

async fn round_trip(stream: &mut TcpStream) -> Duration {
    let start = Instant::now();
    stream.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    stream.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    start.elapsed()
}

/// Connects an MQTT 3.1.1 client with `keep_alive` and returns its event loop
/// after the CONNACK.
async fn connected_client(url: &str, keep_alive: Duration) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
    let mut opts = mqtt::options_v311(url, &mqtt::unique_client_id("proxied"), None).unwrap();
    opts.set_keep_alive(keep_alive);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 8);
    tokio::time::timeout(PATIENCE, async {
        loop {
            if let Event::Incoming(Packet::ConnAck(_)) = eventloop.poll().await.unwrap() {
                break;
            }
        }
    })
    .await
    .expect("no CONNACK through the proxy");
    (client, eventloop)
}

/// Polls until the event loop reports an error; returns it and when it came.
async fn next_error(eventloop: &mut rumqttc::EventLoop, within: Duration) -> (ConnectionError, Instant) {
    tokio::time::timeout(within, async {
        loop {
            if let Err(e) = eventloop.poll().await {
                return (e, Instant::now());
            }
        }
    })
    .await
    .expect("client saw no connection error")
}

#[tokio::test]
async fn proxy_passes_mqtt_traffic_and_counts_connections_and_bytes() {
    let broker = Mosquitto::start(MosquittoOptions::default()).await.unwrap();
    let proxy = FaultProxy::start(broker.addr()).await.unwrap();
    let faults = proxy.handle();
    let collector = Collector::start(&proxy.url(), "ferry/#", Protocol::V311).await.unwrap();

    mqtt::publish_v311(&broker.url(), "ferry/a", "through the proxy", PATIENCE).await.unwrap();

    let got = collector.wait_for(1, PATIENCE).await.unwrap();
    assert_eq!(got[0].payload_str(), "through the proxy");
    assert_eq!(faults.mode(), Mode::Pass);
    assert_eq!(faults.connections_accepted(), 1);
    assert_eq!(faults.open_connections(), 1);
    assert!(faults.bytes_to_upstream() > 0);
    // The delivered publish alone is longer than its payload.
    assert!(faults.bytes_to_client() > "through the proxy".len() as u64);
}

#[tokio::test]
async fn proxy_latency_delays_each_direction_by_at_least_the_latency() {
    let (proxy, mut stream) = echo_through_proxy().await;
    let faults = proxy.handle();

    let latency = Duration::from_millis(300);
    faults.latency(latency);
    let delayed = round_trip(&mut stream).await;

    // Lower bound only: one delay each way. No upper bound, machines are noisy.
    assert!(delayed >= 2 * latency, "round trip took only {delayed:?}");
    faults.pass();
    round_trip(&mut stream).await;
}

#[tokio::test]
async fn proxy_cut_disconnects_the_client_and_refuses_new_connections_until_restored() {
    let broker = Mosquitto::start(MosquittoOptions::default()).await.unwrap();
    let proxy = FaultProxy::start(broker.addr()).await.unwrap();
    let faults = proxy.handle();
    let (_client, mut eventloop) = connected_client(&proxy.url(), Duration::from_secs(30)).await;

    faults.cut();

    let (err, _) = next_error(&mut eventloop, PATIENCE).await;
    assert!(matches!(err, ConnectionError::Io(_) | ConnectionError::MqttState(_)), "unexpected error kind: {err:?}");
    let opts = mqtt::options_v311(&proxy.url(), &mqtt::unique_client_id("during-cut"), None).unwrap();
    assert!(mqtt::try_connect(opts, PATIENCE).await.is_err());
    assert!(faults.connections_refused() >= 1);

    faults.restore();
    let opts = mqtt::options_v311(&proxy.url(), &mqtt::unique_client_id("after-cut"), None).unwrap();
    mqtt::try_connect(opts, PATIENCE).await.unwrap();
}

#[tokio::test]
async fn proxy_blackhole_is_noticed_by_the_client_only_through_keep_alive() {
    let broker = Mosquitto::start(MosquittoOptions::default()).await.unwrap();
    let proxy = FaultProxy::start(broker.addr()).await.unwrap();
    let faults = proxy.handle();
    let keep_alive = Duration::from_secs(2);
    let (_client, mut eventloop) = connected_client(&proxy.url(), keep_alive).await;

    faults.blackhole();
    let since = Instant::now();
    let (err, at) = next_error(&mut eventloop, Duration::from_secs(15)).await;

    // Only a missing PINGRESP can reveal a link that is open but silent.
    assert!(
        matches!(err, ConnectionError::MqttState(StateError::AwaitPingResp)),
        "expected a keep-alive failure, got {err:?}"
    );
    assert!(at - since >= keep_alive, "noticed after only {:?}", at - since);
    // The proxy neither closed nor reset the connection.
    assert_eq!(faults.open_connections(), 1);
    assert_eq!(faults.connections_accepted(), 1);
}

#[tokio::test]
async fn proxy_blackhole_holds_bytes_and_restore_delivers_them() {
    let (proxy, mut stream) = echo_through_proxy().await;
    let faults = proxy.handle();
    let sent_before = faults.bytes_to_upstream();

    faults.blackhole();
    stream.write_all(b"held").await.unwrap();
    held_until_restore(&mut stream, &faults, || assert_eq!(faults.bytes_to_upstream(), sent_before)).await;
}

#[tokio::test]
async fn proxy_hold_replies_lets_bytes_up_and_holds_the_answers() {
    let (proxy, mut stream) = echo_through_proxy().await;
    let faults = proxy.handle();
    let (up_before, down_before) = (faults.bytes_to_upstream(), faults.bytes_to_client());

    faults.hold_replies();
    stream.write_all(b"held").await.unwrap();
    let start = Instant::now();
    while faults.bytes_to_upstream() < up_before + 4 {
        assert!(start.elapsed() < PATIENCE, "bytes to the upstream were held too");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    held_until_restore(&mut stream, &faults, || assert_eq!(faults.bytes_to_client(), down_before)).await;
}

/// A proxy in front of an echo server, and a client connection through it
/// that has made one round trip.
async fn echo_through_proxy() -> (FaultProxy, TcpStream) {
    let proxy = FaultProxy::start(echo_server().await).await.unwrap();
    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    round_trip(&mut stream).await;
    (proxy, stream)
}

/// Expects no echo of `held` on `stream` for half a second, runs `still_held`
/// while the proxy holds it, then restores the proxy and expects the echo.
async fn held_until_restore(stream: &mut TcpStream, faults: &ProxyHandle, still_held: impl FnOnce()) {
    let mut buf = [0u8; 4];
    let early = tokio::time::timeout(Duration::from_millis(500), stream.read_exact(&mut buf)).await;
    assert!(early.is_err(), "bytes came back while the proxy held them");
    still_held();
    faults.restore();
    tokio::time::timeout(PATIENCE, stream.read_exact(&mut buf)).await.expect("held bytes never arrived").unwrap();
    assert_eq!(&buf, b"held");
}

#[tokio::test]
async fn dropping_the_proxy_closes_its_listener_and_connections() {
    let proxy = FaultProxy::start(echo_server().await).await.unwrap();
    let addr = proxy.addr();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    round_trip(&mut stream).await;

    drop(proxy);

    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await.unwrap();
    assert!(matches!(read, Ok(0) | Err(_)), "connection still open: {read:?}");
    crate::wait_until_refused(addr).await;
}
