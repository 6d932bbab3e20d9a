//! Prepared statements kept per connection. A statement sent as text is parsed and planned
//! by PostgreSQL on every call and costs a second round trip (Parse/Describe, then
//! Bind/Execute); a fleet's nodes re-read the change log and the changed sites after every
//! change, so most of the database's work was that parsing and planning (measured in the
//! fleet bench with `pg_stat_statements`: planning alone took more time than executing).
//!
//! Each connection thread owns one connection ([`super::connections`]); its statements live
//! in a thread-local cache tagged with that connection, and are used only while the thread
//! runs work on it ([`on_connection`]). Anywhere else (the listener, the import command,
//! migrations) a statement is sent as text as before, so a statement can never be used on a
//! connection that did not prepare it.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use postgres::types::ToSql;
use postgres::{GenericClient, Row, Statement};

thread_local! {
    /// The statements prepared on this thread's current connection.
    static PREPARED: RefCell<HashMap<String, Statement>> = RefCell::new(HashMap::new());
    /// Whether this thread is running work on the connection the cache belongs to.
    static ON_CONNECTION: Cell<bool> = const { Cell::new(false) };
}

/// This thread's connection was replaced: the statements prepared on the old one are gone.
pub(super) fn new_connection() {
    PREPARED.with(|prepared| prepared.borrow_mut().clear());
}

/// Runs `work` on this thread's current connection, with its prepared statements.
pub(super) fn on_connection<T>(work: impl FnOnce() -> T) -> T {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            ON_CONNECTION.with(|on| on.set(false));
        }
    }
    ON_CONNECTION.with(|on| on.set(true));
    let _reset = Reset;
    work()
}

/// The statement for `sql`, prepared once per connection; `None` outside [`on_connection`].
fn prepared(
    client: &mut impl GenericClient,
    sql: &str,
) -> Result<Option<Statement>, postgres::Error> {
    if !ON_CONNECTION.with(Cell::get) {
        return Ok(None);
    }
    if let Some(statement) = PREPARED.with(|prepared| prepared.borrow().get(sql).cloned()) {
        return Ok(Some(statement));
    }
    let statement = client.prepare(sql)?;
    PREPARED.with(|prepared| {
        prepared
            .borrow_mut()
            .insert(sql.to_owned(), statement.clone())
    });
    Ok(Some(statement))
}

/// `query`, `query_one`, `query_opt` and `execute` with the statement prepared once per
/// connection (see the module's documentation).
pub(super) trait Prepared: GenericClient + Sized {
    fn query_p(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, postgres::Error> {
        match prepared(self, sql)? {
            Some(statement) => self.query(&statement, params),
            None => self.query(sql, params),
        }
    }

    fn query_one_p(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, postgres::Error> {
        match prepared(self, sql)? {
            Some(statement) => self.query_one(&statement, params),
            None => self.query_one(sql, params),
        }
    }

    fn query_opt_p(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, postgres::Error> {
        match prepared(self, sql)? {
            Some(statement) => self.query_opt(&statement, params),
            None => self.query_opt(sql, params),
        }
    }

    fn execute_p(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, postgres::Error> {
        match prepared(self, sql)? {
            Some(statement) => self.execute(&statement, params),
            None => self.execute(sql, params),
        }
    }
}

impl<C: GenericClient> Prepared for C {}
