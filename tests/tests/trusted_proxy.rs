//! Behind a real TLS-terminating proxy: nginx on 127.0.0.5 in front of the whole stack (the
//! sidecar, Pebble, Envoy with `envoy/edge.yaml` and the release filter), trusted through one
//! list (the sidecar's `edge.trusted_proxies`, and Envoy's trusted-proxy filter chains rendered
//! from it), and an attacker on 127.0.0.6 that reaches Envoy directly and forges
//! `X-Forwarded-For`, `X-Forwarded-Proto` and `Forwarded`.
//!
//! What must hold: the proxy's HTTPS traffic to a force site is served (no redirect loop), its
//! plain HTTP to a force site is redirected, and the attacker's forged headers change nothing,
//! over HTTP and over TLS, for force and disable sites: every forged request is answered as
//! the same request without the forged headers.

use std::time::Duration;

use autohttps_tests::envoy::{CurlResponse, curl};
use autohttps_tests::stack::{FrontProxy, Stack, wait_until};

/// The TLS-terminating proxy's loopback address (trusted).
const PROXY: &str = "127.0.0.5";
/// The attacker's loopback address (not trusted), connecting to Envoy directly.
const ATTACKER: &str = "127.0.0.6";
/// A site in force mode.
const FORCE: &str = "shop.rt.test";
/// A site in disable mode.
const DISABLE: &str = "plain.rt.test";

/// Header sets an attacker sends to pass as the trusted proxy, claiming `proto`.
fn forgeries(proto: &str) -> Vec<Vec<String>> {
    vec![
        vec![
            format!("X-Forwarded-For: {PROXY}"),
            format!("X-Forwarded-Proto: {proto}"),
        ],
        vec![
            format!("X-Forwarded-For: 203.0.113.9, {PROXY}"),
            format!("X-Forwarded-Proto: {proto}"),
        ],
        vec![format!("Forwarded: for={PROXY};proto={proto}")],
        vec![
            format!("Forwarded: for={PROXY};proto={proto}"),
            format!("X-Forwarded-For: {PROXY}"),
            format!("X-Forwarded-Proto: {proto}"),
            format!("X-Real-IP: {PROXY}"),
        ],
    ]
}

/// What a response says about the decision: status and `Location`.
fn verdict(response: &CurlResponse) -> (u16, Option<String>) {
    (
        response.status,
        response.header("location").map(str::to_string),
    )
}

/// A GET through the proxy (TLS or plain), from the default loopback client.
fn via_proxy(proxy: &FrontProxy, tls: bool, host: &str, headers: &[String]) -> CurlResponse {
    let (scheme, port) = if tls {
        ("https", proxy.https_port)
    } else {
        ("http", proxy.http_port)
    };
    let resolve = format!("{host}:{port}:{}", proxy.address);
    let url = format!("{scheme}://{host}:{port}/x?y");
    let mut args = vec!["-k", "--resolve", &resolve];
    for header in headers {
        args.extend(["-H", header]);
    }
    args.push(&url);
    curl(&args).unwrap_or_else(|e| panic!("{e:#}"))
}

/// A GET straight to Envoy from the attacker's address.
fn from_attacker(stack: &Stack, tls: bool, host: &str, headers: &[String]) -> CurlResponse {
    let (scheme, port) = if tls {
        ("https", stack.ports.https)
    } else {
        ("http", stack.ports.http)
    };
    let resolve = format!("{host}:{port}:127.0.0.1");
    let url = format!("{scheme}://{host}:{port}/x?y");
    let ca = stack.ca_root.display().to_string();
    let mut args = vec![
        "--interface",
        ATTACKER,
        "--cacert",
        &ca,
        "--resolve",
        &resolve,
    ];
    for header in headers {
        args.extend(["-H", header]);
    }
    args.push(&url);
    curl(&args).unwrap_or_else(|e| panic!("{e:#}"))
}

