//! A fleet on loopback: several edges, each an Envoy whose public listeners bind an address of
//! its own (127.0.0.1, .2, .3…) with its own `autohttps` sidecar, all sidecars sharing one
//! throwaway PostgreSQL (`store.url`, a distinct `store.node_id` each), one Pebble and one mock
//! DNS (which points each name at the edge a test chooses), and one demo backend. Every edge
//! listens on the SAME HTTP port number: Pebble validates HTTP-01 on one port, at whatever
//! address the mock DNS gives. The fleet suite and the fleet bench start it through [`Fleet`].

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::envoy::Envoy;
use crate::http::{CurlResponse, curl};
use crate::pebble::{Pebble, PebbleOptions};
use crate::pg::PgCluster;
use crate::sidecar::{SidecarConfig, StoreSettings, sidecar_binary};
use crate::stack::{ADMIN_TOKEN, DemoBackend, Ports, admin_call, edge_yaml, spawn_sidecar};
use crate::{Lifetime, Process, ProcessCpu, free_port};

/// The longest a process of a fleet may live.
const FLEET_LIFETIME: std::time::Duration = std::time::Duration::from_secs(3600);

/// How a [`Fleet`] is started.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// How many edges (at most 9: 127.0.0.1 to 127.0.0.9).
    pub edges: usize,
    /// Each sidecar's `acme.orders_in_flight`.
    pub orders_in_flight: usize,
    /// Added to Pebble's environment, e.g. `PEBBLE_VA_SLEEPTIME` (the harness otherwise turns
    /// Pebble's validation sleep off).
    pub pebble_env: Vec<(String, String)>,
}

impl Default for FleetOptions {
    fn default() -> Self {
        Self {
            edges: 3,
            orders_in_flight: 4,
            pebble_env: Vec::new(),
        }
    }
}

/// One edge: an Envoy on its own loopback address and its sidecar.
#[derive(Debug)]
pub struct Edge {
    /// 1-based: edge 1 is 127.0.0.1.
    pub index: usize,
    /// The address its public listeners bind.
    pub address: String,
    /// Its sidecar's `store.node_id`.
    pub node_id: String,
    /// Its ports: the public ones and the CA's are the fleet's, the admin and internal ones
    /// its own.
    pub ports: Ports,
    /// Its files (configuration, logs, the sidecar's data dir).
    pub dir: PathBuf,
    config: PathBuf,
    // Dropped in this order: Envoy, then the sidecar.
    envoy: Option<Envoy>,
    sidecar: Option<Process>,
}

impl Edge {
    /// Calls this edge's admin API: (status, JSON body).
    pub fn admin(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        admin_call(self.ports.sidecar_admin, method, path, body)
    }

