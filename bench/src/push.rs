//! `BENCH_ONLY=push`: the policy feed at platform scale, on the real processes. A release
//! sidecar on a SQLite file seeded with `BENCH_PUSH_SITES` sites (default 100,000; two names
//! and one current certificate each) and an Envoy with `--concurrency 2` and the edge
//! configuration (`envoy/edge.yaml`), whose filter is told to poll only once a minute, so a
//! change can reach it only through the long poll. It measures:
//!
//! - the sidecar's resident memory (VmRSS) after start, after serving its first snapshot, with
//!   Envoy's VMs attached, after 100 and 200 changes and after a `/metrics` scrape, and its
//!   peak (VmHWM);
//! - the sidecar's CPU time (user + system, from `/proc/<pid>/stat`) per one-site change served
//!   as a delta to every VM, against its idle CPU over as long;
//! - API call → every VM enforcing the change: each change is one `PATCH /v1/sites/{site}`
//!   (a different site's `https` to `force` each time), timed from just before the request to
//!   the last "policy … applied" line Envoy logs for the new version. Envoy stamps each log line
//!   with its thread, and a change counts as arrived only when the main thread and **both**
//!   workers have logged it: a VM that did not apply it cannot be counted by luck, and one that
//!   applied it enforces it from then on (its next request reads the changed policy). A final
//!   check sends the changed sites' hosts over fresh connections and expects the 301 of
//!   `force` on every one.
//!
//! `BENCH_PUSH_STORE=<file>` reuses a seeded database (copied, never changed; seeded there
//! first when the file does not exist) instead of seeding a fresh one; the results are printed and written into their section of `BENCH_OUT`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, anyhow, bail};
use autohttps_kit::envoy::{envoy_binary, filter_wasm, policy_applied_lines, with_policy_poll};
use autohttps_kit::render::render;
use autohttps_kit::sidecar::SidecarConfig;
use autohttps_kit::{free_port, repo_root};

use super::{day_seconds, mib_kib, resident_kib, seed_store, sidecar_for_bench, spawn_server};

/// Changes timed end to end.
const CHANGES: usize = 200;
/// The admin token of the sidecar started here.
const ADMIN_TOKEN: &str = "autohttps-bench-push-admin-token";
/// Envoy's worker threads: "every worker" must mean more than one.
const WORKERS: usize = 2;
/// Names whose first TLS handshake is timed.
const HANDSHAKE_NAMES: usize = 20;
/// The filter's fallback poll: longer than the whole run, so only the long poll delivers.
const FALLBACK_POLL_MS: u64 = 60_000;

/// What one run measured.
struct PushFigures {
    sites: usize,
    seeded_in: Option<Duration>,
    database_bytes: u64,
    ready: Duration,
    rss_start_kib: u64,
    rss_first_snapshot_kib: u64,
    snapshot_bytes: usize,
    rss_envoy_attached_kib: u64,
    /// TLS handshake (curl's `time_appconnect`) in ms for names Envoy had not asked SDS for
    /// yet (the sidecar reads the certificate from the store), and again for the same names.
    handshake_first_ms: Vec<f64>,
    handshake_again_ms: Vec<f64>,
    rss_after_handshakes_kib: u64,
    rss_100_changes_kib: u64,
    rss_200_changes_kib: u64,
    rss_after_metrics_kib: u64,
    peak_kib: u64,
    vms: usize,
    root_contexts: usize,
    /// ms from the API call to the last VM's "applied", per change.
    arrival_ms: Vec<f64>,
    /// ms the API call itself took, per change.
    api_ms: Vec<f64>,
    /// Sidecar CPU ms over the changes, and over an idle stretch as long.
    cpu_changes_ms: f64,
    cpu_idle_ms: f64,
    changes_wall: Duration,
    delta_bytes_each: usize,
}

/// Runs the push bench and writes its section into `out` (unless `-`).
pub fn run(out: &Path) -> anyhow::Result<()> {
    let sites: usize = super::env_number("BENCH_PUSH_SITES", 100_000)?;
    let figures = measure(sites)?;
    let section = figures.section();
    println!("{section}");
    if out != Path::new("-") {
        let existing = std::fs::read_to_string(out).unwrap_or_default();
        std::fs::write(out, replace_section(&existing, &section))
            .with_context(|| format!("writing {}", out.display()))?;
        eprintln!("==> written to {}", out.display());
    }
    Ok(())
}

