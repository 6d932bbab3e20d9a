//! The ACME account and HTTP-01 challenges, in SQLite.

use rusqlite::{OptionalExtension, params};
use time::OffsetDateTime;

use super::SqliteStore;
use crate::error::Result;
use crate::store::rows::ts;
use crate::store::{AcmeStore, CHALLENGE_LIFETIME};

impl AcmeStore for SqliteStore {
    fn account(&self, directory_url: &str) -> Result<Option<String>> {
        Ok(self
            .lock()
            .query_row(
                "SELECT credentials FROM accounts WHERE directory_url = ?1",
                [directory_url],
                |row| row.get(0),
            )
            .optional()?)
    }

    fn save_account(
        &self,
        directory_url: &str,
        credentials_json: &str,
        now: OffsetDateTime,
    ) -> Result<String> {
        let conn = self.lock();
        conn.execute(
            "INSERT INTO accounts (directory_url, credentials, created_at) VALUES (?1, ?2, ?3)
             ON CONFLICT(directory_url) DO NOTHING",
            params![directory_url, credentials_json, ts(now)],
        )?;
        Ok(conn.query_row(
            "SELECT credentials FROM accounts WHERE directory_url = ?1",
            [directory_url],
            |row| row.get(0),
        )?)
    }

    fn put_challenge(
        &self,
        token: &str,
        key_authorization: &str,
        now: OffsetDateTime,
    ) -> Result<()> {
        let conn = self.lock();
        conn.execute(
            "DELETE FROM acme_challenges WHERE created_at < ?1",
            [ts(now - CHALLENGE_LIFETIME)],
        )?;
        conn.execute(
            "INSERT INTO acme_challenges (token, key_authorization, created_at) VALUES (?1, ?2, ?3)
             ON CONFLICT(token) DO UPDATE SET key_authorization = excluded.key_authorization",
            params![token, key_authorization, ts(now)],
        )?;
        Ok(())
    }

    fn challenge(&self, token: &str) -> Result<Option<String>> {
        Ok(self
            .lock()
            .query_row(
                "SELECT key_authorization FROM acme_challenges WHERE token = ?1",
                [token],
                |row| row.get(0),
            )
            .optional()?)
    }

    fn delete_challenge(&self, token: &str) -> Result<()> {
        self.lock()
            .execute("DELETE FROM acme_challenges WHERE token = ?1", [token])?;
        Ok(())
    }
}
