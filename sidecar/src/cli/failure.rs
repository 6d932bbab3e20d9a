//! What a CLI command can fail with, the exit code of each, and how a failure is printed: one
//! line on stderr, or `{"error": {"code", "message", "exit_code"}}` on stdout with `--json`.

use std::fmt::Write as _;

/// A failed CLI command. Each variant has its own exit code ([`EXIT_CODES`]) and a stable
/// `code` for `--json`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CliError {
    /// The command line, or a value in it, is not acceptable (also what the API answers 400 to).
    #[error("{0}")]
    Usage(String),
    /// The site, hostname or route does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The change conflicts with existing state (the site or hostname exists already).
    #[error("{0}")]
    Conflict(String),
    /// No autohttps admin API answered: the service is down, or the address is wrong.
    #[error("{0}")]
    Unreachable(String),
    /// The admin API refused the token (or none was found).
    #[error("{0}")]
    Unauthorized(String),
    /// The admin API failed (5xx), e.g. its store is unavailable.
    #[error("{0}")]
    Server(String),
    /// The configuration file or an environment override is invalid.
    #[error("{0}")]
    Config(String),
    /// `--wait` saw the issuance attempt fail.
    #[error("{0}")]
    IssuanceFailed(String),
    /// `--wait` gave up before the attempt finished.
    #[error("{0}")]
    WaitTimedOut(String),
}

/// Every exit code of the CLI: (code, `--json` codes, meaning). The man page and `--help`
/// print this table; the README copies it.
pub const EXIT_CODES: &[(u8, &str, &str)] = &[
    (0, "", "success"),
    (
        1,
        "issuance-failed, wait-timeout",
        "--wait saw the issuance attempt fail, or gave up waiting",
    ),
    (
        2,
        "usage",
        "bad command line or input (unknown flag, invalid site id or hostname, bad --admin-url)",
    ),
    (3, "not-found", "no such site or hostname"),
    (
        4,
        "conflict",
        "already exists (site, or a hostname another site has)",
    ),
    (
        5,
        "unreachable",
        "no autohttps admin API answered at the address (service down, wrong port)",
    ),
    (6, "server-error", "the service failed (5xx); see its log"),
    (7, "unauthorized", "the admin token is missing or wrong"),
    (
        8,
        "config",
        "the configuration file or an AUTOHTTPS_* variable is invalid",
    ),
];

/// [`EXIT_CODES`] as text, for `--help` and the man page.
pub fn exit_codes_help() -> String {
    let mut text = String::from("Exit codes:\n");
    for (code, json, meaning) in EXIT_CODES {
        let json = if json.is_empty() {
            String::new()
        } else {
            format!(" [{json}]")
        };
        let _ = writeln!(text, "  {code}  {meaning}{json}");
    }
    text
}

impl CliError {
    /// The stable machine-readable code printed with `--json`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Usage(_) => "usage",
            Self::NotFound(_) => "not-found",
            Self::Conflict(_) => "conflict",
            Self::Unreachable(_) => "unreachable",
            Self::Unauthorized(_) => "unauthorized",
            Self::Server(_) => "server-error",
            Self::Config(_) => "config",
            Self::IssuanceFailed(_) => "issuance-failed",
            Self::WaitTimedOut(_) => "wait-timeout",
        }
    }

    /// The process exit code (see [`EXIT_CODES`]).
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::IssuanceFailed(_) | Self::WaitTimedOut(_) => 1,
            Self::Usage(_) => 2,
            Self::NotFound(_) => 3,
            Self::Conflict(_) => 4,
            Self::Unreachable(_) => 5,
            Self::Server(_) => 6,
            Self::Unauthorized(_) => 7,
            Self::Config(_) => 8,
        }
    }

    /// The `--json` form.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "code": self.code(),
                "message": self.to_string(),
                "exit_code": self.exit_code(),
            }
        })
    }

    /// Prints the failure: JSON on stdout with `--json`, else one line on stderr.
    pub fn print(&self, json: bool) {
        if json {
            println!("{}", self.to_json());
        } else {
            eprintln!("autohttps: {self}");
        }
    }
}

impl From<crate::Error> for CliError {
    fn from(error: crate::Error) -> Self {
        use crate::Error;
        let message = chain_once(&error);
        match error {
            Error::InvalidHostname { .. } | Error::InvalidInput(_) => Self::Usage(message),
            Error::NotFound(_) => Self::NotFound(message),
            Error::Conflict(_) => Self::Conflict(message),
            Error::Config(_) | Error::ConfigFile { .. } | Error::Io { .. } => Self::Config(message),
            _ => Self::Server(message),
        }
    }
}

/// An error and its causes on one line, each cause added only when the text so far does not
/// already say it (many errors print their source in their own message).
pub fn chain_once(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let said = cause.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_failure_has_a_documented_exit_code_and_json_code() {
        let all = [
            CliError::Usage(String::new()),
            CliError::NotFound(String::new()),
            CliError::Conflict(String::new()),
            CliError::Unreachable(String::new()),
            CliError::Unauthorized(String::new()),
            CliError::Server(String::new()),
            CliError::Config(String::new()),
            CliError::IssuanceFailed(String::new()),
            CliError::WaitTimedOut(String::new()),
        ];
        for failure in &all {
            let row = EXIT_CODES
                .iter()
                .find(|(code, _, _)| *code == failure.exit_code())
                .unwrap_or_else(|| panic!("{} has no row in EXIT_CODES", failure.code()));
            assert!(row.1.split(", ").any(|c| c == failure.code()), "{row:?}");
        }
        let mut codes: Vec<u8> = EXIT_CODES.iter().map(|row| row.0).collect();
        codes.dedup();
        assert_eq!(codes.len(), EXIT_CODES.len(), "one row per exit code");
    }

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let error = crate::Error::io("read configuration file", "/nope.toml", io);
        let text = chain_once(&error);
        assert_eq!(
            text.matches("not found").count() + text.matches("No such file").count(),
            1,
            "{text}"
        );
        let wrapped = anyhow::Error::from(error).context("starting");
        let text = chain_once(wrapped.as_ref());
        assert!(
            text.starts_with("starting: read configuration file /nope.toml: "),
            "{text}"
        );
        assert_eq!(text.matches(": ").count(), 2, "{text}");
    }
}
