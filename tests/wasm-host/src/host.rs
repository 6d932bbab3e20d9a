//! The state-based driver: build a host from a filter, drive HTTP streams, ticks and the
//! clock, answer HTTP calls, and read back what the filter did.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

use wasmtime::{Instance, Store, TypedFunc, WasmParams, WasmResults};
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;

use crate::abi::{Action, LogLevel, join_path, len_u32};
use crate::clock::{Clock, DEFAULT_START_UNIX_NANOS};
use crate::error::{Result, WasmHostError};
use crate::module::FilterModule;
use crate::state::{
    DEFAULT_BUFFER_LIMIT, Headers, HostCallError, HostState, HttpCall, HttpCallFailure,
    HttpCallReply, LocalResponse, LogEntry, Metric, StreamState,
};

/// Envoy's response code details for the 503 of a stream on a failed VM.
const FAIL_STREAM_DETAILS: &str = "wasm_fail_stream";
/// gRPC status `UNAVAILABLE`, which Envoy gives that 503.
const GRPC_UNAVAILABLE: i32 = 14;

/// The direction of a stream callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Request,
    Response,
}

/// Bytes of guest stdout/stderr kept per host.
const STDIO_CAPACITY: usize = 1 << 20;

/// Configures and starts a [`Host`]: the filter module, its configuration, properties, the
/// clock. [`build`](Self::build) runs the VM and plugin start-up exactly as Envoy does.
///
/// ```no_run
/// use proxy_wasm_host::{FilterModule, HostBuilder};
///
/// let module = FilterModule::load("target/wasm32-wasip1/wasm-release/my_filter.wasm")?;
/// let host = HostBuilder::new(&module)
///     .plugin_configuration(br#"{"sites": []}"#.to_vec())
///     .property(&["plugin_name"], "my_filter")
///     .build()?;
/// assert!(host.configuration_accepted());
/// # Ok::<(), proxy_wasm_host::WasmHostError>(())
/// ```
#[derive(Debug, Clone)]
pub struct HostBuilder {
    module: FilterModule,
    plugin_configuration: Vec<u8>,
    vm_configuration: Vec<u8>,
    properties: HashMap<Vec<u8>, Vec<u8>>,
    log_level: LogLevel,
    clock_start: SystemTime,
    known_clusters: Option<Vec<String>>,
    buffer_limit: usize,
    vm_id: String,
}

impl HostBuilder {
    /// A builder for `module` with empty configurations, log level `Info` (Envoy's default)
    /// and the clock at 2025-01-01T00:00:00Z.
    pub fn new(module: &FilterModule) -> Self {
        Self {
            module: module.clone(),
            plugin_configuration: Vec::new(),
            vm_configuration: Vec::new(),
            properties: HashMap::new(),
            log_level: LogLevel::Info,
            clock_start: SystemTime::UNIX_EPOCH + Duration::from_nanos(DEFAULT_START_UNIX_NANOS),
            known_clusters: None,
            buffer_limit: DEFAULT_BUFFER_LIMIT,
            vm_id: String::new(),
        }
    }

    /// The most a filter may buffer of one body before Envoy resets the stream (its
    /// per-connection buffer limit): [`DEFAULT_BUFFER_LIMIT`] (1 MiB) unless set.
    pub fn buffer_limit(mut self, bytes: usize) -> Self {
        self.buffer_limit = bytes;
        self
    }

    /// The VM id (`vm_config.vm_id` in Envoy; empty unless set): shared queues are registered
    /// under it, and `proxy_resolve_shared_queue` finds them by it.
    pub fn vm_id(mut self, vm_id: &str) -> Self {
        self.vm_id = vm_id.to_owned();
        self
    }

    /// The plugin configuration (`configuration` in Envoy's `PluginConfig`), readable by the
    /// guest during `proxy_on_configure` only, as in Envoy.
    pub fn plugin_configuration(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.plugin_configuration = bytes.into();
        self
    }

    /// The VM configuration (`vm_config.configuration`), readable at any time.
    pub fn vm_configuration(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.vm_configuration = bytes.into();
        self
    }

    /// A host-wide property, e.g. `&["plugin_name"]` or `&["node", "id"]`. Values are the raw
    /// bytes Envoy would serialize: strings as is, booleans as one byte, integers as 8
    /// little-endian bytes (see [`property_bool`](crate::property_bool),
    /// [`property_int`](crate::property_int)). Per-stream properties such as
    /// `source.address` are set with [`HttpStream::set_property`].
    pub fn property(mut self, path: &[&str], value: impl Into<Vec<u8>>) -> Self {
        self.properties.insert(join_path(path), value.into());
        self
    }

    /// The level `proxy_get_log_level` reports. Every `proxy_log` line is recorded whatever
    /// the level.
    pub fn log_level(mut self, level: LogLevel) -> Self {
        self.log_level = level;
        self
    }

    /// Where the clock starts.
    pub fn clock_start(mut self, start: SystemTime) -> Self {
        self.clock_start = start;
        self
    }

    /// Declares an Envoy cluster. Once any is declared, `proxy_http_call` to an undeclared
    /// cluster fails with `BadArgument`, as in Envoy; with none declared every name is accepted.
    pub fn cluster(mut self, name: &str) -> Self {
        self.known_clusters
            .get_or_insert_with(Vec::new)
            .push(name.to_owned());
        self
    }

