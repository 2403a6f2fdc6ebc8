//! The data `ferry plugin check` runs a plugin on: mutations of the
//! author's own example values (`--samples`), values of a declared shape
//! (`--shape`), or, when the author gives neither, the built-in shapes.
//!
//! Everything comes from a [`Gen`] with a fixed seed, so a run checks the
//! same inputs every time and a failure reproduces. Pure: no plugin, no I/O.
//!
//! A mutation changes one place of a sample, at any depth: a number (kept
//! an integer, and non-negative if it was), a key added (a sibling's value,
//! mutated, under a new name: `gw-1` begets `gw-2`) or removed, an element
//! added or removed, a nested copy of a sibling object added, a string or
//! a boolean changed. Several mutations stack as the cases grow, so the
//! first cases are the author's values as given and later ones stray further.

use std::fmt;

use serde_json::{Map, Number, Value, json};

/// A small deterministic generator (SplitMix64).
#[derive(Debug, Clone)]
pub struct Gen(u64);

impl Gen {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Gen(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// One of `items`.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// A declared shape of JSON values: what an author's data looks like,
/// written as a JSON template. Scalars are type names (`"uint"`, `"int"`,
/// `"float"`, `"bool"`, `"string"`); `[S]` is a list of `S`; `{"*": S}` a map
/// from generated keys to `S`; any other object a record with those keys.
/// So a G-Counter is `{"counts": {"*": "uint"}}`.
#[derive(Debug, Clone, PartialEq)]
pub enum Shape {
    /// A non-negative integer.
    Uint,
    /// An integer.
    Int,
    /// A number with a fraction.
    Float,
    /// `true` or `false`.
    Bool,
    /// A short string.
    Str,
    /// A list of values of one shape.
    List(Box<Shape>),
    /// A map from generated keys to values of one shape.
    Map(Box<Shape>),
    /// An object with these keys.
    Record(Vec<(String, Shape)>),
}

impl Shape {
    /// Parses a shape template, naming the place and the mistake.
    pub fn parse(template: &Value) -> Result<Shape, String> {
        Self::parse_at(template, "$")
    }

    fn parse_at(template: &Value, at: &str) -> Result<Shape, String> {
        match template {
            Value::String(name) => match name.as_str() {
                "uint" => Ok(Shape::Uint),
                "int" => Ok(Shape::Int),
                "float" => Ok(Shape::Float),
                "bool" => Ok(Shape::Bool),
                "string" => Ok(Shape::Str),
                other => Err(format!(
                    "{at}: `{other}` is not a type (\"uint\", \"int\", \"float\", \"bool\", \"string\", [..], {{..}})"
                )),
            },
            Value::Array(items) => match items.as_slice() {
                [item] => Ok(Shape::List(Box::new(Self::parse_at(item, &format!("{at}[0]"))?))),
                _ => Err(format!("{at}: a list shape has exactly one element, the shape of every item")),
            },
            Value::Object(map) if map.len() == 1 && map.contains_key("*") => {
                Ok(Shape::Map(Box::new(Self::parse_at(&map["*"], &format!("{at}.*"))?)))
            }
            Value::Object(map) if map.is_empty() => Err(format!("{at}: an empty object is not a shape")),
            Value::Object(map) => map
                .iter()
                .map(|(k, v)| Ok((k.clone(), Self::parse_at(v, &format!("{at}.{k}"))?)))
                .collect::<Result<_, String>>()
                .map(Shape::Record),
            other => Err(format!("{at}: `{other}` is not a shape; write a type name such as \"uint\"")),
        }
    }

    /// A value of this shape with collections of up to `size` items.
    pub fn generate(&self, g: &mut Gen, size: u64) -> Value {
        match self {
            Shape::Uint => json!(g.below(10)),
            Shape::Int => json!(g.below(21) as i64 - 10),
            Shape::Float => json!((g.below(2001) as f64 - 1000.0) / 10.0),
            Shape::Bool => json!(g.below(2) == 0),
            Shape::Str => json!(*g.pick(&["a", "b", "c", "d", "e"])),
            Shape::List(item) => Value::Array((0..g.below(size + 1)).map(|_| item.generate(g, size)).collect()),
            Shape::Map(value) => {
                let mut m = Map::new();
                for _ in 0..g.below(size + 1) {
                    m.insert(format!("k{}", g.below(size + 2)), value.generate(g, size));
                }
                Value::Object(m)
            }
            Shape::Record(fields) => {
                Value::Object(fields.iter().map(|(k, s)| (k.clone(), s.generate(g, size))).collect())
            }
        }
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Shape::Uint => f.write_str("uint"),
            Shape::Int => f.write_str("int"),
            Shape::Float => f.write_str("float"),
            Shape::Bool => f.write_str("bool"),
            Shape::Str => f.write_str("string"),
            Shape::List(item) => write!(f, "[{item}]"),
            Shape::Map(value) => write!(f, "{{*: {value}}}"),
            Shape::Record(fields) => {
                f.write_str("{")?;
                for (i, (k, s)) in fields.iter().enumerate() {
                    write!(f, "{}{k}: {s}", if i > 0 { ", " } else { "" })?;
                }
                f.write_str("}")
            }
        }
    }
}

/// Where a run's values come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// The author's example values, then mutations of them.
    Samples(Vec<Value>),
    /// Values of a declared shape.
    Shape(Shape),
    /// A built-in shape, by name (see [`BUILTIN`]).
    Builtin(&'static str),
}

/// The shapes generated when the author gives neither samples nor a shape:
/// what merge functions commonly hold.
pub const BUILTIN: [(&str, &str); 4] = [
    ("string-set", "a JSON set of strings, e.g. [\"a\",\"c\"]"),
    ("pn-counters", "a JSON map of PN-counters, e.g. {\"a\":{\"p\":{\"r1\":2},\"n\":{}}}"),
    ("flat-counts", "a flat JSON object of integers, e.g. {\"a\":3,\"b\":0}"),
    ("bytes", "short non-JSON bytes, e.g. abca"),
];

impl Source {
    /// The built-in sources, in [`BUILTIN`] order.
    pub fn builtins() -> Vec<Source> {
        BUILTIN.iter().map(|(name, _)| Source::Builtin(name)).collect()
    }

