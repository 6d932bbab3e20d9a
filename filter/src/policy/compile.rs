//! Validation of a [`PolicyDocument`], the lookup tables built from it, and their update in
//! place by a [`PolicyDelta`].
//!
//! Each site keeps its names once, packed in one string; the hash tables hold small entries
//! that point into it (site slot, offset, length), so a name costs its bytes plus 12 bytes of
//! table, and a site can be replaced or removed by walking its own names: time proportional to
//! the change, never to the number of sites.

use std::borrow::Cow;
use std::fmt;
use std::hash::BuildHasher;
use std::sync::Arc;

use hashbrown::{DefaultHashBuilder, HashTable, hash_table};

use crate::Error;

use super::cidr::Cidr;
use super::host::{check_lowered_policy_name, normal_policy_name, wildcard_parent};
use super::schema::{
    DEFAULT_REPORT_URI, DeltaEntries, HSTS_PRELOAD_MIN_MAX_AGE, HttpsMode, MixedContent,
    PolicyDelta, PolicyDocument, RedirectKind, SCHEMA_VERSION, Settings, SiteEntry, SiteSpec, Text,
};

/// One thing wrong with a policy, located by its JSON path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where in the document, e.g. `sites[2].hostnames[0]`.
    pub path: String,
    /// What is wrong, in words.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Longest site id and policy version, in bytes.
const MAX_ID_LEN: usize = 128;

/// Where a hostname leads: the site's slot, and where the name's table key sits in the site's
/// packed names (offset in the high 24 bits, length in the low 8; whether its certificate is
/// served is the mark before it). Eight bytes per name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct NameEntry {
    site: u32,
    place: u32,
}

impl NameEntry {
    /// `None` when the name sits beyond 16 MiB into its site's names.
    fn new(site: u32, start: usize, len: usize) -> Option<NameEntry> {
        let start = u32::try_from(start).ok().filter(|s| *s < 1 << 24)?;
        let len = u8::try_from(len).ok()?;
        Some(NameEntry {
            site,
            place: (start << 8) | u32::from(len),
        })
    }

    fn start(self) -> usize {
        (self.place >> 8) as usize
    }

    fn len(self) -> usize {
        (self.place & 0xff) as usize
    }
}

/// A name found in a table: its site and whether its certificate is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NameMatch {
    pub(crate) site: u32,
    pub(crate) cert_ready: bool,
}

/// Marks before each name in [`Site::names`]: exact or wildcard, certificate served or not.
const EXACT: u8 = b'e';
const EXACT_READY: u8 = b'E';
const WILDCARD: u8 = b'w';
const WILDCARD_READY: u8 = b'W';

/// A site, compiled for the decision function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    /// Its HTTPS mode.
    pub https: HttpsMode,
    /// Permanent or temporary redirects.
    pub redirect: RedirectKind,
    /// Where redirects go, when set.
    pub canonical_host: Option<Box<str>>,
    /// The `Strict-Transport-Security` value to add over HTTPS, when enabled (shared by the
    /// sites with the same settings).
    pub hsts: Option<Arc<str>>,
    /// Mixed-content mode.
    pub mixed_content: MixedContent,
    /// The `Content-Security-Policy-Report-Only` value for `report` mode.
    pub report_only_csp: Option<Box<str>>,
    /// The site's id (its first `id_len` bytes), then every name the site lists, as its table
    /// key (a wildcard's parent), each preceded by a mark ([`EXACT`], [`EXACT_READY`],
    /// [`WILDCARD`], [`WILDCARD_READY`]) and followed by `\n`. The tables point into this
    /// string, so each name is stored once, and a site costs two allocations (this and itself).
    names: Box<str>,
    id_len: u32,
}

/// One name of [`Site::names`].
struct NameRecord<'a> {
    wildcard: bool,
    start: u32,
    key: &'a str,
}

impl Site {
    /// The site's id.
    pub fn id(&self) -> &str {
        self.names.get(..self.id_len as usize).unwrap_or_default()
    }

    /// The site's names, as recorded.
    fn name_records(&self) -> impl Iterator<Item = NameRecord<'_>> + '_ {
        let names = &*self.names;
        let mut offset = self.id_len as usize;
        std::iter::from_fn(move || {
            let rest = names.get(offset..)?;
            // A byte search: `str::find` with a char compares each hit's encoding.
            let end = rest.bytes().position(|b| b == b'\n')?;
            let mark = *rest.as_bytes().first()?;
            let record = NameRecord {
                wildcard: matches!(mark, WILDCARD | WILDCARD_READY),
                start: u32::try_from(offset + 1).ok()?,
                key: rest.get(1..end)?,
            };
            offset += end + 1;
            Some(record)
        })
    }
}

/// The key a table entry names: a slice of its site's packed names.
fn key_of<'a>(sites: &'a [Option<Arc<Site>>], entry: &NameEntry) -> &'a str {
    let start = entry.start();
    sites
        .get(entry.site as usize)
        .and_then(Option::as_ref)
        .and_then(|site| site.names.get(start..start + entry.len()))
        .unwrap_or("")
}

/// Whether a table entry's certificate is served: the mark before its key.
fn ready_of(sites: &[Option<Arc<Site>>], entry: &NameEntry) -> bool {
    sites
        .get(entry.site as usize)
        .and_then(Option::as_ref)
        .and_then(|site| site.names.as_bytes().get(entry.start().wrapping_sub(1)))
        .is_some_and(|mark| matches!(*mark, EXACT_READY | WILDCARD_READY))
}

/// The id of the site in a slot.
fn id_of(sites: &[Option<Arc<Site>>], slot: u32) -> &str {
    sites
        .get(slot as usize)
        .and_then(Option::as_ref)
        .map_or("", |site| site.id())
}

