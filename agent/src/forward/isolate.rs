//! Finding the one event a broker keeps refusing, so that it costs that
//! event and never the destination.
//!
//! A broker refuses some publishes by closing the connection (Mosquitto on
//! malformed UTF-8 or an oversized packet), which names no message. After a
//! link failure the forwarder therefore resends what was in flight one
//! publish at a time: when the broker then ends the connection with a single
//! publish outstanding, or stops acknowledging it while still answering
//! pings (RabbitMQ over its `max_message_size`), that publish is to blame.
//! The same event blamed [`STRIKES`] times in a row is set aside
//! (dead-lettered for this destination) and the forwarder goes on. Failures
//! Ferry caused itself (its ack watchdog on a silent link, a consumer error)
//! blame nothing.
//!
//! Pure state, no I/O; the forwarder feeds it what happened.

/// Times in a row the broker must drop the connection with the same lone
/// publish outstanding before that event is set aside.
pub const STRIKES: u32 = 3;

/// Isolation state of one destination, kept across connections.
#[derive(Debug, Default)]
pub struct Isolation {
    /// Sequences up to here were in flight when the link last failed; they
    /// are sent again one at a time.
    careful_until: u64,
    /// The event last blamed, and how many times in a row.
    suspect: Option<(u64, u32)>,
    /// The event to set aside when it comes up, and why.
    condemned: Option<(u64, String)>,
}

impl Isolation {
    /// Whether the publish of sequence `next` may go out with `in_flight`
    /// publishes outstanding.
    pub fn may_send(&self, next: u64, in_flight: usize) -> bool {
        next > self.careful_until || in_flight == 0
    }

    /// Whether publishes are being sent one at a time.
    pub fn careful(&self, next: u64) -> bool {
        next <= self.careful_until
    }

    /// The link failed. `lone` is the one sequence awaiting its ack, if
    /// exactly one was; `broker_ended` says the broker closed or broke the
    /// connection (not a timeout or a consumer of ours); `last_sent` is the
    /// highest sequence offered; `error` says what happened.
    pub fn link_failed(&mut self, lone: Option<u64>, broker_ended: bool, last_sent: u64, error: &str) {
        if broker_ended && let Some(seq) = lone {
            let strikes = match self.suspect {
                Some((s, n)) if s == seq => n + 1,
                _ => 1,
            };
            if strikes >= STRIKES {
                self.suspect = None;
                self.condemned = Some((
                    seq,
                    format!(
                        "the broker dropped the connection or went silent on it {strikes} times in a row with \
                         only this publish outstanding (last: {error})"
                    ),
                ));
            } else {
                self.suspect = Some((seq, strikes));
            }
        }
        self.careful_until = self.careful_until.max(last_sent);
    }

    /// The event to set aside instead of sending, and why.
    pub fn condemned(&self) -> Option<(u64, &str)> {
        self.condemned.as_ref().map(|(s, r)| (*s, r.as_str()))
    }

    /// The condemned event was set aside.
    pub fn set_aside(&mut self) {
        self.condemned = None;
    }

    /// Every sequence up to `seq` was delivered or settled: none of them is
    /// suspect any more.
    pub fn delivered_through(&mut self, seq: u64) {
        if self.suspect.is_some_and(|(s, _)| s <= seq) {
            self.suspect = None;
        }
        // Gone from the log before it came up again (expired, evicted).
        if self.condemned.as_ref().is_some_and(|(s, _)| *s <= seq) {
            self.condemned = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_a_failure_what_was_in_flight_is_resent_one_at_a_time() {
        let mut i = Isolation::default();
        assert!(i.may_send(1, 5), "no failure yet: the window is open");
        i.link_failed(None, true, 40, "reset");
        assert!(i.careful(30) && !i.may_send(30, 1) && i.may_send(30, 0));
        assert!(i.may_send(41, 3), "past what was in flight, the window opens again");
    }

    #[test]
    fn the_same_lone_publish_blamed_three_times_in_a_row_is_condemned() {
        let mut i = Isolation::default();
        i.link_failed(Some(7), true, 7, "reset");
        i.link_failed(Some(7), true, 7, "reset");
        assert_eq!(i.condemned(), None);
        i.link_failed(Some(7), true, 7, "connection reset by peer");
        let (seq, why) = i.condemned().unwrap();
        assert_eq!(seq, 7);
        assert!(why.contains("3 times") && why.contains("connection reset by peer"), "{why}");
        i.set_aside();
        assert_eq!(i.condemned(), None);
    }

    #[test]
    fn failures_ferry_caused_or_with_several_outstanding_blame_nothing_and_a_delivery_clears_the_count() {
        let mut i = Isolation::default();
        i.link_failed(Some(7), true, 7, "reset");
        i.link_failed(Some(7), false, 7, "no PUBACK: our watchdog");
        i.link_failed(None, true, 9, "reset with several outstanding");
        i.link_failed(Some(7), true, 9, "reset");
        assert_eq!(i.condemned(), None, "only two strikes: the others blame nothing");
        i.delivered_through(7);
        i.link_failed(Some(7), true, 9, "reset");
        assert_eq!(i.condemned(), None, "a delivery in between starts the count again");
        i.link_failed(Some(8), true, 9, "reset");
        i.link_failed(Some(7), true, 9, "reset");
        assert_eq!(i.condemned(), None, "another event in between breaks the run");
    }
}
