//! What the host records and serves: header maps, bodies, properties, shared data, metrics,
//! logs, HTTP calls and local responses. Everything lives in one [`HostState`] per host (the
//! wasmtime store data), so hosts never share state.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use wasmtime::{Memory, TypedFunc};
use wasmtime_wasi::p1::WasiP1Ctx;

use crate::abi::{LogLevel, MetricType, Status};
use crate::clock::Clock;

/// Envoy's default per-stream buffer limit (`per_connection_buffer_limit_bytes`): 1 MiB.
pub const DEFAULT_BUFFER_LIMIT: usize = 1 << 20;

/// An ordered header (or trailer) map as Envoy keeps it: keys lower case, repeated keys allowed,
/// values raw bytes (Envoy passes any byte a client sent, UTF-8 or not; the Rust SDK's string
/// accessors panic on a value that is not UTF-8, its `_bytes` accessors do not).
///
/// ```
/// use proxy_wasm_host::Headers;
///
/// let headers = Headers::from_pairs(&[(":status", "301"), ("Location", "https://a.test/")]);
/// assert_eq!(headers.get("location"), Some("https://a.test/"));
///
/// let raw = Headers::from_byte_pairs(&[("x-raw", b"a\xffb")]);
/// assert_eq!(raw.get_bytes("x-raw"), Some(&b"a\xffb"[..]));
/// assert_eq!(raw.get("x-raw"), None); // not UTF-8: read it with get_bytes
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(Vec<(String, Vec<u8>)>);

impl Headers {
    /// A map from `(name, value)` pairs; names are lower-cased as Envoy does.
    pub fn from_pairs(pairs: &[(&str, &str)]) -> Self {
        Self(
            pairs
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.as_bytes().to_vec()))
                .collect(),
        )
    }

    /// A map from `(name, value bytes)` pairs, for values that need not be UTF-8.
    pub fn from_byte_pairs(pairs: &[(&str, &[u8])]) -> Self {
        Self(
            pairs
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.to_vec()))
                .collect(),
        )
    }

    /// A map from pairs as the guest sent them. Names are lower-cased; a name that is not
    /// UTF-8 (Envoy would refuse to send it on the wire anyway) is kept lossily.
    pub(crate) fn from_wire(pairs: Vec<(Vec<u8>, Vec<u8>)>) -> Self {
        Self(
            pairs
                .into_iter()
                .map(|(k, v)| (String::from_utf8_lossy(&k).to_ascii_lowercase(), v))
                .collect(),
        )
    }

    /// The first value of `name` (case-insensitive), as `proxy_get_header_map_value` returns
    /// it; `None` when absent or not UTF-8 (read such values with [`get_bytes`](Self::get_bytes)).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.get_bytes(name)
            .and_then(|value| std::str::from_utf8(value).ok())
    }

    /// The first value of `name` (case-insensitive) as raw bytes.
    pub fn get_bytes(&self, name: &str) -> Option<&[u8]> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// Every value of `name`, in order (values that are not UTF-8 lossily decoded).
    pub fn get_all(&self, name: &str) -> Vec<Cow<'_, str>> {
        self.0
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v))
            .collect()
    }

    /// Whether `name` is present.
    pub fn contains(&self, name: &str) -> bool {
        self.get_bytes(name).is_some()
    }

    /// All pairs, in order, values lossily decoded as UTF-8 (exact bytes:
    /// [`byte_pairs`](Self::byte_pairs)).
    pub fn pairs(&self) -> impl Iterator<Item = (&str, Cow<'_, str>)> {
        self.0
            .iter()
            .map(|(k, v)| (k.as_str(), String::from_utf8_lossy(v)))
    }

    /// All pairs, in order, values as raw bytes.
    pub fn byte_pairs(&self) -> impl Iterator<Item = (&str, &[u8])> + Clone {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_slice()))
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the map has no entries.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Sum of key and value lengths: what Envoy's `byteSize()` (and so
    /// `proxy_get_header_map_size`) reports.
    pub fn byte_size(&self) -> usize {
        self.0.iter().map(|(k, v)| k.len() + v.len()).sum()
    }

    /// Appends a value (Envoy `addCopy`).
    pub(crate) fn add(&mut self, name: &str, value: &[u8]) {
        self.0.push((name.to_ascii_lowercase(), value.to_vec()));
    }

    /// Sets the single value of `name` as Envoy's `setCopy` does: every entry of `name` is
    /// removed and the new one appended at the end (so a replaced header moves to the end).
    pub(crate) fn replace(&mut self, name: &str, value: &[u8]) {
        let name = name.to_ascii_lowercase();
        self.0.retain(|(k, _)| *k != name);
        self.0.push((name, value.to_vec()));
    }

    /// Removes every value of `name`.
    pub(crate) fn remove(&mut self, name: &str) {
        self.0.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
    }
}

