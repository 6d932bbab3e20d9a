//! Admin API and CLI refuse bad input with a 4xx / non-zero exit and a message that says what is
//! wrong; the API requires the bearer token.

mod support;

use std::sync::Arc;

use autohttps_sidecar::clock::SystemClock;
use autohttps_sidecar::config::Config;
use autohttps_sidecar::service::{RunningSidecar, Sidecar};
use reqwest::Method;
use serde_json::json;
use support::{Admin, TOKEN};

/// A sidecar whose CA is never contacted (orders are debounced for an hour).
async fn sidecar() -> anyhow::Result<(RunningSidecar, Admin, tempfile::TempDir)> {
    let data = tempfile::tempdir()?;
    let mut config = Config {
        data_dir: data.path().join("data"),
        ..Config::default()
    };
    config.listen.admin = "127.0.0.1:0".parse()?;
    config.listen.internal = "127.0.0.1:0".parse()?;
    config.listen.metrics = "127.0.0.1:0".parse()?;
    config.admin.token = Some(TOKEN.into());
    config.acme.directory_url = "https://127.0.0.1:9/dir".into();
    config.acme.debounce_ms = 3_600_000;
    config.dns.nameservers = vec!["127.0.0.1:9".parse()?];
    let running = Sidecar::build(config, Arc::new(SystemClock))?
        .serve(axum::Router::new())
        .await?;
    let admin = Admin::new(&format!("http://{}", running.admin_addr));
    Ok((running, admin, data))
}

