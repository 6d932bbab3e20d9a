//! How the CLI prints the admin API's answers for people (`--json` prints them as they are),
//! and the shapes of its own combined answers (`site list`, `site show`).

use std::fmt::Write as _;

use autohttps_api as api;
use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// A time as the API writes it (RFC 3339).
fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&Rfc3339).unwrap_or_else(|_| at.to_string())
}

/// The wire name of a value of the policy vocabulary (`force`, `permanent`, `report`…).
fn wire_name(value: impl Serialize) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        other => format!("{other:?}"),
    }
}

fn hostnames(site: &api::Site) -> Vec<String> {
    site.hostnames
        .iter()
        .map(|h| format!("{} ({})", h.name, wire_name(h.kind)))
        .collect()
}

/// A site: names and the whole policy.
pub fn site(site: &api::Site) -> String {
    let policy = &site.policy;
    let hsts = &policy.hsts;
    let hsts_text = if hsts.enabled {
        let mut words = format!("on, max-age {}", hsts.max_age);
        if hsts.include_subdomains {
            words.push_str(", includeSubDomains");
        }
        if hsts.preload {
            words.push_str(", preload");
        }
        words
    } else {
        "off".into()
    };
    format!(
        "site {}\n  hostnames:     {}\n  https:         {} (redirects {})\n  canonical:     {}\n  hsts:          {hsts_text}\n  mixed content: {}",
        site.name,
        hostnames(site).join(", "),
        policy.https.as_str(),
        wire_name(policy.redirect),
        policy.canonical_host.as_deref().unwrap_or("none"),
        wire_name(policy.mixed_content),
    )
}

/// One row of `site list`: the site and its certificate state at a glance.
#[derive(Debug, Clone, Serialize)]
pub struct SiteListing {
    /// The site, as the API answers it.
    #[serde(flatten)]
    pub site: api::Site,
    /// Its certificates summed up.
    pub certificate: api::CertificateOverview,
}

/// `site list`.
pub fn site_list(rows: &[SiteListing]) -> String {
    if rows.is_empty() {
        return "no sites; add one with `autohttps site add <name> <domain>`".into();
    }
    let mut out = format!(
        "{:<20} {:<8} {:<8} {:<21} {}\n",
        "SITE", "HTTPS", "CERT", "EXPIRES", "HOSTNAMES"
    );
    for row in rows {
        let summary = &row.certificate;
        let _ = writeln!(
            out,
            "{:<20} {:<8} {:<8} {:<21} {}",
            row.site.name,
            row.site.policy.https.as_str(),
            wire_name(summary.state),
            summary
                .soonest_expiry
                .map_or_else(|| "-".to_owned(), rfc3339),
            hostnames(&row.site).join(", ")
        );
    }
    out.trim_end().to_owned()
}

/// A site's certificates, what they do not cover yet and the issuance schedule.
pub fn certificates(status: &api::CertificateStatus) -> String {
    let mut out = String::new();
    for certificate in &status.certificates {
        let _ = writeln!(
            out,
            "certificate {} valid until {} for {}",
            certificate.serial,
            rfc3339(certificate.not_after),
            certificate.names.join(", ")
        );
    }
    if !status.uncovered.is_empty() {
        let _ = writeln!(out, "not covered yet: {}", status.uncovered.join(", "));
    }
    if let Some(problem) = &status.issuance.last_problem {
        let _ = writeln!(out, "last problem: {problem}");
    }
    if let Some(next) = status.issuance.next_attempt_at {
        let _ = writeln!(out, "next attempt: {}", rfc3339(next));
    }
    out
}

/// `site show`: the site, its certificates and recent events.
#[derive(Debug, Clone, Serialize)]
pub struct SiteDetails {
    /// The site, and why the edge cannot serve its entry, if it cannot.
    pub site: api::SiteDetail,
    /// Its certificate status.
    pub certificates: api::CertificateStatus,
    /// Its recent events, newest first.
    pub events: Vec<api::Event>,
}

/// `site show`.
pub fn site_details(all: &SiteDetails) -> String {
    let mut out = site(&all.site.site);
    out.push('\n');
    if let Some(rejected) = &all.site.policy_rejected {
        let served = if rejected.previous_kept {
            "the edge keeps its previous good entry"
        } else {
            "the edge does not know the site's names"
        };
        let _ = writeln!(
            out,
            "policy: REJECTED by the filter's validation ({served}); fix the site:"
        );
        for problem in &rejected.problems {
            let _ = writeln!(out, "  {problem}");
        }
    }
    out.push_str(&certificates(&all.certificates));
    out.push_str("recent events:\n");
    for event in &all.events {
        let _ = writeln!(
            out,
            "  {} {:<20} {}",
            rfc3339(event.at),
            event.kind,
            event.message
        );
    }
    out.trim_end().to_owned()
}