    /// Instantiates the module and starts it as Envoy does: `_initialize` (or `_start`),
    /// `proxy_on_context_create(root)`, `proxy_on_vm_start`, then `proxy_on_configure` if the
    /// VM started. A `false` from either is not an error here: see
    /// [`Host::configuration_accepted`].
    pub fn build(self) -> Result<Host> {
        let clock = Clock::starting_at(self.clock_start);
        let stdout = MemoryOutputPipe::new(STDIO_CAPACITY);
        let stderr = MemoryOutputPipe::new(STDIO_CAPACITY);
        let wasi = WasiCtxBuilder::new()
            .wall_clock(clock.clone())
            .monotonic_clock(clock.clone())
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .build_p1();
        let mut state = HostState::new(wasi, clock);
        state.log_level = self.log_level;
        state.properties = self.properties;
        state.vm_configuration = self.vm_configuration;
        state.plugin_configuration = self.plugin_configuration;
        state.known_clusters = self.known_clusters;
        state.buffer_limit = self.buffer_limit;
        state.vm_id = self.vm_id;
        let root = state.root_context_id;

        let mut store = Store::new(self.module.engine(), state);
        let instance = self
            .module
            .instance_pre()
            .instantiate(&mut store)
            .map_err(|e| WasmHostError::Instantiate(format!("{e:#}")))?;
        let exports = Exports::new(&instance, &mut store)?;
        let memory = instance.get_memory(&mut store, "memory");
        store.data_mut().memory = memory;
        store.data_mut().allocate = exports.allocate.clone();

        let mut host = Host {
            store,
            exports,
            module: self.module,
            vm_started: false,
            configured: false,
            failure: None,
            next_context_id: root + 1,
            configure_time: Duration::ZERO,
            delivering_queue_ready: false,
            stdout,
            stderr,
        };
        host.initialize()?;
        host.call(
            "proxy_on_context_create",
            host.exports.on_context_create.clone(),
            root,
            (root, 0),
        )?;
        let vm_size = len_u32(host.store.data().vm_configuration.len());
        host.vm_started = host
            .call(
                "proxy_on_vm_start",
                host.exports.on_vm_start.clone(),
                root,
                (root, vm_size),
            )?
            .is_none_or(|ok| ok != 0);
        if host.vm_started {
            let size = len_u32(host.store.data().plugin_configuration.len());
            host.store.data_mut().configuring = true;
            let started = std::time::Instant::now();
            let configured = host.call(
                "proxy_on_configure",
                host.exports.on_configure.clone(),
                root,
                (root, size),
            );
            host.configure_time = started.elapsed();
            host.store.data_mut().configuring = false;
            host.configured = configured?.is_none_or(|ok| ok != 0);
        }
        Ok(host)
    }
}

/// `(context_id, token, headers, body_size, trailers)` of `proxy_on_http_call_response`.
type HttpCallResponseParams = (u32, u32, u32, u32, u32);

/// The guest exports the host calls; `None` when the module does not export one (Envoy then
/// uses the default: continue, accept).
struct Exports {
    initialize: Option<TypedFunc<(), ()>>,
    start: Option<TypedFunc<(), ()>>,
    allocate: Option<TypedFunc<u32, u32>>,
    on_context_create: Option<TypedFunc<(u32, u32), ()>>,
    on_vm_start: Option<TypedFunc<(u32, u32), u32>>,
    on_configure: Option<TypedFunc<(u32, u32), u32>>,
    on_request_headers: Option<TypedFunc<(u32, u32, u32), u32>>,
    on_request_body: Option<TypedFunc<(u32, u32, u32), u32>>,
    on_request_trailers: Option<TypedFunc<(u32, u32), u32>>,
    on_response_headers: Option<TypedFunc<(u32, u32, u32), u32>>,
    on_response_body: Option<TypedFunc<(u32, u32, u32), u32>>,
    on_response_trailers: Option<TypedFunc<(u32, u32), u32>>,
    on_done: Option<TypedFunc<u32, u32>>,
    on_log: Option<TypedFunc<u32, ()>>,
    on_delete: Option<TypedFunc<u32, ()>>,
    on_tick: Option<TypedFunc<u32, ()>>,
    on_http_call_response: Option<TypedFunc<HttpCallResponseParams, ()>>,
    on_queue_ready: Option<TypedFunc<(u32, u32), ()>>,
}

impl Exports {
    fn new(instance: &Instance, store: &mut Store<HostState>) -> Result<Self> {
        fn typed<P: WasmParams, R: WasmResults>(
            instance: &Instance,
            store: &mut Store<HostState>,
            name: &str,
        ) -> Result<Option<TypedFunc<P, R>>> {
            let Some(func) = instance.get_func(&mut *store, name) else {
                return Ok(None);
            };
            func.typed(&*store).map(Some).map_err(|e| {
                WasmHostError::Instantiate(format!(
                    "export {name} does not have the proxy-wasm 0.2.1 signature: {e:#}"
                ))
            })
        }
        let allocate = match typed(instance, store, "proxy_on_memory_allocate")? {
            Some(f) => Some(f),
            None => typed(instance, store, "malloc")?,
        };
        Ok(Self {
            initialize: typed(instance, store, "_initialize")?,
            start: typed(instance, store, "_start")?,
            allocate,
            on_context_create: typed(instance, store, "proxy_on_context_create")?,
            on_vm_start: typed(instance, store, "proxy_on_vm_start")?,
            on_configure: typed(instance, store, "proxy_on_configure")?,
            on_request_headers: typed(instance, store, "proxy_on_request_headers")?,
            on_request_body: typed(instance, store, "proxy_on_request_body")?,
            on_request_trailers: typed(instance, store, "proxy_on_request_trailers")?,
            on_response_headers: typed(instance, store, "proxy_on_response_headers")?,
            on_response_body: typed(instance, store, "proxy_on_response_body")?,
            on_response_trailers: typed(instance, store, "proxy_on_response_trailers")?,
            on_done: typed(instance, store, "proxy_on_done")?,
            on_log: typed(instance, store, "proxy_on_log")?,
            on_delete: typed(instance, store, "proxy_on_delete")?,
            on_tick: typed(instance, store, "proxy_on_tick")?,
            on_http_call_response: typed(instance, store, "proxy_on_http_call_response")?,
            on_queue_ready: typed(instance, store, "proxy_on_queue_ready")?,
        })
    }
}

