//! A real Envoy for tests, and the harness helpers the suites reach through
//! `autohttps_tests::envoy`: all of it lives in the test kit (`autohttps_kit`), re-exported
//! here under the names the suites use.

pub use autohttps_kit::envoy::{Envoy, envoy_binary, filter_wasm, self_signed, validate};
pub use autohttps_kit::http::{CurlResponse, curl, http_get};
pub use autohttps_kit::render::{render, render_file, trusted_proxy_ranges};
pub use autohttps_kit::{Lifetime, free_port, repo_root};
