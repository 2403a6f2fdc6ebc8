//! Power-loss trials of the store: concurrent producers append through the
//! real store on a [`PowerLossBackend`] (redb's file backend that can lose
//! what was not fsynced), the power is cut at a random moment with unsynced
//! writes, and the file is reopened as a reboot would find it. Every event
//! whose append was answered must be there, under the sequence it was
//! answered with, and the log must have no holes.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use ferry::clock::{Clock as _, SystemClock};
use ferry::config::{Durability, StoreConfig};
use ferry::event::{EventBody, JSON_CONTENT_TYPE};
use ferry::store::power_loss::{PowerCut, PowerLossBackend};
use ferry::store::{Dedup, PreparedEvent, Store};
use rand::Rng as _;

/// What a series of power cuts did.
#[derive(Debug, Default, Clone)]
pub struct PowerLossReport {
    /// Power cuts played.
    pub cuts: usize,
    /// Events whose append was answered before a cut, over all cuts.
    pub acknowledged: u64,
    /// Of those, events missing (or under another sequence) after the reboot.
    pub lost: u64,
    /// Sectors written but not yet fsynced at the cuts, summed.
    pub dirty_sectors: u64,
    /// Of those, sectors that went back to their last-synced contents.
    pub lost_sectors: u64,
    /// Cuts that also undid an unsynced change of the file length.
    pub length_reverts: usize,
    /// Appends that failed because the power was gone (never acknowledged).
    pub refused_appends: u64,
}

/// Plays `cuts` power cuts on one store file in `dir`, each after a random
/// 20–200 ms of `producers` concurrent producers appending requests of 1–8
/// events; `how(i)` chooses what cut `i` loses. After each cut the file is
/// reopened with the plain file backend and checked against everything ever
/// acknowledged (see the module docs); then the next cut begins on it.
pub async fn run(
    dir: &Path,
    cuts: usize,
    producers: usize,
    durability: Durability,
    how: impl Fn(usize) -> PowerCut,
) -> anyhow::Result<PowerLossReport> {
    let path = dir.join("ferry.redb");
    let mut config = StoreConfig::at(&path);
    config.durability = durability;
    let clock = Arc::new(SystemClock);
    let mut report = PowerLossReport::default();
    let acked: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    for cut in 0..cuts {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .context("open store file")?;
        let (backend, switch) = PowerLossBackend::new(file)?;
        let store = Store::open_with_backend(config.clone(), clock.clone(), backend)?;
        let stop = Arc::new(AtomicBool::new(false));
        let tasks: Vec<_> = (0..producers)
            .map(|p| {
                let (store, acked, stop) = (store.clone(), acked.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut refused = 0u64;
                    let mut n = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        let size = rand::rng().random_range(1..=8);
                        let events: Vec<_> = (n..n + size).map(|i| event(&format!("c{cut}-p{p}-{i}"))).collect();
                        n += size;
                        match store.append(events).await {
                            Ok(done) => {
                                let mut a = acked.lock().expect("ledger lock");
                                for e in done {
                                    a.insert(e.id, e.sequence);
                                }
                            }
                            Err(_) => {
                                refused += 1;
                                tokio::time::sleep(Duration::from_millis(1)).await;
                            }
                        }
                    }
                    refused
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(20..200))).await;
        // Then the first moment some write is still unsynced (on a fast disk
        // most are not), so every cut has something to lose; a store that
        // stays clean for a whole second is cut anyway.
        let deadline = Instant::now() + Duration::from_secs(1);
        let cut_report = loop {
            if let Some(r) = switch.cut_while_dirty(how(cut))? {
                break r;
            }
            if Instant::now() >= deadline {
                break switch.cut(how(cut))?;
            }
            tokio::task::yield_now().await;
        };
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            report.refused_appends += t.await?;
        }
        tokio::task::spawn_blocking(move || store.close()).await?;
        report.cuts += 1;
        report.dirty_sectors += cut_report.dirty_sectors;
        report.lost_sectors += cut_report.lost_sectors;
        report.length_reverts += usize::from(cut_report.length_reverted);

        // The reboot: plain redb recovery on what reached the disk.
        let stored = tokio::task::spawn_blocking({
            let config = config.clone();
            let clock = clock.clone();
            move || -> anyhow::Result<HashMap<String, u64>> {
                let store = Store::open(config, clock).context("reopen after the power cut")?;
                let mut stored = HashMap::new();
                let mut after = 0;
                loop {
                    let page = store.read_after(after, 10_000)?;
                    let Some(last) = page.last() else { break };
                    after = last.sequence;
                    for e in page {
                        ensure!(
                            e.sequence == stored.len() as u64 + 1,
                            "hole in the log before sequence {}",
                            e.sequence
                        );
                        stored.insert(e.body.id, e.sequence);
                    }
                }
                store.close();
                Ok(stored)
            }
        })
        .await??;
        let a = acked.lock().expect("ledger lock");
        report.acknowledged = a.len() as u64;
        report.lost = a.iter().filter(|(id, seq)| stored.get(*id) != Some(seq)).count() as u64;
    }
    Ok(report)
}

fn event(id: &str) -> PreparedEvent {
    let body = EventBody {
        id: id.to_owned(),
        source: "ferry://powerloss".into(),
        ty: "ferry.event".into(),
        subject: "sensors/powerloss".into(),
        time_nanos: SystemClock.now_nanos(),
        datacontenttype: Some(JSON_CONTENT_TYPE.into()),
        data: format!("{{\"v\":\"{}\"}}", "x".repeat(240)).into_bytes(),
        partitionkey: None,
        extensions: vec![],
    };
    PreparedEvent::new(&body, Dedup::Producer, 100, None)
}
