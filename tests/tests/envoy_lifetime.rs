//! How long the harness lets Envoy live: a test's Envoy stops by itself after its limit (so a
//! dead test leaves nothing behind), while `make run`'s lives until stopped (it used to be
//! killed after 15 minutes, leaving the rest of the stack without its edge), and its log is
//! in the folder it was given, where the `make run` banner points.

use std::time::Duration;

use autohttps_tests::envoy::{Envoy, Lifetime, free_port, http_get};

fn minimal_config(admin: u16, http: u16) -> String {
    format!(
        r#"
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}
static_resources:
  listeners:
  - address: {{ socket_address: {{ address: 127.0.0.1, port_value: {http} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: http
          route_config: {{ virtual_hosts: [ {{ name: all, domains: ["*"], routes: [ {{ match: {{ prefix: "/" }}, direct_response: {{ status: 200 }} }} ] }} ] }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
"#
    )
}

fn ready(admin: u16) -> bool {
    http_get(admin, "/ready").is_ok_and(|(status, _)| status == 200)
}

#[test]
fn an_envoy_until_stopped_outlives_a_limited_one_and_logs_where_told() {
    let limit = Duration::from_secs(2);
    let (limited_admin, until_stopped_admin) =
        (free_port().expect("port"), free_port().expect("port"));
    let started = std::time::Instant::now();
    // On a slow machine it may be stopped before it is ready: either way it stops by itself.
    let limited = Envoy::start_in(
        &minimal_config(limited_admin, free_port().expect("port")),
        limited_admin,
        None,
        Lifetime::Limited(limit),
    )
    .ok();
    let dir = tempfile::tempdir().expect("tempdir");
    let until_stopped = Envoy::start_in(
        &minimal_config(until_stopped_admin, free_port().expect("port")),
        until_stopped_admin,
        Some(dir.path()),
        Lifetime::UntilStopped,
    )
    .expect("the unlimited Envoy starts");
    assert_eq!(until_stopped.log_path(), dir.path().join("envoy.log"));
    assert!(
        std::fs::metadata(dir.path().join("envoy.log")).is_ok_and(|m| m.len() > 0),
        "Envoy's log is in the folder it was given"
    );

    // `timeout` sends TERM at the limit and KILL 5 s later.
    std::thread::sleep((limit + Duration::from_secs(6)).saturating_sub(started.elapsed()));
    assert!(!ready(limited_admin), "the limited Envoy stopped by itself");
    assert!(
        ready(until_stopped_admin),
        "the unlimited Envoy still serves"
    );
    drop(limited);
    drop(until_stopped);
    assert!(!ready(until_stopped_admin), "dropping it stops it");
}
