//! The one reconnect loop: every MQTT connection Ferry keeps is a
//! [`Session`] run by a [`Supervisor`].
//!
//! The supervisor owns what all connections share: opening a fresh
//! [`Link`] per attempt, the CONNACK deadline, backoff with jitter (reset
//! by each CONNACK), the log line when a link goes down, and stopping at
//! shutdown, also mid-connect and mid-backoff. The session owns what its
//! connection is for; it is handed the link once the broker has accepted
//! it, and says how it [`End`]ed. A session that must finish its work at
//! shutdown (the forwarder lets earned acks reach the disk) watches
//! shutdown itself; the supervisor never cancels a running session.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::backoff::Backoff;
use super::link::{BrokerLimits, Link, LinkError, LinkEvent, LinkOptions};
use crate::config::MqttEndpoint;

/// What the broker said when it accepted a connection.
#[derive(Debug, Clone, Copy)]
pub struct Connected {
    /// Whether the broker kept a session for this client id.
    pub session_present: bool,
    /// The limits it stated in its CONNACK (MQTT 5; none on 3.1.1).
    pub limits: BrokerLimits,
}

/// How a session ended, which decides what the supervisor does next.
#[derive(Debug)]
pub enum End {
    /// Shutdown was asked for: the supervisor stops.
    Shutdown,
    /// Reconnect at once, without backoff (credentials about to expire, a
    /// replay that drops what was in flight).
    Renew,
    /// The link failed: it broke, went quiet, or the broker refused or
    /// closed it. Reconnect after backoff.
    Link {
        /// What failed.
        error: LinkError,
        /// Whether the broker ended it (rather than Ferry giving up on it),
        /// which may blame the publish in flight.
        broker_ended: bool,
    },
    /// Ferry's own side cannot go on with this connection (its store, a
    /// feed it fell behind): start over on a new one, after backoff, so the
    /// broker resends what was not acknowledged.
    Local(String),
}

impl End {
    /// A link failure Ferry decided on, which blames no publish.
    pub fn ours(error: LinkError) -> Self {
        End::Link { error, broker_ended: false }
    }

    /// Why the session ended, when it failed.
    pub fn failure(&self) -> Option<String> {
        match self {
            End::Link { error, .. } => Some(error.to_string()),
            End::Local(reason) => Some(reason.clone()),
            End::Shutdown | End::Renew => None,
        }
    }
}

impl From<LinkError> for End {
    fn from(error: LinkError) -> Self {
        End::Link { error, broker_ended: true }
    }
}

/// What one connection is for. The supervisor calls [`Session::endpoint`]
/// before each attempt, [`Session::run`] once the broker has accepted it,
/// and [`Session::ended`] after every attempt, failed connects included.
pub trait Session {
    /// The endpoint to connect to now (credentials that expire are signed
    /// afresh here). `Err` stops the supervisor for good; the session has
    /// reported why.
    fn endpoint(&mut self) -> Result<MqttEndpoint, String>;

    /// One accepted connection, until it ends.
    fn run(&mut self, link: &mut Link, connected: Connected) -> impl Future<Output = End> + Send;

    /// After each attempt, before any backoff: what the session keeps
    /// across connections (status, counters) learns how it ended.
    fn ended(&mut self, end: &End) -> impl Future<Output = ()> + Send {
        let _ = end;
        async {}
    }
}

pub use crate::config::DEFAULT_BACKOFF;

/// Runs one owner's connections until shutdown.
pub struct Supervisor {
    name: String,
    tls: Option<Arc<rustls::ClientConfig>>,
    options: LinkOptions,
    backoff: Backoff,
    connect_deadline: Option<Duration>,
    shutdown: watch::Receiver<bool>,
}

