//! The store-backed SDS server end to end: certificates the sidecar issues against Pebble are
//! served by SDS to a real Envoy for their SNI names and verify against Pebble's root; a name
//! the store does not know fails its handshake fast; a name added later is served without
//! restarting Envoy while the others keep working.

mod envoy_support;
mod support;

use std::os::unix::fs::PermissionsExt as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use autohttps_sidecar::acme::certificate::chain_der;
use autohttps_sidecar::clock::SystemClock;
use autohttps_sidecar::hostname::Hostname;
use autohttps_sidecar::sds::SdsListen;
use envoy_support::{Envoy, Handshake, fixture, handshake, verified_handshake};
use reqwest::Method;
use serde_json::json;
use support::{Pebble, start_sidecar};

/// Handshakes (verifying against `root`) until one succeeds; returns it and how long that took.
async fn wait_for_verified(
    port: u16,
    sni: &str,
    root: &str,
    within: Duration,
) -> (Handshake, Duration) {
    let started = Instant::now();
    loop {
        let attempt = verified_handshake(port, sni, root).await;
        if attempt.leaf.is_ok() {
            return (attempt, started.elapsed());
        }
        assert!(
            started.elapsed() < within,
            "{sni} not served a verified certificate after {within:?}; last: {:?}",
            attempt.leaf
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issued_certificate_is_served_by_sni_and_unknown_names_fail_fast() -> anyhow::Result<()> {
    envoy_support::init_logging();
    let pebble = Pebble::start().await?;
    let sidecar = start_sidecar(&pebble, Arc::new(SystemClock)).await?;
    let SdsListen::Unix(socket) = sidecar.running.sds_listen.clone() else {
        anyhow::bail!("SDS does not listen on a Unix socket by default");
    };
    assert_eq!(
        std::fs::metadata(&socket)?.permissions().mode() & 0o777,
        0o600
    );
    let parent = socket.parent().expect("a directory");
    assert_eq!(
        std::fs::metadata(parent)?.permissions().mode() & 0o777,
        0o700
    );
    let dir = tempfile::tempdir()?;
    let envoy = Envoy::start(&fixture("sds_on_demand.yaml"), &socket, &[], dir.path()).await;
    let port = envoy.https_port;
    let root = pebble.root_pem().await?;

    let created = Instant::now();
    let (status, body) = sidecar
        .admin
        .call(
            Method::POST,
            "/v1/sites",
            Some(json!({ "name": "shop", "primary": "shop.example.test", "hostnames": ["www.shop.example.test"] })),
        )
        .await?;
    assert_eq!(status, 201, "{body}");
    let (first, _) =
        wait_for_verified(port, "shop.example.test", &root, Duration::from_secs(60)).await;
    eprintln!(
        "TIMING site creation → first verified handshake through Envoy: {} ms (debounce 100 ms)",
        created.elapsed().as_millis()
    );
    let stored = sidecar
        .running
        .store
        .certificate_for_hostname(&Hostname::parse("shop.example.test")?)?
        .expect("stored");
    assert_eq!(
        first.leaf.as_deref().ok(),
        chain_der(&stored.chain_pem)?.first().map(Vec::as_slice)
    );
    let www = verified_handshake(port, "www.shop.example.test", &root).await;
    assert_eq!(www.leaf, first.leaf, "one certificate covers both names");

    let unknown = handshake(port, Some("unknown.example.test")).await;
    assert!(
        unknown.leaf.is_err(),
        "an unknown name was served a certificate"
    );
    assert!(
        unknown.elapsed < Duration::from_secs(1),
        "took {:?}",
        unknown.elapsed
    );
    eprintln!("unknown name: handshake failed after {:?}", unknown.elapsed);

    let added = Instant::now();
    let (status, body) = sidecar
        .admin
        .call(
            Method::POST,
            "/v1/sites/shop/hostnames",
            Some(json!({ "hostname": "new.shop.example.test" })),
        )
        .await?;
    assert_eq!(status, 201, "{body}");
    let started = Instant::now();
    loop {
        // The old names keep verifying while the new certificate is ordered and pushed.
        for name in ["shop.example.test", "www.shop.example.test"] {
            let old = verified_handshake(port, name, &root).await;
            assert!(
                old.leaf.is_ok(),
                "{name} broke while a name was added: {:?}",
                old.leaf
            );
        }
        if verified_handshake(port, "new.shop.example.test", &root)
            .await
            .leaf
            .is_ok()
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the added name was never served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "TIMING name added → served through Envoy (no restart): {} ms",
        added.elapsed().as_millis()
    );
    let renewed = verified_handshake(port, "shop.example.test", &root).await;
    assert!(renewed.leaf.is_ok());
    Ok(())
}
