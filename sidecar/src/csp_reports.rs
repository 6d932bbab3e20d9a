//! Mixed-content reports: sites in `report` mode send browsers a report-only CSP whose
//! `report-uri` is [`REPORT_PATH`] on the site's own host; Envoy routes it here, and each
//! report is filed under the site and page, so the operator can tell a customer exactly which
//! `http://` resources a page loads (`GET /v1/sites/{site}/mixed-content`).
//!
//! Both report formats browsers send are read: `application/csp-report` (CSP Level 2,
//! `report-uri`) and `application/reports+json` (the Reporting API). Anyone can post here, so
//! a report counts only for the site whose name is in the request's `Host` and in the page
//! URL, bodies are capped at [`MAX_REPORT_BYTES`], and the store keeps a bounded number of
//! findings per site.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::Value;

use crate::clock::Clock;
use crate::hostname::Hostname;
use crate::store::Store;

/// Where browsers send reports (the filter's default `report-uri`).
pub const REPORT_PATH: &str = autohttps_filter::policy::DEFAULT_REPORT_URI;

/// The largest report body read.
pub const MAX_REPORT_BYTES: usize = 64 * 1024;

/// The longest page or resource URL kept.
const MAX_URL_LEN: usize = 2048;

/// One violation from a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The page, without query or fragment.
    pub page: String,
    /// What was blocked.
    pub resource: String,
    /// The directive it fell under.
    pub directive: String,
}

/// Reads the violations out of a report body, in either format. Entries that are not CSP
/// violations, or lack a page or resource, are skipped.
pub fn parse_report(body: &[u8]) -> Vec<Violation> {
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return Vec::new();
    };
    let mut violations = Vec::new();
    let mut push = |page: Option<&str>, resource: Option<&str>, directive: Option<&str>| {
        if let (Some(page), Some(resource)) = (page, resource)
            && !page.is_empty()
            && !resource.is_empty()
        {
            violations.push(Violation {
                page: clip(strip_query(page)),
                resource: clip(resource),
                directive: clip(directive.unwrap_or("")),
            });
        }
    };
    match &value {
        // CSP Level 2: {"csp-report": {"document-uri": …, "blocked-uri": …}}
        Value::Object(object) => {
            if let Some(report) = object.get("csp-report") {
                let field = |name: &str| report.get(name).and_then(Value::as_str);
                push(
                    field("document-uri"),
                    field("blocked-uri"),
                    field("effective-directive").or(field("violated-directive")),
                );
            }
        }
        // Reporting API: [{"type": "csp-violation", "body": {"documentURL": …, "blockedURL": …}}]
        Value::Array(reports) => {
            for report in reports {
                if report.get("type").and_then(Value::as_str) != Some("csp-violation") {
                    continue;
                }
                let Some(body) = report.get("body") else {
                    continue;
                };
                let field = |name: &str| body.get(name).and_then(Value::as_str);
                push(
                    field("documentURL"),
                    field("blockedURL"),
                    field("effectiveDirective"),
                );
            }
        }
        _ => {}
    }
    violations
}

fn strip_query(url: &str) -> &str {
    let end = url.find(['?', '#']).unwrap_or(url.len());
    &url[..end]
}

fn clip(text: &str) -> String {
    let mut end = text.len().min(MAX_URL_LEN);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].chars().filter(|c| !c.is_control()).collect()
}

/// The host of an `http(s)://host[:port]/…` URL.
fn url_host(url: &str) -> Option<&str> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    Some(host.split(':').next().unwrap_or(host))
}

#[derive(Clone)]
struct Reports {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
}

/// The route for the internal listener.
pub fn router(store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Router {
    Router::new()
        .route(REPORT_PATH, post(receive))
        .layer(DefaultBodyLimit::max(MAX_REPORT_BYTES))
        .with_state(Reports { store, clock })
}

async fn receive(State(reports): State<Reports>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(host) = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(|h| h.split(':').next().unwrap_or(h).to_owned())
    else {
        return (StatusCode::BAD_REQUEST, "a report needs a Host header\n").into_response();
    };
    let result = tokio::task::spawn_blocking(move || file_report(&reports, &host, &body)).await;
    match result {
        Ok(Ok(_recorded)) => StatusCode::NO_CONTENT.into_response(),
        Ok(Err(ReportRefused(status, message))) => (status, message).into_response(),
        Err(join) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("filing the report failed: {join}\n"),
        )
            .into_response(),
    }
}

