//! A bounded sample of a plugin's recent successful calls and what it
//! answered, so a candidate version can be run in shadow beside it on real
//! inputs (see the fleet updater) without touching live traffic.
//!
//! Sampling is cheap by construction: the plugin thread owns each call's
//! inputs, so a sample moves them instead of copying, and at most one call
//! per [`SAMPLE_INTERVAL`] is kept, within [`MAX_SAMPLES`] and [`MAX_BYTES`].
//! A sample's size counts everything it holds, inputs and answers alike, so
//! [`MAX_BYTES`] is what the ring really holds at most. A plugin with no
//! fleet to update it keeps no ring at all (see [`super::Sampling`]).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::convert::{Decision, wit_bytes};
use super::{Versioned, WitEvent};

/// At most one call sampled per interval.
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(20);

/// Most samples kept.
pub const MAX_SAMPLES: usize = 64;

/// Most bytes kept across samples: inputs, answers and their records (a
/// part of the memory budget).
pub const MAX_BYTES: usize = crate::config::budget::PLUGIN_SAMPLES_BYTES;

/// One sampled call.
#[derive(Debug, Clone)]
pub enum Sample {
    /// A filter batch and its decisions.
    Filter(Arc<Vec<WitEvent>>, Vec<Decision>),
    /// A merge call (key, current, incoming) and its result.
    Merge(String, Option<Versioned>, Versioned, Result<Vec<u8>, String>),
}

impl Sample {
    /// Bytes it holds in memory: every input and every answer, with the
    /// records that hold them.
    pub fn bytes(&self) -> usize {
        match self {
            Sample::Filter(events, decisions) => {
                events.iter().map(wit_bytes).sum::<usize>()
                    + decisions.iter().map(|d| size_of::<Decision>() + d.bytes()).sum::<usize>()
            }
            Sample::Merge(key, current, incoming, merged) => {
                let versioned = |v: &Versioned| {
                    size_of::<Versioned>()
                        + v.data.len()
                        + v.origin.len()
                        + v.version.iter().map(|(o, _)| o.len() + size_of::<(String, u64)>()).sum::<usize>()
                };
                key.len()
                    + current.as_ref().map_or(0, versioned)
                    + versioned(incoming)
                    + merged.as_ref().map_or_else(String::len, Vec::len)
            }
        }
    }

    /// The incoming version of a merge sample (tests).
    #[cfg(test)]
    fn incoming(&self) -> &Versioned {
        match self {
            Sample::Merge(_, _, incoming, _) => incoming,
            Sample::Filter(..) => panic!("not a merge sample"),
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

    fn event(data: usize) -> WitEvent {
        WitEvent {
            id: "1".into(),
            source: "s".into(),
            type_: "t".into(),
            subject: "a".into(),
            time: "2026-01-01T00:00:00Z".into(),
            datacontenttype: None,
            data: vec![0; data],
            sequence: 0,
            hlc: 0,
            partitionkey: None,
            extensions: Vec::new(),
        }
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

    #[test]
    fn a_sample_counts_the_answers_it_holds_not_only_the_inputs() {
        // A small input with a large replacement: the answer is what is big.
        let big = crate::plugin::convert::from_wit(event(300 << 10)).unwrap();
        let sample = Sample::Filter(Arc::new(vec![event(10)]), vec![Decision::Replace(vec![big])]);
        assert!(sample.bytes() > 300 << 10, "{}", sample.bytes());
        let mut r = Recent::default();
        for _ in 0..MAX_SAMPLES {
            r.push(sample.clone());
        }
        let held: usize = r.samples().iter().map(Sample::bytes).sum();
        assert!(held <= MAX_BYTES, "the ring holds {held} bytes");
        assert_eq!(r.samples().len(), 3, "three 300 KiB answers fit in 1 MiB");
        let merged = Sample::Merge("k".into(), None, merge_sample(0).incoming().clone(), Ok(vec![0; 1 << 19]));
        assert!(merged.bytes() >= 1 << 19, "a merge's result counts too");
    }
}
