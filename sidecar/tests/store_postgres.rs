//! What only the PostgreSQL store does, on a real throwaway cluster: another node's commit
//! wakes this node's watches (LISTEN/NOTIFY), the database going away is a clear "unavailable"
//! (503 at the admin API) and everything resumes when it returns, a node started while the
//! database is down waits for it, an HTTP-01 token is answered by a node that did not place
//! the order, and the change log is compacted safely by nodes doing it at once.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use autohttps_sidecar::clock::SystemClock;
use autohttps_sidecar::config::Config;
use autohttps_sidecar::hostname::Hostname;
use autohttps_sidecar::http01::{ChallengeResponder, internal_router};
use autohttps_sidecar::service::{Sidecar, open_store};
use autohttps_sidecar::store::prelude::*;
use autohttps_sidecar::store::{
    NewSite, PostgresStore, PostgresStoreOptions, SCHEMA_VERSION, SITE_CHANGES_KEEP_SECS,
    SitePolicy, SqliteStore, Store,
};
use reqwest::Method;
use support::pg_cluster::{PgCluster, shared_cluster};
use support::{Admin, TOKEN};
use time::OffsetDateTime;

/// How long a wake-up or a recovery may take before the test fails (a bound, not a sleep).
const PATIENCE: Duration = Duration::from_secs(10);

fn store(url: &str, node: &str, reconcile_every: Duration) -> PostgresStore {
    let mut options = PostgresStoreOptions::new(url, node);
    options.reconcile_every = reconcile_every;
    PostgresStore::new(options).unwrap()
}

fn create(store: &dyn Store, site: &str, primary: &str) {
    let now = OffsetDateTime::now_utc();
    store
        .create_site(
            NewSite {
                name: site.into(),
                primary: Hostname::parse(primary).unwrap(),
                hostnames: vec![],
                policy: SitePolicy::default(),
            },
            now,
            now,
        )
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_nodes_commit_wakes_this_nodes_watches_through_notify() {
    let database = shared_cluster().database().unwrap();
    // The reconciliation poll is off (an hour): only a notification can wake node 2.
    let one = store(&database.url(), "node-1", Duration::from_secs(3600));
    let two = store(&database.url(), "node-2", Duration::from_secs(3600));
    let mut sites = two.sites_changed();
    let mut certificates = two.certificates_changed();
    // Node 2's listener may start before or after this first change; either way it wakes.
    create(&one, "first", "first.test");
    tokio::time::timeout(PATIENCE, sites.changed())
        .await
        .expect("node 2 learns of node 1's first change")
        .unwrap();
    sites.borrow_and_update();
    certificates.borrow_and_update();

    let changed_at = Instant::now();
    create(&one, "second", "second.test");
    tokio::time::timeout(PATIENCE, sites.changed())
        .await
        .expect("node 2 is notified of node 1's commit")
        .unwrap();
    tokio::time::timeout(PATIENCE, certificates.changed())
        .await
        .expect("SDS's watch wakes too")
        .unwrap();
    eprintln!("notification reached node 2 in {:?}", changed_at.elapsed());
    let latest = two.latest_change_seq().unwrap();
    assert_eq!(
        two.site_changes_since(latest - 1, 10).unwrap().sites,
        ["second"]
    );
}

#[test]
fn two_nodes_compact_the_change_log_at_once_and_a_reader_behind_it_reloads() {
    let database = shared_cluster().database().unwrap();
    let one = store(&database.url(), "node-1", Duration::from_secs(3600));
    let two = store(&database.url(), "node-2", Duration::from_secs(3600));
    for (index, site) in ["a", "b", "c", "d", "e", "f"].iter().enumerate() {
        let node: &dyn Store = if index % 2 == 0 { &one } else { &two };
        create(node, site, &format!("{site}.test"));
    }
    let latest = one.latest_change_seq().unwrap();
    assert!(latest >= 6, "latest {latest}");
    // Young rows are kept whatever their number.
    let now = OffsetDateTime::now_utc();
    assert_eq!(
        one.compact_site_changes(1, SITE_CHANGES_KEEP_SECS, now)
            .unwrap(),
        0
    );
    assert!(two.site_changes_since(0, 100).unwrap().complete);
    // Both nodes compact at once (from a minute on, every row but the newest is old): each
    // call succeeds and together they delete each row once.
    let later = now + time::Duration::minutes(1);
    let barrier = std::sync::Barrier::new(2);
    let (by_one, by_two) = std::thread::scope(|scope| {
        let first = scope.spawn(|| {
            barrier.wait();
            one.compact_site_changes(1, 0, later)
        });
        let second = scope.spawn(|| {
            barrier.wait();
            two.compact_site_changes(1, 0, later)
        });
        (
            first.join().unwrap().unwrap(),
            second.join().unwrap().unwrap(),
        )
    });
    let deleted = by_one + by_two;
    // The loser of the lock may have skipped (0) or run after the winner (nothing left).
    assert_eq!(
        deleted,
        usize::try_from(latest - 1).unwrap(),
        "{by_one} + {by_two}"
    );
    assert_eq!(one.compact_site_changes(1, 0, later).unwrap(), 0);
    assert_eq!(two.latest_change_seq().unwrap(), latest);
    // A reader whose position was compacted away is told to reload; one just before the
    // oldest kept row is not.
    assert!(!two.site_changes_since(0, 100).unwrap().complete);
    let edge = two.site_changes_since(latest - 1, 100).unwrap();
    assert!(edge.complete);
    assert_eq!(
        (edge.sites.as_slice(), edge.last_seq),
        (["f".to_owned()].as_slice(), latest)
    );
    // New changes are logged after the compacted ones as usual.
    create(&one, "g", "g.test");
    let next = two.site_changes_since(latest, 100).unwrap();
    assert!(next.complete);
    assert_eq!(next.sites, ["g"]);
}

#[test]
fn a_write_takes_the_change_log_lock_only_as_it_commits_and_the_log_keeps_commit_order() {
    let database = shared_cluster().database().unwrap();
    let node = store(&database.url(), "node-1", Duration::from_secs(3600));
    node.ping().unwrap();
    // Another writer's transaction, left open after its change (a client between two
    // statements): it must not hold the lock that orders the change log, or every node's
    // writes would queue behind its round trips.
    let mut writer = postgres::Client::connect(&database.url(), postgres::NoTls).unwrap();
    let mut open = writer.transaction().unwrap();
    open.batch_execute(
        "INSERT INTO sites (name, primary_hostname, https_mode, redirect, hsts_enabled,
                            hsts_max_age, mixed_content, created_at)
         VALUES ('slow', 'slow.test', 'auto', 'permanent', FALSE, 0, 'off', 0)",
    )
    .unwrap();
    let pid: i32 = open
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0);
    let mut observer = postgres::Client::connect(&database.url(), postgres::NoTls).unwrap();
    let held: i64 = observer
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = $1",
            &[&pid],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        held, 0,
        "an open write transaction holds the change-log lock"
    );
    // So this node's change commits meanwhile, and the log lists it before the open one's,
    // which commits after it: a reader at any position never misses a change.
    create(&node, "quick", "quick.test");
    let before = node.latest_change_seq().unwrap();
    open.commit().unwrap();
    let changes = node.site_changes_since(0, 100).unwrap();
    assert!(changes.complete);
    assert_eq!(changes.sites, ["quick", "slow"]);
    assert_eq!(
        node.site_changes_since(before, 100).unwrap().sites,
        ["slow"]
    );
}

