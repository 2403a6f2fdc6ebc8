//! Downlink: messages that clouds send to the device over the forwarders'
//! own MQTT connections, routed by topic filter to the services that consume
//! them (state sync, fleet updates).
//!
//! Consumers register `(destination, topic filter, queue)` with a
//! [`DownlinkRouter`] before the forwarders start. Each forwarder then
//! subscribes (QoS 1) to its destination's filters on every connection and
//! hands every message it receives to [`DestinationDownlink::dispatch`],
//! which queues a [`Delivery`] to every consumer whose filter matches.
//!
//! Acknowledgement: a forwarder with subscriptions uses a persistent session
//! and manual acks, and sends the PUBACK only once every consumer that got
//! the message called [`Delivery::ack`] — consumers ack after their durable
//! handling, so a crash or a lost link makes the broker deliver again.
//! PUBACKs go out in the order the messages arrived (MQTT 4.6). A consumer
//! that drops a delivery without acking makes the forwarder reconnect (the
//! message comes again), so consumers should ack input they reject for good
//! (malformed, refused) after logging it. Nothing here knows what a message
//! means.
//!
//! A slow consumer never stalls its forwarder: on MQTT 5 the forwarder
//! takes at most [`WINDOW`] unacknowledged messages (its Receive Maximum),
//! and every consumer's queue holds that many for each destination it
//! consumes from, so handing a message over never waits; a slow consumer delays PUBACKs, not
//! forwarding. (On MQTT 3.1.1 the broker's own in-flight limit bounds it.)
//!
//! A [`Companion`] is a service that talks to a cloud over the
//! destination's own connection, both ways (the fleet updater): besides
//! filters fixed at start it subscribes to filters that change while it
//! runs, and it publishes retained messages; the forwarder does both on its
//! connection, so a device keeps one connection, and one client id, per
//! cloud.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use futures::future::JoinAll;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::topic::TopicFilter;

/// Most cloud-to-device messages a forwarder holds unacknowledged (its MQTT 5
/// Receive Maximum); a consumer's queue holds this many per destination.
pub const WINDOW: u16 = 128;

/// Retained messages a companion may publish faster than a link sends them
/// before that link republishes the latest ones instead.
const COMPANION_BACKLOG: usize = 256;

/// One message a cloud sent on a subscription.
#[derive(Debug, Clone)]
pub struct DownlinkMessage {
    /// The destination (cloud) it came from.
    pub destination: Arc<str>,
    /// The MQTT topic.
    pub topic: String,
    /// The topic below the destination's `topic_prefix`, when it starts with it.
    pub key: Option<String>,
    /// The payload.
    pub payload: Bytes,
    /// MQTT 5 user properties (empty on 3.1.1).
    pub user_properties: Vec<(String, String)>,
    /// MQTT 5 content type.
    pub content_type: Option<String>,
    /// Whether the broker delivered it as a retained message.
    pub retain: bool,
}

