//! autohttps test support: a proxy-wasm host on wasmtime, and helpers for the end-to-end suites.
#![warn(missing_docs)]

pub mod conformance;
pub mod envoy;
pub mod hostile;
pub mod stack;
#[cfg(feature = "wasm-host")]
pub mod wasm_host;
