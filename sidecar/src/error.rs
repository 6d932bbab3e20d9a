//! The sidecar's one error type: every failure says what went wrong and what to do about it.

use std::path::PathBuf;

/// Everything that can go wrong in the sidecar library.
///
/// Messages never contain key material: ACME problems carry the CA's problem document,
/// store errors carry SQLite's message, nothing else.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A hostname failed validation; `reason` says which rule it broke.
    #[error("invalid hostname {input:?}: {reason}")]
    InvalidHostname {
        /// The hostname as the caller gave it.
        input: String,
        /// Which rule it broke and how to fix it.
        reason: String,
    },
    /// Some other piece of input (site name, HTTPS mode, HSTS max-age…) is not acceptable.
    #[error("{0}")]
    InvalidInput(String),
    /// The named site, hostname or certificate does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The change conflicts with existing state (duplicate site, hostname owned by another site).
    #[error("{0}")]
    Conflict(String),
    /// An environment override or a combination of settings is invalid.
    #[error("configuration: {0}")]
    Config(String),
    /// The configuration file is not valid TOML or has a wrong key or value.
    #[error("configuration file {}: {message}", path.display())]
    ConfigFile {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the line and column.
        message: String,
    },
    /// A file or directory could not be read, written or created.
    #[error("{action} {path}: {source}")]
    Io {
        /// What the sidecar was doing ("create data directory", "read config"…).
        action: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying OS error.
        #[source]
        source: std::io::Error,
    },
    /// The SQLite store failed; when it is locked, read-only or full the message says so.
    #[error("store: {0}{hint}", hint = store_hint(.0))]
    Store(#[from] rusqlite::Error),
    /// The PostgreSQL store cannot be reached (the server is down or restarting, the network
    /// or the credentials in `store.url` are wrong). Nothing was changed; the same request can
    /// succeed once the database is back, so the API answers 503.
    #[error(
        "store: the PostgreSQL database is unavailable ({0}); start it or fix store.url; autohttps \
         keeps serving the certificates and policy it holds and retries"
    )]
    StoreUnavailable(String),
    /// A PostgreSQL statement failed for a reason other than the connection (the message is
    /// the server's).
    #[error("store: PostgreSQL: {0}")]
    Postgres(String),
    /// Stored data could not be decoded (a corrupt row or a schema from a newer version).
    #[error("store: corrupt data: {0}")]
    CorruptStore(String),
    /// The ACME CA refused a request or could not be reached.
    ///
    /// `problem_type` is the RFC 8555 §6.7 error type when the CA sent a problem document.
    #[error("ACME: {detail}")]
    Acme {
        /// The RFC 8555 §6.7 problem type (`urn:ietf:params:acme:error:…`), if any.
        problem_type: Option<String>,
        /// Human-readable detail from the CA or the HTTP layer.
        detail: String,
        /// When the CA asked us to come back (`Retry-After`), if it said so.
        retry_after: Option<time::OffsetDateTime>,
    },
    /// Generating a key or CSR, or parsing a certificate, failed.
    #[error("certificate: {0}")]
    Certificate(String),
    /// A DNS lookup failed in a way that is not "the name does not point here".
    #[error("DNS: {0}")]
    Dns(String),
    /// The configured SDS socket path is taken by something that is not a socket.
    #[error(
        "SDS socket path {} exists and is not a socket; remove it or configure another path (sds.socket)",
        path.display()
    )]
    SdsSocketPathOccupied {
        /// The configured socket path.
        path: PathBuf,
    },
    /// Another process already accepts connections on the configured SDS socket.
    #[error(
        "another process is already serving on SDS socket {}; stop it or configure another path (sds.socket)",
        path.display()
    )]
    SdsSocketInUse {
        /// The configured socket path.
        path: PathBuf,
    },
    /// The SDS listener (Unix socket or TCP address) could not be set up.
    #[error(
        "cannot listen for SDS on {address}: {source}; check the path or address and its permissions"
    )]
    SdsListen {
        /// The socket path or TCP address, as text.
        address: String,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The SDS gRPC server stopped with a transport error.
    #[error("SDS server failed: {0}")]
    SdsTransport(#[from] tonic::transport::Error),
    /// The SDS server task panicked or was cancelled.
    #[error("SDS server task ended abnormally: {0}")]
    SdsTask(#[from] tokio::task::JoinError),
    /// No default certificate was configured and generating a self-signed one failed.
    #[error("cannot generate the self-signed default certificate: {0}")]
    DefaultCertificate(#[from] rcgen::Error),
    /// A bug: something the sidecar builds itself turned out malformed (e.g. the policy
    /// document could not be serialised). Report it; the message says what.
    #[error("internal error: {0}")]
    Internal(String),
}

/// What to do about a store failure that is not the request's fault.
fn store_hint(error: &rusqlite::Error) -> &'static str {
    use rusqlite::ErrorCode;
    match error.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
            " (another process holds a lock on the database, e.g. a sqlite3 shell or a backup; \
             end it, then retry; certificates keep being served meanwhile)"
        }
        Some(ErrorCode::ReadOnly) => {
            " (the database cannot be written: make data_dir and its autohttps.db* files \
             writable by the sidecar's user and the filesystem read-write, then retry; \
             certificates keep being served meanwhile)"
        }
        Some(ErrorCode::DiskFull) => " (the disk holding data_dir is full: free space, then retry)",
        _ => "",
    }
}