impl DownlinkMessage {
    /// The first user property named `name`.
    pub fn user_property(&self, name: &str) -> Option<&str> {
        self.user_properties.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// A message handed to one consumer, with the means to acknowledge it.
#[derive(Debug)]
pub struct Delivery {
    /// The message.
    pub message: DownlinkMessage,
    done: oneshot::Sender<()>,
}

impl Delivery {
    /// Says the message is handled for good (durably applied, or rejected
    /// and logged); the broker gets its PUBACK once every consumer acked.
    pub fn ack(self) {
        let _ = self.done.send(());
    }

    /// Builds a delivery outside a forwarder (tests, local replays);
    /// the receiver resolves when it is acked.
    pub fn new(message: DownlinkMessage) -> (Self, oneshot::Receiver<()>) {
        let (done, rx) = oneshot::channel();
        (Self { message, done }, rx)
    }
}

/// The queue a consumer reads its deliveries from.
pub type DeliveryReceiver = mpsc::Receiver<Delivery>;

/// A consumer's side of the queue, given to [`DownlinkRouter::register`].
pub type DeliverySender = mpsc::Sender<Delivery>;

#[derive(Clone)]
struct Route {
    destination: String,
    filter: TopicFilter,
    consumer: DeliverySender,
}

/// Who consumes what: built at start-up, before the forwarders.
#[derive(Clone, Default)]
pub struct DownlinkRouter {
    routes: Vec<Route>,
    companions: Vec<(String, Companion)>,
}

impl DownlinkRouter {
    /// An empty router.
    pub fn new() -> Self {
        Self::default()
    }

    /// Routes messages from `destination` whose topic matches `filter` (a
    /// full MQTT topic filter, prefix included) to `consumer`; the forwarder
    /// subscribes to `filter`. Several consumers may register the same filter.
    pub fn register(&mut self, destination: &str, filter: TopicFilter, consumer: DeliverySender) {
        self.routes.push(Route { destination: destination.to_owned(), filter, consumer });
    }

    /// Lets `companion` talk over `destination`'s connection (at most one
    /// per destination).
    pub fn attach(&mut self, destination: &str, companion: Companion) {
        debug_assert!(self.companions.iter().all(|(d, _)| d != destination), "one companion per destination");
        self.companions.push((destination.to_owned(), companion));
    }

    /// What the forwarder of `destination` (topic prefix `topic_prefix`) subscribes to and dispatches.
    pub fn for_destination(&self, destination: &str, topic_prefix: &str) -> DestinationDownlink {
        let routes: Vec<Route> = self.routes.iter().filter(|r| r.destination == destination).cloned().collect();
        let mut subscriptions: Vec<TopicFilter> = Vec::new();
        for r in &routes {
            if !subscriptions.contains(&r.filter) {
                subscriptions.push(r.filter.clone());
            }
        }
        DestinationDownlink {
            destination: destination.into(),
            topic_prefix: topic_prefix.to_owned(),
            subscriptions,
            routes,
            companion: self.companions.iter().find(|(d, _)| d == destination).map(|(_, c)| c.clone()),
        }
    }
}

/// One destination's subscriptions and consumers, owned by its forwarder.
#[derive(Clone)]
pub struct DestinationDownlink {
    destination: Arc<str>,
    topic_prefix: String,
    subscriptions: Vec<TopicFilter>,
    routes: Vec<Route>,
    companion: Option<Companion>,
}

impl DestinationDownlink {
    /// No subscriptions (a destination nobody consumes from).
    pub fn none(destination: &str) -> Self {
        Self {
            destination: destination.into(),
            topic_prefix: String::new(),
            subscriptions: Vec::new(),
            routes: Vec::new(),
            companion: None,
        }
    }

    /// The filters to subscribe to on every connection (each once).
    pub fn subscriptions(&self) -> &[TopicFilter] {
        &self.subscriptions
    }

    /// Whether nothing here subscribes (no consumer, no companion).
    pub fn is_empty(&self) -> bool {
        self.subscriptions.is_empty() && self.companion.is_none()
    }

    /// On a new connection: what the companion subscribes to now, and the
    /// latest of its retained messages, to publish again (a broker may have
    /// lost them, and the link may have dropped some).
    pub fn companion_connected(&mut self) -> (BTreeSet<TopicFilter>, Vec<Retained>) {
        match &mut self.companion {
            Some(c) => c.connected(),
            None => Default::default(),
        }
    }

    /// The companion's next request on this connection; pending while
    /// there is none, or no companion.
    pub async fn companion_request(&mut self) -> CompanionRequest {
        match &mut self.companion {
            Some(c) => c.next().await,
            None => std::future::pending().await,
        }
    }

    /// Hands a received message to every consumer whose filter matches it,
    /// waiting for room in their queues (so a slow consumer slows this
    /// link's downlink instead of growing memory). Returns one receiver per
    /// consumer that took it; the message is handled once all resolve. A
    /// message nobody consumes (a stale session subscription) returns none.
    pub async fn dispatch(
        &self,
        topic: String,
        payload: Bytes,
        user_properties: Vec<(String, String)>,
        content_type: Option<String>,
        retain: bool,
    ) -> Vec<oneshot::Receiver<()>> {
        let key = topic.strip_prefix(self.topic_prefix.as_str()).filter(|k| !k.is_empty()).map(str::to_owned);
        let message = DownlinkMessage {
            destination: self.destination.clone(),
            topic,
            key,
            payload,
            user_properties,
            content_type,
            retain,
        };
        let routed = self.routes.iter().filter(|r| r.filter.matches(&message.topic)).map(|r| &r.consumer);
        let companion = self.companion.as_ref().filter(|c| c.wants(&message.topic)).map(|c| &c.consumer);
        let mut pending = Vec::new();
        for consumer in routed.chain(companion) {
            let (delivery, rx) = Delivery::new(message.clone());
            // A consumer that has stopped (shutdown) simply does not ack.
            if consumer.send(delivery).await.is_ok() {
                pending.push(rx);
            } else {
                let (never, rx) = oneshot::channel::<()>();
                drop(never);
                pending.push(rx);
            }
        }
        pending
    }
}

/// A retained message a companion publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retained {
    /// The MQTT topic.
    pub topic: String,
    /// The payload.
    pub payload: Vec<u8>,
    /// MQTT 5 content type.
    pub content_type: Option<String>,
}

/// What a companion asks of the connection.
#[derive(Debug, PartialEq, Eq)]
pub enum CompanionRequest {
    /// Its filters changed: subscribe to `add`, unsubscribe from `remove`.
    Filters {
        /// Filters to subscribe to.
        add: Vec<TopicFilter>,
        /// Filters to drop.
        remove: Vec<TopicFilter>,
    },
    /// Publish this, retained.
    Publish(Retained),
    /// The link fell behind: publish these (the latest per topic) instead
    /// of what it missed.
    Republish(Vec<Retained>),
}

/// The forwarder's view of a companion, one per destination it talks over.
pub struct Companion {
    filters: watch::Receiver<BTreeSet<TopicFilter>>,
    latest: watch::Receiver<BTreeMap<String, Retained>>,
    updates: broadcast::Receiver<Retained>,
    consumer: DeliverySender,
    /// The filters subscribed on the current connection.
    subscribed: BTreeSet<TopicFilter>,
    /// The companion stopped (shutdown): nothing more will come.
    closed: bool,
}

impl Clone for Companion {
    fn clone(&self) -> Self {
        Self {
            filters: self.filters.clone(),
            latest: self.latest.clone(),
            updates: self.updates.resubscribe(),
            consumer: self.consumer.clone(),
            subscribed: self.subscribed.clone(),
            closed: self.closed,
        }
    }
}

impl Companion {
    fn wants(&self, topic: &str) -> bool {
        self.filters.borrow().iter().any(|f| f.matches(topic))
    }

