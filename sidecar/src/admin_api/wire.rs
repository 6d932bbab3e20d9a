//! The store's and the diagnosis's values as the contract's wire types (`autohttps-api`).
//!
//! The store keeps what it needs (validated [`Hostname`]s, keys, row ids); the wire carries
//! what clients read. Converting here, field by field, means a change in the store cannot
//! change the JSON by accident, and a key can never reach a response: the wire types have no
//! field for one.

use autohttps_api as api;

use crate::diagnose::{CertificateSummary, Diagnosis, Verdict};
use crate::dns_check::DnsAnswer;
use crate::hostname::Hostname;
use crate::store::{
    Event, HostnameKind, HstsPolicy, IssuanceSchedule, MixedContentFinding, OrderInFlight, Site,
    SiteHostname, SitePolicy, StoredCertificate,
};

fn names(names: Vec<Hostname>) -> Vec<String> {
    names.into_iter().map(String::from).collect()
}

impl From<api::HstsPolicy> for HstsPolicy {
    fn from(hsts: api::HstsPolicy) -> Self {
        Self {
            enabled: hsts.enabled,
            max_age: hsts.max_age,
            include_subdomains: hsts.include_subdomains,
            preload: hsts.preload,
        }
    }
}

impl From<HstsPolicy> for api::HstsPolicy {
    fn from(hsts: HstsPolicy) -> Self {
        Self {
            enabled: hsts.enabled,
            max_age: hsts.max_age,
            include_subdomains: hsts.include_subdomains,
            preload: hsts.preload,
        }
    }
}

impl From<SitePolicy> for api::SitePolicy {
    fn from(policy: SitePolicy) -> Self {
        Self {
            https: policy.https,
            redirect: policy.redirect,
            hsts: policy.hsts.into(),
            mixed_content: policy.mixed_content,
            canonical_host: policy.canonical_host.map(String::from),
        }
    }
}

impl From<HostnameKind> for api::HostnameKind {
    fn from(kind: HostnameKind) -> Self {
        match kind {
            HostnameKind::Primary => Self::Primary,
            HostnameKind::Subdomain => Self::Subdomain,
            HostnameKind::Alias => Self::Alias,
        }
    }
}

impl From<SiteHostname> for api::SiteHostname {
    fn from(hostname: SiteHostname) -> Self {
        Self {
            name: hostname.name.into(),
            kind: hostname.kind.into(),
        }
    }
}

impl From<IssuanceSchedule> for api::IssuanceSchedule {
    fn from(schedule: IssuanceSchedule) -> Self {
        Self {
            next_attempt_at: schedule.next_attempt_at,
            failures: schedule.failures,
            last_problem: schedule.last_problem,
            regenerate_requested: schedule.regenerate_requested,
        }
    }
}

impl From<Site> for api::Site {
    fn from(site: Site) -> Self {
        Self {
            name: site.name,
            primary: site.primary.into(),
            hostnames: site.hostnames.into_iter().map(Into::into).collect(),
            policy: site.policy.into(),
            created_at: site.created_at,
            issuance: site.issuance.into(),
        }
    }
}

impl From<StoredCertificate> for api::Certificate {
    fn from(certificate: StoredCertificate) -> Self {
        Self {
            id: certificate.id,
            site: certificate.site,
            names: names(certificate.names),
            not_before: certificate.not_before,
            not_after: certificate.not_after,
            serial: certificate.serial,
            ari_id: certificate.ari_id,
            issued_at: certificate.issued_at,
        }
    }
}

impl From<OrderInFlight> for api::OrderSummary {
    fn from(order: OrderInFlight) -> Self {
        Self {
            names: names(order.names),
            order_url: order.order_url,
            created_at: order.created_at,
        }
    }
}

impl From<Event> for api::Event {
    fn from(event: Event) -> Self {
        Self {
            id: event.id,
            site: event.site,
            at: event.at,
            kind: event.kind.to_string(),
            message: event.message,
            problem_type: event.problem_type,
            reason: event.reason,
        }
    }
}

impl From<MixedContentFinding> for api::MixedContentFinding {
    fn from(finding: MixedContentFinding) -> Self {
        Self {
            page: finding.page,
            resource: finding.resource,
            directive: finding.directive,
            reports: finding.reports,
            first_seen: finding.first_seen,
            last_seen: finding.last_seen,
        }
    }
}

impl From<Verdict> for api::Verdict {
    fn from(verdict: Verdict) -> Self {
        match verdict {
            Verdict::Ok => Self::Ok,
            Verdict::NotInCertificate => Self::NotInCertificate,
            Verdict::NoCertificate => Self::NoCertificate,
            Verdict::DnsNotPointing => Self::DnsNotPointing,
            Verdict::Pending => Self::Pending,
            Verdict::Failing => Self::Failing,
        }
    }
}

impl From<DnsAnswer> for api::DnsAnswer {
    fn from(answer: DnsAnswer) -> Self {
        Self {
            name: answer.name.into(),
            addresses: answer.addresses,
            cnames: answer.cnames,
            points_here: answer.points_here,
            problem: answer.problem,
        }
    }
}

impl From<CertificateSummary> for api::CertificateSummary {
    fn from(certificate: CertificateSummary) -> Self {
        Self {
            serial: certificate.serial,
            not_after: certificate.not_after,
            names: names(certificate.names),
        }
    }
}

impl From<Diagnosis> for api::Diagnosis {
    fn from(diagnosis: Diagnosis) -> Self {
        Self {
            hostname: diagnosis.hostname.into(),
            site: diagnosis.site,
            dns: diagnosis.dns.into(),
            platform: diagnosis.platform,
            certificate: diagnosis.certificate.map(Into::into),
            verdict: diagnosis.verdict.into(),
            last_problem: diagnosis.last_problem,
            next_attempt_at: diagnosis.next_attempt_at,
            fix: diagnosis.fix,
        }
    }
}
