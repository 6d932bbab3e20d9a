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
        json!({ "https": "force", "redirect": "temporary", "hsts": { "enabled": true, "max_age": 300, "include_subdomains": false, "preload": false }, "mixed_content": "report", "canonical_host": null })
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
    let mut all = vec!["--admin-url", &admin.base, "--token", TOKEN];
    all.extend_from_slice(args);
    autohttps(&all)
}

/// Runs the real binary with exactly `args`: no AUTOHTTPS_* variable from the test's
/// environment, in a folder with no autohttps.toml.
fn autohttps(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_autohttps"))
        .args(args)
        .env_remove("AUTOHTTPS_CONFIG")
        .env_remove("AUTOHTTPS_ADMIN_TOKEN")
        .env_remove("AUTOHTTPS_ADMIN_URL")
        .current_dir(std::env::temp_dir())
        .output()
        .expect("run autohttps")
}

/// [`autohttps`] on a blocking thread, with owned arguments.
async fn autohttps_async(args: Vec<String>) -> anyhow::Result<std::process::Output> {
    Ok(tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        autohttps(&args)
    })
    .await?)
}

/// Owned arguments: the admin URL and token, then `args`.
fn with_admin(admin: &Admin, args: &[&str]) -> Vec<String> {
    ["--admin-url", &admin.base, "--token", TOKEN]
        .iter()
        .chain(args)
        .map(|a| a.to_string())
        .collect()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
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
    assert_eq!(
        out.status.code(),
        Some(2),
        "usage: refused before it is sent"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("'_'") && stderr.contains("only letters, digits and '-'"),
        "{stderr}"
    );

    let out = run(&["site", "https", "nope", "force"]).await?;
    assert_eq!(out.status.code(), Some(3), "not found");
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
    assert_eq!(out.status.code(), Some(7), "unauthorized");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refused the token") && !stderr.contains("configuration:"),
        "{stderr}"
    );
    Ok(())
}

/// Bug: `site remove demo/hostnames/www…` removed the hostname www… from site demo, and
/// `site show 'demo?x=1'` showed demo. Identifiers are checked by the CLI, encoded one path
/// segment each, and checked again by the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identifiers_never_reach_another_route() -> anyhow::Result<()> {
    let (_running, admin, _data) = sidecar().await?;
    let out = autohttps_async(with_admin(
        &admin,
        &[
            "site",
            "add",
            "demo",
            "demo.example.com",
            "--host",
            "www.demo.example.com",
        ],
    ))
    .await?;
    assert!(out.status.success(), "{}", text(&out.stderr));

    for args in [
        &["site", "remove", "demo/hostnames/www.demo.example.com"][..],
        &["site", "show", "demo?x=1"][..],
        &["site", "show", "../sites/demo"][..],
        &["host", "remove", "demo", "www.demo.example.com/../x"][..],
    ] {
        let out = autohttps_async(with_admin(&admin, args)).await?;
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
        let stderr = text(&out.stderr);
        assert!(stderr.contains("invalid"), "{args:?}: {stderr}");
    }
    // The server refuses the same identifiers when another client encodes them.
    for (method, path) in [
        (
            Method::DELETE,
            "/v1/sites/demo%2Fhostnames%2Fwww.demo.example.com",
        ),
        (Method::GET, "/v1/sites/demo%3Fx=1"),
        (Method::POST, "/v1/sites/DEMO/regenerate"),
        (
            Method::DELETE,
            "/v1/sites/demo%2F/hostnames/www.demo.example.com",
        ),
    ] {
        let (code, body) = admin.call(method.clone(), path, None).await?;
        assert_eq!(code, 400, "{method} {path}: {body}");
        assert!(error_of(&body).contains("invalid site name"), "{body}");
    }
    let (code, site) = admin.call(Method::GET, "/v1/sites/demo", None).await?;
    assert_eq!(code, 200);
    assert_eq!(
        site["hostnames"].as_array().map(Vec::len),
        Some(2),
        "nothing was removed: {site}"
    );
    Ok(())
}

