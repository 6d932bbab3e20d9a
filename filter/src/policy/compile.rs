//! Validation of a [`PolicyDocument`] and the lookup tables built from it.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;

use crate::Error;

use super::cidr::Cidr;
use super::host::{PolicyName, parse_policy_name, wildcard_parent};
use super::schema::{
    DEFAULT_REPORT_URI, HttpsMode, MixedContent, PolicyDocument, RedirectKind, SCHEMA_VERSION,
    Settings, SiteSpec,
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

/// Where a hostname leads: the site's index and whether its certificate is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NameEntry {
    pub(crate) site: u32,
    pub(crate) cert_ready: bool,
}

/// A site, compiled for the decision function.
#[derive(Debug, Clone)]
pub struct Site {
    /// The site's id.
    pub id: String,
    /// Its HTTPS mode.
    pub https: HttpsMode,
    /// Permanent or temporary redirects.
    pub redirect: RedirectKind,
    /// Where redirects go, when set.
    pub canonical_host: Option<String>,
    /// The `Strict-Transport-Security` value to add over HTTPS, when enabled.
    pub hsts: Option<String>,
    /// Mixed-content mode.
    pub mixed_content: MixedContent,
    /// The `Content-Security-Policy-Report-Only` value for `report` mode.
    pub report_only_csp: Option<String>,
}

