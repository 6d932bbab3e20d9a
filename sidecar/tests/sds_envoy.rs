//! The SDS server against a real Envoy 1.40: an on-demand SNI listener like `envoy/edge.yaml`'s
//! (`fixtures/sds_on_demand.yaml`) and a classic `tls_certificate_sds_secret_configs` listener
//! (`fixtures/sds_classic.yaml`), served from an in-memory source: what a TLS client actually
//! gets.

mod envoy_support;
mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use autohttps_sidecar::sds::{MemoryCertificateSource, SdsConfig, SdsServer, ServedCertificate};
use envoy_support::{Envoy, certificate, fixture, handshake, wait_for_leaf};

/// An edge under test: SDS server on a temp Unix socket, Envoy using it.
struct Edge {
    source: Arc<MemoryCertificateSource>,
    socket: PathBuf,
    sds: Option<SdsServer>,
    envoy: Envoy,
    _dir: tempfile::TempDir,
}

impl Edge {
    /// Starts SDS serving `source`, then Envoy with `template` and its `extra` values.
    async fn start_with(
        template: &str,
        extra: &[(&str, String)],
        source: Arc<MemoryCertificateSource>,
    ) -> Edge {
        envoy_support::init_logging();
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("sds.sock");
        let sds = SdsServer::start(SdsConfig::unix(&socket), source.clone())
            .await
            .expect("SDS server started");
        let envoy = Envoy::start(template, &socket, extra, dir.path()).await;
        Edge {
            source,
            socket,
            sds: Some(sds),
            envoy,
            _dir: dir,
        }
    }

    async fn start(source: Arc<MemoryCertificateSource>) -> Edge {
        Self::start_with(&fixture("sds_on_demand.yaml"), &[], source).await
    }

    fn https(&self) -> u16 {
        self.envoy.https_port
    }

    fn sds(&self) -> &SdsServer {
        self.sds.as_ref().expect("SDS server running")
    }

