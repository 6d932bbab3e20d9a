//! Mixed-content reports: sites in `report` mode send browsers a report-only CSP whose
//! `report-uri` is [`REPORT_PATH`] on the site's own host, with `?site=<id>&token=<token>`;
//! Envoy routes it here, and each violation is filed under the site and page, so the operator
//! can tell a customer exactly which `http://` resources a page loads
//! (`GET /v1/sites/{site}/mixed-content`).
//!
//! Both report formats browsers send are read: `application/csp-report` (CSP Level 2,
//! `report-uri`) and `application/reports+json` (the Reporting API). Anyone can post here, so:
//! - a report counts only with the site's token ([`ReportTokens`]: an HMAC of the site id and a
//!   daily epoch, the current or the previous one), only for a site in `report` mode, only when
//!   sent to one of the site's names and only for pages on that name;
//! - each client address and each site has a token bucket ([`ReportLimits`]), the client's
//!   spent before any other work, the site's only by reports that carry its token;
//! - at most [`ReportLimits::violations_per_report`] violations are read from one request;
//! - findings are aggregated per (page, resource) with counts, kept under a byte budget per site
//!   that evicts the fewest-reported, least recently seen first (see
//!   [`crate::store::HistoryStore::record_mixed_content`]);
//! - refusals are counted in metrics ([`crate::client_events`]) and logged at a bounded rate.

use std::collections::HashMap;
use std::io::Write as _;
use std::net::{IpAddr, Ipv6Addr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::Value;
use time::OffsetDateTime;

use crate::client_events::{COUNTERS, LogBudget, ReportRefusal};
use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::hostname::Hostname;
use crate::store::{MixedContent, Recorded, Store};

/// Where browsers send reports (the filter's default `report-uri`).
pub const REPORT_PATH: &str = autohttps_filter::policy::DEFAULT_REPORT_URI;

/// The largest report body read.
pub const MAX_REPORT_BYTES: usize = 64 * 1024;

/// The longest page or resource URL kept.
const MAX_URL_LEN: usize = 2048;

/// One violation from a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The page, without query or fragment.
    pub page: String,
    /// What was blocked.
    pub resource: String,
    /// The directive it fell under.
    pub directive: String,
}

/// Reads the violations out of a report body, in either format. Entries that are not CSP
/// violations, or lack a page or resource, are skipped.
pub fn parse_report(body: &[u8]) -> Vec<Violation> {
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return Vec::new();
    };
    let mut violations = Vec::new();
    let mut push = |page: Option<&str>, resource: Option<&str>, directive: Option<&str>| {
        if let (Some(page), Some(resource)) = (page, resource)
            && !page.is_empty()
            && !resource.is_empty()
        {
            violations.push(Violation {
                page: clip(strip_query(page)),
                resource: clip(resource),
                directive: clip(directive.unwrap_or("")),
            });
        }
    };
    match &value {
        // CSP Level 2: {"csp-report": {"document-uri": …, "blocked-uri": …}}
        Value::Object(object) => {
            if let Some(report) = object.get("csp-report") {
                let field = |name: &str| report.get(name).and_then(Value::as_str);
                push(
                    field("document-uri"),
                    field("blocked-uri"),
                    field("effective-directive").or(field("violated-directive")),
                );
            }
        }
        // Reporting API: [{"type": "csp-violation", "body": {"documentURL": …, "blockedURL": …}}]
        Value::Array(reports) => {
            for report in reports {
                if report.get("type").and_then(Value::as_str) != Some("csp-violation") {
                    continue;
                }
                let Some(body) = report.get("body") else {
                    continue;
                };
                let field = |name: &str| body.get(name).and_then(Value::as_str);
                push(
                    field("documentURL"),
                    field("blockedURL"),
                    field("effectiveDirective"),
                );
            }
        }
        _ => {}
    }
    violations
}

fn strip_query(url: &str) -> &str {
    let end = url.find(['?', '#']).unwrap_or(url.len());
    &url[..end]
}

fn clip(text: &str) -> String {
    let mut end = text.len().min(MAX_URL_LEN);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].chars().filter(|c| !c.is_control()).collect()
}

/// The host of an `http(s)://host[:port]/…` URL.
fn url_host(url: &str) -> Option<&str> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    Some(host.split(':').next().unwrap_or(host))
}

