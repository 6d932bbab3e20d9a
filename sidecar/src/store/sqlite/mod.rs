//! The embedded store: one SQLite file in WAL mode, owner-only, migrated on open.

mod acme;
mod certificates;
#[cfg(test)]
mod change_log_tests;
mod changes;
mod history;
mod issuance;
mod orders;
mod queries;
mod schema;
mod sites;
#[cfg(test)]
mod tests;

pub(super) use schema::MIGRATIONS;

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{Connection, params};
use time::OffsetDateTime;
use tokio::sync::watch;

use super::{LOCAL_NODE, SITE_CHANGES_KEEP_ROWS, SITE_CHANGES_KEEP_SECS, Store, change_log_cutoff};
use crate::error::{Error, Result};

/// The change log is compacted after this many change notifications (and when the store opens).
const COMPACT_EVERY_CHANGES: u64 = 4096;

/// How long a statement waits for another connection's lock before failing "database is locked".
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The SQLite implementation of [`Store`].
#[derive(Debug)]
pub struct SqliteStore {
    connection: Mutex<Connection>,
    node_id: String,
    certificates_changed: watch::Sender<u64>,
    sites_changed: watch::Sender<u64>,
    /// Change notifications since the change log was last compacted.
    changes_since_compaction: AtomicU64,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`: directory 0700, file 0600, WAL,
    /// foreign keys on, migrations applied.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            create_private_dir(dir)?;
        }
        // Create the file owner-only before SQLite opens it; SQLite gives its -wal and -shm
        // files the same permissions as the database file.
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| Error::io("create database file", path, source))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|source| Error::io("restrict database file", path, source))?;
        let connection = Connection::open(path)?;
        Self::from_connection(connection, LOCAL_NODE)
    }

    /// Opens the database at `path` as node `node_id`: for tests that play two nodes on one
    /// file (in production one process owns the file, as [`LOCAL_NODE`]).
    pub fn open_as_node(path: &Path, node_id: &str) -> Result<Self> {
        let store = Self::open(path)?;
        Ok(Self {
            node_id: node_id.to_owned(),
            ..store
        })
    }

    /// An in-memory store, for unit tests.
    pub fn in_memory() -> Result<Self> {
        Self::from_connection(Connection::open_in_memory()?, LOCAL_NODE)
    }

    /// The schema version the database at `path` is at (`PRAGMA user_version`).
    pub fn schema_version(&self) -> Result<usize> {
        Ok(self
            .lock()
            .pragma_query_value(None, "user_version", |row| row.get(0))?)
    }

    fn from_connection(mut connection: Connection, node_id: &str) -> Result<Self> {
        connection.busy_timeout(BUSY_TIMEOUT)?;
        connection.pragma_update(None, "journal_mode", "WAL")?;
        connection.pragma_update(None, "synchronous", "NORMAL")?;
        connection.pragma_update(None, "foreign_keys", "ON")?;
        let applied: usize =
            connection.pragma_query_value(None, "user_version", |row| row.get(0))?;
        if applied > MIGRATIONS.len() {
            return Err(Error::CorruptStore(format!(
                "the database has schema version {applied} but this build knows {}; upgrade autohttps",
                MIGRATIONS.len()
            )));
        }
        let tx = connection.transaction()?;
        for migration in &MIGRATIONS[applied..] {
            tx.execute_batch(migration)?;
        }
        tx.pragma_update(None, "user_version", MIGRATIONS.len())?;
        tx.commit()?;
        let store = Self {
            connection: Mutex::new(connection),
            node_id: node_id.to_owned(),
            certificates_changed: watch::Sender::new(0),
            sites_changed: watch::Sender::new(0),
            changes_since_compaction: AtomicU64::new(0),
        };
        store.compact_site_changes(
            SITE_CHANGES_KEEP_ROWS,
            SITE_CHANGES_KEEP_SECS,
            OffsetDateTime::now_utc(),
        )?;
        Ok(store)
    }

    /// Deletes change-log rows that are both older than the newest `keep_rows` and older than
    /// `keep_secs` before `now`; returns how many. A reader whose position was deleted is told
    /// `complete: false` by [`ChangeLog::site_changes_since`] and reloads everything.
    pub fn compact_site_changes(
        &self,
        keep_rows: u64,
        keep_secs: i64,
        now: OffsetDateTime,
    ) -> Result<usize> {
        let conn = self.lock();
        let latest: i64 = conn.query_row(
            "SELECT COALESCE(MAX(seq), 0) FROM site_changes",
            [],
            |row| row.get(0),
        )?;
        let latest = u64::try_from(latest).unwrap_or(0);
        let Some((last_deleted, before)) = change_log_cutoff(latest, keep_rows, keep_secs, now)
        else {
            return Ok(0);
        };
        Ok(conn.execute(
            "DELETE FROM site_changes WHERE seq <= ?1 AND at < ?2",
            params![i64::try_from(last_deleted).unwrap_or(i64::MAX), before],
        )?)
    }

    /// Counts a change notification and compacts the change log every
    /// [`COMPACT_EVERY_CHANGES`] of them (a failed compaction is logged and retried later).
    fn count_change(&self) {
        let seen = self
            .changes_since_compaction
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        if seen.is_multiple_of(COMPACT_EVERY_CHANGES)
            && let Err(error) = self.compact_site_changes(
                SITE_CHANGES_KEEP_ROWS,
                SITE_CHANGES_KEEP_SECS,
                OffsetDateTime::now_utc(),
            )
        {
            tracing::warn!(%error, "compacting the store's change log failed; it is retried after more changes");
        }
    }

    /// Every row of `table` (its `columns`, in order), for copying the store elsewhere.
    pub(super) fn read_table(
        &self,
        table: &str,
        columns: &[&str],
    ) -> Result<Vec<Vec<rusqlite::types::Value>>> {
        let conn = self.lock();
        let mut statement = conn.prepare(&format!(
            "SELECT {} FROM {table} ORDER BY rowid",
            columns.join(", ")
        ))?;
        let rows = statement
            .query_map([], |row| {
                (0..columns.len())
                    .map(|index| row.get::<_, rusqlite::types::Value>(index))
                    .collect::<rusqlite::Result<Vec<_>>>()
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        self.connection
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn bump_sites(&self) {
        self.count_change();
        self.sites_changed
            .send_modify(|generation| *generation += 1);
    }

    fn bump_certificates(&self) {
        self.count_change();
        self.certificates_changed
            .send_modify(|generation| *generation += 1);
    }
}

/// Creates `dir` (and parents) owner-only.
pub fn create_private_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| Error::io("create data directory", dir, source))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|source| Error::io("restrict data directory", dir, source))
}

impl Store for SqliteStore {
    fn check_writable(&self, patience: std::time::Duration) -> Result<()> {
        let conn = self.lock();
        conn.busy_timeout(patience)?;
        let probe = conn.execute_batch("BEGIN IMMEDIATE; ROLLBACK;");
        conn.busy_timeout(BUSY_TIMEOUT)?;
        Ok(probe?)
    }
}
