//! The admin API contract: every request and response body of the sidecar's admin API, as
//! plain serde types. The server answers with these, the CLI reads them, the console can too.
//!
//! The crate is small on purpose (serde, `time` and the filter's policy vocabulary, no I/O), so
//! a `wasm32-unknown-unknown` build of the console can use it. With the `openapi` feature each
//! type also describes itself for the server's generated OpenAPI document
//! (`GET /v1/openapi.json`, `autohttps api openapi`).
//!
//! The JSON of these types is the wire format other programs rely on: the sidecar's
//! `admin_contract` test pins it route by route, and this crate's tests read those golden
//! answers back through the types.
#![warn(missing_docs)]

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

// The policy vocabulary is the filter's own: what the API accepts is what the edge enforces.
pub use autohttps_filter::policy::{DEFAULT_HSTS_MAX_AGE, HttpsMode, MixedContent, RedirectKind};

#[cfg(feature = "openapi")]
pub mod openapi;

/// Every failure: `{"error": "..."}`, the message saying what was wrong and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    /// What was wrong, and what to do about it.
    pub error: String,
}

/// `GET /healthz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Health {
    /// Always `ok` while the admin API answers.
    pub status: String,
}

/// HSTS settings (RFC 6797), as sent and as answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HstsPolicy {
    /// Whether `Strict-Transport-Security` is added over HTTPS.
    pub enabled: bool,
    /// Its `max-age`, in seconds (at most 63072000, two years).
    pub max_age: u64,
    /// Whether it carries `includeSubDomains`.
    #[serde(default)]
    pub include_subdomains: bool,
    /// Whether it carries `preload` (which needs `includeSubDomains` and a year's max-age).
    #[serde(default)]
    pub preload: bool,
}

impl Default for HstsPolicy {
    fn default() -> Self {
        Self {
            enabled: false,
            max_age: DEFAULT_HSTS_MAX_AGE,
            include_subdomains: false,
            preload: false,
        }
    }
}

/// `POST /v1/sites`: a new site. Its certificate is ordered automatically.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateSite {
    /// Site id: lower-case letters, digits and '-'.
    pub name: String,
    /// The primary domain.
    pub primary: String,
    /// More hostnames: subdomains of the primary domain, or aliases.
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// auto (default), force or disable.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = openapi::HttpsModeSchema))]
    pub https: HttpsMode,
    /// permanent (default) or temporary redirects.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = openapi::RedirectKindSchema))]
    pub redirect: RedirectKind,
    /// HSTS; absent: off.
    #[serde(default)]
    pub hsts: Option<HstsPolicy>,
    /// off (default), upgrade or report.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = openapi::MixedContentSchema))]
    pub mixed_content: MixedContent,
    /// The name every redirect goes to: one of the site's exact hostnames.
    #[serde(default)]
    pub canonical_host: Option<String>,
}

/// `PATCH /v1/sites/{site}`: only the fields present change.
// The `Option` fields have no `#[serde(default)]` (an absent one is `None` anyway): with it,
// serde would take an empty JSON array as a body that changes nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct UpdateSite {
    /// auto, force or disable.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<openapi::HttpsModeSchema>))]
    pub https: Option<HttpsMode>,
    /// permanent or temporary.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<openapi::RedirectKindSchema>))]
    pub redirect: Option<RedirectKind>,
    /// HSTS, replaced whole.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hsts: Option<HstsPolicy>,
    /// off, upgrade or report.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<openapi::MixedContentSchema>))]
    pub mixed_content: Option<MixedContent>,
    /// Absent: unchanged; `null`: none; a name: that one (one of the site's exact hostnames).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub canonical_host: Option<Option<String>>,
}

/// A field that is present, even as `null` (`Some(None)`), as opposed to absent (`None`).
fn present<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(deserializer).map(Some)
}

/// `POST /v1/sites/{site}/hostnames`: a subdomain or alias to add.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AddHostname {
    /// The hostname (normalised by the server: lower case, IDN as A-labels, no trailing dot).
    pub hostname: String,
}

/// `GET /v1/sites/{site}/events` query.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
pub struct EventsQuery {
    /// How many events, newest first (default 100, at most 10000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

/// A site's HTTPS policy: everything the filter needs to decide for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SitePolicy {
    /// auto, force or disable.
    #[cfg_attr(feature = "openapi", schema(value_type = openapi::HttpsModeSchema))]
    pub https: HttpsMode,
    /// Permanent or temporary redirects.
    #[cfg_attr(feature = "openapi", schema(value_type = openapi::RedirectKindSchema))]
    pub redirect: RedirectKind,
    /// HSTS.
    pub hsts: HstsPolicy,
    /// Mixed-content protection.
    #[cfg_attr(feature = "openapi", schema(value_type = openapi::MixedContentSchema))]
    pub mixed_content: MixedContent,
    /// The name every redirect goes to, if any.
    pub canonical_host: Option<String>,
}

