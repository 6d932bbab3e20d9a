//! Tests of every supported host call, end to end, through the `autohttps-host-probe-filter`
//! fixture (built with the proxy-wasm Rust SDK, as real filters are).

use std::sync::OnceLock;
use std::time::Duration;

use proxy_wasm_host::{
    Action, FilterModule, Host, HostBuilder, HttpCallFailure, LogLevel, MetricType, WasmHostError,
    build_workspace_wasm,
};

fn probe() -> FilterModule {
    static MODULE: OnceLock<FilterModule> = OnceLock::new();
    MODULE
        .get_or_init(|| {
            let wasm = build_workspace_wasm("autohttps-host-probe-filter")
                .unwrap_or_else(|e| panic!("building the probe filter: {e}"));
            FilterModule::load(wasm).unwrap_or_else(|e| panic!("loading the probe filter: {e}"))
        })
        .clone()
}

fn host(plugin_configuration: &str) -> anyhow::Result<Host> {
    Ok(HostBuilder::new(&probe())
        .plugin_configuration(plugin_configuration)
        .build()?)
}

fn request(method: &'static str, path: &'static str) -> Vec<(&'static str, &'static str)> {
    vec![
        (":method", method),
        (":scheme", "https"),
        (":authority", "a.test"),
        (":path", path),
    ]
}

fn has_log(host: &Host, needle: &str) -> bool {
    host.logs().iter().any(|l| l.message.contains(needle))
}

#[test]
fn vm_and_plugin_configuration_and_log_level_reach_the_filter() -> anyhow::Result<()> {
    let host = HostBuilder::new(&probe())
        .vm_configuration("vm-settings")
        .plugin_configuration("tick_ms=1000")
        .log_level(LogLevel::Warn)
        .build()?;
    assert!(host.configuration_accepted());
    assert!(has_log(&host, "vm configuration: vm-settings"));
    // The default clock starts at 2025-01-01T00:00:00Z.
    assert!(has_log(&host, "configured at 1735689600: tick_ms=1000"));
    assert!(has_log(&host, "host log level: Warn"));
    assert_eq!(host.tick_period(), Some(Duration::from_secs(1)));
    Ok(())
}

#[test]
fn configuration_rejected_by_the_filter_blocks_streams() -> anyhow::Result<()> {
    let mut host = host("reject")?;
    assert!(host.vm_started());
    assert!(!host.configuration_accepted());
    assert!(matches!(
        host.http_stream().unwrap_err(),
        WasmHostError::ConfigurationRejected("configure")
    ));
    assert!(has_log(&host, "configuration rejected"));
    Ok(())
}

#[test]
fn request_headers_are_edited_with_properties_and_shared_data() -> anyhow::Result<()> {
    let mut host = host("")?;
    host.set_shared_data(b"policy", b"v1");
    let mut stream = host.http_stream()?;
    stream
        .set_property(&["source", "address"], "127.0.0.1:5555")
        .set_property(&["connection", "tls_version"], "TLSv1.3");
    let mut headers = request("GET", "/x");
    headers.extend([("x-replace", "a"), ("X-Replace", "b"), ("x-remove", "gone")]);
    assert_eq!(stream.request_headers(&headers, true)?, Action::Continue);
    let seen = stream.current_request_headers();
    assert_eq!(seen.get("x-probe-source"), Some("127.0.0.1:5555"));
    assert_eq!(seen.get("x-probe-tls"), Some("TLSv1.3"));
    assert_eq!(seen.get("x-probe-prop"), Some("yes"));
    assert_eq!(seen.get("x-probe-scheme"), Some("https"));
    assert_eq!(seen.get("x-probe-policy"), Some("v1"));
    assert_eq!(seen.get_all("x-replace"), ["replaced"]);
    // Envoy's setCopy removes the header and appends it: it moves to the end.
    let names: Vec<&str> = seen.byte_pairs().map(|(k, _)| k).collect();
    assert_eq!(
        names[names.len() - 2..],
        ["x-replace", "x-probe-count"],
        "{names:?}"
    );
    assert!(!seen.contains("x-remove"));
    // Four pseudo-headers, the replaced one, and the five added before counting.
    assert_eq!(seen.get("x-probe-count"), Some("10"));
    assert_eq!(stream.property(&["probe_seen"]), Some(&b"yes"[..]));
    Ok(())
}

