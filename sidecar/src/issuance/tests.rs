//! The issuer's attempt logic, fast, against a real SQLite store and fakes of its two outside
//! parties. The fakes are mocks of what a real CA or DNS cannot be made to do on demand: refuse
//! an order with a chosen problem (rate limit, rejected name), fail a challenge, hang between
//! "order placed" and "certificate issued" until the process is killed, and answer DNS as the
//! test says. The fake CA records each order in the store exactly as the real client does and
//! issues real X.509 certificates (self-signed with the order's key, parsed by the same code as
//! a CA's). The Pebble suites test the real ACME path.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rcgen::{CertificateParams, KeyPair, SerialNumber};
use time::OffsetDateTime;
use time::macros::datetime;

use super::{ATTEMPT_LEASE, CertificateAuthority, Issuer, NameCheck, Pending};
use crate::acme::IssuedChain;
use crate::acme::certificate::generate_key;
use crate::clock::{Clock, ManualClock};
use crate::config::{AcmeConfig, PlatformConfig};
use crate::dns_check::DnsAnswer;
use crate::error::{Error, Result};
use crate::hooks::Hooks;
use crate::hostname::Hostname;
use crate::http01::ChallengeResponder;
use crate::store::{
    AttemptLease, NewSite, OrderInFlight, SiteEventKind, SitePolicy, SqliteStore, Store,
};

const NOW: OffsetDateTime = datetime!(2026-03-01 00:00 UTC);

/// What the fake CA does with the next orders.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Behaviour {
    /// Orders are placed, validated and issued.
    Issue,
    /// New orders are refused with this problem type (and Retry-After).
    Refuse(&'static str, Option<OffsetDateTime>),
    /// Orders are placed, but their challenge fails: the CA marks them invalid.
    FailChallenge,
    /// Orders are placed and then never finish (the process dies meanwhile).
    Hang,
}

/// A CA that does on demand what a real one cannot be made to (see the module comment).
#[derive(Debug)]
struct FakeCa {
    behaviour: Mutex<Behaviour>,
    placed: Mutex<Vec<String>>,
    driven: Mutex<Vec<String>>,
    serial: AtomicU64,
}

impl FakeCa {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            behaviour: Mutex::new(Behaviour::Issue),
            placed: Mutex::default(),
            driven: Mutex::default(),
            serial: AtomicU64::new(1),
        })
    }

    fn set(&self, behaviour: Behaviour) {
        *self.behaviour.lock().unwrap() = behaviour;
    }

    fn behaviour(&self) -> Behaviour {
        self.behaviour.lock().unwrap().clone()
    }

    /// Order URLs placed, in order.
    fn placed(&self) -> Vec<String> {
        self.placed.lock().unwrap().clone()
    }

    /// Order URLs driven towards a certificate (placed or resumed), in order.
    fn driven(&self) -> Vec<String> {
        self.driven.lock().unwrap().clone()
    }

    /// A real certificate for the order's names, signed with the order's key.
    fn certify(&self, row: &OrderInFlight, now: OffsetDateTime) -> Result<String> {
        let key = KeyPair::from_pem(row.key_pem.expose())
            .map_err(|e| Error::Certificate(format!("fake CA: order key: {e}")))?;
        let mut params = CertificateParams::new(
            row.names
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
        )
        .map_err(|e| Error::Certificate(format!("fake CA: {e}")))?;
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(90);
        params.serial_number = Some(SerialNumber::from(
            self.serial.fetch_add(1, Ordering::SeqCst),
        ));
        let certificate = params
            .self_signed(&key)
            .map_err(|e| Error::Certificate(format!("fake CA: {e}")))?;
        Ok(certificate.pem())
    }
}

fn problem(kind: &str, retry_after: Option<OffsetDateTime>) -> Error {
    Error::Acme {
        problem_type: Some(format!("urn:ietf:params:acme:error:{kind}")),
        detail: format!("the CA said {kind}"),
        retry_after,
    }
}

