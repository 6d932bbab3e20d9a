//! The policy feed, protocol v1 (see [`crate::policy::PolicyDelta`]): ask the sidecar for what changed
//! since the version held (`since`), let it hold the request until something does (`wait_ms`),
//! and name the last version seen, applied or rejected, in `If-None-Match`, so a document that
//! was refused is not sent and parsed again until it changes. A delta is applied in place; a
//! snapshot replaces the policy when it validates and is not older; the last good policy is
//! kept otherwise.
//!
//! The filter asks for the compact snapshot ([`compact::CONTENT_TYPE`]) and builds it a slice
//! at a time, one slice per tick of [`SLICE_TICK_MS`], each as long as its [`Pace`] allows
//! ([`REPLACING`], or [`FIRST_LOAD`] in a VM that holds no site yet), so the worker serves its
//! other requests in between; the policy held serves until the new one is whole, then the two
//! are swapped. A JSON snapshot (another feed) is applied in one go.

use std::time::{Duration, SystemTime};

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, LogLevel, MapType};

use crate::Error;
use crate::policy::{DeltaEntries, FeedConfig, Policy, SnapshotBuild, compact, version_is_older};

use super::metrics::Metrics;
use super::{SharedPolicy, log, millis};

/// Shortest poll interval accepted, in milliseconds; also the shortest held answer after which
/// the next request goes out at once (so a feed that ignores `wait_ms` is not asked in a loop).
const MIN_INTERVAL_MS: u64 = 100;

/// Longest long-poll hold the sidecar grants, in milliseconds.
const MAX_WAIT_MS: u64 = 30_000;

/// The response header that says what a 200 carries.
const KIND_HEADER: &str = "autohttps-policy-kind";

/// Problems shown per rejected document or entry in the log.
const SHOWN_PROBLEMS: usize = 20;

/// How long one slice of a compact snapshot's build may run (the clock is checked every
/// [`SLICE_CHUNK`] sites), and the most sites it builds whatever the clock says. A request
/// that arrives during a slice waits for it, so the slice bounds what a snapshot adds to the
/// worker's tail latency.
#[derive(Debug, Clone, Copy)]
struct Pace {
    budget: Duration,
    max_sites: u32,
}

/// A VM that holds a policy: it serves with it until the new one is whole. Measured in Envoy
/// on a quiet 2-core machine at 100,000 sites (whose timers fire about every 4 ms for a 1 ms
/// period): 500 µs slices raised the p99 of unrelated requests 4.4 times over its quiet
/// 0.26 ms and built the snapshot in 0.4 s; 150 µs raised it 1.3 times and built it in 1.2 to
/// 1.7 s.
const REPLACING: Pace = Pace {
    budget: Duration::from_micros(150),
    max_sites: 4096,
};

/// A VM that holds no site yet (Envoy starting, a VM replaced after a trap): every request it
/// serves meanwhile passes as an unknown host (no redirect, no HSTS), so a fast build matters
/// more than a slice's wait. At 100,000 sites in Envoy on a 2-core machine, 150 µs slices
/// built that first snapshot in 4.3 s per VM, 2 ms slices in 0.21 s.
const FIRST_LOAD: Pace = Pace {
    budget: Duration::from_millis(2),
    max_sites: 16_384,
};

const SLICE_CHUNK: u32 = 32;

/// A compact snapshot of at most this many sites is built in the response callback itself;
/// a bigger one is only copied and its header read there, and built from the next tick on.
const BUILD_AT_ONCE_SITES: u32 = 1024;

/// The tick period while a snapshot is being built or a replaced one freed, in milliseconds.
const SLICE_TICK_MS: u64 = 1;

/// Sites of a replaced policy freed per tick.
const RELEASE_SITES: usize = 2048;

/// `Accept` of a feed request: the compact snapshot, else JSON.
const ACCEPT: &str = "application/vnd.autohttps.policy-snapshot, application/json;q=0.5";

