//! The dead letters: events set aside (per destination, or unreadable),
//! replayed into the log, or purged; kept within their share of the quota.

use super::*;

impl Writer {
    /// Moves the record at `sequence`, which no longer decodes, out of the
    /// log into the dead letters as it is, with its index entries. Its
    /// header may be unreadable too, so the indexes are searched for it.
    pub(super) fn set_aside_unreadable(
        &mut self,
        t: &mut Tables<'_>,
        sequence: u64,
        reason: &str,
        now_ms: u64,
    ) -> Result<(), redb::Error> {
        let Some(record) = t.log.remove(sequence)?.map(|r| r.value().to_vec()) else { return Ok(()) };
        self.meta.log_bytes = self.meta.log_bytes.saturating_sub(record.len() as u64);
        t.by_priority.retain(|(_, seq), _| seq != sequence)?;
        t.expiry.retain(|(_, seq), _| seq != sequence)?;
        t.dedup_age.remove(sequence)?;
        self.dead_letter(t, sequence, reason, now_ms, record, None)?;
        Ok(())
    }

    pub(super) fn dead_letter(
        &mut self,
        t: &mut Tables<'_>,
        sequence: u64,
        reason: &str,
        at_ms: u64,
        record: Vec<u8>,
        destination: Option<String>,
    ) -> Result<(), redb::Error> {
        let number = self.meta.next_dead.max(1);
        self.meta.next_dead = number + 1;
        let bytes = DeadLetter { number, sequence, reason: reason.to_owned(), at_ms, record, destination }.encode();
        self.meta.dead_bytes += bytes.len() as u64;
        t.dead.insert(number, bytes.as_slice())?;
        Ok(())
    }

    /// Moves dead letters back into the log as new events (see
    /// [`super::Store::replay_dead_letters`]). Checks every number before
    /// changing anything.
    pub(super) fn replay(
        &mut self,
        t: &mut Tables<'_>,
        numbers: &[u64],
        now_ms: u64,
    ) -> Result<Result<Vec<Replayed>, DeadLetterError>, redb::Error> {
        let mut letters = Vec::with_capacity(numbers.len());
        for &number in numbers {
            let Some(raw) = t.dead.get(number)? else { return Ok(Err(DeadLetterError::NotFound(number))) };
            let raw_len = raw.value().len() as u64;
            let unreadable = |e: DecodeError| DeadLetterError::Unreadable { number, reason: e.to_string() };
            let letter = match DeadLetter::decode(number, raw.value()) {
                Ok(l) => l,
                Err(e) => return Ok(Err(unreadable(e))),
            };
            let mut event = match letter.event() {
                Ok(e) => e,
                Err(e) => return Ok(Err(unreadable(e))),
            };
            if let Err(reason) = event::check_body(&event.body) {
                return Ok(Err(DeadLetterError::Undeliverable { number, reason }));
            }
            if let Some(d) = &letter.destination {
                event.body.extensions.retain(|(k, _)| k != event::ROUTE_EXTENSION);
                event.body.extensions.push((event::ROUTE_EXTENSION.to_owned(), d.clone()));
            }
            letters.push((number, raw_len, letter.destination, event));
        }
        let mut out = Vec::with_capacity(letters.len());
        let mut record = Vec::new();
        for (number, raw_len, destination, event) in letters {
            t.dead.remove(number)?;
            self.meta.dead_bytes = self.meta.dead_bytes.saturating_sub(raw_len);
            // A replay is the operator's decision: no TTL, and no dedup entry
            // (the original id may still be in the log for other destinations).
            let prepared = PreparedEvent::new(&event.body, Dedup::None, event.priority, None);
            let sequence = self.meta.next_sequence;
            self.meta.next_sequence += 1;
            record.clear();
            self.stamp(&prepared, now_ms, &mut record);
            t.log.insert(sequence, record.as_slice())?;
            t.by_priority.insert((prepared.priority, sequence), record.len() as u32)?;
            self.meta.log_bytes += record.len() as u64;
            out.push(Replayed { number, id: prepared.id, sequence, destination });
        }
        Ok(Ok(out))
    }

    /// Deletes dead letters `numbers` (all when `None`), after checking every number.
    pub(super) fn purge(
        &mut self,
        t: &mut Tables<'_>,
        numbers: Option<Vec<u64>>,
    ) -> Result<Result<u64, DeadLetterError>, redb::Error> {
        let numbers = match numbers {
            Some(n) => n,
            None => t.dead.iter()?.map(|r| r.map(|(k, _)| k.value())).collect::<Result<Vec<_>, _>>()?,
        };
        for &n in &numbers {
            if t.dead.get(n)?.is_none() {
                return Ok(Err(DeadLetterError::NotFound(n)));
            }
        }
        let mut removed = 0;
        for n in numbers {
            if let Some(v) = t.dead.remove(n)? {
                self.meta.dead_bytes = self.meta.dead_bytes.saturating_sub(v.value().len() as u64);
                removed += 1;
            }
        }
        Ok(Ok(removed))
    }
}
