//! The admin API under hostile use: every route (read from the generated OpenAPI document,
//! which the router is built from, so a new route cannot be forgotten) refuses a missing or wrong token with 401; bad hostnames and bad
//! payloads each get a 4xx that says what is wrong; the store's files are owner-only.

mod support;

use std::os::unix::fs::PermissionsExt as _;
use std::sync::Arc;

use autohttps_sidecar::clock::SystemClock;
use reqwest::Method;
use serde_json::json;
use support::{Pebble, TOKEN, start_sidecar_with};

/// Every `(method, path)` the admin router serves, from its OpenAPI document (which is built
/// from the same declarations as the router; `openapi_document` checks the two agree).
fn declared_routes() -> Vec<(Method, String)> {
    let document: serde_json::Value =
        serde_json::from_str(&autohttps_sidecar::admin_api::openapi_json())
            .expect("the document is JSON");
    let mut routes = Vec::new();
    for (path, item) in document["paths"].as_object().into_iter().flatten() {
        for (word, method) in [
            ("get", Method::GET),
            ("post", Method::POST),
            ("patch", Method::PATCH),
            ("put", Method::PUT),
            ("delete", Method::DELETE),
        ] {
            if item.get(word).is_some() {
                routes.push((method, path.clone()));
            }
        }
    }
    routes
}

fn concrete(path: &str) -> String {
    path.replace("{site}", "shop")
        .replace("{hostname}", "www.shop.example.test")
        .replace("{", "")
        .replace("}", "")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_admin_route_refuses_a_missing_or_wrong_token() -> anyhow::Result<()> {
    let pebble = Pebble::start().await?;
    let sidecar = start_sidecar_with(&pebble, Arc::new(SystemClock), |_| {}).await?;
    let (code, _) = sidecar
        .admin
        .call(
            Method::POST,
            "/v1/sites",
            Some(json!({ "name": "shop", "primary": "shop.example.test", "hostnames": ["www.shop.example.test"] })),
        )
        .await?;
    assert_eq!(code, 201);

    let routes = declared_routes();
    assert!(routes.len() >= 10, "found only {routes:?}");
    let http = reqwest::Client::builder().no_proxy().build()?;
    let wrong_headers: Vec<(&str, Option<String>)> = vec![
        ("no Authorization header", None),
        ("wrong token", Some("Bearer wrong-token".into())),
        ("empty bearer", Some("Bearer ".into())),
        ("token with a suffix", Some(format!("Bearer {TOKEN}x"))),
        (
            "token prefix only",
            Some(format!("Bearer {}", &TOKEN[..TOKEN.len() - 1])),
        ),
        ("token without scheme", Some(TOKEN.into())),
        ("Basic scheme", Some(format!("Basic {TOKEN}"))),
        ("token twice", Some(format!("Bearer {TOKEN} {TOKEN}"))),
    ];
    let mut tried = 0;
    for (method, path) in routes
        .iter()
        .filter(|(_, path)| path != "/healthz")
        .cloned()
        .chain([(Method::GET, format!("/v1/sites?token={TOKEN}"))])
    {
        let url = format!("{}{}", sidecar.admin.base, concrete(&path));
        for (what, header) in &wrong_headers {
            let mut request = http
                .request(method.clone(), &url)
                .header("content-type", "application/json")
                .body(json!({ "name": "evil", "primary": "evil.example.test", "hostname": "evil.example.test" }).to_string());
            if let Some(value) = header {
                request = request.header("authorization", value);
            }
            let response = request.send().await?;
            let status = response.status().as_u16();
            let challenge = response
                .headers()
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap_or("").to_owned());
            let body = response.text().await?;
            assert_eq!(status, 401, "{method} {path} with {what}: {status} {body}");
            assert_eq!(challenge.as_deref(), Some("Bearer"), "{method} {path}");
            assert!(body.contains("bearer token"), "{body}");
            tried += 1;
        }
    }
    // Nothing was changed by any of them.
    let (_, sites) = sidecar.admin.call(Method::GET, "/v1/sites", None).await?;
    assert_eq!(sites.as_array().map(Vec::len), Some(1), "{sites}");
    let (code, _) = sidecar
        .admin
        .call_with_token(Method::GET, "/healthz", None, None)
        .await?;
    assert_eq!(code, 200, "/healthz stays public");
    println!(
        "401 checked: {} declared routes (+1 with the token in the query) x {} bad credentials = {tried} requests",
        routes.len() - 1,
        wrong_headers.len()
    );
    Ok(())
}

