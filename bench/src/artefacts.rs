//! The artefacts measured (the filter builds) and the benchmark policies.

use super::*;

pub(crate) struct Artefacts {
    pub(crate) filter: PathBuf,
    pub(crate) minimal: PathBuf,
    pub(crate) filter_bytes: u64,
    pub(crate) minimal_bytes: u64,
}

impl Artefacts {
    /// The release `.wasm` files `make build` (and `make bench`) produce, after wasm-opt.
    pub(crate) fn locate() -> anyhow::Result<Artefacts> {
        let dir = std::env::var_os("BENCH_WASM_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join("target/dist"));
        let filter = dir.join("autohttps_filter.wasm");
        let minimal = dir.join("autohttps_minimal_filter.wasm");
        let size = |p: &Path| -> anyhow::Result<u64> {
            Ok(std::fs::metadata(p)
                .with_context(|| format!("{} is missing; run `make build`", p.display()))?
                .len())
        };
        Ok(Artefacts {
            filter_bytes: size(&filter)?,
            minimal_bytes: size(&minimal)?,
            filter,
            minimal,
        })
    }
}

/// The benchmark policy: `n` sites of three names each, every name's certificate ready.
/// Even sites force HTTPS with HSTS; odd sites are `auto` with `mixed_content: upgrade`.
pub(crate) fn policy_json(n: usize, version: &str) -> String {
    let mut out = String::with_capacity(n * 260 + 128);
    let _ = write!(
        out,
        r#"{{"schema": 1, "version": "{version}", "settings": {{"http_port": 80, "https_port": 443}}, "sites": ["#
    );
    for i in 0..n {
        if i > 0 {
            out.push(',');
        }
        let names = format!(r#""s{i}.bench.test", "www.s{i}.bench.test", "alias-{i}.example.net""#);
        let mode = if i % 2 == 0 {
            r#""https": "force", "hsts": {"enabled": true, "max_age": 31536000}"#
        } else {
            r#""https": "auto", "mixed_content": "upgrade""#
        };
        let _ = write!(
            out,
            r#"{{"id": "site-{i}", "hostnames": [{names}], {mode}, "cert_ready": [{names}]}}"#
        );
    }
    out.push_str("]}");
    out
}

/// A site of the policy that forces HTTPS (even) or passes with CSP (odd), near the middle.
pub(crate) fn force_host(n: usize) -> String {
    format!("s{}.bench.test", (n / 2) & !1)
}

pub(crate) fn auto_host(n: usize) -> String {
    format!("s{}.bench.test", ((n / 2) & !1) + 1)
}

pub(crate) fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1024.0 / 1024.0
}
