//! Fuzz target: `Policy::decide` on arbitrary request facts against a fixed policy never
//! panics; every redirect goes to `http(s)://<a name of the site>[:port]/…` with no byte
//! ≤ 0x20 or ≥ 0x7f; added response headers carry no control bytes.
#![no_main]

use std::net::IpAddr;

use arbitrary::Arbitrary;
use autohttps_filter::policy::{Decision, Policy, RequestFacts, UpstreamHeaders};
use libfuzzer_sys::fuzz_target;

/// The hostile-HTTP policy, with non-default ports so `Location` carries them.
const POLICY: &str = r#"{
  "schema": 1, "version": "fuzz",
  "settings": { "trusted_proxies": ["10.0.0.0/8", "::1"], "http_port": 8080, "https_port": 8443 },
  "sites": [
    { "id": "forced", "hostnames": ["force.test", "www.force.test"], "https": "force",
      "hsts": { "enabled": true, "include_subdomains": true }, "mixed_content": "upgrade",
      "cert_ready": ["force.test", "www.force.test"] },
    { "id": "canon", "hostnames": ["canon.test", "www.canon.test"], "https": "force",
      "redirect": "temporary", "canonical_host": "www.canon.test", "cert_ready": ["canon.test", "www.canon.test"] },
    { "id": "off", "hostnames": ["off.test"], "https": "disable", "cert_ready": ["off.test"] },
    { "id": "auto", "hostnames": ["auto.test"], "mixed_content": "report", "cert_ready": ["auto.test"] },
    { "id": "pending", "hostnames": ["pending.test"], "https": "force" },
    { "id": "wild", "hostnames": ["wild.test", "*.wild.test"], "https": "force", "cert_ready": ["*.wild.test"] }
  ]
}"#;

const EXACT: &[&str] = &[
    "force.test",
    "www.force.test",
    "canon.test",
    "www.canon.test",
    "off.test",
    "auto.test",
    "pending.test",
    "wild.test",
];

#[derive(Debug, Arbitrary)]
struct Facts {
    tls: bool,
    peer: Option<Peer>,
    authority: String,
    path: String,
    forwarded_proto: Option<String>,
    upstream_hsts: bool,
    upstream_csp: Option<String>,
}

#[derive(Debug, Arbitrary)]
enum Peer {
    V4([u8; 4]),
    V6([u8; 16]),
}

fn allowed_host(host: &str) -> bool {
    if EXACT.contains(&host) {
        return true;
    }
    match host.split_once('.') {
        Some((label, "wild.test")) => {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        }
        _ => false,
    }
}

fn check_location(location: &str) {
    assert!(
        location.bytes().all(|b| b > b' ' && b < 0x7f),
        "control or non-ASCII byte in {location:?}"
    );
    let rest = location
        .strip_prefix("https://")
        .or_else(|| location.strip_prefix("http://"))
        .unwrap_or_else(|| panic!("not an http(s) URL: {location:?}"));
    let end = rest.find(['/', '\\', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    assert!(path.starts_with('/'), "no path in {location:?}");
    let host = match authority.split_once(':') {
        Some((host, port)) => {
            assert!(matches!(port, "8080" | "8443"), "port in {location:?}");
            host
        }
        None => authority,
    };
    assert!(allowed_host(host), "Location {location:?} leaves the site");
}

fuzz_target!(|facts: Facts| {
    thread_local! {
        static COMPILED: Policy = Policy::from_json(POLICY.as_bytes()).expect("fuzz policy");
    }
    COMPILED.with(|policy| {
        let peer = facts.peer.as_ref().map(|p| match p {
            Peer::V4(octets) => IpAddr::from(*octets),
            Peer::V6(octets) => IpAddr::from(*octets),
        });
        let decision = policy.decide(&RequestFacts {
            tls: facts.tls,
            peer,
            authority: &facts.authority,
            path: &facts.path,
            forwarded_proto: facts.forwarded_proto.as_deref(),
        });
        match decision {
            Decision::Redirect { redirect, .. } => {
                check_location(&redirect.location);
                for (_, value) in redirect.headers() {
                    assert!(value.bytes().all(|b| b >= b' ' && b != 0x7f));
                }
            }
            Decision::Continue { plan, .. } => {
                let added = policy.response_headers(
                    &plan,
                    &UpstreamHeaders {
                        hsts_present: facts.upstream_hsts,
                        csp: facts.upstream_csp.as_deref(),
                    },
                );
                let values = added.hsts.into_iter().chain(added.csp.map(|(_, v)| v));
                for value in values {
                    assert!(value.bytes().all(|b| b >= b' ' && b != 0x7f), "{value:?}");
                }
            }
        }
    });
});
