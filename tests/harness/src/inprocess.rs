//! [`InProcessBroker`]: a `rumqttd` broker inside the test process.
//!
//! It is the second, independent MQTT implementation for interop tests (the
//! first being mosquitto). It owns one OS thread running a current-thread
//! tokio runtime with two plain listeners on ephemeral loopback ports, one
//! for MQTT 3.1.1 and one for MQTT 5 (rumqttd serves one protocol per
//! listener). Dropping it shuts that runtime down, which closes the
//! listeners and every client connection.
//!
//! Limits: no TLS (built without it to keep the dependency tree free of
//! aws-lc), no persistence, and rumqttd's router thread is not stoppable, so
//! each broker leaves one idle thread behind until the test process exits.

use std::net::SocketAddr;
use std::thread;
use std::time::Duration;

use anyhow::{Context as _, bail};
use rumqttd::{ConnectionSettings, LinkType, Router, RouterConfig, Server, ServerSettings};
use tokio::sync::oneshot;

use crate::mqtt::Protocol;
use crate::net;

/// How long the broker gets to start accepting connections.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts with fresh ports when a chosen one was taken in the meantime.
const PORT_ATTEMPTS: usize = 5;
/// Largest payload the broker accepts; rumqttd's sample config uses 20 KiB,
/// too small for batch tests.
const MAX_PAYLOAD: usize = 1024 * 1024;

/// A running in-process rumqttd broker. Drop stops it.
#[derive(Debug)]
pub struct InProcessBroker {
    v311_port: u16,
    v5_port: u16,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl InProcessBroker {
    /// Starts the broker and waits until both listeners accept connections.
    pub async fn start() -> anyhow::Result<Self> {
        let mut last_err = None;
        for _ in 0..PORT_ATTEMPTS {
            let (v311_port, v5_port) = (net::free_port()?, net::free_port()?);
            if v311_port == v5_port {
                continue;
            }
            match Self::start_on(v311_port, v5_port).await {
                Ok(broker) => return Ok(broker),
                Err(e) => last_err = Some(e),
            }
        }
        match last_err {
            Some(e) => Err(e),
            None => bail!("no distinct free ports"),
        }
    }

    /// Stops the broker and starts an empty one on the same ports.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        let mut last_err = None;
        for _ in 0..PORT_ATTEMPTS {
            match Self::start_on(self.v311_port, self.v5_port).await {
                Ok(mut fresh) => {
                    self.shutdown = fresh.shutdown.take();
                    self.thread = fresh.thread.take();
                    return Ok(());
                }
                Err(e) => last_err = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(last_err.expect("at least one attempt"))
    }

    async fn start_on(v311_port: u16, v5_port: u16) -> anyhow::Result<Self> {
        let (shutdown, shutdown_rx) = oneshot::channel();
        let thread = thread::Builder::new()
            .name(format!("rumqttd-{v311_port}"))
            .spawn(move || run(v311_port, v5_port, shutdown_rx))
            .context("spawn rumqttd thread")?;
        let mut broker = Self { v311_port, v5_port, shutdown: Some(shutdown), thread: Some(thread) };
        for port in [v311_port, v5_port] {
            let t = broker.thread.as_ref().expect("thread just set");
            // The thread ends early only when a listener failed to bind.
            if !net::wait_for_port(port, READY_TIMEOUT, || t.is_finished()).await {
                broker.stop();
                bail!("rumqttd did not listen on ports {v311_port}/{v5_port}");
            }
        }
        Ok(broker)
    }

    /// The listener port for `protocol`.
    pub fn port(&self, protocol: Protocol) -> u16 {
        match protocol {
            Protocol::V311 => self.v311_port,
            Protocol::V5 => self.v5_port,
        }
    }

    /// The listener address for `protocol`.
    pub fn addr(&self, protocol: Protocol) -> SocketAddr {
        net::loopback(self.port(protocol))
    }

    /// `mqtt://127.0.0.1:PORT` of the listener for `protocol`.
    pub fn url(&self, protocol: Protocol) -> String {
        format!("mqtt://127.0.0.1:{}", self.port(protocol))
    }

    /// Stops the broker: closes both listeners and all client connections.
    pub fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for InProcessBroker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Body of the broker thread: the servers run on a runtime this thread owns,
/// so dropping the runtime at the end aborts every connection task.
fn run(v311_port: u16, v5_port: u16, shutdown: oneshot::Receiver<()>) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
        return;
    };
    let router = Router::new(0, router_config());
    let router_tx = router.spawn();
    let mut v311 = Server::new(settings("v311", v311_port), router_tx.clone(), rumqttd::protocol::v4::V4);
    let mut v5 = Server::new(settings("v5", v5_port), router_tx, rumqttd::protocol::v5::V5);
    rt.block_on(async {
        // Server::start returns only on a bind error; either ends the broker.
        tokio::select! {
            _ = v311.start(LinkType::Remote) => {}
            _ = v5.start(LinkType::Remote) => {}
            _ = shutdown => {}
        }
    });
    rt.shutdown_timeout(Duration::from_secs(1));
}

fn router_config() -> RouterConfig {
    // Values from rumqttd's sample rumqttd.toml.
    RouterConfig {
        max_connections: 10_010,
        max_outgoing_packet_count: 200,
        max_segment_size: 100 * 1024 * 1024,
        max_segment_count: 10,
        ..Default::default()
    }
}

fn settings(name: &str, port: u16) -> ServerSettings {
    ServerSettings {
        name: name.to_owned(),
        listen: net::loopback(port),
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: MAX_PAYLOAD,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    }
}
