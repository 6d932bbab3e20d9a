//! Counts and times the ACME client's HTTP requests by endpoint, method and status
//! (`autohttps_acme_client_request_count`, `autohttps_acme_client_request_duration_seconds`,
//! after cert-manager's `certmanager_http_acme_client_request_*`).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Upper bounds (seconds) of the request-duration buckets: a loopback CA answers in
/// milliseconds, a distant one in a few hundred, a struggling one in tens of seconds.
const DURATION_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// At most this many distinct endpoints are labelled; further ones count as `other`, so a CA
/// whose URLs defeat [`endpoint_of`] cannot grow the series without bound.
const MAX_ENDPOINTS: usize = 32;

/// The labels of one ACME request.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AcmeRequestLabels {
    /// The URL path with identifiers dropped (`/acme/order`, Pebble's `/my-order`).
    pub endpoint: String,
    /// `GET`, `HEAD` or `POST`.
    pub method: String,
    /// The HTTP status, or `error` when no answer came (connection refused, timeout).
    pub status: String,
}

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// The ACME request metrics; clones share the same counts.
#[derive(Debug, Clone)]
pub struct AcmeRequestMetrics {
    count: Family<AcmeRequestLabels, Counter>,
    duration: Family<AcmeRequestLabels, Histogram, fn() -> Histogram>,
    endpoints: Arc<Mutex<HashSet<String>>>,
}

impl Default for AcmeRequestMetrics {
    fn default() -> Self {
        Self {
            count: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            endpoints: Arc::default(),
        }
    }
}

impl AcmeRequestMetrics {
    /// Records one request to `path` answered with `status` (`None`: no answer) after `took`.
    pub fn observe(&self, method: &str, path: &str, status: Option<u16>, took: Duration) {
        let labels = AcmeRequestLabels {
            endpoint: self.bounded_endpoint(endpoint_of(path)),
            method: method.to_owned(),
            status: status.map_or_else(|| "error".to_owned(), |s| s.to_string()),
        };
        self.count.get_or_create(&labels).inc();
        self.duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    fn bounded_endpoint(&self, endpoint: String) -> String {
        let mut seen = self
            .endpoints
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if seen.contains(&endpoint) {
            return endpoint;
        }
        if seen.len() >= MAX_ENDPOINTS {
            return "other".to_owned();
        }
        seen.insert(endpoint.clone());
        endpoint
    }

    /// Registers both families (under the registry's prefix).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "acme_client_request_count",
            "ACME HTTP requests by endpoint, method and status",
            self.count.clone(),
        );
        registry.register(
            "acme_client_request_duration_seconds",
            "Time from sending an ACME HTTP request to reading its whole answer",
            self.duration.clone(),
        );
    }
}

/// The path of an ACME URL with its identifiers left out: segments are kept up to the first
/// one that looks like an identifier (all digits, four or more digits, or 24 characters and
/// longer: order, authorization and certificate ids, serials, ARI certificate ids).
/// Let's Encrypt's `/acme/order/123/456` reads `/acme/order`, Pebble's `/my-order/aBc…` reads
/// `/my-order`, and `/acme/new-order` stays itself.
pub fn endpoint_of(path: &str) -> String {
    let looks_like_id = |segment: &str| {
        let digits = segment.bytes().filter(u8::is_ascii_digit).count();
        digits == segment.len() || digits >= 4 || segment.len() >= 24
    };
    let kept: Vec<&str> = path
        .split('/')
        .filter(|segment| !segment.is_empty())
        .take_while(|segment| !looks_like_id(segment))
        .collect();
    format!("/{}", kept.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_drop_identifiers_of_lets_encrypt_and_pebble_urls() {
        assert_eq!(endpoint_of("/acme/new-order"), "/acme/new-order");
        assert_eq!(endpoint_of("/acme/order/1234567/89012345"), "/acme/order");
        assert_eq!(endpoint_of("/acme/authz-v3/123456789"), "/acme/authz-v3");
        assert_eq!(
            endpoint_of("/acme/chall-v3/123456789/AbCdEf"),
            "/acme/chall-v3"
        );
        assert_eq!(
            endpoint_of("/acme/cert/03ab9c5e6f1d2e3f4a5b6c7d8e9f0a1b2c3d"),
            "/acme/cert"
        );
        assert_eq!(
            endpoint_of("/draft-ietf-acme-ari-03/renewalInfo/aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE"),
            "/draft-ietf-acme-ari-03/renewalInfo"
        );
        assert_eq!(
            endpoint_of("/my-order/mrbhKC4LBNPkuWqSMA0kqQF6wMHSyo2k2dx6EjAYDJA"),
            "/my-order"
        );
        assert_eq!(endpoint_of("/dir"), "/dir");
        assert_eq!(endpoint_of("/"), "/");
    }

    #[test]
    fn endpoints_beyond_the_cap_count_as_other() {
        let metrics = AcmeRequestMetrics::default();
        for n in 0..MAX_ENDPOINTS {
            let path = format!(
                "/endpoint-{}",
                char::from(b'a' + (n % 26) as u8).to_string() + &"x".repeat(n / 26)
            );
            metrics.observe("POST", &path, Some(200), Duration::from_millis(1));
        }
        assert_eq!(metrics.bounded_endpoint("/one-too-many".into()), "other");
        assert_eq!(
            metrics.bounded_endpoint("/endpoint-a".into()),
            "/endpoint-a"
        );
    }
}
