//! The release filter in a real Envoy (V8), driven through curl: force, disable, auto, the ACME
//! path exemption, HSTS and CSP, stats, and a bad configuration rejected.

use std::collections::HashMap;

use autohttps_tests::envoy::{self, CurlResponse, Envoy, curl, free_port, render_file};

struct Edge {
    envoy: Envoy,
    http: u16,
    https: u16,
    cert: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

const NAMES: &[&str] = &[
    "force.demo.test",
    "www.force.demo.test",
    "auto.demo.test",
    "off.demo.test",
    "pending.demo.test",
];

fn policy(http: u16, https: u16) -> String {
    format!(
        r#"{{"schema": 1, "version": "smoke-1", "settings": {{"http_port": {http}, "https_port": {https}}}, "sites": [
  {{"id": "force-demo", "hostnames": ["force.demo.test", "www.force.demo.test"], "https": "force",
    "hsts": {{"enabled": true, "max_age": 300}}, "mixed_content": "upgrade",
    "cert_ready": ["force.demo.test", "www.force.demo.test"]}},
  {{"id": "pending", "hostnames": ["pending.demo.test"], "https": "force"}},
  {{"id": "auto-demo", "hostnames": ["auto.demo.test"], "mixed_content": "report", "cert_ready": ["auto.demo.test"]}},
  {{"id": "off-demo", "hostnames": ["off.demo.test"], "https": "disable", "cert_ready": ["off.demo.test"]}}]}}"#
    )
    .replace('\n', " ")
}

fn values(
    http: u16,
    https: u16,
    admin: u16,
    cert: &std::path::Path,
    key: &std::path::Path,
    policy_json: String,
) -> anyhow::Result<HashMap<&'static str, String>> {
    Ok(HashMap::from([
        ("HTTP_PORT", http.to_string()),
        ("HTTPS_PORT", https.to_string()),
        ("ADMIN_PORT", admin.to_string()),
        ("WASM", envoy::filter_wasm()?.display().to_string()),
        ("TLS_CERT", cert.display().to_string()),
        ("TLS_KEY", key.display().to_string()),
        ("POLICY_JSON", policy_json),
    ]))
}

fn start() -> anyhow::Result<Edge> {
    let dir = tempfile::tempdir()?;
    let (cert, key) = envoy::self_signed(dir.path(), NAMES)?;
    let (http, https, admin) = (free_port()?, free_port()?, free_port()?);
    let config = render_file(
        "filter-demo.yaml",
        &values(http, https, admin, &cert, &key, policy(http, https))?,
    )?;
    let envoy = Envoy::start(&config, admin)?;
    Ok(Edge {
        envoy,
        http,
        https,
        cert,
        _dir: dir,
    })
}

impl Edge {
    fn http(&self, host: &str, path_and_query: &str, extra: &[&str]) -> CurlResponse {
        let url = format!("http://{host}:{}{path_and_query}", self.http);
        let resolve = format!("{host}:{}:127.0.0.1", self.http);
        let mut args = vec!["--resolve", &resolve, &url];
        args.extend_from_slice(extra);
        curl(&args).unwrap_or_else(|e| panic!("{e:#}\n{}", self.envoy.log_tail(20)))
    }

    fn https(&self, host: &str, path_and_query: &str) -> CurlResponse {
        let url = format!("https://{host}:{}{path_and_query}", self.https);
        let resolve = format!("{host}:{}:127.0.0.1", self.https);
        let cacert = self.cert.display().to_string();
        curl(&["--cacert", &cacert, "--resolve", &resolve, &url])
            .unwrap_or_else(|e| panic!("{e:#}\n{}", self.envoy.log_tail(20)))
    }

    fn counter(&self, name: &str) -> u64 {
        self.envoy
            .stat(&format!("wasmcustom.autohttps.{name}"))
            .expect("admin /stats answers")
            .unwrap_or(0)
    }
}

