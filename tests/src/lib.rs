//! Shared helpers for Ferry's integration tests: running the real `ferry`
//! binary as a child process, and writing throwaway configs.
//!
//! Brokers, the fault proxy and MQTT collectors live in `ferry-harness`.
//!
//! - [`workload`]: numbered-event producers (MQTT and HTTP) with ledgers of
//!   what was acknowledged, cloud-side tallies, `/proc` readings; used by the
//!   comparison and soak benches and their short tests.
//! - [`powerloss`]: power-cut trials of the store on a fault-injecting backend.
//! - [`soak`]: the long run with a flapping cloud and agent restarts.

pub mod powerloss;
pub mod soak;
pub mod workload;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, bail};

/// Path of the agent binary to run in tests: `ferry-test-agent`, built by
/// cargo with this package's tests and calling the same `ferry::cli::main`
/// as the `ferry` executable. A macro so `env!` reads the variable cargo sets
/// for integration tests.
#[macro_export]
macro_rules! ferry_bin {
    () => {
        std::path::Path::new(env!("CARGO_BIN_EXE_ferry-test-agent"))
    };
}

/// A `ferry run` child process, started on a config whose API listens on
/// port 0; the real address is read from its log.
pub struct FerryProcess {
    child: Child,
    addr: SocketAddr,
    log: mpsc::Receiver<String>,
}

impl FerryProcess {
    /// Starts `<bin> run --config <config>` and waits until the API listens.
    pub fn start(bin: &Path, config: &Path) -> anyhow::Result<Self> {
        let mut child = Command::new(bin)
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning ferry")?;
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut seen = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(line) => {
                    if let Some(addr) = line.split("listening on ").nth(1) {
                        let addr = addr.split_whitespace().next().unwrap_or("").parse().context("parsing address")?;
                        return Ok(Self { child, addr, log: rx });
                    }
                    seen.push(line);
                }
                Err(_) => {
                    let _ = child.kill();
                    let status = child.wait()?;
                    bail!("ferry did not start ({status}); its log:\n{}", seen.join("\n"));
                }
            }
        }
    }

    /// Base URL of its HTTP API.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, then reap.
    pub fn kill(mut self) -> ExitStatus {
        let _ = self.child.kill();
        self.child.wait().expect("reaping ferry")
    }

    /// SIGTERM, then wait for a clean exit; returns the status and the log lines since start-up.
    pub fn terminate(mut self) -> (ExitStatus, Vec<String>) {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().expect("waiting for ferry");
        // The reader thread may still be forwarding the last lines (the
        // shutdown's) when the process is reaped, most often on a loaded
        // machine: read until it sees the pipe close.
        let mut lines = Vec::new();
        while let Ok(line) = self.log.recv_timeout(Duration::from_secs(10)) {
            lines.push(line);
        }
        (status, lines)
    }
}

impl Drop for FerryProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A config for a test agent in `dir`, listening on an ephemeral port, with
/// `extra` TOML appended to the `[store]` table.
pub fn write_config(dir: &Path, store_extra: &str) -> PathBuf {
    write_config_with(dir, store_extra, "")
}

/// Like [`write_config`], with `tail` (e.g. `[[destination]]` tables) appended.
pub fn write_config_with(dir: &Path, store_extra: &str, tail: &str) -> PathBuf {
    let path = dir.join("ferry.toml");
    let text = format!(
        "[agent]\ndevice_id = \"test-device\"\ndata_dir = {:?}\n\n[store]\n{store_extra}\n\n[ingest.http]\nlisten = \"127.0.0.1:0\"\n\n{tail}",
        dir.join("data").display().to_string()
    );
    std::fs::write(&path, text).expect("writing config");
    path
}

/// The repository root.
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is in the repository")
}

/// A component built by `scripts/build-plugins.sh`: `plugins/build/{name}.wasm`.
pub fn built_plugin(name: &str) -> PathBuf {
    let path = repo_root().join("plugins/build").join(format!("{name}.wasm"));
    assert!(path.is_file(), "{} is missing: run scripts/build-plugins.sh first", path.display());
    path
}
