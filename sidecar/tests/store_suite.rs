//! One behavioural suite, two stores: every test here is written once against `&dyn Store` and
//! runs on SQLite (a temporary file) and on PostgreSQL (a fresh database on a real throwaway
//! cluster). Tests that play two nodes open two handles on one database.

mod support;

use std::sync::{Arc, Barrier};
use std::time::Duration;

use autohttps_sidecar::error::Error;
use autohttps_sidecar::hostname::Hostname;
use autohttps_sidecar::store::{
    AttemptLease, HttpsMode, NewCertificate, NewSite, PostgresStore, PostgresStoreOptions,
    PrivateKeyPem, Site, SitePolicy, SqliteStore, Store,
};
use support::pg_cluster::{PgDatabase, shared_cluster};
use tempfile::TempDir;
use time::OffsetDateTime;
use time::macros::datetime;

const NOW: OffsetDateTime = datetime!(2026-03-01 00:00 UTC);

/// Where a test's database lives; `open` gives a handle on it as one node.
trait Backend {
    fn open(&self, node: &str) -> Box<dyn Store>;
}

struct Sqlite(TempDir);

impl Backend for Sqlite {
    fn open(&self, node: &str) -> Box<dyn Store> {
        Box::new(SqliteStore::open_as_node(&self.0.path().join("autohttps.db"), node).unwrap())
    }
}

struct Postgres(PgDatabase<'static>);

impl Backend for Postgres {
    fn open(&self, node: &str) -> Box<dyn Store> {
        Box::new(PostgresStore::new(PostgresStoreOptions::new(self.0.url(), node)).unwrap())
    }
}

macro_rules! suite {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(#[test]
            fn $test() {
                super::$test(&super::Sqlite(tempfile::tempdir().unwrap()));
            })*
        }
        mod postgres {
            $(#[test]
            fn $test() {
                let database = super::shared_cluster().database().unwrap();
                super::$test(&super::Postgres(database));
            })*
        }
    };
}

suite!(
    sites_hostnames_and_policies_round_trip,
    a_change_during_an_attempt_keeps_its_earlier_schedule,
    new_certificate_supersedes_old_only_when_it_covers_all_wanted_names,
    storing_certificate_completes_its_order_and_notifies,
    regenerate_request_is_taken_once,
    reopening_keeps_sites_orders_and_history,
    two_nodes_cannot_both_take_a_sites_lease,
    an_expired_lease_is_taken_by_the_other_node,
    a_renewed_lease_keeps_the_site_from_the_other_node,
    the_acme_account_is_created_once_when_two_nodes_race,
    the_change_log_sees_changes_made_through_the_other_handle,
    http01_challenges_are_answered_through_any_handle,
    mixed_content_findings_stay_within_their_budget,
);

fn name(n: &str) -> Hostname {
    Hostname::parse(n).unwrap()
}