#[test]
fn plain_connection_without_properties_reads_as_unknown_and_none() -> anyhow::Result<()> {
    let mut host = host("")?;
    let mut stream = host.http_stream()?;
    stream.request_headers(&request("GET", "/"), true)?;
    let seen = stream.current_request_headers();
    assert_eq!(seen.get("x-probe-source"), Some("unknown"));
    assert_eq!(seen.get("x-probe-tls"), Some("none"));
    assert!(!seen.contains("x-probe-policy"));
    Ok(())
}

#[test]
fn response_headers_are_annotated_and_body_appended() -> anyhow::Result<()> {
    let mut host = host("")?;
    let mut stream = host.http_stream()?;
    stream.request_headers(&request("GET", "/"), true)?;
    let action = stream.response_headers(&[(":status", "200"), ("server", "envoy")], false)?;
    assert_eq!(action, Action::Continue);
    let seen = stream.current_response_headers();
    assert_eq!(seen.get("x-probe"), Some("1"));
    assert_eq!(seen.get("x-probe-status"), Some("200"));
    assert_eq!(seen.get_all("server"), ["probe"]);
    assert_eq!(stream.response_body(b"hello", true)?, Action::Continue);
    assert_eq!(stream.forwarded_response_body(), b"hello!");
    Ok(())
}

#[test]
fn local_reply_passes_through_the_filters_own_response_callbacks() -> anyhow::Result<()> {
    let mut host = host("")?;
    let mut stream = host.http_stream()?;
    assert_eq!(
        stream.request_headers(&request("GET", "/local"), true)?,
        Action::Pause
    );
    let reply = stream.local_response().expect("a local reply");
    assert_eq!(reply.status, 403);
    assert_eq!(reply.body, b"denied");
    assert_eq!(reply.headers.get("x-local"), Some("1"));
    let seen = stream.current_response_headers();
    assert_eq!(seen.get(":status"), Some("403"));
    assert_eq!(seen.get("x-local"), Some("1"));
    assert_eq!(seen.get("content-length"), Some("6"));
    assert_eq!(seen.get("content-type"), Some("text/plain"));
    assert_eq!(seen.get("x-probe-status"), Some("403"));
    assert_eq!(stream.forwarded_response_body(), b"denied!");
    Ok(())
}

#[test]
fn http_call_from_a_stream_is_recorded_answered_and_resumes_it() -> anyhow::Result<()> {
    let mut host = HostBuilder::new(&probe()).cluster("feed").build()?;
    let mut stream = host.http_stream()?;
    let id = stream.id();
    assert_eq!(
        stream.request_headers(&request("GET", "/call"), true)?,
        Action::Pause
    );
    let calls = host.pending_http_calls();
    assert_eq!(calls.len(), 1);
    let call = calls[0].clone();
    assert_eq!(call.upstream, "feed");
    assert_eq!(call.context_id, id);
    assert_eq!(call.headers.get(":method"), Some("POST"));
    assert_eq!(call.headers.get(":path"), Some("/lookup"));
    assert_eq!(call.headers.get("content-length"), Some("1"));
    assert_eq!(call.body, b"q");
    assert_eq!(call.timeout, Duration::from_secs(2));

    host.respond_to_http_call(
        call.token,
        &[(":status", "200"), ("x-answer", "42")],
        b"yes",
    )?;
    assert!(host.pending_http_calls().is_empty());
    assert_eq!(host.http_calls().len(), 1);
    let stream = host.stream(id)?;
    assert_eq!(stream.request_continued(), 1);
    assert_eq!(stream.current_request_headers().get("x-answer"), Some("42"));
    assert_eq!(
        stream.current_request_headers().get("x-answer-body"),
        Some("yes")
    );
    assert!(matches!(
        host.respond_to_http_call(call.token, &[], b""),
        Err(WasmHostError::UnknownHttpCall(_))
    ));
    Ok(())
}

#[test]
fn http_call_to_an_undeclared_cluster_is_refused() -> anyhow::Result<()> {
    let mut host = HostBuilder::new(&probe()).cluster("other").build()?;
    let mut stream = host.http_stream()?;
    assert_eq!(
        stream.request_headers(&request("GET", "/call"), true)?,
        Action::Continue
    );
    assert!(host.http_calls().is_empty());
    assert!(has_log(&host, "dispatch: BadArgument"));
    Ok(())
}

