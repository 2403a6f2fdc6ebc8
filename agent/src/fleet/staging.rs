//! The durable side of fleet updates: one directory per plugin under
//! `{data_dir}/fleet/{name}/` holding
//!
//! - `state.json` — what runs, what ran before, the download in progress
//!   (its verified manifest), versions that failed for good, probation;
//! - `v{version}.wasm` — installed components (the active and the previous);
//! - `download/v{version}/{index}` — chunks received so far, each checked
//!   against the signed manifest before it is written.
//!
//! Every file is written to a temporary name, synced and renamed (then the
//! directory synced), so a crash or a SIGKILL leaves either the old file or
//! the new one. Chunks are checked again when a download resumes, so a file
//! damaged on disk is fetched again rather than installed. Blocking I/O:
//! callers run it off the async runtime.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::durable_file::write_atomically;

use super::bundle::{Chunk, ChunkHeader, Manifest, sha256_hex};
use super::report::Report;

/// One installed version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Installed {
    /// Its version.
    pub version: u64,
    /// Hex SHA-256 of the component.
    pub sha256: String,
}

/// `state.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Persisted {
    /// The running fleet version; `None`: the component in the config.
    pub active: Option<Installed>,
    /// What ran before `active` (kept for rollback); `None` with an
    /// active version: the configured component.
    pub previous: Option<Installed>,
    /// The download in progress: its manifest, verified on arrival.
    pub target: Option<Manifest>,
    /// Versions that failed after their signature verified (hash, world,
    /// checks, shadow, probation), with the reason; never tried again.
    #[serde(default)]
    pub failed: BTreeMap<u64, String>,
    /// Wall-clock ms until which the active version is on probation.
    pub probation_until_ms: Option<u64>,
    /// The latest report, published again after a restart.
    pub last: Option<Report>,
}

impl Persisted {
    /// The running version (0: the configured component).
    pub fn running(&self) -> u64 {
        self.active.as_ref().map_or(0, |a| a.version)
    }
}

/// One plugin's fleet directory.
#[derive(Debug, Clone)]
pub struct PluginDir {
    dir: PathBuf,
}

impl PluginDir {
    /// The directory of plugin `name` under `data_dir`.
    pub fn new(data_dir: &Path, name: &str) -> Self {
        Self { dir: data_dir.join("fleet").join(name) }
    }

    /// Reads `state.json` (empty state when there is none).
    pub fn load(&self) -> std::io::Result<Persisted> {
        match std::fs::read(self.dir.join("state.json")) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("state.json: {e}"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Persisted::default()),
            Err(e) => Err(e),
        }
    }

    /// Writes `state.json` durably.
    pub fn save(&self, state: &Persisted) -> std::io::Result<()> {
        write_atomically(&self.dir.join("state.json"), &serde_json::to_vec_pretty(state)?)
    }

    /// The component file of `version`.
    pub fn component(&self, version: u64) -> PathBuf {
        self.dir.join(format!("v{version}.wasm"))
    }

    /// Writes the component of `version` durably and returns its path.
    pub fn write_component(&self, version: u64, bytes: &[u8]) -> std::io::Result<PathBuf> {
        let path = self.component(version);
        write_atomically(&path, bytes)?;
        Ok(path)
    }

    fn download_dir(&self, version: u64) -> PathBuf {
        self.dir.join("download").join(format!("v{version}"))
    }

    /// Stores a chunk that passed [`Chunk::check`].
    pub fn store_chunk(&self, chunk: &Chunk) -> std::io::Result<()> {
        let path = self.download_dir(chunk.header.version).join(chunk.header.index.to_string());
        write_atomically(&path, &chunk.data)
    }

    /// The chunks of `manifest` already on disk, each checked again; a
    /// damaged file is removed so the chunk is fetched again.
    pub fn chunks_on_disk(&self, manifest: &Manifest) -> BTreeSet<u32> {
        let mut have = BTreeSet::new();
        for index in 0..manifest.total() {
            let path = self.download_dir(manifest.version).join(index.to_string());
            let Ok(data) = std::fs::read(&path) else { continue };
            let chunk = Chunk {
                header: ChunkHeader {
                    name: manifest.name.clone(),
                    version: manifest.version,
                    index,
                    total: manifest.total(),
                    size: data.len() as u32,
                    sha256: sha256_hex(&data),
                },
                data,
            };
            if chunk.check(manifest).is_ok() {
                have.insert(index);
            } else {
                tracing::warn!(path = %path.display(), "discarding a damaged downloaded chunk");
                let _ = std::fs::remove_file(&path);
            }
        }
        have
    }

    /// Concatenates the downloaded chunks of `manifest`.
    pub fn assemble(&self, manifest: &Manifest) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(manifest.size as usize);
        for index in 0..manifest.total() {
            out.extend(std::fs::read(self.download_dir(manifest.version).join(index.to_string()))?);
        }
        Ok(out)
    }

    /// Removes every download (finished, abandoned or superseded).
    pub fn clear_downloads(&self) {
        let _ = std::fs::remove_dir_all(self.dir.join("download"));
    }

    /// Removes component files other than those of `keep`.
    pub fn prune(&self, keep: &[u64]) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(version) = name
                .to_str()
                .and_then(|n| n.strip_prefix('v'))
                .and_then(|n| n.strip_suffix(".wasm"))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            if !keep.contains(&version) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// The component a restart should load for plugin `name`: the active fleet
