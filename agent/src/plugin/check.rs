//! `ferry plugin check` and `ferry plugin bench` as library functions.
//!
//! The check loads a component against the worlds, then runs it on inputs
//! from [`super::inputs`]: mutations of the author's own example values, a
//! declared shape, or the built-in shapes (always from a fixed seed, so a
//! failure reproduces). Filters must not fail (the host checks every
//! verdict, as at a stage) and must answer the same for the same input from
//! a fresh instance. Merge functions must be deterministic, commutative,
//! associative and idempotent; a broken law is reported with the form that
//! broke, the two expressions that disagree and a counter-example shrunk to
//! a minimal one. A law no input could test (the plugin refused them all)
//! is inconclusive, which is neither a pass nor a failure. The bench
//! measures per-event cost at several batch sizes and cold versus cached start.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::inputs::{Gen, Source, shrink};
use super::{CpuLimit, Decision, OutputBound, Plugin, PluginConfig, PluginError, Versioned, WitEvent, World};

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
    /// Output bound per call.
    pub max_output: OutputBound,
    /// Generated cases per property.
    pub cases: usize,
    /// Where the data comes from: the author's samples or shape, else the
    /// built-in shapes.
    pub sources: Vec<Source>,
}

impl Default for CheckOptions {
    fn default() -> Self {
        let defaults = PluginConfig::new("check", "", World::Filter);
        Self {
            world: None,
            config: BTreeMap::new(),
            cpu: defaults.cpu,
            memory_bytes: defaults.memory_bytes,
            max_output: defaults.max_output,
            cases: 100,
            sources: Vec::new(),
        }
    }
}

impl CheckOptions {
    /// The sources a run uses: the given ones, else the built-in shapes.
    fn sources(&self) -> Vec<Source> {
        if self.sources.is_empty() { Source::builtins() } else { self.sources.clone() }
    }
}

/// How a property came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It held on every case that ran.
    Pass,
    /// It broke (the detail has the counter-example).
    Fail,
    /// No case could test it: the plugin refused every input.
    Inconclusive,
}

/// One property's outcome.
#[derive(Debug, Clone)]
pub struct Finding {
    /// What was checked.
    pub property: String,
    /// How it came out.
    pub outcome: Outcome,
    /// Cases that ran and held (or, for a failure, held before it broke).
    pub cases: usize,
    /// Evidence: figures when it held, a counter-example when it did not.
    pub detail: String,
}

impl Finding {
    /// Whether it held.
    pub fn passed(&self) -> bool {
        self.outcome == Outcome::Pass
    }
}

/// The result of a check.
#[derive(Debug, Clone)]
pub struct CheckReport {
    /// The world the component targets.
    pub world: World,
    /// Where the inputs came from, one line per source.
    pub inputs: Vec<String>,
    /// One line per property.
    pub findings: Vec<Finding>,
}

impl CheckReport {
    /// Whether every property held.
    pub fn passed(&self) -> bool {
        self.outcome() == Outcome::Pass
    }

    /// Fail if any property failed, else inconclusive if any was, else pass.
    pub fn outcome(&self) -> Outcome {
        let any = |o| self.findings.iter().any(|f| f.outcome == o);
        if any(Outcome::Fail) {
            Outcome::Fail
        } else if any(Outcome::Inconclusive) {
            Outcome::Inconclusive
        } else {
            Outcome::Pass
        }
    }
}

fn plugin_config(path: &Path, world: World, options: &CheckOptions) -> PluginConfig {
    let mut config = PluginConfig::new("check", path, world);
    config.config = options.config.clone();
    config.cpu = options.cpu;
    config.memory_bytes = options.memory_bytes;
    config.max_output = options.max_output;
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
        outcome: Outcome::Pass,
        cases: 1,
        detail: "exports match; every import is provided".into(),
    }];
    let sources = options.sources();
    match world {
        World::Filter => check_filter(&mut plugin, options, &sources, &mut findings),
        World::Merge => check_merge(&mut plugin, options, &sources, &mut findings),
    }
    let inputs = sources.iter().map(Source::describe).collect();
    Ok(CheckReport { world, inputs, findings })
}

const SUBJECTS: [&str; 8] =
    ["telemetry/temp", "telemetry/raw/x", "alerts/fire", "debug/trace", "a", "state/door/1", "logs/app", "x/y/z"];
const FIELDS: [&str; 5] = ["temp", "value", "reading", "level", "secret"];

