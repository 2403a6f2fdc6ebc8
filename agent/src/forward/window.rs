//! The forwarding window of one destination: which events are read, sent
//! and acknowledged, and how far the durable cursor may move.
//!
//! Pure state, no I/O. Every event read from the store gets a slot
//! ([`Window::read`]); sequences the read skipped are not in the log and
//! count as done. A slot closes when nothing more will be published for it
//! (it was settled, or its last publish was offered), and is done once it
//! is closed and every publish carrying it is acknowledged. The cursor
//! ([`Window::acked_through`]) is the sequence below the first slot not
//! done: everything at or below it was delivered, whatever order publishes
//! were offered and acknowledged in. That order is free: a batch carries
//! several sequences (of one subject, not necessarily adjacent), and a
//! destination-stage filter may turn one sequence into several publishes.
//!
//! rumqttc reports each queued publish's packet id in queue order and then
//! its PUBACK; the window maps one to the other.

use std::collections::{BTreeMap, HashMap, VecDeque};

/// One read sequence above `acked_through`.
#[derive(Debug, Clone, Copy)]
struct Slot {
    /// Publishes carrying it that are not yet acknowledged.
    outstanding: u32,
    /// Whether every publish for it was offered (or it was settled).
    closed: bool,
    /// Acceptance time in ms, for lag.
    at_ms: u64,
}

impl Slot {
    fn done(&self) -> bool {
        self.closed && self.outstanding == 0
    }
}

/// A publish the window tracks: the sequences it carries.
type Publish = Vec<u64>;

/// In-flight state of one destination.
#[derive(Debug)]
pub struct Window {
    /// Durable cursor: every sequence at or below was delivered, on disk.
    durable: u64,
    /// Every sequence at or below was delivered (perhaps not yet on disk).
    acked_through: u64,
    /// Read sequences above `acked_through`.
    slots: BTreeMap<u64, Slot>,
    /// Publishes queued in the client, awaiting their packet id, in order.
    queued: VecDeque<Publish>,
    /// Packet id → publish on the wire.
    on_wire: HashMap<u16, Publish>,
    /// Sent sequences above `durable`, with how many publishes carried
    /// each: what a crash now would send again.
    undurable: BTreeMap<u64, u32>,
    undurable_count: usize,
    /// The next sequence to read.
    next: u64,
    /// The highest sequence any publish carried.
    last_offered: u64,
    limit: usize,
}

impl Window {
    /// A window resuming after the durable `cursor`, letting at most `limit`
    /// sent events (or parts) be without a durable acknowledgement.
    pub fn new(cursor: u64, limit: usize) -> Self {
        Self {
            durable: cursor,
            acked_through: cursor,
            slots: BTreeMap::new(),
            queued: VecDeque::new(),
            on_wire: HashMap::new(),
            undurable: BTreeMap::new(),
            undurable_count: 0,
            next: cursor + 1,
            last_offered: cursor,
            limit: limit.max(1),
        }
    }

    /// The highest sequence any publish carried (what a failure now may
    /// have lost is at or below it).
    pub fn last_offered(&self) -> u64 {
        self.last_offered
    }

    /// The next sequence to read.
    pub fn next(&self) -> u64 {
        self.next
    }

    /// Whether another event may be sent now.
    pub fn has_room(&self) -> bool {
        self.room() > 0
    }

    /// How many more events (or parts) may be sent now.
    pub fn room(&self) -> usize {
        self.limit.saturating_sub(self.undurable_count)
    }

    /// Publishes awaiting PUBACK.
    pub fn in_flight(&self) -> usize {
        self.queued.len() + self.on_wire.len()
    }

    /// Publishes awaiting PUBACK that carry no event (offered with no parts:
    /// a downlink companion's).
    pub fn in_flight_without_events(&self) -> usize {
        self.queued.iter().chain(self.on_wire.values()).filter(|p| p.is_empty()).count()
    }

