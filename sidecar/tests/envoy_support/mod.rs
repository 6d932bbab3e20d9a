//! Envoy test support: a real Envoy on free loopback ports rendered from a fixture under
//! `tests/fixtures/`, test certificates, and TLS clients that report which certificate the
//! server presented (one accepts any, one verifies against a given root).

#![allow(dead_code)] // each test binary uses a different part

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use autohttps_sidecar::sds::ServedCertificate;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpStream;

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

/// Loopback ports below the ephemeral range: the kit's allocator (through `support`, which a
/// test binary using this module also declares), so no two servers get the same port.
pub use crate::support::free_port;

/// A running Envoy (the kit's, under `timeout`), stopped on drop.
pub struct Envoy {
    kit: autohttps_kit::envoy::Envoy,
    pub https_port: u16,
    pub admin_port: u16,
}

impl Envoy {
    /// Renders `template` (`${ADMIN_PORT}`, `${HTTPS_PORT}`, `${SDS_SOCKET}` and `extra`, each
    /// of which must be used) onto free loopback ports, starts Envoy with one worker, and waits
    /// until it is live and its TLS port accepts connections.
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
        let config = autohttps_kit::render::render_exact(template, &values)
            .unwrap_or_else(|e| panic!("rendering the Envoy fixture: {e:#}"));
        let dir = dir.to_owned();
        // The kit waits for Envoy by polling: off the test's runtime thread.
        let kit = tokio::task::spawn_blocking(move || {
            autohttps_kit::envoy::Envoy::start_in(
                &config,
                admin_port,
                Some(&dir),
                autohttps_kit::Lifetime::Limited(Duration::from_secs(900)),
            )
        })
        .await
        .expect("the Envoy start task")
        .unwrap_or_else(|e| panic!("{e:#}"));
        let envoy = Envoy {
            kit,
            https_port,
            admin_port,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", https_port)).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "envoy's TLS port not listening in 30 s:\n{}",
                envoy.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        envoy
    }

    /// The body of an admin GET, or `None` when admin does not answer 200.
    pub async fn admin(&self, path: &str) -> Option<String> {
        let (port, path) = (self.admin_port, path.to_owned());
        match tokio::task::spawn_blocking(move || autohttps_kit::http::http_get(port, &path)).await
        {
            Ok(Ok((200, body))) => Some(body),
            _ => None,
        }
    }

    /// The last lines of Envoy's log, for failure messages.
    pub fn log_tail(&self) -> String {
        self.kit.log_tail(40)
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
