//! Last-writer-wins merge: of two concurrent versions, the one with the
//! greater `(hlc, origin)` wins whole. This is also the agent's default rule.
//!
//! It converges because the host records the merged version's `hlc` and
//! `origin` as those of the greater pair, so picking a maximum is
//! commutative, associative and idempotent. No config.

use ferry_plugin_sdk::{Config, ConfigError, Merge, Versioned};

/// The merge function; stateless.
#[derive(Debug, Default)]
pub struct LwwMerge;

/// The data of whichever version wrote last.
pub fn last_writer_wins(current: Option<&Versioned>, incoming: &Versioned) -> Vec<u8> {
    let Some(current) = current else {
        return incoming.data.clone();
    };
    // Equal (hlc, origin) means the same write; comparing the data too keeps
    // the choice deterministic even if a replica misbehaves.
    let rank = |v: &Versioned| (v.hlc, v.origin.clone(), v.data.clone());
    if rank(incoming) > rank(current) { incoming.data.clone() } else { current.data.clone() }
}

impl Merge for LwwMerge {
    fn new(_config: &Config) -> Result<Self, ConfigError> {
        Ok(LwwMerge)
    }

    fn merge(&self, _key: &str, current: Option<Versioned>, incoming: Versioned) -> Result<Vec<u8>, String> {
        Ok(last_writer_wins(current.as_ref(), &incoming))
    }
}

ferry_plugin_sdk::export_merge!(LwwMerge);

#[cfg(test)]
mod tests {
    use super::*;

    fn version(data: &str, hlc: u64, origin: &str) -> Versioned {
        Versioned {
            data: data.as_bytes().to_vec(),
            version: vec![(origin.to_owned(), 1)],
            hlc,
            origin: origin.to_owned(),
        }
    }

    /// What the host stores after a merge: the merged data with the greater
    /// (hlc, origin) pair.
    fn merged(a: &Versioned, b: &Versioned) -> Versioned {
        let data = last_writer_wins(Some(a), b);
        let (hlc, origin) = (a.hlc, &a.origin).max((b.hlc, &b.origin));
        Versioned { data, version: Vec::new(), hlc, origin: origin.clone() }
    }

    #[test]
    fn the_later_hlc_wins() {
        let old = version("old", 10 << 16, "b");
        let new = version("new", 11 << 16, "a");
        assert_eq!(last_writer_wins(Some(&old), &new), b"new");
        assert_eq!(last_writer_wins(Some(&new), &old), b"new");
    }

    #[test]
    fn equal_hlcs_are_broken_by_origin() {
        let a = version("from-a", 5 << 16, "a");
        let b = version("from-b", 5 << 16, "b");
        assert_eq!(last_writer_wins(Some(&a), &b), b"from-b");
        assert_eq!(last_writer_wins(Some(&b), &a), b"from-b");
    }

    #[test]
    fn the_first_version_is_taken_as_is() {
        assert_eq!(last_writer_wins(None, &version("x", 1, "a")), b"x");
    }

    #[test]
    fn merging_is_associative_and_idempotent() {
        let (a, b, c) = (version("a", 3 << 16, "a"), version("b", 3 << 16 | 1, "b"), version("c", 2 << 16, "c"));
        let left = merged(&merged(&a, &b), &c);
        let right = merged(&a, &merged(&b, &c));
        assert_eq!(left.data, right.data);
        assert_eq!(left.data, b"b");
        assert_eq!(last_writer_wins(Some(&left), &left), left.data);
    }
}
