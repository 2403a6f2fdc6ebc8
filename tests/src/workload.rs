//! The workload of the comparison and soak runs: producers that publish
//! numbered events to a local MQTT broker or to Ferry's HTTP API and keep a
//! ledger of what they were told was accepted, [`Tally`] subscribers on the
//! cloud brokers that record what arrived (and when), and `/proc` readings
//! of the processes under test.
//!
//! Every event carries `{"p": producer, "n": number, "t": send time}` in its
//! payload, padded to [`PAYLOAD_LEN`] bytes, so the same payload travels
//! through a Mosquitto bridge or through Ferry and is recognised, deduplicated
//! and timed at the far end whatever the path.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use ferry_harness::mqtt::{options_v5, options_v311, unique_client_id};
use ferry_harness::rumqttc;
use serde::Deserialize;
use tokio::task::JoinHandle;

/// Bytes of every event payload.
pub const PAYLOAD_LEN: usize = 256;

/// Microseconds since the first call in this process: the one clock that
/// producers stamp and subscribers read.
pub fn now_us() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// The JSON payload of event `n` of producer `p`, stamped now.
pub fn payload(p: u32, n: u64) -> String {
    let mut s = format!("{{\"p\":{p},\"n\":{n},\"t\":{},\"x\":\"", now_us());
    let pad = PAYLOAD_LEN.saturating_sub(s.len() + 2);
    s.extend(std::iter::repeat_n('x', pad));
    s.push_str("\"}");
    s
}

/// Event `i` of a backlog written straight into a store: JSON data of
/// `data_len` bytes, on one of eight subjects, with a UUIDv7-shaped id.
pub fn stored_event_body(i: usize, data_len: usize) -> ferry::event::EventBody {
    use ferry::clock::Clock as _;
    ferry::event::EventBody {
        id: format!("0190a1b2-0000-7000-8000-{i:012}"),
        source: "ferry://bench".into(),
        ty: "ferry.event".into(),
        subject: format!("bench/t{}", i % 8),
        time_nanos: ferry::clock::SystemClock.now_nanos(),
        datacontenttype: Some(ferry::event::JSON_CONTENT_TYPE.into()),
        data: format!("{{\"v\":\"{}\"}}", "x".repeat(data_len.saturating_sub(8))).into_bytes(),
        partitionkey: None,
        extensions: vec![],
    }
}

#[derive(Deserialize)]
struct Stamp {
    p: u32,
    n: u64,
    t: u64,
}

/// A CloudEvent in structured mode, as Ferry sends it to MQTT 3.1.1 clouds.
#[derive(Deserialize)]
struct Structured {
    data: Stamp,
}

impl Stamp {
    /// The stamps of a bare payload, of the data of a structured CloudEvent,
    /// or of each event of a batch (a JSON array of structured events);
    /// empty if the payload is none of these.
    fn parse(payload: &[u8]) -> Vec<Self> {
        if payload.first() == Some(&b'[') {
            return serde_json::from_slice::<Vec<Structured>>(payload)
                .map(|batch| batch.into_iter().map(|s| s.data).collect())
                .unwrap_or_default();
        }
        serde_json::from_slice(payload)
            .ok()
            .or_else(|| serde_json::from_slice::<Structured>(payload).ok().map(|s| s.data))
            .into_iter()
            .collect()
    }
}

/// A growable bit set of event numbers.
#[derive(Debug, Default, Clone)]
pub struct Bits {
    words: Vec<u64>,
    ones: u64,
}

impl Bits {
    /// Sets bit `n`; returns whether it was newly set.
    pub fn insert(&mut self, n: u64) -> bool {
        let (w, b) = ((n / 64) as usize, n % 64);
        if w >= self.words.len() {
            self.words.resize(w + 1, 0);
        }
        let new = self.words[w] & (1 << b) == 0;
        self.words[w] |= 1 << b;
        self.ones += u64::from(new);
        new
    }

