//! Healing: the checks before each commit (the store's file is still
//! there, the free-disk reserve), and closing the database after a failed
//! write and reopening it with backoff until a probe write succeeds.

use super::*;

/// Bytes available to this process on the file system holding `dir`.
fn free_disk_bytes(dir: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a valid C string and `stat` is written by statvfs before it is read.
    let rc = unsafe { libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled the struct.
    let stat = unsafe { stat.assume_init() };
    // The field types are 32-bit on some targets.
    #[allow(clippy::useless_conversion)]
    Some(u64::from(stat.f_bavail).saturating_mul(u64::from(stat.f_frsize)))
}

impl Writer {
    /// Notices the store file vanishing (deleted, or replaced by another),
    /// once: from then on appends are refused (see [`StoreHealth::Vanished`]).
    pub(super) fn check_file(&mut self) {
        if self.vanished.is_some() {
            return;
        }
        let Some(reason) = self.identity.and_then(|id| id.lost(&self.shared.path)) else { return };
        tracing::error!(path = %self.shared.path.display(), "{reason}");
        self.shared.set_health(StoreHealth::Vanished { reason: reason.clone() });
        self.vanished = Some(reason);
    }

    /// Reads the free space on the store's file system (once per commit,
    /// so another process filling the disk is noticed at the next write).
    pub(super) fn check_disk(&mut self) {
        if self.config.min_free_disk_bytes == 0 {
            return;
        }
        let dir = self.shared.path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
        self.disk_free = free_disk_bytes(dir).unwrap_or(u64::MAX);
        let reserve = self.config.min_free_disk_bytes;
        if self.vanished.is_none() && self.fault.is_none() {
            let health = if self.disk_free < reserve {
                StoreHealth::DiskLow { free_bytes: self.disk_free, reserve_bytes: reserve }
            } else {
                StoreHealth::Ok
            };
            let low = !health.is_ok();
            if self.shared.set_health(health) {
                if low {
                    tracing::warn!(
                        free = self.disk_free,
                        reserve,
                        "disk nearly full: ingest refused until space frees up"
                    );
                } else {
                    tracing::info!(free = self.disk_free, "disk space recovered: ingest resumes");
                }
            }
        }
    }

    /// A write failed with `reason`: close the database so it can be
    /// reopened, and say so (logged when the failure starts and then at
    /// most once a minute).
    pub(super) fn fail(&mut self, reason: String) {
        // What the file holds is no longer known for sure.
        self.saved_meta = None;
        let now = Instant::now();
        let since_ms = self.clock.now_millis();
        let fault = self.fault.get_or_insert_with(|| Fault {
            reason: reason.clone(),
            since_ms,
            attempts: 0,
            next_try: now,
            last_logged: now - FAULT_LOG_INTERVAL,
        });
        fault.reason = reason;
        let backoff = HEAL_BACKOFF_BASE.saturating_mul(1 << fault.attempts.min(16)).min(HEAL_BACKOFF_CAP);
        fault.next_try = now + backoff;
        if fault.last_logged.elapsed() >= FAULT_LOG_INTERVAL {
            fault.last_logged = now;
            tracing::error!(
                path = %self.shared.path.display(),
                error = %fault.reason,
                attempts = fault.attempts,
                retry_in = ?backoff,
                "store write failed: ingest refused while the store reopens"
            );
        }
        self.shared.set_health(StoreHealth::Failing {
            reason: fault.reason.clone(),
            since_ms: fault.since_ms,
            attempts: fault.attempts,
        });
        self.close();
        // Readers go on from the store as it is on disk, read without
        // writing, until a reopen can write again.
        if let Some(reopen) = &self.reopen
            && let Ok(db) = guard(&self.shared.path, || reopen.peek())
        {
            self.shared.put_read_only(Arc::new(db));
        }
    }

    /// Drops every handle to the database: readers lose it at once, and the
    /// writer waits (briefly) for reads in progress to let go.
    pub(super) fn close(&mut self) {
        let ours = self.db.take();
        let theirs = self.shared.take();
        drop(theirs);
        if let Some(db) = ours {
            let deadline = Instant::now() + READERS_GRACE;
            while Arc::strong_count(&db) > 1 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    /// Reopens the store when the backoff allows.
    pub(super) fn try_heal(&mut self) {
        if self.fault.as_ref().is_some_and(|f| Instant::now() >= f.next_try) {
            self.try_heal_now();
        }
    }

    /// Reopens the store and probes it with a write; on success readers get
    /// the new database back and health is `Ok` again.
    pub(super) fn try_heal_now(&mut self) {
        let Some(reopen) = &self.reopen else {
            if let Some(f) = &mut self.fault {
                // A caller's backend cannot be reopened: stay refused.
                f.next_try = Instant::now() + HEAL_BACKOFF_CAP;
            }
            return;
        };
        if let Some(f) = &mut self.fault {
            f.attempts += 1;
        }
        let path = self.shared.path.clone();
        let opened = guard(&path, || {
            let db = reopen.open()?;
            let meta =
                load(&db).map_err(|e| StoreError::Open { path: path.display().to_string(), source: Box::new(e) })?;
            Ok((db, meta))
        });
        match opened {
            Ok((db, meta)) => {
                self.hlc = HlcState::resume(Hlc(meta.hlc.max(self.hlc.high_water().0)));
                self.meta = meta;
                let db = Arc::new(db);
                self.shared.put(db.clone());
                self.db = Some(db);
                self.committed.send_replace(self.meta.next_sequence - 1);
                self.recovered();
            }
            Err(e) => self.fail(e.to_string()),
        }
    }

    /// The commit count of the store as it is on disk, read without writing.
    pub(super) fn peek_commits(&self) -> Result<u64, StoreError> {
        // After `fail`, readers hold the store as it is on disk, read without writing.
        let db = self.shared.db()?;
        guard(&self.shared.path, || {
            let txn = db.begin_read().map_err(crate::store::storage)?;
            let meta = Meta::load(&txn.open_table(tables::META).map_err(crate::store::storage)?)
                .map_err(crate::store::storage)?;
            Ok(meta.commits)
        })
    }

    /// A write or reopen succeeded: clear the fault and say so.
    pub(super) fn recovered(&mut self) {
        if let Some(f) = self.fault.take() {
            tracing::info!(
                path = %self.shared.path.display(),
                attempts = f.attempts,
                "store writes again: ingest resumes"
            );
            let health = match &self.vanished {
                Some(reason) => StoreHealth::Vanished { reason: reason.clone() },
                None => StoreHealth::Ok,
            };
            self.shared.set_health(health);
        }
    }

    /// A refusal if the file system is below the free-space reserve (as read
    /// at this commit), so the agent never fills the disk even when the
    /// quota is set too high for it.
    pub(super) fn disk_refusal(&self) -> Option<AppendError> {
        let (free, reserve) = (self.disk_free, self.config.min_free_disk_bytes);
        (free < reserve).then_some(AppendError::DiskFull { free, reserve, retry_after: FULL_RETRY_AFTER })
    }
}