fn create(store: &dyn Store, site: &str, names: &[&str]) -> Site {
    store
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
        .unwrap()
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

fn taken(lease: AttemptLease) -> Site {
    match lease {
        AttemptLease::Taken(site) => *site,
        other => panic!("expected to take the lease, got {other:?}"),
    }
}

fn sites_hostnames_and_policies_round_trip(backend: &dyn Backend) {
    let store = backend.open("a");
    let created = create(
        &*store,
        "blog",
        &["example.com", "www.example.com", "alias.test"],
    );
    assert_eq!(created.primary, name("example.com"));
    assert_eq!(
        created.hostnames[0].name,
        name("example.com"),
        "primary first"
    );
    assert_eq!(created.hostnames.len(), 3);
    create(&*store, "shop", &["shop.test"]);
    assert_eq!(
        store
            .list_sites()
            .unwrap()
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>(),
        ["blog", "shop"]
    );
    assert!(matches!(
        store.create_site(
            NewSite {
                name: "blog".into(),
                primary: name("other.test"),
                hostnames: vec![],
                policy: SitePolicy::default()
            },
            NOW,
            NOW
        ),
        Err(Error::Conflict(_))
    ));
    assert!(matches!(
        store.add_hostname("shop", &name("alias.test"), NOW, NOW),
        Err(Error::Conflict(message)) if message.contains("blog")
    ));
    let mut policy = SitePolicy {
        https: HttpsMode::Force,
        canonical_host: Some(name("www.example.com")),
        ..SitePolicy::default()
    };
    policy.hsts.enabled = true;
    policy.hsts.include_subdomains = true;
    assert_eq!(
        store.set_policy("blog", policy.clone()).unwrap().policy,
        policy
    );
    // Removing the canonical host clears it.
    let updated = store
        .remove_hostname("blog", &name("www.example.com"), NOW, NOW)
        .unwrap();
    assert_eq!(updated.policy.canonical_host, None);
    assert!(matches!(
        store.remove_hostname("blog", &name("example.com"), NOW, NOW),
        Err(Error::InvalidInput(_))
    ));
    assert_eq!(
        store
            .site_of_hostname(&name("alias.test"))
            .unwrap()
            .as_deref(),
        Some("blog")
    );
    let counts = store.counts().unwrap();
    assert!(counts.sites_by_mode.contains(&(HttpsMode::Force, 1)));
    assert!(counts.sites_by_mode.contains(&(HttpsMode::Auto, 1)));
    store.delete_site("blog").unwrap();
    assert!(store.site("blog").unwrap().is_none());
    assert!(
        store
            .site_of_hostname(&name("alias.test"))
            .unwrap()
            .is_none()
    );
    assert!(matches!(store.delete_site("blog"), Err(Error::NotFound(_))));
}

/// Regression: the issuer read the site, then wrote its schedule; a hostname added between
/// the two had its attempt overwritten by the renewal date and waited months for it.
fn a_change_during_an_attempt_keeps_its_earlier_schedule(backend: &dyn Backend) {
    let store = backend.open("a");
    create(&*store, "blog", &["example.com"]);
    let lease = NOW + Duration::from_secs(600);
    let renewal = datetime!(2026-05-01 00:00 UTC);
    let next = |store: &dyn Store| {
        store
            .site("blog")
            .unwrap()
            .unwrap()
            .issuance
            .next_attempt_at
    };

    let read = taken(store.begin_attempt("blog", NOW, lease).unwrap());
    assert_eq!(read.names(), vec![name("example.com")]);
    assert_eq!(next(&*store), Some(lease));
    let change_at = NOW + Duration::from_secs(1);
    store
        .add_hostname("blog", &name("www.example.com"), NOW, change_at)
        .unwrap();
    store
        .finish_attempt("blog", lease, Some(renewal), 0, None)
        .unwrap();
    assert_eq!(
        next(&*store),
        Some(change_at),
        "the change's attempt was lost"
    );

    // Without a change the attempt's own schedule applies, earlier or later, or none.
    taken(store.begin_attempt("blog", NOW, lease).unwrap());
    store
        .finish_attempt("blog", lease, Some(renewal), 0, None)
        .unwrap();
    assert_eq!(next(&*store), Some(renewal));
    taken(store.begin_attempt("blog", NOW, lease).unwrap());
    store
        .finish_attempt("blog", lease, None, 1, Some("x"))
        .unwrap();
    assert_eq!(next(&*store), None);
    // A change asking for a later time than a failed attempt's retry gets the retry.
    taken(store.begin_attempt("blog", NOW, lease).unwrap());
    store
        .request_issuance("blog", NOW + Duration::from_secs(60), false)
        .unwrap();
    store
        .finish_attempt("blog", lease, Some(NOW + Duration::from_secs(30)), 1, None)
        .unwrap();
    assert_eq!(next(&*store), Some(NOW + Duration::from_secs(30)));
    assert_eq!(
        store.begin_attempt("gone", NOW, lease).unwrap(),
        AttemptLease::NoSuchSite
    );
}

fn new_certificate_supersedes_old_only_when_it_covers_all_wanted_names(backend: &dyn Backend) {
    let store = backend.open("a");
    create(
        &*store,
        "blog",
        &["example.com", "www.example.com", "alias.test"],
    );
    let old = store
        .store_certificate(
            certificate(
                "blog",
                &["alias.test", "example.com", "www.example.com"],
                "01",
            ),
            None,
            NOW,
        )
        .unwrap();
    // alias.test's DNS broke: the new certificate leaves it out; the old one keeps serving it.
    let new = store
        .store_certificate(
            certificate("blog", &["example.com", "www.example.com"], "02"),
            None,
            NOW,
        )
        .unwrap();
    let served = |host: &str| {
        store
            .certificate_for_hostname(&name(host))
            .unwrap()
            .map(|c| c.id)
    };
    assert_eq!(served("example.com"), Some(new.id));
    assert_eq!(served("alias.test"), Some(old.id));
    assert_eq!(store.current_certificates("blog").unwrap().len(), 2);
    // Once alias.test is removed from the site, the old certificate no longer serves it and
    // a fresh full certificate supersedes it.
    store
        .remove_hostname("blog", &name("alias.test"), NOW, NOW)
        .unwrap();
    assert_eq!(served("alias.test"), None);
    store
        .store_certificate(
            certificate("blog", &["example.com", "www.example.com"], "03"),
            None,
            NOW,
        )
        .unwrap();
    let current = store.current_certificates("blog").unwrap();
    assert_eq!(
        current
            .iter()
            .map(|c| c.serial.as_str())
            .collect::<Vec<_>>(),
        ["03"]
    );
    assert_eq!(store.all_current_certificates().unwrap().len(), 1);
}

fn storing_certificate_completes_its_order_and_notifies(backend: &dyn Backend) {
    let store = backend.open("a");
    create(&*store, "blog", &["example.com"]);
    let mut changes = store.certificates_changed();
    changes.borrow_and_update();
    let order = store
        .insert_order(
            "blog",
            &[name("example.com")],
            "https://ca/order/1",
            &PrivateKeyPem::new("k".into()),
            NOW,
        )
        .unwrap();
    assert_eq!(store.counts().unwrap().orders_in_flight, 1);
    store
        .store_certificate(
            certificate("blog", &["example.com"], "01"),
            Some(order),
            NOW,
        )
        .unwrap();
    assert!(store.orders_in_flight(None).unwrap().is_empty());
    assert!(changes.has_changed().unwrap());
    let served = store
        .certificate_for_hostname(&name("example.com"))
        .unwrap()
        .unwrap();
    assert_eq!(served.key_pem.expose(), "key 01");
    assert!(
        !format!("{served:?}").contains("key 01"),
        "keys never appear in Debug output"
    );
    let kinds: Vec<String> = store
        .events("blog", 10)
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        ["certificate-issued", "order-created", "site-created"]
    );
}

