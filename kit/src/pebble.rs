//! Pebble (a small ACME CA) and pebble-challtestsrv (its mock DNS) on loopback: the CA every
//! suite, the bench and `make run` issue from. One place sets how they run, e.g. that no nonce
//! is rejected unless a test asks for it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};

use crate::process::{Lifetime, Process, wait_until};

/// Where and how to run Pebble and challtestsrv.
#[derive(Debug, Clone)]
pub struct PebbleOptions {
    /// Their files: configuration, the listener's certificate, `pebble.log`,
    /// `challtestsrv.log`.
    pub dir: PathBuf,
    /// The port Pebble validates HTTP-01 on (Envoy's or the sidecar's plain listener).
    pub http_port: u16,
    /// Pebble's ACME listener.
    pub acme_port: u16,
    /// Pebble's management listener (roots, intermediates).
    pub management_port: u16,
    /// challtestsrv's mock DNS (UDP and TCP).
    pub dns_port: u16,
    /// challtestsrv's management listener.
    pub dns_management_port: u16,
    /// Extra environment for Pebble (it wins over the defaults, e.g.
    /// `PEBBLE_WFE_NONCEREJECT=50` to reject half of the nonces).
    pub env: Vec<(String, String)>,
    /// How long they may live.
    pub lifetime: Lifetime,
    /// Print what is being started.
    pub verbose: bool,
}

impl PebbleOptions {
    /// Free ports for everything but `http_port`, files in `dir`.
    pub fn on_free_ports(dir: &Path, http_port: u16, lifetime: Lifetime) -> anyhow::Result<Self> {
        Ok(Self {
            dir: dir.to_path_buf(),
            http_port,
            acme_port: crate::free_port()?,
            management_port: crate::free_port()?,
            dns_port: crate::free_port()?,
            dns_management_port: crate::free_port()?,
            env: Vec::new(),
            lifetime,
            verbose: false,
        })
    }
}

/// A running Pebble + pebble-challtestsrv pair, stopped on drop.
#[derive(Debug)]
pub struct Pebble {
    /// ACME directory URL.
    pub directory_url: String,
    /// Pebble's management base URL (roots, intermediates).
    pub management_url: String,
    /// challtestsrv's management base URL.
    pub challtestsrv_url: String,
    /// challtestsrv's mock DNS server.
    pub dns: SocketAddr,
    /// The CA certificate that signed Pebble's own HTTPS listener certificate (PEM file).
    pub listener_ca: PathBuf,
    /// The port Pebble validates HTTP-01 on.
    pub http_port: u16,
    dir: PathBuf,
    pebble: Process,
    challtestsrv: Process,
}

