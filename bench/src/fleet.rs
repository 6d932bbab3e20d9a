//! `make bench`'s fleet rows (`BENCH_ONLY=fleet` alone): a burst of new sites issued by one
//! node, then by three nodes sharing one PostgreSQL (each with the same
//! `acme.orders_in_flight`), against Pebble, and how long a policy change made on one node
//! takes to be enforced by every edge's Envoy. Each fleet is a [`Fleet`] as the fleet suite
//! starts it (release sidecar, release filter).
//!
//! Knobs (environment): `BENCH_FLEET_SITES` (default 300), `BENCH_FLEET_CHANGES` (default 60),
//! `BENCH_FLEET_ORDERS_IN_FLIGHT` (default 4, the sidecar's default).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use autohttps_kit::fleet::{Fleet, FleetCpu, FleetOptions, SqlSession, WaitTally};
use autohttps_kit::{ProcessCpu, wait_until};

/// What the fleet part measured.
#[derive(Debug, Clone)]
pub struct FleetBench {
    /// Sites in each burst.
    pub sites: usize,
    /// Each node's `acme.orders_in_flight`.
    pub orders_in_flight: usize,
    /// The burst on one node, then on three.
    pub bursts: Vec<Burst>,
    /// Change → enforced on every edge, one figure per change, sorted.
    pub propagation: Vec<Duration>,
    /// When it ran and how long it took.
    pub note: String,
}

/// One burst of new sites.
#[derive(Debug, Clone)]
pub struct Burst {
    /// Nodes in the fleet.
    pub nodes: usize,
    /// From the first creation until every site had a certificate in the store.
    pub wall: Duration,
    /// Creating the sites through the admin APIs took this long.
    pub created_in: Duration,
    /// Orders Pebble created during the burst.
    pub orders_at_pebble: usize,
    /// Certificates stored by each node (from its log).
    pub per_node: BTreeMap<usize, usize>,
    /// Each creation request's answer time, sorted.
    pub create_latency: Vec<Duration>,
    /// CPU seconds each process of the fleet used during the burst.
    pub cpu: FleetCpu,
    /// CPU seconds the bench process itself used during the burst (creating, polling).
    pub bench_cpu: f64,
    /// CPU seconds the whole machine was busy during the burst (every process, other work on
    /// the machine included), out of `cores` × wall.
    pub machine_cpu: f64,
    /// The machine's cores.
    pub cores: usize,
    /// What PostgreSQL's busy backends waited for while the sites were created.
    pub creation_waits: WaitTally,
    /// The same from the last creation to the last certificate.
    pub issuing_waits: WaitTally,
}

fn env_number(name: &str, default: usize) -> anyhow::Result<usize> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .with_context(|| format!("{name}={v:?} is not a number")),
        Err(_) => Ok(default),
    }
}

/// Runs both bursts and the propagation measurement.
pub fn run() -> anyhow::Result<FleetBench> {
    let sites = env_number("BENCH_FLEET_SITES", 300)?;
    let changes = env_number("BENCH_FLEET_CHANGES", 60)?;
    let orders_in_flight = env_number("BENCH_FLEET_ORDERS_IN_FLIGHT", 4)?;
    let started = Instant::now();
    let mut bursts = Vec::new();
    let mut propagation = Vec::new();
    for nodes in [1, 3] {
        let options = FleetOptions {
            edges: nodes,
            orders_in_flight,
            pebble_env: Vec::new(),
        };
        let (fleet, _dir) = Fleet::start_in_temp_dir(&format!("bench-fleet-{nodes}"), &options)?;
        warm_up(&fleet)?;
        let burst = burst(&fleet, sites)?;
        eprintln!(
            "    {nodes} node(s): {sites} sites issued in {:.2} s (created in {:.2} s, create p50 {:.0} ms p99 {:.0} ms; {} orders at Pebble, per node {:?}; CPU s: {}; PostgreSQL busy backends while creating {:?}, while issuing {:?})",
            burst.wall.as_secs_f64(),
            burst.created_in.as_secs_f64(),
            percentile(&burst.create_latency, 50.0).as_secs_f64() * 1e3,
            percentile(&burst.create_latency, 99.0).as_secs_f64() * 1e3,
            burst.orders_at_pebble,
            burst.per_node,
            burst.cpu_words(),
            burst.creation_waits,
            burst.issuing_waits,
        );
        bursts.push(burst);
        if nodes == 3 {
            propagation = changes_enforced(&fleet, changes)?;
        }
    }
    Ok(FleetBench {
        sites,
        orders_in_flight,
        bursts,
        propagation,
        note: format!("in {:.0} s", started.elapsed().as_secs_f64()),
    })
}

