//! The store: sites, hostnames, certificates, orders in flight, the ACME account, event history.
//!
//! [`Store`] is the seam, the union of one trait per table or concern ([`SiteStore`],
//! [`IssuanceStore`], [`OrderStore`], [`CertificateStore`], [`AcmeStore`], [`HistoryStore`],
//! [`ChangeLog`]); [`SqliteStore`] is the embedded default and [`PostgresStore`] the shared
//! store of a fleet of edge nodes, each implementing every part in a file of its own. Issuance writes certificates here and never talks to
//! SDS; SDS (and the policy feed) read from here and never talk to ACME.

mod postgres;
mod rows;
mod rules;
mod sqlite;

use std::fmt;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::watch;

pub use postgres::{CopyReport, PostgresStore, PostgresStoreOptions, copy_store};
pub use rules::{
    FindingWeight, SITE_CHANGES_KEEP_ROWS, SITE_CHANGES_KEEP_SECS, SiteEventKind,
    change_log_cutoff, counts_from_tallies, findings_to_evict, next_attempt_after, still_the_lease,
};
pub use sqlite::{SqliteStore, create_private_dir};

/// The store's traits, for code that calls a store's methods on a concrete store type
/// (`SqliteStore`, `PostgresStore`) rather than through `dyn Store`.
pub mod prelude {
    pub use super::{
        AcmeStore, CertificateStore, ChangeLog, HistoryStore, IssuanceStore, OrderStore, SiteStore,
        Store,
    };
}

/// The schema version both backends migrate to: migration `n` of the SQLite store and
/// migration `n` of the PostgreSQL store bring the same logical schema (same tables, columns,
/// triggers), so a store copied from one to the other lands on the same version.
pub const SCHEMA_VERSION: usize = 7;

/// How long an HTTP-01 token is kept in the store at most: a node that died mid-validation
/// never removes its tokens, so saving a token also forgets those older than this.
pub const CHALLENGE_LIFETIME: time::Duration = time::Duration::days(1);

/// The node id of the embedded store: one process per SQLite file, so every process that opens
/// it is the same node (a restarted sidecar takes back its own leases at once).
pub const LOCAL_NODE: &str = "local";

/// A batch of the change log: the sites changed after a sequence number, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SiteChanges {
    /// The site ids changed, deduplicated, in order of first change.
    pub sites: Vec<String>,
    /// The sequence number of the last log row read (the `after` of the next call); `after`
    /// itself when nothing changed.
    pub last_seq: u64,
    /// False when the changes after `after` were compacted away (or `after` is not of this
    /// log): the reader must reload everything, then go on from `last_seq`.
    pub complete: bool,
}

/// How a store answered [`IssuanceStore::begin_attempt`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptLease {
    /// This node holds the site's lease until the attempt's `lease_until`; here is the site.
    Taken(Box<Site>),
    /// Another node holds a lease that has not expired yet: leave the site to it.
    HeldElsewhere {
        /// The node holding it.
        node: String,
        /// When its lease expires (then any node may take it).
        until: OffsetDateTime,
    },
    /// There is no such site.
    NoSuchSite,
}

use crate::error::{Error, Result};
use crate::hostname::Hostname;

// The policy vocabulary is the filter's own: the store keeps what the filter enforces.
pub use autohttps_filter::policy::{HttpsMode, MixedContent, RedirectKind};

/// HSTS settings (RFC 6797).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HstsPolicy {
    /// Whether `Strict-Transport-Security` is added over HTTPS.
    pub enabled: bool,
    /// Its `max-age`, in seconds.
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
            max_age: autohttps_filter::policy::DEFAULT_HSTS_MAX_AGE,
            include_subdomains: false,
            preload: false,
        }
    }
}

