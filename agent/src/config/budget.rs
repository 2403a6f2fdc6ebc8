//! The memory budget: the most memory each part of the agent may hold under
//! the config, and their sum, which `agent.memory_limit` caps.
//!
//! Every part is bounded by config keys the agent enforces: the store's page
//! cache by `store.cache_size` (redb never holds more), requests in progress
//! by `ingest.http.max_buffered`, a destination's publishes by its
//! `inflight` and `max_packet_size`, a plugin's instance by its `memory`.
//! What is left, the agent's code, stacks and runtime, was measured
//! ([`BASELINE_BYTES`]). The sum is the agent's RSS under any load, within
//! what the allocator keeps for reuse (docs/operating.md#memory-budget).

use std::fmt;

use super::Config;

/// The agent itself, with no part loaded: code, thread stacks, the async
/// runtime and the allocator's floor. Measured: 14 MB idle RSS of the
/// x86-64 release build on the embedded default (2026-12-06), rounded up.
pub const BASELINE_BYTES: u64 = 16 << 20;

/// Record bytes a forwarder reads from the store at once (at least one
/// event is read, however large).
pub const READ_AHEAD_BYTES: usize = 1 << 20;

/// A downlink companion's publishes (fleet reports) a destination has in
/// flight at most besides its events', so that with a full window they
/// still fit the client's request queue.
pub const COMPANION_IN_FLIGHT: usize = 8;

/// Unacknowledged messages the broker may hold out to the local MQTT
/// ingest at once (its MQTT 5 Receive Maximum).
pub const MQTT_INGEST_RECEIVE_MAXIMUM: u16 = 1024;

/// What a plugin's ring of recent calls holds at most (kept only where a
/// fleet can update the plugin).
pub const PLUGIN_SAMPLES_BYTES: usize = 1 << 20;

/// One part of the budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// What holds the memory.
    pub name: String,
    /// The config keys that bound it.
    pub keys: String,
    /// The most it holds, in bytes.
    pub bytes: u64,
}

/// The budget of one config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryBudget {
    /// Every part, the agent itself first.
    pub parts: Vec<Part>,
}

impl MemoryBudget {
    /// The budget `config` sets.
    pub fn of(config: &Config) -> Self {
        let part = |name: String, keys: &str, bytes: u64| Part { name, keys: keys.into(), bytes };
        let mut parts = vec![
            part("the agent itself (code, stacks, runtime)".into(), "measured, not configurable", BASELINE_BYTES),
            part("store page cache".into(), "store.cache_size", config.store.cache_bytes as u64),
            part("HTTP requests in progress".into(), "ingest.http.max_buffered", config.http.max_buffered_bytes as u64),
        ];
        let max_event = config.store.max_event_bytes as u64;
        if let Some(m) = &config.mqtt_ingest {
            // Each delivery as received and as prepared for the store.
            let bytes =
                u64::from(MQTT_INGEST_RECEIVE_MAXIMUM) * 2 * (m.endpoint.max_packet_bytes as u64).min(max_event);
            parts.push(part("local MQTT ingest".into(), "store.max_event_size, ingest.mqtt.max_packet_size", bytes));
        }
        for d in &config.destinations {
            let publishes = (d.inflight + COMPANION_IN_FLIGHT) as u64 * d.endpoint.max_packet_bytes as u64;
            // Records read ahead, and the events decoded from them.
            let read_ahead = 2 * READ_AHEAD_BYTES as u64;
            parts.push(part(
                format!("destination {}", d.name),
                "its inflight × max_packet_size, and 2 MiB read ahead",
                publishes + read_ahead,
            ));
        }
        for p in &config.plugins {
            let ring = if config.fleet.is_some() { PLUGIN_SAMPLES_BYTES as u64 } else { 0 };
            parts.push(part(
                format!("plugin {}", p.name),
                "its memory (and 1 MiB of samples with [fleet])",
                p.memory_bytes + ring,
            ));
        }
        Self { parts }
    }

    /// The sum of the parts.
    pub fn total(&self) -> u64 {
        self.parts.iter().map(|p| p.bytes).sum()
    }
}

/// Bytes as MiB, one decimal.
fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

impl fmt::Display for MemoryBudget {
    /// One line: the total, then each part.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", mib(self.total()))?;
        for (i, p) in self.parts.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{} {} ({})", p.name, mib(p.bytes), p.keys)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(text: &str) -> MemoryBudget {
        MemoryBudget::of(&Config::parse(text, "test.toml").unwrap())
    }

    #[test]
    fn the_default_budget_is_the_agent_the_cache_and_http() {
        let b = budget("");
        assert_eq!(b.parts.len(), 3);
        assert_eq!(b.total(), BASELINE_BYTES + (4 << 20) + (48 << 20));
    }

    #[test]
    fn each_destination_costs_its_window_of_largest_publishes() {
        let b = budget(
            "[[destination]]\nname = \"a\"\nurl = \"mqtt://localhost:1883\"\ninflight = 32\nmax_packet_size = \"64 KiB\"\n",
        );
        let d = b.parts.iter().find(|p| p.name == "destination a").unwrap();
        assert_eq!(d.bytes, (32 + 8) * 65536 + (2 << 20));
    }

    #[test]
    fn a_config_over_its_memory_limit_is_refused_naming_the_parts() {
        let e = Config::parse("[agent]\nmemory_limit = \"64 MiB\"\n", "test.toml").unwrap_err();
        assert_eq!(e.key, "agent.memory_limit");
        assert!(e.reason.contains("store page cache 4.0 MiB (store.cache_size)"), "{}", e.reason);
        assert!(e.reason.contains("HTTP requests in progress 48.0 MiB (ingest.http.max_buffered)"), "{}", e.reason);
        let fits =
            "[agent]\nmemory_limit = \"40 MiB\"\n[ingest.http]\nmax_body_size = \"1 MiB\"\nmax_buffered = \"16 MiB\"\n";
        assert_eq!(budget(fits).total(), (16 + 4 + 16) << 20);
    }
}
