//! A locked store: while another process holds SQLite's write lock, admin changes fail with a
//! 503 whose message says what to do (and a log line says the same), and serving goes on:
//! Envoy keeps getting certificates over SDS, for names it had and names it had not asked
//! for yet, and the policy feed answers. Once the lock is gone, changes work again.
//!
//! (A read-only store is not tested: these tests run as root, which writes through any
//! permission bits, and a read-only mount needs privileges. Read-only errors take the same
//! path: `Error::is_store_unavailable`, 503, a message naming the fix.)

mod envoy_support;
mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use autohttps_sidecar::clock::SystemClock;
use autohttps_sidecar::sds::SdsListen;
use envoy_support::{Envoy, fixture, verified_handshake};
use reqwest::Method;
use serde_json::json;
use support::{Pebble, certificate_names, start_sidecar};

/// Everything the sidecar logs in this test binary.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn served(port: u16, sni: &str, root: &str, within: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let attempt = verified_handshake(port, sni, root).await;
        if attempt.leaf.is_ok() {
            return Ok(());
        }
        anyhow::ensure!(
            started.elapsed() < within,
            "{sni} not served: {:?}",
            attempt.leaf
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locked_store_answers_503_with_the_fix_while_serving_continues() -> anyhow::Result<()> {
    let log = Captured::default();
    let writer = log.clone();
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .try_init();
    let pebble = Pebble::start().await?;
    let sidecar = start_sidecar(&pebble, Arc::new(SystemClock)).await?;
    let SdsListen::Unix(socket) = sidecar.running.sds_listen.clone() else {
        anyhow::bail!("SDS is not on a Unix socket");
    };
    let dir = tempfile::tempdir()?;
    let envoy = Envoy::start(&fixture("sds_on_demand.yaml"), &socket, &[], dir.path()).await;
    let root = pebble.root_pem().await?;
    let (code, body) = sidecar
        .admin
        .call(
            Method::POST,
            "/v1/sites",
            Some(json!({ "name": "kept", "primary": "kept.example.test", "hostnames": ["www.kept.example.test"] })),
        )
        .await?;
    assert_eq!(code, 201, "{body}");
    sidecar
        .admin
        .wait_for("kept", Duration::from_secs(60), |s| {
            !certificate_names(s).is_empty()
        })
        .await?;
    served(
        envoy.https_port,
        "kept.example.test",
        &root,
        Duration::from_secs(30),
    )
    .await?;
    let feed_url = format!("http://{}/v1/policy", sidecar.running.internal_addr);
    let http = reqwest::Client::builder().no_proxy().build()?;
    assert_eq!(http.get(&feed_url).send().await?.status(), 200);

    // Another process (a sqlite3 shell, a backup) takes the write lock.
    let database = sidecar.data.path().join("data").join("autohttps.db");
    let holder = rusqlite::Connection::open(&database)?;
    holder.execute_batch("BEGIN EXCLUSIVE; INSERT INTO events (site, at, kind, message) VALUES ('kept', 0, 'lock-test', 'held');")?;

    let admin = sidecar.admin.clone();
    let blocked = tokio::spawn(async move {
        admin
            .call(
                Method::POST,
                "/v1/sites",
                Some(json!({ "name": "late", "primary": "late.example.test" })),
            )
            .await
    });
    // While that change waits for the lock, serving goes on: a name Envoy already had, one
    // it asks for the first time now, and the policy feed.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    served(
        envoy.https_port,
        "kept.example.test",
        &root,
        Duration::from_secs(2),
    )
    .await?;
    served(
        envoy.https_port,
        "www.kept.example.test",
        &root,
        Duration::from_secs(2),
    )
    .await?;
    let feed = http.get(&feed_url).send().await?;
    assert_eq!(feed.status(), 200);
    let serving_took = started.elapsed();
    assert!(
        serving_took < Duration::from_secs(3),
        "serving stalled behind the locked store: {serving_took:?}"
    );

    let (code, body) = blocked.await??;
    assert_eq!(code, 503, "{body}");
    let message = body["error"].as_str().unwrap_or_default();
    assert!(
        message.contains("database is locked") && message.contains("another process holds a lock"),
        "{message}"
    );
    let logged = String::from_utf8_lossy(&log.0.lock().expect("log")).into_owned();
    assert!(
        logged
            .lines()
            .any(|l| l.contains("ERROR") && l.contains("another process holds a lock")),
        "no error log line names the fix:\n{logged}"
    );

    // The lock is released: the same change works.
    holder.execute_batch("ROLLBACK;")?;
    drop(holder);
    let (code, body) = sidecar
        .admin
        .call(
            Method::POST,
            "/v1/sites",
            Some(json!({ "name": "late", "primary": "late.example.test" })),
        )
        .await?;
    assert_eq!(code, 201, "{body}");
    sidecar
        .admin
        .wait_for("late", Duration::from_secs(60), |s| {
            !certificate_names(s).is_empty()
        })
        .await?;
    served(
        envoy.https_port,
        "late.example.test",
        &root,
        Duration::from_secs(30),
    )
    .await?;
    served(
        envoy.https_port,
        "kept.example.test",
        &root,
        Duration::from_secs(5),
    )
    .await?;
    println!("while locked: 503 \"{message}\"; serving answered in {serving_took:?}");
    Ok(())
}