/// Everything the filter needs to decide for a site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SitePolicy {
    /// auto, force or disable.
    pub https: HttpsMode,
    /// Permanent or temporary redirects.
    pub redirect: RedirectKind,
    /// HSTS.
    pub hsts: HstsPolicy,
    /// Mixed-content protection.
    pub mixed_content: MixedContent,
    /// The name every redirect goes to (one of the site's exact names), if any: with force,
    /// `http://alias/x` goes straight to `https://canonical/x`.
    #[serde(default)]
    pub canonical_host: Option<Hostname>,
}

/// How a hostname relates to its site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostnameKind {
    /// The site's primary domain.
    Primary,
    /// A name below the primary domain.
    Subdomain,
    /// A linked domain outside the primary domain.
    Alias,
}

impl HostnameKind {
    /// Primary if it is the primary domain, subdomain if below it, alias otherwise.
    pub fn of(name: &Hostname, primary: &Hostname) -> Self {
        if name == primary {
            Self::Primary
        } else if name.is_at_or_below(primary) {
            Self::Subdomain
        } else {
            Self::Alias
        }
    }
}

/// One of a site's hostnames.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SiteHostname {
    /// The normalised name.
    pub name: Hostname,
    /// Primary, subdomain or alias.
    pub kind: HostnameKind,
}

/// Where a site stands with issuance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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

/// What one mixed-content finding costs beyond its text (counts, times, the row itself).
pub const FINDING_OVERHEAD_BYTES: u64 = 64;

/// The bytes a finding counts against its site's budget: its page, resource and directive text
/// plus [`FINDING_OVERHEAD_BYTES`].
pub fn finding_bytes(page: &str, resource: &str, directive: &str) -> u64 {
    let text = page.len() + resource.len() + directive.len();
    u64::try_from(text).unwrap_or(u64::MAX) + FINDING_OVERHEAD_BYTES
}

/// What recording one mixed-content violation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// The (page, resource) pair was known: its count and last-seen time were bumped.
    Counted,
    /// A new finding was added; `evicted` less useful ones made room for it.
    Added {
        /// How many findings were evicted.
        evicted: u64,
    },
}

/// A resource a page of the site loads insecurely, as browsers reported it (CSP report-only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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

/// A site with its hostnames and policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Site {
    /// The site's identifier (lower-case letters, digits and '-').
    pub name: String,
    /// The primary domain.
    pub primary: Hostname,
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

impl Site {
    /// The site's hostnames, sorted.
    pub fn names(&self) -> Vec<Hostname> {
        let mut names: Vec<_> = self.hostnames.iter().map(|h| h.name.clone()).collect();
        names.sort();
        names
    }
}

/// PEM text of a private key: never printed, never serialised.
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKeyPem(String);

impl PrivateKeyPem {
    /// Wraps PEM text.
    pub fn new(pem: String) -> Self {
        Self(pem)
    }

    /// The PEM text, for the TLS stack (SDS) and CSR signing only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for PrivateKeyPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKeyPem(<redacted>)")
    }
}

/// A certificate as stored: the chain, its key and what was parsed out of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredCertificate {
    /// Row id.
    pub id: i64,
    /// The site it was issued for.
    pub site: String,
    /// Its SANs.
    pub names: Vec<Hostname>,
    /// Leaf first, then intermediates (PEM).
    #[serde(skip)]
    pub chain_pem: String,
    /// The leaf's private key.
    #[serde(skip)]
    pub key_pem: PrivateKeyPem,
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

impl StoredCertificate {
    /// Whether `name` is among its SANs (exactly, or through a `*.` wildcard SAN).
    pub fn covers(&self, name: &Hostname) -> bool {
        sans_cover(&self.names, name)
    }
}

/// Whether `name` is among `sans` (exactly, or through a `*.` wildcard SAN): the policy
/// engine's one wildcard rule, the same the filter and SDS apply.
fn sans_cover(sans: &[Hostname], name: &Hostname) -> bool {
    autohttps_filter::policy::sans_cover(sans.iter().map(Hostname::as_str), name.as_str())
}

