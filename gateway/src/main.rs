use clap::Parser;
use tokio::sync::watch;
use tracing::info;

use mtproto_gateway::app::Gateway;
use mtproto_gateway::config::{Cli, Config, ConfigExt};
use mtproto_session::logging::{self, LogFormat};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(&cli) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("mtproto-gateway: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    let format = cli.log_format;
    logging::init(&config.log_level, format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads())
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            fatal(format, format_args!("cannot start the runtime: {e}"));
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            fatal(format, format_args!("{e:#}"));
            std::process::ExitCode::FAILURE
        }
    }
}

/// Reports why the gateway stops: on stderr as text, or as an `ERROR` log
/// line so a JSON log collector keeps it.
fn fatal(format: LogFormat, message: std::fmt::Arguments<'_>) {
    match format {
        LogFormat::Text => eprintln!("mtproto-gateway: {message}"),
        LogFormat::Json => tracing::error!("{message}"),
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let gateway = Gateway::build(&config).await?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        info!("shutting down");
        let _ = shutdown_tx.send(true);
    });
    gateway.serve(shutdown_rx).await
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
