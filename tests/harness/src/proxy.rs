//! [`FaultProxy`]: a TCP proxy on `127.0.0.1:0` that injects network faults.
//!
//! The proxy owns its listener, one task per connection and nothing else; it
//! never touches the upstream process. Faults are switched at runtime through
//! a cheap cloneable [`ProxyHandle`]:
//!
//! - [`Mode::Pass`]: bytes flow as they arrive.
//! - [`Mode::Latency`]: every chunk is held for the given time, both ways.
//! - [`Mode::Cut`]: open connections are reset (RST) and new ones are reset
//!   right after accept, until [`ProxyHandle::restore`].
//! - [`Mode::Blackhole`]: connections stay open but no byte moves either way,
//!   like a half-open link; new connections are accepted and starved too.
//!   Bytes are held, not dropped, so after `restore` they flow again the way
//!   TCP retransmits across a healed partition.
//! - [`Mode::HoldReplies`]: bytes from the client flow, bytes back are held
//!   as in `Blackhole`: the upstream receives and answers, the client hears
//!   nothing, as when only the return path fails.
//!
//! Dropping the proxy aborts the accept task and, with it, every connection task.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::net;

/// Chunks read but not yet written, per direction; bounds memory under latency.
const PIPE_DEPTH: usize = 256;

/// The fault the proxy currently injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward bytes as they arrive.
    Pass,
    /// Delay every chunk by this much, in both directions.
    Latency(Duration),
    /// Reset all connections and refuse new ones.
    Cut,
    /// Keep connections open, forward nothing.
    Blackhole,
    /// Forward client bytes upstream; hold the upstream's replies.
    HoldReplies,
}

impl Mode {
    /// Whether bytes moving in `direction` wait in this mode.
    fn holds(self, direction: Direction) -> bool {
        match self {
            // Cut holds too: bytes held before it must not slip through
            // while the connection is being reset.
            Mode::Blackhole | Mode::Cut => true,
            Mode::HoldReplies => direction == Direction::ToClient,
            Mode::Pass | Mode::Latency(_) => false,
        }
    }
}

/// Which way a pump moves bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    ToUpstream,
    ToClient,
}

/// A running proxy. Drop stops it.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    handle: ProxyHandle,
    accept_task: JoinHandle<()>,
}

/// Cheap cloneable control and counters of one [`FaultProxy`].
#[derive(Debug, Clone)]
pub struct ProxyHandle {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    mode: watch::Sender<Mode>,
    accepted: AtomicU64,
    refused: AtomicU64,
    open: AtomicU64,
    bytes_to_upstream: AtomicU64,
    bytes_to_client: AtomicU64,
}

impl FaultProxy {
    /// Listens on an ephemeral loopback port and forwards to `upstream`,
    /// starting in [`Mode::Pass`].
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(net::loopback(0)).await.context("bind proxy listener")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            mode: watch::channel(Mode::Pass).0,
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            open: AtomicU64::new(0),
            bytes_to_upstream: AtomicU64::new(0),
            bytes_to_client: AtomicU64::new(0),
        });
        let accept_task = tokio::spawn(accept_loop(listener, upstream, shared.clone()));
        Ok(Self { addr, upstream, handle: ProxyHandle { shared }, accept_task })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The proxy's port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `mqtt://127.0.0.1:PORT` of the proxy, for MQTT clients.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.addr.port())
    }

    /// The address the proxy forwards to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// A handle to switch faults and read counters, usable from other tasks.
    pub fn handle(&self) -> ProxyHandle {
        self.handle.clone()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // The accept task owns the JoinSet of connection tasks, so aborting it
        // drops (and aborts) every connection too.
        self.accept_task.abort();
    }
}

impl ProxyHandle {
    /// Forward normally (same as [`restore`](Self::restore)).
    pub fn pass(&self) {
        self.set(Mode::Pass);
    }

    /// Delay every chunk by `delay`, both directions, including data in flight.
    pub fn latency(&self, delay: Duration) {
        self.set(Mode::Latency(delay));
    }

    /// Reset every open connection and reset new ones until [`restore`](Self::restore).
    pub fn cut(&self) {
        self.set(Mode::Cut);
    }

    /// Stop moving bytes while keeping every connection open (half-open link).
    pub fn blackhole(&self) {
        self.set(Mode::Blackhole);
    }

    /// Switches to [`Mode::HoldReplies`].
    pub fn hold_replies(&self) {
        self.set(Mode::HoldReplies);
    }

