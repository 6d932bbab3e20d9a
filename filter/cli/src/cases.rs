//! The cases file a platform writes for `test`: requests, what the upstream answers, and what
//! the client must see. YAML or JSON, unknown fields rejected.
//!
//! ```yaml
//! cases:
//!   - name: shop_http_is_redirected
//!     request: { url: "http://shop.example/cart?id=7", method: GET }
//!     expect: { status: 301, location: "https://shop.example/cart?id=7" }
//!   - name: shop_https_gets_hsts
//!     request: { url: "https://shop.example/" }
//!     upstream: { status: 200, headers: { content-type: text/html } }
//!     expect:
//!       status: 200
//!       headers: { strict-transport-security: "max-age=31536000", location: null }
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context as _, bail};
use serde::Deserialize;

use crate::input::RequestUrl;

/// The address a request comes from when a case names none: a documentation address
/// (RFC 5737), so an ordinary client, never a trusted proxy unless the policy says so.
pub(crate) const DEFAULT_PEER: &str = "192.0.2.10";

/// A cases file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CasesFile {
    /// What the file is for (free text).
    #[serde(default)]
    #[allow(dead_code, reason = "documentation for the file's reader, not used")]
    pub(crate) about: Option<String>,
    /// The cases, run in order.
    pub(crate) cases: Vec<Case>,
}

/// One request and what must come of it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Case {
    /// A name that states the behaviour.
    pub(crate) name: String,
    /// The request.
    pub(crate) request: CaseRequest,
    /// What the upstream answers when the filter lets the request through.
    #[serde(default)]
    pub(crate) upstream: Upstream,
    /// What the client must see.
    pub(crate) expect: Expect,
}

/// A request: `url`, or `scheme` + `host` + `path`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CaseRequest {
    /// `http://host/path?query` or `https://…`.
    #[serde(default)]
    pub(crate) url: Option<String>,
    /// `http` or `https`, when `url` is not used.
    #[serde(default)]
    pub(crate) scheme: Option<String>,
    /// The `Host`, when `url` is not used.
    #[serde(default)]
    pub(crate) host: Option<String>,
    /// The raw path and query, when `url` is not used.
    #[serde(default)]
    pub(crate) path: Option<String>,
    /// The method (default GET).
    #[serde(default = "get")]
    pub(crate) method: String,
    /// More request headers (e.g. `x-forwarded-proto`).
    #[serde(default)]
    pub(crate) headers: BTreeMap<String, String>,
    /// The peer's IP address (default [`DEFAULT_PEER`]).
    #[serde(default)]
    pub(crate) peer: Option<String>,
}

fn get() -> String {
    "GET".into()
}

/// The request as the filter sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ResolvedRequest {
    pub(crate) tls: bool,
    pub(crate) method: String,
    pub(crate) authority: String,
    pub(crate) path: String,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) peer: String,
}

impl CaseRequest {
    /// Checks the request is complete and unambiguous.
    pub(crate) fn resolve(&self) -> anyhow::Result<ResolvedRequest> {
        let (tls, authority, path) = match (&self.url, &self.scheme, &self.host, &self.path) {
            (Some(url), None, None, None) => {
                let parsed = RequestUrl::parse(url)?;
                let Some(tls) = parsed.https else {
                    bail!("url {url:?} needs a scheme: http:// or https://");
                };
                (tls, parsed.authority, parsed.path)
            }
            (None, Some(scheme), Some(host), Some(path)) => {
                let tls = match scheme.as_str() {
                    "https" => true,
                    "http" => false,
                    other => bail!("scheme {other:?} must be http or https"),
                };
                (tls, host.clone(), path.clone())
            }
            _ => bail!("give the request either url, or scheme, host and path (not both)"),
        };
        let peer = self.peer.clone().unwrap_or_else(|| DEFAULT_PEER.into());
        if autohttps_filter::policy::parse_peer(&peer).is_none() {
            bail!("peer {peer:?} is not an IP address");
        }
        Ok(ResolvedRequest {
            tls,
            method: self.method.clone(),
            authority,
            path,
            headers: self
                .headers
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                .collect(),
            peer,
        })
    }
}

/// What the upstream answers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Upstream {
    /// Its status.
    #[serde(default = "ok")]
    pub(crate) status: u16,
    /// Its headers.
    #[serde(default)]
    pub(crate) headers: BTreeMap<String, String>,
}

fn ok() -> u16 {
    200
}

