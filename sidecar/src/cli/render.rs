//! How the CLI prints the admin API's answers for people (`--json` prints them as they are).

use std::fmt::Write as _;

use serde_json::{Value, json};

fn text(value: &Value) -> &str {
    value.as_str().unwrap_or("")
}

fn hostnames(site: &Value) -> Vec<String> {
    site["hostnames"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|h| format!("{} ({})", text(&h["name"]), text(&h["kind"])))
        .collect()
}

/// A site: names and the whole policy.
pub fn site(site: &Value) -> String {
    let policy = &site["policy"];
    let hsts = &policy["hsts"];
    let hsts_text = if hsts["enabled"].as_bool().unwrap_or(false) {
        let mut words = format!("on, max-age {}", hsts["max_age"]);
        if hsts["include_subdomains"].as_bool().unwrap_or(false) {
            words.push_str(", includeSubDomains");
        }
        if hsts["preload"].as_bool().unwrap_or(false) {
            words.push_str(", preload");
        }
        words
    } else {
        "off".into()
    };
    format!(
        "site {}\n  hostnames:     {}\n  https:         {} (redirects {})\n  canonical:     {}\n  hsts:          {hsts_text}\n  mixed content: {}",
        text(&site["name"]),
        hostnames(site).join(", "),
        text(&policy["https"]),
        text(&policy["redirect"]),
        policy["canonical_host"].as_str().unwrap_or("none"),
        text(&policy["mixed_content"]),
    )
}

