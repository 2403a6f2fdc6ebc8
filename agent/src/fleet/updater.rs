//! The updater task: performs each plugin's update as fleet messages
//! arrive over the destinations' connections.
//!
//! Per plugin: a verified manifest of a newer version becomes the download
//! target (persisted); each chunk is checked against it and written to disk;
//! when all are there the component is assembled and checked against the
//! manifest, compiled against the plugin's world, put through the plugin
//! checks (`ferry plugin check`: no failures, valid verdicts, determinism,
//! and for merge plugins the convergence laws), run in shadow on the active
//! version's recent calls, then swapped in between two calls. During
//! probation the updater watches the new version's counters and swaps the
//! previous one back when it fails above the configured rate.
//!
//! What each message means and how the state moves (versions only go up, a
//! failed version is never retried, one download across clouds) is decided
//! by [`super::machine`]; this module does the I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::bundle::{Manifest, pattern_matches, valid_pattern};
use super::machine::{self, OnChunk, OnManifest, Probation, Refusal};
use super::report::{Report, Shadow, State, rfc3339};
use super::staging::{Persisted, PluginDir};
use super::topics::{self, FleetTopic};
use crate::clock::SharedClock;
use crate::config::{FleetConfig, PluginConfig};
use crate::downlink::{self, CompanionHandle, DeliveryReceiver, DownlinkMessage, DownlinkRouter, Retained};
use crate::plugin::check::{self, CheckOptions};
use crate::plugin::{Plugin, PluginError, PluginHandle, Sample};
use crate::topic::TopicFilter;

/// How often probation counters are looked at.
const PROBATION_TICK: Duration = Duration::from_millis(200);

/// Most plugin names this device does not have that it reports on.
const MAX_UNKNOWN_REPORTS: usize = 16;

/// A plugin the fleet may update: its configuration and its running handle.
#[derive(Clone)]
pub struct FleetPlugin {
    /// The `[[plugin]]` it was configured with.
    pub spec: PluginConfig,
    /// The running plugin.
    pub handle: PluginHandle,
}

/// Everything the updater needs that is not per plugin.
struct Env {
    config: FleetConfig,
    device: String,
    data_dir: PathBuf,
    clock: SharedClock,
}

struct Slot {
    plugin: FleetPlugin,
    dir: PluginDir,
    state: Persisted,
    received: BTreeSet<u32>,
}

/// Starts the updater, and attaches it to each fleet destination's
/// connection in `downlink` (so call it before the forwarders start). It
/// stops when `shutdown` turns true.
pub fn spawn(
    config: FleetConfig,
    device: String,
    data_dir: PathBuf,
    plugins: Vec<FleetPlugin>,
    clock: SharedClock,
    downlink: &mut DownlinkRouter,
    shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    // Room for every fleet destination's unacknowledged messages, so a
    // forwarder never waits to hand one over (see `downlink::WINDOW`).
    let (inbound_tx, inbound_rx) = mpsc::channel(usize::from(downlink::WINDOW) * config.destinations.len().max(1));
    let link = CompanionHandle::new(inbound_tx);
    for d in &config.destinations {
        downlink.attach(d, link.companion());
    }
    let root = config.topic_root.clone();
    let env = Env { config, device, data_dir, clock };
    let updater = Updater { env, slots: BTreeMap::new(), link, root };
    tokio::spawn(updater.run(plugins, inbound_rx, shutdown))
}

struct Updater {
    env: Env,
    slots: BTreeMap<String, Slot>,
    /// The destinations' connections: what to subscribe to, and the
    /// reports, every one in order so each step reaches the brokers.
    link: CompanionHandle,
    root: String,
}

