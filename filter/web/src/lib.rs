//! The filter's policy engine compiled for the browser with wasm-bindgen: the operator console
//! previews a request and validates a policy with the very code Envoy runs
//! (`autohttps_filter::policy`), never a JavaScript re-implementation.
//!
//! Both functions take and return JSON text, so the page needs no generated type glue beyond
//! strings:
//!
//! - [`validate`]`(policy_json)` → `[{"path": "sites[0].canonical_host", "message": "..."}]`
//!   (empty when the policy is valid);
//! - [`preview`]`(policy_json, request_json)` → `{"status", "location", "hsts", "csp",
//!   "csp_report_only", "outcome", "explanation"}`, or `{"problems": [...]}` when the policy is
//!   invalid, or `{"error": "..."}` when the request is not one the edge could receive.
#![warn(missing_docs)]

use std::net::IpAddr;

use autohttps_filter::policy::{
    Decision, Outcome, Policy, Problem, RequestFacts, UpstreamHeaders, parse_peer,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use wasm_bindgen::prelude::wasm_bindgen;

/// A request to preview, as the console sends it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreviewRequest {
    /// `http://HOST[:PORT]/PATH?QUERY` or `https://…`: the scheme is the downstream connection's.
    pub url: String,
    /// The method; `GET` when absent.
    #[serde(default)]
    pub method: Option<String>,
    /// The TCP peer Envoy would see (an address, optionally with a port). Only a peer inside
    /// `settings.trusted_proxies` has its `X-Forwarded-Proto` believed.
    #[serde(default)]
    pub peer: Option<String>,
    /// `X-Forwarded-Proto` as a proxy would send it.
    #[serde(default)]
    pub forwarded_proto: Option<String>,
    /// The upstream's own `Strict-Transport-Security`, when it sends one.
    #[serde(default)]
    pub upstream_hsts: Option<String>,
    /// The upstream's own `Content-Security-Policy`, when it sends one.
    #[serde(default)]
    pub upstream_csp: Option<String>,
}

/// What a client would see from the edge for a previewed request.
#[derive(Debug, Default, PartialEq, Eq, Serialize)]
pub struct Preview {
    /// The status of the filter's own reply (a redirect); `None` when the request passes to
    /// the upstream, which then answers with its own status.
    pub status: Option<u16>,
    /// `Location` of a redirect.
    pub location: Option<String>,
    /// Every `Strict-Transport-Security` value on the response (the upstream's own included).
    pub hsts: Vec<String>,
    /// Every `Content-Security-Policy` value (the upstream's own included).
    pub csp: Vec<String>,
    /// Every `Content-Security-Policy-Report-Only` value.
    pub csp_report_only: Vec<String>,
    /// Why, as a word: `redirect-to-https`, `pass`, `unknown-host`, ...
    pub outcome: &'static str,
    /// The engine's reasons, one sentence each ([`autohttps_filter::policy::Explanation`]).
    pub explanation: Vec<String>,
}

/// Every problem the filter would report for `policy_json`, each with its JSON path, as a JSON
/// array (empty when the filter would accept the policy).
#[wasm_bindgen]
pub fn validate(policy_json: &str) -> String {
    let problems = match Policy::from_json(policy_json.as_bytes()) {
        Ok(_) => Vec::new(),
        Err(error) => error.problems().to_vec(),
    };
    problems_json(&problems).to_string()
}

/// What the edge does with a request under `policy_json` (see the module documentation for the
/// shapes in and out).
#[wasm_bindgen]
pub fn preview(policy_json: &str, request_json: &str) -> String {
    let policy = match Policy::from_json(policy_json.as_bytes()) {
        Ok(policy) => policy,
        Err(error) => return json!({ "problems": problems_json(error.problems()) }).to_string(),
    };
    let request: PreviewRequest = match serde_json::from_str(request_json) {
        Ok(request) => request,
        Err(error) => {
            return json!({ "error": format!("the preview request is not acceptable: {error}") })
                .to_string();
        }
    };
    match preview_request(&policy, &request) {
        Ok(preview) => serde_json::to_string(&preview).unwrap_or_else(|error| {
            json!({ "error": format!("cannot encode the preview: {error}") }).to_string()
        }),
        Err(message) => json!({ "error": message }).to_string(),
    }
}

