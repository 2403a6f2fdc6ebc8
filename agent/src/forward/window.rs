//! The forwarding window of one destination: which events are sent, which
//! are acknowledged, and how far the durable cursor may move.
//!
//! Pure state, no I/O. Sequence numbers enter in order as either sent (a
//! publish is queued) or settled (skipped: not routed here, dropped by a
//! filter, or dead-lettered). A destination-stage filter may turn one stored
//! event into several publishes: each is sent as a part, and the sequence
//! counts as delivered only once every part is acknowledged and the last
//! one was offered (by [`Window::sent`] or [`Window::settled`]).
//! rumqttc reports each queued publish's packet id in queue order and then
//! its PUBACK; the window maps one to the other. Everything at or below
//! [`Window::acked_through`] is delivered; the cursor is persisted from there.

use std::collections::{HashMap, VecDeque};

/// One publish (or settlement) above `acked_through`.
#[derive(Debug, Clone, Copy)]
struct Entry {
    sequence: u64,
    acked: bool,
    /// Acceptance time in ms, for lag.
    at_ms: u64,
    /// Whether this entry completes its sequence: once it and everything
    /// before it is acknowledged, the cursor may pass the sequence.
    closes: bool,
}

/// In-flight state of one destination.
#[derive(Debug)]
pub struct Window {
    /// Durable cursor: every sequence at or below was delivered, on disk.
    durable: u64,
    /// Every sequence at or below was delivered (perhaps not yet on disk).
    acked_through: u64,
    /// Entries above `acked_through`, in sequence order.
    pending: VecDeque<Entry>,
    /// Publishes queued in the client, awaiting their packet id, in order.
    queued: VecDeque<u64>,
    /// Packet id → sequence of publishes on the wire.
    on_wire: HashMap<u16, u64>,
    /// Sent sequences above `durable`: what a crash now would send again.
    undurable_sends: VecDeque<u64>,
    /// The next sequence to consider.
    next: u64,
    limit: usize,
}

impl Window {
    /// A window resuming after the durable `cursor`, letting at most `limit`
    /// sent events be without a durable acknowledgement.
    pub fn new(cursor: u64, limit: usize) -> Self {
        Self {
            durable: cursor,
            acked_through: cursor,
            pending: VecDeque::new(),
            queued: VecDeque::new(),
            on_wire: HashMap::new(),
            undurable_sends: VecDeque::new(),
            next: cursor + 1,
            limit: limit.max(1),
        }
    }

    /// The next sequence to read and offer.
    pub fn next(&self) -> u64 {
        self.next
    }

    /// Whether another event may be sent now.
    pub fn has_room(&self) -> bool {
        self.undurable_sends.len() < self.limit
    }

    /// Publishes awaiting PUBACK.
    pub fn in_flight(&self) -> usize {
        self.queued.len() + self.on_wire.len()
    }

    /// Every sequence at or below this was delivered.
    pub fn acked_through(&self) -> u64 {
        self.acked_through
    }

    /// The durable cursor.
    pub fn durable(&self) -> u64 {
        self.durable
    }

    /// `seq`, accepted at `at_ms`, was queued for publishing. Sequences
    /// must be offered in order.
    pub fn sent(&mut self, seq: u64, at_ms: u64) {
        self.push_send(seq, at_ms, true);
    }

    /// One publish standing for `seq`, with more to follow: the cursor stays
    /// before `seq` until [`Window::sent`] or [`Window::settled`] closes it.
    pub fn sent_part(&mut self, seq: u64, at_ms: u64) {
        self.push_send(seq, at_ms, false);
    }

    fn push_send(&mut self, seq: u64, at_ms: u64, closes: bool) {
        debug_assert!(seq >= self.next, "sequence {seq} offered out of order (next {})", self.next);
        self.next = if closes { seq + 1 } else { seq };
        self.pending.push_back(Entry { sequence: seq, acked: false, at_ms, closes });
        self.queued.push_back(seq);
        self.undurable_sends.push_back(seq);
    }

    /// Nothing (more) is sent for `seq` (not routed, dropped, dead-lettered,
    /// or its parts were all sent).
    pub fn settled(&mut self, seq: u64) {
        debug_assert!(seq >= self.next);
        self.next = seq + 1;
        self.pending.push_back(Entry { sequence: seq, acked: true, at_ms: 0, closes: true });
        self.advance();
    }

