//! Runtime wiring: the one place that builds the services, connects them and
//! orders shutdown.
//!
//! Start: load TLS material, open the store (recovering it after a crash),
//! load every plugin (compiled code comes from `{data_dir}/plugin-cache`,
//! shared with the plugin tools and pruned once they are loaded),
//! start the state service, then one forwarder per destination (subscribed
//! to what the state service consumes, with the filters whose stage names
//! it), then bind and serve the HTTP API (with the ingest-stage filters).
//! Stop: the API stops accepting and finishes the requests in flight (each
//! waits for its commit); forwarders collect outstanding PUBACKs and save
//! their cursors; then the store writer commits what is queued and exits.
//! Services never start or stop each other.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::api::admin::Admin;
use crate::api::http;
use crate::clock::SharedClock;
use crate::config::plugin::Stage;
use crate::config::{Config, MqttEndpoint};
use crate::downlink::DownlinkRouter;
use crate::fleet::FleetPlugin;
use crate::forward::{Forwarder, Stage as ForwardStage};
use crate::ingest::Ingest;
use crate::ingest::acks::AckWaiter;
use crate::ingest::mqtt::MqttIngest;
use crate::metrics::{DestinationSource, Sources};
use crate::mqtt;
use crate::plugin::{Plugin, PluginConfig, PluginError, PluginHandle, Sampling, World};
use crate::state::{StateError, StateHandle, StateService, StateServiceConfig};
use crate::store::{Store, StoreError};

/// Calls that may wait for one plugin before callers feel backpressure.
const PLUGIN_QUEUE_DEPTH: usize = 64;

/// State updates (cloud or local) that may wait for the state service.
const STATE_QUEUE_DEPTH: usize = 256;

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
    /// A broker connection's TLS material could not be loaded.
    #[error("{connection}: {source}")]
    Tls {
        /// Which connection: `destination NAME`, `[ingest.mqtt]` or `[state.local_mqtt]`.
        connection: String,
        /// The cause.
        source: mqtt::LinkError,
    },
    /// The HTTP server failed.
    #[error("HTTP API failed: {0}")]
    Serve(std::io::Error),
    /// A plugin could not be loaded (unreadable, invalid, wrong world, or
    /// it imports what the host does not provide).
    #[error("plugin `{name}`: {source}")]
    Plugin {
        /// The plugin's name.
        name: String,
        /// The cause.
        source: PluginError,
    },
    /// The state tables could not be opened.
    #[error("state: {0}")]
    State(#[from] StateError),
    /// A service task panicked.
    #[error("a service task failed: {0}")]
    Task(String),
}

/// A running agent.
pub struct Agent {
    store: Store,
    plugins: Vec<PluginHandle>,
    http_addr: SocketAddr,
    stop_http: oneshot::Sender<()>,
    http: JoinHandle<std::io::Result<()>>,
    stop_forwarders: watch::Sender<bool>,
    forwarders: Vec<Forwarder>,
    mqtt_ingest: Option<JoinHandle<()>>,
    fleet: Option<JoinHandle<()>>,
    state: StateService,
    local_state: Option<JoinHandle<()>>,
}

