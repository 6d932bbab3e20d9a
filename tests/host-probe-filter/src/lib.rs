//! Fixture proxy-wasm filter that exercises every host call the wasmtime host
//! (`proxy-wasm-host`) supports, so the host's own tests can check each one end to end.
//!
//! Plugin configuration: `reject` makes `on_configure` fail; `tick_ms=<n>` sets a tick period
//! (each tick polls the `feed` cluster and stores the answer in shared data `policy`);
//! `slow_done` makes plugin shutdown finish later through `proxy_done` on the next tick.
//!
//! Request paths choose what a stream does: `/local` answers 403 itself, `/call` waits for an
//! HTTP call to `feed` and copies its `x-answer` header into the request, `/body` upper-cases
//! the request body, `/close` resets the stream, `/grpc` calls gRPC on a cluster that does not exist,
//! `/late-read` reads request headers in the response path (Envoy no longer has them),
//! `/rewrite-response` replaces all response headers. Every stream annotates its request and
//! response headers with what it read (properties, shared data) and counts itself in metrics.

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(ProbeRoot::default()) });
}}

/// Metric ids defined at VM start and shared with every stream.
#[derive(Debug, Default, Clone, Copy)]
struct Metrics {
    requests: u32,
    inflight: u32,
    body_size: u32,
    feed_updates: u32,
}

#[derive(Default)]
struct ProbeRoot {
    metrics: Metrics,
    slow_done: bool,
    shutting_down: Rc<Cell<bool>>,
}

fn log(level: LogLevel, message: &str) {
    // Logging is what reports problems; if it fails there is nobody left to tell.
    let _ = hostcalls::log(level, message);
}

fn define(kind: MetricType, name: &str) -> u32 {
    hostcalls::define_metric(kind, name).unwrap_or_else(|status| {
        log(LogLevel::Error, &format!("define {name}: {status:?}"));
        0
    })
}

impl Context for ProbeRoot {
    fn on_http_call_response(
        &mut self,
        token: u32,
        num_headers: usize,
        body_size: usize,
        _: usize,
    ) {
        if num_headers == 0 {
            let status = hostcalls::get_grpc_status();
            log(
                LogLevel::Warn,
                &format!("feed call {token} failed: {status:?}"),
            );
            return;
        }
        let status = self
            .get_http_call_response_header(":status")
            .unwrap_or_default();
        let body = self
            .get_http_call_response_body(0, body_size)
            .unwrap_or_default();
        let cas = match hostcalls::get_shared_data("policy") {
            Ok((_, cas)) => cas,
            Err(status) => {
                log(LogLevel::Error, &format!("get policy: {status:?}"));
                return;
            }
        };
        match hostcalls::set_shared_data("policy", Some(&body), cas) {
            Ok(()) => log(LogLevel::Info, &format!("policy stored from {status}")),
            Err(status) => log(LogLevel::Error, &format!("set policy: {status:?}")),
        }
        let _ = hostcalls::increment_metric(self.metrics.feed_updates, 1);
    }

    fn on_done(&mut self) -> bool {
        if self.slow_done {
            self.shutting_down.set(true);
            return false;
        }
        true
    }
}

impl RootContext for ProbeRoot {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        let vm = self.get_vm_configuration().unwrap_or_default();
        log(
            LogLevel::Info,
            &format!("vm configuration: {}", String::from_utf8_lossy(&vm)),
        );
        self.metrics = Metrics {
            requests: define(MetricType::Counter, "probe.requests"),
            inflight: define(MetricType::Gauge, "probe.inflight"),
            body_size: define(MetricType::Histogram, "probe.body_size"),
            feed_updates: define(MetricType::Counter, "probe.feed_updates"),
        };
        match hostcalls::get_log_level() {
            Ok(level) => log(LogLevel::Debug, &format!("host log level: {level:?}")),
            Err(status) => log(LogLevel::Error, &format!("log level: {status:?}")),
        }
        true
    }

    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let config = self.get_plugin_configuration().unwrap_or_default();
        let config = String::from_utf8_lossy(&config).into_owned();
        if config.trim() == "reject" {
            log(LogLevel::Error, "configuration rejected: asked to");
            return false;
        }
        self.slow_done = config.contains("slow_done");
        for setting in config.split(';') {
            if let Some(ms) = setting.trim().strip_prefix("tick_ms=") {
                match ms.parse::<u64>() {
                    Ok(ms) => self.set_tick_period(Duration::from_millis(ms)),
                    Err(_) => {
                        log(LogLevel::Error, &format!("bad tick_ms: {ms}"));
                        return false;
                    }
                }
            }
        }
        let now = self
            .get_current_time()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        log(LogLevel::Info, &format!("configured at {now}: {config}"));
        true
    }

    fn on_tick(&mut self) {
        if self.shutting_down.get() {
            match hostcalls::done() {
                Ok(()) => log(LogLevel::Info, "shutdown finished"),
                Err(status) => log(LogLevel::Error, &format!("done: {status:?}")),
            }
            return;
        }
        let headers = vec![
            (":method", "GET"),
            (":path", "/policy"),
            (":authority", "feed.internal"),
        ];
        match self.dispatch_http_call("feed", headers, None, vec![], Duration::from_secs(5)) {
            Ok(token) => log(LogLevel::Info, &format!("tick dispatched {token}")),
            Err(status) => log(LogLevel::Error, &format!("tick dispatch: {status:?}")),
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Probe {
            metrics: self.metrics,
            path: String::new(),
        }))
    }
}

