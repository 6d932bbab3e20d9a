//! The filter's conformance scenarios (`tests/conformance/scenarios.json`): their types, the
//! policies they name, and the observable result both hosts (wasmtime and Envoy) must agree on.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use anyhow::{Context as _, anyhow, bail};
use serde::Deserialize;
use serde_json::Value;

/// The scenario file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioFile {
    /// What the file is.
    pub about: String,
    /// Sites shared by every policy.
    pub sites: Vec<Value>,
    /// Named policies: settings plus optional site replacements.
    pub policies: BTreeMap<String, PolicyVariant>,
    /// Request scenarios.
    pub scenarios: Vec<Scenario>,
    /// Plugin configurations that must be rejected.
    pub invalid_configs: Vec<InvalidConfig>,
    /// Policy-feed scenarios.
    pub feed: Vec<FeedScenario>,
}

/// A named policy: the shared sites with these settings, some sites replaced by id.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyVariant {
    /// The policy's `settings`.
    pub settings: Value,
    /// Sites that replace the shared site with the same id.
    #[serde(default)]
    pub replace_sites: Vec<Value>,
}

/// One request and what must come of it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Behaviour-stating name.
    pub name: String,
    /// The policy it runs under.
    pub policy: String,
    /// The request.
    #[serde(flatten)]
    pub request: Request,
    /// Which upstream answers a passed request.
    #[serde(default)]
    pub upstream: Upstream,
    /// What the client must see.
    pub expect: Observed,
}

/// A request.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// `http` or `https` (the downstream connection).
    pub scheme: String,
    /// Method; GET when absent.
    #[serde(default = "get")]
    pub method: String,
    /// Host header.
    pub host: String,
    /// Path and query.
    pub path: String,
    /// Extra request headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// The HTTP version of the request line: `1.1` when absent, or `1.0` (sent by curl
    /// `--http1.0` in Envoy; the wasm host has no request line, and the filter's decision does
    /// not depend on the version).
    #[serde(default)]
    pub http_version: Option<String>,
    /// The TCP peer Envoy sees: the loopback address the client binds. [`CLIENT_PEER`] when
    /// absent; a scenario names another to play a trusted proxy or an attacker beside it.
    #[serde(default = "client_peer")]
    pub peer: String,
}

/// The peer of a scenario that names none: a loopback client of Envoy.
pub const CLIENT_PEER: &str = "127.0.0.1";

fn get() -> String {
    "GET".to_string()
}

fn client_peer() -> String {
    CLIENT_PEER.to_string()
}

impl Request {
    /// Whether the downstream connection is TLS.
    pub fn tls(&self) -> bool {
        self.scheme == "https"
    }
}

/// The upstream's own response headers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Upstream {
    /// No interesting headers.
    #[default]
    Plain,
    /// `Strict-Transport-Security: max-age=5`.
    Hsts,
    /// `Content-Security-Policy: default-src 'self'`.
    Csp,
    /// `Content-Security-Policy: upgrade-insecure-requests`.
    CspUpgrade,
}

impl Upstream {
    /// The name used in the scenario file and in the Envoy config's route match.
    pub fn name(self) -> &'static str {
        match self {
            Upstream::Plain => "plain",
            Upstream::Hsts => "hsts",
            Upstream::Csp => "csp",
            Upstream::CspUpgrade => "csp-upgrade",
        }
    }

    /// The headers this upstream sends.
    pub fn headers(self) -> Vec<(&'static str, &'static str)> {
        match self {
            Upstream::Plain => vec![],
            Upstream::Hsts => vec![("strict-transport-security", "max-age=5")],
            Upstream::Csp => vec![("content-security-policy", "default-src 'self'")],
            Upstream::CspUpgrade => {
                vec![("content-security-policy", "upgrade-insecure-requests")]
            }
        }
    }
}

/// What a client sees: the status and the headers the filter is responsible for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Observed {
    /// Status code.
    pub status: u16,
    /// `Location`, if any.
    #[serde(default)]
    pub location: Option<String>,
    /// Every `Strict-Transport-Security` value.
    #[serde(default)]
    pub hsts: Vec<String>,
    /// Every `Content-Security-Policy` value, sorted.
    #[serde(default)]
    pub csp: Vec<String>,
    /// Every `Content-Security-Policy-Report-Only` value.
    #[serde(default)]
    pub csp_report_only: Vec<String>,
}

