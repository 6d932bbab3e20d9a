//! The filter's policy, projected from the store and served at `GET /v1/policy` on the internal
//! listener: a snapshot (the whole document), or with `?since=<version>` a delta (the sites
//! upserted and removed since), or a 304, after holding the request up to `wait_ms` for a change
//! (long poll). Versions are `<epoch>-<n>`: a random epoch per feed start, `n` strictly
//! increasing; the `ETag` is the version and an `If-None-Match` of the current one is a 304.
//!
//! The feed holds every site's entry and recomputes only the sites the store's change log names,
//! those whose certificate validity boundary passed (so `cert_ready` follows time, not only
//! changes) and, when the report-token epoch turns, the report-mode sites. Each entry is checked
//! with the filter's own validation: a site whose entry fails keeps its last good entry (or stays
//! out) and is reported, and the others are served.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use autohttps_filter::policy::{
    HstsSpec, Policy, PolicyDocument, SCHEMA_VERSION, Settings, SiteSpec, compact, content_hash,
};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::clock::Clock;
use crate::csp_reports::{ReportTokens, TOKEN_EPOCH_SECS};
use crate::error::{Error, Result};
use crate::store::{CertificateCoverage, MixedContent, Site, Store, StoredCertificate};

/// The path the filter polls.
pub const POLICY_PATH: &str = "/v1/policy";

/// A built policy document and how long what it says stays true.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltPolicy {
    /// The document.
    pub document: PolicyDocument,
    /// The soonest moment after `now` when a current certificate expires or becomes valid
    /// (its `not_after` or a future `not_before`): from then on `cert_ready` would read
    /// differently, so the document must be rebuilt even if the store did not change. `None`
    /// when no certificate has a boundary ahead.
    pub valid_until: Option<OffsetDateTime>,
}

/// Builds the policy document for these sites and their current certificates. A name is
/// `cert_ready` when a certificate of its site that is valid at `now` covers it; a site in
/// `report` mode carries its report token for the epoch of `now`, when `tokens` are given. The
/// version is a hash of the content, so that identical content always has the same ETag, on
/// every sidecar of a fleet (sharing the token key).
///
/// Linear in sites and certificates: certificates are grouped by site once, and each site's
/// `cert_ready` looks only at its own.
pub fn build_policy(
    sites: &[Site],
    certificates: &[StoredCertificate],
    settings: &Settings,
    tokens: Option<&ReportTokens>,
    now: OffsetDateTime,
) -> BuiltPolicy {
    let mut valid_until: Option<OffsetDateTime> = None;
    let coverage: Vec<CertificateCoverage> = certificates.iter().map(Into::into).collect();
    let mut specs: Vec<SiteSpec> = site_entries(sites, &coverage, tokens, now)
        .into_iter()
        .map(|(spec, boundary)| {
            if let Some(at) = boundary {
                valid_until = Some(valid_until.map_or(at, |soonest| soonest.min(at)));
            }
            spec
        })
        .collect();
    specs.sort_by(|a, b| a.id.cmp(&b.id));
    let mut document = PolicyDocument {
        schema: SCHEMA_VERSION,
        version: String::new(),
        settings: settings.clone(),
        sites: specs,
    };
    stamp_version(&mut document);
    BuiltPolicy {
        document,
        valid_until,
    }
}

/// [`build_policy`]'s document alone.
pub fn build_document(
    sites: &[Site],
    certificates: &[StoredCertificate],
    settings: &Settings,
    tokens: Option<&ReportTokens>,
    now: OffsetDateTime,
) -> PolicyDocument {
    build_policy(sites, certificates, settings, tokens, now).document
}

/// Each site's entry as of `now` (see [`site_entry`]), in the order of `sites`: certificates are
/// grouped by site once, so this is linear in sites and certificates.
fn site_entries(
    sites: &[Site],
    certificates: &[CertificateCoverage],
    tokens: Option<&ReportTokens>,
    now: OffsetDateTime,
) -> Vec<(SiteSpec, Option<OffsetDateTime>)> {
    let mut by_site: HashMap<&str, Vec<&CertificateCoverage>> = HashMap::new();
    for certificate in certificates {
        by_site
            .entry(certificate.site.as_str())
            .or_default()
            .push(certificate);
    }
    sites
        .iter()
        .map(|site| {
            let certificates = by_site
                .get(site.name.as_str())
                .map_or(&[][..], Vec::as_slice);
            site_entry(site, certificates, tokens, now)
        })
        .collect()
}

/// One site's entry as of `now` from its current (not superseded) certificates, and the
/// soonest moment after `now` when one of them expires or becomes valid: from then on its
/// `cert_ready` reads differently, so the entry must be recomputed even if the store did not
/// change (`None`: no boundary ahead).
pub fn site_entry(
    site: &Site,
    certificates: &[&CertificateCoverage],
    tokens: Option<&ReportTokens>,
    now: OffsetDateTime,
) -> (SiteSpec, Option<OffsetDateTime>) {
    let mut boundary: Option<OffsetDateTime> = None;
    let mut ahead = |at: OffsetDateTime| {
        boundary = Some(boundary.map_or(at, |soonest| soonest.min(at)));
    };
    let mut valid_now = Vec::with_capacity(certificates.len());
    for certificate in certificates {
        if certificate.not_before > now {
            ahead(certificate.not_before);
        } else if certificate.not_after > now {
            ahead(certificate.not_after);
            valid_now.push(*certificate);
        }
    }
    let spec = site_spec(site, &valid_now, tokens, ReportTokens::epoch(now));
    (spec, boundary)
}

/// One site's entry; `current` are its certificates valid now; a report-mode site carries its
/// report token for `epoch` when `tokens` are given.
fn site_spec(
    site: &Site,
    current: &[&CertificateCoverage],
    tokens: Option<&ReportTokens>,
    epoch: i64,
) -> SiteSpec {
    let hostnames: Vec<String> = site
        .hostnames
        .iter()
        .map(|h| h.name.as_str().to_string())
        .collect();
    let cert_ready = site
        .hostnames
        .iter()
        .filter(|h| current.iter().any(|c| c.covers(&h.name)))
        .map(|h| h.name.as_str().to_string())
        .collect();
    SiteSpec {
        id: site.name.clone(),
        hostnames,
        https: site.policy.https,
        redirect: site.policy.redirect,
        // Only one of the site's names: anything else would make the filter refuse the entry.
        canonical_host: site
            .policy
            .canonical_host
            .as_ref()
            .filter(|c| {
                !c.as_str().starts_with("*.") && site.hostnames.iter().any(|h| &h.name == *c)
            })
            .map(|c| c.as_str().to_string()),
        hsts: HstsSpec {
            enabled: site.policy.hsts.enabled,
            max_age: site.policy.hsts.max_age,
            include_subdomains: site.policy.hsts.include_subdomains,
            preload: site.policy.hsts.preload,
        },
        mixed_content: site.policy.mixed_content,
        report_uri: None,
        report_token: tokens
            .filter(|_| site.policy.mixed_content == MixedContent::Report)
            .map(|tokens| tokens.token(&site.name, epoch)),
        cert_ready,
    }
}

/// Sets the document's version to the hash of its content (with an empty version).
fn stamp_version(document: &mut PolicyDocument) {
    document.version.clear();
    let content = serde_json::to_vec(&*document).unwrap_or_default();
    document.version = format!("{:016x}", content_hash(&content));
}

