//! Forwarding: one task per destination publishes the log to its broker,
//! at least once, in sequence order, on its own durable cursor.
//!
//! The store is the source of truth for what must be (re)sent: a forwarder
//! reads events after its cursor, publishes those its routes select with
//! QoS 1, and moves the cursor (in the store, coalesced into few commits)
//! only over events whose PUBACK arrived. A lost connection drops the whole
//! client and resends from the first unacknowledged event on a new one.
//! Forwarders share nothing but the store, so a dead cloud never slows
//! another.
//!
//! Each destination paces itself to its cloud's limits (publishes and bytes
//! per second, in-flight publishes, packet size) and may batch several events
//! of one subject into one publish; status shows when it waits on its pace.
//!
//! - [`stage`] — destination-stage filter plugins, run just before publish.
//! - [`outgoing`] — the next publish: one event, or a batch, encoded.
//! - [`window`] — the pure in-flight and cursor state.
//! - [`isolate`] — finding the one event a broker keeps refusing.
//!
//! An operator may replay a destination ([`Replayer`]): its cursor moves
//! back durably and the events still in the log after it (kept delivered
//! ones among them, see `store.retain_delivered`) go out again, in order,
//! paced like any other; status shows the replay's progress.
//!
//! The connection itself, its reconnects and its pacer are the MQTT session
//! layer's ([`crate::mqtt`]).

pub mod isolate;
pub mod outgoing;
pub mod stage;
pub mod window;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::clock::SharedClock;
use crate::config::budget::{COMPANION_IN_FLIGHT, READ_AHEAD_BYTES};
use crate::config::{DestinationConfig, Protocol, Start};
use crate::downlink::{self, AckQueue, CompanionRequest, DestinationDownlink, Retained};
use crate::event::Event;
use crate::histogram::Histogram;
use crate::limits::DestinationLimits;
use crate::mqtt::pace::Pacer;
use crate::mqtt::{
    Connected, End, Incoming, Link, LinkError, LinkEvent, LinkOptions, RefusalKind, Session, Supervisor,
};
use crate::store::{Store, StoreError};
use isolate::Isolation;
use outgoing::Outgoing;
pub use stage::Stage;
use stage::Step;
use window::Window;

/// Events read from the store per read (and at most
/// [`READ_AHEAD_BYTES`] of records: a destination's read-ahead budget).
const READ_BATCH: usize = 1024;

/// How often the cursor is persisted at most, when acks trickle in.
const PERSIST_INTERVAL: Duration = Duration::from_millis(50);

/// How long shutdown waits for outstanding PUBACKs.
const DRAIN_ON_SHUTDOWN: Duration = Duration::from_secs(2);

/// How long a forwarder waits before trying again a step that failed on
/// Ferry's own side (the store, a filter). The store answers at once while
/// it cannot write, so a retry costs little; the link stays up meanwhile.
const LOCAL_RETRY: Duration = Duration::from_secs(1);

/// What an operator sees of one destination.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DestinationStatus {
    /// Destination name.
    pub name: String,
    /// Broker URL.
    pub url: String,
    /// `v5` or `v311`.
    pub protocol: &'static str,
    /// Whether a connection is up.
    pub connected: bool,
    /// Durable cursor: every event at or below it was delivered.
    pub acked_sequence: u64,
    /// Publishes awaiting PUBACK.
    pub in_flight: usize,
    /// Age of the oldest event not yet acknowledged, in ms (0 when caught up).
    pub lag_ms: u64,
    /// Acknowledged events per second, smoothed.
    pub send_rate: f64,
    /// Connections lost or refused since start.
    pub reconnects: u64,
    /// The last connection error.
    pub last_error: Option<String>,
    /// Events acknowledged since start.
    pub delivered: u64,
    /// Publishes sent since start (resends included).
    pub published: u64,
    /// Payload bytes sent since start.
    pub bytes_sent: u64,
    /// Events this destination could not take (dead-lettered for it).
    pub dead_lettered: u64,
    /// Publishes lost to a failed link before their PUBACK (resent later).
    pub publish_errors: u64,
    /// Whether it is waiting now on its pace (publish or byte rate): "we
    /// are at the cloud's limit", as opposed to "the cloud is slow".
    pub throttled: bool,
    /// Time spent waiting on its pace since start, in seconds.
    pub throttled_seconds: f64,
    /// Events per publish since start (above 1 when batching).
    pub events_per_publish: f64,
    /// A replay under way, if any.
    pub replay: Option<ReplayProgress>,
}

/// How far a replay has got.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplayProgress {
    /// The first sequence asked for again.
    pub from: u64,
    /// The replay is over once the cursor is back here (where it was).
    pub through: u64,
    /// Sequences left to acknowledge (an upper bound: it counts events its
    /// routes skip, and events no longer in the log).
    pub remaining: u64,
    /// At the current send rate, seconds until done (`None` before a rate is known).
    pub eta_seconds: Option<f64>,
}

impl DestinationStatus {
    /// Events after its durable cursor when the log's last sequence is
    /// `last_sequence`: an upper bound of what it has left to send, as it
    /// counts events its routes skip. What status and metrics both show.
    pub fn backlog_events(&self, last_sequence: u64) -> u64 {
        last_sequence.saturating_sub(self.acked_sequence)
    }
}

/// A rewind of the cursor, as the task learns it from its [`Replayer`].
#[derive(Debug, Clone, Copy, Default)]
struct Rewind {
    /// Rewinds asked for in this run (see [`Store::advance_cursor`]).
    epoch: u64,
    /// The new cursor; `None` when the store could not say whether it moved:
    /// the task then only takes the epoch, and keeps its place.
    to: Option<u64>,
    /// Where its cursor was.
    through: u64,
}

