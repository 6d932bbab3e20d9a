//! Site history (events), the metrics counts and mixed-content findings, in PostgreSQL.

use time::OffsetDateTime;

use super::PostgresStore;
use super::queries::{count, insert_event, site_findings_bytes, sql_limit};
use super::statements::Prepared as _;
use crate::error::Result;
use crate::store::rows::{enum_from, from_ts, ts};
use crate::store::{
    Event, FindingWeight, HistoryStore, HttpsMode, MixedContentFinding, Recorded, SiteEventKind,
    StoreCounts, counts_from_tallies, finding_bytes, findings_to_evict,
};

impl HistoryStore for PostgresStore {
    fn add_event(
        &self,
        site: &str,
        at: OffsetDateTime,
        kind: SiteEventKind,
        message: &str,
        problem_type: Option<&str>,
        reason: Option<&str>,
    ) -> Result<()> {
        let (site, message) = (site.to_owned(), message.to_owned());
        let (problem_type, reason) = (problem_type.map(str::to_owned), reason.map(str::to_owned));
        self.connections.run(move |client| {
            insert_event(
                client,
                &site,
                at,
                &kind,
                &message,
                problem_type.as_deref(),
                reason.as_deref(),
            )
        })
    }

    fn events(&self, site: &str, limit: usize) -> Result<Vec<Event>> {
        let site = site.to_owned();
        self.connections.run(move |client| {
            client
                .query_p(
                    "SELECT id, site, at, kind, message, problem_type, reason FROM events
                     WHERE site = $1 ORDER BY id DESC LIMIT $2",
                    &[&site, &sql_limit(limit)],
                )?
                .iter()
                .map(|row| {
                    Ok(Event {
                        id: row.try_get(0)?,
                        site: row.try_get(1)?,
                        at: from_ts(row.try_get(2)?)?,
                        kind: SiteEventKind::from(row.try_get::<_, String>(3)?),
                        message: row.try_get(4)?,
                        problem_type: row.try_get(5)?,
                        reason: row.try_get(6)?,
                    })
                })
                .collect()
        })
    }

    fn counts(&self) -> Result<StoreCounts> {
        self.connections.run(|client| {
            let events = client
                .query_p(
                    "SELECT kind, reason, COUNT(*) FROM events GROUP BY kind, reason",
                    &[],
                )?
                .iter()
                .map(|row| {
                    Ok((
                        SiteEventKind::from(row.try_get::<_, String>(0)?),
                        row.try_get(1)?,
                        count(row.try_get(2)?),
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
            let modes = client
                .query_p(
                    "SELECT https_mode, COUNT(*) FROM sites GROUP BY https_mode",
                    &[],
                )?
                .iter()
                .map(|row| {
                    Ok((
                        enum_from::<HttpsMode>(row.try_get(0)?)?,
                        count(row.try_get(1)?),
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
            let orders_in_flight: i64 = client
                .query_one_p("SELECT COUNT(*) FROM orders", &[])?
                .try_get(0)?;
            Ok(counts_from_tallies(events, modes, count(orders_in_flight)))
        })
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
        let (site, page, resource, directive) = (
            site.to_owned(),
            page.to_owned(),
            resource.to_owned(),
            directive.to_owned(),
        );
        self.connections.run(move |client| {
            let mut tx = client.transaction()?;
            let updated = tx.execute_p(
                "UPDATE mixed_content SET reports = reports + 1, last_seen = $4, directive = $5, bytes = $6
                 WHERE site = $1 AND page = $2 AND resource = $3",
                &[&site, &page, &resource, &ts(at), &directive, &stored_bytes],
            )?;
            if updated > 0 {
                tx.commit()?;
                return Ok(Recorded::Counted);
            }
            let mut evicted = 0;
            if site_findings_bytes(&mut tx, &site)?.saturating_add(bytes) > budget_bytes {
                let findings = tx
                    .query_p(
                        "SELECT page, resource, reports, last_seen, bytes FROM mixed_content
                         WHERE site = $1 FOR UPDATE",
                        &[&site],
                    )?
                    .iter()
                    .map(|row| {
                        Ok(FindingWeight {
                            key: (row.try_get::<_, String>(0)?, row.try_get::<_, String>(1)?),
                            reports: count(row.try_get(2)?),
                            last_seen: row.try_get(3)?,
                            bytes: count(row.try_get(4)?),
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                for (old_page, old_resource) in findings_to_evict(findings, bytes, budget_bytes) {
                    tx.execute_p(
                        "DELETE FROM mixed_content WHERE site = $1 AND page = $2 AND resource = $3",
                        &[&site, &old_page, &old_resource],
                    )?;
                    evicted += 1;
                }
            }
            // Another node may have added the same pair meanwhile: then it is counted.
            tx.execute_p(
                "INSERT INTO mixed_content (site, page, resource, directive, reports, first_seen, last_seen, bytes)
                 VALUES ($1, $2, $3, $4, 1, $5, $5, $6)
                 ON CONFLICT (site, page, resource)
                 DO UPDATE SET reports = mixed_content.reports + 1, last_seen = excluded.last_seen",
                &[&site, &page, &resource, &directive, &ts(at), &stored_bytes],
            )?;
            tx.commit()?;
            Ok(Recorded::Added { evicted })
        })
    }

    fn mixed_content_bytes(&self, site: &str) -> Result<u64> {
        let site = site.to_owned();
        self.connections
            .run(move |client| site_findings_bytes(client, &site))
    }

    fn mixed_content(&self, site: &str) -> Result<Vec<MixedContentFinding>> {
        let site = site.to_owned();
        self.connections.run(move |client| {
            client
                .query_p(
                    "SELECT page, resource, directive, reports, first_seen, last_seen FROM mixed_content
                     WHERE site = $1 ORDER BY last_seen DESC, page, resource",
                    &[&site],
                )?
                .iter()
                .map(|row| {
                    Ok(MixedContentFinding {
                        page: row.try_get(0)?,
                        resource: row.try_get(1)?,
                        directive: row.try_get(2)?,
                        reports: count(row.try_get(3)?),
                        first_seen: from_ts(row.try_get(4)?)?,
                        last_seen: from_ts(row.try_get(5)?)?,
                    })
                })
                .collect()
        })
    }
}
