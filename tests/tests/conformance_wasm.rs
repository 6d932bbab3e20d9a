//! Conformance, half (a): every scenario of `tests/conformance/scenarios.json` run on the
//! release filter in the wasmtime proxy-wasm host. Half (b), the same table in a real Envoy,
//! is `conformance_envoy.rs`; both compare against the same expectations.

use std::time::Duration;

use autohttps_filter::policy::DIRECT_PEER_FILTER_STATE;
use autohttps_filter::policy::{PolicyDocument, Settings, SiteSpec, compact};
use autohttps_tests::conformance::{
    FEED_TIMEOUT_MS, FeedReply, FeedRequest, FeedStandIn, Observed, Request, ScenarioFile, Upstream,
};
use autohttps_tests::envoy::filter_wasm;
use proxy_wasm_host::{FilterModule, Host, HostBuilder, HttpCallFailure};

fn module() -> FilterModule {
    FilterModule::load(filter_wasm().expect("filter built")).expect("filter loads")
}

fn host(module: &FilterModule, config: &str) -> Host {
    HostBuilder::new(module)
        .plugin_configuration(config.as_bytes().to_vec())
        .property(&["plugin_name"], "autohttps")
        .cluster("feed")
        .build()
        .expect("the VM starts")
}

/// Sends a request as Envoy would present it (the TCP peer in the filter state the Envoy
/// configuration records it in, the TLS property on HTTPS) and returns what the client would
/// see. `source.address` is what Envoy derives from a trusted proxy's `X-Forwarded-For`: set
/// to an address the policy trusts, so a filter that read it would be caught believing it.
fn observe(host: &mut Host, request: &Request, upstream: Upstream) -> Observed {
    let mut stream = host.http_stream().expect("stream");
    stream.set_property(
        &["filter_state", DIRECT_PEER_FILTER_STATE],
        request.peer.as_str(),
    );
    stream.set_property(&["source", "address"], "10.0.0.1:0");
    if request.tls() {
        stream.set_property(&["connection", "tls_version"], "TLSv1.3");
    }
    let mut headers: Vec<(&str, &str)> = vec![
        (":method", request.method.as_str()),
        (":scheme", request.scheme.as_str()),
        (":authority", request.host.as_str()),
        (":path", request.path.as_str()),
    ];
    headers.extend(
        request
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str())),
    );
    stream
        .request_headers(&headers, true)
        .expect("on_request_headers");
    let observed = if let Some(reply) = stream.local_response() {
        let pairs: Vec<_> = reply.headers.pairs().collect();
        Observed::from_headers(
            u16::try_from(reply.status).unwrap_or(0),
            pairs.iter().map(|(k, v)| (*k, v.as_ref())),
        )
    } else {
        let mut response = vec![(":status", "200")];
        response.extend(upstream.headers());
        stream
            .response_headers(&response, false)
            .expect("on_response_headers");
        let pairs: Vec<_> = stream.current_response_headers().pairs().collect();
        Observed::from_headers(200, pairs.iter().map(|(k, v)| (*k, v.as_ref())))
    };
    stream.complete().expect("stream completes");
    observed
}

