//! Where served certificates come from: the [`CertificateSource`] seam and its in-memory reference.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};

use autohttps_filter::policy::{fold_hostname, wildcard_name};
use tokio::sync::watch;

/// A certificate ready to be served to Envoy: PEM chain, PEM private key and a version.
///
/// The version names the contents: whoever builds a `ServedCertificate` must give a new
/// certificate a new version (a serial number or a fingerprint does). Envoy is told about a
/// certificate again only when its version changes.
#[derive(Clone, PartialEq, Eq)]
pub struct ServedCertificate {
    version: String,
    certificate_chain_pem: String,
    private_key_pem: String,
}

impl ServedCertificate {
    /// A certificate from its version, its PEM chain (leaf first) and its PEM private key.
    pub fn new(
        version: impl Into<String>,
        certificate_chain_pem: impl Into<String>,
        private_key_pem: impl Into<String>,
    ) -> Self {
        Self {
            version: version.into(),
            certificate_chain_pem: certificate_chain_pem.into(),
            private_key_pem: private_key_pem.into(),
        }
    }

    /// The version Envoy sees for this certificate.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The PEM certificate chain, leaf first.
    pub fn certificate_chain_pem(&self) -> &str {
        &self.certificate_chain_pem
    }

    /// The PEM private key. Never log it.
    pub fn private_key_pem(&self) -> &str {
        &self.private_key_pem
    }
}

impl fmt::Debug for ServedCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServedCertificate")
            .field("version", &self.version)
            .field(
                "certificate_chain_pem_bytes",
                &self.certificate_chain_pem.len(),
            )
            .field("private_key_pem", &"<redacted>")
            .finish()
    }
}

/// What the SDS server asks for certificates; implemented by the store.
///
/// Lookups happen on every SDS request and after every change, so they must be cheap for a
/// watched name (a map lookup) and never fail loudly: an unknown name is `None`. A source may
/// read a name's certificate from its store the first time it is asked for it (one short
/// point read, as store calls are), and keep it in memory only while the name is watched.
pub trait CertificateSource: Send + Sync + 'static {
    /// The certificate to serve for a TLS server name.
    ///
    /// Resolution order: the certificate for exactly `name`, then the wildcard certificate
    /// that covers it ([`wildcard_name`], the engine's one wildcard rule), else `None`.
    /// Implementations compare names after [`fold_hostname`].
    fn lookup(&self, name: &str) -> Option<Arc<ServedCertificate>>;

    /// An SDS stream started watching `name` (Envoy subscribed to it): from now until the
    /// matching [`CertificateSource::unwatch`], the source may keep what `lookup` answers for
    /// it in memory. Every `watch` is matched by exactly one `unwatch`.
    fn watch(&self, _name: &str) {}

    /// An SDS stream stopped watching `name` (Envoy unsubscribed, or the stream ended).
    fn unwatch(&self, _name: &str) {}

    /// The certificate for clients that send no SNI, when the operator configured one.
    ///
    /// `None` makes the server fall back to a self-signed certificate it generates at start.
    fn default_certificate(&self) -> Option<Arc<ServedCertificate>> {
        None
    }

    /// A counter bumped after every change to what `lookup` or `default_certificate` return.
    ///
    /// Each SDS stream holds one receiver; on a change it looks its names up again and pushes
    /// only those whose version changed.
    fn changes(&self) -> watch::Receiver<u64>;
}

/// An in-memory [`CertificateSource`]: the reference implementation, used in tests.
#[derive(Debug)]
pub struct MemoryCertificateSource {
    certificates: RwLock<Certificates>,
    changes: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct Certificates {
    by_name: HashMap<String, Arc<ServedCertificate>>,
    default: Option<Arc<ServedCertificate>>,
}

impl Default for MemoryCertificateSource {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryCertificateSource {
    /// An empty source.
    pub fn new() -> Self {
        Self {
            certificates: RwLock::new(Certificates::default()),
            changes: watch::Sender::new(0),
        }
    }

