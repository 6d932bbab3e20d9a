//! The store-backed [`CertificateSource`]: a lean in-memory index of what the store says to
//! serve (for each name: which certificate, its version and expiry; no PEM text), and the
//! chains and keys of only the names Envoy has asked for, read from the store when first asked.
//!
//! Envoy's on-demand certificate selector subscribes to a secret only for the SNI names clients
//! use, so at 100,000 sites the index costs tens of bytes per name while the names with
//! traffic carry their PEM text. A name keeps what it was served after Envoy's stream for it
//! ends (Envoy opens a new one at the name's next handshake, and that must not need the store,
//! which may be down); it drops it when the index serves it another certificate or none.
//!
//! A full rebuild reads the store a page of sites at a time (each site with its current
//! certificates), so it never holds every certificate at once; it runs at start, when a served
//! certificate expires, hourly, and when the store's change log lost this index's position.
//! Any other change re-reads only the sites the change log names (their hostnames and current
//! certificates), so a change at 100,000 sites costs a few point reads.
//!
//! A name maps to the newest servable certificate of its site that lists it as a SAN (the
//! same rule as [`Store::certificate_for_hostname`]); a certificate is servable
//! when it has not expired and its private key matches its leaf (checked when indexed, and
//! again when its chain and key are loaded). Envoy NACKs a secret whose key does not match,
//! and that name's handshakes then hang until a good version arrives, so such a certificate is
//! never published: it is logged (site, serial, never the key) and skipped; an older good
//! certificate of the store keeps serving, or, when the refused one superseded it, the one this
//! process was serving for that name (until it expires or the process restarts).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
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
use crate::store::{CertificateCoverage, Site, Store, StoredCertificate};

/// The longest the refresh task sleeps without a change: it also rebuilds when the earliest
/// served certificate expires, and at least this often.
const MAX_REFRESH_INTERVAL: Duration = Duration::from_secs(3600);
/// Change-log rows read per store call.
const CHANGE_BATCH_ROWS: usize = 10_000;
/// More changed sites than this in one refresh: a full rebuild is cheaper than point reads.
const INCREMENTAL_MAX_SITES: usize = 2_000;
/// Sites read per store call in a full rebuild (with their certificates' PEM text: a few MiB).
const REBUILD_PAGE_SITES: usize = 500;

/// Serves the store's certificates to the SDS server from a lean in-memory index.
///
/// Build it with [`StoreCertificateSource::new`] (which indexes once), then keep it current with
/// [`StoreCertificateSource::spawn_refresh`].
pub struct StoreCertificateSource {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    default: Option<Arc<ServedCertificate>>,
    index: RwLock<Arc<Index>>,
    /// The names Envoy watches and the chains and keys loaded for them.
    watched: Mutex<Watched>,
    /// With a store that can go away (PostgreSQL in a fleet): every servable certificate's
    /// chain and key, by row id, so that every handshake is answered from memory while the
    /// database is down. `None` with a local store (SQLite), which loads on demand.
    held: Option<Mutex<HashMap<i64, Arc<ServedCertificate>>>>,
    changes: watch::Sender<u64>,
    /// The store's change-log position the index reflects: `None` until a full rebuild
    /// succeeded (the next refresh is then a full one).
    position: Mutex<Option<u64>>,
}

impl std::fmt::Debug for StoreCertificateSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreCertificateSource")
            .field("names", &self.read().by_name.len())
            .field("loaded", &self.loaded_certificates())
            .field("default", &self.default)
            .finish_non_exhaustive()
    }
}

/// One snapshot of what to serve: no PEM text.
#[derive(Debug, Default, Clone)]
struct Index {
    /// Normalised name → what it is served.
    by_name: HashMap<Arc<str>, Entry>,
    /// Site → the names of `by_name` it is served under (the same strings, shared), so that a
    /// change to a site touches only its own names.
    by_site: HashMap<Arc<str>, Vec<Arc<str>>>,
    /// How many names of `by_name` expire at each instant (the first is when the index must
    /// be rebuilt).
    expiries: BTreeMap<OffsetDateTime, usize>,
    /// Every certificate considered, by store row id: whether it is servable (false when its
    /// key does not match, so it is checked, and logged, once).
    checked: HashMap<i64, bool>,
}