/// Where a replay starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayFrom {
    /// At this sequence.
    Sequence(u64),
    /// At the first event accepted at or after this time (ms since the epoch).
    Since(u64),
}

/// A replay that has begun: the cursor is durably back.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayStarted {
    /// The destination.
    pub destination: String,
    /// The first sequence asked for again.
    pub from: u64,
    /// Where its cursor was: the replay ends once it is back here.
    pub through: u64,
    /// The first event after `from - 1` still in the log (`None`: none is
    /// left). Later than `from` when earlier events were no longer kept.
    pub first_available: Option<u64>,
}

/// Why a replay did not begin.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReplayError {
    /// Nothing it asked for was delivered yet, or is still in the log.
    #[error("{0}")]
    Nothing(String),
    /// The store could not move the cursor.
    #[error("the store could not move the cursor back: {0}")]
    Store(String),
}

/// Replays one destination: a handle the API keeps.
#[derive(Clone)]
pub struct Replayer {
    name: String,
    store: Store,
    acked: watch::Receiver<u64>,
    status: Arc<Mutex<DestinationStatus>>,
    rewinds: Arc<watch::Sender<Rewind>>,
    /// One replay at a time per destination.
    one: Arc<tokio::sync::Mutex<()>>,
}

impl Replayer {
    /// Moves the destination's cursor back durably to just before `from`, so
    /// every event from there still in the log goes out again, in order, with
    /// its original id. What was in flight is dropped (it is sent again).
    pub async fn replay(&self, from: ReplayFrom) -> Result<ReplayStarted, ReplayError> {
        let _one = self.one.lock().await;
        let name = &self.name;
        let from = match from {
            ReplayFrom::Sequence(seq) => seq.max(1),
            ReplayFrom::Since(ms) => {
                let store = self.store.clone();
                let first = tokio::task::spawn_blocking(move || store.first_since(ms))
                    .await
                    .map_err(|e| ReplayError::Store(e.to_string()))?
                    .map_err(|e| ReplayError::Store(e.to_string()))?;
                first.ok_or_else(|| {
                    ReplayError::Nothing(format!(
                        "no event accepted since {} is left in the log",
                        crate::clock::utc(ms)
                    ))
                })?
            }
        };
        let through = *self.acked.borrow();
        if from > through {
            return Err(ReplayError::Nothing(format!(
                "destination {name} has not had sequence {from} yet (it has everything up to {through}): nothing to replay"
            )));
        }
        let epoch = self.rewinds.borrow().epoch + 1;
        match self.store.rewind(name, from - 1, epoch).await {
            Ok(rewound) => {
                self.rewinds.send_replace(Rewind { epoch, to: Some(from - 1), through });
                self.status.lock().expect("status lock").replay =
                    Some(ReplayProgress { from, through, remaining: through - (from - 1), eta_seconds: None });
                tracing::info!(destination = %name, from, through, first_available = ?rewound.first_available, "replay begun");
                Ok(ReplayStarted { destination: name.clone(), from, through, first_available: rewound.first_available })
            }
            Err(e) => {
                self.rewinds.send_replace(Rewind { epoch, to: None, through });
                Err(ReplayError::Store(e.to_string()))
            }
        }
    }
}

/// A running forwarder.
pub struct Forwarder {
    status: Arc<Mutex<DestinationStatus>>,
    limits: Arc<DestinationLimits>,
    lag: Arc<Histogram>,
    acked: watch::Receiver<u64>,
    replayer: Replayer,
    task: JoinHandle<()>,
}

impl Forwarder {
    /// Starts forwarding to `config`'s broker until `shutdown` turns true,
    /// running `stage`'s filters on each batch just before publish. On every
    /// connection it also subscribes to `downlink`'s filters and hands what
    /// arrives to their consumers (see [`crate::downlink`]).
    pub fn spawn(
        config: DestinationConfig,
        tls: Option<Arc<rustls::ClientConfig>>,
        store: Store,
        clock: SharedClock,
        stage: Stage,
        downlink: DestinationDownlink,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let status = Arc::new(Mutex::new(DestinationStatus {
            name: config.name.clone(),
            url: config.endpoint.url(),
            protocol: match config.endpoint.protocol {
                Protocol::V5 => "v5",
                Protocol::V311 => "v311",
            },
            ..DestinationStatus::default()
        }));
        let lag = Arc::new(Histogram::new(crate::histogram::LAG_BUCKETS));
        let limits = Arc::new(DestinationLimits::new(&config));
        let (acked_tx, acked) = watch::channel(0);
        let (rewinds, rewinds_rx) = watch::channel(Rewind::default());
        let replayer = Replayer {
            name: config.name.clone(),
            store: store.clone(),
            acked: acked.clone(),
            status: status.clone(),
            rewinds: Arc::new(rewinds),
            one: Arc::default(),
        };
        let task = Task {
            config,
            tls,
            store,
            clock,
            stage: stage.with_limits(limits.clone()),
            downlink,
            shutdown,
            status: status.clone(),
            lag: lag.clone(),
            limits: limits.clone(),
            acked: acked_tx,
            rewinds: rewinds_rx,
        };
        Self { status, limits, lag, acked, replayer, task: tokio::spawn(task.run()) }
    }

    /// A handle that replays this destination.
    pub fn replayer(&self) -> Replayer {
        self.replayer.clone()
    }

