//! Events any client can trigger (a TLS handshake for a name no site has, a refused CSP
//! report): counted for `/metrics`, and logged at a bounded rate, so that no client can grow the
//! log without limit.
//!
//! The counters are process-wide (one sidecar per process); tests that read them compare
//! before and after, never absolute values.

use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Why a CSP report was refused; each reason has its own counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportRefusal {
    /// The report URI had no `site`/`token` (not sent from a page the edge served).
    MissingToken,
    /// The token is not the site's current or previous one.
    BadToken,
    /// The site named in the report URI does not exist.
    UnknownSite,
    /// The site is not in `report` mode.
    NotReportMode,
    /// The `Host` the report was sent to is not a name of the site.
    WrongHost,
    /// The client sent more reports than its bucket allows.
    ClientRateLimited,
    /// The site received more reports than its bucket allows.
    SiteRateLimited,
}

impl ReportRefusal {
    const ALL: [ReportRefusal; 7] = [
        ReportRefusal::MissingToken,
        ReportRefusal::BadToken,
        ReportRefusal::UnknownSite,
        ReportRefusal::NotReportMode,
        ReportRefusal::WrongHost,
        ReportRefusal::ClientRateLimited,
        ReportRefusal::SiteRateLimited,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ReportRefusal::MissingToken => "missing_token",
            ReportRefusal::BadToken => "bad_token",
            ReportRefusal::UnknownSite => "unknown_site",
            ReportRefusal::NotReportMode => "not_report_mode",
            ReportRefusal::WrongHost => "wrong_host",
            ReportRefusal::ClientRateLimited => "client_rate_limited",
            ReportRefusal::SiteRateLimited => "site_rate_limited",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The process-wide counters of client-triggered events.
#[derive(Debug)]
pub struct ClientEventCounters {
    /// Secret names Envoy asked for (one per handshake with an unknown SNI) that no
    /// certificate covers.
    pub sds_unknown_names: AtomicU64,
    /// CSP reports accepted (some of their violations may have been dropped, see below).
    pub csp_reports_accepted: AtomicU64,
    /// Violations filed from accepted reports.
    pub csp_violations_filed: AtomicU64,
    /// Violations dropped: over the per-report cap, or about a page not on the site.
    pub csp_violations_dropped: AtomicU64,
    /// Findings evicted to keep a site's findings within their byte budget.
    pub csp_findings_evicted: AtomicU64,
    /// Log lines not written because their budget for the minute was spent.
    pub log_lines_suppressed: AtomicU64,
    refused: [AtomicU64; ReportRefusal::ALL.len()],
}

/// The counters.
pub static COUNTERS: ClientEventCounters = ClientEventCounters {
    sds_unknown_names: AtomicU64::new(0),
    csp_reports_accepted: AtomicU64::new(0),
    csp_violations_filed: AtomicU64::new(0),
    csp_violations_dropped: AtomicU64::new(0),
    csp_findings_evicted: AtomicU64::new(0),
    log_lines_suppressed: AtomicU64::new(0),
    refused: [const { AtomicU64::new(0) }; ReportRefusal::ALL.len()],
};

impl ClientEventCounters {
    /// Counts a refused report.
    pub fn report_refused(&self, reason: ReportRefusal) {
        self.refused[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// How many reports were refused for this reason.
    pub fn refused(&self, reason: ReportRefusal) -> u64 {
        self.refused[reason.index()].load(Ordering::Relaxed)
    }

    /// Appends the counters to a Prometheus text exposition.
    pub fn write_prometheus(&self, text: &mut String) {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let mut counter = |name: &str, help: &str, value: u64| {
            let _ = writeln!(text, "# HELP {name} {help}");
            let _ = writeln!(text, "# TYPE {name} counter");
            let _ = writeln!(text, "{name} {value}");
        };
        counter(
            "autohttps_sds_unknown_names_total",
            "Secret names Envoy asked for (handshakes with an unknown SNI) that no certificate covers.",
            load(&self.sds_unknown_names),
        );
        counter(
            "autohttps_csp_reports_accepted_total",
            "CSP reports accepted.",
            load(&self.csp_reports_accepted),
        );
        counter(
            "autohttps_csp_violations_filed_total",
            "Violations filed from accepted CSP reports.",
            load(&self.csp_violations_filed),
        );
        counter(
            "autohttps_csp_violations_dropped_total",
            "Violations dropped: over the per-report cap or about a page not on the site.",
            load(&self.csp_violations_dropped),
        );
        counter(
            "autohttps_csp_findings_evicted_total",
            "Mixed-content findings evicted to keep a site within its byte budget.",
            load(&self.csp_findings_evicted),
        );
        counter(
            "autohttps_log_lines_suppressed_total",
            "Log lines about client-triggered events not written (rate-limited).",
            load(&self.log_lines_suppressed),
        );
        let _ = writeln!(
            text,
            "# HELP autohttps_csp_reports_refused_total CSP reports refused, by reason."
        );
        let _ = writeln!(text, "# TYPE autohttps_csp_reports_refused_total counter");
        for reason in ReportRefusal::ALL {
            let _ = writeln!(
                text,
                "autohttps_csp_reports_refused_total{{reason=\"{}\"}} {}",
                reason.as_str(),
                self.refused(reason)
            );
        }
    }
}

/// A budget of log lines per time window: the first `lines` in each window are written, the
/// rest are counted (in [`ClientEventCounters::log_lines_suppressed`] and in the next line
/// written, as `suppressed`).
#[derive(Debug)]
pub struct LogBudget {
    lines: u32,
    window: Duration,
    state: Mutex<BudgetState>,
}

#[derive(Debug)]
struct BudgetState {
    window_start: Option<Instant>,
    used: u32,
    suppressed: u64,
}

impl LogBudget {
    /// At most `lines` lines per `window`.
    pub const fn new(lines: u32, window: Duration) -> Self {
        LogBudget {
            lines,
            window,
            state: Mutex::new(BudgetState {
                window_start: None,
                used: 0,
                suppressed: 0,
            }),
        }
    }

    /// Whether a line may be written now: `Some(n)` with the number of lines suppressed since
    /// the last one written (write it with the line), or `None` (the line is counted instead).
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let window_over = state
            .window_start
            .is_none_or(|start| now.saturating_duration_since(start) >= self.window);
        if window_over {
            state.window_start = Some(now);
            state.used = 0;
        }
        if state.used < self.lines {
            state.used += 1;
            Some(std::mem::take(&mut state.suppressed))
        } else {
            state.suppressed += 1;
            COUNTERS
                .log_lines_suppressed
                .fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_writes_its_lines_then_counts_the_rest_and_reports_them_next_window() {
        let budget = LogBudget::new(2, Duration::from_secs(60));
        let start = Instant::now();
        assert_eq!(budget.admit_at(start), Some(0));
        assert_eq!(budget.admit_at(start), Some(0));
        let before = COUNTERS.log_lines_suppressed.load(Ordering::Relaxed);
        for _ in 0..1000 {
            assert_eq!(budget.admit_at(start + Duration::from_secs(1)), None);
        }
        assert!(COUNTERS.log_lines_suppressed.load(Ordering::Relaxed) >= before + 1000);
        assert_eq!(budget.admit_at(start + Duration::from_secs(61)), Some(1000));
        assert_eq!(budget.admit_at(start + Duration::from_secs(62)), Some(0));
        assert_eq!(budget.admit_at(start + Duration::from_secs(62)), None);
    }

    #[test]
    fn metrics_name_every_refusal_reason() {
        COUNTERS.report_refused(ReportRefusal::BadToken);
        let mut text = String::new();
        COUNTERS.write_prometheus(&mut text);
        for reason in ReportRefusal::ALL {
            assert!(
                text.contains(&format!("reason=\"{}\"", reason.as_str())),
                "{text}"
            );
        }
        assert!(
            text.contains("autohttps_sds_unknown_names_total "),
            "{text}"
        );
    }
}
