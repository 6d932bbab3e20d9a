//! The sites page's listing: each site's certificate state, soonest expiry and last problem,
//! filtered, sorted and paged on the server, so a browser is sent one page (not 10,000 rows).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::error::Result;
use crate::store::{Event, HttpsMode, Site, Store, StoredCertificate};

/// Where a site stands with its certificate, worst first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CertificateState {
    /// The last attempt failed for a reason other than DNS (the CA refused, a challenge failed).
    Failing,
    /// The last attempt left names out because their DNS does not point at the platform.
    DnsNotPointing,
    /// Certificates are served, but some of the site's names are in none of them.
    NotInCertificate,
    /// Nothing issued yet, and no failure: the first order is due or running.
    Pending,
    /// Every name is covered by a served certificate.
    Issued,
}

/// One row of the sites page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SiteSummary {
    /// The site id.
    pub name: String,
    /// Its primary domain.
    pub primary: String,
    /// How many hostnames it has.
    pub hostnames: usize,
    /// Its HTTPS mode.
    pub https: HttpsMode,
    /// Its certificate state.
    pub state: CertificateState,
    /// The soonest `not_after` of its served certificates.
    #[serde(with = "time::serde::rfc3339::option")]
    pub soonest_expiry: Option<OffsetDateTime>,
    /// The last attempt's problem, while failing.
    pub last_problem: Option<String>,
}

/// The sort orders the page offers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SortKey {
    /// By site id.
    #[default]
    Name,
    /// Worst state first, then by name.
    State,
    /// Soonest expiry first; sites with no certificate last.
    Expiry,
}

/// `GET /console/api/sites` query.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListingQuery {
    /// Keep sites whose id or primary domain contains this (case-insensitive).
    #[serde(default)]
    pub q: Option<String>,
    /// Keep sites in this state.
    #[serde(default)]
    pub state: Option<CertificateState>,
    /// Keep sites in this HTTPS mode.
    #[serde(default)]
    pub https: Option<HttpsMode>,
    /// Sort order.
    #[serde(default)]
    pub sort: SortKey,
    /// Zero-based page.
    #[serde(default)]
    pub page: usize,
    /// Rows per page (1 to [`MAX_PER_PAGE`]; [`DEFAULT_PER_PAGE`] when absent).
    #[serde(default)]
    pub per_page: Option<usize>,
}

/// Rows per page when the query names none.
pub const DEFAULT_PER_PAGE: usize = 50;
/// The most rows one page may ask for.
pub const MAX_PER_PAGE: usize = 500;

/// One page of the listing.
#[derive(Debug, Clone, Serialize)]
pub struct ListingPage {
    /// The rows of this page.
    pub sites: Vec<SiteSummary>,
    /// Sites matching the filter (all pages).
    pub matching: usize,
    /// All sites.
    pub total: usize,
    /// This page (zero-based).
    pub page: usize,
    /// Rows per page.
    pub per_page: usize,
    /// Matching sites per state, for the filter's counts.
    pub states: HashMap<CertificateState, usize>,
}

/// A site's state from its served certificates and schedule; `last_failure_reason` is the
/// reason label of its newest failure event (`dns`, `acme:…`), read only for failing sites.
pub fn certificate_state(
    site: &Site,
    current: &[&StoredCertificate],
    last_failure_reason: Option<&str>,
) -> CertificateState {
    if site.issuance.failures > 0 {
        return if last_failure_reason == Some("dns") {
            CertificateState::DnsNotPointing
        } else {
            CertificateState::Failing
        };
    }
    if current.is_empty() {
        return CertificateState::Pending;
    }
    let uncovered = site
        .hostnames
        .iter()
        .any(|h| !current.iter().any(|c| c.covers(&h.name)));
    if uncovered {
        CertificateState::NotInCertificate
    } else {
        CertificateState::Issued
    }
}

/// The reason label of a site's newest failure event, from its recent events (newest first).
pub fn last_failure_reason(events: &[Event]) -> Option<&str> {
    events.iter().find_map(|e| e.reason.as_deref())
}

