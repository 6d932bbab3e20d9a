//! Fuzz target: policy JSON → `Policy::from_json` never panics; a policy that parses round-trips
//! (re-serialised, it compiles again to a policy that answers every lookup the same way).
#![no_main]

use autohttps_filter::policy::{Policy, PolicyDocument, normalise_authority};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(policy) = Policy::from_json(data) else {
        return;
    };
    let document: PolicyDocument =
        serde_json::from_slice(data).expect("a document that compiled parses");
    let again = serde_json::to_vec(&document).expect("a document serialises");
    let second = Policy::from_json(&again).expect("a compiled policy round-trips");
    assert_eq!(policy.version(), second.version());
    assert_eq!(policy.site_count(), second.site_count());
    for site in &document.sites {
        for name in site.hostnames.iter().chain(&site.cert_ready) {
            let probe = name.replace('*', "x");
            if let Some(host) = normalise_authority(&probe) {
                assert_eq!(policy.lookup(&host), second.lookup(&host), "{host}");
            }
        }
    }
});
