//! Why a decision came out as it did: the facts [`Policy::decide`] went through (which name
//! matched which site, whether a certificate is served, which scheme was believed), for
//! people and tools that ask "what will the edge do with this URL, and why". Pure, like the
//! decision itself, and built from the same lookups so it cannot disagree with it.

use super::compile::Policy;
use super::decide::{ACME_CHALLENGE_PREFIX, Decision, Outcome, RequestFacts, UpstreamHeaders};
use super::host::{normalise_authority, wildcard_parent};
use super::schema::{HttpsMode, RedirectKind};

/// How the request's host matched the policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    /// The `Host` could not be read as a hostname (empty, an IP literal, a bad byte…).
    Unreadable,
    /// No site lists this name or a wildcard covering it.
    Unknown {
        /// The normalised host that was looked up.
        host: String,
    },
    /// A site lists the name itself.
    Exact {
        /// The normalised host.
        host: String,
    },
    /// A site lists `*.parent`, which covers the name.
    Wildcard {
        /// The normalised host.
        host: String,
        /// The policy name that matched, `*.parent`.
        pattern: String,
    },
}

/// Which scheme the decision took the request to have arrived on, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchemeSource {
    /// The downstream connection itself (TLS or not).
    Connection,
    /// `X-Forwarded-Proto` from a peer inside `settings.trusted_proxies`.
    TrustedForwardedProto,
    /// `X-Forwarded-Proto` was sent, but the peer is not a trusted proxy: ignored.
    UntrustedForwardedProtoIgnored,
}

/// The explanation of one decision: the decision plus the facts behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// The decision, exactly as [`Policy::decide`] returns it.
    pub decision: Decision,
    /// The path is an ACME HTTP-01 challenge: nothing else was looked at.
    pub acme_challenge: bool,
    /// How the host matched.
    pub host_match: HostMatch,
    /// The matched site's id.
    pub site_id: Option<String>,
    /// The matched site's index in the policy's `sites`.
    pub site_index: Option<u32>,
    /// The site's HTTPS mode.
    pub https_mode: Option<HttpsMode>,
    /// The site's redirect kind.
    pub redirect_kind: Option<RedirectKind>,
    /// The site's canonical host, when it has one.
    pub canonical_host: Option<String>,
    /// Whether a served certificate covers the request's host.
    pub host_cert_ready: bool,
    /// Whether a served certificate covers the canonical host, when there is one.
    pub canonical_cert_ready: Option<bool>,
    /// Whether the decision took the request to be HTTPS.
    pub https: bool,
    /// Why it took that scheme.
    pub scheme_source: SchemeSource,
    /// For a request that passes: headers the filter adds to an upstream response that carries
    /// no HSTS and no CSP of its own, as `(name, value)`.
    pub added_headers: Vec<(String, String)>,
}

impl Policy {
    /// Explains what [`Policy::decide`] does with `request`, and why.
    pub fn explain(&self, request: &RequestFacts<'_>) -> Explanation {
        let decision = self.decide(request);
        let trusted_peer = request.peer.is_some_and(|peer| self.trusts(peer));
        let believed_proto = request
            .forwarded_proto
            .map(|proto| proto.split(',').next().unwrap_or("").trim())
            .filter(|first| {
                first.eq_ignore_ascii_case("https") || first.eq_ignore_ascii_case("http")
            });
        let (https, scheme_source) = match (believed_proto, trusted_peer) {
            (Some(first), true) => (
                first.eq_ignore_ascii_case("https"),
                SchemeSource::TrustedForwardedProto,
            ),
            (_, false) if request.forwarded_proto.is_some() => {
                (request.tls, SchemeSource::UntrustedForwardedProtoIgnored)
            }
            _ => (request.tls, SchemeSource::Connection),
        };
        let mut explanation = Explanation {
            decision,
            acme_challenge: request.path.starts_with(ACME_CHALLENGE_PREFIX),
            host_match: HostMatch::Unreadable,
            site_id: None,
            site_index: None,
            https_mode: None,
            redirect_kind: None,
            canonical_host: None,
            host_cert_ready: false,
            canonical_cert_ready: None,
            https,
            scheme_source,
            added_headers: Vec::new(),
        };
        if let Decision::Continue { plan, .. } = &explanation.decision {
            let added = self.response_headers(plan, &UpstreamHeaders::default());
            if let Some(hsts) = added.hsts {
                explanation
                    .added_headers
                    .push(("strict-transport-security".into(), hsts.into()));
            }
            if let Some((name, value)) = added.csp {
                explanation.added_headers.push((name.into(), value.into()));
            }
        }
        let Some(host) = normalise_authority(request.authority) else {
            return explanation;
        };
        let Some((site_index, host_ready)) = self.lookup(&host) else {
            explanation.host_match = HostMatch::Unknown { host };
            return explanation;
        };
        let exact = self
            .exact_entry(&host)
            .is_some_and(|entry| entry.site == site_index);
        explanation.host_match = match wildcard_parent(&host) {
            Some(parent) if !exact => HostMatch::Wildcard {
                pattern: format!("*.{parent}"),
                host,
            },
            _ => HostMatch::Exact { host },
        };
        explanation.host_cert_ready = host_ready;
        if let Some(site) = self.site(site_index) {
            explanation.site_id = Some(site.id().to_string());
            explanation.site_index = Some(site_index);
            explanation.https_mode = Some(site.https);
            explanation.redirect_kind = Some(site.redirect);
            explanation.canonical_cert_ready = site
                .canonical_host
                .as_deref()
                .map(|canonical| self.cert_ready(site_index, canonical));
            explanation.canonical_host = site.canonical_host.as_deref().map(String::from);
        }
        explanation
    }
}