/// One site per node created and issued, so every node has its ACME client and the account
/// before anything is timed.
fn warm_up(fleet: &Fleet) -> anyhow::Result<()> {
    for edge in &fleet.edges {
        let name = format!("warm{}.fleet-bench.test", edge.index);
        let (code, body) = edge.admin(
            "POST",
            "/v1/sites",
            Some(&serde_json::json!({ "name": format!("warm{}", edge.index), "primary": name })),
        )?;
        if code != 201 {
            bail!("creating a warm-up site answered {code}: {body}");
        }
    }
    wait_until("the warm-up sites", Duration::from_secs(60), || {
        let issued = fleet
            .sql("SELECT count(DISTINCT site) FROM certificates WHERE site LIKE 'warm%'")
            .ok()?;
        (issued.first()?.first()?.parse::<usize>().ok()? == fleet.edges.len()).then_some(())
    })
}

fn certificates_stored(session: &mut SqlSession, prefix: &str) -> anyhow::Result<usize> {
    let rows = session.query(&format!(
        "SELECT count(DISTINCT site) FROM certificates WHERE site LIKE '{prefix}%'"
    ))?;
    Ok(rows
        .first()
        .and_then(|r| r.first())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0))
}

/// `sites` new sites (two names each), created through the nodes' admin APIs in turn by four
/// threads; timed until every one has a certificate in the store. Site `b<i>` is created on
/// node `i mod n`, and its names point (mock DNS, set before the timer starts) at that node's
/// edge, as a DNS round robin spreads a platform's names: each edge answers the CA for its
/// share of the challenges.
fn burst(fleet: &Fleet, sites: usize) -> anyhow::Result<Burst> {
    let threads = 4;
    let edge_of = |i: usize| &fleet.edges[i % fleet.edges.len()];
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || -> anyhow::Result<()> {
                    for i in (t..sites).step_by(threads) {
                        let primary = format!("b{i}.fleet-bench.test");
                        for host in [primary.clone(), format!("www.{primary}")] {
                            fleet.point_dns(&host, edge_of(i).index)?;
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        for worker in workers {
            worker
                .join()
                .map_err(|_| anyhow::anyhow!("a DNS thread panicked"))??;
        }
        Ok(())
    })?;
    let orders_before = fleet.pebble_orders();
    let stored_before: Vec<usize> = fleet.edges.iter().map(stored_lines).collect();
    let cpu_before = fleet.cpu();
    let bench_before = own_cpu_seconds();
    let machine_before = machine_busy_seconds()?;
    let sampler = fleet.sample_waits(Duration::from_millis(100))?;
    // One connection polls for the certificates: a new one per poll (20 a second) would cost
    // PostgreSQL a process start each, on the machine being measured.
    let mut session = fleet.sql_session()?;
    let start = Instant::now();
    let create_latency = std::thread::scope(|scope| -> anyhow::Result<Vec<Duration>> {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || -> anyhow::Result<Vec<Duration>> {
                    let mut latency = Vec::new();
                    for i in (t..sites).step_by(threads) {
                        let edge = edge_of(i);
                        let primary = format!("b{i}.fleet-bench.test");
                        let body = serde_json::json!({
                            "name": format!("b{i}"),
                            "primary": primary,
                            "hostnames": [format!("www.{primary}")],
                        });
                        let asked = Instant::now();
                        let (code, answer) = edge.admin("POST", "/v1/sites", Some(&body))?;
                        latency.push(asked.elapsed());
                        if code != 201 {
                            bail!(
                                "creating b{i} on edge {} answered {code}: {answer}",
                                edge.index
                            );
                        }
                    }
                    Ok(latency)
                })
            })
            .collect();
        let mut all = Vec::with_capacity(sites);
        for worker in workers {
            all.extend(
                worker
                    .join()
                    .map_err(|_| anyhow::anyhow!("a creating thread panicked"))??,
            );
        }
        all.sort();
        Ok(all)
    })?;
    let created_in = start.elapsed();
    let creation_waits = sampler.stop()?;
    let sampler = fleet.sample_waits(Duration::from_millis(100))?;
    wait_until(
        &format!("{sites} sites issued"),
        Duration::from_secs(600),
        || (certificates_stored(&mut session, "b").ok()? >= sites).then_some(()),
    )?;
    let wall = start.elapsed();
    let issuing_waits = sampler.stop()?;
    let cpu = fleet.cpu().since(&cpu_before);
    let bench_cpu = own_cpu_seconds() - bench_before;
    let machine_cpu = machine_busy_seconds()? - machine_before;
    let per_node = fleet
        .edges
        .iter()
        .zip(&stored_before)
        .map(|(e, before)| (e.index, stored_lines(e) - before))
        .collect();
    Ok(Burst {
        nodes: fleet.edges.len(),
        wall,
        created_in,
        orders_at_pebble: fleet.pebble_orders() - orders_before,
        per_node,
        create_latency,
        cpu,
        bench_cpu,
        machine_cpu,
        cores: std::thread::available_parallelism().map_or(1, usize::from),
        creation_waits,
        issuing_waits,
    })
}

