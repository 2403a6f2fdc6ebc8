//! The agent's footprint outside the comparison load: RSS when idle, and
//! start-up on a store with a large backlog.
//!
//! Rows:
//! - idle: the agent on the default config (HTTP API, no destinations), RSS
//!   once it listens and again after a few seconds;
//! - start-up with a backlog of 0, a quarter of and `FERRY_FOOTPRINT_BACKLOG`
//!   undelivered events (default 1,000,000 of 256 bytes) for one destination
//!   that is down: time from spawn to listening (the store opened, the
//!   forwarder started), RSS then and a few seconds later, after a clean
//!   stop (SIGTERM) and after a SIGKILL (the store must be checked).
//!   Targets: under 1 s, and RSS flat in the backlog's size.
//!
//! Peak RSS under load is a row of the comparison bench (`--bench compare`).
//!
//! Run: `cargo bench -p ferry-tests --bench footprint`. `FERRY_FOOTPRINT_AGENT`
//! runs another build instead of the one built with this bench: a firmware
//! build under qemu-user through a wrapper script that `exec`s it, so the
//! process measured is the agent's (docs/benchmarks.md#footprint). Under
//! qemu-user RSS is also given for the guest's own mappings.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry::clock::SystemClock;
use ferry::config::StoreConfig;
use ferry::store::{Dedup, PreparedEvent, Store};
use ferry_tests::workload::{proc_stats, stored_event_body};
use ferry_tests::{FerryProcess, ferry_bin, write_config_with};

/// Bytes of each event's data.
const PAYLOAD: usize = 256;

/// How long RSS is left to settle before the second reading.
const SETTLE: Duration = Duration::from_secs(3);

fn agent() -> PathBuf {
    std::env::var_os("FERRY_FOOTPRINT_AGENT").map_or_else(|| ferry_bin!().to_owned(), PathBuf::from)
}

/// Mappings below this address are the guest's when the agent runs under
/// qemu-user: it places a 64-bit guest's image, libraries and anonymous
/// memory there, and its own above.
const QEMU_GUEST_LIMIT: u64 = 1 << 40;

/// RSS in MiB: of the process, and under qemu-user also of the guest's
/// mappings alone (the emulator's translation cache and heap left out).
fn rss_mib(pid: u32) -> String {
    let total = proc_stats(pid).map_or(0.0, |s| s.rss_kib as f64 / 1024.0);
    let emulated = std::fs::read_link(format!("/proc/{pid}/exe"))
        .is_ok_and(|exe| exe.file_name().is_some_and(|n| n.to_string_lossy().starts_with("qemu-")));
    if !emulated {
        return format!("{total:.1}");
    }
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let (mut guest_kib, mut start) = (0u64, u64::MAX);
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ')
            && let Some((from, _)) = range.split_once('-')
            && let Ok(from) = u64::from_str_radix(from, 16)
        {
            start = from;
        } else if let Some(kib) = line.strip_prefix("Rss:")
            && start < QEMU_GUEST_LIMIT
        {
            guest_kib += kib.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap_or(0);
        }
    }
    format!("{total:.1} (guest {:.1})", guest_kib as f64 / 1024.0)
}

/// Fills the store in `dir` with `n` events, written as fast as the store takes them.
async fn fill(dir: &Path, n: usize) {
    let mut config = StoreConfig::at(dir.join("data").join("ferry.redb"));
    config.durability = ferry::config::Durability::None;
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let store = Store::open(config, std::sync::Arc::new(SystemClock)).unwrap();
    for start in (0..n).step_by(10_000) {
        let batch = (start..(start + 10_000).min(n))
            .map(|i| PreparedEvent::new(&stored_event_body(i, PAYLOAD), Dedup::None, 100, None))
            .collect();
        store.append(batch).await.unwrap();
    }
    store.close();
}

/// A port nothing listens on: the destination stays down.
fn dead_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts the agent on `config`; returns it and how long it took to listen.
fn start(config: &Path) -> (FerryProcess, Duration) {
    let t0 = Instant::now();
    let agent = FerryProcess::start(&agent(), config).unwrap();
    (agent, t0.elapsed())
}

fn main() {
    let backlog: usize =
        std::env::var("FERRY_FOOTPRINT_BACKLOG").ok().and_then(|s| s.parse().ok()).unwrap_or(1_000_000);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    println!("agent: {}", agent().display());

    let dir = tempfile::tempdir().unwrap();
    let config = write_config_with(dir.path(), "", "");
    let (a, took) = start(&config);
    let first = rss_mib(a.pid());
    std::thread::sleep(SETTLE);
    println!(
        "idle, default config: listening after {:.0} ms, RSS {first} MiB, {} MiB after {} s (target <= 15 MB = 14.3 MiB)",
        took.as_secs_f64() * 1e3,
        rss_mib(a.pid()),
        SETTLE.as_secs()
    );
    drop(a.terminate());

    println!(
        "\n| backlog (events) | store file MiB | the store was last closed by | start-up to listening (ms) | RSS at start (MiB) | RSS {} s later (MiB) |",
        SETTLE.as_secs()
    );
    println!("|---:|---:|---|---:|---:|---:|");
    for n in [0, backlog / 4, backlog] {
        let dir = tempfile::tempdir().unwrap();
        rt.block_on(fill(dir.path(), n));
        let destination = format!(
            "[[destination]]\nname = \"down\"\nurl = \"mqtt://127.0.0.1:{}\"\nprotocol = \"v311\"\nstart = \"earliest\"\n",
            dead_port()
        );
        let config = write_config_with(dir.path(), "", &destination);
        let file_mib =
            std::fs::metadata(dir.path().join("data/ferry.redb")).map_or(0.0, |m| m.len() as f64 / f64::from(1 << 20));
        // The first start places the destination's cursor; then the two ways to stop.
        for before in ["the filling process", "SIGTERM", "SIGKILL"] {
            let (a, took) = start(&config);
            let at_start = rss_mib(a.pid());
            std::thread::sleep(SETTLE);
            let later = rss_mib(a.pid());
            println!("| {n} | {file_mib:.0} | {before} | {:.0} | {at_start} | {later} |", took.as_secs_f64() * 1e3);
            if before == "SIGTERM" {
                a.kill();
            } else {
                drop(a.terminate());
            }
        }
    }
}
