//! A map-backed [`ResolveSecret`] for the protocol state machines' unit tests.

use std::collections::HashMap;
use std::sync::Arc;

use super::secret::ResolveSecret;
use super::source::ServedCertificate;

/// Secret name → certificate, nothing else.
#[derive(Debug, Default)]
pub(crate) struct MapResolver(pub(crate) HashMap<String, Arc<ServedCertificate>>);

impl MapResolver {
    /// Serves a dummy certificate at `version` for `name`.
    pub(crate) fn set(&mut self, name: &str, version: &str) {
        self.0.insert(
            name.to_owned(),
            Arc::new(ServedCertificate::new(
                version,
                format!("CHAIN {version}"),
                "KEY",
            )),
        );
    }
}

impl ResolveSecret for MapResolver {
    fn resolve(&self, name: &str) -> Option<Arc<ServedCertificate>> {
        self.0.get(name).cloned()
    }
}
