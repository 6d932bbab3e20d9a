//! The parity fixture filter (`tests/parity-filter`) run request by request in real Envoy 1.40
//! (V8) and in the wasmtime host (`proxy-wasm-host`): every case must come out the same in
//! both — status, body (or a reset), the headers the filter reports in order, what it
//! observed (`x-parity-observed`), and its log lines.
//!
//! Envoy plays the network for real (a loopback upstream, a port nothing listens on, a
//! listener of this test that never answers); the host is told the same network as a test
//! tells it: the upstream's answer, a refused connection, the clock passing a call's timeout.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use autohttps_tests::envoy::{self, Envoy, free_port};
use proxy_wasm_host::{FilterModule, Host, HostBuilder, WasmHostError, build_workspace_wasm};

/// The fixture's package; its `envoy.yaml` sits beside it.
const FIXTURE: &str = "autohttps-parity-filter";
/// The VM ids `tests/parity-filter/envoy.yaml` gives the two listeners' filters.
const VM_ID: &str = "parity";
const PANIC_VM_ID: &str = "parity-panic";
const RAW_VM_ID: &str = "parity-raw";
/// What `/buffer-response`'s upstream sends: twice Envoy's 1 MiB buffer limit.
const BIG_BODY_BYTES: usize = 2 << 20;
/// How the host is handed a body: in chunks, as a codec delivers it.
const BODY_CHUNK: usize = 64 << 10;
/// The timeout of the fixture's HTTP calls.
const CALL_TIMEOUT: Duration = Duration::from_millis(500);

/// Which listener (and so which VM) a case goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Vm {
    /// VM `parity`: every case but the one that makes the filter panic.
    Parity,
    /// VM `parity-panic`, failed by its first case on purpose.
    Panic,
    /// VM `parity-raw`: the raw-ABI module of [`raw_abi_module`].
    Raw,
}

/// Messages the raw-ABI module logs in `proxy_on_http_call_response`, by the context id it got.
const ON_ROOT: &str = "raw: http call response on the root context";
const ON_STREAM: &str = "raw: http call response on the calling stream's context";
const ON_OTHER: &str = "raw: http call response on another context";

/// A proxy-wasm module written against the ABI itself, for what the Rust SDK hides from a
/// filter: which context id `proxy_on_http_call_response` gets (the SDK routes by token). Each
/// request dispatches a call to cluster `ok`; the answer logs whether it came on the root
/// context, the calling stream's, or another, and answers the stream 200.
fn raw_abi_module() -> anyhow::Result<Vec<u8>> {
    // The call's headers in the pairs format: (:method GET) (:path /pong)
    // (:authority upstream.parity).
    let headers: &[(&str, &str)] = &[
        (":method", "GET"),
        (":path", "/pong"),
        (":authority", "upstream.parity"),
    ];
    let mut pairs = Vec::new();
    pairs.extend_from_slice(&u32::try_from(headers.len())?.to_le_bytes());
    for (name, value) in headers {
        pairs.extend_from_slice(&u32::try_from(name.len())?.to_le_bytes());
        pairs.extend_from_slice(&u32::try_from(value.len())?.to_le_bytes());
    }
    for (name, value) in headers {
        pairs.extend_from_slice(name.as_bytes());
        pairs.push(0);
        pairs.extend_from_slice(value.as_bytes());
        pairs.push(0);
    }
    let escaped: String = pairs.iter().map(|b| format!("\\{b:02x}")).collect();
    let text = format!(
        r#"(module
  (import "env" "proxy_http_call" (func $http_call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_set_effective_context" (func $set_context (param i32) (result i32)))
  (import "env" "proxy_send_local_response" (func $reply (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $root (mut i32) (i32.const 0))
  (global $stream (mut i32) (i32.const 0))
  (global $heap (mut i32) (i32.const 4096))
  (data (i32.const 0) "ok")
  (data (i32.const 16) "{escaped}")
  (data (i32.const 256) "{ON_ROOT}")
  (data (i32.const 512) "{ON_STREAM}")
  (data (i32.const 768) "{ON_OTHER}")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $at i32)
    (local.set $at (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $size)))
    (local.get $at))
  (func (export "proxy_on_context_create") (param $id i32) (param $parent i32)
    (if (i32.eqz (local.get $parent)) (then (global.set $root (local.get $id)))))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_request_headers") (param $id i32) (param i32 i32) (result i32)
    (global.set $stream (local.get $id))
    (drop (call $http_call (i32.const 0) (i32.const 2) (i32.const 16) (i32.const {pairs_len})
      (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 1000) (i32.const 2048)))
    (i32.const 1))
  (func (export "proxy_on_http_call_response") (param $context i32) (param i32 i32 i32 i32)
    (if (i32.eq (local.get $context) (global.get $root))
      (then (drop (call $log (i32.const 2) (i32.const 256) (i32.const {root_len}))))
      (else (if (i32.eq (local.get $context) (global.get $stream))
        (then (drop (call $log (i32.const 2) (i32.const 512) (i32.const {stream_len}))))
        (else (drop (call $log (i32.const 2) (i32.const 768) (i32.const {other_len})))))))
    (drop (call $set_context (global.get $stream)))
    (drop (call $reply (i32.const 200) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)
      (i32.const 0) (i32.const 0) (i32.const -1)))))"#,
        pairs_len = pairs.len(),
        root_len = ON_ROOT.len(),
        stream_len = ON_STREAM.len(),
        other_len = ON_OTHER.len(),
    );
    Ok(wat::parse_str(text)?)
}

