//! The PostgreSQL schema: migrations numbered like the SQLite store's (migration `n` here brings
//! the same logical schema as migration `n` there; see [`crate::store::SCHEMA_VERSION`]).

use postgres::Client;

use crate::error::{Error, Result};

/// The advisory lock key the change-log trigger takes as a transaction commits and holds until
/// it has committed ("autohttps" folded into an i64; the trigger writes it as a number): change
/// sequence numbers are then committed in order, so a reader that saw `seq` never later finds
/// a smaller one appear.
#[cfg(test)]
const CHANGE_LOG_LOCK: i64 = 0x6175_746f_6874_7470;

/// The advisory lock a node holds while it compacts the change log (`pg_try_advisory_xact_lock`:
/// the others skip instead of waiting).
pub(super) const COMPACTION_LOCK: i64 = 0x6175_746f_636f_6d70;

/// The advisory lock key held while migrating, so nodes starting together migrate once.
const MIGRATION_LOCK: i64 = 0x6175_746f_6d69_6772;

/// Schema migrations, applied in order; `autohttps_schema.version` records how many ran.
pub(crate) const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE sites (
    name TEXT PRIMARY KEY,
    primary_hostname TEXT NOT NULL,
    https_mode TEXT NOT NULL,
    redirect TEXT NOT NULL,
    hsts_enabled BOOLEAN NOT NULL,
    hsts_max_age BIGINT NOT NULL,
    mixed_content TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    next_attempt_at BIGINT,
    failures BIGINT NOT NULL DEFAULT 0,
    last_problem TEXT,
    regenerate BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE TABLE hostnames (
    hostname TEXT PRIMARY KEY,
    site TEXT NOT NULL REFERENCES sites(name) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    added_at BIGINT NOT NULL
);
CREATE INDEX hostnames_site ON hostnames(site);
CREATE TABLE certificates (
    id BIGSERIAL PRIMARY KEY,
    site TEXT NOT NULL REFERENCES sites(name) ON DELETE CASCADE,
    names TEXT NOT NULL,
    chain_pem TEXT NOT NULL,
    key_pem TEXT NOT NULL,
    not_before BIGINT NOT NULL,
    not_after BIGINT NOT NULL,
    serial TEXT NOT NULL,
    ari_id TEXT,
    issued_at BIGINT NOT NULL,
    superseded_at BIGINT
);
CREATE INDEX certificates_site ON certificates(site);
CREATE TABLE certificate_names (
    certificate_id BIGINT NOT NULL REFERENCES certificates(id) ON DELETE CASCADE,
    hostname TEXT NOT NULL,
    PRIMARY KEY (hostname, certificate_id)
);
CREATE TABLE orders (
    id BIGSERIAL PRIMARY KEY,
    site TEXT NOT NULL REFERENCES sites(name) ON DELETE CASCADE,
    names TEXT NOT NULL,
    order_url TEXT NOT NULL,
    key_pem TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE accounts (
    directory_url TEXT PRIMARY KEY,
    credentials TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE events (
    id BIGSERIAL PRIMARY KEY,
    site TEXT NOT NULL,
    at BIGINT NOT NULL,
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
    reports BIGINT NOT NULL,
    first_seen BIGINT NOT NULL,
    last_seen BIGINT NOT NULL,
    PRIMARY KEY (site, page, resource)
);
"#,
    r#"
ALTER TABLE sites ADD COLUMN hsts_include_subdomains BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE sites ADD COLUMN hsts_preload BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE sites ADD COLUMN canonical_host TEXT;
"#,
    r#"
ALTER TABLE mixed_content ADD COLUMN bytes BIGINT NOT NULL DEFAULT 0;
UPDATE mixed_content SET bytes = octet_length(page) + octet_length(resource)
    + octet_length(directive) + 64;
CREATE INDEX mixed_content_eviction ON mixed_content(site, reports, last_seen);
"#,
    // The change log, as in SQLite, plus a NOTIFY so other nodes wake at once. The trigger takes
    // the change-log lock first (see CHANGE_LOG_LOCK). The trigger's argument names the column
    // holding the site id.
    r#"
CREATE TABLE site_changes (
    seq BIGSERIAL PRIMARY KEY,
    site TEXT NOT NULL,
    at BIGINT NOT NULL
);
CREATE FUNCTION autohttps_log_site_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    changed TEXT;
    logged BIGINT;
BEGIN
    IF TG_OP = 'DELETE' THEN
        changed := to_jsonb(OLD) ->> TG_ARGV[0];
    ELSE
        changed := to_jsonb(NEW) ->> TG_ARGV[0];
    END IF;
    PERFORM pg_advisory_xact_lock(7022647215796810864);
    INSERT INTO site_changes (site, at) VALUES (changed, extract(epoch FROM now())::BIGINT)
        RETURNING seq INTO logged;
    PERFORM pg_notify('autohttps_changes', logged::TEXT);
    RETURN NULL;
END
$$;
CREATE TRIGGER site_changes_site AFTER INSERT OR DELETE ON sites
    FOR EACH ROW EXECUTE FUNCTION autohttps_log_site_change('name');
CREATE TRIGGER site_changes_policy AFTER UPDATE OF
    https_mode, redirect, hsts_enabled, hsts_max_age, hsts_include_subdomains, hsts_preload,
    mixed_content, canonical_host, primary_hostname ON sites
    FOR EACH ROW EXECUTE FUNCTION autohttps_log_site_change('name');
CREATE TRIGGER site_changes_hostname AFTER INSERT OR DELETE ON hostnames
    FOR EACH ROW EXECUTE FUNCTION autohttps_log_site_change('site');
CREATE TRIGGER site_changes_certificate AFTER INSERT OR UPDATE OF superseded_at ON certificates
    FOR EACH ROW EXECUTE FUNCTION autohttps_log_site_change('site');
"#,
    r#"
ALTER TABLE sites ADD COLUMN leased_by TEXT;
ALTER TABLE sites ADD COLUMN leased_until BIGINT;
CREATE TABLE acme_challenges (
    token TEXT PRIMARY KEY,
    key_authorization TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
"#,
    // The change log is written at commit: the same triggers, deferred, so the change-log lock
    // (which orders the sequence numbers fleet-wide) is taken at the very end of a transaction
    // and held only while it commits, not across every statement the client sends before.
    // Holding it for a whole transaction made every node's writes queue behind one another's
    // round trips under a burst. A deferred trigger still sees the row as it was written.
    r#"
DROP TRIGGER site_changes_site ON sites;
DROP TRIGGER site_changes_policy ON sites;
DROP TRIGGER site_changes_hostname ON hostnames;
DROP TRIGGER site_changes_certificate ON certificates;
CREATE CONSTRAINT TRIGGER site_changes_site AFTER INSERT OR DELETE ON sites
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION autohttps_log_site_change('name');
CREATE CONSTRAINT TRIGGER site_changes_policy AFTER UPDATE OF
    https_mode, redirect, hsts_enabled, hsts_max_age, hsts_include_subdomains, hsts_preload,
    mixed_content, canonical_host, primary_hostname ON sites
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION autohttps_log_site_change('name');
CREATE CONSTRAINT TRIGGER site_changes_hostname AFTER INSERT OR DELETE ON hostnames
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION autohttps_log_site_change('site');
CREATE CONSTRAINT TRIGGER site_changes_certificate AFTER INSERT OR UPDATE OF superseded_at
    ON certificates
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION autohttps_log_site_change('site');
"#,
];

/// Brings the database to the newest schema in one transaction, under an advisory lock so that
/// nodes starting together do not migrate twice. Refuses a database newer than this build.
pub(super) fn migrate(client: &mut Client) -> Result<usize> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS autohttps_schema (version BIGINT NOT NULL)")?;
    let applied: Option<i64> = tx
        .query_opt("SELECT version FROM autohttps_schema", &[])?
        .map(|row| row.get(0));
    let applied = usize::try_from(applied.unwrap_or(0)).unwrap_or(usize::MAX);
    if applied > MIGRATIONS.len() {
        return Err(Error::CorruptStore(format!(
            "the database has schema version {applied} but this build knows {}; upgrade autohttps",
            MIGRATIONS.len()
        )));
    }
    for migration in &MIGRATIONS[applied..] {
        tx.batch_execute(migration)?;
    }
    let version = i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX);
    tx.execute("DELETE FROM autohttps_schema", &[])?;
    tx.execute(
        "INSERT INTO autohttps_schema (version) VALUES ($1)",
        &[&version],
    )?;
    tx.commit()?;
    Ok(MIGRATIONS.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_change_log_trigger_takes_the_lock_the_store_takes() {
        let lock = format!("pg_advisory_xact_lock({CHANGE_LOG_LOCK})");
        assert!(
            MIGRATIONS.iter().any(|migration| migration.contains(&lock)),
            "the trigger must take {lock}"
        );
    }
}