/// One running filter: a wasmtime instance of a [`FilterModule`] with its own state (no
/// globals, so hosts run in parallel). Create it with [`HostBuilder`].
///
/// A full round trip, in the style of proxy-wasm-go-sdk's `proxytest`:
///
/// ```no_run
/// use proxy_wasm_host::{Action, FilterModule, HostBuilder};
///
/// let module = FilterModule::load("target/wasm32-wasip1/wasm-release/my_filter.wasm")?;
/// let mut host = HostBuilder::new(&module).build()?;
/// let mut stream = host.http_stream()?;
/// stream.set_property(&["connection", "tls_version"], "");
/// let action = stream.request_headers(
///     &[(":method", "GET"), (":scheme", "http"), (":authority", "a.test"), (":path", "/x?y")],
///     true,
/// )?;
/// assert_eq!(action, Action::Pause);
/// let reply = stream.local_response().expect("the filter answered itself");
/// assert_eq!(reply.status, 301);
/// assert_eq!(reply.headers.get("location"), Some("https://a.test/x?y"));
/// stream.complete()?;
/// assert!(host.logs().iter().any(|l| l.message.contains("redirect")));
/// # Ok::<(), proxy_wasm_host::WasmHostError>(())
/// ```
pub struct Host {
    store: Store<HostState>,
    exports: Exports,
    module: FilterModule,
    vm_started: bool,
    configured: bool,
    failure: Option<String>,
    next_context_id: u32,
    configure_time: Duration,
    /// `proxy_on_queue_ready` calls are being made (they are not nested).
    delivering_queue_ready: bool,
    stdout: MemoryOutputPipe,
    stderr: MemoryOutputPipe,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("module", &self.module)
            .field("vm_started", &self.vm_started)
            .field("configured", &self.configured)
            .field("failure", &self.failure)
            .field("state", self.store.data())
            .finish_non_exhaustive()
    }
}

impl Host {
    /// Runs the module's start-up function: `_initialize` (reactor) or `_start` (command,
    /// where `proc_exit(0)` counts as success).
    fn initialize(&mut self) -> Result<()> {
        if let Some(init) = self.exports.initialize.clone() {
            self.call("_initialize", Some(init), 0, ())?;
        } else if let Some(start) = self.exports.start.clone() {
            match start.call(&mut self.store, ()) {
                Ok(()) => {}
                Err(e) if e.downcast_ref::<wasmtime_wasi::I32Exit>().map(|x| x.0) == Some(0) => {}
                Err(e) => return Err(self.trapped("_start", &e)),
            }
        }
        Ok(())
    }

    fn trapped(&mut self, export: &str, error: &wasmtime::Error) -> WasmHostError {
        let message = format!("{error:?}");
        self.failure = Some(format!("{export}: {message}"));
        WasmHostError::Trap {
            export: export.to_owned(),
            message,
        }
    }

    /// Calls a guest export with `context` effective. `Ok(None)` when not exported.
    fn call<P: WasmParams, R: WasmResults>(
        &mut self,
        export: &str,
        func: Option<TypedFunc<P, R>>,
        context: u32,
        params: P,
    ) -> Result<Option<R>> {
        if let Some(failure) = &self.failure {
            return Err(WasmHostError::VmFailed(failure.clone()));
        }
        let Some(func) = func else {
            return Ok(None);
        };
        self.store.data_mut().effective_context = context;
        let result = match func.call(&mut self.store, params) {
            Ok(result) => result,
            Err(e) => return Err(self.trapped(export, &e)),
        };
        self.deliver_queue_ready()?;
        Ok(Some(result))
    }

    /// Makes the `proxy_on_queue_ready` calls enqueues owe, in order, each on the context
    /// that registered the queue: Envoy posts them to that thread, so they run once the VM
    /// call that enqueued has returned.
    fn deliver_queue_ready(&mut self) -> Result<()> {
        if self.delivering_queue_ready {
            return Ok(());
        }
        self.delivering_queue_ready = true;
        let mut result = Ok(());
        while let Some((context, token)) = self.store.data_mut().queue_ready.pop_front() {
            result = self
                .call(
                    "proxy_on_queue_ready",
                    self.exports.on_queue_ready.clone(),
                    context,
                    (context, token),
                )
                .map(drop);
            if result.is_err() {
                break;
            }
        }
        self.delivering_queue_ready = false;
        result
    }

    /// Whether `proxy_on_vm_start` and `proxy_on_configure` both accepted. When false, Envoy
    /// would reject the plugin configuration; [`http_stream`](Self::http_stream) refuses.
    pub fn configuration_accepted(&self) -> bool {
        self.vm_started && self.configured
    }

    /// Whether `proxy_on_vm_start` returned true.
    pub fn vm_started(&self) -> bool {
        self.vm_started
    }

    /// The first trap, if the guest trapped; the VM is failed from then on.
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    /// Wall time of the `proxy_on_configure` call alone (zero when the VM did not start), as
    /// this host's compiled code ran it: the cost of applying a configuration.
    pub fn configure_time(&self) -> Duration {
        self.configure_time
    }

    /// The size of the guest's linear memory in bytes now. Wasm memory never shrinks, so this
    /// is also the peak so far.
    pub fn linear_memory_bytes(&self) -> u64 {
        self.store
            .data()
            .memory
            .map_or(0, |memory| memory.data_size(&self.store) as u64)
    }

    /// The module this host runs.
    pub fn module(&self) -> &FilterModule {
        &self.module
    }

    /// The root (plugin) context id: 1, as in Envoy's cpp-host.
    pub fn root_context_id(&self) -> u32 {
        self.store.data().root_context_id
    }

