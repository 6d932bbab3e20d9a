//! The report: the table, the part 4 rows and section, `RESULTS.md`.

use super::*;

pub(crate) const ISSUANCE_MEASURES: [(&str, &str); 3] = [
    (
        "median time from site creation to first valid handshake through Envoy",
        "",
    ),
    (
        "wall time until 100 new sites (2–3 names each) are all served",
        "≤ 60 s",
    ),
    (
        "sidecar resident memory with 10,000 certificates in the store",
        "",
    ),
];

pub(crate) fn mib_kib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

impl IssuanceOutcome {
    pub(crate) fn rows(&self) -> String {
        let mut out = String::new();
        let issuance = match self {
            IssuanceOutcome::NotMeasured(why) => {
                for (what, target) in ISSUANCE_MEASURES {
                    let _ = writeln!(
                        out,
                        "| 4 issuance | {what} | {why} | | {target} | not measured |"
                    );
                }
                return out;
            }
            IssuanceOutcome::Measured(issuance) => issuance,
        };
        let served: Vec<Duration> = issuance.single.iter().map(|s| s.served).collect();
        let stored: Vec<Duration> = issuance.single.iter().filter_map(|s| s.stored).collect();
        let _ = writeln!(
            out,
            "| 4 issuance | {} | {} ({} sites of 2 names, one at a time; {} to {}) | certificate stored after {} (median) | | |",
            ISSUANCE_MEASURES[0].0,
            secs(median_duration(&served)),
            served.len(),
            secs(served.iter().min().copied().unwrap_or_default()),
            secs(served.iter().max().copied().unwrap_or_default()),
            secs(median_duration(&stored)),
        );
        let b = &issuance.burst;
        let what = format!(
            "wall time until {} new sites (2–3 names each) are all served",
            b.sites
        );
        let (result, status) = match b.all_served() {
            Some(all) => (
                format!(
                    "{} ({} names; created in {}, half the names served by {})",
                    secs(all),
                    b.names,
                    secs(b.created),
                    b.half_served().map_or("?".into(), secs)
                ),
                verdict(b.sites < 100 || all <= Duration::from_secs(60)).to_string(),
            ),
            None => (
                format!(
                    "{} of {} names served within {} s",
                    b.served.iter().flatten().count(),
                    b.names,
                    SERVE_LIMIT.as_secs()
                ),
                verdict(false).to_string(),
            ),
        };
        let _ = writeln!(
            out,
            "| 4 issuance | {what} | {result} | {} certificates stored, the last after {} ({:.1} orders/s, {} in flight) | {} | {status} |",
            b.stored.len(),
            b.stored.last().map_or("?".into(), |d| secs(*d)),
            b.orders_per_second(),
            issuance.orders_in_flight,
            ISSUANCE_MEASURES[1].1,
        );
        let (empty, full) = (issuance.memory.first(), issuance.memory.last());
        if let (Some(empty), Some(full)) = (empty, full) {
            let _ = writeln!(
                out,
                "| 4 issuance | sidecar resident memory with {} certificates in the store | {} (VmRSS, SDS index built) · {} after serving the policy feed · peak {} | 0 certificates: {} | | |",
                thousands(full.certificates as f64),
                mib_kib(full.rss_kib),
                mib_kib(full.rss_after_feed_kib),
                mib_kib(full.peak_kib),
                mib_kib(empty.rss_after_feed_kib),
            );
        }
        out
    }

