//! The whole autohttps stack on loopback: Pebble and pebble-challtestsrv (the ACME CA and its
//! mock DNS), the `autohttps` sidecar binary, Envoy with `envoy/edge.yaml` and the filter, and
//! a small demo backend. `make run` and the end-to-end suite both start it through [`Stack`].
//!
//! Every process runs under `timeout` and is stopped when the [`Stack`] is dropped; a test's
//! stack also stops by itself after an hour if whoever started it dies ([`Lifetime`]), while
//! `make run`'s lives until Ctrl-C.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};

pub use crate::envoy::Lifetime;
use crate::envoy::{self, CurlResponse, Envoy, curl, free_port, render_file};

/// The longest a process of a test's stack may live.
const TEST_LIFETIME: Duration = Duration::from_secs(3600);

/// The admin token of stacks started here.
pub const ADMIN_TOKEN: &str = "autohttps-local-admin-token";

/// Every port the stack uses (all on 127.0.0.1).
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    /// Envoy's plain-HTTP listener (Pebble validates HTTP-01 here).
    pub http: u16,
    /// Envoy's TLS listener.
    pub https: u16,
    /// Envoy's admin interface.
    pub envoy_admin: u16,
    /// The sidecar's admin API.
    pub sidecar_admin: u16,
    /// The sidecar's internal listener (challenges, policy feed, CSP reports).
    pub sidecar_internal: u16,
    /// Pebble's ACME directory.
    pub acme: u16,
    /// Pebble's management interface.
    pub acme_management: u16,
    /// challtestsrv's mock DNS (UDP and TCP).
    pub dns: u16,
    /// challtestsrv's management interface.
    pub dns_management: u16,
    /// The demo backend.
    pub backend: u16,
}

impl Ports {
    /// The fixed ports of `make run`.
    pub fn local_defaults() -> Ports {
        Ports {
            http: 8080,
            https: 8443,
            envoy_admin: 9901,
            sidecar_admin: 8081,
            sidecar_internal: 8082,
            acme: 14000,
            acme_management: 15000,
            dns: 8053,
            dns_management: 8055,
            backend: 8000,
        }
    }

    /// Free ports, for tests running side by side.
    pub fn free() -> anyhow::Result<Ports> {
        Ok(Ports {
            http: free_port()?,
            https: free_port()?,
            envoy_admin: free_port()?,
            sidecar_admin: free_port()?,
            sidecar_internal: free_port()?,
            acme: free_port()?,
            acme_management: free_port()?,
            dns: free_udp_and_tcp_port()?,
            dns_management: free_port()?,
            backend: free_port()?,
        })
    }

    fn all(&self) -> [(&'static str, u16); 10] {
        [
            ("Envoy HTTP", self.http),
            ("Envoy HTTPS", self.https),
            ("Envoy admin", self.envoy_admin),
            ("sidecar admin", self.sidecar_admin),
            ("sidecar internal", self.sidecar_internal),
            ("Pebble ACME", self.acme),
            ("Pebble management", self.acme_management),
            ("mock DNS", self.dns),
            ("mock DNS management", self.dns_management),
            ("demo backend", self.backend),
        ]
    }
}

fn free_udp_and_tcp_port() -> anyhow::Result<u16> {
    for _ in 0..50 {
        let port = free_port()?;
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no port free for both UDP and TCP")
}

/// The `autohttps` binary: `$AUTOHTTPS_BIN`, else the release build, else the debug build.
pub fn sidecar_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("AUTOHTTPS_BIN") {
        return Ok(PathBuf::from(path));
    }
    let root = envoy::repo_root();
    for candidate in ["target/release/autohttps", "target/debug/autohttps"] {
        let path = root.join(candidate);
        if path.exists() {
            return Ok(path);
        }
    }
    bail!("the sidecar is not built; run `make build` (or set AUTOHTTPS_BIN)")
}

/// A child process under `timeout`, stopped (TERM, then KILL) on drop.
#[derive(Debug)]
pub(crate) struct Process {
    child: Child,
    log: PathBuf,
}

impl Process {
    pub(crate) fn spawn(
        name: &'static str,
        program: &Path,
        args: &[&str],
        envs: &[(&str, &str)],
        log: PathBuf,
        lifetime: Lifetime,
    ) -> anyhow::Result<Process> {
        let out =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new("timeout")
            .args(["--signal=TERM", "--kill-after=5", &lifetime.timeout_arg()])
            .arg(program)
            .args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {name} ({})", program.display()))?;
        Ok(Process { child, log })
    }

