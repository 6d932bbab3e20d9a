//! A real Envoy: starts it (the kit's [`Process`], under `timeout`) on a configuration
//! rendered by [`crate::render`], waits until it is ready, reads its stats and log, and stops
//! it when dropped; and `envoy --mode validate`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::http::http_get;
use crate::process::{Lifetime, LogMode, Process};
use crate::repo_root;

/// The longest an Envoy started by a test may live.
const ENVOY_TEST_LIFETIME: Duration = Duration::from_secs(900);

/// The Envoy binary: `$AUTOHTTPS_ENVOY`, else the one `make` installs in `.tools/venv`.
pub fn envoy_binary() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("AUTOHTTPS_ENVOY")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".tools/venv/bin/envoy"));
    if !path.exists() {
        bail!(
            "Envoy is not installed at {}; run `make tools` (or set AUTOHTTPS_ENVOY)",
            path.display()
        );
    }
    Ok(path)
}

/// The release filter: `$AUTOHTTPS_FILTER_WASM`, else the `make build` output (the shipped
/// `.wasm`, after wasm-opt).
pub fn filter_wasm() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("AUTOHTTPS_FILTER_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/dist/autohttps_filter.wasm"));
    if !path.exists() {
        bail!(
            "the filter is not built at {}; run `make build` (or set AUTOHTTPS_FILTER_WASM)",
            path.display()
        );
    }
    Ok(path)
}

/// Runs `envoy --mode validate` on this configuration (written to `path`): whether Envoy
/// accepted it, and everything it printed.
pub fn validate(config_yaml: &str, path: &Path) -> anyhow::Result<(bool, String)> {
    std::fs::write(path, config_yaml).with_context(|| format!("writing {}", path.display()))?;
    let output = Command::new(envoy_binary()?)
        .args(["--mode", "validate", "-l", "error", "-c"])
        .arg(path)
        .output()
        .context("running envoy --mode validate")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok((output.status.success(), text))
}

/// A running Envoy.
#[derive(Debug)]
pub struct Envoy {
    process: Process,
    admin_port: u16,
    /// Where its configuration and `envoy.log` are.
    dir: PathBuf,
    /// The temporary folder `dir` is in, when Envoy was not given one.
    _temp: Option<tempfile::TempDir>,
}

impl Envoy {
    /// Starts Envoy with this configuration (one worker) and waits until its admin interface
    /// says it is ready.
    pub fn start(config_yaml: &str, admin_port: u16) -> anyhow::Result<Envoy> {
        Envoy::start_in(
            config_yaml,
            admin_port,
            None,
            Lifetime::Limited(ENVOY_TEST_LIFETIME),
        )
    }

    /// [`Envoy::start`] with `workers` worker threads (`--concurrency`), each with its own
    /// filter VM.
    pub fn start_workers(
        config_yaml: &str,
        admin_port: u16,
        workers: u32,
    ) -> anyhow::Result<Envoy> {
        Envoy::spawn(
            config_yaml,
            admin_port,
            None,
            Lifetime::Limited(ENVOY_TEST_LIFETIME),
            workers,
        )
    }

    /// [`Envoy::start`] with its configuration and `envoy.log` in `dir` (a temporary folder
    /// when `None`), living for `lifetime`.
    pub fn start_in(
        config_yaml: &str,
        admin_port: u16,
        dir: Option<&Path>,
        lifetime: Lifetime,
    ) -> anyhow::Result<Envoy> {
        Envoy::spawn(config_yaml, admin_port, dir, lifetime, 1)
    }

    fn spawn(
        config_yaml: &str,
        admin_port: u16,
        dir: Option<&Path>,
        lifetime: Lifetime,
        workers: u32,
    ) -> anyhow::Result<Envoy> {
        let binary = envoy_binary()?;
        let (dir, temp) = match dir {
            Some(dir) => (dir.to_path_buf(), None),
            None => {
                let temp = tempfile::tempdir()?;
                (temp.path().to_path_buf(), Some(temp))
            }
        };
        let config = dir.join("envoy.yaml");
        std::fs::write(&config, config_yaml)?;
        let mut command = Command::new(&binary);
        command
            .arg("-c")
            .arg(&config)
            .arg("--concurrency")
            .arg(workers.to_string())
            .args(["--use-dynamic-base-id", "-l", "info"]);
        // Envoy logs to stderr: the process's log, `envoy.log` (appended to by a restart).
        let process = Process::start(
            "Envoy",
            &command,
            &dir.join("envoy.log"),
            LogMode::Append,
            lifetime,
        )?;
        let mut envoy = Envoy {
            process,
            admin_port,
            dir,
            _temp: temp,
        };
        envoy.wait_ready(Duration::from_secs(30))?;
        Ok(envoy)
    }

