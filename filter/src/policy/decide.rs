//! The decision function: request facts and a policy in, a decision out. No I/O.

use std::fmt::Write as _;
use std::net::IpAddr;

use super::compile::{Policy, Site};
use super::host::normalise_authority;
use super::schema::{HttpsMode, MixedContent, RedirectKind};

/// Requests under this prefix are never redirected: the CA must reach HTTP-01 tokens over the
/// scheme and host it asked for (RFC 8555 §8.3).
pub const ACME_CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

/// The facts about a request that a decision depends on.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    /// Whether the downstream connection is TLS.
    pub tls: bool,
    /// The directly connected peer (the TCP connection's remote address), when known. Never an
    /// address derived from a header the client sends (`X-Forwarded-For`, `Forwarded`): trust
    /// in `forwarded_proto` is decided on this address alone.
    pub peer: Option<IpAddr>,
    /// `:authority` (or `Host`).
    pub authority: &'a str,
    /// `:path`, raw, with its query.
    pub path: &'a str,
    /// `X-Forwarded-Proto`, believed only when `peer` is a trusted proxy. `Forwarded`
    /// (RFC 7239) is never consulted, from any peer.
    pub forwarded_proto: Option<&'a str>,
}

/// Why a decision came out as it did; each maps to a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// HTTP redirected to HTTPS (force).
    RedirectToHttps,
    /// HTTPS redirected to HTTP (disable).
    RedirectToHttp,
    /// Redirected to the site's canonical host, scheme unchanged.
    RedirectToCanonical,
    /// Force mode, but the target name has no certificate yet: served over HTTP.
    ForceSkippedNoCert,
    /// The host is not in the policy: passed untouched.
    UnknownHost,
    /// An ACME HTTP-01 challenge: passed untouched.
    AcmeChallenge,
    /// A known site, served as it came.
    Pass,
}

/// What the response of a passed request gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponsePlan {
    /// The site, when the host is known.
    pub site: Option<u32>,
    /// Add HSTS (if the upstream sent none).
    pub hsts: bool,
    /// Mixed-content header to add.
    pub mixed_content: MixedContent,
}

impl ResponsePlan {
    /// Whether a mixed-content header is planned.
    pub fn mixed_content_on(&self) -> bool {
        self.mixed_content != MixedContent::Off
    }

    const NOTHING: ResponsePlan = ResponsePlan {
        site: None,
        hsts: false,
        mixed_content: MixedContent::Off,
    };
}

/// A redirect the filter answers itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    /// Permanent (301/308) or temporary (302/307).
    pub kind: RedirectKind,
    /// The absolute `Location`: always a name of the site, never a control byte.
    pub location: String,
    /// Add `Strict-Transport-Security: max-age=0` (disable mode clears earlier pins).
    pub clear_hsts: bool,
}

impl Redirect {
    /// The status for a request method: 301/302 for GET and HEAD, which browsers may turn into
    /// a GET anyway; 308/307 for the rest, which must keep their method and body.
    ///
    /// The method is asked for separately so that the glue reads it only when redirecting.
    pub fn status(&self, method: &str) -> u16 {
        let safe_method = matches!(method, "GET" | "HEAD");
        match (self.kind, safe_method) {
            (RedirectKind::Permanent, true) => 301,
            (RedirectKind::Permanent, false) => 308,
            (RedirectKind::Temporary, true) => 302,
            (RedirectKind::Temporary, false) => 307,
        }
    }

    /// The response headers to send with the redirect.
    pub fn headers(&self) -> Vec<(&'static str, &str)> {
        let mut headers = vec![("location", self.location.as_str())];
        if self.clear_hsts {
            headers.push(("strict-transport-security", "max-age=0"));
        }
        headers
    }
}

/// A decision for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Let the request through; decorate its response per the plan.
    Continue {
        /// Why.
        outcome: Outcome,
        /// What the response gets.
        plan: ResponsePlan,
    },
    /// Answer with a redirect.
    Redirect {
        /// Why.
        outcome: Outcome,
        /// The redirect.
        redirect: Redirect,
    },
}

impl Decision {
    /// Why this decision was made.
    pub fn outcome(&self) -> Outcome {
        match self {
            Decision::Continue { outcome, .. } | Decision::Redirect { outcome, .. } => *outcome,
        }
    }
}

/// What the upstream's response already carries.
#[derive(Debug, Clone, Copy, Default)]
pub struct UpstreamHeaders<'a> {
    /// The upstream sent `Strict-Transport-Security`.
    pub hsts_present: bool,
    /// The upstream's `Content-Security-Policy` values, joined with `,` when several.
    pub csp: Option<&'a str>,
}

/// Headers to add to a response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResponseHeaders<'p> {
    /// `Strict-Transport-Security` value.
    pub hsts: Option<&'p str>,
    /// A CSP header name and value, added beside (never replacing) the upstream's own.
    pub csp: Option<(&'static str, &'p str)>,
}

const UPGRADE: &str = "upgrade-insecure-requests";