/// How long one report token epoch lasts; the current and the previous epoch's tokens are
/// accepted, so a page loaded just before a rotation still reports.
pub const TOKEN_EPOCH_SECS: i64 = 24 * 60 * 60;

/// The header Envoy's report route sets to the client's address (overwriting whatever the
/// client sent), for the per-client rate limit.
pub const CLIENT_ADDRESS_HEADER: &str = "x-autohttps-client";

/// The per-site report tokens: HMAC-SHA-256, keyed by a secret kept in the data directory, of
/// the site id and the token epoch. A token cannot be guessed without the key; anyone who loads
/// a page of the site sees it, which is why reports are also rate-limited and budgeted.
#[derive(Clone)]
pub struct ReportTokens {
    key: ring::hmac::Key,
}

impl std::fmt::Debug for ReportTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReportTokens(<key redacted>)")
    }
}

impl ReportTokens {
    /// The key file's name in the data directory.
    pub const KEY_FILE: &str = "csp-report-key";

    /// Reads the key from `<data_dir>/csp-report-key`, creating it (32 random bytes, hex, file
    /// 0600) when it does not exist. The key is never logged.
    pub fn load_or_create(data_dir: &Path) -> Result<Self> {
        let path = data_dir.join(Self::KEY_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let bytes = decode_hex(text.trim()).ok_or_else(|| {
                    Error::Config(format!(
                        "{} does not hold a 32-byte hex key; delete it and restart to generate a new one (report tokens change: pages served before report to stale tokens for a day)",
                        path.display()
                    ))
                })?;
                return Ok(Self::from_key(&bytes));
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(Error::io("read the CSP report key", &path, error)),
        }
        let key: [u8; 32] = rand::random();
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        let mut file = std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| Error::io("create the CSP report key file", &path, e))?;
        file.write_all(hex.as_bytes())
            .map_err(|e| Error::io("write the CSP report key file", &path, e))?;
        tracing::info!(path = %path.display(), "generated the CSP report token key");
        Ok(Self::from_key(&key))
    }

    /// Tokens under this key.
    pub fn from_key(key: &[u8]) -> Self {
        ReportTokens {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key),
        }
    }

    /// The token epoch at `now`.
    pub fn epoch(now: OffsetDateTime) -> i64 {
        now.unix_timestamp().div_euclid(TOKEN_EPOCH_SECS)
    }

    /// The site's token for an epoch: 43 URL-safe characters.
    pub fn token(&self, site: &str, epoch: i64) -> String {
        let tag = ring::hmac::sign(&self.key, &token_message(site, epoch));
        URL_SAFE_NO_PAD.encode(tag.as_ref())
    }

    /// Whether `token` is the site's token for the epoch of `now` or the one before, compared
    /// in constant time.
    pub fn verify(&self, site: &str, token: &str, now: OffsetDateTime) -> bool {
        let Ok(tag) = URL_SAFE_NO_PAD.decode(token) else {
            return false;
        };
        let epoch = Self::epoch(now);
        [epoch, epoch - 1]
            .iter()
            .any(|&epoch| ring::hmac::verify(&self.key, &token_message(site, epoch), &tag).is_ok())
    }
}

fn token_message(site: &str, epoch: i64) -> Vec<u8> {
    format!("autohttps csp-report token\0{site}\0{epoch}").into_bytes()
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

/// A token bucket's size and refill rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Reports that may arrive at once.
    pub burst: u32,
    /// Reports per second, sustained.
    pub per_second: f64,
}

/// What one client and one site may send, and what a site may keep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReportLimits {
    /// Per client address (IPv6 by /64). A page with many `http://` resources sends one report
    /// for each, so the burst is generous.
    pub client: RateLimit,
    /// Per site, spent only by reports carrying the site's token.
    pub site: RateLimit,
    /// Client buckets kept; past it, new clients share one overflow bucket.
    pub max_clients: usize,
    /// Violations read from one request; the rest are dropped and counted.
    pub violations_per_report: usize,
    /// Bytes of findings kept per site ([`crate::store::finding_bytes`]).
    pub budget_bytes: u64,
}

impl Default for ReportLimits {
    fn default() -> Self {
        ReportLimits {
            client: RateLimit {
                burst: 100,
                per_second: 2.0,
            },
            site: RateLimit {
                burst: 1000,
                per_second: 50.0,
            },
            max_clients: 10_000,
            violations_per_report: 20,
            budget_bytes: 256 * 1024,
        }
    }
}

