//! Durable whole-file writes for the files the agent keeps beside its store
//! (compiled plugin artifacts, staged fleet downloads): a reader sees the old
//! contents or the new, never a torn file, across a crash or power cut.

use std::io::Write;
use std::path::Path;

/// Replaces `path` with `bytes`: written to a temporary file beside it,
/// fsynced, renamed over it, and the directory fsynced so the rename lasts.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