    fn connected(&mut self) -> (BTreeSet<TopicFilter>, Vec<Retained>) {
        self.subscribed = self.filters.borrow_and_update().clone();
        // What was published before now is in `latest`.
        self.updates = self.updates.resubscribe();
        (self.subscribed.clone(), self.latest.borrow().values().cloned().collect())
    }

    async fn next(&mut self) -> CompanionRequest {
        loop {
            if self.closed {
                return std::future::pending().await;
            }
            tokio::select! {
                changed = self.filters.changed() => {
                    if changed.is_err() {
                        self.closed = true;
                        continue;
                    }
                    let wanted = self.filters.borrow_and_update().clone();
                    let add: Vec<_> = wanted.difference(&self.subscribed).cloned().collect();
                    let remove: Vec<_> = self.subscribed.difference(&wanted).cloned().collect();
                    self.subscribed = wanted;
                    if !add.is_empty() || !remove.is_empty() {
                        return CompanionRequest::Filters { add, remove };
                    }
                }
                update = self.updates.recv() => match update {
                    Ok(r) => return CompanionRequest::Publish(r),
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // What is still queued is older than `latest`: skip it.
                        self.updates = self.updates.resubscribe();
                        return CompanionRequest::Republish(self.latest.borrow().values().cloned().collect());
                    }
                    Err(broadcast::error::RecvError::Closed) => self.closed = true,
                },
            }
        }
    }
}

/// A companion's own side: what it wants the connections to do.
pub struct CompanionHandle {
    filters: watch::Sender<BTreeSet<TopicFilter>>,
    latest: watch::Sender<BTreeMap<String, Retained>>,
    updates: broadcast::Sender<Retained>,
    consumer: DeliverySender,
}

impl CompanionHandle {
    /// A companion whose messages go to `consumer` (a queue at least
    /// [`WINDOW`] deep).
    pub fn new(consumer: DeliverySender) -> Self {
        debug_assert!(consumer.max_capacity() >= usize::from(WINDOW), "see WINDOW");
        Self {
            filters: watch::Sender::new(BTreeSet::new()),
            latest: watch::Sender::new(BTreeMap::new()),
            updates: broadcast::Sender::new(COMPANION_BACKLOG),
            consumer,
        }
    }

    /// What a destination's forwarder gets (see [`DownlinkRouter::attach`]).
    pub fn companion(&self) -> Companion {
        Companion {
            filters: self.filters.subscribe(),
            latest: self.latest.subscribe(),
            updates: self.updates.subscribe(),
            consumer: self.consumer.clone(),
            subscribed: BTreeSet::new(),
            closed: false,
        }
    }

    /// Subscribes every connection to exactly `filters` from now on.
    pub fn subscribe(&self, filters: BTreeSet<TopicFilter>) {
        self.filters.send_if_modified(|f| {
            let changed = *f != filters;
            *f = filters;
            changed
        });
    }

    /// Publishes `message` retained on every connection, in order with the
    /// others, and again on each new connection until a newer one on its
    /// topic replaces it.
    pub fn publish(&self, message: Retained) {
        self.latest.send_modify(|l| {
            l.insert(message.topic.clone(), message.clone());
        });
        let _ = self.updates.send(message);
    }