/// CPU seconds this process has used so far.
fn own_cpu_seconds() -> f64 {
    ProcessCpu::of(std::process::id()).map_or(0.0, |cpu| cpu.own)
}

/// CPU seconds the machine has spent busy so far, all cores (`/proc/stat`: everything but idle
/// and I/O wait, in USER_HZ, 100 per second).
fn machine_busy_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("/proc/stat has no cpu line")?;
    let ticks: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0.0))
        .collect();
    let total: f64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3).copied().unwrap_or(0.0) + ticks.get(4).copied().unwrap_or(0.0);
    Ok((total - idle) / 100.0)
}

/// The `p`-th percentile of sorted figures (zero when there are none).
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.saturating_sub(1).min(sorted.len() - 1)]
}

impl Burst {
    /// CPU seconds per process, in words.
    fn cpu_words(&self) -> String {
        let each = |figures: &[f64]| {
            figures
                .iter()
                .map(|f| format!("{f:.1}"))
                .collect::<Vec<_>>()
                .join(" / ")
        };
        format!(
            "sidecars {}, Envoys {}, PostgreSQL {:.1}, Pebble {:.1}, bench {:.1}; machine busy {:.1} of {} × {:.1}",
            each(&self.cpu.sidecars),
            each(&self.cpu.envoys),
            self.cpu.postgres,
            self.cpu.pebble,
            self.bench_cpu,
            self.machine_cpu,
            self.cores,
            self.wall.as_secs_f64(),
        )
    }
}

fn stored_lines(edge: &autohttps_kit::fleet::Edge) -> usize {
    edge.sidecar_logs()
        .lines()
        .filter(|l| l.contains("certificate stored"))
        .count()
}

