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

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::clock::SharedClock;
use crate::config::Config;
use crate::config::plugin::Stage;
use crate::downlink::DownlinkRouter;
use crate::fleet::FleetPlugin;
use crate::forward::{Forwarder, Stage as ForwardStage, link};
use crate::ingest::admin::Admin;
use crate::ingest::mqtt::MqttIngest;
use crate::ingest::{Ingest, http};
use crate::metrics::{DestinationSource, Sources};
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
    fleet: Vec<JoinHandle<()>>,
    state: StateService,
    local_state: Option<JoinHandle<()>>,
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

        let plugins = load_plugins(&config).await?;
        let ingest_filters = config
            .plugins
            .iter()
            .zip(&plugins)
            .filter(|(c, _)| c.stage == Some(Stage::Ingest))
            .map(|(_, h)| h.clone())
            .collect();

        let (listener, http_addr) =
            http::bind(&config.http).await.map_err(|source| RunError::Bind { addr: config.http.listen, source })?;
        let (stop_forwarders, stop_rx) = watch::channel(false);
        let fleet = match &config.fleet {
            Some(f) => crate::fleet::spawn(
                f.clone(),
                config.agent.device_id.clone(),
                config.agent.data_dir.clone(),
                config.destinations.iter().cloned().zip(tls.iter().cloned()).collect(),
                config
                    .plugins
                    .iter()
                    .zip(&plugins)
                    .map(|(spec, handle)| FleetPlugin { spec: spec.clone(), handle: handle.clone() })
                    .collect(),
                clock.clone(),
                stop_rx.clone(),
            ),
            None => Vec::new(),
        };
        // Consumers of cloud-to-device messages register here before the
        // forwarders start, so every connection subscribes to their filters.
        let mut downlink = DownlinkRouter::new();
        let (state_tx, state_rx) = tokio::sync::mpsc::channel(STATE_QUEUE_DEPTH);
        for d in &config.destinations {
            for f in &d.subscribe {
                downlink.register(&d.name, d.subscription_filter(f), state_tx.clone());
            }
        }
        drop(state_tx);
        let merge_plugins = config
            .plugins
            .iter()
            .zip(&plugins)
            .filter(|(c, _)| c.world == World::Merge)
            .map(|(c, h)| (c.name.clone(), h.clone()))
            .collect();
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
        let local_state = match &config.state.local_mqtt {
            Some(m) => {
                let tls = if m.endpoint.tls {
                    Some(
                        link::tls_config(&m.endpoint)
                            .map_err(|source| RunError::Destination { name: "state.local_mqtt".into(), source })?,
                    )
                } else {
                    None
                };
                Some(tokio::spawn(crate::state::local::run(m.clone(), tls, state.handle(), stop_rx.clone())))
            }
            None => None,
        };
        let forwarders: Vec<Forwarder> = config
            .destinations
            .iter()
            .zip(tls)
            .map(|(d, tls)| {
                let downlink = downlink.for_destination(&d.name, &d.topic_prefix);
                let filters = config
                    .plugins
                    .iter()
                    .zip(&plugins)
                    .filter(|(c, _)| matches!(&c.stage, Some(Stage::Destination(name)) if *name == d.name))
                    .map(|(_, h)| h.clone())
                    .collect();
                let stage = ForwardStage::new(d.name.clone(), filters);
                Forwarder::spawn(d.clone(), tls, store.clone(), clock.clone(), stage, downlink, stop_rx.clone())
            })
            .collect();
        let statuses = forwarders.iter().map(Forwarder::status_handle).collect();
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
            crate::ingest::admin::router(admin).merge(crate::state::http::routes(
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
        for f in self.fleet {
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
