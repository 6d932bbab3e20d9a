//! Test harness: a real Pebble ACME server and pebble-challtestsrv DNS, the sidecar in-process
//! or as the real `autohttps` binary, and a TCP gate that can hold Pebble's HTTP-01 requests.
#![allow(dead_code)]

pub mod ca_proxy;
pub mod pg_cluster;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use autohttps_sidecar::clock::Clock;
use autohttps_sidecar::config::Config;
use autohttps_sidecar::service::{RunningSidecar, Sidecar};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The admin token every test sidecar uses.
pub const TOKEN: &str = "test-admin-token-0123456789";

mod ports;
/// Loopback ports below the ephemeral range (free for TCP and UDP, so also for the mock DNS).
pub use ports::free_port;

/// Child processes killed (SIGKILL) and reaped on drop.
#[derive(Debug, Default)]
pub struct Processes(Vec<Child>);

impl Processes {
    fn push(&mut self, child: Child) {
        self.0.push(child);
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A running Pebble + pebble-challtestsrv pair, stopped on drop.
#[derive(Debug)]
pub struct Pebble {
    /// ACME directory URL.
    pub directory_url: String,
    /// Pebble's management base URL (roots, intermediates).
    pub management_url: String,
    /// challtestsrv's management base URL.
    pub challtestsrv_url: String,
    /// challtestsrv's mock DNS server.
    pub dns: SocketAddr,
    /// The CA certificate that signed Pebble's own HTTPS listener certificate (PEM file).
    pub listener_ca: PathBuf,
    /// The port Pebble validates HTTP-01 on.
    pub http_port: u16,
    /// The listener on `http_port`, bound before Pebble learnt the port and held until a
    /// sidecar or gate takes it, so that no one else can take the port meanwhile.
    http_listener: Mutex<Option<std::net::TcpListener>>,
    http: reqwest::Client,
    dir: TempDir,
    processes: Processes,
}

impl Pebble {
    /// Starts challtestsrv and Pebble (PEBBLE_VA_NOSLEEP=1, PEBBLE_WFE_NONCEREJECT=0)
    /// validating HTTP-01 on a loopback port bound here and held: [`start_sidecar`] serves the
    /// sidecar's internal listener on it (or a [`Gate`] takes it with
    /// [`Pebble::take_http_listener`]).
    ///
    /// Pebble's and challtestsrv's own ports are picked free then released (they are other
    /// processes), so a parallel test or another process can take one first; a start that
    /// does not come up is retried on fresh ports.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with_env(&[]).await
    }

    /// Like [`Pebble::start`], with extra environment for Pebble (e.g.
    /// `PEBBLE_WFE_NONCEREJECT=50` to reject half of the nonces).
    pub async fn start_with_env(env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let mut pebble = Self::start_on_with_env(listener.local_addr()?.port(), env).await?;
        pebble.http_listener = Mutex::new(Some(listener));
        Ok(pebble)
    }

    /// Like [`Pebble::start`], validating HTTP-01 on `http_port`, which the caller binds (the
    /// `autohttps` binary as a child process, which cannot be handed a listener).
    pub async fn start_on(http_port: u16) -> anyhow::Result<Self> {
        Self::start_on_with_env(http_port, &[]).await
    }

    async fn start_on_with_env(http_port: u16, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let mut last_error = None;
        for _ in 0..3 {
            match Self::start_once(http_port, env).await {
                Ok(pebble) => return Ok(pebble),
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.expect("at least one attempt"))
    }

    /// The held listener on [`Pebble::http_port`], once (`None` for [`Pebble::start_on`]).
    pub fn take_http_listener(&self) -> Option<std::net::TcpListener> {
        self.http_listener.lock().expect("listener").take()
    }

    async fn start_once(http_port: u16, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        autohttps_sidecar::acme::install_crypto_provider();
        let dir = tempfile::tempdir()?;
        // Pebble's HTTPS listener: a throwaway CA and a leaf for localhost / 127.0.0.1.
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate()?;
        let leaf = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?
            .signed_by(&leaf_key, &issuer)?;
        let listener_ca = dir.path().join("listener-ca.pem");
        std::fs::write(&listener_ca, ca_cert.pem())?;
        std::fs::write(dir.path().join("cert.pem"), leaf.pem())?;
        std::fs::write(dir.path().join("key.pem"), leaf_key.serialize_pem())?;

        let dns_port = free_port();
        let challtestsrv_port = free_port();
        let acme_port = free_port();
        let management_port = free_port();
        let mut processes = Processes::default();
        let challtestsrv_log = std::fs::File::create(dir.path().join("challtestsrv.log"))?;
        processes.push(
            Command::new("pebble-challtestsrv")
                .args([
                    "-http01",
                    "",
                    "-https01",
                    "",
                    "-tlsalpn01",
                    "",
                    "-dns01",
                    &format!("127.0.0.1:{dns_port}"),
                    "-management",
                    &format!("127.0.0.1:{challtestsrv_port}"),
                    "-defaultIPv4",
                    "127.0.0.1",
                    "-defaultIPv6",
                    "",
                ])
                .stdout(challtestsrv_log.try_clone()?)
                .stderr(challtestsrv_log)
                .spawn()
                .context("starting pebble-challtestsrv (apt-get install pebble)")?,
        );
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{acme_port}"),
                "managementListenAddress": format!("127.0.0.1:{management_port}"),
                "certificate": dir.path().join("cert.pem"),
                "privateKey": dir.path().join("key.pem"),
                "httpPort": http_port,
                "tlsPort": free_port(),
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false
            }
        });
        let config_path = dir.path().join("pebble.json");
        std::fs::write(&config_path, config.to_string())?;
        let log = std::fs::File::create(dir.path().join("pebble.log"))?;
        processes.push(
            Command::new("pebble")
                .arg("-config")
                .arg(&config_path)
                .arg("-dnsserver")
                .arg(format!("127.0.0.1:{dns_port}"))
                .env("PEBBLE_VA_NOSLEEP", "1")
                // Pebble rejects 5% of nonces by design; instant-acme retries a badNonce twice,
                // so about one order in a hundred failed its attempt and waited a minute for
                // the retry (a flaky adding_alias test). Nonce faults have their own tests
                // (`PEBBLE_WFE_NONCEREJECT=50` through `env`, which overrides this).
                .env("PEBBLE_WFE_NONCEREJECT", "0")
                .envs(env.iter().copied())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("starting pebble (apt-get install pebble)")?,
        );
        let http = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(ca_cert.pem().as_bytes())?)
            .no_proxy()
            .build()?;
        let pebble = Self {
            directory_url: format!("https://127.0.0.1:{acme_port}/dir"),
            management_url: format!("https://127.0.0.1:{management_port}"),
            challtestsrv_url: format!("http://127.0.0.1:{challtestsrv_port}"),
            dns: SocketAddr::from(([127, 0, 0, 1], dns_port)),
            listener_ca,
            http_port,
            http_listener: Mutex::new(None),
            http,
            dir,
            processes,
        };
        pebble.wait_ready().await?;
        Ok(pebble)
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pebble_up = self
                .http
                .get(&self.directory_url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            let dns_up = reqwest::Client::new()
                .post(format!("{}/clear-a", self.challtestsrv_url))
                .json(&serde_json::json!({ "host": "ready.test." }))
                .send()
                .await
                .is_ok();
            // challtestsrv only logs a server it could not start (its DNS port, picked free and
            // released, may have been taken meanwhile) and answers its management API anyway.
            let challtestsrv_log =
                std::fs::read_to_string(self.dir.path().join("challtestsrv.log"))
                    .unwrap_or_default();
            if challtestsrv_log.contains("address already in use") {
                bail!("pebble-challtestsrv lost a port; its log: {challtestsrv_log}");
            }
            if pebble_up && dns_up {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "pebble did not come up; its log: {}\nchalltestsrv's log: {challtestsrv_log}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Pebble's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pebble.log")).unwrap_or_default()
    }

    /// Orders Pebble created so far (its "Added order" log lines): what the CA saw, including
    /// any order the sidecar never recorded.
    pub fn orders_created(&self) -> usize {
        self.log().matches("Added order").count()
    }

    /// The certificate and key of Pebble's own HTTPS listener (for a proxy posing as Pebble).
    pub fn listener_identity(&self) -> (PathBuf, PathBuf) {
        (
            self.dir.path().join("cert.pem"),
            self.dir.path().join("key.pem"),
        )
    }

    /// Makes `host` resolve (A) to `address` only, in the mock DNS.
    pub async fn set_a(&self, host: &str, address: &str) -> anyhow::Result<()> {
        let response = reqwest::Client::new()
            .post(format!("{}/clear-a", self.challtestsrv_url))
            .json(&serde_json::json!({ "host": format!("{host}.") }))
            .send()
            .await?;
        anyhow::ensure!(
            response.status().is_success(),
            "clear-a: {}",
            response.status()
        );
        let response = reqwest::Client::new()
            .post(format!("{}/add-a", self.challtestsrv_url))
            .json(&serde_json::json!({ "host": format!("{host}."), "addresses": [address] }))
            .send()
            .await?;
        anyhow::ensure!(
            response.status().is_success(),
            "add-a: {}",
            response.status()
        );
        Ok(())
    }

    /// Pebble's current root CA (PEM).
    pub async fn root_pem(&self) -> anyhow::Result<String> {
        Ok(self
            .http
            .get(format!("{}/roots/0", self.management_url))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?)
    }

    /// A sidecar configuration pointing at this Pebble and its DNS, data in `data_dir`.
    pub fn sidecar_config(&self, data_dir: &Path, internal_port: u16) -> Config {
        let mut config = Config {
            data_dir: data_dir.to_owned(),
            ..Config::default()
        };
        config.listen.admin = SocketAddr::from(([127, 0, 0, 1], 0));
        config.listen.internal = SocketAddr::from(([127, 0, 0, 1], internal_port));
        config.listen.metrics = SocketAddr::from(([127, 0, 0, 1], 0));
        config.admin.token = Some(TOKEN.into());
        config.acme.directory_url = self.directory_url.clone();
        config.acme.extra_root_ca = Some(self.listener_ca.clone());
        config.acme.debounce_ms = 100;
        config.platform.addresses = vec!["127.0.0.1".parse().expect("address")];
        config.dns.nameservers = vec![self.dns];
        config
    }

    /// The same configuration as TOML, for the `autohttps` binary.
    pub fn sidecar_toml(&self, data_dir: &Path, admin_port: u16, internal_port: u16) -> String {
        format!(
            r#"data_dir = "{data}"
[listen]
admin = "127.0.0.1:{admin_port}"
internal = "127.0.0.1:{internal_port}"
metrics = "127.0.0.1:0"
[admin]
token = "{TOKEN}"
[acme]
directory_url = "{directory}"
extra_root_ca = "{ca}"
debounce_ms = 100
[platform]
addresses = ["127.0.0.1"]
[dns]
nameservers = ["{dns}"]
"#,
            data = data_dir.display(),
            directory = self.directory_url,
            ca = self.listener_ca.display(),
            dns = self.dns,
        )
    }
}