fn problems_json(problems: &[Problem]) -> serde_json::Value {
    problems
        .iter()
        .map(|p| json!({ "path": p.path, "message": p.message }))
        .collect()
}

/// The preview of one request under a compiled policy: the decision, then the response headers
/// the filter adds (beside the upstream's own) when the request passes.
pub fn preview_request(policy: &Policy, request: &PreviewRequest) -> Result<Preview, String> {
    let url = RequestUrl::parse(&request.url)?;
    let peer: Option<IpAddr> = match request.peer.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(raw) => Some(parse_peer(raw).ok_or_else(|| {
            format!("peer {raw:?} is not an IP address (write it as 127.0.0.5 or [::1]:1234)")
        })?),
    };
    let forwarded_proto = request
        .forwarded_proto
        .as_deref()
        .map(str::trim)
        .filter(|p| !p.is_empty());
    let facts = RequestFacts {
        tls: url.https,
        peer,
        authority: &url.authority,
        path: &url.path,
        forwarded_proto,
    };
    let method = request.method.as_deref().unwrap_or("GET");
    let explanation = policy.explain(&facts);
    let mut preview = Preview {
        outcome: outcome_name(explanation.decision.outcome()),
        explanation: explanation.reasons(),
        ..Preview::default()
    };
    match &explanation.decision {
        Decision::Redirect { redirect, .. } => {
            preview.status = Some(redirect.status(method));
            for (name, value) in redirect.headers() {
                match name {
                    "location" => preview.location = Some(value.to_owned()),
                    "strict-transport-security" => preview.hsts.push(value.to_owned()),
                    _ => {}
                }
            }
        }
        Decision::Continue { plan, .. } => {
            let upstream_hsts = request.upstream_hsts.as_deref().filter(|v| !v.is_empty());
            let upstream_csp = request.upstream_csp.as_deref().filter(|v| !v.is_empty());
            preview.hsts.extend(upstream_hsts.map(str::to_owned));
            preview.csp.extend(upstream_csp.map(str::to_owned));
            let added = policy.response_headers(
                plan,
                &UpstreamHeaders {
                    hsts_present: upstream_hsts.is_some(),
                    csp: upstream_csp,
                },
            );
            preview.hsts.extend(added.hsts.map(str::to_owned));
            match added.csp {
                Some(("content-security-policy", value)) => preview.csp.push(value.to_owned()),
                Some((_, value)) => preview.csp_report_only.push(value.to_owned()),
                None => {}
            }
        }
    }
    preview.hsts.sort();
    preview.csp.sort();
    preview.csp_report_only.sort();
    Ok(preview)
}

fn outcome_name(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::RedirectToHttps => "redirect-to-https",
        Outcome::RedirectToHttp => "redirect-to-http",
        Outcome::RedirectToCanonical => "redirect-to-canonical",
        Outcome::ForceSkippedNoCert => "force-skipped-no-certificate",
        Outcome::UnknownHost => "unknown-host",
        Outcome::AcmeChallenge => "acme-challenge",
        Outcome::Pass => "pass",
    }
}

/// A request URL split as the filter sees it: the connection's scheme, the authority, and the
/// raw path with its query, byte for byte. The preview needs the scheme, which the engine's
/// reader leaves optional.
#[derive(Debug, PartialEq, Eq)]
struct RequestUrl {
    https: bool,
    authority: String,
    path: String,
}

