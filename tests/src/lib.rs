//! autohttps test support: harnesses for the real parts (Envoy, the stack) and the suites' tables.
//! The proxy-wasm host on wasmtime is the crate `proxy-wasm-host` (`tests/wasm-host`).
#![warn(missing_docs)]

pub mod browser;
pub mod conformance;
pub mod envoy;
pub mod fleet;
pub mod fleet_bench;
pub mod hostile;
pub mod stack;