impl Supervisor {
    /// `name` says in the log what the connection is for; `backoff` is
    /// `(base, cap)` of the reconnect delays.
    pub fn new(
        name: impl Into<String>,
        tls: Option<Arc<rustls::ClientConfig>>,
        options: LinkOptions,
        backoff: (Duration, Duration),
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            name: name.into(),
            tls,
            options,
            backoff: Backoff::new(backoff.0, backoff.1),
            connect_deadline: None,
            shutdown,
        }
    }

    /// Waits this long for a CONNACK instead of twice the keep-alive (at
    /// least 10 s).
    pub fn connect_deadline(mut self, deadline: Duration) -> Self {
        self.connect_deadline = Some(deadline);
        self
    }

    /// Connects, runs `session` on each accepted connection and reconnects
    /// until shutdown, or until the session ends it.
    pub async fn run<S: Session>(mut self, session: &mut S) {
        while !*self.shutdown.borrow() {
            let Ok(endpoint) = session.endpoint() else { return };
            // rumqttc bounds the TCP and TLS set-up; a broker that accepts
            // the socket and never answers CONNECT is bounded here.
            let deadline = self.connect_deadline.unwrap_or_else(|| endpoint.keep_alive.max(Duration::from_secs(5)) * 2);
            let mut link = Link::open(&endpoint, self.tls.as_ref(), &self.options);
            let connected = tokio::select! {
                r = tokio::time::timeout(deadline, connect(&mut link)) => r,
                _ = stopping(&mut self.shutdown) => Ok(Err(LinkError::Connection("shutting down".into()))),
            };
            let end = if *self.shutdown.borrow() {
                End::Shutdown
            } else {
                match connected {
                    Ok(Ok(c)) => {
                        self.backoff.reset();
                        session.run(&mut link, c).await
                    }
                    Ok(Err(e)) => End::ours(e),
                    Err(_) => End::ours(LinkError::Connection(format!("no CONNACK within {deadline:?}"))),
                }
            };
            session.ended(&end).await;
            drop(link);
            match end {
                End::Shutdown => return,
                End::Renew => tracing::debug!(link = %self.name, "reconnecting at once"),
                End::Link { error, .. } => {
                    let delay = self.backoff.next_delay(&mut rand::rng());
                    tracing::warn!(link = %self.name, url = %endpoint.url(), %error, retry_in = ?delay, "link down");
                    self.sleep(delay).await;
                }
                End::Local(reason) => {
                    let delay = self.backoff.next_delay(&mut rand::rng());
                    tracing::warn!(link = %self.name, url = %endpoint.url(), %reason, retry_in = ?delay, "session ended by a local failure; reconnecting");
                    self.sleep(delay).await;
                }
            }
        }
    }

    async fn sleep(&mut self, delay: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stopping(&mut self.shutdown) => {}
        }
    }
}

/// Polls a new link until the broker accepts it.
pub async fn connect(link: &mut Link) -> Result<Connected, LinkError> {
    loop {
        if let LinkEvent::Connected { session_present, limits } = link.poll().await? {
            return Ok(Connected { session_present, limits });
        }
    }
}

