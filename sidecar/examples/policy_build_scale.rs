//! Times the policy feed's build at platform scale: seeds a real SQLite store (in memory) with N
//! sites of two names, each with one current certificate, then times the first
//! `PolicyFeed::current()` (what the first `GET /v1/policy` runs) and the one after a one-site
//! change, and reports this process's resident memory. A measurement, not a test: run with
//! `cargo run --release -p autohttps-sidecar --example policy_build_scale -- 10000 20000`.

use std::sync::Arc;
use std::time::Instant;

use autohttps_sidecar::clock::{Clock, SystemClock};
use autohttps_sidecar::csp_reports::ReportTokens;
use autohttps_sidecar::hostname::Hostname;
use autohttps_sidecar::policy_feed::{EdgeSettings, PolicyFeed};
use autohttps_sidecar::store::{
    HttpsMode, NewCertificate, NewSite, PrivateKeyPem, SitePolicy, SqliteStore, Store,
};

fn main() -> anyhow::Result<()> {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .map(|arg| {
            arg.parse()
                .map_err(|e| anyhow::anyhow!("{arg:?} is not a number of sites: {e}"))
        })
        .collect::<anyhow::Result<_>>()?;
    if sizes.is_empty() {
        anyhow::bail!("give the numbers of sites to measure, e.g. `10000 20000 40000 100000`");
    }
    // One real self-signed certificate and key, stored for every site under that site's names:
    // the policy build reads the names and validity, never the PEM.
    let key = rcgen::KeyPair::generate()?;
    let chain_pem = rcgen::CertificateParams::new(vec!["bench.test".to_string()])?
        .self_signed(&key)?
        .pem();
    let key_pem = key.serialize_pem();
    for n in sizes {
        let store = Arc::new(SqliteStore::in_memory()?);
        let now = SystemClock.now();
        let seeding = Instant::now();
        for i in 0..n {
            let site = format!("site{i:06}");
            let primary = Hostname::parse(&format!("{site}.bench.test"))?;
            let www = Hostname::parse(&format!("www.{site}.bench.test"))?;
            store.create_site(
                NewSite {
                    name: site.clone(),
                    primary: primary.clone(),
                    hostnames: vec![www.clone()],
                    policy: SitePolicy::default(),
                },
                now,
                now + time::Duration::days(365),
            )?;
            store.store_certificate(
                NewCertificate {
                    site,
                    names: vec![primary, www],
                    chain_pem: chain_pem.clone(),
                    key_pem: PrivateKeyPem::new(key_pem.clone()),
                    not_before: now - time::Duration::days(1),
                    not_after: now + time::Duration::days(60),
                    serial: format!("{i:x}"),
                    ari_id: None,
                },
                None,
                now,
            )?;
        }
        let seeded = seeding.elapsed();
        let feed = PolicyFeed::new(
            Arc::clone(&store) as Arc<dyn Store>,
            Arc::new(SystemClock),
            EdgeSettings::default(),
            ReportTokens::from_key(b"policy_build_scale measuring key"),
        );
        let first = Instant::now();
        let (body, _, _) = feed.current()?;
        let first = first.elapsed();
        let force = SitePolicy {
            https: HttpsMode::Force,
            ..SitePolicy::default()
        };
        store.set_policy("site000000", force)?;
        let changed = Instant::now();
        feed.current()?;
        let changed = changed.elapsed();
        println!(
            "{n} sites: seeded in {:.1} s; first build {:.3} s; after a one-site change {:.3} s; {} bytes; VmRSS {:.0} MiB, VmHWM {:.0} MiB",
            seeded.as_secs_f64(),
            first.as_secs_f64(),
            changed.as_secs_f64(),
            body.len(),
            status_mib("VmRSS:"),
            status_mib("VmHWM:"),
        );
    }
    Ok(())
}

/// A memory figure of this process from `/proc/self/status`, in MiB (0 when unreadable).
fn status_mib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(field))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<f64>()
                        .ok()
                })
        })
        .map_or(0.0, |kib| kib / 1024.0)
}
