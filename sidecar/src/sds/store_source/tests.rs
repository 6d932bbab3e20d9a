//! Unit tests of the store-backed certificate source, over a real (in-memory) SQLite store.

use std::sync::Arc;

use time::macros::datetime;

use super::*;
use crate::clock::ManualClock;
use crate::hostname::Hostname;
use crate::store::prelude::*;
use crate::store::{NewCertificate, NewSite, PrivateKeyPem, SitePolicy, SqliteStore};

const NOW: OffsetDateTime = datetime!(2026-03-01 00:00 UTC);

fn name(n: &str) -> Hostname {
    Hostname::parse(n).expect("valid hostname")
}

struct Fixture {
    store: Arc<SqliteStore>,
    clock: Arc<ManualClock>,
}

impl Fixture {
    fn new() -> Self {
        Self {
            store: Arc::new(SqliteStore::in_memory().expect("store")),
            clock: Arc::new(ManualClock::new(NOW)),
        }
    }

    fn site(&self, site: &str, names: &[&str]) {
        self.store
            .create_site(
                NewSite {
                    name: site.into(),
                    primary: name(names[0]),
                    hostnames: names[1..].iter().map(|n| name(n)).collect(),
                    policy: SitePolicy::default(),
                },
                NOW,
                NOW,
            )
            .expect("site created");
    }

    /// Stores a real self-signed certificate for `names`; with `mismatched_key`, the stored
    /// key belongs to another certificate. Returns its serial.
    fn issue(
        &self,
        site: &str,
        names: &[&str],
        not_after: OffsetDateTime,
        mismatched_key: bool,
    ) -> String {
        let generated = rcgen::generate_simple_self_signed(
            names.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
        )
        .expect("generated");
        let key = if mismatched_key {
            rcgen::KeyPair::generate()
                .expect("other key")
                .serialize_pem()
        } else {
            generated.signing_key.serialize_pem()
        };
        let serial = format!("{:032x}", rand::random::<u128>());
        self.store
            .store_certificate(
                NewCertificate {
                    site: site.into(),
                    names: names.iter().map(|n| name(n)).collect(),
                    chain_pem: generated.cert.pem(),
                    key_pem: PrivateKeyPem::new(key),
                    not_before: NOW,
                    not_after,
                    serial: serial.clone(),
                    ari_id: None,
                },
                None,
                NOW,
            )
            .expect("stored");
        serial
    }

    fn source(&self) -> Arc<StoreCertificateSource> {
        StoreCertificateSource::new(
            Arc::clone(&self.store) as Arc<dyn Store>,
            Arc::clone(&self.clock) as Arc<dyn Clock>,
            None,
        )
        .expect("indexed")
    }
}

const LATER: OffsetDateTime = datetime!(2026-06-01 00:00 UTC);

fn version(source: &StoreCertificateSource, name: &str) -> Option<String> {
    source.lookup(name).map(|c| c.version().to_owned())
}

#[test]
fn every_name_of_a_site_gets_its_certificate_and_unknown_names_get_none() {
    let fixture = Fixture::new();
    fixture.site("shop", &["shop.example.test", "www.shop.example.test"]);
    let serial = fixture.issue(
        "shop",
        &["shop.example.test", "www.shop.example.test"],
        LATER,
        false,
    );
    let source = fixture.source();
    assert_eq!(version(&source, "shop.example.test"), Some(serial.clone()));
    assert_eq!(version(&source, "WWW.shop.example.test."), Some(serial));
    assert_eq!(version(&source, "other.example.test"), None);
    let served = source.lookup("shop.example.test").expect("served");
    assert!(served.certificate_chain_pem().contains("BEGIN CERTIFICATE"));
    assert!(served.private_key_pem().contains("PRIVATE KEY"));
}

#[test]
fn certificate_whose_key_does_not_match_its_leaf_is_never_served() {
    let fixture = Fixture::new();
    fixture.site("shop", &["shop.example.test"]);
    fixture.issue("shop", &["shop.example.test"], LATER, true);
    let source = fixture.source();
    assert_eq!(version(&source, "shop.example.test"), None);
}

#[test]
fn refused_replacement_keeps_the_previous_certificate_serving() {
    let fixture = Fixture::new();
    fixture.site("shop", &["shop.example.test"]);
    let good = fixture.issue("shop", &["shop.example.test"], LATER, false);
    let source = fixture.source();
    let changes = source.changes();
    // The bad one is newer and supersedes the good one in the store.
    fixture.issue(
        "shop",
        &["shop.example.test"],
        datetime!(2026-07-01 00:00 UTC),
        true,
    );
    source.refresh().expect("refreshed");
    assert_eq!(version(&source, "shop.example.test"), Some(good));
    assert!(!changes.has_changed().expect("open"), "nothing new to push");
}

