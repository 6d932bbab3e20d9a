//! Times the policy feed at platform scale: seeds a real SQLite store (in memory, so its pages
//! count in the RSS after seeding; with `POLICY_SCALE_STORE_FILE` set, a file in a temporary
//! directory as the sidecar runs it, which seeds far slower on a busy disk) with N sites of two
//! names, each but one with a current certificate, then times the first snapshot (what the first `GET /v1/policy` runs: a full
//! load, validation and the snapshot's bytes), a one-site change until its delta is ready to
//! serve (the store write, the change log read, the site reloaded and validated, the delta's
//! bytes), a site's first certificate the same way, and reports the bytes on the wire and this process's
//! resident memory (after seeding, i.e. SQLite's own, and after the feed holds its entries and a
//! snapshot). A measurement, not a test: run with
//! `cargo run --release -p autohttps-sidecar --example policy_build_scale -- 10000 100000`.

use std::sync::Arc;
use std::time::Instant;

use autohttps_filter::policy::Settings;
use autohttps_sidecar::clock::{Clock, SystemClock};
use autohttps_sidecar::csp_reports::ReportTokens;
use autohttps_sidecar::hostname::Hostname;
use autohttps_sidecar::policy_feed::{FeedAnswer, PolicyFeed};
use autohttps_sidecar::store::prelude::*;
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
        let dir = tempfile::tempdir()?;
        let store = Arc::new(if std::env::var_os("POLICY_SCALE_STORE_FILE").is_some() {
            SqliteStore::open(&dir.path().join("autohttps.db"))?
        } else {
            SqliteStore::in_memory()?
        });
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
            if i == 1 {
                // Its first certificate arrives during the measurement.
                continue;
            }
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
            Settings::default(),
            ReportTokens::from_key(b"policy_build_scale measuring key"),
        );
        let seeded_rss = status_mib("VmRSS:");
        let first = Instant::now();
        let (snapshot, _, version) = feed.current()?;
        let first = first.elapsed();
        let loaded_rss = status_mib("VmRSS:");
        let force = SitePolicy {
            https: HttpsMode::Force,
            ..SitePolicy::default()
        };
        let changed = Instant::now();
        store.set_policy("site000000", force)?;
        let (delta_version, delta_bytes) = delta_since(&feed, &version)?;
        let changed = changed.elapsed();
        let renewed = Instant::now();
        let primary = Hostname::parse("site000001.bench.test")?;
        let www = Hostname::parse("www.site000001.bench.test")?;
        store.store_certificate(
            NewCertificate {
                site: "site000001".into(),
                names: vec![primary, www],
                chain_pem: chain_pem.clone(),
                key_pem: PrivateKeyPem::new(key_pem.clone()),
                not_before: now - time::Duration::days(1),
                not_after: now + time::Duration::days(90),
                serial: "first".into(),
                ari_id: None,
            },
            None,
            now,
        )?;
        let (_, renewal_bytes) = delta_since(&feed, &delta_version)?;
        let renewed = renewed.elapsed();
        let resnapshot = Instant::now();
        let (again, _, _) = feed.current()?;
        let resnapshot = resnapshot.elapsed();
        println!(
            "{n} sites: seeded in {:.1} s; first snapshot {:.3} s ({} bytes); one-site policy change to delta ready {:.2} ms ({delta_bytes} bytes); first certificate to delta ready {:.2} ms ({renewal_bytes} bytes); next snapshot assembled in {:.1} ms ({} bytes); VmRSS after seeding {seeded_rss:.0} MiB, with the feed loaded {loaded_rss:.0} MiB, at the end {:.0} MiB; VmHWM {:.0} MiB",
            seeded.as_secs_f64(),
            first.as_secs_f64(),
            snapshot.len(),
            changed.as_secs_f64() * 1000.0,
            renewed.as_secs_f64() * 1000.0,
            resnapshot.as_secs_f64() * 1000.0,
            again.len(),
            status_mib("VmRSS:"),
            status_mib("VmHWM:"),
        );
    }
    Ok(())
}

/// Asks the feed what changed since `version` and returns the new version and the delta's size.
fn delta_since(feed: &PolicyFeed, version: &str) -> anyhow::Result<(String, usize)> {
    match feed.answer(Some(version), None)? {
        FeedAnswer::Delta { version, body } => Ok((version, body.len())),
        FeedAnswer::Snapshot { .. } => {
            anyhow::bail!("expected a delta from {version}, got a snapshot")
        }
        FeedAnswer::NotModified { .. } => anyhow::bail!("expected a delta from {version}, got 304"),
    }
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
