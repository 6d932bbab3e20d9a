//! `make bench`: the measured cost of the autohttps filter beside its baselines, in one table.
//!
//! One Rust driver rather than a shell script, because half of what it measures runs in-process:
//! host calls per request kind and the policy apply time come from the wasmtime proxy-wasm host
//! of this crate, and the linear-memory size from a tiny probe host below. The other half starts
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
//! output), `BENCH_ONLY=vm` (the in-process part only, for quick checks of the filter).

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
use autohttps_tests::wasm_host::{FilterModule, Host, HostBuilder};

/// The longest any server started here may live.
const SERVER_LIFETIME_SECS: u64 = 1200;
/// wrk: one thread, 32 connections (the baselines in TOOLCHAIN.md use the same).
const WRK_CONNECTIONS: &str = "32";
/// Names per benchmark site: the primary, `www.` and an alias.
const NAMES_PER_SITE: usize = 3;

fn main() -> anyhow::Result<()> {
    let settings = Settings::from_env()?;
    let started = Instant::now();
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

    let results = Results {
        machine,
        settings,
        calls,
        scale,
        setups,
        runs,
        artefacts: wasm,
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

// ---------------------------------------------------------------------------------------------
// Settings and machine

struct Settings {
    rounds: usize,
    seconds: u64,
    sizes: Vec<usize>,
    out: PathBuf,
}

impl Settings {
    fn from_env() -> anyhow::Result<Settings> {
        let number = |name: &str, default: u64| -> anyhow::Result<u64> {
            match std::env::var(name) {
                Ok(v) => v
                    .trim()
                    .parse()
                    .with_context(|| format!("{name}={v:?} is not a number")),
                Err(_) => Ok(default),
            }
        };
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

    // From on_configure: the probe host times the call alone and reads the memory size after.
    let mut configure = Vec::new();
    let mut memory_bytes = 0;
    for _ in 0..repeats {
        let probe = memory_probe::configure(&wasm.filter, &inline)?;
        configure.push(probe.configure.as_secs_f64() * 1e3);
        memory_bytes = probe.memory_bytes;
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

/// A proxy-wasm host just big enough to run `proxy_on_configure` and read the VM's linear
/// memory size afterwards (the crate's full host keeps its memory private). Every import but
/// `proxy_get_buffer_bytes` answers zero (`Ok`), which the filter treats as a working host.
mod memory_probe {
    use std::path::Path;
    use std::time::{Duration, Instant};

    use anyhow::{anyhow, bail};
    use wasmtime::{Caller, Engine, Extern, Linker, Module, Store};

    pub(crate) struct Probe {
        pub(crate) configure: Duration,
        pub(crate) memory_bytes: u64,
    }

    struct State {
        configuration: Vec<u8>,
    }

    const ROOT: i32 = 1;

    fn get_buffer(
        mut caller: Caller<'_, State>,
        _buffer: i32,
        start: i32,
        max: i32,
        data_out: i32,
        size_out: i32,
    ) -> i32 {
        const OK: i32 = 0;
        const BAD_ARGUMENT: i32 = 2;
        let config = &caller.data().configuration;
        let start = usize::try_from(start).unwrap_or(0).min(config.len());
        let max = usize::try_from(max as u32).unwrap_or(usize::MAX);
        let bytes = config[start..config.len().min(start.saturating_add(max))].to_vec();
        let Some(Extern::Func(allocate)) = caller.get_export("proxy_on_memory_allocate") else {
            return BAD_ARGUMENT;
        };
        let Ok(allocate) = allocate.typed::<i32, i32>(&caller) else {
            return BAD_ARGUMENT;
        };
        let Ok(len) = i32::try_from(bytes.len()) else {
            return BAD_ARGUMENT;
        };
        let Ok(pointer) = allocate.call(&mut caller, len) else {
            return BAD_ARGUMENT;
        };
        let Some(Extern::Memory(memory)) = caller.get_export("memory") else {
            return BAD_ARGUMENT;
        };
        let at = |p: i32| usize::try_from(p as u32).unwrap_or(usize::MAX);
        let written = memory.write(&mut caller, at(pointer), &bytes).is_ok()
            && memory
                .write(&mut caller, at(data_out), &pointer.to_le_bytes())
                .is_ok()
            && memory
                .write(&mut caller, at(size_out), &len.to_le_bytes())
                .is_ok();
        if written { OK } else { BAD_ARGUMENT }
    }

    /// Starts the module as Envoy does and configures it with `configuration`.
    pub(crate) fn configure(wasm: &Path, configuration: &[u8]) -> anyhow::Result<Probe> {
        let mut config = wasmtime::Config::new();
        if std::env::var_os("BENCH_PERFMAP").is_some() {
            // For `perf record`: wasm function names in /tmp/perf-<pid>.map.
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let engine = Engine::new(&config)?;
        let module = Module::from_file(&engine, wasm)?;
        let mut store = Store::new(
            &engine,
            State {
                configuration: configuration.to_vec(),
            },
        );
        let mut linker: Linker<State> = Linker::new(&engine);
        linker.func_wrap("env", "proxy_get_buffer_bytes", get_buffer)?;
        linker.define_unknown_imports_as_default_values(&mut store, &module)?;
        let instance = linker.instantiate(&mut store, &module)?;
        for start in ["_initialize", "_start"] {
            if let Ok(f) = instance.get_typed_func::<(), ()>(&mut store, start) {
                f.call(&mut store, ())?;
                break;
            }
        }
        instance
            .get_typed_func::<(i32, i32), ()>(&mut store, "proxy_on_context_create")?
            .call(&mut store, (ROOT, 0))?;
        let vm = instance
            .get_typed_func::<(i32, i32), i32>(&mut store, "proxy_on_vm_start")?
            .call(&mut store, (ROOT, 0))?;
        if vm == 0 {
            bail!("the VM did not start");
        }
        let size = i32::try_from(configuration.len())?;
        let on_configure =
            instance.get_typed_func::<(i32, i32), i32>(&mut store, "proxy_on_configure")?;
        let started = Instant::now();
        let accepted = on_configure.call(&mut store, (ROOT, size))?;
        let configure = started.elapsed();
        if accepted == 0 {
            bail!("the filter rejected the configuration");
        }
        let memory = instance
            .get_memory(&mut store, "memory")
            .ok_or_else(|| anyhow!("the module exports no memory"))?;
        Ok(Probe {
            configure,
            memory_bytes: memory.data_size(&store) as u64,
        })
    }
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
// The table

struct Results {
    machine: Machine,
    settings: Settings,
    calls: CallCounts,
    scale: Vec<ScaleRow>,
    setups: Vec<Setup>,
    runs: Vec<Vec<WrkRun>>,
    artefacts: Artefacts,
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
        // Part 4: issuance, not wired yet.
        for (what, target) in [
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
        ] {
            let _ = writeln!(
                out,
                "| 4 issuance | {what} | not measured yet: needs the sidecar's SDS and policy feed wired to Envoy | | {target} | pending |"
            );
        }
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
- **VM memory** is the wasm linear memory after `proxy_on_configure` with the policy inline (it never shrinks, so it is the peak), read from a minimal wasmtime host in the driver; **apply (wasmtime)** is the `proxy_on_configure` call alone, and the feed figure the `on_http_call_response` that parses and swaps the policy, both with Cranelift-compiled code (Envoy runs V8).\n\
- **Policy** (generated): site *i* has `s<i>.bench.test`, `www.s<i>.bench.test` and `alias-<i>.example.net`, every name's certificate ready; even sites force HTTPS with HSTS, odd sites are auto with `mixed_content: upgrade`. Requests go to a site in the middle of the table.\n\
- **Noise.** On 2 cores wrk, Envoy's worker and (for pass-through) nginx share the CPUs with anything else running; compare ratios (taken within a round) rather than absolute figures, and check the load average above."
        );
        let _ = writeln!(out, "\n## Host calls per request, by kind\n");
        let _ = writeln!(
            out,
            "Counted in the wasmtime host (tests/src/wasm_host) over one whole stream (request headers, response headers where the request reaches the upstream, end of stream).\n"
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
