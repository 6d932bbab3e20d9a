//! The `autohttps` binary: `serve` runs the sidecar; the other subcommands talk to its admin API
//! (exit codes: `autohttps --help`, or [`autohttps_sidecar::cli::EXIT_CODES`]).

use std::io::IsTerminal as _;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use autohttps_sidecar::cli::{self, ApiCommand, Cli, CliError, Command, StoreCommand};
use autohttps_sidecar::clock::SystemClock;
use autohttps_sidecar::config::{Config, LogFormat};
use autohttps_sidecar::service::Sidecar;
use clap::FromArgMatches as _;

fn main() -> ExitCode {
    let cli = match cli::command()
        .try_get_matches()
        .and_then(|matches| Cli::from_arg_matches(&matches))
    {
        Ok(cli) => cli,
        Err(error) => return usage_error(&error),
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("autohttps: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match &cli.command {
        Command::Serve { log_format } => match runtime.block_on(serve(&cli, *log_format)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(failure) => {
                failure.print(false);
                ExitCode::from(failure.exit_code())
            }
        },
        Command::Store(StoreCommand::Copy { from, to, force }) => {
            match autohttps_sidecar::store::copy_store(from, to, *force) {
                Ok(report) => {
                    for (table, rows) in &report.rows {
                        println!("{table}: {rows} row(s) copied");
                    }
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    let failure = CliError::from(error);
                    failure.print(cli.json);
                    ExitCode::from(failure.exit_code())
                }
            }
        }
        Command::Completions { shell } => {
            cli::print_completions(*shell);
            ExitCode::SUCCESS
        }
        Command::Man => match cli::print_man_page() {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("autohttps: cannot write the man page: {error}");
                ExitCode::FAILURE
            }
        },
        Command::Api(ApiCommand::Openapi) => {
            print!("{}", autohttps_sidecar::admin_api::openapi_json());
            ExitCode::SUCCESS
        }
        _ => match runtime.block_on(cli::run(&cli)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(failure) => {
                failure.print(cli.json);
                ExitCode::from(failure.exit_code())
            }
        },
    }
}

/// A command line clap refused (or `--help`/`--version`): clap prints it, except that with
/// `--json` the refusal is JSON on stdout like every other failure.
fn usage_error(error: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    let informational = matches!(
        error.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    );
    if !informational && std::env::args().any(|arg| arg == "--json") {
        let failure = CliError::Usage(error.render().to_string().trim_end().to_owned());
        failure.print(true);
        return ExitCode::from(failure.exit_code());
    }
    let _ = error.print();
    ExitCode::from(u8::try_from(error.exit_code()).unwrap_or(2))
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().with_current_span(false).init(),
    }
}

async fn serve(cli: &Cli, log_format: Option<LogFormat>) -> Result<(), CliError> {
    let config = Config::load(cli.config.as_deref())?;
    init_logging(log_format.unwrap_or(config.log.format));
    let failed = |error: anyhow::Error| CliError::Server(cli::chain_once(error.as_ref()));
    let sidecar = Sidecar::build(config, Arc::new(SystemClock))
        .context("starting")
        .map_err(failed)?;
    let mut running = sidecar
        .serve(axum::Router::new())
        .await
        .context("starting")
        .map_err(failed)?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")
        .map_err(failed)?;
    let outcome = tokio::select! {
        () = running.wait() => Err(CliError::Server("a listener stopped unexpectedly; see the log above".into())),
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = terminate.recv() => Ok(()),
    };
    tracing::info!("stopping");
    running.shutdown().await;
    outcome
}
