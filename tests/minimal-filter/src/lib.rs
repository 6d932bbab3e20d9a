//! Fixture proxy-wasm filter: answers every request with a 301 to `https://<authority><path>`.
//!
//! It is the floor cost of any V8 proxy-wasm filter (two header reads and one local response per
//! request), and the fixture the wasmtime host in `autohttps-tests` tests itself against.
//! Besides the redirect it logs one line per request at info level and counts redirects in the
//! counter `minimal_filter.redirects`, so the host's log and metric plumbing have something to see.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType};

/// Name of the counter incremented once per redirect sent.
const REDIRECTS_COUNTER: &str = "minimal_filter.redirects";

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(MinimalRoot { redirects: None })
    });
}}

/// The plugin (root) context: defines the counter and hands it to each HTTP context.
struct MinimalRoot {
    redirects: Option<u32>,
}

impl Context for MinimalRoot {}

impl RootContext for MinimalRoot {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        match proxy_wasm::hostcalls::define_metric(MetricType::Counter, REDIRECTS_COUNTER) {
            Ok(id) => self.redirects = Some(id),
            Err(status) => warn(&format!("cannot define {REDIRECTS_COUNTER}: {status:?}")),
        }
        true
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Redirect {
            redirects: self.redirects,
        }))
    }
}

/// One HTTP stream: redirect it to HTTPS on the same authority and path.
struct Redirect {
    redirects: Option<u32>,
}

impl Context for Redirect {}

impl HttpContext for Redirect {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let authority = self
            .get_http_request_header(":authority")
            .unwrap_or_default();
        let path = self
            .get_http_request_header(":path")
            .unwrap_or_else(|| "/".to_owned());
        let location = format!("https://{authority}{path}");
        // A failed log call must not stop the redirect.
        let _ = proxy_wasm::hostcalls::log(LogLevel::Info, &format!("redirecting to {location}"));
        self.send_http_response(301, vec![("location", location.as_str())], None);
        if let Some(id) = self.redirects
            && let Err(status) = proxy_wasm::hostcalls::increment_metric(id, 1)
        {
            warn(&format!("cannot increment {REDIRECTS_COUNTER}: {status:?}"));
        }
        Action::Pause
    }
}

/// Logs at warn level; a host that cannot log leaves nothing else to report to.
fn warn(message: &str) {
    let _ = proxy_wasm::hostcalls::log(LogLevel::Warn, message);
}
