//! End to end: a real Envoy (V8, the release filter), the `autohttps` sidecar binary, Pebble and
//! its mock DNS, all on loopback. Sites are created with the CLI or the admin API, exactly as
//! an operator would, and checked with curl and openssl against Pebble's root.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use autohttps_tests::stack::{Stack, wait_until};
use serde_json::json;

fn stack(name: &str) -> (Stack, tempfile::TempDir) {
    Stack::start_in_temp_dir(&format!("e2e-{name}"))
        .unwrap_or_else(|e| panic!("the stack starts: {e:#}"))
}

/// Waits until `host` answers 200 over HTTPS with a certificate that verifies against
/// Pebble's root; returns how long that took.
fn wait_served(stack: &Stack, host: &str) -> Duration {
    wait_served_with(stack, host, &[200])
}

/// Waits until `host` answers over HTTPS, with one of `statuses`, with a certificate that
/// verifies against Pebble's root (curl refuses any other); returns how long that took.
fn wait_served_with(stack: &Stack, host: &str, statuses: &[u16]) -> Duration {
    let start = Instant::now();
    wait_until(
        &format!("HTTPS for {host}"),
        Duration::from_secs(60),
        || {
            stack
                .https(host, "/")
                .ok()
                .filter(|r| statuses.contains(&r.status))
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e:#}\nsidecar log tail:\n{}",
            tail(&stack.sidecar_logs(), 30)
        )
    });
    start.elapsed()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

#[test]
fn names_served_by_sni_and_a_new_subdomain_goes_live_without_restart() {
    let (stack, _dir) = stack("sni");

    // Time from site creation to the first verified handshake, over a few sites.
    let mut first_handshake = Vec::new();
    for i in 1..=5 {
        let primary = format!("site{i}.e2e.test");
        let start = Instant::now();
        stack
            .cli_ok(&["site", "add", &format!("site{i}"), &primary])
            .expect("site add");
        wait_served(&stack, &primary);
        first_handshake.push(start.elapsed());
    }
    println!(
        "site creation → first verified handshake through Envoy: median {:?} (all: {first_handshake:?})",
        median(first_handshake.clone())
    );

    // A site with two names: each handshake, with its own SNI, verifies against Pebble's root.
    stack
        .cli_ok(&[
            "site",
            "add",
            "shop",
            "shop.e2e.test",
            "--host",
            "www.shop.e2e.test",
            "--wait",
        ])
        .expect("site add --wait");
    for host in ["shop.e2e.test", "www.shop.e2e.test"] {
        wait_served(&stack, host);
        let cert = stack.presented_certificate(Some(host)).expect("handshake");
        let mut names = cert.names.clone();
        names.sort();
        assert_eq!(names, vec!["shop.e2e.test", "www.shop.e2e.test"]);
    }
    let envoy_uptime_before = stack
        .envoy()
        .stat("server.uptime")
        .expect("stats")
        .unwrap_or(0);

    // Adding a subdomain: the old names keep answering throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let prober = {
        let (stop, ok, failed) = (Arc::clone(&stop), Arc::clone(&ok), Arc::clone(&failed));
        let ca = stack.ca_root.clone();
        let port = stack.ports.https;
        std::thread::spawn(move || {
            let ca = ca.display().to_string();
            while !stop.load(Ordering::Relaxed) {
                for host in ["shop.e2e.test", "www.shop.e2e.test"] {
                    let url = format!("https://{host}:{port}/");
                    let resolve = format!("{host}:{port}:127.0.0.1");
                    match autohttps_tests::envoy::curl(&[
                        "--cacert",
                        &ca,
                        "--resolve",
                        &resolve,
                        &url,
                    ]) {
                        Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            }
        })
    };
    let added = Instant::now();
    stack
        .cli_ok(&["host", "add", "shop", "blog.shop.e2e.test"])
        .expect("host add");
    wait_served(&stack, "blog.shop.e2e.test");
    println!(
        "subdomain added → served through Envoy: {:?}",
        added.elapsed()
    );
    // Keep probing a moment after the switch, then stop.
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    prober.join().expect("prober");
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "old names failed during the change"
    );
    assert!(
        ok.load(Ordering::Relaxed) >= 4,
        "too few probes: {}",
        ok.load(Ordering::Relaxed)
    );

    let cert = stack
        .presented_certificate(Some("www.shop.e2e.test"))
        .expect("handshake");
    let mut names = cert.names;
    names.sort();
    assert_eq!(
        names,
        vec!["blog.shop.e2e.test", "shop.e2e.test", "www.shop.e2e.test"]
    );
    // The same Envoy process served all of it.
    let envoy_uptime_after = stack
        .envoy()
        .stat("server.uptime")
        .expect("stats")
        .unwrap_or(0);
    assert!(envoy_uptime_after >= envoy_uptime_before);
}