impl Index {
    /// Serves `name` with `entry`, in place of what it was served.
    fn serve(&mut self, name: Arc<str>, entry: Entry) {
        self.expiries
            .entry(entry.not_after)
            .and_modify(|n| *n += 1)
            .or_insert(1);
        self.by_site
            .entry(Arc::clone(&entry.site))
            .or_default()
            .push(Arc::clone(&name));
        if let Some(old) = self.by_name.insert(Arc::clone(&name), entry) {
            self.unlink(&name, &old);
        }
    }

    /// Stops serving every name of `site`; answers what they were served.
    fn unserve_site(&mut self, site: &str) -> Vec<(Arc<str>, Entry)> {
        let names = self.by_site.remove(site).unwrap_or_default();
        let mut removed = Vec::with_capacity(names.len());
        for name in names {
            if let Some(entry) = self.by_name.remove(&name) {
                self.forget_expiry(entry.not_after);
                removed.push((name, entry));
            }
        }
        removed
    }

    /// Takes a replaced entry of `name` out of `by_site` and `expiries`.
    fn unlink(&mut self, name: &str, old: &Entry) {
        self.forget_expiry(old.not_after);
        if let Some(names) = self.by_site.get_mut(&old.site) {
            if let Some(at) = names.iter().position(|n| &**n == name) {
                names.swap_remove(at);
            }
            if names.is_empty() {
                self.by_site.remove(&old.site);
            }
        }
    }

    fn forget_expiry(&mut self, at: OffsetDateTime) {
        if let Some(n) = self.expiries.get_mut(&at) {
            *n -= 1;
            if *n == 0 {
                self.expiries.remove(&at);
            }
        }
    }

    /// When the first served certificate expires.
    fn next_expiry(&self) -> Option<OffsetDateTime> {
        self.expiries.keys().next().copied()
    }
}

/// A name's certificate, as its store row id, and when it stops being servable.
#[derive(Debug, Clone)]
struct Entry {
    /// The certificate's store row id (its chain and key are read by it).
    id: i64,
    /// Its version (the serial number).
    version: Arc<str>,
    site: Arc<str>,
    not_after: OffsetDateTime,
}

/// The names Envoy watches (by how many streams) and the certificates loaded for them.
#[derive(Debug, Default)]
struct Watched {
    /// Folded name → how many SDS streams watch it.
    streams: HashMap<String, usize>,
    /// Watched name → the row id of the certificate last served for it.
    served: HashMap<String, i64>,
    /// Row id → its loaded certificate and how many watched names it is served for.
    loaded: HashMap<i64, (Arc<ServedCertificate>, usize)>,
}

impl Watched {
    /// The loaded certificate `id`, now recorded as served for `name` when `name` is watched.
    fn attach_loaded(&mut self, name: &str, id: i64) -> Option<Arc<ServedCertificate>> {
        let certificate = Arc::clone(&self.loaded.get(&id)?.0);
        self.attach(name, id, &certificate);
        Some(certificate)
    }

    /// Records `certificate` (row `id`) as served for `name`, keeping it loaded while a
    /// name that was watched is served it; a name never watched keeps nothing. Answers the one copy
    /// held (an equal certificate loaded meanwhile by another lookup is shared).
    fn attach(
        &mut self,
        name: &str,
        id: i64,
        certificate: &Arc<ServedCertificate>,
    ) -> Arc<ServedCertificate> {
        if !self.streams.contains_key(name) {
            return Arc::clone(certificate);
        }
        if self.served.get(name) != Some(&id) {
            if let Some(old) = self.served.insert(name.to_owned(), id) {
                self.release(old);
            }
            self.loaded
                .entry(id)
                .or_insert_with(|| (Arc::clone(certificate), 0))
                .1 += 1;
        }
        self.loaded
            .get(&id)
            .map_or_else(|| Arc::clone(certificate), |(held, _)| Arc::clone(held))
    }

    /// `name` is served nothing now: what it held may go.
    fn detach(&mut self, name: &str) {
        if let Some(id) = self.served.remove(name) {
            self.release(id);
        }
    }

    fn release(&mut self, id: i64) {
        if let Some((_, names)) = self.loaded.get_mut(&id) {
            *names -= 1;
            if *names == 0 {
                self.loaded.remove(&id);
            }
        }
    }

    /// The certificate last served for `name`, when it is loaded.
    fn last_served(&self, name: &str) -> Option<Arc<ServedCertificate>> {
        let id = self.served.get(name)?;
        self.loaded.get(id).map(|(held, _)| Arc::clone(held))
    }
}

