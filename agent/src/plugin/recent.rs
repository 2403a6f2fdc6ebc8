//! A bounded sample of a plugin's recent successful calls and what it
//! answered, so a candidate version can be run in shadow beside it on real
//! inputs (see the fleet updater) without touching live traffic.
//!
//! Sampling is cheap by construction: the plugin thread owns each call's
//! inputs, so a sample moves them instead of copying, and at most one call
//! per [`SAMPLE_INTERVAL`] is kept, within [`MAX_SAMPLES`] and [`MAX_BYTES`].

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Verdict, Versioned, WitEvent};

/// At most one call sampled per interval.
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(20);

/// Most samples kept.
pub const MAX_SAMPLES: usize = 64;

/// Most bytes of event data kept across samples.
pub const MAX_BYTES: usize = 1 << 20;

/// One sampled call.
#[derive(Debug, Clone)]
pub enum Sample {
    /// A filter batch and its verdicts.
    Filter(Arc<Vec<WitEvent>>, Vec<Verdict>),
    /// A merge call (key, current, incoming) and its result.
    Merge(String, Option<Versioned>, Versioned, Result<Vec<u8>, String>),
}

impl Sample {
    /// Approximate bytes it holds.
    fn bytes(&self) -> usize {
        match self {
            Sample::Filter(events, _) => events.iter().map(|e| e.data.len() + e.subject.len() + 64).sum(),
            Sample::Merge(key, current, incoming, _) => {
                key.len() + current.as_ref().map_or(0, |c| c.data.len()) + incoming.data.len() + 64
            }
        }
    }

    /// Events (filter) or calls (merge) it stands for.
    pub fn events(&self) -> usize {
        match self {
            Sample::Filter(events, _) => events.len(),
            Sample::Merge(..) => 1,
        }
    }
}

/// The sample ring.
#[derive(Debug, Default)]
pub struct Recent {
    samples: VecDeque<(Sample, usize)>,
    bytes: usize,
    last: Option<Instant>,
}

impl Recent {
    /// Keeps `sample`, dropping the oldest ones past the bounds.
    pub fn push(&mut self, sample: Sample) {
        let size = sample.bytes();
        if size > MAX_BYTES {
            return;
        }
        self.bytes += size;
        self.samples.push_back((sample, size));
        while self.samples.len() > MAX_SAMPLES || self.bytes > MAX_BYTES {
            let (_, size) = self.samples.pop_front().expect("over a bound, so not empty");
            self.bytes -= size;
        }
    }

    /// The samples, oldest first.
    pub fn samples(&self) -> Vec<Sample> {
        self.samples.iter().map(|(s, _)| s.clone()).collect()
    }
}

/// Keeps the sample `make` builds if the last one is older than the interval.
pub fn offer(recent: &Mutex<Recent>, make: impl FnOnce() -> Sample) {
    let mut r = recent.lock().expect("recent samples lock");
    let now = Instant::now();
    if r.last.is_some_and(|t| now.duration_since(t) < SAMPLE_INTERVAL) {
        return;
    }
    r.last = Some(now);
    r.push(make());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn merge_sample(bytes: usize) -> Sample {
        let v = Versioned { data: vec![0; bytes], version: vec![], hlc: 0, origin: String::new() };
        Sample::Merge("k".into(), None, v, Ok(vec![]))
    }

    #[test]
    fn the_ring_keeps_the_newest_samples_within_its_bounds() {
        let mut r = Recent::default();
        for _ in 0..MAX_SAMPLES + 5 {
            r.push(merge_sample(10));
        }
        assert_eq!(r.samples().len(), MAX_SAMPLES);
        r.push(merge_sample(MAX_BYTES - 200));
        assert!(r.bytes <= MAX_BYTES);
        assert!(r.samples().len() < MAX_SAMPLES);
        r.push(merge_sample(MAX_BYTES * 2));
        assert!(r.bytes <= MAX_BYTES, "a sample over the whole budget is not kept");
    }
}