#[test]
fn a_name_whose_dns_points_elsewhere_is_left_out_and_explained() {
    let (stack, _dir) = stack("dns");
    stack
        .set_dns("away.mix.e2e.test", "127.0.0.2")
        .expect("mock DNS");
    stack
        .cli_ok(&[
            "site",
            "add",
            "mix",
            "mix.e2e.test",
            "--host",
            "away.mix.e2e.test",
        ])
        .expect("site add");
    wait_served(&stack, "mix.e2e.test");
    let cert = stack
        .presented_certificate(Some("mix.e2e.test"))
        .expect("handshake");
    assert_eq!(
        cert.names,
        vec!["mix.e2e.test"],
        "the away name must not be ordered"
    );

    // Its handshake fails, while the site's other name works.
    let away = stack.presented_certificate(Some("away.mix.e2e.test"));
    assert!(
        away.is_err(),
        "a certificate was presented for the away name: {away:?}"
    );
    assert!(stack.https("away.mix.e2e.test", "/").is_err());
    assert_eq!(stack.https("mix.e2e.test", "/").expect("https").status, 200);

    // diagnose names the problem and the fix.
    let output = stack
        .cli_ok(&["--json", "diagnose", "away.mix.e2e.test"])
        .expect("diagnose");
    let report: serde_json::Value = serde_json::from_str(&output).expect("JSON");
    assert_eq!(report["verdict"], "dns-not-pointing", "{report:#}");
    let human = stack
        .cli_ok(&["diagnose", "away.mix.e2e.test"])
        .expect("diagnose");
    assert!(human.contains("127.0.0.2"), "{human}");
}

