//! Every MQTT broker implementation the interop matrix runs against, behind
//! one interface: [`Broker`] starts any [`Implementation`] on ephemeral
//! loopback ports, kills it (SIGKILL) and restarts it on the same ports with
//! the same data dir. [`kill_mid_window`] crashes any [`Restart`] broker
//! with a sender's in-flight window unanswered.
//!
//! Mosquitto and rumqttd are [`Mosquitto`] and [`InProcessBroker`]. The
//! others run as child processes from what `scripts/install-test-deps.sh`
//! installs: NATS Server's MQTT listener and RabbitMQ's MQTT plugin from
//! Debian, aedes from npm (run by `brokers/aedes.js`), amqtt from PyPI and
//! RMQTT from crates.io, the last three under `$FERRY_TOOLS` (default
//! `~/.cache/ferry-tools`). Every process started here is stopped by its pid;
//! RabbitMQ gets an `epmd` of its own on an ephemeral port, so nothing is
//! left behind and the machine's port 4369 is never touched.

use std::fmt::Write as _;
use std::fs::{self, OpenOptions};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use tempfile::TempDir;

use crate::mqtt::{self, Collector, Protocol};
use crate::{FaultProxy, InProcessBroker, Mosquitto, MosquittoOptions, TlsListener, net};

/// Attempts with fresh ports when a chosen one was taken in the meantime.
const PORT_ATTEMPTS: usize = 5;

/// One MQTT broker implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Implementation {
    /// Eclipse Mosquitto 2.0 (Debian `mosquitto`).
    Mosquitto,
    /// rumqttd 0.20, in the test process.
    Rumqttd,
    /// NATS Server 2.9's MQTT listener (Debian `nats-server`), on JetStream.
    Nats,
    /// RabbitMQ 3.10's MQTT plugin (Debian `rabbitmq-server`).
    RabbitMq,
    /// aedes (npm), on Node.js.
    Aedes,
    /// amqtt (PyPI).
    Amqtt,
    /// RMQTT (crates.io `rmqttd`).
    Rmqtt,
}

impl Implementation {
    /// Every implementation, in the order the docs list them.
    pub const ALL: [Self; 7] =
        [Self::Mosquitto, Self::Rumqttd, Self::Nats, Self::RabbitMq, Self::Aedes, Self::Amqtt, Self::Rmqtt];

    /// Its name in test output and docs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Mosquitto => "mosquitto",
            Self::Rumqttd => "rumqttd",
            Self::Nats => "nats",
            Self::RabbitMq => "rabbitmq",
            Self::Aedes => "aedes",
            Self::Amqtt => "amqtt",
            Self::Rmqtt => "rmqtt",
        }
    }

    /// The MQTT versions it speaks.
    pub fn protocols(self) -> &'static [Protocol] {
        match self {
            Self::Mosquitto | Self::Rumqttd | Self::Rmqtt => &[Protocol::V311, Protocol::V5],
            Self::Nats | Self::RabbitMq | Self::Aedes | Self::Amqtt => &[Protocol::V311],
        }
    }

    /// Whether it serves MQTT over TLS (rumqttd is built here without TLS).
    pub fn tls(self) -> bool {
        self != Self::Rumqttd
    }

    /// Whether it has a limit on a message's size that a test can set
    /// ([`BrokerOptions::max_message_size`]). NATS Server 2.9 does not apply
    /// `max_payload` to MQTT publishes and amqtt 0.12 has no limit at all;
    /// rumqttd's is fixed at 1 MiB here, above the agent's largest event.
    pub fn limits_messages(self) -> bool {
        !matches!(self, Self::Nats | Self::Amqtt | Self::Rumqttd)
    }

    /// Whether asking for TLS makes its one MQTT listener a TLS listener:
    /// NATS serves MQTT plain or over TLS, not both.
    fn tls_replaces_plain(self) -> bool {
        self == Self::Nats
    }

    /// How long a start may take: RabbitMQ boots Erlang and waits for its
    /// MQTT plugin's Raft state (9–12 s on an idle 2-core machine).
    fn ready_timeout(self) -> Duration {
        match self {
            Self::RabbitMq => Duration::from_secs(120),
            _ => Duration::from_secs(30),
        }
    }
}