/// A validated policy with its lookup tables. Per-request lookups cost the same whatever the
/// number of sites: one hash lookup for the exact name, one for its wildcard parent.
#[derive(Debug, Clone)]
pub struct Policy {
    pub(crate) version: String,
    pub(crate) trusted_proxies: Vec<Cidr>,
    pub(crate) http_port: u16,
    pub(crate) https_port: u16,
    pub(crate) sites: Vec<Site>,
    pub(crate) exact: HashMap<Box<str>, NameEntry>,
    pub(crate) wildcards: HashMap<Box<str>, NameEntry>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy::empty()
    }
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
            exact: HashMap::new(),
            wildcards: HashMap::new(),
        }
    }

    /// Validates a document and builds the lookup tables. Every problem is reported, each with
    /// its JSON path; nothing is built unless there are none.
    pub fn compile(document: &PolicyDocument) -> Result<Policy, Error> {
        let mut compiler = Compiler::default();
        for spec in &document.sites {
            compiler.add_site(spec);
        }
        compiler.finish(document.schema, &document.version, &document.settings)
    }

    /// The policy's version string.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Number of sites.
    pub fn site_count(&self) -> usize {
        self.sites.len()
    }

    /// The site at an index handed out by [`Policy::lookup`] or a decision.
    pub fn site(&self, index: u32) -> Option<&Site> {
        self.sites.get(index as usize)
    }

    /// Finds the site of a normalised host: exact name first, then a `*.parent` wildcard.
    /// Returns the site's index and whether a served certificate covers this host.
    pub fn lookup(&self, host: &str) -> Option<(u32, bool)> {
        let wildcard =
            || wildcard_parent(host).and_then(|parent| self.wildcards.get(parent).copied());
        if let Some(entry) = self.exact.get(host) {
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
}

/// Builds a [`Policy`] one site at a time, so that a policy streamed from JSON never exists
/// as a whole document in memory (see [`super::stream`]). Sites are checked in order, exactly
/// as [`Policy::compile`] checks a document; the document-level checks run in
/// [`Compiler::finish`] and their problems are listed first.
#[derive(Debug, Default)]
pub(crate) struct Compiler {
    problems: Vec<Problem>,
    sites: Vec<Site>,
    exact: HashMap<Box<str>, NameEntry>,
    wildcards: HashMap<Box<str>, NameEntry>,
    /// Site ids seen, each with the index of the latest site that used it.
    ids: HashMap<Box<str>, usize>,
    /// Set when there are more sites than a `u32` counts; later sites are not read.
    full: bool,
}

impl Compiler {
    /// Checks one site (the next in the document) and adds its names to the tables.
    pub(crate) fn add_site(&mut self, spec: &SiteSpec) {
        if self.full {
            return;
        }
        let s = self.sites.len();
        let problems = &mut self.problems;
        let mut problem = |path: String, message: String| problems.push(Problem { path, message });
        let at = |field: &str| format!("sites[{s}].{field}");
        let Ok(site_index) = u32::try_from(s) else {
            problem(at("id"), "too many sites".into());
            self.full = true;
            return;
        };
        if let Err(message) = check_token(&spec.id, "site id", true) {
            problem(at("id"), message);
        } else if let Some(first) = self.ids.insert(spec.id.as_str().into(), s) {
            problem(
                at("id"),
                format!("site id {:?} is already used by sites[{first}]", spec.id),
            );
        }
        if spec.hostnames.is_empty() {
            problem(at("hostnames"), "a site needs at least one hostname".into());
        }
        // The names with a served certificate, parsed first (their problems are reported after
        // the hostnames'), so each hostname is inserted with its flag already set: one hash per
        // name instead of two. A `cert_ready` name is valid when this site inserted it.
        let cert_names: Vec<Result<(bool, String), String>> = spec
            .cert_ready
            .iter()
            .map(|raw| match parse_policy_name(raw) {
                Ok(PolicyName::Exact(name)) => Ok((false, name)),
                Ok(PolicyName::Wildcard(parent)) => Ok((true, parent)),
                Err(message) => Err(format!("{raw:?} is not a valid hostname: {message}")),
            })
            .collect();
        // Which `cert_ready` names this site owns (it listed them first).
        let mut owned = vec![false; cert_names.len()];
        // The site's exact names, needed only to check its canonical host.
        let mut own_exact: Vec<String> = Vec::new();
        for (h, raw) in spec.hostnames.iter().enumerate() {
            let (table, key, wildcard) = match parse_policy_name(raw) {
                Ok(PolicyName::Exact(name)) => {
                    if spec.canonical_host.is_some() {
                        own_exact.push(name.clone());
                    }
                    (&mut self.exact, name, false)
                }
                Ok(PolicyName::Wildcard(parent)) => (&mut self.wildcards, parent, true),
                Err(message) => {
                    problem(
                        at(&format!("hostnames[{h}]")),
                        format!("{raw:?} is not a valid hostname: {message}"),
                    );
                    continue;
                }
            };
            // A name belongs to one site: the first that lists it.
            match table.entry(key.into_boxed_str()) {
                Entry::Occupied(first) => {
                    let other = first.get().site as usize;
                    let shown = shown_name(first.key(), wildcard);
                    let message = if other == s {
                        format!("{shown} is listed twice in this site")
                    } else {
                        format!(
                            "{shown} already belongs to sites[{other}] ({:?}); a name can belong to one site only",
                            self.sites.get(other).map_or("", |site| site.id.as_str())
                        )
                    };
                    problem(at(&format!("hostnames[{h}]")), message);
                }
                Entry::Vacant(slot) => {
                    let mut cert_ready = false;
                    for (c, parsed) in cert_names.iter().enumerate() {
                        if matches!(parsed, Ok((w, k)) if *w == wildcard && **k == **slot.key()) {
                            owned[c] = true;
                            cert_ready = true;
                        }
                    }
                    slot.insert(NameEntry {
                        site: site_index,
                        cert_ready,
                    });
                }
            }
        }
        for (c, parsed) in cert_names.iter().enumerate() {
            match parsed {
                Ok((wildcard, key)) => {
                    if !owned[c] {
                        problem(
                            at(&format!("cert_ready[{c}]")),
                            format!(
                                "{} has a certificate but is not one of this site's hostnames; list it in hostnames first",
                                shown_name(key, *wildcard)
                            ),
                        );
                    }
                }
                Err(message) => problem(at(&format!("cert_ready[{c}]")), message.clone()),
            }
        }
        let canonical_host = match &spec.canonical_host {
            None => None,
            Some(raw) => match parse_policy_name(raw) {
                Ok(PolicyName::Exact(name)) if own_exact.contains(&name) => Some(name),
                Ok(PolicyName::Exact(name)) => {
                    problem(
                        at("canonical_host"),
                        format!(
                            "{name} is not one of this site's hostnames; the canonical host must be one of them"
                        ),
                    );
                    None
                }
                Ok(PolicyName::Wildcard(_)) => {
                    problem(
                        at("canonical_host"),
                        "the canonical host must be an exact name, not a wildcard".into(),
                    );
                    None
                }
                Err(message) => {
                    problem(
                        at("canonical_host"),
                        format!("{raw:?} is not a valid hostname: {message}"),
                    );
                    None
                }
            },
        };
        let hsts = spec.hsts.enabled.then(|| {
            let mut value = format!("max-age={}", spec.hsts.max_age);
            if spec.hsts.include_subdomains {
                value.push_str("; includeSubDomains");
            }
            if spec.hsts.preload {
                value.push_str("; preload");
            }
            value
        });
        if spec.hsts.preload && (spec.hsts.max_age < 31_536_000 || !spec.hsts.include_subdomains) {
            problem(
                at("hsts.preload"),
                "preload needs max_age of at least 31536000 and include_subdomains".into(),
            );
        }
        let report_uri = spec.report_uri.as_deref().unwrap_or(DEFAULT_REPORT_URI);
        if let Err(message) = check_report_uri(report_uri) {
            problem(at("report_uri"), message);
        }
        if let Some(token) = &spec.report_token
            && let Err(message) = check_report_token(token)
        {
            problem(at("report_token"), message);
        }
        let report_only_csp = (spec.mixed_content == MixedContent::Report).then(|| {
            let report_uri = report_uri_with_token(report_uri, &spec.id, spec.report_token.as_deref());
            format!(
                "default-src https: wss: data: blob: 'unsafe-inline' 'unsafe-eval'; form-action https:; report-uri {report_uri}"
            )
        });
        self.sites.push(Site {
            id: spec.id.clone(),
            https: spec.https,
            redirect: spec.redirect,
            canonical_host,
            hsts,
            mixed_content: spec.mixed_content,
            report_only_csp,
        });
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
        let mut trusted_proxies = Vec::with_capacity(settings.trusted_proxies.len());
        for (i, raw) in settings.trusted_proxies.iter().enumerate() {
            match Cidr::parse(raw) {
                Ok(cidr) => trusted_proxies.push(cidr),
                Err(message) => problem(format!("settings.trusted_proxies[{i}]"), message),
            }
        }
        for (field, port) in [
            ("http_port", settings.http_port),
            ("https_port", settings.https_port),
        ] {
            if port == 0 {
                problem(
                    format!("settings.{field}"),
                    "the port must be 1 to 65535".into(),
                );
            }
        }
        problems.extend(self.problems);
        if !problems.is_empty() {
            return Err(Error::InvalidPolicy(problems));
        }
        let Compiler {
            mut sites,
            mut exact,
            mut wildcards,
            ..
        } = self;
        sites.shrink_to_fit();
        exact.shrink_to_fit();
        wildcards.shrink_to_fit();
        Ok(Policy {
            version: version.to_string(),
            trusted_proxies,
            http_port: settings.http_port,
            https_port: settings.https_port,
            sites,
            exact,
            wildcards,
        })
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