    /// Whether a message was published on `topic`, and how many topics
    /// have one.
    pub fn published(&self, topic: &str) -> (bool, usize) {
        let latest = self.latest.borrow();
        (latest.contains_key(topic), latest.len())
    }
}

/// Received messages waiting for their consumers, in arrival order: the
/// order their PUBACKs must leave in (MQTT 4.6), whatever order the
/// consumers finish in.
pub struct AckQueue<M> {
    waiting: VecDeque<(M, JoinAll<oneshot::Receiver<()>>)>,
}

impl<M> Default for AckQueue<M> {
    fn default() -> Self {
        Self { waiting: VecDeque::new() }
    }
}

impl<M> AckQueue<M> {
    /// Queues `message` behind those already waiting; `handled` are its
    /// consumers' receivers, as [`DestinationDownlink::dispatch`] returned them.
    pub fn push(&mut self, message: M, handled: Vec<oneshot::Receiver<()>>) {
        self.waiting.push_back((message, futures::future::join_all(handled)));
    }

    /// Whether no message is waiting.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// The oldest message, once every consumer of it is done: `Ok` to
    /// acknowledge it, `Err` when a consumer dropped it unacked (the broker
    /// must deliver it again). Later messages wait for it even when their
    /// consumers finished first. Pending while the queue is empty.
    pub async fn next(&mut self) -> Result<M, M> {
        let Some((_, handled)) = self.waiting.front_mut() else { return std::future::pending().await };
        let results = handled.await;
        let (message, _) = self.waiting.pop_front().expect("the front was just awaited");
        if results.iter().all(Result::is_ok) { Ok(message) } else { Err(message) }
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt as _;

    use super::*;

    fn filter(f: &str) -> TopicFilter {
        TopicFilter::new(f).unwrap()
    }

    #[tokio::test]
    async fn messages_reach_every_consumer_whose_filter_matches_and_only_theirs() {
        let (state_tx, mut state_rx) = mpsc::channel(4);
        let (fleet_tx, mut fleet_rx) = mpsc::channel(4);
        let mut router = DownlinkRouter::new();
        router.register("aws", filter("ferry/gw/desired/#"), state_tx.clone());
        router.register("aws", filter("ferry/gw/fleet/#"), fleet_tx);
        router.register("azure", filter("ferry/gw/desired/#"), state_tx);
        let aws = router.for_destination("aws", "ferry/gw/");
        assert_eq!(aws.subscriptions().len(), 2);

        let acks = aws.dispatch("ferry/gw/desired/fan".into(), Bytes::from_static(b"on"), vec![], None, true).await;
        assert_eq!(acks.len(), 1);
        let d = state_rx.recv().await.unwrap();
        assert_eq!(d.message.key.as_deref(), Some("desired/fan"));
        assert_eq!(&*d.message.destination, "aws");
        assert!(d.message.retain);
        assert!(fleet_rx.try_recv().is_err());
        d.ack();
        for rx in acks {
            rx.await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_delivery_dropped_without_ack_is_not_handled() {
        let (tx, mut rx) = mpsc::channel(1);
        let mut router = DownlinkRouter::new();
        router.register("a", filter("#"), tx);
        let a = router.for_destination("a", "");
        let acks = a.dispatch("x".into(), Bytes::new(), vec![], None, false).await;
        drop(rx.recv().await.unwrap());
        assert!(acks.into_iter().next().unwrap().await.is_err());
    }

    #[tokio::test]
    async fn acks_leave_in_arrival_order_whatever_order_consumers_finish_in() {
        let mut queue = AckQueue::default();
        let mut done = Vec::new();
        for m in ["m1", "m2", "m3"] {
            let (tx, rx) = oneshot::channel();
            // m2 has two consumers; the message waits for both.
            let (tx2, rx2) = oneshot::channel();
            queue.push(m, if m == "m2" { vec![rx, rx2] } else { vec![rx] });
            done.push((tx, tx2));
        }
        let mut done = done.into_iter();
        let (m1, _) = done.next().unwrap();
        let (m2, m2_second) = done.next().unwrap();
        let (m3, _) = done.next().unwrap();
        m3.send(()).unwrap();
        m2.send(()).unwrap();
        assert!(queue.next().now_or_never().is_none(), "m3 and m2 wait for m1");
        m1.send(()).unwrap();
        assert_eq!(queue.next().await, Ok("m1"));
        assert!(queue.next().now_or_never().is_none(), "m2 waits for its second consumer");
        m2_second.send(()).unwrap();
        assert_eq!(queue.next().await, Ok("m2"));
        assert_eq!(queue.next().await, Ok("m3"));
        assert!(queue.is_empty() && queue.next().now_or_never().is_none());
    }

    #[tokio::test]
    async fn a_message_a_consumer_dropped_comes_out_as_unhandled_in_its_turn() {
        let mut queue = AckQueue::default();
        let (tx1, rx1) = oneshot::channel::<()>();
        let (tx2, rx2) = oneshot::channel();
        queue.push(1, vec![rx1]);
        queue.push(2, vec![rx2]);
        tx2.send(()).unwrap();
        drop(tx1);
        assert_eq!(queue.next().await, Err(1));
        assert_eq!(queue.next().await, Ok(2));
    }

    fn retained(topic: &str) -> Retained {
        Retained { topic: topic.into(), payload: b"{}".to_vec(), content_type: None }
    }

    #[tokio::test]
    async fn a_companion_gets_what_matches_its_current_filters_and_each_connection_its_latest_messages() {
        let (tx, mut rx) = mpsc::channel(usize::from(WINDOW));
        let handle = CompanionHandle::new(tx);
        let mut router = DownlinkRouter::new();
        router.attach("aws", handle.companion());
        let mut aws = router.for_destination("aws", "");
        assert!(!aws.is_empty(), "a companion makes the session persistent");

        handle.subscribe(BTreeSet::from([filter("fleet/plugin/+/manifest/+")]));
        handle.publish(retained("fleet/status/gw/a"));
        handle.publish(retained("fleet/status/gw/a"));
        handle.publish(retained("fleet/status/gw/b"));
        let (filters, latest) = aws.companion_connected();
        assert_eq!(filters, BTreeSet::from([filter("fleet/plugin/+/manifest/+")]));
        assert_eq!(latest.len(), 2, "the latest per topic: {latest:?}");
        assert!(aws.companion_request().now_or_never().is_none(), "what came before is in `latest`");

        // While connected: new filters, then a new message, in order.
        handle.subscribe(BTreeSet::from([filter("fleet/plugin/+/manifest/+"), filter("fleet/plugin/a/v2/+")]));
        let add = vec![filter("fleet/plugin/a/v2/+")];
        assert_eq!(aws.companion_request().await, CompanionRequest::Filters { add, remove: vec![] });
        handle.publish(retained("fleet/status/gw/a"));
        assert_eq!(aws.companion_request().await, CompanionRequest::Publish(retained("fleet/status/gw/a")));
        handle.subscribe(BTreeSet::from([filter("fleet/plugin/+/manifest/+")]));
        let remove = vec![filter("fleet/plugin/a/v2/+")];
        assert_eq!(aws.companion_request().await, CompanionRequest::Filters { add: vec![], remove });

        let acks = aws.dispatch("fleet/plugin/a/manifest/gw".into(), Bytes::new(), vec![], None, true).await;
        assert_eq!(acks.len(), 1);
        assert_eq!(rx.recv().await.unwrap().message.topic, "fleet/plugin/a/manifest/gw");
        let acks = aws.dispatch("fleet/plugin/a/v2/0".into(), Bytes::new(), vec![], None, true).await;
        assert!(acks.is_empty(), "a filter it dropped delivers nothing to it");
        assert!(router.for_destination("azure", "").is_empty(), "attached to aws only");
    }

    #[tokio::test]
    async fn a_link_that_falls_behind_a_companion_republishes_the_latest_instead() {
        let (tx, _rx) = mpsc::channel(usize::from(WINDOW));
        let handle = CompanionHandle::new(tx);
        let mut companion = handle.companion();
        companion.connected();
        for n in 0..COMPANION_BACKLOG + 10 {
            handle.publish(retained(&format!("t/{}", n % 3)));
        }
        match companion.next().await {
            CompanionRequest::Republish(latest) => assert_eq!(latest.len(), 3),
            other => panic!("expected a republish, got {other:?}"),
        }
        assert!(companion.next().now_or_never().is_none(), "nothing older than the republish follows it");
        drop(handle);
        assert!(companion.next().now_or_never().is_none(), "a stopped companion asks for nothing more");
    }

    #[test]
    fn the_same_filter_registered_twice_is_subscribed_once() {
        let (tx, _rx) = mpsc::channel(1);
        let mut router = DownlinkRouter::new();
        router.register("a", filter("p/#"), tx.clone());
        router.register("a", filter("p/#"), tx);
        assert_eq!(router.for_destination("a", "p/").subscriptions().len(), 1);
        assert!(router.for_destination("b", "p/").is_empty());
    }
}