/// The entry of a name's table key: the name's own, or where it goes.
fn name_entry<'t>(
    table: &'t mut HashTable<NameEntry>,
    sites: &[Option<Arc<Site>>],
    hasher: &DefaultHashBuilder,
    key: &str,
) -> hash_table::Entry<'t, NameEntry> {
    table.entry(
        hasher.hash_one(key),
        |e| key_of(sites, e) == key,
        |e| hasher.hash_one(key_of(sites, e)),
    )
}

/// A validated policy with its lookup tables. Per-request lookups cost the same whatever the
/// number of sites: one hash lookup for the exact name, one for its wildcard parent.
#[derive(Debug, Clone)]
pub struct Policy {
    pub(crate) version: String,
    pub(crate) trusted_proxies: Vec<Cidr>,
    pub(crate) http_port: u16,
    pub(crate) https_port: u16,
    /// Sites by slot; a removed site leaves its slot empty until a new site takes it.
    sites: Vec<Option<Arc<Site>>>,
    /// Empty slots.
    free: Vec<u32>,
    /// Number of sites present.
    live: usize,
    /// Site slots, keyed by site id.
    ids: HashTable<u32>,
    exact: HashTable<NameEntry>,
    wildcards: HashTable<NameEntry>,
    hasher: DefaultHashBuilder,
}

impl Default for Policy {
    fn default() -> Self {
        Policy::empty()
    }
}

/// What applying a delta did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeltaReport {
    /// Sites added or replaced.
    pub upserted: usize,
    /// Sites removed.
    pub removed: usize,
    /// Upserts skipped because their entry is invalid: the site id and every problem. The site
    /// keeps its previous entry (or stays absent).
    pub rejected: Vec<(String, Vec<Problem>)>,
}

/// A policy's contents, for comparing two policies in tests (see [`Policy::contents`]).
#[cfg(test)]
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct PolicyContents {
    pub(crate) version: String,
    pub(crate) names: Vec<(bool, String, String, bool)>,
    pub(crate) sites: Vec<Site>,
}

/// Where a site entry sits, for problem paths and messages.
#[derive(Debug, Clone, Copy)]
enum Place {
    /// `sites[i]` of a document: the slot is the index, and conflicts name it.
    Document(usize),
    /// `upsert[i]` of a delta.
    Delta(usize),
}

impl Place {
    fn at(self, field: &str) -> String {
        match self {
            Place::Document(i) => format!("sites[{i}].{field}"),
            Place::Delta(i) => format!("upsert[{i}].{field}"),
        }
    }
}

/// A name as parsed from an entry: where its key sits in a scratch buffer.
#[derive(Debug, Clone, Copy)]
struct Span {
    wildcard: bool,
    start: usize,
    len: usize,
}

/// Buffers reused from one site to the next, so compiling a site allocates only what it keeps.
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    lowered: String,
    names: String,
    hostnames: Vec<Result<(Span, bool), String>>,
    cert_keys: String,
    cert_names: Vec<Result<Span, String>>,
    owned: Vec<bool>,
    /// The last `Strict-Transport-Security` value made, by its settings (most sites share one).
    hsts: Option<((u64, bool, bool), Arc<str>)>,
}

impl Scratch {
    /// The compiled site of an entry whose names are packed in `self.names`.
    fn site(&mut self, spec: &SiteEntry<'_>, canonical_host: Option<&str>) -> Site {
        let hsts = spec.hsts.enabled.then(|| {
            let settings = (
                spec.hsts.max_age,
                spec.hsts.include_subdomains,
                spec.hsts.preload,
            );
            match &self.hsts {
                Some((cached, value)) if *cached == settings => Arc::clone(value),
                _ => {
                    let mut value = format!("max-age={}", spec.hsts.max_age);
                    if spec.hsts.include_subdomains {
                        value.push_str("; includeSubDomains");
                    }
                    if spec.hsts.preload {
                        value.push_str("; preload");
                    }
                    let value: Arc<str> = Arc::from(value);
                    self.hsts = Some((settings, Arc::clone(&value)));
                    value
                }
            }
        });
        let report_only_csp = (spec.mixed_content == MixedContent::Report).then(|| {
            let report_uri = report_uri_with_token(
                spec.report_uri.as_deref().unwrap_or(DEFAULT_REPORT_URI),
                &spec.id,
                spec.report_token.as_deref(),
            );
            format!(
                "default-src https: wss: data: blob: 'unsafe-inline' 'unsafe-eval'; form-action https:; report-uri {report_uri}"
            )
            .into_boxed_str()
        });
        Site {
            https: spec.https,
            redirect: spec.redirect,
            canonical_host: canonical_host.map(Box::from),
            hsts,
            mixed_content: spec.mixed_content,
            report_only_csp,
            names: Box::from(self.names.as_str()),
            id_len: u32::try_from(spec.id.len()).unwrap_or(u32::MAX),
        }
    }
}

/// Lower-cases a raw policy name into `buffer` (minus one trailing dot) and checks it.
fn lower_into(buffer: &mut String, raw: &str) -> Result<bool, String> {
    buffer.clear();
    buffer.push_str(raw);
    buffer.make_ascii_lowercase();
    if buffer.ends_with('.') {
        buffer.pop();
    }
    check_lowered_policy_name(buffer)
        .map_err(|message| format!("{raw:?} is not a valid hostname: {message}"))
}

impl Policy {
    /// Parses policy JSON and validates it.
    ///
    /// Sites are compiled as they are parsed, so the whole document never sits in memory.
    pub fn from_json(json: &[u8]) -> Result<Policy, Error> {
        super::stream::compile_json(json).map_err(|e| {
            Error::InvalidPolicy(vec![Problem {
                path: "$".into(),
                message: format!("not a valid policy document: {e}"),
            }])
        })?
    }

