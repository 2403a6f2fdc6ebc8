//! The interop matrix's RMQTT broker: a trimmed `rmqttd` built from the RMQTT 0.24 library crates.
//!
//! The crates.io `rmqttd` binary links every plugin (kafka, pulsar, nats, grpc, raft, ...) and
//! needs protoc, cmake and librdkafka, taking over ten minutes to build on a small machine. This
//! build keeps what a plain broker needs: TCP and TLS listeners from the config, anonymous access,
//! in-memory sessions, and the `rmqtt-retainer` plugin with RAM storage. No ACL plugin (without an
//! ACL hook every publish and subscribe is allowed) and no gRPC server (`[rpc]` is ignored).
//! Adapted from `rmqttd-0.24.0/src/server.rs`; run as `rmqttd -f rmqtt.toml`.

use anyhow::anyhow;
use clap::Parser;
use rmqtt::args::CommandArgs;
use rmqtt::context::ServerContext;
use rmqtt::net::{tls_provider, Builder};
use rmqtt::node::Node;
use rmqtt::server::MqttServer;
use rmqtt::Result;
use rmqtt_conf::{listener::Listener, logging::Log, Options, Settings};
use tokio::signal::unix::{signal, SignalKind};

const RETAINER: &str = "rmqtt-retainer";

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        log::error!("{e}");
        eprintln!("rmqttd: {e}");
        std::process::exit(1);
    }
}

async fn run() -> Result<()> {
    if Options::parse().version {
        println!("{} rustc/{}", Node::version(), Node::rustc_version());
        return Ok(());
    }
    let conf = Settings::init(Options::parse())?;
    tls_provider::default_provider()
        .install_default()
        .map_err(|_| anyhow!("a rustls crypto provider is already installed"))?;
    logger_init(&conf.log);

    let busy = &conf.node.busy;
    let node = Node::new(conf.node.id, busy.loadavg, busy.cpuloadavg, busy.update_interval);
    log::info!("Starting rmqtt (version={}, rustc={})", Node::version(), Node::rustc_version());

    let opts = &conf.opts;
    let scx = ServerContext::new()
        .args(CommandArgs {
            node_id: opts.node_id,
            plugins_default_startups: opts.plugins_default_startups.clone(),
            node_grpc_addrs: opts.node_grpc_addrs.clone(),
            raft_peer_addrs: opts.raft_peer_addrs.clone(),
            raft_leader_id: opts.raft_leader_id,
        })
        .node(node)
        .task_exec_workers(conf.task.exec_workers)
        .task_exec_queue_max(conf.task.exec_queue_max)
        .busy_check_enable(busy.check_enable)
        .busy_handshaking_limit(busy.handshaking)
        .mqtt_max_sessions(conf.mqtt.max_sessions)
        .plugins_config_dir(conf.plugins.dir.as_str())
        .build()
        .await;

    // The only plugin: started when listed in `plugins.default_startups`.
    let plugins = &conf.plugins;
    let startup = plugins.default_startups.iter().any(|n| n == RETAINER)
        && !plugins.disabled_default_startups.iter().any(|n| n == RETAINER);
    rmqtt_retainer::register_named(&scx, RETAINER, startup, false).await?;

    let mut server = MqttServer::new(scx);
    for cfg in conf.listeners.tcps.values() {
        let l = builder(cfg).bind().map_err(|e| anyhow!("bind TCP listener {}: {e}", cfg.addr))?;
        server = server.listener(l.tcp()?);
    }
    for cfg in conf.listeners.tlss.values() {
        let l = builder(cfg).bind().map_err(|e| anyhow!("bind TLS listener {}: {e}", cfg.addr))?;
        server = server.listener(l.tls()?);
    }
    server.build().start();

    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    log::info!("Shutting down");
    std::process::exit(0);
}

/// Console-only logger honouring `log.to = "off"` and `log.level`.
fn logger_init(cfg: &Log) {
    struct Stderr;
    impl log::Log for Stderr {
        fn enabled(&self, _: &log::Metadata) -> bool {
            true
        }
        fn log(&self, r: &log::Record) {
            eprintln!("{} {}: {}", r.level(), r.target(), r.args());
        }
        fn flush(&self) {}
    }
    if !cfg.to.off() && log::set_logger(&Stderr).is_ok() {
        log::set_max_level(cfg.level.as_str().parse().unwrap_or(log::LevelFilter::Info));
    }
}

fn builder(cfg: &Listener) -> Builder {
    Builder::new()
        .name(cfg.name.as_str())
        .laddr(cfg.addr)
        .max_connections(cfg.max_connections)
        .max_handshaking_limit(cfg.max_handshaking_limit)
        .max_packet_size(cfg.max_packet_size.as_u32())
        .backlog(cfg.backlog)
        .nodelay(cfg.nodelay)
        .reuseaddr(cfg.reuseaddr)
        .reuseport(cfg.reuseport)
        .tcp_keepalive(cfg.tcp_keepalive)
        .allow_anonymous(cfg.allow_anonymous)
        .min_keepalive(cfg.min_keepalive)
        .max_keepalive(cfg.max_keepalive)
        .allow_zero_keepalive(cfg.allow_zero_keepalive)
        .keepalive_backoff(cfg.keepalive_backoff)
        .max_inflight(cfg.max_inflight)
        .handshake_timeout(cfg.handshake_timeout)
        .max_mqueue_len(cfg.max_mqueue_len)
        .mqueue_rate_limit(cfg.mqueue_rate_limit.0, cfg.mqueue_rate_limit.1)
        .max_clientid_len(cfg.max_clientid_len)
        .max_qos_allowed(cfg.max_qos_allowed)
        .max_topic_levels(cfg.max_topic_levels)
        .session_expiry_interval(cfg.session_expiry_interval)
        .max_session_expiry_interval(cfg.max_session_expiry_interval)
        .message_retry_interval(cfg.message_retry_interval)
        .message_expiry_interval(cfg.message_expiry_interval)
        .max_subscriptions(cfg.max_subscriptions)
        .max_topic_aliases(cfg.max_topic_aliases)
        .tls_cross_certificate(cfg.cross_certificate)
        .tls_cert(cfg.cert.clone())
        .tls_key(cfg.key.clone())
        .tls_client_ca_certs(cfg.client_ca_certs.clone())
        .limit_subscription(cfg.limit_subscription)
        .proxy_protocol(cfg.proxy_protocol)
        .proxy_protocol_timeout(cfg.proxy_protocol_timeout)
        .cert_cn_as_username(cfg.cert_cn_as_username)
        .cert_subject_dn_as_username(cfg.cert_subject_dn_as_username)
        .collect_cert_info(cfg.collect_cert_info)
        .idle_timeout(cfg.idle_timeout)
}