/// Bug: `--admin-url` at the internal port printed `autohttps: null`, one without a scheme
/// "builder error".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_admin_url_is_named_with_the_fix() -> anyhow::Result<()> {
    let (running, _admin, _data) = sidecar().await?;
    let internal = format!("http://{}", running.internal_addr);
    let out = autohttps_async(vec![
        "--admin-url".into(),
        internal,
        "--token".into(),
        TOKEN.into(),
        "site".into(),
        "list".into(),
    ])
    .await?;
    assert_eq!(out.status.code(), Some(5), "unreachable");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("not as the autohttps admin API") && stderr.contains("listen.admin"),
        "{stderr}"
    );
    assert!(!stderr.contains("null"), "{stderr}");

    let bare = running.admin_addr.to_string();
    let out = autohttps_async(vec![
        "--admin-url".into(),
        bare.clone(),
        "site".into(),
        "list".into(),
    ])
    .await?;
    assert_eq!(out.status.code(), Some(2), "usage");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("has no scheme") && stderr.contains(&format!("http://{bare}")),
        "{stderr}"
    );
    Ok(())
}

/// Bug: messages repeated themselves, a wrong token read "configuration: …401", and with no
/// service running the first complaint was a missing token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_say_what_happened_once_with_their_own_exit_code() -> anyhow::Result<()> {
    let (_running, admin, _data) = sidecar().await?;
    let dir = tempfile::tempdir()?;

    // Nothing listens: the service is down, whatever the token.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let out = autohttps_async(vec![
        "--admin-url".into(),
        format!("http://{closed}"),
        "site".into(),
        "list".into(),
    ])
    .await?;
    assert_eq!(out.status.code(), Some(5));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("cannot reach the admin API") && !stderr.contains("token"),
        "{stderr}"
    );

    // Running, but no token given anywhere.
    let out = autohttps_async(vec![
        "--admin-url".into(),
        admin.base.clone(),
        "--config".into(),
        dir.path().join("none.toml").display().to_string(),
        "site".into(),
        "list".into(),
    ])
    .await?;
    assert_eq!(
        out.status.code(),
        Some(8),
        "a named config file that is missing"
    );
    let stderr = text(&out.stderr);
    assert_eq!(
        stderr.matches("No such file or directory").count(),
        1,
        "{stderr}"
    );
    let empty = dir.path().join("empty.toml");
    std::fs::write(
        &empty,
        format!("data_dir = {:?}\n", dir.path().join("data")),
    )?;
    let out = autohttps_async(vec![
        "--admin-url".into(),
        admin.base.clone(),
        "--config".into(),
        empty.display().to_string(),
        "site".into(),
        "list".into(),
    ])
    .await?;
    assert_eq!(out.status.code(), Some(7));
    assert!(
        text(&out.stderr).contains("no admin token"),
        "{}",
        text(&out.stderr)
    );

    // A broken file: named once, "configuration" once, with the line.
    let broken = dir.path().join("broken.toml");
    std::fs::write(&broken, "[acme]\norders_in_flight = \"four\"\n")?;
    let out = autohttps_async(vec![
        "--config".into(),
        broken.display().to_string(),
        "site".into(),
        "list".into(),
    ])
    .await?;
    assert_eq!(out.status.code(), Some(8));
    let stderr = text(&out.stderr);
    assert_eq!(stderr.matches("configuration").count(), 1, "{stderr}");
    assert_eq!(stderr.matches("broken.toml").count(), 1, "{stderr}");
    assert!(stderr.contains("line 2"), "{stderr}");

    // --json: the failure is JSON on stdout with a stable code, nothing on stderr.
    let out = autohttps_async(with_admin(&admin, &["--json", "site", "show", "nope"])).await?;
    assert_eq!(out.status.code(), Some(3));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(answer["error"]["code"], "not-found");
    assert_eq!(answer["error"]["exit_code"], 3);
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
    let out = autohttps_async(with_admin(
        &admin,
        &["--json", "site", "add", "dup", "dup.example.com"],
    ))
    .await?;
    assert!(out.status.success(), "{}", text(&out.stdout));
    let out = autohttps_async(with_admin(
        &admin,
        &["--json", "site", "add", "dup", "dup2.example.com"],
    ))
    .await?;
    assert_eq!(out.status.code(), Some(4));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(answer["error"]["code"], "conflict");
    let out = autohttps_async(with_admin(&admin, &["--json", "site", "frobnicate"])).await?;
    assert_eq!(out.status.code(), Some(2));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(answer["error"]["code"], "usage");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_sets_and_shows_the_whole_policy() -> anyhow::Result<()> {
    let (running, admin, _data) = sidecar().await?;
    let out = autohttps_async(with_admin(
        &admin,
        &[
            "site",
            "add",
            "shop",
            "shop.example.com",
            "--https",
            "FORCE",
            "--redirect",
            "temporary",
            "--hsts",
            "on",
            "--hsts-max-age",
            "600",
            "--mixed-content",
            "Report",
        ],
    ))
    .await?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (_, site) = admin.call(Method::GET, "/v1/sites/shop", None).await?;
    assert_eq!(
        site["policy"],
        json!({
            "https": "force", "redirect": "temporary", "mixed_content": "report",
            "hsts": { "enabled": true, "max_age": 600, "include_subdomains": false, "preload": false },
            "canonical_host": null
        })
    );

    // Preload without its prerequisites is refused (the filter would refuse the policy).
    let out = autohttps_async(with_admin(
        &admin,
        &["site", "set", "shop", "--hsts-preload", "on"],
    ))
    .await?;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("include_subdomains"),
        "{}",
        text(&out.stderr)
    );

    let out = autohttps_async(with_admin(
        &admin,
        &[
            "site",
            "set",
            "shop",
            "--hsts-max-age",
            "31536000",
            "--hsts-include-subdomains",
            "on",
            "--hsts-preload",
            "on",
            "--mixed-content",
            "off",
        ],
    ))
    .await?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = autohttps_async(with_admin(&admin, &["site", "show", "shop"])).await?;
    let shown = text(&out.stdout);
    for expected in [
        "https:         force (redirects temporary)",
        "hsts:          on, max-age 31536000, includeSubDomains, preload",
        "mixed content: off",
    ] {
        assert!(shown.contains(expected), "{expected:?} in\n{shown}");
    }

    let out = autohttps_async(with_admin(&admin, &["site", "list"])).await?;
    let listed = text(&out.stdout);
    assert!(
        listed.contains("CERT") && listed.contains("pending"),
        "{listed}"
    );
    let out = autohttps_async(with_admin(&admin, &["--json", "site", "list"])).await?;
    let sites: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(sites[0]["certificate"]["state"], "pending");
    assert_eq!(sites[0]["certificate"]["soonest_expiry"], json!(null));

    let out = autohttps_async(with_admin(&admin, &["site", "set", "shop"])).await?;
    assert_eq!(
        out.status.code(),
        Some(2),
        "nothing to change is a usage error"
    );

    // The canonical host: one of the site's names, in the policy Envoy gets, cleared with
    // the name.
    let out = autohttps_async(with_admin(
        &admin,
        &[
            "site",
            "set",
            "shop",
            "--canonical-host",
            "www.shop.example.com",
        ],
    ))
    .await?;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("not one of the site's exact hostnames"),
        "{}",
        text(&out.stderr)
    );
    let out = autohttps_async(with_admin(
        &admin,
        &["host", "add", "shop", "www.shop.example.com"],
    ))
    .await?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = autohttps_async(with_admin(
        &admin,
        &[
            "site",
            "set",
            "shop",
            "--canonical-host",
            "WWW.Shop.Example.com",
        ],
    ))
    .await?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("canonical:     www.shop.example.com"),
        "{}",
        text(&out.stdout)
    );
    let policy: serde_json::Value = reqwest::Client::builder()
        .no_proxy()
        .build()?
        .get(format!("http://{}/v1/policy", running.internal_addr))
        .send()
        .await?
        .json()
        .await?;
    let shop = policy["sites"]
        .as_array()
        .and_then(|sites| sites.iter().find(|s| s["id"] == "shop"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(shop["canonical_host"], "www.shop.example.com", "{policy}");
    let out = autohttps_async(with_admin(
        &admin,
        &["host", "remove", "shop", "www.shop.example.com"],
    ))
    .await?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (_, site) = admin.call(Method::GET, "/v1/sites/shop", None).await?;
    assert_eq!(site["policy"]["canonical_host"], json!(null), "{site}");
    // Its feed entry validates: nothing to report.
    assert_eq!(site["policy_rejected"], json!(null), "{site}");
    Ok(())
}

#[test]
fn completions_and_man_page_come_from_the_command_definitions() {
    let out = autohttps(&["completions", "bash"]);
    assert!(out.status.success());
    let script = text(&out.stdout);
    assert!(
        script.contains("autohttps") && script.contains("--hsts-max-age"),
        "{script}"
    );
    let out = autohttps(&["completions", "ZSH"]);
    assert!(out.status.success(), "shell names are case-insensitive");
    let out = autohttps(&["man"]);
    assert!(out.status.success());
    let page = text(&out.stdout);
    assert!(
        page.starts_with(".ie") || page.contains(".TH autohttps"),
        "{page}"
    );
    assert!(
        page.contains("Exit codes"),
        "the exit-code table is in the man page"
    );
}
