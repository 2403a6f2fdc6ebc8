//! A filter that misbehaves on request, chosen by each event's subject, so
//! tests can check that the agent survives every kind of plugin failure.
//! Other events are replaced by a copy that carries the plugin's config, so
//! tests can also see that config reaches the plugin.

use ferry_plugin_sdk::{Config, ConfigError, Event, Events, Filter, Verdict};

/// The filter; remembers its config as `k=v;k=v`.
pub struct HostileFilter {
    echo: String,
}

impl Filter for HostileFilter {
    fn new(config: &Config) -> Result<Self, ConfigError> {
        let echo = config.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(";");
        Ok(HostileFilter { echo })
    }

    fn filter(&mut self, events: &Events<'_>) -> Vec<Verdict> {
        let events: Vec<Event> = events.iter().map(|e| e.to_event()).collect();
        let subjects: Vec<&str> = events.iter().map(|e| e.subject.as_str()).collect();
        if subjects.contains(&"hostile/loop") {
            let mut n = 0u64;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        if subjects.contains(&"hostile/oom") {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        if subjects.contains(&"hostile/trap") {
            panic!("asked to trap");
        }
        let mut verdicts: Vec<Verdict> = events
            .iter()
            .map(|e| match e.subject.as_str() {
                "hostile/flood" => Verdict::Replace(vec![e.clone(); 5_000]),
                "hostile/huge" => Verdict::Replace(vec![Event { data: vec![b'x'; 32 << 20], ..e.clone() }]),
                _ => {
                    let mut copy = e.clone();
                    copy.extensions.push(("cfgecho".into(), self.echo.clone()));
                    Verdict::Replace(vec![copy])
                }
            })
            .collect();
        if subjects.contains(&"hostile/wrong-count") {
            verdicts.pop();
        }
        verdicts
    }
}

ferry_plugin_sdk::export_filter!(HostileFilter);
