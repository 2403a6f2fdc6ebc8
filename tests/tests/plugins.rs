//! WebAssembly plugins end to end: every example passes `ferry plugin check`
//! on its own samples and its near miss fails, a non-convergent merge is
//! caught, a G-Counter is told from a sum given the author's data (and is
//! inconclusive without it), hostile plugins never stop the agent nor lose
//! an accepted event, every output the host refuses counts against the
//! plugin at both stages, the agent's memory stays within its stated bound
//! under a thousand hostile calls, and a plugin's config reaches it.
//!
//! Needs the components from `scripts/build-plugins.sh` (scripts/test.sh
//! runs it first).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ferry::clock::ManualClock;
use ferry::config::StoreConfig;
use ferry::config::plugin::{CpuLimit, OnError, OutputBound, PluginConfig, World};
use ferry::ingest::{Ingest, InputEvent};
use ferry::plugin::breaker::BreakerConfig;
use ferry::plugin::{CircuitState, Plugin, PluginError, PluginHandle, Sampling, convert};
use ferry::store::Store;
use ferry_tests::{FerryProcess, built_plugin, ferry_bin, write_config};
use serde_json::Value;

/// A compile cache shared by the tests of this run and the next, so the
/// large interpreter components compile once per machine.
fn cache() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| ferry_bin!().parent().expect("binary dir").join("plugin-cache"))
}