/// Token buckets by key, bounded: buckets that have refilled are dropped when room is needed
/// (a new bucket would be identical); when every bucket is busy, new keys share one.
#[derive(Debug)]
struct Buckets<K> {
    limit: RateLimit,
    max_keys: usize,
    buckets: HashMap<K, Bucket>,
    overflow: Bucket,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: OffsetDateTime,
}

impl Bucket {
    fn full(limit: RateLimit, now: OffsetDateTime) -> Self {
        Bucket {
            tokens: f64::from(limit.burst),
            at: now,
        }
    }

    fn refill(&mut self, limit: RateLimit, now: OffsetDateTime) {
        let elapsed = (now - self.at).as_seconds_f64().max(0.0);
        self.tokens = (self.tokens + elapsed * limit.per_second).min(f64::from(limit.burst));
        self.at = now;
    }

    fn take(&mut self, limit: RateLimit, now: OffsetDateTime) -> bool {
        self.refill(limit, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl<K: std::hash::Hash + Eq> Buckets<K> {
    fn new(limit: RateLimit, max_keys: usize, now: OffsetDateTime) -> Self {
        Buckets {
            limit,
            max_keys,
            buckets: HashMap::new(),
            overflow: Bucket::full(limit, now),
        }
    }

    /// Takes one token from `key`'s bucket; `false` when it is empty.
    fn take(&mut self, key: K, now: OffsetDateTime) -> bool {
        let limit = self.limit;
        if !self.buckets.contains_key(&key) && self.buckets.len() >= self.max_keys {
            self.buckets.retain(|_, bucket| {
                bucket.refill(limit, now);
                bucket.tokens < f64::from(limit.burst)
            });
            if self.buckets.len() >= self.max_keys {
                return self.overflow.take(limit, now);
            }
        }
        self.buckets
            .entry(key)
            .or_insert_with(|| Bucket::full(limit, now))
            .take(limit, now)
    }
}

/// The key of a client's bucket: its IPv4 address, or its IPv6 /64 (one host's share).
fn client_key(address: Option<IpAddr>) -> Option<IpAddr> {
    address.map(|address| match address {
        IpAddr::V4(_) => address,
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
    })
}

/// The client's address: what Envoy's report route put in [`CLIENT_ADDRESS_HEADER`].
fn client_address(headers: &HeaderMap) -> Option<IpAddr> {
    headers
        .get(CLIENT_ADDRESS_HEADER)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse().ok())
}

/// The collector's state.
#[derive(Clone)]
struct Reports {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    tokens: ReportTokens,
    limits: ReportLimits,
    clients: Arc<Mutex<Buckets<Option<IpAddr>>>>,
    sites: Arc<Mutex<Buckets<String>>>,
}

impl Reports {
    fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        tokens: ReportTokens,
        limits: ReportLimits,
    ) -> Self {
        let now = clock.now();
        // Site buckets exist only for reports with a valid token, so at most one per site.
        let sites = Buckets::new(limits.site, usize::MAX, now);
        Reports {
            clients: Arc::new(Mutex::new(Buckets::new(
                limits.client,
                limits.max_clients,
                now,
            ))),
            sites: Arc::new(Mutex::new(sites)),
            store,
            clock,
            tokens,
            limits,
        }
    }
}

/// The route for the internal listener.
pub fn router(
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    tokens: ReportTokens,
    limits: ReportLimits,
) -> Router {
    Router::new()
        .route(REPORT_PATH, post(receive))
        .layer(DefaultBodyLimit::max(MAX_REPORT_BYTES))
        .with_state(Reports::new(store, clock, tokens, limits))
}

/// Refusal log lines share this budget; every refusal is counted in metrics.
static REFUSAL_LOG: LogBudget = LogBudget::new(10, Duration::from_secs(60));

async fn receive(
    State(reports): State<Reports>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(|h| h.split(':').next().unwrap_or(h).to_owned())
        .unwrap_or_default();
    let request = ReportRequest {
        client: client_address(&headers),
        query: uri.query().unwrap_or_default().to_owned(),
        host,
    };
    let result = tokio::task::spawn_blocking(move || file_report(&reports, &request, &body)).await;
    match result {
        Ok(Ok(_filed)) => StatusCode::NO_CONTENT.into_response(),
        Ok(Err(ReportError::Refused(reason))) => {
            COUNTERS.report_refused(reason);
            if let Some(suppressed) = REFUSAL_LOG.admit() {
                tracing::info!(
                    reason = reason.as_str(),
                    suppressed,
                    "CSP report refused (counted in autohttps_csp_reports_refused_total)"
                );
            }
            (refusal_status(reason), refusal_message(reason)).into_response()
        }
        Ok(Err(ReportError::Store(error))) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("filing the report failed: {error}\n"),
        )
            .into_response(),
        Err(join) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("filing the report failed: {join}\n"),
        )
            .into_response(),
    }
}