/// A site left out of the served policy because its entry fails the filter's validation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RejectedSite {
    /// The site's id.
    pub site: String,
    /// What the filter's validation says is wrong, one problem each (paths inside the site's
    /// entry, e.g. `hostnames[1]: ...`).
    pub problems: Vec<String>,
    /// Whether the site's previous good entry is served in its place (else the site is absent
    /// from the policy, so the edge treats its names as unknown).
    pub previous_kept: bool,
}

/// Validates `document` with the filter's own rules, site by site: a site whose entry fails is
/// replaced by its entry in `last_good` (the last served document, sites sorted by id; with
/// `hostnames` narrowed to the names the site still has and `cert_ready` to the names the current
/// build says are ready, so an old entry never claims a name or certificate it no longer has)
/// or, without one, left out. Returns the document that validates (re-versioned when anything
/// was replaced) and the rejected sites, or the filter's error when something outside the
/// sites (the settings) is wrong, which no site can be blamed for.
pub fn isolate_invalid_sites(
    mut document: PolicyDocument,
    last_good: Option<&PolicyDocument>,
) -> std::result::Result<(PolicyDocument, Vec<RejectedSite>), autohttps_filter::Error> {
    let previous_entry = |id: &str| {
        let sites = &last_good?.sites;
        let at = sites.binary_search_by(|s| s.id.as_str().cmp(id)).ok()?;
        sites.get(at)
    };
    let mut rejected: Vec<RejectedSite> = Vec::new();
    // Pass 1 replaces failing sites with their last good entries; pass 2 drops any of those
    // that still fail (e.g. a kept entry's name now belongs to another site); pass 3 must pass.
    let mut pass = 0;
    loop {
        let error = match Policy::compile(&document) {
            Ok(_) => {
                if !rejected.is_empty() {
                    stamp_version(&mut document);
                }
                return Ok((document, rejected));
            }
            Err(error) => error,
        };
        if pass == 2 {
            return Err(error);
        }
        let mut problems_by_index: HashMap<usize, Vec<String>> = HashMap::new();
        for problem in error.problems() {
            match site_problem(&problem.path) {
                Some((index, inner)) if index < document.sites.len() => problems_by_index
                    .entry(index)
                    .or_default()
                    .push(format!("{inner}: {}", problem.message)),
                _ => return Err(error),
            }
        }
        let mut drop = vec![false; document.sites.len()];
        for (index, problems) in problems_by_index {
            let spec = &mut document.sites[index];
            let earlier = rejected.iter_mut().find(|r| r.site == spec.id);
            let previous = previous_entry(&spec.id).filter(|_| earlier.is_none());
            match previous {
                Some(previous) => {
                    let mut kept = previous.clone();
                    // The names the site no longer has may belong to another site by now.
                    kept.hostnames
                        .retain(|name| spec.hostnames.iter().any(|now| now == name));
                    kept.cert_ready
                        .retain(|name| spec.cert_ready.iter().any(|ready| ready == name));
                    rejected.push(RejectedSite {
                        site: spec.id.clone(),
                        problems,
                        previous_kept: true,
                    });
                    *spec = kept;
                }
                None => {
                    match earlier {
                        Some(earlier) => earlier.previous_kept = false,
                        None => rejected.push(RejectedSite {
                            site: spec.id.clone(),
                            problems,
                            previous_kept: false,
                        }),
                    }
                    drop[index] = true;
                }
            }
        }
        let mut index = 0;
        document.sites.retain(|_| {
            index += 1;
            !drop[index - 1]
        });
        pass += 1;
    }
}

/// Splits a problem path `sites[7].hostnames[1]` into the site's index and the rest.
fn site_problem(path: &str) -> Option<(usize, &str)> {
    let rest = path.strip_prefix("sites[")?;
    let (index, rest) = rest.split_once(']')?;
    let index = index.parse().ok()?;
    Some((index, rest.strip_prefix('.').unwrap_or(rest)))
}

/// The header that says what a 200 from the feed carries: [`KIND_SNAPSHOT`] or [`KIND_DELTA`].
pub const POLICY_KIND_HEADER: &str = "autohttps-policy-kind";
/// A whole [`PolicyDocument`].
pub const KIND_SNAPSHOT: &str = "snapshot";
/// A [`PolicyDelta`] from the request's `since`.
pub const KIND_DELTA: &str = "delta";
/// The longest a request is held for a change (`wait_ms` is capped to this).
pub const MAX_WAIT_MS: u64 = 30_000;
/// The most versions whose changed sites the feed remembers to answer deltas.
pub const HISTORY_MAX_VERSIONS: usize = 4096;
/// The fewest versions it remembers (the protocol promises deltas over at least this many).
pub const HISTORY_MIN_VERSIONS: usize = 1024;
/// A version that changed more sites than this is remembered as "too many": a VM older than it
/// gets a snapshot (keeps the history's memory bounded).
const HISTORY_MAX_SITES_PER_VERSION: usize = 1024;
/// The history is trimmed (down to [`HISTORY_MIN_VERSIONS`]) while it lists more site ids.
const HISTORY_MAX_SITE_IDS: usize = 262_144;
/// Change-log rows read per store call.
const CHANGE_BATCH_ROWS: usize = 10_000;
/// Sites read (and validated) per store call when the feed loads every site.
const LOAD_PAGE_SITES: usize = 500;

/// The delta body's type is the filter's own (deltas are assembled from entries already
/// serialised, so this is what tests and other readers parse them with).
pub use autohttps_filter::policy::PolicyDelta;

/// What the feed answers a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedAnswer {
    /// Nothing newer than what the client has (or than its `If-None-Match`).
    NotModified {
        /// The current version.
        version: String,
    },
    /// The whole policy.
    Snapshot {
        /// Its version.
        version: String,
        /// The [`PolicyDocument`]'s JSON (shared by every request for this version).
        body: Bytes,
    },
    /// The changes since the client's version.
    Delta {
        /// The version it makes.
        version: String,
        /// The [`PolicyDelta`]'s JSON.
        body: Bytes,
    },
}

/// [`FeedAnswer`] as the feed holds it: a snapshot stays in its parts until it is sent.
#[derive(Debug)]
enum Served {
    NotModified {
        version: String,
    },
    Snapshot {
        version: String,
        parts: Arc<SnapshotParts>,
    },
    Delta {
        version: String,
        body: Bytes,
    },
    /// A snapshot in the compact encoding (`policy::compact`), for a client that asked for it.
    Compact {
        version: String,
        body: Bytes,
    },
}

/// The bytes a snapshot's body is made of, in order: `head` (up to the opening `[` of
/// `sites`), the entries separated by commas, then [`SNAPSHOT_TAIL`].
#[derive(Debug)]
struct SnapshotParts {
    head: Bytes,
    entries: Vec<Bytes>,
    /// The body's length.
    len: usize,
}

/// What closes a snapshot's body.
const SNAPSHOT_TAIL: &[u8] = b"]}";
/// About how many bytes each piece of a streamed snapshot holds.
const SNAPSHOT_CHUNK_BYTES: usize = 64 * 1024;

impl SnapshotParts {
    fn new(head: Bytes, entries: Vec<Bytes>) -> Self {
        let len = head.len()
            + entries.iter().map(Bytes::len).sum::<usize>()
            + entries.len().saturating_sub(1)
            + SNAPSHOT_TAIL.len();
        SnapshotParts { head, entries, len }
    }

