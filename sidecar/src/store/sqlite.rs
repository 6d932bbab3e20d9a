//! The embedded store: one SQLite file in WAL mode, owner-only, migrated on open.

use std::collections::HashMap;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, Row, Transaction, params};
use time::OffsetDateTime;
use tokio::sync::watch;

use super::rows::{
    CERT_COLUMNS, RawCertificate, RawSite, SITE_COLUMNS, enum_text, from_ts, names_from_json,
    names_json, site_hostname, ts,
};
use super::{AttemptLease, CHALLENGE_LIFETIME, LOCAL_NODE, SiteChanges, supersedes};
use super::{
    CertificateCoverage, Event, HostnameKind, HttpsMode, MixedContentFinding, NewCertificate,
    NewSite, OrderInFlight, PrivateKeyPem, Recorded, Site, SiteHostname, SitePolicy, Store,
    StoreCounts, StoredCertificate, finding_bytes,
};
use crate::error::{Error, Result};
use crate::hostname::Hostname;

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
pub(super) const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE sites (
    name TEXT PRIMARY KEY,
    primary_hostname TEXT NOT NULL,
    https_mode TEXT NOT NULL,
    redirect TEXT NOT NULL,
    hsts_enabled INTEGER NOT NULL,
    hsts_max_age INTEGER NOT NULL,
    mixed_content TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    next_attempt_at INTEGER,
    failures INTEGER NOT NULL DEFAULT 0,
    last_problem TEXT,
    regenerate INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE hostnames (
    hostname TEXT PRIMARY KEY,
    site TEXT NOT NULL REFERENCES sites(name) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    added_at INTEGER NOT NULL
);
CREATE INDEX hostnames_site ON hostnames(site);
CREATE TABLE certificates (
    id INTEGER PRIMARY KEY,
    site TEXT NOT NULL REFERENCES sites(name) ON DELETE CASCADE,
    names TEXT NOT NULL,
    chain_pem TEXT NOT NULL,
    key_pem TEXT NOT NULL,
    not_before INTEGER NOT NULL,
    not_after INTEGER NOT NULL,
    serial TEXT NOT NULL,
    ari_id TEXT,
    issued_at INTEGER NOT NULL,
    superseded_at INTEGER
);
CREATE INDEX certificates_site ON certificates(site);
CREATE TABLE certificate_names (
    certificate_id INTEGER NOT NULL REFERENCES certificates(id) ON DELETE CASCADE,
    hostname TEXT NOT NULL,
    PRIMARY KEY (hostname, certificate_id)
);
CREATE TABLE orders (
    id INTEGER PRIMARY KEY,
    site TEXT NOT NULL REFERENCES sites(name) ON DELETE CASCADE,
    names TEXT NOT NULL,
    order_url TEXT NOT NULL,
    key_pem TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE accounts (
    directory_url TEXT PRIMARY KEY,
    credentials TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    site TEXT NOT NULL,
    at INTEGER NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL,
    problem_type TEXT,
    reason TEXT
);
CREATE INDEX events_site ON events(site, id);
"#,
    r#"
CREATE TABLE mixed_content (
    site TEXT NOT NULL,
    page TEXT NOT NULL,
    resource TEXT NOT NULL,
    directive TEXT NOT NULL,
    reports INTEGER NOT NULL,
    first_seen INTEGER NOT NULL,
    last_seen INTEGER NOT NULL,
    PRIMARY KEY (site, page, resource)
);
"#,
    r#"
ALTER TABLE sites ADD COLUMN hsts_include_subdomains INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sites ADD COLUMN hsts_preload INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sites ADD COLUMN canonical_host TEXT;
"#,
    // Findings are kept under a byte budget per site, evicting the fewest reports, then the
    // least recently seen: each row carries its size, and the eviction order has an index.
    r#"
ALTER TABLE mixed_content ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0;
UPDATE mixed_content SET bytes = length(CAST(page AS BLOB)) + length(CAST(resource AS BLOB))
    + length(CAST(directive AS BLOB)) + 64;
CREATE INDEX mixed_content_eviction ON mixed_content(site, reports, last_seen);
"#,
    // The change log the policy feed reads to rebuild only the sites that changed: triggers
    // append the site's id in the writing transaction, so no code path can forget it. The
    // scheduling columns (next_attempt_at, failures, last_problem, regenerate) change on every
    // attempt and never alter the feed, so they do not log.
    r#"
CREATE TABLE site_changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    site TEXT NOT NULL,
    at INTEGER NOT NULL
);
CREATE TRIGGER site_changes_site_inserted AFTER INSERT ON sites BEGIN
    INSERT INTO site_changes (site, at) VALUES (NEW.name, unixepoch());
END;
CREATE TRIGGER site_changes_site_deleted AFTER DELETE ON sites BEGIN
    INSERT INTO site_changes (site, at) VALUES (OLD.name, unixepoch());
END;
CREATE TRIGGER site_changes_policy_updated AFTER UPDATE OF
    https_mode, redirect, hsts_enabled, hsts_max_age, hsts_include_subdomains, hsts_preload,
    mixed_content, canonical_host, primary_hostname ON sites BEGIN
    INSERT INTO site_changes (site, at) VALUES (NEW.name, unixepoch());
END;
CREATE TRIGGER site_changes_hostname_inserted AFTER INSERT ON hostnames BEGIN
    INSERT INTO site_changes (site, at) VALUES (NEW.site, unixepoch());
END;
CREATE TRIGGER site_changes_hostname_deleted AFTER DELETE ON hostnames BEGIN
    INSERT INTO site_changes (site, at) VALUES (OLD.site, unixepoch());
END;
CREATE TRIGGER site_changes_certificate_inserted AFTER INSERT ON certificates BEGIN
    INSERT INTO site_changes (site, at) VALUES (NEW.site, unixepoch());
END;
CREATE TRIGGER site_changes_certificate_superseded AFTER UPDATE OF superseded_at ON certificates BEGIN
    INSERT INTO site_changes (site, at) VALUES (NEW.site, unixepoch());
END;
"#,
    // Fleet mode: the issuance lease is explicit (which node holds it, until when), and HTTP-01
    // key authorisations live in the store so any node answers the CA.
    r#"
ALTER TABLE sites ADD COLUMN leased_by TEXT;
ALTER TABLE sites ADD COLUMN leased_until INTEGER;
CREATE TABLE acme_challenges (
    token TEXT PRIMARY KEY,
    key_authorization TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
"#,
];

/// The change log keeps at least this many newest rows...
pub const SITE_CHANGES_KEEP_ROWS: u64 = 100_000;
/// ...and every row younger than this many seconds; older rows beyond both are compacted away.
pub const SITE_CHANGES_KEEP_SECS: i64 = 24 * 60 * 60;
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
        let keep_rows = i64::try_from(keep_rows).unwrap_or(i64::MAX);
        Ok(self.lock().execute(
            "DELETE FROM site_changes
             WHERE seq <= (SELECT COALESCE(MAX(seq), 0) FROM site_changes) - ?1 AND at < ?2",
            params![keep_rows, ts(now).saturating_sub(keep_secs)],
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

impl RawCertificate {
    fn from_row(row: &Row<'_>) -> rusqlite::Result<Self> {
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
    fn from_row(row: &Row<'_>) -> rusqlite::Result<Self> {
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

fn load_site(conn: &Connection, name: &str) -> Result<Option<Site>> {
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
fn load_all_sites(conn: &Connection) -> Result<Vec<Site>> {
    let raw_sites = conn
        .prepare(&format!("SELECT {SITE_COLUMNS} FROM sites ORDER BY name"))?
        .query_map([], RawSite::from_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut by_site: HashMap<String, Vec<SiteHostname>> = HashMap::with_capacity(raw_sites.len());
    let mut statement =
        conn.prepare("SELECT site, hostname, kind FROM hostnames ORDER BY site, hostname")?;
    let mut rows = statement.query([])?;
    while let Some(row) = rows.next()? {
        let site: String = row.get(0)?;
        let hostname: String = row.get(1)?;
        let kind: String = row.get(2)?;
        by_site
            .entry(site)
            .or_default()
            .push(site_hostname(&hostname, &kind)?);
    }
    raw_sites
        .into_iter()
        .map(|raw| {
            let hostnames = by_site.remove(&raw.name).unwrap_or_default();
            raw.decode(hostnames)
        })
        .collect()
}

fn require_site(conn: &Connection, name: &str) -> Result<Site> {
    load_site(conn, name)?.ok_or_else(|| {
        Error::NotFound(format!(
            "no site named {name:?}; list sites with `autohttps site list`"
        ))
    })
}

fn insert_hostname(
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
        return Err(Error::Conflict(if owner == site {
            format!("{name} is already a hostname of site {site:?}")
        } else {
            format!("{name} already belongs to site {owner:?}; remove it there first")
        }));
    }
    tx.execute(
        "INSERT INTO hostnames (hostname, site, kind, added_at) VALUES (?1, ?2, ?3, ?4)",
        params![name.as_str(), site, enum_text(&kind), ts(now)],
    )?;
    Ok(())
}

/// The bytes a site's findings count against its budget.
fn site_findings_bytes(conn: &Connection, site: &str) -> Result<u64> {
    let total: i64 = conn.query_row(
        "SELECT COALESCE(SUM(bytes), 0) FROM mixed_content WHERE site = ?1",
        [site],
        |row| row.get(0),
    )?;
    Ok(u64::try_from(total).unwrap_or(0))
}

fn insert_event(
    tx: &Connection,
    site: &str,
    at: OffsetDateTime,
    kind: &str,
    message: &str,
    problem_type: Option<&str>,
    reason: Option<&str>,
) -> Result<()> {
    tx.execute(
        "INSERT INTO events (site, at, kind, message, problem_type, reason) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![site, ts(at), kind, message, problem_type, reason],
    )?;
    Ok(())
}

fn query_certificates(
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
            "site-created",
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
            "hostname-added",
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
            "hostname-removed",
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
        self.lock().execute(
            "UPDATE sites SET
                 next_attempt_at = CASE
                     WHEN next_attempt_at IS NULL OR next_attempt_at = ?2 THEN ?3
                     WHEN ?3 IS NULL THEN next_attempt_at
                     ELSE MIN(next_attempt_at, ?3)
                 END,
                 failures = ?4,
                 last_problem = ?5,
                 leased_by = CASE WHEN leased_by = ?6 THEN NULL ELSE leased_by END,
                 leased_until = CASE WHEN leased_by = ?6 THEN NULL ELSE leased_until END
             WHERE name = ?1",
            params![
                site,
                ts(lease_until),
                next.map(ts),
                failures,
                last_problem,
                self.node_id
            ],
        )?;
        Ok(())
    }

    fn renew_lease(
        &self,
        site: &str,
        lease_until: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<bool> {
        let renewed = self.lock().execute(
            "UPDATE sites SET leased_until = ?3,
                 next_attempt_at = CASE WHEN next_attempt_at = ?2 THEN ?3 ELSE next_attempt_at END
             WHERE name = ?1 AND leased_by = ?4 AND leased_until = ?2",
            params![site, ts(lease_until), ts(until), self.node_id],
        )?;
        Ok(renewed == 1)
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
        let wildcard = name
            .as_str()
            .split_once('.')
            .map(|(_, parent)| format!("*.{parent}"))
            .unwrap_or_default();
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
            "certificate-issued",
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
            "order-created",
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
        kind: &str,
        message: &str,
        problem_type: Option<&str>,
        reason: Option<&str>,
    ) -> Result<()> {
        insert_event(&self.lock(), site, at, kind, message, problem_type, reason)
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
        let mut used = site_findings_bytes(&tx, site)?;
        let mut evicted = 0;
        while used.saturating_add(bytes) > budget_bytes {
            let least_useful: Option<(i64, i64)> = tx
                .query_row(
                    "SELECT rowid, bytes FROM mixed_content WHERE site = ?1
                     ORDER BY reports ASC, last_seen ASC LIMIT 1",
                    [site],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )
                .optional()?;
            let Some((rowid, row_bytes)) = least_useful else {
                break;
            };
            tx.execute("DELETE FROM mixed_content WHERE rowid = ?1", [rowid])?;
            used = used.saturating_sub(u64::try_from(row_bytes).unwrap_or(0));
            evicted += 1;
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
                    kind,
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
        let attempts: i64 = conn.query_row(
            "SELECT COUNT(*) FROM events WHERE kind = 'attempt-started'",
            [],
            |row| row.get(0),
        )?;
        let failures_by_reason = conn
            .prepare("SELECT COALESCE(reason, 'unknown'), COUNT(*) FROM events WHERE kind = 'attempt-failed' GROUP BY 1 ORDER BY 1")?
            .query_map([], |row| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?)))?
            .map(|row| row.map(|(reason, n)| (reason, u64::try_from(n).unwrap_or_default())))
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let orders_in_flight: i64 =
            conn.query_row("SELECT COUNT(*) FROM orders", [], |row| row.get(0))?;
        let mut sites_by_mode = Vec::new();
        for mode in [HttpsMode::Auto, HttpsMode::Force, HttpsMode::Disable] {
            let n: i64 = conn.query_row(
                "SELECT COUNT(*) FROM sites WHERE https_mode = ?1",
                [enum_text(&mode)],
                |row| row.get(0),
            )?;
            sites_by_mode.push((mode, u64::try_from(n).unwrap_or_default()));
        }
        Ok(StoreCounts {
            attempts: u64::try_from(attempts).unwrap_or_default(),
            failures_by_reason,
            orders_in_flight: u64::try_from(orders_in_flight).unwrap_or_default(),
            sites_by_mode,
        })
    }

    fn all_current_certificates(&self) -> Result<Vec<StoredCertificate>> {
        query_certificates(&self.lock(), "", "")
    }

    fn all_current_coverage(&self) -> Result<Vec<CertificateCoverage>> {
        let conn = self.lock();
        let mut statement = conn.prepare(
            "SELECT site, names, not_before, not_after FROM certificates WHERE superseded_at IS NULL",
        )?;
        let mut rows = statement.query([])?;
        let mut coverage = Vec::new();
        while let Some(row) = rows.next()? {
            coverage.push(CertificateCoverage {
                site: row.get(0)?,
                names: names_from_json(&row.get::<_, String>(1)?)?,
                not_before: from_ts(row.get(2)?)?,
                not_after: from_ts(row.get(3)?)?,
            });
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
        let as_seq = |seq: Option<i64>| seq.and_then(|s| u64::try_from(s).ok()).unwrap_or(0);
        let (oldest, latest) = (as_seq(oldest), as_seq(latest));
        // Rows after `after` were compacted away (the next one is gone), or `after` is ahead of
        // this log (it came from another database): the changes cannot be told, only reloaded.
        if after > latest || (oldest > 0 && after.saturating_add(1) < oldest) {
            return Ok(SiteChanges {
                sites: Vec::new(),
                last_seq: latest,
                complete: false,
            });
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
        let mut last_seq = after;
        let mut seen = std::collections::HashSet::new();
        let mut sites = Vec::new();
        for (seq, site) in rows {
            last_seq = u64::try_from(seq).unwrap_or(last_seq);
            if seen.insert(site.clone()) {
                sites.push(site);
            }
        }
        Ok(SiteChanges {
            sites,
            last_seq,
            complete: true,
        })
    }

    fn certificates_changed(&self) -> watch::Receiver<u64> {
        self.certificates_changed.subscribe()
    }

    fn sites_changed(&self) -> watch::Receiver<u64> {
        self.sites_changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-03-01 00:00 UTC);

    fn name(n: &str) -> Hostname {
        Hostname::parse(n).unwrap()
    }

    fn site(store: &SqliteStore, names: &[&str]) -> Site {
        store
            .create_site(
                NewSite {
                    name: "blog".into(),
                    primary: name(names[0]),
                    hostnames: names[1..].iter().map(|n| name(n)).collect(),
                    policy: SitePolicy::default(),
                },
                NOW,
                NOW,
            )
            .unwrap()
    }

    #[test]
    fn a_database_of_the_first_schema_upgrades_keeping_its_sites() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("autohttps.db");
        {
            let connection = Connection::open(&path).unwrap();
            connection.execute_batch(MIGRATIONS[0]).unwrap();
            connection.pragma_update(None, "user_version", 1).unwrap();
            connection
                .execute(
                    "INSERT INTO sites (name, primary_hostname, https_mode, redirect, hsts_enabled,
                                        hsts_max_age, mixed_content, created_at)
                     VALUES ('old', 'old.example.com', 'force', 'permanent', 1, 300, 'off', 0)",
                    [],
                )
                .unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        let site = store.site("old").unwrap().expect("the site survives");
        assert!(site.policy.hsts.enabled);
        assert_eq!(site.policy.hsts.max_age, 300);
        assert!(!site.policy.hsts.include_subdomains && !site.policy.hsts.preload);
        assert_eq!(site.policy.canonical_host, None);
        let mut policy = site.policy.clone();
        policy.hsts.include_subdomains = true;
        policy.canonical_host = Some(name("old.example.com"));
        let before = store.latest_change_seq().unwrap();
        let updated = store.set_policy("old", policy.clone()).unwrap();
        assert_eq!(updated.policy, policy);
        // The upgraded database has the change log and its triggers.
        assert_eq!(store.site_changes_since(before, 10).unwrap().sites, ["old"]);
        assert_eq!(
            store.schema_version().unwrap(),
            crate::store::SCHEMA_VERSION
        );
    }

    #[test]
    fn files_are_owner_only_and_reopen_keeps_data() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        create_private_dir(&data).unwrap();
        let path = data.join("autohttps.db");
        {
            let store = SqliteStore::open(&path).unwrap();
            site(&store, &["example.com"]);
            store
                .insert_order(
                    "blog",
                    &[name("example.com")],
                    "https://ca/order/1",
                    &PrivateKeyPem::new("k".into()),
                    NOW,
                )
                .unwrap();
        }
        assert_eq!(std::fs::metadata(&data).unwrap().mode() & 0o777, 0o700);
        for entry in std::fs::read_dir(&data).unwrap() {
            let entry = entry.unwrap();
            assert_eq!(
                entry.metadata().unwrap().mode() & 0o077,
                0,
                "{:?} is readable by others",
                entry.path()
            );
        }
        let store = SqliteStore::open(&path).unwrap();
        let orders = store.orders_in_flight(None).unwrap();
        assert_eq!(orders.len(), 1);
        assert_eq!(orders[0].order_url, "https://ca/order/1");
        assert!(store.site("blog").unwrap().is_some());
    }
}

#[cfg(test)]
mod change_log_tests {
    use super::*;
    use std::time::Duration;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-03-01 00:00 UTC);

    fn name(n: &str) -> Hostname {
        Hostname::parse(n).expect("valid hostname")
    }

    fn new_site(site: &str, primary: &str) -> NewSite {
        NewSite {
            name: site.into(),
            primary: name(primary),
            hostnames: Vec::new(),
            policy: SitePolicy::default(),
        }
    }

    fn certificate(site: &str, names: &[&str], serial: &str) -> NewCertificate {
        NewCertificate {
            site: site.into(),
            names: names.iter().map(|n| name(n)).collect(),
            chain_pem: format!("chain {serial}"),
            key_pem: PrivateKeyPem::new(format!("key {serial}")),
            not_before: NOW,
            not_after: datetime!(2026-06-01 00:00 UTC),
            serial: serial.into(),
            ari_id: None,
        }
    }

    /// Runs `write` and returns the sites the change log recorded for it (deduplicated).
    fn logged(store: &SqliteStore, write: impl FnOnce(&SqliteStore)) -> Vec<String> {
        let before = store.latest_change_seq().expect("latest");
        write(store);
        let changes = store.site_changes_since(before, 1000).expect("changes");
        assert!(changes.complete);
        assert_eq!(changes.last_seq, store.latest_change_seq().expect("latest"));
        changes.sites
    }

    #[test]
    fn every_write_that_changes_the_feed_logs_its_site_and_scheduling_does_not() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let store = SqliteStore::open(&dir.path().join("autohttps.db")).expect("store");
        assert_eq!(store.latest_change_seq().expect("latest"), 0);
        let both = |s: &SqliteStore| {
            s.create_site(new_site("blog", "blog.test"), NOW, NOW)
                .expect("site");
            s.create_site(new_site("shop", "shop.test"), NOW, NOW)
                .expect("site");
        };
        // A site and its primary hostname, twice: deduplicated, in order of first change.
        assert_eq!(logged(&store, both), ["blog", "shop"]);
        let policy = SitePolicy {
            https: HttpsMode::Force,
            ..SitePolicy::default()
        };
        assert_eq!(
            logged(&store, |s| {
                s.set_policy("shop", policy).expect("policy");
            }),
            ["shop"]
        );
        assert_eq!(
            logged(&store, |s| {
                s.add_hostname("blog", &name("www.blog.test"), NOW, NOW)
                    .expect("added");
            }),
            ["blog"]
        );
        assert_eq!(
            logged(&store, |s| {
                s.remove_hostname("blog", &name("www.blog.test"), NOW, NOW)
                    .expect("removed");
            }),
            ["blog"]
        );
        assert_eq!(
            logged(&store, |s| {
                s.store_certificate(certificate("shop", &["shop.test"], "01"), None, NOW)
                    .expect("stored");
            }),
            ["shop"]
        );
        // The next certificate supersedes the first: the insert and the update both log.
        let before = store.latest_change_seq().expect("latest");
        store
            .store_certificate(certificate("shop", &["shop.test"], "02"), None, NOW)
            .expect("stored");
        assert_eq!(store.latest_change_seq().expect("latest"), before + 2);

        // Scheduling and attempts write only the scheduling columns: nothing is logged.
        let lease = NOW + Duration::from_secs(600);
        assert_eq!(
            logged(&store, |s| {
                s.begin_attempt("blog", NOW, lease).expect("begun");
                s.finish_attempt("blog", lease, Some(lease), 1, Some("dns"))
                    .expect("finished");
                s.schedule("blog", None, 2, Some("again"))
                    .expect("scheduled");
                s.request_issuance("blog", NOW, true).expect("requested");
                s.take_regenerate_request("blog").expect("taken");
                s.add_event("blog", NOW, "attempt-failed", "x", None, None)
                    .expect("event");
            }),
            Vec::<String>::new()
        );
        assert_eq!(
            logged(&store, |s| s.delete_site("shop").expect("deleted")),
            ["shop"]
        );

        // The log survives a restart, and reading from where it ends gives nothing.
        let latest = store.latest_change_seq().expect("latest");
        drop(store);
        let store = SqliteStore::open(&dir.path().join("autohttps.db")).expect("reopened");
        assert_eq!(store.latest_change_seq().expect("latest"), latest);
        let nothing = store.site_changes_since(latest, 10).expect("changes");
        assert_eq!(
            nothing,
            SiteChanges {
                sites: Vec::new(),
                last_seq: latest,
                complete: true
            }
        );
        // `limit` bounds the rows read; the next call goes on from `last_seq`.
        let first = store.site_changes_since(0, 2).expect("changes");
        assert_eq!(
            (first.sites.as_slice(), first.last_seq),
            (&["blog".to_string()][..], 2)
        );
        let next = store
            .site_changes_since(first.last_seq, 2)
            .expect("changes");
        assert_eq!(next.sites, ["shop"]);
    }

    #[test]
    fn coverage_is_the_current_certificates_without_their_pem() {
        let store = SqliteStore::in_memory().expect("store");
        store
            .create_site(new_site("shop", "shop.test"), NOW, NOW)
            .expect("site");
        store
            .add_hostname("shop", &name("www.shop.test"), NOW, NOW)
            .expect("added");
        for (names, serial) in [(&["shop.test"][..], "01"), (&["www.shop.test"][..], "02")] {
            store
                .store_certificate(certificate("shop", names, serial), None, NOW)
                .expect("stored");
        }
        // One that the next supersedes: not current, not in the coverage.
        store
            .store_certificate(
                certificate("shop", &["shop.test", "www.shop.test"], "03"),
                None,
                NOW,
            )
            .expect("stored");
        let mut coverage = store.all_current_coverage().expect("coverage");
        coverage.sort_by(|a, b| a.names.cmp(&b.names));
        let mut expected: Vec<CertificateCoverage> = store
            .all_current_certificates()
            .expect("certificates")
            .iter()
            .map(CertificateCoverage::from)
            .collect();
        expected.sort_by(|a, b| a.names.cmp(&b.names));
        assert_eq!(coverage, expected);
        assert_eq!(coverage.len(), 1);
        assert!(coverage[0].covers(&name("www.shop.test")));
    }

    #[test]
    fn a_reader_behind_the_compacted_log_or_ahead_of_it_is_told_to_reload() {
        let store = SqliteStore::in_memory().expect("store");
        for site in ["a", "b", "c"] {
            store
                .create_site(new_site(site, &format!("{site}.test")), NOW, NOW)
                .expect("site");
        }
        let latest = store.latest_change_seq().expect("latest");
        // Recent rows are kept whatever their number.
        let kept = store
            .compact_site_changes(1, SITE_CHANGES_KEEP_SECS, OffsetDateTime::now_utc())
            .expect("compacted");
        assert_eq!(kept, 0);
        assert!(store.site_changes_since(0, 100).expect("changes").complete);
        // Old rows beyond the newest one go.
        let later = OffsetDateTime::now_utc() + time::Duration::minutes(1);
        let deleted = store.compact_site_changes(1, 0, later).expect("compacted");
        assert_eq!(deleted, usize::try_from(latest - 1).expect("small"));
        assert_eq!(store.latest_change_seq().expect("latest"), latest);
        let behind = store.site_changes_since(0, 100).expect("changes");
        assert_eq!(
            behind,
            SiteChanges {
                sites: Vec::new(),
                last_seq: latest,
                complete: false
            }
        );
        // Just before the oldest kept row is still complete.
        let edge = store.site_changes_since(latest - 1, 100).expect("changes");
        assert!(edge.complete);
        assert_eq!(edge.sites, ["c"]);
        let ahead = store.site_changes_since(latest + 5, 100).expect("changes");
        assert!(!ahead.complete);
    }
}