/// What a [`Broker`] should offer besides a plain anonymous listener.
#[derive(Debug, Clone, Default)]
pub struct BrokerOptions {
    /// A TLS listener with these files (for NATS, instead of the plain one).
    pub tls: Option<TlsListener>,
    /// The broker's own limit on a message, where it has one to set (see
    /// [`Implementation::limits_messages`]): the packet size for Mosquitto,
    /// RMQTT and aedes (checked by `brokers/aedes.js`), the payload size for
    /// RabbitMQ (`max_message_size`).
    pub max_message_size: Option<u32>,
}

/// A running broker of any [`Implementation`]. Dropping it stops it.
#[derive(Debug)]
pub struct Broker {
    implementation: Implementation,
    inner: Inner,
}

#[derive(Debug)]
enum Inner {
    Mosquitto(Mosquitto),
    Rumqttd(InProcessBroker),
    Process(Server),
}

impl Broker {
    /// Starts `implementation` with `opts` and waits until every listener accepts.
    pub async fn start(implementation: Implementation, opts: BrokerOptions) -> anyhow::Result<Self> {
        let inner = match implementation {
            Implementation::Mosquitto => Inner::Mosquitto(
                Mosquitto::start(MosquittoOptions {
                    persistence: true,
                    max_packet_size: opts.max_message_size,
                    tls: opts.tls,
                    ..MosquittoOptions::default()
                })
                .await?,
            ),
            Implementation::Rumqttd => {
                if opts.tls.is_some() {
                    bail!("rumqttd is built without TLS here");
                }
                Inner::Rumqttd(InProcessBroker::start().await?)
            }
            _ => Inner::Process(Server::start(implementation, opts).await?),
        };
        Ok(Self { implementation, inner })
    }

    /// Which implementation this is.
    pub fn implementation(&self) -> Implementation {
        self.implementation
    }

    /// The plain listener's address for `protocol`.
    pub fn addr(&self, protocol: Protocol) -> SocketAddr {
        match &self.inner {
            Inner::Mosquitto(m) => m.addr(),
            Inner::Rumqttd(r) => r.addr(protocol),
            Inner::Process(s) => net::loopback(s.plain_port.expect("a plain listener")),
        }
    }

    /// `mqtt://127.0.0.1:PORT` of the plain listener for `protocol`.
    pub fn url(&self, protocol: Protocol) -> String {
        format!("mqtt://{}", self.addr(protocol))
    }

    /// `mqtts://127.0.0.1:PORT` of the TLS listener, if one was asked for.
    pub fn tls_url(&self) -> Option<String> {
        match &self.inner {
            Inner::Mosquitto(m) => m.tls_url(),
            Inner::Rumqttd(_) => None,
            Inner::Process(s) => s.tls_port.map(|p| format!("mqtts://127.0.0.1:{p}")),
        }
    }

    /// Kills the broker (SIGKILL: a crash) and reaps it.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        match &mut self.inner {
            Inner::Mosquitto(m) => m.kill(),
            Inner::Rumqttd(r) => {
                r.stop();
                Ok(())
            }
            Inner::Process(s) => s.kill(),
        }
    }

    /// Starts the broker again on the same ports with the same data dir,
    /// killing it first if it still runs. An in-memory broker comes back empty.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        match &mut self.inner {
            Inner::Mosquitto(m) => m.restart().await,
            Inner::Rumqttd(r) => r.restart().await,
            Inner::Process(s) => s.restart().await,
        }
    }

    /// What the broker logged so far, for failure messages.
    pub fn log(&self) -> String {
        match &self.inner {
            Inner::Mosquitto(m) => m.log(),
            Inner::Rumqttd(_) => "<rumqttd logs nothing here>".to_owned(),
            Inner::Process(s) => s.log(),
        }
    }
}

/// A broker a test can crash and bring back on the same ports.
pub trait Restart {
    /// Kills it (SIGKILL: a crash) and reaps it.
    fn kill(&mut self) -> anyhow::Result<()>;
    /// Starts it again on the same ports with the same data dir.
    fn restart(&mut self) -> impl Future<Output = anyhow::Result<()>>;
}

