//! The change log and the change signals, in PostgreSQL.

use postgres::IsolationLevel;
use tokio::sync::watch;

use super::PostgresStore;
use super::queries::{count, sql_limit};
use crate::error::Result;
use crate::store::{ChangeLog, SiteChanges, fold_site_changes, unknowable_changes};

impl ChangeLog for PostgresStore {
    fn latest_change_seq(&self) -> Result<u64> {
        self.connections.run(|client| {
            let latest: i64 = client
                .query_one(
                    "SELECT COALESCE(MAX(seq), 0)::BIGINT FROM site_changes",
                    &[],
                )?
                .try_get(0)?;
            Ok(count(latest))
        })
    }

    fn site_changes_since(&self, after: u64, limit: usize) -> Result<SiteChanges> {
        self.connections.run(move |client| {
            // One snapshot for both reads: a compaction committed between them would otherwise
            // delete rows after the oldest one read, and the batch would claim to be complete.
            let mut tx = client
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()?;
            let bounds = tx.query_one(
                "SELECT (SELECT MIN(seq) FROM site_changes), (SELECT MAX(seq) FROM site_changes)",
                &[],
            )?;
            let oldest: Option<i64> = bounds.try_get(0)?;
            let latest: Option<i64> = bounds.try_get(1)?;
            if let Some(reload) =
                unknowable_changes(after, oldest.map(count), latest.map_or(0, count))
            {
                return Ok(reload);
            }
            let rows = tx.query(
                "SELECT seq, site FROM site_changes WHERE seq > $1 ORDER BY seq LIMIT $2",
                &[&i64::try_from(after).unwrap_or(i64::MAX), &sql_limit(limit)],
            )?;
            let rows = rows
                .iter()
                .map(|row| Ok((count(row.try_get(0)?), row.try_get(1)?)))
                .collect::<Result<Vec<(u64, String)>>>()?;
            tx.commit()?;
            Ok(fold_site_changes(after, rows))
        })
    }

    fn certificates_changed(&self) -> watch::Receiver<u64> {
        self.connections.shared.certificates_changed.subscribe()
    }

    fn sites_changed(&self) -> watch::Receiver<u64> {
        self.connections.shared.sites_changed.subscribe()
    }
}
