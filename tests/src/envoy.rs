//! A real Envoy for tests: renders a template from `envoy/`, starts Envoy on loopback ports,
//! waits until it is ready, and stops it when dropped. A test's Envoy runs under `timeout`, so
//! it also stops by itself if the test process dies ([`Lifetime`]).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};

/// The longest an Envoy started by a test may live.
const ENVOY_TEST_LIFETIME: Duration = Duration::from_secs(900);

/// How long a process started by the harness may live. Either way it runs under `timeout`,
/// in its own process group, and is stopped (TERM, then KILL) when its handle is dropped.
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

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

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

/// The release filter: `$AUTOHTTPS_FILTER_WASM`, else the `make build` output.
pub fn filter_wasm() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("AUTOHTTPS_FILTER_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            repo_root().join("target/wasm32-wasip1/wasm-release/autohttps_filter.wasm")
        });
    if !path.exists() {
        bail!(
            "the filter is not built at {}; run `make build` (or set AUTOHTTPS_FILTER_WASM)",
            path.display()
        );
    }
    Ok(path)
}

/// The ports [`free_port`] hands out: below Linux's ephemeral range (32768–60999), which the
/// kernel also gives to every outgoing connection and every `bind(:0)`. A port taken from that
/// range by binding `:0` and releasing it could be handed to another socket before its server
/// bound it (seen in CI: Envoy's listener failed with "Address already in use").
const TEST_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A loopback port nothing listens on right now (TCP and UDP, so the mock DNS can use it too),
/// from [`TEST_PORTS`], never handed out twice by this process; where a process starts in the
/// range depends on its pid, so two test processes rarely walk the same ports.
pub fn free_port() -> anyhow::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let span = u32::from(TEST_PORTS.end - TEST_PORTS.start);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7919) % span,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..span {
        let offset = NEXT.fetch_add(1, Ordering::SeqCst) % span;
        let port = TEST_PORTS.start + u16::try_from(offset).unwrap_or(0);
        let free = TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok();
        if free {
            return Ok(port);
        }
    }
    bail!(
        "no free loopback port in {}..{}: is something holding them all?",
        TEST_PORTS.start,
        TEST_PORTS.end
    )
}

/// Replaces every `${NAME}` in `template`; fails naming any placeholder left without a value.
/// The same rules as `tests/scripts/render.py`, which `make` uses.
pub fn render(template: &str, values: &HashMap<&str, String>) -> anyhow::Result<String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    let mut missing = Vec::new();
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[start..]);
            rest = "";
            break;
        };
        let name = &after[..end];
        let is_name = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
        match values.get(name) {
            Some(value) if is_name => out.push_str(value),
            _ if is_name => {
                missing.push(name.to_string());
            }
            _ => out.push_str(&rest[start..start + 3 + end]),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    if !missing.is_empty() {
        bail!("no value for {}", missing.join(", "));
    }
    Ok(out)
}

