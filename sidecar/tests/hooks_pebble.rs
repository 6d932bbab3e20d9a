//! Event hooks against real issuance (Pebble) and a real webhook receiver on loopback: while
//! the receiver is down, issuance goes on and deliveries are retried; when it comes up every
//! event arrives (issued, renewed, expiring, failed, dns-excluded), signed with the shared
//! secret. A command hook gets the same events as JSON on stdin.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use autohttps_sidecar::clock::SystemClock;
use autohttps_sidecar::hooks::exec::ExecConfig;
use autohttps_sidecar::hooks::webhook::{
    DELIVERY_HEADER, EVENT_HEADER, SIGNATURE_HEADER, WebhookConfig, verify,
};
use autohttps_sidecar::hooks::{EventKind, HookEvent};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use reqwest::Method;
use serde_json::json;
use support::{Pebble, certificate_names, eventually, start_sidecar_with};

const SECRET: &str = "webhook-secret-for-tests-0123";

/// One POST as the receiver got it.
#[derive(Debug, Clone)]
struct Received {
    headers: HeaderMap,
    body: Bytes,
}

type Inbox = Arc<Mutex<Vec<Received>>>;

async fn receive(State(inbox): State<Inbox>, headers: HeaderMap, body: Bytes) -> &'static str {
    inbox
        .lock()
        .expect("inbox")
        .push(Received { headers, body });
    "ok"
}

/// A loopback address whose port nothing listens on yet: on 127.0.0.3, which the other tests
/// (all on 127.0.0.1) do not bind, so the port stays free until the receiver takes it.
fn receiver_address() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.3:0")?.local_addr()?)
}