impl StoreCertificateSource {
    /// A source over `store`, indexed now. `default` is the certificate for clients without
    /// SNI (`None`: the SDS server generates a self-signed one).
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        default: Option<ServedCertificate>,
    ) -> Result<Arc<Self>> {
        Self::with_holding(store, clock, default, false)
    }

    /// Like [`StoreCertificateSource::new`]; with `hold_all`, every servable certificate's
    /// chain and key is kept in memory (for a store that can be unreachable: a fleet's
    /// PostgreSQL), else only those of names Envoy has asked for.
    pub fn with_holding(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        default: Option<ServedCertificate>,
        hold_all: bool,
    ) -> Result<Arc<Self>> {
        let source = Arc::new(Self {
            store,
            clock,
            default: default.map(Arc::new),
            index: RwLock::new(Arc::new(Index::default())),
            watched: Mutex::new(Watched::default()),
            held: hold_all.then(Mutex::default),
            changes: watch::Sender::new(0),
            position: Mutex::new(None),
        });
        source.refresh()?;
        Ok(source)
    }

    /// How many certificates' chains and keys are held in memory now (one per certificate
    /// served to a watched name).
    pub fn loaded_certificates(&self) -> usize {
        self.watched().loaded.len()
    }

    /// How many names the index knows.
    pub fn indexed_names(&self) -> usize {
        self.read().by_name.len()
    }

    /// Rebuilds the index from the store, a page of sites at a time; announces a change when
    /// any name's certificate changed. On a store error the previous index stays in place.
    pub fn refresh(&self) -> Result<()> {
        // The position first: a change committed while reading is read again, never lost.
        let position = self.store.latest_change_seq()?;
        let now = self.clock.now();
        let previous = self.read();
        let mut next = Index::default();
        let mut after: Option<String> = None;
        loop {
            let page = self
                .store
                .sites_page(after.as_deref(), REBUILD_PAGE_SITES)?;
            let Some((last, _)) = page.last() else {
                break;
            };
            after = Some(last.name.clone());
            let full_page = page.len() == REBUILD_PAGE_SITES;
            index_sites(page, &previous, &mut next, now, |id| self.check_stored(id))?;
            if !full_page {
                break;
            }
        }
        let changed = previous.by_name.len() != next.by_name.len()
            || next.by_name.iter().any(|(name, entry)| {
                previous
                    .by_name
                    .get(name)
                    .is_none_or(|old| old.version != entry.version)
            });
        let names = next.by_name.len();
        drop(previous);
        self.prune_held(&next);
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
        let mut sites = Vec::new();
        let mut read: HashMap<i64, StoredCertificate> = HashMap::new();
        for id in &dirty {
            if let Some(site) = self.store.site(id)? {
                let certificates = self.store.current_certificates(id)?;
                let coverage = certificates.iter().map(CertificateCoverage::from).collect();
                read.extend(certificates.into_iter().map(|c| (c.id, c)));
                sites.push((site, coverage));
            }
        }
        let now = self.clock.now();
        let previous = self.read();
        let mut fresh = Index::default();
        index_sites(sites, &previous, &mut fresh, now, |id| {
            match read.remove(&id) {
                Some(stored) => Ok(self.servable_held(stored)),
                None => self.check_stored(id),
            }
        })?;
        drop(previous);

        let mut guard = self.index.write().unwrap_or_else(PoisonError::into_inner);
        // In place unless a lookup holds the index this very moment (then it is copied once).
        let index = Arc::make_mut(&mut guard);
        // Only the changed sites' names are touched: the cost follows the change.
        let removed: HashMap<Arc<str>, Entry> = dirty
            .iter()
            .flat_map(|site| index.unserve_site(site))
            .collect();
        let dropped_ids: HashSet<i64> = removed.values().map(|entry| entry.id).collect();
        for id in &dropped_ids {
            index.checked.remove(id);
        }
        let mut changed = removed.len() != fresh.by_name.len();
        let fresh_ids: HashSet<i64> = fresh.by_name.values().map(|entry| entry.id).collect();
        self.drop_held(dropped_ids.difference(&fresh_ids));
        for (name, entry) in fresh.by_name {
            changed |= removed
                .get(&name)
                .is_none_or(|old| old.version != entry.version);
            index.serve(name, entry);
        }
        index.checked.extend(fresh.checked);
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
        match self.read().next_expiry() {
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

    /// Whether the certificate in row `id` is servable (read from the store to check its key;
    /// a row that is gone is not).
    fn check_stored(&self, id: i64) -> Result<bool> {
        Ok(self
            .store
            .certificate(id)?
            .is_some_and(|stored| self.servable_held(stored)))
    }

    /// Whether `stored` is servable; when every certificate is held, a servable one is kept.
    fn servable_held(&self, stored: StoredCertificate) -> bool {
        let ok = servable(&stored);
        if ok && let Some(held) = &self.held {
            let certificate =
                ServedCertificate::new(stored.serial, stored.chain_pem, stored.key_pem.expose());
            held.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(stored.id, Arc::new(certificate));
        }
        ok
    }

    /// Drops held certificates the index no longer serves.
    fn prune_held(&self, index: &Index) {
        if let Some(held) = &self.held {
            let served: HashSet<i64> = index.by_name.values().map(|entry| entry.id).collect();
            held.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .retain(|id, _| served.contains(id));
        }
    }

    /// Drops the held certificates of rows `ids` (ones a change took out of the index).
    fn drop_held<'i>(&self, ids: impl Iterator<Item = &'i i64>) {
        if let Some(held) = &self.held {
            let mut held = held.lock().unwrap_or_else(PoisonError::into_inner);
            for id in ids {
                held.remove(id);
            }
        }
    }

    /// The held chain and key of row `id` (every certificate is held with a remote store).
    fn held(&self, id: i64) -> Option<Arc<ServedCertificate>> {
        let held = self.held.as_ref()?;
        held.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .cloned()
    }

    fn watched(&self) -> MutexGuard<'_, Watched> {
        self.watched.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads the chain and key of `entry`'s certificate from the store and checks them again;
    /// `None` (logged, never with key material) when the row is gone or does not check out.
    fn load(&self, entry: &Entry) -> Option<Arc<ServedCertificate>> {
        let stored = match self.store.certificate(entry.id) {
            Ok(Some(stored)) => stored,
            Ok(None) => {
                tracing::warn!(site = %entry.site, serial = %entry.version, "a certificate the SDS index serves is no longer in the store; the next index refresh drops it");
                return None;
            }
            Err(error) => {
                tracing::error!(site = %entry.site, serial = %entry.version, %error, "could not read a served certificate from the store");
                return None;
            }
        };
        if stored.serial != *entry.version {
            tracing::error!(site = %entry.site, serial = %entry.version, stored = %stored.serial, "the store's certificate row changed under the SDS index; not served until the index is refreshed");
            return None;
        }
        servable(&stored).then(|| {
            Arc::new(ServedCertificate::new(
                &*entry.version,
                stored.chain_pem,
                stored.key_pem.expose(),
            ))
        })
    }
}