    /// Creates an HTTP stream (`proxy_on_context_create(id, root)`) and returns its driver.
    pub fn http_stream(&mut self) -> Result<HttpStream<'_>> {
        if !self.vm_started {
            return Err(WasmHostError::ConfigurationRejected("vm_start"));
        }
        if !self.configured {
            return Err(WasmHostError::ConfigurationRejected("configure"));
        }
        let id = self.next_context_id;
        self.next_context_id += 1;
        let root = self.root_context_id();
        self.store
            .data_mut()
            .streams
            .insert(id, StreamState::default());
        if self.failure.is_some() {
            // Envoy (fail closed) gives the stream a context without a VM: its callbacks
            // answer 503 (see `HttpStream::request_headers`).
            return Ok(HttpStream { host: self, id });
        }
        self.call(
            "proxy_on_context_create",
            self.exports.on_context_create.clone(),
            id,
            (id, root),
        )?;
        Ok(HttpStream { host: self, id })
    }

    /// The driver of an existing stream, e.g. after answering an HTTP call it waited for.
    pub fn stream(&mut self, id: u32) -> Result<HttpStream<'_>> {
        if !self.store.data().streams.contains_key(&id) {
            return Err(WasmHostError::UnknownStream(id));
        }
        Ok(HttpStream { host: self, id })
    }

    /// Calls `proxy_on_tick` on the root context once.
    pub fn tick(&mut self) -> Result<()> {
        let root = self.root_context_id();
        self.call("proxy_on_tick", self.exports.on_tick.clone(), root, root)?;
        self.after_vm_call()
    }

    /// Advances the clock by `by`, firing what falls due on the way in time order, as Envoy's
    /// timers would: `proxy_on_tick` at each tick, and the timeout of each pending HTTP call
    /// whose deadline passes (answered as [`HttpCallFailure::Timeout`]: a generated `504`).
    /// Returns how many ticks fired.
    pub fn advance_clock(&mut self, by: Duration) -> Result<u32> {
        let target = self
            .store
            .data()
            .clock
            .now_unix_nanos()
            .saturating_add(u64::try_from(by.as_nanos()).unwrap_or(u64::MAX));
        let mut fired = 0;
        loop {
            let state = self.store.data();
            let tick = match (state.next_tick_unix_nanos, state.tick_period) {
                (Some(due), Some(_)) if due <= target => Some(due),
                _ => None,
            };
            let timeout = state
                .http_calls
                .iter()
                .filter(|c| state.pending_http_calls.contains(&c.token))
                .filter_map(|c| c.deadline_unix_nanos.map(|due| (due, c.token)))
                .filter(|(due, _)| *due <= target)
                .min();
            let now = state.clock.now_unix_nanos();
            match (tick, timeout) {
                (None, None) => break,
                // A call that times out at the same instant as a tick ends first.
                (tick, Some((due, token))) if tick.is_none_or(|t| due <= t) => {
                    self.store
                        .data()
                        .clock
                        .advance(Duration::from_nanos(due.saturating_sub(now)));
                    self.fail_http_call_with(token, HttpCallFailure::Timeout)?;
                }
                (Some(due), _) => {
                    let state = self.store.data_mut();
                    state
                        .clock
                        .advance(Duration::from_nanos(due.saturating_sub(now)));
                    let period = state.tick_period.unwrap_or_default();
                    state.next_tick_unix_nanos = Some(
                        due.saturating_add(u64::try_from(period.as_nanos()).unwrap_or(u64::MAX)),
                    );
                    self.tick()?;
                    fired += 1;
                }
                (None, Some(_)) => break,
            }
        }
        let clock = &self.store.data().clock;
        clock.advance(Duration::from_nanos(
            target.saturating_sub(clock.now_unix_nanos()),
        ));
        Ok(fired)
    }

    /// The host's current time.
    pub fn now(&self) -> SystemTime {
        self.store.data().clock.now()
    }

    /// The tick period the filter asked for, if any.
    pub fn tick_period(&self) -> Option<Duration> {
        self.store.data().tick_period
    }

    /// Every HTTP call the filter dispatched, answered or not, in order.
    pub fn http_calls(&self) -> &[HttpCall] {
        &self.store.data().http_calls
    }

    /// HTTP calls dispatched and not yet answered, in order.
    pub fn pending_http_calls(&self) -> Vec<&HttpCall> {
        let state = self.store.data();
        state
            .http_calls
            .iter()
            .filter(|c| state.pending_http_calls.contains(&c.token))
            .collect()
    }

    /// Answers a pending HTTP call: `proxy_on_http_call_response` runs on the root context
    /// (as in Envoy, which owns every call there), with these headers (include `:status`) and
    /// body readable.
    pub fn respond_to_http_call(
        &mut self,
        token: u32,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<()> {
        let reply = HttpCallReply {
            headers: Headers::from_pairs(headers),
            body: body.to_vec(),
            trailers: Headers::default(),
        };
        let sizes = (len_u32(reply.headers.len()), len_u32(body.len()), 0);
        self.deliver_http_call(token, Some(reply), (0, String::new()), sizes)
    }

    /// Fails a pending HTTP call as Envoy does when its upstream refuses the connection
    /// (nothing listens): the filter gets Envoy's generated `503` reply (see
    /// [`HttpCallFailure::ConnectionFailure`]).
    pub fn fail_http_call(&mut self, token: u32) -> Result<()> {
        self.fail_http_call_with(token, HttpCallFailure::ConnectionFailure)
    }

    /// Fails a pending HTTP call the way `failure` describes: a generated reply
    /// (`503`/`504` with Envoy's body text, `content-type: text/plain`), or for
    /// [`HttpCallFailure::ResetAfterHeaders`] the failure callback with no headers and no
    /// body, `proxy_get_status` answering `BrokenConnection` (11) / `"reset"`.
    pub fn fail_http_call_with(&mut self, token: u32, failure: HttpCallFailure) -> Result<()> {
        match failure.generated_reply() {
            Some((status, body)) => self.respond_to_http_call(
                token,
                &[
                    (":status", &status.to_string()),
                    ("content-length", &body.len().to_string()),
                    ("content-type", "text/plain"),
                ],
                body.as_bytes(),
            ),
            None => self.deliver_http_call(token, None, (11, "reset".to_owned()), (0, 0, 0)),
        }
    }

    fn deliver_http_call(
        &mut self,
        token: u32,
        reply: Option<HttpCallReply>,
        status: (u32, String),
        (headers, body, trailers): (u32, u32, u32),
    ) -> Result<()> {
        let state = self.store.data_mut();
        let position = state
            .pending_http_calls
            .iter()
            .position(|t| *t == token)
            .ok_or(WasmHostError::UnknownHttpCall(token))?;
        state.pending_http_calls.remove(position);
        let context = state.root_context_id;
        state.http_call_reply = reply;
        state.status = status;
        let result = self.call(
            "proxy_on_http_call_response",
            self.exports.on_http_call_response.clone(),
            context,
            (context, token, headers, body, trailers),
        );
        let state = self.store.data_mut();
        state.http_call_reply = None;
        state.status = (0, String::new());
        result?;
        self.after_vm_call()
    }

    /// Calls `proxy_on_done` on the root context (plugin shutdown). Returns true when the
    /// plugin is done (then `proxy_on_delete` ran); false when it asked to finish later, in
    /// which case it must call `proxy_done` (see [`plugin_done`](Self::plugin_done)).
    pub fn shutdown(&mut self) -> Result<bool> {
        let root = self.root_context_id();
        let done = self
            .call("proxy_on_done", self.exports.on_done.clone(), root, root)?
            .is_none_or(|done| done != 0);
        if !done {
            self.store.data_mut().root_done_pending = true;
            return Ok(false);
        }
        self.store.data_mut().root_done = true;
        self.call(
            "proxy_on_delete",
            self.exports.on_delete.clone(),
            root,
            root,
        )?;
        Ok(true)
    }

    /// Whether the plugin finished shutting down (directly or through `proxy_done`).
    pub fn plugin_done(&self) -> bool {
        self.store.data().root_done
    }

    /// Every `proxy_log` line, in order.
    pub fn logs(&self) -> &[LogEntry] {
        &self.store.data().logs
    }

    /// Unsupported host calls the guest made, and guest memory faults, in order.
    pub fn host_call_errors(&self) -> &[HostCallError] {
        &self.store.data().host_call_errors
    }

    /// How often each supported host call was made.
    pub fn host_call_counts(&self) -> &BTreeMap<&'static str, u64> {
        &self.store.data().call_counts
    }

    /// Every metric the filter defined, by name.
    pub fn metrics(&self) -> &BTreeMap<String, Metric> {
        &self.store.data().metrics
    }

    /// The metric the filter defined as `name`.
    pub fn metric(&self, name: &str) -> Option<&Metric> {
        self.store.data().metrics.get(name)
    }

    /// The shared-data value under `key`.
    pub fn shared_data(&self, key: &[u8]) -> Option<&[u8]> {
        self.store
            .data()
            .shared_data
            .get(key)
            .map(|(value, _)| value.as_slice())
    }

    /// Stores a shared-data value, as another VM or worker would.
    pub fn set_shared_data(&mut self, key: &[u8], value: &[u8]) {
        let state = self.store.data_mut();
        let cas = state.next_cas;
        state.next_cas = state.next_cas.checked_add(1).unwrap_or(1);
        state
            .shared_data
            .insert(key.to_vec(), (value.to_vec(), cas));
    }

    /// Enqueues `item` on the shared queue `name` of this host's VM id, as another VM or
    /// worker would; the filter's `proxy_on_queue_ready` runs before this returns.
    pub fn enqueue_shared_queue(&mut self, name: &str, item: &[u8]) -> Result<()> {
        let state = self.store.data_mut();
        let token = state
            .shared_queues
            .iter()
            .find(|q| q.vm_id == state.vm_id && q.name == name)
            .map(|q| q.token)
            .ok_or_else(|| WasmHostError::UnknownSharedQueue(name.to_owned()))?;
        state
            .enqueue_shared_queue(token, item.to_vec())
            .map_err(|_| WasmHostError::UnknownSharedQueue(name.to_owned()))?;
        self.deliver_queue_ready()
    }

    /// The items waiting in the shared queue `name` of this host's VM id, oldest first;
    /// `None` when the filter registered no such queue.
    pub fn shared_queue(&self, name: &str) -> Option<Vec<&[u8]>> {
        let state = self.store.data();
        state
            .shared_queues
            .iter()
            .find(|q| q.vm_id == state.vm_id && q.name == name)
            .map(|q| q.items.iter().map(Vec::as_slice).collect())
    }

    /// What the guest wrote to stdout (lossy UTF-8).
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.contents()).into_owned()
    }

    /// What the guest wrote to stderr (lossy UTF-8): Rust panic messages land here.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.contents()).into_owned()
    }

    /// Envoy runs deferred actions after each VM call; the one that matters here is a local
    /// reply sent during the request path: Envoy encodes it through the filter chain, so the
    /// filter's own `proxy_on_response_headers` (and body) see it.
    fn after_vm_call(&mut self) -> Result<()> {
        let pending: Vec<u32> = self
            .store
            .data()
            .streams
            .iter()
            .filter(|(_, s)| !s.completed && !s.response_started && !s.local_responses.is_empty())
            .map(|(id, _)| *id)
            .collect();
        for id in pending {
            self.replay_local_response(id)?;
        }
        Ok(())
    }

    fn replay_local_response(&mut self, id: u32) -> Result<()> {
        let Some(stream) = self.store.data_mut().streams.get_mut(&id) else {
            return Ok(());
        };
        let Some(reply) = stream.local_responses.first().cloned() else {
            return Ok(());
        };
        let head = stream
            .request_headers
            .get(":method")
            .is_some_and(|m| m.eq_ignore_ascii_case("HEAD"));
        let mut headers = Headers::from_pairs(&[(":status", &reply.status.to_string())]);
        for (name, value) in reply.headers.byte_pairs() {
            headers.add(name, value);
        }
        if !reply.body.is_empty() {
            headers.replace("content-length", reply.body.len().to_string().as_bytes());
            if !headers.contains("content-type") {
                headers.add("content-type", b"text/plain");
            }
        }
        let send_body = !reply.body.is_empty() && !head;
        stream.response_started = true;
        let mut driver = HttpStream { host: self, id };
        driver.response_headers_map(headers, !send_body)?;
        if send_body {
            driver.response_body(&reply.body, true)?;
        }
        Ok(())
    }

    fn stream_state(&self, id: u32) -> &StreamState {
        // HttpStream only exists for ids present in the map; entries are never removed.
        static EMPTY: std::sync::OnceLock<StreamState> = std::sync::OnceLock::new();
        self.store
            .data()
            .streams
            .get(&id)
            .unwrap_or_else(|| EMPTY.get_or_init(StreamState::default))
    }

    fn stream_state_mut(&mut self, id: u32) -> Result<&mut StreamState> {
        let stream = self
            .store
            .data_mut()
            .streams
            .get_mut(&id)
            .ok_or(WasmHostError::UnknownStream(id))?;
        if stream.completed {
            return Err(WasmHostError::StreamCompleted(id));
        }
        Ok(stream)
    }
}

