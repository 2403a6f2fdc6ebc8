//! A real `mosquitto` broker process per test.
//!
//! [`Mosquitto`] owns one child process and one temp dir holding its config,
//! its log and (optionally) its persistence database. It listens on loopback
//! ephemeral ports only. Dropping it kills the child by pid and removes the
//! dir; it never touches any other mosquitto process (such as a system service).

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use tempfile::TempDir;

use crate::net;

/// How long a broker gets to start accepting connections.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts with fresh ports when the chosen one was taken in the meantime.
const PORT_ATTEMPTS: usize = 5;

/// What the broker should offer. `Default` is a plain, anonymous,
/// non-persistent broker with mosquitto's default packet size limit.
#[derive(Debug, Clone)]
pub struct MosquittoOptions {
    /// Accept clients without username/password (`allow_anonymous`).
    pub allow_anonymous: bool,
    /// Keep sessions and queued messages in the temp dir across [`Mosquitto::restart`].
    pub persistence: bool,
    /// Largest MQTT packet the broker accepts (`max_packet_size`); `None` keeps mosquitto's default.
    pub max_packet_size: Option<u32>,
    /// An extra TLS listener on its own ephemeral port.
    pub tls: Option<TlsListener>,
    /// When the persistence database is written (with `persistence` on).
    pub autosave: Autosave,
    /// Lines appended to the generated `mosquitto.conf` as they are, after
    /// the listeners: for example a bridge (`connection …`).
    pub extra_config: String,
}

impl Default for MosquittoOptions {
    fn default() -> Self {
        Self {
            allow_anonymous: true,
            persistence: false,
            max_packet_size: None,
            tls: None,
            autosave: Autosave::OnEveryChange,
            extra_config: String::new(),
        }
    }
}

/// When a persistent broker writes its database to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Autosave {
    /// After every change (`autosave_on_changes true`, `autosave_interval 1`):
    /// what tests that SIGKILL a broker and expect its queue back need.
    OnEveryChange,
    /// Mosquitto's own default, as users run it: every 1800 s and on a clean
    /// shutdown (no `autosave_*` lines at all).
    MosquittoDefault,
}

/// PEM files for the TLS listener (see [`crate::tls::TestPki`]).
#[derive(Debug, Clone)]
pub struct TlsListener {
    /// CA that signs client certificates (`cafile`).
    pub ca: PathBuf,
    /// Server certificate chain (`certfile`).
    pub cert: PathBuf,
    /// Server private key (`keyfile`).
    pub key: PathBuf,
    /// Require a client certificate signed by `ca` (mutual TLS).
    pub require_certificate: bool,
}

/// A running (or killed, until restarted) mosquitto process.
#[derive(Debug)]
pub struct Mosquitto {
    opts: MosquittoOptions,
    port: u16,
    tls_port: Option<u16>,
    child: Option<Child>,
    // Declared last so it is removed after the child is gone.
    dir: TempDir,
}

