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
//! `BENCH_ONLY=issuance` (part 4 only: its rows and section of the existing results file are
//! replaced, the rest kept), `BENCH_ONLY=push` (the policy push at scale on a real sidecar and
//! Envoy: its own section, see `bench/push.rs`), `BENCH_ISSUANCE=0` (skip part 4), `BENCH_ISSUANCE_SITES` (default
//! 100) and `BENCH_STORE_CERTIFICATES` (default 10000).
//!
//! Part 4 runs the whole stack of `tests/src/stack.rs` (Pebble, its mock DNS, the release
//! sidecar, Envoy with the filter) after the wrk rounds, so it never loads the machine during
//! them; it brings the sidecar's release build up to date first unless `AUTOHTTPS_BIN` names
//! another binary.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, anyhow, bail};
use autohttps_tests::envoy::{envoy_binary, free_port, http_get, render, repo_root, self_signed};
use autohttps_tests::stack::{Ports as StackPorts, Stack, StackOptions, wait_until};
use proxy_wasm_host::{FilterModule, Host, HostBuilder};

#[path = "bench/push.rs"]
mod push;

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

// ---------------------------------------------------------------------------------------------
// Settings and machine

/// A number from the environment variable `name`, or `default` when it is unset.
fn env_number<T: std::str::FromStr>(name: &str, default: T) -> anyhow::Result<T> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}={v:?} is not a number")),
        Err(_) => Ok(default),
    }
}

struct Settings {
    rounds: usize,
    seconds: u64,
    sizes: Vec<usize>,
    out: PathBuf,
}

impl Settings {
    fn from_env() -> anyhow::Result<Settings> {
        let number = |name: &str, default: u64| env_number(name, default);
        let sizes = match std::env::var("BENCH_SIZES") {
            Ok(v) => v
                .split(',')
                .map(|s| s.trim().parse::<usize>())
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("BENCH_SIZES={v:?} is not a list of numbers"))?,
            Err(_) => vec![10, 1_000, 10_000, 100_000],
        };
        if sizes.is_empty() || sizes.contains(&0) {
            bail!("BENCH_SIZES needs at least one size, each more than 0");
        }
        let out = std::env::var_os("BENCH_OUT")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join("tests/bench/RESULTS.md"));
        Ok(Settings {
            rounds: usize::try_from(number("BENCH_ROUNDS", 5)?)?.max(1),
            seconds: number("BENCH_SECONDS", 5)?.max(1),
            sizes,
            out,
        })
    }

    /// The size whose filter Envoy carries the headline comparison: 10,000 sites when measured.
    fn headline(&self) -> usize {
        if self.sizes.contains(&10_000) {
            10_000
        } else {
            self.sizes[self.sizes.len() / 2]
        }
    }
}

struct Machine {
    cpu: String,
    cores: usize,
    memory: String,
    kernel: String,
    envoy: String,
    nginx: String,
    wrk: String,
    rustc: String,
    commit: String,
    date: String,
    load_start: String,
}