    pub(crate) fn section(&self) -> String {
        let mut out = String::from("## Issuance (part 4)\n\n");
        let issuance = match self {
            IssuanceOutcome::NotMeasured(why) => {
                let _ = writeln!(out, "In this run part 4 was {why}.");
                return out;
            }
            IssuanceOutcome::Measured(issuance) => issuance,
        };
        let b = &issuance.burst;
        let single_order = median_duration(
            &issuance
                .single
                .iter()
                .filter_map(|s| s.stored)
                .collect::<Vec<_>>(),
        );
        let _ = writeln!(
            out,
            "Measured on {}, commit `{}`, in {:.0} s; load average {} at the start, {} at the end.\n",
            issuance.date,
            issuance.commit,
            issuance.elapsed.as_secs_f64(),
            issuance.load_start,
            issuance.load_end
        );
        let _ = writeln!(
            out,
            "- **Stack.** `kit/src/stack.rs`, as the end-to-end suite runs it: pebble-challtestsrv (mock DNS, every name 127.0.0.1), Pebble with `PEBBLE_VA_NOSLEEP=1` validating HTTP-01 through Envoy's plain listener, the release `autohttps` sidecar, Envoy (`--concurrency 1`) with `envoy/edge.yaml` and the release filter fetching certificates over SDS, and the demo backend. Sidecar settings: `acme.orders_in_flight = {}`, `acme.debounce_ms = {}`, DNS pre-check {} (against the mock DNS). A warm-up site (which also registers the ACME account) is served before anything is timed.\n\
- **A handshake** is `curl --cacert <Pebble's root> --resolve <name>:<port>:127.0.0.1 https://<name>/` through Envoy answering 200: the chain verified against Pebble's root, for that SNI.\n\
- **Creation → first handshake.** {} sites of two names (`one<i>.issuance.test`, `www.`), each created with `POST /v1/sites` once the previous one is served; its primary name is tried every ≈ 50 ms. Each: {}. The \"certificate stored\" line of the sidecar's log came after {} (median): the rest is SDS delivery to Envoy and the polling step.\n\
- **{} new sites.** `b<i>.issuance.test` and `www.` each, plus `shop.` for even *i* ({} names), created by {CREATORS} threads as fast as the admin API answers (all created after {}), then every name not yet served tried in turn by {POLLERS} threads ({} handshakes in all; a name is retried once per pass over the names still waiting, so the figure is late by up to one pass). Certificates stored (sidecar log, from the first creation): first after {}, last after {}; the last name served after {}. Warnings or errors in the sidecar's log meanwhile: {}.\n\
- **What bounds it.** One order alone takes {} from creation to stored certificate; with `orders_in_flight = {}` that allows {:.1} orders/s, and the burst ran at {:.1} orders/s: the orders in flight, not Pebble, Envoy or the DNS pre-check, set the pace ({} sites ≈ sites × one order ÷ orders in flight). Nearly all of one order is waiting: the ACME polling policy (`POLL` in `sidecar/src/acme/mod.rs`, instant-acme's `RetryPolicy`) sleeps its initial 200 ms before the first readiness check and again before the first certificate download, and Pebble with `PEBBLE_VA_NOSLEEP=1` has validated and issued by then. A shorter first delay or more orders in flight would shorten both figures against Pebble; against a public CA, validation itself takes seconds. The store keeps schedule times in whole seconds, so a debounce under a second ends at the next whole second or at once.\n\
- **Resident memory.** A store seeded through the sidecar's own store code (`SqliteStore::create_site` + `store_certificate`) with N sites of two names, each with a current self-signed P-256 certificate made with rcgen and nothing due for issuance; the release sidecar is started on it alone and `VmRSS` read from `/proc/<pid>/status` 2 s after SDS built its index (every current certificate parsed into memory), then again after one `GET /v1/policy` (what every Envoy fetches); peak is `VmHWM`.\n",
            issuance.orders_in_flight,
            issuance.debounce_ms,
            if issuance.precheck { "on" } else { "off" },
            issuance.single.len(),
            issuance
                .single
                .iter()
                .map(|s| secs(s.served))
                .collect::<Vec<_>>()
                .join(" · "),
            secs(median_duration(
                &issuance
                    .single
                    .iter()
                    .filter_map(|s| s.stored)
                    .collect::<Vec<_>>()
            )),
            b.sites,
            b.names,
            secs(b.created),
            b.handshakes,
            b.stored.first().map_or("?".into(), |d| secs(*d)),
            b.stored.last().map_or("?".into(), |d| secs(*d)),
            b.all_served().map_or("— (not all)".into(), secs),
            b.problems.len(),
            secs(single_order),
            issuance.orders_in_flight,
            issuance.orders_in_flight as f64 / single_order.as_secs_f64().max(1e-3),
            b.orders_per_second(),
            b.sites,
        );
        let _ = writeln!(
            out,
            "| certificates in the store | store seeded in | database | sidecar ready in | VmRSS, index built | VmRSS after the policy feed (its size) | VmHWM |\n| --- | --- | --- | --- | --- | --- | --- |"
        );
        for row in &issuance.memory {
            let _ = writeln!(
                out,
                "| {} | {:.1} s | {:.1} MB | {:.2} s | {} | {} ({} bytes) | {} |",
                thousands(row.certificates as f64),
                row.seed.as_secs_f64(),
                row.database_bytes as f64 / 1e6,
                row.ready.as_secs_f64(),
                mib_kib(row.rss_kib),
                mib_kib(row.rss_after_feed_kib),
                thousands(row.policy_bytes as f64),
                mib_kib(row.peak_kib),
            );
        }
        out
    }
}