    /// Runs the `autohttps` CLI against this edge's sidecar; fails with its output unless it
    /// succeeds.
    pub fn cli_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = Command::new(sidecar_binary()?)
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .output()?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        if !output.status.success() {
            bail!(
                "autohttps {} failed on edge {}:\n{text}",
                args.join(" "),
                self.index
            );
        }
        Ok(text)
    }

    /// Whether its sidecar runs.
    pub fn sidecar_running(&self) -> bool {
        self.sidecar.is_some()
    }

    /// Every run of its sidecar's log so far, concatenated.
    pub fn sidecar_logs(&self) -> String {
        let mut logs: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("sidecar-"))
            })
            .collect();
        logs.sort();
        logs.iter()
            .map(|p| std::fs::read_to_string(p).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A running fleet.
#[derive(Debug)]
pub struct Fleet {
    /// Its files: Pebble's and the mock DNS's logs, one folder per edge.
    pub dir: PathBuf,
    /// Pebble's issuing root, PEM file: what clients trust.
    pub ca_root: PathBuf,
    /// The edges, edge 1 first.
    pub edges: Vec<Edge>,
    /// The shared store's URL.
    pub database_url: String,
    /// Each sidecar's `acme.orders_in_flight`.
    pub orders_in_flight: usize,
    lifetime: Lifetime,
    // Dropped after the edges: the database, the CA, the backend.
    database: std::sync::Mutex<PgCluster>,
    pebble: Pebble,
    _backend: DemoBackend,
}

impl Fleet {
    /// Starts a fleet in a fresh temporary folder named after `name`; keep the folder alive as
    /// long as the fleet.
    pub fn start_in_temp_dir(
        name: &str,
        options: &FleetOptions,
    ) -> anyhow::Result<(Fleet, tempfile::TempDir)> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("autohttps-{name}-"))
            .tempdir()?;
        let fleet = Fleet::start(dir.path(), options)?;
        Ok((fleet, dir))
    }

    /// Starts PostgreSQL, Pebble and the mock DNS, the backend, then every sidecar (one after
    /// the other: they share the schema) and every Envoy (side by side).
    pub fn start(dir: &Path, options: &FleetOptions) -> anyhow::Result<Fleet> {
        if options.edges == 0 || options.edges > 9 {
            bail!("a fleet has 1 to 9 edges, not {}", options.edges);
        }
        let lifetime = Lifetime::Limited(FLEET_LIFETIME);
        let shared = Ports::free()?;
        let database = PgCluster::start().context("the fleet's PostgreSQL")?;
        let database_url = database.url("postgres");
        let backend = DemoBackend::start(shared.backend)?;
        let pebble = Pebble::start(&PebbleOptions {
            dir: dir.to_path_buf(),
            http_port: shared.http,
            acme_port: shared.acme,
            management_port: shared.acme_management,
            dns_port: shared.dns,
            dns_management_port: shared.dns_management,
            env: options.pebble_env.clone(),
            lifetime,
            verbose: false,
        })?;
        let ca_root = dir.join("ca-root.pem");
        std::fs::write(&ca_root, pebble.root_pem()?)?;
        let addresses: Vec<String> = (1..=options.edges)
            .map(|i| format!("127.0.0.{i}"))
            .collect();
        let mut edges = Vec::new();
        for (i, address) in addresses.iter().enumerate() {
            let index = i + 1;
            let edge_dir = dir.join(format!("edge-{index}"));
            std::fs::create_dir_all(&edge_dir)?;
            let ports = Ports {
                envoy_admin: free_port()?,
                sidecar_admin: free_port()?,
                sidecar_internal: free_port()?,
                ..shared
            };
            let node_id = format!("edge-{index}");
            let config = edge_dir.join("autohttps.toml");
            let data_dir = edge_dir.join("data");
            SidecarConfig {
                sds_socket: Some(data_dir.join("sds.sock")),
                platform_addresses: addresses.clone(),
                orders_in_flight: Some(options.orders_in_flight),
                store: Some(StoreSettings {
                    url: database_url.clone(),
                    node_id: node_id.clone(),
                }),
                ..SidecarConfig::for_pebble(
                    &pebble,
                    &data_dir,
                    ports.sidecar_admin,
                    ports.sidecar_internal,
                    ADMIN_TOKEN,
                )
            }
            .write(&config)?;
            edges.push(Edge {
                index,
                address: address.clone(),
                node_id,
                ports,
                dir: edge_dir,
                config,
                envoy: None,
                sidecar: None,
            });
        }
        let mut fleet = Fleet {
            dir: dir.to_path_buf(),
            ca_root,
            edges,
            database_url,
            orders_in_flight: options.orders_in_flight,
            lifetime,
            database: std::sync::Mutex::new(database),
            pebble,
            _backend: backend,
        };
        for index in 1..=options.edges {
            fleet.start_sidecar(index)?;
        }
        let started: Vec<anyhow::Result<Envoy>> = std::thread::scope(|scope| {
            let handles: Vec<_> = fleet
                .edges
                .iter()
                .map(|edge| {
                    scope.spawn(move || {
                        let yaml =
                            edge_yaml(&edge.address, &edge.ports, &edge.dir.join("data"), &[])?;
                        Envoy::start_in(&yaml, edge.ports.envoy_admin, Some(&edge.dir), lifetime)
                            .with_context(|| format!("edge {}'s Envoy", edge.index))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| bail!("an Envoy start panicked"))
                })
                .collect()
        });
        for (edge, envoy) in fleet.edges.iter_mut().zip(started) {
            edge.envoy = Some(envoy?);
        }
        Ok(fleet)
    }

    /// Edge `index` (1-based).
    pub fn edge(&self, index: usize) -> &Edge {
        &self.edges[index - 1]
    }

    /// Starts edge `index`'s sidecar (again) and waits until it serves.
    pub fn start_sidecar(&mut self, index: usize) -> anyhow::Result<()> {
        let lifetime = self.lifetime;
        let edge = &mut self.edges[index - 1];
        let process = spawn_sidecar(&edge.config, &edge.dir, edge.ports.sidecar_admin, lifetime)
            .with_context(|| format!("edge {index}'s sidecar"))?;
        edge.sidecar = Some(process);
        Ok(())
    }

    /// SIGKILLs edge `index`'s sidecar (no chance to clean up or release its leases).
    pub fn kill_sidecar(&mut self, index: usize) {
        if let Some(mut process) = self.edges[index - 1].sidecar.take() {
            process.kill_hard();
        }
    }

    /// Stops PostgreSQL (fast shutdown: every connection is cut), keeping its data. (Takes
    /// `&self`, so traffic can keep running through the fleet meanwhile.)
    pub fn stop_database(&self) -> anyhow::Result<()> {
        self.database
            .lock()
            .map_err(|_| anyhow::anyhow!("the database handle is poisoned"))?
            .stop()
    }

    /// Starts PostgreSQL again on the same port.
    pub fn start_database(&self) -> anyhow::Result<()> {
        self.database
            .lock()
            .map_err(|_| anyhow::anyhow!("the database handle is poisoned"))?
            .restart()
    }

    /// Runs `sql` on the shared store (simple query protocol): every row, each column as text
    /// (`""` for NULL).
    pub fn sql(&self, sql: &str) -> anyhow::Result<Vec<Vec<String>>> {
        let url = self.database_url.clone();
        let sql = sql.to_owned();
        // The blocking client must not run inside a runtime: a thread of its own.
        std::thread::spawn(move || SqlSession::connect(&url)?.query(&sql))
            .join()
            .map_err(|_| anyhow::anyhow!("the SQL thread panicked"))?
    }

    /// A connection of its own to the shared store, for a caller that queries it often (each
    /// [`Fleet::sql`] connects anew, which costs PostgreSQL a process start). Not for use
    /// inside an async runtime (the client blocks).
    pub fn sql_session(&self) -> anyhow::Result<SqlSession> {
        SqlSession::connect(&self.database_url)
    }

    /// Makes `host` resolve (in the mock DNS, which Pebble and the sidecars' DNS pre-check
    /// use) to edge `index`'s address only.
    pub fn point_dns(&self, host: &str, index: usize) -> anyhow::Result<()> {
        self.pebble.set_a(host, &self.edge(index).address)
    }

    /// Makes `host` resolve to `address` (e.g. a loopback address outside the platform's, where
    /// nothing listens).
    pub fn set_dns(&self, host: &str, address: &str) -> anyhow::Result<()> {
        self.pebble.set_a(host, address)
    }

    /// GET over HTTPS through edge `index` with SNI `host`, trusting only Pebble's root (so a
    /// 2xx/3xx means the handshake verified the issued certificate for `host`).
    pub fn https(&self, index: usize, host: &str, path: &str) -> anyhow::Result<CurlResponse> {
        let edge = self.edge(index);
        let url = format!("https://{host}:{}{path}", edge.ports.https);
        let resolve = format!("{host}:{}:{}", edge.ports.https, edge.address);
        let ca = self.ca_root.display().to_string();
        curl(&["--cacert", &ca, "--resolve", &resolve, &url])
    }

    /// GET over plain HTTP through edge `index` with Host `host`.
    pub fn http(&self, index: usize, host: &str, path: &str) -> anyhow::Result<CurlResponse> {
        let edge = self.edge(index);
        let url = format!("http://{host}:{}{path}", edge.ports.http);
        let resolve = format!("{host}:{}:{}", edge.ports.http, edge.address);
        curl(&["--resolve", &resolve, &url])
    }

    /// Pebble's log so far.
    pub fn pebble_log(&self) -> String {
        self.pebble.log()
    }

    /// Orders Pebble created (its "Added order" log lines): what the CA saw.
    pub fn pebble_orders(&self) -> usize {
        self.pebble.orders_created()
    }

    /// CPU seconds used so far by each process of the fleet (see [`FleetCpu`]).
    pub fn cpu(&self) -> FleetCpu {
        let postgres = self
            .sql("SELECT pid FROM pg_stat_activity WHERE backend_type = 'checkpointer'")
            .ok()
            .and_then(|rows| rows.first()?.first()?.parse::<u32>().ok())
            .and_then(ProcessCpu::of)
            .and_then(|checkpointer| ProcessCpu::with_children(checkpointer.parent))
            .unwrap_or(0.0);
        FleetCpu {
            sidecars: self
                .edges
                .iter()
                .map(|e| {
                    e.sidecar
                        .as_ref()
                        .and_then(Process::cpu_seconds)
                        .unwrap_or(0.0)
                })
                .collect(),
            envoys: self
                .edges
                .iter()
                .map(|e| e.envoy.as_ref().and_then(Envoy::cpu_seconds).unwrap_or(0.0))
                .collect(),
            pebble: self.pebble.cpu_seconds().unwrap_or(0.0),
            postgres,
        }
    }

    /// Starts sampling, every `every` on a connection of its own, what PostgreSQL's busy
    /// backends wait for (`pg_stat_activity`); [`WaitSampler::stop`] answers the tallies.
    pub fn sample_waits(&self, every: std::time::Duration) -> anyhow::Result<WaitSampler> {
        let url = self.database_url.clone();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || -> anyhow::Result<WaitTally> {
            let mut client = postgres::Client::connect(&url, postgres::NoTls)
                .context("connect to the fleet's PostgreSQL")?;
            let mut tally = WaitTally::default();
            while !stopping.load(std::sync::atomic::Ordering::Relaxed) {
                let rows = client.query(
                    "SELECT COALESCE(wait_event_type, 'CPU') || ':' || COALESCE(wait_event, '-')
                     FROM pg_stat_activity
                     WHERE state = 'active' AND backend_type = 'client backend'
                       AND pid <> pg_backend_pid()",
                    &[],
                )?;
                tally.samples += 1;
                for row in rows {
                    *tally.waiting.entry(row.try_get(0)?).or_default() += 1;
                }
                std::thread::sleep(every);
            }
            Ok(tally)
        });
        Ok(WaitSampler { stop, thread })
    }

    /// Pebble's own log tail, for failure messages.
    pub fn pebble_log_tail(&self, lines: usize) -> String {
        self.pebble.log_tail(lines)
    }
}

