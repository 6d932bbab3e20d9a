//! Tests of the wasmtime proxy-wasm host against the minimal fixture filter and tiny
//! hand-written modules (for what an SDK-built filter cannot do on purpose: trap, reject its
//! configuration, import a call the host lacks).

use std::sync::OnceLock;
use std::thread;
use std::time::Duration;

use proxy_wasm_host::{
    Action, FilterModule, HostBuilder, LogLevel, MetricType, Status, WasmHostError,
    build_workspace_wasm,
};

fn minimal_filter() -> FilterModule {
    static MODULE: OnceLock<FilterModule> = OnceLock::new();
    MODULE
        .get_or_init(|| {
            let wasm = build_workspace_wasm("autohttps-minimal-filter")
                .unwrap_or_else(|e| panic!("building the minimal filter: {e}"));
            FilterModule::load(wasm).unwrap_or_else(|e| panic!("loading the minimal filter: {e}"))
        })
        .clone()
}

fn get(authority: &str, path: &str) -> [(&'static str, String); 4] {
    [
        (":method", "GET".to_owned()),
        (":scheme", "http".to_owned()),
        (":authority", authority.to_owned()),
        (":path", path.to_owned()),
    ]
}

fn pairs<'a>(headers: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    headers.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

#[test]
fn minimal_filter_redirects_to_https_on_same_authority_and_path() -> anyhow::Result<()> {
    let mut host = HostBuilder::new(&minimal_filter()).build()?;
    assert!(host.configuration_accepted());
    let mut stream = host.http_stream()?;
    let action = stream.request_headers(&pairs(&get("a.test", "/x/y?z=1&w")), true)?;
    assert_eq!(action, Action::Pause);
    let reply = stream.local_response().expect("a local response");
    assert_eq!(reply.status, 301);
    assert_eq!(
        reply.headers.get("location"),
        Some("https://a.test/x/y?z=1&w")
    );
    assert!(reply.body.is_empty());
    assert_eq!(stream.local_responses().len(), 1);
    stream.complete()?;
    assert!(stream.is_complete());
    Ok(())
}

#[test]
fn local_reply_reaches_the_client_with_status_and_location() -> anyhow::Result<()> {
    let mut host = HostBuilder::new(&minimal_filter()).build()?;
    let mut stream = host.http_stream()?;
    stream.request_headers(&pairs(&get("b.test:8080", "/")), true)?;
    let seen = stream.current_response_headers();
    assert_eq!(seen.get(":status"), Some("301"));
    assert_eq!(seen.get("location"), Some("https://b.test:8080/"));
    Ok(())
}

#[test]
fn minimal_filter_logs_the_redirect_at_info_from_the_stream_context() -> anyhow::Result<()> {
    let mut host = HostBuilder::new(&minimal_filter()).build()?;
    let mut stream = host.http_stream()?;
    let id = stream.id();
    stream.request_headers(&pairs(&get("a.test", "/p")), true)?;
    let log = host
        .logs()
        .iter()
        .find(|l| l.message == "redirecting to https://a.test/p")
        .expect("the redirect log line");
    assert_eq!(log.level, LogLevel::Info);
    assert_eq!(log.context_id, id);
    Ok(())
}

#[test]
fn minimal_filter_counts_redirects_in_a_counter() -> anyhow::Result<()> {
    let mut host = HostBuilder::new(&minimal_filter()).build()?;
    for n in 0..3 {
        let mut stream = host.http_stream()?;
        stream.request_headers(&pairs(&get("a.test", &format!("/{n}"))), true)?;
        stream.complete()?;
    }
    let counter = host
        .metric("minimal_filter.redirects")
        .expect("the counter");
    assert_eq!(counter.kind, MetricType::Counter);
    assert_eq!(counter.value, 3);
    Ok(())
}

#[test]
fn minimal_filter_makes_five_host_calls_per_request() -> anyhow::Result<()> {
    let mut host = HostBuilder::new(&minimal_filter()).build()?;
    let mut stream = host.http_stream()?;
    stream.request_headers(&pairs(&get("a.test", "/")), true)?;
    // Two header reads, one log line, the local response, the counter.
    assert_eq!(stream.host_calls(), 5);
    let counts = host.host_call_counts();
    assert_eq!(counts.get("proxy_get_header_map_value"), Some(&2));
    assert_eq!(counts.get("proxy_send_local_response"), Some(&1));
    Ok(())
}

#[test]
fn minimal_filter_makes_no_unsupported_host_call() -> anyhow::Result<()> {
    let module = minimal_filter();
    // The SDK's dispatcher links the gRPC, shared-queue and foreign-function imports whether
    // a filter uses them or not; the fixture must never call them.
    assert!(
        module
            .unsupported_imports()
            .iter()
            .all(|name| name.contains("grpc")
                || name.contains("queue")
                || name.contains("foreign")),
        "{:?}",
        module.unsupported_imports()
    );
    let mut host = HostBuilder::new(&module).build()?;
    let mut stream = host.http_stream()?;
    stream.request_headers(&pairs(&get("a.test", "/")), true)?;
    stream.complete()?;
    assert_eq!(host.host_call_errors(), &[]);
    Ok(())
}

#[test]
fn hosts_in_parallel_do_not_interfere() -> anyhow::Result<()> {
    let module = minimal_filter();
    let workers: Vec<_> = (1..=4)
        .map(|worker| {
            let module = module.clone();
            thread::spawn(move || -> anyhow::Result<(u64, Vec<String>)> {
                let mut host = HostBuilder::new(&module).build()?;
                for n in 0..worker * 5 {
                    let mut stream = host.http_stream()?;
                    let authority = format!("w{worker}.test");
                    stream.request_headers(&pairs(&get(&authority, &format!("/{n}"))), true)?;
                    let location = stream
                        .local_response()
                        .and_then(|r| r.headers.get("location"))
                        .map(str::to_owned);
                    assert_eq!(location, Some(format!("https://{authority}/{n}")));
                    stream.complete()?;
                }
                let count = host
                    .metric("minimal_filter.redirects")
                    .map_or(0, |m| m.value);
                let messages = host.logs().iter().map(|l| l.message.clone()).collect();
                Ok((count, messages))
            })
        })
        .collect();
    for (worker, handle) in (1..=4u64).zip(workers) {
        let (count, messages) = handle
            .join()
            .map_err(|_| anyhow::anyhow!("worker {worker} panicked"))??;
        assert_eq!(count, worker * 5);
        assert_eq!(messages.len() as u64, worker * 5);
        let own = format!("https://w{worker}.test/");
        assert!(messages.iter().all(|m| m.contains(&own)), "{messages:?}");
    }
    Ok(())
}

#[test]
fn completed_stream_refuses_further_callbacks() -> anyhow::Result<()> {
    let mut host = HostBuilder::new(&minimal_filter()).build()?;
    let mut stream = host.http_stream()?;
    stream.request_headers(&pairs(&get("a.test", "/")), true)?;
    stream.complete()?;
    let err = stream
        .response_headers(&[(":status", "200")], true)
        .unwrap_err();
    assert!(matches!(err, WasmHostError::StreamCompleted(_)), "{err}");
    Ok(())
}

#[test]
fn clock_advances_only_when_told() -> anyhow::Result<()> {
    let mut host = HostBuilder::new(&minimal_filter()).build()?;
    let start = host.now();
    host.advance_clock(std::time::Duration::from_secs(90))?;
    assert_eq!(host.now().duration_since(start)?.as_secs(), 90);
    Ok(())
}

/// A module exporting the ABI marker and memory, with `body` spliced in.
fn wat_module(body: &str) -> anyhow::Result<FilterModule> {
    let text = format!(
        r#"(module
             {body}
             (memory (export "memory") 1)
             (func (export "proxy_abi_version_0_2_1")))"#
    );
    Ok(FilterModule::from_bytes(text.as_bytes())?)
}

