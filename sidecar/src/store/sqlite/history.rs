//! Site history (events), the metrics counts and mixed-content findings, in SQLite.

use rusqlite::params;
use time::OffsetDateTime;

use super::SqliteStore;
use super::queries::{insert_event, site_findings_bytes};
use crate::error::Result;
use crate::store::rows::{enum_from, from_ts, ts};
use crate::store::{
    Event, FindingWeight, HistoryStore, HttpsMode, MixedContentFinding, Recorded, SiteEventKind,
    StoreCounts, counts_from_tallies, finding_bytes, findings_to_evict,
};

impl HistoryStore for SqliteStore {
    fn add_event(
        &self,
        site: &str,
        at: OffsetDateTime,
        kind: SiteEventKind,
        message: &str,
        problem_type: Option<&str>,
        reason: Option<&str>,
    ) -> Result<()> {
        insert_event(&self.lock(), site, at, &kind, message, problem_type, reason)
    }

    fn events(&self, site: &str, limit: usize) -> Result<Vec<Event>> {
        let conn = self.lock();
        let mut statement = conn.prepare(
            "SELECT id, site, at, kind, message, problem_type, reason FROM events
             WHERE site = ?1 ORDER BY id DESC LIMIT ?2",
        )?;
        let rows = statement
            .query_map(
                params![site, i64::try_from(limit).unwrap_or(i64::MAX)],
                |row| {
                    Ok((
                        row.get::<_, i64>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, i64>(2)?,
                        row.get::<_, String>(3)?,
                        row.get::<_, String>(4)?,
                        row.get::<_, Option<String>>(5)?,
                        row.get::<_, Option<String>>(6)?,
                    ))
                },
            )?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter()
            .map(|(id, site, at, kind, message, problem_type, reason)| {
                Ok(Event {
                    id,
                    site,
                    at: from_ts(at)?,
                    kind: SiteEventKind::from(kind),
                    message,
                    problem_type,
                    reason,
                })
            })
            .collect()
    }

    fn counts(&self) -> Result<StoreCounts> {
        let conn = self.lock();
        let events = conn
            .prepare("SELECT kind, reason, COUNT(*) FROM events GROUP BY kind, reason")?
            .query_map([], |row| {
                Ok((
                    SiteEventKind::from(row.get::<_, String>(0)?),
                    row.get::<_, Option<String>>(1)?,
                    u64::try_from(row.get::<_, i64>(2)?).unwrap_or_default(),
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let modes = conn
            .prepare("SELECT https_mode, COUNT(*) FROM sites GROUP BY https_mode")?
            .query_map([], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?
            .into_iter()
            .map(|(mode, n)| {
                Ok((
                    enum_from::<HttpsMode>(&mode)?,
                    u64::try_from(n).unwrap_or_default(),
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let orders_in_flight: i64 =
            conn.query_row("SELECT COUNT(*) FROM orders", [], |row| row.get(0))?;
        Ok(counts_from_tallies(
            events,
            modes,
            u64::try_from(orders_in_flight).unwrap_or_default(),
        ))
    }

    fn record_mixed_content(
        &self,
        site: &str,
        page: &str,
        resource: &str,
        directive: &str,
        at: OffsetDateTime,
        budget_bytes: u64,
    ) -> Result<Recorded> {
        let bytes = finding_bytes(page, resource, directive);
        let stored_bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let updated = tx.execute(
            "UPDATE mixed_content SET reports = reports + 1, last_seen = ?4, directive = ?5, bytes = ?6
             WHERE site = ?1 AND page = ?2 AND resource = ?3",
            params![site, page, resource, ts(at), directive, stored_bytes],
        )?;
        if updated > 0 {
            tx.commit()?;
            return Ok(Recorded::Counted);
        }
        let mut evicted = 0;
        if site_findings_bytes(&tx, site)?.saturating_add(bytes) > budget_bytes {
            let findings = tx
                .prepare(
                    "SELECT rowid, reports, last_seen, bytes FROM mixed_content WHERE site = ?1",
                )?
                .query_map([site], |row| {
                    Ok(FindingWeight {
                        key: row.get::<_, i64>(0)?,
                        reports: u64::try_from(row.get::<_, i64>(1)?).unwrap_or(0),
                        last_seen: row.get(2)?,
                        bytes: u64::try_from(row.get::<_, i64>(3)?).unwrap_or(0),
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            for rowid in findings_to_evict(findings, bytes, budget_bytes) {
                tx.execute("DELETE FROM mixed_content WHERE rowid = ?1", [rowid])?;
                evicted += 1;
            }
        }
        tx.execute(
            "INSERT INTO mixed_content (site, page, resource, directive, reports, first_seen, last_seen, bytes)
             VALUES (?1, ?2, ?3, ?4, 1, ?5, ?5, ?6)",
            params![site, page, resource, directive, ts(at), stored_bytes],
        )?;
        tx.commit()?;
        Ok(Recorded::Added { evicted })
    }

    fn mixed_content_bytes(&self, site: &str) -> Result<u64> {
        site_findings_bytes(&self.lock(), site)
    }

    fn mixed_content(&self, site: &str) -> Result<Vec<MixedContentFinding>> {
        let conn = self.lock();
        let mut statement = conn.prepare(
            "SELECT page, resource, directive, reports, first_seen, last_seen FROM mixed_content
             WHERE site = ?1 ORDER BY last_seen DESC, page, resource",
        )?;
        let rows = statement
            .query_map([site], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, String>(2)?,
                    row.get::<_, i64>(3)?,
                    row.get::<_, i64>(4)?,
                    row.get::<_, i64>(5)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter()
            .map(|(page, resource, directive, reports, first, last)| {
                Ok(MixedContentFinding {
                    page,
                    resource,
                    directive,
                    reports: u64::try_from(reports).unwrap_or(0),
                    first_seen: from_ts(first)?,
                    last_seen: from_ts(last)?,
                })
            })
            .collect()
    }
}