/// One request.
#[derive(Debug, Clone)]
struct Case {
    name: &'static str,
    vm: Vm,
    method: &'static str,
    path: &'static str,
    headers: Vec<(&'static str, Vec<u8>)>,
    body: Vec<u8>,
}

impl Case {
    fn get(name: &'static str, vm: Vm, path: &'static str) -> Case {
        Case {
            name,
            vm,
            method: "GET",
            path,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    fn header(mut self, name: &'static str, value: &[u8]) -> Case {
        self.headers.push((name, value.to_vec()));
        self
    }

    fn post(mut self, body: Vec<u8>) -> Case {
        self.method = "POST";
        self.body = body;
        self
    }
}

/// What the client got, reduced to what the filter controls.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Outcome {
    status: u16,
    /// The response stopped before its body was complete (a stream reset).
    reset: bool,
    /// `x-t-*` and `x-parity-observed` headers, in order.
    reported: Vec<(String, String)>,
    /// The body, when not reset.
    body: String,
}

fn reported(pairs: impl Iterator<Item = (String, String)>) -> Vec<(String, String)> {
    pairs
        .filter(|(name, _)| name.starts_with("x-t-") || name == "x-parity-observed")
        .collect()
}

fn cases() -> Vec<Case> {
    let big = vec![b'z'; BIG_BODY_BYTES];
    vec![
        Case::get("replaced headers move to the end", Vm::Parity, "/replace")
            .header("x-t-a", b"1")
            .header("x-t-b", b"2")
            .header("x-t-c", b"3"),
        Case::get(
            "a header value that is not UTF-8, read as bytes",
            Vm::Parity,
            "/bytes",
        )
        .header("x-t-bin", b"a\xff\xfeb"),
        Case::get("http_call answered", Vm::Parity, "/call-ok"),
        Case::get(
            "http_call to a port nothing listens on",
            Vm::Parity,
            "/call-unreachable",
        ),
        Case::get(
            "http_call whose upstream never answers",
            Vm::Parity,
            "/call-timeout",
        ),
        Case::get("grpc_call to a missing cluster", Vm::Parity, "/grpc"),
        Case::get("shared data and its CAS", Vm::Parity, "/shared"),
        Case::get("shared queues", Vm::Parity, "/queue"),
        Case::get("an unknown foreign function", Vm::Parity, "/foreign"),
        Case::get(
            "a small request body buffered",
            Vm::Parity,
            "/buffer-request",
        )
        .post(b"abc".to_vec()),
        Case::get(
            "a request body buffered past the limit",
            Vm::Parity,
            "/buffer-request",
        )
        .post(big),
        Case::get(
            "a response body buffered past the limit",
            Vm::Parity,
            "/buffer-response",
        ),
        Case::get(
            "a non-UTF-8 value read as strings panics the filter",
            Vm::Panic,
            "/bytes-panic",
        )
        .header("x-t-bin", b"a\xff\xfeb"),
        Case::get(
            "the failed VM answers the next request",
            Vm::Panic,
            "/replace",
        )
        .header("x-t-a", b"1"),
        Case::get("and the one after", Vm::Panic, "/bytes"),
        Case::get(
            "the context id proxy_on_http_call_response gets",
            Vm::Raw,
            "/call-context",
        ),
    ]
}

/// The fixture in Envoy, with the loopback network its clusters point at.
struct EnvoySide {
    envoy: Envoy,
    parity_port: u16,
    panic_port: u16,
    raw_port: u16,
    /// Accepts the `timeout` cluster's connections and never answers.
    _silent: TcpListener,
    _dir: tempfile::TempDir,
}

fn start_envoy(wasm: &Path, raw_abi: &[u8]) -> anyhow::Result<EnvoySide> {
    let dir = tempfile::tempdir()?;
    let raw_wasm = dir.path().join("raw-abi.wasm");
    std::fs::write(&raw_wasm, raw_abi)?;
    let raw_port = free_port()?;
    let big_body = dir.path().join("big-body.txt");
    std::fs::write(&big_body, vec![b'b'; BIG_BODY_BYTES])?;
    let silent = TcpListener::bind("127.0.0.1:0")?;
    let (admin, parity_port, panic_port, upstream) =
        (free_port()?, free_port()?, free_port()?, free_port()?);
    let unreachable = free_port()?;
    let values = HashMap::from([
        ("ADMIN_PORT", admin.to_string()),
        ("PARITY_PORT", parity_port.to_string()),
        ("PANIC_PORT", panic_port.to_string()),
        ("UPSTREAM_PORT", upstream.to_string()),
        ("UNREACHABLE_PORT", unreachable.to_string()),
        ("SILENT_PORT", silent.local_addr()?.port().to_string()),
        ("WASM", wasm.display().to_string()),
        ("RAW_PORT", raw_port.to_string()),
        ("RAW_WASM", raw_wasm.display().to_string()),
        ("BIG_BODY", big_body.display().to_string()),
    ]);
    let template_path = envoy::repo_root().join("tests/parity-filter/envoy.yaml");
    let template = std::fs::read_to_string(&template_path)
        .with_context(|| format!("reading {}", template_path.display()))?;
    let config = envoy::render(&template, &values)?;
    let envoy = Envoy::start(&config, admin)?;
    Ok(EnvoySide {
        envoy,
        parity_port,
        panic_port,
        raw_port,
        _silent: silent,
        _dir: dir,
    })
}

/// Sends `case` to Envoy over one HTTP/1.1 connection and reads until Envoy closes it.
fn run_in_envoy(side: &EnvoySide, case: &Case) -> anyhow::Result<Outcome> {
    let port = match case.vm {
        Vm::Parity => side.parity_port,
        Vm::Panic => side.panic_port,
        Vm::Raw => side.raw_port,
    };
    let mut request = format!(
        "{} {} HTTP/1.1\r\nhost: parity.test\r\nconnection: close\r\n",
        case.method, case.path
    )
    .into_bytes();
    for (name, value) in &case.headers {
        request.extend_from_slice(name.as_bytes());
        request.extend_from_slice(b": ");
        request.extend_from_slice(value);
        request.extend_from_slice(b"\r\n");
    }
    if !case.body.is_empty() {
        request.extend_from_slice(format!("content-length: {}\r\n", case.body.len()).as_bytes());
    }
    request.extend_from_slice(b"\r\n");
    request.extend_from_slice(&case.body);

    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut writer = stream.try_clone()?;
    // Envoy may answer (413) before it read the whole body: write on the side.
    let sender = std::thread::spawn(move || {
        let _ = writer.write_all(&request);
    });
    let mut response = Vec::new();
    let read = stream.read_to_end(&mut response);
    let _ = stream.shutdown(Shutdown::Both);
    let _ = sender.join();
    if let Err(error) = read
        && response.is_empty()
    {
        bail!("{}: no answer from Envoy: {error}", case.name);
    }
    parse_response(&response).with_context(|| {
        format!(
            "{}: Envoy's answer {:?}",
            case.name,
            String::from_utf8_lossy(&response[..response.len().min(300)])
        )
    })
}

/// Status, headers and body of one HTTP/1.1 response read to the connection's end.
fn parse_response(raw: &[u8]) -> anyhow::Result<Outcome> {
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of headers")?;
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .context("no status line")?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let body = &raw[head_end + 4..];
    let length = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok());
    let reset = length.is_some_and(|length| body.len() < length);
    Ok(Outcome {
        status,
        reset,
        reported: reported(headers.into_iter()),
        body: if reset {
            String::new()
        } else {
            String::from_utf8_lossy(body).into_owned()
        },
    })
}

/// The host side: one host per VM, as Envoy has one VM per listener here.
struct HostSide {
    parity: Host,
    panic: Host,
    raw: Host,
}

fn start_hosts(module: &FilterModule, raw_abi: &FilterModule) -> anyhow::Result<HostSide> {
    let build = |module: &FilterModule, vm_id: &str| {
        HostBuilder::new(module)
            .vm_id(vm_id)
            .cluster("ok")
            .cluster("unreachable")
            .cluster("timeout")
            .build()
    };
    Ok(HostSide {
        parity: build(module, VM_ID)?,
        panic: build(module, PANIC_VM_ID)?,
        raw: build(raw_abi, RAW_VM_ID)?,
    })
}

/// What the route answers a request the filter let through (tests/parity-filter/envoy.yaml):
/// `(headers as the filter sees them, body)`.
fn upstream_response(case: &Case) -> (Vec<(&'static str, String)>, Vec<u8>) {
    let routed = |length: usize| {
        vec![
            (":status", "200".to_owned()),
            ("content-length", length.to_string()),
            ("content-type", "text/plain".to_owned()),
            ("date", "Thu, 01 Jan 2026 00:00:00 GMT".to_owned()),
            ("server", "envoy".to_owned()),
            ("x-envoy-upstream-service-time", "0".to_owned()),
        ]
    };
    match case.path {
        "/buffer-response" => (routed(BIG_BODY_BYTES), vec![b'b'; BIG_BODY_BYTES]),
        path if path.starts_with("/buffer-") => (routed(4), b"pong".to_vec()),
        _ => (
            vec![
                (":status", "200".to_owned()),
                ("x-t-r1", "1".to_owned()),
                ("x-t-r2", "2".to_owned()),
                ("content-length", "6".to_owned()),
                ("content-type", "text/plain".to_owned()),
            ],
            b"hello\n".to_vec(),
        ),
    }
}

/// Answers the filter's pending HTTP calls as each cluster's network does.
fn play_http_calls(host: &mut Host) -> anyhow::Result<()> {
    let pending: Vec<(u32, String)> = host
        .pending_http_calls()
        .iter()
        .map(|call| (call.token, call.upstream.clone()))
        .collect();
    for (token, cluster) in pending {
        match cluster.as_str() {
            // The upstream listener's answer, as Envoy's async client hands it over.
            "ok" => host.respond_to_http_call(
                token,
                &[
                    (":status", "200"),
                    ("content-length", "4"),
                    ("content-type", "text/plain"),
                    ("date", "Thu, 01 Jan 2026 00:00:00 GMT"),
                    ("server", "envoy"),
                    ("x-envoy-upstream-service-time", "0"),
                ],
                b"pong",
            )?,
            "unreachable" => host.fail_http_call(token)?,
            "timeout" => {
                host.advance_clock(CALL_TIMEOUT)?;
            }
            other => bail!("the fixture called cluster {other:?}, which the config lacks"),
        }
    }
    Ok(())
}

/// Runs `case` through the host as Envoy's HTTP connection manager would.
fn run_in_host(side: &mut HostSide, case: &Case) -> anyhow::Result<Outcome> {
    let host = match case.vm {
        Vm::Parity => &mut side.parity,
        Vm::Panic => &mut side.panic,
        Vm::Raw => &mut side.raw,
    };
    let mut headers: Vec<(&str, &[u8])> = vec![
        (":authority", b"parity.test"),
        (":path", case.path.as_bytes()),
        (":method", case.method.as_bytes()),
        (":scheme", b"http"),
    ];
    headers.extend(case.headers.iter().map(|(n, v)| (*n, v.as_slice())));
    let id = {
        let mut stream = host.http_stream()?;
        match stream.request_headers_bytes(&headers, case.body.is_empty()) {
            // The filter panicked: the stream has Envoy's answer, compared below.
            Ok(_) | Err(WasmHostError::Trap { .. }) => {}
            Err(other) => return Err(other.into()),
        }
        stream.id()
    };
    let answered = |host: &mut Host| -> anyhow::Result<bool> {
        let stream = host.stream(id)?;
        Ok(stream.is_complete() || stream.local_response().is_some())
    };
    if !case.body.is_empty() && !answered(host)? {
        let mut stream = host.stream(id)?;
        let last = case.body.len().div_ceil(BODY_CHUNK);
        for (n, chunk) in case.body.chunks(BODY_CHUNK).enumerate() {
            if stream.is_complete() || stream.local_response().is_some() {
                break;
            }
            stream.request_body(chunk, n + 1 == last)?;
        }
    }
    play_http_calls(host)?;
    if !answered(host)? {
        let (headers, body) = upstream_response(case);
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let mut stream = host.stream(id)?;
        stream.response_headers(&headers, false)?;
        let last = body.len().div_ceil(BODY_CHUNK);
        for (n, chunk) in body.chunks(BODY_CHUNK).enumerate() {
            if stream.is_complete() {
                break;
            }
            stream.response_body(chunk, n + 1 == last)?;
        }
    }
    let mut stream = host.stream(id)?;
    let reset = stream.reset_reason().is_some();
    let response = stream.current_response_headers();
    let status = response
        .get(":status")
        .and_then(|s| s.parse().ok())
        .context("no :status in the response")?;
    let reported = reported(
        response
            .pairs()
            .map(|(n, v)| (n.to_owned(), v.into_owned())),
    );
    let body = match stream.local_response() {
        Some(reply) => reply.body.clone(),
        None => stream.forwarded_response_body().to_vec(),
    };
    if !stream.is_complete() {
        stream.complete()?;
    }
    Ok(Outcome {
        status,
        reset,
        reported,
        body: if reset {
            String::new()
        } else {
            String::from_utf8_lossy(&body).into_owned()
        },
    })
}

/// The messages of Envoy's `wasm log <plugin> [<root id>] <vm id>: …` lines of one VM (Envoy
/// leaves out a name equal to the one before it), a message running on over the lines that do
/// not start a new log entry.
fn envoy_wasm_logs(log: &str, vm_id: &str) -> Vec<String> {
    const MARKER: &str = "wasm log ";
    let mut messages: Vec<String> = Vec::new();
    let mut continuing = false;
    for line in log.lines() {
        let entry = line
            .find(MARKER)
            .and_then(|at| line[at + MARKER.len()..].split_once(": "));
        if let Some((names, message)) = entry {
            continuing = names.split_whitespace().last() == Some(vm_id);
            if continuing {
                messages.push(message.to_owned());
            }
        } else if continuing && !line.starts_with('[') {
            if let Some(last) = messages.last_mut() {
                last.push('\n');
                last.push_str(line);
            }
        } else {
            continuing = false;
        }
    }
    messages
}

/// Envoy's wasm log messages of `vm_id`, once it has written at least `expected` of them (it
/// flushes its log file on a timer) or 15 s passed.
fn wait_for_envoy_logs(envoy: &Envoy, vm_id: &str, expected: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let messages = envoy_wasm_logs(&envoy.log(), vm_id);
        if messages.len() >= expected || Instant::now() > deadline {
            return messages;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn host_logs(host: &Host) -> Vec<String> {
    host.logs().iter().map(|l| l.message.clone()).collect()
}

#[test]
fn the_fixture_filter_behaves_the_same_in_envoy_and_in_the_wasmtime_host() -> anyhow::Result<()> {
    let started = Instant::now();
    let wasm = build_workspace_wasm(FIXTURE)?;
    let module = FilterModule::load(&wasm)?;
    assert!(
        module.unsupported_imports().is_empty(),
        "the host lacks {:?}",
        module.unsupported_imports()
    );
    let raw_abi = raw_abi_module()?;
    let side = start_envoy(&wasm, &raw_abi)?;
    let mut hosts = start_hosts(&module, &FilterModule::from_bytes(&raw_abi)?)?;

    let cases = cases();
    let mut differences = Vec::new();
    for case in &cases {
        let in_envoy = run_in_envoy(&side, case)?;
        // A host error (one Envoy would not have) is a difference like any other.
        let in_host = run_in_host(&mut hosts, case).map_err(|e| format!("{e:#}"));
        if in_host.as_ref() != Ok(&in_envoy) {
            differences.push(format!(
                "{} ({} {}):\n  Envoy: {in_envoy:?}\n  host:  {in_host:?}",
                case.name, case.method, case.path
            ));
        }
    }
    let vms = [
        (VM_ID, &hosts.parity),
        (PANIC_VM_ID, &hosts.panic),
        (RAW_VM_ID, &hosts.raw),
    ];
    for (vm_id, host) in vms {
        let in_host = host_logs(host);
        let in_envoy = wait_for_envoy_logs(&side.envoy, vm_id, in_host.len());
        if in_envoy != in_host {
            differences.push(format!(
                "log lines of VM {vm_id}:\n  Envoy: {in_envoy:?}\n  host:  {in_host:?}"
            ));
        }
    }
    // Not vacuous: the raw module's call was answered, and on the root context.
    assert_eq!(host_logs(&hosts.raw), [ON_ROOT]);
    println!(
        "{} cases and the log lines of 3 VMs compared in Envoy and the host in {:?}; {} differ",
        cases.len(),
        started.elapsed(),
        differences.len()
    );
    assert!(
        differences.is_empty(),
        "the host and Envoy differ:\n{}",
        differences.join("\n")
    );
    Ok(())
}
