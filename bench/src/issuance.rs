//! Part 4: issuance on the whole stack (the kit's `Stack`) against Pebble.

use super::*;

/// Sites created one at a time for the creation → first handshake figure (after a warm-up
/// site, which also creates the ACME account).
pub(crate) const SINGLE_SITES: usize = 7;
/// The longest one measurement waits for names to be served before it gives up.
pub(crate) const SERVE_LIMIT: Duration = Duration::from_secs(180);
/// Threads creating the burst's sites through the admin API.
pub(crate) const CREATORS: usize = 4;
/// Threads polling handshakes (each handshake is one curl).
pub(crate) const POLLERS: usize = 3;

pub(crate) struct IssuanceSettings {
    pub(crate) burst_sites: usize,
    pub(crate) stored_certificates: usize,
}

impl IssuanceSettings {
    pub(crate) fn from_env() -> anyhow::Result<IssuanceSettings> {
        let number = |name: &str, default: usize| env_number(name, default);
        Ok(IssuanceSettings {
            burst_sites: number("BENCH_ISSUANCE_SITES", 100)?.max(1),
            stored_certificates: number("BENCH_STORE_CERTIFICATES", 10_000)?,
        })
    }
}

/// Part 4's figures, or why they were not taken.
pub(crate) enum IssuanceOutcome {
    Measured(Box<Issuance>),
    NotMeasured(String),
}

pub(crate) struct Issuance {
    pub(crate) date: String,
    pub(crate) commit: String,
    pub(crate) load_start: String,
    pub(crate) load_end: String,
    pub(crate) elapsed: Duration,
    /// The sidecar's effective `acme.orders_in_flight` and `acme.debounce_ms`.
    pub(crate) orders_in_flight: usize,
    pub(crate) debounce_ms: u64,
    pub(crate) precheck: bool,
    pub(crate) single: Vec<SingleSite>,
    pub(crate) burst: Burst,
    pub(crate) memory: Vec<MemoryRow>,
}

/// One site created alone: when its primary name first completed a verified handshake, and
/// when the sidecar logged its certificate stored (both from the creation request).
pub(crate) struct SingleSite {
    pub(crate) served: Duration,
    pub(crate) stored: Option<Duration>,
}

pub(crate) struct Burst {
    pub(crate) sites: usize,
    pub(crate) names: usize,
    /// When the last creation request was answered.
    pub(crate) created: Duration,
    /// Per name, when it first completed a verified handshake (`None`: not within the limit).
    pub(crate) served: Vec<Option<Duration>>,
    /// "certificate stored" log lines of the burst's sites, from the first creation request.
    pub(crate) stored: Vec<Duration>,
    /// Handshakes tried while polling.
    pub(crate) handshakes: usize,
    /// The sidecar's WARN and ERROR lines during the burst.
    pub(crate) problems: Vec<String>,
}

pub(crate) struct MemoryRow {
    pub(crate) certificates: usize,
    pub(crate) seed: Duration,
    pub(crate) database_bytes: u64,
    /// From the process start to "SDS serves the store's certificates" (index built).
    pub(crate) ready: Duration,
    pub(crate) rss_kib: u64,
    pub(crate) rss_after_feed_kib: u64,
    pub(crate) peak_kib: u64,
    pub(crate) policy_bytes: usize,
}

pub(crate) fn median_duration(values: &[Duration]) -> Duration {
    let mut seconds: Vec<f64> = values.iter().map(Duration::as_secs_f64).collect();
    Duration::from_secs_f64(median(&mut seconds).max(0.0))
}

pub(crate) fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// The sidecar binary part 4 measures. `AUTOHTTPS_BIN` outside this repository's
/// `target/release/` is used as it is; otherwise the release build is brought up to date
/// first (a no-op when it is), so the figures are those of the code checked out.
pub(crate) fn sidecar_for_bench() -> anyhow::Result<PathBuf> {
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

pub(crate) fn issuance(settings: &IssuanceSettings) -> IssuanceOutcome {
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

pub(crate) fn measure_issuance(settings: &IssuanceSettings) -> anyhow::Result<Issuance> {
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

pub(crate) type StackFigures = (usize, u64, bool, Vec<SingleSite>, Burst);

pub(crate) fn issuance_on_stack(
    stack: &Stack,
    settings: &IssuanceSettings,
) -> anyhow::Result<StackFigures> {
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
pub(crate) fn burst_names(i: usize) -> Vec<String> {
    let primary = format!("b{i}.issuance.test");
    let mut names = vec![primary.clone(), format!("www.{primary}")];
    if i.is_multiple_of(2) {
        names.push(format!("shop.{primary}"));
    }
    names
}

pub(crate) fn burst(stack: &Stack, sites: usize) -> anyhow::Result<Burst> {
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
    pub(crate) fn all_served(&self) -> Option<Duration> {
        self.served
            .iter()
            .copied()
            .collect::<Option<Vec<_>>>()
            .and_then(|all| all.into_iter().max())
    }

    /// Certificates stored per second, from the first creation request to the last one stored.
    pub(crate) fn orders_per_second(&self) -> f64 {
        self.stored
            .last()
            .map_or(0.0, |last| self.stored.len() as f64 / last.as_secs_f64())
    }

    pub(crate) fn half_served(&self) -> Option<Duration> {
        let mut times: Vec<Duration> = self.served.iter().flatten().copied().collect();
        times.sort();
        times.get(self.names / 2).copied()
    }
}

pub(crate) fn create_site(stack: &Stack, site: &str, names: &[&str]) -> anyhow::Result<()> {
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
pub(crate) fn wait_served(stack: &Stack, host: &str, limit: Duration) -> anyhow::Result<()> {
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

pub(crate) fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Removes the terminal colour codes tracing writes.
pub(crate) fn strip_ansi(line: &str) -> String {
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
pub(crate) fn tracing_seconds(line: &str) -> Option<f64> {
    let stamp = line.split_whitespace().next()?;
    let clock = stamp.split_once('T')?.1.trim_end_matches('Z');
    log_seconds(&format!("[{clock}]"))
}

/// When the sidecar logged "certificate stored" for sites matching `site`, from `since`.
pub(crate) fn stored_times(
    logs: &str,
    since: SystemTime,
    site: impl Fn(&str) -> bool,
) -> Vec<Duration> {
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
