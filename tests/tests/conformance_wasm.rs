//! Conformance, half (a): every scenario of `tests/conformance/scenarios.json` run on the
//! release filter in the wasmtime proxy-wasm host. Half (b), the same table in a real Envoy,
//! is `conformance_envoy.rs`; both compare against the same expectations.

use std::time::Duration;

use autohttps_filter::policy::DIRECT_PEER_FILTER_STATE;
use autohttps_tests::conformance::{FEED_TIMEOUT_MS, Observed, Request, ScenarioFile, Upstream};
use autohttps_tests::envoy::filter_wasm;
use proxy_wasm_host::{FilterModule, Host, HostBuilder};

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
        host.advance_clock(Duration::from_millis(250))
            .expect("tick");
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