    /// An empty policy: every host is unknown, so every request passes untouched.
    pub fn empty() -> Policy {
        Policy {
            version: String::new(),
            trusted_proxies: Vec::new(),
            http_port: 80,
            https_port: 443,
            sites: Vec::new(),
            free: Vec::new(),
            live: 0,
            ids: HashTable::new(),
            exact: HashTable::new(),
            wildcards: HashTable::new(),
            hasher: DefaultHashBuilder::default(),
        }
    }

    /// Validates a document and builds the lookup tables. Every problem is reported, each with
    /// its JSON path; nothing is built unless there are none.
    pub fn compile(document: &PolicyDocument) -> Result<Policy, Error> {
        let mut compiler = Compiler::with_capacity(document.sites.len());
        for spec in &document.sites {
            compiler.add_site(&spec.as_entry());
        }
        compiler.finish(document.schema, &document.version, &document.settings)
    }

    /// Frees up to `n` of the sites of a policy no longer served (a replaced policy is let go
    /// a slice at a time, so freeing it does not stall the worker either); `true` once none
    /// are left.
    pub fn release(&mut self, n: usize) -> bool {
        for _ in 0..n {
            if self.sites.pop().is_none() {
                break;
            }
        }
        self.sites.is_empty()
    }

    /// The policy's version string.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Number of sites.
    pub fn site_count(&self) -> usize {
        self.live
    }

    /// The site at an index handed out by [`Policy::lookup`] or a decision.
    pub fn site(&self, index: u32) -> Option<&Site> {
        self.sites.get(index as usize)?.as_deref()
    }

    /// The site at an index, shared: a stream keeps it for its response even if a delta
    /// replaces the site meanwhile.
    pub fn shared_site(&self, index: u32) -> Option<Arc<Site>> {
        self.sites.get(index as usize)?.clone()
    }

    /// The entry of an exact name.
    pub(crate) fn exact_entry(&self, host: &str) -> Option<NameMatch> {
        self.find(false, host)
    }

    fn find(&self, wildcard: bool, key: &str) -> Option<NameMatch> {
        let table = if wildcard {
            &self.wildcards
        } else {
            &self.exact
        };
        let hash = self.hasher.hash_one(key);
        table
            .find(hash, |entry| key_of(&self.sites, entry) == key)
            .map(|entry| NameMatch {
                site: entry.site,
                cert_ready: ready_of(&self.sites, entry),
            })
    }

    /// Finds the site of a normalised host: exact name first, then a `*.parent` wildcard.
    /// Returns the site's index and whether a served certificate covers this host.
    pub fn lookup(&self, host: &str) -> Option<(u32, bool)> {
        let wildcard = || wildcard_parent(host).and_then(|parent| self.find(true, parent));
        if let Some(entry) = self.find(false, host) {
            let covered = entry.cert_ready
                || wildcard().is_some_and(|w| w.site == entry.site && w.cert_ready);
            return Some((entry.site, covered));
        }
        wildcard().map(|w| (w.site, w.cert_ready))
    }

    /// Whether a served certificate covers this site's exact name.
    pub(crate) fn cert_ready(&self, site: u32, host: &str) -> bool {
        matches!(self.lookup(host), Some((s, true)) if s == site)
    }

    /// Applies a delta in place, in time proportional to its size. The delta must start from
    /// this policy's version (else nothing changes and the error says to ask for a snapshot).
    /// An invalid upsert is skipped, its site keeping its previous entry, and reported in the
    /// [`DeltaReport`]; every other change is applied and the version advances.
    pub fn apply_delta(&mut self, delta: &PolicyDelta) -> Result<DeltaReport, Error> {
        let upsert: Vec<SiteEntry<'_>> = delta.upsert.iter().map(SiteSpec::as_entry).collect();
        let remove: Vec<Text<'_>> = delta
            .remove
            .iter()
            .map(|id| Text(Cow::Borrowed(id.as_str())))
            .collect();
        self.apply_delta_entries(&DeltaEntries {
            schema: delta.schema,
            from: Text(Cow::Borrowed(&delta.from)),
            version: Text(Cow::Borrowed(&delta.version)),
            upsert,
            remove,
        })
    }