impl CertificateSource for StoreCertificateSource {
    /// The index says which certificate serves `name`; its chain and key come from memory when
    /// a watched name holds them, else from one store read (kept while `name` is watched).
    /// When that read fails, a watched name keeps what it was served last.
    fn lookup(&self, name: &str) -> Option<Arc<ServedCertificate>> {
        let name = fold_hostname(name);
        let Some(entry) = find_served(&self.read().by_name, &name).cloned() else {
            self.watched().detach(&name);
            return None;
        };
        if let Some(certificate) = self.held(entry.id) {
            return Some(certificate);
        }
        if let Some(certificate) = self.watched().attach_loaded(&name, entry.id) {
            return Some(certificate);
        }
        match self.load(&entry) {
            Some(certificate) => Some(self.watched().attach(&name, entry.id, &certificate)),
            None => self.watched().last_served(&name),
        }
    }

    fn watch(&self, name: &str) {
        *self
            .watched()
            .streams
            .entry(fold_hostname(name))
            .or_default() += 1;
    }

    fn unwatch(&self, name: &str) {
        let name = fold_hostname(name);
        let mut watched = self.watched();
        let Some(streams) = watched.streams.get_mut(&name) else {
            return;
        };
        *streams -= 1;
        if *streams == 0 {
            // What the name was served stays loaded: Envoy ends an on-demand stream when it is
            // done with it and opens another at the name's next handshake, which must not need
            // the store (in a fleet, PostgreSQL may be down; the edge keeps serving what it
            // holds). It goes when the index serves the name another certificate or none.
            watched.streams.remove(&name);
        }
    }