    /// One line saying what this source generates.
    pub fn describe(&self) -> String {
        match self {
            Source::Samples(values) => {
                format!("{} example value(s) as given, then mutations of them", values.len())
            }
            Source::Shape(shape) => format!("declared shape {shape}"),
            Source::Builtin(name) => {
                let what = BUILTIN.iter().find(|(n, _)| n == name).map_or("", |(_, d)| *d);
                format!("built-in shape {name}: {what}")
            }
        }
    }

    /// The `case`-th value of this source (later cases are larger, or
    /// further from the samples).
    pub fn value(&self, g: &mut Gen, case: usize) -> Vec<u8> {
        // Sizes and mutation counts grow with the case, so the first failure is small.
        let size = 1 + (case / 4) as u64 % 6;
        let value = match self {
            Source::Samples(values) => {
                let mut v = g.pick(values).clone();
                let rounds = if case < values.len() { 0 } else { 1 + g.below(1 + (case / 8) as u64 % 4) };
                for _ in 0..rounds {
                    mutate(&mut v, g);
                }
                v
            }
            Source::Shape(shape) => shape.generate(g, size),
            Source::Builtin(name) => return builtin(name, g, size),
        };
        serde_json::to_vec(&value).expect("JSON values serialise")
    }
}

fn builtin(name: &str, g: &mut Gen, size: u64) -> Vec<u8> {
    let names = ["a", "b", "c", "d", "e"];
    let value = match name {
        "string-set" => {
            let mut set: Vec<&str> = (0..g.below(size + 1)).map(|_| *g.pick(&names)).collect();
            set.sort_unstable();
            set.dedup();
            json!(set)
        }
        "pn-counters" => {
            let mut counters = Map::new();
            for _ in 0..g.below(size + 1) {
                let side = |g: &mut Gen| {
                    let mut m = Map::new();
                    for _ in 0..g.below(3) {
                        m.insert(format!("r{}", g.below(3) + 1), json!(g.below(5)));
                    }
                    Value::Object(m)
                };
                counters.insert((*g.pick(&names)).into(), json!({ "n": side(g), "p": side(g) }));
            }
            Value::Object(counters)
        }
        "flat-counts" => {
            let mut m = Map::new();
            for _ in 0..g.below(size + 1) {
                m.insert((*g.pick(&names)).into(), json!(g.below(10)));
            }
            Value::Object(m)
        }
        _ => return (0..g.below(size + 1)).map(|_| b'a' + g.below(3) as u8).collect(),
    };
    serde_json::to_vec(&value).expect("JSON values serialise")
}

/// Changes one place of `v`, at any depth (see the module doc).
pub fn mutate(v: &mut Value, g: &mut Gen) {
    // Go down to a random node: deeper nodes are as likely to change as the top.
    let children = match v {
        Value::Array(items) => items.len(),
        Value::Object(map) => map.len(),
        _ => 0,
    };
    if children > 0 && g.below(3) > 0 {
        let i = g.below(children as u64) as usize;
        match v {
            Value::Array(items) => return mutate(&mut items[i], g),
            Value::Object(map) => {
                let key = map.keys().nth(i).expect("in range").clone();
                return mutate(map.get_mut(&key).expect("present"), g);
            }
            _ => unreachable!("has children"),
        }
    }
    match v {
        Value::Number(n) => *n = mutate_number(n, g),
        Value::Bool(b) => *b = !*b,
        Value::String(s) => s.push(*g.pick(&['a', 'b', 'x', '1'])),
        Value::Null => {}
        Value::Array(items) => {
            if items.is_empty() || g.below(2) == 0 {
                let mut item = items.get(g.below(items.len() as u64) as usize).cloned().unwrap_or(json!(1));
                mutate(&mut item, g);
                items.push(item);
            } else {
                items.remove(g.below(items.len() as u64) as usize);
            }
        }
        Value::Object(map) => match (map.is_empty(), g.below(3)) {
            (false, 0) => {
                let key = map.keys().nth(g.below(map.len() as u64) as usize).expect("in range").clone();
                map.remove(&key);
            }
            (false, 1) if map.values().any(Value::is_object) => {
                // Nest: a sibling object's copy, one level further from the original.
                let siblings: Vec<&Value> = map.values().filter(|v| v.is_object()).collect();
                let mut copy = (*g.pick(&siblings)).clone();
                mutate(&mut copy, g);
                let key = new_key(map, g);
                map.insert(key, copy);
            }
            _ => {
                let mut value = map.values().nth(g.below(map.len() as u64) as usize).cloned().unwrap_or(json!(1));
                mutate(&mut value, g);
                let key = new_key(map, g);
                map.insert(key, value);
            }
        },
    }
}

/// A key `map` lacks, named like its keys: `gw-1` begets `gw-2`.
fn new_key(map: &Map<String, Value>, g: &mut Gen) -> String {
    let base = map.keys().nth(g.below(map.len() as u64) as usize).cloned().unwrap_or_else(|| "k".into());
    let stem = base.trim_end_matches(|c: char| c.is_ascii_digit());
    let stem = if stem.is_empty() { "k" } else { stem };
    (1..).map(|n| format!("{stem}{}", n + g.below(3))).find(|k| !map.contains_key(k)).expect("unbounded")
}

fn mutate_number(n: &Number, g: &mut Gen) -> Number {
    if let Some(u) = n.as_u64() {
        return Number::from(g.below(u.saturating_mul(2).saturating_add(6)));
    }
    if let Some(i) = n.as_i64() {
        let span = i.unsigned_abs().saturating_mul(2).saturating_add(6);
        return Number::from(g.below(span) as i64 - i.abs() - 3);
    }
    let f = n.as_f64().unwrap_or(0.0);
    Number::from_f64(f * (0.5 + g.below(100) as f64 / 100.0) + (g.below(7) as f64 - 3.0) / 10.0)
        .unwrap_or_else(|| Number::from(0))
}

/// Smaller values than `v`, for shrinking a counter-example: one element or
/// key removed, a number halved or zeroed, or the same one level down.
pub fn shrink(v: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    match v {
        Value::Array(items) => {
            for i in 0..items.len() {
                let mut fewer = items.clone();
                fewer.remove(i);
                out.push(Value::Array(fewer));
            }
            for (i, item) in items.iter().enumerate() {
                for smaller in shrink(item) {
                    let mut copy = items.clone();
                    copy[i] = smaller;
                    out.push(Value::Array(copy));
                }
            }
        }
        Value::Object(map) => {
            for k in map.keys() {
                let mut fewer = map.clone();
                fewer.remove(k);
                out.push(Value::Object(fewer));
            }
            for (k, item) in map {
                for smaller in shrink(item) {
                    let mut copy = map.clone();
                    copy.insert(k.clone(), smaller);
                    out.push(Value::Object(copy));
                }
            }
        }
        Value::Number(n) => {
            if let Some(u) = n.as_u64().filter(|&u| u > 0) {
                out.push(json!(u / 2));
            } else if let Some(i) = n.as_i64().filter(|&i| i != 0) {
                out.push(json!(i / 2));
            }
        }
        _ => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shape_template_parses_and_names_its_mistakes() {
        let shape = Shape::parse(&json!({"counts": {"*": "uint"}})).unwrap();
        assert_eq!(shape.to_string(), "{counts: {*: uint}}");
        let e = Shape::parse(&json!({"counts": {"*": "unsigned"}})).unwrap_err();
        assert!(e.starts_with("$.counts.*: `unsigned` is not a type"), "{e}");
        assert!(Shape::parse(&json!(["uint", "int"])).unwrap_err().contains("exactly one element"));
        assert!(Shape::parse(&json!(3)).is_err());
        let mut g = Gen::new(1);
        for _ in 0..20 {
            let v = shape.generate(&mut g, 4);
            assert!(v["counts"].as_object().unwrap().values().all(Value::is_u64), "{v}");
        }
    }

    #[test]
    fn samples_come_first_as_given_then_mutated_within_their_kind() {
        let sample = json!({"counts": {"gw-1": 3}});
        let source = Source::Samples(vec![sample.clone()]);
        let mut g = Gen::new(7);
        assert_eq!(source.value(&mut g, 0), serde_json::to_vec(&sample).unwrap(), "the first case is the sample");
        let mut distinct = std::collections::BTreeSet::new();
        let mut keys = std::collections::BTreeSet::new();
        for case in 1..100 {
            let v: Value = serde_json::from_slice(&source.value(&mut g, case)).unwrap();
            if let Some(counts) = v.get("counts").and_then(Value::as_object) {
                // Numbers stay non-negative integers: a G-Counter would not refuse them.
                assert!(counts.values().all(|n| n.is_u64() || n.is_object()), "{v}");
                keys.extend(counts.keys().cloned());
            }
            distinct.insert(v.to_string());
        }
        assert!(distinct.len() > 30, "mutations vary: {distinct:?}");
        assert!(keys.contains("gw-1") && keys.iter().any(|k| k != "gw-1" && k.starts_with("gw-")), "{keys:?}");
    }

    #[test]
    fn a_mutation_reaches_nested_values_and_keeps_integers_integral() {
        let mut g = Gen::new(3);
        let original = json!({"a": {"b": {"c": 5}}, "n": -4, "f": 1.5});
        let mut reached_deep = false;
        for _ in 0..200 {
            let mut v = original.clone();
            mutate(&mut v, &mut g);
            if v["a"]["b"] != original["a"]["b"] {
                reached_deep = true;
            }
            if let Some(n) = v.get("n") {
                assert!(n.is_i64() || n.is_u64(), "{v}");
            }
        }
        assert!(reached_deep);
    }

    #[test]
    fn shrinking_removes_and_halves_at_every_depth() {
        let smaller: Vec<String> = shrink(&json!(["a", "b"])).iter().map(Value::to_string).collect();
        assert_eq!(smaller, [r#"["b"]"#, r#"["a"]"#]);
        let nested: Vec<String> = shrink(&json!({"c": {"g": 4}})).iter().map(Value::to_string).collect();
        assert_eq!(nested, ["{}", r#"{"c":{}}"#, r#"{"c":{"g":2}}"#]);
        assert!(shrink(&json!("x")).is_empty(), "a string is already minimal");
    }

    #[test]
    fn the_same_seed_gives_the_same_inputs() {
        for source in Source::builtins().into_iter().chain([Source::Samples(vec![json!({"a": [1, 2]})])]) {
            let (mut a, mut b) = (Gen::new(1), Gen::new(1));
            for case in 0..20 {
                assert_eq!(source.value(&mut a, case), source.value(&mut b, case));
            }
        }
    }
}
