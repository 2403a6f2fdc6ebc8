//! Fixed-bucket histograms recorded with relaxed atomic adds, so the store
//! writer and the forwarders time their work without taking a lock. The
//! scrape in [`crate::metrics`] renders them; nothing here knows Prometheus.

use std::sync::atomic::{AtomicU64, Ordering};

/// Bucket bounds of the commit latency histogram, in seconds: an fsync
/// takes from a fraction of a millisecond (NVMe) to tens (SD cards).
pub const COMMIT_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// Bucket bounds of the delivery lag histogram, in seconds: from a live
/// link (milliseconds) to a backlog drained after a day offline.
pub const LAG_BUCKETS: &[f64] =
    &[0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0, 21600.0, 86400.0];

/// A histogram with fixed buckets, recorded with relaxed atomic adds so
/// that the writer thread and forwarders never take a lock for it.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// One count per bound plus the `+Inf` bucket (not cumulative).
    counts: Box<[AtomicU64]>,
    /// Sum of observations in microseconds.
    sum_micros: AtomicU64,
}

impl Histogram {
    /// An empty histogram over `bounds` (ascending, in seconds).
    pub fn new(bounds: &'static [f64]) -> Self {
        Self { bounds, counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(), sum_micros: AtomicU64::new(0) }
    }

    /// Records one observation of `seconds`.
    pub fn observe(&self, seconds: f64) {
        let i = self.bounds.iter().position(|b| seconds <= *b).unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add((seconds.max(0.0) * 1e6) as u64, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// Sum, count and per-bucket counts (the encoder accumulates them).
    pub fn snapshot(&self) -> HistogramSnapshot {
        let buckets: Vec<(f64, u64)> = self
            .counts
            .iter()
            .enumerate()
            .map(|(i, c)| (self.bounds.get(i).copied().unwrap_or(f64::INFINITY), c.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        HistogramSnapshot { sum: self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6, count, buckets }
    }
}

/// A histogram's state at one moment, as the exposition wants it.
#[derive(Debug)]
pub struct HistogramSnapshot {
    /// Sum of observations, in seconds.
    pub sum: f64,
    /// Observations.
    pub count: u64,
    /// (upper bound, observations in this bucket only); the last bound is infinite.
    pub buckets: Vec<(f64, u64)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_counts_each_observation_in_its_bucket() {
        let h = Histogram::new(&[0.1, 1.0]);
        for v in [0.05, 0.1, 0.5, 3.0] {
            h.observe(v);
        }
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert_eq!(s.buckets, vec![(0.1, 2), (1.0, 1), (f64::INFINITY, 1)]);
        assert!((s.sum - 3.65).abs() < 1e-6, "sum {}", s.sum);
    }
}
