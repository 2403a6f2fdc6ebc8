//! A redb storage backend that reads a store and keeps every write in
//! memory, so a store can be opened exactly as the agent would (repairing
//! a file that was not closed cleanly) without changing a byte of it:
//! `ferry store inspect|verify` read files this way, and the writer reads
//! its own store this way after a failed commit, to learn whether the
//! commit reached the disk while the disk is still failing.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::sync::Mutex;

use redb::StorageBackend;

/// A store's bytes, read-only, under the writes made since it was opened.
#[derive(Debug)]
pub(super) struct OverlayBackend<B> {
    base: B,
    state: Mutex<Overlay>,
}

/// A file read through `pread`, for [`OverlayBackend`]: it never writes.
#[derive(Debug)]
pub(super) struct ReadOnlyFile(File);

impl StorageBackend for ReadOnlyFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.0.read_exact_at(out, offset)
    }

    fn set_len(&self, _: u64) -> io::Result<()> {
        Err(io::Error::new(io::ErrorKind::PermissionDenied, "read-only"))
    }

    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }

    fn write(&self, _: u64, _: &[u8]) -> io::Result<()> {
        Err(io::Error::new(io::ErrorKind::PermissionDenied, "read-only"))
    }
}

#[derive(Debug)]
struct Overlay {
    len: u64,
    /// Offset → bytes written there, non-overlapping.
    writes: BTreeMap<u64, Vec<u8>>,
}

impl OverlayBackend<ReadOnlyFile> {
    /// The file at `path`, never written.
    pub(super) fn open(path: &Path) -> io::Result<Self> {
        Self::over(ReadOnlyFile(File::open(path)?))
    }
}

impl<B: StorageBackend> OverlayBackend<B> {
    /// `base`, whose writes go to memory from now on.
    pub(super) fn over(base: B) -> io::Result<Self> {
        let len = base.len()?;
        Ok(Self { base, state: Mutex::new(Overlay { len, writes: BTreeMap::new() }) })
    }
}

impl Overlay {
    /// Removes the parts of earlier writes that `[start, end)` covers.
    fn carve(&mut self, start: u64, end: u64) {
        let touching: Vec<u64> =
            self.writes.range(..end).filter(|(o, d)| **o + d.len() as u64 > start).map(|(o, _)| *o).collect();
        for o in touching {
            let d = self.writes.remove(&o).expect("listed");
            let d_end = o + d.len() as u64;
            if o < start {
                self.writes.insert(o, d[..(start - o) as usize].to_vec());
            }
            if d_end > end {
                self.writes.insert(end, d[(end - o) as usize..].to_vec());
            }
        }
    }
}

impl<B: StorageBackend> StorageBackend for OverlayBackend<B> {
    fn len(&self) -> io::Result<u64> {
        Ok(self.state.lock().expect("overlay lock").len)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let state = self.state.lock().expect("overlay lock");
        let end = offset + out.len() as u64;
        if end > state.len {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end"));
        }
        // The base first (zeros past its end), then the writes over it.
        let base_len = self.base.len()?;
        out.fill(0);
        if offset < base_len {
            let n = (base_len - offset).min(out.len() as u64) as usize;
            self.base.read(offset, &mut out[..n])?;
        }
        for (o, d) in state.writes.range(..end) {
            let d_end = o + d.len() as u64;
            if d_end <= offset {
                continue;
            }
            let from = offset.max(*o);
            let to = end.min(d_end);
            out[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&d[(from - o) as usize..(to - o) as usize]);
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut state = self.state.lock().expect("overlay lock");
        if len < state.len {
            state.carve(len, u64::MAX);
            // What was cut off reads as zeros if the store grows again.
            let base_len = self.base.len()?;
            if len < base_len {
                state.writes.insert(len, vec![0; (base_len - len) as usize]);
            }
        }
        state.len = len;
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let mut state = self.state.lock().expect("overlay lock");
        let end = offset + data.len() as u64;
        state.carve(offset, end);
        state.writes.insert(offset, data.to_vec());
        state.len = state.len.max(end);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_read_back_over_the_file_and_never_reach_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"0123456789").unwrap();
        let b = OverlayBackend::open(&path).unwrap();
        b.write(2, b"ab").unwrap();
        b.write(3, b"XYZ").unwrap();
        b.write(12, b"!").unwrap();
        let mut out = [0u8; 13];
        b.read(0, &mut out).unwrap();
        assert_eq!(&out, b"01aXYZ6789\0\0!");
        b.set_len(4).unwrap();
        b.set_len(6).unwrap();
        let mut out = [0u8; 6];
        b.read(0, &mut out).unwrap();
        assert_eq!(&out, b"01aX\0\0");
        assert_eq!(std::fs::read(&path).unwrap(), b"0123456789", "the file is unchanged");
    }
}
