//! The whole autohttps stack on loopback (Pebble, challtestsrv, the sidecar binary, Envoy with
//! the filter, a demo backend): the test kit's, re-exported under the names the suites use.

pub use autohttps_kit::stack::*;