/// Resolves once shutdown is asked for, or once nothing can ask for it any
/// more (the agent is gone).
pub async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::config::Config;

    fn endpoint(port: u16) -> MqttEndpoint {
        let toml = format!("[[destination]]\nname = \"b\"\nurl = \"mqtt://127.0.0.1:{port}\"\nprotocol = \"3.1.1\"\n");
        Config::parse(&toml, "test").expect("valid config").destinations.remove(0).endpoint
    }

    fn options() -> LinkOptions {
        LinkOptions { inflight: 4, queue: 8, clean_session: true, manual_acks: false, receive_maximum: None }
    }

    /// A TCP server that answers each connection's first bytes with a 3.1.1
    /// CONNACK when `accept` is set, and with nothing otherwise.
    async fn broker(accept: bool) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 256];
                    if socket.read(&mut buf).await.unwrap_or(0) > 0 && accept {
                        let _ = socket.write_all(&[0x20, 0x02, 0x00, 0x00]).await;
                    }
                    // Hold the socket open until the client goes.
                    while socket.read(&mut buf).await.unwrap_or(0) > 0 {}
                });
            }
        });
        port
    }

    /// Ends each accepted connection with the next of `plan`, records every
    /// end it is told of, and asks for shutdown after `stop_after` of them.
    struct Scripted {
        port: u16,
        plan: Vec<End>,
        runs: usize,
        ends: Arc<Mutex<Vec<String>>>,
        stop_after: usize,
        stop: watch::Sender<bool>,
    }

    impl Session for Scripted {
        fn endpoint(&mut self) -> Result<MqttEndpoint, String> {
            Ok(endpoint(self.port))
        }

        async fn run(&mut self, _link: &mut Link, _connected: Connected) -> End {
            self.runs += 1;
            if self.plan.is_empty() { End::Shutdown } else { self.plan.remove(0) }
        }

        async fn ended(&mut self, end: &End) {
            let mut ends = self.ends.lock().unwrap();
            ends.push(match end {
                End::Shutdown => "shutdown".into(),
                End::Renew => "renew".into(),
                End::Link { error, .. } => format!("link: {error}"),
                End::Local(reason) => format!("local: {reason}"),
            });
            if ends.len() >= self.stop_after {
                let _ = self.stop.send(true);
            }
        }
    }

    fn scripted(port: u16, plan: Vec<End>, stop_after: usize) -> (Scripted, Supervisor) {
        let (stop, shutdown) = watch::channel(false);
        let session = Scripted { port, plan, runs: 0, ends: Arc::default(), stop_after, stop };
        let supervisor =
            Supervisor::new("test", None, options(), (Duration::from_millis(1), Duration::from_millis(5)), shutdown)
                .connect_deadline(Duration::from_millis(300));
        (session, supervisor)
    }

    #[tokio::test]
    async fn a_broker_that_never_answers_connect_is_a_link_failure_naming_the_deadline_and_is_retried() {
        let (mut session, supervisor) = scripted(broker(false).await, vec![], 2);
        tokio::time::timeout(Duration::from_secs(20), supervisor.run(&mut session)).await.expect("stops at shutdown");
        assert_eq!(session.runs, 0);
        let ends = session.ends.lock().unwrap().clone();
        assert_eq!(ends.len(), 2, "{ends:?}");
        assert!(ends.iter().all(|e| e.contains("no CONNACK within 300ms")), "{ends:?}");
    }

    #[tokio::test]
    async fn every_end_but_shutdown_reconnects_and_the_session_hears_of_each() {
        let plan = vec![
            End::Renew,
            End::Local("store full".into()),
            End::ours(LinkError::Connection("went quiet".into())),
            End::Shutdown,
        ];
        let (mut session, supervisor) = scripted(broker(true).await, plan, usize::MAX);
        tokio::time::timeout(Duration::from_secs(20), supervisor.run(&mut session)).await.expect("stops on Shutdown");
        assert_eq!(session.runs, 4);
        let ends = session.ends.lock().unwrap().clone();
        assert_eq!(ends, ["renew", "local: store full", "link: went quiet", "shutdown"]);
    }

    #[tokio::test]
    async fn shutdown_during_a_backoff_stops_the_supervisor() {
        let (stop, shutdown) = watch::channel(false);
        let ends = Arc::<Mutex<Vec<String>>>::default();
        let mut session = Scripted {
            port: broker(true).await,
            plan: vec![End::Local("x".into())],
            runs: 0,
            ends: ends.clone(),
            stop_after: usize::MAX,
            stop: watch::channel(false).0,
        };
        // A backoff far longer than the test may take.
        let supervisor =
            Supervisor::new("test", None, options(), (Duration::from_secs(600), Duration::from_secs(600)), shutdown);
        let run = tokio::spawn(async move {
            supervisor.run(&mut session).await;
            session.runs
        });
        while ends.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.send(true).unwrap();
        let runs = tokio::time::timeout(Duration::from_secs(20), run).await.expect("stops mid-backoff").unwrap();
        assert_eq!(runs, 1);
    }
}