impl Restart for Broker {
    fn kill(&mut self) -> anyhow::Result<()> {
        Broker::kill(self)
    }
    async fn restart(&mut self) -> anyhow::Result<()> {
        Broker::restart(self).await
    }
}

impl Restart for Mosquitto {
    fn kill(&mut self) -> anyhow::Result<()> {
        Mosquitto::kill(self)
    }
    async fn restart(&mut self) -> anyhow::Result<()> {
        Mosquitto::restart(self).await
    }
}

/// SIGKILLs `broker` while a sender has publishes in flight through `proxy`,
/// restarts it, and returns once `collector` is subscribed again (a probe on
/// `probe_topic` through `probe_url` arrived); the proxy is left cut.
///
/// A broker that acknowledged a publish owns it: killed, it may lose what it
/// had queued for the collector, and no sender can resend that. So the
/// broker's acknowledgements are held back while it drains to the
/// collector; the sender's in-flight window fills with publishes the broker
/// received but never answered, which the sender must resend.
pub async fn kill_mid_window(
    broker: &mut impl Restart,
    proxy: &FaultProxy,
    collector: &Collector,
    probe_url: &str,
    probe_topic: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let start = tokio::time::Instant::now();
    proxy.handle().hold_replies();
    let mut seen = collector.len();
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = collector.len();
        if now == seen {
            break;
        }
        seen = now;
        if start.elapsed() > timeout {
            bail!("the broker never drained to the collector");
        }
    }
    broker.kill()?;
    proxy.handle().cut();
    broker.restart().await?;
    // The collector's own reconnect resubscribes; a probe proves it is live.
    loop {
        let _ = mqtt::publish_v311(probe_url, probe_topic, b"probe".to_vec(), Duration::from_secs(2)).await;
        if collector.messages().iter().any(|m| m.topic == probe_topic) {
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!("the collector did not resubscribe");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A broker run as child processes from files in its own temp dir.
#[derive(Debug)]
struct Server {
    implementation: Implementation,
    opts: BrokerOptions,
    plain_port: Option<u16>,
    tls_port: Option<u16>,
    /// Ports the broker needs besides MQTT (NATS's client port, RMQTT's
    /// cluster RPC, RabbitMQ's AMQP, distribution and epmd ports).
    aux_ports: Vec<u16>,
    /// In start order; killed in reverse.
    children: Vec<Child>,
    // Declared last so it is removed after the children are gone.
    dir: TempDir,
}

impl Server {
    async fn start(implementation: Implementation, opts: BrokerOptions) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("ferry-{}-", implementation.name()))
            .tempdir()
            .context("create broker temp dir")?;
        let mut server = Self {
            implementation,
            opts,
            plain_port: None,
            tls_port: None,
            aux_ports: Vec::new(),
            children: Vec::new(),
            dir,
        };
        let aux = match implementation {
            Implementation::Nats | Implementation::Rmqtt => 1,
            Implementation::RabbitMq => 3,
            _ => 0,
        };
        let mut last_err = None;
        for _ in 0..PORT_ATTEMPTS {
            let tls = server.opts.tls.is_some();
            server.plain_port = match tls && implementation.tls_replaces_plain() {
                true => None,
                false => Some(net::free_port()?),
            };
            server.tls_port = if tls { Some(net::free_port()?) } else { None };
            server.aux_ports = (0..aux).map(|_| net::free_port()).collect::<Result<_, _>>()?;
            let mut all: Vec<u16> = server.ports().chain(server.aux_ports.iter().copied()).collect();
            all.sort_unstable();
            all.dedup();
            if all.len() != server.ports().count() + aux {
                continue;
            }
            match server.spawn_and_wait().await {
                Ok(()) => return Ok(server),
                Err(e) if server.log().contains("in use") || server.log().contains("eaddrinuse") => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_err
            .unwrap_or_else(|| anyhow::anyhow!("no distinct free ports"))
            .context("no free ports after retries"))
    }

    /// The MQTT listeners' ports.
    fn ports(&self) -> impl Iterator<Item = u16> + use<> {
        self.plain_port.into_iter().chain(self.tls_port)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("broker.log")
    }

    fn log(&self) -> String {
        fs::read(self.log_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_else(|e| format!("<no broker log: {e}>"))
    }

    fn kill(&mut self) -> anyhow::Result<()> {
        while let Some(mut child) = self.children.pop() {
            // Child::kill sends SIGKILL to this child's pid only.
            child.kill().with_context(|| format!("SIGKILL {}", self.implementation.name()))?;
            child.wait().context("reap broker")?;
        }
        Ok(())
    }

    async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill()?;
        let mut last_err = None;
        for _ in 0..PORT_ATTEMPTS {
            match self.spawn_and_wait().await {
                Ok(()) => return Ok(()),
                Err(e) => last_err = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Err(last_err.expect("at least one attempt"))
    }

    /// Spawns `cmd` with its output appended to the broker log.
    fn spawn(&mut self, mut cmd: Command) -> anyhow::Result<()> {
        let log = OpenOptions::new().create(true).append(true).open(self.log_path()).context("open broker log")?;
        let child = cmd
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("dup log fd")?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn {cmd:?}; run scripts/install-test-deps.sh"))?;
        self.children.push(child);
        Ok(())
    }

    /// Waits until `port` accepts, or fails when the newest child exits first.
    async fn wait(&mut self, port: u16) -> anyhow::Result<()> {
        let timeout = self.implementation.ready_timeout();
        let child = self.children.last_mut().expect("a child was spawned");
        let mut exited = None;
        let ready = net::wait_for_port(port, timeout, || {
            exited = child.try_wait().ok().flatten();
            exited.is_some()
        })
        .await;
        if ready {
            return Ok(());
        }
        let why = match exited {
            Some(status) => format!("exited ({status})"),
            None => format!("did not listen on {port} within {timeout:?}"),
        };
        let _ = self.kill();
        bail!("{} {why}; log:\n{}", self.implementation.name(), self.log())
    }

    async fn spawn_and_wait(&mut self) -> anyhow::Result<()> {
        let dir = self.dir.path().to_owned();
        match self.implementation {
            Implementation::Nats => {
                fs::write(dir.join("nats.conf"), self.nats_config()).context("write nats.conf")?;
                let mut cmd = Command::new("/usr/sbin/nats-server");
                cmd.arg("-c").arg(dir.join("nats.conf"));
                self.spawn(cmd)?;
            }
            Implementation::RabbitMq => {
                let [epmd, ..] = self.aux_ports[..] else { unreachable!("three aux ports") };
                let mut cmd = Command::new("/usr/bin/epmd");
                cmd.args(["-address", "127.0.0.1", "-port", &epmd.to_string()]);
                self.spawn(cmd)?;
                // Without a listening epmd RabbitMQ starts a daemon of its own,
                // which would outlive the test.
                self.wait(epmd).await?;
                let cmd = self.rabbitmq_command()?;
                self.spawn(cmd)?;
            }
            Implementation::Aedes => {
                let mut cmd = Command::new("node");
                cmd.arg(crate_dir().join("brokers/aedes.js"));
                cmd.env("NODE_PATH", tools_dir().join("aedes/node_modules"));
                cmd.env("AEDES_PORT", self.plain_port.map(|p| p.to_string()).unwrap_or_default());
                if let (Some(tls), Some(port)) = (&self.opts.tls, self.tls_port) {
                    cmd.env("AEDES_TLS_PORT", port.to_string())
                        .env("AEDES_CA", &tls.ca)
                        .env("AEDES_CERT", &tls.cert)
                        .env("AEDES_KEY", &tls.key)
                        .env("AEDES_REQUIRE_CLIENT_CERT", if tls.require_certificate { "1" } else { "0" });
                }
                if let Some(n) = self.opts.max_message_size {
                    cmd.env("AEDES_MAX_PACKET_SIZE", n.to_string());
                }
                self.spawn(cmd)?;
            }
            Implementation::Amqtt => {
                fs::write(dir.join("amqtt.yaml"), self.amqtt_config()).context("write amqtt.yaml")?;
                let mut cmd = Command::new(tools_dir().join("amqtt/bin/amqtt"));
                cmd.arg("-c").arg(dir.join("amqtt.yaml"));
                self.spawn(cmd)?;
            }
            Implementation::Rmqtt => {
                fs::create_dir_all(dir.join("plugins")).context("create rmqtt plugins dir")?;
                fs::write(dir.join("plugins/rmqtt-retainer.toml"), "max_retained_messages = 0\n")
                    .context("write rmqtt-retainer.toml")?;
                fs::write(dir.join("rmqtt.toml"), self.rmqtt_config()).context("write rmqtt.toml")?;
                let mut cmd = Command::new(tools_dir().join("rmqtt/bin/rmqttd"));
                cmd.arg("-f").arg(dir.join("rmqtt.toml"));
                self.spawn(cmd)?;
            }
            Implementation::Mosquitto | Implementation::Rumqttd => unreachable!("not a child process here"),
        }
        for port in self.ports().collect::<Vec<_>>() {
            self.wait(port).await?;
        }
        Ok(())
    }

    fn nats_config(&self) -> String {
        let dir = self.dir.path();
        let mut c = String::from("# Written by ferry-harness.\n");
        let _ = writeln!(c, "listen: 127.0.0.1:{}", self.aux_ports[0]);
        c.push_str("server_name: ferry-test\n");
        let _ = writeln!(c, "jetstream {{ store_dir: {:?} }}", dir.join("js").display().to_string());
        c.push_str("mqtt {\n");
        match (&self.opts.tls, self.tls_port) {
            (Some(tls), Some(port)) => {
                let _ = writeln!(c, "  listen: 127.0.0.1:{port}");
                let _ = writeln!(
                    c,
                    "  tls {{ cert_file: {:?}, key_file: {:?}, ca_file: {:?}, verify: {} }}",
                    tls.cert.display().to_string(),
                    tls.key.display().to_string(),
                    tls.ca.display().to_string(),
                    tls.require_certificate
                );
            }
            _ => {
                let _ = writeln!(c, "  listen: 127.0.0.1:{}", self.plain_port.expect("a plain port"));
            }
        }
        c.push_str("}\n");
        c
    }

    fn rabbitmq_command(&self) -> anyhow::Result<Command> {
        let dir = self.dir.path();
        let [epmd, amqp, dist] = self.aux_ports[..] else { unreachable!("three aux ports") };
        let mqtt = self.plain_port.expect("a plain port");
        for sub in ["mnesia", "log", "home"] {
            fs::create_dir_all(dir.join(sub)).with_context(|| format!("create rabbitmq {sub} dir"))?;
        }
        fs::write(dir.join("enabled_plugins"), "[rabbitmq_mqtt].\n").context("write enabled_plugins")?;
        fs::write(dir.join("rabbitmq-env.conf"), "").context("write rabbitmq-env.conf")?;
        let mut c = String::from("# Written by ferry-harness.\n");
        let _ = writeln!(c, "listeners.tcp.default = 127.0.0.1:{amqp}");
        let _ = writeln!(c, "mqtt.listeners.tcp.default = 127.0.0.1:{mqtt}");
        c.push_str("mqtt.allow_anonymous = true\nlog.console = false\nlog.file.level = info\n");
        if let (Some(tls), Some(port)) = (&self.opts.tls, self.tls_port) {
            let _ = writeln!(c, "mqtt.listeners.ssl.default = 127.0.0.1:{port}");
            let _ = writeln!(c, "ssl_options.cacertfile = {}", tls.ca.display());
            let _ = writeln!(c, "ssl_options.certfile = {}", tls.cert.display());
            let _ = writeln!(c, "ssl_options.keyfile = {}", tls.key.display());
            let verify = if tls.require_certificate { "verify_peer" } else { "verify_none" };
            let _ = writeln!(c, "ssl_options.verify = {verify}");
            let _ = writeln!(c, "ssl_options.fail_if_no_peer_cert = {}", tls.require_certificate);
        }
        if let Some(n) = self.opts.max_message_size {
            let _ = writeln!(c, "max_message_size = {n}");
        }
        fs::write(dir.join("rabbitmq.conf"), c).context("write rabbitmq.conf")?;
        let mut cmd = Command::new("/usr/lib/rabbitmq/bin/rabbitmq-server");
        cmd.env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("LANG", "C.UTF-8")
            .env("HOME", dir.join("home"))
            .env("ERL_EPMD_PORT", epmd.to_string())
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODENAME", format!("ferry-{mqtt}@localhost"))
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", amqp.to_string())
            .env("RABBITMQ_DIST_PORT", dist.to_string())
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"))
            .env("RABBITMQ_CONF_ENV_FILE", dir.join("rabbitmq-env.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            // The script then execs beam itself, so our pid is the broker's.
            .env("RABBITMQ_ALLOW_INPUT", "1")
            .env("RABBITMQ_SERVER_START_ARGS", "-noinput")
            .env("RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS", "-kernel inet_dist_use_interface {127,0,0,1}");
        Ok(cmd)
    }

    fn amqtt_config(&self) -> String {
        let mut c = String::from("# Written by ferry-harness.\nlisteners:\n");
        if let Some(port) = self.plain_port {
            let _ = writeln!(c, "  default:\n    type: tcp\n    bind: 127.0.0.1:{port}");
        }
        if let (Some(tls), Some(port)) = (&self.opts.tls, self.tls_port) {
            let _ = writeln!(c, "  tls:\n    type: tcp\n    bind: 127.0.0.1:{port}\n    ssl: true");
            let _ = writeln!(c, "    cafile: {}", tls.ca.display());
            let _ = writeln!(c, "    certfile: {}", tls.cert.display());
            let _ = writeln!(c, "    keyfile: {}", tls.key.display());
        }
        // BaseAuthPlugin with a config accepts every client. Its
        // AnonymousAuthPlugin marks clients anonymous, and amqtt 0.12 never
        // queues messages for an anonymous client's persistent session.
        c.push_str("plugins:\n  amqtt.plugins.base.BaseAuthPlugin: {}\n");
        c
    }

    fn rmqtt_config(&self) -> String {
        let dir = self.dir.path();
        let mut c = String::from("# Written by ferry-harness.\n[node]\nid = 1\n");
        let _ = writeln!(c, "[rpc]\nserver_addr = \"127.0.0.1:{}\"", self.aux_ports[0]);
        let _ = writeln!(
            c,
            "[plugins]\ndir = {:?}\ndefault_startups = [\"rmqtt-retainer\"]",
            format!("{}/", dir.join("plugins").display())
        );
        let limits = |c: &mut String| {
            c.push_str("allow_anonymous = true\nmax_mqueue_len = 1000000\nmax_inflight = 128\n");
            if let Some(n) = self.opts.max_message_size {
                let _ = writeln!(c, "max_packet_size = \"{n}B\"");
            }
        };
        if let Some(port) = self.plain_port {
            let _ = writeln!(c, "[listener.tcp.external]\naddr = \"127.0.0.1:{port}\"");
            limits(&mut c);
        }
        if let (Some(tls), Some(port)) = (&self.opts.tls, self.tls_port) {
            let _ = writeln!(c, "[listener.tls.external]\naddr = \"127.0.0.1:{port}\"");
            limits(&mut c);
            let _ =
                writeln!(c, "cert = {:?}\nkey = {:?}", tls.cert.display().to_string(), tls.key.display().to_string());
            if tls.require_certificate {
                let _ = writeln!(c, "cross_certificate = true\nclient_ca_certs = {:?}", tls.ca.display().to_string());
            }
        }
        c
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// Where `scripts/install-test-deps.sh` puts the brokers it installs.
fn tools_dir() -> PathBuf {
    match std::env::var_os("FERRY_TOOLS") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(&std::env::var_os("HOME").unwrap_or_default()).join(".cache/ferry-tools"),
    }
}

/// This crate's directory (for `brokers/aedes.js`).
fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}