impl RequestUrl {
    fn parse(url: &str) -> Result<RequestUrl, String> {
        let url = url.trim();
        let not_http = || {
            format!("{url:?} is not an http:// or https:// URL: write it as http://HOST/PATH?QUERY")
        };
        match autohttps_filter::policy::RequestUrl::parse(url) {
            Ok(autohttps_filter::policy::RequestUrl {
                https: Some(https),
                authority,
                path,
            }) => Ok(RequestUrl {
                https,
                authority,
                path,
            }),
            Ok(_) | Err(autohttps_filter::policy::RequestUrlError::NotHttp(_)) => Err(not_http()),
            Err(error) => Err(error.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"{"schema": 1, "version": "t",
        "settings": {"trusted_proxies": ["127.0.0.5/32"]},
        "sites": [
          {"id": "shop", "hostnames": ["shop.test"], "https": "force",
           "hsts": {"enabled": true, "max_age": 60}, "mixed_content": "upgrade",
           "cert_ready": ["shop.test"]},
          {"id": "off", "hostnames": ["off.test"], "https": "disable", "cert_ready": ["off.test"]}
        ]}"#;

    fn run(request: serde_json::Value) -> serde_json::Value {
        serde_json::from_str(&preview(POLICY, &request.to_string())).unwrap()
    }

    #[test]
    fn force_redirects_keeping_path_and_query() {
        let out = run(json!({"url": "http://shop.test/cart?item=1&x=%41"}));
        assert_eq!(out["status"], 301);
        assert_eq!(out["location"], "https://shop.test/cart?item=1&x=%41");
        assert_eq!(out["outcome"], "redirect-to-https");
        assert!(!out["explanation"].as_array().unwrap().is_empty());
    }

    #[test]
    fn post_gets_308() {
        assert_eq!(
            run(json!({"url": "http://shop.test/", "method": "POST"}))["status"],
            308
        );
    }

    #[test]
    fn https_pass_adds_hsts_and_upgrade_beside_the_upstream_csp() {
        let out = run(json!({"url": "https://shop.test/", "upstream_csp": "default-src 'self'"}));
        assert_eq!(out["status"], serde_json::Value::Null);
        assert_eq!(out["hsts"], json!(["max-age=60"]));
        assert_eq!(
            out["csp"],
            json!(["default-src 'self'", "upgrade-insecure-requests"])
        );
    }

    #[test]
    fn upstream_hsts_is_kept_not_doubled() {
        let out = run(json!({"url": "https://shop.test/", "upstream_hsts": "max-age=5"}));
        assert_eq!(out["hsts"], json!(["max-age=5"]));
    }

    #[test]
    fn disable_clears_the_pin() {
        let out = run(json!({"url": "https://off.test/a"}));
        assert_eq!(out["status"], 301);
        assert_eq!(out["location"], "http://off.test/a");
        assert_eq!(out["hsts"], json!(["max-age=0"]));
    }

    #[test]
    fn forwarded_proto_is_believed_only_from_a_trusted_peer() {
        let trusted = run(
            json!({"url": "http://shop.test/", "peer": "127.0.0.5", "forwarded_proto": "https"}),
        );
        assert_eq!(trusted["status"], serde_json::Value::Null);
        let untrusted = run(
            json!({"url": "http://shop.test/", "peer": "127.0.0.6", "forwarded_proto": "https"}),
        );
        assert_eq!(untrusted["status"], 301);
    }

    #[test]
    fn invalid_policy_lists_problems_with_paths() {
        let bad = r#"{"schema": 1, "version": "t", "sites": [
            {"id": "a", "hostnames": ["a.test"], "canonical_host": "b.test"}]}"#;
        let problems: serde_json::Value = serde_json::from_str(&validate(bad)).unwrap();
        assert_eq!(problems[0]["path"], "sites[0].canonical_host");
        let out: serde_json::Value =
            serde_json::from_str(&preview(bad, r#"{"url": "http://a.test/"}"#)).unwrap();
        assert_eq!(out["problems"], problems);
        assert_eq!(validate(POLICY), "[]");
    }

    #[test]
    fn bad_request_input_says_how_to_write_it() {
        let out = run(json!({"url": "ftp://shop.test/"}));
        assert!(out["error"].as_str().unwrap().contains("http://HOST"));
        let out = run(json!({"url": "http://shop.test/", "peer": "proxy"}));
        assert!(out["error"].as_str().unwrap().contains("not an IP address"));
    }
}