impl Observed {
    /// Builds an observation from a status and response headers (names lower-cased).
    pub fn from_headers<'a>(
        status: u16,
        headers: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Observed {
        let mut observed = Observed {
            status,
            ..Observed::default()
        };
        for (name, value) in headers {
            let value = value.to_string();
            match name {
                "location" => observed.location = Some(value),
                "strict-transport-security" => observed.hsts.push(value),
                "content-security-policy" => observed.csp.push(value),
                "content-security-policy-report-only" => observed.csp_report_only.push(value),
                _ => {}
            }
        }
        observed.normalise();
        observed
    }

    /// Sorts multi-valued headers, whose order carries no meaning here.
    pub fn normalise(&mut self) {
        self.hsts.sort();
        self.csp.sort();
        self.csp_report_only.sort();
    }
}

/// A plugin configuration the filter must reject, and a phrase its log must contain.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InvalidConfig {
    /// Behaviour-stating name.
    pub name: String,
    /// The raw plugin configuration.
    pub config: String,
    /// A phrase the rejection log must contain.
    pub log: String,
}

/// A policy-feed scenario: the filter starts on the `main` policy with a feed; the feed answers
/// once; then a request shows which policy is in force.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedScenario {
    /// Behaviour-stating name.
    pub name: String,
    /// The feed's answer.
    pub answer: FeedAnswer,
    /// The counter (without `autohttps.`) that must go up once the answer is handled.
    pub counter: String,
    /// A phrase the filter's log must contain once the answer is handled, in both hosts (how
    /// Envoy hands a failed call to the filter: its generated 503 or 504 reply).
    #[serde(default)]
    pub log: Option<String>,
    /// Overrides `feed.max_bytes` for this scenario (a small limit makes "huge body" cheap).
    #[serde(default)]
    pub max_bytes: Option<usize>,
    /// The request after the answer.
    pub request: Request,
    /// What it must see.
    pub expect: Observed,
}

/// How the feed answers.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedAnswer {
    /// HTTP status.
    #[serde(default)]
    pub status: Option<u16>,
    /// A named policy as the body.
    #[serde(default)]
    pub policy: Option<String>,
    /// A raw body.
    #[serde(default)]
    pub body: Option<String>,
    /// An ETag header.
    #[serde(default)]
    pub etag: Option<String>,
    /// The feed is unreachable.
    #[serde(default)]
    pub down: bool,
    /// The feed accepts the call and never answers: the filter's `timeout_ms` must end it.
    #[serde(default)]
    pub hang: bool,
}

/// The feed settings both hosts use (the feed's cluster is called `feed`).
pub const FEED_CONFIG: &str =
    r#"{"cluster": "feed", "path": "/v1/policy", "interval_ms": 200, "timeout_ms": 500}"#;

/// The feed's `timeout_ms` in [`FEED_CONFIG`].
pub const FEED_TIMEOUT_MS: u64 = 500;