pub(crate) struct Feed {
    config: FeedConfig,
    /// The version of the last policy taken from the feed (sent as `since`); `None` until the
    /// feed delivered one, or after a delta did not fit, so the next answer is a snapshot.
    since: Option<String>,
    /// The last version the feed sent, applied or rejected, as its quoted ETag.
    last_seen: Option<String>,
    in_flight: Option<u32>,
    /// When the call in flight started.
    started: Option<SystemTime>,
    /// The last failure logged, so that a feed that stays down logs once, not every poll.
    last_failure: Option<String>,
    /// A compact snapshot being built, slice by slice.
    building: Option<Building>,
    /// The policy a snapshot replaced, freed [`RELEASE_SITES`] sites per tick.
    retiring: Option<Policy>,
    /// No tick has fired yet: the first comes [`SLICE_TICK_MS`] after configuration (a new
    /// VM asks for its policy at once), then the period becomes `interval_ms`.
    starting: bool,
}

/// A compact snapshot in progress: the callbacks that worked on it so far (the response's
/// and each tick's slice) and the longest of them by the host's clock, for the "applied"
/// log line.
struct Building {
    build: SnapshotBuild,
    slices: u32,
    longest: Duration,
    /// [`FIRST_LOAD`] when the VM held no site as the snapshot came, else [`REPLACING`].
    pace: Pace,
}

/// How a snapshot was built, for the "applied" log line.
#[derive(Debug, Clone, Copy)]
enum Built {
    /// A JSON snapshot, in the response callback.
    AtOnce,
    /// A compact snapshot, in this many callbacks, the longest this long.
    Sliced { slices: u32, longest: Duration },
}

/// What to do once an answer is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// Ask again at once: a delta did not fit, a snapshot is needed.
    AskNow,
    /// Something changed: ask again at once when long polling (the feed holds the next
    /// request until the next change), else at the next tick as plain polling always did.
    Changed,
    /// Ask again at once if the feed held the request (long poll), else at the next tick.
    AskIfHeld,
    /// Wait for the next tick (an error: back off).
    Wait,
    /// A snapshot is being built: no request until it is whole.
    Building,
}