impl Updater {
    async fn run(
        mut self,
        plugins: Vec<FleetPlugin>,
        mut inbound: DeliveryReceiver,
        mut shutdown: watch::Receiver<bool>,
    ) {
        for plugin in plugins {
            let dir = PluginDir::new(&self.env.data_dir, &plugin.spec.name);
            let load_dir = dir.clone();
            let state = match tokio::task::spawn_blocking(move || load_dir.load()).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::error!(plugin = %plugin.spec.name, error = %e, "fleet state unreadable; starting afresh");
                    Persisted::default()
                }
                Err(_) => return,
            };
            let name = plugin.spec.name.clone();
            let mut state = state;
            let data_dir = self.env.data_dir.clone();
            let n = name.clone();
            let intact = tokio::task::spawn_blocking(move || super::installed_component(&data_dir, &n).is_some())
                .await
                .unwrap_or(false);
            let reset = state.active.is_some() && !intact;
            if reset {
                // The start-up fell back to the configured component (see
                // `installed_component`): say so instead of claiming the version.
                tracing::error!(plugin = %name, "the installed fleet version is missing or damaged; running the configured one");
                state.active = None;
                state.previous = None;
                state.probation_until_ms = None;
                state.last = None;
            }
            let mut slot = Slot { plugin, dir, state, received: BTreeSet::new() };
            if let Some(target) = slot.state.target.clone() {
                let d = slot.dir.clone();
                let t = target.clone();
                slot.received = tokio::task::spawn_blocking(move || d.chunks_on_disk(&t)).await.unwrap_or_default();
                tracing::info!(
                    plugin = %name,
                    version = target.version,
                    have = slot.received.len(),
                    total = target.total(),
                    "resuming download: {} of {} chunks on disk",
                    slot.received.len(),
                    target.total()
                );
            }
            self.slots.insert(name.clone(), slot);
            if reset {
                self.save(&name).await;
            }
            self.sync_subscriptions();
            let report = match self.slots[&name].state.target.clone() {
                Some(t) => self.progress(&name, &t),
                None => match self.slots[&name].state.last.clone() {
                    Some(last) => Report { time: self.now(), ..last },
                    None => self.report(&name, State::Running),
                },
            };
            self.publish(&name, report, false).await;
            if self.slots[&name]
                .state
                .target
                .as_ref()
                .is_some_and(|t| self.slots[&name].received.len() as u32 == t.total())
            {
                self.install(&name).await;
            }
        }
        let mut tick = tokio::time::interval(PROBATION_TICK);
        loop {
            tokio::select! {
                delivery = inbound.recv() => match delivery {
                    Some(d) => {
                        let complete = self.handle(&d.message).await;
                        // Handled durably (a chunk is on disk): the broker may
                        // forget it, before the longer install starts.
                        d.ack();
                        if let Some(name) = complete {
                            self.install(&name).await;
                        }
                    }
                    None => break,
                },
                _ = tick.tick() => self.watch_probation().await,
                _ = shutdown.changed() => break,
            }
        }
    }

    fn now_ms(&self) -> u64 {
        self.env.clock.now_millis()
    }

    fn now(&self) -> String {
        rfc3339(self.now_ms())
    }

    fn report(&self, name: &str, state: State) -> Report {
        let s = self.slots.get(name);
        Report {
            device: self.env.device.clone(),
            plugin: name.to_owned(),
            version: s.map_or(0, |s| s.state.running()),
            state,
            time: self.now(),
            candidate: None,
            previous: s
                .and_then(|s| s.state.active.as_ref().map(|_| s.state.previous.as_ref().map_or(0, |p| p.version))),
            reason: None,
            received: None,
            total: None,
            shadow: None,
        }
    }

    fn progress(&self, name: &str, target: &Manifest) -> Report {
        let received = self.slots.get(name).map_or(0, |s| s.received.len() as u32);
        Report {
            candidate: Some(target.version),
            received: Some(received),
            total: Some(target.total()),
            ..self.report(name, State::Downloading)
        }
    }

    /// Publishes `report` on every fleet destination; with `persist`, also
    /// keeps it in the plugin's state so a restart republishes it.
    async fn publish(&mut self, name: &str, report: Report, persist: bool) {
        tracing::info!(
            plugin = name,
            state = report.state.as_str(),
            version = report.version,
            candidate = ?report.candidate,
            reason = report.reason.as_deref().unwrap_or(""),
            "fleet status"
        );
        let topic = topics::status(&self.root, &self.env.device, name);
        let json = serde_json::to_vec(&report).expect("a report serialises");
        self.link.publish(Retained { topic, payload: json, content_type: Some("application/json".into()) });
        if persist && let Some(slot) = self.slots.get_mut(name) {
            slot.state.last = Some(report);
            self.save(name).await;
        }
    }

    async fn save(&mut self, name: &str) {
        let Some(slot) = self.slots.get(name) else { return };
        let (dir, state) = (slot.dir.clone(), slot.state.clone());
        match tokio::task::spawn_blocking(move || dir.save(&state)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(plugin = name, error = %e, "cannot save fleet state"),
            Err(e) => tracing::error!(plugin = name, error = %e, "fleet state task failed"),
        }
    }

    fn sync_subscriptions(&self) {
        let filter = |f: String| TopicFilter::new(&f).expect("the config validates topic_root and plugin names");
        let mut wanted = BTreeSet::from([filter(topics::manifests(&self.root))]);
        for (name, slot) in &self.slots {
            if let Some(t) = &slot.state.target {
                wanted.insert(filter(topics::chunks(&self.root, name, t.version)));
            }
        }
        self.link.subscribe(wanted);
    }

    /// Handles one fleet message; returns the plugin whose download it
    /// completed, to install.
    async fn handle(&mut self, m: &DownlinkMessage) -> Option<String> {
        let parsed = topics::parse(&self.root, &m.topic)?;
        match parsed {
            FleetTopic::Manifest { name, devices } => {
                let (name, devices) = (name.to_owned(), devices.to_owned());
                if m.payload.is_empty() || !valid_pattern(&devices) || !pattern_matches(&devices, &self.env.device) {
                    return None;
                }
                self.on_manifest(&name, &m.destination, &m.payload).await.then_some(name)
            }
            FleetTopic::Chunk { name, version } => {
                let name = name.to_owned();
                self.on_chunk(&name, version, &m.payload).await.then_some(name)
            }
        }
    }

    async fn reject(&mut self, name: &str, candidate: Option<u64>, refusal: Refusal) {
        tracing::warn!(plugin = name, candidate = ?candidate, reason = %refusal.reason, "fleet update refused");
        if let Some(slot) = self.slots.get_mut(name)
            && machine::refuse(&mut slot.state, candidate, &refusal)
        {
            slot.received.clear();
            let dir = slot.dir.clone();
            let _ = tokio::task::spawn_blocking(move || dir.clear_downloads()).await;
        }
        let report = Report { candidate, reason: Some(refusal.reason), ..self.report(name, State::Rejected) };
        self.publish(name, report, true).await;
        self.sync_subscriptions();
    }

    /// Returns whether the download it starts is already complete (its
    /// chunks are on disk from an earlier run).
    async fn on_manifest(&mut self, name: &str, destination: &str, payload: &[u8]) -> bool {
        if !self.slots.contains_key(name) {
            // Still reported, so the fleet manager sees why nothing happens.
            let reason = format!("this device has no [[plugin]] named `{name}`");
            // Once per name, and for a bounded number of names: whoever can
            // publish on the broker must not grow this device's memory.
            let topic = topics::status(&self.root, &self.env.device, name);
            let full_or_known = {
                let (known, reports) = self.link.published(&topic);
                known || reports >= self.slots.len() + MAX_UNKNOWN_REPORTS
            };
            if full_or_known {
                return false;
            }
            let report = Report { reason: Some(reason), ..self.report(name, State::Rejected) };
            self.publish(name, report, false).await;
            return false;
        }
        let slot = &self.slots[name];
        let world = slot.plugin.spec.world;
        let (manifest, key_id) =
            match machine::on_manifest(&slot.state, name, world, &self.env.config.trusted_keys, payload) {
                OnManifest::Ignore => return false,
                OnManifest::Refuse { candidate, refusal } => {
                    self.reject(name, candidate, refusal).await;
                    return false;
                }
                OnManifest::Download { manifest, signer } => (manifest, signer),
            };
        let version = manifest.version;
        tracing::info!(plugin = name, version, signer = %key_id, from = destination, "fleet update accepted for download");
        let slot = self.slots.get_mut(name).expect("checked above");
        slot.state.target = Some(manifest.clone());
        let dir = slot.dir.clone();
        let m = manifest.clone();
        slot.received = tokio::task::spawn_blocking(move || {
            // A superseded download is dropped; chunks of this version (from
            // an earlier run) are kept and checked again.
            dir.chunks_on_disk(&m)
        })
        .await
        .unwrap_or_default();
        self.save(name).await;
        // Subscribe before reporting: once a report is seen, chunks published
        // after it reach this device.
        self.sync_subscriptions();
        let report = self.progress(name, &manifest);
        self.publish(name, report, true).await;
        machine::complete(&self.slots[name].state, &self.slots[name].received)
    }

    /// Returns whether the download is complete.
    async fn on_chunk(&mut self, name: &str, version: u64, payload: &[u8]) -> bool {
        let Some(slot) = self.slots.get(name) else { return false };
        let chunk = match machine::on_chunk(&slot.state, &slot.received, version, payload) {
            OnChunk::Ignore => return false,
            // Only this chunk is bad: the download stays, and a good copy
            // (re-pushed, or from another cloud) completes it.
            OnChunk::Refuse(refusal) => {
                self.reject(name, Some(version), refusal).await;
                return false;
            }
            OnChunk::Store(chunk) => chunk,
        };
        let Some(target) = slot.state.target.clone() else { return false };
        let dir = slot.dir.clone();
        let index = chunk.header.index;
        match tokio::task::spawn_blocking(move || dir.store_chunk(&chunk)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(plugin = name, index, error = %e, "cannot store a downloaded chunk");
                return false;
            }
            Err(_) => return false,
        }
        let slot = self.slots.get_mut(name).expect("checked above");
        slot.received.insert(index);
        let done = machine::complete(&slot.state, &slot.received);
        let report = self.progress(name, &target);
        self.publish(name, report, false).await;
        done
    }

    /// Verifies, checks, shadows and activates the finished download.
    async fn install(&mut self, name: &str) {
        let slot = &self.slots[name];
        let Some(manifest) = slot.state.target.clone() else { return };
        let version = manifest.version;
        let candidate = Some(version);
        let step = |u: &Self, state: State| Report { candidate, ..u.report(name, state) };

        let dir = slot.dir.clone();
        self.publish(name, step(self, State::Verifying), false).await;
        let m = manifest.clone();
        let written = tokio::task::spawn_blocking(move || -> Result<PathBuf, Refusal> {
            let component = dir.assemble(&m).map_err(|e| Refusal::transient(format!("reading chunks: {e}")))?;
            m.check_component(&component).map_err(Refusal::permanent)?;
            dir.write_component(m.version, &component).map_err(|e| Refusal::transient(format!("storing: {e}")))
        })
        .await;
        let path = match written {
            Ok(Ok(p)) => p,
            Ok(Err(r)) => return self.reject(name, candidate, r).await,
            Err(e) => return self.reject(name, candidate, Refusal::transient(e)).await,
        };

        self.publish(name, step(self, State::Checking), false).await;
        let spec = PluginConfig { path: path.clone(), ..self.slots[name].plugin.spec.clone() };
        let cache = crate::plugin::engine::cache_dir(Some(&self.env.data_dir)).expect("a data dir is given");
        let checked = tokio::task::spawn_blocking(move || check_candidate(&spec, &cache)).await;
        let mut plugin = match checked {
            Ok(Ok(p)) => p,
            Ok(Err(r)) => return self.reject(name, candidate, r).await,
            Err(e) => return self.reject(name, candidate, Refusal::transient(e)).await,
        };

        self.publish(name, step(self, State::Shadow), false).await;
        let samples = self.slots[name].plugin.handle.recent();
        let limit = self.env.config.shadow_events;
        let shadowed = tokio::task::spawn_blocking(move || {
            let result = shadow(&mut plugin, &samples, limit);
            plugin.reset();
            (plugin, result)
        })
        .await;
        let (plugin, shadow) = match shadowed {
            Ok((p, Ok(s))) => (p, s),
            Ok((_, Err(r))) => return self.reject(name, candidate, r).await,
            Err(e) => return self.reject(name, candidate, Refusal::transient(e)).await,
        };

        // Activate: persist first, so a crash after the swap restarts on the
        // new version with the previous one still known.
        let until = self.now_ms() + u64::try_from(self.env.config.probation.as_millis()).unwrap_or(u64::MAX);
        let slot = self.slots.get_mut(name).expect("slot exists");
        machine::activate(&mut slot.state, until);
        slot.received.clear();
        self.save(name).await;
        let slot = &self.slots[name];
        if let Err(e) = slot.plugin.handle.swap(plugin).await {
            tracing::error!(plugin = name, error = %e, "cannot activate: the plugin has stopped");
            return;
        }
        let dir = slot.dir.clone();
        let keep: Vec<u64> = [slot.state.active.as_ref(), slot.state.previous.as_ref()]
            .into_iter()
            .flatten()
            .map(|i| i.version)
            .collect();
        let _ = tokio::task::spawn_blocking(move || {
            dir.clear_downloads();
            dir.prune(&keep);
        })
        .await;
        tracing::info!(plugin = name, version, ?shadow, "fleet update activated; on probation");
        let report = Report { shadow: Some(shadow), ..self.report(name, State::Probation) };
        self.publish(name, report, true).await;
        self.sync_subscriptions();
    }

    /// Ends probations that passed and rolls back versions failing above the rate.
    async fn watch_probation(&mut self) {
        let now = self.now_ms();
        let names: Vec<String> =
            self.slots.iter().filter(|(_, s)| s.state.probation_until_ms.is_some()).map(|(n, _)| n.clone()).collect();
        for name in names {
            let slot = &self.slots[&name];
            let until = slot.state.probation_until_ms.unwrap_or(now);
            match machine::probation(&slot.plugin.handle.status(), &self.env.config, until, now) {
                Probation::Continue => {}
                Probation::RollBack(reason) => self.rollback(&name, reason).await,
                Probation::Passed => {
                    let slot = self.slots.get_mut(&name).expect("listed above");
                    slot.state.probation_until_ms = None;
                    let shadow = slot.state.last.as_ref().and_then(|l| l.shadow);
                    let report = Report { shadow, ..self.report(&name, State::Running) };
                    self.publish(&name, report, true).await;
                }
            }
        }
    }

    async fn rollback(&mut self, name: &str, reason: String) {
        let slot = &self.slots[name];
        let Some(failed) = slot.state.active.clone() else { return };
        let previous = slot.state.previous.clone();
        let spec = match &previous {
            Some(p) => PluginConfig { path: slot.dir.component(p.version), ..slot.plugin.spec.clone() },
            None => slot.plugin.spec.clone(),
        };
        let cache = crate::plugin::engine::cache_dir(Some(&self.env.data_dir)).expect("a data dir is given");
        let loaded = tokio::task::spawn_blocking(move || {
            let (mut p, _) = Plugin::load(&spec, Some(&cache))?;
            let _ = p.warm_up();
            Ok::<_, PluginError>(p)
        })
        .await;
        let plugin = match loaded {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                tracing::error!(plugin = name, error = %e, "cannot load the previous version; keeping the failing one");
                return;
            }
            Err(_) => return,
        };
        tracing::warn!(plugin = name, failed = failed.version, back_to = previous.as_ref().map_or(0, |p| p.version), %reason, "rolling back");
        let slot = self.slots.get_mut(name).expect("slot exists");
        machine::roll_back(&mut slot.state, &reason);
        self.save(name).await;
        if self.slots[name].plugin.handle.swap(plugin).await.is_err() {
            return;
        }
        let report = Report {
            candidate: Some(failed.version),
            reason: Some(reason),
            previous: None,
            ..self.report(name, State::RolledBack)
        };
        self.publish(name, report, true).await;
    }
}

