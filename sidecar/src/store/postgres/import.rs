//! Moving a single node to a fleet: copying a SQLite store (sites, names, policies,
//! certificates and keys, orders, the ACME account, events, mixed-content findings) into a
//! PostgreSQL store, in one transaction, keeping row ids.

use postgres::types::ToSql;
use rusqlite::types::Value;

use super::{PostgresStore, PostgresStoreOptions};
use crate::config::StoreLocation;
use crate::error::{Error, Result};
use crate::store::{LOCAL_NODE, SqliteStore};

/// `autohttps store copy --from sqlite:PATH --to postgres://…`: copies the SQLite store at
/// `from` into the PostgreSQL store at `to` (see [`PostgresStore::import_sqlite`]).
pub fn copy_store(from: &str, to: &str, replace: bool) -> Result<CopyReport> {
    let StoreLocation::Sqlite(path) = StoreLocation::parse(from)? else {
        return Err(Error::InvalidInput(
            "--from must be a SQLite store: sqlite:PATH (the file of a single node)".into(),
        ));
    };
    let StoreLocation::Postgres(url) = StoreLocation::parse(to)? else {
        return Err(Error::InvalidInput(
            "--to must be a PostgreSQL store: postgres://USER:PASSWORD@HOST:PORT/DATABASE".into(),
        ));
    };
    if !path.is_file() {
        return Err(Error::NotFound(format!(
            "no SQLite store at {}; give the autohttps.db file of the node (in its data_dir)",
            path.display()
        )));
    }
    let source = SqliteStore::open(&path)?;
    let target = PostgresStore::new(PostgresStoreOptions::new(url, LOCAL_NODE))?;
    target.import_sqlite(&source, replace)
}

/// How a column is stored in PostgreSQL (SQLite keeps integers and booleans alike).
#[derive(Debug, Clone, Copy)]
enum Kind {
    Integer,
    Boolean,
    Text,
}

use Kind::{Boolean, Integer, Text};

/// A table to copy: its columns, and whether its `id` comes from a sequence.
struct Table {
    name: &'static str,
    columns: &'static [(&'static str, Kind)],
    id_sequence: bool,
}

/// The tables copied, parents first. Not copied: issuance leases (the single node's lease
/// means nothing to the fleet), HTTP-01 tokens (short-lived), and the change log (the copy's
/// own inserts write the target's log, whose sequence must never go back).
const TABLES: &[Table] = &[
    Table {
        name: "sites",
        columns: &[
            ("name", Text),
            ("primary_hostname", Text),
            ("https_mode", Text),
            ("redirect", Text),
            ("hsts_enabled", Boolean),
            ("hsts_max_age", Integer),
            ("mixed_content", Text),
            ("created_at", Integer),
            ("next_attempt_at", Integer),
            ("failures", Integer),
            ("last_problem", Text),
            ("regenerate", Boolean),
            ("hsts_include_subdomains", Boolean),
            ("hsts_preload", Boolean),
            ("canonical_host", Text),
        ],
        id_sequence: false,
    },
    Table {
        name: "hostnames",
        columns: &[
            ("hostname", Text),
            ("site", Text),
            ("kind", Text),
            ("added_at", Integer),
        ],
        id_sequence: false,
    },
    Table {
        name: "certificates",
        columns: &[
            ("id", Integer),
            ("site", Text),
            ("names", Text),
            ("chain_pem", Text),
            ("key_pem", Text),
            ("not_before", Integer),
            ("not_after", Integer),
            ("serial", Text),
            ("ari_id", Text),
            ("issued_at", Integer),
            ("superseded_at", Integer),
        ],
        id_sequence: true,
    },
    Table {
        name: "certificate_names",
        columns: &[("certificate_id", Integer), ("hostname", Text)],
        id_sequence: false,
    },
    Table {
        name: "orders",
        columns: &[
            ("id", Integer),
            ("site", Text),
            ("names", Text),
            ("order_url", Text),
            ("key_pem", Text),
            ("created_at", Integer),
        ],
        id_sequence: true,
    },
    Table {
        name: "accounts",
        columns: &[
            ("directory_url", Text),
            ("credentials", Text),
            ("created_at", Integer),
        ],
        id_sequence: false,
    },
    Table {
        name: "events",
        columns: &[
            ("id", Integer),
            ("site", Text),
            ("at", Integer),
            ("kind", Text),
            ("message", Text),
            ("problem_type", Text),
            ("reason", Text),
        ],
        id_sequence: true,
    },
    Table {
        name: "mixed_content",
        columns: &[
            ("site", Text),
            ("page", Text),
            ("resource", Text),
            ("directive", Text),
            ("reports", Integer),
            ("first_seen", Integer),
            ("last_seen", Integer),
            ("bytes", Integer),
        ],
        id_sequence: false,
    },
];