#[test]
fn unsupported_import_answers_unimplemented_and_is_recorded_by_name() -> anyhow::Result<()> {
    // proxy_on_vm_start returns whether the unknown call answered Unimplemented (12).
    let module = wat_module(
        r#"(import "env" "proxy_frobnicate" (func $frob (param i32) (result i32)))
           (func (export "proxy_on_vm_start") (param i32 i32) (result i32)
             (i32.eq (call $frob (i32.const 7)) (i32.const 12)))"#,
    )?;
    assert_eq!(
        module.unsupported_imports(),
        ["proxy_frobnicate".to_owned()]
    );
    let host = HostBuilder::new(&module).build()?;
    assert!(host.vm_started(), "the guest saw a status other than 12");
    let errors = host.host_call_errors();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].call, "proxy_frobnicate");
    assert_eq!(errors[0].status, Status::Unimplemented);
    assert!(errors[0].message.contains("proxy_frobnicate"));
    Ok(())
}

#[test]
fn module_without_the_abi_marker_is_rejected() {
    let err = FilterModule::from_bytes(
        br#"(module (memory (export "memory") 1) (func (export "proxy_abi_version_0_1_0")))"#,
    )
    .unwrap_err();
    match err {
        WasmHostError::AbiVersion { found } => assert_eq!(found, ["proxy_abi_version_0_1_0"]),
        other => panic!("unexpected error: {other}"),
    }
}

