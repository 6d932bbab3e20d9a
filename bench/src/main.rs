//! `make bench`: the measured cost of the autohttps filter beside its baselines, in one table.
//!
//! One Rust driver rather than a shell script, because half of what it measures runs in-process:
//! host calls per request kind, the policy apply time and the linear-memory size come from the
//! wasmtime proxy-wasm host (crate `proxy-wasm-host`). The other half starts
//! real servers (each under `timeout`, so they stop by themselves): Envoy (`--concurrency 1`)
//! with our filter at four policy sizes, Envoy with the baselines (native `https_redirect`, the
//! minimal proxy-wasm filter, no filter) and nginx, then drives them with wrk on loopback in
//! interleaved rounds (rotated, every other round reversed, a second's pause between runs).
//! Figures are medians over rounds; ratios are taken within each round and their median
//! reported. The table is printed and written to `tests/bench/RESULTS.md`.
//!
//! Knobs (environment): `BENCH_ROUNDS` (default 5), `BENCH_SECONDS` per wrk run (default 5),
//! `BENCH_SIZES` (default `10,1000,10000,100000`), `BENCH_OUT` (default
//! `tests/bench/RESULTS.md`; `-` prints only), `BENCH_WASM_DIR` (default the `make build`
//! output), `BENCH_ONLY=vm` (the in-process part only, for quick checks of the filter),
//! `BENCH_ONLY=policy` (the policy feed at scale, module `policy`; `BENCH_POLICY=0` skips it
//! in a full run), `BENCH_ONLY=push` (the policy push at scale on a real sidecar and Envoy,
//! module `push`; `BENCH_PUSH=0` skips it),
//! `BENCH_ONLY=issuance` (part 4 only: its rows and section of the existing results file are
//! replaced, the rest kept), `BENCH_ISSUANCE=0` (skip part 4), `BENCH_ISSUANCE_SITES` (default
//! 100) and `BENCH_STORE_CERTIFICATES` (default 10000). Part 6, the fleet (module `fleet`,
//! its own knobs there): `BENCH_ONLY=fleet` runs it alone, `BENCH_FLEET=0` skips it; its rows
//! and section are written into the results file.
//!
//! Part 4 runs the test kit's whole stack (Pebble, its mock DNS, the release sidecar, Envoy
//! with the filter) after the wrk rounds, so it never loads the machine during
//! them; it brings the sidecar's release build up to date first unless `AUTOHTTPS_BIN` names
//! another binary.
//!
//! Modules, by job: `settings` (knobs and the machine), `artefacts` (the builds and policies
//! measured), `vm` (the in-process VM probe), `servers` (Envoy, nginx, the policy feed),
//! `wrk` (the load driver), `issuance` (part 4 on the whole stack), `memory` (the sidecar's
//! resident memory on a seeded store), `fleet` (part 6: three edges on one PostgreSQL), `policy` (the policy feed at 100,000 sites:
//! snapshot and delta per VM, the stall during a snapshot),
//! `report` (the table and `RESULTS.md`). Processes, ports,
//! templates and the stack come from the test kit (`autohttps_kit`).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, anyhow, bail};
use autohttps_kit::envoy::{envoy_binary, self_signed};
use autohttps_kit::http::http_get;
use autohttps_kit::process::{Lifetime, LogMode, Process};
use autohttps_kit::render::render;
use autohttps_kit::sidecar::SidecarConfig;
use autohttps_kit::stack::{Ports as StackPorts, Stack, StackOptions};
use autohttps_kit::{free_port, repo_root, wait_until};
use proxy_wasm_host::{FilterModule, Host, HostBuilder};

mod artefacts;
mod fleet;
mod issuance;
mod memory;
mod policy;
mod push;
mod report;
mod servers;
mod settings;
mod vm;
mod wrk;
use artefacts::*;
use issuance::*;
use memory::*;
use report::*;
use servers::*;
use settings::*;
use vm::*;
use wrk::*;

/// The longest any server started here may live.
const SERVER_LIFETIME_SECS: u64 = 1200;
/// wrk: one thread, 32 connections (the baselines in TOOLCHAIN.md use the same).
const WRK_CONNECTIONS: &str = "32";
/// Names per benchmark site: the primary, `www.` and an alias.
const NAMES_PER_SITE: usize = 3;

