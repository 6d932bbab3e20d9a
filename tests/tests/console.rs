//! The operator console in a real browser: headless Chromium driven over WebDriver
//! (`autohttps_tests::browser`) against the real stack (the `autohttps` sidecar serving the
//! console on its admin listener, Pebble, its mock DNS and Envoy with the filter).
//!
//! Sign-in (a wrong token refused, the right one exchanged for an HttpOnly, SameSite=Strict
//! cookie that page script cannot read), the sites page showing a failing site, a site edited to
//! `force` whose preview shows the 301 with path and query before saving and whose saved policy
//! real Envoy then answers the same way, a regeneration with its progress, CSRF refusals, and
//! every request scenario of the conformance table run through the page's engine (the wasm
//! module built from `filter/web`). Screenshots go to `target/console-screenshots/`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use autohttps_tests::browser::Browser;
use autohttps_tests::conformance::{Observed, ScenarioFile};
use autohttps_tests::envoy::{curl, repo_root};
use autohttps_tests::stack::{ADMIN_TOKEN, Stack, wait_until};
use serde_json::{Value, json};

const SHOP: &str = "shop.console.test";
/// A site whose only name resolves (in the mock DNS) to 127.0.0.2, where the platform is not:
/// every attempt fails, the failure the real Pebble and mock DNS can produce here.
const FAR: &str = "far.console.test";
const WAIT: Duration = Duration::from_secs(60);

fn screenshots() -> PathBuf {
    repo_root().join("target/console-screenshots")
}

fn admin_ok(stack: &Stack, method: &str, path: &str, body: Option<&Value>) -> Value {
    let (status, answer) = stack
        .admin(method, path, body)
        .unwrap_or_else(|e| panic!("{method} {path}: {e:#}"));
    assert!(
        (200..300).contains(&status),
        "{method} {path}: {status} {answer}"
    );
    answer
}

/// The bytes a GET of `url` downloads (binary bodies included), or a panic if it fails.
fn downloaded_bytes(url: &str) -> usize {
    let output = std::process::Command::new("curl")
        .args([
            "-sf",
            "--noproxy",
            "*",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download}",
            url,
        ])
        .output()
        .expect("curl runs");
    assert!(output.status.success(), "GET {url} failed");
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .expect("curl prints the size")
}

/// The admin listener's console URL.
fn console(stack: &Stack, path: &str) -> String {
    format!("http://127.0.0.1:{}{path}", stack.ports.sidecar_admin)
}

