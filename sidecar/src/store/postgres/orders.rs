//! ACME orders in flight, in PostgreSQL.

use time::OffsetDateTime;

use super::PostgresStore;
use super::queries::insert_event;
use super::statements::Prepared as _;
use crate::error::Result;
use crate::hostname::Hostname;
use crate::store::rows::{from_ts, names_from_json, names_json, ts};
use crate::store::rules::order_created_message;
use crate::store::{OrderInFlight, OrderStore, PrivateKeyPem, SiteEventKind};

impl OrderStore for PostgresStore {
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
                .query_one_p(
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
                &order_created_message(&names, &order_url),
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
                .query_p(
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
            client.execute_p("DELETE FROM orders WHERE id = $1", &[&id])?;
            Ok(())
        })
    }
}