/// A response the filter sent itself with `proxy_send_local_response`, as it asked for it.
///
/// The headers the client finally sees (after Envoy ran the filter's own response callbacks on
/// the local reply) are in [`HttpStream::current_response_headers`](crate::HttpStream::current_response_headers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalResponse {
    /// HTTP status code.
    pub status: u32,
    /// Headers the filter asked to add (keys lower-cased).
    pub headers: Headers,
    /// Response body.
    pub body: Vec<u8>,
    /// Response code details (Envoy's `%RESPONSE_CODE_DETAILS%`); empty when not given.
    pub details: String,
    /// gRPC status, `-1` when not set.
    pub grpc_status: i32,
}

/// An HTTP call the filter dispatched with `proxy_http_call`; answer it with
/// [`Host::respond_to_http_call`](crate::Host::respond_to_http_call).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCall {
    /// Token the host returned to the guest.
    pub token: u32,
    /// Context that was effective when it was dispatched. Envoy owns every HTTP call on the
    /// root context, so `proxy_on_http_call_response` runs on the root context with the root
    /// context's id (the SDKs route the answer to the stream by token).
    pub context_id: u32,
    /// Envoy cluster name the call goes to.
    pub upstream: String,
    /// Request headers, including `:method`, `:path` and `:authority`.
    pub headers: Headers,
    /// Request body.
    pub body: Vec<u8>,
    /// Request trailers.
    pub trailers: Headers,
    /// Timeout; zero means Envoy's default (none).
    pub timeout: Duration,
    /// When the timeout ends the call (host clock, Unix nanoseconds); `None` without one.
    pub(crate) deadline_unix_nanos: Option<u64>,
}

/// How an HTTP call fails, and what Envoy 1.40's async client then hands the filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HttpCallFailure {
    /// The upstream refused the connection (nothing listens): Envoy answers with a generated
    /// `503` whose body names the reset reason, `remote connection failure`.
    ConnectionFailure,
    /// The cluster has no healthy host: a generated `503` with body `no healthy upstream`.
    NoHealthyUpstream,
    /// The call's timeout passed first: a generated `504` with body `upstream request timeout`
    /// (also what [`Host::advance_clock`](crate::Host::advance_clock) does when it passes a
    /// call's deadline).
    Timeout,
    /// The upstream reset after its response headers: Envoy's failure callback, with no
    /// headers and no body, and `proxy_get_status` answering `BrokenConnection` (11) / `reset`.
    ResetAfterHeaders,
}

impl HttpCallFailure {
    /// The generated reply `(status, body)`, or `None` for the failure callback.
    pub fn generated_reply(self) -> Option<(u16, &'static str)> {
        match self {
            HttpCallFailure::ConnectionFailure => Some((
                503,
                "upstream connect error or disconnect/reset before headers. reset reason: remote connection failure",
            )),
            HttpCallFailure::NoHealthyUpstream => Some((503, "no healthy upstream")),
            HttpCallFailure::Timeout => Some((504, "upstream request timeout")),
            HttpCallFailure::ResetAfterHeaders => None,
        }
    }
}

/// One `proxy_log` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// Level the guest logged at.
    pub level: LogLevel,
    /// The message.
    pub message: String,
    /// Context that was effective when it logged.
    pub context_id: u32,
}

