//! Command hooks: for each event, run a program (no shell) with the event's JSON on stdin and
//! `AUTOHTTPS_EVENT` / `AUTOHTTPS_SITE` in its environment; killed after `timeout_ms`. A failure
//! is logged, not retried (the command can retry itself).

use std::process::Stdio;
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;

use super::{EventKind, HookEvent, event_json};

/// `[[hooks.exec]]`.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExecConfig {
    /// The program (an absolute path) and its arguments, run without a shell.
    pub command: Vec<String>,
    /// The kinds to run it for; empty or omitted: all.
    #[serde(default)]
    pub events: Vec<EventKind>,
    /// How long it may run before it is killed.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_timeout_ms() -> u64 {
    10_000
}

impl ExecConfig {
    pub(super) fn validate(&self) -> Result<(), String> {
        let Some(program) = self.command.first() else {
            return Err(
                "command is empty; give the program and its arguments, e.g. [\"/usr/local/bin/notify\", \"--quiet\"]"
                    .into(),
            );
        };
        if !std::path::Path::new(program).is_absolute() {
            return Err(format!(
                "command {program:?} must be an absolute path (it runs without a shell or PATH search)"
            ));
        }
        if self.timeout_ms == 0 {
            return Err("timeout_ms must be at least 1".into());
        }
        Ok(())
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    /// Exit status 0.
    Succeeded,
    /// Another exit status (or a signal), with the start of its stderr.
    Failed(String),
    /// Killed after the timeout.
    TimedOut,
    /// It could not be started.
    NotStarted(String),
}

/// Runs the command once for `event`.
pub async fn run(config: &ExecConfig, event: &HookEvent) -> RunOutcome {
    let (program, arguments) = match config.command.split_first() {
        Some(split) => split,
        None => return RunOutcome::NotStarted("empty command".into()),
    };
    let spawned = tokio::process::Command::new(program)
        .args(arguments)
        .env("AUTOHTTPS_EVENT", event.kind.as_str())
        .env("AUTOHTTPS_SITE", &event.site)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(error) => return RunOutcome::NotStarted(error.to_string()),
    };
    let body = event_json(event);
    let mut stdin = child.stdin.take();
    let mut stderr = child.stderr.take();
    let work = async {
        if let Some(stdin) = stdin.as_mut() {
            // A command that does not read its input is not an error.
            let _ignored = stdin.write_all(&body).await;
        }
        drop(stdin.take());
        let mut errors = Vec::new();
        if let Some(stderr) = stderr.as_mut() {
            let _partial = stderr.take(4096).read_to_end(&mut errors).await;
        }
        (child.wait().await, errors)
    };
    match tokio::time::timeout(Duration::from_millis(config.timeout_ms), work).await {
        Ok((Ok(status), _)) if status.success() => RunOutcome::Succeeded,
        Ok((Ok(status), errors)) => RunOutcome::Failed(format!(
            "{status}: {}",
            String::from_utf8_lossy(&errors).trim()
        )),
        Ok((Err(error), _)) => RunOutcome::Failed(error.to_string()),
        Err(_) => RunOutcome::TimedOut,
    }
}

/// Runs the command for every event from `queue` in order, until the queue closes.
pub async fn run_all(config: ExecConfig, mut queue: mpsc::Receiver<HookEvent>) {
    while let Some(event) = queue.recv().await {
        let outcome = run(&config, &event).await;
        let command = &config.command;
        match outcome {
            RunOutcome::Succeeded => {
                tracing::debug!(?command, event = event.kind.as_str(), site = %event.site, "hook command ran");
            }
            RunOutcome::Failed(why) => {
                tracing::warn!(?command, event = event.kind.as_str(), site = %event.site, "hook command failed: {why}");
            }
            RunOutcome::TimedOut => {
                tracing::warn!(?command, event = event.kind.as_str(), site = %event.site, timeout_ms = config.timeout_ms, "hook command killed after its timeout (raise timeout_ms or make it faster)");
            }
            RunOutcome::NotStarted(why) => {
                tracing::error!(
                    ?command,
                    event = event.kind.as_str(),
                    "hook command could not start: {why}"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> HookEvent {
        HookEvent::new(
            EventKind::CertificateIssued,
            "shop",
            time::OffsetDateTime::UNIX_EPOCH,
        )
    }

    fn shell(script: &str, timeout_ms: u64) -> ExecConfig {
        ExecConfig {
            command: vec!["/bin/sh".into(), "-c".into(), script.into()],
            events: Vec::new(),
            timeout_ms,
        }
    }

    #[tokio::test]
    async fn the_command_reads_the_event_on_stdin_with_its_type_in_the_environment() {
        let dir = tempfile::tempdir().expect("dir");
        let json = dir.path().join("event.json");
        let env = dir.path().join("env");
        let script = format!(
            "cat > {} && echo \"$AUTOHTTPS_EVENT $AUTOHTTPS_SITE\" > {}",
            json.display(),
            env.display()
        );
        let sent = event();
        assert_eq!(
            run(&shell(&script, 5000), &sent).await,
            RunOutcome::Succeeded
        );
        let received: HookEvent =
            serde_json::from_slice(&std::fs::read(&json).expect("json")).expect("an event");
        assert_eq!(received, sent);
        assert_eq!(
            std::fs::read_to_string(&env).expect("env"),
            "certificate-issued shop\n"
        );
    }

    #[tokio::test]
    async fn a_failing_command_reports_its_stderr_and_a_slow_one_is_killed() {
        let failed = run(&shell("echo nope >&2; exit 3", 5000), &event()).await;
        assert!(
            matches!(&failed, RunOutcome::Failed(why) if why.contains("nope") && why.contains('3')),
            "{failed:?}"
        );
        let started = std::time::Instant::now();
        assert_eq!(
            run(&shell("sleep 30", 200), &event()).await,
            RunOutcome::TimedOut
        );
        assert!(started.elapsed() < Duration::from_secs(10));
        let missing = ExecConfig {
            command: vec!["/nonexistent/notify".into()],
            events: Vec::new(),
            timeout_ms: 1000,
        };
        assert!(matches!(
            run(&missing, &event()).await,
            RunOutcome::NotStarted(_)
        ));
    }
}