fn command_text(program: &str, args: &[&str]) -> String {
    match Command::new(program).args(args).output() {
        Ok(out) => {
            let text = if out.stdout.is_empty() {
                out.stderr
            } else {
                out.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .unwrap_or("")
                .to_string()
        }
        Err(_) => format!("({program} not found)"),
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

impl Machine {
    fn describe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "?".into());
        let memory = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                let kb: u64 = m
                    .lines()
                    .find(|l| l.starts_with("MemTotal:"))?
                    .split_whitespace()
                    .nth(1)?
                    .parse()
                    .ok()?;
                Some(format!("{:.1} GiB", kb as f64 / 1024.0 / 1024.0))
            })
            .unwrap_or_else(|| "?".into());
        let envoy = envoy_binary()
            .map(|p| command_text(&p.to_string_lossy(), &["--version"]))
            .unwrap_or_else(|e| e.to_string());
        // "envoy  version: <hash>/1.40.0/Clean/RELEASE/BoringSSL"
        let envoy = envoy
            .split_whitespace()
            .last()
            .and_then(|w| w.split('/').nth(1))
            .unwrap_or(&envoy)
            .to_string();
        Machine {
            cpu,
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            memory,
            kernel: command_text("uname", &["-srm"]),
            envoy,
            nginx: command_text("nginx", &["-v"]),
            wrk: command_text("wrk", &["-v"])
                .split(" [")
                .next()
                .unwrap_or("")
                .to_string(),
            rustc: command_text("rustc", &["-V"]),
            commit: command_text(
                "git",
                &[
                    "-C",
                    &repo_root().to_string_lossy(),
                    "describe",
                    "--always",
                    "--dirty",
                ],
            ),
            date: command_text("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            load_start: load_average(),
        }
    }

    fn summary(&self) -> String {
        format!(
            "{} ({} cores), load average {}",
            self.cpu, self.cores, self.load_start
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Artefacts and policies

struct Artefacts {
    filter: PathBuf,
    minimal: PathBuf,
    filter_bytes: u64,
    minimal_bytes: u64,
}

impl Artefacts {
    /// The release `.wasm` files `make build` (and `make bench`) produce.
    fn locate() -> anyhow::Result<Artefacts> {
        let dir = std::env::var_os("BENCH_WASM_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join("target/wasm32-wasip1/wasm-release"));
        let filter = dir.join("autohttps_filter.wasm");
        let minimal = dir.join("autohttps_minimal_filter.wasm");
        let size = |p: &Path| -> anyhow::Result<u64> {
            Ok(std::fs::metadata(p)
                .with_context(|| format!("{} is missing; run `make build`", p.display()))?
                .len())
        };
        Ok(Artefacts {
            filter_bytes: size(&filter)?,
            minimal_bytes: size(&minimal)?,
            filter,
            minimal,
        })
    }
}

/// The benchmark policy: `n` sites of three names each, every name's certificate ready.
/// Even sites force HTTPS with HSTS; odd sites are `auto` with `mixed_content: upgrade`.
fn policy_json(n: usize, version: &str) -> String {
    let mut out = String::with_capacity(n * 260 + 128);
    let _ = write!(
        out,
        r#"{{"schema": 1, "version": "{version}", "settings": {{"http_port": 80, "https_port": 443}}, "sites": ["#
    );
    for i in 0..n {
        if i > 0 {
            out.push(',');
        }
        let names = format!(r#""s{i}.bench.test", "www.s{i}.bench.test", "alias-{i}.example.net""#);
        let mode = if i % 2 == 0 {
            r#""https": "force", "hsts": {"enabled": true, "max_age": 31536000}"#
        } else {
            r#""https": "auto", "mixed_content": "upgrade""#
        };
        let _ = write!(
            out,
            r#"{{"id": "site-{i}", "hostnames": [{names}], {mode}, "cert_ready": [{names}]}}"#
        );
    }
    out.push_str("]}");
    out
}

/// A site of the policy that forces HTTPS (even) or passes with CSP (odd), near the middle.
fn force_host(n: usize) -> String {
    format!("s{}.bench.test", (n / 2) & !1)
}

fn auto_host(n: usize) -> String {
    format!("s{}.bench.test", ((n / 2) & !1) + 1)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1024.0 / 1024.0
}

// ---------------------------------------------------------------------------------------------
// Part 1b: host calls per request kind, in the wasmtime host

/// Host calls one request makes, by kind.
struct CallCounts {
    rows: Vec<(&'static str, BTreeMap<&'static str, u64>)>,
}

fn stream_calls(
    host: &mut Host,
    tls: bool,
    request: &[(&str, &str)],
    response: Option<&[(&str, &str)]>,
) -> anyhow::Result<BTreeMap<&'static str, u64>> {
    let before = host.host_call_counts().clone();
    let mut stream = host.http_stream()?;
    stream.set_property(&["source", "address"], "127.0.0.1:40000");
    if tls {
        stream.set_property(&["connection", "tls_version"], "TLSv1.3");
    }
    stream.request_headers(request, true)?;
    if stream.local_response().is_none()
        && let Some(response) = response
    {
        stream.response_headers(response, true)?;
    }
    stream.complete()?;
    let after = host.host_call_counts();
    Ok(after
        .iter()
        .filter_map(|(name, count)| {
            let delta = count - before.get(name).copied().unwrap_or(0);
            (delta > 0).then_some((*name, delta))
        })
        .collect())
}

fn host_calls(wasm: &Artefacts) -> anyhow::Result<CallCounts> {
    let n = 1_000;
    let module = FilterModule::load(&wasm.filter)?;
    let config = format!(r#"{{"policy": {}}}"#, policy_json(n, "calls"));
    let mut host = HostBuilder::new(&module)
        .plugin_configuration(config.into_bytes())
        .build()?;
    if !host.configuration_accepted() {
        bail!(
            "the filter rejected the benchmark policy: {:?}",
            host.logs()
        );
    }
    let force = force_host(n);
    let auto = auto_host(n);
    fn request<'a>(host: &'a str, path: &'a str) -> [(&'a str, &'a str); 5] {
        [
            (":method", "GET"),
            (":scheme", "http"),
            (":authority", host),
            (":path", path),
            ("user-agent", "bench"),
        ]
    }
    let ok: &[(&str, &str)] = &[(":status", "200"), ("content-type", "text/plain")];
    let mut rows = Vec::new();
    let r = request(&force, "/index.html?a=1");
    rows.push((
        "force redirect (HTTP, force site)",
        stream_calls(&mut host, false, &r, Some(ok))?,
    ));
    let r = request(&auto, "/index.html");
    rows.push((
        "auto pass-through over HTTPS, CSP added",
        stream_calls(&mut host, true, &r, Some(ok))?,
    ));
    let r = request(&force, "/index.html");
    rows.push((
        "force site over HTTPS, HSTS added",
        stream_calls(&mut host, true, &r, Some(ok))?,
    ));
    let r = request("unknown.example.org", "/");
    rows.push((
        "unknown host",
        stream_calls(&mut host, false, &r, Some(ok))?,
    ));
    let r = request(&force, "/.well-known/acme-challenge/token");
    rows.push((
        "ACME HTTP-01 path",
        stream_calls(&mut host, false, &r, Some(ok))?,
    ));
    let minimal = FilterModule::load(&wasm.minimal)?;
    let mut host = HostBuilder::new(&minimal).build()?;
    let r = request(&force, "/index.html?a=1");
    rows.push((
        "minimal filter (floor): redirect",
        stream_calls(&mut host, false, &r, Some(ok))?,
    ));
    Ok(CallCounts { rows })
}

// ---------------------------------------------------------------------------------------------
// Part 3a: policy apply time and VM memory, in-process

struct ScaleRow {
    sites: usize,
    json_bytes: usize,
    configure_ms: f64,
    feed_ms: f64,
    memory_bytes: u64,
    envoy_feed_ms: Vec<f64>,
}

fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

fn scale_in_vm(wasm: &Artefacts, n: usize, json: &[u8]) -> anyhow::Result<ScaleRow> {
    let module = FilterModule::load(&wasm.filter)?;
    let mut inline = Vec::with_capacity(json.len() + 16);
    inline.extend_from_slice(b"{\"policy\": ");
    inline.extend_from_slice(json);
    inline.push(b'}');
    let repeats = if n >= 100_000 { 3 } else { 5 };

    // From on_configure: the host times the call alone; the memory size is read after it.
    let mut configure = Vec::new();
    let mut memory_bytes = 0;
    for _ in 0..repeats {
        let host = HostBuilder::new(&module)
            .plugin_configuration(inline.clone())
            .build()?;
        if !host.configuration_accepted() {
            bail!("the filter rejected the {n}-site policy: {:?}", host.logs());
        }
        configure.push(host.configure_time().as_secs_f64() * 1e3);
        memory_bytes = host.linear_memory_bytes();
    }

    // Through the feed: the VM already runs a tiny policy, then the feed delivers this one.
    let feed_config = br#"{"policy": {"schema": 1, "version": "boot", "sites": []}, "feed": {"cluster": "feed", "interval_ms": 1000}}"#;
    let mut feed = Vec::new();
    for _ in 0..repeats {
        let mut host = HostBuilder::new(&module)
            .plugin_configuration(feed_config.to_vec())
            .cluster("feed")
            .build()?;
        host.advance_clock(Duration::from_millis(1000))?;
        let token = host
            .pending_http_calls()
            .first()
            .map(|c| c.token)
            .ok_or_else(|| anyhow!("the filter did not poll its feed"))?;
        let started = Instant::now();
        host.respond_to_http_call(token, &[(":status", "200"), ("etag", "\"b\"")], json)?;
        feed.push(started.elapsed().as_secs_f64() * 1e3);
        let applied = host
            .metric("autohttps.policy_sites")
            .map(|m| m.value)
            .unwrap_or(0);
        if applied != n as u64 {
            bail!(
                "the feed did not apply the {n}-site policy: {:?}",
                host.logs()
            );
        }
    }
    Ok(ScaleRow {
        sites: n,
        json_bytes: json.len(),
        configure_ms: median(&mut configure),
        feed_ms: median(&mut feed),
        memory_bytes,
        envoy_feed_ms: Vec::new(),
    })
}

// ---------------------------------------------------------------------------------------------
// Servers

/// A server process started under `timeout`; stopped (TERM, then KILL) when dropped.
struct Server {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Server {
    fn spawn(name: &str, program: &Path, args: &[String], log: PathBuf) -> anyhow::Result<Server> {
        let log_file = std::fs::File::create(&log)?;
        let child = Command::new("timeout")
            .args(["--signal=TERM", "--kill-after=5"])
            .arg(SERVER_LIFETIME_SECS.to_string())
            .arg(program)
            .args(args)
            .env("TZ", "UTC")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        Ok(Server {
            name: name.to_string(),
            child,
            log,
        })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The server's own pid: the child of `timeout`.
    fn program_pid(&self) -> Option<u32> {
        let output = Command::new("pgrep")
            .args(["-P", &self.child.id().to_string()])
            .output()
            .ok()?;
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
    }

    fn exited(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            bail!(
                "{} exited ({status}); its log ends with:\n{}",
                self.name,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // `timeout` passes TERM on to the server it runs.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The policy feed: `GET /v1/policy/<n>` answers the n-site policy (304 when the ETag
/// matches) and records when each body was fully written.
struct FeedServer {
    port: u16,
    sent: Arc<Mutex<Vec<(String, SystemTime)>>>,
}

impl FeedServer {
    fn start(policies: &[(usize, Arc<Vec<u8>>)]) -> anyhow::Result<FeedServer> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let bodies: HashMap<String, Arc<Vec<u8>>> = policies
            .iter()
            .map(|(n, body)| (format!("/v1/policy/{n}"), Arc::clone(body)))
            .collect();
        let sent = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&sent);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let bodies = bodies.clone();
                let record = Arc::clone(&record);
                std::thread::spawn(move || {
                    let _ = serve_feed(stream, &bodies, &record);
                });
            }
        });
        Ok(FeedServer { port, sent })
    }

    fn sent_times(&self, path: &str) -> Vec<SystemTime> {
        self.sent
            .lock()
            .map(|v| {
                v.iter()
                    .filter(|(p, _)| p == path)
                    .map(|(_, t)| *t)
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn serve_feed(
    stream: TcpStream,
    bodies: &HashMap<String, Arc<Vec<u8>>>,
    record: &Mutex<Vec<(String, SystemTime)>>,
) -> anyhow::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
        let mut etag_match = false;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("if-none-match")
            {
                etag_match = value.trim() == format!("\"{}\"", etag(&path));
            }
        }
        match bodies.get(&path) {
            Some(_) if etag_match => {
                writer.write_all(b"HTTP/1.1 304 Not Modified\r\ncontent-length: 0\r\n\r\n")?;
            }
            Some(body) => {
                write!(
                    writer,
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\netag: \"{}\"\r\ncontent-length: {}\r\n\r\n",
                    etag(&path),
                    body.len()
                )?;
                writer.write_all(body)?;
                writer.flush()?;
                if let Ok(mut v) = record.lock() {
                    v.push((path, SystemTime::now()));
                }
            }
            None => writer.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")?,
        }
    }
}

fn etag(path: &str) -> String {
    path.rsplit('/').next().unwrap_or("").to_string()
}

/// Seconds since midnight UTC of a log line stamped `[HH:MM:SS.ffffff]`.
fn log_seconds(line: &str) -> Option<f64> {
    let stamp = line.strip_prefix('[')?.split(']').next()?;
    let mut parts = stamp.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

fn day_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() % 86_400.0)
        .unwrap_or(0.0)
}

struct Servers {
    _dir: tempfile::TempDir,
    _feed: FeedServer,
    nginx: Server,
    baseline: Server,
    filters: Vec<(usize, Server)>,
    ports: Ports,
    /// Per policy size: for each VM, ms from the feed body sent to "policy … applied".
    envoy_apply_ms: Vec<Vec<f64>>,
}

struct Ports {
    nginx_redirect: u16,
    native: u16,
    minimal: u16,
    baseline_tls: u16,
    filter_http: Vec<u16>,
    filter_https: Vec<u16>,
}

fn envoy_args(config: &Path, log_level: &str) -> Vec<String> {
    vec![
        "-c".into(),
        config.to_string_lossy().into_owned(),
        "--concurrency".into(),
        "1".into(),
        "--use-dynamic-base-id".into(),
        "-l".into(),
        log_level.into(),
        "--log-format".into(),
        "[%T.%f][%t] %v".into(),
    ]
}

fn wait_ready(server: &mut Server, admin: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        server.exited()?;
        if let Ok((200, body)) = http_get(admin, "/ready")
            && body.trim() == "LIVE"
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{} was not ready within 60 s", server.name);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_port(server: &mut Server, port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        server.exited()?;
        if Instant::now() > deadline {
            bail!("{} does not listen on {port}", server.name);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

impl Servers {
    fn start(wasm: &Artefacts, policies: &[(usize, Arc<Vec<u8>>)]) -> anyhow::Result<Servers> {
        let dir = tempfile::tempdir()?;
        let (cert, key) = self_signed(dir.path(), &["bench.test", "*.bench.test"])?;
        let bench = repo_root().join("tests/bench");
        let template = |name: &str| -> anyhow::Result<String> {
            std::fs::read_to_string(bench.join(name))
                .with_context(|| format!("reading tests/bench/{name}"))
        };

        let nginx_dir = dir.path().join("nginx");
        std::fs::create_dir_all(&nginx_dir)?;
        let nginx_redirect = free_port()?;
        let backend = free_port()?;
        let conf = render(
            &template("nginx.conf")?,
            &HashMap::from([
                ("DIR", nginx_dir.to_string_lossy().into_owned()),
                ("REDIRECT_PORT", nginx_redirect.to_string()),
                ("BACKEND_PORT", backend.to_string()),
            ]),
        )?;
        let conf_path = nginx_dir.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let nginx_bin = which("nginx")?;
        let mut nginx = Server::spawn(
            "nginx",
            &nginx_bin,
            &[
                "-p".into(),
                nginx_dir.to_string_lossy().into_owned(),
                "-c".into(),
                conf_path.to_string_lossy().into_owned(),
            ],
            dir.path().join("nginx.log"),
        )?;
        wait_port(&mut nginx, nginx_redirect)?;
        wait_port(&mut nginx, backend)?;

        let envoy = envoy_binary()?;
        let (native, minimal, baseline_tls, baseline_admin) =
            (free_port()?, free_port()?, free_port()?, free_port()?);
        let yaml = render(
            &template("envoy-baseline.yaml")?,
            &HashMap::from([
                ("ADMIN_PORT", baseline_admin.to_string()),
                ("NATIVE_PORT", native.to_string()),
                ("MINIMAL_PORT", minimal.to_string()),
                ("HTTPS_PORT", baseline_tls.to_string()),
                ("MINIMAL_WASM", wasm.minimal.to_string_lossy().into_owned()),
                ("TLS_CERT", cert.to_string_lossy().into_owned()),
                ("TLS_KEY", key.to_string_lossy().into_owned()),
                ("BACKEND_PORT", backend.to_string()),
            ]),
        )?;
        let path = dir.path().join("envoy-baseline.yaml");
        std::fs::write(&path, yaml)?;
        // Warn level: the minimal filter logs every redirect at info, which Envoy then drops.
        let mut baseline = Server::spawn(
            "Envoy (baselines)",
            &envoy,
            &envoy_args(&path, "warn"),
            dir.path().join("envoy-baseline.log"),
        )?;
        wait_ready(&mut baseline, baseline_admin)?;

        let feed = FeedServer::start(policies)?;
        let mut filters = Vec::new();
        let mut filter_http = Vec::new();
        let mut filter_https = Vec::new();
        let mut envoy_apply_ms = Vec::new();
        for (n, _) in policies {
            let (http, https, admin) = (free_port()?, free_port()?, free_port()?);
            let feed_path = format!("/v1/policy/{n}");
            let yaml = render(
                &template("envoy-filter.yaml")?,
                &HashMap::from([
                    ("ADMIN_PORT", admin.to_string()),
                    ("HTTP_PORT", http.to_string()),
                    ("HTTPS_PORT", https.to_string()),
                    ("WASM", wasm.filter.to_string_lossy().into_owned()),
                    ("TLS_CERT", cert.to_string_lossy().into_owned()),
                    ("TLS_KEY", key.to_string_lossy().into_owned()),
                    ("BACKEND_PORT", backend.to_string()),
                    ("FEED_PORT", feed.port.to_string()),
                    ("FEED_PATH", feed_path.clone()),
                ]),
            )?;
            let path = dir.path().join(format!("envoy-filter-{n}.yaml"));
            std::fs::write(&path, yaml)?;
            let mut server = Server::spawn(
                &format!("Envoy (filter, {n} sites)"),
                &envoy,
                &envoy_args(&path, "info"),
                dir.path().join(format!("envoy-filter-{n}.log")),
            )?;
            wait_ready(&mut server, admin)?;
            let applied = wait_applied(&mut server, *n)?;
            let sent: Vec<f64> = feed
                .sent_times(&feed_path)
                .into_iter()
                .map(day_seconds)
                .collect();
            let apply_ms: Vec<f64> = applied
                .iter()
                .filter_map(|&at| {
                    let before = sent
                        .iter()
                        .copied()
                        .filter(|&s| s <= at + 0.000_5)
                        .fold(f64::NAN, f64::max);
                    (!before.is_nan()).then(|| ((at - before) * 1e3).max(0.0))
                })
                .collect();
            eprintln!(
                "    Envoy with {n} sites ready; feed apply per VM: {}",
                apply_ms
                    .iter()
                    .map(|ms| format!("{ms:.0} ms"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            envoy_apply_ms.push(apply_ms);
            filters.push((*n, server));
            filter_http.push(http);
            filter_https.push(https);
        }
        Ok(Servers {
            _dir: dir,
            _feed: feed,
            nginx,
            baseline,
            filters,
            ports: Ports {
                nginx_redirect,
                native,
                minimal,
                baseline_tls,
                filter_http,
                filter_https,
            },
            envoy_apply_ms,
        })
    }

    fn setups(&self, settings: &Settings) -> Vec<Setup> {
        let headline = settings.headline();
        let p = &self.ports;
        let url = |port: u16, tls: bool| {
            format!(
                "{}://127.0.0.1:{port}/index.html?from=bench",
                if tls { "https" } else { "http" }
            )
        };
        let mut setups = Vec::new();
        for (i, (n, _)) in self.filters.iter().enumerate() {
            setups.push(Setup {
                key: format!("filter-{n}"),
                label: format!("autohttps filter, force, {n} sites"),
                url: url(p.filter_http[i], false),
                host: force_host(*n),
                expect: Expect::Redirect,
            });
        }
        setups.push(Setup {
            key: "minimal".into(),
            label: "minimal proxy-wasm filter (floor)".into(),
            url: url(p.minimal, false),
            host: force_host(headline),
            expect: Expect::Redirect,
        });
        setups.push(Setup {
            key: "native".into(),
            label: "Envoy native https_redirect".into(),
            url: url(p.native, false),
            host: force_host(headline),
            expect: Expect::Redirect,
        });
        setups.push(Setup {
            key: "nginx".into(),
            label: "nginx return 301".into(),
            url: url(p.nginx_redirect, false),
            host: force_host(headline),
            expect: Expect::Redirect,
        });
        if let Some(i) = self.filters.iter().position(|(n, _)| *n == headline) {
            setups.push(Setup {
                key: "proxy-filter".into(),
                label: format!("HTTPS proxy + filter (auto, CSP), {headline} sites"),
                url: url(p.filter_https[i], true),
                host: auto_host(headline),
                expect: Expect::Csp,
            });
        }
        setups.push(Setup {
            key: "proxy-none".into(),
            label: "HTTPS proxy, no filter".into(),
            url: url(p.baseline_tls, true),
            host: auto_host(headline),
            expect: Expect::Ok,
        });
        setups
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        // Dropping each Server stops it; say so for the log.
        let names: Vec<String> = std::iter::once(self.nginx.name.clone())
            .chain(std::iter::once(self.baseline.name.clone()))
            .chain(self.filters.iter().map(|(_, s)| s.name.clone()))
            .collect();
        eprintln!("==> stopping {}", names.join(", "));
    }
}

/// Waits until every VM of this Envoy logged that it applied the `n`-site policy; returns when
/// (seconds since midnight UTC) each did.
fn wait_applied(server: &mut Server, n: usize) -> anyhow::Result<Vec<f64>> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let needle = format!("policy \"v-{n}\" applied");
    loop {
        server.exited()?;
        let log = server.log();
        let vms = log
            .lines()
            .filter(|l| l.contains("configured with policy \"boot\""))
            .count();
        let applied: Vec<f64> = log
            .lines()
            .filter(|l| l.contains(&needle))
            .filter_map(log_seconds)
            .collect();
        // Envoy configures one VM more than polls: the one it checks the configuration with.
        if vms > 0 && applied.len() >= vms.saturating_sub(1).max(1) {
            return Ok(applied);
        }
        if Instant::now() > deadline {
            bail!(
                "{} did not apply the {n}-site policy within 120 s ({} of {vms} VMs did)",
                server.name,
                applied.len()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn which(program: &str) -> anyhow::Result<PathBuf> {
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
    {
        let path = Path::new(dir).join(program);
        if path.is_file() {
            return Ok(path);
        }
    }
    bail!("{program} is not installed; `make bench` installs it with apt-get")
}

// ---------------------------------------------------------------------------------------------
// wrk

#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    Redirect,
    Csp,
    Ok,
}

struct Setup {
    key: String,
    label: String,
    url: String,
    host: String,
    expect: Expect,
}

impl Setup {
    /// One request with curl: the setup answers what the benchmark assumes it answers.
    fn check(&self) -> anyhow::Result<()> {
        let out = Command::new("curl")
            .args([
                "-sS",
                "-k",
                "-o",
                "/dev/null",
                "-D",
                "-",
                "--max-time",
                "10",
            ])
            .args(["--noproxy", "*", "-H"])
            .arg(format!("Host: {}", self.host))
            .arg(&self.url)
            .output()
            .context("running curl")?;
        let head = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
        let status_line = head.lines().next().unwrap_or("").to_string();
        let fine = match self.expect {
            Expect::Redirect => {
                status_line.contains(" 301")
                    && head.contains(&format!("location: https://{}/index.html", self.host))
            }
            Expect::Csp => {
                status_line.contains(" 200")
                    && head.contains("content-security-policy: upgrade-insecure-requests")
            }
            Expect::Ok => status_line.contains(" 200"),
        };
        if !fine {
            bail!(
                "{} ({}) did not answer as expected:\n{}",
                self.label,
                self.url,
                head.trim()
            );
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug)]
struct WrkRun {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
}

fn duration_us(text: &str) -> Option<f64> {
    let text = text.trim();
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().ok()?;
    Some(match unit {
        "us" => value,
        "ms" => value * 1e3,
        "s" => value * 1e6,
        "m" => value * 60e6,
        _ => return None,
    })
}

fn wrk(setup: &Setup, seconds: u64) -> anyhow::Result<WrkRun> {
    let out = Command::new("timeout")
        .arg((seconds + 30).to_string())
        .arg("wrk")
        .args(["-t1", "-c", WRK_CONNECTIONS, "--latency", "-d"])
        .arg(format!("{seconds}s"))
        .arg("-H")
        .arg(format!("Host: {}", setup.host))
        .arg(&setup.url)
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk failed on {}: {}{}",
            setup.label,
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut run = WrkRun {
        rps: f64::NAN,
        p50_us: f64::NAN,
        p99_us: f64::NAN,
        errors: 0,
    };
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", value] => run.rps = value.parse().unwrap_or(f64::NAN),
            ["50%", value] => run.p50_us = duration_us(value).unwrap_or(f64::NAN),
            ["99%", value] => run.p99_us = duration_us(value).unwrap_or(f64::NAN),
            ["Non-2xx", "or", "3xx", "responses:", value] => {
                run.errors += value.parse::<u64>().unwrap_or(0);
            }
            ["Socket", "errors:", rest @ ..] => {
                run.errors += rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>();
            }
            _ => {}
        }
    }
    if run.rps.is_nan() {
        bail!("could not read wrk's output for {}:\n{text}", setup.label);
    }
    Ok(run)
}

// ---------------------------------------------------------------------------------------------
// Part 4: issuance, the whole stack (tests/src/stack.rs) against Pebble

/// Sites created one at a time for the creation → first handshake figure (after a warm-up
/// site, which also creates the ACME account).
const SINGLE_SITES: usize = 7;
/// The longest one measurement waits for names to be served before it gives up.
const SERVE_LIMIT: Duration = Duration::from_secs(180);
/// Threads creating the burst's sites through the admin API.
const CREATORS: usize = 4;
/// Threads polling handshakes (each handshake is one curl).
const POLLERS: usize = 3;

struct IssuanceSettings {
    burst_sites: usize,
    stored_certificates: usize,
}

impl IssuanceSettings {
    fn from_env() -> anyhow::Result<IssuanceSettings> {
        let number = |name: &str, default: usize| env_number(name, default);
        Ok(IssuanceSettings {
            burst_sites: number("BENCH_ISSUANCE_SITES", 100)?.max(1),
            stored_certificates: number("BENCH_STORE_CERTIFICATES", 10_000)?,
        })
    }
}

/// Part 4's figures, or why they were not taken.
enum IssuanceOutcome {
    Measured(Box<Issuance>),
    NotMeasured(String),
}

struct Issuance {
    date: String,
    commit: String,
    load_start: String,
    load_end: String,
    elapsed: Duration,
    /// The sidecar's effective `acme.orders_in_flight` and `acme.debounce_ms`.
    orders_in_flight: usize,
    debounce_ms: u64,
    precheck: bool,
    single: Vec<SingleSite>,
    burst: Burst,
    memory: Vec<MemoryRow>,
}

/// One site created alone: when its primary name first completed a verified handshake, and
/// when the sidecar logged its certificate stored (both from the creation request).
struct SingleSite {
    served: Duration,
    stored: Option<Duration>,
}

struct Burst {
    sites: usize,
    names: usize,
    /// When the last creation request was answered.
    created: Duration,
    /// Per name, when it first completed a verified handshake (`None`: not within the limit).
    served: Vec<Option<Duration>>,
    /// "certificate stored" log lines of the burst's sites, from the first creation request.
    stored: Vec<Duration>,
    /// Handshakes tried while polling.
    handshakes: usize,
    /// The sidecar's WARN and ERROR lines during the burst.
    problems: Vec<String>,
}

struct MemoryRow {
    certificates: usize,
    seed: Duration,
    database_bytes: u64,
    /// From the process start to "SDS serves the store's certificates" (index built).
    ready: Duration,
    rss_kib: u64,
    rss_after_feed_kib: u64,
    peak_kib: u64,
    policy_bytes: usize,
}

fn median_duration(values: &[Duration]) -> Duration {
    let mut seconds: Vec<f64> = values.iter().map(Duration::as_secs_f64).collect();
    Duration::from_secs_f64(median(&mut seconds).max(0.0))
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// The sidecar binary part 4 measures. `AUTOHTTPS_BIN` outside this repository's
/// `target/release/` is used as it is; otherwise the release build is brought up to date
/// first (a no-op when it is), so the figures are those of the code checked out.
fn sidecar_for_bench() -> anyhow::Result<PathBuf> {
    let release = repo_root().join("target/release/autohttps");
    if let Some(given) = std::env::var_os("AUTOHTTPS_BIN").map(PathBuf::from)
        && given != release
    {
        if !given.is_file() {
            bail!("AUTOHTTPS_BIN={} does not exist", given.display());
        }
        return Ok(given);
    }
    eprintln!("    building the sidecar (release)");
    let status = Command::new("cargo")
        .args([
            "build",
            "--locked",
            "--release",
            "-p",
            "autohttps-sidecar",
            "--bin",
            "autohttps",
        ])
        .current_dir(repo_root())
        .env_remove("CARGO_TARGET_DIR")
        .status()
        .context("running cargo to build the sidecar")?;
    if !status.success() {
        bail!("building the sidecar failed ({status})");
    }
    Ok(release)
}

fn issuance(settings: &IssuanceSettings) -> IssuanceOutcome {
    for tool in ["pebble", "pebble-challtestsrv", "curl", "openssl"] {
        if which(tool).is_err() {
            return IssuanceOutcome::NotMeasured(format!(
                "not measured: {tool} is not installed (`make tools` installs Pebble)"
            ));
        }
    }
    match measure_issuance(settings) {
        Ok(measured) => IssuanceOutcome::Measured(Box::new(measured)),
        Err(error) => {
            eprintln!("    part 4 failed: {error:#}");
            let first = format!("{error:#}");
            let first = first.lines().next().unwrap_or_default().replace('|', "/");
            IssuanceOutcome::NotMeasured(format!("not measured, it failed: {first}"))
        }
    }
}

fn measure_issuance(settings: &IssuanceSettings) -> anyhow::Result<Issuance> {
    let started = Instant::now();
    let load_start = load_average();
    let binary = sidecar_for_bench()?;
    let dir = tempfile::Builder::new()
        .prefix("autohttps-bench-issuance-")
        .tempdir()?;
    eprintln!(
        "==> part 4: the whole stack (Pebble with PEBBLE_VA_NOSLEEP=1, {}) in {}",
        binary.display(),
        dir.path().display()
    );
    // The stack runs `sidecar_binary()`: AUTOHTTPS_BIN, else target/release/autohttps, which
    // is what `sidecar_for_bench` returned.
    let stack = Stack::start(StackOptions::for_test(
        dir.path().to_path_buf(),
        StackPorts::free()?,
    ))?;
    let outcome = issuance_on_stack(&stack, settings);
    if outcome.is_err() {
        eprintln!("    sidecar log tail:\n{}", tail(&stack.sidecar_logs(), 30));
        drop(stack);
        let kept = dir.keep();
        eprintln!("    the stack's files are kept in {}", kept.display());
    }
    let (orders_in_flight, debounce_ms, precheck, single, burst) = outcome?;

    let mut memory = Vec::new();
    for certificates in [0, settings.stored_certificates] {
        let row = sidecar_memory(&binary, certificates)?;
        eprintln!(
            "    {} certificates: seeded in {:.1} s, ready in {:.1} s, VmRSS {:.1} MiB, after the policy feed {:.1} MiB, peak {:.1} MiB",
            row.certificates,
            row.seed.as_secs_f64(),
            row.ready.as_secs_f64(),
            row.rss_kib as f64 / 1024.0,
            row.rss_after_feed_kib as f64 / 1024.0,
            row.peak_kib as f64 / 1024.0
        );
        memory.push(row);
    }
    Ok(Issuance {
        date: command_text("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        commit: command_text(
            "git",
            &[
                "-C",
                &repo_root().to_string_lossy(),
                "describe",
                "--always",
                "--dirty",
            ],
        ),
        load_start,
        load_end: load_average(),
        elapsed: started.elapsed(),
        orders_in_flight,
        debounce_ms,
        precheck,
        single,
        burst,
        memory,
    })
}

type StackFigures = (usize, u64, bool, Vec<SingleSite>, Burst);

fn issuance_on_stack(stack: &Stack, settings: &IssuanceSettings) -> anyhow::Result<StackFigures> {
    let config = autohttps_sidecar::config::Config::load(Some(&stack.dir.join("autohttps.toml")))
        .context("reading the stack's sidecar configuration")?;
    eprintln!(
        "    sidecar settings: acme.orders_in_flight = {}, acme.debounce_ms = {}, DNS pre-check {}",
        config.acme.orders_in_flight,
        config.acme.debounce_ms,
        if config.platform.precheck_enabled() {
            "on"
        } else {
            "off"
        }
    );

    // Warm-up: the first order also registers the ACME account.
    create_site(stack, "warm-up", &["warm.issuance.test"])?;
    wait_served(stack, "warm.issuance.test", SERVE_LIMIT)?;

    eprintln!("    creation → first verified handshake, {SINGLE_SITES} sites one at a time");
    let mut single = Vec::new();
    for i in 0..SINGLE_SITES {
        let site = format!("one-{i}");
        let primary = format!("one{i}.issuance.test");
        let www = format!("www.{primary}");
        let wall = SystemTime::now();
        let start = Instant::now();
        create_site(stack, &site, &[&primary, &www])?;
        wait_served(stack, &primary, SERVE_LIMIT)?;
        let served = start.elapsed();
        let stored = stored_times(&stack.sidecar_logs(), wall, |s| s == site)
            .into_iter()
            .next();
        eprintln!(
            "    {site}: served after {} (certificate stored after {})",
            secs(served),
            stored.map_or("?".into(), secs)
        );
        single.push(SingleSite { served, stored });
    }

    let burst = burst(stack, settings.burst_sites)?;
    Ok((
        config.acme.orders_in_flight,
        config.acme.debounce_ms,
        config.platform.precheck_enabled(),
        single,
        burst,
    ))
}

/// The names of burst site `i`: its primary, `www.` and, for every other site, `shop.`.
fn burst_names(i: usize) -> Vec<String> {
    let primary = format!("b{i}.issuance.test");
    let mut names = vec![primary.clone(), format!("www.{primary}")];
    if i.is_multiple_of(2) {
        names.push(format!("shop.{primary}"));
    }
    names
}

fn burst(stack: &Stack, sites: usize) -> anyhow::Result<Burst> {
    let names: Vec<String> = (0..sites).flat_map(burst_names).collect();
    eprintln!(
        "    {sites} sites ({} names) created at once ({CREATORS} threads), handshakes polled by {POLLERS} threads",
        names.len()
    );
    let wall = SystemTime::now();
    let start = Instant::now();
    let log_before = stack.sidecar_logs().lines().count();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let creators: Vec<_> = (0..CREATORS)
            .map(|t| {
                scope.spawn(move || -> anyhow::Result<()> {
                    for i in (t..sites).step_by(CREATORS) {
                        let names = burst_names(i);
                        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
                        create_site(stack, &format!("b-{i}"), &refs)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for creator in creators {
            creator
                .join()
                .map_err(|_| anyhow!("a site-creating thread panicked"))??;
        }
        Ok(())
    })?;
    let created = start.elapsed();
    eprintln!("    all {sites} sites created after {}", secs(created));

    // Every name not yet served waits in one queue; each poller takes the next, tries one
    // handshake and puts it back at the end when it failed.
    let queue: Mutex<std::collections::VecDeque<usize>> = Mutex::new((0..names.len()).collect());
    let served: Mutex<Vec<Option<Duration>>> = Mutex::new(vec![None; names.len()]);
    let handshakes = std::sync::atomic::AtomicUsize::new(0);
    let deadline = start + SERVE_LIMIT;
    std::thread::scope(|scope| {
        for _ in 0..POLLERS {
            scope.spawn(|| {
                loop {
                    let Some(index) = queue.lock().map(|mut q| q.pop_front()).ok().flatten() else {
                        return;
                    };
                    if Instant::now() > deadline {
                        return;
                    }
                    handshakes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let ok = stack
                        .https(&names[index], "/")
                        .is_ok_and(|r| r.status == 200);
                    if ok {
                        if let Ok(mut served) = served.lock() {
                            served[index] = Some(start.elapsed());
                        }
                    } else if let Ok(mut q) = queue.lock() {
                        q.push_back(index);
                    }
                }
            });
        }
    });
    let served = served.into_inner().unwrap_or_default();
    let logs = stack.sidecar_logs();
    let stored = stored_times(&logs, wall, |site| {
        site.strip_prefix("b-")
            .is_some_and(|n| n.parse::<usize>().is_ok_and(|n| n < sites))
    });
    let problems: Vec<String> = logs
        .lines()
        .skip(log_before)
        .map(strip_ansi)
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    let burst = Burst {
        sites,
        names: names.len(),
        created,
        served,
        stored,
        handshakes: handshakes.into_inner(),
        problems,
    };
    match burst.all_served() {
        Some(all) => eprintln!(
            "    all {} names served after {} ({} certificates stored, {} handshakes tried, {} warnings or errors)",
            burst.names,
            secs(all),
            burst.stored.len(),
            burst.handshakes,
            burst.problems.len()
        ),
        None => eprintln!(
            "    {} of {} names served within {:?}",
            burst.served.iter().flatten().count(),
            burst.names,
            SERVE_LIMIT
        ),
    }
    for line in burst.problems.iter().take(5) {
        eprintln!("      {line}");
    }
    Ok(burst)
}

impl Burst {
    /// When the last name was served, if every name was.
    fn all_served(&self) -> Option<Duration> {
        self.served
            .iter()
            .copied()
            .collect::<Option<Vec<_>>>()
            .and_then(|all| all.into_iter().max())
    }

    /// Certificates stored per second, from the first creation request to the last one stored.
    fn orders_per_second(&self) -> f64 {
        self.stored
            .last()
            .map_or(0.0, |last| self.stored.len() as f64 / last.as_secs_f64())
    }

    fn half_served(&self) -> Option<Duration> {
        let mut times: Vec<Duration> = self.served.iter().flatten().copied().collect();
        times.sort();
        times.get(self.names / 2).copied()
    }
}

fn create_site(stack: &Stack, site: &str, names: &[&str]) -> anyhow::Result<()> {
    let body = serde_json::json!({
        "name": site,
        "primary": names[0],
        "hostnames": &names[1..],
    });
    let (status, answer) = stack.admin("POST", "/v1/sites", Some(&body))?;
    if status != 201 {
        bail!("creating site {site} answered {status}: {answer}");
    }
    Ok(())
}

/// Waits until `host` answers 200 over HTTPS through Envoy, verified against Pebble's root.
fn wait_served(stack: &Stack, host: &str, limit: Duration) -> anyhow::Result<()> {
    wait_until(&format!("HTTPS for {host}"), limit, || {
        stack.https(host, "/").ok().filter(|r| r.status == 200)
    })
    .map(|_| ())
    .map_err(|e| {
        anyhow!(
            "{e:#}\nsidecar log tail:\n{}",
            tail(&stack.sidecar_logs(), 20)
        )
    })
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Removes the terminal colour codes tracing writes.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Seconds since midnight UTC of a tracing line stamped `2026-11-29T03:21:14.187541Z`.
fn tracing_seconds(line: &str) -> Option<f64> {
    let stamp = line.split_whitespace().next()?;
    let clock = stamp.split_once('T')?.1.trim_end_matches('Z');
    log_seconds(&format!("[{clock}]"))
}

/// When the sidecar logged "certificate stored" for sites matching `site`, from `since`.
fn stored_times(logs: &str, since: SystemTime, site: impl Fn(&str) -> bool) -> Vec<Duration> {
    let origin = day_seconds(since);
    let mut times: Vec<Duration> = logs
        .lines()
        .map(strip_ansi)
        .filter(|l| l.contains("certificate stored"))
        .filter(|l| {
            l.split_whitespace()
                .find_map(|field| field.strip_prefix("site="))
                .is_some_and(&site)
        })
        .filter_map(|l| tracing_seconds(&l))
        .map(|at| {
            let mut offset = at - origin;
            if offset < -43_200.0 {
                offset += 86_400.0;
            }
            offset
        })
        .filter(|offset| *offset >= 0.0)
        .map(Duration::from_secs_f64)
        .collect();
    times.sort();
    times
}

/// Fills a fresh store with `n` sites of two names each, each with a current self-signed
/// certificate (P-256, 90 days) and its key, through the sidecar's own store code. Nothing is
/// due for issuance, so the sidecar started on it never calls a CA.
fn seed_store(database: &Path, n: usize) -> anyhow::Result<()> {
    use autohttps_sidecar::hostname::Hostname;
    use autohttps_sidecar::store::{
        NewCertificate, NewSite, PrivateKeyPem, SitePolicy, SqliteStore, Store as _,
    };
    let store = SqliteStore::open(database)?;
    let now = time::OffsetDateTime::now_utc();
    let not_before = now - time::Duration::days(1);
    let not_after = now + time::Duration::days(89);
    for i in 0..n {
        let site = format!("m-{i}");
        let primary = Hostname::parse(&format!("m{i}.memory.test"))?;
        let www = Hostname::parse(&format!("www.m{i}.memory.test"))?;
        store.create_site(
            NewSite {
                name: site.clone(),
                primary: primary.clone(),
                hostnames: vec![www.clone()],
                policy: SitePolicy::default(),
            },
            now,
            now + time::Duration::days(30),
        )?;
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(vec![primary.to_string(), www.to_string()])?;
        params.not_before = not_before;
        params.not_after = not_after;
        let serial = u64::try_from(i)? + 1;
        params.serial_number = Some(rcgen::SerialNumber::from(serial));
        let certificate = params.self_signed(&key)?;
        store.store_certificate(
            NewCertificate {
                site,
                names: vec![primary, www],
                chain_pem: certificate.pem(),
                key_pem: PrivateKeyPem::new(key.serialize_pem()),
                not_before,
                not_after,
                serial: format!("{serial:x}"),
                ari_id: None,
            },
            None,
            now,
        )?;
    }
    Ok(())
}

/// VmRSS and VmHWM of a process, in KiB.
fn resident_kib(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// Starts the real sidecar alone on a store seeded with `certificates` certificates and reads
/// its resident memory once SDS has built its index, then again after it served the policy
/// feed once (as it does to every Envoy that connects).
fn sidecar_memory(binary: &Path, certificates: usize) -> anyhow::Result<MemoryRow> {
    let dir = tempfile::Builder::new()
        .prefix("autohttps-bench-memory-")
        .tempdir()?;
    let data = dir.path().join("data");
    let database = data.join("autohttps.db");
    eprintln!("    seeding a store with {certificates} certificates");
    let seeding = Instant::now();
    seed_store(&database, certificates)?;
    let seed = seeding.elapsed();
    let database_bytes = ["autohttps.db", "autohttps.db-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(data.join(f)).ok())
        .map(|m| m.len())
        .sum();
    let (admin, internal) = (free_port()?, free_port()?);
    // The CA and DNS addresses are never used: nothing is due for issuance.
    let config = dir.path().join("autohttps.toml");
    std::fs::write(
        &config,
        format!(
            r#"data_dir = "{data}"

[listen]
admin = "127.0.0.1:{admin}"
internal = "127.0.0.1:{internal}"
metrics = "127.0.0.1:0"

[admin]
token = "autohttps-bench-memory-admin-token"

[acme]
directory_url = "https://127.0.0.1:{unused}/dir"

[platform]
addresses = ["127.0.0.1"]

[dns]
nameservers = ["127.0.0.1:{unused}"]
"#,
            data = data.display(),
            unused = free_port()?,
        ),
    )?;
    let started = Instant::now();
    let config_arg = config.display().to_string();
    let mut sidecar = Server::spawn(
        "the sidecar",
        binary,
        &["--config".into(), config_arg, "serve".into()],
        dir.path().join("sidecar.log"),
    )?;
    loop {
        sidecar.exited()?;
        let log = strip_ansi(&sidecar.log());
        if log.contains("SDS serves the store's certificates")
            && TcpStream::connect(("127.0.0.1", internal)).is_ok()
        {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("the sidecar did not start within 120 s:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let ready = started.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let pid = sidecar
        .program_pid()
        .ok_or_else(|| anyhow!("cannot find the sidecar's pid under timeout"))?;
    let (rss_kib, _) = resident_kib(pid)?;
    let (status, policy) = http_get(internal, autohttps_sidecar::policy_feed::POLICY_PATH)?;
    if status != 200 {
        bail!("the policy feed answered {status}");
    }
    std::thread::sleep(Duration::from_secs(1));
    let (rss_after_feed_kib, peak_kib) = resident_kib(pid)?;
    sidecar.exited()?;
    Ok(MemoryRow {
        certificates,
        seed,
        database_bytes,
        ready,
        rss_kib,
        rss_after_feed_kib,
        peak_kib,
        policy_bytes: policy.len(),
    })
}

// The part 4 rows of the table and their own section.

const ISSUANCE_MEASURES: [(&str, &str); 3] = [
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

fn mib_kib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

impl IssuanceOutcome {
    fn rows(&self) -> String {
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

    fn section(&self) -> String {
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
            "- **Stack.** `tests/src/stack.rs`, as the end-to-end suite runs it: pebble-challtestsrv (mock DNS, every name 127.0.0.1), Pebble with `PEBBLE_VA_NOSLEEP=1` validating HTTP-01 through Envoy's plain listener, the release `autohttps` sidecar, Envoy (`--concurrency 1`) with `envoy/edge.yaml` and the release filter fetching certificates over SDS, and the demo backend. Sidecar settings: `acme.orders_in_flight = {}`, `acme.debounce_ms = {}`, DNS pre-check {} (against the mock DNS). A warm-up site (which also registers the ACME account) is served before anything is timed.\n\
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
fn patch_results(existing: &str, outcome: &IssuanceOutcome) -> anyhow::Result<String> {
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

struct Results {
    machine: Machine,
    settings: Settings,
    calls: CallCounts,
    scale: Vec<ScaleRow>,
    setups: Vec<Setup>,
    runs: Vec<Vec<WrkRun>>,
    artefacts: Artefacts,
    issuance: IssuanceOutcome,
    elapsed: Duration,
    load_end: String,
}

/// Medians of one setup's runs.
#[derive(Clone, Copy)]
struct Summary {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
}

fn thousands(value: f64) -> String {
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

fn ms(us: f64) -> String {
    format!("{:.2} ms", us / 1e3)
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "**missed**" }
}

impl Results {
    fn index(&self, key: &str) -> Option<usize> {
        self.setups.iter().position(|s| s.key == key)
    }

    fn summary(&self, key: &str) -> Option<Summary> {
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
    fn ratio(&self, a: &str, b: &str, pick: fn(&WrkRun) -> f64) -> f64 {
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

    fn markdown(&self) -> String {
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
            "Produced by `make bench` (tests/src/bin/bench.rs) on {}, commit `{}`, in {:.0} s.\n",
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
