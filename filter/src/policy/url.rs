//! A request URL as an operator types it (`http://host[:port]/path?query`), split as the filter
//! sees a request: the connection's scheme, the `:authority`, and the raw `:path` with its query.
//! The policy tool's `test`/`explain` and the console's preview both read URLs this way.

use std::fmt;

/// A request URL split as the filter sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestUrl {
    /// `Some(true)` for `https://`, `Some(false)` for `http://`, `None` when no scheme was given.
    pub https: Option<bool>,
    /// The authority, as written (host and optional port).
    pub authority: String,
    /// The raw path with its query, byte for byte; `/` when absent.
    pub path: String,
}

/// Why a URL is not a request the edge serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestUrlError {
    /// A scheme other than `http://` or `https://`.
    NotHttp(String),
    /// No host before the path.
    NoHost(String),
}

impl fmt::Display for RequestUrlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestUrlError::NotHttp(url) => write!(
                f,
                "{url:?}: only http:// and https:// URLs are requests the edge serves"
            ),
            RequestUrlError::NoHost(url) => {
                write!(f, "{url:?} has no host: write it as http://HOST/PATH")
            }
        }
    }
}

impl std::error::Error for RequestUrlError {}

impl RequestUrl {
    /// Parses `http://host[:port]/path?query`, `https://…` or `host/path` (no scheme).
    pub fn parse(url: &str) -> Result<RequestUrl, RequestUrlError> {
        let (https, rest) = if let Some(rest) = strip_prefix_ignore_case(url, "https://") {
            (Some(true), rest)
        } else if let Some(rest) = strip_prefix_ignore_case(url, "http://") {
            (Some(false), rest)
        } else if url.contains("://") {
            return Err(RequestUrlError::NotHttp(url.to_owned()));
        } else {
            (None, url)
        };
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(split);
        if authority.is_empty() {
            return Err(RequestUrlError::NoHost(url.to_owned()));
        }
        let path = match path {
            "" => "/".to_owned(),
            p if p.starts_with('?') => format!("/{p}"),
            p => p.to_owned(),
        };
        Ok(RequestUrl {
            https,
            authority: authority.to_owned(),
            path,
        })
    }
}

fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &text[prefix.len()..])
}