    /// [`Policy::apply_delta`] of a delta read with its strings borrowed (as the plugin reads
    /// one from the feed).
    pub(crate) fn apply_delta_entries(
        &mut self,
        delta: &DeltaEntries<'_>,
    ) -> Result<DeltaReport, Error> {
        if *delta.from != *self.version {
            return Err(Error::DeltaBase {
                from: delta.from.to_string(),
                current: self.version.clone(),
            });
        }
        let mut problems = Vec::new();
        let mut problem = |path: String, message: String| problems.push(Problem { path, message });
        if delta.schema != SCHEMA_VERSION {
            problem(
                "schema".into(),
                format!(
                    "schema {} is not supported by this filter (it reads schema {SCHEMA_VERSION}); upgrade the filter or the sidecar so they match",
                    delta.schema
                ),
            );
        }
        if let Err(message) = check_token(&delta.version, "version", false) {
            problem("version".into(), message);
        }
        // A site id at most once across upsert and remove: otherwise the result would depend
        // on the order the changes are applied in.
        let mut seen: HashTable<(bool, usize)> =
            HashTable::with_capacity(delta.upsert.len() + delta.remove.len());
        let ids = delta
            .upsert
            .iter()
            .map(|s| &*s.id)
            .enumerate()
            .map(|(i, id)| (false, i, id))
            .chain(
                delta
                    .remove
                    .iter()
                    .enumerate()
                    .map(|(i, id)| (true, i, &**id)),
            );
        let id_at = |(removed, i): (bool, usize)| -> &str {
            if removed {
                &delta.remove[i]
            } else {
                &delta.upsert[i].id
            }
        };
        let path_of = |(removed, i): (bool, usize)| {
            if removed {
                format!("remove[{i}]")
            } else {
                format!("upsert[{i}].id")
            }
        };
        for (removed, i, id) in ids {
            let hash = self.hasher.hash_one(id);
            match seen.entry(
                hash,
                |&at| id_at(at) == id,
                |&at| self.hasher.hash_one(id_at(at)),
            ) {
                hash_table::Entry::Occupied(first) => problem(
                    path_of((removed, i)),
                    format!(
                        "site id {id:?} is already changed by {}; a delta names each site once",
                        path_of(*first.get())
                    ),
                ),
                hash_table::Entry::Vacant(slot) => {
                    slot.insert((removed, i));
                }
            }
        }
        if !problems.is_empty() {
            return Err(Error::InvalidPolicy(problems));
        }

        let mut report = DeltaReport::default();
        for id in &delta.remove {
            if let Some(slot) = self.slot_of(id) {
                self.detach(slot);
                report.removed += 1;
            }
        }
        // Every replaced site lets go of its names first, so a name can move between sites
        // within one delta whatever the order of the upserts.
        let previous: Vec<Option<Arc<Site>>> = delta
            .upsert
            .iter()
            .map(|spec| self.slot_of(&spec.id).and_then(|slot| self.detach(slot)))
            .collect();
        let mut scratch = Scratch::default();
        let mut restore = Vec::new();
        for (i, (spec, previous)) in delta.upsert.iter().zip(previous).enumerate() {
            let mut site_problems = Vec::new();
            let slot = self.add_site(spec, Place::Delta(i), &mut scratch, &mut site_problems);
            if site_problems.is_empty() {
                report.upserted += 1;
                continue;
            }
            self.detach(slot);
            report.rejected.push((spec.id.to_string(), site_problems));
            if let Some(previous) = previous {
                restore.push(previous);
            }
        }
        for site in restore {
            self.reattach(site);
        }
        self.version = delta.version.to_string();
        Ok(report)
    }

    /// What the policy holds, independent of slots and table order: its version, every name
    /// (wildcard or not, key, site id, certificate served) and every site, sorted. Two policies
    /// with equal contents decide every request alike.
    #[cfg(test)]
    pub(crate) fn contents(&self) -> PolicyContents {
        let mut names: Vec<(bool, String, String, bool)> =
            [(false, &self.exact), (true, &self.wildcards)]
                .into_iter()
                .flat_map(|(wildcard, table)| {
                    table.iter().map(move |e| {
                        (
                            wildcard,
                            key_of(&self.sites, e).to_string(),
                            id_of(&self.sites, e.site).to_string(),
                            ready_of(&self.sites, e),
                        )
                    })
                })
                .collect();
        names.sort();
        let mut sites: Vec<Site> = self
            .sites
            .iter()
            .flatten()
            .map(|s| Site::clone(s))
            .collect();
        sites.sort_by(|a, b| a.id().cmp(b.id()));
        let mut ids: Vec<String> = self
            .ids
            .iter()
            .map(|&s| id_of(&self.sites, s).to_string())
            .collect();
        ids.sort();
        assert_eq!(ids.len(), self.live, "every live site has its id indexed");
        assert_eq!(sites.len(), self.live, "the live count matches the slots");
        PolicyContents {
            version: self.version.clone(),
            names,
            sites,
        }
    }

    /// The slot of a site id.
    fn slot_of(&self, id: &str) -> Option<u32> {
        let hash = self.hasher.hash_one(id);
        self.ids
            .find(hash, |&slot| id_of(&self.sites, slot) == id)
            .copied()
    }

    /// A free slot.
    fn take_slot(&mut self) -> u32 {
        self.live += 1;
        if let Some(slot) = self.free.pop() {
            return slot;
        }
        self.sites.push(None);
        // The compiler stops before a document has more sites than a u32 counts.
        u32::try_from(self.sites.len() - 1).unwrap_or(u32::MAX)
    }

    /// Takes a site out: its names, its id and its slot. Returns the site.
    fn detach(&mut self, slot: u32) -> Option<Arc<Site>> {
        let site = self.sites.get(slot as usize)?.clone()?;
        for record in site.name_records() {
            let table = if record.wildcard {
                &mut self.wildcards
            } else {
                &mut self.exact
            };
            let hash = self.hasher.hash_one(record.key);
            if let Ok(entry) = table.find_entry(hash, |e| {
                e.site == slot && e.start() == record.start as usize
            }) {
                entry.remove();
            }
        }
        let hash = self.hasher.hash_one(site.id());
        if let Ok(entry) = self.ids.find_entry(hash, |&s| s == slot) {
            entry.remove();
        }
        if let Some(place) = self.sites.get_mut(slot as usize) {
            *place = None;
        }
        self.free.push(slot);
        self.live -= 1;
        Some(site)
    }

    /// Puts a previously detached site back, with each of its names still free.
    fn reattach(&mut self, site: Arc<Site>) {
        let slot = self.take_slot();
        let hash = self.hasher.hash_one(site.id());
        let records: Vec<(bool, u32, usize)> = site
            .name_records()
            .map(|r| (r.wildcard, r.start, r.key.len()))
            .collect();
        if let Some(place) = self.sites.get_mut(slot as usize) {
            *place = Some(site);
        }
        let Policy {
            sites,
            ids,
            exact,
            wildcards,
            hasher,
            ..
        } = self;
        ids.insert_unique(hash, slot, |&s| hasher.hash_one(id_of(sites, s)));
        for (wildcard, start, len) in records {
            let table = if wildcard {
                &mut *wildcards
            } else {
                &mut *exact
            };
            let Some(entry) = NameEntry::new(slot, start as usize, len) else {
                continue;
            };
            let key = key_of(sites, &entry);
            if let hash_table::Entry::Vacant(vacant) = name_entry(table, sites, hasher, key) {
                vacant.insert(entry);
            }
        }
    }

