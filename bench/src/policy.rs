//! `BENCH_ONLY=policy`: the policy feed at platform scale (`BENCH_POLICY_SITES`, default
//! 100,000 sites), JSON snapshot against compact snapshot.
//!
//! - In the wasmtime host (the real `.wasm`): a snapshot applied through the feed, per VM, as
//!   CPU time of the callbacks that build it (the response, then each tick's slice for the
//!   compact one) with the slice count and the longest slice; the VM's linear memory once it
//!   is applied; a one-site change applied as a delta and its bytes.
//! - In real Envoy (`--concurrency 1`): unrelated requests sent open-loop at a fixed rate
//!   (latency counted from when each was due, so a stalled worker shows in full) while the
//!   feed delivers 100k-site snapshots, first as JSON then as compact; p99 during the
//!   snapshots against quiet, and the apply time per VM. Then the redirect path's cost with
//!   the 100k-site tables: Envoy's CPU time per request beside req/s (wrk).
//!
//! `BENCH_POLICY_ENVOY=0` stops after the wasmtime part (printed only). The rows are printed
//! and written into the "Policy feed at scale" section of the results
//! file (the rest of the file is kept).

use std::sync::atomic::{AtomicBool, Ordering};

use autohttps_filter::policy::{PolicyDelta, PolicyDocument, compact};

use super::*;

/// A version of the feed's `<epoch>-<n>` form (ordered, so deltas and refusals apply).
fn feed_version(n: u64) -> String {
    format!("00000000000000b1-{n}")
}

/// CPU time this thread has used (`/proc/thread-self/schedstat`, nanoseconds).
fn thread_cpu() -> Duration {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .map(Duration::from_nanos)
        .unwrap_or_default()
}

/// Runs `f`, returning its result, wall time and this thread's CPU time.
fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration, Duration) {
    let (wall, cpu) = (Instant::now(), thread_cpu());
    let out = f();
    (out, wall.elapsed(), thread_cpu().saturating_sub(cpu))
}

fn ms_of(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let at = ((values.len() as f64 - 1.0) * p).round() as usize;
    values[at.min(values.len() - 1)]
}

/// One snapshot applied through the feed in the wasmtime host.
struct VmApply {
    cpu: Duration,
    wall: Duration,
    callbacks: usize,
    longest: Duration,
    memory_bytes: u64,
}

/// The wasmtime figures for one format.
struct VmRows {
    json: Vec<VmApply>,
    compact: Vec<VmApply>,
    delta_cpu: Vec<Duration>,
    delta_bytes: usize,
    json_bytes: usize,
    compact_bytes: usize,
}

fn feed_host(module: &FilterModule) -> anyhow::Result<Host> {
    let config = br#"{"policy": {"schema": 1, "version": "boot", "sites": []}, "feed": {"cluster": "feed", "interval_ms": 1000}}"#;
    let mut host = HostBuilder::new(module)
        .plugin_configuration(config.to_vec())
        .cluster("feed")
        .build()?;
    host.advance_clock(Duration::from_millis(1000))?;
    Ok(host)
}

fn pending(host: &Host) -> anyhow::Result<u32> {
    host.pending_http_calls()
        .first()
        .map(|c| c.token)
        .ok_or_else(|| anyhow!("the filter did not poll its feed: {:?}", host.logs()))
}

fn sites_of(host: &Host) -> u64 {
    host.metric("autohttps.policy_sites")
        .map(|m| m.value)
        .unwrap_or(0)
}

