//! The SQLite store's change log: what it records, what it leaves out, how it is compacted.

use super::*;
use crate::hostname::Hostname;
use crate::store::*;
use std::time::Duration;
use time::macros::datetime;

const NOW: OffsetDateTime = datetime!(2026-03-01 00:00 UTC);

fn name(n: &str) -> Hostname {
    Hostname::parse(n).expect("valid hostname")
}

fn new_site(site: &str, primary: &str) -> NewSite {
    NewSite {
        name: site.into(),
        primary: name(primary),
        hostnames: Vec::new(),
        policy: SitePolicy::default(),
    }
}

fn certificate(site: &str, names: &[&str], serial: &str) -> NewCertificate {
    NewCertificate {
        site: site.into(),
        names: names.iter().map(|n| name(n)).collect(),
        chain_pem: format!("chain {serial}"),
        key_pem: PrivateKeyPem::new(format!("key {serial}")),
        not_before: NOW,
        not_after: datetime!(2026-06-01 00:00 UTC),
        serial: serial.into(),
        ari_id: None,
    }
}

/// Runs `write` and returns the sites the change log recorded for it (deduplicated).
fn logged(store: &SqliteStore, write: impl FnOnce(&SqliteStore)) -> Vec<String> {
    let before = store.latest_change_seq().expect("latest");
    write(store);
    let changes = store.site_changes_since(before, 1000).expect("changes");
    assert!(changes.complete);
    assert_eq!(changes.last_seq, store.latest_change_seq().expect("latest"));
    changes.sites
}

#[test]
fn every_write_that_changes_the_feed_logs_its_site_and_scheduling_does_not() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let store = SqliteStore::open(&dir.path().join("autohttps.db")).expect("store");
    assert_eq!(store.latest_change_seq().expect("latest"), 0);
    let both = |s: &SqliteStore| {
        s.create_site(new_site("blog", "blog.test"), NOW, NOW)
            .expect("site");
        s.create_site(new_site("shop", "shop.test"), NOW, NOW)
            .expect("site");
    };
    // A site and its primary hostname, twice: deduplicated, in order of first change.
    assert_eq!(logged(&store, both), ["blog", "shop"]);
    let policy = SitePolicy {
        https: HttpsMode::Force,
        ..SitePolicy::default()
    };
    assert_eq!(
        logged(&store, |s| {
            s.set_policy("shop", policy).expect("policy");
        }),
        ["shop"]
    );
    assert_eq!(
        logged(&store, |s| {
            s.add_hostname("blog", &name("www.blog.test"), NOW, NOW)
                .expect("added");
        }),
        ["blog"]
    );
    assert_eq!(
        logged(&store, |s| {
            s.remove_hostname("blog", &name("www.blog.test"), NOW, NOW)
                .expect("removed");
        }),
        ["blog"]
    );
    assert_eq!(
        logged(&store, |s| {
            s.store_certificate(certificate("shop", &["shop.test"], "01"), None, NOW)
                .expect("stored");
        }),
        ["shop"]
    );
    // The next certificate supersedes the first: the insert and the update both log.
    let before = store.latest_change_seq().expect("latest");
    store
        .store_certificate(certificate("shop", &["shop.test"], "02"), None, NOW)
        .expect("stored");
    assert_eq!(store.latest_change_seq().expect("latest"), before + 2);

    // Scheduling and attempts write only the scheduling columns: nothing is logged.
    let lease = NOW + Duration::from_secs(600);
    assert_eq!(
        logged(&store, |s| {
            s.begin_attempt("blog", NOW, lease).expect("begun");
            s.finish_attempt("blog", lease, Some(lease), 1, Some("dns"))
                .expect("finished");
            s.schedule("blog", None, 2, Some("again"))
                .expect("scheduled");
            s.request_issuance("blog", NOW, true).expect("requested");
            s.take_regenerate_request("blog").expect("taken");
            s.add_event("blog", NOW, SiteEventKind::AttemptFailed, "x", None, None)
                .expect("event");
        }),
        Vec::<String>::new()
    );
    assert_eq!(
        logged(&store, |s| s.delete_site("shop").expect("deleted")),
        ["shop"]
    );

    // The log survives a restart, and reading from where it ends gives nothing.
    let latest = store.latest_change_seq().expect("latest");
    drop(store);
    let store = SqliteStore::open(&dir.path().join("autohttps.db")).expect("reopened");
    assert_eq!(store.latest_change_seq().expect("latest"), latest);
    let nothing = store.site_changes_since(latest, 10).expect("changes");
    assert_eq!(
        nothing,
        SiteChanges {
            sites: Vec::new(),
            last_seq: latest,
            complete: true
        }
    );
    // `limit` bounds the rows read; the next call goes on from `last_seq`.
    let first = store.site_changes_since(0, 2).expect("changes");
    assert_eq!(
        (first.sites.as_slice(), first.last_seq),
        (&["blog".to_string()][..], 2)
    );
    let next = store
        .site_changes_since(first.last_seq, 2)
        .expect("changes");
    assert_eq!(next.sites, ["shop"]);
}

