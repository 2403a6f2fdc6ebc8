//! `ferry plugin check` and `ferry plugin bench` as library functions.
//!
//! The check loads a component against the worlds, then runs it on inputs
//! generated from a fixed seed (so a failure reproduces): filters must not
//! fail, must return valid verdicts and must answer the same for the same
//! input from a fresh instance; merge functions must be deterministic,
//! commutative, associative and idempotent, and a broken law is reported
//! with a counter-example shrunk to a minimal one. The bench measures
//! per-event cost at several batch sizes and cold versus cached start.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{CpuLimit, Decision, Plugin, PluginConfig, PluginError, Versioned, WitEvent, World};

/// What to check and with which settings.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// The world to check against; `None` tries both.
    pub world: Option<World>,
    /// The plugin's config table.
    pub config: BTreeMap<String, String>,
    /// CPU bound per call.
    pub cpu: CpuLimit,
    /// Memory bound.
    pub memory_bytes: u64,
    /// Generated cases per property.
    pub cases: usize,
}

impl Default for CheckOptions {
    fn default() -> Self {
        let defaults = PluginConfig::new("check", "", World::Filter);
        Self {
            world: None,
            config: BTreeMap::new(),
            cpu: defaults.cpu,
            memory_bytes: defaults.memory_bytes,
            cases: 100,
        }
    }
}

/// One property's outcome.
#[derive(Debug, Clone)]
pub struct Finding {
    /// What was checked.
    pub property: String,
    /// Whether it held.
    pub passed: bool,
    /// Evidence: figures when it held, a counter-example when it did not.
    pub detail: String,
}

/// The result of a check.
#[derive(Debug, Clone)]
pub struct CheckReport {
    /// The world the component targets.
    pub world: World,
    /// One line per property.
    pub findings: Vec<Finding>,
}

impl CheckReport {
    /// Whether every property held.
    pub fn passed(&self) -> bool {
        self.findings.iter().all(|f| f.passed)
    }
}

fn plugin_config(path: &Path, world: World, options: &CheckOptions) -> PluginConfig {
    let mut config = PluginConfig::new("check", path, world);
    config.config = options.config.clone();
    config.cpu = options.cpu;
    config.memory_bytes = options.memory_bytes;
    config
}

/// Loads `path` against `options.world`, or against each world in turn.
pub fn load(path: &Path, options: &CheckOptions, cache_dir: Option<&Path>) -> Result<Plugin, PluginError> {
    let wasm = std::fs::read(path)
        .map_err(|e| PluginError::Read { path: path.display().to_string(), reason: e.to_string() })?;
    let worlds = match options.world {
        Some(w) => vec![w],
        None => vec![World::Filter, World::Merge],
    };
    let mut last = None;
    for world in worlds {
        match Plugin::from_bytes(&plugin_config(path, world, options), &wasm, cache_dir) {
            Ok((plugin, _)) => return Ok(plugin),
            Err(e @ PluginError::WrongWorld { .. }) => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.expect("at least one world was tried"))
}

/// Runs every check on the component at `path`.
pub fn check(path: &Path, options: &CheckOptions, cache_dir: Option<&Path>) -> Result<CheckReport, PluginError> {
    let mut plugin = load(path, options, cache_dir)?;
    let world = plugin.world();
    let mut findings = vec![Finding {
        property: format!("targets ferry:plugin/{}", world.as_str()),
        passed: true,
        detail: "exports match; every import is provided".into(),
    }];
    match world {
        World::Filter => check_filter(&mut plugin, options, &mut findings),
        World::Merge => check_merge(&mut plugin, options, &mut findings),
    }
    Ok(CheckReport { world, findings })
}

/// A small deterministic generator (SplitMix64), so every run checks the
/// same inputs and a failure reproduces.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
}

const SUBJECTS: [&str; 8] =
    ["telemetry/temp", "telemetry/raw/x", "alerts/fire", "debug/trace", "a", "state/door/1", "logs/app", "x/y/z"];
const FIELDS: [&str; 5] = ["temp", "value", "reading", "level", "secret"];