impl Default for Upstream {
    fn default() -> Self {
        Upstream {
            status: ok(),
            headers: BTreeMap::new(),
        }
    }
}

/// Expected values of one header: one value, several, or absent (`null` / `[]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum ExpectedValues {
    /// Exactly this one value.
    One(String),
    /// Exactly these values, in any order; none means the header is absent.
    Many(Vec<String>),
    /// The header is absent.
    Absent(()),
}

impl ExpectedValues {
    /// The values, sorted.
    pub(crate) fn sorted(&self) -> Vec<String> {
        let mut values = match self {
            ExpectedValues::One(value) => vec![value.clone()],
            ExpectedValues::Many(values) => values.clone(),
            ExpectedValues::Absent(()) => Vec::new(),
        };
        values.sort();
        values
    }
}

/// What the client must see. Only the headers named are checked.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Expect {
    /// The status.
    pub(crate) status: u16,
    /// The `Location` (shorthand for `headers.location`).
    #[serde(default)]
    pub(crate) location: Option<String>,
    /// Response headers that must have exactly these values (`null` or `[]`: absent).
    #[serde(default)]
    pub(crate) headers: BTreeMap<String, ExpectedValues>,
}

impl Expect {
    /// Every header to check, names lower-cased, values sorted.
    pub(crate) fn checked_headers(&self) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
        let mut checked: BTreeMap<String, Vec<String>> = self
            .headers
            .iter()
            .map(|(name, values)| (name.to_ascii_lowercase(), values.sorted()))
            .collect();
        if let Some(location) = &self.location {
            if checked.contains_key("location") {
                bail!("location is given twice (expect.location and expect.headers.location)");
            }
            checked.insert("location".into(), vec![location.clone()]);
        }
        Ok(checked)
    }
}

impl CasesFile {
    /// Reads a cases file: YAML for `.yaml`/`.yml`, JSON otherwise. Every case is checked
    /// before any runs, so a typo is an input error, not a failing case.
    pub(crate) fn read(path: &Path) -> anyhow::Result<CasesFile> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the cases file {}", path.display()))?;
        let yaml = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"));
        let file: CasesFile = if yaml {
            serde_norway::from_str(&text)
                .with_context(|| format!("{} is not a valid cases file", path.display()))?
        } else {
            serde_json::from_str(&text)
                .with_context(|| format!("{} is not a valid cases file", path.display()))?
        };
        if file.cases.is_empty() {
            bail!("{} has no cases", path.display());
        }
        for (i, case) in file.cases.iter().enumerate() {
            let at = || format!("{}: cases[{i}] ({:?})", path.display(), case.name);
            case.request.resolve().with_context(at)?;
            case.expect.checked_headers().with_context(at)?;
        }
        Ok(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_and_json_read_the_same_case() {
        let yaml: CasesFile = serde_norway::from_str(
            "cases:\n  - name: a\n    request: { url: \"http://a.test/x\" }\n    expect: { status: 301, location: \"https://a.test/x\", headers: { strict-transport-security: null } }\n",
        )
        .expect("yaml");
        let json: CasesFile = serde_json::from_str(
            r#"{"cases": [{"name": "a", "request": {"url": "http://a.test/x"},
                "expect": {"status": 301, "location": "https://a.test/x", "headers": {"strict-transport-security": []}}}]}"#,
        )
        .expect("json");
        for file in [yaml, json] {
            let case = &file.cases[0];
            let request = case.request.resolve().expect("request");
            assert!(!request.tls);
            assert_eq!(request.peer, DEFAULT_PEER);
            let headers = case.expect.checked_headers().expect("headers");
            assert_eq!(headers["location"], vec!["https://a.test/x".to_string()]);
            assert!(headers["strict-transport-security"].is_empty());
        }
    }

    #[test]
    fn a_request_needs_url_or_scheme_host_path() {
        let both: CaseRequest =
            serde_json::from_str(r#"{"url": "http://a.test/", "host": "a.test"}"#).expect("json");
        assert!(both.resolve().is_err());
        let bad_scheme: CaseRequest =
            serde_json::from_str(r#"{"scheme": "ftp", "host": "a.test", "path": "/"}"#)
                .expect("json");
        assert!(bad_scheme.resolve().is_err());
        let bad_peer: CaseRequest =
            serde_json::from_str(r#"{"url": "http://a.test/", "peer": "nowhere"}"#).expect("json");
        assert!(bad_peer.resolve().is_err());
    }
}