/// What the policy feed, `/metrics` and the SDS index need of a current certificate: which row
/// it is, whose, its names and when it is valid; no PEM text, so reading every site never holds
/// every private key in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateCoverage {
    /// Row id (its chain and key are read with [`Store::certificate`]).
    pub id: i64,
    /// Serial number, lower-case hex.
    pub serial: String,
    /// The site it was issued for.
    pub site: String,
    /// Its SANs.
    pub names: Vec<Hostname>,
    /// Validity start.
    pub not_before: OffsetDateTime,
    /// Validity end.
    pub not_after: OffsetDateTime,
}

impl CertificateCoverage {
    /// Whether `name` is among its SANs (exactly, or through a `*.` wildcard SAN).
    pub fn covers(&self, name: &Hostname) -> bool {
        sans_cover(&self.names, name)
    }
}

impl From<&StoredCertificate> for CertificateCoverage {
    fn from(certificate: &StoredCertificate) -> Self {
        CertificateCoverage {
            id: certificate.id,
            serial: certificate.serial.clone(),
            site: certificate.site.clone(),
            names: certificate.names.clone(),
            not_before: certificate.not_before,
            not_after: certificate.not_after,
        }
    }
}

/// A certificate about to be stored.
#[derive(Debug, Clone)]
pub struct NewCertificate {
    /// The site it was issued for.
    pub site: String,
    /// Its SANs.
    pub names: Vec<Hostname>,
    /// Leaf first (PEM).
    pub chain_pem: String,
    /// The leaf's private key.
    pub key_pem: PrivateKeyPem,
    /// Validity start.
    pub not_before: OffsetDateTime,
    /// Validity end.
    pub not_after: OffsetDateTime,
    /// Serial, lower-case hex.
    pub serial: String,
    /// RFC 9773 certificate identifier.
    pub ari_id: Option<String>,
}

/// An ACME order that was created at the CA and has not produced a stored certificate yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderInFlight {
    /// Row id.
    pub id: i64,
    /// The site it is for.
    pub site: String,
    /// The names ordered.
    pub names: Vec<Hostname>,
    /// The order URL (RFC 8555 §7.1.3), from which it is resumed.
    pub order_url: String,
    /// The key the CSR is (or will be) signed with.
    pub key_pem: PrivateKeyPem,
    /// When it was created.
    pub created_at: OffsetDateTime,
}

/// One entry of a site's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    /// Row id (increasing).
    pub id: i64,
    /// The site.
    pub site: String,
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// What happened (`order-created`, `certificate-issued`, `attempt-failed`, `dns-not-pointing`…).
    pub kind: SiteEventKind,
    /// Words for humans.
    pub message: String,
    /// The RFC 8555 §6.7 problem type when the CA sent one.
    pub problem_type: Option<String>,
    /// A short label for metrics (`acme:rateLimited`, `dns`…), for failures.
    pub reason: Option<String>,
}

/// A site about to be created.
#[derive(Debug, Clone)]
pub struct NewSite {
    /// Identifier.
    pub name: String,
    /// Primary domain.
    pub primary: Hostname,
    /// Other hostnames.
    pub hostnames: Vec<Hostname>,
    /// Policy.
    pub policy: SitePolicy,
}

/// Counts for `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreCounts {
    /// Orders attempted since the store was created.
    pub attempts: u64,
    /// Failed attempts by reason.
    pub failures_by_reason: Vec<(String, u64)>,
    /// Orders in flight now.
    pub orders_in_flight: u64,
    /// Sites per HTTPS mode.
    pub sites_by_mode: Vec<(HttpsMode, u64)>,
}

/// Validates a site identifier: 1–63 of lower-case letters, digits and '-', not at the ends.
pub fn validate_site_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidInput(format!(
            "invalid site name {name:?}: use 1 to 63 lower-case letters, digits and '-' (not first or last), e.g. \"my-blog\""
        )))
    }
}

