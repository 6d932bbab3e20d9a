//! The store-backed [`CertificateSource`]: an in-memory index of what the store says to serve,
//! rebuilt when certificates or sites change, so SDS lookups never touch SQLite.
//!
//! A full rebuild reads `list_sites()` and `all_current_certificates()` once, however many SDS
//! streams are open; it runs at start, when a served certificate expires, hourly, and when the
//! store's change log lost this index's position. Any other change re-reads only the sites the
//! change log names (their hostnames and current certificates), so a change at 100,000 sites
//! costs a few point reads, not a reload of every certificate and key.
//!
//! A name maps to the newest servable certificate of its site that lists it as a SAN (the
//! same rule as [`Store::certificate_for_hostname`]); a certificate is servable
//! when it has not expired and its private key matches its leaf. Envoy NACKs a secret whose key
//! does not match, and that name's handshakes then hang until a good version arrives, so such a
//! certificate is never published: it is logged (site, serial, never the key) and skipped; an
//! older good certificate of the store keeps serving, or, when the refused one superseded it,
//! the one this process was serving for that name (until it expires or the process restarts).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use autohttps_filter::policy::{content_hash, fold_hostname};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::source::{CertificateSource, ServedCertificate, find_served};
use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::store::{Store, StoredCertificate};

/// The longest the refresh task sleeps without a change: it also rebuilds when the earliest
/// served certificate expires, and at least this often.
const MAX_REFRESH_INTERVAL: Duration = Duration::from_secs(3600);
/// Change-log rows read per store call.
const CHANGE_BATCH_ROWS: usize = 10_000;
/// More changed sites than this in one refresh: a full rebuild is cheaper than point reads.
const INCREMENTAL_MAX_SITES: usize = 2_000;

/// Serves the store's certificates to the SDS server from an in-memory index.
///
/// Build it with [`StoreCertificateSource::new`] (which indexes once), then keep it current with
/// [`StoreCertificateSource::spawn_refresh`].
pub struct StoreCertificateSource {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    default: Option<Arc<ServedCertificate>>,
    index: RwLock<Arc<Index>>,
    changes: watch::Sender<u64>,
    /// The store's change-log position the index reflects: `None` until a full rebuild
    /// succeeded (the next refresh is then a full one).
    position: Mutex<Option<u64>>,
}

impl std::fmt::Debug for StoreCertificateSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreCertificateSource")
            .field("names", &self.read().by_name.len())
            .field("default", &self.default)
            .finish_non_exhaustive()
    }
}

/// One snapshot of what to serve.
#[derive(Debug, Default, Clone)]
struct Index {
    /// Normalised name → what it is served.
    by_name: HashMap<String, Entry>,
    /// Every certificate considered, by store row id: `None` when it was refused (bad key), so
    /// it is checked, and logged, once.
    checked: HashMap<i64, Option<Arc<ServedCertificate>>>,
    /// When the first served certificate expires (the index must be rebuilt then).
    next_expiry: Option<OffsetDateTime>,
}

/// A name's certificate and when it stops being servable.
#[derive(Debug, Clone)]
struct Entry {
    certificate: Arc<ServedCertificate>,
    /// The certificate's store row id.
    id: i64,
    site: String,
    not_after: OffsetDateTime,
}

