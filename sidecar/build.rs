//! Finds the console's browser module (the policy engine built by `make build` with
//! wasm-bindgen into `target/console-web/`) so the binary can embed it. This script never
//! builds anything itself (no recursive cargo): when the module is not there, the sidecar is
//! built without it and the console's preview says so, with the command that builds it.

use std::path::PathBuf;

/// The files `wasm-bindgen --target web` writes for the crate `autohttps-policy-web`.
const MODULE_FILES: [&str; 2] = ["autohttps_policy_web.js", "autohttps_policy_web_bg.wasm"];

fn main() {
    println!("cargo::rustc-check-cfg=cfg(console_preview_module)");
    println!("cargo::rerun-if-env-changed=AUTOHTTPS_CONSOLE_WEB_DIR");
    let dir = match std::env::var_os("AUTOHTTPS_CONSOLE_WEB_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/console-web"),
    };
    let mut present = true;
    for file in MODULE_FILES {
        let path = dir.join(file);
        // A missing file makes cargo rerun this script on every build, so the module is picked
        // up as soon as `make build` has written it.
        println!("cargo::rerun-if-changed={}", path.display());
        present &= path.is_file();
    }
    if present {
        println!("cargo::rustc-cfg=console_preview_module");
        println!(
            "cargo::rustc-env=AUTOHTTPS_CONSOLE_WEB_DIR={}",
            dir.display()
        );
    } else {
        println!(
            "cargo::warning=the console's preview module is not built ({} has no {}): the console will say so; `make build` builds it",
            dir.display(),
            MODULE_FILES.join(" / ")
        );
    }
}