    /// The next piece of the body from `cursor` (the next entry's index; `None` once the body
    /// is complete), about [`SNAPSHOT_CHUNK_BYTES`] long.
    fn piece(&self, cursor: &mut Option<usize>) -> Option<Bytes> {
        let mut at = (*cursor)?;
        let mut out = Vec::with_capacity(SNAPSHOT_CHUNK_BYTES + 1024);
        if at == 0 {
            out.extend_from_slice(&self.head);
        }
        while at < self.entries.len() && out.len() < SNAPSHOT_CHUNK_BYTES {
            if at > 0 {
                out.push(b',');
            }
            out.extend_from_slice(&self.entries[at]);
            at += 1;
        }
        if at == self.entries.len() {
            out.extend_from_slice(SNAPSHOT_TAIL);
            *cursor = None;
        } else {
            *cursor = Some(at);
        }
        Some(Bytes::from(out))
    }

    /// The whole body in one buffer.
    fn contiguous(&self) -> Bytes {
        let mut body = Vec::with_capacity(self.len);
        let mut cursor = Some(0);
        while let Some(piece) = self.piece(&mut cursor) {
            body.extend_from_slice(&piece);
        }
        Bytes::from(body)
    }

    /// The body as a stream of pieces, made as the client reads them.
    fn stream(
        self: Arc<Self>,
    ) -> impl futures::Stream<Item = std::result::Result<Bytes, std::convert::Infallible>> {
        futures::stream::unfold((self, Some(0)), |(parts, mut cursor)| async move {
            let piece = parts.piece(&mut cursor)?;
            Some((Ok(piece), (parts, cursor)))
        })
    }
}

/// One site's served entry.
#[derive(Debug, Clone)]
struct SiteEntry {
    /// Its [`SiteSpec`] as JSON: what snapshots and deltas are assembled from (shared, not
    /// copied, by the snapshots being sent).
    json: Bytes,
    /// When its `cert_ready` changes with time alone (a certificate expires or becomes valid).
    boundary: Option<OffsetDateTime>,
    /// Whether it carries a report token (recomputed when the token epoch turns).
    report_mode: bool,
}

/// What a full load gathers, a page at a time, before it replaces the served state.
#[derive(Debug, Default)]
struct FullLoad {
    entries: BTreeMap<String, SiteEntry>,
    boundaries: BTreeSet<(OffsetDateTime, String)>,
    rejected: BTreeMap<String, RejectedSite>,
}

/// A version's changed sites, or `None`: too many to remember (answer with a snapshot).
type Changed = Option<Vec<String>>;

/// The feed's state: every site's entry, and how it got there.
#[derive(Debug, Default)]
struct FeedState {
    /// Whether the first full load ran.
    loaded: bool,
    /// Whether an incremental refresh failed part way (a store error): the next one reloads
    /// everything, so no change read from the log is lost.
    reload_everything: bool,
    /// The change-log position the entries reflect.
    last_seq: u64,
    /// The store's watch generations (sites, certificates) last read.
    generations: (u64, u64),
    /// The report-token epoch the entries were made for.
    token_epoch: i64,
    /// The current version's `n`.
    version: u64,
    /// The served entries by site id (sorted, as in a snapshot).
    entries: BTreeMap<String, SiteEntry>,
    /// Each entry's time boundary, soonest first.
    boundaries: BTreeSet<(OffsetDateTime, String)>,
    /// The last versions and the sites each changed, oldest first, contiguous up to `version`.
    history: VecDeque<(u64, Changed)>,
    /// Site ids listed in `history`.
    history_site_ids: usize,
    /// Sites whose entries fail the filter's validation, by id.
    rejected: BTreeMap<String, RejectedSite>,
    /// The parts of one version's snapshot (its entries shared, not copied), gathered on
    /// first request and streamed to every request for that version.
    snapshot: Option<(u64, Arc<SnapshotParts>)>,
}

/// Serves the policy feed: keeps every site's entry in memory and, when the store's change log
/// or the clock says something changed, recomputes only those sites, making a new version whose
/// changed sites it remembers, so a VM that holds an older version gets only the difference.
#[derive(Clone)]
pub struct PolicyFeed {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    settings: Settings,
    tokens: ReportTokens,
    /// 16 lowercase hex digits chosen at start: versions of other epochs are not comparable.
    epoch: Arc<str>,
    sites_changed: watch::Receiver<u64>,
    certificates_changed: watch::Receiver<u64>,
    state: Arc<Mutex<FeedState>>,
    /// The compact snapshot of one version, encoded on first request.
    compact: Arc<Mutex<Option<(String, Bytes)>>>,
}