/// Sites, their hostnames and their HTTPS policy (tables `sites` and `hostnames`).
pub trait SiteStore: Send + Sync {
    /// Up to `limit` sites whose ids sort after `after` (from the first with `None`), by id,
    /// each with what its current certificates cover (newest first, no PEM text): for reading
    /// every site a page at a time (the SDS index, the policy feed, `/metrics`) without holding
    /// all of them at once.
    fn sites_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(Site, Vec<CertificateCoverage>)>>;
    /// Creates a site with its hostnames; marks it due for issuance at `issue_at`.
    fn create_site(
        &self,
        site: NewSite,
        now: OffsetDateTime,
        issue_at: OffsetDateTime,
    ) -> Result<Site>;
    /// All sites, by name.
    fn list_sites(&self) -> Result<Vec<Site>>;
    /// One site.
    fn site(&self, name: &str) -> Result<Option<Site>>;
    /// Deletes a site, its hostnames, certificates, orders and history.
    fn delete_site(&self, name: &str) -> Result<()>;
    /// Replaces a site's policy.
    fn set_policy(&self, name: &str, policy: SitePolicy) -> Result<Site>;
    /// Adds a hostname; marks the site due at `issue_at`.
    fn add_hostname(
        &self,
        site: &str,
        name: &Hostname,
        now: OffsetDateTime,
        issue_at: OffsetDateTime,
    ) -> Result<Site>;
    /// Removes a (non-primary) hostname; marks the site due at `issue_at`.
    fn remove_hostname(
        &self,
        site: &str,
        name: &Hostname,
        now: OffsetDateTime,
        issue_at: OffsetDateTime,
    ) -> Result<Site>;
    /// The site a hostname belongs to.
    fn site_of_hostname(&self, name: &Hostname) -> Result<Option<String>>;
}