    /// Checks one site entry and adds it with every name it may have. Problems are pushed with
    /// paths under `place`; the site is added even when there are some (a document with any
    /// is refused as a whole; a delta takes the site out again). Returns its slot.
    fn add_site(
        &mut self,
        spec: &SiteEntry<'_>,
        place: Place,
        scratch: &mut Scratch,
        problems: &mut Vec<Problem>,
    ) -> u32 {
        let mut problem = |path: String, message: String| problems.push(Problem { path, message });
        let at = |field: &str| place.at(field);
        let id_problem = check_token(&spec.id, "site id", true).err();
        // The names with a served certificate, parsed first (their problems are reported after
        // the hostnames'), so each hostname is recorded with its flag already set.
        scratch.cert_keys.clear();
        scratch.cert_names.clear();
        for raw in &spec.cert_ready {
            let parsed = lower_into(&mut scratch.lowered, raw).map(|wildcard| {
                let key = if wildcard {
                    &scratch.lowered[2..]
                } else {
                    &scratch.lowered[..]
                };
                let start = scratch.cert_keys.len();
                scratch.cert_keys.push_str(key);
                Span {
                    wildcard,
                    start,
                    len: key.len(),
                }
            });
            scratch.cert_names.push(parsed);
        }
        scratch.owned.clear();
        scratch.owned.resize(scratch.cert_names.len(), false);
        // The id, then the hostnames with their marks, packed into the site's names.
        scratch.names.clear();
        scratch.names.push_str(&spec.id);
        scratch.hostnames.clear();
        let mut canonical_listed = false;
        let canonical = spec.canonical_host.as_deref().map(|raw| {
            let mut lowered = String::new();
            let parsed = lower_into(&mut lowered, raw);
            (parsed, lowered)
        });
        let Scratch {
            lowered,
            names,
            hostnames,
            cert_keys,
            cert_names,
            ..
        } = scratch;
        for raw in &spec.hostnames {
            // A hostname written exactly as one of the certified names (the usual case) is
            // that name's parse again: reuse it rather than lower-case and check it twice.
            let alias = spec.cert_ready.iter().position(|c| **c == **raw);
            let parsed = match alias.and_then(|c| cert_names.get(c)) {
                Some(Ok(c)) => Ok((c.wildcard, &cert_keys[c.start..c.start + c.len])),
                Some(Err(message)) => Err(message.clone()),
                None => lower_into(lowered, raw).map(|wildcard| {
                    (
                        wildcard,
                        if wildcard {
                            &lowered[2..]
                        } else {
                            &lowered[..]
                        },
                    )
                }),
            };
            let parsed = parsed.map(|(wildcard, key)| {
                let cert_ready = alias.is_some() || cert_names.iter().any(|c| {
                    matches!(c, Ok(c) if c.wildcard == wildcard && &cert_keys[c.start..c.start + c.len] == key)
                });
                if !wildcard
                    && let Some((Ok(false), canonical)) = &canonical
                    && canonical == key
                {
                    canonical_listed = true;
                }
                names.push(char::from(match (wildcard, cert_ready) {
                    (false, false) => EXACT,
                    (false, true) => EXACT_READY,
                    (true, false) => WILDCARD,
                    (true, true) => WILDCARD_READY,
                }));
                let start = names.len();
                names.push_str(key);
                names.push('\n');
                (Span { wildcard, start, len: key.len() }, cert_ready)
            });
            hostnames.push(parsed);
        }
        let canonical_host = match canonical {
            None => None,
            Some((Ok(false), name)) if canonical_listed => Some(Ok(name)),
            Some((Ok(false), name)) => Some(Err(format!(
                "{name} is not one of this site's hostnames; the canonical host must be one of them"
            ))),
            Some((Ok(true), _)) => Some(Err(
                "the canonical host must be an exact name, not a wildcard".into(),
            )),
            Some((Err(message), _)) => Some(Err(message)),
        };
        let report_uri = spec.report_uri.as_deref().unwrap_or(DEFAULT_REPORT_URI);
        let slot = self.take_slot();
        let site = scratch.site(
            spec,
            match &canonical_host {
                Some(Ok(name)) => Some(name.as_str()),
                _ => None,
            },
        );
        if let Some(place) = self.sites.get_mut(slot as usize) {
            *place = Some(Arc::new(site));
        }
        let Policy {
            sites,
            ids,
            exact,
            wildcards,
            hasher,
            ..
        } = self;
        let sites = &*sites;

        if let Some(message) = id_problem {
            problem(at("id"), message);
        } else {
            let hash = hasher.hash_one(&*spec.id);
            match ids.entry(
                hash,
                |&s| s != slot && id_of(sites, s) == &*spec.id,
                |&s| hasher.hash_one(id_of(sites, s)),
            ) {
                hash_table::Entry::Occupied(mut first) => {
                    let shown = match place {
                        Place::Document(_) => format!("sites[{}]", first.get()),
                        Place::Delta(_) => "another site".to_string(),
                    };
                    problem(
                        at("id"),
                        format!("site id {:?} is already used by {shown}", &*spec.id),
                    );
                    *first.get_mut() = slot;
                }
                hash_table::Entry::Vacant(vacant) => {
                    vacant.insert(slot);
                }
            }
        }
        if spec.hostnames.is_empty() {
            problem(at("hostnames"), "a site needs at least one hostname".into());
        }
        for (h, parsed) in scratch.hostnames.iter().enumerate() {
            let (span, cert_ready) = match parsed {
                Ok(parsed) => *parsed,
                Err(message) => {
                    problem(at(&format!("hostnames[{h}]")), message.clone());
                    continue;
                }
            };
            let table = if span.wildcard {
                &mut *wildcards
            } else {
                &mut *exact
            };
            let key = &scratch.names[span.start..span.start + span.len];
            // A name belongs to one site: the first that lists it.
            match name_entry(table, sites, hasher, key) {
                hash_table::Entry::Occupied(first) => {
                    let other = first.get().site;
                    let shown = shown_name(key, span.wildcard);
                    let message = if other == slot {
                        format!("{shown} is listed twice in this site")
                    } else {
                        match place {
                            Place::Document(_) => format!(
                                "{shown} already belongs to sites[{other}] ({:?}); a name can belong to one site only",
                                id_of(sites, other)
                            ),
                            Place::Delta(_) => format!(
                                "{shown} already belongs to site {:?}; a name can belong to one site only",
                                id_of(sites, other)
                            ),
                        }
                    };
                    problem(at(&format!("hostnames[{h}]")), message);
                }
                hash_table::Entry::Vacant(vacant) => {
                    if cert_ready {
                        let cert_keys = &scratch.cert_keys;
                        for (c, parsed) in scratch.cert_names.iter().enumerate() {
                            if matches!(parsed, Ok(c) if c.wildcard == span.wildcard && &cert_keys[c.start..c.start + c.len] == key)
                            {
                                scratch.owned[c] = true;
                            }
                        }
                    }
                    match NameEntry::new(slot, span.start, span.len) {
                        Some(entry) => {
                            vacant.insert(entry);
                        }
                        None => problem(
                            at(&format!("hostnames[{h}]")),
                            "the site lists more than 16 MiB of names; split it into several sites"
                                .into(),
                        ),
                    }
                }
            }
        }
        for (c, parsed) in scratch.cert_names.iter().enumerate() {
            match parsed {
                Ok(span) => {
                    if !scratch.owned[c] {
                        problem(
                            at(&format!("cert_ready[{c}]")),
                            format!(
                                "{} has a certificate but is not one of this site's hostnames; list it in hostnames first",
                                shown_name(
                                    &scratch.cert_keys[span.start..span.start + span.len],
                                    span.wildcard
                                )
                            ),
                        );
                    }
                }
                Err(message) => problem(at(&format!("cert_ready[{c}]")), message.clone()),
            }
        }
        if let Some(Err(message)) = canonical_host {
            problem(at("canonical_host"), message);
        }
        if spec.hsts.preload
            && (spec.hsts.max_age < HSTS_PRELOAD_MIN_MAX_AGE || !spec.hsts.include_subdomains)
        {
            problem(
                at("hsts.preload"),
                "preload needs max_age of at least 31536000 and include_subdomains".into(),
            );
        }
        // The default URI is known to be valid.
        if spec.report_uri.is_some()
            && let Err(message) = check_report_uri(report_uri)
        {
            problem(at("report_uri"), message);
        }
        if let Some(token) = &spec.report_token
            && let Err(message) = check_report_token(token)
        {
            problem(at("report_token"), message);
        }
        slot
    }
}