impl Agent {
    /// Opens the store and starts every service.
    pub async fn start(config: Config, clock: SharedClock) -> Result<Self, RunError> {
        // TLS material is read before anything starts, so a bad file stops start-up.
        let tls = config
            .destinations
            .iter()
            .map(|d| tls_for(&d.endpoint, &format!("destination {}", d.name)))
            .collect::<Result<Vec<_>, _>>()?;
        let ingest_tls = config.mqtt_ingest.as_ref().map(|m| tls_for(&m.endpoint, "[ingest.mqtt]")).transpose()?;
        let state_tls =
            config.state.local_mqtt.as_ref().map(|m| tls_for(&m.endpoint, "[state.local_mqtt]")).transpose()?;
        let store_config = config.store.clone();
        let store_clock = clock.clone();
        let store = tokio::task::spawn_blocking(move || Store::open(store_config, store_clock))
            .await
            .map_err(|e| RunError::Task(e.to_string()))??;

        let plugins = load_plugins(&config).await?;
        // Each plugin with its config, for picking them by stage and world.
        let configured = || config.plugins.iter().zip(&plugins);
        let ingest_filters =
            configured().filter(|(c, _)| c.stage == Some(Stage::Ingest)).map(|(_, h)| h.clone()).collect();

        let (listener, http_addr) =
            http::bind(&config.http).await.map_err(|source| RunError::Bind { addr: config.http.listen, source })?;
        let (stop_forwarders, stop_rx) = watch::channel(false);
        // Consumers of cloud-to-device messages register here before the
        // forwarders start, so every connection subscribes to their filters.
        let mut downlink = DownlinkRouter::new();
        let fleet = config.fleet.as_ref().map(|f| {
            crate::fleet::spawn(
                f.clone(),
                config.agent.device_id.clone(),
                config.agent.data_dir.clone(),
                configured().map(|(spec, handle)| FleetPlugin { spec: spec.clone(), handle: handle.clone() }).collect(),
                clock.clone(),
                &mut downlink,
                stop_rx.clone(),
            )
        });
        // Room for every destination's unacknowledged messages, so a
        // forwarder never waits to hand one over (see `downlink::WINDOW`).
        let downlink_depth = usize::from(crate::downlink::WINDOW) * config.destinations.len();
        let (state_tx, state_rx) = tokio::sync::mpsc::channel(downlink_depth.max(STATE_QUEUE_DEPTH));
        for d in &config.destinations {
            for f in &d.routing.subscribe {
                downlink.register(&d.name, d.subscription_filter(f), state_tx.clone());
            }
        }
        drop(state_tx);
        let merge_plugins =
            configured().filter(|(c, _)| c.world == World::Merge).map(|(c, h)| (c.name.clone(), h.clone())).collect();
        let state = StateService::start(
            StateServiceConfig {
                device_id: config.agent.device_id.clone(),
                destinations: config.destinations.clone(),
                state: config.state.clone(),
                merge_plugins,
                queue_depth: STATE_QUEUE_DEPTH,
            },
            store.clone(),
            clock.clone(),
            state_rx,
            stop_rx.clone(),
        )
        .await?;
        let local_state = config.state.local_mqtt.as_ref().map(|m| {
            tokio::spawn(crate::state::local::run(m.clone(), state_tls.flatten(), state.handle(), stop_rx.clone()))
        });
        let forwarders: Vec<Forwarder> = config
            .destinations
            .iter()
            .zip(tls)
            .map(|(d, tls)| {
                let downlink = downlink.for_destination(&d.name, &d.topic_prefix);
                let filters = configured()
                    .filter(|(c, _)| matches!(&c.stage, Some(Stage::Destination(name)) if *name == d.name))
                    .map(|(_, h)| h.clone())
                    .collect();
                let stage = ForwardStage::new(d.name.clone(), filters);
                Forwarder::spawn(d.clone(), tls, store.clone(), clock.clone(), stage, downlink, stop_rx.clone())
            })
            .collect();
        let statuses = forwarders
            .iter()
            .zip(&config.destinations)
            .map(|(f, d)| http::Destination {
                name: d.name.clone(),
                status: f.status_handle(),
                acked: f.acked(),
                replayer: f.replayer(),
            })
            .collect();
        // What each destination accepts: ingest and the state API refuse what one would refuse.
        let limits: Vec<_> = forwarders.iter().map(Forwarder::limits).collect();
        let admin = Admin {
            sources: Sources {
                device_id: config.agent.device_id.clone(),
                store: store.clone(),
                destinations: forwarders
                    .iter()
                    .map(|f| DestinationSource { status: f.status_handle(), lag: f.lag_histogram() })
                    .collect(),
                plugins: plugins.clone(),
            },
            clock: clock.clone(),
        };

        let ingest = Ingest::new(store.clone(), config.agent.source(), clock)
            .with_filters(ingest_filters)
            .with_destinations(limits.clone())
            .reporting(plugins.clone());
        let mqtt_ingest = config.mqtt_ingest.as_ref().map(|m| {
            let watches =
                forwarders.iter().zip(&config.destinations).map(|(f, d)| (d.name.clone(), f.acked())).collect();
            let acks = AckWaiter::new(ingest.store().clone(), watches, stop_rx.clone());
            tokio::spawn(MqttIngest::new(m.clone(), ingest_tls.flatten(), ingest.clone(), acks, stop_rx.clone()).run())
        });
        let (stop_http, stopped) = oneshot::channel::<()>();
        let http = tokio::spawn(http::serve(
            listener,
            config.http.clone(),
            ingest,
            config.agent.device_id.clone(),
            statuses,
            crate::api::admin::router(admin).merge(crate::api::state::routes(
                state.handle(),
                config.store.max_event_bytes,
                limits.clone(),
            )),
            // Broker connections: destinations, local ingest, local state.
            config.destinations.len() + 2,
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
        tracing::info!("memory budget {}", crate::config::MemoryBudget::of(&config));
        Ok(Self {
            store,
            plugins,
            http_addr,
            stop_http,
            http,
            stop_forwarders,
            forwarders,
            mqtt_ingest,
            state,
            local_state,
            fleet,
        })
    }

    /// Every loaded plugin, in config order (for the stages wired elsewhere
    /// and for status).
    pub fn plugins(&self) -> &[PluginHandle] {
        &self.plugins
    }

    /// Where the HTTP API listens.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The event store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The merged state (reads and local writes).
    pub fn state(&self) -> StateHandle {
        self.state.handle()
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
        if let Some(f) = self.fleet {
            let _ = f.await;
        }
        // After the forwarders: none of them waits on its queue any more.
        self.state.join().await;
        if let Some(l) = self.local_state {
            let _ = l.await;
        }
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.close()).await.map_err(|e| RunError::Task(e.to_string()))?;
        tracing::info!("stopped cleanly");
        served.map_err(RunError::Serve)
    }
}

/// Loads every configured plugin off the runtime, each onto its own thread.
/// The TLS setup of a broker connection, if it uses TLS; `connection` says
/// which one in the error.
fn tls_for(endpoint: &MqttEndpoint, connection: &str) -> Result<Option<Arc<rustls::ClientConfig>>, RunError> {
    if !endpoint.tls {
        return Ok(None);
    }
    mqtt::tls_config(endpoint).map(Some).map_err(|source| RunError::Tls { connection: connection.to_owned(), source })
}

async fn load_plugins(config: &Config) -> Result<Vec<PluginHandle>, RunError> {
    let cache_dir = crate::plugin::engine::cache_dir(Some(&config.agent.data_dir)).expect("a data dir is given");
    let mut handles = Vec::with_capacity(config.plugins.len());
    for spec in &config.plugins {
        let (spec, dir) = (spec.clone(), cache_dir.clone());
        let name = spec.name.clone();
        let data_dir = config.fleet.is_some().then(|| config.agent.data_dir.clone());
        let loaded = tokio::task::spawn_blocking(move || {
            // A version installed by a fleet update replaces the configured file.
            let installed = data_dir.and_then(|d| crate::fleet::installed_component(&d, &spec.name));
            let (mut plugin, report) = match installed {
                Some((version, path)) => {
                    let fleet_spec = PluginConfig { path, ..spec.clone() };
                    match Plugin::load(&fleet_spec, Some(&dir)) {
                        Ok(loaded) => {
                            tracing::info!(plugin = %spec.name, version, "running the fleet-installed version");
                            loaded
                        }
                        Err(e) => {
                            tracing::error!(plugin = %spec.name, version, error = %e, "fleet-installed version does not load; using the configured one");
                            Plugin::load(&spec, Some(&dir))?
                        }
                    }
                }
                None => Plugin::load(&spec, Some(&dir))?,
            };
            // A plugin that fails to start is not fatal: calls rebuild it and
            // its error policy applies, as for any later failure.
            if let Err(e) = plugin.warm_up() {
                tracing::warn!(plugin = %spec.name, error = %e, "plugin failed to instantiate");
            }
            Ok::<_, PluginError>((plugin, report))
        })
        .await
        .map_err(|e| RunError::Task(e.to_string()))?;
        let (plugin, report) = loaded.map_err(|source| RunError::Plugin { name: name.clone(), source })?;
        tracing::info!(
            plugin = %name,
            world = plugin.world().as_str(),
            compiled = ?report.source,
            load_ms = report.load_time.as_millis() as u64,
            "plugin loaded"
        );
        // Recent calls are kept only where a fleet update could shadow a new version on them.
        let sampling = if config.fleet.is_some() { Sampling::Keep } else { Sampling::Off };
        handles.push(
            PluginHandle::spawn(plugin, PLUGIN_QUEUE_DEPTH, sampling)
                .map_err(|source| RunError::Plugin { name, source })?,
        );
    }
    // What was just loaded is fresh; what no plugin used for a month goes.
    let pruned = tokio::task::spawn_blocking(move || crate::plugin::engine::prune_cache(&cache_dir, &[])).await;
    if let Ok(Ok(removed @ 1..)) = pruned {
        tracing::info!(removed, "pruned the plugin compile cache");
    }
    Ok(handles)
}

/// Runs the agent until `shutdown` resolves, then stops it in order.
pub async fn run(config: Config, clock: SharedClock, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    let agent = Agent::start(config, clock).await?;
    shutdown.await;
    tracing::info!("shutting down: no new requests; finishing commits");
    agent.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;

    #[tokio::test]
    async fn unusable_tls_material_of_any_connection_stops_start_up_before_the_store_opens() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "not a certificate\n").unwrap();
        let data = dir.path().join("data");
        let toml = format!(
            "[agent]\ndevice_id = \"gw\"\ndata_dir = {:?}\n[store]\nmin_free_disk = \"0 B\"\n\
             [ingest.http]\nlisten = \"127.0.0.1:0\"\n\
             [ingest.mqtt]\nurl = \"mqtts://127.0.0.1:1\"\ntopics = [\"sensors/#\"]\nca_file = {:?}\n",
            data.display().to_string(),
            ca.display().to_string()
        );
        let config = Config::parse(&toml, "test.toml").unwrap();
        let store_path = config.store.path.clone();
        let Err(e) = Agent::start(config, Arc::new(SystemClock)).await else { panic!("started with a bad CA file") };
        assert!(matches!(e, RunError::Tls { .. }), "{e:?}");
        assert!(e.to_string().starts_with("[ingest.mqtt]: "), "{e}");
        assert!(!store_path.exists(), "the store was opened before the TLS material was read");
    }
}
