//! The `autohttps` binary: `serve` runs the sidecar; the other subcommands talk to its admin API.

use std::sync::Arc;

use anyhow::Context as _;
use autohttps_sidecar::cli::{Cli, Command};
use autohttps_sidecar::clock::SystemClock;
use autohttps_sidecar::config::Config;
use autohttps_sidecar::service::Sidecar;
use clap::Parser as _;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve => serve(&cli).await,
        _ => autohttps_sidecar::cli::run(&cli)
            .await
            .map_err(anyhow::Error::from),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("autohttps: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(cli: &Cli) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let config = Config::load(cli.config.as_deref()).context("loading configuration")?;
    let sidecar = Sidecar::build(config, Arc::new(SystemClock)).context("starting")?;
    let mut running = sidecar.serve(axum::Router::new()).await?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let outcome = tokio::select! {
        () = running.wait() => Err(anyhow::anyhow!("a listener stopped unexpectedly")),
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = terminate.recv() => Ok(()),
    };
    tracing::info!("stopping");
    running.shutdown().await;
    outcome
}