/// How many rows of each table were copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyReport {
    /// `(table, rows)`, in copy order.
    pub rows: Vec<(&'static str, u64)>,
}

/// One SQLite value as the PostgreSQL parameter its column takes.
fn parameter(
    table: &str,
    column: &str,
    kind: Kind,
    value: Value,
) -> Result<Box<dyn ToSql + Sync + Send>> {
    Ok(match (kind, value) {
        (Integer, Value::Null) => Box::new(None::<i64>),
        (Boolean, Value::Null) => Box::new(None::<bool>),
        (Text, Value::Null) => Box::new(None::<String>),
        (Integer, Value::Integer(n)) => Box::new(n),
        (Boolean, Value::Integer(n)) => Box::new(n != 0),
        (Text, Value::Text(text)) => Box::new(text),
        (_, other) => {
            return Err(Error::CorruptStore(format!(
                "{table}.{column} holds {:?} where {kind:?} was expected",
                other.data_type()
            )));
        }
    })
}

impl PostgresStore {
    /// Copies everything `source` holds into this (empty) store in one transaction and
    /// answers what was copied. A store that already holds sites, accounts or events is
    /// refused unless `replace`, which first empties it (its change log is kept, so other
    /// nodes' readers see the copy as changes).
    pub fn import_sqlite(&self, source: &SqliteStore, replace: bool) -> Result<CopyReport> {
        let mut tables = Vec::with_capacity(TABLES.len());
        for table in TABLES {
            let columns: Vec<&str> = table.columns.iter().map(|(name, _)| *name).collect();
            let rows = source.read_table(table.name, &columns)?;
            tables.push((table, rows));
        }
        self.connections.run(move |client| {
            let mut tx = client.transaction()?;
            let held: i64 = tx
                .query_one(
                    "SELECT (SELECT COUNT(*) FROM sites) + (SELECT COUNT(*) FROM accounts)
                          + (SELECT COUNT(*) FROM events)",
                    &[],
                )?
                .try_get(0)?;
            if held > 0 && !replace {
                return Err(Error::Conflict(format!(
                    "the PostgreSQL store is not empty ({held} sites, accounts and events); copy \
                     into an empty database, or pass --force to replace everything in it"
                )));
            }
            if held > 0 {
                tx.batch_execute(
                    "TRUNCATE sites, hostnames, certificates, certificate_names, orders, accounts,
                              events, mixed_content, acme_challenges RESTART IDENTITY CASCADE",
                )?;
            }
            let mut report = CopyReport { rows: Vec::new() };
            for (table, rows) in &tables {
                let names: Vec<&str> = table.columns.iter().map(|(name, _)| *name).collect();
                let placeholders: Vec<String> =
                    (1..=names.len()).map(|index| format!("${index}")).collect();
                let statement = tx.prepare(&format!(
                    "INSERT INTO {} ({}) VALUES ({})",
                    table.name,
                    names.join(", "),
                    placeholders.join(", ")
                ))?;
                for row in rows {
                    let parameters = table
                        .columns
                        .iter()
                        .zip(row.iter().cloned())
                        .map(|((column, kind), value)| parameter(table.name, column, *kind, value))
                        .collect::<Result<Vec<_>>>()?;
                    let references: Vec<&(dyn ToSql + Sync)> = parameters
                        .iter()
                        .map(|parameter| parameter.as_ref() as &(dyn ToSql + Sync))
                        .collect();
                    tx.execute(&statement, &references)?;
                }
                if table.id_sequence {
                    tx.batch_execute(&format!(
                        "SELECT setval(pg_get_serial_sequence('{0}', 'id'),
                                       COALESCE((SELECT MAX(id) FROM {0}), 0) + 1, false)",
                        table.name
                    ))?;
                }
                report
                    .rows
                    .push((table.name, u64::try_from(rows.len()).unwrap_or(u64::MAX)));
            }
            tx.commit()?;
            Ok(report)
        })
    }
}
