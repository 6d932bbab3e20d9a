//! Child processes of a test, the bench or `make run`: each runs under `timeout` (so it stops
//! by itself after its [`Lifetime`]), is stopped (TERM, then KILL) when its [`Process`] is
//! dropped, and is stopped by a watchdog if whoever started it dies without unwinding (a
//! SIGKILLed test never runs `Drop`). Its output goes to a log file whose path every error
//! names; when a failing test (a panic) drops it, a copy of that log is kept under
//! `target/tmp/kept-logs/` and its path printed, even if the test's temporary folder is gone.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// How long a process may live. Either way it runs under `timeout` and is stopped (TERM,
/// then KILL) when its handle is dropped or its starter dies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifetime {
    /// At most this long: a test that dies without cleaning up leaves nothing running.
    Limited(Duration),
    /// Until stopped: `make run` runs until Ctrl-C.
    UntilStopped,
}

impl Lifetime {
    /// The duration argument of `timeout` (0 disables its time limit).
    pub fn timeout_arg(self) -> String {
        match self {
            Lifetime::Limited(limit) => limit.as_secs().max(1).to_string(),
            Lifetime::UntilStopped => "0".into(),
        }
    }
}

/// Where a process's output (stdout and stderr) goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogMode {
    /// A new file (an earlier one is truncated).
    Create,
    /// Appended to the file (a process restarted onto the same log).
    Append,
}

/// A child process under `timeout`, stopped (TERM, then KILL) on drop.
#[derive(Debug)]
pub struct Process {
    name: String,
    child: Child,
    log: PathBuf,
    /// The log, open for reading: still readable when its folder was removed first.
    log_reader: Option<std::fs::File>,
}

