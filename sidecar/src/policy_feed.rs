//! The filter's policy, projected from the store and served at `GET /v1/policy` on the internal
//! listener, with an `ETag` so that Envoy's polls cost a 304 when nothing changed.
//!
//! The document is rebuilt only when the store says sites or certificates changed, checked with
//! the filter's own validation before it is served, and never replaced by an invalid one: the
//! edge keeps enforcing the last good policy.

use std::sync::{Arc, Mutex};

use autohttps_filter::policy::{
    HstsSpec, Policy, PolicyDocument, SCHEMA_VERSION, Settings, SiteSpec,
};
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::clock::Clock;
use crate::csp_reports::ReportTokens;
use crate::error::{Error, Result};
use crate::store::{MixedContent, Site, Store, StoredCertificate};

/// The path the filter polls.
pub const POLICY_PATH: &str = "/v1/policy";

/// Edge-wide settings that go into every policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeSettings {
    /// Proxies whose `X-Forwarded-Proto` the filter believes.
    pub trusted_proxies: Vec<String>,
    /// The public HTTP port (in redirects when not 80).
    pub http_port: u16,
    /// The public HTTPS port (in redirects when not 443).
    pub https_port: u16,
}

impl Default for EdgeSettings {
    fn default() -> Self {
        EdgeSettings {
            trusted_proxies: Vec::new(),
            http_port: 80,
            https_port: 443,
        }
    }
}

impl EdgeSettings {
    /// Checks these settings with the filter's own rules (a bad trusted-proxy CIDR would make
    /// every policy invalid), so a mistake is refused at start, not at Envoy's first poll.
    pub fn validate(&self) -> Result<()> {
        let document = build_document(&[], &[], self, None, OffsetDateTime::UNIX_EPOCH);
        Policy::compile(&document)
            .map(|_| ())
            .map_err(|error| Error::Config(format!("edge settings: {error}")))
    }
}

/// Builds the policy document for these sites and their current certificates. A name is
/// `cert_ready` when an unexpired certificate of its site covers it; a site in `report` mode
/// carries its report token for the epoch of `now`, when `tokens` are given. The version is a
/// hash of the content, so that identical content always has the same ETag, on every sidecar
/// of a fleet (sharing the token key).
pub fn build_document(
    sites: &[Site],
    certificates: &[StoredCertificate],
    settings: &EdgeSettings,
    tokens: Option<&ReportTokens>,
    now: OffsetDateTime,
) -> PolicyDocument {
    let epoch = ReportTokens::epoch(now);
    let mut specs: Vec<SiteSpec> = sites
        .iter()
        .map(|site| {
            let current: Vec<&StoredCertificate> = certificates
                .iter()
                .filter(|c| c.site == site.name && c.not_after > now && c.not_before <= now)
                .collect();
            let hostnames: Vec<String> = site
                .hostnames
                .iter()
                .map(|h| h.name.as_str().to_string())
                .collect();
            let cert_ready = site
                .hostnames
                .iter()
                .filter(|h| current.iter().any(|c| c.covers(&h.name)))
                .map(|h| h.name.as_str().to_string())
                .collect();
            SiteSpec {
                id: site.name.clone(),
                hostnames,
                https: site.policy.https,
                redirect: site.policy.redirect,
                // Only one of the site's names: anything else would make the filter refuse
                // the whole document.
                canonical_host: site
                    .policy
                    .canonical_host
                    .as_ref()
                    .filter(|c| {
                        !c.as_str().starts_with("*.")
                            && site.hostnames.iter().any(|h| &h.name == *c)
                    })
                    .map(|c| c.as_str().to_string()),
                hsts: HstsSpec {
                    enabled: site.policy.hsts.enabled,
                    max_age: site.policy.hsts.max_age,
                    include_subdomains: site.policy.hsts.include_subdomains,
                    preload: site.policy.hsts.preload,
                },
                mixed_content: site.policy.mixed_content,
                report_uri: None,
                report_token: tokens
                    .filter(|_| site.policy.mixed_content == MixedContent::Report)
                    .map(|tokens| tokens.token(&site.name, epoch)),
                cert_ready,
            }
        })
        .collect();
    specs.sort_by(|a, b| a.id.cmp(&b.id));
    let mut document = PolicyDocument {
        schema: SCHEMA_VERSION,
        version: String::new(),
        settings: Settings {
            trusted_proxies: settings.trusted_proxies.clone(),
            http_port: settings.http_port,
            https_port: settings.https_port,
        },
        sites: specs,
    };
    let content = serde_json::to_vec(&document).unwrap_or_default();
    document.version = format!("{:016x}", fnv1a64(&content));
    document
}