impl Explanation {
    /// The reasons, one sentence each, in the order the decision weighs them.
    pub fn reasons(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        if self.acme_challenge {
            reasons.push(format!(
                "the path starts with {ACME_CHALLENGE_PREFIX}: ACME HTTP-01 challenges always pass untouched, whatever the site's policy"
            ));
            return reasons;
        }
        reasons.push(match self.scheme_source {
            SchemeSource::Connection => format!(
                "the request arrived over {}",
                if self.https { "HTTPS" } else { "HTTP" }
            ),
            SchemeSource::TrustedForwardedProto => format!(
                "the peer is a trusted proxy (settings.trusted_proxies), so its X-Forwarded-Proto is believed: {}",
                if self.https { "HTTPS" } else { "HTTP" }
            ),
            SchemeSource::UntrustedForwardedProtoIgnored => format!(
                "X-Forwarded-Proto is ignored: the peer is not in settings.trusted_proxies; the connection is {}",
                if self.https { "HTTPS" } else { "HTTP" }
            ),
        });
        match &self.host_match {
            HostMatch::Unreadable => {
                reasons.push("the Host is not a hostname the policy can name (empty, an IP address or a bad byte): passed untouched".into());
                return reasons;
            }
            HostMatch::Unknown { host } => {
                reasons.push(format!(
                    "{host} is in no site's hostnames (nor under a *.wildcard): passed untouched"
                ));
                return reasons;
            }
            HostMatch::Exact { host } => reasons.push(format!(
                "{host} is listed by site {:?} (sites[{}])",
                self.site_id.as_deref().unwrap_or(""),
                self.site_index.unwrap_or(0)
            )),
            HostMatch::Wildcard { host, pattern } => reasons.push(format!(
                "{host} matches {pattern} of site {:?} (sites[{}])",
                self.site_id.as_deref().unwrap_or(""),
                self.site_index.unwrap_or(0)
            )),
        }
        if let Some(mode) = self.https_mode {
            reasons.push(format!(
                "the site's https mode is {} ({})",
                mode.as_str(),
                match mode {
                    HttpsMode::Auto => "HTTP and HTTPS both served",
                    HttpsMode::Force => "HTTP is redirected to HTTPS",
                    HttpsMode::Disable => "HTTPS is redirected to HTTP",
                }
            ));
        }
        reasons.push(format!(
            "a served certificate {} this name (cert_ready)",
            if self.host_cert_ready {
                "covers"
            } else {
                "does not cover"
            }
        ));
        if let (Some(canonical), Some(ready)) = (&self.canonical_host, self.canonical_cert_ready) {
            reasons.push(format!(
                "the site's canonical host is {canonical}, {} a served certificate",
                if ready { "with" } else { "without" }
            ));
        }
        reasons.push(match self.decision.outcome() {
            Outcome::RedirectToHttps => "so it is redirected to HTTPS".into(),
            Outcome::RedirectToHttp => {
                "so it is redirected to HTTP, with Strict-Transport-Security: max-age=0 to clear an earlier pin".into()
            }
            Outcome::RedirectToCanonical => "so it is redirected to the canonical host".into(),
            Outcome::ForceSkippedNoCert => {
                "so it is served over HTTP: force never sends a visitor to a name without a certificate".into()
            }
            Outcome::UnknownHost | Outcome::AcmeChallenge => "so it passes untouched".into(),
            Outcome::Pass => "so it passes to the upstream".into(),
        });
        if let Decision::Redirect { redirect, .. } = &self.decision {
            reasons.push(format!(
                "{} redirect ({} for GET/HEAD, {} otherwise)",
                match redirect.kind {
                    RedirectKind::Permanent => "a permanent",
                    RedirectKind::Temporary => "a temporary",
                },
                redirect.status("GET"),
                redirect.status("POST")
            ));
        }
        for (name, value) in &self.added_headers {
            let why = match name.as_str() {
                "strict-transport-security" => {
                    "the site enables HSTS (added when the upstream sent none)"
                }
                "content-security-policy" => {
                    "mixed_content is upgrade (added beside the upstream's own CSP)"
                }
                _ => "mixed_content is report",
            };
            reasons.push(format!("the response gets {name}: {value} ({why})"));
        }
        reasons
    }