#[test]
fn guest_trap_is_an_error_naming_the_export_and_fails_the_vm() -> anyhow::Result<()> {
    let module = wat_module(
        r#"(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
             unreachable)"#,
    )?;
    let mut host = HostBuilder::new(&module).build()?;
    let mut stream = host.http_stream()?;
    let err = stream.request_headers(&[(":path", "/")], true).unwrap_err();
    match &err {
        WasmHostError::Trap { export, .. } => assert_eq!(export, "proxy_on_request_headers"),
        other => panic!("unexpected error: {other}"),
    }
    // Envoy (fail closed) answers the stream 503 itself and calls the VM no more.
    let reply = stream.local_response().expect("Envoy's 503");
    assert_eq!(
        (reply.status, reply.details.as_str()),
        (503, "wasm_fail_stream")
    );
    assert!(reply.body.is_empty());
    stream.complete()?;
    assert!(host.failure().is_some());
    let err = host.tick().unwrap_err();
    assert!(matches!(err, WasmHostError::VmFailed(_)), "{err}");
    Ok(())
}

#[test]
fn every_stream_after_a_trap_gets_503_without_reaching_the_vm() -> anyhow::Result<()> {
    let module = wat_module(
        r#"(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
             unreachable)"#,
    )?;
    let mut host = HostBuilder::new(&module).build()?;
    let mut first = host.http_stream()?;
    assert!(first.request_headers(&[(":path", "/")], true).is_err());
    first.complete()?;
    for _ in 0..2 {
        let mut later = host.http_stream()?;
        assert_eq!(
            later.request_headers(&[(":path", "/")], true)?,
            Action::Pause
        );
        let reply = later.local_response().expect("Envoy's 503");
        assert_eq!(reply.status, 503);
        assert_eq!(later.current_response_headers().get(":status"), Some("503"));
        later.complete()?;
    }
    Ok(())
}

#[test]
fn rejected_configuration_is_observable_and_blocks_streams() -> anyhow::Result<()> {
    let module = wat_module(
        r#"(func (export "proxy_on_configure") (param i32 i32) (result i32) i32.const 0)"#,
    )?;
    let mut host = HostBuilder::new(&module)
        .plugin_configuration("{}")
        .build()?;
    assert!(host.vm_started());
    assert!(!host.configuration_accepted());
    let err = host.http_stream().unwrap_err();
    assert!(
        matches!(err, WasmHostError::ConfigurationRejected("configure")),
        "{err}"
    );
    Ok(())
}

