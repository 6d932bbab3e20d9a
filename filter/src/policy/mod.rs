//! The pure policy engine: the schema, its validation, host matching and the redirect/header
//! decision. Nothing here knows about proxy-wasm, so the same code runs in Envoy, in the
//! wasmtime harness and natively in tests.

mod cidr;
pub mod compact;
mod compile;
mod decide;
mod explain;
mod host;
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
pub use host::{PolicyName, normalise_authority, parse_policy_name, validate_hostname};
#[cfg(feature = "plugin")]
pub(crate) use schema::DeltaEntries;
pub use schema::{
    DEFAULT_REPORT_URI, FeedConfig, HstsSpec, HttpsMode, MixedContent, PluginConfig, PolicyDelta,
    PolicyDocument, RedirectKind, SCHEMA_VERSION, Settings, SiteSpec,
};
pub use stream::CompiledPluginConfig;
pub use url::{RequestUrl, RequestUrlError};
pub use version::version_is_older;

#[cfg(test)]
mod tests;