#[test]
fn expired_certificate_is_not_served() {
    let fixture = Fixture::new();
    fixture.site("shop", &["shop.example.test"]);
    fixture.issue("shop", &["shop.example.test"], LATER, false);
    let source = fixture.source();
    assert!(source.lookup("shop.example.test").is_some());
    fixture.clock.set(LATER);
    source.refresh().expect("refreshed");
    assert_eq!(version(&source, "shop.example.test"), None);
}

#[test]
fn name_removed_from_its_site_is_no_longer_served() {
    let fixture = Fixture::new();
    fixture.site("shop", &["shop.example.test", "old.shop.example.test"]);
    fixture.issue(
        "shop",
        &["shop.example.test", "old.shop.example.test"],
        LATER,
        false,
    );
    let source = fixture.source();
    assert!(source.lookup("old.shop.example.test").is_some());
    fixture
        .store
        .remove_hostname("shop", &name("old.shop.example.test"), NOW, NOW)
        .expect("removed");
    source.refresh().expect("refreshed");
    assert_eq!(version(&source, "old.shop.example.test"), None);
    assert!(source.lookup("shop.example.test").is_some());
}

#[test]
fn newer_certificate_is_announced_and_an_idle_rebuild_is_not() {
    let fixture = Fixture::new();
    fixture.site("shop", &["shop.example.test"]);
    fixture.issue("shop", &["shop.example.test"], LATER, false);
    let source = fixture.source();
    let mut changes = source.changes();
    source.refresh().expect("refreshed");
    assert!(!changes.has_changed().expect("open"));
    let renewed = fixture.issue(
        "shop",
        &["shop.example.test"],
        datetime!(2026-07-01 00:00 UTC),
        false,
    );
    source.refresh().expect("refreshed");
    assert!(changes.has_changed().expect("open"));
    changes.mark_unchanged();
    assert_eq!(version(&source, "shop.example.test"), Some(renewed));
}

#[tokio::test]
async fn store_change_reaches_the_index_without_a_manual_refresh() {
    let fixture = Fixture::new();
    fixture.site("shop", &["shop.example.test"]);
    let source = fixture.source();
    let mut changes = source.changes();
    let task = source.spawn_refresh();
    let serial = fixture.issue("shop", &["shop.example.test"], LATER, false);
    tokio::time::timeout(std::time::Duration::from_secs(5), changes.changed())
        .await
        .expect("announced in time")
        .expect("open");
    assert_eq!(version(&source, "shop.example.test"), Some(serial));
    task.abort();
}

#[test]
fn configured_default_certificate_is_checked_against_its_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let generated =
        rcgen::generate_simple_self_signed(vec!["default.example.test".to_owned()]).expect("cert");
    let chain = dir.path().join("default.pem");
    let key = dir.path().join("default.key");
    let other_key = dir.path().join("other.key");
    std::fs::write(&chain, generated.cert.pem()).expect("written");
    std::fs::write(&key, generated.signing_key.serialize_pem()).expect("written");
    let other = rcgen::KeyPair::generate().expect("key").serialize_pem();
    std::fs::write(&other_key, &other).expect("written");

    let served = default_certificate_from_files(&chain, &key).expect("accepted");
    assert!(served.version().starts_with("configured-"));
    let error = default_certificate_from_files(&chain, &other_key).expect_err("refused");
    let message = error.to_string();
    assert!(message.contains("does not belong"), "{message}");
    assert!(
        !message.contains("PRIVATE KEY") && !message.contains(other.trim()),
        "{message}"
    );
}

#[test]
fn key_check_names_the_problem_without_quoting_input() {
    assert!(
        check_key_matches_leaf(
            "not pem",
            "-----BEGIN PRIVATE KEY-----\nsecret\n-----END PRIVATE KEY-----\n"
        )
        .expect_err("refused")
        .contains("no certificate")
    );
}

/// Every name's served version, from a lookup of each of `names`.
fn versions(source: &StoreCertificateSource, names: &[&str]) -> Vec<Option<String>> {
    names.iter().map(|n| version(source, n)).collect()
}