    /// Every sequence at or below its value was acknowledged by the broker
    /// (or needs nothing sent: not routed, dead-lettered), in this run; it
    /// starts at the stored cursor.
    pub fn acked(&self) -> watch::Receiver<u64> {
        self.acked.clone()
    }

    /// What its broker accepts, as it learns it (shared with ingest).
    pub fn limits(&self) -> Arc<DestinationLimits> {
        self.limits.clone()
    }

    /// Its event time → PUBACK histogram.
    pub fn lag_histogram(&self) -> Arc<Histogram> {
        self.lag.clone()
    }

    /// A snapshot of its status.
    pub fn status(&self) -> DestinationStatus {
        self.status.lock().expect("status lock").clone()
    }

    /// A shared handle to its status.
    pub fn status_handle(&self) -> Arc<Mutex<DestinationStatus>> {
        self.status.clone()
    }

    /// Waits for the task to finish (after shutdown was signalled).
    pub async fn join(self) {
        let _ = self.task.await;
    }
}

/// Why a step of a session could not go on.
enum Failure {
    /// The connection: the session ends and the forwarder reconnects.
    Link(LinkError),
    /// Ferry's own side (the store, a destination-stage filter): the link
    /// stays up, and the step is tried again after [`LOCAL_RETRY`].
    Local(String),
}

impl From<LinkError> for Failure {
    fn from(error: LinkError) -> Self {
        Failure::Link(error)
    }
}

struct Task {
    config: DestinationConfig,
    tls: Option<Arc<rustls::ClientConfig>>,
    store: Store,
    clock: SharedClock,
    stage: Stage,
    downlink: DestinationDownlink,
    shutdown: watch::Receiver<bool>,
    status: Arc<Mutex<DestinationStatus>>,
    lag: Arc<Histogram>,
    limits: Arc<DestinationLimits>,
    /// What [`Forwarder::acked`] reads.
    acked: watch::Sender<u64>,
    /// Replays asked for through its [`Replayer`].
    rewinds: watch::Receiver<Rewind>,
}

/// Per-connection progress, kept across sessions for rate and persistence.
struct Progress {
    window: Window,
    persisting: Option<JoinHandle<Option<u64>>>,
    last_persist: Instant,
    rate_mark: (Instant, u64),
    /// Counted here per event and copied to the shared status on each tick,
    /// so the hot path takes no lock.
    delivered: u64,
    published: u64,
    /// Events carried by those publishes.
    events_published: u64,
    bytes_sent: u64,
    isolation: Isolation,
    pacer: Pacer,
    /// When to look again for something to send: a pace wait or a batch
    /// lingering for more events.
    wake_at: Option<tokio::time::Instant>,
    /// Whether `wake_at` is a pace wait (as opposed to a linger).
    throttled: bool,
    /// Whether the broker keeps retained messages (its CONNACK's Retain
    /// Available): when it does not, state updates go unretained.
    broker_retain: bool,
    /// A local failure being waited out: when to try again, and why.
    paused: Option<(tokio::time::Instant, String)>,
    /// A companion's retained messages (fleet reports) waiting for this
    /// connection; sent before events, under the same pace.
    side: VecDeque<Retained>,
    /// The last value given to [`Forwarder::acked`].
    acked_sent: u64,
    /// The rewinds of its cursor taken so far (see [`Store::advance_cursor`]).
    epoch: u64,
    /// A replay under way: its first sequence, and where it ends.
    replay: Option<(u64, u64)>,
}

