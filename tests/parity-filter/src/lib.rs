//! Fixture proxy-wasm filter for the two-host parity suite (`tests/tests/host_parity.rs`): each
//! request path picks one behaviour where a host could differ from Envoy, and the filter
//! reports what it observed, so the suite can run it in Envoy 1.40 and in the wasmtime host
//! (`proxy-wasm-host`) and compare.
//!
//! What a stream observed goes out in the response header `x-parity-observed` (added in
//! `on_http_response_headers`, which also runs for the filter's own local replies); what the
//! root context observes (queue notifications) goes to log lines that start with `parity:`.
//!
//! Paths: `/replace` (replacing a request and a response header: where it ends up),
//! `/bytes` (a non-UTF-8 request header value read as bytes), `/bytes-panic` (the same value
//! read as strings: the SDK panics), `/call-ok`, `/call-unreachable`, `/call-timeout` (an HTTP
//! call to the cluster named after the dash, 500 ms timeout; the answer is reported),
//! `/grpc` (a gRPC call to a cluster that does not exist), `/shared` (shared data and its CAS),
//! `/queue` (shared queues and `on_queue_ready`), `/foreign` (an unknown foreign function),
//! `/buffer-request` and `/buffer-response` (a body buffered to its end).

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(ParityRoot::default()) });
}}

/// The shared queue the root context registers and streams enqueue to.
const QUEUE_NAME: &str = "parity.queue";
/// The VM id the Envoy configuration and the host tests give this filter.
const VM_ID: &str = "parity";
/// Timeout of every HTTP call the filter makes.
const CALL_TIMEOUT: Duration = Duration::from_millis(500);

/// Header names the filter reports the order of (the client's own headers differ by host).
const REPORTED_PREFIX: &str = "x-t-";

fn log(message: &str) {
    // Logging is what reports; if it fails there is nobody left to tell.
    let _ = hostcalls::log(LogLevel::Info, &format!("parity: {message}"));
}

#[derive(Default)]
struct ParityRoot {
    /// The id `register_shared_queue` returned, shared with every stream; 0 when it failed.
    queue: Rc<Cell<u32>>,
}

impl Context for ParityRoot {}

impl RootContext for ParityRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        match hostcalls::register_shared_queue(QUEUE_NAME) {
            Ok(id) => self.queue.set(id),
            Err(status) => log(&format!("register queue: {status:?}")),
        }
        true
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        let mut items = Vec::new();
        loop {
            match hostcalls::dequeue_shared_queue(queue_id) {
                Ok(Some(item)) => items.push(String::from_utf8_lossy(&item).into_owned()),
                Ok(None) => break,
                Err(status) => {
                    items.push(format!("error {status:?}"));
                    break;
                }
            }
        }
        let registered = queue_id == self.queue.get();
        log(&format!(
            "queue ready (the registered queue: {registered}): [{}]",
            items.join(",")
        ));
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(ParityStream {
            queue: Rc::clone(&self.queue),
            path: String::new(),
            observed: Vec::new(),
        }))
    }
}

struct ParityStream {
    queue: Rc<Cell<u32>>,
    path: String,
    observed: Vec<String>,
}