fn error_of(body: &serde_json::Value) -> &str {
    body["error"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_requires_bearer_token_except_healthz() -> anyhow::Result<()> {
    let (_running, admin, _data) = sidecar().await?;
    let (code, body) = admin
        .call_with_token(Method::GET, "/v1/sites", None, None)
        .await?;
    assert_eq!(code, 401);
    assert!(error_of(&body).contains("Bearer"), "{body}");
    let (code, _) = admin
        .call_with_token(
            Method::GET,
            "/v1/sites",
            None,
            Some("wrong-token-wrong-token"),
        )
        .await?;
    assert_eq!(code, 401);
    let (code, _) = admin
        .call_with_token(Method::GET, "/metrics", None, None)
        .await?;
    assert_eq!(code, 401);
    let (code, body) = admin
        .call_with_token(Method::GET, "/healthz", None, None)
        .await?;
    assert_eq!((code, body), (200, json!({ "status": "ok" })));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_refuses_bad_input_saying_what_is_wrong() -> anyhow::Result<()> {
    let (_running, admin, _data) = sidecar().await?;
    let create = |body: serde_json::Value| {
        let admin = admin.clone();
        async move { admin.call(Method::POST, "/v1/sites", Some(body)).await }
    };
    let (code, body) = create(json!({ "name": "shop", "primary": "exa mple.com" })).await?;
    assert_eq!(code, 400);
    assert!(error_of(&body).contains("whitespace"), "{body}");
    let (code, body) = create(json!({ "name": "Shop!", "primary": "example.com" })).await?;
    assert_eq!(code, 400);
    assert!(error_of(&body).contains("lower-case letters"), "{body}");
    let (code, body) =
        create(json!({ "name": "shop", "primary": "example.com", "https": "always" })).await?;
    assert_eq!(code, 400);
    assert!(
        error_of(&body).contains("auto") && error_of(&body).contains("force"),
        "{body}"
    );
    let (code, body) = create(json!({ "name": "shop", "primary": "example.com", "hsts": { "enabled": true, "max_age": 999_999_999 } })).await?;
    assert_eq!(code, 400);
    assert!(error_of(&body).contains("two years"), "{body}");
    let (code, body) = create(json!({ "name": "shop", "primry": "example.com" })).await?;
    assert_eq!(code, 400);
    assert!(error_of(&body).contains("primry"), "{body}");

    let (code, site) = create(json!({ "name": "shop", "primary": "Example.COM", "hostnames": ["www.example.com", "bücher.example"] })).await?;
    assert_eq!(code, 201, "{site}");
    assert_eq!(
        site["hostnames"][0],
        json!({ "name": "example.com", "kind": "primary" })
    );
    assert!(
        site["hostnames"]
            .as_array()
            .expect("hostnames")
            .contains(&json!({ "name": "xn--bcher-kva.example", "kind": "alias" }))
    );
    let (code, body) = create(json!({ "name": "shop", "primary": "other.example" })).await?;
    assert_eq!(code, 409);
    assert!(error_of(&body).contains("already exists"), "{body}");
    let (code, body) = create(json!({ "name": "other", "primary": "www.example.com" })).await?;
    assert_eq!(code, 409);
    assert!(
        error_of(&body).contains("belongs to site \"shop\""),
        "{body}"
    );

    let (code, body) = admin
        .call(
            Method::POST,
            "/v1/sites/nope/hostnames",
            Some(json!({ "hostname": "a.example.com" })),
        )
        .await?;
    assert_eq!(code, 404);
    assert!(error_of(&body).contains("site list"), "{body}");
    let (code, body) = admin
        .call(Method::DELETE, "/v1/sites/shop/hostnames/example.com", None)
        .await?;
    assert_eq!(code, 400);
    assert!(error_of(&body).contains("primary domain"), "{body}");
    let (code, body) = admin
        .call(Method::GET, "/v1/diagnose/unknown.example.net", None)
        .await?;
    assert_eq!(code, 404);
    assert!(error_of(&body).contains("host add"), "{body}");
    let (code, body) = admin
        .call(
            Method::PATCH,
            "/v1/sites/shop",
            Some(json!({ "mixed_content": "block" })),
        )
        .await?;
    assert_eq!(code, 400);
    assert!(error_of(&body).contains("upgrade"), "{body}");
    let (code, site) = admin
        .call(Method::PATCH, "/v1/sites/shop", Some(json!({ "https": "force", "hsts": { "enabled": true, "max_age": 300 }, "mixed_content": "report", "redirect": "temporary" })))
        .await?;
    assert_eq!(code, 200, "{site}");
    assert_eq!(
        site["policy"],
        json!({ "https": "force", "redirect": "temporary", "hsts": { "enabled": true, "max_age": 300 }, "mixed_content": "report" })
    );

    let (code, metrics) = admin.call(Method::GET, "/metrics", None).await?;
    assert_eq!(code, 200);
    let metrics = metrics.as_str().unwrap_or_default().to_owned();
    assert!(
        metrics.contains("autohttps_sites{https_mode=\"force\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("autohttps_orders_in_flight 0"),
        "{metrics}"
    );
    Ok(())
}

/// Runs the real CLI binary against the admin API.
fn cli(admin: &Admin, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_autohttps"))
        .args(["--admin-url", &admin.base, "--token", TOKEN])
        .args(args)
        .env_remove("AUTOHTTPS_CONFIG")
        .output()
        .expect("run autohttps")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_reports_validation_errors_and_exits_non_zero() -> anyhow::Result<()> {
    let (_running, admin, _data) = sidecar().await?;
    let run = |args: &'static [&'static str]| {
        let admin = admin.clone();
        tokio::task::spawn_blocking(move || cli(&admin, args))
    };
    let out = run(&[
        "site",
        "add",
        "blog",
        "blog.example.com",
        "--host",
        "www.blog.example.com",
    ])
    .await?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("www.blog.example.com (subdomain)"));

    let out = run(&["host", "add", "blog", "bad_name.example.com"]).await?;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("'_'") && stderr.contains("only letters, digits and '-'"),
        "{stderr}"
    );

    let out = run(&["site", "https", "nope", "force"]).await?;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no site named \"nope\""));

    let out = run(&["site", "https", "blog", "sometimes"]).await?;
    assert_eq!(out.status.code(), Some(2), "clap refuses unknown modes");
    assert!(String::from_utf8_lossy(&out.stderr).contains("possible values: auto, force, disable"));

    let out = run(&["--json", "site", "list"]).await?;
    assert!(out.status.success());
    let sites: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(sites[0]["name"], "blog");

    let out = tokio::task::spawn_blocking({
        let base = admin.base.clone();
        move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_autohttps"))
                .args([
                    "--admin-url",
                    &base,
                    "--token",
                    "wrong-token-wrong-token",
                    "site",
                    "list",
                ])
                .output()
        }
    })
    .await??;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bearer token"));
    Ok(())
}