    /// Every sequence at or below this was delivered.
    pub fn acked_through(&self) -> u64 {
        self.acked_through
    }

    /// The durable cursor.
    pub fn durable(&self) -> u64 {
        self.durable
    }

    /// Events `sequences` (ascending, each above every earlier read) were
    /// read, and nothing else exists up to `through` (the log holds no other
    /// sequence there): each gets an open slot.
    pub fn read(&mut self, sequences: impl IntoIterator<Item = (u64, u64)>, through: u64) {
        for (seq, at_ms) in sequences {
            debug_assert!(seq >= self.next, "sequence {seq} read twice (next {})", self.next);
            self.slots.insert(seq, Slot { outstanding: 0, closed: false, at_ms });
        }
        self.next = self.next.max(through + 1);
        self.advance();
    }

    /// Nothing exists up to `seq`: move past it.
    pub fn skip_to(&mut self, seq: u64) {
        self.read(std::iter::empty(), seq);
    }

    /// A publish carrying `parts` was queued: each is a read sequence and
    /// whether this publish is its last. Returns nothing; the packet id
    /// arrives with [`Window::on_wire`].
    pub fn offer(&mut self, parts: &[(u64, bool)]) {
        let mut publish = Vec::with_capacity(parts.len());
        for &(seq, last) in parts {
            let slot = self.slots.get_mut(&seq).expect("a sequence is read before it is offered");
            slot.outstanding += 1;
            slot.closed |= last;
            *self.undurable.entry(seq).or_default() += 1;
            self.undurable_count += 1;
            self.last_offered = self.last_offered.max(seq);
            publish.push(seq);
        }
        self.queued.push_back(publish);
    }

    /// Nothing (more) is sent for `seq` (not routed, dropped, dead-lettered).
    pub fn settle(&mut self, seq: u64) {
        if let Some(slot) = self.slots.get_mut(&seq) {
            slot.closed = true;
        }
        self.advance();
    }

    /// The client put the oldest queued publish on the wire with `pkid`.
    pub fn on_wire(&mut self, pkid: u16) {
        if let Some(publish) = self.queued.pop_front() {
            self.on_wire.insert(pkid, publish);
        }
    }

    /// The sequences of the publish on the wire with `pkid`, if there is one.
    pub fn sequences_of(&self, pkid: u16) -> Option<&[u64]> {
        self.on_wire.get(&pkid).map(Vec::as_slice)
    }

    /// PUBACK for `pkid`. Returns false for an id we do not know.
    pub fn acked(&mut self, pkid: u16) -> bool {
        self.acked_at(pkid).is_some()
    }

    /// PUBACK for `pkid`: how many events it carried and when the oldest
    /// was accepted, in ms, or `None` for an id we do not know.
    pub fn acked_at(&mut self, pkid: u16) -> Option<(usize, u64)> {
        let publish = self.on_wire.remove(&pkid)?;
        let events = publish.len();
        let mut at_ms = u64::MAX;
        for seq in publish {
            if let Some(slot) = self.slots.get_mut(&seq) {
                slot.outstanding = slot.outstanding.saturating_sub(1);
                at_ms = at_ms.min(slot.at_ms);
            }
        }
        self.advance();
        Some((events, if at_ms == u64::MAX { 0 } else { at_ms }))
    }

    fn advance(&mut self) {
        let first_open = self.slots.iter().find(|(_, s)| !s.done()).map(|(seq, _)| *seq);
        let through = first_open.map_or(self.next - 1, |s| s - 1);
        if through > self.acked_through {
            self.acked_through = through;
        }
        let keep = self.slots.split_off(&(self.acked_through + 1));
        self.slots = keep;
    }

    /// The oldest sequence sent and not yet acknowledged.
    pub fn first_unacked(&self) -> Option<u64> {
        self.slots.iter().find(|(_, s)| s.outstanding > 0).map(|(seq, _)| *seq)
    }