#[test]
fn console_in_chromium_signs_in_previews_with_the_filter_engine_and_saves_what_envoy_enforces() {
    let started = Instant::now();
    let (stack, dir) = Stack::start_in_temp_dir("console").expect("the stack starts");
    stack.set_dns(FAR, "127.0.0.2").expect("mock DNS");
    admin_ok(
        &stack,
        "POST",
        "/v1/sites",
        Some(&json!({"name": "shop", "primary": SHOP})),
    );
    admin_ok(
        &stack,
        "POST",
        "/v1/sites",
        Some(&json!({"name": "far", "primary": FAR})),
    );
    wait_until("shop's certificate", WAIT, || {
        stack.https(SHOP, "/").ok().filter(|r| r.status == 200)
    })
    .expect("shop is served over HTTPS");
    wait_until("far's failed attempt", WAIT, || {
        let site = admin_ok(&stack, "GET", "/v1/sites/far", None);
        (site["issuance"]["failures"].as_u64() > Some(0)).then_some(())
    })
    .expect("far fails");

    let browser = Browser::start(&dir.path().join("browser")).expect("Chromium starts");

    // 1. Sign-in: a wrong token is refused, and no session cookie is set.
    browser.goto(&console(&stack, "/console")).unwrap();
    let token_field = browser.find("#token").unwrap();
    browser
        .type_into(&token_field, "not-the-admin-token")
        .unwrap();
    browser.click(&browser.find("#sign-in").unwrap()).unwrap();
    let refusal = browser
        .wait_for_text("#problem", WAIT, |t| !t.is_empty())
        .unwrap();
    assert!(refusal.contains("not the admin token"), "{refusal}");
    assert!(
        browser.cookies().unwrap().is_empty(),
        "no cookie for a wrong token"
    );
    let wrong = curl(&[
        "-H",
        &format!("origin: http://127.0.0.1:{}", stack.ports.sidecar_admin),
        "--data",
        "token=wrong",
        &console(&stack, "/console/sign-in"),
    ])
    .unwrap();
    assert_eq!(wrong.status, 401);
    assert!(wrong.header("set-cookie").is_none());

    //    The right token: a session cookie, HttpOnly and SameSite=Strict; the token is nowhere
    //    page script can read it.
    let token_field = browser.find("#token").unwrap();
    browser.type_into(&token_field, ADMIN_TOKEN).unwrap();
    browser.click(&browser.find("#sign-in").unwrap()).unwrap();
    wait_until("the sites page", WAIT, || {
        browser.url().ok().filter(|u| u.ends_with("/console/sites"))
    })
    .unwrap();
    let cookies = browser.cookies().unwrap();
    let session = cookies
        .iter()
        .find(|c| c["name"] == "autohttps_console")
        .unwrap_or_else(|| panic!("a session cookie in {cookies:?}"));
    assert_eq!(session["httpOnly"], true, "{session}");
    assert_eq!(session["sameSite"], "Strict", "{session}");
    let visible = browser
        .execute(
            "return [document.cookie, JSON.stringify(localStorage), JSON.stringify(sessionStorage), document.documentElement.outerHTML];",
            &[],
        )
        .unwrap();
    for (what, text) in [
        "document.cookie",
        "localStorage",
        "sessionStorage",
        "the page",
    ]
    .iter()
    .zip(visible.as_array().unwrap())
    {
        let text = text.as_str().unwrap();
        assert!(!text.contains(ADMIN_TOKEN), "the admin token is in {what}");
        assert!(
            !text.contains("autohttps_console"),
            "the session is in {what}: {text}"
        );
    }

    // 2. The sites page: the failing site is shown as failing (its DNS), the other issued.
    let far_state = browser
        .wait_for_text("tr[data-site=\"far\"] .state", WAIT, |t| !t.is_empty())
        .unwrap();
    assert_eq!(far_state, "dns-not-pointing");
    let shop_state = browser
        .wait_for_text("tr[data-site=\"shop\"] .state", WAIT, |t| !t.is_empty())
        .unwrap();
    assert_eq!(shop_state, "issued");
    browser.select("#state", "dns-not-pointing").unwrap();
    browser
        .wait_for_text("#count", WAIT, |t| t.starts_with("1 of 2 sites"))
        .unwrap();
    browser.select("#state", "").unwrap();
    browser
        .wait_for_text("#count", WAIT, |t| t.starts_with("2 of 2 sites"))
        .unwrap();
    let sites_png = browser
        .screenshot(&screenshots().join("sites.png"))
        .unwrap();

    // 3. A site: switch to force; before saving, the preview (the filter's engine in the page)
    //    shows a 301 to https with path and query kept, while Envoy still serves HTTP.
    browser
        .goto(&console(&stack, "/console/site?name=shop"))
        .unwrap();
    browser
        .wait_for_text("tr[data-name=\"shop.console.test\"] .verdict", WAIT, |t| {
            t == "ok"
        })
        .unwrap();
    browser.select("#policy-https", "force").unwrap();
    browser.select("#preview-scheme", "http").unwrap();
    let path = "/cart?item=1&ref=a%20b";
    browser
        .type_into(
            &browser.find("#preview-target").unwrap(),
            &format!("{SHOP}{path}"),
        )
        .unwrap();
    let expected_location = format!("https://{SHOP}:{}{path}", stack.ports.https);
    browser
        .wait_for_text("#preview-status", WAIT, |t| t == "301")
        .unwrap();
    let location = browser
        .wait_for_text("#preview-location", WAIT, |t| t != "–")
        .unwrap();
    assert_eq!(location, expected_location);
    let before = stack.http(SHOP, path).unwrap();
    assert_eq!(
        before.status, 200,
        "nothing changes at the edge before saving"
    );
    browser.set_window_size(1400, 1500).unwrap();
    let site_png = browser.screenshot(&screenshots().join("site.png")).unwrap();
    browser.set_window_size(1400, 1000).unwrap();

    //    Saved: real Envoy answers the same 301 and Location.
    browser
        .click(&browser.find("#save-policy").unwrap())
        .unwrap();
    browser
        .wait_for_text("#save-status", WAIT, |t| t.starts_with("Saved"))
        .unwrap();
    let after = wait_until("Envoy enforcing force", WAIT, || {
        stack.http(SHOP, path).ok().filter(|r| r.status == 301)
    })
    .unwrap();
    assert_eq!(after.header("location"), Some(expected_location.as_str()));
    assert_eq!(
        admin_ok(&stack, "GET", "/v1/sites/shop", None)["policy"]["https"],
        "force"
    );

    //    An invalid edit shows the engine's own validation message and cannot be saved.
    browser
        .type_into(&browser.find("#policy-hsts-max-age").unwrap(), "1")
        .unwrap();
    browser
        .click(&browser.find("#policy-hsts").unwrap())
        .unwrap();
    browser
        .click(&browser.find("#policy-hsts-subdomains").unwrap())
        .unwrap();
    browser
        .click(&browser.find("#policy-hsts-preload").unwrap())
        .unwrap();
    let problems = browser
        .wait_for_text("#problems", WAIT, |t| !t.is_empty())
        .unwrap();
    assert!(problems.contains("hsts"), "{problems}");
    let save_disabled = browser
        .execute(
            "return document.getElementById('save-policy').disabled;",
            &[],
        )
        .unwrap();
    assert_eq!(save_disabled, true);

    //    Add a name, then remove it, through the page.
    browser
        .goto(&console(&stack, "/console/site?name=shop"))
        .unwrap();
    let www = format!("www.{SHOP}");
    browser
        .wait_for_text("#site-name", WAIT, |t| t.starts_with("shop"))
        .unwrap();
    browser
        .type_into(&browser.find("#new-name").unwrap(), &www)
        .unwrap();
    browser
        .click(&browser.find("#add-name button").unwrap())
        .unwrap();
    browser
        .wait_for_text(&format!("tr[data-name=\"{www}\"] td"), WAIT, |t| t == www)
        .unwrap();
    let names = admin_ok(&stack, "GET", "/v1/sites/shop", None)["hostnames"].to_string();
    assert!(names.contains(&www), "{names}");
    browser
        .click(
            &browser
                .find(&format!("button[data-name=\"{www}\"]"))
                .unwrap(),
        )
        .unwrap();
    browser
        .wait_for_text("#names-status", WAIT, |t| {
            t.starts_with(&format!("{www} removed"))
        })
        .unwrap();
    let names = admin_ok(&stack, "GET", "/v1/sites/shop", None)["hostnames"].to_string();
    assert!(!names.contains(&www), "{names}");

    //    Regenerate, with progress shown until the new certificate is there.
    browser
        .goto(&console(&stack, "/console/site?name=shop"))
        .unwrap();
    browser
        .wait_for_text("#certificates", WAIT, |t| t.contains("serial"))
        .unwrap();
    browser
        .click(&browser.find("#regenerate").unwrap())
        .unwrap();
    let progress = browser
        .wait_for_text("#progress", Duration::from_secs(120), |t| {
            t.starts_with("Done") || t.starts_with("Failed")
        })
        .unwrap();
    assert!(progress.starts_with("Done: new certificate"), "{progress}");

    // 4. CSRF: a state-changing request with the session cookie but without the session's
    //    token, or with a foreign Origin, is refused, and changes nothing.
    let refused = browser
        .execute_async(
            "const done = arguments[arguments.length - 1];
             const call = (headers) => fetch('/console/api/v1/sites/shop', {method: 'PATCH',
               headers: Object.assign({'content-type': 'application/json'}, headers),
               body: JSON.stringify({https: 'disable'})}).then((r) => r.status);
             Promise.all([call({}), call({'x-csrf-token': 'forged'})]).then(done);",
            &[],
        )
        .unwrap();
    assert_eq!(refused, json!([403, 403]));
    let csrf = browser
        .execute_async(
            "const done = arguments[arguments.length - 1];
             fetch('/console/api/session').then((r) => r.json()).then((s) => done(s.csrf_token));",
            &[],
        )
        .unwrap();
    let session_cookie = format!(
        "cookie: autohttps_console={}",
        session["value"].as_str().unwrap()
    );
    let csrf_header = format!("x-csrf-token: {}", csrf.as_str().unwrap());
    let patch_url = console(&stack, "/console/api/v1/sites/shop");
    let foreign = curl(&[
        "-X",
        "PATCH",
        "-H",
        &session_cookie,
        "-H",
        &csrf_header,
        "-H",
        "origin: http://attacker.example",
        "-H",
        "content-type: application/json",
        "--data",
        r#"{"https":"disable"}"#,
        &patch_url,
    ])
    .unwrap();
    assert_eq!(foreign.status, 403, "{}", foreign.body);
    let no_cookie = curl(&[
        "-X",
        "PATCH",
        "-H",
        &csrf_header,
        "-H",
        &format!("origin: http://127.0.0.1:{}", stack.ports.sidecar_admin),
        "-H",
        "content-type: application/json",
        "--data",
        r#"{"https":"disable"}"#,
        &patch_url,
    ])
    .unwrap();
    assert_eq!(no_cookie.status, 401, "{}", no_cookie.body);
    assert_eq!(
        admin_ok(&stack, "GET", "/v1/sites/shop", None)["policy"]["https"],
        "force",
        "no refused request changed the site"
    );

    // 5. Every request scenario of the conformance table through the page's engine agrees
    //    with the table, which conformance_envoy holds real Envoy to.
    browser.goto(&console(&stack, "/console/preview")).unwrap();
    let table = ScenarioFile::load().unwrap();
    let mut policies = serde_json::Map::new();
    for name in table.policies.keys() {
        policies.insert(name.clone(), table.policy_json(name).unwrap().into());
    }
    let requests: Vec<Value> = table
        .scenarios
        .iter()
        .map(|s| {
            let upstream = s.upstream.headers();
            let upstream_value =
                |name: &str| upstream.iter().find(|(n, _)| *n == name).map(|(_, v)| *v);
            json!({
                "policy": s.policy,
                "request": {
                    "url": format!("{}://{}{}", s.request.scheme, s.request.host, s.request.path),
                    "method": s.request.method,
                    "peer": s.request.peer,
                    "forwarded_proto": s.request.headers.get("x-forwarded-proto"),
                    "upstream_hsts": upstream_value("strict-transport-security"),
                    "upstream_csp": upstream_value("content-security-policy"),
                },
            })
        })
        .collect();
    let answers = browser
        .execute_async(
            "const [policies, cases, done] = arguments;
             import('/console/static/engine.js').then((m) => m.loadEngine()).then((engine) =>
               done(cases.map((c) => engine.preview(policies[c.policy], c.request))),
               (error) => done(String(error)));",
            &[Value::Object(policies), Value::Array(requests)],
        )
        .unwrap();
    let answers = answers
        .as_array()
        .unwrap_or_else(|| panic!("the engine ran: {answers}"));
    assert_eq!(answers.len(), table.scenarios.len());
    let mut disagreements = Vec::new();
    for (scenario, answer) in table.scenarios.iter().zip(answers) {
        let strings = |key: &str| -> Vec<String> {
            answer[key]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        };
        let mut seen = Observed {
            // A passed request is answered 200 by the table's upstream.
            status: answer["status"].as_u64().map_or(200, |s| s as u16),
            location: answer["location"].as_str().map(str::to_owned),
            hsts: strings("hsts"),
            csp: strings("csp"),
            csp_report_only: strings("csp_report_only"),
        };
        seen.normalise();
        let mut expected = scenario.expect.clone();
        expected.normalise();
        if seen != expected || answer.get("error").is_some() {
            disagreements.push(format!(
                "{}: page engine {seen:?} ({answer}), table {expected:?}",
                scenario.name
            ));
        }
    }
    assert!(
        disagreements.is_empty(),
        "{} of {} scenarios disagree:\n{}",
        disagreements.len(),
        table.scenarios.len(),
        disagreements.join("\n")
    );
    println!(
        "console: {} conformance scenarios agree through the browser's engine",
        table.scenarios.len()
    );

    // 6. Page weight of the sites page (HTML, CSS, scripts, the engine's module) as served.
    let mut weight = 0;
    for path in [
        "/console/sites",
        "/console/static/console.css",
        "/console/static/common.js",
        "/console/static/sites.js",
    ] {
        let cookie = session_cookie.as_str();
        let response = curl(&["-H", cookie, &console(&stack, path)]).unwrap();
        assert_eq!(response.status, 200, "{path}");
        weight += response.body.len();
    }
    let mut engine_weight = 0;
    for path in [
        "/console/static/engine.js",
        "/console/static/preview-panel.js",
        "/console/static/site.js",
        "/console/static/autohttps_policy_web.js",
        "/console/static/autohttps_policy_web_bg.wasm",
    ] {
        engine_weight += downloaded_bytes(&console(&stack, path));
    }
    println!(
        "console: sites page {weight} bytes; a site page adds {engine_weight} bytes (its scripts and the engine's wasm); screenshots {} and {}; {:.1} s",
        sites_png.display(),
        site_png.display(),
        started.elapsed().as_secs_f64()
    );
}
