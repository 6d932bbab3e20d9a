//! `make run`: starts the whole stack on loopback (Pebble as the CA, the sidecar, Envoy with the
//! filter, a demo backend), creates a demo site, waits until its certificate is served, prints
//! how to try it, and stops everything on Ctrl-C.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use autohttps_tests::envoy::repo_root;
use autohttps_tests::stack::{Lifetime, Ports, Stack, StackOptions, wait_until};
use serde_json::json;

const DEMO_SITE: &str = "demo";
const DEMO_PRIMARY: &str = "demo.autohttps.test";
const DEMO_WWW: &str = "www.demo.autohttps.test";

fn main() -> anyhow::Result<()> {
    let dir = repo_root().join(".run/stack");
    // Pebble makes a new root CA on every start: certificates of an earlier run are useless.
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    let (stop_tx, stop_rx) = mpsc::channel();
    ctrlc::set_handler(move || {
        let _ = stop_tx.send(());
    })
    .context("installing the Ctrl-C handler")?;

    let ports = Ports::local_defaults();
    // Everything lives until Ctrl-C (no time limit), its logs in `dir`.
    let stack = Stack::start(StackOptions {
        dir: dir.clone(),
        ports,
        verbose: true,
        lifetime: Lifetime::UntilStopped,
        trusted_proxies: Vec::new(),
        envoy_workers: 1,
        feed_interval_ms: None,
    })?;

    println!(
        "==> creating the demo site {DEMO_SITE} ({DEMO_PRIMARY}, {DEMO_WWW}): force HTTPS, HSTS, CSP upgrade"
    );
    let (status, body) = stack.admin(
        "POST",
        "/v1/sites",
        Some(&json!({
            "name": DEMO_SITE,
            "primary": DEMO_PRIMARY,
            "hostnames": [DEMO_WWW],
            "https": "force",
            "hsts": { "enabled": true, "max_age": 300 },
            "mixed_content": "upgrade"
        })),
    )?;
    anyhow::ensure!(
        (200..300).contains(&status),
        "creating the demo site failed ({status}): {body}"
    );
    let created = Instant::now();
    println!("==> waiting for Pebble to issue its certificate and Envoy to serve it");
    wait_until("the demo certificate", Duration::from_secs(120), || {
        stack
            .https(DEMO_PRIMARY, "/")
            .ok()
            .filter(|r| r.status == 200)
    })?;
    println!(
        "    served over HTTPS {:.1} s after the site was created",
        created.elapsed().as_secs_f64()
    );

    let ca = stack.ca_root.display();
    let resolve = format!(
        "--resolve {DEMO_PRIMARY}:{http}:127.0.0.1 --resolve {DEMO_PRIMARY}:{https}:127.0.0.1",
        http = ports.http,
        https = ports.https
    );
    let config = stack.dir.join("autohttps.toml");
    let bin = autohttps_tests::stack::sidecar_binary()?;
    println!(
        r#"
autohttps is running. Envoy: http://127.0.0.1:{http} and https://127.0.0.1:{https} (admin 127.0.0.1:{admin}).
The CA is a local Pebble; trust its root with --cacert {ca}.

The operator console (sites, certificates, the policy editor with its live preview):
  open http://127.0.0.1:{console}/console and sign in with the admin token {token}
  (this demo's token, from {config}; a real sidecar's is admin.token or <data_dir>/admin-token)

Try, in another terminal:

  # HTTPS with a certificate issued by the local CA, HSTS and the mixed-content upgrade header
  curl -i --cacert {ca} {resolve} https://{DEMO_PRIMARY}:{https}/
  # force: HTTP → HTTPS, path and query kept
  curl -i {resolve} 'http://{DEMO_PRIMARY}:{http}/some/page?x=1'
  # the sidecar's view: sites, certificates, and what is wrong with a name
  {bin} --config {config} site list
  {bin} --config {config} site show {DEMO_SITE}
  {bin} --config {config} diagnose {DEMO_WWW}
  # add a name and watch it get a certificate
  {bin} --config {config} host add {DEMO_SITE} blog.demo.autohttps.test --wait
  # change the policy: it is pushed to Envoy as soon as it is saved (milliseconds)
  {bin} --config {config} site set {DEMO_SITE} --https disable
  # the filter's stats
  curl -s http://127.0.0.1:{admin}/stats | grep autohttps

Logs (each part's own file):
{logs}
Ctrl-C stops everything."#,
        http = ports.http,
        https = ports.https,
        admin = ports.envoy_admin,
        console = ports.sidecar_admin,
        token = autohttps_tests::stack::ADMIN_TOKEN,
        bin = bin.display(),
        config = config.display(),
        logs = stack
            .log_files()
            .iter()
            .map(|path| format!("  {}", path.display()))
            .collect::<Vec<_>>()
            .join("\n"),
    );
    let _ = stop_rx.recv();
    println!("\n==> stopping Envoy, the sidecar, Pebble and the demo backend");
    drop(stack);
    Ok(())
}