    /// The program's own pid (the child of `timeout`).
    fn program_pid(&self) -> Option<u32> {
        let output = Command::new("pgrep")
            .args(["-P", &self.child.id().to_string()])
            .output()
            .ok()?;
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
    }

    pub(crate) fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    pub(crate) fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// SIGKILL to the program itself (not to `timeout`), then reap.
    fn kill_hard(&mut self) {
        if let Some(pid) = self.program_pid() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        let _ = self.child.wait();
    }

    fn stop(&mut self) {
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
    }
}

/// nginx (Debian's) as a TLS-terminating proxy in front of a stack's Envoy
/// (`tests/trusted-proxy/nginx.conf`): it listens on its own loopback address, connects to
/// Envoy's plain listener from that address, and forwards `X-Forwarded-Proto: $scheme` and
/// the client appended to `X-Forwarded-For`. Stopped when dropped.
#[derive(Debug)]
pub struct FrontProxy {
    /// The address it listens on and connects to Envoy from.
    pub address: String,
    /// Its plain-HTTP port.
    pub http_port: u16,
    /// Its TLS port (a self-signed certificate for the names it was started with).
    pub https_port: u16,
    _process: Process,
}

impl FrontProxy {
    /// Starts nginx on `address` in front of the Envoy plain listener on 127.0.0.1:`envoy_http`,
    /// with a certificate for `names`, keeping its files in `dir`; waits until it answers.
    pub fn start(
        dir: &Path,
        address: &str,
        envoy_http: u16,
        names: &[&str],
    ) -> anyhow::Result<FrontProxy> {
        let dir = dir.join(format!("nginx-{address}"));
        std::fs::create_dir_all(&dir)?;
        let (cert, key) = envoy::self_signed(&dir, names)?;
        let (http_port, https_port) = (free_port()?, free_port()?);
        let template_path = envoy::repo_root().join("tests/trusted-proxy/nginx.conf");
        let template = std::fs::read_to_string(&template_path)
            .with_context(|| format!("reading {}", template_path.display()))?;
        let conf = envoy::render(
            &template,
            &HashMap::from([
                ("DIR", dir.display().to_string()),
                ("PROXY_ADDRESS", address.to_string()),
                ("HTTP_PORT", http_port.to_string()),
                ("HTTPS_PORT", https_port.to_string()),
                ("TLS_CERT", cert.display().to_string()),
                ("TLS_KEY", key.display().to_string()),
                ("ENVOY_HTTP_PORT", envoy_http.to_string()),
            ]),
        )?;
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .map(Path::new)
            .find(|p| p.exists())
            .ok_or_else(|| {
                anyhow!("nginx is not installed; run `make test` (or apt-get install -y nginx)")
            })?;
        let dir_arg = dir.display().to_string();
        let conf_arg = conf_path.display().to_string();
        let mut process = Process::spawn(
            "nginx",
            nginx,
            &["-p", &dir_arg, "-c", &conf_arg],
            &[],
            dir.join("nginx.log"),
            // Only tests put a proxy in front: it stops by itself if the test dies.
            Lifetime::Limited(TEST_LIFETIME),
        )?;
        for port in [http_port, https_port] {
            let ready = wait_until("nginx", Duration::from_secs(10), || {
                if process.exited() {
                    return Some(false);
                }
                TcpStream::connect((address, port)).is_ok().then_some(true)
            });
            if !matches!(ready, Ok(true)) {
                let error_log = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
                bail!(
                    "nginx did not listen on {address}:{port}\n{}\n{error_log}",
                    process.log_tail(20)
                );
            }
        }
        Ok(FrontProxy {
            address: address.to_string(),
            http_port,
            https_port,
            _process: process,
        })
    }
}

/// A tiny HTTP/1.1 backend: answers every request with a small page that names the host and
/// loads one `http://` image (so that mixed-content modes have something to act on).
#[derive(Debug)]
pub struct DemoBackend {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl DemoBackend {
    /// Serves on 127.0.0.1:`port`.
    pub fn start(port: u16) -> anyhow::Result<DemoBackend> {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .with_context(|| format!("the demo backend cannot listen on port {port}"))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            while !stop_flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        std::thread::spawn(move || serve_backend_connection(stream));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(DemoBackend {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for DemoBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve_backend_connection(stream: TcpStream) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut reader = BufReader::new(&stream);
    loop {
        let mut host = String::new();
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut content_length = 0usize;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" || line == "\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                let name = name.trim().to_ascii_lowercase();
                if name == "host" {
                    host = value.trim().to_string();
                } else if name == "content-length" {
                    content_length = value.trim().parse().unwrap_or(0);
                }
            }
        }
        if content_length > 0 {
            let mut body = vec![0; content_length.min(1 << 20)];
            if reader.read_exact(&mut body).is_err() {
                return;
            }
        }
        let host = host.split(':').next().unwrap_or_default().to_string();
        let page = format!(
            "<!doctype html><title>{host}</title><h1>Hello from {host}</h1>\n<p>Served by the autohttps demo backend.</p>\n<img src=\"http://{host}/logo.png\" alt=\"an http:// image\">\n"
        );
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/html; charset=utf-8\r\ncontent-length: {}\r\n\r\n{page}",
            page.len()
        );
        let mut out = &stream;
        if out.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

/// Options for [`Stack::start`].
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// Where the stack keeps its files (configs, logs, the sidecar's data).
    pub dir: PathBuf,
    /// Ports.
    pub ports: Ports,
    /// Print what is being done.
    pub verbose: bool,
    /// How long its processes may live.
    pub lifetime: Lifetime,
    /// The TLS-terminating proxies in front of Envoy (CIDRs or bare addresses): written once,
    /// into the sidecar's `edge.trusted_proxies` (so the filter's policy) and into Envoy's
    /// trusted-proxy filter chains (`TRUSTED_PROXY_RANGES`).
    pub trusted_proxies: Vec<String>,
    /// Envoy's worker threads (`--concurrency`), each with its own filter VM.
    pub envoy_workers: u32,
    /// The filter's fallback poll interval in ms, instead of the shipped `edge.yaml`'s; the
    /// long poll is unchanged (a test that sets it long shows a change arrives by push alone).
    pub feed_interval_ms: Option<u64>,
}

impl StackOptions {
    /// A test's stack: quiet, its processes limited to an hour, no trusted proxy in front.
    pub fn for_test(dir: PathBuf, ports: Ports) -> StackOptions {
        StackOptions {
            dir,
            ports,
            verbose: false,
            lifetime: Lifetime::Limited(TEST_LIFETIME),
            trusted_proxies: Vec::new(),
            envoy_workers: 1,
            feed_interval_ms: None,
        }
    }
}

/// A running stack.
#[derive(Debug)]
pub struct Stack {
    /// Ports in use.
    pub ports: Ports,
    /// Its files.
    pub dir: PathBuf,
    /// Pebble's issuing root, PEM file: what clients trust.
    pub ca_root: PathBuf,
    sidecar_config: PathBuf,
    // Dropped in this order: Envoy first, then the sidecar, Pebble and the backend.
    envoy: Option<Envoy>,
    sidecar: Option<Process>,
    _pebble: Process,
    _challtestsrv: Process,
    _backend: DemoBackend,
    verbose: bool,
    lifetime: Lifetime,
}

impl Stack {
    /// A stack on free ports in a fresh temporary folder named after `name`, quiet: what each
    /// whole-stack test starts. Keep the folder alive as long as the stack.
    pub fn start_in_temp_dir(name: &str) -> anyhow::Result<(Stack, tempfile::TempDir)> {
        Stack::start_in_temp_dir_behind(name, &[])
    }