    /// Whether bit `n` is set.
    pub fn contains(&self, n: u64) -> bool {
        self.words.get((n / 64) as usize).is_some_and(|w| w & (1 << (n % 64)) != 0)
    }

    /// How many bits are set.
    pub fn len(&self) -> u64 {
        self.ones
    }

    /// Whether no bit is set.
    pub fn is_empty(&self) -> bool {
        self.ones == 0
    }

    /// Every set bit, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words
            .iter()
            .enumerate()
            .flat_map(|(w, &word)| (0..64).filter(move |b| word & (1 << b) != 0).map(move |b| w as u64 * 64 + b))
    }

    /// The lowest number not set.
    pub fn first_missing(&self) -> u64 {
        match self.words.iter().position(|&w| w != u64::MAX) {
            Some(w) => w as u64 * 64 + u64::from(self.words[w].trailing_ones()),
            None => self.words.len() as u64 * 64,
        }
    }
}

/// How fast a producer publishes.
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// As fast as its window allows.
    Max,
    /// This many events per second, each sent when due.
    Rate(f64),
}

/// What one producer sent and was told was accepted.
#[derive(Debug, Default)]
pub struct Ledger {
    /// The producer's number (the `p` of its events).
    pub producer: u32,
    /// Event numbers handed to the client library or sent in a request.
    pub sent: AtomicU64,
    /// Event numbers the receiver acknowledged (PUBACK or HTTP 200).
    pub acked: Mutex<Bits>,
}

impl Ledger {
    /// How many events were acknowledged.
    pub fn acked_count(&self) -> u64 {
        self.acked.lock().expect("ledger lock").len()
    }
}

/// A set of producers, each with its own ledger; stops them on drop.
pub struct Producers {
    /// One ledger per producer, indexed by producer number.
    pub ledgers: Vec<Arc<Ledger>>,
    stop: Arc<AtomicBool>,
    publishers: Vec<JoinHandle<()>>,
    background: Vec<JoinHandle<()>>,
}