impl Task {
    async fn run(mut self) {
        let name = self.config.name.clone();
        let store = self.store.clone();
        let cursor = match tokio::task::spawn_blocking(move || store.cursor(&name)).await {
            Ok(Ok(Some(c))) => c,
            Ok(Ok(None)) => match self.start().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(destination = %self.config.name, error = %e, "cannot place a new destination's cursor; forwarder stopped");
                    self.update(|s| s.last_error = Some(format!("placing the cursor (start): {e}")));
                    return;
                }
            },
            Ok(Err(e)) => {
                tracing::error!(destination = %self.config.name, error = %e, "cannot read cursor; forwarder stopped");
                return;
            }
            Err(_) => return,
        };
        let mut progress = Progress {
            window: Window::new(cursor, self.config.inflight),
            persisting: None,
            last_persist: Instant::now(),
            rate_mark: (Instant::now(), 0),
            delivered: 0,
            published: 0,
            events_published: 0,
            bytes_sent: 0,
            isolation: Isolation::default(),
            pacer: Pacer::new(self.config.max_publish_rate, self.config.max_byte_rate),
            wake_at: None,
            throttled: false,
            broker_retain: true,
            paused: None,
            side: VecDeque::new(),
            acked_sent: cursor,
            epoch: 0,
            replay: None,
        };
        self.update(|s| s.acked_sequence = cursor);
        self.acked.send_replace(cursor);
        let opts = LinkOptions {
            inflight: u16::try_from(self.config.inflight_publishes).unwrap_or(u16::MAX),
            queue: self.config.inflight + COMPANION_IN_FLIGHT + 16,
            // With subscriptions, the broker keeps our session (and the QoS 1
            // messages sent while we were away) and waits for acks that come
            // only once consumers have handled each message.
            clean_session: self.downlink.is_empty(),
            manual_acks: !self.downlink.is_empty(),
            // Bounds what consumers are handed before they ack (see `downlink`).
            receive_maximum: (!self.downlink.is_empty()).then_some(downlink::WINDOW),
        };
        let supervisor = Supervisor::new(
            format!("destination {}", self.config.name),
            self.tls.clone(),
            opts,
            (self.config.backoff_base, self.config.backoff_cap),
            self.shutdown.clone(),
        );
        supervisor.run(&mut Connection { task: &mut self, p: &mut progress }).await;
        self.finish_persist(&mut progress).await;
        if let Some(seq) = progress.window.cursor_to_persist()
            && self.store.advance_cursor(&self.config.name, seq, progress.epoch).await.is_ok()
        {
            progress.window.made_durable(seq);
        }
        self.update(|s| s.acked_sequence = progress.window.durable());
        tracing::debug!(destination = %self.config.name, cursor = progress.window.durable(), "forwarder stopped");
    }

    /// A destination's first run: where its cursor begins (`start`), made
    /// durable unless it is the beginning of the log.
    async fn start(&self) -> Result<u64, String> {
        let newest = *self.store.committed().borrow();
        let cursor = match self.config.start {
            Start::Earliest => return Ok(0),
            Start::Latest => newest,
            Start::At(ms) => {
                let store = self.store.clone();
                let first =
                    tokio::task::spawn_blocking(move || store.first_since(ms)).await.map_err(|e| e.to_string())?;
                first.map_err(|e| e.to_string())?.map_or(newest, |seq| seq - 1)
            }
        };
        self.store.set_cursor(&self.config.name, cursor).await.map_err(|e| e.to_string())?;
        tracing::info!(destination = %self.config.name, start = ?self.config.start, cursor, "new destination: cursor placed");
        Ok(cursor)
    }

    /// The endpoint to connect with now: with a fresh SAS token as its
    /// password when the destination signs with a device key.
    fn endpoint(&self) -> Result<crate::config::MqttEndpoint, String> {
        let mut e = self.config.endpoint.clone();
        if let Some(sas) = &self.config.sas {
            let expiry = self.clock.now_millis() / 1000 + sas.lifetime.as_secs();
            let token = crate::sas::token(&e.host, &e.client_id, sas.key.expose(), expiry)?;
            e.password = Some(crate::config::Secret::new(token));
        }
        Ok(e)
    }

    /// Age of the first event after `acked_through`, for lag while the link is down.
    async fn oldest_unsent_age(&self, acked_through: u64) -> u64 {
        let store = self.store.clone();
        let first = tokio::task::spawn_blocking(move || store.read_after(acked_through, 1)).await;
        match first {
            Ok(Ok(events)) => events.first().map_or(0, |e| self.clock.now_millis().saturating_sub(e.hlc.millis())),
            _ => 0,
        }
    }

    fn update(&self, f: impl FnOnce(&mut DestinationStatus)) {
        f(&mut self.status.lock().expect("status lock"));
    }

    /// One connection: connect, then publish and collect acks until the
    /// link fails or shutdown is asked for.
    /// One accepted connection: publish and collect acks until the link
    /// fails or shutdown is asked for.
    async fn session(&mut self, link: &mut Link, p: &mut Progress, connected: Connected) -> End {
        if connected.limits.maximum_qos == Some(0) {
            // QoS 0 has no PUBACK: nothing could tell Ferry an event arrived.
            return End::ours(LinkError::Refused(
                "the broker takes QoS 0 only (CONNACK Maximum QoS); at-least-once delivery needs QoS 1".into(),
            ));
        }
        self.limits.announce_max_packet(connected.limits.max_packet_size);
        self.adopt_rewind(p);
        p.pacer.new_link();
        p.broker_retain = connected.limits.retain_available != Some(false);
        let keep_alive = self.config.endpoint.keep_alive;
        self.update(|s| s.connected = true);
        tracing::info!(destination = %self.config.name, url = %self.config.endpoint.url(), resume_after = p.window.acked_through(), "connected");
        // Every connection subscribes again: a broker may have lost the session.
        let (companion_filters, latest) = self.downlink.companion_connected();
        for filter in self.downlink.subscriptions().iter().chain(&companion_filters) {
            if let Err(e) = link.subscribe(filter.as_str()) {
                return End::ours(e);
            }
        }
        p.side = latest.into();
        let mut unacked: AckQueue<Box<Incoming>> = AckQueue::default();

        let mut committed = self.store.committed();
        let mut buffer: VecDeque<Step> = VecDeque::new();
        let mut last_ack = Instant::now();
        // When the broker last answered a ping: alive, though maybe not acking.
        let mut last_pong = last_ack;
        // A signed token is renewed well before it expires: at four fifths of its life.
        let renew_at = self.config.sas.as_ref().map(|s| Instant::now() + s.lifetime * 4 / 5);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        // No PUBACK for this long while publishes wait: the link is black-holed.
        let ack_timeout = keep_alive * 2;
        loop {
            // Compared here first: the watch takes a lock, and most turns ack nothing.
            let through = p.window.acked_through();
            if through != p.acked_sent {
                p.acked_sent = through;
                self.acked.send_replace(through);
            }
            if p.paused.as_ref().is_none_or(|(until, _)| *until <= tokio::time::Instant::now()) {
                match self.fill(link, p, &mut buffer).await {
                    Ok(()) => self.resume(p),
                    Err(Failure::Link(e)) => return End::ours(e),
                    Err(Failure::Local(reason)) => self.pause(p, reason),
                }
            }
            self.maybe_persist(p);
            // A lingering batch takes events committed meanwhile, as an empty buffer does.
            let lingering = p.wake_at.is_some() && !p.throttled;
            let caught_up = (buffer.is_empty() || lingering) && *committed.borrow() < p.window.next();
            let window_open = p.window.has_room();
            let wake = p.wake_at;
            let retry_at = p.paused.as_ref().map(|(until, _)| *until);
            tokio::select! {
                event = link.poll() => {
                    // Take whatever else is ready too, so one wake-up handles a burst of acks.
                    let mut event = Some(event);
                    let mut burst = 0;
                    let now_ms = self.clock.now_millis();
                    while let Some(e) = event.take() {
                        match e {
                            Ok(LinkEvent::Sent(pkid)) => {
                                p.window.on_wire(pkid);
                                p.pacer.on_wire(tokio::time::Instant::now());
                            }
                            Ok(LinkEvent::Pong) => last_pong = Instant::now(),
                            Ok(LinkEvent::Acked(pkid)) => {
                                if let Some((events, at_ms)) = p.window.acked_at(pkid) {
                                    last_ack = Instant::now();
                                    // A companion's publish carries no event.
                                    if events > 0 {
                                        p.delivered += events as u64;
                                        self.lag.observe(now_ms.saturating_sub(at_ms) as f64 / 1000.0);
                                    }
                                }
                            }
                            Ok(LinkEvent::Refused { pkid, kind: RefusalKind::Message, reason }) => {
                                last_ack = Instant::now();
                                if let Err(reason) = self.set_aside_refused(p, pkid, &reason).await {
                                    // The refused publish stays in flight: a new session sends it again.
                                    return End::Local(reason);
                                }
                            }
                            Ok(LinkEvent::Refused { pkid, kind, reason }) => {
                                // It may pass later: send it again on a new connection, after the backoff.
                                let error = LinkError::Refused(format!("the broker answered packet {pkid} with {reason}"));
                                return End::Link { error, broker_ended: kind == RefusalKind::Other };
                            }
                            Ok(LinkEvent::SubscribeRefused(reason)) => {
                                // Forwarding goes on: a refused subscription (an ACL
                                // that leaves out state or fleet topics) costs only
                                // what would have arrived on it.
                                tracing::warn!(destination = %self.config.name, %reason, "the broker refused a subscription");
                                self.update(|s| s.last_error = Some(format!("subscription refused: {reason}")));
                            }
                            Ok(LinkEvent::Message(m)) => {
                                let handled = self
                                    .downlink
                                    .dispatch(
                                        m.topic.clone(),
                                        m.payload.clone(),
                                        m.user_properties.clone(),
                                        m.content_type.clone(),
                                        m.retain,
                                    )
                                    .await;
                                unacked.push(m, handled);
                            }
                            Ok(_) => {}
                            Err(error) => return End::Link { error, broker_ended: true },
                        }
                        burst += 1;
                        if burst < 256 {
                            event = link.poll().now_or_never();
                        }
                    }
                    p.isolation.delivered_through(p.window.acked_through());
                }
                _ = committed.changed(), if caught_up && window_open => {}
                _ = tokio::time::sleep_until(wake.unwrap_or_else(tokio::time::Instant::now)), if wake.is_some() => {
                    p.wake_at = None;
                }
                _ = tokio::time::sleep_until(retry_at.unwrap_or_else(tokio::time::Instant::now)), if retry_at.is_some() => {}
                // PUBACKs leave in arrival order, each once its consumers are done.
                handled = unacked.next(), if !unacked.is_empty() => match handled {
                    Ok(message) => {
                        if let Err(e) = link.ack(&message) {
                            return End::ours(e);
                        }
                    }
                    // Unhandled: drop the link so the broker delivers it again.
                    Err(message) => {
                        return End::Local(format!("a downlink consumer did not handle the message on {}", message.topic));
                    }
                },
                done = async { p.persisting.as_mut().expect("guarded").await }, if p.persisting.is_some() => {
                    p.persisting = None;
                    if let Ok(Some(seq)) = done {
                        p.window.made_durable(seq);
                    }
                }
                _ = tick.tick() => {
                    if p.window.in_flight() > 0 && last_ack.elapsed() > ack_timeout {
                        // A broker that answers pings but never the one publish
                        // outstanding drops it without a word (RabbitMQ over its
                        // max_message_size): that publish is to blame.
                        if p.window.in_flight() == 1 && last_pong > last_ack {
                            let error = LinkError::Connection(format!(
                                "no PUBACK for {:?} for the one publish outstanding, though the broker answers pings",
                                last_ack.elapsed()
                            ));
                            return End::Link { error, broker_ended: true };
                        }
                        return End::ours(LinkError::Connection(format!(
                            "no PUBACK for {:?} with {} publishes outstanding: link presumed dead",
                            last_ack.elapsed(), p.window.in_flight()
                        )));
                    }
                    if p.window.in_flight() == 0 {
                        last_ack = Instant::now();
                    }
                    if renew_at.is_some_and(|at| Instant::now() >= at) {
                        self.drain(link, p).await;
                        return End::Renew;
                    }
                    self.refresh_status(p, &buffer);
                }
                request = self.downlink.companion_request() => match request {
                    CompanionRequest::Filters { add, remove } => {
                        for f in &add {
                            if let Err(e) = link.subscribe(f.as_str()) {
                                return End::ours(e);
                            }
                        }
                        for f in &remove {
                            if let Err(e) = link.unsubscribe(f.as_str()) {
                                return End::ours(e);
                            }
                        }
                    }
                    CompanionRequest::Publish(r) => p.side.push_back(r),
                    CompanionRequest::Republish(latest) => p.side = latest.into(),
                },
                _ = self.shutdown.changed() => {
                    self.drain(link, p).await;
                    return End::Shutdown;
                }
                // A replay: what is in flight is dropped with this connection,
                // and the next one starts from the rewound cursor.
                _ = self.rewinds.changed() => return End::Renew,
            }
        }
    }

    /// Takes a rewind its [`Replayer`] made, if there is a new one: the
    /// window starts again after the new cursor.
    fn adopt_rewind(&mut self, p: &mut Progress) {
        let rewind = *self.rewinds.borrow_and_update();
        if rewind.epoch == p.epoch {
            return;
        }
        p.epoch = rewind.epoch;
        let Some(to) = rewind.to else { return };
        p.window = Window::new(to, self.config.inflight);
        // A cursor move on its way was sent under the old epoch: the store ignores it.
        p.persisting = None;
        p.isolation = Isolation::default();
        p.acked_sent = to;
        self.acked.send_replace(to);
        p.replay = Some((to + 1, rewind.through));
        tracing::info!(destination = %self.config.name, from = to + 1, through = rewind.through, "replaying");
    }

    /// Offers events to the window while it has room and the pace allows:
    /// publishes what the routes and destination-stage filters select (one
    /// event, or a batch), settles the rest, and sets aside what this
    /// destination's broker cannot take.
    /// A failure on Ferry's side leaves the step where it was, to be tried
    /// again: nothing is taken from the buffer or the window before it.
    async fn fill(&mut self, link: &mut Link, p: &mut Progress, buffer: &mut VecDeque<Step>) -> Result<(), Failure> {
        let now = tokio::time::Instant::now();
        if p.wake_at.is_some_and(|at| at > now) && p.throttled {
            return Ok(());
        }
        if p.throttled {
            // The wait on the pace is over.
            p.throttled = false;
            self.update(|s| s.throttled = false);
        }
        let lingering = p.wake_at.take().is_some();
        loop {
            if !p.window.has_room() {
                return Ok(());
            }
            if let Some(r) = p.side.front().filter(|_| p.window.in_flight_without_events() < COMPANION_IN_FLIGHT) {
                // A companion's few, small messages go first, under the same pace.
                let now = tokio::time::Instant::now();
                let len = (r.topic.len() + r.payload.len()) as u64;
                if let Some(at) = p.pacer.ready_at(now, len) {
                    return self.throttle(p, now, at);
                }
                let r = p.side.pop_front().expect("not empty");
                p.pacer.sent(now, len);
                p.bytes_sent += r.payload.len() as u64;
                p.published += 1;
                link.publish(r.topic, r.payload, r.content_type, Vec::new(), p.broker_retain)?;
                p.window.offer(&[]);
                continue;
            }
            let newest = *self.store.committed().borrow();
            if buffer.is_empty() || (lingering && newest >= p.window.next()) {
                if newest < p.window.next() {
                    return Ok(());
                }
                let Some(events) = self.read(p.window.next() - 1).await? else { continue };
                let Some(through) = events.last().map(|e| e.sequence) else {
                    // Everything up to `newest` left the log (expired or evicted).
                    p.window.skip_to(newest);
                    return Ok(());
                };
                let read: Vec<(u64, u64)> = events.iter().map(|e| (e.sequence, e.hlc.millis())).collect();
                self.plan(events, buffer).await?;
                p.window.read(read, through);
                continue;
            }
            let sequence = match buffer.front().expect("not empty") {
                Step::Settle(sequence) => {
                    p.window.settle(*sequence);
                    buffer.pop_front();
                    continue;
                }
                Step::Publish { event, .. } => event.sequence,
            };
            if let Some((condemned, why)) = p.isolation.condemned()
                && condemned == sequence
            {
                let reason = format!("destination {}: {why}", self.config.name);
                self.set_aside(sequence, &reason).await.map_err(Failure::Local)?;
                let Some(Step::Publish { last, .. }) = buffer.pop_front() else { unreachable!("a publish step") };
                if last {
                    p.isolation.set_aside();
                    p.window.settle(sequence);
                }
                continue;
            }
            // Resending what was in flight at a failure: one event at a time.
            let careful = p.isolation.careful(sequence);
            if careful && p.window.in_flight() > 0 {
                return Ok(());
            }
            let now = tokio::time::Instant::now();
            if let Some(at) = p.pacer.ready_at(now, 0) {
                return self.throttle(p, now, at);
            }
            let mut next = outgoing::next(&self.config, buffer, p.window.room(), self.batch_bytes(careful));
            if next.parts.len() > 1 && self.refusal(&next).is_some() {
                // A batch the broker would refuse goes as single events, each judged alone.
                next = outgoing::next(&self.config, buffer, p.window.room(), None);
            }
            if let Some(reason) = self.refusal(&next) {
                for &(seq, _) in &next.parts {
                    self.set_aside(seq, &reason).await.map_err(Failure::Local)?;
                }
                next.take_from(buffer);
                for &(seq, last) in &next.parts {
                    if last {
                        p.window.settle(seq);
                    }
                }
                continue;
            }
            if let Some(at) = p.pacer.ready_at(now, next.packet_len as u64) {
                return self.throttle(p, now, at);
            }
            let linger = self.config.batch.linger;
            if next.unfilled && !linger.is_zero() {
                let age = self.clock.now_millis().saturating_sub(next.oldest_ms);
                let left = linger.saturating_sub(Duration::from_millis(age));
                if !left.is_zero() {
                    // A batch with room waits for more of its subject, up to `linger`.
                    p.wake_at = Some(now + left);
                    return Ok(());
                }
            }
            next.take_from(buffer);
            next.retain &= p.broker_retain;
            p.pacer.sent(now, next.packet_len as u64);
            self.send(link, p, next)?;
        }
    }

    /// A step failed on Ferry's side: keep the link, try again after
    /// [`LOCAL_RETRY`]. Logged when the failure starts, not at every retry.
    fn pause(&self, p: &mut Progress, reason: String) {
        if p.paused.is_none() {
            tracing::warn!(destination = %self.config.name, %reason, retry_every = ?LOCAL_RETRY, "forwarding paused, the link stays up");
        }
        self.update(|s| s.last_error = Some(format!("forwarding paused: {reason}")));
        p.paused = Some((tokio::time::Instant::now() + LOCAL_RETRY, reason));
    }

    /// A step went through after a pause.
    fn resume(&self, p: &mut Progress) {
        if let Some((_, reason)) = p.paused.take() {
            tracing::info!(destination = %self.config.name, after = %reason, "forwarding resumed");
        }
    }

    /// Waits on the pace until `at`.
    fn throttle(&self, p: &mut Progress, now: tokio::time::Instant, at: tokio::time::Instant) -> Result<(), Failure> {
        p.pacer.waited(at - now);
        p.wake_at = Some(at);
        p.throttled = true;
        self.update(|s| s.throttled = true);
        Ok(())
    }

    /// Queues `o` and offers its events to the window.
    fn send(&self, link: &mut Link, p: &mut Progress, o: Outgoing) -> Result<(), LinkError> {
        p.bytes_sent += o.payload.len() as u64;
        p.published += 1;
        p.events_published += o.parts.len() as u64;
        link.publish(o.topic, o.payload, o.content_type, o.properties, o.retain)?;
        p.window.offer(&o.parts);
        Ok(())
    }

    /// The most payload bytes a batch may have now (`None`: send events one
    /// at a time): the configured size, within the packet size its broker
    /// announced, leaving room for the topic and the rest of the packet.
    fn batch_bytes(&self, careful: bool) -> Option<usize> {
        if careful {
            return None;
        }
        let (max_packet, _) = self.limits.max_packet();
        Some(self.config.batch.max_bytes.min(max_packet.saturating_sub(crate::config::BATCH_PACKET_ROOM)))
    }

    /// Why this destination's broker would refuse `o`, if it would: a limit
    /// learnt after its events were accepted (its CONNACK, a config change).
    fn refusal(&self, o: &Outgoing) -> Option<String> {
        let name = &self.config.name;
        if let Some(max) = self.config.max_payload_bytes
            && o.payload.len() > max
        {
            return Some(format!(
                "destination {name}: a payload of {} bytes exceeds its max_payload_size ({max} bytes)",
                o.payload.len()
            ));
        }
        if let Some(reason) = self.config.topics.refusal(&o.topic) {
            return Some(format!("destination {name}: {reason}"));
        }
        self.limits.packet_refusal(o.packet_len)
    }

    /// Up to a batch of events after `after`. An unreadable record is moved
    /// to the dead letters (for every destination: none can read it) and
    /// `None` says to read again.
    async fn read(&self, after: u64) -> Result<Option<Vec<Event>>, Failure> {
        let store = self.store.clone();
        let read = tokio::task::spawn_blocking(move || store.read_after_bounded(after, READ_BATCH, READ_AHEAD_BYTES))
            .await
            .map_err(|e| Failure::Local(format!("store read task failed: {e}")))?;
        match read {
            Ok(events) => Ok(Some(events)),
            Err(StoreError::Corrupt { sequence, source }) => {
                let reason = format!("unreadable: {source}");
                tracing::error!(destination = %self.config.name, sequence, %reason, "stored record moved to the dead letters");
                self.store
                    .set_aside_unreadable(sequence, &reason)
                    .await
                    .map_err(|e| Failure::Local(format!("setting aside unreadable record {sequence}: {e}")))?;
                Ok(None)
            }
            Err(e) => Err(Failure::Local(format!("store read failed: {e}"))),
        }
    }

    /// Dead-letters event `sequence` for this destination only.
    async fn set_aside(&self, sequence: u64, reason: &str) -> Result<(), String> {
        self.store
            .dead_letter_copy_for(sequence, &self.config.name, reason)
            .await
            .map_err(|e| format!("dead-lettering event {sequence}: {e}"))?;
        tracing::warn!(destination = %self.config.name, sequence, %reason, "event dead-lettered for this destination");
        self.update(|s| s.dead_lettered += 1);
        Ok(())
    }

    /// The broker refused publish `pkid` for what it is: dead-letter the
    /// events it carried for this destination, then count them as settled.
    async fn set_aside_refused(&self, p: &mut Progress, pkid: u16, reason: &str) -> Result<(), String> {
        let Some(sequences) = p.window.sequences_of(pkid).map(<[u64]>::to_vec) else { return Ok(()) };
        let reason = format!("destination {}: the broker refused the publish ({reason})", self.config.name);
        if sequences.is_empty() {
            tracing::warn!(%reason, "a companion's retained message (a fleet report) was refused");
        }
        for sequence in sequences {
            self.set_aside(sequence, &reason).await?;
        }
        p.window.acked(pkid);
        Ok(())
    }

    /// Turns a batch read from the store into steps: the routes select, then
    /// the destination-stage filters (if any) decide.
    async fn plan(&self, events: Vec<Event>, buffer: &mut VecDeque<Step>) -> Result<(), Failure> {
        let name = self.config.name.as_str();
        let selected = |e: &Event| e.body.is_for(name, &self.config.routing);
        if self.stage.is_empty() {
            buffer.extend(events.into_iter().map(|event| {
                if selected(&event) { Step::Publish { event, last: true } } else { Step::Settle(event.sequence) }
            }));
            return Ok(());
        }
        let (steps, dead_lettered) =
            self.stage.run(events, selected, &self.store).await.map_err(|e| Failure::Local(e.to_string()))?;
        if dead_lettered > 0 {
            self.update(|s| s.dead_lettered += dead_lettered);
        }
        buffer.extend(steps);
        Ok(())
    }

    /// Persists the cursor when enough acks piled up, or some time passed.
    fn maybe_persist(&self, p: &mut Progress) {
        if p.persisting.is_some() {
            return;
        }
        let Some(seq) = p.window.cursor_to_persist() else { return };
        let due = p.window.undurable_acks() * 2 >= self.config.inflight
            || !p.window.has_room()
            || p.last_persist.elapsed() >= PERSIST_INTERVAL;
        if !due {
            return;
        }
        p.last_persist = Instant::now();
        let (store, name) = (self.store.clone(), self.config.name.clone());
        let epoch = p.epoch;
        p.persisting =
            Some(tokio::spawn(async move { store.advance_cursor(&name, seq, epoch).await.ok().map(|()| seq) }));
    }

    async fn finish_persist(&self, p: &mut Progress) {
        if let Some(h) = p.persisting.take()
            && let Ok(Some(seq)) = h.await
        {
            p.window.made_durable(seq);
        }
    }

    /// On shutdown: wait a little for outstanding PUBACKs so they need not be resent.
    async fn drain(&self, link: &mut Link, p: &mut Progress) {
        let deadline = tokio::time::Instant::now() + DRAIN_ON_SHUTDOWN;
        while p.window.in_flight() > 0 {
            match tokio::time::timeout_at(deadline, link.poll()).await {
                Ok(Ok(LinkEvent::Sent(pkid))) => {
                    p.window.on_wire(pkid);
                    p.pacer.on_wire(tokio::time::Instant::now());
                }
                Ok(Ok(LinkEvent::Acked(pkid))) => {
                    p.window.acked(pkid);
                }
                Ok(Ok(_)) => {}
                _ => break,
            }
        }
    }

    fn refresh_status(&self, p: &mut Progress, buffer: &VecDeque<Step>) {
        let now = Instant::now();
        let (mark_at, mark_count) = p.rate_mark;
        let now_ms = self.clock.now_millis();
        let oldest = p.window.oldest_unacked_ms().or_else(|| {
            buffer.iter().find_map(|s| match s {
                Step::Publish { event, .. } => Some(event.hlc.millis()),
                Step::Settle(_) => None,
            })
        });
        let in_flight = p.window.in_flight();
        let durable = p.window.durable();
        let (delivered, published, bytes_sent) = (p.delivered, p.published, p.bytes_sent);
        let events_per_publish = p.events_published as f64 / published.max(1) as f64;
        let waited = p.pacer.total_wait().as_secs_f64();
        let acked_through = p.window.acked_through();
        if p.replay.is_some_and(|(_, through)| acked_through >= through) {
            p.replay = None;
            tracing::info!(destination = %self.config.name, through = acked_through, "replay done");
        }
        let replay = p.replay;
        self.update(|s| {
            s.delivered = delivered;
            s.published = published;
            s.bytes_sent = bytes_sent;
            s.events_per_publish = events_per_publish;
            s.throttled_seconds = waited;
            let elapsed = now.duration_since(mark_at).as_secs_f64();
            if elapsed >= 1.0 {
                let rate = (delivered - mark_count) as f64 / elapsed;
                s.send_rate = if s.send_rate == 0.0 { rate } else { 0.5 * s.send_rate + 0.5 * rate };
                p.rate_mark = (now, delivered);
            }
            s.replay = replay.map(|(from, through)| {
                let remaining = through.saturating_sub(acked_through);
                let eta_seconds = (s.send_rate > 0.0).then(|| remaining as f64 / s.send_rate);
                ReplayProgress { from, through, remaining, eta_seconds }
            });
            s.in_flight = in_flight;
            s.acked_sequence = durable;
            s.lag_ms = oldest.map_or(0, |ms| now_ms.saturating_sub(ms));
        });
    }
}

