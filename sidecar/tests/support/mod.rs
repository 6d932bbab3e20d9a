//! Test harness: a real Pebble ACME server and pebble-challtestsrv DNS, the sidecar in-process
//! or as the real `autohttps` binary, and a TCP gate that can hold Pebble's HTTP-01 requests.
#![allow(dead_code)]

pub mod ca_proxy;
/// A throwaway PostgreSQL (the kit's).
#[allow(unused_imports)] // only the store suites use it
pub use autohttps_kit::pg as pg_cluster;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use autohttps_kit::process::LogMode;
use autohttps_kit::{Lifetime, Process};
use autohttps_sidecar::clock::Clock;
use autohttps_sidecar::config::Config;
use autohttps_sidecar::service::{RunningSidecar, Sidecar};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The admin token every test sidecar uses.
pub const TOKEN: &str = "test-admin-token-0123456789";

/// The longest a process started by a sidecar test may live.
const TEST_LIFETIME: Lifetime = Lifetime::Limited(Duration::from_secs(900));

/// A loopback port below the ephemeral range, free for TCP and UDP (the kit's allocator).
pub fn free_port() -> u16 {
    autohttps_kit::free_port().expect("a free loopback port")
}

/// The kit's Pebble + pebble-challtestsrv (files in a temporary folder), with the listener
/// Pebble validates HTTP-01 on held for an in-process sidecar; stopped on drop.
#[derive(Debug)]
pub struct Pebble {
    kit: autohttps_kit::pebble::Pebble,
    /// The listener on `http_port`, bound before Pebble learnt the port and held until a
    /// sidecar or gate takes it, so that no one else can take the port meanwhile.
    http_listener: Mutex<Option<std::net::TcpListener>>,
    _dir: TempDir,
}

impl std::ops::Deref for Pebble {
    type Target = autohttps_kit::pebble::Pebble;

    fn deref(&self) -> &Self::Target {
        &self.kit
    }
}

impl Pebble {
    /// Starts challtestsrv and Pebble validating HTTP-01 on a loopback port bound here and
    /// held: [`start_sidecar`] serves the sidecar's internal listener on it (or a [`Gate`]
    /// takes it with [`Pebble::take_http_listener`]).
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
        autohttps_sidecar::acme::install_crypto_provider();
        let dir = tempfile::tempdir()?;
        let path = dir.path().to_path_buf();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        // The kit waits for Pebble by polling: off the test's runtime thread.
        let kit = tokio::task::spawn_blocking(move || {
            let env: Vec<(&str, &str)> =
                env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            autohttps_kit::pebble::Pebble::start_on_free_ports(
                &path,
                http_port,
                &env,
                TEST_LIFETIME,
            )
        })
        .await??;
        Ok(Self {
            kit,
            http_listener: Mutex::new(None),
            _dir: dir,
        })
    }

    /// The held listener on [`Pebble::http_port`], once (`None` for [`Pebble::start_on`]).
    pub fn take_http_listener(&self) -> Option<std::net::TcpListener> {
        self.http_listener.lock().expect("listener").take()
    }

    /// Makes `host` resolve (A) to `address` only, in the mock DNS.
    pub async fn set_a(&self, host: &str, address: &str) -> anyhow::Result<()> {
        self.kit.set_a(host, address)
    }

    /// Pebble's current root CA (PEM).
    pub async fn root_pem(&self) -> anyhow::Result<String> {
        self.kit.root_pem()
    }

    /// A sidecar configuration pointing at this Pebble and its DNS, data in `data_dir`, admin
    /// API on any free port: the kit's configuration file ([`Pebble::sidecar_toml`]) read by
    /// the sidecar's own parser.
    pub fn sidecar_config(&self, data_dir: &Path, internal_port: u16) -> Config {
        let text = self.sidecar_toml(data_dir, 0, internal_port);
        Config::from_toml(&text).unwrap_or_else(|e| panic!("the kit's configuration: {e}\n{text}"))
    }

    /// The same configuration as TOML, for the `autohttps` binary (the kit's typed
    /// configuration, which `kit_config` checks against the sidecar's loader).
    pub fn sidecar_toml(&self, data_dir: &Path, admin_port: u16, internal_port: u16) -> String {
        autohttps_kit::sidecar::SidecarConfig::for_pebble(
            &self.kit,
            data_dir,
            admin_port,
            internal_port,
            TOKEN,
        )
        .to_toml()
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

/// The kit's admin API client, for async tests: each call runs off the runtime's threads, so
/// an in-process sidecar on the same runtime keeps serving meanwhile.
#[derive(Debug, Clone)]
pub struct Admin {
    pub base: String,
    kit: autohttps_kit::admin::AdminClient,
}

impl Admin {
    pub fn new(base: &str) -> Self {
        Self {
            base: base.to_owned(),
            kit: autohttps_kit::admin::AdminClient::new(base, TOKEN),
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
        let kit = self.kit.clone();
        let (path, token) = (path.to_owned(), token.map(str::to_owned));
        tokio::task::spawn_blocking(move || {
            kit.call_with_token(method.as_str(), &path, body.as_ref(), token.as_deref())
        })
        .await?
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

/// The `autohttps serve` binary as a child process (the kit's, under `timeout`), SIGKILLed on
/// drop.
#[derive(Debug)]
pub struct SidecarProcess {
    process: Option<Process>,
    pub log: PathBuf,
}

impl SidecarProcess {
    pub fn spawn(config: &Path, log: &Path) -> anyhow::Result<Self> {
        Self::spawn_with(config, log, &[])
    }

    /// `autohttps serve --config CONFIG ARGS…`, its output (stdout and stderr, not a
    /// terminal) appended to `log`.
    pub fn spawn_with(config: &Path, log: &Path, args: &[&str]) -> anyhow::Result<Self> {
        let mut command = Command::new(env!("CARGO_BIN_EXE_autohttps"));
        command
            .arg("serve")
            .arg("--config")
            .arg(config)
            .args(args)
            .env("RUST_LOG", "info")
            .env_remove("AUTOHTTPS_ADMIN_TOKEN");
        let process = Process::start("autohttps", &command, log, LogMode::Append, TEST_LIFETIME)?;
        Ok(Self {
            process: Some(process),
            log: log.to_owned(),
        })
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill_hard();
        }
    }
}

impl Drop for SidecarProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