/// Drives one HTTP stream of a [`Host`] through Envoy's filter callbacks and reads back what
/// the filter did to it. Borrowing the host: use [`host`](Self::host) /
/// [`host_mut`](Self::host_mut) for host-wide state, or drop it and reattach later with
/// [`Host::stream`].
///
/// Maps are available to the guest exactly when Envoy makes them available: request headers
/// during `proxy_on_request_headers` (and afterwards only while it paused), response headers
/// during `proxy_on_response_headers`, and all headers read-only during `proxy_on_log`.
pub struct HttpStream<'h> {
    host: &'h mut Host,
    id: u32,
}

impl std::fmt::Debug for HttpStream<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpStream")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl HttpStream<'_> {
    /// This stream's context id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The host, for host-wide state (logs, metrics, HTTP calls).
    pub fn host(&self) -> &Host {
        self.host
    }

    /// The host, to answer HTTP calls or advance the clock mid-stream.
    pub fn host_mut(&mut self) -> &mut Host {
        self.host
    }

    /// A property of this stream, e.g. `&["source", "address"]` → `"127.0.0.1:5555"` or
    /// `&["connection", "tls_version"]` → `"TLSv1.3"` (set it only for TLS downstreams).
    /// It wins over host properties and over the `request.*` attributes derived from headers.
    pub fn set_property(&mut self, path: &[&str], value: impl Into<Vec<u8>>) -> &mut Self {
        if let Some(stream) = self.host.store.data_mut().streams.get_mut(&self.id) {
            stream.properties.insert(join_path(path), value.into());
        }
        self
    }

    /// A property as the guest would read it now (including ones the filter set).
    pub fn property(&self, path: &[&str]) -> Option<&[u8]> {
        self.host
            .stream_state(self.id)
            .properties
            .get(&join_path(path))
            .map(Vec::as_slice)
    }

    /// Envoy's `decodeHeaders`: `proxy_on_request_headers`. Include the pseudo-headers
    /// `:method`, `:scheme`, `:authority`, `:path`. A local reply the filter sent is then
    /// run through its response callbacks (see [`current_response_headers`](Self::current_response_headers)).
    pub fn request_headers(
        &mut self,
        headers: &[(&str, &str)],
        end_of_stream: bool,
    ) -> Result<Action> {
        self.request_headers_map(Headers::from_pairs(headers), end_of_stream)
    }

    /// [`request_headers`](Self::request_headers) with values as raw bytes, e.g. a value that
    /// is not UTF-8 (Envoy passes it on as the client sent it; the Rust SDK's string accessors
    /// panic on it, failing the VM).
    pub fn request_headers_bytes(
        &mut self,
        headers: &[(&str, &[u8])],
        end_of_stream: bool,
    ) -> Result<Action> {
        self.request_headers_map(Headers::from_byte_pairs(headers), end_of_stream)
    }

    fn request_headers_map(&mut self, headers: Headers, end_of_stream: bool) -> Result<Action> {
        let stream = self.host.stream_state_mut(self.id)?;
        stream.request_headers = headers;
        stream.request_headers_available = true;
        stream.end_of_stream = end_of_stream;
        let count = len_u32(stream.request_headers.len());
        let action = self.call_action(
            "proxy_on_request_headers",
            self.host.exports.on_request_headers.clone(),
            (self.id, count, u32::from(end_of_stream)),
            Direction::Request,
        )?;
        if action == Action::Continue {
            self.state_mut().request_headers_available = false;
        }
        self.host.after_vm_call()?;
        Ok(action)
    }

    /// Envoy's `decodeData`: `proxy_on_request_body`. While the filter pauses, chunks
    /// accumulate in the buffered body it sees; when it continues, the buffer goes upstream
    /// ([`forwarded_request_body`](Self::forwarded_request_body)).
    pub fn request_body(&mut self, chunk: &[u8], end_of_stream: bool) -> Result<Action> {
        let stream = self.host.stream_state_mut(self.id)?;
        if !stream.buffering_request_body {
            stream.request_body.clear();
        }
        stream.request_body.extend_from_slice(chunk);
        stream.request_body_available = true;
        stream.end_of_stream = end_of_stream;
        let size = len_u32(stream.request_body.len());
        let action = self.call_action(
            "proxy_on_request_body",
            self.host.exports.on_request_body.clone(),
            (self.id, size, u32::from(end_of_stream)),
            Direction::Request,
        )?;
        let limit = self.host.store.data().buffer_limit;
        let stream = self.state_mut();
        stream.buffering_request_body = action == Action::Pause;
        if action == Action::Continue {
            let body = std::mem::take(&mut stream.request_body);
            stream.forwarded_request_body.extend_from_slice(&body);
            stream.request_body_available = false;
        } else if stream.request_body.len() > limit {
            self.answer_payload_too_large()?;
            return Ok(action);
        }
        self.host.after_vm_call()?;
        Ok(action)
    }

    /// Envoy's `decodeTrailers`: `proxy_on_request_trailers`.
    pub fn request_trailers(&mut self, trailers: &[(&str, &str)]) -> Result<Action> {
        let stream = self.host.stream_state_mut(self.id)?;
        stream.request_trailers = Headers::from_pairs(trailers);
        stream.request_trailers_available = true;
        let count = len_u32(stream.request_trailers.len());
        let action = self.call_action(
            "proxy_on_request_trailers",
            self.host.exports.on_request_trailers.clone(),
            (self.id, count),
            Direction::Request,
        )?;
        if action == Action::Continue {
            self.state_mut().request_trailers_available = false;
        }
        self.host.after_vm_call()?;
        Ok(action)
    }

    /// Envoy's `encodeHeaders`: `proxy_on_response_headers` with the upstream's headers
    /// (include `:status`).
    pub fn response_headers(
        &mut self,
        headers: &[(&str, &str)],
        end_of_stream: bool,
    ) -> Result<Action> {
        self.response_headers_map(Headers::from_pairs(headers), end_of_stream)
    }

    /// [`response_headers`](Self::response_headers) with values as raw bytes.
    pub fn response_headers_bytes(
        &mut self,
        headers: &[(&str, &[u8])],
        end_of_stream: bool,
    ) -> Result<Action> {
        self.response_headers_map(Headers::from_byte_pairs(headers), end_of_stream)
    }

    fn response_headers_map(&mut self, headers: Headers, end_of_stream: bool) -> Result<Action> {
        let stream = self.host.stream_state_mut(self.id)?;
        stream.response_started = true;
        stream.response_headers = headers;
        stream.response_headers_available = true;
        stream.end_of_stream = end_of_stream;
        let count = len_u32(stream.response_headers.len());
        let action = self.call_action(
            "proxy_on_response_headers",
            self.host.exports.on_response_headers.clone(),
            (self.id, count, u32::from(end_of_stream)),
            Direction::Response,
        )?;
        if action == Action::Continue {
            self.state_mut().response_headers_available = false;
        }
        Ok(action)
    }

    /// Envoy's `encodeData`: `proxy_on_response_body`, buffering like
    /// [`request_body`](Self::request_body).
    pub fn response_body(&mut self, chunk: &[u8], end_of_stream: bool) -> Result<Action> {
        let stream = self.host.stream_state_mut(self.id)?;
        if !stream.buffering_response_body {
            stream.response_body.clear();
        }
        stream.response_body.extend_from_slice(chunk);
        stream.response_body_available = true;
        stream.end_of_stream = end_of_stream;
        let size = len_u32(stream.response_body.len());
        let action = self.call_action(
            "proxy_on_response_body",
            self.host.exports.on_response_body.clone(),
            (self.id, size, u32::from(end_of_stream)),
            Direction::Response,
        )?;
        let limit = self.host.store.data().buffer_limit;
        let stream = self.state_mut();
        stream.buffering_response_body = action == Action::Pause;
        if action == Action::Continue {
            let body = std::mem::take(&mut stream.response_body);
            stream.forwarded_response_body.extend_from_slice(&body);
            stream.response_body_available = false;
        } else if stream.response_body.len() > limit {
            self.reset_over_buffer_limit(limit)?;
        }
        Ok(action)
    }

    /// Envoy's `encodeTrailers`: `proxy_on_response_trailers`.
    pub fn response_trailers(&mut self, trailers: &[(&str, &str)]) -> Result<Action> {
        let stream = self.host.stream_state_mut(self.id)?;
        stream.response_trailers = Headers::from_pairs(trailers);
        stream.response_trailers_available = true;
        let count = len_u32(stream.response_trailers.len());
        let action = self.call_action(
            "proxy_on_response_trailers",
            self.host.exports.on_response_trailers.clone(),
            (self.id, count),
            Direction::Response,
        )?;
        if action == Action::Continue {
            self.state_mut().response_trailers_available = false;
        }
        Ok(action)
    }

    /// The filter buffered more of the request body than the limit: Envoy answers `413`
    /// `Payload Too Large` itself (details `request_payload_too_large`), encoded through the
    /// filter's response callbacks like any local reply, and the stream ends.
    fn answer_payload_too_large(&mut self) -> Result<()> {
        let stream = self.state_mut();
        stream.request_body_available = false;
        stream.buffering_request_body = false;
        stream.local_responses.push(LocalResponse {
            status: 413,
            headers: Headers::default(),
            body: b"Payload Too Large".to_vec(),
            details: "request_payload_too_large".to_owned(),
            grpc_status: -1,
        });
        self.host.after_vm_call()?;
        self.complete()
    }

    /// The filter buffered more of the response body than the limit, after the response
    /// headers went out: Envoy resets the stream, which ends it (`on_log`, `on_done`,
    /// `on_delete`); later calls on it fail with `StreamCompleted`.
    fn reset_over_buffer_limit(&mut self, limit: usize) -> Result<()> {
        self.state_mut().reset_reason = Some(format!(
            "the filter buffered more of the response body than the buffer limit ({limit} bytes)"
        ));
        self.complete()
    }

    /// Why the host reset this stream (a response body buffered past the buffer limit, or a
    /// failed VM on the response path), if it did.
    pub fn reset_reason(&self) -> Option<&str> {
        self.state().reset_reason.as_deref()
    }

    /// Ends the stream as Envoy does: `proxy_on_log` (headers readable, access-log phase),
    /// then `proxy_on_done` and `proxy_on_delete`.
    ///
    /// On a failed VM Envoy calls none of these: the stream just ends.
    pub fn complete(&mut self) -> Result<()> {
        let id = self.id;
        if self.host.failure.is_some() {
            self.host.stream_state_mut(id)?.completed = true;
            return Ok(());
        }
        self.host.stream_state_mut(id)?.access_log_phase = true;
        let logged = self
            .host
            .call("proxy_on_log", self.host.exports.on_log.clone(), id, id);
        self.state_mut().access_log_phase = false;
        logged?;
        self.host
            .call("proxy_on_done", self.host.exports.on_done.clone(), id, id)?;
        self.host.call(
            "proxy_on_delete",
            self.host.exports.on_delete.clone(),
            id,
            id,
        )?;
        self.state_mut().completed = true;
        Ok(())
    }

    /// Runs a stream callback. On a failed VM (a trap in this or an earlier call) Envoy's
    /// fail-closed policy applies instead: see [`fail_stream`](Self::fail_stream). A trap in
    /// this very call is still returned as the error, so a test sees the guest's failure.
    fn call_action<P: WasmParams>(
        &mut self,
        export: &str,
        func: Option<TypedFunc<P, u32>>,
        params: P,
        direction: Direction,
    ) -> Result<Action> {
        if self.host.failure.is_some() {
            self.fail_stream(direction);
            return Ok(Action::Pause);
        }
        match self.host.call(export, func, self.id, params) {
            Ok(action) => Ok(action.map_or(Action::Continue, Action::from_raw)),
            Err(error) => {
                if self.host.failure.is_some() {
                    self.fail_stream(direction);
                }
                Err(error)
            }
        }
    }

    /// What Envoy (proxy-wasm-cpp-host `CHECK_FAIL_HTTP`, fail closed) does to a stream of a
    /// failed VM, once per stream: on the request path it answers `503` with an empty body
    /// (details `wasm_fail_stream`), on the response path it resets the stream. The VM is
    /// not called again.
    fn fail_stream(&mut self, direction: Direction) {
        let stream = self.state_mut();
        if stream.failed {
            return;
        }
        stream.failed = true;
        stream.request_headers_available = false;
        stream.request_body_available = false;
        stream.request_trailers_available = false;
        match direction {
            Direction::Request => {
                stream.local_responses.push(LocalResponse {
                    status: 503,
                    headers: Headers::default(),
                    body: Vec::new(),
                    details: FAIL_STREAM_DETAILS.to_owned(),
                    grpc_status: GRPC_UNAVAILABLE,
                });
                stream.response_headers = Headers::from_pairs(&[(":status", "503")]);
                stream.response_started = true;
            }
            Direction::Response => {
                stream.reset_reason = Some(
                    "the VM failed (a trap in the filter): Envoy resets the stream".to_owned(),
                );
            }
        }
    }

    fn state(&self) -> &StreamState {
        self.host.stream_state(self.id)
    }

    fn state_mut(&mut self) -> &mut StreamState {
        let id = self.id;
        self.host.store.data_mut().streams.entry(id).or_default()
    }

    /// The first local response of this stream: one the filter sent, or one Envoy sent in
    /// its place (`details` `request_payload_too_large`: `413` for a request body buffered
    /// past the limit; `wasm_fail_stream`: `503` on a failed VM).
    pub fn local_response(&self) -> Option<&LocalResponse> {
        self.state().local_responses.first()
    }

    /// Every local response the filter sent on this stream, in order.
    pub fn local_responses(&self) -> &[LocalResponse] {
        &self.state().local_responses
    }

    /// The request headers as the filter left them.
    pub fn current_request_headers(&self) -> &Headers {
        &self.state().request_headers
    }

    /// The request trailers as the filter left them.
    pub fn current_request_trailers(&self) -> &Headers {
        &self.state().request_trailers
    }

    /// The response headers as the filter left them: for a local reply, what the client
    /// receives (`:status`, the filter's headers, and whatever its response callbacks added).
    pub fn current_response_headers(&self) -> &Headers {
        &self.state().response_headers
    }

    /// The response trailers as the filter left them.
    pub fn current_response_trailers(&self) -> &Headers {
        &self.state().response_trailers
    }

    /// The request body currently buffered (not yet forwarded).
    pub fn buffered_request_body(&self) -> &[u8] {
        &self.state().request_body
    }

    /// The request body forwarded upstream so far.
    pub fn forwarded_request_body(&self) -> &[u8] {
        &self.state().forwarded_request_body
    }

    /// The response body currently buffered (not yet forwarded).
    pub fn buffered_response_body(&self) -> &[u8] {
        &self.state().response_body
    }

    /// The response body forwarded downstream so far.
    pub fn forwarded_response_body(&self) -> &[u8] {
        &self.state().forwarded_response_body
    }

    /// How often the filter resumed the request (`proxy_continue_stream(Request)` /
    /// `proxy_continue_request`).
    pub fn request_continued(&self) -> u32 {
        self.state().continued_request
    }

    /// How often the filter resumed the response.
    pub fn response_continued(&self) -> u32 {
        self.state().continued_response
    }

    /// Whether the filter reset the request (`proxy_close_stream(Request)`).
    pub fn request_closed(&self) -> bool {
        self.state().closed_request
    }

    /// Whether the filter reset the response (`proxy_close_stream(Response)`).
    pub fn response_closed(&self) -> bool {
        self.state().closed_response
    }

    /// Supported host calls the filter made while this stream's context was effective: the
    /// per-request cost in host-call crossings.
    pub fn host_calls(&self) -> u64 {
        self.state().host_calls
    }

    /// Whether [`complete`](Self::complete) ran.
    pub fn is_complete(&self) -> bool {
        self.state().completed
    }
}