#[test]
fn request_scenarios_in_wasmtime() {
    let file = ScenarioFile::load().expect("scenario file");
    let module = module();
    let mut failures = Vec::new();
    for scenario in &file.scenarios {
        let config = file.plugin_config(&scenario.policy).expect("policy");
        let mut host = host(&module, &config);
        assert!(
            host.configuration_accepted(),
            "{}: {:?}",
            scenario.name,
            host.logs()
        );
        let mut expected = scenario.expect.clone();
        expected.normalise();
        let got = observe(&mut host, &scenario.request, scenario.upstream);
        if got != expected {
            failures.push(format!(
                "{}:\n  expected {expected:?}\n  got      {got:?}",
                scenario.name
            ));
        }
        assert!(
            host.host_call_errors().is_empty(),
            "{}: {:?}",
            scenario.name,
            host.host_call_errors()
        );
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
fn invalid_configurations_rejected_in_wasmtime() {
    let file = ScenarioFile::load().expect("scenario file");
    let module = module();
    for case in &file.invalid_configs {
        let host = host(&module, &case.config);
        assert!(
            !host.configuration_accepted(),
            "{}: configuration accepted",
            case.name
        );
        let logs: Vec<&str> = host.logs().iter().map(|l| l.message.as_str()).collect();
        assert!(
            logs.iter().any(|l| l.contains(&case.log)),
            "{}: no log containing {:?} in {logs:#?}",
            case.name,
            case.log
        );
    }
}

#[test]
fn feed_scenarios_in_wasmtime() {
    let file = ScenarioFile::load().expect("scenario file");
    let module = module();
    for scenario in &file.feed {
        let mut host = host(&module, &file.feed_plugin_config(scenario).expect("config"));
        assert!(
            host.configuration_accepted(),
            "{}: {:?}",
            scenario.name,
            host.logs()
        );
        let counter = format!("autohttps.{}", scenario.counter);
        let before = host.metric(&counter).map_or(0, |m| m.value);
        // A new VM polls at its first tick, 1 ms after configuration (then every interval).
        host.advance_clock(Duration::from_millis(1)).expect("tick");
        let calls: Vec<_> = host.pending_http_calls().into_iter().cloned().collect();
        assert_eq!(calls.len(), 1, "{}: one poll per tick", scenario.name);
        let call = &calls[0];
        assert_eq!(call.upstream, "feed");
        assert_eq!(call.headers.get(":path"), Some("/v1/policy"));
        let answer = &scenario.answer;
        if answer.down {
            host.fail_http_call(call.token).expect("fail call");
        } else if answer.hang {
            // Nothing answers: Envoy ends the call at its timeout with a generated 504, which
            // the host does as its clock passes the call's deadline.
            assert_eq!(call.timeout, Duration::from_millis(FEED_TIMEOUT_MS));
            host.advance_clock(call.timeout).expect("time passes");
            assert!(
                host.pending_http_calls().is_empty(),
                "{}: the call timed out",
                scenario.name
            );
            assert_eq!(
                host.http_calls().len(),
                1,
                "{}: no second poll while one was in flight",
                scenario.name
            );
        } else {
            let status = answer.status.unwrap_or(200).to_string();
            let mut headers = vec![(":status", status.as_str())];
            if let Some(etag) = &answer.etag {
                headers.push(("etag", etag.as_str()));
            }
            let body = file.answer_body(answer).expect("body");
            host.respond_to_http_call(call.token, &headers, body.as_bytes())
                .expect("respond");
        }
        let after = host.metric(&counter).map_or(0, |m| m.value);
        assert_eq!(
            after,
            before + 1,
            "{}: {counter} did not go up; logs {:?}",
            scenario.name,
            host.logs()
        );
        if let Some(phrase) = &scenario.log {
            assert!(
                host.logs()
                    .iter()
                    .any(|l| l.message.contains(phrase.as_str())),
                "{}: no log containing {phrase:?} in {:?}",
                scenario.name,
                host.logs()
            );
        }
        let mut expected = scenario.expect.clone();
        expected.normalise();
        let got = observe(&mut host, &scenario.request, Upstream::Plain);
        assert_eq!(got, expected, "{}", scenario.name);
        // The next poll carries the ETag of an applied version.
        if let Some(etag) = &answer.etag {
            host.advance_clock(Duration::from_millis(250))
                .expect("tick");
            let next = host.pending_http_calls();
            assert_eq!(next.len(), 1);
            assert_eq!(
                next[0].headers.get("if-none-match"),
                Some(etag.as_str()),
                "{}",
                scenario.name
            );
        }
    }
}

/// The long-poll hold the protocol scenarios ask for.
const WAIT_MS: u64 = 5_000;

/// A feed-only VM (no inline policy) that long-polls the stand-in.
fn protocol_host(module: &FilterModule) -> Host {
    let config = format!(
        r#"{{"feed": {{"cluster": "feed", "path": "/v1/policy", "interval_ms": 200, "timeout_ms": 500, "wait_ms": {WAIT_MS}}}}}"#
    );
    let host = host(module, &config);
    assert!(host.configuration_accepted(), "{:?}", host.logs());
    host
}

/// The one call the filter has in flight, as the stand-in reads it, with its token.
fn pending_request(host: &Host) -> (u32, FeedRequest) {
    let calls = host.pending_http_calls();
    assert_eq!(calls.len(), 1, "one feed call in flight: {calls:?}");
    let call = calls[0];
    assert_eq!(
        call.timeout,
        Duration::from_millis(WAIT_MS + FEED_TIMEOUT_MS),
        "the call may last the hold plus timeout_ms"
    );
    let request = FeedRequest::parse(
        call.headers.get(":path").expect(":path"),
        call.headers.get("if-none-match"),
    )
    .expect("a protocol request");
    assert_eq!(request.wait_ms, WAIT_MS);
    (call.token, request)
}

fn respond(host: &mut Host, token: u32, reply: &FeedReply) {
    let status = reply.status.to_string();
    let mut headers = vec![(":status", status.as_str())];
    headers.extend(reply.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    host.respond_to_http_call(token, &headers, reply.body.as_bytes())
        .expect("respond");
}

/// Answers the call in flight from the stand-in; returns what the filter asked.
fn serve(host: &mut Host, feed: &mut FeedStandIn) -> FeedRequest {
    let (token, request) = pending_request(host);
    let reply = feed
        .answer(&request)
        .unwrap_or_else(|| panic!("the stand-in has nothing newer for {request:?}"));
    respond(host, token, &reply);
    request
}

fn metric(host: &Host, name: &str) -> u64 {
    host.metric(&format!("autohttps.{name}"))
        .map_or(0, |m| m.value)
}

fn status_of(host: &mut Host, hostname: &str) -> u16 {
    let request = Request {
        scheme: "http".into(),
        method: "GET".into(),
        host: hostname.into(),
        path: "/".into(),
        headers: Default::default(),
        http_version: None,
        peer: autohttps_tests::conformance::CLIENT_PEER.into(),
    };
    observe(host, &request, Upstream::Plain).status
}

fn main_document(file: &ScenarioFile) -> PolicyDocument {
    serde_json::from_str(&file.policy_json("main").expect("main policy")).expect("a document")
}

fn site_mut<'a>(document: &'a mut PolicyDocument, id: &str) -> &'a mut SiteSpec {
    document
        .sites
        .iter_mut()
        .find(|s| s.id == id)
        .expect("site in the main policy")
}

/// Protocol v1 in the wasmtime host: a snapshot first, then deltas applied in place; an invalid
/// entry isolated; a snapshot when too far behind; a delta that does not fit answered by asking
/// for a snapshot; an older version refused; a rejected document not sent again.
#[test]
fn feed_protocol_in_wasmtime() {
    let file = ScenarioFile::load().expect("scenario file");
    let module = module();
    let mut host = protocol_host(&module);
    let mut feed = FeedStandIn::new("00000000000000aa", main_document(&file));

    // First poll: no version held, so no `since`; a snapshot arrives.
    host.advance_clock(Duration::from_millis(250))
        .expect("tick");
    let first = serve(&mut host, &mut feed);
    assert_eq!(first.since, None);
    assert_eq!(first.if_none_match, None);
    assert_eq!(metric(&host, "policy_snapshots_applied_total"), 1);
    assert_eq!(status_of(&mut host, "plain.test"), 200);

    // Long poll: asked again at once, naming the version held; nothing new, so held.
    let (_, held) = pending_request(&host);
    assert_eq!(held.since.as_deref(), Some(feed.current_version().as_str()));
    assert_eq!(held.if_none_match, held.since);
    assert!(
        feed.answer(&held).is_none(),
        "nothing newer: the feed holds it"
    );

    // A one-site change arrives as a delta and is applied in place.
    let snapshot_bytes = feed.body_bytes;
    let mut next = feed.current().clone();
    let plain = site_mut(&mut next, "plain");
    plain.https = autohttps_filter::policy::HttpsMode::Force;
    plain.cert_ready = vec!["plain.test".into()];
    feed.publish(next);
    serve(&mut host, &mut feed);
    assert_eq!(metric(&host, "policy_deltas_applied_total"), 1);
    assert_eq!(status_of(&mut host, "plain.test"), 301);
    let delta_bytes = feed.body_bytes - snapshot_bytes;
    assert!(
        delta_bytes < 1024,
        "a one-site delta is small: {delta_bytes} bytes"
    );

    // One invalid entry is skipped, the other change applied; the version advances.
    let mut next = feed.current().clone();
    site_mut(&mut next, "canon")
        .hostnames
        .push("not a host".into());
    site_mut(&mut next, "plain").https = autohttps_filter::policy::HttpsMode::Auto;
    let version = feed.publish(next);
    let before = metric(&host, "policy_entries_rejected_total");
    serve(&mut host, &mut feed);
    assert_eq!(metric(&host, "policy_entries_rejected_total"), before + 1);
    assert_eq!(
        status_of(&mut host, "plain.test"),
        200,
        "the valid entry applied"
    );
    assert_eq!(
        status_of(&mut host, "canon.test"),
        302,
        "canon keeps its entry"
    );
    let (_, asked) = pending_request(&host);
    assert_eq!(asked.since.as_deref(), Some(version.as_str()));

    // Too far behind the feed's history: a snapshot (with canon's entry fixed, so the whole
    // document is valid).
    feed.history = 1;
    let canon = site_mut(&mut main_document(&file), "canon").clone();
    for mode in ["force", "auto"] {
        let mut next = feed.current().clone();
        site_mut(&mut next, "plain").https = serde_json::from_value(mode.into()).expect("mode");
        *site_mut(&mut next, "canon") = canon.clone();
        feed.publish(next);
    }
    serve(&mut host, &mut feed);
    assert_eq!(metric(&host, "policy_snapshots_applied_total"), 2);
    feed.history = 1024;

    // A delta from another version: dropped, and the filter asks for a snapshot at once.
    let (token, _) = pending_request(&host);
    let mut next = feed.current().clone();
    site_mut(&mut next, "plain").https = autohttps_filter::policy::HttpsMode::Force;
    let version = feed.publish(next);
    let stray = format!(
        r#"{{"schema":1,"from":"00000000000000aa-1","version":"{version}","upsert":[],"remove":["forced"]}}"#
    );
    let reply = feed.raw("delta", &version, stray);
    respond(&mut host, token, &reply);
    let resync = serve(&mut host, &mut feed);
    assert_eq!(resync.since, None, "asks for a snapshot");
    assert_eq!(resync.if_none_match, None);
    assert_eq!(
        status_of(&mut host, "force.test"),
        301,
        "the stray delta did nothing"
    );
    assert_eq!(
        status_of(&mut host, "plain.test"),
        301,
        "the snapshot applied"
    );

    // An older version of the same epoch (a feed gone back): refused.
    let (token, _) = pending_request(&host);
    let mut older = feed.current().clone();
    older.version = "00000000000000aa-2".into();
    site_mut(&mut older, "plain").https = autohttps_filter::policy::HttpsMode::Auto;
    let rejected_before = metric(&host, "policy_updates_total.result.rejected");
    let reply = feed.raw(
        "snapshot",
        "00000000000000aa-2",
        serde_json::to_string(&older).expect("json"),
    );
    respond(&mut host, token, &reply);
    assert_eq!(
        metric(&host, "policy_updates_total.result.rejected"),
        rejected_before + 1
    );
    assert!(
        host.logs()
            .iter()
            .any(|l| l.message.contains("older than the policy held")),
        "{:?}",
        host.logs()
    );
    assert_eq!(status_of(&mut host, "plain.test"), 301, "never goes back");

    // A rejected snapshot is not sent again: the next requests name it in If-None-Match, and
    // the feed has nothing newer for them.
    host.advance_clock(Duration::from_millis(250))
        .expect("tick");
    let (token, asked) = pending_request(&host);
    let mut broken = feed.current().clone();
    broken.sites.push(broken.sites[0].clone());
    let broken_version = feed.publish(broken);
    // Sent whole, as the feed does when the settings change or its history is short.
    let reply = feed
        .answer(&FeedRequest {
            since: None,
            ..asked
        })
        .expect("the broken document");
    let bytes_before = feed.body_bytes;
    respond(&mut host, token, &reply);
    assert_eq!(
        metric(&host, "policy_updates_total.result.rejected"),
        rejected_before + 2
    );
    for _ in 0..3 {
        host.advance_clock(Duration::from_millis(250))
            .expect("tick");
        let (token, asked) = pending_request(&host);
        assert_eq!(
            asked.if_none_match.as_deref(),
            Some(broken_version.as_str())
        );
        assert!(feed.answer(&asked).is_none(), "nothing newer: {asked:?}");
        let reply = feed.not_modified();
        respond(&mut host, token, &reply);
    }
    assert_eq!(
        feed.body_bytes, bytes_before,
        "the rejected document was sent once"
    );
    assert_eq!(status_of(&mut host, "plain.test"), 301);
    assert!(
        host.host_call_errors().is_empty(),
        "{:?}",
        host.host_call_errors()
    );
}

/// A policy of `sites` sites `s<i>.compact.test`, each forcing HTTPS with its certificate ready.
fn compact_sites(sites: usize) -> Vec<SiteSpec> {
    (0..sites)
        .map(|i| {
            let name = format!("s{i}.compact.test");
            serde_json::from_value(serde_json::json!({
                "id": format!("s{i}"), "hostnames": [name], "https": "force", "cert_ready": [name]
            }))
            .expect("a site")
        })
        .collect()
}

fn compact_body(version: &str, sites: &[SiteSpec]) -> Vec<u8> {
    compact::encode_snapshot(version, &Settings::default(), sites).expect("encodes")
}

const COMPACT_EPOCH: &str = "00000000000000c1";

/// A VM holding one inline site (`old.compact.test`, forced) at version `<epoch>-1`, polling
/// every 200 ms without long poll.
fn compact_host(module: &FilterModule) -> Host {
    let config = format!(
        r#"{{"policy": {{"schema": 1, "version": "{COMPACT_EPOCH}-1", "sites": [{{"id": "old", "hostnames": ["old.compact.test"], "https": "force", "cert_ready": ["old.compact.test"]}}]}}, "feed": {{"cluster": "feed", "interval_ms": 200, "timeout_ms": 500}}}}"#
    );
    let host = host(module, &config);
    assert!(host.configuration_accepted(), "{:?}", host.logs());
    host
}

/// A new VM asks the feed for its policy at once, not one poll interval later: with long
/// polling the interval is the slow fallback (a minute here), and a VM that waited it would
/// serve no policy for that long. After the first tick the timer runs at the interval.
#[test]
fn a_new_vm_asks_the_feed_at_once_then_polls_at_its_interval() {
    let module = module();
    let mut host = host(
        &module,
        r#"{"feed": {"cluster": "feed", "interval_ms": 60000, "timeout_ms": 500, "wait_ms": 5000}}"#,
    );
    assert!(host.configuration_accepted(), "{:?}", host.logs());
    assert!(
        host.pending_http_calls().is_empty(),
        "no call before the first tick"
    );
    host.advance_clock(Duration::from_millis(5)).expect("tick");
    let calls = host.pending_http_calls();
    assert_eq!(
        calls.len(),
        1,
        "the first poll went out within 5 ms: {calls:?}"
    );
    assert_eq!(host.tick_period(), Some(Duration::from_secs(60)));
    let token = calls[0].token;
    host.fail_http_call_with(token, HttpCallFailure::ConnectionFailure)
        .expect("fail");
    // A failed poll waits for the next tick: one interval, not the short first period.
    host.advance_clock(Duration::from_secs(59)).expect("ticks");
    assert!(
        host.pending_http_calls().is_empty(),
        "{:?}",
        host.pending_http_calls()
    );
    host.advance_clock(Duration::from_secs(2)).expect("tick");
    assert_eq!(host.pending_http_calls().len(), 1);
}

fn answer_compact(host: &mut Host, version: &str, body: &[u8]) {
    host.advance_clock(Duration::from_millis(200))
        .expect("tick");
    let calls = host.pending_http_calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    let accept = calls[0].headers.get("accept").unwrap_or_default();
    assert!(
        accept.contains(compact::CONTENT_TYPE),
        "the filter asks for the compact snapshot: {accept:?}"
    );
    let token = calls[0].token;
    let etag = format!("\"{version}\"");
    host.respond_to_http_call(
        token,
        &[
            (":status", "200"),
            ("etag", etag.as_str()),
            ("autohttps-policy-kind", "snapshot"),
            ("content-type", compact::CONTENT_TYPE),
        ],
        body,
    )
    .expect("respond");
}

/// A big compact snapshot is only copied into the VM by its response callback, then built a
/// slice per 1 ms tick; until the last slice the VM serves the policy it held, then swaps,
/// restores its poll interval and names the new version with the callbacks it took.
#[test]
fn compact_snapshot_is_built_in_slices_in_wasmtime() {
    let module = module();
    let mut host = compact_host(&module);
    let sites = compact_sites(10_000);
    let version = format!("{COMPACT_EPOCH}-2");
    answer_compact(&mut host, &version, &compact_body(&version, &sites));
    assert_eq!(host.tick_period(), Some(Duration::from_millis(1)));
    let ticks = ticks_until_swapped(&mut host, 10_000, |host| {
        // Until the swap, the old policy answers and the new one does not.
        assert_eq!(status_of(host, "old.compact.test"), 301);
        assert_eq!(status_of(host, "s9999.compact.test"), 200);
        assert_eq!(metric(host, "policy_sites"), 1);
        assert!(
            host.pending_http_calls().is_empty(),
            "no poll while building"
        );
    });
    assert!(ticks >= 2, "10,000 sites took {ticks} ticks: not sliced");
    assert_eq!(status_of(&mut host, "old.compact.test"), 200);
    assert_eq!(status_of(&mut host, "s9999.compact.test"), 301);
    assert_eq!(status_of(&mut host, "s0.compact.test"), 301);
    assert_eq!(metric(&host, "policy_snapshots_applied_total"), 1);
    assert_eq!(host.tick_period(), Some(Duration::from_millis(200)));
    // The response callback, then one slice per tick (4,096 sites each: the clock of this
    // host stands still within a call, so the site cap decides).
    assert_eq!(ticks, 10_000usize.div_ceil(4_096));
    assert_built_in_slices(&host, &version, 10_000, ticks + 1);
    host.advance_clock(Duration::from_millis(200))
        .expect("tick");
    let calls = host.pending_http_calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(
        calls[0].headers.get("if-none-match"),
        Some(format!("\"{version}\"").as_str())
    );
}

/// A VM that holds no site yet (Envoy starting, a VM replaced after a trap) passes every
/// request as an unknown host until its first snapshot is whole, so it builds that snapshot in
/// bigger slices: 16,384 sites per tick here (2 ms by the clock in Envoy), where a VM holding
/// sites takes 4,096 (0.15 ms; see the test above).
#[test]
fn a_vm_holding_no_site_builds_its_first_snapshot_in_bigger_slices_in_wasmtime() {
    let module = module();
    let mut host = host(
        &module,
        r#"{"feed": {"cluster": "feed", "interval_ms": 200, "timeout_ms": 500}}"#,
    );
    assert!(host.configuration_accepted(), "{:?}", host.logs());
    let sites = compact_sites(20_000);
    let version = format!("{COMPACT_EPOCH}-2");
    answer_compact(&mut host, &version, &compact_body(&version, &sites));
    assert_eq!(host.tick_period(), Some(Duration::from_millis(1)));
    let ticks = ticks_until_swapped(&mut host, 20_000, |host| {
        assert_eq!(status_of(host, "s19999.compact.test"), 200);
    });
    assert_eq!(ticks, 20_000usize.div_ceil(16_384));
    assert_eq!(status_of(&mut host, "s19999.compact.test"), 301);
    assert_eq!(status_of(&mut host, "s0.compact.test"), 301);
    assert_eq!(host.tick_period(), Some(Duration::from_millis(200)));
    assert_built_in_slices(&host, &version, 20_000, ticks + 1);
}

/// Advances the clock 1 ms at a time until the VM holds `sites` sites, checking `before_tick`
/// first each time (what must hold until the swap); returns the ticks it took.
fn ticks_until_swapped(
    host: &mut Host,
    sites: u64,
    mut before_tick: impl FnMut(&mut Host),
) -> usize {
    let mut ticks = 0;
    while metric(host, "policy_sites") != sites {
        before_tick(host);
        host.advance_clock(Duration::from_millis(1)).expect("tick");
        ticks += 1;
        assert!(ticks < 100, "never swapped: {:?}", host.logs());
    }
    ticks
}

/// The "applied" line of a sliced build, in this host whose clock stands still within a call.
fn assert_built_in_slices(host: &Host, version: &str, sites: usize, slices: usize) {
    assert!(
        host.logs().iter().any(|l| l.message.contains(&format!(
            "policy \"{version}\" applied ({sites} sites, built in {slices} slices, the longest 0.0 ms)"
        ))),
        "{:?}",
        host.logs()
    );
}

/// A compact snapshot of up to 1,024 sites is built in its response callback: no tick needed.
#[test]
fn a_small_compact_snapshot_is_built_in_its_response_callback_in_wasmtime() {
    let module = module();
    let mut host = compact_host(&module);
    let sites = compact_sites(1_024);
    let version = format!("{COMPACT_EPOCH}-2");
    answer_compact(&mut host, &version, &compact_body(&version, &sites));
    assert_eq!(metric(&host, "policy_sites"), 1_024);
    assert_eq!(status_of(&mut host, "s1023.compact.test"), 301);
    assert!(
        host.logs().iter().any(|l| l.message.contains(&format!(
            "policy \"{version}\" applied (1024 sites, built in 1 slice, the longest"
        ))),
        "{:?}",
        host.logs()
    );
}

/// Truncated, padded, miscounted, corrupted, invalid or older compact snapshots are refused
/// and the last good policy kept, each time.
#[test]
fn bad_compact_snapshots_keep_the_last_good_policy_in_wasmtime() {
    let module = module();
    let mut host = compact_host(&module);
    let sites = compact_sites(5_000);
    let version = format!("{COMPACT_EPOCH}-2");
    let good = compact_body(&version, &sites);
    let mut invalid_sites = sites.clone();
    invalid_sites[4_321].hostnames.push("not a host".into());
    let mut padded = good.clone();
    padded.extend_from_slice(b"\0\0");
    let mut noise = good.clone();
    for i in (20..noise.len()).step_by(97) {
        noise[i] = 0xff;
    }
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "cut in the header",
            good[..12].to_vec(),
            "truncated or malformed",
        ),
        (
            "cut in the last site",
            good[..good.len() - 3].to_vec(),
            "truncated or malformed",
        ),
        ("bytes after the last site", padded, "after the last site"),
        ("bytes overwritten", noise, "invalid policy"),
        (
            "an invalid site",
            compact_body(&version, &invalid_sites),
            "sites[4321].hostnames[1]",
        ),
        (
            "not compact at all",
            b"{\"schema\": 1}".to_vec(),
            "not a compact snapshot",
        ),
    ];
    for (rejected, (what, body, phrase)) in cases.into_iter().enumerate() {
        answer_compact(&mut host, &version, &body);
        for _ in 0..10 {
            host.advance_clock(Duration::from_millis(1)).expect("tick");
        }
        assert_eq!(
            metric(&host, "policy_updates_total.result.rejected"),
            rejected as u64 + 1,
            "{what}: {:?}",
            host.logs()
        );
        assert!(
            host.logs().iter().any(|l| l.message.contains(phrase)),
            "{what}: no log with {phrase:?}: {:?}",
            host.logs()
        );
        assert_eq!(metric(&host, "policy_sites"), 1, "{what}");
        assert_eq!(status_of(&mut host, "old.compact.test"), 301, "{what}");
        assert_eq!(status_of(&mut host, "s1.compact.test"), 200, "{what}");
        assert_eq!(
            host.tick_period(),
            Some(Duration::from_millis(200)),
            "{what}"
        );
        // Each answer is a new document for the filter: forget it so the next is not a 304.
        host.advance_clock(Duration::from_millis(200))
            .expect("tick");
        let token = host.pending_http_calls()[0].token;
        host.respond_to_http_call(token, &[(":status", "304")], b"")
            .expect("304");
    }
    // An older version than the one held is refused before any slice is built.
    let older = compact_body(&format!("{COMPACT_EPOCH}-0"), &sites);
    answer_compact(&mut host, &format!("{COMPACT_EPOCH}-0"), &older);
    assert_eq!(host.tick_period(), Some(Duration::from_millis(200)));
    assert!(
        host.logs()
            .iter()
            .any(|l| l.message.contains("older than the policy held"))
    );
    assert_eq!(status_of(&mut host, "old.compact.test"), 301);
    // And the good one applies.
    host.advance_clock(Duration::from_millis(200))
        .expect("tick");
    let token = host.pending_http_calls()[0].token;
    host.respond_to_http_call(token, &[(":status", "304")], b"")
        .expect("304");
    answer_compact(&mut host, &version, &good);
    host.advance_clock(Duration::from_millis(10))
        .expect("ticks");
    assert_eq!(metric(&host, "policy_sites"), 5_000, "{:?}", host.logs());
    assert_eq!(status_of(&mut host, "s1.compact.test"), 301);
}
