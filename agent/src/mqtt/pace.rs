//! Pacing: a destination never sends more publishes or bytes per second
//! than its limits allow, and never in bursts.
//!
//! The clouds count per connection and per second without saying how; the
//! strictest reading is a sliding window. Bursts are what break it: a
//! second's publishes sent back to back, and the next second's after them,
//! arrive in one window as soon as the network delays one burst and not the
//! other. So sends are spaced evenly (virtual scheduling, GCRA without burst
//! tolerance): each publish moves the earliest time of the next by
//! `1 / max_publish_rate`, and by its bytes over `max_byte_rate`. Any one
//! second then holds at most rate + 1 sends, and network jitter of up to
//! the margin below the cloud's figure (5 % of a second: 50 ms) still keeps
//! the cloud's count within its limit. Spacing alone would let one second
//! hold a second's bytes plus one large publish, so bytes are also held to
//! a sliding window: a publish waits until the bytes of the last
//! `BYTE_WINDOW` and its own fit `max_byte_rate`. The window is a second
//! plus `JITTER`: with large publishes (a 40 KB batch is 8 % of AWS's
//! 512 KiB/s) the 5 % margin is less than one publish, so network bunching
//! could otherwise bring one more into a cloud's second. A publish counts
//! from when it goes on the wire ([`Pacer::on_wire`]), not from when it was
//! queued: when the connection's task is held up, queued publishes go out
//! late, and a window counted from their queueing would let the next ones
//! follow too closely. The schedule outlives connections, so a reconnect
//! never bursts.
//!
//! Pure state; the forwarder passes the time in and sleeps until the time
//! it is given back.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// The window the clouds count over.
const WINDOW: Duration = Duration::from_secs(1);

/// How far network delays may bunch publishes together, which the byte
/// window absorbs.
const JITTER: Duration = Duration::from_millis(50);

/// The window bytes are held to here: any cloud second falls inside one,
/// however the network bunched its publishes by up to [`JITTER`].
const BYTE_WINDOW: Duration = WINDOW.saturating_add(JITTER);

/// The pacing state of one destination.
#[derive(Debug)]
pub struct Pacer {
    /// Time between publishes.
    per_publish: Option<Duration>,
    /// Bytes per second.
    bytes: Option<u64>,
    /// Earliest time of the next publish, by each limit.
    next_publish: Option<Instant>,
    next_bytes: Option<Instant>,
    /// Publishes within the last second and their bytes (with a byte limit).
    recent: VecDeque<(Instant, u64)>,
    recent_bytes: u64,
    /// How many of the newest entries of `recent` are queued, not yet on the wire.
    queued: usize,
    /// Time spent waiting on the limits, in total.
    waited: Duration,
}

impl Pacer {
    /// A pacer holding to `publishes` per second and `bytes` per second
    /// (`None`: that one is unlimited).
    pub fn new(publishes: Option<u32>, bytes: Option<u64>) -> Self {
        Self {
            per_publish: publishes.map(|p| Duration::from_secs(1) / p.max(1)),
            bytes: bytes.map(|b| b.max(1)),
            next_publish: None,
            next_bytes: None,
            recent: VecDeque::new(),
            recent_bytes: 0,
            queued: 0,
            waited: Duration::ZERO,
        }
    }