/// Delivers a snapshot and runs the ticks that build it, timing every callback.
fn apply_in_vm(
    host: &mut Host,
    body: &[u8],
    content_type: &str,
    version: &str,
    n: usize,
) -> anyhow::Result<VmApply> {
    let token = pending(host)?;
    let etag = format!("\"{version}\"");
    let headers = [
        (":status", "200"),
        ("etag", etag.as_str()),
        ("autohttps-policy-kind", "snapshot"),
        ("content-type", content_type),
    ];
    // The CPU time is read once around the whole apply: the kernel's per-thread figure moves
    // in scheduler ticks, too coarse for one short callback.
    let cpu_start = thread_cpu();
    let (result, mut wall, _) = timed(|| host.respond_to_http_call(token, &headers, body));
    result?;
    let mut longest = wall;
    let mut callbacks = 1;
    while sites_of(host) != n as u64 {
        if callbacks > 100_000 {
            bail!("the {n}-site snapshot was never applied: {:?}", host.logs());
        }
        let (result, w, _) = timed(|| host.tick());
        result?;
        wall += w;
        longest = longest.max(w);
        callbacks += 1;
    }
    Ok(VmApply {
        cpu: thread_cpu().saturating_sub(cpu_start),
        wall,
        callbacks,
        longest,
        memory_bytes: host.linear_memory_bytes(),
    })
}

fn in_vm(wasm: &Artefacts, n: usize, json: &[u8], body: &[u8]) -> anyhow::Result<VmRows> {
    let module = FilterModule::load(&wasm.filter)?;
    let repeats = 3;
    let mut rows = VmRows {
        json: Vec::new(),
        compact: Vec::new(),
        delta_cpu: Vec::new(),
        delta_bytes: 0,
        json_bytes: json.len(),
        compact_bytes: body.len(),
    };
    for _ in 0..repeats {
        let mut host = feed_host(&module)?;
        rows.json.push(apply_in_vm(
            &mut host,
            json,
            "application/json",
            &feed_version(1),
            n,
        )?);
    }
    let document: PolicyDocument = serde_json::from_slice(json)?;
    for _ in 0..repeats {
        let mut host = feed_host(&module)?;
        rows.compact.push(apply_in_vm(
            &mut host,
            body,
            compact::CONTENT_TYPE,
            &feed_version(1),
            n,
        )?);
        // Then one site changes: the delta the sidecar would send.
        let mut site = document.sites[n / 2].clone();
        site.https = autohttps_filter::policy::HttpsMode::Disable;
        let delta = serde_json::to_vec(&PolicyDelta {
            schema: 1,
            from: feed_version(1),
            version: feed_version(2),
            upsert: vec![site],
            remove: Vec::new(),
        })?;
        rows.delta_bytes = delta.len();
        host.advance_clock(Duration::from_millis(1000))?;
        let token = pending(&host)?;
        let etag = format!("\"{}\"", feed_version(2));
        let headers = [
            (":status", "200"),
            ("etag", etag.as_str()),
            ("autohttps-policy-kind", "delta"),
            ("content-type", "application/json"),
        ];
        // Wall time: far shorter than a scheduler tick, so the CPU figure cannot resolve it.
        let (result, wall, _) = timed(|| host.respond_to_http_call(token, &headers, &delta));
        result?;
        let applied = host
            .metric("autohttps.policy_deltas_applied_total")
            .map(|m| m.value);
        if applied != Some(1) {
            bail!("the one-site delta was not applied: {:?}", host.logs());
        }
        rows.delta_cpu.push(wall);
    }
    Ok(rows)
}

// ---------------------------------------------------------------------------------------------
// In Envoy

