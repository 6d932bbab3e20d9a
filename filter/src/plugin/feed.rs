//! The policy feed: poll the sidecar with `If-None-Match`, apply a new version only when it
//! validates, keep the last good policy otherwise.

use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, LogLevel, MapType};

use crate::policy::{FeedConfig, Policy};

use super::metrics::Metrics;
use super::{SharedPolicy, log, millis};

/// Shortest poll interval accepted, in milliseconds.
const MIN_INTERVAL_MS: u64 = 100;

pub(crate) struct Feed {
    config: FeedConfig,
    etag: Option<String>,
    in_flight: Option<u32>,
    /// The last failure logged, so that a feed that stays down logs once, not every poll.
    last_failure: Option<String>,
}

impl Feed {
    pub(crate) fn new(config: FeedConfig) -> Result<Feed, String> {
        if config.cluster.is_empty() {
            return Err(
                "feed.cluster is empty; name the Envoy cluster that serves the policy".into(),
            );
        }
        if !config.path.starts_with('/') {
            return Err(format!("feed.path {:?} must start with '/'", config.path));
        }
        if config.interval_ms < MIN_INTERVAL_MS {
            return Err(format!(
                "feed.interval_ms is {}; use at least {MIN_INTERVAL_MS}",
                config.interval_ms
            ));
        }
        if config.timeout_ms == 0 {
            return Err("feed.timeout_ms must be more than 0".into());
        }
        Ok(Feed {
            config,
            etag: None,
            in_flight: None,
            last_failure: None,
        })
    }

    pub(crate) fn interval(&self) -> Duration {
        millis(self.config.interval_ms)
    }

    pub(crate) fn describe(&self) -> String {
        format!(
            "cluster {} path {} every {} ms",
            self.config.cluster, self.config.path, self.config.interval_ms
        )
    }

    /// Starts a poll unless one is already waiting for its answer (the host ends every call
    /// within its timeout, so this never stalls).
    pub(crate) fn poll(&mut self, metrics: &Metrics) {
        if self.in_flight.is_some() {
            return;
        }
        let mut headers = vec![
            (":method", "GET"),
            (":path", self.config.path.as_str()),
            (":authority", self.config.authority.as_str()),
            ("accept", "application/json"),
        ];
        if let Some(etag) = &self.etag {
            headers.push(("if-none-match", etag.as_str()));
        }
        match hostcalls::dispatch_http_call(
            &self.config.cluster,
            headers,
            None,
            vec![],
            millis(self.config.timeout_ms),
        ) {
            Ok(token) => self.in_flight = Some(token),
            Err(status) => {
                metrics.feed_error();
                self.failure(format!(
                    "could not call the policy feed on cluster {}: {status:?}",
                    self.config.cluster
                ));
            }
        }
    }

    /// Handles the feed's answer. A call that failed (reset, timeout) arrives with no headers;
    /// its header map must not be read then (the host refuses, and the SDK would panic).
    pub(crate) fn on_response(
        &mut self,
        token: u32,
        num_headers: usize,
        body_size: usize,
        policy: &SharedPolicy,
        metrics: &Metrics,
    ) {
        if self.in_flight != Some(token) {
            return;
        }
        self.in_flight = None;
        let current = policy.borrow().version().to_string();
        let status = if num_headers == 0 {
            None
        } else {
            hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status")
                .ok()
                .flatten()
        };
        match status.as_deref() {
            None => {
                metrics.feed_error();
                self.failure(format!(
                    "the policy feed did not answer (unreachable or timed out); keeping policy {current:?}"
                ));
            }
            Some("304") => {
                metrics.not_modified();
                self.recovered();
            }
            Some("200") => self.apply(body_size, policy, metrics, &current),
            Some(other) => {
                metrics.feed_error();
                self.failure(format!(
                    "the policy feed answered {other}; keeping policy {current:?}"
                ));
            }
        }
    }

    fn apply(&mut self, body_size: usize, policy: &SharedPolicy, metrics: &Metrics, current: &str) {
        if body_size > self.config.max_bytes {
            metrics.update_rejected();
            self.failure(format!(
                "the policy feed sent {body_size} bytes, more than feed.max_bytes ({}); keeping policy {current:?}",
                self.config.max_bytes
            ));
            return;
        }
        let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
            .ok()
            .flatten()
            .unwrap_or_default();
        match Policy::from_json(&body) {
            Ok(new_policy) => {
                let etag = hostcalls::get_map_value(MapType::HttpCallResponseHeaders, "etag")
                    .ok()
                    .flatten();
                self.etag = etag;
                self.recovered();
                if new_policy.version() == current {
                    metrics.not_modified();
                    return;
                }
                log(
                    LogLevel::Info,
                    &format!(
                        "policy {:?} applied ({} sites), replacing {current:?}",
                        new_policy.version(),
                        new_policy.site_count()
                    ),
                );
                metrics.update_applied(&new_policy);
                *policy.borrow_mut() = Rc::new(new_policy);
            }
            Err(error) => {
                metrics.update_rejected();
                let problems = error.problems();
                let shown: Vec<String> = problems.iter().take(20).map(|p| p.to_string()).collect();
                self.failure(format!(
                    "the policy feed sent an invalid policy ({} problem(s): {}{}); keeping policy {current:?}",
                    problems.len(),
                    shown.join("; "),
                    if problems.len() > shown.len() { "; …" } else { "" }
                ));
            }
        }
    }

    fn failure(&mut self, message: String) {
        if self.last_failure.as_deref() != Some(message.as_str()) {
            log(LogLevel::Warn, &message);
            self.last_failure = Some(message);
        }
    }

    fn recovered(&mut self) {
        if self.last_failure.take().is_some() {
            log(LogLevel::Info, "the policy feed answers again");
        }
    }
}
