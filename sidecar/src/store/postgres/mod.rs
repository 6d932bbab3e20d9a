//! The shared store of a fleet: PostgreSQL, one database for every edge node's sidecar.
//!
//! Same rows and rules as the SQLite store ([`super::rows`], [`super::supersedes`]); what a
//! fleet adds is done by the database: the issuance lease is one conditional `UPDATE` (two
//! nodes can never both hold it), the ACME account is saved once (a unique key, the winner read
//! back), the change log is written by triggers that also `NOTIFY` every node.

mod connections;
mod import;
mod listen;
mod schema;

pub use import::{CopyReport, copy_store};

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use postgres::{Client, GenericClient, IsolationLevel, Row, Transaction};
use time::OffsetDateTime;
use tokio::sync::watch;

use self::connections::{Connections, Shared, conflict_on_duplicate};
use super::change_log_cutoff;
use super::rows::{
    CERT_COLUMNS, COVERAGE_COLUMNS, RawCertificate, RawSite, SITE_COLUMNS, enum_from, enum_text,
    from_ts, names_from_json, names_json, site_hostname, ts,
};
use super::rules::INTERRUPTED_MESSAGE;
use super::{
    AttemptLease, CHALLENGE_LIFETIME, CertificateCoverage, Event, HostnameKind, HttpsMode,
    MixedContentFinding, NewCertificate, NewSite, OrderInFlight, PrivateKeyPem, Recorded, Site,
    SiteChanges, SiteHostname, SitePolicy, Store, StoreCounts, StoredCertificate, finding_bytes,
    fold_site_changes, supersedes, unknowable_changes,
};
use super::{
    FindingWeight, SiteEventKind, counts_from_tallies, findings_to_evict, next_attempt_after,
    still_the_lease,
};
use crate::error::{Error, Result};
use crate::hostname::Hostname;
use autohttps_filter::policy::wildcard_name;

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

/// The error for a site name that does not exist.
fn no_site(name: &str) -> Error {
    Error::NotFound(format!(
        "no site named {name:?}; list sites with `autohttps site list`"
    ))
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
                .query_one("SELECT version FROM autohttps_schema", &[])?
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
    /// deleted is told `complete: false` by [`Store::site_changes_since`] and reloads.
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

/// A write transaction that may change the change log: it takes the change-log lock first, so
/// a transaction that updates a row and only then fires the trigger cannot deadlock with one
/// that holds the lock and waits for that row.
fn change_transaction(client: &mut Client) -> Result<Transaction<'_>> {
    let mut tx = client.transaction()?;
    tx.execute(
        "SELECT pg_advisory_xact_lock($1)",
        &[&schema::CHANGE_LOG_LOCK],
    )?;
    Ok(tx)
}

impl RawSite {
    fn from_pg(row: &Row) -> Result<Self> {
        Ok(Self {
            name: row.try_get(0)?,
            primary: row.try_get(1)?,
            https: row.try_get(2)?,
            redirect: row.try_get(3)?,
            hsts_enabled: row.try_get(4)?,
            max_age: row.try_get(5)?,
            mixed: row.try_get(6)?,
            created: row.try_get(7)?,
            next: row.try_get(8)?,
            failures: u32::try_from(row.try_get::<_, i64>(9)?).unwrap_or(u32::MAX),
            last_problem: row.try_get(10)?,
            regenerate_requested: row.try_get(11)?,
            include_subdomains: row.try_get(12)?,
            preload: row.try_get(13)?,
            canonical_host: row.try_get(14)?,
        })
    }
}

impl RawCertificate {
    fn from_pg(row: &Row) -> Result<Self> {
        Ok(Self {
            id: row.try_get(0)?,
            site: row.try_get(1)?,
            names: row.try_get(2)?,
            chain_pem: row.try_get(3)?,
            key_pem: row.try_get(4)?,
            not_before: row.try_get(5)?,
            not_after: row.try_get(6)?,
            serial: row.try_get(7)?,
            ari_id: row.try_get(8)?,
            issued_at: row.try_get(9)?,
        })
    }
}

fn load_site(client: &mut impl GenericClient, name: &str) -> Result<Option<Site>> {
    let Some(row) = client.query_opt(
        &format!("SELECT {SITE_COLUMNS} FROM sites WHERE name = $1"),
        &[&name],
    )?
    else {
        return Ok(None);
    };
    let raw = RawSite::from_pg(&row)?;
    let hostnames = client
        .query(
            "SELECT hostname, kind FROM hostnames WHERE site = $1 ORDER BY hostname",
            &[&name],
        )?
        .iter()
        .map(|row| site_hostname(&row.try_get::<_, String>(0)?, &row.try_get::<_, String>(1)?))
        .collect::<Result<Vec<_>>>()?;
    raw.decode(hostnames).map(Some)
}