/// A generated event: with the author's data when there are sources, else
/// JSON readings of several shapes, text and binary data.
fn gen_event(g: &mut Gen, n: u64, sources: &[Source]) -> WitEvent {
    let number = (g.below(2001) as f64 - 1000.0) / 10.0;
    let (data, content_type) = if sources.is_empty() {
        match g.below(6) {
            0 => (json!({ *g.pick(&FIELDS): number }).to_string().into_bytes(), Some("application/json")),
            1 => (
                json!({ "reading": { "celsius": number }, "secret": "s3cr3t" }).to_string().into_bytes(),
                Some("application/json"),
            ),
            2 => (json!([number, "x", null]).to_string().into_bytes(), Some("application/json")),
            3 => (b"plain text".to_vec(), Some("text/plain")),
            4 => ((0..g.below(64)).map(|_| g.next_u64() as u8).collect(), None),
            _ => (Vec::new(), None),
        }
    } else {
        let source = &sources[n as usize % sources.len()];
        let data = source.value(g, n as usize / sources.len());
        let json = serde_json::from_slice::<serde::de::IgnoredAny>(&data).is_ok();
        (data, json.then_some("application/json"))
    };
    WitEvent {
        id: format!("check-{n}"),
        source: "ferry://check".into(),
        type_: "ferry.event".into(),
        subject: (*g.pick(&SUBJECTS)).into(),
        time: "2026-01-01T00:00:00Z".into(),
        datacontenttype: content_type.map(str::to_owned),
        data,
        sequence: n + 1,
        hlc: (1_700_000_000_000 + n) << 16,
        partitionkey: (g.below(2) == 0).then(|| format!("k{}", g.below(4))),
        extensions: Vec::new(),
    }
}

