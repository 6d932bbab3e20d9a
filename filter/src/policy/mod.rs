//! The pure policy engine: the schema, its validation, host matching and the redirect/header
//! decision. Nothing here knows about proxy-wasm, so the same code runs in Envoy, in the
//! wasmtime harness and natively in tests.

mod cidr;
pub mod compact;
mod compile;
mod decide;
mod explain;
pub mod host;
mod schema;
mod stream;
mod url;
mod version;

pub use cidr::{Cidr, DIRECT_PEER_FILTER_STATE, parse_peer};
pub use compact::SnapshotBuild;
pub use compile::{DeltaReport, Policy, Problem, Site};
pub use decide::{
    ACME_CHALLENGE_PREFIX, Decision, Outcome, Redirect, RequestFacts, ResponseHeaders,
    ResponsePlan, UpstreamHeaders,
};
pub use explain::{Explanation, HostMatch, SchemeSource};
pub use host::{
    PolicyName, fold_hostname, normalise_authority, parse_policy_name, san_covers, sans_cover,
    validate_hostname, wildcard_name, wildcard_parent,
};
#[cfg(feature = "plugin")]
pub(crate) use schema::DeltaEntries;
pub use schema::{
    DEFAULT_HSTS_MAX_AGE, DEFAULT_REPORT_URI, FeedConfig, HSTS_PRELOAD_MIN_MAX_AGE, HstsSpec,
    HttpsMode, MixedContent, PluginConfig, PolicyDelta, PolicyDocument, RedirectKind,
    SCHEMA_VERSION, Settings, SiteSpec,
};
pub use stream::CompiledPluginConfig;
pub use url::{RequestUrl, RequestUrlError};
pub use version::{content_hash, version_is_older};

#[cfg(test)]
mod tests;