    /// As [`Stack::start_in_temp_dir`], with these TLS-terminating proxies trusted in front of
    /// Envoy (see [`StackOptions::trusted_proxies`]).
    pub fn start_in_temp_dir_behind(
        name: &str,
        trusted_proxies: &[&str],
    ) -> anyhow::Result<(Stack, tempfile::TempDir)> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("autohttps-{name}-"))
            .tempdir()?;
        let stack = Stack::start(StackOptions {
            trusted_proxies: trusted_proxies.iter().map(|p| p.to_string()).collect(),
            ..StackOptions::for_test(dir.path().to_path_buf(), Ports::free()?)
        })?;
        Ok((stack, dir))
    }

    /// Starts everything and waits until each part answers.
    pub fn start(options: StackOptions) -> anyhow::Result<Stack> {
        let StackOptions {
            dir,
            ports,
            verbose,
            lifetime,
            trusted_proxies,
            envoy_workers,
            feed_interval_ms,
        } = options;
        std::fs::create_dir_all(&dir)?;
        let say = |message: &str| {
            if verbose {
                println!("==> {message}");
            }
        };
        for (what, port) in ports.all() {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                bail!(
                    "port {port} ({what}) is already in use; stop what listens there and try again"
                );
            }
        }

        say(&format!(
            "starting the demo backend on 127.0.0.1:{}",
            ports.backend
        ));
        let backend = DemoBackend::start(ports.backend)?;