/// Every site's summary: two store queries, plus one small event query per failing site.
pub fn summaries(store: &dyn Store, now: OffsetDateTime) -> Result<Vec<SiteSummary>> {
    let sites = store.list_sites()?;
    let certificates = store.all_current_certificates()?;
    let mut by_site: HashMap<&str, Vec<&StoredCertificate>> = HashMap::new();
    for certificate in &certificates {
        if certificate.not_before <= now && certificate.not_after > now {
            by_site
                .entry(certificate.site.as_str())
                .or_default()
                .push(certificate);
        }
    }
    let mut out = Vec::with_capacity(sites.len());
    for site in &sites {
        let current = by_site
            .get(site.name.as_str())
            .map_or(&[][..], Vec::as_slice);
        let events = if site.issuance.failures > 0 {
            store.events(&site.name, 20)?
        } else {
            Vec::new()
        };
        out.push(SiteSummary {
            name: site.name.clone(),
            primary: site.primary.as_str().to_owned(),
            hostnames: site.hostnames.len(),
            https: site.policy.https,
            state: certificate_state(site, current, last_failure_reason(&events)),
            soonest_expiry: current.iter().map(|c| c.not_after).min(),
            last_problem: site.issuance.last_problem.clone(),
        });
    }
    Ok(out)
}

