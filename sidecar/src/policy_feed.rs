//! The filter's policy, projected from the store and served at `GET /v1/policy` on the internal
//! listener, with an `ETag` so that Envoy's polls cost a 304 when nothing changed.
//!
//! The document is rebuilt when the store says sites or certificates changed, or when a
//! certificate's validity boundary passes (so `cert_ready` follows time, not only changes). It is
//! checked with the filter's own validation before it is served: a site whose entry fails is
//! left out (its last good entry kept) and reported, and the others are served; only settings
//! that fail keep the last good policy whole.

use std::collections::HashMap;
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

/// A built policy document and how long what it says stays true.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltPolicy {
    /// The document.
    pub document: PolicyDocument,
    /// The soonest moment after `now` when a current certificate expires or becomes valid
    /// (its `not_after` or a future `not_before`): from then on `cert_ready` would read
    /// differently, so the document must be rebuilt even if the store did not change. `None`
    /// when no certificate has a boundary ahead.
    pub valid_until: Option<OffsetDateTime>,
}

/// Builds the policy document for these sites and their current certificates. A name is
/// `cert_ready` when a certificate of its site that is valid at `now` covers it; a site in
/// `report` mode carries its report token for the epoch of `now`, when `tokens` are given. The
/// version is a hash of the content, so that identical content always has the same ETag, on
/// every sidecar of a fleet (sharing the token key).
///
/// Linear in sites and certificates: certificates are grouped by site once, and each site's
/// `cert_ready` looks only at its own.
pub fn build_policy(
    sites: &[Site],
    certificates: &[StoredCertificate],
    settings: &EdgeSettings,
    tokens: Option<&ReportTokens>,
    now: OffsetDateTime,
) -> BuiltPolicy {
    let epoch = ReportTokens::epoch(now);
    let mut valid_until: Option<OffsetDateTime> = None;
    let mut boundary = |at: OffsetDateTime| {
        valid_until = Some(valid_until.map_or(at, |soonest| soonest.min(at)));
    };
    let mut current_by_site: HashMap<&str, Vec<&StoredCertificate>> = HashMap::new();
    for certificate in certificates {
        if certificate.not_before > now {
            boundary(certificate.not_before);
        } else if certificate.not_after > now {
            boundary(certificate.not_after);
            current_by_site
                .entry(certificate.site.as_str())
                .or_default()
                .push(certificate);
        }
    }
    let mut specs: Vec<SiteSpec> = sites
        .iter()
        .map(|site| {
            let current = current_by_site
                .get(site.name.as_str())
                .map_or(&[][..], Vec::as_slice);
            site_spec(site, current, tokens, epoch)
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
    stamp_version(&mut document);
    BuiltPolicy {
        document,
        valid_until,
    }
}

/// [`build_policy`]'s document alone.
pub fn build_document(
    sites: &[Site],
    certificates: &[StoredCertificate],
    settings: &EdgeSettings,
    tokens: Option<&ReportTokens>,
    now: OffsetDateTime,
) -> PolicyDocument {
    build_policy(sites, certificates, settings, tokens, now).document
}

/// One site's entry; `current` are its certificates valid now; a report-mode site carries its
/// report token for `epoch` when `tokens` are given.
fn site_spec(
    site: &Site,
    current: &[&StoredCertificate],
    tokens: Option<&ReportTokens>,
    epoch: i64,
) -> SiteSpec {
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
        // Only one of the site's names: anything else would make the filter refuse the entry.
        canonical_host: site
            .policy
            .canonical_host
            .as_ref()
            .filter(|c| {
                !c.as_str().starts_with("*.") && site.hostnames.iter().any(|h| &h.name == *c)
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
}

/// Sets the document's version to the hash of its content (with an empty version).
fn stamp_version(document: &mut PolicyDocument) {
    document.version.clear();
    let content = serde_json::to_vec(&*document).unwrap_or_default();
    document.version = format!("{:016x}", fnv1a64(&content));
}

/// A site left out of the served policy because its entry fails the filter's validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedSite {
    /// The site's id.
    pub site: String,
    /// What the filter's validation says is wrong, one problem each (paths inside the site's
    /// entry, e.g. `hostnames[1]: ...`).
    pub problems: Vec<String>,
    /// Whether the site's previous good entry is served in its place (else the site is absent
    /// from the policy, so the edge treats its names as unknown).
    pub previous_kept: bool,
}

/// Validates `document` with the filter's own rules, site by site: a site whose entry fails is
/// replaced by its entry in `last_good` (the last served document, sites sorted by id; with `cert_ready` narrowed to the names the current
/// build says are ready, so an old entry never claims a certificate that is no longer served)
/// or, without one, left out. Returns the document that validates (re-versioned when anything
/// was replaced) and the rejected sites, or the filter's error when something outside the
/// sites (the settings) is wrong, which no site can be blamed for.
pub fn isolate_invalid_sites(
    mut document: PolicyDocument,
    last_good: Option<&PolicyDocument>,
) -> std::result::Result<(PolicyDocument, Vec<RejectedSite>), autohttps_filter::Error> {
    let previous_entry = |id: &str| {
        let sites = &last_good?.sites;
        let at = sites.binary_search_by(|s| s.id.as_str().cmp(id)).ok()?;
        sites.get(at)
    };
    let mut rejected: Vec<RejectedSite> = Vec::new();
    // Pass 1 replaces failing sites with their last good entries; pass 2 drops any of those
    // that still fail (e.g. a kept entry's name now belongs to another site); pass 3 must pass.
    let mut pass = 0;
    loop {
        let error = match Policy::compile(&document) {
            Ok(_) => {
                if !rejected.is_empty() {
                    stamp_version(&mut document);
                }
                return Ok((document, rejected));
            }
            Err(error) => error,
        };
        if pass == 2 {
            return Err(error);
        }
        let mut problems_by_index: HashMap<usize, Vec<String>> = HashMap::new();
        for problem in error.problems() {
            match site_problem(&problem.path) {
                Some((index, inner)) if index < document.sites.len() => problems_by_index
                    .entry(index)
                    .or_default()
                    .push(format!("{inner}: {}", problem.message)),
                _ => return Err(error),
            }
        }
        let mut drop = vec![false; document.sites.len()];
        for (index, problems) in problems_by_index {
            let spec = &mut document.sites[index];
            let earlier = rejected.iter_mut().find(|r| r.site == spec.id);
            let previous = previous_entry(&spec.id).filter(|_| earlier.is_none());
            match previous {
                Some(previous) => {
                    let mut kept = previous.clone();
                    kept.cert_ready
                        .retain(|name| spec.cert_ready.iter().any(|ready| ready == name));
                    rejected.push(RejectedSite {
                        site: spec.id.clone(),
                        problems,
                        previous_kept: true,
                    });
                    *spec = kept;
                }
                None => {
                    match earlier {
                        Some(earlier) => earlier.previous_kept = false,
                        None => rejected.push(RejectedSite {
                            site: spec.id.clone(),
                            problems,
                            previous_kept: false,
                        }),
                    }
                    drop[index] = true;
                }
            }
        }
        let mut index = 0;
        document.sites.retain(|_| {
            index += 1;
            !drop[index - 1]
        });
        pass += 1;
    }
}

/// Splits a problem path `sites[7].hostnames[1]` into the site's index and the rest.
fn site_problem(path: &str) -> Option<(usize, &str)> {
    let rest = path.strip_prefix("sites[")?;
    let (index, rest) = rest.split_once(']')?;
    let index = index.parse().ok()?;
    Some((index, rest.strip_prefix('.').unwrap_or(rest)))
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
    /// When a certificate's validity boundary makes `cert_ready` change: rebuilt from then on.
    valid_until: Option<OffsetDateTime>,
    /// Sites whose entries failed validation in this build.
    rejected: Arc<Vec<RejectedSite>>,
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

    /// The current policy: rebuilt when the store changed or a certificate's validity boundary
    /// passed (through the `Clock`), validated with the filter's rules site by site: a site
    /// that fails is left out (its previous good entry kept) and logged; when the settings
    /// fail, the last good policy is kept whole.
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
            && current.valid_until.is_none_or(|until| now < until)
        {
            return Ok((
                Arc::clone(&current.body),
                current.etag.clone(),
                current.version.clone(),
            ));
        }
        let sites = self.store.list_sites()?;
        let certificates = self.store.all_current_certificates()?;
        let built = build_policy(
            &sites,
            &certificates,
            &self.settings,
            Some(&self.tokens),
            now,
        );
        drop((sites, certificates));
        let checked = match Policy::compile(&built.document) {
            Ok(_) => Ok((built.document, Vec::new())),
            Err(_) => {
                let previous: Option<PolicyDocument> = served
                    .as_ref()
                    .and_then(|current| serde_json::from_slice(&current.body).ok());
                isolate_invalid_sites(built.document, previous.as_ref())
            }
        };
        match checked {
            Ok((document, rejected)) => {
                for site in &rejected {
                    tracing::warn!(
                        site = %site.site,
                        problems = %site.problems.join("; "),
                        previous_kept = site.previous_kept,
                        "a site's policy entry fails the filter's validation: it is left out of the policy (its previous good entry kept when it had one); every other site is served"
                    );
                }
                let body: Arc<[u8]> = serde_json::to_vec(&document)
                    .map_err(|e| Error::Internal(format!("serialising the policy: {e}")))?
                    .into();
                let etag = HeaderValue::from_str(&format!("\"{}\"", document.version))
                    .map_err(|e| Error::Internal(format!("policy ETag: {e}")))?;
                tracing::info!(
                    version = %document.version,
                    sites = document.sites.len(),
                    rejected = rejected.len(),
                    "policy rebuilt"
                );
                *served = Some(Served {
                    generations,
                    valid_until: built.valid_until,
                    body: Arc::clone(&body),
                    etag: etag.clone(),
                    version: document.version.clone(),
                    rejected: Arc::new(rejected),
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

    /// The sites left out of (or kept at their previous entry in) the policy served now, each
    /// with the filter's problems; empty when every site's entry validates.
    pub fn rejected_sites(&self) -> Arc<Vec<RejectedSite>> {
        self.served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map_or_else(
                || Arc::new(Vec::new()),
                |current| Arc::clone(&current.rejected),
            )
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
        issue_valid_from(
            store,
            names,
            serial,
            NOW - time::Duration::days(1),
            not_after,
        );
    }

    fn issue_valid_from(
        store: &SqliteStore,
        names: &[&str],
        serial: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) {
        store
            .store_certificate(
                NewCertificate {
                    site: "shop".into(),
                    names: names.iter().map(|n| name(n)).collect(),
                    chain_pem: format!("chain {serial}"),
                    key_pem: PrivateKeyPem::new(format!("key {serial}")),
                    not_before,
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

    fn cert_ready_of(feed: &PolicyFeed) -> Vec<String> {
        let (body, _, _) = feed.current().expect("a policy");
        let document: PolicyDocument = serde_json::from_slice(&body).expect("a policy document");
        document.sites[0].cert_ready.clone()
    }

    #[test]
    fn cert_ready_follows_the_clock_with_no_store_change() {
        let store = store_with_site(&["shop.test", "www.shop.test"]);
        issue(
            &store,
            &["shop.test"],
            "01",
            NOW + time::Duration::seconds(10),
        );
        issue_valid_from(
            &store,
            &["www.shop.test"],
            "02",
            NOW + time::Duration::seconds(5),
            NOW + time::Duration::days(90),
        );
        let clock = Arc::new(ManualClock::new(NOW));
        let feed = PolicyFeed::new(
            Arc::clone(&store) as Arc<dyn Store>,
            Arc::clone(&clock) as Arc<dyn Clock>,
            EdgeSettings::default(),
            test_tokens(),
        );
        assert_eq!(cert_ready_of(&feed), vec!["shop.test"]);
        clock.advance(std::time::Duration::from_secs(4));
        assert_eq!(cert_ready_of(&feed), vec!["shop.test"], "no boundary yet");
        clock.advance(std::time::Duration::from_secs(1));
        assert_eq!(
            cert_ready_of(&feed),
            vec!["shop.test", "www.shop.test"],
            "www's certificate became valid"
        );
        clock.advance(std::time::Duration::from_secs(5));
        assert_eq!(
            cert_ready_of(&feed),
            vec!["www.shop.test"],
            "shop.test's certificate expired"
        );
    }

    #[test]
    fn valid_until_is_the_soonest_validity_boundary_ahead() {
        let store = store_with_site(&["shop.test", "www.shop.test", "old.shop.test"]);
        issue(&store, &["shop.test"], "01", NOW + time::Duration::hours(3));
        issue(
            &store,
            &["old.shop.test"],
            "02",
            NOW - time::Duration::hours(1),
        );
        issue_valid_from(
            &store,
            &["www.shop.test"],
            "03",
            NOW + time::Duration::hours(2),
            NOW + time::Duration::days(90),
        );
        let built = build_policy(
            &store.list_sites().expect("sites"),
            &store.all_current_certificates().expect("certificates"),
            &EdgeSettings::default(),
            None,
            NOW,
        );
        assert_eq!(built.valid_until, Some(NOW + time::Duration::hours(2)));
        assert_eq!(built.document.sites[0].cert_ready, vec!["shop.test"]);
        let none = build_policy(
            &store.list_sites().expect("sites"),
            &[],
            &EdgeSettings::default(),
            None,
            NOW,
        );
        assert_eq!(none.valid_until, None);
    }

    #[test]
    fn each_site_gets_only_its_own_certificates() {
        let store = Arc::new(SqliteStore::in_memory().expect("store"));
        let mut certificates = Vec::new();
        for site in ["a", "b", "c"] {
            store
                .create_site(
                    NewSite {
                        name: site.into(),
                        primary: name(&format!("{site}.test")),
                        hostnames: vec![name(&format!("www.{site}.test"))],
                        policy: SitePolicy::default(),
                    },
                    NOW,
                    NOW,
                )
                .expect("site");
        }
        // Site a's certificate also names b.test (a name of another site): it must not make
        // b.test ready; c has no certificate.
        for (site, names) in [("a", ["a.test", "b.test"]), ("b", ["www.b.test", "b.test"])] {
            certificates.push(
                store
                    .store_certificate(
                        NewCertificate {
                            site: site.into(),
                            names: names.iter().map(|n| name(n)).collect(),
                            chain_pem: format!("chain {site}"),
                            key_pem: PrivateKeyPem::new(format!("key {site}")),
                            not_before: NOW - time::Duration::days(1),
                            not_after: NOW + time::Duration::days(1),
                            serial: site.into(),
                            ari_id: None,
                        },
                        None,
                        NOW,
                    )
                    .expect("stored"),
            );
        }
        let document = document(&store, NOW);
        let ready: Vec<(&str, &[String])> = document
            .sites
            .iter()
            .map(|s| (s.id.as_str(), s.cert_ready.as_slice()))
            .collect();
        assert_eq!(
            ready,
            vec![
                ("a", &["a.test".to_string()][..]),
                ("b", &["b.test".to_string(), "www.b.test".to_string()][..]),
                ("c", &[][..]),
            ]
        );
    }

    /// The store cannot hold a site the filter refuses today (its hostname and site-name rules
    /// are at least as strict), so these tests break an entry of a built document by hand.
    fn two_site_document() -> PolicyDocument {
        let store = store_with_site(&["shop.test", "www.shop.test"]);
        store
            .create_site(
                NewSite {
                    name: "blog".into(),
                    primary: name("blog.test"),
                    hostnames: Vec::new(),
                    policy: SitePolicy::default(),
                },
                NOW,
                NOW,
            )
            .expect("site");
        issue(
            &store,
            &["shop.test", "www.shop.test"],
            "01",
            NOW + time::Duration::days(1),
        );
        document(&store, NOW)
    }

    #[test]
    fn a_site_that_fails_validation_is_left_out_and_the_others_served() {
        let good = two_site_document();
        let mut bad = good.clone();
        assert_eq!(bad.sites[1].id, "shop");
        bad.sites[1].cert_ready.push("elsewhere.test".into());
        bad.sites[0].https = autohttps_filter::policy::HttpsMode::Force;

        let (served, rejected) = isolate_invalid_sites(bad.clone(), None).expect("isolated");
        assert_eq!(served.sites.len(), 1);
        assert_eq!(served.sites[0], bad.sites[0], "blog's change is served");
        assert_eq!(rejected.len(), 1);
        assert_eq!(rejected[0].site, "shop");
        assert!(!rejected[0].previous_kept);
        assert!(
            rejected[0].problems[0].starts_with("cert_ready[2]: "),
            "{:?}",
            rejected[0].problems
        );
        assert!(Policy::compile(&served).is_ok());
        assert_ne!(served.version, bad.version);

        // With a previous good entry, that entry stays, its cert_ready narrowed to what is
        // ready now.
        let mut narrowed = bad.clone();
        narrowed.sites[1].cert_ready = vec!["www.shop.test".into(), "bad name!".into()];
        let (served, rejected) = isolate_invalid_sites(narrowed, Some(&good)).expect("isolated");
        assert_eq!(served.sites.len(), 2);
        assert_eq!(served.sites[0], bad.sites[0]);
        assert_eq!(served.sites[1].hostnames, good.sites[1].hostnames);
        assert_eq!(served.sites[1].cert_ready, vec!["www.shop.test"]);
        assert!(rejected[0].previous_kept);
        assert!(Policy::compile(&served).is_ok());
    }

    #[test]
    fn bad_settings_are_not_blamed_on_a_site() {
        let mut bad = two_site_document();
        bad.settings.trusted_proxies = vec!["not-an-address".into()];
        let error = isolate_invalid_sites(bad, None).expect_err("refused whole");
        assert!(error.to_string().contains("trusted_proxies"), "{error}");
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