impl Pebble {
    /// Starts challtestsrv (every name resolves to 127.0.0.1 unless set otherwise) and Pebble
    /// (PEBBLE_VA_NOSLEEP=1, PEBBLE_WFE_NONCEREJECT=0, then `options.env`), and waits until
    /// both answer.
    pub fn start(options: &PebbleOptions) -> anyhow::Result<Pebble> {
        let dir = &options.dir;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let say = |message: String| {
            if options.verbose {
                println!("==> {message}");
            }
        };
        say(format!(
            "starting pebble-challtestsrv (mock DNS on 127.0.0.1:{}; every name resolves to 127.0.0.1)",
            options.dns_port
        ));
        let challtestsrv = Process::spawn(
            "pebble-challtestsrv",
            Path::new("pebble-challtestsrv"),
            &[
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
                "-dns01",
                &format!("127.0.0.1:{}", options.dns_port),
                "-management",
                &format!("127.0.0.1:{}", options.dns_management_port),
                "-defaultIPv4",
                "127.0.0.1",
                "-defaultIPv6",
                "",
            ],
            &[],
            dir.join("challtestsrv.log"),
            options.lifetime,
        )?;

        say(format!(
            "starting Pebble, a local ACME CA (https://127.0.0.1:{}/dir), validating HTTP-01 on port {}",
            options.acme_port, options.http_port
        ));
        let listener_ca = write_listener_certificate(dir)?;
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{}", options.acme_port),
                "managementListenAddress": format!("127.0.0.1:{}", options.management_port),
                "certificate": dir.join("pebble-cert.pem"),
                "privateKey": dir.join("pebble-key.pem"),
                "httpPort": options.http_port,
                "tlsPort": crate::free_port()?,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false
            }
        });
        let config_path = dir.join("pebble.json");
        std::fs::write(&config_path, config.to_string())?;
        let mut command = Command::new("pebble");
        command
            .arg("-config")
            .arg(&config_path)
            .arg("-dnsserver")
            .arg(format!("127.0.0.1:{}", options.dns_port))
            .env("PEBBLE_VA_NOSLEEP", "1")
            // Pebble rejects 5% of nonces by design; instant-acme retries a badNonce twice,
            // so about one order in a hundred failed its attempt and waited a minute for the
            // retry, longer than a test waits. Nonce faults have their own tests
            // (`PEBBLE_WFE_NONCEREJECT=50` through `env`, which overrides this).
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .envs(options.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let pebble = Process::start(
            "pebble",
            &command,
            &dir.join("pebble.log"),
            crate::process::LogMode::Create,
            options.lifetime,
        )?;
        let mut pebble = Pebble {
            directory_url: format!("https://127.0.0.1:{}/dir", options.acme_port),
            management_url: format!("https://127.0.0.1:{}", options.management_port),
            challtestsrv_url: format!("http://127.0.0.1:{}", options.dns_management_port),
            dns: SocketAddr::from(([127, 0, 0, 1], options.dns_port)),
            listener_ca,
            http_port: options.http_port,
            dir: dir.clone(),
            pebble,
            challtestsrv,
        };
        pebble.wait_ready()?;
        Ok(pebble)
    }

    /// [`Pebble::start`] on free ports, files in `dir`; a start that does not come up is
    /// retried on fresh ports (Pebble's and challtestsrv's ports are picked free and released,
    /// since they are other processes, so another test can take one first).
    pub fn start_on_free_ports(
        dir: &Path,
        http_port: u16,
        env: &[(&str, &str)],
        lifetime: Lifetime,
    ) -> anyhow::Result<Pebble> {
        let mut last_error = None;
        for attempt in 0..3 {
            let options = PebbleOptions {
                env: env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..PebbleOptions::on_free_ports(
                    &dir.join(format!("pebble-{attempt}")),
                    http_port,
                    lifetime,
                )?
            };
            match Pebble::start(&options) {
                Ok(pebble) => return Ok(pebble),
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow!("pebble did not start")))
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let listener_ca = self.listener_ca.display().to_string();
        let directory = self.directory_url.clone();
        let challtestsrv = self.challtestsrv_url.clone();
        let log = self.dir.join("challtestsrv.log");
        let mut lost_port = None;
        let ready = wait_until("Pebble", Duration::from_secs(20), || {
            // challtestsrv only logs a server it could not start (its DNS port, picked free
            // and released, may have been taken meanwhile) and answers its management API
            // anyway.
            let challtestsrv_log = std::fs::read_to_string(&log).unwrap_or_default();
            if challtestsrv_log.contains("address already in use") {
                lost_port = Some(challtestsrv_log);
                return Some(());
            }
            if self.pebble.exited() || self.challtestsrv.exited() {
                return Some(());
            }
            curl_ok(&["--cacert", &listener_ca, &directory])?;
            curl_ok(&[
                "-d",
                r#"{"host":"ready.test."}"#,
                &format!("{challtestsrv}/clear-a"),
            ])?;
            Some(())
        });
        if let Some(log) = lost_port {
            bail!("pebble-challtestsrv lost a port; its log: {log}");
        }
        self.pebble.check_running()?;
        self.challtestsrv.check_running()?;
        ready.map_err(|e| {
            anyhow!(
                "{e:#}\nPebble's log ({}):\n{}\nchalltestsrv's log:\n{}",
                self.pebble.log_path().display(),
                self.pebble.log_tail(20),
                self.challtestsrv.log_tail(20)
            )
        })
    }

    /// Pebble's log so far.
    pub fn log(&self) -> String {
        self.pebble.log()
    }

    /// The last `lines` of Pebble's log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        self.pebble.log_tail(lines)
    }

    /// CPU seconds Pebble has used so far (see [`Process::cpu_seconds`]).
    pub fn cpu_seconds(&self) -> Option<f64> {
        self.pebble.cpu_seconds()
    }

    /// Orders Pebble created so far (its "Added order" log lines): what the CA saw, including
    /// any order the sidecar never recorded.
    pub fn orders_created(&self) -> usize {
        self.log().matches("Added order").count()
    }

    /// The certificate and key of Pebble's own HTTPS listener (for a proxy posing as Pebble).
    pub fn listener_identity(&self) -> (PathBuf, PathBuf) {
        (
            self.dir.join("pebble-cert.pem"),
            self.dir.join("pebble-key.pem"),
        )
    }

    /// Makes `host` resolve (A) to `address` only, in the mock DNS.
    pub fn set_a(&self, host: &str, address: &str) -> anyhow::Result<()> {
        for (path, body) in [
            ("clear-a", serde_json::json!({ "host": format!("{host}.") })),
            (
                "add-a",
                serde_json::json!({ "host": format!("{host}."), "addresses": [address] }),
            ),
        ] {
            let url = format!("{}/{path}", self.challtestsrv_url);
            curl_ok(&["-d", &body.to_string(), &url])
                .ok_or_else(|| anyhow!("challtestsrv {path} failed ({url})"))?;
        }
        Ok(())
    }

    /// Pebble's current root CA (PEM): what clients of its certificates trust.
    pub fn root_pem(&self) -> anyhow::Result<String> {
        let url = format!("{}/roots/0", self.management_url);
        let listener_ca = self.listener_ca.display().to_string();
        let body = curl_ok(&["--cacert", &listener_ca, &url])
            .ok_or_else(|| anyhow!("Pebble's management API did not answer {url}"))?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }
}

