//! The Prometheus scrape that renders `GET /metrics`.
//!
//! Counters and gauges are not kept twice: a scrape reads them from where
//! they already live (the store's persistent counters, each forwarder's
//! status, each plugin's status), so the hot paths only pay for the two
//! [`crate::histogram`]s, a few relaxed atomic adds per observation. The text is
//! rendered by `prometheus-client` in the OpenMetrics text format, which
//! Prometheus scrapes natively.

use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::forward::DestinationStatus;
use crate::histogram::{Histogram, HistogramSnapshot};
use crate::plugin::{CircuitState, PluginHandle, PluginStatus};
use crate::store::{Store, StoreError, StoreStatus};

/// The OpenMetrics content type `GET /metrics` answers with.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// One destination as metrics see it.
#[derive(Clone)]
pub struct DestinationSource {
    /// The forwarder's status.
    pub status: Arc<Mutex<DestinationStatus>>,
    /// Its event time → PUBACK histogram.
    pub lag: Arc<Histogram>,
}

/// Everything a scrape reads.
#[derive(Clone)]
pub struct Sources {
    /// This device (labels `ferry_agent_info`).
    pub device_id: String,
    /// The store (persistent counters, sizes, commit latency).
    pub store: Store,
    /// Each destination, in config order.
    pub destinations: Vec<DestinationSource>,
    /// Each loaded plugin, in config order.
    pub plugins: Vec<PluginHandle>,
}

impl Sources {
    /// Renders every metric in the OpenMetrics text format. Blocking: it
    /// reads the store.
    pub fn render(&self, now_ms: u64) -> Result<String, StoreError> {
        let snapshot = Snapshot {
            device_id: self.device_id.clone(),
            store: self.store.status(now_ms)?,
            commit: self.store.commit_latency().snapshot(),
            destinations: self
                .destinations
                .iter()
                .map(|d| (d.status.lock().expect("status lock").clone(), d.lag.snapshot()))
                .collect(),
            plugins: self.plugins.iter().map(PluginHandle::status).collect(),
        };
        let mut registry = Registry::default();
        registry.register_collector(Box::new(snapshot));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).expect("writing to a String cannot fail");
        Ok(out)
    }
}

/// The values of one scrape.
#[derive(Debug)]
struct Snapshot {
    device_id: String,
    store: StoreStatus,
    commit: HistogramSnapshot,
    destinations: Vec<(DestinationStatus, HistogramSnapshot)>,
    plugins: Vec<PluginStatus>,
}

type Fmt = Result<(), std::fmt::Error>;

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> Fmt {
    ConstCounter::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Counter)?)
}

fn gauge<N: EncodeGaugeValue + std::fmt::Debug>(e: &mut DescriptorEncoder, name: &str, help: &str, v: N) -> Fmt {
    ConstGauge::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

/// A metric family with one sample per item, labelled `label` = the item's name.
fn family<T>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    label: &str,
    items: &[T],
    value: impl Fn(&T) -> (&str, f64),
) -> Fmt {
    if items.is_empty() {
        return Ok(());
    }
    let mut m = e.encode_descriptor(name, help, None, kind)?;
    for item in items {
        let (item_name, v) = value(item);
        let labels = [(label, item_name)];
        let sample = m.encode_family(&labels)?;
        match kind {
            MetricType::Counter => ConstCounter::new(v as u64).encode(sample)?,
            _ => ConstGauge::new(v).encode(sample)?,
        }
    }
    Ok(())
}

fn histogram(m: &mut prometheus_client::encoding::MetricEncoder, h: &HistogramSnapshot) -> Fmt {
    m.encode_histogram::<prometheus_client::encoding::NoLabelSet>(h.sum, h.count, &h.buckets, None)
}