impl Producers {
    /// Starts `count` MQTT 3.1.1 producers on `url` publishing QoS 1 to
    /// `sensors/p{i}` with `window` publishes in flight each, `limit` events
    /// each (or until stopped). Producer numbers start at `first`.
    pub fn mqtt(
        url: &str,
        first: u32,
        count: u32,
        window: u16,
        pace: Pace,
        limit: Option<u64>,
    ) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut out = Self { ledgers: Vec::new(), stop: stop.clone(), publishers: Vec::new(), background: Vec::new() };
        for p in first..first + count {
            let mut opts = options_v311(url, &unique_client_id(&format!("producer-{p}")), None)?;
            opts.set_inflight(window).set_max_packet_size(1 << 20, 1 << 20);
            let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, usize::from(window) * 2);
            let ledger = Arc::new(Ledger { producer: p, ..Ledger::default() });
            // Numbers in the order they were handed to the client; rumqttc
            // sends new publishes in that order, so each `Outgoing::Publish`
            // of a packet id not in flight takes the next number.
            let queued: Arc<Mutex<VecDeque<u64>>> = Arc::default();
            let (l, q) = (ledger.clone(), queued.clone());
            out.background.push(tokio::spawn(async move {
                let mut inflight = std::collections::HashMap::<u16, u64>::new();
                loop {
                    match eventloop.poll().await {
                        Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Publish(pkid))) => {
                            if !inflight.contains_key(&pkid)
                                && let Some(n) = q.lock().expect("queue lock").pop_front()
                            {
                                inflight.insert(pkid, n);
                            }
                        }
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(ack))) => {
                            if let Some(n) = inflight.remove(&ack.pkid) {
                                l.acked.lock().expect("ledger lock").insert(n);
                            }
                        }
                        Ok(_) => {}
                        // The broker is gone (killed, restarting): rumqttc
                        // resends what is in flight once it reconnects.
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            }));
            let (l, stop) = (ledger.clone(), stop.clone());
            out.publishers.push(tokio::spawn(async move {
                let start = Instant::now();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) && limit.is_none_or(|m| n < m) {
                    if let Pace::Rate(r) = pace {
                        tokio::time::sleep_until((start + Duration::from_secs_f64(n as f64 / r)).into()).await;
                    }
                    queued.lock().expect("queue lock").push_back(n);
                    if client
                        .publish(format!("sensors/p{p}"), rumqttc::QoS::AtLeastOnce, false, payload(p, n))
                        .await
                        .is_err()
                    {
                        break;
                    }
                    n += 1;
                    l.sent.store(n, Ordering::Relaxed);
                }
            }));
            out.ledgers.push(ledger);
        }
        Ok(out)
    }

    /// Starts `count` producers posting to Ferry's HTTP API at whatever base
    /// URL `url` holds at the moment (it changes when the agent restarts;
    /// `None` while it is down). Each runs `workers` requests at a time with
    /// `batch` events each; a failed request is retried with the same event
    /// ids until it is answered 200.
    pub fn http(
        url: Arc<RwLock<Option<String>>>,
        first: u32,
        count: u32,
        workers: usize,
        batch: u64,
        pace: Pace,
        limit: Option<u64>,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("http client");
        let mut out = Self { ledgers: Vec::new(), stop: stop.clone(), publishers: Vec::new(), background: Vec::new() };
        for p in first..first + count {
            let ledger = Arc::new(Ledger { producer: p, ..Ledger::default() });
            let next = Arc::new(AtomicU64::new(0));
            let start = Instant::now();
            for _ in 0..workers {
                let (url, client, ledger, next, stop) =
                    (url.clone(), client.clone(), ledger.clone(), next.clone(), stop.clone());
                out.publishers.push(tokio::spawn(async move {
                    loop {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let from = next.fetch_add(batch, Ordering::Relaxed);
                        let to = limit.map_or(from + batch, |m| (from + batch).min(m));
                        if from >= to {
                            break;
                        }
                        if let Pace::Rate(r) = pace {
                            tokio::time::sleep_until((start + Duration::from_secs_f64(from as f64 / r)).into()).await;
                        }
                        let body: String = (from..to)
                            .map(|n| {
                                format!(
                                    "{{\"topic\":\"sensors/p{p}\",\"id\":\"p{p}-{n}\",\"data\":{}}}\n",
                                    payload(p, n)
                                )
                            })
                            .collect();
                        ledger.sent.fetch_max(to, Ordering::Relaxed);
                        loop {
                            let base = url.read().expect("url lock").clone();
                            let Some(base) = base else {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                                continue;
                            };
                            let sent = client
                                .post(format!("{base}/v1/events"))
                                .header("content-type", "application/x-ndjson")
                                .body(body.clone())
                                .send()
                                .await;
                            if sent.is_ok_and(|r| r.status() == 200) {
                                let mut acked = ledger.acked.lock().expect("ledger lock");
                                (from..to).for_each(|n| {
                                    acked.insert(n);
                                });
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }));
            }
            out.ledgers.push(ledger);
        }
        out
    }

    /// Tells every producer to stop after its current publish or request.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Waits until every producer stopped sending (its limit reached or
    /// [`stop`](Self::stop) called) and its requests were answered.
    pub async fn join(&mut self) {
        for h in self.publishers.drain(..) {
            let _ = h.await;
        }
    }

    /// Waits until every event handed to an MQTT client was acknowledged,
    /// or `timeout` passed; returns whether all were.
    pub async fn wait_acked(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.ledgers.iter().all(|l| l.acked_count() >= l.sent.load(Ordering::Relaxed)) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Events acknowledged so far, all producers together.
    pub fn acked(&self) -> u64 {
        self.ledgers.iter().map(|l| l.acked_count()).sum()
    }

    /// Per producer, its number and how many events it handed out so far
    /// (events `0..count` were sent or are being sent).
    pub fn sent(&self) -> Vec<(u32, u64)> {
        self.ledgers.iter().map(|l| (l.producer, l.sent.load(Ordering::Relaxed))).collect()
    }
}

impl Drop for Producers {
    fn drop(&mut self) {
        self.stop();
        for h in self.publishers.iter().chain(&self.background) {
            h.abort();
        }
    }
}

#[derive(Debug, Default)]
struct TallyState {
    received: Vec<Bits>,
    unique: u64,
    duplicates: u64,
    foreign: u64,
    latencies_us: Option<Vec<u64>>,
    last_arrival: Option<Instant>,
}

/// A subscriber on a cloud broker that records which events arrived.
pub struct Tally {
    state: Arc<Mutex<TallyState>>,
    task: JoinHandle<()>,
}

impl Tally {
    /// Connects to `url` (MQTT 5, QoS 1) and subscribes to `#`.
    pub async fn start(url: &str) -> anyhow::Result<Self> {
        use rumqttc::v5::mqttbytes::v5::Packet;
        let mut opts = options_v5(url, &unique_client_id("tally"), None)?;
        opts.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(opts, 64);
        client.subscribe("#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce).await.context("queue subscribe")?;
        // Wait for the SUBACK so nothing published afterwards is missed.
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::v5::Event::Incoming(Packet::SubAck(_))) => return Ok(()),
                    Ok(_) => {}
                    Err(e) => return Err(anyhow::anyhow!("tally on {url}: {e}")),
                }
            }
        })
        .await
        .context("no SUBACK")??;
        let state = Arc::new(Mutex::new(TallyState::default()));
        let s = state.clone();
        let task = tokio::spawn(async move {
            let _client = client;
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::v5::Event::Incoming(Packet::Publish(m))) => {
                        let now = now_us();
                        let mut st = s.lock().expect("tally lock");
                        st.last_arrival = Some(Instant::now());
                        let stamps = Stamp::parse(&m.payload);
                        if stamps.is_empty() {
                            st.foreign += 1;
                            continue;
                        }
                        for stamp in stamps {
                            let p = stamp.p as usize;
                            if st.received.len() <= p {
                                st.received.resize(p + 1, Bits::default());
                            }
                            if st.received[p].insert(stamp.n) {
                                st.unique += 1;
                                if let Some(l) = st.latencies_us.as_mut() {
                                    l.push(now.saturating_sub(stamp.t));
                                }
                            } else {
                                st.duplicates += 1;
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        Ok(Self { state, task })
    }

    /// Distinct events received.
    pub fn unique(&self) -> u64 {
        self.state.lock().expect("tally lock").unique
    }

    /// Events received more than once (counted per extra copy).
    pub fn duplicates(&self) -> u64 {
        self.state.lock().expect("tally lock").duplicates
    }

    /// Messages received that carry no event stamp (probes).
    pub fn foreign(&self) -> u64 {
        self.state.lock().expect("tally lock").foreign
    }

    /// When the last message arrived.
    pub fn last_arrival(&self) -> Option<Instant> {
        self.state.lock().expect("tally lock").last_arrival
    }

    /// Starts (or restarts) recording the latency of each newly arrived event.
    pub fn record_latency(&self) {
        self.state.lock().expect("tally lock").latencies_us = Some(Vec::new());
    }

    /// Stops recording latencies and returns those recorded, in µs.
    pub fn take_latencies(&self) -> Vec<u64> {
        self.state.lock().expect("tally lock").latencies_us.take().unwrap_or_default()
    }

    /// Whether, for every `(producer, count)`, events `0..count` of that producer arrived.
    pub fn has_prefixes(&self, counts: &[(u32, u64)]) -> bool {
        let st = self.state.lock().expect("tally lock");
        counts.iter().all(|&(p, c)| c == 0 || st.received.get(p as usize).is_some_and(|b| b.first_missing() >= c))
    }

    /// Of the acknowledged events in `ledgers`, how many never arrived here.
    pub fn missing(&self, ledgers: &[Arc<Ledger>]) -> u64 {
        self.missing_of(ledgers).iter().map(Vec::len).sum::<usize>() as u64
    }

    /// Per producer, the acknowledged event numbers that never arrived here.
    pub fn missing_of(&self, ledgers: &[Arc<Ledger>]) -> Vec<Vec<u64>> {
        let st = self.state.lock().expect("tally lock");
        let empty = Bits::default();
        ledgers
            .iter()
            .map(|l| {
                let got = st.received.get(l.producer as usize).unwrap_or(&empty);
                l.acked.lock().expect("ledger lock").iter().filter(|&n| !got.contains(n)).collect()
            })
            .collect()
    }

    /// Waits until every acknowledged event in `ledgers` arrived, or nothing
    /// new arrived for `quiet` (then the rest is taken as lost), or `timeout`.
    /// Returns how many acknowledged events are missing.
    pub async fn settle(&self, ledgers: &[Arc<Ledger>], quiet: Duration, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        let mut last_progress = Instant::now();
        let mut last_unique = self.unique();
        loop {
            let missing = self.missing(ledgers);
            if missing == 0 || Instant::now() > deadline {
                return missing;
            }
            let unique = self.unique();
            if unique != last_unique {
                last_unique = unique;
                last_progress = Instant::now();
            } else if last_progress.elapsed() > quiet {
                return missing;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `/proc` readings of one process.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcStats {
    /// Resident set size now, KiB.
    pub rss_kib: u64,
    /// Peak resident set size since the process started, KiB.
    pub peak_rss_kib: u64,
    /// User plus system CPU time since start, seconds.
    pub cpu_secs: f64,
    /// Open file descriptors.
    pub fds: u64,
}

/// Reads `/proc/{pid}`; `None` if the process is gone.
pub fn proc_stats(pid: u32) -> Option<ProcStats> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let cpu = (fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?) as f64 / ticks;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count() as u64).unwrap_or(0);
    Some(ProcStats { rss_kib: kib("VmRSS:"), peak_rss_kib: kib("VmHWM:"), cpu_secs: cpu, fds })
}

/// The `q`-quantile (0..=1) of `samples`, which it sorts.
pub fn quantile(samples: &mut [u64], q: f64) -> Option<u64> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_unstable();
    let i = ((samples.len() - 1) as f64 * q).round() as usize;
    Some(samples[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_count_and_find_the_first_gap() {
        let mut b = Bits::default();
        assert_eq!(b.first_missing(), 0);
        for n in 0..130 {
            assert!(b.insert(n));
        }
        assert!(!b.insert(5));
        assert_eq!(b.len(), 130);
        assert_eq!(b.first_missing(), 130);
        b.insert(200);
        assert_eq!(b.first_missing(), 130);
        assert_eq!(b.iter().last(), Some(200));
        assert!(b.contains(200) && !b.contains(199));
    }

    #[test]
    fn payloads_have_the_fixed_length_and_carry_their_stamp() {
        let p = payload(3, 123_456);
        assert_eq!(p.len(), PAYLOAD_LEN);
        let s = Stamp::parse(p.as_bytes());
        assert_eq!(s.iter().map(|s| (s.p, s.n)).collect::<Vec<_>>(), [(3, 123_456)]);
    }

    #[test]
    fn a_structured_cloudevent_or_a_batch_yields_the_stamps_of_its_data() {
        let event = |p, n| format!(r#"{{"specversion":"1.0","id":"x","data":{}}}"#, payload(p, n));
        let s = Stamp::parse(event(5, 9).as_bytes());
        assert_eq!(s.iter().map(|s| (s.p, s.n)).collect::<Vec<_>>(), [(5, 9)]);
        let batch = format!("[{},{}]", event(1, 2), event(1, 3));
        let s = Stamp::parse(batch.as_bytes());
        assert_eq!(s.iter().map(|s| (s.p, s.n)).collect::<Vec<_>>(), [(1, 2), (1, 3)]);
        assert!(Stamp::parse(br#"{"specversion":"1.0","data":"probe"}"#).is_empty());
        assert!(Stamp::parse(br#"[{"specversion":"1.0","data":"probe"}]"#).is_empty());
    }
}