impl CertificateAuthority for FakeCa {
    fn create_order<'a>(
        &'a self,
        store: &'a dyn Store,
        site: &'a str,
        names: &'a [Hostname],
        now: OffsetDateTime,
    ) -> Pending<'a, Result<OrderInFlight>> {
        Box::pin(async move {
            if let Behaviour::Refuse(kind, retry_after) = self.behaviour() {
                return Err(problem(kind, retry_after));
            }
            let url = {
                let mut placed = self.placed.lock().unwrap();
                let url = format!("https://fake-ca.test/order/{}", placed.len() + 1);
                placed.push(url.clone());
                url
            };
            let key = generate_key()?;
            let id = store.insert_order(site, names, &url, &key, now)?;
            Ok(OrderInFlight {
                id,
                site: site.to_owned(),
                names: names.to_vec(),
                order_url: url,
                key_pem: key,
                created_at: now,
            })
        })
    }

    fn complete_order<'a>(
        &'a self,
        store: &'a dyn Store,
        _responder: &'a ChallengeResponder,
        row: &'a OrderInFlight,
    ) -> Pending<'a, Result<IssuedChain>> {
        Box::pin(async move {
            self.driven.lock().unwrap().push(row.order_url.clone());
            match self.behaviour() {
                Behaviour::Hang => std::future::pending().await,
                Behaviour::FailChallenge => {
                    store.delete_order(row.id)?;
                    Err(problem("connection", None))
                }
                Behaviour::Issue | Behaviour::Refuse(..) => Ok(IssuedChain {
                    order_id: row.id,
                    names: row.names.clone(),
                    chain_pem: self.certify(row, row.created_at)?,
                    key_pem: row.key_pem.clone(),
                }),
            }
        })
    }

    fn renewal_window<'a>(
        &'a self,
        _ari_id: &'a str,
    ) -> Pending<'a, Option<(OffsetDateTime, OffsetDateTime)>> {
        Box::pin(async { None })
    }
}

/// DNS that points the names it was told at the platform and no others.
#[derive(Debug)]
struct FakeDns {
    pointing: Mutex<HashSet<String>>,
    platform: PlatformConfig,
}

impl FakeDns {
    fn pointing(names: &[&str]) -> Arc<Self> {
        Arc::new(Self {
            pointing: Mutex::new(names.iter().map(|n| (*n).to_owned()).collect()),
            platform: PlatformConfig {
                addresses: vec!["192.0.2.10".parse().unwrap()],
                cname_target: None,
            },
        })
    }
}

impl NameCheck for FakeDns {
    fn check<'a>(&'a self, name: &'a Hostname) -> Pending<'a, DnsAnswer> {
        Box::pin(async move {
            let points_here = self.pointing.lock().unwrap().contains(name.as_str());
            DnsAnswer {
                name: name.clone(),
                addresses: vec![if points_here {
                    "192.0.2.10".parse().unwrap()
                } else {
                    "198.51.100.7".parse().unwrap()
                }],
                cnames: Vec::new(),
                points_here,
                problem: (!points_here)
                    .then(|| format!("{name} resolves to 198.51.100.7, not the platform")),
            }
        })
    }

    fn platform(&self) -> &PlatformConfig {
        &self.platform
    }
}

/// One test's world: a SQLite file (nodes are handles on it), a stopped clock, the fakes.
struct World {
    dir: tempfile::TempDir,
    clock: Arc<ManualClock>,
    ca: Arc<FakeCa>,
    dns: Arc<FakeDns>,
}

impl World {
    fn new(pointing: &[&str]) -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            clock: Arc::new(ManualClock::new(NOW)),
            ca: FakeCa::new(),
            dns: FakeDns::pointing(pointing),
        }
    }

    fn store(&self, node: &str) -> Arc<dyn Store> {
        Arc::new(SqliteStore::open_as_node(&self.dir.path().join("autohttps.db"), node).unwrap())
    }

    /// An issuer running as `node` (a new one is a restarted process).
    fn issuer(&self, node: &str) -> Arc<Issuer> {
        let store = self.store(node);
        Issuer::with_seams(
            Arc::clone(&store),
            Arc::clone(&self.clock) as Arc<dyn Clock>,
            AcmeConfig::default(),
            Arc::clone(&self.dns) as Arc<dyn NameCheck>,
            Some(Arc::clone(&self.ca) as Arc<dyn CertificateAuthority>),
            ChallengeResponder::shared_through(store),
            Hooks::default(),
        )
    }

    fn create(&self, store: &dyn Store, site: &str, names: &[&str]) {
        store
            .create_site(
                NewSite {
                    name: site.into(),
                    primary: Hostname::parse(names[0]).unwrap(),
                    hostnames: names[1..]
                        .iter()
                        .map(|n| Hostname::parse(n).unwrap())
                        .collect(),
                    policy: SitePolicy::default(),
                },
                NOW,
                NOW,
            )
            .unwrap();
    }
}