impl ScenarioFile {
    /// Reads `tests/conformance/scenarios.json`.
    pub fn load() -> anyhow::Result<ScenarioFile> {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("conformance/scenarios.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// The policy document named `name`, as one line of JSON.
    pub fn policy_json(&self, name: &str) -> anyhow::Result<String> {
        let variant = self
            .policies
            .get(name)
            .ok_or_else(|| anyhow!("no policy named {name:?}"))?;
        let replacements: HashMap<&str, &Value> = variant
            .replace_sites
            .iter()
            .map(|site| (site["id"].as_str().unwrap_or_default(), site))
            .collect();
        let sites: Vec<&Value> = self
            .sites
            .iter()
            .map(|site| {
                let id = site["id"].as_str().unwrap_or_default();
                replacements.get(id).copied().unwrap_or(site)
            })
            .collect();
        let document = serde_json::json!({
            "schema": 1,
            "version": name,
            "settings": variant.settings,
            "sites": sites,
        });
        let json = serde_json::to_string(&document)?;
        if json.contains('\'') {
            bail!("policy {name} contains a single quote, which the Envoy template cannot carry");
        }
        Ok(json)
    }

    /// The policy's `settings.trusted_proxies`: the conformance Envoy's trusted-proxy filter
    /// chains are rendered from the same list.
    pub fn trusted_proxies(&self, name: &str) -> anyhow::Result<Vec<String>> {
        let variant = self
            .policies
            .get(name)
            .ok_or_else(|| anyhow!("no policy named {name:?}"))?;
        match variant.settings.get("trusted_proxies") {
            None => Ok(Vec::new()),
            Some(list) => serde_json::from_value(list.clone())
                .with_context(|| format!("policy {name}: settings.trusted_proxies")),
        }
    }

    /// The plugin configuration for a request scenario's policy.
    pub fn plugin_config(&self, policy: &str) -> anyhow::Result<String> {
        Ok(format!(r#"{{"policy": {}}}"#, self.policy_json(policy)?))
    }

    /// The plugin configuration for a feed scenario: the `main` policy plus the feed, with the
    /// scenario's `max_bytes` when it sets one.
    pub fn feed_plugin_config(&self, scenario: &FeedScenario) -> anyhow::Result<String> {
        let mut feed: Value = serde_json::from_str(FEED_CONFIG)?;
        if let Some(max_bytes) = scenario.max_bytes {
            feed["max_bytes"] = max_bytes.into();
        }
        Ok(format!(
            r#"{{"policy": {}, "feed": {feed}}}"#,
            self.policy_json("main")?
        ))
    }

    /// The body a feed answer carries.
    pub fn answer_body(&self, answer: &FeedAnswer) -> anyhow::Result<String> {
        match (&answer.policy, &answer.body) {
            (Some(policy), _) => self.policy_json(policy),
            (None, Some(body)) => Ok(body.clone()),
            (None, None) => Ok(String::new()),
        }
    }
}

/// A test stand-in for the sidecar's policy feed, speaking protocol v1 (`PolicyDelta`, the
/// filter's feed module): it holds the policy's states as versions `<epoch>-<n>` of one epoch, answers a
/// request with a snapshot, a delta or 304 as the sidecar would, and counts what it sent. It is
/// the conformance suites' feed in both hosts (the wasmtime test calls [`FeedStandIn::answer`]
/// itself; the Envoy test serves it over HTTP), so it is the protocol's reference for tests, not
/// the sidecar's implementation.
#[derive(Debug)]
pub struct FeedStandIn {
    epoch: String,
    /// The states, oldest first; `states[i]` is version `<epoch>-<first + i>`.
    states: Vec<autohttps_filter::policy::PolicyDocument>,
    first: u64,
    /// How many versions back a delta is still served; older `since` gets a snapshot.
    pub history: u64,
    /// Requests answered (304 included).
    pub requests: u64,
    /// Body bytes sent.
    pub body_bytes: u64,
    /// Snapshots sent.
    pub snapshots: u64,
    /// Deltas sent.
    pub deltas: u64,
}

/// What the filter asked: `since`, `wait_ms` and `If-None-Match` (unquoted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FeedRequest {
    /// The version the filter holds.
    pub since: Option<String>,
    /// How long it lets the feed hold the request.
    pub wait_ms: u64,
    /// The last version it saw.
    pub if_none_match: Option<String>,
}

impl FeedRequest {
    /// Reads a request's path (`/v1/policy?since=…&wait_ms=…`) and `If-None-Match` header.
    pub fn parse(path: &str, if_none_match: Option<&str>) -> anyhow::Result<FeedRequest> {
        let mut request = FeedRequest {
            if_none_match: if_none_match.map(|v| v.trim().trim_matches('"').to_string()),
            ..FeedRequest::default()
        };
        let query = path.split_once('?').map_or("", |(_, q)| q);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "since" => request.since = Some(percent_decode(value)?),
                "wait_ms" => request.wait_ms = value.parse().context("wait_ms")?,
                other => bail!("the filter sent an unknown query parameter {other:?}"),
            }
        }
        Ok(request)
    }
}

fn percent_decode(value: &str) -> anyhow::Result<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = value.get(i + 1..i + 3).context("a short %-escape")?;
            out.push(u8::from_str_radix(hex, 16).context("a bad %-escape")?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(String::from_utf8(out)?)
}

/// A feed answer: status, headers, body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedReply {
    /// HTTP status (200 or 304).
    pub status: u16,
    /// Response headers (`etag`, `autohttps-policy-kind`).
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: String,
}