/// A forwarder's side of its connections: the task and the progress it keeps
/// across them.
struct Connection<'a> {
    task: &'a mut Task,
    p: &'a mut Progress,
}

impl Session for Connection<'_> {
    fn endpoint(&mut self) -> Result<crate::config::MqttEndpoint, String> {
        self.task.endpoint().inspect_err(|reason| {
            tracing::error!(destination = %self.task.config.name, %reason, "cannot sign credentials; forwarder stopped");
            self.task.update(|s| s.last_error = Some(reason.clone()));
        })
    }

    async fn run(&mut self, link: &mut Link, connected: Connected) -> End {
        self.task.session(link, self.p, connected).await
    }

    async fn ended(&mut self, end: &End) {
        let p = &mut *self.p;
        let lost = p.window.in_flight() as u64;
        let failure = end.failure();
        if let Some(error) = &failure {
            let broker_ended = matches!(end, End::Link { broker_ended: true, .. });
            let lone = (lost == 1).then(|| p.window.first_unacked()).flatten();
            p.isolation.link_failed(lone, broker_ended, p.window.last_offered(), error);
        }
        p.window.reconnect();
        self.task.update(|s| {
            s.connected = false;
            s.in_flight = 0;
        });
        if let Some(error) = failure {
            let lag_ms = self.task.oldest_unsent_age(p.window.acked_through()).await;
            self.task.update(|s| {
                s.reconnects += 1;
                s.publish_errors += lost;
                s.last_error = Some(error);
                s.lag_ms = lag_ms;
            });
        }
    }
}
