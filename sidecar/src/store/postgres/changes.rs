//! The change log and the change signals, in PostgreSQL.

use tokio::sync::watch;

use super::PostgresStore;
use super::queries::{count, sql_limit};
use super::statements::Prepared as _;
use crate::error::Result;
use crate::store::{ChangeLog, SiteChanges, fold_site_changes, unknowable_changes};

impl ChangeLog for PostgresStore {
    fn latest_change_seq(&self) -> Result<u64> {
        self.connections.run(|client| {
            let latest: i64 = client
                .query_one_p(
                    "SELECT COALESCE(MAX(seq), 0)::BIGINT FROM site_changes",
                    &[],
                )?
                .try_get(0)?;
            Ok(count(latest))
        })
    }

    fn site_changes_since(&self, after: u64, limit: usize) -> Result<SiteChanges> {
        self.connections.run(move |client| {
            // One statement, so one snapshot for the bounds and the rows (a compaction
            // committed between two reads would delete rows after the oldest one read, and the
            // batch would claim to be complete), in one round trip: every node runs this after
            // every change.
            let rows = client.query_p(
                "SELECT bounds.oldest, bounds.latest, batch.seq, batch.site
                 FROM (SELECT MIN(seq) AS oldest, MAX(seq) AS latest FROM site_changes) AS bounds
                 LEFT JOIN LATERAL (
                     SELECT seq, site FROM site_changes WHERE seq > $1 ORDER BY seq LIMIT $2
                 ) AS batch ON true
                 ORDER BY batch.seq",
                &[&i64::try_from(after).unwrap_or(i64::MAX), &sql_limit(limit)],
            )?;
            let (oldest, latest) = match rows.first() {
                Some(row) => (
                    row.try_get::<_, Option<i64>>(0)?,
                    row.try_get::<_, Option<i64>>(1)?,
                ),
                None => (None, None),
            };
            if let Some(reload) =
                unknowable_changes(after, oldest.map(count), latest.map_or(0, count))
            {
                return Ok(reload);
            }
            let mut changes = Vec::with_capacity(rows.len());
            for row in &rows {
                if let Some(seq) = row.try_get::<_, Option<i64>>(2)? {
                    changes.push((count(seq), row.try_get::<_, String>(3)?));
                }
            }
            Ok(fold_site_changes(after, changes))
        })
    }

    fn certificates_changed(&self) -> watch::Receiver<u64> {
        self.connections.shared.certificates_changed.subscribe()
    }

    fn sites_changed(&self) -> watch::Receiver<u64> {
        self.connections.shared.sites_changed.subscribe()
    }
}
