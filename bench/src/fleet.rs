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

use autohttps_kit::fleet::{Fleet, FleetOptions};
use autohttps_kit::wait_until;

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
    /// CPU seconds used during the burst by each sidecar.
    pub sidecar_cpu: Vec<f64>,
    /// Pebble's CPU seconds during the burst.
    pub pebble_cpu: f64,
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
            "    {nodes} node(s): {sites} sites issued in {:.2} s ({} orders at Pebble, per node {:?}, sidecar CPU {:?} s, Pebble CPU {:.1} s)",
            burst.wall.as_secs_f64(),
            burst.orders_at_pebble,
            burst.per_node,
            burst.sidecar_cpu,
            burst.pebble_cpu
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

fn certificates_stored(fleet: &Fleet, prefix: &str) -> anyhow::Result<usize> {
    let rows = fleet.sql(&format!(
        "SELECT count(DISTINCT site) FROM certificates WHERE site LIKE '{prefix}%'"
    ))?;
    Ok(rows
        .first()
        .and_then(|r| r.first())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0))
}

/// `sites` new sites (two names each), created through the nodes' admin APIs in turn by four
/// threads; timed until every one has a certificate in the store.
fn burst(fleet: &Fleet, sites: usize) -> anyhow::Result<Burst> {
    let orders_before = fleet.pebble_orders();
    let stored_before: Vec<usize> = fleet.edges.iter().map(stored_lines).collect();
    let (cpu_before, pebble_before) = fleet.cpu_seconds();
    let start = Instant::now();
    let threads = 4;
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || -> anyhow::Result<()> {
                    for i in (t..sites).step_by(threads) {
                        let edge = &fleet.edges[i % fleet.edges.len()];
                        let primary = format!("b{i}.fleet-bench.test");
                        let body = serde_json::json!({
                            "name": format!("b{i}"),
                            "primary": primary,
                            "hostnames": [format!("www.{primary}")],
                        });
                        let (code, answer) = edge.admin("POST", "/v1/sites", Some(&body))?;
                        if code != 201 {
                            bail!(
                                "creating b{i} on edge {} answered {code}: {answer}",
                                edge.index
                            );
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        for worker in workers {
            worker
                .join()
                .map_err(|_| anyhow::anyhow!("a creating thread panicked"))??;
        }
        Ok(())
    })?;
    let created_in = start.elapsed();
    wait_until(
        &format!("{sites} sites issued"),
        Duration::from_secs(600),
        || (certificates_stored(fleet, "b").ok()? >= sites).then_some(()),
    )?;
    let wall = start.elapsed();
    let (cpu_after, pebble_after) = fleet.cpu_seconds();
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
        sidecar_cpu: cpu_after
            .iter()
            .zip(&cpu_before)
            .map(|(a, b)| ((a - b) * 10.0).round() / 10.0)
            .collect(),
        pebble_cpu: pebble_after - pebble_before,
    })
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
        if self.propagation.is_empty() {
            return None;
        }
        let rank = ((p / 100.0) * self.propagation.len() as f64).ceil() as usize;
        self.propagation
            .get(rank.saturating_sub(1).min(self.propagation.len() - 1))
            .copied()
    }

    /// The rows of the results table (`| 6 fleet | …`).
    pub fn rows(&self) -> String {
        let mut out = String::new();
        for burst in &self.bursts {
            let cpu: f64 = burst.sidecar_cpu.iter().sum();
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
                "| 6 fleet | {} new sites (2 names each) issued by {} node{} (`orders_in_flight = {}` each) | {:.2} s wall ({:.1} orders/s; created through the APIs in {:.1} s) · {} orders at Pebble · certificates per node {} · CPU: sidecars {:.1} s, Pebble {:.1} s | {ratio} | {target} | {status} |",
                self.sites,
                burst.nodes,
                if burst.nodes == 1 { "" } else { "s" },
                self.orders_in_flight,
                burst.wall.as_secs_f64(),
                self.sites as f64 / burst.wall.as_secs_f64(),
                burst.created_in.as_secs_f64(),
                burst.orders_at_pebble,
                burst
                    .per_node
                    .values()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" / "),
                cpu,
                burst.pebble_cpu,
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
            "- **Fleet.** `tests/src/fleet.rs`, as the fleet suite runs it: one throwaway PostgreSQL (`store.url`), Pebble with `PEBBLE_VA_NOSLEEP=1` and its mock DNS (every name 127.0.0.1, so every challenge is validated through edge 1 and answered from the shared store), and per node a release `autohttps` sidecar (distinct `store.node_id`, `acme.orders_in_flight = {}`) and an Envoy (`--concurrency 1`, release filter) on its own loopback address. One site per node is issued first (each node's ACME client, one shared account), then nothing else runs.",
            self.orders_in_flight
        );
        let _ = writeln!(
            out,
            "- **Burst.** {} sites `b<i>.fleet-bench.test` + `www.`, created by 4 threads through the nodes' admin APIs in turn; timed from the first creation until every site has a certificate in the store (polled with SQL every 50 ms). Orders counted at Pebble (`Added order` log lines); certificates per node from each sidecar's `certificate stored` log lines; CPU from `/proc/<pid>/stat` (user + system) over the burst.",
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