    fn wait_ready(&mut self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if self.process.exited() {
                bail!(
                    "Envoy exited before it was ready; its log ({}) ends with:\n{}",
                    self.log_path().display(),
                    self.log_tail(40)
                );
            }
            if let Ok((200, body)) = http_get(self.admin_port, "/ready")
                && body.trim() == "LIVE"
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "Envoy was not ready within {limit:?}; its log ({}) ends with:\n{}",
                    self.log_path().display(),
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether Envoy has exited.
    pub fn exited(&mut self) -> bool {
        self.process.exited()
    }

    /// CPU seconds (user + system) Envoy has used so far; `None` once it has exited.
    pub fn cpu_seconds(&self) -> Option<f64> {
        self.process.cpu_seconds()
    }

    /// The admin port.
    pub fn admin_port(&self) -> u16 {
        self.admin_port
    }

    /// Where Envoy writes its log.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("envoy.log")
    }

    /// Envoy's whole log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The last `lines` lines of Envoy's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// A stat's value from the admin interface (`/stats?filter=^name$`), if Envoy has it.
    pub fn stat(&self, name: &str) -> anyhow::Result<Option<u64>> {
        let (status, body) = http_get(
            self.admin_port,
            &format!("/stats?filter=%5E{}%24", name.replace('.', "%5C.")),
        )?;
        if status != 200 {
            bail!("/stats answered {status}");
        }
        for line in body.lines() {
            if let Some((stat, value)) = line.split_once(": ")
                && stat == name
            {
                return Ok(value.trim().parse().ok());
            }
        }
        Ok(None)
    }

    /// Stops Envoy now.
    pub fn stop(&mut self) {
        self.process.stop();
    }
}

/// A self-signed certificate for these names, made with the `openssl` CLI: (cert, key) paths
/// inside `dir`; the key file is owner-only.
pub fn self_signed(dir: &Path, names: &[&str]) -> anyhow::Result<(PathBuf, PathBuf)> {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    let san: Vec<String> = names.iter().map(|n| format!("DNS:{n}")).collect();
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "2", "-subj", "/CN=autohttps test"])
        .arg("-addext")
        .arg(format!("subjectAltName={}", san.join(",")))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("running openssl")?;
    if !status.success() {
        bail!("openssl could not make a test certificate");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok((cert, key))
}

/// The filter's poll as `envoy/edge.yaml` ships it; [`with_policy_poll`] replaces it.
const SHIPPED_POLICY_POLL: &str = r#""interval_ms": 1000"#;

/// `envoy/edge.yaml` (the template or a rendering of it) with the filter's fallback poll at
/// `ms` instead of the shipped one: set it long and a change can reach the VMs in time only
/// through the feed's long poll.
pub fn with_policy_poll(yaml: &str, ms: u64) -> anyhow::Result<String> {
    if !yaml.contains(SHIPPED_POLICY_POLL) {
        bail!(
            "envoy/edge.yaml no longer sets the filter's poll as {SHIPPED_POLICY_POLL}; update autohttps_kit::envoy::with_policy_poll"
        );
    }
    Ok(yaml.replace(SHIPPED_POLICY_POLL, &format!(r#""interval_ms": {ms}"#)))
}

/// Seconds since midnight of a log line in Envoy's default format (`[HH:MM:SS.mmm]…`, the
/// date dropped), or of a bare `[HH:MM:SS.mmm]`.
pub fn log_seconds(line: &str) -> Option<f64> {
    let stamp = line.strip_prefix('[')?.split(']').next()?;
    let time = stamp.rsplit(' ').next()?;
    let mut parts = time.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// One `policy "<version>" applied (…)` line the filter logged, as Envoy wrote it (default
/// format `[time][thread][level]…`: Envoy stamps each line with the thread of the VM).
#[derive(Debug, Clone)]
pub struct PolicyApplied {
    /// Envoy's thread id: one per VM (the main thread's and each worker's).
    pub thread: String,
    /// The version applied.
    pub version: String,
    /// Applied as a delta (else a snapshot).
    pub delta: bool,
    /// Seconds since midnight (see [`log_seconds`]).
    pub at: Option<f64>,
}

impl PolicyApplied {
    /// The `n` of a version `<epoch>-<n>`.
    pub fn n(&self) -> Option<u64> {
        self.version.rsplit_once('-')?.1.parse().ok()
    }
}

/// Every "policy … applied" line of an Envoy log.
pub fn policy_applied_lines(log: &str) -> Vec<PolicyApplied> {
    log.lines()
        .filter_map(|line| {
            let thread = line.split(['[', ']']).nth(3)?.to_string();
            let rest = &line[line.find("policy \"")? + "policy \"".len()..];
            let (version, tail) = rest.split_once('"')?;
            let tail = tail.trim_start();
            if !tail.starts_with("applied (") {
                return None;
            }
            Some(PolicyApplied {
                thread,
                version: version.to_string(),
                delta: tail.starts_with("applied (delta"),
                at: log_seconds(line),
            })
        })
        .collect()
}
