//! Self-tests of the harness against real brokers on ephemeral ports.
//!
//! One test binary with themed modules; each test starts what it needs and
//! its drop guards stop it.

mod cloud;
mod inprocess;
mod mosquitto;
mod proxy;
mod tls;

use std::time::Duration;

/// Generous bound for things that normally take milliseconds.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// Waits until nothing accepts on `addr` any more.
///
/// Not instant even after the owner closed its listener: a child process
/// that a parallel test is spawning holds a copy of every fd between fork
/// and exec, which keeps the socket alive for that moment.
pub async fn wait_until_refused(addr: std::net::SocketAddr) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(tokio::time::Instant::now() < deadline, "{addr} still accepts connections");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
