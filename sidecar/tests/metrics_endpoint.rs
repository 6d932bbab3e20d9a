//! The operations listener against real issuance (Pebble): `/metrics` scraped over HTTP with
//! no token and parsed by a Prometheus text parser (names, types, labels, values that match
//! the store); `/readyz` failing with the reason while the store is locked by another process
//! and while the SDS socket is gone, ready again after.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use autohttps_sidecar::clock::SystemClock;
use autohttps_sidecar::metrics::{MetricsConfig, render};
use autohttps_sidecar::sds::SdsListen;
use prometheus_parse::{Sample, Scrape, Value};
use reqwest::Method;
use serde_json::json;
use support::{Pebble, certificate_names, eventually, start_sidecar};

fn parse(text: &str) -> anyhow::Result<Scrape> {
    Ok(Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))?)
}

fn labels_of(sample: &Sample) -> HashMap<String, String> {
    sample
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The one sample of `metric` whose labels include `labels`.
fn sample<'a>(scrape: &'a Scrape, metric: &str, labels: &[(&str, &str)]) -> &'a Sample {
    let found: Vec<&Sample> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{metric}{labels:?}: {found:?} in {:?}",
        scrape.samples.iter().map(|s| &s.metric).collect::<Vec<_>>()
    );
    found[0]
}

fn gauge(sample: &Sample) -> f64 {
    match sample.value {
        Value::Gauge(v) => v,
        ref other => panic!("{} is not a gauge: {other:?}", sample.metric),
    }
}

