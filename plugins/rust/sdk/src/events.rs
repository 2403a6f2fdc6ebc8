//! [`Events`], the batch a filter is called with. In a component the events
//! stay in the host and each accessor fetches one attribute of one event, so
//! a filter pays only for what it reads; in native tests the same type wraps
//! a slice of [`Event`]s.

use crate::Event;
use crate::bindings::host::ferry::plugin::types::Batch;

/// The events of one filter call, in order. Read what you need through
/// [`Events::iter`] or [`Events::get`]; each [`EventRef`] accessor copies
/// one attribute, [`EventRef::to_event`] the whole event.
pub struct Events<'a>(Source<'a>);

enum Source<'a> {
    Host(&'a Batch),
    Slice(&'a [Event]),
}

impl<'a> Events<'a> {
    /// Wraps the batch the host lends to the `filter` export.
    #[doc(hidden)]
    pub fn from_host(batch: &'a Batch) -> Self {
        Events(Source::Host(batch))
    }

    /// A batch of events held in memory, for testing a filter natively.
    pub fn from_slice(events: &'a [Event]) -> Self {
        Events(Source::Slice(events))
    }

    /// Number of events; the filter returns exactly this many verdicts.
    pub fn len(&self) -> usize {
        match &self.0 {
            Source::Host(batch) => batch.len() as usize,
            Source::Slice(events) => events.len(),
        }
    }

    /// Whether the batch has no events.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The event at `index`.
    ///
    /// # Panics
    /// If `index >= self.len()` (in a component the host traps the call).
    pub fn get(&self, index: usize) -> EventRef<'_> {
        assert!(index < self.len(), "event index {index} is out of range for a batch of {}", self.len());
        EventRef { events: self, index: index as u32 }
    }

    /// The events in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = EventRef<'_>> {
        (0..self.len() as u32).map(move |index| EventRef { events: self, index })
    }
}

/// One event of a batch. Each accessor copies that attribute out of the host.
#[derive(Clone, Copy)]
pub struct EventRef<'a> {
    events: &'a Events<'a>,
    index: u32,
}

/// Reads one attribute: through the host's accessor in a component, from
/// the slice in native tests.
macro_rules! attribute {
    ($(#[$doc:meta])* $name:ident, $host:ident, $ty:ty, |$e:ident| $slice:expr) => {
        $(#[$doc])*
        pub fn $name(&self) -> $ty {
            match &self.events.0 {
                Source::Host(batch) => batch.$host(self.index),
                Source::Slice(events) => {
                    let $e = &events[self.index as usize];
                    $slice
                }
            }
        }
    };
}

impl EventRef<'_> {
    /// Position of the event in its batch.
    pub fn index(&self) -> usize {
        self.index as usize
    }

    attribute!(
        /// The whole event, every attribute copied.
        to_event, get, Event, |e| e.clone()
    );
    attribute!(
        /// `Event::id`.
        id, id, String, |e| e.id.clone()
    );
    attribute!(
        /// `Event::source`.
        source, source, String, |e| e.source.clone()
    );
    attribute!(
        /// `Event::type_`.
        type_, type_, String, |e| e.type_.clone()
    );
    attribute!(
        /// `Event::subject`.
        subject, subject, String, |e| e.subject.clone()
    );
    attribute!(
        /// `Event::time`.
        time, time, String, |e| e.time.clone()
    );
    attribute!(
        /// `Event::datacontenttype`.
        datacontenttype, datacontenttype, Option<String>, |e| e.datacontenttype.clone()
    );
    attribute!(
        /// `Event::data`.
        data, data, Vec<u8>, |e| e.data.clone()
    );
    attribute!(
        /// `Event::sequence` (0 at the `ingest` stage).
        sequence, sequence, u64, |e| e.sequence
    );
    attribute!(
        /// `Event::hlc` (0 at the `ingest` stage).
        hlc, hlc, u64, |e| e.hlc
    );
    attribute!(
        /// `Event::partitionkey`.
        partitionkey, partitionkey, Option<String>, |e| e.partitionkey.clone()
    );

    /// The value of extension attribute `name`, if the event has one.
    pub fn extension(&self, name: &str) -> Option<String> {
        match &self.events.0 {
            Source::Host(batch) => batch.extension(self.index, name),
            Source::Slice(events) => {
                events[self.index as usize].extensions.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str) -> Event {
        Event {
            id: id.into(),
            source: "ferry://test".into(),
            type_: "ferry.event".into(),
            subject: format!("telemetry/{id}"),
            time: "2026-01-01T00:00:00Z".into(),
            datacontenttype: None,
            data: id.as_bytes().to_vec(),
            sequence: 7,
            hlc: 9,
            partitionkey: None,
            extensions: vec![("region".into(), "eu".into())],
        }
    }

    #[test]
    fn a_slice_reads_like_the_host_batch() {
        let batch = [event("a"), event("b")];
        let events = Events::from_slice(&batch);
        assert_eq!(events.len(), 2);
        let subjects: Vec<String> = events.iter().map(|e| e.subject()).collect();
        assert_eq!(subjects, ["telemetry/a", "telemetry/b"]);
        let second = events.get(1);
        assert_eq!((second.index(), second.data(), second.sequence()), (1, b"b".to_vec(), 7));
        assert_eq!(second.extension("region").as_deref(), Some("eu"));
        assert_eq!(second.extension("zone"), None);
        assert_eq!(second.to_event(), batch[1]);
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn an_index_past_the_end_panics() {
        let batch = [event("a")];
        Events::from_slice(&batch).get(1);
    }
}