#[test]
fn ticks_fire_as_the_clock_advances_and_poll_the_feed() -> anyhow::Result<()> {
    let mut host = host("tick_ms=1000")?;
    assert_eq!(host.advance_clock(Duration::from_millis(3500))?, 3);
    let tokens: Vec<u32> = host.pending_http_calls().iter().map(|c| c.token).collect();
    assert_eq!(tokens.len(), 3);
    assert!(
        host.http_calls().iter().all(|c| c.upstream == "feed"
            && c.context_id == 1
            && c.timeout == Duration::from_secs(5))
    );
    host.respond_to_http_call(tokens[0], &[(":status", "200")], b"v2")?;
    assert_eq!(host.shared_data(b"policy"), Some(&b"v2"[..]));
    // The filter reads the CAS afresh, so a second update applies too.
    host.respond_to_http_call(tokens[1], &[(":status", "200")], b"v3")?;
    assert_eq!(host.shared_data(b"policy"), Some(&b"v3"[..]));
    assert!(has_log(&host, "policy stored from 200"));
    let updates = host.metric("probe.feed_updates").expect("counter");
    assert_eq!((updates.kind, updates.value), (MetricType::Counter, 2));
    // Ticks so far fell at 1 s, 2 s and 3 s; the next is due at exactly 4 s.
    assert_eq!(host.advance_clock(Duration::from_millis(499))?, 0);
    assert_eq!(host.advance_clock(Duration::from_millis(1))?, 1);
    Ok(())
}

#[test]
fn reset_after_headers_reports_broken_connection_through_get_status() -> anyhow::Result<()> {
    let mut host = host("tick_ms=1000")?;
    host.tick()?;
    let token = host.pending_http_calls()[0].token;
    host.fail_http_call_with(token, HttpCallFailure::ResetAfterHeaders)?;
    assert!(has_log(
        &host,
        &format!("feed call {token} failed: Ok((11, Some(\"reset\")))")
    ));
    assert_eq!(host.shared_data(b"policy"), None);
    Ok(())
}

#[test]
fn unreachable_upstream_is_envoys_generated_503() -> anyhow::Result<()> {
    let mut host = host("tick_ms=1000")?;
    host.tick()?;
    let token = host.pending_http_calls()[0].token;
    host.fail_http_call(token)?;
    // The probe stores any answer with headers: this one is Envoy's local reply.
    assert!(has_log(&host, "policy stored from 503"));
    let body = host.shared_data(b"policy").expect("stored");
    assert!(
        body.starts_with(b"upstream connect error or disconnect/reset before headers"),
        "{}",
        String::from_utf8_lossy(body)
    );
    Ok(())
}

#[test]
fn a_call_past_its_timeout_gets_envoys_504_on_the_root_context() -> anyhow::Result<()> {
    let mut host = host("tick_ms=1000")?;
    // Ticks at 1 s and 2 s dispatch calls with a 5 s timeout: the first ends at 6 s.
    assert_eq!(host.advance_clock(Duration::from_millis(5999))?, 5);
    assert!(!has_log(&host, "policy stored from 504"));
    assert_eq!(host.pending_http_calls().len(), 5);
    host.advance_clock(Duration::from_millis(1))?;
    assert!(has_log(&host, "policy stored from 504"));
    assert_eq!(
        host.shared_data(b"policy"),
        Some(&b"upstream request timeout"[..])
    );
    assert_eq!(
        host.pending_http_calls().len(),
        5,
        "one ended, one more dispatched at 6 s"
    );
    Ok(())
}

#[test]
fn buffering_a_request_body_past_the_buffer_limit_is_answered_413() -> anyhow::Result<()> {
    let mut host = HostBuilder::new(&probe()).buffer_limit(8).build()?;
    let mut stream = host.http_stream()?;
    stream.request_headers(&request("POST", "/body"), false)?;
    assert_eq!(stream.request_body(b"01234", false)?, Action::Pause);
    assert_eq!(stream.local_response(), None);
    assert_eq!(stream.request_body(b"56789", false)?, Action::Pause);
    let reply = stream.local_response().expect("Envoy's 413").clone();
    assert_eq!(
        (reply.status, reply.details.as_str(), reply.body.as_slice()),
        (413, "request_payload_too_large", &b"Payload Too Large"[..])
    );
    // Envoy encodes it through the filter's response callbacks, like any local reply.
    let seen = stream.current_response_headers();
    assert_eq!(seen.get(":status"), Some("413"));
    assert_eq!(seen.get("x-probe-status"), Some("413"));
    assert_eq!(stream.reset_reason(), None);
    assert!(stream.is_complete());
    assert!(matches!(
        stream.request_body(b"x", true),
        Err(WasmHostError::StreamCompleted(_))
    ));
    assert_eq!(proxy_wasm_host::DEFAULT_BUFFER_LIMIT, 1 << 20);
    Ok(())
}

