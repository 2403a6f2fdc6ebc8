//! What the host's bounds and output checks cost a call: for each example
//! filter at batch 1,024, the time per event of a whole call (the plugin,
//! the output bound, and the checks that turn its verdicts into decisions)
//! and, measured in the same process and interleaved with it, the time of
//! those checks alone (`convert::decide` on the same verdicts). The ratio
//! `call / (call - checks)` is what the checks add to an unchecked call;
//! issue 18's target is at most 1.05. The output bound itself is wasmtime's
//! hostcall fuel, which wasmtime counts on every call whatever its value,
//! so it adds nothing here.
//!
//! Needs `scripts/build-plugins.sh` first. Run:
//! `cargo bench -p ferry --bench plugin_bounds` (`FERRY_BENCH_SECS` sets
//! the seconds per measurement, default 2).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry::plugin::check::{self, CheckOptions};
use ferry::plugin::convert::{self, ContractOnly, Decision};
use ferry::plugin::inputs::Gen;
use ferry::plugin::{Verdict, WitEvent, World};

/// Issue 18: the bounds add at most 5% to a call at batch 1,024.
const TARGET_RATIO: f64 = 1.05;

const BATCH: usize = 1024;

/// (component in plugins/build, label, config entries).
type Case = (&'static str, &'static str, &'static [(&'static str, &'static str)]);

/// The verdicts a filter returned, rebuilt from its decisions, so the
/// checks can be run on them again.
fn verdicts(inputs: &[WitEvent], decisions: &[Decision]) -> Vec<Verdict> {
    decisions
        .iter()
        .zip(inputs)
        .map(|(d, input)| match d {
            Decision::Keep => Verdict::Keep,
            Decision::Drop => Verdict::Drop,
            Decision::Route(names) => Verdict::Route(names.clone()),
            Decision::Replace(bodies) => {
                Verdict::Replace(bodies.iter().map(|b| convert::to_wit(b, input.sequence, input.hlc)).collect())
            }
        })
        .collect()
}

/// Runs `f` for at least `min_time`, returning the mean time per call.
fn mean(min_time: Duration, mut f: impl FnMut()) -> Duration {
    let started = Instant::now();
    let mut calls = 0u32;
    while calls < 10 || started.elapsed() < min_time {
        f();
        calls += 1;
    }
    started.elapsed() / calls
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../plugins/build");
    let secs: f64 = std::env::var("FERRY_BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(2.0);
    let min_time = Duration::from_secs_f64(secs / 3.0);
    let cases: [Case; 5] = [
        ("threshold-filter", "threshold-filter (drops some)", &[("field", "temp"), ("min", "20")]),
        ("redact-transform", "redact-transform (keeps all)", &[("fields", "secret,reading.celsius")]),
        ("redact-transform", "redact-transform (replaces all)", &[("fields", "temp")]),
        ("prefix-filter", "prefix-filter (reads subjects)", &[("prefixes", "debug/,telemetry/raw/")]),
        ("subject-router", "subject-router (routes some)", &[("route.alerts/", "cloud-a,cloud-b")]),
    ];
    println!("batch {BATCH}, per event; checks = convert::decide on the call's own verdicts");
    let mut worst: f64 = 0.0;
    for (file, label, config) in cases {
        let path = root.join(format!("{file}.wasm"));
        assert!(path.is_file(), "{} is missing: run scripts/build-plugins.sh first", path.display());
        let options = CheckOptions {
            world: Some(World::Filter),
            config: config.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            ..CheckOptions::default()
        };
        let cache = tempfile::tempdir().unwrap();
        let mut plugin = check::load(&path, &options, Some(cache.path())).expect("loading the plugin");
        let events: Arc<Vec<WitEvent>> = check::bench_batch(&mut Gen::new(7), BATCH);
        let decisions = plugin.filter(&events).expect("a call");
        let raw = verdicts(&events, &decisions);
        // Interleaved rounds, so both measures see the same machine.
        let (mut call, mut checks) = (Duration::ZERO, Duration::ZERO);
        for _ in 0..3 {
            call += mean(min_time, || drop(plugin.filter(&events).expect("a call")));
            let cloning = mean(min_time, || drop(std::hint::black_box(raw.clone())));
            let checking = mean(min_time, || {
                drop(convert::decide(&events, std::hint::black_box(raw.clone()), &ContractOnly).expect("valid"))
            });
            checks += checking.saturating_sub(cloning);
        }
        let per_event = |d: Duration| d.as_nanos() as f64 / 3.0 / BATCH as f64;
        let (call, checks) = (per_event(call), per_event(checks));
        let ratio = call / (call - checks);
        worst = worst.max(ratio);
        println!(
            "{label:<34} call {call:>8.1} ns   checks {checks:>6.1} ns   call / unchecked call {ratio:.3}  {}",
            if ratio <= TARGET_RATIO { "meets" } else { "MISSES" }
        );
    }
    println!("worst ratio {worst:.3} (target ≤ {TARGET_RATIO})");
}
