//! The admin API's OpenAPI document: it lists every route the router has (and no other), each
//! documented operation reaches its handler on a real sidecar, it validates as OpenAPI 3.1
//! (openapi-spec-validator, the OpenAPI Initiative's JSON Schema plus its semantic checks), it
//! is served behind the token, and `docs/openapi.json` is the generated document.
//!
//! To accept a deliberate change of the API, rerun with `AUTOHTTPS_BLESS_GOLDEN=1` (rewrites
//! `docs/openapi.json`) and review the diff.

mod support;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use autohttps_sidecar::admin_api::{OPENAPI_PATH, openapi_json};
use autohttps_sidecar::clock::SystemClock;
use autohttps_sidecar::config::Config;
use autohttps_sidecar::service::{RunningSidecar, Sidecar};
use reqwest::Method;
use serde_json::{Value, json};
use support::{Admin, Pebble, TOKEN, start_sidecar_with};

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the sidecar crate sits in the workspace")
        .to_owned()
}

fn document() -> Value {
    serde_json::from_str(&openapi_json()).expect("the document is JSON")
}

/// The HTTP methods OpenAPI path items may hold.
const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// `(method, path)` of every operation in the document.
fn documented_operations(document: &Value) -> BTreeSet<(String, String)> {
    let mut operations = BTreeSet::new();
    for (path, item) in document["paths"].as_object().expect("paths") {
        for method in METHODS {
            if item.get(method).is_some() {
                operations.insert((method.to_owned(), path.clone()));
            }
        }
    }
    operations
}

fn config(data: &std::path::Path) -> anyhow::Result<Config> {
    let mut config = Config {
        data_dir: data.join("data"),
        ..Config::default()
    };
    config.listen.admin = "127.0.0.1:0".parse()?;
    config.listen.internal = "127.0.0.1:0".parse()?;
    config.listen.metrics = "127.0.0.1:0".parse()?;
    config.admin.token = Some(TOKEN.into());
    config.acme.directory_url = "https://127.0.0.1:9/dir".into();
    config.acme.debounce_ms = 3_600_000;
    config.dns.nameservers = vec!["127.0.0.1:9".parse()?];
    Ok(config)
}

/// A sidecar whose CA is never contacted (orders wait an hour).
async fn sidecar() -> anyhow::Result<(RunningSidecar, Admin, tempfile::TempDir)> {
    let data = tempfile::tempdir()?;
    let running = Sidecar::build(config(data.path())?, Arc::new(SystemClock))?
        .serve(axum::Router::new())
        .await?;
    let admin = Admin::new(&format!("http://{}", running.admin_addr));
    Ok((running, admin, data))
}

/// The paths the admin router routes, read from the router itself: axum prints them in its
/// `Debug` form (`paths: {RouteId(0): "/healthz", …}`); its fallback is not a path.
fn router_paths(router: &axum::Router) -> BTreeSet<String> {
    let text = format!("{router:?}");
    let routes = text
        .split_once("fallback_router")
        .map_or(text.as_str(), |(routes, _)| routes);
    routes
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| s.starts_with('/'))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_lists_every_route_of_the_router_and_no_other() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let sidecar = Sidecar::build(config(data.path())?, Arc::new(SystemClock))?;
    // The admin listener also serves the operator console under /console: pages and the
    // console's own session-authenticated calls for the browser, not the bearer-token API this
    // document describes. Everything else the listener routes must be documented.
    let (console, routed): (BTreeSet<String>, BTreeSet<String>) =
        router_paths(&sidecar.admin_router())
            .into_iter()
            .partition(|path| path == "/console" || path.starts_with("/console/"));
    assert!(
        !console.is_empty(),
        "the console's routes were not found under /console: {routed:?}"
    );
    assert!(
        routed.contains("/v1/sites/{site}"),
        "cannot read the router's paths from its Debug form any more (axum changed it?): {routed:?}"
    );
    let documented: BTreeSet<String> = document()["paths"]
        .as_object()
        .expect("paths")
        .keys()
        .cloned()
        .collect();
    assert_eq!(
        routed, documented,
        "the admin router and its OpenAPI document disagree: add routes only through `routes!` in admin_api.rs, with #[utoipa::path] on the handler"
    );
    Ok(())
}

