//! One HTTP stream: gather the request facts, decide, redirect or decorate the response.
//!
//! Host calls are kept to what the decision needs: `:path`, `:authority` and the TLS property
//! always; the directly connected peer and `X-Forwarded-Proto` only when the policy trusts some
//! proxy; `:method` only when redirecting; response headers only when something is to be added.
//!
//! The peer is the TCP connection's remote address, which Envoy does not offer a wasm filter as
//! a property: `source.address` is the address the connection manager *derived*, from
//! `X-Forwarded-For` once `xff_num_trusted_hops` is set, so a client could name any address
//! there. The Envoy configuration records the connection's own address in the filter state
//! [`DIRECT_PEER_FILTER_STATE`] (`envoy.filters.network.set_filter_state` with
//! `%DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT%`, see `envoy/edge.yaml`); without it no
//! peer is known and no proxy is trusted.

use std::rc::Rc;
use std::sync::Arc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, LogLevel, MapType};

use crate::policy::{
    DIRECT_PEER_FILTER_STATE, Decision, RequestFacts, ResponsePlan, Site, UpstreamHeaders,
    parse_peer,
};

use super::metrics::Metrics;
use super::{SharedPolicy, log};

pub(crate) struct Stream {
    policy: SharedPolicy,
    metrics: Rc<Metrics>,
    /// What to add to the response, with the site it was planned for.
    plan: Option<(ResponsePlan, Arc<Site>)>,
}

impl Stream {
    pub(crate) fn new(policy: SharedPolicy, metrics: Rc<Metrics>) -> Stream {
        Stream {
            policy,
            metrics,
            plan: None,
        }
    }
}

fn header(map: MapType, name: &str) -> Option<String> {
    match hostcalls::get_map_value_bytes(map, name) {
        Ok(Some(bytes)) => Some(match String::from_utf8(bytes) {
            Ok(text) => text,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        }),
        _ => None,
    }
}

fn property(path: Vec<&str>) -> Option<Vec<u8>> {
    hostcalls::get_property(path).ok().flatten()
}

/// Whether the downstream connection is TLS: Envoy reports a TLS version only for TLS
/// connections.
fn downstream_tls() -> bool {
    property(vec!["connection", "tls_version"]).is_some_and(|v| !v.is_empty())
}

impl Context for Stream {}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let path = header(MapType::HttpRequestHeaders, ":path").unwrap_or_default();
        let authority = header(MapType::HttpRequestHeaders, ":authority").unwrap_or_default();
        let tls = downstream_tls();
        let policy = self.policy.borrow();
        let (peer, forwarded_proto) = if policy.trusts_any_proxy() {
            let peer = property(vec!["filter_state", DIRECT_PEER_FILTER_STATE])
                .and_then(|raw| parse_peer(&String::from_utf8_lossy(&raw)));
            let forwarded = match peer {
                Some(address) if policy.trusts(address) => {
                    header(MapType::HttpRequestHeaders, "x-forwarded-proto")
                }
                _ => None,
            };
            (peer, forwarded)
        } else {
            (None, None)
        };
        let decision = policy.decide(&RequestFacts {
            tls,
            peer,
            authority: &authority,
            path: &path,
            forwarded_proto: forwarded_proto.as_deref(),
        });
        self.metrics.outcome(decision.outcome());
        match decision {
            Decision::Continue { plan, .. } => {
                if plan.hsts || plan.mixed_content_on() {
                    self.plan = plan
                        .site
                        .and_then(|site| policy.shared_site(site))
                        .map(|site| (plan, site));
                }
                Action::Continue
            }
            Decision::Redirect { redirect, .. } => {
                let method = header(MapType::HttpRequestHeaders, ":method").unwrap_or_default();
                let status = redirect.status(&method);
                if let Err(status_code) =
                    hostcalls::send_http_response(u32::from(status), redirect.headers(), None)
                {
                    log(
                        LogLevel::Error,
                        &format!("could not send the redirect: {status_code:?}"),
                    );
                    return Action::Continue;
                }
                Action::Pause
            }
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some((plan, site)) = self.plan.take() else {
            return Action::Continue;
        };
        let hsts_present = plan.hsts
            && header(MapType::HttpResponseHeaders, "strict-transport-security").is_some();
        let csp = if plan.mixed_content_on() {
            header(MapType::HttpResponseHeaders, "content-security-policy")
        } else {
            None
        };
        let add = site.response_headers(
            &plan,
            &UpstreamHeaders {
                hsts_present,
                csp: csp.as_deref(),
            },
        );
        if let Some(value) = add.hsts
            && hostcalls::add_map_value(
                MapType::HttpResponseHeaders,
                "strict-transport-security",
                value,
            )
            .is_ok()
        {
            self.metrics.hsts_added();
        }
        if let Some((name, value)) = add.csp
            && hostcalls::add_map_value(MapType::HttpResponseHeaders, name, value).is_ok()
        {
            self.metrics.csp_added();
        }
        Action::Continue
    }
}