fn check_filter(plugin: &mut Plugin, options: &CheckOptions, sources: &[Source], findings: &mut Vec<Finding>) {
    let mut g = Gen::new(0xF1_17E5);
    // The author's data, when given, replaces the built-in event mix.
    let data_sources: &[Source] = if options.sources.is_empty() { &[] } else { sources };
    let mut n = 0;
    let batches: Vec<Arc<Vec<WitEvent>>> = (0..options.cases.max(1))
        .map(|i| {
            let size = [0, 1, 2, 3, 8, 16, 64][i % 7];
            (0..size)
                .map(|_| {
                    n += 1;
                    gen_event(&mut g, n, data_sources)
                })
                .collect::<Vec<_>>()
        })
        .map(Arc::new)
        .collect();
    // Ok: every batch's decisions and the slowest call; Err: the failing batch.
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
    let property = "no failures and valid output on every batch (one verdict per event, valid replacements, \
                    destination names as routes, within max_output)";
    let first = match run(plugin) {
        Ok(first) => {
            findings.push(Finding {
                property: property.into(),
                outcome: Outcome::Pass,
                cases: batches.len(),
                detail: format!("{} batches, {events} events; slowest call {:.2?}", batches.len(), first.1),
            });
            first.0
        }
        Err((i, e)) => {
            findings.push(Finding {
                property: property.into(),
                outcome: Outcome::Fail,
                cases: i,
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
            Some(i) => Err((
                i,
                format!(
                    "batch {i} ({} events) got {:?} then {:?} from a fresh instance",
                    batches[i].len(),
                    first[i],
                    second[i]
                ),
            )),
        },
        Err((i, e)) => Err((i, format!("batch {i} failed on a fresh instance: {e}"))),
    };
    let (outcome, cases, detail) = match verdict {
        Ok(detail) => (Outcome::Pass, batches.len(), detail),
        Err((i, detail)) => (Outcome::Fail, i, detail),
    };
    findings.push(Finding { property: "deterministic (same input, same verdicts)".into(), outcome, cases, detail });
}

/// A version written by `origin`, concurrent with the other generated ones
/// (each origin appears only in its own vector).
fn gen_versioned(g: &mut Gen, source: &Source, case: usize, origin: &str) -> Versioned {
    Versioned {
        data: source.value(g, case),
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
            Law::Idempotent => "idempotent: merge(x, x) = x, and merge(merge(a, b), b) = merge(a, b)",
        }
    }
}

/// Outcome of one law on one triple.
enum Trial {
    Holds,
    /// The plugin refused an input (an `err` result): nothing to compare.
    Refused(String),
    /// The law is broken: the form that broke and the two sides that differ.
    Broken(Broken),
}

/// One broken form of a law: each side's expression and what it gave.
#[derive(Debug, Clone)]
struct Broken {
    form: &'static str,
    left: (&'static str, Vec<u8>),
    right: (&'static str, Vec<u8>),
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
    let broken = |form, left: (&'static str, Vec<u8>), right: (&'static str, Vec<u8>)| {
        if left.1 == right.1 { Trial::Holds } else { Trial::Broken(Broken { form, left, right }) }
    };
    Ok(match law {
        Law::Deterministic => {
            let once = m!(a, b).data;
            broken("merge(a, b) = merge(a, b)", ("merge(a, b)", once), ("merge(a, b) again", m!(a, b).data))
        }
        Law::Commutative => {
            broken("merge(a, b) = merge(b, a)", ("merge(a, b)", m!(a, b).data), ("merge(b, a)", m!(b, a).data))
        }
        Law::Associative => {
            let ab = m!(a, b);
            let bc = m!(b, c);
            broken(
                "merge(merge(a, b), c) = merge(a, merge(b, c))",
                ("merge(merge(a, b), c)", m!(&ab, c).data),
                ("merge(a, merge(b, c))", m!(a, &bc).data),
            )
        }
        Law::Idempotent => {
            let ab = m!(a, b);
            let again = m!(&ab, &ab);
            match broken("merge(x, x) = x, where x = merge(a, b)", ("merge(x, x)", again.data), ("x", ab.data.clone()))
            {
                Trial::Holds => broken(
                    "merge(merge(a, b), b) = merge(a, b)",
                    ("merge(merge(a, b), b)", m!(&ab, b).data),
                    ("merge(a, b)", ab.data),
                ),
                other => other,
            }
        }
    })
}

fn show_data(data: &[u8]) -> String {
    String::from_utf8_lossy(data).into_owned()
}

fn show(v: &Versioned) -> String {
    format!("{{ data: {}, origin: {}, hlc: {}, version: {:?} }}", show_data(&v.data), v.origin, v.hlc, v.version)
}

/// How many inputs a law may try per case it is asked for: inputs the
/// plugin refuses (mutations of a sample can leave its shape) do not count,
/// so a law still runs its cases when most inputs are refused.
const TRIES_PER_CASE: usize = 10;

fn check_merge(plugin: &mut Plugin, options: &CheckOptions, sources: &[Source], findings: &mut Vec<Finding>) {
    let mut g = Gen::new(0x3E_76E5);
    let cases = options.cases.max(sources.len());
    let mut triples = Vec::new();
    for i in 0..cases * TRIES_PER_CASE {
        let source = &sources[i % sources.len()];
        let case = i / sources.len();
        triples.push([
            gen_versioned(&mut g, source, case, "r1"),
            gen_versioned(&mut g, source, case, "r2"),
            gen_versioned(&mut g, source, case, "r3"),
        ]);
    }
    // `none` as current is the first write of a key: it must not fail either.
    let mut no_current = None;
    let mut held = 0;
    for [a, ..] in triples.iter().take(cases) {
        if let Err(e) = plugin.merge("check/key", None, a) {
            no_current = Some(format!("merge(none, a) failed: {e}\n  a = {}", show(a)));
            break;
        }
        held += 1;
    }
    findings.push(Finding {
        property: "no failures with no current value: merge(none, a)".into(),
        outcome: if no_current.is_none() { Outcome::Pass } else { Outcome::Fail },
        cases: held,
        detail: no_current.unwrap_or_else(|| format!("{held} cases held")),
    });
    for law in Law::ALL {
        let (mut checked, mut refused, mut last_refusal) = (0usize, 0usize, String::new());
        let mut broken = None;
        for triple in &triples {
            if checked == cases {
                break;
            }
            match trial(plugin, law, triple) {
                Ok(Trial::Holds) => checked += 1,
                Ok(Trial::Refused(why)) => {
                    refused += 1;
                    last_refusal = why;
                }
                Ok(Trial::Broken(_)) => {
                    broken = Some(minimise(plugin, law, triple.clone()));
                    break;
                }
                Err(e) => {
                    broken = Some(format!(
                        "the plugin failed: {e}\n  a = {}\n  b = {}\n  c = {}",
                        show(&triple[0]),
                        show(&triple[1]),
                        show(&triple[2])
                    ));
                    break;
                }
            }
        }
        let (outcome, detail) = match broken {
            Some(counter_example) => {
                (Outcome::Fail, format!("broke after {checked} cases held; counter-example:\n  {counter_example}"))
            }
            None if checked == 0 => (
                Outcome::Inconclusive,
                format!(
                    "inconclusive: the plugin refused all {refused} inputs (last: {last_refusal}); \
                     give it your own data with --samples FILE or --shape SHAPE"
                ),
            ),
            None => (Outcome::Pass, format!("{checked} cases held, {refused} inputs refused by the plugin")),
        };
        findings.push(Finding { property: law.describe().into(), outcome, cases: checked, detail });
    }
}

/// Smaller variants of a state's data, JSON-aware (see [`shrink`]); for
/// non-JSON data, one byte removed.
fn shrink_versioned(v: &Versioned) -> Vec<Versioned> {
    let with = |data: Vec<u8>| Versioned { data, ..v.clone() };
    match serde_json::from_slice::<Value>(&v.data) {
        Ok(value) => shrink(&value).into_iter().map(|s| with(serde_json::to_vec(&s).expect("JSON"))).collect(),
        Err(_) => (0..v.data.len())
            .map(|i| {
                let mut fewer = v.data.clone();
                fewer.remove(i);
                with(fewer)
            })
            .collect(),
    }
}

/// Shrinks a triple that breaks `law` while it keeps breaking it, and
/// describes the smallest one found: the form that broke, the inputs, and
/// what each side of the form gave.
fn minimise(plugin: &mut Plugin, law: Law, mut triple: [Versioned; 3]) -> String {
    let broken = |plugin: &mut Plugin, t: &[Versioned; 3]| match trial(plugin, law, t) {
        Ok(Trial::Broken(b)) => Some(b),
        _ => None,
    };
    for _ in 0..200 {
        let mut smaller = None;
        'search: for slot in 0..3 {
            for candidate in shrink_versioned(&triple[slot]) {
                let mut t = triple.clone();
                t[slot] = candidate;
                if broken(plugin, &t).is_some() {
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
    let Some(b) = broken(plugin, &triple) else {
        return format!("a = {}\n  b = {}\n  c = {}", show(&triple[0]), show(&triple[1]), show(&triple[2]));
    };
    let mut out = format!("the form {} broke\n  a = {}\n  b = {}", b.form, show(&triple[0]), show(&triple[1]));
    if law == Law::Associative {
        let _ = write!(out, "\n  c = {}", show(&triple[2]));
    }
    let width = b.left.0.len().max(b.right.0.len());
    let _ = write!(
        out,
        "\n  {:<width$} gave {}\n  {:<width$} gave {}",
        b.left.0,
        show_data(&b.left.1),
        b.right.0,
        show_data(&b.right.1)
    );
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
            let mut g = Gen::new(7);
            for &batch in batches {
                let events = bench_batch(&mut g, batch);
                plugin.filter(&events)?;
                timings.push(time(batch, min_time, || plugin.filter(&events).map(drop))?);
            }
        }
        World::Merge => {
            let mut g = Gen::new(7);
            let source = &options.sources()[0];
            let a = gen_versioned(&mut g, source, 3, "r1");
            let b = gen_versioned(&mut g, source, 3, "r2");
            timings.push(time(1, min_time, || plugin.merge("bench", Some(&a), &b).map(drop))?);
        }
    }
    Ok(BenchReport { world, cold_start, cached_start, timings })
}

/// The bench's events: a JSON reading each, on the generated subjects.
pub fn bench_batch(g: &mut Gen, batch: usize) -> Arc<Vec<WitEvent>> {
    (0..batch as u64)
        .map(|n| {
            let mut e = gen_event(g, n, &[]);
            e.data = format!("{{\"temp\": {}}}", n % 40).into_bytes();
            e.datacontenttype = Some("application/json".into());
            e
        })
        .collect::<Vec<_>>()
        .into()
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
    fn shrinking_a_state_is_json_aware_and_byte_wise_otherwise() {
        let smaller: Vec<String> = shrink_versioned(&state(r#"["a","b"]"#))
            .iter()
            .map(|v| String::from_utf8(v.data.clone()).unwrap())
            .collect();
        assert_eq!(smaller, [r#"["b"]"#, r#"["a"]"#]);
        assert_eq!(shrink_versioned(&state(r#"{"a":1}"#))[0].data, b"{}");
        assert_eq!(shrink_versioned(&state("ab")).len(), 2);
    }

    #[test]
    fn generated_inputs_are_the_same_on_every_run() {
        let (mut a, mut b) = (Gen::new(1), Gen::new(1));
        assert_eq!(gen_event(&mut a, 1, &[]), gen_event(&mut b, 1, &[]));
        let source = Source::Builtin("pn-counters");
        assert_eq!(gen_versioned(&mut a, &source, 4, "r1"), gen_versioned(&mut b, &source, 4, "r1"));
    }

    #[test]
    fn a_report_is_inconclusive_only_when_nothing_failed() {
        let finding = |outcome| Finding { property: String::new(), outcome, cases: 0, detail: String::new() };
        let report = |outcomes: &[Outcome]| CheckReport {
            world: World::Merge,
            inputs: Vec::new(),
            findings: outcomes.iter().map(|&o| finding(o)).collect(),
        };
        assert_eq!(report(&[Outcome::Pass, Outcome::Pass]).outcome(), Outcome::Pass);
        assert_eq!(report(&[Outcome::Pass, Outcome::Inconclusive]).outcome(), Outcome::Inconclusive);
        assert_eq!(report(&[Outcome::Inconclusive, Outcome::Fail]).outcome(), Outcome::Fail);
    }
}
