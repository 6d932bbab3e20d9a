//! Property test: the filter, the SDS index and the store agree on which names a certificate
//! covers, over random SAN lists and names (wildcards, IDNs, upper case, trailing dots, single
//! labels, bad bytes). Each part is asked through its own entry point, with the normalisation it
//! applies to what reaches it: the filter through `normalise_authority` and
//! [`Policy::lookup`], SDS through [`CertificateSource::lookup`], the store through
//! [`Hostname::parse`] and [`StoredCertificate::covers`].
//!
//! A seeded generator (not a property-testing crate): every run checks the same cases, and a
//! failure names its case number.

use std::sync::Arc;

use autohttps_filter::policy::{
    Policy, PolicyDocument, SCHEMA_VERSION, Settings, SiteSpec, fold_hostname, normalise_authority,
    sans_cover,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use time::OffsetDateTime;

use crate::hostname::Hostname;
use crate::sds::{CertificateSource, MemoryCertificateSource, ServedCertificate};
use crate::store::{PrivateKeyPem, StoredCertificate};

/// Labels names are built from: plain, upper case, punycode (an IDN), a hyphen, a one-letter
/// label and a top-level domain, so that names of one certificate often share parents.
const LABELS: &[&str] = &[
    "a",
    "www",
    "Shop",
    "example",
    "TEST",
    "com",
    "xn--bcher-kva",
    "XN--MNCHEN-3YA",
    "x-1",
];

/// The cases checked; each has its own seed.
const CASES: u64 = 400;

fn label(rng: &mut StdRng) -> &'static str {
    LABELS[rng.random_range(0..LABELS.len())]
}

/// A hostname of `min..=max` labels, sometimes with a trailing dot.
fn hostname(rng: &mut StdRng, min: usize, max: usize) -> String {
    let count = rng.random_range(min..=max);
    let mut name = (0..count).map(|_| label(rng)).collect::<Vec<_>>().join(".");
    if rng.random_bool(0.15) {
        name.push('.');
    }
    name
}

/// A certificate name: an exact name of one to four labels, or a wildcard over a parent of two
/// or three labels (what a CA or a policy accepts).
fn san(rng: &mut StdRng) -> String {
    if rng.random_bool(0.35) {
        format!("*.{}", hostname(rng, 2, 3))
    } else {
        hostname(rng, 1, 4)
    }
}

/// Names to ask about: each SAN itself, a child, a grandchild, its parent and a sibling, in
/// random case, plus unrelated names and names with bytes no hostname has.
fn queries(rng: &mut StdRng, sans: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for san in sans {
        let base = san.strip_prefix("*.").unwrap_or(san).trim_end_matches('.');
        out.push(san.trim_start_matches("*.").to_owned());
        out.push(format!("{}.{base}", label(rng)));
        out.push(format!("{}.{}.{base}", label(rng), label(rng)));
        if let Some((_, parent)) = base.split_once('.') {
            out.push(parent.to_owned());
            out.push(format!("{}.{parent}", label(rng)));
        }
        out.push(format!("a_b.{base}"));
        out.push(format!(".{base}"));
        out.push(format!("{base}.."));
    }
    for _ in 0..4 {
        out.push(hostname(rng, 1, 4));
    }
    out.push("localhost".into());
    out.push("10.0.0.1".into());
    for query in &mut out {
        if rng.random_bool(0.3) {
            *query = query.to_ascii_uppercase();
        }
        if rng.random_bool(0.2) && !query.ends_with('.') {
            query.push('.');
        }
    }
    out
}

/// The filter's answer: the policy of one site listing `sans`, each with its certificate
/// served; a name is covered when its site is found and its certificate is served.
struct Filter(Policy);

impl Filter {
    fn new(sans: &[String]) -> Self {
        let mut folded: Vec<String> = Vec::new();
        let mut hostnames = Vec::new();
        for san in sans {
            if !folded.contains(&fold_hostname(san)) {
                folded.push(fold_hostname(san));
                hostnames.push(san.clone());
            }
        }
        let document = PolicyDocument {
            schema: SCHEMA_VERSION,
            version: "v1".into(),
            settings: Settings::default(),
            sites: vec![SiteSpec {
                id: "site".into(),
                hostnames: hostnames.clone(),
                https: Default::default(),
                redirect: Default::default(),
                canonical_host: None,
                hsts: Default::default(),
                mixed_content: Default::default(),
                report_uri: None,
                report_token: None,
                cert_ready: hostnames,
            }],
        };
        let policy = Policy::compile(&document)
            .unwrap_or_else(|error| panic!("the policy for {sans:?} is refused: {error}"));
        Self(policy)
    }