fn refusal_status(reason: ReportRefusal) -> StatusCode {
    match reason {
        ReportRefusal::ClientRateLimited | ReportRefusal::SiteRateLimited => {
            StatusCode::TOO_MANY_REQUESTS
        }
        ReportRefusal::UnknownSite => StatusCode::NOT_FOUND,
        ReportRefusal::MissingToken
        | ReportRefusal::BadToken
        | ReportRefusal::NotReportMode
        | ReportRefusal::WrongHost => StatusCode::FORBIDDEN,
    }
}

fn refusal_message(reason: ReportRefusal) -> &'static str {
    match reason {
        ReportRefusal::MissingToken => {
            "a report needs the site and token the page's report-uri carries\n"
        }
        ReportRefusal::BadToken => {
            "the report token is not this site's (reports are accepted for two days after the page was served)\n"
        }
        ReportRefusal::UnknownSite => "no such site\n",
        ReportRefusal::NotReportMode => "the site is not in mixed-content report mode\n",
        ReportRefusal::WrongHost => "reports go to one of the site's own names\n",
        ReportRefusal::ClientRateLimited => "too many reports from this address; slow down\n",
        ReportRefusal::SiteRateLimited => "too many reports for this site; slow down\n",
    }
}

/// What a report request carries besides its body.
#[derive(Debug, Clone)]
struct ReportRequest {
    /// The client's address, when Envoy said.
    client: Option<IpAddr>,
    /// The request's query string (`site=…&token=…`).
    query: String,
    /// The `Host` it was sent to, without port.
    host: String,
}

/// Why a report was not filed.
#[derive(Debug)]
enum ReportError {
    Refused(ReportRefusal),
    Store(crate::error::Error),
}

impl From<ReportRefusal> for ReportError {
    fn from(reason: ReportRefusal) -> Self {
        ReportError::Refused(reason)
    }
}

