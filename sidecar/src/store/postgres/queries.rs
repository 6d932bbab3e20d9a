//! Reading PostgreSQL rows into the store's types and the statements several store calls share
//! (loading sites, adding a hostname or an event, selecting certificates, the change-log lock).

use postgres::{GenericClient, Row, Transaction};
use time::OffsetDateTime;

use super::connections::conflict_on_duplicate;
use super::statements::Prepared as _;
use crate::error::{Error, Result};
use crate::hostname::Hostname;
use crate::store::rows::{
    CERT_COLUMNS, RawCertificate, RawSite, SITE_COLUMNS, enum_text, from_ts, site_hostname,
    sites_with_hostnames, ts,
};
use crate::store::rules::{hostname_taken, no_such_site};
use crate::store::{HostnameKind, Site, SiteEventKind, StoredCertificate};

impl RawSite {
    pub(super) fn from_pg(row: &Row) -> Result<Self> {
        Ok(Self {
            name: row.try_get(0)?,
            primary: row.try_get(1)?,
            https: row.try_get(2)?,
            redirect: row.try_get(3)?,
            hsts_enabled: row.try_get(4)?,
            max_age: row.try_get(5)?,
            mixed: row.try_get(6)?,
            created: row.try_get(7)?,
            next: row.try_get(8)?,
            failures: u32::try_from(row.try_get::<_, i64>(9)?).unwrap_or(u32::MAX),
            last_problem: row.try_get(10)?,
            regenerate_requested: row.try_get(11)?,
            include_subdomains: row.try_get(12)?,
            preload: row.try_get(13)?,
            canonical_host: row.try_get(14)?,
        })
    }
}

impl RawCertificate {
    pub(super) fn from_pg(row: &Row) -> Result<Self> {
        Ok(Self {
            id: row.try_get(0)?,
            site: row.try_get(1)?,
            names: row.try_get(2)?,
            chain_pem: row.try_get(3)?,
            key_pem: row.try_get(4)?,
            not_before: row.try_get(5)?,
            not_after: row.try_get(6)?,
            serial: row.try_get(7)?,
            ari_id: row.try_get(8)?,
            issued_at: row.try_get(9)?,
        })
    }
}

pub(super) fn load_site(client: &mut impl GenericClient, name: &str) -> Result<Option<Site>> {
    // The site and its hostnames in one statement: every node reloads each site that changed.
    let rows = client.query_p(
        &format!(
            "SELECT {SITE_COLUMNS}, hostnames.hostname, hostnames.kind
             FROM sites LEFT JOIN hostnames ON hostnames.site = sites.name
             WHERE sites.name = $1
             ORDER BY hostnames.hostname"
        ),
        &[&name],
    )?;
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let raw = RawSite::from_pg(first)?;
    let mut hostnames = Vec::with_capacity(rows.len());
    for row in &rows {
        let hostname: Option<String> = row.try_get(SITE_COLUMN_COUNT)?;
        let kind: Option<String> = row.try_get(SITE_COLUMN_COUNT + 1)?;
        if let (Some(hostname), Some(kind)) = (hostname, kind) {
            hostnames.push(site_hostname(&hostname, &kind)?);
        }
    }
    raw.decode(hostnames).map(Some)
}

/// How many columns [`SITE_COLUMNS`] names ([`RawSite::from_pg`] reads them in order).
const SITE_COLUMN_COUNT: usize = 15;

pub(super) fn require_site(client: &mut impl GenericClient, name: &str) -> Result<Site> {
    load_site(client, name)?.ok_or_else(|| no_such_site(name))
}

pub(super) fn load_all_sites(client: &mut impl GenericClient) -> Result<Vec<Site>> {
    let raw_sites = client
        .query_p(
            &format!("SELECT {SITE_COLUMNS} FROM sites ORDER BY name"),
            &[],
        )?
        .iter()
        .map(RawSite::from_pg)
        .collect::<Result<Vec<_>>>()?;
    let hostnames = client.query_p(
        "SELECT site, hostname, kind FROM hostnames ORDER BY site, hostname",
        &[],
    )?;
    sites_with_hostnames(raw_sites, hostnames.iter().map(hostname_row))
}

/// A `(site, hostname, kind)` row of `hostnames`.
pub(super) fn hostname_row(row: &Row) -> Result<(String, String, String)> {
    Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?))
}

pub(super) fn insert_hostname(
    tx: &mut Transaction<'_>,
    site: &str,
    name: &Hostname,
    kind: HostnameKind,
    now: OffsetDateTime,
) -> Result<()> {
    let owner: Option<String> = tx
        .query_opt_p(
            "SELECT site FROM hostnames WHERE hostname = $1",
            &[&name.as_str()],
        )?
        .map(|row| row.try_get(0))
        .transpose()?;
    if let Some(owner) = owner {
        return Err(hostname_taken(name, site, &owner));
    }
    conflict_on_duplicate(
        tx.execute_p(
            "INSERT INTO hostnames (hostname, site, kind, added_at) VALUES ($1, $2, $3, $4)",
            &[&name.as_str(), &site, &enum_text(&kind), &ts(now)],
        ),
        || {
            Error::Conflict(format!(
                "{name} was just added to another site; remove it there first"
            ))
        },
    )?;
    Ok(())
}

/// A site's next attempt time, its row locked until the transaction ends (`None` when there
/// is no such site).
pub(super) fn next_attempt_for_update(
    tx: &mut Transaction<'_>,
    site: &str,
) -> Result<Option<Option<OffsetDateTime>>> {
    tx.query_opt_p(
        "SELECT next_attempt_at FROM sites WHERE name = $1 FOR UPDATE",
        &[&site],
    )?
    .map(|row| row.try_get::<_, Option<i64>>(0)?.map(from_ts).transpose())
    .transpose()
}

pub(super) fn insert_event(
    client: &mut impl GenericClient,
    site: &str,
    at: OffsetDateTime,
    kind: &SiteEventKind,
    message: &str,
    problem_type: Option<&str>,
    reason: Option<&str>,
) -> Result<()> {
    client.execute_p(
        "INSERT INTO events (site, at, kind, message, problem_type, reason) VALUES ($1, $2, $3, $4, $5, $6)",
        &[&site, &ts(at), &kind.as_str(), &message, &problem_type, &reason],
    )?;
    Ok(())
}

pub(super) fn query_certificates(
    client: &mut impl GenericClient,
    site: Option<&str>,
) -> Result<Vec<StoredCertificate>> {
    client
        .query_p(
            &format!(
                "SELECT {CERT_COLUMNS} FROM certificates
                 WHERE superseded_at IS NULL AND ($1::TEXT IS NULL OR site = $1)
                 ORDER BY not_after DESC, id DESC"
            ),
            &[&site],
        )?
        .iter()
        .map(|row| RawCertificate::from_pg(row)?.decode())
        .collect()
}

pub(super) fn site_findings_bytes(client: &mut impl GenericClient, site: &str) -> Result<u64> {
    let total: i64 = client
        .query_one_p(
            "SELECT COALESCE(SUM(bytes), 0)::BIGINT FROM mixed_content WHERE site = $1",
            &[&site],
        )?
        .try_get(0)?;
    Ok(u64::try_from(total).unwrap_or(0))
}

pub(super) fn count(value: i64) -> u64 {
    u64::try_from(value).unwrap_or_default()
}

pub(super) fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `load_site` reads the hostname and kind right after the site's columns.
    #[test]
    fn site_column_count_matches_the_site_columns() {
        assert_eq!(SITE_COLUMNS.split(',').count(), SITE_COLUMN_COUNT);
    }
}
