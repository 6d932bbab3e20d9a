//! Stored certificates: serving, superseding, coverage, in SQLite.

use rusqlite::{OptionalExtension, params};
use time::OffsetDateTime;

use super::SqliteStore;
use super::queries::{coverage_from_row, insert_event, query_certificates};
use crate::error::Result;
use crate::hostname::Hostname;
use crate::store::rows::{
    CERT_COLUMNS, COVERAGE_COLUMNS, RawCertificate, names_from_json, names_json, ts,
};
use crate::store::rules::{certificate_issued_message, superseded};
use crate::store::{
    CertificateCoverage, CertificateStore, NewCertificate, SiteEventKind, StoredCertificate,
};
use autohttps_filter::policy::wildcard_name;

impl CertificateStore for SqliteStore {
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
        let older = older
            .into_iter()
            .map(|(old_id, names)| Ok((old_id, names_from_json(&names)?)))
            .collect::<Result<Vec<_>>>()?;
        for old_id in superseded(&certificate.names, older, &wanted) {
            tx.execute(
                "UPDATE certificates SET superseded_at = ?2 WHERE id = ?1",
                params![old_id, ts(now)],
            )?;
        }
        if let Some(order) = completes_order {
            tx.execute("DELETE FROM orders WHERE id = ?1", [order])?;
        }
        insert_event(
            &tx,
            &certificate.site,
            now,
            &SiteEventKind::CertificateIssued,
            &certificate_issued_message(&certificate),
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
            coverage.push(coverage_from_row(row)?);
        }
        Ok(coverage)
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
