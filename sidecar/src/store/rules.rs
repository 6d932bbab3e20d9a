//! The store's rules, as plain functions over plain values: what a site's history records
//! ([`SiteEventKind`]), how an attempt's outcome merges with a change made meanwhile, which
//! mixed-content findings make room for a new one, which older certificates a new one
//! supersedes, what a change's history entry says and how a refused change is answered, and
//! what the metrics count. A backend
//! stores and fetches rows and calls these; it decides nothing itself, so SQLite and
//! PostgreSQL cannot drift apart on policy, and the rules are tested without a database.

use std::fmt;

use serde::{Serialize, Serializer};
use time::OffsetDateTime;

use super::{HostnameKind, HttpsMode, NewCertificate, NewSite, StoreCounts, supersedes};
use crate::error::Error;
use crate::hostname::Hostname;

/// What an entry of a site's history records. Its text form (`attempt-failed`…) is what the
/// store keeps and the API shows, so it never changes; a text this build does not know (written
/// by a newer build sharing the store) is kept as [`SiteEventKind::Other`], never an error.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SiteEventKind {
    /// The site was created.
    SiteCreated,
    /// A hostname was added to the site.
    HostnameAdded,
    /// A hostname was removed from the site.
    HostnameRemoved,
    /// Someone asked for new certificates even if the current ones suffice.
    RegenerateRequested,
    /// An issuance attempt started (this node took the site's lease).
    AttemptStarted,
    /// An issuance attempt failed (the CA refused, a challenge failed, no name points here).
    AttemptFailed,
    /// An attempt a previous run of this node never finished was released to run again.
    AttemptInterrupted,
    /// A name was left out of the order because its DNS does not point at the platform.
    DnsNotPointing,
    /// An order was placed at the CA.
    OrderCreated,
    /// An order left in flight (by this or another node) is being finished.
    OrderResumed,
    /// A certificate was stored.
    CertificateIssued,
    /// A kind this build does not know, kept as stored.
    Other(String),
}

impl SiteEventKind {
    /// Every kind this build writes.
    pub const KNOWN: [Self; 11] = [
        Self::SiteCreated,
        Self::HostnameAdded,
        Self::HostnameRemoved,
        Self::RegenerateRequested,
        Self::AttemptStarted,
        Self::AttemptFailed,
        Self::AttemptInterrupted,
        Self::DnsNotPointing,
        Self::OrderCreated,
        Self::OrderResumed,
        Self::CertificateIssued,
    ];

    /// The stored (and API) text: kebab-case, e.g. `attempt-failed`.
    pub fn as_str(&self) -> &str {
        match self {
            Self::SiteCreated => "site-created",
            Self::HostnameAdded => "hostname-added",
            Self::HostnameRemoved => "hostname-removed",
            Self::RegenerateRequested => "regenerate-requested",
            Self::AttemptStarted => "attempt-started",
            Self::AttemptFailed => "attempt-failed",
            Self::AttemptInterrupted => "attempt-interrupted",
            Self::DnsNotPointing => "dns-not-pointing",
            Self::OrderCreated => "order-created",
            Self::OrderResumed => "order-resumed",
            Self::CertificateIssued => "certificate-issued",
            Self::Other(text) => text,
        }
    }

    /// The kind a stored text names; an unknown text is kept as [`SiteEventKind::Other`].
    pub fn parse(text: &str) -> Self {
        Self::KNOWN
            .into_iter()
            .find(|kind| kind.as_str() == text)
            .unwrap_or_else(|| Self::Other(text.to_owned()))
    }
}

impl fmt::Display for SiteEventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&str> for SiteEventKind {
    fn from(text: &str) -> Self {
        Self::parse(text)
    }
}

impl From<String> for SiteEventKind {
    fn from(text: String) -> Self {
        Self::parse(&text)
    }
}