/// Runs `ferry plugin ARGS`: its exit code and its output.
fn ferry_plugin_code(args: &[&str]) -> (i32, String) {
    let out = Command::new(ferry_bin!())
        .arg("plugin")
        .args(args)
        .env("FERRY_PLUGIN_CACHE", cache())
        .env("RUST_LOG", "warn")
        .env_remove("FERRY_CONFIG")
        .output()
        .expect("running ferry plugin");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

fn ferry_plugin(args: &[&str]) -> (bool, String) {
    let (code, text) = ferry_plugin_code(args);
    (code == 0, text)
}

/// An example's own samples file, beside its source.
fn samples(example: &str) -> String {
    let dir = match example {
        "gset-merge" => "plugins/js".to_owned(),
        rust => format!("plugins/rust/examples/{rust}"),
    };
    ferry_tests::repo_root().join(dir).join("samples.json").display().to_string()
}

#[test]
fn every_example_plugin_passes_plugin_check() {
    let examples: [(&str, &[&str]); 7] = [
        ("threshold-filter", &["--config", "field=temp", "--config", "min=20"]),
        ("redact-transform", &["--config", "fields=secret,reading.celsius"]),
        ("lww-merge", &[]),
        ("crdt-merge", &[]),
        ("prefix-filter", &["--config", "prefixes=debug/,telemetry/raw/"]),
        ("subject-router", &["--config", "route.alerts/=cloud-a,cloud-b"]),
        ("gset-merge", &[]),
    ];
    for (name, config) in examples {
        let path = built_plugin(name);
        let mut args = vec!["check", path.to_str().unwrap()];
        args.extend_from_slice(config);
        let (ok, out) = ferry_plugin(&args);
        assert!(ok && out.contains("checks passed") && !out.contains("FAIL"), "{name}:\n{out}");
    }
}

#[test]
fn a_non_convergent_merge_is_caught_with_a_minimal_counter_example() {
    let path = built_plugin("testdata/diverge-merge");
    let (code, out) = ferry_plugin_code(&["check", path.to_str().unwrap()]);
    assert_eq!(code, 1, "a merge where incoming always wins must fail the check:\n{out}");
    assert!(out.contains("FAIL commutative"), "{out}");
    assert!(out.contains("counter-example"), "{out}");
    // The counter-example names the form that broke and both expressions.
    assert!(out.contains("the form merge(a, b) = merge(b, a) broke"), "{out}");
    assert!(out.contains("merge(a, b) gave") && out.contains("merge(b, a) gave"), "{out}");
    // Shrinking leaves the smallest disagreeing pair: two different values
    // that cannot be smaller, e.g. `["a"]` versus `[]`, or `a` versus empty.
    let example = out.split("counter-example:").nth(1).unwrap().split("  pass ").next().unwrap();
    assert!(example.len() < 700, "the counter-example should be minimal:\n{example}");
}

#[test]
fn a_g_counter_over_the_authors_data_passes_as_max_and_fails_as_sum() {
    let dir = tempfile::tempdir().unwrap();
    let samples = dir.path().join("gcounter.json");
    std::fs::write(&samples, r#"[{"counts": {"gw-1": 3}}, {"counts": {"gw-1": 1, "gw-2": 7}}]"#).unwrap();
    let path = built_plugin("testdata/gcounter-merge");
    let (path, samples) = (path.to_str().unwrap(), samples.to_str().unwrap());

    let (code, out) = ferry_plugin_code(&["check", path, "--samples", samples]);
    assert_eq!(code, 0, "pointwise max converges:\n{out}");
    assert!(out.contains("example value(s) as given, then mutations of them"), "says what it used:\n{out}");
    assert!(!out.contains("(0 cases)"), "every law ran cases:\n{out}");

    let (code, out) = ferry_plugin_code(&["check", path, "--samples", samples, "--config", "merge=sum"]);
    assert_eq!(code, 1, "a sum double-counts:\n{out}");
    assert!(out.contains("FAIL idempotent"), "{out}");
    assert!(out.contains("the form merge(x, x) = x, where x = merge(a, b) broke"), "{out}");

    // The same told apart from a declared shape instead of samples.
    let shape = r#"{"counts": {"*": "uint"}}"#;
    let (code, out) = ferry_plugin_code(&["check", path, "--shape", shape]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("declared shape {counts: {*: uint}}"), "{out}");
    let (code, _) = ferry_plugin_code(&["check", path, "--shape", shape, "--config", "merge=sum"]);
    assert_eq!(code, 1);

    // On the built-in shapes alone nothing can be tested: its own exit code.
    let (code, out) = ferry_plugin_code(&["check", path]);
    assert_eq!(code, 3, "inconclusive is neither pass nor fail:\n{out}");
    assert!(out.contains("INCONCLUSIVE") && out.contains("--samples"), "{out}");
    assert!(out.contains("built-in shape pn-counters"), "says which shapes it tried:\n{out}");
}

#[test]
fn each_example_merge_passes_on_its_samples_and_its_near_miss_fails() {
    for (example, bug) in [("lww-merge", "lww-hlc-only"), ("crdt-merge", "crdt-sum"), ("gset-merge", "gset-append")] {
        let samples = samples(example);
        let (code, out) = ferry_plugin_code(&["check", built_plugin(example).to_str().unwrap(), "--samples", &samples]);
        assert_eq!(code, 0, "{example}:\n{out}");
        let wrong = built_plugin("testdata/wrong-merge");
        let bug = format!("bug={bug}");
        let (code, out) =
            ferry_plugin_code(&["check", wrong.to_str().unwrap(), "--samples", &samples, "--config", &bug]);
        assert_eq!(code, 1, "{bug} on {example}'s samples must fail:\n{out}");
        assert!(out.contains("counter-example") && out.contains("the form"), "{out}");
    }
}

#[test]
fn check_refuses_samples_that_are_not_a_json_array_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("one.json");
    std::fs::write(&bad, r#"{"counts": {}}"#).unwrap();
    let path = built_plugin("testdata/gcounter-merge");
    let (code, out) = ferry_plugin_code(&["check", path.to_str().unwrap(), "--samples", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(out.contains("one.json") && out.contains("JSON array"), "{out}");
    let (code, out) = ferry_plugin_code(&["check", path.to_str().unwrap(), "--shape", r#"{"n": "nat"}"#]);
    assert_eq!(code, 1);
    assert!(out.contains("$.n: `nat` is not a type"), "{out}");
}

#[test]
fn plugin_check_names_a_component_of_the_wrong_world_or_with_unknown_imports() {
    let (ok, out) = ferry_plugin(&["check", built_plugin("lww-merge").to_str().unwrap(), "--world", "filter"]);
    assert!(!ok && out.contains("does not target the `filter` world"), "{out}");
    let dir = tempfile::tempdir().unwrap();
    let evil = dir.path().join("evil.wasm");
    std::fs::write(&evil, evil_component()).unwrap();
    let (ok, out) = ferry_plugin(&["check", evil.to_str().unwrap()]);
    assert!(!ok && out.contains("import the host does not provide"), "{out}");
}

/// A component that imports an interface no Ferry host provides.
fn evil_component() -> Vec<u8> {
    wat::parse_str(r#"(component (import "evil:net/raw@1.0.0" (instance (export "connect" (func)))))"#).unwrap()
}

#[test]
fn a_component_importing_what_the_host_lacks_is_refused_at_load_and_the_agent_does_not_start() {
    let err = Plugin::from_bytes(&PluginConfig::new("evil", "evil.wasm", World::Filter), &evil_component(), None)
        .err()
        .expect("loading must fail");
    assert!(matches!(err, PluginError::Link(ref m) if m.contains("evil:net/raw")), "{err}");

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("evil.wasm"), evil_component()).unwrap();
    let config = write_config(dir.path(), "");
    append(&config, "[[plugin]]\nname = \"evil\"\npath = \"evil.wasm\"\nworld = \"filter\"\nstage = \"ingest\"\n");
    let out = Command::new(ferry_bin!()).args(["run", "--config"]).arg(&config).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("plugin `evil`") && err.contains("evil:net/raw"), "{err}");
}

fn append(path: &Path, text: &str) {
    let mut config = std::fs::read_to_string(path).unwrap();
    config.push_str(text);
    std::fs::write(path, config).unwrap();
}

async fn post(client: &reqwest::Client, url: &str, topic: &str) -> Value {
    let started = Instant::now();
    let response = client
        .post(format!("{url}/v1/events"))
        .json(&serde_json::json!({ "topic": topic, "data": { "n": 1 } }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{topic}: the agent must answer every request");
    assert!(started.elapsed() < Duration::from_secs(10), "{topic}: answered too slowly");
    response.json().await.unwrap()
}

#[tokio::test]
async fn hostile_plugins_never_stop_the_agent_nor_lose_an_accepted_event() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    append(
        &config,
        &format!(
            "[[plugin]]\nname = \"hostile\"\npath = {:?}\nworld = \"filter\"\nstage = \"ingest\"\n\
             timeout_ms = 200\nmemory = \"16 MiB\"\nconfig = {{ zeta = \"z\", alpha = \"a b\" }}\n",
            built_plugin("testdata/hostile-filter").display().to_string()
        ),
    );
    let agent = FerryProcess::start(ferry_bin!(), &config).unwrap();
    let client = reqwest::Client::new();
    let hostile = ["loop", "oom", "trap", "flood", "huge", "wrong-count"];
    // Each failure is followed by a good event: the instance is rebuilt and
    // the circuit (which opens after 5 failures in a row) stays closed.
    let mut stored = vec![post(&client, &agent.url(), "good/0").await];
    for (i, kind) in hostile.iter().enumerate() {
        let answer = post(&client, &agent.url(), &format!("hostile/{kind}")).await;
        assert_eq!(answer["accepted"], 0, "{kind}: a failed batch is dead-lettered, not stored: {answer}");
        // The producer learns the plugin failed, apart from a plugin's own drop.
        let filtered = &answer["filtered"][0];
        assert_eq!(filtered["outcome"], "failed-dead-lettered", "{kind}: {answer}");
        assert_eq!(filtered["message"], "plugin hostile failed: dead-lettered", "{kind}: {answer}");
        assert!(filtered["reason"].as_str().unwrap().starts_with("plugin hostile: "), "{answer}");
        stored.push(post(&client, &agent.url(), &format!("good/{}", i + 1)).await);
    }
    assert!(stored.iter().all(|a| a["accepted"] == 1), "{stored:?}");
    assert_eq!(stored[0]["filtered"][0]["message"], "replaced by plugin hostile", "{:?}", stored[0]);
    let dropped = post(&client, &agent.url(), "drop/1").await;
    assert_eq!((dropped["accepted"].as_u64(), dropped["filtered"][0]["outcome"].as_str()), (Some(0), Some("dropped")));
    assert_eq!(dropped["filtered"][0]["message"], "dropped by plugin hostile", "{dropped}");

    let status: Value = client.get(format!("{}/v1/status", agent.url())).send().await.unwrap().json().await.unwrap();
    let plugin = &status["plugins"][0];
    assert_eq!(plugin["failures"], 6, "{plugin}");
    assert_eq!((plugin["timeouts"].as_u64(), plugin["traps"].as_u64()), (Some(1), Some(1)), "{plugin}");
    // A 32 MiB output cannot even be built inside a 16 MiB instance.
    assert_eq!(plugin["out_of_memory"], 2, "oom and huge: {plugin}");
    // 5,000 copies of an event are over the call's output bound.
    assert_eq!(plugin["output_too_large"], 1, "flood: {plugin}");
    assert_eq!(plugin["invalid_output"], 1, "wrong-count: {plugin}");
    assert_eq!(plugin["circuit"], "closed", "{plugin}");
    let (exit, _) = agent.terminate();
    assert!(exit.success());

    let store =
        Store::open(StoreConfig::at(dir.path().join("data/ferry.redb")), Arc::new(ManualClock::new(0))).unwrap();
    let events = store.read_after(0, 100).unwrap();
    let subjects: Vec<&str> = events.iter().map(|e| e.body.subject.as_str()).collect();
    assert_eq!(subjects, ["good/0", "good/1", "good/2", "good/3", "good/4", "good/5", "good/6"]);
    let echo = events[0].body.extensions.iter().find(|(k, _)| k == "cfgecho").map(|(_, v)| v.as_str());
    assert_eq!(echo, Some("alpha=a b;zeta=z"), "the plugin's config reaches it, sorted by key");
    let dead = store.dead_letters(0, 100).unwrap();
    assert_eq!(dead.len(), 6);
    for (letter, kind) in dead.iter().zip(hostile) {
        assert_eq!(letter.event().unwrap().body.subject, format!("hostile/{kind}"));
        assert!(letter.reason.starts_with("plugin hostile: "), "{}", letter.reason);
    }
    store.close();
}

fn hostile_config(on_error: OnError) -> PluginConfig {
    let mut config = PluginConfig::new("hostile", built_plugin("testdata/hostile-filter"), World::Filter);
    config.cpu = CpuLimit::Timeout(Duration::from_millis(200));
    config.memory_bytes = 16 << 20;
    config.on_error = on_error;
    config
}

fn input(topic: &str) -> InputEvent {
    InputEvent {
        id: None,
        topic: topic.into(),
        ty: None,
        time_nanos: None,
        datacontenttype: None,
        data: b"{}".to_vec(),
        data_is_json: true,
        partitionkey: None,
        extensions: Vec::new(),
        ttl: None,
        dedup: None,
    }
}

async fn ingest_with(on_error: OnError, dir: &Path) -> (Ingest, Store) {
    let clock = Arc::new(ManualClock::new(1_800_000_000_000_000_000));
    let store = Store::open(StoreConfig::at(dir.join("ferry.redb")), clock.clone()).unwrap();
    let (plugin, _) = Plugin::load(&hostile_config(on_error), Some(cache())).unwrap();
    let handle = PluginHandle::spawn(plugin, 4, Sampling::Off).unwrap();
    let ingest = Ingest::new(store.clone(), "ferry://t".into(), clock).with_filters(vec![handle]);
    (ingest, store)
}

#[tokio::test]
async fn under_pass_a_failing_plugin_leaves_the_events_stored_unfiltered() {
    let dir = tempfile::tempdir().unwrap();
    let (ingest, store) = ingest_with(OnError::Pass, dir.path()).await;
    let out = ingest.submit(vec![input("hostile/trap"), input("good/1")]).await.unwrap();
    assert_eq!(out.events.len(), 2);
    assert!(out.filtered.iter().all(|f| f.message == "plugin hostile failed: passed through unfiltered"), "{out:?}");
    let events = store.read_after(0, 10).unwrap();
    assert!(events.iter().all(|e| e.body.extensions.is_empty()), "stored as they came, not transformed");
    assert_eq!(store.dead_letters(0, 10).unwrap().len(), 0);
}

#[tokio::test]
async fn under_drop_a_failing_plugin_discards_the_batch_and_counts_it() {
    let dir = tempfile::tempdir().unwrap();
    let (ingest, store) = ingest_with(OnError::Drop, dir.path()).await;
    assert!(ingest.submit(vec![input("hostile/oom"), input("good/1")]).await.unwrap().events.is_empty());
    assert_eq!(ingest.submit(vec![input("good/2")]).await.unwrap().events.len(), 1, "a rebuilt instance works");
    assert_eq!(store.read_after(0, 10).unwrap().len(), 1);
    assert_eq!(store.dead_letters(0, 10).unwrap().len(), 0);
    let status = &ingest.plugin_status()[0];
    assert_eq!((status.out_of_memory, status.instances_built), (1, 2));
}

/// The hostile filter as an operator would run it: a 128 MiB instance, and
/// the default output bound for a store whose largest event is 64 KiB.
fn roomy_hostile() -> PluginConfig {
    let mut config = hostile_config(OnError::DeadLetter);
    config.memory_bytes = 128 << 20;
    config.cpu = CpuLimit::Timeout(Duration::from_secs(2));
    config.max_output = OutputBound::for_max_event(64 << 10);
    config
}

/// Every kind of output the host refuses, with the counter it feeds and
/// what the one-line reason must name (the rule broken).
const REFUSED: [(&str, &str, &str); 6] = [
    ("hostile/bad-subject", "invalid_output", "field `subject`: `a/#`"),
    ("hostile/bad-route", "invalid_output", "route `cloud-a,cloud-b` is not a destination name"),
    ("hostile/oversize", "invalid_output", "over store.max_event_size (65536 bytes)"),
    ("hostile/huge", "output_too_large", "output over max_output"),
    ("hostile/wide", "output_too_large", "output over max_output"),
    ("hostile/alias", "output_too_large", "output over max_output"),
];

#[tokio::test]
async fn every_output_the_ingest_stage_refuses_counts_against_the_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_800_000_000_000_000_000));
    let mut store_config = StoreConfig::at(dir.path().join("ferry.redb"));
    store_config.max_event_bytes = 64 << 10;
    let store = Store::open(store_config, clock.clone()).unwrap();
    let (plugin, _) = Plugin::load(&roomy_hostile(), Some(cache())).unwrap();
    let handle = PluginHandle::spawn(plugin, 4, Sampling::Off).unwrap();
    let ingest = Ingest::new(store.clone(), "ferry://t".into(), clock).with_filters(vec![handle]);
    for (i, (subject, counter, rule)) in REFUSED.iter().enumerate() {
        let before = ingest.plugin_status()[0].clone();
        let out = ingest.submit(vec![input(subject)]).await.unwrap();
        assert!(out.events.is_empty(), "{subject}: nothing of a refused call is stored");
        assert_eq!(out.filtered[0].message, "plugin hostile failed: dead-lettered", "{subject}");
        let after = ingest.plugin_status()[0].clone();
        assert_eq!(after.failures, before.failures + 1, "{subject}: a failure of the plugin");
        let count = |s: &ferry::plugin::PluginStatus| match *counter {
            "invalid_output" => s.invalid_output,
            _ => s.output_too_large,
        };
        assert_eq!(count(&after), count(&before) + 1, "{subject}: counted as {counter}");
        let last = after.last_error.clone().unwrap();
        assert!(last.starts_with("plugin hostile: ") && last.contains(rule), "{subject}: {last}");
        assert!(!last.contains('\n'), "one line: {last}");
        // The next call runs on a fresh instance.
        ingest.submit(vec![input(&format!("good/{i}"))]).await.unwrap();
        assert_eq!(ingest.plugin_status()[0].instances_built, after.instances_built + 1, "{subject}: rebuilt");
    }
    let dead = store.dead_letters(0, 100).unwrap();
    assert_eq!(dead.len(), REFUSED.len());
    for (letter, (subject, _, rule)) in dead.iter().zip(REFUSED) {
        assert!(
            letter.reason.starts_with("plugin hostile: ") && letter.reason.contains(rule),
            "{subject}: {}",
            letter.reason
        );
    }
    // Five refusals in a row open the circuit, as five traps would.
    for _ in 0..5 {
        ingest.submit(vec![input("hostile/bad-subject")]).await.unwrap();
    }
    let status = &ingest.plugin_status()[0];
    assert_eq!((status.circuit, status.circuit_opened), (CircuitState::Open, 1), "{status:?}");
    store.close();
}

#[tokio::test]
async fn every_output_a_destination_stage_refuses_counts_against_the_plugin_and_names_it() {
    use ferry::config::Config;
    use ferry::forward::Stage;
    use ferry::limits::DestinationLimits;
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_800_000_000_000_000_000));
    let store = Store::open(StoreConfig::at(dir.path().join("ferry.redb")), clock.clone()).unwrap();
    let subjects = ["hostile/bad-subject", "hostile/oversize", "hostile/huge", "good/1"];
    Ingest::new(store.clone(), "ferry://t".into(), clock)
        .submit(subjects.iter().map(|s| input(s)).collect())
        .await
        .unwrap();
    let events = store.read_after(0, 10).unwrap();
    let config = Config::parse(
        "[[destination]]\nname = \"cloud-a\"\nurl = \"mqtt://127.0.0.1:1\"\nroutes = [\"#\"]\n\
         max_packet_size = \"16 KiB\"\n",
        "test.toml",
    )
    .unwrap();
    let limits = Arc::new(DestinationLimits::new(&config.destinations[0]));
    let mut plugin_config = roomy_hostile();
    plugin_config.max_output = OutputBound::for_max_event(256 << 10);
    let (plugin, _) = Plugin::load(&plugin_config, Some(cache())).unwrap();
    let handle = PluginHandle::spawn(plugin, 4, Sampling::Off).unwrap();
    let stage = Stage::new("cloud-a".into(), vec![handle.clone()]).with_limits(limits);
    // One event per call, as a resend after a failure would go.
    let rules = [
        "field `subject`",
        // 64 KiB of data: under the output bound, over what the broker takes.
        "destination cloud-a: a publish of",
        "output over max_output",
    ];
    for (event, rule) in events.iter().zip(rules) {
        let before = handle.status();
        let (steps, dead) = stage.run(vec![event.clone()], |_| true, &store).await.unwrap();
        assert_eq!(dead, 1, "{rule}: {steps:?}");
        let after = handle.status();
        assert_eq!(after.failures, before.failures + 1, "{rule}");
        let last = after.last_error.unwrap();
        assert!(last.starts_with("plugin hostile: ") && last.contains(rule), "{last}");
    }
    let (steps, dead) = stage.run(vec![events[3].clone()], |_| true, &store).await.unwrap();
    assert_eq!((dead, steps.len()), (0, 1), "a good event is published: {steps:?}");
    let status = handle.status();
    assert_eq!((status.invalid_output, status.output_too_large, status.instances_built), (2, 1, 4), "{status:?}");
    for letter in store.dead_letters(0, 10).unwrap() {
        assert!(letter.reason.starts_with("destination cloud-a: plugin hostile: "), "{}", letter.reason);
    }
    store.close();
}

#[test]
fn output_is_bounded_before_it_is_copied_even_when_it_aliases_a_small_memory() {
    // 1 MiB of plugin memory, 100 MiB of output: refused while copied out.
    let mut config = roomy_hostile();
    config.memory_bytes = 16 << 20;
    let (mut plugin, _) = Plugin::load(&config, Some(cache())).unwrap();
    let event = |subject: &str| {
        let mut e = convert::to_wit(&body(subject), 0, 0);
        e.sequence = 1;
        e
    };
    let e = plugin.filter(&Arc::new(vec![event("hostile/alias")])).unwrap_err();
    assert!(matches!(e, PluginError::OutputTooLarge { limit } if limit == (64 << 10) + 1024), "{e}");
    // With room enough, the same output is a valid (if wasteful) answer.
    let mut config = roomy_hostile();
    config.max_output = OutputBound::Fixed(200 << 20);
    let (mut plugin, _) = Plugin::load(&config, Some(cache())).unwrap();
    match plugin.filter(&Arc::new(vec![event("hostile/alias")])) {
        Ok(decisions) => assert!(matches!(&decisions[0], ferry::plugin::Decision::Replace(r) if r.len() == 100)),
        // Copied out, its post-return then frees one buffer a hundred times,
        // which may trap or spin in the plugin's allocator.
        Err(e) => assert!(matches!(e, PluginError::Trap(_) | PluginError::Timeout(_)), "{e}"),
    }
}

#[test]
fn a_trap_reason_is_one_line_with_what_the_plugin_said() {
    let (mut plugin, _) = Plugin::load(&hostile_config(OnError::DeadLetter), Some(cache())).unwrap();
    let e = plugin.filter(&Arc::new(vec![convert::to_wit(&body("hostile/trap"), 0, 0)])).unwrap_err();
    let PluginError::Trap(reason) = &e else { panic!("a trap: {e}") };
    assert!(!reason.contains('\n'), "one line: {reason}");
    assert!(reason.contains("unreachable"), "names the trap: {reason}");
    assert!(reason.contains("asked to trap"), "quotes the plugin's panic message: {reason}");
    assert!(!reason.contains("wasm backtrace"), "the backtrace goes to the debug log: {reason}");
    assert!(plugin.status().last_error.unwrap().starts_with("plugin hostile: plugin trapped: "));
}

fn body(subject: &str) -> ferry::event::EventBody {
    ferry::event::EventBody {
        id: "1".into(),
        source: "ferry://t".into(),
        ty: "t".into(),
        subject: subject.into(),
        time_nanos: 0,
        datacontenttype: None,
        data: Vec::new(),
        partitionkey: None,
        extensions: Vec::new(),
    }
}

#[test]
fn repeated_failures_open_the_circuit_and_a_later_success_closes_it() {
    let (mut plugin, _) = Plugin::load(&hostile_config(OnError::DeadLetter), Some(cache())).unwrap();
    plugin.set_breaker(BreakerConfig {
        failures_to_open: 3,
        open_for: Duration::from_millis(300),
        max_open_for: Duration::from_secs(1),
    });
    let event = |topic: &str| {
        let mut e = convert::to_wit(
            &ferry::event::EventBody {
                id: "1".into(),
                source: "ferry://t".into(),
                ty: "t".into(),
                subject: topic.into(),
                time_nanos: 0,
                datacontenttype: None,
                data: Vec::new(),
                partitionkey: None,
                extensions: Vec::new(),
            },
            0,
            0,
        );
        e.sequence = 1;
        e
    };
    for _ in 0..3 {
        assert!(matches!(plugin.filter(&Arc::new(vec![event("hostile/trap")])), Err(PluginError::Trap(_))));
    }
    let calls = plugin.status().calls;
    assert!(matches!(plugin.filter(&Arc::new(vec![event("good/1")])), Err(PluginError::CircuitOpen)));
    assert_eq!(plugin.status().calls, calls, "an open circuit does not call the plugin");
    assert_eq!(plugin.status().circuit, ferry::plugin::CircuitState::Open);
    std::thread::sleep(Duration::from_millis(350));
    assert_eq!(plugin.filter(&Arc::new(vec![event("good/1")])).unwrap().len(), 1, "the half-open trial succeeds");
    assert_eq!(plugin.status().circuit, ferry::plugin::CircuitState::Closed);
}

#[test]
fn fuel_bounds_a_runaway_plugin_deterministically() {
    let mut config = hostile_config(OnError::DeadLetter);
    config.cpu = CpuLimit::Fuel(5_000_000);
    let (mut plugin, _) = Plugin::load(&config, Some(cache())).unwrap();
    let mut e = convert::to_wit(
        &ferry::event::EventBody {
            id: "1".into(),
            source: "ferry://t".into(),
            ty: "t".into(),
            subject: "hostile/loop".into(),
            time_nanos: 0,
            datacontenttype: None,
            data: Vec::new(),
            partitionkey: None,
            extensions: Vec::new(),
        },
        0,
        0,
    );
    assert!(matches!(plugin.filter(&Arc::new(vec![e.clone()])), Err(PluginError::Timeout(CpuLimit::Fuel(_)))));
    e.subject = "good/1".into();
    assert_eq!(plugin.filter(&Arc::new(vec![e])).unwrap().len(), 1);
    assert!(plugin.status().fuel_used >= 5_000_000);
}

#[test]
fn a_restart_loads_the_compiled_plugin_from_the_cache_instead_of_compiling() {
    let dir = tempfile::tempdir().unwrap();
    let config = PluginConfig::new("lww", built_plugin("lww-merge"), World::Merge);
    let (_, first) = Plugin::load(&config, Some(dir.path())).unwrap();
    let (_, second) = Plugin::load(&config, Some(dir.path())).unwrap();
    assert_eq!(first.source, ferry::plugin::engine::CompileSource::Compiled);
    assert_eq!(second.source, ferry::plugin::engine::CompileSource::Cache);
    // A torn or foreign file under the key is ignored and replaced.
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        std::fs::write(entry.unwrap().path(), b"garbage").unwrap();
    }
    let (_, third) = Plugin::load(&config, Some(dir.path())).unwrap();
    assert_eq!(third.source, ferry::plugin::engine::CompileSource::Compiled);
}