#[test]
fn policies_are_enforced_by_envoy_and_follow_changes() {
    let (stack, _dir) = stack("policy");
    let (status, body) = stack
        .admin(
            "POST",
            "/v1/sites",
            Some(&json!({
                "name": "forced",
                "primary": "force.e2e.test",
                "https": "force",
                "hsts": { "enabled": true, "max_age": 600 },
                "mixed_content": "upgrade"
            })),
        )
        .expect("create site");
    assert!(status == 201 || status == 200, "{status} {body}");
    stack
        .cli_ok(&["site", "add", "off", "off.e2e.test", "--https", "disable"])
        .expect("site add");
    wait_served(&stack, "force.e2e.test");
    // A `disable` site answers HTTPS with its redirect to HTTP as soon as the filter has the
    // policy (a new VM asks the feed at once), which may come before its certificate: any
    // answer over a verified handshake shows the certificate is served.
    wait_served_with(&stack, "off.e2e.test", &[200, 301]);

    // force: http → https with path and query, once the filter's policy says the certificate
    // is ready.
    let expected = format!(
        "https://force.e2e.test:{}/a/b?x=1&y=%20z",
        stack.ports.https
    );
    let redirect = wait_until("the force redirect", Duration::from_secs(20), || {
        stack
            .http("force.e2e.test", "/a/b?x=1&y=%20z")
            .ok()
            .filter(|r| r.status == 301)
    })
    .expect("force redirect");
    assert_eq!(redirect.header("location"), Some(expected.as_str()));
    // The ACME challenge path is never redirected: it reaches the sidecar's responder.
    let challenge = stack
        .http(
            "force.e2e.test",
            "/.well-known/acme-challenge/unknown-token",
        )
        .expect("challenge path");
    assert_ne!(challenge.status, 301, "{challenge:?}");
    assert_eq!(challenge.status, 404, "{challenge:?}");
    // HSTS and the mixed-content upgrade over HTTPS.
    let page = stack.https("force.e2e.test", "/").expect("https");
    assert_eq!(page.status, 200);
    assert_eq!(page.all("strict-transport-security"), vec!["max-age=600"]);
    assert_eq!(
        page.all("content-security-policy"),
        vec!["upgrade-insecure-requests"]
    );

    // disable: https → http with max-age=0.
    let expected = format!("http://off.e2e.test:{}/p?q=1", stack.ports.http);
    let down = wait_until("the disable redirect", Duration::from_secs(20), || {
        stack
            .https("off.e2e.test", "/p?q=1")
            .ok()
            .filter(|r| r.status == 301)
    })
    .expect("disable redirect");
    assert_eq!(down.header("location"), Some(expected.as_str()));
    assert_eq!(down.all("strict-transport-security"), vec!["max-age=0"]);
    assert_eq!(stack.http("off.e2e.test", "/").expect("http").status, 200);

    // A client without SNI gets the default certificate, not a site's.
    let default = stack.presented_certificate(None).expect("no-SNI handshake");
    assert!(
        !default.names.iter().any(|n| n.ends_with("e2e.test")),
        "{default:?}"
    );

    // report mode: the page carries a report-only policy whose reports reach the sidecar
    // through Envoy, filed under the site and page. The report is sent by curl to the page's
    // report-uri (with the site's token), standing in for the browser; tests/tests/csp_reports.rs
    // has a real browser send it.
    let (status, body) = stack
        .admin(
            "POST",
            "/v1/sites",
            Some(&json!({
                "name": "reported",
                "primary": "report.e2e.test",
                "mixed_content": "report"
            })),
        )
        .expect("create site");
    assert!((200..300).contains(&status), "{status} {body}");
    wait_served(&stack, "report.e2e.test");
    let (page, policy, report_uri) = stack
        .report_only_page("report.e2e.test", "/shop?item=1", Duration::from_secs(20))
        .expect("report-only CSP");
    assert!(
        report_uri.starts_with("/.well-known/autohttps/csp-report?site=reported&token="),
        "{policy}"
    );
    assert!(
        page.body.contains("http://report.e2e.test/logo.png"),
        "{}",
        page.body
    );
    let report = json!({"csp-report": {
        "document-uri": format!("https://report.e2e.test:{}/shop?item=1", stack.ports.https),
        "blocked-uri": "http://report.e2e.test/logo.png",
        "effective-directive": "img-src",
        "violated-directive": "img-src"
    }})
    .to_string();
    let url = format!("https://report.e2e.test:{}{report_uri}", stack.ports.https);
    let resolve = format!("report.e2e.test:{}:127.0.0.1", stack.ports.https);
    let ca = stack.ca_root.display().to_string();
    let sent = autohttps_tests::envoy::curl(&[
        "--cacert",
        &ca,
        "--resolve",
        &resolve,
        "-H",
        "content-type: application/csp-report",
        "--data",
        &report,
        &url,
    ])
    .expect("report sent");
    assert_eq!(sent.status, 204, "{sent:?}");
    let (status, findings) = stack
        .admin("GET", "/v1/sites/reported/mixed-content", None)
        .expect("findings");
    assert_eq!(status, 200);
    assert_eq!(
        findings[0]["page"],
        format!("https://report.e2e.test:{}/shop", stack.ports.https)
    );
    assert_eq!(findings[0]["resource"], "http://report.e2e.test/logo.png");
    let listing = stack
        .cli_ok(&["site", "mixed-content", "reported"])
        .expect("site mixed-content");
    assert!(
        listing.contains("http://report.e2e.test/logo.png"),
        "{listing}"
    );

    // A policy change reaches Envoy without a restart: time it both ways.
    let changed = Instant::now();
    stack
        .cli_ok(&["site", "https", "forced", "auto"])
        .expect("site https auto");
    wait_until("auto to take effect", Duration::from_secs(20), || {
        stack
            .http("force.e2e.test", "/")
            .ok()
            .filter(|r| r.status == 200)
    })
    .expect("auto");
    let to_auto = changed.elapsed();
    let changed = Instant::now();
    stack
        .cli_ok(&["site", "https", "forced", "force"])
        .expect("site https force");
    wait_until("force to take effect", Duration::from_secs(20), || {
        stack
            .http("force.e2e.test", "/")
            .ok()
            .filter(|r| r.status == 301)
    })
    .expect("force");
    println!(
        "policy change → enforced by Envoy: force→auto {to_auto:?}, auto→force {:?}",
        changed.elapsed()
    );
}

#[test]
fn envoy_keeps_serving_while_the_sidecar_is_down_and_gets_updates_after() {
    let (mut stack, _dir) = stack("outage");
    stack
        .cli_ok(&["site", "add", "keep", "keep.e2e.test", "--https", "force"])
        .expect("site add");
    wait_served(&stack, "keep.e2e.test");
    wait_until("force to apply", Duration::from_secs(20), || {
        stack
            .http("keep.e2e.test", "/")
            .ok()
            .filter(|r| r.status == 301)
    })
    .expect("force");

    stack.kill_sidecar();
    let outage = Instant::now();
    let mut served = 0;
    while outage.elapsed() < Duration::from_secs(3) {
        let page = stack
            .https("keep.e2e.test", "/")
            .expect("HTTPS during the outage");
        assert_eq!(page.status, 200);
        let redirect = stack
            .http("keep.e2e.test", "/x")
            .expect("HTTP during the outage");
        assert_eq!(redirect.status, 301, "the last good policy is kept");
        served += 1;
    }
    assert!(served >= 3);

    stack.start_sidecar().expect("sidecar restarts");
    stack
        .cli_ok(&["host", "add", "keep", "new.keep.e2e.test"])
        .expect("host add after restart");
    wait_served(&stack, "new.keep.e2e.test");
    assert_eq!(
        stack.https("keep.e2e.test", "/").expect("https").status,
        200
    );
}
