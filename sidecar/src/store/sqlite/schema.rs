//! The SQLite store's schema: its migrations, in order.

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
pub(in crate::store) const MIGRATIONS: &[&str] = &[
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
    // PostgreSQL's change-log triggers became deferred (run at commit). SQLite has one writer
    // at a time, so its triggers stay as they are: the schemas are still the same.
    "",
];
