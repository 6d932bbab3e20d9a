//! The policy document as it travels: versioned JSON, unknown fields rejected.
//!
//! The sidecar serialises these types for the policy feed, and the plugin deserialises them from
//! its Envoy configuration or from the feed. [`super::Policy::compile`] validates a document and
//! builds the lookup tables the decision function uses.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

/// The only schema version this build understands.
pub const SCHEMA_VERSION: u32 = 1;

/// Default report endpoint for `mixed_content: report`: a path on the site's own host that the
/// edge routes to the sidecar, which files each report under the site and page.
pub const DEFAULT_REPORT_URI: &str = "/.well-known/autohttps/csp-report";

/// A whole policy: global settings and every site the edge serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyDocument {
    /// Schema version; must equal [`SCHEMA_VERSION`].
    pub schema: u32,
    /// Opaque version of this policy (the feed's ETag); reported in logs and stats.
    pub version: String,
    /// Settings that apply to every site.
    #[serde(default)]
    pub settings: Settings,
    /// The sites.
    #[serde(default)]
    pub sites: Vec<SiteSpec>,
}

/// The changes that turn policy version `from` into `version`: the feed's answer when the
/// filter already holds `from` (header `autohttps-policy-kind: delta`). A site id appears at
/// most once across `upsert` and `remove`; settings never change in a delta (a settings change
/// is sent as a snapshot).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyDelta {
    /// Schema version; must equal [`SCHEMA_VERSION`].
    pub schema: u32,
    /// The version this delta applies to (the filter's current version).
    pub from: String,
    /// The version the policy has once the delta is applied.
    pub version: String,
    /// Sites added or changed: each replaces the site's whole entry.
    #[serde(default)]
    pub upsert: Vec<SiteSpec>,
    /// Ids of sites removed.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// [`PolicyDelta`] as the plugin reads it: the same fields and errors, its strings borrowed
/// from the JSON (so a delta is read with the site parser the snapshot uses, and no copy).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename = "PolicyDelta")]
pub(crate) struct DeltaEntries<'a> {
    pub(crate) schema: u32,
    #[serde(borrow)]
    pub(crate) from: Text<'a>,
    #[serde(borrow)]
    pub(crate) version: Text<'a>,
    #[serde(default, borrow)]
    pub(crate) upsert: Vec<SiteEntry<'a>>,
    #[serde(default, borrow)]
    pub(crate) remove: Vec<Text<'a>>,
}

/// Settings shared by every site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Peers (CIDRs or bare addresses) whose `X-Forwarded-Proto` is believed.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// The public plain-HTTP port; used in `Location` when it is not 80.
    #[serde(default = "default_http_port")]
    pub http_port: u16,
    /// The public HTTPS port; used in `Location` when it is not 443.
    #[serde(default = "default_https_port")]
    pub https_port: u16,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            trusted_proxies: Vec::new(),
            http_port: default_http_port(),
            https_port: default_https_port(),
        }
    }
}

fn default_http_port() -> u16 {
    80
}

fn default_https_port() -> u16 {
    443
}

/// One hosted site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteSpec {
    /// Stable identifier of the site (letters, digits, `.`, `_`, `-`).
    pub id: String,
    /// Every name of the site: exact names and `*.example.com` wildcards.
    pub hostnames: Vec<String>,
    /// The site's HTTPS mode.
    #[serde(default)]
    pub https: HttpsMode,
    /// Permanent (301/308) or temporary (302/307) redirects.
    #[serde(default)]
    pub redirect: RedirectKind,
    /// When set, redirects go to this name (one of the site's exact names).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canonical_host: Option<String>,
    /// Strict-Transport-Security settings.
    #[serde(default)]
    pub hsts: HstsSpec,
    /// Mixed-content protection.
    #[serde(default)]
    pub mixed_content: MixedContent,
    /// Where `report` mode sends CSP reports; defaults to [`DEFAULT_REPORT_URI`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_uri: Option<String>,
    /// The site's report token: appended to the report URI as `?site=<id>&token=<token>` so
    /// that the collector accepts reports only from pages the edge served (16 to 128 letters,
    /// digits, `-` or `_`). The sidecar derives it and rotates it; without it the URI is bare.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_token: Option<String>,
    /// The names (from `hostnames`) whose certificate is issued and served.
    #[serde(default)]
    pub cert_ready: Vec<String>,
}

impl SiteSpec {
    /// The entry as the compiler reads it, borrowing every string.
    pub(crate) fn as_entry(&self) -> SiteEntry<'_> {
        fn text(value: &str) -> Text<'_> {
            Text(Cow::Borrowed(value))
        }
        SiteEntry {
            id: text(&self.id),
            hostnames: self.hostnames.iter().map(|n| text(n)).collect(),
            https: self.https,
            redirect: self.redirect,
            canonical_host: self.canonical_host.as_deref().map(text),
            hsts: self.hsts.clone(),
            mixed_content: self.mixed_content,
            report_uri: self.report_uri.as_deref().map(text),
            report_token: self.report_token.as_deref().map(text),
            cert_ready: self.cert_ready.iter().map(|n| text(n)).collect(),
        }
    }
}

