//! autohttps test support for the suites of `tests/tests/`: the suites' tables (conformance,
//! hostile HTTP), a WebDriver browser, and the test kit's harnesses (`autohttps_kit`: Envoy, the
//! whole stack) re-exported under `envoy` and `stack`. The proxy-wasm host on wasmtime is the
//! crate `proxy-wasm-host` (`tests/wasm-host`).
#![warn(missing_docs)]

pub mod browser;
pub mod conformance;
pub mod envoy;
pub mod hostile;
pub mod stack;
