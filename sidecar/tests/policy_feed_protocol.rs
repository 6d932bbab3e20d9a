//! The policy feed's update protocol (snapshots, deltas, long poll) over real HTTP on loopback,
//! from a real SQLite file: a delta carries just what changed, a client the history cannot
//! serve gets a snapshot, a held request returns with a change committed meanwhile, and time
//! alone (a certificate expiring) makes a delta with no store write. The clock is a
//! `ManualClock` so that expiry is reached by moving it, not by waiting.

use std::sync::Arc;
use std::time::Duration;

use autohttps_filter::policy::{HttpsMode, Policy, PolicyDocument, Settings};
use autohttps_sidecar::clock::{Clock, ManualClock};
use autohttps_sidecar::csp_reports::ReportTokens;
use autohttps_sidecar::hostname::Hostname;
use autohttps_sidecar::policy_feed::{
    HISTORY_MAX_VERSIONS, KIND_DELTA, KIND_SNAPSHOT, POLICY_KIND_HEADER, POLICY_PATH, PolicyDelta,
    PolicyFeed,
};
use autohttps_sidecar::store::prelude::*;
use autohttps_sidecar::store::{
    HstsPolicy, NewCertificate, NewSite, PrivateKeyPem, SitePolicy, SqliteStore, Store,
};
use reqwest::StatusCode;
use reqwest::header::{ETAG, IF_NONE_MATCH};
use time::OffsetDateTime;
use time::macros::datetime;

const NOW: OffsetDateTime = datetime!(2026-03-01 00:00 UTC);

fn name(n: &str) -> Hostname {
    Hostname::parse(n).expect("valid hostname")
}

/// A feed over a store in a temporary SQLite file, served on loopback.
struct Served {
    store: Arc<SqliteStore>,
    clock: Arc<ManualClock>,
    feed: PolicyFeed,
    url: String,
    http: reqwest::Client,
    server: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// What one request got back.
#[derive(Debug)]
struct Reply {
    status: StatusCode,
    kind: Option<String>,
    etag: Option<String>,
    body: Vec<u8>,
}

impl Reply {
    fn snapshot(&self) -> PolicyDocument {
        assert_eq!(self.status, StatusCode::OK, "{self:?}");
        assert_eq!(self.kind.as_deref(), Some(KIND_SNAPSHOT));
        let document: PolicyDocument =
            serde_json::from_slice(&self.body).expect("a policy document");
        assert_eq!(self.etag, Some(format!("\"{}\"", document.version)));
        assert!(Policy::compile(&document).is_ok(), "the snapshot validates");
        document
    }

