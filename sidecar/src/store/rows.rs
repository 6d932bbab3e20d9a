//! Rows as both backends store them (timestamps in unix seconds, enums and name lists as
//! text), and their decoding into the store's types: one place for the encoding.

use time::OffsetDateTime;

use super::{
    HostnameKind, HstsPolicy, IssuanceSchedule, PrivateKeyPem, Site, SiteHostname, SitePolicy,
    StoredCertificate,
};
use crate::error::{Error, Result};
use crate::hostname::Hostname;

/// Unix seconds, as stored.
pub(super) fn ts(at: OffsetDateTime) -> i64 {
    at.unix_timestamp()
}

/// A stored unix-seconds timestamp.
pub(super) fn from_ts(seconds: i64) -> Result<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp(seconds)
        .map_err(|e| Error::CorruptStore(format!("timestamp {seconds}: {e}")))
}

pub(super) fn enum_text<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(text)) => text,
        _ => String::new(),
    }
}

pub(super) fn enum_from<T: serde::de::DeserializeOwned>(text: &str) -> Result<T> {
    serde_json::from_value(serde_json::Value::String(text.to_owned()))
        .map_err(|_| Error::CorruptStore(format!("unknown value {text:?}")))
}

pub(super) fn names_json(names: &[Hostname]) -> String {
    serde_json::to_string(names).unwrap_or_else(|_| "[]".into())
}

pub(super) fn names_from_json(text: &str) -> Result<Vec<Hostname>> {
    let raw: Vec<String> =
        serde_json::from_str(text).map_err(|e| Error::CorruptStore(format!("names list: {e}")))?;
    raw.iter()
        .map(|name| Hostname::parse(name).map_err(|e| Error::CorruptStore(e.to_string())))
        .collect()
}

pub(super) fn hostname_from(text: &str) -> Result<Hostname> {
    Hostname::parse(text).map_err(|e| Error::CorruptStore(e.to_string()))
}

/// The columns of a [`super::CertificateCoverage`], in the order both backends read them.
pub(super) const COVERAGE_COLUMNS: &str = "id, site, names, not_before, not_after, serial";

pub(super) const CERT_COLUMNS: &str =
    "id, site, names, chain_pem, key_pem, not_before, not_after, serial, ari_id, issued_at";

pub(super) struct RawCertificate {
    pub(super) id: i64,
    pub(super) site: String,
    pub(super) names: String,
    pub(super) chain_pem: String,
    pub(super) key_pem: String,
    pub(super) not_before: i64,
    pub(super) not_after: i64,
    pub(super) serial: String,
    pub(super) ari_id: Option<String>,
    pub(super) issued_at: i64,
}

impl RawCertificate {
    pub(super) fn decode(self) -> Result<StoredCertificate> {
        Ok(StoredCertificate {
            id: self.id,
            site: self.site,
            names: names_from_json(&self.names)?,
            chain_pem: self.chain_pem,
            key_pem: PrivateKeyPem::new(self.key_pem),
            not_before: from_ts(self.not_before)?,
            not_after: from_ts(self.not_after)?,
            serial: self.serial,
            ari_id: self.ari_id,
            issued_at: from_ts(self.issued_at)?,
        })
    }
}

pub(super) const SITE_COLUMNS: &str =
    "name, primary_hostname, https_mode, redirect, hsts_enabled, hsts_max_age,
     mixed_content, created_at, next_attempt_at, failures, last_problem, regenerate,
     hsts_include_subdomains, hsts_preload, canonical_host";

/// A `sites` row as stored, before its text is decoded.
pub(super) struct RawSite {
    pub(super) name: String,
    pub(super) primary: String,
    pub(super) https: String,
    pub(super) redirect: String,
    pub(super) hsts_enabled: bool,
    pub(super) max_age: i64,
    pub(super) mixed: String,
    pub(super) created: i64,
    pub(super) next: Option<i64>,
    pub(super) failures: u32,
    pub(super) last_problem: Option<String>,
    pub(super) regenerate_requested: bool,
    pub(super) include_subdomains: bool,
    pub(super) preload: bool,
    pub(super) canonical_host: Option<String>,
}

impl RawSite {
    /// The site, with its hostnames (in any order: the primary is put first here).
    pub(super) fn decode(self, mut hostnames: Vec<SiteHostname>) -> Result<Site> {
        hostnames.sort_by_key(|h| h.kind != HostnameKind::Primary);
        Ok(Site {
            name: self.name,
            primary: hostname_from(&self.primary)?,
            hostnames,
            policy: SitePolicy {
                https: enum_from(&self.https)?,
                redirect: enum_from(&self.redirect)?,
                hsts: HstsPolicy {
                    enabled: self.hsts_enabled,
                    max_age: u64::try_from(self.max_age).unwrap_or_default(),
                    include_subdomains: self.include_subdomains,
                    preload: self.preload,
                },
                mixed_content: enum_from(&self.mixed)?,
                canonical_host: self
                    .canonical_host
                    .as_deref()
                    .map(hostname_from)
                    .transpose()?,
            },
            created_at: from_ts(self.created)?,
            issuance: IssuanceSchedule {
                next_attempt_at: self.next.map(from_ts).transpose()?,
                failures: self.failures,
                last_problem: self.last_problem,
                regenerate_requested: self.regenerate_requested,
            },
        })
    }
}

pub(super) fn site_hostname(hostname: &str, kind: &str) -> Result<SiteHostname> {
    Ok(SiteHostname {
        name: hostname_from(hostname)?,
        kind: enum_from(kind)?,
    })
}

/// Sites from their rows, each with its hostnames from `(site, hostname, kind)` rows (any
/// order): how both backends read many sites in two queries rather than one per site.
pub(super) fn sites_with_hostnames(
    raw_sites: Vec<RawSite>,
    hostnames: impl IntoIterator<Item = Result<(String, String, String)>>,
) -> Result<Vec<Site>> {
    let mut by_site: std::collections::HashMap<String, Vec<SiteHostname>> =
        std::collections::HashMap::with_capacity(raw_sites.len());
    for row in hostnames {
        let (site, hostname, kind) = row?;
        by_site
            .entry(site)
            .or_default()
            .push(site_hostname(&hostname, &kind)?);
    }
    raw_sites
        .into_iter()
        .map(|raw| {
            let hostnames = by_site.remove(&raw.name).unwrap_or_default();
            raw.decode(hostnames)
        })
        .collect()
}