    fn default_certificate(&self) -> Option<Arc<ServedCertificate>> {
        self.default.clone()
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

/// Indexes each site's current certificates into `next` (see [`index_certificates`]), keeping
/// the previous entry of a name whose newest certificate was refused. `check` tells whether a
/// certificate not checked before is servable.
fn index_sites(
    sites: Vec<(Site, Vec<CertificateCoverage>)>,
    previous: &Index,
    next: &mut Index,
    now: OffsetDateTime,
    mut check: impl FnMut(i64) -> Result<bool>,
) -> Result<()> {
    for (site, mut certificates) in sites {
        sort_newest_first(&mut certificates);
        let site_id: Arc<str> = Arc::from(site.name.as_str());
        let own: HashSet<&str> = site.hostnames.iter().map(|h| h.name.as_str()).collect();
        let owner = |name: &str| own.contains(name).then_some(&*site_id);
        let refused_names = index_certificates(
            &certificates,
            &site_id,
            owner,
            &previous.checked,
            &mut check,
            next,
            now,
        )?;
        keep_previous_for_refused(
            refused_names,
            owner,
            |name| previous.by_name.get(name),
            next,
            now,
        );
    }
    Ok(())
}

/// Newest first (latest `not_after`, then latest row): the first servable certificate listing
/// a name wins.
fn sort_newest_first(certificates: &mut [CertificateCoverage]) {
    certificates.sort_by(|a, b| b.not_after.cmp(&a.not_after).then(b.id.cmp(&a.id)));
}

/// Indexes one site's `certificates` (newest first) into `next`: each unexpired certificate is
/// checked (its check from `checked` reused, else made by `check`) and serves each of its names
/// whose owner (by `owner`) is `site`, unless a newer one already does. Returns the names whose
/// newest certificate was refused.
fn index_certificates<'a>(
    certificates: &[CertificateCoverage],
    site: &Arc<str>,
    owner: impl Fn(&str) -> Option<&'a str>,
    checked: &HashMap<i64, bool>,
    check: &mut impl FnMut(i64) -> Result<bool>,
    next: &mut Index,
    now: OffsetDateTime,
) -> Result<Vec<String>> {
    let mut refused_names = Vec::new();
    for certificate in certificates {
        if certificate.not_after <= now {
            continue;
        }
        let ok = match checked.get(&certificate.id) {
            Some(ok) => *ok,
            None => check(certificate.id)?,
        };
        next.checked.insert(certificate.id, ok);
        let version: Arc<str> = Arc::from(certificate.serial.as_str());
        for name in &certificate.names {
            if owner(name.as_str()) != Some(certificate.site.as_str()) {
                continue;
            }
            let key = fold_hostname(name.as_str());
            if ok {
                if !next.by_name.contains_key(key.as_str()) {
                    next.serve(
                        key.into(),
                        Entry {
                            id: certificate.id,
                            version: Arc::clone(&version),
                            site: Arc::clone(site),
                            not_after: certificate.not_after,
                        },
                    );
                }
            } else {
                refused_names.push(key);
            }
        }
    }
    Ok(refused_names)
}

/// A refused certificate may have superseded the one a name was served: never make things
/// worse, keep serving that one (its row stays in the store, superseded) while it is valid and
/// the name still belongs to the same site.
fn keep_previous_for_refused<'a, 'p>(
    refused_names: Vec<String>,
    owner: impl Fn(&str) -> Option<&'a str>,
    previous: impl Fn(&str) -> Option<&'p Entry>,
    next: &mut Index,
    now: OffsetDateTime,
) {
    for name in refused_names {
        if next.by_name.contains_key(name.as_str()) {
            continue;
        }
        if let Some(entry) = previous(&name)
            && entry.not_after > now
            && owner(name.as_str()) == Some(&*entry.site)
        {
            next.serve(name.into(), entry.clone());
        }
    }
}

/// Whether the stored certificate may be served; when its key does not match its leaf, logs
/// why (site and serial, never the key) and answers false.
fn servable(certificate: &StoredCertificate) -> bool {
    match check_key_matches_leaf(&certificate.chain_pem, certificate.key_pem.expose()) {
        Ok(()) => true,
        Err(problem) => {
            tracing::error!(
                site = %certificate.site,
                serial = %certificate.serial,
                names = certificate.names.len(),
                %problem,
                "stored certificate not served to Envoy (it would reject it); an older one keeps serving if there is one"
            );
            false
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
