//! The shipped edge (`envoy/edge.yaml`, real Envoy, the release filter, the sidecar binary,
//! Pebble) as Prometheus scrapes it: the filter's counters are one counter per kind with a
//! label, and serving certificates by SNI creates no stats per hostname (no metric family per
//! domain, nothing that grows with sites).

use std::time::Duration;

use autohttps_tests::envoy::http_get;
use autohttps_tests::stack::{Stack, wait_until};
use prometheus_parse::{Sample, Scrape, Value};

const SITES: [&str; 2] = ["stats1.edge-stats.test", "stats2.edge-stats.test"];

fn value<'a>(scrape: &'a Scrape, metric: &str, label: Option<(&str, &str)>) -> &'a Sample {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == metric && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
        .unwrap_or_else(|| {
            let ours: Vec<_> = scrape
                .samples
                .iter()
                .filter(|s| s.metric.starts_with("autohttps"))
                .collect();
            panic!("no {metric} {label:?} in {ours:#?}")
        })
}

#[test]
fn filter_counters_carry_labels_and_hostnames_make_no_stats() {
    let (stack, _dir) = Stack::start_in_temp_dir("edge-stats")
        .unwrap_or_else(|e| panic!("the stack starts: {e:#}"));
    for (n, primary) in SITES.iter().enumerate() {
        stack
            .cli_ok(&[
                "site",
                "add",
                &format!("stats{n}"),
                primary,
                "--https",
                "force",
            ])
            .expect("site add");
        wait_until(primary, Duration::from_secs(60), || {
            stack.https(primary, "/").ok().filter(|r| r.status == 200)
        })
        .expect("served over HTTPS");
        wait_until("the redirect", Duration::from_secs(10), || {
            stack
                .http(primary, "/page")
                .ok()
                .filter(|r| r.status == 301)
        })
        .expect("HTTP redirected");
    }

    let (status, text) = http_get(stack.ports.envoy_admin, "/stats/prometheus").expect("stats");
    assert_eq!(status, 200);
    // Envoy writes unlabelled samples as `name{} 2`, valid text format that prometheus-parse
    // skips: drop the empty braces first.
    let scrape =
        Scrape::parse(text.lines().map(|l| Ok(l.replacen("{} ", " ", 1)))).expect("parses");

    let redirects = value(
        &scrape,
        "autohttps_requests_total",
        Some(("outcome", "redirect_to_https")),
    );
    let Value::Counter(redirects) = redirects.value else {
        panic!("not a counter: {redirects:?}");
    };
    assert!(redirects >= 2.0, "{redirects}");
    let challenges = value(
        &scrape,
        "autohttps_requests_total",
        Some(("outcome", "acme_challenge")),
    );
    assert!(
        matches!(challenges.value, Value::Counter(n) if n >= 2.0),
        "{challenges:?}"
    );
    let applied = value(
        &scrape,
        "autohttps_policy_updates_total",
        Some(("result", "applied")),
    );
    assert!(
        matches!(applied.value, Value::Counter(n) if n >= 1.0),
        "{applied:?}"
    );
    assert!(matches!(
        value(
            &scrape,
            "autohttps_headers_added_total",
            Some(("header", "hsts"))
        )
        .value,
        Value::Counter(_)
    ));
    assert!(matches!(
        value(&scrape, "autohttps_policy_sites", None).value,
        Value::Gauge(n) if n >= 2.0
    ));
    // The old one-name-per-outcome families are gone.
    assert!(
        !scrape
            .samples
            .iter()
            .any(|s| s.metric == "autohttps_redirect_to_https"),
    );

    // Nothing per hostname: no family named after a domain, no hostname in a label.
    for sample in &scrape.samples {
        assert!(
            !sample.metric.contains("edge_stats") && !sample.metric.starts_with("envoy_sds_"),
            "a per-hostname family: {}",
            sample.metric
        );
        assert!(
            !sample
                .labels
                .values()
                .any(|v| v.contains("stats1") || v.contains("stats2")),
            "a hostname in a label: {sample:?}"
        );
    }
    let (_, plain) = http_get(stack.ports.envoy_admin, "/stats").expect("stats");
    let per_name: Vec<&str> = plain
        .lines()
        .filter(|l| l.starts_with("sds.") || l.contains("edge-stats.test"))
        .collect();
    assert!(
        per_name.is_empty(),
        "per-hostname stats were created:\n{}",
        per_name.join("\n")
    );
    // The SDS connection's own health is still there.
    assert!(plain.contains("cluster.sidecar_sds.upstream_cx_active"));
    println!(
        "{} samples from Envoy; autohttps_requests_total{{outcome=\"redirect_to_https\"}} = {redirects}",
        scrape.samples.len()
    );
}
