//! A redb storage backend that fails writes on demand, as a full disk or a
//! failing device does: the seam where tests make the store's writes fail
//! and then heal, to show that the store recovers without a restart.
//!
//! Test support only (feature `fault-injection`). [`FaultyBackend`] wraps
//! redb's real [`FileBackend`]; while its [`IoFaults`] switch is set, every
//! write, length change and fsync fails with the chosen error and reads
//! still work. Every backend made with one switch shares it, so a store
//! reopened through [`crate::store::Store::open_with_backends`] stays faulty
//! until the switch is cleared.

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

use redb::StorageBackend;
use redb::backends::FileBackend;

/// The switch: which error writes fail with (0: none), and how many failed.
#[derive(Debug, Clone, Default)]
pub struct IoFaults {
    errno: Arc<AtomicI32>,
    failed: Arc<AtomicU64>,
}

impl IoFaults {
    /// A switch with no fault set.
    pub fn new() -> Self {
        Self::default()
    }

    /// From now on, writes fail with OS error `errno` (e.g. `libc::ENOSPC`).
    pub fn fail_writes(&self, errno: i32) {
        self.errno.store(errno, Ordering::SeqCst);
    }

    /// Writes succeed again.
    pub fn heal(&self) {
        self.errno.store(0, Ordering::SeqCst);
    }

    /// Writes refused so far.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::SeqCst)
    }

    /// A backend on the file at `path` (created if missing) under this switch.
    pub fn backend(&self, path: &Path) -> io::Result<FaultyBackend> {
        let file: File = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        Ok(FaultyBackend { file: FileBackend::new(file).map_err(io::Error::other)?, faults: self.clone() })
    }

    fn check(&self) -> io::Result<()> {
        match self.errno.load(Ordering::SeqCst) {
            0 => Ok(()),
            errno => {
                self.failed.fetch_add(1, Ordering::SeqCst);
                Err(io::Error::from_raw_os_error(errno))
            }
        }
    }
}

/// A file backend whose writes fail while its [`IoFaults`] says so.
#[derive(Debug)]
pub struct FaultyBackend {
    file: FileBackend,
    faults: IoFaults,
}

impl StorageBackend for FaultyBackend {
    fn len(&self) -> io::Result<u64> {
        self.file.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.file.read(offset, out)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.faults.check()?;
        self.file.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.faults.check()?;
        self.file.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.faults.check()?;
        self.file.write(offset, data)
    }

    fn close(&self) -> io::Result<()> {
        self.file.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, redb::BackendError> {
        self.file.try_lock_range(start, end)
    }

    fn try_lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, redb::BackendError> {
        self.file.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), redb::BackendError> {
        self.file.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), redb::BackendError> {
        self.file.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), redb::BackendError> {
        self.file.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, redb::BackendError> {
        self.file.query_lock_range(start, end)
    }
}

/// Overwrites the stored record at `sequence` with `bytes`, as a damaged
/// page would leave it, in its own transaction.
pub fn overwrite_record(db: &redb::Database, sequence: u64, bytes: &[u8]) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    txn.open_table(super::tables::LOG)?.insert(sequence, bytes)?;
    txn.commit()?;
    Ok(())
}
