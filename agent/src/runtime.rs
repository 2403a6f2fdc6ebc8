//! Runtime wiring: the one place that builds the services, connects them and
//! orders shutdown.
//!
//! Start: load TLS material, open the store (recovering it after a crash),
//! start one forwarder per destination, then bind and serve the HTTP API.
//! Stop: the API stops accepting and finishes the requests in flight (each
//! waits for its commit); forwarders collect outstanding PUBACKs and save
//! their cursors; then the store writer commits what is queued and exits.
//! Services never start or stop each other.

use std::future::Future;
use std::net::SocketAddr;

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::clock::SharedClock;
use crate::config::Config;
use crate::forward::{Forwarder, link};
use crate::ingest::mqtt::MqttIngest;
use crate::ingest::{Ingest, http};
use crate::store::{Store, StoreError};

/// Why the agent could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The HTTP listener could not be bound.
    #[error("cannot listen on {addr} (ingest.http.listen): {source}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// A destination's TLS material could not be loaded.
    #[error("destination {name}: {source}")]
    Destination {
        /// The destination.
        name: String,
        /// The cause.
        source: link::LinkError,
    },
    /// The HTTP server failed.
    #[error("HTTP API failed: {0}")]
    Serve(std::io::Error),
    /// A service task panicked.
    #[error("a service task failed: {0}")]
    Task(String),
}

/// A running agent.
pub struct Agent {
    store: Store,
    http_addr: SocketAddr,
    stop_http: oneshot::Sender<()>,
    http: JoinHandle<std::io::Result<()>>,
    stop_forwarders: watch::Sender<bool>,
    forwarders: Vec<Forwarder>,
    mqtt_ingest: Option<JoinHandle<()>>,
}

impl Agent {
    /// Opens the store and starts every service.
    pub async fn start(config: Config, clock: SharedClock) -> Result<Self, RunError> {
        // TLS material is read before anything starts, so a bad file stops start-up.
        let mut tls = Vec::with_capacity(config.destinations.len());
        for d in &config.destinations {
            let t = if d.endpoint.tls {
                Some(
                    link::tls_config(&d.endpoint)
                        .map_err(|source| RunError::Destination { name: d.name.clone(), source })?,
                )
            } else {
                None
            };
            tls.push(t);
        }
        let store_config = config.store.clone();
        let store_clock = clock.clone();
        let store = tokio::task::spawn_blocking(move || Store::open(store_config, store_clock))
            .await
            .map_err(|e| RunError::Task(e.to_string()))??;

        let (listener, http_addr) =
            http::bind(&config.http).await.map_err(|source| RunError::Bind { addr: config.http.listen, source })?;
        let (stop_forwarders, stop_rx) = watch::channel(false);
        let forwarders: Vec<Forwarder> = config
            .destinations
            .iter()
            .zip(tls)
            .map(|(d, tls)| Forwarder::spawn(d.clone(), tls, store.clone(), clock.clone(), stop_rx.clone()))
            .collect();
        let statuses = forwarders.iter().map(Forwarder::status_handle).collect();

        let ingest = Ingest::new(store.clone(), config.agent.source(), clock);
        let mqtt_ingest = match &config.mqtt_ingest {
            Some(m) => {
                let tls = if m.endpoint.tls {
                    Some(
                        link::tls_config(&m.endpoint)
                            .map_err(|source| RunError::Destination { name: "ingest.mqtt".into(), source })?,
                    )
                } else {
                    None
                };
                Some(tokio::spawn(MqttIngest::new(m.clone(), tls, ingest.clone(), stop_rx.clone()).run()))
            }
            None => None,
        };
        let (stop_http, stopped) = oneshot::channel::<()>();
        let http = tokio::spawn(http::serve(
            listener,
            config.http.clone(),
            ingest,
            config.agent.device_id.clone(),
            statuses,
            async {
                let _ = stopped.await;
            },
        ));
        tracing::info!(
            config = %config.origin,
            device_id = %config.agent.device_id,
            store = %config.store.path.display(),
            "HTTP API listening on {http_addr}"
        );
        Ok(Self { store, http_addr, stop_http, http, stop_forwarders, forwarders, mqtt_ingest })
    }

    /// Where the HTTP API listens.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The event store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Status of each destination, in config order.
    pub fn destinations(&self) -> Vec<crate::forward::DestinationStatus> {
        self.forwarders.iter().map(Forwarder::status).collect()
    }

    /// Stops accepting, finishes requests in flight, lets forwarders collect
    /// outstanding acknowledgements and save their cursors, commits, and closes.
    pub async fn shutdown(self) -> Result<(), RunError> {
        let _ = self.stop_http.send(());
        let served = self.http.await.map_err(|e| RunError::Task(e.to_string()))?;
        let _ = self.stop_forwarders.send(true);
        if let Some(m) = self.mqtt_ingest {
            let _ = m.await;
        }
        for f in self.forwarders {
            f.join().await;
        }
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.close()).await.map_err(|e| RunError::Task(e.to_string()))?;
        tracing::info!("stopped cleanly");
        served.map_err(RunError::Serve)
    }
}

/// Runs the agent until `shutdown` resolves, then stops it in order.
pub async fn run(config: Config, clock: SharedClock, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    let agent = Agent::start(config, clock).await?;
    shutdown.await;
    tracing::info!("shutting down: no new requests; finishing commits");
    agent.shutdown().await
}