impl PartialEq<str> for SiteEventKind {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for SiteEventKind {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl Serialize for SiteEventKind {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// The change log keeps at least this many newest rows...
pub const SITE_CHANGES_KEEP_ROWS: u64 = 100_000;
/// ...and every row younger than this many seconds; older rows beyond both are compacted away.
pub const SITE_CHANGES_KEEP_SECS: i64 = 24 * 60 * 60;

/// Which change-log rows compaction deletes, given the newest sequence number: those with a
/// sequence number at or below the first value *and* logged (`at`, whole seconds) before the
/// second, so the newest `keep_rows` rows and every row younger than `keep_secs` stay.
/// `None` when the log holds no more than `keep_rows` rows' worth of numbers.
pub fn change_log_cutoff(
    latest_seq: u64,
    keep_rows: u64,
    keep_secs: i64,
    now: OffsetDateTime,
) -> Option<(u64, i64)> {
    let last_deleted = latest_seq.checked_sub(keep_rows).filter(|seq| *seq > 0)?;
    Some((last_deleted, now.unix_timestamp().saturating_sub(keep_secs)))
}

/// The message of the `attempt-interrupted` event a released lease records.
pub const INTERRUPTED_MESSAGE: &str =
    "the previous attempt was interrupted (the sidecar stopped); retrying now";

/// When a site is next attempted once an attempt (or a dead run's lease) ends. `stored` is the
/// next attempt time in the store now, `lease_until` the one the lease set, `planned` the
/// attempt's own choice (retry or renewal; `None`: nothing planned).
///
/// A stored time still equal to the lease means nothing changed meanwhile: the plan wins. Any
/// other stored time was set by a change made during the attempt (a hostname added, a
/// regenerate): it is kept unless the plan is earlier, so that change is never lost.
/// Times compare in whole seconds, as the store keeps them.
pub fn next_attempt_after(
    stored: Option<OffsetDateTime>,
    lease_until: OffsetDateTime,
    planned: Option<OffsetDateTime>,
) -> Option<OffsetDateTime> {
    match (stored, planned) {
        (None, _) => planned,
        _ if still_the_lease(stored, lease_until) => planned,
        (Some(stored), None) => Some(stored),
        (Some(stored), Some(planned)) => Some(stored.min(planned)),
    }
}

/// Whether a site's stored next attempt time is still the one its lease set (`lease_until`,
/// in whole seconds as the store keeps it): no change asked for another since. A renewed
/// lease moves the next attempt time along only then.
pub fn still_the_lease(stored: Option<OffsetDateTime>, lease_until: OffsetDateTime) -> bool {
    stored.is_some_and(|stored| stored.unix_timestamp() == lease_until.unix_timestamp())
}

/// A stored mixed-content finding as the budget sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FindingWeight<K> {
    /// Whatever identifies the row to the backend.
    pub key: K,
    /// How many reports named it.
    pub reports: u64,
    /// When it was last reported (whole seconds).
    pub last_seen: i64,
    /// What it counts against the budget ([`super::finding_bytes`]).
    pub bytes: u64,
}

/// The findings to evict so that one of `new_bytes` fits within `budget_bytes`: the least
/// useful first (fewest reports, then least recently seen), only as many as needed. So a flood
/// of one-off junk evicts itself, never a finding that keeps recurring. When even evicting all
/// does not make room, all are evicted (the new finding is still added).
pub fn findings_to_evict<K>(
    mut findings: Vec<FindingWeight<K>>,
    new_bytes: u64,
    budget_bytes: u64,
) -> Vec<K> {
    let mut used: u64 = findings
        .iter()
        .map(|f| f.bytes)
        .fold(0, u64::saturating_add);
    findings.sort_by_key(|f| (f.reports, f.last_seen));
    let mut evict = Vec::new();
    for finding in findings {
        if used.saturating_add(new_bytes) <= budget_bytes {
            break;
        }
        used = used.saturating_sub(finding.bytes);
        evict.push(finding.key);
    }
    evict
}

/// The metrics a store's rows give: `events` is its history tallied as (kind, reason, count)
/// (the backend's `GROUP BY kind, reason`), `modes` its sites tallied by HTTPS mode. Attempts
/// are the `attempt-started` entries; failures are `attempt-failed` by reason (`unknown` when
/// none was recorded), sorted by reason; every mode is listed, with 0 when no site has it.
pub fn counts_from_tallies(
    events: impl IntoIterator<Item = (SiteEventKind, Option<String>, u64)>,
    modes: impl IntoIterator<Item = (HttpsMode, u64)>,
    orders_in_flight: u64,
) -> StoreCounts {
    let mut attempts = 0u64;
    let mut failures = std::collections::BTreeMap::<String, u64>::new();
    for (kind, reason, n) in events {
        match kind {
            SiteEventKind::AttemptStarted => attempts = attempts.saturating_add(n),
            SiteEventKind::AttemptFailed => {
                let entry = failures
                    .entry(reason.unwrap_or_else(|| "unknown".to_owned()))
                    .or_default();
                *entry = entry.saturating_add(n);
            }
            _ => {}
        }
    }
    let modes: Vec<(HttpsMode, u64)> = modes.into_iter().collect();
    let sites_by_mode = [HttpsMode::Auto, HttpsMode::Force, HttpsMode::Disable]
        .into_iter()
        .map(|mode| {
            let n = modes
                .iter()
                .filter(|(m, _)| *m == mode)
                .map(|(_, n)| *n)
                .sum();
            (mode, n)
        })
        .collect();
    StoreCounts {
        attempts,
        failures_by_reason: failures.into_iter().collect(),
        orders_in_flight,
        sites_by_mode,
    }
}

/// The answer for a change to a site that does not exist.
pub fn no_such_site(name: &str) -> Error {
    Error::NotFound(format!(
        "no site named {name:?}; list sites with `autohttps site list`"
    ))
}

/// The answer for creating a site whose id is taken.
pub fn site_exists(name: &str) -> Error {
    Error::Conflict(format!(
        "a site named {name:?} already exists; pick another name or change that site"
    ))
}

/// The answer for adding `name` to `site` when it already belongs to `owner`.
pub fn hostname_taken(name: &Hostname, site: &str, owner: &str) -> Error {
    Error::Conflict(if owner == site {
        format!("{name} is already a hostname of site {site:?}")
    } else {
        format!("{name} already belongs to site {owner:?}; remove it there first")
    })
}

/// The answer for removing a site's primary domain.
pub fn primary_not_removable(site: &str, name: &Hostname) -> Error {
    Error::InvalidInput(format!(
        "{name} is the primary domain of site {site:?}; it cannot be removed (remove the site instead)"
    ))
}

/// The answer for removing a name that is not one of the site's.
pub fn not_a_hostname_of(site: &str, name: &Hostname) -> Error {
    Error::NotFound(format!("{name} is not a hostname of site {site:?}"))
}

/// A new site's names other than its primary domain, each with its kind, in the order given
/// (the primary, if listed again, is left out).
pub fn other_hostnames(site: &NewSite) -> Vec<(&Hostname, HostnameKind)> {
    site.hostnames
        .iter()
        .filter(|name| *name != &site.primary)
        .map(|name| (name, HostnameKind::of(name, &site.primary)))
        .collect()
}

/// The `site-created` history entry of a site created with `hostnames` names in all.
pub fn site_created_message(hostnames: usize) -> String {
    format!("site created with {hostnames} hostname(s)")
}

/// The `hostname-added` history entry.
pub fn hostname_added_message(kind: HostnameKind, name: &Hostname) -> String {
    format!("{} {name} added", super::rows::enum_text(&kind))
}

/// The `hostname-removed` history entry.
pub fn hostname_removed_message(name: &Hostname) -> String {
    format!("{name} removed")
}

/// The `order-created` history entry of an order for `names` at `order_url`.
pub fn order_created_message(names: &[Hostname], order_url: &str) -> String {
    format!("ordered a certificate for {} ({order_url})", joined(names))
}

/// The `certificate-issued` history entry.
pub fn certificate_issued_message(certificate: &NewCertificate) -> String {
    format!(
        "certificate {} for {} valid until {}",
        certificate.serial,
        joined(&certificate.names),
        crate::clock::human_time(certificate.not_after)
    )
}

fn joined(names: &[Hostname]) -> String {
    names
        .iter()
        .map(Hostname::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Which of a site's current certificates (`older`: key and names) a new one for `new` names
/// supersedes, given the names the site still wants (see [`supersedes`]).
pub fn superseded<K>(
    new: &[Hostname],
    older: impl IntoIterator<Item = (K, Vec<Hostname>)>,
    wanted: &std::collections::HashSet<String>,
) -> Vec<K> {
    older
        .into_iter()
        .filter(|(_, names)| supersedes(new, names, wanted))
        .map(|(key, _)| key)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-03-01 00:00 UTC);

    #[test]
    fn event_kinds_keep_their_stored_text_and_unknown_text_survives() {
        for kind in SiteEventKind::KNOWN {
            assert_eq!(SiteEventKind::parse(kind.as_str()), kind);
        }
        assert_eq!(SiteEventKind::AttemptFailed.as_str(), "attempt-failed");
        assert_eq!(
            SiteEventKind::CertificateIssued.as_str(),
            "certificate-issued"
        );
        let future = SiteEventKind::parse("lease-stolen-by-martians");
        assert_eq!(
            future,
            SiteEventKind::Other("lease-stolen-by-martians".into())
        );
        assert_eq!(future.as_str(), "lease-stolen-by-martians");
        assert_eq!(
            serde_json::to_string(&SiteEventKind::OrderResumed).unwrap(),
            "\"order-resumed\""
        );
        assert_eq!(
            serde_json::to_string(&future).unwrap(),
            "\"lease-stolen-by-martians\""
        );
    }

    #[test]
    fn compaction_keeps_the_newest_rows_and_the_young_ones() {
        assert_eq!(change_log_cutoff(100, 100, 60, NOW), None);
        assert_eq!(change_log_cutoff(0, 100, 60, NOW), None);
        assert_eq!(
            change_log_cutoff(250, 100, 60, NOW),
            Some((150, NOW.unix_timestamp() - 60))
        );
    }

    #[test]
    fn an_attempt_s_plan_wins_unless_a_change_asked_for_an_earlier_time() {
        let lease = NOW + time::Duration::minutes(2);
        let renewal = NOW + time::Duration::days(60);
        let change = NOW + time::Duration::seconds(2);
        // Nothing changed: the plan (or no plan) wins.
        assert_eq!(
            next_attempt_after(Some(lease), lease, Some(renewal)),
            Some(renewal)
        );
        assert_eq!(next_attempt_after(Some(lease), lease, None), None);
        assert_eq!(
            next_attempt_after(None, lease, Some(renewal)),
            Some(renewal)
        );
        // A change meanwhile keeps its earlier time, and yields to an earlier plan.
        assert_eq!(
            next_attempt_after(Some(change), lease, Some(renewal)),
            Some(change)
        );
        assert_eq!(next_attempt_after(Some(change), lease, None), Some(change));
        let retry = NOW + time::Duration::seconds(1);
        assert_eq!(
            next_attempt_after(Some(change), lease, Some(retry)),
            Some(retry)
        );
        // The store keeps whole seconds: a lease with a fraction still matches.
        let fractional = lease + time::Duration::milliseconds(700);
        assert_eq!(next_attempt_after(Some(lease), fractional, None), None);
    }

    fn weight(
        key: &'static str,
        reports: u64,
        last_seen: i64,
        bytes: u64,
    ) -> FindingWeight<&'static str> {
        FindingWeight {
            key,
            reports,
            last_seen,
            bytes,
        }
    }

    #[test]
    fn the_least_useful_findings_make_room_and_no_more() {
        let findings = vec![
            weight("recurring", 50, 10, 100),
            weight("old-junk", 1, 1, 100),
            weight("new-junk", 1, 5, 100),
            weight("twice", 2, 0, 100),
        ];
        // 400 used; a 100-byte finding in a 500 budget fits.
        assert!(findings_to_evict(findings.clone(), 100, 500).is_empty());
        // In 400, one goes: the oldest one-off.
        assert_eq!(findings_to_evict(findings.clone(), 100, 400), ["old-junk"]);
        // In 250, three go, the recurring one stays.
        assert_eq!(
            findings_to_evict(findings.clone(), 100, 250),
            ["old-junk", "new-junk", "twice"]
        );
        // Too large for any room: everything goes.
        assert_eq!(findings_to_evict(findings, 1000, 500).len(), 4);
    }

    #[test]
    fn metrics_count_attempts_and_failures_by_reason_and_every_mode() {
        let events = [
            (SiteEventKind::AttemptStarted, None, 7),
            (SiteEventKind::AttemptFailed, Some("dns".to_owned()), 2),
            (SiteEventKind::AttemptFailed, None, 1),
            (
                SiteEventKind::AttemptFailed,
                Some("acme:rateLimited".to_owned()),
                3,
            ),
            (SiteEventKind::CertificateIssued, None, 4),
            (
                SiteEventKind::Other("from-a-newer-build".into()),
                Some("dns".into()),
                9,
            ),
        ];
        let counts = counts_from_tallies(events, [(HttpsMode::Force, 5)], 1);
        assert_eq!(counts.attempts, 7);
        assert_eq!(
            counts.failures_by_reason,
            [
                ("acme:rateLimited".to_owned(), 3),
                ("dns".to_owned(), 2),
                ("unknown".to_owned(), 1)
            ]
        );
        assert_eq!(
            counts.sites_by_mode,
            [
                (HttpsMode::Auto, 0),
                (HttpsMode::Force, 5),
                (HttpsMode::Disable, 0)
            ]
        );
        assert_eq!(counts.orders_in_flight, 1);
    }

    fn host(name: &str) -> Hostname {
        Hostname::parse(name).unwrap()
    }

    #[test]
    fn a_new_certificate_supersedes_only_those_whose_wanted_names_it_covers() {
        let wanted: std::collections::HashSet<String> =
            ["a.test", "b.test"].map(String::from).into();
        let new = [host("a.test"), host("b.test")];
        let older = vec![
            (1, vec![host("a.test")]),
            // c.test is no longer wanted: a and b are covered, so it goes.
            (2, vec![host("a.test"), host("c.test")]),
            (3, vec![host("a.test"), host("b.test")]),
        ];
        assert_eq!(superseded(&new, older, &wanted), [1, 2, 3]);
        // A new certificate missing a wanted name leaves those that cover it serving.
        let partial = [host("a.test")];
        let older = vec![
            (1, vec![host("a.test")]),
            (2, vec![host("b.test")]),
            (3, new.to_vec()),
        ];
        assert_eq!(superseded(&partial, older, &wanted), [1]);
    }

    #[test]
    fn a_new_site_s_other_names_leave_out_the_primary_and_know_their_kind() {
        let site = NewSite {
            name: "shop".into(),
            primary: host("shop.test"),
            hostnames: vec![
                host("www.shop.test"),
                host("shop.test"),
                host("shop.example"),
            ],
            policy: super::super::SitePolicy::default(),
        };
        assert_eq!(
            other_hostnames(&site),
            [
                (&host("www.shop.test"), HostnameKind::Subdomain),
                (&host("shop.example"), HostnameKind::Alias),
            ]
        );
        assert_eq!(site_created_message(3), "site created with 3 hostname(s)");
        assert_eq!(
            hostname_added_message(HostnameKind::Alias, &host("shop.example")),
            "alias shop.example added"
        );
    }
}
