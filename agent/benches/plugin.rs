//! Plugin call overhead: per-event cost of a trivial filter at batch sizes
//! 1, 64 and 1024, and cold start (compile + instantiate) versus cached
//! start (deserialise the cached artifact + instantiate).
//!
//! The trivial filter is the C example `prefix-filter` with no prefixes: it
//! keeps every event without reading any attribute, so what is measured is
//! the host crossing (lending the batch, the call, lifting the verdicts).
//! A second pass configures a prefix, so the filter reads each event's
//! subject: the cost of one attribute read per event. Needs
//! `scripts/build-plugins.sh c` first.
//! Run: `cargo bench -p ferry --bench plugin` (`FERRY_BENCH_PLUGIN` picks
//! another component, `FERRY_BENCH_SECS` the seconds per batch size).

use std::path::PathBuf;
use std::time::Duration;

use ferry::plugin::check::{self, CheckOptions};

/// Targets from issue 4.
const TARGET_PER_EVENT_AT_1024: Duration = Duration::from_nanos(300);
const TARGET_CACHED_START: Duration = Duration::from_millis(10);

fn main() {
    let path = std::env::var_os("FERRY_BENCH_PLUGIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../plugins/build/prefix-filter.wasm"));
    assert!(path.is_file(), "{} is missing: run scripts/build-plugins.sh c first", path.display());
    let secs: f64 = std::env::var("FERRY_BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(2.0);
    let scratch = tempfile::tempdir().unwrap();
    let min_time = Duration::from_secs_f64(secs);
    let report = check::bench(&path, &CheckOptions::default(), scratch.path(), &[1, 64, 1024], min_time)
        .expect("benchmarking the plugin");

    println!("plugin: {} ({} world)", path.display(), report.world.as_str());
    println!("cold start   (compile + instantiate): {:>10.2?}", report.cold_start);
    let verdict = |ok: bool| if ok { "meets" } else { "MISSES" };
    println!(
        "cached start (load + instantiate):    {:>10.2?}  {} target {:?} ({:.0}x faster than cold)",
        report.cached_start,
        verdict(report.cached_start <= TARGET_CACHED_START),
        TARGET_CACHED_START,
        report.cold_start.as_secs_f64() / report.cached_start.as_secs_f64()
    );
    let single = report.timings.first().map(|t| t.per_event);
    for t in &report.timings {
        let amortised = single.map_or(1.0, |s| s.as_secs_f64() / t.per_event.as_secs_f64());
        print!(
            "batch {:>5}: {:>9.0?} per event, {:>10.2?} per call, {:>8} calls, {amortised:>5.1}x cheaper per event than batch 1",
            t.batch, t.per_event, t.per_call, t.calls
        );
        if t.batch == 1024 {
            print!("  {} target {:?}", verdict(t.per_event <= TARGET_PER_EVENT_AT_1024), TARGET_PER_EVENT_AT_1024);
        }
        println!();
    }

    let mut reading = CheckOptions::default();
    reading.config.insert("prefixes".into(), "debug/".into());
    let report = check::bench(&path, &reading, scratch.path(), &[1024], min_time).expect("benchmarking the plugin");
    for t in &report.timings {
        println!(
            "batch {:>5}, reading each subject (prefixes = \"debug/\"): {:>9.0?} per event, {:>10.2?} per call",
            t.batch, t.per_event, t.per_call
        );
    }
}
