//! A fault-injecting redb storage backend that simulates a power cut: every
//! write that was not yet made durable by an fsync may be lost.
//!
//! Test support only (feature `fault-injection`); the agent never builds it
//! into its own store. [`PowerLossBackend`] wraps redb's real [`FileBackend`]:
//! reads, writes, length changes and fsyncs go to the file as usual, and for
//! every 512-byte sector changed since the last fsync it keeps the sector's
//! contents as of that fsync (an undo log), together with the file length.
//! [`PowerSwitch::cut`] then plays the power cut, in the model of a disk
//! behind an OS page cache (like SQLite's crash-test VFS):
//!
//! - [`PowerCut::LoseAllUnsynced`]: nothing written since the last fsync
//!   reached the disk; the file goes back to its last-synced contents and length.
//! - [`PowerCut::LoseRandomSectors`]: the page cache had written back an
//!   arbitrary subset of the dirty sectors, in any order; each dirty sector
//!   independently keeps its newest contents or goes back to its last-synced
//!   contents, and the length change survives or not. Sectors are atomic
//!   (no sector is half written), as on real disks.
//!
//! After the cut the backend refuses every further read, write and fsync, as
//! a machine without power would, so the database handle above it can only be
//! dropped. Reopening the file afterwards (with any backend) shows what a
//! reboot would find.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};

use rand::{Rng as _, SeedableRng as _};
use redb::StorageBackend;
use redb::backends::FileBackend;

/// The unit a disk writes atomically.
pub const SECTOR: u64 = 512;

/// What a power cut does to writes not yet fsynced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerCut {
    /// Every unsynced write is lost, and the file length is the last synced one.
    LoseAllUnsynced,
    /// Each unsynced sector survives or is lost independently, and so does
    /// an unsynced length change; the choices follow `seed`.
    LoseRandomSectors {
        /// Seed of the choices, so a failing run can be replayed.
        seed: u64,
    },
}

/// What one [`PowerSwitch::cut`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CutReport {
    /// Sectors written since the last fsync.
    pub dirty_sectors: u64,
    /// Of those, sectors put back to their last-synced contents.
    pub lost_sectors: u64,
    /// Whether an unsynced change of the file length was undone.
    pub length_reverted: bool,
    /// fsyncs the backend completed before the cut.
    pub syncs: u64,
}

#[derive(Debug)]
struct State {
    /// False once the power was cut.
    powered: bool,
    /// The file length at the last fsync.
    synced_len: u64,
    /// Sector index → that sector's bytes at the last fsync (shorter than a
    /// sector, possibly empty, where the file ended inside or before it).
    undo: BTreeMap<u64, Vec<u8>>,
    /// The undo log an fsync in progress is making obsolete. The fsync runs
    /// without the lock so a cut can land during it, which is when a real
    /// power cut most likely hits a busy store; such a cut loses these too.
    syncing: Option<(BTreeMap<u64, Vec<u8>>, u64)>,
    syncs: u64,
}

#[derive(Debug)]
struct Shared {
    file: FileBackend,
    state: Mutex<State>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the undo log as valid as it was.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A redb [`StorageBackend`] over a real file that can lose its unsynced
/// writes; see the module docs.
#[derive(Debug)]
pub struct PowerLossBackend {
    shared: Arc<Shared>,
}

/// Cuts the power of one [`PowerLossBackend`]. Cloneable; any clone may cut.
#[derive(Debug, Clone)]
pub struct PowerSwitch {
    shared: Arc<Shared>,
}

fn no_power() -> io::Error {
    io::Error::other("simulated power loss: the device is off")
}

impl PowerLossBackend {
    /// Wraps `file` (opened read-write), and returns the switch that cuts its power.
    pub fn new(file: File) -> io::Result<(Self, PowerSwitch)> {
        let synced_len = file.metadata()?.len();
        // The contents as found are on disk: start from a clean slate.
        file.sync_all()?;
        let shared = Arc::new(Shared {
            file: FileBackend::new(file).map_err(io::Error::other)?,
            state: Mutex::new(State { powered: true, synced_len, undo: BTreeMap::new(), syncing: None, syncs: 0 }),
        });
        Ok((Self { shared: shared.clone() }, PowerSwitch { shared }))
    }