/// A generated event: JSON readings of several shapes, text and binary data.
fn gen_event(g: &mut Gen, n: u64) -> WitEvent {
    let number = (g.below(2001) as f64 - 1000.0) / 10.0;
    let (data, content_type) = match g.below(6) {
        0 => (json!({ g.pick(&FIELDS): number }).to_string().into_bytes(), Some("application/json")),
        1 => (
            json!({ "reading": { "celsius": number }, "secret": "s3cr3t" }).to_string().into_bytes(),
            Some("application/json"),
        ),
        2 => (json!([number, "x", null]).to_string().into_bytes(), Some("application/json")),
        3 => (b"plain text".to_vec(), Some("text/plain")),
        4 => ((0..g.below(64)).map(|_| g.next() as u8).collect(), None),
        _ => (Vec::new(), None),
    };
    WitEvent {
        id: format!("check-{n}"),
        source: "ferry://check".into(),
        type_: "ferry.event".into(),
        subject: g.pick(&SUBJECTS).into(),
        time: "2026-01-01T00:00:00Z".into(),
        datacontenttype: content_type.map(str::to_owned),
        data,
        sequence: n + 1,
        hlc: (1_700_000_000_000 + n) << 16,
        partitionkey: (g.below(2) == 0).then(|| format!("k{}", g.below(4))),
        extensions: Vec::new(),
    }
}

fn check_filter(plugin: &mut Plugin, options: &CheckOptions, findings: &mut Vec<Finding>) {
    let mut g = Gen(0xF1_17E5);
    let mut n = 0;
    let batches: Vec<Arc<Vec<WitEvent>>> = (0..options.cases.max(1))
        .map(|i| {
            let size = [0, 1, 2, 3, 8, 16, 64][i % 7];
            (0..size)
                .map(|_| {
                    n += 1;
                    gen_event(&mut g, n)
                })
                .collect::<Vec<_>>()
        })
        .map(Arc::new)
        .collect();
    // Ok: every batch's verdicts and the slowest call; Err: the failing batch.
    type Run = Result<(Vec<Vec<Decision>>, Duration), (usize, PluginError)>;
    let run = |plugin: &mut Plugin| -> Run {
        let mut slowest = Duration::ZERO;
        let mut out = Vec::with_capacity(batches.len());
        for (i, batch) in batches.iter().enumerate() {
            let started = Instant::now();
            out.push(plugin.filter(batch).map_err(|e| (i, e))?);
            slowest = slowest.max(started.elapsed());
        }
        Ok((out, slowest))
    };
    let events: usize = batches.iter().map(|b| b.len()).sum();
    let first = match run(plugin) {
        Ok(first) => {
            findings.push(Finding {
                property: "no failures and valid output on generated batches".into(),
                passed: true,
                detail: format!("{} batches, {events} events; slowest call {:.2?}", batches.len(), first.1),
            });
            first.0
        }
        Err((i, e)) => {
            findings.push(Finding {
                property: "no failures and valid output on generated batches".into(),
                passed: false,
                detail: format!(
                    "batch {i} of {} events failed: {e}\n  first event: {:?}",
                    batches[i].len(),
                    batches[i].first()
                ),
            });
            return;
        }
    };
    plugin.reset();
    let verdict = match run(plugin) {
        Ok((second, _)) => match first.iter().zip(&second).position(|(a, b)| a != b) {
            None => Ok("a fresh instance gave identical verdicts".to_owned()),
            Some(i) => Err(format!(
                "batch {i} ({} events) got {:?} then {:?} from a fresh instance",
                batches[i].len(),
                first[i],
                second[i]
            )),
        },
        Err((i, e)) => Err(format!("batch {i} failed on a fresh instance: {e}")),
    };
    findings.push(Finding {
        property: "deterministic (same input, same verdicts)".into(),
        passed: verdict.is_ok(),
        detail: verdict.unwrap_or_else(|e| e),
    });
}

