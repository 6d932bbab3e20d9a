//! The servers measured: Envoy with the filter and its baselines, nginx, the policy feed,
//! each a kit process.

use super::*;

/// A server process (the kit's [`Process`]: under `timeout`, stopped when dropped or when the
/// bench dies), in UTC so that its log times compare with the bench's clock.
pub(crate) fn spawn_server(
    name: &str,
    program: &Path,
    args: &[String],
    log: PathBuf,
) -> anyhow::Result<Process> {
    let mut command = Command::new(program);
    command.args(args).env("TZ", "UTC");
    Process::start(
        name,
        &command,
        &log,
        LogMode::Create,
        Lifetime::Limited(Duration::from_secs(SERVER_LIFETIME_SECS)),
    )
}

/// The policy feed: `GET /v1/policy/<n>` answers the n-site policy (304 when the ETag
/// matches) and records when each body was fully written.
pub(crate) struct FeedServer {
    pub(crate) port: u16,
    pub(crate) sent: Arc<Mutex<Vec<(String, SystemTime)>>>,
}

impl FeedServer {
    pub(crate) fn start(policies: &[(usize, Arc<Vec<u8>>)]) -> anyhow::Result<FeedServer> {
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

    pub(crate) fn sent_times(&self, path: &str) -> Vec<SystemTime> {
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

pub(crate) fn serve_feed(
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

pub(crate) fn etag(path: &str) -> String {
    path.rsplit('/').next().unwrap_or("").to_string()
}

pub(crate) use autohttps_kit::envoy::log_seconds;

pub(crate) fn day_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() % 86_400.0)
        .unwrap_or(0.0)
}

pub(crate) struct Servers {
    pub(crate) _dir: tempfile::TempDir,
    pub(crate) _feed: FeedServer,
    pub(crate) nginx: Process,
    pub(crate) baseline: Process,
    pub(crate) filters: Vec<(usize, Process)>,
    pub(crate) ports: Ports,
    /// Per policy size: for each VM, ms from the feed body sent to "policy … applied".
    pub(crate) envoy_apply_ms: Vec<Vec<f64>>,
}

pub(crate) struct Ports {
    pub(crate) nginx_redirect: u16,
    pub(crate) native: u16,
    pub(crate) minimal: u16,
    pub(crate) baseline_tls: u16,
    pub(crate) filter_http: Vec<u16>,
    pub(crate) filter_https: Vec<u16>,
}

pub(crate) fn envoy_args(config: &Path, log_level: &str) -> Vec<String> {
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

pub(crate) fn wait_ready(server: &mut Process, admin: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        server.check_running()?;
        if let Ok((200, body)) = http_get(admin, "/ready")
            && body.trim() == "LIVE"
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{} was not ready within 60 s", server.name());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub(crate) fn wait_port(server: &mut Process, port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        server.check_running()?;
        if Instant::now() > deadline {
            bail!("{} does not listen on {port}", server.name());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

impl Servers {
    pub(crate) fn start(
        wasm: &Artefacts,
        policies: &[(usize, Arc<Vec<u8>>)],
    ) -> anyhow::Result<Servers> {
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
        let mut nginx = spawn_server(
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
        let mut baseline = spawn_server(
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
            let mut server = spawn_server(
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

    pub(crate) fn setups(&self, settings: &Settings) -> Vec<Setup> {
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
        // Dropping each Process stops it; say so for the log.
        let names: Vec<String> = std::iter::once(self.nginx.name().to_string())
            .chain(std::iter::once(self.baseline.name().to_string()))
            .chain(self.filters.iter().map(|(_, s)| s.name().to_string()))
            .collect();
        eprintln!("==> stopping {}", names.join(", "));
    }
}

/// Waits until every VM of this Envoy logged that it applied the `n`-site policy; returns when
/// (seconds since midnight UTC) each did.
pub(crate) fn wait_applied(server: &mut Process, n: usize) -> anyhow::Result<Vec<f64>> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let needle = format!("policy \"v-{n}\" applied");
    loop {
        server.check_running()?;
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
                server.name(),
                applied.len()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub(crate) fn which(program: &str) -> anyhow::Result<PathBuf> {
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