impl std::fmt::Debug for PolicyFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyFeed")
            .field("settings", &self.settings)
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl PolicyFeed {
    /// A feed over this store; `tokens` make the report-mode sites' report tokens.
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        settings: Settings,
        tokens: ReportTokens,
    ) -> Self {
        let sites_changed = store.sites_changed();
        let certificates_changed = store.certificates_changed();
        PolicyFeed {
            store,
            clock,
            settings,
            tokens,
            epoch: format!("{:016x}", rand::random::<u64>()).into(),
            sites_changed,
            certificates_changed,
            state: Arc::new(Mutex::new(FeedState::default())),
            compact: Arc::new(Mutex::new(None)),
        }
    }

    /// The router for the internal listener.
    pub fn router(self) -> Router {
        Router::new()
            .route(POLICY_PATH, get(serve_policy))
            .with_state(self)
    }

    /// This feed's epoch: the first half of its versions.
    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    fn lock(&self) -> MutexGuard<'_, FeedState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn version_text(&self, n: u64) -> String {
        format!("{}-{n}", self.epoch)
    }

    /// Brings the entries up to date: everything at the first call (or when the change log
    /// lost this feed's position), else only the sites the change log names, those whose
    /// certificate validity boundary passed (through the `Clock`) and, when the report-token
    /// epoch turned, the report-mode sites.
    pub fn refresh(&self) -> Result<()> {
        let now = self.clock.now();
        let generations = (
            *self.sites_changed.borrow(),
            *self.certificates_changed.borrow(),
        );
        let token_epoch = ReportTokens::epoch(now);
        let mut state = self.lock();
        if !state.loaded {
            state.generations = generations;
            return self.load_everything(&mut state, now);
        }
        if state.reload_everything {
            state.generations = generations;
            return self.load_everything(&mut state, now);
        }
        let boundary_passed = state.boundaries.first().is_some_and(|(at, _)| *at <= now);
        if state.generations == generations && state.token_epoch == token_epoch && !boundary_passed
        {
            return Ok(());
        }
        state.generations = generations;
        let mut changed = Vec::new();
        let refreshed = self.refresh_changed(&mut state, token_epoch, now, &mut changed);
        if refreshed.is_err() {
            state.reload_everything = true;
        }
        // What was recomputed before an error is served (and remembered) all the same.
        self.record_version(&mut state, changed);
        refreshed
    }

    /// [`PolicyFeed::refresh`]'s incremental part: recomputes the sites the change log, the
    /// clock and the token epoch name, pushing those whose served entry changed to `changed`.
    fn refresh_changed(
        &self,
        state: &mut FeedState,
        token_epoch: i64,
        now: OffsetDateTime,
        changed: &mut Vec<String>,
    ) -> Result<()> {
        let mut dirty: BTreeSet<String> = BTreeSet::new();
        let reload_threshold = (state.entries.len() / 4).max(HISTORY_MAX_SITES_PER_VERSION);
        loop {
            let batch = self
                .store
                .site_changes_since(state.last_seq, CHANGE_BATCH_ROWS)?;
            if !batch.complete {
                tracing::info!(
                    after = state.last_seq,
                    "the store's change log no longer reaches back to the feed's position; reloading every site"
                );
                return self.load_everything(state, now);
            }
            let done = batch.sites.is_empty();
            state.last_seq = batch.last_seq;
            dirty.extend(batch.sites);
            if done {
                break;
            }
            if dirty.len() > reload_threshold {
                return self.load_everything(state, now);
            }
        }
        while let Some((at, _)) = state.boundaries.first()
            && *at <= now
        {
            if let Some((_, site)) = state.boundaries.pop_first() {
                dirty.insert(site);
            }
        }
        if state.token_epoch != token_epoch {
            state.token_epoch = token_epoch;
            dirty.extend(
                state
                    .entries
                    .iter()
                    .filter(|(_, entry)| entry.report_mode)
                    .map(|(id, _)| id.clone()),
            );
        }
        for id in dirty {
            if self.recompute_site(state, &id, now)? {
                changed.push(id);
            }
        }
        Ok(())
    }

    /// Reloads one site from the store and replaces its entry; true when the served entry
    /// changed (added, changed or removed).
    fn recompute_site(&self, state: &mut FeedState, id: &str, now: OffsetDateTime) -> Result<bool> {
        let Some(site) = self.store.site(id)? else {
            state.rejected.remove(id);
            return Ok(match state.entries.remove(id) {
                Some(old) => {
                    if let Some(at) = old.boundary {
                        state.boundaries.remove(&(at, id.to_string()));
                    }
                    true
                }
                None => false,
            });
        };
        let certificates = self.store.current_certificates(id)?;
        let certificates: Vec<CertificateCoverage> = certificates.iter().map(Into::into).collect();
        let certificates: Vec<&CertificateCoverage> = certificates.iter().collect();
        let (spec, boundary) = site_entry(&site, &certificates, Some(&self.tokens), now);
        let report_mode = spec.report_token.is_some();
        let previous = state
            .entries
            .get(id)
            .and_then(|entry| serde_json::from_slice::<SiteSpec>(&entry.json).ok())
            .map(|spec| self.document(vec![spec]));
        let checked = match Policy::compile(&self.document(vec![spec.clone()])) {
            Ok(_) => Ok((Some(spec), None)),
            Err(_) => isolate_invalid_sites(self.document(vec![spec]), previous.as_ref()).map(
                |(mut document, rejected)| (document.sites.pop(), rejected.into_iter().next()),
            ),
        };
        let (served, rejected) = match checked {
            Ok(checked) => checked,
            Err(error) => {
                // Only the settings can fail outside a site, and they were checked at start.
                return Err(Error::Internal(format!(
                    "the edge settings fail the filter's validation: {error}"
                )));
            }
        };
        match rejected {
            Some(rejected) => {
                report_rejected(&rejected);
                state.rejected.insert(id.to_string(), rejected);
            }
            None => {
                state.rejected.remove(id);
            }
        }
        let old = state.entries.remove(id);
        if let Some(at) = old.as_ref().and_then(|old| old.boundary) {
            state.boundaries.remove(&(at, id.to_string()));
        }
        let Some(served) = served else {
            return Ok(old.is_some());
        };
        let json = Bytes::from(
            serde_json::to_vec(&served)
                .map_err(|e| Error::Internal(format!("serialising site {id}'s entry: {e}")))?,
        );
        let changed = old.is_none_or(|old| old.json != json);
        if let Some(at) = boundary {
            state.boundaries.insert((at, id.to_string()));
        }
        state.entries.insert(
            id.to_string(),
            SiteEntry {
                json,
                boundary,
                report_mode,
            },
        );
        Ok(changed)
    }

    /// Loads every site (at start, or when the change log lost this feed's position) a page at
    /// a time, validates each page's entries (a site's entry is valid or not on its own: names
    /// and ids are unique in the store) and records a version for the entries that differ from
    /// before. Never holds more than one page of sites, certificates and parsed entries.
    fn load_everything(&self, state: &mut FeedState, now: OffsetDateTime) -> Result<()> {
        // The position first: a change committed while loading is read again, never lost.
        let last_seq = self.store.latest_change_seq()?;
        let mut old_entries = std::mem::take(&mut state.entries);
        let mut load = FullLoad::default();
        let mut changed = Vec::new();
        let mut after: Option<String> = None;
        let loaded = loop {
            let page = match self.store.sites_page(after.as_deref(), LOAD_PAGE_SITES) {
                Ok(page) => page,
                Err(error) => break Err(error),
            };
            let Some((last, _)) = page.last() else {
                break Ok(());
            };
            after = Some(last.name.clone());
            let full_page = page.len() == LOAD_PAGE_SITES;
            if let Err(error) = self.load_page(page, &old_entries, state.loaded, now, &mut load) {
                break Err(error);
            }
            if !full_page {
                break Ok(());
            }
        };
        if let Err(error) = loaded {
            // The served entries stay as they were; the next refresh loads everything again.
            state.entries = old_entries;
            return Err(error);
        }
        for (id, entry) in &load.entries {
            if old_entries
                .remove(id)
                .is_none_or(|old| old.json != entry.json)
            {
                changed.push(id.clone());
            }
        }
        changed.extend(old_entries.into_keys());
        state.entries = load.entries;
        state.boundaries = load.boundaries;
        state.rejected = load.rejected;
        for site in state.rejected.values() {
            report_rejected(site);
        }
        state.last_seq = last_seq;
        state.reload_everything = false;
        state.token_epoch = ReportTokens::epoch(now);
        if state.loaded {
            self.record_version(state, changed);
        } else {
            state.loaded = true;
            state.version = 1;
        }
        tracing::info!(
            version = %self.version_text(state.version),
            sites = state.entries.len(),
            rejected = state.rejected.len(),
            "policy loaded from every site in the store"
        );
        Ok(())
    }

    /// One page of [`PolicyFeed::load_everything`]: each site's entry as of `now`, validated
    /// together (with `previous` entries, when `had_previous`, kept for sites that fail), added
    /// to `into`.
    fn load_page(
        &self,
        page: Vec<(Site, Vec<CertificateCoverage>)>,
        previous: &BTreeMap<String, SiteEntry>,
        had_previous: bool,
        now: OffsetDateTime,
        into: &mut FullLoad,
    ) -> Result<()> {
        let FullLoad {
            entries,
            boundaries,
            rejected: rejected_sites,
        } = into;
        let mut page_boundaries: HashMap<String, OffsetDateTime> = HashMap::new();
        let mut specs = Vec::with_capacity(page.len());
        for (site, certificates) in page {
            let coverage: Vec<&CertificateCoverage> = certificates.iter().collect();
            let (spec, boundary) = site_entry(&site, &coverage, Some(&self.tokens), now);
            if let Some(at) = boundary {
                page_boundaries.insert(spec.id.clone(), at);
            }
            specs.push(spec);
        }
        specs.sort_by(|a, b| a.id.cmp(&b.id));
        let document = self.document(specs);
        let (document, rejected) = match Policy::compile(&document) {
            Ok(_) => (document, Vec::new()),
            Err(_) => {
                let last_good = had_previous.then(|| {
                    self.document(
                        document
                            .sites
                            .iter()
                            .filter_map(|spec| previous.get(&spec.id))
                            .filter_map(|entry| serde_json::from_slice(&entry.json).ok())
                            .collect(),
                    )
                });
                isolate_invalid_sites(document, last_good.as_ref()).map_err(|error| {
                    Error::Internal(format!(
                        "the edge settings fail the filter's validation: {error}"
                    ))
                })?
            }
        };
        for site in rejected {
            rejected_sites.insert(site.site.clone(), site);
        }
        for spec in document.sites {
            let json = Bytes::from(serde_json::to_vec(&spec).map_err(|e| {
                Error::Internal(format!("serialising site {}'s entry: {e}", spec.id))
            })?);
            let boundary = page_boundaries.remove(&spec.id);
            if let Some(at) = boundary {
                boundaries.insert((at, spec.id.clone()));
            }
            entries.insert(
                spec.id,
                SiteEntry {
                    json,
                    boundary,
                    report_mode: spec.report_token.is_some(),
                },
            );
        }
        Ok(())
    }

    /// A document of these sites with the edge settings (its version is a placeholder: only
    /// snapshots carry a real one).
    fn document(&self, sites: Vec<SiteSpec>) -> PolicyDocument {
        PolicyDocument {
            schema: SCHEMA_VERSION,
            version: self.version_text(0),
            settings: self.settings.clone(),
            sites,
        }
    }

    /// Makes a new version when `changed` lists any site, remembering them (bounded).
    fn record_version(&self, state: &mut FeedState, changed: Vec<String>) {
        if changed.is_empty() {
            return;
        }
        state.version += 1;
        state.snapshot = None;
        tracing::info!(
            version = %self.version_text(state.version),
            changed = changed.len(),
            sites = state.entries.len(),
            "policy changed"
        );
        let remembered = (changed.len() <= HISTORY_MAX_SITES_PER_VERSION).then_some(changed);
        state.history_site_ids += remembered.as_ref().map_or(0, Vec::len);
        let version = state.version;
        state.history.push_back((version, remembered));
        while state.history.len() > HISTORY_MAX_VERSIONS
            || (state.history_site_ids > HISTORY_MAX_SITE_IDS
                && state.history.len() > HISTORY_MIN_VERSIONS)
        {
            if let Some((_, Some(ids))) = state.history.pop_front() {
                state.history_site_ids -= ids.len();
            }
        }
    }

    /// Answers a request: `since` is the client's current version (absent: it has none),
    /// `if_none_match` the last version it saw (applied or rejected), from its header.
    pub fn answer(&self, since: Option<&str>, if_none_match: Option<&str>) -> Result<FeedAnswer> {
        Ok(match self.answer_parts(since, if_none_match)? {
            Served::NotModified { version } => FeedAnswer::NotModified { version },
            Served::Delta { version, body } => FeedAnswer::Delta { version, body },
            Served::Compact { version, body } => FeedAnswer::Snapshot { version, body },
            Served::Snapshot { version, parts } => FeedAnswer::Snapshot {
                version,
                body: parts.contiguous(),
            },
        })
    }

    /// [`PolicyFeed::answer`] with a snapshot left in its parts, which the HTTP answer streams
    /// (so a snapshot is never held as one more copy of every entry).
    fn answer_parts(&self, since: Option<&str>, if_none_match: Option<&str>) -> Result<Served> {
        self.refresh()?;
        let mut state = self.lock();
        let current = state.version;
        let version = self.version_text(current);
        let seen = if_none_match.is_some_and(|header| {
            header
                .split(',')
                .map(|tag| tag.trim().trim_matches('"'))
                .any(|tag| tag == version || tag == "*")
        });
        if seen || since == Some(version.as_str()) {
            return Ok(Served::NotModified { version });
        }
        if let Some(body) = since.and_then(|since| self.delta(&state, since)) {
            return Ok(Served::Delta {
                version,
                body: body?,
            });
        }
        let parts = match &state.snapshot {
            Some((n, parts)) if *n == current => Arc::clone(parts),
            _ => {
                let parts = Arc::new(self.snapshot_parts(&state, &version));
                state.snapshot = Some((current, Arc::clone(&parts)));
                parts
            }
        };
        Ok(Served::Snapshot { version, parts })
    }

    /// The delta from `since` to the current version, or `None` when it cannot be told
    /// (another epoch, not a version of this feed, older than the history, or so large a
    /// snapshot serves better).
    fn delta(&self, state: &FeedState, since: &str) -> Option<Result<Bytes>> {
        let (epoch, n) = since.split_once('-')?;
        let from: u64 = n.parse().ok()?;
        if epoch != &*self.epoch || from >= state.version {
            return None;
        }
        let oldest = state.history.front()?.0;
        if oldest > from + 1 {
            return None;
        }
        let mut ids: BTreeSet<&str> = BTreeSet::new();
        for (version, changed) in state.history.iter().rev() {
            if *version <= from {
                break;
            }
            ids.extend(changed.as_ref()?.iter().map(String::as_str));
        }
        if ids.len() > HISTORY_MAX_SITES_PER_VERSION.max(state.entries.len() / 2) {
            return None;
        }
        let mut upsert: Vec<&[u8]> = Vec::new();
        let mut remove: Vec<&str> = Vec::new();
        for id in ids {
            match state.entries.get(id) {
                Some(entry) => upsert.push(&entry.json),
                None => remove.push(id),
            }
        }
        Some(delta_body(
            since,
            &self.version_text(state.version),
            &upsert,
            &remove,
        ))
    }

    /// The whole document's JSON as its parts: the opening (schema, version, settings) and
    /// the entries' JSON, shared (the same bytes a [`PolicyDocument`] serialises to once
    /// joined, see [`SnapshotParts`]).
    fn snapshot_parts(&self, state: &FeedState, version: &str) -> SnapshotParts {
        let settings = &self.settings;
        let mut head = Vec::with_capacity(256);
        head.extend_from_slice(format!("{{\"schema\":{SCHEMA_VERSION},\"version\":").as_bytes());
        json_string(&mut head, version);
        head.extend_from_slice(b",\"settings\":");
        head.extend_from_slice(&serde_json::to_vec(&settings).unwrap_or_else(|_| b"{}".to_vec()));
        head.extend_from_slice(b",\"sites\":[");
        SnapshotParts::new(
            Bytes::from(head),
            state.entries.values().map(|e| e.json.clone()).collect(),
        )
    }

    /// The current policy as a compact snapshot (see `autohttps_filter::policy::compact`), with
    /// its version: what the filter asks for, read a slice at a time with no JSON parser.
    /// Encoded from the served entries once per version.
    pub fn compact_snapshot(&self) -> Result<(String, Bytes)> {
        let state = self.lock();
        let version = self.version_text(state.version);
        let mut cached = self.compact.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((v, body)) = &*cached
            && *v == version
        {
            return Ok((version, body.clone()));
        }
        *cached = None;
        let settings = Settings {
            trusted_proxies: self.settings.trusted_proxies.clone(),
            http_port: self.settings.http_port,
            https_port: self.settings.https_port,
        };
        let json_bytes: usize = state.entries.values().map(|e| e.json.len()).sum();
        let mut encoder = compact::SnapshotEncoder::new(&version, &settings, json_bytes / 2)
            .map_err(|e| Error::Internal(format!("encoding the compact snapshot: {e}")))?;
        for entry in state.entries.values() {
            let site: SiteSpec = serde_json::from_slice(&entry.json)
                .map_err(|e| Error::Internal(format!("reading a site entry: {e}")))?;
            encoder
                .push(&site)
                .map_err(|e| Error::Internal(format!("encoding the compact snapshot: {e}")))?;
        }
        let body = Bytes::from(encoder.finish());
        *cached = Some((version.clone(), body.clone()));
        Ok((version, body))
    }

    /// The current version.
    pub fn version(&self) -> Result<String> {
        self.refresh()?;
        Ok(self.version_text(self.lock().version))
    }

    /// The current policy as a snapshot: its JSON, ETag and version.
    pub fn current(&self) -> Result<(Bytes, HeaderValue, String)> {
        match self.answer(None, None)? {
            FeedAnswer::Snapshot { version, body } | FeedAnswer::Delta { version, body } => {
                Ok((body, etag_of(&version)?, version))
            }
            FeedAnswer::NotModified { version } => Err(Error::Internal(format!(
                "the feed answered 304 to a request for a snapshot (version {version})"
            ))),
        }
    }

    /// When the entries next change with time alone: the soonest certificate validity
    /// boundary or the next report-token epoch.
    pub fn next_time_boundary(&self) -> OffsetDateTime {
        let state = self.lock();
        let next_epoch = OffsetDateTime::from_unix_timestamp(
            (state.token_epoch + 1).saturating_mul(TOKEN_EPOCH_SECS),
        )
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
        state
            .boundaries
            .first()
            .map_or(next_epoch, |(at, _)| (*at).min(next_epoch))
    }

    /// The sites left out of (or kept at their previous entry in) the policy served now, each
    /// with the filter's problems, by id; empty when every site's entry validates.
    pub fn rejected_sites(&self) -> Vec<RejectedSite> {
        self.lock().rejected.values().cloned().collect()
    }

    /// How many sites [`PolicyFeed::rejected_sites`] lists.
    pub fn rejected_count(&self) -> usize {
        self.lock().rejected.len()
    }

    /// Why a site's entry is not served as the store says, when it fails the filter's
    /// validation (as of the feed's last look at the store).
    pub fn rejected_site(&self, site: &str) -> Option<RejectedSite> {
        self.lock().rejected.get(site).cloned()
    }
}