/// What the feed serves now: body, content type, version.
type Served = Arc<Mutex<(Arc<Vec<u8>>, &'static str, String)>>;

/// A feed whose answer the bench switches; records when each version's body was sent.
struct SwitchFeed {
    port: u16,
    served: Served,
    sent: Arc<Mutex<Vec<(String, SystemTime)>>>,
}

impl SwitchFeed {
    fn start(first: (Arc<Vec<u8>>, &'static str, String)) -> anyhow::Result<SwitchFeed> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let served: Served = Arc::new(Mutex::new(first));
        let sent = Arc::new(Mutex::new(Vec::new()));
        let (s, r) = (Arc::clone(&served), Arc::clone(&sent));
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (s, r) = (Arc::clone(&s), Arc::clone(&r));
                std::thread::spawn(move || {
                    let _ = serve_switch(stream, &s, &r);
                });
            }
        });
        Ok(SwitchFeed { port, served, sent })
    }

    fn serve(&self, body: Arc<Vec<u8>>, content_type: &'static str, version: String) {
        if let Ok(mut served) = self.served.lock() {
            *served = (body, content_type, version);
        }
    }

    fn sent_times(&self, version: &str) -> Vec<f64> {
        self.sent
            .lock()
            .map(|v| {
                v.iter()
                    .filter(|(s, _)| s == version)
                    .map(|(_, t)| day_seconds(*t))
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn serve_switch(
    stream: TcpStream,
    served: &Served,
    record: &Mutex<Vec<(String, SystemTime)>>,
) -> anyhow::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut seen = None;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("if-none-match")
            {
                seen = Some(value.trim().trim_matches('"').to_string());
            }
        }
        let (body, content_type, version) = served
            .lock()
            .map_err(|_| anyhow!("feed state poisoned"))?
            .clone();
        if seen.as_deref() == Some(version.as_str()) {
            writer.write_all(b"HTTP/1.1 304 Not Modified\r\ncontent-length: 0\r\n\r\n")?;
            continue;
        }
        write!(
            writer,
            "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\nautohttps-policy-kind: snapshot\r\netag: \"{version}\"\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )?;
        writer.write_all(&body)?;
        writer.flush()?;
        if let Ok(mut v) = record.lock() {
            v.push((version, SystemTime::now()));
        }
    }
}

/// One request of the open-loop load: when it was due (seconds since midnight) and its
/// latency from then, in ms.
type Sample = (f64, f64);

/// Sends `GET` to `host` on `port` from `threads` connections, each every `period`, until
/// `stop`; latency is counted from when a request was due.
fn open_loop(
    port: u16,
    host: &str,
    threads: usize,
    period: Duration,
    stop: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<anyhow::Result<Vec<Sample>>>> {
    (0..threads)
        .map(|t| {
            let (host, stop) = (host.to_string(), Arc::clone(stop));
            std::thread::spawn(move || -> anyhow::Result<Vec<Sample>> {
                let mut samples = Vec::new();
                let mut conn = TcpStream::connect(("127.0.0.1", port))?;
                conn.set_nodelay(true)?;
                let mut reader = BufReader::new(conn.try_clone()?);
                let request = format!("GET /unrelated HTTP/1.1\r\nhost: {host}\r\n\r\n");
                let start = Instant::now() + period.mul_f64(t as f64 / threads as f64);
                let start_wall = SystemTime::now() + period.mul_f64(t as f64 / threads as f64);
                let mut i = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    let due = start + period * i;
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    conn.write_all(request.as_bytes())?;
                    let mut length = 0usize;
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line)? == 0 {
                            bail!("Envoy closed the connection");
                        }
                        if line.trim().is_empty() {
                            break;
                        }
                        if let Some((name, value)) = line.split_once(':')
                            && name.eq_ignore_ascii_case("content-length")
                        {
                            length = value.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; length];
                    std::io::Read::read_exact(&mut reader, &mut body)?;
                    let latency = due.elapsed();
                    samples.push((day_seconds(start_wall + period * i), ms_of(latency)));
                    i += 1;
                }
                Ok(samples)
            })
        })
        .collect()
}

/// A compact snapshot's build as the filter logged it: its slices and the longest of them
/// (the first counts the whole response callback), by Envoy's clock.
#[derive(Debug, Clone, Copy)]
struct Slices {
    count: u32,
    longest_ms: Option<f64>,
}

/// How long after a snapshot's window its gap starts counting as quiet.
const QUIET_AFTER: Duration = Duration::from_millis(500);

/// Snapshots as each VM applied them: ms from the feed sending the version (its last send
/// before the VM's applied line) to that line, and the slices the line gives.
#[derive(Default)]
struct Applies {
    ms: Vec<f64>,
    slices: Vec<Slices>,
}

impl Applies {
    fn add(&mut self, envoy: &Process, feed: &SwitchFeed, version: &str) {
        let sent = feed.sent_times(version);
        for (at, s) in applied_lines(envoy, version) {
            let before = sent
                .iter()
                .copied()
                .filter(|&t| t <= at + 0.000_5)
                .fold(f64::NAN, f64::max);
            if !before.is_nan() {
                self.ms.push(((at - before) * 1e3).max(0.0));
            }
            self.slices.extend(s);
        }
    }
}

