//! What leaves the log besides eviction: TTL expiry and dedup pruning
//! (the sweep), and events every consumer routing them has acknowledged,
//! which `store.retain_delivered` keeps a while for replay; and a
//! destination's rewind, which makes kept events undelivered again.

use super::append::decode_deliveries;
use super::*;

/// A stable fingerprint of the consumers and their routes.
fn consumers_fingerprint(consumers: &[crate::config::Consumer]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    for c in consumers {
        c.name.hash(&mut h);
        for r in c.routing.filters() {
            r.as_str().hash(&mut h);
        }
    }
    h.finish().max(1)
}

/// An event retired from the log, for its secondary indexes and the byte count.
struct Retired {
    seq: u64,
    priority: u8,
    expires_at_ms: Option<u64>,
    accepted_ms: u64,
    size: u64,
}

impl Writer {
    /// Deletes a record and its expiry entry; returns its size. The caller
    /// has already removed (or is iterating) its priority entry.
    pub(super) fn remove_from_log(&mut self, t: &mut Tables<'_>, seq: u64) -> Result<u64, redb::Error> {
        let Some(record) = t.log.remove(seq)? else {
            return Ok(0);
        };
        let bytes = record.value();
        let size = bytes.len() as u64;
        if let Ok((header, _)) = event::decode_header(bytes)
            && let Some(at) = header.expires_at_ms
        {
            drop(record);
            t.expiry.remove((at, seq))?;
        }
        self.meta.log_bytes = self.meta.log_bytes.saturating_sub(size);
        Ok(size)
    }

    /// Expires events past their TTL into dead letters, forgets dedup ids
    /// older than the window, and keeps dead letters within their share.
    pub(super) fn sweep(&mut self, t: &mut Tables<'_>, now_ms: u64) -> Result<SweepReport, redb::Error> {
        let mut report = SweepReport::default();
        while (report.expired as usize) < SWEEP_LIMIT {
            let Some((key, _)) = t.expiry.first()? else {
                break;
            };
            let (at, seq) = key.value();
            drop(key);
            if at > now_ms {
                break;
            }
            t.expiry.remove((at, seq))?;
            let record = t.log.remove(seq)?.map(|r| r.value().to_vec());
            if let Some(record) = record {
                let priority = event::decode_header(&record).map_or(0, |(h, _)| h.priority);
                t.by_priority.remove((priority, seq))?;
                self.meta.log_bytes = self.meta.log_bytes.saturating_sub(record.len() as u64);
                self.dead_letter(t, seq, "ttl expired", now_ms, record, None)?;
                report.expired += 1;
            }
        }
        self.meta.expired_events += report.expired;

        let window_ms = u64::try_from(self.config.dedup_window.as_millis()).unwrap_or(u64::MAX);
        let cutoff = now_ms.saturating_sub(window_ms);
        while (report.dedup_pruned as usize) < SWEEP_LIMIT {
            let Some((key, value)) = t.dedup_age.first()? else {
                break;
            };
            let (seq, (at, id)) = (key.value(), value.value());
            if at >= cutoff {
                break;
            }
            let id = id.to_owned();
            drop((key, value));
            t.dedup_age.remove(seq)?;
            // The id may since have been stored again under a newer sequence.
            if t.dedup.get(id.as_str())?.is_some_and(|v| v.value() == seq) {
                t.dedup.remove(id.as_str())?;
            }
            report.dedup_pruned += 1;
        }
        // One row per commit: its ids leave together.
        while (report.dedup_pruned as usize) < SWEEP_LIMIT {
            let Some((key, value)) = t.dedup_ages.first()? else {
                break;
            };
            let (first, record) = (key.value(), AgeRecord::decode(value.value()));
            drop((key, value));
            if record.at_ms >= cutoff {
                break;
            }
            t.dedup_ages.remove(first)?;
            for (seq, id) in &record.ids {
                // The id may since have been stored again under a newer sequence.
                if t.dedup.get(id.as_str())?.is_some_and(|v| v.value() == *seq) {
                    t.dedup.remove(id.as_str())?;
                }
            }
            report.dedup_pruned += record.ids.len() as u64;
        }

        // A batch's record outlives the window only when its acks never
        // reached the broker (the agent stopped between commit and ack).
        let cutoff_key = u128::from(cutoff) << 80;
        for row in t.deliveries.extract_from_if(..cutoff_key, |_, _| true)?.take(SWEEP_LIMIT) {
            let (_, ids) = row?;
            report.dedup_pruned += decode_deliveries(ids.value()).len() as u64;
        }

        report.delivered = self.retire_delivered(t, now_ms)?;
        report.retained_expired = self.trim_retained(t, now_ms)?;
        self.prune_cursor_moves(t)?;

        let dead_cap = self.config.quota_bytes / DEAD_LETTER_SHARE;
        while self.meta.dead_bytes > dead_cap {
            let Some((_, v)) = t.dead.pop_first()? else {
                break;
            };
            self.meta.dead_bytes = self.meta.dead_bytes.saturating_sub(v.value().len() as u64);
            report.dead_dropped += 1;
        }
        if report.dead_dropped > 0 {
            self.meta.dead_dropped += report.dead_dropped;
            tracing::warn!(
                dropped = report.dead_dropped,
                "dead letters over their share of the quota: dropped the oldest"
            );
        }
        Ok(report)
    }

