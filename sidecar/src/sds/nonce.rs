//! Response nonces: unique per stream, prefixed with the server instance for readable logs.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Hands out the nonces of one stream: `<server instance>-<counter>`.
#[derive(Debug, Clone)]
pub(crate) struct Nonces {
    server_instance: Arc<str>,
    next: u64,
}

impl Nonces {
    /// Nonces for one stream of the server instance `server_instance`.
    pub(crate) fn new(server_instance: Arc<str>) -> Self {
        Self {
            server_instance,
            next: 1,
        }
    }

    /// An identifier for this server process, distinct across restarts.
    pub(crate) fn new_server_instance() -> Arc<str> {
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|elapsed| elapsed.as_micros())
            .unwrap_or_default();
        Arc::from(format!("{:x}.{:x}", std::process::id(), started))
    }

    /// The server instance these nonces belong to.
    pub(crate) fn server_instance(&self) -> &str {
        &self.server_instance
    }

    /// The next nonce.
    pub(crate) fn next_nonce(&mut self) -> String {
        let nonce = format!("{}-{}", self.server_instance, self.next);
        self.next += 1;
        nonce
    }
}