/// Log times (seconds since midnight) of each VM's "policy <version> applied", with the
/// slices when the log gives them.
fn applied_lines(server: &Process, version: &str) -> Vec<(f64, Option<Slices>)> {
    let needle = format!("policy \"{version}\" applied");
    server
        .log()
        .lines()
        .filter(|l| l.contains(&needle))
        .filter_map(|l| {
            let slices = l
                .split(", built in ")
                .nth(1)
                .and_then(|r| r.split_whitespace().next()?.parse().ok())
                .map(|count| Slices {
                    count,
                    longest_ms: l
                        .split(", the longest ")
                        .nth(1)
                        .and_then(|r| r.split_whitespace().next()?.parse().ok()),
                });
            Some((log_seconds(l)?, slices))
        })
        .collect()
}

fn wait_version(server: &mut Process, version: &str, vms: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while applied_lines(server, version).len() < vms {
        server.check_running()?;
        if Instant::now() > deadline {
            bail!("Envoy did not apply {version} within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Envoy's CPU time so far (utime + stime of its process, in seconds).
fn process_cpu(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = fields
        .get(11)
        .zip(fields.get(12))
        .and_then(|(u, s)| Some(u.parse::<f64>().ok()? + s.parse::<f64>().ok()?))
        .ok_or_else(|| anyhow!("unreadable /proc/{pid}/stat"))?;
    Ok(ticks / 100.0)
}

struct FormatStall {
    /// Every snapshot of the format, each VM's apply.
    applies: Applies,
    p99_ms: f64,
    max_ms: f64,
    samples: usize,
}

struct EnvoyRows {
    /// The first snapshot, into VMs holding no site.
    first: Applies,
    quiet_p99_ms: f64,
    quiet_samples: usize,
    json: FormatStall,
    compact: FormatStall,
    rate: f64,
    redirect: Vec<(f64, f64)>,
}

fn in_envoy(
    wasm: &Artefacts,
    n: usize,
    json: &Arc<Vec<u8>>,
    document: &PolicyDocument,
) -> anyhow::Result<EnvoyRows> {
    const SNAPSHOTS: u64 = 4;
    const THREADS: usize = 4;
    let period = Duration::from_millis(4);
    let dir = tempfile::tempdir()?;
    let (cert, key) = self_signed(dir.path(), &["bench.test", "*.bench.test"])?;
    // Every snapshot is the same sites under a new version (the work is the same each time).
    let versions: Vec<String> = (1..=2 * SNAPSHOTS + 1).map(feed_version).collect();
    let json_of = |version: &str| -> Arc<Vec<u8>> {
        let text = String::from_utf8_lossy(json).replacen(
            &format!("\"version\": \"{}\"", feed_version(1)),
            &format!("\"version\": \"{version}\""),
            1,
        );
        Arc::new(text.into_bytes())
    };
    let compact_of = |version: &str| -> anyhow::Result<Arc<Vec<u8>>> {
        Ok(Arc::new(
            compact::encode_snapshot(version, &document.settings, &document.sites)
                .map_err(|e| anyhow!(e))?,
        ))
    };
    // The first snapshot is compact and comes to VMs that hold no site (the boot policy).
    let feed = SwitchFeed::start((
        compact_of(&versions[0])?,
        compact::CONTENT_TYPE,
        versions[0].clone(),
    ))?;
    let (http, https, admin) = (free_port()?, free_port()?, free_port()?);
    let template = std::fs::read_to_string(repo_root().join("tests/bench/envoy-filter.yaml"))?;
    let yaml = render(
        &template,
        &HashMap::from([
            ("ADMIN_PORT", admin.to_string()),
            ("HTTP_PORT", http.to_string()),
            ("HTTPS_PORT", https.to_string()),
            ("WASM", wasm.filter.to_string_lossy().into_owned()),
            ("TLS_CERT", cert.to_string_lossy().into_owned()),
            ("TLS_KEY", key.to_string_lossy().into_owned()),
            ("BACKEND_PORT", free_port()?.to_string()),
            ("FEED_PORT", feed.port.to_string()),
            ("FEED_PATH", "/v1/policy/switch".to_string()),
        ]),
    )?;
    let path = dir.path().join("envoy-policy.yaml");
    std::fs::write(&path, yaml)?;
    let mut envoy = spawn_server(
        "Envoy (filter, policy bench)",
        &envoy_binary()?,
        &envoy_args(&path, "info"),
        dir.path().join("envoy-policy.log"),
    )?;
    wait_ready(&mut envoy, admin)?;
    // Envoy configures one VM more than polls: the one it checks the configuration with.
    let vms = envoy
        .log()
        .lines()
        .filter(|l| l.contains("configured with policy \"boot\""))
        .count()
        .saturating_sub(1)
        .max(1);
    wait_version(&mut envoy, &versions[0], vms)?;
    let mut first = Applies::default();
    first.add(&envoy, &feed, &versions[0]);
    eprintln!(
        "    Envoy holds the {n}-site policy ({vms} VMs; first load {} ms in {} slices); open-loop load starts",
        ms_list(&first.ms),
        slice_counts(&first.slices)
    );

    let stop = Arc::new(AtomicBool::new(false));
    let load = open_loop(http, &force_host(n), THREADS, period, &stop);
    std::thread::sleep(Duration::from_secs(1));
    let quiet = (day_seconds(SystemTime::now()), {
        std::thread::sleep(Duration::from_secs(4));
        day_seconds(SystemTime::now())
    });
    let mut windows: Vec<(bool, String, f64, f64)> = Vec::new();
    for (i, version) in versions.iter().enumerate().skip(1) {
        let is_compact = i > SNAPSHOTS as usize;
        let (body, content_type) = if is_compact {
            (compact_of(version)?, compact::CONTENT_TYPE)
        } else {
            (json_of(version), "application/json")
        };
        feed.serve(body, content_type, version.clone());
        wait_version(&mut envoy, version, vms)?;
        let sent = feed.sent_times(version);
        let applied = applied_lines(&envoy, version);
        let start = sent.iter().copied().fold(f64::INFINITY, f64::min);
        let end = applied
            .iter()
            .map(|a| a.0)
            .fold(f64::NEG_INFINITY, f64::max);
        windows.push((is_compact, version.clone(), start, end));
        std::thread::sleep(Duration::from_millis(1500));
    }
    let load_ends = day_seconds(SystemTime::now());
    stop.store(true, Ordering::Relaxed);
    let mut samples = Vec::new();
    for thread in load {
        samples.extend(
            thread
                .join()
                .map_err(|_| anyhow!("a load thread panicked"))??,
        );
    }
    let rate = THREADS as f64 / period.as_secs_f64();
    // Quiet: the 4 s before the first snapshot and the gaps between snapshots, from
    // QUIET_AFTER past a window's end (the replaced policy is freed meanwhile) to the next
    // window's start, so that a burst of noise from outside (this machine is shared) weighs
    // on both sides of the ratio alike.
    let mut quiet_spans = vec![quiet];
    for (i, w) in windows.iter().enumerate() {
        let next = windows.get(i + 1).map_or(load_ends, |n| n.2);
        quiet_spans.push((w.3 + QUIET_AFTER.as_secs_f64(), next));
    }
    let mut quiet_latency: Vec<f64> = samples
        .iter()
        .filter(|(at, _)| quiet_spans.iter().any(|q| *at >= q.0 && *at <= q.1))
        .map(|s| s.1)
        .collect();
    let stall = |compact: bool| -> FormatStall {
        let chosen: Vec<&(bool, String, f64, f64)> =
            windows.iter().filter(|w| w.0 == compact).collect();
        let mut latency: Vec<f64> = samples
            .iter()
            .filter(|(at, _)| chosen.iter().any(|w| *at >= w.2 && *at <= w.3))
            .map(|s| s.1)
            .collect();
        let mut applies = Applies::default();
        for w in &chosen {
            applies.add(&envoy, &feed, &w.1);
        }
        FormatStall {
            applies,
            samples: latency.len(),
            max_ms: latency.iter().copied().fold(0.0, f64::max),
            p99_ms: percentile(&mut latency, 0.99),
        }
    };
    let (json_stall, compact_stall) = (stall(false), stall(true));

    // The redirect path with the 100k-site tables (applied from the compact snapshot).
    let pid = envoy
        .program_pid()
        .ok_or_else(|| anyhow!("no Envoy process under timeout"))?;
    let setup = Setup {
        key: "policy-redirect".into(),
        label: format!("autohttps filter, force, {n} sites (compact snapshot)"),
        url: format!("http://127.0.0.1:{http}/index.html?from=bench"),
        host: force_host(n),
        expect: Expect::Redirect,
    };
    setup.check()?;
    wrk(&setup, 1)?;
    let mut redirect = Vec::new();
    for _ in 0..3 {
        std::thread::sleep(Duration::from_secs(1));
        let before = process_cpu(pid)?;
        let run = wrk(&setup, 4)?;
        let cpu = process_cpu(pid)? - before;
        let requests = run.rps * 4.0;
        redirect.push((run.rps, cpu / requests * 1e6));
        eprintln!(
            "    redirect, {n} sites: {:.0} req/s, Envoy CPU {:.1} us/request",
            run.rps,
            cpu / requests * 1e6
        );
    }
    Ok(EnvoyRows {
        first,
        quiet_samples: quiet_latency.len(),
        quiet_p99_ms: percentile(&mut quiet_latency, 0.99),
        json: json_stall,
        compact: compact_stall,
        rate,
        redirect,
    })
}

/// `BENCH_ONLY=policy`.
pub(super) fn run(settings: &Settings) -> anyhow::Result<()> {
    let started = Instant::now();
    let n: usize = env_number("BENCH_POLICY_SITES", 100_000)?;
    let wasm = Artefacts::locate()?;
    let json = Arc::new(policy_json(n, &feed_version(1)).into_bytes());
    let document: PolicyDocument = serde_json::from_slice(&json)?;
    let body = compact::encode_snapshot(&feed_version(1), &document.settings, &document.sites)
        .map_err(|e| anyhow!(e))?;
    eprintln!("==> policy feed, {n} sites, in the wasmtime host");
    let vm = in_vm(&wasm, n, &json, &body)?;
    for (what, applies) in [("JSON", &vm.json), ("compact", &vm.compact)] {
        for a in applies {
            eprintln!(
                "    {what}: CPU {:.1} ms (wall {:.1} ms) in {} callbacks, longest {:.2} ms, memory {:.1} MiB",
                ms_of(a.cpu),
                ms_of(a.wall),
                a.callbacks,
                ms_of(a.longest),
                mib(a.memory_bytes)
            );
        }
    }
    if std::env::var("BENCH_POLICY_ENVOY").as_deref() == Ok("0") {
        return Ok(());
    }
    eprintln!("==> policy feed, {n} sites, in Envoy");
    let envoy = in_envoy(&wasm, n, &json, &document)?;
    let markdown = section(n, &vm, &envoy, started.elapsed());
    println!("{markdown}");
    if settings.out != Path::new("-") {
        let existing = std::fs::read_to_string(&settings.out).unwrap_or_default();
        std::fs::write(&settings.out, replace_section(&existing, &markdown))
            .with_context(|| format!("writing {}", settings.out.display()))?;
        eprintln!("==> written to {}", settings.out.display());
    }
    Ok(())
}

const HEADING: &str = "## Policy feed at scale";

/// `existing` with its policy section replaced by `section` (appended when absent).
fn replace_section(existing: &str, section: &str) -> String {
    let Some(start) = existing.find(HEADING) else {
        return format!("{}\n\n{section}\n", existing.trim_end());
    };
    let rest = &existing[start + HEADING.len()..];
    let end = rest
        .find("\n## ")
        .map_or(existing.len(), |e| start + HEADING.len() + e + 1);
    format!("{}{section}\n\n{}", &existing[..start], &existing[end..])
        .trim_end()
        .to_string()
        + "\n"
}

fn section(n: usize, vm: &VmRows, envoy: &EnvoyRows, elapsed: Duration) -> String {
    let cpu = |a: &[VmApply]| median(&mut a.iter().map(|a| ms_of(a.cpu)).collect::<Vec<_>>());
    let wall = |a: &[VmApply]| median(&mut a.iter().map(|a| ms_of(a.wall)).collect::<Vec<_>>());
    let longest =
        |a: &[VmApply]| median(&mut a.iter().map(|a| ms_of(a.longest)).collect::<Vec<_>>());
    let memory = |a: &[VmApply]| a.iter().map(|a| a.memory_bytes).max().unwrap_or(0);
    let (json_cpu, compact_cpu) = (cpu(&vm.json), cpu(&vm.compact));
    let delta_ms = median(&mut vm.delta_cpu.iter().map(|d| ms_of(*d)).collect::<Vec<_>>());
    let ratio = envoy.compact.p99_ms / envoy.quiet_p99_ms;
    let rps = median(&mut envoy.redirect.iter().map(|r| r.0).collect::<Vec<_>>());
    let us = median(&mut envoy.redirect.iter().map(|r| r.1).collect::<Vec<_>>());
    let mut out = String::new();
    let _ = writeln!(out, "{HEADING}\n");
    let _ = writeln!(
        out,
        "Produced by `BENCH_ONLY=policy make bench` on {}, commit `{}`, in {:.0} s; load average {} at the end. {n} sites of three names (the policy of part 3).\n",
        command_text("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        command_text("git", &["describe", "--always", "--dirty"]),
        elapsed.as_secs_f64(),
        load_average()
    );
    let _ = writeln!(out, "| measurement | result | target | status |");
    let _ = writeln!(out, "| --- | --- | --- | --- |");
    let _ = writeln!(
        out,
        "| snapshot apply per VM, compact (wasmtime, CPU) | {compact_cpu:.1} ms CPU ({:.1} ms wall) in {} slices, the longest {:.2} ms; {:.1} MB | ≤ 150 ms | {} |",
        wall(&vm.compact),
        vm.compact.first().map_or(0, |a| a.callbacks),
        longest(&vm.compact),
        vm.compact_bytes as f64 / 1e6,
        verdict(compact_cpu <= 150.0)
    );
    let _ = writeln!(
        out,
        "| snapshot apply per VM, JSON (wasmtime, CPU; before) | {json_cpu:.1} ms CPU ({:.1} ms wall) in one callback; {:.1} MB | | |",
        wall(&vm.json),
        vm.json_bytes as f64 / 1e6
    );
    let _ = writeln!(
        out,
        "| snapshot apply per VM in Envoy (body sent → applied, each VM, 4 snapshots each) | compact {} ms (slices {}; the longest slice {} ms) · JSON {} ms | | |",
        ms_list(&envoy.compact.applies.ms),
        slice_counts(&envoy.compact.applies.slices),
        slice_longest(&envoy.compact.applies.slices),
        ms_list(&envoy.json.applies.ms)
    );
    let _ = writeln!(
        out,
        "| first snapshot into a VM holding no site, compact (Envoy, body sent → applied, each VM) | {} ms (slices {}; the longest slice {} ms) | | |",
        ms_list(&envoy.first.ms),
        slice_counts(&envoy.first.slices),
        slice_longest(&envoy.first.slices)
    );
    let _ = writeln!(
        out,
        "| VM memory after the compact snapshot through the feed (linear memory) | {:.1} MiB (JSON through the feed: {:.1} MiB) | ≤ 48 MiB | {} |",
        mib(memory(&vm.compact)),
        mib(memory(&vm.json)),
        verdict(mib(memory(&vm.compact)) <= 48.0)
    );
    let _ = writeln!(
        out,
        "| one-site change applied per VM (delta, wasmtime, wall of the callback) | {delta_ms:.3} ms | ≤ 1 ms | {} |",
        verdict(delta_ms <= 1.0)
    );
    let _ = writeln!(
        out,
        "| one-site change on the wire (delta body) | {} bytes | ≤ 4 KiB | {} |",
        vm.delta_bytes,
        verdict(vm.delta_bytes <= 4096)
    );
    let _ = writeln!(
        out,
        "| unrelated requests during a {n}-site snapshot, compact (Envoy, open loop {:.0} req/s) | p99 {:.2} ms (max {:.2} ms, {} requests) vs quiet p99 {:.2} ms ({} requests): {ratio:.2} × quiet | ≤ 2 × quiet | {} |",
        envoy.rate,
        envoy.compact.p99_ms,
        envoy.compact.max_ms,
        envoy.compact.samples,
        envoy.quiet_p99_ms,
        envoy.quiet_samples,
        verdict(ratio <= 2.0)
    );
    let _ = writeln!(
        out,
        "| unrelated requests during a {n}-site snapshot, JSON (before) | p99 {:.2} ms (max {:.2} ms, {} requests): {:.2} × quiet | | |",
        envoy.json.p99_ms,
        envoy.json.max_ms,
        envoy.json.samples,
        envoy.json.p99_ms / envoy.quiet_p99_ms
    );
    let _ = writeln!(
        out,
        "| redirect path with the {n}-site tables (Envoy CPU per request, wrk -t1 -c32, 3 × 4 s) | {us:.1} CPU-µs per request · {} req/s (per run: {}) | | |",
        thousands(rps),
        envoy
            .redirect
            .iter()
            .map(|(r, u)| format!("{} req/s {u:.1} µs", thousands(*r)))
            .collect::<Vec<_>>()
            .join(" · ")
    );
    let _ = write!(
        out,
        "\n- **Snapshot apply (wasmtime).** The real `.wasm` in the wasmtime host: a VM running an empty policy polls, the feed answers the {n}-site snapshot; the figure is the CPU time of this thread (`/proc/thread-self/schedstat`, read before the response and after the last slice) over `proxy_on_http_call_response` and, for the compact snapshot, every `proxy_on_tick` that builds a slice until the policy is swapped (median of 3 fresh VMs); the driver is the release build `make bench` makes. The compact snapshot is copied into the VM in the response callback and built from the next tick a slice at a time (about 0.15 ms or 4,096 sites, whichever first, into a VM holding sites; into one holding none, as here, 2 ms or 16,384 sites; wasmtime's clock stands still within a call, so there the site cap decides), the policy held serving in between.\n- **One-site change.** After the compact snapshot, the feed answers the next poll with a delta upserting one site (the sidecar's delta format); wall time of that callback (median of 3).\n- **Stall (Envoy).** {} connections each send `GET` to a force site every {} ms (open loop: a request's latency counts from when it was due, so a stalled worker shows in full). Quiet: 4 s with no change, and each gap between snapshots from 0.5 s after a window's end to the next window (so noise from outside this shared machine weighs on both sides of the ratio). The feed (a server in the driver, polled every 500 ms) first serves the {n}-site policy as a compact snapshot to VMs holding only the empty boot policy (the first-load row), then four new {n}-site JSON snapshots, then four compact ones, 1.5 s apart; a snapshot's window runs from its body being sent to the last VM's `policy … applied` line, and the p99 is over requests due within the windows. Envoy runs two polling VMs (main thread and worker) on this 2-core machine.\n- **Redirect path.** After the snapshots, wrk against the same force site; Envoy's CPU time (utime + stime of its process) over the run divided by the requests.",
        4, 4
    );
    out
}

/// Each build's slice count, `a / b / …`.
fn slice_counts(slices: &[Slices]) -> String {
    slices
        .iter()
        .map(|s| s.count.to_string())
        .collect::<Vec<_>>()
        .join(" / ")
}

/// Each build's longest slice in ms, `a / b / …`.
fn slice_longest(slices: &[Slices]) -> String {
    slices
        .iter()
        .map(|s| s.longest_ms.map_or("?".into(), |ms| format!("{ms:.1}")))
        .collect::<Vec<_>>()
        .join(" / ")
}

/// Milliseconds, `a / b / …`.
fn ms_list(v: &[f64]) -> String {
    v.iter()
        .map(|m| format!("{m:.0}"))
        .collect::<Vec<_>>()
        .join(" / ")
}