/// CPU seconds (user + system) used so far by each process of a fleet.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FleetCpu {
    /// Each edge's running sidecar (edge order; 0 when stopped).
    pub sidecars: Vec<f64>,
    /// Each edge's Envoy (edge order).
    pub envoys: Vec<f64>,
    /// Pebble.
    pub pebble: f64,
    /// The PostgreSQL server with all its backends (those that ended included).
    pub postgres: f64,
}

impl FleetCpu {
    /// What was used between `before` and `self`.
    pub fn since(&self, before: &FleetCpu) -> FleetCpu {
        let each = |after: &[f64], before: &[f64]| {
            after
                .iter()
                .zip(before)
                .map(|(a, b)| a - b)
                .collect::<Vec<f64>>()
        };
        FleetCpu {
            sidecars: each(&self.sidecars, &before.sidecars),
            envoys: each(&self.envoys, &before.envoys),
            pebble: self.pebble - before.pebble,
            postgres: self.postgres - before.postgres,
        }
    }

    /// All of it.
    pub fn total(&self) -> f64 {
        self.sidecars.iter().sum::<f64>()
            + self.envoys.iter().sum::<f64>()
            + self.pebble
            + self.postgres
    }
}

/// What PostgreSQL's busy client backends were doing, sampled (see [`Fleet::sample_waits`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WaitTally {
    /// Samples taken.
    pub samples: usize,
    /// Per `wait_event_type:wait_event` (`CPU:-` when running), how many busy backends were
    /// seen in it, summed over the samples.
    pub waiting: std::collections::BTreeMap<String, usize>,
}

