//! Reading rows into the store's types and the statements several store calls share (loading
//! sites, adding a hostname or an event, selecting certificates).

use rusqlite::{Connection, OptionalExtension, Row, Transaction, params};
use time::OffsetDateTime;

use super::super::rows::{
    CERT_COLUMNS, COVERAGE_COLUMNS, RawCertificate, RawSite, SITE_COLUMNS, enum_text, from_ts,
    names_from_json, site_hostname, sites_with_hostnames, ts,
};
use super::super::rules::{hostname_taken, no_such_site};
use super::super::{CertificateCoverage, HostnameKind, Site, SiteEventKind, StoredCertificate};
use crate::error::Result;
use crate::hostname::Hostname;

impl RawCertificate {
    pub(super) fn from_row(row: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            id: row.get(0)?,
            site: row.get(1)?,
            names: row.get(2)?,
            chain_pem: row.get(3)?,
            key_pem: row.get(4)?,
            not_before: row.get(5)?,
            not_after: row.get(6)?,
            serial: row.get(7)?,
            ari_id: row.get(8)?,
            issued_at: row.get(9)?,
        })
    }
}

impl RawSite {
    pub(super) fn from_row(row: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            name: row.get(0)?,
            primary: row.get(1)?,
            https: row.get(2)?,
            redirect: row.get(3)?,
            hsts_enabled: row.get(4)?,
            max_age: row.get(5)?,
            mixed: row.get(6)?,
            created: row.get(7)?,
            next: row.get(8)?,
            failures: row.get(9)?,
            last_problem: row.get(10)?,
            regenerate_requested: row.get(11)?,
            include_subdomains: row.get(12)?,
            preload: row.get(13)?,
            canonical_host: row.get(14)?,
        })
    }
}

pub(super) fn load_site(conn: &Connection, name: &str) -> Result<Option<Site>> {
    let row = conn
        .query_row(
            &format!("SELECT {SITE_COLUMNS} FROM sites WHERE name = ?1"),
            [name],
            RawSite::from_row,
        )
        .optional()?;
    let Some(raw) = row else {
        return Ok(None);
    };
    let mut statement =
        conn.prepare("SELECT hostname, kind FROM hostnames WHERE site = ?1 ORDER BY hostname")?;
    let hostnames = statement
        .query_map([&raw.name], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
        })?
        .map(|row| {
            let (hostname, kind) = row?;
            site_hostname(&hostname, &kind)
        })
        .collect::<Result<Vec<_>>>()?;
    raw.decode(hostnames).map(Some)
}