/// The sidecar running in this process, with its own data directory.
#[derive(Debug)]
pub struct InProcess {
    pub running: RunningSidecar,
    pub admin: Admin,
    pub data: TempDir,
}

/// Starts an in-process sidecar against `pebble`, with HTTP-01 answered on Pebble's port.
pub async fn start_sidecar(pebble: &Pebble, clock: Arc<dyn Clock>) -> anyhow::Result<InProcess> {
    start_sidecar_with(pebble, clock, |_| {}).await
}

/// Like [`start_sidecar`], with a chance to adjust the configuration.
///
/// When the internal listener stays on Pebble's HTTP-01 port, the sidecar serves on the
/// listener Pebble's harness has held since it picked the port.
pub async fn start_sidecar_with(
    pebble: &Pebble,
    clock: Arc<dyn Clock>,
    adjust: impl FnOnce(&mut Config),
) -> anyhow::Result<InProcess> {
    let data = tempfile::tempdir()?;
    let mut config = pebble.sidecar_config(&data.path().join("data"), pebble.http_port);
    adjust(&mut config);
    let held = (config.listen.internal.port() == pebble.http_port)
        .then(|| pebble.take_http_listener())
        .flatten();
    let sidecar = Sidecar::build(config, clock)?;
    let running = match held {
        Some(internal) => {
            internal.set_nonblocking(true)?;
            let admin = TcpListener::bind(sidecar.config.listen.admin).await?;
            sidecar
                .serve_on(admin, TcpListener::from_std(internal)?, axum::Router::new())
                .await?
        }
        None => sidecar.serve(axum::Router::new()).await?,
    };
    let admin = Admin::new(&format!("http://{}", running.admin_addr));
    Ok(InProcess {
        running,
        admin,
        data,
    })
}