/// A generated state value for one of several data shapes a merge function
/// may expect: a JSON set of strings, a JSON map of PN-counters, a flat JSON
/// object, raw bytes.
fn gen_data(g: &mut Gen, shape: u64, size: u64) -> Vec<u8> {
    let names = ["a", "b", "c", "d", "e"];
    let value = match shape {
        0 => {
            let mut set: Vec<&str> = (0..g.below(size + 1)).map(|_| g.pick(&names)).collect();
            set.sort_unstable();
            set.dedup();
            json!(set)
        }
        1 => {
            let mut counters = serde_json::Map::new();
            for _ in 0..g.below(size + 1) {
                let side = |g: &mut Gen| {
                    let mut m = serde_json::Map::new();
                    for _ in 0..g.below(3) {
                        m.insert(format!("r{}", g.below(3) + 1), json!(g.below(5)));
                    }
                    Value::Object(m)
                };
                counters.insert(g.pick(&names).into(), json!({ "n": side(g), "p": side(g) }));
            }
            Value::Object(counters)
        }
        2 => {
            let mut m = serde_json::Map::new();
            for _ in 0..g.below(size + 1) {
                m.insert(g.pick(&names).into(), json!(g.below(10)));
            }
            Value::Object(m)
        }
        _ => return (0..g.below(size + 1)).map(|_| b'a' + g.below(3) as u8).collect(),
    };
    serde_json::to_vec(&value).expect("JSON values serialise")
}

/// A version written by `origin`, concurrent with the other generated ones
/// (each origin appears only in its own vector).
fn gen_versioned(g: &mut Gen, shape: u64, size: u64, origin: &str) -> Versioned {
    Versioned {
        data: gen_data(g, shape, size),
        version: vec![(origin.to_owned(), 1 + g.below(3))],
        hlc: (1_700_000_000_000 + g.below(4)) << 16,
        origin: origin.to_owned(),
    }
}

/// The merged version as the host computes it around the plugin's data.
fn combine(plugin: &mut Plugin, a: &Versioned, b: &Versioned) -> Result<Result<Versioned, String>, PluginError> {
    let data = match plugin.merge("check/key", Some(a), b)? {
        Ok(data) => data,
        Err(refusal) => return Ok(Err(refusal)),
    };
    let mut version: BTreeMap<String, u64> = a.version.iter().cloned().collect();
    for (origin, n) in &b.version {
        let e = version.entry(origin.clone()).or_default();
        *e = (*e).max(*n);
    }
    let (hlc, origin) = (a.hlc, &a.origin).max((b.hlc, &b.origin));
    Ok(Ok(Versioned { data, version: version.into_iter().collect(), hlc, origin: origin.clone() }))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Law {
    Deterministic,
    Commutative,
    Associative,
    Idempotent,
}

impl Law {
    const ALL: [Law; 4] = [Law::Deterministic, Law::Commutative, Law::Associative, Law::Idempotent];

    fn describe(self) -> &'static str {
        match self {
            Law::Deterministic => "deterministic: merge(a, b) twice gives the same data",
            Law::Commutative => "commutative: merge(a, b) = merge(b, a)",
            Law::Associative => "associative: merge(merge(a, b), c) = merge(a, merge(b, c))",
            Law::Idempotent => "idempotent: merge(x, x) = x and merge(merge(a, b), b) = merge(a, b)",
        }
    }
}

/// Outcome of one law on one triple.
enum Trial {
    Holds,
    /// The plugin refused an input (an `err` result): nothing to compare.
    Refused(String),
    /// The law is broken: the two sides that differ.
    Broken(Vec<u8>, Vec<u8>),
}

fn trial(plugin: &mut Plugin, law: Law, [a, b, c]: &[Versioned; 3]) -> Result<Trial, PluginError> {
    macro_rules! m {
        ($x:expr, $y:expr) => {
            match combine(plugin, $x, $y)? {
                Ok(v) => v,
                Err(refusal) => return Ok(Trial::Refused(refusal)),
            }
        };
    }
    let (left, right) = match law {
        Law::Deterministic => (m!(a, b).data, m!(a, b).data),
        Law::Commutative => (m!(a, b).data, m!(b, a).data),
        Law::Associative => {
            let ab = m!(a, b);
            let bc = m!(b, c);
            (m!(&ab, c).data, m!(a, &bc).data)
        }
        Law::Idempotent => {
            let ab = m!(a, b);
            let again = m!(&ab, &ab);
            if again.data != ab.data { (again.data, ab.data) } else { (m!(&ab, b).data, ab.data) }
        }
    };
    Ok(if left == right { Trial::Holds } else { Trial::Broken(left, right) })
}