/// Every site with its hostnames in two queries (not one per site): the sites by name, and all
/// hostnames grouped by site.
pub(super) fn load_all_sites(conn: &Connection) -> Result<Vec<Site>> {
    let raw_sites = conn
        .prepare(&format!("SELECT {SITE_COLUMNS} FROM sites ORDER BY name"))?
        .query_map([], RawSite::from_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut statement =
        conn.prepare("SELECT site, hostname, kind FROM hostnames ORDER BY site, hostname")?;
    let hostnames = statement.query_map([], hostname_row)?;
    sites_with_hostnames(raw_sites, hostnames.map(|row| Ok(row?)))
}

/// A `(site, hostname, kind)` row of `hostnames`.
fn hostname_row(row: &Row<'_>) -> rusqlite::Result<(String, String, String)> {
    Ok((row.get(0)?, row.get(1)?, row.get(2)?))
}

pub(super) fn require_site(conn: &Connection, name: &str) -> Result<Site> {
    load_site(conn, name)?.ok_or_else(|| no_such_site(name))
}

pub(super) fn insert_hostname(
    tx: &Transaction<'_>,
    site: &str,
    name: &Hostname,
    kind: HostnameKind,
    now: OffsetDateTime,
) -> Result<()> {
    let owner: Option<String> = tx
        .query_row(
            "SELECT site FROM hostnames WHERE hostname = ?1",
            [name.as_str()],
            |row| row.get(0),
        )
        .optional()?;
    if let Some(owner) = owner {
        return Err(hostname_taken(name, site, &owner));
    }
    tx.execute(
        "INSERT INTO hostnames (hostname, site, kind, added_at) VALUES (?1, ?2, ?3, ?4)",
        params![name.as_str(), site, enum_text(&kind), ts(now)],
    )?;
    Ok(())
}

/// The bytes a site's findings count against its budget.
pub(super) fn site_findings_bytes(conn: &Connection, site: &str) -> Result<u64> {
    let total: i64 = conn.query_row(
        "SELECT COALESCE(SUM(bytes), 0) FROM mixed_content WHERE site = ?1",
        [site],
        |row| row.get(0),
    )?;
    Ok(u64::try_from(total).unwrap_or(0))
}

/// A site's next attempt time (`None` when there is no such site).
pub(super) fn next_attempt_of(
    conn: &Connection,
    site: &str,
) -> Result<Option<Option<OffsetDateTime>>> {
    let stored: Option<Option<i64>> = conn
        .query_row(
            "SELECT next_attempt_at FROM sites WHERE name = ?1",
            [site],
            |row| row.get(0),
        )
        .optional()?;
    stored.map(|next| next.map(from_ts).transpose()).transpose()
}

pub(super) fn insert_event(
    tx: &Connection,
    site: &str,
    at: OffsetDateTime,
    kind: &SiteEventKind,
    message: &str,
    problem_type: Option<&str>,
    reason: Option<&str>,
) -> Result<()> {
    tx.execute(
        "INSERT INTO events (site, at, kind, message, problem_type, reason) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![site, ts(at), kind.as_str(), message, problem_type, reason],
    )?;
    Ok(())
}

pub(super) fn query_certificates(
    conn: &Connection,
    sql_where: &str,
    param: &str,
) -> Result<Vec<StoredCertificate>> {
    let mut statement = conn.prepare(&format!(
        "SELECT {CERT_COLUMNS} FROM certificates WHERE superseded_at IS NULL {sql_where}
         ORDER BY not_after DESC, id DESC"
    ))?;
    let rows = if sql_where.contains("?1") {
        statement
            .query_map([param], RawCertificate::from_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?
    } else {
        statement
            .query_map([], RawCertificate::from_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?
    };
    rows.into_iter().map(RawCertificate::decode).collect()
}

/// Up to `limit` sites with ids after `after` (by id), with their hostnames, and the current
/// certificates of those sites (newest first): three range queries, whatever the page's size.
pub(super) fn load_sites_page(
    conn: &Connection,
    after: &str,
    limit: usize,
) -> Result<(Vec<Site>, Vec<CertificateCoverage>)> {
    let raw_sites = conn
        .prepare(&format!(
            "SELECT {SITE_COLUMNS} FROM sites WHERE name > ?1 ORDER BY name LIMIT ?2"
        ))?
        .query_map(
            params![after, i64::try_from(limit).unwrap_or(i64::MAX)],
            RawSite::from_row,
        )?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let (Some(first), Some(last)) = (raw_sites.first(), raw_sites.last()) else {
        return Ok((Vec::new(), Vec::new()));
    };
    let (first, last) = (first.name.clone(), last.name.clone());
    let mut statement = conn.prepare(
        "SELECT site, hostname, kind FROM hostnames WHERE site >= ?1 AND site <= ?2
         ORDER BY site, hostname",
    )?;
    let hostnames = statement.query_map(params![first, last], hostname_row)?;
    let sites = sites_with_hostnames(raw_sites, hostnames.map(|row| Ok(row?)))?;
    let mut statement = conn.prepare(&format!(
        "SELECT {COVERAGE_COLUMNS} FROM certificates
         WHERE superseded_at IS NULL AND site >= ?1 AND site <= ?2
         ORDER BY not_after DESC, id DESC"
    ))?;
    let mut rows = statement.query(params![first, last])?;
    let mut certificates = Vec::new();
    while let Some(row) = rows.next()? {
        certificates.push(coverage_from_row(row)?);
    }
    Ok((sites, certificates))
}

/// A [`CertificateCoverage`] from a row of [`COVERAGE_COLUMNS`].
pub(super) fn coverage_from_row(row: &Row<'_>) -> Result<CertificateCoverage> {
    Ok(CertificateCoverage {
        id: row.get(0)?,
        site: row.get(1)?,
        names: names_from_json(&row.get::<_, String>(2)?)?,
        not_before: from_ts(row.get(3)?)?,
        not_after: from_ts(row.get(4)?)?,
        serial: row.get(5)?,
    })
}