fn main() -> anyhow::Result<()> {
    let settings = Settings::from_env()?;
    let issuance_settings = IssuanceSettings::from_env()?;
    let started = Instant::now();
    if std::env::var("BENCH_ONLY").as_deref() == Ok("issuance") {
        return issuance_only(&settings, &issuance_settings);
    }
    if std::env::var("BENCH_ONLY").as_deref() == Ok("fleet") {
        return fleet_only(&settings);
    }
    if std::env::var("BENCH_ONLY").as_deref() == Ok("policy") {
        return policy::run(&settings);
    }
    if std::env::var("BENCH_ONLY").as_deref() == Ok("push") {
        return push::run(&settings.out);
    }
    let machine = Machine::describe();
    eprintln!("==> bench: {}", machine.summary());

    let wasm = Artefacts::locate()?;
    eprintln!("==> host calls per request kind (wasmtime host)");
    let calls = host_calls(&wasm)?;
    eprintln!("==> policy apply time and VM memory (wasmtime host)");
    let policies: Vec<(usize, Arc<Vec<u8>>)> = settings
        .sizes
        .iter()
        .map(|&n| (n, Arc::new(policy_json(n, &format!("v-{n}")).into_bytes())))
        .collect();
    let mut scale = Vec::new();
    for (n, json) in &policies {
        let row = scale_in_vm(&wasm, *n, json)?;
        eprintln!(
            "    {n} sites: on_configure {:.1} ms, feed {:.1} ms, memory {:.1} MiB",
            row.configure_ms,
            row.feed_ms,
            mib(row.memory_bytes)
        );
        scale.push(row);
    }

    if std::env::var("BENCH_ONLY").as_deref() == Ok("vm") {
        return Ok(());
    }
    eprintln!("==> starting servers");
    let servers = Servers::start(&wasm, &policies)?;
    for (i, applied) in servers.envoy_apply_ms.iter().enumerate() {
        if let Some(row) = scale.get_mut(i) {
            row.envoy_feed_ms = applied.clone();
        }
    }
    let setups = servers.setups(&settings);
    for setup in &setups {
        setup.check()?;
    }

    eprintln!(
        "==> wrk: {} setups x {} rounds x {} s (interleaved)",
        setups.len(),
        settings.rounds,
        settings.seconds
    );
    for setup in &setups {
        wrk(setup, 1)?;
    }
    let mut runs: Vec<Vec<WrkRun>> = vec![Vec::new(); setups.len()];
    for round in 0..settings.rounds {
        let load = load_average();
        for k in 0..setups.len() {
            // Rotated each round and reversed every other round, so that no setup always
            // follows the same one (a TLS proxy run leaves the machine busier for a moment).
            let i = if round % 2 == 0 {
                (k + round) % setups.len()
            } else {
                (setups.len() - 1 - k + round) % setups.len()
            };
            std::thread::sleep(Duration::from_secs(1));
            let run = wrk(&setups[i], settings.seconds)?;
            eprintln!(
                "    round {} {:<34} {:>9.0} req/s  p50 {:>7.0} us  p99 {:>7.0} us{}",
                round + 1,
                setups[i].label,
                run.rps,
                run.p50_us,
                run.p99_us,
                if run.errors > 0 {
                    format!("  ({} errors)", run.errors)
                } else {
                    String::new()
                }
            );
            runs[i].push(run);
        }
        eprintln!("    (load average before round {}: {load})", round + 1);
    }
    drop(servers);
    let issuance = if std::env::var("BENCH_ISSUANCE").as_deref() == Ok("0") {
        IssuanceOutcome::NotMeasured("not measured: skipped (`BENCH_ISSUANCE=0`)".into())
    } else {
        issuance(&issuance_settings)
    };

    let results = Results {
        machine,
        settings,
        calls,
        scale,
        setups,
        runs,
        artefacts: wasm,
        issuance,
        elapsed: started.elapsed(),
        load_end: load_average(),
    };
    let markdown = results.markdown();
    println!("{markdown}");
    if results.settings.out != Path::new("-") {
        std::fs::write(&results.settings.out, &markdown)
            .with_context(|| format!("writing {}", results.settings.out.display()))?;
        eprintln!("==> written to {}", results.settings.out.display());
    }
    if std::env::var("BENCH_FLEET").as_deref() != Ok("0") {
        fleet_only(&results.settings)?;
    }
    // The policy feed at scale: in the filter's VMs (`policy`), then on the real sidecar and
    // Envoy (`push`), each writing its own section of the results file.
    if std::env::var("BENCH_POLICY").as_deref() != Ok("0") {
        policy::run(&results.settings)?;
    }
    if std::env::var("BENCH_PUSH").as_deref() != Ok("0") {
        push::run(&results.settings.out)?;
    }
    Ok(())
}

/// Part 6, the fleet (module `fleet`): printed, and its rows and section written into the
/// results file. `BENCH_ONLY=fleet` runs it alone, `BENCH_FLEET=0` skips it.
fn fleet_only(settings: &Settings) -> anyhow::Result<()> {
    eprintln!("==> part 6, the fleet: {}", Machine::describe().summary());
    let mut bench = fleet::run()?;
    bench.note = format!(
        "on {}, commit `{}`, {}; load average {} at the end",
        command_text("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        command_text(
            "git",
            &[
                "-C",
                &repo_root().to_string_lossy(),
                "describe",
                "--always",
                "--dirty"
            ],
        ),
        bench.note,
        load_average()
    );
    println!("{}\n{}", bench.rows(), bench.section());
    if settings.out != Path::new("-") {
        let existing = std::fs::read_to_string(&settings.out).unwrap_or_default();
        std::fs::write(&settings.out, fleet::patch_results(&existing, &bench))
            .with_context(|| format!("writing {}", settings.out.display()))?;
        eprintln!("==> part 6 written into {}", settings.out.display());
    }
    Ok(())
}

/// `BENCH_ONLY=issuance`: part 4 alone, written into the existing results file.
fn issuance_only(settings: &Settings, issuance_settings: &IssuanceSettings) -> anyhow::Result<()> {
    eprintln!("==> bench, part 4 only: {}", Machine::describe().summary());
    let outcome = issuance(issuance_settings);
    if settings.out == Path::new("-") {
        println!("{}\n{}", outcome.rows(), outcome.section());
    } else {
        let existing = std::fs::read_to_string(&settings.out)
            .with_context(|| format!("reading {}", settings.out.display()))?;
        std::fs::write(&settings.out, patch_results(&existing, &outcome)?)
            .with_context(|| format!("writing {}", settings.out.display()))?;
        eprintln!("==> part 4 written into {}", settings.out.display());
    }
    match outcome {
        IssuanceOutcome::Measured(_) => Ok(()),
        IssuanceOutcome::NotMeasured(why) => bail!("part 4 was {why}"),
    }
}