/// Replaces the part 4 rows and the "Issuance (part 4)" section of an existing results file
/// (`BENCH_ONLY=issuance`), keeping everything else as it was measured.
pub(crate) fn patch_results(existing: &str, outcome: &IssuanceOutcome) -> anyhow::Result<String> {
    let mut out = String::new();
    let mut rows_written = false;
    let mut in_old_section = false;
    for line in existing.lines() {
        if line.starts_with("## ") {
            in_old_section = line.starts_with("## Issuance");
            if line.starts_with("## Host calls per request") {
                out.push_str(&outcome.section());
                out.push('\n');
            }
        }
        if in_old_section {
            continue;
        }
        if line.starts_with("| 4 issuance |") {
            if !rows_written {
                out.push_str(&outcome.rows());
                rows_written = true;
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    if !rows_written {
        bail!(
            "the results file has no `| 4 issuance |` rows to replace; run the whole `make bench`"
        );
    }
    if !out.contains("## Issuance") {
        out.push('\n');
        out.push_str(&outcome.section());
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// The table

pub(crate) struct Results {
    pub(crate) machine: Machine,
    pub(crate) settings: Settings,
    pub(crate) calls: CallCounts,
    pub(crate) scale: Vec<ScaleRow>,
    pub(crate) setups: Vec<Setup>,
    pub(crate) runs: Vec<Vec<WrkRun>>,
    pub(crate) artefacts: Artefacts,
    pub(crate) issuance: IssuanceOutcome,
    pub(crate) elapsed: Duration,
    pub(crate) load_end: String,
}

/// Medians of one setup's runs.
#[derive(Clone, Copy)]
pub(crate) struct Summary {
    pub(crate) rps: f64,
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
}

pub(crate) fn thousands(value: f64) -> String {
    if !value.is_finite() {
        return "—".into();
    }
    let digits = format!("{:.0}", value);
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub(crate) fn ms(us: f64) -> String {
    format!("{:.2} ms", us / 1e3)
}

pub(crate) fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "**missed**" }
}

impl Results {
    pub(crate) fn index(&self, key: &str) -> Option<usize> {
        self.setups.iter().position(|s| s.key == key)
    }

    pub(crate) fn summary(&self, key: &str) -> Option<Summary> {
        let runs = &self.runs[self.index(key)?];
        let mut rps: Vec<f64> = runs.iter().map(|r| r.rps).collect();
        let mut p50: Vec<f64> = runs.iter().map(|r| r.p50_us).collect();
        let mut p99: Vec<f64> = runs.iter().map(|r| r.p99_us).collect();
        Some(Summary {
            rps: median(&mut rps),
            p50_us: median(&mut p50),
            p99_us: median(&mut p99),
        })
    }

    /// Median over rounds of `a ÷ b`, each ratio taken within one round.
    pub(crate) fn ratio(&self, a: &str, b: &str, pick: fn(&WrkRun) -> f64) -> f64 {
        let (Some(a), Some(b)) = (self.index(a), self.index(b)) else {
            return f64::NAN;
        };
        let mut ratios: Vec<f64> = self.runs[a]
            .iter()
            .zip(&self.runs[b])
            .map(|(x, y)| pick(x) / pick(y))
            .collect();
        median(&mut ratios)
    }

    pub(crate) fn markdown(&self) -> String {
        let rps = |r: &WrkRun| r.rps;
        let p99 = |r: &WrkRun| r.p99_us;
        let s = &self.settings;
        let m = &self.machine;
        let headline = s.headline();
        let headline_key = format!("filter-{headline}");
        let mut out = String::new();
        let _ = writeln!(out, "# autohttps benchmark results\n");
        let _ = writeln!(
            out,
            "Produced by `make bench` (bench/, crate autohttps-bench) on {}, commit `{}`, in {:.0} s.\n",
            m.date,
            m.commit,
            self.elapsed.as_secs_f64()
        );
        let _ = writeln!(
            out,
            "- Machine: {}, {} cores, {} RAM, {}\n- Load average (1, 5, 15 min): {} at the start, {} at the end\n- Envoy {} (`--concurrency 1`, V8), {}, {}, {}\n- wrk `-t1 -c{WRK_CONNECTIONS}` on loopback, {} interleaved rounds of {} s per setup; each figure is the median over rounds, each ratio the median of per-round ratios.\n",
            m.cpu,
            m.cores,
            m.memory,
            m.kernel,
            m.load_start,
            self.load_end,
            m.envoy,
            m.nginx,
            m.wrk,
            m.rustc,
            s.rounds,
            s.seconds
        );

        let _ = writeln!(
            out,
            "| part | measurement | result | ratio | target | status |\n| --- | --- | --- | --- | --- | --- |"
        );
        let wrk_cell = |key: &str| -> String {
            self.summary(key).map_or("—".into(), |x| {
                format!(
                    "{} req/s · p50 {} · p99 {}",
                    thousands(x.rps),
                    ms(x.p50_us),
                    ms(x.p99_us)
                )
            })
        };
        // Part 1: the redirect path.
        let to_min = self.ratio(&headline_key, "minimal", rps);
        let to_native = self.ratio(&headline_key, "native", rps);
        let _ = writeln!(
            out,
            "| 1 redirect | our filter, force, {} sites | {} | {:.3} × minimal · {:.2} × native | ≥ 0.95 × minimal | {} |",
            thousands(headline as f64),
            wrk_cell(&headline_key),
            to_min,
            to_native,
            verdict(to_min >= 0.95)
        );
        let p99_ratio = self.ratio(&headline_key, "minimal", p99);
        let _ = writeln!(
            out,
            "| 1 redirect | our filter p99 latency | {} | {:.2} × minimal | ≤ 1.1 × minimal | {} |",
            self.summary(&headline_key)
                .map_or("—".into(), |x| ms(x.p99_us)),
            p99_ratio,
            verdict(p99_ratio <= 1.1)
        );
        let _ = writeln!(
            out,
            "| 1 redirect | minimal proxy-wasm filter (the floor) | {} | {:.2} × native | | |",
            wrk_cell("minimal"),
            self.ratio("minimal", "native", rps)
        );
        let _ = writeln!(
            out,
            "| 1 redirect | Envoy native `https_redirect` (the limit) | {} | 1.00 | | |",
            wrk_cell("native")
        );
        let _ = writeln!(
            out,
            "| 1 redirect | nginx `return 301` | {} | {:.2} × native | | |",
            wrk_cell("nginx"),
            self.ratio("nginx", "native", rps)
        );
        let total = |calls: &BTreeMap<&str, u64>| calls.values().sum::<u64>();
        let minimal_calls = self.calls.rows.last().map(|(_, c)| total(c)).unwrap_or(0);
        let per_kind: Vec<String> = self
            .calls
            .rows
            .iter()
            .map(|(kind, calls)| format!("{kind}: {}", total(calls)))
            .collect();
        let _ = writeln!(
            out,
            "| 1 redirect | host calls per request (wasmtime host; details below) | {} | minimal filter: {minimal_calls} | | |",
            per_kind.join(" · ")
        );
        // Part 2: pass-through.
        let proxy = self.ratio("proxy-filter", "proxy-none", rps);
        let _ = writeln!(
            out,
            "| 2 pass-through | HTTPS → nginx backend, filter in auto mode adding CSP ({} sites) | {} | {:.3} × no filter | ≥ 0.85 × no filter | {} |",
            thousands(headline as f64),
            wrk_cell("proxy-filter"),
            proxy,
            verdict(proxy >= 0.85)
        );
        let _ = writeln!(
            out,
            "| 2 pass-through | HTTPS → nginx backend, no filter | {} | 1.00 | | |",
            wrk_cell("proxy-none")
        );
        // Part 3: policy scale.
        let smallest = self.scale.first().map(|r| r.sites).unwrap_or(0);
        for row in &self.scale {
            let key = format!("filter-{}", row.sites);
            let scale_ratio = self.ratio(&key, &format!("filter-{smallest}"), rps);
            let envoy = if row.envoy_feed_ms.is_empty() {
                "—".to_string()
            } else {
                row.envoy_feed_ms
                    .iter()
                    .map(|v| format!("{v:.0}"))
                    .collect::<Vec<_>>()
                    .join(" / ")
                    + " ms"
            };
            let apply_worst = row
                .envoy_feed_ms
                .iter()
                .copied()
                .fold(row.configure_ms.max(row.feed_ms), f64::max);
            let _ = writeln!(
                out,
                "| 3 scale | {} sites ({} names, {:.1} MB JSON): apply | on_configure {:.1} ms · feed {:.1} ms (wasmtime) · feed in Envoy per VM {} | | {} | {} |",
                thousands(row.sites as f64),
                thousands((row.sites * NAMES_PER_SITE) as f64),
                row.json_bytes as f64 / 1e6,
                row.configure_ms,
                row.feed_ms,
                envoy,
                if row.sites == 100_000 {
                    "≤ 250 ms per VM"
                } else {
                    ""
                },
                if row.sites == 100_000 {
                    verdict(apply_worst <= 250.0)
                } else {
                    ""
                }
            );
            let _ = writeln!(
                out,
                "| 3 scale | {} sites: VM memory (linear memory after on_configure) | {:.1} MiB | | {} | {} |",
                thousands(row.sites as f64),
                mib(row.memory_bytes),
                if row.sites == 100_000 {
                    "≤ 64 MiB"
                } else {
                    ""
                },
                if row.sites == 100_000 {
                    verdict(mib(row.memory_bytes) <= 64.0)
                } else {
                    ""
                }
            );
            let _ = writeln!(
                out,
                "| 3 scale | {} sites: redirect throughput | {} | {:.3} × {} sites | {} | {} |",
                thousands(row.sites as f64),
                wrk_cell(&key),
                scale_ratio,
                thousands(smallest as f64),
                if row.sites == 100_000 {
                    "≥ 0.95 × 10 sites"
                } else {
                    ""
                },
                if row.sites == 100_000 {
                    verdict(scale_ratio >= 0.95)
                } else {
                    ""
                }
            );
        }
        // Part 4: issuance.
        out.push_str(&self.issuance.rows());
        // Part 5: the artefact.
        let kib = self.artefacts.filter_bytes as f64 / 1024.0;
        let _ = writeln!(
            out,
            "| 5 artefact | release `autohttps_filter.wasm` | {} bytes ({kib:.1} KiB) | minimal filter: {:.1} KiB | ≤ 300 KiB | {} |",
            thousands(self.artefacts.filter_bytes as f64),
            self.artefacts.minimal_bytes as f64 / 1024.0,
            verdict(kib <= 300.0)
        );

        let _ = writeln!(out, "\n## How to read it\n");
        let _ = writeln!(
            out,
            "- **Setups.** Our filter runs in force mode on a plain listener (the filter answers the 301 itself) and in auto mode on a TLS listener proxying to nginx (`return 200`), where it adds `Content-Security-Policy: upgrade-insecure-requests`. Each policy size has its own Envoy, started with an empty inline policy; the benchmark policy then arrives through the policy feed (a server in the driver), which is how the feed apply time inside Envoy is taken: from the moment the feed finished sending the body to each VM's `policy … applied` log line (Envoy runs two polling VMs with `--concurrency 1`: the main thread's and the worker's; both parse at once on this 2-core machine, and the time includes reading the body).\n\
- **The floor.** `tests/minimal-filter` reads `:authority` and `:path`, answers 301, logs one line at info level (its Envoy runs at `-l warn`, so Envoy drops it) and bumps one counter: 5 host calls per request. Its Envoy also holds the native-redirect listener and the no-filter TLS listener; runs are sequential, so listeners never compete.\n\
- **VM memory** is the wasm linear memory after `proxy_on_configure` with the policy inline (it never shrinks, so it is the peak), read from the wasmtime host (crate `proxy-wasm-host`); **apply (wasmtime)** is the `proxy_on_configure` call alone, and the feed figure the `on_http_call_response` that parses and swaps the policy, both with Cranelift-compiled code (Envoy runs V8).\n\
- **Policy** (generated): site *i* has `s<i>.bench.test`, `www.s<i>.bench.test` and `alias-<i>.example.net`, every name's certificate ready; even sites force HTTPS with HSTS, odd sites are auto with `mixed_content: upgrade`. Requests go to a site in the middle of the table.\n\
- **Noise.** On 2 cores wrk, Envoy's worker and (for pass-through) nginx share the CPUs with anything else running; compare ratios (taken within a round) rather than absolute figures, and check the load average above."
        );
        let _ = writeln!(out, "\n{}", self.issuance.section().trim_end());
        let _ = writeln!(out, "\n## Host calls per request, by kind\n");
        let _ = writeln!(
            out,
            "Counted in the wasmtime host (tests/wasm-host) over one whole stream (request headers, response headers where the request reaches the upstream, end of stream).\n"
        );
        let _ = writeln!(out, "| request kind | total | calls |\n| --- | --- | --- |");
        for (kind, calls) in &self.calls.rows {
            let list: Vec<String> = calls.iter().map(|(n, c)| format!("{n} ×{c}")).collect();
            let _ = writeln!(out, "| {kind} | {} | {} |", total(calls), list.join(", "));
        }

        let _ = writeln!(out, "\n## Every run\n");
        let _ = writeln!(
            out,
            "| setup | req/s per round | p99 per round |\n| --- | --- | --- |"
        );
        for (setup, runs) in self.setups.iter().zip(&self.runs) {
            let r: Vec<String> = runs.iter().map(|r| thousands(r.rps)).collect();
            let p: Vec<String> = runs.iter().map(|r| ms(r.p99_us)).collect();
            let errors: u64 = runs.iter().map(|r| r.errors).sum();
            let _ = writeln!(
                out,
                "| {}{} | {} | {} |",
                setup.label,
                if errors > 0 {
                    format!(" ({errors} errors)")
                } else {
                    String::new()
                },
                r.join(" · "),
                p.join(" · ")
            );
        }
        out
    }
}
