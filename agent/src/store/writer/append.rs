//! Appending events: sequence and HLC stamps, producer-id and redelivery
//! dedup, and making room under the quota (refuse or evict, by priority).

use super::*;

/// Every id of a stored batch of deliveries, with its sequence.
fn stored_deliveries(t: &Tables<'_>) -> Result<HashMap<String, u64>, redb::Error> {
    let mut ids = HashMap::new();
    for row in t.deliveries.iter()? {
        let (_, v) = row?;
        ids.extend(decode_deliveries(v.value()));
    }
    Ok(ids)
}

/// A record of [`tables::DELIVERIES`]. One that does not decode (it cannot,
/// unless the file is damaged) is read as empty: its redeliveries are then
/// stored again rather than refused, which loses nothing.
pub(super) fn decode_deliveries(row: &[u8]) -> Vec<(String, u64)> {
    postcard::from_bytes(row).unwrap_or_default()
}

impl Writer {
    /// Stores one request's events, or refuses the whole request.
    pub(super) fn append(
        &mut self,
        t: &mut Tables<'_>,
        events: Vec<PreparedEvent>,
        now_ms: u64,
    ) -> Result<Result<Vec<Appended>, AppendError>, redb::Error> {
        // Pass 1: which events are new, and how much room they need.
        enum Slot {
            New,
            StoredAs(u64),
            SameAs(usize),
        }
        let mut slots = Vec::with_capacity(events.len());
        let mut first_in_request: HashMap<&str, usize> = HashMap::new();
        let mut needed = 0u64;
        let mut max_priority = 0u8;
        let redelivery = events.iter().any(|e| matches!(e.dedup, Dedup::Delivery { redelivered: true, .. }));
        let delivered = if redelivery { stored_deliveries(t)? } else { HashMap::new() };
        for (i, e) in events.iter().enumerate() {
            if e.dedup != Dedup::None {
                // A first delivery is never a repeat; only the broker's flagged ones are looked up.
                let look_up = matches!(e.dedup, Dedup::Producer | Dedup::Delivery { redelivered: true, .. });
                let stored = if look_up {
                    t.dedup.get(e.id.as_str())?.map(|v| v.value()).or_else(|| delivered.get(&e.id).copied())
                } else {
                    None
                };
                if let Some(seq) = stored {
                    slots.push(Slot::StoredAs(seq));
                    continue;
                }
                if let Some(&j) = first_in_request.get(e.id.as_str()) {
                    slots.push(Slot::SameAs(j));
                    continue;
                }
                first_in_request.insert(&e.id, i);
            }
            needed += e.record_len();
            max_priority = max_priority.max(e.priority);
            slots.push(Slot::New);
        }
        if let Err(refusal) = self.make_room(t, needed, max_priority)? {
            return Ok(Err(refusal));
        }

        // Pass 2: assign sequence and HLC, write the records and indexes.
        let mut out: Vec<Appended> = Vec::with_capacity(events.len());
        let mut record = Vec::new();
        let mut batches: Vec<(u128, Vec<(String, u64)>)> = Vec::new();
        drop(first_in_request);
        for (e, slot) in events.into_iter().zip(slots) {
            let (sequence, duplicate) = match slot {
                Slot::StoredAs(seq) => (seq, true),
                Slot::SameAs(j) => (out[j].sequence, true),
                Slot::New => {
                    let seq = self.meta.next_sequence;
                    self.meta.next_sequence += 1;
                    record.clear();
                    self.stamp(&e, now_ms, &mut record);
                    t.log.insert(seq, record.as_slice())?;
                    match e.dedup {
                        Dedup::None => {}
                        Dedup::Producer => {
                            t.dedup.insert(e.id.as_str(), seq)?;
                            self.ages.ids.push((seq, e.id.clone()));
                        }
                        Dedup::Delivery { batch, .. } => match batches.iter_mut().find(|(b, _)| *b == batch) {
                            Some((_, ids)) => ids.push((e.id.clone(), seq)),
                            None => batches.push((batch, vec![(e.id.clone(), seq)])),
                        },
                    }
                    t.by_priority.insert((e.priority, seq), record.len() as u32)?;
                    if let Some(at) = e.expires_at_ms {
                        t.expiry.insert((at, seq), ())?;
                    }
                    self.meta.log_bytes += record.len() as u64;
                    self.meta.accepted_events += 1;
                    (seq, false)
                }
            };
            if duplicate {
                self.meta.dedup_hits += 1;
            }
            out.push(Appended { id: e.id, sequence, duplicate });
        }
        for (batch, mut ids) in batches {
            // Should a batch ever span two requests, its record holds both.
            if let Some(earlier) = t.deliveries.get(batch)? {
                ids.extend(decode_deliveries(earlier.value()));
            }
            let row = postcard::to_allocvec(&ids).expect("encoding to a Vec cannot fail");
            t.deliveries.insert(batch, row.as_slice())?;
        }
        Ok(Ok(out))
    }

    /// The stored record of a prepared event: its header, with a fresh HLC, then its body.
    pub(super) fn stamp(&mut self, e: &PreparedEvent, now_ms: u64, out: &mut Vec<u8>) {
        let header = RecordHeader { hlc: self.hlc.tick(now_ms), expires_at_ms: e.expires_at_ms, priority: e.priority };
        event::encode_record(header, &e.body, out);
    }

    pub(super) fn used_bytes(&self) -> u64 {
        self.meta.log_bytes + self.meta.dead_bytes
    }

    /// Ensures `needed` bytes fit under the quota, evicting under
    /// `drop-oldest`. Evicts nothing unless the whole request will fit.
    pub(super) fn make_room(
        &mut self,
        t: &mut Tables<'_>,
        needed: u64,
        max_priority: u8,
    ) -> Result<Result<(), AppendError>, redb::Error> {
        let quota = self.config.quota_bytes;
        let mut free = quota.saturating_sub(self.used_bytes());
        if let Some(refusal) = self.disk_refusal() {
            return Ok(Err(refusal));
        }
        if needed > free {
            // Delivered events make way first, then those kept for replay:
            // nothing undelivered is lost by removing them.
            self.retire_delivered(t, self.clock.now_millis())?;
            if needed <= quota {
                self.evict_retained(t, needed)?;
            }
            free = quota.saturating_sub(self.used_bytes());
        }
        if needed <= free {
            return Ok(Ok(()));
        }
        if needed > quota {
            return Ok(Err(AppendError::TooLarge { needed, quota }));
        }
        let full = AppendError::Full { needed, free, quota, retry_after: FULL_RETRY_AFTER };
        if self.config.full_policy == FullPolicy::Reject {
            return Ok(Err(full));
        }
        // Only events no more important than the newcomers may make way.
        let shortfall = needed - free;
        let mut evictable = 0u64;
        for row in t.by_priority.range(..=(max_priority, u64::MAX))? {
            evictable += u64::from(row?.1.value());
            if evictable >= shortfall {
                break;
            }
        }
        if evictable < shortfall {
            return Ok(Err(full));
        }
        let (mut freed, mut count) = (0u64, 0u64);
        while freed < shortfall {
            let Some((key, _)) = t.by_priority.pop_first()? else {
                break;
            };
            let (_, seq) = key.value();
            drop(key);
            let size = self.remove_from_log(t, seq)?;
            freed += size;
            count += 1;
        }
        self.meta.evicted_events += count;
        self.meta.evicted_bytes += freed;
        tracing::warn!(events = count, bytes = freed, "store full: evicted the oldest lowest-priority events");
        Ok(Ok(()))
    }
}