    /// Removes events every consumer routing them has acknowledged, or with
    /// `retain_delivered` moves them to the kept ones; keeps events no
    /// consumer routes (a destination added later will want them).
    /// Bounded per call; resumes from `retention_floor` next time.
    pub(super) fn retire_delivered(&mut self, t: &mut Tables<'_>, now_ms: u64) -> Result<u64, redb::Error> {
        self.last_retire = Some(Instant::now());
        let consumers = &self.config.consumers;
        if consumers.is_empty() {
            return Ok(0);
        }
        let fingerprint = consumers_fingerprint(consumers);
        if self.meta.consumers_hash != fingerprint {
            // Different destinations now: earlier verdicts on kept events no longer hold.
            self.meta.consumers_hash = fingerprint;
            self.meta.retention_floor = 0;
        }
        let mut upto = u64::MAX;
        for c in consumers {
            upto = upto.min(t.cursors.get(c.name.as_str())?.map_or(0, |v| v.value()));
        }
        let floor = self.meta.retention_floor;
        if upto <= floor {
            return Ok(0);
        }
        // Bound the pass to `SWEEP_LIMIT` rows: stop before the first row past them.
        let last = match t.log.range(floor + 1..=upto)?.nth(SWEEP_LIMIT) {
            Some(row) => row?.0.value() - 1,
            None => upto,
        };
        self.meta.retention_floor = last;
        let keep = self.config.retain_delivered.is_some();
        // A pass over a range retired before (the destinations changed) meets kept events again.
        let kept_before = t.retained.last()?.map_or(0, |(k, _)| k.value().0);
        // One pass over the range both decides and removes (far cheaper than a
        // lookup and a removal per event); the secondary indexes follow.
        let mut doomed: Vec<Retired> = Vec::new();
        t.log.retain_in(floor + 1..=last, |seq, record| {
            // An unreadable record is kept for an operator to inspect rather than lost.
            let Ok(subject) = event::decode_subject(record) else { return true };
            if !consumers.iter().any(|c| c.routing.may_take(subject)) {
                return true;
            }
            let Ok((header, _)) = event::decode_header(record) else { return true };
            doomed.push(Retired {
                seq,
                priority: header.priority,
                expires_at_ms: header.expires_at_ms,
                accepted_ms: header.hlc.millis(),
                size: record.len() as u64,
            });
            keep
        })?;
        // Per priority, the retired entries of the index are one key range.
        let mut priorities: Vec<u8> = doomed.iter().map(|r| r.priority).collect();
        priorities.sort_unstable();
        priorities.dedup();
        for p in priorities {
            let seqs: Vec<u64> = doomed.iter().filter(|r| r.priority == p).map(|r| r.seq).collect();
            let (lo, hi) = (seqs[0], seqs[seqs.len() - 1]);
            t.by_priority.retain_in((p, lo)..=(p, hi), |(_, seq), _| seqs.binary_search(&seq).is_err())?;
        }
        for r in &doomed {
            if let Some(at) = r.expires_at_ms {
                t.expiry.remove((at, r.seq))?;
            }
            let was_kept = r.seq <= kept_before && t.retained.get((r.seq, r.accepted_ms))?.is_some();
            if keep {
                if !was_kept {
                    t.retained.insert((r.seq, r.accepted_ms), ())?;
                    self.meta.retained_events += 1;
                    self.meta.retained_bytes += r.size;
                }
            } else {
                if was_kept {
                    t.retained.remove((r.seq, r.accepted_ms))?;
                    self.no_longer_kept(r.size);
                }
                self.meta.log_bytes = self.meta.log_bytes.saturating_sub(r.size);
            }
        }
        self.meta.delivered_events += doomed.len() as u64;
        if keep {
            self.trim_retained(t, now_ms)?;
        }
        Ok(doomed.len() as u64)
    }

