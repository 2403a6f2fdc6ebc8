//! The pure core of state sync: version vectors, versions, and the rule that
//! decides what an incoming version does to the current one.
//!
//! No I/O, no clock, no plugin: the service around it ([`super::service`])
//! supplies HLC timestamps and merged data. Every replica that applies the
//! same set of versions, in any order and with any duplicates, ends with the
//! same version and (given a convergent merge function) the same data — the
//! property tests below check exactly that.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Origin → number of writes seen from that origin.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VersionVector(BTreeMap<String, u64>);

/// How two version vectors relate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Causality {
    /// Both have seen exactly the same writes.
    Equal,
    /// The left one has seen a strict subset of the right one's writes.
    Before,
    /// The left one has seen a strict superset.
    After,
    /// Each has seen a write the other has not.
    Concurrent,
}

impl VersionVector {
    /// The empty vector (no writes seen).
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes seen from `origin`.
    pub fn get(&self, origin: &str) -> u64 {
        self.0.get(origin).copied().unwrap_or(0)
    }

    /// Sets the count of `origin` (zero removes it, keeping one canonical form).
    pub fn set(&mut self, origin: &str, count: u64) {
        if count == 0 {
            self.0.remove(origin);
        } else {
            self.0.insert(origin.to_owned(), count);
        }
    }

    /// Pointwise maximum with `other`.
    pub fn join(&mut self, other: &VersionVector) {
        for (origin, &n) in &other.0 {
            let e = self.0.entry(origin.clone()).or_default();
            *e = (*e).max(n);
        }
    }

    /// How `self` relates to `other`.
    pub fn compare(&self, other: &VersionVector) -> Causality {
        let (mut less, mut greater) = (false, false);
        for origin in self.0.keys().chain(other.0.keys()) {
            match self.get(origin).cmp(&other.get(origin)) {
                Ordering::Less => less = true,
                Ordering::Greater => greater = true,
                Ordering::Equal => {}
            }
            if less && greater {
                return Causality::Concurrent;
            }
        }
        match (less, greater) {
            (false, false) => Causality::Equal,
            (true, false) => Causality::Before,
            (false, true) => Causality::After,
            (true, true) => Causality::Concurrent,
        }
    }

    /// The entries, sorted by origin.
    pub fn entries(&self) -> impl Iterator<Item = (&str, u64)> {
        self.0.iter().map(|(k, &v)| (k.as_str(), v))
    }

    /// Whether no write was seen.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The wire form: a JSON object `{"origin": count, ...}`, sorted.
    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.0).expect("a map of integers serialises")
    }

    /// Parses the wire form; the error says what is wrong.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let map: BTreeMap<String, u64> = serde_json::from_str(text)
            .map_err(|e| format!("version vector `{text}` is not a JSON object of origin -> count: {e}"))?;
        if map.keys().any(String::is_empty) {
            return Err(format!("version vector `{text}` has an empty origin"));
        }
        Ok(Self(map.into_iter().filter(|&(_, n)| n > 0).collect()))
    }
}

impl FromIterator<(String, u64)> for VersionVector {
    fn from_iter<I: IntoIterator<Item = (String, u64)>>(iter: I) -> Self {
        let mut v = Self::new();
        for (origin, n) in iter {
            let n = n.max(v.get(&origin));
            v.set(&origin, n);
        }
        v
    }
}

/// The version of one state value: what it has seen, when, and who wrote it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    /// Writes this value reflects.
    pub vv: VersionVector,
    /// Hybrid logical clock of the write (for a merge: the greatest merged).
    pub hlc: u64,
    /// The writer (for a merge: the origin of the greatest `(hlc, origin)`).
    pub origin: String,
}

impl Version {
    /// The last-writer-wins order key.
    fn lww_key(&self) -> (u64, &str) {
        (self.hlc, self.origin.as_str())
    }

    /// Whether `self` wins over `other` under last-writer-wins.
    pub fn wins_over(&self, other: &Version) -> bool {
        self.lww_key() > other.lww_key()
    }

    /// The version of the merge of two concurrent versions: joined vector,
    /// greater HLC, origin of the greater `(hlc, origin)`. Symmetric.
    pub fn merged(&self, other: &Version) -> Version {
        let mut vv = self.vv.clone();
        vv.join(&other.vv);
        let top = if self.wins_over(other) { self } else { other };
        Version { vv, hlc: top.hlc, origin: top.origin.clone() }
    }
}

/// What an incoming version does to the current one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The same writes as the current value: already applied.
    Duplicate,
    /// The current value has seen everything the incoming one has: stale.
    Dominated,
    /// The incoming value has seen everything the current one has (or the
    /// key has no value): it replaces the current one.
    Replace,
    /// Neither has seen all of the other: merge them into this version.
    Merge(Version),
}

