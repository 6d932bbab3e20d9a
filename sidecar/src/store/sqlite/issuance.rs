//! The issuance schedule and the attempt lease, in SQLite.

use rusqlite::{OptionalExtension, params};
use time::OffsetDateTime;

use super::SqliteStore;
use super::queries::{insert_event, load_site, next_attempt_of};
use crate::error::Result;
use crate::store::rows::{from_ts, ts};
use crate::store::rules::INTERRUPTED_MESSAGE;
use crate::store::rules::no_such_site;
use crate::store::{
    AttemptLease, IssuanceStore, SiteEventKind, next_attempt_after, still_the_lease,
};

impl IssuanceStore for SqliteStore {
    fn request_issuance(&self, site: &str, at: OffsetDateTime, regenerate: bool) -> Result<()> {
        let changed = self.lock().execute(
            "UPDATE sites SET next_attempt_at = ?2, failures = 0, regenerate = MAX(regenerate, ?3) WHERE name = ?1",
            params![site, ts(at), regenerate],
        )?;
        if changed == 0 {
            return Err(no_such_site(site));
        }
        Ok(())
    }

    fn take_regenerate_request(&self, site: &str) -> Result<bool> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let requested: Option<bool> = tx
            .query_row(
                "SELECT regenerate FROM sites WHERE name = ?1",
                [site],
                |row| row.get(0),
            )
            .optional()?;
        tx.execute("UPDATE sites SET regenerate = 0 WHERE name = ?1", [site])?;
        tx.commit()?;
        Ok(requested.unwrap_or(false))
    }

    fn begin_attempt(
        &self,
        site: &str,
        now: OffsetDateTime,
        lease_until: OffsetDateTime,
    ) -> Result<AttemptLease> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let Some(current) = load_site(&tx, site)? else {
            return Ok(AttemptLease::NoSuchSite);
        };
        let taken = tx.execute(
            "UPDATE sites SET next_attempt_at = ?3, leased_by = ?2, leased_until = ?3
             WHERE name = ?1
               AND (leased_by IS NULL OR leased_by = ?2 OR leased_until IS NULL OR leased_until <= ?4)",
            params![site, self.node_id, ts(lease_until), ts(now)],
        )?;
        if taken == 0 {
            let (node, until): (String, i64) = tx.query_row(
                "SELECT leased_by, leased_until FROM sites WHERE name = ?1",
                [site],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )?;
            return Ok(AttemptLease::HeldElsewhere {
                node,
                until: from_ts(until)?,
            });
        }
        tx.commit()?;
        Ok(AttemptLease::Taken(Box::new(current)))
    }

    fn finish_attempt(
        &self,
        site: &str,
        lease_until: OffsetDateTime,
        next: Option<OffsetDateTime>,
        failures: u32,
        last_problem: Option<&str>,
    ) -> Result<()> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let Some(stored) = next_attempt_of(&tx, site)? else {
            return Ok(());
        };
        let next = next_attempt_after(stored, lease_until, next);
        tx.execute(
            "UPDATE sites SET next_attempt_at = ?2, failures = ?3, last_problem = ?4 WHERE name = ?1",
            params![site, next.map(ts), failures, last_problem],
        )?;
        tx.execute(
            "UPDATE sites SET leased_by = NULL, leased_until = NULL WHERE name = ?1 AND leased_by = ?2",
            params![site, self.node_id],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn renew_lease(
        &self,
        site: &str,
        held_until: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<bool> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let renewed = tx.execute(
            "UPDATE sites SET leased_until = ?4 WHERE name = ?1 AND leased_by = ?2 AND leased_until = ?3",
            params![site, self.node_id, ts(held_until), ts(until)],
        )?;
        if renewed == 0 {
            return Ok(false);
        }
        if still_the_lease(next_attempt_of(&tx, site)?.flatten(), held_until) {
            tx.execute(
                "UPDATE sites SET next_attempt_at = ?2 WHERE name = ?1",
                params![site, ts(until)],
            )?;
        }
        tx.commit()?;
        Ok(true)
    }

    fn release_own_leases(&self, now: OffsetDateTime) -> Result<Vec<String>> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let held: Vec<(String, Option<i64>, i64)> = tx
            .prepare(
                "SELECT name, next_attempt_at, leased_until FROM sites
                 WHERE leased_by = ?1 AND leased_until IS NOT NULL ORDER BY name",
            )?
            .query_map([&self.node_id], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        let mut released = Vec::with_capacity(held.len());
        for (name, stored, leased_until) in held {
            let stored = stored.map(from_ts).transpose()?;
            let next = next_attempt_after(stored, from_ts(leased_until)?, Some(now));
            tx.execute(
                "UPDATE sites SET next_attempt_at = ?2, leased_by = NULL, leased_until = NULL
                 WHERE name = ?1",
                params![name, next.map(ts)],
            )?;
            insert_event(
                &tx,
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
    }

    fn schedule(
        &self,
        site: &str,
        next_attempt_at: Option<OffsetDateTime>,
        failures: u32,
        last_problem: Option<&str>,
    ) -> Result<()> {
        self.lock().execute(
            "UPDATE sites SET next_attempt_at = ?2, failures = ?3, last_problem = ?4 WHERE name = ?1",
            params![site, next_attempt_at.map(ts), failures, last_problem],
        )?;
        Ok(())
    }

    fn due_sites(&self, now: OffsetDateTime) -> Result<Vec<String>> {
        Ok(self
            .lock()
            .prepare(
                "SELECT name FROM sites WHERE next_attempt_at <= ?1
                   AND (leased_by IS NULL OR leased_by = ?2 OR leased_until <= ?1)
                 ORDER BY next_attempt_at",
            )?
            .query_map(params![ts(now), self.node_id], |row| row.get(0))?
            .collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn next_due(&self) -> Result<Option<OffsetDateTime>> {
        let next: Option<i64> = self.lock().query_row(
            "SELECT MIN(CASE WHEN leased_by <> ?1 AND leased_until > next_attempt_at
                             THEN leased_until ELSE next_attempt_at END)
             FROM sites",
            [&self.node_id],
            |row| row.get(0),
        )?;
        next.map(from_ts).transpose()
    }
}
