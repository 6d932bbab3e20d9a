//! `autohttps serve`'s log, from the real binary: a failing issuance attempt is a WARN line
//! naming the site and its names; `log.format = "json"` (or `--log-format json`) writes one
//! JSON object per line; output that is not a terminal carries no ANSI colour.

mod support;

use std::path::Path;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use support::{Admin, SidecarProcess, TOKEN, eventually};

/// A configuration whose CA never answers (a closed port), so every attempt fails.
fn write_config(dir: &Path, format: &str) -> anyhow::Result<std::path::PathBuf> {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let path = dir.join("autohttps.toml");
    std::fs::write(
        &path,
        format!(
            r#"data_dir = {data:?}
[listen]
admin = "127.0.0.1:0"
internal = "127.0.0.1:0"
metrics = "127.0.0.1:0"
[admin]
token = "{TOKEN}"
[acme]
directory_url = "https://{closed}/dir"
debounce_ms = 50
[dns]
nameservers = ["127.0.0.1:9"]
[log]
format = "{format}"
"#,
            data = dir.join("data").display().to_string(),
        ),
    )?;
    Ok(path)
}

fn log_text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The admin address from the "serving" line, once it is there.
async fn admin_of(log: &Path, json: bool) -> anyhow::Result<Admin> {
    let mut address = None;
    eventually("the serving line", Duration::from_secs(20), async || {
        address = log_text(log)
            .lines()
            .find(|line| line.contains("autohttps sidecar serving"))
            .and_then(|line| {
                if json {
                    let event: Value = serde_json::from_str(line).ok()?;
                    event["fields"]["admin_addr"].as_str().map(str::to_owned)
                } else {
                    let rest = line.split("admin_addr=").nth(1)?;
                    rest.split_whitespace().next().map(str::to_owned)
                }
            });
        address.is_some()
    })
    .await?;
    Ok(Admin::new(&format!(
        "http://{}",
        address.unwrap_or_default()
    )))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_names_the_failing_site_and_its_names_at_warn() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = write_config(dir.path(), "json")?;
    let log = dir.path().join("serve.log");
    let _serve = SidecarProcess::spawn(&config, &log)?;
    let admin = admin_of(&log, true).await?;
    let (code, body) = admin
        .call(
            Method::POST,
            "/v1/sites",
            Some(json!({ "name": "demo", "primary": "demo.example.com", "hostnames": ["www.demo.example.com"] })),
        )
        .await?;
    assert_eq!(code, 201, "{body}");
    let mut failure = None;
    eventually(
        "a WARN line for the failed attempt",
        // The ACME client retries a CA that refuses connections for about 12 s (more on a
        // busy machine) before the attempt fails.
        Duration::from_secs(120),
        async || {
            failure = log_text(&log)
                .lines()
                .filter_map(|line| serde_json::from_str::<Value>(line).ok())
                .find(|event| event["fields"]["message"] == "issuance attempt failed");
            failure.is_some()
        },
    )
    .await?;
    let failure = failure.unwrap_or_default();
    assert_eq!(failure["level"], "WARN", "{failure}");
    assert_eq!(failure["fields"]["site"], "demo", "{failure}");
    let names = failure["fields"]["names"].as_str().unwrap_or_default();
    assert!(
        names.contains("demo.example.com") && names.contains("www.demo.example.com"),
        "{failure}"
    );
    assert!(
        failure["fields"]["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("acme")),
        "{failure}"
    );
    let text = log_text(&log);
    for line in text.lines() {
        assert!(
            serde_json::from_str::<Value>(line).is_ok(),
            "not a JSON line: {line}"
        );
    }
    assert!(
        !text.contains('\u{1b}'),
        "ANSI escape in a log that is not a terminal"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_flag_overrides_the_config_and_text_has_no_colour_off_a_terminal() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let config = write_config(dir.path(), "json")?;
    let log = dir.path().join("serve.log");
    let _serve = SidecarProcess::spawn_with(&config, &log, &["--log-format", "TEXT"])?;
    let _admin = admin_of(&log, false).await?;
    let text = log_text(&log);
    assert!(
        text.lines()
            .all(|line| serde_json::from_str::<Value>(line).is_err()),
        "{text}"
    );
    assert!(text.contains(" INFO "), "{text}");
    assert!(
        !text.contains('\u{1b}'),
        "ANSI escape in a log that is not a terminal: {text:?}"
    );
    Ok(())
}
