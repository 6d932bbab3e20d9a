//! Issuance against a real Pebble: one certificate for a site's names, verified against Pebble's
//! root; re-issue on a new alias while the old certificate keeps serving; DNS pre-check; the
//! CLI's `--wait`.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use autohttps_sidecar::acme::certificate::chain_der;
use autohttps_sidecar::clock::SystemClock;
use autohttps_sidecar::hostname::Hostname;
use autohttps_sidecar::store::Store;
use reqwest::Method;
use serde_json::json;
use support::{Pebble, TOKEN, certificate_names, start_sidecar, start_sidecar_with};
use x509_parser::prelude::*;

/// Checks every link of `chain` (leaf first) and that the last one is signed by `root`.
fn verify_chain(chain_pem: &str, root_pem: &str) -> anyhow::Result<()> {
    let chain = chain_der(chain_pem)?;
    let root = chain_der(root_pem)?;
    let parsed: Vec<X509Certificate<'_>> = chain
        .iter()
        .map(|der| parse_x509_certificate(der).map(|(_, c)| c))
        .collect::<Result<_, _>>()?;
    let (_, root) = parse_x509_certificate(&root[0])?;
    for pair in parsed.windows(2) {
        pair[0]
            .verify_signature(Some(pair[1].public_key()))
            .map_err(|e| {
                anyhow::anyhow!(
                    "{} not signed by {}: {e}",
                    pair[0].subject(),
                    pair[1].subject()
                )
            })?;
    }
    let top = parsed.last().expect("non-empty chain");
    top.verify_signature(Some(root.public_key())).map_err(|e| {
        anyhow::anyhow!(
            "chain top {} not signed by Pebble's root: {e}",
            top.subject()
        )
    })?;
    anyhow::ensure!(
        top.issuer() == root.subject(),
        "issuer/subject mismatch at the root"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn site_with_three_names_gets_one_certificate_verified_against_pebble_root()
-> anyhow::Result<()> {
    let pebble = Pebble::start().await?;
    let sidecar = start_sidecar(&pebble, Arc::new(SystemClock)).await?;
    let created_at = Instant::now();
    let (status, body) = sidecar
        .admin
        .call(
            Method::POST,
            "/v1/sites",
            Some(json!({ "name": "shop", "primary": "shop.example.test", "hostnames": ["www.shop.example.test", "shop-alias.test"] })),
        )
        .await?;
    assert_eq!(status, 201, "{body}");
    let done = sidecar
        .admin
        .wait_for("shop", Duration::from_secs(60), |s| {
            !s["certificates"].as_array().is_none_or(Vec::is_empty)
        })
        .await?;
    let elapsed = created_at.elapsed();
    eprintln!(
        "TIMING site creation → certificate stored: {} ms (debounce 100 ms)",
        elapsed.as_millis()
    );

    assert_eq!(
        certificate_names(&done),
        vec![vec![
            "shop-alias.test",
            "shop.example.test",
            "www.shop.example.test"
        ]]
    );
    let store = &sidecar.running.store;
    let certificate = store
        .certificate_for_hostname(&Hostname::parse("www.shop.example.test")?)?
        .expect("a certificate for www");
    verify_chain(&certificate.chain_pem, &pebble.root_pem().await?)?;
    assert!(certificate.key_pem.expose().contains("PRIVATE KEY"));
    // The key never leaves through the API.
    assert!(!done.to_string().contains("PRIVATE KEY"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adding_alias_reissues_and_old_certificate_serves_until_then() -> anyhow::Result<()> {
    let pebble = Pebble::start().await?;
    let sidecar = start_sidecar(&pebble, Arc::new(SystemClock)).await?;
    let admin = &sidecar.admin;
    admin
        .call(
            Method::POST,
            "/v1/sites",
            Some(json!({ "name": "blog", "primary": "blog.example.test" })),
        )
        .await?;
    let first = admin
        .wait_for("blog", Duration::from_secs(60), |s| {
            !certificate_names(s).is_empty()
        })
        .await?;
    let first_serial = first["certificates"][0]["serial"]
        .as_str()
        .expect("serial")
        .to_owned();
    let store = Arc::clone(&sidecar.running.store);
    let mut changes = store.certificates_changed();
    changes.borrow_and_update();
    let primary = Hostname::parse("blog.example.test")?;

    let (status, body) = admin
        .call(
            Method::POST,
            "/v1/sites/blog/hostnames",
            Some(json!({ "hostname": "Blog-Alias.TEST." })),
        )
        .await?;
    assert_eq!(status, 201, "{body}");
    // Until the new certificate is stored, the old one keeps serving the primary name.
    let serving = store
        .certificate_for_hostname(&primary)?
        .expect("still served");
    assert_eq!(serving.serial, first_serial);

    let second = admin
        .wait_for("blog", Duration::from_secs(60), |s| {
            certificate_names(s)
                .iter()
                .any(|names| names.iter().any(|n| n == "blog-alias.test"))
        })
        .await?;
    assert_eq!(
        certificate_names(&second),
        vec![vec!["blog-alias.test", "blog.example.test"]]
    );
    let serving = store.certificate_for_hostname(&primary)?.expect("served");
    assert_ne!(serving.serial, first_serial);
    // The store notifies after it commits (SDS must read the new certificate when told), so
    // the API can show the certificate a moment before the notification goes out: wait for it
    // rather than expect it already sent (a busy machine showed the gap).
    tokio::time::timeout(Duration::from_secs(5), changes.changed())
        .await
        .map_err(|_| {
            anyhow::anyhow!("no SDS-facing change notification for the new certificate")
        })??;
    let alias = store
        .certificate_for_hostname(&Hostname::parse("blog-alias.test")?)?
        .expect("alias served");
    assert_eq!(alias.serial, serving.serial);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn name_resolving_elsewhere_is_left_out_and_diagnosed() -> anyhow::Result<()> {
    let pebble = Pebble::start().await?;
    pebble.set_a("elsewhere.example.test", "127.0.0.2").await?;
    let sidecar = start_sidecar(&pebble, Arc::new(SystemClock)).await?;
    let admin = &sidecar.admin;
    admin
        .call(
            Method::POST,
            "/v1/sites",
            Some(json!({ "name": "mixed", "primary": "mixed.example.test", "hostnames": ["elsewhere.example.test"] })),
        )
        .await?;
    let status = admin
        .wait_for("mixed", Duration::from_secs(60), |s| {
            !certificate_names(s).is_empty() && !s["working"].as_bool().unwrap_or(true)
        })
        .await?;
    assert_eq!(certificate_names(&status), vec![vec!["mixed.example.test"]]);
    assert_eq!(status["uncovered"], json!(["elsewhere.example.test"]));

    let (code, bad) = admin
        .call(Method::GET, "/v1/diagnose/elsewhere.example.test", None)
        .await?;
    assert_eq!(code, 200, "{bad}");
    assert_eq!(bad["verdict"], "dns-not-pointing");
    assert_eq!(bad["dns"]["addresses"], json!(["127.0.0.2"]));
    assert!(
        bad["fix"].as_str().unwrap_or("").contains("127.0.0.1"),
        "{bad}"
    );
    assert!(bad["certificate"].is_null());

    let (_, good) = admin
        .call(Method::GET, "/v1/diagnose/mixed.example.test", None)
        .await?;
    assert_eq!(good["verdict"], "ok", "{good}");
    assert_eq!(
        good["certificate"]["serial"],
        status["certificates"][0]["serial"]
    );

    let events = admin.events("mixed").await?;
    assert!(
        events.iter().any(|e| e["kind"] == "dns-not-pointing"
            && e["message"].as_str().unwrap_or("").contains("127.0.0.2")),
        "{events:#?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_over_the_per_certificate_limit_are_split() -> anyhow::Result<()> {
    let pebble = Pebble::start().await?;
    let sidecar = start_sidecar_with(&pebble, Arc::new(SystemClock), |config| {
        config.acme.max_names_per_certificate = Some(2);
    })
    .await?;
    sidecar
        .admin
        .call(
            Method::POST,
            "/v1/sites",
            Some(json!({ "name": "big", "primary": "big.example.test", "hostnames": ["a.big.example.test", "b.big.example.test"] })),
        )
        .await?;
    let status = sidecar
        .admin
        .wait_for("big", Duration::from_secs(60), |s| {
            certificate_names(s).len() == 2 && !s["working"].as_bool().unwrap_or(true)
        })
        .await?;
    let mut names = certificate_names(&status);
    names.sort();
    assert_eq!(
        names,
        vec![
            vec!["a.big.example.test", "b.big.example.test"],
            vec!["big.example.test"]
        ]
    );
    assert_eq!(status["uncovered"], json!([]));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_site_add_waits_for_the_certificate_showing_progress() -> anyhow::Result<()> {
    let pebble = Pebble::start().await?;
    let sidecar = start_sidecar(&pebble, Arc::new(SystemClock)).await?;
    let base = sidecar.admin.base.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_autohttps"))
            .args(["--admin-url", &base, "--token", TOKEN])
            .args([
                "site",
                "add",
                "cli",
                "cli.example.test",
                "--host",
                "www.cli.example.test",
                "--wait",
                "--timeout",
                "60",
            ])
            .output()
    })
    .await??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("order-created") && stderr.contains("certificate-issued"),
        "progress: {stderr}"
    );
    assert!(
        stdout.contains("valid until") && stdout.contains("www.cli.example.test"),
        "{stdout}"
    );
    Ok(())
}

/// An admin API proxy that, once a site has been created through it, holds every later
/// request until the store holds a certificate for that site: the CLI then looks at the site
/// only after the issuer has started and finished the attempt, as on a busy machine.
struct LateLookingProxy {
    base: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for LateLookingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl LateLookingProxy {
    async fn start(admin_base: &str, store: Arc<dyn Store>, site: &str) -> anyhow::Result<Self> {
        #[derive(Clone)]
        struct Upstream {
            base: String,
            store: Arc<dyn Store>,
            site: String,
            created: Arc<AtomicBool>,
            http: reqwest::Client,
        }
        async fn forward(
            axum::extract::State(upstream): axum::extract::State<Upstream>,
            request: axum::extract::Request,
        ) -> axum::response::Response {
            use axum::response::IntoResponse as _;
            if upstream.created.load(Ordering::SeqCst) {
                let deadline = Instant::now() + Duration::from_secs(30);
                while upstream
                    .store
                    .current_certificates(&upstream.site)
                    .is_ok_and(|c| c.is_empty())
                    && Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            let (parts, body) = request.into_parts();
            let creates_site = parts.method == Method::POST && parts.uri.path() == "/v1/sites";
            let Ok(body) = axum::body::to_bytes(body, usize::MAX).await else {
                return axum::http::StatusCode::BAD_REQUEST.into_response();
            };
            let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            let answer = upstream
                .http
                .request(parts.method, format!("{}{path}", upstream.base))
                .headers(parts.headers)
                .body(body)
                .send()
                .await;
            let Ok(answer) = answer else {
                return axum::http::StatusCode::BAD_GATEWAY.into_response();
            };
            let status = answer.status();
            let headers = answer.headers().clone();
            let body = answer.bytes().await.unwrap_or_default();
            if creates_site && status.is_success() {
                upstream.created.store(true, Ordering::SeqCst);
            }
            (status, headers, body).into_response()
        }
        let upstream = Upstream {
            base: admin_base.to_owned(),
            store,
            site: site.to_owned(),
            created: Arc::new(AtomicBool::new(false)),
            http: reqwest::Client::builder().no_proxy().build()?,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let app = axum::Router::new().fallback(forward).with_state(upstream);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { base, task })
    }
}

/// Regression: `--wait` took its place in the site's event log after the change was made, so
/// when the issuer had already started the attempt (debounce 100 ms, a loaded machine) the
/// CLI never saw `attempt-started` and waited out its timeout beside an issued certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_wait_follows_an_attempt_that_finished_before_it_looked() -> anyhow::Result<()> {
    let pebble = Pebble::start().await?;
    let sidecar = start_sidecar(&pebble, Arc::new(SystemClock)).await?;
    let proxy = LateLookingProxy::start(
        &sidecar.admin.base,
        Arc::clone(&sidecar.running.store),
        "late",
    )
    .await?;
    let base = proxy.base.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_autohttps"))
            .args(["--admin-url", &base, "--token", TOKEN])
            .args(["site", "add", "late", "late.example.test", "--wait"])
            .args(["--timeout", "30"])
            .output()
    })
    .await??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("attempt-started") && stderr.contains("certificate-issued"),
        "progress: {stderr}"
    );
    assert!(stdout.contains("valid until"), "{stdout}");
    Ok(())
}
