//! Time: the injectable wall clock and the hybrid logical clock (HLC).
//!
//! This is the only module that reads the system time; everything else asks a
//! [`Clock`], so tests can drive time (including backwards jumps). The HLC
//! orders events across restarts and devices even when the wall clock jumps.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// A source of wall-clock time.
pub trait Clock: Send + Sync + 'static {
    /// Nanoseconds since the Unix epoch (negative before 1970).
    fn now_nanos(&self) -> i64;

    /// Milliseconds since the Unix epoch, never negative.
    fn now_millis(&self) -> u64 {
        u64::try_from(self.now_nanos() / 1_000_000).unwrap_or(0)
    }
}

/// A shared clock handle.
pub type SharedClock = Arc<dyn Clock>;

/// The operating system's real-time clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[allow(clippy::disallowed_methods)] // the one permitted reader of system time
    fn now_nanos(&self) -> i64 {
        match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_nanos()).unwrap_or(i64::MAX),
        }
    }
}

/// A clock that tests set by hand.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    /// A clock reading `nanos` since the epoch.
    pub fn new(nanos: i64) -> Self {
        Self(AtomicI64::new(nanos))
    }

    /// Sets the reading (it may go backwards, as real clocks do).
    pub fn set_nanos(&self, nanos: i64) {
        self.0.store(nanos, Ordering::SeqCst);
    }

    /// Moves the reading by `delta` nanoseconds.
    pub fn advance_nanos(&self, delta: i64) {
        self.0.fetch_add(delta, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_nanos(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// `ms` since the epoch as an RFC 3339 UTC time, to the millisecond.
pub fn utc(ms: u64) -> String {
    let Ok(t) = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000) else {
        return format!("{ms} ms");
    };
    let f = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    t.format(&f).unwrap_or_else(|_| format!("{ms} ms"))
}

/// An RFC 3339 time as ms since the epoch (`None`: not one, or before 1970).
pub fn parse_utc(text: &str) -> Option<u64> {
    use time::format_description::well_known::Rfc3339;
    let t = time::OffsetDateTime::parse(text, &Rfc3339).ok()?;
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

/// A fresh UUIDv7 event id stamped from `clock`.
///
/// UUIDv7 sorts by creation time; the per-thread context adds a counter so
/// ids made in the same millisecond stay ordered and unique.
pub fn new_event_id(clock: &dyn Clock) -> String {
    new_v7(clock).to_string()
}

/// A new UUIDv7 at `clock`'s time, ordered and unique as for [`new_event_id`].
pub fn new_v7(clock: &dyn Clock) -> uuid::Uuid {
    thread_local! {
        static CONTEXT: uuid::ContextV7 = const { uuid::ContextV7::new() };
    }
    let nanos = clock.now_nanos().max(0);
    let (secs, subsec) = ((nanos / 1_000_000_000) as u64, (nanos % 1_000_000_000) as u32);
    CONTEXT.with(|ctx| uuid::Uuid::new_v7(uuid::Timestamp::from_unix(ctx, secs, subsec)))
}

/// Bits of an [`Hlc`] that hold the logical counter.
const LOGICAL_BITS: u32 = 16;

/// A hybrid logical clock timestamp: wall-clock milliseconds in the high 48
/// bits and a logical counter in the low 16, so plain `u64` order is HLC
/// order and the value fits in one integer on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Hlc(pub u64);

impl Hlc {
    /// The HLC for a wall-clock reading with a zero counter.
    pub fn from_millis(ms: u64) -> Self {
        Self(ms << LOGICAL_BITS)
    }

    /// The wall-clock part, in milliseconds since the epoch.
    pub fn millis(self) -> u64 {
        self.0 >> LOGICAL_BITS
    }

    /// The logical counter.
    pub fn logical(self) -> u16 {
        (self.0 & ((1 << LOGICAL_BITS) - 1)) as u16
    }
}

impl std::fmt::Display for Hlc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// HLC state: the highest timestamp issued or observed.
///
/// Pure state; the store persists [`HlcState::high_water`] in the same
/// transaction as the events stamped with it, so after a restart the clock
/// resumes above anything ever made durable even if the wall clock went back.
#[derive(Debug, Clone)]
pub struct HlcState {
    last: Hlc,
}

impl HlcState {
    /// Resumes from a persisted high-water mark.
    pub fn resume(high_water: Hlc) -> Self {
        Self { last: high_water }
    }

    /// A timestamp for a local event: above every earlier one, and equal to
    /// the wall clock when the wall clock is ahead.
    pub fn tick(&mut self, wall_ms: u64) -> Hlc {
        let physical = Hlc::from_millis(wall_ms);
        // A counter overflow carries into the millisecond part: still monotonic.
        self.last = Hlc(physical.0.max(self.last.0 + 1));
        self.last
    }

    /// A timestamp for receiving `remote`: above both it and everything local.
    pub fn observe(&mut self, remote: Hlc, wall_ms: u64) -> Hlc {
        let physical = Hlc::from_millis(wall_ms);
        self.last = Hlc(physical.0.max(self.last.0.max(remote.0) + 1));
        self.last
    }

    /// The highest timestamp issued or observed.
    pub fn high_water(&self) -> Hlc {
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hlc_follows_the_wall_clock_when_it_moves_forward() {
        let mut hlc = HlcState::resume(Hlc::default());
        assert_eq!(hlc.tick(1_000), Hlc::from_millis(1_000));
        assert_eq!(hlc.tick(2_000), Hlc::from_millis(2_000));
    }

    #[test]
    fn hlc_never_goes_backwards_when_the_wall_clock_does() {
        let mut hlc = HlcState::resume(Hlc::default());
        let a = hlc.tick(10_000);
        let b = hlc.tick(5_000); // clock stepped back 5 s
        let c = hlc.tick(5_000);
        assert!(a < b && b < c);
        assert_eq!(b.millis(), 10_000);
        assert_eq!(c.logical(), 2);
    }

    #[test]
    fn hlc_resumed_from_a_high_water_mark_stays_above_it_after_a_clock_jump_back() {
        let mut before = HlcState::resume(Hlc::default());
        let mut issued = Hlc::default();
        for ms in [10_000_000, 10_000_000, 10_000_001] {
            issued = before.tick(ms);
        }
        // Restart with a wall clock an hour behind.
        let mut after = HlcState::resume(before.high_water());
        let next = after.tick(10_000_001 - 3_600_000);
        assert!(next > issued);
    }

    #[test]
    fn hlc_observing_a_remote_timestamp_moves_past_it() {
        let mut hlc = HlcState::resume(Hlc::default());
        let remote = Hlc::from_millis(50_000);
        let seen = hlc.observe(remote, 1_000);
        assert!(seen > remote);
        assert!(hlc.tick(1_000) > seen);
    }

    #[test]
    fn logical_counter_overflow_carries_into_milliseconds_and_stays_monotonic() {
        let mut hlc = HlcState::resume(Hlc(Hlc::from_millis(7).0 | 0xFFFF));
        let next = hlc.tick(7);
        assert_eq!(next, Hlc::from_millis(8));
    }

    #[test]
    fn manual_clock_can_step_backwards() {
        let clock = ManualClock::new(5_000_000_000);
        clock.advance_nanos(-1_000_000_000);
        assert_eq!(clock.now_millis(), 4_000);
    }
}