impl Error {
    /// Whether the store refused for a reason outside the request (locked, read-only, full):
    /// the same request may succeed once the operator fixes it, so the API answers 503.
    pub fn is_store_unavailable(&self) -> bool {
        match self {
            Self::Store(error) => !store_hint(error).is_empty(),
            Self::StoreUnavailable(_) => true,
            _ => false,
        }
    }

    /// Wraps an I/O error with what was being done and to which path.
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            action,
            path: path.into(),
            source,
        }
    }

    /// A short, stable label for metrics and events (`dns`, `acme:rateLimited`, `store`…).
    pub fn reason(&self) -> String {
        match self {
            Self::InvalidHostname { .. } | Self::InvalidInput(_) => "invalid-input".into(),
            Self::NotFound(_) => "not-found".into(),
            Self::Conflict(_) => "conflict".into(),
            Self::Config(_) | Self::ConfigFile { .. } => "config".into(),
            Self::Io { .. } => "io".into(),
            Self::Store(_)
            | Self::CorruptStore(_)
            | Self::StoreUnavailable(_)
            | Self::Postgres(_) => "store".into(),
            Self::Acme { problem_type, .. } => match problem_type {
                Some(kind) => format!(
                    "acme:{}",
                    kind.strip_prefix("urn:ietf:params:acme:error:")
                        .unwrap_or(kind)
                ),
                None => "acme:transport".into(),
            },
            Self::Certificate(_) => "certificate".into(),
            Self::Dns(_) => "dns".into(),
            Self::SdsSocketPathOccupied { .. }
            | Self::SdsSocketInUse { .. }
            | Self::SdsListen { .. }
            | Self::SdsTransport(_)
            | Self::SdsTask(_) => "sds".into(),
            Self::DefaultCertificate(_) => "certificate".into(),
            Self::Internal(_) => "internal".into(),
        }
    }
}

impl From<instant_acme::Error> for Error {
    fn from(error: instant_acme::Error) -> Self {
        match error {
            instant_acme::Error::Api(problem) => {
                let mut detail = problem
                    .detail
                    .clone()
                    .unwrap_or_else(|| "the CA gave no detail".into());
                for sub in &problem.subproblems {
                    detail.push_str("; ");
                    detail.push_str(&sub.to_string());
                }
                Self::Acme {
                    problem_type: problem.r#type.clone(),
                    detail,
                    retry_after: None,
                }
            }
            instant_acme::Error::Timeout(_) => Self::Acme {
                problem_type: None,
                detail: "timed out waiting for the CA to update the order".into(),
                retry_after: None,
            },
            other => Self::Acme {
                problem_type: None,
                detail: other.to_string(),
                retry_after: None,
            },
        }
    }
}

/// The sidecar's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