impl Policy {
    /// Adds a site of a compact snapshot when every part of it is already in normal form and
    /// valid, and none of its names or its id is taken: the common case, checked in one pass
    /// per name with nothing copied but what the site keeps. `ready[i]` says whether the
    /// certificate of `spec.hostnames[i]` is served (`spec.cert_ready` is not read).
    ///
    /// Returns `false`, with the policy as it was, for any other site: it then goes through
    /// [`Policy::add_site`], which finds and words every problem, so both paths accept the
    /// same sites, build the same tables and report the same problems.
    pub(super) fn add_normal_site(
        &mut self,
        spec: &SiteEntry<'_>,
        ready: &[bool],
        scratch: &mut Scratch,
    ) -> bool {
        if spec.hostnames.is_empty()
            || ready.len() != spec.hostnames.len()
            || check_token(&spec.id, "site id", true).is_err()
            || (spec.hsts.preload
                && (spec.hsts.max_age < HSTS_PRELOAD_MIN_MAX_AGE || !spec.hsts.include_subdomains))
            || spec
                .report_uri
                .as_deref()
                .is_some_and(|uri| check_report_uri(uri).is_err())
            || spec
                .report_token
                .as_deref()
                .is_some_and(|token| check_report_token(token).is_err())
        {
            return false;
        }
        let canonical = spec.canonical_host.as_deref();
        let mut canonical_listed = canonical.is_none();
        scratch.names.clear();
        scratch.names.push_str(&spec.id);
        scratch.hostnames.clear();
        for (name, &ready) in spec.hostnames.iter().zip(ready) {
            let Some(wildcard) = normal_policy_name(name) else {
                return false;
            };
            let key = if wildcard { &name[2..] } else { &name[..] };
            canonical_listed |= !wildcard && canonical == Some(key);
            scratch.names.push(char::from(match (wildcard, ready) {
                (false, false) => EXACT,
                (false, true) => EXACT_READY,
                (true, false) => WILDCARD,
                (true, true) => WILDCARD_READY,
            }));
            scratch.hostnames.push(Ok((
                Span {
                    wildcard,
                    start: scratch.names.len(),
                    len: key.len(),
                },
                ready,
            )));
            scratch.names.push_str(key);
            scratch.names.push('\n');
        }
        if !canonical_listed || scratch.names.len() >= 1 << 24 {
            return false;
        }
        let slot = self.take_slot();
        let site = Arc::new(scratch.site(spec, canonical));
        let Policy {
            sites,
            ids,
            exact,
            wildcards,
            hasher,
            ..
        } = self;
        let inserted = (|| {
            let hash = hasher.hash_one(&*spec.id);
            match ids.entry(
                hash,
                |&s| id_of(sites, s) == &*spec.id,
                |&s| hasher.hash_one(id_of(sites, s)),
            ) {
                hash_table::Entry::Occupied(_) => return false,
                hash_table::Entry::Vacant(vacant) => {
                    vacant.insert(slot);
                }
            }
            if let Some(place) = sites.get_mut(slot as usize) {
                *place = Some(Arc::clone(&site));
            }
            let sites = &*sites;
            for (span, _) in scratch.hostnames.iter().flatten() {
                let table = if span.wildcard {
                    &mut *wildcards
                } else {
                    &mut *exact
                };
                let key = &scratch.names[span.start..span.start + span.len];
                match name_entry(table, sites, hasher, key) {
                    hash_table::Entry::Occupied(_) => return false,
                    hash_table::Entry::Vacant(vacant) => {
                        match NameEntry::new(slot, span.start, span.len) {
                            Some(entry) => {
                                vacant.insert(entry);
                            }
                            None => return false,
                        }
                    }
                }
            }
            true
        })();
        if !inserted {
            // A name or the id is taken: undo (the slot goes back to the free list, where the
            // full path takes it again).
            if let Some(place) = self.sites.get_mut(slot as usize) {
                *place = Some(site);
            }
            self.detach(slot);
        }
        inserted
    }
}

