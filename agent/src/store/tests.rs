//! Store behaviour: ordering, dedup, quota and eviction, TTL, restarts.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::clock::{Clock, ManualClock};
use crate::config::{FullPolicy, StoreConfig};
use crate::event::{EventBody, JSON_CONTENT_TYPE};

const T0: i64 = 1_800_000_000_000_000_000;

struct Fixture {
    _dir: tempfile::TempDir,
    clock: Arc<ManualClock>,
    config: StoreConfig,
    store: Store,
}

impl Fixture {
    fn new(tune: impl FnOnce(&mut StoreConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = StoreConfig::at(dir.path().join("ferry.redb"));
        tune(&mut config);
        let clock = Arc::new(ManualClock::new(T0));
        let store = Store::open(config.clone(), clock.clone()).unwrap();
        Self { _dir: dir, clock, config, store }
    }

    /// Closes and reopens; the file is released when the last handle drops.
    fn reopen(self) -> Self {
        self.reopen_with(|_| {})
    }

    /// Closes and reopens with a changed config.
    fn reopen_with(self, tune: impl FnOnce(&mut StoreConfig)) -> Self {
        let Fixture { _dir, clock, mut config, store } = self;
        tune(&mut config);
        store.close();
        drop(store);
        let store = Store::open(config.clone(), clock.clone()).unwrap();
        Fixture { _dir, clock, config, store }
    }

    fn status(&self) -> StoreStatus {
        self.store.status(self.clock.now_millis()).unwrap()
    }
}

fn event(id: &str, topic: &str, data_len: usize) -> PreparedEvent {
    event_with(id, topic, data_len, 100, None)
}

fn event_with(id: &str, topic: &str, data_len: usize, priority: u8, expires_at_ms: Option<u64>) -> PreparedEvent {
    let body = EventBody {
        id: id.into(),
        source: "ferry://test".into(),
        ty: "t".into(),
        subject: topic.into(),
        time_nanos: T0,
        datacontenttype: Some(JSON_CONTENT_TYPE.into()),
        data: vec![b'1'; data_len],
        partitionkey: None,
        extensions: vec![],
    };
    PreparedEvent::new(&body, Dedup::Producer, priority, expires_at_ms)
}

fn ids(events: &[Event]) -> Vec<&str> {
    events.iter().map(|e| e.body.id.as_str()).collect()
}

#[tokio::test]
async fn appended_events_read_back_in_sequence_order_with_rising_hlc() {
    let f = Fixture::new(|_| {});
    let out = f.store.append(vec![event("a", "t/1", 4), event("b", "t/2", 4)]).await.unwrap();
    assert_eq!(out.iter().map(|a| a.sequence).collect::<Vec<_>>(), [1, 2]);
    let more = f.store.append(vec![event("c", "t/3", 4)]).await.unwrap();
    assert_eq!(more[0].sequence, 3);
    let events = f.store.read_after(0, 10).unwrap();
    assert_eq!(ids(&events), ["a", "b", "c"]);
    assert!(events.windows(2).all(|w| w[0].hlc < w[1].hlc && w[0].sequence < w[1].sequence));
    assert_eq!(ids(&f.store.read_after(1, 1).unwrap()), ["b"]);
}

#[tokio::test]
async fn a_bounded_read_stops_at_its_bytes_but_always_reads_one_event() {
    let f = Fixture::new(|_| {});
    f.store.append(vec![event("a", "t/1", 1000), event("b", "t/1", 1000), event("c", "t/1", 1000)]).await.unwrap();
    assert_eq!(ids(&f.store.read_after_bounded(0, 10, 1500).unwrap()), ["a", "b"]);
    assert_eq!(ids(&f.store.read_after_bounded(0, 10, 1).unwrap()), ["a"]);
    assert_eq!(ids(&f.store.read_after_bounded(0, 10, usize::MAX).unwrap()), ["a", "b", "c"]);
}

#[tokio::test]
async fn a_duplicate_id_is_acknowledged_with_the_original_sequence_and_not_stored_twice() {
    let f = Fixture::new(|_| {});
    f.store.append(vec![event("a", "t", 4)]).await.unwrap();
    let again = f.store.append(vec![event("a", "t", 4), event("b", "t", 4), event("b", "t", 4)]).await.unwrap();
    assert_eq!(again[0], Appended { id: "a".into(), sequence: 1, duplicate: true });
    assert_eq!(again[1], Appended { id: "b".into(), sequence: 2, duplicate: false });
    assert_eq!(again[2], Appended { id: "b".into(), sequence: 2, duplicate: true });
    let s = f.status();
    assert_eq!((s.events, s.counters.dedup_hits), (2, 2));
}

#[tokio::test]
async fn an_id_is_stored_anew_once_it_has_left_the_dedup_window() {
    let f = Fixture::new(|c| c.dedup_window = Duration::from_secs(60));
    f.store.append(vec![event("a", "t", 4)]).await.unwrap();
    f.clock.advance_nanos(30 * 1_000_000_000);
    assert!(f.store.append(vec![event("a", "t", 4)]).await.unwrap()[0].duplicate);
    f.clock.advance_nanos(31 * 1_000_000_000);
    let report = f.store.sweep().await.unwrap();
    assert_eq!(report.dedup_pruned, 1);
    let out = f.store.append(vec![event("a", "t", 4)]).await.unwrap();
    assert_eq!((out[0].sequence, out[0].duplicate), (2, false));
}

#[tokio::test]
async fn producer_ids_are_remembered_per_commit_and_rows_of_earlier_releases_still_count() {
    let f = Fixture::new(|c| c.dedup_window = Duration::from_secs(60));
    f.store.append(vec![event("a", "t", 4), event("b", "t", 4)]).await.unwrap();
    f.store.append(vec![event("c", "t", 4)]).await.unwrap();
    // An earlier release wrote one age row per event.
    let db = f.store.database().get().unwrap();
    let txn = db.begin_write().unwrap();
    {
        txn.open_table(tables::DEDUP).unwrap().insert("old", 99).unwrap();
        txn.open_table(tables::DEDUP_AGE).unwrap().insert(99, (f.clock.now_millis(), "old")).unwrap();
    }
    txn.commit().unwrap();
    let at = f.clock.now_millis();
    {
        let txn = db.begin_read().unwrap();
        assert_eq!(txn.open_table(tables::DEDUP_AGES).unwrap().len().unwrap(), 2, "one row per commit");
        assert_eq!(receipt::remembered_id(&txn, 2).unwrap(), Some((at, "b".into())));
        assert_eq!(receipt::remembered_id(&txn, 3).unwrap(), Some((at, "c".into())));
        assert_eq!(receipt::remembered_id(&txn, 99).unwrap(), Some((at, "old".into())));
        assert_eq!(receipt::remembered_id(&txn, 4).unwrap(), None);
    }
    drop(db);
    f.clock.advance_nanos(61 * 1_000_000_000);
    assert_eq!(f.store.sweep().await.unwrap().dedup_pruned, 4);
    let db = f.store.database().get().unwrap();
    let txn = db.begin_read().unwrap();
    assert!(txn.open_table(tables::DEDUP).unwrap().is_empty().unwrap());
    assert!(txn.open_table(tables::DEDUP_AGES).unwrap().is_empty().unwrap());
    assert!(txn.open_table(tables::DEDUP_AGE).unwrap().is_empty().unwrap());
}

fn delivery(id: &str, batch: u128, redelivered: bool) -> PreparedEvent {
    PreparedEvent { dedup: Dedup::Delivery { batch, redelivered }, ..event(id, "t", 4) }
}

#[tokio::test]
async fn a_redelivery_of_a_stored_delivery_is_a_duplicate_until_its_batch_is_forgotten_even_across_a_restart() {
    let f = Fixture::new(|_| {});
    let batch = crate::clock::new_v7(f.clock.as_ref()).as_u128();
    f.store.append(vec![delivery("m1", batch, false), delivery("m2", batch, false)]).await.unwrap();
    let f = f.reopen();
    let again = f.store.append(vec![delivery("m2", 7, true), delivery("m3", 7, true)]).await.unwrap();
    assert_eq!(again[0], Appended { id: "m2".into(), sequence: 2, duplicate: true });
    assert_eq!(again[1], Appended { id: "m3".into(), sequence: 3, duplicate: false });
    // A first delivery is never looked up: the broker repeats only what it flags.
    assert!(!f.store.append(vec![delivery("m1", 8, false)]).await.unwrap()[0].duplicate);

    f.store.forget_deliveries(batch).await.unwrap();
    let f = f.reopen();
    let after = f.store.append(vec![delivery("m2", 9, true), delivery("m3", 9, true)]).await.unwrap();
    assert!(!after[0].duplicate, "m2's batch was forgotten");
    assert!(after[1].duplicate, "m3's batch (7) was not");
}

#[tokio::test]
async fn a_delivery_batch_never_acknowledged_is_forgotten_when_it_leaves_the_dedup_window() {
    let f = Fixture::new(|c| c.dedup_window = Duration::from_secs(60));
    let batch = crate::clock::new_v7(f.clock.as_ref()).as_u128();
    f.store.append(vec![delivery("m1", batch, false), delivery("m2", batch, false)]).await.unwrap();
    f.clock.advance_nanos(30 * 1_000_000_000);
    assert_eq!(f.store.sweep().await.unwrap().dedup_pruned, 0);
    assert!(f.store.append(vec![delivery("m1", 1, true)]).await.unwrap()[0].duplicate);
    f.clock.advance_nanos(31 * 1_000_000_000);
    assert_eq!(f.store.sweep().await.unwrap().dedup_pruned, 2);
    assert!(!f.store.append(vec![delivery("m1", 2, true)]).await.unwrap()[0].duplicate);
}

#[tokio::test]
async fn reject_policy_refuses_a_request_that_does_not_fit_and_changes_nothing() {
    let f = Fixture::new(|c| {
        c.quota_bytes = 64 * 1024;
        c.full_policy = FullPolicy::Reject;
    });
    let batch: Vec<_> = (0..50).map(|i| event(&format!("e{i}"), "t", 1000)).collect();
    f.store.append(batch).await.unwrap();
    let before = f.status();
    let over: Vec<_> = (0..30).map(|i| event(&format!("x{i}"), "t", 1000)).collect();
    match f.store.append(over).await {
        Err(AppendError::Full { retry_after, .. }) => assert!(retry_after > Duration::ZERO),
        other => panic!("expected Full, got {other:?}"),
    }
    let after = f.status();
    assert_eq!((after.events, after.bytes, after.last_sequence), (before.events, before.bytes, before.last_sequence));
    // A request that fits still goes in.
    assert!(f.store.append(vec![event("small", "t", 10)]).await.is_ok());
}

#[tokio::test]
async fn drop_oldest_evicts_lowest_priority_first_and_never_for_less_important_events() {
    let f = Fixture::new(|c| {
        c.quota_bytes = 64 * 1024;
        c.full_policy = FullPolicy::DropOldest;
    });
    let alarms: Vec<_> = (0..20).map(|i| event_with(&format!("alarm{i}"), "alarms/a", 1000, 200, None)).collect();
    let telemetry: Vec<_> = (0..40).map(|i| event_with(&format!("tel{i}"), "tel/t", 1000, 100, None)).collect();
    f.store.append(alarms).await.unwrap();
    f.store.append(telemetry).await.unwrap();
    // More telemetry: the oldest telemetry makes way, alarms stay.
    let newer: Vec<_> = (0..10).map(|i| event_with(&format!("new{i}"), "tel/t", 1000, 100, None)).collect();
    f.store.append(newer).await.unwrap();
    let s = f.status();
    assert!(s.bytes <= s.quota_bytes);
    assert!(s.counters.evicted_events >= 10);
    let kept = f.store.read_after(0, 1000).unwrap();
    let kept_ids = ids(&kept);
    assert!((0..20).all(|i| kept_ids.contains(&format!("alarm{i}").as_str())), "alarms were evicted");
    assert!(!kept_ids.contains(&"tel0"), "oldest telemetry should be gone");
    assert!(kept_ids.contains(&"new9"));
    // A flood of low-priority events may not push out alarms once telemetry is gone.
    let flood: Vec<_> = (0..60).map(|i| event_with(&format!("dbg{i}"), "debug/x", 1000, 10, None)).collect();
    assert!(matches!(f.store.append(flood).await, Err(AppendError::Full { .. })));
    assert_eq!(f.status().events, s.events);
}

#[tokio::test]
async fn a_request_larger_than_the_whole_quota_is_too_large_under_either_policy() {
    for policy in [FullPolicy::Reject, FullPolicy::DropOldest] {
        let f = Fixture::new(|c| {
            c.quota_bytes = 64 * 1024;
            c.full_policy = policy;
        });
        let huge: Vec<_> = (0..100).map(|i| event(&format!("h{i}"), "t", 1000)).collect();
        assert!(matches!(f.store.append(huge).await, Err(AppendError::TooLarge { .. })));
        assert_eq!(f.status().events, 0);
    }
}

#[tokio::test]
async fn expired_events_move_to_dead_letters_with_the_reason() {
    let f = Fixture::new(|_| {});
    let now = f.clock.now_millis();
    f.store
        .append(vec![
            event_with("short", "t", 4, 100, Some(now + 1_000)),
            event_with("long", "t", 4, 100, Some(now + 60_000)),
            event("forever", "t", 4),
        ])
        .await
        .unwrap();
    assert_eq!(f.store.sweep().await.unwrap().expired, 0);
    f.clock.advance_nanos(2_000_000_000);
    assert_eq!(f.store.sweep().await.unwrap().expired, 1);
    assert_eq!(ids(&f.store.read_after(0, 10).unwrap()), ["long", "forever"]);
    let dead = f.store.dead_letters(0, 10).unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, "ttl expired");
    assert_eq!(dead[0].event().unwrap().body.id, "short");
    let s = f.status();
    assert_eq!((s.dead_letters, s.counters.expired_events), (1, 1));
    // Its id still deduplicates: the producer is told it was accepted before.
    assert!(f.store.append(vec![event("short", "t", 4)]).await.unwrap()[0].duplicate);
}