#[test]
fn an_incremental_refresh_serves_what_a_full_rebuild_would() {
    let fixture = Fixture::new();
    fixture.site("shop", &["shop.example.test", "old.shop.example.test"]);
    fixture.site("blog", &["blog.example.test"]);
    fixture.site("bad", &["bad.example.test"]);
    fixture.issue(
        "shop",
        &["shop.example.test", "old.shop.example.test"],
        LATER,
        false,
    );
    fixture.issue("blog", &["blog.example.test"], LATER, false);
    let bad_good = fixture.issue("bad", &["bad.example.test"], LATER, false);
    let source = fixture.source();
    let mut changes = source.changes();
    source.refresh_changed().expect("nothing changed");
    assert!(
        !changes.has_changed().expect("open"),
        "an idle refresh is silent"
    );

    // A name moves from shop to blog, blog gets a certificate for it, shop is renewed, and
    // bad's newer certificate does not match its key (the old one keeps serving).
    fixture
        .store
        .remove_hostname("shop", &name("old.shop.example.test"), NOW, NOW)
        .expect("removed");
    fixture
        .store
        .add_hostname("blog", &name("old.shop.example.test"), NOW, NOW)
        .expect("added");
    let blog = fixture.issue(
        "blog",
        &["blog.example.test", "old.shop.example.test"],
        datetime!(2026-07-01 00:00 UTC),
        false,
    );
    let shop = fixture.issue(
        "shop",
        &["shop.example.test"],
        datetime!(2026-07-01 00:00 UTC),
        false,
    );
    fixture.issue(
        "bad",
        &["bad.example.test"],
        datetime!(2026-07-01 00:00 UTC),
        true,
    );
    source.refresh_changed().expect("refreshed");
    assert!(changes.has_changed().expect("open"));
    changes.mark_unchanged();
    let names = [
        "shop.example.test",
        "old.shop.example.test",
        "blog.example.test",
        "bad.example.test",
    ];
    assert_eq!(
        versions(&source, &names),
        vec![Some(shop), Some(blog.clone()), Some(blog), Some(bad_good)]
    );
    // A new source knows nothing of bad's superseded good certificate; the rest is the same.
    let rebuilt = fixture.source();
    assert_eq!(
        versions(&source, &names[..3]),
        versions(&rebuilt, &names[..3])
    );
    assert_eq!(version(&rebuilt, "bad.example.test"), None);

    // A deleted site's names go.
    fixture.store.delete_site("blog").expect("deleted");
    source.refresh_changed().expect("refreshed");
    assert!(changes.has_changed().expect("open"));
    assert_eq!(version(&source, "blog.example.test"), None);
    assert_eq!(version(&source, "old.shop.example.test"), None);
    assert!(source.lookup("shop.example.test").is_some());
}

#[test]
fn only_names_envoy_asked_for_keep_their_chain_and_key_in_memory() {
    let fixture = Fixture::new();
    fixture.site("shop", &["shop.example.test", "www.shop.example.test"]);
    fixture.site("blog", &["blog.example.test"]);
    let shop = fixture.issue(
        "shop",
        &["shop.example.test", "www.shop.example.test"],
        LATER,
        false,
    );
    fixture.issue("blog", &["blog.example.test"], LATER, false);
    let source = fixture.source();
    assert_eq!(source.indexed_names(), 3);
    assert_eq!(source.loaded_certificates(), 0, "the index holds no PEM");

    // A lookup of a name nobody watches reads the store and keeps nothing.
    let served = source.lookup("blog.example.test").expect("served");
    assert!(served.private_key_pem().contains("PRIVATE KEY"));
    assert_eq!(source.loaded_certificates(), 0);

    // Two names of one certificate, watched (one of them by two streams): one copy.
    source.watch("shop.example.test");
    source.watch("SHOP.example.test.");
    source.watch("www.shop.example.test");
    let first = source.lookup("shop.example.test").expect("served");
    let again = source.lookup("www.shop.example.test").expect("served");
    assert_eq!(first.version(), shop);
    assert!(Arc::ptr_eq(&first, &again), "one loaded copy serves both");
    assert_eq!(source.loaded_certificates(), 1);

    // It stays when the last stream lets go: Envoy ends an on-demand stream and opens another
    // at the name's next handshake, which is then answered from memory, not from the store
    // (which may be down).
    source.unwatch("www.shop.example.test");
    source.unwatch("shop.example.test");
    source.unwatch("shop.example.test");
    assert_eq!(source.loaded_certificates(), 1);
    source.watch("www.shop.example.test");
    let later = source.lookup("www.shop.example.test").expect("served");
    assert!(
        Arc::ptr_eq(&first, &later),
        "served from memory, not read again"
    );
    // Unwatching a name never watched changes nothing.
    source.unwatch("blog.example.test");
    assert_eq!(source.loaded_certificates(), 1);
}

