//! Table-driven tests of the policy engine: validation, host matching and decisions, hostile
//! input included.

use std::net::IpAddr;

use super::*;

fn policy_json(http_port: u16, https_port: u16) -> String {
    format!(
        r#"{{
  "schema": 1,
  "version": "v-test",
  "settings": {{ "trusted_proxies": ["10.0.0.0/8", "::1"], "http_port": {http_port}, "https_port": {https_port} }},
  "sites": [
    {{ "id": "forced", "hostnames": ["force.test", "www.force.test"], "https": "force",
      "hsts": {{ "enabled": true, "max_age": 31536000, "include_subdomains": true }},
      "mixed_content": "upgrade", "cert_ready": ["force.test", "www.force.test"] }},
    {{ "id": "pending", "hostnames": ["pending.test"], "https": "force" }},
    {{ "id": "canon", "hostnames": ["canon.test", "www.canon.test", "old.canon.test"], "https": "force",
      "redirect": "temporary", "canonical_host": "www.canon.test",
      "cert_ready": ["canon.test", "www.canon.test"] }},
    {{ "id": "auto", "hostnames": ["auto.test"], "hsts": {{ "enabled": true, "max_age": 600 }},
      "mixed_content": "report", "cert_ready": ["auto.test"] }},
    {{ "id": "plain", "hostnames": ["plain.test"] }},
    {{ "id": "off", "hostnames": ["off.test"], "https": "disable",
      "hsts": {{ "enabled": true }}, "mixed_content": "upgrade", "cert_ready": ["off.test"] }},
    {{ "id": "wild", "hostnames": ["wild.test", "*.wild.test"], "https": "force",
      "cert_ready": ["*.wild.test"] }},
    {{ "id": "ipv6ish", "hostnames": ["xn--bcher-kva.test"], "https": "force", "cert_ready": ["xn--bcher-kva.test"] }}
  ]
}}"#
    )
}