    /// Records the last-synced contents of sectors `first..=last` that are
    /// not yet in the undo log.
    fn remember(&self, state: &mut State, first: u64, last: u64) -> io::Result<()> {
        let len = self.shared.file.len()?;
        for sector in first..=last {
            if state.undo.contains_key(&sector) {
                continue;
            }
            let start = sector * SECTOR;
            // Beyond the synced length the disk holds nothing worth restoring:
            // a cut that keeps the longer length shows zeros there.
            let end = (start + SECTOR).min(len).min(state.synced_len.max(start));
            let mut old = vec![0; end.saturating_sub(start) as usize];
            if !old.is_empty() {
                self.shared.file.read(start, &mut old)?;
            }
            state.undo.insert(sector, old);
        }
        Ok(())
    }
}

impl StorageBackend for PowerLossBackend {
    fn len(&self) -> io::Result<u64> {
        let state = self.shared.state();
        if !state.powered {
            return Err(no_power());
        }
        self.shared.file.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let state = self.shared.state();
        if !state.powered {
            return Err(no_power());
        }
        self.shared.file.read(offset, out)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut state = self.shared.state();
        if !state.powered {
            return Err(no_power());
        }
        let old = self.shared.file.len()?;
        if len < old && len < state.synced_len {
            // Truncating synced bytes: keep them, the cut may undo the truncation.
            let last = (old.min(state.synced_len) - 1) / SECTOR;
            self.remember(&mut state, len / SECTOR, last)?;
        }
        self.shared.file.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        {
            let mut state = self.shared.state();
            if !state.powered {
                return Err(no_power());
            }
            let undo = std::mem::take(&mut state.undo);
            state.syncing = Some((undo, self.shared.file.len()?));
        }
        let synced = self.shared.file.sync_data();
        let mut state = self.shared.state();
        if !state.powered {
            // The cut came first: this fsync never completed.
            return Err(no_power());
        }
        let (syncing, len) = state.syncing.take().expect("one fsync at a time");
        if let Err(e) = synced {
            // Nothing became durable: the older entries stay the truth.
            let newer = std::mem::replace(&mut state.undo, syncing);
            for (sector, old) in newer {
                state.undo.entry(sector).or_insert(old);
            }
            return Err(e);
        }
        state.synced_len = len;
        state.syncs += 1;
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let mut state = self.shared.state();
        if !state.powered {
            return Err(no_power());
        }
        let last = (offset + data.len() as u64 - 1) / SECTOR;
        self.remember(&mut state, offset / SECTOR, last)?;
        self.shared.file.write(offset, data)
    }

