//! Sites, their hostnames and policy, in SQLite.

use rusqlite::{OptionalExtension, params};
use time::OffsetDateTime;

use super::SqliteStore;
use super::queries::{
    insert_event, insert_hostname, load_all_sites, load_site, load_sites_page, require_site,
};
use crate::error::Result;
use crate::hostname::Hostname;
use crate::store::rows::{enum_text, ts};
use crate::store::rules::{
    hostname_added_message, hostname_removed_message, no_such_site, not_a_hostname_of,
    other_hostnames, primary_not_removable, site_created_message, site_exists,
};
use crate::store::{
    CertificateCoverage, HostnameKind, NewSite, Site, SiteEventKind, SitePolicy, SiteStore,
    pair_sites_with_certificates, validate_site_name,
};

impl SiteStore for SqliteStore {
    fn sites_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(Site, Vec<CertificateCoverage>)>> {
        let conn = self.lock();
        let (sites, certificates) = load_sites_page(&conn, after.unwrap_or(""), limit)?;
        Ok(pair_sites_with_certificates(sites, certificates))
    }

    fn create_site(
        &self,
        site: NewSite,
        now: OffsetDateTime,
        issue_at: OffsetDateTime,
    ) -> Result<Site> {
        validate_site_name(&site.name)?;
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let exists: bool = tx.query_row(
            "SELECT EXISTS(SELECT 1 FROM sites WHERE name = ?1)",
            [&site.name],
            |row| row.get(0),
        )?;
        if exists {
            return Err(site_exists(&site.name));
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
        let others = other_hostnames(&site);
        for (name, kind) in &others {
            insert_hostname(&tx, &site.name, name, *kind, now)?;
        }
        insert_event(
            &tx,
            &site.name,
            now,
            &SiteEventKind::SiteCreated,
            &site_created_message(1 + others.len()),
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
            return Err(no_such_site(name));
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
            return Err(no_such_site(name));
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
            &hostname_added_message(kind, name),
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
            return Err(primary_not_removable(site, name));
        }
        let tx = conn.transaction()?;
        let removed = tx.execute(
            "DELETE FROM hostnames WHERE hostname = ?1 AND site = ?2",
            params![name.as_str(), site],
        )?;
        if removed == 0 {
            return Err(not_a_hostname_of(site, name));
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
            &hostname_removed_message(name),
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
}
