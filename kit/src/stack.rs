//! The whole autohttps stack on loopback: Pebble and pebble-challtestsrv (the ACME CA and its
//! mock DNS), the `autohttps` sidecar binary, Envoy with `envoy/edge.yaml` and the filter, and
//! a small demo backend. `make run` (`autohttps-demo`) and the whole-stack suites start it
//! through [`Stack`].
//!
//! Every process runs under `timeout` and is stopped when the [`Stack`] is dropped; a test's
//! stack also stops by itself after an hour if whoever started it dies ([`Lifetime`]), while
//! `make run`'s lives until Ctrl-C.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};

use crate::admin::AdminClient;
use crate::envoy::{self, Envoy};
use crate::http::{CurlResponse, curl};
use crate::pebble::{Pebble, PebbleOptions};
use crate::render::{render, render_file, trusted_proxy_ranges};
pub use crate::sidecar::sidecar_binary;
use crate::sidecar::{EdgeSettings, SidecarConfig};
pub use crate::{Lifetime, wait_until};
use crate::{Process, free_port, repo_root};

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
            dns: free_port()?,
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
        let template_path = repo_root().join("tests/trusted-proxy/nginx.conf");
        let template = std::fs::read_to_string(&template_path)
            .with_context(|| format!("reading {}", template_path.display()))?;
        let conf = render(
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
    pebble: Pebble,
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

        let pebble = Pebble::start(&PebbleOptions {
            dir: dir.clone(),
            http_port: ports.http,
            acme_port: ports.acme,
            management_port: ports.acme_management,
            dns_port: ports.dns,
            dns_management_port: ports.dns_management,
            env: Vec::new(),
            lifetime,
            verbose,
        })?;
        let ca_root = dir.join("ca-root.pem");
        std::fs::write(&ca_root, pebble.root_pem()?)?;

        let data_dir = dir.join("data");
        let sidecar_config = dir.join("autohttps.toml");
        SidecarConfig {
            sds_socket: Some(data_dir.join("sds.sock")),
            edge: Some(EdgeSettings {
                http_port: ports.http,
                https_port: ports.https,
                trusted_proxies: trusted_proxies.clone(),
            }),
            ..SidecarConfig::for_pebble(
                &pebble,
                &data_dir,
                ports.sidecar_admin,
                ports.sidecar_internal,
                ADMIN_TOKEN,
            )
        }
        .write(&sidecar_config)?;
        let mut stack = Stack {
            ports,
            dir: dir.clone(),
            ca_root,
            sidecar_config,
            envoy: None,
            sidecar: None,
            pebble,
            _backend: backend,
            verbose,
            lifetime,
        };
        stack.start_sidecar()?;

        say(&format!(
            "starting Envoy (HTTP 127.0.0.1:{}, HTTPS 127.0.0.1:{}, admin 127.0.0.1:{}) with the autohttps filter",
            ports.http, ports.https, ports.envoy_admin
        ));
        let yaml = edge_yaml("127.0.0.1", &ports, &data_dir, &trusted_proxies)?;
        // Envoy's configuration and log sit beside the other parts' (envoy.yaml, envoy.log).
        stack.envoy = Some(Envoy::start_in(
            &yaml,
            ports.envoy_admin,
            Some(&dir),
            lifetime,
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
        let process = spawn_sidecar(
            &self.sidecar_config,
            &self.dir,
            self.ports.sidecar_admin,
            self.lifetime,
        )?;
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

    /// Stops Envoy and starts it again from the same configuration with `workers` worker
    /// threads (`--concurrency`; each runs its own filter VM beside the main thread's) and, with
    /// `policy_poll_ms`, the filter's fallback poll at that interval instead of the shipped
    /// one: set it long and a change can reach the VMs in time only through the long poll.
    /// Envoy's log is then in a folder of its own ([`Envoy::log_path`]).
    pub fn restart_envoy_with(
        &mut self,
        workers: u32,
        policy_poll_ms: Option<u64>,
    ) -> anyhow::Result<()> {
        if let Some(mut envoy) = self.envoy.take() {
            envoy.stop();
        }
        let mut yaml = std::fs::read_to_string(self.dir.join("envoy.yaml"))?;
        if let Some(ms) = policy_poll_ms {
            yaml = crate::envoy::with_policy_poll(&yaml, ms)?;
        }
        self.envoy = Some(Envoy::start_workers(
            &yaml,
            self.ports.envoy_admin,
            workers,
        )?);
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
        admin_call(self.ports.sidecar_admin, method, path, body)
    }

    /// A client of the sidecar's admin API with the stack's token.
    pub fn admin_client(&self) -> AdminClient {
        AdminClient::new(
            &format!("http://127.0.0.1:{}", self.ports.sidecar_admin),
            ADMIN_TOKEN,
        )
    }

    /// Makes `host` resolve to `address` only in the mock DNS.
    pub fn set_dns(&self, host: &str, address: &str) -> anyhow::Result<()> {
        self.pebble.set_a(host, address)
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

/// Envoy's configuration for an edge (`envoy/edge.yaml` rendered): public listeners on
/// `address` at `ports.http`/`ports.https`, admin on 127.0.0.1:`ports.envoy_admin`, SDS from
/// the sidecar's socket in `data_dir`, the policy feed and challenges from the sidecar's
/// internal listener, the demo backend upstream, and `trusted_proxies` as Envoy ranges.
pub fn edge_yaml(
    address: &str,
    ports: &Ports,
    data_dir: &Path,
    trusted_proxies: &[String],
) -> anyhow::Result<String> {
    let values = HashMap::from([
        ("LISTEN_ADDRESS", address.to_string()),
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
            trusted_proxy_ranges(trusted_proxies)?,
        ),
    ]);
    render_file("edge.yaml", &values)
}

/// Starts `autohttps --config <config> serve`, its log a new `sidecar-<n>.log` in `dir`, and
/// waits until it says it serves and its admin API (127.0.0.1:`admin_port`) accepts.
pub fn spawn_sidecar(
    config: &Path,
    dir: &Path,
    admin_port: u16,
    lifetime: Lifetime,
) -> anyhow::Result<Process> {
    let binary = sidecar_binary()?;
    let config = config.display().to_string();
    let log_name = format!(
        "sidecar-{}.log",
        std::fs::read_dir(dir)
            .map(|d| d.count())
            .unwrap_or_default()
    );
    let log = dir.join(log_name);
    let mut process = Process::spawn(
        "autohttps",
        &binary,
        &["--config", &config, "serve"],
        &[("RUST_LOG", "info")],
        log.clone(),
        lifetime,
    )?;
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
        TcpStream::connect(("127.0.0.1", admin_port)).ok()
    });
    if let Err(e) = ready {
        bail!("{e:#}\nthe sidecar's log:\n{}", process.log_tail(30));
    }
    Ok(process)
}

/// Calls the admin API on 127.0.0.1:`admin_port` with the kit's token: (status, JSON body;
/// `null` when empty). A body that is not JSON is an error naming it.
pub fn admin_call(
    admin_port: u16,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> anyhow::Result<(u16, serde_json::Value)> {
    let (status, text) = AdminClient::new(&format!("http://127.0.0.1:{admin_port}"), ADMIN_TOKEN)
        .call_raw(method, path, body, Some(ADMIN_TOKEN))?;
    let json = if text.trim().is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(&text)
            .with_context(|| format!("admin API answered non-JSON: {text}"))?
    };
    Ok((status, json))
}

/// What a handshake presented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresentedCertificate {
    /// Serial, lower-case hex.
    pub serial: String,
    /// DNS subject alternative names.
    pub names: Vec<String>,
}
