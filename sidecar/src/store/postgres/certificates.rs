//! Stored certificates: serving, superseding, coverage, in PostgreSQL.

use std::collections::HashSet;

use time::OffsetDateTime;

use super::PostgresStore;
use super::queries::{insert_event, query_certificates};
use super::statements::Prepared as _;
use crate::error::Result;
use crate::hostname::Hostname;
use crate::store::rows::{CERT_COLUMNS, RawCertificate, names_from_json, names_json, ts};
use crate::store::rules::{certificate_issued_message, superseded};
use crate::store::{CertificateStore, NewCertificate, SiteEventKind, StoredCertificate};
use autohttps_filter::policy::wildcard_name;

impl CertificateStore for PostgresStore {
    fn certificate(&self, id: i64) -> Result<Option<StoredCertificate>> {
        self.connections.run(move |client| {
            client
                .query_opt_p(
                    &format!("SELECT {CERT_COLUMNS} FROM certificates WHERE id = $1"),
                    &[&id],
                )?
                .map(|row| RawCertificate::from_pg(&row)?.decode())
                .transpose()
        })
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
            let row = client.query_opt_p(
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
            let mut tx = client.transaction()?;
            let id: i64 = tx
                .query_one_p(
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
                tx.execute_p(
                    "INSERT INTO certificate_names (certificate_id, hostname) VALUES ($1, $2)
                     ON CONFLICT DO NOTHING",
                    &[&id, &name.as_str()],
                )?;
            }
            let wanted: HashSet<String> = tx
                .query_p("SELECT hostname FROM hostnames WHERE site = $1", &[&certificate.site])?
                .iter()
                .map(|row| row.try_get(0))
                .collect::<std::result::Result<_, _>>()?;
            let older = tx.query_p(
                "SELECT id, names FROM certificates WHERE site = $1 AND superseded_at IS NULL AND id <> $2",
                &[&certificate.site, &id],
            )?;
            let older = older
                .iter()
                .map(|row| Ok((row.try_get::<_, i64>(0)?, names_from_json(row.try_get(1)?)?)))
                .collect::<Result<Vec<_>>>()?;
            for old_id in superseded(&certificate.names, older, &wanted) {
                tx.execute_p(
                    "UPDATE certificates SET superseded_at = $2 WHERE id = $1",
                    &[&old_id, &ts(now)],
                )?;
            }
            if let Some(order) = completes_order {
                tx.execute_p("DELETE FROM orders WHERE id = $1", &[&order])?;
            }
            insert_event(
                &mut tx,
                &certificate.site,
                now,
                &SiteEventKind::CertificateIssued,
                &certificate_issued_message(&certificate),
                None,
                None,
            )?;
            let row = tx.query_one_p(
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

    fn all_current_certificates(&self) -> Result<Vec<StoredCertificate>> {
        self.connections
            .run(|client| query_certificates(client, None))
    }
}
