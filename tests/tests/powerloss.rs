//! Power loss, approximated at the storage layer: the store runs on redb's
//! real file backend wrapped so that a "power cut" discards what was written
//! but not yet fsynced (all of it, or a random subset of 512-byte sectors and
//! of the length change), while producers append concurrently. After each
//! cut the file is reopened the way a reboot would find it.

use ferry::config::Durability;
use ferry::store::power_loss::PowerCut;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_acknowledged_event_is_lost_when_every_unsynced_write_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let r =
        ferry_tests::powerloss::run(dir.path(), 8, 16, Durability::Fsync, |_| PowerCut::LoseAllUnsynced).await.unwrap();
    eprintln!("{r:?}");
    assert!(r.acknowledged > 500, "too little load to prove anything: {r:?}");
    assert!(r.dirty_sectors > 0, "no cut caught unsynced writes: {r:?}");
    assert_eq!(r.lost, 0, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_acknowledged_event_is_lost_when_random_unsynced_sectors_are_lost() {
    let dir = tempfile::tempdir().unwrap();
    let r = ferry_tests::powerloss::run(dir.path(), 8, 16, Durability::Fsync, |i| PowerCut::LoseRandomSectors {
        seed: 0x5eed + i as u64,
    })
    .await
    .unwrap();
    eprintln!("{r:?}");
    assert!(r.acknowledged > 500, "too little load to prove anything: {r:?}");
    assert!(r.lost_sectors > 0 && r.lost_sectors < r.dirty_sectors, "the cuts were not partial: {r:?}");
    assert_eq!(r.lost, 0, "{r:?}");
}

/// The control: with `durability = "none"` (commit without fsync) the same
/// cuts do lose acknowledged events, so the trial can see a loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_fsync_the_same_cuts_lose_acknowledged_events() {
    let dir = tempfile::tempdir().unwrap();
    let r =
        ferry_tests::powerloss::run(dir.path(), 4, 16, Durability::None, |_| PowerCut::LoseAllUnsynced).await.unwrap();
    eprintln!("{r:?}");
    assert!(r.lost > 0, "{r:?}");
}