fn policy() -> Policy {
    Policy::from_json(policy_json(80, 443).as_bytes()).expect("test policy is valid")
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// Passed with (outcome, HSTS planned, mixed content planned).
    Pass(Outcome, bool, MixedContent),
    /// Redirected with (status, Location, HSTS cleared).
    Redirect(u16, &'static str, bool),
}

use Expect::{Pass, Redirect as Redir};
use MixedContent::{Off, Report, Upgrade};
use Outcome::*;

struct Case {
    name: &'static str,
    tls: bool,
    peer: &'static str,
    method: &'static str,
    authority: &'static str,
    path: &'static str,
    xfp: Option<&'static str>,
    expect: Expect,
}

const fn http(
    name: &'static str,
    authority: &'static str,
    path: &'static str,
    expect: Expect,
) -> Case {
    Case {
        name,
        tls: false,
        peer: "192.0.2.1",
        method: "GET",
        authority,
        path,
        xfp: None,
        expect,
    }
}

const fn https(
    name: &'static str,
    authority: &'static str,
    path: &'static str,
    expect: Expect,
) -> Case {
    Case {
        tls: true,
        ..http(name, authority, path, expect)
    }
}

const fn method(mut case: Case, method: &'static str) -> Case {
    case.method = method;
    case
}

const fn forwarded(mut case: Case, peer: &'static str, xfp: &'static str) -> Case {
    case.peer = peer;
    case.xfp = Some(xfp);
    case
}

fn cases() -> Vec<Case> {
    vec![
        // force
        http(
            "force_redirects_get_301",
            "force.test",
            "/",
            Redir(301, "https://force.test/", false),
        ),
        http(
            "force_keeps_raw_query",
            "force.test",
            "/a/b?x=1&y=%20z",
            Redir(301, "https://force.test/a/b?x=1&y=%20z", false),
        ),
        http(
            "force_keeps_encoded_slashes",
            "force.test",
            "/a%2Fb/../c?q=%2e%2E",
            Redir(301, "https://force.test/a%2Fb/../c?q=%2e%2E", false),
        ),
        method(
            http(
                "force_post_is_308",
                "force.test",
                "/form",
                Redir(308, "https://force.test/form", false),
            ),
            "POST",
        ),
        method(
            http(
                "force_head_is_301",
                "force.test",
                "/",
                Redir(301, "https://force.test/", false),
            ),
            "HEAD",
        ),
        method(
            http(
                "force_put_is_308",
                "force.test",
                "/x",
                Redir(308, "https://force.test/x", false),
            ),
            "PUT",
        ),
        method(
            http(
                "force_lowercase_get_is_not_safe_method",
                "force.test",
                "/x",
                Redir(308, "https://force.test/x", false),
            ),
            "get",
        ),
        http(
            "force_second_name",
            "www.force.test",
            "/p",
            Redir(301, "https://www.force.test/p", false),
        ),
        http(
            "force_mixed_case_host_normalised",
            "WWW.Force.TEST",
            "/p",
            Redir(301, "https://www.force.test/p", false),
        ),
        http(
            "force_trailing_dot_normalised",
            "force.test.",
            "/",
            Redir(301, "https://force.test/", false),
        ),
        http(
            "force_port_in_host_dropped",
            "force.test:80",
            "/",
            Redir(301, "https://force.test/", false),
        ),
        http(
            "force_odd_port_in_host_dropped",
            "force.test:8080",
            "/",
            Redir(301, "https://force.test/", false),
        ),
        https(
            "force_over_https_passes_with_hsts_and_csp",
            "force.test",
            "/",
            Pass(Pass_, true, Upgrade),
        ),
        http(
            "force_acme_challenge_not_redirected",
            "force.test",
            "/.well-known/acme-challenge/tok123",
            Pass(AcmeChallenge, false, Off),
        ),
        http(
            "force_acme_prefix_lookalike_redirected",
            "force.test",
            "/.well-known/acme-challengeX/tok",
            Redir(
                301,
                "https://force.test/.well-known/acme-challengeX/tok",
                false,
            ),
        ),
        http(
            "force_acme_challenge_unknown_host_passes",
            "nobody.test",
            "/.well-known/acme-challenge/t",
            Pass(AcmeChallenge, false, Off),
        ),
        http(
            "force_without_cert_serves_http",
            "pending.test",
            "/",
            Pass(ForceSkippedNoCert, false, Off),
        ),
        https(
            "force_without_cert_over_https_passes",
            "pending.test",
            "/",
            Pass(Pass_, false, Off),
        ),
        // canonical host
        http(
            "canonical_force_goes_to_canonical_307_temp",
            "canon.test",
            "/a?b",
            Redir(302, "https://www.canon.test/a?b", false),
        ),
        method(
            http(
                "canonical_post_temporary_is_307",
                "canon.test",
                "/a",
                Redir(307, "https://www.canon.test/a", false),
            ),
            "POST",
        ),
        http(
            "canonical_host_itself_redirected_to_https",
            "www.canon.test",
            "/",
            Redir(302, "https://www.canon.test/", false),
        ),
        https(
            "canonical_over_https_moves_to_canonical",
            "canon.test",
            "/z",
            Redir(302, "https://www.canon.test/z", false),
        ),
        https(
            "canonical_over_https_on_canonical_passes",
            "www.canon.test",
            "/z",
            Pass(Pass_, false, Off),
        ),
        https(
            "canonical_over_https_name_without_cert_goes_canonical",
            "old.canon.test",
            "/",
            Redir(302, "https://www.canon.test/", false),
        ),
        // auto
        http(
            "auto_http_passes_without_headers",
            "auto.test",
            "/",
            Pass(Pass_, false, Off),
        ),
        https(
            "auto_https_adds_hsts_and_report_csp",
            "auto.test",
            "/",
            Pass(Pass_, true, Report),
        ),
        http(
            "auto_default_site_http_passes",
            "plain.test",
            "/",
            Pass(Pass_, false, Off),
        ),
        https(
            "auto_default_site_https_passes",
            "plain.test",
            "/",
            Pass(Pass_, false, Off),
        ),
        // disable
        https(
            "disable_redirects_to_http_with_max_age_0",
            "off.test",
            "/p?q=1",
            Redir(301, "http://off.test/p?q=1", true),
        ),
        method(
            https(
                "disable_post_is_308",
                "off.test",
                "/p",
                Redir(308, "http://off.test/p", true),
            ),
            "POST",
        ),
        http(
            "disable_http_passes_without_headers",
            "off.test",
            "/",
            Pass(Pass_, false, Off),
        ),
        https(
            "disable_acme_challenge_not_redirected",
            "off.test",
            "/.well-known/acme-challenge/x",
            Pass(AcmeChallenge, false, Off),
        ),
        // wildcards
        http(
            "wildcard_child_redirected",
            "a.wild.test",
            "/",
            Redir(301, "https://a.wild.test/", false),
        ),
        http(
            "wildcard_child_mixed_case",
            "A.Wild.Test",
            "/x",
            Redir(301, "https://a.wild.test/x", false),
        ),
        http(
            "wildcard_grandchild_unknown",
            "a.b.wild.test",
            "/",
            Pass(UnknownHost, false, Off),
        ),
        http(
            "wildcard_apex_without_cert_not_forced",
            "wild.test",
            "/",
            Pass(ForceSkippedNoCert, false, Off),
        ),
        http(
            "wildcard_does_not_match_suffix_lookalike",
            "evilwild.test",
            "/",
            Pass(UnknownHost, false, Off),
        ),
        http(
            "punycode_name_matches",
            "xn--bcher-kva.test",
            "/",
            Redir(301, "https://xn--bcher-kva.test/", false),
        ),
        // unknown and hostile hosts
        http(
            "unknown_host_passes",
            "evil.com",
            "/",
            Pass(UnknownHost, false, Off),
        ),
        https(
            "unknown_host_https_passes",
            "evil.com",
            "/",
            Pass(UnknownHost, false, Off),
        ),
        http("empty_host_passes", "", "/", Pass(UnknownHost, false, Off)),
        http(
            "host_with_crlf_passes",
            "force.test\r\nX: y",
            "/",
            Pass(UnknownHost, false, Off),
        ),
        http(
            "host_with_space_passes",
            "force.test evil.com",
            "/",
            Pass(UnknownHost, false, Off),
        ),
        http(
            "host_with_userinfo_passes",
            "evil.com@force.test",
            "/",
            Pass(UnknownHost, false, Off),
        ),
        http(
            "host_with_path_passes",
            "force.test/evil",
            "/",
            Pass(UnknownHost, false, Off),
        ),
        http(
            "host_non_ascii_passes",
            "föorce.test",
            "/",
            Pass(UnknownHost, false, Off),
        ),
        http(
            "host_bad_port_passes",
            "force.test:80x",
            "/",
            Pass(UnknownHost, false, Off),
        ),
        http(
            "host_empty_port_passes",
            "force.test:",
            "/",
            Pass(UnknownHost, false, Off),
        ),
        http(
            "host_two_ports_passes",
            "force.test:80:80",
            "/",
            Pass(UnknownHost, false, Off),
        ),
        http(
            "host_suffix_trick_passes",
            "force.test.evil.com",
            "/",
            Pass(UnknownHost, false, Off),
        ),
        http(
            "host_prefix_trick_passes",
            "evil.com.force.test",
            "/",
            Pass(UnknownHost, false, Off),
        ),
        http(
            "ipv6_literal_passes",
            "[::1]:80",
            "/",
            Pass(UnknownHost, false, Off),
        ),
        http(
            "ipv6_literal_garbage_passes",
            "[::1]evil",
            "/",
            Pass(UnknownHost, false, Off),
        ),
        http(
            "ipv4_literal_passes",
            "127.0.0.1",
            "/",
            Pass(UnknownHost, false, Off),
        ),
        http(
            "double_trailing_dot_passes",
            "force.test..",
            "/",
            Pass(UnknownHost, false, Off),
        ),
        // hostile paths: Location stays on the site's name, no control bytes
        http(
            "double_slash_path_stays_on_host",
            "force.test",
            "//evil.com/x",
            Redir(301, "https://force.test//evil.com/x", false),
        ),
        http(
            "backslash_path_stays_on_host",
            "force.test",
            "/\\evil.com",
            Redir(301, "https://force.test/\\evil.com", false),
        ),
        http(
            "absolute_form_path_becomes_root",
            "force.test",
            "http://evil.com/x",
            Redir(301, "https://force.test/", false),
        ),
        http(
            "asterisk_form_becomes_root",
            "force.test",
            "*",
            Redir(301, "https://force.test/", false),
        ),
        http(
            "empty_path_becomes_root",
            "force.test",
            "",
            Redir(301, "https://force.test/", false),
        ),
        http(
            "crlf_in_path_encoded",
            "force.test",
            "/a\r\nSet-Cookie: x=1",
            Redir(301, "https://force.test/a%0D%0ASet-Cookie:%20x=1", false),
        ),
        http(
            "nul_and_del_in_path_encoded",
            "force.test",
            "/a\0b\x7f",
            Redir(301, "https://force.test/a%00b%7F", false),
        ),
        http(
            "non_ascii_path_encoded",
            "force.test",
            "/caf\u{e9}",
            Redir(301, "https://force.test/caf%C3%A9", false),
        ),
        http(
            "tab_in_path_encoded",
            "force.test",
            "/a\tb",
            Redir(301, "https://force.test/a%09b", false),
        ),
        http(
            "percent_encoded_crlf_kept_as_is",
            "force.test",
            "/a%0d%0ab",
            Redir(301, "https://force.test/a%0d%0ab", false),
        ),
        http(
            "at_sign_path_stays_on_host",
            "force.test",
            "/@evil.com",
            Redir(301, "https://force.test/@evil.com", false),
        ),
        // forwarded scheme
        forwarded(
            http(
                "xfp_https_from_trusted_proxy_passes",
                "force.test",
                "/",
                Pass(Pass_, true, Upgrade),
            ),
            "10.1.2.3",
            "https",
        ),
        forwarded(
            http(
                "xfp_https_from_untrusted_peer_ignored",
                "force.test",
                "/",
                Redir(301, "https://force.test/", false),
            ),
            "192.0.2.7",
            "https",
        ),
        forwarded(
            http(
                "xfp_https_from_trusted_ipv6_passes",
                "force.test",
                "/",
                Pass(Pass_, true, Upgrade),
            ),
            "::1",
            "HTTPS",
        ),
        forwarded(
            http(
                "xfp_https_from_ipv4_mapped_trusted",
                "force.test",
                "/",
                Pass(Pass_, true, Upgrade),
            ),
            "::ffff:10.0.0.9",
            "https",
        ),
        forwarded(
            http(
                "xfp_list_first_hop_counts",
                "force.test",
                "/",
                Pass(Pass_, true, Upgrade),
            ),
            "10.0.0.1",
            "https, http",
        ),
        forwarded(
            http(
                "xfp_list_first_http_redirects",
                "force.test",
                "/",
                Redir(301, "https://force.test/", false),
            ),
            "10.0.0.1",
            "http, https",
        ),
        forwarded(
            http(
                "xfp_garbage_falls_back_to_connection",
                "force.test",
                "/",
                Redir(301, "https://force.test/", false),
            ),
            "10.0.0.1",
            "ftp",
        ),
        forwarded(
            https(
                "xfp_http_from_trusted_over_tls_redirects",
                "force.test",
                "/",
                Redir(301, "https://force.test/", false),
            ),
            "10.0.0.1",
            "http",
        ),
        forwarded(
            https(
                "xfp_http_from_untrusted_over_tls_ignored",
                "force.test",
                "/",
                Pass(Pass_, true, Upgrade),
            ),
            "192.0.2.9",
            "http",
        ),
        forwarded(
            https(
                "disable_behind_trusted_proxy_redirects",
                "off.test",
                "/",
                Redir(301, "http://off.test/", true),
            ),
            "10.0.0.1",
            "https",
        ),
        // Behind a TLS-terminating proxy (10.0.0.0/8), with an attacker (192.0.2.0/24) that
        // reaches the edge directly: the peer here is the TCP peer, so whatever the attacker
        // claims in headers it stays an untrusted peer and its X-Forwarded-Proto is ignored.
        forwarded(
            http(
                "proxy_http_to_force_site_redirects",
                "force.test",
                "/a?b",
                Redir(301, "https://force.test/a?b", false),
            ),
            "10.0.0.5",
            "http",
        ),
        forwarded(
            http(
                "proxy_http_to_disable_site_passes",
                "off.test",
                "/",
                Pass(Pass_, false, Off),
            ),
            "10.0.0.5",
            "http",
        ),
        forwarded(
            http(
                "attacker_xfp_https_to_disable_site_passes",
                "off.test",
                "/",
                Pass(Pass_, false, Off),
            ),
            "192.0.2.66",
            "https",
        ),
        forwarded(
            https(
                "attacker_xfp_http_over_tls_to_disable_site_redirects",
                "off.test",
                "/p",
                Redir(301, "http://off.test/p", true),
            ),
            "192.0.2.66",
            "http",
        ),
        forwarded(
            https(
                "attacker_xfp_https_over_tls_to_disable_site_redirects",
                "off.test",
                "/p",
                Redir(301, "http://off.test/p", true),
            ),
            "192.0.2.66",
            "https",
        ),
        forwarded(
            http(
                "xfp_from_unknown_peer_ignored",
                "force.test",
                "/",
                Redir(301, "https://force.test/", false),
            ),
            "",
            "https",
        ),
    ]
}

#[allow(non_upper_case_globals)]
const Pass_: Outcome = Outcome::Pass;

fn run(policy: &Policy, case: &Case) -> Decision {
    policy.decide(&RequestFacts {
        tls: case.tls,
        peer: parse_peer(case.peer),
        authority: case.authority,
        path: case.path,
        forwarded_proto: case.xfp,
    })
}

#[test]
fn decision_table() {
    let policy = policy();
    let cases = cases();
    assert!(cases.len() >= 60, "the table has {} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let decision = run(&policy, case);
        let got = match &decision {
            Decision::Continue { outcome, plan } => Pass(*outcome, plan.hsts, plan.mixed_content),
            Decision::Redirect { redirect, .. } => {
                // Leak is fine in a test: compares against &'static str expectations.
                let location: &'static str = Box::leak(redirect.location.clone().into_boxed_str());
                Redir(redirect.status(case.method), location, redirect.clear_hsts)
            }
        };
        if got != case.expect {
            failures.push(format!(
                "{}: expected {:?}, got {:?}",
                case.name, case.expect, got
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn no_location_leaves_the_site_or_carries_control_bytes() {
    let policy = policy();
    let names = [
        "force.test",
        "www.force.test",
        "www.canon.test",
        "off.test",
        "a.wild.test",
        "xn--bcher-kva.test",
    ];
    let hosts = [
        "force.test",
        "FORCE.TEST.",
        "evil.com",
        "force.test@evil.com",
        "evil.com#force.test",
        "force.test\r\n",
        "[::1]",
        "a.wild.test",
        "canon.test",
        "off.test",
        "",
        " ",
        ".",
        "force.test:443",
        "\u{0}",
        "force.test\\evil.com",
    ];
    let paths = [
        "/",
        "//evil.com",
        "/\r\nLocation: http://evil.com",
        "http://evil.com/",
        "https:evil.com",
        "/%0d%0a",
        "\\\\evil.com",
        "/\u{0}",
        "/../../",
        "?x",
        "#frag",
        "/\u{202e}",
    ];
    let mut checked = 0;
    for tls in [false, true] {
        for host in hosts {
            for path in paths {
                for xfp in [None, Some("https"), Some("http")] {
                    let decision = policy.decide(&RequestFacts {
                        tls,
                        peer: parse_peer("10.0.0.1"),
                        authority: host,
                        path,
                        forwarded_proto: xfp,
                    });
                    if let Decision::Redirect { redirect, .. } = decision {
                        checked += 1;
                        let location = &redirect.location;
                        assert!(
                            location.bytes().all(|b| b > b' ' && b < 0x7f),
                            "control or non-ASCII byte in {location:?}"
                        );
                        let rest = location
                            .strip_prefix("https://")
                            .or_else(|| location.strip_prefix("http://"))
                            .expect("absolute http(s) Location");
                        let authority = rest.split('/').next().unwrap_or_default();
                        assert!(
                            names.contains(&authority),
                            "Location {location:?} for host {host:?} path {path:?} leaves the site's names"
                        );
                        assert!(rest[authority.len()..].starts_with('/'));
                    }
                }
            }
        }
    }
    assert!(checked > 50, "only {checked} redirects were checked");
}

#[test]
fn location_uses_non_default_ports() {
    let policy = Policy::from_json(policy_json(8080, 8443).as_bytes()).expect("valid");
    let case = http("x", "force.test", "/a?b", Pass(Pass_, false, Off));
    match run(&policy, &case) {
        Decision::Redirect { redirect, .. } => {
            assert_eq!(redirect.location, "https://force.test:8443/a?b")
        }
        other => panic!("expected a redirect, got {other:?}"),
    }
    let case = https("x", "off.test", "/", Pass(Pass_, false, Off));
    match run(&policy, &case) {
        Decision::Redirect { redirect, .. } => {
            assert_eq!(redirect.location, "http://off.test:8080/")
        }
        other => panic!("expected a redirect, got {other:?}"),
    }
}

fn plan_for(policy: &Policy, authority: &str) -> ResponsePlan {
    match policy.decide(&RequestFacts {
        tls: true,
        peer: None,
        authority,
        path: "/",
        forwarded_proto: None,
    }) {
        Decision::Continue { plan, .. } => plan,
        other => panic!("expected to continue, got {other:?}"),
    }
}

#[test]
fn hsts_added_only_when_upstream_sent_none() {
    let policy = policy();
    let plan = plan_for(&policy, "force.test");
    let added = policy.response_headers(&plan, &UpstreamHeaders::default());
    assert_eq!(added.hsts, Some("max-age=31536000; includeSubDomains"));
    let upstream = UpstreamHeaders {
        hsts_present: true,
        csp: None,
    };
    assert_eq!(policy.response_headers(&plan, &upstream).hsts, None);
}

#[test]
fn csp_upgrade_added_beside_upstream_csp() {
    let policy = policy();
    let plan = plan_for(&policy, "force.test");
    let upstream = UpstreamHeaders {
        hsts_present: false,
        csp: Some("default-src 'self'"),
    };
    assert_eq!(
        policy.response_headers(&plan, &upstream).csp,
        Some(("content-security-policy", "upgrade-insecure-requests"))
    );
}

#[test]
fn csp_upgrade_not_repeated_when_upstream_has_it() {
    let policy = policy();
    let plan = plan_for(&policy, "force.test");
    for csp in [
        "upgrade-insecure-requests",
        "default-src 'self'; Upgrade-Insecure-Requests",
        "img-src *, upgrade-insecure-requests",
    ] {
        let upstream = UpstreamHeaders {
            hsts_present: false,
            csp: Some(csp),
        };
        assert_eq!(policy.response_headers(&plan, &upstream).csp, None, "{csp}");
    }
}

#[test]
fn csp_report_mode_adds_report_only_policy_with_default_uri() {
    let policy = policy();
    let plan = plan_for(&policy, "auto.test");
    let added = policy.response_headers(&plan, &UpstreamHeaders::default());
    let (name, value) = added.csp.expect("a report-only policy");
    assert_eq!(name, "content-security-policy-report-only");
    assert!(value.starts_with("default-src https: "), "{value}");
    assert!(
        value.ends_with(&format!("report-uri {DEFAULT_REPORT_URI}")),
        "{value}"
    );
    assert_eq!(added.hsts, Some("max-age=600"));
}

#[test]
fn csp_report_uri_carries_the_sites_token() {
    let json = r#"{"schema":1,"version":"v","sites":[
        {"id":"tok","hostnames":["tok.test"],"mixed_content":"report",
         "report_token":"AbCdEfGhIjKlMnOp_-0123456789"},
        {"id":"query","hostnames":["q.test"],"mixed_content":"report",
         "report_uri":"https://r.example/c?x=1","report_token":"AbCdEfGhIjKlMnOp"}]}"#;
    let policy = Policy::from_json(json.as_bytes()).expect("valid policy");
    let csp = |host: &str| {
        let plan = plan_for(&policy, host);
        let added = policy.response_headers(&plan, &UpstreamHeaders::default());
        added.csp.expect("a report-only policy").1.to_string()
    };
    assert!(
        csp("tok.test").ends_with(&format!(
            "report-uri {DEFAULT_REPORT_URI}?site=tok&token=AbCdEfGhIjKlMnOp_-0123456789"
        )),
        "{}",
        csp("tok.test")
    );
    assert!(
        csp("q.test")
            .ends_with("report-uri https://r.example/c?x=1&site=query&token=AbCdEfGhIjKlMnOp"),
        "{}",
        csp("q.test")
    );
}

#[test]
fn nothing_added_for_unknown_hosts_or_plain_http() {
    let policy = policy();
    let plan = plan_for(&policy, "unknown.test");
    assert_eq!(
        policy.response_headers(&plan, &UpstreamHeaders::default()),
        ResponseHeaders::default()
    );
}

#[test]
fn disable_redirect_headers_clear_hsts() {
    let policy = policy();
    let decision = run(
        &policy,
        &https("x", "off.test", "/", Pass(Pass_, false, Off)),
    );
    let Decision::Redirect { redirect, .. } = decision else {
        panic!("expected a redirect");
    };
    assert_eq!(
        redirect.headers(),
        vec![
            ("location", "http://off.test/"),
            ("strict-transport-security", "max-age=0")
        ]
    );
}

#[test]
fn lookup_cost_does_not_depend_on_site_count() {
    // Not a timing test: it checks the structure that makes lookups O(1): a wildcard child is
    // found through one parent lookup, whatever the number of sites.
    let mut sites = Vec::new();
    for i in 0..20_000 {
        sites.push(format!(
            r#"{{"id":"s{i}","hostnames":["s{i}.example","*.s{i}.example"],"cert_ready":["*.s{i}.example"]}}"#
        ));
    }
    let json = format!(
        r#"{{"schema":1,"version":"big","sites":[{}]}}"#,
        sites.join(",")
    );
    let policy = Policy::from_json(json.as_bytes()).expect("valid");
    assert_eq!(policy.site_count(), 20_000);
    assert_eq!(policy.lookup("x.s19999.example"), Some((19_999, true)));
    // The apex is a name of the site, but a wildcard certificate does not cover it.
    assert_eq!(policy.lookup("s5.example"), Some((5, false)));
    assert_eq!(policy.lookup("y.x.s5.example"), None);
}

// ---- validation ----

fn problems(json: &str) -> Vec<String> {
    match Policy::from_json(json.as_bytes()) {
        Ok(_) => Vec::new(),
        Err(e) => e.problems().iter().map(|p| p.to_string()).collect(),
    }
}

fn site(fields: &str) -> String {
    format!(r#"{{"schema":1,"version":"v1","sites":[{{"id":"a",{fields}}}]}}"#)
}

#[test]
fn validation_reports_each_problem_with_its_path() {
    let cases: &[(&str, &str)] = &[
        (
            &site(r#""hostnames":["ex ample.com"]"#),
            "sites[0].hostnames[0]: \"ex ample.com\" is not a valid hostname",
        ),
        (&site(r#""hostnames":["a..b.com"]"#), "empty label"),
        (
            &site(r#""hostnames":["-a.com"]"#),
            "starts or ends with '-'",
        ),
        (&site(r#""hostnames":["bücher.de"]"#), "punycode"),
        (
            &site(r#""hostnames":["a.*.com"]"#),
            "sites[0].hostnames[0]: \"a.*.com\" is not a valid hostname: a wildcard may only be the whole first label",
        ),
        (
            &site(r#""hostnames":["*example.com"]"#),
            "whole first label",
        ),
        (&site(r#""hostnames":["*.com"]"#), "top-level domain"),
        (&site(r#""hostnames":["10.0.0.1"]"#), "IP address"),
        (
            &site(r#""hostnames":[]"#),
            "sites[0].hostnames: a site needs at least one hostname",
        ),
        (
            &site(r#""hostnames":["a.com","A.com."]"#),
            "sites[0].hostnames[1]: a.com is listed twice",
        ),
        (
            &site(r#""hostnames":["a.com"],"canonical_host":"b.com""#),
            "sites[0].canonical_host: b.com is not one of this site's hostnames",
        ),
        (
            &site(r#""hostnames":["a.com","*.a.com"],"canonical_host":"*.a.com""#),
            "exact name, not a wildcard",
        ),
        (
            &site(r#""hostnames":["a.com"],"cert_ready":["b.com"]"#),
            "sites[0].cert_ready[0]: b.com has a certificate but is not one of this site's hostnames",
        ),
        (
            &site(r#""hostnames":["a.com"],"mixed_content":"report","report_uri":"http://x/r""#),
            "must be a path",
        ),
        (
            &site(r#""hostnames":["a.com"],"report_uri":"/r; script-src *""#),
            "cannot appear in a CSP directive",
        ),
        (
            &site(r#""hostnames":["a.com"],"report_token":"short""#),
            "sites[0].report_token: the report token is 5 bytes long; it must be 16 to 128 bytes",
        ),
        (
            &site(r#""hostnames":["a.com"],"report_token":"abcdefghijklmnop;script-src""#),
            "sites[0].report_token: the report token contains ';'",
        ),
        (
            &site(r#""hostnames":["a.com"],"report_token":"abcdefghijklmnop&site=other""#),
            "the report token contains '&'",
        ),
        (
            &site(r#""hostnames":["a.com"],"hsts":{"enabled":true,"max_age":60,"preload":true}"#),
            "preload needs",
        ),
        (
            &site(r#""hostnames":["a.com"],"https":"always""#),
            "unknown variant `always`",
        ),
        (
            &site(r#""hostnames":["a.com"],"colour":"red""#),
            "unknown field `colour`",
        ),
        (
            &format!(
                "{}{}",
                "x".repeat(0),
                r#"{"schema":2,"version":"v","sites":[]}"#
            ),
            "schema: schema 2 is not supported",
        ),
        (
            r#"{"schema":1,"version":"","sites":[]}"#,
            "version: the version is empty",
        ),
        (
            r#"{"schema":1,"version":"v","settings":{"trusted_proxies":["10.0.0.0/33"]}}"#,
            "settings.trusted_proxies[0]: \"10.0.0.0/33\": the prefix length must be 0 to 32",
        ),
        (
            r#"{"schema":1,"version":"v","settings":{"trusted_proxies":["proxy.local"]}}"#,
            "is not an IP address or CIDR",
        ),
        (
            r#"{"schema":1,"version":"v","settings":{"http_port":0}}"#,
            "settings.http_port: the port must be 1 to 65535",
        ),
        (
            r#"{"schema":1,"version":"v","sites":[{"id":"a b","hostnames":["a.com"]}]}"#,
            "sites[0].id: the site id contains ' '",
        ),
        (
            r#"{"schema":1,"version":"v","sites":[{"id":"a","hostnames":["a.com"]},{"id":"a","hostnames":["b.com"]}]}"#,
            "sites[1].id: site id \"a\" is already used by sites[0]",
        ),
        (
            r#"{"schema":1,"version":"v","sites":[{"id":"a","hostnames":["a.com"]},{"id":"b","hostnames":["A.COM"]}]}"#,
            "sites[1].hostnames[0]: a.com already belongs to sites[0] (\"a\")",
        ),
        (
            r#"{"schema":1,"version":"v","sites":[{"id":"a","hostnames":["*.a.com"]},{"id":"b","hostnames":["*.a.com"]}]}"#,
            "*.a.com already belongs to sites[0]",
        ),
        ("{\"schema\":1,", "not a valid policy document"),
        (
            &format!(
                r#"{{"schema":1,"version":"v","sites":[{{"id":"a","hostnames":["{}.com"]}}]}}"#,
                "a".repeat(64)
            ),
            "the limit is 63",
        ),
    ];
    for (json, expected) in cases {
        let found = problems(json);
        assert!(
            found.iter().any(|p| p.contains(expected)),
            "expected a problem containing {expected:?} for {json}; got {found:?}"
        );
    }
}

#[test]
fn validation_lists_every_problem_not_just_the_first() {
    let json = r#"{"schema":1,"version":"v","settings":{"trusted_proxies":["x"]},"sites":[
        {"id":"a","hostnames":["bad host","ok.com"],"canonical_host":"nope.com"},
        {"id":"b","hostnames":["ok.com"],"cert_ready":["zzz.com"]}]}"#;
    let found = problems(json);
    assert_eq!(found.len(), 5, "{found:#?}");
}

#[test]
fn names_are_normalised_in_valid_policies() {
    let policy = Policy::from_json(
        site(r#""hostnames":["Example.COM.","*.Example.com"],"cert_ready":["EXAMPLE.com"],"canonical_host":"example.com.""#)
            .as_bytes(),
    )
    .expect("valid");
    assert_eq!(policy.lookup("example.com"), Some((0, true)));
    assert_eq!(policy.lookup("www.example.com"), Some((0, false)));
}

#[test]
fn exact_name_covered_by_wildcard_certificate_is_ready() {
    let policy = Policy::from_json(
        site(r#""hostnames":["www.a.com","*.a.com"],"cert_ready":["*.a.com"]"#).as_bytes(),
    )
    .expect("valid");
    assert_eq!(policy.lookup("www.a.com"), Some((0, true)));
}

#[test]
fn normalise_authority_cases() {
    let cases: &[(&str, Option<&str>)] = &[
        ("Example.com", Some("example.com")),
        ("example.com.", Some("example.com")),
        ("example.com:8443", Some("example.com")),
        ("example.com.:80", Some("example.com")),
        ("[::1]:443", Some("::1")),
        ("[2001:DB8::1]", Some("2001:db8::1")),
        ("[::1", None),
        ("::1", None),
        ("example.com:", None),
        ("example.com:123456", None),
        ("", None),
        (":80", None),
        ("a b", None),
        ("a/b", None),
        ("a@b", None),
    ];
    for (input, expected) in cases {
        assert_eq!(
            normalise_authority(input).as_deref(),
            *expected,
            "normalise_authority({input:?})"
        );
    }
}

#[test]
fn cidr_matching() {
    let cases: &[(&str, &str, bool)] = &[
        ("10.0.0.0/8", "10.255.1.2", true),
        ("10.0.0.0/8", "11.0.0.1", false),
        ("192.168.1.0/25", "192.168.1.127", true),
        ("192.168.1.0/25", "192.168.1.128", false),
        ("0.0.0.0/0", "203.0.113.5", true),
        ("::1", "::1", true),
        ("::1", "::2", false),
        ("2001:db8::/32", "2001:db8:ffff::1", true),
        ("2001:db8::/32", "2001:db9::1", false),
        ("10.0.0.0/8", "::ffff:10.1.1.1", true),
        ("10.0.0.0/8", "::1", false),
    ];
    for (cidr, address, expected) in cases {
        let cidr = Cidr::parse(cidr).expect("valid cidr");
        let address: IpAddr = address.parse().expect("valid address");
        assert_eq!(cidr.contains(address), *expected, "{cidr:?} ∋ {address}");
    }
}

#[test]
fn parse_peer_forms() {
    assert_eq!(parse_peer("127.0.0.1:5555"), "127.0.0.1".parse().ok());
    assert_eq!(parse_peer("[::1]:5555"), "::1".parse().ok());
    assert_eq!(parse_peer("::1"), "::1".parse().ok());
    assert_eq!(parse_peer("10.0.0.1"), "10.0.0.1".parse().ok());
    assert_eq!(parse_peer("garbage"), None);
}

#[test]
fn policy_document_round_trips_through_json() {
    let document: PolicyDocument = serde_json::from_str(&policy_json(80, 443)).expect("parses");
    let again: PolicyDocument =
        serde_json::from_str(&serde_json::to_string(&document).expect("serialises"))
            .expect("parses");
    assert_eq!(document, again);
}

/// Found by the `decide` fuzz target: `.wild.test` matched `*.wild.test` with an empty label,
/// and force mode redirected to `https://.wild.test/`, a host that is not a hostname.
#[test]
fn wildcard_never_matches_an_empty_first_label() {
    let policy = policy();
    for authority in [".wild.test", ".wild.test.", ".wild.test:80"] {
        let decision = policy.decide(&RequestFacts {
            tls: false,
            peer: None,
            authority,
            path: "/",
            forwarded_proto: None,
        });
        assert_eq!(decision.outcome(), Outcome::UnknownHost, "{authority}");
    }
    assert_eq!(policy.lookup(".wild.test"), None);
    assert!(matches!(policy.lookup("a.wild.test"), Some((_, true))));
}

/// Found by the `normalise_authority` fuzz target: an IPv4-mapped IPv6 literal comes back in
/// its canonical text, which can be longer than what came in (`[::ffff:7f00:1]` →
/// `::ffff:127.0.0.1`). Harmless: no policy name is an address, so it matches no site.
/// The sidecar checks its edge settings with [`Settings::problems`] at start: the same
/// problems, with the same paths, as compiling a policy with those settings.
#[test]
fn settings_problems_are_the_ones_compile_reports() {
    assert!(Settings::default().problems().is_empty());
    let settings = Settings {
        trusted_proxies: vec!["10.0.0.0/8".into(), "not-an-address".into()],
        http_port: 0,
        https_port: 443,
    };
    let problems: Vec<String> = settings
        .problems()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(
        problems[0].starts_with("settings.trusted_proxies[1]: "),
        "{problems:?}"
    );
    assert_eq!(
        problems[1],
        "settings.http_port: the port must be 1 to 65535"
    );
    let document = PolicyDocument {
        schema: SCHEMA_VERSION,
        version: "v1".into(),
        settings,
        sites: Vec::new(),
    };
    let compiled: Vec<String> = Policy::compile(&document)
        .expect_err("refused")
        .problems()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(compiled, problems);
}

/// The one wildcard rule (RFC 6125 §6.4.3): a wildcard covers exactly one whole, non-empty
/// label, never a `*` label, and never sits directly under a top-level domain.
#[test]
fn wildcard_covers_exactly_one_label_below_a_registrable_parent() {
    assert_eq!(wildcard_parent("a.example.test"), Some("example.test"));
    assert_eq!(
        wildcard_name("a.example.test").as_deref(),
        Some("*.example.test")
    );
    for host in [
        "example.test",
        ".example.test",
        "*.example.test",
        "localhost",
        "a..test",
        "",
    ] {
        assert_eq!(wildcard_parent(host), None, "{host:?}");
        assert_eq!(wildcard_name(host), None, "{host:?}");
    }
    assert!(san_covers("*.example.test", "a.example.test"));
    assert!(san_covers("a.example.test", "a.example.test"));
    assert!(
        !san_covers("*.example.test", "x.y.example.test"),
        "two labels"
    );
    assert!(
        !san_covers("*.example.test", "example.test"),
        "the parent itself"
    );
    assert!(
        !san_covers("*.example.test", ".example.test"),
        "an empty label"
    );
    assert!(
        !san_covers("*.test", "example.test"),
        "under a top-level domain"
    );
    assert!(!san_covers("b.example.test", "a.example.test"));
    assert!(sans_cover(["b.test", "*.example.test"], "a.example.test"));
    assert!(!sans_cover([], "a.example.test"));
    assert_eq!(fold_hostname("WWW.Example.TEST."), "www.example.test");
}

#[test]
fn ipv6_literal_normalises_to_canonical_text_and_matches_no_site() {
    assert_eq!(
        normalise_authority("[::ffff:7f00:1]").as_deref(),
        Some("::ffff:127.0.0.1")
    );
    assert_eq!(normalise_authority("[::1]:8080").as_deref(), Some("::1"));
    let decision = policy().decide(&RequestFacts {
        tls: false,
        peer: None,
        authority: "[::ffff:7f00:1]",
        path: "/",
        forwarded_proto: None,
    });
    assert_eq!(decision.outcome(), Outcome::UnknownHost);
}

// ---------------------------------------------------------------------------------------------
// Deltas applied in place

fn spec(id: &str, hostnames: &[&str], cert_ready: &[&str]) -> SiteSpec {
    SiteSpec {
        id: id.into(),
        hostnames: hostnames.iter().map(|h| h.to_string()).collect(),
        https: HttpsMode::Force,
        redirect: RedirectKind::Permanent,
        canonical_host: None,
        hsts: HstsSpec::default(),
        mixed_content: MixedContent::Off,
        report_uri: None,
        report_token: None,
        cert_ready: cert_ready.iter().map(|h| h.to_string()).collect(),
    }
}

fn document(version: &str, sites: Vec<SiteSpec>) -> PolicyDocument {
    PolicyDocument {
        schema: SCHEMA_VERSION,
        version: version.into(),
        settings: Settings::default(),
        sites,
    }
}

fn delta(from: &str, version: &str, upsert: Vec<SiteSpec>, remove: &[&str]) -> PolicyDelta {
    PolicyDelta {
        schema: SCHEMA_VERSION,
        from: from.into(),
        version: version.into(),
        upsert,
        remove: remove.iter().map(|r| r.to_string()).collect(),
    }
}

const E: &str = "00000000000000aa";

fn v(n: u64) -> String {
    format!("{E}-{n}")
}

fn compiled(version: &str, sites: Vec<SiteSpec>) -> Policy {
    Policy::compile(&document(version, sites)).expect("valid document")
}

#[test]
fn delta_upserts_and_removes_in_place() {
    let mut policy = compiled(
        &v(1),
        vec![
            spec("a", &["a.test", "www.a.test"], &["a.test"]),
            spec("b", &["b.test"], &[]),
            spec("c", &["c.test", "*.c.test"], &["*.c.test"]),
        ],
    );
    let report = policy
        .apply_delta(&delta(
            &v(1),
            &v(2),
            vec![
                spec("a", &["a.test", "www.a.test"], &["a.test", "www.a.test"]),
                spec("d", &["d.test"], &["d.test"]),
            ],
            &["b"],
        ))
        .expect("applies");
    assert_eq!((report.upserted, report.removed), (2, 1));
    assert!(report.rejected.is_empty());
    assert_eq!(policy.version(), v(2));
    assert_eq!(policy.site_count(), 3);
    assert_eq!(
        policy.lookup("b.test"),
        None,
        "a removed site's names are gone"
    );
    assert!(policy.lookup("www.a.test").is_some_and(|(_, ready)| ready));
    assert!(policy.lookup("d.test").is_some_and(|(_, ready)| ready));
    assert!(policy.lookup("x.c.test").is_some_and(|(_, ready)| ready));
    assert_eq!(
        policy.contents(),
        compiled(
            &v(2),
            vec![
                spec("a", &["a.test", "www.a.test"], &["a.test", "www.a.test"]),
                spec("c", &["c.test", "*.c.test"], &["*.c.test"]),
                spec("d", &["d.test"], &["d.test"]),
            ]
        )
        .contents()
    );
}

#[test]
fn delta_renamed_site_loses_its_old_names_and_a_name_moves_in_one_delta() {
    let mut policy = compiled(
        &v(1),
        vec![
            spec("a", &["a.test", "old.a.test"], &[]),
            spec("b", &["b.test"], &[]),
        ],
    );
    // b takes old.a.test, listed before a lets go of it: the order of upserts does not matter.
    policy
        .apply_delta(&delta(
            &v(1),
            &v(2),
            vec![
                spec("b", &["b.test", "old.a.test"], &[]),
                spec("a", &["a.test", "new.a.test"], &[]),
            ],
            &[],
        ))
        .expect("applies");
    let owner = |host: &str| {
        policy
            .lookup(host)
            .and_then(|(s, _)| policy.site(s))
            .map(|s| s.id().to_string())
    };
    assert_eq!(owner("old.a.test").as_deref(), Some("b"));
    assert_eq!(owner("new.a.test").as_deref(), Some("a"));
    assert_eq!(owner("a.test").as_deref(), Some("a"));
}

#[test]
fn delta_from_another_version_changes_nothing() {
    let mut policy = compiled(&v(5), vec![spec("a", &["a.test"], &[])]);
    let before = policy.contents();
    let error = policy
        .apply_delta(&delta(&v(4), &v(6), vec![], &["a"]))
        .expect_err("not from the version held");
    assert!(matches!(error, crate::Error::DeltaBase { .. }), "{error}");
    assert!(error.to_string().contains("ask for a snapshot"), "{error}");
    assert_eq!(policy.contents(), before);
}

#[test]
fn delta_invalid_entry_is_skipped_and_the_others_applied() {
    let mut policy = compiled(
        &v(1),
        vec![
            spec("a", &["a.test"], &["a.test"]),
            spec("b", &["b.test"], &[]),
        ],
    );
    let report = policy
        .apply_delta(&delta(
            &v(1),
            &v(2),
            vec![
                // Invalid: a bad name, and a name that belongs to b.
                spec("a", &["a.test", "bad host", "b.test"], &[]),
                spec("c", &["c.test"], &[]),
                // Invalid and new: stays absent.
                spec("d", &["d.test"], &["elsewhere.test"]),
            ],
            &[],
        ))
        .expect("applies");
    assert_eq!(report.upserted, 1);
    let rejected: Vec<&str> = report.rejected.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(rejected, ["a", "d"]);
    let (_, problems) = &report.rejected[0];
    let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(paths, ["upsert[0].hostnames[1]", "upsert[0].hostnames[2]"]);
    assert!(
        problems[1]
            .message
            .contains("already belongs to site \"b\""),
        "{problems:?}"
    );
    assert_eq!(policy.version(), v(2), "the version advances");
    assert_eq!(
        policy.contents(),
        compiled(
            &v(2),
            vec![
                spec("a", &["a.test"], &["a.test"]),
                spec("b", &["b.test"], &[]),
                spec("c", &["c.test"], &[]),
            ]
        )
        .contents(),
        "a keeps its previous entry (certificate flag included), d stays absent"
    );
}

#[test]
fn delta_that_names_a_site_twice_or_is_malformed_is_refused_whole() {
    let mut policy = compiled(&v(1), vec![spec("a", &["a.test"], &[])]);
    let before = policy.contents();
    let error = policy
        .apply_delta(&delta(
            &v(1),
            &v(2),
            vec![spec("b", &["b.test"], &[])],
            &["b"],
        ))
        .expect_err("b twice");
    assert_eq!(error.problems()[0].path, "remove[0]");
    let mut bad_schema = delta(&v(1), "has space", vec![], &[]);
    bad_schema.schema = 2;
    let error = policy.apply_delta(&bad_schema).expect_err("bad schema");
    let paths: Vec<&str> = error.problems().iter().map(|p| p.path.as_str()).collect();
    assert_eq!(paths, ["schema", "version"]);
    assert_eq!(policy.contents(), before);
}

#[test]
fn delta_json_rejects_unknown_fields() {
    let json = format!(
        r#"{{"schema":1,"from":"{}","version":"{}","upsert":[],"remove":[],"settings":{{}}}}"#,
        v(1),
        v(2)
    );
    let error = serde_json::from_str::<PolicyDelta>(&json).expect_err("unknown field");
    assert!(
        error.to_string().contains("unknown field `settings`"),
        "{error}"
    );
}

/// A small deterministic generator (xorshift64*), so a failing sequence can be replayed from
/// its seed.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// Property: applying random deltas (upserts, removals, renames, names moving between sites,
/// invalid entries) gives the same policy as compiling the resulting document from scratch.
#[test]
fn deltas_applied_equal_the_snapshot_compiled_from_scratch() {
    const SITES: usize = 8;
    let pool: Vec<String> = (0..14)
        .map(|i| {
            if i % 5 == 4 {
                format!("*.w{i}.test")
            } else {
                format!("n{i}.test")
            }
        })
        .collect();
    for seed in 1..=40u64 {
        let mut random = Random(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut state: std::collections::BTreeMap<String, SiteSpec> = Default::default();
        let mut policy = compiled(&v(0), vec![]);
        for step in 1..=60u64 {
            let mut next = state.clone();
            let mut changed: Vec<String> = Vec::new();
            for _ in 0..1 + random.below(3) {
                let id = format!("s{}", random.below(SITES));
                if changed.contains(&id) {
                    continue;
                }
                changed.push(id.clone());
                if next.contains_key(&id) && random.chance(25) {
                    next.remove(&id);
                    continue;
                }
                let taken: Vec<String> = next
                    .values()
                    .filter(|s| s.id != id)
                    .flat_map(|s| s.hostnames.clone())
                    .collect();
                let mut free: Vec<&String> = pool.iter().filter(|n| !taken.contains(n)).collect();
                if free.is_empty() {
                    next.remove(&id);
                    continue;
                }
                let mut names = Vec::new();
                for _ in 0..1 + random.below(3) {
                    if free.is_empty() {
                        break;
                    }
                    names.push(free.remove(random.below(free.len())).clone());
                }
                let ready: Vec<&str> = names
                    .iter()
                    .filter(|_| random.chance(50))
                    .map(String::as_str)
                    .collect();
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                let mut spec = spec(&id, &names, &ready);
                spec.https =
                    [HttpsMode::Auto, HttpsMode::Force, HttpsMode::Disable][random.below(3)];
                spec.hsts.enabled = random.chance(30);
                next.insert(id, spec);
            }
            let mut upsert: Vec<SiteSpec> = changed
                .iter()
                .filter_map(|id| next.get(id).cloned())
                .collect();
            let remove: Vec<&str> = changed
                .iter()
                .filter(|id| state.contains_key(*id) && !next.contains_key(*id))
                .map(String::as_str)
                .collect();
            // Sometimes an invalid entry for a site this delta leaves alone: it keeps its
            // previous entry, and the others are applied.
            let untouched: Vec<String> = next
                .keys()
                .filter(|id| !changed.contains(id))
                .cloned()
                .collect();
            let mut expect_rejected = None;
            if !untouched.is_empty() && random.chance(30) {
                let id = untouched[random.below(untouched.len())].clone();
                let mut bad = next[&id].clone();
                bad.hostnames.push("not a host".into());
                upsert.push(bad);
                expect_rejected = Some(id);
            }
            if random.chance(50) {
                upsert.reverse();
            }
            let report = policy
                .apply_delta(&delta(&v(step - 1), &v(step), upsert, &remove))
                .unwrap_or_else(|e| panic!("seed {seed} step {step}: {e}"));
            let rejected: Vec<String> = report.rejected.iter().map(|(id, _)| id.clone()).collect();
            assert_eq!(
                rejected,
                expect_rejected.into_iter().collect::<Vec<_>>(),
                "seed {seed} step {step}"
            );
            state = next;
            let scratch = compiled(&v(step), state.values().cloned().collect());
            assert_eq!(
                policy.contents(),
                scratch.contents(),
                "seed {seed} step {step}: delta-applied policy differs from the snapshot"
            );
            for name in &pool {
                let host = name.replace('*', "x");
                let id_of = |p: &Policy| {
                    p.lookup(&host)
                        .map(|(s, ready)| (p.site(s).map(|s| s.id().to_string()), ready))
                };
                assert_eq!(
                    id_of(&policy),
                    id_of(&scratch),
                    "seed {seed} step {step}: {host}"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The compact snapshot

/// The test policy (every field used) as a document.
fn full_document() -> PolicyDocument {
    serde_json::from_str(&policy_json(8080, 8443)).expect("test policy parses")
}

fn encode(document: &PolicyDocument) -> Vec<u8> {
    compact::encode_snapshot(&document.version, &document.settings, &document.sites)
        .expect("the document encodes")
}

#[test]
fn compact_snapshot_compiles_to_the_same_policy_as_json() {
    let document = full_document();
    let from_json = Policy::compile(&document).expect("valid");
    let from_compact = Policy::from_compact(encode(&document)).expect("valid");
    assert_eq!(from_compact.contents(), from_json.contents());
    assert_eq!(from_compact.trusted_proxies, from_json.trusted_proxies);
    assert_eq!(
        (from_compact.http_port, from_compact.https_port),
        (8080, 8443)
    );
    for case in cases() {
        assert_eq!(
            run(&from_compact, &case),
            run(&from_json, &case),
            "{}",
            case.name
        );
    }
}

/// Sites that fail validation are reported exactly as in JSON (the compact form is checked
/// by the same rules: another control plane may produce it).
#[test]
fn compact_snapshot_is_validated_like_json() {
    let mut document = full_document();
    document.sites[1].hostnames.push("not a host".into());
    document.sites[2].id = "bad id".into();
    document.sites[3].hostnames = document.sites[0].hostnames.clone();
    document.sites[3].cert_ready.clear();
    document.sites[4].report_uri = Some("javascript:x".into());
    document.sites[5].hsts.preload = true;
    document.settings.trusted_proxies.push("10.0.0.0/99".into());
    document.version = "has space".into();
    let json = Policy::compile(&document).expect_err("invalid");
    let compact = Policy::from_compact(encode(&document)).expect_err("invalid");
    assert_eq!(compact.problems(), json.problems());
    assert!(compact.problems().len() >= 7, "{compact}");
}

/// A compact snapshot's site is built in one pass when every part of it is in normal form and
/// free; any other goes through the full checks. Either way the result is JSON's: the same
/// policy for names written in other forms, the same problems (and `sites[i]` in them) for
/// what only the tables find.
#[test]
fn compact_sites_in_other_forms_or_taken_match_json() {
    let mut document = full_document();
    document.sites[0].hostnames = vec!["Force.TEST".into(), "www.force.test.".into()];
    document.sites[0].cert_ready = document.sites[0].hostnames.clone();
    document.sites[2].canonical_host = Some("WWW.Canon.Test".into());
    document.sites[6].hostnames = vec!["wild.test".into(), "*.WILD.test".into()];
    document.sites[6].cert_ready = vec!["*.WILD.test".into()];
    let from_json = Policy::compile(&document).expect("valid");
    let from_compact = Policy::from_compact(encode(&document)).expect("valid");
    assert_eq!(from_compact.contents(), from_json.contents());

    let mut document = full_document();
    document.sites[4].id = "forced".into();
    document.sites[5].hostnames.push("off.test".into());
    document.sites[6].hostnames.push("plain.test".into());
    document.sites[7].canonical_host = Some("elsewhere.test".into());
    let json = Policy::compile(&document).expect_err("invalid");
    let compact = Policy::from_compact(encode(&document)).expect_err("invalid");
    assert_eq!(compact.problems(), json.problems());
    let paths: Vec<&str> = compact.problems().iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "sites[4].id",
            "sites[5].hostnames[1]",
            "sites[6].hostnames[2]",
            "sites[7].canonical_host"
        ],
        "{compact}"
    );
}

/// The one-pass build takes the sites a platform's feed sends (the common case), and leaves
/// every other to the full checks with the policy as it was.
#[test]
fn normal_sites_take_the_one_pass_build() {
    let document = full_document();
    let mut policy = Policy::empty();
    let mut scratch = compile::Scratch::default();
    let ready = |spec: &SiteSpec| -> Vec<bool> {
        spec.hostnames
            .iter()
            .map(|name| spec.cert_ready.contains(name))
            .collect()
    };
    for spec in &document.sites {
        let mut entry = spec.as_entry();
        entry.cert_ready.clear();
        assert!(
            policy.add_normal_site(&entry, &ready(spec), &mut scratch),
            "{}",
            spec.id
        );
    }
    let expected = Policy::compile(&document).expect("valid").contents();
    let mut built = policy.contents();
    built.version = expected.version.clone();
    assert_eq!(built, expected);

    let before = policy.contents();
    let mut refused = Vec::new();
    let base = SiteSpec {
        id: "new".into(),
        hostnames: vec!["new.test".into()],
        ..document.sites[4].clone()
    };
    type Change = fn(&mut SiteSpec);
    let variants: [(&str, Change); 9] = [
        ("upper case", |s| s.hostnames[0] = "New.test".into()),
        ("trailing dot", |s| s.hostnames[0] = "new.test.".into()),
        ("no hostname", |s| s.hostnames.clear()),
        ("bad id", |s| s.id = "new id".into()),
        ("taken id", |s| s.id = "forced".into()),
        ("taken name", |s| s.hostnames.push("force.test".into())),
        ("listed twice", |s| s.hostnames.push("new.test".into())),
        ("canonical not listed", |s| {
            s.canonical_host = Some("x.test".into())
        }),
        ("bad report token", |s| {
            s.report_token = Some("short".into())
        }),
    ];
    for (what, change) in variants {
        let mut spec = base.clone();
        change(&mut spec);
        let mut entry = spec.as_entry();
        entry.cert_ready.clear();
        if policy.add_normal_site(&entry, &ready(&spec), &mut scratch) {
            refused.push(what);
        }
        assert_eq!(policy.contents(), before, "{what}: the policy is as it was");
    }
    assert!(refused.is_empty(), "taken in one pass: {refused:?}");
}

/// Built in slices of any size, the policy is the same; until `finish`, nothing replaces the
/// policy held (the build owns its own tables).
#[test]
fn compact_snapshot_built_in_slices_equals_built_at_once() {
    let mut document = full_document();
    for i in 0..300 {
        document
            .sites
            .push(spec(&format!("x{i}"), &[&format!("x{i}.test")], &[]));
    }
    let body = encode(&document);
    let whole = Policy::from_compact(body.clone())
        .expect("valid")
        .contents();
    for slice in [1, 2, 7, 64, 1000] {
        let mut build = SnapshotBuild::new(body.clone()).expect("header");
        assert_eq!(build.version(), "v-test");
        assert_eq!(build.site_count() as usize, document.sites.len());
        let mut steps = 0;
        while !build.is_done() {
            build.step(slice).expect("well formed");
            steps += 1;
            assert_eq!(
                build.sites_done() as usize,
                (steps * slice as usize).min(document.sites.len())
            );
        }
        assert_eq!(
            build.finish().expect("valid").contents(),
            whole,
            "slice {slice}"
        );
    }
}

/// Every truncation, and random corruption, is refused with a problem, never a panic; a body
/// whose counts disagree with what follows, or with bytes after the last site, is refused.
#[test]
fn corrupted_compact_snapshots_are_refused_without_panicking() {
    let body = encode(&full_document());
    for len in 0..body.len() {
        let error = Policy::from_compact(body[..len].to_vec()).expect_err("truncated");
        assert!(!error.problems().is_empty(), "{len}");
    }
    let mut longer = body.clone();
    longer.push(0);
    let error = Policy::from_compact(longer).expect_err("trailing byte");
    assert!(error.to_string().contains("after the last site"), "{error}");
    // The site count: the last 8 bytes of the header, before the first site.
    let header = PolicyDocument {
        sites: vec![],
        ..full_document()
    };
    let counts_at = encode(&header).len() - 8;
    for delta in [1i64, -1] {
        let mut wrong = body.clone();
        let count = u32::from_le_bytes(wrong[counts_at..counts_at + 4].try_into().unwrap());
        let count = (i64::from(count) + delta) as u32;
        wrong[counts_at..counts_at + 4].copy_from_slice(&count.to_le_bytes());
        assert!(Policy::from_compact(wrong).is_err(), "count {delta:+}");
    }
    let mut random = Random(0x5eed_1234_5678_9abd);
    for _ in 0..3000 {
        let mut bad = body.clone();
        for _ in 0..1 + random.below(4) {
            let at = random.below(bad.len());
            bad[at] = random.next() as u8;
        }
        if bad != body {
            // Either refused, or a valid policy (a flipped byte inside a name can still be a
            // valid name): what matters is no panic and no half-built policy.
            let _ = Policy::from_compact(bad);
        }
    }
    for len in 0..200 {
        let noise: Vec<u8> = (0..len).map(|_| random.next() as u8).collect();
        assert!(Policy::from_compact(noise).is_err());
    }
    let mut huge = body[..5].to_vec();
    huge.extend_from_slice(&[1, 0, 0, 0, 1, b'v', 80, 0, 187, 1, 0, 0]);
    huge.extend_from_slice(&[0xff; 8]);
    assert!(
        Policy::from_compact(huge).is_err(),
        "a count of 2^32-1 sites over an empty body is refused without reserving for them"
    );
}

/// What the format cannot carry is an encoding error naming the site, not a lossy encoding.
#[test]
fn compact_encoder_refuses_what_it_cannot_carry() {
    let mut stray = spec("a", &["a.test"], &["b.test"]);
    let error = compact::encode_snapshot("v", &Settings::default(), [&stray]).expect_err("stray");
    assert!(
        error.contains("\"a\"") && error.contains("b.test"),
        "{error}"
    );
    stray.cert_ready.clear();
    stray.canonical_host = Some(String::new());
    assert!(compact::encode_snapshot("v", &Settings::default(), [&stray]).is_err());
    let long = spec("a", &[&"x".repeat(256)], &[]);
    assert!(compact::encode_snapshot("v", &Settings::default(), [&long]).is_err());
}
