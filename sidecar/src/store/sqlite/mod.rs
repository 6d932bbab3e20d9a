//! The embedded store: one SQLite file in WAL mode, owner-only, migrated on open.

#[cfg(test)]
mod change_log_tests;
mod queries;
mod schema;
#[cfg(test)]
mod tests;

use queries::{
    insert_event, insert_hostname, load_all_sites, load_site, next_attempt_of, query_certificates,
    require_site, site_findings_bytes,
};
pub(super) use schema::MIGRATIONS;

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, params};
use time::OffsetDateTime;
use tokio::sync::watch;

use super::rows::{
    CERT_COLUMNS, COVERAGE_COLUMNS, RawCertificate, enum_from, enum_text, from_ts, names_from_json,
    names_json, ts,
};
use super::rules::INTERRUPTED_MESSAGE;
use super::{
    AttemptLease, CHALLENGE_LIFETIME, LOCAL_NODE, SiteChanges, fold_site_changes, supersedes,
    unknowable_changes,
};
use super::{
    CertificateCoverage, Event, HostnameKind, HttpsMode, MixedContentFinding, NewCertificate,
    NewSite, OrderInFlight, PrivateKeyPem, Recorded, Site, SitePolicy, Store, StoreCounts,
    StoredCertificate, finding_bytes,
};
use super::{
    FindingWeight, SiteEventKind, counts_from_tallies, findings_to_evict, next_attempt_after,
    still_the_lease,
};
use super::{SITE_CHANGES_KEEP_ROWS, SITE_CHANGES_KEEP_SECS, change_log_cutoff};
use crate::error::{Error, Result};
use crate::hostname::Hostname;
use autohttps_filter::policy::wildcard_name;

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
    /// `complete: false` by [`Store::site_changes_since`] and reloads everything.
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
    fn create_site(
        &self,
        site: NewSite,
        now: OffsetDateTime,
        issue_at: OffsetDateTime,
    ) -> Result<Site> {
        super::validate_site_name(&site.name)?;
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let exists: bool = tx.query_row(
            "SELECT EXISTS(SELECT 1 FROM sites WHERE name = ?1)",
            [&site.name],
            |row| row.get(0),
        )?;
        if exists {
            return Err(Error::Conflict(format!(
                "a site named {:?} already exists; pick another name or change that site",
                site.name
            )));
        }
        tx.execute(
            "INSERT INTO sites (name, primary_hostname, https_mode, redirect, hsts_enabled, hsts_max_age,
                                mixed_content, created_at, next_attempt_at, failures,
                                hsts_include_subdomains, hsts_preload, canonical_host)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 0, ?10, ?11, ?12)",
            params![
                site.name,
                site.primary.as_str(),
                enum_text(&site.policy.https),
                enum_text(&site.policy.redirect),
                site.policy.hsts.enabled,
                i64::try_from(site.policy.hsts.max_age).unwrap_or(i64::MAX),
                enum_text(&site.policy.mixed_content),
                ts(now),
                ts(issue_at),
                site.policy.hsts.include_subdomains,
                site.policy.hsts.preload,
                site.policy.canonical_host.as_ref().map(Hostname::as_str),
            ],
        )?;
        insert_hostname(&tx, &site.name, &site.primary, HostnameKind::Primary, now)?;
        for name in &site.hostnames {
            if name == &site.primary {
                continue;
            }
            insert_hostname(
                &tx,
                &site.name,
                name,
                HostnameKind::of(name, &site.primary),
                now,
            )?;
        }
        insert_event(
            &tx,
            &site.name,
            now,
            &SiteEventKind::SiteCreated,
            &format!(
                "site created with {} hostname(s)",
                1 + site
                    .hostnames
                    .iter()
                    .filter(|n| *n != &site.primary)
                    .count()
            ),
            None,
            None,
        )?;
        tx.commit()?;
        let created = require_site(&conn, &site.name)?;
        drop(conn);
        self.bump_sites();
        Ok(created)
    }

    fn list_sites(&self) -> Result<Vec<Site>> {
        load_all_sites(&self.lock())
    }

    fn site(&self, name: &str) -> Result<Option<Site>> {
        load_site(&self.lock(), name)
    }

    fn delete_site(&self, name: &str) -> Result<()> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let deleted = tx.execute("DELETE FROM sites WHERE name = ?1", [name])?;
        if deleted == 0 {
            return Err(Error::NotFound(format!(
                "no site named {name:?}; list sites with `autohttps site list`"
            )));
        }
        tx.execute("DELETE FROM events WHERE site = ?1", [name])?;
        tx.execute("DELETE FROM mixed_content WHERE site = ?1", [name])?;
        tx.commit()?;
        drop(conn);
        self.bump_sites();
        self.bump_certificates();
        Ok(())
    }

    fn set_policy(&self, name: &str, policy: SitePolicy) -> Result<Site> {
        let conn = self.lock();
        let changed = conn.execute(
            "UPDATE sites SET https_mode = ?2, redirect = ?3, hsts_enabled = ?4, hsts_max_age = ?5, mixed_content = ?6,
                              hsts_include_subdomains = ?7, hsts_preload = ?8, canonical_host = ?9
             WHERE name = ?1",
            params![
                name,
                enum_text(&policy.https),
                enum_text(&policy.redirect),
                policy.hsts.enabled,
                i64::try_from(policy.hsts.max_age).unwrap_or(i64::MAX),
                enum_text(&policy.mixed_content),
                policy.hsts.include_subdomains,
                policy.hsts.preload,
                policy.canonical_host.as_ref().map(Hostname::as_str),
            ],
        )?;
        if changed == 0 {
            return Err(Error::NotFound(format!(
                "no site named {name:?}; list sites with `autohttps site list`"
            )));
        }
        let site = require_site(&conn, name)?;
        drop(conn);
        self.bump_sites();
        Ok(site)
    }

    fn add_hostname(
        &self,
        site: &str,
        name: &Hostname,
        now: OffsetDateTime,
        issue_at: OffsetDateTime,
    ) -> Result<Site> {
        let mut conn = self.lock();
        let primary = require_site(&conn, site)?.primary;
        let tx = conn.transaction()?;
        let kind = HostnameKind::of(name, &primary);
        insert_hostname(&tx, site, name, kind, now)?;
        tx.execute(
            "UPDATE sites SET next_attempt_at = ?2, failures = 0 WHERE name = ?1",
            params![site, ts(issue_at)],
        )?;
        insert_event(
            &tx,
            site,
            now,
            &SiteEventKind::HostnameAdded,
            &format!("{} {name} added", enum_text(&kind)),
            None,
            None,
        )?;
        tx.commit()?;
        let updated = require_site(&conn, site)?;
        drop(conn);
        self.bump_sites();
        Ok(updated)
    }

    fn remove_hostname(
        &self,
        site: &str,
        name: &Hostname,
        now: OffsetDateTime,
        issue_at: OffsetDateTime,
    ) -> Result<Site> {
        let mut conn = self.lock();
        let current = require_site(&conn, site)?;
        if &current.primary == name {
            return Err(Error::InvalidInput(format!(
                "{name} is the primary domain of site {site:?}; it cannot be removed (remove the site instead)"
            )));
        }
        let tx = conn.transaction()?;
        let removed = tx.execute(
            "DELETE FROM hostnames WHERE hostname = ?1 AND site = ?2",
            params![name.as_str(), site],
        )?;
        if removed == 0 {
            return Err(Error::NotFound(format!(
                "{name} is not a hostname of site {site:?}"
            )));
        }
        tx.execute(
            "UPDATE sites SET next_attempt_at = ?2, failures = 0 WHERE name = ?1",
            params![site, ts(issue_at)],
        )?;
        // A canonical host must be one of the site's names: removing it clears it.
        tx.execute(
            "UPDATE sites SET canonical_host = NULL WHERE name = ?1 AND canonical_host = ?2",
            params![site, name.as_str()],
        )?;
        insert_event(
            &tx,
            site,
            now,
            &SiteEventKind::HostnameRemoved,
            &format!("{name} removed"),
            None,
            None,
        )?;
        tx.commit()?;
        let updated = require_site(&conn, site)?;
        drop(conn);
        self.bump_sites();
        self.bump_certificates();
        Ok(updated)
    }

    fn site_of_hostname(&self, name: &Hostname) -> Result<Option<String>> {
        Ok(self
            .lock()
            .query_row(
                "SELECT site FROM hostnames WHERE hostname = ?1",
                [name.as_str()],
                |row| row.get(0),
            )
            .optional()?)
    }

    fn request_issuance(&self, site: &str, at: OffsetDateTime, regenerate: bool) -> Result<()> {
        let changed = self.lock().execute(
            "UPDATE sites SET next_attempt_at = ?2, failures = 0, regenerate = MAX(regenerate, ?3) WHERE name = ?1",
            params![site, ts(at), regenerate],
        )?;
        if changed == 0 {
            return Err(Error::NotFound(format!(
                "no site named {site:?}; list sites with `autohttps site list`"
            )));
        }
        Ok(())
    }

    fn take_regenerate_request(&self, site: &str) -> Result<bool> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let requested: Option<bool> = tx
            .query_row(
                "SELECT regenerate FROM sites WHERE name = ?1",
                [site],
                |row| row.get(0),
            )
            .optional()?;
        tx.execute("UPDATE sites SET regenerate = 0 WHERE name = ?1", [site])?;
        tx.commit()?;
        Ok(requested.unwrap_or(false))
    }

    fn begin_attempt(
        &self,
        site: &str,
        now: OffsetDateTime,
        lease_until: OffsetDateTime,
    ) -> Result<AttemptLease> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let Some(current) = load_site(&tx, site)? else {
            return Ok(AttemptLease::NoSuchSite);
        };
        let taken = tx.execute(
            "UPDATE sites SET next_attempt_at = ?3, leased_by = ?2, leased_until = ?3
             WHERE name = ?1
               AND (leased_by IS NULL OR leased_by = ?2 OR leased_until IS NULL OR leased_until <= ?4)",
            params![site, self.node_id, ts(lease_until), ts(now)],
        )?;
        if taken == 0 {
            let (node, until): (String, i64) = tx.query_row(
                "SELECT leased_by, leased_until FROM sites WHERE name = ?1",
                [site],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )?;
            return Ok(AttemptLease::HeldElsewhere {
                node,
                until: from_ts(until)?,
            });
        }
        tx.commit()?;
        Ok(AttemptLease::Taken(Box::new(current)))
    }

    fn finish_attempt(
        &self,
        site: &str,
        lease_until: OffsetDateTime,
        next: Option<OffsetDateTime>,
        failures: u32,
        last_problem: Option<&str>,
    ) -> Result<()> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let Some(stored) = next_attempt_of(&tx, site)? else {
            return Ok(());
        };
        let next = next_attempt_after(stored, lease_until, next);
        tx.execute(
            "UPDATE sites SET next_attempt_at = ?2, failures = ?3, last_problem = ?4 WHERE name = ?1",
            params![site, next.map(ts), failures, last_problem],
        )?;
        tx.execute(
            "UPDATE sites SET leased_by = NULL, leased_until = NULL WHERE name = ?1 AND leased_by = ?2",
            params![site, self.node_id],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn renew_lease(
        &self,
        site: &str,
        held_until: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<bool> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let renewed = tx.execute(
            "UPDATE sites SET leased_until = ?4 WHERE name = ?1 AND leased_by = ?2 AND leased_until = ?3",
            params![site, self.node_id, ts(held_until), ts(until)],
        )?;
        if renewed == 0 {
            return Ok(false);
        }
        if still_the_lease(next_attempt_of(&tx, site)?.flatten(), held_until) {
            tx.execute(
                "UPDATE sites SET next_attempt_at = ?2 WHERE name = ?1",
                params![site, ts(until)],
            )?;
        }
        tx.commit()?;
        Ok(true)
    }

    fn release_own_leases(&self, now: OffsetDateTime) -> Result<Vec<String>> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let held: Vec<(String, Option<i64>, i64)> = tx
            .prepare(
                "SELECT name, next_attempt_at, leased_until FROM sites
                 WHERE leased_by = ?1 AND leased_until IS NOT NULL ORDER BY name",
            )?
            .query_map([&self.node_id], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        let mut released = Vec::with_capacity(held.len());
        for (name, stored, leased_until) in held {
            let stored = stored.map(from_ts).transpose()?;
            let next = next_attempt_after(stored, from_ts(leased_until)?, Some(now));
            tx.execute(
                "UPDATE sites SET next_attempt_at = ?2, leased_by = NULL, leased_until = NULL
                 WHERE name = ?1",
                params![name, next.map(ts)],
            )?;
            insert_event(
                &tx,
                &name,
                now,
                &SiteEventKind::AttemptInterrupted,
                INTERRUPTED_MESSAGE,
                None,
                None,
            )?;
            released.push(name);
        }
        tx.commit()?;
        Ok(released)
    }

    fn schedule(
        &self,
        site: &str,
        next_attempt_at: Option<OffsetDateTime>,
        failures: u32,
        last_problem: Option<&str>,
    ) -> Result<()> {
        self.lock().execute(
            "UPDATE sites SET next_attempt_at = ?2, failures = ?3, last_problem = ?4 WHERE name = ?1",
            params![site, next_attempt_at.map(ts), failures, last_problem],
        )?;
        Ok(())
    }

    fn due_sites(&self, now: OffsetDateTime) -> Result<Vec<String>> {
        Ok(self
            .lock()
            .prepare(
                "SELECT name FROM sites WHERE next_attempt_at <= ?1
                   AND (leased_by IS NULL OR leased_by = ?2 OR leased_until <= ?1)
                 ORDER BY next_attempt_at",
            )?
            .query_map(params![ts(now), self.node_id], |row| row.get(0))?
            .collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn next_due(&self) -> Result<Option<OffsetDateTime>> {
        let next: Option<i64> = self.lock().query_row(
            "SELECT MIN(CASE WHEN leased_by <> ?1 AND leased_until > next_attempt_at
                             THEN leased_until ELSE next_attempt_at END)
             FROM sites",
            [&self.node_id],
            |row| row.get(0),
        )?;
        next.map(from_ts).transpose()
    }

    fn current_certificates(&self, site: &str) -> Result<Vec<StoredCertificate>> {
        query_certificates(&self.lock(), "AND site = ?1", site)
    }

    fn certificate_for_hostname(&self, name: &Hostname) -> Result<Option<StoredCertificate>> {
        let conn = self.lock();
        let wildcard = wildcard_name(name.as_str()).unwrap_or_default();
        let row = conn
            .query_row(
                &format!(
                    "SELECT {} FROM certificates c
                     JOIN certificate_names n ON n.certificate_id = c.id
                     JOIN hostnames h ON h.hostname = n.hostname AND h.site = c.site
                     WHERE c.superseded_at IS NULL AND n.hostname IN (?1, ?2)
                     ORDER BY c.not_after DESC, c.id DESC LIMIT 1",
                    CERT_COLUMNS
                        .split(", ")
                        .map(|column| format!("c.{column}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                params![name.as_str(), wildcard],
                RawCertificate::from_row,
            )
            .optional()?;
        row.map(RawCertificate::decode).transpose()
    }

    fn store_certificate(
        &self,
        certificate: NewCertificate,
        completes_order: Option<i64>,
        now: OffsetDateTime,
    ) -> Result<StoredCertificate> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO certificates (site, names, chain_pem, key_pem, not_before, not_after, serial, ari_id, issued_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                certificate.site,
                names_json(&certificate.names),
                certificate.chain_pem,
                certificate.key_pem.expose(),
                ts(certificate.not_before),
                ts(certificate.not_after),
                certificate.serial,
                certificate.ari_id,
                ts(now),
            ],
        )?;
        let id = tx.last_insert_rowid();
        for name in &certificate.names {
            tx.execute(
                "INSERT OR IGNORE INTO certificate_names (certificate_id, hostname) VALUES (?1, ?2)",
                params![id, name.as_str()],
            )?;
        }
        // Supersede older certificates of the site whose names that are still wanted are all
        // covered by the new one. Anything else keeps serving (never worse).
        let wanted: std::collections::HashSet<String> = tx
            .prepare("SELECT hostname FROM hostnames WHERE site = ?1")?
            .query_map([&certificate.site], |row| row.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        let older: Vec<(i64, String)> = tx
            .prepare("SELECT id, names FROM certificates WHERE site = ?1 AND superseded_at IS NULL AND id != ?2")?
            .query_map(params![certificate.site, id], |row| Ok((row.get(0)?, row.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        for (old_id, old_names) in older {
            let old_names = names_from_json(&old_names)?;
            if supersedes(&certificate.names, &old_names, &wanted) {
                tx.execute(
                    "UPDATE certificates SET superseded_at = ?2 WHERE id = ?1",
                    params![old_id, ts(now)],
                )?;
            }
        }
        if let Some(order) = completes_order {
            tx.execute("DELETE FROM orders WHERE id = ?1", [order])?;
        }
        insert_event(
            &tx,
            &certificate.site,
            now,
            &SiteEventKind::CertificateIssued,
            &format!(
                "certificate {} for {} valid until {}",
                certificate.serial,
                certificate
                    .names
                    .iter()
                    .map(Hostname::as_str)
                    .collect::<Vec<_>>()
                    .join(", "),
                crate::clock::human_time(certificate.not_after)
            ),
            None,
            None,
        )?;
        let stored = tx
            .query_row(
                &format!("SELECT {CERT_COLUMNS} FROM certificates WHERE id = ?1"),
                [id],
                RawCertificate::from_row,
            )?
            .decode()?;
        tx.commit()?;
        drop(conn);
        self.bump_certificates();
        Ok(stored)
    }

    fn insert_order(
        &self,
        site: &str,
        names: &[Hostname],
        order_url: &str,
        key: &PrivateKeyPem,
        now: OffsetDateTime,
    ) -> Result<i64> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO orders (site, names, order_url, key_pem, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![site, names_json(names), order_url, key.expose(), ts(now)],
        )?;
        let id = tx.last_insert_rowid();
        insert_event(
            &tx,
            site,
            now,
            &SiteEventKind::OrderCreated,
            &format!(
                "ordered a certificate for {} ({order_url})",
                names
                    .iter()
                    .map(Hostname::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            None,
            None,
        )?;
        tx.commit()?;
        Ok(id)
    }

    fn orders_in_flight(&self, site: Option<&str>) -> Result<Vec<OrderInFlight>> {
        let conn = self.lock();
        let mut statement = conn.prepare(
            "SELECT id, site, names, order_url, key_pem, created_at FROM orders
             WHERE ?1 IS NULL OR site = ?1 ORDER BY id",
        )?;
        let rows = statement
            .query_map([site], |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, String>(2)?,
                    row.get::<_, String>(3)?,
                    row.get::<_, String>(4)?,
                    row.get::<_, i64>(5)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter()
            .map(|(id, site, names, order_url, key, created)| {
                Ok(OrderInFlight {
                    id,
                    site,
                    names: names_from_json(&names)?,
                    order_url,
                    key_pem: PrivateKeyPem::new(key),
                    created_at: from_ts(created)?,
                })
            })
            .collect()
    }

    fn delete_order(&self, id: i64) -> Result<()> {
        self.lock()
            .execute("DELETE FROM orders WHERE id = ?1", [id])?;
        Ok(())
    }

    fn account(&self, directory_url: &str) -> Result<Option<String>> {
        Ok(self
            .lock()
            .query_row(
                "SELECT credentials FROM accounts WHERE directory_url = ?1",
                [directory_url],
                |row| row.get(0),
            )
            .optional()?)
    }

    fn save_account(
        &self,
        directory_url: &str,
        credentials_json: &str,
        now: OffsetDateTime,
    ) -> Result<String> {
        let conn = self.lock();
        conn.execute(
            "INSERT INTO accounts (directory_url, credentials, created_at) VALUES (?1, ?2, ?3)
             ON CONFLICT(directory_url) DO NOTHING",
            params![directory_url, credentials_json, ts(now)],
        )?;
        Ok(conn.query_row(
            "SELECT credentials FROM accounts WHERE directory_url = ?1",
            [directory_url],
            |row| row.get(0),
        )?)
    }

    fn put_challenge(
        &self,
        token: &str,
        key_authorization: &str,
        now: OffsetDateTime,
    ) -> Result<()> {
        let conn = self.lock();
        conn.execute(
            "DELETE FROM acme_challenges WHERE created_at < ?1",
            [ts(now - CHALLENGE_LIFETIME)],
        )?;
        conn.execute(
            "INSERT INTO acme_challenges (token, key_authorization, created_at) VALUES (?1, ?2, ?3)
             ON CONFLICT(token) DO UPDATE SET key_authorization = excluded.key_authorization",
            params![token, key_authorization, ts(now)],
        )?;
        Ok(())
    }

    fn challenge(&self, token: &str) -> Result<Option<String>> {
        Ok(self
            .lock()
            .query_row(
                "SELECT key_authorization FROM acme_challenges WHERE token = ?1",
                [token],
                |row| row.get(0),
            )
            .optional()?)
    }

    fn delete_challenge(&self, token: &str) -> Result<()> {
        self.lock()
            .execute("DELETE FROM acme_challenges WHERE token = ?1", [token])?;
        Ok(())
    }

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

    fn check_writable(&self, patience: std::time::Duration) -> Result<()> {
        let conn = self.lock();
        conn.busy_timeout(patience)?;
        let probe = conn.execute_batch("BEGIN IMMEDIATE; ROLLBACK;");
        conn.busy_timeout(BUSY_TIMEOUT)?;
        Ok(probe?)
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

    fn all_current_certificates(&self) -> Result<Vec<StoredCertificate>> {
        query_certificates(&self.lock(), "", "")
    }

    fn all_current_coverage(&self) -> Result<Vec<CertificateCoverage>> {
        let conn = self.lock();
        let mut statement = conn.prepare(&format!(
            "SELECT {COVERAGE_COLUMNS} FROM certificates WHERE superseded_at IS NULL"
        ))?;
        let mut rows = statement.query([])?;
        let mut coverage = Vec::new();
        while let Some(row) = rows.next()? {
            coverage.push(queries::coverage_from_row(row)?);
        }
        Ok(coverage)
    }

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

    fn sites_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(Site, Vec<CertificateCoverage>)>> {
        let conn = self.lock();
        let (sites, certificates) = queries::load_sites_page(&conn, after.unwrap_or(""), limit)?;
        Ok(super::pair_sites_with_certificates(sites, certificates))
    }

    fn certificate(&self, id: i64) -> Result<Option<StoredCertificate>> {
        // Cached: a full SDS rebuild reads every certificate it has not checked yet this way.
        let conn = self.lock();
        let raw = conn
            .prepare_cached(&format!(
                "SELECT {CERT_COLUMNS} FROM certificates WHERE id = ?1"
            ))?
            .query_row([id], RawCertificate::from_row)
            .optional()?;
        drop(conn);
        raw.map(RawCertificate::decode).transpose()
    }
}