    /// Waits until exactly `expected` SDS streams are open (Envoy opens one per secret name).
    async fn wait_for_open_streams(&self, expected: usize, within: Duration) {
        let started = std::time::Instant::now();
        while self.sds().open_streams() != expected {
            assert!(
                started.elapsed() < within,
                "{} SDS streams open, expected {expected}",
                self.sds().open_streams()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The value of an Envoy counter (0 when absent).
    async fn counter(&self, name: &str) -> u64 {
        let stats = self
            .envoy
            .admin(&format!("/stats?filter=^{name}$"))
            .await
            .unwrap_or_default();
        stats
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{name}: ")))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(0)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_gets_the_certificate_for_that_name() {
    let source = Arc::new(MemoryCertificateSource::new());
    let (a, a_der) = certificate(&["a.example.test"], "a-1");
    let (b, b_der) = certificate(&["b.example.test"], "b-1");
    source.insert(&["a.example.test"], a);
    source.insert(&["b.example.test"], b);
    let edge = Edge::start(source).await;

    let first = handshake(edge.https(), Some("a.example.test")).await;
    assert_eq!(
        first.leaf.as_deref(),
        Ok(a_der.as_slice()),
        "{}",
        edge.envoy.log_tail()
    );
    let other = handshake(edge.https(), Some("b.example.test")).await;
    assert_eq!(other.leaf.as_deref(), Ok(b_der.as_slice()));
    let again = handshake(edge.https(), Some("a.example.test")).await;
    assert_eq!(again.leaf.as_deref(), Ok(a_der.as_slice()));
    eprintln!(
        "first handshake for a name (SDS fetch): {:?}; repeat (cached): {:?}",
        first.elapsed, again.elapsed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn name_under_a_wildcard_gets_the_wildcard_certificate() {
    let source = Arc::new(MemoryCertificateSource::new());
    let (wild, wild_der) = certificate(&["*.wild.test"], "wild-1");
    source.insert(&["*.wild.test"], wild);
    let edge = Edge::start(source).await;

    let covered = handshake(edge.https(), Some("shop.wild.test")).await;
    assert_eq!(covered.leaf.as_deref(), Ok(wild_der.as_slice()));
    let too_deep = handshake(edge.https(), Some("a.shop.wild.test")).await;
    assert!(
        too_deep.leaf.is_err(),
        "two labels below a wildcard must not be served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_name_fails_the_handshake_fast() {
    let source = Arc::new(MemoryCertificateSource::new());
    let (a, _) = certificate(&["a.example.test"], "a-1");
    source.insert(&["a.example.test"], a);
    let edge = Edge::start(source).await;

    let unknown = handshake(edge.https(), Some("nope.example.test")).await;
    assert!(
        unknown.leaf.is_err(),
        "unknown name was served a certificate"
    );
    eprintln!(
        "unknown name: handshake failed after {:?}: {:?}",
        unknown.elapsed, unknown.leaf
    );
    assert!(
        unknown.elapsed < Duration::from_secs(1),
        "took {:?}",
        unknown.elapsed
    );

    // Envoy asks again for the next handshake: still absent, still fast.
    let again = handshake(edge.https(), Some("nope.example.test")).await;
    assert!(again.leaf.is_err());
    eprintln!(
        "unknown name, second handshake failed after {:?}",
        again.elapsed
    );
    assert!(
        again.elapsed < Duration::from_secs(1),
        "took {:?}",
        again.elapsed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_names_leave_no_sds_stream_open() {
    let edge = Edge::start(Arc::new(MemoryCertificateSource::new())).await;
    for index in 0..5 {
        let name = format!("scan{index}.example.test");
        assert!(handshake(edge.https(), Some(&name)).await.leaf.is_err());
    }
    // Only the prefetched `default` stays watched: Envoy drops a name reported absent.
    edge.wait_for_open_streams(1, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_certificate_is_not_resent_and_its_fix_completes_the_handshake() {
    let source = Arc::new(MemoryCertificateSource::new());
    let (cert, _) = certificate(&["bad.example.test"], "unused");
    let (other, _) = certificate(&["bad.example.test"], "unused");
    // The chain of one certificate with the key of another: Envoy NACKs it.
    let mismatched = ServedCertificate::new(
        "bad-1",
        cert.certificate_chain_pem(),
        other.private_key_pem(),
    );
    source.insert(&["bad.example.test"], Arc::new(mismatched));
    let edge = Edge::start(source).await;

    // Envoy 1.40 keeps a handshake waiting on a rejected secret (it does not fail it).
    let port = edge.https();
    let waiting = tokio::spawn(async move { handshake(port, Some("bad.example.test")).await });
    let rejected = "sds.bad.example.test.update_rejected";
    let started = std::time::Instant::now();
    while edge.counter(rejected).await == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no NACK:\n{}",
            edge.envoy.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        edge.counter(rejected).await,
        1,
        "the rejected version was sent again"
    );
    assert!(!waiting.is_finished());

    let (fixed, fixed_der) = certificate(&["bad.example.test"], "bad-2");
    edge.source.insert(&["bad.example.test"], fixed);
    let resumed = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the waiting handshake completes once the fix is pushed")
        .expect("handshake task");
    assert_eq!(resumed.leaf.as_deref(), Ok(fixed_der.as_slice()));
    assert_eq!(edge.counter("sds.bad.example.test.update_success").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_than_1024_names_are_served_at_once_and_all_get_pushes() {
    let source = Arc::new(MemoryCertificateSource::new());
    let (wild, wild_der) = certificate(&["*.many.test"], "wild-1");
    source.insert(&["*.many.test"], wild);
    let edge = Edge::start(source).await;

    // Envoy opens one SDS stream per name; its default limit of 1024 concurrent requests to a
    // cluster would leave the 1024th name hanging. The fixture (like envoy/edge.yaml) lifts it.
    let names: Vec<String> = (0..1100)
        .map(|index| format!("n{index}.many.test"))
        .collect();
    let started = std::time::Instant::now();
    for chunk in names.chunks(16) {
        let handshakes =
            futures::future::join_all(chunk.iter().map(|name| handshake(edge.https(), Some(name))))
                .await;
        for (name, result) in chunk.iter().zip(handshakes) {
            assert_eq!(result.leaf.as_deref(), Ok(wild_der.as_slice()), "{name}");
        }
    }
    eprintln!("1100 names first served in {:?}", started.elapsed());
    edge.wait_for_open_streams(1101, Duration::from_secs(5))
        .await;

    let (renewed, renewed_der) = certificate(&["*.many.test"], "wild-2");
    edge.source.insert(&["*.many.test"], renewed);
    let started = std::time::Instant::now();
    for name in [&names[0], &names[549], &names[1099]] {
        wait_for_leaf(
            edge.https(),
            Some(name),
            &renewed_der,
            Duration::from_secs(10),
        )
        .await;
    }
    eprintln!(
        "renewal pushed to 1100 names, seen on first/middle/last after {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_issued_after_a_failed_handshake_is_served() {
    let edge = Edge::start(Arc::new(MemoryCertificateSource::new())).await;
    assert!(
        handshake(edge.https(), Some("late.example.test"))
            .await
            .leaf
            .is_err()
    );

    let (late, late_der) = certificate(&["late.example.test"], "late-1");
    edge.source.insert(&["late.example.test"], late);
    let took = wait_for_leaf(
        edge.https(),
        Some("late.example.test"),
        &late_der,
        Duration::from_secs(5),
    )
    .await;
    eprintln!("newly issued certificate served after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_without_sni_gets_the_configured_default_certificate() {
    let source = Arc::new(MemoryCertificateSource::new());
    let (default, default_der) = certificate(&["edge.example.test"], "default-1");
    source.set_default(Some(default));
    let edge = Edge::start(source).await;

    let no_sni = handshake(edge.https(), None).await;
    assert_eq!(no_sni.leaf.as_deref(), Ok(default_der.as_slice()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_without_sni_gets_a_self_signed_default_when_none_is_configured() {
    let edge = Edge::start(Arc::new(MemoryCertificateSource::new())).await;

    let leaf = handshake(edge.https(), None)
        .await
        .leaf
        .expect("a certificate");
    let name = b"autohttps-default.invalid";
    assert!(
        leaf.windows(name.len()).any(|window| window == name),
        "leaf lacks the default SAN"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_certificate_is_pushed_without_restarting_envoy() {
    let source = Arc::new(MemoryCertificateSource::new());
    let (v1, v1_der) = certificate(&["a.example.test"], "a-1");
    source.insert(&["a.example.test"], v1);
    let edge = Edge::start(source).await;
    assert_eq!(
        handshake(edge.https(), Some("a.example.test"))
            .await
            .leaf
            .as_deref(),
        Ok(v1_der.as_slice())
    );

    let (v2, v2_der) = certificate(&["a.example.test"], "a-2");
    edge.source.insert(&["a.example.test"], v2);
    let took = wait_for_leaf(
        edge.https(),
        Some("a.example.test"),
        &v2_der,
        Duration::from_secs(5),
    )
    .await;
    eprintln!("renewed certificate served after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_keeps_serving_through_an_sds_restart_and_gets_later_updates() {
    let source = Arc::new(MemoryCertificateSource::new());
    let (v1, v1_der) = certificate(&["a.example.test"], "a-1");
    let (default, default_der) = certificate(&["edge.example.test"], "default-1");
    source.insert(&["a.example.test"], v1);
    source.set_default(Some(default));
    let mut edge = Edge::start(source).await;
    assert_eq!(
        handshake(edge.https(), Some("a.example.test"))
            .await
            .leaf
            .as_deref(),
        Ok(v1_der.as_slice())
    );

    // The sidecar goes away: fetched certificates keep being served.
    edge.sds
        .take()
        .expect("running")
        .shutdown()
        .await
        .expect("stopped");
    assert!(!edge.socket.exists(), "socket file left behind");
    for _ in 0..3 {
        assert_eq!(
            handshake(edge.https(), Some("a.example.test"))
                .await
                .leaf
                .as_deref(),
            Ok(v1_der.as_slice())
        );
        assert_eq!(
            handshake(edge.https(), None).await.leaf.as_deref(),
            Ok(default_der.as_slice())
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Renewed while down; a new sidecar on the same socket delivers it.
    let (v2, v2_der) = certificate(&["a.example.test"], "a-2");
    edge.source.insert(&["a.example.test"], v2);
    let restarted = SdsServer::start(SdsConfig::unix(&edge.socket), edge.source.clone())
        .await
        .expect("restarted");
    edge.sds = Some(restarted);
    let took = wait_for_leaf(
        edge.https(),
        Some("a.example.test"),
        &v2_der,
        Duration::from_secs(15),
    )
    .await;
    eprintln!("update after SDS restart served after {took:?}");
    assert_eq!(
        handshake(edge.https(), None).await.leaf.as_deref(),
        Ok(default_der.as_slice())
    );
    // Both names Envoy held (`default` and `a.example.test`) are watched again.
    edge.wait_for_open_streams(2, Duration::from_secs(15)).await;

    // And the restarted server pushes like the first one.
    let (v3, v3_der) = certificate(&["a.example.test"], "a-3");
    edge.source.insert(&["a.example.test"], v3);
    wait_for_leaf(
        edge.https(),
        Some("a.example.test"),
        &v3_der,
        Duration::from_secs(5),
    )
    .await;
}

async fn classic_listener_is_served_and_updated(api_type: &str) {
    let source = Arc::new(MemoryCertificateSource::new());
    let (v1, v1_der) = certificate(&["a.example.test"], "a-1");
    source.insert(&["a.example.test"], v1);
    let edge = Edge::start_with(
        &fixture("sds_classic.yaml"),
        &[("API_TYPE", api_type.to_owned())],
        source,
    )
    .await;

    // The classic listener presents its one configured secret whatever the SNI.
    let leaf = handshake(edge.https(), Some("a.example.test")).await.leaf;
    assert_eq!(
        leaf.as_deref(),
        Ok(v1_der.as_slice()),
        "{}",
        edge.envoy.log_tail()
    );
    assert_eq!(
        handshake(edge.https(), None).await.leaf.as_deref(),
        Ok(v1_der.as_slice())
    );

    let (v2, v2_der) = certificate(&["a.example.test"], "a-2");
    edge.source.insert(&["a.example.test"], v2);
    let took = wait_for_leaf(edge.https(), None, &v2_der, Duration::from_secs(5)).await;
    eprintln!("classic {api_type}: renewed certificate served after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classic_sds_secret_config_over_state_of_the_world() {
    classic_listener_is_served_and_updated("GRPC").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classic_sds_secret_config_over_delta() {
    classic_listener_is_served_and_updated("DELTA_GRPC").await;
}