impl StoreCertificateSource {
    /// A source over `store`, indexed now. `default` is the certificate for clients without
    /// SNI (`None`: the SDS server generates a self-signed one).
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        default: Option<ServedCertificate>,
    ) -> Result<Arc<Self>> {
        let source = Arc::new(Self {
            store,
            clock,
            default: default.map(Arc::new),
            index: RwLock::new(Arc::new(Index::default())),
            changes: watch::Sender::new(0),
            position: Mutex::new(None),
        });
        source.refresh()?;
        Ok(source)
    }

    /// Rebuilds the index from the store; announces a change when any name's certificate
    /// changed. On a store error the previous index stays in place.
    pub fn refresh(&self) -> Result<()> {
        // The position first: a change committed while reading is read again, never lost.
        let position = self.store.latest_change_seq()?;
        let sites = self.store.list_sites()?;
        let mut certificates = self.store.all_current_certificates()?;
        let now = self.clock.now();
        sort_newest_first(&mut certificates);
        let owner: HashMap<&str, &str> = sites
            .iter()
            .flat_map(|site| {
                site.hostnames
                    .iter()
                    .map(|h| (h.name.as_str(), site.name.as_str()))
            })
            .collect();
        let previous = self.read();
        let mut next = Index::default();
        let refused_names = index_certificates(
            &certificates,
            |name| owner.get(name).copied(),
            &previous.checked,
            &mut next,
            now,
        );
        keep_previous_for_refused(
            refused_names,
            |name| owner.get(name).copied(),
            |name| previous.by_name.get(name),
            &mut next,
            now,
        );
        next.next_expiry = next.by_name.values().map(|entry| entry.not_after).min();
        let changed = previous.by_name.len() != next.by_name.len()
            || next.by_name.iter().any(|(name, entry)| {
                previous
                    .by_name
                    .get(name)
                    .is_none_or(|old| old.certificate.version() != entry.certificate.version())
            });
        let names = next.by_name.len();
        drop(previous);
        *self.index.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(next);
        *self.position.lock().unwrap_or_else(PoisonError::into_inner) = Some(position);
        if changed {
            self.changes.send_modify(|generation| *generation += 1);
            tracing::info!(names, "SDS certificate index rebuilt");
        }
        Ok(())
    }

    /// Brings the index up to date with the sites the store's change log names since the last
    /// refresh, reading only those (a full [`StoreCertificateSource::refresh`] when there was
    /// none yet, when the log no longer reaches back that far, or when so many sites changed
    /// that one read of everything is cheaper). Announces a change when any name's
    /// certificate changed; on a store error the index stays as it was.
    pub fn refresh_changed(&self) -> Result<()> {
        let Some(mut position) = *self.position.lock().unwrap_or_else(PoisonError::into_inner)
        else {
            return self.refresh();
        };
        let mut dirty: BTreeSet<String> = BTreeSet::new();
        loop {
            let batch = self.store.site_changes_since(position, CHANGE_BATCH_ROWS)?;
            if !batch.complete {
                return self.refresh();
            }
            position = batch.last_seq;
            if batch.sites.is_empty() {
                break;
            }
            dirty.extend(batch.sites);
            if dirty.len() > INCREMENTAL_MAX_SITES {
                return self.refresh();
            }
        }
        if dirty.is_empty() {
            *self.position.lock().unwrap_or_else(PoisonError::into_inner) = Some(position);
            return Ok(());
        }
        // Each changed site's names and current certificates, read before the index is touched.
        let mut owner: HashMap<String, String> = HashMap::new();
        let mut certificates = Vec::new();
        for id in &dirty {
            if let Some(site) = self.store.site(id)? {
                for hostname in &site.hostnames {
                    owner.insert(hostname.name.as_str().to_string(), site.name.clone());
                }
                certificates.extend(self.store.current_certificates(id)?);
            }
        }
        sort_newest_first(&mut certificates);
        let now = self.clock.now();
        let previous = self.read();
        let mut fresh = Index::default();
        let refused_names = index_certificates(
            &certificates,
            |name| owner.get(name).map(String::as_str),
            &previous.checked,
            &mut fresh,
            now,
        );
        keep_previous_for_refused(
            refused_names,
            |name| owner.get(name).map(String::as_str),
            |name| previous.by_name.get(name),
            &mut fresh,
            now,
        );
        drop(previous);

        let mut guard = self.index.write().unwrap_or_else(PoisonError::into_inner);
        // In place unless a lookup holds the index this very moment (then it is copied once).
        let index = Arc::make_mut(&mut guard);
        let mut removed: HashMap<String, Entry> = HashMap::new();
        index.by_name.retain(|name, entry| {
            if dirty.contains(&entry.site) {
                removed.insert(name.clone(), entry.clone());
                false
            } else {
                true
            }
        });
        let dropped_ids: HashSet<i64> = removed.values().map(|entry| entry.id).collect();
        index.checked.retain(|id, _| !dropped_ids.contains(id));
        let mut changed = removed.len() != fresh.by_name.len();
        for (name, entry) in fresh.by_name {
            changed |= removed
                .get(&name)
                .is_none_or(|old| old.certificate.version() != entry.certificate.version());
            index.by_name.insert(name, entry);
        }
        index.checked.extend(fresh.checked);
        index.next_expiry = index.by_name.values().map(|entry| entry.not_after).min();
        let names = index.by_name.len();
        drop(guard);
        *self.position.lock().unwrap_or_else(PoisonError::into_inner) = Some(position);
        if changed {
            self.changes.send_modify(|generation| *generation += 1);
            tracing::info!(
                names,
                sites = dirty.len(),
                "SDS certificate index updated for the changed sites"
            );
        }
        Ok(())
    }

    /// Keeps the index current: rebuilds when the store's certificates or sites change, when
    /// the earliest served certificate expires, and at least hourly. Stops when the store's
    /// change senders are gone or the handle is aborted.
    pub fn spawn_refresh(self: &Arc<Self>) -> JoinHandle<()> {
        let source = Arc::clone(self);
        let mut certificates = source.store.certificates_changed();
        let mut sites = source.store.sites_changed();
        tokio::spawn(async move {
            // Woken by the clock (a certificate expired, or the hourly check): rebuild it all.
            let mut timed = false;
            loop {
                // Subscribed before this rebuild, so a change made during it is not missed;
                // a burst of changes (store, supersede, edit) costs one rebuild.
                certificates.mark_unchanged();
                sites.mark_unchanged();
                let refreshing = Arc::clone(&source);
                let full = std::mem::take(&mut timed);
                let refreshed = tokio::task::spawn_blocking(move || {
                    if full {
                        refreshing.refresh()
                    } else {
                        refreshing.refresh_changed()
                    }
                });
                match refreshed.await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => tracing::error!(
                        %error,
                        "could not rebuild the SDS certificate index; still serving the previous one"
                    ),
                    Err(error) => tracing::error!(%error, "SDS certificate index rebuild failed"),
                }
                let wait = source.until_next_expiry();
                tokio::select! {
                    changed = certificates.changed() => if changed.is_err() { return },
                    changed = sites.changed() => if changed.is_err() { return },
                    () = tokio::time::sleep(wait) => timed = true,
                }
            }
        })
    }

    fn until_next_expiry(&self) -> Duration {
        match self.read().next_expiry {
            Some(expiry) => {
                let left = expiry - self.clock.now();
                Duration::try_from(left)
                    .unwrap_or(Duration::ZERO)
                    .clamp(Duration::from_secs(1), MAX_REFRESH_INTERVAL)
            }
            None => MAX_REFRESH_INTERVAL,
        }
    }

    fn read(&self) -> Arc<Index> {
        Arc::clone(&self.index.read().unwrap_or_else(PoisonError::into_inner))
    }
}

