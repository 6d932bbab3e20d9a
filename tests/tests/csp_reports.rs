//! The CSP report collector under abuse, on the whole stack (Pebble, the sidecar, Envoy with the
//! filter, the demo backend): a flood without the site's token is refused and counted, junk
//! with the token stays under the site's byte budget, a real browser (headless Chromium from
//! Debian) loading a report-mode page files a genuine report that is listed by the API and the
//! CLI, reports for a site not in report mode or over the rate are refused and counted, and
//! 10,000 handshakes with unknown SNI names add only a few lines to the sidecar's log.
//!
//! Clients are told apart by their loopback source address (127.0.0.x), as Envoy sees them.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use autohttps_sidecar::csp_reports::ReportTokens;
use autohttps_tests::stack::{ADMIN_TOKEN, Stack, wait_until};
use serde_json::json;

const SITE: &str = "reported";
const HOST: &str = "report.csp.test";

/// The sidecar's counters, from its `/metrics`.
fn metrics(stack: &Stack) -> HashMap<String, f64> {
    let output = Command::new("curl")
        .args(["-sS", "--noproxy", "*", "-H"])
        .arg(format!("Authorization: Bearer {ADMIN_TOKEN}"))
        .arg(format!(
            "http://127.0.0.1:{}/metrics",
            stack.ports.sidecar_admin
        ))
        .output()
        .expect("curl runs");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.rsplit_once(' '))
        .filter_map(|(name, value)| Some((name.to_string(), value.parse().ok()?)))
        .collect()
}

fn counter(metrics: &HashMap<String, f64>, name: &str) -> f64 {
    metrics.get(name).copied().unwrap_or(0.0)
}

fn refused(metrics: &HashMap<String, f64>, reason: &str) -> f64 {
    counter(
        metrics,
        &format!("autohttps_csp_reports_refused_total{{reason=\"{reason}\"}}"),
    )
}

/// Posts `count` copies of `body` to `path_and_query` on HOST over HTTPS through Envoy, from
/// the loopback address `source`, over one kept-alive connection; returns each status.
fn post_reports(
    stack: &Stack,
    dir: &Path,
    source: &str,
    path_and_query: &str,
    headers: &[&str],
    bodies: &[String],
) -> Vec<u16> {
    let url = format!("https://{HOST}:{}{path_and_query}", stack.ports.https);
    // One block per request, each ended by `next` (options do not carry over, so a header or
    // body is never repeated); curl keeps the connections alive across blocks.
    let mut config = String::new();
    for body in bodies {
        let body_file = dir.join(format!("body-{}.json", fnv_name(body)));
        if !body_file.exists() {
            std::fs::write(&body_file, body).expect("body written");
        }
        let _ = writeln!(
            config,
            "url = \"{url}\"\ndata-binary = \"@{}\"\noutput = \"/dev/null\"\ninterface = \"{source}\"\ncacert = \"{}\"\nresolve = \"{HOST}:{}:127.0.0.1\"\nwrite-out = \"%{{http_code}}\\n\"\nnoproxy = \"*\"\nsilent",
            body_file.display(),
            stack.ca_root.display(),
            stack.ports.https
        );
        for header in headers {
            let _ = writeln!(config, "header = \"{header}\"");
        }
        config.push_str("next\n");
    }
    config.truncate(config.len() - "next\n".len());
    let config_file = dir.join(format!("curl-{source}.conf"));
    std::fs::write(&config_file, config).expect("config written");
    let output = Command::new("curl")
        .args(["-s", "--parallel", "--parallel-max", "4", "-K"])
        .arg(&config_file)
        .output()
        .expect("curl runs");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|code| code.trim().parse().unwrap_or(0))
        .collect()
}

/// A short stable name for a body file.
fn fnv_name(text: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{hash:016x}")
}

fn csp_report(stack: &Stack, page: &str, resource: &str) -> String {
    json!({"csp-report": {
        "document-uri": format!("https://{HOST}:{}{page}", stack.ports.https),
        "blocked-uri": resource,
        "effective-directive": "img-src",
        "violated-directive": "img-src"
    }})
    .to_string()
}

/// The findings the API lists for the site, and the bytes they count against its budget.
fn findings(stack: &Stack) -> (Vec<serde_json::Value>, u64) {
    let (status, body) = stack
        .admin("GET", &format!("/v1/sites/{SITE}/mixed-content"), None)
        .expect("findings");
    assert_eq!(status, 200, "{body}");
    let list = body.as_array().cloned().unwrap_or_default();
    let bytes = list
        .iter()
        .map(|f| {
            let text = |key: &str| f[key].as_str().map_or(0, str::len) as u64;
            autohttps_sidecar::store::finding_bytes("", "", "")
                + text("page")
                + text("resource")
                + text("directive")
        })
        .sum();
    (list, bytes)
}

