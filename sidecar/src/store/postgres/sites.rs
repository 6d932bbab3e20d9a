//! Sites, their hostnames and policy, in PostgreSQL.

use time::OffsetDateTime;

use super::PostgresStore;
use super::connections::conflict_on_duplicate;
use super::queries::{
    hostname_row, insert_event, insert_hostname, load_all_sites, load_site, require_site, sql_limit,
};
use super::statements::Prepared as _;
use crate::error::{Error, Result};
use crate::hostname::Hostname;
use crate::store::rows::{
    COVERAGE_COLUMNS, RawSite, SITE_COLUMNS, enum_text, from_ts, names_from_json,
    sites_with_hostnames, ts,
};
use crate::store::rules::{
    hostname_added_message, hostname_removed_message, no_such_site, not_a_hostname_of,
    other_hostnames, primary_not_removable, site_created_message, site_exists,
};
use crate::store::{
    CertificateCoverage, HostnameKind, NewSite, Site, SiteEventKind, SitePolicy, SiteStore,
    pair_sites_with_certificates, validate_site_name,
};

impl SiteStore for PostgresStore {
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
                .query_p(
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
            let hostnames = tx.query_p(
                "SELECT site, hostname, kind FROM hostnames WHERE site >= $1 AND site <= $2
                 ORDER BY site, hostname",
                &[&first, &last],
            )?;
            let sites = sites_with_hostnames(raw_sites, hostnames.iter().map(hostname_row))?;
            let certificates = tx
                .query_p(
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
            Ok(pair_sites_with_certificates(sites, certificates))
        })
    }

    fn create_site(
        &self,
        site: NewSite,
        now: OffsetDateTime,
        issue_at: OffsetDateTime,
    ) -> Result<Site> {
        validate_site_name(&site.name)?;
        let created = self.connections.run(move |client| {
            let mut tx = client.transaction()?;
            let present: bool = tx
                .query_one_p(
                    "SELECT EXISTS(SELECT 1 FROM sites WHERE name = $1)",
                    &[&site.name],
                )?
                .try_get(0)?;
            if present {
                return Err(site_exists(&site.name));
            }
            conflict_on_duplicate(
                tx.execute_p(
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
                || site_exists(&site.name),
            )?;
            insert_hostname(&mut tx, &site.name, &site.primary, HostnameKind::Primary, now)?;
            let others = other_hostnames(&site);
            for (name, kind) in &others {
                insert_hostname(&mut tx, &site.name, name, *kind, now)?;
            }
            insert_event(
                &mut tx,
                &site.name,
                now,
                &SiteEventKind::SiteCreated,
                &site_created_message(1 + others.len()),
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
            let mut tx = client.transaction()?;
            if tx.execute_p("DELETE FROM sites WHERE name = $1", &[&name])? == 0 {
                return Err(no_such_site(&name));
            }
            tx.execute_p("DELETE FROM events WHERE site = $1", &[&name])?;
            tx.execute_p("DELETE FROM mixed_content WHERE site = $1", &[&name])?;
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
            let mut tx = client.transaction()?;
            let changed = tx.execute_p(
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
                return Err(no_such_site(&name));
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
            let mut tx = client.transaction()?;
            let primary = require_site(&mut tx, &site)?.primary;
            let kind = HostnameKind::of(&name, &primary);
            insert_hostname(&mut tx, &site, &name, kind, now)?;
            tx.execute_p(
                "UPDATE sites SET next_attempt_at = $2, failures = 0 WHERE name = $1",
                &[&site, &ts(issue_at)],
            )?;
            insert_event(
                &mut tx,
                &site,
                now,
                &SiteEventKind::HostnameAdded,
                &hostname_added_message(kind, &name),
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
            let mut tx = client.transaction()?;
            let current = require_site(&mut tx, &site)?;
            if current.primary == name {
                return Err(primary_not_removable(&site, &name));
            }
            let removed = tx.execute_p(
                "DELETE FROM hostnames WHERE hostname = $1 AND site = $2",
                &[&name.as_str(), &site],
            )?;
            if removed == 0 {
                return Err(not_a_hostname_of(&site, &name));
            }
            tx.execute_p(
                "UPDATE sites SET next_attempt_at = $2, failures = 0 WHERE name = $1",
                &[&site, &ts(issue_at)],
            )?;
            // A canonical host must be one of the site's names: removing it clears it.
            tx.execute_p(
                "UPDATE sites SET canonical_host = NULL WHERE name = $1 AND canonical_host = $2",
                &[&site, &name.as_str()],
            )?;
            insert_event(
                &mut tx,
                &site,
                now,
                &SiteEventKind::HostnameRemoved,
                &hostname_removed_message(&name),
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
                .query_opt_p(
                    "SELECT site FROM hostnames WHERE hostname = $1",
                    &[&name.as_str()],
                )?
                .map(|row| row.try_get(0).map_err(Error::from))
                .transpose()
        })
    }
}
