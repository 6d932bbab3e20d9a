//! Conformance, half (b): every scenario of `tests/conformance/scenarios.json` through a real
//! Envoy (V8) running the release filter, driven with curl. Half (a), the same table in the
//! wasmtime host, is `conformance_wasm.rs`; both compare against the same expectations.
//!
//! The policy feed is a small HTTP server in this test that answers what each scenario says.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use autohttps_filter::policy::{HttpsMode, PolicyDocument};
use autohttps_tests::conformance::{
    CLIENT_PEER, FeedReply, FeedRequest, FeedStandIn, Observed, Request, ScenarioFile, Upstream,
};
use autohttps_tests::envoy::{self, Envoy, curl, free_port, render};

struct Edge {
    envoy: Envoy,
    http: u16,
    https: u16,
}

fn template() -> String {
    std::fs::read_to_string(envoy::repo_root().join("tests/conformance/envoy.yaml"))
        .expect("conformance Envoy template")
}

fn config(
    dir: &Path,
    plugin_config: &str,
    trusted_proxies: &[String],
    feed_port: u16,
) -> (String, u16, u16, u16) {
    std::fs::create_dir_all(dir).expect("config dir");
    let (cert, key) = envoy::self_signed(dir, &["conformance.test"]).expect("test certificate");
    let (http, https, admin) = (
        free_port().expect("port"),
        free_port().expect("port"),
        free_port().expect("port"),
    );
    let values = HashMap::from([
        ("HTTP_PORT", http.to_string()),
        ("HTTPS_PORT", https.to_string()),
        ("ADMIN_PORT", admin.to_string()),
        ("FEED_PORT", feed_port.to_string()),
        (
            "WASM",
            envoy::filter_wasm()
                .expect("filter built")
                .display()
                .to_string(),
        ),
        ("TLS_CERT", cert.display().to_string()),
        ("TLS_KEY", key.display().to_string()),
        ("PLUGIN_CONFIG", plugin_config.to_string()),
        (
            "TRUSTED_PROXY_RANGES",
            envoy::trusted_proxy_ranges(trusted_proxies).expect("trusted proxies"),
        ),
    ]);
    (
        render(&template(), &values).expect("renders"),
        http,
        https,
        admin,
    )
}

fn start(dir: &Path, plugin_config: &str, trusted_proxies: &[String], feed_port: u16) -> Edge {
    let (yaml, http, https, admin) = config(dir, plugin_config, trusted_proxies, feed_port);
    let envoy = Envoy::start(&yaml, admin).expect("Envoy starts");
    Edge { envoy, http, https }
}

fn observe(edge: &Edge, request: &Request, upstream: Upstream) -> Observed {
    let (scheme, port) = if request.tls() {
        ("https", edge.https)
    } else {
        ("http", edge.http)
    };
    let url = format!("{scheme}://127.0.0.1:{port}{}", request.path);
    // The client binds the scenario's peer address: Envoy sees it as the TCP peer.
    let mut args: Vec<String> = vec![
        "-k".into(),
        "--path-as-is".into(),
        "--interface".into(),
        request.peer.clone(),
    ];
    match request.http_version.as_deref() {
        None | Some("1.1") => {}
        Some("1.0") => args.push("--http1.0".into()),
        Some(other) => panic!("http_version {other:?}: the scenarios speak \"1.0\" or \"1.1\""),
    }
    if request.method == "HEAD" {
        args.push("--head".into());
    } else {
        args.extend(["-X".into(), request.method.clone()]);
    }
    args.extend(["-H".into(), format!("Host: {}", request.host)]);
    for (name, value) in &request.headers {
        args.extend(["-H".into(), format!("{name}: {value}")]);
    }
    args.extend([
        "-H".into(),
        format!("x-conformance-upstream: {}", upstream.name()),
    ]);
    args.push(url);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let response = curl(&args).unwrap_or_else(|e| panic!("{e:#}\n{}", edge.envoy.log_tail(20)));
    Observed::from_headers(
        response.status,
        response
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str())),
    )
}