#[test]
fn coverage_is_the_current_certificates_without_their_pem() {
    let store = SqliteStore::in_memory().expect("store");
    store
        .create_site(new_site("shop", "shop.test"), NOW, NOW)
        .expect("site");
    store
        .add_hostname("shop", &name("www.shop.test"), NOW, NOW)
        .expect("added");
    for (names, serial) in [(&["shop.test"][..], "01"), (&["www.shop.test"][..], "02")] {
        store
            .store_certificate(certificate("shop", names, serial), None, NOW)
            .expect("stored");
    }
    // One that the next supersedes: not current, not in the coverage.
    store
        .store_certificate(
            certificate("shop", &["shop.test", "www.shop.test"], "03"),
            None,
            NOW,
        )
        .expect("stored");
    let mut coverage = store.all_current_coverage().expect("coverage");
    coverage.sort_by(|a, b| a.names.cmp(&b.names));
    let mut expected: Vec<CertificateCoverage> = store
        .all_current_certificates()
        .expect("certificates")
        .iter()
        .map(CertificateCoverage::from)
        .collect();
    expected.sort_by(|a, b| a.names.cmp(&b.names));
    assert_eq!(coverage, expected);
    assert_eq!(coverage.len(), 1);
    assert!(coverage[0].covers(&name("www.shop.test")));
}

#[test]
fn a_reader_behind_the_compacted_log_or_ahead_of_it_is_told_to_reload() {
    let store = SqliteStore::in_memory().expect("store");
    for site in ["a", "b", "c"] {
        store
            .create_site(new_site(site, &format!("{site}.test")), NOW, NOW)
            .expect("site");
    }
    let latest = store.latest_change_seq().expect("latest");
    // Recent rows are kept whatever their number.
    let kept = store
        .compact_site_changes(1, SITE_CHANGES_KEEP_SECS, OffsetDateTime::now_utc())
        .expect("compacted");
    assert_eq!(kept, 0);
    assert!(store.site_changes_since(0, 100).expect("changes").complete);
    // Old rows beyond the newest one go.
    let later = OffsetDateTime::now_utc() + time::Duration::minutes(1);
    let deleted = store.compact_site_changes(1, 0, later).expect("compacted");
    assert_eq!(deleted, usize::try_from(latest - 1).expect("small"));
    assert_eq!(store.latest_change_seq().expect("latest"), latest);
    let behind = store.site_changes_since(0, 100).expect("changes");
    assert_eq!(
        behind,
        SiteChanges {
            sites: Vec::new(),
            last_seq: latest,
            complete: false
        }
    );
    // Just before the oldest kept row is still complete.
    let edge = store.site_changes_since(latest - 1, 100).expect("changes");
    assert!(edge.complete);
    assert_eq!(edge.sites, ["c"]);
    let ahead = store.site_changes_since(latest + 5, 100).expect("changes");
    assert!(!ahead.complete);
}