/// How a hostname relates to its site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum HostnameKind {
    /// The site's primary domain.
    Primary,
    /// A name below the primary domain.
    Subdomain,
    /// A linked domain outside the primary domain.
    Alias,
}

/// One of a site's hostnames.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SiteHostname {
    /// The normalised name.
    pub name: String,
    /// Primary, subdomain or alias.
    pub kind: HostnameKind,
}

/// Where a site stands with issuance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct IssuanceSchedule {
    /// When the next attempt (first issuance, change, retry or renewal) is due, if any.
    #[serde(with = "time::serde::rfc3339::option")]
    pub next_attempt_at: Option<OffsetDateTime>,
    /// Consecutive failed attempts (0 after a success).
    pub failures: u32,
    /// The last failure's message (the CA's problem detail, or the DNS verdict).
    pub last_problem: Option<String>,
    /// Whether an explicit regenerate is waiting.
    pub regenerate_requested: bool,
}

/// A site with its hostnames, policy and issuance schedule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Site {
    /// The site's id (lower-case letters, digits and '-').
    pub name: String,
    /// The primary domain.
    pub primary: String,
    /// All hostnames, primary first.
    pub hostnames: Vec<SiteHostname>,
    /// HTTPS policy.
    pub policy: SitePolicy,
    /// When the site was created.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Issuance schedule.
    pub issuance: IssuanceSchedule,
}

/// Why the policy feed cannot serve a site's entry: it fails the filter's own validation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PolicyRejection {
    /// The site's id.
    pub site: String,
    /// What the filter's validation says is wrong, one problem each (paths inside the site's
    /// entry, e.g. `hostnames[1]: ...`).
    pub problems: Vec<String>,
    /// Whether the site's previous good entry is served in its place (else the site is absent
    /// from the policy, so the edge treats its names as unknown).
    pub previous_kept: bool,
}

/// A site as `GET /v1/sites/{site}` shows it: the site and, when the policy feed cannot serve
/// its entry, why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SiteDetail {
    /// The site.
    #[serde(flatten)]
    pub site: Site,
    /// `null` when the edge serves the site's entry as stored.
    pub policy_rejected: Option<PolicyRejection>,
}

/// A certificate a site serves (never its key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Certificate {
    /// Its id in the store.
    pub id: i64,
    /// The site it was issued for.
    pub site: String,
    /// Its SANs.
    pub names: Vec<String>,
    /// Validity start.
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: OffsetDateTime,
    /// Validity end.
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    /// Serial number, lower-case hex.
    pub serial: String,
    /// The RFC 9773 §4.1 certificate identifier (for ARI), when the leaf has an AKI.
    pub ari_id: Option<String>,
    /// When it was stored.
    #[serde(with = "time::serde::rfc3339")]
    pub issued_at: OffsetDateTime,
}

/// An ACME order created at the CA and not completed yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OrderSummary {
    /// The names ordered.
    pub names: Vec<String>,
    /// The order URL (RFC 8555 §7.1.3).
    pub order_url: String,
    /// When it was created.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// `GET /v1/sites/{site}/certificates`: what a site serves, what is missing and what is next.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CertificateStatus {
    /// The site.
    pub site: String,
    /// The certificates it serves now, newest first.
    pub certificates: Vec<Certificate>,
    /// Its hostnames no current certificate covers.
    pub uncovered: Vec<String>,
    /// Orders created at the CA and not completed yet.
    pub orders_in_flight: Vec<OrderSummary>,
    /// Whether an issuance attempt for it is running now.
    pub working: bool,
    /// Its issuance schedule.
    pub issuance: IssuanceSchedule,
}

/// A site's certificate state at a glance, as `site list` and the console show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum CertificateState {
    /// Every name is covered.
    Ok,
    /// Some names are covered, others not yet.
    Partial,
    /// The last attempt failed.
    Failing,
    /// Nothing issued yet.
    Pending,
}

/// [`CertificateStatus`] summed up: its state, soonest expiry and uncovered names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CertificateOverview {
    /// ok, partial, failing or pending.
    pub state: CertificateState,
    /// The earliest `not_after` of the certificates served.
    #[serde(with = "time::serde::rfc3339::option")]
    pub soonest_expiry: Option<OffsetDateTime>,
    /// How many of the site's names no certificate covers.
    pub uncovered: usize,
}

