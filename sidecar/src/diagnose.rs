//! Diagnose a hostname: DNS against the platform, the covering certificate, a verdict and the fix.

use serde::Serialize;
use time::OffsetDateTime;

use crate::clock::human_time;
use crate::dns_check::{DnsAnswer, platform_description};
use crate::error::{Error, Result};
use crate::hostname::Hostname;
use crate::issuance::Issuer;
use crate::renewal::renew_at;
use crate::store::{IssuanceSchedule, StoredCertificate};

/// The classic outcomes, named as operators know them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
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

/// The certificate serving a name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertificateSummary {
    /// Serial, hex.
    pub serial: String,
    /// Expiry.
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    /// All its names.
    pub names: Vec<Hostname>,
}

/// Everything `diagnose` reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnosis {
    /// The name asked about (normalised).
    pub hostname: Hostname,
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
    /// When the next attempt (retry or renewal) is due.
    #[serde(with = "time::serde::rfc3339::option")]
    pub next_attempt_at: Option<OffsetDateTime>,
    /// What to do, in words.
    pub fix: String,
}

/// The facts a verdict is decided from.
#[derive(Debug, Clone)]
pub struct Facts<'a> {
    /// The name.
    pub hostname: &'a Hostname,
    /// Its site.
    pub site: &'a str,
    /// Whether DNS points at the platform.
    pub dns_points_here: bool,
    /// What the platform expects.
    pub platform: &'a str,
    /// The current certificate covering the name, if any.
    pub covering: Option<&'a StoredCertificate>,
    /// Whether the site has any current certificate.
    pub site_has_certificate: bool,
    /// Whether an order is in flight or an attempt is running.
    pub in_progress: bool,
    /// The site's schedule.
    pub schedule: &'a IssuanceSchedule,
    /// Now.
    pub now: OffsetDateTime,
}

/// The fix for a name whose DNS does not point at `platform` (as
/// [`crate::dns_check::platform_description`]
/// words it).
pub fn dns_fix(name: &Hostname, platform: &str, site: &str) -> String {
    format!(
        "Verify the DNS records of {name}: point it at the platform ({platform}) with an A/AAAA record or a CNAME. It is left out of the certificate until then; the next check runs automatically, or run `autohttps cert regenerate {site}` after fixing DNS."
    )
}

/// The fix for a site whose last attempt failed with `problem`, retried at `next`.
pub fn failing_fix(problem: &str, next: Option<OffsetDateTime>, site: &str) -> String {
    let next = next.map_or_else(|| "not scheduled".to_owned(), human_time);
    format!(
        "The last attempt failed ({problem}). It is retried at {next}; fix the cause, then run `autohttps cert regenerate {site}` to retry now."
    )
}

/// Decides the verdict and the fix. Pure.
pub fn decide(facts: &Facts<'_>) -> (Verdict, String) {
    let name = facts.hostname;
    let site = facts.site;
    if !facts.dns_points_here {
        return (Verdict::DnsNotPointing, dns_fix(name, facts.platform, site));
    }
    let valid = facts.covering.filter(|c| c.not_after > facts.now);
    if let Some(certificate) = valid {
        let renews = renew_at(facts.now, certificate.not_before, certificate.not_after);
        return (
            Verdict::Ok,
            format!(
                "Nothing to do: certificate {} covers {name} until {}; it renews automatically around {}.",
                certificate.serial,
                human_time(certificate.not_after),
                human_time(renews)
            ),
        );
    }
    if facts.schedule.failures > 0 {
        let problem = facts.schedule.last_problem.as_deref().unwrap_or("unknown");
        return (
            Verdict::Failing,
            failing_fix(problem, facts.schedule.next_attempt_at, site),
        );
    }
    let scheduled_soon = facts
        .schedule
        .next_attempt_at
        .is_some_and(|t| t <= facts.now + std::time::Duration::from_secs(600));
    if facts.in_progress || scheduled_soon {
        return (
            Verdict::Pending,
            format!("A certificate for {name} is being ordered; wait a minute and diagnose again."),
        );
    }
    if facts.site_has_certificate {
        return (
            Verdict::NotInCertificate,
            format!(
                "The certificate of site {site} does not include {name}, so browsers show an insecure-connection warning. Run `autohttps cert regenerate {site}`."
            ),
        );
    }
    (
        Verdict::NoCertificate,
        format!(
            "Site {site} has no certificate, so HTTPS visitors get a connection error. Run `autohttps cert regenerate {site}` and check its events with `autohttps site show {site}`."
        ),
    )
}