impl Feed {
    pub(crate) fn new(config: FeedConfig) -> Result<Feed, String> {
        if config.cluster.is_empty() {
            return Err(
                "feed.cluster is empty; name the Envoy cluster that serves the policy".into(),
            );
        }
        if !config.path.starts_with('/') || config.path.contains(['?', '#']) {
            return Err(format!(
                "feed.path {:?} must start with '/' and have no query (the filter adds since and wait_ms)",
                config.path
            ));
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
        if config.wait_ms > MAX_WAIT_MS {
            return Err(format!(
                "feed.wait_ms is {}; the feed holds a request at most {MAX_WAIT_MS} ms, use that or less",
                config.wait_ms
            ));
        }
        Ok(Feed {
            config,
            since: None,
            last_seen: None,
            in_flight: None,
            started: None,
            last_failure: None,
            building: None,
            retiring: None,
            starting: true,
        })
    }

    pub(crate) fn interval(&self) -> Duration {
        millis(self.config.interval_ms)
    }

    /// The tick period to set at configuration: short, so that the first poll goes out at
    /// once rather than one `interval_ms` later (with long polling, `interval_ms` is the slow
    /// fallback, up to minutes); the first tick sets `interval_ms`.
    pub(crate) fn first_period(&self) -> Duration {
        millis(SLICE_TICK_MS)
    }

    pub(crate) fn describe(&self) -> String {
        let mut text = format!(
            "cluster {} path {} every {} ms",
            self.config.cluster, self.config.path, self.config.interval_ms
        );
        if self.config.wait_ms > 0 {
            text.push_str(&format!(", held up to {} ms", self.config.wait_ms));
        }
        text
    }

    /// The request path: `feed.path`, `since` when a feed version is held, `wait_ms` when the
    /// feed may hold the request.
    fn request_path(&self) -> String {
        let mut path = self.config.path.clone();
        let mut separator = '?';
        if let Some(since) = &self.since {
            path.push(separator);
            path.push_str("since=");
            percent_encode_into(&mut path, since);
            separator = '&';
        }
        if self.config.wait_ms > 0 {
            path.push(separator);
            path.push_str(&format!("wait_ms={}", self.config.wait_ms));
        }
        path
    }

    /// Starts a poll unless one is already waiting for its answer (the host ends every call
    /// within its timeout, so this never stalls).
    pub(crate) fn poll(&mut self, metrics: &Metrics) {
        if self.in_flight.is_some() {
            return;
        }
        let path = self.request_path();
        let mut headers = vec![
            (":method", "GET"),
            (":path", path.as_str()),
            (":authority", self.config.authority.as_str()),
            ("accept", ACCEPT),
        ];
        if let Some(seen) = &self.last_seen {
            headers.push(("if-none-match", seen.as_str()));
        }
        match hostcalls::dispatch_http_call(
            &self.config.cluster,
            headers,
            None,
            vec![],
            millis(self.config.wait_ms + self.config.timeout_ms),
        ) {
            Ok(token) => {
                self.in_flight = Some(token);
                self.started = hostcalls::get_current_time().ok();
            }
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
        let started = self.started.take();
        let current = policy.borrow().version().to_string();
        let status = if num_headers == 0 {
            None
        } else {
            response_header(":status")
        };
        let next = match status.as_deref() {
            None => {
                metrics.feed_error();
                self.failure(format!(
                    "the policy feed did not answer (unreachable or timed out); keeping policy {current:?}"
                ));
                Next::Wait
            }
            Some("304") => {
                metrics.not_modified();
                self.recovered();
                Next::AskIfHeld
            }
            Some("200") => self.on_document(body_size, policy, metrics, &current),
            Some(other) => {
                metrics.feed_error();
                self.failure(format!(
                    "the policy feed answered {other}; keeping policy {current:?}"
                ));
                Next::Wait
            }
        };
        let held = started
            .zip(hostcalls::get_current_time().ok())
            .and_then(|(start, now)| now.duration_since(start).ok())
            .is_some_and(|d| d >= millis(MIN_INTERVAL_MS));
        let ask_now = match next {
            Next::AskNow => true,
            Next::Changed => self.config.wait_ms > 0,
            Next::AskIfHeld => self.config.wait_ms > 0 && held,
            Next::Wait | Next::Building => false,
        };
        if ask_now {
            self.poll(metrics);
        }
    }

    /// A 200: a delta or a snapshot.
    fn on_document(
        &mut self,
        body_size: usize,
        policy: &SharedPolicy,
        metrics: &Metrics,
        current: &str,
    ) -> Next {
        let etag = response_header("etag");
        let kind = response_header(KIND_HEADER);
        // Whatever becomes of this document, it is not asked for again until it changes.
        self.last_seen.clone_from(&etag);
        if body_size > self.config.max_bytes {
            metrics.update_rejected();
            self.failure(format!(
                "the policy feed sent {body_size} bytes, more than feed.max_bytes ({}); keeping policy {current:?}",
                self.config.max_bytes
            ));
            return Next::Wait;
        }
        let compact = response_header("content-type")
            .is_some_and(|t| t.trim().eq_ignore_ascii_case(compact::CONTENT_TYPE));
        match kind.as_deref() {
            Some("delta") => self.apply_delta(body_size, policy, metrics, current),
            None | Some("snapshot") if compact => {
                self.start_compact(etag.as_deref(), body_size, policy, metrics, current)
            }
            None | Some("snapshot") => {
                self.apply_snapshot(etag.as_deref(), body_size, policy, metrics, current)
            }
            Some(other) => {
                metrics.update_rejected();
                self.failure(format!(
                    "the policy feed sent a document of kind {other:?}; this filter reads \"snapshot\" and \"delta\" (upgrade the filter); keeping policy {current:?}"
                ));
                Next::Wait
            }
        }
    }

    fn apply_snapshot(
        &mut self,
        etag: Option<&str>,
        body_size: usize,
        policy: &SharedPolicy,
        metrics: &Metrics,
        current: &str,
    ) -> Next {
        // The ETag names the version: an older one is refused before its body is parsed.
        if let Some(version) = etag.map(|e| e.trim_matches('"'))
            && version_is_older(version, current)
        {
            return self.refuse_older(version, metrics, current);
        }
        let body = response_body(body_size);
        let new_policy = match Policy::from_json(&body) {
            Ok(new_policy) => new_policy,
            Err(error) => return self.invalid_snapshot(&error, metrics, current),
        };
        drop(body);
        self.recovered();
        if new_policy.version() == current {
            self.since = Some(current.to_string());
            metrics.not_modified();
            return Next::AskIfHeld;
        }
        if version_is_older(new_policy.version(), current) {
            return self.refuse_older(new_policy.version(), metrics, current);
        }
        self.swap(new_policy, policy, metrics, current, Built::AtOnce)
    }

    /// A compact snapshot: its body is copied into the VM and its header read now; a small one
    /// is built at once, a big one a slice per tick from the next (see [`Feed::on_tick`]), so
    /// that this callback does not hold up the worker either.
    fn start_compact(
        &mut self,
        etag: Option<&str>,
        body_size: usize,
        policy: &SharedPolicy,
        metrics: &Metrics,
        current: &str,
    ) -> Next {
        if let Some(version) = etag.map(|e| e.trim_matches('"'))
            && version_is_older(version, current)
        {
            return self.refuse_older(version, metrics, current);
        }
        let started = hostcalls::get_current_time().ok();
        let build = match SnapshotBuild::new(response_body(body_size)) {
            Ok(build) => build,
            Err(error) => return self.invalid_snapshot(&error, metrics, current),
        };
        if build.version() == current {
            self.recovered();
            self.since = Some(current.to_string());
            metrics.not_modified();
            return Next::AskIfHeld;
        }
        if version_is_older(build.version(), current) {
            let version = build.version().to_string();
            return self.refuse_older(&version, metrics, current);
        }
        let pace = if policy.borrow().site_count() == 0 {
            FIRST_LOAD
        } else {
            REPLACING
        };
        if build.site_count() <= BUILD_AT_ONCE_SITES {
            self.building = Some(Building {
                build,
                slices: 0,
                longest: Duration::ZERO,
                pace,
            });
            if let Some(next) = self.build_slice(policy, metrics, started) {
                return next;
            }
        } else {
            // This callback counts as the first slice: it copied the body.
            self.building = Some(Building {
                build,
                slices: 1,
                longest: elapsed_since(started).unwrap_or_default(),
                pace,
            });
        }
        self.slice_ticks(true);
        Next::Building
    }

    /// The timer: builds the next slice of a snapshot and frees a slice of a replaced policy,
    /// or polls.
    pub(crate) fn on_tick(&mut self, policy: &SharedPolicy, metrics: &Metrics) {
        if std::mem::take(&mut self.starting) && self.building.is_none() && self.retiring.is_none()
        {
            self.slice_ticks(false);
        }
        if self.building.is_none() && self.retiring.is_none() {
            self.poll(metrics);
            return;
        }
        if let Some(old) = &mut self.retiring
            && old.release(RELEASE_SITES)
        {
            self.retiring = None;
        }
        let next = if self.building.is_some() {
            match self.build_slice(policy, metrics, None) {
                Some(next) => Some(next),
                None => return,
            }
        } else {
            None
        };
        if self.building.is_none() && self.retiring.is_none() {
            self.slice_ticks(false);
        }
        if next == Some(Next::Changed) && self.config.wait_ms > 0 {
            self.poll(metrics);
        }
    }

    /// Ticks every [`SLICE_TICK_MS`] while there is slice work, else every `interval_ms`.
    fn slice_ticks(&self, on: bool) {
        let period = if on {
            millis(SLICE_TICK_MS)
        } else {
            self.interval()
        };
        if let Err(status) = hostcalls::set_tick_period(period) {
            log(
                LogLevel::Warn,
                &format!("could not set the feed's tick period: {status:?}"),
            );
        }
    }

    /// Builds one slice of the snapshot in progress; when it was the last, swaps the policy
    /// (or keeps the one held if the snapshot is invalid) and says what to do next. `since`
    /// is when the callback running this slice began, when it did other work first.
    fn build_slice(
        &mut self,
        policy: &SharedPolicy,
        metrics: &Metrics,
        since: Option<SystemTime>,
    ) -> Option<Next> {
        let building = self.building.as_mut()?;
        building.slices += 1;
        let started = hostcalls::get_current_time().ok();
        let Pace { budget, max_sites } = building.pace;
        let mut step = Ok(());
        let mut built = 0;
        while !building.build.is_done() && built < max_sites && step.is_ok() {
            step = building.build.step(SLICE_CHUNK);
            built += SLICE_CHUNK;
            if elapsed_since(started).is_some_and(|e| e >= budget) {
                break;
            }
        }
        if step.is_ok() && !building.build.is_done() {
            let took = elapsed_since(since.or(started)).unwrap_or_default();
            building.longest = building.longest.max(took);
            return None;
        }
        let Building {
            build,
            slices,
            longest,
            ..
        } = self.building.take()?;
        let current = policy.borrow().version().to_string();
        let new_policy = match step.and_then(|()| build.finish()) {
            Ok(new_policy) => new_policy,
            Err(error) => return Some(self.invalid_snapshot(&error, metrics, &current)),
        };
        // The last slice also checked the whole and made the tables final.
        let longest = longest.max(elapsed_since(since.or(started)).unwrap_or_default());
        self.recovered();
        Some(self.swap(
            new_policy,
            policy,
            metrics,
            &current,
            Built::Sliced { slices, longest },
        ))
    }

    fn invalid_snapshot(&mut self, error: &Error, metrics: &Metrics, current: &str) -> Next {
        metrics.update_rejected();
        self.failure(format!(
            "the policy feed sent an invalid policy ({}); keeping policy {current:?}",
            problem_summary(error)
        ));
        Next::Wait
    }

    /// Replaces the policy held by a newer whole one.
    fn swap(
        &mut self,
        new_policy: Policy,
        policy: &SharedPolicy,
        metrics: &Metrics,
        current: &str,
        built: Built,
    ) -> Next {
        log(
            LogLevel::Info,
            &format!(
                "policy {:?} applied ({} sites{}), replacing {current:?}",
                new_policy.version(),
                new_policy.site_count(),
                match built {
                    Built::AtOnce => String::new(),
                    Built::Sliced { slices, longest } => format!(
                        ", built in {slices} slice{}, the longest {:.1} ms",
                        if slices == 1 { "" } else { "s" },
                        longest.as_secs_f64() * 1000.0
                    ),
                }
            ),
        );
        self.since = Some(new_policy.version().to_string());
        if self.last_seen.is_none() {
            self.last_seen = Some(format!("\"{}\"", new_policy.version()));
        }
        metrics.snapshot_applied(&new_policy);
        // The old policy is freed a slice per tick (before the feed allocates much again, so
        // its memory is reused).
        let old = std::mem::replace(&mut *policy.borrow_mut(), new_policy);
        if old.site_count() > RELEASE_SITES {
            self.retiring = Some(old);
            self.slice_ticks(true);
        }
        Next::Changed
    }

    fn refuse_older(&mut self, version: &str, metrics: &Metrics, current: &str) -> Next {
        metrics.update_rejected();
        self.failure(format!(
            "the policy feed sent version {version:?}, older than the policy held ({current:?}); keeping it (a policy never goes back)"
        ));
        Next::Wait
    }

    fn apply_delta(
        &mut self,
        body_size: usize,
        policy: &SharedPolicy,
        metrics: &Metrics,
        current: &str,
    ) -> Next {
        let body = response_body(body_size);
        let delta: DeltaEntries<'_> = match serde_json::from_slice(&body) {
            Ok(delta) => delta,
            Err(error) => {
                metrics.update_rejected();
                self.failure(format!(
                    "the policy feed sent an invalid delta (not a valid delta document: {error}); keeping policy {current:?}"
                ));
                return Next::Wait;
            }
        };
        let mut held = policy.borrow_mut();
        match held.apply_delta_entries(&delta) {
            Ok(report) => {
                self.recovered();
                for (site, problems) in &report.rejected {
                    let shown: Vec<String> = problems
                        .iter()
                        .take(SHOWN_PROBLEMS)
                        .map(|p| p.to_string())
                        .collect();
                    log(
                        LogLevel::Warn,
                        &format!(
                            "policy {:?}: site {site:?} keeps its previous entry, its new one is invalid: {}",
                            &*delta.version,
                            shown.join("; ")
                        ),
                    );
                }
                log(
                    LogLevel::Info,
                    &format!(
                        "policy {:?} applied (delta from {current:?}: {} upserted, {} removed, {} rejected; {} sites)",
                        &*delta.version,
                        report.upserted,
                        report.removed,
                        report.rejected.len(),
                        held.site_count()
                    ),
                );
                self.since = Some(delta.version.to_string());
                if self.last_seen.is_none() {
                    self.last_seen = Some(format!("\"{}\"", &*delta.version));
                }
                metrics.delta_applied(&held, report.rejected.len());
                Next::Changed
            }
            Err(Error::DeltaBase { from, current }) => {
                // Not for this VM's version: ask for a snapshot, and do not name this version
                // in If-None-Match (the feed would answer 304 instead of the snapshot).
                log(
                    LogLevel::Info,
                    &format!(
                        "the policy feed sent a delta from {from:?} but this VM holds {current:?}; asking for a snapshot"
                    ),
                );
                self.since = None;
                self.last_seen = None;
                Next::AskNow
            }
            Err(error) => {
                metrics.update_rejected();
                self.failure(format!(
                    "the policy feed sent an invalid delta ({}); keeping policy {current:?}",
                    problem_summary(&error)
                ));
                Next::Wait
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

/// Time since `start` by the host's clock.
fn elapsed_since(start: Option<SystemTime>) -> Option<Duration> {
    start
        .zip(hostcalls::get_current_time().ok())
        .and_then(|(start, now)| now.duration_since(start).ok())
}

fn response_header(name: &str) -> Option<String> {
    hostcalls::get_map_value(MapType::HttpCallResponseHeaders, name)
        .ok()
        .flatten()
}

fn response_body(body_size: usize) -> Vec<u8> {
    hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// `N problem(s): first; second; …` for the log.
fn problem_summary(error: &Error) -> String {
    let problems = error.problems();
    if problems.is_empty() {
        return error.to_string();
    }
    let shown: Vec<String> = problems
        .iter()
        .take(SHOWN_PROBLEMS)
        .map(|p| p.to_string())
        .collect();
    format!(
        "{} problem(s): {}{}",
        problems.len(),
        shown.join("; "),
        if problems.len() > shown.len() {
            "; …"
        } else {
            ""
        }
    )
}

/// Appends `value` to a query string, percent-encoding every byte but the unreserved ones.
fn percent_encode_into(out: &mut String, value: &str) {
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
}