    /// Events up to `seq` do not exist (the log skips them): move past.
    pub fn skip_to(&mut self, seq: u64) {
        if seq >= self.next {
            self.next = seq + 1;
            if self.pending.is_empty() {
                self.acked_through = self.acked_through.max(seq);
            } else {
                self.pending.push_back(Entry { sequence: seq, acked: true, at_ms: 0, closes: true });
                self.advance();
            }
        }
    }

    /// The client put the oldest queued publish on the wire with `pkid`.
    pub fn on_wire(&mut self, pkid: u16) {
        if let Some(seq) = self.queued.pop_front() {
            self.on_wire.insert(pkid, seq);
        }
    }

    /// PUBACK for `pkid`. Returns false for an id we do not know.
    pub fn acked(&mut self, pkid: u16) -> bool {
        self.acked_at(pkid).is_some()
    }

    /// PUBACK for `pkid`: when the acknowledged event was accepted, in ms,
    /// or `None` for an id we do not know.
    pub fn acked_at(&mut self, pkid: u16) -> Option<u64> {
        let seq = self.on_wire.remove(&pkid)?;
        let mut at_ms = 0;
        // Parts of one sequence are acknowledged in any order: mark the first
        // unacknowledged send of it.
        if let Some(entry) = self.pending.iter_mut().find(|e| e.sequence == seq && !e.acked) {
            entry.acked = true;
            at_ms = entry.at_ms;
        }
        self.advance();
        Some(at_ms)
    }

    fn advance(&mut self) {
        while let Some(entry) = self.pending.front().filter(|e| e.acked) {
            if entry.closes {
                self.acked_through = entry.sequence;
            }
            self.pending.pop_front();
        }
    }

    /// The sequence of the publish on the wire with `pkid`, if there is one.
    pub fn sequence_of(&self, pkid: u16) -> Option<u64> {
        self.on_wire.get(&pkid).copied()
    }

    /// The oldest sent sequence not yet acknowledged.
    pub fn first_unacked(&self) -> Option<u64> {
        self.pending.iter().find(|e| !e.acked).map(|e| e.sequence)
    }

    /// When the oldest unacknowledged sent event was accepted, in ms.
    pub fn oldest_unacked_ms(&self) -> Option<u64> {
        self.pending.iter().find(|e| !e.acked).map(|e| e.at_ms)
    }

    /// The cursor to persist now, if it moved past the durable one.
    pub fn cursor_to_persist(&self) -> Option<u64> {
        (self.acked_through > self.durable).then_some(self.acked_through)
    }

    /// Acknowledged events not yet covered by the durable cursor.
    pub fn undurable_acks(&self) -> usize {
        self.undurable_sends.iter().take_while(|s| **s <= self.acked_through).count()
    }

    /// The cursor `seq` is now on disk.
    pub fn made_durable(&mut self, seq: u64) {
        self.durable = self.durable.max(seq);
        while self.undurable_sends.front().is_some_and(|s| *s <= self.durable) {
            self.undurable_sends.pop_front();
        }
    }