    fn close(&self) -> io::Result<()> {
        // Releases the file locks even after a cut, so the file can be reopened.
        self.shared.file.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, redb::BackendError> {
        self.shared.file.try_lock_range(start, end)
    }

    fn try_lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, redb::BackendError> {
        self.shared.file.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), redb::BackendError> {
        self.shared.file.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), redb::BackendError> {
        self.shared.file.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), redb::BackendError> {
        self.shared.file.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, redb::BackendError> {
        self.shared.file.query_lock_range(start, end)
    }
}

impl PowerSwitch {
    /// Cuts the power: applies `how` to the writes not yet fsynced, makes the
    /// result durable on the real disk, and turns the backend off. A second
    /// cut does nothing and reports nothing.
    pub fn cut(&self, how: PowerCut) -> io::Result<CutReport> {
        let state = self.shared.state();
        self.cut_locked(state, how)
    }

    /// Cuts the power as [`cut`](Self::cut) does, but only at a moment when
    /// some write is not yet fsynced; `None` (and the power stays on)
    /// otherwise. On a fast disk most moments have nothing unsynced, so a
    /// trial that must exercise lost writes cuts with this, retrying.
    pub fn cut_while_dirty(&self, how: PowerCut) -> io::Result<Option<CutReport>> {
        let state = self.shared.state();
        if state.undo.is_empty() && state.syncing.is_none() {
            return Ok(None);
        }
        self.cut_locked(state, how).map(Some)
    }

    fn cut_locked(&self, mut state: MutexGuard<'_, State>, how: PowerCut) -> io::Result<CutReport> {
        if !state.powered {
            return Ok(CutReport::default());
        }
        state.powered = false;
        let file = &self.shared.file;
        let mut undo = std::mem::take(&mut state.undo);
        // Sectors an interrupted fsync was flushing are as unsynced as the
        // rest; their older undo entry holds the last-synced contents.
        if let Some((syncing, _)) = state.syncing.take() {
            undo.extend(syncing);
        }
        let mut report = CutReport { dirty_sectors: undo.len() as u64, syncs: state.syncs, ..CutReport::default() };
        let mut rng = match how {
            PowerCut::LoseAllUnsynced => None,
            PowerCut::LoseRandomSectors { seed } => Some(rand::rngs::StdRng::seed_from_u64(seed)),
        };
        let current_len = file.len()?;
        let keep_len = current_len == state.synced_len || rng.as_mut().is_some_and(|r| r.random_bool(0.5));
        for (sector, old) in undo {
            if rng.as_mut().is_some_and(|r| r.random_bool(0.5)) {
                continue;
            }
            report.lost_sectors += 1;
            let start = sector * SECTOR;
            let len = if keep_len { current_len } else { state.synced_len };
            // The whole sector goes back: its synced bytes, zeros after them.
            let end = (start + SECTOR).min(len.max(start + old.len() as u64));
            if end <= start {
                continue;
            }
            let mut bytes = old;
            bytes.resize((end - start) as usize, 0);
            if start + bytes.len() as u64 > current_len {
                file.set_len(start + bytes.len() as u64)?;
            }
            file.write(start, &bytes)?;
        }
        let final_len = if keep_len { current_len } else { state.synced_len };
        report.length_reverted = final_len != current_len;
        if file.len()? != final_len {
            file.set_len(final_len)?;
        }
        file.sync_data()?;
        Ok(report)
    }

    /// Whether the power was cut.
    pub fn is_cut(&self) -> bool {
        !self.shared.state().powered
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend() -> (tempfile::TempDir, std::path::PathBuf, PowerLossBackend, PowerSwitch) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).unwrap();
        let (b, s) = PowerLossBackend::new(file).unwrap();
        (dir, path, b, s)
    }

    #[test]
    fn a_cut_that_loses_all_unsynced_writes_leaves_exactly_the_last_synced_file() {
        let (_dir, path, b, switch) = backend();
        b.set_len(4 * SECTOR).unwrap();
        b.write(0, &[1; 2048]).unwrap();
        b.sync_data().unwrap();
        b.write(100, &[2; 700]).unwrap();
        b.set_len(8 * SECTOR).unwrap();
        b.write(3000, &[3; 1000]).unwrap();
        let report = switch.cut(PowerCut::LoseAllUnsynced).unwrap();
        assert_eq!(report.syncs, 1);
        assert!(report.length_reverted);
        assert_eq!(report.lost_sectors, report.dirty_sectors);
        assert_eq!(std::fs::read(&path).unwrap(), vec![1; 2048]);
    }

    #[test]
    fn a_cut_keeps_each_dirty_sector_whole_either_new_or_as_synced() {
        for seed in 0..20 {
            let (_dir, path, b, switch) = backend();
            b.write(0, &[1; 4096]).unwrap();
            b.sync_data().unwrap();
            b.write(0, &[2; 4096]).unwrap();
            b.write(4096, &[2; 1024]).unwrap();
            let report = switch.cut(PowerCut::LoseRandomSectors { seed }).unwrap();
            assert_eq!(report.dirty_sectors, 10);
            let disk = std::fs::read(&path).unwrap();
            let expected_len = if report.length_reverted { 4096 } else { 5120 };
            assert_eq!(disk.len(), expected_len, "seed {seed}");
            let mut lost = 0;
            for (i, sector) in disk.chunks(SECTOR as usize).enumerate() {
                let old = if i < 8 { 1 } else { 0 };
                assert!(
                    sector.iter().all(|&x| x == 2) || sector.iter().all(|&x| x == old),
                    "seed {seed}: torn sector {i}"
                );
                lost += u64::from(sector[0] != 2);
            }
            // Sectors past a reverted length are lost without being counted twice.
            assert!(lost <= report.lost_sectors + 2, "seed {seed}");
        }
    }

    #[test]
    fn a_synced_truncation_survives_and_an_unsynced_one_can_be_undone() {
        let (_dir, path, b, switch) = backend();
        b.write(0, &[7; 2048]).unwrap();
        b.sync_data().unwrap();
        b.set_len(512).unwrap();
        switch.cut(PowerCut::LoseAllUnsynced).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), vec![7; 2048]);
    }

    #[test]
    fn after_a_cut_the_device_refuses_io_but_releases_its_locks() {
        let (_dir, _path, b, switch) = backend();
        b.write(0, &[1; 10]).unwrap();
        switch.cut(PowerCut::LoseAllUnsynced).unwrap();
        assert!(switch.is_cut());
        assert!(b.write(0, &[1]).is_err());
        assert!(b.read(0, &mut [0]).is_err());
        assert!(b.sync_data().is_err());
        assert!(b.close().is_ok());
        assert_eq!(switch.cut(PowerCut::LoseAllUnsynced).unwrap(), CutReport::default());
    }
}
