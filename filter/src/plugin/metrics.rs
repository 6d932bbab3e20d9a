//! The filter's Envoy stats (shown under `wasmcustom.autohttps.*`).
//!
//! Counters of one kind share a name and differ by a trailing `.<tag>.<value>`
//! (`autohttps.requests_total.outcome.redirect_to_https`), so that the `stats_tags` rules in the
//! shipped Envoy configs turn them into one Prometheus counter with a label
//! (`autohttps_requests_total{outcome="redirect_to_https"}`); Envoy strips the `wasmcustom`
//! namespace in its Prometheus output. Gauges keep plain names.

use proxy_wasm::hostcalls;
use proxy_wasm::types::{LogLevel, MetricType};

use crate::policy::{Outcome, Policy};

use super::log;

/// Metric ids, defined once per VM.
pub(crate) struct Metrics {
    redirect_to_https: Option<u32>,
    redirect_to_http: Option<u32>,
    redirect_to_canonical: Option<u32>,
    force_skipped_no_cert: Option<u32>,
    unknown_host: Option<u32>,
    acme_challenge: Option<u32>,
    hsts_added: Option<u32>,
    csp_added: Option<u32>,
    policy_updates_applied: Option<u32>,
    policy_updates_rejected: Option<u32>,
    policy_not_modified: Option<u32>,
    policy_feed_errors: Option<u32>,
    snapshots_applied: Option<u32>,
    deltas_applied: Option<u32>,
    entries_rejected: Option<u32>,
    policy_version: Option<u32>,
    policy_sites: Option<u32>,
}

fn define(kind: MetricType, name: &str) -> Option<u32> {
    match hostcalls::define_metric(kind, name) {
        Ok(id) => Some(id),
        Err(status) => {
            log(
                LogLevel::Warn,
                &format!("could not define metric {name}: {status:?}"),
            );
            None
        }
    }
}

fn add(id: Option<u32>) {
    if let Some(id) = id {
        let _ = hostcalls::increment_metric(id, 1);
    }
}

fn set(id: Option<u32>, value: u64) {
    if let Some(id) = id {
        let _ = hostcalls::record_metric(id, value);
    }
}

impl Metrics {
    /// Defines every metric.
    pub(crate) fn define() -> Metrics {
        use MetricType::{Counter, Gauge};
        Metrics {
            redirect_to_https: define(
                Counter,
                "autohttps.requests_total.outcome.redirect_to_https",
            ),
            redirect_to_http: define(Counter, "autohttps.requests_total.outcome.redirect_to_http"),
            redirect_to_canonical: define(
                Counter,
                "autohttps.requests_total.outcome.redirect_to_canonical",
            ),
            force_skipped_no_cert: define(
                Counter,
                "autohttps.requests_total.outcome.force_skipped_no_cert",
            ),
            unknown_host: define(Counter, "autohttps.requests_total.outcome.unknown_host"),
            acme_challenge: define(Counter, "autohttps.requests_total.outcome.acme_challenge"),
            hsts_added: define(Counter, "autohttps.headers_added_total.header.hsts"),
            csp_added: define(Counter, "autohttps.headers_added_total.header.csp"),
            policy_updates_applied: define(
                Counter,
                "autohttps.policy_updates_total.result.applied",
            ),
            policy_updates_rejected: define(
                Counter,
                "autohttps.policy_updates_total.result.rejected",
            ),
            policy_not_modified: define(
                Counter,
                "autohttps.policy_updates_total.result.not_modified",
            ),
            policy_feed_errors: define(Counter, "autohttps.policy_updates_total.result.feed_error"),
            snapshots_applied: define(Counter, "autohttps.policy_snapshots_applied_total"),
            deltas_applied: define(Counter, "autohttps.policy_deltas_applied_total"),
            entries_rejected: define(Counter, "autohttps.policy_entries_rejected_total"),
            policy_version: define(Gauge, "autohttps.policy_version"),
            policy_sites: define(Gauge, "autohttps.policy_sites"),
        }
    }

    /// Counts a decision.
    pub(crate) fn outcome(&self, outcome: Outcome) {
        add(match outcome {
            Outcome::RedirectToHttps => self.redirect_to_https,
            Outcome::RedirectToHttp => self.redirect_to_http,
            Outcome::RedirectToCanonical => self.redirect_to_canonical,
            Outcome::ForceSkippedNoCert => self.force_skipped_no_cert,
            Outcome::UnknownHost => self.unknown_host,
            Outcome::AcmeChallenge => self.acme_challenge,
            Outcome::Pass => return,
        });
    }

    pub(crate) fn hsts_added(&self) {
        add(self.hsts_added);
    }

    pub(crate) fn csp_added(&self) {
        add(self.csp_added);
    }

    pub(crate) fn update_rejected(&self) {
        add(self.policy_updates_rejected);
    }

    pub(crate) fn not_modified(&self) {
        add(self.policy_not_modified);
    }

    pub(crate) fn feed_error(&self) {
        add(self.policy_feed_errors);
    }

    /// Records a newly applied policy: its version (numeric versions as they are, others as a
    /// 32-bit FNV-1a hash) and its size.
    pub(crate) fn policy_applied(&self, policy: &Policy) {
        set(self.policy_version, version_number(policy.version()));
        set(self.policy_sites, policy.site_count() as u64);
    }

    /// Counts a snapshot from the feed (also an applied update).
    pub(crate) fn snapshot_applied(&self, policy: &Policy) {
        add(self.policy_updates_applied);
        add(self.snapshots_applied);
        self.policy_applied(policy);
    }

    /// Counts a delta from the feed (also an applied update), and the entries it skipped.
    pub(crate) fn delta_applied(&self, policy: &Policy, entries_rejected: usize) {
        add(self.policy_updates_applied);
        add(self.deltas_applied);
        if let Some(id) = self.entries_rejected
            && entries_rejected > 0
        {
            let _ = hostcalls::increment_metric(id, entries_rejected as i64);
        }
        self.policy_applied(policy);
    }
}

/// The gauge value for a policy version string.
pub(crate) fn version_number(version: &str) -> u64 {
    if let Ok(number) = version.parse::<u64>() {
        return number;
    }
    let mut hash: u32 = 0x811c_9dc5;
    for byte in version.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    u64::from(hash)
}
