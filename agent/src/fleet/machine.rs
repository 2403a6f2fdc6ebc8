//! The pure core of the update state machine: from one plugin's persisted
//! state and what arrived (a manifest, a chunk, its probation counters), what
//! to do, and how the state moves. No I/O, clock or running plugin: the
//! updater performs what these decide, and the tests below cover every rule
//! without a broker, a disk or a component.
//!
//! The rules: versions only go up; a version refused for good (its hash,
//! world, checks, shadow run or probation failed after its signature
//! verified) is never tried again; the same version from two clouds is one
//! download; a bad chunk costs that chunk, not the download.

use std::collections::BTreeSet;

use ed25519_dalek::VerifyingKey;

use super::bundle::{Chunk, Manifest};
use super::staging::{Installed, Persisted};
use crate::config::FleetConfig;
use crate::plugin::{PluginStatus, World};

/// Why a candidate is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// One line, reported to the fleet manager.
    pub reason: String,
    /// Whether the version itself is bad (never tried again), as opposed to
    /// a message that a good one may follow (a bad chunk, a forged manifest).
    pub permanent: bool,
}

impl Refusal {
    /// A refusal of this message only.
    pub fn transient(reason: impl ToString) -> Self {
        Self { reason: reason.to_string(), permanent: false }
    }

    /// A refusal of the version for good.
    pub fn permanent(reason: impl ToString) -> Self {
        Self { reason: reason.to_string(), permanent: true }
    }
}

/// What to do with a manifest addressed to this device, for a plugin it has.
#[derive(Debug)]
pub enum OnManifest {
    /// Nothing: that version is running or downloading (the same push from
    /// another cloud), or was refused for good before (its retained
    /// manifest comes back on every connection).
    Ignore,
    /// Refuse it and report why.
    Refuse {
        /// The version, when the manifest could be read.
        candidate: Option<u64>,
        /// Why.
        refusal: Refusal,
    },
    /// Download it: it becomes the target, replacing an older one.
    Download {
        /// The verified manifest.
        manifest: Manifest,
        /// The id of the trusted key that signed it.
        signer: String,
    },
}

/// Decides on `payload`, published as the manifest of plugin `name` (of
/// `world`), against `state` and the `trusted` keys.
pub fn on_manifest(
    state: &Persisted,
    name: &str,
    world: World,
    trusted: &[VerifyingKey],
    payload: &[u8],
) -> OnManifest {
    let refuse = |candidate, refusal| OnManifest::Refuse { candidate, refusal };
    let manifest = match Manifest::from_json(payload) {
        Ok(m) => m,
        Err(e) => return refuse(None, Refusal::transient(e)),
    };
    let version = manifest.version;
    if manifest.name != name {
        let reason = format!("manifest names plugin `{}` but was published for `{name}`", manifest.name);
        return refuse(Some(version), Refusal::transient(reason));
    }
    let signer = match manifest.verify(trusted) {
        Ok(k) => k,
        Err(e) => return refuse(Some(version), Refusal::transient(e)),
    };
    let running = state.running();
    let target = state.target.as_ref().map(|t| t.version);
    if version == running || target == Some(version) || state.failed.contains_key(&version) {
        return OnManifest::Ignore;
    }
    if version < running {
        let reason = format!("version {version} is older than the running version {running}");
        return refuse(Some(version), Refusal::transient(reason));
    }
    if let Some(t) = target.filter(|&t| version < t) {
        let reason = format!("version {version} is older than version {t} being installed");
        return refuse(Some(version), Refusal::transient(reason));
    }
    if manifest.world() != Some(world) {
        let reason = format!(
            "the bundle targets the `{}` world but plugin `{name}` is a `{}` plugin",
            manifest.world,
            world.as_str()
        );
        return refuse(Some(version), Refusal::permanent(reason));
    }
    OnManifest::Download { manifest, signer }
}

