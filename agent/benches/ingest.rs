//! Durable ingest through the HTTP API, against ceilings measured in the same run.
//!
//! Loads: (a) batches of 1000 events of 256 bytes from a few concurrent
//! clients; (b) 64 concurrent producers each sending single events. Each load
//! runs with `durability = "fsync"` and with `"none"`; the disk's single-fsync
//! rate is measured first. Run: `cargo bench -p ferry --bench ingest`
//! (`FERRY_BENCH_SECS` sets the seconds per load, default 5).

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ferry::clock::SystemClock;
use ferry::config::{Config, Durability};
use ferry::runtime::Agent;

const BATCH: usize = 1000;
const BATCH_CLIENTS: usize = 4;
const PRODUCERS: usize = 64;

fn main() {
    let secs: u64 = std::env::var("FERRY_BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let run_for = Duration::from_secs(secs);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let scratch = tempfile::tempdir_in(std::env::current_dir().unwrap()).unwrap();

    let fsyncs = fsync_rate(scratch.path(), run_for.min(Duration::from_secs(3)));
    println!("disk: {fsyncs:.0} fsyncs/s (4 KiB write + fdatasync, one at a time)");

    let mut results = Vec::new();
    for durability in [Durability::Fsync, Durability::None] {
        for load in [Load::Batches, Load::Singles] {
            let r = rt.block_on(measure(scratch.path(), durability, load, run_for));
            println!(
                "{:<8} {:<22} {:>10.0} events/s  {:>8.1} events/commit  {:>7.0} commits/s",
                format!("{durability:?}").to_lowercase(),
                load.name(),
                r.events_per_sec,
                r.events_per_commit,
                r.commits_per_sec
            );
            results.push((durability, load, r));
        }
    }
    let get = |d, l| results.iter().find(|(rd, rl, _)| *rd == d && *rl == l).map(|(_, _, r)| r.events_per_sec).unwrap();
    let a = get(Durability::Fsync, Load::Batches);
    let b = get(Durability::Fsync, Load::Singles);
    let b_none = get(Durability::None, Load::Singles);
    println!();
    println!(
        "(a) durable batches: {a:.0} events/s = {:.2} x target 200000; {:.2} x the no-fsync rate",
        a / 200_000.0,
        a / get(Durability::None, Load::Batches)
    );
    println!(
        "(b) durable singles: {b:.0} events/s = {:.2} x the no-fsync rate (target >= 0.5); {:.1} x the disk's single-fsync rate",
        b / b_none,
        b / fsyncs
    );
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Load {
    Batches,
    Singles,
}

impl Load {
    fn name(self) -> &'static str {
        match self {
            Load::Batches => "(a) 1000-event batches",
            Load::Singles => "(b) 64 single producers",
        }
    }
}

struct Rates {
    events_per_sec: f64,
    events_per_commit: f64,
    commits_per_sec: f64,
}

fn fsync_rate(dir: &std::path::Path, run_for: Duration) -> f64 {
    let path = dir.join("fsync-probe");
    let mut file = std::fs::File::create(&path).unwrap();
    let block = [7u8; 4096];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < run_for {
        file.write_all(&block).unwrap();
        file.sync_data().unwrap();
        n += 1;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    std::fs::remove_file(path).unwrap();
    rate
}

/// A 256-byte event body (JSON), without id so each is new.
fn event_json(i: usize) -> String {
    let pad = "x".repeat(200);
    let e = format!(r#"{{"topic":"bench/t{}","data":{{"v":{i},"p":"{pad}"}}}}"#, i % 8);
    let e = format!("{e:<256}");
    assert_eq!(e.len(), 256);
    e
}

async fn measure(dir: &std::path::Path, durability: Durability, load: Load, run_for: Duration) -> Rates {
    let data_dir = tempfile::tempdir_in(dir).unwrap();
    let toml = format!(
        "[agent]\ndevice_id = \"bench\"\ndata_dir = {:?}\n[store]\nquota = \"16 GiB\"\ndurability = \"{}\"\n[ingest.http]\nlisten = \"127.0.0.1:0\"\n",
        data_dir.path().display().to_string(),
        if durability == Durability::Fsync { "fsync" } else { "none" }
    );
    let config = Config::parse(&toml, "bench").unwrap();
    let agent = Agent::start(config, Arc::new(SystemClock)).await.unwrap();
    let url = format!("http://{}/v1/events", agent.http_addr());
    let client = reqwest::Client::builder().pool_max_idle_per_host(PRODUCERS).build().unwrap();

    let (body, per_request, clients) = match load {
        Load::Batches => {
            (format!("[{}]", (0..BATCH).map(event_json).collect::<Vec<_>>().join(",")), BATCH, BATCH_CLIENTS)
        }
        Load::Singles => (event_json(0), 1, PRODUCERS),
    };
    let body = bytes::Bytes::from(body);
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let status = |a: &Agent| a.store().status(0).unwrap().counters;
    let before = status(&agent);
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (client, url, body, stop, sent) =
                (client.clone(), url.clone(), body.clone(), stop.clone(), sent.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let r = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await
                        .unwrap();
                    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
                    r.bytes().await.unwrap();
                    sent.fetch_add(per_request as u64, Ordering::Relaxed);
                }
            })
        })
        .collect();
    tokio::time::sleep(run_for).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let after = status(&agent);
    agent.shutdown().await.unwrap();
    let events = (after.accepted_events - before.accepted_events) as f64;
    assert_eq!(events as u64, sent.load(Ordering::Relaxed), "every answered event must be stored");
    let commits = (after.commits - before.commits).max(1) as f64;
    Rates { events_per_sec: events / elapsed, events_per_commit: events / commits, commits_per_sec: commits / elapsed }
}