fn kinds(store: &dyn Store, site: &str) -> Vec<String> {
    let mut kinds: Vec<String> = store
        .events(site, 100)
        .unwrap()
        .into_iter()
        .map(|e| e.kind.to_string())
        .collect();
    kinds.reverse();
    kinds
}

fn served_names(store: &dyn Store, site: &str) -> Vec<Vec<String>> {
    store
        .current_certificates(site)
        .unwrap()
        .iter()
        .map(|c| c.names.iter().map(ToString::to_string).collect())
        .collect()
}

#[tokio::test]
async fn names_pointing_here_get_one_order_and_a_certificate_and_the_lease_is_released() {
    let world = World::new(&["example.com", "www.example.com"]);
    let issuer = world.issuer("node-1");
    let store = issuer.store().as_ref();
    world.create(store, "blog", &["example.com", "www.example.com"]);

    let report = issuer.attempt("blog").await.unwrap();
    assert_eq!(report.failure, None);
    assert!(report.dns_failures.is_empty());
    assert_eq!(report.issued.len(), 1);
    assert_eq!(world.ca.placed().len(), 1);
    assert_eq!(
        served_names(store, "blog"),
        [["example.com", "www.example.com"]]
    );
    assert!(store.orders_in_flight(None).unwrap().is_empty());
    assert_eq!(
        kinds(store, "blog"),
        [
            "site-created",
            "attempt-started",
            "order-created",
            "certificate-issued"
        ]
    );
    let site = store.site("blog").unwrap().unwrap();
    assert_eq!(site.issuance.failures, 0);
    // Next is the renewal, weeks away; the lease is gone (another node could take the site).
    let next = site.issuance.next_attempt_at.unwrap();
    assert!(next > NOW + time::Duration::days(30), "{next}");
    let other = world.store("node-2");
    assert!(matches!(
        other
            .begin_attempt("blog", NOW, NOW + ATTEMPT_LEASE)
            .unwrap(),
        AttemptLease::Taken(_)
    ));
    other
        .finish_attempt("blog", NOW + ATTEMPT_LEASE, Some(next), 0, None)
        .unwrap();
    // A second attempt now finds nothing to order.
    assert!(issuer.attempt("blog").await.unwrap().issued.is_empty());
    assert_eq!(world.ca.placed().len(), 1);
}

#[tokio::test]
async fn a_ca_refusal_is_recorded_with_its_reason_and_its_retry_after_is_kept() {
    let world = World::new(&["limited.example", "bad.example"]);
    let issuer = world.issuer("node-1");
    let store = issuer.store().as_ref();
    world.create(store, "limited", &["limited.example"]);
    world.create(store, "bad", &["bad.example"]);

    let come_back = NOW + time::Duration::hours(3);
    world
        .ca
        .set(Behaviour::Refuse("rateLimited", Some(come_back)));
    let report = issuer.attempt("limited").await.unwrap();
    assert!(report.failure.unwrap().contains("rateLimited"));
    world.ca.set(Behaviour::Refuse("rejectedIdentifier", None));
    let report = issuer.attempt("bad").await.unwrap();
    assert!(report.failure.unwrap().contains("rejectedIdentifier"));

    assert!(world.ca.placed().is_empty());
    for site in ["limited", "bad"] {
        assert!(served_names(store, site).is_empty());
        let failed = &store.events(site, 1).unwrap()[0];
        assert_eq!(failed.kind, SiteEventKind::AttemptFailed);
        let schedule = store.site(site).unwrap().unwrap().issuance;
        assert_eq!(schedule.failures, 1);
        assert!(schedule.last_problem.is_some());
    }
    let limited = store.site("limited").unwrap().unwrap().issuance;
    assert_eq!(limited.next_attempt_at, Some(come_back), "Retry-After wins");
    let bad = store.site("bad").unwrap().unwrap().issuance;
    // The first retry is a minute away (plus jitter), never sooner.
    let retry = bad.next_attempt_at.unwrap();
    assert!(retry >= NOW + time::Duration::minutes(1), "{retry}");
    assert!(retry < NOW + time::Duration::minutes(2), "{retry}");
    let counts = store.counts().unwrap();
    assert_eq!(
        counts.failures_by_reason,
        [
            ("acme:rateLimited".to_owned(), 1),
            ("acme:rejectedIdentifier".to_owned(), 1)
        ]
    );
    assert_eq!(counts.attempts, 2);
}

