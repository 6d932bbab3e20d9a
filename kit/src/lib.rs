//! autohttps test kit: the one place that starts and stops the real parts every suite, the
//! bench and `make run` use — loopback ports ([`ports`]), child processes under `timeout` that
//! die with whoever started them ([`process`]), a throwaway PostgreSQL ([`pg`]), a whole stack
//! ([`stack`]) or fleet of edges on one PostgreSQL ([`fleet`]), and the `${…}`
//! template renderer the Makefile, the docs and the harnesses share ([`render`]).
//!
//! It drives the sidecar as a process and does not link it, so the sidecar's own tests can use
//! it without a dependency cycle.
#![warn(missing_docs)]

pub mod admin;
pub mod envoy;
pub mod fleet;
pub mod http;
pub mod pebble;
pub mod pg;
pub mod ports;
pub mod process;
pub mod render;
pub mod sidecar;
pub mod stack;

pub use ports::free_port;
pub use process::{Lifetime, Process, ProcessCpu, wait_until};

use std::path::{Path, PathBuf};

/// The repository root (the workspace this kit is built in).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Cargo's target directory: `$CARGO_TARGET_DIR`, else `target/` under the repository root.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
}