/// `site mixed-content`.
pub fn mixed_content(name: &str, findings: &[api::MixedContentFinding]) -> String {
    if findings.is_empty() {
        return format!(
            "no mixed content reported for {name} (reports arrive while the site's mixed_content is \"report\" and browsers load its pages over HTTPS)"
        );
    }
    let mut out = format!("pages of {name} that load insecure resources:\n");
    let mut page = "";
    for finding in findings {
        if finding.page != page {
            let _ = writeln!(out, "  {}", finding.page);
            page = &finding.page;
        }
        let _ = writeln!(
            out,
            "    {} ({}, {} report(s), last {})",
            finding.resource,
            finding.directive,
            finding.reports,
            rfc3339(finding.last_seen)
        );
    }
    out.push_str("fix: load these over https:// (or switch the site to mixed_content \"upgrade\")");
    out
}

/// `diagnose`.
pub fn diagnosis(d: &api::Diagnosis) -> String {
    let addresses: Vec<String> = d.dns.addresses.iter().map(ToString::to_string).collect();
    let mut out = format!(
        "{}: {}\n  site: {}\n  dns: {} (platform: {})\n",
        d.hostname,
        wire_name(d.verdict),
        d.site,
        if addresses.is_empty() {
            "no addresses".to_owned()
        } else {
            addresses.join(", ")
        },
        d.platform
    );
    match &d.certificate {
        Some(c) => {
            let _ = writeln!(
                out,
                "  certificate: {} expires {}",
                c.serial,
                rfc3339(c.not_after)
            );
        }
        None => out.push_str("  certificate: none covers this name\n"),
    }
    if let Some(problem) = &d.last_problem {
        let _ = writeln!(out, "  last problem: {problem}");
    }
    let _ = write!(out, "  fix: {}", d.fix);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[test]
    fn a_listing_row_is_the_site_with_its_certificate_overview() {
        let text = include_str!("../../tests/golden/admin_api/show_site.json");
        let golden: serde_json::Value = serde_json::from_str(text).expect("golden JSON");
        let site: api::SiteDetail = serde_json::from_value(golden["body"].clone()).expect("a site");
        let site = site.site;
        let row = SiteListing {
            site: site.clone(),
            certificate: api::CertificateOverview {
                state: api::CertificateState::Partial,
                soonest_expiry: Some(time::macros::datetime!(2027-02-01 00:00:00 UTC)),
                uncovered: 1,
            },
        };
        let json = serde_json::to_value(&row).expect("serialises");
        assert_eq!(json["name"], "shop");
        assert_eq!(json["policy"], golden["body"]["policy"]);
        assert_eq!(
            json["certificate"],
            serde_json::json!({ "state": "partial", "soonest_expiry": "2027-02-01T00:00:00Z", "uncovered": 1 })
        );
        let table = site_list(&[row]);
        assert!(
            table.contains("shop                 force    partial  2027-02-01T00:00:00Z"),
            "{table}"
        );
    }

    #[test]
    fn site_show_names_a_rejected_policy_entry_and_its_problems() {
        let golden = |name: &str| -> Value {
            let text = match name {
                "show_site" => include_str!("../../tests/golden/admin_api/show_site.json"),
                _ => include_str!("../../tests/golden/admin_api/certificate_status.json"),
            };
            serde_json::from_str::<Value>(text).expect("golden JSON")["body"].clone()
        };
        let shown = |rejected: Value| {
            let mut site: api::SiteDetail =
                serde_json::from_value(golden("show_site")).expect("a site");
            site.policy_rejected = serde_json::from_value(rejected).expect("a rejection");
            site_details(&SiteDetails {
                site,
                certificates: serde_json::from_value(golden("certificate_status"))
                    .expect("a certificate status"),
                events: Vec::new(),
            })
        };
        let fine = shown(Value::Null);
        assert!(!fine.contains("REJECTED"), "{fine}");
        let rejected = shown(json!({
            "site": "shop",
            "problems": ["hostnames[1]: not a valid name", "cert_ready[0]: not a name of the site"],
            "previous_kept": true
        }));
        assert!(
            rejected.contains("policy: REJECTED by the filter's validation (the edge keeps its previous good entry)"),
            "{rejected}"
        );
        assert!(
            rejected.contains("  hostnames[1]: not a valid name\n"),
            "{rejected}"
        );
        assert!(
            rejected.contains("  cert_ready[0]: not a name of the site"),
            "{rejected}"
        );
    }
}