/// Smaller variants of a state: one JSON element or member removed, or
/// (for non-JSON data) one byte removed.
fn shrink(v: &Versioned) -> Vec<Versioned> {
    let with = |data: Vec<u8>| Versioned { data, ..v.clone() };
    match serde_json::from_slice::<Value>(&v.data) {
        Ok(Value::Array(items)) => (0..items.len())
            .map(|i| {
                let mut fewer = items.clone();
                fewer.remove(i);
                with(serde_json::to_vec(&fewer).expect("JSON"))
            })
            .collect(),
        Ok(Value::Object(map)) => map
            .keys()
            .map(|k| {
                let mut fewer = map.clone();
                fewer.remove(k);
                with(serde_json::to_vec(&fewer).expect("JSON"))
            })
            .collect(),
        Ok(_) => Vec::new(),
        Err(_) => (0..v.data.len())
            .map(|i| {
                let mut fewer = v.data.clone();
                fewer.remove(i);
                with(fewer)
            })
            .collect(),
    }
}

fn show(v: &Versioned) -> String {
    format!(
        "{{ data: {}, origin: {}, hlc: {}, version: {:?} }}",
        String::from_utf8_lossy(&v.data),
        v.origin,
        v.hlc,
        v.version
    )
}

fn check_merge(plugin: &mut Plugin, options: &CheckOptions, findings: &mut Vec<Finding>) {
    let mut g = Gen(0x3E_76E5);
    let mut triples = Vec::new();
    for i in 0..options.cases.max(4) {
        let shape = i as u64 % 4;
        // Sizes grow with the case number, so the first failure is small.
        let size = 1 + (i / 4) as u64 % 6;
        triples.push([
            gen_versioned(&mut g, shape, size, "r1"),
            gen_versioned(&mut g, shape, size, "r2"),
            gen_versioned(&mut g, shape, size, "r3"),
        ]);
    }
    // `none` as current is the first write of a key: it must not fail either.
    let mut no_current = None;
    for [a, ..] in &triples {
        if let Err(e) = plugin.merge("check/key", None, a) {
            no_current = Some(format!("merge(none, {}) failed: {e}", show(a)));
            break;
        }
    }
    findings.push(Finding {
        property: "no failures with no current value".into(),
        passed: no_current.is_none(),
        detail: no_current.unwrap_or_else(|| format!("{} states", triples.len())),
    });
    for law in Law::ALL {
        let (mut checked, mut refused, mut last_refusal) = (0usize, 0usize, String::new());
        let mut broken = None;
        for triple in &triples {
            match trial(plugin, law, triple) {
                Ok(Trial::Holds) => checked += 1,
                Ok(Trial::Refused(why)) => {
                    refused += 1;
                    last_refusal = why;
                }
                Ok(Trial::Broken(..)) => {
                    broken = Some(minimise(plugin, law, triple.clone()));
                    break;
                }
                Err(e) => {
                    broken =
                        Some(format!("the plugin failed: {e}\n  a = {}\n  b = {}", show(&triple[0]), show(&triple[1])));
                    break;
                }
            }
        }
        let (passed, detail) = match broken {
            Some(counter_example) => (false, format!("counter-example:\n  {counter_example}")),
            None if checked == 0 => (
                false,
                format!("inconclusive: the plugin refused all {refused} generated inputs (last: {last_refusal})"),
            ),
            None => (true, format!("{checked} cases held, {refused} inputs refused by the plugin")),
        };
        findings.push(Finding { property: law.describe().into(), passed, detail });
    }
}

/// Shrinks a triple that breaks `law` while it keeps breaking it, and
/// describes the smallest one found.
fn minimise(plugin: &mut Plugin, law: Law, mut triple: [Versioned; 3]) -> String {
    let breaks = |plugin: &mut Plugin, t: &[Versioned; 3]| matches!(trial(plugin, law, t), Ok(Trial::Broken(..)));
    for _ in 0..200 {
        let mut smaller = None;
        'search: for slot in 0..3 {
            for candidate in shrink(&triple[slot]) {
                let mut t = triple.clone();
                t[slot] = candidate;
                if breaks(plugin, &t) {
                    smaller = Some(t);
                    break 'search;
                }
            }
        }
        match smaller {
            Some(t) => triple = t,
            None => break,
        }
    }
    let mut out = format!("a = {}\n  b = {}", show(&triple[0]), show(&triple[1]));
    if law == Law::Associative {
        let _ = write!(out, "\n  c = {}", show(&triple[2]));
    }
    if let Ok(Trial::Broken(left, right)) = trial(plugin, law, &triple) {
        let _ = write!(
            out,
            "\n  one side gives {}\n  the other gives {}",
            String::from_utf8_lossy(&left),
            String::from_utf8_lossy(&right)
        );
    }
    out
}

