//! Reconnect delays: exponential backoff with full jitter.
//!
//! Full jitter (a uniform draw between zero and the exponential bound)
//! spreads out a fleet of devices that lost the same cloud at the same
//! moment, so they do not reconnect in lockstep.

use std::time::Duration;

use rand::Rng;

/// Backoff state for one destination.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// Delays start at `base` and never exceed `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self { base, cap, attempt: 0 }
    }

    /// The upper bound of the next delay.
    pub fn bound(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The next delay: uniform in [0, bound], then the bound doubles.
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let bound = self.bound();
        self.attempt = self.attempt.saturating_add(1);
        Duration::from_nanos(rng.random_range(0..=bound.as_nanos().min(u128::from(u64::MAX)) as u64))
    }

    /// A connection succeeded: start over.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let mut rng = rand::rng();
        let bounds: Vec<_> = (0..6)
            .map(|_| {
                let bound = b.bound();
                assert!(b.next_delay(&mut rng) <= bound);
                bound.as_millis()
            })
            .collect();
        assert_eq!(bounds, [100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.bound(), Duration::from_millis(100));
    }

    #[test]
    fn delays_are_spread_over_the_whole_range() {
        let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
        let mut rng = rand::rng();
        let delays: Vec<Duration> = (0..200).map(|_| b.clone().next_delay(&mut rng)).collect();
        assert!(delays.iter().any(|d| *d < Duration::from_millis(250)));
        assert!(delays.iter().any(|d| *d > Duration::from_millis(750)));
    }
}
