//! The soak run: the real agent under a steady HTTP load for a configurable
//! time, forwarding to two cloud Mosquitto brokers, one of which flaps (its
//! link is cut and restored in turn), while the agent itself is restarted
//! every few minutes (alternately SIGKILL and SIGTERM). Samples the agent's
//! RSS, open file descriptors and store file size, and at the end checks that
//! every event the producers were answered 200 for reached both clouds.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use ferry_harness::{FaultProxy, Mosquitto, MosquittoOptions};

use crate::workload::{Pace, Producers, Tally, proc_stats};
use crate::{FerryProcess, write_config_with};

/// How long and how hard to soak.
#[derive(Debug, Clone)]
pub struct SoakConfig {
    /// Length of the loaded run (the final drain comes on top).
    pub duration: Duration,
    /// The flapping cloud's link changes state this often (down, up, down…).
    pub flap_every: Duration,
    /// The agent is restarted this often.
    pub restart_every: Duration,
    /// Events per second, all producers together.
    pub rate: f64,
    /// The store quota (`store.quota`), in bytes.
    pub quota_bytes: u64,
    /// The store's page cache (`store.cache_size`), in bytes; `None` keeps
    /// the agent's default (64 MiB). RSS grows until this cache is full.
    pub cache_bytes: Option<u64>,
    /// How often the agent's process is sampled.
    pub sample_every: Duration,
    /// Concurrent single-event requests per producer (four producers); each
    /// keeps its own connection, which the agent's fd count includes.
    pub producer_workers: usize,
}

/// One reading of the agent.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Seconds since the run started.
    pub at_secs: f64,
    /// Which agent process (0 = the first start).
    pub incarnation: usize,
    /// Resident set size, KiB.
    pub rss_kib: u64,
    /// Open file descriptors.
    pub fds: u64,
    /// Size of the store file, bytes.
    pub file_bytes: u64,
}

/// What the soak saw.
#[derive(Debug, Clone)]
pub struct SoakReport {
    /// Every sample, in order.
    pub samples: Vec<Sample>,
    /// Agent restarts done.
    pub restarts: usize,
    /// Link state changes of the flapping cloud.
    pub flaps: usize,
    /// Events answered 200.
    pub acknowledged: u64,
    /// Acknowledged events that never reached cloud A (steady) / B (flapping).
    pub missing: [u64; 2],
    /// Extra copies received (at-least-once), per cloud.
    pub duplicates: [u64; 2],
    /// The quota, bytes.
    pub quota_bytes: u64,
}

impl SoakReport {
    /// Mean RSS (KiB) and fds of the first and of the last incarnation,
    /// each over the second half of its samples: the first half includes
    /// start-up, while producers' connections and caches ramp up.
    pub fn first_and_last(&self) -> ((f64, f64), (f64, f64)) {
        let of = |inc: usize| {
            let all: Vec<_> = self.samples.iter().filter(|s| s.incarnation == inc).collect();
            let s = &all[all.len() / 2..];
            let n = s.len().max(1) as f64;
            (s.iter().map(|s| s.rss_kib as f64).sum::<f64>() / n, s.iter().map(|s| s.fds as f64).sum::<f64>() / n)
        };
        let last = self.samples.last().map_or(0, |s| s.incarnation);
        (of(0), of(last))
    }

    /// The largest store file seen, bytes.
    pub fn max_file_bytes(&self) -> u64 {
        self.samples.iter().map(|s| s.file_bytes).max().unwrap_or(0)
    }

    /// What failed, if anything: growth of RSS (more than 1.5× + 16 MiB) or of
    /// fds (more than 8) from the first incarnation to the last, the store
    /// file beyond the quota, or an acknowledged event missing at a cloud.
    pub fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        let ((rss0, fd0), (rss1, fd1)) = self.first_and_last();
        if rss1 > rss0 * 1.5 + 16.0 * 1024.0 {
            out.push(format!("RSS grew from {:.1} MiB to {:.1} MiB", rss0 / 1024.0, rss1 / 1024.0));
        }
        if fd1 > fd0 + 8.0 {
            out.push(format!("open fds grew from {fd0:.1} to {fd1:.1}"));
        }
        if self.max_file_bytes() > self.quota_bytes {
            out.push(format!(
                "store file reached {} bytes, over the {}-byte quota",
                self.max_file_bytes(),
                self.quota_bytes
            ));
        }
        for (i, m) in self.missing.iter().enumerate() {
            if *m > 0 {
                out.push(format!("{m} acknowledged events never reached cloud {}", ["A", "B"][i]));
            }
        }
        if self.acknowledged == 0 {
            out.push("no event was acknowledged".into());
        }
        out
    }
}