        say(&format!(
            "starting pebble-challtestsrv (mock DNS on 127.0.0.1:{}; every name resolves to 127.0.0.1)",
            ports.dns
        ));
        let challtestsrv = Process::spawn(
            "pebble-challtestsrv",
            Path::new("pebble-challtestsrv"),
            &[
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
                "-dns01",
                &format!("127.0.0.1:{}", ports.dns),
                "-management",
                &format!("127.0.0.1:{}", ports.dns_management),
                "-defaultIPv4",
                "127.0.0.1",
                "-defaultIPv6",
                "",
            ],
            &[],
            dir.join("challtestsrv.log"),
            lifetime,
        )?;

        say(&format!(
            "starting Pebble, a local ACME CA (https://127.0.0.1:{}/dir), validating HTTP-01 on Envoy's port {}",
            ports.acme, ports.http
        ));
        let listener_ca = write_pebble_listener_certificate(&dir)?;
        let pebble_config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{}", ports.acme),
                "managementListenAddress": format!("127.0.0.1:{}", ports.acme_management),
                "certificate": dir.join("pebble-cert.pem"),
                "privateKey": dir.join("pebble-key.pem"),
                "httpPort": ports.http,
                "tlsPort": free_port()?,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false
            }
        });
        std::fs::write(dir.join("pebble.json"), pebble_config.to_string())?;
        let pebble_config_path = dir.join("pebble.json").display().to_string();
        let dns_server = format!("127.0.0.1:{}", ports.dns);
        let pebble = Process::spawn(
            "pebble",
            Path::new("pebble"),
            &["-config", &pebble_config_path, "-dnsserver", &dns_server],
            // No nonce rejected on purpose (Pebble's default is 5%): a third badNonce in a row
            // fails an attempt, whose retry a minute later outlasts a test's wait.
            &[("PEBBLE_VA_NOSLEEP", "1"), ("PEBBLE_WFE_NONCEREJECT", "0")],
            dir.join("pebble.log"),
            lifetime,
        )?;
        let ca_root = dir.join("ca-root.pem");
        let listener_ca_arg = listener_ca.display().to_string();
        wait_until("Pebble", Duration::from_secs(20), || {
            let root = Command::new("curl")
                .args(["-sf", "--noproxy", "*", "--cacert", &listener_ca_arg])
                .arg(format!(
                    "https://127.0.0.1:{}/roots/0",
                    ports.acme_management
                ))
                .output()
                .ok()
                .filter(|o| o.status.success())?;
            // The mock DNS answers its management API once it is up.
            Command::new("curl")
                .args(["-sf", "--noproxy", "*", "-d", r#"{"host":"ready.test."}"#])
                .arg(format!("http://127.0.0.1:{}/clear-a", ports.dns_management))
                .output()
                .ok()
                .filter(|o| o.status.success())?;
            Some(root.stdout)
        })
        .and_then(|root| Ok(std::fs::write(&ca_root, root)?))
        .map_err(|e| anyhow!("{e:#}\nPebble's log:\n{}", pebble.log_tail(20)))?;

        let data_dir = dir.join("data");
        let sidecar_config = dir.join("autohttps.toml");
        std::fs::write(
            &sidecar_config,
            sidecar_toml(&ports, &data_dir, &listener_ca, &trusted_proxies)?,
        )?;
        let mut stack = Stack {
            ports,
            dir: dir.clone(),
            ca_root,
            sidecar_config,
            envoy: None,
            sidecar: None,
            _pebble: pebble,
            _challtestsrv: challtestsrv,
            _backend: backend,
            verbose,
            lifetime,
        };
        stack.start_sidecar()?;

        say(&format!(
            "starting Envoy (HTTP 127.0.0.1:{}, HTTPS 127.0.0.1:{}, admin 127.0.0.1:{}) with the autohttps filter",
            ports.http, ports.https, ports.envoy_admin
        ));
        let values = HashMap::from([
            ("LISTEN_ADDRESS", "127.0.0.1".to_string()),
            ("HTTP_PORT", ports.http.to_string()),
            ("HTTPS_PORT", ports.https.to_string()),
            ("ADMIN_PORT", ports.envoy_admin.to_string()),
            (
                "SDS_SOCKET",
                data_dir.join("sds.sock").display().to_string(),
            ),
            ("SIDECAR_HTTP_ADDRESS", "127.0.0.1".to_string()),
            ("SIDECAR_HTTP_PORT", ports.sidecar_internal.to_string()),
            ("BACKEND_ADDRESS", "127.0.0.1".to_string()),
            ("BACKEND_PORT", ports.backend.to_string()),
            ("WASM", envoy::filter_wasm()?.display().to_string()),
            (
                "TRUSTED_PROXY_RANGES",
                envoy::trusted_proxy_ranges(&trusted_proxies)?,
            ),
        ]);
        let mut yaml = render_file("edge.yaml", &values)?;
        if let Some(interval_ms) = feed_interval_ms {
            let shipped = r#""interval_ms": 1000"#;
            if !yaml.contains(shipped) {
                bail!("envoy/edge.yaml no longer sets {shipped}; update Stack::start");
            }
            yaml = yaml.replace(shipped, &format!(r#""interval_ms": {interval_ms}"#));
        }
        // Envoy's configuration and log sit beside the other parts' (envoy.yaml, envoy.log).
        stack.envoy = Some(Envoy::start_in_with_workers(
            &yaml,
            ports.envoy_admin,
            Some(&dir),
            lifetime,
            envoy_workers,
        )?);
        Ok(stack)
    }

    /// Starts the sidecar (again) and waits until its admin API answers.
    pub fn start_sidecar(&mut self) -> anyhow::Result<()> {
        if self.verbose {
            println!(
                "==> starting the autohttps sidecar (admin API 127.0.0.1:{}, internal 127.0.0.1:{}, data in {})",
                self.ports.sidecar_admin,
                self.ports.sidecar_internal,
                self.dir.join("data").display()
            );
        }
        let binary = sidecar_binary()?;
        let config = self.sidecar_config.display().to_string();
        let log_name = format!(
            "sidecar-{}.log",
            std::fs::read_dir(&self.dir)
                .map(|d| d.count())
                .unwrap_or_default()
        );
        let log = self.dir.join(log_name);
        let mut process = Process::spawn(
            "autohttps",
            &binary,
            &["--config", &config, "serve"],
            &[("RUST_LOG", "info")],
            log.clone(),
            self.lifetime,
        )?;
        let admin = self.ports.sidecar_admin;
        // The ports were picked free and released: something else may listen on one by now
        // (another test's Pebble answered the CLI once). Only the sidecar's own word that it
        // bound its listeners counts, not a connection to the port.
        let ready = wait_until("the sidecar", Duration::from_secs(20), || {
            if process.exited() {
                return None;
            }
            let serving = std::fs::read_to_string(&log)
                .is_ok_and(|text| text.contains("autohttps sidecar serving"));
            if !serving {
                return None;
            }
            TcpStream::connect(("127.0.0.1", admin)).ok()
        });
        if let Err(e) = ready {
            bail!("{e:#}\nthe sidecar's log:\n{}", process.log_tail(30));
        }
        self.sidecar = Some(process);
        Ok(())
    }

    /// SIGKILLs the sidecar (no chance to clean up).
    pub fn kill_sidecar(&mut self) {
        if let Some(mut process) = self.sidecar.take() {
            process.kill_hard();
        }
    }

    /// Every part's log file (Envoy, each sidecar run, Pebble, challtestsrv), sorted.
    pub fn log_files(&self) -> Vec<PathBuf> {
        let mut logs: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "log"))
            .collect();
        logs.sort();
        logs
    }

    /// The sidecar's log(s) so far, every run concatenated.
    pub fn sidecar_logs(&self) -> String {
        let mut logs: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map(|d| {
                d.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| {
                        p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.starts_with("sidecar-"))
                    })
                    .collect()
            })
            .unwrap_or_default();
        logs.sort();
        logs.iter()
            .map(|p| std::fs::read_to_string(p).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Stops Envoy and starts it again with the same configuration: it fetches every
    /// certificate anew from the sidecar's SDS.
    pub fn restart_envoy(&mut self) -> anyhow::Result<()> {
        if let Some(mut envoy) = self.envoy.take() {
            envoy.stop();
        }
        let yaml = std::fs::read_to_string(self.dir.join("envoy.yaml"))?;
        self.envoy = Some(Envoy::start(&yaml, self.ports.envoy_admin)?);
        Ok(())
    }

    /// The sidecar's SQLite database file.
    pub fn database(&self) -> PathBuf {
        self.dir.join("data").join("autohttps.db")
    }

    /// Envoy.
    pub fn envoy(&self) -> &Envoy {
        self.envoy
            .as_ref()
            .expect("Envoy runs while the stack is up")
    }

    /// Runs the `autohttps` CLI against this stack's sidecar.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<Output> {
        Ok(Command::new(sidecar_binary()?)
            .arg("--config")
            .arg(&self.sidecar_config)
            .args(args)
            .output()?)
    }

    /// Runs the CLI and fails with its output unless it succeeds.
    pub fn cli_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = self.cli(args)?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        if !output.status.success() {
            bail!("autohttps {} failed:\n{text}", args.join(" "));
        }
        Ok(text)
    }

    /// Calls the sidecar's admin API: (status, JSON body).
    pub fn admin(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        let url = format!("http://127.0.0.1:{}{path}", self.ports.sidecar_admin);
        let auth = format!("Authorization: Bearer {ADMIN_TOKEN}");
        let body_text = body.map(|b| b.to_string());
        let mut args = vec![
            "-X",
            method,
            "-H",
            &auth,
            "-H",
            "content-type: application/json",
        ];
        if let Some(text) = &body_text {
            args.extend(["--data", text.as_str()]);
        }
        args.push(&url);
        let response = curl(&args)?;
        let json = if response.body.trim().is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&response.body)
                .with_context(|| format!("admin API answered non-JSON: {}", response.body))?
        };
        Ok((response.status, json))
    }

    /// Makes `host` resolve to `address` only in the mock DNS.
    pub fn set_dns(&self, host: &str, address: &str) -> anyhow::Result<()> {
        for (path, body) in [
            ("clear-a", serde_json::json!({ "host": format!("{host}.") })),
            (
                "add-a",
                serde_json::json!({ "host": format!("{host}."), "addresses": [address] }),
            ),
        ] {
            let url = format!("http://127.0.0.1:{}/{path}", self.ports.dns_management);
            let body = body.to_string();
            let response = curl(&["--data", &body, &url])?;
            if response.status != 200 {
                bail!("challtestsrv {path} answered {}", response.status);
            }
        }
        Ok(())
    }

    /// Waits (up to `within`) until `host` answers `path` over HTTPS with a report-only CSP,
    /// i.e. a report-mode site whose policy has reached Envoy, and returns the page, that
    /// header, and the `report-uri` in it (path and query, with the site's token).
    pub fn report_only_page(
        &self,
        host: &str,
        path: &str,
        within: Duration,
    ) -> anyhow::Result<(CurlResponse, String, String)> {
        const HEADER: &str = "content-security-policy-report-only";
        let page = wait_until("the report-only policy", within, || {
            self.https(host, path)
                .ok()
                .filter(|r| r.header(HEADER).is_some())
        })?;
        let policy = page.header(HEADER).unwrap_or_default().to_string();
        let report_uri = policy
            .split("report-uri ")
            .nth(1)
            .and_then(|rest| rest.split(';').next())
            .map(|uri| uri.trim().to_string())
            .ok_or_else(|| anyhow::anyhow!("no report-uri in {policy:?}"))?;
        Ok((page, policy, report_uri))
    }

    /// GET over HTTPS through Envoy with SNI `host`, trusting only Pebble's root.
    pub fn https(&self, host: &str, path: &str) -> anyhow::Result<CurlResponse> {
        let url = format!("https://{host}:{}{path}", self.ports.https);
        let resolve = format!("{host}:{}:127.0.0.1", self.ports.https);
        let ca = self.ca_root.display().to_string();
        curl(&["--cacert", &ca, "--resolve", &resolve, &url])
    }

    /// GET over plain HTTP through Envoy with Host `host`.
    pub fn http(&self, host: &str, path: &str) -> anyhow::Result<CurlResponse> {
        let url = format!("http://{host}:{}{path}", self.ports.http);
        let resolve = format!("{host}:{}:127.0.0.1", self.ports.http);
        curl(&["--resolve", &resolve, &url])
    }

    /// The certificate Envoy presents for this SNI (or none): its subject alternative names
    /// and serial, from `openssl s_client`. Errors when the handshake fails.
    pub fn presented_certificate(&self, sni: Option<&str>) -> anyhow::Result<PresentedCertificate> {
        let mut command = Command::new("openssl");
        command
            .args(["s_client", "-connect"])
            .arg(format!("127.0.0.1:{}", self.ports.https));
        match sni {
            Some(name) => command.args(["-servername", name]),
            None => command.arg("-noservername"),
        };
        let output = command
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .stdout(Stdio::piped())
            .output()?;
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let begin = text.find("-----BEGIN CERTIFICATE-----");
        let end = text.find("-----END CERTIFICATE-----");
        let (Some(begin), Some(end)) = (begin, end) else {
            bail!(
                "no certificate presented for SNI {sni:?}: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        };
        let pem = &text[begin..end + "-----END CERTIFICATE-----".len()];
        let mut x509 = Command::new("openssl")
            .args(["x509", "-noout", "-serial", "-ext", "subjectAltName"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        x509.stdin
            .take()
            .ok_or_else(|| anyhow!("openssl x509 stdin"))?
            .write_all(pem.as_bytes())?;
        let details = String::from_utf8_lossy(&x509.wait_with_output()?.stdout).into_owned();
        let serial = details
            .lines()
            .find_map(|l| l.strip_prefix("serial="))
            .unwrap_or_default()
            .to_ascii_lowercase();
        let names = details
            .lines()
            .flat_map(|l| l.split(','))
            .filter_map(|item| item.trim().strip_prefix("DNS:"))
            .map(str::to_string)
            .collect();
        Ok(PresentedCertificate { serial, names })
    }
}

/// What a handshake presented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresentedCertificate {
    /// Serial, lower-case hex.
    pub serial: String,
    /// DNS subject alternative names.
    pub names: Vec<String>,
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

/// Pebble's own HTTPS listener needs a certificate (none ships with the package): a throwaway
/// CA and a leaf for 127.0.0.1, made with openssl. Returns the CA file to trust.
fn write_pebble_listener_certificate(dir: &Path) -> anyhow::Result<PathBuf> {
    let ca_key = dir.join("pebble-listener-ca-key.pem");
    let ca = dir.join("pebble-listener-ca.pem");
    let csr = dir.join("pebble.csr");
    let ext = dir.join("pebble-ext.cnf");
    std::fs::write(
        &ext,
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )?;
    let steps: [Vec<String>; 3] = [
        vec![
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "30",
            "-subj",
            "/CN=autohttps local Pebble listener CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-keyout",
        ]
        .into_iter()
        .map(String::from)
        .chain([
            ca_key.display().to_string(),
            "-out".into(),
            ca.display().to_string(),
        ])
        .collect(),
        vec![
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
        ]
        .into_iter()
        .map(String::from)
        .chain([
            dir.join("pebble-key.pem").display().to_string(),
            "-out".into(),
            csr.display().to_string(),
        ])
        .collect(),
        vec!["x509", "-req", "-days", "30", "-in"]
            .into_iter()
            .map(String::from)
            .chain([
                csr.display().to_string(),
                "-CA".into(),
                ca.display().to_string(),
                "-CAkey".into(),
                ca_key.display().to_string(),
                "-CAcreateserial".into(),
                "-extfile".into(),
                ext.display().to_string(),
                "-out".into(),
                dir.join("pebble-cert.pem").display().to_string(),
            ])
            .collect(),
    ];
    for args in steps {
        let output = Command::new("openssl").args(&args).output()?;
        if !output.status.success() {
            bail!(
                "openssl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
    Ok(ca)
}

fn sidecar_toml(
    ports: &Ports,
    data_dir: &Path,
    listener_ca: &Path,
    trusted_proxies: &[String],
) -> anyhow::Result<String> {
    Ok(format!(
        r#"# autohttps sidecar configuration for a local stack (written by autohttps_tests::stack).
data_dir = "{data}"

[listen]
admin = "127.0.0.1:{admin}"
internal = "127.0.0.1:{internal}"
metrics = "127.0.0.1:0"  # any free port: stacks run side by side in tests

[admin]
token = "{ADMIN_TOKEN}"

[acme]
# Pebble, the local ACME CA; its HTTPS listener is signed by this throwaway CA.
directory_url = "https://127.0.0.1:{acme}/dir"
extra_root_ca = "{listener_ca}"
debounce_ms = 100

[platform]
addresses = ["127.0.0.1"]

[dns]
nameservers = ["127.0.0.1:{dns}"]

[sds]
socket = "{data}/sds.sock"

[edge]
http_port = {http}
https_port = {https}
trusted_proxies = {trusted_proxies}
"#,
        data = data_dir.display(),
        admin = ports.sidecar_admin,
        internal = ports.sidecar_internal,
        acme = ports.acme,
        listener_ca = listener_ca.display(),
        dns = ports.dns,
        http = ports.http,
        https = ports.https,
        trusted_proxies = serde_json::to_string(trusted_proxies)?,
    ))
}