impl Policy {
    /// Decides what to do with a request.
    pub fn decide(&self, request: &RequestFacts<'_>) -> Decision {
        let pass = |outcome| Decision::Continue {
            outcome,
            plan: ResponsePlan::NOTHING,
        };
        if request.path.starts_with(ACME_CHALLENGE_PREFIX) {
            return pass(Outcome::AcmeChallenge);
        }
        let Some(host) = normalise_authority(request.authority) else {
            return pass(Outcome::UnknownHost);
        };
        let Some((site_index, host_ready)) = self.lookup(&host) else {
            return pass(Outcome::UnknownHost);
        };
        let Some(site) = self.site(site_index) else {
            return pass(Outcome::UnknownHost);
        };
        let https = self.effective_https(request);
        let canonical = site.canonical_host.as_deref().filter(|c| *c != host);

        // Where the request should be: the scheme the mode asks for, on the canonical name.
        let mut want_https = match site.https {
            HttpsMode::Auto => https,
            HttpsMode::Force => true,
            HttpsMode::Disable => false,
        };
        let mut target = canonical.unwrap_or(&host);
        let mut outcome = Outcome::Pass;
        if want_https {
            let target_ready = match canonical {
                Some(c) => self.cert_ready(site_index, c),
                None => host_ready,
            };
            if !target_ready {
                if https {
                    // Already on HTTPS: never send a visitor to a name without a certificate.
                    target = &host;
                } else {
                    want_https = false;
                    outcome = Outcome::ForceSkippedNoCert;
                }
            }
        }

        if want_https == https && target == host {
            let plan = if https && site.https != HttpsMode::Disable {
                ResponsePlan {
                    site: Some(site_index),
                    hsts: site.hsts.is_some(),
                    mixed_content: site.mixed_content,
                }
            } else {
                ResponsePlan::NOTHING
            };
            return Decision::Continue { outcome, plan };
        }

        let outcome = match (https, want_https) {
            (false, true) => Outcome::RedirectToHttps,
            (true, false) => Outcome::RedirectToHttp,
            _ => Outcome::RedirectToCanonical,
        };
        let location = self.location(want_https, target, request.path);
        Decision::Redirect {
            outcome,
            redirect: Redirect {
                kind: site.redirect,
                location,
                clear_hsts: site.https == HttpsMode::Disable && https,
            },
        }
    }

    /// Whether any proxy is trusted; when none is, the glue need not read the peer address or
    /// `X-Forwarded-Proto` at all.
    pub fn trusts_any_proxy(&self) -> bool {
        !self.trusted_proxies.is_empty()
    }

    /// Whether `X-Forwarded-Proto` from this peer is believed.
    pub fn trusts(&self, peer: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|c| c.contains(peer))
    }

    /// The headers to add to a passed request's response.
    pub fn response_headers(
        &self,
        plan: &ResponsePlan,
        upstream: &UpstreamHeaders<'_>,
    ) -> ResponseHeaders<'_> {
        match plan.site.and_then(|s| self.site(s)) {
            Some(site) => site.response_headers(plan, upstream),
            None => ResponseHeaders::default(),
        }
    }

    /// The scheme the client used: the connection's, or `X-Forwarded-Proto` from a trusted
    /// proxy.
    fn effective_https(&self, request: &RequestFacts<'_>) -> bool {
        let trusted = request.peer.is_some_and(|peer| self.trusts(peer));
        if trusted && let Some(proto) = request.forwarded_proto {
            // The first entry is the hop nearest the client.
            let first = proto.split(',').next().unwrap_or("").trim();
            if first.eq_ignore_ascii_case("https") {
                return true;
            }
            if first.eq_ignore_ascii_case("http") {
                return false;
            }
        }
        request.tls
    }

    /// `scheme://host[:port]path`. The host is a validated policy name; the path is kept byte
    /// for byte except for bytes that cannot appear in a header, which are percent-encoded.
    fn location(&self, https: bool, host: &str, path: &str) -> String {
        let (scheme, port, default_port) = if https {
            ("https", self.https_port, 443)
        } else {
            ("http", self.http_port, 80)
        };
        let mut location = String::with_capacity(scheme.len() + host.len() + path.len() + 10);
        location.push_str(scheme);
        location.push_str("://");
        location.push_str(host);
        if port != default_port {
            let _ = write!(location, ":{port}");
        }
        // Origin-form only: anything else (asterisk-form, a stray absolute URL) goes to "/".
        if !path.starts_with('/') {
            location.push('/');
            return location;
        }
        for &byte in path.as_bytes() {
            if byte <= b' ' || byte >= 0x7f {
                let _ = write!(location, "%{byte:02X}");
            } else {
                location.push(char::from(byte));
            }
        }
        location
    }
}

impl Site {
    /// The headers to add to a passed request's response, for the site the plan was made for
    /// (a stream keeps its site, so a policy update between request and response cannot make
    /// it add another site's headers).
    pub fn response_headers(
        &self,
        plan: &ResponsePlan,
        upstream: &UpstreamHeaders<'_>,
    ) -> ResponseHeaders<'_> {
        let hsts = if plan.hsts && !upstream.hsts_present {
            self.hsts.as_deref()
        } else {
            None
        };
        let csp = match plan.mixed_content {
            MixedContent::Off => None,
            MixedContent::Upgrade => {
                let already = upstream.csp.is_some_and(|csp| {
                    csp.split([';', ','])
                        .any(|d| d.trim().eq_ignore_ascii_case(UPGRADE))
                });
                (!already).then_some(("content-security-policy", UPGRADE))
            }
            MixedContent::Report => self
                .report_only_csp
                .as_deref()
                .map(|value| ("content-security-policy-report-only", value)),
        };
        ResponseHeaders { hsts, csp }
    }
}