impl Mosquitto {
    /// Starts a broker on fresh ephemeral loopback ports and waits until every
    /// listener accepts connections.
    ///
    /// Fails with mosquitto's log when the binary is missing, the config is
    /// rejected, or the broker is not ready within 10 s.
    pub async fn start(opts: MosquittoOptions) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("ferry-mosquitto-").tempdir().context("create mosquitto temp dir")?;
        if opts.persistence {
            fs::create_dir(dir.path().join("data")).context("create persistence dir")?;
        }
        let mut broker = Self { port: 0, tls_port: None, child: None, dir, opts };
        let mut last_err = None;
        for _ in 0..PORT_ATTEMPTS {
            broker.port = net::free_port()?;
            broker.tls_port = match broker.opts.tls {
                Some(_) => Some(net::free_port()?),
                None => None,
            };
            match broker.spawn_and_wait().await {
                Ok(()) => return Ok(broker),
                Err(SpawnError::AddressInUse(e)) => last_err = Some(e),
                Err(SpawnError::Other(e)) => return Err(e),
            }
        }
        Err(last_err.expect("at least one attempt").context("no free port after retries"))
    }

    /// The plain MQTT listener's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The plain MQTT listener's address.
    pub fn addr(&self) -> SocketAddr {
        net::loopback(self.port)
    }

    /// `mqtt://127.0.0.1:PORT` for the plain listener.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// The TLS listener's port, if one was configured.
    pub fn tls_port(&self) -> Option<u16> {
        self.tls_port
    }

    /// `mqtts://127.0.0.1:PORT` for the TLS listener, if one was configured.
    pub fn tls_url(&self) -> Option<String> {
        self.tls_port.map(|p| format!("mqtts://127.0.0.1:{p}"))
    }

    /// The child's process id, or `None` after [`kill`](Self::kill).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The temp dir holding `mosquitto.conf`, `mosquitto.log` and `data/`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything mosquitto logged so far, across restarts; for failure messages.
    pub fn log(&self) -> String {
        fs::read(self.log_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_else(|e| format!("<no mosquitto log: {e}>"))
    }

    /// Kills the broker with SIGKILL (a crash: nothing is flushed) and reaps it.
    /// Does nothing if it is not running.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            // Child::kill sends SIGKILL to this child's pid only.
            child.kill().context("SIGKILL mosquitto")?;
            child.wait().context("reap mosquitto")?;
        }
        Ok(())
    }

    /// Stops the broker with SIGTERM, so it writes its persistence database,
    /// and waits for it to exit. Does nothing if it is not running.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            let pid = libc::pid_t::try_from(child.id()).context("pid out of range")?;
            // SAFETY: kill(2) with our own, not yet reaped child's pid.
            if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
                return Err(std::io::Error::last_os_error()).context("SIGTERM mosquitto");
            }
            child.wait().context("reap mosquitto")?;
        }
        Ok(())
    }

    /// Starts the broker again on the same ports with the same persistence
    /// dir, killing it first (SIGKILL) if it is still running.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill()?;
        // The port was ours a moment ago; a short retry covers a racing
        // ephemeral bind by someone else, which is all that can get in the way.
        let mut last_err = None;
        for _ in 0..PORT_ATTEMPTS {
            match self.spawn_and_wait().await {
                Ok(()) => return Ok(()),
                Err(SpawnError::AddressInUse(e)) => last_err = Some(e),
                Err(SpawnError::Other(e)) => return Err(e),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(last_err.expect("at least one attempt").context(format!("port {} stayed in use", self.port)))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("mosquitto.log")
    }

    async fn spawn_and_wait(&mut self) -> Result<(), SpawnError> {
        let conf = self.dir.path().join("mosquitto.conf");
        fs::write(&conf, self.config_text()).context("write mosquitto.conf")?;
        let log = OpenOptions::new().create(true).append(true).open(self.log_path()).context("open mosquitto.log")?;
        let bin = mosquitto_binary()?;
        // The log is appended across restarts: only a new "running" line counts.
        let runs_before = running_lines(&self.log());
        let log_path = self.log_path();
        // Logging goes to stderr (see config) so that errors mosquitto prints
        // before it reads `log_dest` land in the same file.
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&conf)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("dup log fd")?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        let child = self.child.insert(child);

        let mut exited = false;
        let mut ready = true;
        for port in std::iter::once(self.port).chain(self.tls_port) {
            ready &= net::wait_for_port(port, READY_TIMEOUT, || {
                exited = matches!(child.try_wait(), Ok(Some(_)));
                exited
            })
            .await;
            if !ready {
                break;
            }
        }
        // A listening port is not enough: mosquitto opens every listener
        // before it loads their certificates, so a TLS listener with a bad
        // certificate accepts for a moment before mosquitto exits. It logs
        // "running" only once all listeners are set up.
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        while ready && running_lines(&fs::read_to_string(&log_path).unwrap_or_default()) == runs_before {
            exited = matches!(child.try_wait(), Ok(Some(_)));
            if exited || tokio::time::Instant::now() >= deadline {
                ready = false;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if ready {
            return Ok(());
        }
        self.kill().map_err(SpawnError::Other)?;
        let log = self.log();
        let why = if exited { "mosquitto exited" } else { "mosquitto did not accept connections within 10 s" };
        let err = anyhow::anyhow!("{why} (ports {:?} {:?}); log:\n{log}", self.port, self.tls_port);
        if log.contains("Address already in use") {
            Err(SpawnError::AddressInUse(err))
        } else {
            Err(SpawnError::Other(err))
        }
    }

    fn config_text(&self) -> String {
        let o = &self.opts;
        let dir = self.dir.path();
        let mut c = String::from("# Written by ferry-harness; one broker per test.\n");
        c.push_str("per_listener_settings false\n");
        let _ = writeln!(c, "allow_anonymous {}", o.allow_anonymous);
        // As root, mosquitto drops to user `mosquitto`, which could not write
        // the persistence db into our root-owned 0700 temp dir.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            c.push_str("user root\n");
        }
        c.push_str("log_dest stderr\n");
        for t in ["error", "warning", "notice", "information"] {
            let _ = writeln!(c, "log_type {t}");
        }
        c.push_str("connection_messages true\nlog_timestamp true\n");
        c.push_str("log_timestamp_format %Y-%m-%dT%H:%M:%S\n");
        // Mosquitto drops QoS 1 messages beyond 1000 queued for an offline
        // client; a test broker must never lose messages to its own limits.
        c.push_str("max_queued_messages 0\n");
        if let Some(n) = o.max_packet_size {
            let _ = writeln!(c, "max_packet_size {n}");
        }
        if o.persistence {
            c.push_str("persistence true\n");
            let _ = writeln!(c, "persistence_location {}/", dir.join("data").display());
            if o.autosave == Autosave::OnEveryChange {
                // Save after every change: mosquitto otherwise only writes its
                // db every 30 min or on clean shutdown, and tests SIGKILL it.
                c.push_str("autosave_on_changes true\nautosave_interval 1\n");
            }
        } else {
            c.push_str("persistence false\n");
        }
        let _ = writeln!(c, "listener {} 127.0.0.1", self.port);
        if let (Some(tls), Some(port)) = (&o.tls, self.tls_port) {
            let _ = writeln!(c, "listener {port} 127.0.0.1");
            let _ = writeln!(c, "cafile {}", tls.ca.display());
            let _ = writeln!(c, "certfile {}", tls.cert.display());
            let _ = writeln!(c, "keyfile {}", tls.key.display());
            let _ = writeln!(c, "require_certificate {}", tls.require_certificate);
        }
        if !o.extra_config.is_empty() {
            c.push_str(&o.extra_config);
            c.push('\n');
        }
        c
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

enum SpawnError {
    /// The chosen port was taken between choosing and binding; retryable.
    AddressInUse(anyhow::Error),
    Other(anyhow::Error),
}

impl From<anyhow::Error> for SpawnError {
    fn from(e: anyhow::Error) -> Self {
        Self::Other(e)
    }
}

/// How many times the log says mosquitto finished starting ("mosquitto version X running").
fn running_lines(log: &str) -> usize {
    log.lines().filter(|l| l.contains("mosquitto version") && l.ends_with(" running")).count()
}

/// Finds the mosquitto binary: `$FERRY_MOSQUITTO`, then `PATH`, then the
/// sbin dirs Debian installs it to (often not on a normal user's `PATH`).
fn mosquitto_binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("FERRY_MOSQUITTO") {
        return Ok(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let sbin = ["/usr/sbin", "/usr/local/sbin"].map(PathBuf::from);
    std::env::split_paths(&path)
        .chain(sbin)
        .map(|d| d.join("mosquitto"))
        .find(|p| File::open(p).is_ok())
        .context("mosquitto not found; run scripts/install-test-deps.sh")
}
