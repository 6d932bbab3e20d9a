//! The operations listener (`listen.metrics`, no token, read-only): Prometheus `/metrics`,
//! `/readyz` (503 naming the problem when the store or the SDS server is not usable) and
//! `/healthz` (liveness).
//!
//! Metrics follow Prometheus naming and cert-manager's names where they exist
//! (`certmanager_certificate_expiration_timestamp_seconds` → `autohttps_certificate_…`), built
//! with `prometheus-client` and served in the Prometheus text format 0.0.4. Store-derived
//! values are read at scrape time, so they never drift from the store.
//!
//! Cardinality: the per-site families have one series per site (expiration, renewal) and three
//! per site (ready status, one per condition, as cert-manager does): 500,000 series at 100,000
//! sites. `metrics.per_site = false` drops them and keeps the aggregates
//! (`autohttps_certificate_ready_sites{condition}`, soonest expiry). Nothing is labelled by
//! hostname. ACME request labels are bounded (see [`acme_requests::endpoint_of`]).

pub mod acme_requests;
pub mod process;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::json;
use time::OffsetDateTime;

use crate::error::{Error, Result};
use crate::issuance::Issuer;
use crate::policy_feed::PolicyFeed;
use crate::sds::SdsListen;
use crate::store::{CertificateCoverage, Site};

pub use acme_requests::AcmeRequestMetrics;
pub use process::ProcessFacts;

pub use crate::config::MetricsConfig;

/// How long a readiness check waits for the store's write lock or the SDS socket.
const READINESS_PATIENCE: Duration = Duration::from_millis(1000);

/// cert-manager's `Ready` condition values.
#[derive(
    Debug, Clone, Copy, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelValue,
)]
enum Condition {
    True,
    False,
    Unknown,
}