    fn delta(&self) -> PolicyDelta {
        assert_eq!(self.status, StatusCode::OK, "{self:?}");
        assert_eq!(self.kind.as_deref(), Some(KIND_DELTA), "{self:?}");
        let delta: PolicyDelta = serde_json::from_slice(&self.body).expect("a policy delta");
        assert_eq!(self.etag, Some(format!("\"{}\"", delta.version)));
        delta
    }
}

impl Served {
    async fn start(sites: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let store = Arc::new(SqliteStore::open(&dir.path().join("autohttps.db")).expect("store"));
        for site in sites {
            store
                .create_site(
                    NewSite {
                        name: (*site).into(),
                        primary: name(&format!("{site}.test")),
                        hostnames: vec![name(&format!("www.{site}.test"))],
                        policy: SitePolicy::default(),
                    },
                    NOW,
                    NOW,
                )
                .expect("site");
        }
        let clock = Arc::new(ManualClock::new(NOW));
        let feed = PolicyFeed::new(
            Arc::clone(&store) as Arc<dyn Store>,
            Arc::clone(&clock) as Arc<dyn Clock>,
            Settings::default(),
            ReportTokens::from_key(b"the feed protocol's test key"),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bound");
        let url = format!(
            "http://{}{POLICY_PATH}",
            listener.local_addr().expect("address")
        );
        let router = feed.clone().router();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("client");
        Served {
            store,
            clock,
            feed,
            url,
            http,
            server,
            _dir: dir,
        }
    }

    async fn get(&self, query: &str, if_none_match: Option<&str>) -> Reply {
        let mut request = self.http.get(format!("{}{query}", self.url));
        if let Some(tag) = if_none_match {
            request = request.header(IF_NONE_MATCH, format!("\"{tag}\""));
        }
        let response = request.send().await.expect("answered");
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let (status, kind, etag) = (
            response.status(),
            header(POLICY_KIND_HEADER),
            header(ETAG.as_str()),
        );
        let body = response.bytes().await.expect("a body").to_vec();
        Reply {
            status,
            kind,
            etag,
            body,
        }
    }

    async fn since(&self, version: &str) -> Reply {
        self.get(&format!("?since={version}&wait_ms=0"), None).await
    }

    fn force(&self, site: &str) {
        self.store
            .set_policy(
                site,
                SitePolicy {
                    https: HttpsMode::Force,
                    ..SitePolicy::default()
                },
            )
            .expect("policy set");
    }

    fn issue(&self, site: &str, not_after: OffsetDateTime) {
        self.store
            .store_certificate(
                NewCertificate {
                    site: site.into(),
                    names: vec![name(&format!("{site}.test"))],
                    chain_pem: format!("chain {site}"),
                    key_pem: PrivateKeyPem::new(format!("key {site}")),
                    not_before: NOW - time::Duration::days(1),
                    not_after,
                    serial: format!("{site}01"),
                    ari_id: None,
                },
                None,
                NOW,
            )
            .expect("stored");
    }
}

/// The `n` of a version `<epoch>-<n>`, checking its epoch.
fn version_number(version: &str, epoch: &str) -> u64 {
    let (of, n) = version.split_once('-').expect("<epoch>-<n>");
    assert_eq!(of, epoch, "{version} is of this feed's epoch");
    n.parse().expect("a number")
}

#[tokio::test]
async fn a_delta_after_one_change_carries_just_that_site_and_a_removal_in_remove() {
    let served = Served::start(&["alpha", "beta", "gamma"]).await;
    let first = served.get("", None).await.snapshot();
    assert_eq!(first.sites.len(), 3);
    let epoch = served.feed.epoch().to_string();
    assert_eq!(epoch.len(), 16);
    assert!(
        epoch
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    );

    served.force("beta");
    let delta = served.since(&first.version).await.delta();
    assert_eq!(delta.schema, 1);
    assert_eq!(delta.from, first.version);
    assert_eq!(delta.upsert.len(), 1, "{delta:?}");
    assert_eq!(delta.upsert[0].id, "beta");
    assert_eq!(delta.upsert[0].https, HttpsMode::Force);
    assert!(delta.remove.is_empty());

    served.store.delete_site("gamma").expect("deleted");
    let removal = served.since(&delta.version).await.delta();
    assert_eq!(removal.from, delta.version);
    assert!(removal.upsert.is_empty());
    assert_eq!(removal.remove, ["gamma"]);

    // From the first version, the two changes at once; each site once.
    let both = served.since(&first.version).await.delta();
    assert_eq!(both.version, removal.version);
    assert_eq!(
        both.upsert
            .iter()
            .map(|s| s.id.as_str())
            .collect::<Vec<_>>(),
        ["beta"]
    );
    assert_eq!(both.remove, ["gamma"]);

    // The snapshot of the same version says the same as applying the deltas.
    let now = served.get("", None).await.snapshot();
    assert_eq!(now.version, both.version);
    let ids: Vec<&str> = now.sites.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["alpha", "beta"]);
    assert_eq!(now.sites[1], both.upsert[0]);
    // The assembled snapshot is byte for byte what serde makes of the document.
    let again = served.get("", None).await;
    assert_eq!(
        again.body,
        serde_json::to_vec(&now).expect("serialised"),
        "the snapshot's bytes"
    );
}

#[tokio::test]
async fn a_client_of_another_epoch_or_older_than_the_history_gets_a_snapshot() {
    let served = Served::start(&["alpha", "beta"]).await;
    let first = served.get("", None).await.snapshot();
    let epoch = served.feed.epoch().to_string();

    // Another epoch (a restarted sidecar), or a version that is not of this form.
    let other = if epoch.starts_with('0') {
        "1000000000000000-1"
    } else {
        "0000000000000000-1"
    };
    served.force("alpha");
    let current = served.since(other).await.snapshot();
    assert_ne!(current.version, first.version);
    served.since("hand-written-v7").await.snapshot();

    // More changes than the history keeps: the first version is too old for a delta.
    for round in 0..HISTORY_MAX_VERSIONS {
        let https = if round % 2 == 0 {
            HttpsMode::Disable
        } else {
            HttpsMode::Force
        };
        served
            .store
            .set_policy(
                "beta",
                SitePolicy {
                    https,
                    ..SitePolicy::default()
                },
            )
            .expect("policy set");
        served.feed.refresh().expect("refreshed");
    }
    let latest = served.since(&first.version).await.snapshot();
    assert_eq!(
        version_number(&latest.version, &epoch),
        version_number(&first.version, &epoch) + 1 + HISTORY_MAX_VERSIONS as u64
    );
    // A recent version is still served a delta.
    let recent = format!("{epoch}-{}", version_number(&latest.version, &epoch) - 1000);
    let delta = served.since(&recent).await.delta();
    assert_eq!(delta.upsert.len(), 1);
    assert_eq!(delta.upsert[0].id, "beta");
}

#[tokio::test]
async fn a_held_request_returns_the_change_committed_meanwhile_or_304_after_wait_ms() {
    let served = Arc::new(Served::start(&["alpha", "beta"]).await);
    let first = served.get("", None).await.snapshot();

    // Nothing changes: 304 with the current version once wait_ms has passed.
    let quiet = served
        .get(&format!("?since={}&wait_ms=300", first.version), None)
        .await;
    assert_eq!(quiet.status, StatusCode::NOT_MODIFIED);
    assert_eq!(quiet.etag, Some(format!("\"{}\"", first.version)));
    assert!(quiet.body.is_empty());

    // A change committed while the request is held: it returns with that change (the client's
    // 60 s timeout bounds the wait; wait_ms is capped at 30 s).
    let asking = Arc::clone(&served);
    let since = first.version.clone();
    let held = tokio::spawn(async move {
        asking
            .get(&format!("?since={since}&wait_ms=600000"), None)
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    served.force("alpha");
    let reply = held.await.expect("the held request");
    let delta = reply.delta();
    assert_eq!(delta.from, first.version);
    assert_eq!(
        delta
            .upsert
            .iter()
            .map(|s| s.id.as_str())
            .collect::<Vec<_>>(),
        ["alpha"]
    );
}

#[tokio::test]
async fn if_none_match_of_the_current_version_is_304_and_versions_strictly_increase() {
    let served = Served::start(&["alpha", "beta"]).await;
    let epoch = served.feed.epoch().to_string();
    let first = served.get("", None).await.snapshot();
    // Even without `since` (a VM that rejected this version keeps none): never re-sent.
    let seen = served.get("", Some(&first.version)).await;
    assert_eq!(seen.status, StatusCode::NOT_MODIFIED);
    assert_eq!(seen.etag, Some(format!("\"{}\"", first.version)));
    let seen = served
        .get("?since=0000000000000000-3&wait_ms=0", Some(&first.version))
        .await;
    assert_eq!(seen.status, StatusCode::NOT_MODIFIED);

    let mut versions = vec![version_number(&first.version, &epoch)];
    let mut previous = first.version.clone();
    for site in ["alpha", "beta"] {
        served.force(site);
        let delta = served.since(&previous).await.delta();
        versions.push(version_number(&delta.version, &epoch));
        previous = delta.version;
    }
    served.store.delete_site("alpha").expect("deleted");
    let delta = served.since(&previous).await.delta();
    versions.push(version_number(&delta.version, &epoch));
    assert!(
        versions.windows(2).all(|pair| pair[0] < pair[1]),
        "{versions:?}"
    );
    // A write that changes no entry (scheduling) makes no version.
    served
        .store
        .schedule("beta", Some(NOW), 3, Some("dns"))
        .expect("scheduled");
    let unchanged = served.since(&delta.version).await;
    assert_eq!(unchanged.status, StatusCode::NOT_MODIFIED);

    let bad = served.get("?wait_ms=soon", None).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(
        String::from_utf8_lossy(&bad.body).contains("wait_ms must be a whole number"),
        "{bad:?}"
    );
}

#[tokio::test]
async fn an_expired_certificate_makes_a_delta_dropping_its_name_with_no_store_write() {
    let served = Served::start(&["alpha", "beta"]).await;
    served.issue("alpha", NOW + time::Duration::seconds(30));
    served.issue("beta", NOW + time::Duration::days(60));
    let first = served.get("", None).await.snapshot();
    assert_eq!(first.sites[0].cert_ready, ["alpha.test"]);
    assert_eq!(first.sites[1].cert_ready, ["beta.test"]);
    let log = served.store.latest_change_seq().expect("latest");

    served.clock.advance(Duration::from_secs(31));
    let delta = served.since(&first.version).await.delta();
    assert_eq!(delta.upsert.len(), 1, "only the expired site: {delta:?}");
    assert_eq!(delta.upsert[0].id, "alpha");
    assert!(delta.upsert[0].cert_ready.is_empty());
    assert_eq!(delta.upsert[0].hostnames, ["alpha.test", "www.alpha.test"]);
    assert_eq!(
        served.store.latest_change_seq().expect("latest"),
        log,
        "nothing was written"
    );
    let next = served.since(&delta.version).await;
    assert_eq!(next.status, StatusCode::NOT_MODIFIED);
}

/// A policy the admin API refuses but the store takes (a row written by another tool or an
/// older version): HSTS preload without includeSubDomains fails the filter's validation.
fn preload_without_subdomains() -> SitePolicy {
    SitePolicy {
        https: HttpsMode::Force,
        hsts: HstsPolicy {
            enabled: true,
            max_age: 300,
            include_subdomains: false,
            preload: true,
        },
        ..SitePolicy::default()
    }
}

#[tokio::test]
async fn a_site_that_fails_validation_keeps_its_previous_entry_and_the_others_flow() {
    let served = Served::start(&["alpha", "beta"]).await;
    let first = served.get("", None).await.snapshot();
    assert!(served.feed.rejected_sites().is_empty());

    served
        .store
        .set_policy("beta", preload_without_subdomains())
        .expect("the store takes it");
    served.force("alpha");
    served
        .store
        .create_site(
            NewSite {
                name: "gamma".into(),
                primary: name("gamma.test"),
                hostnames: Vec::new(),
                policy: preload_without_subdomains(),
            },
            NOW,
            NOW,
        )
        .expect("the store takes it");
    let delta = served.since(&first.version).await.delta();
    // alpha's change flows; beta keeps its previous entry (so it is not in the delta); gamma
    // never had a good one, so the edge does not learn of it.
    assert_eq!(
        delta
            .upsert
            .iter()
            .map(|s| s.id.as_str())
            .collect::<Vec<_>>(),
        ["alpha"]
    );
    assert!(delta.remove.is_empty());
    let rejected = served.feed.rejected_sites();
    assert_eq!(
        rejected
            .iter()
            .map(|r| (r.site.as_str(), r.previous_kept))
            .collect::<Vec<_>>(),
        [("beta", true), ("gamma", false)]
    );
    assert!(
        rejected[0].problems[0].starts_with("hsts.preload: "),
        "{rejected:?}"
    );
    assert_eq!(served.feed.rejected_site("beta"), Some(rejected[0].clone()));
    let snapshot = served.get("", None).await.snapshot();
    assert_eq!(snapshot.sites[1], first.sites[1], "beta's previous entry");

    // Fixed: beta's new entry flows and nothing is reported any more for it.
    served.force("beta");
    let fixed = served.since(&delta.version).await.delta();
    assert_eq!(fixed.upsert.len(), 1);
    assert_eq!(fixed.upsert[0].id, "beta");
    assert_eq!(fixed.upsert[0].https, HttpsMode::Force);
    assert_eq!(served.feed.rejected_site("beta"), None);
    assert_eq!(served.feed.rejected_sites().len(), 1);
}

/// A client that accepts the compact snapshot gets it (its content type, the version as ETag)
/// and it compiles to exactly the JSON snapshot's policy; a client that does not (or refuses
/// it with q=0) gets JSON; deltas stay JSON either way.
#[tokio::test]
async fn a_client_accepting_the_compact_snapshot_gets_the_same_policy_in_it() {
    use autohttps_filter::policy::compact;
    let served = Served::start(&["alpha", "beta", "gamma"]).await;
    served.force("beta");
    let compact_get = |accept: &'static str, query: &str| {
        let request = served
            .http
            .get(format!("{}{query}", served.url))
            .header(reqwest::header::ACCEPT, accept);
        async move {
            let response = request.send().await.expect("answered");
            let content_type = response
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let etag = response
                .headers()
                .get(ETAG)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let body = response.bytes().await.expect("a body").to_vec();
            (content_type, etag, body)
        }
    };
    let json = served.get("", None).await.snapshot();
    let (content_type, etag, body) = compact_get(
        "application/vnd.autohttps.policy-snapshot, application/json;q=0.5",
        "",
    )
    .await;
    assert_eq!(content_type.as_deref(), Some(compact::CONTENT_TYPE));
    assert_eq!(etag, Some(format!("\"{}\"", json.version)));
    let from_compact = Policy::from_compact(body.clone()).expect("the compact snapshot validates");
    let from_json = Policy::compile(&json).expect("valid");
    assert_eq!(from_compact.version(), json.version);
    assert_eq!(from_compact.site_count(), 3);
    for host in ["alpha.test", "www.beta.test", "gamma.test", "delta.test"] {
        let id = |p: &Policy| p.lookup(host).map(|(s, ready)| (p.site(s).cloned(), ready));
        assert_eq!(id(&from_compact), id(&from_json), "{host}");
    }
    // The same bytes again for the same version (encoded once).
    let (_, _, again) = compact_get(compact::CONTENT_TYPE, "").await;
    assert_eq!(again, body);

    let (content_type, _, _) = compact_get(
        "application/vnd.autohttps.policy-snapshot;q=0, application/json",
        "",
    )
    .await;
    assert_eq!(content_type.as_deref(), Some("application/json"));
    served.force("alpha");
    let (content_type, _, body) = compact_get(compact::CONTENT_TYPE, "?since=x").await;
    assert_eq!(
        content_type.as_deref(),
        Some(compact::CONTENT_TYPE),
        "another epoch: snapshot"
    );
    assert_ne!(
        Policy::from_compact(body).expect("valid").version(),
        json.version
    );
    let delta_query = format!("?since={}&wait_ms=0", json.version);
    let (content_type, _, body) = compact_get(compact::CONTENT_TYPE, &delta_query).await;
    assert_eq!(content_type.as_deref(), Some("application/json"));
    let delta: PolicyDelta = serde_json::from_slice(&body).expect("a JSON delta");
    assert_eq!(delta.upsert.len(), 1);
}