#[test]
fn a_watched_name_renewed_holds_only_the_new_certificate() {
    let fixture = Fixture::new();
    fixture.site("shop", &["shop.example.test"]);
    fixture.issue("shop", &["shop.example.test"], LATER, false);
    let source = fixture.source();
    source.watch("shop.example.test");
    assert!(source.lookup("shop.example.test").is_some());
    let renewed = fixture.issue(
        "shop",
        &["shop.example.test"],
        datetime!(2026-07-01 00:00 UTC),
        false,
    );
    source.refresh_changed().expect("refreshed");
    assert_eq!(version(&source, "shop.example.test"), Some(renewed));
    assert_eq!(source.loaded_certificates(), 1, "the old one was let go");

    // Removed from its site: nothing served, nothing held.
    fixture.site("other", &["other.example.test"]);
    fixture.store.delete_site("shop").expect("deleted");
    source.refresh_changed().expect("refreshed");
    assert_eq!(version(&source, "shop.example.test"), None);
    assert_eq!(source.loaded_certificates(), 0);
}

/// The index's names by site and its expiry counts, as incremental updates leave them, agree
/// with its names; the served names and the first expiry agree with a full rebuild's.
fn assert_index_matches_rebuild(fixture: &Fixture, source: &StoreCertificateSource) {
    let index = source.read();
    let mut by_site: Vec<(String, String)> = index
        .by_site
        .iter()
        .flat_map(|(site, names)| names.iter().map(move |n| (site.to_string(), n.to_string())))
        .collect();
    by_site.sort();
    let mut by_name: Vec<(String, String)> = index
        .by_name
        .iter()
        .map(|(name, entry)| (entry.site.to_string(), name.to_string()))
        .collect();
    by_name.sort();
    assert_eq!(by_site, by_name, "names by site");
    let mut expiries: BTreeMap<OffsetDateTime, usize> = BTreeMap::new();
    for entry in index.by_name.values() {
        *expiries.entry(entry.not_after).or_default() += 1;
    }
    assert_eq!(index.expiries, expiries, "expiry counts");
    let rebuilt = fixture.source();
    let rebuilt = rebuilt.read();
    assert_eq!(index.next_expiry(), rebuilt.next_expiry());
    let served = |index: &Index| -> Vec<(String, String)> {
        let mut served: Vec<(String, String)> = index
            .by_name
            .iter()
            .map(|(name, entry)| (name.to_string(), entry.version.to_string()))
            .collect();
        served.sort();
        served
    };
    assert_eq!(served(&index), served(&rebuilt));
}

/// A change touches only the changed sites' names (no pass over every name) and keeps the
/// first expiry exact: renewals, a name moved to another site, a deleted site.
#[test]
fn incremental_updates_keep_names_by_site_and_the_first_expiry_exact() {
    let fixture = Fixture::new();
    let soon = datetime!(2026-04-01 00:00 UTC);
    fixture.site("shop", &["shop.example.test", "www.shop.example.test"]);
    fixture.site("blog", &["blog.example.test"]);
    fixture.issue(
        "shop",
        &["shop.example.test", "www.shop.example.test"],
        LATER,
        false,
    );
    fixture.issue("blog", &["blog.example.test"], soon, false);
    let source = fixture.source();
    assert_eq!(source.read().next_expiry(), Some(soon));
    assert_index_matches_rebuild(&fixture, &source);

    // blog renewed: its earlier expiry no longer counts.
    fixture.issue(
        "blog",
        &["blog.example.test"],
        datetime!(2026-08-01 00:00 UTC),
        false,
    );
    source.refresh_changed().expect("refreshed");
    assert_eq!(source.read().next_expiry(), Some(LATER));
    assert_index_matches_rebuild(&fixture, &source);

    // www.shop moves to blog, which gets a certificate for it.
    fixture
        .store
        .remove_hostname("shop", &name("www.shop.example.test"), NOW, NOW)
        .expect("removed");
    fixture
        .store
        .add_hostname("blog", &name("www.shop.example.test"), NOW, NOW)
        .expect("added");
    fixture.issue(
        "blog",
        &["blog.example.test", "www.shop.example.test"],
        datetime!(2026-09-01 00:00 UTC),
        false,
    );
    source.refresh_changed().expect("refreshed");
    assert_index_matches_rebuild(&fixture, &source);
    assert_eq!(source.read().by_site.get("blog").map(Vec::len), Some(2));

    // shop deleted: its names and its expiry go.
    fixture.store.delete_site("shop").expect("deleted");
    source.refresh_changed().expect("refreshed");
    assert_index_matches_rebuild(&fixture, &source);
    assert!(!source.read().by_site.contains_key("shop"));
    assert_eq!(
        source.read().next_expiry(),
        Some(datetime!(2026-09-01 00:00 UTC))
    );
}