impl CertificateStatus {
    /// The state at a glance: `failing` when the last attempt failed, else `pending` with no
    /// certificate, `ok` when every name is covered, `partial` otherwise.
    pub fn overview(&self) -> CertificateOverview {
        let state = match (
            self.certificates.is_empty(),
            self.uncovered.len(),
            self.issuance.failures > 0,
        ) {
            (_, _, true) => CertificateState::Failing,
            (true, _, false) => CertificateState::Pending,
            (false, 0, false) => CertificateState::Ok,
            (false, _, false) => CertificateState::Partial,
        };
        CertificateOverview {
            state,
            soonest_expiry: self.certificates.iter().map(|c| c.not_after).min(),
            uncovered: self.uncovered.len(),
        }
    }
}

/// `POST /v1/sites/{site}/regenerate`: accepted; the attempt runs in the background.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RegenerateAccepted {
    /// The site.
    pub site: String,
    /// `regeneration scheduled`.
    pub status: String,
}

/// One entry of a site's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Event {
    /// Id, increasing with time.
    pub id: i64,
    /// The site.
    pub site: String,
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// What happened (`order-created`, `certificate-issued`, `attempt-failed`, `dns-not-pointing`…).
    pub kind: String,
    /// Words for humans.
    pub message: String,
    /// The RFC 8555 §6.7 problem type when the CA sent one.
    pub problem_type: Option<String>,
    /// A short label for metrics (`acme:rateLimited`, `dns`…), for failures.
    pub reason: Option<String>,
}

/// A resource a page of the site loads insecurely, as browsers reported it (CSP report-only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MixedContentFinding {
    /// The page (scheme, host and path; no query).
    pub page: String,
    /// The resource the policy flagged, e.g. `http://cdn.example/logo.png`.
    pub resource: String,
    /// The CSP directive it fell under (`img-src`, `script-src`…).
    pub directive: String,
    /// How many reports named this pair.
    pub reports: u64,
    /// First report.
    #[serde(with = "time::serde::rfc3339")]
    pub first_seen: OffsetDateTime,
    /// Latest report.
    #[serde(with = "time::serde::rfc3339")]
    pub last_seen: OffsetDateTime,
}

/// What `diagnose` concludes, named as operators know the outcomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// DNS points here and a valid certificate covers the name.
    Ok,
    /// The site has a certificate, but not for this name (the browser's "insecure connection").
    NotInCertificate,
    /// No certificate at all (the "connection error" over HTTPS).
    NoCertificate,
    /// The name does not resolve to the platform, so it is left out of orders.
    DnsNotPointing,
    /// An order is in flight or about to start.
    Pending,
    /// Attempts are failing; see the last problem and the next retry.
    Failing,
}

/// What DNS answered for a name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DnsAnswer {
    /// The name asked about.
    pub name: String,
    /// A and AAAA answers, after following CNAMEs.
    #[cfg_attr(feature = "openapi", schema(value_type = Vec<String>))]
    pub addresses: Vec<IpAddr>,
    /// The CNAME chain, in order, without trailing dots.
    pub cnames: Vec<String>,
    /// Whether the name points at the platform.
    pub points_here: bool,
    /// Why not, in words, when it does not.
    pub problem: Option<String>,
}

/// The certificate serving a name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CertificateSummary {
    /// Serial, hex.
    pub serial: String,
    /// Expiry.
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    /// All its names.
    pub names: Vec<String>,
}

/// `GET /v1/diagnose/{hostname}`: why a hostname has (or has no) working HTTPS, and the fix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Diagnosis {
    /// The name asked about (normalised).
    pub hostname: String,
    /// Its site.
    pub site: String,
    /// What DNS answered.
    pub dns: DnsAnswer,
    /// What the platform expects ("127.0.0.1 or CNAME edge.example.net").
    pub platform: String,
    /// The certificate that covers the name, if any (expired ones included, for the record).
    pub certificate: Option<CertificateSummary>,
    /// The verdict.
    pub verdict: Verdict,
    /// The last attempt's problem, when failing.
    pub last_problem: Option<String>,
    /// When the next attempt is due, if any.
    #[serde(with = "time::serde::rfc3339::option")]
    pub next_attempt_at: Option<OffsetDateTime>,
    /// What to do, in words.
    pub fix: String,
}

#[cfg(test)]
mod tests;