impl Condition {
    const ALL: [Self; 3] = [Self::True, Self::False, Self::Unknown];
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConditionLabels {
    condition: Condition,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabels {
    https_mode: String,
}

/// A site's certificate state: `True` when every name is covered by an unexpired certificate,
/// `False` when not and the last attempt failed, `Unknown` while the first issuance is pending.
fn site_condition(
    site: &Site,
    certificates: &[&CertificateCoverage],
    now: OffsetDateTime,
) -> Condition {
    let valid: Vec<_> = certificates.iter().filter(|c| c.not_after > now).collect();
    let covered = site
        .names()
        .iter()
        .all(|name| valid.iter().any(|c| c.covers(name)));
    if covered {
        Condition::True
    } else if site.issuance.failures > 0 {
        Condition::False
    } else {
        Condition::Unknown
    }
}

/// Sites read per store call during a scrape.
const SCRAPE_PAGE_SITES: usize = 1_000;

/// What a scrape says of one site (its per-site series).
#[derive(Debug)]
struct SiteFacts {
    site: String,
    /// When its soonest-expiring current certificate expires (Unix time), if it has one.
    expires: Option<i64>,
    /// When its next attempt is due (Unix time), if it has a certificate and one is scheduled.
    renewal: Option<i64>,
    condition: Condition,
}

/// A scrape: the text of every family but the per-site ones, and the per-site facts whose
/// series are written out as the body is sent (a few bytes each held, not every series).
#[derive(Debug)]
pub struct Scrape {
    text: String,
    per_site: Vec<SiteFacts>,
}

/// Per-site series written per piece of a streamed scrape.
const SCRAPE_PIECE_SITES: usize = 2_000;

impl Scrape {
    /// The whole scrape as one text.
    pub fn into_text(self) -> String {
        let mut text = self.text;
        for family in PerSiteFamily::ALL {
            family.write(&self.per_site, &mut text);
        }
        text
    }

    /// The scrape as pieces of text, the per-site families written as they are read.
    fn into_stream(
        self,
    ) -> impl futures::Stream<Item = std::result::Result<String, std::convert::Infallible>> {
        let Scrape { text, per_site } = self;
        let per_site = Arc::new(per_site);
        let pieces = PerSiteFamily::ALL.into_iter().flat_map(move |family| {
            let per_site = Arc::clone(&per_site);
            let count = per_site.len().div_ceil(SCRAPE_PIECE_SITES).max(1);
            (0..count).map(move |piece| {
                let from = piece * SCRAPE_PIECE_SITES;
                let to = (from + SCRAPE_PIECE_SITES).min(per_site.len());
                let mut out = String::new();
                if piece == 0 {
                    family.write_header(&mut out);
                }
                family.write_series(&per_site[from..to], &mut out);
                out
            })
        });
        futures::stream::iter(std::iter::once(text).chain(pieces).map(Ok))
    }
}

/// The per-site families, written by hand so a scrape never holds 500,000 series at once.
#[derive(Debug, Clone, Copy)]
enum PerSiteFamily {
    Expiration,
    Renewal,
    Ready,
}

impl PerSiteFamily {
    const ALL: [Self; 3] = [Self::Expiration, Self::Renewal, Self::Ready];

    fn name_and_help(self) -> (&'static str, &'static str) {
        match self {
            Self::Expiration => (
                "autohttps_certificate_expiration_timestamp_seconds",
                "When the site's soonest-expiring current certificate expires (Unix time).",
            ),
            Self::Renewal => (
                "autohttps_certificate_renewal_timestamp_seconds",
                "When the site's next issuance attempt (renewal, or retry after a failure) is due (Unix time).",
            ),
            Self::Ready => (
                "autohttps_certificate_ready_status",
                "The site's certificate state: 1 on its condition (True: every name covered by an unexpired certificate; False: not, and the last attempt failed; Unknown: first issuance pending).",
            ),
        }
    }

    fn write(self, sites: &[SiteFacts], out: &mut String) {
        self.write_header(out);
        self.write_series(sites, out);
    }

    fn write_header(self, out: &mut String) {
        use std::fmt::Write as _;
        let (name, help) = self.name_and_help();
        let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n");
    }

    /// The series of `sites` (site ids are `[a-z0-9-]`: no label escaping is needed).
    fn write_series(self, sites: &[SiteFacts], out: &mut String) {
        use std::fmt::Write as _;
        let (name, _) = self.name_and_help();
        for facts in sites {
            let site = &facts.site;
            match self {
                Self::Expiration => {
                    if let Some(at) = facts.expires {
                        let _ = writeln!(out, "{name}{{site=\"{site}\"}} {at}");
                    }
                }
                Self::Renewal => {
                    if let Some(at) = facts.renewal {
                        let _ = writeln!(out, "{name}{{site=\"{site}\"}} {at}");
                    }
                }
                Self::Ready => {
                    for (each, label) in [
                        (Condition::True, "True"),
                        (Condition::False, "False"),
                        (Condition::Unknown, "Unknown"),
                    ] {
                        let on = i64::from(each == facts.condition);
                        let _ =
                            writeln!(out, "{name}{{site=\"{site}\",condition=\"{label}\"}} {on}");
                    }
                }
            }
        }
    }
}

/// The whole scrape, in the Prometheus text format 0.0.4; `rejected_sites` is how many sites the
/// policy feed leaves out (or serves at their previous entry) because their entries fail the
/// filter's validation.
pub fn render(issuer: &Issuer, config: &MetricsConfig, rejected_sites: usize) -> Result<String> {
    Ok(scrape(issuer, config, rejected_sites)?.into_text())
}

/// [`render`]'s scrape, its per-site series not written yet. Reads the sites a page at a time
/// (names and validity only: never a certificate's PEM or key).
pub fn scrape(issuer: &Issuer, config: &MetricsConfig, rejected_sites: usize) -> Result<Scrape> {
    let store = issuer.store();
    let now = issuer.clock().now();
    let counts = store.counts()?;

    let mut root = Registry::default();
    if let Some(facts) = ProcessFacts::read() {
        facts.register(&mut root);
    }
    let registry = root.sub_registry_with_prefix("autohttps");

    let build = Family::<BuildLabels, Gauge>::default();
    build
        .get_or_create(&BuildLabels {
            version: env!("CARGO_PKG_VERSION").to_owned(),
        })
        .set(1);
    registry.register(
        "build_info",
        "The running autohttps version (always 1)",
        build,
    );

    issuer.acme_requests().register(registry);

    let ready_sites = Family::<ConditionLabels, Gauge>::default();
    for condition in Condition::ALL {
        ready_sites
            .get_or_create(&ConditionLabels { condition })
            .set(0);
    }
    let mut soonest_expiry: Option<OffsetDateTime> = None;
    let mut per_site = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store.sites_page(after.as_deref(), SCRAPE_PAGE_SITES)?;
        let Some((last, _)) = page.last() else {
            break;
        };
        after = Some(last.name.clone());
        let full_page = page.len() == SCRAPE_PAGE_SITES;
        for (site, certificates) in page {
            let own: Vec<&CertificateCoverage> = certificates.iter().collect();
            let condition = site_condition(&site, &own, now);
            ready_sites
                .get_or_create(&ConditionLabels { condition })
                .inc();
            let expires = own.iter().map(|c| c.not_after).min();
            if let Some(expires) = expires {
                soonest_expiry = Some(soonest_expiry.map_or(expires, |s| s.min(expires)));
            }
            if config.per_site {
                per_site.push(SiteFacts {
                    expires: expires.map(OffsetDateTime::unix_timestamp),
                    renewal: expires
                        .and(site.issuance.next_attempt_at)
                        .map(OffsetDateTime::unix_timestamp),
                    condition,
                    site: site.name,
                });
            }
        }
        if !full_page {
            break;
        }
    }
    registry.register(
        "certificate_ready_sites",
        "Sites per certificate condition (see autohttps_certificate_ready_status)",
        ready_sites,
    );
    if let Some(soonest) = soonest_expiry {
        let gauge = Gauge::<i64>::default();
        gauge.set(soonest.unix_timestamp());
        registry.register(
            "certificate_soonest_expiration_timestamp_seconds",
            "The earliest expiry over every site's current certificates (Unix time)",
            gauge,
        );
    }

    let attempts = Counter::<u64>::default();
    attempts.inc_by(counts.attempts);
    registry.register("issuance_attempts", "Issuance attempts started", attempts);
    let failures = Family::<ReasonLabels, Counter>::default();
    for (reason, n) in &counts.failures_by_reason {
        failures
            .get_or_create(&ReasonLabels {
                reason: reason.clone(),
            })
            .inc_by(*n);
    }
    registry.register(
        "issuance_failures",
        "Failed issuance attempts by reason",
        failures,
    );
    let orders = Gauge::<i64>::default();
    orders.set(i64::try_from(counts.orders_in_flight).unwrap_or(i64::MAX));
    registry.register(
        "orders_in_flight",
        "ACME orders created and not yet completed",
        orders,
    );
    let modes = Family::<ModeLabels, Gauge>::default();
    for (mode, n) in &counts.sites_by_mode {
        let mode = serde_json::to_value(mode)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        modes
            .get_or_create(&ModeLabels { https_mode: mode })
            .set(i64::try_from(*n).unwrap_or(i64::MAX));
    }
    registry.register("sites", "Sites by HTTPS mode", modes);
    let rejected = Gauge::<i64>::default();
    rejected.set(i64::try_from(rejected_sites).unwrap_or(i64::MAX));
    registry.register(
        "policy_rejected_sites",
        "Sites whose policy-feed entry fails the filter's validation: left out of the feed, or served at their previous good entry (see `autohttps site show`)",
        rejected,
    );

    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, &root)
        .map_err(|_| Error::InvalidInput("the metrics could not be encoded".into()))?;
    // What clients made the sidecar refuse or drop (CSP reports, unknown SNI names).
    crate::client_events::COUNTERS.write_prometheus(&mut text);
    Ok(Scrape { text, per_site })
}

