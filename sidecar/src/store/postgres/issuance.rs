//! The issuance schedule and the attempt lease, in PostgreSQL.

use time::OffsetDateTime;

use super::PostgresStore;
use super::queries::{insert_event, next_attempt_for_update, require_site};
use super::statements::Prepared as _;
use crate::error::{Error, Result};
use crate::store::rows::{from_ts, ts};
use crate::store::rules::INTERRUPTED_MESSAGE;
use crate::store::rules::no_such_site;
use crate::store::{
    AttemptLease, IssuanceStore, SiteEventKind, next_attempt_after, still_the_lease,
};

impl IssuanceStore for PostgresStore {
    fn request_issuance(&self, site: &str, at: OffsetDateTime, regenerate: bool) -> Result<()> {
        let site = site.to_owned();
        self.connections.run(move |client| {
            let changed = client.execute_p(
                "UPDATE sites SET next_attempt_at = $2, failures = 0, regenerate = (regenerate OR $3)
                 WHERE name = $1",
                &[&site, &ts(at), &regenerate],
            )?;
            if changed == 0 {
                return Err(no_such_site(&site));
            }
            Ok(())
        })
    }

    fn take_regenerate_request(&self, site: &str) -> Result<bool> {
        let site = site.to_owned();
        self.connections.run(move |client| {
            // The old value, read and cleared in one statement.
            let row = client.query_opt_p(
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
            let taken = tx.execute_p(
                "UPDATE sites SET next_attempt_at = $3, leased_by = $2, leased_until = $3
                 WHERE name = $1
                   AND (leased_by IS NULL OR leased_by = $2 OR leased_until IS NULL
                        OR leased_until <= $4)",
                &[&site, &node, &ts(lease_until), &ts(now)],
            )?;
            if taken == 0 {
                let holder = tx.query_opt_p(
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
            tx.execute_p(
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
            let held = tx.query_opt_p(
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
            tx.execute_p(
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
            let held = tx.query_p(
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
                tx.execute_p(
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
            client.execute_p(
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
                .query_p(
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
                .query_one_p(
                    "SELECT MIN(CASE WHEN leased_by <> $1 AND leased_until > next_attempt_at
                                     THEN leased_until ELSE next_attempt_at END)
                     FROM sites",
                    &[&node],
                )?
                .try_get(0)?)
        })?;
        next.map(from_ts).transpose()
    }
}