#[tokio::test]
async fn sequence_hlc_and_counters_survive_a_restart_even_if_the_clock_went_back() {
    let f = Fixture::new(|_| {});
    f.store.append(vec![event("a", "t", 4), event("b", "t", 4)]).await.unwrap();
    let last_hlc = f.store.read_after(0, 10).unwrap()[1].hlc;
    f.clock.advance_nanos(-3_600 * 1_000_000_000);
    let f = f.reopen();
    let out = f.store.append(vec![event("c", "t", 4), event("a", "t", 4)]).await.unwrap();
    assert_eq!((out[0].sequence, out[1].duplicate), (3, true));
    let c = f.store.read_after(2, 1).unwrap().remove(0);
    assert!(c.hlc > last_hlc, "HLC went backwards across a restart");
    assert_eq!(f.status().counters.accepted_events, 3);
}

#[tokio::test]
async fn cursors_only_move_forward_and_persist() {
    let f = Fixture::new(|_| {});
    f.store.set_cursor("cloud-a", 5).await.unwrap();
    f.store.set_cursor("cloud-a", 3).await.unwrap();
    assert_eq!(f.store.cursor("cloud-a").unwrap(), Some(5));
    let f = f.reopen();
    assert_eq!(f.store.cursor("cloud-a").unwrap(), Some(5));
    assert_eq!(f.store.cursor("cloud-b").unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_share_commits() {
    let f = Fixture::new(|_| {});
    let before = f.status().counters.commits;
    let tasks: Vec<_> = (0..64)
        .map(|p| {
            let store = f.store.clone();
            tokio::spawn(async move {
                for i in 0..20 {
                    store.append(vec![event(&format!("p{p}-{i}"), "t", 16)]).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let s = f.status();
    assert_eq!(s.events, 64 * 20);
    let commits = s.counters.commits - before;
    assert!(commits < 64 * 20, "{commits} commits for {} requests: no grouping", 64 * 20);
}

#[tokio::test]
async fn appends_after_close_are_refused_not_lost() {
    let f = Fixture::new(|_| {});
    f.store.append(vec![event("a", "t", 4)]).await.unwrap();
    f.store.close();
    assert!(matches!(f.store.append(vec![event("b", "t", 4)]).await, Err(AppendError::Closed)));
    let f = f.reopen();
    assert_eq!(ids(&f.store.read_after(0, 10).unwrap()), ["a"]);
}

#[tokio::test]
async fn ingest_is_refused_below_the_free_disk_reserve_and_nothing_changes() {
    let f = Fixture::new(|c| c.min_free_disk_bytes = u64::MAX);
    match f.store.append(vec![event("a", "t", 4)]).await {
        Err(AppendError::DiskFull { free, reserve, .. }) => assert!(free < reserve),
        other => panic!("expected DiskFull, got {other:?}"),
    }
    assert_eq!(f.status().events, 0);
}

#[tokio::test]
async fn events_never_appended_can_be_dead_lettered_durably_without_a_sequence() {
    let f = Fixture::new(|_| {});
    f.store.append(vec![event("a", "t/1", 4)]).await.unwrap();
    f.store
        .dead_letter_new(vec![event("b", "t/2", 4), event("c", "t/3", 4)], "plugin f: trapped".into())
        .await
        .unwrap();
    let f = f.reopen();
    let dead = f.store.dead_letters(0, 10).unwrap();
    assert_eq!(dead.len(), 2);
    assert!(dead.iter().all(|d| d.sequence == 0 && d.reason == "plugin f: trapped"));
    assert_eq!(dead[1].event().unwrap().body.id, "c");
    let s = f.status();
    assert_eq!((s.events, s.last_sequence, s.dead_letters), (1, 1, 2), "the log and its sequence are untouched");
}

#[tokio::test]
async fn a_replayed_dead_letter_is_a_new_event_for_its_destination_and_leaves_the_queue() {
    let f = Fixture::new(|_| {});
    f.store.append(vec![event("a", "t/1", 4), event("b", "t/2", 4)]).await.unwrap();
    f.store.dead_letter_copy_for(1, "cloud-b", "too large for cloud-b").await.unwrap();
    f.store.dead_letter_new(vec![event("c", "t/3", 4)], "plugin f: trapped".into()).await.unwrap();
    let numbers: Vec<u64> = f.store.dead_letters(0, 10).unwrap().iter().map(|d| d.number).collect();
    assert_eq!(f.store.dead_letters(0, 10).unwrap()[0].destination.as_deref(), Some("cloud-b"));

    // An unknown number refuses the whole request and changes nothing.
    let before = f.status();
    let err = f.store.replay_dead_letters(vec![numbers[0], 999]).await.unwrap_err();
    assert!(matches!(err, DeadLetterError::NotFound(999)), "{err}");
    let after = f.status();
    assert_eq!((after.last_sequence, after.dead_letters), (before.last_sequence, before.dead_letters));

    let replayed = f.store.replay_dead_letters(numbers.clone()).await.unwrap();
    assert_eq!(replayed.iter().map(|r| r.sequence).collect::<Vec<_>>(), vec![3, 4]);
    assert_eq!(replayed[0].destination.as_deref(), Some("cloud-b"));
    let f = f.reopen();
    let s = f.status();
    assert_eq!((s.events, s.last_sequence, s.dead_letters, s.dead_letter_bytes), (4, 4, 0, 0));
    let log = f.store.read_after(2, 10).unwrap();
    assert_eq!(log[0].body.id, "a");
    assert!(log[0].body.routed_to("cloud-b") && !log[0].body.routed_to("cloud-a"), "only where it failed");
    assert_eq!(log[1].body.id, "c");
    assert!(
        log[1].body.routed_to("cloud-a") && log[1].body.routed_to("cloud-b"),
        "a dead letter of no destination goes everywhere"
    );
    assert!(log[0].hlc > f.store.read_after(0, 1).unwrap()[0].hlc, "a replay gets a fresh HLC");
    let err = f.store.replay_dead_letters(vec![numbers[0]]).await.unwrap_err();
    assert!(matches!(err, DeadLetterError::NotFound(_)), "replayed once only: {err}");
}

#[tokio::test]
async fn purge_deletes_the_named_dead_letters_or_all_and_refuses_unknown_ones_whole() {
    let f = Fixture::new(|_| {});
    f.store
        .dead_letter_new(vec![event("a", "t", 4), event("b", "t", 4), event("c", "t", 4)], "r".into())
        .await
        .unwrap();
    let numbers: Vec<u64> = f.store.dead_letters(0, 10).unwrap().iter().map(|d| d.number).collect();
    assert!(matches!(
        f.store.purge_dead_letters(Some(vec![numbers[0], 999])).await,
        Err(DeadLetterError::NotFound(999))
    ));
    assert_eq!(f.status().dead_letters, 3);
    assert_eq!(f.store.purge_dead_letters(Some(vec![numbers[1]])).await.unwrap(), 1);
    assert!(f.store.dead_letter(numbers[1]).unwrap().is_none());
    assert_eq!(f.store.purge_dead_letters(None).await.unwrap(), 2);
    let s = f.status();
    assert_eq!((s.dead_letters, s.dead_letter_bytes), (0, 0));
}

#[test]
fn a_version_1_dead_letter_still_decodes_without_a_destination() {
    // The v1 layout: version byte, then postcard (sequence, reason, at_ms, record).
    let record = vec![7u8, 8, 9];
    let mut bytes = vec![1u8];
    bytes.extend(postcard::to_stdvec(&(5u64, "ttl expired", 42u64, record.clone())).unwrap());
    let d = DeadLetter::decode(3, &bytes).unwrap();
    assert_eq!(
        (d.number, d.sequence, d.reason.as_str(), d.at_ms, d.record, d.destination),
        (3, 5, "ttl expired", 42, record, None)
    );
    assert!(matches!(DeadLetter::decode(3, &[9]), Err(DecodeError::UnknownVersion(9))));
}

#[tokio::test]
async fn a_full_store_removes_delivered_events_before_it_refuses_a_producer() {
    let f = Fixture::new(|c| {
        c.quota_bytes = 64 * 1024;
        c.full_policy = FullPolicy::Reject;
        c.consumers = vec![crate::config::Consumer {
            name: "cloud".into(),
            routing: crate::config::Routing {
                routes: vec![crate::topic::TopicFilter::new("#").unwrap()],
                subscribe: vec![],
            },
        }];
    });
    f.store.append((0..10).map(|i| event(&format!("a{i}"), "t", 1000)).collect()).await.unwrap();
    // The first cursor move removes what it delivered at once; another
    // within the removal interval (100 ms) leaves its events in place, and
    // the append must then make room by removing them.
    f.store.set_cursor("cloud", 10).await.unwrap();
    f.store.append((0..50).map(|i| event(&format!("b{i}"), "t", 1000)).collect()).await.unwrap();
    f.store.set_cursor("cloud", 60).await.unwrap();
    let out = f.store.append((0..30).map(|i| event(&format!("c{i}"), "t", 1000)).collect()).await.unwrap();
    assert_eq!(out.len(), 30);
    let s = f.status();
    assert_eq!((s.events, s.counters.evicted_events), (30, 0));
}

#[tokio::test]
async fn inspect_reads_a_closed_store_and_refuses_an_open_one() {
    let f = Fixture::new(|_| {});
    f.store.append(vec![event("a", "t/1", 4), event("b", "t/2", 4), event("c", "t/3", 4)]).await.unwrap();
    f.store.set_cursor("cloud", 2).await.unwrap();
    f.store.dead_letter_copy_for(3, "cloud", "too large").await.unwrap();
    let err = inspect::inspect(&f.config.path).unwrap_err();
    assert!(matches!(err, inspect::InspectError::InUse(_)), "{err}");
    f.store.close();
    let (path, store) = (f.config.path.clone(), f.store);
    drop(store);
    let i = inspect::inspect(&path).unwrap();
    assert_eq!((i.events, i.last_sequence, i.dead_letters), (3, 3, 1));
    assert_eq!(i.oldest.as_ref().unwrap().sequence, 1);
    assert_eq!(i.newest.as_ref().unwrap().subject.as_deref(), Some("t/3"));
    assert_eq!(
        (i.cursors[0].destination.as_str(), i.cursors[0].acked_sequence, i.cursors[0].backlog_events),
        ("cloud", 2, 1)
    );
    assert_eq!(i.dead_letter_reasons, vec![("too large".to_owned(), 1)]);
    let missing = inspect::inspect(&path.with_file_name("nope.redb")).unwrap_err();
    assert!(matches!(missing, inspect::InspectError::Missing(_)), "{missing}");
}

/// Retries `append` until it succeeds or `limit` passes (the writer reopens
/// with backoff); the last refusal when it never does.
async fn append_until_ok(
    store: &Store,
    events: impl Fn() -> Vec<PreparedEvent>,
    limit: Duration,
) -> Result<Vec<Appended>, AppendError> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        match store.append(events()).await {
            Ok(a) => return Ok(a),
            Err(e) if std::time::Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

#[tokio::test]
async fn a_failed_write_is_refused_and_the_store_heals_once_the_cause_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig::at(dir.path().join("ferry.redb"));
    let faults = faults::IoFaults::new();
    let (f2, path) = (faults.clone(), config.path.clone());
    let store = Store::open_with_backends(config, Arc::new(ManualClock::new(T0)), move || f2.backend(&path)).unwrap();
    store.append(vec![event("before", "t/a", 8)]).await.unwrap();

    faults.fail_writes(libc::ENOSPC);
    let refused = store.append(vec![event("during", "t/a", 8)]).await.unwrap_err();
    assert!(matches!(refused, AppendError::Unavailable { .. }), "{refused:?}");
    assert!(refused.to_string().contains("nothing of this request was stored"), "{refused}");
    let health = store.health();
    assert!(matches!(&health, StoreHealth::Failing { reason, .. } if reason.contains("No space left")), "{health:?}");
    // While it cannot write, requests are answered at once, not queued.
    for _ in 0..20 {
        assert!(store.append(vec![event("x", "t/a", 8)]).await.is_err());
    }

    faults.heal();
    let after = append_until_ok(&store, || vec![event("after", "t/a", 8)], Duration::from_secs(20)).await.unwrap();
    assert_eq!(after[0].sequence, 2, "sequences go on from the last committed event");
    assert_eq!(store.health(), StoreHealth::Ok);
    assert_eq!(ids(&store.read_after(0, 10).unwrap()), ["before", "after"]);
    assert!(faults.failed() > 0);
}

#[tokio::test]
async fn a_store_file_deleted_while_running_stops_ingest_with_a_clear_error() {
    let f = Fixture::new(|c| c.min_free_disk_bytes = 0);
    f.store.append(vec![event("a", "t/a", 8)]).await.unwrap();
    std::fs::remove_file(&f.config.path).unwrap();
    let e = f.store.append(vec![event("b", "t/a", 8)]).await.unwrap_err();
    assert!(e.to_string().contains("deleted while the agent ran"), "{e}");
    assert!(matches!(f.store.health(), StoreHealth::Vanished { .. }));
    // What is still open is still readable, for the forwarders.
    assert_eq!(ids(&f.store.read_after(0, 10).unwrap()), ["a"]);
    f.store.set_cursor("d", 1).await.unwrap();
}

#[tokio::test]
async fn an_empty_or_foreign_store_file_is_refused_never_reinitialised() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig::at(dir.path().join("ferry.redb"));
    std::fs::write(&config.path, b"").unwrap();
    let e = Store::open(config.clone(), Arc::new(ManualClock::new(T0))).err().unwrap();
    assert!(e.to_string().contains("empty"), "{e}");
    assert_eq!(std::fs::metadata(&config.path).unwrap().len(), 0, "the file is left as it was");
    std::fs::write(&config.path, b"not a database at all").unwrap();
    let e = Store::open(config.clone(), Arc::new(ManualClock::new(T0))).err().unwrap();
    assert!(e.to_string().contains("not a Ferry store"), "{e}");
}

#[tokio::test]
async fn an_unreadable_record_is_moved_to_the_dead_letters_and_readers_go_on() {
    let f = Fixture::new(|_| {});
    f.store.append(vec![event("a", "t/a", 8), event("b", "t/a", 8), event("c", "t/a", 8)]).await.unwrap();
    {
        let db = f.store.database().get().unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(tables::LOG).unwrap().insert(2, &[9u8, 9, 9][..]).unwrap();
        txn.commit().unwrap();
    }
    let err = f.store.read_after(0, 10).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { sequence: 2, .. }), "{err}");
    f.store.set_aside_unreadable(2, "unreadable: test").await.unwrap();
    assert_eq!(ids(&f.store.read_after(0, 10).unwrap()), ["a", "c"]);
    let dead = f.store.dead_letters(0, 10).unwrap();
    assert_eq!((dead.len(), dead[0].sequence, dead[0].reason.as_str()), (1, 2, "unreadable: test"));
    assert_eq!(dead[0].record, [9, 9, 9], "kept as it was, for an operator");
}

#[tokio::test]
async fn a_dead_letter_no_broker_would_take_is_not_replayed() {
    let f = Fixture::new(|_| {});
    let mut poison = event("nul\u{0}id", "t/a", 4);
    poison.dedup = Dedup::None;
    f.store.append(vec![poison]).await.unwrap();
    f.store.dead_letter_copy(1, "test").await.unwrap();
    let number = f.store.dead_letters(0, 1).unwrap()[0].number;
    let e = f.store.replay_dead_letters(vec![number]).await.unwrap_err();
    assert!(matches!(&e, DeadLetterError::Undeliverable { reason, .. } if reason.contains("`id`")), "{e}");
    assert_eq!(f.store.dead_letters(0, 10).unwrap().len(), 1, "nothing changed");
}

#[tokio::test]
async fn the_first_event_since_a_time_is_found_among_gaps_and_past_either_end() {
    let f = Fixture::new(|c| {
        c.consumers = vec![crate::config::Consumer {
            name: "cloud".into(),
            routing: crate::config::Routing {
                routes: vec![crate::topic::TopicFilter::new("#").unwrap()],
                subscribe: vec![],
            },
        }];
    });
    let t0 = f.clock.now_millis();
    // Ten events a second apart.
    for i in 0..10 {
        f.store.append(vec![event(&format!("e{i}"), "t", 10)]).await.unwrap();
        f.clock.advance_nanos(1_000_000_000);
    }
    assert_eq!(f.store.first_since(0).unwrap(), Some(1));
    assert_eq!(f.store.first_since(t0 + 4_000).unwrap(), Some(5));
    assert_eq!(f.store.first_since(t0 + 4_500).unwrap(), Some(6), "between two events: the later");
    assert_eq!(f.store.first_since(t0 + 9_000).unwrap(), Some(10));
    assert_eq!(f.store.first_since(t0 + 9_001).unwrap(), None, "after the newest");
    // The delivered oldest three leave the log: the search starts at what is left.
    f.store.set_cursor("cloud", 3).await.unwrap();
    for _ in 0..50 {
        if f.store.read_after(0, 1).unwrap()[0].sequence == 4 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        f.store.sweep().await.unwrap();
    }
    assert_eq!(f.store.read_after(0, 1).unwrap()[0].sequence, 4, "the delivered ones were removed");
    assert_eq!(f.store.first_since(0).unwrap(), Some(4));
    assert_eq!(f.store.first_since(t0 + 1_000).unwrap(), Some(4));
    let empty = Fixture::new(|_| {});
    assert_eq!(empty.store.first_since(0).unwrap(), None);
}

fn everything(names: &[&str]) -> Vec<crate::config::Consumer> {
    names
        .iter()
        .map(|n| crate::config::Consumer {
            name: (*n).into(),
            routing: crate::config::Routing {
                routes: vec![crate::topic::TopicFilter::new("#").unwrap()],
                subscribe: vec![],
            },
        })
        .collect()
}

fn keep_for(age: Duration, max_bytes: u64) -> Option<crate::config::RetainDelivered> {
    Some(crate::config::RetainDelivered { age, max_bytes })
}

fn sequences(events: &[Event]) -> Vec<u64> {
    events.iter().map(|e| e.sequence).collect()
}

#[tokio::test]
async fn delivered_events_kept_for_replay_make_room_before_any_undelivered_event_under_either_policy() {
    for policy in [FullPolicy::Reject, FullPolicy::DropOldest] {
        let f = Fixture::new(|c| {
            c.quota_bytes = 64 * 1024;
            c.full_policy = policy;
            c.consumers = everything(&["a", "b"]);
            c.retain_delivered = keep_for(Duration::from_secs(3600), 64 * 1024);
        });
        f.store.append((0..40).map(|i| event(&format!("a{i}"), "t", 1000)).collect()).await.unwrap();
        f.store.set_cursor("a", 20).await.unwrap();
        f.store.set_cursor("b", 20).await.unwrap();
        f.store.sweep().await.unwrap();
        let s = f.status();
        assert_eq!((s.events, s.counters.retained_events), (40, 20), "{policy:?}: delivered ones are kept");
        assert_eq!(s.counters.delivered_events, 20);

        f.store.append((0..30).map(|i| event(&format!("b{i}"), "t", 1000)).collect()).await.unwrap();
        let s = f.status();
        assert_eq!(s.counters.evicted_events, 0, "{policy:?}: no undelivered event made way");
        assert!(s.counters.retained_evicted > 0, "{policy:?}");
        assert_eq!(s.counters.retained_events + s.counters.retained_evicted, 20);
        let kept = sequences(&f.store.read_after(0, 100).unwrap());
        let first = 21 - s.counters.retained_events;
        assert_eq!(kept, (first..=70).collect::<Vec<_>>(), "{policy:?}: the oldest kept ones went first");
    }
}

#[tokio::test]
async fn kept_events_leave_past_their_age_or_their_share_and_all_once_retention_is_off() {
    let f = Fixture::new(|c| {
        c.consumers = everything(&["a"]);
        c.retain_delivered = keep_for(Duration::from_secs(60), 12 * 1024);
    });
    f.store.append((0..5).map(|i| event(&format!("old{i}"), "t", 1000)).collect()).await.unwrap();
    f.clock.advance_nanos(30_000_000_000);
    f.store.append((0..5).map(|i| event(&format!("new{i}"), "t", 1000)).collect()).await.unwrap();
    f.store.set_cursor("a", 10).await.unwrap();
    f.store.sweep().await.unwrap();
    assert_eq!(f.status().counters.retained_events, 10, "within age and share");

    f.clock.advance_nanos(40_000_000_000);
    f.store.sweep().await.unwrap();
    assert_eq!(sequences(&f.store.read_after(0, 100).unwrap()), [6, 7, 8, 9, 10], "the first five aged out");
    assert_eq!(f.status().counters.retained_expired, 5);

    // A share that no longer holds them: the oldest go until the rest fit.
    f.store.append((0..10).map(|i| event(&format!("more{i}"), "t", 1000)).collect()).await.unwrap();
    f.store.set_cursor("a", 20).await.unwrap();
    f.store.sweep().await.unwrap();
    let s = f.status();
    assert!(s.counters.retained_bytes <= 12 * 1024, "{:?}", s.counters);
    assert!(s.counters.retained_expired > 5, "some went for the share: {:?}", s.counters);
    assert_eq!(f.store.read_after(0, 100).unwrap().last().map(|e| e.sequence), Some(20));

    let f = f.reopen_with(|c| c.retain_delivered = None);
    f.store.sweep().await.unwrap();
    let s = f.status();
    assert_eq!((s.events, s.counters.retained_events, s.counters.retained_bytes, s.bytes), (0, 0, 0, 0));
}

#[tokio::test]
async fn a_rewind_makes_kept_events_undelivered_again_and_ignores_cursor_moves_sent_before_it() {
    let f = Fixture::new(|c| {
        c.consumers = everything(&["a", "b"]);
        c.retain_delivered = keep_for(Duration::from_secs(3600), 1 << 20);
    });
    f.store.append((0..10).map(|i| event(&format!("e{i}"), "t", 100)).collect()).await.unwrap();
    f.store.set_cursor("a", 10).await.unwrap();
    f.store.set_cursor("b", 10).await.unwrap();
    f.store.sweep().await.unwrap();
    assert_eq!(f.status().counters.retained_events, 10);

    let rewound = f.store.rewind("a", 4, 1).await.unwrap();
    assert_eq!(rewound, Rewound { previous: 10, first_available: Some(5) });
    assert_eq!(f.store.cursor("a").unwrap(), Some(4));
    assert_eq!(f.status().counters.retained_events, 4, "5..=10 are undelivered again");
    // An ack from before the rewind (epoch 0) must not skip the replay.
    f.store.advance_cursor("a", 10, 0).await.unwrap();
    assert_eq!(f.store.cursor("a").unwrap(), Some(4));
    f.store.sweep().await.unwrap();
    assert_eq!(sequences(&f.store.read_after(4, 100).unwrap()), [5, 6, 7, 8, 9, 10], "nothing left the log");

    f.store.advance_cursor("a", 10, 1).await.unwrap();
    assert_eq!(f.store.cursor("a").unwrap(), Some(10));
    f.store.sweep().await.unwrap();
    let s = f.status();
    assert_eq!((s.events, s.counters.retained_events), (10, 10), "delivered again, kept again once");
    assert_eq!(s.counters.retained_bytes, s.bytes);

    // A rewind never moves a cursor forward.
    assert_eq!(f.store.rewind("b", 12, 1).await.unwrap().previous, 10);
    assert_eq!(f.store.cursor("b").unwrap(), Some(10));
}

#[tokio::test]
async fn a_receipt_dates_a_delivery_by_the_first_cursor_move_past_it_and_a_rewind_undoes_it() {
    let f = Fixture::new(|c| {
        c.consumers = everything(&["a"]);
        c.retain_delivered = keep_for(Duration::from_secs(3600), 1 << 20);
    });
    f.store.append((0..8).map(|i| event(&format!("e{i}"), "t", 10)).collect()).await.unwrap();
    let t1 = f.clock.now_millis();
    f.store.set_cursor("a", 5).await.unwrap();
    f.clock.advance_nanos(2_000_000_000);
    f.store.set_cursor("a", 8).await.unwrap();
    let delivered_ms = |seq: u64| {
        let r = f.store.receipt(&EventRef::Sequence(seq), &[]).unwrap().unwrap();
        (r.destinations[0].state.clone(), r.destinations[0].delivered_ms)
    };
    assert_eq!(delivered_ms(3), (DeliveryState::Delivered, Some(t1)));
    assert_eq!(delivered_ms(5), (DeliveryState::Delivered, Some(t1)));
    assert_eq!(delivered_ms(6), (DeliveryState::Delivered, Some(t1 + 2_000)));
    f.store.rewind("a", 4, 1).await.unwrap();
    assert_eq!(delivered_ms(6), (DeliveryState::Pending, None));
    assert_eq!(delivered_ms(3), (DeliveryState::Delivered, Some(t1)), "still dated by the move to 5");
    f.clock.advance_nanos(1_000_000_000);
    f.store.advance_cursor("a", 8, 1).await.unwrap();
    assert_eq!(delivered_ms(6), (DeliveryState::Delivered, Some(t1 + 3_000)), "delivered again, later");
    // Acknowledged in memory, not yet durable: delivered, not yet dated.
    f.store.append(vec![event("e9", "t", 10)]).await.unwrap();
    let r = f.store.receipt(&EventRef::Sequence(9), &[("a".into(), 9)]).unwrap().unwrap();
    assert_eq!((r.destinations[0].state.clone(), r.destinations[0].delivered_ms), (DeliveryState::Delivered, None));
}

#[test]
fn cursor_move_keys_sort_by_cursor_within_a_destination_and_never_between_two_others() {
    use super::tables::move_key;
    assert!(move_key("a", 9) < move_key("a", 10));
    assert!(move_key("a", 10) < move_key("a", u64::MAX));
    for other in ["a-b", "a_b", "ab", "a0", "A", "b"] {
        let inside = |k: String| move_key("a", 0) <= k && k <= move_key("a", u64::MAX);
        assert!(!inside(move_key(other, 0)) && !inside(move_key(other, u64::MAX)), "{other}");
    }
}
