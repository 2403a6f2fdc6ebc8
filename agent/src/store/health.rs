//! Whether the store can write, and the database handle that the writer
//! empties while it heals and fills again once it reopened the file.
//!
//! redb latches an I/O error: after one, every later operation on that
//! `Database` fails. Healing therefore means dropping every handle to it and
//! opening the file again, which redb repairs on open. [`Shared`] is the one
//! place the handle lives: readers clone it for the length of one read, the
//! writer takes it away when a write fails and puts a fresh one back when a
//! reopen works. It also holds the [`StoreHealth`] that `/healthz`, status
//! and metrics report.
//!
//! Opening is guarded here too: a file that is empty or not a redb database
//! is refused (never silently replaced by a new store), and a panic inside
//! redb on a damaged file becomes an error naming the file.

use std::cell::Cell;
use std::io::Read as _;
use std::os::unix::fs::MetadataExt as _;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Once, RwLock};

use redb::Database;
use serde::Serialize;

use super::StoreError;

/// The first bytes of every redb file.
const REDB_MAGIC: [u8; 9] = [b'r', b'e', b'd', b'b', 0x1A, 0x0A, 0xA9, 0x0D, 0x0A];

/// Whether the store can take writes, and if not, why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum StoreHealth {
    /// Writes succeed.
    Ok,
    /// The file system is below `store.min_free_disk`: ingest is refused
    /// until space frees up; nothing is lost.
    DiskLow {
        /// Free bytes on the store's file system.
        free_bytes: u64,
        /// The configured reserve.
        reserve_bytes: u64,
    },
    /// A write failed; the writer reopens the file with backoff and ingest
    /// is refused meanwhile.
    Failing {
        /// The last failure.
        reason: String,
        /// When the failures began, in ms since the epoch.
        since_ms: u64,
        /// Reopen attempts so far.
        attempts: u32,
    },
    /// The store file was deleted or replaced while the agent ran. What is
    /// written now would be lost at the next start, so ingest stops until
    /// an operator restarts the agent.
    Vanished {
        /// What happened to the file.
        reason: String,
    },
}

impl StoreHealth {
    /// Whether the store takes events.
    pub fn is_ok(&self) -> bool {
        *self == StoreHealth::Ok
    }

    /// One line for logs, `/healthz` and errors.
    pub fn describe(&self) -> String {
        match self {
            StoreHealth::Ok => "ok".into(),
            StoreHealth::DiskLow { free_bytes, reserve_bytes } => format!(
                "disk nearly full: {free_bytes} bytes free, below the {reserve_bytes}-byte reserve \
                 (store.min_free_disk); ingest resumes when space frees up"
            ),
            StoreHealth::Failing { reason, attempts, .. } => {
                format!("store cannot write ({reason}); reopening it, {attempts} attempts so far")
            }
            StoreHealth::Vanished { reason } => reason.clone(),
        }
    }
}

/// The database handle and health that the store's readers and its writer share.
pub(super) struct Shared {
    db: RwLock<Option<Handle>>,
    health: Mutex<StoreHealth>,
    /// The store file, for errors.
    pub(super) path: PathBuf,
}

/// The database, and whether what is written through it reaches the disk.
/// While writes fail, readers get a copy whose writes stay in memory, so
/// forwarding and status go on; services that write are refused it.
#[derive(Clone)]
struct Handle {
    db: Arc<Database>,
    writable: bool,
}

impl Shared {
    pub(super) fn new(db: Database, path: PathBuf) -> Self {
        let handle = Handle { db: Arc::new(db), writable: true };
        Self { db: RwLock::new(Some(handle)), health: Mutex::new(StoreHealth::Ok), path }
    }

    /// The database to read from, unless the writer is healing it and has
    /// none to offer.
    pub(super) fn db(&self) -> Result<Arc<Database>, StoreError> {
        let handle = self.db.read().expect("database slot lock").clone();
        handle.map(|h| h.db).ok_or_else(|| StoreError::Unavailable(self.health().describe()))
    }

    /// The database to write to, unless writes fail now.
    pub(super) fn writable_db(&self) -> Result<Arc<Database>, StoreError> {
        let handle = self.db.read().expect("database slot lock").clone();
        match handle {
            Some(Handle { db, writable: true }) => Ok(db),
            _ => Err(StoreError::Unavailable(self.health().describe())),
        }
    }

    /// Takes the database away from readers; returns it so the writer can
    /// wait for the readers' handles to drop.
    pub(super) fn take(&self) -> Option<Arc<Database>> {
        self.db.write().expect("database slot lock").take().map(|h| h.db)
    }

    /// Hands a reopened database to readers and writers.
    pub(super) fn put(&self, db: Arc<Database>) {
        *self.db.write().expect("database slot lock") = Some(Handle { db, writable: true });
    }

    /// Hands readers a database that must not be written to.
    pub(super) fn put_read_only(&self, db: Arc<Database>) {
        *self.db.write().expect("database slot lock") = Some(Handle { db, writable: false });
    }

    pub(super) fn health(&self) -> StoreHealth {
        self.health.lock().expect("health lock").clone()
    }

    /// Sets the health; returns whether it changed.
    pub(super) fn set_health(&self, health: StoreHealth) -> bool {
        let mut h = self.health.lock().expect("health lock");
        let changed = *h != health;
        *h = health;
        changed
    }
}

