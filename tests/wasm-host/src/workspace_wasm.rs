//! Builds a workspace crate for `wasm32-wasip1` so tests can load the `.wasm` they exercise.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use crate::error::{Result, WasmHostError};

/// Builds `package` with `cargo build --target wasm32-wasip1 --profile wasm-release` (once per
/// process; cargo itself skips the work when nothing changed) and returns the path of the
/// `.wasm`. The workspace is the one around the current directory (where cargo runs tests);
/// the target directory is `$CARGO_TARGET_DIR`, else `<workspace>/target`.
///
/// ```no_run
/// use proxy_wasm_host::{FilterModule, build_workspace_wasm};
///
/// let wasm = build_workspace_wasm("autohttps-minimal-filter")?;
/// let module = FilterModule::load(&wasm)?;
/// # Ok::<(), proxy_wasm_host::WasmHostError>(())
/// ```
pub fn build_workspace_wasm(package: &str) -> Result<PathBuf> {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    // Holding the lock while cargo runs keeps parallel tests from starting the same build.
    let mut built = BUILT
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(path) = built.get(package) {
        return Ok(path.clone());
    }
    let workspace = workspace_dir();
    let target_dir = target_dir();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        .current_dir(&workspace)
        .args([
            "build",
            "--quiet",
            "--target",
            "wasm32-wasip1",
            "--profile",
            "wasm-release",
            "-p",
            package,
        ])
        .env("CARGO_TARGET_DIR", &target_dir)
        .output()
        .map_err(|e| WasmHostError::Build {
            package: package.to_owned(),
            message: format!("cannot run cargo: {e}"),
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(30).collect();
        return Err(WasmHostError::Build {
            package: package.to_owned(),
            message: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        });
    }
    let path = target_dir
        .join("wasm32-wasip1")
        .join("wasm-release")
        .join(format!("{}.wasm", package.replace('-', "_")));
    built.insert(package.to_owned(), path.clone());
    Ok(path)
}

/// The cargo workspace around the current directory: the nearest ancestor whose `Cargo.toml`
/// has a `[workspace]` table (cargo runs tests and binaries from inside their package).
fn enclosing_workspace() -> Option<PathBuf> {
    let current = std::env::current_dir().ok()?;
    current
        .ancestors()
        .find(|dir| {
            std::fs::read_to_string(dir.join("Cargo.toml"))
                .is_ok_and(|manifest| manifest.lines().any(|l| l.trim() == "[workspace]"))
        })
        .map(Path::to_path_buf)
}

/// The workspace around the current directory, else the current directory itself.
fn workspace_dir() -> PathBuf {
    enclosing_workspace().unwrap_or_else(|| PathBuf::from("."))
}

/// Cargo's target directory: `$CARGO_TARGET_DIR` (relative to the workspace when relative),
/// else `<workspace>/target`.
pub(crate) fn target_dir() -> PathBuf {
    let workspace = workspace_dir();
    match std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from) {
        Some(dir) if dir.is_absolute() => dir,
        Some(dir) => workspace.join(dir),
        None => workspace.join("target"),
    }
}

/// Where compiled code is cached: `<target>/wasmtime-cache` inside a cargo workspace, else
/// `$XDG_CACHE_HOME/proxy-wasm-host` (or `~/.cache/proxy-wasm-host`), so a command run from
/// anywhere compiles an unchanged `.wasm` once.
pub(crate) fn compiled_code_cache_dir() -> Option<PathBuf> {
    if enclosing_workspace().is_some() || std::env::var_os("CARGO_TARGET_DIR").is_some() {
        return Some(target_dir().join("wasmtime-cache"));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|dir| dir.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
    Some(base.join("proxy-wasm-host"))
}
