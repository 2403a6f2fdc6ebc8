//! The circuit breaker that stops calling a plugin that keeps failing.
//!
//! Pure state: the caller passes the time in, so tests drive it without
//! sleeping. It owns no plugin and no clock.
//!
//! Parameters ([`BreakerConfig`], defaults in [`BreakerConfig::default`]):
//! after `failures_to_open` consecutive failed calls the circuit opens for
//! `open_for`; while open, calls are not made and their events follow the
//! plugin's `on_error` policy at once. When `open_for` has passed, one call
//! is let through (half-open): success closes the circuit, failure opens it
//! again for twice as long, up to `max_open_for`.

use std::time::Duration;

use serde::Serialize;

/// Tuning of a [`Breaker`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the circuit.
    pub failures_to_open: u32,
    /// How long the circuit first stays open.
    pub open_for: Duration,
    /// Longest the circuit stays open after repeated half-open failures.
    pub max_open_for: Duration,
}

impl Default for BreakerConfig {
    /// 5 consecutive failures open it for 10 s, doubling to at most 5 min.
    fn default() -> Self {
        Self { failures_to_open: 5, open_for: Duration::from_secs(10), max_open_for: Duration::from_secs(300) }
    }
}

/// The circuit's state, as shown in status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CircuitState {
    /// Calls go through.
    Closed,
    /// Calls are refused until the stored time.
    Open,
    /// One trial call may go through.
    HalfOpen,
}

/// Consecutive-failure circuit breaker. Times are milliseconds on any
/// monotonic scale the caller chooses.
#[derive(Debug, Clone)]
pub struct Breaker {
    config: BreakerConfig,
    consecutive_failures: u32,
    open_until_ms: Option<u64>,
    current_open_for: Duration,
    /// Times the circuit has opened.
    pub opened: u64,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Self {
        Self { config, consecutive_failures: 0, open_until_ms: None, current_open_for: config.open_for, opened: 0 }
    }

    /// The state at `now_ms`.
    pub fn state(&self, now_ms: u64) -> CircuitState {
        match self.open_until_ms {
            None => CircuitState::Closed,
            Some(until) if now_ms < until => CircuitState::Open,
            Some(_) => CircuitState::HalfOpen,
        }
    }

    /// Whether a call may be made at `now_ms`.
    pub fn allows(&self, now_ms: u64) -> bool {
        self.state(now_ms) != CircuitState::Open
    }

    /// Records a successful call: the circuit closes.
    pub fn success(&mut self) {
        self.consecutive_failures = 0;
        self.open_until_ms = None;
        self.current_open_for = self.config.open_for;
    }

    /// Records a failed call at `now_ms`; returns true if the circuit opened.
    pub fn failure(&mut self, now_ms: u64) -> bool {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        let half_open = self.open_until_ms.is_some();
        if half_open {
            self.current_open_for = (self.current_open_for * 2).min(self.config.max_open_for);
        } else if self.consecutive_failures < self.config.failures_to_open {
            return false;
        }
        let ms = u64::try_from(self.current_open_for.as_millis()).unwrap_or(u64::MAX);
        self.open_until_ms = Some(now_ms.saturating_add(ms));
        self.opened += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(BreakerConfig {
            failures_to_open: 3,
            open_for: Duration::from_millis(100),
            max_open_for: Duration::from_millis(250),
        })
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let mut b = breaker();
        assert!(!b.failure(0));
        assert!(!b.failure(0));
        b.success();
        assert!(!b.failure(0));
        assert!(!b.failure(0));
        assert_eq!(b.state(0), CircuitState::Closed);
        assert!(b.failure(10));
        assert_eq!(b.state(50), CircuitState::Open);
        assert!(!b.allows(109));
    }

    #[test]
    fn half_open_trial_closes_on_success_and_backs_off_on_failure() {
        let mut b = breaker();
        for _ in 0..3 {
            b.failure(0);
        }
        assert_eq!(b.state(100), CircuitState::HalfOpen);
        assert!(b.allows(100));
        assert!(b.failure(100), "a failed trial reopens");
        assert_eq!(b.state(299), CircuitState::Open, "open twice as long");
        assert_eq!(b.state(300), CircuitState::HalfOpen);
        b.failure(300);
        assert_eq!(b.state(549), CircuitState::Open, "capped at max_open_for");
        assert_eq!(b.state(550), CircuitState::HalfOpen);
        b.success();
        assert_eq!(b.state(550), CircuitState::Closed);
        assert_eq!(b.opened, 3);
    }
}