/// Logs a rejected site at WARN, naming it and its problems.
fn report_rejected(site: &RejectedSite) {
    tracing::warn!(
        site = %site.site,
        problems = %site.problems.join("; "),
        previous_kept = site.previous_kept,
        "a site's policy entry fails the filter's validation: it is left out of the policy (its previous good entry kept when it had one); every other site is served"
    );
}

/// Appends `text` as a JSON string.
fn json_string(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(&serde_json::to_vec(text).unwrap_or_else(|_| b"\"\"".to_vec()));
}

/// A [`PolicyDelta`]'s JSON from entries already serialised.
fn delta_body(from: &str, version: &str, upsert: &[&[u8]], remove: &[&str]) -> Result<Bytes> {
    let mut body = Vec::with_capacity(upsert.iter().map(|e| e.len() + 1).sum::<usize>() + 128);
    body.extend_from_slice(format!("{{\"schema\":{SCHEMA_VERSION},\"from\":").as_bytes());
    json_string(&mut body, from);
    body.extend_from_slice(b",\"version\":");
    json_string(&mut body, version);
    body.extend_from_slice(b",\"upsert\":[");
    for (index, entry) in upsert.iter().enumerate() {
        if index > 0 {
            body.push(b',');
        }
        body.extend_from_slice(entry);
    }
    body.extend_from_slice(b"],\"remove\":");
    body.extend_from_slice(
        &serde_json::to_vec(remove)
            .map_err(|e| Error::Internal(format!("serialising a delta: {e}")))?,
    );
    body.push(b'}');
    Ok(Bytes::from(body))
}