impl WaitTally {
    /// The mean number of backends in `state` (e.g. `Lock:advisory`) per sample.
    pub fn mean(&self, state: &str) -> f64 {
        self.waiting.get(state).copied().unwrap_or(0) as f64 / self.samples.max(1) as f64
    }
}

/// A running [`Fleet::sample_waits`].
#[derive(Debug)]
pub struct WaitSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<anyhow::Result<WaitTally>>,
}

impl WaitSampler {
    /// Stops sampling; the tallies.
    pub fn stop(self) -> anyhow::Result<WaitTally> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the wait sampler panicked"))?
    }
}

/// One connection to a fleet's shared store (see [`Fleet::sql_session`]).
pub struct SqlSession {
    client: postgres::Client,
}

impl std::fmt::Debug for SqlSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlSession").finish_non_exhaustive()
    }
}

impl SqlSession {
    fn connect(url: &str) -> anyhow::Result<Self> {
        let client = postgres::Client::connect(url, postgres::NoTls)
            .context("connect to the fleet's PostgreSQL")?;
        Ok(Self { client })
    }

    /// Runs `sql` (simple query protocol): every row, each column as text (`""` for NULL).
    pub fn query(&mut self, sql: &str) -> anyhow::Result<Vec<Vec<String>>> {
        let mut rows = Vec::new();
        for message in self
            .client
            .simple_query(sql)
            .with_context(|| sql.to_owned())?
        {
            if let postgres::SimpleQueryMessage::Row(row) = message {
                rows.push(
                    (0..row.len())
                        .map(|i| row.get(i).unwrap_or_default().to_owned())
                        .collect(),
                );
            }
        }
        Ok(rows)
    }
}