/// version's file, if one was installed under `data_dir` and is intact.
pub fn installed_component(data_dir: &Path, name: &str) -> Option<(u64, PathBuf)> {
    let dir = PluginDir::new(data_dir, name);
    let state = dir.load().ok()?;
    let active = state.active?;
    let path = dir.component(active.version);
    let bytes = std::fs::read(&path).ok()?;
    if sha256_hex(&bytes) != active.sha256 {
        tracing::error!(plugin = name, path = %path.display(), "installed component is damaged; using the configured one");
        return None;
    }
    Some((active.version, path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::plugin::World;
    use ed25519_dalek::SigningKey;

    #[test]
    fn a_download_resumes_from_the_chunks_on_disk_and_drops_damaged_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = PluginDir::new(tmp.path(), "p");
        let component: Vec<u8> = (0..100u8).collect();
        let m = Manifest::sign("p", 1, World::Filter, &component, 30, &SigningKey::from_bytes(&[1; 32])).unwrap();
        let chunks = Chunk::split(&m, &component);
        dir.store_chunk(&chunks[0]).unwrap();
        dir.store_chunk(&chunks[2]).unwrap();
        assert_eq!(dir.chunks_on_disk(&m), BTreeSet::from([0, 2]));
        std::fs::write(dir.download_dir(1).join("2"), b"bad").unwrap();
        assert_eq!(dir.chunks_on_disk(&m), BTreeSet::from([0]));
        for c in &chunks[1..] {
            dir.store_chunk(c).unwrap();
        }
        assert_eq!(dir.assemble(&m).unwrap(), component);
    }

    #[test]
    fn state_round_trips_and_names_the_installed_component() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = PluginDir::new(tmp.path(), "p");
        assert_eq!(dir.load().unwrap().running(), 0);
        dir.write_component(4, b"wasm").unwrap();
        let state =
            Persisted { active: Some(Installed { version: 4, sha256: sha256_hex(b"wasm") }), ..Persisted::default() };
        dir.save(&state).unwrap();
        assert_eq!(dir.load().unwrap().running(), 4);
        assert_eq!(installed_component(tmp.path(), "p").unwrap().0, 4);
        std::fs::write(dir.component(4), b"tampered").unwrap();
        assert!(installed_component(tmp.path(), "p").is_none());
        dir.prune(&[]);
        assert!(!dir.component(4).exists());
    }
}