/// [`SiteSpec`] as the streamed compiler deserializes it: the same fields, defaults and
/// errors, but strings borrowed from the JSON where they need no unescaping, so a 100,000-site
/// snapshot is read without allocating each name.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename = "SiteSpec")]
pub(crate) struct SiteEntry<'a> {
    #[serde(borrow)]
    pub(crate) id: Text<'a>,
    #[serde(borrow)]
    pub(crate) hostnames: Vec<Text<'a>>,
    #[serde(default)]
    pub(crate) https: HttpsMode,
    #[serde(default)]
    pub(crate) redirect: RedirectKind,
    #[serde(default, borrow)]
    pub(crate) canonical_host: Option<Text<'a>>,
    #[serde(default)]
    pub(crate) hsts: HstsSpec,
    #[serde(default)]
    pub(crate) mixed_content: MixedContent,
    #[serde(default, borrow)]
    pub(crate) report_uri: Option<Text<'a>>,
    #[serde(default, borrow)]
    pub(crate) report_token: Option<Text<'a>>,
    #[serde(default, borrow)]
    pub(crate) cert_ready: Vec<Text<'a>>,
}

/// A string borrowed from the JSON when it has no escapes, owned otherwise.
#[derive(Debug)]
pub(crate) struct Text<'a>(pub(crate) Cow<'a, str>);

impl std::ops::Deref for Text<'_> {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor;

        impl<'de> serde::de::Visitor<'de> for TextVisitor {
            type Value = Text<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }

            fn visit_borrowed_str<E: serde::de::Error>(
                self,
                value: &'de str,
            ) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(value)))
            }

            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(value.to_owned())))
            }

            fn visit_string<E: serde::de::Error>(self, value: String) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(value)))
            }
        }

        deserializer.deserialize_str(TextVisitor)
    }
}

/// What the edge does with the two schemes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HttpsMode {
    /// HTTP and HTTPS are both served as they come.
    #[default]
    Auto,
    /// HTTP is redirected to HTTPS (once the target name has a certificate).
    Force,
    /// HTTPS is redirected to HTTP, and browsers are told to drop their HSTS pin.
    Disable,
}

impl HttpsMode {
    /// The lower-case name used in the schema, the API and stats.
    pub fn as_str(self) -> &'static str {
        match self {
            HttpsMode::Auto => "auto",
            HttpsMode::Force => "force",
            HttpsMode::Disable => "disable",
        }
    }
}

/// Permanent or temporary redirects.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedirectKind {
    /// 301 for GET/HEAD, 308 otherwise.
    #[default]
    Permanent,
    /// 302 for GET/HEAD, 307 otherwise.
    Temporary,
}

/// Strict-Transport-Security for a site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HstsSpec {
    /// Send HSTS over HTTPS when the upstream did not.
    #[serde(default)]
    pub enabled: bool,
    /// `max-age` in seconds.
    #[serde(default = "default_hsts_max_age")]
    pub max_age: u64,
    /// Add `includeSubDomains`.
    #[serde(default)]
    pub include_subdomains: bool,
    /// Add `preload`.
    #[serde(default)]
    pub preload: bool,
}

impl Default for HstsSpec {
    fn default() -> Self {
        HstsSpec {
            enabled: false,
            max_age: default_hsts_max_age(),
            include_subdomains: false,
            preload: false,
        }
    }
}

/// The HSTS `max-age` a site gets when none is given: one year, in seconds.
pub const DEFAULT_HSTS_MAX_AGE: u64 = 31_536_000;

/// The smallest `max-age` that may carry `preload` (with `includeSubDomains`): one year, as the
/// browsers' preload list requires.
pub const HSTS_PRELOAD_MIN_MAX_AGE: u64 = 31_536_000;

fn default_hsts_max_age() -> u64 {
    DEFAULT_HSTS_MAX_AGE
}

/// Mixed-content protection mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MixedContent {
    /// No header.
    #[default]
    Off,
    /// `Content-Security-Policy: upgrade-insecure-requests`.
    Upgrade,
    /// A report-only policy that reports every `http:` resource a page loads.
    Report,
}

/// The plugin's configuration in Envoy: an inline policy, a feed, or both (the inline policy is
/// served until the feed delivers a newer one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// A policy to start with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyDocument>,
    /// Where to poll for newer policies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feed: Option<FeedConfig>,
}

/// The policy feed the root context polls.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedConfig {
    /// Envoy cluster that serves the feed.
    pub cluster: String,
    /// Request path.
    #[serde(default = "default_feed_path")]
    pub path: String,
    /// `:authority` sent with the request.
    #[serde(default = "default_feed_authority")]
    pub authority: String,
    /// Milliseconds between polls.
    #[serde(default = "default_feed_interval_ms")]
    pub interval_ms: u64,
    /// Milliseconds before a poll is abandoned (after `wait_ms`, when the feed holds it).
    #[serde(default = "default_feed_timeout_ms")]
    pub timeout_ms: u64,
    /// Long poll: how long the feed may hold a request until something changes, in
    /// milliseconds (sent as `wait_ms`; 0 = answer at once, polling every `interval_ms`). After
    /// a held request is answered the filter asks again at once.
    #[serde(default)]
    pub wait_ms: u64,
    /// Largest policy body accepted, in bytes.
    #[serde(default = "default_feed_max_bytes")]
    pub max_bytes: usize,
}

fn default_feed_path() -> String {
    "/v1/policy".to_string()
}

fn default_feed_authority() -> String {
    "autohttps-sidecar".to_string()
}

fn default_feed_interval_ms() -> u64 {
    2_000
}

fn default_feed_timeout_ms() -> u64 {
    1_000
}

fn default_feed_max_bytes() -> usize {
    64 * 1024 * 1024
}