struct Probe {
    metrics: Metrics,
    path: String,
}

impl Probe {
    fn annotate_request(&self) {
        let source = self
            .get_property(vec!["source", "address"])
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_else(|| "unknown".to_owned());
        self.add_http_request_header("x-probe-source", &source);
        let tls = self
            .get_property(vec!["connection", "tls_version"])
            .filter(|v| !v.is_empty())
            .map_or_else(
                || "none".to_owned(),
                |v| String::from_utf8_lossy(&v).into_owned(),
            );
        self.add_http_request_header("x-probe-tls", &tls);
        self.set_property(vec!["probe_seen"], Some(b"yes"));
        let seen = self.get_property(vec!["probe_seen"]).unwrap_or_default();
        self.add_http_request_header("x-probe-prop", &String::from_utf8_lossy(&seen));
        let scheme = self
            .get_property(vec!["request", "scheme"])
            .unwrap_or_default();
        self.add_http_request_header("x-probe-scheme", &String::from_utf8_lossy(&scheme));
        if let (Some(policy), _) = self.get_shared_data("policy") {
            self.add_http_request_header("x-probe-policy", &String::from_utf8_lossy(&policy));
        }
        self.set_http_request_header("x-replace", Some("replaced"));
        self.set_http_request_header("x-remove", None);
        let count = self.get_http_request_headers().len();
        self.add_http_request_header("x-probe-count", &count.to_string());
    }
}

impl Context for Probe {
    fn on_http_call_response(&mut self, _token: u32, _headers: usize, body_size: usize, _: usize) {
        let answer = self
            .get_http_call_response_header("x-answer")
            .unwrap_or_default();
        let body = self
            .get_http_call_response_body(0, body_size)
            .unwrap_or_default();
        self.add_http_request_header("x-answer", &answer);
        self.add_http_request_header("x-answer-body", &String::from_utf8_lossy(&body));
        self.resume_http_request();
    }
}

impl HttpContext for Probe {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let _ = hostcalls::increment_metric(self.metrics.requests, 1);
        let _ = hostcalls::increment_metric(self.metrics.inflight, 1);
        self.path = self.get_http_request_header(":path").unwrap_or_default();
        self.annotate_request();
        match self.path.as_str() {
            "/local" => {
                self.send_http_response(403, vec![("x-local", "1")], Some(b"denied"));
                Action::Pause
            }
            "/call" => {
                let headers = vec![
                    (":method", "POST"),
                    (":path", "/lookup"),
                    (":authority", "feed.internal"),
                ];
                let call = self.dispatch_http_call(
                    "feed",
                    headers,
                    Some(b"q"),
                    vec![],
                    Duration::from_secs(2),
                );
                match call {
                    Ok(_) => Action::Pause,
                    Err(status) => {
                        log(LogLevel::Error, &format!("dispatch: {status:?}"));
                        Action::Continue
                    }
                }
            }
            "/close" => {
                self.reset_http_request();
                Action::Pause
            }
            "/grpc" => {
                // No cluster "grpc" exists: Envoy answers ParseFailure, the SDK an Err.
                let result = self.dispatch_grpc_call(
                    "grpc",
                    "svc",
                    "method",
                    vec![],
                    None,
                    Duration::from_secs(1),
                );
                log(LogLevel::Info, &format!("grpc: {result:?}"));
                Action::Continue
            }
            _ => Action::Continue,
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.path != "/body" {
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let _ = hostcalls::record_metric(self.metrics.body_size, body_size as u64);
        let body = self.get_http_request_body(0, body_size).unwrap_or_default();
        self.set_http_request_body(0, body_size, &body.to_ascii_uppercase());
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if self.path == "/late-read" {
            // Envoy dropped the request headers when the request continued: this panics.
            let _ = self.get_http_request_header(":path");
        }
        if self.path == "/rewrite-response" {
            self.set_http_response_headers(vec![(":status", "200"), ("x-only", "1")]);
            return Action::Continue;
        }
        let status = self.get_http_response_header(":status").unwrap_or_default();
        self.add_http_response_header("x-probe", "1");
        self.add_http_response_header("x-probe-status", &status);
        self.set_http_response_header("server", Some("probe"));
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if end_of_stream {
            self.set_http_response_body(body_size, 0, b"!");
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        let path = self.get_http_request_header(":path").unwrap_or_default();
        let status = self.get_http_response_header(":status").unwrap_or_default();
        let requests = hostcalls::get_metric(self.metrics.requests).unwrap_or_default();
        log(
            LogLevel::Info,
            &format!("access {path} {status} after {requests} requests"),
        );
        let _ = hostcalls::increment_metric(self.metrics.inflight, -1);
    }
}
