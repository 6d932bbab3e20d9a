//! A synchronous facade over PostgreSQL connections for the synchronous [`crate::store::Store`]
//! trait: a few dedicated threads each own one connection (the `postgres` crate's blocking
//! client, which drives its own small runtime and so must not run on a tokio worker); a caller
//! hands its work to a free one and waits for the answer, as it would wait on SQLite's lock.
//! Connections are made lazily and remade after the server went away; the schema is migrated on
//! the first connection.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use postgres::{Client, NoTls};
use tokio::sync::watch;

use super::schema;
use crate::error::{Error, Result};

/// One unit of work for a connection thread: it gets the thread's connection slot.
type Job = Box<dyn FnOnce(&mut Option<Client>) + Send>;

/// What the connection threads, the listener and the store share.
pub(super) struct Shared {
    /// Where to connect (the password inside is never printed).
    pub(super) config: postgres::Config,
    /// `host:port/dbname`, for messages.
    pub(super) target: String,
    /// This node's id (lease holder name).
    pub(super) node_id: String,
    /// Whether this store has brought the schema up to date.
    migrated: Mutex<bool>,
    /// Set when the store is dropped: the listener stops.
    pub(super) stopping: AtomicBool,
    pub(super) certificates_changed: watch::Sender<u64>,
    pub(super) sites_changed: watch::Sender<u64>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("target", &self.target)
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

impl Shared {
    pub(super) fn new(config: postgres::Config, node_id: String) -> Self {
        let hosts = config
            .get_hosts()
            .iter()
            .map(|host| match host {
                postgres::config::Host::Tcp(name) => name.clone(),
                postgres::config::Host::Unix(path) => path.display().to_string(),
            })
            .collect::<Vec<_>>()
            .join(",");
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let target = format!(
            "{hosts}:{port}/{}",
            config.get_dbname().unwrap_or("(default database)")
        );
        Self {
            config,
            target,
            node_id,
            migrated: Mutex::new(false),
            stopping: AtomicBool::new(false),
            certificates_changed: watch::Sender::new(0),
            sites_changed: watch::Sender::new(0),
        }
    }

    /// A new connection, with the schema migrated if this store has not done it yet.
    pub(super) fn connect(&self) -> Result<Client> {
        let mut client = self.config.connect(NoTls).map_err(|error| {
            Error::StoreUnavailable(format!("cannot connect to {}: {error}", self.target))
        })?;
        let mut migrated = self
            .migrated
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if !*migrated {
            schema::migrate(&mut client)?;
            *migrated = true;
        }
        Ok(client)
    }

    pub(super) fn bump_sites(&self) {
        self.sites_changed
            .send_modify(|generation| *generation += 1);
    }

    pub(super) fn bump_certificates(&self) {
        self.certificates_changed
            .send_modify(|generation| *generation += 1);
    }
}

/// The connection threads and the queue to them.
#[derive(Debug)]
pub(super) struct Connections {
    jobs: mpsc::Sender<Job>,
    pub(super) shared: Arc<Shared>,
}

impl Connections {
    /// Starts `count` connection threads (they connect when first used).
    pub(super) fn start(shared: Arc<Shared>, count: usize) -> Result<Self> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        for index in 0..count.max(1) {
            let queue = Arc::clone(&queue);
            std::thread::Builder::new()
                .name(format!("autohttps-pg-{index}"))
                .spawn(move || {
                    let mut connection = None;
                    loop {
                        let job = {
                            let queue = queue.lock().unwrap_or_else(|p| p.into_inner());
                            queue.recv()
                        };
                        // The store was dropped: its sender is gone.
                        let Ok(job) = job else { return };
                        job(&mut connection);
                    }
                })
                .map_err(|error| {
                    Error::Internal(format!(
                        "cannot start a PostgreSQL connection thread: {error}"
                    ))
                })?;
        }
        Ok(Self { jobs, shared })
    }

    /// Runs `work` on a connection thread and waits for its answer. When the connection it
    /// was given turns out to be dead (the server restarted since it was last used), `work`
    /// runs once more on a new one; when no connection can be made, the answer is
    /// [`Error::StoreUnavailable`].
    pub(super) fn run<T, F>(&self, mut work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnMut(&mut Client) -> Result<T> + Send + 'static,
    {
        let (answer, answered) = mpsc::sync_channel(1);
        let shared = Arc::clone(&self.shared);
        let job: Job = Box::new(move |slot: &mut Option<Client>| {
            let _receiver_gone = answer.send(run_on(&shared, slot, &mut work));
        });
        self.jobs.send(job).map_err(|_| {
            Error::Internal("the PostgreSQL store's connection threads have stopped".into())
        })?;
        answered.recv().map_err(|_| {
            Error::Internal("a PostgreSQL connection thread stopped mid-request".into())
        })?
    }
}

fn run_on<T>(
    shared: &Shared,
    slot: &mut Option<Client>,
    work: &mut dyn FnMut(&mut Client) -> Result<T>,
) -> Result<T> {
    for _ in 0..2 {
        let reused = slot.as_ref().is_some_and(|client| !client.is_closed());
        if !reused {
            *slot = None;
            super::statements::new_connection();
            *slot = Some(shared.connect()?);
        }
        let Some(client) = slot.as_mut() else {
            continue;
        };
        let result = super::statements::on_connection(|| work(client));
        if result.is_err() && client.is_closed() {
            *slot = None;
            if reused {
                continue;
            }
        }
        return result;
    }
    Err(Error::StoreUnavailable(format!(
        "the connection to {} closed twice in a row",
        shared.target
    )))
}

/// Whether the postgres error means the server could not be reached or went away (connection
/// exception class 08, shutdown, starting up), not that the statement was wrong.
pub(super) fn is_connection_error(error: &postgres::Error) -> bool {
    if error.is_closed() {
        return true;
    }
    match error.code() {
        Some(code) => {
            let code = code.code();
            code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03")
        }
        // No server answer: an I/O error on the socket is one; a value that did not convert
        // is not.
        None => {
            std::error::Error::source(error).is_some_and(|source| source.is::<std::io::Error>())
        }
    }
}

impl From<postgres::Error> for Error {
    fn from(error: postgres::Error) -> Self {
        if is_connection_error(&error) {
            return Self::StoreUnavailable(error.to_string());
        }
        match error.as_db_error() {
            Some(db) => Self::Postgres(format!("{} ({})", db.message(), db.code().code())),
            None => Self::Postgres(error.to_string()),
        }
    }
}

/// Maps a unique-constraint violation (two nodes inserting the same key at once) to the error
/// `conflict` makes (an [`Error::Conflict`]); other errors as usual.
pub(super) fn conflict_on_duplicate<T>(
    result: std::result::Result<T, postgres::Error>,
    conflict: impl FnOnce() -> Error,
) -> Result<T> {
    result.map_err(|error| {
        if error.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION) {
            conflict()
        } else {
            error.into()
        }
    })
}

/// Stops the listener when the store goes.
pub(super) fn stop(shared: &Shared) {
    shared.stopping.store(true, Ordering::SeqCst);
}
