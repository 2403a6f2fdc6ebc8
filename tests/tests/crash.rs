//! Crash safety of ingest: the real `ferry` binary is flooded by concurrent
//! producers and SIGKILLed at random moments, then restarted, many times.
//! Every event that was answered 200 must be in the store exactly once, in
//! sequence order, and the log must have no holes.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use ferry::clock::SystemClock;
use ferry::config::StoreConfig;
use ferry::store::Store;
use ferry_tests::{FerryProcess, ferry_bin, write_config};
use rand::Rng;
use serde_json::{Value, json};

const KILLS: usize = 20;
const PRODUCERS: usize = 8;

/// What the producers were told: id → sequence, and each acknowledged request's ids in order.
#[derive(Default)]
struct Ledger {
    acked: HashMap<String, u64>,
    requests: Vec<Vec<String>>,
    retried_requests: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_acknowledged_event_survives_repeated_sigkill_exactly_once_and_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let url: Arc<RwLock<Option<String>>> = Arc::default();
    let ledger: Arc<Mutex<Ledger>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();

    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let (url, ledger, stop, client) = (url.clone(), ledger.clone(), stop.clone(), client.clone());
            tokio::spawn(async move {
                let mut n = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let size = rand::rng().random_range(1..=25);
                    let ids: Vec<String> = (0..size).map(|i| format!("p{p}-{}", n + i)).collect();
                    n += size;
                    let body: Vec<Value> = ids
                        .iter()
                        .map(|id| json!({"topic": format!("crash/p{p}"), "id": id, "data": {"n": id}}))
                        .collect();
                    // Retry the same request (same ids) until it is acknowledged.
                    let mut attempts = 0;
                    loop {
                        attempts += 1;
                        let Some(base) = url.read().unwrap().clone() else {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            continue;
                        };
                        let sent = client.post(format!("{base}/v1/events")).json(&body).send().await;
                        let Ok(resp) = sent else { continue };
                        if resp.status() != 200 {
                            continue;
                        }
                        let Ok(answer) = resp.json::<Value>().await else { continue };
                        let mut l = ledger.lock().unwrap();
                        for (id, e) in ids.iter().zip(answer["events"].as_array().unwrap()) {
                            assert_eq!(e["id"].as_str(), Some(id.as_str()));
                            let seq = e["sequence"].as_u64().unwrap();
                            if let Some(prev) = l.acked.insert(id.clone(), seq) {
                                assert_eq!(prev, seq, "{id} acknowledged with two sequences");
                            }
                        }
                        l.requests.push(ids.clone());
                        if attempts > 1 {
                            l.retried_requests += 1;
                        }
                        break;
                    }
                }
            })
        })
        .collect();

    for _ in 0..KILLS {
        let agent = tokio::task::spawn_blocking({
            let config = config.clone();
            move || FerryProcess::start(ferry_bin!(), &config)
        })
        .await
        .unwrap()
        .expect("ferry restarts after SIGKILL");
        *url.write().unwrap() = Some(agent.url());
        let run_ms = rand::rng().random_range(100..600);
        tokio::time::sleep(Duration::from_millis(run_ms)).await;
        *url.write().unwrap() = None;
        agent.kill();
    }
    // Final run: let every producer finish its in-flight request, then stop cleanly.
    let agent = FerryProcess::start(ferry_bin!(), &config).unwrap();
    *url.write().unwrap() = Some(agent.url());
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for p in producers {
        p.await.unwrap();
    }
    let (status, _) = agent.terminate();
    assert!(status.success(), "ferry exited with {status} on SIGTERM");

    let ledger = ledger.lock().unwrap();
    let store = Store::open(StoreConfig::at(dir.path().join("data/ferry.redb")), Arc::new(SystemClock)).unwrap();
    let mut stored: HashMap<String, u64> = HashMap::new();
    let mut expected_seq = 1;
    let mut after = 0;
    loop {
        let page = store.read_after(after, 10_000).unwrap();
        let Some(last) = page.last() else { break };
        after = last.sequence;
        for e in page {
            assert_eq!(e.sequence, expected_seq, "hole in the log before sequence {}", e.sequence);
            expected_seq += 1;
            assert!(stored.insert(e.body.id.clone(), e.sequence).is_none(), "{} stored twice", e.body.id);
        }
    }
    assert!(ledger.acked.len() > 1_000, "too little load to prove anything: {} events", ledger.acked.len());
    for (id, seq) in &ledger.acked {
        assert_eq!(stored.get(id), Some(seq), "acknowledged event {id} (sequence {seq}) missing or moved");
    }
    // Requests are atomic and keep their order.
    for ids in &ledger.requests {
        let seqs: Vec<u64> = ids.iter().map(|id| stored[id]).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "request {ids:?} stored out of order: {seqs:?}");
    }
    // Nothing appears that no producer sent.
    let sent: HashSet<&str> = ledger.requests.iter().flatten().map(String::as_str).collect();
    assert!(stored.keys().all(|id| sent.contains(id.as_str())), "stored an event nobody acknowledged or retried");
    eprintln!(
        "{KILLS} kills: {} events acknowledged, {} stored, {} requests retried after a kill",
        ledger.acked.len(),
        stored.len(),
        ledger.retried_requests
    );
}