    /// Removes kept delivered events past their age or over their share of
    /// the quota, oldest first (all of them once `retain_delivered` is off).
    pub(super) fn trim_retained(&mut self, t: &mut Tables<'_>, now_ms: u64) -> Result<u64, redb::Error> {
        let (cutoff, cap) = match self.config.retain_delivered {
            Some(r) => (now_ms.saturating_sub(u64::try_from(r.age.as_millis()).unwrap_or(u64::MAX)), r.max_bytes),
            None => (u64::MAX, 0),
        };
        let mut removed = 0u64;
        while (removed as usize) < SWEEP_LIMIT {
            let Some((key, _)) = t.retained.first()? else { break };
            let (seq, accepted_ms) = key.value();
            drop(key);
            if accepted_ms >= cutoff && self.meta.retained_bytes <= cap {
                break;
            }
            self.drop_retained(t, (seq, accepted_ms))?;
            removed += 1;
        }
        self.meta.retained_expired += removed;
        Ok(removed)
    }

    /// Removes the oldest kept delivered events until `needed` bytes are
    /// free under the quota, or none is left; returns how many went.
    pub(super) fn evict_retained(&mut self, t: &mut Tables<'_>, needed: u64) -> Result<u64, redb::Error> {
        let quota = self.config.quota_bytes;
        let mut evicted = 0u64;
        while quota.saturating_sub(self.used_bytes()) < needed {
            let Some((key, _)) = t.retained.first()? else { break };
            let kept = key.value();
            drop(key);
            self.drop_retained(t, kept)?;
            evicted += 1;
        }
        if evicted > 0 {
            self.meta.retained_evicted += evicted;
            tracing::info!(events = evicted, "store full: removed the oldest delivered events kept for replay");
        }
        Ok(evicted)
    }

    /// Removes kept event `kept` (its sequence and acceptance time) from the log.
    fn drop_retained(&mut self, t: &mut Tables<'_>, kept: (u64, u64)) -> Result<(), redb::Error> {
        t.retained.remove(kept)?;
        let size = self.remove_from_log(t, kept.0)?;
        self.no_longer_kept(size);
        Ok(())
    }

    /// Counts a kept event of `size` bytes out of the kept ones.
    fn no_longer_kept(&mut self, size: u64) {
        self.meta.retained_events = self.meta.retained_events.saturating_sub(1);
        self.meta.retained_bytes = self.meta.retained_bytes.saturating_sub(size);
    }

    /// Forgets the cursor moves no receipt needs: those below the log's
    /// oldest event (they date only events that left it).
    fn prune_cursor_moves(&mut self, t: &mut Tables<'_>) -> Result<(), redb::Error> {
        let oldest = t.log.first()?.map_or(self.meta.next_sequence, |(k, _)| k.value());
        for c in &self.config.consumers {
            let name = c.name.as_str();
            let (from, below) = (tables::move_key(name, 0), tables::move_key(name, oldest));
            for row in t.cursor_moves.extract_from_if(from.as_str()..below.as_str(), |_, _| true)?.take(SWEEP_LIMIT) {
                row?;
            }
        }
        Ok(())
    }

    /// Moves `destination`'s cursor back to `to` (never forward). Kept events
    /// after `to` are undelivered again: they return to the eviction index,
    /// and retention looks at them again once every cursor has passed them.
    pub(super) fn rewind(&mut self, t: &mut Tables<'_>, destination: &str, to: u64) -> Result<Rewound, redb::Error> {
        let previous = t.cursors.get(destination)?.map_or(0, |v| v.value());
        if to < previous {
            t.cursors.insert(destination, to)?;
            // Those moves date deliveries that are to happen again; the first
            // of them also dated the events up to `to`, which stay delivered.
            let mut first_ms = None;
            let (after, last) = (tables::move_key(destination, to + 1), tables::move_key(destination, u64::MAX));
            for row in t.cursor_moves.extract_from_if(after.as_str()..=last.as_str(), |_, _| true)? {
                first_ms = first_ms.or(Some(row?.1.value()));
            }
            if let Some(at) = first_ms.filter(|_| to > 0) {
                t.cursor_moves.insert(tables::move_key(destination, to).as_str(), at)?;
            }
        }
        let restored: Vec<u64> = t
            .retained
            .extract_from_if((to + 1, 0).., |_, _| true)?
            .map(|row| row.map(|(k, _)| k.value().0))
            .collect::<Result<_, _>>()?;
        for seq in restored {
            // TTLs are not restored: an operator asked for these events again.
            let (priority, size) = match t.log.get(seq)? {
                Some(record) => {
                    let bytes = record.value();
                    (event::decode_header(bytes).map_or(0, |(h, _)| h.priority), bytes.len() as u32)
                }
                None => continue,
            };
            t.by_priority.insert((priority, seq), size)?;
            self.no_longer_kept(u64::from(size));
        }
        self.meta.retention_floor = self.meta.retention_floor.min(to);
        let first_available = t.log.range(to + 1..)?.next().transpose()?.map(|(k, _)| k.value());
        Ok(Rewound { previous, first_available })
    }
}