/// A small admin API client for tests.
#[derive(Debug, Clone)]
pub struct Admin {
    pub base: String,
    http: reqwest::Client,
}

impl Admin {
    pub fn new(base: &str) -> Self {
        Self {
            base: base.to_owned(),
            http: reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("client"),
        }
    }

    /// Sends a request with the test token; returns status and JSON body.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        self.call_with_token(method, path, body, Some(TOKEN)).await
    }

    pub async fn call_with_token(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
        token: Option<&str>,
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let text = response.text().await?;
        let json = if text.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))
        };
        Ok((status, json))
    }

    /// Polls the certificate status until `done` accepts it.
    pub async fn wait_for(
        &self,
        site: &str,
        timeout: Duration,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> anyhow::Result<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let (status, body) = self
                .call(
                    reqwest::Method::GET,
                    &format!("/v1/sites/{site}/certificates"),
                    None,
                )
                .await?;
            if status == 200 && done(&body) {
                return Ok(body);
            }
            if Instant::now() > deadline {
                let (_, events) = self
                    .call(
                        reqwest::Method::GET,
                        &format!("/v1/sites/{site}/events"),
                        None,
                    )
                    .await?;
                bail!("timed out waiting on {site}: status {body:#}\nevents {events:#}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The site's events, oldest first.
    pub async fn events(&self, site: &str) -> anyhow::Result<Vec<serde_json::Value>> {
        let (_, events) = self
            .call(
                reqwest::Method::GET,
                &format!("/v1/sites/{site}/events?limit=1000"),
                None,
            )
            .await?;
        let mut events = events.as_array().cloned().unwrap_or_default();
        events.reverse();
        Ok(events)
    }
}

/// Names of every certificate in a status body.
pub fn certificate_names(status: &serde_json::Value) -> Vec<Vec<String>> {
    status["certificates"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            c["names"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|n| n.as_str().map(str::to_owned))
                .collect()
        })
        .collect()
}

/// A TCP gate in front of the sidecar's HTTP-01 listener: while closed it accepts Pebble's
/// connections, reads the request head (remembering the path) and holds them; opening it
/// forwards them (and any later ones) to the target port.
#[derive(Debug)]
pub struct Gate {
    open: watch::Sender<bool>,
    held_paths: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Gate {
    pub async fn start(listen_port: u16, target_port: u16) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", listen_port)).await?;
        Self::start_on(listener, target_port)
    }

    /// A gate on a listener already bound (e.g. [`Pebble::take_http_listener`]).
    pub fn start_on_std(listener: std::net::TcpListener, target_port: u16) -> anyhow::Result<Self> {
        listener.set_nonblocking(true)?;
        Self::start_on(TcpListener::from_std(listener)?, target_port)
    }

    fn start_on(listener: TcpListener, target_port: u16) -> anyhow::Result<Self> {
        let (open, opened) = watch::channel(false);
        let held_paths = Arc::new(Mutex::new(Vec::new()));
        let paths = Arc::clone(&held_paths);
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut opened = opened.clone();
                let paths = Arc::clone(&paths);
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buffer = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match inbound.read(&mut buffer).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buffer[..n]),
                        }
                    }
                    let path = String::from_utf8_lossy(&head)
                        .split_whitespace()
                        .nth(1)
                        .unwrap_or("")
                        .to_owned();
                    paths.lock().expect("paths").push(path);
                    if opened.wait_for(|open| *open).await.is_err() {
                        return;
                    }
                    let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target_port)).await
                    else {
                        return;
                    };
                    if outbound.write_all(&head).await.is_ok() {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Ok(Self {
            open,
            held_paths,
            task,
        })
    }

    /// Distinct paths of requests received so far (Pebble validates from several perspectives).
    pub fn held_paths(&self) -> Vec<String> {
        let mut paths = self.held_paths.lock().expect("paths").clone();
        paths.sort();
        paths.dedup();
        paths
    }

    /// Lets held and future requests through.
    pub fn open(&self) {
        let _ = self.open.send(true);
    }

    /// Holds requests again (from the next connection on).
    pub fn close(&self) {
        let _ = self.open.send(false);
    }

    /// Forgets the paths seen so far.
    pub fn clear_held_paths(&self) {
        self.held_paths.lock().expect("paths").clear();
    }
}

/// Waits until `check` returns true, or fails after `timeout`.
pub async fn eventually(
    what: &str,
    timeout: Duration,
    mut check: impl AsyncFnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !check().await {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Ok(())
}

/// The `autohttps serve` binary as a child process, SIGKILLed on drop.
#[derive(Debug)]
pub struct SidecarProcess {
    child: Option<Child>,
    pub log: PathBuf,
}

impl SidecarProcess {
    pub fn spawn(config: &Path, log: &Path) -> anyhow::Result<Self> {
        Self::spawn_with(config, log, &[])
    }

    /// `autohttps serve --config CONFIG ARGS…`, its output (stdout and stderr, not a
    /// terminal) appended to `log`.
    pub fn spawn_with(config: &Path, log: &Path, args: &[&str]) -> anyhow::Result<Self> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let child = Command::new(env!("CARGO_BIN_EXE_autohttps"))
            .arg("serve")
            .arg("--config")
            .arg(config)
            .args(args)
            .env("RUST_LOG", "info")
            .env_remove("AUTOHTTPS_ADMIN_TOKEN")
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()?;
        Ok(Self {
            child: Some(child),
            log: log.to_owned(),
        })
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for SidecarProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