/// At least 50 hostnames that must be refused, each for a reason the message gives.
fn bad_hostnames() -> Vec<String> {
    let mut names: Vec<String> = [
        "",
        " ",
        "exa mple.com",
        "example..com",
        ".example.com",
        "example.com..",
        "-lead.example.com",
        "trail-.example.com",
        "under_score.example.com",
        "*.example.com",
        "foo.*.example.com",
        "*",
        "http://example.com",
        "https://example.com/",
        "example.com/path",
        "example.com:443",
        "example.com:",
        "127.0.0.1",
        "10.0.0.1",
        "[::1]",
        "::1",
        "fe80::1%eth0",
        "user@example.com",
        "exa%mple.com",
        "example.com%0d%0a",
        "example.com\n",
        "example.com\r\nX-Injected: 1",
        "exa\0mple.com",
        "ex\tample.com",
        "xn--.example.com",
        "xn--a.example.com",
        "ex!ample.com",
        "ex$ample.com",
        "exa'mple.com",
        "exa\"mple.com",
        "<script>.example.com",
        "example.com;rm -rf",
        "ex,ample.com",
        "ex+ample.com",
        "ex=ample.com",
        "example.com?",
        "example.com#frag",
        "example.com\\evil",
        "localhost",
        "com",
        "example",
        "example.123",
        "1.2.3.4.5",
        ".",
        "..",
        "example.com.evil/.well-known",
        "exa\u{fffd}mple.com",
        "exa\u{0301}\u{0301}\u{0301}mple..com",
        "ex\u{202e}ample.com",
        "example.com\u{ff0f}evil",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    names.push(format!("{}.com", "a".repeat(64)));
    names.push(format!("{}com", "a.".repeat(127)));
    names.push(format!("{}.example.com", "b".repeat(250)));
    names
}

/// Status and the message of an answer: the JSON `error`, or the text body.
async fn send(
    http: &reqwest::Client,
    method: Method,
    url: &str,
    content_type: &str,
    body: String,
) -> anyhow::Result<(u16, String)> {
    let response = http
        .request(method, url)
        .bearer_auth(TOKEN)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await?;
    let status = response.status().as_u16();
    let text = response.text().await?;
    let message = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_owned))
        .unwrap_or(text);
    Ok((status, message))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_hostnames_and_payloads_each_get_a_4xx_that_says_what_is_wrong() -> anyhow::Result<()> {
    let pebble = Pebble::start().await?;
    let sidecar = start_sidecar_with(&pebble, Arc::new(SystemClock), |_| {}).await?;
    let http = reqwest::Client::builder().no_proxy().build()?;
    let base = sidecar.admin.base.clone();
    let (code, _) = sidecar
        .admin
        .call(
            Method::POST,
            "/v1/sites",
            Some(json!({ "name": "shop", "primary": "shop.example.test" })),
        )
        .await?;
    assert_eq!(code, 201);

    let mut table = Vec::new();
    let json_type = "application/json";
    let hostnames = bad_hostnames();
    for (i, bad) in hostnames.iter().enumerate() {
        for (what, method, path, body) in [
            (
                "create site",
                Method::POST,
                "/v1/sites".to_owned(),
                json!({ "name": format!("bad-{i}"), "primary": bad }),
            ),
            (
                "add hostname",
                Method::POST,
                "/v1/sites/shop/hostnames".to_owned(),
                json!({ "hostname": bad }),
            ),
        ] {
            let (status, message) = send(
                &http,
                method,
                &format!("{base}{path}"),
                json_type,
                body.to_string(),
            )
            .await?;
            assert!(
                (400..500).contains(&status) && message.contains("invalid hostname"),
                "{what} {bad:?}: {status} {message}"
            );
            table.push((format!("{what} {bad:?}"), status, message));
        }
    }

    let long_site = "a".repeat(64);
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    let huge = json!({ "name": "huge", "primary": "huge.example.test", "hostnames": vec!["x.example.test"; 200_000] }).to_string();
    let payloads: Vec<(&str, Method, &str, &str, String)> = vec![
        ("empty body", Method::POST, "/v1/sites", json_type, String::new()),
        ("truncated JSON", Method::POST, "/v1/sites", json_type, r#"{"name":"#.into()),
        ("JSON null", Method::POST, "/v1/sites", json_type, "null".into()),
        ("JSON array", Method::POST, "/v1/sites", json_type, "[]".into()),
        ("JSON number", Method::POST, "/v1/sites", json_type, "42".into()),
        ("JSON string", Method::POST, "/v1/sites", json_type, r#""shop""#.into()),
        ("single quotes", Method::POST, "/v1/sites", json_type, "{'name':'x'}".into()),
        ("binary garbage", Method::POST, "/v1/sites", json_type, "\u{1}\u{2}\u{3}\u{fffd}".into()),
        ("deeply nested", Method::POST, "/v1/sites", json_type, deep),
        ("3 MB body", Method::POST, "/v1/sites", json_type, huge),
        ("text/plain", Method::POST, "/v1/sites", "text/plain", json!({"name":"tp","primary":"tp.example.test"}).to_string()),
        ("form encoded", Method::POST, "/v1/sites", "application/x-www-form-urlencoded", "name=x&primary=x.example.test".into()),
        ("empty object", Method::POST, "/v1/sites", json_type, "{}".into()),
        ("name only", Method::POST, "/v1/sites", json_type, r#"{"name":"only"}"#.into()),
        ("primary only", Method::POST, "/v1/sites", json_type, r#"{"primary":"only.example.test"}"#.into()),
        ("name is a number", Method::POST, "/v1/sites", json_type, r#"{"name":1,"primary":"n.example.test"}"#.into()),
        ("primary is a list", Method::POST, "/v1/sites", json_type, r#"{"name":"p","primary":["p.example.test"]}"#.into()),
        ("hostnames is a string", Method::POST, "/v1/sites", json_type, r#"{"name":"h","primary":"h.example.test","hostnames":"www.h.example.test"}"#.into()),
        ("hostnames of numbers", Method::POST, "/v1/sites", json_type, r#"{"name":"h","primary":"h.example.test","hostnames":[1,2]}"#.into()),
        ("unknown field", Method::POST, "/v1/sites", json_type, r#"{"name":"u","primary":"u.example.test","admin":true}"#.into()),
        ("field in wrong case", Method::POST, "/v1/sites", json_type, r#"{"Name":"u","primary":"u.example.test"}"#.into()),
        ("https mode unknown", Method::POST, "/v1/sites", json_type, r#"{"name":"m","primary":"m.example.test","https":"always"}"#.into()),
        ("https mode number", Method::POST, "/v1/sites", json_type, r#"{"name":"m","primary":"m.example.test","https":1}"#.into()),
        ("https mode upper case", Method::POST, "/v1/sites", json_type, r#"{"name":"m","primary":"m.example.test","https":"FORCE"}"#.into()),
        ("redirect unknown", Method::POST, "/v1/sites", json_type, r#"{"name":"r","primary":"r.example.test","redirect":"sometimes"}"#.into()),
        ("hsts a string", Method::POST, "/v1/sites", json_type, r#"{"name":"s","primary":"s.example.test","hsts":"yes"}"#.into()),
        ("hsts enabled a string", Method::POST, "/v1/sites", json_type, r#"{"name":"s","primary":"s.example.test","hsts":{"enabled":"true","max_age":1}}"#.into()),
        ("hsts max_age negative", Method::POST, "/v1/sites", json_type, r#"{"name":"s","primary":"s.example.test","hsts":{"enabled":true,"max_age":-1}}"#.into()),
        ("hsts max_age float", Method::POST, "/v1/sites", json_type, r#"{"name":"s","primary":"s.example.test","hsts":{"enabled":true,"max_age":1.5}}"#.into()),
        ("hsts max_age over two years", Method::POST, "/v1/sites", json_type, r#"{"name":"s","primary":"s.example.test","hsts":{"enabled":true,"max_age":63072001}}"#.into()),
        ("hsts max_age beyond u64", Method::POST, "/v1/sites", json_type, r#"{"name":"s","primary":"s.example.test","hsts":{"enabled":true,"max_age":99999999999999999999999}}"#.into()),
        ("hsts missing max_age", Method::POST, "/v1/sites", json_type, r#"{"name":"s","primary":"s.example.test","hsts":{"enabled":true}}"#.into()),
        ("mixed_content unknown", Method::POST, "/v1/sites", json_type, r#"{"name":"c","primary":"c.example.test","mixed_content":"block"}"#.into()),
        ("site name empty", Method::POST, "/v1/sites", json_type, r#"{"name":"","primary":"e.example.test"}"#.into()),
        ("site name upper case", Method::POST, "/v1/sites", json_type, r#"{"name":"Shop","primary":"e.example.test"}"#.into()),
        ("site name leading dash", Method::POST, "/v1/sites", json_type, r#"{"name":"-x","primary":"e.example.test"}"#.into()),
        ("site name trailing dash", Method::POST, "/v1/sites", json_type, r#"{"name":"x-","primary":"e.example.test"}"#.into()),
        ("site name 64 chars", Method::POST, "/v1/sites", json_type, json!({"name": long_site, "primary":"e.example.test"}).to_string()),
        ("site name with space", Method::POST, "/v1/sites", json_type, r#"{"name":"my shop","primary":"e.example.test"}"#.into()),
        ("site name with dot", Method::POST, "/v1/sites", json_type, r#"{"name":"my.shop","primary":"e.example.test"}"#.into()),
        ("site name path traversal", Method::POST, "/v1/sites", json_type, r#"{"name":"../etc","primary":"e.example.test"}"#.into()),
        ("site name with NUL", Method::POST, "/v1/sites", json_type, "{\"name\":\"a\\u0000b\",\"primary\":\"e.example.test\"}".into()),
        ("site name non-ASCII", Method::POST, "/v1/sites", json_type, r#"{"name":"café","primary":"e.example.test"}"#.into()),
        ("duplicate site", Method::POST, "/v1/sites", json_type, r#"{"name":"shop","primary":"other.example.test"}"#.into()),
        ("hostname owned by another site", Method::POST, "/v1/sites", json_type, r#"{"name":"thief","primary":"shop.example.test"}"#.into()),
        ("patch: unknown mode", Method::PATCH, "/v1/sites/shop", json_type, r#"{"https":"sometimes"}"#.into()),
        ("patch: unknown field", Method::PATCH, "/v1/sites/shop", json_type, r#"{"primary":"new.example.test"}"#.into()),
        ("patch: hsts too long", Method::PATCH, "/v1/sites/shop", json_type, r#"{"hsts":{"enabled":true,"max_age":99999999999}}"#.into()),
        ("patch: array", Method::PATCH, "/v1/sites/shop", json_type, "[]".into()),
        ("patch: unknown site", Method::PATCH, "/v1/sites/nope", json_type, r#"{"https":"force"}"#.into()),
        ("add hostname: number", Method::POST, "/v1/sites/shop/hostnames", json_type, r#"{"hostname":5}"#.into()),
        ("add hostname: missing", Method::POST, "/v1/sites/shop/hostnames", json_type, "{}".into()),
        ("add hostname: extra field", Method::POST, "/v1/sites/shop/hostnames", json_type, r#"{"hostname":"x.example.test","site":"other"}"#.into()),
        ("add hostname: unknown site", Method::POST, "/v1/sites/nope/hostnames", json_type, r#"{"hostname":"x.example.test"}"#.into()),
        ("remove primary hostname", Method::DELETE, "/v1/sites/shop/hostnames/shop.example.test", json_type, String::new()),
        ("remove unknown hostname", Method::DELETE, "/v1/sites/shop/hostnames/nothere.example.test", json_type, String::new()),
        ("remove bad hostname", Method::DELETE, "/v1/sites/shop/hostnames/bad_name.example.test", json_type, String::new()),
        ("regenerate unknown site", Method::POST, "/v1/sites/nope/regenerate", json_type, String::new()),
        ("events: negative limit", Method::GET, "/v1/sites/shop/events?limit=-1", json_type, String::new()),
        ("events: limit not a number", Method::GET, "/v1/sites/shop/events?limit=all", json_type, String::new()),
        ("certificates of unknown site", Method::GET, "/v1/sites/nope/certificates", json_type, String::new()),
        ("diagnose bad hostname", Method::GET, "/v1/diagnose/bad_name.example.test", json_type, String::new()),
        ("diagnose IP address", Method::GET, "/v1/diagnose/127.0.0.1", json_type, String::new()),
        ("delete unknown site", Method::DELETE, "/v1/sites/nope", json_type, String::new()),
    ];
    let payload_count = payloads.len();
    for (what, method, path, content_type, body) in payloads {
        let (status, message) =
            send(&http, method, &format!("{base}{path}"), content_type, body).await?;
        assert!(
            (400..500).contains(&status) && message.trim().len() >= 10,
            "{what}: {status} {message:?}"
        );
        table.push((what.to_owned(), status, message));
    }
    // Nothing bad got in: still one site with its one name.
    let (_, sites) = sidecar.admin.call(Method::GET, "/v1/sites", None).await?;
    let sites = sites.as_array().cloned().unwrap_or_default();
    assert_eq!(sites.len(), 1, "{sites:?}");
    assert_eq!(sites[0]["hostnames"].as_array().map(Vec::len), Some(1));

    println!("{:<60} {:>6}  message", "hostile input", "status");
    for (what, status, message) in &table {
        let what: String = what.escape_debug().take(58).collect();
        let message: String = message.chars().take(100).collect();
        println!("{what:<60} {status:>6}  {message}");
    }
    println!(
        "{} bad hostnames (x2 endpoints) and {payload_count} bad payloads: every one a 4xx with a message",
        hostnames.len()
    );
    assert!(hostnames.len() >= 50 && payload_count >= 50);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_bearing_files_and_the_sds_socket_are_owner_only() -> anyhow::Result<()> {
    let pebble = Pebble::start().await?;
    let sidecar = start_sidecar_with(&pebble, Arc::new(SystemClock), |config| {
        config.admin.token = None;
    })
    .await?;
    let data = sidecar.data.path().join("data");
    let token = std::fs::read_to_string(data.join("admin-token"))?;
    let admin = support::Admin::new(&sidecar.admin.base);
    let (code, _) = admin
        .call_with_token(
            Method::POST,
            "/v1/sites",
            Some(json!({ "name": "perm", "primary": "perm.example.test" })),
            Some(token.trim()),
        )
        .await?;
    assert_eq!(code, 201);
    // Wait for a key to be stored (the WAL then exists too).
    let store = Arc::clone(&sidecar.running.store);
    support::eventually(
        "a certificate",
        std::time::Duration::from_secs(60),
        async || {
            store
                .current_certificates("perm")
                .is_ok_and(|c| !c.is_empty())
        },
    )
    .await?;
    let mode = |path: &std::path::Path| -> anyhow::Result<u32> {
        Ok(std::fs::metadata(path)?.permissions().mode() & 0o777)
    };
    assert_eq!(mode(&data)?, 0o700, "data directory");
    let mut checked = Vec::new();
    for entry in std::fs::read_dir(&data)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("")
            .to_owned();
        if name.starts_with("autohttps.db") || name == "admin-token" || name == "sds.sock" {
            assert_eq!(mode(&path)?, 0o600, "{name}");
            checked.push(name);
        }
    }
    checked.sort();
    for needed in [
        "admin-token",
        "autohttps.db",
        "autohttps.db-wal",
        "sds.sock",
    ] {
        assert!(
            checked.iter().any(|c| c == needed),
            "{needed} not found: {checked:?}"
        );
    }
    println!("owner-only: data dir 0700; {checked:?} 0600");
    Ok(())
}
