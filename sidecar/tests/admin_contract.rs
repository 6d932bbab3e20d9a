//! The admin API's JSON on the wire, pinned: every route is called on a real sidecar (real
//! SQLite, real DNS answers from pebble-challtestsrv, a stopped clock) and each answer is
//! compared with its golden file in `tests/golden/admin_api/`. A renamed, added or retyped
//! field fails here; the server, the CLI and the console all read these shapes.
//!
//! To accept a deliberate change of the wire format, rerun with `AUTOHTTPS_BLESS_GOLDEN=1` and
//! review the diff of the golden files.

mod support;

use std::path::PathBuf;
use std::sync::Arc;

use autohttps_sidecar::clock::ManualClock;
use autohttps_sidecar::hostname::Hostname;
use autohttps_sidecar::store::{NewCertificate, PrivateKeyPem, SiteEventKind};
use reqwest::Method;
use serde_json::{Value, json};
use support::{Admin, Pebble, start_sidecar_with};
use time::macros::datetime;

/// Where the golden answers live.
fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/admin_api")
}

/// One exchange with the admin API, as recorded in a golden file.
struct Exchange {
    /// The golden file's name (without `.json`).
    name: &'static str,
    method: Method,
    path: String,
    body: Option<Value>,
    /// `None`: the test token; `Some(None)`: no token.
    token: Option<Option<&'static str>>,
}

impl Exchange {
    fn new(name: &'static str, method: Method, path: &str) -> Self {
        Self {
            name,
            method,
            path: path.to_owned(),
            body: None,
            token: None,
        }
    }

    fn body(mut self, body: Value) -> Self {
        self.body = Some(body);
        self
    }

    fn without_token(mut self) -> Self {
        self.token = Some(None);
        self
    }
}

/// Calls the route and returns `{request, status, body}` as stored in the golden file.
async fn record(admin: &Admin, exchange: Exchange) -> anyhow::Result<(&'static str, Value)> {
    let (status, body) = match exchange.token {
        None => {
            admin
                .call(
                    exchange.method.clone(),
                    &exchange.path,
                    exchange.body.clone(),
                )
                .await?
        }
        Some(token) => {
            admin
                .call_with_token(
                    exchange.method.clone(),
                    &exchange.path,
                    exchange.body.clone(),
                    token,
                )
                .await?
        }
    };
    let mut recorded = json!({
        "request": format!("{} {}", exchange.method, exchange.path),
        "status": status,
        "body": body,
    });
    if let Some(request_body) = exchange.body {
        recorded["request_body"] = request_body;
    }
    Ok((exchange.name, recorded))
}