/// Builds a [`Policy`] one site at a time, so that a policy streamed from JSON never exists
/// as a whole document in memory (see [`super::stream`]). Sites are checked in order, exactly
/// as [`Policy::compile`] checks a document; the document-level checks run in
/// [`Compiler::finish`] and their problems are listed first.
#[derive(Debug, Default)]
pub(crate) struct Compiler {
    policy: Policy,
    problems: Vec<Problem>,
    scratch: Scratch,
    /// Set when there are more sites than a `u32` counts; later sites are not read.
    full: bool,
}

impl Compiler {
    /// A compiler with room for `sites` sites of about three names each.
    pub(crate) fn with_capacity(sites: usize) -> Compiler {
        let mut compiler = Compiler::default();
        compiler.reserve(sites);
        compiler
    }

    /// Makes room for `sites` more sites of about three names each.
    pub(crate) fn reserve(&mut self, sites: usize) {
        self.reserve_exact(sites, sites.saturating_mul(3));
    }

    /// Makes room for exactly `sites` sites and `names` names (a compact snapshot says how
    /// many it holds), so the tables are built without growing.
    pub(crate) fn reserve_exact(&mut self, sites: usize, names: usize) {
        let Policy {
            sites: slots,
            ids,
            exact,
            hasher,
            ..
        } = &mut self.policy;
        slots.reserve(sites);
        ids.reserve(sites, |&s| hasher.hash_one(id_of(slots, s)));
        exact.reserve(names, |e| hasher.hash_one(key_of(slots, e)));
    }

    /// Checks one site (the next in the document) and adds its names to the tables.
    pub(crate) fn add_site(&mut self, spec: &SiteEntry<'_>) {
        if let Some(s) = self.next_index() {
            self.policy.add_site(
                spec,
                Place::Document(s),
                &mut self.scratch,
                &mut self.problems,
            );
        }
    }

    /// [`Compiler::add_site`] for a site of a compact snapshot, whose certificate flags come
    /// per hostname (`ready`) rather than as `spec.cert_ready`, which must be empty and is
    /// filled from them only when the site needs the full checks.
    pub(crate) fn add_compact_site(&mut self, spec: &mut SiteEntry<'_>, ready: &[bool]) {
        let Some(s) = self.next_index() else {
            return;
        };
        if self.policy.add_normal_site(spec, ready, &mut self.scratch) {
            return;
        }
        spec.cert_ready.clear();
        spec.cert_ready.extend(
            spec.hostnames
                .iter()
                .zip(ready)
                .filter(|(_, ready)| **ready)
                .map(|(name, _)| Text(name.0.clone())),
        );
        self.policy.add_site(
            spec,
            Place::Document(s),
            &mut self.scratch,
            &mut self.problems,
        );
    }

    /// The document index of the next site (its slot), or `None` once the sites no longer
    /// fit a `u32` (said once, as a problem).
    fn next_index(&mut self) -> Option<usize> {
        if self.full {
            return None;
        }
        let s = self.policy.sites.len();
        if u32::try_from(s).is_err() || s == u32::MAX as usize {
            self.problems.push(Problem {
                path: format!("sites[{s}].id"),
                message: "too many sites".into(),
            });
            self.full = true;
            return None;
        }
        Some(s)
    }

