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
    PrivateKeyPem, Site, SiteEventKind, SitePolicy, SqliteStore, Store,
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
    a_renewed_lease_is_never_taken_and_keeps_a_change_made_meanwhile,
    a_restarted_node_releases_its_own_dead_leases_and_no_one_elses,
    the_acme_account_is_created_once_when_two_nodes_race,
    the_change_log_sees_changes_made_through_the_other_handle,
    http01_challenges_are_answered_through_any_handle,
    mixed_content_findings_stay_within_their_budget,
    every_site_is_read_a_page_at_a_time_with_its_current_certificates,
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

fn next_attempt(store: &dyn Store, site: &str) -> Option<OffsetDateTime> {
    store.site(site).unwrap().unwrap().issuance.next_attempt_at
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
        .map(|e| e.kind.to_string())
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

fn a_renewed_lease_is_never_taken_and_keeps_a_change_made_meanwhile(backend: &dyn Backend) {
    let (one, two) = (backend.open("node-1"), backend.open("node-2"));
    create(&*one, "blog", &["example.com"]);
    let lease = NOW + Duration::from_secs(120);
    taken(one.begin_attempt("blog", NOW, lease).unwrap());
    // node-1 renews while it works: past the first lease's end node-2 still may not take it,
    // and the next attempt time moved with the lease.
    let renewed = lease + Duration::from_secs(90);
    assert!(one.renew_lease("blog", lease, renewed).unwrap());
    assert_eq!(next_attempt(&*one, "blog"), Some(renewed));
    let after_first = lease + Duration::from_secs(1);
    assert!(two.due_sites(after_first).unwrap().is_empty());
    assert!(matches!(
        two.begin_attempt("blog", after_first, after_first + Duration::from_secs(120)).unwrap(),
        AttemptLease::HeldElsewhere { node, until } if node == "node-1" && until == renewed
    ));
    // Renewing from a time this node does not hold, or another node's lease, changes nothing.
    assert!(
        !one.renew_lease("blog", lease, renewed + Duration::from_secs(60))
            .unwrap()
    );
    assert!(
        !two.renew_lease("blog", renewed, renewed + Duration::from_secs(60))
            .unwrap()
    );
    // A change during the attempt (a hostname added) keeps its time through the renewal...
    let change = NOW + Duration::from_secs(5);
    one.add_hostname("blog", &name("www.example.com"), NOW, change)
        .unwrap();
    let again = renewed + Duration::from_secs(90);
    assert!(one.renew_lease("blog", renewed, again).unwrap());
    assert_eq!(next_attempt(&*one, "blog"), Some(change));
    // ...and the finished attempt (planning a renewal months away) keeps it too.
    one.finish_attempt(
        "blog",
        again,
        Some(NOW + Duration::from_secs(86_400 * 60)),
        0,
        None,
    )
    .unwrap();
    assert_eq!(next_attempt(&*one, "blog"), Some(change));
    // Once it ran out unrenewed, node-2 takes it and node-1's renewal is refused.
    taken(one.begin_attempt("blog", NOW, lease).unwrap());
    taken(
        two.begin_attempt("blog", lease, lease + Duration::from_secs(120))
            .unwrap(),
    );
    assert!(
        !one.renew_lease("blog", lease, lease + Duration::from_secs(120))
            .unwrap()
    );
}

fn a_restarted_node_releases_its_own_dead_leases_and_no_one_elses(backend: &dyn Backend) {
    let (one, two) = (backend.open("node-1"), backend.open("node-2"));
    for site in ["mine", "theirs", "changed"] {
        create(&*one, site, &[&format!("{site}.example")]);
    }
    let lease = NOW + Duration::from_secs(120);
    taken(one.begin_attempt("mine", NOW, lease).unwrap());
    taken(one.begin_attempt("changed", NOW, lease).unwrap());
    taken(two.begin_attempt("theirs", NOW, lease).unwrap());
    // During node-1's dead attempt someone asked for "changed" (debounced to a time that is
    // past when node-1 restarts).
    let asked = NOW + Duration::from_secs(5);
    two.request_issuance("changed", asked, false).unwrap();
    // node-1 restarts (a new process, the same node id): its leases go, node-2's stays.
    let restarted = NOW + Duration::from_secs(10);
    let one = backend.open("node-1");
    assert_eq!(
        one.release_own_leases(restarted).unwrap(),
        ["changed", "mine"]
    );
    assert_eq!(one.due_sites(restarted).unwrap(), ["changed", "mine"]);
    assert_eq!(next_attempt(&*one, "changed"), Some(asked));
    assert_eq!(next_attempt(&*one, "mine"), Some(restarted));
    assert!(matches!(
        one.begin_attempt("theirs", restarted, restarted + Duration::from_secs(120)).unwrap(),
        AttemptLease::HeldElsewhere { node, .. } if node == "node-2"
    ));
    assert_eq!(
        one.events("mine", 1).unwrap()[0].kind,
        SiteEventKind::AttemptInterrupted
    );
    // Released leases are gone: node-2 may take them now, and a second release finds none.
    taken(
        two.begin_attempt("mine", restarted, restarted + Duration::from_secs(120))
            .unwrap(),
    );
    assert!(one.release_own_leases(restarted).unwrap().is_empty());
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

fn every_site_is_read_a_page_at_a_time_with_its_current_certificates(backend: &dyn Backend) {
    let store = backend.open("a");
    // Ids chosen so that a prefix of one sorts before the other ("a" < "a-b" < "ab").
    for (site, primary) in [
        ("ab", "ab.test"),
        ("a", "a.test"),
        ("c", "c.test"),
        ("a-b", "a-b.test"),
        ("b", "b.test"),
    ] {
        create(&*store, site, &[primary, &format!("www.{primary}")]);
    }
    let superseded = store
        .store_certificate(certificate("a", &["a.test", "www.a.test"], "a1"), None, NOW)
        .unwrap();
    store
        .store_certificate(certificate("a", &["a.test", "www.a.test"], "a2"), None, NOW)
        .unwrap();
    store
        .store_certificate(certificate("b", &["b.test"], "b1"), None, NOW)
        .unwrap();
    store
        .store_certificate(certificate("ab", &["ab.test"], "ab1"), None, NOW)
        .unwrap();

    let mut read = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store.sites_page(after.as_deref(), 2).unwrap();
        assert!(page.len() <= 2, "a page holds at most its limit");
        let Some((last, _)) = page.last() else { break };
        after = Some(last.name.clone());
        read.extend(page);
    }
    let summary: Vec<(String, usize, Vec<String>)> = read
        .iter()
        .map(|(site, certificates)| {
            (
                site.name.clone(),
                site.hostnames.len(),
                certificates.iter().map(|c| c.serial.clone()).collect(),
            )
        })
        .collect();
    let expected = |site: &str, serials: &[&str]| {
        (
            site.to_string(),
            2,
            serials.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )
    };
    assert_eq!(
        summary,
        vec![
            expected("a", &["a2"]),
            expected("a-b", &[]),
            expected("ab", &["ab1"]),
            expected("b", &["b1"]),
            expected("c", &[]),
        ],
        "every site once, by id, each with only its own current certificates"
    );
    let a2 = &read[0].1[0];
    assert_eq!(a2.names, [name("a.test"), name("www.a.test")]);
    assert_eq!(a2.site, "a");

    // A row is read back by id, superseded or not, with its chain and key.
    let old = store.certificate(superseded.id).unwrap().expect("kept");
    assert_eq!(old.serial, "a1");
    assert_eq!(old.key_pem.expose(), "key a1");
    assert_eq!(
        store.certificate(a2.id).unwrap().expect("current").serial,
        "a2"
    );
    store.delete_site("a").unwrap();
    assert_eq!(store.certificate(superseded.id).unwrap(), None);
}