#[test]
fn request_body_is_buffered_until_end_of_stream_then_rewritten() -> anyhow::Result<()> {
    let mut host = host("")?;
    let mut stream = host.http_stream()?;
    stream.request_headers(&request("POST", "/body"), false)?;
    assert_eq!(stream.request_body(b"abc", false)?, Action::Pause);
    assert_eq!(stream.buffered_request_body(), b"abc");
    assert!(stream.forwarded_request_body().is_empty());
    assert_eq!(stream.request_body(b"def", true)?, Action::Continue);
    assert_eq!(stream.forwarded_request_body(), b"ABCDEF");
    let histogram = host.metric("probe.body_size").expect("histogram");
    assert_eq!(histogram.kind, MetricType::Histogram);
    assert_eq!(histogram.samples, [6]);
    Ok(())
}

#[test]
fn close_stream_is_recorded() -> anyhow::Result<()> {
    let mut host = host("")?;
    let mut stream = host.http_stream()?;
    stream.request_headers(&request("GET", "/close"), true)?;
    assert!(stream.request_closed());
    assert!(!stream.response_closed());
    Ok(())
}

#[test]
fn set_header_map_pairs_replaces_every_response_header() -> anyhow::Result<()> {
    let mut host = host("")?;
    let mut stream = host.http_stream()?;
    stream.request_headers(&request("GET", "/rewrite-response"), true)?;
    stream.response_headers(&[(":status", "404"), ("Server", "envoy")], true)?;
    let pairs: Vec<(&str, &[u8])> = stream.current_response_headers().byte_pairs().collect();
    assert_eq!(pairs, [(":status", &b"200"[..]), ("x-only", b"1")]);
    Ok(())
}

#[test]
fn access_log_phase_reads_final_headers_and_metrics() -> anyhow::Result<()> {
    let mut host = host("")?;
    let mut stream = host.http_stream()?;
    stream.request_headers(&request("GET", "/x"), true)?;
    stream.response_headers(&[(":status", "204")], true)?;
    stream.complete()?;
    assert!(has_log(&host, "access /x 204 after 1 requests"));
    assert_eq!(host.metric("probe.requests").map(|m| m.value), Some(1));
    let inflight = host.metric("probe.inflight").expect("gauge");
    assert_eq!((inflight.kind, inflight.value), (MetricType::Gauge, 0));
    Ok(())
}

#[test]
fn grpc_call_to_a_missing_cluster_is_a_parse_failure_as_in_envoy() -> anyhow::Result<()> {
    let mut host = host("")?;
    let mut stream = host.http_stream()?;
    assert_eq!(
        stream.request_headers(&request("GET", "/grpc"), true)?,
        Action::Continue
    );
    assert!(has_log(&host, "grpc: Err(ParseFailure)"));
    assert_eq!(host.host_call_errors(), &[]);
    assert_eq!(host.host_call_counts().get("proxy_grpc_call"), Some(&1));
    // A cluster the test declared would have been called by Envoy: the host says it cannot.
    let mut host = HostBuilder::new(&probe()).cluster("grpc").build()?;
    host.http_stream()?
        .request_headers(&request("GET", "/grpc"), true)?;
    assert_eq!(host.host_call_errors()[0].call, "proxy_grpc_call");
    Ok(())
}

#[test]
fn request_headers_are_gone_once_the_request_continued_as_in_envoy() -> anyhow::Result<()> {
    let mut host = host("")?;
    let mut stream = host.http_stream()?;
    assert_eq!(
        stream.request_headers(&request("GET", "/late-read"), true)?,
        Action::Continue
    );
    let err = stream
        .response_headers(&[(":status", "200")], true)
        .unwrap_err();
    assert!(matches!(err, WasmHostError::Trap { .. }), "{err}");
    // BadArgument (2): the map is not available in this callback.
    assert!(has_log(&host, "unexpected status: 2"));
    Ok(())
}

#[test]
fn plugin_shutdown_can_finish_later_through_proxy_done() -> anyhow::Result<()> {
    let mut host = host("slow_done")?;
    assert!(!host.shutdown()?);
    assert!(!host.plugin_done());
    host.tick()?;
    assert!(host.plugin_done());
    assert!(has_log(&host, "shutdown finished"));
    Ok(())
}

#[test]
fn plugin_shutdown_finishes_at_once_by_default() -> anyhow::Result<()> {
    let mut host = host("")?;
    assert!(host.shutdown()?);
    assert!(host.plugin_done());
    Ok(())
}