#[test]
fn request_scenarios_in_envoy() {
    let file = ScenarioFile::load().expect("scenario file");
    let dir = tempfile::tempdir().expect("tempdir");
    let unused_feed = free_port().expect("port");
    let mut edges: HashMap<String, Edge> = HashMap::new();
    let mut failures = Vec::new();
    for scenario in &file.scenarios {
        let edge = edges.entry(scenario.policy.clone()).or_insert_with(|| {
            let plugin = file.plugin_config(&scenario.policy).expect("policy");
            let trusted = file.trusted_proxies(&scenario.policy).expect("policy");
            start(
                &dir.path().join(&scenario.policy),
                &plugin,
                &trusted,
                unused_feed,
            )
        });
        let mut expected = scenario.expect.clone();
        expected.normalise();
        let got = observe(edge, &scenario.request, scenario.upstream);
        if got != expected {
            failures.push(format!(
                "{}:\n  expected {expected:?}\n  got      {got:?}",
                scenario.name
            ));
        }
    }
    assert!(
        file.scenarios.len() >= 50,
        "only {} scenarios",
        file.scenarios.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} scenarios failed:\n{}",
        failures.len(),
        file.scenarios.len(),
        failures.join("\n")
    );
}

#[test]
fn invalid_configurations_rejected_by_envoy() {
    let file = ScenarioFile::load().expect("scenario file");
    let dir = tempfile::tempdir().expect("tempdir");
    for case in &file.invalid_configs {
        // The raw configuration sits in a single-quoted YAML string: double any quote.
        let (yaml, ..) = config(dir.path(), &case.config.replace('\'', "''"), &[], 1);
        let path = dir.path().join(format!("{}.yaml", case.name));
        let (accepted, text) = envoy::validate(&yaml, &path).expect("envoy runs");
        assert!(!accepted, "{}: Envoy accepted it:\n{text}", case.name);
        assert!(
            text.contains(&case.log) || text.contains(&case.log.replace('"', "\\\"")),
            "{}: no {:?} in:\n{text}",
            case.name,
            case.log
        );
    }
}