/// Timing of one batch size.
#[derive(Debug, Clone)]
pub struct BatchTiming {
    /// Events per call.
    pub batch: usize,
    /// Calls measured.
    pub calls: u64,
    /// Mean time per call.
    pub per_call: Duration,
    /// Mean time per event.
    pub per_event: Duration,
}

/// The result of a bench.
#[derive(Debug, Clone)]
pub struct BenchReport {
    /// The world benchmarked.
    pub world: World,
    /// Load with an empty cache (compile) plus the first instantiation.
    pub cold_start: Duration,
    /// Load from the compile cache plus the first instantiation.
    pub cached_start: Duration,
    /// Per batch size (filters) or per call (merge, batch 1).
    pub timings: Vec<BatchTiming>,
}

/// Measures cold and cached start (with a private cache in `scratch`) and
/// the per-event cost at each of `batches`, each for at least `min_time`.
pub fn bench(
    path: &Path,
    options: &CheckOptions,
    scratch: &Path,
    batches: &[usize],
    min_time: Duration,
) -> Result<BenchReport, PluginError> {
    let cache = scratch.join("bench-cache");
    let _ = std::fs::remove_dir_all(&cache);
    let started = Instant::now();
    let mut plugin = load(path, options, Some(&cache))?;
    plugin.warm_up()?;
    let cold_start = started.elapsed();
    drop(plugin);
    let started = Instant::now();
    let mut plugin = load(path, options, Some(&cache))?;
    plugin.warm_up()?;
    let cached_start = started.elapsed();
    let world = plugin.world();

    let mut timings = Vec::new();
    match world {
        World::Filter => {
            let mut g = Gen(7);
            for &batch in batches {
                let events: Arc<Vec<WitEvent>> = (0..batch as u64)
                    .map(|n| {
                        let mut e = gen_event(&mut g, n);
                        e.data = format!("{{\"temp\": {}}}", n % 40).into_bytes();
                        e.datacontenttype = Some("application/json".into());
                        e
                    })
                    .collect::<Vec<_>>()
                    .into();
                plugin.filter(&events)?;
                timings.push(time(batch, min_time, || plugin.filter(&events).map(drop))?);
            }
        }
        World::Merge => {
            let mut g = Gen(7);
            let a = gen_versioned(&mut g, 0, 3, "r1");
            let b = gen_versioned(&mut g, 0, 3, "r2");
            timings.push(time(1, min_time, || plugin.merge("bench", Some(&a), &b).map(drop))?);
        }
    }
    Ok(BenchReport { world, cold_start, cached_start, timings })
}

fn time(
    batch: usize,
    min_time: Duration,
    mut call: impl FnMut() -> Result<(), PluginError>,
) -> Result<BatchTiming, PluginError> {
    let started = Instant::now();
    let mut calls = 0u64;
    while calls < 10 || started.elapsed() < min_time {
        call()?;
        calls += 1;
    }
    let per_call = started.elapsed() / u32::try_from(calls).unwrap_or(u32::MAX);
    Ok(BatchTiming { batch, calls, per_call, per_event: per_call / u32::try_from(batch.max(1)).unwrap_or(1) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(data: &str) -> Versioned {
        Versioned { data: data.as_bytes().to_vec(), version: vec![("r1".into(), 1)], hlc: 1, origin: "r1".into() }
    }

    #[test]
    fn shrinking_removes_one_json_element_or_byte_at_a_time() {
        let smaller: Vec<String> =
            shrink(&state(r#"["a","b"]"#)).iter().map(|v| String::from_utf8(v.data.clone()).unwrap()).collect();
        assert_eq!(smaller, [r#"["b"]"#, r#"["a"]"#]);
        assert_eq!(shrink(&state(r#"{"a":1}"#))[0].data, b"{}");
        assert_eq!(shrink(&state("ab")).len(), 2);
        assert!(shrink(&state("7")).is_empty(), "a scalar is already minimal");
    }

    #[test]
    fn generated_inputs_are_the_same_on_every_run() {
        let (mut a, mut b) = (Gen(1), Gen(1));
        assert_eq!(gen_event(&mut a, 1), gen_event(&mut b, 1));
        assert_eq!(gen_versioned(&mut a, 1, 4, "r1"), gen_versioned(&mut b, 1, 4, "r1"));
    }
}