/// One site's certificate state for `site list`: `ok` (every name covered), `partial`,
/// `failing` (the last attempt failed), `pending` (nothing issued yet), with the soonest expiry.
pub fn certificate_summary(status: &Value) -> Value {
    let certificates = status["certificates"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let uncovered = status["uncovered"].as_array().map_or(0, Vec::len);
    let failing = status["issuance"]["failures"].as_u64().unwrap_or(0) > 0;
    let state = match (certificates.is_empty(), uncovered, failing) {
        (_, _, true) => "failing",
        (true, _, false) => "pending",
        (false, 0, false) => "ok",
        (false, _, false) => "partial",
    };
    // RFC 3339 timestamps in one offset (UTC) sort as text.
    let soonest = certificates
        .iter()
        .filter_map(|c| c["not_after"].as_str())
        .min()
        .map(str::to_owned);
    json!({ "state": state, "soonest_expiry": soonest, "uncovered": uncovered })
}

/// `site list`.
pub fn site_list(sites: &Value) -> String {
    let rows: Vec<&Value> = sites.as_array().into_iter().flatten().collect();
    if rows.is_empty() {
        return "no sites; add one with `autohttps site add <name> <domain>`".into();
    }
    let mut out = format!(
        "{:<20} {:<8} {:<8} {:<21} {}\n",
        "SITE", "HTTPS", "CERT", "EXPIRES", "HOSTNAMES"
    );
    for site in rows {
        let summary = &site["certificate"];
        let _ = writeln!(
            out,
            "{:<20} {:<8} {:<8} {:<21} {}",
            text(&site["name"]),
            text(&site["policy"]["https"]),
            text(&summary["state"]),
            summary["soonest_expiry"].as_str().unwrap_or("-"),
            hostnames(site).join(", ")
        );
    }
    out.trim_end().to_owned()
}

/// A site's certificates, what they do not cover yet and the issuance schedule.
pub fn certificates(status: &Value) -> String {
    let mut out = String::new();
    for certificate in status["certificates"].as_array().into_iter().flatten() {
        let names: Vec<&str> = certificate["names"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let _ = writeln!(
            out,
            "certificate {} valid until {} for {}",
            text(&certificate["serial"]),
            text(&certificate["not_after"]),
            names.join(", ")
        );
    }
    let uncovered: Vec<&str> = status["uncovered"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if !uncovered.is_empty() {
        let _ = writeln!(out, "not covered yet: {}", uncovered.join(", "));
    }
    if let Some(problem) = status["issuance"]["last_problem"].as_str() {
        let _ = writeln!(out, "last problem: {problem}");
    }
    if let Some(next) = status["issuance"]["next_attempt_at"].as_str() {
        let _ = writeln!(out, "next attempt: {next}");
    }
    out
}

/// `site show`: the site, its certificates and recent events.
pub fn site_details(all: &Value) -> String {
    let mut out = site(&all["site"]);
    out.push('\n');
    if let Some(rejected) = all["site"]["policy_rejected"].as_object() {
        let served = if rejected["previous_kept"].as_bool() == Some(true) {
            "the edge keeps its previous good entry"
        } else {
            "the edge does not know the site's names"
        };
        let _ = writeln!(
            out,
            "policy: REJECTED by the filter's validation ({served}); fix the site:"
        );
        for problem in rejected["problems"].as_array().into_iter().flatten() {
            let _ = writeln!(out, "  {}", text(problem));
        }
    }
    out.push_str(&certificates(&all["certificates"]));
    out.push_str("recent events:\n");
    for event in all["events"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  {} {:<20} {}",
            text(&event["at"]),
            text(&event["kind"]),
            text(&event["message"])
        );
    }
    out.trim_end().to_owned()
}

/// `site mixed-content`.
pub fn mixed_content(name: &str, findings: &Value) -> String {
    let list = findings.as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        return format!(
            "no mixed content reported for {name} (reports arrive while the site's mixed_content is \"report\" and browsers load its pages over HTTPS)"
        );
    }
    let mut out = format!("pages of {name} that load insecure resources:\n");
    let mut page = "";
    for finding in &list {
        let this_page = text(&finding["page"]);
        if this_page != page {
            let _ = writeln!(out, "  {this_page}");
            page = this_page;
        }
        let _ = writeln!(
            out,
            "    {} ({}, {} report(s), last {})",
            text(&finding["resource"]),
            text(&finding["directive"]),
            finding["reports"],
            text(&finding["last_seen"])
        );
    }
    out.push_str("fix: load these over https:// (or switch the site to mixed_content \"upgrade\")");
    out
}

/// `diagnose`.
pub fn diagnosis(d: &Value) -> String {
    let addresses: Vec<&str> = d["dns"]["addresses"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let mut out = format!(
        "{}: {}\n  site: {}\n  dns: {} (platform: {})\n",
        text(&d["hostname"]),
        text(&d["verdict"]),
        text(&d["site"]),
        if addresses.is_empty() {
            "no addresses".to_owned()
        } else {
            addresses.join(", ")
        },
        text(&d["platform"])
    );
    match d["certificate"].as_object() {
        Some(c) => {
            let _ = writeln!(
                out,
                "  certificate: {} expires {}",
                c["serial"].as_str().unwrap_or(""),
                c["not_after"].as_str().unwrap_or("")
            );
        }
        None => out.push_str("  certificate: none covers this name\n"),
    }
    if let Some(problem) = d["last_problem"].as_str() {
        let _ = writeln!(out, "  last problem: {problem}");
    }
    let _ = write!(out, "  fix: {}", text(&d["fix"]));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_summary_names_the_state_and_soonest_expiry() {
        let status = json!({
            "certificates": [
                { "not_after": "2027-03-01T00:00:00Z" },
                { "not_after": "2027-02-01T00:00:00Z" }
            ],
            "uncovered": [],
            "issuance": { "failures": 0 }
        });
        let summary = certificate_summary(&status);
        assert_eq!(summary["state"], "ok");
        assert_eq!(summary["soonest_expiry"], "2027-02-01T00:00:00Z");
        let failing =
            json!({ "certificates": [], "uncovered": ["a.test"], "issuance": { "failures": 2 } });
        assert_eq!(certificate_summary(&failing)["state"], "failing");
        let pending =
            json!({ "certificates": [], "uncovered": ["a.test"], "issuance": { "failures": 0 } });
        assert_eq!(certificate_summary(&pending)["state"], "pending");
    }

    #[test]
    fn site_show_names_a_rejected_policy_entry_and_its_problems() {
        let shown = |rejected: Value| {
            site_details(&json!({
                "site": {
                    "name": "shop",
                    "hostnames": [],
                    "policy": {},
                    "issuance": {},
                    "policy_rejected": rejected
                },
                "certificates": { "certificates": [] },
                "events": []
            }))
        };
        let fine = shown(Value::Null);
        assert!(!fine.contains("REJECTED"), "{fine}");
        let rejected = shown(json!({
            "site": "shop",
            "problems": ["hostnames[1]: not a valid name", "cert_ready[0]: not a name of the site"],
            "previous_kept": true
        }));
        assert!(
            rejected.contains("policy: REJECTED by the filter's validation (the edge keeps its previous good entry)"),
            "{rejected}"
        );
        assert!(
            rejected.contains("  hostnames[1]: not a valid name\n"),
            "{rejected}"
        );
        assert!(
            rejected.contains("  cert_ready[0]: not a name of the site"),
            "{rejected}"
        );
    }
}