#[test]
fn behind_a_real_proxy_no_loop_and_no_spoofing() {
    let (stack, dir) =
        Stack::start_in_temp_dir_behind("trusted-proxy", &[PROXY]).expect("the stack starts");
    stack
        .cli_ok(&["site", "add", "shop", FORCE, "--https", "force", "--wait"])
        .expect("force site issued");
    stack
        .cli_ok(&[
            "site", "add", "plain", DISABLE, "--https", "disable", "--wait",
        ])
        .expect("disable site issued");
    let proxy =
        FrontProxy::start(dir.path(), PROXY, stack.ports.http, &[FORCE, DISABLE]).expect("nginx");
    // Envoy serves both certificates (over SDS) before anyone talks TLS to it.
    for host in [FORCE, DISABLE] {
        wait_until(
            &format!("HTTPS for {host}"),
            Duration::from_secs(20),
            || stack.https(host, "/").ok(),
        )
        .expect("certificate served");
    }

    // The policy reaches the filter within about a second of the sites being saved.
    wait_until("the force policy in Envoy", Duration::from_secs(20), || {
        let response = via_proxy(&proxy, false, FORCE, &[]);
        (response.status == 301).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", stack.sidecar_logs()));
    wait_until(
        "the disable policy in Envoy",
        Duration::from_secs(20),
        || {
            let response = via_proxy(&proxy, true, DISABLE, &[]);
            (response.status == 301).then_some(())
        },
    )
    .expect("disable policy applied");

    // The proxy: HTTPS to a force site is served by the backend, not redirected (no loop).
    let served = via_proxy(&proxy, true, FORCE, &[]);
    assert_eq!(verdict(&served), (200, None), "{served:?}");
    assert!(
        served.body.contains(&format!("Hello from {FORCE}")),
        "{served:?}"
    );
    // Its plain HTTP to a force site is redirected to HTTPS, path and query kept.
    let redirected = via_proxy(&proxy, false, FORCE, &[]);
    assert_eq!(redirected.status, 301, "{redirected:?}");
    assert_eq!(
        redirected.header("location"),
        Some(format!("https://{FORCE}:{}/x?y", stack.ports.https).as_str())
    );
    // A disable site: HTTPS through the proxy goes to HTTP, with HSTS cleared; HTTP is served.
    let to_http = via_proxy(&proxy, true, DISABLE, &[]);
    assert_eq!(to_http.status, 301, "{to_http:?}");
    assert_eq!(
        to_http.header("location"),
        Some(format!("http://{DISABLE}:{}/x?y", stack.ports.http).as_str())
    );
    assert_eq!(
        to_http.header("strict-transport-security"),
        Some("max-age=0")
    );
    assert_eq!(
        verdict(&via_proxy(&proxy, false, DISABLE, &[])),
        (200, None)
    );
    // A client of the proxy cannot forge the scheme either: nginx replaces X-Forwarded-Proto.
    let forged_through_proxy = via_proxy(
        &proxy,
        false,
        FORCE,
        &["X-Forwarded-Proto: https".to_string()],
    );
    assert_eq!(forged_through_proxy.status, 301, "{forged_through_proxy:?}");

    // A trusted proxy that re-encrypts to Envoy's TLS listener (its trusted filter chain,
    // certificates over SDS as for any client) is believed when it says the client used HTTP.
    let ca = stack.ca_root.display().to_string();
    let resolve = format!("{FORCE}:{}:127.0.0.1", stack.ports.https);
    let url = format!("https://{FORCE}:{}/x?y", stack.ports.https);
    let reencrypted = curl(&[
        "--interface",
        PROXY,
        "--cacert",
        &ca,
        "--resolve",
        &resolve,
        "-H",
        "X-Forwarded-Proto: http",
        "-H",
        "X-Forwarded-For: 203.0.113.9",
        &url,
    ])
    .expect("curl");
    assert_eq!(reencrypted.status, 301, "{reencrypted:?}");

    // The attacker: every forgery is answered as the plain request from the same address.
    let mut checked = 0;
    for (tls, host, claimed, expected_status) in [
        (false, FORCE, "https", 301),
        (false, DISABLE, "https", 200),
        (true, FORCE, "http", 200),
        (true, DISABLE, "http", 301),
        (true, DISABLE, "https", 301),
    ] {
        let honest = verdict(&from_attacker(&stack, tls, host, &[]));
        assert_eq!(honest.0, expected_status, "{host} tls={tls}: {honest:?}");
        for forged in forgeries(claimed) {
            let got = verdict(&from_attacker(&stack, tls, host, &forged));
            assert_eq!(
                got,
                honest,
                "{host} over {} with {forged:?} was answered differently",
                if tls { "TLS" } else { "HTTP" }
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 20);
    println!(
        "trusted proxy {PROXY}: HTTPS served, HTTP redirected; attacker {ATTACKER}: {checked} forged requests answered as honest ones"
    );
}