    /// The status of the filter's own reply for `method`, or `None` when the request passes.
    pub fn status(&self, method: &str) -> Option<u16> {
        match &self.decision {
            Decision::Redirect { redirect, .. } => Some(redirect.status(method)),
            Decision::Continue { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"{"schema": 1, "version": "t",
        "settings": {"trusted_proxies": ["10.0.0.0/8"]},
        "sites": [
          {"id": "shop", "hostnames": ["shop.test", "*.shop.test"], "https": "force",
           "canonical_host": "shop.test", "hsts": {"enabled": true, "max_age": 60},
           "cert_ready": ["shop.test"]},
          {"id": "blog", "hostnames": ["blog.test"], "mixed_content": "upgrade", "cert_ready": ["blog.test"]}
        ]}"#;

    fn facts<'a>(tls: bool, authority: &'a str, path: &'a str) -> RequestFacts<'a> {
        RequestFacts {
            tls,
            peer: None,
            authority,
            path,
            forwarded_proto: None,
        }
    }

    #[test]
    fn explains_a_wildcard_match_redirected_to_the_canonical_host() {
        let policy = Policy::from_json(POLICY.as_bytes()).expect("valid policy");
        let request = facts(false, "a.shop.test", "/x");
        let explanation = policy.explain(&request);
        assert_eq!(explanation.decision, policy.decide(&request));
        assert_eq!(
            explanation.host_match,
            HostMatch::Wildcard {
                host: "a.shop.test".into(),
                pattern: "*.shop.test".into()
            }
        );
        assert_eq!(explanation.site_id.as_deref(), Some("shop"));
        assert_eq!(explanation.canonical_cert_ready, Some(true));
        assert_eq!(explanation.status("GET"), Some(301));
        let reasons = explanation.reasons().join("\n");
        assert!(
            reasons.contains("matches *.shop.test of site \"shop\""),
            "{reasons}"
        );
        assert!(reasons.contains("redirected to HTTPS"), "{reasons}");
    }

    #[test]
    fn explains_added_headers_and_an_ignored_forwarded_proto() {
        let policy = Policy::from_json(POLICY.as_bytes()).expect("valid policy");
        let mut request = facts(true, "blog.test", "/");
        request.peer = Some("192.0.2.1".parse().expect("address"));
        request.forwarded_proto = Some("http");
        let explanation = policy.explain(&request);
        assert!(explanation.https);
        assert_eq!(
            explanation.scheme_source,
            SchemeSource::UntrustedForwardedProtoIgnored
        );
        assert_eq!(
            explanation.added_headers,
            vec![(
                "content-security-policy".to_string(),
                "upgrade-insecure-requests".to_string()
            )]
        );
        assert_eq!(explanation.status("GET"), None);
    }

    #[test]
    fn explains_an_unknown_host_and_an_acme_challenge() {
        let policy = Policy::from_json(POLICY.as_bytes()).expect("valid policy");
        let unknown = policy.explain(&facts(false, "other.test", "/"));
        assert_eq!(
            unknown.host_match,
            HostMatch::Unknown {
                host: "other.test".into()
            }
        );
        let challenge = policy.explain(&facts(false, "shop.test", "/.well-known/acme-challenge/t"));
        assert!(challenge.acme_challenge);
        assert_eq!(challenge.status("GET"), None);
        assert!(challenge.reasons()[0].contains("ACME"));
    }
}
