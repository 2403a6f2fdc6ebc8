//! MQTT topic names, topic filters and strings: validation of the local
//! topics that producers give events (an event's `subject`), matching of the
//! filters that select events for priority classes, routes and
//! subscriptions, and the rule every MQTT UTF-8 string must meet.
//!
//! Pure functions only; nothing here touches the network or the store.

use std::fmt;

/// Longest local topic accepted, in bytes. MQTT allows 65,535 but a local
/// topic becomes the tail of a cloud topic, and cloud brokers cap topics far
/// lower (AWS IoT Core: 256 bytes, 7 levels after the prefix).
pub const MAX_TOPIC_BYTES: usize = 1024;

/// Why a topic name or filter is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TopicError {
    /// The topic is the empty string.
    #[error("must not be empty")]
    Empty,
    /// The topic is longer than [`MAX_TOPIC_BYTES`].
    #[error("is {0} bytes long; the limit is {MAX_TOPIC_BYTES}")]
    TooLong(usize),
    /// A topic name contains `+` or `#`, which only filters may hold.
    #[error("must not contain the wildcard `{0}` (wildcards belong in filters, not topic names)")]
    Wildcard(char),
    /// The topic contains a character that MQTT forbids in strings.
    #[error("{0}")]
    Forbidden(MqttStringError),
    /// The topic starts with `$`, which MQTT reserves for brokers.
    #[error("must not start with `$` (reserved for broker topics)")]
    Reserved,
    /// A level is empty: leading, trailing or doubled `/`.
    #[error("must not have empty levels (leading, trailing or doubled `/`)")]
    EmptyLevel,
    /// A `#` that is not the whole last level, or a `+` that is not a whole level.
    #[error("has a misplaced wildcard: `#` must be the whole last level and `+` a whole level")]
    MisplacedWildcard,
}

/// Checks that `topic` is a valid local topic name.
///
/// Empty levels are legal MQTT but are refused here: a local topic is
/// appended to a destination prefix, where `//` or a trailing `/` is almost
/// always a producer mistake that would scatter data across cloud topics.
pub fn validate_name(topic: &str) -> Result<(), TopicError> {
    check_common(topic)?;
    if let Some(c) = topic.chars().find(|c| *c == '+' || *c == '#') {
        return Err(TopicError::Wildcard(c));
    }
    if topic.split('/').any(str::is_empty) {
        return Err(TopicError::EmptyLevel);
    }
    Ok(())
}

/// Checks that `filter` is a valid MQTT topic filter.
pub fn validate_filter(filter: &str) -> Result<(), TopicError> {
    check_common(filter)?;
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        let is_last = i + 1 == levels.len();
        match *level {
            "#" if is_last => {}
            "+" => {}
            l if l.contains('#') || l.contains('+') => return Err(TopicError::MisplacedWildcard),
            _ => {}
        }
    }
    Ok(())
}

fn check_common(topic: &str) -> Result<(), TopicError> {
    if topic.is_empty() {
        return Err(TopicError::Empty);
    }
    if topic.len() > MAX_TOPIC_BYTES {
        return Err(TopicError::TooLong(topic.len()));
    }
    validate_mqtt_string(topic).map_err(TopicError::Forbidden)?;
    if topic.starts_with('$') {
        return Err(TopicError::Reserved);
    }
    Ok(())
}

/// Longest MQTT UTF-8 string: its length travels in two bytes.
pub const MAX_MQTT_STRING: usize = 65_535;

/// Why a string cannot travel in an MQTT UTF-8 string field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MqttStringError {
    /// Longer than [`MAX_MQTT_STRING`] bytes.
    #[error("is {0} bytes long; an MQTT string holds at most {MAX_MQTT_STRING}")]
    TooLong(usize),
    /// A character MQTT forbids or lets a broker refuse.
    #[error("must not contain {} (MQTT brokers refuse control characters and Unicode non-characters)", describe(*.0))]
    Forbidden(char),
}

fn describe(c: char) -> String {
    format!("U+{:04X}", u32::from(c))
}

/// Checks the rule MQTT sets for every UTF-8 string (topic names, user
/// properties, content types; MQTT 5.0 §1.5.4, 3.1.1 §1.5.3): no U+0000,
/// and none of the characters a receiver may treat as malformed, which
/// brokers such as Mosquitto do by closing the connection: the C0 and C1
/// controls, DEL, and the Unicode non-characters (U+FDD0–U+FDEF and the last
/// two code points of every plane). Surrogates cannot occur in a `str`.
pub fn validate_mqtt_string(s: &str) -> Result<(), MqttStringError> {
    if s.len() > MAX_MQTT_STRING {
        return Err(MqttStringError::TooLong(s.len()));
    }
    // Printable ASCII is by far the common case; only other bytes need a look.
    if s.bytes().all(|b| (0x20..0x7F).contains(&b)) {
        return Ok(());
    }
    match s.chars().find(|&c| forbidden_in_mqtt(c)) {
        Some(c) => Err(MqttStringError::Forbidden(c)),
        None => Ok(()),
    }
}