    /// When the oldest read event not yet delivered was accepted, in ms.
    pub fn oldest_unacked_ms(&self) -> Option<u64> {
        self.slots.values().find(|s| s.outstanding > 0).map(|s| s.at_ms)
    }

    /// The cursor to persist now, if it moved past the durable one.
    pub fn cursor_to_persist(&self) -> Option<u64> {
        (self.acked_through > self.durable).then_some(self.acked_through)
    }

    /// Acknowledged events (or parts) not yet covered by the durable cursor.
    pub fn undurable_acks(&self) -> usize {
        self.undurable.range(..=self.acked_through).map(|(_, n)| *n as usize).sum()
    }

    /// The cursor `seq` is now on disk.
    pub fn made_durable(&mut self, seq: u64) {
        self.durable = self.durable.max(seq);
        let rest = self.undurable.split_off(&(self.durable + 1));
        let freed: u32 = self.undurable.values().sum();
        self.undurable_count -= freed as usize;
        self.undurable = rest;
    }

    /// The connection is gone: whatever was not acknowledged will be read
    /// and sent again, from just after `acked_through`.
    pub fn reconnect(&mut self) {
        self.slots.clear();
        self.queued.clear();
        self.on_wire.clear();
        let resent = self.undurable.split_off(&(self.acked_through + 1));
        self.undurable_count -= resent.values().sum::<u32>() as usize;
        self.next = self.acked_through + 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads `seqs` (accepted at time 0) as one contiguous read.
    fn read(w: &mut Window, seqs: std::ops::RangeInclusive<u64>) {
        let through = *seqs.end();
        w.read(seqs.map(|s| (s, 0)), through);
    }

    fn sent(w: &mut Window, seq: u64) {
        w.offer(&[(seq, true)]);
    }

    #[test]
    fn acks_in_order_advance_the_cursor_one_by_one() {
        let mut w = Window::new(10, 8);
        read(&mut w, 11..=13);
        for seq in 11..=13 {
            sent(&mut w, seq);
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
    fn a_publish_without_events_takes_its_packet_id_and_never_moves_the_cursor() {
        let mut w = Window::new(0, 8);
        read(&mut w, 1..=2);
        sent(&mut w, 1);
        w.offer(&[]);
        sent(&mut w, 2);
        assert_eq!((w.in_flight(), w.in_flight_without_events()), (3, 1));
        for pkid in 1..=3 {
            w.on_wire(pkid);
        }
        assert_eq!(w.sequences_of(2), Some(&[][..]), "packet 2 is the publish without events");
        assert_eq!(w.acked_at(2), Some((0, 0)));
        assert_eq!(w.acked_through(), 0);
        assert!(w.acked(1) && w.acked(3));
        assert_eq!(w.acked_through(), 2);
        assert_eq!((w.in_flight(), w.in_flight_without_events()), (0, 0));
    }

    #[test]
    fn an_out_of_order_ack_waits_for_the_gap_before_it() {
        let mut w = Window::new(0, 8);
        read(&mut w, 1..=2);
        sent(&mut w, 1);
        sent(&mut w, 2);
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
        read(&mut w, 1..=3);
        w.settle(1);
        assert_eq!(w.acked_through(), 1);
        sent(&mut w, 2);
        w.settle(3);
        assert_eq!(w.acked_through(), 1, "3 is behind an unacknowledged 2");
        w.on_wire(1);
        w.acked(1);
        assert_eq!(w.acked_through(), 3);
    }

    #[test]
    fn a_read_but_unsent_event_holds_the_cursor() {
        let mut w = Window::new(0, 8);
        read(&mut w, 1..=3);
        sent(&mut w, 1);
        sent(&mut w, 3);
        w.on_wire(1);
        w.on_wire(2);
        w.acked(1);
        w.acked(2);
        assert_eq!(w.acked_through(), 1, "2 was read but not yet sent");
        sent(&mut w, 2);
        w.on_wire(3);
        w.acked(3);
        assert_eq!(w.acked_through(), 3);
    }

    #[test]
    fn a_batch_acknowledges_every_event_it_carries_and_only_when_acked() {
        let mut w = Window::new(0, 8);
        read(&mut w, 1..=5);
        // Subject a: 1, 3, 5; subject b: 2, 4.
        w.offer(&[(1, true), (3, true), (5, true)]);
        w.offer(&[(2, true), (4, true)]);
        assert_eq!((w.in_flight(), w.room()), (2, 3));
        w.on_wire(7);
        w.on_wire(8);
        assert_eq!(w.sequences_of(7), Some(&[1, 3, 5][..]));
        assert!(w.acked(8));
        assert_eq!(w.acked_through(), 0, "1 is in the batch not yet acknowledged");
        assert_eq!(w.first_unacked(), Some(1));
        assert!(w.acked(7));
        assert_eq!(w.acked_through(), 5);
        assert_eq!(w.undurable_acks(), 5);
    }

    #[test]
    fn the_window_closes_at_the_limit_until_acks_are_durable() {
        let mut w = Window::new(0, 2);
        read(&mut w, 1..=2);
        sent(&mut w, 1);
        sent(&mut w, 2);
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
        read(&mut w, 1..=4);
        for seq in 1..=4 {
            sent(&mut w, seq);
        }
        w.on_wire(1);
        w.on_wire(2);
        w.acked(1);
        w.reconnect();
        assert_eq!(w.next(), 2);
        assert_eq!(w.in_flight(), 0);
        assert_eq!(w.room(), 7, "only the acknowledged 1 still waits to be durable");
        assert!(!w.acked(2), "packet ids from the old connection mean nothing now");
        read(&mut w, 2..=2);
        sent(&mut w, 2);
        w.on_wire(1);
        w.acked(1);
        assert_eq!(w.acked_through(), 2);
    }

    #[test]
    fn a_gap_in_the_log_is_skipped() {
        let mut w = Window::new(0, 8);
        w.skip_to(5);
        assert_eq!((w.next(), w.acked_through()), (6, 5));
        w.read([(6, 0)], 6);
        sent(&mut w, 6);
        w.skip_to(9);
        assert_eq!(w.acked_through(), 5);
        w.on_wire(1);
        w.acked(1);
        assert_eq!(w.acked_through(), 9);
        // A read with holes: 10 and 12 exist, 11 does not.
        w.read([(10, 0), (12, 0)], 12);
        w.settle(10);
        w.settle(12);
        assert_eq!(w.acked_through(), 12);
    }

    #[test]
    fn a_sequence_with_several_parts_is_delivered_only_when_every_part_is_acked() {
        let mut w = Window::new(0, 8);
        read(&mut w, 1..=2);
        w.offer(&[(1, false)]);
        w.offer(&[(1, false)]);
        w.offer(&[(1, true)]);
        sent(&mut w, 2);
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
        read(&mut w, 1..=1);
        w.offer(&[(1, false)]);
        w.offer(&[(1, false)]);
        assert!(!w.has_room(), "each part counts against the window");
        w.on_wire(1);
        w.on_wire(2);
        w.acked(1);
        w.acked(2);
        assert_eq!(w.acked_through(), 0, "1 may still have parts to send");
        w.settle(1);
        assert_eq!((w.acked_through(), w.next()), (1, 2));
    }

    #[test]
    fn a_reconnect_mid_sequence_resends_all_of_its_parts() {
        let mut w = Window::new(0, 8);
        read(&mut w, 1..=2);
        sent(&mut w, 1);
        w.offer(&[(2, false)]);
        w.offer(&[(2, false)]);
        for pkid in 1..=3 {
            w.on_wire(pkid);
        }
        w.acked(1);
        w.acked(2);
        w.reconnect();
        assert_eq!((w.acked_through(), w.next()), (1, 2), "2 starts again from its first part");
    }
}