    fn covers(&self, authority: &str) -> bool {
        normalise_authority(authority)
            .and_then(|host| self.0.lookup(&host))
            .is_some_and(|(_, served)| served)
    }
}

fn sds(sans: &[String]) -> MemoryCertificateSource {
    let source = MemoryCertificateSource::new();
    source.insert(sans, Arc::new(ServedCertificate::new("v1", "CHAIN", "KEY")));
    source
}

fn stored(names: Vec<Hostname>) -> StoredCertificate {
    StoredCertificate {
        id: 1,
        site: "site".into(),
        names,
        chain_pem: String::new(),
        key_pem: PrivateKeyPem::new(String::new()),
        not_before: OffsetDateTime::UNIX_EPOCH,
        not_after: OffsetDateTime::UNIX_EPOCH,
        serial: "01".into(),
        ari_id: None,
        issued_at: OffsetDateTime::UNIX_EPOCH,
    }
}

/// The store's answer: names it cannot hold (not a [`Hostname`]) are covered by nothing.
fn store_covers(certificate: &StoredCertificate, name: &str) -> bool {
    Hostname::parse(name).is_ok_and(|name| certificate.covers(&name))
}

#[test]
fn filter_sds_and_store_agree_on_what_a_certificate_covers() {
    let mut wildcard_cases = 0;
    let mut covered = 0;
    for case in 0..CASES {
        let mut rng = StdRng::seed_from_u64(0x6e61_6d65 + case);
        let sans: Vec<String> = (0..rng.random_range(1..=4))
            .map(|_| san(&mut rng))
            .collect();
        let names = queries(&mut rng, &sans);

        // Every SAN list, wildcards included: the filter, SDS and the engine's rule (the one
        // the store's `covers` calls) give the same answer for every name.
        let filter = Filter::new(&sans);
        let source = sds(&sans);
        let folded: Vec<String> = sans.iter().map(|s| fold_hostname(s)).collect();
        wildcard_cases += usize::from(sans.iter().any(|s| s.starts_with("*.")));
        for name in &names {
            let by_filter = filter.covers(name);
            let by_sds = source.lookup(name).is_some();
            let by_rule = normalise_authority(name)
                .is_some_and(|host| sans_cover(folded.iter().map(String::as_str), &host));
            assert_eq!(
                (by_filter, by_sds),
                (by_rule, by_rule),
                "case {case}: SANs {sans:?}, name {name:?}: (filter, SDS) against the rule"
            );
            covered += usize::from(by_rule);
        }

        // The names a store can hold (issuable hostnames: no wildcard, two labels or more):
        // the store agrees with the filter and SDS given the same list.
        let issuable: Vec<Hostname> = sans
            .iter()
            .filter_map(|s| Hostname::parse(s).ok())
            .collect();
        if issuable.is_empty() {
            continue;
        }
        let texts: Vec<String> = issuable.iter().map(|h| h.as_str().to_owned()).collect();
        let certificate = stored(issuable);
        let filter = Filter::new(&texts);
        let source = sds(&texts);
        for name in &names {
            let by_store = store_covers(&certificate, name);
            assert_eq!(
                (filter.covers(name), source.lookup(name).is_some()),
                (by_store, by_store),
                "case {case}: SANs {texts:?}, name {name:?}: (filter, SDS) against the store"
            );
            // A name written with Unicode labels is the same name to the store as its A-labels.
            let unicode = name
                .to_ascii_lowercase()
                .replace("xn--bcher-kva", "bücher")
                .replace("xn--mnchen-3ya", "münchen");
            if unicode != name.to_ascii_lowercase() {
                assert_eq!(
                    store_covers(&certificate, &unicode),
                    by_store,
                    "case {case}: {unicode:?} and {name:?} differ in the store"
                );
            }
        }
    }
    // The generator reaches the cases that matter: wildcards, and names both in and out.
    assert!(
        wildcard_cases > usize::try_from(CASES / 4).unwrap_or(0),
        "{wildcard_cases}"
    );
    assert!(covered > usize::try_from(CASES).unwrap_or(0), "{covered}");
}