/// What to do with a chunk published for `version`.
#[derive(Debug)]
pub enum OnChunk {
    /// Nothing: not of the version being downloaded, or already on disk.
    Ignore,
    /// Refuse this chunk (the download stays: a good copy completes it).
    Refuse(Refusal),
    /// Store it; the download is complete once `received` holds it too.
    Store(Chunk),
}

/// Decides on a chunk `payload` of `version` against the download in
/// `state`, with the chunk indexes `received` so far.
pub fn on_chunk(state: &Persisted, received: &BTreeSet<u32>, version: u64, payload: &[u8]) -> OnChunk {
    let Some(target) = state.target.as_ref().filter(|t| t.version == version) else { return OnChunk::Ignore };
    if payload.is_empty() {
        // A cleared retained message.
        return OnChunk::Ignore;
    }
    match Chunk::decode(payload).and_then(|c| c.check(target).map(|()| c)) {
        Ok(c) if received.contains(&c.header.index) => OnChunk::Ignore,
        Ok(c) => OnChunk::Store(c),
        Err(e) => OnChunk::Refuse(Refusal::transient(e)),
    }
}

/// Whether a download is complete.
pub fn complete(state: &Persisted, received: &BTreeSet<u32>) -> bool {
    state.target.as_ref().is_some_and(|t| received.len() as u32 == t.total())
}

/// Records a refusal of `candidate`. A permanent one marks the version as
/// failed, and drops its download if it was the target: returns whether
/// it did, so the chunks on disk go too.
pub fn refuse(state: &mut Persisted, candidate: Option<u64>, refusal: &Refusal) -> bool {
    let Some(v) = candidate.filter(|_| refusal.permanent) else { return false };
    state.failed.insert(v, refusal.reason.clone());
    if state.target.as_ref().is_some_and(|t| t.version == v) {
        state.target = None;
        return true;
    }
    false
}

/// Makes the downloaded target the active version, on probation until
/// `until_ms`; the version it replaces is kept for rollback.
pub fn activate(state: &mut Persisted, until_ms: u64) {
    let Some(manifest) = state.target.take() else { return };
    let installed = Installed { version: manifest.version, sha256: manifest.sha256 };
    state.previous = state.active.replace(installed);
    state.probation_until_ms = Some(until_ms);
}

/// How probation stands.
#[derive(Debug, Clone, PartialEq)]
pub enum Probation {
    /// Still running it.
    Continue,
    /// It ended without failing: the version stays.
    Passed,
    /// It fails above the configured rate, or opened its circuit: go back,
    /// for this reason.
    RollBack(String),
}

/// Judges the active version by its counters `status` since activation,
/// with probation ending at `until_ms`.
pub fn probation(status: &PluginStatus, config: &FleetConfig, until_ms: u64, now_ms: u64) -> Probation {
    let rate = if status.calls == 0 { 0.0 } else { status.failures as f64 / status.calls as f64 };
    let failing = status.failures >= config.rollback_min_failures && rate >= config.rollback_failure_rate;
    if failing || status.circuit_opened > 0 {
        let last = status.last_error.as_ref().map(|e| format!("; last: {e}")).unwrap_or_default();
        return Probation::RollBack(format!(
            "failed {} of {} calls on probation ({} traps, {} timeouts, {} out of memory){last}",
            status.failures, status.calls, status.traps, status.timeouts, status.out_of_memory
        ));
    }
    if now_ms >= until_ms { Probation::Passed } else { Probation::Continue }
}