/// `TRUSTED_PROXY_RANGES` for `envoy/edge.yaml` and `tests/conformance/envoy.yaml`: the
/// trusted-proxy list (the sidecar's `edge.trusted_proxies`, the policy's
/// `settings.trusted_proxies`: CIDRs or bare addresses) as Envoy `CidrRange`s, so Envoy's
/// filter-chain choice and the filter's trust come from one list. An empty list becomes
/// `0.0.0.0/32`, an address no TCP peer has: an empty `direct_source_prefix_ranges` would
/// match every peer.
pub fn trusted_proxy_ranges<S: AsRef<str>>(proxies: &[S]) -> anyhow::Result<String> {
    let mut ranges = Vec::with_capacity(proxies.len().max(1));
    for raw in proxies {
        let cidr = autohttps_filter::policy::Cidr::parse(raw.as_ref())
            .map_err(|message| anyhow!("trusted proxy {message}"))?;
        ranges.push(format!(
            r#"{{address_prefix: "{}", prefix_len: {}}}"#,
            cidr.network(),
            cidr.prefix_len()
        ));
    }
    if ranges.is_empty() {
        ranges.push(r#"{address_prefix: "0.0.0.0", prefix_len: 32}"#.to_string());
    }
    Ok(format!("[{}]", ranges.join(", ")))
}

/// Renders `envoy/<name>` with these values.
pub fn render_file(name: &str, values: &HashMap<&str, String>) -> anyhow::Result<String> {
    let path = repo_root().join("envoy").join(name);
    let template =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    render(&template, values).with_context(|| format!("rendering {}", path.display()))
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
    child: Child,
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

    /// [`Envoy::start_in`] with `workers` worker threads (`--concurrency`).
    pub fn start_in_with_workers(
        config_yaml: &str,
        admin_port: u16,
        dir: Option<&Path>,
        lifetime: Lifetime,
        workers: u32,
    ) -> anyhow::Result<Envoy> {
        Envoy::spawn(config_yaml, admin_port, dir, lifetime, workers)
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
        let log = dir.join("envoy.log");
        let child = Command::new("timeout")
            .arg("--signal=TERM")
            .arg("--kill-after=5")
            .arg(lifetime.timeout_arg())
            .arg(&binary)
            .arg("-c")
            .arg(&config)
            .arg("--concurrency")
            .arg(workers.to_string())
            .args(["--use-dynamic-base-id", "-l", "info"])
            .arg("--log-path")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut envoy = Envoy {
            child,
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
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "Envoy exited ({status}) before it was ready; its log ends with:\n{}",
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
                    "Envoy was not ready within {limit:?}; its log ends with:\n{}",
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
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
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A plain HTTP/1.1 GET to `127.0.0.1:port`: (status, body).
pub fn http_get(port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("malformed HTTP response"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("no status in {head:?}"))?;
    let chunked = head.lines().any(|line| {
        line.to_ascii_lowercase()
            .replace(' ', "")
            .starts_with("transfer-encoding:chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_string()
    };
    Ok((status, body))
}

/// Decodes a chunked HTTP/1.1 body (RFC 9112 §7.1).
fn dechunk(mut body: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    loop {
        let (size_line, rest) = body
            .split_once("\r\n")
            .ok_or_else(|| anyhow!("truncated chunked body"))?;
        let size_text = size_line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| anyhow!("bad chunk size {size_line:?}"))?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = rest.get(..size).ok_or_else(|| anyhow!("truncated chunk"))?;
        out.push_str(chunk);
        body = rest
            .get(size..)
            .and_then(|r| r.strip_prefix("\r\n"))
            .ok_or_else(|| anyhow!("chunk not followed by CRLF"))?;
    }
}

/// What curl saw.
#[derive(Debug, Clone)]
pub struct CurlResponse {
    /// Status code.
    pub status: u16,
    /// Response headers, names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: String,
}

impl CurlResponse {
    /// The first value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.all(name).into_iter().next()
    }

    /// Every value of a header.
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// Runs curl with these arguments (plus `-sS -i`, a time limit and no proxy) and parses what it
/// printed. Redirects are not followed.
pub fn curl(args: &[&str]) -> anyhow::Result<CurlResponse> {
    let output = Command::new("curl")
        .args(["-sS", "-i", "--max-time", "10", "--noproxy", "*"])
        .args(args)
        .output()
        .context("running curl")?;
    if !output.status.success() {
        bail!(
            "curl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("curl printed no header block: {text:?}"))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("no status line in {head:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(CurlResponse {
        status,
        headers,
        body: body.to_string(),
    })
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

#[cfg(test)]
mod tests {
    use super::trusted_proxy_ranges;

    #[test]
    fn trusted_proxy_ranges_follow_the_policy_list() {
        assert_eq!(
            trusted_proxy_ranges(&["10.0.0.0/8", "127.0.0.5", "::1"]).expect("valid"),
            r#"[{address_prefix: "10.0.0.0", prefix_len: 8}, {address_prefix: "127.0.0.5", prefix_len: 32}, {address_prefix: "::1", prefix_len: 128}]"#
        );
    }

    #[test]
    fn no_trusted_proxy_matches_no_peer() {
        let none: [&str; 0] = [];
        assert_eq!(
            trusted_proxy_ranges(&none).expect("valid"),
            r#"[{address_prefix: "0.0.0.0", prefix_len: 32}]"#
        );
    }

    #[test]
    fn a_bad_trusted_proxy_is_named() {
        let error = trusted_proxy_ranges(&["proxy.local"]).expect_err("not an address");
        assert!(error.to_string().contains("proxy.local"), "{error}");
    }
}