impl Collector for Snapshot {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.store;
        let c = &s.counters;
        let i = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let info = Info::new([("device_id", self.device_id.as_str()), ("version", env!("CARGO_PKG_VERSION"))]);
        info.encode(e.encode_descriptor(
            "ferry_agent",
            "This agent: device id and version.",
            None,
            MetricType::Info,
        )?)?;
        counter(
            &mut e,
            "ferry_ingest_events",
            "Events accepted into the store (duplicates excluded).",
            c.accepted_events,
        )?;
        counter(
            &mut e,
            "ferry_ingest_dedup_hits",
            "Events answered as duplicates of an id already stored.",
            c.dedup_hits,
        )?;
        counter(&mut e, "ferry_store_commits", "Write transactions committed.", c.commits)?;
        {
            let mut m = e.encode_descriptor(
                "ferry_store_commit_seconds",
                "Time to apply and commit one write transaction (with its fsync), since start.",
                None,
                MetricType::Histogram,
            )?;
            histogram(&mut m, &self.commit)?;
        }
        gauge(
            &mut e,
            "ferry_store_healthy",
            "1 while the store takes events; 0 while its disk is below the reserve, its writes fail or its file vanished (see /healthz).",
            i64::from(s.health.is_ok()),
        )?;
        gauge(&mut e, "ferry_store_events", "Events in the log.", i(s.events))?;
        gauge(&mut e, "ferry_store_bytes", "Bytes of event records in the log.", i(s.bytes))?;
        gauge(&mut e, "ferry_store_quota_bytes", "The store's byte quota (log and dead letters).", i(s.quota_bytes))?;
        gauge(&mut e, "ferry_store_last_sequence", "Sequence of the newest event accepted.", i(s.last_sequence))?;
        gauge(
            &mut e,
            "ferry_store_oldest_event_age_seconds",
            "Age of the oldest event in the log (0 when empty).",
            s.oldest_age_ms.unwrap_or(0) as f64 / 1000.0,
        )?;
        counter(
            &mut e,
            "ferry_store_evicted_events",
            "Events evicted by drop-oldest to stay in quota.",
            c.evicted_events,
        )?;
        counter(&mut e, "ferry_store_evicted_bytes", "Bytes evicted by drop-oldest.", c.evicted_bytes)?;
        counter(
            &mut e,
            "ferry_store_expired_events",
            "Events whose TTL passed (moved to dead letters).",
            c.expired_events,
        )?;
        counter(
            &mut e,
            "ferry_store_delivered_events",
            "Events every destination routing them had (removed, or kept for replay).",
            c.delivered_events,
        )?;
        gauge(
            &mut e,
            "ferry_store_retained_events",
            "Delivered events kept for replay (store.retain_delivered).",
            i(c.retained_events),
        )?;
        gauge(&mut e, "ferry_store_retained_bytes", "Bytes of delivered events kept for replay.", i(c.retained_bytes))?;
        counter(
            &mut e,
            "ferry_store_retained_removed_events",
            "Kept delivered events removed: to make room, or for their age or share of the quota.",
            c.retained_evicted + c.retained_expired,
        )?;
        gauge(&mut e, "ferry_dead_letters", "Dead letters held.", i(s.dead_letters))?;
        gauge(&mut e, "ferry_dead_letter_bytes", "Bytes of dead letters held.", i(s.dead_letter_bytes))?;
        counter(
            &mut e,
            "ferry_dead_letters_dropped",
            "Dead letters dropped to keep them within their share of the quota.",
            c.dead_dropped,
        )?;