/// Filters, sorts and pages the summaries.
pub fn page(mut all: Vec<SiteSummary>, query: &ListingQuery) -> ListingPage {
    let total = all.len();
    let needle = query
        .q
        .as_deref()
        .map(str::trim)
        .filter(|q| !q.is_empty())
        .map(str::to_ascii_lowercase);
    all.retain(|s| {
        needle
            .as_deref()
            .is_none_or(|q| s.name.contains(q) || s.primary.contains(q))
            && query.https.is_none_or(|mode| s.https == mode)
    });
    let mut states: HashMap<CertificateState, usize> = HashMap::new();
    for s in &all {
        *states.entry(s.state).or_default() += 1;
    }
    if let Some(state) = query.state {
        all.retain(|s| s.state == state);
    }
    match query.sort {
        SortKey::Name => all.sort_by(|a, b| a.name.cmp(&b.name)),
        SortKey::State => all.sort_by(|a, b| (a.state, &a.name).cmp(&(b.state, &b.name))),
        SortKey::Expiry => all.sort_by(|a, b| {
            let key = |s: &SiteSummary| (s.soonest_expiry.is_none(), s.soonest_expiry);
            key(a).cmp(&key(b)).then_with(|| a.name.cmp(&b.name))
        }),
    }
    let per_page = query
        .per_page
        .unwrap_or(DEFAULT_PER_PAGE)
        .clamp(1, MAX_PER_PAGE);
    let matching = all.len();
    let sites = all
        .into_iter()
        .skip(query.page.saturating_mul(per_page))
        .take(per_page)
        .collect();
    ListingPage {
        sites,
        matching,
        total,
        page: query.page,
        per_page,
        states,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hostname::Hostname;
    use crate::store::{HostnameKind, IssuanceSchedule, PrivateKeyPem, SiteHostname, SitePolicy};

    fn site(names: &[&str], failures: u32) -> Site {
        let primary = Hostname::parse(names[0]).unwrap();
        Site {
            name: "shop".into(),
            hostnames: names
                .iter()
                .map(|n| {
                    let name = Hostname::parse(n).unwrap();
                    SiteHostname {
                        kind: HostnameKind::of(&name, &primary),
                        name,
                    }
                })
                .collect(),
            primary,
            policy: SitePolicy::default(),
            created_at: OffsetDateTime::UNIX_EPOCH,
            issuance: IssuanceSchedule {
                next_attempt_at: None,
                failures,
                last_problem: (failures > 0).then(|| "it failed".into()),
                regenerate_requested: false,
            },
        }
    }

    fn certificate(names: &[&str]) -> StoredCertificate {
        StoredCertificate {
            id: 1,
            site: "shop".into(),
            names: names.iter().map(|n| Hostname::parse(n).unwrap()).collect(),
            chain_pem: String::new(),
            key_pem: PrivateKeyPem::new(String::new()),
            not_before: OffsetDateTime::UNIX_EPOCH,
            not_after: OffsetDateTime::UNIX_EPOCH + time::Duration::days(90),
            serial: "01".into(),
            ari_id: None,
            issued_at: OffsetDateTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn certificate_states() {
        let both = site(&["shop.example", "www.shop.example"], 0);
        let full = certificate(&["shop.example", "www.shop.example"]);
        let partial = certificate(&["shop.example"]);
        assert_eq!(
            certificate_state(&both, &[], None),
            CertificateState::Pending
        );
        assert_eq!(
            certificate_state(&both, &[&full], None),
            CertificateState::Issued
        );
        assert_eq!(
            certificate_state(&both, &[&partial], None),
            CertificateState::NotInCertificate
        );
        let failing = site(&["shop.example"], 2);
        assert_eq!(
            certificate_state(&failing, &[&partial], Some("acme:rateLimited")),
            CertificateState::Failing
        );
        assert_eq!(
            certificate_state(&failing, &[], Some("dns")),
            CertificateState::DnsNotPointing
        );
    }

    fn summary(name: &str, state: CertificateState, expiry: Option<i64>) -> SiteSummary {
        SiteSummary {
            name: name.into(),
            primary: format!("{name}.example"),
            hostnames: 1,
            https: HttpsMode::Auto,
            state,
            soonest_expiry: expiry.map(|t| OffsetDateTime::from_unix_timestamp(t).unwrap()),
            last_problem: None,
        }
    }

    fn many(n: usize) -> Vec<SiteSummary> {
        (0..n)
            .map(|i| {
                let state = if i % 100 == 7 {
                    CertificateState::Failing
                } else {
                    CertificateState::Issued
                };
                summary(&format!("site-{i:05}"), state, Some(1_000 + i as i64))
            })
            .collect()
    }

    #[test]
    fn ten_thousand_sites_are_sent_one_page_at_a_time() {
        let listing = page(many(10_000), &ListingQuery::default());
        assert_eq!(listing.total, 10_000);
        assert_eq!(listing.matching, 10_000);
        assert_eq!(listing.sites.len(), DEFAULT_PER_PAGE);
        assert_eq!(listing.sites[0].name, "site-00000");
        let body = serde_json::to_vec(&listing).unwrap();
        assert!(body.len() < 20_000, "one page is {} bytes", body.len());
        let huge = page(
            many(10_000),
            &ListingQuery {
                per_page: Some(1_000_000),
                ..ListingQuery::default()
            },
        );
        assert_eq!(huge.sites.len(), MAX_PER_PAGE);
    }

    #[test]
    fn filter_by_state_counts_and_pages() {
        let query = ListingQuery {
            state: Some(CertificateState::Failing),
            page: 1,
            per_page: Some(30),
            ..ListingQuery::default()
        };
        let listing = page(many(10_000), &query);
        assert_eq!(listing.matching, 100);
        assert_eq!(listing.states[&CertificateState::Failing], 100);
        assert_eq!(listing.states[&CertificateState::Issued], 9_900);
        assert_eq!(listing.sites.len(), 30);
        assert_eq!(listing.sites[0].name, "site-03007");
    }

    #[test]
    fn search_and_sorts() {
        let all = vec![
            summary("b", CertificateState::Issued, Some(5)),
            summary("a", CertificateState::Pending, None),
            summary("c", CertificateState::Failing, Some(9)),
        ];
        let names = |q: ListingQuery| -> Vec<String> {
            page(all.clone(), &q)
                .sites
                .into_iter()
                .map(|s| s.name)
                .collect()
        };
        let sort = |sort| ListingQuery {
            sort,
            ..ListingQuery::default()
        };
        assert_eq!(names(sort(SortKey::Name)), ["a", "b", "c"]);
        assert_eq!(names(sort(SortKey::State)), ["c", "a", "b"]);
        assert_eq!(names(sort(SortKey::Expiry)), ["b", "c", "a"]);
        let search = ListingQuery {
            q: Some(" C.EXAMPLE ".into()),
            ..ListingQuery::default()
        };
        assert_eq!(names(search), ["c"]);
    }
}