impl FeedReply {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

impl FeedStandIn {
    /// A feed whose first state is `document` (its version is replaced by the feed's).
    pub fn new(epoch: &str, document: autohttps_filter::policy::PolicyDocument) -> FeedStandIn {
        let mut feed = FeedStandIn {
            epoch: epoch.to_string(),
            states: Vec::new(),
            first: 1,
            history: 1024,
            requests: 0,
            body_bytes: 0,
            snapshots: 0,
            deltas: 0,
        };
        feed.publish(document);
        feed
    }

    /// The version of the newest state.
    pub fn current_version(&self) -> String {
        self.version(self.first + self.states.len() as u64 - 1)
    }

    fn version(&self, n: u64) -> String {
        format!("{}-{n}", self.epoch)
    }

    /// The newest state.
    pub fn current(&self) -> &autohttps_filter::policy::PolicyDocument {
        self.states.last().expect("a feed has a state")
    }

    /// Adds a state (a new version); returns its version.
    pub fn publish(&mut self, mut document: autohttps_filter::policy::PolicyDocument) -> String {
        let version = self.version(self.first + self.states.len() as u64);
        document.version = version.clone();
        self.states.push(document);
        version
    }

    /// Answers a request as the sidecar does; `None` when there is nothing newer to say yet
    /// (a long poll holds the request, then answers 304 when its wait is over).
    pub fn answer(&mut self, request: &FeedRequest) -> Option<FeedReply> {
        let current = self.current_version();
        let unchanged = request.if_none_match.as_deref() == Some(current.as_str())
            || request.since.as_deref() == Some(current.as_str());
        if unchanged {
            return None;
        }
        let base = request
            .since
            .as_deref()
            .and_then(|since| since.strip_prefix(&format!("{}-", self.epoch)))
            .and_then(|n| n.parse::<u64>().ok())
            .filter(|n| {
                let newest = self.first + self.states.len() as u64 - 1;
                *n >= self.first && *n < newest && newest - n <= self.history
            });
        self.requests += 1;
        let reply = match base {
            Some(n) => {
                let from = &self.states[(n - self.first) as usize];
                let to = self.current();
                let upsert: Vec<_> = to
                    .sites
                    .iter()
                    .filter(|site| !from.sites.contains(site))
                    .cloned()
                    .collect();
                let remove: Vec<String> = from
                    .sites
                    .iter()
                    .filter(|old| !to.sites.iter().any(|s| s.id == old.id))
                    .map(|s| s.id.clone())
                    .collect();
                let delta = autohttps_filter::policy::PolicyDelta {
                    schema: 1,
                    from: self.version(n),
                    version: current.clone(),
                    upsert,
                    remove,
                };
                self.deltas += 1;
                self.reply(
                    "delta",
                    &current,
                    serde_json::to_string(&delta).expect("json"),
                )
            }
            None => {
                self.snapshots += 1;
                let body = serde_json::to_string(self.current()).expect("json");
                self.reply("snapshot", &current, body)
            }
        };
        Some(reply)
    }

    /// The answer to a request whose long-poll wait ran out with nothing new.
    pub fn not_modified(&mut self) -> FeedReply {
        self.requests += 1;
        FeedReply {
            status: 304,
            headers: vec![("etag".into(), format!("\"{}\"", self.current_version()))],
            body: String::new(),
        }
    }

    /// A reply that carries `body` as it is (a delta written by hand, a document of another
    /// version), counted like any other.
    pub fn raw(&mut self, kind: &str, version: &str, body: String) -> FeedReply {
        self.requests += 1;
        self.reply(kind, version, body)
    }

    fn reply(&mut self, kind: &str, version: &str, body: String) -> FeedReply {
        self.body_bytes += body.len() as u64;
        FeedReply {
            status: 200,
            headers: vec![
                ("etag".into(), format!("\"{version}\"")),
                ("autohttps-policy-kind".into(), kind.into()),
            ],
            body,
        }
    }
}