#[test]
fn filter_in_envoy_applies_each_mode() {
    let edge = start().expect("Envoy starts with the filter");

    // force: HTTP → HTTPS, path and query kept byte for byte, 301 for GET, 308 for POST.
    let r = edge.http("force.demo.test", "/a/b%2Fc?x=1&y=%20z", &[]);
    assert_eq!(r.status, 301, "{r:?}");
    assert_eq!(
        r.header("location"),
        Some(format!("https://force.demo.test:{}/a/b%2Fc?x=1&y=%20z", edge.https).as_str())
    );
    let r = edge.http("www.force.demo.test", "/form", &["-X", "POST", "-d", "a=1"]);
    assert_eq!(r.status, 308, "{r:?}");
    assert_eq!(
        r.header("location"),
        Some(format!("https://www.force.demo.test:{}/form", edge.https).as_str())
    );
    // Mixed case and a trailing dot in Host are the same name.
    let r = edge.http("force.demo.test", "/", &["-H", "Host: FORCE.Demo.Test."]);
    assert_eq!(r.status, 301, "{r:?}");

    // The ACME challenge path is never redirected.
    let r = edge.http(
        "force.demo.test",
        "/.well-known/acme-challenge/token-1",
        &[],
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, "hello from the demo upstream\n");

    // force over HTTPS: served, with HSTS and the CSP upgrade directive.
    let r = edge.https("force.demo.test", "/");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.all("strict-transport-security"), vec!["max-age=300"]);
    assert_eq!(
        r.all("content-security-policy"),
        vec!["upgrade-insecure-requests"]
    );
    // The upstream's own HSTS wins; its own CSP is kept and ours added beside it.
    let r = edge.https("force.demo.test", "/upstream-hsts");
    assert_eq!(
        r.all("strict-transport-security"),
        vec!["max-age=5"],
        "{r:?}"
    );
    let r = edge.https("force.demo.test", "/upstream-csp");
    let mut csp = r.all("content-security-policy");
    csp.sort_unstable();
    assert_eq!(
        csp,
        vec!["default-src 'self'", "upgrade-insecure-requests"],
        "{r:?}"
    );

    // force without a certificate: not redirected.
    let r = edge.http("pending.demo.test", "/", &[]);
    assert_eq!(r.status, 200, "{r:?}");

    // auto: both schemes served; HTTPS carries the report-only policy, HTTP nothing.
    let r = edge.http("auto.demo.test", "/", &[]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("content-security-policy-report-only"), None);
    assert_eq!(r.header("strict-transport-security"), None);
    let r = edge.https("auto.demo.test", "/");
    assert_eq!(r.status, 200, "{r:?}");
    let report_only = r
        .header("content-security-policy-report-only")
        .expect("report-only CSP over HTTPS");
    assert!(
        report_only.contains("report-uri /.well-known/autohttps/csp-report"),
        "{report_only}"
    );

    // disable: HTTPS → HTTP with max-age=0; HTTP served.
    let r = edge.https("off.demo.test", "/p?q=1");
    assert_eq!(r.status, 301, "{r:?}");
    assert_eq!(
        r.header("location"),
        Some(format!("http://off.demo.test:{}/p?q=1", edge.http).as_str())
    );
    assert_eq!(r.all("strict-transport-security"), vec!["max-age=0"]);
    let r = edge.http("off.demo.test", "/", &[]);
    assert_eq!(r.status, 200, "{r:?}");

    // Unknown hosts pass untouched.
    let r = edge.http("stranger.test", "/", &[]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("location"), None);

    // Every outcome was counted.
    assert_eq!(edge.counter("requests_total.outcome.redirect_to_https"), 3);
    assert_eq!(edge.counter("requests_total.outcome.redirect_to_http"), 1);
    assert_eq!(edge.counter("requests_total.outcome.acme_challenge"), 1);
    assert_eq!(
        edge.counter("requests_total.outcome.force_skipped_no_cert"),
        1
    );
    assert_eq!(edge.counter("requests_total.outcome.unknown_host"), 1);
    assert_eq!(edge.counter("headers_added_total.header.hsts"), 2);
    assert_eq!(edge.counter("headers_added_total.header.csp"), 4);
    assert_eq!(edge.counter("policy_sites"), 4);
}

#[test]
fn envoy_rejects_an_invalid_policy_naming_each_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = envoy::self_signed(dir.path(), NAMES).expect("test cert");
    let bad = r#"{"schema": 1, "version": "bad-1", "sites": [{"id": "a", "hostnames": ["bad host.test"]}, {"id": "b", "hostnames": ["ok.test"], "canonical_host": "other.test"}]}"#;
    let config = render_file(
        "filter-demo.yaml",
        &values(18080, 18443, 19901, &cert, &key, bad.to_string()).expect("values"),
    )
    .expect("renders");
    let (accepted, text) =
        envoy::validate(&config, &dir.path().join("bad.yaml")).expect("envoy runs");
    assert!(!accepted, "Envoy accepted a bad policy:\n{text}");
    assert!(
        text.contains(
            "policy.sites[0].hostnames[0]: \\\"bad host.test\\\" is not a valid hostname"
        ) || text
            .contains("policy.sites[0].hostnames[0]: \"bad host.test\" is not a valid hostname"),
        "{text}"
    );
    assert!(
        text.contains(
            "policy.sites[1].canonical_host: other.test is not one of this site's hostnames"
        ),
        "{text}"
    );
    assert!(
        text.contains("configuration rejected (2 problem(s))"),
        "{text}"
    );
}