#[tokio::test]
async fn a_failed_challenge_drops_the_dead_order_and_the_retry_places_a_new_one() {
    let world = World::new(&["shop.example"]);
    let issuer = world.issuer("node-1");
    let store = issuer.store().as_ref();
    world.create(store, "shop", &["shop.example"]);

    world.ca.set(Behaviour::FailChallenge);
    let report = issuer.attempt("shop").await.unwrap();
    assert!(report.failure.unwrap().contains("connection"));
    assert!(
        store.orders_in_flight(None).unwrap().is_empty(),
        "the dead order is forgotten"
    );
    let failed = &store.events("shop", 1).unwrap()[0];
    assert_eq!(failed.kind, SiteEventKind::AttemptFailed);
    assert_eq!(failed.reason.as_deref(), Some("acme:connection"));
    assert_eq!(store.site("shop").unwrap().unwrap().issuance.failures, 1);

    // The retry (when due) places a new order: a dead one is never resumed.
    world.ca.set(Behaviour::Issue);
    world.clock.advance(Duration::from_secs(180));
    let report = issuer.attempt("shop").await.unwrap();
    assert_eq!(report.issued.len(), 1);
    assert_eq!(world.ca.placed().len(), 2);
    assert_eq!(world.ca.driven(), world.ca.placed());
    assert_eq!(store.site("shop").unwrap().unwrap().issuance.failures, 0);
}

#[tokio::test]
async fn names_whose_dns_does_not_point_here_are_left_out_of_the_order() {
    let world = World::new(&["example.com"]);
    let issuer = world.issuer("node-1");
    let store = issuer.store().as_ref();
    world.create(store, "blog", &["example.com", "www.example.com"]);
    world.create(store, "away", &["away.example"]);

    let report = issuer.attempt("blog").await.unwrap();
    assert_eq!(report.failure, None);
    assert_eq!(
        report
            .dns_failures
            .iter()
            .map(|(name, _)| name.to_string())
            .collect::<Vec<_>>(),
        ["www.example.com"]
    );
    assert_eq!(served_names(store, "blog"), [["example.com"]]);
    let left_out = store
        .events("blog", 10)
        .unwrap()
        .into_iter()
        .find(|e| e.kind == SiteEventKind::DnsNotPointing)
        .unwrap();
    assert_eq!(left_out.reason.as_deref(), Some("dns"));
    assert!(
        left_out.message.contains("www.example.com"),
        "{}",
        left_out.message
    );
    // A name left out counts as a failure, so it is retried soon.
    let blog = store.site("blog").unwrap().unwrap().issuance;
    assert_eq!(blog.failures, 1);
    assert!(blog.next_attempt_at.unwrap() < NOW + time::Duration::minutes(2));

    // No name points here: no order at all.
    let report = issuer.attempt("away").await.unwrap();
    assert!(report.issued.is_empty());
    assert_eq!(world.ca.placed().len(), 1);
    assert_eq!(
        store.events("away", 1).unwrap()[0].message,
        "no hostname of the site points at the platform"
    );
}

#[tokio::test]
async fn a_site_leased_by_a_live_other_node_is_left_alone() {
    let world = World::new(&["example.com"]);
    let other = world.store("node-2");
    world.create(other.as_ref(), "blog", &["example.com"]);
    assert!(matches!(
        other
            .begin_attempt("blog", NOW, NOW + ATTEMPT_LEASE)
            .unwrap(),
        AttemptLease::Taken(_)
    ));

    let issuer = world.issuer("node-1");
    // Neither the scheduler's release at start nor an attempt touches node-2's lease.
    issuer.release_stale_leases().unwrap();
    let report = issuer.attempt("blog").await.unwrap();
    assert_eq!(report, super::AttemptReport::default());
    assert!(world.ca.placed().is_empty() && world.ca.driven().is_empty());
    assert_eq!(kinds(other.as_ref(), "blog"), ["site-created"]);
    assert!(issuer.store().due_sites(NOW).unwrap().is_empty());
}

