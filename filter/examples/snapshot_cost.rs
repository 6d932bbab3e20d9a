//! Where a 100,000-site snapshot's apply time goes, natively: the JSON snapshot against the
//! compact one (the same policy as `make bench`'s), best and median of several runs.
//!
//! `cargo run --release -p autohttps-filter --example snapshot_cost -- [sites] [runs]`

use std::fmt::Write as _;
use std::time::Instant;

use autohttps_filter::policy::{Policy, PolicyDocument, compact};

fn policy_json(n: usize) -> String {
    let mut out = String::with_capacity(n * 260 + 128);
    out.push_str(r#"{"schema": 1, "version": "v", "settings": {"http_port": 80, "https_port": 443}, "sites": ["#);
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

fn report(what: &str, mut ms: Vec<f64>) {
    ms.sort_by(f64::total_cmp);
    println!(
        "{what}: min {:.1} ms, median {:.1} ms",
        ms[0],
        ms[ms.len() / 2]
    );
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let runs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let only = std::env::var("ONLY").unwrap_or_default();
    let json = policy_json(n);
    let document: PolicyDocument = serde_json::from_str(&json).expect("the bench policy parses");
    let body = compact::encode_snapshot("v", &document.settings, &document.sites)
        .expect("the bench policy encodes");
    println!(
        "{n} sites: JSON {} bytes, compact {} bytes",
        json.len(),
        body.len()
    );
    if only != "compact" {
        let mut times = Vec::new();
        for _ in 0..runs {
            let started = Instant::now();
            let policy = Policy::from_json(json.as_bytes()).expect("valid");
            times.push(started.elapsed().as_secs_f64() * 1e3);
            assert_eq!(policy.site_count(), n);
        }
        report("JSON snapshot", times);
    }
    if only != "json" {
        let mut times = Vec::new();
        for _ in 0..runs {
            let copy = body.clone();
            let started = Instant::now();
            let policy = Policy::from_compact(copy).expect("valid");
            times.push(started.elapsed().as_secs_f64() * 1e3);
            assert_eq!(policy.site_count(), n);
        }
        report("compact snapshot", times);
    }
}