#[test]
fn both_backends_reach_the_same_schema_version_and_nodes_migrate_once() {
    let database = shared_cluster().database().unwrap();
    // Two nodes starting together: the migration runs under a lock, once.
    let nodes: Vec<PostgresStore> = std::thread::scope(|scope| {
        let starting: Vec<_> = ["node-1", "node-2", "node-3"]
            .map(|node| {
                let url = database.url();
                scope.spawn(move || {
                    let store = store(&url, node, Duration::from_secs(5));
                    store.ping().unwrap();
                    store
                })
            })
            .into_iter()
            .collect();
        starting.into_iter().map(|s| s.join().unwrap()).collect()
    });
    let sqlite = SqliteStore::in_memory().unwrap();
    assert_eq!(sqlite.schema_version().unwrap(), SCHEMA_VERSION);
    for node in &nodes {
        assert_eq!(node.schema_version().unwrap(), SCHEMA_VERSION);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_answers_503_while_the_database_is_down_and_recovers() {
    let mut cluster = PgCluster::start().unwrap();
    let database_url = {
        let database = cluster.database().unwrap();
        let url = database.url();
        std::mem::forget(database); // the cluster goes with the test; keep its database
        url
    };
    let data = tempfile::tempdir().unwrap();
    let mut config = Config {
        data_dir: data.path().join("data"),
        ..Config::default()
    };
    config.store.url = Some(database_url.clone());
    config.store.node_id = Some("edge-1".into());
    config.listen.admin = "127.0.0.1:0".parse().unwrap();
    config.listen.internal = "127.0.0.1:0".parse().unwrap();
    config.listen.metrics = "127.0.0.1:0".parse().unwrap();
    config.admin.token = Some(TOKEN.into());
    config.acme.directory_url = "https://127.0.0.1:9/dir".into();
    config.acme.debounce_ms = 3_600_000;
    config.dns.nameservers = vec!["127.0.0.1:9".parse().unwrap()];
    let running = Sidecar::build(config, Arc::new(SystemClock))
        .unwrap()
        .serve(axum::Router::new())
        .await
        .unwrap();
    let admin = Admin::new(&format!("http://{}", running.admin_addr));
    let (code, body) = admin
        .call(
            Method::POST,
            "/v1/sites",
            Some(serde_json::json!({"name": "blog", "primary": "blog.test"})),
        )
        .await
        .unwrap();
    assert_eq!(code, 201, "{body}");

    cluster.stop().unwrap();
    let (code, body) = admin.call(Method::GET, "/v1/sites", None).await.unwrap();
    assert_eq!(code, 503, "{body}");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("PostgreSQL database is unavailable") && error.contains("store.url"),
        "{error}"
    );
    assert!(
        !error.contains(&database_url),
        "the URL is not echoed: {error}"
    );

    cluster.restart().unwrap();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (code, body) = admin.call(Method::GET, "/v1/sites", None).await.unwrap();
        if code == 200 {
            assert_eq!(body.as_array().map(Vec::len), Some(1), "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still {code} after the restart: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn a_node_started_while_the_database_is_down_waits_for_it() {
    let mut cluster = PgCluster::start().unwrap();
    let url = {
        let database = cluster.database().unwrap();
        let url = database.url();
        std::mem::forget(database);
        url
    };
    cluster.stop().unwrap();
    let mut config = Config::default();
    config.store.url = Some(url);
    let starting = std::thread::spawn(move || open_store(&config));
    // It neither fails nor exits while the database is down...
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !starting.is_finished(),
        "gave up while the database was down"
    );
    // ...and is up once the database answers.
    cluster.restart().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !starting.is_finished() {
        assert!(
            Instant::now() < deadline,
            "did not start after the database returned"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let store = starting.join().unwrap().expect("the store opens");
    assert!(store.list_sites().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_and_calls_recover_after_the_database_restarts() {
    let mut cluster = PgCluster::start().unwrap();
    let url = {
        let database = cluster.database().unwrap();
        let url = database.url();
        std::mem::forget(database);
        url
    };
    let one = store(&url, "node-1", Duration::from_secs(3600));
    let two = store(&url, "node-2", Duration::from_secs(3600));
    // Watch before the change: node 2's listener may hear it (or find it at connect) before
    // this line would otherwise run, and a watch subscribed after a bump never sees that bump.
    let mut sites = two.sites_changed();
    create(&one, "before", "before.test");
    tokio::time::timeout(PATIENCE, sites.changed())
        .await
        .expect("node 2 learns of the first change")
        .unwrap();

    cluster.stop().unwrap();
    let error = two.list_sites().unwrap_err();
    assert!(error.is_store_unavailable(), "{error}");
    cluster.restart().unwrap();
    // The first call after the restart finds its old connection dead and makes a new one.
    assert_eq!(two.list_sites().unwrap().len(), 1);
    sites.borrow_and_update();
    create(&one, "after", "after.test");
    tokio::time::timeout(PATIENCE, sites.changed())
        .await
        .expect("node 2's listener reconnected and hears node 1 again")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http01_token_is_answered_by_a_node_that_did_not_place_the_order() {
    let database = shared_cluster().database().unwrap();
    let one: Arc<dyn Store> = Arc::new(store(&database.url(), "node-1", Duration::from_secs(5)));
    let two: Arc<dyn Store> = Arc::new(store(&database.url(), "node-2", Duration::from_secs(5)));
    let ordering = ChallengeResponder::shared_through(one);
    let answering = ChallengeResponder::shared_through(two);
    ordering.insert("tok-123", "tok-123.thumbprint");
    assert!(answering.is_empty(), "node 2 holds nothing in memory");

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let server =
        tokio::spawn(async move { axum::serve(listener, internal_router(answering)).await });
    let client = reqwest::Client::new();
    let url = |token: &str| format!("http://{address}/.well-known/acme-challenge/{token}");
    let answer = client.get(url("tok-123")).send().await.unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.text().await.unwrap(), "tok-123.thumbprint");
    ordering.remove("tok-123");
    let gone = client.get(url("tok-123")).send().await.unwrap();
    assert_eq!(gone.status(), 404);
    server.abort();
}

/// `autohttps store copy`, the real binary: a single node's SQLite store lands in PostgreSQL
/// whole (sites, names, policies, certificates and keys, orders, the account, history,
/// findings); a non-empty target is refused without `--force`.
#[test]
fn store_copy_moves_a_single_node_into_postgres_and_refuses_a_non_empty_target() {
    use autohttps_sidecar::store::{NewCertificate, PrivateKeyPem};
    let database = shared_cluster().database().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("autohttps.db");
    let now = OffsetDateTime::from_unix_timestamp(1_780_000_000).unwrap();
    {
        let sqlite = SqliteStore::open(&path).unwrap();
        sqlite
            .create_site(
                NewSite {
                    name: "blog".into(),
                    primary: Hostname::parse("example.com").unwrap(),
                    hostnames: vec![Hostname::parse("www.example.com").unwrap()],
                    policy: SitePolicy {
                        https: autohttps_sidecar::store::HttpsMode::Force,
                        ..SitePolicy::default()
                    },
                },
                now,
                now,
            )
            .unwrap();
        create(&sqlite, "shop", "shop.test");
        for serial in ["01", "02"] {
            sqlite
                .store_certificate(
                    NewCertificate {
                        site: "blog".into(),
                        names: vec![
                            Hostname::parse("example.com").unwrap(),
                            Hostname::parse("www.example.com").unwrap(),
                        ],
                        chain_pem: format!("chain {serial}"),
                        key_pem: PrivateKeyPem::new(format!("key {serial}")),
                        not_before: now,
                        not_after: now + time::Duration::days(90),
                        serial: serial.into(),
                        ari_id: None,
                    },
                    None,
                    now,
                )
                .unwrap();
        }
        sqlite
            .insert_order(
                "shop",
                &[Hostname::parse("shop.test").unwrap()],
                "https://ca.test/order/9",
                &PrivateKeyPem::new("order key".into()),
                now,
            )
            .unwrap();
        sqlite
            .save_account("https://ca.test/dir", "{\"id\":\"acct\"}", now)
            .unwrap();
        sqlite
            .record_mixed_content(
                "blog",
                "https://example.com/",
                "http://cdn.test/a.png",
                "img-src",
                now,
                10_000,
            )
            .unwrap();
    }
    let copy = |force: bool| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_autohttps"));
        command
            .args(["store", "copy", "--from"])
            .arg(format!("sqlite:{}", path.display()))
            .args(["--to", &database.url()]);
        if force {
            command.arg("--force");
        }
        command.output().unwrap()
    };
    let copied = copy(false);
    assert!(copied.status.success(), "{copied:?}");
    let printed = String::from_utf8_lossy(&copied.stdout);
    assert!(printed.contains("sites: 2 row(s) copied"), "{printed}");

    let sqlite = SqliteStore::open(&path).unwrap();
    let postgres = store(&database.url(), "edge-1", Duration::from_secs(5));
    assert_eq!(postgres.list_sites().unwrap(), sqlite.list_sites().unwrap());
    assert_eq!(
        postgres.current_certificates("blog").unwrap(),
        sqlite.current_certificates("blog").unwrap()
    );
    assert_eq!(
        postgres.current_certificates("blog").unwrap()[0]
            .key_pem
            .expose(),
        "key 02"
    );
    assert_eq!(
        postgres.orders_in_flight(None).unwrap(),
        sqlite.orders_in_flight(None).unwrap()
    );
    assert_eq!(
        postgres.account("https://ca.test/dir").unwrap(),
        sqlite.account("https://ca.test/dir").unwrap()
    );
    for site in ["blog", "shop"] {
        assert_eq!(
            postgres.events(site, 100).unwrap(),
            sqlite.events(site, 100).unwrap()
        );
    }
    assert_eq!(
        postgres.mixed_content("blog").unwrap(),
        sqlite.mixed_content("blog").unwrap()
    );
    // New rows continue after the copied ids.
    let copied_order = sqlite.orders_in_flight(None).unwrap()[0].id;
    let next_order = postgres
        .insert_order(
            "shop",
            &[],
            "https://ca.test/order/10",
            &PrivateKeyPem::new("k".into()),
            now,
        )
        .unwrap();
    assert!(next_order > copied_order);

    let refused = copy(false);
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.contains("not empty") && said.contains("--force"),
        "{said}"
    );
    let replaced = copy(true);
    assert!(replaced.status.success(), "{replaced:?}");
    assert_eq!(postgres.orders_in_flight(None).unwrap().len(), 1);
}