/// Goes back from the failing active version to the previous one (or the
/// configured component), marking it failed for `reason`. Returns the
/// version rolled back from; `None` when no fleet version is active.
pub fn roll_back(state: &mut Persisted, reason: &str) -> Option<Installed> {
    let failed = state.active.take()?;
    state.failed.insert(failed.version, reason.to_owned());
    state.active = state.previous.take();
    state.probation_until_ms = None;
    Some(failed)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ed25519_dalek::SigningKey;

    use super::*;

    const COMPONENT: &[u8] = b"\0asm-like bytes of a component, in three chunks";

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[7; 32])
    }

    fn manifest(name: &str, version: u64, world: World) -> Manifest {
        Manifest::sign(name, version, world, COMPONENT, 16, &key()).unwrap()
    }

    fn json(m: &Manifest) -> Vec<u8> {
        serde_json::to_vec(m).unwrap()
    }

    fn trusted() -> Vec<VerifyingKey> {
        vec![key().verifying_key()]
    }

    fn running(version: u64) -> Persisted {
        let mut state = Persisted::default();
        if version > 0 {
            state.active = Some(Installed { version, sha256: "x".into() });
        }
        state
    }

    fn decide(state: &Persisted, payload: &[u8]) -> OnManifest {
        on_manifest(state, "th", World::Filter, &trusted(), payload)
    }

    fn refusal(d: OnManifest) -> (Option<u64>, Refusal) {
        match d {
            OnManifest::Refuse { candidate, refusal } => (candidate, refusal),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_newer_signed_manifest_for_the_right_plugin_and_world_is_downloaded() {
        match decide(&running(2), &json(&manifest("th", 3, World::Filter))) {
            OnManifest::Download { manifest, signer } => {
                assert_eq!(manifest.version, 3);
                assert_eq!(signer, crate::signing::key_id(&key().verifying_key()));
            }
            other => panic!("expected a download, got {other:?}"),
        }
    }

    #[test]
    fn versions_only_go_up() {
        let (candidate, r) = refusal(decide(&running(5), &json(&manifest("th", 4, World::Filter))));
        assert_eq!(candidate, Some(4));
        assert!(!r.permanent && r.reason.contains("older than the running version 5"), "{r:?}");

        let mut downloading = running(1);
        downloading.target = Some(manifest("th", 7, World::Filter));
        let (_, r) = refusal(decide(&downloading, &json(&manifest("th", 6, World::Filter))));
        assert!(r.reason.contains("older than version 7 being installed"), "{r:?}");
        // A newer one replaces the download.
        assert!(matches!(decide(&downloading, &json(&manifest("th", 8, World::Filter))), OnManifest::Download { .. }));
    }

    #[test]
    fn the_running_the_downloading_and_a_failed_version_are_ignored() {
        let m = manifest("th", 3, World::Filter);
        assert!(matches!(decide(&running(3), &json(&m)), OnManifest::Ignore));
        let mut downloading = running(1);
        downloading.target = Some(m.clone());
        assert!(matches!(decide(&downloading, &json(&m)), OnManifest::Ignore));
        let mut failed = running(1);
        failed.failed.insert(3, "checks failed".into());
        assert!(matches!(decide(&failed, &json(&m)), OnManifest::Ignore));
    }

    #[test]
    fn unsigned_foreign_misnamed_and_malformed_manifests_are_refused_for_that_message_only() {
        let stranger = SigningKey::from_bytes(&[9; 32]);
        let mut forged = manifest("th", 3, World::Filter);
        forged.resign(&stranger);
        let (_, r) = refusal(decide(&running(0), &json(&forged)));
        assert!(!r.permanent, "a forged manifest must not block the real one: {r:?}");

        let (_, r) = refusal(decide(&running(0), &json(&manifest("other", 3, World::Filter))));
        assert!(r.reason.contains("names plugin `other`") && !r.permanent, "{r:?}");

        let (candidate, r) = refusal(decide(&running(0), b"{not json"));
        assert_eq!(candidate, None);
        assert!(!r.permanent);
    }

    #[test]
    fn a_bundle_for_the_wrong_world_is_refused_for_good() {
        let (candidate, r) = refusal(decide(&running(0), &json(&manifest("th", 3, World::Merge))));
        assert_eq!(candidate, Some(3));
        assert!(r.permanent && r.reason.contains("targets the `merge` world"), "{r:?}");
    }

    #[test]
    fn chunks_of_the_target_are_stored_once_and_a_bad_one_costs_only_itself() {
        let m = manifest("th", 3, World::Filter);
        let chunks = Chunk::split(&m, COMPONENT);
        assert_eq!(chunks.len() as u32, m.total());
        let mut state = running(1);
        let mut received = BTreeSet::new();
        assert!(matches!(on_chunk(&state, &received, 3, &chunks[0].encode()), OnChunk::Ignore), "no download yet");
        state.target = Some(m.clone());
        assert!(matches!(on_chunk(&state, &received, 4, &chunks[0].encode()), OnChunk::Ignore), "another version");
        assert!(matches!(on_chunk(&state, &received, 3, b""), OnChunk::Ignore), "a cleared retained chunk");

        let mut bad = chunks[1].encode();
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        assert!(matches!(on_chunk(&state, &received, 3, &bad), OnChunk::Refuse(r) if !r.permanent));

        for c in &chunks {
            assert!(!complete(&state, &received));
            match on_chunk(&state, &received, 3, &c.encode()) {
                OnChunk::Store(stored) => assert!(received.insert(stored.header.index)),
                other => panic!("expected a store, got {other:?}"),
            }
        }
        assert!(matches!(on_chunk(&state, &received, 3, &chunks[0].encode()), OnChunk::Ignore), "a duplicate");
        assert!(complete(&state, &received));
    }

    #[test]
    fn a_permanent_refusal_marks_the_version_failed_and_drops_its_download() {
        let mut state = running(1);
        state.target = Some(manifest("th", 3, World::Filter));
        assert!(!refuse(&mut state, Some(3), &Refusal::transient("bad chunk")));
        assert!(state.target.is_some() && state.failed.is_empty());
        assert!(refuse(&mut state, Some(3), &Refusal::permanent("checks failed")));
        assert!(state.target.is_none());
        assert_eq!(state.failed.get(&3).map(String::as_str), Some("checks failed"));
        // A later manifest of that version is then ignored.
        assert!(matches!(decide(&state, &json(&manifest("th", 3, World::Filter))), OnManifest::Ignore));
    }

    #[test]
    fn activation_keeps_the_previous_version_and_rollback_returns_to_it() {
        let mut state = running(1);
        state.target = Some(manifest("th", 3, World::Filter));
        activate(&mut state, 10_000);
        assert_eq!(state.running(), 3);
        assert_eq!(state.previous.as_ref().map(|p| p.version), Some(1));
        assert_eq!((state.target.as_ref(), state.probation_until_ms), (None, Some(10_000)));

        let failed = roll_back(&mut state, "traps").unwrap();
        assert_eq!(failed.version, 3);
        assert_eq!(state.running(), 1);
        assert_eq!((state.previous.as_ref(), state.probation_until_ms), (None, None));
        assert!(state.failed.contains_key(&3));
        assert!(roll_back(&mut running(0), "x").is_none(), "nothing to roll back from");
    }

    #[test]
    fn probation_rolls_back_above_the_failure_rate_or_on_an_open_circuit_and_passes_in_time() {
        let config = FleetConfig {
            trusted_keys: trusted(),
            topic_root: "ferry/fleet".into(),
            destinations: vec![],
            probation: Duration::from_secs(60),
            rollback_failure_rate: 0.5,
            rollback_min_failures: 3,
            shadow_events: 100,
        };
        let status = |calls, failures, circuit_opened| PluginStatus {
            calls,
            failures,
            circuit_opened,
            ..PluginStatus::new("th", World::Filter)
        };
        assert_eq!(probation(&status(10, 2, 0), &config, 100, 50), Probation::Continue, "under the minimum");
        assert_eq!(probation(&status(10, 4, 0), &config, 100, 50), Probation::Continue, "under the rate");
        assert!(
            matches!(probation(&status(8, 4, 0), &config, 100, 50), Probation::RollBack(r) if r.contains("failed 4 of 8"))
        );
        assert!(matches!(probation(&status(100, 0, 1), &config, 100, 50), Probation::RollBack(_)), "an open circuit");
        assert_eq!(probation(&status(10, 1, 0), &config, 100, 100), Probation::Passed);
    }
}