fn regenerate_request_is_taken_once(backend: &dyn Backend) {
    let store = backend.open("a");
    create(&*store, "blog", &["example.com"]);
    store.request_issuance("blog", NOW, true).unwrap();
    assert!(store.take_regenerate_request("blog").unwrap());
    assert!(!store.take_regenerate_request("blog").unwrap());
    assert!(!store.take_regenerate_request("gone").unwrap());
}

fn reopening_keeps_sites_orders_and_history(backend: &dyn Backend) {
    {
        let store = backend.open("a");
        create(&*store, "blog", &["example.com"]);
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
    let store = backend.open("a");
    let orders = store.orders_in_flight(Some("blog")).unwrap();
    assert_eq!(orders.len(), 1);
    assert_eq!(orders[0].order_url, "https://ca/order/1");
    assert_eq!(orders[0].key_pem.expose(), "k");
    assert!(store.site("blog").unwrap().is_some());
    assert_eq!(store.events("blog", 1).unwrap()[0].kind, "order-created");
}

fn two_nodes_cannot_both_take_a_sites_lease(backend: &dyn Backend) {
    let (one, two) = (backend.open("node-1"), backend.open("node-2"));
    create(&*one, "blog", &["example.com"]);
    let lease = NOW + Duration::from_secs(600);
    // Both race for it from their own threads: exactly one wins.
    let barrier = Arc::new(Barrier::new(2));
    let outcomes = std::thread::scope(|scope| {
        let racers = [&one, &two].map(|store| {
            let barrier = Arc::clone(&barrier);
            scope.spawn(move || {
                barrier.wait();
                store.begin_attempt("blog", NOW, lease).unwrap()
            })
        });
        racers.map(|racer| racer.join().unwrap())
    });
    let winners = outcomes
        .iter()
        .filter(|o| matches!(o, AttemptLease::Taken(_)))
        .count();
    assert_eq!(winners, 1, "{outcomes:?}");
    let loser = outcomes
        .iter()
        .find_map(|o| match o {
            AttemptLease::HeldElsewhere { node, until } => Some((node.clone(), *until)),
            _ => None,
        })
        .expect("the other node is told who holds it");
    assert_eq!(loser.1, lease);
    let (holder, other) = if loser.0 == "node-1" {
        (&one, &two)
    } else {
        (&two, &one)
    };
    // The holder may renew its own lease; the other node does not even see the site as due.
    taken(holder.begin_attempt("blog", NOW, lease).unwrap());
    let asked_again = NOW + Duration::from_secs(1);
    other.request_issuance("blog", NOW, false).unwrap();
    assert!(other.due_sites(asked_again).unwrap().is_empty());
    assert_eq!(other.next_due().unwrap(), Some(lease));
    assert_eq!(holder.due_sites(asked_again).unwrap(), ["blog"]);
    // Finishing releases the lease (the other node's finish never releases it).
    other.finish_attempt("blog", lease, None, 0, None).unwrap();
    assert!(matches!(
        other.begin_attempt("blog", asked_again, lease).unwrap(),
        AttemptLease::HeldElsewhere { .. }
    ));
    holder
        .finish_attempt("blog", lease, Some(asked_again), 0, None)
        .unwrap();
    taken(other.begin_attempt("blog", asked_again, lease).unwrap());
}

fn an_expired_lease_is_taken_by_the_other_node(backend: &dyn Backend) {
    let (one, two) = (backend.open("node-1"), backend.open("node-2"));
    create(&*one, "blog", &["example.com"]);
    one.insert_order(
        "blog",
        &[name("example.com")],
        "https://ca/order/7",
        &PrivateKeyPem::new("k".into()),
        NOW,
    )
    .unwrap();
    let lease = NOW + Duration::from_secs(600);
    taken(one.begin_attempt("blog", NOW, lease).unwrap());
    // node-1 dies mid-order. Before its lease ends node-2 leaves the site alone...
    let before = lease - Duration::from_secs(1);
    assert!(two.due_sites(before).unwrap().is_empty());
    assert!(matches!(
        two.begin_attempt("blog", before, before + Duration::from_secs(600))
            .unwrap(),
        AttemptLease::HeldElsewhere { .. }
    ));
    // ...then takes it over and finds the same order to resume.
    assert_eq!(two.due_sites(lease).unwrap(), ["blog"]);
    taken(
        two.begin_attempt("blog", lease, lease + Duration::from_secs(600))
            .unwrap(),
    );
    let orders = two.orders_in_flight(Some("blog")).unwrap();
    assert_eq!(orders.len(), 1);
    assert_eq!(orders[0].order_url, "https://ca/order/7");
    assert!(matches!(
        one.begin_attempt("blog", lease, lease + Duration::from_secs(600)).unwrap(),
        AttemptLease::HeldElsewhere { node, .. } if node == "node-2"
    ));
}

fn a_renewed_lease_keeps_the_site_from_the_other_node(backend: &dyn Backend) {
    let (one, two) = (backend.open("node-1"), backend.open("node-2"));
    create(&*one, "blog", &["example.com"]);
    let lease = NOW + Duration::from_secs(15);
    taken(one.begin_attempt("blog", NOW, lease).unwrap());
    let renewed = lease + Duration::from_secs(10);
    // Only the holder renews, and only the lease it holds.
    assert!(!two.renew_lease("blog", lease, renewed).unwrap());
    assert!(!one.renew_lease("blog", NOW, renewed).unwrap());
    assert!(one.renew_lease("blog", lease, renewed).unwrap());
    // Past the first lease's end the other node still leaves the site alone...
    assert!(two.due_sites(lease).unwrap().is_empty());
    assert!(matches!(
        two.begin_attempt("blog", lease, lease + Duration::from_secs(15)).unwrap(),
        AttemptLease::HeldElsewhere { until, .. } if until == renewed
    ));
    // ...a change made meanwhile keeps its earlier schedule through a renewal...
    let asked = NOW + Duration::from_secs(1);
    one.request_issuance("blog", asked, false).unwrap();
    let again = renewed + Duration::from_secs(10);
    assert!(one.renew_lease("blog", renewed, again).unwrap());
    let site = one.site("blog").unwrap().unwrap();
    assert_eq!(site.issuance.next_attempt_at, Some(asked));
    // ...and once renewals stop, the lease runs out and the other node takes the site.
    assert!(
        two.due_sites(again - Duration::from_secs(1))
            .unwrap()
            .is_empty()
    );
    assert_eq!(two.due_sites(again).unwrap(), ["blog"]);
    taken(
        two.begin_attempt("blog", again, again + Duration::from_secs(15))
            .unwrap(),
    );
}

fn the_acme_account_is_created_once_when_two_nodes_race(backend: &dyn Backend) {
    let (one, two) = (backend.open("node-1"), backend.open("node-2"));
    let directory = "https://ca.test/directory";
    assert_eq!(one.account(directory).unwrap(), None);
    let barrier = Arc::new(Barrier::new(2));
    let saved = std::thread::scope(|scope| {
        let racers =
            [(&one, "{\"id\":\"one\"}"), (&two, "{\"id\":\"two\"}")].map(|(store, json)| {
                let barrier = Arc::clone(&barrier);
                scope.spawn(move || {
                    barrier.wait();
                    store.save_account(directory, json, NOW).unwrap()
                })
            });
        racers.map(|racer| racer.join().unwrap())
    });
    assert_eq!(saved[0], saved[1], "both nodes use the one account stored");
    assert_eq!(one.account(directory).unwrap().as_ref(), Some(&saved[0]));
    // A later save never replaces it.
    assert_eq!(
        two.save_account(directory, "{\"id\":\"late\"}", NOW)
            .unwrap(),
        saved[0]
    );
}

fn the_change_log_sees_changes_made_through_the_other_handle(backend: &dyn Backend) {
    let (one, two) = (backend.open("node-1"), backend.open("node-2"));
    let start = two.latest_change_seq().unwrap();
    create(&*one, "blog", &["example.com"]);
    create(&*one, "shop", &["shop.test"]);
    let changes = two.site_changes_since(start, 100).unwrap();
    assert!(changes.complete);
    assert_eq!(
        changes.sites,
        ["blog", "shop"],
        "deduplicated, in order of first change"
    );
    assert_eq!(changes.last_seq, two.latest_change_seq().unwrap());

    // Scheduling (every attempt) is not a change; policy, names and certificates are.
    let mark = changes.last_seq;
    let lease = NOW + Duration::from_secs(600);
    taken(one.begin_attempt("shop", NOW, lease).unwrap());
    one.finish_attempt("shop", lease, Some(lease), 1, Some("x"))
        .unwrap();
    one.request_issuance("shop", NOW, true).unwrap();
    assert_eq!(
        two.site_changes_since(mark, 100).unwrap().sites,
        Vec::<String>::new()
    );
    assert_eq!(two.latest_change_seq().unwrap(), mark);

    one.store_certificate(certificate("shop", &["shop.test"], "01"), None, NOW)
        .unwrap();
    let policy = SitePolicy {
        https: HttpsMode::Force,
        ..SitePolicy::default()
    };
    one.set_policy("blog", policy).unwrap();
    one.add_hostname("shop", &name("www.shop.test"), NOW, NOW)
        .unwrap();
    let changes = two.site_changes_since(mark, 100).unwrap();
    assert_eq!(changes.sites, ["shop", "blog"]);
    // A limit reads the log in batches.
    let first = two.site_changes_since(mark, 1).unwrap();
    assert_eq!(first.sites, ["shop"]);
    assert_eq!(first.last_seq, mark + 1);
    one.delete_site("blog").unwrap();
    assert_eq!(
        two.site_changes_since(changes.last_seq, 100).unwrap().sites,
        ["blog"]
    );
}

fn http01_challenges_are_answered_through_any_handle(backend: &dyn Backend) {
    let (one, two) = (backend.open("node-1"), backend.open("node-2"));
    one.put_challenge("token-1", "token-1.thumbprint", NOW)
        .unwrap();
    assert_eq!(
        two.challenge("token-1").unwrap().as_deref(),
        Some("token-1.thumbprint")
    );
    assert_eq!(two.challenge("token-2").unwrap(), None);
    two.delete_challenge("token-1").unwrap();
    assert_eq!(one.challenge("token-1").unwrap(), None);
    // A token its node never removed (it died) is forgotten after a day.
    one.put_challenge("orphan", "orphan.thumbprint", NOW)
        .unwrap();
    let next_day = NOW + time::Duration::days(1) + time::Duration::seconds(1);
    two.put_challenge("token-3", "token-3.thumbprint", next_day)
        .unwrap();
    assert_eq!(one.challenge("orphan").unwrap(), None);
    assert!(one.challenge("token-3").unwrap().is_some());
}

fn mixed_content_findings_stay_within_their_budget(backend: &dyn Backend) {
    use autohttps_sidecar::store::{Recorded, finding_bytes};
    let store = backend.open("a");
    create(&*store, "blog", &["example.com"]);
    let one = finding_bytes("https://example.com/", "http://cdn.test/a.png", "img-src");
    let budget = one * 2;
    let record = |resource: &str, minute: i64| {
        store
            .record_mixed_content(
                "blog",
                "https://example.com/",
                resource,
                "img-src",
                NOW + time::Duration::minutes(minute),
                budget,
            )
            .unwrap()
    };
    assert_eq!(
        record("http://cdn.test/a.png", 0),
        Recorded::Added { evicted: 0 }
    );
    assert_eq!(record("http://cdn.test/a.png", 1), Recorded::Counted);
    assert_eq!(
        record("http://cdn.test/b.png", 2),
        Recorded::Added { evicted: 0 }
    );
    // A third finding evicts the least useful: b (one report), not a (two).
    assert_eq!(
        record("http://cdn.test/c.png", 3),
        Recorded::Added { evicted: 1 }
    );
    let findings = store.mixed_content("blog").unwrap();
    let resources: Vec<&str> = findings.iter().map(|f| f.resource.as_str()).collect();
    assert_eq!(
        resources,
        ["http://cdn.test/c.png", "http://cdn.test/a.png"]
    );
    assert_eq!(findings[1].reports, 2);
    assert!(store.mixed_content_bytes("blog").unwrap() <= budget);
}