#[test]
fn csp_reports_resist_abuse_and_a_real_browsers_report_is_filed() {
    let (stack, dir) = Stack::start_in_temp_dir("csp-reports").expect("stack");
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).expect("work dir");
    for (name, primary, mode) in [(SITE, HOST, "report"), ("plain", "plain.csp.test", "off")] {
        let (status, body) = stack
            .admin(
                "POST",
                "/v1/sites",
                Some(&json!({"name": name, "primary": primary, "mixed_content": mode})),
            )
            .expect("create site");
        assert!((200..300).contains(&status), "{status} {body}");
    }
    let (_page, policy, report_uri) = stack
        .report_only_page(HOST, "/shop?item=1", Duration::from_secs(60))
        .expect("report-only CSP");
    assert!(
        report_uri.starts_with(&format!(
            "/.well-known/autohttps/csp-report?site={SITE}&token="
        )),
        "{policy}"
    );
    let bare_uri = "/.well-known/autohttps/csp-report";

    // 1. The flood from the issue: 10,000 reports with a foreign Origin and no token, from one
    //    address. Every one is refused and counted; nothing is filed.
    let before = metrics(&stack);
    let log_before = stack.sidecar_logs().lines().count();
    let junk = csp_report(&stack, "/", "http://evil.example/junk.png");
    let started = Instant::now();
    let statuses = post_reports(
        &stack,
        &work,
        "127.0.0.9",
        bare_uri,
        &[
            "Origin: https://evil.example",
            "content-type: application/csp-report",
        ],
        &vec![junk; 10_000],
    );
    let flood_time = started.elapsed();
    assert_eq!(statuses.len(), 10_000);
    let accepted = statuses.iter().filter(|s| (200..300).contains(*s)).count();
    let too_many = statuses.iter().filter(|s| **s == 429).count();
    let forbidden = statuses.iter().filter(|s| **s == 403).count();
    assert_eq!(
        accepted, 0,
        "flood statuses: 403 {forbidden}, 429 {too_many}"
    );
    assert_eq!(forbidden + too_many, 10_000);
    let after = metrics(&stack);
    let counted = (refused(&after, "missing_token") - refused(&before, "missing_token"))
        + (refused(&after, "client_rate_limited") - refused(&before, "client_rate_limited"));
    assert_eq!(counted, 10_000.0);
    assert!(findings(&stack).0.is_empty());
    let flood_log_lines = stack.sidecar_logs().lines().count() - log_before;
    // Refusal lines are budgeted at 10 a minute.
    let minutes = flood_time.as_secs() as usize / 60 + 1;
    assert!(
        flood_log_lines <= 10 * minutes + 2,
        "the flood wrote {flood_log_lines} log lines in {flood_time:?}"
    );
    println!(
        "flood: 10,000 reports without a token in {flood_time:?}: {forbidden} refused 403 (no token), {too_many} refused 429 (client rate), 0 filed, {flood_log_lines} sidecar log lines"
    );

    // 2. Junk with the site's token (anyone who loads a page can read it): 90 reports of 150
    //    violations each (cut to 20 per report) from one address. The findings stay
    //    under the site's budget, least useful evicted first; the rest of the client's burst
    //    is then spent and it is refused for its rate.
    let batch = |i: usize| {
        let violations: Vec<serde_json::Value> = (0..150)
            .map(|j| {
                json!({"type": "csp-violation", "body": {
                    "documentURL": format!("https://{HOST}:{}/junk/{i}", stack.ports.https),
                    "blockedURL": format!("http://junk.example/{i}/{j}/{}", "j".repeat(100)),
                    "effectiveDirective": "img-src"}})
            })
            .collect();
        serde_json::to_string(&violations).expect("json")
    };
    let bodies: Vec<String> = (0..90).map(batch).collect();
    let statuses = post_reports(
        &stack,
        &work,
        "127.0.0.3",
        &report_uri,
        &["content-type: application/reports+json"],
        &bodies,
    );
    assert!(statuses.iter().all(|s| *s == 204), "{statuses:?}");
    let (listed, bytes) = findings(&stack);
    let budget = autohttps_sidecar::csp_reports::ReportLimits::default().budget_bytes;
    assert!(
        bytes <= budget,
        "{bytes} bytes of findings, budget {budget}"
    );
    let evicted = counter(&metrics(&stack), "autohttps_csp_findings_evicted_total");
    assert!(evicted > 0.0, "1,800 junk findings fit the budget?");
    println!(
        "junk with the token: 90 reports x 150 violations -> 1,800 filed (20 per report), {} kept in {bytes} bytes (budget {budget}), {evicted} evicted",
        listed.len()
    );
    let before = metrics(&stack);
    let small = csp_report(&stack, "/", "http://junk.example/again.png");
    let statuses = post_reports(
        &stack,
        &work,
        "127.0.0.3",
        &report_uri,
        &["content-type: application/csp-report"],
        &vec![small; 100],
    );
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert!(limited >= 30, "{statuses:?}");
    let after = metrics(&stack);
    assert_eq!(
        refused(&after, "client_rate_limited") - refused(&before, "client_rate_limited"),
        limited as f64
    );

    // 3. A site not in report mode refuses a report even with its own valid token (the edge
    //    never hands one out for it; here it is made from the sidecar's key).
    let tokens = ReportTokens::load_or_create(&dir.path().join("data")).expect("key");
    let epoch = ReportTokens::epoch(time::OffsetDateTime::now_utc());
    let plain_url = format!(
        "https://plain.csp.test:{}{bare_uri}?site=plain&token={}",
        stack.ports.https,
        tokens.token("plain", epoch)
    );
    let before = metrics(&stack);
    let sent = autohttps_tests::envoy::curl(&[
        "--cacert",
        &stack.ca_root.display().to_string(),
        "--resolve",
        &format!("plain.csp.test:{}:127.0.0.1", stack.ports.https),
        "--interface",
        "127.0.0.4",
        "-H",
        "content-type: application/csp-report",
        "--data",
        &csp_report(&stack, "/", "http://x.example/a.png").replace(HOST, "plain.csp.test"),
        &plain_url,
    ])
    .expect("report sent");
    assert_eq!(sent.status, 403, "{sent:?}");
    let after = metrics(&stack);
    assert_eq!(
        refused(&after, "not_report_mode") - refused(&before, "not_report_mode"),
        1.0
    );

    // 4. A real browser loads the page (its HTML comes from the demo backend and loads an
    //    http:// image); its report reaches the sidecar through Envoy with the token, and is
    //    filed despite the junk above and listed by the API and the CLI.
    let expected_resource = format!("http://{HOST}/logo.png");
    let browser_profile = work.join("chromium-profile");
    let browser = Command::new("timeout")
        .args(["120", "chromium"])
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--ignore-certificate-errors",
        ])
        .arg(format!("--user-data-dir={}", browser_profile.display()))
        .arg(format!("--host-resolver-rules=MAP {HOST} 127.0.0.1"))
        .arg(format!("https://{HOST}:{}/shop?item=1", stack.ports.https))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chromium starts (make tools installs it)");
    let filed = wait_until("the browser's report", Duration::from_secs(60), || {
        findings(&stack)
            .0
            .into_iter()
            .find(|f| f["resource"] == expected_resource.as_str())
    });
    // SIGTERM through timeout, so Chromium shuts its own helper processes down.
    let _ = Command::new("kill")
        .args(["-TERM", &browser.id().to_string()])
        .status();
    let browser_output = browser.wait_with_output().expect("chromium ended");
    let filed = filed.unwrap_or_else(|e| {
        panic!(
            "{e:#}\nChromium said:\n{}",
            String::from_utf8_lossy(&browser_output.stderr)
        )
    });
    assert_eq!(
        filed["page"],
        format!("https://{HOST}:{}/shop", stack.ports.https)
    );
    let listing = stack
        .cli_ok(&["site", "mixed-content", SITE])
        .expect("site mixed-content");
    assert!(listing.contains(&expected_resource), "{listing}");
    let (_, bytes) = findings(&stack);
    assert!(
        bytes <= budget,
        "{bytes} bytes of findings, budget {budget}"
    );
    println!("browser: Chromium's report of {expected_resource} filed and listed");

    // 5. 10,000 TLS handshakes with names no site has add only a few lines to the sidecar's
    //    log; they are counted instead.
    let before = metrics(&stack);
    let log_before = stack.sidecar_logs().lines().count();
    let bytes_before = stack.sidecar_logs().len();
    let mut config = String::new();
    for i in 0..10_000 {
        let name = format!("n{i}.unknown.test");
        let _ = writeln!(
            config,
            "url = \"https://{name}:{}/\"\nresolve = \"{name}:{}:127.0.0.1\"\noutput = \"/dev/null\"\ninsecure\nmax-time = 5\nsilent\nnoproxy = \"*\"\nwrite-out = \"%{{http_code}}\\n\"\nnext",
            stack.ports.https, stack.ports.https
        );
    }
    config.truncate(config.len() - "next\n".len());
    let config_file = work.join("unknown-sni.conf");
    std::fs::File::create(&config_file)
        .and_then(|mut f| f.write_all(config.as_bytes()))
        .expect("config written");
    let started = Instant::now();
    let output = Command::new("curl")
        .args(["-s", "--parallel", "--parallel-max", "4", "-K"])
        .arg(&config_file)
        .output()
        .expect("curl runs");
    let handshakes_time = started.elapsed();
    let codes: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(codes.len(), 10_000);
    assert!(codes.iter().all(|c| c == "000"), "a handshake succeeded");
    let unknown = wait_until("the unknown names counted", Duration::from_secs(30), || {
        let n = counter(&metrics(&stack), "autohttps_sds_unknown_names_total")
            - counter(&before, "autohttps_sds_unknown_names_total");
        (n >= 10_000.0).then_some(n)
    })
    .expect("counted");
    let logs = stack.sidecar_logs();
    let added_lines = logs.lines().count() - log_before;
    let added_bytes = logs.len() - bytes_before;
    // Stream lines are budgeted at 20 a minute.
    let minutes = handshakes_time.as_secs() as usize / 60 + 1;
    assert!(
        added_lines <= 20 * minutes + 5,
        "10,000 unknown-SNI handshakes wrote {added_lines} lines ({added_bytes} bytes)"
    );
    println!(
        "unknown SNI: 10,000 handshakes in {handshakes_time:?}, {unknown} unknown names counted, {added_lines} log lines ({added_bytes} bytes) added"
    );
}