/// Runs the soak with the agent binary `bin`; see the module docs.
pub async fn run(bin: &Path, cfg: SoakConfig) -> anyhow::Result<SoakReport> {
    let clouds =
        [Mosquitto::start(MosquittoOptions::default()).await?, Mosquitto::start(MosquittoOptions::default()).await?];
    let proxies = [FaultProxy::start(clouds[0].addr()).await?, FaultProxy::start(clouds[1].addr()).await?];
    let tallies = [Tally::start(&clouds[0].url()).await?, Tally::start(&clouds[1].url()).await?];
    let dir = tempfile::tempdir()?;
    let mut tail = String::new();
    for (name, proxy) in ["cloud-a", "cloud-b"].iter().zip(&proxies) {
        tail.push_str(&format!(
            "[[destination]]\nname = \"{name}\"\nurl = \"mqtt://{}\"\nkeep_alive = \"5s\"\nbackoff_base = \"200ms\"\nbackoff_cap = \"5s\"\n\n",
            proxy.addr()
        ));
    }
    let mut store = format!("quota = \"{} B\"", cfg.quota_bytes);
    if let Some(cache) = cfg.cache_bytes {
        store.push_str(&format!("\ncache_size = \"{cache} B\""));
    }
    let config = write_config_with(dir.path(), &store, &tail);
    let store_file: PathBuf = dir.path().join("data/ferry.redb");

    let url: Arc<RwLock<Option<String>>> = Arc::default();
    let mut agent = start_agent(bin, &config).await?;
    *url.write().expect("url lock") = Some(agent.url());
    let producers = Producers::http(url.clone(), 0, 4, cfg.producer_workers, 1, Pace::Rate(cfg.rate / 4.0), None);

    let start = Instant::now();
    let (mut next_flap, mut next_restart, mut next_sample) = (cfg.flap_every, cfg.restart_every, Duration::ZERO);
    let (mut flaps, mut restarts) = (0, 0);
    let mut samples = Vec::new();
    while start.elapsed() < cfg.duration {
        let now = start.elapsed();
        if now >= next_sample {
            next_sample += cfg.sample_every;
            if let Some(p) = proc_stats(agent.pid()) {
                let file_bytes = std::fs::metadata(&store_file).map(|m| m.len()).unwrap_or(0);
                samples.push(Sample {
                    at_secs: now.as_secs_f64(),
                    incarnation: restarts,
                    rss_kib: p.rss_kib,
                    fds: p.fds,
                    file_bytes,
                });
            }
        }
        if now >= next_flap {
            next_flap += cfg.flap_every;
            flaps += 1;
            let handle = proxies[1].handle();
            if flaps % 2 == 1 { handle.cut() } else { handle.pass() }
        }
        if now >= next_restart {
            next_restart += cfg.restart_every;
            restarts += 1;
            *url.write().expect("url lock") = None;
            let old = agent;
            tokio::task::spawn_blocking(move || {
                if restarts % 2 == 1 {
                    old.kill();
                } else {
                    old.terminate();
                }
            })
            .await?;
            agent = start_agent(bin, &config).await?;
            *url.write().expect("url lock") = Some(agent.url());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut producers = producers;
    producers.stop();
    producers.join().await;
    proxies[1].handle().pass();
    let mut missing = [0; 2];
    for (i, t) in tallies.iter().enumerate() {
        missing[i] = t.settle(&producers.ledgers, Duration::from_secs(30), Duration::from_secs(180)).await;
    }
    let report = SoakReport {
        samples,
        restarts,
        flaps,
        acknowledged: producers.acked(),
        missing,
        duplicates: [tallies[0].duplicates(), tallies[1].duplicates()],
        quota_bytes: cfg.quota_bytes,
    };
    tokio::task::spawn_blocking(move || agent.terminate()).await?;
    Ok(report)
}

async fn start_agent(bin: &Path, config: &Path) -> anyhow::Result<FerryProcess> {
    let (bin, config) = (bin.to_owned(), config.to_owned());
    tokio::task::spawn_blocking(move || FerryProcess::start(&bin, &config)).await?
}