/// FNV-1a, 64 bits: a stable content hash for the version (not a security boundary).
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// A served policy: its JSON and ETag.
#[derive(Debug, Clone)]
struct Served {
    /// The store's change generations (sites, certificates) and the report token epoch.
    generations: (u64, u64, i64),
    body: Arc<[u8]>,
    etag: HeaderValue,
    version: String,
}

/// Serves the policy feed.
#[derive(Clone)]
pub struct PolicyFeed {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    settings: EdgeSettings,
    tokens: ReportTokens,
    sites_changed: watch::Receiver<u64>,
    certificates_changed: watch::Receiver<u64>,
    served: Arc<Mutex<Option<Served>>>,
}

impl std::fmt::Debug for PolicyFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyFeed")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl PolicyFeed {
    /// A feed over this store; `tokens` make the report-mode sites' report tokens.
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        settings: EdgeSettings,
        tokens: ReportTokens,
    ) -> Self {
        let sites_changed = store.sites_changed();
        let certificates_changed = store.certificates_changed();
        PolicyFeed {
            store,
            clock,
            settings,
            tokens,
            sites_changed,
            certificates_changed,
            served: Arc::new(Mutex::new(None)),
        }
    }

    /// The router for the internal listener.
    pub fn router(self) -> Router {
        Router::new()
            .route(POLICY_PATH, get(serve_policy))
            .with_state(self)
    }

    /// The current policy: rebuilt when the store changed, validated with the filter's rules;
    /// on a validation failure the last good one is kept (and the problems logged).
    pub fn current(&self) -> Result<(Arc<[u8]>, HeaderValue, String)> {
        let now = self.clock.now();
        let generations = (
            *self.sites_changed.borrow(),
            *self.certificates_changed.borrow(),
            ReportTokens::epoch(now),
        );
        let mut served = self.served.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(current) = served.as_ref()
            && current.generations == generations
        {
            return Ok((
                Arc::clone(&current.body),
                current.etag.clone(),
                current.version.clone(),
            ));
        }
        let sites = self.store.list_sites()?;
        let certificates = self.store.all_current_certificates()?;
        let document = build_document(
            &sites,
            &certificates,
            &self.settings,
            Some(&self.tokens),
            now,
        );
        match Policy::compile(&document) {
            Ok(_) => {
                let body: Arc<[u8]> = serde_json::to_vec(&document)
                    .map_err(|e| Error::Internal(format!("serialising the policy: {e}")))?
                    .into();
                let etag = HeaderValue::from_str(&format!("\"{}\"", document.version))
                    .map_err(|e| Error::Internal(format!("policy ETag: {e}")))?;
                tracing::info!(
                    version = %document.version,
                    sites = document.sites.len(),
                    "policy rebuilt"
                );
                *served = Some(Served {
                    generations,
                    body: Arc::clone(&body),
                    etag: etag.clone(),
                    version: document.version.clone(),
                });
                Ok((body, etag, document.version))
            }
            Err(error) => {
                tracing::error!(%error, "the policy built from the store does not validate; the edge keeps the last good one");
                match served.as_ref() {
                    Some(current) => Ok((
                        Arc::clone(&current.body),
                        current.etag.clone(),
                        current.version.clone(),
                    )),
                    None => Err(Error::Internal(format!("no valid policy yet: {error}"))),
                }
            }
        }
    }
}

