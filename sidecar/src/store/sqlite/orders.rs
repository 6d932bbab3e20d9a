//! ACME orders in flight, in SQLite.

use rusqlite::params;
use time::OffsetDateTime;

use super::SqliteStore;
use super::queries::insert_event;
use crate::error::Result;
use crate::hostname::Hostname;
use crate::store::rows::{from_ts, names_from_json, names_json, ts};
use crate::store::rules::order_created_message;
use crate::store::{OrderInFlight, OrderStore, PrivateKeyPem, SiteEventKind};

impl OrderStore for SqliteStore {
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
            &order_created_message(names, order_url),
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
}