/// `changes` policy changes to one site (force ↔ auto), made on the nodes in turn through the
/// admin API; each timed until every edge's Envoy answers plain HTTP accordingly (301 for
/// force, 200 for auto), polling the three edges in turn.
fn changes_enforced(fleet: &Fleet, changes: usize) -> anyhow::Result<Vec<Duration>> {
    let host = "warm1.fleet-bench.test";
    let mut figures = Vec::with_capacity(changes);
    for n in 0..changes {
        let force = n % 2 == 0;
        let (mode, status) = if force { ("force", 301) } else { ("auto", 200) };
        let edge = &fleet.edges[n % fleet.edges.len()];
        let changed = Instant::now();
        let (code, body) = edge.admin(
            "PATCH",
            "/v1/sites/warm1",
            Some(&serde_json::json!({ "https": mode })),
        )?;
        if code != 200 {
            bail!(
                "changing warm1 on edge {} answered {code}: {body}",
                edge.index
            );
        }
        let mut waiting: Vec<usize> = fleet.edges.iter().map(|e| e.index).collect();
        while !waiting.is_empty() {
            waiting.retain(|&e| !fleet.http(e, host, "/").is_ok_and(|r| r.status == status));
            if changed.elapsed() > Duration::from_secs(30) {
                bail!("change {n} ({mode}) not enforced by edges {waiting:?} within 30 s");
            }
        }
        figures.push(changed.elapsed());
    }
    figures.sort();
    Ok(figures)
}

impl FleetBench {
    /// The burst on `nodes` nodes.
    fn burst(&self, nodes: usize) -> Option<&Burst> {
        self.bursts.iter().find(|b| b.nodes == nodes)
    }

    /// Three nodes' speed-up over one.
    pub fn speedup(&self) -> Option<f64> {
        Some(self.burst(1)?.wall.as_secs_f64() / self.burst(3)?.wall.as_secs_f64())
    }

    /// The `p`-th percentile of the change → enforced figures.
    pub fn percentile(&self, p: f64) -> Option<Duration> {
        (!self.propagation.is_empty()).then(|| percentile(&self.propagation, p))
    }

