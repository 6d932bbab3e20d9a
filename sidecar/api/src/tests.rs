//! The golden answers the sidecar's `admin_contract` test recorded from the real server, read
//! back through the contract's types: each must parse and serialise to the same JSON, so a
//! type here cannot drift from what the server sends.

use std::path::PathBuf;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::*;

fn golden(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/golden/admin_api")
        .join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read golden answer {}: {e}", path.display()));
    serde_json::from_str(&text).expect("golden answers are JSON")
}

/// Parses `value` as `T` and writes it back: the result must be the same JSON.
fn round_trips<T: Serialize + DeserializeOwned>(what: &str, value: &Value) {
    let typed: T = serde_json::from_value(value.clone()).unwrap_or_else(|e| {
        panic!(
            "{what} does not parse as {}: {e}",
            std::any::type_name::<T>()
        )
    });
    let back = serde_json::to_value(&typed).expect("serialises");
    assert_eq!(&back, value, "{what} changed on a round trip");
}

#[test]
fn every_golden_answer_round_trips_through_its_type() {
    let body = |name: &str| golden(name)["body"].clone();
    round_trips::<Health>("healthz", &body("healthz"));
    for name in [
        "create_site",
        "add_hostname",
        "remove_hostname",
        "update_site",
    ] {
        round_trips::<Site>(name, &body(name));
    }
    round_trips::<SiteDetail>("show_site", &body("show_site"));
    round_trips::<Vec<Site>>("list_sites", &body("list_sites"));
    round_trips::<CertificateStatus>("certificate_status", &body("certificate_status"));
    round_trips::<Vec<Event>>("site_events", &body("site_events"));
    round_trips::<Vec<MixedContentFinding>>("site_mixed_content", &body("site_mixed_content"));
    for name in [
        "diagnose_in_progress",
        "diagnose_covered",
        "diagnose_not_in_certificate",
    ] {
        round_trips::<Diagnosis>(name, &body(name));
    }
    round_trips::<RegenerateAccepted>("regenerate", &body("regenerate"));
    for name in [
        "error_unauthorized",
        "error_no_such_route",
        "error_no_such_site",
        "error_bad_hostname",
        "error_unknown_field",
        "error_bad_query",
        "error_method_not_allowed",
        "error_conflict",
    ] {
        round_trips::<ErrorBody>(name, &body(name));
    }
}

#[test]
fn every_golden_request_body_round_trips_through_its_type() {
    let request = |name: &str| golden(name)["request_body"].clone();
    // The create request leaves `redirect` out: the type fills in the default.
    let create: CreateSite = serde_json::from_value(request("create_site")).expect("parses");
    assert_eq!(create.https, HttpsMode::Force);
    assert_eq!(create.redirect, RedirectKind::Permanent);
    assert_eq!(create.hostnames, ["www.shop.test"]);
    assert_eq!(create.canonical_host.as_deref(), Some("www.shop.test"));
    assert_eq!(
        create.hsts.map(|h| (h.enabled, h.preload)),
        Some((true, false))
    );
    round_trips::<AddHostname>("add_hostname request", &request("add_hostname"));
    round_trips::<UpdateSite>("update_site request", &request("update_site"));
}

#[test]
fn an_update_tells_absent_from_null() {
    let absent: UpdateSite = serde_json::from_str("{}").expect("parses");
    assert_eq!(absent.canonical_host, None);
    let null: UpdateSite = serde_json::from_str(r#"{"canonical_host": null}"#).expect("parses");
    assert_eq!(null.canonical_host, Some(None));
    assert_eq!(
        serde_json::to_string(&null).expect("serialises"),
        r#"{"canonical_host":null}"#
    );
    assert_eq!(serde_json::to_string(&absent).expect("serialises"), "{}");
}

#[test]
fn unknown_request_fields_are_refused() {
    let error = serde_json::from_str::<UpdateSite>(r#"{"htps": "force"}"#).unwrap_err();
    assert!(
        error.to_string().contains("unknown field `htps`"),
        "{error}"
    );
    assert!(
        serde_json::from_str::<CreateSite>(r#"{"name":"a","primary":"a.test","x":1}"#).is_err()
    );
}

#[test]
fn the_overview_names_the_state_and_soonest_expiry() {
    let mut status: CertificateStatus =
        serde_json::from_value(golden("certificate_status")["body"].clone()).expect("parses");
    assert_eq!(status.overview().state, CertificateState::Failing);
    status.issuance.failures = 0;
    let overview = status.overview();
    assert_eq!(overview.state, CertificateState::Partial);
    assert_eq!(overview.uncovered, 1);
    let mut later = status.certificates[0].clone();
    later.not_after += time::Duration::days(30);
    status.certificates.insert(0, later);
    assert_eq!(
        status.overview().soonest_expiry,
        Some(time::macros::datetime!(2026-05-30 11:00:00 UTC))
    );
    status.uncovered.clear();
    assert_eq!(status.overview().state, CertificateState::Ok);
    status.certificates.clear();
    assert_eq!(status.overview().state, CertificateState::Pending);
}