/// Compares every recorded exchange with its golden file (or writes them when blessing).
fn check_against_golden(recorded: &[(&'static str, Value)]) -> anyhow::Result<()> {
    let dir = golden_dir();
    let bless = std::env::var_os("AUTOHTTPS_BLESS_GOLDEN").is_some();
    let mut mismatches = Vec::new();
    for (name, value) in recorded {
        let path = dir.join(format!("{name}.json"));
        let text = serde_json::to_string_pretty(value)? + "\n";
        if bless {
            std::fs::create_dir_all(&dir)?;
            std::fs::write(&path, &text)?;
            continue;
        }
        let golden = std::fs::read_to_string(&path).map_err(|e| {
            anyhow::anyhow!(
                "golden file {} is missing ({e}): run with AUTOHTTPS_BLESS_GOLDEN=1 to write it, then review it",
                path.display()
            )
        })?;
        let golden: Value = serde_json::from_str(&golden)?;
        if &golden != value {
            mismatches.push(format!(
                "{name}: the wire changed\n  golden: {golden}\n  now:    {value}"
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} answer(s) differ from tests/golden/admin_api (if deliberate, rerun with AUTOHTTPS_BLESS_GOLDEN=1 and review):\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers_the_pinned_json() -> anyhow::Result<()> {
    let pebble = Pebble::start().await?;
    let start = datetime!(2026-03-01 12:00:00 UTC);
    let clock = Arc::new(ManualClock::new(start));
    // Orders wait an hour of a clock that never moves: the CA is never asked, so every answer
    // depends only on what this test does.
    let sidecar = start_sidecar_with(&pebble, clock, |config| {
        config.acme.debounce_ms = 3_600_000;
    })
    .await?;
    let admin = &sidecar.admin;
    let store = &sidecar.running.store;
    let mut recorded = Vec::new();

    recorded.push(record(admin, Exchange::new("healthz", Method::GET, "/healthz")).await?);
    recorded.push(
        record(
            admin,
            Exchange::new("create_site", Method::POST, "/v1/sites").body(json!({
                "name": "shop",
                "primary": "shop.test",
                "hostnames": ["www.shop.test"],
                "https": "force",
                "hsts": { "enabled": true, "max_age": 31536000, "include_subdomains": true },
                "mixed_content": "report",
                "canonical_host": "www.shop.test"
            })),
        )
        .await?,
    );
    recorded.push(
        record(
            admin,
            Exchange::new("add_hostname", Method::POST, "/v1/sites/shop/hostnames")
                .body(json!({ "hostname": "alias.test" })),
        )
        .await?,
    );
    recorded.push(
        record(
            admin,
            Exchange::new(
                "remove_hostname",
                Method::DELETE,
                "/v1/sites/shop/hostnames/alias.test",
            ),
        )
        .await?,
    );
    recorded.push(
        record(
            admin,
            Exchange::new("update_site", Method::PATCH, "/v1/sites/shop")
                .body(json!({ "redirect": "temporary", "canonical_host": null })),
        )
        .await?,
    );
    recorded.push(record(admin, Exchange::new("list_sites", Method::GET, "/v1/sites")).await?);
    recorded.push(
        record(
            admin,
            Exchange::new("show_site", Method::GET, "/v1/sites/shop"),
        )
        .await?,
    );

    // What issuance would have written, written straight to the store: a certificate for one of
    // the two names, an order in flight, a failed attempt and browsers' mixed-content reports.
    let shop = Hostname::parse("shop.test")?;
    let www = Hostname::parse("www.shop.test")?;
    store.store_certificate(
        NewCertificate {
            site: "shop".into(),
            names: vec![shop.clone()],
            chain_pem: "-----BEGIN CERTIFICATE-----\n(not read by these routes)\n-----END CERTIFICATE-----\n".into(),
            key_pem: PrivateKeyPem::new("(never on the wire)".into()),
            not_before: datetime!(2026-03-01 11:00:00 UTC),
            not_after: datetime!(2026-05-30 11:00:00 UTC),
            serial: "0a1b2c3d4e5f".into(),
            ari_id: Some("aGVsbG8.AKGyw9Ff".into()),
        },
        None,
        start,
    )?;
    store.insert_order(
        "shop",
        &[shop.clone(), www.clone()],
        "https://127.0.0.1:14000/my-order/42",
        &PrivateKeyPem::new("(never on the wire)".into()),
        start,
    )?;
    store.add_event(
        "shop",
        start,
        SiteEventKind::AttemptFailed,
        "www.shop.test: the CA could not connect to it",
        Some("urn:ietf:params:acme:error:connection"),
        Some("acme:connection"),
    )?;
    store.schedule(
        "shop",
        Some(datetime!(2026-03-01 12:10:00 UTC)),
        2,
        Some("www.shop.test: the CA could not connect to it"),
    )?;
    store.record_mixed_content(
        "shop",
        "https://www.shop.test/cart",
        "http://cdn.example.test/logo.png",
        "img-src",
        start,
        1 << 20,
    )?;
    store.record_mixed_content(
        "shop",
        "https://www.shop.test/cart",
        "http://cdn.example.test/logo.png",
        "img-src",
        datetime!(2026-03-01 12:05:00 UTC),
        1 << 20,
    )?;

    recorded.push(
        record(
            admin,
            Exchange::new(
                "certificate_status",
                Method::GET,
                "/v1/sites/shop/certificates",
            ),
        )
        .await?,
    );
    recorded.push(
        record(
            admin,
            Exchange::new("site_events", Method::GET, "/v1/sites/shop/events?limit=10"),
        )
        .await?,
    );
    recorded.push(
        record(
            admin,
            Exchange::new(
                "site_mixed_content",
                Method::GET,
                "/v1/sites/shop/mixed-content",
            ),
        )
        .await?,
    );
    recorded.push(
        record(
            admin,
            Exchange::new(
                "diagnose_in_progress",
                Method::GET,
                "/v1/diagnose/www.shop.test",
            ),
        )
        .await?,
    );
    // The order gave up and a later attempt succeeded for the names it could: no failure left.
    for order in store.orders_in_flight(Some("shop"))? {
        store.delete_order(order.id)?;
    }
    store.schedule("shop", Some(datetime!(2026-04-30 11:00:00 UTC)), 0, None)?;
    recorded.push(
        record(
            admin,
            Exchange::new("diagnose_covered", Method::GET, "/v1/diagnose/shop.test"),
        )
        .await?,
    );
    recorded.push(
        record(
            admin,
            Exchange::new(
                "diagnose_not_in_certificate",
                Method::GET,
                "/v1/diagnose/www.shop.test",
            ),
        )
        .await?,
    );

    // Failures: every one is {"error": "..."} with its status.
    recorded.push(
        record(
            admin,
            Exchange::new("error_unauthorized", Method::GET, "/v1/sites").without_token(),
        )
        .await?,
    );
    recorded.push(
        record(
            admin,
            Exchange::new("error_no_such_route", Method::GET, "/v2/nothing"),
        )
        .await?,
    );
    recorded.push(
        record(
            admin,
            Exchange::new("error_method_not_allowed", Method::PUT, "/v1/sites/shop"),
        )
        .await?,
    );
    recorded.push(
        record(
            admin,
            Exchange::new("error_no_such_site", Method::GET, "/v1/sites/nosuch"),
        )
        .await?,
    );
    recorded.push(
        record(
            admin,
            Exchange::new("error_bad_hostname", Method::POST, "/v1/sites")
                .body(json!({ "name": "blog", "primary": "exa mple.test" })),
        )
        .await?,
    );
    recorded.push(
        record(
            admin,
            Exchange::new("error_unknown_field", Method::PATCH, "/v1/sites/shop")
                .body(json!({ "htps": "force" })),
        )
        .await?,
    );
    recorded.push(
        record(
            admin,
            Exchange::new(
                "error_bad_query",
                Method::GET,
                "/v1/sites/shop/events?limit=many",
            ),
        )
        .await?,
    );
    recorded.push(
        record(
            admin,
            Exchange::new("error_conflict", Method::POST, "/v1/sites")
                .body(json!({ "name": "shop", "primary": "other.test" })),
        )
        .await?,
    );

    // Regenerate makes the site due now, so the issuer starts at once: it comes last, and only
    // its own answer is recorded (what the attempt writes afterwards depends on timing).
    recorded.push(
        record(
            admin,
            Exchange::new("regenerate", Method::POST, "/v1/sites/shop/regenerate"),
        )
        .await?,
    );
    recorded.push(
        record(
            admin,
            Exchange::new("remove_site", Method::DELETE, "/v1/sites/shop"),
        )
        .await?,
    );

    check_against_golden(&recorded)?;
    sidecar.running.shutdown().await;
    Ok(())
}

/// A server of another version cannot be had here, so a small axum server on loopback plays
/// one: its diagnosis has a renamed field. The CLI must refuse the answer and say why, not
/// print empty fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_refuses_an_answer_of_another_shape_naming_its_version() -> anyhow::Result<()> {
    let golden: Value = serde_json::from_str(&std::fs::read_to_string(
        golden_dir().join("diagnose_covered.json"),
    )?)?;
    let mut renamed = golden["body"].clone();
    let verdict = renamed["verdict"].take();
    renamed
        .as_object_mut()
        .expect("a diagnosis is an object")
        .remove("verdict");
    renamed["outcome"] = verdict;
    let other_version = axum::Router::new().route(
        "/v1/diagnose/{hostname}",
        axum::routing::get(move || {
            let renamed = renamed.clone();
            async move { axum::Json(renamed) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let server = tokio::spawn(async move { axum::serve(listener, other_version).await });
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_autohttps"))
            .args([
                "--admin-url",
                &base,
                "--token",
                "t",
                "diagnose",
                "shop.test",
            ])
            .env_remove("AUTOHTTPS_CONFIG")
            .current_dir(std::env::temp_dir())
            .output()
    })
    .await??;
    server.abort();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(6), "{stderr}");
    assert!(
        stderr.contains("missing field `verdict`")
            && stderr.contains(env!("CARGO_PKG_VERSION"))
            && stderr.contains("another version"),
        "{stderr}"
    );
    assert!(
        output.stdout.is_empty(),
        "printed an answer it could not read"
    );
    Ok(())
}