fn require_site(client: &mut impl GenericClient, name: &str) -> Result<Site> {
    load_site(client, name)?.ok_or_else(|| no_site(name))
}

fn load_all_sites(client: &mut impl GenericClient) -> Result<Vec<Site>> {
    let raw_sites = client
        .query(
            &format!("SELECT {SITE_COLUMNS} FROM sites ORDER BY name"),
            &[],
        )?
        .iter()
        .map(RawSite::from_pg)
        .collect::<Result<Vec<_>>>()?;
    let mut by_site: HashMap<String, Vec<SiteHostname>> = HashMap::with_capacity(raw_sites.len());
    for row in client.query(
        "SELECT site, hostname, kind FROM hostnames ORDER BY site, hostname",
        &[],
    )? {
        by_site
            .entry(row.try_get(0)?)
            .or_default()
            .push(site_hostname(
                &row.try_get::<_, String>(1)?,
                &row.try_get::<_, String>(2)?,
            )?);
    }
    raw_sites
        .into_iter()
        .map(|raw| {
            let hostnames = by_site.remove(&raw.name).unwrap_or_default();
            raw.decode(hostnames)
        })
        .collect()
}

fn insert_hostname(
    tx: &mut Transaction<'_>,
    site: &str,
    name: &Hostname,
    kind: HostnameKind,
    now: OffsetDateTime,
) -> Result<()> {
    let owner: Option<String> = tx
        .query_opt(
            "SELECT site FROM hostnames WHERE hostname = $1",
            &[&name.as_str()],
        )?
        .map(|row| row.try_get(0))
        .transpose()?;
    let taken = |owner: &str| {
        if owner == site {
            format!("{name} is already a hostname of site {site:?}")
        } else {
            format!("{name} already belongs to site {owner:?}; remove it there first")
        }
    };
    if let Some(owner) = owner {
        return Err(Error::Conflict(taken(&owner)));
    }
    conflict_on_duplicate(
        tx.execute(
            "INSERT INTO hostnames (hostname, site, kind, added_at) VALUES ($1, $2, $3, $4)",
            &[&name.as_str(), &site, &enum_text(&kind), &ts(now)],
        ),
        || format!("{name} was just added to another site; remove it there first"),
    )?;
    Ok(())
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
        .query_one(
            "SELECT pg_try_advisory_xact_lock($1)",
            &[&schema::COMPACTION_LOCK],
        )?
        .try_get(0)?;
    if !ours {
        return Ok(0);
    }
    let latest: i64 = tx
        .query_one(
            "SELECT COALESCE(MAX(seq), 0)::BIGINT FROM site_changes",
            &[],
        )?
        .try_get(0)?;
    let Some((last_deleted, before)) = change_log_cutoff(count(latest), keep_rows, keep_secs, now)
    else {
        return Ok(0);
    };
    let deleted = tx.execute(
        "DELETE FROM site_changes WHERE seq <= $1 AND at < $2",
        &[&i64::try_from(last_deleted).unwrap_or(i64::MAX), &before],
    )?;
    tx.commit()?;
    Ok(usize::try_from(deleted).unwrap_or(usize::MAX))
}

/// A site's next attempt time, its row locked until the transaction ends (`None` when there
/// is no such site).
fn next_attempt_for_update(
    tx: &mut Transaction<'_>,
    site: &str,
) -> Result<Option<Option<OffsetDateTime>>> {
    tx.query_opt(
        "SELECT next_attempt_at FROM sites WHERE name = $1 FOR UPDATE",
        &[&site],
    )?
    .map(|row| row.try_get::<_, Option<i64>>(0)?.map(from_ts).transpose())
    .transpose()
}

fn insert_event(
    client: &mut impl GenericClient,
    site: &str,
    at: OffsetDateTime,
    kind: &SiteEventKind,
    message: &str,
    problem_type: Option<&str>,
    reason: Option<&str>,
) -> Result<()> {
    client.execute(
        "INSERT INTO events (site, at, kind, message, problem_type, reason) VALUES ($1, $2, $3, $4, $5, $6)",
        &[&site, &ts(at), &kind.as_str(), &message, &problem_type, &reason],
    )?;
    Ok(())
}

