//! A real, throwaway PostgreSQL for tests: a cluster on a temporary directory and a free
//! loopback port, started with `pg_ctl` (as the `postgres` user when the tests run as root,
//! since PostgreSQL refuses root), stopped and removed on drop, also when the test panics, and
//! by a watchdog process if the test process dies without unwinding.
//!
//! `initdb` is slow (seconds), so it runs once per machine into a template under Cargo's
//! target temp dir; each cluster starts from a copy. Most tests share one cluster per test
//! binary ([`shared_cluster`]) and take a fresh database each ([`PgCluster::database`]); tests
//! that stop and restart the server own their cluster ([`PgCluster::start`]).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context as _, bail};
use tempfile::TempDir;

/// The superuser the template is created with (trust authentication on loopback).
const USER: &str = "autohttps";

/// The directory holding `initdb`, `pg_ctl` (Debian: `/usr/lib/postgresql/<version>/bin`).
fn bin_dir() -> anyhow::Result<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL is not installed (run `make test`, or apt-get install postgresql)")?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .context("no /usr/lib/postgresql/<version>/bin/initdb; apt-get install postgresql")
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}

/// A PostgreSQL command, run as `postgres` when we are root.
fn pg_command(bin: &Path, tool: &str) -> Command {
    if running_as_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(bin.join(tool));
        command
    } else {
        Command::new(bin.join(tool))
    }
}

fn run(mut command: Command, what: &str) -> anyhow::Result<()> {
    let out = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{what}: cannot run {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Hands `path` to the `postgres` user (when we are root).
fn give_to_postgres(path: &Path) -> anyhow::Result<()> {
    if running_as_root() {
        let mut chown = Command::new("chown");
        chown.arg("-R").arg("postgres:").arg(path);
        run(chown, "chown to postgres")?;
    }
    Ok(())
}

/// Where templates and clusters live: Cargo's target temp dir; a library or binary (the fleet
/// harness, the bench) has none at build time and uses the workspace's `target/tmp`. Not the
/// system temp dir, which the `postgres` user may not be allowed to enter.
fn scratch_root() -> anyhow::Result<PathBuf> {
    let root = PathBuf::from(
        option_env!("CARGO_TARGET_TMPDIR")
            .unwrap_or(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/tmp")),
    );
    std::fs::create_dir_all(&root).with_context(|| format!("create {}", root.display()))?;
    Ok(root)
}

/// The template data directory, made by `initdb` the first time on this machine.
fn template(bin: &Path) -> anyhow::Result<PathBuf> {
    static TEMPLATE: OnceLock<PathBuf> = OnceLock::new();
    if let Some(path) = TEMPLATE.get() {
        return Ok(path.clone());
    }
    let version = bin
        .parent()
        .and_then(Path::file_name)
        .and_then(|v| v.to_str())
        .unwrap_or("unknown")
        .to_owned();
    let root = scratch_root()?;
    let ready = root.join(format!("postgres-{version}-template"));
    if !ready.join("data/PG_VERSION").exists() {
        // Built aside and renamed into place: parallel test binaries never see half of one.
        let building = tempfile::Builder::new()
            .prefix("postgres-template-")
            .tempdir_in(&root)
            .context("create the template's build directory")?;
        give_to_postgres(building.path())?;
        let mut initdb = pg_command(bin, "initdb");
        initdb.arg("-D").arg(building.path().join("data")).args([
            "-A",
            "trust",
            "-U",
            USER,
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]);
        run(initdb, "initdb")?;
        let built = building.keep();
        if std::fs::rename(&built, &ready).is_err() {
            // Another test binary won the race: use its template.
            let _ = std::fs::remove_dir_all(&built);
        }
    }
    Ok(TEMPLATE.get_or_init(|| ready.join("data")).clone())
}

/// A running throwaway PostgreSQL cluster on 127.0.0.1.
#[derive(Debug)]
pub struct PgCluster {
    dir: TempDir,
    bin: PathBuf,
    port: u16,
    running: bool,
    databases: AtomicUsize,
}

impl PgCluster {
    /// A new cluster, started.
    pub fn start() -> anyhow::Result<Self> {
        let bin = bin_dir()?;
        let template = template(&bin)?;
        let dir = tempfile::Builder::new()
            .prefix("autohttps-pg-")
            .tempdir_in(scratch_root()?)
            .context("create the cluster's directory")?;
        let mut copy = Command::new("cp");
        copy.arg("-a").arg(&template).arg(dir.path().join("data"));
        run(copy, "copy the template cluster")?;
        give_to_postgres(dir.path())?;
        watch_for_exit(&bin, dir.path())?;
        let mut cluster = Self {
            dir,
            bin,
            port: 0,
            running: false,
            databases: AtomicUsize::new(0),
        };
        cluster.start_server()?;
        Ok(cluster)
    }

    /// The loopback port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `name` on this cluster.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{name}", self.port)
    }

    /// A fresh, empty database (dropped with the guard).
    pub fn database(&self) -> anyhow::Result<PgDatabase<'_>> {
        let name = format!(
            "test_{}_{}",
            std::process::id(),
            self.databases.fetch_add(1, Ordering::SeqCst)
        );
        self.admin_sql(&format!("CREATE DATABASE {name}"))?;
        Ok(PgDatabase {
            cluster: self,
            name,
        })
    }

    /// Runs `sql` on the `postgres` database, from a thread of its own (the blocking client
    /// must not run on an async test's runtime thread).
    fn admin_sql(&self, sql: &str) -> anyhow::Result<()> {
        let url = self.url("postgres");
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let mut admin = postgres::Client::connect(&url, postgres::NoTls)
                        .context("connect to the test cluster")?;
                    admin.batch_execute(sql).with_context(|| sql.to_owned())
                })
                .join()
                .map_err(|_| anyhow::anyhow!("the admin SQL thread panicked"))?
        })
    }

    /// Stops the server (fast shutdown: connections are cut), keeping its data.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if !self.running {
            return Ok(());
        }
        let mut stop = pg_command(&self.bin, "pg_ctl");
        stop.arg("-D")
            .arg(self.data())
            .args(["-m", "fast", "-w", "stop"]);
        run(stop, "pg_ctl stop")?;
        self.running = false;
        Ok(())
    }

    /// Starts the server again on the same port.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.start_server()
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn start_server(&mut self) -> anyhow::Result<()> {
        let mut last_error = None;
        // A free port can be taken between choosing and binding it: try a few.
        for _ in 0..5 {
            let port = if self.port == 0 {
                super::free_port()
            } else {
                self.port
            };
            let options = format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off \
                 -c synchronous_commit=off -c full_page_writes=off",
                self.dir.path().display()
            );
            let mut start = pg_command(&self.bin, "pg_ctl");
            start
                .arg("-D")
                .arg(self.data())
                .args(["-o", &options, "-l"])
                .arg(self.dir.path().join("log"))
                .args(["-w", "start"]);
            match run(start, "pg_ctl start") {
                Ok(()) => {
                    self.port = port;
                    self.running = true;
                    return Ok(());
                }
                Err(error) => {
                    last_error = Some(error);
                    if self.port != 0 {
                        break;
                    }
                }
            }
        }
        let log = std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default();
        Err(last_error
            .unwrap_or_else(|| anyhow::anyhow!("pg_ctl start failed"))
            .context(format!("server log:\n{log}")))
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.running {
            let mut stop = pg_command(&self.bin, "pg_ctl");
            stop.arg("-D")
                .arg(self.data())
                .args(["-m", "immediate", "-w", "stop"]);
            let _ = run(stop, "pg_ctl stop");
        }
    }
}