/// Shared state of the operations listener.
#[derive(Debug, Clone)]
pub struct OpsState {
    issuer: Arc<Issuer>,
    feed: PolicyFeed,
    sds: SdsListen,
    config: Arc<MetricsConfig>,
}

/// The operations router: `/metrics`, `/readyz`, `/healthz`; no token (nothing in it writes
/// or reveals a secret).
pub fn ops_router(
    issuer: Arc<Issuer>,
    sds: SdsListen,
    config: MetricsConfig,
    feed: PolicyFeed,
) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/readyz", get(readyz))
        .route("/healthz", get(healthz))
        .with_state(OpsState {
            issuer,
            feed,
            sds,
            config: Arc::new(config),
        })
}

async fn metrics(State(state): State<OpsState>) -> Response {
    let rendered = tokio::task::spawn_blocking(move || {
        scrape(&state.issuer, &state.config, state.feed.rejected_count())
    })
    .await;
    match rendered {
        Ok(Ok(scrape)) => (
            [(
                header::CONTENT_TYPE,
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            )],
            axum::body::Body::from_stream(scrape.into_stream()),
        )
            .into_response(),
        Ok(Err(error)) => {
            tracing::error!(%error, "metrics scrape failed");
            let status = if error.is_store_unavailable() {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            };
            (status, format!("metrics unavailable: {error}\n")).into_response()
        }
        Err(join) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("metrics unavailable: {join}\n"),
        )
            .into_response(),
    }
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// What keeps the sidecar from being ready, in words; empty when ready.
pub async fn readiness_problems(issuer: &Arc<Issuer>, sds: &SdsListen) -> Vec<String> {
    let mut problems = Vec::new();
    let probe = Arc::clone(issuer);
    let store = tokio::time::timeout(
        READINESS_PATIENCE * 2,
        tokio::task::spawn_blocking(move || probe.store().check_writable(READINESS_PATIENCE)),
    )
    .await;
    match store {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(error))) => problems.push(format!("store: {error}")),
        Ok(Err(join)) => problems.push(format!("store: the check did not finish: {join}")),
        Err(_) => problems.push(format!(
            "store: no answer within {:?} (busy or locked by another process)",
            READINESS_PATIENCE * 2
        )),
    }
    let connected = match sds {
        SdsListen::Unix(path) => {
            tokio::time::timeout(READINESS_PATIENCE, tokio::net::UnixStream::connect(path))
                .await
                .map(|r| r.map(drop))
        }
        SdsListen::Tcp(address) => {
            tokio::time::timeout(READINESS_PATIENCE, tokio::net::TcpStream::connect(address))
                .await
                .map(|r| r.map(drop))
        }
    };
    let sds_at = match sds {
        SdsListen::Unix(path) => format!("unix:{}", path.display()),
        SdsListen::Tcp(address) => format!("tcp:{address}"),
    };
    match connected {
        Ok(Ok(())) => {}
        Ok(Err(error)) => problems.push(format!(
            "SDS server at {sds_at} refuses connections ({error}); Envoy cannot fetch certificates: restart autohttps"
        )),
        Err(_) => problems.push(format!(
            "SDS server at {sds_at} did not accept a connection within {READINESS_PATIENCE:?}"
        )),
    }
    problems
}

async fn readyz(State(state): State<OpsState>) -> Response {
    let problems = readiness_problems(&state.issuer, &state.sds).await;
    if problems.is_empty() {
        Json(json!({ "status": "ready" })).into_response()
    } else {
        tracing::warn!(?problems, "not ready");
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "not ready", "problems": problems })),
        )
            .into_response()
    }
}