impl CertificateSource for StoreCertificateSource {
    fn lookup(&self, name: &str) -> Option<Arc<ServedCertificate>> {
        let index = self.read();
        find_served(&index.by_name, name).map(|entry| Arc::clone(&entry.certificate))
    }

    fn default_certificate(&self) -> Option<Arc<ServedCertificate>> {
        self.default.clone()
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

/// Newest first (latest `not_after`, then latest row): the first servable certificate listing
/// a name wins.
fn sort_newest_first(certificates: &mut [StoredCertificate]) {
    certificates.sort_by(|a, b| b.not_after.cmp(&a.not_after).then(b.id.cmp(&a.id)));
}

/// Indexes `certificates` (newest first) into `next`: each unexpired certificate is checked
/// (or its check from `checked` reused) and serves each of its names whose owner (by `owner`)
/// is its own site, unless a newer one already does. Returns the names whose newest
/// certificate was refused.
fn index_certificates<'a>(
    certificates: &[StoredCertificate],
    owner: impl Fn(&str) -> Option<&'a str>,
    checked: &HashMap<i64, Option<Arc<ServedCertificate>>>,
    next: &mut Index,
    now: OffsetDateTime,
) -> Vec<String> {
    let mut refused_names = Vec::new();
    for certificate in certificates {
        if certificate.not_after <= now {
            continue;
        }
        let served = match checked.get(&certificate.id) {
            Some(checked) => checked.clone(),
            None => servable(certificate),
        };
        next.checked.insert(certificate.id, served.clone());
        for name in &certificate.names {
            if owner(name.as_str()) != Some(certificate.site.as_str()) {
                continue;
            }
            let key = fold_hostname(name.as_str());
            match &served {
                Some(served) => {
                    next.by_name.entry(key).or_insert_with(|| Entry {
                        certificate: Arc::clone(served),
                        id: certificate.id,
                        site: certificate.site.clone(),
                        not_after: certificate.not_after,
                    });
                }
                None => refused_names.push(key),
            }
        }
    }
    refused_names
}

/// A refused certificate may have superseded the one a name was served: never make things
/// worse, keep serving that one (in memory, from `previous`) while it is valid and the name
/// still belongs to the same site.
fn keep_previous_for_refused<'a, 'p>(
    refused_names: Vec<String>,
    owner: impl Fn(&str) -> Option<&'a str>,
    previous: impl Fn(&str) -> Option<&'p Entry>,
    next: &mut Index,
    now: OffsetDateTime,
) {
    for name in refused_names {
        if next.by_name.contains_key(&name) {
            continue;
        }
        if let Some(entry) = previous(&name)
            && entry.not_after > now
            && owner(name.as_str()) == Some(entry.site.as_str())
        {
            next.by_name.insert(name, entry.clone());
        }
    }
}

/// The stored certificate as served, or `None` (logged) when its key does not match its leaf.
fn servable(certificate: &StoredCertificate) -> Option<Arc<ServedCertificate>> {
    match check_key_matches_leaf(&certificate.chain_pem, certificate.key_pem.expose()) {
        Ok(()) => Some(Arc::new(ServedCertificate::new(
            certificate.serial.clone(),
            certificate.chain_pem.clone(),
            certificate.key_pem.expose(),
        ))),
        Err(problem) => {
            tracing::error!(
                site = %certificate.site,
                serial = %certificate.serial,
                names = certificate.names.len(),
                %problem,
                "stored certificate not served to Envoy (it would reject it); an older one keeps serving if there is one"
            );
            None
        }
    }
}

/// Checks that `chain_pem` starts with a leaf whose public key is the one of `key_pem`.
/// The error says what is wrong without quoting either.
pub fn check_key_matches_leaf(chain_pem: &str, key_pem: &str) -> Result<(), String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("the certificate chain is not valid PEM ({e})"))?;
    if chain.is_empty() {
        return Err("the certificate chain holds no certificate".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| format!("the private key is not valid PEM ({e})"))?;
    let signing_key = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("the private key cannot be loaded ({e})"))?;
    match CertifiedKey::new(chain, signing_key).keys_match() {
        Ok(()) => Ok(()),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err("the private key does not belong to the leaf certificate".into())
        }
        Err(error) => Err(format!("the key and leaf cannot be compared ({error})")),
    }
}

/// The operator's default certificate (for clients without SNI) from PEM files, checked.
pub fn default_certificate_from_files(chain: &Path, key: &Path) -> Result<ServedCertificate> {
    let chain_pem = std::fs::read_to_string(chain)
        .map_err(|e| Error::io("read sds.default_certificate", chain, e))?;
    let key_pem =
        std::fs::read_to_string(key).map_err(|e| Error::io("read sds.default_key", key, e))?;
    check_key_matches_leaf(&chain_pem, &key_pem).map_err(|problem| {
        Error::Config(format!(
            "sds.default_certificate {} and sds.default_key {}: {problem}",
            chain.display(),
            key.display()
        ))
    })?;
    let version = format!("configured-{:016x}", content_hash(chain_pem.as_bytes()));
    Ok(ServedCertificate::new(version, chain_pem, key_pem))
}

#[cfg(test)]
mod tests;