/// Stops the cluster in `dir` and removes `dir` once this test process has exited, however it
/// exits (statics are never dropped; a SIGKILLed test never unwinds).
fn watch_for_exit(bin: &Path, dir: &Path) -> anyhow::Result<()> {
    let pg_ctl = bin.join("pg_ctl");
    let as_postgres = if running_as_root() {
        "runuser -u postgres -- "
    } else {
        ""
    };
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
         if [ -d '{dir}/data' ]; then {as_postgres}'{pg_ctl}' -D '{dir}/data' -m immediate stop >/dev/null 2>&1; fi; \
         rm -rf '{dir}'",
        pid = std::process::id(),
        dir = dir.display(),
        pg_ctl = pg_ctl.display(),
    );
    Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start the cluster's cleanup watchdog")?;
    Ok(())
}

/// One cluster for every test of this test binary that only needs a database.
pub fn shared_cluster() -> &'static PgCluster {
    static CLUSTER: OnceLock<PgCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| PgCluster::start().expect("start the shared test PostgreSQL cluster"))
}

/// A database on a test cluster, dropped (connections cut) with this guard.
#[derive(Debug)]
pub struct PgDatabase<'a> {
    cluster: &'a PgCluster,
    name: String,
}

impl PgDatabase<'_> {
    /// Its connection URL.
    pub fn url(&self) -> String {
        self.cluster.url(&self.name)
    }
}

impl Drop for PgDatabase<'_> {
    fn drop(&mut self) {
        if !self.cluster.running {
            return;
        }
        let _ = self.cluster.admin_sql(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ));
    }
}
