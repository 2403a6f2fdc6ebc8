//! A filter that misbehaves on request, chosen by each event's subject, so
//! tests can check that the agent survives every kind of plugin failure and
//! counts each against the plugin: failures inside the call (loops, memory,
//! panics) and output the host refuses (too much of it, invalid events,
//! events over the store's or a destination's limits). Other events are
//! replaced by a copy that carries the plugin's config, so tests can also
//! see that config reaches the plugin.

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
                // Valid events, but 100 × 50 KB of them per input event.
                "hostile/wide" => Verdict::Replace(
                    (0..100)
                        .map(|i| Event { id: format!("{}-{i}", e.id), data: vec![b'w'; 50_000], ..e.clone() })
                        .collect(),
                ),
                // 100 replacements whose data all point at one 1 MiB buffer:
                // 1 MiB of plugin memory that would cost the host 100 MiB to copy.
                "hostile/alias" => Verdict::Replace(aliased(e, 100, 1 << 20)),
                // Exactly 64 KiB of data: over a 64 KiB `max_event_size` once encoded.
                "hostile/oversize" => Verdict::Replace(vec![Event { data: vec![b'o'; 64 << 10], ..e.clone() }]),
                "hostile/bad-subject" => Verdict::Replace(vec![Event { subject: "a/#".into(), ..e.clone() }]),
                "hostile/bad-route" => Verdict::Route(vec!["cloud-a,cloud-b".into()]),
                subject if subject.starts_with("drop/") => Verdict::Drop,
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

/// `count` copies of `e` whose data are one shared buffer of `bytes` bytes.
/// The buffer is leaked: the host refuses the output before the plugin's
/// post-return could free it, and the instance is then discarded.
fn aliased(e: &Event, count: usize, bytes: usize) -> Vec<Event> {
    let buffer: &'static mut [u8] = Vec::leak(vec![b'a'; bytes]);
    let (ptr, len) = (buffer.as_mut_ptr(), buffer.len());
    (0..count)
        .map(|_| Event {
            // SAFETY: deliberately unsound aliasing, the point of this test
            // plugin. The lists are only read by the host, which copies them
            // out (or refuses to) before anything could free them.
            data: unsafe { Vec::from_raw_parts(ptr, len, len) },
            ..e.clone()
        })
        .collect()
}

ferry_plugin_sdk::export_filter!(HostileFilter);
