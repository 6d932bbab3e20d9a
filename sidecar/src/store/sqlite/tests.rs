//! The SQLite store's own tests: files, permissions and upgrades from old schemas.

use super::*;
use crate::hostname::Hostname;
use crate::store::*;
use std::os::unix::fs::MetadataExt;
use time::macros::datetime;

const NOW: OffsetDateTime = datetime!(2026-03-01 00:00 UTC);

fn name(n: &str) -> Hostname {
    Hostname::parse(n).unwrap()
}

fn site(store: &SqliteStore, names: &[&str]) -> Site {
    store
        .create_site(
            NewSite {
                name: "blog".into(),
                primary: name(names[0]),
                hostnames: names[1..].iter().map(|n| name(n)).collect(),
                policy: SitePolicy::default(),
            },
            NOW,
            NOW,
        )
        .unwrap()
}

#[test]
fn a_database_of_the_first_schema_upgrades_keeping_its_sites() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("autohttps.db");
    {
        let connection = Connection::open(&path).unwrap();
        connection.execute_batch(MIGRATIONS[0]).unwrap();
        connection.pragma_update(None, "user_version", 1).unwrap();
        connection
            .execute(
                "INSERT INTO sites (name, primary_hostname, https_mode, redirect, hsts_enabled,
                                    hsts_max_age, mixed_content, created_at)
                 VALUES ('old', 'old.example.com', 'force', 'permanent', 1, 300, 'off', 0)",
                [],
            )
            .unwrap();
    }
    let store = SqliteStore::open(&path).unwrap();
    let site = store.site("old").unwrap().expect("the site survives");
    assert!(site.policy.hsts.enabled);
    assert_eq!(site.policy.hsts.max_age, 300);
    assert!(!site.policy.hsts.include_subdomains && !site.policy.hsts.preload);
    assert_eq!(site.policy.canonical_host, None);
    let mut policy = site.policy.clone();
    policy.hsts.include_subdomains = true;
    policy.canonical_host = Some(name("old.example.com"));
    let before = store.latest_change_seq().unwrap();
    let updated = store.set_policy("old", policy.clone()).unwrap();
    assert_eq!(updated.policy, policy);
    // The upgraded database has the change log and its triggers.
    assert_eq!(store.site_changes_since(before, 10).unwrap().sites, ["old"]);
    assert_eq!(
        store.schema_version().unwrap(),
        crate::store::SCHEMA_VERSION
    );
}

#[test]
fn files_are_owner_only_and_reopen_keeps_data() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    create_private_dir(&data).unwrap();
    let path = data.join("autohttps.db");
    {
        let store = SqliteStore::open(&path).unwrap();
        site(&store, &["example.com"]);
        store
            .insert_order(
                "blog",
                &[name("example.com")],
                "https://ca/order/1",
                &PrivateKeyPem::new("k".into()),
                NOW,
            )
            .unwrap();
    }
    assert_eq!(std::fs::metadata(&data).unwrap().mode() & 0o777, 0o700);
    for entry in std::fs::read_dir(&data).unwrap() {
        let entry = entry.unwrap();
        assert_eq!(
            entry.metadata().unwrap().mode() & 0o077,
            0,
            "{:?} is readable by others",
            entry.path()
        );
    }
    let store = SqliteStore::open(&path).unwrap();
    let orders = store.orders_in_flight(None).unwrap();
    assert_eq!(orders.len(), 1);
    assert_eq!(orders[0].order_url, "https://ca/order/1");
    assert!(store.site("blog").unwrap().is_some());
}