#[tokio::test]
async fn an_expired_lease_resumes_the_other_nodes_order_not_a_new_one() {
    let world = World::new(&["example.com"]);
    let other = world.store("node-2");
    world.create(other.as_ref(), "blog", &["example.com"]);
    // node-2 placed an order and died; its lease ran out at NOW.
    let earlier = NOW - ATTEMPT_LEASE;
    assert!(matches!(
        other.begin_attempt("blog", earlier, NOW).unwrap(),
        AttemptLease::Taken(_)
    ));
    let placed = world
        .ca
        .create_order(
            other.as_ref(),
            "blog",
            &[Hostname::parse("example.com").unwrap()],
            earlier,
        )
        .await
        .unwrap();

    let issuer = world.issuer("node-1");
    assert_eq!(issuer.store().due_sites(NOW).unwrap(), ["blog"]);
    let report = issuer.attempt("blog").await.unwrap();
    assert_eq!(report.issued.len(), 1);
    assert_eq!(
        world.ca.placed(),
        std::slice::from_ref(&placed.order_url),
        "no new order"
    );
    assert_eq!(world.ca.driven(), [placed.order_url]);
    assert!(issuer.store().orders_in_flight(None).unwrap().is_empty());
    assert_eq!(
        served_names(issuer.store().as_ref(), "blog"),
        [["example.com"]]
    );
    assert!(kinds(issuer.store().as_ref(), "blog").contains(&"order-resumed".to_owned()));
}

/// Runs an attempt until the fake CA hangs in it, then drops it: the process died between
/// "order placed" and "certificate stored".
async fn die_mid_order(issuer: Arc<Issuer>, ca: &FakeCa) {
    ca.set(Behaviour::Hang);
    let attempt = tokio::spawn(async move { issuer.attempt("blog").await });
    while ca.driven().is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    attempt.abort();
    assert!(attempt.await.unwrap_err().is_cancelled());
    ca.set(Behaviour::Issue);
}

#[tokio::test]
async fn a_crash_between_order_placed_and_certificate_stored_resumes_the_same_order() {
    let world = World::new(&["example.com"]);
    let first = world.issuer("node-1");
    world.create(first.store().as_ref(), "blog", &["example.com"]);
    die_mid_order(first, &world.ca).await;
    let placed = world.ca.placed();
    assert_eq!(placed.len(), 1);

    // The restarted process (same node id) releases its dead run's lease at once...
    let restarted = world.issuer("node-1");
    let store = restarted.store().as_ref();
    assert!(store.due_sites(NOW).unwrap().is_empty(), "still leased");
    restarted.release_stale_leases().unwrap();
    assert_eq!(store.due_sites(NOW).unwrap(), ["blog"]);
    // ...and finishes the order it had placed: one order in all, the same URL.
    let report = restarted.attempt("blog").await.unwrap();
    assert_eq!(report.issued.len(), 1);
    assert_eq!(world.ca.placed(), placed);
    assert_eq!(world.ca.driven(), [placed[0].clone(), placed[0].clone()]);
    assert_eq!(served_names(store, "blog"), [["example.com"]]);
    let kinds = kinds(store, "blog");
    assert_eq!(
        kinds,
        [
            "site-created",
            "attempt-started",
            "order-created",
            "attempt-interrupted",
            "attempt-started",
            "order-resumed",
            "certificate-issued"
        ]
    );
}

#[tokio::test]
async fn a_node_restarted_under_another_id_resumes_its_dead_order_when_the_lease_runs_out() {
    let world = World::new(&["example.com"]);
    let first = world.issuer("pod-a1b2");
    world.create(first.store().as_ref(), "blog", &["example.com"]);
    die_mid_order(first, &world.ca).await;

    // The new process has another id: the dead lease is not its own, so it waits for it to run
    // out (the lease is short because live nodes renew it), never taking it early.
    let restarted = world.issuer("pod-c3d4");
    restarted.release_stale_leases().unwrap();
    assert!(restarted.store().due_sites(NOW).unwrap().is_empty());
    assert_eq!(restarted.attempt("blog").await.unwrap().issued.len(), 0);
    assert_eq!(world.ca.driven().len(), 1);
    let runs_out = restarted.store().next_due().unwrap().unwrap();
    assert_eq!(runs_out, NOW + ATTEMPT_LEASE);

    world.clock.set(runs_out);
    assert_eq!(restarted.store().due_sites(runs_out).unwrap(), ["blog"]);
    let report = restarted.attempt("blog").await.unwrap();
    assert_eq!(report.issued.len(), 1);
    assert_eq!(world.ca.placed().len(), 1, "the same order, resumed");
    assert_eq!(
        served_names(restarted.store().as_ref(), "blog"),
        [["example.com"]]
    );
}