fn counter(sample: &Sample) -> f64 {
    match sample.value {
        Value::Counter(v) => v,
        ref other => panic!("{} is not a counter: {other:?}", sample.metric),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_scraped_without_a_token_and_parse_with_cert_manager_names()
-> anyhow::Result<()> {
    let pebble = Pebble::start().await?;
    pebble.set_a("gone.example.test", "127.0.0.2").await?;
    let sidecar = start_sidecar(&pebble, Arc::new(SystemClock)).await?;
    let admin = &sidecar.admin;
    for (name, primary) in [("shop", "shop.example.test"), ("gone", "gone.example.test")] {
        let (code, body) = admin
            .call(
                Method::POST,
                "/v1/sites",
                Some(json!({ "name": name, "primary": primary })),
            )
            .await?;
        assert_eq!(code, 201, "{body}");
    }
    let status = admin
        .wait_for("shop", Duration::from_secs(60), |s| {
            !certificate_names(s).is_empty() && !s["working"].as_bool().unwrap_or(true)
        })
        .await?;
    eventually(
        "gone's failed attempt",
        Duration::from_secs(60),
        async || {
            admin
                .events("gone")
                .await
                .is_ok_and(|events| events.iter().any(|e| e["kind"] == "attempt-failed"))
        },
    )
    .await?;
    let not_after = time::OffsetDateTime::parse(
        status["certificates"][0]["not_after"]
            .as_str()
            .expect("not_after"),
        &time::format_description::well_known::Rfc3339,
    )?;

    let http = reqwest::Client::builder().no_proxy().build()?;
    let url = format!("http://{}/metrics", sidecar.running.metrics_addr);
    let response = http.get(&url).send().await?;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = response.text().await?;
    let scrape = parse(&text)?;

    let build = sample(&scrape, "autohttps_build_info", &[]);
    assert_eq!(gauge(build), 1.0);
    assert_eq!(
        labels_of(build).get("version").map(String::as_str),
        Some(env!("CARGO_PKG_VERSION"))
    );

    let expiration = sample(
        &scrape,
        "autohttps_certificate_expiration_timestamp_seconds",
        &[("site", "shop")],
    );
    assert_eq!(gauge(expiration), not_after.unix_timestamp() as f64);
    let renewal = sample(
        &scrape,
        "autohttps_certificate_renewal_timestamp_seconds",
        &[("site", "shop")],
    );
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() as f64;
    assert!(
        gauge(renewal) > now && gauge(renewal) < gauge(expiration),
        "renewal {} not between now {now} and expiry",
        gauge(renewal)
    );
    for (site, ready) in [("shop", "True"), ("gone", "False")] {
        for condition in ["True", "False", "Unknown"] {
            let value = gauge(sample(
                &scrape,
                "autohttps_certificate_ready_status",
                &[("site", site), ("condition", condition)],
            ));
            assert_eq!(
                value,
                f64::from(u8::from(condition == ready)),
                "{site} {condition}"
            );
        }
    }
    assert_eq!(
        gauge(sample(
            &scrape,
            "autohttps_certificate_ready_sites",
            &[("condition", "True")]
        )),
        1.0
    );
    assert_eq!(
        gauge(sample(
            &scrape,
            "autohttps_certificate_ready_sites",
            &[("condition", "False")]
        )),
        1.0
    );

    // ACME requests by endpoint (Pebble's paths), method and status, counted and timed.
    let directory = sample(
        &scrape,
        "autohttps_acme_client_request_count_total",
        &[("endpoint", "/dir"), ("method", "GET"), ("status", "200")],
    );
    assert!(counter(directory) >= 1.0);
    let new_orders = sample(
        &scrape,
        "autohttps_acme_client_request_count_total",
        &[
            ("endpoint", "/order-plz"),
            ("method", "POST"),
            ("status", "201"),
        ],
    );
    let timed = sample(
        &scrape,
        "autohttps_acme_client_request_duration_seconds",
        &[
            ("endpoint", "/order-plz"),
            ("method", "POST"),
            ("status", "201"),
        ],
    );
    let Value::Histogram(buckets) = &timed.value else {
        panic!("not a histogram: {timed:?}");
    };
    let total = buckets.iter().map(|b| b.count).fold(0.0, f64::max);
    assert_eq!(
        total,
        counter(new_orders),
        "histogram count = request count"
    );
    let endpoints: Vec<String> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == "autohttps_acme_client_request_count_total")
        .map(|s| labels_of(s)["endpoint"].clone())
        .collect();
    assert!(
        endpoints.iter().all(|e| e.len() < 24),
        "an identifier leaked into an endpoint label: {endpoints:?}"
    );

    assert!(counter(sample(&scrape, "autohttps_issuance_attempts_total", &[])) >= 2.0);
    assert_eq!(
        counter(sample(
            &scrape,
            "autohttps_issuance_failures_total",
            &[("reason", "dns")]
        )),
        1.0
    );
    assert!(gauge(sample(&scrape, "process_resident_memory_bytes", &[])) > 1e6);
    assert!(gauge(sample(&scrape, "process_open_fds", &[])) > 3.0);
    assert!(counter(sample(&scrape, "process_cpu_seconds_total", &[])) > 0.0);
    // What clients made the sidecar refuse is on the same scrape (counted, not logged).
    for family in [
        "autohttps_sds_unknown_names_total",
        "autohttps_csp_reports_accepted_total",
    ] {
        assert!(counter(sample(&scrape, family, &[])) >= 0.0, "{family}");
    }
    let started = gauge(sample(&scrape, "process_start_time_seconds", &[]));
    assert!(
        started <= now + 1.0 && started > now - 3600.0,
        "{started} vs {now}"
    );

    // Nothing is labelled by hostname: series grow with sites, never with names.
    for s in &scrape.samples {
        assert!(
            !s.labels.values().any(|v| v.contains("example.test")),
            "a hostname in a label: {s:?}"
        );
    }
    for family in [
        "autohttps_certificate_expiration_timestamp_seconds",
        "autohttps_acme_client_request_count_total",
        "process_cpu_seconds_total",
    ] {
        assert!(scrape.docs.contains_key(family), "no HELP for {family}");
    }

    // per_site = false keeps the aggregates and drops the per-site series.
    // No site's policy entry fails the filter's validation (the store cannot hold one that
    // would); the gauge is there, at 0, and renders the count the feed gives it.
    assert_eq!(
        gauge(sample(&scrape, "autohttps_policy_rejected_sites", &[])),
        0.0
    );
    let aggregate = parse(&render(
        &sidecar.running.issuer,
        &MetricsConfig { per_site: false },
        2,
    )?)?;
    assert_eq!(
        gauge(sample(&aggregate, "autohttps_policy_rejected_sites", &[])),
        2.0
    );
    assert!(
        aggregate
            .samples
            .iter()
            .all(|s| !s.labels.contains_key("site"))
    );
    assert_eq!(
        gauge(sample(
            &aggregate,
            "autohttps_certificate_ready_sites",
            &[("condition", "True")]
        )),
        1.0
    );

    // The admin API still needs its token for everything but /healthz.
    let admin_metrics = http
        .get(format!("http://{}/metrics", sidecar.running.admin_addr))
        .send()
        .await?;
    assert_eq!(admin_metrics.status(), 401);
    println!(
        "{} samples, {} bytes; endpoints {endpoints:?}",
        scrape.samples.len(),
        text.len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_with_the_reason_while_the_store_is_locked_or_sds_is_gone()
-> anyhow::Result<()> {
    let pebble = Pebble::start().await?;
    let sidecar = start_sidecar(&pebble, Arc::new(SystemClock)).await?;
    let http = reqwest::Client::builder().no_proxy().build()?;
    let base = format!("http://{}", sidecar.running.metrics_addr);
    let readyz = async || -> anyhow::Result<(u16, serde_json::Value)> {
        let response = http.get(format!("{base}/readyz")).send().await?;
        Ok((response.status().as_u16(), response.json().await?))
    };
    assert_eq!(readyz().await?, (200, json!({ "status": "ready" })));

    // Another process (a sqlite3 shell, a backup) takes the write lock.
    let database = sidecar.data.path().join("data").join("autohttps.db");
    let holder = rusqlite::Connection::open(&database)?;
    holder.execute_batch("BEGIN EXCLUSIVE; INSERT INTO events (site, at, kind, message) VALUES ('x', 0, 'lock-test', 'held');")?;
    let (code, body) = readyz().await?;
    assert_eq!(code, 503, "{body}");
    let problems = body["problems"].to_string();
    assert!(
        problems.contains("store") && problems.contains("locked"),
        "{body}"
    );
    // Liveness is not readiness: the process is alive.
    let healthz = http.get(format!("{base}/healthz")).send().await?;
    assert_eq!(healthz.status(), 200);
    holder.execute_batch("ROLLBACK;")?;
    drop(holder);
    assert_eq!(readyz().await?.0, 200);

    // The SDS socket disappears (deleted by a tmp cleaner): Envoy could not reconnect.
    let SdsListen::Unix(socket) = sidecar.running.sds_listen.clone() else {
        anyhow::bail!("SDS is not on a Unix socket");
    };
    std::fs::remove_file(&socket)?;
    let (code, body) = readyz().await?;
    assert_eq!(code, 503, "{body}");
    let problems = body["problems"].to_string();
    assert!(
        problems.contains("SDS server") && problems.contains(&socket.display().to_string()),
        "{body}"
    );
    println!("not ready: {body}");
    Ok(())
}