/// Compiles the candidate against its world and runs the plugin checks.
fn check_candidate(spec: &PluginConfig, cache: &std::path::Path) -> Result<Plugin, Refusal> {
    let (mut plugin, _) = Plugin::load(spec, Some(cache)).map_err(|e| match e {
        PluginError::Read { .. } | PluginError::Engine(_) => Refusal::transient(e),
        _ => Refusal::permanent(e),
    })?;
    let options = CheckOptions {
        world: Some(spec.world),
        config: spec.config.clone(),
        cpu: spec.cpu,
        memory_bytes: spec.memory_bytes,
        max_output: spec.max_output,
        ..CheckOptions::default()
    };
    let report = check::check(&spec.path, &options, Some(cache)).map_err(Refusal::permanent)?;
    if !report.passed() {
        let failed: Vec<String> =
            report.findings.iter().filter(|f| !f.passed()).map(|f| format!("{}: {}", f.property, f.detail)).collect();
        return Err(Refusal::permanent(format!("plugin checks failed: {}", failed.join("; "))));
    }
    let _ = plugin.warm_up();
    Ok(plugin)
}

/// Runs `candidate` on the newest recent calls (up to `limit` events) and
/// counts the answers that differ from the active version's.
fn shadow(candidate: &mut Plugin, samples: &[Sample], limit: usize) -> Result<Shadow, Refusal> {
    let mut out = Shadow { calls: 0, events: 0, differences: 0 };
    let mut budget = limit;
    for sample in samples.iter().rev() {
        if sample.events() > budget {
            break;
        }
        budget -= sample.events();
        let same = match sample {
            Sample::Filter(events, verdicts) => {
                &candidate.filter(events).map_err(|e| Refusal::permanent(format!("failed in shadow: {e}")))? == verdicts
            }
            Sample::Merge(key, current, incoming, merged) => {
                &candidate
                    .merge(key, current.as_ref(), incoming)
                    .map_err(|e| Refusal::permanent(format!("failed in shadow: {e}")))?
                    == merged
            }
        };
        out.calls += 1;
        out.events += sample.events() as u64;
        out.differences += u64::from(!same);
    }
    Ok(out)
}
