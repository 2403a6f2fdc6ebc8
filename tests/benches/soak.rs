//! The soak run (see `ferry_tests::soak`): steady load, a cloud link that
//! flaps, the agent restarted every few minutes; RSS, fds and store file size
//! must stay flat and within the quota, and nothing acknowledged may be lost.
//!
//! Run: `cargo bench -p ferry-tests --bench soak`. Environment (seconds
//! unless noted): `FERRY_SOAK_SECS` (default 600), `FERRY_SOAK_FLAP_SECS`
//! (30), `FERRY_SOAK_RESTART_SECS` (180), `FERRY_SOAK_RATE` (events/s, 1000),
//! `FERRY_SOAK_QUOTA_MIB` (256), `FERRY_SOAK_CACHE_MIB` (the store's page
//! cache, `store.cache_size`, 8). Exits non-zero if a check fails.
//!
//! The cache is small by default because the RSS check looks for leaks: the
//! agent's default 64 MiB cache fills over a long outage (and on recovery
//! after a SIGKILL), which looks like growth of that size.

use std::time::Duration;

use ferry_tests::soak::{self, SoakConfig};

fn env(name: &str, default: f64) -> f64 {
    match std::env::var(name) {
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

fn main() {
    let cfg = SoakConfig {
        duration: Duration::from_secs_f64(env("FERRY_SOAK_SECS", 600.0)),
        flap_every: Duration::from_secs_f64(env("FERRY_SOAK_FLAP_SECS", 30.0)),
        restart_every: Duration::from_secs_f64(env("FERRY_SOAK_RESTART_SECS", 180.0)),
        rate: env("FERRY_SOAK_RATE", 1000.0),
        quota_bytes: env("FERRY_SOAK_QUOTA_MIB", 256.0) as u64 * 1024 * 1024,
        cache_bytes: Some(env("FERRY_SOAK_CACHE_MIB", 8.0) as u64 * 1024 * 1024),
        sample_every: Duration::from_secs(5),
        producer_workers: 16,
    };
    println!("soak: {cfg:?}");
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let report = rt.block_on(soak::run(ferry_tests::ferry_bin!(), cfg)).expect("soak run");
    println!("  at_s  agent  rss_MiB  fds  store_MiB");
    for s in &report.samples {
        println!(
            "{:6.0} {:6} {:8.1} {:4} {:10.1}",
            s.at_secs,
            s.incarnation,
            s.rss_kib as f64 / 1024.0,
            s.fds,
            s.file_bytes as f64 / (1024.0 * 1024.0)
        );
    }
    let ((rss0, fd0), (rss1, fd1)) = report.first_and_last();
    println!(
        "restarts {}, link flaps {}, acknowledged {}, missing A/B {:?}, duplicates A/B {:?}",
        report.restarts, report.flaps, report.acknowledged, report.missing, report.duplicates
    );
    println!(
        "RSS first/last agent {:.1}/{:.1} MiB, fds {:.1}/{:.1}, store file max {:.1} MiB of a {:.0} MiB quota",
        rss0 / 1024.0,
        rss1 / 1024.0,
        fd0,
        fd1,
        report.max_file_bytes() as f64 / (1024.0 * 1024.0),
        report.quota_bytes as f64 / (1024.0 * 1024.0)
    );
    let failures = report.failures();
    if failures.is_empty() {
        println!("soak: PASS");
    } else {
        println!("soak: FAIL: {}", failures.join("; "));
        std::process::exit(1);
    }
}