    /// The connection is gone: whatever was not acknowledged will be sent
    /// again, in order, from just after `acked_through`.
    pub fn reconnect(&mut self) {
        self.pending.clear();
        self.queued.clear();
        self.on_wire.clear();
        while self.undurable_sends.back().is_some_and(|s| *s > self.acked_through) {
            self.undurable_sends.pop_back();
        }
        self.next = self.acked_through + 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_in_order_advance_the_cursor_one_by_one() {
        let mut w = Window::new(10, 8);
        for seq in 11..=13 {
            w.sent(seq, 0);
        }
        for pkid in 1..=3 {
            w.on_wire(pkid);
        }
        assert!(w.acked(1));
        assert_eq!(w.acked_through(), 11);
        assert!(w.acked(2) && w.acked(3));
        assert_eq!(w.cursor_to_persist(), Some(13));
        assert_eq!(w.in_flight(), 0);
    }

    #[test]
    fn an_out_of_order_ack_waits_for_the_gap_before_it() {
        let mut w = Window::new(0, 8);
        w.sent(1, 0);
        w.sent(2, 0);
        w.on_wire(5);
        w.on_wire(6);
        assert!(w.acked(6));
        assert_eq!(w.acked_through(), 0, "2 is acked but 1 is not");
        assert!(w.acked(5));
        assert_eq!(w.acked_through(), 2);
    }

    #[test]
    fn settled_events_move_the_cursor_without_an_ack() {
        let mut w = Window::new(0, 8);
        w.settled(1);
        assert_eq!(w.acked_through(), 1);
        w.sent(2, 0);
        w.settled(3);
        assert_eq!(w.acked_through(), 1, "3 is behind an unacknowledged 2");
        w.on_wire(1);
        w.acked(1);
        assert_eq!(w.acked_through(), 3);
    }

    #[test]
    fn the_window_closes_at_the_limit_until_acks_are_durable() {
        let mut w = Window::new(0, 2);
        w.sent(1, 0);
        w.sent(2, 0);
        assert!(!w.has_room());
        w.on_wire(1);
        w.on_wire(2);
        w.acked(1);
        w.acked(2);
        assert!(!w.has_room(), "acked but not durable still counts: a crash would resend it");
        assert_eq!(w.undurable_acks(), 2);
        w.made_durable(2);
        assert!(w.has_room());
        assert_eq!(w.cursor_to_persist(), None);
    }

    #[test]
    fn a_reconnect_resends_everything_unacknowledged_in_order() {
        let mut w = Window::new(0, 8);
        for seq in 1..=4 {
            w.sent(seq, 0);
        }
        w.on_wire(1);
        w.on_wire(2);
        w.acked(1);
        w.reconnect();
        assert_eq!(w.next(), 2);
        assert_eq!(w.in_flight(), 0);
        assert!(!w.acked(2), "packet ids from the old connection mean nothing now");
        w.sent(2, 0);
        w.on_wire(1);
        w.acked(1);
        assert_eq!(w.acked_through(), 2);
    }

    #[test]
    fn a_gap_in_the_log_is_skipped() {
        let mut w = Window::new(0, 8);
        w.skip_to(5);
        assert_eq!((w.next(), w.acked_through()), (6, 5));
        w.sent(6, 0);
        w.skip_to(9);
        assert_eq!(w.acked_through(), 5);
        w.on_wire(1);
        w.acked(1);
        assert_eq!(w.acked_through(), 9);
    }

    #[test]
    fn a_sequence_with_several_parts_is_delivered_only_when_every_part_is_acked() {
        let mut w = Window::new(0, 8);
        w.sent_part(1, 0);
        w.sent_part(1, 0);
        w.sent(1, 0);
        w.sent(2, 0);
        for pkid in 1..=4 {
            w.on_wire(pkid);
        }
        assert!(w.acked(2) && w.acked(1));
        assert_eq!(w.acked_through(), 0, "the third part of 1 is not acknowledged");
        assert!(w.acked(4));
        assert_eq!(w.acked_through(), 0);
        assert!(w.acked(3));
        assert_eq!(w.acked_through(), 2);
    }

    #[test]
    fn acked_parts_hold_the_cursor_until_their_sequence_is_closed() {
        let mut w = Window::new(0, 2);
        w.sent_part(1, 0);
        w.sent_part(1, 0);
        assert!(!w.has_room(), "each part counts against the window");
        w.on_wire(1);
        w.on_wire(2);
        w.acked(1);
        w.acked(2);
        assert_eq!(w.acked_through(), 0, "1 may still have parts to send");
        assert_eq!(w.next(), 1);
        w.settled(1);
        assert_eq!((w.acked_through(), w.next()), (1, 2));
    }

    #[test]
    fn a_reconnect_mid_sequence_resends_all_of_its_parts() {
        let mut w = Window::new(0, 8);
        w.sent(1, 0);
        w.sent_part(2, 0);
        w.sent_part(2, 0);
        for pkid in 1..=3 {
            w.on_wire(pkid);
        }
        w.acked(1);
        w.acked(2);
        w.reconnect();
        assert_eq!((w.acked_through(), w.next()), (1, 2), "2 starts again from its first part");
    }
}