/// Runs `ferry ARGS` with no plugin cache override, as an operator would.
fn ferry(args: &[&str]) -> (i32, String) {
    let out = Command::new(ferry_bin!())
        .args(args)
        .env_remove("FERRY_PLUGIN_CACHE")
        .env_remove("FERRY_CONFIG")
        .env("RUST_LOG", "warn")
        .output()
        .expect("running ferry");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn config_check_loads_each_plugin_so_a_wrong_world_or_config_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = |world: &str, file: &str, extra: &str| {
        format!(
            "[[plugin]]\nname = \"p\"\npath = {:?}\nworld = \"{world}\"\n{extra}",
            built_plugin(file).display().to_string()
        )
    };
    let config = write_config(dir.path(), "");
    let base = std::fs::read_to_string(&config).unwrap();
    let check = |tail: String| {
        std::fs::write(&config, format!("{base}{tail}")).unwrap();
        ferry(&["config", "check", "--config", config.to_str().unwrap()])
    };
    let (code, out) = check(plugin("filter", "lww-merge", "stage = \"ingest\"\n"));
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("plugin[0].world") && out.contains("does not target the `filter` world"), "{out}");
    let (code, out) = check(plugin("merge", "testdata/gcounter-merge", "config = { merge = \"avg\" }\n"));
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("plugin[0].config") && out.contains("`avg` is not"), "the plugin's own words: {out}");
    let (code, out) = check(plugin("merge", "testdata/gcounter-merge", "config = { merge = \"sum\" }\n"));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("plugin      p (merge world"), "{out}");
    // The compile went into the agent's own cache: `run` will not compile again.
    // (Both components: the wrong-world one compiled before its world was checked.)
    let cached = std::fs::read_dir(dir.path().join("data/plugin-cache")).unwrap().count();
    assert_eq!(cached, 2);
    let (_, out) = check(plugin("merge", "testdata/gcounter-merge", ""));
    assert!(out.contains("Cache"), "the second check loads from the shared cache: {out}");
}