/// A metric the filter defined, by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metric {
    /// Counter, gauge or histogram.
    pub kind: MetricType,
    /// Current value of a counter or gauge; 0 for a histogram.
    pub value: u64,
    /// Values recorded into a histogram, in order; empty for counters and gauges.
    pub samples: Vec<u64>,
}

/// A host call that failed in a way the guest author should hear about: an import this host
/// does not implement, or guest memory it could not read or write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCallError {
    /// The import, e.g. `proxy_grpc_call` or `wasi_unstable.fd_write`.
    pub call: String,
    /// Status returned to the guest.
    pub status: Status,
    /// What went wrong.
    pub message: String,
    /// Context that was effective.
    pub context_id: u32,
}

/// The answer to an HTTP call, visible to the guest while `proxy_on_http_call_response` runs.
#[derive(Debug, Clone, Default)]
pub(crate) struct HttpCallReply {
    pub(crate) headers: Headers,
    pub(crate) body: Vec<u8>,
    pub(crate) trailers: Headers,
}

/// One HTTP stream's state, mirroring what Envoy's wasm `Context` holds.
#[derive(Debug, Default)]
pub(crate) struct StreamState {
    pub(crate) request_headers: Headers,
    pub(crate) request_trailers: Headers,
    pub(crate) response_headers: Headers,
    pub(crate) response_trailers: Headers,
    /// Which maps Envoy currently exposes (it drops its pointer once a callback continues).
    pub(crate) request_headers_available: bool,
    pub(crate) request_trailers_available: bool,
    pub(crate) response_headers_available: bool,
    pub(crate) response_trailers_available: bool,
    /// During `proxy_on_log` Envoy exposes request/response headers and response trailers
    /// read-only.
    pub(crate) access_log_phase: bool,
    pub(crate) request_body: Vec<u8>,
    pub(crate) response_body: Vec<u8>,
    pub(crate) request_body_available: bool,
    pub(crate) response_body_available: bool,
    pub(crate) buffering_request_body: bool,
    pub(crate) buffering_response_body: bool,
    pub(crate) forwarded_request_body: Vec<u8>,
    pub(crate) forwarded_response_body: Vec<u8>,
    pub(crate) local_responses: Vec<LocalResponse>,
    /// Response headers reached the filter (from upstream, or a replayed local reply).
    pub(crate) response_started: bool,
    pub(crate) properties: HashMap<Vec<u8>, Vec<u8>>,
    pub(crate) continued_request: u32,
    pub(crate) continued_response: u32,
    pub(crate) closed_request: bool,
    pub(crate) closed_response: bool,
    pub(crate) host_calls: u64,
    /// Why the host reset the stream (e.g. a buffer over its limit), if it did.
    pub(crate) reset_reason: Option<String>,
    pub(crate) end_of_stream: bool,
    pub(crate) completed: bool,
    /// The VM failed during (or before) this stream; Envoy already answered or reset it.
    pub(crate) failed: bool,
}

/// A shared queue (`proxy_register_shared_queue`), as Envoy keeps it.
#[derive(Debug, Clone)]
pub(crate) struct SharedQueue {
    pub(crate) vm_id: String,
    pub(crate) name: String,
    pub(crate) token: u32,
    /// The context that registered it last: `proxy_on_queue_ready` runs there.
    pub(crate) owner_context: u32,
    pub(crate) items: VecDeque<Vec<u8>>,
}