    /// Runs the document-level checks and, when nothing is wrong, hands out the policy.
    pub(crate) fn finish(
        self,
        schema: u32,
        version: &str,
        settings: &Settings,
    ) -> Result<Policy, Error> {
        let mut problems = Vec::new();
        let mut problem = |path: String, message: String| problems.push(Problem { path, message });
        if schema != SCHEMA_VERSION {
            problem(
                "schema".into(),
                format!(
                    "schema {schema} is not supported by this filter (it reads schema {SCHEMA_VERSION}); upgrade the filter or the sidecar so they match"
                ),
            );
        }
        if let Err(message) = check_token(version, "version", false) {
            problem("version".into(), message);
        }
        let trusted_proxies = match parse_settings(settings) {
            Ok(trusted_proxies) => trusted_proxies,
            Err(settings_problems) => {
                problems.extend(settings_problems);
                Vec::new()
            }
        };
        problems.extend(self.problems);
        if !problems.is_empty() {
            return Err(Error::InvalidPolicy(problems));
        }
        let mut policy = self.policy;
        {
            let Policy {
                sites,
                ids,
                exact,
                wildcards,
                hasher,
                ..
            } = &mut policy;
            sites.shrink_to_fit();
            ids.shrink_to_fit(|&s| hasher.hash_one(id_of(sites, s)));
            exact.shrink_to_fit(|e| hasher.hash_one(key_of(sites, e)));
            wildcards.shrink_to_fit(|e| hasher.hash_one(key_of(sites, e)));
        }
        policy.version = version.to_string();
        policy.trusted_proxies = trusted_proxies;
        policy.http_port = settings.http_port;
        policy.https_port = settings.https_port;
        Ok(policy)
    }
}

impl Settings {
    /// Everything wrong with these settings, each with its path (`settings.http_port`): the
    /// checks [`Policy::compile`] makes, for a caller that holds edge settings before it has
    /// any policy (the sidecar's configuration).
    pub fn problems(&self) -> Vec<Problem> {
        parse_settings(self).err().unwrap_or_default()
    }
}

/// The trusted proxies of valid settings, or every problem of invalid ones.
fn parse_settings(settings: &Settings) -> Result<Vec<Cidr>, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut trusted_proxies = Vec::with_capacity(settings.trusted_proxies.len());
    for (i, raw) in settings.trusted_proxies.iter().enumerate() {
        match Cidr::parse(raw) {
            Ok(cidr) => trusted_proxies.push(cidr),
            Err(message) => problems.push(Problem {
                path: format!("settings.trusted_proxies[{i}]"),
                message,
            }),
        }
    }
    for (field, port) in [
        ("http_port", settings.http_port),
        ("https_port", settings.https_port),
    ] {
        if port == 0 {
            problems.push(Problem {
                path: format!("settings.{field}"),
                message: "the port must be 1 to 65535".into(),
            });
        }
    }
    if problems.is_empty() {
        Ok(trusted_proxies)
    } else {
        Err(problems)
    }
}

/// A name as the policy wrote it: `*.parent` for a wildcard's table key.
fn shown_name(key: &str, wildcard: bool) -> String {
    if wildcard {
        format!("*.{key}")
    } else {
        key.to_string()
    }
}

/// Checks ids and versions: non-empty, at most 128 bytes, printable ASCII (ids: letters, digits,
/// `.`, `_`, `-` only).
fn check_token(value: &str, what: &str, strict: bool) -> Result<(), String> {
    let allowed_byte = |b: &u8| {
        if strict {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
        } else {
            b.is_ascii_graphic()
        }
    };
    if !value.is_empty() && value.len() <= MAX_ID_LEN && value.bytes().all(|b| allowed_byte(&b)) {
        return Ok(());
    }
    if value.is_empty() {
        return Err(format!("the {what} is empty"));
    }
    if value.len() > MAX_ID_LEN {
        return Err(format!(
            "the {what} is {} bytes long; the limit is {MAX_ID_LEN}",
            value.len()
        ));
    }
    let allowed = |c: char| {
        if strict {
            c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
        } else {
            c.is_ascii_graphic()
        }
    };
    if let Some(bad) = value.chars().find(|c| !allowed(*c)) {
        return Err(if strict {
            format!("the {what} contains {bad:?}; use letters, digits, '.', '_' and '-' only")
        } else {
            format!("the {what} contains {bad:?}; use printable ASCII without spaces")
        });
    }
    Ok(())
}

/// A report URI is a path on the site (`/…`) or an `https://` URL, with no characters that
/// would end the CSP directive or the header.
fn check_report_uri(uri: &str) -> Result<(), String> {
    if !(uri.starts_with('/') || uri.starts_with("https://")) {
        return Err(format!(
            "{uri:?} must be a path starting with '/' or an https:// URL"
        ));
    }
    if let Some(bad) = uri
        .chars()
        .find(|c| !c.is_ascii_graphic() || matches!(c, ';' | ',' | '\''))
    {
        return Err(format!(
            "{uri:?} contains {bad:?}, which cannot appear in a CSP directive"
        ));
    }
    Ok(())
}

/// Shortest and longest report token, in bytes.
const REPORT_TOKEN_LEN: std::ops::RangeInclusive<usize> = 16..=128;

/// A report token is 16 to 128 URL-safe characters (letters, digits, `-`, `_`), so it needs no
/// escaping in a query string or a CSP directive, and is long enough not to be guessed.
fn check_report_token(token: &str) -> Result<(), String> {
    if !REPORT_TOKEN_LEN.contains(&token.len()) {
        return Err(format!(
            "the report token is {} bytes long; it must be {} to {} bytes",
            token.len(),
            REPORT_TOKEN_LEN.start(),
            REPORT_TOKEN_LEN.end()
        ));
    }
    if let Some(bad) = token
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_')))
    {
        return Err(format!(
            "the report token contains {bad:?}; use letters, digits, '-' and '_' only"
        ));
    }
    Ok(())
}

/// The report URI a page's policy names: the site's URI, with `site=<id>&token=<token>` added
/// to its query when the site has a token (site ids and tokens need no escaping).
fn report_uri_with_token(report_uri: &str, site: &str, token: Option<&str>) -> String {
    match token {
        None => report_uri.to_string(),
        Some(token) => {
            let separator = if report_uri.contains('?') { '&' } else { '?' };
            format!("{report_uri}{separator}site={site}&token={token}")
        }
    }
}
