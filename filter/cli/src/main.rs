//! `autohttps-policy`: check a policy, test it on the shipped filter `.wasm` in wasmtime, and
//! explain what the edge does with a URL, for a hosting platform's CI.
//!
//! Exit codes: 0 success, 1 a problem found (an invalid policy, a failing case), 2 the command
//! could not do its job (bad arguments, unreadable or invalid input, an unusable `.wasm`).

mod cases;
mod check;
mod explain;
mod input;
mod junit;
mod run;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Check, test and explain an autohttps policy.
#[derive(Debug, Parser)]
#[command(name = "autohttps-policy", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate a policy document (or a plugin configuration `{"policy": …}`) with the
    /// filter's own rules; print every problem with its JSON path. Exit 0 valid, 1 invalid.
    Check {
        /// The policy JSON file.
        file: PathBuf,
    },
    /// Run a table of cases (YAML or JSON) on the filter `.wasm` in wasmtime with this policy.
    /// Exit 0 all pass, 1 a case failed, 2 bad input.
    Test {
        /// The policy JSON file (a document or a plugin configuration).
        file: PathBuf,
        /// The cases file (`.yaml`/`.yml` is read as YAML, anything else as JSON).
        cases: PathBuf,
        /// The filter to run. Default: `autohttps_filter.wasm` beside this binary, else the
        /// release build `dist/autohttps_filter.wasm` (what `make build` ships) of the cargo
        /// target directory this binary was built into, else the one under `./target`.
        #[arg(long)]
        wasm: Option<PathBuf>,
        /// Also write a JUnit XML report here.
        #[arg(long)]
        junit: Option<PathBuf>,
    },
    /// Print what the edge does with a request, and why (which site, which rule).
    Explain {
        /// The policy JSON file (a document or a plugin configuration).
        file: PathBuf,
        /// The request URL, e.g. `http://shop.example/a?b=1` (scheme optional).
        url: String,
        /// The connection is TLS (also implied by an `https://` URL).
        #[arg(long)]
        https: bool,
        /// The request method.
        #[arg(long, default_value = "GET")]
        method: String,
        /// A request header `NAME:VALUE` (repeatable), e.g. `X-Forwarded-Proto:https`.
        #[arg(long = "header", value_name = "NAME:VALUE")]
        headers: Vec<String>,
        /// The peer's address (for `settings.trusted_proxies`); none by default.
        #[arg(long)]
        peer: Option<String>,
    },
}

/// Why the command stopped short of a verdict: exit code 2.
#[derive(Debug)]
struct UsageError(anyhow::Error);

impl<E: Into<anyhow::Error>> From<E> for UsageError {
    fn from(error: E) -> Self {
        UsageError(error.into())
    }
}

/// What a subcommand found: all good, or problems (exit 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Pass,
    Fail,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check { file } => check::run(&file),
        Command::Test {
            file,
            cases,
            wasm,
            junit,
        } => run::run(&file, &cases, wasm.as_deref(), junit.as_deref()),
        Command::Explain {
            file,
            url,
            https,
            method,
            headers,
            peer,
        } => explain::run(&file, &url, https, &method, &headers, peer.as_deref()),
    };
    match result {
        Ok(Verdict::Pass) => ExitCode::SUCCESS,
        Ok(Verdict::Fail) => ExitCode::from(1),
        Err(UsageError(error)) => {
            eprintln!("autohttps-policy: {error:#}");
            ExitCode::from(2)
        }
    }
}