/// Which file the store was opened on, to notice it vanishing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FileIdentity {
    dev: u64,
    ino: u64,
}

impl FileIdentity {
    pub(super) fn of(path: &Path) -> Option<Self> {
        std::fs::metadata(path).ok().map(|m| Self { dev: m.dev(), ino: m.ino() })
    }

    /// Why the file at `path` is no longer this one, if it is not.
    pub(super) fn lost(&self, path: &Path) -> Option<String> {
        let p = path.display();
        match Self::of(path) {
            Some(now) if now == *self => None,
            Some(_) => Some(format!(
                "the store file {p} was replaced while the agent ran; ingest stopped so nothing more goes to the \
                 file being written, which is no longer the one at that path. Restart the agent to use the file now there"
            )),
            None => Some(format!(
                "the store file {p} (or its directory) was deleted while the agent ran; ingest stopped, because \
                 events stored now would be lost when the agent stops. Forwarding goes on from what is still open. \
                 Restart the agent to start a new store there"
            )),
        }
    }
}

/// Refuses a file that exists but cannot be a store: empty, or not redb.
/// A missing file is fine (a new store is created).
pub(super) fn check_file(path: &Path) -> Result<(), StoreError> {
    let refused = |reason: String| StoreError::Refused { path: path.display().to_string(), reason };
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(refused(format!("cannot read it: {e}"))),
    };
    let mut magic = [0u8; REDB_MAGIC.len()];
    let mut read = 0;
    while read < magic.len() {
        match file.read(&mut magic[read..]) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(e) => return Err(refused(format!("cannot read it: {e}"))),
        }
    }
    if read == 0 {
        return Err(refused(
            "it is empty (0 bytes), so it holds no store. Ferry never replaces a file it finds: if it was left by an \
             interrupted first start, delete it; otherwise restore the store from a backup"
                .into(),
        ));
    }
    if read < magic.len() || magic != REDB_MAGIC {
        return Err(refused(
            "it is not a Ferry store (not a redb database). Ferry never replaces a file it finds: point \
             agent.data_dir elsewhere, or move the file aside"
                .into(),
        ));
    }
    Ok(())
}

/// Runs `f`, turning a panic (redb asserts on some damaged pages) into
/// [`StoreError::Damaged`] naming `path`.
pub(super) fn guard<T>(path: &Path, f: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
    caught(f).unwrap_or_else(|panic| Err(damaged(path, panic.as_ref())))
}

thread_local! {
    /// How many [`caught`] calls this thread is inside.
    static CATCHING: Cell<u32> = const { Cell::new(0) };
}

/// `catch_unwind` whose caught panics the process's panic hook does not
/// print: the caller reports each as an error of its own, so the raw
/// message and backtrace would only alarm (they go to the debug log).
pub(super) fn caught<T>(f: impl FnOnce() -> T) -> std::thread::Result<T> {
    static QUIET_HOOK: Once = Once::new();
    QUIET_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if CATCHING.with(Cell::get) > 0 {
                tracing::debug!(%info, "panic inside the store, reported as an error");
            } else {
                previous(info);
            }
        }));
    });
    CATCHING.with(|c| c.set(c.get() + 1));
    let result = catch_unwind(AssertUnwindSafe(f));
    CATCHING.with(|c| c.set(c.get() - 1));
    result
}

/// The error for a panic `payload` raised while reading or writing `path`.
pub(super) fn damaged(path: &Path, payload: &(dyn std::any::Any + Send)) -> StoreError {
    let detail = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    StoreError::Damaged { path: path.display().to_string(), detail }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_foreign_files_are_refused_and_a_missing_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ferry.redb");
        assert!(check_file(&path).is_ok());
        std::fs::write(&path, b"").unwrap();
        let e = check_file(&path).unwrap_err().to_string();
        assert!(e.contains("empty") && e.contains("ferry.redb"), "{e}");
        std::fs::write(&path, b"SQLite format 3\0 and more").unwrap();
        let e = check_file(&path).unwrap_err().to_string();
        assert!(e.contains("not a Ferry store"), "{e}");
        std::fs::write(&path, b"re").unwrap();
        assert!(check_file(&path).is_err());
    }

    #[test]
    fn a_panic_becomes_an_error_naming_the_file() {
        let r: Result<(), StoreError> = guard(Path::new("/data/ferry.redb"), || panic!("entered unreachable code"));
        let e = r.unwrap_err().to_string();
        assert!(e.contains("/data/ferry.redb") && e.contains("entered unreachable code"), "{e}");
    }

    #[test]
    fn a_deleted_or_replaced_file_is_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"x").unwrap();
        // Held open as the store holds its file, so its inode is not reused.
        let _open = std::fs::File::open(&path).unwrap();
        let id = FileIdentity::of(&path).unwrap();
        assert_eq!(id.lost(&path), None);
        std::fs::remove_file(&path).unwrap();
        assert!(id.lost(&path).unwrap().contains("deleted"));
        std::fs::write(dir.path().join("g"), b"y").unwrap();
        std::fs::rename(dir.path().join("g"), &path).unwrap();
        assert!(id.lost(&path).unwrap().contains("replaced"));
    }
}