/// `name=value` of every reported header, in map order.
fn reported(headers: &[(String, String)]) -> String {
    headers
        .iter()
        .filter(|(name, _)| name.starts_with(REPORTED_PREFIX))
        .map(|(name, value)| format!("{name}={value}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Lower-case hex of `bytes`.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl ParityStream {
    fn observe(&mut self, what: String) {
        self.observed.push(what);
    }

    fn call(&mut self, cluster: &str) -> Action {
        let headers = vec![
            (":method", "GET"),
            (":path", "/pong"),
            (":authority", "upstream.parity"),
        ];
        match self.dispatch_http_call(cluster, headers, None, vec![], CALL_TIMEOUT) {
            Ok(_) => Action::Pause,
            Err(status) => {
                self.observe(format!("dispatch to {cluster}: {status:?}"));
                Action::Continue
            }
        }
    }

    fn shared_data(&mut self) {
        const KEY: &str = "parity.shared";
        let (value, cas) = self.get_shared_data(KEY);
        self.observe(format!("first get: {value:?} cas {cas:?}"));
        let set = hostcalls::set_shared_data(KEY, Some(b"one"), None);
        self.observe(format!("set without cas: {set:?}"));
        let (value, cas) = self.get_shared_data(KEY);
        let value = value.map(|v| String::from_utf8_lossy(&v).into_owned());
        self.observe(format!("get: {value:?} cas {cas:?}"));
        let set = hostcalls::set_shared_data(KEY, Some(b"two"), cas);
        self.observe(format!("set with current cas: {set:?}"));
        let set = hostcalls::set_shared_data(KEY, Some(b"three"), cas);
        self.observe(format!("set with stale cas: {set:?}"));
        let (value, next) = self.get_shared_data(KEY);
        let value = value.map(|v| String::from_utf8_lossy(&v).into_owned());
        let step = next.zip(cas).map(|(next, cas)| next.wrapping_sub(cas));
        self.observe(format!("get: {value:?}, cas moved by {step:?}"));
    }

    fn shared_queue(&mut self) {
        let registered = self.queue.get();
        let resolved = hostcalls::resolve_shared_queue(VM_ID, QUEUE_NAME);
        self.observe(format!(
            "resolve: {:?}",
            resolved.map(|id| id.map(|id| id == registered))
        ));
        let missing = hostcalls::resolve_shared_queue(VM_ID, "parity.none");
        self.observe(format!("resolve unknown name: {missing:?}"));
        let other_vm = hostcalls::resolve_shared_queue("another-vm", QUEUE_NAME);
        self.observe(format!("resolve in another vm: {other_vm:?}"));
        for item in ["hello", "world"] {
            let enqueued = hostcalls::enqueue_shared_queue(registered, Some(item.as_bytes()));
            self.observe(format!("enqueue {item}: {enqueued:?}"));
        }
        let unknown = registered.wrapping_add(1000);
        let enqueued = hostcalls::enqueue_shared_queue(unknown, Some(b"lost"));
        self.observe(format!("enqueue to an unknown queue: {enqueued:?}"));
        let dequeued = hostcalls::dequeue_shared_queue(unknown);
        self.observe(format!("dequeue from an unknown queue: {dequeued:?}"));
    }
}

impl Context for ParityStream {
    fn on_http_call_response(&mut self, _token: u32, headers: usize, body_size: usize, _: usize) {
        let status = self.get_http_call_response_header(":status");
        let body = self
            .get_http_call_response_body(0, body_size)
            .map(|b| String::from_utf8_lossy(&b).into_owned());
        let failure = hostcalls::get_grpc_status();
        self.observe(format!(
            "call answered: {headers} headers present: {}, status {status:?}, body {body:?}, proxy_get_status {failure:?}",
            headers > 0
        ));
        self.send_http_response(200, vec![], Some(b"answered\n"));
    }
}

impl HttpContext for ParityStream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.path = self.get_http_request_header(":path").unwrap_or_default();
        match self.path.clone().as_str() {
            "/replace" => {
                self.set_http_request_header("x-t-a", Some("new"));
                let order = reported(&self.get_http_request_headers());
                self.observe(format!("request after replace: {order}"));
            }
            "/bytes" => {
                let value = self.get_http_request_header_bytes("x-t-bin");
                self.observe(format!("x-t-bin bytes: {:?}", value.as_deref().map(hex)));
            }
            "/bytes-panic" => {
                // The SDK decodes every value as UTF-8 and unwraps: a non-UTF-8 one panics.
                let count = self.get_http_request_headers().len();
                self.observe(format!("{count} headers"));
            }
            path if path.starts_with("/call-") => {
                return self.call(&path["/call-".len()..]);
            }
            "/grpc" => {
                let result = self.dispatch_grpc_call(
                    "missing",
                    "parity.Service",
                    "Call",
                    vec![],
                    None,
                    Duration::from_secs(1),
                );
                self.observe(format!("grpc call: {result:?}"));
            }
            "/shared" => self.shared_data(),
            "/queue" => self.shared_queue(),
            "/foreign" => {
                let result = self.call_foreign_function("parity_no_such_function", Some(b"x"));
                self.observe(format!("foreign function: {result:?}"));
            }
            _ => {}
        }
        Action::Continue
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.path != "/buffer-request" {
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        self.observe(format!("request body buffered: {body_size} bytes"));
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if self.path.starts_with("/buffer-") {
            let status = self.get_http_response_header(":status");
            self.observe(format!("response headers: status {status:?}"));
        }
        if self.path == "/replace" {
            self.set_http_response_header("x-t-r1", Some("new"));
            let order = reported(&self.get_http_response_headers());
            self.observe(format!("response after replace: {order}"));
        }
        if !self.observed.is_empty() {
            let observed: String = self
                .observed
                .join("; ")
                .chars()
                .map(|c| {
                    if c.is_ascii_graphic() || c == ' ' {
                        c
                    } else {
                        '?'
                    }
                })
                .collect();
            self.add_http_response_header("x-parity-observed", &observed);
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, _body_size: usize, end_of_stream: bool) -> Action {
        if self.path == "/buffer-response" && !end_of_stream {
            return Action::Pause;
        }
        Action::Continue
    }
}
