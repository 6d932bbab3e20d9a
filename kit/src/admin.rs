//! A client of the sidecar's admin API for harnesses (curl underneath, like a user's script):
//! one request, its status and body.

use anyhow::Context as _;

use crate::http::curl;

/// The admin API at `base` (e.g. `http://127.0.0.1:8081`), called with a bearer token.
#[derive(Debug, Clone)]
pub struct AdminClient {
    /// Base URL, no trailing slash.
    pub base: String,
    token: String,
}

impl AdminClient {
    /// A client of `base` sending `token`.
    pub fn new(base: &str, token: &str) -> AdminClient {
        AdminClient {
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
        }
    }

    /// Sends `method path` with this client's token (or `token` instead: `Some(other)`, or
    /// no `Authorization` at all: `None`) and `body` as JSON: (status, body text).
    pub fn call_raw(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
        token: Option<&str>,
    ) -> anyhow::Result<(u16, String)> {
        let url = format!("{}{path}", self.base);
        let auth = token.map(|t| format!("Authorization: Bearer {t}"));
        let body_text = body.map(|b| b.to_string());
        let mut args = vec!["-X", method];
        if let Some(auth) = &auth {
            args.extend(["-H", auth.as_str()]);
        }
        if let Some(text) = &body_text {
            args.extend([
                "-H",
                "content-type: application/json",
                "--data",
                text.as_str(),
            ]);
        }
        args.push(&url);
        let response = curl(&args).with_context(|| format!("admin API {method} {path}"))?;
        Ok((response.status, response.body))
    }

    /// Sends `method path` with the token: (status, JSON body; `Null` when empty, a JSON
    /// string holding the text when it is not JSON).
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        self.call_with_token(method, path, body, Some(&self.token))
    }

    /// [`AdminClient::call`] with another token, or none.
    pub fn call_with_token(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
        token: Option<&str>,
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        let (status, text) = self.call_raw(method, path, body, token)?;
        Ok((status, json_or_text(text)))
    }
}

/// A body as JSON: `Null` when empty, a JSON string holding the text when it is not JSON.
pub fn json_or_text(text: String) -> serde_json::Value {
    if text.trim().is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))
    }
}

/// The names a `GET /v1/sites/{site}/certificates` answer's current certificates cover,
/// sorted, each once.
pub fn covered_names(certificates: &serde_json::Value) -> Vec<String> {
    let mut names: Vec<String> = certificates["certificates"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["names"].as_array().cloned().unwrap_or_default())
        .filter_map(|n| n.as_str().map(str::to_owned))
        .collect();
    names.sort();
    names.dedup();
    names
}
