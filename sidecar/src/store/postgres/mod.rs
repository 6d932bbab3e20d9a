//! The shared store of a fleet: PostgreSQL, one database for every edge node's sidecar.
//!
//! Same rows and rules as the SQLite store ([`super::rows`], [`super::supersedes`]); what a
//! fleet adds is done by the database: the issuance lease is one conditional `UPDATE` (two
//! nodes can never both hold it), the ACME account is saved once (a unique key, the winner read
//! back), the change log is written at commit by triggers that also `NOTIFY` every node.

mod acme;
mod certificates;
mod changes;
mod connections;
mod history;
mod import;
mod issuance;
mod listen;
mod orders;
mod queries;
mod schema;
mod sites;
mod statements;

pub use import::{CopyReport, copy_store};

use self::statements::Prepared as _;
use std::sync::Arc;
use std::time::Duration;

use postgres::Client;
use time::OffsetDateTime;

use self::connections::{Connections, Shared};
use self::queries::count;
use super::Store;
use super::change_log_cutoff;
use crate::error::{Error, Result};

#[cfg(test)]
pub(super) use schema::MIGRATIONS;

/// How long connecting may take before the store is reported unavailable (unless the URL sets
/// `connect_timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How to reach the database and who this node is.
#[derive(Clone)]
pub struct PostgresStoreOptions {
    /// `postgres://user:password@host:port/dbname` (or the `key=value` form).
    pub url: String,
    /// This node's name in leases (`leased_by`): unique in the fleet, stable across restarts.
    pub node_id: String,
    /// Connections (and threads) for store calls.
    pub connections: usize,
    /// How often the change listener also polls the change log, in case a notification was lost.
    pub reconcile_every: Duration,
}

impl std::fmt::Debug for PostgresStoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStoreOptions")
            .field("url", &"<redacted>")
            .field("node_id", &self.node_id)
            .field("connections", &self.connections)
            .field("reconcile_every", &self.reconcile_every)
            .finish()
    }
}

impl PostgresStoreOptions {
    /// Options for `url` as node `node_id`: 4 connections, reconciliation every 5 s.
    pub fn new(url: impl Into<String>, node_id: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            node_id: node_id.into(),
            connections: 4,
            reconcile_every: Duration::from_secs(5),
        }
    }
}

/// The PostgreSQL implementation of [`Store`].
#[derive(Debug)]
pub struct PostgresStore {
    connections: Connections,
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        connections::stop(&self.connections.shared);
    }
}

impl PostgresStore {
    /// A store on the database at `options.url`. Nothing is connected yet: connections (and
    /// the schema migration) happen on first use and again whenever the database returns, so a
    /// node can start while the database is down; calls answer [`Error::StoreUnavailable`]
    /// meanwhile. Fails only when the URL cannot be understood.
    pub fn new(options: PostgresStoreOptions) -> Result<Self> {
        let mut config: postgres::Config = options.url.parse().map_err(|error| {
            Error::Config(format!(
                "store.url is not a PostgreSQL connection URL ({error}); write it as \
                 postgres://USER:PASSWORD@HOST:PORT/DATABASE"
            ))
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        config.application_name(&format!("autohttps {}", options.node_id));
        let shared = Arc::new(Shared::new(config, options.node_id));
        let connections = Connections::start(Arc::clone(&shared), options.connections)?;
        listen::start(shared, options.reconcile_every).map_err(|error| {
            Error::Internal(format!(
                "cannot start the PostgreSQL change listener thread: {error}"
            ))
        })?;
        Ok(Self { connections })
    }

    /// Connects and migrates now: `Ok` once the database answers with the current schema.
    pub fn ping(&self) -> Result<()> {
        self.connections
            .run(|client| client.batch_execute("SELECT 1").map_err(Error::from))
    }

    /// The schema version the database is at.
    pub fn schema_version(&self) -> Result<usize> {
        self.connections.run(|client| {
            let version: i64 = client
                .query_one_p("SELECT version FROM autohttps_schema", &[])?
                .try_get(0)?;
            Ok(usize::try_from(version).unwrap_or(0))
        })
    }

    fn node_id(&self) -> String {
        self.connections.shared.node_id.clone()
    }

    /// Deletes change-log rows that are both older than the newest `keep_rows` and older than
    /// `keep_secs` before `now`; returns how many (0 when another node is compacting right
    /// now). Every node's change listener runs this now and then; a reader whose position was
    /// deleted is told `complete: false` by [`ChangeLog::site_changes_since`] and reloads.
    pub fn compact_site_changes(
        &self,
        keep_rows: u64,
        keep_secs: i64,
        now: OffsetDateTime,
    ) -> Result<usize> {
        self.connections
            .run(move |client| compact_site_changes(client, keep_rows, keep_secs, now))
    }

    fn bump_sites(&self) {
        self.connections.shared.bump_sites();
    }

    fn bump_certificates(&self) {
        self.connections.shared.bump_certificates();
    }
}

/// Compacts the change log (see [`PostgresStore::compact_site_changes`]). Nodes compacting at
/// once do not queue up behind each other's row locks: one takes the compaction lock, the
/// others skip (the work is the same). Readers are safe either way: they read the oldest kept
/// row and the rows after their position in one snapshot.
pub(super) fn compact_site_changes(
    client: &mut Client,
    keep_rows: u64,
    keep_secs: i64,
    now: OffsetDateTime,
) -> Result<usize> {
    let mut tx = client.transaction()?;
    let ours: bool = tx
        .query_one_p(
            "SELECT pg_try_advisory_xact_lock($1)",
            &[&schema::COMPACTION_LOCK],
        )?
        .try_get(0)?;
    if !ours {
        return Ok(0);
    }
    let latest: i64 = tx
        .query_one_p(
            "SELECT COALESCE(MAX(seq), 0)::BIGINT FROM site_changes",
            &[],
        )?
        .try_get(0)?;
    let Some((last_deleted, before)) = change_log_cutoff(count(latest), keep_rows, keep_secs, now)
    else {
        return Ok(0);
    };
    let deleted = tx.execute_p(
        "DELETE FROM site_changes WHERE seq <= $1 AND at < $2",
        &[&i64::try_from(last_deleted).unwrap_or(i64::MAX), &before],
    )?;
    tx.commit()?;
    Ok(usize::try_from(deleted).unwrap_or(usize::MAX))
}

impl Store for PostgresStore {
    fn check_writable(&self, patience: Duration) -> Result<()> {
        let timeout_ms = patience.as_millis().clamp(1, 3_600_000).to_string();
        self.connections.run(move |client| {
            let mut tx = client.transaction()?;
            tx.execute_p(
                "SELECT set_config('lock_timeout', $1, true)",
                &[&timeout_ms],
            )?;
            let replica: bool = tx
                .query_one_p("SELECT pg_is_in_recovery()", &[])?
                .try_get(0)?;
            if replica {
                return Err(Error::StoreUnavailable(
                    "the server is a read-only standby; point store.url at the primary".into(),
                ));
            }
            tx.execute_p("LOCK TABLE sites IN ROW EXCLUSIVE MODE", &[])?;
            tx.rollback()?;
            Ok(())
        })
    }
}
