//! The systemd service protocol for `ferry run`: `READY=1` once the agent
//! serves, `WATCHDOG=1` pings while its runtime is responsive, and
//! `STOPPING=1` when shutdown begins (see the units in `firmware-targets/`).
//!
//! Outside systemd (no `NOTIFY_SOCKET`) every call does nothing. It owns no
//! agent state: a stuck tokio runtime stops the pings, and systemd restarts
//! the service.

use std::future::Future;

use sd_notify::NotifyState;

/// Wraps the shutdown future given to [`crate::runtime::run`], which polls
/// it only once the agent has started: on that first poll it reports ready
/// and starts the watchdog pings, and when `shutdown` resolves it reports
/// stopping.
pub async fn supervised(shutdown: impl Future<Output = ()>) {
    notify(&[NotifyState::Ready]);
    let pings = sd_notify::watchdog_enabled().map(|period| {
        // Twice per period, as sd_watchdog_enabled(3) recommends, so one
        // late tick never trips it.
        tokio::spawn(async move {
            let mut every = tokio::time::interval(period / 2);
            loop {
                every.tick().await;
                notify(&[NotifyState::Watchdog]);
            }
        })
    });
    shutdown.await;
    notify(&[NotifyState::Stopping]);
    // Shutdown may take a while (final commit, in-flight sends); the pings
    // go on until the process exits, which ends the task.
    drop(pings);
}

fn notify(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}
