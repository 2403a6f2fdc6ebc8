//! The agent's memory under hostile plugins is bounded by configuration:
//! across a thousand calls that each try to hand the host far more than
//! the store takes (a 32 MiB event, 100 × 50 KB events, 5,000 copies, 100
//! events aliasing one buffer, invalid and oversized events), the agent's
//! peak RSS stays within its baseline plus the plugin's memory limit plus
//! one call's output bound plus a fixed margin.
//!
//! Needs the components from `scripts/build-plugins.sh`.

use std::time::{Duration, Instant};

use ferry_tests::{FerryProcess, built_plugin, ferry_bin, write_config};

/// The plugin's memory limit in the test config.
const MEMORY_LIMIT: u64 = 128 << 20;

/// The store's largest event in the test config; the output bound of a
/// one-event call is this plus 1 KiB.
const MAX_EVENT: u64 = 64 << 10;

/// Room for everything else that moves: allocator slack, HTTP buffers,
/// redb pages, a freshly built instance's own tables.
const MARGIN: u64 = 64 << 20;

/// Hostile calls made.
const HOSTILE_CALLS: usize = 1_000;

/// Resident and peak resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("reading /proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap_or_else(|| panic!("{name} missing from /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[tokio::test]
async fn a_thousand_hostile_calls_keep_the_agents_memory_within_its_configured_bound() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "max_event_size = \"64 KiB\"\n");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "[[plugin]]\nname = \"hostile\"\npath = {:?}\nworld = \"filter\"\nstage = \"ingest\"\n\
         timeout_ms = 2000\nmemory = \"128 MiB\"\n",
        built_plugin("testdata/hostile-filter").display().to_string()
    ));
    std::fs::write(&config, text).unwrap();
    let agent = FerryProcess::start(ferry_bin!(), &config).unwrap();
    let client = reqwest::Client::new();
    let post = async |topic: &str| {
        let r = client
            .post(format!("{}/v1/events", agent.url()))
            .json(&serde_json::json!({ "topic": topic, "data": { "n": 1 } }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{topic}");
        r.json::<serde_json::Value>().await.unwrap()
    };
    // Warm up: the instance built, the store open, the allocator settled.
    for i in 0..20 {
        post(&format!("good/{i}")).await;
    }
    let (baseline, _) = rss(agent.pid());
    // Forget the start-up peak (compiling the plugin): only the calls count.
    let reset = std::fs::write(format!("/proc/{}/clear_refs", agent.pid()), "5").is_ok();
    let mut highest = baseline;
    let bound = baseline + MEMORY_LIMIT + MAX_EVENT + 1024 + MARGIN;
    let kinds = ["huge", "wide", "alias", "flood", "oversize", "bad-subject", "wrong-count", "trap"];
    let started = Instant::now();
    for i in 0..HOSTILE_CALLS {
        let kind = kinds[i % kinds.len()];
        let answer = post(&format!("hostile/{kind}")).await;
        // A good event after each keeps the circuit closed, so every hostile call is made.
        post(&format!("good/x{i}")).await;
        let (now, _) = rss(agent.pid());
        highest = highest.max(now);
        // Stop at once past the bound: without it the agent would take the machine's memory.
        assert!(now <= bound, "after {i} hostile calls ({kind}) RSS is {now} bytes, over the bound {bound}");
        assert_eq!(answer["accepted"], 0, "{kind}: the plugin's output must be refused");
    }
    // The kernel's peak when it could be reset, else the highest reading.
    let peak = if reset { rss(agent.pid()).1 } else { highest };
    let status: serde_json::Value =
        client.get(format!("{}/v1/status", agent.url())).send().await.unwrap().json().await.unwrap();
    let plugin = &status["plugins"][0];
    assert_eq!(plugin["failures"].as_u64(), Some(HOSTILE_CALLS as u64), "every hostile call is a failure: {plugin}");
    assert_eq!(plugin["circuit"], "closed", "{plugin}");
    println!(
        "{HOSTILE_CALLS} hostile calls in {:.1?}: baseline RSS {} MiB, peak {} MiB, bound {} MiB \
         (baseline + memory {} MiB + output {} KiB + margin {} MiB)",
        started.elapsed(),
        baseline >> 20,
        peak >> 20,
        bound >> 20,
        MEMORY_LIMIT >> 20,
        (MAX_EVENT + 1024) >> 10,
        MARGIN >> 20
    );
    assert!(peak <= bound, "peak RSS {peak} bytes is over the bound {bound}");
    assert!(started.elapsed() < Duration::from_secs(600));
    let (exit, _) = agent.terminate();
    assert!(exit.success());
}