/// The value of `name` in a query string.
fn query_value<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// Files a report; returns how many violations were filed. Checks run cheapest first, and the
/// site's bucket is spent only once the token is good.
fn file_report(
    reports: &Reports,
    request: &ReportRequest,
    body: &[u8],
) -> Result<usize, ReportError> {
    let now = reports.clock.now();
    let client_allowed = lock(&reports.clients).take(client_key(request.client), now);
    if !client_allowed {
        return Err(ReportRefusal::ClientRateLimited.into());
    }
    let (Some(site), Some(token)) = (
        query_value(&request.query, "site"),
        query_value(&request.query, "token"),
    ) else {
        return Err(ReportRefusal::MissingToken.into());
    };
    if !reports.tokens.verify(site, token, now) {
        return Err(ReportRefusal::BadToken.into());
    }
    let stored = reports
        .store
        .site(site)
        .map_err(ReportError::Store)?
        .ok_or(ReportRefusal::UnknownSite)?;
    if stored.policy.mixed_content != MixedContent::Report {
        return Err(ReportRefusal::NotReportMode.into());
    }
    let name = Hostname::parse(&request.host).map_err(|_| ReportRefusal::WrongHost)?;
    if !stored.hostnames.iter().any(|h| h.name == name) {
        return Err(ReportRefusal::WrongHost.into());
    }
    let site_allowed = lock(&reports.sites).take(stored.name.clone(), now);
    if !site_allowed {
        return Err(ReportRefusal::SiteRateLimited.into());
    }
    COUNTERS
        .csp_reports_accepted
        .fetch_add(1, Ordering::Relaxed);
    let violations = parse_report(body);
    let mut filed = 0;
    let mut dropped = violations
        .len()
        .saturating_sub(reports.limits.violations_per_report);
    for violation in violations
        .into_iter()
        .take(reports.limits.violations_per_report)
    {
        // The page must be on the name the report was sent to: one site cannot file reports
        // for another, nor for another name.
        let page_host = url_host(&violation.page).and_then(|h| Hostname::parse(h).ok());
        if page_host.as_ref() != Some(&name) {
            dropped += 1;
            continue;
        }
        let recorded = reports
            .store
            .record_mixed_content(
                &stored.name,
                &violation.page,
                &violation.resource,
                &violation.directive,
                now,
                reports.limits.budget_bytes,
            )
            .map_err(ReportError::Store)?;
        if let Recorded::Added { evicted } = recorded {
            COUNTERS
                .csp_findings_evicted
                .fetch_add(evicted, Ordering::Relaxed);
        }
        filed += 1;
    }
    COUNTERS
        .csp_violations_filed
        .fetch_add(filed as u64, Ordering::Relaxed);
    COUNTERS
        .csp_violations_dropped
        .fetch_add(dropped as u64, Ordering::Relaxed);
    Ok(filed)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use tempfile::TempDir;

    use super::*;
    use crate::clock::ManualClock;
    use crate::store::{NewSite, SitePolicy, SqliteStore};

    #[test]
    fn csp_level_2_report_is_read() {
        let body = br#"{"csp-report": {"document-uri": "https://shop.example/cart?id=7#top",
            "blocked-uri": "http://cdn.example/logo.png", "violated-directive": "img-src",
            "effective-directive": "img-src", "original-policy": "default-src https:"}}"#;
        assert_eq!(
            parse_report(body),
            vec![Violation {
                page: "https://shop.example/cart".into(),
                resource: "http://cdn.example/logo.png".into(),
                directive: "img-src".into(),
            }]
        );
    }

    #[test]
    fn reporting_api_batch_is_read_and_other_types_skipped() {
        let body = br#"[
            {"type": "csp-violation", "url": "https://a.example/", "body": {
                "documentURL": "https://a.example/", "blockedURL": "http://x.example/a.js",
                "effectiveDirective": "script-src-elem"}},
            {"type": "deprecation", "body": {"id": "x"}},
            {"type": "csp-violation", "body": {"documentURL": "https://a.example/b",
                "blockedURL": "http://x.example/b.css", "effectiveDirective": "style-src-elem"}}
        ]"#;
        let found = parse_report(body);
        assert_eq!(found.len(), 2);
        assert_eq!(found[1].page, "https://a.example/b");
        assert_eq!(found[1].directive, "style-src-elem");
    }

    #[test]
    fn garbage_and_incomplete_reports_yield_nothing() {
        for body in [
            &b"not json"[..],
            br#"{"csp-report": {"document-uri": "https://a.example/"}}"#,
            br#"{"something": 1}"#,
            br#"[{"type": "csp-violation"}]"#,
            br#"42"#,
        ] {
            assert!(
                parse_report(body).is_empty(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn long_urls_are_clipped_and_control_characters_dropped() {
        let long = format!("http://x.example/{}", "a".repeat(5000));
        let body = serde_json::json!({"csp-report": {
            "document-uri": "https://a.example/\u{0007}page", "blocked-uri": long}})
        .to_string();
        let found = parse_report(body.as_bytes());
        assert_eq!(found[0].resource.len(), MAX_URL_LEN);
        assert_eq!(found[0].page, "https://a.example/page");
    }

    const NOW: i64 = 1_800_000_000;

    fn test_tokens() -> ReportTokens {
        ReportTokens::from_key(b"a key for the collector's tests")
    }

    fn limits() -> ReportLimits {
        ReportLimits {
            client: RateLimit {
                burst: 1_000_000,
                per_second: 0.0,
            },
            site: RateLimit {
                burst: 1_000_000,
                per_second: 0.0,
            },
            ..ReportLimits::default()
        }
    }

    /// Sites `shop` and `other` in report mode, `plain` not, over a real SQLite store.
    fn reports_over_a_real_store(limits: ReportLimits) -> (Reports, Arc<ManualClock>, TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(&dir.path().join("autohttps.db")).expect("store"));
        let now = OffsetDateTime::from_unix_timestamp(NOW).expect("time");
        for (name, primary, extra, mixed_content) in [
            (
                "shop",
                "shop.example",
                "www.shop.example",
                MixedContent::Report,
            ),
            (
                "other",
                "other.example",
                "www.other.example",
                MixedContent::Report,
            ),
            (
                "plain",
                "plain.example",
                "www.plain.example",
                MixedContent::Off,
            ),
        ] {
            store
                .create_site(
                    NewSite {
                        name: name.into(),
                        primary: Hostname::parse(primary).expect("name"),
                        hostnames: vec![Hostname::parse(extra).expect("name")],
                        policy: SitePolicy {
                            mixed_content,
                            ..SitePolicy::default()
                        },
                    },
                    now,
                    now,
                )
                .expect("site");
        }
        let clock = Arc::new(ManualClock::new(now));
        let reports = Reports::new(
            store,
            Arc::clone(&clock) as Arc<dyn Clock>,
            test_tokens(),
            limits,
        );
        (reports, clock, dir)
    }

    fn report(page: &str, resource: &str) -> Vec<u8> {
        serde_json::json!({"csp-report": {"document-uri": page, "blocked-uri": resource,
            "effective-directive": "img-src"}})
        .to_string()
        .into_bytes()
    }

    /// A request to `host` from `client` with `site`'s token.
    fn signed(host: &str, site: &str, client: &str) -> ReportRequest {
        let epoch = ReportTokens::epoch(OffsetDateTime::from_unix_timestamp(NOW).expect("time"));
        ReportRequest {
            client: client.parse().ok(),
            query: format!("site={site}&token={}", test_tokens().token(site, epoch)),
            host: host.into(),
        }
    }

    fn refusal(result: Result<usize, ReportError>) -> ReportRefusal {
        match result {
            Err(ReportError::Refused(reason)) => reason,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn reports_are_filed_per_site_and_page_and_counted() {
        let (reports, _clock, _dir) = reports_over_a_real_store(limits());
        let body = report(
            "https://www.shop.example/cart?x=1",
            "http://cdn.example/a.png",
        );
        for _ in 0..3 {
            let request = signed("www.shop.example", "shop", "192.0.2.1");
            assert_eq!(file_report(&reports, &request, &body).ok(), Some(1));
        }
        let other = report("https://shop.example/", "http://cdn.example/b.js");
        let request = signed("Shop.Example.", "shop", "192.0.2.1");
        assert_eq!(file_report(&reports, &request, &other).ok(), Some(1));
        let findings = reports.store.mixed_content("shop").expect("findings");
        assert_eq!(findings.len(), 2);
        let cart = findings
            .iter()
            .find(|f| f.page == "https://www.shop.example/cart")
            .expect("cart page");
        assert_eq!(cart.reports, 3);
        assert_eq!(cart.resource, "http://cdn.example/a.png");
        assert!(
            reports
                .store
                .mixed_content("other")
                .expect("none")
                .is_empty()
        );
    }

    #[test]
    fn a_report_without_a_token_or_with_a_wrong_one_is_refused_and_counted() {
        let (reports, _clock, _dir) = reports_over_a_real_store(limits());
        let body = report("https://shop.example/", "http://evil.example/x.png");
        let before = COUNTERS.refused(ReportRefusal::MissingToken);
        let bare = ReportRequest {
            client: None,
            query: String::new(),
            host: "shop.example".into(),
        };
        assert_eq!(
            refusal(file_report(&reports, &bare, &body)),
            ReportRefusal::MissingToken
        );
        let mut forged = signed("shop.example", "shop", "192.0.2.1");
        forged.query = format!("site=shop&token={}", "A".repeat(43));
        assert_eq!(
            refusal(file_report(&reports, &forged, &body)),
            ReportRefusal::BadToken
        );
        // Another site's token does not open this one.
        let mut borrowed = signed("shop.example", "other", "192.0.2.1");
        borrowed.query = borrowed.query.replace("site=other", "site=shop");
        assert_eq!(
            refusal(file_report(&reports, &borrowed, &body)),
            ReportRefusal::BadToken
        );
        // The counters are process-wide; the handler counts, so count what it would.
        COUNTERS.report_refused(ReportRefusal::MissingToken);
        assert!(COUNTERS.refused(ReportRefusal::MissingToken) > before);
        assert!(
            reports
                .store
                .mixed_content("shop")
                .expect("none")
                .is_empty()
        );
    }

    #[test]
    fn a_site_not_in_report_mode_or_another_host_is_refused() {
        let (reports, _clock, _dir) = reports_over_a_real_store(limits());
        let body = report("https://plain.example/", "http://x.example/a.png");
        let request = signed("plain.example", "plain", "192.0.2.1");
        assert_eq!(
            refusal(file_report(&reports, &request, &body)),
            ReportRefusal::NotReportMode
        );
        // shop's token, sent to other's name.
        let body = report("https://other.example/", "http://x.example/a.png");
        let request = signed("other.example", "shop", "192.0.2.1");
        assert_eq!(
            refusal(file_report(&reports, &request, &body)),
            ReportRefusal::WrongHost
        );
    }

    #[test]
    fn a_violation_about_another_sites_page_is_dropped() {
        let (reports, _clock, _dir) = reports_over_a_real_store(limits());
        let body = report("https://other.example/", "http://evil.example/x.png");
        let request = signed("shop.example", "shop", "192.0.2.1");
        assert_eq!(file_report(&reports, &request, &body).ok(), Some(0));
        for site in ["shop", "other"] {
            assert!(reports.store.mixed_content(site).expect("none").is_empty());
        }
    }

    #[test]
    fn a_client_over_its_rate_is_refused_without_costing_others_or_the_site() {
        let (reports, clock, _dir) = reports_over_a_real_store(ReportLimits {
            client: RateLimit {
                burst: 5,
                per_second: 1.0,
            },
            site: RateLimit {
                burst: 8,
                per_second: 1.0,
            },
            ..ReportLimits::default()
        });
        let body = report("https://shop.example/", "http://cdn.example/a.png");
        // The flooder sends junk without a token: its bucket empties, the site's does not.
        let junk = ReportRequest {
            client: "198.51.100.7".parse().ok(),
            query: "site=shop".into(),
            host: "shop.example".into(),
        };
        for _ in 0..5 {
            assert_eq!(
                refusal(file_report(&reports, &junk, &body)),
                ReportRefusal::MissingToken
            );
        }
        for _ in 0..100 {
            assert_eq!(
                refusal(file_report(&reports, &junk, &body)),
                ReportRefusal::ClientRateLimited
            );
        }
        // A genuine client still reports, up to its own burst.
        let genuine = signed("shop.example", "shop", "192.0.2.1");
        for _ in 0..5 {
            assert_eq!(file_report(&reports, &genuine, &body).ok(), Some(1));
        }
        assert_eq!(
            refusal(file_report(&reports, &genuine, &body)),
            ReportRefusal::ClientRateLimited
        );
        // A second genuine client spends the site's remaining 3, then the site is limited.
        let second = signed("shop.example", "shop", "192.0.2.2");
        for _ in 0..3 {
            assert_eq!(file_report(&reports, &second, &body).ok(), Some(1));
        }
        assert_eq!(
            refusal(file_report(&reports, &second, &body)),
            ReportRefusal::SiteRateLimited
        );
        // Buckets refill with time.
        clock.advance(Duration::from_secs(2));
        assert_eq!(file_report(&reports, &genuine, &body).ok(), Some(1));
    }

    #[test]
    fn client_buckets_are_bounded_and_new_clients_share_an_overflow_bucket() {
        let now = OffsetDateTime::from_unix_timestamp(NOW).expect("time");
        let limit = RateLimit {
            burst: 2,
            per_second: 0.001,
        };
        let mut buckets = Buckets::new(limit, 3, now);
        for client in 0..3u8 {
            assert!(buckets.take(client, now));
        }
        // Full of busy buckets: newcomers share one bucket of the same size.
        assert!(buckets.take(10, now));
        assert!(buckets.take(11, now));
        assert!(!buckets.take(12, now));
        assert_eq!(buckets.buckets.len(), 3);
        // Once the busy buckets have refilled they are dropped to make room.
        let later = now + time::Duration::seconds(2000);
        assert!(buckets.take(13, later));
        assert_eq!(buckets.buckets.len(), 1);
    }

    #[test]
    fn ipv6_clients_share_a_bucket_per_64() {
        assert_eq!(
            client_key("2001:db8:1:2:aaaa::1".parse().ok()),
            client_key("2001:db8:1:2:bbbb::2".parse().ok())
        );
        assert_ne!(
            client_key("2001:db8:1:2::1".parse().ok()),
            client_key("2001:db8:1:3::1".parse().ok())
        );
    }

    #[test]
    fn violations_per_report_are_capped() {
        let (reports, _clock, _dir) = reports_over_a_real_store(limits());
        let batch: Vec<serde_json::Value> = (0..409)
            .map(|i| {
                serde_json::json!({"type": "csp-violation", "body": {
                    "documentURL": "https://shop.example/", "blockedURL": format!("http://x.example/{i}"),
                    "effectiveDirective": "img-src"}})
            })
            .collect();
        let body = serde_json::to_vec(&batch).expect("json");
        let request = signed("shop.example", "shop", "192.0.2.1");
        assert_eq!(
            file_report(&reports, &request, &body).ok(),
            Some(limits().violations_per_report)
        );
        assert_eq!(
            reports.store.mixed_content("shop").expect("findings").len(),
            limits().violations_per_report
        );
    }

    #[test]
    fn a_flood_stays_under_the_budget_and_never_evicts_a_recurring_finding() {
        let budget = 20 * 1024;
        let (reports, clock, _dir) = reports_over_a_real_store(ReportLimits {
            budget_bytes: budget,
            ..limits()
        });
        let request = signed("shop.example", "shop", "192.0.2.1");
        let genuine = report("https://shop.example/", "http://cdn.example/logo.png");
        for i in 0..1000 {
            // Recurring: reported again well before the flood cycles the budget (about 60 junk
            // findings fit), as a page that real visitors load reports on every view.
            if i % 20 == 0 {
                assert_eq!(file_report(&reports, &request, &genuine).ok(), Some(1));
            }
            let junk = report(
                "https://shop.example/",
                &format!("http://junk.example/{i}/{}", "j".repeat(200)),
            );
            assert_eq!(file_report(&reports, &request, &junk).ok(), Some(1));
            clock.advance(Duration::from_millis(10));
            assert!(reports.store.mixed_content_bytes("shop").expect("bytes") <= budget);
        }
        let findings = reports.store.mixed_content("shop").expect("findings");
        let logo = findings
            .iter()
            .find(|f| f.resource == "http://cdn.example/logo.png")
            .expect("the recurring finding is kept");
        assert_eq!(logo.reports, 50);
        assert!(findings.len() < 100, "{}", findings.len());
        // A genuine report arriving after the flood is filed too.
        let late = report("https://shop.example/late", "http://cdn.example/late.png");
        assert_eq!(file_report(&reports, &request, &late).ok(), Some(1));
        assert!(
            reports
                .store
                .mixed_content("shop")
                .expect("findings")
                .iter()
                .any(|f| f.resource == "http://cdn.example/late.png")
        );
    }

    #[test]
    fn removing_a_site_removes_its_findings() {
        let (reports, _clock, _dir) = reports_over_a_real_store(limits());
        let body = report("https://shop.example/", "http://cdn.example/a.png");
        let request = signed("shop.example", "shop", "192.0.2.1");
        assert_eq!(file_report(&reports, &request, &body).ok(), Some(1));
        reports.store.delete_site("shop").expect("delete");
        assert!(
            reports
                .store
                .mixed_content("shop")
                .expect("none")
                .is_empty()
        );
    }

    #[test]
    fn the_token_key_is_created_owner_only_and_read_back() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let first = ReportTokens::load_or_create(dir.path()).expect("created");
        let path = dir.path().join(ReportTokens::KEY_FILE);
        let mode = std::fs::metadata(&path)
            .expect("key file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = ReportTokens::load_or_create(dir.path()).expect("read back");
        assert_eq!(first.token("shop", 7), again.token("shop", 7));
        assert_eq!(first.token("shop", 7).len(), 43);
        assert!(!format!("{first:?}").contains(&std::fs::read_to_string(&path).expect("key")));
        std::fs::write(&path, "not hex").expect("spoilt");
        let error = ReportTokens::load_or_create(dir.path()).expect_err("refused");
        assert!(
            error.to_string().contains("delete it and restart"),
            "{error}"
        );
    }

    #[test]
    fn url_host_reads_the_authority() {
        assert_eq!(url_host("https://a.example:8443/x"), Some("a.example"));
        assert_eq!(url_host("http://user@b.example/"), Some("b.example"));
        assert_eq!(url_host("ftp://c.example/"), None);
    }
}