/// The title of this bench's section of the results file.
const SECTION_TITLE: &str = "## Policy push at scale (`BENCH_ONLY=push`)";

/// `existing` with its push section replaced by `section` (appended when it has none).
fn replace_section(existing: &str, section: &str) -> String {
    let Some(start) = existing.find(SECTION_TITLE) else {
        let mut out = existing.trim_end().to_string();
        if !out.is_empty() {
            out.push_str("\n\n");
        }
        out.push_str(section);
        return out;
    };
    let after = &existing[start + SECTION_TITLE.len()..];
    let end = after
        .find("\n## ")
        .map_or(existing.len(), |at| start + SECTION_TITLE.len() + at + 1);
    format!(
        "{}{}\n{}",
        &existing[..start],
        section.trim_end(),
        &existing[end..]
    )
}

fn measure(sites: usize) -> anyhow::Result<PushFigures> {
    let binary = sidecar_for_bench()?;
    let dir = tempfile::Builder::new()
        .prefix("autohttps-bench-push-")
        .tempdir()?;
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data)?;
    let database = data.join("autohttps.db");
    let seeded_in = match std::env::var_os("BENCH_PUSH_STORE").map(std::path::PathBuf::from) {
        Some(seeded) => {
            let seeded_in = if seeded.exists() {
                None
            } else {
                eprintln!(
                    "==> push: seeding {} with {sites} sites and certificates (kept for later runs)",
                    seeded.display()
                );
                let seeding = Instant::now();
                seed_store(&seeded, sites)?;
                Some(seeding.elapsed())
            };
            eprintln!("==> push: copying the seeded store {}", seeded.display());
            std::fs::copy(&seeded, &database)
                .with_context(|| format!("copying BENCH_PUSH_STORE {}", seeded.display()))?;
            seeded_in
        }
        None => {
            eprintln!("==> push: seeding a store with {sites} sites and certificates");
            let seeding = Instant::now();
            seed_store(&database, sites)?;
            Some(seeding.elapsed())
        }
    };
    let database_bytes = ["autohttps.db", "autohttps.db-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(data.join(f)).ok())
        .map(|m| m.len())
        .sum();

    let (admin, internal, metrics) = (free_port()?, free_port()?, free_port()?);
    let config = dir.path().join("autohttps.toml");
    // No CA is reached here (every site already has its certificate): the directory and the
    // nameserver are a port nothing listens on.
    let unused = free_port()?;
    SidecarConfig {
        data_dir: data.clone(),
        admin: ([127, 0, 0, 1], admin).into(),
        internal: ([127, 0, 0, 1], internal).into(),
        metrics: ([127, 0, 0, 1], metrics).into(),
        admin_token: ADMIN_TOKEN.to_string(),
        directory_url: format!("https://127.0.0.1:{unused}/dir"),
        extra_root_ca: None,
        debounce_ms: None,
        platform_addresses: vec!["127.0.0.1".to_string()],
        nameservers: vec![([127, 0, 0, 1], unused).into()],
        sds_socket: Some(data.join("sds.sock")),
        edge: None,
        orders_in_flight: None,
        store: None,
    }
    .write(&config)?;
    eprintln!("==> push: starting the sidecar");
    let (mut sidecar, ready) = super::start_bench_sidecar(
        &binary,
        &config,
        &dir.path().join("sidecar.log"),
        internal,
        "autohttps sidecar serving",
        Duration::from_secs(300),
    )?;
    std::thread::sleep(Duration::from_secs(2));
    let pid = sidecar
        .program_pid()
        .ok_or_else(|| anyhow!("cannot find the sidecar's pid under timeout"))?;
    let rss_start_kib = resident_kib(pid)?.0;
    eprintln!("    ready in {ready:?}, VmRSS {}", mib_kib(rss_start_kib));

    // The feed loads every site on its first request.
    let (status, snapshot) = http_raw(
        internal,
        &format!(
            "GET {} HTTP/1.1",
            autohttps_sidecar::policy_feed::POLICY_PATH
        ),
        &[("Host", "127.0.0.1")],
        None,
    )?;
    if status != 200 {
        bail!("the policy feed answered {status}");
    }
    std::thread::sleep(Duration::from_secs(1));
    let rss_first_snapshot_kib = resident_kib(pid)?.0;
    eprintln!(
        "    first snapshot {} bytes, VmRSS {}",
        snapshot.len(),
        mib_kib(rss_first_snapshot_kib)
    );
    let snapshot_bytes = snapshot.len();
    drop(snapshot);

    eprintln!("==> push: starting Envoy with {WORKERS} workers");
    let (http, https, envoy_admin) = (free_port()?, free_port()?, free_port()?);
    let values = HashMap::from([
        ("LISTEN_ADDRESS", "127.0.0.1".to_string()),
        ("HTTP_PORT", http.to_string()),
        ("HTTPS_PORT", https.to_string()),
        ("ADMIN_PORT", envoy_admin.to_string()),
        ("SDS_SOCKET", data.join("sds.sock").display().to_string()),
        ("SIDECAR_HTTP_ADDRESS", "127.0.0.1".to_string()),
        ("SIDECAR_HTTP_PORT", internal.to_string()),
        ("BACKEND_ADDRESS", "127.0.0.1".to_string()),
        ("BACKEND_PORT", free_port()?.to_string()),
        ("WASM", filter_wasm()?.display().to_string()),
        (
            "TRUSTED_PROXY_RANGES",
            autohttps_kit::render::trusted_proxy_ranges::<&str>(&[])?,
        ),
    ]);
    let template = std::fs::read_to_string(repo_root().join("envoy/edge.yaml"))?;
    let yaml = render(&with_policy_poll(&template, FALLBACK_POLL_MS)?, &values)?;
    let envoy_config = dir.path().join("envoy.yaml");
    std::fs::write(&envoy_config, yaml)?;
    let mut envoy = spawn_server(
        "Envoy",
        &envoy_binary()?,
        &[
            "-c".into(),
            envoy_config.display().to_string(),
            "--concurrency".into(),
            WORKERS.to_string(),
            "--use-dynamic-base-id".into(),
            "-l".into(),
            "info".into(),
            "--log-format".into(),
            "[%T.%f][%t] %v".into(),
        ],
        dir.path().join("envoy.log"),
    )?;
    super::wait_ready(&mut envoy, envoy_admin)?;
    // Every VM (the main thread's and each worker's) takes the snapshot once.
    let deadline = Instant::now() + Duration::from_secs(300);
    let vms = loop {
        envoy.check_running()?;
        let threads: BTreeSet<String> = policy_applied_lines(&envoy.log())
            .into_iter()
            .filter(|line| !line.delta)
            .map(|line| line.thread)
            .collect();
        if threads.len() > WORKERS {
            break threads.len();
        }
        if Instant::now() > deadline {
            bail!(
                "Envoy's VMs did not all apply the snapshot within 300 s (threads {threads:?}):\n{}",
                super::tail(&envoy.log(), 30)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    std::thread::sleep(Duration::from_secs(2));
    // Each root context (one per filter configuration in each VM) logs its snapshot once.
    let root_contexts = policy_applied_lines(&envoy.log())
        .iter()
        .filter(|line| !line.delta)
        .count();
    let rss_envoy_attached_kib = resident_kib(pid)?.0;
    eprintln!(
        "    {vms} VMs hold the snapshot, sidecar VmRSS {}",
        mib_kib(rss_envoy_attached_kib)
    );

    eprintln!("==> push: TLS handshakes for {HANDSHAKE_NAMES} names Envoy has not asked SDS for");
    let mut handshake_first_ms = Vec::with_capacity(HANDSHAKE_NAMES);
    let mut handshake_again_ms = Vec::with_capacity(HANDSHAKE_NAMES);
    for k in 0..HANDSHAKE_NAMES {
        // Sites the changes below never touch (they take multiples of 7919).
        let host = format!("m{}.memory.test", (k * 7919 + 1) % sites);
        handshake_first_ms.push(handshake_ms(https, &host)?);
        handshake_again_ms.push(handshake_ms(https, &host)?);
    }
    let rss_after_handshakes_kib = resident_kib(pid)?.0;
    eprintln!(
        "    first handshake p50 {:.1} ms, again p50 {:.1} ms, sidecar VmRSS {}",
        percentile(&handshake_first_ms, 50.0),
        percentile(&handshake_again_ms, 50.0),
        mib_kib(rss_after_handshakes_kib)
    );

    eprintln!("==> push: {CHANGES} one-site changes, each timed until every VM applied it");
    let cpu_start = process_cpu_ms(pid)?;
    let changes_started = Instant::now();
    let mut arrival_ms = Vec::with_capacity(CHANGES);
    let mut api_ms = Vec::with_capacity(CHANGES);
    let mut rss_100_changes_kib = 0;
    let mut changed_sites = Vec::new();
    let mut delta_bytes_each = 0;
    for i in 0..CHANGES {
        let site = format!("m-{}", (i * 7919) % sites);
        let log_offset = envoy.log().len();
        let before = SystemTime::now();
        let call = Instant::now();
        let (status, body) = http_request(
            admin,
            "PATCH",
            &format!("/v1/sites/{site}"),
            Some(r#"{"https":"force"}"#),
        )?;
        let api = call.elapsed();
        if status != 200 {
            bail!("PATCH /v1/sites/{site} answered {status}: {body}");
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let arrived = loop {
            let log = envoy.log();
            let lines: Vec<_> = policy_applied_lines(log.get(log_offset..).unwrap_or_default())
                .into_iter()
                .filter(|line| line.at.is_some())
                .collect();
            // Per version: the threads that applied it, how many root contexts, the last time.
            let mut by_version: BTreeMap<&str, (BTreeSet<&str>, usize, f64)> = BTreeMap::new();
            for line in &lines {
                let entry = by_version
                    .entry(line.version.as_str())
                    .or_insert_with(|| (BTreeSet::new(), 0, 0.0));
                entry.0.insert(line.thread.as_str());
                entry.1 += 1;
                entry.2 = entry.2.max(line.at.unwrap_or_default());
            }
            if let Some((_, (_, _, last))) = by_version
                .iter()
                .find(|(_, (threads, count, _))| threads.len() >= vms && *count >= root_contexts)
            {
                if lines.iter().any(|line| !line.delta) {
                    bail!("a VM took a snapshot for change {i}, not a delta");
                }
                break *last;
            }
            envoy.check_running()?;
            if Instant::now() > deadline {
                bail!(
                    "change {i} ({site}) did not reach every VM within 30 s:\n{}",
                    super::tail(&log[log_offset..], 20)
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let mut ms = (arrived - day_seconds(before)) * 1000.0;
        if ms < -43_200_000.0 {
            ms += 86_400_000.0;
        }
        arrival_ms.push(ms);
        api_ms.push(api.as_secs_f64() * 1000.0);
        changed_sites.push(site);
        if i == 0 {
            delta_bytes_each = delta_size(internal)?;
        }
        if i + 1 == 100 {
            rss_100_changes_kib = resident_kib(pid)?.0;
        }
    }
    let changes_wall = changes_started.elapsed();
    let cpu_changes_ms = process_cpu_ms(pid)? - cpu_start;
    std::thread::sleep(Duration::from_secs(1));
    let rss_200_changes_kib = resident_kib(pid)?.0;
    // The same stretch of wall time with nothing changing: what the sidecar spends anyway
    // (long polls held, timers).
    let idle_from = process_cpu_ms(pid)?;
    std::thread::sleep(changes_wall);
    let cpu_idle_ms = process_cpu_ms(pid)? - idle_from;

    // Every changed site answers the force redirect on fresh connections.
    for site in changed_sites.iter().take(20) {
        let n: usize = site.trim_start_matches("m-").parse()?;
        let host = format!("m{n}.memory.test");
        for _ in 0..4 {
            let (status, _) = http_request_host(http, &host, "/")?;
            if status != 301 {
                bail!("{host} answered {status} after its change to force, not 301");
            }
        }
    }

    let (status, _) = http_raw(
        metrics,
        "GET /metrics HTTP/1.1",
        &[("Host", "127.0.0.1")],
        None,
    )?;
    if status != 200 {
        bail!("/metrics answered {status}");
    }
    std::thread::sleep(Duration::from_secs(1));
    let (rss_after_metrics_kib, peak_kib) = resident_kib(pid)?;
    sidecar.check_running()?;
    envoy.check_running()?;
    Ok(PushFigures {
        sites,
        seeded_in,
        database_bytes,
        ready,
        rss_start_kib,
        rss_first_snapshot_kib,
        snapshot_bytes,
        rss_envoy_attached_kib,
        handshake_first_ms,
        handshake_again_ms,
        rss_after_handshakes_kib,
        rss_100_changes_kib,
        rss_200_changes_kib,
        rss_after_metrics_kib,
        peak_kib,
        vms,
        root_contexts,
        arrival_ms,
        api_ms,
        cpu_changes_ms,
        cpu_idle_ms,
        changes_wall,
        delta_bytes_each,
    })
}

/// The size of the delta a VM one version behind gets now: the current version is the ETag of
/// the 304 to `If-None-Match: *`, and the one before it `n - 1` of the same epoch.
fn delta_size(internal: u16) -> anyhow::Result<usize> {
    let path = autohttps_sidecar::policy_feed::POLICY_PATH;
    let (status, head) = http_raw(
        internal,
        &format!("GET {path} HTTP/1.1"),
        &[("Host", "127.0.0.1"), ("If-None-Match", "*")],
        None,
    )?;
    let version = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("etag")
                .then(|| value.trim().trim_matches('"').to_string())
        })
        .ok_or_else(|| anyhow!("the feed's {status} carries no ETag"))?;
    let (epoch, n) = version
        .rsplit_once('-')
        .ok_or_else(|| anyhow!("version {version:?} is not <epoch>-<n>"))?;
    let previous = format!("{epoch}-{}", n.parse::<u64>()?.saturating_sub(1));
    let (status, response) = http_raw(
        internal,
        &format!("GET {path}?since={previous} HTTP/1.1"),
        &[("Host", "127.0.0.1")],
        None,
    )?;
    if status != 200
        || !response
            .to_ascii_lowercase()
            .contains("autohttps-policy-kind: delta")
    {
        bail!("the feed answered {status} without a delta from {previous}:\n{response}");
    }
    let body = response.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    Ok(body.len())
}

/// How long a TLS handshake with Envoy's HTTPS listener (127.0.0.1:`port`) for SNI `host`
/// took, in ms (curl's `time_appconnect`; the certificate is not verified: it is self-signed).
fn handshake_ms(port: u16, host: &str) -> anyhow::Result<f64> {
    let output = std::process::Command::new("curl")
        .args([
            "-sk",
            "--noproxy",
            "*",
            "--max-time",
            "30",
            "-o",
            "/dev/null",
        ])
        .args(["-w", "%{time_appconnect}"])
        .arg("--resolve")
        .arg(format!("{host}:{port}:127.0.0.1"))
        .arg(format!("https://{host}:{port}/"))
        .output()
        .context("running curl")?;
    let seconds: f64 = String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .with_context(|| format!("curl's time_appconnect for {host}"))?;
    if seconds <= 0.0 {
        bail!(
            "no TLS handshake with {host} on port {port}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(seconds * 1000.0)
}

/// The process's user + system CPU time in ms.
fn process_cpu_ms(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow!("unreadable /proc/{pid}/stat"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields
            .get(i)
            .ok_or_else(|| anyhow!("short /proc/{pid}/stat"))?
            .parse::<f64>()?)
    };
    // Fields 14 and 15 of stat (utime, stime), counted after the command's ")": 12 and 13.
    let hz = clock_ticks_per_second();
    Ok((ticks(11)? + ticks(12)?) * 1000.0 / hz)
}

fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// An admin API request with the bench's token.
fn http_request(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    http_raw(
        port,
        &format!("{method} {path} HTTP/1.1"),
        &[
            ("Authorization", &format!("Bearer {ADMIN_TOKEN}")),
            ("Host", "127.0.0.1"),
        ],
        body,
    )
}

/// A plain GET to Envoy's HTTP listener for `host`.
fn http_request_host(port: u16, host: &str, path: &str) -> anyhow::Result<(u16, String)> {
    http_raw(
        port,
        &format!("GET {path} HTTP/1.1"),
        &[("Host", host)],
        None,
    )
}

/// One HTTP/1.1 exchange on a fresh connection (`Connection: close`): the status and the
/// whole response text.
fn http_raw(
    port: u16,
    request_line: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut request = format!("{request_line}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(body) = body {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
    } else {
        request.push_str("\r\n");
    }
    stream.write_all(request.as_bytes())?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("no HTTP status in {:?}", super::tail(&text, 3)))?;
    Ok((status, text))
}

fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl PushFigures {
    /// The section of the results file: the rows, then how they were taken.
    fn section(&self) -> String {
        let sites = super::thousands(self.sites as f64);
        let rss = [
            ("after start", self.rss_start_kib),
            ("first snapshot served", self.rss_first_snapshot_kib),
            ("Envoy's VMs attached", self.rss_envoy_attached_kib),
            (
                "after handshakes for 20 new names",
                self.rss_after_handshakes_kib,
            ),
            ("after 100 changes", self.rss_100_changes_kib),
            ("after 200 changes", self.rss_200_changes_kib),
            ("after a /metrics scrape", self.rss_after_metrics_kib),
        ];
        let highest = rss.iter().map(|(_, kib)| *kib).max().unwrap_or(0);
        let rss_text = rss
            .iter()
            .map(|(when, kib)| format!("{when} {}", mib_kib(*kib)))
            .collect::<Vec<_>>()
            .join(" · ");
        let per_change = (self.cpu_changes_ms - self.cpu_idle_ms).max(0.0) / CHANGES as f64;
        let p50 = percentile(&self.arrival_ms, 50.0);
        let p99 = percentile(&self.arrival_ms, 99.0);
        let max = percentile(&self.arrival_ms, 100.0);
        let mut out = String::new();
        out.push_str(SECTION_TITLE);
        out.push_str("\n\n");
        out.push_str(&format!(
            "A release sidecar on a SQLite file of {sites} sites (two names and one current certificate each; {:.1} MB{}), Envoy `--concurrency {WORKERS}` with `envoy/edge.yaml` (its filter's fallback poll set to {} s, so only the long poll delivers): {} VMs (the main thread's and one per worker), {} root contexts.\n\n",
            self.database_bytes as f64 / 1e6,
            self.seeded_in
                .map(|d| format!(", seeded in {:.0} s", d.as_secs_f64()))
                .unwrap_or_default(),
            FALLBACK_POLL_MS / 1000,
            self.vms,
            self.root_contexts,
        ));
        out.push_str("| measurement | result | target | status |\n| --- | --- | --- | --- |\n");
        out.push_str(&format!(
            "| sidecar VmRSS at {sites} sites | {rss_text} · peak (VmHWM) {} | ≤ 200 MiB | {} |\n",
            mib_kib(self.peak_kib),
            super::verdict(highest <= 200 * 1024),
        ));
        out.push_str(&format!(
            "| sidecar start on that store | ready in {:.2} s · first snapshot {} bytes | | |\n",
            self.ready.as_secs_f64(),
            super::thousands(self.snapshot_bytes as f64),
        ));
        out.push_str(&format!(
            "| TLS handshake for a name Envoy has not asked SDS for (the sidecar reads it from the store) | p50 {:.1} ms · max {:.1} ms; the same names again p50 {:.1} ms · max {:.1} ms ({HANDSHAKE_NAMES} names) | | |\n",
            percentile(&self.handshake_first_ms, 50.0),
            percentile(&self.handshake_first_ms, 100.0),
            percentile(&self.handshake_again_ms, 50.0),
            percentile(&self.handshake_again_ms, 100.0),
        ));
        out.push_str(&format!(
            "| sidecar CPU per one-site change, served as a delta to {} VMs | {per_change:.2} ms ({:.0} ms of CPU over {CHANGES} changes in {:.1} s, {:.0} ms idle over as long) · delta {} bytes | | |\n",
            self.vms,
            self.cpu_changes_ms,
            self.changes_wall.as_secs_f64(),
            self.cpu_idle_ms,
            self.delta_bytes_each,
        ));
        out.push_str(&format!(
            "| API call → every VM applied the change ({CHANGES} changes) | p50 {p50:.1} ms · p99 {p99:.1} ms · max {max:.1} ms (the API call alone: p50 {:.1} ms, p99 {:.1} ms) | p99 ≤ 100 ms | {} |\n",
            percentile(&self.api_ms, 50.0),
            percentile(&self.api_ms, 99.0),
            super::verdict(p99 <= 100.0),
        ));
        out.push_str(
            "\nEach change is one `PATCH /v1/sites/{site}` (`{\"https\":\"force\"}`, a different site each time), timed from just before the request to the latest \"policy … applied\" line Envoy logged for the new version, which must come from every VM's thread (Envoy stamps each line with its thread): a VM that did not apply it cannot be counted. Then 20 of the changed sites are asked over fresh connections, 4 times each, and must answer `force`'s 301. CPU is the sidecar's user + system time from `/proc/<pid>/stat`; per change it is (CPU over the changes − CPU over as long idle) / changes.\n",
        );
        out
    }
}
