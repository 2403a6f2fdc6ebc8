//! The `ferry` binary: parses arguments, sets up logging, and hands off to
//! the library. Everything testable lives in the library.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use ferry::cli::{self, Cli, Command, LogFormat};
use ferry::clock::SystemClock;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Run(args) => run(args),
        Command::Publish(args) => cli::publish(args),
        Command::Status(args) => cli::status(args),
        Command::Config(cmd) => cli::config_command(cmd),
        Command::Plugin(cmd) => {
            init_logging(LogFormat::Human);
            cli::plugin::run(cmd)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &cli::RunArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    let config = cli::load_config(args.config.as_ref())?;
    if args.config.is_none() {
        tracing::info!(
            "no --config given: running on the embedded default (data in {}, HTTP on {}); `ferry config default` prints it",
            config.agent.data_dir.display(),
            config.http.listen
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(ferry::runtime::run(config, Arc::new(SystemClock), shutdown_signal()))?;
    Ok(())
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