    /// The rows of the results table (`| 6 fleet | …`).
    pub fn rows(&self) -> String {
        let mut out = String::new();
        for burst in &self.bursts {
            let (ratio, target, status) = match (burst.nodes, self.speedup()) {
                (3, Some(speedup)) => (
                    format!("{speedup:.2} × 1 node"),
                    "≥ 2.5 × 1 node".to_string(),
                    if speedup >= 2.5 { "met" } else { "**missed**" }.to_string(),
                ),
                _ => ("1.00".into(), String::new(), String::new()),
            };
            let _ = writeln!(
                out,
                "| 6 fleet | {} new sites (2 names each) issued by {} node{} (`orders_in_flight = {}` each) | {:.2} s wall ({:.1} orders/s; created through the APIs in {:.1} s, a creation answered in p50 {:.0} ms, p99 {:.0} ms) · {} orders at Pebble · certificates per node {} · CPU s: {} | {ratio} | {target} | {status} |",
                self.sites,
                burst.nodes,
                if burst.nodes == 1 { "" } else { "s" },
                self.orders_in_flight,
                burst.wall.as_secs_f64(),
                self.sites as f64 / burst.wall.as_secs_f64(),
                burst.created_in.as_secs_f64(),
                percentile(&burst.create_latency, 50.0).as_secs_f64() * 1e3,
                percentile(&burst.create_latency, 99.0).as_secs_f64() * 1e3,
                burst.orders_at_pebble,
                burst
                    .per_node
                    .values()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" / "),
                burst.cpu_words(),
            );
        }
        if let (Some(p50), Some(p99)) = (self.percentile(50.0), self.percentile(99.0)) {
            let _ = writeln!(
                out,
                "| 6 fleet | policy change on one node → enforced by all 3 edges ({} changes) | p50 {:.0} ms · p99 {:.0} ms · max {:.0} ms | | ≤ 1 s p99 | {} |",
                self.propagation.len(),
                p50.as_secs_f64() * 1e3,
                p99.as_secs_f64() * 1e3,
                self.propagation
                    .last()
                    .map_or(0.0, |d| d.as_secs_f64() * 1e3),
                if p99 <= Duration::from_secs(1) {
                    "met"
                } else {
                    "**missed**"
                },
            );
        }
        out
    }

    /// The "Fleet (part 6)" section of the results file.
    pub fn section(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "## Fleet (part 6)\n");
        let _ = writeln!(out, "Measured {}.\n", self.note);
        let _ = writeln!(
            out,
            "- **Fleet.** `tests/src/fleet.rs`, as the fleet suite runs it: one throwaway PostgreSQL (`store.url`), Pebble with `PEBBLE_VA_NOSLEEP=1` and its mock DNS, and per node a release `autohttps` sidecar (distinct `store.node_id`, `acme.orders_in_flight = {}`) and an Envoy (`--concurrency 1`, release filter) on its own loopback address. One site per node is issued first (each node's ACME client, one shared account), then nothing else runs.",
            self.orders_in_flight
        );
        let _ = writeln!(
            out,
            "- **Burst.** {} sites `b<i>.fleet-bench.test` + `www.`, created by 4 threads through the nodes' admin APIs in turn (site `b<i>` on node `i mod n`); the mock DNS points both names of `b<i>` at that node's edge (set before the timer starts), as a DNS round robin spreads names over the edges, so each edge answers the CA for its share of the challenges (any node may hold the order: the key authorisations are in the shared store). Timed from the first creation until every site has a certificate in the store (polled with SQL every 50 ms, on one connection). Orders counted at Pebble (`Added order` log lines); certificates per node from each sidecar's `certificate stored` log lines; CPU from `/proc/<pid>/stat` (user + system) over the burst, per process (PostgreSQL: the server and all its backends), the bench's own, and the whole machine's busy time from `/proc/stat` (other work on the machine included).",
            self.sites
        );
        let _ = writeln!(
            out,
            "- **Change → enforced.** {} `PATCH /v1/sites/warm1` (https force ↔ auto), made on node 1, 2, 3 in turn; each timed until all three Envoys answer plain HTTP for the site accordingly (301 or 200), the edges polled with curl in turn (a poll costs a few ms, so figures are late by up to one round of three). Sorted: {}.",
            self.propagation.len(),
            self.propagation
                .iter()
                .map(|d| format!("{:.0}", d.as_secs_f64() * 1e3))
                .collect::<Vec<_>>()
                .join(" · ")
                + " ms"
        );
        out
    }
}

/// The results file with its fleet rows and "Fleet (part 6)" section replaced by `bench`'s (or
/// added: the rows after the table's last row, the section before "Host calls per request").
pub fn patch_results(existing: &str, bench: &FleetBench) -> String {
    let mut out = String::new();
    let mut rows_written = false;
    let mut in_old_section = false;
    let mut section_written = false;
    let lines: Vec<&str> = existing.lines().collect();
    let has_rows = existing.contains("| 6 fleet |");
    let last_part5 = lines.iter().rposition(|l| l.starts_with("| 5 "));
    for (i, line) in lines.iter().enumerate() {
        if line.starts_with("## ") {
            in_old_section = line.starts_with("## Fleet");
            if (in_old_section || line.starts_with("## Host calls per request")) && !section_written
            {
                out.push_str(&bench.section());
                out.push('\n');
                section_written = true;
            }
        }
        if in_old_section {
            continue;
        }
        if line.starts_with("| 6 fleet |") {
            if !rows_written {
                out.push_str(&bench.rows());
                rows_written = true;
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
        if !has_rows && Some(i) == last_part5 {
            out.push_str(&bench.rows());
            rows_written = true;
        }
    }
    if !rows_written {
        out.push_str(&bench.rows());
    }
    if !section_written {
        out.push('\n');
        out.push_str(&bench.section());
    }
    out
}