    /// When the next publish, of `bytes`, may go, if not now.
    pub fn ready_at(&mut self, now: Instant, bytes: u64) -> Option<Instant> {
        let mut at = self.next_publish.into_iter().chain(self.next_bytes).max().unwrap_or(now);
        if let Some(max) = self.bytes {
            self.expire(now);
            // The oldest publishes that must leave the window first; a
            // publish larger than a whole second goes alone.
            let mut left = self.recent_bytes;
            for &(t, b) in &self.recent {
                if left + bytes <= max {
                    break;
                }
                left -= b;
                at = at.max(t + BYTE_WINDOW);
            }
        }
        (at > now).then_some(at)
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(t, b)) = self.recent.front() {
            if now.duration_since(t) < BYTE_WINDOW {
                break;
            }
            self.recent.pop_front();
            self.recent_bytes -= b;
            self.queued = self.queued.min(self.recent.len());
        }
    }

    /// A publish of `bytes` went out at `now` (no earlier than [`Pacer::ready_at`]).
    pub fn sent(&mut self, now: Instant, bytes: u64) {
        if self.bytes.is_some() {
            self.expire(now);
            self.recent.push_back((now, bytes));
            self.recent_bytes += bytes;
            self.queued += 1;
        }
        if let Some(gap) = self.per_publish {
            self.next_publish = Some(self.next_publish.map_or(now, |t| t.max(now)) + gap);
        }
        if let Some(rate) = self.bytes {
            let gap = Duration::from_secs_f64(bytes as f64 / rate as f64);
            self.next_bytes = Some(self.next_bytes.map_or(now, |t| t.max(now)) + gap);
        }
    }

    /// The oldest queued publish went on the wire at `now` (publishes go out
    /// in queue order): it counts from then.
    pub fn on_wire(&mut self, now: Instant) {
        if self.queued == 0 {
            return;
        }
        let i = self.recent.len() - self.queued;
        self.recent[i].0 = self.recent[i].0.max(now);
        self.queued -= 1;
    }

    /// A new connection: what was queued on the old one never went out, and
    /// keeps the time it was queued at.
    pub fn new_link(&mut self) {
        self.queued = 0;
    }

    /// Records `d` spent waiting on the limits.
    pub fn waited(&mut self, d: Duration) {
        self.waited += d;
    }

    /// Time spent waiting on the limits since start.
    pub fn total_wait(&self) -> Duration {
        self.waited
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The most any one-second window of `sends` holds: (publishes, bytes).
    fn worst_window(sends: &[(Instant, u64)]) -> (usize, u64) {
        let mut worst = (0, 0);
        for (i, &(t, _)) in sends.iter().enumerate() {
            let inside: Vec<_> = sends[i..].iter().take_while(|(u, _)| u.duration_since(t) < WINDOW).collect();
            worst.0 = worst.0.max(inside.len());
            worst.1 = worst.1.max(inside.iter().map(|(_, b)| *b).sum());
        }
        worst
    }

    /// Sends `n` publishes of `bytes` as fast as the pacer lets them.
    fn drain(p: &mut Pacer, t0: Instant, n: usize, bytes: u64) -> Vec<(Instant, u64)> {
        let mut now = t0;
        let mut sends = Vec::new();
        for _ in 0..n {
            if let Some(at) = p.ready_at(now, bytes) {
                now = at;
            }
            assert_eq!(p.ready_at(now, bytes), None);
            p.sent(now, bytes);
            sends.push((now, bytes));
        }
        sends
    }

    #[test]
    fn publishes_are_spaced_evenly_so_no_second_holds_more_than_the_rate() {
        let t0 = Instant::now();
        let mut p = Pacer::new(Some(95), None);
        let sends = drain(&mut p, t0, 1000, 10);
        assert!(worst_window(&sends).0 <= 96, "{:?}", worst_window(&sends));
        let gaps: Vec<Duration> = sends.windows(2).map(|w| w[1].0 - w[0].0).collect();
        assert!(gaps.iter().all(|g| *g >= Duration::from_micros(10_500)), "no bursts");
        assert!(sends[999].0.duration_since(t0) < Duration::from_secs(11));
    }

    #[test]
    fn jitter_within_the_margin_keeps_any_second_within_the_clouds_limit() {
        // Paced at 95 % of 100/s, then each send delayed by 0 to 50 ms.
        let t0 = Instant::now();
        let mut p = Pacer::new(Some(95), None);
        let mut arrivals: Vec<(Instant, u64)> = drain(&mut p, t0, 2000, 1)
            .into_iter()
            .enumerate()
            .map(|(i, (t, b))| (t + Duration::from_millis(if i % 190 < 95 { 50 } else { 0 }), b))
            .collect();
        arrivals.sort();
        assert!(worst_window(&arrivals).0 <= 100, "{:?}", worst_window(&arrivals));
    }

    #[test]
    fn bunched_large_publishes_keep_any_second_within_the_clouds_byte_limit() {
        // AWS's 512 KiB/s in 20 KB batch publishes, each delayed by 0 to 50 ms.
        let (limit, publish) = (512 * 1024, 20_070);
        let t0 = Instant::now();
        let mut p = Pacer::new(None, Some(limit));
        let mut arrivals: Vec<(Instant, u64)> = drain(&mut p, t0, 1200, publish)
            .into_iter()
            .enumerate()
            .map(|(i, (t, b))| (t + Duration::from_millis(if i % 50 < 25 { 50 } else { 0 }), b))
            .collect();
        arrivals.sort();
        assert!(worst_window(&arrivals).1 <= limit, "{:?}", worst_window(&arrivals));
        // …at no less than 90 % of the cloud's rate.
        let secs = arrivals.last().unwrap().0.duration_since(t0).as_secs_f64();
        let rate = 1200.0 * publish as f64 / secs;
        assert!(rate >= 0.9 * limit as f64, "{rate:.0} B/s");
    }

    /// Paces `n` publishes of `bytes` through a task that is held up for
    /// `stall` after every `every`-th publish it queues, so queued publishes
    /// go on the wire late and together; tells the pacer when each goes
    /// (`counted`) or not. Returns the wire times.
    fn stalled(
        p: &mut Pacer,
        n: usize,
        bytes: u64,
        every: usize,
        stall: Duration,
        counted: bool,
    ) -> Vec<(Instant, u64)> {
        let mut now = Instant::now();
        let mut busy_until = now;
        let mut queued: VecDeque<Instant> = VecDeque::new();
        let mut wire = Vec::new();
        let mut last_wire = now;
        for i in 0..n {
            loop {
                // Whatever is queued goes out once the task is free again, in order.
                while let Some(&q) = queued.front() {
                    let at = q.max(busy_until).max(last_wire);
                    if at > now {
                        break;
                    }
                    queued.pop_front();
                    last_wire = at;
                    wire.push((at, bytes));
                    if counted {
                        p.on_wire(at);
                    }
                }
                let Some(at) = p.ready_at(now, bytes) else { break };
                let next_wire = queued.front().map(|&q| q.max(busy_until).max(last_wire));
                now = next_wire.map_or(at, |w| w.min(at)).max(now + Duration::from_micros(1));
            }
            p.sent(now, bytes);
            queued.push_back(now);
            if i % every == every - 1 {
                busy_until = now + stall;
            }
        }
        for q in queued {
            last_wire = q.max(busy_until).max(last_wire);
            wire.push((last_wire, bytes));
        }
        wire
    }

    #[test]
    fn publishes_the_task_sent_late_count_from_the_wire_so_no_cloud_second_overflows() {
        let (limit, publish) = (512 * 1024, 30_230);
        let paced = limit * 95 / 100;
        let stall = Duration::from_millis(120);
        let wire = stalled(&mut Pacer::new(None, Some(paced)), 400, publish, 7, stall, true);
        assert!(worst_window(&wire).1 <= limit, "{:?}", worst_window(&wire));
        // Counted from when they were queued, the same stalls overflow a second.
        let wire = stalled(&mut Pacer::new(None, Some(paced)), 400, publish, 7, stall, false);
        assert!(worst_window(&wire).1 > limit, "the test can fail: {:?}", worst_window(&wire));
    }

    #[test]
    fn bytes_are_spaced_by_their_size_and_an_unlimited_pacer_never_waits() {
        let t0 = Instant::now();
        let mut p = Pacer::new(None, Some(10_000));
        let mut sends = drain(&mut p, t0, 200, 900);
        let after = sends.last().unwrap().0;
        sends.extend(drain(&mut p, after, 20, 4_000));
        assert!(worst_window(&sends).1 <= 10_000, "small and large publishes alike: {:?}", worst_window(&sends));
        let mut q = Pacer::new(None, Some(10_000));
        assert_eq!(q.ready_at(t0, 50_000), None, "after idle the first publish goes at once, even a large one");
        q.sent(t0, 50_000);
        assert_eq!(q.ready_at(t0, 1), Some(t0 + Duration::from_secs(5)), "a large one waits its bytes out");
        let mut free = Pacer::new(None, None);
        assert_eq!(free.ready_at(t0, 1 << 40), None);
    }
}