struct ReportRefused(StatusCode, String);

/// Files a report sent to `host`; returns how many violations were recorded.
fn file_report(reports: &Reports, host: &str, body: &[u8]) -> Result<usize, ReportRefused> {
    let name = Hostname::parse(host)
        .map_err(|e| ReportRefused(StatusCode::BAD_REQUEST, format!("{e}\n")))?;
    let site = reports
        .store
        .site_of_hostname(&name)
        .map_err(|e| ReportRefused(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")))?
        .ok_or_else(|| {
            ReportRefused(
                StatusCode::NOT_FOUND,
                format!("{name} is not a name of any site\n"),
            )
        })?;
    let now = reports.clock.now();
    let mut recorded = 0;
    for violation in parse_report(body) {
        // The page must be on this site's name: one site cannot file reports for another.
        let page_host = url_host(&violation.page).and_then(|h| Hostname::parse(h).ok());
        if page_host.as_ref() != Some(&name) {
            continue;
        }
        match reports.store.record_mixed_content(
            &site,
            &violation.page,
            &violation.resource,
            &violation.directive,
            now,
        ) {
            Ok(true) => recorded += 1,
            Ok(false) => {
                tracing::warn!(
                    site,
                    "mixed-content findings are full for this site; report dropped"
                );
                break;
            }
            Err(error) => {
                return Err(ReportRefused(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("{error}\n"),
                ));
            }
        }
    }
    Ok(recorded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csp_level_2_report_is_read() {
        let body = br#"{"csp-report": {"document-uri": "https://shop.example/cart?id=7#top",
            "blocked-uri": "http://cdn.example/logo.png", "violated-directive": "img-src",
            "effective-directive": "img-src", "original-policy": "default-src https:"}}"#;
        assert_eq!(
            parse_report(body),
            vec![Violation {
                page: "https://shop.example/cart".into(),
                resource: "http://cdn.example/logo.png".into(),
                directive: "img-src".into(),
            }]
        );
    }

    #[test]
    fn reporting_api_batch_is_read_and_other_types_skipped() {
        let body = br#"[
            {"type": "csp-violation", "url": "https://a.example/", "body": {
                "documentURL": "https://a.example/", "blockedURL": "http://x.example/a.js",
                "effectiveDirective": "script-src-elem"}},
            {"type": "deprecation", "body": {"id": "x"}},
            {"type": "csp-violation", "body": {"documentURL": "https://a.example/b",
                "blockedURL": "http://x.example/b.css", "effectiveDirective": "style-src-elem"}}
        ]"#;
        let found = parse_report(body);
        assert_eq!(found.len(), 2);
        assert_eq!(found[1].page, "https://a.example/b");
        assert_eq!(found[1].directive, "style-src-elem");
    }

    #[test]
    fn garbage_and_incomplete_reports_yield_nothing() {
        for body in [
            &b"not json"[..],
            br#"{"csp-report": {"document-uri": "https://a.example/"}}"#,
            br#"{"something": 1}"#,
            br#"[{"type": "csp-violation"}]"#,
            br#"42"#,
        ] {
            assert!(
                parse_report(body).is_empty(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn long_urls_are_clipped_and_control_characters_dropped() {
        let long = format!("http://x.example/{}", "a".repeat(5000));
        let body = serde_json::json!({"csp-report": {
            "document-uri": "https://a.example/\u{0007}page", "blocked-uri": long}})
        .to_string();
        let found = parse_report(body.as_bytes());
        assert_eq!(found[0].resource.len(), MAX_URL_LEN);
        assert_eq!(found[0].page, "https://a.example/page");
    }

    fn reports_over_a_real_store() -> (Reports, tempfile::TempDir) {
        use crate::clock::ManualClock;
        use crate::store::{NewSite, SitePolicy, SqliteStore};
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(&dir.path().join("autohttps.db")).expect("store"));
        let now = time::OffsetDateTime::from_unix_timestamp(1_800_000_000).expect("time");
        for (name, primary, extra) in [
            ("shop", "shop.example", "www.shop.example"),
            ("other", "other.example", "www.other.example"),
        ] {
            store
                .create_site(
                    NewSite {
                        name: name.into(),
                        primary: Hostname::parse(primary).expect("name"),
                        hostnames: vec![Hostname::parse(extra).expect("name")],
                        policy: SitePolicy::default(),
                    },
                    now,
                    now,
                )
                .expect("site");
        }
        let reports = Reports {
            store,
            clock: Arc::new(ManualClock::new(now)),
        };
        (reports, dir)
    }

    fn report(page: &str, resource: &str) -> Vec<u8> {
        serde_json::json!({"csp-report": {"document-uri": page, "blocked-uri": resource,
            "effective-directive": "img-src"}})
        .to_string()
        .into_bytes()
    }

    #[test]
    fn reports_are_filed_per_site_and_page_and_counted() {
        let (reports, _dir) = reports_over_a_real_store();
        let body = report(
            "https://www.shop.example/cart?x=1",
            "http://cdn.example/a.png",
        );
        for _ in 0..3 {
            assert_eq!(
                file_report(&reports, "www.shop.example", &body).ok(),
                Some(1)
            );
        }
        let other = report("https://shop.example/", "http://cdn.example/b.js");
        assert_eq!(file_report(&reports, "Shop.Example.", &other).ok(), Some(1));
        let findings = reports.store.mixed_content("shop").expect("findings");
        assert_eq!(findings.len(), 2);
        let cart = findings
            .iter()
            .find(|f| f.page == "https://www.shop.example/cart")
            .expect("cart page");
        assert_eq!(cart.reports, 3);
        assert_eq!(cart.resource, "http://cdn.example/a.png");
        assert!(
            reports
                .store
                .mixed_content("other")
                .expect("none")
                .is_empty()
        );
    }

    #[test]
    fn a_report_about_another_sites_page_is_ignored() {
        let (reports, _dir) = reports_over_a_real_store();
        let body = report("https://other.example/", "http://evil.example/x.png");
        assert_eq!(file_report(&reports, "shop.example", &body).ok(), Some(0));
        assert!(
            reports
                .store
                .mixed_content("shop")
                .expect("none")
                .is_empty()
        );
        assert!(
            reports
                .store
                .mixed_content("other")
                .expect("none")
                .is_empty()
        );
    }

    #[test]
    fn a_report_for_an_unknown_host_is_refused() {
        let (reports, _dir) = reports_over_a_real_store();
        let body = report("https://nobody.example/", "http://x.example/");
        let Err(ReportRefused(status, message)) = file_report(&reports, "nobody.example", &body)
        else {
            panic!("accepted a report for an unknown host");
        };
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(message.contains("not a name of any site"), "{message}");
    }

    #[test]
    fn findings_per_site_are_capped() {
        let (reports, _dir) = reports_over_a_real_store();
        for i in 0..crate::store::MAX_MIXED_CONTENT_FINDINGS {
            let body = report(
                "https://shop.example/",
                &format!("http://cdn.example/{i}.png"),
            );
            assert_eq!(file_report(&reports, "shop.example", &body).ok(), Some(1));
        }
        let one_more = report("https://shop.example/", "http://cdn.example/overflow.png");
        assert_eq!(
            file_report(&reports, "shop.example", &one_more).ok(),
            Some(0)
        );
        // A pair already known is still counted.
        let known = report("https://shop.example/", "http://cdn.example/0.png");
        assert_eq!(file_report(&reports, "shop.example", &known).ok(), Some(1));
        let findings = reports.store.mixed_content("shop").expect("findings");
        assert_eq!(findings.len(), crate::store::MAX_MIXED_CONTENT_FINDINGS);
    }

    #[test]
    fn removing_a_site_removes_its_findings() {
        let (reports, _dir) = reports_over_a_real_store();
        let body = report("https://shop.example/", "http://cdn.example/a.png");
        assert_eq!(file_report(&reports, "shop.example", &body).ok(), Some(1));
        reports.store.delete_site("shop").expect("delete");
        assert!(
            reports
                .store
                .mixed_content("shop")
                .expect("none")
                .is_empty()
        );
    }

    #[test]
    fn url_host_reads_the_authority() {
        assert_eq!(url_host("https://a.example:8443/x"), Some("a.example"));
        assert_eq!(url_host("http://user@b.example/"), Some("b.example"));
        assert_eq!(url_host("ftp://c.example/"), None);
    }
}
