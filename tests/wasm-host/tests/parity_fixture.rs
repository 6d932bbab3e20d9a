//! The host's shared queues, byte-valued headers and foreign functions, through the
//! `autohttps-parity-filter` fixture (which `autohttps-tests`' `host_parity` also runs in
//! Envoy, to show the host agrees with it).

use std::sync::OnceLock;

use proxy_wasm_host::{FilterModule, Host, HostBuilder, WasmHostError, build_workspace_wasm};

fn fixture() -> FilterModule {
    static MODULE: OnceLock<FilterModule> = OnceLock::new();
    MODULE
        .get_or_init(|| {
            let wasm = build_workspace_wasm("autohttps-parity-filter")
                .unwrap_or_else(|e| panic!("building the parity filter: {e}"));
            FilterModule::load(wasm).unwrap_or_else(|e| panic!("loading the parity filter: {e}"))
        })
        .clone()
}

fn host() -> anyhow::Result<Host> {
    Ok(HostBuilder::new(&fixture()).vm_id("parity").build()?)
}

/// `x-parity-observed` after a GET of `path` with these extra request headers.
fn observed(host: &mut Host, path: &str, extra: &[(&str, &[u8])]) -> anyhow::Result<String> {
    let mut headers: Vec<(&str, &[u8])> = vec![
        (":method", b"GET"),
        (":scheme", b"http"),
        (":authority", b"a.test"),
        (":path", path.as_bytes()),
    ];
    headers.extend_from_slice(extra);
    let mut stream = host.http_stream()?;
    stream.request_headers_bytes(&headers, true)?;
    stream.response_headers(&[(":status", "200")], true)?;
    let seen = stream
        .current_response_headers()
        .get("x-parity-observed")
        .unwrap_or_default()
        .to_owned();
    stream.complete()?;
    Ok(seen)
}

#[test]
fn a_value_that_is_not_utf8_reaches_the_filter_byte_for_byte() -> anyhow::Result<()> {
    let mut host = host()?;
    let seen = observed(&mut host, "/bytes", &[("x-t-bin", b"a\xff\xfeb")])?;
    assert_eq!(seen, r#"x-t-bin bytes: Some("61fffe62")"#);
    Ok(())
}

#[test]
fn the_sdk_string_accessors_panic_on_it_and_the_vm_then_answers_503() -> anyhow::Result<()> {
    let mut host = host()?;
    let mut stream = host.http_stream()?;
    let headers: [(&str, &[u8]); 2] = [(":path", b"/bytes-panic"), ("x-t-bin", b"\xff")];
    let err = stream.request_headers_bytes(&headers, true).unwrap_err();
    assert!(matches!(err, WasmHostError::Trap { .. }), "{err}");
    assert_eq!(stream.local_response().map(|r| r.status), Some(503));
    stream.complete()?;
    let panic = &host.logs().last().expect("the SDK logs the panic").message;
    assert!(panic.contains("FromUtf8Error"), "{panic}");
    let mut next = host.http_stream()?;
    next.request_headers(&[(":path", "/replace")], true)?;
    assert_eq!(next.local_response().map(|r| r.status), Some(503));
    Ok(())
}

#[test]
fn a_shared_queue_registered_by_the_filter_takes_items_from_outside() -> anyhow::Result<()> {
    let mut host = host()?;
    assert_eq!(host.shared_queue("parity.queue"), Some(Vec::new()));
    host.enqueue_shared_queue("parity.queue", b"from another worker")?;
    // proxy_on_queue_ready ran on the root context and drained the queue.
    let last = host.logs().last().expect("a log line");
    assert_eq!(
        last.message,
        "parity: queue ready (the registered queue: true): [from another worker]"
    );
    assert_eq!(last.context_id, host.root_context_id());
    assert_eq!(host.shared_queue("parity.queue"), Some(Vec::new()));
    let err = host.enqueue_shared_queue("parity.none", b"x").unwrap_err();
    assert!(matches!(err, WasmHostError::UnknownSharedQueue(_)), "{err}");
    Ok(())
}

#[test]
fn queues_resolve_only_under_the_vm_id_they_were_registered_in() -> anyhow::Result<()> {
    let mut host = host()?;
    let seen = observed(&mut host, "/queue", &[])?;
    assert!(seen.starts_with("resolve: Ok(Some(true)); resolve unknown name: Ok(None); resolve in another vm: Ok(None); enqueue hello: Ok(())"), "{seen}");
    // Without the VM id the filter resolves with, its own queue is "in another VM".
    let mut unnamed = HostBuilder::new(&fixture()).build()?;
    let seen = observed(&mut unnamed, "/queue", &[])?;
    assert!(seen.starts_with("resolve: Ok(None)"), "{seen}");
    Ok(())
}

#[test]
fn an_unknown_foreign_function_is_not_found() -> anyhow::Result<()> {
    let mut host = host()?;
    assert_eq!(
        observed(&mut host, "/foreign", &[])?,
        "foreign function: Err(NotFound)"
    );
    assert!(host.host_call_errors().is_empty());
    Ok(())
}