        let d = &self.destinations;
        let dest = |name: &str, help: &str, kind, f: fn(&DestinationStatus, &StoreStatus) -> f64, e: &mut _| {
            family(e, name, help, kind, "destination", d, |(st, _)| (st.name.as_str(), f(st, s)))
        };
        use MetricType::{Counter, Gauge};
        dest(
            "ferry_destination_up",
            "1 while a connection to the broker is up.",
            Gauge,
            |d, _| f64::from(u8::from(d.connected)),
            &mut e,
        )?;
        dest(
            "ferry_destination_backlog_events",
            "Events after the destination's durable cursor (an upper bound: it includes events its routes skip).",
            Gauge,
            |d, s| d.backlog_events(s.last_sequence) as f64,
            &mut e,
        )?;
        dest(
            "ferry_destination_acked_sequence",
            "The destination's durable cursor.",
            Gauge,
            |d, _| d.acked_sequence as f64,
            &mut e,
        )?;
        dest("ferry_destination_in_flight", "Publishes awaiting PUBACK.", Gauge, |d, _| d.in_flight as f64, &mut e)?;
        dest(
            "ferry_destination_replay_remaining_events",
            "Sequences a replay has left to send again (0 when none runs).",
            Gauge,
            |d, _| d.replay.as_ref().map_or(0.0, |r| r.remaining as f64),
            &mut e,
        )?;
        dest(
            "ferry_destination_lag_seconds",
            "Age of the oldest event not yet acknowledged (0 when caught up).",
            Gauge,
            |d, _| d.lag_ms as f64 / 1000.0,
            &mut e,
        )?;
        dest(
            "ferry_destination_delivered_events",
            "Events acknowledged by the broker.",
            Counter,
            |d, _| d.delivered as f64,
            &mut e,
        )?;
        dest(
            "ferry_destination_published_events",
            "Publishes sent, resends included.",
            Counter,
            |d, _| d.published as f64,
            &mut e,
        )?;
        dest("ferry_destination_sent_bytes", "Payload bytes published.", Counter, |d, _| d.bytes_sent as f64, &mut e)?;
        dest(
            "ferry_destination_reconnects",
            "Connections lost or refused.",
            Counter,
            |d, _| d.reconnects as f64,
            &mut e,
        )?;
        dest(
            "ferry_destination_publish_errors",
            "Publishes lost to a failed link before their PUBACK (they are resent).",
            Counter,
            |d, _| d.publish_errors as f64,
            &mut e,
        )?;
        dest(
            "ferry_destination_throttled",
            "1 while the destination waits on its pace (its cloud's publish or byte rate), else 0.",
            Gauge,
            |d, _| f64::from(u8::from(d.throttled)),
            &mut e,
        )?;
        dest(
            "ferry_destination_throttled_seconds",
            "Time spent waiting on the destination's pace.",
            Counter,
            |d, _| d.throttled_seconds,
            &mut e,
        )?;
        dest(
            "ferry_destination_events_per_publish",
            "Events per publish since start (above 1 when batching).",
            Gauge,
            |d, _| d.events_per_publish,
            &mut e,
        )?;
        dest(
            "ferry_destination_dead_letters",
            "Events this destination could not take (dead-lettered for it).",
            Counter,
            |d, _| d.dead_lettered as f64,
            &mut e,
        )?;
        if !d.is_empty() {
            let mut m = e.encode_descriptor(
                "ferry_destination_delivery_lag_seconds",
                "Time from an event's acceptance to its PUBACK from the destination.",
                None,
                MetricType::Histogram,
            )?;
            for (st, h) in d {
                let labels = [("destination", st.name.as_str())];
                let mut sample = m.encode_family(&labels)?;
                histogram(&mut sample, h)?;
            }
        }

        let p = &self.plugins;
        let plugin = |name: &str, help: &str, kind, f: fn(&PluginStatus) -> f64, e: &mut _| {
            family(e, name, help, kind, "plugin", p, |st| (st.name.as_str(), f(st)))
        };
        plugin("ferry_plugin_calls", "Calls made, failed ones included.", Counter, |p| p.calls as f64, &mut e)?;
        plugin("ferry_plugin_events", "Events passed to the plugin.", Counter, |p| p.events as f64, &mut e)?;
        plugin("ferry_plugin_failures", "Failed calls of every kind.", Counter, |p| p.failures as f64, &mut e)?;
        plugin("ferry_plugin_traps", "Calls that trapped.", Counter, |p| p.traps as f64, &mut e)?;
        plugin("ferry_plugin_timeouts", "Calls that ran out of fuel or time.", Counter, |p| p.timeouts as f64, &mut e)?;
        plugin(
            "ferry_plugin_out_of_memory",
            "Calls that hit the memory limit.",
            Counter,
            |p| p.out_of_memory as f64,
            &mut e,
        )?;
        plugin(
            "ferry_plugin_invalid_output",
            "Calls whose output the contract or the calling stage refused (invalid or oversized events).",
            Counter,
            |p| p.invalid_output as f64,
            &mut e,
        )?;
        plugin(
            "ferry_plugin_output_too_large",
            "Calls whose output went over max_output (refused while copied).",
            Counter,
            |p| p.output_too_large as f64,
            &mut e,
        )?;
        plugin(
            "ferry_plugin_refused",
            "Calls refused while the circuit was open.",
            Counter,
            |p| p.refused as f64,
            &mut e,
        )?;
        plugin(
            "ferry_plugin_fuel_used",
            "Fuel consumed (fuel-metered plugins only).",
            Counter,
            |p| p.fuel_used as f64,
            &mut e,
        )?;
        plugin(
            "ferry_plugin_circuit_open",
            "1 while the plugin's circuit breaker is open.",
            Gauge,
            |p| f64::from(u8::from(p.circuit == CircuitState::Open)),
            &mut e,
        )?;
        Ok(())
    }
}