#[test]
fn out_of_bounds_guest_pointer_answers_invalid_memory_access() -> anyhow::Result<()> {
    // proxy_log with a message far beyond the one-page memory.
    let module = wat_module(
        r#"(import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
           (func (export "proxy_on_vm_start") (param i32 i32) (result i32)
             (i32.eq (call $log (i32.const 2) (i32.const 1000000) (i32.const 10)) (i32.const 6)))"#,
    )?;
    let host = HostBuilder::new(&module).build()?;
    assert!(host.vm_started(), "the guest saw a status other than 6");
    assert_eq!(host.host_call_errors()[0].call, "proxy_log");
    assert!(host.logs().is_empty());
    Ok(())
}

#[test]
fn header_map_size_buffer_status_and_legacy_continue_follow_envoy() -> anyhow::Result<()> {
    // on_vm_start: does get_buffer_status(VmConfiguration) report the size the host passed?
    // on_request_headers: resumes the request and returns the header map's byte size.
    let module = wat_module(
        r#"(import "env" "proxy_get_header_map_size" (func $size (param i32 i32) (result i32)))
           (import "env" "proxy_continue_request" (func $continue (result i32)))
           (import "env" "proxy_get_buffer_status" (func $status (param i32 i32 i32) (result i32)))
           (func (export "proxy_on_vm_start") (param i32 i32) (result i32)
             (drop (call $status (i32.const 6) (i32.const 200) (i32.const 204)))
             (i32.eq (i32.load (i32.const 200)) (local.get 1)))
           (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
             (drop (call $size (i32.const 0) (i32.const 100)))
             (drop (call $continue))
             (i32.load (i32.const 100)))"#,
    )?;
    let mut host = HostBuilder::new(&module)
        .vm_configuration("12345")
        .build()?;
    assert!(host.vm_started());
    let mut stream = host.http_stream()?;
    // Envoy's byteSize(): keys plus values, ":path" + "/abc" + "host" + "x".
    let action = stream.request_headers(&[(":path", "/abc"), ("Host", "x")], true)?;
    assert_eq!(action, Action::Other(14));
    assert_eq!(stream.request_continued(), 1);
    Ok(())
}

#[test]
fn http_call_answers_reach_the_root_context_as_in_envoy() -> anyhow::Result<()> {
    // A stream dispatches a call (timeout 1 s); proxy_on_http_call_response sets the tick
    // period to its context id × 1000 ms, so the test can read which id Envoy's order gave it.
    let module = wat_module(
        r#"(import "env" "proxy_http_call" (func $call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
           (import "env" "proxy_set_tick_period_milliseconds" (func $tick (param i32) (result i32)))
           (data (i32.const 0) "c")
           (data (i32.const 16) "\03\00\00\00\07\00\00\00\03\00\00\00\05\00\00\00\01\00\00\00\0a\00\00\00\01\00\00\00:method\00GET\00:path\00/\00:authority\00a\00")
           (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
           (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
             (drop (call $call (i32.const 0) (i32.const 1) (i32.const 16) (i32.const 61)
               (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 1000) (i32.const 512)))
             (i32.const 1))
           (func (export "proxy_on_http_call_response") (param i32 i32 i32 i32 i32)
             (drop (call $tick (i32.mul (local.get 0) (i32.const 1000)))))"#,
    )?;
    let mut host = HostBuilder::new(&module).build()?;
    let mut stream = host.http_stream()?;
    let stream_id = stream.id();
    assert_eq!(
        stream.request_headers(&[(":path", "/")], true)?,
        Action::Pause
    );
    let call = host.pending_http_calls()[0].clone();
    assert_eq!(call.context_id, stream_id, "dispatched from the stream");
    host.respond_to_http_call(call.token, &[(":status", "200")], b"")?;
    let root = host.root_context_id();
    assert_ne!(root, stream_id);
    assert_eq!(
        host.tick_period(),
        Some(Duration::from_millis(u64::from(root) * 1000))
    );
    Ok(())
}