fn forbidden_in_mqtt(c: char) -> bool {
    let n = u32::from(c);
    c.is_control() || (0xFDD0..=0xFDEF).contains(&n) || n & 0xFFFE == 0xFFFE
}

/// A validated MQTT topic filter (`+` matches one level, `#` the rest).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct TopicFilter(String);

impl TopicFilter {
    /// Parses and validates a filter.
    pub fn new(filter: &str) -> Result<Self, TopicError> {
        validate_filter(filter)?;
        Ok(Self(filter.to_owned()))
    }

    /// The filter as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `topic` (a valid topic name) matches this filter.
    pub fn matches(&self, topic: &str) -> bool {
        let mut filter = self.0.split('/');
        let mut name = topic.split('/');
        loop {
            match (filter.next(), name.next()) {
                (Some("#"), _) => return true,
                (Some("+"), Some(_)) => {}
                (Some(f), Some(n)) if f == n => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }
}

impl fmt::Debug for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_with_wildcards_empty_levels_or_reserved_prefix_are_refused() {
        assert_eq!(validate_name("a/+/b"), Err(TopicError::Wildcard('+')));
        assert_eq!(validate_name("a/#"), Err(TopicError::Wildcard('#')));
        assert_eq!(validate_name("a//b"), Err(TopicError::EmptyLevel));
        assert_eq!(validate_name("/a"), Err(TopicError::EmptyLevel));
        assert_eq!(validate_name("a/"), Err(TopicError::EmptyLevel));
        assert_eq!(validate_name(""), Err(TopicError::Empty));
        assert_eq!(validate_name("$SYS/x"), Err(TopicError::Reserved));
        assert_eq!(validate_name("a\0b"), Err(TopicError::Forbidden(MqttStringError::Forbidden('\0'))));
        assert!(matches!(validate_name("a/\u{FFFF}"), Err(TopicError::Forbidden(_))));
        assert!(matches!(validate_name("a/\u{FDD0}"), Err(TopicError::Forbidden(_))));
        let long = "a".repeat(MAX_TOPIC_BYTES + 1);
        assert_eq!(validate_name(&long), Err(TopicError::TooLong(MAX_TOPIC_BYTES + 1)));
        assert_eq!(validate_name("telemetry/temp/ünïcode"), Ok(()));
    }

    #[test]
    fn mqtt_strings_refuse_what_brokers_treat_as_malformed() {
        for bad in [
            '\0',
            '\u{1}',
            '\u{1F}',
            '\u{7F}',
            '\u{80}',
            '\u{9F}',
            '\u{FDD0}',
            '\u{FDEF}',
            '\u{FFFE}',
            '\u{FFFF}',
            '\u{1FFFF}',
            '\u{10FFFE}',
        ] {
            let s = format!("ok{bad}ok");
            assert_eq!(validate_mqtt_string(&s), Err(MqttStringError::Forbidden(bad)), "{:?}", bad);
        }
        for good in ["", "plain", "ünïcode ✓", "\u{FDCF}", "\u{FDF0}", "\u{FFFD}", "\u{10000}", "\u{A0}"] {
            assert_eq!(validate_mqtt_string(good), Ok(()), "{good:?}");
        }
        assert_eq!(validate_mqtt_string(&"a".repeat(MAX_MQTT_STRING)), Ok(()));
        assert_eq!(
            validate_mqtt_string(&"a".repeat(MAX_MQTT_STRING + 1)),
            Err(MqttStringError::TooLong(MAX_MQTT_STRING + 1))
        );
        let e = validate_mqtt_string("a\u{FFFF}").unwrap_err().to_string();
        assert!(e.contains("U+FFFF"), "{e}");
    }

    #[test]
    fn filters_allow_wildcards_only_as_whole_levels() {
        assert!(validate_filter("a/+/c").is_ok());
        assert!(validate_filter("#").is_ok());
        assert!(validate_filter("a/#").is_ok());
        assert_eq!(validate_filter("a/#/c"), Err(TopicError::MisplacedWildcard));
        assert_eq!(validate_filter("a/b#"), Err(TopicError::MisplacedWildcard));
        assert_eq!(validate_filter("a+/b"), Err(TopicError::MisplacedWildcard));
    }

    #[test]
    fn filters_match_by_mqtt_rules() {
        let f = |s| TopicFilter::new(s).unwrap();
        assert!(f("#").matches("a/b/c"));
        assert!(f("a/#").matches("a"));
        assert!(f("a/#").matches("a/b/c"));
        assert!(!f("a/#").matches("b/a"));
        assert!(f("a/+/c").matches("a/b/c"));
        assert!(!f("a/+/c").matches("a/b/d"));
        assert!(!f("a/+").matches("a/b/c"));
        assert!(f("a/b").matches("a/b"));
        assert!(!f("a/b").matches("a/b/c"));
        assert!(!f("a/b/c").matches("a/b"));
    }
}
