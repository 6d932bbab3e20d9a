//! The ACME account and HTTP-01 challenges, in PostgreSQL.

use time::OffsetDateTime;

use super::PostgresStore;
use super::statements::Prepared as _;
use crate::error::{Error, Result};
use crate::store::rows::ts;
use crate::store::{AcmeStore, CHALLENGE_LIFETIME};

impl AcmeStore for PostgresStore {
    fn account(&self, directory_url: &str) -> Result<Option<String>> {
        let directory_url = directory_url.to_owned();
        self.connections.run(move |client| {
            client
                .query_opt_p(
                    "SELECT credentials FROM accounts WHERE directory_url = $1",
                    &[&directory_url],
                )?
                .map(|row| row.try_get(0).map_err(Error::from))
                .transpose()
        })
    }

    fn save_account(
        &self,
        directory_url: &str,
        credentials_json: &str,
        now: OffsetDateTime,
    ) -> Result<String> {
        let (directory_url, credentials) = (directory_url.to_owned(), credentials_json.to_owned());
        self.connections.run(move |client| {
            client.execute_p(
                "INSERT INTO accounts (directory_url, credentials, created_at) VALUES ($1, $2, $3)
                 ON CONFLICT (directory_url) DO NOTHING",
                &[&directory_url, &credentials, &ts(now)],
            )?;
            Ok(client
                .query_one_p(
                    "SELECT credentials FROM accounts WHERE directory_url = $1",
                    &[&directory_url],
                )?
                .try_get(0)?)
        })
    }

    fn put_challenge(
        &self,
        token: &str,
        key_authorization: &str,
        now: OffsetDateTime,
    ) -> Result<()> {
        let (token, key_authorization) = (token.to_owned(), key_authorization.to_owned());
        self.connections.run(move |client| {
            client.execute_p(
                "DELETE FROM acme_challenges WHERE created_at < $1",
                &[&ts(now - CHALLENGE_LIFETIME)],
            )?;
            client.execute_p(
                "INSERT INTO acme_challenges (token, key_authorization, created_at) VALUES ($1, $2, $3)
                 ON CONFLICT (token) DO UPDATE SET key_authorization = excluded.key_authorization",
                &[&token, &key_authorization, &ts(now)],
            )?;
            Ok(())
        })
    }

    fn challenge(&self, token: &str) -> Result<Option<String>> {
        let token = token.to_owned();
        self.connections.run(move |client| {
            client
                .query_opt_p(
                    "SELECT key_authorization FROM acme_challenges WHERE token = $1",
                    &[&token],
                )?
                .map(|row| row.try_get(0).map_err(Error::from))
                .transpose()
        })
    }

    fn delete_challenge(&self, token: &str) -> Result<()> {
        let token = token.to_owned();
        self.connections.run(move |client| {
            client.execute_p("DELETE FROM acme_challenges WHERE token = $1", &[&token])?;
            Ok(())
        })
    }
}