/// Diagnoses `hostname` against the live store and DNS.
pub async fn diagnose(issuer: &Issuer, hostname: &Hostname) -> Result<Diagnosis> {
    let store = issuer.store();
    let site_name = store.site_of_hostname(hostname)?.ok_or_else(|| {
        Error::NotFound(format!(
            "{hostname} is not a hostname of any site; add it with `autohttps host add <site> {hostname}`"
        ))
    })?;
    let site = store
        .site(&site_name)?
        .ok_or_else(|| Error::NotFound(format!("site {site_name:?} disappeared")))?;
    let dns = issuer.dns().check(hostname).await;
    let platform = platform_description(issuer.dns().platform());
    let current = store.current_certificates(&site_name)?;
    let covering = current.iter().find(|c| c.covers(hostname));
    let in_progress =
        issuer.is_working_on(&site_name) || !store.orders_in_flight(Some(&site_name))?.is_empty();
    let now = issuer.clock().now();
    let (verdict, fix) = decide(&Facts {
        hostname,
        site: &site_name,
        dns_points_here: dns.points_here,
        platform: &platform,
        covering,
        site_has_certificate: !current.is_empty(),
        in_progress,
        schedule: &site.issuance,
        now,
    });
    Ok(Diagnosis {
        hostname: hostname.clone(),
        site: site_name,
        dns,
        platform,
        certificate: covering.map(|c| CertificateSummary {
            serial: c.serial.clone(),
            not_after: c.not_after,
            names: c.names.clone(),
        }),
        verdict,
        last_problem: site.issuance.last_problem.clone(),
        next_attempt_at: site.issuance.next_attempt_at,
        fix,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::PrivateKeyPem;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-03-01 00:00 UTC);

    fn certificate(names: &[&str]) -> StoredCertificate {
        StoredCertificate {
            id: 1,
            site: "blog".into(),
            names: names.iter().map(|n| Hostname::parse(n).unwrap()).collect(),
            chain_pem: String::new(),
            key_pem: PrivateKeyPem::new(String::new()),
            not_before: datetime!(2026-02-01 00:00 UTC),
            not_after: datetime!(2026-05-01 00:00 UTC),
            serial: "0abc".into(),
            ari_id: None,
            issued_at: datetime!(2026-02-01 00:00 UTC),
        }
    }

    fn quiet() -> IssuanceSchedule {
        IssuanceSchedule {
            next_attempt_at: Some(datetime!(2026-04-01 00:00 UTC)),
            failures: 0,
            last_problem: None,
            regenerate_requested: false,
        }
    }

    fn verdict(
        dns: bool,
        covering: Option<&StoredCertificate>,
        any: bool,
        in_progress: bool,
        schedule: &IssuanceSchedule,
    ) -> (Verdict, String) {
        let name = Hostname::parse("shop.example.com").unwrap();
        decide(&Facts {
            hostname: &name,
            site: "blog",
            dns_points_here: dns,
            platform: "127.0.0.1",
            covering,
            site_has_certificate: any,
            in_progress,
            schedule,
            now: NOW,
        })
    }

    #[test]
    fn covered_name_is_ok() {
        let cert = certificate(&["shop.example.com"]);
        assert_eq!(
            verdict(true, Some(&cert), true, false, &quiet()).0,
            Verdict::Ok
        );
    }

    #[test]
    fn dns_elsewhere_wins_and_says_where_to_point() {
        let (v, fix) = verdict(false, None, true, false, &quiet());
        assert_eq!(v, Verdict::DnsNotPointing);
        assert!(fix.contains("127.0.0.1"), "{fix}");
    }

    #[test]
    fn name_missing_from_site_certificate_is_not_in_certificate() {
        let (v, fix) = verdict(true, None, true, false, &quiet());
        assert_eq!(v, Verdict::NotInCertificate);
        assert!(fix.contains("cert regenerate blog"), "{fix}");
    }

    #[test]
    fn no_certificate_at_all_is_named_as_such() {
        assert_eq!(
            verdict(true, None, false, false, &quiet()).0,
            Verdict::NoCertificate
        );
    }

    #[test]
    fn order_in_flight_is_pending() {
        assert_eq!(
            verdict(true, None, false, true, &quiet()).0,
            Verdict::Pending
        );
    }

    #[test]
    fn failures_report_problem_and_next_retry() {
        let schedule = IssuanceSchedule {
            next_attempt_at: Some(datetime!(2026-03-01 00:10 UTC)),
            failures: 2,
            last_problem: Some("rateLimited: too many certificates".into()),
            regenerate_requested: false,
        };
        let (v, fix) = verdict(true, None, false, false, &schedule);
        assert_eq!(v, Verdict::Failing);
        assert!(fix.contains("rateLimited") && fix.contains("0:10"), "{fix}");
    }

    #[test]
    fn expired_certificate_does_not_count() {
        let mut cert = certificate(&["shop.example.com"]);
        cert.not_after = datetime!(2026-02-15 00:00 UTC);
        assert_eq!(
            verdict(true, Some(&cert), true, false, &quiet()).0,
            Verdict::NotInCertificate
        );
    }
}