    /// Serves `certificate` for each of `names` (exact names or `*.parent` wildcards),
    /// replacing what those names had, then announces one change.
    pub fn insert<S: AsRef<str>>(&self, names: &[S], certificate: Arc<ServedCertificate>) {
        {
            let mut certificates = self.write();
            for name in names {
                certificates
                    .by_name
                    .insert(fold_hostname(name.as_ref()), Arc::clone(&certificate));
            }
        }
        self.announce();
    }

    /// Stops serving a certificate for `name`, then announces one change.
    pub fn remove(&self, name: &str) {
        self.write().by_name.remove(&fold_hostname(name));
        self.announce();
    }

    /// Sets (or with `None`, clears) the certificate for clients without SNI.
    pub fn set_default(&self, certificate: Option<Arc<ServedCertificate>>) {
        self.write().default = certificate;
        self.announce();
    }

    fn announce(&self) {
        self.changes.send_modify(|generation| *generation += 1);
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Certificates> {
        self.certificates
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Certificates> {
        self.certificates
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// What `name` is served from a map keyed by folded names: its exact entry, else the entry of
/// the wildcard that covers it (the engine's [`wildcard_name`]). Every [`CertificateSource`]
/// here looks names up through this one function.
pub(crate) fn find_served<'a, K, T>(by_name: &'a HashMap<K, T>, name: &str) -> Option<&'a T>
where
    K: std::borrow::Borrow<str> + std::hash::Hash + Eq,
{
    let name = fold_hostname(name);
    by_name
        .get(name.as_str())
        .or_else(|| by_name.get(wildcard_name(&name)?.as_str()))
}

impl CertificateSource for MemoryCertificateSource {
    fn lookup(&self, name: &str) -> Option<Arc<ServedCertificate>> {
        find_served(&self.read().by_name, name).cloned()
    }

    fn default_certificate(&self) -> Option<Arc<ServedCertificate>> {
        self.read().default.clone()
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(version: &str) -> Arc<ServedCertificate> {
        Arc::new(ServedCertificate::new(version, "CHAIN", "KEY"))
    }

    fn version_of(source: &MemoryCertificateSource, name: &str) -> Option<String> {
        source.lookup(name).map(|c| c.version().to_owned())
    }

    #[test]
    fn lookup_prefers_exact_name_over_wildcard() {
        let source = MemoryCertificateSource::new();
        source.insert(&["*.example.test"], cert("wild"));
        source.insert(&["a.example.test"], cert("exact"));
        assert_eq!(
            version_of(&source, "a.example.test").as_deref(),
            Some("exact")
        );
        assert_eq!(
            version_of(&source, "b.example.test").as_deref(),
            Some("wild")
        );
    }

    #[test]
    fn wildcard_covers_one_label_only() {
        let source = MemoryCertificateSource::new();
        source.insert(&["*.example.test"], cert("wild"));
        assert_eq!(version_of(&source, "x.y.example.test"), None);
        assert_eq!(version_of(&source, "example.test"), None);
    }

    #[test]
    fn unknown_name_is_none() {
        let source = MemoryCertificateSource::new();
        source.insert(&["a.example.test"], cert("1"));
        assert_eq!(version_of(&source, "b.example.test"), None);
    }

    #[test]
    fn lookup_ignores_case_and_trailing_dot() {
        let source = MemoryCertificateSource::new();
        source.insert(&["A.Example.Test"], cert("1"));
        assert_eq!(version_of(&source, "a.example.TEST.").as_deref(), Some("1"));
    }

    #[test]
    fn every_change_bumps_the_counter() {
        let source = MemoryCertificateSource::new();
        let mut changes = source.changes();
        source.insert(&["a.example.test", "b.example.test"], cert("1"));
        assert!(changes.has_changed().unwrap_or(false));
        assert_eq!(*changes.borrow_and_update(), 1);
        source.remove("a.example.test");
        source.set_default(Some(cert("d")));
        assert_eq!(*changes.borrow_and_update(), 3);
    }

    #[test]
    fn debug_output_never_contains_the_private_key() {
        let served = ServedCertificate::new("v1", "CHAIN", "-----BEGIN PRIVATE KEY-----SECRET");
        let shown = format!("{served:?}");
        assert!(shown.contains("v1"));
        assert!(!shown.contains("SECRET"));
    }
}
