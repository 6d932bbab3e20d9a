//! Unit tests of the state-of-the-world secrets state machine.

use envoy_types::pb::google::rpc::Status;

use super::*;
use crate::sds::test_resolver::MapResolver;

fn stream() -> SotwStream {
    SotwStream::new(Nonces::new("test".into()))
}

fn request(names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: SECRET_TYPE_URL.to_owned(),
        resource_names: names.iter().map(|n| n.to_string()).collect(),
        version_info: version.to_owned(),
        response_nonce: nonce.to_owned(),
        ..DiscoveryRequest::default()
    }
}

fn nack(names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        error_detail: Some(Status {
            code: 3,
            message: "bad certificate".to_owned(),
            details: Vec::new(),
        }),
        ..request(names, version, nonce)
    }
}

fn resource_count(response: &DiscoveryResponse) -> usize {
    response.resources.len()
}

#[test]
fn first_request_gets_every_existing_secret() {
    let mut resolver = MapResolver::default();
    resolver.set("default", "d1");
    resolver.set("a.example.test", "1");
    let response = stream()
        .on_request(
            &request(&["default", "a.example.test", "nope.example.test"], "", ""),
            &resolver,
        )
        .expect("a response");
    assert_eq!(resource_count(&response), 2);
    assert!(!response.version_info.is_empty());
    assert_eq!(response.type_url, SECRET_TYPE_URL);
}

#[test]
fn nothing_is_sent_when_no_requested_secret_exists() {
    assert!(
        stream()
            .on_request(
                &request(&["nope.example.test"], "", ""),
                &MapResolver::default()
            )
            .is_none()
    );
}

#[test]
fn ack_causes_no_resend() {
    let mut resolver = MapResolver::default();
    resolver.set("default", "d1");
    let mut stream = stream();
    let sent = stream
        .on_request(&request(&["default"], "", ""), &resolver)
        .expect("sent");
    let ack = request(&["default"], &sent.version_info, &sent.nonce);
    assert!(stream.on_request(&ack, &resolver).is_none());
}

#[test]
fn nacked_version_is_not_sent_again_but_a_change_is() {
    let mut resolver = MapResolver::default();
    resolver.set("default", "d1");
    let mut stream = stream();
    let sent = stream
        .on_request(&request(&["default"], "", ""), &resolver)
        .expect("sent");
    assert!(
        stream
            .on_request(&nack(&["default"], "", &sent.nonce), &resolver)
            .is_none()
    );
    assert!(stream.on_change(&resolver).is_none());
    resolver.set("default", "d2");
    let pushed = stream.on_change(&resolver).expect("pushed");
    assert_ne!(pushed.version_info, sent.version_info);
}

#[test]
fn stale_nonce_is_ignored() {
    let mut resolver = MapResolver::default();
    resolver.set("a.example.test", "1");
    resolver.set("b.example.test", "1");
    let mut stream = stream();
    let first = stream
        .on_request(&request(&["a.example.test"], "", ""), &resolver)
        .expect("sent");
    resolver.set("a.example.test", "2");
    let second = stream.on_change(&resolver).expect("pushed");
    // Envoy's ACK of the first response crosses the second one: not answered.
    let crossing = request(
        &["a.example.test", "b.example.test"],
        &first.version_info,
        &first.nonce,
    );
    assert!(stream.on_request(&crossing, &resolver).is_none());
    // Its request bearing the latest nonce is.
    let latest = request(
        &["a.example.test", "b.example.test"],
        &second.version_info,
        &second.nonce,
    );
    assert_eq!(
        stream
            .on_request(&latest, &resolver)
            .map(|r| resource_count(&r)),
        Some(2)
    );
}

#[test]
fn change_is_pushed_and_unchanged_source_is_not() {
    let mut resolver = MapResolver::default();
    resolver.set("a.example.test", "1");
    let mut stream = stream();
    stream.on_request(&request(&["a.example.test"], "", ""), &resolver);
    assert!(stream.on_change(&resolver).is_none());
    resolver.set("a.example.test", "2");
    assert!(stream.on_change(&resolver).is_some());
}

#[test]
fn nonce_from_a_previous_server_is_accepted_on_a_new_stream() {
    let mut resolver = MapResolver::default();
    resolver.set("default", "d1");
    let reconnect = request(&["default"], "0123456789abcdef", "previous-server-4");
    assert!(stream().on_request(&reconnect, &resolver).is_some());
}

#[test]
fn same_content_gets_the_same_version() {
    let mut resolver = MapResolver::default();
    resolver.set("default", "d1");
    let first = stream()
        .on_request(&request(&["default"], "", ""), &resolver)
        .expect("sent");
    let second = stream()
        .on_request(&request(&["default"], "", ""), &resolver)
        .expect("sent");
    assert_eq!(first.version_info, second.version_info);
}
