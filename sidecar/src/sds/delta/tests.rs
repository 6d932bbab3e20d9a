//! Unit tests of the delta secrets state machine.

use envoy_types::pb::google::rpc::Status;

use super::*;
use crate::sds::test_resolver::MapResolver;

fn stream() -> DeltaStream {
    DeltaStream::new(Nonces::new("test".into()))
}

fn subscribe(names: &[&str]) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: SECRET_TYPE_URL.to_owned(),
        resource_names_subscribe: names.iter().map(|n| n.to_string()).collect(),
        ..DeltaDiscoveryRequest::default()
    }
}

fn ack(nonce: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: SECRET_TYPE_URL.to_owned(),
        response_nonce: nonce.to_owned(),
        ..DeltaDiscoveryRequest::default()
    }
}

fn nack(nonce: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        error_detail: Some(Status {
            code: 3,
            message: "bad certificate".to_owned(),
            details: Vec::new(),
        }),
        ..ack(nonce)
    }
}

fn served(response: &DeltaDiscoveryResponse) -> Vec<(String, String)> {
    response
        .resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect()
}

fn pair(name: &str, version: &str) -> (String, String) {
    (name.to_owned(), version.to_owned())
}

#[test]
fn known_name_is_sent_with_its_version() {
    let mut resolver = MapResolver::default();
    resolver.set("a.example.test", "1");
    let response = stream()
        .on_request(&subscribe(&["a.example.test"]), &resolver)
        .expect("a response");
    assert_eq!(served(&response), vec![pair("a.example.test", "1")]);
    assert!(response.removed_resources.is_empty());
    assert_eq!(response.type_url, SECRET_TYPE_URL);
    assert!(!response.nonce.is_empty());
}

#[test]
fn unknown_name_is_reported_removed() {
    let response = stream()
        .on_request(&subscribe(&["nope.example.test"]), &MapResolver::default())
        .expect("a response");
    assert!(response.resources.is_empty());
    assert_eq!(
        response.removed_resources,
        vec!["nope.example.test".to_owned()]
    );
}

#[test]
fn ack_and_nack_cause_no_resend() {
    let mut resolver = MapResolver::default();
    resolver.set("a.example.test", "1");
    let mut stream = stream();
    let first = stream
        .on_request(&subscribe(&["a.example.test"]), &resolver)
        .expect("sent");
    assert!(stream.on_request(&ack(&first.nonce), &resolver).is_none());
    assert!(stream.on_request(&nack(&first.nonce), &resolver).is_none());
    assert!(stream.on_change(&resolver).is_none());
}

#[test]
fn change_after_nack_sends_the_new_version() {
    let mut resolver = MapResolver::default();
    resolver.set("a.example.test", "1");
    let mut stream = stream();
    let first = stream
        .on_request(&subscribe(&["a.example.test"]), &resolver)
        .expect("sent");
    assert!(stream.on_request(&nack(&first.nonce), &resolver).is_none());
    resolver.set("a.example.test", "2");
    let pushed = stream.on_change(&resolver).expect("pushed");
    assert_eq!(served(&pushed), vec![pair("a.example.test", "2")]);
    assert_ne!(pushed.nonce, first.nonce);
}

#[test]
fn change_pushes_only_names_whose_version_changed() {
    let mut resolver = MapResolver::default();
    resolver.set("a.example.test", "1");
    resolver.set("b.example.test", "1");
    let mut stream = stream();
    stream.on_request(&subscribe(&["a.example.test", "b.example.test"]), &resolver);
    resolver.set("b.example.test", "2");
    resolver.set("c.example.test", "1");
    let pushed = stream.on_change(&resolver).expect("pushed");
    assert_eq!(served(&pushed), vec![pair("b.example.test", "2")]);
}

#[test]
fn certificate_issued_for_an_absent_name_is_pushed() {
    let mut resolver = MapResolver::default();
    let mut stream = stream();
    stream.on_request(&subscribe(&["new.example.test"]), &resolver);
    resolver.set("new.example.test", "1");
    let pushed = stream.on_change(&resolver).expect("pushed");
    assert_eq!(served(&pushed), vec![pair("new.example.test", "1")]);
}

#[test]
fn deleted_certificate_is_pushed_as_removed_once() {
    let mut resolver = MapResolver::default();
    resolver.set("a.example.test", "1");
    let mut stream = stream();
    stream.on_request(&subscribe(&["a.example.test"]), &resolver);
    resolver.0.clear();
    let pushed = stream.on_change(&resolver).expect("pushed");
    assert_eq!(pushed.removed_resources, vec!["a.example.test".to_owned()]);
    assert!(stream.on_change(&resolver).is_none());
}

#[test]
fn unsubscribed_name_is_not_pushed() {
    let mut resolver = MapResolver::default();
    resolver.set("a.example.test", "1");
    let mut stream = stream();
    stream.on_request(&subscribe(&["a.example.test"]), &resolver);
    let unsubscribe = DeltaDiscoveryRequest {
        resource_names_unsubscribe: vec!["a.example.test".to_owned()],
        ..ack("test-1")
    };
    assert!(stream.on_request(&unsubscribe, &resolver).is_none());
    resolver.set("a.example.test", "2");
    assert!(stream.on_change(&resolver).is_none());
    assert_eq!(stream.subscribed(), 0);
}

#[test]
fn resubscribing_an_absent_name_is_answered_again() {
    let resolver = MapResolver::default();
    let mut stream = stream();
    let first = stream
        .on_request(&subscribe(&["nope.example.test"]), &resolver)
        .expect("sent");
    let again = stream
        .on_request(&subscribe(&["nope.example.test"]), &resolver)
        .expect("sent again");
    assert_eq!(again.removed_resources, first.removed_resources);
}

#[test]
fn reconnect_with_current_versions_gets_no_resend() {
    let mut resolver = MapResolver::default();
    resolver.set("a.example.test", "1");
    resolver.set("b.example.test", "2");
    let mut request = subscribe(&["a.example.test", "b.example.test"]);
    request.initial_resource_versions = [pair("a.example.test", "1"), pair("b.example.test", "1")]
        .into_iter()
        .collect();
    // A nonce from the previous server instance is not an error.
    request.response_nonce = "previous-server-7".to_owned();
    let response = stream()
        .on_request(&request, &resolver)
        .expect("b is outdated");
    assert_eq!(served(&response), vec![pair("b.example.test", "2")]);
}

#[test]
fn reconnect_with_a_name_now_unknown_reports_it_removed() {
    let mut request = subscribe(&["gone.example.test"]);
    request.initial_resource_versions = [pair("gone.example.test", "1")].into_iter().collect();
    let response = stream()
        .on_request(&request, &MapResolver::default())
        .expect("sent");
    assert_eq!(
        response.removed_resources,
        vec!["gone.example.test".to_owned()]
    );
}

#[test]
fn other_type_urls_are_ignored() {
    let mut request = subscribe(&["a.example.test"]);
    request.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster".to_owned();
    let mut resolver = MapResolver::default();
    resolver.set("a.example.test", "1");
    assert!(stream().on_request(&request, &resolver).is_none());
}

#[test]
fn responses_carry_distinct_nonces() {
    let mut resolver = MapResolver::default();
    resolver.set("a.example.test", "1");
    let mut stream = stream();
    let first = stream
        .on_request(&subscribe(&["a.example.test"]), &resolver)
        .expect("sent");
    resolver.set("a.example.test", "2");
    let second = stream.on_change(&resolver).expect("pushed");
    assert_ne!(first.nonce, second.nonce);
}