    /// Back to [`Mode::Pass`].
    pub fn restore(&self) {
        self.set(Mode::Pass);
    }

    /// Switch to any mode.
    pub fn set(&self, mode: Mode) {
        self.shared.mode.send_replace(mode);
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        *self.shared.mode.borrow()
    }

    /// Connections accepted and forwarded (not counting ones refused during a cut).
    pub fn connections_accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Connections reset right after accept because the proxy was cut.
    pub fn connections_refused(&self) -> u64 {
        self.shared.refused.load(Ordering::Relaxed)
    }

    /// Connections currently open through the proxy.
    pub fn open_connections(&self) -> u64 {
        self.shared.open.load(Ordering::Relaxed)
    }

    /// Bytes forwarded from clients to the upstream.
    pub fn bytes_to_upstream(&self) -> u64 {
        self.shared.bytes_to_upstream.load(Ordering::Relaxed)
    }

    /// Bytes forwarded from the upstream to clients.
    pub fn bytes_to_client(&self) -> u64 {
        self.shared.bytes_to_client.load(Ordering::Relaxed)
    }
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else {
                    // e.g. out of file descriptors: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                if *shared.mode.borrow() == Mode::Cut {
                    shared.refused.fetch_add(1, Ordering::Relaxed);
                    reset(client);
                    continue;
                }
                shared.accepted.fetch_add(1, Ordering::Relaxed);
                conns.spawn(serve(client, upstream, shared.clone()));
            }
            // Reap finished connection tasks so the set does not grow.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Closes with RST instead of FIN: linger 0 makes close(2) abort the connection.
fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// Decrements the open-connection gauge however the connection task ends.
struct OpenGuard(Arc<Shared>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve(mut client: TcpStream, upstream: SocketAddr, shared: Arc<Shared>) {
    shared.open.fetch_add(1, Ordering::Relaxed);
    let _guard = OpenGuard(shared.clone());
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        // Upstream down: the client sees the same RST it would see directly.
        reset(client);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let mut cut_rx = shared.mode.subscribe();
    let cut = {
        let (client_r, client_w) = client.split();
        let (server_r, server_w) = server.split();
        let up = pump(client_r, server_w, Direction::ToUpstream, shared.mode.subscribe(), &shared.bytes_to_upstream);
        let down = pump(server_r, client_w, Direction::ToClient, shared.mode.subscribe(), &shared.bytes_to_client);
        tokio::select! {
            _ = async { tokio::try_join!(up, down) } => false,
            _ = cut_rx.wait_for(|m| *m == Mode::Cut) => true,
        }
    };
    if cut {
        reset(client);
        reset(server);
    }
}

/// Moves bytes one way: a reader stamps each chunk with its arrival time, a
/// writer releases it once the current latency has passed. Both wait while
/// the mode holds their direction. Ends on EOF (after half-closing the writer) or
/// returns an error, which ends the whole connection.
async fn pump<R, W>(
    mut reader: R,
    mut writer: W,
    direction: Direction,
    mode: watch::Receiver<Mode>,
    counter: &AtomicU64,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(PIPE_DEPTH);
    let mut read_mode = mode.clone();
    let read = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            // Not reading while held keeps the bytes in the kernel buffers.
            let _ = read_mode.wait_for(|m| !m.holds(direction)).await;
            let n = tokio::select! {
                n = reader.read(&mut buf) => n?,
                // Re-check the mode (e.g. a switch to Blackhole) before reading on.
                _ = read_mode.changed() => continue,
            };
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            if tx.send((Instant::now(), buf[..n].to_vec())).await.is_err() {
                return Ok(());
            }
        }
    };
    let mut write_mode = mode;
    let write = async move {
        while let Some((arrived, chunk)) = rx.recv().await {
            loop {
                let current = *write_mode.borrow_and_update();
                match current {
                    held if held.holds(direction) => {
                        let _ = write_mode.changed().await;
                    }
                    Mode::Latency(delay) if Instant::now() < arrived + delay => {
                        // Wake early if the latency is changed meanwhile.
                        tokio::select! {
                            _ = tokio::time::sleep_until(arrived + delay) => {}
                            _ = write_mode.changed() => {}
                        }
                    }
                    _ => break,
                }
            }
            writer.write_all(&chunk).await?;
            counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        // Propagate the half-close so the other side sees EOF too.
        writer.shutdown().await
    };
    tokio::try_join!(read, write).map(|_| ())
}