fn query_certificates(
    client: &mut impl GenericClient,
    site: Option<&str>,
) -> Result<Vec<StoredCertificate>> {
    client
        .query(
            &format!(
                "SELECT {CERT_COLUMNS} FROM certificates
                 WHERE superseded_at IS NULL AND ($1::TEXT IS NULL OR site = $1)
                 ORDER BY not_after DESC, id DESC"
            ),
            &[&site],
        )?
        .iter()
        .map(|row| RawCertificate::from_pg(row)?.decode())
        .collect()
}

fn site_findings_bytes(client: &mut impl GenericClient, site: &str) -> Result<u64> {
    let total: i64 = client
        .query_one(
            "SELECT COALESCE(SUM(bytes), 0)::BIGINT FROM mixed_content WHERE site = $1",
            &[&site],
        )?
        .try_get(0)?;
    Ok(u64::try_from(total).unwrap_or(0))
}

fn count(value: i64) -> u64 {
    u64::try_from(value).unwrap_or_default()
}

fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

impl Store for PostgresStore {
    fn create_site(
        &self,
        site: NewSite,
        now: OffsetDateTime,
        issue_at: OffsetDateTime,
    ) -> Result<Site> {
        super::validate_site_name(&site.name)?;
        let created = self.connections.run(move |client| {
            let mut tx = change_transaction(client)?;
            let exists = |name: &str| {
                format!("a site named {name:?} already exists; pick another name or change that site")
            };
            let present: bool = tx
                .query_one(
                    "SELECT EXISTS(SELECT 1 FROM sites WHERE name = $1)",
                    &[&site.name],
                )?
                .try_get(0)?;
            if present {
                return Err(Error::Conflict(exists(&site.name)));
            }
            conflict_on_duplicate(
                tx.execute(
                    "INSERT INTO sites (name, primary_hostname, https_mode, redirect, hsts_enabled, hsts_max_age,
                                        mixed_content, created_at, next_attempt_at, failures,
                                        hsts_include_subdomains, hsts_preload, canonical_host)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 0, $10, $11, $12)",
                    &[
                        &site.name,
                        &site.primary.as_str(),
                        &enum_text(&site.policy.https),
                        &enum_text(&site.policy.redirect),
                        &site.policy.hsts.enabled,
                        &i64::try_from(site.policy.hsts.max_age).unwrap_or(i64::MAX),
                        &enum_text(&site.policy.mixed_content),
                        &ts(now),
                        &ts(issue_at),
                        &site.policy.hsts.include_subdomains,
                        &site.policy.hsts.preload,
                        &site.policy.canonical_host.as_ref().map(Hostname::as_str),
                    ],
                ),
                || exists(&site.name),
            )?;
            insert_hostname(&mut tx, &site.name, &site.primary, HostnameKind::Primary, now)?;
            let others: Vec<&Hostname> =
                site.hostnames.iter().filter(|n| *n != &site.primary).collect();
            for name in &others {
                insert_hostname(
                    &mut tx,
                    &site.name,
                    name,
                    HostnameKind::of(name, &site.primary),
                    now,
                )?;
            }
            insert_event(
                &mut tx,
                &site.name,
                now,
                &SiteEventKind::SiteCreated,
                &format!("site created with {} hostname(s)", 1 + others.len()),
                None,
                None,
            )?;
            let created = require_site(&mut tx, &site.name)?;
            tx.commit()?;
            Ok(created)
        })?;
        self.bump_sites();
        Ok(created)
    }

    fn list_sites(&self) -> Result<Vec<Site>> {
        self.connections.run(|client| {
            // One snapshot for both queries.
            let mut tx = client
                .build_transaction()
                .isolation_level(postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()?;
            let sites = load_all_sites(&mut tx)?;
            tx.commit()?;
            Ok(sites)
        })
    }

    fn site(&self, name: &str) -> Result<Option<Site>> {
        let name = name.to_owned();
        self.connections.run(move |client| load_site(client, &name))
    }

    fn delete_site(&self, name: &str) -> Result<()> {
        let name = name.to_owned();
        self.connections.run(move |client| {
            let mut tx = change_transaction(client)?;
            if tx.execute("DELETE FROM sites WHERE name = $1", &[&name])? == 0 {
                return Err(no_site(&name));
            }
            tx.execute("DELETE FROM events WHERE site = $1", &[&name])?;
            tx.execute("DELETE FROM mixed_content WHERE site = $1", &[&name])?;
            tx.commit()?;
            Ok(())
        })?;
        self.bump_sites();
        self.bump_certificates();
        Ok(())
    }

    fn set_policy(&self, name: &str, policy: SitePolicy) -> Result<Site> {
        let name = name.to_owned();
        let site = self.connections.run(move |client| {
            let mut tx = change_transaction(client)?;
            let changed = tx.execute(
                "UPDATE sites SET https_mode = $2, redirect = $3, hsts_enabled = $4, hsts_max_age = $5,
                                  mixed_content = $6, hsts_include_subdomains = $7, hsts_preload = $8,
                                  canonical_host = $9
                 WHERE name = $1",
                &[
                    &name,
                    &enum_text(&policy.https),
                    &enum_text(&policy.redirect),
                    &policy.hsts.enabled,
                    &i64::try_from(policy.hsts.max_age).unwrap_or(i64::MAX),
                    &enum_text(&policy.mixed_content),
                    &policy.hsts.include_subdomains,
                    &policy.hsts.preload,
                    &policy.canonical_host.as_ref().map(Hostname::as_str),
                ],
            )?;
            if changed == 0 {
                return Err(no_site(&name));
            }
            let site = require_site(&mut tx, &name)?;
            tx.commit()?;
            Ok(site)
        })?;
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
        let (site, name) = (site.to_owned(), name.clone());
        let updated = self.connections.run(move |client| {
            let mut tx = change_transaction(client)?;
            let primary = require_site(&mut tx, &site)?.primary;
            let kind = HostnameKind::of(&name, &primary);
            insert_hostname(&mut tx, &site, &name, kind, now)?;
            tx.execute(
                "UPDATE sites SET next_attempt_at = $2, failures = 0 WHERE name = $1",
                &[&site, &ts(issue_at)],
            )?;
            insert_event(
                &mut tx,
                &site,
                now,
                &SiteEventKind::HostnameAdded,
                &format!("{} {name} added", enum_text(&kind)),
                None,
                None,
            )?;
            let updated = require_site(&mut tx, &site)?;
            tx.commit()?;
            Ok(updated)
        })?;
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
        let (site, name) = (site.to_owned(), name.clone());
        let updated = self.connections.run(move |client| {
            let mut tx = change_transaction(client)?;
            let current = require_site(&mut tx, &site)?;
            if current.primary == name {
                return Err(Error::InvalidInput(format!(
                    "{name} is the primary domain of site {site:?}; it cannot be removed (remove the site instead)"
                )));
            }
            let removed = tx.execute(
                "DELETE FROM hostnames WHERE hostname = $1 AND site = $2",
                &[&name.as_str(), &site],
            )?;
            if removed == 0 {
                return Err(Error::NotFound(format!(
                    "{name} is not a hostname of site {site:?}"
                )));
            }
            tx.execute(
                "UPDATE sites SET next_attempt_at = $2, failures = 0 WHERE name = $1",
                &[&site, &ts(issue_at)],
            )?;
            // A canonical host must be one of the site's names: removing it clears it.
            tx.execute(
                "UPDATE sites SET canonical_host = NULL WHERE name = $1 AND canonical_host = $2",
                &[&site, &name.as_str()],
            )?;
            insert_event(
                &mut tx,
                &site,
                now,
                &SiteEventKind::HostnameRemoved,
                &format!("{name} removed"),
                None,
                None,
            )?;
            let updated = require_site(&mut tx, &site)?;
            tx.commit()?;
            Ok(updated)
        })?;
        self.bump_sites();
        self.bump_certificates();
        Ok(updated)
    }

    fn site_of_hostname(&self, name: &Hostname) -> Result<Option<String>> {
        let name = name.clone();
        self.connections.run(move |client| {
            client
                .query_opt(
                    "SELECT site FROM hostnames WHERE hostname = $1",
                    &[&name.as_str()],
                )?
                .map(|row| row.try_get(0).map_err(Error::from))
                .transpose()
        })
    }

    fn request_issuance(&self, site: &str, at: OffsetDateTime, regenerate: bool) -> Result<()> {
        let site = site.to_owned();
        self.connections.run(move |client| {
            let changed = client.execute(
                "UPDATE sites SET next_attempt_at = $2, failures = 0, regenerate = (regenerate OR $3)
                 WHERE name = $1",
                &[&site, &ts(at), &regenerate],
            )?;
            if changed == 0 {
                return Err(no_site(&site));
            }
            Ok(())
        })
    }

    fn take_regenerate_request(&self, site: &str) -> Result<bool> {
        let site = site.to_owned();
        self.connections.run(move |client| {
            // The old value, read and cleared in one statement.
            let row = client.query_opt(
                "UPDATE sites SET regenerate = FALSE
                 FROM (SELECT name, regenerate FROM sites WHERE name = $1 FOR UPDATE) AS before
                 WHERE sites.name = before.name
                 RETURNING before.regenerate",
                &[&site],
            )?;
            Ok(match row {
                Some(row) => row.try_get(0)?,
                None => false,
            })
        })
    }

    fn begin_attempt(
        &self,
        site: &str,
        now: OffsetDateTime,
        lease_until: OffsetDateTime,
    ) -> Result<AttemptLease> {
        let (site, node) = (site.to_owned(), self.node_id());
        self.connections.run(move |client| {
            let mut tx = client.transaction()?;
            let taken = tx.execute(
                "UPDATE sites SET next_attempt_at = $3, leased_by = $2, leased_until = $3
                 WHERE name = $1
                   AND (leased_by IS NULL OR leased_by = $2 OR leased_until IS NULL
                        OR leased_until <= $4)",
                &[&site, &node, &ts(lease_until), &ts(now)],
            )?;
            if taken == 0 {
                let holder = tx.query_opt(
                    "SELECT leased_by, leased_until FROM sites WHERE name = $1",
                    &[&site],
                )?;
                return match holder {
                    None => Ok(AttemptLease::NoSuchSite),
                    Some(row) => Ok(AttemptLease::HeldElsewhere {
                        node: row.try_get(0)?,
                        until: from_ts(row.try_get(1)?)?,
                    }),
                };
            }
            let current = require_site(&mut tx, &site)?;
            tx.commit()?;
            Ok(AttemptLease::Taken(Box::new(current)))
        })
    }

    fn finish_attempt(
        &self,
        site: &str,
        lease_until: OffsetDateTime,
        next: Option<OffsetDateTime>,
        failures: u32,
        last_problem: Option<&str>,
    ) -> Result<()> {
        let (site, node) = (site.to_owned(), self.node_id());
        let last_problem = last_problem.map(str::to_owned);
        self.connections.run(move |client| {
            let mut tx = client.transaction()?;
            let Some(stored) = next_attempt_for_update(&mut tx, &site)? else {
                return Ok(());
            };
            let next = next_attempt_after(stored, lease_until, next);
            tx.execute(
                "UPDATE sites SET next_attempt_at = $2, failures = $3, last_problem = $4,
                     leased_by = CASE WHEN leased_by = $5 THEN NULL ELSE leased_by END,
                     leased_until = CASE WHEN leased_by = $5 THEN NULL ELSE leased_until END
                 WHERE name = $1",
                &[
                    &site,
                    &next.map(ts),
                    &i64::from(failures),
                    &last_problem,
                    &node,
                ],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    fn renew_lease(
        &self,
        site: &str,
        held_until: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<bool> {
        let (site, node) = (site.to_owned(), self.node_id());
        self.connections.run(move |client| {
            let mut tx = client.transaction()?;
            let held = tx.query_opt(
                "SELECT next_attempt_at FROM sites
                 WHERE name = $1 AND leased_by = $2 AND leased_until = $3 FOR UPDATE",
                &[&site, &node, &ts(held_until)],
            )?;
            let Some(held) = held else {
                return Ok(false);
            };
            let stored = held
                .try_get::<_, Option<i64>>(0)?
                .map(from_ts)
                .transpose()?;
            let next = if still_the_lease(stored, held_until) {
                Some(until)
            } else {
                stored
            };
            tx.execute(
                "UPDATE sites SET leased_until = $2, next_attempt_at = $3 WHERE name = $1",
                &[&site, &ts(until), &next.map(ts)],
            )?;
            tx.commit()?;
            Ok(true)
        })
    }

    fn release_own_leases(&self, now: OffsetDateTime) -> Result<Vec<String>> {
        let node = self.node_id();
        self.connections.run(move |client| {
            let mut tx = client.transaction()?;
            let held = tx.query(
                "SELECT name, next_attempt_at, leased_until FROM sites
                 WHERE leased_by = $1 AND leased_until IS NOT NULL ORDER BY name FOR UPDATE",
                &[&node],
            )?;
            let mut released = Vec::with_capacity(held.len());
            for row in held {
                let name: String = row.try_get(0)?;
                let stored = row.try_get::<_, Option<i64>>(1)?.map(from_ts).transpose()?;
                let leased_until = from_ts(row.try_get(2)?)?;
                let next = next_attempt_after(stored, leased_until, Some(now));
                tx.execute(
                    "UPDATE sites SET next_attempt_at = $2, leased_by = NULL, leased_until = NULL
                     WHERE name = $1",
                    &[&name, &next.map(ts)],
                )?;
                insert_event(
                    &mut tx,
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
        })
    }

    fn schedule(
        &self,
        site: &str,
        next_attempt_at: Option<OffsetDateTime>,
        failures: u32,
        last_problem: Option<&str>,
    ) -> Result<()> {
        let site = site.to_owned();
        let last_problem = last_problem.map(str::to_owned);
        self.connections.run(move |client| {
            client.execute(
                "UPDATE sites SET next_attempt_at = $2, failures = $3, last_problem = $4 WHERE name = $1",
                &[&site, &next_attempt_at.map(ts), &i64::from(failures), &last_problem],
            )?;
            Ok(())
        })
    }

    fn due_sites(&self, now: OffsetDateTime) -> Result<Vec<String>> {
        let node = self.node_id();
        self.connections.run(move |client| {
            client
                .query(
                    "SELECT name FROM sites WHERE next_attempt_at <= $1
                       AND (leased_by IS NULL OR leased_by = $2 OR leased_until <= $1)
                     ORDER BY next_attempt_at",
                    &[&ts(now), &node],
                )?
                .iter()
                .map(|row| row.try_get(0).map_err(Error::from))
                .collect()
        })
    }

    fn next_due(&self) -> Result<Option<OffsetDateTime>> {
        let node = self.node_id();
        let next: Option<i64> = self.connections.run(move |client| {
            Ok(client
                .query_one(
                    "SELECT MIN(CASE WHEN leased_by <> $1 AND leased_until > next_attempt_at
                                     THEN leased_until ELSE next_attempt_at END)
                     FROM sites",
                    &[&node],
                )?
                .try_get(0)?)
        })?;
        next.map(from_ts).transpose()
    }

    fn current_certificates(&self, site: &str) -> Result<Vec<StoredCertificate>> {
        let site = site.to_owned();
        self.connections
            .run(move |client| query_certificates(client, Some(&site)))
    }

    fn certificate_for_hostname(&self, name: &Hostname) -> Result<Option<StoredCertificate>> {
        let name = name.clone();
        self.connections.run(move |client| {
            let wildcard = wildcard_name(name.as_str()).unwrap_or_default();
            let columns = CERT_COLUMNS
                .split(", ")
                .map(|column| format!("c.{column}"))
                .collect::<Vec<_>>()
                .join(", ");
            let row = client.query_opt(
                &format!(
                    "SELECT {columns} FROM certificates c
                     JOIN certificate_names n ON n.certificate_id = c.id
                     JOIN hostnames h ON h.hostname = n.hostname AND h.site = c.site
                     WHERE c.superseded_at IS NULL AND n.hostname IN ($1, $2)
                     ORDER BY c.not_after DESC, c.id DESC LIMIT 1"
                ),
                &[&name.as_str(), &wildcard],
            )?;
            row.map(|row| RawCertificate::from_pg(&row)?.decode())
                .transpose()
        })
    }

    fn store_certificate(
        &self,
        certificate: NewCertificate,
        completes_order: Option<i64>,
        now: OffsetDateTime,
    ) -> Result<StoredCertificate> {
        let stored = self.connections.run(move |client| {
            let mut tx = change_transaction(client)?;
            let id: i64 = tx
                .query_one(
                    "INSERT INTO certificates (site, names, chain_pem, key_pem, not_before, not_after, serial, ari_id, issued_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id",
                    &[
                        &certificate.site,
                        &names_json(&certificate.names),
                        &certificate.chain_pem,
                        &certificate.key_pem.expose(),
                        &ts(certificate.not_before),
                        &ts(certificate.not_after),
                        &certificate.serial,
                        &certificate.ari_id,
                        &ts(now),
                    ],
                )?
                .try_get(0)?;
            for name in &certificate.names {
                tx.execute(
                    "INSERT INTO certificate_names (certificate_id, hostname) VALUES ($1, $2)
                     ON CONFLICT DO NOTHING",
                    &[&id, &name.as_str()],
                )?;
            }
            let wanted: HashSet<String> = tx
                .query("SELECT hostname FROM hostnames WHERE site = $1", &[&certificate.site])?
                .iter()
                .map(|row| row.try_get(0))
                .collect::<std::result::Result<_, _>>()?;
            let older = tx.query(
                "SELECT id, names FROM certificates WHERE site = $1 AND superseded_at IS NULL AND id <> $2",
                &[&certificate.site, &id],
            )?;
            for row in older {
                let old_id: i64 = row.try_get(0)?;
                let old_names = names_from_json(row.try_get(1)?)?;
                if supersedes(&certificate.names, &old_names, &wanted) {
                    tx.execute(
                        "UPDATE certificates SET superseded_at = $2 WHERE id = $1",
                        &[&old_id, &ts(now)],
                    )?;
                }
            }
            if let Some(order) = completes_order {
                tx.execute("DELETE FROM orders WHERE id = $1", &[&order])?;
            }
            insert_event(
                &mut tx,
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
            let row = tx.query_one(
                &format!("SELECT {CERT_COLUMNS} FROM certificates WHERE id = $1"),
                &[&id],
            )?;
            let stored = RawCertificate::from_pg(&row)?.decode()?;
            tx.commit()?;
            Ok(stored)
        })?;
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
        let (site, names, order_url, key) = (
            site.to_owned(),
            names.to_vec(),
            order_url.to_owned(),
            key.clone(),
        );
        self.connections.run(move |client| {
            let mut tx = client.transaction()?;
            let id: i64 = tx
                .query_one(
                    "INSERT INTO orders (site, names, order_url, key_pem, created_at)
                     VALUES ($1, $2, $3, $4, $5) RETURNING id",
                    &[
                        &site,
                        &names_json(&names),
                        &order_url,
                        &key.expose(),
                        &ts(now),
                    ],
                )?
                .try_get(0)?;
            insert_event(
                &mut tx,
                &site,
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
        })
    }

    fn orders_in_flight(&self, site: Option<&str>) -> Result<Vec<OrderInFlight>> {
        let site = site.map(str::to_owned);
        self.connections.run(move |client| {
            client
                .query(
                    "SELECT id, site, names, order_url, key_pem, created_at FROM orders
                     WHERE $1::TEXT IS NULL OR site = $1 ORDER BY id",
                    &[&site],
                )?
                .iter()
                .map(|row| {
                    Ok(OrderInFlight {
                        id: row.try_get(0)?,
                        site: row.try_get(1)?,
                        names: names_from_json(row.try_get(2)?)?,
                        order_url: row.try_get(3)?,
                        key_pem: PrivateKeyPem::new(row.try_get(4)?),
                        created_at: from_ts(row.try_get(5)?)?,
                    })
                })
                .collect()
        })
    }

    fn delete_order(&self, id: i64) -> Result<()> {
        self.connections.run(move |client| {
            client.execute("DELETE FROM orders WHERE id = $1", &[&id])?;
            Ok(())
        })
    }

    fn account(&self, directory_url: &str) -> Result<Option<String>> {
        let directory_url = directory_url.to_owned();
        self.connections.run(move |client| {
            client
                .query_opt(
                    "SELECT credentials FROM accounts WHERE directory_url = $1",
                    &[&directory_url],
                )?
                .map(|row| row.try_get(0).map_err(Error::from))
                .transpose()
        })
    }

    fn save_account(
        &self,
        directory_url: &str,
        credentials_json: &str,
        now: OffsetDateTime,
    ) -> Result<String> {
        let (directory_url, credentials) = (directory_url.to_owned(), credentials_json.to_owned());
        self.connections.run(move |client| {
            client.execute(
                "INSERT INTO accounts (directory_url, credentials, created_at) VALUES ($1, $2, $3)
                 ON CONFLICT (directory_url) DO NOTHING",
                &[&directory_url, &credentials, &ts(now)],
            )?;
            Ok(client
                .query_one(
                    "SELECT credentials FROM accounts WHERE directory_url = $1",
                    &[&directory_url],
                )?
                .try_get(0)?)
        })
    }

    fn put_challenge(
        &self,
        token: &str,
        key_authorization: &str,
        now: OffsetDateTime,
    ) -> Result<()> {
        let (token, key_authorization) = (token.to_owned(), key_authorization.to_owned());
        self.connections.run(move |client| {
            client.execute(
                "DELETE FROM acme_challenges WHERE created_at < $1",
                &[&ts(now - CHALLENGE_LIFETIME)],
            )?;
            client.execute(
                "INSERT INTO acme_challenges (token, key_authorization, created_at) VALUES ($1, $2, $3)
                 ON CONFLICT (token) DO UPDATE SET key_authorization = excluded.key_authorization",
                &[&token, &key_authorization, &ts(now)],
            )?;
            Ok(())
        })
    }

    fn challenge(&self, token: &str) -> Result<Option<String>> {
        let token = token.to_owned();
        self.connections.run(move |client| {
            client
                .query_opt(
                    "SELECT key_authorization FROM acme_challenges WHERE token = $1",
                    &[&token],
                )?
                .map(|row| row.try_get(0).map_err(Error::from))
                .transpose()
        })
    }

    fn delete_challenge(&self, token: &str) -> Result<()> {
        let token = token.to_owned();
        self.connections.run(move |client| {
            client.execute("DELETE FROM acme_challenges WHERE token = $1", &[&token])?;
            Ok(())
        })
    }

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
                .query(
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
                .query(
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
                .query(
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
                .query_one("SELECT COUNT(*) FROM orders", &[])?
                .try_get(0)?;
            Ok(counts_from_tallies(events, modes, count(orders_in_flight)))
        })
    }

    fn all_current_certificates(&self) -> Result<Vec<StoredCertificate>> {
        self.connections
            .run(|client| query_certificates(client, None))
    }

    fn check_writable(&self, patience: Duration) -> Result<()> {
        let timeout_ms = patience.as_millis().clamp(1, 3_600_000).to_string();
        self.connections.run(move |client| {
            let mut tx = client.transaction()?;
            tx.execute(
                "SELECT set_config('lock_timeout', $1, true)",
                &[&timeout_ms],
            )?;
            let replica: bool = tx
                .query_one("SELECT pg_is_in_recovery()", &[])?
                .try_get(0)?;
            if replica {
                return Err(Error::StoreUnavailable(
                    "the server is a read-only standby; point store.url at the primary".into(),
                ));
            }
            tx.execute("LOCK TABLE sites IN ROW EXCLUSIVE MODE", &[])?;
            tx.rollback()?;
            Ok(())
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
            let updated = tx.execute(
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
                    .query(
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
                    tx.execute(
                        "DELETE FROM mixed_content WHERE site = $1 AND page = $2 AND resource = $3",
                        &[&site, &old_page, &old_resource],
                    )?;
                    evicted += 1;
                }
            }
            // Another node may have added the same pair meanwhile: then it is counted.
            tx.execute(
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
                .query(
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

    fn certificates_changed(&self) -> watch::Receiver<u64> {
        self.connections.shared.certificates_changed.subscribe()
    }

    fn sites_changed(&self) -> watch::Receiver<u64> {
        self.connections.shared.sites_changed.subscribe()
    }

    fn sites_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(Site, Vec<CertificateCoverage>)>> {
        let after = after.unwrap_or("").to_owned();
        self.connections.run(move |client| {
            // One snapshot for the three queries.
            let mut tx = client
                .build_transaction()
                .isolation_level(postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()?;
            let raw_sites = tx
                .query(
                    &format!(
                        "SELECT {SITE_COLUMNS} FROM sites WHERE name > $1 ORDER BY name LIMIT $2"
                    ),
                    &[&after, &sql_limit(limit)],
                )?
                .iter()
                .map(RawSite::from_pg)
                .collect::<Result<Vec<_>>>()?;
            let (Some(first), Some(last)) = (raw_sites.first(), raw_sites.last()) else {
                tx.commit()?;
                return Ok(Vec::new());
            };
            let (first, last) = (first.name.clone(), last.name.clone());
            let mut by_site: HashMap<String, Vec<SiteHostname>> =
                HashMap::with_capacity(raw_sites.len());
            for row in tx.query(
                "SELECT site, hostname, kind FROM hostnames WHERE site >= $1 AND site <= $2
                 ORDER BY site, hostname",
                &[&first, &last],
            )? {
                by_site
                    .entry(row.try_get(0)?)
                    .or_default()
                    .push(site_hostname(
                        &row.try_get::<_, String>(1)?,
                        &row.try_get::<_, String>(2)?,
                    )?);
            }
            let sites = raw_sites
                .into_iter()
                .map(|raw| {
                    let hostnames = by_site.remove(&raw.name).unwrap_or_default();
                    raw.decode(hostnames)
                })
                .collect::<Result<Vec<_>>>()?;
            let certificates = tx
                .query(
                    &format!(
                        "SELECT {COVERAGE_COLUMNS} FROM certificates
                         WHERE superseded_at IS NULL AND site >= $1 AND site <= $2
                         ORDER BY not_after DESC, id DESC"
                    ),
                    &[&first, &last],
                )?
                .iter()
                .map(|row| {
                    Ok(CertificateCoverage {
                        id: row.try_get(0)?,
                        site: row.try_get(1)?,
                        names: names_from_json(&row.try_get::<_, String>(2)?)?,
                        not_before: from_ts(row.try_get(3)?)?,
                        not_after: from_ts(row.try_get(4)?)?,
                        serial: row.try_get(5)?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            tx.commit()?;
            Ok(super::pair_sites_with_certificates(sites, certificates))
        })
    }

    fn certificate(&self, id: i64) -> Result<Option<StoredCertificate>> {
        self.connections.run(move |client| {
            client
                .query_opt(
                    &format!("SELECT {CERT_COLUMNS} FROM certificates WHERE id = $1"),
                    &[&id],
                )?
                .map(|row| RawCertificate::from_pg(&row)?.decode())
                .transpose()
        })
    }
}
