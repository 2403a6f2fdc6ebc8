//! Loopback port helpers: pick an ephemeral port and wait for one to accept.
//!
//! Owns no sockets beyond the short-lived probes it opens itself.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::time::Duration;

use anyhow::Context as _;
use tokio::time::Instant;

/// Asks the kernel for a free loopback port by binding `127.0.0.1:0` and
/// releasing it.
///
/// Another process can take the port before the caller binds it, so callers
/// that hand the port to a child process must retry on "address in use".
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("bind 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// The loopback socket address for `port`.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// Returns `true` once `127.0.0.1:port` accepts a TCP connection, or `false`
/// if it did not within `timeout`.
///
/// `give_up` is polled between attempts so a caller can stop early, e.g. when
/// the process that should listen has already exited.
pub async fn wait_for_port(port: u16, timeout: Duration, mut give_up: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if tokio::net::TcpStream::connect(loopback(port)).await.is_ok() {
            return true;
        }
        if give_up() || Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
