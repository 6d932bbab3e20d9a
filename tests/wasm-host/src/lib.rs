//! A proxy-wasm host on wasmtime: runs a `wasm32-wasip1` proxy-wasm filter (ABI 0.2.1) the way
//! Envoy runs it, without Envoy, with a state-based API in the style of proxy-wasm-go-sdk's
//! `proxytest`.
//!
//! - [`FilterModule`] compiles a `.wasm` once per process (cached by path) and links it.
//! - [`HostBuilder`] sets plugin/VM configuration, properties and the clock, and starts the VM
//!   and plugin (`proxy_on_vm_start`, `proxy_on_configure`).
//! - [`Host`] owns one instance and all its state (no globals: hosts run in parallel); it
//!   drives ticks and the clock, answers HTTP calls, and reads back logs, metrics, shared data
//!   and unsupported host calls.
//! - [`HttpStream`] drives one HTTP stream through Envoy's callbacks and reads back the
//!   action, the local response, the mutated headers and bodies.
//!
//! Envoy 1.40 semantics are followed where a filter could tell the difference: which header
//! maps and buffers exist in which callback (request headers vanish once the filter
//! continues), status codes of failing calls, `:status`/`:authority`/`:path`/`:method`/`:scheme`
//! pseudo-headers in the maps, a local reply sent on the request path being encoded through
//! the filter's own response callbacks, a replaced header removed and appended at the end
//! (`setCopy`), HTTP calls owned by the root context (`proxy_on_http_call_response` gets the
//! root context's id), a failed call answered with Envoy's generated reply
//! ([`HttpCallFailure`]: `503` unreachable, `504` when the clock passes the call's timeout),
//! a request body buffered past the buffer limit ([`DEFAULT_BUFFER_LIMIT`], 1 MiB) answered
//! `413` and a response body reset, gRPC calls answered as for a missing cluster, shared
//! queues with `proxy_on_queue_ready` on the registering context, foreign functions answered
//! `NotFound` as for an unknown name, header values as raw bytes (a non-UTF-8 value reaches
//! the filter unchanged), a trapped VM failing closed (its stream and every later one get
//! Envoy's `503`, the VM is not called again), and `on_log` → `on_done` → `on_delete` at the
//! end. `tests/tests/host_parity.rs` in this repository runs a fixture filter in both Envoy
//! and this host and checks they agree. [`SUPPORTED_HOST_CALLS`] lists the
//! implemented imports; any other import answers [`Status::Unimplemented`] and is recorded by
//! name in [`Host::host_call_errors`].
//!
//! ```no_run
//! use proxy_wasm_host::{Action, FilterModule, HostBuilder};
//!
//! let module = FilterModule::load("target/wasm32-wasip1/wasm-release/my_filter.wasm")?;
//! let mut host = HostBuilder::new(&module)
//!     .plugin_configuration(br#"{"upstream": "policy"}"#.to_vec())
//!     .property(&["plugin_name"], "my_filter")
//!     .build()?;
//! assert!(host.configuration_accepted());
//!
//! let mut stream = host.http_stream()?;
//! stream.set_property(&["source", "address"], "127.0.0.1:5555");
//! let action = stream.request_headers(
//!     &[(":method", "GET"), (":scheme", "http"), (":authority", "a.test"), (":path", "/")],
//!     true,
//! )?;
//! if action == Action::Pause {
//!     // The filter answered itself, or waits for an HTTP call.
//!     if let Some(reply) = stream.local_response() {
//!         println!("{} -> {:?}", reply.status, reply.headers.get("location"));
//!     }
//! }
//! stream.complete()?;
//!
//! // A filter that polls a policy feed on a timer:
//! host.advance_clock(std::time::Duration::from_secs(10))?;
//! for call in host.pending_http_calls().iter().map(|c| c.token).collect::<Vec<_>>() {
//!     host.respond_to_http_call(call, &[(":status", "200")], br#"{"version": 2}"#)?;
//! }
//! println!("{:?}", host.metric("my_filter.redirects"));
//! # Ok::<(), proxy_wasm_host::WasmHostError>(())
//! ```

#![warn(missing_docs)]

mod abi;
mod clock;
mod error;
mod host;
mod imports;
mod module;
mod state;
mod workspace_wasm;

pub use abi::{Action, LogLevel, MetricType, Status};
pub use error::{Result, WasmHostError};
pub use host::{Host, HostBuilder, HttpStream};
pub use imports::SUPPORTED_HOST_CALLS;
pub use module::FilterModule;
pub use state::{
    DEFAULT_BUFFER_LIMIT, Headers, HostCallError, HttpCall, HttpCallFailure, LocalResponse,
    LogEntry, Metric,
};
pub use workspace_wasm::build_workspace_wasm;

/// A boolean property value as Envoy serializes it (one byte), e.g. for `connection.mtls`.
pub fn property_bool(value: bool) -> Vec<u8> {
    vec![u8::from(value)]
}

/// An integer property value as Envoy serializes it (8 little-endian bytes), e.g. for
/// `source.port` or `response.code`.
pub fn property_int(value: i64) -> Vec<u8> {
    value.to_le_bytes().to_vec()
}
