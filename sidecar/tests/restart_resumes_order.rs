//! Killing the real `autohttps serve` process (SIGKILL) mid-order and restarting it completes the
//! same order: exactly one order is created at the CA.

mod support;

use std::time::Duration;

use reqwest::Method;
use serde_json::json;
use support::{Admin, Gate, Pebble, SidecarProcess, certificate_names, eventually, free_port};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_sidecar_resumes_its_order_without_a_second_one() -> anyhow::Result<()> {
    let gate_port = free_port();
    let internal_port = free_port();
    let admin_port = free_port();
    let pebble = Pebble::start_on(gate_port).await?;
    // Pebble's HTTP-01 requests go through a gate that holds them until we let them pass.
    let gate = Gate::start(gate_port, internal_port).await?;
    let work = tempfile::tempdir()?;
    let config = work.path().join("autohttps.toml");
    std::fs::write(
        &config,
        pebble.sidecar_toml(&work.path().join("data"), admin_port, internal_port),
    )?;
    let log = work.path().join("sidecar.log");
    let admin = Admin::new(&format!("http://127.0.0.1:{admin_port}"));
    let healthy = async || {
        admin
            .call(Method::GET, "/healthz", None)
            .await
            .is_ok_and(|(code, _)| code == 200)
    };

    let mut first = SidecarProcess::spawn(&config, &log)?;
    eventually("first sidecar healthy", Duration::from_secs(20), healthy).await?;
    let (code, body) = admin
        .call(Method::POST, "/v1/sites", Some(json!({ "name": "resume", "primary": "resume.example.test", "hostnames": ["www.resume.example.test"] })))
        .await?;
    assert_eq!(code, 201, "{body}");

    // Mid-order: the order exists at the CA and Pebble is validating (its requests are held).
    let dump = || std::fs::read_to_string(&log).unwrap_or_default();
    eventually(
        "Pebble's HTTP-01 requests",
        Duration::from_secs(30),
        async || gate.held_paths().len() == 2,
    )
    .await
    .map_err(|e| {
        e.context(format!(
            "held {:?}; sidecar log:\n{}",
            gate.held_paths(),
            dump()
        ))
    })?;
    first.kill();

    let mut second = SidecarProcess::spawn(&config, &log)?;
    eventually("second sidecar healthy", Duration::from_secs(20), healthy).await?;
    // Let the held validations through once the new process answers their tokens again.
    let paths = gate.held_paths();
    let internal = reqwest::Client::builder().no_proxy().build()?;
    eventually(
        "restarted sidecar answering the held tokens",
        Duration::from_secs(30),
        async || {
            let mut all = true;
            for path in &paths {
                let url = format!("http://127.0.0.1:{internal_port}{path}");
                all &= internal
                    .get(&url)
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200);
            }
            all
        },
    )
    .await?;
    gate.open();

    let status = admin
        .wait_for("resume", Duration::from_secs(60), |s| {
            !certificate_names(s).is_empty()
        })
        .await?;
    assert_eq!(
        certificate_names(&status),
        vec![vec!["resume.example.test", "www.resume.example.test"]]
    );
    let events = admin.events("resume").await?;
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["kind"].as_str()).collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "order-created").count(),
        1,
        "{kinds:?}"
    );
    assert!(kinds.contains(&"order-resumed"), "{kinds:?}");
    assert_eq!(
        kinds.iter().filter(|k| **k == "certificate-issued").count(),
        1,
        "{kinds:?}"
    );
    assert!(
        status["orders_in_flight"]
            .as_array()
            .is_some_and(Vec::is_empty)
    );
    second.kill();
    Ok(())
}