async fn serve_policy(State(feed): State<PolicyFeed>, headers: HeaderMap) -> Response {
    let current = tokio::task::spawn_blocking(move || feed.current()).await;
    let (body, etag, _version) = match current {
        Ok(Ok(current)) => current,
        Ok(Err(error)) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the policy is not available: {error}\n"),
            )
                .into_response();
        }
        Err(join) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("building the policy failed: {join}\n"),
            )
                .into_response();
        }
    };
    let matches = headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|tag| tag.trim() == etag.to_str().unwrap_or_default() || tag.trim() == "*");
    if matches {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response();
    }
    (
        StatusCode::OK,
        [
            (header::ETAG, etag),
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
        ],
        body.to_vec(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::csp_reports::TOKEN_EPOCH_SECS;
    use crate::hostname::Hostname;
    use crate::store::{NewCertificate, NewSite, PrivateKeyPem, SitePolicy, SqliteStore};
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-03-01 00:00 UTC);

    fn name(n: &str) -> Hostname {
        Hostname::parse(n).expect("valid hostname")
    }

    fn store_with_site(names: &[&str]) -> Arc<SqliteStore> {
        let store = Arc::new(SqliteStore::in_memory().expect("store"));
        store
            .create_site(
                NewSite {
                    name: "shop".into(),
                    primary: name(names[0]),
                    hostnames: names[1..].iter().map(|n| name(n)).collect(),
                    policy: SitePolicy::default(),
                },
                NOW,
                NOW,
            )
            .expect("site");
        store
    }

    fn issue(store: &SqliteStore, names: &[&str], serial: &str, not_after: OffsetDateTime) {
        store
            .store_certificate(
                NewCertificate {
                    site: "shop".into(),
                    names: names.iter().map(|n| name(n)).collect(),
                    chain_pem: format!("chain {serial}"),
                    key_pem: PrivateKeyPem::new(format!("key {serial}")),
                    not_before: NOW - time::Duration::days(1),
                    not_after,
                    serial: serial.into(),
                    ari_id: None,
                },
                None,
                NOW,
            )
            .expect("stored");
    }

    fn document(store: &SqliteStore, now: OffsetDateTime) -> PolicyDocument {
        build_document(
            &store.list_sites().expect("sites"),
            &store.all_current_certificates().expect("certificates"),
            &EdgeSettings::default(),
            Some(&test_tokens()),
            now,
        )
    }

    fn test_tokens() -> ReportTokens {
        ReportTokens::from_key(b"a key for the policy feed's tests")
    }

    #[test]
    fn cert_ready_lists_only_names_an_unexpired_certificate_covers() {
        let store = store_with_site(&["shop.test", "www.shop.test", "old.shop.test"]);
        issue(
            &store,
            &["shop.test", "www.shop.test"],
            "01",
            datetime!(2026-06-01 00:00 UTC),
        );
        issue(
            &store,
            &["old.shop.test"],
            "02",
            datetime!(2026-03-02 00:00 UTC),
        );
        let fresh = document(&store, NOW);
        assert_eq!(
            fresh.sites[0].cert_ready,
            vec!["shop.test", "old.shop.test", "www.shop.test"]
        );
        let later = document(&store, datetime!(2026-03-03 00:00 UTC));
        assert_eq!(
            later.sites[0].cert_ready,
            vec!["shop.test", "www.shop.test"]
        );
        assert_eq!(later.sites[0].hostnames.len(), 3);
        assert_ne!(fresh.version, later.version);
    }

    #[test]
    fn same_content_has_the_same_version_and_a_new_certificate_a_new_one() {
        let store = store_with_site(&["shop.test", "www.shop.test"]);
        issue(
            &store,
            &["shop.test"],
            "01",
            datetime!(2026-06-01 00:00 UTC),
        );
        let first = document(&store, NOW);
        let again = document(&store, NOW + time::Duration::hours(1));
        assert_eq!(first.version, again.version);
        assert_eq!(first, again);
        issue(
            &store,
            &["shop.test", "www.shop.test"],
            "02",
            datetime!(2026-06-01 00:00 UTC),
        );
        let after = document(&store, NOW);
        assert_ne!(first.version, after.version);
        assert!(Policy::compile(&after).is_ok());
    }

    #[test]
    fn edge_settings_with_a_bad_trusted_proxy_are_refused() {
        let settings = EdgeSettings {
            trusted_proxies: vec!["not-an-address".into()],
            ..EdgeSettings::default()
        };
        let error = settings.validate().expect_err("refused");
        assert!(error.to_string().contains("trusted_proxies"), "{error}");
        assert!(EdgeSettings::default().validate().is_ok());
    }

    #[tokio::test]
    async fn feed_answers_with_an_etag_then_304_until_the_store_changes() {
        let store = store_with_site(&["shop.test"]);
        let feed = PolicyFeed::new(
            Arc::clone(&store) as Arc<dyn Store>,
            Arc::new(ManualClock::new(NOW)),
            EdgeSettings {
                https_port: 8443,
                ..EdgeSettings::default()
            },
            test_tokens(),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bound");
        let url = format!(
            "http://{}{POLICY_PATH}",
            listener.local_addr().expect("address")
        );
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, feed.router()).await;
        });
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client");

        let first = http.get(&url).send().await.expect("answered");
        assert_eq!(first.status(), 200);
        let etag = first.headers()[header::ETAG].clone();
        let body: PolicyDocument = first.json().await.expect("a policy document");
        assert_eq!(
            etag.to_str().ok(),
            Some(format!("\"{}\"", body.version).as_str())
        );
        assert_eq!(body.settings.https_port, 8443);
        assert!(body.sites[0].cert_ready.is_empty());

        let unchanged = http
            .get(&url)
            .header(header::IF_NONE_MATCH, etag.clone())
            .send()
            .await
            .expect("answered");
        assert_eq!(unchanged.status(), 304);
        assert_eq!(unchanged.headers()[header::ETAG], etag);

        issue(
            &store,
            &["shop.test"],
            "01",
            datetime!(2026-06-01 00:00 UTC),
        );
        let changed = http
            .get(&url)
            .header(header::IF_NONE_MATCH, etag.clone())
            .send()
            .await
            .expect("answered");
        assert_eq!(changed.status(), 200);
        assert_ne!(changed.headers()[header::ETAG], etag);
        let body: PolicyDocument = changed.json().await.expect("a policy document");
        assert_eq!(body.sites[0].cert_ready, vec!["shop.test"]);
        server.abort();
    }

    #[tokio::test]
    async fn a_report_mode_site_carries_a_token_that_rotates_with_the_epoch() {
        let store = store_with_site(&["shop.test"]);
        assert_eq!(document(&store, NOW).sites[0].report_token, None);
        store
            .set_policy(
                "shop",
                SitePolicy {
                    mixed_content: MixedContent::Report,
                    ..SitePolicy::default()
                },
            )
            .expect("policy set");
        let clock = Arc::new(ManualClock::new(NOW));
        let feed = PolicyFeed::new(
            Arc::clone(&store) as Arc<dyn Store>,
            Arc::clone(&clock) as Arc<dyn Clock>,
            EdgeSettings::default(),
            test_tokens(),
        );
        let token_in = |body: &[u8]| {
            let document: PolicyDocument = serde_json::from_slice(body).expect("a document");
            assert!(Policy::compile(&document).is_ok());
            document.sites[0].report_token.clone().expect("a token")
        };
        let (body, etag, _) = feed.current().expect("policy");
        let token = token_in(&body);
        assert!(test_tokens().verify("shop", &token, NOW));
        assert!(!test_tokens().verify("other", &token, NOW));

        // A day later the feed serves the next epoch's token; the old one is still accepted for
        // pages served before, and not after another day.
        clock.advance(std::time::Duration::from_secs(TOKEN_EPOCH_SECS as u64));
        let (body, rotated_etag, _) = feed.current().expect("policy");
        let rotated = token_in(&body);
        assert_ne!(rotated, token);
        assert_ne!(rotated_etag, etag);
        let later = NOW + time::Duration::seconds(TOKEN_EPOCH_SECS);
        assert!(test_tokens().verify("shop", &token, later));
        assert!(test_tokens().verify("shop", &rotated, later));
        let much_later = later + time::Duration::seconds(TOKEN_EPOCH_SECS);
        assert!(!test_tokens().verify("shop", &token, much_later));
    }
}