fn kinds(inbox: &Inbox) -> Vec<EventKind> {
    inbox
        .lock()
        .expect("inbox")
        .iter()
        .filter_map(|r| serde_json::from_slice::<HookEvent>(&r.body).ok())
        .map(|e| e.kind)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_a_receiver_that_was_down_signed_and_issuance_never_waits()
-> anyhow::Result<()> {
    let pebble = Pebble::start().await?;
    pebble.set_a("away.example.test", "127.0.0.2").await?;
    pebble.set_a("gone.example.test", "127.0.0.2").await?;
    let receiver = receiver_address()?;
    let dir = tempfile::tempdir()?;
    let exec_log = dir.path().join("events.jsonl");
    let exec_command = vec![
        "/bin/sh".to_owned(),
        "-c".to_owned(),
        format!(
            "cat >> {}; echo >> {}",
            exec_log.display(),
            exec_log.display()
        ),
    ];
    let sidecar = start_sidecar_with(&pebble, Arc::new(SystemClock), |config| {
        config.hooks.webhook.push(WebhookConfig {
            url: format!("http://{receiver}/hook"),
            secret: SECRET.into(),
            events: Vec::new(),
            timeout_ms: 2000,
            max_attempts: 100,
            backoff_ms: 100,
            max_backoff_ms: 500,
        });
        config.hooks.exec.push(ExecConfig {
            command: exec_command,
            events: vec![EventKind::CertificateIssued, EventKind::CertificateFailed],
            timeout_ms: 5000,
        });
        // Pebble's certificates last years: a long horizon makes every one "expiring".
        config.hooks.expiring_within_days = 36_500;
    })
    .await?;
    let admin = &sidecar.admin;

    // The receiver is down: issuance goes on regardless.
    let (code, body) = admin
        .call(
            Method::POST,
            "/v1/sites",
            Some(json!({ "name": "shop", "primary": "shop.example.test", "hostnames": ["away.example.test"] })),
        )
        .await?;
    assert_eq!(code, 201, "{body}");
    let first = admin
        .wait_for("shop", Duration::from_secs(60), |s| {
            !certificate_names(s).is_empty()
        })
        .await?;
    let first_serial = first["certificates"][0]["serial"].clone();
    let (code, body) = admin
        .call(Method::POST, "/v1/sites/shop/regenerate", None)
        .await?;
    assert_eq!(code, 202, "{body}");
    admin
        .wait_for("shop", Duration::from_secs(60), |s| {
            s["certificates"][0]["serial"] != first_serial && !certificate_names(s).is_empty()
        })
        .await?;
    let (code, body) = admin
        .call(
            Method::POST,
            "/v1/sites",
            Some(json!({ "name": "gone", "primary": "gone.example.test" })),
        )
        .await?;
    assert_eq!(code, 201, "{body}");
    eventually(
        "the gone site's failed attempt",
        Duration::from_secs(60),
        async || {
            admin
                .events("gone")
                .await
                .is_ok_and(|events| events.iter().any(|e| e["kind"] == "attempt-failed"))
        },
    )
    .await?;

    // The receiver comes up: the retries deliver everything.
    let inbox = Inbox::default();
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(Arc::clone(&inbox));
    let listener = tokio::net::TcpListener::bind(receiver).await?;
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let wanted = [
        EventKind::CertificateIssued,
        EventKind::CertificateRenewed,
        EventKind::CertificateExpiring,
        EventKind::CertificateFailed,
        EventKind::DnsExcluded,
    ];
    eventually(
        "every kind of event at the receiver",
        Duration::from_secs(30),
        async || {
            let got = kinds(&inbox);
            wanted.iter().all(|kind| got.contains(kind))
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}: got {:?}", kinds(&inbox)))?;
    server.abort();

    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let received = inbox.lock().expect("inbox").clone();
    for delivery in &received {
        let header = |name: &str| {
            delivery
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        let signature = header(SIGNATURE_HEADER);
        verify(
            SECRET,
            &signature,
            &delivery.body,
            now,
            Duration::from_secs(300),
        )
        .map_err(|e| anyhow::anyhow!("{e}: {signature}"))?;
        // The same check written out, so the scheme is pinned independently of `verify`.
        let (t, v1) = signature
            .strip_prefix("t=")
            .and_then(|rest| rest.split_once(",v1="))
            .expect("t=…,v1=…");
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
        let expected = ring::hmac::sign(&key, &[t.as_bytes(), b".", &delivery.body].concat());
        let expected: String = expected
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(v1, expected);
        assert!(
            verify(
                "a-different-secret-0123",
                &signature,
                &delivery.body,
                now,
                Duration::from_secs(300)
            )
            .is_err()
        );
        let event: HookEvent = serde_json::from_slice(&delivery.body)?;
        assert_eq!(header(EVENT_HEADER), event.kind.as_str());
        assert_eq!(header(DELIVERY_HEADER), event.id);
    }
    let events: Vec<HookEvent> = received
        .iter()
        .map(|r| serde_json::from_slice(&r.body))
        .collect::<Result<_, _>>()?;
    let find = |kind: EventKind, site: &str| {
        events
            .iter()
            .find(|e| e.kind == kind && e.site == site)
            .unwrap_or_else(|| panic!("no {kind:?} for {site}: {events:#?}"))
    };
    let issued = find(EventKind::CertificateIssued, "shop");
    assert_eq!(issued.names, ["shop.example.test"]);
    assert_eq!(
        issued.serial.as_ref(),
        first_serial.as_str().map(str::to_owned).as_ref()
    );
    assert!(issued.not_after.is_some());
    let renewed = find(EventKind::CertificateRenewed, "shop");
    assert_ne!(renewed.serial, issued.serial);
    let excluded = find(EventKind::DnsExcluded, "shop");
    assert_eq!(excluded.hostname.as_deref(), Some("away.example.test"));
    let fix = excluded.fix.as_deref().unwrap_or_default();
    assert!(
        fix.contains("away.example.test") && fix.contains("127.0.0.1"),
        "{fix}"
    );
    let failed = find(EventKind::CertificateFailed, "gone");
    assert!(
        failed
            .reason
            .as_deref()
            .unwrap_or_default()
            .contains("127.0.0.2"),
        "{failed:?}"
    );
    let fix = failed.fix.as_deref().unwrap_or_default();
    assert!(fix.contains("autohttps cert regenerate gone"), "{fix}");
    let expiring = find(EventKind::CertificateExpiring, "shop");
    assert!(
        expiring.serial.is_some() && expiring.fix.is_some(),
        "{expiring:?}"
    );
    // Each event once: a retried delivery that failed is not a second delivery.
    let mut ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), events.len());

    // The command hook ran for the kinds it asked for, and only those.
    let mut seen = Vec::new();
    eventually(
        "the command hook's events",
        Duration::from_secs(10),
        async || {
            seen = std::fs::read_to_string(&exec_log)
                .unwrap_or_default()
                .lines()
                .filter(|l| !l.trim().is_empty())
                .filter_map(|l| serde_json::from_str::<HookEvent>(l).ok())
                .map(|e| (e.kind, e.site))
                .collect();
            seen.contains(&(EventKind::CertificateIssued, "shop".to_owned()))
                && seen.contains(&(EventKind::CertificateFailed, "gone".to_owned()))
        },
    )
    .await?;
    assert!(
        seen.iter().all(|(kind, _)| matches!(
            kind,
            EventKind::CertificateIssued | EventKind::CertificateFailed
        )),
        "{seen:?}"
    );
    println!(
        "receiver got {} deliveries ({:?}); the command {} events",
        events.len(),
        kinds(&inbox),
        seen.len()
    );
    Ok(())
}