/// Whether the request's `Accept` names the compact snapshot (with a quality above 0).
fn accepts_compact(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|item| {
            let mut parts = item.split(';').map(str::trim);
            parts
                .next()
                .is_some_and(|t| t.eq_ignore_ascii_case(compact::CONTENT_TYPE))
                && !parts.any(|p| {
                    p.strip_prefix("q=")
                        .and_then(|q| q.parse::<f32>().ok())
                        .is_some_and(|q| q <= 0.0)
                })
        })
}

/// The quoted ETag of a version.
fn etag_of(version: &str) -> Result<HeaderValue> {
    HeaderValue::from_str(&format!("\"{version}\""))
        .map_err(|e| Error::Internal(format!("policy ETag: {e}")))
}

/// A plain-text error answer.
fn error_answer(status: StatusCode, message: String) -> Response {
    (status, message).into_response()
}

/// `GET /v1/policy[?since=V&wait_ms=W]`: a snapshot, a delta from `since`, or a 304 after
/// holding the request up to `wait_ms` (capped at [`MAX_WAIT_MS`]) for a change.
async fn serve_policy(
    State(feed): State<PolicyFeed>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let wait_ms = match query.get("wait_ms").map(|w| w.parse::<u64>()) {
        None => 0,
        Some(Ok(wait_ms)) => wait_ms.min(MAX_WAIT_MS),
        Some(Err(_)) => {
            return error_answer(
                StatusCode::BAD_REQUEST,
                format!(
                    "wait_ms must be a whole number of milliseconds (0 to {MAX_WAIT_MS}), not {:?}\n",
                    query.get("wait_ms").map_or("", String::as_str)
                ),
            );
        }
    };
    let since = query.get("since").cloned();
    let compact = accepts_compact(&headers);
    let if_none_match = {
        let tags: Vec<&str> = headers
            .get_all(header::IF_NONE_MATCH)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        (!tags.is_empty()).then(|| tags.join(","))
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(wait_ms);
    // Subscribed before the first look, so a change committed meanwhile still wakes the wait.
    let mut sites_changed = feed.store.sites_changed();
    let mut certificates_changed = feed.store.certificates_changed();
    loop {
        sites_changed.borrow_and_update();
        certificates_changed.borrow_and_update();
        let asking = feed.clone();
        let (since, if_none_match) = (since.clone(), if_none_match.clone());
        let answer = tokio::task::spawn_blocking(move || -> Result<(Served, bool)> {
            let served = asking.answer_parts(since.as_deref(), if_none_match.as_deref())?;
            if compact && matches!(served, Served::Snapshot { .. }) {
                match asking.compact_snapshot() {
                    Ok((version, body)) => return Ok((Served::Compact { version, body }, true)),
                    Err(error) => tracing::warn!(%error, "the compact snapshot could not be made; sending JSON"),
                }
            }
            Ok((served, false))
        })
        .await;
        let (answer, compact_body) = match answer {
            Ok(Ok(answer)) => answer,
            Ok(Err(error)) => {
                return error_answer(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the policy is not available: {error}\n"),
                );
            }
            Err(join) => {
                return error_answer(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("building the policy failed: {join}\n"),
                );
            }
        };
        let (status, kind, version, body, len) = match answer {
            Served::NotModified { version } => {
                let now = tokio::time::Instant::now();
                if now < deadline {
                    let until_boundary = (feed.next_time_boundary() - feed.clock.now())
                        .try_into()
                        .unwrap_or(std::time::Duration::ZERO);
                    let wake = deadline.min(now + until_boundary);
                    tokio::select! {
                        changed = sites_changed.changed() => {
                            if changed.is_err() { tokio::time::sleep_until(deadline).await; }
                        }
                        changed = certificates_changed.changed() => {
                            if changed.is_err() { tokio::time::sleep_until(deadline).await; }
                        }
                        () = tokio::time::sleep_until(wake) => {}
                    }
                    continue;
                }
                (StatusCode::NOT_MODIFIED, None, version, Body::empty(), None)
            }
            Served::Snapshot { version, parts } => {
                let len = parts.len;
                let body = Body::from_stream(parts.stream());
                (
                    StatusCode::OK,
                    Some(KIND_SNAPSHOT),
                    version,
                    body,
                    Some(len),
                )
            }
            Served::Delta { version, body } => {
                let len = body.len();
                (
                    StatusCode::OK,
                    Some(KIND_DELTA),
                    version,
                    Body::from(body),
                    Some(len),
                )
            }
            Served::Compact { version, body } => {
                let len = body.len();
                (
                    StatusCode::OK,
                    Some(KIND_SNAPSHOT),
                    version,
                    Body::from(body),
                    Some(len),
                )
            }
        };
        let etag = match etag_of(&version) {
            Ok(etag) => etag,
            Err(error) => {
                return error_answer(StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n"));
            }
        };
        let mut response = Response::new(body);
        *response.status_mut() = status;
        let response_headers = response.headers_mut();
        response_headers.insert(header::ETAG, etag);
        // A streamed snapshot's length is known: the client learns it up front (and hyper
        // sends the body as is, not chunked).
        if let Some(len) = len {
            response_headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        }
        if let Some(kind) = kind {
            response_headers.insert(POLICY_KIND_HEADER, HeaderValue::from_static(kind));
            response_headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(if compact_body {
                    compact::CONTENT_TYPE
                } else {
                    "application/json"
                }),
            );
        }
        return response;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::csp_reports::TOKEN_EPOCH_SECS;
    use crate::hostname::Hostname;
    use crate::store::prelude::*;
    use crate::store::{NewCertificate, NewSite, PrivateKeyPem, SitePolicy, SqliteStore};
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-03-01 00:00 UTC);

    fn name(n: &str) -> Hostname {
        Hostname::parse(n).expect("valid hostname")
    }

    fn store_with_site(names: &[&str]) -> Arc<SqliteStore> {
        let store = Arc::new(SqliteStore::in_memory().expect("store"));
        store
            .create_site(
                NewSite {
                    name: "shop".into(),
                    primary: name(names[0]),
                    hostnames: names[1..].iter().map(|n| name(n)).collect(),
                    policy: SitePolicy::default(),
                },
                NOW,
                NOW,
            )
            .expect("site");
        store
    }

    fn issue(store: &SqliteStore, names: &[&str], serial: &str, not_after: OffsetDateTime) {
        issue_valid_from(
            store,
            names,
            serial,
            NOW - time::Duration::days(1),
            not_after,
        );
    }

    fn issue_valid_from(
        store: &SqliteStore,
        names: &[&str],
        serial: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) {
        store
            .store_certificate(
                NewCertificate {
                    site: "shop".into(),
                    names: names.iter().map(|n| name(n)).collect(),
                    chain_pem: format!("chain {serial}"),
                    key_pem: PrivateKeyPem::new(format!("key {serial}")),
                    not_before,
                    not_after,
                    serial: serial.into(),
                    ari_id: None,
                },
                None,
                NOW,
            )
            .expect("stored");
    }

    fn document(store: &SqliteStore, now: OffsetDateTime) -> PolicyDocument {
        build_document(
            &store.list_sites().expect("sites"),
            &store.all_current_certificates().expect("certificates"),
            &Settings::default(),
            Some(&test_tokens()),
            now,
        )
    }

    fn test_tokens() -> ReportTokens {
        ReportTokens::from_key(b"a key for the policy feed's tests")
    }

    #[test]
    fn cert_ready_lists_only_names_an_unexpired_certificate_covers() {
        let store = store_with_site(&["shop.test", "www.shop.test", "old.shop.test"]);
        issue(
            &store,
            &["shop.test", "www.shop.test"],
            "01",
            datetime!(2026-06-01 00:00 UTC),
        );
        issue(
            &store,
            &["old.shop.test"],
            "02",
            datetime!(2026-03-02 00:00 UTC),
        );
        let fresh = document(&store, NOW);
        assert_eq!(
            fresh.sites[0].cert_ready,
            vec!["shop.test", "old.shop.test", "www.shop.test"]
        );
        let later = document(&store, datetime!(2026-03-03 00:00 UTC));
        assert_eq!(
            later.sites[0].cert_ready,
            vec!["shop.test", "www.shop.test"]
        );
        assert_eq!(later.sites[0].hostnames.len(), 3);
        assert_ne!(fresh.version, later.version);
    }

    #[test]
    fn same_content_has_the_same_version_and_a_new_certificate_a_new_one() {
        let store = store_with_site(&["shop.test", "www.shop.test"]);
        issue(
            &store,
            &["shop.test"],
            "01",
            datetime!(2026-06-01 00:00 UTC),
        );
        let first = document(&store, NOW);
        let again = document(&store, NOW + time::Duration::hours(1));
        assert_eq!(first.version, again.version);
        assert_eq!(first, again);
        issue(
            &store,
            &["shop.test", "www.shop.test"],
            "02",
            datetime!(2026-06-01 00:00 UTC),
        );
        let after = document(&store, NOW);
        assert_ne!(first.version, after.version);
        assert!(Policy::compile(&after).is_ok());
    }

    fn cert_ready_of(feed: &PolicyFeed) -> Vec<String> {
        let (body, _, _) = feed.current().expect("a policy");
        let document: PolicyDocument = serde_json::from_slice(&body).expect("a policy document");
        document.sites[0].cert_ready.clone()
    }

    #[test]
    fn cert_ready_follows_the_clock_with_no_store_change() {
        let store = store_with_site(&["shop.test", "www.shop.test"]);
        issue(
            &store,
            &["shop.test"],
            "01",
            NOW + time::Duration::seconds(10),
        );
        issue_valid_from(
            &store,
            &["www.shop.test"],
            "02",
            NOW + time::Duration::seconds(5),
            NOW + time::Duration::days(90),
        );
        let clock = Arc::new(ManualClock::new(NOW));
        let feed = PolicyFeed::new(
            Arc::clone(&store) as Arc<dyn Store>,
            Arc::clone(&clock) as Arc<dyn Clock>,
            Settings::default(),
            test_tokens(),
        );
        assert_eq!(cert_ready_of(&feed), vec!["shop.test"]);
        clock.advance(std::time::Duration::from_secs(4));
        assert_eq!(cert_ready_of(&feed), vec!["shop.test"], "no boundary yet");
        clock.advance(std::time::Duration::from_secs(1));
        assert_eq!(
            cert_ready_of(&feed),
            vec!["shop.test", "www.shop.test"],
            "www's certificate became valid"
        );
        clock.advance(std::time::Duration::from_secs(5));
        assert_eq!(
            cert_ready_of(&feed),
            vec!["www.shop.test"],
            "shop.test's certificate expired"
        );
    }

    #[test]
    fn valid_until_is_the_soonest_validity_boundary_ahead() {
        let store = store_with_site(&["shop.test", "www.shop.test", "old.shop.test"]);
        issue(&store, &["shop.test"], "01", NOW + time::Duration::hours(3));
        issue(
            &store,
            &["old.shop.test"],
            "02",
            NOW - time::Duration::hours(1),
        );
        issue_valid_from(
            &store,
            &["www.shop.test"],
            "03",
            NOW + time::Duration::hours(2),
            NOW + time::Duration::days(90),
        );
        let built = build_policy(
            &store.list_sites().expect("sites"),
            &store.all_current_certificates().expect("certificates"),
            &Settings::default(),
            None,
            NOW,
        );
        assert_eq!(built.valid_until, Some(NOW + time::Duration::hours(2)));
        assert_eq!(built.document.sites[0].cert_ready, vec!["shop.test"]);
        let none = build_policy(
            &store.list_sites().expect("sites"),
            &[],
            &Settings::default(),
            None,
            NOW,
        );
        assert_eq!(none.valid_until, None);
    }

    #[test]
    fn each_site_gets_only_its_own_certificates() {
        let store = Arc::new(SqliteStore::in_memory().expect("store"));
        let mut certificates = Vec::new();
        for site in ["a", "b", "c"] {
            store
                .create_site(
                    NewSite {
                        name: site.into(),
                        primary: name(&format!("{site}.test")),
                        hostnames: vec![name(&format!("www.{site}.test"))],
                        policy: SitePolicy::default(),
                    },
                    NOW,
                    NOW,
                )
                .expect("site");
        }
        // Site a's certificate also names b.test (a name of another site): it must not make
        // b.test ready; c has no certificate.
        for (site, names) in [("a", ["a.test", "b.test"]), ("b", ["www.b.test", "b.test"])] {
            certificates.push(
                store
                    .store_certificate(
                        NewCertificate {
                            site: site.into(),
                            names: names.iter().map(|n| name(n)).collect(),
                            chain_pem: format!("chain {site}"),
                            key_pem: PrivateKeyPem::new(format!("key {site}")),
                            not_before: NOW - time::Duration::days(1),
                            not_after: NOW + time::Duration::days(1),
                            serial: site.into(),
                            ari_id: None,
                        },
                        None,
                        NOW,
                    )
                    .expect("stored"),
            );
        }
        let document = document(&store, NOW);
        let ready: Vec<(&str, &[String])> = document
            .sites
            .iter()
            .map(|s| (s.id.as_str(), s.cert_ready.as_slice()))
            .collect();
        assert_eq!(
            ready,
            vec![
                ("a", &["a.test".to_string()][..]),
                ("b", &["b.test".to_string(), "www.b.test".to_string()][..]),
                ("c", &[][..]),
            ]
        );
    }

    /// The store cannot hold a site the filter refuses today (its hostname and site-name rules
    /// are at least as strict), so these tests break an entry of a built document by hand.
    fn two_site_document() -> PolicyDocument {
        let store = store_with_site(&["shop.test", "www.shop.test"]);
        store
            .create_site(
                NewSite {
                    name: "blog".into(),
                    primary: name("blog.test"),
                    hostnames: Vec::new(),
                    policy: SitePolicy::default(),
                },
                NOW,
                NOW,
            )
            .expect("site");
        issue(
            &store,
            &["shop.test", "www.shop.test"],
            "01",
            NOW + time::Duration::days(1),
        );
        document(&store, NOW)
    }

    #[test]
    fn a_site_that_fails_validation_is_left_out_and_the_others_served() {
        let good = two_site_document();
        let mut bad = good.clone();
        assert_eq!(bad.sites[1].id, "shop");
        bad.sites[1].cert_ready.push("elsewhere.test".into());
        bad.sites[0].https = autohttps_filter::policy::HttpsMode::Force;

        let (served, rejected) = isolate_invalid_sites(bad.clone(), None).expect("isolated");
        assert_eq!(served.sites.len(), 1);
        assert_eq!(served.sites[0], bad.sites[0], "blog's change is served");
        assert_eq!(rejected.len(), 1);
        assert_eq!(rejected[0].site, "shop");
        assert!(!rejected[0].previous_kept);
        assert!(
            rejected[0].problems[0].starts_with("cert_ready[2]: "),
            "{:?}",
            rejected[0].problems
        );
        assert!(Policy::compile(&served).is_ok());
        assert_ne!(served.version, bad.version);

        // With a previous good entry, that entry stays, its cert_ready narrowed to what is
        // ready now.
        let mut narrowed = bad.clone();
        narrowed.sites[1].cert_ready = vec!["www.shop.test".into(), "bad name!".into()];
        let (served, rejected) = isolate_invalid_sites(narrowed, Some(&good)).expect("isolated");
        assert_eq!(served.sites.len(), 2);
        assert_eq!(served.sites[0], bad.sites[0]);
        assert_eq!(served.sites[1].hostnames, good.sites[1].hostnames);
        assert_eq!(served.sites[1].cert_ready, vec!["www.shop.test"]);
        assert!(rejected[0].previous_kept);
        assert!(Policy::compile(&served).is_ok());
    }

    #[test]
    fn bad_settings_are_not_blamed_on_a_site() {
        let mut bad = two_site_document();
        bad.settings.trusted_proxies = vec!["not-an-address".into()];
        let error = isolate_invalid_sites(bad, None).expect_err("refused whole");
        assert!(error.to_string().contains("trusted_proxies"), "{error}");
    }

    #[tokio::test]
    async fn feed_answers_with_an_etag_then_304_until_the_store_changes() {
        let store = store_with_site(&["shop.test"]);
        let feed = PolicyFeed::new(
            Arc::clone(&store) as Arc<dyn Store>,
            Arc::new(ManualClock::new(NOW)),
            Settings {
                https_port: 8443,
                ..Settings::default()
            },
            test_tokens(),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bound");
        let url = format!(
            "http://{}{POLICY_PATH}",
            listener.local_addr().expect("address")
        );
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, feed.router()).await;
        });
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client");

        let first = http.get(&url).send().await.expect("answered");
        assert_eq!(first.status(), 200);
        let etag = first.headers()[header::ETAG].clone();
        let body: PolicyDocument = first.json().await.expect("a policy document");
        assert_eq!(
            etag.to_str().ok(),
            Some(format!("\"{}\"", body.version).as_str())
        );
        assert_eq!(body.settings.https_port, 8443);
        assert!(body.sites[0].cert_ready.is_empty());

        let unchanged = http
            .get(&url)
            .header(header::IF_NONE_MATCH, etag.clone())
            .send()
            .await
            .expect("answered");
        assert_eq!(unchanged.status(), 304);
        assert_eq!(unchanged.headers()[header::ETAG], etag);

        issue(
            &store,
            &["shop.test"],
            "01",
            datetime!(2026-06-01 00:00 UTC),
        );
        let changed = http
            .get(&url)
            .header(header::IF_NONE_MATCH, etag.clone())
            .send()
            .await
            .expect("answered");
        assert_eq!(changed.status(), 200);
        assert_ne!(changed.headers()[header::ETAG], etag);
        let body: PolicyDocument = changed.json().await.expect("a policy document");
        assert_eq!(body.sites[0].cert_ready, vec!["shop.test"]);
        server.abort();
    }

    #[tokio::test]
    async fn a_report_mode_site_carries_a_token_that_rotates_with_the_epoch() {
        let store = store_with_site(&["shop.test"]);
        assert_eq!(document(&store, NOW).sites[0].report_token, None);
        store
            .set_policy(
                "shop",
                SitePolicy {
                    mixed_content: MixedContent::Report,
                    ..SitePolicy::default()
                },
            )
            .expect("policy set");
        let clock = Arc::new(ManualClock::new(NOW));
        let feed = PolicyFeed::new(
            Arc::clone(&store) as Arc<dyn Store>,
            Arc::clone(&clock) as Arc<dyn Clock>,
            Settings::default(),
            test_tokens(),
        );
        let token_in = |body: &[u8]| {
            let document: PolicyDocument = serde_json::from_slice(body).expect("a document");
            assert!(Policy::compile(&document).is_ok());
            document.sites[0].report_token.clone().expect("a token")
        };
        let (body, etag, _) = feed.current().expect("policy");
        let token = token_in(&body);
        assert!(test_tokens().verify("shop", &token, NOW));
        assert!(!test_tokens().verify("other", &token, NOW));

        // A day later the feed serves the next epoch's token; the old one is still accepted for
        // pages served before, and not after another day.
        clock.advance(std::time::Duration::from_secs(TOKEN_EPOCH_SECS as u64));
        let (body, rotated_etag, _) = feed.current().expect("policy");
        let rotated = token_in(&body);
        assert_ne!(rotated, token);
        assert_ne!(rotated_etag, etag);
        let later = NOW + time::Duration::seconds(TOKEN_EPOCH_SECS);
        assert!(test_tokens().verify("shop", &token, later));
        assert!(test_tokens().verify("shop", &rotated, later));
        let much_later = later + time::Duration::seconds(TOKEN_EPOCH_SECS);
        assert!(!test_tokens().verify("shop", &token, much_later));
    }
}