/// The wasmtime store data of one host.
pub(crate) struct HostState {
    pub(crate) wasi: WasiP1Ctx,
    pub(crate) memory: Option<Memory>,
    pub(crate) allocate: Option<TypedFunc<u32, u32>>,
    pub(crate) clock: Clock,
    pub(crate) log_level: LogLevel,
    pub(crate) logs: Vec<LogEntry>,
    pub(crate) host_call_errors: Vec<HostCallError>,
    pub(crate) call_counts: BTreeMap<&'static str, u64>,
    pub(crate) properties: HashMap<Vec<u8>, Vec<u8>>,
    pub(crate) shared_data: HashMap<Vec<u8>, (Vec<u8>, u32)>,
    pub(crate) next_cas: u32,
    /// The VM id (`vm_config.vm_id`) shared queues are registered and resolved under.
    pub(crate) vm_id: String,
    pub(crate) shared_queues: Vec<SharedQueue>,
    pub(crate) next_queue_token: u32,
    /// `(context, token)` of each `proxy_on_queue_ready` owed after an enqueue, in order.
    pub(crate) queue_ready: VecDeque<(u32, u32)>,
    pub(crate) metric_ids: HashMap<u32, (MetricType, String)>,
    pub(crate) metrics: BTreeMap<String, Metric>,
    pub(crate) next_metric_seq: u32,
    pub(crate) tick_period: Option<Duration>,
    pub(crate) next_tick_unix_nanos: Option<u64>,
    pub(crate) http_calls: Vec<HttpCall>,
    pub(crate) pending_http_calls: Vec<u32>,
    pub(crate) next_http_token: u32,
    pub(crate) http_call_reply: Option<HttpCallReply>,
    pub(crate) known_clusters: Option<Vec<String>>,
    /// Bytes a filter may buffer per body before the stream is reset.
    pub(crate) buffer_limit: usize,
    pub(crate) vm_configuration: Vec<u8>,
    pub(crate) plugin_configuration: Vec<u8>,
    pub(crate) configuring: bool,
    pub(crate) root_context_id: u32,
    pub(crate) effective_context: u32,
    pub(crate) streams: BTreeMap<u32, StreamState>,
    pub(crate) status: (u32, String),
    /// The root context's `proxy_on_done` returned false: it will call `proxy_done` later.
    pub(crate) root_done_pending: bool,
    pub(crate) root_done: bool,
}

impl std::fmt::Debug for HostState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostState")
            .field("root_context_id", &self.root_context_id)
            .field("effective_context", &self.effective_context)
            .field("streams", &self.streams.len())
            .field("logs", &self.logs.len())
            .finish_non_exhaustive()
    }
}

impl HostState {
    pub(crate) fn new(wasi: WasiP1Ctx, clock: Clock) -> Self {
        Self {
            wasi,
            memory: None,
            allocate: None,
            clock,
            log_level: LogLevel::Info,
            logs: Vec::new(),
            host_call_errors: Vec::new(),
            call_counts: BTreeMap::new(),
            properties: HashMap::new(),
            shared_data: HashMap::new(),
            next_cas: 1,
            vm_id: String::new(),
            shared_queues: Vec::new(),
            next_queue_token: 1,
            queue_ready: VecDeque::new(),
            metric_ids: HashMap::new(),
            metrics: BTreeMap::new(),
            next_metric_seq: 1,
            tick_period: None,
            next_tick_unix_nanos: None,
            http_calls: Vec::new(),
            pending_http_calls: Vec::new(),
            next_http_token: 1,
            http_call_reply: None,
            known_clusters: None,
            buffer_limit: DEFAULT_BUFFER_LIMIT,
            vm_configuration: Vec::new(),
            plugin_configuration: Vec::new(),
            configuring: false,
            root_context_id: 1,
            effective_context: 1,
            streams: BTreeMap::new(),
            status: (0, String::new()),
            root_done_pending: false,
            root_done: false,
        }
    }

    /// The stream whose context is effective, if the effective context is a stream.
    pub(crate) fn effective_stream(&mut self) -> Option<&mut StreamState> {
        self.streams.get_mut(&self.effective_context)
    }

    /// Envoy's `enqueueSharedQueue`: appends the item and owes the registering context one
    /// `proxy_on_queue_ready` (Envoy posts it to that context's thread; it runs after the
    /// current VM call).
    pub(crate) fn enqueue_shared_queue(&mut self, token: u32, item: Vec<u8>) -> Result<(), Status> {
        let queue = self
            .shared_queues
            .iter_mut()
            .find(|q| q.token == token)
            .ok_or(Status::NotFound)?;
        queue.items.push_back(item);
        self.queue_ready.push_back((queue.owner_context, token));
        Ok(())
    }

    pub(crate) fn record_error(&mut self, call: &str, status: Status, message: String) {
        let context_id = self.effective_context;
        self.host_call_errors.push(HostCallError {
            call: call.to_owned(),
            status,
            message,
            context_id,
        });
    }
}