impl Process {
    /// `program args…` with `envs`, its output in a new file `log`.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[&str],
        envs: &[(&str, &str)],
        log: PathBuf,
        lifetime: Lifetime,
    ) -> anyhow::Result<Process> {
        let mut command = Command::new(program);
        command.args(args).envs(envs.iter().copied());
        Process::start(name, &command, &log, LogMode::Create, lifetime)
    }

    /// Runs `command` (its program, arguments, environment and working directory; not its
    /// stdio) under `timeout`, its output in `log`.
    pub fn start(
        name: &str,
        command: &Command,
        log: &Path,
        mode: LogMode,
        lifetime: Lifetime,
    ) -> anyhow::Result<Process> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(mode == LogMode::Append)
            .truncate(mode == LogMode::Create)
            .open(log)
            .with_context(|| format!("creating {name}'s log {}", log.display()))?;
        let mut wrapped = Command::new("timeout");
        wrapped
            .args(["--signal=TERM", "--kill-after=5", &lifetime.timeout_arg()])
            .arg(command.get_program())
            .args(command.get_args());
        for (key, value) in command.get_envs() {
            match value {
                Some(value) => wrapped.env(key, value),
                None => wrapped.env_remove(key),
            };
        }
        if let Some(dir) = command.get_current_dir() {
            wrapped.current_dir(dir);
        }
        let child = wrapped
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {name} ({}); is it installed (`make tools`)?",
                    Path::new(command.get_program()).display()
                )
            })?;
        // `timeout` passes TERM on to the program, then KILLs it 5 s later.
        watch_starter(
            &format!("kill -TERM {} 2>/dev/null", child.id()),
            Some(child.id()),
        )
        .with_context(|| format!("starting {name}'s watchdog"))?;
        Ok(Process {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
            log_reader: std::fs::File::open(log).ok(),
        })
    }

    /// Its name, as given to [`Process::spawn`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Its whole log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = self.log();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The pid of `timeout`, the process this handle holds.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The program's own pid (the child of `timeout`), once it runs.
    pub fn program_pid(&self) -> Option<u32> {
        let output = Command::new("pgrep")
            .args(["-P", &self.child.id().to_string()])
            .output()
            .ok()?;
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
    }

    /// Whether it has exited.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// An error naming how it exited and where its log is (with the log's last lines), if it
    /// has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); its log ({}) ends with:\n{}",
                self.name,
                self.log.display(),
                self.log_tail(30)
            );
        }
        Ok(())
    }

    /// CPU seconds (user + system) the program itself has used so far, from
    /// `/proc/<pid>/stat`; `None` once it has exited.
    pub fn cpu_seconds(&self) -> Option<f64> {
        Some(ProcessCpu::of(self.program_pid()?)?.own)
    }

    /// SIGKILL to the program itself (not to `timeout`), then reap: no chance to clean up.
    pub fn kill_hard(&mut self) {
        if self.exited() {
            return;
        }
        // Just after the start, `timeout` may not have forked the program yet.
        let program = wait_until("the program under timeout", Duration::from_secs(2), || {
            self.program_pid()
        });
        match program {
            Ok(pid) => {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
            Err(_) => {
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
    }

    /// Stops it: TERM (which `timeout` passes on), KILL after 10 s, then reap.
    pub fn stop(&mut self) {
        if self.exited() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.exited() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            match self.keep_log() {
                Ok(kept) => eprintln!("{}'s log is kept in {}", self.name, kept.display()),
                Err(error) => eprintln!(
                    "{}'s log ({}) could not be kept: {error:#}",
                    self.name,
                    self.log.display()
                ),
            }
        }
    }
}

impl Process {
    /// Copies the log (through the handle held since the start) to `target/tmp/kept-logs/`.
    fn keep_log(&mut self) -> anyhow::Result<PathBuf> {
        use std::io::{Seek as _, SeekFrom};
        use std::sync::atomic::{AtomicUsize, Ordering};
        static KEPT: AtomicUsize = AtomicUsize::new(0);
        let reader = self
            .log_reader
            .as_mut()
            .context("the log was never opened")?;
        reader.seek(SeekFrom::Start(0))?;
        let dir = crate::target_dir().join("tmp/kept-logs");
        std::fs::create_dir_all(&dir)?;
        let name: String = self
            .name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let kept = dir.join(format!(
            "{}-{}-{name}.log",
            std::process::id(),
            KEPT.fetch_add(1, Ordering::SeqCst)
        ));
        std::io::copy(reader, &mut std::fs::File::create(&kept)?)?;
        Ok(kept)
    }
}

/// Runs the shell command `then` once this process has exited, however it exits (statics are
/// never dropped; a SIGKILLed process never unwinds). With `unless_gone`, the watchdog also
/// ends, doing nothing, once that pid no longer exists (its work done by a normal stop).
pub fn watch_starter(then: &str, unless_gone: Option<u32>) -> anyhow::Result<()> {
    let gone = unless_gone
        .map(|pid| format!("kill -0 {pid} 2>/dev/null || exit 0; "))
        .unwrap_or_default();
    let script = format!(
        "while kill -0 {starter} 2>/dev/null; do {gone}sleep 1; done; {then}",
        starter = std::process::id(),
    );
    // Started in the background by a shell that exits at once (and is reaped here), so the
    // watchdog is no child of ours and leaves no zombie behind.
    let status = Command::new("sh")
        .args(["-c", &format!("({script}) >/dev/null 2>&1 </dev/null &")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("starting a watchdog (sh)")?;
    if !status.success() {
        bail!("starting a watchdog: sh exited ({status})");
    }
    Ok(())
}

/// Polls `check` every 50 ms until it gives a value or `limit` passes.
pub fn wait_until<T>(
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check() {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("{what} did not get ready within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What `/proc/<pid>/stat` says of a process's CPU time, in seconds (user + system).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcessCpu {
    /// Its parent's pid.
    pub parent: u32,
    /// Used by the process itself.
    pub own: f64,
    /// Used by its children that have exited and been waited for.
    pub reaped_children: f64,
}

impl ProcessCpu {
    /// The figures of process `pid`; `None` when there is no such process.
    pub fn of(pid: u32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The fields after the command name (which may hold spaces and parentheses): state,
        // ppid… utime, stime, cutime and cstime are fields 14 to 17 of the line (11 to 14
        // after the name), in USER_HZ, 100 per second on every architecture Linux supports.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
        Some(Self {
            parent: fields.get(1)?.parse().ok()?,
            own: (ticks(11)? + ticks(12)?) / 100.0,
            reaped_children: (ticks(13)? + ticks(14)?) / 100.0,
        })
    }

    /// CPU seconds used so far by process `pid` and all its children, running or exited (the
    /// latter once it has waited for them): e.g. a PostgreSQL server and its backends.
    pub fn with_children(pid: u32) -> Option<f64> {
        let parent = Self::of(pid)?;
        let children: f64 = std::fs::read_dir("/proc")
            .ok()?
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter_map(Self::of)
            .filter(|child| child.parent == pid)
            .map(|child| child.own)
            .sum();
        Some(parent.own + parent.reaped_children + children)
    }
}
