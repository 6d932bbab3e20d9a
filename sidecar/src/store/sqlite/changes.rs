//! The change log and the change signals, in SQLite.

use rusqlite::params;
use tokio::sync::watch;

use super::SqliteStore;
use crate::error::Result;
use crate::store::{ChangeLog, SiteChanges, fold_site_changes, unknowable_changes};

impl ChangeLog for SqliteStore {
    fn latest_change_seq(&self) -> Result<u64> {
        let latest: i64 = self.lock().query_row(
            "SELECT COALESCE(MAX(seq), 0) FROM site_changes",
            [],
            |row| row.get(0),
        )?;
        Ok(u64::try_from(latest).unwrap_or(0))
    }

    fn site_changes_since(&self, after: u64, limit: usize) -> Result<SiteChanges> {
        let conn = self.lock();
        // Two subqueries: SQLite answers a lone MIN or MAX from the key, both in one SELECT by
        // scanning the whole log.
        let (oldest, latest): (Option<i64>, Option<i64>) = conn.query_row(
            "SELECT (SELECT MIN(seq) FROM site_changes), (SELECT MAX(seq) FROM site_changes)",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )?;
        let as_seq = |seq: i64| u64::try_from(seq).unwrap_or(0);
        if let Some(reload) =
            unknowable_changes(after, oldest.map(as_seq), latest.map_or(0, as_seq))
        {
            return Ok(reload);
        }
        let mut statement = conn
            .prepare("SELECT seq, site FROM site_changes WHERE seq > ?1 ORDER BY seq LIMIT ?2")?;
        let rows = statement
            .query_map(
                params![
                    i64::try_from(after).unwrap_or(i64::MAX),
                    i64::try_from(limit).unwrap_or(i64::MAX)
                ],
                |row| Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?)),
            )?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(fold_site_changes(
            after,
            rows.into_iter().map(|(seq, site)| (as_seq(seq), site)),
        ))
    }

    fn certificates_changed(&self) -> watch::Receiver<u64> {
        self.certificates_changed.subscribe()
    }

    fn sites_changed(&self) -> watch::Receiver<u64> {
        self.sites_changed.subscribe()
    }
}
