//! A short soak (the full one is `cargo bench -p ferry-tests --bench soak`):
//! steady HTTP load, one cloud link flapping every 4 s, the agent SIGKILLed
//! and then SIGTERMed and restarted; memory and fds stay flat, the store file
//! within its quota, and every acknowledged event reaches both clouds.

use std::time::Duration;

use ferry_tests::soak::{self, SoakConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_short_soak_with_a_flapping_cloud_and_restarts_loses_nothing_and_stays_flat() {
    let cfg = SoakConfig {
        duration: Duration::from_secs(30),
        flap_every: Duration::from_secs(4),
        restart_every: Duration::from_secs(10),
        rate: 400.0,
        quota_bytes: 64 * 1024 * 1024,
        cache_bytes: None,
        sample_every: Duration::from_secs(1),
        // Few connections, so the agent's fd count settles within the first
        // 10 s incarnation that the last one is compared with.
        producer_workers: 2,
    };
    let report = soak::run(ferry_tests::ferry_bin!(), cfg).await.unwrap();
    assert!(report.restarts >= 2 && report.flaps >= 6, "{report:?}");
    assert!(report.acknowledged > 2_000, "too little load: {report:?}");
    let failures = report.failures();
    assert!(failures.is_empty(), "{failures:?}\n{report:#?}");
}