#[test]
fn precompiling_with_the_agents_config_fills_its_compile_cache() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let wasm = built_plugin("lww-merge");
    let artifact = dir.path().join("lww.cwasm");
    let (code, out) = ferry(&[
        "plugin",
        "precompile",
        wasm.to_str().unwrap(),
        "-o",
        artifact.to_str().unwrap(),
        "--agent-config",
        config.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("in the compile cache too"), "{out}");
    let spec = PluginConfig::new("lww", &wasm, World::Merge);
    let (_, report) = Plugin::load(&spec, Some(&dir.path().join("data/plugin-cache"))).unwrap();
    assert_eq!(report.source, ferry::plugin::engine::CompileSource::Cache, "the agent finds it compiled");
}

/// Where scripts/build-plugins.sh keeps the plugin toolchains.
fn tools() -> PathBuf {
    std::env::var_os("FERRY_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(&std::env::var_os("HOME").expect("HOME is set")).join(".cache/ferry-tools"))
}

fn run(command: &mut Command, what: &str) {
    let out = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Names `module` (Python source) uses but neither defines, imports nor
/// gets from the builtins: what would be a `NameError` only when that line runs.
fn python_undefined_names(module: &Path) -> String {
    const SCRIPT: &str = r#"
import ast, builtins, sys
tree = ast.parse(open(sys.argv[1]).read())
bound = set(dir(builtins))
for node in ast.walk(tree):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        bound.update((a.asname or a.name).split(".")[0] for a in node.names)
    elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        bound.add(node.name)
        bound.update(a.arg for a in node.args.args) if isinstance(node, ast.FunctionDef) else None
    elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
        bound.add(node.id)
    elif isinstance(node, ast.ExceptHandler) and node.name:
        bound.add(node.name)
    elif isinstance(node, ast.comprehension):
        bound.update(n.id for n in ast.walk(node.target) if isinstance(n, ast.Name))
used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
print(" ".join(sorted(used - bound)))
"#;
    let out = Command::new("python3").args(["-c", SCRIPT]).arg(module).output().expect("running python3");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Each language's scaffold, as generated: its unit tests pass, it builds,
/// and it passes `ferry plugin check` on its own samples, in both worlds.
#[test]
fn scaffolded_plugins_of_every_language_and_both_worlds_test_build_and_pass_plugin_check() {
    let dir = tempfile::tempdir().unwrap();
    let scratch = dir.path().to_str().unwrap();
    // Shared across runs so the Rust scaffolds' dependencies build once.
    let rust_target = ferry_bin!().parent().expect("binary dir").join("scaffold-target");
    let tools = tools();
    let adapter = tools.join("npm/node_modules/@bytecodealliance/jco/lib/wasi_snapshot_preview1.reactor.wasm");
    assert!(adapter.is_file(), "{} is missing: run scripts/build-plugins.sh first", adapter.display());
    // tools/bin holds node (Node.js from PyPI: a fresh machine has no other).
    let path = format!(
        "{}:{}:{}:{}:{}",
        tools.join("bin").display(),
        tools.join("cargo/bin").display(),
        tools.join("venv/bin").display(),
        tools.join("npm/node_modules/.bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    for world in ["filter", "merge"] {
        let mut components = Vec::new();
        for lang in ["rust", "c", "python", "js"] {
            let name = format!("{lang}-{world}");
            let (ok, out) = ferry_plugin(&["new", "--lang", lang, "--world", world, &name, "--dir", scratch]);
            assert!(ok && out.contains(&format!("{world} plugin")), "{out}");
            let root = dir.path().join(&name);
            let wasm = if lang == "rust" {
                let cargo = |args: &[&str]| {
                    let mut c = Command::new("cargo");
                    c.args(args).current_dir(&root).env("CARGO_TARGET_DIR", &rust_target).env_remove("RUSTFLAGS");
                    c
                };
                run(&mut cargo(&["test", "--quiet"]), &format!("the {name} scaffold's unit tests"));
                run(
                    &mut cargo(&["build", "--release", "--quiet", "--target", "wasm32-wasip2"]),
                    &format!("building the {name} scaffold"),
                );
                rust_target.join(format!("wasm32-wasip2/release/{}.wasm", name.replace('-', "_")))
            } else {
                // Each build.sh runs the scaffold's unit tests first.
                run(
                    Command::new(root.join("build.sh")).env("ADAPTER", &adapter).env("PATH", &path),
                    &format!("testing and building the {name} scaffold"),
                );
                root.join(format!("{name}.wasm"))
            };
            if lang == "python" {
                let undefined = python_undefined_names(&root.join("app.py"));
                assert!(undefined.is_empty(), "{name}/app.py uses names it does not import: {undefined}");
            }
            components.push((wasm, root.join("samples.json")));
        }
        for (component, samples) in components {
            let (ok, out) = ferry_plugin(&[
                "check",
                component.to_str().unwrap(),
                "--world",
                world,
                "--samples",
                samples.to_str().unwrap(),
            ]);
            assert!(ok && out.contains("checks passed") && !out.contains("FAIL"), "{}:\n{out}", component.display());
        }
    }
}