/// The rule of contract 6.
pub fn decide(current: Option<&Version>, incoming: &Version) -> Decision {
    let Some(current) = current else { return Decision::Replace };
    match incoming.vv.compare(&current.vv) {
        Causality::Equal => Decision::Duplicate,
        Causality::Before => Decision::Dominated,
        Causality::After => Decision::Replace,
        Causality::Concurrent => Decision::Merge(current.merged(incoming)),
    }
}

/// The default merge: the data of the version that wins on `(hlc, origin)`.
pub fn lww<'a>(current: (&'a Version, &'a [u8]), incoming: (&'a Version, &'a [u8])) -> &'a [u8] {
    if incoming.0.wins_over(current.0) { incoming.1 } else { current.1 }
}

/// The version of a new write by `origin` on top of `seen`, at `hlc`:
/// `seen` with `origin`'s count raised above both `seen`'s and `floor`'s
/// (so a write never reuses a count `origin` already used).
pub fn new_write(seen: &VersionVector, floor: &VersionVector, origin: &str, hlc: u64) -> Version {
    let mut vv = seen.clone();
    let n = seen.get(origin).max(floor.get(origin)) + 1;
    vv.set(origin, n);
    Version { vv, hlc, origin: origin.to_owned() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vv(pairs: &[(&str, u64)]) -> VersionVector {
        pairs.iter().map(|&(o, n)| (o.to_owned(), n)).collect()
    }

    fn version(pairs: &[(&str, u64)], hlc: u64, origin: &str) -> Version {
        Version { vv: vv(pairs), hlc, origin: origin.into() }
    }

    #[test]
    fn comparison_covers_all_four_relations() {
        assert_eq!(vv(&[("a", 1)]).compare(&vv(&[("a", 1)])), Causality::Equal);
        assert_eq!(vv(&[("a", 1)]).compare(&vv(&[("a", 1), ("b", 1)])), Causality::Before);
        assert_eq!(vv(&[("a", 2), ("b", 1)]).compare(&vv(&[("a", 1)])), Causality::After);
        assert_eq!(vv(&[("a", 2)]).compare(&vv(&[("b", 1)])), Causality::Concurrent);
        assert_eq!(VersionVector::new().compare(&vv(&[("a", 1)])), Causality::Before);
        assert_eq!(vv(&[("a", 0)]), VersionVector::new(), "zero counts are not kept");
    }

    #[test]
    fn the_decision_follows_the_contract() {
        let cur = version(&[("a", 2), ("b", 1)], 10, "a");
        assert_eq!(decide(None, &cur), Decision::Replace);
        assert_eq!(decide(Some(&cur), &cur.clone()), Decision::Duplicate);
        assert_eq!(decide(Some(&cur), &version(&[("a", 1)], 99, "a")), Decision::Dominated);
        assert_eq!(decide(Some(&cur), &version(&[("a", 2), ("b", 2)], 11, "b")), Decision::Replace);
        let Decision::Merge(m) = decide(Some(&cur), &version(&[("a", 1), ("c", 1)], 12, "c")) else {
            panic!("concurrent versions merge")
        };
        assert_eq!(m, version(&[("a", 2), ("b", 1), ("c", 1)], 12, "c"));
    }

    #[test]
    fn lww_breaks_hlc_ties_by_origin() {
        let a = version(&[("a", 1)], 5, "a");
        let b = version(&[("b", 1)], 5, "b");
        assert_eq!(lww((&a, b"A"), (&b, b"B")), b"B");
        assert_eq!(lww((&b, b"B"), (&a, b"A")), b"B");
        assert_eq!(a.merged(&b), b.merged(&a));
    }

    #[test]
    fn the_wire_form_round_trips_and_bad_text_is_named() {
        let v = vv(&[("gw-1", 3), ("aws", 1)]);
        assert_eq!(v.to_json(), r#"{"aws":1,"gw-1":3}"#);
        assert_eq!(VersionVector::from_json(&v.to_json()).unwrap(), v);
        let e = VersionVector::from_json("{\"a\":-1}").unwrap_err();
        assert!(e.contains("{\"a\":-1}"), "{e}");
        assert!(VersionVector::from_json("{\"\":1}").is_err());
    }

    #[test]
    fn a_new_write_never_reuses_a_count() {
        let seen = vv(&[("a", 1), ("dev", 2)]);
        let w = new_write(&seen, &vv(&[("dev", 5)]), "dev", 7);
        assert_eq!(w.vv, vv(&[("a", 1), ("dev", 6)]));
        assert_eq!(w.vv.compare(&seen), Causality::After);
    }

    // ---- Convergence under random histories -------------------------------

    /// A replica as the service keeps it: the pure rule plus a merge function.
    #[derive(Clone, Debug, PartialEq)]
    struct Replica {
        current: Option<(Version, Vec<u8>)>,
    }

    type MergeFn = fn(&[u8], &[u8]) -> Vec<u8>;

    impl Replica {
        fn apply(&mut self, incoming: &(Version, Vec<u8>), merge: Option<MergeFn>) {
            match decide(self.current.as_ref().map(|c| &c.0), &incoming.0) {
                Decision::Duplicate | Decision::Dominated => {}
                Decision::Replace => self.current = Some(incoming.clone()),
                Decision::Merge(v) => {
                    let (cv, cd) = self.current.as_ref().expect("merge needs a current value");
                    let data = match merge {
                        None => lww((cv, cd), (&incoming.0, &incoming.1)).to_vec(),
                        Some(f) => f(cd, &incoming.1),
                    };
                    self.current = Some((v, data));
                }
            }
        }
    }

    /// A grow-only set of bytes as sorted, deduplicated data: a CRDT join.
    fn union(a: &[u8], b: &[u8]) -> Vec<u8> {
        let mut out: Vec<u8> = a.iter().chain(b).copied().collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// One step of a random causal history: replica `writer` either writes
    /// (on top of what it holds, at an HLC above everything it has seen) or
    /// receives a version another replica produced earlier.
    #[derive(Debug, Clone)]
    enum Step {
        Write { writer: usize, item: u8 },
        Deliver { to: usize, which: usize },
    }

    fn steps() -> impl Strategy<Value = Vec<Step>> {
        prop::collection::vec(
            prop_oneof![
                (0..3usize, any::<u8>()).prop_map(|(writer, item)| Step::Write { writer, item }),
                (0..3usize, any::<usize>()).prop_map(|(to, which)| Step::Deliver { to, which }),
            ],
            1..40,
        )
    }

    /// Runs a history, then delivers every version produced to a fresh
    /// replica in each of several shuffled orders (with duplicates), and to
    /// the history's own replicas; all must end equal.
    fn converges(history: Vec<Step>, orders: Vec<Vec<usize>>, merge: Option<MergeFn>) -> Result<(), TestCaseError> {
        let origins = ["a", "b", "c"];
        let mut replicas = vec![Replica { current: None }; 3];
        let mut clock = 0u64;
        let mut produced: Vec<(Version, Vec<u8>)> = Vec::new();
        for step in history {
            match step {
                Step::Write { writer, item } => {
                    let r = &mut replicas[writer];
                    let (seen, data) = match &r.current {
                        Some((v, d)) => (v.vv.clone(), d.clone()),
                        None => (VersionVector::new(), Vec::new()),
                    };
                    // A global counter stands in for HLCs: above all seen.
                    clock += 1;
                    let floor: VersionVector = produced.iter().fold(VersionVector::new(), |mut acc, (v, _)| {
                        acc.join(&v.vv);
                        acc
                    });
                    let v = new_write(&seen, &floor, origins[writer], clock);
                    let data = match merge {
                        None => vec![item],
                        Some(_) => union(&data, &[item]),
                    };
                    let w = (v, data);
                    r.apply(&w, merge);
                    produced.push(w);
                }
                Step::Deliver { to, which } => {
                    if !produced.is_empty() {
                        let w = produced[which % produced.len()].clone();
                        replicas[to].apply(&w, merge);
                    }
                }
            }
        }
        if produced.is_empty() {
            return Ok(());
        }
        let mut finals = Vec::new();
        for r in &mut replicas {
            for w in &produced {
                r.apply(w, merge);
            }
            finals.push(r.current.clone());
        }
        for order in orders {
            let mut fresh = Replica { current: None };
            for i in order {
                fresh.apply(&produced[i % produced.len()], merge);
            }
            // Whatever the order, after everything has arrived once more:
            for w in produced.iter().rev() {
                fresh.apply(w, merge);
            }
            finals.push(fresh.current);
        }
        for f in &finals[1..] {
            prop_assert_eq!(f, &finals[0]);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

        #[test]
        fn lww_converges_under_any_interleaving_duplicates_and_reordering(
            history in steps(),
            orders in prop::collection::vec(prop::collection::vec(any::<usize>(), 0..60), 1..4),
        ) {
            converges(history, orders, None)?;
        }

        #[test]
        fn a_crdt_merge_converges_under_any_interleaving_duplicates_and_reordering(
            history in steps(),
            orders in prop::collection::vec(prop::collection::vec(any::<usize>(), 0..60), 1..4),
        ) {
            converges(history, orders, Some(union))?;
        }

        #[test]
        fn comparison_is_antisymmetric_and_join_dominates(
            a in prop::collection::btree_map("[abc]", 0..4u64, 0..3),
            b in prop::collection::btree_map("[abc]", 0..4u64, 0..3),
        ) {
            let (a, b): (VersionVector, VersionVector) = (a.into_iter().collect(), b.into_iter().collect());
            let flip = |c| match c { Causality::Before => Causality::After, Causality::After => Causality::Before, c => c };
            prop_assert_eq!(a.compare(&b), flip(b.compare(&a)));
            let mut j = a.clone();
            j.join(&b);
            prop_assert!(matches!(j.compare(&a), Causality::After | Causality::Equal));
            prop_assert!(matches!(j.compare(&b), Causality::After | Causality::Equal));
        }
    }
}
