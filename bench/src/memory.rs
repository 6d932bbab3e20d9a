//! The sidecar's memory: a store seeded through the sidecar's own store code, the release
//! sidecar started on it alone, its resident memory read.

use super::*;

/// Fills a fresh store with `n` sites of two names each, each with a current self-signed
/// certificate (P-256, 90 days) and its key, through the sidecar's own store code. Nothing is
/// due for issuance, so the sidecar started on it never calls a CA.
pub(crate) fn seed_store(database: &Path, n: usize) -> anyhow::Result<()> {
    use autohttps_sidecar::hostname::Hostname;
    use autohttps_sidecar::store::prelude::*;
    use autohttps_sidecar::store::{
        NewCertificate, NewSite, PrivateKeyPem, SitePolicy, SqliteStore,
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
pub(crate) fn resident_kib(pid: u32) -> anyhow::Result<(u64, u64)> {
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
pub(crate) fn sidecar_memory(binary: &Path, certificates: usize) -> anyhow::Result<MemoryRow> {
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
    let unused = free_port()?;
    SidecarConfig {
        data_dir: data.clone(),
        admin: ([127, 0, 0, 1], admin).into(),
        internal: ([127, 0, 0, 1], internal).into(),
        metrics: ([127, 0, 0, 1], 0).into(),
        admin_token: "autohttps-bench-memory-admin-token".into(),
        directory_url: format!("https://127.0.0.1:{unused}/dir"),
        extra_root_ca: None,
        debounce_ms: None,
        platform_addresses: vec!["127.0.0.1".into()],
        nameservers: vec![([127, 0, 0, 1], unused).into()],
        sds_socket: None,
        edge: None,
        orders_in_flight: None,
        store: None,
    }
    .write(&config)?;
    let (mut sidecar, ready) = start_bench_sidecar(
        binary,
        &config,
        &dir.path().join("sidecar.log"),
        internal,
        "SDS serves the store's certificates",
        Duration::from_secs(120),
    )?;
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
    sidecar.check_running()?;
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

/// Starts the release sidecar on `config` (its log in `log`) and waits, at most `limit`, until
/// its log has `ready_line` and its internal listener (127.0.0.1:`internal`) accepts: the
/// process and how long that took.
pub(crate) fn start_bench_sidecar(
    binary: &Path,
    config: &Path,
    log: &Path,
    internal: u16,
    ready_line: &str,
    limit: Duration,
) -> anyhow::Result<(Process, Duration)> {
    let started = Instant::now();
    let mut sidecar = spawn_server(
        "the sidecar",
        binary,
        &[
            "--config".into(),
            config.display().to_string(),
            "serve".into(),
        ],
        log.to_path_buf(),
    )?;
    loop {
        sidecar.check_running()?;
        let text = strip_ansi(&sidecar.log());
        if text.contains(ready_line) && TcpStream::connect(("127.0.0.1", internal)).is_ok() {
            return Ok((sidecar, started.elapsed()));
        }
        if started.elapsed() > limit {
            bail!("the sidecar did not start within {limit:?}:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