/// A concrete request path for a documented one (`{site}` and `{hostname}` filled in).
fn concrete(path: &str) -> String {
    path.replace("{site}", "shop")
        .replace("{hostname}", "www.shop.test")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_operation_reaches_its_handler_and_no_other_method_does()
-> anyhow::Result<()> {
    // Pebble's mock DNS answers `diagnose` at once (a dead nameserver would take seconds).
    let pebble = Pebble::start().await?;
    let sidecar = start_sidecar_with(&pebble, Arc::new(SystemClock), |config| {
        config.acme.debounce_ms = 3_600_000;
    })
    .await?;
    let admin = &sidecar.admin;
    let document = document();
    let operations = documented_operations(&document);
    let mut unanswered = Vec::new();
    // Fresh for each operation, so that a DELETE before it never turns a route into a 404.
    for (method, path) in &operations {
        let (code, _) = admin
            .call(
                Method::POST,
                "/v1/sites",
                Some(json!({ "name": "shop", "primary": "shop.test", "hostnames": ["www.shop.test"] })),
            )
            .await?;
        assert!(
            code == 201 || code == 409,
            "creating the probe site: {code}"
        );
        let (code, _) = admin
            .call(
                Method::POST,
                "/v1/sites/shop/hostnames",
                Some(json!({ "hostname": "www.shop.test" })),
            )
            .await?;
        assert!(
            code == 201 || code == 409,
            "adding the probe hostname: {code}"
        );
        let body = match (method.as_str(), path.as_str()) {
            ("post", "/v1/sites") => Some(json!({ "name": "blog", "primary": "blog.test" })),
            ("post", "/v1/sites/{site}/hostnames") => Some(json!({ "hostname": "alias.test" })),
            ("patch", _) => Some(json!({ "https": "force" })),
            _ => None,
        };
        let method = Method::from_bytes(method.to_uppercase().as_bytes())?;
        let (code, answer) = admin.call(method.clone(), &concrete(path), body).await?;
        let fallback = answer["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("no such route"));
        if !(200..300).contains(&code) || fallback {
            unanswered.push(format!("{method} {path}: {code} {answer}"));
        }
    }
    assert!(
        unanswered.is_empty(),
        "documented operations that did not succeed on the real server:\n{}",
        unanswered.join("\n")
    );
    // Methods a path does not document are not served either.
    for path in document["paths"].as_object().expect("paths").keys() {
        for method in ["get", "put", "post", "delete", "patch"] {
            if operations.contains(&(method.to_owned(), path.clone())) {
                continue;
            }
            let method = Method::from_bytes(method.to_uppercase().as_bytes())?;
            let (code, _) = admin.call(method.clone(), &concrete(path), None).await?;
            assert_eq!(code, 405, "{method} {path} is served but not documented");
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_document_is_the_generated_one_behind_the_token() -> anyhow::Result<()> {
    let (running, admin, _data) = sidecar().await?;
    let (code, _) = admin
        .call_with_token(Method::GET, OPENAPI_PATH, None, None)
        .await?;
    assert_eq!(code, 401);
    let (code, served) = admin.call(Method::GET, OPENAPI_PATH, None).await?;
    assert_eq!(code, 200);
    assert_eq!(served, document());
    assert_eq!(served["openapi"], "3.1.0");
    assert_eq!(
        served["components"]["securitySchemes"]["admin_token"],
        json!({
            "type": "http",
            "scheme": "bearer",
            "description": "The admin token: admin.token in the configuration, AUTOHTTPS_ADMIN_TOKEN, or the file <data_dir>/admin-token."
        })
    );
    assert_eq!(served["security"], json!([{ "admin_token": [] }]));
    assert_eq!(served["paths"]["/healthz"]["get"]["security"], json!([]));
    // Every failure has the one error shape.
    for (method, path) in documented_operations(&served) {
        let responses = served["paths"][&path][&method]["responses"]
            .as_object()
            .expect("responses");
        for (status, response) in responses {
            if status.starts_with('4') || status.starts_with('5') {
                assert_eq!(
                    response["content"]["application/json"]["schema"]["$ref"],
                    "#/components/schemas/ErrorBody",
                    "{method} {path} {status}"
                );
            }
        }
        if path != "/healthz" {
            assert!(responses.contains_key("401"), "{method} {path} has no 401");
        }
    }
    drop(running);
    Ok(())
}

#[test]
fn docs_openapi_json_is_the_generated_document() -> anyhow::Result<()> {
    let path = workspace_root().join("docs/openapi.json");
    let generated = openapi_json();
    if std::env::var_os("AUTOHTTPS_BLESS_GOLDEN").is_some() {
        std::fs::write(&path, &generated)?;
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "docs/openapi.json is not the document the code generates: run `autohttps api openapi > docs/openapi.json` (or this test with AUTOHTTPS_BLESS_GOLDEN=1) and review the diff"
    );
    Ok(())
}

#[test]
fn the_document_validates_as_openapi_3_1() -> anyhow::Result<()> {
    let validator = std::env::var_os("AUTOHTTPS_OPENAPI_VALIDATOR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".tools/openapi-venv/bin/openapi-spec-validator"));
    assert!(
        validator.exists(),
        "openapi-spec-validator is not at {} (set AUTOHTTPS_OPENAPI_VALIDATOR, or run `make tools`, which installs it)",
        validator.display()
    );
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, openapi_json())?;
    let output = std::process::Command::new(&validator)
        .args(["--schema", "3.1", "--validation-errors", "all"])
        .arg(&file)
        .output()?;
    assert!(
        output.status.success(),
        "the document is not valid OpenAPI 3.1:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // And the validator does refuse a broken one (so the check above can fail): a path
    // parameter the operation does not declare.
    let mut broken = document();
    broken["paths"]["/v1/sites/{site}"]["get"]
        .as_object_mut()
        .expect("an operation")
        .remove("parameters");
    std::fs::write(&file, serde_json::to_string(&broken)?)?;
    let output = std::process::Command::new(&validator)
        .args(["--schema", "3.1"])
        .arg(&file)
        .output()?;
    assert!(
        !output.status.success(),
        "openapi-spec-validator accepted an operation that does not declare its path parameter"
    );
    Ok(())
}
