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

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::JoinAll;
use tokio::sync::{mpsc, oneshot};

use crate::topic::TopicFilter;

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
}

impl DestinationDownlink {
    /// No subscriptions (a destination nobody consumes from).
    pub fn none(destination: &str) -> Self {
        Self {
            destination: destination.into(),
            topic_prefix: String::new(),
            subscriptions: Vec::new(),
            routes: Vec::new(),
        }
    }

    /// The filters to subscribe to on every connection (each once).
    pub fn subscriptions(&self) -> &[TopicFilter] {
        &self.subscriptions
    }

    /// Whether there is anything to subscribe to.
    pub fn is_empty(&self) -> bool {
        self.subscriptions.is_empty()
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
        let mut pending = Vec::new();
        for r in self.routes.iter().filter(|r| r.filter.matches(&message.topic)) {
            let (delivery, rx) = Delivery::new(message.clone());
            // A consumer that has stopped (shutdown) simply does not ack.
            if r.consumer.send(delivery).await.is_ok() {
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