/// Each site's issuance schedule and the lease an attempt holds on it (columns of `sites`).
pub trait IssuanceStore: Send + Sync {
    /// Marks a site due for an attempt at `at`, resetting its failure count (a fresh request);
    /// with `regenerate`, the attempt orders new certificates even if the current ones suffice.
    fn request_issuance(&self, site: &str, at: OffsetDateTime, regenerate: bool) -> Result<()>;
    /// Reads and clears a site's pending regenerate request.
    fn take_regenerate_request(&self, site: &str) -> Result<bool>;
    /// Starts an attempt: takes the site's issuance lease for this node (`leased_by`,
    /// `leased_until`) unless another node holds one that is still valid at `now`, sets its
    /// next attempt time to `lease_until`, and reads the site, in one step (one conditional
    /// `UPDATE`), so two nodes can never both hold it and a change made after the read is
    /// never overwritten by the lease.
    fn begin_attempt(
        &self,
        site: &str,
        now: OffsetDateTime,
        lease_until: OffsetDateTime,
    ) -> Result<AttemptLease>;
    /// Ends an attempt begun with [`IssuanceStore::begin_attempt`]: records its failure count and last
    /// problem and schedules the next attempt at `next`, unless a change made meanwhile (the
    /// next attempt time is no longer `lease_until`) asked for an earlier one, which is kept.
    /// Deciding in one step means a change that lands while the attempt finishes is not lost.
    /// Releases this node's lease (never another node's).
    fn finish_attempt(
        &self,
        site: &str,
        lease_until: OffsetDateTime,
        next: Option<OffsetDateTime>,
        failures: u32,
        last_problem: Option<&str>,
    ) -> Result<()>;
    /// Extends this node's lease on a site from `held_until` to `until` while its attempt is
    /// still working (the next attempt time moves with it unless a change made meanwhile set
    /// another). Answers false, changing nothing, when this node no longer holds that lease
    /// (it expired and another node took it).
    fn renew_lease(
        &self,
        site: &str,
        held_until: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<bool>;
    /// Releases every lease held under this node's id, for a node that just started: one
    /// process runs per node id, so such a lease is the work of this node's previous run, which
    /// died. Each released site is due at `now` (or keeps an earlier time a change set) and
    /// gets an `attempt-interrupted` event; answers their names. Never touches another node's
    /// lease.
    fn release_own_leases(&self, now: OffsetDateTime) -> Result<Vec<String>>;
    /// Sets a site's next attempt time, failure count and last problem.
    fn schedule(
        &self,
        site: &str,
        next_attempt_at: Option<OffsetDateTime>,
        failures: u32,
        last_problem: Option<&str>,
    ) -> Result<()>;
    /// Sites whose next attempt is due at or before `now` and whose lease, if another node
    /// holds one, has expired by `now`.
    fn due_sites(&self, now: OffsetDateTime) -> Result<Vec<String>>;
    /// The earliest time any site may be attempted by this node: its next attempt time, or
    /// the end of another node's lease on it when that is later.
    fn next_due(&self) -> Result<Option<OffsetDateTime>>;
}

/// ACME orders created at the CA and not finished yet (table `orders`).
pub trait OrderStore: Send + Sync {
    /// Records an order created at the CA, with the key its CSR will use.
    fn insert_order(
        &self,
        site: &str,
        names: &[Hostname],
        order_url: &str,
        key: &PrivateKeyPem,
        now: OffsetDateTime,
    ) -> Result<i64>;
    /// Orders in flight, oldest first (optionally for one site).
    fn orders_in_flight(&self, site: Option<&str>) -> Result<Vec<OrderInFlight>>;
    /// Forgets an order (it failed for good).
    fn delete_order(&self, id: i64) -> Result<()>;
}

/// Issued certificates and the names they cover (tables `certificates`, `certificate_names`).
pub trait CertificateStore: Send + Sync {
    /// The certificate stored under row id `id`, current or superseded (`None` once its site
    /// was deleted): SDS loads a chain and key when Envoy asks for a name it serves.
    fn certificate(&self, id: i64) -> Result<Option<StoredCertificate>>;
    /// The certificates a site currently serves (not superseded), newest first.
    fn current_certificates(&self, site: &str) -> Result<Vec<StoredCertificate>>;
    /// The certificate to serve for `name`: the newest current one covering it, exactly or by
    /// wildcard, while `name` (or the wildcard's parent) belongs to a site.
    fn certificate_for_hostname(&self, name: &Hostname) -> Result<Option<StoredCertificate>>;
    /// Stores a certificate in one transaction: inserts it, supersedes the site's older
    /// certificates whose still-wanted names it covers, and deletes the order it completes.
    fn store_certificate(
        &self,
        certificate: NewCertificate,
        completes_order: Option<i64>,
        now: OffsetDateTime,
    ) -> Result<StoredCertificate>;
    /// All current certificates (for expiry metrics).
    fn all_current_certificates(&self) -> Result<Vec<StoredCertificate>>;
    /// What the policy feed needs of every current certificate (site, names, validity), without
    /// the PEM text and keys. The default reads [`CertificateStore::all_current_certificates`].
    fn all_current_coverage(&self) -> Result<Vec<CertificateCoverage>> {
        Ok(self
            .all_current_certificates()?
            .iter()
            .map(CertificateCoverage::from)
            .collect())
    }
}

/// The fleet's ACME account and the HTTP-01 challenges being validated (tables `accounts`,
/// `acme_challenges`).
pub trait AcmeStore: Send + Sync {
    /// The ACME account credentials (JSON) for a directory, if one was created.
    fn account(&self, directory_url: &str) -> Result<Option<String>>;
    /// Saves ACME account credentials (JSON) for a directory unless some node saved one
    /// first, and answers the credentials stored: the first saved wins, so nodes racing to
    /// create the fleet's account all end up using one.
    fn save_account(
        &self,
        directory_url: &str,
        credentials_json: &str,
        now: OffsetDateTime,
    ) -> Result<String>;
    /// Starts answering an HTTP-01 challenge `token` with `key_authorization` (RFC 8555 §8.3)
    /// from every node sharing the store; forgets tokens saved more than
    /// [`CHALLENGE_LIFETIME`] before `now`.
    fn put_challenge(
        &self,
        token: &str,
        key_authorization: &str,
        now: OffsetDateTime,
    ) -> Result<()>;
    /// The key authorization for an HTTP-01 `token` any node is being validated for.
    fn challenge(&self, token: &str) -> Result<Option<String>>;
    /// Stops answering an HTTP-01 `token`.
    fn delete_challenge(&self, token: &str) -> Result<()>;
}

/// What happened to each site and what its pages load insecurely (tables `events`,
/// `mixed_content`), and the counts metrics read from them.
pub trait HistoryStore: Send + Sync {
    /// Appends to a site's history.
    fn add_event(
        &self,
        site: &str,
        at: OffsetDateTime,
        kind: SiteEventKind,
        message: &str,
        problem_type: Option<&str>,
        reason: Option<&str>,
    ) -> Result<()>;
    /// A site's history, newest first.
    fn events(&self, site: &str, limit: usize) -> Result<Vec<Event>>;
    /// Counts for metrics.
    fn counts(&self) -> Result<StoreCounts>;
    /// Records one CSP violation for a site: the page and the resource it was blocked from
    /// loading, counted when the pair is seen again. A new pair is always added; when the
    /// site's findings would then take more than `budget_bytes` (see [`finding_bytes`]), the
    /// least useful ones are evicted first: fewest reports, then least recently seen. So a
    /// flood of one-off junk evicts itself, never a finding that keeps recurring. The budget
    /// must exceed the largest finding.
    fn record_mixed_content(
        &self,
        site: &str,
        page: &str,
        resource: &str,
        directive: &str,
        at: OffsetDateTime,
        budget_bytes: u64,
    ) -> Result<Recorded>;
    /// The bytes a site's findings count against its budget.
    fn mixed_content_bytes(&self, site: &str) -> Result<u64>;
    /// A site's mixed-content findings, most recently seen first.
    fn mixed_content(&self, site: &str) -> Result<Vec<MixedContentFinding>>;
}

/// What changed, for readers that follow the store: the change log (table `site_changes`,
/// written by triggers) and the in-process change signals.
pub trait ChangeLog: Send + Sync {
    /// The newest change sequence number (0 when the log is empty). The log is written by
    /// triggers in the same transaction as the change, so no code path can forget it.
    fn latest_change_seq(&self) -> Result<u64>;
    /// The sites changed after `after` (up to `limit` log rows), oldest first.
    fn site_changes_since(&self, after: u64, limit: usize) -> Result<SiteChanges>;
    /// Bumped whenever the set of served certificates may have changed (SDS watches this).
    fn certificates_changed(&self) -> watch::Receiver<u64>;
    /// Bumped whenever sites, hostnames or policies changed (the policy feed watches this).
    fn sites_changed(&self) -> watch::Receiver<u64>;
}

/// Groups `certificates` (newest first) under the sites of a page, keeping each site's order.
pub(crate) fn pair_sites_with_certificates(
    sites: Vec<Site>,
    certificates: Vec<CertificateCoverage>,
) -> Vec<(Site, Vec<CertificateCoverage>)> {
    let mut by_site: std::collections::HashMap<String, Vec<CertificateCoverage>> =
        std::collections::HashMap::new();
    for certificate in certificates {
        by_site
            .entry(certificate.site.clone())
            .or_default()
            .push(certificate);
    }
    sites
        .into_iter()
        .map(|site| {
            let own = by_site.remove(&site.name).unwrap_or_default();
            (site, own)
        })
        .collect()
}

/// Persistent state. Methods are short, blocking and transactional; callers on async tasks
/// may call them directly (SQLite in WAL mode answers in microseconds).
/// It is the union of the store's parts, one per table or concern, so it is used as one
/// `Arc<dyn Store>`; code that calls the parts' methods on a concrete store brings them into
/// scope with `use crate::store::prelude::*`.
pub trait Store:
    SiteStore
    + IssuanceStore
    + OrderStore
    + CertificateStore
    + AcmeStore
    + HistoryStore
    + ChangeLog
    + fmt::Debug
{
    /// Checks that a change could be written now (the write lock can be taken), waiting at
    /// most `patience`; writes nothing. For readiness probes.
    fn check_writable(&self, patience: std::time::Duration) -> Result<()>;
}

/// Whether a new certificate for `new` names makes an older one for `old` names redundant: every
/// name of the old one that the site still wants (`wanted`) is covered by the new one. Anything
/// else keeps serving (never worse).
pub(crate) fn supersedes(
    new: &[Hostname],
    old: &[Hostname],
    wanted: &std::collections::HashSet<String>,
) -> bool {
    old.iter()
        .filter(|name| wanted.contains(name.as_str()))
        .all(|name| new.contains(name))
}

/// The answer for a reader at `after` whose changes can no longer be told, if so: the rows right
/// after it were compacted away (the oldest kept row, `oldest_kept`, is beyond `after + 1`), or
/// `after` is ahead of this log's newest row `latest` (it came from another database). The
/// reader reloads everything and goes on from `latest`. (A rolled-back insert can leave a gap
/// right after `after` too: the reader then reloads once, harmless.)
pub(crate) fn unknowable_changes(
    after: u64,
    oldest_kept: Option<u64>,
    latest: u64,
) -> Option<SiteChanges> {
    let compacted = oldest_kept.is_some_and(|oldest| oldest > after.saturating_add(1));
    (compacted || after > latest).then(|| SiteChanges {
        sites: Vec::new(),
        last_seq: latest,
        complete: false,
    })
}

/// Folds change-log rows `(seq, site)` (ascending) read after `after` into a complete
/// [`SiteChanges`] (see [`unknowable_changes`] for when it cannot be complete).
pub(crate) fn fold_site_changes(
    after: u64,
    rows: impl IntoIterator<Item = (u64, String)>,
) -> SiteChanges {
    let mut changes = SiteChanges {
        sites: Vec::new(),
        last_seq: after,
        complete: true,
    };
    let mut seen = std::collections::HashSet::new();
    for (seq, site) in rows {
        changes.last_seq = changes.last_seq.max(seq);
        if seen.insert(site.clone()) {
            changes.sites.push(site);
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_backends_migrate_to_the_same_schema_version() {
        assert_eq!(sqlite::MIGRATIONS.len(), SCHEMA_VERSION);
        assert_eq!(postgres::MIGRATIONS.len(), SCHEMA_VERSION);
    }

    #[test]
    fn change_batches_deduplicate_in_order_of_first_change() {
        let rows =
            [(4, "b"), (5, "a"), (6, "b"), (7, "c")].map(|(seq, site)| (seq, site.to_owned()));
        let changes = fold_site_changes(3, rows);
        assert_eq!(changes.sites, ["b", "a", "c"]);
        assert_eq!(changes.last_seq, 7);
        assert!(changes.complete);
        let nothing = fold_site_changes(7, []);
        assert_eq!((nothing.last_seq, nothing.sites.len()), (7, 0));
    }

    #[test]
    fn a_reader_behind_the_oldest_kept_change_must_reload() {
        let reload = unknowable_changes(10, Some(12), 20).unwrap();
        assert_eq!((reload.complete, reload.last_seq), (false, 20));
        assert!(unknowable_changes(10, Some(11), 20).is_none());
        assert!(unknowable_changes(0, None, 0).is_none());
        // A position ahead of this log (another database's) cannot be read from either.
        assert_eq!(unknowable_changes(30, Some(1), 20).unwrap().last_seq, 20);
        assert!(unknowable_changes(5, None, 0).is_some());
    }
}