/// `curl -sf` with these arguments, no proxy and a time limit: its output, if it succeeded.
fn curl_ok(args: &[&str]) -> Option<Vec<u8>> {
    Command::new("curl")
        .args(["-sf", "--max-time", "5", "--noproxy", "*"])
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| o.stdout)
}

/// Pebble's own HTTPS listener needs a certificate (none ships with the package): a throwaway
/// CA and a leaf for 127.0.0.1, made with openssl. Returns the CA file to trust.
fn write_listener_certificate(dir: &Path) -> anyhow::Result<PathBuf> {
    let ca_key = dir.join("pebble-listener-ca-key.pem");
    let ca = dir.join("pebble-listener-ca.pem");
    let csr = dir.join("pebble.csr");
    let ext = dir.join("pebble-ext.cnf");
    std::fs::write(
        &ext,
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )?;
    let steps: [Vec<String>; 3] = [
        vec![
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "30",
            "-subj",
            "/CN=autohttps local Pebble listener CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-keyout",
        ]
        .into_iter()
        .map(String::from)
        .chain([
            ca_key.display().to_string(),
            "-out".into(),
            ca.display().to_string(),
        ])
        .collect(),
        vec![
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
        ]
        .into_iter()
        .map(String::from)
        .chain([
            dir.join("pebble-key.pem").display().to_string(),
            "-out".into(),
            csr.display().to_string(),
        ])
        .collect(),
        vec!["x509", "-req", "-days", "30", "-in"]
            .into_iter()
            .map(String::from)
            .chain([
                csr.display().to_string(),
                "-CA".into(),
                ca.display().to_string(),
                "-CAkey".into(),
                ca_key.display().to_string(),
                "-CAcreateserial".into(),
                "-extfile".into(),
                ext.display().to_string(),
                "-out".into(),
                dir.join("pebble-cert.pem").display().to_string(),
            ])
            .collect(),
    ];
    for args in steps {
        let output = Command::new("openssl").args(&args).output()?;
        if !output.status.success() {
            bail!(
                "openssl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
    Ok(ca)
}
