//! The one error type of the wasmtime proxy-wasm host.

use std::path::PathBuf;

/// What can go wrong loading a filter or driving it.
///
/// Guest-visible failures of individual host calls are not errors of this type: they go back
/// to the guest as a [`Status`](crate::Status) and, for unsupported calls, are also recorded
/// (see [`Host::host_call_errors`](crate::Host::host_call_errors)).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WasmHostError {
    /// The `.wasm` file could not be read.
    #[error(
        "cannot read wasm module {path}: {source} (build it first, e.g. `cargo build --target wasm32-wasip1 --profile wasm-release -p <crate>`)"
    )]
    Read {
        /// The file asked for.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// wasmtime rejected the module (not valid wasm, or an unsupported feature).
    #[error("cannot compile wasm module {what}: {message}")]
    Compile {
        /// The file, or `<bytes>` for in-memory modules.
        what: String,
        /// wasmtime's explanation.
        message: String,
    },
    /// The module does not export `proxy_abi_version_0_2_1`, so it is not a proxy-wasm 0.2.1 filter.
    #[error(
        "module does not export proxy_abi_version_0_2_1 (ABI versions it exports: {found:?}); build it with the proxy-wasm 0.2.x SDK"
    )]
    AbiVersion {
        /// The `proxy_abi_version_*` exports found instead.
        found: Vec<String>,
    },
    /// Linking or instantiating the module failed (e.g. a non-function import).
    #[error("cannot instantiate wasm module: {0}")]
    Instantiate(String),
    /// The guest trapped (a Rust panic with `panic = "abort"`, an out-of-bounds access, ...).
    /// As in Envoy, the VM is failed from then on.
    #[error("guest trapped in {export}: {message}")]
    Trap {
        /// The export being called when the trap happened.
        export: String,
        /// wasmtime's trap message, with the guest backtrace when available.
        message: String,
    },
    /// A previous trap failed the VM; no further calls are made into it.
    #[error("the wasm VM failed earlier ({0}); create a new host")]
    VmFailed(String),
    /// `proxy_on_vm_start` or `proxy_on_configure` returned false: Envoy would reject this
    /// plugin configuration, so no HTTP stream can be created.
    #[error("the plugin rejected its configuration (proxy_on_{0} returned false)")]
    ConfigurationRejected(&'static str),
    /// The stream was already completed (`on_log`/`on_done`/`on_delete` ran).
    #[error("HTTP stream {0} is already complete")]
    StreamCompleted(u32),
    /// No HTTP stream with this context id exists in this host.
    #[error("no HTTP stream with context id {0}")]
    UnknownStream(u32),
    /// No dispatched, unanswered HTTP call has this token.
    #[error("no pending HTTP call with token {0}")]
    UnknownHttpCall(u32),
    /// The filter registered no shared queue of this name.
    #[error(
        "the filter registered no shared queue named {0:?} (under this host's VM id; set it with HostBuilder::vm_id)"
    )]
    UnknownSharedQueue(String),
    /// Building a wasm crate with cargo failed.
    #[error("cargo build of {package} failed: {message}")]
    Build {
        /// The cargo package.
        package: String,
        /// What cargo said (its stderr tail) or why it could not run.
        message: String,
    },
}

/// Shorthand for results of this module.
pub type Result<T, E = WasmHostError> = std::result::Result<T, E>;