/// A policy feed that answers every request the same way and closes each connection, or (when
/// `hang`) reads each request and never answers, holding the connection open until dropped.
struct FeedServer {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FeedServer {
    fn start(status: u16, etag: Option<String>, body: String, hang: bool) -> FeedServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind feed");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            while !stop_flag.load(Ordering::Relaxed) {
                let Ok((stream, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                let mut reader = BufReader::new(&stream);
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                    if line == "\r\n" {
                        break;
                    }
                    line.clear();
                }
                if hang {
                    held.push(stream);
                    continue;
                }
                let mut head = format!(
                    "HTTP/1.1 {status} X\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
                    if status == 304 { 0 } else { body.len() }
                );
                if let Some(etag) = &etag {
                    head.push_str(&format!("etag: {etag}\r\n"));
                }
                head.push_str("\r\n");
                let mut out = &stream;
                let _ = out.write_all(head.as_bytes());
                if status != 304 {
                    let _ = out.write_all(body.as_bytes());
                }
            }
        });
        FeedServer {
            port,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for FeedServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[test]
fn feed_scenarios_in_envoy() {
    let file = ScenarioFile::load().expect("scenario file");
    let dir = tempfile::tempdir().expect("tempdir");
    for scenario in &file.feed {
        let answer = &scenario.answer;
        let feed = (!answer.down).then(|| {
            FeedServer::start(
                answer.status.unwrap_or(200),
                answer.etag.clone(),
                file.answer_body(answer).expect("body"),
                answer.hang,
            )
        });
        let feed_port = match &feed {
            Some(server) => server.port,
            None => free_port().expect("port"),
        };
        let plugin = file.feed_plugin_config(scenario).expect("config");
        let trusted = file.trusted_proxies("main").expect("main policy");
        let edge = start(
            &dir.path().join(&scenario.name),
            &plugin,
            &trusted,
            feed_port,
        );
        let counter = format!("wasmcustom.autohttps.{}", scenario.counter);
        let deadline = Instant::now() + Duration::from_secs(15);
        while edge.envoy.stat(&counter).expect("stats").unwrap_or(0) == 0 {
            assert!(
                Instant::now() < deadline,
                "{}: {counter} never went up; Envoy log:\n{}",
                scenario.name,
                edge.envoy.log_tail(30)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // The log line may reach the file a moment after the counter moved.
        if let Some(phrase) = &scenario.log {
            while !edge.envoy.log().contains(phrase.as_str()) {
                assert!(
                    Instant::now() < deadline,
                    "{}: no log containing {phrase:?}; Envoy log:\n{}",
                    scenario.name,
                    edge.envoy.log_tail(30)
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let mut expected = scenario.expect.clone();
        expected.normalise();
        // The counter is shared by every VM (the main thread's and each worker's), and each
        // polls the feed on its own: the main thread's may count the update before the worker
        // that serves the request has it. Look again until the deadline.
        let mut got = observe(&edge, &scenario.request, Upstream::Plain);
        while got != expected && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            got = observe(&edge, &scenario.request, Upstream::Plain);
        }
        assert_eq!(got, expected, "{}", scenario.name);
        drop(feed);
    }
}

/// The protocol stand-in served over HTTP: one thread per request, holding a long poll until
/// the stand-in has something newer (woken by [`ProtocolServer::publish`]) or its wait is over.
struct ProtocolServer {
    port: u16,
    feed: Arc<(Mutex<FeedStandIn>, Condvar)>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ProtocolServer {
    fn start(feed: FeedStandIn) -> ProtocolServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind feed");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let feed = Arc::new((Mutex::new(feed), Condvar::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (shared, stop_flag) = (Arc::clone(&feed), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            while !stop_flag.load(Ordering::Relaxed) {
                let Ok((stream, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let shared = Arc::clone(&shared);
                let stop = Arc::clone(&stop_flag);
                std::thread::spawn(move || serve_protocol(stream, &shared, &stop));
            }
        });
        ProtocolServer {
            port,
            feed,
            stop,
            thread: Some(thread),
        }
    }

    fn publish(&self, document: PolicyDocument) -> String {
        let (feed, changed) = &*self.feed;
        let version = feed.lock().expect("feed lock").publish(document);
        changed.notify_all();
        version
    }

    fn with<T>(&self, f: impl FnOnce(&mut FeedStandIn) -> T) -> T {
        f(&mut self.feed.0.lock().expect("feed lock"))
    }
}

impl Drop for ProtocolServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.feed.1.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve_protocol(
    stream: std::net::TcpStream,
    shared: &(Mutex<FeedStandIn>, Condvar),
    stop: &AtomicBool,
) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    let mut path = String::new();
    let mut if_none_match = None;
    while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
        if line == "\r\n" {
            break;
        }
        if path.is_empty() {
            path = line.split(' ').nth(1).unwrap_or("").to_string();
        } else if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("if-none-match")
        {
            if_none_match = Some(value.trim().to_string());
        }
        line.clear();
    }
    let request = FeedRequest::parse(&path, if_none_match.as_deref()).expect("a protocol request");
    let (feed, changed) = shared;
    let deadline = Instant::now() + Duration::from_millis(request.wait_ms);
    let mut held = feed.lock().expect("feed lock");
    let reply: FeedReply = loop {
        if let Some(reply) = held.answer(&request) {
            break reply;
        }
        let now = Instant::now();
        if now >= deadline || stop.load(Ordering::Relaxed) {
            break held.not_modified();
        }
        held = changed
            .wait_timeout(held, deadline - now)
            .expect("feed lock")
            .0;
    };
    drop(held);
    let mut head = format!(
        "HTTP/1.1 {} X\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        reply.status,
        reply.body.len()
    );
    for (name, value) in &reply.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut out = &stream;
    let _ = out.write_all(head.as_bytes());
    let _ = out.write_all(reply.body.as_bytes());
}

/// Waits until a filter counter reaches `at_least`.
fn wait_for_stat(edge: &Edge, name: &str, at_least: u64) {
    let counter = format!("wasmcustom.autohttps.{name}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let value = edge.envoy.stat(&counter).expect("stats").unwrap_or(0);
        if value >= at_least {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{counter} is {value}, never reached {at_least}; Envoy log:\n{}",
            edge.envoy.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Protocol v1 in a real Envoy with two workers: every VM (one per worker, plus the main
/// thread's) takes the first snapshot, then long-polls; a one-site change reaches each VM as a
/// delta, applied in place, and every connection (whichever worker takes it) sees it.
#[test]
fn feed_protocol_in_envoy_with_two_workers() {
    let file = ScenarioFile::load().expect("scenario file");
    let document: PolicyDocument =
        serde_json::from_str(&file.policy_json("main").expect("main policy")).expect("document");
    let server = ProtocolServer::start(FeedStandIn::new("00000000000000bb", document));
    let dir = tempfile::tempdir().expect("tempdir");
    let plugin = r#"{"feed": {"cluster": "feed", "path": "/v1/policy", "interval_ms": 200, "timeout_ms": 1000, "wait_ms": 3000}}"#;
    let trusted = file.trusted_proxies("main").expect("main policy");
    let (yaml, http, https, admin) = config(dir.path(), plugin, &trusted, server.port);
    let envoy = envoy::Envoy::start_workers(&yaml, admin, 2).expect("Envoy starts");
    let edge = Edge { envoy, http, https };
    // Each root context (one per listener's filter in each VM: the main thread's and one per
    // worker) asks once for a snapshot; their number is settled once it stops growing.
    let mut root_contexts = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        std::thread::sleep(Duration::from_millis(1000));
        let now = server.with(|feed| feed.snapshots);
        if now >= 2 && now == root_contexts {
            break;
        }
        root_contexts = now;
        assert!(Instant::now() < deadline, "{}", edge.envoy.log_tail(30));
    }
    wait_for_stat(&edge, "policy_snapshots_applied_total", root_contexts);
    let plain = Request {
        scheme: "http".into(),
        method: "GET".into(),
        host: "plain.test".into(),
        path: "/".into(),
        headers: Default::default(),
        http_version: None,
        peer: CLIENT_PEER.into(),
    };
    assert_eq!(observe(&edge, &plain, Upstream::Plain).status, 200);

    let bytes_before = server.with(|feed| feed.body_bytes);
    let mut next = server.with(|feed| feed.current().clone());
    let site = next
        .sites
        .iter_mut()
        .find(|s| s.id == "plain")
        .expect("plain site");
    site.https = HttpsMode::Force;
    site.cert_ready = vec!["plain.test".into()];
    let version = server.publish(next);
    wait_for_stat(&edge, "policy_deltas_applied_total", root_contexts);
    let (deltas, snapshots, delta_bytes) =
        server.with(|feed| (feed.deltas, feed.snapshots, feed.body_bytes - bytes_before));
    assert_eq!(deltas, root_contexts, "one delta per root context");
    assert_eq!(snapshots, root_contexts, "none needed a second snapshot");
    assert!(
        delta_bytes < 1024 * root_contexts,
        "{delta_bytes} bytes for {root_contexts} one-site deltas"
    );
    // Envoy's log names the thread of each line (`[time][thread][level]`): the delta was
    // applied on the main thread and on both workers (the log reaches its file within seconds).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = edge.envoy.log();
        let applied_by: std::collections::BTreeSet<&str> = log
            .lines()
            .filter(|l| l.contains(&format!("policy {version:?} applied (delta")))
            .filter_map(|l| l.split(['[', ']']).nth(3))
            .collect();
        if applied_by.len() == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the main thread and two workers apply {version}: {applied_by:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Fresh connections land on either worker: each sees the change.
    for _ in 0..10 {
        assert_eq!(observe(&edge, &plain, Upstream::Plain).status, 301);
    }
}
